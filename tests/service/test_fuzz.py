"""Property-based fuzzing of the service's OpenAPI schema with schemathesis, against real uvicorn.

Every operation of the schema (`/generate`, `/health`, `/ready`, `/metrics`, `/sdapi/v1/...`) gets
schema-valid and schema-invalid requests; every answer must be declared in the schema (status, content
type, body, headers), no answer may be a 5xx, invalid data must be refused and the API key must be
enforced where the schema says so. One built-in check is off: `negative_data_rejection`, because
the service accepts JSON types loosely on purpose (pydantic's lax mode: `0`/`1` for booleans, `"64"` for
64), as the SD1.5 script and AUTOMATIC1111 did and old clients rely on. Valid but expensive requests (1024 px, 150 steps) would take minutes
each on a CPU, so in positive cases their sizes, steps and image counts are folded into a cheap range
(out-of-range values are kept, they must still be refused); `test_valid_but_slow_request_answers_a_declared_504`
covers the expensive path itself.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.config._checks import (
    POSITIVE_DATA_ACCEPTANCE_EXPECTED_STATUSES,
    PositiveDataAcceptanceConfig,
)
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app
from service.settings import ServiceSettings
from tests.support.servers import settings_for, thread_server

API_KEY = "fuzz-key-7f3a"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_EXAMPLES = 5
DECLARED = [status_code_conformance, content_type_conformance, response_schema_conformance]
SEEN: Counter[str] = Counter()

# Valid but costly on a CPU: folded into a cheap range in positive cases (see the module docstring).
SIZE_FIELDS = {"width", "height", "hr_resize_x", "hr_resize_y"}
STEP_FIELDS = {"num_inference_steps", "steps"}
COUNT_FIELDS = {"batch_size", "n_iter"}


# Omitted sizes and steps mean the defaults (1024 or 512 px, 30 or 50 steps): cheap values instead.
CHEAP_DEFAULTS = {
    "/generate": {"width": 64, "height": 64, "num_inference_steps": 2},
    "/sdapi/v1/txt2img": {"width": 64, "height": 64, "steps": 2},
}


def _cheap(path: str, body: Any) -> Any:
    if not isinstance(body, dict):
        return body
    body = {**CHEAP_DEFAULTS.get(path, {}), **body}
    for key, value in body.items():
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        # each fold keeps a valid value valid and an invalid one invalid (64 + v % 64 keeps v's rest mod 8)
        if key in SIZE_FIELDS and 128 < value <= 1024:
            body[key] = 64 + value % 64
        elif key in STEP_FIELDS and 2 < value <= 150 or key in COUNT_FIELDS and 1 < value <= 8:
            body[key] = 1 + value % 2
    return body


def fuzz_settings(cache_dir: Path) -> ServiceSettings:
    """The fuzzed service: tiny-sdxl with an API key, a short queue and a request timeout."""
    return settings_for(
        "tiny-sdxl", cache_dir, api_key=API_KEY, request_timeout_s=60, max_queue=4, body_timeout_s=10
    )


def _map_case(context: Any, case: Any) -> Any:
    case.body = _cheap(case.operation.path, case.body)
    return case


# The schema document comes from the app itself (building the app loads no model), so pytest can collect
# one test per operation; `fuzz_url` serves the same app and the first test checks the documents match.
schema = schemathesis.openapi.from_dict(create_app(fuzz_settings(Path("unused"))).openapi())
schema.hook("map_case")(_map_case)
schema.config.cache.enabled = False  # no .schemathesis/ crash cache in the work tree
# Schema-valid is not always acceptable: the size range is the loaded model's, the prompt length limit is
# a setting, and `sampler` must name a known sampler. Those answer 422 naming the field (checked below).
schema.config.checks.positive_data_acceptance = PositiveDataAcceptanceConfig(
    expected_statuses=[*POSITIVE_DATA_ACCEPTANCE_EXPECTED_STATUSES, "422"]
)


@pytest.fixture(scope="module")
def fuzz_url(model_cache: Path) -> Iterator[str]:
    with thread_server(fuzz_settings(model_cache)) as url:
        served = httpx.get(f"{url}/openapi.json").json()
        assert served == schema.raw_schema, "the fuzzed schema is not the one the service serves"
        yield url
    assert sum(SEEN.values()) > 0


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_answer_is_declared_and_none_is_a_server_error(case: Any, fuzz_url: str) -> None:
    SEEN[f"{case.method} {case.path}"] += 1
    response = case.call_and_validate(
        base_url=fuzz_url, headers=AUTH, timeout=60, excluded_checks=[negative_data_rejection]
    )
    assert response.status_code < 500, response.text
    if response.status_code == 422 and response.headers.get("content-type") == "application/json":
        error = response.json()
        assert error["error_type"] == "validation" and ":" in error["error"], error


def test_fuzzing_covered_every_operation() -> None:
    """Runs after the fuzz test (file order): each operation of the schema got requests."""
    operations = {f"{op.ok().method.upper()} {op.ok().path}" for op in schema.get_all_operations()}
    print(f"\nfuzz requests per operation: {dict(SEEN)} (total {sum(SEEN.values())})")
    assert operations <= set(SEEN), operations - set(SEEN)
    # the schema says which operations need the key, so the fuzzer's `ignored_auth` check tries them without
    open_ops = {
        f"{method.upper()} {path}"
        for path, item in schema.raw_schema["paths"].items()
        for method, operation in item.items()
        if "security" not in operation
    }
    assert open_ops == {"GET /health", "GET /ready"}, open_ops


def test_valid_but_slow_request_answers_a_declared_504(model_cache: Path) -> None:
    """The expensive end of the valid range on a CPU: 504 in the declared error shape, then work goes on."""
    service = settings_for("tiny-sdxl", model_cache, request_timeout_s=1.0)
    with thread_server(service) as url:
        openapi = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operation = openapi["/generate"]["POST"]
        body = {"prompt": "x", "width": 1024, "height": 1024, "num_inference_steps": 150, "hires_fix": False}
        case = operation.Case(body=body, media_type="application/json")
        slow = case.call(timeout=60)
        assert slow.status_code == 504, slow.text
        assert slow.json()["error_type"] == "timeout"
        # declared: status, content type and body match the schema (not_a_server_error would flag any 504)
        case.validate_response(slow, checks=DECLARED)
        # the cancelled job stops at its next denoising step; until then the queue answers 504, then 200
        small = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 1, "use_refiner": False}
        statuses = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and 200 not in statuses:
            statuses.append(httpx.post(f"{url}/generate", json=small, timeout=60).status_code)
        assert statuses[-1] == 200 and set(statuses) <= {200, 504}, statuses
