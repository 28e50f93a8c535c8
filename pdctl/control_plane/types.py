"""The design document's types under the name the document imports them by. They live in `pdctl.types`, the
bottom layer, so that the router, the profile and the planner use them without importing this public API."""

from pdctl.types import (
    DecodingConfig,
    ExecutionInstance,
    ExecutionInstanceType,
    PDMetrics,
    PDSeparationConfig,
    PreffillingConfig,
    PrefillingConfig,
    RequestMetadata,
    RequestPriority,
)

__all__ = [
    "DecodingConfig",
    "ExecutionInstance",
    "ExecutionInstanceType",
    "PDMetrics",
    "PDSeparationConfig",
    "PreffillingConfig",
    "PrefillingConfig",
    "RequestMetadata",
    "RequestPriority",
]
