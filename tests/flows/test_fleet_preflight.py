"""The fleet's preflight (flows/runbooks/fleet/preflight.py): every host's deploy preflight before the canary
is touched, on real `LocalHost` boxes in temporary folders; no balancer, no service is started."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from rich.console import Console

from flows.config.fleet import Fleet, FleetHost, LoadBalancer
from flows.config.target import NewService, Target
from flows.errors import PreflightRefused
from flows.runbooks.fleet.commands import print_fleet
from flows.runbooks.fleet.flow import deploy_fleet
from flows.runbooks.fleet.preflight import check_hosts
from tests.support.flows import cli_console


def _target(box: Path, model: str, **request: object) -> Target:
    target = Target(new=NewService(model=model, python=sys.executable, install_dir=str(box / "sdxl-deploy")))
    app = {**target.workload.app_request, "width": 64, "height": 64, **request}
    criteria = [
        c.model_copy(update={"threshold": 64}) if c.name == "resolution" else c for c in target.criteria
    ]
    workload = target.workload.model_copy(update={"app_request": app})
    return target.model_copy(update={"workload": workload, "criteria": criteria})


def _fleet(tmp_path: Path) -> tuple[Fleet, dict[str, Target]]:
    """Three hosts: the second's model misspelt, the third's app request outside the model's bounds."""
    hosts = {
        "h1": _target(tmp_path / "h1", "tiny-sdxl"),
        "h2": _target(tmp_path / "h2", "sdxll"),
        "h3": _target(tmp_path / "h3", "tiny-sdxl", width=1001),
    }
    fleet = Fleet(
        hosts=[FleetHost(name=name, target=target) for name, target in hosts.items()],
        load_balancer=LoadBalancer(socket=str(tmp_path / "haproxy.sock")),
    )
    return fleet, hosts


def test_a_misspelt_model_on_any_host_refuses_the_whole_rollout_naming_the_host(tmp_path: Path) -> None:
    """A misspelt model on the second host and an app request outside the model's bounds on the third both
    refuse the rollout, each named with its host, field and value, before any host's facts are read."""
    fleet, hosts = _fleet(tmp_path)
    with pytest.raises(PreflightRefused) as refused:
        check_hosts(fleet)
    problems = str(refused.value).split("; host ")
    assert problems[0].startswith("host 'h2': new.model: 'sdxll' is not a known model (did you mean 'sdxl'?)")
    assert problems[1] == "'h3': workload.app_request.width: Input should be a multiple of 8 (got 1001)"
    assert "'h1'" not in str(refused.value)
    assert not any((tmp_path / name).exists() for name in hosts)  # nothing was written on any box


def test_the_fleet_dry_run_refuses_a_misspelt_model_before_the_canary(
    prefect_api: None, tmp_path: Path
) -> None:
    """deploy-fleet's dry run through the flow: refused in its preflight, before the balancer is asked (its
    socket does not even exist here) and before any host, the canary first, is touched. The console as the
    CLI shows it tells each refusal once: in the summary printed after the run."""
    fleet, hosts = _fleet(tmp_path)
    with cli_console() as log:
        state = deploy_fleet(fleet=fleet, dry_run=True, runs_dir=str(tmp_path / "runs"), return_state=True)
    assert state.is_failed()
    assert "dry run refused: host 'h2': new.model: 'sdxll' is not a known model" in state.message
    (run_dir,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert {record["outcome"] for record in summary["hosts"]} == {"not reached"}  # the canary included
    assert not any((tmp_path / name).exists() for name in hosts)
    shown = Console(record=True, width=250)
    print_fleet(run_dir / "summary.json", shown)
    console = log.getvalue() + shown.export_text()
    assert "fleet: preflight refused (why: the summary below)" in log.getvalue()
    for refusal in ("new.model: 'sdxll' is not a known model", "workload.app_request.width: Input should be"):
        assert console.count(refusal) == 1, console
