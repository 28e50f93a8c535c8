"""vLLM's automatic prefix caching in miniature."""

from __future__ import annotations

from collections import OrderedDict


class PrefixCache:
    """Blocks keyed by their chained hashes, least recently used evicted first."""

    def __init__(self, capacity_blocks: int):
        self.capacity = capacity_blocks
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def match(self, hashes: list[bytes]) -> int:
        """How many leading blocks are cached; those become the most recently used."""
        hits = 0
        for block in hashes:
            if block not in self._blocks:
                break
            self._blocks.move_to_end(block)
            hits += 1
        return hits

    def insert(self, hashes: list[bytes]) -> None:
        for block in hashes:
            self._blocks[block] = None
            self._blocks.move_to_end(block)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)
