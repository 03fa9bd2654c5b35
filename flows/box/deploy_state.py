"""The deploy's progress, recorded on the host (`<install_dir>/deploy-state.json`) so that a rollback,
even one started later from another machine, knows what was stopped, what was started and which backup
belongs to this deploy."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ValidationError

from flows.box.hostfs import read_text, write_text
from flows.box.hosts import Host
from flows.config.target import Target
from flows.errors import HostUnreachable
from flows.evidence.results import ProcessInfo

Status = Literal["in_progress", "deployed", "failed", "rolled_back"]


class DeployState(BaseModel):
    run_id: str
    stage: str
    status: Status = "in_progress"
    backup_dir: str | None = None
    release_id: str | None = None
    previous_release: int | None = None  # the recorded release that served before (None: `current`)
    old_process: ProcessInfo | None = None
    new_process: ProcessInfo | None = None
    new_log_offset: int = 0
    # staged: the new service started beside the old one; until `cut_over` the old one was never touched,
    # so an interrupted deploy only stops the staged service. stop-first (and a staged deploy after the
    # new service was told to take the port) puts the old one back.
    mode: Literal["staged", "stop-first"] = "stop-first"
    cut_over: bool = False
    updated_at: str = ""


def load_state(host: Host, target: Target) -> DeployState | None:
    """The recorded state, or None when there is none (or it is unreadable)."""
    text = read_text(host, target.new.state_file)
    if not text:
        return None
    try:
        return DeployState.model_validate_json(text)
    except ValidationError:
        return None


def save_state(host: Host, target: Target, state: DeployState) -> DeployState:
    """Record the state (an atomic rewrite, so it is retried once when the SSH link drops meanwhile)."""
    state.updated_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        write_text(host, target.new.state_file, state.model_dump_json(indent=2))
    except HostUnreachable:
        write_text(host, target.new.state_file, state.model_dump_json(indent=2))  # reconnects first
    return state


def interrupted_deploy(host: Host, target: Target) -> DeployState | None:
    """The recorded deploy when it never finished (its control side died or lost the link), else None."""
    state = load_state(host, target)
    return state if state is not None and state.status == "in_progress" else None
