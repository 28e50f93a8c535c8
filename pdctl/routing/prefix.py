"""Where a prompt's prefix is likely cached: the router remembers which prompt-prefix blocks it sent to
each instance, evicting LRU or LFU (the profile's kv_cache_eviction_policy: here pdctl owns eviction).

Blocks are runs of characters hashed in a chain, so a block's hash stands for the whole prefix up to it, as
vLLM's block hashes do for tokens. Blocks grow with their position: 16 blocks of 128 characters, then 8 blocks
per doubling of the prefix (2048-4096 in blocks of 256, 4096-8192 in blocks of 512, ...), up to 128K characters
in 64 blocks. A match is then known to within 1/8 of its length past 2K characters, which is all a routing
choice needs, and an 18K-character prompt costs 41 hashes instead of 145: hashing was most of the routing
decision's time for long prompts.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal


def block_ends(fine: int, fine_blocks: int = 16, per_doubling: int = 8, limit_blocks: int = 64) -> tuple[int, ...]:
    """Where each prefix block ends, in units of `fine` (characters for the router, tokens for simulate)."""
    ends = [fine * (index + 1) for index in range(fine_blocks)]
    while len(ends) < limit_blocks:
        step = ends[-1] // per_doubling
        ends += [ends[-1] + step * (index + 1) for index in range(per_doubling)]
    return tuple(ends)


CHAR_BLOCK_ENDS = block_ends(128)


def block_hashes(text: str) -> list[int]:
    """Chained hashes of the full blocks of `text` (a partial last block is never cached by vLLM either)."""
    hashes: list[int] = []
    previous = start = 0
    length = len(text)
    for end in CHAR_BLOCK_ENDS:
        if end > length:
            break
        previous = hash((previous, text[start:end]))
        hashes.append(previous)
        start = end
    return hashes


def covered(matched_blocks: int, ends: tuple[int, ...], length: int) -> float:
    """The share of a prompt of `length` units that its first `matched_blocks` blocks hold."""
    return ends[matched_blocks - 1] / length if matched_blocks and length else 0.0


class PrefixTable:
    """One instance's remembered prefix blocks, bounded."""

    def __init__(self, capacity_blocks: int = 65536, eviction: Literal["lru", "lfu"] = "lru"):
        self.capacity = capacity_blocks
        self.eviction = eviction
        self._blocks: OrderedDict[int, int] = OrderedDict()  # hash -> use count

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: list[int]) -> int:
        """How many leading blocks of the prompt this instance likely holds."""
        blocks = self._blocks
        if not hashes or hashes[0] not in blocks:
            return 0
        if hashes[-1] in blocks:
            return len(hashes)
        # The blocks held of one prompt are always a prefix of it: a chained hash is recorded only with every
        # block before it, and eviction takes a prefix from its tail (record() makes the head the most recent
        # and the most used). So a binary search finds the end: O(log n) lookups, not one per block.
        held, missing = 0, len(hashes) - 1  # hashes[held] is held, hashes[missing] is not
        while missing - held > 1:
            middle = (held + missing) // 2
            if hashes[middle] in blocks:
                held = middle
            else:
                missing = middle
        return held + 1

    def record(self, hashes: list[int]) -> None:
        blocks = self._blocks
        # Last block first: the prompt's head ends most recently used, so LRU evicts a prefix from its tail, as
        # vLLM frees blocks; evicting the head first would orphan every block after it.
        for block in reversed(hashes):
            blocks[block] = blocks.get(block, 0) + 1
            blocks.move_to_end(block)
        if len(blocks) > self.capacity:
            self._evict()

    def _evict(self) -> None:
        # Evict in batches down to 90 %: amortised O(1) per insert for LFU, whose victim needs a sort.
        target = int(self.capacity * 0.9)
        excess = len(self._blocks) - target
        if self.eviction == "lru":
            for _ in range(excess):
                self._blocks.popitem(last=False)
            return
        victims = sorted(self._blocks.items(), key=lambda item: item[1])[:excess]
        for block, _count in victims:
            del self._blocks[block]
