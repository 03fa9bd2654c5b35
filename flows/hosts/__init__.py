"""Host access for the runbook: run shell commands, copy files and forward ports, here or over SSH.

`LocalHost` (local.py) drives this machine with subprocesses; `SSHHost` (ssh.py) drives a GPU box with
paramiko: key auth only, host keys verified against known_hosts (known_hosts.py: an unknown key is
refused unless `trust_new_host`, a changed key is always refused), timeouts and keepalive set on purpose,
one cached SFTP client, ports forwarded like `ssh -L` (forward.py). Both implement `Host` (base.py).
Every value interpolated into a command goes through `q()`. The errors live in `flows.errors` and are
re-exported here with the rest of the interface: `from flows.hosts import Host, HostUnreachable, q`.
"""

from __future__ import annotations

from flows.errors import CommandFailed, CommandTimeout, HostError, HostKeyRejected, HostUnreachable
from flows.hosts.base import CommandResult, Host, q
from flows.hosts.local import LocalHost
from flows.hosts.ssh import SSHHost

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
    "q",
]
