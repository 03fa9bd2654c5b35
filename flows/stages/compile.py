"""Compile: build the compiled functions the new service will load, on the box, in a process of its own.

The step is the service's own command line with `--compile-only` (`service/compile_step.py`): the release's
python, the release's folder, the service's environment (secrets through a private env file, as its
supervisor gets them; HF_HUB_OFFLINE=1 when prefetch put the weights in the box's cache), the same `serve`
arguments less the staging port. It loads the model as the service would, builds (or finds on disk and keeps)
every function the service loads at start, writes one JSON report as its last stdout line, and exits; it
never listens on a port. A staged deploy runs it while the old service serves; a stop-first one before the
old service stops where the card has room for both (`flows/box/capacity.py`), else after the stop.

It runs detached (a dropped SSH link does not end it); its log (stderr) is followed here: every line into
the run's `run.log`, the "saved compile:" progress and the warnings into the flow log. It is stopped after
`new.compile_timeout_s`. A non-zero exit, a timeout or a last line that is no report fails the stage.
`sdxl-deploy compile` runs the same step for the release that serves now (`flows.runbooks.commands`).
"""

from __future__ import annotations

import re
import shlex
import time
from collections import deque
from pathlib import PurePosixPath
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import ValidationError

from flows.box.common import run_logger
from flows.box.hostfs import file_size, json_answer, make_dirs, read_text, run_checked, tail_bytes
from flows.box.hosts import Host, q
from flows.box.procs import is_running, pid_from_file, process_info, start_detached, stop_process
from flows.box.supervisor import Launch, resolved_env, write_env_file
from flows.config.target import Target
from flows.errors import FlowError, HostUnreachable, ProcessError
from flows.evidence.results import CompileResult, ProcessInfo
from flows.record.runlog import service_log
from flows.stages.deploy import Release, service_launch
from service.schema import CompileReport

POLL_S = 1.0
LINK_GRACE_S = 120.0  # how long the SSH link may stay down while the step runs before the stage fails
RECENT_LINES = 30  # log lines a failure quotes
# Run by `sh` in the step's own session: source the private env file (secrets included) and delete it, run
# the step with its stdout (the report) in a file of its own, record its exit status.
_WRAPPER = """env_file=$1 out=$2 status=$3; shift 3
. "$env_file"; rm -f -- "$env_file"
"$@" > "$out"
echo $? > "$status"
"""
# `2026-12-03 10:00:00,123 WARNING service.saved_compile: message`: the step's logging format
_LOG_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) (?P<name>[\w.]+): (?P<message>.*)$")


def compile_argv(argv: list[str], jobs: int | None = None) -> list[str]:
    """The compile step's argv from the service's: the same, less the staging port, plus `--compile-only` (and
    `--compile-jobs` when given)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--stage-port":
            skip = True
        elif not arg.startswith("--stage-port="):
            out.append(arg)
    out = out if "--compile-only" in out else [*out, "--compile-only"]
    return out if jobs is None or jobs <= 1 else [*out, "--compile-jobs", str(jobs)]


def step_pid_file(install_dir: str) -> str:
    """Where the compile step's PID is kept (an interrupted run's step is found, and stopped, by it)."""
    return f"{install_dir}/compile.pid"


def step_launch(launch: Launch, jobs: int | None = None) -> Launch:
    """The compile step of a service's launch: its interpreter, arguments, folder and environment (secret
    references included), with `--compile-only`; its own log (`<log dir>/compile.log`) and pid file."""
    log_dir = str(PurePosixPath(launch.log_file).parent)
    return launch.model_copy(
        update={
            "argv": compile_argv(launch.argv, jobs),
            "log_file": f"{log_dir}/compile.log",
            "pid_file": step_pid_file(launch.install_dir),
        }
    )


@task(cache_policy=NO_CACHE)
def compile_functions(
    host: Host,
    target: Target,
    release: Release,
    *,
    offline: bool = False,
    where: str,
    jobs: int | None = None,
) -> CompileResult:
    """Run the compile step for the new service of `release` (its argv and environment as `start_new_service`
    gives them) in `jobs` processes side by side; `FlowError` when it fails. `where`: said in the log and
    the record."""
    launch = step_launch(service_launch(target, release, offline=offline), jobs)
    return run_step(host, launch, target.new.compile_timeout_s, where)


def run_step(host: Host, launch: Launch, timeout_s: float, where: str) -> CompileResult:
    """Run the compile step `launch` describes on the host, detached, follow its log, stop it after `timeout_s`;
    its report, or `FlowError` with its last log lines."""
    log = run_logger()
    log_dir = str(PurePosixPath(launch.log_file).parent)
    env_file, out, status = (
        f"{launch.install_dir}/compile.env",
        f"{log_dir}/compile.out",
        f"{log_dir}/compile.exit",
    )
    stop_leftover(host, launch.pid_file)
    make_dirs(host, log_dir, launch.install_dir)
    run_checked(host, f"rm -f -- {q(out, status)}", f"clearing {out}")
    command = shlex.join(launch.argv)
    log.info("compile step %s: %s (log %s)", where, command, launch.log_file)
    watch = _Watch(host, launch.log_file, file_size(host, launch.log_file) or 0)
    began = time.monotonic()
    write_env_file(host, env_file, resolved_env(launch))
    process: ProcessInfo | None = None
    try:
        try:
            process = start_detached(
                host,
                ["sh", "-c", _WRAPPER, "sdxl-compile-step", env_file, out, status, *launch.argv],
                workdir=launch.workdir,
                log_file=launch.log_file,
                pid_file=launch.pid_file,
            )
        except ProcessError:
            process = None  # it ended at once: its exit status and log say why
        watch.until_done(process, timeout_s)
    finally:
        _clean_up(host, process, env_file)
    seconds = round(time.monotonic() - began, 1)
    code = (read_text(host, status) or "").strip()
    if code != "0":
        why = f"exited with {code}" if code else "ended without an exit status (killed?)"
        raise FlowError(
            f"the compile step {why} after {seconds:.0f} s; last log lines:\n{watch.recent_text()}"
        )
    report = parse_report(read_text(host, out) or "", watch.recent_text())
    result = CompileResult(
        report=report,
        summary=describe(report, seconds),
        where=where,
        seconds=seconds,
        command=command,
        log_file=launch.log_file,
    )
    log.info("compile step done: %s", result.summary)  # its problems: logged as it ran, the run's warnings
    return result


def parse_report(stdout: str, recent: str = "") -> CompileReport:
    """The step's report: its last non-empty stdout line; `FlowError` when that is no report."""
    try:
        return json_answer(stdout, CompileReport)
    except ValueError as exc:
        lines = [line for line in stdout.splitlines() if line.strip()]
        got = repr(lines[-1][:300]) if lines else "nothing"
        problem = f": {exc.errors()[0]['msg']}" if isinstance(exc, ValidationError) else ""
        raise FlowError(
            f"the compile step exited 0 but its last stdout line is not a compile report{problem} (got {got}); "
            f"last log lines:\n{recent}"
        ) from None


def describe(report: CompileReport, seconds: float) -> str:
    """One line: what the step built or reused, or why it built nothing."""
    if not report.built:
        return f"{report.model}: {report.note or 'nothing built'}"
    peak = f", peak VRAM {report.peak_vram_gb:.1f} GiB" if report.peak_vram_gb is not None else ""
    if report.jobs > 1:
        peak = f" by {report.jobs} processes side by side{peak} (their peaks summed)"
    problems = f"; {len(report.problems)} problem(s), see the warnings" if report.problems else ""
    return (
        f"{report.model}: {len(report.functions)} compiled function(s) ready ({report.reused} reused from disk, "
        f"{report.compiled} compiled) in {seconds:.1f} s (load {report.load_s:.1f} s, compile "
        f"{report.compile_s:.1f} s){peak}{problems}"
    )


def stop_leftover(host: Host, pid_file: str) -> str | None:
    """Stop a compile step an interrupted run left running (its pid file names a live `--compile-only`
    process); what was done. The caller holds the host's deploy lock, so no other run's step is running."""
    pid = pid_from_file(host, pid_file)
    info = process_info(host, pid) if pid else None
    if info is None or "--compile-only" not in info.cmdline:
        return None
    outcome = stop_process(host, info, timeout_s=10)
    run_logger().warning("a compile step left running by an earlier run: %s", outcome)
    return outcome


def _clean_up(host: Host, process: ProcessInfo | None, env_file: str) -> None:
    """Stop the step when it still runs (a timeout, a failure here) and remove its env file if it is left."""
    try:
        if process is not None and is_running(host, process):
            run_logger().warning("stopping the compile step: %s", stop_process(host, process, timeout_s=10))
        host.run(f"rm -f -- {q(env_file)}")
    except Exception as exc:  # the link may be gone: the next step (or deploy) stops a leftover itself
        run_logger().warning("could not clean up after the compile step on %s: %s", host.name, exc)


class _Watch:
    """The running step as seen from here: its log into run.log, its progress and warnings into the flow log."""

    def __init__(self, host: Host, log_file: str, offset: int) -> None:
        self.host, self.log_file, self.offset = host, log_file, offset
        self.pending = ""
        self.recent: deque[str] = deque(maxlen=RECENT_LINES)
        self.log = run_logger()

    def follow(self) -> None:
        text, self.offset = tail_bytes(self.host, self.log_file, self.offset)
        lines = (self.pending + text).split("\n")
        self.pending = lines.pop()
        for line in lines:
            self._line(line.rstrip())

    def flush(self) -> None:
        if self.pending:
            self._line(self.pending.rstrip())
            self.pending = ""

    def _line(self, line: str) -> None:
        if not line:
            return
        service_log().info("%s", line)
        self.recent.append(line)
        parsed = _LOG_LINE.match(line)
        level, message = (parsed["level"], parsed["message"]) if parsed else ("", line)
        if level in ("WARNING", "ERROR", "CRITICAL") or message.startswith("warning:"):
            self.log.warning("compile step: %s", message.removeprefix("warning: ")[:500])
        elif "saved compile:" in message:
            self.log.info("compile step: %s", message[message.index("saved compile:") :][:500])

    def recent_text(self) -> str:
        return "\n".join(self.recent)

    def until_done(self, process: ProcessInfo | None, timeout_s: float) -> None:
        """Follow the log until the step's process (its whole session) is gone; `FlowError` after
        `timeout_s`, or when the SSH link stays down for `LINK_GRACE_S` (the step itself runs on)."""
        deadline = time.monotonic() + timeout_s
        down_since: float | None = None
        while True:
            try:
                self.follow()
                alive = process is not None and is_running(self.host, process)
                down_since = None
            except HostUnreachable as exc:
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > LINK_GRACE_S:
                    raise FlowError(
                        f"lost the link to {self.host.name} for more than {LINK_GRACE_S:.0f} s during the "
                        "compile step"
                    ) from exc
                self.log.warning("compile step: %s", exc)
                time.sleep(POLL_S)
                continue
            if not alive:
                self.follow()
                self.flush()
                return
            if time.monotonic() > deadline:
                self.flush()
                raise FlowError(
                    f"the compile step did not finish within {timeout_s:.0f} s (new.compile_timeout_s); "
                    f"stopped it; last log lines:\n{self.recent_text()}"
                )
            time.sleep(POLL_S)


def functions_table(result: CompileResult) -> Any:
    """A rich table of the compiled functions the step left on disk, and what it did."""
    from rich.table import Table

    report = result.report
    title = f"compile step: {'built' if report.built else 'nothing to build'} ({result.seconds:.1f} s)"
    table = Table(title=title, title_justify="left", caption=result.summary, caption_justify="left")
    for column in ("module", "covers", "dynamic", "source", "file"):
        table.add_column(column, overflow="fold")
    for function in report.functions:
        table.add_row(
            function.module,
            function.covers,
            "yes" if function.dynamic else "no",
            "[green]reused[/]" if function.source == "loaded" else function.source,
            function.file,
        )
    return table
