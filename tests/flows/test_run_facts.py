"""`summary.json`'s `facts` are typed (`flows/record/facts.py`) and keep the keys the free-form mapping had:
summaries written before the facts were typed are read and written back unchanged, and each fact a run may
add shows the keys it showed then (an unset fact, or an unset part of one, is absent, not null)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.box.supervisor import Restarts
from flows.evidence.results import QualitySizing, RollbackResult
from flows.record.facts import CompileSkipped, CutoverFacts, Recovered, RunFacts
from flows.record.rundir import RunSummary

WRITTEN_BEFORE = Path(__file__).parent / "data" / "summaries"


@pytest.mark.parametrize("name", sorted(p.name for p in WRITTEN_BEFORE.glob("*.json")))
def test_a_summary_written_before_the_facts_were_typed_reads_back_unchanged(name: str) -> None:
    written = json.loads((WRITTEN_BEFORE / name).read_text(encoding="utf-8"))
    summary = RunSummary.model_validate(written)
    assert json.loads(summary.model_dump_json()) == written
    assert summary.facts.model_fields_set == set(written["facts"])


def test_each_fact_has_the_keys_it_had_and_unset_facts_are_absent() -> None:
    facts = RunFacts()
    assert facts.model_dump(mode="json") == {}
    recovered_staged = Recovered(run_id="r1", stage="warmup", mode="staged", stopped_compile=None)
    recovered_staged.stopped_staged = "stopped PID 7"
    assert list(recovered_staged.model_dump()) == [
        "run_id",
        "stage",
        "mode",
        "stopped_compile",
        "stopped_staged",
    ]
    put_back = RollbackResult(
        backup_dir="/b",
        stopped_new="n",
        restored_files=[],
        restarted="r",
        health=None,
        answering=True,
        port=1,
    )
    recovered = Recovered(run_id="r1", stage="gate", mode="stop-first", stopped_compile=None).model_copy(
        update=put_back.model_dump(exclude={"health"})
    )
    assert set(recovered.model_dump()) == {"run_id", "stage", "mode", "stopped_compile"} | (
        set(RollbackResult.model_fields) - {"health"}
    )
    cutover = CutoverFacts(stopped_old="stopped PID 5", seconds=0.8)
    assert set(cutover.model_dump()) == {"stopped_old", "seconds"}
    fixed = QualitySizing(mode="fixed", prompts=4, seeds=1)
    assert fixed.model_dump() == {"mode": "fixed", "prompts": 4, "seeds": 1}
    facts.quality_sizing, facts.cutover, facts.recovered = fixed, cutover, recovered
    facts.compile = CompileSkipped(skipped="no GPU")
    facts.restarts = Restarts(count=0, gave_up=False, last=None, last_exit=None)
    facts.process, facts.approval, facts.ssh_reconnects = None, None, 2
    dumped = json.loads(facts.model_dump_json())
    assert set(dumped) == {
        "quality_sizing",
        "cutover",
        "recovered",
        "compile",
        "restarts",
        "process",
        "approval",
        "ssh_reconnects",
    }
    assert dumped["compile"] == {"skipped": "no GPU"} and dumped["process"] is None
    assert RunFacts.model_validate(dumped).model_dump(mode="json") == dumped
