"""Stage `prefetch` against the real hub mirror (olah, tests/support/hub_mirror.py): the box process
downloads exactly the files the service loads, then the service loads them with the hub offline; a link
cut mid-file and a link that hangs are retried keeping finished files; a disk too small is refused before
the deploy stops anything."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pytest
from pydantic import ValidationError

from flows.box.capacity import StartDecision
from flows.box.hosts import LocalHost, SSHHost
from flows.box.model_check import check_model
from flows.box.procs import find_service
from flows.config.target import NewService, PrefetchSettings, Target
from flows.errors import PreflightRefused
from flows.runbooks.plan import deploy_plan
from flows.runbooks.runbook import deploy_sdxl
from flows.stages.deploy import Release
from flows.stages.prefetch import prefetch_weights
from service.prefetch import XET_CHUNK_CACHE, Event, HubFile, Meter
from service.prefetch import main as prefetch_main
from tests.support.flows import fast, summary_of
from tests.support.hub_mirror import NO_SUCH_REPO, SDXL_BASE, SDXL_REFINER, SDXL_VAE, Mirror
from tests.support.relay import relay

REPO = Path(__file__).resolve().parents[2]
BF16 = {"SDXL_DTYPE": "bfloat16", "SDXL_DEVICE": "cpu"}
NO_REFINER = {**BF16, "SDXL_LOAD_REFINER": "false"}
# The service's own load (`Engine.load`), in a process of its own: the hub constants are read at import.
LOAD = (
    "from service.engine import Engine; from service.settings import ServiceSettings; "
    "e = Engine(ServiceSettings(model='sdxl')); e.load(); assert e.refiner is not None; print('loaded')"
)


def cached_files(hf_home: Path, repo_id: str) -> set[str]:
    snapshots = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    if not snapshots.is_dir():
        return set()
    return {p.relative_to(s).as_posix() for s in snapshots.iterdir() for p in s.rglob("*") if p.is_file()}


def checkout_release() -> Release:
    """This checkout as the release: `python -m service.prefetch` runs from it with this interpreter."""
    return Release(
        release_id="checkout", path=str(REPO), site="", wheel_sha256="", reused=True, python=sys.executable
    )


def prefetch_target(tmp_path: Path, env: dict[str, str], **settings: object) -> Target:
    prefetch = PrefetchSettings(**{"retry_wait_s": 1.0, "log_every_s": 1.0, **settings})
    new = Target().new.model_copy(
        update={"model": "sdxl", "env": env, "log_dir": str(tmp_path / "logs"), "prefetch": prefetch}
    )
    return Target().model_copy(update={"new": new})


def cached_counts(caplog: pytest.LogCaptureFixture) -> list[int]:
    """'n files already cached' of each attempt's plan line in the flow log."""
    return [int(m) for m in re.findall(r"(\d+) files already cached", caplog.text)]


# ----- fast: the contract's edges ----------------------------------------------------------------------


def test_the_hub_token_is_a_reference_never_a_value() -> None:
    assert Target.model_validate({"new": {"hub_token": "env:HF_TOKEN"}}).new.hub_token == "env:HF_TOKEN"
    with pytest.raises(ValidationError, match=r"new.hub_token: 'hf_abc' must be 'env:VARIABLE'"):
        Target.model_validate({"new": {"hub_token": "hf_abc"}})


def test_a_command_reads_the_stdin_it_is_given() -> None:
    assert LocalHost().run('read -r line && echo "got $line"', stdin="s3cret\n").stdout == "got s3cret\n"
    assert LocalHost().run("cat").stdout == ""  # no stdin: empty, never the caller's


def test_a_generated_model_has_nothing_to_fetch_and_the_plan_says_what_prefetch_does() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "service.prefetch", "--model", "tiny-sdxl", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    event = Event.model_validate_json(out.stdout.strip().splitlines()[-1])
    assert event.event == "done" and event.files == 0 and event.offline_ready
    assert "nothing to fetch" in event.message
    stop_first = StartDecision(
        mode="stop-first", requested="stop-first", reason="new.start_mode is stop-first"
    )
    plan = deploy_plan(Target(), "PID 1", stop_first)
    assert "download the hub files sdxl loads into the box's Hugging Face cache" in plan
    assert "HF_HUB_OFFLINE=1" in plan


def test_the_prefetch_turns_xets_chunk_cache_off_unless_the_target_sets_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(XET_CHUNK_CACHE, raising=False)
    assert (
        prefetch_main(["--model", "tiny-sdxl", "--json"]) == 0
        and "nothing to fetch" in capsys.readouterr().out
    )
    assert os.environ[XET_CHUNK_CACHE] == "0"  # no 10 GB beside the download the disk check did not count
    monkeypatch.setenv(XET_CHUNK_CACHE, "5000000000")  # new.env's choice stands
    assert prefetch_main(["--model", "tiny-sdxl", "--json"]) == 0
    assert os.environ[XET_CHUNK_CACHE] == "5000000000"


def test_progress_is_what_huggingface_hub_counts_even_when_xet_sizes_the_file_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Xet (the real SDXL repos' storage) may write a file out of order, sized in full from the start; the
    meter counts what huggingface_hub's own Xet progress reporter reports: bytes written, bytes received."""
    from huggingface_hub import constants
    from huggingface_hub.utils._xet_progress_reporting import XetDownloadProgressReporter

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    file = HubFile("org/model", "unet/diffusion_pytorch_model.fp16.safetensors", 1000, False, blob="abc")
    blobs = tmp_path / "models--org--model" / "blobs"
    blobs.mkdir(parents=True)
    with (blobs / "abc.incomplete").open("wb") as sized:
        sized.truncate(1000)
    meter = Meter(lambda event: None, Event(event="plan", bytes_missing=1000))
    meter.begin(file)
    assert meter.done() == 1000  # without huggingface_hub's count the file's size is all there is

    def report(written: int, received: int) -> SimpleNamespace:
        rates = {"total_bytes_completion_rate": None, "total_transfer_bytes_completion_rate": None}
        return SimpleNamespace(
            total_bytes_completed=written, total_transfer_bytes_completed=received, total_bytes=1000, **rates
        )

    counter = meter.counter()
    with XetDownloadProgressReporter(
        reconstruction_desc="unet", total=1000, log_level=logging.INFO, tqdm_class=counter
    ) as progress:
        progress.update_progress(report(0, 250))  # received, nothing written yet: still moving
        assert (meter.event("progress").bytes_done, meter.event("progress").bytes_received) == (0, 250)
        progress.update_progress(report(300, 400))
        assert (meter.event("progress").bytes_done, meter.event("progress").bytes_received) == (300, 400)
    meter.end()
    assert meter.event("file").bytes_done == 1000 and meter.current is None


# ----- the real hub mirror ------------------------------------------------------------------------------


@pytest.mark.slow
def test_prefetch_fetches_exactly_the_services_files_then_it_loads_offline(
    hub_mirror: Mirror, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    home = tmp_path / "hf-home"
    target = prefetch_target(tmp_path, {**hub_mirror.env(home), **BF16})

    result = prefetch_weights.fn(LocalHost(), target, checkout_release())

    assert result.offline_ready and result.attempts == 1, result
    assert result.bytes_downloaded > 1_000_000 and result.bytes_total >= result.bytes_downloaded
    base, refiner = cached_files(home, SDXL_BASE), cached_files(home, SDXL_REFINER)
    assert cached_files(home, SDXL_VAE) == {"config.json", "diffusion_pytorch_model.safetensors"}
    # the fp16 variant only (the repo ships it), no VAE of the base (the fp16-fix one replaces it), no
    # second encoder or VAE of the refiner (it takes the base's)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in base
    assert "unet/diffusion_pytorch_model.safetensors" not in base
    assert not any(f.startswith("vae/") for f in base | refiner)
    assert not any(f.startswith("text_encoder_2/") for f in refiner)
    assert {"model_index.json", "unet/diffusion_pytorch_model.fp16.safetensors"} <= refiner
    assert result.files == sum(len(cached_files(home, r)) for r in (SDXL_VAE, SDXL_BASE, SDXL_REFINER))
    assert re.search(r"prefetch: .* at [\d.]+ MB/s", caplog.text), caplog.text
    # counted from huggingface_hub's progress: bytes received (a file whose blob the repo already had, the
    # second tokenizer's vocabulary, is linked, not downloaded again)
    events = [Event.model_validate_json(line) for line in (tmp_path / "logs" / "prefetch.jsonl").open()]
    done = [e for e in events if e.event == "done"][-1]
    assert 0.8 * done.bytes_done < done.bytes_received <= done.bytes_done == result.bytes_downloaded, done

    # The service loads every part from that cache with the hub offline (and unreachable).
    offline = {**hub_mirror.env(home, offline=True), **BF16, "HF_ENDPOINT": "http://127.0.0.1:9"}
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD],
        env={**os.environ, **offline},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert loaded.returncode == 0 and "loaded" in loaded.stdout, loaded.stderr[-3000:]

    again = prefetch_weights.fn(LocalHost(), target, checkout_release())
    assert again.bytes_downloaded == 0 and again.cached_files == again.files == result.files


@pytest.mark.slow
def test_a_link_cut_during_prefetch_is_retried_keeping_finished_files(
    hub_mirror: Mirror, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    home = tmp_path / "hf-home"
    with relay(urlparse(hub_mirror.url).port or 0) as link:
        env = {**hub_mirror.env(home), **NO_REFINER, "HF_ENDPOINT": link.url}
        # 2 MB in: the VAE (1.3 MB) is done, the first text encoder is half way. The link stays down for
        # 8 s: longer than huggingface_hub's own five quick resumes, so the attempt fails and is retried.
        link.cut_after(2_000_000, down_s=8)
        result = prefetch_weights.fn(
            LocalHost(), prefetch_target(tmp_path, env, retries=5, stall_s=30), checkout_release()
        )

    assert link.cuts == 1
    assert result.offline_ready and result.attempts >= 2, result
    assert "prefetch attempt 1 failed" in caplog.text and "retrying" in caplog.text
    counts = cached_counts(caplog)
    assert counts[-1] > counts[0], counts  # the files finished before the cut were kept
    assert "diffusion_pytorch_model.safetensors" in cached_files(home, SDXL_VAE)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in cached_files(home, SDXL_BASE)


@pytest.mark.slow
def test_a_stalled_link_is_killed_and_retried_over_ssh_with_the_token_on_stdin(
    hub_mirror: Mirror,
    ssh_host: SSHHost,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO)
    token = f"hf_prefetch_test_{uuid.uuid4().hex}"
    monkeypatch.setenv("PREFETCH_TEST_TOKEN", token)
    home = tmp_path / "hf-home"
    with relay(urlparse(hub_mirror.url).port or 0) as link:
        env = {**hub_mirror.env(home), **NO_REFINER, "HF_ENDPOINT": link.url}
        target = prefetch_target(tmp_path, env, retries=2, stall_s=3)
        target.new.hub_token = "env:PREFETCH_TEST_TOKEN"
        link.stall_after(2_000_000)  # the connection then hangs, open and silent
        result = prefetch_weights.fn(ssh_host, target, checkout_release())

    assert link.stalls == 1
    assert result.offline_ready and result.attempts == 2, result
    assert "prefetch stalled: no byte downloaded for 3 s" in caplog.text
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in cached_files(home, SDXL_BASE)
    # the hub was asked with the token, which went nowhere else: not the flow log, not the box's files
    assert f"Bearer {token}".encode() in link.requests
    assert token not in caplog.text
    assert token not in (tmp_path / "logs" / "prefetch.jsonl").read_text()


@pytest.mark.slow
def test_a_disk_too_small_is_refused_before_anything_stops(
    prefect_api: None,
    legacy: tuple[LocalHost, Target],
    wheel: str,
    hub_mirror: Mirror,
    tmp_path: Path,
) -> None:
    host, target = legacy
    home = tmp_path / "hf-home"
    home.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(home)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 1 MB tmpfs here (needs root): {mounted.stderr.decode().strip()}")
    try:
        before = find_service(host, target.current.port)
        deploy = fast(target, model="sdxl", env={**target.new.env, **hub_mirror.env(home), **BF16})
        request = deploy.workload.app_request | {"width": 1024, "height": 1024}  # within sdxl's bounds
        deploy = deploy.model_copy(
            update={"workload": deploy.workload.model_copy(update={"app_request": request})}
        )

        state = deploy_sdxl(target=deploy, wheel=wheel, runs_dir=str(tmp_path / "runs"), return_state=True)

        assert state.is_failed()
        summary = summary_of(state)
        assert summary["failed_stage"] == "prefetch" and not summary["rolled_back"], summary["message"]
        assert "not enough disk for the model's weights" in summary["message"]
        assert re.search(r"[\d.]+ GB to download .* but [\d.]+ GB free", summary["message"]), summary[
            "message"
        ]
        assert summary["old_service_answering"] is True
        assert find_service(host, target.current.port) == before  # the same process, never stopped
        assert not any(f.endswith(".safetensors") for f in cached_files(home, SDXL_BASE))
    finally:
        subprocess.run(["umount", str(home)], check=False)


def test_preflight_asks_the_boxs_own_hub_for_each_repo_the_service_would_load(
    hub_mirror: Mirror, tmp_path: Path
) -> None:
    """sdxl's repos and a tiny VAE `new.env` names, asked for through the box's python and hub endpoint (the
    mirror) without downloading anything: a repo the hub does not have is refused naming the variable, before
    anything stops (the service itself would fail at start: tests/service/test_hub_mirror.py)."""
    home = tmp_path / "hf-home"

    def target(**env: str) -> Target:
        new = NewService(model="sdxl", python=sys.executable, env={**hub_mirror.env(home), **BF16, **env})
        return Target(new=new)

    assert check_model(LocalHost(), target()).hub == f"hub {hub_mirror.url}"
    with pytest.raises(PreflightRefused) as refused:
        check_model(LocalHost(), target(SDXL_TINY_VAE=NO_SUCH_REPO))
    assert str(refused.value) == (
        f"new.env.SDXL_TINY_VAE: its tiny VAE loads from the hub {hub_mirror.url}: {NO_SUCH_REPO}: no such "
        "repo (or new.hub_token may not read it)"
    )
    assert not list(home.rglob("*.safetensors"))  # asked, not downloaded
