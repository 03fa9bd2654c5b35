"""Evidence: what the stages observed (`results.py`), the outages the prober saw (`downtime.py`) and the gate
that judges them (`gates.py`). Plain pydantic models and arithmetic, no Prefect; imports `flows.config` and
`flows.errors` only."""
