"""``gpt2-triton eval --paper-table`` over small local stand-ins for each dataset of the model card's table, and
the paper's detokenizers and word counts on known inputs."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import pytest

from engine import detokenizers as detok
from engine.paper_table import COLUMNS, cbt_request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORDS = "the company shares rose analysts said year market new first city river king team music".split()


def words(n: int) -> str:
    return " ".join(random.choice(WORDS) for _ in range(n))


def ptb_line() -> str:
    return " " + words(random.randint(3, 12)) + random.choice([" 's", " n't", " N %", " ,", ""]) + " " + words(2) + " "


def cbt_doc() -> dict:
    options = random.sample(WORDS, 10)
    return {"sentences": [words(random.randint(3, 8)) + " ." for _ in range(20)],
            "question": words(random.randint(0, 4)) + " XXXXX " + words(random.randint(1, 4)) + " .",
            "answer": options[random.randrange(10)], "options": options}  # fmt: skip


def stand_ins() -> dict[str, list[dict]]:
    """A few documents in each dataset's schema."""
    page = lambda: f" = {words(2)} = \n {words(20)} @-@ {words(3)} , {words(30)} ( {words(2)} ) . \n"  # noqa: E731
    return {
        "lambada": [{"text": words(random.randint(5, 30))} for _ in range(4)],
        "cbt_cn": [cbt_doc() for _ in range(3)],
        "cbt_ne": [cbt_doc() for _ in range(3)],
        "wikitext2": [{"page": page()} for _ in range(2)],
        "wikitext103": [{"page": page()} for _ in range(2)],
        "ptb": [{"sentence": ptb_line()} for _ in range(12)],
        "enwik8": [
            {"text": f"<page><title>{words(2)}</title> [[{words(5)}]] &amp; {words(10)}</page>"} for _ in range(4)
        ],
        "text8": [{"text": words(150)}],
        "lm1b": [{"text": ptb_line().strip().capitalize()} for _ in range(4)],
    }


def test_ptb_detokenizer_known_inputs():
    assert detok.ptb_detokenizer("the company 's shares do n't rise N % , analysts said .") == (
        "the company's shares don't rise N%, analysts said."
    )
    assert detok.ptb_detokenizer("the players ' union ( mlb ) said $ N and\\/or `` no ''") == (
        'the players\' union (mlb) said $N and/or "no"'
    )


def test_wikitext_detokenizer_and_word_counts_known_inputs():
    assert detok.wikitext_detokenizer(" = = Early life = = \n The 2 @,@ 000 @-@ year old ( see below ) , then") == (
        " == Early life ==\nThe 2,000-year old (see below), then"
    )
    assert detok.count_words("a b\nc d e\n\n") == 5
    assert detok.count_words("a b\nc d e\n\n", lines_end_with_eos=True) == 7  # one <eos> per non-empty line


def test_cbt_request_scores_each_candidate_with_the_rest_of_its_sentence():
    doc = {"sentences": ["He said : `` go . ''"] * 20, "question": "The XXXXX did n't come .",
           "answer": "dog", "options": ["dog", "man"]}  # fmt: skip
    context, choices = cbt_request(doc)
    assert context.endswith('He said: "go."\nThe') and context.count("\n") == 1
    assert choices == [" dog didn't come.", " man didn't come."]


@pytest.fixture(scope="module")
def paper_data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("paper-data")
    for key, rows in stand_ins().items():
        (directory / f"{key}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def test_paper_table_over_stand_ins(tiny_checkpoint, paper_data, tmp_path, capsys):
    """Every column runs, the table holds the paper's number and ours; PTB's perplexity is the stream's
    log-likelihood (detokenized, rolling windows) over its original tokens plus one <eos> per sentence."""
    from engine.cli import main
    from engine.evaluation import GPT2TritonLM

    out = tmp_path / "table.json"
    rc = main(["eval", "--paper-table", "--paper-data", str(paper_data), "--model", str(tiny_checkpoint),
               "--backend", "torch", "--device", "cpu", "--quiet", "--output", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0
    results = json.loads(out.read_text())["results"]
    for column in COLUMNS:
        row = next(line for line in printed.splitlines() if line.startswith(f"| {column.title} |"))
        value = results[column.key][f"{column.metric},none"] * column.scale
        assert row.split("|")[2:4] == [f" {column.paper:.2f} ", f" {value:.2f} "], row
    assert "missing" not in printed

    lm = GPT2TritonLM(pretrained=str(tiny_checkpoint), backend="torch", dtype="float32", device="cpu")
    from lm_eval.api.instance import Instance

    sentences = [json.loads(line)["sentence"] for line in (paper_data / "ptb.jsonl").read_text().splitlines()]
    stream = detok.ptb_detokenizer("\n".join(sentences).strip())
    (loglikelihood,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (stream,), 0)], True)
    tokens = sum(len(s.split()) for s in sentences) + len(sentences)
    assert math.isclose(results["ptb"]["word_perplexity,none"], math.exp(-loglikelihood / tokens), rel_tol=1e-4)


def test_paper_table_offline_names_the_missing_datasets(tiny_checkpoint, tmp_path):
    """Only LAMBADA at hand, nothing reachable: its rows are filled, every other column says missing, and the
    missing datasets are listed by name."""
    (tmp_path / "lambada.jsonl").write_text("".join(json.dumps({"text": words(12)}) + "\n" for _ in range(3)))
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "engine", "eval", "--paper-table", "--paper-data", str(tmp_path),
                           "--model", str(tiny_checkpoint), "--backend", "torch", "--device", "cpu", "--quiet"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in proc.stdout.splitlines()
            if line.startswith("| ") and "---" not in line}  # fmt: skip
    assert rows["LAMBADA (PPL)"] != "missing" and rows["LAMBADA (ACC)"] != "missing"
    assert [c.title for c in COLUMNS if rows[c.title] == "missing"] == [c.title for c in COLUMNS[2:]]
    for dataset in ("cam-cst/cbt (CN)", "ptb-text-only/ptb_text_only", "LTCB/enwik8", "lm1b"):
        assert f": {dataset}" in proc.stdout
