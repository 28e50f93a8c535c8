"""Tokens are prompt bytes, as with the builtin model's byte-level tokenizer; output tokens are words drawn
from a hash of the prompt."""

from __future__ import annotations

import hashlib
import random

BLOCK_SIZE = 16
WORDS = (
    "the", "a", "of", "and", "to", "in", "is", "it", "on", "for", "as", "at", "by", "we", "an", "or",
    "sky", "sea", "sun", "tree", "road", "city", "song", "rain", "fire", "stone", "light", "wind",
    "blue", "green", "quiet", "bright",
)  # fmt: skip


def block_hashes(tokens: bytes) -> list[bytes]:
    """One hash per full block, each chained over the prompt so far, as vLLM keys its prefix cache."""
    hashes: list[bytes] = []
    parent = b""
    for start in range(0, len(tokens) - BLOCK_SIZE + 1, BLOCK_SIZE):
        parent = hashlib.blake2b(parent + tokens[start : start + BLOCK_SIZE], digest_size=16).digest()
        hashes.append(parent)
    return hashes


def blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_SIZE)


def prompt_digest(tokens: bytes) -> str:
    return hashlib.blake2b(tokens, digest_size=16).hexdigest()


def output_words(tokens: bytes, count: int) -> list[str]:
    """The same prompt gives the same words on every instance, so a split request matches a whole one."""
    rng = random.Random(int.from_bytes(hashlib.blake2b(tokens, digest_size=8).digest()))
    return [" " + rng.choice(WORDS) for _ in range(count)]
