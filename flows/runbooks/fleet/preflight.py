"""The fleet's preflight: each host's part of a single deploy's dry run, over every host before the canary is
touched, so a host whose deploy would be refused refuses the whole rollout.

The checks that need no service come first on every host (`new.model` on the box and the app's request
against it, `flows/box/model_check.py`), so a misspelt model is refused at once; then each host's facts, its
current service and the start mode (`flows/box/capacity.py`), as deploy-sdxl's preflight judges them.
Read-only: nothing is shipped, started or stopped.
"""

from __future__ import annotations

from contextlib import ExitStack

from pydantic import BaseModel

from flows.box.capacity import StartDecision, decide_start_mode
from flows.box.hostfs import home_dir
from flows.box.hosts import Host, open_host
from flows.box.model_check import NewModel, check_new_model
from flows.config.fleet import Fleet, FleetHost
from flows.config.target import Target
from flows.errors import HostError, PreflightRefused
from flows.stages.preflight import inspect_current, inspect_host, require_ready


class HostPlan(BaseModel):
    """What a host's deploy would do: the model it would load and how the new service would start."""

    host: str
    model: str
    start: StartDecision

    def describe(self) -> str:
        return f"{self.model}; start mode {self.start.mode} ({self.start.reason})"


def check_hosts(fleet: Fleet, hosts: list[FleetHost] | None = None) -> list[HostPlan]:
    """Each host's deploy preflight (default: every host of the fleet); `PreflightRefused` naming every host
    that would refuse its deploy, each with the field and the value, before any host is touched."""
    hosts = fleet.hosts if hosts is None else hosts
    with ExitStack() as stack:
        boxes: dict[str, tuple[Host, Target]] = {}
        models: dict[str, NewModel] = {}
        refusals: list[str] = []
        for fleet_host in hosts:
            try:
                target = fleet.host_target(fleet_host)
                box = stack.enter_context(open_host(target.connection))
                boxes[fleet_host.name] = box, target.on_host(home_dir(box))
                models[fleet_host.name] = check_new_model(*boxes[fleet_host.name])
            except (PreflightRefused, HostError) as exc:
                refusals.append(f"host {fleet_host.name!r}: {exc}")
        _refuse(refusals)
        plans = []
        for fleet_host in hosts:
            box, target = boxes[fleet_host.name]
            model = models[fleet_host.name]
            try:
                facts = inspect_host(box, target)
                require_ready(facts, inspect_current(box, target, baseline=False))
                start = decide_start_mode(box, target, facts, model)
            except (PreflightRefused, HostError) as exc:
                refusals.append(f"host {fleet_host.name!r}: {exc}")
                continue
            plans.append(HostPlan(host=fleet_host.name, model=model.describe(), start=start))
        _refuse(refusals)
    return plans


def _refuse(refusals: list[str]) -> None:
    if refusals:
        raise PreflightRefused("; ".join(refusals))
