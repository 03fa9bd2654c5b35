"""SIGUSR1, the deploy's cut-over ("take your own port over"), taken with `sigwait`, never by a handler.

A signal handler is not enough: the first `torch.compile` on CUDA loads libtriton, whose LLVM installs its
own SIGUSR1 handler over Python's, which then never runs (measured on an H200: the staged service never
heard the cut-over). So the service blocks SIGUSR1 (`hold_takeover_signal`) first thing, before any thread
starts (importing torch starts some: threads inherit the block of the thread that starts them), and one
thread of its own takes it (`listen_for_takeover`). A blocked signal reaches no handler, whoever installed
it, and stays pending until that thread takes it. Light on purpose: it must run before torch is imported.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

TAKEOVER_SIGNAL = signal.SIGUSR1


def hold_takeover_signal() -> None:
    """Block SIGUSR1 in this thread and every thread it starts from now on (call it before importing torch)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {TAKEOVER_SIGNAL})


def listen_for_takeover(told: Callable[[], None]) -> threading.Thread:
    """A daemon thread that calls `told` each time SIGUSR1 arrives (it must be held first)."""

    def wait() -> None:
        while True:
            signal.sigwait({TAKEOVER_SIGNAL})
            told()

    thread = threading.Thread(target=wait, name="sigusr1", daemon=True)
    thread.start()
    return thread
