"""The `sdxl-deploy` command line: serve, models, deploy/verify/rollback, compile, deploy-fleet, demo, evaluate, report; and, from a
checkout of the repository, the benchmarks bench-gpu, bench-unet and bench-beside."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import typer

from evaluation import commands as evaluation_commands
from flows.runbooks import commands as flow_commands
from flows.runbooks.fleet import commands as fleet_commands
from service import commands as service_commands

BENCH_COMMANDS = ("bench-gpu", "bench-unet", "bench-beside")
CHECKOUT_ONLY = (
    "`sdxl-deploy {name}` runs from a checkout of the sdxl-deploy repository only: the benchmarks (its bench/ "
    "package) are not part of the installed wheel. Clone the repository and run `python -m sdxl_deploy.cli "
    "{name}` from its root."
)


def bench_commands() -> ModuleType | None:
    """The benchmark commands where `bench/` is importable (a checkout); None from an installed wheel."""
    try:
        from bench import commands
    except ModuleNotFoundError as exc:
        if exc.name not in ("bench", "bench.commands"):
            raise  # bench is there but broken: say so, do not hide it
        return None
    return commands


def checkout_only(name: str) -> Callable[[typer.Context], None]:
    """A stand-in for a benchmark command outside a checkout: says where to get it, exits 2."""

    def command(ctx: typer.Context) -> None:
        typer.echo(CHECKOUT_ONLY.format(name=name), err=True)
        raise typer.Exit(2)

    command.__doc__ = f"From a checkout of the repository only (`python -m sdxl_deploy.cli {name}` there)."
    return command


app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_show_locals=False)
# The commands that run Prefect: they start with its defaults (no telemetry) unless the user chose otherwise.
PREFECT_COMMANDS = frozenset({"deploy", "verify", "rollback", "approve", "demo", "deploy-fleet"})


@app.callback()
def prefect_settings(ctx: typer.Context) -> None:
    """Prefect's defaults for the commands that run it (`flows.runbooks.cli_run.prefect_defaults`)."""
    if ctx.invoked_subcommand in PREFECT_COMMANDS:
        from flows.runbooks.cli_run import prefect_defaults

        prefect_defaults()


app.command("serve")(service_commands.serve)
_bench = bench_commands()
for _name in BENCH_COMMANDS:
    if _bench is not None:
        app.command(_name)(getattr(_bench, _name.replace("-", "_")))
    else:  # any argument, --help included, gets the explanation
        app.command(
            _name,
            context_settings={
                "allow_extra_args": True,
                "ignore_unknown_options": True,
                "help_option_names": [],
            },
        )(checkout_only(_name))
app.add_typer(service_commands.models_app, name="models")
for _name in ("deploy", "verify", "rollback", "approve", "releases", "demo"):
    app.command(_name)(getattr(flow_commands, _name))
app.command("compile")(flow_commands.compile_release)
app.command("deploy-fleet")(fleet_commands.deploy_fleet)
app.command("evaluate")(evaluation_commands.evaluate)
app.command("report")(evaluation_commands.report)

if __name__ == "__main__":
    app()
