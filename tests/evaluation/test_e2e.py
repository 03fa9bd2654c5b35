"""The evaluation end to end against real services: tiny-sd15 vs tiny-sdxl over HTTP on loopback, the HTML
report rendered by headless Chromium, the `evaluate` and `report` commands, and the regression-benchmark
flow under a real Prefect API ending Failed on a planted slowdown."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
import typer
from click.testing import Result
from PIL import Image
from typer.testing import CliRunner

from evaluation.clip_score import tiny_scorer
from evaluation.compare import quality_gate
from evaluation.evaluate import evaluate_services
from evaluation.prompts import builtin_prompts, spread
from evaluation.results import EvaluationResult, GenerationSettings, load_result
from evaluation.stats import VERDICTS

pytestmark = pytest.mark.slow

TINY = GenerationSettings(num_inference_steps=2, width=64, height=64)
TINY_REQUEST = {
    "prompt": "a red cube",
    "num_inference_steps": 2,
    "width": 64,
    "height": 64,
    "use_refiner": True,
}


@pytest.fixture(scope="module")
def services(service_url: Callable[[str], str]) -> tuple[str, str]:
    """(baseline, candidate) base URLs: real uvicorn servers of tiny-sd15 and tiny-sdxl."""
    return service_url("tiny-sd15"), service_url("tiny-sdxl")


@pytest.fixture(scope="module")
def evaluation(services: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> EvaluationResult:
    """3 prompts (3 categories) x 2 seeds sent to both services, scored by the tiny CLIP."""
    run_dir = tmp_path_factory.mktemp("evaluation") / "run"
    return evaluate_services(
        *services, spread(builtin_prompts(), 3), 2, run_dir, settings=TINY, scorer=tiny_scorer(), margin=1.0
    )


def test_evaluation_between_two_tiny_services(evaluation: EvaluationResult) -> None:
    run_dir = Path(evaluation.run_dir)
    generations = pd.read_parquet(run_dir / "generations.parquet")
    assert len(generations) == len(pd.read_csv(run_dir / "generations.csv")) == 12
    assert generations["error"].isna().all()
    asked = {role: set(zip(g["prompt"], g["seed"], strict=True)) for role, g in generations.groupby("role")}
    assert asked["baseline"] == asked["candidate"] and len(asked["baseline"]) == 6, "same prompts and seeds"
    assert set(generations.groupby("role")["model"].first().items()) == {
        ("baseline", "tiny-sd15"),
        ("candidate", "tiny-sdxl"),
    }
    for relative in generations["image"]:
        with Image.open(run_dir / relative) as image:
            assert image.size == (64, 64)

    means = generations.groupby("role")["score"].mean()  # every seed answered: mean of prompt means = mean
    o = evaluation.overall
    assert o.baseline_mean == pytest.approx(means["baseline"]) and o.candidate_mean == pytest.approx(
        means["candidate"]
    )
    assert o.mean_diff == pytest.approx(means["candidate"] - means["baseline"])
    assert o.ci_low <= o.mean_diff <= o.ci_high and o.n == 3
    assert evaluation.verdict in VERDICTS and len(evaluation.categories) == 3

    timing = evaluation.timing["candidate"]
    assert (timing.images, timing.errors, timing.peak_vram_gb) == (6, 0, None)  # CPU: no VRAM reported
    assert 0 < timing.latency_p50_s <= timing.latency_p95_s
    assert timing.cost_per_image == pytest.approx(0.40 / timing.images_per_hour)

    for table in ("prompts", "categories", "timing"):
        assert (
            pd.read_parquet(run_dir / f"{table}.parquet").shape == pd.read_csv(run_dir / f"{table}.csv").shape
        )
    assert load_result(run_dir) == evaluation
    assert evaluation.stand_ins, "tiny models and a random-weight scorer are flagged as stand-ins"
    passed, detail = quality_gate(evaluation, margin=100)
    assert passed and "margin 100" in detail and "CLIP" in detail


@pytest.fixture
def legacy_url() -> Iterator[str]:
    """The stand-in of the user's old SD1.5 script (only /health and /generate, no model name, no timings)."""
    import sys

    import httpx

    from tests.support.servers import free_port

    port = free_port()
    script = Path(__file__).parents[1] / "support" / "legacy_api.py"
    proc = subprocess.Popen([sys.executable, str(script), str(port)], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_old_sd15_script_can_be_the_baseline(
    legacy_url: str, services: tuple[str, str], tmp_path: Path
) -> None:
    result = evaluate_services(
        legacy_url,
        services[1],
        spread(builtin_prompts(), 2),
        1,
        tmp_path,
        settings=TINY,
        scorer=tiny_scorer(),
    )
    generations = pd.read_parquet(tmp_path / "generations.parquet")
    old = generations[generations["role"] == "baseline"]
    assert old["error"].isna().all() and len(old) == 2
    assert (old["resolution"] == "64x64").all() and (old["generation_s"] == old["latency_s"]).all()
    assert result.services["baseline"].model == "baseline service" and result.overall.n == 2


# ---------------------------------------------------------------- the report in Chromium

PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({cls: i.className, ok: i.complete, w: i.naturalWidth, h: i.naturalHeight}));
  const probe = document.createElement("pre");
  probe.id = "probe";
  probe.textContent = JSON.stringify(images);
  document.body.appendChild(probe);
});
</script>"""


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        pytest.fail("chromium is not installed: `make setup` installs it (apt-get install chromium)")
    return path


def _run_chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run([_chromium(), *flags, *args], capture_output=True, text=True, timeout=90)


def test_the_report_shows_images_and_charts_in_chromium(evaluation: EvaluationResult, tmp_path: Path) -> None:
    report = Path(evaluation.report)
    html = report.read_text()
    assert "<script" not in html and 'src="http' not in html and "<link" not in html, (
        "self-contained, no scripts"
    )
    assert html.index('id="verdict"') < html.index('id="gate"') < html.index('id="images"')

    probed = report.with_name("probe.html")  # next to the report, so relative links resolve the same way
    probed.write_text(html.replace("</body>", PROBE + "</body>"))
    dom = _run_chromium(["--virtual-time-budget=10000", "--dump-dom", probed.as_uri()], tmp_path / "profile")
    probed.unlink()
    assert '<pre id="probe">' in dom.stdout, dom.stderr[-2000:]
    images = json.loads(
        dom.stdout.split('<pre id="probe">', 1)[1].split("</pre>", 1)[0].replace("&quot;", '"')
    )
    generated = [i for i in images if i["cls"] == "gen-img"]
    charts = [i for i in images if i["cls"] == "chart-img"]
    assert len(generated) == 12 and all(i["ok"] and (i["w"], i["h"]) == (64, 64) for i in generated)
    assert len(charts) == 5 and all(i["ok"] and i["w"] > 200 and i["h"] > 50 for i in charts)
    assert (report.parent / "verdict.svg").is_file() and 'href="verdict.svg"' in html  # the CI vs the margin
    assert "Random-weight stand-ins" in dom.stdout and evaluation.verdict in dom.stdout

    shot = tmp_path / "report.png"
    _run_chromium(["--window-size=1280,1400", f"--screenshot={shot}", report.as_uri()], tmp_path / "profile2")
    with Image.open(shot) as image:
        pixels = image.convert("RGB")
        tone = {
            "better": (21, 128, 61),
            "not worse within margin": (180, 83, 9),
            "inconclusive": (100, 116, 139),
            "worse": (185, 28, 28),
        }
        hits = sum(1 for p in pixels.getdata() if p == tone[evaluation.verdict])
        assert hits > 20_000, "the verdict panel is painted in its colour"
        assert len(set(pixels.crop((0, 0, 1280, 1400)).getdata())) > 500, "charts and images add many colours"


# ---------------------------------------------------------------- the CLI


def _invoke(app: typer.Typer, args: list[str]) -> Result:
    """Run the CLI with a wide terminal, so rich never wraps a long temp path inside a checked phrase."""
    return CliRunner().invoke(app, args, env={"COLUMNS": "1000"})


def test_cli_evaluate_then_report(services: tuple[str, str], tmp_path: Path) -> None:
    from sdxl_deploy.cli import app

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "a red cube on a blue sphere", "category": "spatial"}\n{"prompt": "a hand"}\n'
    )
    args = ["evaluate", "--baseline", services[0], "--candidate", services[1], "--prompts", str(prompts)]
    args += [
        "--seeds",
        "1",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--scorer",
        "tiny-random-clip",
    ]
    args += ["--margin", "100", "--runs-dir", str(tmp_path / "runs")]
    result = _invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "random-weight stand-ins" in result.output
    run_dir = Path(result.output.split("report: ", 1)[1].split()[0]).parent
    assert len(pd.read_csv(run_dir / "generations.csv")) == 4

    (run_dir / "report.html").unlink()
    result = _invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0 and (run_dir / "report.html").is_file(), result.output

    bad = tmp_path / "prompts.csv"
    bad.write_text("text\na cat\n")
    result = _invoke(app, [*args[:5], "--prompts", str(bad)])
    assert result.exit_code == 2 and "no 'Prompt' column" in result.output

    from tests.support.servers import free_port

    down = f"http://127.0.0.1:{free_port()}"
    result = _invoke(app, ["evaluate", "--baseline", down, *args[3:]])
    assert result.exit_code == 2 and f"baseline service at {down} did not answer GET /health" in result.output


# ---------------------------------------------------------------- the regression-benchmark flow


def test_evaluation_artifacts_have_stable_keys(prefect_api: None, evaluation: EvaluationResult) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.runtime import flow_run

    from flows.record.artifacts import publish_evaluation

    assert publish_evaluation(evaluation) is False, "outside a Prefect run it only logs"

    def publish() -> str:
        assert publish_evaluation(evaluation) is True
        return str(flow_run.id)

    run_id = flow(name="publish-evaluation")(publish)()
    keys = ["sdxl-evaluation-categories", "sdxl-evaluation-summary", "sdxl-evaluation-report"]
    # the session's Prefect server also holds other tests' deploys' artifacts under these keys: this run's only
    this_run = ArtifactFilter(
        key=ArtifactFilterKey(any_=keys), flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])
    )
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=this_run)
    assert {a.key for a in found} == set(keys)
    summary = next(a for a in found if a.key == "sdxl-evaluation-summary")
    assert evaluation.verdict in summary.data and "Random-weight stand-ins" in summary.data


def test_regression_flow_fails_on_a_planted_slowdown(
    prefect_api: None, services: tuple[str, str], tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    from evaluation.history import HistoryStore
    from evaluation.regression import series_key
    from flows.config.target import Connection, NewService, Target, Workload
    from flows.runbooks.regression import regression_benchmark

    port = int(services[1].rsplit(":", 1)[1])
    target = Target(
        connection=Connection(kind="local"),
        new=NewService(model="tiny-sdxl", port=port),
        workload=Workload(app_request=TINY_REQUEST),
    )
    params = {
        "target": target,
        "prompt_limit": 2,
        "seeds": 1,
        "scorer": "tiny-random-clip",
        "scorer_weights": None,
    }
    params |= {"results_dir": str(tmp_path / "results"), "runs_dir": str(tmp_path / "runs")}
    # The planted slowdown: three earlier runs of the same series that took a millisecond per image.
    series = series_key(
        "tiny-sdxl",
        GenerationSettings.model_validate(TINY_REQUEST),
        tiny_scorer().describe(),
        spread(builtin_prompts(), 2),
        [0],
    )
    store = HistoryStore(tmp_path / "results")
    for day in (1, 2, 3):
        store.append(
            {
                "created_at": f"2026-01-0{day}T03:00:00+00:00",
                "series": series,
                "status": "ok",
                "latency_p50_s": 0.001,
                "latency_p95_s": 0.001,
            }
        )

    state = regression_benchmark(**params, return_state=True)
    assert state.is_failed()
    assert "latency_p95_s regressed" in state.message and "0.001 s baseline" in state.message, state.message
    history = store.load()
    assert len(history) == 4 and history["status"].iloc[-1] == "regressed"
    assert set(history["regressions"].iloc[-1]) >= {"latency_p50_s", "latency_p95_s"}
    run_dir = Path(history["run_dir"].iloc[-1])
    assert "History: CLIP score and p95 latency" in (run_dir / "report.html").read_text()

    keys = ["regression-benchmark-checks", "regression-benchmark-summary", "regression-benchmark-report"]
    this_run = ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys), flow_run_id=this_run)
        )
    assert {a.key for a in found} == set(keys)

    state = regression_benchmark(**params, accept=True, return_state=True)
    assert state.is_completed(), state.message
    assert store.load()["status"].iloc[-1] == "accepted"


def test_an_opt_in_comparison_names_what_the_candidate_changes(
    model_cache: Path, services: tuple[str, str], tmp_path: Path
) -> None:
    """README's recipe: the service as shipped against the same model with the opt-ins that change images."""
    from evaluation.report import render_report
    from tests.support.servers import settings_for, thread_server

    opt_ins = settings_for("tiny-sdxl", model_cache, cfg_cutoff=0.5, tiny_vae="on")
    with thread_server(opt_ins) as candidate:
        result = evaluate_services(
            services[1],
            candidate,
            spread(builtin_prompts(), 1),
            1,
            tmp_path / "run",
            settings=TINY,
            scorer=tiny_scorer(),
            margin=1.0,
        )
    assert result.services["baseline"].quality_options == []
    options = result.services["candidate"].quality_options
    assert options[0] == "cfg_cutoff=0.5" and options[1].startswith("tiny_vae=")
    html = render_report(result.run_dir).read_text()
    assert "opt-ins that change images: cfg_cutoff=0.5, tiny_vae=" in html
