"""The host-access layer against this machine and a real OpenSSH server on loopback (tests/support/sshd.py)."""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from bench.launch import free_port
from flows.box.hostfs import run_checked
from flows.box.hosts import (
    CommandFailed,
    CommandTimeout,
    Host,
    HostError,
    HostKeyRejected,
    HostUnreachable,
    LocalHost,
    SSHHost,
    q,
)
from tests.support.sshd import SSHServer, _keygen


@pytest.fixture(params=["local", "ssh"])
def host(request: pytest.FixtureRequest) -> Iterator[Host]:
    """The behaviour both kinds of host share is tested on both."""
    if request.param == "local":
        with LocalHost() as local:
            yield local
    else:
        yield request.getfixturevalue("ssh_host")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


# -------------------------------------------------------------------------------------------- commands


def test_run_returns_exit_code_stdout_and_stderr(host: Host) -> None:
    result = host.run("echo out; echo err >&2; printf 'ünïcode'; exit 3")
    assert (result.exit_code, result.stdout, result.stderr) == (3, "out\nünïcode", "err\n")
    assert not result.ok
    assert host.run("[[ 1 == 1 ]] && echo bash").stdout == "bash\n"  # bash semantics on both
    assert host.run("cat").stdout == ""  # stdin is empty, never a hang


def test_fast_commands_never_lose_output_that_arrives_with_eof(ssh_host: SSHHost) -> None:
    """Output and EOF arriving together while the reader is between two checks must not be dropped.

    Thread switches every microsecond make that window likely: the old reader lost ~5 in 300 outputs
    here (empty stdout, exit 0), which CI met as a deploy lock left held and an IndexError in preflight.
    """
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        outputs = [ssh_host.run(f"printf 'line %s' {i}").stdout for i in range(200)]
    finally:
        sys.setswitchinterval(previous)
    assert [i for i, text in enumerate(outputs) if text != f"line {i}"] == []


def test_non_zero_exit_does_not_raise_but_run_checked_does(host: Host) -> None:
    failing = "echo 'disk full' >&2; exit 7"
    assert host.run(failing).exit_code == 7
    with pytest.raises(CommandFailed, match=r"restarting the service failed on .* \(exit 7\): disk full"):
        run_checked(host, failing, "restarting the service")
    assert run_checked(host, "echo fine", "doing nothing") == "fine\n"


def test_a_timeout_raises_and_kills_the_whole_command(host: Host, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    started = time.monotonic()
    # 2 s: time for the shell to start and write its PIDs on a machine busy with other tests
    with pytest.raises(CommandTimeout, match="did not finish within 2 s"):
        host.run(f"echo $$ > {q(pids)}; sleep 30 & echo $! >> {q(pids)}; wait", timeout=2)
    assert time.monotonic() - started < 5
    shell, child = (int(pid) for pid in pids.read_text().split())
    deadline = time.monotonic() + 3
    while (alive(shell) or alive(child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(shell) and not alive(child)
    assert host.run("echo still usable").stdout == "still usable\n"


def test_q_makes_a_hostile_string_one_verbatim_argument(host: Host, tmp_path: Path) -> None:
    home, marker = tmp_path / "home", tmp_path / "pwned"
    (home / "canary").mkdir(parents=True)
    hostile = (
        f"; rm -rf ~\n$(touch {marker}) `touch {marker}` 'single' \"double\" \\ $HOME * && touch {marker}"
    )
    # HOME points at a throwaway folder: were the quoting broken, `rm -rf ~` would only hit the canary.
    result = host.run(f'export HOME={q(home)}; set -- {q(hostile, "second")}; printf "%s|%s" "$#" "$1"')
    assert result.ok and result.stdout == f"2|{hostile}"
    assert not marker.exists()
    assert (home / "canary").is_dir()
    assert q("plain", Path("/a b")) == "plain '/a b'"


# ----------------------------------------------------------------------------------------------- files


def test_put_and_get_round_trip_a_binary_file_with_a_hostile_name(host: Host, tmp_path: Path) -> None:
    name = "we ird 'single' \"double\" $(touch pwned) `touch pwned` ;.bin"
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(2 * 1024 * 1024) + bytes(range(256)))
    remote_dir = tmp_path / "remote dir $(x)"
    remote_dir.mkdir()
    remote = str(remote_dir / name)

    host.put(source, remote)
    hashed = run_checked(host, f"sha256sum -- {q(remote)}", "hashing the upload")
    assert hashed.split()[0] == sha256(source) == sha256(Path(remote))
    back = tmp_path / "back.bin"
    host.get(remote, back)
    assert sha256(back) == sha256(source)
    assert not list(tmp_path.rglob("pwned")) and not Path("pwned").exists()


def test_put_into_a_missing_folder_says_so(host: Host, tmp_path: Path) -> None:
    source = tmp_path / "f.txt"
    source.write_text("x")
    with pytest.raises(HostError, match="folder must exist"):
        host.put(source, str(tmp_path / "missing" / "f.txt"))
    with pytest.raises(HostError, match="no such local file"):
        host.put(tmp_path / "nope", str(tmp_path / "f2.txt"))


def test_tilde_paths_expand_to_the_host_home(host: Host, tmp_path: Path) -> None:
    name = f"flows-hosts-test-{uuid.uuid4().hex}.txt"
    source, back = tmp_path / "source.txt", tmp_path / "back.txt"
    source.write_text("home sweet home\n")
    try:
        host.put(source, f"~/{name}")
        assert (Path.home() / name).read_text() == "home sweet home\n"
        assert host.run(f"cat ~/{q(name)}").stdout == "home sweet home\n"
        host.get(f"~/{name}", back)
        assert back.read_text() == "home sweet home\n"
    finally:
        (Path.home() / name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- ports


class _Handler(http.server.BaseHTTPRequestHandler):
    barrier: threading.Barrier

    def do_GET(self) -> None:
        if self.path == "/together":  # answers only while two requests are in flight at once
            self.barrier.wait(timeout=5)
        self._answer(self.path.encode())

    def do_POST(self) -> None:
        self._answer(self.rfile.read(int(self.headers["Content-Length"])))

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    """A tiny HTTP server on 127.0.0.1 (on the "remote" side: sshd runs on this machine too)."""
    handler = type("Handler", (_Handler,), {"barrier": threading.Barrier(2)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_forward_relays_requests_and_concurrent_connections(host: Host, http_port: int) -> None:
    body = os.urandom(1024 * 1024)
    with host.forward(http_port) as port:
        assert (port == http_port) is not host.is_remote
        url = f"http://127.0.0.1:{port}"
        for i in range(3):  # a new connection each time
            assert httpx.get(f"{url}/ping/{i}", timeout=5).text == f"/ping/{i}"
        assert httpx.post(url, content=body, timeout=10).content == body
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda _: httpx.get(f"{url}/together", timeout=10), range(2)))
        assert [a.status_code for a in answers] == [200, 200]
    if host.is_remote:
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, timeout=2)


def test_forward_to_a_port_nobody_listens_on_fails_the_request_not_the_host(ssh_host: SSHHost) -> None:
    chosen = free_port()
    with ssh_host.forward(free_port(), local_port=chosen) as port, pytest.raises(httpx.TransportError):
        assert port == chosen
        httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
    assert ssh_host.run("echo fine").stdout == "fine\n"


# ----------------------------------------------------------------------------------- SSH: trust, links


def test_connect_time(sshd: SSHServer) -> None:
    started = time.monotonic()
    with sshd.host():
        elapsed = time.monotonic() - started
    print(f"SSH connect (key auth, pinned host key): {elapsed * 1000:.0f} ms")
    assert elapsed < 2


def test_an_unknown_host_key_is_refused_unless_trusted_on_first_use(sshd: SSHServer, tmp_path: Path) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with pytest.raises(HostKeyRejected, match=r"not in .*ssh-ed25519 SHA256:\S+.*trust_new_host"):
        sshd.host(known_hosts=empty)

    known_hosts = tmp_path / "new .ssh" / "known_hosts"  # does not exist yet
    with sshd.host(known_hosts=known_hosts, trust_new_host=True) as trusting:
        assert trusting.run("echo trusted").stdout == "trusted\n"
    assert known_hosts.read_text().startswith(f"{sshd.host_id} ssh-ed25519 ")
    assert known_hosts.read_text().split()[2] == sshd.known_hosts.read_text().split()[2]
    with sshd.host(known_hosts=known_hosts) as again:  # remembered: no flag needed now
        assert again.run("echo known").stdout == "known\n"


def test_a_changed_host_key_is_refused_even_with_trust_new_host(private_sshd: SSHServer) -> None:
    with private_sshd.host() as before:
        assert before.run("true").ok
    private_sshd.restart_with_new_host_key()
    remembered = private_sshd.known_hosts.read_text()
    for trust in (False, True):
        with pytest.raises(HostKeyRejected, match=r"HOST KEY CHANGED .*ssh-keygen -R"):
            private_sshd.host(trust_new_host=trust)
    assert private_sshd.known_hosts.read_text() == remembered


def test_a_closed_port_is_unreachable_quickly(tmp_path: Path) -> None:
    host = SSHHost("127.0.0.1", port=free_port(), known_hosts=tmp_path / "kh", connect_timeout=2)
    started = time.monotonic()
    with pytest.raises(HostUnreachable, match="cannot reach root@127.0.0.1"):
        host.run("true")
    assert time.monotonic() - started < 2.5


def test_a_server_that_never_answers_times_out(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts TCP, never sends an SSH banner
        host = SSHHost(
            "127.0.0.1", port=silent.getsockname()[1], known_hosts=tmp_path / "kh", connect_timeout=1
        )
        started = time.monotonic()
        with pytest.raises(HostUnreachable):
            host.run("true")
        assert time.monotonic() - started < 3


def test_a_wrong_key_is_an_auth_error_not_unreachable(sshd: SSHServer, tmp_path: Path) -> None:
    _keygen(tmp_path / "stranger")
    with pytest.raises(HostError, match="authentication as .* failed") as failure:
        sshd.host(key_filename=str(tmp_path / "stranger"))
    assert not isinstance(failure.value, HostUnreachable)
    with pytest.raises(HostError, match="does not exist"):
        sshd.host(key_filename=str(tmp_path / "no such key"))


def test_a_dropped_link_is_unreachable_and_the_next_call_reconnects(private_sshd: SSHServer) -> None:
    with private_sshd.host() as host:
        timer = threading.Timer(0.5, private_sshd.drop_connections)
        timer.start()
        started = time.monotonic()
        with pytest.raises(HostUnreachable, match="lost the connection"):
            host.run("sleep 10")
        assert time.monotonic() - started < 3
        timer.join()
        assert host.run("echo back").stdout == "back\n"
        private_sshd.drop_connections()  # dropped while idle: noticed and repaired on the next call
        time.sleep(0.2)
        assert host.run("echo again").stdout == "again\n"


def test_known_hosts_as_openssh_writes_it_and_revoked_keys(sshd: SSHServer, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    entry = sshd.known_hosts.read_text()
    known_hosts.write_text(entry)
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(known_hosts)], check=True, capture_output=True)
    hashed = known_hosts.read_text()
    assert sshd.host_id not in hashed and hashed.startswith("|1|")
    known_hosts.write_text(
        f"# comment\n@cert-authority *.example.com {entry.split(' ', 1)[1]}garbage\n{hashed}"
    )
    with sshd.host(known_hosts=known_hosts) as host:
        assert host.run("echo hashed").stdout == "hashed\n"

    known_hosts.write_text(f"{entry}@revoked * {entry.split(' ', 1)[1]}")
    for trust in (False, True):
        with pytest.raises(HostKeyRejected, match="@revoked"):
            sshd.host(known_hosts=known_hosts, trust_new_host=trust)
