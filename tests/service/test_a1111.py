"""The AUTOMATIC1111-compatible API, driven by a real A1111 client library (webuiapi, from PyPI), plus
samplers and batches on our own `/generate`, against a real uvicorn server running tiny-sdxl."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import webuiapi

from service.client import ServiceCallError, ServiceClient, decode_image
from service.samplers import SAMPLER_NAMES
from tests.support.servers import settings_for, thread_server

TINY = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def url(service_url) -> str:
    return service_url("tiny-sdxl")


@pytest.fixture(scope="module")
def api(url: str) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", sampler="Euler a", steps=2)


def raw_txt2img(api: webuiapi.WebUIApi, **payload: Any) -> webuiapi.WebUIApiResult:
    """Fields webuiapi 0.9.17's txt2img() has no argument for (refiner), through the client's own post."""
    return api.post_and_get_api_result(f"{api.baseurl}/txt2img", payload, False)


def first_png(result: webuiapi.WebUIApiResult) -> bytes:
    return base64.b64decode(result.json["images"][0])


def test_txt2img_answers_like_a1111(api: webuiapi.WebUIApi) -> None:
    result = api.txt2img(prompt="a lighthouse", negative_prompt="fog", seed=42, **TINY)
    assert len(result.images) == 1 and result.image.size == (64, 64)
    assert result.info["seed"] == 42 and result.info["all_seeds"] == [42]
    assert result.info["sampler_name"] == "Euler a"  # the client's default sampler was used
    assert result.info["sd_model_name"] == "tiny-sdxl"
    assert result.info["infotexts"][0].startswith(
        "a lighthouse\nNegative prompt: fog\nSteps: 2, Sampler: Euler a"
    )
    assert result.parameters["prompt"] == "a lighthouse" and result.parameters["seed"] == 42
    assert result.info["warnings"] == []  # webuiapi's default fields are all understood or neutral


def test_seed_round_trip(api: webuiapi.WebUIApi) -> None:
    random = api.txt2img(prompt="a red cube", seed=-1, **TINY)
    seed = random.info["seed"]
    assert 0 <= seed < 2**32 and random.info["all_seeds"] == [seed]
    again = api.txt2img(prompt="a red cube", seed=seed, **TINY)
    other = api.txt2img(prompt="a red cube", seed=seed + 1, **TINY)
    assert first_png(again) == first_png(random)
    assert first_png(other) != first_png(random)


def test_batch_and_n_iter_number_seeds_like_a1111(api: webuiapi.WebUIApi) -> None:
    result = api.txt2img(prompt="a tree", seed=100, batch_size=2, n_iter=2, **TINY)
    assert len(result.images) == 4 and all(image.size == (64, 64) for image in result.images)
    assert result.info["all_seeds"] == [100, 101, 102, 103]
    assert [text.split("Seed: ")[1].split(",")[0] for text in result.info["infotexts"]] == [
        "100",
        "101",
        "102",
        "103",
    ]
    assert len(set(result.json["images"])) == 4
    # the second batch is the first one's seeds + batch_size: same request from 102 gives the same images
    replay = api.txt2img(prompt="a tree", seed=102, batch_size=2, **TINY)
    assert replay.json["images"] == result.json["images"][2:]


def test_samplers_are_listed_and_every_one_runs_differently(api: webuiapi.WebUIApi) -> None:
    assert api.util_get_sampler_names() == sorted(SAMPLER_NAMES)
    listed = {item["name"]: item for item in api.get_samplers()}
    assert "k_euler_a" in listed["Euler a"]["aliases"]
    images = {}
    for name in SAMPLER_NAMES:
        # 3 steps: at 2, UniPC's first-order start equals DPM++ 2M's
        result = api.txt2img(prompt="a boat", seed=7, sampler_name=name, **{**TINY, "steps": 3})
        assert result.info["sampler_name"] == name
        images[name] = first_png(result)
    assert len(set(images.values())) == len(SAMPLER_NAMES)


def test_scheduler_karras_picks_the_karras_variant(api: webuiapi.WebUIApi) -> None:
    plain = api.txt2img(prompt="a boat", seed=7, sampler_name="DPM++ 2M", scheduler="Automatic", **TINY)
    karras = api.txt2img(prompt="a boat", seed=7, sampler_name="DPM++ 2M", scheduler="Karras", **TINY)
    named = api.txt2img(prompt="a boat", seed=7, sampler_name="DPM++ 2M Karras", **TINY)
    assert plain.info["sampler_name"] == "DPM++ 2M"
    assert karras.info["sampler_name"] == "DPM++ 2M Karras"
    assert first_png(karras) == first_png(named) != first_png(plain)


def test_progress_during_a_job(api: webuiapi.WebUIApi) -> None:
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    done: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: done.setdefault(
            "result", api.txt2img(prompt="a slow one", width=64, height=64, steps=12)
        )
    )
    worker.start()
    seen: dict[str, Any] | None = None
    deadline = time.monotonic() + 120
    while worker.is_alive() and time.monotonic() < deadline:
        answer = api.get_progress()
        if answer["state"]["sampling_step"] > 0:
            seen = answer
            break
        time.sleep(0.02)
    worker.join(timeout=180)
    assert seen is not None, "never saw a step of the running job"
    assert 0 < seen["progress"] <= 1 and seen["eta_relative"] >= 0
    assert seen["state"]["job_count"] == 1 and seen["state"]["sampling_steps"] == 12
    assert 0 < seen["state"]["sampling_step"] <= 12
    assert len(done["result"].images) == 1
    after = api.get_progress()
    assert after["progress"] == 0 and after["state"]["job_count"] == 0


def test_parallel_requests_share_the_one_queue(api: webuiapi.WebUIApi) -> None:
    seeds = [501, 502, 503]
    results: dict[int, webuiapi.WebUIApiResult] = {}

    def call(seed: int) -> None:
        results[seed] = api.txt2img(prompt="a bird", seed=seed, **TINY)

    threads = [threading.Thread(target=call, args=(seed,)) for seed in seeds]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert {seed: results[seed].info["all_seeds"] for seed in seeds} == {seed: [seed] for seed in seeds}
    assert len({first_png(result) for result in results.values()}) == 3


def test_models_options_and_scripts(api: webuiapi.WebUIApi) -> None:
    assert api.util_get_model_names() == ["tiny-sdxl", "tiny-sdxl-refiner"]
    assert api.util_get_current_model() == "tiny-sdxl"
    assert api.set_options({"sd_model_checkpoint": "tiny-sdxl"}) == {}
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert [s["name"] for s in api.get_schedulers()] == ["automatic", "karras"]


def test_refiner_switch_and_hires_fields(api: webuiapi.WebUIApi) -> None:
    result = raw_txt2img(
        api,
        prompt="a castle",
        seed=3,
        refiner_checkpoint="tiny-sdxl-refiner",
        refiner_switch_at=0.5,
        enable_hr=True,
        hr_scale=1.5,
        denoising_strength=0.5,
        **TINY,
    )
    assert result.image.size == (96, 96)
    extra = result.info["extra_generation_params"]
    assert extra["Refiner"] == "tiny-sdxl-refiner" and extra["Refiner switch at"] == 0.5
    assert extra["Hires upscale"] == 1.5 and result.info["denoising_strength"] == 0.5
    assert {"base", "refiner", "hires"} <= result.info["timings"].keys()


def test_unsupported_fields_warn_and_unsupported_operations_refuse(url: str) -> None:
    answer = httpx.post(
        f"{url}/sdapi/v1/txt2img",
        json={"prompt": "x", "tiling": True, "styles": ["noir"], "subseed_strength": 0.0, **TINY},
        timeout=120,
    )
    assert answer.status_code == 200
    assert "ignored (not supported here): styles, tiling" in answer.json()["info"]
    refusals = {
        "img2img": (httpx.post(f"{url}/sdapi/v1/img2img", json={}), 404, "img2img is not supported"),
        "sampler": (
            httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Heun++"}),
            422,
            "sampler_name: unknown sampler",
        ),
        "steps": (
            httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 500}),
            422,
            "steps: Input should be less than or equal to 150 (got 500)",
        ),
        "script": (
            httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "script_name": "X/Y/Z plot"}),
            422,
            "script_name: scripts are not supported",
        ),
        "checkpoint": (
            httpx.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "sd_xl_turbo"}),
            422,
            "sd_model_checkpoint: this server serves only 'tiny-sdxl' (got 'sd_xl_turbo')",
        ),
    }
    for name, (response, status, message) in refusals.items():
        assert response.status_code == status, name
        assert message in response.json()["error"], name


def test_generate_takes_samplers_and_batches(url: str) -> None:
    with ServiceClient(url) as client:
        batch = client.generate(
            prompt="a cat",
            seed=11,
            batch_size=3,
            sampler="DPM++ 2M Karras",
            num_inference_steps=2,
            width=64,
            height=64,
        )
        assert batch.seeds == [11, 12, 13] and batch.seed == 11
        assert batch.images is not None and len(set(batch.images)) == 3 and batch.image == batch.images[0]
        assert batch.sampler == "DPM++ 2M Karras" and decode_image(batch.images[2]).size == (64, 64)
        single = client.generate(prompt="a cat", seed=11, num_inference_steps=2, width=64, height=64)
        assert single.images is None and single.seeds == [11] and single.sampler is None
        alias = client.generate(
            prompt="a cat", seed=11, sampler="k_euler_a", num_inference_steps=2, width=64, height=64
        )
        assert alias.sampler == "Euler a" and alias.image != single.image
        # a sampler lasts one job: the model's own scheduler is back for the next request
        again = client.generate(prompt="a cat", seed=11, num_inference_steps=2, width=64, height=64)
        assert again.image == single.image
        with pytest.raises(ServiceCallError) as bad:
            client.generate(prompt="a cat", sampler="Heun++")
        assert bad.value.status == 422 and "sampler: unknown sampler" in bad.value.message
        assert "(got 'Heun++')" in bad.value.message
        with pytest.raises(ServiceCallError) as big:
            client.generate(prompt="a cat", batch_size=9)
        assert big.value.status == 422 and big.value.message.startswith("batch_size:")


@pytest.fixture(scope="module")
def keyed_url(model_cache: Path) -> Iterator[str]:
    with thread_server(settings_for("tiny-sdxl", model_cache, api_key="s3cret")) as url:
        yield url


def test_api_key_protects_sdapi_and_basic_auth_works(keyed_url: str) -> None:
    anonymous = webuiapi.WebUIApi(baseurl=f"{keyed_url}/sdapi/v1")
    with pytest.raises(RuntimeError) as refused:
        anonymous.txt2img(prompt="x", **TINY)
    assert refused.value.args[0] == 401
    assert httpx.get(f"{keyed_url}/sdapi/v1/progress").status_code == 401
    basic = webuiapi.WebUIApi(baseurl=f"{keyed_url}/sdapi/v1", username="anyone", password="s3cret")
    assert basic.txt2img(prompt="x", seed=5, **TINY).info["seed"] == 5
    bearer = httpx.get(f"{keyed_url}/sdapi/v1/samplers", headers={"Authorization": "Bearer s3cret"})
    assert bearer.status_code == 200
    wrong = webuiapi.WebUIApi(baseurl=f"{keyed_url}/sdapi/v1", username="anyone", password="nope")
    with pytest.raises(RuntimeError):
        wrong.txt2img(prompt="x", **TINY)
