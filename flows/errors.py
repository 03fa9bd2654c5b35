"""Every error the flows raise on purpose, in one place; `transient` tells the retry policy to try again."""

from __future__ import annotations


class FlowError(RuntimeError):
    """Base of the flows' own errors. `transient`: a retry may succeed (a dropped link, a busy host)."""

    transient: bool = False


# ----------------------------------------------------------------------------------------------- hosts


class HostError(FlowError):
    """A host operation failed; the message says what to do next."""


class HostUnreachable(HostError):
    """The host could not be reached, the connection timed out, or the link dropped (often transient)."""

    transient = True


class HostKeyRejected(HostError):
    """The server's host key is unknown (and not trusted on first use) or has CHANGED."""


class CommandTimeout(HostError):
    """A command ran past its timeout and was killed."""


class HostCommandError(HostError):
    """A host command failed; the message says what was being done and what the host answered."""


class CommandFailed(HostCommandError):
    """A command exited non-zero where success was required (`flows.box.hostfs.run_checked`)."""


class ProcessError(FlowError):
    """A process could not be started or stopped."""


class HostLocked(FlowError):
    """Another run holds the host's deploy lock; the message says who and since when."""


# ------------------------------------------------------------------------------------------ run inputs


class TargetFileError(FlowError, ValueError):
    """A target file is missing, unreadable or invalid."""


class SecretUnavailable(FlowError):
    """A secret named in `new.secret_env` could not be read; the message says which and where from."""


# ---------------------------------------------------------------------------------------------- stages


class PreflightRefused(FlowError):
    """The host or the current service is not in a state to upgrade; nothing was changed."""


class BackupError(FlowError):
    """A backup could not be made, or one on disk does not match its manifest."""


class DeployError(FlowError):
    """Shipping or starting the new service failed."""


class PrefetchFailed(FlowError):
    """The weights could not be downloaded onto the box (too little disk, a missing repo, no progress after
    every retry); nothing was stopped. `transient`: one attempt stalled or lost the hub, and another resumes
    it (finished files stay in the cache)."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class ServiceDidNotStart(FlowError):
    """The new service exited, or was not ready in time; the message carries its last log lines."""


class GateFailed(FlowError):
    """An enforced success criterion failed."""


class NotPromoted(FlowError):
    """An inconclusive quality verdict was aborted: by a person, by the timeout, or by the target's rule."""


# ------------------------------------------------------------------------------------------------ runs


class StageFailed(FlowError):
    """A stage of the runbook failed; the message names the stage and why."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"stage {stage!r} failed: {reason}")
        self.stage, self.reason = stage, reason


class RehearsedFailure(FlowError):
    """A failure injected on purpose (`fail_at`) to rehearse the automatic rollback."""


class RunFailed(FlowError):
    """A flow run failed; `run_dir` holds its summary.json and report.md."""

    def __init__(self, message: str, run_dir: str | None = None) -> None:
        super().__init__(message)
        self.run_dir = run_dir


# ----------------------------------------------------------------------------------------------- releases


class ReleaseError(FlowError):
    """A recorded release could not be found or started again; the message says why."""


# ----------------------------------------------------------------------------------------------- fleet


class FleetFileError(FlowError, ValueError):
    """The fleet file is missing, unreadable or invalid; the message names the file and the field."""


class BalancerError(FlowError):
    """The load balancer's runtime API refused a command, or a server never reached the awaited state."""
