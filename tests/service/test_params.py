"""A request becomes generation parameters (service/params.py): the warnings `/generate` answers with."""

from __future__ import annotations

from service.models import REGISTRY
from service.params import resolve_params
from service.schema import GenerateRequest


def _warnings(body: dict[str, object]) -> tuple[str, ...]:
    request = GenerateRequest.model_validate(body)
    params = resolve_params(
        request, REGISTRY["sdxl"], refiner_loaded=True, restorer_loaded=False, max_prompt_chars=1000
    )
    return params.warnings


def test_unknown_fields_are_named_in_the_warnings_with_the_nearest_known_one() -> None:
    """A misspelt field is not silently dropped: the answer names it, and the field it resembles."""
    warnings = _warnings({"prompt": "x", "widht": 1024, "codeformer_fidelity": 0.7})
    assert warnings == ("unknown fields ignored: codeformer_fidelity, widht (did you mean width?)",)
    assert _warnings({"prompt": "x", "width": 1024}) == ()
