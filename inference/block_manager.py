"""The paged KV cache's bookkeeping: fixed-size blocks, a free list with reference counts, and prefix caching.

A block holds the KV of `block_size` consecutive tokens of one sequence; a sequence's block table lists its blocks
in order. Once a block is full of computed tokens it gets a hash chained over everything before it
(hash(parent hash, its token ids)), so two sequences with the same prefix resolve to the same blocks and share
them by reference count. A freed block keeps its hash and stays findable until the free list hands it out again;
the free list is least-recently-freed first, and a sequence frees its tail first, so shared prefixes live longest.

`fork` starts a child sequence (a Dynasor probe) from a running parent without recomputing the parent's context:
the child holds the parent's full blocks by reference (they never change again: a sequence writes only past its
computed tokens) and gets its own copy of the partly filled last block, which the parent keeps writing into.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from glassbox.errors import GlassboxError
from glassbox.inference.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None


def chain_hash(parent: bytes | None, token_ids: list[int]) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"")
    h.update(b",".join(str(t).encode() for t in token_ids))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion-ordered set of blocks with ref_count 0: popitem(last=False) gives the least recently freed.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}
        # Per sequence: the chained hashes of its full blocks, in order (a prefix of its block table), and how many
        # of its leading blocks are known to be published (held blocks keep their hashes: `commit` skips them).
        self.seq_hashes: dict[int, list[bytes]] = {}
        self.seq_committed: dict[int, int] = {}
        self.prefix_hits = 0
        self.prefix_queries = 0
        # Forks: children started, parent blocks they shared by reference, tokens of KV they copied.
        self.num_forks = 0
        self.fork_shared_blocks = 0
        self.fork_copied_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes_for(self, seq: Sequence, num_tokens: int) -> list[bytes]:
        """Chained hashes of the full blocks within the first `num_tokens` tokens, extending the memo."""
        hashes = self.seq_hashes.setdefault(seq.seq_id, [])
        bs = self.block_size
        while (len(hashes) + 1) * bs <= num_tokens:
            i = len(hashes)
            hashes.append(chain_hash(hashes[-1] if hashes else None, seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks that hold a prefix of `seq`'s tokens, leaving at least the last token to compute."""
        if not self.enable_prefix_caching:
            return []
        # The last token is always recomputed: its logits are needed to sample the next one.
        hashes = self._hashes_for(seq, seq.num_tokens - 1)
        hit: list[int] = []
        for h in hashes:
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hit.append(block_id)
        self.prefix_queries += seq.num_tokens
        self.prefix_hits += len(hit) * self.block_size
        return hit

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> bool:
        reused_free = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        need = self.blocks_needed(seq.num_computed_tokens + len(cached) * self.block_size + num_new_tokens)
        need -= len(seq.block_table) + len(cached)
        return max(need, 0) + reused_free <= len(self.free)

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: list[int] = ()) -> bool:
        """Take cached prefix blocks (when given) and enough fresh blocks for `num_new_tokens` more tokens.

        Returns False, changing nothing, when the free list is too short.
        """
        if not self.can_allocate(seq, num_new_tokens, cached):
            return False
        for block_id in cached:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
        if cached:
            seq.cached(len(cached) * self.block_size)
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(need):
            seq.block_table.append(self._take_free())
        return True

    def _take_free(self) -> int:
        """The least recently freed block, its stale prefix-cache entry dropped, held once."""
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def fork(self, parent: Sequence, child: Sequence) -> list[tuple[int, int]] | None:
        """Give `child` (a fresh sequence whose tokens start with all of `parent`'s computed ones) the parent's KV:
        its full blocks by reference and a fresh block for the partly filled last one. Returns the (source,
        destination) cache slots whose KV the caller must copy into that block, or None, changing nothing, when no
        block is free for it. The child then counts the parent's computed tokens as its own (cached, not computed)."""
        if child.block_table or child.num_computed_tokens:
            raise GlassboxError(f"fork: sequence {child.request_id} already has KV")
        computed = parent.num_computed_tokens
        if child.token_ids[:computed] != parent.token_ids[:computed]:
            raise GlassboxError(f"fork: sequence {child.request_id} does not start with its parent's "
                                f"{computed} computed tokens")
        full, tail = divmod(computed, self.block_size)
        if tail and not self.free:
            return None
        for block_id in parent.block_table[:full]:
            self.blocks[block_id].ref_count += 1
            child.block_table.append(block_id)
        pairs: list[tuple[int, int]] = []
        if tail:
            child.block_table.append(self._take_free())
            pairs = [(self.slot(parent, pos), self.slot(child, pos)) for pos in range(full * self.block_size, computed)]
        parent_hashes = self.seq_hashes.get(parent.seq_id, [])
        self.seq_hashes[child.seq_id] = list(parent_hashes[:full])
        if computed:
            child.cached(computed)
        self.num_forks += 1
        self.fork_shared_blocks += full
        self.fork_copied_tokens += tail
        return pairs

    def commit(self, seq: Sequence) -> None:
        """Publish the hashes of blocks that became full of computed tokens, so later prompts can share them."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        done = self.seq_committed.get(seq.seq_id, 0)
        if full <= done:            # most decode steps: no block filled since the last commit
            return
        hashes = self._hashes_for(seq, seq.num_computed_tokens)
        for i in range(done, full):
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None and hashes[i] not in self.cached:
                block.block_hash = hashes[i]
                self.cached[hashes[i]] = block.block_id
            if block.block_hash is not None and done == i:
                # Published (by this sequence or the one it shares the block with): a held block keeps its hash,
                # so later commits start after it. One left unpublished (its twin was cached first) is looked at
                # again, as it may be published once the twin is evicted.
                done = i + 1
        self.seq_committed[seq.seq_id] = done

    def trim(self, seq: Sequence) -> None:
        """Free blocks past what the sequence's tokens need (left by rejected draft nodes)."""
        keep = self.blocks_needed(seq.num_tokens)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def free_seq(self, seq: Sequence) -> None:
        """Release every block of `seq`, tail first, and reset its computed count (preemption or finish)."""
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.forget_kv()
        self.seq_hashes.pop(seq.seq_id, None)
        self.seq_committed.pop(seq.seq_id, None)

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} freed twice"
        if block.ref_count == 0:
            self.free[block_id] = None

    def slot(self, seq: Sequence, position: int) -> int:
        """Where the KV of `seq`'s token at `position` lives in the flat cache (block id x block size + offset)."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
