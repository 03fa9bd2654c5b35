"""Pytest plugin: a real OpenSSH server on 127.0.0.1 for the host-access and runbook tests.

Fixtures: `sshd` (one server per session), `ssh_host` (a connected `SSHHost` to it, per test) and
`private_sshd` (a server of the test's own, for tests that change it, e.g. its host key).
Each server has its own config, host key, client key and authorized_keys in a temp dir, listens on a
free high port and is stopped by its PID. Nothing is installed here: `make setup` installs openssh-server.
"""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.launch import free_port
from flows.box.hosts import SSHHost

SSHD = Path("/usr/sbin/sshd")


class SSHServer:
    """One sshd process and what a client needs to reach it (key, known_hosts)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hostname = "127.0.0.1"
        self.port = 0
        self.username = getpass.getuser()
        self.host_key = root / "ssh_host_ed25519_key"
        self.key_filename = root / "client_ed25519_key"
        self.known_hosts = root / "known_hosts"
        self.config = root / "sshd_config"
        self.log = root / "sshd.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def host_id(self) -> str:
        """The server's name in known_hosts."""
        return f"[{self.hostname}]:{self.port}"

    def start(self) -> None:
        """Generate keys and config, start sshd on a free port, wait until it accepts connections."""
        if not SSHD.is_file():
            pytest.fail(f"{SSHD} is missing: run `make setup` (it installs openssh-server)", pytrace=False)
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation directory
        if not self.key_filename.exists():
            _keygen(self.key_filename)
            (self.root / "authorized_keys").write_text(self.key_filename.with_suffix(".pub").read_text())
        if not self.host_key.exists():
            _keygen(self.host_key)
        for _attempt in range(3):  # another process may grab the free port before sshd binds it
            self.port = self.port or free_port()
            self._write_config()
            self.process = subprocess.Popen(
                [str(SSHD), "-D", "-f", str(self.config), "-E", str(self.log)], stdin=subprocess.DEVNULL
            )
            if _wait_listening(self.hostname, self.port, self.process, timeout_s=10):
                self._write_known_hosts()
                return
            self.stop()
            self.port = 0
        pytest.fail(f"sshd did not start; its log {self.log}:\n{self.log.read_text(errors='replace')}")

    def stop(self) -> None:
        """Stop sshd by its PID (its per-connection children exit with their connections)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart_with_new_host_key(self) -> None:
        """Same port, new host key: clients with the old `known_hosts` now see a CHANGED key."""
        old_known_hosts = self.known_hosts.read_text()
        self.stop()
        self.host_key.unlink()
        self.host_key.with_suffix(".pub").unlink()
        self.start()
        self.known_hosts.write_text(old_known_hosts)

    def drop_connections(self) -> list[int]:
        """Kill the per-connection sshd processes (children of the listener): every client's link drops.
        Returns the PIDs killed."""
        assert self.process is not None
        killed = _children(self.process.pid)
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        return killed

    def host(self, **options: object) -> SSHHost:
        """A connected SSHHost for this server (keyword arguments override the defaults)."""
        settings: dict = {
            "port": self.port,
            "username": self.username,
            "key_filename": str(self.key_filename),
            "known_hosts": self.known_hosts,
            "connect_timeout": 5.0,
        }
        return SSHHost(self.hostname, **(settings | options)).connect()

    def _write_config(self) -> None:
        self.config.write_text(
            "\n".join(
                [
                    f"ListenAddress {self.hostname}",
                    f"Port {self.port}",
                    f"HostKey {self.host_key}",
                    f"PidFile {self.root / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",  # temp dirs are world-writable
                    "PermitRootLogin prohibit-password",
                    "AllowTcpForwarding yes",
                    "X11Forwarding no",
                    "PrintMotd no",
                    "Subsystem sftp internal-sftp",
                    "",
                ]
            )
        )

    def _write_known_hosts(self) -> None:
        key_type, key_data = self.host_key.with_suffix(".pub").read_text().split()[:2]
        self.known_hosts.write_text(f"{self.host_id} {key_type} {key_data}\n")


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "", "-f", str(path)], check=True)


def _wait_listening(hostname: str, port: int, process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with socket.create_connection((hostname, port), timeout=1):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def running(root: Path, server_class: type[SSHServer] = SSHServer) -> Iterator[SSHServer]:
    """A started server of `server_class` with its files under `root`, stopped when the generator closes."""
    server = server_class(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """A real sshd on 127.0.0.1, shared by the whole session. Do not change it: see `private_sshd`."""
    yield from running(tmp_path_factory.mktemp("sshd"))


@pytest.fixture
def private_sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    """A real sshd of this test's own (restart it, drop its connections)."""
    yield from running(tmp_path_factory.mktemp("private-sshd"))


@pytest.fixture
def ssh_host(sshd: SSHServer) -> Iterator[SSHHost]:
    """A connected SSHHost to the session's sshd, closed after the test."""
    with sshd.host() as host:
        yield host
