"""The exceptions the control-plane API raises: each a pdctl error (the CLI reports it without a traceback)
and, where Python has a natural base for it, that base too, so `except ValueError` code keeps working."""

from __future__ import annotations

# The router raises these two as well, so they live in the bottom layer; the API names them here too.
from pdctl.errors import MissingPrompt, PdctlError, UnknownPolicy, UsageError

__all__ = [
    "ControlPlaneError",
    "DuplicateRequest",
    "InstanceUnreachable",
    "MissingPrompt",
    "NoInstances",
    "NotRunning",
    "UnknownPolicy",
    "UnknownRequest",
]


class ControlPlaneError(PdctlError):
    """Base of the control plane's own errors."""


class DuplicateRequest(UsageError, ValueError):
    """A request id already submitted to this manager."""


class NoInstances(ControlPlaneError):
    """The manager was started with no instance registered."""


class InstanceUnreachable(ControlPlaneError):
    """Registered instances that did not answer their health check; `reasons` maps each id to why."""

    def __init__(self, reasons: dict[str, str]):
        self.reasons = reasons
        listed = "; ".join(f"{instance}: {reason}" for instance, reason in reasons.items())
        super().__init__(f"{len(reasons)} instance(s) unreachable: {listed}")


class NotRunning(ControlPlaneError):
    """An operation that needs a started manager (submit, result) before start() or after stop()."""


class UnknownRequest(ControlPlaneError, KeyError):
    """A request id this manager never accepted."""

    def __str__(self) -> str:  # KeyError would print the message's repr
        return str(self.args[0])
