"""Slow, oversized and hostile clients against real uvicorn configured as `sdxl-deploy serve`.

Slow headers, slow bodies, idle and oversized connections are cut off by the limits in
`service/settings.py` ("Limits and timeouts"); hostile strings in prompts, URL paths, the Host header
and the bind/model settings are data, never executed (a canary file is never created), and never
answered with a 5xx.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from service.client import decode_image
from service.settings import ServiceSettings
from tests.support.servers import REPO, free_port, settings_for, thread_server

SMALL = {"width": 64, "height": 64, "num_inference_steps": 1, "use_refiner": False}
LIMITS = {"header_timeout_s": 1.0, "body_timeout_s": 1.0, "keep_alive_s": 1.0, "max_header_bytes": 8192}


@pytest.fixture(scope="module")
def url(model_cache: Path) -> Iterator[str]:
    with thread_server(settings_for("tiny-sdxl", model_cache, **LIMITS)) as base:
        yield base


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _connect(url: str) -> socket.socket:
    sock = socket.create_connection(_address(url), timeout=10)
    sock.settimeout(10)
    return sock


def _read_until_closed(sock: socket.socket, limit_s: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (fails if it stays open)."""
    data, deadline = b"", time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"connection still open after {limit_s} s; got {data[:200]!r}")


def _raw(url: str, request: bytes) -> bytes:
    """Send raw bytes as one request and return the whole answer, read until the server closes.

    No half-close: uvicorn treats an EOF from the client as a hang-up and drops the request."""
    with _connect(url) as sock:
        sock.sendall(request)
        return _read_until_closed(sock)


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _healthy(url: str) -> bool:
    return httpx.get(f"{url}/health", timeout=5).json()["status"] == "healthy"


# ----- slow and oversized clients ----------------------------------------------------------------------


def test_slowloris_headers_are_cut_off_with_408(url: str) -> None:
    with _connect(url) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        started = time.monotonic()
        try:
            for i in range(40):  # one header line every 0.1 s: never finishes on its own
                sock.sendall(b"X-Slow-%d: y\r\n" % i)
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = _read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert elapsed < 4.5, elapsed
    assert _healthy(url)


def test_a_silent_connection_is_closed(url: str) -> None:
    with _connect(url) as sock:
        started = time.monotonic()
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408") and time.monotonic() - started < 3


@pytest.mark.parametrize("trickle", [False, True], ids=["stalled", "trickled"])
def test_slow_body_is_cut_off_with_a_json_408(url: str, trickle: bool) -> None:
    body = json.dumps({"prompt": "x", **SMALL}).encode()
    head = (
        b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    with _connect(url) as sock:
        sock.sendall(head + body[:5])
        started = time.monotonic()
        try:
            for byte in body[5:] if trickle else b"":
                sock.sendall(bytes([byte]))  # a byte every 0.1 s: slower than the whole-body deadline
                time.sleep(0.1)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = _read_until_closed(sock)
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert error == {
        "success": False,
        "error": "body: request body not received within 1 s",
        "error_type": "client_timeout",
    }
    assert elapsed < 3.5, elapsed
    assert _healthy(url)


def test_idle_keep_alive_connection_is_closed(url: str) -> None:
    with _connect(url) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        started = time.monotonic()
        answer = _read_until_closed(sock, limit_s=5)  # the answer, then the close
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"}")
        assert time.monotonic() - started < 3


def _refused_or_reset(answer: bytes) -> bool:
    """uvicorn's 400 (a head arriving in pieces past the limit), the app's 431 (a complete head past it),
    or a reset before the answer could be read (the server closed with our excess bytes unread)."""
    return answer == b"" or _status(answer) in (400, 431)


def test_oversized_head_is_refused_and_the_service_stays_up(url: str) -> None:
    huge_header = b"X-Big: " + b"a" * 10_000 + b"\r\n"  # over max_header_bytes=8192
    answer = _raw(url, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + huge_header + b"\r\n")
    assert _refused_or_reset(answer), answer[:200]
    long_path = b"/" + b"p" * 10_000
    answer = _raw(url, b"GET " + long_path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert _refused_or_reset(answer), answer[:200]
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(2000))  # many small headers, same limit
    answer = _raw(url, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + many + b"\r\n")
    assert _refused_or_reset(answer), answer[:200]
    assert _healthy(url)


def test_oversized_body_declared_and_streamed_gets_413(url: str) -> None:
    huge = json.dumps({"prompt": "x" * 100_000}).encode()
    declared = _raw(
        url,
        b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(huge),
    )
    assert _status(declared) == 413
    assert json.loads(declared.split(b"\r\n\r\n", 1)[1])["error_type"] == "validation"

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(huge), 4096):
            yield huge[i : i + 4096]

    streamed = httpx.post(f"{url}/generate", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and "exceeds the limit" in streamed.json()["error"]


def test_many_slow_connections_at_once_do_not_block_health(url: str) -> None:
    socks = [_connect(url) for _ in range(24)]
    try:
        for sock in socks:
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for _ in range(5):
            started = time.monotonic()
            assert _healthy(url)
            assert time.monotonic() - started < 1.0
            time.sleep(0.1)
        for sock in socks:
            assert _read_until_closed(sock).startswith(b"HTTP/1.1 408")
    finally:
        for sock in socks:
            sock.close()


# ----- hostile strings ------------------------------------------------------------------------------


def _hostile(canary: Path) -> list[str]:
    """Shell, template and format metacharacters, each of which would create `canary` if executed."""
    c = str(canary)
    return [
        f"$(touch {c})",
        f"`touch {c}`",
        f"x; touch {c}; echo",
        f"x' ; touch {c} ; '",
        f'x" && touch {c} && "',
        f"x | touch {c}",
        f"x\ntouch {c}\n",
        f"x\r\nX-Injected: 1\r\n\r\ntouch {c}",
        "{{7*7}} ${7*7} %s%s%n %(x)s {0.__class__}",
        "../../../../etc/passwd\x00.png",
        "Ω≈ç√∫ 🤖🎨 \u202eRTL\u202c e\u0301 " + "字" * 500,
    ]


def test_hostile_prompts_are_just_text(url: str, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    for prompt in _hostile(canary):
        answer = httpx.post(
            f"{url}/generate", json={"prompt": prompt, "negative_prompt": prompt, **SMALL}, timeout=120
        )
        assert answer.status_code == 200, (prompt, answer.text)
        assert decode_image(answer.json()["image"]).size == (64, 64)
    assert not canary.exists()
    assert _healthy(url)


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_very_long_unicode_prompt_gets_422_naming_the_field(url: str, field: str) -> None:
    text = "🤖字é\u202e" * 2500  # 10,000 characters, 25,000 UTF-8 bytes: under the body limit
    body = {"prompt": "x", **SMALL, field: text}
    answer = httpx.post(f"{url}/generate", json=body, timeout=60)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"].startswith(f"{field}: longer than 2000 characters")
    assert len(answer.text) < 1000  # the echoed value is shortened


def test_hostile_paths_and_host_headers_are_never_executed(url: str, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    c = str(canary).encode()
    paths = [
        b"/$(touch%20" + c + b")",
        b"/generate;touch%20" + c,
        b"/%60touch%20" + c + b"%60",
        b"/..%2f..%2f..%2fetc%2fpasswd",
        b"/%0d%0aSet-Cookie:%20x=1",
        b"/generate%00",
        b"/" + "字".encode() * 300,
        b"/health?x=$(touch%20" + c + b")&y=%27;rm%20-rf%20/",
    ]
    for path in paths:
        status = _status(
            _raw(url, b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        )
        assert status in (200, 400, 404, 405), (path, status)
    hosts = [b"$(touch " + c + b")", b"a;touch " + c, b"`touch " + c + b"`", b"'\"><script>", b"x" * 4000]
    for host in hosts:
        status = _status(
            _raw(url, b"GET /health HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n")
        )
        assert status in (200, 400), (host, status)
    assert not canary.exists()
    assert _healthy(url)


def test_hostile_bind_host_is_refused_and_never_executed(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    for host in (f"127.0.0.1; touch {canary}", f"$(touch {canary})", f"127.0.0.1\ntouch {canary}"):
        with pytest.raises(ValidationError, match="not a loopback address"):
            ServiceSettings(host=host)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "SDXL_HOST": f"$(touch {canary})"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdxl_deploy.cli",
            "serve",
            "--model",
            "tiny-sdxl",
            "--port",
            str(free_port()),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0 and "not a loopback address" in run.stdout + run.stderr
    assert not canary.exists()


def test_hostile_model_name_fails_to_load_without_executing(model_cache: Path, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    settings = settings_for("tiny-sdxl", model_cache)
    settings.model = f"$(touch {canary}); `touch {canary}`"
    with thread_server(settings, wait=False) as base:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            health = httpx.get(f"{base}/health", timeout=5).json()
            if health["status"] != "loading":
                break
            time.sleep(0.1)
        assert health["status"] == "unhealthy"
        answer = httpx.post(f"{base}/generate", json={"prompt": "x", **SMALL}, timeout=10)
        assert answer.status_code == 503 and answer.json()["error_type"] == "not_ready"
    assert not canary.exists()
