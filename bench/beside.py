"""Staged beside the old service, on one card, in one command: `sdxl-deploy bench-beside`.

1. The old service: SD1.5 in the seed's set-up (fp16, attention slicing, VAE slicing, compile off), on port A.
2. A steady load on port A: the app's request, one at a time, every request's latency and outcome recorded with
   the phase it was sent in (`PHASES`).
3. The new service staged beside it as a deploy starts it (`serve --model NEW --port A --stage-port B`, compile
   as it ships, on an empty compile cache), waited for until `/ready` on B. Memory of each process is sampled
   all along: VRAM from `nvidia-smi --query-compute-apps` on a GPU, RSS (psutil) on the CPU (said so).
4. The cut-over as the deploy does it (`flows/stages/cutover.py`): SIGUSR1 to the new service, SIGTERM to the old
   one once the new one says `taking_over` (the old finishes what is in flight), until `/health` on A is the new
   service listening on A; meanwhile `/health` on A every 0.25 s. The longest outage is worked out from the
   health probes and the load's requests together, by `flows.evidence.downtime.summarize` (the deploy's own arithmetic).
5. A plain-text table printed last and `beside.json` (every request and sample too) under `--out`.

Prefect is not on the GPU box, so this does not import `flows/stages/cutover.py` or `flows/record/prober.py`;
it repeats their few steps with the process handles it owns. Generated models are built before anything
starts, so the new service's start is load and compile only.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.launch import ServiceProcess, free_port
from flows.evidence.downtime import Probe, summarize
from service.schema import HealthResponse, ServiceHealth, serving

log = logging.getLogger("bench")

STOP_TIMEOUT_S = 15.0  # SIGTERM, then SIGKILL after this (the old service finishes its request in flight)
PHASES = ("before", "new start", "staged", "cutover", "after")
PHASE_HELP = {
    "old start": "the old service starting (no load yet)",
    "before": "the old service alone",
    "new start": "the new service starting (load + compile) until /ready on the stage port",
    "staged": "the new service ready on the stage port, idle",
    "cutover": "SIGUSR1 to the new service, SIGTERM to the old once it says taking_over, until the new one "
    "answers on the app's port",
    "after": "the new service on the app's port",
}
# The seed's SD1.5 set-up (`service/settings.py`): fp16, attention + VAE slicing, no compile
SEED_SETUP = {
    "SDXL_DTYPE": "float16",
    "SDXL_ATTENTION_SLICING": "true",
    "SDXL_VAE_SLICING": "true",
    "SDXL_COMPILE": "off",
}


@dataclass
class BesideConfig:
    """What one run does (CLI options of `bench-beside`)."""

    out: Path = Path("beside-out")
    work: Path = Path("/tmp/sdxl-beside")
    old_model: str = "synthetic-sd15"
    new_model: str = "synthetic-sdxl"
    models_dir: Path | None = None  # where generated models are built (None: the service's default)
    size: int = 512
    steps: int = 20
    before_s: float = 20.0
    staged_s: float = 3.0
    after_s: float = 15.0
    port: int = 0  # 0: a free port
    stage_port: int = 0
    new_ready_sizes: str = ""  # serve --ready-sizes of the new service ("" = as `serve` ships)
    ready_timeout_s: float = 480.0
    cutover_timeout_s: float = 30.0
    health_every_s: float = 0.25
    sample_every_s: float = 0.5


@dataclass
class BesideResults:
    meta: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Any] = field(default_factory=dict)
    new_start: dict[str, Any] = field(default_factory=dict)
    cutover: dict[str, Any] = field(default_factory=dict)
    downtime: dict[str, Any] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Phase:
    """The phase the run is in, and when each began (seconds since the run started)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.name = "old start"
        self.began: dict[str, float] = {"old start": 0.0}

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    def enter(self, name: str) -> None:
        self.name = name
        self.began[name] = self.now()
        log.info("phase %s (t=%.1f s): %s", name, self.began[name], PHASE_HELP[name])


class Loop(threading.Thread):
    """Runs `step` until stopped; `step` returns how long to wait before the next call."""

    def __init__(self, name: str, step: Any) -> None:
        super().__init__(name=name, daemon=True)
        self.step, self.stopped = step, threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            self.stopped.wait(self.step())

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=60)


def app_request(c: BesideConfig) -> dict[str, Any]:
    return {
        "prompt": "a lighthouse on a cliff at dusk, oil painting",
        "num_inference_steps": c.steps,
        "width": c.size,
        "height": c.size,
        "seed": 1234,
        "output_format": "png",
    }


class Load:
    """The app's request to the app's port, one at a time; each recorded as a `Probe` of kind "app" and a row
    with its phase."""

    def __init__(self, url: str, body: dict[str, Any], phase: Phase) -> None:
        self.url, self.body, self.phase = url, body, phase
        self.client = httpx.Client(timeout=600)
        self.rows: list[dict[str, Any]] = []
        self.probes: list[Probe] = []

    def step(self) -> float:
        phase, sent, started = self.phase.name, self.phase.now(), time.monotonic()
        status, ok, error = None, False, ""
        try:
            answer = self.client.post(f"{self.url}/generate", json=self.body)
            status = answer.status_code
            ok = status == 200 and answer.json().get("success") is True
            error = "" if ok else answer.text[:200]
        except (httpx.HTTPError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:200]
        latency = round(time.monotonic() - started, 4)
        self.rows.append(
            {"phase": phase, "at_s": sent, "latency_s": latency, "ok": ok, "status": status, "error": error}
        )
        self.probes.append(Probe(kind="app", at_s=sent, ok=ok, status=status, latency_s=latency, error=error))
        return 0.0


class Health:
    """`/health` on the app's port every `every_s` (the deploy's prober's health half)."""

    def __init__(self, url: str, every_s: float, phase: Phase) -> None:
        self.url, self.every_s, self.phase = url, every_s, phase
        self.client = httpx.Client(timeout=5)
        self.probes: list[Probe] = []

    def step(self) -> float:
        sent, started = self.phase.now(), time.monotonic()
        status, ok, error = None, False, ""
        try:
            answer = self.client.get(f"{self.url}/health")
            status = answer.status_code
            ok = status == 200 and serving(ServiceHealth.of(answer.json()))
        except (httpx.HTTPError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:200]
        latency = time.monotonic() - started
        self.probes.append(
            Probe(kind="health", at_s=sent, ok=ok, status=status, latency_s=round(latency, 4), error=error)
        )
        return max(self.every_s - latency, 0.0)


class Memory:
    """Memory of the two service processes every `every_s`: VRAM per PID from nvidia-smi where there is one,
    else RSS (psutil)."""

    def __init__(self, every_s: float, phase: Phase) -> None:
        self.every_s, self.phase = every_s, phase
        self.gpu = shutil.which("nvidia-smi") is not None
        self.pids: dict[str, int] = {}  # "old" / "new" -> PID
        self.samples: list[dict[str, Any]] = []

    @property
    def measure(self) -> str:
        if self.gpu:
            return "VRAM per process, nvidia-smi --query-compute-apps=pid,used_memory (MiB)"
        return "RSS per process, psutil (MiB): no GPU here, so not VRAM"

    def step(self) -> float:
        started = time.monotonic()
        row: dict[str, Any] = {"at_s": self.phase.now(), "phase": self.phase.name}
        used = self._gpu_used() if self.gpu else self._rss()
        for role, pid in list(self.pids.items()):
            row[role] = used.get(pid)
        if self.gpu:
            row["card_used_mib"] = self._card_used()
        self.samples.append(row)
        return max(self.every_s - (time.monotonic() - started), 0.0)

    def _gpu_used(self) -> dict[int, float]:
        rows = _smi("--query-compute-apps=pid,used_memory")
        used: dict[int, float] = {}
        for line in rows.splitlines():
            with suppress(ValueError):
                pid, mib = (x.strip() for x in line.split(","))
                used[int(pid)] = float(mib)
        return used

    def _card_used(self) -> float | None:
        with suppress(ValueError):
            return float(_smi("--query-gpu=memory.used").splitlines()[0])
        return None

    def _rss(self) -> dict[int, float]:
        import psutil

        used: dict[int, float] = {}
        for pid in self.pids.values():
            with suppress(psutil.Error):
                used[pid] = round(psutil.Process(pid).memory_info().rss / 2**20, 1)
        return used

    def peaks(self) -> dict[str, Any]:
        """Peak of each process, of both at once, and of the old one before / while the new one started."""

        def peak(rows: list[dict[str, Any]], key: str) -> float | None:
            values = [r[key] for r in rows if r.get(key) is not None]
            return max(values) if values else None

        both = [
            {"both": r["old"] + r["new"]}
            for r in self.samples
            if r.get("old") is not None and r.get("new") is not None
        ]
        before = [r for r in self.samples if r["phase"] == "before"]
        out = {
            "measure": self.measure,
            "samples": len(self.samples),
            "old_peak_mib": peak(self.samples, "old"),
            "old_before_new_mib": peak(before, "old"),
            "new_peak_mib": peak(self.samples, "new"),
            "both_peak_mib": peak(both, "both"),
        }
        if self.gpu:
            card = [r for r in self.samples if r.get("card_used_mib") is not None]
            out["card_peak_mib"] = peak(card, "card_used_mib")
            # before either service: what the card held already (this process's CUDA context, others)
            out["card_at_start_mib"] = card[0]["card_used_mib"] if card else None
            if out["old_peak_mib"] is None:
                out["note"] = "nvidia-smi listed no PID of ours (another PID namespace?): see card_peak_mib"
        return out


def _smi(query: str) -> str:
    return subprocess.run(
        ["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20
    ).stdout.strip()


def latency_by_phase(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per phase: requests, failures, p50 / p95 / max of the successful ones (s)."""
    out: dict[str, Any] = {}
    for phase in PHASES:
        mine = [r for r in rows if r["phase"] == phase]
        good = [r["latency_s"] for r in mine if r["ok"]]
        out[phase] = {
            "requests": len(mine),
            "failed": sum(not r["ok"] for r in mine),
            "p50_s": round(float(np.percentile(good, 50)), 4) if good else None,
            "p95_s": round(float(np.percentile(good, 95)), 4) if good else None,
            "max_s": round(max(good), 4) if good else None,
        }
    return out


def wait_serving(url: str, model: str, port: int, deadline: float) -> tuple[HealthResponse, float]:
    """Poll `/health` on the app's port until it is the new service listening there (flows/stages/cutover.py's
    `serves_port`); (its body, when it was first seen)."""
    body: HealthResponse | None = None
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            with suppress(httpx.HTTPError, ValueError):  # pydantic's ValidationError is a ValueError
                body = HealthResponse.model_validate(client.get(f"{url}/health").json())
            if body is not None and body.model == model and port in body.listening:
                return body, time.monotonic()
            time.sleep(0.02)
    last = body.model_dump(mode="json") if body is not None else None
    raise TimeoutError(f"the new service did not answer on port {port} in time (last /health: {last})")


def cut_over(
    new: ServiceProcess, old: ServiceProcess, app_url: str, model: str, port: int, timeout_s: float
) -> dict[str, Any]:
    """As `flows/stages/cutover.py`: SIGUSR1 to the new service, SIGTERM to the old one (and wait for it) once
    the new one's `/health` (on its staging port, `new.url`) says `taking_over`, while a second thread
    watches the app's port for the new service; the figures of the cut-over."""
    told = time.monotonic()
    os.kill(new.pid, signal.SIGUSR1)
    while not HealthResponse.model_validate(httpx.get(f"{new.url}/health", timeout=5).json()).taking_over:
        if time.monotonic() - told > timeout_s:
            raise TimeoutError("the new service did not say taking_over after SIGUSR1")
        time.sleep(0.02)
    taking_over_s = time.monotonic() - told
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cutover-watch") as pool:
        watch = pool.submit(wait_serving, app_url, model, port, told + timeout_s)
        old.stop()
        old_stopped_s = time.monotonic() - told
        health, seen_at = watch.result()
    return {
        "usr1_to_new_on_app_port_s": round(seen_at - told, 3),
        "usr1_to_taking_over_s": round(taking_over_s, 3),
        "old_stopped_s": round(old_stopped_s, 3),
        "new_listening": health.listening,
        "new_staged": health.staged,
        "model_on_app_port": health.model,
    }


def build_models(c: BesideConfig) -> Path:
    """Build the generated models before anything starts (the new service's start is then load + compile)."""
    import torch

    from service.models import resolve_model
    from service.settings import default_cache_dir

    models = c.models_dir or default_cache_dir()
    for name in (c.old_model, c.new_model):
        started = time.perf_counter()
        resolve_model(name, models)
        log.info("model %s in %s (%.1f s)", name, models, time.perf_counter() - started)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return models


class Stopped(BaseException):
    """SIGTERM to the benchmark (e.g. from `timeout`)."""


def _stopped(*_: object) -> None:
    raise Stopped("SIGTERM: the run was cut short; the figures are what it had measured")


def run_beside(c: BesideConfig) -> BesideResults:
    """Every step; `beside.json` and `table.txt` under `c.out`; the table printed last."""
    from bench.measure import environment

    c.out.mkdir(parents=True, exist_ok=True)
    c.work.mkdir(parents=True, exist_ok=True)
    r = BesideResults(meta={**environment(), "config": {k: str(v) for k, v in asdict(c).items()}})
    if threading.current_thread() is threading.main_thread():
        # `timeout` ends the command: stop the services, keep the figures
        signal.signal(signal.SIGTERM, _stopped)
    try:
        _run(c, r)
    except (Exception, Stopped) as exc:  # recorded; the services are stopped in _run
        log.exception("bench-beside failed")
        r.errors.append(f"{type(exc).__name__}: {exc}")
    (c.out / "beside.json").write_text(json.dumps(asdict(r), indent=2, default=str) + "\n", encoding="utf-8")
    text = beside_table(r)
    (c.out / "table.txt").write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
    return r


def _run(c: BesideConfig, r: BesideResults) -> None:
    models = build_models(c)
    port, stage_port = c.port or free_port(), c.stage_port or free_port()
    app_url = f"http://127.0.0.1:{port}"
    r.meta["ports"] = {"app": port, "stage": stage_port}
    compile_cache = c.work / "compile-cache-new"
    shutil.rmtree(compile_cache, ignore_errors=True)  # a first deploy compiles from nothing
    env = {"SDXL_CACHE_DIR": str(models)}
    gpu = shutil.which("nvidia-smi") is not None
    old_env = {**env, **SEED_SETUP} if gpu else {**env, **SEED_SETUP, "SDXL_DTYPE": "auto"}
    r.meta["old_service_env"] = old_env
    old = ServiceProcess(
        c.old_model,
        env=old_env,
        log=c.out / "serve-old.log",
        port=port,
        ready_timeout_s=c.ready_timeout_s,
        stop_timeout_s=STOP_TIMEOUT_S,
    )
    new = ServiceProcess(
        c.new_model,
        env={**env, "SDXL_COMPILE_CACHE_DIR": str(compile_cache)},
        log=c.out / "serve-new.log",
        port=port,
        stage_port=stage_port,
        args=("--ready-sizes", c.new_ready_sizes) if c.new_ready_sizes else (),
        ready_timeout_s=c.ready_timeout_s,
        stop_timeout_s=STOP_TIMEOUT_S,
    )
    phase = Phase()
    load = Load(app_url, app_request(c), phase)
    health = Health(app_url, c.health_every_s, phase)
    memory = Memory(c.sample_every_s, phase)
    loops = [Loop("memory", memory.step)]
    loops[0].start()
    try:
        _watch_pid(old, "old", memory)
        old.start()
        phase.enter("before")
        loops += [Loop("load", load.step), Loop("health", health.step)]
        for loop in loops[1:]:
            loop.start()
        _hold(load, "before", c.before_s, c.ready_timeout_s)

        phase.enter("new start")
        started = time.monotonic()
        _watch_pid(new, "new", memory)
        new.start()
        new_health = HealthResponse.model_validate(httpx.get(f"{new.url}/health", timeout=5).json())
        r.new_start = {
            "ready_s": round(time.monotonic() - started, 2),
            "staged": new_health.staged,
            "listening": new_health.listening,
            "model": new_health.model,
            "startup": new_health.startup.model_dump(mode="json"),
        }
        phase.enter("staged")
        time.sleep(c.staged_s)

        phase.enter("cutover")
        r.cutover = cut_over(new, old, app_url, new_health.model, port, c.cutover_timeout_s)
        phase.enter("after")
        _hold(load, "after", c.after_s, c.ready_timeout_s)
    finally:
        for loop in reversed(loops[1:]):
            loop.stop()  # the load's request in flight finishes first
        loops[0].stop()
        new.stop()
        old.stop()
        r.requests, r.samples = load.rows, memory.samples
        r.latency = latency_by_phase(load.rows)
        r.memory = memory.peaks()
        r.memory["pids"] = dict(memory.pids)
        downtime = summarize(health.probes + load.probes, "staged")
        r.downtime = {
            **downtime.model_dump(),
            "failed_load_requests": sum(not row["ok"] for row in load.rows),
            "load_requests": len(load.rows),
            "first_failures": [row for row in load.rows if not row["ok"]][:5],
        }


def _hold(load: Load, phase: str, seconds: float, timeout_s: float) -> None:
    """Stay in a phase `seconds`, and until one request sent in it has its answer (every phase has a figure)."""
    time.sleep(seconds)
    deadline = time.monotonic() + timeout_s
    while not any(row["phase"] == phase for row in load.rows) and time.monotonic() < deadline:
        time.sleep(0.05)


def _watch_pid(process: ServiceProcess, role: str, memory: Memory) -> None:
    """Sample a service's memory from its spawn on (`start` blocks until it is ready)."""

    def watch() -> None:
        deadline = time.monotonic() + 60
        while process.proc is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if process.proc is None:
            return
        memory.pids[role] = process.proc.pid

    threading.Thread(target=watch, name="new-pid", daemon=True).start()


def _f(value: Any, unit: str = "s") -> str:
    if value is None:
        return "-"
    return f"{value:.3f} s" if unit == "s" else f"{value:,.0f} MiB"


def beside_table(r: BesideResults) -> str:
    """The run in plain text: memory, the load's latency per phase, the cut-over."""
    cfg = r.meta.get("config", {})
    lines = [
        f"card: {r.meta.get('gpu')}  torch {r.meta.get('torch')}  diffusers {r.meta.get('diffusers')}",
        f"old {cfg.get('old_model')} (seed set-up: fp16, attention + VAE slicing, compile off) on the app's port; "
        f"new {cfg.get('new_model')} staged beside it (compile as it ships); load: {cfg.get('size')}px "
        f"{cfg.get('steps')} steps, one request at a time",
        "",
    ]
    m = r.memory
    if m:
        lines += [
            f"memory: {m.get('measure')}",
            f"  old alone {_f(m.get('old_before_new_mib'), 'MiB')}, old peak {_f(m.get('old_peak_mib'), 'MiB')}, "
            f"new peak {_f(m.get('new_peak_mib'), 'MiB')}, both at once peak {_f(m.get('both_peak_mib'), 'MiB')}"
            + (
                f", card peak {_f(m.get('card_peak_mib'), 'MiB')} (at start {_f(m.get('card_at_start_mib'), 'MiB')})"
                if "card_peak_mib" in m
                else ""
            ),
            "",
        ]
    head = f"{'load, phase':12} {'requests':>9} {'failed':>7} {'p50':>9} {'p95':>9} {'max':>9}"
    lines += [head, "-" * len(head)]
    for phase, row in r.latency.items():
        lines.append(
            f"{phase:12} {row['requests']:>9} {row['failed']:>7} {_f(row['p50_s']):>9} "
            f"{_f(row['p95_s']):>9} {_f(row['max_s']):>9}"
        )
    lines.append("")
    if r.new_start:
        lines.append(
            f"new service: ready on the stage port {_f(r.new_start.get('ready_s'))} after spawning "
            f"(staged={r.new_start.get('staged')}, listening {r.new_start.get('listening')})"
        )
    if r.cutover:
        cut = r.cutover
        lines.append(
            f"cut-over: new service answering on the app's port {_f(cut['usr1_to_new_on_app_port_s'])} after "
            f"SIGUSR1 (old stopped after {_f(cut['old_stopped_s'])}); listening {cut['new_listening']}"
        )
    d = r.downtime
    if d:
        lines.append(
            f"downtime (health every 0.25 s + the load): longest outage {_f(d['longest_outage_s'])}, "
            f"{d['failed_requests']} of {d['probes']} probes failed; failed load requests "
            f"{d['failed_load_requests']} of {d['load_requests']}"
        )
    for err in r.errors:
        lines.append(f"ERROR {err}")
    return "\n".join(lines)
