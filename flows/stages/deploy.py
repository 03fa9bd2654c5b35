"""Deploy: build this project's wheel here, ship it as a release with its own environment, stop the old
service by its PID, start the new one detached.

A release lives in `<install_dir>/releases/<version>-<sha256 prefix>/`: the wheel and `venv/`, a virtual
environment made by the box's python that sees the box's packages (its CUDA torch above all) behind its
own. Into it go the service's dependencies at the tested versions (`service/requirements.txt`, shipped in
the wheel), the fixes preflight named (e.g. transformers 4.57.1 over the yanked 4.57.0), and the wheel;
all before anything is stopped, and the box's own interpreter is never modified. The service runs with
`<release>/venv/bin/python` (`Release.python`). A box without a package index gets the wheels from
`new.wheelhouse`, uploaded to `<install_dir>/wheelhouse/` and installed with `--no-index --find-links`.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from flows.box.common import run_logger
from flows.box.hostfs import (
    digests,
    file_size,
    json_answer,
    make_dirs,
    read_text,
    remote_child,
    run_checked,
    write_text,
)
from flows.box.hosts import Host, q
from flows.box.procs import stop_process, wait_port_free
from flows.box.supervisor import Launch, start_supervised
from flows.config.target import Target
from flows.errors import DeployError
from flows.evidence.results import CompileCheck, ProcessInfo

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class Release(BaseModel):
    release_id: str
    path: str
    site: str  # the release environment's site-packages (where the wheel is installed)
    wheel_sha256: str
    reused: bool
    python: str  # the interpreter the release runs with: <release>/venv/bin/python


class ReleaseEnv(BaseModel):
    """What the release environment's script answers: its python and site-packages, the box's paths behind them."""

    python: str
    site: str
    box_paths: list[str]


class Started(BaseModel):
    process: ProcessInfo
    port: int | None = None  # where it answers now: its staging port until the cut-over; None: its own port
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
    import tempfile

    from filelock import FileLock

    # setuptools stages every build of this checkout in its one `build/` folder: two builds at once (a fleet
    # beside a deploy, parallel test processes) take turns, and each starts from an empty folder, since
    # setuptools packs whatever that folder holds (a module moved or deleted since an earlier build would
    # ship again)
    key = hashlib.sha256(str(PROJECT_ROOT).encode()).hexdigest()[:12]
    with FileLock(str(Path(tempfile.gettempdir()) / f"sdxl-deploy-wheel-{key}.lock")):
        shutil.rmtree(PROJECT_ROOT / "build", ignore_errors=True)
        result = subprocess.run(_wheel_command(out_dir), capture_output=True, text=True, timeout=600)
    wheels = sorted(out_dir.glob("sdxl_deploy-*.whl"))
    if result.returncode != 0 or not wheels:
        raise DeployError(f"building the wheel failed: {(result.stderr or result.stdout).strip()[-800:]}")
    return wheels[-1]


def _wheel_command(out_dir: Path) -> list[str]:
    return [
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


# Run by the box's python: make `<release>/venv` (no pip of its own: the box's pip runs in it) whose
# site-packages ends with a .pth naming the box python's own package folders, so the release sees the box's
# torch behind its own packages; print the venv's python and site-packages as JSON. `venv
# --system-site-packages` alone is not enough: a box python that is itself a venv or conda env would give
# the release its base interpreter's packages, not its own.
_RELEASE_ENV_SCRIPT = """\
import json, os, site, subprocess, sys, venv
env_dir = sys.argv[1]
site_dirs = set(site.getsitepackages())
if site.ENABLE_USER_SITE:
    site_dirs.add(site.getusersitepackages())
first = next((i for i, p in enumerate(sys.path) if p in site_dirs), len(sys.path))
box_paths = [p for p in sys.path[first:] if os.path.isdir(p)]
venv.EnvBuilder(with_pip=False, symlinks=True, clear=True).create(env_dir)
python = os.path.join(env_dir, "bin", "python")
own = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                     capture_output=True, text=True, check=True, env={}).stdout.strip()
with open(os.path.join(own, "_sdxl_deploy_box_site.pth"), "w") as pth:
    pth.write("".join(p + "\\n" for p in box_paths))
print(json.dumps({"python": python, "site": own, "box_paths": box_paths}))
"""


def upload_wheelhouse(host: Host, local_dir: Path, remote_dir: str) -> int:
    """Upload the wheelhouse's wheels that the box does not hold yet (same sha256 and size); how many."""
    wheels = sorted(local_dir.glob("*.whl"))
    if not wheels:
        raise DeployError(f"new.wheelhouse {str(local_dir)!r} holds no .whl files")
    make_dirs(host, remote_dir)
    there = digests(host, [f"{remote_dir}/{w.name}" for w in wheels])
    sent = 0
    for local in wheels:
        remote = f"{remote_dir}/{local.name}"
        held = there[remote]
        if held is None or (held.sha256, held.size) != (sha256_file(local), local.stat().st_size):
            host.put(local, f"{remote}.part")
            run_checked(host, f"mv -f -- {q(f'{remote}.part', remote)}", f"moving {remote} into place")
            sent += 1
    return sent


@task(cache_policy=NO_CACHE)
def ship_release(
    host: Host, target: Target, wheel: Path, fixes: list[str] | None = None, box_torch: str | None = None
) -> Release:
    """Upload the wheel, check its size and sha256 on the host, build the release's own environment.

    `fixes`: requirements installed over the box's versions (from preflight); `box_torch`: the box's torch
    version, pinned so that no install can ever replace it.
    """
    log = run_logger()
    sha = sha256_file(wheel)
    version = wheel.name.split("-")[1]
    release_id = f"{version}-{sha[:12]}"
    path = f"{target.new.install_dir}/releases/{release_id}"
    venv, remote_wheel = f"{path}/venv", remote_child(path, wheel)
    python, marker = f"{venv}/bin/python", f"{venv}/.installed"
    pins = [f"torch=={box_torch}"] if box_torch else []
    recipe = "\n".join([sha, *sorted(fixes or []), *pins]) + "\n"
    if read_text(host, marker) == recipe:
        site = run_checked(
            host, f"{q(python)} -c {q('import site; print(site.getsitepackages()[0])')}", f"running {python}"
        )
        log.info("release %s is already installed at %s", release_id, path)
        return Release(
            release_id=release_id, path=path, site=site.strip(), wheel_sha256=sha, reused=True, python=python
        )

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

    index: list[str] = []
    if target.new.wheelhouse:
        remote_wheelhouse = f"{target.new.install_dir}/wheelhouse"
        sent = upload_wheelhouse(host, Path(target.new.wheelhouse).expanduser(), remote_wheelhouse)
        log.info("wheelhouse: %d new wheel(s) uploaded to %s", sent, remote_wheelhouse)
        index = ["--no-index", "--find-links", remote_wheelhouse]
    made = run_checked(
        host,
        f"{q(target.new.python)} -E -c {q(_RELEASE_ENV_SCRIPT)} {q(venv)}",
        f"creating the release environment {venv} with {target.new.python}",
        timeout=300,
    )
    site = json_answer(made, ReleaseEnv).site
    constraints = f"{path}/box-pins.txt"
    write_text(host, constraints, "".join(f"{pin}\n" for pin in pins))
    pip = f"env -u PYTHONPATH {q(python)} -m pip install --disable-pip-version-check -q"
    run_checked(
        host,
        f"{pip} --no-index --no-deps --ignore-installed {q(remote_wheel)}",
        f"installing {wheel.name} into {venv}",
        timeout=600,
    )
    run_checked(
        host,
        f"{pip} {q(*index)} -r {q(f'{site}/service/requirements.txt')} -c {q(constraints)} {q(*(fixes or []))}",
        f"installing the service's dependencies into {venv}"
        + (f" (with {', '.join(fixes)})" if fixes else ""),
        timeout=1200,
    )
    write_text(host, marker, recipe)
    log.info(
        "shipped %s (%d bytes, sha256 %s...) to %s, environment %s%s",
        wheel.name,
        wheel.stat().st_size,
        sha[:12],
        path,
        venv,
        f" with {', '.join(fixes)}" if fixes else "",
    )
    return Release(release_id=release_id, path=path, site=site, wheel_sha256=sha, reused=False, python=python)


@task(cache_policy=NO_CACHE)
def check_compile(host: Host, release: Release, device: str = "auto") -> CompileCheck:
    """Run `python -m service.compile_check --device DEVICE` with the release's python (changes nothing)."""
    result = host.run(
        f"cd {q(release.path)} && env -u PYTHONPATH {q(release.python)} -m service.compile_check "
        f"--device {q(device)}",
        timeout=600,
    )
    try:
        check = json_answer(result.stdout, CompileCheck)
    except ValueError:
        answer = (result.stderr or result.stdout).strip()[-300:]
        check = CompileCheck(ok=False, device=device, torch="?", error=f"exit {result.exit_code}: {answer}")
    run_logger().info("compile check with %s: %s", release.python, check.model_dump_json())
    return check


@task(cache_policy=NO_CACHE)
def stop_service(host: Host, process: ProcessInfo, port: int, timeout_s: float) -> str:
    """Stop a service by its recorded PID (TERM, wait, KILL) and wait until its port is free."""
    outcome = stop_process(host, process, timeout_s)
    wait_port_free(host, port)
    run_logger().info(outcome)
    return outcome


def serve_argv(target: Target, python: str | None = None, stage_port: int | None = None) -> list[str]:
    """The service's command line; `python` is the release's interpreter (default: the target's); `stage_port`
    (staged): it listens there while its own port is held, and takes its own port over on SIGUSR1."""
    new = target.new
    return [
        python or new.python,
        "-m",
        "sdxl_deploy.cli",
        "serve",
        "--model",
        new.model,
        "--host",
        "127.0.0.1",
        "--port",
        str(new.port),
        *(["--stage-port", str(stage_port)] if stage_port is not None else []),
        *(["--ready-sizes", ",".join(target.ready_sizes)] if target.ready_sizes else []),
        *new.serve_args,
    ]


def service_launch(
    target: Target, release: Release, stage_port: int | None = None, *, offline: bool = False
) -> Launch:
    """How the new service starts from the release: its argv, folder, environment and secret references (the
    compile step, `flows/stages/compile.py`, runs with the very same). `offline`: HF_HUB_OFFLINE=1."""
    new = target.new
    hub = {"HF_HUB_OFFLINE": "1"} if offline else {}
    return Launch(
        argv=serve_argv(target, release.python, stage_port),
        workdir=release.path,
        env={"PYTHONPATH": "", **new.env, **hub},  # the release's own environment only
        secret_env=new.secret_env,
        install_dir=new.install_dir,
        log_file=new.log_file,
        pid_file=new.pid_file,
    )


@task(cache_policy=NO_CACHE)
def start_new_service(
    host: Host, target: Target, release: Release, stage_port: int | None = None, *, offline: bool = False
) -> Started:
    """Start the new service from the release, detached under its restart-loop supervisor, with its pid
    file and log file; its environment (secrets included) goes through a private env file. `stage_port`
    (staged): beside the old service, on that port until the cut-over (`flows/stages/cutover.py`). `offline`:
    its weights are in the box's hub cache (stage `prefetch`), so it starts with HF_HUB_OFFLINE=1."""
    new = target.new
    offset = file_size(host, new.log_file) or 0
    launch = service_launch(target, release, stage_port, offline=offline)
    process = start_supervised(host, launch)
    port = new.port if stage_port is None else stage_port
    run_logger().info(
        "started %s under its supervisor on port %d, log %s", process.describe(), port, new.log_file
    )
    return Started(
        process=process,
        port=port,
        log_file=new.log_file,
        log_offset=offset,
        install_dir=new.install_dir,
        launch=launch,
    )
