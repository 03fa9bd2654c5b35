"""The HTTP contract through real uvicorn servers running the tiny models."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json

import httpx
import pytest

from service.client import ServiceCallError, ServiceClient, decode_image
from service.schema import HealthResponse, ServiceHealth, serving

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2}


@pytest.fixture(scope="module")
def sdxl(service_url) -> ServiceClient:
    with ServiceClient(service_url("tiny-sdxl")) as client:
        yield client


@pytest.fixture(scope="module")
def sd15(service_url) -> ServiceClient:
    with ServiceClient(service_url("tiny-sd15")) as client:
        yield client


def post(client: ServiceClient, body: object, **kw: object) -> httpx.Response:
    return httpx.post(f"{client.base_url}/generate", json=body, timeout=120, **kw)


def test_a_health_body_of_any_service_reads_typed_and_dumps_back_as_answered(sdxl: ServiceClient) -> None:
    """This release's body, an older release's (fewer fields), the SD1.5 stand-in's, and odd ones: one `serving`."""
    own = httpx.get(f"{sdxl.base_url}/health").json()
    read = ServiceHealth.of(own)
    assert serving(read) and read.model == "tiny-sdxl" and read.model_dump() == own
    assert HealthResponse.model_validate(own).model == read.model
    older = {
        key: value for key, value in own.items() if key not in ("startup", "compiles", "listening", "staged")
    }
    assert serving(ServiceHealth.of(older)) and ServiceHealth.of(older).model_dump() == older
    # tests/support/legacy_api.py, the user's SD1.5 script's stand-in
    legacy = {"status": "healthy", "model_loaded": True, "cuda_available": False}
    assert serving(ServiceHealth.of(legacy)) and ServiceHealth.of(legacy).model is None
    assert ServiceHealth.of(legacy).model_dump() == legacy
    says = {
        "loading": ({"status": "loading", "model_loaded": False}, False),
        "broken": ({"status": "unhealthy", "model_loaded": False, "error": "no weights"}, False),
        "not loaded": ({"model_loaded": False}, False),
        "nothing said": ({}, True),
        "a string, not False": ({"model_loaded": "false"}, True),
        "not an object": (["ok"], True),
    }
    assert {name: serving(ServiceHealth.of(body)) for name, (body, _) in says.items()} == {
        name: serving_ for name, (_, serving_) in says.items()
    }
    assert ServiceHealth.of({"listening": [7860, "x"], "model": "m"}).listening == []  # a wrong type: unsaid


def test_health_reports_the_fields_operators_read(sdxl: ServiceClient) -> None:
    health = sdxl.health()
    assert health.status == "healthy" and serving(health)
    assert health.model_loaded is True
    assert health.cuda_available is False
    assert health.codeformer_available is False
    assert health.vram_available is None
    assert health.model == "tiny-sdxl" and health.backend == "sdxl"
    assert health.refiner_loaded is True
    assert health.device == "cpu"
    assert health.version == importlib.metadata.version("sdxl-deploy")  # the installed release's own
    assert health.uptime_s >= 0
    assert health.prompt_cache is not None
    assert health.prompt_cache["size"] == 64 and set(health.prompt_cache) == {
        "kept",
        "size",
        "hits",
        "misses",
    }
    assert sdxl.ready() is True


def test_app_payload_gets_a_valid_png_of_the_asked_size(sdxl: ServiceClient) -> None:
    payload = {
        "prompt": "professional basketball player shooting a three pointer",
        "num_inference_steps": 4,
        "width": 128,
        "height": 96,
        "use_refiner": True,
        "use_face_restoration": False,
        "hires_fix": False,
    }
    answer = sdxl.generate(**payload)
    image = decode_image(answer.image)
    assert answer.success is True
    assert image.format == "PNG" and image.size == (128, 96)
    assert answer.final_resolution == "128x96"
    assert answer.model == "tiny-sdxl"
    assert {"queue", "base", "refiner", "encode", "total"} <= answer.timings.keys()
    assert answer.timings["total"] >= answer.timings["base"] + answer.timings["refiner"]
    assert answer.warnings == []


def test_same_seed_same_image_other_seed_other_image(sdxl: ServiceClient) -> None:
    first = sdxl.generate(prompt="a red cube", seed=1234, **SMALL)
    again = sdxl.generate(prompt="a red cube", seed=1234, **SMALL)
    other = sdxl.generate(prompt="a red cube", seed=99, **SMALL)
    assert first.seed == again.seed == 1234
    assert first.image == again.image
    assert other.image != first.image


def test_random_seed_is_returned_and_reproduces_the_image(sdxl: ServiceClient) -> None:
    random = sdxl.generate(prompt="a cat", seed=-1, **SMALL)
    replay = sdxl.generate(prompt="a cat", seed=random.seed, **SMALL)
    assert 0 <= random.seed < 2**32
    assert replay.image == random.image


def test_refiner_is_the_sdxl_default_and_can_be_turned_off(sdxl: ServiceClient) -> None:
    assert "refiner" in sdxl.generate(prompt="x", **SMALL).timings
    assert "refiner" not in sdxl.generate(prompt="x", use_refiner=False, **SMALL).timings


def test_hires_fix_upscales_and_refines(sdxl: ServiceClient) -> None:
    answer = sdxl.generate(prompt="a house", hires_fix=True, use_refiner=False, **SMALL)
    assert answer.final_resolution == "96x96"
    assert decode_image(answer.image).size == (96, 96)
    assert "hires" in answer.timings


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_output_formats(sdxl: ServiceClient, fmt: str, pil_format: str) -> None:
    answer = sdxl.generate(prompt="x", output_format=fmt, **SMALL)
    assert decode_image(answer.image).format == pil_format


def test_unknown_fields_from_older_apps_are_ignored_and_named(sdxl: ServiceClient) -> None:
    response = post(sdxl, {"prompt": "x", "sampler": "k_euler", "codeformer_fidelity": 0.7, **SMALL})
    assert response.status_code == 200, response.text
    assert "unknown fields ignored: codeformer_fidelity" in response.json()["warnings"]


def test_sd15_defaults_and_warnings(sd15: ServiceClient) -> None:
    health = sd15.health()
    assert health.backend == "sd15" and health.refiner_loaded is False
    answer = sd15.generate(prompt="a dog", use_refiner=True, use_face_restoration=True, **SMALL)
    assert answer.success
    assert any("use_refiner ignored" in w for w in answer.warnings)
    assert any("use_face_restoration ignored" in w for w in answer.warnings)
    assert "refiner" not in answer.timings


def test_default_size_is_the_backends(sd15: ServiceClient) -> None:
    answer = sd15.generate(prompt="a dog", num_inference_steps=1)
    assert answer.final_resolution == "512x512"


BAD_VALUES = [
    ({"width": 1001}, "width", "1001"),
    ({"height": 100}, "height", "100"),
    ({"width": 4096}, "width", "4096"),
    ({"width": 1032}, "width", "1032"),  # a multiple of 8, but above tiny-sdxl's 1024
    ({"num_inference_steps": 0}, "num_inference_steps", "0"),
    ({"num_inference_steps": 151}, "num_inference_steps", "151"),
    ({"num_inference_steps": "many"}, "num_inference_steps", "many"),
    ({"guidance_scale": 31}, "guidance_scale", "31"),
    ({"refiner_split": 1.0}, "refiner_split", "1.0"),
    ({"seed": -5}, "seed", "-5"),
    ({"output_format": "gif"}, "output_format", "gif"),
    ({"prompt": ""}, "prompt", "''"),
    ({"prompt": "   "}, "prompt", "'   '"),
    ({"prompt": "a" * 2001}, "prompt", "longer than 2000"),
    ({"hires_fix": True, "width": 768, "height": 768, "hires_scale": 2.0}, "hires_scale", "1536x1536"),
]


@pytest.mark.parametrize(
    ("change", "field", "shown"), BAD_VALUES, ids=[b[1] + "=" + str(b[2])[:12] for b in BAD_VALUES]
)
def test_bad_values_get_422_naming_field_and_value(
    sdxl: ServiceClient, change: dict, field: str, shown: str
) -> None:
    body = {"prompt": "x", **SMALL, **change}
    response = post(sdxl, body)
    assert response.status_code == 422, response.text
    error = response.json()
    assert error["success"] is False and error["error_type"] == "validation"
    assert error["error"].startswith(f"{field}:"), error["error"]
    assert shown in error["error"]


def test_missing_prompt_and_malformed_json(sdxl: ServiceClient) -> None:
    missing = post(sdxl, {"width": 64})
    assert missing.status_code == 422 and missing.json()["error"] == "prompt: field required"
    broken = httpx.post(
        f"{sdxl.base_url}/generate", content=b'{"prompt": "x",', headers={"content-type": "application/json"}
    )
    assert broken.status_code == 422
    assert broken.json()["error"].startswith("body:") and "malformed JSON" in broken.json()["error"]


def test_oversized_body_is_refused_and_the_service_stays_up(sdxl: ServiceClient) -> None:
    huge = json.dumps({"prompt": "x" * 200_000}).encode()
    declared = httpx.post(
        f"{sdxl.base_url}/generate", content=huge, headers={"content-type": "application/json"}
    )
    assert declared.status_code == 413
    assert declared.json()["error_type"] == "validation" and "exceeds the limit" in declared.json()["error"]

    def chunks():
        for i in range(0, len(huge), 8192):
            yield huge[i : i + 8192]

    streamed = httpx.post(
        f"{sdxl.base_url}/generate", content=chunks(), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413
    assert sdxl.health().status == "healthy"


def test_unknown_route_answers_in_the_error_shape(sdxl: ServiceClient) -> None:
    response = httpx.get(f"{sdxl.base_url}/nope")
    assert response.status_code == 404 and response.json()["error_type"] == "not_found"


def test_metrics_count_requests_and_latency(sdxl: ServiceClient) -> None:
    sdxl.generate(prompt="x", **SMALL)
    post(sdxl, {"prompt": "x", "width": 1001})
    text = sdxl.metrics_text()
    assert 'sdxl_requests_total{route="/generate",status="200"}' in text
    assert 'sdxl_requests_total{route="/generate",status="422"}' in text
    assert 'sdxl_errors_total{error_type="validation"}' in text
    assert "sdxl_generation_seconds_bucket" in text and "sdxl_queue_depth 0.0" in text


def test_event_loop_answers_health_while_generating(sdxl: ServiceClient) -> None:
    async def scenario() -> tuple[int, list[float]]:
        async with httpx.AsyncClient(base_url=sdxl.base_url, timeout=120) as http:
            job = asyncio.create_task(
                http.post(
                    "/generate", json={"prompt": "x", "width": 256, "height": 256, "num_inference_steps": 12}
                )
            )
            await asyncio.sleep(0.3)
            latencies = []
            for _ in range(5):
                started = asyncio.get_running_loop().time()
                assert (await http.get("/health")).status_code == 200
                latencies.append(asyncio.get_running_loop().time() - started)
            return (await job).status_code, latencies

    status, latencies = asyncio.run(scenario())
    assert status == 200
    assert max(latencies) < 0.5, latencies


def test_client_raises_with_the_services_error(sdxl: ServiceClient) -> None:
    with pytest.raises(ServiceCallError) as info:
        sdxl.generate(prompt="x", width=1001)
    assert info.value.status == 422 and info.value.error_type == "validation"
