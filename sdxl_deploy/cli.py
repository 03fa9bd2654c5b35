"""The `sdxl-deploy` command line: serve, bench-gpu, models, deploy/verify/rollback, demo, evaluate, report."""

from __future__ import annotations

import typer

from evaluation import commands as evaluation_commands
from flows import commands as flow_commands
from service import commands as service_commands

app = typer.Typer(help=__doc__, no_args_is_help=True, pretty_exceptions_show_locals=False)
app.command("serve")(service_commands.serve)
app.command("bench-gpu")(service_commands.bench_gpu)
app.command("bench-unet")(service_commands.bench_unet)
app.add_typer(service_commands.models_app, name="models")
for _name in ("deploy", "verify", "rollback", "releases", "demo"):
    app.command(_name)(getattr(flow_commands, _name))
app.command("evaluate")(evaluation_commands.evaluate)
app.command("report")(evaluation_commands.report)


if __name__ == "__main__":
    app()
