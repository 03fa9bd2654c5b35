"""`python -m sdxl_deploy.cli serve` in its own process on a free loopback port: started, waited for until
`/ready`, stopped by its PID. The one launcher of the benchmark and the tests (`tests/support/servers.py`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import httpx

from flows.box.ports import free_port

REPO = Path(__file__).resolve().parents[1]


def wait_ready(
    url: str, timeout: float = 180.0, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    """Poll `{url}/ready` until it answers 200; fail early, with the log's tail, if the process died."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5) as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"service exited with {proc.returncode} before it was ready{_tail_suffix(log)}"
                )
            try:
                if client.get(f"{url}/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s{_tail_suffix(log)}")


class ServiceProcess:
    """`sdxl-deploy serve --model MODEL` as a child process, on a free loopback port.

    `start()` spawns it from the repository root with the environment of this process plus `env` (this checkout
    first on PYTHONPATH) and waits for `/ready`; `stop()` sends SIGTERM to its PID, then kills it after
    `stop_timeout_s`. Output goes to `log` (discarded without one). Use it as a context manager.
    `port` fixes the port (`--port`); with `stage_port` too (`--stage-port`, the caller holds `port`) it waits for
    `/ready` on the stage port, where the service stages. `args` are more `serve` options.
    """

    def __init__(
        self,
        model: str | Path,
        *,
        env: dict[str, str] | None = None,
        log: Path | None = None,
        ready_timeout_s: float = 180.0,
        stop_timeout_s: float = 30.0,
        port: int | None = None,
        stage_port: int | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.model, self.env, self.log = str(model), dict(env or {}), log
        self.port, self.stage_port, self.args = port, stage_port, tuple(args)
        self.ready_timeout_s, self.stop_timeout_s = ready_timeout_s, stop_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.spawned_at = (
            0.0  # time.time() at the spawn: the epoch the service's own milestones are compared with
        )
        self.ready_s: float | None = None  # spawn -> first 200 from /ready, as this client saw it
        self._out: IO[bytes] | None = None

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    def start(self) -> ServiceProcess:
        """Spawn the service and wait for `/ready` (RuntimeError if it exits first, TimeoutError if too slow)."""
        port = self.port or free_port()
        # torch puts its default Inductor cache in the environment once used; the child uses its own setting
        inherited = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        env = {**inherited, "PYTHONPATH": pythonpath, **self.env}
        command = [
            sys.executable,
            "-m",
            "sdxl_deploy.cli",
            "serve",
            "--model",
            self.model,
            "--port",
            str(port),
            *(("--stage-port", str(self.stage_port)) if self.stage_port else ()),
            *self.args,
        ]
        self.url = f"http://127.0.0.1:{self.stage_port or port}"
        self._out = open(self.log, "wb") if self.log else None  # noqa: SIM115 - closed in stop()
        started = time.perf_counter()
        self.spawned_at = time.time()
        self.proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=self._out or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_ready(self.url, self.ready_timeout_s, proc=self.proc, log=self.log)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.perf_counter() - started
        return self

    def stop(self) -> None:
        """SIGTERM to the PID, then SIGKILL after `stop_timeout_s`; safe to call twice."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._out is not None:
            self._out.close()
            self._out = None

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log, lines)


def run_compile_step(
    model: str | Path, env: dict[str, str], log: Path, timeout_s: float = 3600.0
) -> dict[str, Any]:
    """`sdxl-deploy serve --model MODEL --compile-only` (the compile step) with the environment `ServiceProcess`
    gives the service plus `env`; its JSON report, with `wall_s` added. Its log (stderr) goes to `log`."""
    inherited = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "sdxl_deploy.cli", "serve", "--model", str(model), "--compile-only"]
    started = time.perf_counter()
    with open(log, "wb") as err:
        done = subprocess.run(
            command,
            cwd=REPO,
            env={**inherited, "PYTHONPATH": pythonpath, **env},
            stdout=subprocess.PIPE,
            stderr=err,
            timeout=timeout_s,
        )
    if done.returncode != 0:
        raise RuntimeError(f"the compile step exited {done.returncode}{_tail_suffix(log)}")
    report: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    report["wall_s"] = round(time.perf_counter() - started, 1)
    return report


def log_tail(log: Path | None, lines: int = 30) -> str:
    """The last `lines` lines of a log file ("" without one)."""
    if log is None:
        return ""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _tail_suffix(log: Path | None) -> str:
    tail = log_tail(log)
    return f": {tail}" if tail else ""
