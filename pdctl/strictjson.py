"""JSON as the standard defines it, for what pdctl prints, writes and serves: a figure that is not finite (a
cost per token when no token was made) is written null, never `Infinity` or `NaN`, which Python's json writes
by default and other readers (jq, JSON.parse) refuse."""

from __future__ import annotations

import json
import math
from typing import Any


def dumps(data: Any, **options: Any) -> str:
    """json.dumps's text, with every float that is not finite as null."""
    try:
        return json.dumps(data, allow_nan=False, **options)
    except ValueError:  # rare: walk the data only when a figure is not finite
        return json.dumps(_finite(data), allow_nan=False, **options)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
