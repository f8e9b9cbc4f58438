"""A free TCP port on this host, for a rendezvous that no launcher set up (one process, tools,
tests). Only the standard library: the data tools and tests import it without torch."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A port the system has just handed out on 127.0.0.1, released again: free unless another
    process takes it before the caller binds it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
