"""The new service's settings as the target passes them (`new.env`, and the names in `new.secret_env`), read by
the service's own settings model (`service/settings.py`) in preflight: a misspelt name, which the service would
ignore, or a value it would refuse at start is refused before anything stops, naming the variable and value."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError

from flows.config.target import NewService
from service.settings import ServiceSettings

ENV_PREFIX = "SDXL_"
# Read by the service outside its settings model (`service.settings.default_cache_dir`).
OTHER_NAMES = frozenset({"SDXL_DEPLOY_CACHE"})
# Settings the deploy puts on the service's command line (`flows.stages.deploy.serve_argv`), which wins over the
# environment: what to do instead.
SET_BY_DEPLOY = {
    "model": "set new.model instead",
    "host": "it listens on the box's loopback, where the app's way reaches it",
    "port": "set new.port instead",
    "stage_port": "set new.stage_port instead",
    "ready_sizes": "set new.ready_sizes instead",
}


class GivenSettings(ServiceSettings):
    """The service's settings model over the values given to it only (not this process's environment or .env)."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: Any,
        init_settings: Any,
        env_settings: Any,
        dotenv_settings: Any,
        file_secret_settings: Any,
    ) -> tuple[Any, ...]:
        return (init_settings,)


def service_settings(new: NewService) -> tuple[ServiceSettings, list[str]]:
    """The settings the new service starts with as far as `new.env` sets them (a refused value keeps its
    default), and each problem naming `new.env.<NAME>` (or `new.secret_env.<NAME>`), the value and what would be
    accepted. A secret's value is not known here: only its name is checked."""
    fields = list(ServiceSettings.model_fields)
    values: dict[str, str] = {}
    source: dict[str, str] = {}  # field -> the variable that sets it
    problems: list[str] = []
    given: list[tuple[str, dict[str, str | None]]] = [
        ("new.env", dict(new.env)),
        ("new.secret_env", dict.fromkeys(new.secret_env)),
    ]
    for where, env in given:
        for name, value in env.items():
            if not name.upper().startswith(ENV_PREFIX) or name.upper() in OTHER_NAMES:
                continue
            field = name[len(ENV_PREFIX) :].lower()
            if field in SET_BY_DEPLOY:
                problems.append(
                    f"{where}.{name}: the deploy sets the service's {field} on its command line, which wins "
                    f"over the environment; {SET_BY_DEPLOY[field]}"
                )
            elif field not in fields:
                near = difflib.get_close_matches(field, fields, n=1, cutoff=0.75)
                hint = f" (did you mean {ENV_PREFIX}{near[0].upper()}?)" if near else ""
                problems.append(
                    f"{where}.{name}: not a setting of the service{hint}, which would ignore it; accepted: "
                    f"{ENV_PREFIX}<setting> for a setting of service/settings.py, or {', '.join(OTHER_NAMES)}"
                )
            elif value is not None:
                values[field], source[field] = value, f"{where}.{name}"
    try:
        return GivenSettings(**values), problems
    except ValidationError as exc:
        refused = set()
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            refused.add(field)
            reason = err["msg"].removeprefix("Value error, ")
            got = "" if repr(err["input"]) in reason else f" (got {err['input']!r})"
            problems.append(f"{source.get(field, 'new.env')}: {reason}{got}")
        return GivenSettings(**{k: v for k, v in values.items() if k not in refused}), problems
