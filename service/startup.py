"""What this process knows about its own start, kept as it happens and reported by `/health` (`startup`).

The loading thread (`service/state.py`), the engine's load and the warm-up (`service/warmup.py`) write here;
`/health` reads a copy. Log lines say the same things for humans; no code reads them.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from service.schema import StartupFacts, StartupPhase


class StartupRecord:
    """The start-up facts of one engine, written by the thread that loads it and read by `/health`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._facts = StartupFacts(phase="loading", milestones={"started": time.time()})

    @property
    def phase(self) -> StartupPhase:
        return self._facts.phase

    def mark(self, milestone: str, phase: StartupPhase | None = None) -> None:
        """Note that `milestone` is reached now (and the phase it starts)."""
        with self._lock:
            self._facts.milestones[milestone] = time.time()
            if phase is not None:
                self._facts.phase = phase

    def set(self, **facts: Any) -> None:
        """Record facts (`load_s=...`, `compile=...`: the fields of `StartupFacts`)."""
        with self._lock:
            for name, value in facts.items():
                setattr(self._facts, name, value)  # pydantic refuses a name that is not a field

    def warn(self, warning: str) -> None:
        """Add a warning (something that went wrong without stopping the service)."""
        with self._lock:
            self._facts.warnings.append(warning)

    def facts(self) -> StartupFacts:
        """A copy of the facts as they stand."""
        with self._lock:
            return self._facts.model_copy(deep=True)
