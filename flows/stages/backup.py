"""Backup of the current service: its files, start command, process, logs and `pip freeze`, with a
verified sha256 manifest. Layout: `<backup_root>/<name>-<UTC timestamp>/`:

    MANIFEST.json        every file below with sha256 and size (the service files with their origin)
    service.json         the current service's description (start command, workdir, port, ...)
    start_command.txt    the command that starts it
    process.json         the process that was running (PID, start time, command line)
    pip-freeze.txt       the packages of the interpreter that served the port
    files/<abs path>     the service's files, at their original absolute paths
    logs/<log name>      its log at backup time
"""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows.box.common import run_logger
from flows.box.hostfs import Digest, digests, read_text, run_checked, write_text
from flows.box.hosts import Host, q
from flows.box.procs import listener_pids
from flows.config.target import CurrentService, Target
from flows.errors import BackupError
from flows.evidence.results import ProcessInfo

MANIFEST = "MANIFEST.json"


class BackupFile(BaseModel):
    path: str  # relative to the backup directory
    sha256: str
    size: int
    original: str | None = None  # where a service file lives on the host


class Manifest(BaseModel):
    service: CurrentService
    created_at: str
    process: ProcessInfo | None
    files: list[BackupFile]

    def service_files(self) -> list[BackupFile]:
        return [f for f in self.files if f.original]


class BackupInfo(BaseModel):
    path: str
    manifest: Manifest
    pruned: list[str]


def backup_name(service: str, when: datetime) -> str:
    return f"{service}-{when.astimezone(timezone.utc):%Y%m%d-%H%M%S}"


@task(cache_policy=NO_CACHE)
def backup_current(host: Host, target: Target, process: ProcessInfo | None) -> BackupInfo:
    """Copy the current service's files, start command, process info, logs and pip freeze; verify."""
    log = run_logger()
    current = target.current
    originals = digests(host, current.files)
    missing = [path for path, digest in originals.items() if digest is None]
    if missing:
        raise BackupError(f"current.files lists files that do not exist on {host.name}: {missing}")

    path = _make_unique_dir(
        host, target.paths.backup_root, backup_name(current.name, datetime.now(timezone.utc))
    )
    try:
        manifest = _fill_backup(host, target, process, path, originals)
    except Exception as exc:
        # A half-made backup (e.g. the disk filled up) is removed, so it never passes for a backup and
        # frees the space; older backups are never touched: pruning runs only after verification.
        removed = host.run(f"rm -rf -- {q(path)}").ok
        note = f"the partial backup {path} was removed" if removed else f"remove the partial backup {path}"
        raise BackupError(f"{exc}; {note}; older backups are untouched") from exc
    pruned = prune_backups(host, target.paths.backup_root, current.name, target.paths.keep_backups, keep=path)
    log.info("backup %s: %d files, verified; pruned %d old backups", path, len(manifest.files), len(pruned))
    return BackupInfo(path=path, manifest=manifest, pruned=pruned)


def _fill_backup(
    host: Host, target: Target, process: ProcessInfo | None, path: str, originals: dict[str, Digest | None]
) -> Manifest:
    """Copy everything into `path`, write the manifest and verify it."""
    current = target.current
    copies = {original: f"files/{original.lstrip('/')}" for original in current.files}
    steps = [f"mkdir -p -- {q(f'{path}/logs')}"]
    for original, relative in copies.items():
        destination = f"{path}/{relative}"
        steps.append(f"mkdir -p -- {q(destination.rsplit('/', 1)[0])} && cp -p -- {q(original, destination)}")
    steps.append(f"if [ -f {q(current.log_file)} ]; then cp -p -- {q(current.log_file, f'{path}/logs/')}; fi")
    run_checked(host, " && ".join(steps), f"copying the current service into {path}", timeout=600)
    _write_pip_freeze(host, current.port, f"{path}/pip-freeze.txt")
    write_text(host, f"{path}/start_command.txt", current.start_command + "\n")
    write_text(host, f"{path}/service.json", current.model_dump_json(indent=2))
    write_text(host, f"{path}/process.json", process.model_dump_json(indent=2) if process else "null")

    listed = run_checked(host, f"cd -- {q(path)} && find . -type f ! -name {MANIFEST}", "listing the backup")
    relatives = sorted(line[2:] for line in listed.splitlines() if line.startswith("./"))
    hashed = digests(host, [f"{path}/{r}" for r in relatives])
    origin = {relative: original for original, relative in copies.items()}
    files = []
    for relative in relatives:
        digest = hashed[f"{path}/{relative}"]
        if digest is None:
            raise BackupError(f"{path}/{relative} vanished while the backup was made")
        files.append(
            BackupFile(path=relative, sha256=digest.sha256, size=digest.size, original=origin.get(relative))
        )
        source = originals.get(origin.get(relative, ""))
        if source and source.sha256 != digest.sha256:
            raise BackupError(f"copy of {origin[relative]} differs from the original (sha256 mismatch)")
    manifest = Manifest(
        service=current, created_at=datetime.now(timezone.utc).isoformat(), process=process, files=files
    )
    write_text(host, f"{path}/{MANIFEST}", manifest.model_dump_json(indent=2))
    verify_backup(host, path)
    return manifest


def _make_unique_dir(host: Host, root: str, name: str) -> str:
    """Create `<root>/<name>` (or `<name>-2`, `-3`...) without ever reusing an existing backup."""
    run_checked(host, f"mkdir -p -- {q(root)} && chmod 700 -- {q(root)}", f"creating {root} (private)")
    for attempt in range(1, 100):
        path = f"{root}/{name}" if attempt == 1 else f"{root}/{name}-{attempt}"
        if host.run(f"mkdir -m 700 -- {q(path)}").ok:
            return path
    raise BackupError(f"could not create a new backup directory under {root}")


def _write_pip_freeze(host: Host, port: int, out: str) -> None:
    """`pip freeze` of the interpreter that serves `port` (an explanation when there is none)."""
    for pid in listener_pids(host, port):
        exe = host.run(f"readlink /proc/{pid}/exe").stdout.strip()
        if exe:
            note = q(f"# pip freeze failed for {exe}")
            host.run(f"{q(exe)} -m pip freeze > {q(out)} 2>&1 || echo {note} >> {q(out)}", timeout=120)
            return
    write_text(host, out, f"# no process listened on port {port}; nothing to freeze\n")


def read_manifest(host: Host, path: str) -> Manifest:
    text = read_text(host, f"{path}/{MANIFEST}")
    if text is None:
        raise BackupError(f"{path} is not a backup (no {MANIFEST} on {host.name})")
    return Manifest.model_validate_json(text)


def verify_backup(host: Host, path: str) -> Manifest:
    """Re-hash every file of a backup against its manifest; raise naming the files that differ."""
    manifest = read_manifest(host, path)
    found = digests(host, [f"{path}/{f.path}" for f in manifest.files])
    bad = [
        f.path
        for f in manifest.files
        if (d := found[f"{path}/{f.path}"]) is None or (d.sha256, d.size) != (f.sha256, f.size)
    ]
    if bad:
        raise BackupError(f"backup {path} does not match its manifest: {bad}")
    return manifest


def list_backups(host: Host, root: str, service: str) -> list[str]:
    """Backups of `service` under `root` (directories with a manifest), oldest first."""
    result = host.run(
        f'cd -- {q(root)} && for d in {q(service)}-*/; do [ -f "$d"{MANIFEST} ] && echo "$d"; done'
    )
    names = [line.rstrip("/") for line in result.stdout.splitlines() if line.strip()] if result.ok else []
    return [f"{root}/{name}" for name in sorted(names, key=_backup_sort_key)]


def _backup_sort_key(name: str) -> tuple[str, int]:
    """`sd15-20261127-101500-2` sorts after `sd15-20261127-101500`."""
    parts = name.split("-")
    if len(parts) >= 4 and parts[-1].isdigit() and len(parts[-1]) < 4:
        return "-".join(parts[:-1]), int(parts[-1])
    return name, 1


def prune_backups(
    host: Host, root: str, service: str, keep_newest: int, keep: str | None = None
) -> list[str]:
    """Delete all but the newest `keep_newest` backups of `service` (never `keep`); the deleted paths."""
    backups = list_backups(host, root, service)
    doomed = [b for b in backups[: max(len(backups) - keep_newest, 0)] if b != keep]
    for path in doomed:
        run_checked(host, f"rm -rf -- {q(path)}", f"removing old backup {path}")
    return doomed


def latest_backup(host: Host, root: str, service: str) -> str:
    backups = list_backups(host, root, service)
    if not backups:
        raise BackupError(f"no backup of {service!r} under {root} on {host.name}")
    return backups[-1]
