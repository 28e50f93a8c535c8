"""Errors a user can act on, each mapped to an exit code in exactly one place (the CLI)."""

from __future__ import annotations


class PdctlError(Exception):
    """Base of every error pdctl reports to a user: the message is the whole report."""

    exit_code = 1


class UsageError(PdctlError):
    """The input (a profile, a flag) is wrong: exit 2, like a command-line usage error."""

    exit_code = 2


class UnknownPolicy(UsageError, ValueError):
    """A routing policy, scheduling policy or routing strategy name pdctl does not have."""


class UnknownEngine(UsageError, ValueError):
    """An engine kind no adapter (`pdctl.engines.adapter.EngineAdapter`) has registered."""


class MissingPrompt(UsageError, ValueError):
    """A request with neither a prompt (nor chat messages) nor a known input token count."""


class ProfileError(UsageError):
    """A profile that cannot be loaded; every problem names file, line, column and field path."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class PlacementError(UsageError):
    """The profile cannot be placed on this host's devices."""


class EngineRuntimeMissing(PdctlError):
    """No engine runtime where the profile says one is; the message names the install command."""


class ClusterError(PdctlError):
    """A cluster operation failed (already running, port taken, instance failed to start)."""
