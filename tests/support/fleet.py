"""The fleet tests' bed: three boxes running the user's SD1.5 stand-in (h3 reached over a real sshd) behind a
real HAProxy, and a rollout run under a steady client load through it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows.box.hosts import LocalHost
from flows.box.ports import free_port
from flows.box.procs import find_service
from flows.config.fleet import Analysis, Fleet, FleetHost, LoadBalancer, Rollout
from flows.config.target import Target
from flows.evidence.results import ProcessInfo
from flows.runbooks.demo import TINY_REQUEST, start_current, stop_all
from flows.runbooks.fleet.flow import deploy_fleet
from flows.runbooks.fleet.haproxy import HAProxyAPI
from flows.runbooks.fleet.load import SteadyLoad
from flows.runbooks.fleet.summary import FleetSummary
from flows.stages.rollback import current_answers
from tests.support.flows import fast, is_legacy, legacy_target, ssh_connection
from tests.support.haproxy import haproxy
from tests.support.sshd import SSHServer

NAMES = ("h1", "h2", "h3")


@dataclass
class FleetBed:
    targets: dict[str, Target]
    api: HAProxyAPI
    url: str
    balancer: LoadBalancer
    before: dict[str, ProcessInfo]

    def fleet(self, **rollout: object) -> Fleet:
        analysis = Analysis(duration_s=20, requests=3, min_requests=1, max_latency_ratio=None)
        return Fleet(
            hosts=[FleetHost(name=name, target=target) for name, target in self.targets.items()],
            load_balancer=self.balancer,
            rollout=Rollout(analysis=analysis, progress_deadline_s=300, **rollout),
        )

    def serving(self, name: str) -> ProcessInfo | None:
        target = self.targets[name]
        return find_service(LocalHost(), target.current.port)


@pytest.fixture
def bed(tmp_path: Path, sshd: SSHServer) -> Iterator[FleetBed]:
    """Three boxes running the legacy stand-in (h3 reached over SSH) behind a real HAProxy."""
    host = LocalHost()
    targets = {}
    for name in NAMES:
        target = fast(legacy_target(tmp_path / f"box-{name}", free_port()))
        target = target.model_copy(
            update={"workload": target.workload.model_copy(update={"app_request": TINY_REQUEST})}
        )
        if name == "h3":
            target = target.model_copy(update={"connection": ssh_connection(sshd)})
        targets[name] = target
    try:
        for target in targets.values():
            start_current(host, target)
        servers = {name: t.current.port for name, t in targets.items()}
        with haproxy(servers, tmp_path / "haproxy") as proxy:
            balancer = LoadBalancer(socket=proxy.socket_path, drain_timeout_s=60, up_timeout_s=60)
            api = HAProxyAPI(balancer)
            for name in NAMES:
                api.wait_up(name, 10)
            before = {name: find_service(host, t.current.port) for name, t in targets.items()}
            yield FleetBed(targets, api, proxy.url, balancer, before)
    finally:
        for target in targets.values():
            stop_all(host, target)


def run_under_load(bed: FleetBed, tmp_path: Path, wheel: str, fleet: Fleet, **params: object):
    with SteadyLoad(bed.url, TINY_REQUEST) as load:
        state = deploy_fleet(
            fleet=fleet, wheel=wheel, runs_dir=str(tmp_path / "runs"), return_state=True, **params
        )
    outcome = state.result(raise_on_failure=False)
    run_dir = Path(outcome.run_dir)
    summary = FleetSummary.model_validate_json((run_dir / "summary.json").read_text())
    assert load.failed == 0, load.failures[:5]
    assert load.requests >= 20, load.summary()
    return state, summary, (run_dir / "report.md").read_text(), load


def answers_legacy(bed: FleetBed, name: str) -> bool:
    return is_legacy(current_answers(LocalHost(), bed.targets[name].current))


def model_of(bed: FleetBed, name: str) -> str | None:
    health = current_answers(LocalHost(), bed.targets[name].current)
    return health.model if health else None
