"""Text from outside pdctl (engines' answers and logs, servers' headers and errors, GPU process names, node
names, URLs and other user input) made safe to print: the terminal must show it, never obey it.

Escaped as Python writes them (`\\x1b`, `\\u202e`, `\\ufffd`): control characters (an ANSI escape sequence
starts with one), Unicode format characters that reorder or hide text (bidi overrides, zero-width spaces),
unassigned and private-use code points, lone surrogates (bytes read with surrogateescape), line and paragraph
separators, and U+FFFD, which a decoder leaves where the bytes were not UTF-8 (a random-weights model answers
with such bytes). Every printer of outside text goes through here."""

from __future__ import annotations

import unicodedata
from functools import lru_cache

from rich.text import Text

_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
# Zero-width joiner and non-joiner: format characters that emoji sequences and several scripts need to render.
_JOINERS = frozenset({"\u200c", "\u200d"})
_LINE_BREAKS = frozenset({"\n", "\t"})


@lru_cache(maxsize=4096)
def _shown(char: str) -> str:
    if char == "\ufffd" or (unicodedata.category(char) in _HIDDEN and char not in _JOINERS):
        return char.encode("unicode_escape").decode("ascii")
    return char


def printable(text: str, multiline: bool = False) -> str:
    """`text` with every character a terminal would not simply show escaped; newlines and tabs are kept when
    the text is `multiline` (an answer, a log excerpt), escaped otherwise (a table cell, a name)."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(char if multiline and char in _LINE_BREAKS else _shown(char) for char in text)


def cell(text: object, style: str = "") -> Text:
    """Outside text as a rich Text: escaped, and never read as rich markup (`[red]` in a name stays text)."""
    return Text(printable(str(text)), style=style)
