"""Network helpers for tests: addresses on this machine where nothing answers."""

from __future__ import annotations

import socket


def closed_port() -> int:
    """A loopback TCP port that nothing listens on (a connection to it is refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
