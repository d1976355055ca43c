"""The tokenizer (tiktoken's BPE over GPT-2's ranks) against transformers' fast tokenizer (Rust ``tokenizers``), on
the same vocab.json and merges.txt: encoding a 30 KB document, 256 prompts, decoding the document, and the
per-token decode of streaming. Each benchmark first checks that both sides give the same ids or text."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def ours(tokenizer_dir):
    from engine.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="module")
def fast(tokenizer_dir):
    from transformers import GPT2TokenizerFast

    hf = GPT2TokenizerFast.from_pretrained(str(tokenizer_dir))  # (vocab_file=, merges_file=) builds an empty one
    assert len(hf) == 50257
    return hf


@pytest.fixture(scope="module")
def prompts(text) -> list[str]:
    lines = [line for line in text.splitlines() if line.strip()]
    return [lines[(7 * i) % len(lines)] for i in range(256)]


def fast_encode(fast, text: str) -> list[int]:
    return fast.encode(text, add_special_tokens=False)


def fast_decode(fast, ids: list[int]) -> str:
    return fast.decode(ids, clean_up_tokenization_spaces=False)


@pytest.mark.benchmark(group="tokenizer: encode a 30 KB document")
@pytest.mark.parametrize("who", ["ours", "transformers-fast"])
def test_encode_document(benchmark, ours, fast, text, who):
    ids = ours.encode(text)
    assert fast_encode(fast, text) == ids and len(ids) > 5000
    benchmark(ours.encode if who == "ours" else lambda t: fast_encode(fast, t), text)


@pytest.mark.benchmark(group="tokenizer: encode 256 prompts")
@pytest.mark.parametrize("who", ["ours", "transformers-fast"])
def test_encode_batch(benchmark, ours, fast, prompts, who):
    def ours_batch():  # what add_request does: one prompt at a time
        return [ours.encode(p) for p in prompts]

    def fast_batch():  # its batched call, which parallelizes in Rust
        return fast(prompts, add_special_tokens=False)["input_ids"]

    assert ours_batch() == fast_batch()
    benchmark(ours_batch if who == "ours" else fast_batch)


@pytest.mark.benchmark(group="tokenizer: decode a 30 KB document")
@pytest.mark.parametrize("who", ["ours", "transformers-fast"])
def test_decode_document(benchmark, ours, fast, text, who):
    ids = ours.encode(text)
    assert ours.decode(ids) == fast_decode(fast, ids) == text
    benchmark(ours.decode if who == "ours" else lambda i: fast_decode(fast, i), ids)


@pytest.mark.benchmark(group="tokenizer: stream 256 tokens, one at a time")
@pytest.mark.parametrize("who", ["ours", "transformers-fast"])
def test_decode_stream(benchmark, ours, fast, text, who):
    """What the output processor does per token: ours decodes each token's bytes incrementally; transformers'
    ``TextStreamer`` decodes the tokens so far and prints what is new."""
    from engine.tokenizer import IncrementalDecoder

    ids = ours.encode(text)[:256]

    def ours_stream() -> str:
        decoder = IncrementalDecoder(ours)
        return "".join(decoder.push(t) for t in ids) + decoder.flush()

    def fast_stream() -> str:
        out, printed = "", 0
        for n in range(1, len(ids) + 1):
            so_far = fast_decode(fast, ids[:n])
            out += so_far[printed:]
            printed = len(so_far)
        return out

    fn = ours_stream if who == "ours" else fast_stream
    assert fn() == ours.decode(ids)
    benchmark(fn)
