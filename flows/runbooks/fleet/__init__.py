"""The fleet: several GPU boxes behind a load balancer (HAProxy), upgraded canary first, then in waves.

`haproxy` (the runtime-API client), `analysis` (canary vs old release over live traffic), `flow` (the
`deploy-fleet` flow), `report` (the one-page fleet report), `local_lb` (a real HAProxy on loopback for the
demo and the tests). The fleet file's model is `flows/config/fleet.py`.
"""
