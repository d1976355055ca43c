"""The same lm-evaluation-harness run through the ``gpt2-triton`` backend and through lm-eval's ``hf`` backend, timed
in one process on the same checkpoint (gpt2 with random weights, fp32, CPU by default).

    python bench/lm_eval_bench.py        # 64 four-choice questions (256 requests), 4 rolling texts, 32 generations
    python bench/lm_eval_bench.py --docs 20 --rolling-docs 4 --gen-docs 0 --hf-batch-size 32

The tasks are local YAMLs over JSONL files this script writes, one per request type: a multiple-choice task (a
context of ``--context-words`` words and four short continuations per question, lm-eval's most common request
shape), a rolling-perplexity task over texts of about a context's length and longer, and a greedy generation task
(``--gen-tokens`` tokens at most, stop string ``\n\n``). Before timing, both backends run the first few documents
and must give the same per-request responses (log-likelihoods within 1e-4 relative, generated texts identical);
after the timed runs every metric must match too. Model loading is outside the timings: each side is built first,
then ``simple_evaluate`` is timed, one task at a time, so the ratio of each request type shows.
Goal (the issue's): ours at least 3x faster with equal metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL = 3.0
WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or has had not "
    "but one their they after first two new time also who been its into more other would she during year only "
    "city world river music film game team war school king party states church"
).split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_tasks(directory: Path, docs: int, rolling_docs: int, gen_docs: int, gen_tokens: int, context_words: int,
                seed: int) -> list[str]:  # fmt: skip
    rng = random.Random(seed)
    mc = [{"question": words(rng, rng.randint(context_words // 2, context_words)),
           "choices": [" " + words(rng, rng.randint(1, 5)) for _ in range(4)], "label": rng.randrange(4)}
          for _ in range(docs)]  # fmt: skip
    rolling = [{"page": words(rng, rng.randint(600, 1200))} for _ in range(rolling_docs)]
    gen = [{"prompt": words(rng, rng.randint(20, 60)), "answer": rng.choice(WORDS)} for _ in range(gen_docs)]
    specs = {
        "bench_mc": (mc, "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_target: label\n"
                         "doc_to_choice: '{{choices}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"),
        "bench_rolling": (rolling, "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{page}}'\n"
                                   "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"),
        "bench_gen": (gen, "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
                           f"generation_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: {gen_tokens}\n"
                           "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"),
    }  # fmt: skip
    names = []
    for name, (rows, body) in specs.items():
        if not rows:
            continue
        data = directory / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (directory / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {directory / 'cache'}\ntest_split: test\n" + body
        )
        names.append(name)
    return names


def write_checkpoint(directory: Path, preset: str, seed: int, tokenizer: str | None) -> Path:
    """transformers' randomly initialised GPT-2 plus GPT-2's tokenizer files (from ``--tokenizer`` or
    openai-whisper's rank file)."""
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    from engine.config import PRESETS
    from engine.tokenizer import find_whisper_gpt2_ranks, read_tiktoken_file, write_hf_files

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(**PRESETS[preset])).save_pretrained(directory)
    if tokenizer is not None:
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(Path(tokenizer) / name, directory / name)
    else:
        ranks = find_whisper_gpt2_ranks()
        if ranks is None:
            raise SystemExit("no GPT-2 tokenizer: pass --tokenizer DIR or pip install --no-deps openai-whisper")
        write_hf_files(read_tiktoken_file(ranks), directory)
    return directory


def evaluate(lm, tasks: list[str], directory: Path, limit: int | None) -> tuple[dict, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(directory), include_defaults=False)
    start = time.perf_counter()
    result = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=True,
                                     bootstrap_iters=0)  # fmt: skip
    return result, time.perf_counter() - start


def responses(result: dict, task: str) -> list[float | str]:
    """Everything each request returned, in document order (log-likelihoods, greedy flags as 0/1, generated
    texts)."""
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    flat = []
    for s in samples:
        for r in s["resps"]:
            value = r[0]
            values = value if isinstance(value, (list, tuple)) else [value]
            flat += [v if isinstance(v, str) else float(v) for v in values]
    return flat


def same(a: list[float | str], b: list[float | str], rel: float = 1e-4) -> bool:
    def close(x, y):
        if isinstance(x, str) or isinstance(y, str):
            return x == y
        return math.isclose(x, y, rel_tol=rel, abs_tol=rel)

    return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))


def metrics(result: dict, task: str) -> dict[str, float]:
    return {k: v for k, v in result["results"][task].items() if "," in k and "stderr" not in k}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2", help="a preset (random weights)")
    p.add_argument("--docs", type=int, default=64, help="multiple-choice questions (4 requests each)")
    p.add_argument("--rolling-docs", type=int, default=4, help="texts for the rolling-perplexity task")
    p.add_argument("--gen-docs", type=int, default=32, help="prompts for the greedy generation task")
    p.add_argument("--gen-tokens", type=int, default=32, help="max_gen_toks of the generation task")
    p.add_argument("--context-words", type=int, default=200, help="longest question context, in words")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--validate-docs", type=int, default=4, help="documents per task compared before timing")
    p.add_argument("--tokenizer", default=None, help="a directory with vocab.json + merges.txt")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from lm_eval.models.huggingface import HFLM

    from engine.evaluation import GPT2TritonLM

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = write_checkpoint(tmp / "ckpt", args.model, args.seed, args.tokenizer)
        tasks = write_tasks(tmp, args.docs, args.rolling_docs, args.gen_docs, args.gen_tokens, args.context_words,
                            args.seed)  # fmt: skip
        ours = GPT2TritonLM(pretrained=str(checkpoint), backend="torch", dtype="float32", device="cpu",
                            progress=False)  # fmt: skip
        hf = HFLM(pretrained=str(checkpoint), dtype="float32", device="cpu", batch_size=args.hf_batch_size)

        # validate before timing: the first documents of each task, every response equal
        small = [evaluate(lm, tasks, tmp, args.validate_docs)[0] for lm in (ours, hf)]
        for task in tasks:
            if not same(responses(small[0], task), responses(small[1], task)):
                raise SystemExit(f"{task}: gpt2-triton's responses differ from the hf backend's; not timing")
        # fresh engine: the validation run's prefix-cache blocks must not serve the timed run
        ours = GPT2TritonLM(pretrained=str(checkpoint), backend="torch", dtype="float32", device="cpu",
                            progress=False)  # fmt: skip
        timed = {task: (evaluate(ours, [task], tmp, None), evaluate(hf, [task], tmp, None)) for task in tasks}

    import datetime
    import platform

    import lm_eval
    import transformers

    print(f"{args.model} (random weights), fp32, CPU ({platform.processor() or platform.machine()}), "
          f"{torch.get_num_threads()} threads, hf backend batch {args.hf_batch_size}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, lm-eval {lm_eval.__version__}, "
          f"{datetime.date.today()}")  # fmt: skip
    total_ours = total_hf = 0.0
    for task, ((ours_result, ours_s), (_, hf_s)) in timed.items():
        requests = sum(len(s["resps"]) for s in ours_result["samples"][task])
        print(f"  {task}: {requests} requests; gpt2-triton {ours_s:.1f} s, hf {hf_s:.1f} s: {hf_s / ours_s:.2f}x")
        total_ours, total_hf = total_ours + ours_s, total_hf + hf_s
    print(f"all tasks: gpt2-triton {total_ours:.1f} s, hf {total_hf:.1f} s: ratio {total_hf / total_ours:.2f}x")
    stats = ours.llm.llm_engine.get_stats()
    if stats.prefix_cache_queries:
        print(f"prefix cache: {stats.prefix_cache_hits} of {stats.prefix_cache_queries} prompt tokens served")
    equal = True
    for task, ((ours_result, _), (hf_result, _)) in timed.items():
        for name, value in metrics(hf_result, task).items():
            got = metrics(ours_result, task)[name]
            ok = math.isclose(got, value, rel_tol=1e-4, abs_tol=1e-6)
            equal &= ok
            print(f"  {task} {name}: gpt2-triton {got:.6g}  hf {value:.6g}  {'equal' if ok else 'DIFFERENT'}")
    met = equal and total_hf / total_ours >= GOAL
    print(f"goal: >= {GOAL:.0f}x faster with equal metrics: {'PASS' if met else 'MISS'}")
    return 0 if equal else 1


if __name__ == "__main__":
    raise SystemExit(main())
