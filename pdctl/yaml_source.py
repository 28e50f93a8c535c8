"""YAML loaded with the position of every key, so errors can name file, line and column."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pdctl.errors import ProfileError

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Position:
    line: int
    column: int


@dataclass
class YamlSource:
    path: Path
    data: Any
    positions: dict[Loc, Position]

    def where(self, loc: Loc) -> str:
        """`file:line:col` of the deepest part of `loc` the file itself wrote."""
        for depth in range(len(loc), -1, -1):
            position = self.positions.get(tuple(loc[:depth]))
            if position:
                return f"{self.path}:{position.line}:{position.column}"
        return str(self.path)


def _mark(node: yaml.Node) -> Position:
    return Position(node.start_mark.line + 1, node.start_mark.column + 1)


def _index_positions(node: yaml.Node, loc: Loc, out: dict[Loc, Position], problems: list[str], path: Path):
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                where = _mark(key_node)
                problems.append(f"{path}:{where.line}:{where.column}: {_dotted((*loc, key))}: key written twice")
            seen.add(key)
            out[(*loc, key)] = _mark(key_node)
            _index_positions(value_node, (*loc, key), out, problems, path)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out[(*loc, index)] = _mark(item)
            _index_positions(item, (*loc, index), out, problems, path)


def _dotted(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


dotted = _dotted


def load_yaml(path: Path) -> YamlSource:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ProfileError([f"{path}: cannot read the profile: {error.strerror or error}"]) from None
    except UnicodeDecodeError as error:
        raise ProfileError([f"{path}: not UTF-8 text ({error.reason} at byte {error.start})"]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ProfileError([f"{where}: invalid YAML: {error.problem or error.context}"]) from None
    except yaml.YAMLError as error:
        raise ProfileError([f"{path}: invalid YAML: {error}"]) from None
    positions: dict[Loc, Position] = {}
    problems: list[str] = []
    if node is not None:
        positions[()] = _mark(node)
        _index_positions(node, (), positions, problems, path)
    if problems:
        raise ProfileError(problems)
    return YamlSource(path, data if data is not None else {}, positions)
