"""The releases that served on the box, recorded there (`<install_dir>/releases.json`) by every successful
deploy, so that a rollback returns to the release that ran before a failed one, not to the SD1.5 service
it replaced long ago.

A record holds how its service was started (argv with the interpreter, working folder, environment,
secret *references*, log and pid file: a `Launch`), the model, port, time and run, and the process it
last ran as. The release that serves now is the one whose recorded process is the one running (same PID
and start time); none means the target's `current` service (SD1.5) serves.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

import httpx
from pydantic import BaseModel, ValidationError

from flows.box.common import get_health, service_url
from flows.box.hostfs import file_size, read_text, tail_bytes, write_text
from flows.box.hosts import Host, HostUnreachable
from flows.box.procs import is_running, listener_pids, process_info, stop_process
from flows.box.supervisor import Launch, start_supervised
from flows.config.target import Target
from flows.errors import ReleaseError
from flows.evidence.results import ProcessInfo
from service.schema import ServiceHealth, serving

KEEP_RELEASES = 50  # the newest records kept in releases.json


class ReleaseRecord(BaseModel):
    """One successful deploy: what ran, how to start it again, and the process it last ran as."""

    id: int  # 1, 2, 3 ... in deploy order on this box
    release_id: str  # the shipped release (version-sha256 prefix of its wheel)
    release_path: str
    python: str  # the interpreter it runs with (argv[0])
    model: str
    port: int
    launch: Launch
    process: ProcessInfo
    deployed_at: str
    run_id: str

    def describe(self) -> str:
        return f"release #{self.id} ({self.model} on port {self.port}, {self.release_id}, run {self.run_id})"


class ReleaseHistory(BaseModel):
    releases: list[ReleaseRecord] = []


def releases_file(target: Target) -> str:
    return f"{target.new.install_dir}/releases.json"


def load_releases(host: Host, target: Target) -> list[ReleaseRecord]:
    """The recorded releases, oldest first (none when the file is missing or unreadable)."""
    text = read_text(host, releases_file(target))
    if not text:
        return []
    try:
        return ReleaseHistory.model_validate_json(text).releases
    except ValidationError:
        return []


def save_releases(host: Host, target: Target, releases: list[ReleaseRecord]) -> None:
    """Rewrite the record atomically (retried once when the SSH link drops meanwhile)."""
    text = ReleaseHistory(releases=releases[-KEEP_RELEASES:]).model_dump_json(indent=2)
    try:
        write_text(host, releases_file(target), text)
    except HostUnreachable:
        write_text(host, releases_file(target), text)  # reconnects first


def record_release(
    host: Host,
    target: Target,
    *,
    release_id: str,
    release_path: str,
    launch: Launch,
    process: ProcessInfo,
    run_id: str,
) -> ReleaseRecord:
    """Append the release a deploy just proved serving."""
    releases = load_releases(host, target)
    record = ReleaseRecord(
        id=(releases[-1].id + 1) if releases else 1,
        release_id=release_id,
        release_path=release_path,
        python=launch.argv[0],
        model=target.new.model,
        port=target.new.port,
        launch=launch,
        process=process,
        deployed_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        run_id=run_id,
    )
    save_releases(host, target, [*releases, record])
    return record


def release_of(host: Host, target: Target, process: ProcessInfo | None) -> ReleaseRecord | None:
    """The recorded release whose process is `process` (same PID and start time), else None."""
    if process is None:
        return None
    for record in reversed(load_releases(host, target)):
        if (record.process.pid, record.process.start_ticks) == (process.pid, process.start_ticks):
            return record
    return None


def get_release(host: Host, target: Target, release: int) -> ReleaseRecord:
    """The record with this id; a clear error naming the ids there are."""
    releases = load_releases(host, target)
    for record in releases:
        if record.id == release:
            return record
    known = ", ".join(f"#{r.id}" for r in releases) or "none"
    raise ReleaseError(f"release #{release} is not recorded in {releases_file(target)} (recorded: {known})")


def serving_now(host: Host, record: ReleaseRecord) -> bool:
    """True while the process the release last ran as is alive."""
    return is_running(host, record.process)


def release_health(host: Host, record: ReleaseRecord) -> ServiceHealth | None:
    """The release's health body when its port answers healthy, else None."""
    with service_url(host, record.port) as url:
        try:
            body = get_health(url, "/health", timeout=10)
        except httpx.HTTPError:
            return None
    return body if serving(body) else None


def restart_release(host: Host, target: Target, record: ReleaseRecord, timeout_s: float) -> ServiceHealth:
    """Start the release again exactly as it was started (its argv under its supervisor, its secrets
    resolved now), wait until it answers healthy, record its new process; its health body."""
    holders = listener_pids(host, record.port)
    if holders:
        raise ReleaseError(f"port {record.port} is held by PIDs {holders}; cannot start {record.describe()}")
    offset = max((file_size(host, record.launch.log_file) or 0) - 4000, 0)
    process = start_supervised(host, record.launch)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = release_health(host, record)
        if health is not None:
            break
        if process_info(host, process.pid) is None:
            text, _ = tail_bytes(host, record.launch.log_file, offset)
            raise ReleaseError(
                f"{record.describe()} exited while starting; its log ends with:\n{text[-2000:]}"
            )
        time.sleep(1.0)
    else:
        stop_process(host, process, 30.0)  # leave no half-started service behind
        raise ReleaseError(f"{record.describe()} did not answer /health within {timeout_s:.0f} s")
    releases = load_releases(host, target)
    for stored in releases:
        if stored.id == record.id:
            stored.process = process
    save_releases(host, target, releases)
    record.process = process
    return health


def releases_table(records: list[ReleaseRecord], running: dict[int, bool]) -> Any:
    """A rich table: id, model, port, release, deployed at, run, serving now? (newest first)."""
    from rich.table import Table

    table = Table(title="releases recorded on the box", title_justify="left")
    for column in ("id", "model", "port", "release", "deployed at", "run", "serving now?"):
        table.add_column(column, overflow="fold")
    for record in reversed(records):
        now = "[green]yes[/]" if running.get(record.id) else "no"
        table.add_row(
            f"#{record.id}",
            record.model,
            str(record.port),
            record.release_id,
            record.deployed_at,
            record.run_id,
            now,
        )
    return table
