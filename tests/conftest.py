"""Shared fixtures: the generated-model cache and real services for the tiny models."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.support.servers import settings_for, thread_server

pytest_plugins = [
    "tests.support.sshd",
    "tests.support.flows",
    "tests.support.hub_mirror",
    "tests.support.fleet",
]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _default_compile_stance() -> Iterator[None]:
    """A service started in the test process sets torch's compile stance for the whole process once ready
    (no compile after /ready): the next test starts from torch's default again."""
    yield
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch.compiler, "set_stance"):
        torch.compiler.set_stance("default")


# Under pytest-xdist each worker process has a Prefect home of its own (a flow run outside the `prefect_api`
# fixture starts a temporary server on that home's SQLite database). Set before anything imports Prefect.
if worker := os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["PREFECT_HOME"] = str(
        Path(os.environ.get("PREFECT_HOME", REPO / ".cache" / "prefect")) / worker
    )


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


# The modules that take longest (measured under xdist): started first, so that none of them starts last
LONGEST_FIRST = (
    "tests/service/test_saved_compile.py",  # builds the CPU compile cache that test_staged_compile uses too
    "tests/flows/test_fleet.py",
    "tests/flows/test_fleet_failures.py",
    "tests/flows/test_e2e.py",
    "tests/flows/test_staged.py",
    "tests/flows/test_fleet_pool.py",
    "tests/bench/test_bench.py",
    "tests/flows/test_faults.py",
    "tests/service/test_hub_mirror.py",
    # after the others: by the time a test process takes it, the compile cache it copies is built, so the
    # process does not sit waiting for the build
    "tests/flows/test_staged_compile.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist a long module that starts last keeps one process busy while the others have
    nothing left to do: the longest modules first, then the other tests marked `slow` (they start services,
    deploys or CPU compiles), then the rest, each group in file order."""
    for item in items:  # schemathesis gives each operation's test its name but one node id for all,
        if not item.nodeid.endswith(f"::{item.name}") and item.parent is not None:  # xdist needs them apart
            item._id = item.parent.id.child(item.name)  # the id pytest itself gives a node (nodes.Node)

    def rank(item: pytest.Item) -> tuple[int, int]:
        path = item.nodeid.partition("::")[0]
        if path in LONGEST_FIRST:
            return 0, LONGEST_FIRST.index(path)
        return (1 if item.get_closest_marker("slow") else 2), 0

    items.sort(key=rank)
