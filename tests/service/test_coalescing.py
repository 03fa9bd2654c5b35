"""Coalescing: compatible waiting requests run as one batched pipeline call and get the images they would
get alone; incompatible ones, timed-out ones and failures are kept apart."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from service.accel import plan_speed
from service.client import decode_image
from service.engine import tensor_to_pil
from service.errors import Cancelled, GenerationTimeout, OutOfMemory
from service.faults import FaultInjector
from service.schema import GenerateRequest
from service.settings import ServiceSettings
from service.state import ServiceState
from service.worker import GenerationQueue, Job
from tests.support.servers import settings_for

# ----- the queue ------------------------------------------------------------------------------------


class Blocked:
    """Holds the worker thread busy until released, so that jobs pile up in the queue."""

    def __init__(self, queue: GenerationQueue) -> None:
        self.queue, self.gate = queue, threading.Event()
        self.thread = threading.Thread(target=queue.call, args=(self.gate.wait,))

    def __enter__(self) -> Blocked:
        self.thread.start()
        _until(lambda: self.queue.running is not None)  # the worker has taken the blocking call
        return self

    def __exit__(self, *exc: object) -> None:
        self.gate.set()
        self.thread.join(10)


def _until(condition: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


@pytest.fixture
def queue() -> Iterator[GenerationQueue]:
    q = GenerationQueue(max_queue=16, retry_after_s=1, batch_sizes=(1, 2, 4))
    yield q
    q.shutdown()


def _recorder() -> tuple[list[list[str]], object]:
    calls: list[list[str]] = []

    def work(jobs: list[Job]) -> list[str]:
        names = [job.payload for job in jobs]
        calls.append(names)
        return [f"done {name}" for name in names]

    return calls, work


async def _while_blocked(
    queue: GenerationQueue, calls: list[Coroutine[Any, Any, Any]], return_exceptions: bool = False
) -> list[Any]:
    """Start `calls` while the worker is held busy, wait until every one is queued, release it, gather."""
    with Blocked(queue):
        tasks = [asyncio.create_task(call) for call in calls]
        while queue.depth < len(tasks):
            await asyncio.sleep(0.01)
    return await asyncio.gather(*tasks, return_exceptions=return_exceptions)


def _runs(queue: GenerationQueue, work: object, jobs: list[tuple[str, object, int]]) -> list[Coroutine]:
    """`queue.run` of each (name, group, images) job, not started yet."""
    return [queue.run(work, 30, payload=n, group=g, images=i) for n, g, i in jobs]  # type: ignore[arg-type]


def test_waiting_jobs_of_one_group_run_together_in_arrival_order_and_in_allowed_sizes(
    queue: GenerationQueue,
) -> None:
    calls, work = _recorder()
    jobs = [("a1", "a", 1), ("a2", "a", 1), ("b1", "b", 1), ("a3", "a", 1)]
    done = asyncio.run(_while_blocked(queue, _runs(queue, work, jobs)))
    # a1 takes a2 and a3 (b1 is another group), 3 images is not an allowed size: a3 waits for the next call
    assert calls == [["a1", "a2"], ["b1"], ["a3"]]
    assert [result for result, _ in done] == ["done a1", "done a2", "done b1", "done a3"]
    assert [job.batched_with for _, job in done] == [2, 2, 1, 1]


def test_images_count_towards_the_largest_size_and_no_group_means_alone(queue: GenerationQueue) -> None:
    calls, work = _recorder()
    jobs = [("n1", None, 1), ("n2", None, 1), ("big", "a", 3), ("one", "a", 1), ("two", "a", 2)]
    asyncio.run(_while_blocked(queue, _runs(queue, work, jobs)))
    assert calls == [["n1"], ["n2"], ["big", "one"], ["two"]]


def test_batch_sizes_of_one_never_coalesce() -> None:
    queue = GenerationQueue(max_queue=16, retry_after_s=1)
    try:
        calls, work = _recorder()
        asyncio.run(_while_blocked(queue, _runs(queue, work, [("a1", "a", 1), ("a2", "a", 1)])))
        assert calls == [["a1"], ["a2"]]
    finally:
        queue.shutdown()


def test_a_timed_out_waiting_job_is_left_out_of_the_batch(queue: GenerationQueue) -> None:
    calls, work = _recorder()

    async def scenario() -> tuple[BaseException | str, ...]:
        with Blocked(queue):
            late = asyncio.create_task(queue.run(work, 0.2, payload="late", group="a"))
            keep = [
                asyncio.create_task(queue.run(work, 30, payload=name, group="a")) for name in ("k1", "k2")
            ]
            with pytest.raises(GenerationTimeout):
                await late
        return tuple(result for result, _ in await asyncio.gather(*keep))

    assert asyncio.run(scenario()) == ("done k1", "done k2")
    assert calls == [["k1", "k2"]]


def test_a_failure_reaches_every_job_of_the_batch_and_the_worker_goes_on(queue: GenerationQueue) -> None:
    def failing(jobs: list[Job]) -> list[str]:
        raise RuntimeError(f"boom for {len(jobs)}")

    jobs = [("x", "a", 1), ("y", "a", 1)]
    outcomes = asyncio.run(_while_blocked(queue, _runs(queue, failing, jobs), return_exceptions=True))
    assert [str(o) for o in outcomes] == ["boom for 2", "boom for 2"]
    calls, work = _recorder()
    assert asyncio.run(queue.run(work, 30, payload="after"))[0] == "done after"


def test_an_exception_as_one_outcome_fails_that_job_alone(queue: GenerationQueue) -> None:
    def work(jobs: list[Job]) -> list[object]:
        return [ValueError(job.payload) if job.payload == "bad" else f"done {job.payload}" for job in jobs]

    jobs = [("bad", "a", 1), ("good", "a", 1)]
    bad, good = asyncio.run(_while_blocked(queue, _runs(queue, work, jobs), return_exceptions=True))
    assert isinstance(bad, ValueError) and str(bad) == "bad"
    assert isinstance(good, tuple) and good[0] == "done good" and good[1].batched_with == 2


def test_a_shut_down_queue_refuses_new_work_at_once() -> None:
    queue = GenerationQueue(max_queue=4, retry_after_s=1)
    queue.shutdown()
    calls, work = _recorder()
    with pytest.raises(Cancelled, match="shut down"):
        asyncio.run(queue.run(work, 30, payload="late"))
    with pytest.raises(Cancelled, match="shut down"):
        queue.call(lambda: None)
    assert calls == []


# ----- the plan -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "backend", "overrides", "sizes"),
    [
        ("cpu", "sd15", {}, (1,)),  # auto: off on the CPU
        ("cuda", "sd15", {}, (1, 2, 4)),  # auto: SD1.5 on CUDA (measured 1.26x / 1.44x)
        ("cuda", "sdxl", {}, (1,)),  # auto: not SDXL (measured 1.07x at 1024 px)
        ("cuda", "sdxl", {"coalesce": "on", "coalesce_max_images": 2}, (1, 2)),
        ("cpu", "sdxl", {"coalesce": "on", "coalesce_max_images": 8}, (1, 2, 4, 8)),
        ("cpu", "sdxl", {"coalesce": "on", "coalesce_max_images": 6}, (1, 2, 4)),
        ("cuda", "sd15", {"coalesce": "off"}, (1,)),
    ],
)
def test_coalesce_sizes_follow_the_setting_the_device_and_the_model(
    device: str, backend: str, overrides: dict[str, object], sizes: tuple[int, ...]
) -> None:
    settings = ServiceSettings(**overrides)  # type: ignore[arg-type]
    assert plan_speed(settings, torch.device(device), backend).coalesce_sizes == sizes


# ----- the service ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coalescing_state(model_cache: Path) -> Iterator[ServiceState]:
    settings = settings_for("tiny-sdxl", model_cache, coalesce="on", coalesce_max_images=4)
    state = ServiceState(settings)
    state.start_loading().join(300)
    assert state.status == "ready", state.load_error
    yield state
    state.queue.shutdown()


def _request(prompt: str, seed: int, **extra: object) -> GenerateRequest:
    body = {"width": 64, "height": 64, "num_inference_steps": 3, "use_refiner": True, **extra}
    return GenerateRequest(prompt=prompt, seed=seed, **body)  # type: ignore[arg-type]


async def _together(
    state: ServiceState, requests: list[GenerateRequest], return_exceptions: bool = False
) -> list:
    return await _while_blocked(state.queue, [state.generate(req) for req in requests], return_exceptions)


def _pixels(b64: str) -> np.ndarray:
    return np.asarray(decode_image(b64)).astype(np.int16)


def test_compatible_requests_share_one_call_and_get_the_images_they_get_alone(
    coalescing_state: ServiceState,
) -> None:
    state = coalescing_state
    requests = [
        _request("a red bicycle", 11),
        _request("a lighthouse at dusk", 22, batch_size=2),
        _request("a bowl of soup", 33),
    ]
    before = state.metrics.coalesced._value.get()
    together = asyncio.run(_together(state, requests))
    assert [r.timings.get("batched_with") for r in together] == [3, 3, 3]  # 4 images: one call
    assert [r.seeds for r in together] == [[11], [22, 23], [33]]
    assert state.metrics.coalesced._value.get() - before == 3
    for req, shared in zip(requests, together, strict=True):
        alone = asyncio.run(state.generate(req))
        assert "batched_with" not in alone.timings
        for a, b in zip(alone.images or [alone.image], shared.images or [shared.image], strict=True):
            diff = np.abs(_pixels(a) - _pixels(b))
            assert diff.max() <= 2 and diff.mean() < 0.05, (req.prompt, diff.max(), diff.mean())
    # three different prompts gave three different images (the prompts were not mixed up)
    firsts = [_pixels(r.image) for r in together]
    assert all(np.abs(firsts[i] - firsts[j]).mean() > 1 for i, j in ((0, 1), (0, 2), (1, 2)))


def test_an_ancestral_sampler_draws_each_image_s_noise_from_its_own_seed(
    coalescing_state: ServiceState,
) -> None:
    requests = [_request(prompt, seed, sampler="Euler a") for prompt, seed in (("a boat", 3), ("a kite", 4))]
    together = asyncio.run(_together(coalescing_state, requests))
    assert [r.timings.get("batched_with") for r in together] == [2, 2]
    for req, shared in zip(requests, together, strict=True):
        alone = asyncio.run(coalescing_state.generate(req))
        diff = np.abs(_pixels(alone.image) - _pixels(shared.image))
        assert diff.max() <= 2 and diff.mean() < 0.05, (req.prompt, diff.max(), diff.mean())


def test_a_batch_out_of_gpu_memory_runs_its_requests_one_by_one(coalescing_state: ServiceState) -> None:
    engine = coalescing_state.engine
    requests = [_request("a boat", 5), _request("a kite", 6)]
    try:
        engine.faults = FaultInjector("oom:1")  # the batch fails; alone, both fit
        answers = asyncio.run(_together(coalescing_state, requests))
        assert [a.seeds for a in answers] == [[5], [6]]
        assert [a.timings.get("batched_with") for a in answers] == [None, None]  # they ran alone
        engine.faults = FaultInjector("oom:2")  # the batch fails, then the first request alone too
        outcomes = asyncio.run(_together(coalescing_state, requests, return_exceptions=True))
        assert isinstance(outcomes[0], OutOfMemory)
        assert not isinstance(outcomes[1], BaseException) and outcomes[1].seeds == [6]
    finally:
        engine.faults = FaultInjector(None)


def test_requests_that_differ_in_shape_or_settings_do_not_share_a_call(
    coalescing_state: ServiceState,
) -> None:
    requests = [
        _request("a red bicycle", 1),
        _request("a red bicycle", 2, width=128),  # another size
        _request("a red bicycle", 3, num_inference_steps=4),  # other steps
        _request("a red bicycle", 4, negative_prompt="blurry"),  # negative text vs none
    ]
    together = asyncio.run(_together(coalescing_state, requests))
    assert [r.timings.get("batched_with") for r in together] == [None, None, None, None]


def test_device_side_pixels_equal_diffusers_own_post_processing(coalescing_state: ServiceState) -> None:
    engine = coalescing_state.engine
    params = engine.params(_request("a red bicycle", 5, use_refiner=False))
    ours = np.asarray(engine.generate(params, Job()).image)
    kwargs = {"prompt": "a red bicycle", "num_inference_steps": 3, "width": 64, "height": 64}
    kwargs["guidance_scale"] = params.guidance_scale
    theirs = engine.base(generator=torch.Generator("cpu").manual_seed(5), **kwargs).images[0]
    assert np.array_equal(ours, np.asarray(theirs))
    # and the conversion itself: the same pixels as diffusers' numpy path, rounding included
    tensor = torch.rand(2, 3, 8, 8)
    tensor[0, 0, :2, :2] = torch.tensor([[0.0, 1.0], [0.5 / 255, 254.5 / 255]])  # ends and half levels
    expected = engine.base.image_processor.numpy_to_pil(tensor.permute(0, 2, 3, 1).numpy())
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(tensor_to_pil(tensor), expected, strict=True)
    )


def test_the_queue_is_idle_before_any_waiter_hears_back(queue: GenerationQueue) -> None:
    """A client that asks for progress right after its answer must not see its own job still running."""
    running: list[object] = []

    def work(jobs: list[Job]) -> list[str]:
        running.append(queue.running)
        return ["ok"]

    async def ask() -> tuple[str, object]:
        answer = await queue.run(work, 30)
        return answer[0], queue.running  # what the client sees the moment it hears back

    assert asyncio.run(ask()) == ("ok", None)
    assert len(running) == 1 and running[0] is not None  # its job was the running one while it ran
