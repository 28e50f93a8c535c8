"""The daemon's control API for `pdctl scale`: a unix socket in the cluster's state directory.

Not on the network: the socket lives in a directory only the cluster's owner can enter (0700) and is
itself 0600. One JSON request per connection, one JSON answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from pdctl.errors import ClusterError, UsageError
from pdctl.scaling.decider import ScaleRequestError
from pdctl.scaling.report import ScalingReport
from pdctl.scaling.scaler import Scaler
from pdctl.scaling.signals import Role
from pdctl.state import ClusterDir

log = logging.getLogger("pdctl.scaler.control")

SOCKET_NAME = "control.sock"


class ScaleRequest(BaseModel):
    op: Literal["scale"] = "scale"
    prefill: int | None = None
    decode: int | None = None
    auto: bool = False
    pd: dict[str, Any] = {}  # PD settings to change at run time (bounds, dynamic scaling, routing)


class ScaleAnswer(BaseModel):
    ok: bool
    error: str | None = None
    report: ScalingReport | None = None


def parse_settings(pairs: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs, each value read as YAML (6, true, adaptive), as the profile would have it."""
    changes: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {pair!r}: write KEY=VALUE, e.g. prefilling_max_instances=6")
        changes[key.strip().removeprefix("pd.")] = yaml.safe_load(value)
    return changes


def socket_path(cluster_dir: ClusterDir) -> Path:
    return cluster_dir.path / SOCKET_NAME


def apply(scaler: Scaler, request: ScaleRequest) -> ScaleAnswer:
    counts = {Role.PREFILL: request.prefill, Role.DECODE: request.decode}
    try:
        if request.pd:
            scaler.update_pd(request.pd)
        # Check every pool before changing any, so a bad count changes nothing.
        for role, count in counts.items():
            if count is not None:
                scaler.check_count(role, count)
        if request.auto:
            scaler.set_auto()
        for role, count in counts.items():
            if count is not None:
                scaler.set_manual(role, count)
    except ScaleRequestError as error:
        return ScaleAnswer(ok=False, error=str(error))
    return ScaleAnswer(ok=True, report=scaler.report())


class ControlServer:
    def __init__(self, scaler: Scaler, path: Path):
        self.scaler, self.path = scaler, path
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        old = os.umask(0o177)  # created 0600: no window in which another user could connect
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        finally:
            os.umask(old)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            raw = await asyncio.wait_for(reader.read(-1), timeout=5)  # the client closes its side when done
            try:
                answer = apply(self.scaler, ScaleRequest.model_validate_json(raw))
            except ValidationError as error:
                answer = ScaleAnswer(ok=False, error=f"bad request: {error.errors()[0]['msg']}")
            writer.write(answer.model_dump_json().encode())
            await writer.drain()
        except (TimeoutError, ConnectionError) as error:
            log.warning("control connection dropped: %s", error)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def send(cluster_dir: ClusterDir, request: ScaleRequest, timeout_s: float = 10.0) -> ScalingReport:
    """Ask the running daemon; a refused count is a usage error (exit 2), no daemon a cluster error."""
    path = socket_path(cluster_dir)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout_s)
            conn.connect(str(path))
            conn.sendall(request.model_dump_json().encode())
            conn.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
    except OSError as error:
        raise ClusterError(
            f"cannot reach cluster {cluster_dir.name!r}'s daemon at {path} ({error.strerror or error}): "
            "is it running? (`pdctl status`)"
        ) from None
    answer = ScaleAnswer.model_validate(json.loads(b"".join(chunks)))
    if not answer.ok or answer.report is None:
        raise UsageError(answer.error or "the daemon refused the request")
    return answer.report
