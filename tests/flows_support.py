"""Helpers for the runbook tests: targets inside a temporary "box", the legacy stand-in service."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from flows.demo import demo_target
from flows.hosts import q
from flows.target import CurrentService, Target

LEGACY_SCRIPT = Path(__file__).with_name("legacy_api.py")


def legacy_target(box: Path, port: int, python: str = sys.executable) -> Target:
    """The demo's local target, with the user's foreign SD1.5 script (the stand-in) as the current service.

    Its files live in a folder whose name has spaces and quotes, to prove every path is quoted.
    """
    app = box / "app dir with 'quotes' and spaces"
    app.mkdir(parents=True, exist_ok=True)
    script = app / "working-sd-api.py"
    shutil.copyfile(LEGACY_SCRIPT, script)
    config = app / "it's settings.json"
    config.write_text('{"steps": 20}\n')
    target = demo_target(box, port, python)
    current = CurrentService(
        name="sd15",
        start_command=f"exec {q(python)} {q(str(script))} {port}",
        workdir=str(app),
        files=[str(script), str(config)],
        pid_file=None,
        log_file=str(box / "logs" / "sd api.log"),
        port=port,
        health_timeout_s=30,
        stop_timeout_s=10,
    )
    return target.model_copy(update={"current": current})
