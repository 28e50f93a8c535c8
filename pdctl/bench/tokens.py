"""Prompts made of real tokens of the served model, from its own directory (nothing is downloaded).

The builtin model's tokenizer takes one token per byte, and so does the sim engine's counting: prompts for
both are printable ASCII, one token a character. A model directory with `tokenizer.json` is read with the
`tokenizers` package (`pip install 'pdctl[tokenizer]'`); random ids are decoded and re-encoded, as vllm bench
serve's random dataset does, so the text is what the model's tokenizer would produce.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Protocol

from pdctl.engines import tinymodel
from pdctl.errors import UsageError

_PRINTABLE = bytes(range(32, 127))
_RETOKENIZE_ROUNDS = 4


class PromptTokenizer(Protocol):
    description: str

    def text(self, rng: random.Random, count: int) -> str:
        """Text of `count` random tokens (as near as the tokenizer allows)."""
        ...

    def count(self, text: str) -> int: ...


class ByteTokenizer:
    def __init__(self, description: str = "byte-level (one token per byte)"):
        self.description = description

    def text(self, rng: random.Random, count: int) -> str:
        return bytes(rng.choices(_PRINTABLE, k=count)).decode("ascii")

    def count(self, text: str) -> int:
        return len(text.encode())


class HuggingFaceTokenizer:
    def __init__(self, path: Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UsageError(
                f"{path} needs the tokenizers package to make prompts: pip install 'pdctl[tokenizer]'"
            ) from None
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # any file this version of tokenizers cannot read
            raise UsageError(f"cannot read the tokenizer {path}: {error}") from None
        special = {t.content for t in self._tokenizer.get_added_tokens_decoder().values() if t.special}
        self._ids = sorted(i for token, i in self._tokenizer.get_vocab().items() if token not in special)
        self.description = f"{path}"

    def text(self, rng: random.Random, count: int) -> str:
        ids = rng.choices(self._ids, k=count)
        text = self._tokenizer.decode(ids)
        # Decoding then encoding can merge or split tokens: trim or pad until the count holds.
        for _ in range(_RETOKENIZE_ROUNDS):
            encoded = self._tokenizer.encode(text, add_special_tokens=False).ids
            if len(encoded) == count:
                break
            ids = encoded[:count] if len(encoded) > count else encoded + rng.choices(self._ids, k=count - len(encoded))
            text = self._tokenizer.decode(ids)
        return text

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)


def tokenizer_for(model_dir: str | Path | None) -> PromptTokenizer:
    """The served model's tokenizer from its directory; byte-level where no directory is known (sim models)."""
    if model_dir is None:
        return ByteTokenizer("byte-level: no model directory given (input counts are the server's)")
    directory = Path(model_dir).expanduser()
    if (directory / tinymodel.MARKER).is_file():
        return ByteTokenizer()
    if (directory / "tokenizer.json").is_file():
        return HuggingFaceTokenizer(directory / "tokenizer.json")
    if directory.is_dir():
        raise UsageError(f"{directory} has no tokenizer.json: pass --tokenizer DIR with the model's tokenizer")
    return ByteTokenizer(f"byte-level: no model directory at {model_dir} (input counts are the server's)")
