"""Counting a prompt's tokens for the routing decision.

With the `tokenizers` package installed (`pip install 'pdctl[tokenizer]'`) and a model directory holding
`tokenizer.json`, counts are exact. Otherwise they are estimated from UTF-8 bytes: 4 bytes a token to
start with, then the ratio the engines report (usage.prompt_tokens against the bytes sent), averaged over
the requests seen, so the estimate converges on the served model's own tokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("pdctl.router.tokens")

INITIAL_BYTES_PER_TOKEN = 4.0
_SMOOTHING = 0.1


class TokenCounter:
    def __init__(self, tokenizer: Any | None = None):
        self._tokenizer = tokenizer
        self.bytes_per_token = INITIAL_BYTES_PER_TOKEN

    @property
    def exact(self) -> bool:
        return self._tokenizer is not None

    @classmethod
    def for_model(cls, model_path: str) -> TokenCounter:
        path = Path(model_path) / "tokenizer.json"
        if not path.is_file():
            return cls()
        try:
            from tokenizers import Tokenizer
        except ImportError:
            log.info("the tokenizers package is not installed: token counts are estimated")
            return cls()
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as error:  # a tokenizer file this version cannot read: estimate instead
            log.warning("cannot load %s (%s): token counts are estimated", path, error)
            return cls()

    def count(self, text: str) -> int:
        if self._tokenizer is not None:
            return len(self._tokenizer.encode(text, add_special_tokens=False).ids)
        return round(len(text.encode()) / self.bytes_per_token)

    def observe(self, text_bytes: int, prompt_tokens: int) -> None:
        """Learn the bytes-per-token ratio from what an engine counted for a prompt."""
        if self._tokenizer is None and text_bytes > 0 and prompt_tokens > 0:
            ratio = text_bytes / prompt_tokens
            self.bytes_per_token += _SMOOTHING * (ratio - self.bytes_per_token)
