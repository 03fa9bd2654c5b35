"""Secrets for the new service (e.g. `SDXL_API_KEY`), resolved only when needed and never stored.

A target names where a secret comes from (`new.secret_env`: `env:VAR` or `secret:BLOCK`), never the value,
so neither the target file, the flow run's parameters in Prefect, `prefect.yaml`, the run directory nor
the artifacts ever hold it. On the box the value goes into the supervisor's env file (mode 0600), not on
a command line.
"""

from __future__ import annotations

import os

from flows.config.target import NewService
from flows.errors import SecretUnavailable


def resolve_secret(source: str) -> str:
    """The value behind `env:VAR` (this process's environment) or `secret:BLOCK` (a Prefect Secret block)."""
    kind, _, ref = source.partition(":")
    if kind == "env":
        value = os.environ.get(ref)
        if not value:
            raise SecretUnavailable(f"environment variable {ref} is not set on the machine running the flow")
        return value
    try:
        from prefect.blocks.system import Secret

        return str(Secret.load(ref).get())
    except Exception as exc:
        raise SecretUnavailable(
            f"Prefect Secret block {ref!r} could not be loaded: {type(exc).__name__}"
        ) from None


def service_env(new: NewService) -> dict[str, str]:
    """The new service's whole environment: `env` plus the resolved `secret_env`."""
    return {**new.env, **{name: resolve_secret(source) for name, source in new.secret_env.items()}}


def api_key(new: NewService) -> str | None:
    """The bearer key the flows send to the new service (None when it needs none)."""
    source = new.secret_env.get("SDXL_API_KEY")
    return resolve_secret(source) if source else None
