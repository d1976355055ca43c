"""``Scheduler`` on its own, driven by a stand-in for the model: token budget, decodes first, chunked prefill,
FCFS admission, preemption by recompute, forks. Every scenario ends with the scheduler empty and every block free."""

from __future__ import annotations

import random

from engine.block_manager import BlockManager
from engine.scheduler import Scheduler
from engine.sequence import SequenceStatus
from tests.helpers import assert_blocks_consistent, make_sequence


def scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=16, policy="fcfs") -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, budget, policy)


def step(s: Scheduler):
    """One step as the engine runs it, sampling a random token for each sequence whose tokens are all computed."""
    running = list(s.running)
    decoding = all(seq.num_uncomputed == 1 for seq in running)
    out = s.schedule()
    assert out.total_tokens <= s.max_num_batched_tokens and len(set(out.seqs)) == len(out.seqs)
    if out.all_decodes:  # the runner takes the decode path on the scheduler's word
        assert all(seq.num_uncomputed == n == 1 for seq, n in zip(out.seqs, out.num_tokens))
    elif decoding:  # then only an admission clears it
        assert any(seq not in running for seq in out.seqs)
    sampled = [seq for i, seq in enumerate(out.seqs) if out.samples(i)]
    s.step_done(out)
    for seq in list(sampled):
        pending = [c for c in seq.request.seqs if c.status is SequenceStatus.FORK_PENDING]
        if pending:
            s.fork(seq, pending)
            sampled += pending
    for seq in sampled:
        seq.output_token_ids.append(random.randrange(50257))
        if len(seq.output_token_ids) >= seq.params.max_tokens:
            seq.finish("length")
            s.finish(seq)
    return out


def run_to_end(s: Scheduler, max_steps: int = 1000) -> None:
    for _ in range(max_steps):
        if not s.has_work:
            break
        step(s)
    assert_scheduler_empty(s)


def assert_scheduler_empty(s: Scheduler) -> None:
    assert not s.running and not s.waiting
    assert_blocks_consistent(s.blocks, [])
    assert s.blocks.num_free == s.blocks.num_blocks


def prompt(n: int) -> list[int]:
    return [random.randrange(50257) for _ in range(n)]


def test_decodes_first_then_prompt_chunks_in_what_is_left():
    s = scheduler(budget=16)
    decoders = [make_sequence(prompt(random.randint(1, 5)), max_tokens=20) for _ in range(3)]
    for seq in decoders:
        s.add(seq)
    step(s)  # their prompts, in one step
    assert all(seq.num_uncomputed == 1 for seq in decoders)
    long, later = make_sequence(prompt(40), max_tokens=4), make_sequence(prompt(3), max_tokens=4)
    s.add(long)
    s.add(later)
    for _ in range(3):  # FCFS: long takes what the decodes leave, nothing is left for `later`
        out = step(s)
        assert out.seqs == decoders + [long] and out.num_tokens == [1, 1, 1, 13]
    assert not long.output_token_ids  # 39 of 40 tokens computed: nothing sampled yet
    out = step(s)
    assert out.seqs == decoders + [long, later] and out.num_tokens == [1, 1, 1, 1, 3]
    assert long.output_token_ids and later.output_token_ids  # both prompts complete: both sampled
    run_to_end(s)


def test_chunked_prompt_samples_only_after_its_last_chunk():
    s = scheduler(budget=16)
    seq = make_sequence(prompt(50), max_tokens=3)
    s.add(seq)
    chunks = []
    while not seq.output_token_ids:
        out = step(s)
        chunks.append(out.num_tokens[0])
    assert chunks == [16, 16, 16, 2]
    run_to_end(s)


def test_max_num_seqs_limits_admission_and_counts_a_requests_samples():
    s = scheduler(max_num_seqs=4, budget=64)
    first = make_sequence(prompt(5), max_tokens=3, n=3)
    second = make_sequence(prompt(5), max_tokens=3, n=2)
    s.add(first)
    s.add(second)
    out = step(s)
    assert out.seqs == [first]  # 3 samples + 2 would exceed 4 sequences
    assert len(s.running) == 3  # forked after its prompt
    run_to_end(s)


def test_preemption_takes_the_newest_and_it_resumes_where_it_was():
    # 6 blocks of 4 tokens; two sequences of 8 + 12 tokens cannot both finish at once
    s = scheduler(num_blocks=6, block_size=4, budget=32)
    old, new = make_sequence(prompt(8), max_tokens=12), make_sequence(prompt(8), max_tokens=12)
    s.add(old)
    s.add(new)
    step(s)
    assert s.running == [old, new]
    late = make_sequence(prompt(2), max_tokens=2)
    s.add(late)
    preempted_at = None
    for i in range(40):
        before = list(new.output_token_ids)
        out = step(s)
        if out.num_preempted:
            preempted_at = i
            assert new.status is SequenceStatus.WAITING and s.waiting[0] is new  # the newest, to the front
            assert new not in out.seqs and new.block_table == [] and new.output_token_ids == before
            assert late not in out.seqs  # a step that preempted admits nobody
            break
    assert preempted_at is not None and s.num_preemptions == 1
    while new.status is SequenceStatus.WAITING:
        step(s)
    # resumed: prompt + generated tokens recomputed (its own full blocks still cached), and nothing was lost
    assert new.output_token_ids[: len(before)] == before
    assert s.prefix_cache_hits > 0
    run_to_end(s)


def test_sequences_forked_from_a_finished_one_compute_only_their_new_token():
    """Beam search's step: a finished sequence keeps its blocks; requests extending it by one token start from
    them, the partly filled last block copied for all but the last writer, and compute one token each."""
    s = scheduler(num_blocks=16, block_size=4, budget=32)
    parent = make_sequence(prompt(6), max_tokens=1)
    s.add(parent)
    out = s.schedule()
    s.step_done(out)
    parent.finish("length")
    s.finish(parent, keep_blocks=True)
    assert len(parent.block_table) == 2 and parent.num_computed == 6
    children = [make_sequence(parent.prompt_token_ids + [t], max_tokens=1) for t in prompt(3)]
    for child in children:
        s.blocks.fork(parent, child)
        s.add(child)
    shared = parent.block_table[1]  # tokens 4 and 5, and the slot for the children's new token
    s.blocks.free(parent)  # released once forked: the children hold what they share
    free = s.blocks.num_free
    out = s.schedule()
    assert out.seqs == children and out.num_tokens == [1, 1, 1]
    assert [src for src, _ in out.block_copies] == [shared] * 2  # the third writes in the shared block itself
    assert s.blocks.num_free == free - 2 and children[2].block_table[1] == shared
    assert s.prefix_cache_hits == 3 * 6  # the parent's 6 tokens, for each child
    s.step_done(out)
    for child in children:
        child.finish("length")
        s.finish(child)
    assert_scheduler_empty(s)


def test_random_workloads_always_drain():
    """Random prompts, lengths and n over a pool a little larger than the largest request: every sequence
    finishes, with exactly max_tokens tokens."""
    s = scheduler(num_blocks=12, block_size=4, max_num_seqs=6, budget=24)
    seqs = []
    for _ in range(30):
        n = random.randint(1, 3)
        p = random.randint(1, 12)
        max_tokens = random.randint(1, max(1, (48 // n) - p))  # each request fits the pool alone (n x blocks)
        seq = make_sequence(prompt(p), max_tokens=max_tokens, n=n)
        if s.blocks.blocks_needed(p + max_tokens - 1) * n <= s.blocks.num_blocks:
            seqs.append(seq)
            s.add(seq)
    decode_steps = 0
    for _ in range(5000):
        if not s.has_work:
            break
        decode_steps += step(s).all_decodes
    assert_scheduler_empty(s)
    assert decode_steps > 0
    assert all(len(c.output_token_ids) == c.params.max_tokens for seq in seqs for c in seq.request.seqs)


def test_the_decode_fast_path_schedules_what_the_general_one_does():
    """Two schedulers run the same random workload in lockstep (prompts, n up to 3, a pool small enough to preempt
    and copy on write), one with the one-pass decode step turned off: every step's sequences, token counts, block
    copies and preemptions, and every block table, are the same; the fast path ran on most decode steps."""
    specs = [(prompt(random.randint(1, 12)), random.randint(1, 14), random.randint(1, 3)) for _ in range(24)]
    pair = [scheduler(num_blocks=14, block_size=4, max_num_seqs=6, budget=24) for _ in range(2)]
    general, fast = pair
    general._schedule_decodes = lambda out: False
    taken = []
    decodes_once = fast._schedule_decodes
    fast._schedule_decodes = lambda out: taken.append(decodes_once(out)) or taken[-1]
    for i, (tokens, max_tokens, n) in enumerate(specs):
        for s in pair:
            s.add(make_sequence(tokens, max_tokens=max_tokens, n=n, request_id=str(i)))

    def key(seq):
        return seq.request.request_id, seq.sample_index

    for _ in range(3000):
        if not general.has_work:
            break
        state = random.getstate()
        outs = []
        for s in pair:  # the same "sampled" tokens on both sides
            random.setstate(state)
            outs.append(step(s))
        a, b = outs
        assert [key(seq) for seq in a.seqs] == [key(seq) for seq in b.seqs] and a.num_tokens == b.num_tokens
        assert a.block_copies == b.block_copies and a.num_preempted == b.num_preempted
        assert a.all_decodes == b.all_decodes
        tables = [{key(seq): seq.block_table for seq in s.running} for s in pair]
        assert tables[0] == tables[1]
    assert_scheduler_empty(general)
    assert_scheduler_empty(fast)
    assert taken.count(True) > taken.count(False) > 0


def test_drafts_are_cut_to_the_budget_and_the_free_blocks_never_preempting():
    """Speculative decoding: a decoding sequence computes its token and its drafts, as many as fit in the step's
    budget and the free blocks; a draft never preempts anyone, and drafts mean the runner's decode path is off."""
    s = scheduler(num_blocks=5, block_size=4, budget=8)
    a, b = make_sequence(prompt(3), max_tokens=12), make_sequence(prompt(5), max_tokens=12)
    s.add(a)
    s.add(b)
    step(s)  # both prompts: a holds 1 block, b 2; 2 of 5 are free
    assert [seq.num_uncomputed for seq in (a, b)] == [1, 1]
    a.draft_token_ids = prompt(6)  # wants 1 + 6 tokens, 2 more blocks
    b.draft_token_ids = prompt(6)
    out = s.schedule()
    assert out.num_tokens == [7, 1] and not out.all_decodes  # b's drafts: nothing left in the budget
    assert len(a.draft_token_ids) == 6 and b.draft_token_ids == [] and out.samples(0) and out.samples(1)
    s.step_done(out)
    a.num_computed -= 6  # as the engine does when every draft is rejected, proposing none this time
    a.draft_token_ids = []
    a.output_token_ids.append(1)
    b.output_token_ids.append(2)
    assert s.blocks.num_free == 0  # a holds 3 blocks (4 tokens computed), b 2 (6 computed)
    b.draft_token_ids = prompt(10)  # the budget leaves 7 tokens, b's blocks 2 slots: 1 draft
    out = s.schedule()
    assert out.num_tokens == [1, 2] and out.num_preempted == 0 and len(b.draft_token_ids) == 1
    assert out.block_copies == [] and s.running == [a, b]


def test_drafts_leave_a_block_for_each_sequence_whose_next_token_needs_one():
    """The older sequence's drafts would take the last free block, which the newer one's next token needs: they are
    cut instead, and nobody is preempted."""
    s = scheduler(num_blocks=4, block_size=4, budget=16)
    old, new = make_sequence(prompt(5), max_tokens=12), make_sequence(prompt(4), max_tokens=12)
    s.add(old)
    s.add(new)
    step(s)  # old: 5 computed in 2 blocks; new: 4 computed in 1 block, its next token needs the free one
    old.draft_token_ids = prompt(4)  # 2 fit in its blocks, the other 2 would need the free one
    out = s.schedule()
    assert out.num_preempted == 0 and out.seqs == [old, new] and out.num_tokens == [3, 1]
    assert len(old.draft_token_ids) == 2 and s.blocks.num_free == 0


def prioritized(tokens: list[int], priority: int, max_tokens: int = 8):
    seq = make_sequence(tokens, max_tokens=max_tokens)
    seq.request.priority = priority
    return seq


def test_the_priority_policy_admits_by_priority_then_arrival():
    s = scheduler(max_num_seqs=1, policy="priority")
    ranks = random.sample(range(-3, 7), 5) + [0, 0]
    seqs = [prioritized(prompt(3), rank, max_tokens=1) for rank in ranks]
    for seq in seqs:
        s.add(seq)
    admitted = []
    while s.has_work:  # one sequence at a time, done in its first step (max_tokens 1)
        admitted += step(s).seqs
    assert admitted == sorted(seqs, key=lambda seq: (seq.request.priority, seqs.index(seq)))
    assert_scheduler_empty(s)


def test_the_priority_policy_preempts_the_lowest_priority_not_the_newest():
    s = scheduler(num_blocks=6, block_size=4, budget=32, policy="priority")
    low, high = prioritized(prompt(8), 5, max_tokens=12), prioritized(prompt(8), 0, max_tokens=12)
    s.add(low)
    step(s)
    s.add(high)
    step(s)
    assert s.running == [low, high]  # the low-priority one is the older: first come first served would keep it
    for _ in range(40):
        out = step(s)
        if out.num_preempted:
            break
    assert out.num_preempted == 1 and low.status is SequenceStatus.WAITING and high in out.seqs
    run_to_end(s)


def test_random_workloads_drain_under_the_priority_policy():
    s = scheduler(num_blocks=12, block_size=4, max_num_seqs=6, budget=24, policy="priority")
    seqs = [prioritized(prompt(random.randint(1, 12)), random.randint(0, 3), random.randint(1, 30)) for _ in range(20)]
    for seq in seqs:
        s.add(seq)
    run_to_end(s, max_steps=5000)
    assert all(len(seq.output_token_ids) == seq.params.max_tokens for seq in seqs)


def test_random_workloads_with_adapters_never_run_more_than_max_loras():
    """Requests under four LoRA adapters and the base model, a pool small enough to preempt, both policies: no step,
    and no running set, ever holds more than ``max_loras`` adapters, and every request finishes."""
    from engine.lora import LoRARequest

    adapters = [None] + [LoRARequest(f"a{i}", i, f"/adapters/{i}") for i in range(1, 5)]
    for policy in ("fcfs", "priority"):
        max_loras = random.randint(1, 3)
        s = Scheduler(BlockManager(12, 4), 6, 24, policy, max_loras=max_loras)
        seqs = []
        for _ in range(25):
            seq = make_sequence(prompt(random.randint(1, 12)), max_tokens=random.randint(1, 30))
            seq.request.lora_request = random.choice(adapters)
            seq.request.priority = random.randint(0, 3) if policy == "priority" else 0
            seqs.append(seq)
            s.add(seq)
        used = set()
        for _ in range(5000):
            if not s.has_work:
                break
            out = step(s)
            in_step = {seq.request.lora_request for seq in out.seqs} - {None}
            running = {seq.request.lora_request for seq in s.running} - {None}
            assert len(in_step) <= max_loras and len(running) <= max_loras, (in_step, running)
            used |= in_step
        assert_scheduler_empty(s)
        assert all(len(seq.output_token_ids) == seq.params.max_tokens for seq in seqs)
        assert used == {seq.request.lora_request for seq in seqs} - {None}
