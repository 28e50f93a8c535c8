"""What vLLM writes to its log when its engine dies inside while the API server process lives on: the
supervisor reads each instance's new log lines for these, so such an engine is restarted in seconds instead of
after its start timeout (while loading) or never (while serving, its /health answering)."""

from __future__ import annotations

# vLLM's own messages (vllm/v1/engine/core.py, utils.py and exceptions.py, 0.32): each means the engine core
# is gone. The API server logs EngineDeadError when its engine core died (killed, crashed) and exits by itself
# only some seconds later, answering 500 meanwhile.
FATAL_MARKERS = (
    "EngineCore failed to start",
    "EngineCore encountered a fatal error",
    "Engine core initialization failed",
    "EngineDeadError",
)


def fatal_line(text: str) -> str | None:
    """The first line of `text` that says the engine core died, stripped; None if none does."""
    for marker in FATAL_MARKERS:
        at = text.find(marker)
        if at >= 0:
            start = text.rfind("\n", 0, at) + 1
            end = text.find("\n", at)
            return text[start : end if end >= 0 else len(text)].strip()
    return None
