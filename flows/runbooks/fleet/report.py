"""The fleet report: one Markdown page (the run's report.md and the flow's artifact) with each host's
outcome, release before and after, stages, gates and downtime, and the rollout's timeline."""

from __future__ import annotations

from flows.runbooks.fleet.summary import FleetSummary


def _cell(text: object) -> str:
    return str(text if text is not None else "").replace("|", "\\|").replace("\n", " ")[:300]


def fleet_markdown(summary: FleetSummary) -> str:
    """The rollout on one page."""
    lines = [
        f"# deploy-fleet: {summary.status}",
        "",
        f"- release {summary.release_id}; started {summary.started_at}, took {summary.seconds} s",
        f"- {summary.message}",
        f"- waves: {' -> '.join('[' + ', '.join(w) + ']' for w in summary.waves)}",
    ]
    if summary.aborted:
        lines.append(
            f"- **aborted**: {summary.aborted}; rolled back: {', '.join(summary.rolled_back) or 'none'}"
        )
    lines += [
        "",
        "## Hosts",
        "",
        "| host | wave | outcome | release before | release at the end | gates | host downtime | drain s | up s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    gates = {True: "passed", False: "FAILED", None: ""}
    for h in summary.hosts:
        lines.append(
            f"| {h.name} ({h.server}) | {'' if h.wave is None else h.wave} | {h.outcome} | {_cell(h.release_before)} "
            f"| **{_cell(h.release_after)}** | {gates[h.gates_passed]} | {_cell(h.downtime)} "
            f"| {_cell(h.drain_s)} | {_cell(h.up_s)} |"
        )
    for h in summary.hosts:
        if not h.stages and not h.message:
            continue
        lines += ["", f"### {h.name}", ""]
        if h.message:
            lines.append(f"- {_cell(h.message)}")
        if h.deploy_run_dir:
            lines.append(f"- deploy run: `{h.deploy_run_dir}`")
        if h.rollback_run_dir:
            lines.append(f"- rollback run: `{h.rollback_run_dir}`")
        if h.stages:
            stages = ", ".join(
                f"{s.name} {s.seconds:.1f} s" + ("" if s.status == "completed" else " **FAILED**")
                for s in h.stages
            )
            lines.append(f"- stages: {stages}")
    if summary.analyses:
        lines += ["", "## Analyses", ""]
        lines += [f"- {_cell(a.describe())}" for a in summary.analyses]
    lines += ["", "## Timeline", "", "| at | event | detail |", "|---|---|---|"]
    lines += [f"| {e.at} | {_cell(e.event)} | {_cell(e.detail)} |" for e in summary.timeline]
    return "\n".join(lines) + "\n"
