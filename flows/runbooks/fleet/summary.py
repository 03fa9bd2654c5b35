"""The record of one deploy-fleet run (`summary.json` of its run directory): each host's part, the waves,
the analyses, the timeline, whether and why it stopped early."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from flows.record.rundir import StageRecord
from flows.runbooks.fleet.analysis import AnalysisResult

Outcome = Literal[
    "not reached",
    "already upgraded",
    "upgraded",
    "deploy failed",
    "rolled back",
    "rollback failed",
]


class HostRecord(BaseModel):
    """One host's part in the rollout."""

    name: str
    server: str
    target: str
    wave: int | None = None
    outcome: Outcome = "not reached"
    release_before: str = ""
    release_after: str = ""
    deploy_run_dir: str | None = None
    rollback_run_dir: str | None = None
    stages: list[StageRecord] = Field(default_factory=list)
    gates_passed: bool | None = None
    downtime: str | None = None  # the host's own downtime, as its deploy's prober saw it
    drain_s: float | None = None
    up_s: float | None = None
    message: str = ""


class Event(BaseModel):
    at: str
    event: str
    detail: str = ""


class DemoLoad(BaseModel):
    """The fleet demo's steady client load through HAProxy during the rollout (`demo --fleet`'s record)."""

    requests: int
    failed_requests: int
    statuses: dict[str, int] = Field(default_factory=dict)  # answers by HTTP status (or error kind)
    failures: list[str] = Field(default_factory=list)  # the first ones


class FleetSummary(BaseModel):
    flow: str = "deploy-fleet"
    run_dir: str
    status: Literal["running", "completed", "failed", "dry-run"] = "running"
    message: str = ""
    release_id: str = ""
    started_at: str
    finished_at: str | None = None
    seconds: float | None = None
    waves: list[list[str]] = Field(default_factory=list)
    hosts: list[HostRecord] = Field(default_factory=list)
    analyses: list[AnalysisResult] = Field(default_factory=list)
    timeline: list[Event] = Field(default_factory=list)
    aborted: str | None = None  # why the rollout stopped early, if it did
    rolled_back: list[str] = Field(default_factory=list)
    load: DemoLoad | None = None  # the demo's client load (demo --fleet); a real rollout's load is the app's
