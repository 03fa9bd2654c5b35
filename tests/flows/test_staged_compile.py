"""The staged deploy with compile forced on (tiny-sd15 on the CPU): stage compile beside the old service, the new
service on the functions it kept, then `sdxl-deploy compile` for the release that serves.

A module of its own, started after the suite's longest modules (tests/conftest.py): it copies the suite's CPU
compile cache (tests/support/compiled.py), which another test process builds first; started earlier, its test
process would wait for that build instead of running other tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.box.deploy_state import load_state
from flows.box.hosts import LocalHost
from flows.box.procs import find_service, is_running, listener_pids
from flows.config.target import Target
from flows.runbooks.plan import STAGED_STAGES
from flows.runbooks.runbook import deploy_sdxl
from flows.stages.rollback import current_answers
from sdxl_deploy.cli import app
from service.schema import HealthResponse
from tests.support.compiled import compiled_cache, copy_of, service_env
from tests.support.flows import summary_of

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fault_counts")]


@pytest.mark.timeout(1500)  # waits for the compile cache if another test process is still building it
def test_a_staged_deploy_cuts_over_without_a_failed_request(
    prefect_api: None, staged: tuple[LocalHost, Target], wheel: str, tmp_path: Path, model_cache: Path
) -> None:
    """With compile forced on (tiny-sd15 on the CPU): stage compile runs the compile step beside the old
    service, finds every function in the compile cache (a copy of the suite's, tests/support/compiled.py) and
    keeps it; the new service loads them all and compiles nothing; `sdxl-deploy compile` then runs the same
    step for the release that serves, beside it."""
    host, target = staged
    settings = service_env(model_cache, copy_of(compiled_cache(model_cache)[0], tmp_path / "compile-cache"))
    ready_sizes = settings.pop("SDXL_READY_SIZES").split(",")  # the deploy sets it on the command line
    new = {"model": "tiny-sd15", "ready_sizes": ready_sizes, "env": {**target.new.env, **settings}}
    target = target.model_copy(update={"new": target.new.model_copy(update=new)})
    old = find_service(host, target.current.port)
    state = deploy_sdxl(target=target, wheel=wheel, runs_dir=str(tmp_path / "runs"), return_state=True)
    assert state.is_completed(), state.message
    summary = summary_of(state)
    assert [s["name"] for s in summary["stages"]] == list(STAGED_STAGES)
    downtime = summary["downtime"]
    assert downtime["mode"] == "staged" and downtime["app_requests"] > 5, downtime
    assert downtime["failed_requests"] == 0 and downtime["longest_outage_s"] < 2, downtime
    assert summary["facts"]["cutover"]["seconds"] < target.new.cutover_timeout_s
    assert summary["facts"]["cutover"]["max_downtime_s"]["verdict"] == "pass"
    report = summary["facts"]["compile"]["report"]
    assert report["built"] and report["reused"] == 2 and report["compiled"] == 0, report
    answer = current_answers(host, target.current)
    assert answer is not None
    health = HealthResponse.model_validate(answer.model_dump())  # this release's service: its whole schema
    assert health.model == "tiny-sd15" and health.listening == [target.current.port]
    assert health.compiles is not None
    functions = health.compiles.functions
    assert {f.file for f in functions} == {f["file"] for f in report["functions"]}, functions
    assert {f.source for f in functions} == {"loaded"} and health.startup.compiled_functions == 0
    assert not is_running(host, old) and listener_pids(host, target.new.staging_port) == []
    recorded = load_state(host, target)
    assert (recorded.mode, recorded.cut_over, recorded.status) == ("staged", True, "deployed")
    target_file = tmp_path / "target.json"
    target_file.write_text(target.model_dump_json())
    on_demand = CliRunner().invoke(app, ["compile", "--target", str(target_file)], env={"COLUMNS": "200"})
    assert on_demand.exit_code == 0, on_demand.output
    assert f"{len(functions)} compiled function(s) ready ({len(functions)} reused from disk, 0 compiled)" in (
        on_demand.output
    )
