"""Deploy: build this project's wheel here, ship it as an isolated release, stop the old service by its
PID, start the new one detached.

A release lives in `<install_dir>/releases/<version>-<sha256 prefix>/` with the wheel and a `site/`
folder installed with `pip install --no-deps --target`, so neither the host's own environment nor
anything else is overwritten; the service runs with `PYTHONPATH=<site>`.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows.errors import DeployError
from flows.hostfs import digests, file_size, make_dirs, read_text, remote_child, run_checked, write_text
from flows.hosts import Host, q
from flows.procs import ProcessInfo, stop_process, wait_port_free
from flows.supervisor import Launch, start_supervised
from flows.target import Target
from flows.tasks.common import run_logger

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class Release(BaseModel):
    release_id: str
    path: str
    site: str
    wheel_sha256: str
    reused: bool


class Started(BaseModel):
    process: ProcessInfo
    log_file: str
    log_offset: int
    install_dir: str = ""  # where its supervisor records restarts
    launch: Launch | None = None  # how it was started (recorded as a release once the deploy succeeds)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@task(cache_policy=NO_CACHE)
def build_wheel(out_dir: Path) -> Path:
    """Build this project's wheel (no dependencies) into `out_dir`."""
    if not (PROJECT_ROOT / "pyproject.toml").exists():
        raise DeployError(f"no pyproject.toml in {PROJECT_ROOT}: pass a prebuilt wheel instead")
    out_dir.mkdir(parents=True, exist_ok=True)
    import shutil

    # setuptools packs whatever its staging folder holds: a module moved or deleted since an earlier build
    # (service/bench.py) would ship again
    shutil.rmtree(PROJECT_ROOT / "build", ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(out_dir),
        str(PROJECT_ROOT),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    wheels = sorted(out_dir.glob("sdxl_deploy-*.whl"))
    if result.returncode != 0 or not wheels:
        raise DeployError(f"building the wheel failed: {(result.stderr or result.stdout).strip()[-800:]}")
    return wheels[-1]


@task(cache_policy=NO_CACHE)
def ship_release(host: Host, target: Target, wheel: Path) -> Release:
    """Upload the wheel, check its size and sha256 on the host, install it as an isolated release."""
    log = run_logger()
    sha = sha256_file(wheel)
    version = wheel.name.split("-")[1]
    release_id = f"{version}-{sha[:12]}"
    path = f"{target.new.install_dir}/releases/{release_id}"
    site, remote_wheel, marker = f"{path}/site", remote_child(path, wheel), f"{path}/site/.installed"
    if (read_text(host, marker) or "").strip() == sha:
        log.info("release %s is already installed at %s", release_id, path)
        return Release(release_id=release_id, path=path, site=site, wheel_sha256=sha, reused=True)

    make_dirs(host, path)
    # Upload beside the final name and check size and sha256 on the host before anything is installed:
    # a cut link leaves only a `.part` file, which is never installed and is overwritten next time.
    partial = f"{remote_wheel}.part"
    host.put(wheel, partial)
    shipped = digests(host, [partial])[partial]
    expected = (sha, wheel.stat().st_size)
    if shipped is None or (shipped.sha256, shipped.size) != expected:
        got = f"{shipped.size} bytes, sha256 {shipped.sha256[:12]}..." if shipped else "no file"
        raise DeployError(
            f"uploaded wheel {partial} does not match the local one ({expected[1]} bytes, sha256 "
            f"{sha[:12]}...): got {got}; nothing was installed"
        )
    run_checked(host, f"mv -f -- {q(partial, remote_wheel)}", f"moving {partial} into place")
    run_checked(
        host,
        f"rm -rf -- {q(site)} && {q(target.new.python)} -m pip install --no-deps --no-index "
        f"--disable-pip-version-check -q --target {q(site)} {q(remote_wheel)}",
        f"installing {wheel.name} into {site}",
        timeout=600,
    )
    write_text(host, marker, sha + "\n")
    log.info("shipped %s (%d bytes, sha256 %s...) to %s", wheel.name, wheel.stat().st_size, sha[:12], path)
    return Release(release_id=release_id, path=path, site=site, wheel_sha256=sha, reused=False)


@task(cache_policy=NO_CACHE)
def stop_service(host: Host, process: ProcessInfo, port: int, timeout_s: float) -> str:
    """Stop a service by its recorded PID (TERM, wait, KILL) and wait until its port is free."""
    outcome = stop_process(host, process, timeout_s)
    wait_port_free(host, port)
    run_logger().info(outcome)
    return outcome


def serve_argv(target: Target) -> list[str]:
    new = target.new
    return [
        new.python,
        "-m",
        "sdxl_deploy.cli",
        "serve",
        "--model",
        new.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(new.port),
        *new.serve_args,
    ]


@task(cache_policy=NO_CACHE)
def start_new_service(host: Host, target: Target, release: Release) -> Started:
    """Start the new service from the release, detached under its restart-loop supervisor, with its pid
    file and log file; its environment (secrets included) goes through a private env file."""
    new = target.new
    offset = file_size(host, new.log_file) or 0
    launch = Launch(
        argv=serve_argv(target),
        workdir=release.path,
        env={"PYTHONPATH": release.site, **new.env},
        secret_env=new.secret_env,
        install_dir=new.install_dir,
        log_file=new.log_file,
        pid_file=new.pid_file,
    )
    process = start_supervised(host, launch)
    run_logger().info("started %s under its supervisor, log %s", process.describe(), new.log_file)
    return Started(
        process=process, log_file=new.log_file, log_offset=offset, install_dir=new.install_dir, launch=launch
    )
