"""The block manager's bookkeeping per step and per request: allocating and freeing a batch's blocks, hashing full
blocks for the prefix cache, and looking a prompt up in it."""

from __future__ import annotations

import itertools
import random

import pytest

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.sequence import Request, Sequence

BLOCK_SIZE = 16
TOKENS = 512  # per sequence: 32 blocks
BATCH = 256
_ids = itertools.count()


def sequence(tokens: list[int]) -> Sequence:
    request = Request(f"r{next(_ids)}", None, tokens, SamplingParams(), detokenize=False)
    request.seqs.append(Sequence(next(_ids), request, 0))
    return request.seqs[0]


def prompts(n: int, shared: int = 0) -> list[list[int]]:
    """``n`` random prompts of ``TOKENS`` tokens, the first ``shared`` of them common to all."""
    rng = random.Random(0)
    prefix = [rng.randrange(50257) for _ in range(shared)]
    return [prefix + [rng.randrange(50257) for _ in range(TOKENS - shared)] for _ in range(n)]


def admit_all(bm: BlockManager, seqs: list[Sequence]) -> None:
    """What the scheduler does for each new prompt: look it up, admit it, register its full blocks."""
    for seq in seqs:
        tokens = seq.all_token_ids()
        hits, hashes = bm.match_prefix(tokens)
        bm.admit(seq, hits, hashes, len(tokens))
        bm.register_full_blocks(seq, len(tokens))
        seq.num_computed = len(tokens)


def free_all(bm: BlockManager, seqs: list[Sequence]) -> None:
    for seq in reversed(seqs):  # as the engine's finished requests give their blocks back
        bm.free(seq)


@pytest.mark.benchmark(group="blocks: 256 prompts of 512 tokens admitted (hashed, registered) and freed")
@pytest.mark.parametrize("case", ["new-prompts", "repeated-prompts", "no-prefix-caching"])
def test_admit_and_free(benchmark, case):
    """New prompts miss the prefix cache and evict what it held; repeated ones hit every block but the last."""
    bm = BlockManager(BATCH * TOKENS // BLOCK_SIZE, BLOCK_SIZE, enable_prefix_caching=case != "no-prefix-caching")
    batch = prompts(BATCH)
    rounds = itertools.count()

    def fresh_sequences():  # untimed: a new first token makes every block's chained hash new
        first = next(rounds) if case == "new-prompts" else 0
        return ([sequence([first, *p[1:]]) for p in batch],), {}

    def cycle(seqs):
        admit_all(bm, seqs)
        free_all(bm, seqs)
        return seqs

    (seqs,), _ = fresh_sequences()
    admit_all(bm, seqs)
    assert bm.num_free == 0 and all(seq.num_computed == TOKENS for seq in seqs)
    free_all(bm, seqs)
    assert bm.num_free == bm.num_blocks and all(b.ref_count == 0 for b in bm.blocks)
    benchmark.pedantic(cycle, setup=fresh_sequences, rounds=30, warmup_rounds=1)


@pytest.mark.benchmark(group="blocks: one decode step's appends for 256 sequences")
def test_decode_appends(benchmark):
    """Each running sequence grows by one token per step: a new block every 16th."""
    bm = BlockManager(BATCH * (TOKENS + 64) // BLOCK_SIZE, BLOCK_SIZE)
    seqs = [sequence(p) for p in prompts(BATCH)]
    admit_all(bm, seqs)

    def step():
        for seq in seqs:
            n = seq.num_computed + 1
            bm.append(seq, n)
            bm.register_full_blocks(seq, n)
            seq.num_computed = n

    benchmark.pedantic(step, rounds=60, warmup_rounds=0)  # 60 tokens: within the pool
    assert all(len(seq.block_table) == -(-seq.num_computed // BLOCK_SIZE) for seq in seqs)


@pytest.mark.benchmark(group="blocks: prefix-cache lookup of a 512-token prompt")
@pytest.mark.parametrize("hit", ["all-cached", "none-cached"])
def test_match_prefix(benchmark, hit):
    bm = BlockManager(4 * TOKENS // BLOCK_SIZE, BLOCK_SIZE)
    (cached, fresh) = prompts(2)
    admit_all(bm, [sequence(cached)])
    tokens = cached if hit == "all-cached" else fresh
    ids, _ = bm.match_prefix(tokens)
    assert len(ids) == (TOKENS // BLOCK_SIZE - 1 if hit == "all-cached" else 0)  # never the last token's block
    benchmark(bm.match_prefix, tokens)
