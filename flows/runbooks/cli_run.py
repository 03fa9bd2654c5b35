"""Running a flow from the CLI, for every command: its summary printed, exit code 1 when the run failed."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

# Prefect settings (section, field, environment variable) every command that runs Prefect starts with,
# unless one of Prefect's own sources (environment, profile, prefect.toml, .env) sets them: no usage
# telemetry from the temporary server.
PREFECT_DEFAULTS = (("server", "analytics_enabled", "PREFECT_SERVER_ANALYTICS_ENABLED", "false"),)


def prefect_defaults() -> None:
    """Put `PREFECT_DEFAULTS` into the environment before Prefect starts its temporary server, each where no
    settings source of Prefect's chose a value."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    for section, field, variable, value in PREFECT_DEFAULTS:
        if field not in getattr(settings, section).model_fields_set:
            os.environ.setdefault(variable, value)


def run_flow(flow: Any, print_summary: Callable[[Path], object], **parameters: Any) -> None:
    """Run `flow` (on the Prefect server in PREFECT_API_URL, else an embedded one) with the console as a
    person reads it (`flows.record.runlog.console_view`), print its run directory's summary.json with
    `print_summary`, and exit 1 when the run failed (saying why when no summary says it)."""
    from flows.record.runlog import console_view

    prefect_defaults()
    with console_view(summary_follows=True):
        state = flow(return_state=True, **parameters)
    outcome = state.result(raise_on_failure=False)
    run_dir = getattr(outcome, "run_dir", None)
    summary_file = Path(run_dir) / "summary.json" if run_dir else None
    told = False
    if summary_file and summary_file.is_file():
        summary = print_summary(summary_file)
        told = summary.status == "failed"
    if state.is_failed():
        if not told:
            typer.echo(f"{flow.name} failed: {state.message}", err=True)
        raise typer.Exit(1)
