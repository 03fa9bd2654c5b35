"""A steady client load through the load balancer: client threads send the app's request in a loop and counts
the answers. A request fails unless it is answered 200, or 429 (the service's queue is full: the app retries).
The demo runs it over the whole rollout; so do the fleet tests."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import httpx

OK_STATUSES = (200, 429)


class SteadyLoad:
    """`clients` threads each send `payload` to `url` + /generate in a loop until stopped (a context manager)."""

    def __init__(
        self,
        url: str,
        payload: dict[str, Any],
        clients: int = 1,
        pause_s: float = 0.05,
        timeout_s: float = 120.0,
    ) -> None:
        self.url, self.payload, self.pause_s, self.timeout_s = url.rstrip("/"), payload, pause_s, timeout_s
        self.statuses: Counter[str] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, name=f"steady-load-{i}", daemon=True) for i in range(clients)
        ]

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def failed(self) -> int:
        return len(self.failures)

    def _loop(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(f"{self.url}/generate", json=self.payload)
                    status = str(response.status_code)
                    if response.status_code not in OK_STATUSES:
                        self.failures.append(f"{status}: {response.text[:200]}")  # list.append: thread-safe
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                    self.failures.append(f"{status}: {exc}")
                with self._lock:
                    self.statuses[status] += 1
                self._stop.wait(self.pause_s)

    def __enter__(self) -> SteadyLoad:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 5)

    def summary(self) -> dict[str, Any]:
        return {"requests": self.requests, "failed_requests": self.failed, "statuses": dict(self.statuses)}


def wait_for(condition: Any, timeout_s: float, poll_s: float = 0.1) -> bool:
    """Poll `condition()` until true or the timeout; whether it became true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return False
