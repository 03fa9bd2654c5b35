"""The target description: how to reach the GPU box, the service running there now, the one to deploy.

A target is a YAML or JSON file (`load_target`) and also the `target` parameter of every flow, so the
Prefect UI shows each field with its description. Paths may start with `~/`; they are resolved against
the host's `$HOME` once connected (`Target.on_host`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from flows.errors import TargetFileError

DEFAULT_PORT = 7860
# How the new service starts: beside the old one, then a cut-over (staged), or after the old one stopped.
StartMode = Literal["staged", "stop-first"]
# Environment names that hold secrets: refused in `new.env`, allowed (as references) in `new.secret_env`.
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")

# What the app (`aiImageGenerator.ts`) sends today; the benchmark and the tunnel check send the same.
APP_REQUEST: dict[str, Any] = {
    "prompt": "professional basketball player shooting a three pointer",
    "num_inference_steps": 20,
    "width": 1024,
    "height": 1024,
    "use_refiner": True,
    "use_face_restoration": False,
    "hires_fix": False,
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


CriterionName = Literal[
    "model_loaded",
    "resolution",
    "p95_seconds",
    "valid_image",
    "tunnel",
    "app_request",
    "no_cuda_errors",
    "peak_vram_gb",
    "quality",
    "max_downtime_s",
]


class Criterion(_Model):
    """One success criterion: which check, its threshold, and whether a failure blocks the deploy."""

    name: CriterionName = Field(..., description="Which check (see docs/RUNBOOK.md for the list).")
    threshold: float | None = Field(None, description="Limit for checks that have one (seconds, GB, px...).")
    enforce: bool = Field(True, description="True: a failure rolls the deploy back. False: warn only.")


DEFAULT_CRITERIA: tuple[Criterion, ...] = (
    Criterion(name="model_loaded"),
    Criterion(name="resolution", threshold=1024),
    Criterion(name="p95_seconds", threshold=30),
    Criterion(name="valid_image"),
    Criterion(name="tunnel"),
    Criterion(name="app_request"),
    Criterion(name="no_cuda_errors"),
    Criterion(name="peak_vram_gb", threshold=20),
    Criterion(name="quality", threshold=1.0),  # margin in CLIP points (non-inferiority)
    # Longest outage the app saw (s): enforced on a staged deploy (checked again after the cut-over);
    # report-only on a stop-first one, whose outage is the new service's whole start.
    Criterion(name="max_downtime_s", threshold=5.0),
)


class Connection(_Model):
    """How to reach the host: this machine, or a GPU box over SSH (key auth, verified host key)."""

    kind: Literal["local", "ssh"] = Field("local", description="local = this machine; ssh = a remote box.")
    hostname: str | None = Field(None, description="SSH host name or address (ssh only).")
    port: int = Field(22, ge=1, le=65535, description="SSH port.")
    username: str = Field("root", description="SSH user.")
    key_filename: str | None = Field(None, description="Private key file; default: the SSH agent / ~/.ssh.")
    known_hosts: str | None = Field(None, description="known_hosts file; default ~/.ssh/known_hosts.")
    trust_new_host: bool = Field(
        False, description="Accept and remember an unknown host key once. A CHANGED key is always refused."
    )
    connect_timeout: float = Field(15.0, gt=0, description="Seconds to wait for the SSH connection.")

    @model_validator(mode="after")
    def _ssh_needs_hostname(self) -> Connection:
        if self.kind == "ssh" and not (self.hostname or "").strip():
            raise ValueError("connection.hostname is required when connection.kind is 'ssh'")
        return self

    def describe(self) -> str:
        """`local` or `user@host:port`, for logs and reports."""
        return "local" if self.kind == "local" else f"{self.username}@{self.hostname}:{self.port}"


class CurrentService(_Model):
    """The service answering the app today (the SD1.5 script): what to back up and how to restart it."""

    name: str = Field("sd15", pattern=r"^[A-Za-z0-9._-]+$", description="Short name, used in backup names.")
    start_command: str = Field(
        "python3 ~/working-sd-api.py", min_length=1, description="Shell command that starts it (run by sh)."
    )
    workdir: str = Field("~", description="Directory the start command runs in.")
    files: list[str] = Field(
        default_factory=lambda: ["~/working-sd-api.py"], description="Files that make up the service."
    )
    pid_file: str | None = Field(
        None, description="Its pid file, if it writes one; otherwise the process listening on `port` is used."
    )
    log_file: str = Field("/tmp/sd-api.log", description="Where its output goes.")
    port: int = Field(
        DEFAULT_PORT, ge=1, le=65535, description="Port it listens on (on the host's loopback)."
    )
    health_path: str = Field("/health", pattern=r"^/", description="Health endpoint.")
    health_timeout_s: float = Field(600.0, gt=0, description="How long a restart may take to answer health.")
    stop_timeout_s: float = Field(30.0, gt=0, description="Seconds between TERM and KILL when stopping it.")


# ----- prefetch (flows/stages/prefetch.py) -------------------------------------------------------------


class PrefetchSettings(_Model):
    """Stage `prefetch`: the weights the new service loads are downloaded into the box's hub cache while the
    old service still serves; the new one then starts with the hub offline (HF_HUB_OFFLINE=1)."""

    enabled: bool = Field(
        True, description="Off: no prefetch; the new service downloads what it loads itself."
    )
    stall_s: float = Field(
        120.0, gt=0, description="No byte downloaded for this long: the box process is killed and retried."
    )
    retries: int = Field(3, ge=0, le=20, description="Attempts after the first; finished files stay cached.")
    retry_wait_s: float = Field(10.0, ge=0, description="Seconds between attempts.")
    disk_margin_gb: float = Field(
        2.0, ge=0, description="Free disk kept on the cache's filesystem beyond the bytes still to download."
    )
    log_every_s: float = Field(5.0, gt=0, description="Seconds between progress lines in the flow log.")
    timeout_s: float = Field(
        4 * 3600.0, gt=0, description="The whole prefetch, all attempts, at most this long."
    )


def _check_reference(field: str, source: str) -> None:
    """A secret reference: 'env:VARIABLE' or 'secret:BLOCK_NAME', never the secret itself."""
    kind, _, ref = source.partition(":")
    if kind not in ("env", "secret") or not ref.strip():
        raise ValueError(
            f"{field}: {source!r} must be 'env:VARIABLE' or 'secret:BLOCK_NAME' (a reference, never the secret itself)"
        )


# ------------------------------------------------------------------------------------------------------


class NewService(_Model):
    """The service to deploy: this project's `sdxl-deploy serve`, installed as an isolated release."""

    model: str = Field(
        "sdxl", min_length=1, description="Model to serve (sdxl, synthetic-sdxl, a folder...)."
    )
    port: int = Field(DEFAULT_PORT, ge=1, le=65535, description="Port it listens on (loopback).")
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment, e.g. HF_HOME (no secrets: see secret_env)."
    )
    secret_env: dict[str, str] = Field(
        default_factory=dict,
        description="Secret environment, resolved at run time and never stored: NAME -> 'env:VAR' (a "
        "variable of the flow's process) or 'secret:BLOCK' (a Prefect Secret block), e.g. "
        "SDXL_API_KEY: env:SDXL_API_KEY.",
    )
    python: str = Field(
        "python3",
        min_length=1,
        description="The box's interpreter with CUDA torch, diffusers, transformers and accelerate. Never "
        "modified: each release gets its own environment made by it (the service's other dependencies, fixes).",
    )
    wheelhouse: str | None = Field(
        None,
        description="A folder of wheels on THIS machine for a box without a package index: uploaded to "
        "<install_dir>/wheelhouse and the release environment is installed from it alone (--no-index).",
    )
    install_dir: str = Field("~/sdxl-deploy", description="Releases, pid file and deploy state live here.")
    log_dir: str = Field("~/sdxl-deploy/logs", description="Where the service log goes.")
    serve_args: list[str] = Field(default_factory=list, description="Extra `serve` arguments.")
    min_free_disk_gb: float | None = Field(
        None, ge=0, description="Free disk needed before deploying; default: model size plus a buffer."
    )
    ready_timeout_s: float = Field(
        2400.0, gt=0, description="How long loading may take (a first download of SDXL takes ~30 min)."
    )
    stop_timeout_s: float = Field(30.0, gt=0, description="Seconds between TERM and KILL when stopping it.")
    compile_timeout_s: float = Field(
        2700.0,
        gt=0,
        description="Stage compile: how long the compile step (`serve --compile-only`) may run before it is "
        "stopped and the stage fails (a first SDXL build on a 24 GiB card: 10-20 min; seconds when reused).",
    )
    prefetch: PrefetchSettings = Field(default_factory=PrefetchSettings)
    hub_token: str | None = Field(
        None,
        description="Hugging Face token for gated or private repos, by reference: 'env:HF_TOKEN' or "
        "'secret:BLOCK'. Resolved at run time, sent to the box's prefetch on its stdin, never stored.",
    )

    @field_validator("hub_token")
    @classmethod
    def _hub_token_reference(cls, source: str | None) -> str | None:
        if source is not None:
            _check_reference("new.hub_token", source)
        return source

    # ----- staged start and cut-over (flows/box/capacity.py, flows/stages/cutover.py) -----------------------
    start_mode: Literal["auto", "staged", "stop-first"] = Field(
        "auto",
        description="staged: start the new service on stage_port beside the old one, warm it up, benchmark "
        "and gate it, then cut over in about a second; stop-first: stop the old service, then start the new "
        "one (the app is down until it is ready); auto: staged when the box has room for both (free VRAM "
        "against the model's measured need plus vram_margin_gb; free RAM on a box without a GPU), and refused, "
        "saying why, where staging cannot work (set stop-first to deploy anyway).",
    )
    stage_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Where a staged new service listens until cut-over; default port + 1, or, when something "
        "else holds that, the next free port on the box.",
    )
    vram_margin_gb: float = Field(
        1.5, ge=0, description="Free VRAM kept on top of the model's measured need before auto stages (GiB)."
    )
    cutover_timeout_s: float = Field(
        30.0, gt=0, description="How long the cut-over may take to see the new service on the app's port."
    )

    # ----- compiled by the compile step -----
    ready_sizes: list[str] | None = Field(
        None,
        description="Sizes (WIDTHxHEIGHT) that get a static compiled function (the fastest) besides the model's "
        "default; default: the size of workload.app_request. Every other size runs through the dynamic-shape "
        "function the same step builds.",
    )

    @field_validator("ready_sizes")
    @classmethod
    def _sizes(cls, sizes: list[str] | None) -> list[str] | None:
        for size in sizes or []:
            width, _, height = size.lower().partition("x")
            if not (width.isdigit() and height.isdigit() and int(width) % 8 == 0 and int(height) % 8 == 0):
                raise ValueError(f"new.ready_sizes: {size!r} is not WIDTHxHEIGHT with multiples of 8")
        return sizes

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if not name.replace("_", "a").isalnum() or name[:1].isdigit():
                raise ValueError(f"new.env: {name!r} is not a valid environment variable name")
            if any(word in name.upper() for word in SECRET_WORDS):
                raise ValueError(
                    f"new.env: {name!r} looks like a secret; put it in new.secret_env as "
                    f"{name}: env:{name} (or secret:<Prefect Secret block>) so its value is never stored"
                )
        return env

    @field_validator("secret_env")
    @classmethod
    def _secret_sources(cls, secret_env: dict[str, str]) -> dict[str, str]:
        for name, source in secret_env.items():
            if not name.replace("_", "a").isalnum() or name[:1].isdigit():
                raise ValueError(f"new.secret_env: {name!r} is not a valid environment variable name")
            _check_reference(f"new.secret_env.{name}", source)
        return secret_env

    @property
    def staging_port(self) -> int:
        """The port a staged new service listens on until cut-over."""
        return self.stage_port or self.port + 1

    @property
    def pid_file(self) -> str:
        return f"{self.install_dir}/sdxl-api.pid"

    @property
    def log_file(self) -> str:
        return f"{self.log_dir}/sdxl-api.log"

    @property
    def state_file(self) -> str:
        return f"{self.install_dir}/deploy-state.json"


class Workload(_Model):
    """Requests used for the baseline, warm-up, benchmark and the app check."""

    app_request: dict[str, Any] = Field(
        default_factory=lambda: dict(APP_REQUEST), description="The app's /generate payload, as it sends it."
    )
    baseline_size: int | None = Field(
        512, ge=64, le=2048, description="Size of the baseline request to the current service (px)."
    )
    warmup_requests: int = Field(1, ge=0, le=20, description="Requests sent after /ready, not measured.")
    benchmark_runs: int = Field(3, ge=1, le=100, description="Measured generations at the app's size.")
    request_timeout_s: float = Field(300.0, gt=0, description="Per-request HTTP timeout.")

    @field_validator("app_request")
    @classmethod
    def _has_prompt(cls, payload: dict[str, Any]) -> dict[str, Any]:
        if not str(payload.get("prompt", "")).strip():
            raise ValueError(
                f"workload.app_request needs a non-empty 'prompt', got {payload.get('prompt')!r}"
            )
        return payload

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) the app asks for."""
        return int(self.app_request.get("width") or 1024), int(self.app_request.get("height") or 1024)

    def baseline_request(self) -> dict[str, Any]:
        """The app's request at the current service's native size."""
        payload = dict(self.app_request)
        if self.baseline_size:
            payload.update(width=self.baseline_size, height=self.baseline_size)
        return payload


class QualityCheck(_Model):
    """The CLIP comparison behind the `quality` criterion: the same prompts on the current service (before
    it stops) and on the new one (after warm-up), scored here by the evaluation package."""

    enabled: bool = Field(True, description="Collect and compare; off: the quality row reads 'not enabled'.")
    prompts_file: str | None = Field(
        None, description="Prompt file (.txt/.csv/.jsonl); default: built-in set."
    )
    prompt_limit: int | None = Field(
        None,
        ge=1,
        description="Prompts to compare, spread over categories; None: sized from the spread the baseline "
        "shows (sizing_batch prompts first, then as many as two equal services need to pass 95% of the "
        "time, at most max_prompts).",
    )
    seeds: int = Field(1, ge=1, le=10, description="Seeds per prompt.")
    scorer: str = Field("ViT-L-14", description="open_clip model (tiny-random-clip for rehearsals).")
    scorer_weights: str | None = Field("openai", description="open_clip weights tag or checkpoint file.")
    # --- sized comparison and the person's decision on an inconclusive verdict (helper quality)
    sizing_batch: int = Field(
        12, ge=2, description="Sized comparison: prompts of the first baseline batch whose spread sizes it."
    )
    max_prompts: int = Field(
        48,
        ge=2,
        description="Sized comparison: at most this many prompts (each is one generation on each service).",
    )
    on_inconclusive: Literal["ask", "abort", "promote"] = Field(
        "ask",
        description="An inconclusive quality verdict (enforced): ask a person (the flow run pauses for "
        "input in the Prefect UI), or decide unattended: abort or promote.",
    )
    approval_timeout_s: float = Field(
        3600, gt=0, le=7 * 86400, description="Seconds to wait for the person's decision; then abort."
    )

    @model_validator(mode="after")
    def _sizing_bounds(self) -> QualityCheck:
        if self.max_prompts < self.sizing_batch:
            raise ValueError(
                f"quality.max_prompts ({self.max_prompts}) must not be below quality.sizing_batch "
                f"({self.sizing_batch})"
            )
        return self


class ProbeSettings(_Model):
    """The downtime prober: `/health` and the app's request sent to the app's port for the whole flow."""

    enabled: bool = Field(True, description="Off: no probing; the max_downtime_s row reads 'not measured'.")
    health_every_s: float = Field(0.25, gt=0, le=60, description="Seconds between /health probes.")
    health_timeout_s: float = Field(5.0, gt=0, description="A /health probe slower than this fails.")
    app_pause_s: float = Field(
        5.0,
        ge=0,
        description="Seconds between the answer to one app-request probe and the next (one in flight).",
    )
    app_timeout_s: float = Field(120.0, gt=0, description="An app-request probe slower than this fails.")
    max_duration_s: float = Field(
        4 * 3600.0, gt=0, description="The prober stops by itself after this long, even if the flow has not."
    )


class Paths(_Model):
    """Where backups go and how many to keep."""

    backup_root: str = Field("~/backups", description="Backups: <backup_root>/<current.name>-<timestamp>/.")
    keep_backups: int = Field(5, ge=1, le=100, description="Keep the newest N backups.")


class Target(_Model):
    """Everything the runbook needs to know about one deployment."""

    connection: Connection = Field(default_factory=Connection)
    current: CurrentService = Field(default_factory=CurrentService)
    new: NewService = Field(default_factory=NewService)
    workload: Workload = Field(default_factory=Workload)
    paths: Paths = Field(default_factory=Paths)
    quality: QualityCheck = Field(default_factory=QualityCheck)
    probe: ProbeSettings = Field(default_factory=ProbeSettings)
    criteria: list[Criterion] = Field(
        default_factory=lambda: [c.model_copy() for c in DEFAULT_CRITERIA],
        description="Success criteria: name, threshold, enforce (or warn only).",
    )

    @property
    def ready_sizes(self) -> list[str]:
        """What `serve --ready-sizes` gets: `new.ready_sizes`, else the size `workload.app_request` names."""
        if self.new.ready_sizes is not None:
            return list(self.new.ready_sizes)
        request = self.workload.app_request
        if request.get("width") or request.get("height"):
            width, height = self.workload.size
            return [f"{width}x{height}"]
        return []

    @field_validator("criteria")
    @classmethod
    def _unique_criteria(cls, criteria: list[Criterion]) -> list[Criterion]:
        names = [c.name for c in criteria]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"criteria: each name may appear once, got duplicates {duplicates}")
        return criteria

    def on_host(self, home: str) -> Target:
        """A copy with every `~/` path resolved against the host's home directory."""

        def expand(path: str) -> str:
            return expand_home(path, home)

        current = self.current.model_copy(
            update={
                "workdir": expand(self.current.workdir),
                "files": [expand(f) for f in self.current.files],
                "pid_file": expand(self.current.pid_file) if self.current.pid_file else None,
                "log_file": expand(self.current.log_file),
            }
        )
        new = self.new.model_copy(
            update={"install_dir": expand(self.new.install_dir), "log_dir": expand(self.new.log_dir)}
        )
        paths = self.paths.model_copy(update={"backup_root": expand(self.paths.backup_root)})
        return self.model_copy(update={"current": current, "new": new, "paths": paths})


def expand_home(path: str, home: str) -> str:
    """`~` or `~/x` -> `<home>/x`; other paths unchanged (`~user` is refused)."""
    if path == "~":
        return home
    if path.startswith("~/"):
        return f"{home.rstrip('/')}/{path[2:]}"
    if path.startswith("~"):
        raise ValueError(f"path {path!r}: only '~/' is supported, not '~user'")
    return path


M = TypeVar("M", bound=BaseModel)


def load_model_file(path: str | Path, model: type[M], what: str, error: type[Exception]) -> tuple[M, Path]:
    """Read `model` from a YAML or JSON file; errors (`error`) name the `what` file and the bad field."""
    import yaml

    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{what} file {str(file)!r}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise error(f"{what} file {str(file)!r} is not valid {file.suffix[1:] or 'YAML'}: {exc}") from exc
    try:
        return model.model_validate(data or {}), file
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']} (got {err.get('input')!r})"
            for err in exc.errors()
        )
        raise error(f"{what} file {str(file)!r}: {problems}") from exc


def load_target(path: str | Path) -> Target:
    """Read a target from a YAML or JSON file; errors name the file and the bad field."""
    return load_model_file(path, Target, "target", TargetFileError)[0]
