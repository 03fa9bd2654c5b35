"""The control side: Prefect flows that deploy the service to a GPU box, verify it, roll it back and
benchmark it. In floors, each importing only the floors below it (`.importlinter`, checked by
tests/test_layering.py):

    runbooks/   the flows: deploy-sdxl, verify-sdxl, rollback-sdxl, regression-benchmark, deploy-fleet,
                the demo and the CLI commands
    stages/     the Prefect tasks the runbooks are made of: preflight, backup, deploy, warm-up, ...
    record/     a run's record: its directory and summary, its log, the downtime prober, artifacts,
                a person's decision
    box/        what talks to or describes the machine: hosts, files, processes, lock, supervisor,
                releases, deploy state, room for two services, the model on the box
    evidence/   what the stages observed and how the gate judges it: plain models, no Prefect
    config/     the target and fleet files, the service's settings and secrets as the target names them
    errors.py   every error the flows raise on purpose
"""
