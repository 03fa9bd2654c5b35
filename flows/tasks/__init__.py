"""The runbook's tasks, one concern per module: preflight, backup, deploy, warm-up, benchmark, tunnel,
gates and rollback."""
