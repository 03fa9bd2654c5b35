"""Downtime, always measured: an independent prober sends `/health` and the app's own request to the app's
port for the whole flow (rollback included), records every probe, and turns the record into outages.

Two threads, each with its own httpx client and its own way to the port (an SSH port forward on a remote
target, the port itself on a local one): `/health` every `health_every_s` (0.25 s), and the app's request
one at a time, `app_pause_s` after the previous answer, so the probe never floods a GPU that serves one
generation at a time. What the probes show (outages) is worked out in `flows/evidence/downtime.py`. The prober stops by itself after `max_duration_s`, and `stop()` waits a
bounded time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import httpx

from flows.box.common import run_logger, service_url
from flows.config.secrets import api_key
from flows.evidence.downtime import Downtime, Probe, ProbeKind, summarize
from flows.record.runlog import TOLD_BY_SUMMARY
from service.schema import ServiceHealth, serving

if TYPE_CHECKING:
    from flows.box.hosts import Host
    from flows.config.target import ProbeSettings, StartMode, Target
    from flows.record.rundir import RunRecord

STOP_WAIT_S = 5.0  # how long stop() waits for a probe in flight before leaving its answer out


class Prober:
    """Probes one service port from two threads until stopped (or `max_duration_s` passed)."""

    def __init__(
        self,
        open_url: Callable[[], AbstractContextManager[str]],
        app_request: dict[str, Any],
        settings: ProbeSettings,
        mode: StartMode = "stop-first",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.open_url, self.app_request, self.settings, self.mode = open_url, app_request, settings, mode
        self.headers = headers or {}
        self._probes: list[Probe] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._quiet = threading.Event()
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._t0 = 0.0
        self.started_at: str | None = None

    def start(self) -> Prober:
        self._t0 = time.monotonic()
        self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for kind in ("health", "app"):
            thread = threading.Thread(target=self._loop, args=(kind,), name=f"prober-{kind}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def stop(self) -> Downtime:
        """Stop probing and return the downtime. The record ends with a /health probe sent after this call
        (waited for up to `health_timeout_s` + 1 s), so it says how the service stands at the end of the run,
        not a moment before; then each thread is waited for at most about `STOP_WAIT_S`."""
        asked = self._elapsed()
        deadline = time.monotonic() + self.settings.health_timeout_s + 1.0
        health = [t for t in self._threads if t.name == "prober-health"]
        while (
            time.monotonic() < deadline
            and any(t.is_alive() for t in health)
            and not self._probed_since(asked)
        ):
            time.sleep(0.05)
        self._stop.set()
        deadline = time.monotonic() + STOP_WAIT_S + self.settings.health_timeout_s
        for thread in self._threads:
            thread.join(timeout=max(deadline - time.monotonic(), 0.1))
        with self._lock:
            self._closed = True  # a probe still in flight is left out
        return self.downtime()

    @contextmanager
    def quiet(self) -> Iterator[None]:
        """Hold back the app-request probe while the flow times its own requests (the GPU serves one at a
        time: a probe in the queue would show up in the benchmark's latencies); /health keeps probing."""
        self._quiet.set()
        try:
            yield
        finally:
            self._quiet.clear()

    def wait_for_next_health_probe(self) -> None:
        """Return once a /health probe sent after this call is recorded (at most `health_timeout_s` + 1 s),
        so that `downtime()` covers the present moment (the cut-over's outage has ended, or is still on)."""
        asked = self._elapsed()
        deadline = time.monotonic() + self.settings.health_timeout_s + 1.0
        while time.monotonic() < deadline and not self._stop.is_set() and not self._probed_since(asked):
            time.sleep(0.05)

    def _probed_since(self, at_s: float) -> bool:
        with self._lock:
            return any(p.kind == "health" and p.at_s >= at_s for p in self._probes)

    @property
    def probes(self) -> list[Probe]:
        with self._lock:
            return list(self._probes)

    def downtime(self) -> Downtime:
        """The downtime so far (the gate reads it while the prober runs)."""
        return summarize(self.probes, self.mode, self.started_at)

    def _elapsed(self) -> float:
        return time.monotonic() - self._t0

    def _loop(self, kind: ProbeKind) -> None:
        with httpx.Client() as client, ExitStack() as way:
            url: str | None = None
            while not self._stop.is_set() and self._elapsed() < self.settings.max_duration_s:
                if kind == "app" and self._quiet.is_set():
                    self._stop.wait(self.settings.health_every_s)
                    continue
                sent = self._elapsed()
                try:
                    url = url or way.enter_context(self.open_url())
                    probe = self._send(client, kind, url, sent)
                except Exception as exc:  # the SSH link is down: a failed probe; the next one tries again
                    probe = Probe(kind=kind, at_s=round(sent, 3), ok=False, latency_s=0.0, error=_short(exc))
                if probe.status is None:  # no answer: the next probe opens a fresh way (a new port forward)
                    way.close()
                    url = None
                with self._lock:
                    if self._closed:
                        return
                    self._probes.append(probe)
                wait = self.settings.health_every_s - (self._elapsed() - sent)
                self._stop.wait(max(wait, 0.0) if kind == "health" else self.settings.app_pause_s)

    def _send(self, client: httpx.Client, kind: ProbeKind, url: str, sent: float) -> Probe:
        started = time.monotonic()
        status, ok, error = None, False, ""
        try:
            if kind == "health":
                answer = client.get(f"{url}/health", timeout=self.settings.health_timeout_s)
                status = answer.status_code
                ok = status == 200 and serving(ServiceHealth.of(_json(answer)))
            else:
                answer = client.post(
                    f"{url}/generate",
                    json=self.app_request,
                    headers=self.headers,
                    timeout=self.settings.app_timeout_s,
                )
                status = answer.status_code
                body = _json(answer)
                ok = status == 200 and body.get("success") is True
                error = "" if ok else str(body.get("error_type") or body.get("error") or "")[:200]
        except httpx.HTTPError as exc:
            error = _short(exc)
        return Probe(
            kind=kind,
            at_s=round(sent, 3),
            ok=ok,
            status=status,
            latency_s=round(time.monotonic() - started, 3),
            error=error,
        )


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


def _json(answer: httpx.Response) -> dict[str, Any]:
    try:
        body = answer.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


@contextmanager
def watch_downtime(
    run: RunRecord, host: Host, target: Target, mode: StartMode = "stop-first"
) -> Iterator[Prober | None]:
    """Probe the app's port (`current.port`) until the run finishes; the downtime goes into its summary
    (and every probe into `downtime.json`) just before the summary is written for the last time."""
    settings = target.probe
    if not settings.enabled:
        yield None
        return
    key = api_key(target.new)
    prober = Prober(
        lambda: service_url(host, target.current.port),
        target.workload.app_request,
        settings,
        mode,
        headers={"Authorization": f"Bearer {key}"} if key else None,
    )
    recorded = False

    def record() -> None:
        nonlocal recorded
        if recorded:
            return
        recorded = True
        run.summary.downtime = downtime = prober.stop()
        run.write_json(
            "downtime.json", {**downtime.model_dump(), "probe_list": [p.model_dump() for p in prober.probes]}
        )
        run_logger().info("downtime: %s", downtime.describe(), extra={TOLD_BY_SUMMARY: True})

    run.before_finish.append(record)
    prober.start()
    try:
        yield prober
    finally:
        record()
        run.save()
