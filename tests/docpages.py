"""README.md and the pages under docs/, read line by line with the code fence each line sits in."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tests.conftest import ROOT


def pages() -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def lines(text: str) -> Iterator[tuple[int, str, str | None]]:
    """(number, line, language) for each line that is no fence itself: language is the enclosing fence's
    (`text` where the fence names none), None outside fences."""
    language = None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            language = None if language is not None else line[3:].strip() or "text"
            continue
        yield number, line, language
