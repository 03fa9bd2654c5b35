"""The denoising steps of a job: how many each stage runs, progress across stages and cancellation, and the
CFG cutoff (a step-end callback). Used by the engine's generation loop (`service/engine.py`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from service.errors import Cancelled
from service.params import GenerationParams
from service.worker import Job


def hires_steps(p: GenerationParams) -> tuple[int, int]:
    """(num_inference_steps to ask img2img for, steps it runs): img2img runs int(steps * strength) steps,
    so ask for enough that at least one runs."""
    total = max(p.steps, math.ceil(1 / p.hires_strength))
    return total, int(total * p.hires_strength) if p.hires_fix else 0


def stage_steps(p: GenerationParams) -> int:
    """Denoising steps of one batch of `p`, over every stage: the base (+ refiner) pass, then hires."""
    return p.steps + hires_steps(p)[1]


class CfgCutoff:
    """Classifier-free guidance on the first steps of a denoising pass only (setting `cfg_cutoff`).

    After the last guided step the pipeline's CFG inputs keep their conditional half and its guidance scale
    drops to 1, so each later step is one UNet pass instead of two. diffusers' own `SDXLCFGCutoffCallback`
    keeps row -1, which is right for one image only; a batch of N has its negatives in rows 0..N-1 and its
    prompts in rows N..2N-1, so the second half is kept here. (The base's `add_time_ids` are the same for
    both halves unless negative micro-conditions are given, which the service never does.)
    """

    TENSORS = ("prompt_embeds", "add_text_embeds", "add_time_ids")

    def __init__(self, cutoff: float, pass_steps: int) -> None:
        self.guided = max(1, round(cutoff * pass_steps)) if cutoff < 1.0 else None
        self.done = 0

    def call_kwargs(self, pipe: Any) -> dict[str, Any]:
        """Extra pipeline-call arguments: a call that starts past the cutoff runs unguided from its start."""
        if self.guided is None:
            return {}
        if self.done >= self.guided:
            return {"guidance_scale": 1.0}
        names = [name for name in self.TENSORS if name in pipe._callback_tensor_inputs]
        return {"callback_on_step_end_tensor_inputs": names}

    def after_step(self, pipe: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        self.done += 1
        if self.guided is not None and self.done == self.guided and pipe.do_classifier_free_guidance:
            for name in self.TENSORS:
                if name in kwargs:
                    kwargs[name] = kwargs[name].chunk(2)[1]
            pipe._guidance_scale = 1.0
        return kwargs


class Progress:
    """Counts denoising steps across stages; interrupts the pipeline once every job of it is cancelled."""

    def __init__(self, jobs: list[Job], total: int) -> None:
        self.jobs, self.total, self.done = jobs, total, 0
        for job in jobs:
            job.progress(0, total)

    def callback(self, guidance: CfgCutoff | None = None) -> Callable[..., dict[str, Any]]:
        def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            self.done += 1
            for job in self.jobs:
                job.progress(min(self.done, self.total), self.total)
            if self.all_cancelled:
                pipe._interrupt = True
            return guidance.after_step(pipe, kwargs) if guidance is not None else kwargs

        return on_step_end

    @property
    def all_cancelled(self) -> bool:
        return all(job.cancelled.is_set() for job in self.jobs)

    def check_cancelled(self) -> None:
        if self.all_cancelled:
            raise Cancelled("cancelled while running")
