"""A person at the Prefect UI, played by a thread: it answers the pauses of one flow run, in order.

The run is found by a unique tag (run the flow `with tags(person.tag)`). Each pause is answered once (by its
pause key): its description is read as the UI shows it, then the run is resumed with the next answer,
through the API or with the real `sdxl-deploy approve` in its own process (`cli`). Errors while looking
(the API still saving the pause's input, say) are kept and retried until `patience_s`, so a test whose run
was never resumed says why.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import StateType
from prefect.flow_runs import resume_flow_run
from prefect.input.run_input import keyset_from_paused_state
from prefect.settings import PREFECT_API_URL


class Person(threading.Thread):
    """Answers the paused flow run tagged `tag` with `answers`, one per pause, in order."""

    def __init__(self, *answers: dict[str, str], cli: bool = False, patience_s: float = 420) -> None:
        super().__init__(daemon=True)
        self.answers, self.cli, self.patience_s = list(answers), cli, patience_s
        self.tag = f"person-{uuid.uuid4().hex[:8]}"
        self.descriptions: list[str] = []  # what the UI showed at each answered pause
        self.error: str | None = None
        self.trouble: list[str] = []
        self.start()

    @property
    def description(self) -> str:
        """What the UI showed at the last answered pause."""
        return self.descriptions[-1] if self.descriptions else ""

    def resume(self, run_id: Any, answer: dict[str, str]) -> None:
        if not self.cli:
            resume_flow_run(run_id, run_input=answer)
            return
        args = ["approve", str(run_id), f"--{answer['decision']}", "--note", answer["note"]]
        env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
        done = subprocess.run(
            [sys.executable, "-m", "sdxl_deploy.cli", *args],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        if done.returncode:
            self.error = f"sdxl-deploy approve exited {done.returncode}: {done.stdout}{done.stderr}"

    def paused_run(self, answered: set[str]) -> tuple[Any, str, str] | None:
        """(the run, its pause key, its description) when it waits at a pause not answered yet."""
        paused = FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])),
            tags=FlowRunFilterTags(all_=[self.tag]),
        )
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=paused)
            if not runs or runs[0].state.state_details.pause_key in answered:
                return None
            keys = keyset_from_paused_state(runs[0].state)
            description = client.read_flow_run_input(runs[0].id, keys["description"])
            return runs[0], runs[0].state.state_details.pause_key, description

    def run(self) -> None:
        deadline = time.monotonic() + self.patience_s
        answered: set[str] = set()
        while self.answers and time.monotonic() < deadline:
            try:
                found = self.paused_run(answered)
                if found is not None:
                    run, key, description = found
                    self.resume(run.id, self.answers[0])
                    answered.add(key)
                    self.descriptions.append(description)
                    self.answers.pop(0)
                    if self.error:
                        return
                    continue
            except Exception as exc:  # kept, reported by the test if the run is never resumed
                self.trouble.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.25)
        if self.answers:
            self.error = (
                f"{len(self.answers)} pause(s) of the run tagged {self.tag} not met within "
                f"{self.patience_s:g} s; {self.trouble[-3:]}"
            )
