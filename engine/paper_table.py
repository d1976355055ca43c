"""``gpt2-triton eval --paper-table``: the GPT-2 model card's zero-shot table, our numbers beside the paper's.

Each column of the table (Radford et al. 2019, table 3) becomes an lm-eval task following the paper's method as far
as public datasets allow: detokenized text (:mod:`engine.detokenizers`), perplexity normalized per token of the
original tokenized text, bits per byte / character for enwik8 / text8, CBT as a choice among 10 candidates scored
with the rest of their sentence. ``paper_data`` (``--paper-data DIR``) replaces a column's Hugging Face dataset by
``DIR/<key>.jsonl`` in the same schema (local copies, or the tests' stand-ins).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from engine import detokenizers as detok


@dataclass(frozen=True)
class Column:
    key: str  # the task name (paper_<key>) and the stand-in file name (<key>.jsonl)
    title: str  # the column in the paper's table
    metric: str  # lm-eval metric of the task
    paper: float  # GPT-2 345M in the paper
    dataset: tuple[str, str | None, str]  # Hugging Face (path, config, split)
    note: str  # where our method differs from the paper's
    scale: float = 1.0  # accuracy in percent


COLUMNS = [
    Column("lambada", "LAMBADA (PPL)", "perplexity", 15.60, ("EleutherAI/lambada_openai", "default", "test"),
           "OpenAI's LAMBADA test set, as the paper; ppl of the last word given the passage"),
    Column("lambada", "LAMBADA (ACC)", "acc", 55.48, ("EleutherAI/lambada_openai", "default", "test"),
           "greedy last word (all its tokens); the paper's stop-word filter is not applied", 100.0),
    Column("cbt_cn", "CBT-CN (ACC)", "acc", 92.35, ("cam-cst/cbt", "CN", "test"),
           "each candidate scored with the rest of its sentence, as the paper", 100.0),
    Column("cbt_ne", "CBT-NE (ACC)", "acc", 87.1, ("cam-cst/cbt", "NE", "test"),
           "each candidate scored with the rest of its sentence, as the paper", 100.0),
    Column("wikitext2", "WikiText2 (PPL)", "word_perplexity", 22.76,
           ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1", "test"),
           "raw (not <unk>-ed) articles, each scored on its own (the paper: the test set as one stream)"),
    Column("ptb", "PTB (PPL)", "word_perplexity", 47.33, ("ptb-text-only/ptb_text_only", "penn_treebank", "test"),
           "test sentences as one stream, one <eos> counted per sentence"),
    Column("enwik8", "enwik8 (BPB)", "bits_per_byte", 1.01, ("LTCB/enwik8", "enwik8", "test"),
           "the dataset's test split (the paper: the last 5M bytes)"),
    Column("text8", "text8 (BPC)", "bits_per_byte", 1.06, ("afmck/text8", None, "test"),
           "the dataset's test split (the paper: the last 5M characters)"),
    Column("wikitext103", "WikiText103 (PPL)", "word_perplexity", 26.37,
           ("EleutherAI/wikitext_document_level", "wikitext-103-raw-v1", "test"),
           "raw articles, each scored on its own (the paper: the test set as one stream)"),
    Column("lm1b", "1BW (PPL)", "word_perplexity", 55.72, ("lm1b", None, "test"),
           "each sentence on its own, one <eos> counted per sentence (the paper does not say)"),
]  # fmt: skip


# ---------------------------------------------------------------- documents to requests (lm-eval task hooks)
def _rolling_results(words_of, bytes_of):
    """process_results for a rolling task: word perplexity over original tokens, bits per original byte."""

    def process_results(doc, results):
        (loglikelihood,) = results
        n_bytes = bytes_of(doc)
        return {"word_perplexity": (loglikelihood, words_of(doc)), "byte_perplexity": (loglikelihood, n_bytes),
                "bits_per_byte": (loglikelihood, n_bytes)}  # fmt: skip

    return process_results


def _joined(field: str, separator: str = "\n"):
    """process_docs that makes the whole split one document (a stream, as the paper scores it)."""

    def process_docs(dataset):
        from datasets import Dataset

        return Dataset.from_list([{field: separator.join(row[field] for row in dataset)}])

    return process_docs


def cbt_request(doc: dict) -> tuple[str, list[str]]:
    """Context (the 20 sentences and the question up to the blank) and each candidate's continuation (the candidate
    and the rest of the question), detokenized."""
    before, after = doc["question"].split("XXXXX", 1)
    prefix = detok.cbt_detokenizer(before).rstrip()
    context = detok.cbt_detokenizer(" ".join(s.strip() for s in doc["sentences"])) + "\n" + prefix
    choices = []
    for option in doc["options"]:
        sentence = detok.cbt_detokenizer(before + option + after)
        choices.append(sentence[len(prefix) :] if sentence.startswith(prefix) else " " + sentence)
    return context, choices


ROLLING_METRICS = [
    {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
    {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
    {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
]


def _task_body(key: str) -> dict:
    """The lm-eval config of a column's task, without its dataset."""
    rolling = {"output_type": "loglikelihood_rolling", "doc_to_text": "", "metric_list": ROLLING_METRICS}
    if key == "lambada":
        return {"output_type": "loglikelihood", "doc_to_text": lambda d: d["text"].rsplit(" ", 1)[0],
                "doc_to_target": lambda d: " " + d["text"].rsplit(" ", 1)[1],
                "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}  # fmt: skip
    if key.startswith("cbt"):
        return {"output_type": "multiple_choice", "doc_to_text": lambda d: cbt_request(d)[0],
                "doc_to_choice": lambda d: cbt_request(d)[1],
                "doc_to_target": lambda d: d["options"].index(d["answer"]),
                "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}  # fmt: skip
    if key.startswith("wikitext"):
        from lm_eval.tasks.wikitext.preprocess_wikitext import process_results

        return {**rolling, "doc_to_target": lambda d: detok.wikitext_detokenizer(d["page"]),
                "process_results": process_results}  # fmt: skip
    if key in ("ptb", "lm1b"):
        field = "sentence" if key == "ptb" else "text"
        body = {**rolling, "doc_to_target": lambda d: detok.ptb_detokenizer(d[field].strip()),
                "process_results": _rolling_results(lambda d: detok.count_words(d[field], lines_end_with_eos=True),
                                                    lambda d: len(d[field].encode()))}  # fmt: skip
        return {**body, "process_docs": _joined(field)} if key == "ptb" else body
    if key in ("enwik8", "text8"):
        return {**rolling, "doc_to_target": lambda d: d["text"], "process_docs": _joined("text"),
                "process_results": _rolling_results(lambda d: detok.count_words(d["text"]),
                                                    lambda d: len(d["text"].encode()))}  # fmt: skip
    raise ValueError(f"no task for column {key!r}")


def task_config(column: Column, paper_data: str | None = None) -> dict:
    """The lm-eval task config of a column: its HF dataset, or ``paper_data/<key>.jsonl`` when that exists."""
    path, name, split = column.dataset
    local = Path(paper_data) / f"{column.key}.jsonl" if paper_data else None
    if local is not None and local.is_file():
        source = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(local)}}, "test_split": "test"}
    else:
        source = {"dataset_path": path, "dataset_name": name, "test_split": split}
    return {"task": f"paper_{column.key}", **source, **_task_body(column.key)}


# ---------------------------------------------------------------- running and printing
def load(paper_data: str | None) -> tuple[dict, dict]:
    """The tasks whose data is at hand ``{key: Task}``, and the missing ones ``{key: message}``."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_defaults=False)
    tasks, missing = {}, {}
    for column in {c.key: c for c in COLUMNS}.values():
        try:
            tasks[column.key] = manager.load([task_config(column, paper_data)])["tasks"][f"paper_{column.key}"]
        except (OSError, ConnectionError) as e:
            from engine.eval_command import how_to_get

            path, name, _ = column.dataset
            reason = " ".join(str(e).split())[:120]
            missing[column.key] = f"{path}{f' ({name})' if name else ''}: {reason}; {how_to_get(path, name)}"
    return tasks, missing


def evaluate(lm, tasks: dict, limit) -> dict:
    """``{key: lm-eval results of its task}``: one lm-eval run over every task (the backend shows progress)."""
    import lm_eval

    result = lm_eval.simple_evaluate(model=lm, tasks=list(tasks.values()), limit=limit, bootstrap_iters=0)
    return {key: result["results"][f"paper_{key}"] for key in tasks}


def format_table(results: dict, missing: dict) -> str:
    """Markdown: each column of the paper's table, GPT-2 345M's number, ours, and the method note."""
    lines = ["| column | paper (345M) | ours | note |", "| --- | ---: | ---: | --- |"]
    for column in COLUMNS:
        if column.key in results:
            value = results[column.key][f"{column.metric},none"] * column.scale
            ours = f"{value:.2f}" if math.isfinite(value) else str(value)
        else:
            ours = "missing"
        lines.append(f"| {column.title} | {column.paper:.2f} | {ours} | {column.note} |")
    for key, message in missing.items():
        lines.append(f"\nmissing {key}: {message}")
    return "\n".join(lines)


def main(model_args: dict, batch_size, limit, paper_data: str | None, output: str | None, progress: bool) -> int:
    """Run every column whose data is at hand; print the table (and the missing datasets); 2 if none ran."""
    import json
    import sys

    from engine.evaluation import GPT2TritonLM

    tasks, missing = load(paper_data)
    if not tasks:
        print(f"error: no dataset of the paper table is available ({', '.join(missing)} missing); "
              + next(iter(missing.values())), file=sys.stderr)  # fmt: skip
        return 2
    lm = GPT2TritonLM(batch_size=batch_size, **{**model_args, "progress": progress})
    results = evaluate(lm, tasks, limit)
    print(format_table(results, missing))
    if output:
        Path(output).write_text(json.dumps({"results": results, "missing": missing}, indent=2, default=str) + "\n")
    return 0
