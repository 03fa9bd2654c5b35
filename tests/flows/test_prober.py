"""The downtime prober: outage arithmetic on recorded probes, the prober against a real HTTP server that
goes down and comes back, its pace and its bounded stop, and a real stop-first deploy and rollback."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from bench.launch import free_port
from flows.box.hosts import LocalHost
from flows.config.target import DEFAULT_CRITERIA, Criterion, ProbeSettings, Target
from flows.evidence.downtime import Probe, find_outages, summarize
from flows.evidence.gates import Evidence, criteria_for_mode, judge
from flows.record.prober import Prober
from flows.runbooks.rollback import rollback_sdxl
from flows.runbooks.runbook import deploy_sdxl
from tests.support.flows import summary_of
from tests.support.legacy_api import Handler

APP_REQUEST = {"prompt": "a lighthouse", "width": 64, "height": 64}


def probes(*marks: str, kind: str = "health", every: float = 0.25) -> list[Probe]:
    """A probe record from a string of marks: '+' a success, '-' a failure, one every `every` s."""
    return [
        Probe(kind=kind, at_s=i * every, ok=m == "+", status=200 if m == "+" else None, latency_s=0.01)
        for i, m in enumerate("".join(marks))
    ]


# ---------------------------------------------------------------- outage arithmetic


def test_an_outage_runs_from_the_last_success_before_to_the_first_success_after() -> None:
    record = probes("+++", "----", "++", "-", "+")  # t = 0, 0.25 .. 2.5
    outages = find_outages(record)
    assert [(o.start_s, o.end_s, o.failed, o.ended) for o in outages] == [
        (0.5, 1.75, 4, True),
        (2.0, 2.5, 1, True),
    ]
    downtime = summarize(record, "stop-first")
    assert downtime.longest_outage_s == 1.25 and downtime.total_outage_s == 1.75
    assert (downtime.failed_requests, downtime.probes, downtime.outages) == (5, 11, 2)
    assert not downtime.still_down


def test_no_failure_is_no_outage_and_an_unended_outage_is_still_down() -> None:
    healthy = summarize(probes("++++"), "stop-first")
    assert (healthy.longest_outage_s, healthy.failed_requests, healthy.outages) == (0.0, 0, 0)
    assert summarize([], "stop-first").describe() == "stop-first: no probe was sent"

    down = summarize(probes("++", "---"), "stop-first")  # never came back: up to the last probe
    assert down.still_down and down.longest_outage_s == 0.75 and "STILL DOWN" in down.describe()
    started_down = find_outages(probes("---", "+"))  # no success before: from the first probe
    assert [(o.start_s, o.end_s) for o in started_down] == [(0.0, 0.75)]


def test_both_kinds_of_probe_form_one_time_line() -> None:
    health = probes("+", "-", "-", "-", "+")  # 0, 0.25 .. 0.75 down, 1.0 up
    app = [
        Probe(kind="app", at_s=0.6, ok=False, status=503, latency_s=0.01),
        Probe(kind="app", at_s=1.1, ok=True, status=200, latency_s=0.4),
    ]
    downtime = summarize(health + app, "stop-first")
    assert downtime.outages == 1 and downtime.longest_outage_s == 1.0
    assert (downtime.failed_requests, downtime.failed_app_requests, downtime.app_requests) == (4, 1, 2)


def test_the_downtime_gate_reports_the_longest_outage_and_blocks_only_when_enforced() -> None:
    downtime = summarize(probes("++", "-" * 12, "+"), "stop-first")  # 3.25 s
    report_only = Criterion(name="max_downtime_s", threshold=1.0, enforce=False)
    default = DEFAULT_CRITERIA[-1]
    assert default == Criterion(name="max_downtime_s", threshold=5.0)  # enforced: a staged deploy's bound
    assert criteria_for_mode([default], "stop-first")[0].enforce is False  # report-only for stop-first
    assert criteria_for_mode([default], "staged")[0].enforce is True
    rows = judge([report_only], Evidence(downtime=downtime)).rows
    assert rows[0].verdict == "warn" and "longest outage 3.25 s" in rows[0].observed
    enforced = judge([report_only.model_copy(update={"enforce": True})], Evidence(downtime=downtime))
    assert not enforced.passed and enforced.rows[0].verdict == "fail"
    assert judge([report_only.model_copy(update={"threshold": 5.0})], Evidence(downtime=downtime)).rows[
        0
    ].verdict == ("pass")
    assert judge([report_only], Evidence()).rows[0].verdict == "n/a"


# ---------------------------------------------------------------- the prober against a real server


class _Service:
    """The legacy stand-in on a fixed port, in this process, that can be stopped and started again; its
    `/generate` takes `generate_s` and counts how many run at once."""

    def __init__(self, port: int, generate_s: float = 0.0) -> None:
        self.port, self.generate_s = port, generate_s
        self.in_flight = self.most_in_flight = self.generated = 0
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        service = self

        class Slow(Handler):
            def do_POST(self) -> None:  # noqa: N802
                with service.lock:
                    service.in_flight += 1
                    service.most_in_flight = max(service.most_in_flight, service.in_flight)
                time.sleep(service.generate_s)
                try:
                    super().do_POST()
                finally:
                    with service.lock:
                        service.in_flight -= 1
                        service.generated += 1

            def log_message(self, *args: object) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Slow)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def running(service: _Service) -> Iterator[_Service]:
    service.start()
    try:
        yield service
    finally:
        service.stop()


def _prober(port: int, **settings: float) -> Prober:
    return Prober(
        lambda: nullcontext(f"http://127.0.0.1:{port}"),
        APP_REQUEST,
        ProbeSettings(**{"health_every_s": 0.05, "app_pause_s": 0.1, **settings}),
    )


def test_the_prober_measures_a_real_outage() -> None:
    service = _Service(free_port())
    with running(service):
        prober = _prober(service.port).start()
        time.sleep(0.6)
    time.sleep(1.0)  # down: connection refused
    with running(service):
        time.sleep(0.6)
        downtime = prober.stop()
    assert downtime.outages == 1 and not downtime.still_down
    assert 0.95 <= downtime.longest_outage_s <= 1.6, downtime
    assert downtime.failed_requests >= 10 and downtime.app_requests >= 4 and downtime.failed_app_requests >= 1
    failed = [p for p in prober.probes if not p.ok]
    assert all(p.status is None for p in failed)  # no answer at all while down
    # refused connections, but for a probe of each thread in flight when the server went away
    assert sum("Connect" not in p.error for p in failed) <= 2, [p.error for p in failed]


def test_the_record_ends_with_a_probe_sent_after_stop() -> None:
    """A service back up the moment the flow ends is recorded as back, not as still down: stop() waits for
    one /health probe sent after it was called."""
    service = _Service(free_port())
    prober = _prober(service.port, health_every_s=0.5).start()
    time.sleep(1.2)  # down: connection refused
    with running(service):
        downtime = prober.stop()
    assert not downtime.still_down and downtime.outages == 1, downtime
    assert [p for p in prober.probes if p.kind == "health"][-1].ok


def test_app_requests_go_one_at_a_time_at_their_own_pace() -> None:
    service = _Service(free_port(), generate_s=0.3)
    with running(service):
        prober = _prober(service.port, app_pause_s=0.2).start()
        time.sleep(2.0)
        downtime = prober.stop()
    assert service.most_in_flight == 1
    # 0.3 s per answer + 0.2 s pause: at most 4-5 in 2 s (a flood would be dozens)
    assert 3 <= downtime.app_requests <= 5 and downtime.failed_requests == 0
    health = [p for p in prober.probes if p.kind == "health"]
    assert len(health) >= 20 and downtime.longest_outage_s == 0.0


def test_quiet_holds_back_app_requests_and_keeps_probing_health() -> None:
    service = _Service(free_port())
    with running(service):
        prober = _prober(service.port).start()
        time.sleep(0.5)
        with prober.quiet():
            time.sleep(0.3)  # an app request in flight when quiet began finishes
            app_before = service.generated
            health_before = sum(p.kind == "health" for p in prober.probes)
            time.sleep(1.0)
            assert service.generated == app_before  # none sent while the flow times its own requests
            assert sum(p.kind == "health" for p in prober.probes) >= health_before + 10
        time.sleep(0.5)
        downtime = prober.stop()
    assert service.generated > app_before and downtime.failed_requests == 0


def test_the_prober_stops_by_itself_and_stop_is_bounded() -> None:
    service = _Service(free_port(), generate_s=30.0)  # an app request that hangs
    with running(service):
        prober = _prober(service.port, max_duration_s=0.5, health_timeout_s=1.0).start()
        time.sleep(1.0)
        assert not any(t.is_alive() for t in prober._threads if t.name == "prober-health")
        began = time.monotonic()
        downtime = prober.stop()
        assert time.monotonic() - began < 8  # STOP_WAIT_S + health_timeout_s, not the 30 s request
        count = downtime.probes
        time.sleep(0.3)
        assert len(prober.probes) == count  # nothing recorded after stop
        service.generate_s = 0.0


# ---------------------------------------------------------------- a real deploy and rollback


@pytest.mark.slow
def test_a_stop_first_deploy_and_its_rollback_record_their_outages(
    prefect_api: None, legacy: tuple[LocalHost, Target], wheel: str, tmp_path: Path
) -> None:
    host, target = legacy
    # Not what this test is about: the shared test machine can be slow.
    lenient = [
        c.model_copy(update={"threshold": 600}) if c.name == "p95_seconds" else c for c in target.criteria
    ]
    target = target.model_copy(update={"criteria": lenient})
    runs = str(tmp_path / "runs")
    deployed = deploy_sdxl(target=target, wheel=wheel, runs_dir=runs, return_state=True)
    assert deployed.is_completed(), deployed.message
    summary = summary_of(deployed)
    downtime = summary["downtime"]
    assert downtime["mode"] == "stop-first"
    assert downtime["longest_outage_s"] > 0 and downtime["failed_requests"] > 0 and downtime["probes"] > 0
    assert downtime["app_requests"] > 0 and not downtime["still_down"]
    gate = {g["criterion"]: g for g in summary["gates"]}["max_downtime_s"]
    assert gate["verdict"] == "warn" and "longest outage" in gate["observed"]  # report-only for stop-first
    run_dir = Path(summary["run_dir"])
    record = json.loads((run_dir / "downtime.json").read_text())
    assert len(record["probe_list"]) == downtime["probes"]
    assert f"longest outage {downtime['longest_outage_s']:.2f} s" in (run_dir / "report.md").read_text()

    rolled = rollback_sdxl(target=target, runs_dir=runs, return_state=True)
    assert rolled.is_completed(), rolled.message
    back = summary_of(rolled)["downtime"]
    assert back["longest_outage_s"] > 0 and back["failed_requests"] > 0 and not back["still_down"]
