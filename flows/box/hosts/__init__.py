"""Host access for the runbook: run shell commands, copy files and forward ports, here or over SSH.

`LocalHost` (local.py) drives this machine with subprocesses; `SSHHost` (ssh.py) drives a GPU box with
paramiko: key auth only, host keys verified against known_hosts (known_hosts.py: an unknown key is
refused unless `trust_new_host`, a changed key is always refused), timeouts and keepalive set on purpose,
one cached SFTP client, ports forwarded like `ssh -L` (forward.py). Both implement `Host` (base.py).
Every value interpolated into a command goes through `q()`. The errors live in `flows.errors` and are
re-exported here with the rest of the interface: `from flows.box.hosts import Host, HostUnreachable, q`.
`open_host(connection)` opens the host a target's `connection` (or a load balancer's `via`) describes.
"""

from __future__ import annotations

import os
from pathlib import Path

from flows.box.hosts.base import CommandResult, Host, q
from flows.box.hosts.local import LocalHost
from flows.box.hosts.ssh import SSHHost
from flows.config.target import Connection
from flows.errors import CommandFailed, CommandTimeout, HostError, HostKeyRejected, HostUnreachable

__all__ = [
    "CommandFailed",
    "CommandResult",
    "CommandTimeout",
    "Host",
    "HostError",
    "HostKeyRejected",
    "HostUnreachable",
    "LocalHost",
    "SSHHost",
    "local_host_supported",
    "open_host",
    "q",
]


def open_host(connection: Connection) -> Host:
    """Open the host `connection` describes (a context manager): this machine, or a box over SSH."""
    if connection.kind == "local":
        if not local_host_supported():
            raise HostError(
                "connection.kind 'local' runs the box's POSIX shell commands on this machine, which is not "
                "POSIX (Windows); set connection.kind: ssh and connection.hostname to reach the GPU box"
            )
        return LocalHost()
    return SSHHost(
        connection.hostname or "",
        port=connection.port,
        username=connection.username,
        key_filename=_expand_local(connection.key_filename),
        known_hosts=_expand_local(connection.known_hosts),
        trust_new_host=connection.trust_new_host,
        connect_timeout=connection.connect_timeout,
    )


def local_host_supported() -> bool:
    """Whether this machine can itself be the box (`connection.kind: local`): POSIX only. A Windows
    control side reaches its box over SSH."""
    return os.name == "posix"


def _expand_local(path: str | None) -> str | None:
    return str(Path(path).expanduser()) if path else None
