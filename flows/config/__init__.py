"""Configuration: the target file (`target.py`), the fleet file (`fleet.py`), the new service's settings as
the target passes them (`service_env.py`) and its secrets (`secrets.py`). Imports only `flows.errors`."""
