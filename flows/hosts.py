"""Host access for the runbook: run shell commands, copy files and forward ports, here or over SSH.

`LocalHost` drives this machine with subprocesses; `SSHHost` drives a GPU box with paramiko: key auth
only, host keys verified against known_hosts (an unknown key is refused unless `trust_new_host`, a
changed key is always refused), timeouts and keepalive set on purpose, one cached SFTP client.
Every value interpolated into a command goes through `q()`.
"""

from __future__ import annotations

import logging
import os
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import paramiko
from paramiko.hostkeys import HostKeyEntry, InvalidHostKey
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_fixed

from flows.errors import CommandFailed, CommandTimeout, HostError, HostKeyRejected, HostUnreachable

__all__ = [  # the host errors are part of this module's interface; they live in flows.errors
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

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
_H = TypeVar("_H", bound="Host")
_PID_MARK = "flows.hosts:pid="  # first stderr line of every SSH command, removed again


def q(*parts: str | Path) -> str:
    """Shell-quote each part and join them with spaces: `f"cat -- {q(path)}"`."""
    return " ".join(shlex.quote(str(part)) for part in parts)


@dataclass(frozen=True)
class CommandResult:
    """What one shell command did."""

    command: str
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


# ------------------------------------------------------------------------------------------------ base


class Host(ABC):
    """A machine the runbook works on. A context manager: leaving it closes the connection."""

    name: str
    is_remote: bool

    @abstractmethod
    def run(self, command: str, timeout: float = 60.0) -> CommandResult:
        """Run a shell command (`bash -c`); a non-zero exit is returned, not raised (see `run_checked`)."""

    @abstractmethod
    def put(self, local: Path, remote: str) -> None:
        """Upload a file (the remote parent folder must exist; `remote` may start with "~/")."""

    @abstractmethod
    def get(self, remote: str, local: Path) -> None:
        """Download a file (`remote` may start with "~/")."""

    @abstractmethod
    def forward(self, remote_port: int, local_port: int = 0) -> AbstractContextManager[int]:
        """Reach the host's 127.0.0.1:`remote_port` from here; yields the local port to connect to."""

    @abstractmethod
    def close(self) -> None:
        """Release connections; a later call opens a new one."""

    def __enter__(self: _H) -> _H:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


# ----------------------------------------------------------------------------------------------- local


class LocalHost(Host):
    """This machine: commands in `bash -c` subprocesses, files copied, ports used as they are."""

    def __init__(self) -> None:
        self.name = "local"
        self.is_remote = False

    def run(self, command: str, timeout: float = 60.0) -> CommandResult:
        # Its own session, so a timeout kills the whole process group, not just bash.
        proc = subprocess.Popen(
            ["bash", "-c", command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with suppress(subprocess.TimeoutExpired):  # a detached grandchild may still hold the pipes
                proc.communicate(timeout=2)
            proc.kill()
            proc.wait()
            raise CommandTimeout(_timeout_message(self.name, command, timeout)) from None
        return CommandResult(command, proc.returncode, _text(out), _text(err))

    def put(self, local: Path, remote: str) -> None:
        if not Path(local).is_file():
            raise HostError(f"cannot upload {local}: no such local file")
        _copy(
            Path(local), Path(remote).expanduser(), f"uploading {local} to {remote} (its folder must exist)"
        )

    def get(self, remote: str, local: Path) -> None:
        _copy(Path(remote).expanduser(), Path(local), f"downloading {remote} to {local}")

    @contextmanager
    def forward(self, remote_port: int, local_port: int = 0) -> Iterator[int]:
        """Nothing to tunnel: the service port is already local."""
        yield remote_port

    def close(self) -> None:
        pass


def _copy(source: Path, dest: Path, what: str) -> None:
    try:
        shutil.copyfile(source, dest)
    except OSError as exc:
        raise HostError(f"{what} failed: {exc}") from exc


# ------------------------------------------------------------------------------------------------- SSH


class SSHHost(Host):
    """A box over SSH (paramiko). Connects lazily on first use; one connection, one cached SFTP client."""

    def __init__(
        self,
        hostname: str,
        port: int = 22,
        username: str = "root",
        key_filename: str | None = None,
        known_hosts: Path | str | None = None,
        trust_new_host: bool = False,
        connect_timeout: float = 15.0,
        keepalive_s: int = 15,
    ) -> None:
        if not hostname.strip():
            raise ValueError(f"hostname must not be empty (got {hostname!r})")
        if not 1 <= port <= 65535:
            raise ValueError(f"port must be 1-65535 (got {port!r})")
        self.hostname, self.port, self.username = hostname, port, username
        self.key_filename = str(Path(key_filename).expanduser()) if key_filename else None
        self.known_hosts = Path(known_hosts or "~/.ssh/known_hosts").expanduser()
        self.trust_new_host = trust_new_host
        self.connect_timeout = connect_timeout
        self.keepalive_s = keepalive_s
        self.name = f"{username}@{hostname}:{port}"
        self.is_remote = True
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._home: str | None = None
        self._lock = threading.RLock()
        self.reconnects = 0  # links that dropped and were re-established (reported by the flows)

    # -- connection

    def connect(self) -> SSHHost:
        """Connect now instead of on first use (raises HostUnreachable / HostKeyRejected / HostError)."""
        self._transport()
        return self

    def _transport(self) -> paramiko.Transport:
        """The live transport: connect on first use; after a dropped link, reconnect (retrying once)."""
        with self._lock:
            if self._client is not None:
                transport = self._client.get_transport()
                if transport is not None and transport.is_active():
                    return transport
                log.warning("connection to %s dropped; reconnecting", self.name)
                self._drop()
                self._client = self._reconnect()
                self.reconnects += 1
            else:
                self._client = self._connect()
            transport = self._client.get_transport()
            assert transport is not None
            return transport

    @retry(
        retry=retry_if_exception_type(HostUnreachable),
        stop=stop_after_attempt(2),
        wait=wait_fixed(1),
        reraise=True,
    )
    def _reconnect(self) -> paramiko.SSHClient:
        return self._connect()

    def _connect(self) -> paramiko.SSHClient:
        if self.key_filename and not Path(self.key_filename).is_file():
            raise HostError(f"SSH key file {self.key_filename!r} does not exist (connection.key_filename)")
        client = paramiko.SSHClient()
        revoked = _load_known_hosts(self.known_hosts, client.get_host_keys())
        client.set_missing_host_key_policy(_UnknownHostPolicy(self.known_hosts, self.trust_new_host, revoked))
        use_default_keys = self.key_filename is None
        started = time.monotonic()
        try:
            client.connect(
                self.hostname,
                port=self.port,
                username=self.username,
                key_filename=self.key_filename,
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
                channel_timeout=self.connect_timeout,
                allow_agent=use_default_keys,
                look_for_keys=use_default_keys,
            )
        except HostKeyRejected:
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyRejected(_changed_key_message(self, exc.key, exc.expected_key)) from None
        except paramiko.AuthenticationException as exc:
            client.close()
            raise HostError(
                f"SSH key authentication as {self.username!r} on {self.name} failed ({exc}). Check "
                f"connection.key_filename ({self.key_filename or 'agent / ~/.ssh keys'}) and that its public "
                f"key is in ~{self.username}/.ssh/authorized_keys on the box."
            ) from None
        except (paramiko.SSHException, OSError, EOFError) as exc:
            client.close()
            raise HostUnreachable(
                f"cannot reach {self.name} within {self.connect_timeout:g} s: {exc or type(exc).__name__}. "
                "Check that the box is running, the hostname and port are right and sshd listens there."
            ) from None
        transport = client.get_transport()
        assert transport is not None
        server_key = transport.get_remote_server_key()
        if server_key.asbytes() in revoked:
            client.close()
            raise HostKeyRejected(_revoked_message(self.known_hosts, server_key))
        transport.set_keepalive(self.keepalive_s)  # keeps NAT entries and idle tunnels alive
        with suppress(OSError, AttributeError):  # small request/response messages: no Nagle delay
            transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        log.debug("connected to %s in %.3f s", self.name, time.monotonic() - started)
        return client

    def _lost(self, exc: BaseException, doing: str) -> HostError:
        """The error for a failure mid-operation: HostUnreachable when the link is gone."""
        transport = self._client.get_transport() if self._client else None
        if transport is None or not transport.is_active():
            return HostUnreachable(
                f"lost the connection to {self.name} while {doing} ({exc or type(exc).__name__}); "
                "it may or may not have completed. The next call reconnects."
            )
        return HostError(f"{doing} on {self.name} failed: {exc or type(exc).__name__}")

    def _drop(self) -> None:
        sftp, client = self._sftp, self._client
        self._sftp = self._client = self._home = None
        if sftp is not None:
            with suppress(Exception):
                sftp.close()
        if client is not None:
            client.close()

    def close(self) -> None:
        with self._lock:
            self._drop()

    # -- commands

    def run(self, command: str, timeout: float = 60.0) -> CommandResult:
        transport = self._transport()
        try:
            channel = transport.open_session(timeout=self.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self._lost(exc, "opening a session") from None
        with channel:
            try:
                # The login shell (which has read the user's rc files) reports its PID, the command's
                # process group, then becomes `bash -c command` without reading them again.
                channel.exec_command(f"echo {_PID_MARK}$$ >&2; exec bash --norc -c {q(command)}")
                channel.shutdown_write()  # stdin is empty: a command that reads it sees EOF
                out, err, finished = _collect(channel, time.monotonic() + timeout)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise self._lost(exc, f"running {command[:200]!r}") from None
            pid, err = _take_pid(err)
            if not finished:
                if pid:
                    self._kill_group(pid)
                raise CommandTimeout(_timeout_message(self.name, command, timeout))
            if not channel.eof_received:  # closed without EOF: the link dropped, not the command
                raise HostUnreachable(
                    f"lost the connection to {self.name} while running {command[:200]!r}; it may or may not "
                    "have completed. The next call reconnects."
                )
            return CommandResult(command, channel.exit_status, _text(out), _text(err))

    def _kill_group(self, pid: int) -> None:
        """Kill a timed-out command's process group (sshd made it a session leader)."""
        try:
            self.run(f"kill -s KILL -- -{pid}", timeout=self.connect_timeout)
        except HostError as exc:
            log.warning("could not kill timed-out process group %d on %s: %s", pid, self.name, exc)

    # -- files

    def _sftp_client(self) -> paramiko.SFTPClient:
        with self._lock:
            transport = self._transport()
            if self._sftp is None:
                try:
                    self._sftp = paramiko.SFTPClient.from_transport(
                        transport, window_size=8 * 1024 * 1024, max_packet_size=32 * 1024
                    )
                    assert self._sftp is not None
                    self._home = self._sftp.normalize(".")
                except (paramiko.SSHException, OSError, EOFError) as exc:
                    raise self._lost(exc, "opening SFTP") from None
            return self._sftp

    def _remote_path(self, remote: str) -> str:
        """Expand a leading "~/" with the remote home (where SFTP starts)."""
        if remote == "~" or remote.startswith("~/"):
            return f"{self._home}{remote[1:]}"
        return remote

    def put(self, local: Path, remote: str) -> None:
        if not Path(local).is_file():
            raise HostError(f"cannot upload {local}: no such local file")
        sftp = self._sftp_client()
        path = self._remote_path(remote)
        try:
            sftp.put(str(local), path, confirm=True)  # confirm: stat afterwards and compare the size
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self._lost(exc, f"uploading {local} to {path} (its folder must exist)") from exc

    def get(self, remote: str, local: Path) -> None:
        sftp = self._sftp_client()
        path = self._remote_path(remote)
        try:
            sftp.get(path, str(local))
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise self._lost(exc, f"downloading {path} to {local}") from exc

    # -- ports

    @contextmanager
    def forward(self, remote_port: int, local_port: int = 0) -> Iterator[int]:
        """Like `ssh -L local_port:127.0.0.1:remote_port`: yields the bound port on 127.0.0.1."""
        transport = self._transport()

        def open_channel(origin: tuple[str, int]) -> paramiko.Channel:
            return transport.open_channel(
                "direct-tcpip", ("127.0.0.1", remote_port), origin, timeout=self.connect_timeout
            )

        with _PortForward(open_channel, local_port, f"{self.name} port {remote_port}") as forward:
            yield forward.port


def _collect(channel: paramiko.Channel, deadline: float) -> tuple[bytes, bytes, bool]:
    """Read stdout and stderr until EOF and the exit status; (out, err, finished before the deadline)."""
    out, err = bytearray(), bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(channel, selectors.EVENT_READ)  # wakes on data, EOF and close
        while True:
            # Look at EOF before draining: the server sends every byte before its EOF, so what is buffered
            # after this check is all of it. Checking after the drain lost output that arrived in between
            # (an empty stdout with exit 0, seen in CI as a lock left held and an IndexError in preflight).
            ended = channel.eof_received or channel.closed
            while channel.recv_ready():
                out += channel.recv(_CHUNK)
            while channel.recv_stderr_ready():
                err += channel.recv_stderr(_CHUNK)
            if ended:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(out), bytes(err), False
            selector.select(min(remaining, 1.0))
    finished = channel.status_event.wait(max(deadline - time.monotonic(), 0.0))
    return bytes(out), bytes(err), finished


def _take_pid(stderr: bytes) -> tuple[int | None, bytes]:
    """Split the PID line the command wrapper writes first from the command's own stderr."""
    mark = _PID_MARK.encode()
    start = stderr.find(mark)
    end = stderr.find(b"\n", start)
    if start < 0 or end < 0 or (start and stderr[start - 1 : start] != b"\n"):
        return None, stderr
    pid = stderr[start + len(mark) : end]
    return (int(pid) if pid.isdigit() else None), stderr[:start] + stderr[end + 1 :]


# ------------------------------------------------------------------------------------------- host keys


class _UnknownHostPolicy(paramiko.MissingHostKeyPolicy):
    """Unknown host key: refuse, or with `trust` accept it once and append it to known_hosts.

    Only called for hosts with no key at all in known_hosts; paramiko itself raises
    BadHostKeyException for a changed key, whatever this policy says.
    """

    def __init__(self, known_hosts: Path, trust: bool, revoked: set[bytes]) -> None:
        self.known_hosts, self.trust, self.revoked = known_hosts, trust, revoked

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        if key.asbytes() in self.revoked:
            raise HostKeyRejected(_revoked_message(self.known_hosts, key))
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


def _load_known_hosts(path: Path, keys: paramiko.HostKeys) -> set[bytes]:
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


def _revoked_message(known_hosts: Path, key: paramiko.PKey) -> str:
    return f"the server's host key {key.get_name()} {key.fingerprint} is marked @revoked in {known_hosts}"


def _changed_key_message(host: SSHHost, offered: paramiko.PKey, expected: paramiko.PKey) -> str:
    host_id = host.hostname if host.port == 22 else f"[{host.hostname}]:{host.port}"
    return (
        f"HOST KEY CHANGED for {host_id}: {host.known_hosts} has {expected.get_name()} {expected.fingerprint} "
        f"but the server offered {offered.get_name()} {offered.fingerprint}. Someone may be intercepting the "
        "connection, or the box was reinstalled. If you are sure it was reinstalled, remove the old entry "
        f"with `ssh-keygen -R {q(host_id)} -f {q(host.known_hosts)}` and connect again "
        "(trust_new_host never overrides a changed key)."
    )


# ------------------------------------------------------------------------------------------ forwarding


class _PortForward:
    """A listening socket on 127.0.0.1 whose connections are relayed through SSH channels by threads."""

    def __init__(self, open_channel: Callable[[tuple[str, int]], paramiko.Channel], port: int, what: str):
        self._open_channel, self._what = open_channel, what
        self._server = socket.create_server(("127.0.0.1", port))
        self.port: int = self._server.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()  # one byte written at close stops every loop
        self._acceptor = threading.Thread(target=self._accept_loop, name=f"forward-{self.port}", daemon=True)
        self._relays: list[threading.Thread] = []

    def __enter__(self) -> _PortForward:
        self._acceptor.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._wake_w.send(b"x")
        self._acceptor.join(timeout=5)
        for relay in self._relays:  # the acceptor has stopped: this list no longer changes
            relay.join(timeout=5)
        for sock in (self._server, self._wake_r, self._wake_w):
            sock.close()

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._server, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if self._wake_r in ready:
                    return
                conn, origin = self._server.accept()
                relay = threading.Thread(target=self._relay, args=(conn, origin), daemon=True)
                self._relays = [t for t in self._relays if t.is_alive()] + [relay]
                relay.start()

    def _relay(self, conn: socket.socket, origin: tuple[str, int]) -> None:
        with conn:
            try:
                channel = self._open_channel(origin)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                log.warning("port forward to %s: cannot open a channel: %s", self._what, exc)
                return
            with channel:
                self._pump(conn, channel)

    def _pump(self, conn: socket.socket, channel: paramiko.Channel) -> None:
        """Copy both ways until both sides reach EOF (half-close aware) or the forward closes."""
        with selectors.DefaultSelector() as selector:
            selector.register(conn, selectors.EVENT_READ)
            selector.register(channel, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            open_sides = 2
            while open_sides:
                for key, _ in selector.select():
                    source = key.fileobj
                    if source is self._wake_r:
                        return
                    try:
                        data = source.recv(_CHUNK)  # type: ignore[union-attr]
                        if data:
                            (channel if source is conn else conn).sendall(data)
                            continue
                        selector.unregister(source)
                        open_sides -= 1
                        if source is conn:
                            channel.shutdown_write()
                        else:
                            conn.shutdown(socket.SHUT_WR)
                    except OSError:
                        return


# ------------------------------------------------------------------------------------------------ misc


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _timeout_message(name: str, command: str, timeout: float) -> str:
    return (
        f"command on {name} did not finish within {timeout:g} s and was killed: {command[:200]!r}. "
        "Give it a longer timeout or look for what hangs on the host."
    )
