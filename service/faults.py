"""Rehearsal faults (`SDXL_INJECT_FAULT`): make generations fail, or the process die, like real faults do."""

from __future__ import annotations

import os
import threading

import torch


class FaultInjector:
    """Rehearsal only: make the next N generations fail like a real fault (`oom:N`, `error:N`), or kill
    the process at its next generation like a segfault or the OOM killer would (`crash:N`, exit 70)."""

    def __init__(self, spec: str | None) -> None:
        self.kind, self.remaining = None, 0
        if spec:
            kind, _, count = spec.partition(":")
            if kind not in ("oom", "error", "crash") or not count.isdigit():
                raise ValueError(f"inject_fault={spec!r} must look like 'oom:N', 'error:N' or 'crash:N'")
            self.kind, self.remaining = kind, int(count)
        self._lock = threading.Lock()

    def maybe_raise(self) -> None:
        with self._lock:
            if self.remaining <= 0:
                return
            self.remaining -= 1
        if self.kind == "crash":
            os._exit(70)  # no cleanup, no answer: the connection just drops
        if self.kind == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. (injected by SDXL_INJECT_FAULT)")
        raise RuntimeError("generation failed (injected by SDXL_INJECT_FAULT)")
