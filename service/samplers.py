"""Samplers as data: AUTOMATIC1111 names -> diffusers schedulers, and a per-request swap without reloading.

The names are the ones A1111 clients send in `sampler_name` and list from `GET /sdapi/v1/samplers`;
`POST /generate` takes the same names in `sampler`. Without a sampler the model's own scheduler runs
(what the service did before samplers existed, so old requests keep their images).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from service.errors import ValidationFailed


@dataclass(frozen=True)
class Sampler:
    """One A1111 sampler and the diffusers scheduler (class + config overrides) that implements it."""

    name: str
    scheduler: str
    overrides: dict[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    options: dict[str, str] = field(default_factory=dict)


_DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_DPMPP_2M_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}
_KARRAS = {"use_karras_sigmas": True}

SAMPLERS: tuple[Sampler, ...] = (
    Sampler("Euler", "EulerDiscreteScheduler", {"use_karras_sigmas": False}, ("k_euler",)),
    Sampler("Euler a", "EulerAncestralDiscreteScheduler", {}, ("k_euler_a", "k_euler_ancestral")),
    Sampler(
        "DPM++ 2M", "DPMSolverMultistepScheduler", {**_DPMPP_2M, "use_karras_sigmas": False}, ("k_dpmpp_2m",)
    ),
    Sampler(
        "DPM++ 2M Karras",
        "DPMSolverMultistepScheduler",
        {**_DPMPP_2M, **_KARRAS},
        ("k_dpmpp_2m_ka",),
        {"scheduler": "karras"},
    ),
    Sampler(
        "DPM++ 2M SDE",
        "DPMSolverMultistepScheduler",
        {**_DPMPP_2M_SDE, "use_karras_sigmas": False},
        ("k_dpmpp_2m_sde",),
    ),
    Sampler(
        "DPM++ 2M SDE Karras",
        "DPMSolverMultistepScheduler",
        {**_DPMPP_2M_SDE, **_KARRAS},
        ("k_dpmpp_2m_sde_ka",),
        {"scheduler": "karras"},
    ),
    Sampler("DDIM", "DDIMScheduler", {}, ("ddim",)),
    Sampler("UniPC", "UniPCMultistepScheduler", {"use_karras_sigmas": False}, ("unipc",)),
)

_BY_KEY: dict[str, Sampler] = {key.lower(): s for s in SAMPLERS for key in (s.name, *s.aliases)}

SAMPLER_NAMES: tuple[str, ...] = tuple(s.name for s in SAMPLERS)


def find_sampler(name: str) -> Sampler | None:
    """The sampler for an A1111 name or alias (case-insensitive), or None when unknown."""
    return _BY_KEY.get(name.strip().lower())


def resolve_sampler(name: str, field: str) -> str:
    """The canonical name of a sampler, or a 422 naming the request field and the value."""
    sampler = find_sampler(name)
    if sampler is None:
        raise ValidationFailed(field, name, f"unknown sampler; one of {', '.join(SAMPLER_NAMES)}")
    return sampler.name


def karras_variant(name: str) -> str | None:
    """The Karras-sigmas sampler for a base name (A1111 >= 1.9 sends `scheduler: "karras"` separately)."""
    sampler = find_sampler(name)
    if sampler is None:
        return None
    if sampler.options.get("scheduler") == "karras":
        return sampler.name
    variant = find_sampler(f"{sampler.name} Karras")
    return variant.name if variant else None


class SchedulerCache:
    """One scheduler instance per (model scheduler, sampler), built once from the model's own config."""

    def __init__(self) -> None:
        # the default scheduler is kept in the value so its id cannot be reused while cached
        self._built: dict[tuple[int, str], tuple[Any, Any]] = {}

    def build(self, default: Any, name: str) -> Any:
        """The scheduler for `name`, configured like the model's `default` scheduler."""
        key = (id(default), name)
        if key not in self._built:
            import diffusers

            sampler = find_sampler(name)
            if sampler is None:
                raise ValueError(f"unknown sampler {name!r}")
            cls = getattr(diffusers, sampler.scheduler)
            self._built[key] = (default, cls.from_config(default.config, **sampler.overrides))
        return self._built[key][1]

    @contextmanager
    def use(self, pipes: Sequence[Any], name: str | None) -> Iterator[None]:
        """Run the pipelines with the sampler `name` for the duration of one job (None: the model's own)."""
        if name is None:
            yield
            return
        saved = [(pipe, pipe.scheduler) for pipe in pipes if pipe is not None]
        try:
            for pipe, default in saved:
                pipe.scheduler = self.build(default, name)
            yield
        finally:
            for pipe, default in saved:
                pipe.scheduler = default
