"""Opt-in speed that changes the images (SDXL_CFG_CUTOFF, SDXL_TINY_VAE), on tiny models on the CPU.

What is checked is what each option does to the computation (how many images each UNet call sees, which
decoder runs), that it stays off by default, and that it is announced in `/health`; how much it costs in
quality is a CLIP comparison on real weights (`sdxl-deploy evaluate`, README), which random weights cannot give.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from pydantic import ValidationError

from service.engine import Engine
from service.models import REGISTRY, TINY_VAES, resolve_model
from service.settings import ServiceSettings
from service.state import ServiceState
from service.warmup import warm_up
from tests.support.engines import generate, load_engine


@contextmanager
def _unet_batches(engine: Engine) -> Iterator[dict[str, list[int]]]:
    """The batch dimension of every UNet call, per UNet ("base", "refiner")."""
    seen: dict[str, list[int]] = {"base": [], "refiner": []}
    handles = []
    for name, pipe in (("base", engine.base), ("refiner", engine.refiner)):
        if pipe is not None:
            hook = lambda module, args, name=name: seen[name].append(args[0].shape[0])  # noqa: E731
            handles.append(pipe.unet.register_forward_pre_hook(hook))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture(scope="module")
def cut(model_cache: Path) -> Engine:
    return load_engine(model_cache, cfg_cutoff=0.5)


def test_cfg_cutoff_guides_the_first_half_of_the_steps_and_halves_the_rest(cut: Engine) -> None:
    # 2 images: guided steps run 4 rows (2 negative + 2 prompt), the rest 2
    with _unet_batches(cut) as seen:
        generate(cut, batch_size=2, use_refiner=False)
    assert seen["base"] == [4, 4, 4, 2, 2, 2]


def test_cfg_cutoff_counts_base_and_refiner_as_one_pass(cut: Engine) -> None:
    # 6 steps split 0.8 (diffusers' timestep threshold): 4 base + 2 refiner steps; the cutoff falls after
    # step 3, inside the base, so the refiner runs unguided from its start
    with _unet_batches(cut) as seen:
        generate(cut, use_refiner=True, refiner_split=0.8)
    assert seen == {"base": [2, 2, 2, 1], "refiner": [1, 1]}
    with _unet_batches(cut) as seen:  # split 0.3: 1 base + 5 refiner steps, the cutoff inside the refiner's
        generate(cut, use_refiner=True, refiner_split=0.3)
    assert seen == {"base": [2], "refiner": [2, 2, 1, 1, 1]}


def test_cfg_cutoff_keeps_each_image_of_a_batch_what_it_is_alone(cut: Engine) -> None:
    pair = generate(cut, batch_size=2, seed=21, use_refiner=False)
    alone = [generate(cut, seed=seed, use_refiner=False)[0] for seed in (21, 22)]
    for together, single in zip(pair, alone, strict=True):
        assert np.abs(together.astype(int) - single.astype(int)).max() <= 1


def test_cfg_cutoff_changes_the_image_and_is_off_by_default(model_cache: Path, cut: Engine) -> None:
    plain = load_engine(model_cache)
    assert plain.settings.cfg_cutoff == 1.0 and plain.quality_options == []
    with _unet_batches(plain) as seen:
        image = generate(plain, use_refiner=False)[0]
    assert seen["base"] == [2] * 6
    assert not np.array_equal(image, generate(cut, use_refiner=False)[0])
    assert cut.quality_options == ["cfg_cutoff=0.5"]


def test_cfg_cutoff_leaves_unguided_requests_alone(cut: Engine) -> None:
    with _unet_batches(cut) as seen:
        generate(cut, guidance_scale=1.0, use_refiner=False)
    assert seen["base"] == [1] * 6


def test_cfg_cutoff_applies_to_the_hires_pass_on_its_own(cut: Engine) -> None:
    with _unet_batches(cut) as seen:
        images = generate(cut, use_refiner=False, hires_fix=True, hires_scale=1.5, hires_strength=0.5)
    # base: 6 steps, 3 guided; hires (img2img on the base UNet): 3 steps run, round(1.5) = 2 guided
    assert seen["base"] == [2, 2, 2, 1, 1, 1, 2, 2, 1]
    assert images[0].shape == (96, 96, 3)


def test_warm_up_compiles_both_shapes_of_every_unet_when_cutting(cut: Engine) -> None:
    with _unet_batches(cut) as seen:
        warm_up(cut)
    assert set(seen["base"]) == {1, 2} and set(seen["refiner"]) == {1, 2}


def test_cfg_cutoff_setting_is_a_fraction_of_the_steps() -> None:
    for bad in (0, -0.5, 1.5):
        with pytest.raises(ValidationError, match="cfg_cutoff"):
            ServiceSettings(cfg_cutoff=bad)
    assert ServiceSettings(cfg_cutoff=0.4).cfg_cutoff == 0.4


def test_tiny_vae_setting_reads_switch_words_and_sources() -> None:
    assert ServiceSettings().tiny_vae == "off"
    assert ServiceSettings(tiny_vae="true").tiny_vae == "on"
    assert ServiceSettings(tiny_vae=" OFF ").tiny_vae == "off"
    assert ServiceSettings(tiny_vae="").tiny_vae == "off"
    assert ServiceSettings(tiny_vae="madebyollin/taesdxl").tiny_vae == "madebyollin/taesdxl"


def test_every_model_knows_its_tiny_vae(model_cache: Path) -> None:
    assert REGISTRY["sdxl"].tiny_vae == TINY_VAES["sdxl"] == "madebyollin/taesdxl"
    assert REGISTRY["sd15"].tiny_vae == TINY_VAES["sd15"] == "madebyollin/taesd"
    generated = resolve_model("tiny-sd15", model_cache)
    assert generated.tiny_vae is not None and (Path(generated.tiny_vae) / "config.json").is_file()
    user_folder = resolve_model(str(Path(generated.base)), model_cache)  # a plain diffusers folder
    assert user_folder.tiny_vae == "madebyollin/taesd"


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd15"])
def test_tiny_vae_decodes_every_stage_and_says_so(model_cache: Path, model: str) -> None:
    engine = load_engine(model_cache, model, tiny_vae="on")
    pipes = [p for p in (engine.base, engine.refiner, engine.img2img) if p is not None]
    assert all(isinstance(p.vae, AutoencoderTiny) for p in pipes)
    assert engine.base.vae.dtype == torch.float32
    images = generate(engine, hires_fix=True, hires_scale=1.5, hires_strength=0.5)
    assert images[0].shape == (96, 96, 3)
    assert engine.quality_options == [f"tiny_vae={engine.spec.tiny_vae}"]
    plain = load_engine(model_cache, model)
    assert isinstance(plain.base.vae, AutoencoderKL)
    assert not np.array_equal(generate(plain)[0], generate(engine)[0])


def test_health_lists_the_options_that_change_images(model_cache: Path) -> None:
    state = ServiceState(
        ServiceSettings(model="tiny-sd15", cache_dir=model_cache, cfg_cutoff=0.6, tiny_vae="on")
    )
    state.start_loading().join(timeout=120)
    options = state.health().quality_options
    assert options[0] == "cfg_cutoff=0.6" and options[1].startswith("tiny_vae=")
    plain = ServiceState(ServiceSettings(model="tiny-sd15", cache_dir=model_cache))
    plain.start_loading().join(timeout=120)
    assert plain.health().quality_options == []


def test_a_tiny_vae_that_cannot_be_loaded_fails_the_load_naming_the_setting(
    model_cache: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-taesd"
    with pytest.raises(ValueError, match=f"tiny_vae='{missing}'"):
        load_engine(model_cache, tiny_vae=str(missing))
