"""A box command's JSON answer (its last non-empty stdout line) is parsed by one helper into a model."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from flows.box.hostfs import json_answer
from flows.evidence.results import CompileCheck
from service.prefetch import Detached


def test_the_last_non_empty_line_is_the_answer() -> None:
    stdout = 'UserWarning: something the box printed first\n{"pid": 41}\n\n'
    assert json_answer(stdout, Detached) == Detached(pid=41)
    assert json_answer(Detached(pid=7).model_dump_json() + "\n", Detached).pid == 7  # as the box prints it


@pytest.mark.parametrize(
    "stdout", ["", "\n  \n", "Traceback (most recent call last):\n", '{"device": "cpu"}']
)
def test_no_answer_or_one_that_does_not_fit_is_a_value_error(stdout: str) -> None:
    with pytest.raises(ValueError):
        json_answer(stdout, CompileCheck)
    if stdout.startswith("{"):
        with pytest.raises(ValidationError, match="ok"):  # the field that is missing is named
            json_answer(stdout, CompileCheck)
