"""The fleet's preflight (flows/fleet/preflight.py): every host's deploy preflight before the canary is
touched, on real `LocalHost` boxes in temporary folders; no balancer, no service is started."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flows.errors import PreflightRefused
from flows.fleet.preflight import check_hosts
from flows.fleet.target import Fleet, FleetHost, LoadBalancer
from flows.target import NewService, Target


def _target(box: Path, model: str, **request: object) -> Target:
    target = Target(new=NewService(model=model, python=sys.executable, install_dir=str(box / "sdxl-deploy")))
    app = {**target.workload.app_request, "width": 64, "height": 64, **request}
    criteria = [
        c.model_copy(update={"threshold": 64}) if c.name == "resolution" else c for c in target.criteria
    ]
    workload = target.workload.model_copy(update={"app_request": app})
    return target.model_copy(update={"workload": workload, "criteria": criteria})


def test_a_misspelt_model_on_any_host_refuses_the_whole_rollout_naming_the_host(tmp_path: Path) -> None:
    """A misspelt model on the second host and an app request outside the model's bounds on the third both
    refuse the rollout, each named with its host, field and value, before any host's facts are read."""
    hosts = {
        "h1": _target(tmp_path / "h1", "tiny-sdxl"),
        "h2": _target(tmp_path / "h2", "sdxll"),
        "h3": _target(tmp_path / "h3", "tiny-sdxl", width=1001),
    }
    fleet = Fleet(
        hosts=[FleetHost(name=name, target=target) for name, target in hosts.items()],
        load_balancer=LoadBalancer(socket=str(tmp_path / "haproxy.sock")),
    )
    with pytest.raises(PreflightRefused) as refused:
        check_hosts(fleet)
    problems = str(refused.value).split("; host ")
    assert problems[0].startswith("host 'h2': new.model: 'sdxll' is not a known model (did you mean 'sdxl'?)")
    assert problems[1] == "'h3': workload.app_request.width: Input should be a multiple of 8 (got 1001)"
    assert "'h1'" not in str(refused.value)
    assert not any((tmp_path / name).exists() for name in hosts)  # nothing was written on any box
