"""Ports for the services the project starts itself (flows/box/ports.py): outside the kernel's ephemeral
range, never one that something listens on, and reserved across processes until the reserving process
exits."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from flows.box import ports

REPO = Path(__file__).resolve().parents[2]
_RESERVE = "from flows.box.ports import free_port; print(*[free_port() for _ in range(200)])"


def test_ports_come_from_outside_the_ephemeral_range_with_their_staging_port_free() -> None:
    low, high = ports._ephemeral_range()
    for _ in range(20):
        port = ports.free_port()
        assert not low <= port <= high and not low <= port + 1 <= high
        for p in (port, port + 1):  # both bindable: nothing listens there
            with socket.create_server(("127.0.0.1", p)):
                pass


def test_a_port_something_holds_is_never_handed_out(monkeypatch) -> None:
    """Of ten blocks, something listens on the first port of some and the staging port of the others but
    one: that one is the only port handed out."""
    blocks = sorted(ports.free_port() for _ in range(10))  # ten blocks no other process of ours holds
    for port in blocks:
        ports.release(port)
    monkeypatch.setattr(ports, "candidates", lambda: blocks)
    free = blocks[7]
    held = [socket.create_server(("127.0.0.1", p + (i % 2))) for i, p in enumerate(blocks) if p != free]
    try:
        assert ports.free_port() == free
    finally:
        for sock in held:
            sock.close()
    ports.release(free)


def test_two_processes_never_get_the_same_port() -> None:
    """Reservations are held by the process (a lock file each), so concurrent allocators do not collide."""
    mine = {ports.free_port() for _ in range(200)}
    other = subprocess.run(
        [sys.executable, "-c", _RESERVE], cwd=REPO, capture_output=True, text=True, check=True, timeout=60
    )
    theirs = {int(p) for p in other.stdout.split()}
    assert len(mine) == 200 and len(theirs) == 200 and not mine & theirs
