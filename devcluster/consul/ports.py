"""Free TCP ports for a double: N consecutive ones, below the kernel's ephemeral range."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_PORT_FLOOR = 10000


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def find_free_port_range(count: int, host: str = "127.0.0.1", attempts: int = 50) -> int:
    """First port of `count` consecutive free ports, below the ephemeral range.

    Ports that outgoing connections may take (the kernel's ephemeral range) are
    avoided so that a client socket cannot grab an agent's port later.
    """
    low, _high = _ephemeral_range()
    ceiling = low if low - _PORT_FLOOR > count else 65536
    for _attempt in range(attempts):
        base = random.randrange(_PORT_FLOOR, ceiling - count)
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports found on {host} after {attempts} attempts")
