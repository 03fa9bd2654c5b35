"""Downtime as the prober saw it: every probe, and the outages they show.

An outage is a run of consecutive failed probes (both kinds, in the order they were sent); it lasts from the
last success before it to the first success after it (or to the last probe, when the service never came
back). Data and arithmetic only: `flows/record/prober.py` sends the probes, the run summary and gates read
these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, Field

from flows.config.target import StartMode

ProbeKind = Literal["health", "app"]


class Probe(BaseModel):
    """One request of the prober: when it was sent (seconds since the prober started), and its answer."""

    kind: ProbeKind
    at_s: float
    ok: bool
    status: int | None = None  # HTTP status; None when nothing answered
    latency_s: float
    error: str = ""


class Outage(BaseModel):
    """Consecutive failed probes: from the last success before them to the first success after them."""

    start_s: float
    end_s: float
    failed: int
    ended: bool  # False: no success came after it (the service was still down at the last probe)

    @property
    def seconds(self) -> float:
        return round(self.end_s - self.start_s, 3)


class Downtime(BaseModel):
    """What the app saw during the flow, in `summary.json` and judged by the `max_downtime_s` gate."""

    mode: StartMode
    longest_outage_s: float
    failed_requests: int = Field(description="Failed probes of both kinds.")
    probes: int
    outages: int
    total_outage_s: float
    still_down: bool = Field(
        description="The last probe failed: the outage had not ended when probing stopped."
    )
    failed_app_requests: int
    app_requests: int
    started_at: str | None = None

    def describe(self) -> str:
        if not self.probes:
            return f"{self.mode}: no probe was sent"
        down = "; STILL DOWN at the last probe" if self.still_down else ""
        return (
            f"{self.mode}: longest outage {self.longest_outage_s:.2f} s ({self.outages} outage(s), "
            f"{self.total_outage_s:.2f} s in all); {self.failed_requests} of {self.probes} probes failed, "
            f"{self.failed_app_requests} of {self.app_requests} app requests{down}"
        )


def find_outages(probes: Sequence[Probe]) -> list[Outage]:
    """The runs of consecutive failed probes, in the order the probes were sent."""
    outages: list[Outage] = []
    last_ok: float | None = None
    start = end = 0.0
    failed = 0
    for probe in sorted(probes, key=lambda p: p.at_s):
        if probe.ok:
            if failed:
                outages.append(Outage(start_s=start, end_s=probe.at_s, failed=failed, ended=True))
                failed = 0
            last_ok = probe.at_s
        else:
            if not failed:
                start = probe.at_s if last_ok is None else last_ok
            failed += 1
            end = probe.at_s
    if failed:
        outages.append(Outage(start_s=start, end_s=end, failed=failed, ended=False))
    return outages


def summarize(probes: Sequence[Probe], mode: StartMode, started_at: str | None = None) -> Downtime:
    """The downtime numbers of a probe record."""
    outages = find_outages(probes)
    app = [p for p in probes if p.kind == "app"]
    return Downtime(
        mode=mode,
        longest_outage_s=max((o.seconds for o in outages), default=0.0),
        failed_requests=sum(not p.ok for p in probes),
        probes=len(probes),
        outages=len(outages),
        total_outage_s=round(sum(o.seconds for o in outages), 3),
        still_down=bool(outages) and not outages[-1].ended,
        failed_app_requests=sum(not p.ok for p in app),
        app_requests=len(app),
        started_at=started_at,
    )
