"""Rollback: stop the new service, put back the one that served before it, and prove it answers.

What served before is the release a successful deploy recorded (`flows/box/releases.py`) when the failed
deploy replaced one, else the target's `current` service (SD1.5), restored from its backup.

Idempotent: each step checks first (is the new one running? does the old one answer already? does each
file match the backup?), so running it twice, or after a deploy that was interrupted anywhere, is safe.
"""

from __future__ import annotations

import time

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.box.common import get_health, run_logger, service_url
from flows.box.deploy_state import load_state, save_state
from flows.box.hostfs import digests, file_size, run_checked, tail_bytes
from flows.box.hosts import Host, q
from flows.box.procs import (
    find_service,
    is_running,
    listener_pids,
    pid_from_file,
    process_info,
    start_detached,
    stop_process,
    wait_port_free,
)
from flows.box.releases import ReleaseRecord, get_release, release_health, restart_release, serving_now
from flows.config.secrets import SecretUnavailable
from flows.config.target import CurrentService, Target
from flows.errors import FlowError, ReleaseError
from flows.evidence.results import ProcessInfo, RollbackResult
from flows.stages.backup import BackupFile, latest_backup, verify_backup
from service.schema import ServiceHealth, serving


def current_answers(host: Host, service: CurrentService) -> ServiceHealth | None:
    """The current service's health body when it answers healthy, else None."""
    with service_url(host, service.port) as url:
        try:
            body = get_health(url, service.health_path, timeout=10)
        except httpx.HTTPError:
            return None
    return body if serving(body) else None


def new_service_process(host: Host, target: Target) -> ProcessInfo | None:
    """The new service's process: as recorded in the deploy state, else from its pid file."""
    state = load_state(host, target)
    if state and state.new_process:
        return state.new_process
    pid = pid_from_file(host, target.new.pid_file)
    info = process_info(host, pid) if pid else None
    # Only a PID from our own pid file whose command line is our `serve` is ours to stop.
    if info and "sdxl_deploy.cli" in info.cmdline and f"--port {target.new.port}" in info.cmdline:
        return info
    return None


def resolve_backup(host: Host, target: Target, backup: str | None) -> str:
    """A named backup (a name under backup_root, or a path), this deploy's backup, or the latest one."""
    if backup:
        return backup if backup.startswith("/") else f"{target.paths.backup_root}/{backup}"
    state = load_state(host, target)
    if state and state.backup_dir:
        return state.backup_dir
    return latest_backup(host, target.paths.backup_root, target.current.name)


@task(cache_policy=NO_CACHE)
def roll_back(host: Host, target: Target, backup: str | None = None) -> RollbackResult:
    """Stop the new service, restore the old one's files from the backup, restart it, verify its health."""
    log = run_logger()
    new = new_service_process(host, target)
    if new and is_running(host, new):
        stopped = stop_process(host, new, target.new.stop_timeout_s)
        wait_port_free(host, target.new.port)
    else:
        stopped = "the new service was not running"
    log.info("rollback: %s", stopped)

    previous = release_before(host, target) if backup is None else None
    fallback = ""
    if previous is not None:
        try:
            result = restore_release(host, target, previous, stopped)
        except (ReleaseError, SecretUnavailable) as exc:  # something must answer: SD1.5 from its backup
            log.warning("rollback: %s; restoring the current service from its backup instead", exc)
            fallback = f"could not start {previous.describe()} again ({str(exc).splitlines()[0]}); "
        else:
            log.info("rollback: %s; %s", result.restarted, _answers(result.health))
            mark_rolled_back(host, target)
            return result

    backup_dir: str | None = None
    service = target.current
    restored: list[str] = []
    health = current_answers(host, service)
    if health is not None:
        restarted = f"the current service already answers on port {service.port}"
    else:
        backup_dir = resolve_backup(host, target, backup)
        manifest = verify_backup(host, backup_dir)
        service = manifest.service
        restored = restore_files(host, backup_dir, manifest.service_files())
        health = current_answers(host, service)
        if health is not None:
            restarted = f"the current service already answers on port {service.port}"
        else:
            process = restart_current(host, service, target.new.install_dir)
            health = wait_healthy(host, service, process)
            restarted = f"restarted {process.describe()} from {backup_dir}"
    restarted = fallback + restarted
    log.info("rollback: %s; %s", restarted, _answers(health))
    mark_rolled_back(host, target)
    return RollbackResult(
        backup_dir=backup_dir,
        stopped_new=stopped,
        restored_files=restored,
        restarted=restarted,
        health=health,
        answering=health is not None,
        port=service.port,
    )


def mark_rolled_back(host: Host, target: Target) -> None:
    state = load_state(host, target)
    if state:
        state.status, state.stage = "rolled_back", "rollback"
        save_state(host, target, state)


def release_before(host: Host, target: Target) -> ReleaseRecord | None:
    """The recorded release that served before the deploy being rolled back (None: `current` did)."""
    state = load_state(host, target)
    if state is None or state.previous_release is None:
        return None
    try:
        return get_release(host, target, state.previous_release)
    except ReleaseError as exc:  # its record is gone: the current service from its backup, then
        run_logger().warning("rollback: %s", exc)
        return None


def restore_release(host: Host, target: Target, record: ReleaseRecord, stopped: str) -> RollbackResult:
    """Start the earlier release again under its supervisor with its own argv (unless it already serves)."""
    health = release_health(host, record) if serving_now(host, record) else None
    if health is not None:
        restarted = f"{record.describe()} already answers on port {record.port}"
    else:
        health = restart_release(host, target, record, target.new.ready_timeout_s)
        restarted = f"restarted {record.describe()} as {record.process.describe()}"
    return RollbackResult(
        backup_dir=None,
        stopped_new=stopped,
        restored_files=[],
        restarted=restarted,
        health=health,
        answering=True,
        release=record.id,
        port=record.port,
    )


def restore_files(host: Host, backup_dir: str, files: list[BackupFile]) -> list[str]:
    """Copy back every service file that is missing or differs from the backup; the restored paths."""
    now = digests(host, [f.original for f in files])
    restored = []
    for f in files:
        digest = now[f.original]
        if digest is None or digest.sha256 != f.sha256:
            parent = f.original.rsplit("/", 1)[0] or "/"
            run_checked(
                host,
                f"mkdir -p -- {q(parent)} && cp -p -- {q(f'{backup_dir}/{f.path}', f.original)}",
                f"restoring {f.original}",
            )
            restored.append(f.original)
    return restored


def restart_current(host: Host, service: CurrentService, install_dir: str) -> ProcessInfo:
    """Start the current service with its own start command, detached, after checking its port is free."""
    holders = listener_pids(host, service.port)
    if holders:
        holder = find_service(host, service.port)
        who = holder.describe() if holder else f"PIDs {holders}"
        raise FlowError(
            f"port {service.port} is held by {who}, which does not answer {service.health_path}; stop it first"
        )
    pid_file = service.pid_file or f"{install_dir}/{service.name}.pid"
    return start_detached(
        host,
        ["sh", "-c", service.start_command],
        workdir=service.workdir,
        log_file=service.log_file,
        pid_file=pid_file,
    )


def wait_healthy(host: Host, service: CurrentService, process: ProcessInfo) -> ServiceHealth:
    """Poll the restarted service's health until it answers healthy; fail fast if it exits."""
    offset = max((file_size(host, service.log_file) or 0) - 4000, 0)
    deadline = time.monotonic() + service.health_timeout_s
    while time.monotonic() < deadline:
        health = current_answers(host, service)
        if health is not None:
            return health
        if process_info(host, process.pid) is None:
            text, _ = tail_bytes(host, service.log_file, offset)
            raise FlowError(f"the restarted service exited; its log ends with:\n{text[-2000:]}")
        time.sleep(1.0)
    raise FlowError(
        f"the restarted service did not answer {service.health_path} within {service.health_timeout_s:.0f} s"
    )


def _answers(health: ServiceHealth | None) -> str:
    """A service's `/health` answer in a few words: its model and status."""
    return f"{health.model} answers {health.status}" if health is not None else "no health answer"
