"""A run's record: its directory and `summary.json` (`rundir`), its log and console (`runlog`), the downtime
prober (`prober`), Prefect artifacts (`artifacts`) and a person's decision (`approval`). Imports the box,
the evidence, the configuration and the errors, never a stage or a runbook."""
