"""One deploy at a time per host: a lock directory on the host, `<install_dir>/deploy.lock/`.

The lock is taken atomically: `owner.json` is written into a fresh private folder first, which is then
renamed onto `deploy.lock` (`mv -T`, i.e. rename(2)). Renaming a folder onto an existing non-empty folder
fails, so of two runs that race exactly one wins, and a lock never exists without its owner record.

A lock is *stale* when its owner provably ended: the control process that took it is gone (same control
machine, its PID no longer lives with the same start time, asked through psutil, so Linux, macOS and
Windows control machines alike), its Prefect flow run is in a final state, or
it is older than `LOCK_TTL_S`. A stale lock is cleared by itself, with a warning; a lock whose owner cannot
be checked from here (taken from another machine) is cleared only with `force_unlock`. A lock whose owner
provably still runs is never cleared. Clearing renames the lock away first (only one clearer can win) and
checks it moved the very lock it judged.
"""

from __future__ import annotations

import getpass
import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

import psutil
from pydantic import BaseModel, ValidationError

from flows.box.common import run_logger
from flows.box.hostfs import read_text, run_checked, write_text
from flows.box.hosts import Host, q
from flows.errors import HostLocked

LOCK_TTL_S = 12 * 3600.0  # far beyond the longest deploy (a first SDXL download is ~40 min)
LOCK_NAME = "deploy.lock"


class LockOwner(BaseModel):
    """Who holds the host's deploy lock."""

    token: str
    flow: str
    run_name: str
    flow_run_id: str | None
    who: str  # user@machine of the control side
    control_host: str
    control_pid: int
    control_pid_start: str | None  # the process's start time (epoch s): tells a reused PID apart
    since: str

    def describe(self) -> str:
        held = _age_s(self.since)
        age = f", {held / 60:.0f} min ago" if held is not None else ""
        run = f", Prefect flow run {self.flow_run_id}" if self.flow_run_id else ""
        return (
            f"{self.flow} run {self.run_name} of {self.who} (control PID {self.control_pid}{run}) "
            f"since {self.since}{age}"
        )


def lock_path(install_dir: str) -> str:
    return f"{install_dir}/{LOCK_NAME}"


def new_owner(flow: str, run_name: str) -> LockOwner:
    """This process as a lock owner (with the Prefect flow run id when it runs inside a flow run)."""
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    return LockOwner(
        token=uuid.uuid4().hex,
        flow=flow,
        run_name=run_name,
        flow_run_id=str(run_id) if run_id else None,
        who=f"{getpass.getuser()}@{socket.gethostname()}",
        control_host=socket.gethostname(),
        control_pid=os.getpid(),
        control_pid_start=_local_start_time(os.getpid()),
        since=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def read_lock(host: Host, install_dir: str) -> LockOwner | None:
    """The lock's owner, or None when the host is not locked (or the record is unreadable)."""
    text = read_text(host, f"{lock_path(install_dir)}/owner.json")
    if not text:
        return None
    try:
        return LockOwner.model_validate_json(text)
    except ValidationError:
        return None


def stale_reason(owner: LockOwner) -> str | None:
    """Why the lock's owner has provably ended, or None when it may still be running."""
    if owner.control_host == socket.gethostname():
        start = _local_start_time(owner.control_pid)
        if start is None or (owner.control_pid_start and start != owner.control_pid_start):
            return f"its control process {owner.control_pid} on {owner.control_host} is gone"
    if owner.flow_run_id:
        state = _flow_run_state(owner.flow_run_id)
        if state is not None and state.is_final():
            return f"its Prefect flow run {owner.flow_run_id} is {state.type.value}"
    age = _age_s(owner.since)
    if age is not None and age > LOCK_TTL_S:
        return f"it is {age / 3600:.1f} h old (more than {LOCK_TTL_S / 3600:.0f} h)"
    return None


def owner_alive(owner: LockOwner) -> bool:
    """True when the owner provably still runs: its control process lives on this machine."""
    if owner.control_host != socket.gethostname():
        return False
    start = _local_start_time(owner.control_pid)
    return start is not None and start == owner.control_pid_start


def acquire_lock(host: Host, install_dir: str, owner: LockOwner, force: bool = False) -> LockOwner:
    """Take the host's deploy lock, clearing a stale one (or, with `force`, one that cannot be checked)."""
    log = run_logger()
    run_checked(
        host, f"mkdir -p -- {q(install_dir)} && chmod 700 -- {q(install_dir)}", "creating install_dir"
    )
    for _attempt in range(3):
        if _try_take(host, install_dir, owner):
            log.info("took the deploy lock %s", lock_path(install_dir))
            return owner
        holder = read_lock(host, install_dir)
        if holder is None:  # released between the two calls, or a damaged record
            if not _exists(host, lock_path(install_dir)):
                continue
            raise HostLocked(
                f"{host.name} is locked ({lock_path(install_dir)} exists but has no readable owner.json); "
                "if no deploy runs, remove that folder by hand"
            )
        reason = stale_reason(holder)
        if reason is None and force and not owner_alive(holder):
            reason = "force_unlock was given"
        if reason is None:
            hint = (
                "wait for it to finish"
                if owner_alive(holder)
                else "wait for it to finish, or if that run is gone (its machine died), run again with "
                "force_unlock=true (--force-unlock)"
            )
            raise HostLocked(f"{host.name} is locked by {holder.describe()}; {hint}")
        log.warning("clearing the stale deploy lock of %s: %s", holder.describe(), reason)
        clear_lock(host, install_dir, holder)
    raise HostLocked(f"could not take the deploy lock {lock_path(install_dir)} on {host.name} (contended)")


def release_lock(host: Host, install_dir: str, owner: LockOwner) -> None:
    """Release the lock if this owner still holds it (never someone else's)."""
    holder = read_lock(host, install_dir)
    if holder is not None and holder.token == owner.token:
        clear_lock(host, install_dir, holder)


def clear_lock(host: Host, install_dir: str, holder: LockOwner) -> bool:
    """Remove the lock `holder` held; False when the lock changed hands meanwhile (then it is left alone)."""
    path = lock_path(install_dir)
    aside = f"{install_dir}/.stale-lock-{uuid.uuid4().hex}"
    if not host.run(f"mv -T -- {q(path, aside)}").ok:
        return False  # someone else cleared or released it first
    moved = read_lock(host, aside)
    if moved is not None and moved.token != holder.token:  # a new lock was taken meanwhile: put it back
        host.run(f"mv -T -- {q(aside, path)}")
        return False
    run_checked(host, f"rm -rf -- {q(aside)}", f"removing {aside}")
    return True


@contextmanager
def host_lock(host: Host, install_dir: str, owner: LockOwner, force: bool = False) -> Iterator[LockOwner]:
    """Hold the host's deploy lock for the block; released on the way out, failure or not."""
    acquire_lock(host, install_dir, owner, force)
    try:
        yield owner
    finally:
        try:
            release_lock(host, install_dir, owner)
        except Exception as exc:  # the link may be gone: the lock is then stale and is cleared later
            run_logger().warning("could not release the deploy lock on %s: %s", host.name, exc)


def _try_take(host: Host, install_dir: str, owner: LockOwner) -> bool:
    fresh = f"{install_dir}/.lock-{owner.token}"
    run_checked(host, f"mkdir -m 700 -- {q(fresh)}", f"creating {fresh}")
    write_text(host, f"{fresh}/owner.json", owner.model_dump_json(indent=2))
    if host.run(f"mv -T -- {q(fresh, lock_path(install_dir))}").ok:
        return True
    host.run(f"rm -rf -- {q(fresh)}")
    return False


def _exists(host: Host, path: str) -> bool:
    return host.run(f"test -e {q(path)}").ok


def _local_start_time(pid: int) -> str | None:
    """When the local process `pid` started (epoch seconds, as text), or None when it is gone or a zombie.
    Portable (psutil): no /proc, so the control side may run on Windows too."""
    try:
        process = psutil.Process(int(pid))
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return f"{process.create_time():.2f}"
    except (psutil.Error, ValueError):
        return None


def _flow_run_state(flow_run_id: str):  # -> prefect State | None
    """The Prefect flow run's state, or None when the API cannot tell (another server, no such run)."""
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            return client.read_flow_run(uuid.UUID(flow_run_id)).state
    except Exception:
        return None


def _age_s(since: str) -> float | None:
    try:
        return (datetime.now(timezone.utc) - datetime.fromisoformat(since)).total_seconds()
    except ValueError:
        return None
