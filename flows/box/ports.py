"""Loopback ports for the services this project starts on one machine itself (the demo, the tests, bench).

A port from the kernel (`bind(0)`) comes from the ephemeral range, which any outgoing connection may take
between the moment it is picked and the moment the service binds it. These ports come from below that range,
where the kernel never hands a port out by itself, and each is reserved with a lock file (`flock`) that the
reserving process holds until it exits: two processes of this project (pytest workers, a demo beside a test
run) never get the same port. A reservation covers the port and the one after it, a staged service's default
staging port (`new.stage_port` unset: the app's port + 1).
"""

from __future__ import annotations

import fcntl
import random
import socket
import tempfile
from pathlib import Path
from typing import IO

LOCKS = Path(tempfile.gettempdir()) / "sdxl-deploy-ports"
SPAN = 2  # the port and the next one (a staged service's default staging port)
_FIRST = 20000
_held: dict[int, IO[bytes]] = {}  # port -> its open, locked file, kept while this process lives


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def candidates() -> range:
    """First ports of the blocks to reserve: below the ephemeral range (else above it), SPAN apart, so that
    two reservations never overlap."""
    low, high = _ephemeral_range()
    first, stop = (_FIRST, low) if low - _FIRST > 1000 else (high + 1, 65536)
    return range(first, stop - SPAN + 1, SPAN)


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _lock(port: int) -> IO[bytes] | None:
    LOCKS.mkdir(parents=True, exist_ok=True)
    handle = open(LOCKS / str(port), "ab")  # noqa: SIM115 - kept open: the lock lives as long as the file
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def free_port() -> int:
    """A loopback port (and the one after it) that nothing listens on and no other process of ours holds.

    Reserved until this process exits, or until `release(port)`.
    """
    ports = candidates()
    start = random.SystemRandom().randrange(len(ports))
    for offset in range(len(ports)):
        port = ports[(start + offset) % len(ports)]
        if port in _held:
            continue
        handle = _lock(port)
        if handle is None:
            continue
        if all(_bindable(p) for p in range(port, port + SPAN)):
            _held[port] = handle
            return port
        handle.close()
    raise RuntimeError(f"no free loopback port in {ports.start}-{ports.stop + SPAN - 2}")


def release(port: int) -> None:
    """Give a reservation back before this process exits."""
    handle = _held.pop(port, None)
    if handle is not None:
        handle.close()
