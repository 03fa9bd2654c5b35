"""`bench-beside` end to end on the CPU with the tiny models: the old service under load while the new one stages
beside it on the same port, then the cut-over (the GPU command of docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.launch import REPO


def test_bench_beside_stages_the_new_service_under_load_and_cuts_over_without_a_failed_request(
    tmp_path: Path, model_cache: Path
) -> None:
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "sdxl_deploy.cli",
        "bench-beside",
        *("--out", str(out), "--work", str(tmp_path / "work"), "--models-dir", str(model_cache)),
        *("--old-model", "tiny-sd15", "--new-model", "tiny-sdxl", "--size", "64", "--steps", "1"),
        *("--before-s", "0.5", "--staged-s", "0.5", "--after-s", "0.5", "--ready-timeout-s", "180"),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "longest outage" in done.stdout and "load, phase" in done.stdout  # the table, printed last

    r = json.loads((out / "beside.json").read_text())
    assert r["errors"] == []
    # the old service kept answering while the new one started beside it, and the new one answers after
    for phase in ("before", "new start", "after"):
        assert r["latency"][phase]["requests"] >= 1 and r["latency"][phase]["p50_s"] > 0, phase
    assert r["new_start"]["staged"] is True and r["new_start"]["model"] == "tiny-sdxl"
    ports = r["meta"]["ports"]
    assert r["new_start"]["listening"] == [ports["stage"]] != [ports["app"]]
    cut = r["cutover"]
    assert cut["model_on_app_port"] == "tiny-sdxl" and cut["new_staged"] is False
    assert cut["new_listening"] == [ports["app"]]
    assert 0 < cut["usr1_to_new_on_app_port_s"] < 2
    # no request of the load failed, and the longest outage (health probes + the load) is short
    d = r["downtime"]
    assert d["failed_load_requests"] == 0 and d["failed_requests"] == 0, d["first_failures"]
    assert d["load_requests"] == len(r["requests"]) >= 3 and d["probes"] > d["load_requests"]
    assert d["longest_outage_s"] < 2
    # memory of each process sampled (RSS on the CPU, said so), both at once above either alone
    m = r["memory"]
    assert "RSS" in m["measure"] and set(m["pids"]) == {"old", "new"}
    assert 0 < m["old_before_new_mib"] <= m["old_peak_mib"] < m["both_peak_mib"]
    assert 0 < m["new_peak_mib"] < m["both_peak_mib"]
