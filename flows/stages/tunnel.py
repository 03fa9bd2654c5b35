"""The app's view: `/health` and one `/generate` exactly as the app sends it, through a fresh SSH local
port forward (the `ssh -L 7860:localhost:7860` tunnel the app uses); directly on a local target."""

from __future__ import annotations

import time

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.box.common import run_logger
from flows.box.hosts import Host
from flows.config.secrets import api_key
from flows.config.target import Target
from flows.evidence.results import AppCheck
from flows.stages.benchmark import check_image


@task(cache_policy=NO_CACHE)
def check_app_path(host: Host, target: Target, port: int | None = None) -> AppCheck:
    """Send `/health` and the app's request the way the app does (through a port forward on SSH), to `port`
    (default the new service's own: the app's)."""
    log = run_logger()
    new, payload = target.new, target.workload.app_request
    port = port or new.port
    width, height = target.workload.size
    key = api_key(new)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    health_ok = generate_ok = False
    seconds = None
    try:
        with host.forward(port) as local_port:
            url = f"http://127.0.0.1:{local_port}"
            health = httpx.get(f"{url}/health", timeout=30)
            health_ok = health.status_code == 200
            started = time.perf_counter()
            answer = httpx.post(
                f"{url}/generate", json=payload, headers=headers, timeout=target.workload.request_timeout_s
            )
            seconds = round(time.perf_counter() - started, 3)
            body = answer.json()
            image = check_image(body.get("image", ""), width, height) if body.get("success") else None
            generate_ok = answer.status_code == 200 and image is not None and image.ok
            detail = (
                f"/health {health.status_code}; /generate {answer.status_code} "
                f"{body.get('final_resolution', body.get('error', ''))} in {seconds} s"
                + (f" ({image.detail})" if image and not image.ok else "")
            )
    except (httpx.HTTPError, ValueError, OSError) as exc:
        detail = f"{type(exc).__name__}: {exc}"
    via = (
        f"local port forward to {host.name}:{port}"
        if host.is_remote
        else f"direct to port {port} (local target)"
    )
    log.info("app path via %s: %s", via, detail)
    return AppCheck(
        through_tunnel=host.is_remote,
        health_ok=health_ok,
        generate_ok=generate_ok,
        seconds=seconds,
        detail=f"{via}: {detail}",
    )
