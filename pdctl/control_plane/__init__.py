"""The design document's Python API: its configuration and runtime types."""

from pdctl.control_plane.types import (
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
