"""What an engine writes to its log when it dies inside while its API server process lives on: the supervisor
reads each instance's new log lines for these, so such an engine is restarted in seconds instead of after its
start timeout (while loading) or never (while serving, its /health answering). Each engine's adapter names its
own lines (`EngineAdapter.fatal_markers`)."""

from __future__ import annotations

from pdctl.engines.adapter import all_fatal_markers


def fatal_line(text: str) -> str | None:
    """The first line of `text` that says an engine died inside, stripped; None if none does."""
    for marker in all_fatal_markers():
        at = text.find(marker)
        if at >= 0:
            start = text.rfind("\n", 0, at) + 1
            end = text.find("\n", at)
            return text[start : end if end >= 0 else len(text)].strip()
    return None
