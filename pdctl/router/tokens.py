"""Counting a prompt's tokens for the routing decision.

For pdctl's builtin model, counts are exact: its tokenizer takes one token per UTF-8 byte. With the
`tokenizers` package installed (`pip install 'pdctl[tokenizer]'`) and a model directory holding
`tokenizer.json`, counts are exact too. Otherwise they are estimated from UTF-8 bytes: 4 bytes a token to
start with, then the ratio the engines report (usage.prompt_tokens against the bytes sent), averaged over
the requests seen, so the estimate converges on the served model's own tokenizer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from pdctl.engines import tinymodel

log = logging.getLogger("pdctl.router.tokens")

INITIAL_BYTES_PER_TOKEN = 4.0
_SMOOTHING = 0.1


def utf8_length(text: str) -> int:
    """The UTF-8 length of text without encoding it when it is ASCII (isascii is O(1) for str): encoding a
    long prompt only to measure it was a copy of the whole prompt on the routing decision's hot path."""
    return len(text) if text.isascii() else len(text.encode())


class TokenCounter:
    def __init__(self, exact_count: Callable[[str], int] | None = None):
        self._exact_count = exact_count
        self.bytes_per_token = INITIAL_BYTES_PER_TOKEN

    @property
    def exact(self) -> bool:
        return self._exact_count is not None

    @classmethod
    def for_model(cls, model_path: str) -> TokenCounter:
        directory = Path(model_path)
        if (directory / tinymodel.MARKER).is_file():
            return cls(utf8_length)
        path = directory / "tokenizer.json"
        if not path.is_file():
            return cls()
        try:
            from tokenizers import Tokenizer
        except ImportError:
            log.info("the tokenizers package is not installed: token counts are estimated")
            return cls()
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # a tokenizer file this version cannot read: estimate instead
            log.warning("cannot load %s (%s): token counts are estimated", path, error)
            return cls()
        return cls(lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids))

    def count(self, text: str) -> int:
        if self._exact_count is not None:
            return self._exact_count(text)
        return round(utf8_length(text) / self.bytes_per_token)

    def observe(self, text_bytes: int, prompt_tokens: int) -> None:
        """Learn the bytes-per-token ratio from what an engine counted for a prompt."""
        if self._exact_count is None and text_bytes > 0 and prompt_tokens > 0:
            ratio = text_bytes / prompt_tokens
            self.bytes_per_token += _SMOOTHING * (ratio - self.bytes_per_token)
