"""A person's decision: promote or abort, from the Prefect UI (`wait_for_person`, one pause of a flow run).

Two places ask: an inconclusive quality verdict of a deploy (below), and deploy-fleet between waves
(`rollout.pause_after`: a person looks at the canary and promotes it or fails it by hand).

An enforced `quality` row that says INCONCLUSIVE (the comparison was too small to tell either way) neither
passes nor fails the deploy by itself. Stage `approval` pauses the flow run for typed input
(`pause_flow_run(wait_for_input=Decision)`): the Prefect UI shows the run as Paused with a Resume button,
a form (decision, note) and the description `describe` writes (the CI against the margin, the report).
The person's choice comes back here; the timeout aborts. `quality.on_inconclusive` decides unattended runs
without pausing (abort or promote). From a script: `resume_flow_run(id, run_input={"decision": ...})`.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, Field

from flows.box.common import run_logger
from flows.config.target import QualityCheck
from flows.errors import NotPromoted
from flows.evidence.gates import GateReport, GateRow
from flows.evidence.results import QualityResult

Choice = Literal["promote", "abort"]
POLL_S = 2  # how often the paused flow asks the API whether it was resumed
PAUSE_KEY = "quality-approval"


def _decision_model() -> type:
    """The typed input the paused run waits for (a Prefect `RunInput`; imported late: prefect is heavy)."""
    from prefect.input import RunInput

    class Decision(RunInput):
        decision: Choice = Field(
            description="promote: go on with the new service; abort: fail the deploy (the old one serves)."
        )
        note: str = Field("", max_length=500, description="Who decides and why (kept in summary.json).")

    return Decision


class Approval(BaseModel):
    """What was decided about an inconclusive verdict, by whom, and how long the flow waited."""

    decision: Choice
    decided_by: Literal["person", "timeout", "target"]
    note: str = ""
    waited_s: float = 0.0
    criteria: list[str] = Field(default_factory=list)  # the inconclusive rows
    decided_at: str = ""


def needs_decision(gates: GateReport) -> list[GateRow]:
    """The enforced rows that said INCONCLUSIVE (a warn-only row never blocks, so it never asks)."""
    return [row for row in gates.inconclusive if row.enforce]


def describe(gates: GateReport, quality: QualityResult | None, timeout_s: float) -> str:
    """What the person reads in the Prefect UI before choosing (markdown)."""
    lines = [
        "**The quality comparison is INCONCLUSIVE**: too few prompts to tell whether the new model is worse."
    ]
    if quality is not None and quality.ci_low is not None and quality.margin is not None:
        lines.append(
            f"New minus current CLIP score: {quality.mean_diff:+.2f}, 95% CI "
            f"[{quality.ci_low:+.2f}, {quality.ci_high:+.2f}] against the margin -{quality.margin:g}: "
            "the CI reaches below -margin (not a pass) but does not show the new model worse (not a fail)."
        )
    for row in needs_decision(gates):
        lines.append(f"`{row.criterion}`: {row.observed}")
    if quality is not None and quality.report:
        lines.append(f"Report (the CI against the margin in one picture, every image): `{quality.report}`")
    lines.append(
        f"Choose **promote** to go on with the new service or **abort** to fail the deploy (the old service "
        f"keeps or gets back the app). No answer within {timeout_s:.0f} s aborts."
    )
    return "\n\n".join(lines)


def request_decision(gates: GateReport, quality: QualityResult | None, timeout_s: float) -> Approval:
    """Pause the flow run until a person promotes or aborts an inconclusive verdict (the timeout aborts)."""
    approval = wait_for_person(
        "quality INCONCLUSIVE", describe(gates, quality, timeout_s), timeout_s, PAUSE_KEY
    )
    approval.criteria = [row.criterion for row in needs_decision(gates)]
    return approval


def wait_for_person(why: str, description: str, timeout_s: float, key: str) -> Approval:
    """Pause this flow run for typed input (`Decision`) until a person promotes or aborts in the Prefect UI
    or with `sdxl-deploy approve`; no answer within `timeout_s` aborts. `key` names this pause (one per
    pause of a run: Prefect will not pause twice on one key)."""
    from prefect.context import FlowRunContext
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    log = run_logger()
    model = _decision_model().with_initial_data(description=description)
    context = FlowRunContext.get()
    run_id = str(context.flow_run.id) if context and context.flow_run else "<flow run id>"
    log.warning(
        "%s: waiting up to %.0f s for a person: Resume this flow run in the Prefect UI "
        "(promote or abort), or run `sdxl-deploy approve %s --promote` (or --abort)",
        why,
        timeout_s,
        run_id,
    )
    started = time.monotonic()
    try:
        answer = pause_flow_run(
            wait_for_input=model, timeout=max(1, math.ceil(timeout_s)), poll_interval=POLL_S, key=key
        )
    except FlowPauseTimeout:
        _back_to_running()
        approval = Approval(
            decision="abort",
            decided_by="timeout",
            note=f"no decision within {timeout_s:.0f} s",
            waited_s=round(time.monotonic() - started, 1),
        )
    else:
        approval = Approval(
            decision=answer.decision,
            decided_by="person",
            note=answer.note,
            waited_s=round(time.monotonic() - started, 1),
        )
    approval.decided_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    log.info(
        "%s: %s by %s after %.1f s%s",
        why,
        approval.decision,
        approval.decided_by,
        approval.waited_s,
        f" ({approval.note})" if approval.note else "",
    )
    return approval


def _back_to_running() -> None:
    """After a pause timed out the run is still Paused on the server; set it Running again so the rest of
    the flow (the rollback) runs and the run ends in the flow's own state and message. A run a person
    cancelled meanwhile is left as it is (its cancel hook rolls back)."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.states import Running

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    with get_client(sync_client=True) as client:
        if client.read_flow_run(context.flow_run.id).state.is_paused():
            client.set_flow_run_state(context.flow_run.id, Running(), force=True)


def ask_person(gates: GateReport, quality: QualityResult | None, timeout_s: float) -> Choice:
    """Promote or abort, as a person decides in the Prefect UI; the timeout aborts."""
    return request_decision(gates, quality, timeout_s).decision


def decide(gates: GateReport, quality: QualityResult | None, check: QualityCheck) -> Approval | None:
    """None when no enforced row is inconclusive; else the target's rule or the person's decision."""
    rows = needs_decision(gates)
    if not rows:
        return None
    if check.on_inconclusive != "ask":
        run_logger().warning("quality INCONCLUSIVE: %s (quality.on_inconclusive)", check.on_inconclusive)
        return Approval(
            decision=check.on_inconclusive,
            decided_by="target",
            note=f"quality.on_inconclusive={check.on_inconclusive}",
            criteria=[row.criterion for row in rows],
            decided_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
    return request_decision(gates, quality, check.approval_timeout_s)


def require_promoted(approval: Approval | None) -> None:
    """Raise `NotPromoted` when an inconclusive verdict was aborted."""
    if approval is not None and approval.decision == "abort":
        note = f" ({approval.note})" if approval.note else ""
        raise NotPromoted(
            f"inconclusive {', '.join(approval.criteria)} aborted by {approval.decided_by}{note} "
            f"after {approval.waited_s:.0f} s"
        )


def answer(flow_run_id: str, decision: Choice, note: str = "") -> None:
    """Resume a deploy paused in stage `approval` with a decision (the Prefect API in PREFECT_API_URL);
    what the UI's Resume form does, for a terminal (`sdxl-deploy approve`)."""
    from uuid import UUID

    from prefect.flow_runs import resume_flow_run

    try:
        run_id = UUID(flow_run_id)
    except ValueError:
        raise ValueError(
            f"flow run id {flow_run_id!r} is not a UUID (the paused run's log names it)"
        ) from None
    resume_flow_run(run_id, run_input={"decision": decision, "note": note})
