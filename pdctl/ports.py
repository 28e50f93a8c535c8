"""Who holds a port: the check before anything binds one, naming the holder."""

from __future__ import annotations

import errno
import socket

import psutil


def port_owner(host: str, port: int) -> str | None:
    """None when the port can be bound, else who holds it ("pid 123 (python)")."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            return None
        except OSError as error:
            if error.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
    for connection in psutil.net_connections(kind="inet"):
        listening = connection.laddr and connection.laddr.port == port and connection.status == psutil.CONN_LISTEN
        if listening and connection.pid:
            try:
                return f"pid {connection.pid} ({psutil.Process(connection.pid).name()})"
            except psutil.Error:
                return f"pid {connection.pid}"
    return "another process"
