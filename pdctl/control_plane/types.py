"""The design document's types under the name the document imports them by. They live in `pdctl.types`, the
bottom layer, so that the router, the profile and the planner use them without importing this public API."""

from pdctl.profile import PDSpec
from pdctl.types import (
    DecodingConfig,
    ExecutionInstance,
    ExecutionInstanceType,
    PDMetrics,
    PreffillingConfig,
    PrefillingConfig,
    RequestMetadata,
    RequestPriority,
)


class PDSeparationConfig(PDSpec):
    """The document's PD config, as a profile's `pd` section is: a routing_policy no policy registered is
    refused when set, and the object keeps its old value."""


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
