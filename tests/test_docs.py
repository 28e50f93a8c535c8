"""Every relative link in README.md and the docs leads somewhere: to a file that exists and, with an #anchor, to a
heading of that file as GitHub names its anchors. The README is the front page: it links every topic page."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from tests.docpages import ROOT, lines, pages

CODE_SPAN = re.compile(r"`+[^`]*`+")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"#{1,6}\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:")


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: its text as shown, lowercase, punctuation dropped, spaces to '-'."""
    shown = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", shown.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file; a repeated one gets -1, -2, ... as on GitHub."""
    seen: Counter[str] = Counter()
    found = set()
    for _, line, language in lines(path.read_text()):
        match = HEADING.match(line) if language is None else None
        if match:
            name = anchor(match.group(1))
            found.add(f"{name}-{seen[name]}" if seen[name] else name)
            seen[name] += 1
    return found


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of each link outside code that names no scheme (http:, mailto:)."""
    found = []
    for number, line, language in lines(path.read_text()):
        if language is None:
            found += [(number, target) for target in LINK.findall(CODE_SPAN.sub("", line)) if not SCHEME.match(target)]
    return found


def broken(path: Path, target: str) -> str | None:
    """Why a link from `path` to `target` leads nowhere, or None when it resolves."""
    file, _, fragment = target.partition("#")
    linked = (path.parent / file).resolve() if file else path
    if not linked.exists():
        return f"{linked} does not exist"
    if not fragment:
        return None
    if linked.suffix != ".md":
        return f"#{fragment} points into {linked.name}, which has no headings"
    return None if fragment in anchors(linked) else f"{linked.name} has no heading with anchor #{fragment}"


LINKS = [(path, number, target) for path in pages() for number, target in relative_links(path)]


@pytest.mark.parametrize(
    ("path", "number", "target"), LINKS, ids=[f"{p.relative_to(ROOT)}:{n}:{t}" for p, n, t in LINKS]
)
def test_a_relative_link_resolves(path: Path, number: int, target: str):
    assert broken(path, target) is None, f"{path.relative_to(ROOT)}:{number}: {target}: {broken(path, target)}"


def test_the_readme_links_every_topic_page():
    linked = {(ROOT / target.partition("#")[0]).resolve() for _, target in relative_links(ROOT / "README.md")}
    assert set((ROOT / "docs").glob("*.md")) <= linked


def test_anchors_follow_githubs_rules():
    assert anchor("The design document's table (`--design-table`)") == "the-design-documents-table---design-table"
    assert anchor("Layers: the launcher contract") == "layers-the-launcher-contract"
    assert anchor("A/B runs") == "ab-runs"
    assert anchor("Faults, measured") == "faults-measured"
    assert anchor("The engine model (`pdctl/perfmodel`)") == "the-engine-model-pdctlperfmodel"
    assert anchor("`max_num_seqs` and [vLLM](https://docs.vllm.ai/)") == "max_num_seqs-and-vllm"


def test_a_broken_link_is_found(tmp_path: Path):
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## Usage\n\n## Usage\n\n```bash\n# not a heading\n```\n\n"
        "[a](#usage-1) [b](#not-a-heading) [c](other.md) [d](#usage-2) `[e](#in-code)` [f](https://x.example/#y)\n"
    )
    assert anchors(page) == {"title", "usage", "usage-1"}
    targets = [target for _, target in relative_links(page)]
    assert targets == ["#usage-1", "#not-a-heading", "other.md", "#usage-2"]
    assert [target for target in targets if broken(page, target)] == ["#not-a-heading", "other.md", "#usage-2"]


def test_the_routing_pages_strategy_table_is_the_registrys():
    """docs/routing.md lists each registered strategy with its scorers, weights and picker: a checked copy."""
    from pdctl.routing.pieces import Strategy

    text = (ROOT / "docs" / "routing.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \| `(\w+)` \|$", text, re.MULTILINE)
    documented = {name: ({s: float(w) for s, w in re.findall(r"`(\w+)` \(([\d.]+)\)", scorers)}, picker)
                  for name, scorers, picker in rows}  # fmt: skip
    registered = {
        name: (dict(cls.composition.scorers), cls.composition.picker) for name, cls in Strategy.registry.items()
    }
    assert documented == registered


def layer_map(text: str) -> list[tuple[str, frozenset[str]]]:
    """The map drawn under a page's `## The layer map` heading: per line of its fence, a layer and its nodes."""
    section, drawn = None, []
    for _, line, language in lines(text):
        if language is None and (match := HEADING.match(line)):
            section = match.group(1)
        elif language is not None and section == "The layer map" and line.strip():
            layer, *nodes = line.split()
            drawn.append((layer, frozenset(nodes)))
    return drawn


def test_the_architecture_pages_layer_map_is_the_layer_tests():
    """docs/architecture.md draws the layers top first; LAYERS in tests/test_layers.py is the source of truth."""
    from tests.test_layers import LAYERS

    drawn = layer_map((ROOT / "docs" / "architecture.md").read_text())
    assert drawn == LAYERS[::-1], "redraw docs/architecture.md's layer map from LAYERS in tests/test_layers.py"


def test_a_layer_map_is_read_from_its_own_section_only():
    page = "# A\n\n```text\ntypes other\n```\n\n## The layer map\n\n```text\napi  x\n\ntypes  a b\n```\n\n## Next\n"
    assert layer_map(page) == [("api", frozenset({"x"})), ("types", frozenset({"a", "b"}))]
