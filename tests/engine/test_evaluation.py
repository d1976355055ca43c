"""The lm-eval backend (``engine.evaluation``) against lm-eval's own ``hf`` backend on the same tiny checkpoint,
through ``lm_eval.simple_evaluate`` on local tasks over JSONL files written here: every metric, and every
per-request response, equal within 1e-4 relative (fp32). The tiny model's context is 128 tokens, so long contexts
and rolling windows past the context are exercised too."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import lm_eval  # the eval extra: pip install -e ".[eval]"
import pytest

from engine.evaluation import GPT2TritonLM, rolling_windows  # registers gpt2-triton
from tests.helpers import make_adapter

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or has had not "
    "but one their they after first two new time also who been its into more other would she during year only "
    "city world river music film game team war school king party states church"
).split()


def words(n: int) -> str:
    return " ".join(random.choice(WORDS) for _ in range(n))


def write_tasks(directory) -> list[str]:
    """Four small tasks, one per kind of request: multiple choice, a LAMBADA-style last word, rolling perplexity
    over texts longer than the context, and greedy generation with stop strings."""
    mc = [
        {
            "question": words(random.randint(3, 30 if i % 4 else 150)),  # some contexts pass the 128-token context
            "choices": [" " + words(random.randint(1, 4)) for _ in range(4)],
            "label": random.randrange(4),
        }
        for i in range(12)
    ]
    lambada = [{"text": words(random.randint(5, 40))} for _ in range(10)]
    rolling = [{"page": words(random.randint(5, 400))} for _ in range(5)]
    gen = [{"prompt": words(random.randint(2, 20)), "answer": random.choice(WORDS)} for _ in range(6)]
    specs = {
        "tiny_mc": (mc, "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_target: label\n"
                        "doc_to_choice: '{{choices}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
        "tiny_lambada": (lambada, "output_type: loglikelihood\n"
                                  "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
                                  "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
                                  "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n"
                                  "    higher_is_better: false\n  - metric: acc\n"),
        "tiny_rolling": (rolling, "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{page}}'\n"
                                  "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                                  "  - metric: bits_per_byte\n"),
        "tiny_gen": (gen, "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
                          "generation_kwargs:\n  until: [',', ' city']\n  max_gen_toks: 12\n  do_sample: false\n"
                          "metric_list:\n  - metric: exact_match\n"),
    }  # fmt: skip
    for name, (rows, body) in specs.items():
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        header = (
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {directory / 'cache'}\ntest_split: test\n"
        )
        (directory / f"{name}.yaml").write_text(header + body)
    return list(specs)


def evaluate(model, tasks, directory, **kw) -> dict:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(directory), include_defaults=False)  # indexing lm-eval's own: ~10 s
    return lm_eval.simple_evaluate(model=model, tasks=tasks, task_manager=manager, log_samples=True,
                                   bootstrap_iters=0, **kw)  # fmt: skip


def responses(result: dict, task: str) -> list:
    """Each request's response, in document then request order."""
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    return [r for s in samples for r in s["resps"]]


def assert_close(got, want, rel=1e-4, where=""):
    if isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for a, b in zip(got, want):
            assert_close(a, b, rel, where)
    elif isinstance(want, float) and not isinstance(want, bool):
        assert math.isclose(float(got), want, rel_tol=rel, abs_tol=rel), (where, got, want)
    else:
        assert got == want, (where, got, want)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lm-eval-tasks")
    return directory, write_tasks(directory)


def test_every_metric_and_response_equals_lm_evals_hf_backend(tiny_checkpoint, tasks, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory, names = tasks
    ours = evaluate("gpt2-triton", names, directory, batch_size=random.choice([2, 8, 64]),
                    model_args=f"pretrained={tiny_checkpoint},backend=torch,dtype=float32,device=cpu,"
                               f"max_num_batched_tokens={random.choice([128, 512, 4096])}")  # fmt: skip
    hf = evaluate("hf", names, directory, batch_size=1, device="cpu",
                  model_args=f"pretrained={tiny_checkpoint},dtype=float32")  # fmt: skip
    for task in names:
        assert_close(responses(ours, task), responses(hf, task), where=task)
        metrics = {k: v for k, v in hf["results"][task].items() if "," in k and "stderr" not in k}
        assert metrics, task
        for name, value in metrics.items():
            assert_close(ours["results"][task][name], value, where=f"{task} {name}")
    greedy = [r[0][1] for r in responses(ours, "tiny_lambada")]
    assert any(responses(ours, "tiny_gen")), "every generation was empty"
    assert isinstance(greedy[0], bool)


def test_rolling_windows_equal_the_hf_backends(tiny_checkpoint):
    """A text several contexts long: the windows are lm-eval's, and their summed log-likelihood is the hf
    backend's (the 128-token context forces several windows, the last one full-length)."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import get_rolling_token_windows

    ours = GPT2TritonLM(pretrained=str(tiny_checkpoint), backend="torch", dtype="float32", device="cpu")
    text = words(random.randint(300, 500))
    tokens = ours.tok_encode(text)
    assert len(tokens) > 2 * ours.max_length
    want = list(get_rolling_token_windows(tokens, 50256, 128, 1))
    assert list(rolling_windows(tokens, ours.prefix_token_id, ours.max_length)) == want
    hf = HFLM(pretrained=str(tiny_checkpoint), dtype="float32", device="cpu", batch_size=4)
    request = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    got, ref = ours.loglikelihood_rolling(request, disable_tqdm=True), hf.loglikelihood_rolling(request, True)
    assert_close(got, ref)


def test_an_adapter_is_evaluated_as_the_hf_backend_with_peft(tiny_checkpoint, hf_model, tmp_path):
    """``lora_local_path`` against lm-eval's hf backend with ``peft=``: log-likelihoods of continuations (the engine's
    prompts) and of a text several contexts long (whole windows), and the greedy answers."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    adapter = tmp_path / "adapter"
    make_adapter(hf_model, adapter, r=4, target_modules=["c_attn", "c_fc"])
    kw = dict(pretrained=str(tiny_checkpoint), backend="torch", dtype="float32", device="cpu")
    ours = GPT2TritonLM(lora_local_path=str(adapter), **kw)
    hf = HFLM(pretrained=str(tiny_checkpoint), peft=str(adapter), dtype="float32", device="cpu", batch_size=4)
    pairs = [Instance("loglikelihood", {}, (words(random.randint(3, 30)), " " + words(2)), i) for i in range(4)]
    got, want = ours.loglikelihood(pairs, disable_tqdm=True), hf.loglikelihood(pairs, disable_tqdm=True)
    assert_close(got, want)
    base = GPT2TritonLM(**kw).loglikelihood(pairs, disable_tqdm=True)
    assert not all(math.isclose(a[0], b[0], rel_tol=1e-3) for a, b in zip(got, base)), "the adapter changed nothing"
    rolling = [Instance("loglikelihood_rolling", {}, (words(random.randint(300, 400)),), 0)]
    assert_close(ours.loglikelihood_rolling(rolling, disable_tqdm=True), hf.loglikelihood_rolling(rolling, True))


def test_shared_contexts_are_served_from_the_prefix_cache(tiny_checkpoint):
    """Four continuations of one 100-token context: the context's whole blocks are computed once."""
    ours = GPT2TritonLM(pretrained=str(tiny_checkpoint), backend="torch", dtype="float32", device="cpu")
    context = [random.randrange(50000) for _ in range(100)]
    requests = [(None, context, [random.randrange(50000) for _ in range(random.randint(1, 5))]) for _ in range(4)]
    ours._loglikelihood_tokens(requests, disable_tqdm=True)
    stats = ours.llm.llm_engine.get_stats()
    assert stats.prefix_cache_hits == 3 * (99 // 16) * 16


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(batch_size="many"), "batch_size"), (dict(max_length=4096), "max_length"),
     (dict(max_gen_toks=0), "max_gen_toks")],
)  # fmt: skip
def test_bad_model_arguments_are_value_errors(tiny_checkpoint, kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPT2TritonLM(pretrained=str(tiny_checkpoint), backend="torch", device="cpu", **kwargs)


def test_unsupported_generation_kwargs_are_refused(tiny_checkpoint):
    from lm_eval.api.instance import Instance

    ours = GPT2TritonLM(pretrained=str(tiny_checkpoint), backend="torch", device="cpu")
    request = Instance("generate_until", {}, ("Hello", {"until": ["."], "max_gen_toks": 8, "num_beams": 4}), 0)
    with pytest.raises(ValueError, match="num_beams"):
        ours.generate_until([request])


# ---------------------------------------------------------------- gpt2-triton eval


def test_cli_eval_prints_lm_evals_table_and_writes_json(tiny_checkpoint, tasks, tmp_path, capsys):
    from engine.cli import main

    directory, _ = tasks
    out = tmp_path / "results.json"
    rc = main(["eval", "--model", str(tiny_checkpoint), "--backend", "torch", "--device", "cpu", "--quiet",
               "--tasks", "tiny_mc,tiny_rolling", "--include-path", str(directory), "--limit", "3",
               "--batch-size", "4", "--output", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"tiny_mc", "tiny_rolling"}
    for line in ("|tiny_mc", "|tiny_rolling", "word_perplexity"):
        assert line in printed
    assert f"{results['tiny_rolling']['word_perplexity,none']:.4f}" in printed


def test_cli_eval_missing_dataset_is_one_line_naming_it(tiny_checkpoint, tmp_path):
    """A dataset neither cached nor reachable: exit 2, one line on stderr naming it and how to get it. (A process of
    its own: ``datasets`` reads HF_HUB_OFFLINE once, at import.)"""
    (tmp_path / "gone.yaml").write_text(
        "task: gone\ndataset_path: gpt2-triton-tests/no-such-dataset\ndataset_name: v1\noutput_type: loglikelihood\n"
        "test_split: test\ndoc_to_text: '{{a}}'\ndoc_to_target: '{{b}}'\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "engine", "eval", "--model", str(tiny_checkpoint), "--quiet",
                           "--tasks", "gone", "--include-path", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)  # fmt: skip
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert "gpt2-triton-tests/no-such-dataset (v1)" in err[0]
    assert "load_dataset('gpt2-triton-tests/no-such-dataset', 'v1')" in err[0]


@pytest.mark.parametrize(
    "args, match",
    [([], "--tasks"), (["--tasks", "x", "--limit", "0"], "--limit"),
     (["--tasks", "x", "--batch-size", "0"], "--batch-size")],
)  # fmt: skip
def test_cli_eval_mistakes_exit_2(tiny_checkpoint, args, match, capsys):
    from engine.cli import main

    assert main(["eval", "--model", str(tiny_checkpoint), "--backend", "torch", "--device", "cpu", *args]) == 2
    assert match in capsys.readouterr().err
