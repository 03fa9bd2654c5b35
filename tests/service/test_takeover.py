"""Staged start and port takeover (`serve --stage-port`): real `sdxl-deploy serve` processes, a real
listener holding the port, SIGUSR1 as the deploy's cut-over sends it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tests.support.servers import REPO, free_port, wait_ready

pytestmark = pytest.mark.slow


class OldHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = b'{"status": "healthy", "model": "old"}'
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def serve_process(
    port: int, stage_port: int, log: Path, module: str = "sdxl_deploy.cli"
) -> Iterator[subprocess.Popen]:
    argv = [sys.executable, "-m", module, "serve", "--model", "tiny-sd15", "--port", str(port)]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [*argv, "--stage-port", str(stage_port)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ,
        )
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def health(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()


def test_a_staged_service_takes_its_port_over_when_told_and_binds_it_directly_when_free(
    tmp_path: Path,
) -> None:
    port, stage_port, log = free_port(), free_port(), tmp_path / "serve.log"
    old = ThreadingHTTPServer(("127.0.0.1", port), OldHandler)
    threading.Thread(target=old.serve_forever, daemon=True).start()
    try:
        with serve_process(port, stage_port, log) as proc:
            wait_ready(f"http://127.0.0.1:{stage_port}", proc=proc, log=log)
            staged = health(stage_port)
            assert staged["listening"] == [stage_port] and staged["staged"] is True
            assert health(port)["model"] == "old"

            proc.send_signal(signal.SIGUSR1)  # told first; the port is still held: it keeps trying
            time.sleep(0.3)
            assert health(port)["model"] == "old" and proc.poll() is None
            assert (
                health(stage_port)["taking_over"] is True
            )  # what the deploy waits for before stopping the old
            old.shutdown()
            old.server_close()
            freed = time.monotonic()
            while True:
                try:
                    now = health(port)
                    break
                except httpx.TransportError:
                    assert time.monotonic() - freed < 1.0, "the port was not taken over within a second"
                    time.sleep(0.01)
            took = time.monotonic() - freed
            assert now["model"] == "tiny-sd15" and now["listening"] == [port] and now["staged"] is False
            assert now["taking_over"] is False
            assert took < 1.0
            with pytest.raises(httpx.ConnectError):  # the staging port is free for the next deploy
                health(stage_port)

        # A restart (the supervisor's after cut-over, or a rollback to this release) finds the port free.
        with serve_process(port, stage_port, log) as proc:
            wait_ready(f"http://127.0.0.1:{port}", proc=proc, log=log)
            again = health(port)
            assert again["listening"] == [port] and again["staged"] is False
    finally:
        old.server_close()
    assert "took port" in log.read_text()


def test_the_cut_over_signal_is_heard_after_native_code_took_sigusr1_over(tmp_path: Path) -> None:
    """libtriton (loaded by the first torch.compile on CUDA) puts its own SIGUSR1 handler over Python's; on
    the GPU the staged service then never heard the cut-over. Here native code sets SIG_IGN in the same
    way after start-up (tests/support/native_usr1.py): the takeover must still happen."""
    port, stage_port, log = free_port(), free_port(), tmp_path / "serve.log"
    old = ThreadingHTTPServer(("127.0.0.1", port), OldHandler)
    threading.Thread(target=old.serve_forever, daemon=True).start()
    try:
        with serve_process(port, stage_port, log, module="tests.support.native_usr1") as proc:
            wait_ready(f"http://127.0.0.1:{stage_port}", proc=proc, log=log)
            deadline = time.monotonic() + 30
            while "SIGUSR1 disposition set to SIG_IGN" not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.1)
            proc.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 5
            while not health(stage_port)["taking_over"]:
                assert time.monotonic() < deadline, "SIGUSR1 was lost: not taking_over after 5 s"
                time.sleep(0.02)
            old.shutdown()
            old.server_close()
            deadline = time.monotonic() + 5
            while True:
                try:
                    now = health(port)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the port was not taken over"
                    time.sleep(0.01)
            assert now["model"] == "tiny-sd15" and now["listening"] == [port]
            assert proc.poll() is None
    finally:
        old.server_close()


def test_a_staged_start_whose_staging_port_is_taken_fails_at_once_with_that_reason(tmp_path: Path) -> None:
    """Both the app's port (the old service) and the staging port held by other processes: the new service
    exits before it loads anything, saying which port is taken, in one line (no traceback)."""
    port = free_port()
    with socket.create_server(("127.0.0.1", port)), socket.create_server(("127.0.0.1", port + 1)):
        log = tmp_path / "serve.log"
        with serve_process(port, port + 1, log) as proc:
            assert proc.wait(timeout=60) == 1
        text = log.read_text()
    assert f"the staging port {port + 1} is in use too: nothing was started" in text, text
    assert "Traceback" not in text and "Loading" not in text, text
