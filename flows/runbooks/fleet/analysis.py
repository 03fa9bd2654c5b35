"""The analysis between waves: the hosts this rollout upgraded against the hosts still on the old release,
over the live traffic HAProxy sees (per server: requests answered, 5xx answers, average response time).

A window starts with one `show stat`, watches for `duration_s` (or until the upgraded hosts answered
`requests`), and compares the counters' growth. Verdict `pass` or `fail`, with the reasons.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, Field

from flows.config.fleet import Analysis
from flows.runbooks.fleet.haproxy import HAProxyAPI, ServerStat


class GroupTraffic(BaseModel):
    """What a group of servers answered during the window."""

    servers: list[str]
    requests: int = 0
    errors_5xx: int = 0
    avg_ms: float | None = None  # HAProxy's average total time, mean over the group's servers

    @property
    def error_rate(self) -> float:
        return self.errors_5xx / self.requests if self.requests else 0.0


class AnalysisResult(BaseModel):
    wave: int
    verdict: Literal["pass", "fail"]
    seconds: float
    new: GroupTraffic
    old: GroupTraffic
    reasons: list[str] = Field(default_factory=list)

    def describe(self) -> str:
        new, old = self.new, self.old
        text = (
            f"{self.verdict.upper()} after {self.seconds:.1f} s: upgraded "
            f"{new.requests} req, {new.error_rate:.1%} 5xx, {_ms(new.avg_ms)}; old release "
            f"{old.requests} req, {old.error_rate:.1%} 5xx, {_ms(old.avg_ms)}"
        )
        return text + (f" ({'; '.join(self.reasons)})" if self.reasons else "")


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ms avg"


def _traffic(servers: list[str], before: dict[str, ServerStat], after: dict[str, ServerStat]) -> GroupTraffic:
    group = GroupTraffic(servers=servers)
    times = []
    for name in servers:
        group.requests += after[name].req_tot - before[name].req_tot
        group.errors_5xx += after[name].hrsp_5xx - before[name].hrsp_5xx
        if after[name].req_tot > before[name].req_tot:
            times.append(after[name].ttime)
    group.avg_ms = sum(times) / len(times) if times else None
    return group


def judge(wave: int, seconds: float, new: GroupTraffic, old: GroupTraffic, rules: Analysis) -> AnalysisResult:
    """The verdict from the window's traffic (pure: the rules applied to the numbers)."""
    reasons = []
    if new.requests < rules.min_requests:
        reasons.append(
            f"only {new.requests} request(s) reached the upgraded hosts (min_requests {rules.min_requests})"
        )
    if new.error_rate > rules.max_error_rate:
        reasons.append(f"5xx rate {new.error_rate:.1%} > max_error_rate {rules.max_error_rate:.1%}")
    if old.requests and new.error_rate > old.error_rate + rules.max_error_rate_increase:
        reasons.append(
            f"5xx rate {new.error_rate:.1%} > old release's {old.error_rate:.1%} "
            f"+ {rules.max_error_rate_increase:.1%}"
        )
    if rules.max_latency_ratio is not None and new.avg_ms is not None and old.avg_ms is not None:
        limit = old.avg_ms * rules.max_latency_ratio + rules.latency_slack_ms
        if new.avg_ms > limit:
            reasons.append(
                f"average time {new.avg_ms:.0f} ms > {rules.max_latency_ratio:g} x old {old.avg_ms:.0f} ms "
                f"+ {rules.latency_slack_ms:.0f} ms"
            )
    return AnalysisResult(
        wave=wave,
        verdict="fail" if reasons else "pass",
        seconds=round(seconds, 2),
        new=new,
        old=old,
        reasons=reasons,
    )


def analyse(
    api: HAProxyAPI, wave: int, upgraded: list[str], old: list[str], rules: Analysis, poll_s: float = 0.25
) -> AnalysisResult:
    """Watch the live traffic for one window and judge the upgraded servers against the old ones."""
    before = api.stats()
    started = time.monotonic()
    while time.monotonic() - started < rules.duration_s:
        time.sleep(min(poll_s, max(rules.duration_s - (time.monotonic() - started), 0)))
        if rules.requests is not None:
            now = api.stats()
            if sum(now[s].req_tot - before[s].req_tot for s in upgraded) >= rules.requests:
                break
    after = api.stats()
    seconds = time.monotonic() - started
    return judge(wave, seconds, _traffic(upgraded, before, after), _traffic(old, before, after), rules)
