"""`sdxl-deploy serve` refuses a bad setting or model in one line naming it, before any server starts."""

from __future__ import annotations

import pytest
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

import service.takeover_signal
from service.commands import serve
from service.models import require_model_exists
from service.settings import ServiceSettings


def _serve(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str]:
    """`serve` with these options in this process (SIGUSR1 left alone); its exit code and its output."""
    monkeypatch.setattr(service.takeover_signal, "hold_takeover_signal", lambda: None)
    app = typer.Typer()
    app.command()(serve)
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def test_a_public_bind_is_refused_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError) as refused:
        ServiceSettings(host="0.0.0.0")
    assert refused.value.errors()[0]["loc"] == ("host",)
    code, output = _serve(monkeypatch, "--host", "0.0.0.0")
    assert code == 2
    assert output.strip() == (
        "invalid setting host (--host / SDXL_HOST): host='0.0.0.0' is not a loopback address; "
        "set SDXL_ALLOW_PUBLIC_BIND=true to expose the service on purpose (and set SDXL_API_KEY)"
    )


def test_a_model_that_is_neither_known_nor_a_path_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    code, output = _serve(monkeypatch, "--model", "tiny-sdxll")
    assert code == 2 and len(output.strip().splitlines()) == 1 and "Traceback" not in output
    assert output.startswith("invalid setting model (--model / SDXL_MODEL): model='tiny-sdxll' is neither")
    assert output.strip().endswith("nor an existing path; did you mean 'tiny-sdxl'?")
    require_model_exists("tiny-sdxl")  # the names resolve_model builds or loads pass
    with pytest.raises(ValueError, match=r"model='/no/such/folder' is neither .* nor an existing path$"):
        require_model_exists("/no/such/folder")
