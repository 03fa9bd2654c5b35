"""Every error the flows raise on purpose, in one place; `transient` tells the retry policy to try again."""

from __future__ import annotations


class FlowError(RuntimeError):
    """Base of the flows' own errors. `transient`: a retry may succeed (a dropped link, a busy host)."""

    transient: bool = False


class ReleaseError(FlowError):
    """A recorded release could not be found or started again; the message says why."""
