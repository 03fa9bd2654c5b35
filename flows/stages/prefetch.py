"""Prefetch: download on the box, while the old service still serves, exactly the hub files the new one
will load, so that it starts from the box's Hugging Face cache with the hub offline.

`python -m service.prefetch` runs with the release's python in the service's environment (`new.env`: the
same HF_HOME, HF_ENDPOINT, SDXL_* settings), detached, writing one JSON line per event (`service.prefetch.
Event`) to `<log_dir>/prefetch.jsonl`; this task follows that file, logs bytes, rate and ETA every
`log_every_s`, kills the box process when no byte arrives for `stall_s` and tries again (tenacity), up to
`retries` times: files already finished stay in the cache and are counted as present, a half-downloaded
one resumes from its `.incomplete` file. The box refuses before downloading anything when the cache's
filesystem lacks the missing bytes plus `disk_margin_gb`. The hub token (`new.hub_token`, a reference) is
resolved here and sent on the process's stdin only.
"""

from __future__ import annotations

import json
import time
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_fixed,
)

from flows.box.common import is_transient, run_logger
from flows.box.hostfs import file_size, json_answer, make_dirs, tail_bytes
from flows.box.hosts import Host, q
from flows.box.procs import is_running, process_info, stop_process
from flows.config.secrets import resolve_secret
from flows.config.target import Target
from flows.errors import PrefetchFailed
from flows.evidence.results import PrefetchResult, ProcessInfo
from flows.stages.deploy import Release
from service.prefetch import Detached, Event

POLL_S = 1.0
PLAN_GRACE_S = 120.0  # the box process's start and the hub listing, before any byte can move


@task(cache_policy=NO_CACHE)
def prefetch_weights(host: Host, target: Target, release: Release) -> PrefetchResult:
    """Download the new service's hub files into the box's cache, with retries that keep finished files;
    `PrefetchFailed` (nothing stopped, nothing changed but the cache) when it cannot."""
    log = run_logger()
    settings = target.new.prefetch
    if not settings.enabled:
        log.info(
            "prefetch is off (new.prefetch.enabled): the new service downloads its weights when it starts"
        )
        return PrefetchResult(note="disabled")
    token = resolve_secret(target.new.hub_token) if target.new.hub_token else None
    began = time.monotonic()
    follow = _Follow(host, target, release, token)

    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "prefetch attempt %d failed: %s; retrying in %.0f s (files already downloaded stay in the box's "
            "hub cache)",
            state.attempt_number,
            error,
            settings.retry_wait_s,
        )

    retrying = Retrying(
        stop=stop_after_attempt(settings.retries + 1) | stop_after_delay(settings.timeout_s),
        wait=wait_fixed(settings.retry_wait_s),
        retry=retry_if_exception(is_transient),
        before_sleep=before_sleep,
        reraise=True,
    )
    try:
        for attempt in retrying:
            with attempt:
                done = follow.attempt(attempt.retry_state.attempt_number)
    except PrefetchFailed as exc:
        if not exc.transient:
            raise
        raise PrefetchFailed(f"prefetch gave up after {follow.attempts} attempt(s): {exc}") from None
    except Exception as exc:
        if not is_transient(exc):
            raise
        raise PrefetchFailed(
            f"prefetch gave up after {follow.attempts} attempt(s): {type(exc).__name__}: {exc}"
        ) from None
    first = follow.first_plan or done
    result = PrefetchResult(
        files=done.files,
        cached_files=first.cached_files,
        bytes_total=done.bytes_total,
        bytes_downloaded=first.bytes_missing,
        seconds=round(time.monotonic() - began, 3),
        attempts=follow.attempts,
        offline_ready=done.offline_ready,
        cache_dir=done.cache_dir,
        note=done.message,
    )
    log.info(
        "prefetch done: %d files (%s), %s downloaded in %.1f s over %d attempt(s)%s",
        result.files,
        _size(result.bytes_total),
        _size(result.bytes_downloaded),
        result.seconds,
        result.attempts,
        "; the new service starts with HF_HUB_OFFLINE=1" if result.offline_ready else "",
    )
    return result


class _Follow:
    """Runs the box process once per attempt and follows its events."""

    def __init__(self, host: Host, target: Target, release: Release, token: str | None) -> None:
        self.host, self.target, self.release, self.token = host, target, release, token
        self.settings = target.new.prefetch
        self.progress = f"{target.new.log_dir}/prefetch.jsonl"
        self.log = run_logger()
        self.attempts = 0
        self.first_plan: Event | None = None

    def attempt(self, number: int) -> Event:
        self.attempts = number
        make_dirs(self.host, self.target.new.log_dir)
        offset = file_size(self.host, self.progress) or 0
        process = self._start()
        try:
            done = self._watch(process, offset)
        finally:
            if process is not None and is_running(self.host, process):
                stop_process(self.host, process, timeout_s=5)
        return done

    def _start(self) -> ProcessInfo | None:
        new = self.target.new
        command = (
            f"cd {q(self.release.path)} && env -u PYTHONPATH {q(*(f'{k}={v}' for k, v in new.env.items()))} "
            f"{q(self.release.python)} -m service.prefetch --model {q(new.model)} --json "
            f"--margin-gb {self.settings.disk_margin_gb:g} --detach {q(self.progress)}"
            + (" --token-stdin" if self.token else "")
        )
        result = self.host.run(command, timeout=120, stdin=f"{self.token}\n" if self.token else None)
        try:
            pid = json_answer(result.stdout, Detached).pid
        except ValueError:
            answer = (result.stderr or result.stdout).strip()[-800:]
            raise PrefetchFailed(
                f"could not start the prefetch with {self.release.python} (exit {result.exit_code}): {answer}"
            ) from None
        return process_info(self.host, pid)  # None: it finished (or failed) already

    def _watch(self, process: ProcessInfo | None, offset: int) -> Event:
        s, log = self.settings, self.log
        pending = ""
        last: Event | None = None
        moved_at = logged_at = time.monotonic()
        moved: tuple[int, int] | None = None
        planned = False
        while True:
            alive = process is not None and is_running(self.host, process)
            text, offset = tail_bytes(self.host, self.progress, offset)
            lines = (pending + text).split("\n")
            pending = lines.pop()
            for line in filter(None, (raw.strip() for raw in lines)):
                event = _event(line)
                if event is None:  # the box's own warnings (huggingface_hub resuming a download...)
                    log.info("prefetch (box): %s", line[:400])
                    continue
                if event.event == "done":
                    if event.files == 0:
                        log.info("prefetch: %s", event.message)
                    return event
                if event.event == "error":
                    raise PrefetchFailed(
                        f"prefetch on {self.host.name}: {event.message}", transient=event.retry
                    )
                if event.event == "plan":
                    planned = True
                    self._plan(event)
                mark = (event.bytes_done, event.bytes_received)  # Xet receives before it writes
                if mark != moved or event.event != "progress":
                    moved, moved_at = mark, time.monotonic()
                last = event
            now = time.monotonic()
            if last is not None and last.event != "plan" and now - logged_at >= s.log_every_s:
                log.info("prefetch: %s", _describe(last))
                logged_at = now
            # Before its plan the process starts and lists the repos (no bytes to count yet): a grace on top.
            if now - moved_at > s.stall_s + (0 if planned else PLAN_GRACE_S):
                stuck = f" at {_size(last.bytes_done)} of {_size(last.bytes_missing)}" if last else ""
                raise PrefetchFailed(
                    f"prefetch stalled: no byte downloaded for {s.stall_s:g} s{stuck}; stopped the box process",
                    transient=True,
                )
            if not alive:
                tail = (pending or (last.model_dump_json() if last else "nothing"))[-400:]
                raise PrefetchFailed(
                    f"the prefetch process on {self.host.name} ended without finishing: {tail}",
                    transient=True,
                )
            time.sleep(POLL_S)

    def _plan(self, event: Event) -> None:
        if not event.files:  # a note (local folders that need no download)
            self.log.info("prefetch: %s", event.message)
            return
        self.first_plan = self.first_plan or event
        self.log.info(
            "prefetch: %s: %d files, %s; %d files already cached (%s); %s to download, %s free on the cache's "
            "filesystem (%s)",
            event.message,
            event.files,
            _size(event.bytes_total),
            event.cached_files,
            _size(event.bytes_cached),
            _size(event.bytes_missing),
            _size(event.free_bytes or 0),
            event.cache_dir,
        )


def _event(line: str) -> Event | None:
    try:
        data: Any = json.loads(line)
        return Event.model_validate(data) if isinstance(data, dict) and "event" in data else None
    except ValueError:
        return None


def _describe(event: Event) -> str:
    """'1.23 GB of 14.00 GB (8.8%) at 45.1 MB/s, ETA 4 min 58 s (repo/file)'."""
    total = event.bytes_missing
    share = f" ({100 * event.bytes_done / total:.1f}%)" if total else ""
    left = max(total - event.bytes_done, 0)
    eta = f", ETA {_duration(left / event.rate)}" if event.rate > 0 else ""
    where = f" ({event.file})" if event.file else ""
    return f"{_size(event.bytes_done)} of {_size(total)}{share} at {event.rate / 1e6:.1f} MB/s{eta}{where}"


def _size(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def _duration(seconds: float) -> str:
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"
