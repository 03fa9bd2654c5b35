"""A service start in figures, from what the service states about itself in `/health`'s `startup` object
(`service.schema.StartupFacts`); nothing here reads the service's log."""

from __future__ import annotations

from typing import Any

from bench.scenarios import TARGETS
from service.schema import StartupFacts

NO_STARTUP_FACTS = (
    "/health has no `startup` object (a service older than StartupFacts): start-up figures unknown"
)


def startup_figures(startup: StartupFacts | None, *, ready_s: float, spawned_at: float) -> dict[str, Any]:
    """The figures of one start: `ready_s` (spawn -> first 200 from /ready, measured by the client), the warm-up
    (`warmup_s`, compiles included) and load (`load_s`) times, each milestone in seconds after the spawn
    (`spawned_at`, epoch seconds), and the compiled functions loaded whole / compiled and saved."""
    figures: dict[str, Any] = {
        "ready_s": round(ready_s, 2),
        "warmup_compile_s": None,
        "base_load_s": None,
        "timeline_s": {},
        "saved_compile": None,
        "startup_warnings": [NO_STARTUP_FACTS],
        "target_ready_s": TARGETS["restart_ready_s"],
    }
    if startup is None:
        return figures
    figures.update(
        warmup_compile_s=startup.warmup_s,
        base_load_s=startup.load_s,
        timeline_s={name: round(at - spawned_at, 2) for name, at in startup.milestones.items()},
        saved_compile={"loaded": startup.loaded_functions, "compiled": startup.compiled_functions},
        startup_warnings=list(startup.warnings),
    )
    return figures
