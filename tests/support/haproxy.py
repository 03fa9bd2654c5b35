"""A real HAProxy on loopback for the fleet tests (the Debian package; `make setup` installs it): a
frontend on a free port, one backend with a server per host, `option httpchk GET /ready` checked every
200 ms, and the runtime API on a unix socket in a temp dir with `level admin`. Stopped by its PID."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from flows.runbooks.fleet.local_lb import HAPROXY, LocalHAProxy


@contextmanager
def haproxy(servers: dict[str, int], root: Path, check_inter_ms: int = 200) -> Iterator[LocalHAProxy]:
    """HAProxy balancing `servers` (name -> loopback port); stopped and removed afterwards."""
    if not Path(HAPROXY).is_file():
        pytest.fail(
            f"{HAPROXY} is missing: run `make setup` (it installs the Debian package haproxy)", pytrace=False
        )
    root.mkdir(parents=True, exist_ok=True)
    proxy = LocalHAProxy(servers=servers, root=root, check_inter_ms=check_inter_ms)
    with proxy:
        yield proxy
