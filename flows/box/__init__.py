"""The box: what talks to or describes the machine. Hosts (`hosts/`: shell, files, port forwards, here or
over SSH), file operations (`hostfs`), processes by PID (`procs`), the deploy lock (`lock`), the service's
supervisor (`supervisor`), the releases that served (`releases`), the deploy's state on the host
(`deploy_state`), loopback ports (`ports`), HTTP to a service port and the retry policy (`common`), the stacks
the service runs on (`compat`), room for two services (`capacity`) and the model `new.model` names
(`model_check`). Imports `flows.evidence`, `flows.config` and `flows.errors` only."""
