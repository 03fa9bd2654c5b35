"""The fleet file: the hosts (each a full single-host target, inline or a path to a target file), the load
balancer (HAProxy's runtime API socket, the backend, each host's server name) and the rollout (canary,
waves, maximum unavailable, the analysis between waves, a progress deadline per host).

YAML or JSON, like a target file (`load_fleet`); errors name the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flows.config.target import Connection, Target, load_model_file, load_target
from flows.errors import FleetFileError, TargetFileError


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FleetHost(_Model):
    """One box of the fleet: its name, its server in the balancer, its single-host target."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$", description="Short name, used in reports and runs.")
    server: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="Its server name in the HAProxy backend (default: name).",
    )
    target: Target | None = Field(None, description="The host's target, inline.")
    target_file: str | None = Field(
        None, description="Or a target file (relative paths: from the fleet file's folder)."
    )
    # --- work pool ---
    work_queue: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]+$",
        description="With rollout.host_runs.mode 'work-pool': the work queue of the pool this host's runs go "
        "to (e.g. the queue of the worker on the machine that holds its SSH key); default: the deployment's.",
    )

    @model_validator(mode="after")
    def _one_target(self) -> FleetHost:
        if (self.target is None) == (self.target_file is None):
            raise ValueError(f"host {self.name!r}: give exactly one of target and target_file")
        return self

    @property
    def server_name(self) -> str:
        return self.server or self.name


class LoadBalancer(_Model):
    """HAProxy in front of the hosts, driven through its runtime API (`stats socket ... level admin`)."""

    kind: Literal["haproxy"] = "haproxy"
    socket: str = Field(description="Path of the runtime API's unix socket (on this machine, or on `via`).")
    via: Connection | None = Field(
        None,
        description="Reach the socket on this host over SSH (default: the socket is on this machine). "
        "The host needs python3 (no socat).",
    )
    backend: str = Field("sdxl", pattern=r"^[A-Za-z0-9._-]+$", description="The backend of the hosts.")
    drain_timeout_s: float = Field(
        120.0, gt=0, description="How long a drained host's current sessions (scur) may take to reach 0."
    )
    up_timeout_s: float = Field(
        120.0, gt=0, description="How long HAProxy's own health check may take to see a host UP again."
    )


class Analysis(_Model):
    """Between waves: the upgraded hosts against the hosts still on the old release, over live traffic
    (HAProxy's per-server counters: requests, 5xx answers, average response time)."""

    duration_s: float = Field(30.0, ge=0, description="Watch the live traffic this long at most.")
    requests: int | None = Field(
        None, ge=1, description="Or stop as soon as the upgraded hosts answered this many requests."
    )
    min_requests: int = Field(
        0, ge=0, description="Fewer answered requests than this: the verdict is 'fail' (not enough traffic)."
    )
    max_error_rate: float = Field(
        0.01, ge=0, le=1, description="Most 5xx answers per request on the upgraded hosts."
    )
    max_error_rate_increase: float = Field(
        0.0, ge=0, le=1, description="How much higher their 5xx rate may be than the old hosts'."
    )
    max_latency_ratio: float | None = Field(
        2.0,
        gt=0,
        description="Their average response time at most this times the old hosts' (None: report only).",
    )
    latency_slack_ms: float = Field(
        100.0, ge=0, description="Plus this many milliseconds (tiny latencies are noisy)."
    )


class HostRuns(_Model):
    """Where each host's deploy-sdxl and rollback-sdxl run: inside the fleet run's process (a subflow per host,
    in a thread), or as flow runs of their deployments, taken by the workers of the deployments' work pool."""

    mode: Literal["in-process", "work-pool"] = Field(
        "in-process", description="'work-pool': start each host's run with run_deployment (prefect.yaml)."
    )
    deploy: str = Field(
        "deploy-sdxl/deploy-sdxl", description="The deployment (flow/deployment) of a host's deploy."
    )
    rollback: str = Field(
        "rollback-sdxl/rollback-sdxl", description="The deployment (flow/deployment) of a host's rollback."
    )
    poll_s: float = Field(2.0, gt=0, description="How often the fleet asks the API for a host run's state.")


class Rollout(_Model):
    """The order of the upgrade and when to stop it."""

    canary: int | list[str] = Field(
        1, description="The canary: how many hosts (the first ones), or their names. 0: no canary."
    )
    wave_size: int = Field(1, ge=1, description="Hosts per wave after the canary.")
    max_unavailable: int = Field(
        1, ge=1, description="Most hosts out of the balancer at once (bounds the parallelism of a wave)."
    )
    analysis: Analysis = Field(default_factory=Analysis)
    host_runs: HostRuns = Field(default_factory=HostRuns)
    progress_deadline_s: float = Field(
        3600.0, gt=0, description="One host's upgrade (drain to ready) may take this long; past it, it fails."
    )
    pause_after: Literal["none", "canary", "every wave"] = Field(
        "none",
        description="After this step's analysis passes the run pauses for a person: promote goes on, abort "
        "rolls back every upgraded host (Prefect UI Resume, or `sdxl-deploy approve`).",
    )
    approval_timeout_s: float = Field(
        3600.0, gt=0, description="A pause with no answer within this aborts the rollout."
    )

    @model_validator(mode="after")
    def _canary_count(self) -> Rollout:
        if isinstance(self.canary, int) and self.canary < 0:
            raise ValueError(f"rollout.canary: a count must be >= 0, got {self.canary}")
        return self

    @property
    def parallelism(self) -> int:
        """Hosts of a wave upgraded at the same time."""
        return min(self.wave_size, self.max_unavailable)

    def pauses_after(self, wave: int, waves: int) -> bool:
        """Whether the run waits for a person after wave `wave` (0-based) of `waves` (never after the last:
        nothing is left to promote)."""
        if wave >= waves - 1:
            return False
        return self.pause_after == "every wave" or (
            self.pause_after == "canary" and wave == 0 and bool(self.canary)
        )


class Fleet(_Model):
    hosts: list[FleetHost] = Field(min_length=1)
    load_balancer: LoadBalancer
    rollout: Rollout = Field(default_factory=Rollout)

    @model_validator(mode="after")
    def _consistent(self) -> Fleet:
        for what, names in (
            ("name", [h.name for h in self.hosts]),
            ("server", [h.server_name for h in self.hosts]),
        ):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"hosts: each {what} may appear once, got duplicates {duplicates}")
        names = [h.name for h in self.hosts]
        canary = self.rollout.canary
        if isinstance(canary, list):
            unknown = [c for c in canary if c not in names]
            if unknown:
                raise ValueError(f"rollout.canary: {unknown} are not hosts of this fleet (hosts: {names})")
        elif canary > len(self.hosts):
            raise ValueError(f"rollout.canary: {canary} hosts, but the fleet has {len(self.hosts)}")
        if self.rollout.max_unavailable >= len(self.hosts) and len(self.hosts) > 1:
            raise ValueError(
                f"rollout.max_unavailable: {self.rollout.max_unavailable} would take every host out of the "
                f"balancer at once (the fleet has {len(self.hosts)}); use at most {len(self.hosts) - 1}"
            )
        return self

    def waves(self) -> list[list[FleetHost]]:
        """The canary (if any) as the first wave, then the other hosts in waves of `wave_size`."""
        canary = self.rollout.canary
        chosen = (
            [h for h in self.hosts if h.name in canary] if isinstance(canary, list) else self.hosts[:canary]
        )
        rest = [h for h in self.hosts if h not in chosen]
        size = self.rollout.wave_size
        return ([chosen] if chosen else []) + [rest[i : i + size] for i in range(0, len(rest), size)]

    def host_target(self, host: FleetHost, base_dir: Path | None = None) -> Target:
        """The host's target (read from its file, relative to `base_dir`)."""
        if host.target is not None:
            return host.target
        path = Path(host.target_file or "").expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            return load_target(path)
        except TargetFileError as exc:
            raise FleetFileError(f"host {host.name!r}: {exc}") from exc


def load_fleet(path: str | Path) -> Fleet:
    """Read a fleet file (YAML or JSON); host target files are read now, relative to its folder."""
    fleet, file = load_model_file(path, Fleet, "fleet", FleetFileError)
    hosts = [
        h.model_copy(update={"target": fleet.host_target(h, file.parent.resolve()), "target_file": None})
        for h in fleet.hosts
    ]
    return fleet.model_copy(update={"hosts": hosts})
