"""Host-key policy: known_hosts read like OpenSSH reads it, unknown keys refused unless trusted on first
use, changed and `@revoked` keys always refused, with messages that say what to check."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import paramiko
from paramiko.hostkeys import HostKeyEntry, InvalidHostKey

from flows.box.hosts.base import q
from flows.errors import HostKeyRejected

log = logging.getLogger(__name__)


class UnknownHostPolicy(paramiko.MissingHostKeyPolicy):
    """Unknown host key: refuse, or with `trust` accept it once and append it to known_hosts.

    Only called for hosts with no key at all in known_hosts; paramiko itself raises
    BadHostKeyException for a changed key, whatever this policy says.
    """

    def __init__(self, known_hosts: Path, trust: bool, revoked: set[bytes]) -> None:
        self.known_hosts, self.trust, self.revoked = known_hosts, trust, revoked

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if key.asbytes() in self.revoked:
            raise HostKeyRejected(revoked_message(self.known_hosts, key))
        if not self.trust:
            raise HostKeyRejected(
                f"the host key of {hostname} is not in {self.known_hosts} ({key.get_name()} {key.fingerprint}). "
                "Compare this fingerprint with the box's (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` "
                "there, or your provider's console), then add it to that file or connect once with "
                "connection.trust_new_host: true to accept and remember it."
            )
        self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        old = self.known_hosts.read_bytes() if self.known_hosts.exists() else b""
        line = HostKeyEntry([hostname], key).to_line()
        fd = os.open(self.known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as known:
            known.write(("\n" if old and not old.endswith(b"\n") else "") + line)
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning(
            "trusted new host key of %s (%s %s) and saved it to %s",
            hostname,
            key.get_name(),
            key.fingerprint,
            self.known_hosts,
        )


def load_known_hosts(path: Path, keys: paramiko.HostKeys) -> set[bytes]:
    """Load known_hosts into `keys` like OpenSSH reads it; return the `@revoked` keys.

    Lines paramiko cannot use (`@cert-authority`, unknown key types, damaged lines) are skipped
    instead of failing the whole file.
    """
    revoked: set[bytes] = set()
    if not path.is_file():
        return revoked
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        marker, _, rest = line.strip().partition(" ") if line.startswith("@") else ("", "", line)
        try:
            entry = HostKeyEntry.from_line(rest, number)
        except (InvalidHostKey, paramiko.SSHException, ValueError) as exc:
            log.debug("%s line %d skipped: %s", path, number, exc)
            continue
        if entry is None or marker == "@cert-authority":
            continue
        if marker == "@revoked":
            revoked.add(entry.key.asbytes())
        elif not marker:
            for name in entry.hostnames:
                keys.add(name, entry.key.get_name(), entry.key)
    return revoked


def revoked_message(known_hosts: Path, key: paramiko.PKey) -> str:
    """The refusal of a key that known_hosts marks `@revoked`."""
    return f"the server's host key {key.get_name()} {key.fingerprint} is marked @revoked in {known_hosts}"


def changed_key_message(
    hostname: str, port: int, known_hosts: Path, offered: paramiko.PKey, expected: paramiko.PKey
) -> str:
    """The refusal of a key that differs from the one in known_hosts, with how to clear a reinstalled box."""
    host_id = hostname if port == 22 else f"[{hostname}]:{port}"
    return (
        f"HOST KEY CHANGED for {host_id}: {known_hosts} has {expected.get_name()} {expected.fingerprint} "
        f"but the server offered {offered.get_name()} {offered.fingerprint}. Someone may be intercepting the "
        "connection, or the box was reinstalled. If you are sure it was reinstalled, remove the old entry "
        f"with `ssh-keygen -R {q(host_id)} -f {q(known_hosts)}` and connect again "
        "(trust_new_host never overrides a changed key)."
    )
