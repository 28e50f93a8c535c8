"""A paged KV cache with prefix caching, as vLLM v1's block pool keeps it.

Blocks a running request holds are either its own or shared cached blocks (a full prompt block is cached
under the hash of the prefix it ends). A cached block no request uses stays cached but evictable; new blocks
come from never-cached free blocks first, then by evicting cached ones: least recently freed (LRU, vLLM's
order) or least often hit (LFU, where the profile asks for it)."""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

Eviction = Literal["lru", "lfu"]


@dataclass(slots=True)
class _Cached:
    refs: int = 0
    hits: int = 0


@dataclass(slots=True)
class Holding:
    """What one request holds: its own blocks and the cached blocks it shares (by hash, in prompt order)."""

    own: int = 0
    shared: list[int] = field(default_factory=list)
    blocks: int = 0  # own + len(shared), kept by the pool: read on every step of every request


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int = 16, eviction: Eviction = "lru", caching: bool = True):
        self.num_blocks, self.block_size, self.eviction, self.caching = num_blocks, block_size, eviction, caching
        self._plain_free = num_blocks
        self._cached: dict[int, _Cached] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._lfu: list[tuple[int, int, int]] = []  # (hits, order, hash), stale entries skipped
        self._order = itertools.count()
        self.queries = 0
        self.hits = 0

    @property
    def free_blocks(self) -> int:
        return self._plain_free + len(self._evictable)

    @property
    def usage(self) -> float:
        """vLLM's kv_cache_usage_perc: blocks held by requests (evictable cached blocks count as free)."""
        return 1.0 - self.free_blocks / self.num_blocks if self.num_blocks else 0.0

    def match(self, holding: Holding, hashes: list[int], prompt_tokens: int) -> int:
        """Share the leading cached blocks of a prompt; returns the tokens they cover. vLLM always computes a
        prompt's last token, so a hit stops short of it."""
        if not self.caching:
            return 0
        limit = min(len(hashes), (prompt_tokens - 1) // self.block_size)
        matched = 0
        for block_hash in hashes[:limit]:
            entry = self._cached.get(block_hash)
            if entry is None:
                break
            if entry.refs == 0:
                del self._evictable[block_hash]
            entry.refs += 1
            entry.hits += 1
            holding.shared.append(block_hash)
            holding.blocks += 1
            matched += 1
        self.queries += prompt_tokens
        self.hits += matched * self.block_size
        return matched * self.block_size

    def grow(self, holding: Holding, tokens: int) -> bool:
        """Make the holding cover `tokens` tokens; False (and nothing taken) when the pool cannot."""
        needed = -(-tokens // self.block_size) - holding.blocks
        if needed <= 0:
            return True
        if needed > self.free_blocks:
            return False
        plain = min(needed, self._plain_free)
        self._plain_free -= plain
        for _ in range(needed - plain):
            self._evict_one()
        holding.own += needed
        holding.blocks += needed
        return True

    def cache_prompt(self, holding: Holding, hashes: list[int]) -> None:
        """After a prompt is computed: its own full blocks become cached blocks others can share."""
        if not self.caching:
            return
        for block_hash in hashes[len(holding.shared) : len(holding.shared) + holding.own]:
            if block_hash in self._cached:
                break  # computed twice at once: this request keeps its own copy
            self._cached[block_hash] = _Cached(refs=1)
            holding.shared.append(block_hash)
            holding.own -= 1

    def free(self, holding: Holding) -> None:
        self._plain_free += holding.own
        # The tail of a prompt is the least likely to be shared: freed first, evicted first (vLLM's order).
        for block_hash in reversed(holding.shared):
            entry = self._cached[block_hash]
            entry.refs -= 1
            if entry.refs == 0:
                self._evictable[block_hash] = None
                if self.eviction == "lfu":
                    heapq.heappush(self._lfu, (entry.hits, next(self._order), block_hash))
        holding.own, holding.shared, holding.blocks = 0, [], 0

    def _evict_one(self) -> None:
        if self.eviction == "lru":
            victim, _ = self._evictable.popitem(last=False)
        else:
            while True:
                hits, _, victim = heapq.heappop(self._lfu)
                entry = self._cached.get(victim)
                if victim in self._evictable and entry is not None and entry.hits == hits:
                    break
            del self._evictable[victim]
        del self._cached[victim]
