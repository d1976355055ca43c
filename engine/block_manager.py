"""``BlockManager``: hands out the paged KV pool's blocks, with reference counts and prefix caching.

* **Lazy allocation**: a sequence gets a block when its next tokens need one, not its worst case up front.
* **Reference counts**: a block is shared by every sequence whose table holds it (the ``n`` samples of a prompt,
  requests with a common prefix). A shared block is never written: a sequence about to write into a shared,
  partly filled block gets a private copy first (copy-on-write), reported as ``(src, dst)`` for the runner.
* **Prefix caching** (vLLM's design, ``docs/design/prefix_caching.md``): a full block is registered under a chained
  hash of (the previous block's hash, its token ids) in the step that computes its K/V. A new request reuses the longest
  run of registered blocks matching its tokens, a hit confirmed on the stored tokens and parent hash, never the
  block holding its last token (whose logits are needed). Blocks no sequence uses stay registered, and hittable,
  in the free queue until the allocator takes them: blocks without a hash first, then cached blocks least
  recently freed first. A sequence frees its blocks last to first, so the tail of a prompt goes before its head.
  A block taken for new contents loses its old hash. With a draft model (``engine.draft_model``), a block also
  says whether the draft's cache holds its K/V, so that a hit serves the draft the blocks it filled.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from engine.kv_cache import cdiv
from engine.sequence import Sequence


def block_hash(parent: int | None, token_ids: Seq[int]) -> int:
    """The chained hash of a full block: it names the whole prefix up to and including this block."""
    return hash((parent, tuple(token_ids)))


@dataclass(eq=False, slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full, computed and registered
    parent_hash: int | None = None  # the previous block's hash (None for a sequence's first block)
    token_ids: tuple[int, ...] = ()  # the tokens behind ``hash``, to confirm a hit
    draft_filled: bool = False  # a draft model's cache holds its K/V too (engine.draft_model)

    def matches(self, parent: int | None, token_ids: Seq[int]) -> bool:
        return self.parent_hash == parent and self.token_ids == tuple(token_ids)


class BlockManager:
    """The blocks of the KV pool and the sequences' tables over them."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, in the order the allocator takes them (first = next).
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> id of the block registered under it

    # ------------------------------------------------------------------ accounting
    @property
    def num_free(self) -> int:
        """Blocks no sequence uses (cached ones included: they are taken when needed)."""
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of the pool in use by sequences, 0 to 1."""
        return 1.0 - len(self.free_queue) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def slots(self, seqs: list[Sequence], positions: list[int]) -> list[int]:
        """``slot(seqs[i], positions[i])`` for each ``i``, in one loop (a decode step asks for one per sequence)."""
        bs = self.block_size
        return [seq.block_table[p // bs] * bs + p % bs for seq, p in zip(seqs, positions)]

    # ------------------------------------------------------------------ prefix cache
    def match_prefix(self, token_ids: Seq[int], root: int | None = None) -> tuple[list[int], list[int]]:
        """The registered blocks holding the longest prefix of ``token_ids`` in whole blocks, never its last token:
        ``(block ids, their hashes)``, the first block's chained to ``root`` (a request's ``cache_root``: what
        besides the tokens its K/V depend on). Changes nothing."""
        if not self.enable_prefix_caching:
            return [], []
        ids, hashes, parent = [], [], root
        bs = self.block_size
        for i in range((len(token_ids) - 1) // bs):
            tokens = token_ids[i * bs : (i + 1) * bs]
            h = block_hash(parent, tokens)
            block_id = self.cached.get(h)
            if block_id is None or not self.blocks[block_id].matches(parent, tokens):
                break
            ids.append(block_id)
            hashes.append(h)
            parent = h
        return ids, hashes

    def register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Register the blocks that the first ``num_tokens`` tokens of ``seq`` fill, once this step has run.

        Called when a step is scheduled, so a request admitted later in the same step can hit them: every layer
        stores the step's K/V before its attention reads the cache. A block whose contents are already registered
        elsewhere stays unregistered (the first one keeps serving hits). Should the step not run for ``seq``
        (preempted while scheduling), :meth:`free` unregisters what was never computed.
        """
        bs = self.block_size
        num_tokens = min(num_tokens, seq.num_tokens)  # a speculating sequence's drafts are not its tokens yet
        if num_tokens // bs <= len(seq.block_hashes):  # no block newly filled (most decode steps)
            return
        first = len(seq.block_hashes)
        tokens = seq.token_range(first * bs, num_tokens // bs * bs)
        for i in range(first, num_tokens // bs):
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.request.cache_root
            chunk = tokens[(i - first) * bs : (i - first + 1) * bs]
            h = block_hash(parent, chunk)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if self.enable_prefix_caching and block.hash is None and h not in self.cached:
                self._register(block, h, parent, chunk)
                block.draft_filled = seq.draft_computed >= (i + 1) * bs

    def mark_draft_filled(self, seq: Sequence, start: int, stop: int) -> None:
        """A draft model's cache now holds the K/V of ``seq``'s tokens ``start`` to ``stop`` (and those before): the
        full blocks among them serve its draft too when the prefix cache hits them.

        A block left unregistered because another held its tokens first (a prompt's last full block, computed again
        by a request that hit the rest) takes the registration over when that other block lacks the draft's K/V."""
        bs = self.block_size
        for i in range(start // bs, stop // bs):
            block = self.blocks[seq.block_table[i]]
            block.draft_filled = True
            if self.enable_prefix_caching and block.hash is None and i < len(seq.block_hashes):
                self._take_over(block, seq, i)

    def _take_over(self, block: Block, seq: Sequence, i: int) -> None:
        """Register ``block``, ``seq``'s full block ``i``, in place of the block registered under its hash, if that
        one does not serve the draft (or is gone)."""
        h = seq.block_hashes[i]
        holder = self.cached.get(h)
        if holder is not None:
            if self.blocks[holder].draft_filled:
                return
            self._unregister(self.blocks[holder])
            if self.blocks[holder].ref_count == 0:  # worthless to keep now: reuse before any cached block
                self.free_queue.move_to_end(holder, last=False)
        parent = seq.block_hashes[i - 1] if i else seq.request.cache_root
        self._register(block, h, parent, seq.token_range(i * self.block_size, (i + 1) * self.block_size))

    def _register(self, block: Block, h: int, parent: int | None, token_ids: Seq[int]) -> None:
        block.hash, block.parent_hash, block.token_ids = h, parent, tuple(token_ids)
        self.cached[h] = block.block_id

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (vLLM's ``reset_prefix_cache``), so the next requests compute their prompts
        afresh: for measuring a cold cache. Refused (False, nothing changed) while any sequence holds blocks."""
        if self.num_free < self.num_blocks:
            return False
        for block in self.blocks:
            self._unregister(block)
        return True

    def _unregister(self, block: Block) -> None:
        if block.hash is not None:
            if self.cached.get(block.hash) == block.block_id:
                del self.cached[block.hash]
            block.hash, block.parent_hash, block.token_ids = None, None, ()

    # ------------------------------------------------------------------ allocation
    def _take(self, block_id: int) -> None:
        """A block gains a user (a hit on a free cached block takes it out of the free queue)."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _allocate(self) -> int:
        """A free block for new contents: its old hash, if any, is dropped."""
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        self._unregister(block)
        block.ref_count = 1
        return block_id

    def can_admit(self, hits: list[int], num_tokens: int) -> bool:
        """Whether a new sequence reusing the cached blocks ``hits`` can get blocks for its first ``num_tokens``."""
        hits_free = sum(self.blocks[b].ref_count == 0 for b in hits)
        return self.blocks_needed(num_tokens) - len(hits) <= self.num_free - hits_free

    def admit(self, seq: Sequence, hits: list[int], hashes: list[int], num_tokens: int) -> None:
        """Give a sequence without blocks the cached blocks ``hits`` and fresh ones up to ``num_tokens`` tokens."""
        assert not seq.block_table, "admit() is for a sequence holding no blocks"
        for block_id in hits:
            self._take(block_id)
        seq.block_table = list(hits)
        seq.block_hashes = list(hashes)
        seq.num_computed = len(hits) * self.block_size
        drafted = [self.blocks[b].draft_filled for b in hits] + [False]
        seq.draft_computed = drafted.index(False) * self.block_size  # the hits a draft model's cache holds too
        self.append(seq, num_tokens)

    def _needs_copy(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether writing tokens ``num_computed ..`` would write into a shared, partly filled block."""
        i = seq.num_computed // self.block_size
        return (
            num_tokens > seq.num_computed and i < len(seq.block_table) and self.blocks[seq.block_table[i]].ref_count > 1
        )

    def holds(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether ``seq``'s blocks already hold ``num_tokens`` tokens and the next one written is in a block of its
        own (nothing to allocate or copy): ``append`` would do nothing."""
        if num_tokens > len(seq.block_table) * self.block_size:
            return False
        i = seq.num_computed // self.block_size
        return i >= len(seq.block_table) or self.blocks[seq.block_table[i]].ref_count == 1

    def lacking_next_slot(self, seqs: list[Sequence]) -> list[Sequence]:
        """Those of ``seqs`` for which ``holds(seq, seq.num_computed + 1)`` is false, in one loop (a decode step asks
        it of every running sequence): their next token needs one block, a new one or a copy of a shared one."""
        bs, blocks = self.block_size, self.blocks
        lacking = []
        for seq in seqs:
            table, position = seq.block_table, seq.num_computed
            if position >= len(table) * bs or blocks[table[position // bs]].ref_count != 1:
                lacking.append(seq)
        return lacking

    def can_append(self, seq: Sequence, num_tokens: int, keep_free: int = 0) -> bool:
        """Whether ``seq`` can hold ``num_tokens`` tokens in all (copy-on-write included), leaving ``keep_free``
        blocks free."""
        missing = self.blocks_needed(num_tokens) - len(seq.block_table)
        return max(missing, 0) + self._needs_copy(seq, num_tokens) + keep_free <= self.num_free

    def append(self, seq: Sequence, num_tokens: int) -> list[tuple[int, int]]:
        """Grow ``seq`` to hold ``num_tokens`` tokens; returns the block copies ``(src, dst)`` to run first."""
        if not self.can_append(seq, num_tokens):
            raise RuntimeError(f"KV cache exhausted: sequence {seq.seq_id} cannot grow to {num_tokens} tokens")
        copies = []
        if self._needs_copy(seq, num_tokens):
            i = seq.num_computed // self.block_size
            src = seq.block_table[i]
            self.blocks[src].ref_count -= 1  # still > 0: another sequence holds it
            seq.block_table[i] = self._allocate()
            copies.append((src, seq.block_table[i]))
        while len(seq.block_table) < self.blocks_needed(num_tokens):
            seq.block_table.append(self._allocate())
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """``child`` shares every block of ``parent`` (the partly filled last one is copied when written)."""
        assert not child.block_table, "fork() into a sequence holding no blocks"
        for block_id in parent.block_table:
            self._take(block_id)
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_computed = parent.num_computed
        # a draft model's K/V of the partly filled last block are not copied with it: both recompute them
        parent.draft_computed = child.draft_computed = min(
            parent.draft_computed, parent.num_computed // self.block_size * self.block_size
        )

    def free(self, seq: Sequence) -> None:
        """Give back ``seq``'s blocks, last first; blocks nobody else holds join the free queue.

        Blocks registered for a step that did not run for ``seq`` (past ``num_computed``) lose their hash: their K/V
        were never written.
        """
        computed = seq.num_computed // self.block_size
        for i in reversed(range(len(seq.block_table))):
            block = self.blocks[seq.block_table[i]]
            if i >= computed:
                self._unregister(block)
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block.block_id] = None
                if block.hash is None:  # worthless to keep: reuse before any cached block
                    self.free_queue.move_to_end(block.block_id, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed = seq.draft_computed = 0
