"""The new service's supervisor: a small POSIX sh restart loop that runs on the box.

Why a shell loop and not systemd or a Python supervisor: it needs nothing on the box but `sh` (rented
boxes are often containers without systemd, and the box's Python environment is never touched), it is
the process in the pid file, so stopping it by its PID group stops the service too, and it is small
enough to read in full below.

It restarts the service when it exits by itself (crash, OOM kill), with backoff (1, 2, 4 ... 30 s), and
appends one line per restart to `<install_dir>/sdxl-api.restarts`, which the warm-up and `verify-sdxl`
read. After `MAX_QUICK_CRASHES` exits in a row that each came less than 60 s after a start, it gives up
(a crash loop is a broken deploy, not a blip) and exits with the service's code. TERM/INT/HUP stop it
and the service; USR1 is passed on to the running service (the staged deploy's cut-over: "take your port
over", `service/server.py`). The service's environment comes from a private env file (0600), never the command
line, so a secret such as `SDXL_API_KEY` does not show in `ps`.
"""

from __future__ import annotations

from pydantic import BaseModel

from flows.box.hostfs import read_text, run_checked, write_text
from flows.box.hosts import Host, q
from flows.box.procs import start_detached
from flows.config.secrets import resolve_secret
from flows.evidence.results import ProcessInfo

MAX_QUICK_CRASHES = 3

SUPERVISOR_SCRIPT = r"""#!/bin/sh
# sdxl-deploy supervisor (written by deploy-sdxl): restart the service when it exits, with backoff.
# usage: sh supervise.sh MAX_QUICK_CRASHES COMMAND [ARGS...]; its env file and restart record lie beside it
here=$(dirname -- "$0")
restarts_file=$here/sdxl-api.restarts env_file=$here/sdxl-api.env max_quick=$1
shift
if [ -f "$env_file" ]; then . "$env_file"; fi
child='' service='' stopping=''
trap 'stopping=1; [ -n "$child" ] && kill -TERM "$child" 2>/dev/null' TERM INT HUP
trap '[ -n "$service" ] && kill -USR1 "$service" 2>/dev/null' USR1
count=0 quick=0 backoff=1
while :; do
  started=$(date +%s)
  "$@" &
  child=$! service=$!
  wait "$child"; code=$?
  while kill -0 "$child" 2>/dev/null; do wait "$child"; code=$?; done
  service=''
  [ -n "$stopping" ] && exit 0
  ran=$(( $(date +%s) - started ))
  count=$((count + 1))
  if [ "$ran" -lt 60 ]; then quick=$((quick + 1)); else quick=0; backoff=1; fi
  now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  if [ "$quick" -ge "$max_quick" ]; then
    echo "$now gave-up exit=$code ran=${ran}s restarts=$((count - 1))" >> "$restarts_file"
    echo "[supervisor] the service exited with $code after ${ran}s, $quick quick exits in a row: giving up" >&2
    exit "$code"
  fi
  echo "$now restart=$count exit=$code ran=${ran}s" >> "$restarts_file"
  echo "[supervisor] the service exited with $code after ${ran}s; restart $count in ${backoff}s" >&2
  sleep "$backoff" &
  child=$!
  wait "$child"
  [ -n "$stopping" ] && exit 0
  backoff=$((backoff * 2)); [ "$backoff" -gt 30 ] && backoff=30
done
"""


class Restarts(BaseModel):
    """What the supervisor recorded since the service was started."""

    count: int
    gave_up: bool
    last: str | None
    last_exit: int | None

    def describe(self) -> str:
        if self.gave_up:
            return f"the supervisor gave up after {self.count} restart(s): {self.last}"
        return f"{self.count} restart(s)" + (f", last {self.last}" if self.last else "")


def supervisor_paths(install_dir: str) -> tuple[str, str, str]:
    """(script, env file, restarts file) under the install dir."""
    return f"{install_dir}/supervise.sh", f"{install_dir}/sdxl-api.env", f"{install_dir}/sdxl-api.restarts"


def write_env_file(host: Host, path: str, env: dict[str, str]) -> None:
    """A private env file (0600) that `sh` sources (`. FILE`): how a service's environment, secrets included,
    reaches it without a command line (the supervisor's; the compile step's)."""
    write_text(host, path, "".join(f"export {name}={q(value)}\n" for name, value in env.items()))


def prepare_supervisor(host: Host, install_dir: str, env: dict[str, str]) -> list[str]:
    """Write the script and the private env file, reset the restart count; the argv prefix to start it."""
    script, env_file, restarts = supervisor_paths(install_dir)
    write_text(host, script, SUPERVISOR_SCRIPT)
    write_env_file(host, env_file, env)
    run_checked(host, f"rm -f -- {q(restarts)}", f"resetting {restarts}")
    return ["sh", script, str(MAX_QUICK_CRASHES)]


class Launch(BaseModel):
    """How a service is started under its supervisor: enough to start it again later, never a secret value
    (`secret_env` holds references such as `env:SDXL_API_KEY`, resolved again at each start)."""

    argv: list[str]  # the service's own argv; argv[0] is the interpreter
    workdir: str
    env: dict[str, str] = {}
    secret_env: dict[str, str] = {}
    install_dir: str  # where the supervisor's script, env file and restart record live
    log_file: str
    pid_file: str


def resolved_env(launch: Launch) -> dict[str, str]:
    """The launch's whole environment: `env` plus its `secret_env` references resolved now."""
    return {**launch.env, **{name: resolve_secret(source) for name, source in launch.secret_env.items()}}


def start_supervised(host: Host, launch: Launch) -> ProcessInfo:
    """Start `launch.argv` detached under the restart-loop supervisor, secrets resolved now."""
    supervisor = prepare_supervisor(host, launch.install_dir, resolved_env(launch))
    return start_detached(
        host,
        [*supervisor, *launch.argv],
        workdir=launch.workdir,
        log_file=launch.log_file,
        pid_file=launch.pid_file,
    )


def read_restarts(host: Host, install_dir: str) -> Restarts:
    """The restarts recorded by the supervisor (none when the file is missing)."""
    text = read_text(host, supervisor_paths(install_dir)[2]) or ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else None
    exit_code = None
    if last and "exit=" in last:
        value = last.split("exit=", 1)[1].split()[0]
        exit_code = int(value) if value.lstrip("-").isdigit() else None
    gave_up = bool(last and " gave-up " in f" {last} ")
    return Restarts(
        count=sum(1 for line in lines if " restart=" in line),
        gave_up=gave_up,
        last=last,
        last_exit=exit_code,
    )
