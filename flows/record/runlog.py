"""How a run is told, in two places.

- The run directory's `run.log` (`open_run_log`): everything the run logged, tracebacks included, and the
  new service's own log lines as the flow read them (`service_log`).
- The console a person reads (`console_view`): each failure once (the runbook reports it; Prefect's engine
  echoes of it and of every state are left out; where the CLI's summary follows, the failed stage's line
  leaves its cause to that summary), no tracebacks, a transport error repeated by every probe folded into
  one line with its count, and none of the service's own output.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RUN_LOG = "run.log"
SERVICE_LOGGER = "flows.service_log"
# Records from these loggers that repeat (digits aside) are folded on the console.
TRANSPORT_LOGGERS = ("paramiko", "flows.box.hosts")
# paramiko logs a refused channel itself and raises it to its caller, which reports it (flows/box/hosts).
_PARAMIKO_ECHOES = re.compile(r"Secsh channel \d+ open FAILED")
# Prefect's run engines log every failure again with its traceback, and every final state.
_ENGINE_MODULES = frozenset({"task_engine", "flow_engine"})
# `extra` key of a record whose content the summary the CLI prints after the run tells (a flow's closing line,
# the gate's rows, the downtime, a failed stage's cause): a console followed by that summary leaves the record
# out (True), or shows the shorter line it holds instead (a str).
TOLD_BY_SUMMARY = "told_by_summary"
_FOLDED = "folded_repeats"


def service_log() -> logging.Logger:
    """The logger of the new service's own log lines: they reach the open run logs only, never a console."""
    logger = logging.getLogger(SERVICE_LOGGER)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


class RunLogHandler(logging.FileHandler):
    """`run.log` in a run directory: the records of one flow run (and those logged outside any run)."""

    def __init__(self, run_dir: Path, flow_run_id: str | None) -> None:
        super().__init__(run_dir / RUN_LOG, encoding="utf-8", delay=True)
        self.flow_run_id = flow_run_id
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))

    def filter(self, record: logging.LogRecord) -> bool:
        run_id = getattr(record, "flow_run_id", None)
        return (self.flow_run_id is None or run_id is None or str(run_id) == self.flow_run_id) and bool(
            super().filter(record)
        )


def open_run_log(run_dir: Path) -> RunLogHandler:
    """Start writing `run_dir/run.log`: the current flow run's records and the service's log lines."""
    handler = RunLogHandler(run_dir, _current_flow_run_id())
    logging.getLogger().addHandler(handler)
    service_log().addHandler(handler)
    return handler


def close_run_log(handler: RunLogHandler) -> None:
    """Stop writing a run log and close its file."""
    logging.getLogger().removeHandler(handler)
    service_log().removeHandler(handler)
    handler.close()


def close_run_logs() -> None:
    """Close every run log still open (a run that ended without finishing its record)."""
    for handler in [h for h in logging.getLogger().handlers if isinstance(h, RunLogHandler)]:
        close_run_log(handler)


def _current_flow_run_id() -> str | None:
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return str(context.flow_run.id) if context and context.flow_run else None


class ConsoleView(logging.Filter):
    """A console handler's filter: leaves out what the console need not repeat (and, with `summary_follows`,
    what the summary tells: `TOLD_BY_SUMMARY`) and folds repeated transport errors; a run of them is written
    as one line, with its count, when something else is logged or at `flush`."""

    def __init__(self, handler: logging.Handler, summary_follows: bool = False) -> None:
        super().__init__()
        self.handler, self.summary_follows = handler, summary_follows
        self._held: dict[tuple[str, int, str], tuple[logging.LogRecord, int, float]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _FOLDED, False):
            return True
        if self.left_out(record):
            return False
        shorter = getattr(record, TOLD_BY_SUMMARY, None) if self.summary_follows else None
        if isinstance(shorter, str):
            self.flush()
            self._write(record, shorter)
            return False
        if record.name.startswith(TRANSPORT_LOGGERS):
            key = (record.name, record.levelno, re.sub(r"\d+", "#", record.getMessage()))
            with self._lock:
                first, count, _ = self._held.get(key, (record, 0, 0.0))
                self._held[key] = (first, count + 1, record.created)
            return False
        self.flush()
        return True

    def left_out(self, record: logging.LogRecord) -> bool:
        """Whether the console leaves `record` out (it stays in the run log and Prefect's API)."""
        if record.name.startswith("prefect.") and record.module in _ENGINE_MODULES:
            return bool(record.exc_info) or str(record.msg).startswith("Finished in state")
        if record.name.startswith("paramiko") and _PARAMIKO_ECHOES.search(record.getMessage()):
            return True
        return self.summary_follows and getattr(record, TOLD_BY_SUMMARY, None) is True

    def flush(self) -> None:
        """Write the held transport errors: each kind once, with how often and over how long it repeated."""
        with self._lock:
            held, self._held = self._held, {}
        for first, count, last in held.values():
            if count > 1:
                self._write(first, f"{first.getMessage()} [{count} times in {last - first.created:.1f} s]")
            else:
                self._write(first)

    def _write(self, record: logging.LogRecord, message: str | None = None) -> None:
        """Write a copy of `record` (with `message` instead of its own) to this console only."""
        line = copy.copy(record)
        if message is not None:
            line.msg, line.args = message, None
        setattr(line, _FOLDED, True)
        self.handler.handle(line)


class NoTraceback(logging.Formatter):
    """Another formatter's lines without the traceback or stack a record carries."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def console_handlers() -> list[logging.Handler]:
    """The root logger's console handlers, once Prefect has configured logging."""
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()
    return [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]


@contextmanager
def console_view(
    handlers: Iterable[logging.Handler] | None = None, summary_follows: bool = False
) -> Iterator[list[ConsoleView]]:
    """The console as a person reads it while the block runs (`ConsoleView`, `NoTraceback` on each console
    handler); `summary_follows`: the caller prints the run's summary, so a flow's closing line is left out."""
    chosen = list(console_handlers() if handlers is None else handlers)
    views: list[tuple[logging.Handler, ConsoleView, Any]] = []
    for handler in chosen:
        view = ConsoleView(handler, summary_follows)
        views.append((handler, view, handler.formatter))
        handler.addFilter(view)
        handler.setFormatter(NoTraceback(handler.formatter))
    try:
        yield [view for _, view, _ in views]
    finally:
        for handler, view, formatter in views:
            view.flush()
            handler.removeFilter(view)
            handler.setFormatter(formatter)
        close_run_logs()
