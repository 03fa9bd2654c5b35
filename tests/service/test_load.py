"""A bounded load test of a real `sdxl-deploy serve` process (tiny-sdxl on the CPU, loopback only).

200 requests from 32 concurrent clients against a queue of 8: nothing crashes, overflow answers 429
with Retry-After, every accepted request returns a valid image, `/health` answers throughout, the
server's own counters match what the clients saw (nothing lost), memory stays bounded, and the API
key the clients send never shows up in the service's log or in any open endpoint.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from service.client import decode_image
from tests.support.servers import served_process

REQUESTS, CONCURRENCY, MAX_QUEUE = 200, 32, 8
TIME_LIMIT_S = 180.0
API_KEY = "load-key-Zq9-never-logged"
BODY = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "num_inference_steps": 2}
RSS_GROWTH_LIMIT_MB = 300


@dataclass
class Service:
    url: str
    pid: int
    log: Path


@pytest.fixture(scope="module")
def service(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """`sdxl-deploy serve` in its own process, with an API key from the environment and an info log."""
    log = tmp_path_factory.mktemp("load") / "service.log"
    env = {
        "SDXL_DEPLOY_CACHE": str(model_cache),
        "SDXL_CACHE_DIR": str(model_cache),
        "SDXL_API_KEY": API_KEY,
        "SDXL_MAX_QUEUE": str(MAX_QUEUE),
        "SDXL_LOG_LEVEL": "info",
    }
    with served_process("tiny-sdxl", env=env, log=log) as (url, proc):
        yield Service(url, proc.pid, log)
        assert proc.poll() is None, "the service died under load"


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@dataclass
class LoadResult:
    statuses: Counter[int] = field(default_factory=Counter)
    bad_images: list[str] = field(default_factory=list)
    missing_retry_after: int = 0
    health_polls: int = 0
    health_failures: list[str] = field(default_factory=list)
    health_worst_s: float = 0.0
    rss_peak_mb: float = 0.0
    seconds: float = 0.0


async def run_load(service: Service) -> LoadResult:
    result = LoadResult()
    sent = 0
    done = asyncio.Event()
    auth = {"Authorization": f"Bearer {API_KEY}"}
    limits = httpx.Limits(max_connections=CONCURRENCY + 4)

    async with httpx.AsyncClient(base_url=service.url, timeout=120, limits=limits) as http:

        async def client() -> None:
            nonlocal sent
            while sent < REQUESTS:
                sent += 1
                answer = await http.post("/generate", json=BODY, headers=auth)
                result.statuses[answer.status_code] += 1
                if answer.status_code == 200:
                    try:
                        assert decode_image(answer.json()["image"]).size == (64, 64)
                    except Exception as exc:  # noqa: BLE001 - counted and asserted below
                        result.bad_images.append(repr(exc))
                elif answer.status_code == 429:
                    if (
                        answer.headers.get("retry-after") != "2"
                        or answer.json()["error_type"] != "overloaded"
                    ):
                        result.missing_retry_after += 1
                    await asyncio.sleep(float(answer.headers.get("retry-after", 2)))  # as a polite client

        async def watch() -> None:
            async with httpx.AsyncClient(base_url=service.url, timeout=3.0) as probe:
                while not done.is_set():
                    started = time.perf_counter()
                    try:
                        health = await probe.get("/health")
                        if health.status_code != 200:
                            result.health_failures.append(f"status {health.status_code}")
                    except httpx.HTTPError as exc:
                        result.health_failures.append(repr(exc))
                    result.health_worst_s = max(result.health_worst_s, time.perf_counter() - started)
                    result.health_polls += 1
                    result.rss_peak_mb = max(result.rss_peak_mb, rss_mb(service.pid))
                    await asyncio.sleep(0.2)

        started = time.perf_counter()
        watcher = asyncio.create_task(watch())
        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(CONCURRENCY))), TIME_LIMIT_S)
        result.seconds = time.perf_counter() - started
        done.set()
        await watcher
    return result


def test_200_requests_at_concurrency_32(service: Service) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    for _ in range(3):  # warm up: first requests allocate the working set
        assert httpx.post(f"{service.url}/generate", json=BODY, headers=auth, timeout=120).status_code == 200
    rss_before = rss_mb(service.pid)

    result = asyncio.run(run_load(service))

    rss_after = rss_mb(service.pid)
    print(
        f"\nload: {sum(result.statuses.values())} requests in {result.seconds:.1f} s, "
        f"statuses {dict(result.statuses)}, health polls {result.health_polls} "
        f"(worst {result.health_worst_s * 1000:.0f} ms), RSS {rss_before:.0f} MB before, "
        f"{result.rss_peak_mb:.0f} MB peak, {rss_after:.0f} MB after"
    )
    assert sum(result.statuses.values()) == REQUESTS
    assert set(result.statuses) <= {200, 429}, result.statuses
    assert result.statuses[200] > MAX_QUEUE and result.statuses[429] > 0, result.statuses
    assert result.bad_images == [] and result.missing_retry_after == 0
    assert result.health_polls >= 5 and result.health_failures == [], result.health_failures
    assert rss_after - rss_before < RSS_GROWTH_LIMIT_MB, (rss_before, rss_after)
    assert result.rss_peak_mb - rss_before < RSS_GROWTH_LIMIT_MB, (rss_before, result.rss_peak_mb)

    health = httpx.get(f"{service.url}/health", timeout=5).json()
    assert health["status"] == "healthy" and health["queue_depth"] == 0
    metrics = httpx.get(f"{service.url}/metrics", headers=auth, timeout=5).text
    # nothing lost: the server counted exactly what the clients saw (3 warm-up requests included)
    ok = result.statuses[200] + 3
    assert f'sdxl_requests_total{{route="/generate",status="200"}} {ok}.0' in metrics
    assert f'sdxl_requests_total{{route="/generate",status="429"}} {result.statuses[429]}.0' in metrics


def test_api_key_is_required_and_never_leaks(service: Service) -> None:
    """Runs after the load test: the key was sent 200+ times, yet appears in no log line and no answer."""
    assert httpx.post(f"{service.url}/generate", json=BODY, timeout=60).status_code == 401
    wrong = httpx.post(
        f"{service.url}/generate", json=BODY, headers={"Authorization": f"Bearer {API_KEY[:-1]}"}, timeout=60
    )
    assert wrong.status_code == 401 and API_KEY[:-1] not in wrong.text
    assert httpx.get(f"{service.url}/metrics", timeout=5).status_code == 401
    for path in ("/health", "/ready", "/openapi.json", "/docs"):
        answer = httpx.get(f"{service.url}{path}", timeout=5)
        assert answer.status_code == 200 and API_KEY not in answer.text, path
    metrics = httpx.get(f"{service.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    assert API_KEY not in metrics
    time.sleep(0.5)  # let the log reach the file
    log = service.log.read_text()
    assert '"POST /generate HTTP/1.1" 200' in log  # access logging was on while the key was used
    assert API_KEY not in log and API_KEY[:-1] not in log
