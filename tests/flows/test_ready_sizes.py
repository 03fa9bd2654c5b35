"""The sizes the new service compiles before /ready: `new.ready_sizes`, by default the size of the
app's request, passed to `serve --ready-sizes`."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.config.target import NewService, Target, Workload
from flows.stages.deploy import serve_argv


def _sizes_arg(target: Target) -> str | None:
    argv = serve_argv(target)
    return argv[argv.index("--ready-sizes") + 1] if "--ready-sizes" in argv else None


def test_the_app_requests_size_is_compiled_before_ready_by_default() -> None:
    assert _sizes_arg(Target()) == "1024x1024"  # APP_REQUEST's size
    app = {"prompt": "a cat", "width": 832, "height": 1216}
    assert _sizes_arg(Target(workload=Workload(app_request=app))) == "832x1216"
    assert _sizes_arg(Target(workload=Workload(app_request={"prompt": "a cat"}))) is None  # model default


def test_new_ready_sizes_replaces_the_default_and_is_checked() -> None:
    new = NewService(ready_sizes=["512x512", "1216x832"])
    assert _sizes_arg(Target(new=new)) == "512x512,1216x832"
    assert _sizes_arg(Target(new=NewService(ready_sizes=[]))) is None
    with pytest.raises(ValidationError, match="new.ready_sizes"):
        NewService(ready_sizes=["512x500"])
