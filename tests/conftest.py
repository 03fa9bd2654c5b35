"""Shared fixtures: the generated-model cache and real services for the tiny models."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.support.servers import settings_for, thread_server

pytest_plugins = ["tests.support.sshd", "tests.support.flows", "tests.support.hub_mirror"]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def model_cache() -> Path:
    """Generated models are deterministic, so one cache serves every test run (`make` sets the path)."""
    path = Path(os.environ.get("SDXL_DEPLOY_CACHE", REPO / ".cache" / "models"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def service_url(model_cache: Path) -> Iterator[Callable[..., str]]:
    """`service_url("tiny-sdxl")` -> base URL of a real uvicorn server for that model, one per session."""
    servers: dict[str, str] = {}
    with ExitStack() as stack:

        def get(model: str) -> str:
            if model not in servers:
                servers[model] = stack.enter_context(thread_server(settings_for(model, model_cache)))
            return servers[model]

        yield get
