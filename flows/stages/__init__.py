"""The stages: the runbook's Prefect tasks, one concern per module (preflight, backup, prefetch, deploy,
compile, warm-up, benchmark, tunnel, quality, gates, cut-over, rollback). They import the record, the box, the
evidence, the configuration and the errors, never a runbook."""
