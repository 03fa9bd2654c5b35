"""The flows: `runbook` (deploy-sdxl, verify-sdxl, rollback-sdxl), `regression` (regression-benchmark),
`fleet/` (deploy-fleet), `demo` (the embedded demo), `commands` and `cli_run` (the CLI). The top floor: it
may import every floor below, nothing imports it."""
