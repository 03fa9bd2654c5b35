"""`SSHHost`: a GPU box over SSH with paramiko.

Key auth only, host keys verified against known_hosts (`known_hosts.py`), timeouts and keepalive set on
purpose, a dropped link reconnected on the next call, one cached SFTP client, ports forwarded like
`ssh -L` (`forward.py`). A timed-out command's whole process group is killed on the box.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import paramiko
from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_fixed

from flows.box.hosts.base import READ_CHUNK, CommandResult, Host, decode_output, q, timeout_message
from flows.box.hosts.forward import PortForward
from flows.box.hosts.known_hosts import (
    UnknownHostPolicy,
    changed_key_message,
    load_known_hosts,
    revoked_message,
)
from flows.errors import CommandTimeout, HostError, HostKeyRejected, HostUnreachable

log = logging.getLogger(__name__)

_PID_MARK = "flows.hosts:pid="  # first stderr line of every SSH command, removed again


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
        revoked = load_known_hosts(self.known_hosts, client.get_host_keys())
        client.set_missing_host_key_policy(UnknownHostPolicy(self.known_hosts, self.trust_new_host, revoked))
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
            raise HostKeyRejected(
                changed_key_message(self.hostname, self.port, self.known_hosts, exc.key, exc.expected_key)
            ) from None
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
            raise HostKeyRejected(revoked_message(self.known_hosts, server_key))
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

    def run(self, command: str, timeout: float = 60.0, stdin: str | None = None) -> CommandResult:
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
                if stdin:
                    channel.sendall(stdin.encode())
                channel.shutdown_write()  # then EOF: a command that reads stdin sees its end
                out, err, finished = _collect(channel, time.monotonic() + timeout)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise self._lost(exc, f"running {command[:200]!r}") from None
            pid, err = _take_pid(err)
            if not finished:
                if pid:
                    self._kill_group(pid)
                raise CommandTimeout(timeout_message(self.name, command, timeout))
            if not channel.eof_received:  # closed without EOF: the link dropped, not the command
                raise HostUnreachable(
                    f"lost the connection to {self.name} while running {command[:200]!r}; it may or may not "
                    "have completed. The next call reconnects."
                )
            return CommandResult(command, channel.exit_status, decode_output(out), decode_output(err))

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
                    sftp = paramiko.SFTPClient.from_transport(
                        transport, window_size=8 * 1024 * 1024, max_packet_size=32 * 1024
                    )
                except (paramiko.SSHException, OSError, EOFError) as exc:
                    error = self._lost(exc, "opening SFTP")
                    if isinstance(error, HostUnreachable):
                        raise error from None
                    raise HostError(  # the link is up: the subsystem request was refused
                        f"opening SFTP on {self.name} failed ({exc or type(exc).__name__}): the server offers "
                        "no SFTP subsystem, which file transfers need (sshd_config on the box: `Subsystem sftp "
                        "internal-sftp`, or the path of its sftp-server; then reload sshd)"
                    ) from None
                assert sftp is not None
                try:
                    self._home = sftp.normalize(".")
                except (paramiko.SSHException, OSError, EOFError) as exc:
                    sftp.close()
                    raise self._lost(exc, "opening SFTP") from None
                self._sftp = sftp
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

        with PortForward(open_channel, local_port, f"{self.name} port {remote_port}") as forward:
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
                out += channel.recv(READ_CHUNK)
            while channel.recv_stderr_ready():
                err += channel.recv_stderr(READ_CHUNK)
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
