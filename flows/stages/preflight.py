"""Preflight: look at the host and the current service, and refuse before anything is changed."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.box.capacity import read_gpus
from flows.box.common import get_health, retry_transient, run_logger, service_url
from flows.box.compat import StackVerdict, assess_stack
from flows.box.hostfs import free_disk_gb
from flows.box.hosts import Host, q
from flows.box.procs import find_service
from flows.config.target import Target
from flows.errors import PreflightRefused
from flows.evidence.results import CurrentFacts, HostFacts
from service.schema import serving

# What the box's python provides (module -> distribution), reported with versions and judged by
# `flows.box.compat`; the service's other dependencies come with each release's own environment.
BOX_PACKAGES: dict[str, str] = {
    "torch": "torch",
    "diffusers": "diffusers",
    "transformers": "transformers",
    "accelerate": "accelerate",
    "safetensors": "safetensors",
    "PIL": "pillow",
    "pip": "pip",
    "open_clip": "open_clip_torch",
}

# Disk a model needs on first start (weights download) plus a buffer, in GB.
DISK_NEEDED_GB: dict[str, float] = {
    "sdxl": 25.0,
    "synthetic-sdxl": 25.0,
    "sd15": 10.0,
    "synthetic-sd15": 10.0,
}
DEFAULT_DISK_NEEDED_GB = 1.0

_PACKAGES_SCRIPT = """\
import importlib.metadata as md, importlib.util as iu, json, sys
wanted = json.loads(sys.argv[1])
out = {"python": sys.version.split()[0], "executable": sys.executable, "packages": {}}
for module, dist in wanted.items():
    try:
        out["packages"][dist] = md.version(dist) if iu.find_spec(module) else None
    except md.PackageNotFoundError:
        out["packages"][dist] = "unknown"
try:
    import torch
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
except Exception as exc:
    out["torch_error"] = repr(exc)
print(json.dumps(out))
"""


def needed_disk_gb(target: Target) -> float:
    if target.new.min_free_disk_gb is not None:
        return target.new.min_free_disk_gb
    return DISK_NEEDED_GB.get(target.new.model, DEFAULT_DISK_NEEDED_GB)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def inspect_host(host: Host, target: Target) -> HostFacts:
    """Free disk, GPUs and VRAM, CUDA, and the versions of the box python's packages (judged by `flows.box.compat`)."""
    log = run_logger()
    problems: list[str] = []
    free = free_disk_gb(host, target.new.install_dir)
    needed = needed_disk_gb(target)
    if free < needed:
        problems.append(
            f"free disk at {target.new.install_dir} is {free:.1f} GB, need {needed:.1f} GB for {target.new.model}"
        )

    gpus, driver = read_gpus(host)
    result = host.run(
        f"{q(target.new.python)} -c {q(_PACKAGES_SCRIPT)} {q(json.dumps(BOX_PACKAGES))}", timeout=180
    )
    info: dict[str, Any] = {}
    if result.ok:
        info = json.loads(result.stdout.strip().splitlines()[-1])
    else:
        answer = (result.stderr or result.stdout).strip()[-300:]
        problems.append(f"python {target.new.python!r} does not run on {host.name}: {answer}")
    packages = info.get("packages", {})
    if info.get("torch_error"):
        problems.append(f"torch does not import: {info['torch_error']}")
    verdict = StackVerdict()
    if info:
        verdict = assess_stack(
            info.get("python"),
            packages,
            info.get("torch_cuda"),
            info.get("cuda_available"),
            has_gpu=bool(gpus),
            python=target.new.python,
        )
        problems.extend(verdict.refusals)
    for note in verdict.notes:
        log.warning(note)

    facts = HostFacts(
        free_disk_gb=round(free, 1),
        needed_disk_gb=needed,
        gpus=gpus,
        driver=driver,
        python=info.get("executable", target.new.python),
        python_version=info.get("python"),
        packages=packages,
        torch_cuda=info.get("torch_cuda"),
        cuda_available=info.get("cuda_available"),
        problems=problems,
        release_fixes=verdict.fixes,
        notes=verdict.notes,
    )
    gpu_text = ", ".join(f"{g.name} {g.free_gb:.1f}/{g.total_gb:.1f} GB free" for g in gpus) or "no GPU"
    log.info(
        "host %s: %.1f GB free (need %.1f), %s, python %s, torch %s (CUDA %s), diffusers %s, "
        "transformers %s, accelerate %s",
        host.name,
        free,
        needed,
        gpu_text,
        facts.python_version,
        packages.get("torch"),
        facts.torch_cuda,
        packages.get("diffusers"),
        packages.get("transformers"),
        packages.get("accelerate"),
    )
    return facts


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=retry_transient)
def inspect_current(host: Host, target: Target, baseline: bool = True) -> CurrentFacts:
    """The current service's process, its `/health`, and a baseline timing of one request."""
    log = run_logger()
    current = target.current
    problems: list[str] = []
    process = find_service(host, current.port, current.pid_file)
    if process is None:
        problems.append(f"no process listens on port {current.port} (the current service is not running)")
    health = health_error = baseline_s = baseline_error = None
    with service_url(host, current.port) as url:
        try:
            health = get_health(url, current.health_path)
            if not serving(health):
                problems.append(
                    f"current service on port {current.port} is not healthy: {health.model_dump()}"
                )
        except httpx.HTTPError as exc:
            health_error = f"{type(exc).__name__}: {exc}"
            problems.append(
                f"current service does not answer {current.health_path} on port {current.port}: {exc}"
            )
        if baseline and health is not None:
            baseline_s, baseline_error = _baseline(url, target)
    log.info(
        "current service: %s, health %s, baseline %s",
        process.describe() if process else "no process",
        (health.status or "200") if health is not None else health_error,
        f"{baseline_s:.2f} s" if baseline_s is not None else baseline_error,
    )
    return CurrentFacts(
        process=process,
        health=health,
        health_error=health_error,
        baseline_s=baseline_s,
        baseline_error=baseline_error,
        problems=problems,
    )


def _baseline(url: str, target: Target) -> tuple[float | None, str | None]:
    """Seconds for one app request at the current service's size (a failure is recorded, not fatal)."""
    started = time.perf_counter()
    try:
        response = httpx.post(
            f"{url}/generate",
            json=target.workload.baseline_request(),
            timeout=target.workload.request_timeout_s,
        )
        response.raise_for_status()
        if not response.json().get("image"):
            return None, "the answer has no image"
    except (httpx.HTTPError, ValueError) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    return round(time.perf_counter() - started, 3), None


def require_ready(host_facts: HostFacts, current: CurrentFacts) -> None:
    """Refuse, naming every problem, when the host or the current service is not ready for an upgrade."""
    problems = host_facts.problems + current.problems
    if problems:
        raise PreflightRefused("; ".join(problems))
