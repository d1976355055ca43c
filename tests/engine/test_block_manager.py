"""``BlockManager``: lazy allocation, reference counts, copy-on-write forks and prefix caching, on its own."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_manager import BlockManager
from tests.helpers import assert_blocks_consistent, make_sequence


def computed(bm: BlockManager, seq, num_tokens: int) -> None:
    """Blocks for ``num_tokens`` tokens, all of them computed (as after a step), full blocks registered."""
    bm.append(seq, num_tokens)
    bm.register_full_blocks(seq, num_tokens)
    seq.num_computed = num_tokens


def admitted(bm: BlockManager, tokens: list[int]):
    """A new sequence for ``tokens``, admitted with its prefix-cache hits and computed to the end."""
    seq = make_sequence(tokens)
    hits, hashes = bm.match_prefix(tokens)
    assert bm.can_admit(hits, len(tokens))
    bm.admit(seq, hits, hashes, len(tokens))
    bm.register_full_blocks(seq, len(tokens))
    seq.num_computed = len(tokens)
    return seq, len(hits)


def test_lazy_allocation_slots_and_exhaustion():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = make_sequence(list(range(5)))
    assert bm.append(a, 5) == [] and len(a.block_table) == 2 and bm.num_free == 8  # 5 tokens: 2 blocks, not more
    bm.append(a, 8)
    assert len(a.block_table) == 2  # still fits
    bm.append(a, 9)
    assert len(a.block_table) == 3 and bm.usage == pytest.approx(0.3)
    assert [bm.slot(a, p) for p in range(9)] == [a.block_table[p // 4] * 4 + p % 4 for p in range(9)]
    positions = random.choices(range(9), k=5)
    assert bm.slots([a] * 5, positions) == [bm.slot(a, p) for p in positions]
    b = make_sequence(list(range(30)))
    assert not bm.can_append(b, 30)  # 8 blocks > 7 free
    with pytest.raises(RuntimeError, match="exhausted"):
        bm.append(b, 30)
    assert_blocks_consistent(bm, [a])  # the refused append took nothing
    bm.free(a)
    assert bm.num_free == 10 and a.block_table == [] and a.num_computed == 0
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)


def test_prefix_hits_whole_blocks_never_the_last_token():
    bs = 4
    bm = BlockManager(num_blocks=32, block_size=bs)
    prompt = [random.randrange(50257) for _ in range(3 * bs + random.randrange(1, bs))]
    first, hits = admitted(bm, prompt)
    assert hits == 0 and len(bm.cached) == 3
    second, hits = admitted(bm, prompt)
    assert hits == 3 and second.block_table[:3] == first.block_table[:3]
    assert second.block_table[3] != first.block_table[3]  # the partial block is never shared by a hit
    assert [bm.blocks[b].ref_count for b in first.block_table] == [2, 2, 2, 1]
    # a prompt of exactly 3 blocks reuses only 2: its last token is always computed
    exact = prompt[: 3 * bs]
    assert len(bm.match_prefix(exact)[0]) == 2
    # a common prefix with another suffix: the blocks before the first difference
    other = prompt[: bs + 1] + [t + 1 for t in prompt[bs + 1 :]]
    assert bm.match_prefix(other)[0] == first.block_table[:1]
    assert_blocks_consistent(bm, [first, second])


def test_blocks_registered_for_a_step_that_did_not_run_lose_their_hash():
    """Blocks are registered when a step is scheduled (a request later in the same step may hit them); a sequence
    preempted before the step ran gives them back unregistered, since their K/V were never written."""
    bm = BlockManager(num_blocks=8, block_size=2)
    seq = make_sequence([1, 2, 3, 4, 5])
    bm.append(seq, 5)
    bm.register_full_blocks(seq, 5)
    assert len(bm.match_prefix([1, 2, 3, 4, 5, 6])[0]) == 2  # hittable within the step
    bm.free(seq)  # num_computed is still 0: the step never ran for it
    assert bm.match_prefix([1, 2, 3, 4, 5, 6]) == ([], []) and not bm.cached
    assert_blocks_consistent(bm, [])


def test_hit_is_confirmed_on_the_stored_tokens():
    """A registered hash whose block holds other tokens (a hash collision) is not a hit."""
    bm = BlockManager(num_blocks=8, block_size=2)
    seq, _ = admitted(bm, [5, 6, 7, 8, 9])
    block = bm.blocks[seq.block_table[0]]
    block.token_ids = (5, 99)  # as if another prefix had hashed to the same value
    assert bm.match_prefix([5, 6, 7, 8, 9]) == ([], [])
    block.token_ids, block.parent_hash = (5, 6), 12345  # same tokens, another chain
    assert bm.match_prefix([5, 6, 7, 8, 9]) == ([], [])


def test_freed_blocks_stay_hittable_until_reused_least_recently_freed_first():
    bm = BlockManager(num_blocks=6, block_size=2)
    a, _ = admitted(bm, [1, 2, 3, 4, 5])  # [1 2] [3 4] registered, [5] partial
    b, _ = admitted(bm, [7, 8, 9])  # [7 8] registered, [9] partial
    (a0, a1, a2), (b0, b1) = a.block_table, b.block_table
    (never_used,) = bm.free_queue
    bm.free(a)
    bm.free(b)
    # reuse order: blocks without a hash first, then cached ones least recently freed first; a sequence frees its
    # last block first, so the tail of a prompt is evicted before its head
    assert list(bm.free_queue) == [b1, a2, never_used, a1, a0, b0]
    c, hits = admitted(bm, [1, 2, 3, 4, 5])  # free blocks are still hittable
    assert hits == 2 and c.block_table == [a0, a1, b1]
    bm.free(c)
    assert list(bm.free_queue) == [b1, a2, never_used, b0, a1, a0]
    fresh = make_sequence(list(range(100, 108)))
    bm.append(fresh, 8)
    assert fresh.block_table == [b1, a2, never_used, b0]
    assert bm.blocks[b0].hash is None and bm.match_prefix([7, 8, 9]) == ([], [])  # a reused block loses its hash
    assert bm.match_prefix([1, 2, 3, 4, 5])[0] == [a0, a1]  # the others still hit
    assert_blocks_consistent(bm, [fresh])


def test_a_block_the_draft_filled_takes_over_the_hash_from_one_it_did_not():
    """A prompt of whole blocks asked twice: the second request computes its last block again (a hit never holds
    the last token), beside the registered one. Once a draft model has filled it (and the hits), that block serves
    the hash, so a longer prompt hits only draft-filled blocks; the block it replaced is reused first. A block the
    draft filled keeps its hash."""
    bs = 4
    bm = BlockManager(num_blocks=16, block_size=bs)
    prompt = [random.randrange(50257) for _ in range(3 * bs)]
    first, _ = admitted(bm, prompt)  # computed by the target alone
    second, hits = admitted(bm, prompt)
    assert hits == 2 and bm.blocks[second.block_table[2]].hash is None
    longer = prompt + [random.randrange(50257) for _ in range(bs)]
    replaced = first.block_table[2]
    assert bm.match_prefix(longer)[0] == second.block_table[:2] + [replaced]
    bm.free(first)
    assert next(iter(bm.free_queue)) != replaced  # still cached
    bm.mark_draft_filled(second, 0, len(prompt))
    assert bm.match_prefix(longer)[0] == second.block_table
    assert all(bm.blocks[b].draft_filled for b in second.block_table)
    assert bm.blocks[replaced].hash is None and next(iter(bm.free_queue)) == replaced
    third, _ = admitted(bm, prompt)
    bm.mark_draft_filled(third, 0, len(prompt))
    assert bm.match_prefix(longer)[0] == second.block_table
    assert_blocks_consistent(bm, [second, third])


def test_fork_shares_blocks_and_copies_only_the_partial_one_on_write():
    bs = 4
    bm = BlockManager(num_blocks=16, block_size=bs)
    parent = make_sequence(list(range(10)), n=3)
    computed(bm, parent, 10)  # 2 full blocks + 2 tokens in a third
    parent.draft_computed = random.randint(9, 10)  # a draft model's cache holds the partial block's tokens too
    children = parent.request.seqs[1:]
    for child in children:
        bm.fork(parent, child)
    assert all(c.block_table == parent.block_table and c.num_computed == 10 for c in children)
    # ... which the target's copy-on-write does not copy: the draft recomputes them, in the family's own blocks
    assert [seq.draft_computed for seq in [parent, *children]] == [8, 8, 8]
    assert [bm.blocks[b].ref_count for b in parent.block_table] == [3, 3, 3]
    free_before = bm.num_free
    for seq in [parent, *children]:  # each feeds its first sampled token (position 10)
        seq.output_token_ids.append(random.randrange(50257))
    copies = [bm.append(seq, 11) for seq in [parent, *children]]
    # the first two writers copy the shared partial block; the last one holds it alone and writes in place
    assert [len(c) for c in copies] == [1, 1, 0]
    assert copies[0][0][0] == copies[1][0][0] == children[1].block_table[2]
    assert bm.num_free == free_before - 2
    assert len({seq.block_table[2] for seq in [parent, *children]}) == 3
    assert [bm.blocks[b].ref_count for b in parent.block_table[:2]] == [3, 3]
    assert_blocks_consistent(bm, [parent, *children])
    for seq in [parent, *children]:
        bm.free(seq)
    assert_blocks_consistent(bm, [])


def test_reset_prefix_cache_forgets_every_block_once_none_is_held():
    bm = BlockManager(num_blocks=8, block_size=4)
    tokens = random.sample(range(1000), random.randint(9, 16))
    seq, _ = admitted(bm, tokens)
    assert not bm.reset_prefix_cache()  # a sequence holds blocks: nothing forgotten
    bm.free(seq)
    assert bm.match_prefix(tokens)[0]
    assert bm.reset_prefix_cache()
    assert bm.match_prefix(tokens) == ([], []) and not bm.cached
    assert all(block.hash is None for block in bm.blocks)
    assert_blocks_consistent(bm, [])


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    admitted(bm, [1, 2, 3, 4, 5])
    assert bm.match_prefix([1, 2, 3, 4, 5]) == ([], []) and not bm.cached


OP_NAMES = ["new", "again", "grow", "fork", "free", "draft"]
OPS = st.lists(st.tuples(st.sampled_from(OP_NAMES), st.integers(0, 10**6), st.integers(1, 12)), max_size=60)


@settings(max_examples=400, deadline=None)
@given(OPS, st.sampled_from([1, 2, 4]))
def test_random_operations_keep_the_invariants(ops, bs):
    """Random admit (with prefix hits; of new tokens, or of a live sequence's) / grow / fork / free / evict /
    draft-fill sequences over a small pool and vocabulary (so prefixes repeat): no block is handed out twice or
    leaked, reference counts always equal their users, and a registered block in a table is registered under that
    table's hash for it."""
    bm = BlockManager(num_blocks=12, block_size=bs)
    live = []
    for op, pick, size in ops:
        if op == "new" or op == "again" and live:
            tokens = [(pick >> i) % 3 for i in range(size)]  # tiny vocabulary: shared prefixes are common
            if op == "again":  # another sequence's tokens: its last full block is computed again
                tokens = live[pick % len(live)].token_range(0, live[pick % len(live)].num_tokens)
            seq = make_sequence(tokens, n=2)
            hits, hashes = bm.match_prefix(tokens)
            if bm.can_admit(hits, len(tokens)):
                bm.admit(seq, hits, hashes, len(tokens))
                bm.register_full_blocks(seq, len(tokens))
                seq.num_computed = len(tokens)
                live.append(seq)
        elif live and op == "grow":
            seq = live[pick % len(live)]
            seq.output_token_ids += [pick % 3] * size
            if bm.can_append(seq, seq.num_tokens):
                bm.append(seq, seq.num_tokens)
                bm.register_full_blocks(seq, seq.num_tokens)
                seq.num_computed = seq.num_tokens
            else:
                del seq.output_token_ids[-size:]
        elif live and op == "fork":
            parent = live[pick % len(live)]
            child = parent.request.seqs[1]
            if not child.block_table and child not in live:
                child.output_token_ids = list(parent.output_token_ids)
                bm.fork(parent, child)
                live.append(child)
        elif live and op == "free":
            bm.free(live.pop(pick % len(live)))
        elif live and op == "draft":  # a draft model catches up (may take registrations over)
            seq = live[pick % len(live)]
            bm.mark_draft_filled(seq, seq.draft_computed, seq.num_computed)
            seq.draft_computed = seq.num_computed
        assert_blocks_consistent(bm, live)
        for seq in live:  # every table covers its computed tokens
            assert len(seq.block_table) == bm.blocks_needed(seq.num_computed)
            for block_id, h in zip(seq.block_table, seq.block_hashes):
                assert bm.blocks[block_id].hash in (None, h)
    for seq in live:
        bm.free(seq)
    assert_blocks_consistent(bm, [])
    assert bm.num_free == bm.num_blocks


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 9), st.integers(0, 9), st.integers(0, 5), st.integers(0, 30), st.integers(0, 30))
def test_a_token_range_is_that_slice_of_prompt_output_and_drafts(prompt, output, drafts, start, length):
    seq = make_sequence(random.sample(range(1000), prompt))
    seq.output_token_ids = random.sample(range(1000), output)
    seq.draft_token_ids = random.sample(range(1000), drafts)
    everything = seq.all_token_ids() + seq.draft_token_ids
    assert seq.token_range(start, start + length) == everything[start : start + length]
