"""The requests of a run: random prompts of random lengths (vLLM's random dataset) or a prompts file."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Workload:
    """Each prompt as token ids and as text (the same tokens: the text re-encodes to exactly these ids, so a server
    sent either computes the same prompt), and the tokens each completion must generate."""

    prompt_ids: list[list[int]]
    prompt_texts: list[str]
    output_lens: list[int]
    source: str  # "random (seed S)" or the prompts file

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def prompt(self, i: int, fmt: str) -> list[int] | str:
        return self.prompt_ids[i] if fmt == "ids" else self.prompt_texts[i]

    def longest_request(self) -> int:
        """Positions the longest request needs: prompt + output."""
        return max(len(p) + o for p, o in zip(self.prompt_ids, self.output_lens))

    def describe(self) -> dict:
        ins = [len(p) for p in self.prompt_ids]
        return dict(
            source=self.source, num_prompts=len(self), input_len_min=min(ins), input_len_max=max(ins),
            input_len_mean=sum(ins) / len(ins), output_len_min=min(self.output_lens),
            output_len_max=max(self.output_lens), output_len_mean=sum(self.output_lens) / len(self),
            prompt_tokens=sum(ins), output_tokens=sum(self.output_lens),
        )  # fmt: skip


def uniform_lengths(mean: int, ratio: float, count: int, rng: random.Random) -> list[int]:
    """``count`` lengths uniform in ``[mean * (1 - ratio), mean * (1 + ratio)]``, at least 1 (vLLM's random set)."""
    low, high = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [rng.randint(low, high) for _ in range(count)]


def stable_random_prompt(tokenizer, length: int, rng: random.Random, tries: int = 20) -> list[int]:
    """Random token ids (never EOS) that survive ``encode(decode(ids))`` unchanged, about ``length`` of them.

    Random ids rarely do: decoding may split a UTF-8 character or produce text that BPE merges differently. So, as
    vLLM's random dataset does: decode, re-encode, cut or top up to the length, and repeat until the ids are stable."""

    def draw(k: int) -> list[int]:
        return [t for t in (rng.randrange(tokenizer.vocab_size) for _ in range(k)) if t != tokenizer.eos_token_id]

    ids = draw(length)
    for _ in range(tries):
        again = tokenizer.encode(tokenizer.decode(ids))
        if again == ids and len(ids) == length:
            return ids
        ids = again[:length] + draw(length - len(again))
    return tokenizer.encode(tokenizer.decode(ids))  # stable by now in practice; its length may be off by a token


def random_workload(tokenizer, num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                    seed: int) -> Workload:  # fmt: skip
    rng = random.Random(seed)
    in_lens = uniform_lengths(input_len, range_ratio, num_prompts, rng)
    out_lens = uniform_lengths(output_len, range_ratio, num_prompts, rng)
    ids = [stable_random_prompt(tokenizer, n, rng) for n in in_lens]
    return Workload(ids, [tokenizer.decode(p) for p in ids], out_lens, f"random (seed {seed})")


def parse_prompt_line(tokenizer, line: str, output_len: int) -> tuple[list[int], str, int]:
    """(ids, text, output length) of one line: plain text, or a JSON object with ``prompt`` (text or token ids) and
    optionally ``output_len`` (or ``max_tokens``)."""
    row = json.loads(line) if line.lstrip().startswith("{") else {"prompt": line}
    prompt = row["prompt"]
    if isinstance(prompt, list):
        ids, text = [int(t) for t in prompt], tokenizer.decode(prompt)
    else:
        ids, text = tokenizer.encode(prompt), prompt
    return ids, text, int(row.get("output_len", row.get("max_tokens", output_len)))


def file_workload(tokenizer, path: str, num_prompts: int | None, output_len: int, seed: int) -> Workload:
    """One prompt per non-blank line; ``num_prompts`` takes a seeded random sample (all lines when None)."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise SystemExit(f"{path}: no prompts")
    rows = [parse_prompt_line(tokenizer, line, output_len) for line in lines]
    if num_prompts is not None and num_prompts < len(rows):
        rows = random.Random(seed).sample(rows, num_prompts)
    ids, texts, out_lens = (list(column) for column in zip(*rows))
    return Workload(ids, texts, out_lens, path)


def load_tokenizer(source: str | None):
    """GPT-2's BPE, to draw prompts that are the same tokens as text and as ids: ``source`` (a directory with
    vocab.json + merges.txt, or a .tiktoken file), else openai-whisper's rank file (no network needed), else
    tiktoken's ``gpt2`` encoding."""
    from engine import tokenizer as tk

    if source is None and (ranks := tk.find_whisper_gpt2_ranks()) is not None:
        return tk.Tokenizer.from_ranks(tk.read_tiktoken_file(ranks))
    return tk.load_tokenizer(source)
