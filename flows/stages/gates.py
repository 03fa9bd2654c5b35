"""The gate stage: every success criterion judged on the evidence the other stages collected
(`flows/evidence/gates.py`), each row logged, the table published as a Prefect table artifact."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.box.common import run_logger
from flows.config.target import Criterion
from flows.evidence.gates import Evidence, GateReport, judge, shown_passed
from flows.record.runlog import TOLD_BY_SUMMARY


@task(cache_policy=NO_CACHE)
def evaluate_gates(criteria: list[Criterion], evidence: Evidence) -> GateReport:
    """Judge every success criterion and log each row (the run record publishes the final table)."""
    report = judge(criteria, evidence)
    log = run_logger()
    for row in report.rows:  # the CLI's summary shows them as its criteria table
        log.info(
            "gate %-15s %-4s %s", row.criterion, row.verdict, row.observed, extra={TOLD_BY_SUMMARY: True}
        )
    return report


def publish_gates(report: GateReport, passed: bool | None, artifact_key: str) -> None:
    """The criteria table as a Prefect table artifact, described by the run's verdict `passed`."""
    create_table_artifact(
        key=artifact_key,
        table=report.table(),
        description=f"Success criteria: {shown_passed(passed)}"
        + "".join(f"; {row.criterion} INCONCLUSIVE" for row in report.inconclusive),
    )
