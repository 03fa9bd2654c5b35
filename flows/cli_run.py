"""Running a flow from the CLI, for every command: its summary printed, exit code 1 when the run failed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer


def run_flow(flow: Any, print_summary: Callable[[Path], object], **parameters: Any) -> None:
    """Run `flow` (on the Prefect server in PREFECT_API_URL, else an embedded one), print its run directory's
    summary.json with `print_summary`, and exit 1 when the run failed."""
    state = flow(return_state=True, **parameters)
    outcome = state.result(raise_on_failure=False)
    run_dir = getattr(outcome, "run_dir", None)
    if run_dir:
        print_summary(Path(run_dir) / "summary.json")
    if state.is_failed():
        raise typer.Exit(1)
