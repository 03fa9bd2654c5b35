"""The scheduled `regression-benchmark` flow: benchmark and CLIP-score the running service with the app's
request settings, append the run to the history in `results_dir`, compare it with a baseline window, and
end Failed when a metric regressed (the message names each metric with its value now and its baseline).

The work is `evaluation.regression.run_regression_benchmark`; this module reaches the service (through an
SSH port forward for a remote target) and publishes the Prefect artifacts.
"""

from __future__ import annotations

from contextlib import ExitStack

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from evaluation.clip_score import DEFAULT_MODEL, DEFAULT_PRETRAINED, load_scorer
from evaluation.history import DEFAULT_THRESHOLDS, Threshold
from evaluation.metrics import DEFAULT_PRICE_PER_HOUR
from evaluation.prompts import builtin_prompts, load_prompts, spread
from evaluation.regression import RegressionDetected, run_regression_benchmark
from evaluation.results import GenerationSettings, RegressionRun
from flows.box.common import run_logger, service_url
from flows.config.secrets import api_key
from flows.config.target import Target
from flows.record.artifacts import publish_regression
from flows.record.rundir import make_run_dir
from flows.runbooks.hostrun import choose_target, connect


@task(cache_policy=NO_CACHE)
def benchmark_deployed(
    target: Target,
    prompts_file: str | None,
    prompt_limit: int | None,
    seeds: int,
    scorer: str,
    scorer_weights: str | None,
    thresholds: list[Threshold],
    window: int,
    min_runs: int,
    price_per_hour: float,
    accept: bool,
    results_dir: str,
    runs_dir: str,
) -> RegressionRun:
    """Generate, score and time the prompt set on the target's service; judge it against the history."""
    prompts = spread(load_prompts(prompts_file) if prompts_file else builtin_prompts(), prompt_limit)
    settings = GenerationSettings.model_validate(target.workload.app_request)
    clip = load_scorer(scorer, scorer_weights)
    run_dir = make_run_dir(runs_dir, "regression-benchmark")
    run_logger().info(
        "regression benchmark: %d prompts x %d seeds, %s, scorer %s",
        len(prompts),
        seeds,
        settings,
        clip.describe(),
    )
    with ExitStack() as stack:
        host, target = connect(stack, target)
        url = stack.enter_context(service_url(host, target.new.port))
        return run_regression_benchmark(
            url,
            prompts,
            run_dir,
            results_dir,
            seeds=seeds,
            settings=settings,
            scorer=clip,
            thresholds=thresholds,
            window=window,
            min_runs=min_runs,
            price_per_hour=price_per_hour,
            accept=accept,
            api_key=api_key(target.new),
        )


@flow(name="regression-benchmark", log_prints=True)
def regression_benchmark(
    target: Target = Target(),
    target_file: str | None = None,
    prompts_file: str | None = None,
    prompt_limit: int | None = 9,
    seeds: int = 2,
    scorer: str = DEFAULT_MODEL,
    scorer_weights: str | None = DEFAULT_PRETRAINED,
    thresholds: list[Threshold] | None = None,
    window: int = 5,
    min_runs: int = 3,
    price_per_hour: float = DEFAULT_PRICE_PER_HOUR,
    accept: bool = False,
    results_dir: str = "results",
    runs_dir: str = "runs",
) -> RegressionRun:
    """Benchmark the deployed service and fail when latency, VRAM or CLIP score regressed.

    Args:
        target: The host and the deployed service (ignored when target_file is set).
        target_file: A YAML/JSON target file on the worker's machine.
        prompts_file: A prompt file (.txt, .csv/.tsv, .jsonl); default: the built-in set.
        prompt_limit: Use at most this many prompts, spread over categories (None: all).
        seeds: Seeds per prompt (0..K-1).
        scorer: open_clip model of the CLIP scorer (tiny-random-clip for dry runs).
        scorer_weights: open_clip weights tag or a local checkpoint file (None: random weights).
        thresholds: How far each metric may move the bad way (default: latency +20%/+25%, VRAM +10%
            and at least 0.5 GB, CLIP score -1 point, each also beyond the window's noise).
        window: Compare with the median of this many earlier good runs of the same series.
        min_runs: Earlier runs needed before a metric is judged.
        price_per_hour: What the GPU box costs per hour (USD), for the cost per image.
        accept: Record a regressed run as the new normal instead of failing.
        results_dir: Where history.jsonl lives.
        runs_dir: Where the run directory (tables, report.html) is written.
    """
    target = choose_target(target, target_file)
    run = benchmark_deployed(
        target,
        prompts_file,
        prompt_limit,
        seeds,
        scorer,
        scorer_weights,
        list(thresholds or DEFAULT_THRESHOLDS),
        window,
        min_runs,
        price_per_hour,
        accept,
        results_dir,
        runs_dir,
    )
    publish_regression(run)
    print(f"{run.message()}\nreport: {run.report}")
    if run.regressed and not run.accepted:
        raise RegressionDetected(run.message())
    return run
