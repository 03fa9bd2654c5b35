"""A deploy's two records kept together by one writer: the run's summary on this machine and the deploy state
on the host (`deploy-state.json`), which a rollback or the next deploy reads after the control side died.
Each change that recovery needs is written to the host when it happens: the stage reached, the backup, the
release, the new service's process, the cut-over (before the signal), the end."""

from __future__ import annotations

from pathlib import Path

from flows.box.deploy_state import DeployState, save_state
from flows.box.hosts import Host
from flows.config.target import StartMode, Target
from flows.evidence.results import ProcessInfo
from flows.record.rundir import RunRecord


class DeployRecord(RunRecord):
    """The deploy-sdxl run's record; from `begin` on, also its deploy state on the host."""

    def __init__(self, flow: str, target: Target, runs_dir: str | Path, fail_at: str | None = None) -> None:
        super().__init__(flow, target, runs_dir, fail_at)
        self.state: DeployState | None = None
        self._host: Host | None = None
        self._target: Target | None = None
        self.on_stage = self._reached

    def begin(
        self,
        host: Host,
        target: Target,
        *,
        old_process: ProcessInfo | None,
        previous_release: int | None,
        mode: StartMode,
    ) -> None:
        """The first change to the box is next: record on the host what a recovery must know from now on."""
        self._host, self._target = host, target
        self.state = DeployState(
            run_id=self.dir.name,
            stage="backup",
            old_process=old_process,
            previous_release=previous_release,
            mode=mode,
        )
        self._save()

    def backed_up(self, path: str) -> None:
        self.summary.backup_dir = path
        self._update(backup_dir=path)

    def shipped(self, release_id: str) -> None:
        self.summary.release_id = release_id
        self._update(release_id=release_id)

    def started(self, process: ProcessInfo, log_offset: int) -> None:
        """The new service's process, recorded at once (a recovery must find it)."""
        self._update(new_process=process, new_log_offset=log_offset)

    def cutting_over(self) -> None:
        """Before the new service is told to take the port: from here on a failure (or an interruption) puts
        the old one back."""
        self._update(cut_over=True)

    def deployed(self) -> None:
        self._update(status="deployed", stage="done")

    def ended_failed(self) -> None:
        """The deploy failed and its way back ran: the host says whether it rolled back. The link may be gone:
        then the next deploy or rollback finds the state `in_progress` and recovers itself."""
        if self.state is None or self._host is None:
            return
        try:
            self._update(status="rolled_back" if self.summary.rolled_back else "failed")
        except Exception as exc:
            print(f"could not record the final deploy state: {exc}")

    def _reached(self, stage: str) -> None:
        if self.state is not None:
            self._update(stage=stage)

    def _update(self, **changes: object) -> None:
        if self.state is None:
            raise RuntimeError("the deploy state is recorded from begin() on")
        for name, value in changes.items():
            setattr(self.state, name, value)
        self._save()

    def _save(self) -> None:
        if self.state is not None and self._host is not None and self._target is not None:
            save_state(self._host, self._target, self.state)
