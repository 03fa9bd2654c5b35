"""Download the hub files the service will load into the box's Hugging Face cache, before it starts.

`python -m service.prefetch --model sdxl --json` (run by the deploy flow with the release's python, in the
service's environment, while the old service still serves): the same settings as `serve` (`SDXL_*`, `.env`),
the same sources as `Engine.load` (VAE or tiny VAE, base, refiner) and, per source, the files
`service.hub.files_to_load` names (the fp16 variant only where the repo ships it). It asks the hub for
their sizes, counts those already in the cache as present, refuses when the cache's filesystem lacks the
missing bytes plus a margin, then downloads file by file with `hf_hub_download` (a cut download resumes
from its `.incomplete` file; progress as huggingface_hub counts it, plain HTTP or Xet), one JSON line per
event (`Event`). The hub token, when one is needed, comes
on stdin (`--token-stdin`), never on the command line or in a file. Local folders and generated models
have nothing to fetch. `--detach FILE` reads the token, then goes on in its own session writing to FILE,
and prints `{"pid": ...}` (how the flow runs it: the SSH command returns at once).
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import sys
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

EventKind = Literal["plan", "progress", "file", "done", "error"]
PROGRESS_EVERY_S = 1.0
XET_CHUNK_CACHE = "HF_XET_CHUNK_CACHE_SIZE_BYTES"


class Event(BaseModel):
    """One JSON line of the prefetch (the contract with `flows.stages.prefetch`)."""

    event: EventKind
    message: str = ""
    file: str | None = None  # "<repo>/<path>" being downloaded
    files: int = 0  # files the service loads from the hub
    cached_files: int = 0  # of them, already in the cache before this run
    bytes_total: int = 0  # their size, as the hub reports it
    bytes_cached: int = 0
    bytes_done: int = 0  # downloaded by this run so far
    bytes_received: int = 0  # off the network by this run (Xet: may run ahead of bytes_done)
    bytes_missing: int = 0
    rate: float = 0.0  # bytes per second, this run
    seconds: float = 0.0
    free_bytes: int | None = None  # on the cache's filesystem
    cache_dir: str | None = None
    offline_ready: bool = False  # every file is in the cache: the service can start with HF_HUB_OFFLINE=1
    retry: bool = False  # an error another attempt may get past (network), not a refusal


class Detached(BaseModel):
    """The one line `--detach` prints before its parent exits: the pid of the prefetch that goes on."""

    pid: int


@dataclass(frozen=True)
class Source:
    """One `from_pretrained` of `Engine.load`: where from, in which precision, without which components."""

    source: str
    half: bool
    skip: frozenset[str] = frozenset()


@dataclass(frozen=True)
class HubFile:
    repo: str
    path: str
    size: int
    cached: bool
    blob: str | None = None  # its name in the cache's blobs/ (the LFS sha256, else the git blob id)

    @property
    def name(self) -> str:
        return f"{self.repo}/{self.path}"


class HubUnreachable(RuntimeError):
    """The hub did not answer (another attempt may)."""


class PrefetchRefused(RuntimeError):
    """Nothing can be downloaded: too little disk, or a repo that lacks what the load needs."""


def hub_sources(settings: Any) -> tuple[list[Source], str]:
    """The hub sources the service loads with these settings (as `Engine.load` does), and a note on what is
    not fetched (generated models and local folders)."""
    from service.models import REGISTRY, resolve_model

    if settings.model not in REGISTRY and not Path(settings.model).expanduser().exists():
        return [], f"{settings.model} is not a hub model (a generated model is built on the box)"
    from service.engine import resolve_device, resolve_dtype, tiny_vae_source

    spec = resolve_model(settings.model, settings.cache_dir, refiner=settings.refiner)
    import torch

    half = resolve_dtype(settings.dtype, resolve_device(settings.device)) in (torch.float16, torch.bfloat16)
    loads: list[Source] = []
    vae = tiny_vae_source(settings.tiny_vae, spec) or spec.vae
    if vae:
        loads.append(Source(vae, half))
    if not spec.single_file:
        skip = {"vae"} if vae else set()
        if spec.backend == "sd15":
            skip |= {"safety_checker", "requires_safety_checker"}
        loads.append(Source(spec.base, half, frozenset(skip)))
    if spec.backend == "sdxl" and spec.refiner and settings.load_refiner:
        loads.append(Source(spec.refiner, half, frozenset({"text_encoder_2", "vae"})))
    hub = [s for s in loads if not Path(s.source).expanduser().exists()]
    local = [s.source for s in loads if s not in hub] + ([spec.base] if spec.single_file else [])
    return hub, (f"local, not fetched: {', '.join(local)}" if local else "")


def hub_files(sources: Collection[Source]) -> list[HubFile]:
    """Every file of the sources the service reads, with the hub's size and whether the cache has it."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    from service.hub import HUB_REVISION, files_to_load, hub_offline, list_files

    offline = hub_offline(constants)
    out: list[HubFile] = []
    for load in sources:
        listed = list_files(load.source)
        if listed.from_cache and not offline:
            raise HubUnreachable(f"could not list {load.source} on the hub at {constants.ENDPOINT}")
        _, paths = files_to_load(listed, half=load.half, skip=load.skip)
        infos = [] if offline else HfApi().get_paths_info(load.source, paths, revision=HUB_REVISION)
        known = {info.path: info for info in infos}
        for path in paths:
            info = known.get(path)
            lfs = getattr(info, "lfs", None)
            blob = getattr(lfs, "sha256", None) or getattr(info, "blob_id", None)
            size = int(getattr(info, "size", 0) or 0)
            cached = isinstance(try_to_load_from_cache(load.source, path, revision=HUB_REVISION), str)
            out.append(HubFile(load.source, path, size, cached, blob))
    return out


def cache_dir() -> Path:
    """The hub cache the service reads (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk(files: list[HubFile], margin_bytes: int) -> tuple[Path, int]:
    """The cache dir and its free bytes; `PrefetchRefused`, naming the sizes, when the missing files and
    the margin do not fit."""
    where = cache_dir()
    free = free_bytes(where)
    missing = sum(f.size for f in files if not f.cached)
    if missing + margin_bytes > free:
        raise PrefetchRefused(
            f"not enough disk for the model's weights in the hub cache {where}: {_gb(missing)} to download "
            f"(+ {_gb(margin_bytes)} margin) but {_gb(free)} free on its filesystem; free some space or point "
            "HF_HOME/HF_HUB_CACHE (new.env) at a larger disk"
        )
    return where, free


class Meter:
    """Bytes done: the finished files plus the one being written, sent as a `progress` event every second.

    The file being written is counted from huggingface_hub's own progress (`counter()`, a tqdm class given to
    `hf_hub_download`): bytes written, whether by a plain HTTP download or by Xet's reconstruction, which
    need not write the file in order, and bytes received from the network (`bytes_received`, what the
    flow's stall detector watches besides). A huggingface_hub without `tqdm_class` falls back to the size of
    the file's `.incomplete` in the cache (a plain download writes it in order).
    """

    def __init__(self, emit: Any, plan: Event) -> None:
        self.emit, self.plan = emit, plan
        self.started = time.monotonic()
        self.finished = 0  # bytes of files finished by this run
        self.current: HubFile | None = None
        self.written: int | None = None  # of the current file, as huggingface_hub reports it
        self.received = 0  # from the network, this run
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Meter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def begin(self, file: HubFile) -> None:
        self.current, self.written = file, None

    def end(self) -> None:
        if self.current is not None:
            self.finished += self.current.size
        self.current, self.written = None, None

    def counter(self) -> type:
        """A tqdm class for `hf_hub_download` that counts into this meter instead of drawing a bar."""
        from tqdm.auto import tqdm  # huggingface_hub's own dependency

        meter = self

        class Counter(tqdm):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs.pop("name", None)
                super().__init__(*args, **{**kwargs, "disable": True})
                meter.written = int(kwargs.get("initial") or 0)  # a resumed download's bytes already there

            def update(self, n: float | None = 1) -> bool | None:
                meter.written = (meter.written or 0) + int(n or 0)
                return None

            def update_transfer(self, n: float | None) -> None:  # Xet: bytes off the network
                meter.received += int(n or 0)

            def set_transfer_postfix_str(self, *args: Any, **kwargs: Any) -> None:
                pass

        return Counter

    def done(self) -> int:
        current = self.current
        if current is None:
            return self.finished
        partial = self.written if self.written is not None else self._incomplete_size(current)
        return self.finished + min(partial, current.size or partial)

    @staticmethod
    def _incomplete_size(file: HubFile) -> int:
        blobs = cache_dir() / f"models--{file.repo.replace('/', '--')}" / "blobs"
        try:
            return (blobs / f"{file.blob}.incomplete").stat().st_size if file.blob else 0
        except OSError:  # not started yet, or just renamed into place
            return 0

    def event(self, kind: EventKind, **extra: Any) -> Event:
        seconds = time.monotonic() - self.started
        done = self.done()
        return self.plan.model_copy(
            update={
                "event": kind,
                "message": "",
                "file": self.current.name if self.current else None,
                "bytes_done": done,
                "bytes_received": self.received,
                "rate": round(done / seconds, 1) if seconds > 0 else 0.0,
                "seconds": round(seconds, 3),
                **extra,
            }
        )

    def _run(self) -> None:
        while not self._stop.wait(PROGRESS_EVERY_S):
            self.emit(self.event("progress"))


def prefetch(sources: list[Source], margin_bytes: int, emit: Any) -> Event:
    """Fetch what is missing; the last event (`done`)."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    from service.hub import HUB_REVISION, hub_offline

    files = hub_files(sources)
    missing = [f.name for f in files if not f.cached]
    if missing and hub_offline(constants):
        raise PrefetchRefused(
            f"HF_HUB_OFFLINE=1 in the service's environment and {len(missing)} of its files are not in the hub "
            f"cache {cache_dir()} (e.g. {missing[0]}): let the prefetch reach the hub (HF_HUB_OFFLINE=0)"
        )
    where, free = check_disk(files, margin_bytes)
    cached = [f for f in files if f.cached]
    plan = Event(
        event="plan",
        message=f"{len(files)} files from {', '.join(s.source for s in sources)}",
        files=len(files),
        cached_files=len(cached),
        bytes_total=sum(f.size for f in files),
        bytes_cached=sum(f.size for f in cached),
        bytes_missing=sum(f.size for f in files if not f.cached),
        free_bytes=free,
        cache_dir=str(where),
    )
    emit(plan)
    with Meter(emit, plan) as meter:
        counted = "tqdm_class" in inspect.signature(hf_hub_download).parameters
        progress = {"tqdm_class": meter.counter()} if counted else {}
        for file in files:
            if file.cached:
                continue
            meter.begin(file)
            hf_hub_download(file.repo, file.path, revision=HUB_REVISION, **progress)
            meter.end()
            emit(meter.event("file"))
        ready = all(
            isinstance(try_to_load_from_cache(f.repo, f.path, revision=HUB_REVISION), str) for f in files
        )
        return meter.event("done", offline_ready=ready, message="every file is in the cache" if ready else "")


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB"


def _detach(progress: str) -> None:
    """Go on in a child of its own session writing to `progress`; the parent prints its pid and exits."""
    pid = os.fork()
    if pid:
        print(Detached(pid=pid).model_dump_json(), flush=True)
        os._exit(0)
    os.setsid()
    fd = os.open(progress, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.prefetch", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="Registry name or path (default: SDXL_MODEL, as `serve`).")
    parser.add_argument("--refiner", help="Refiner hub id or folder (default: SDXL_REFINER).")
    parser.add_argument(
        "--token-stdin", action="store_true", help="Read the hub token from stdin's first line."
    )
    parser.add_argument("--json", action="store_true", help="One JSON event a line (else readable lines).")
    parser.add_argument("--margin-gb", type=float, default=2.0, help="Free disk kept beyond the download.")
    parser.add_argument("--detach", metavar="FILE", help="Run in the background, events appended to FILE.")
    args = parser.parse_args(argv)
    # Xet's chunk cache (10 GB more beside the hub cache, where hf_xet's build enables it) serves repeats; a prefetch
    # downloads each file once, and the disk check counts the files only. Kept when new.env sets it.
    os.environ.setdefault(XET_CHUNK_CACHE, "0")
    if args.token_stdin and (token := sys.stdin.readline().strip()):
        os.environ["HF_TOKEN"] = token  # this process's own environment: huggingface_hub reads it there
    if args.detach:
        _detach(args.detach)
    lock = threading.Lock()

    def emit(event: Event) -> None:
        line = event.model_dump_json(exclude_defaults=True) if args.json else _readable(event)
        with lock:
            print(line, flush=True)

    try:
        from service.hub import ModelFilesMissing
        from service.settings import ServiceSettings

        overrides = {k: v for k, v in {"model": args.model, "refiner": args.refiner}.items() if v}
        settings = ServiceSettings(**overrides)
        sources, note = hub_sources(settings)
        if not sources:
            emit(Event(event="done", message=f"nothing to fetch: {note}", offline_ready=True))
            return 0
        if note:
            emit(Event(event="plan", message=note))
        emit(prefetch(sources, int(args.margin_gb * 1e9), emit))
        return 0
    except (PrefetchRefused, ModelFilesMissing, ValueError) as exc:
        emit(Event(event="error", message=str(exc)))
        return 3
    except Exception as exc:  # network, hub errors: another attempt resumes where this one stopped
        emit(Event(event="error", message=f"{type(exc).__name__}: {exc}", retry=True))
        return 4


def _readable(event: Event) -> str:
    if event.event == "progress":
        return f"{_gb(event.bytes_done)} of {_gb(event.bytes_missing)} at {event.rate / 1e6:.1f} MB/s ({event.file})"
    return f"{event.event}: {event.message or event.model_dump_json(exclude_defaults=True)}"


if __name__ == "__main__":
    sys.exit(main())
