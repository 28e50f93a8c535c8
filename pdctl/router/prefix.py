"""Where a prompt's prefix is likely cached: the router remembers which prompt-prefix blocks it sent to
each instance, evicting LRU or LFU (the profile's kv_cache_eviction_policy: here pdctl owns eviction).

Blocks are fixed runs of characters hashed in a chain, so a block's hash stands for the whole prefix up to
it, as vLLM's block hashes do for tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import takewhile
from typing import Literal

BLOCK_CHARS = 128
# Past 32K characters a longer shared prefix changes no routing choice; hashing it would only cost time.
MAX_BLOCKS = 256


def block_hashes(text: str, block_chars: int = BLOCK_CHARS, max_blocks: int = MAX_BLOCKS) -> list[int]:
    """Chained hashes of the full blocks of `text` (a partial last block is never cached by vLLM either)."""
    hashes: list[int] = []
    previous = 0
    for start in range(0, min(len(text) - block_chars + 1, block_chars * max_blocks), block_chars):
        previous = hash((previous, text[start : start + block_chars]))
        hashes.append(previous)
    return hashes


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
        # takewhile walks the blocks in C: the walk is as long as the match, up to 256 blocks per instance.
        return len(list(takewhile(self._blocks.__contains__, hashes)))

    def record(self, hashes: list[int]) -> None:
        blocks = self._blocks
        for block in hashes:
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
