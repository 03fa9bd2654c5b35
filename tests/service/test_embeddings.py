"""Prompt embeddings (service/embeddings.py, setting SDXL_PROMPT_CACHE_SIZE), on tiny models on the CPU.

The service hands the pipelines embeddings instead of texts, each distinct text encoded once and kept. What
is checked: the images are exactly those diffusers makes from the texts (SD1.5, SDXL with and without the
refiner, with and without a negative prompt), a kept text is not encoded again, the store is bounded, and
size 0 encodes every text every time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from service.engine import Engine, tensor_to_pil
from service.settings import ServiceSettings
from tests.support.engines import REQUEST, generate, load_engine

PROMPT, STEPS, SIZE, SEED = (REQUEST[k] for k in ("prompt", "num_inference_steps", "width", "seed"))


@pytest.fixture(scope="module")
def sdxl(model_cache: Path) -> Engine:
    return load_engine(model_cache, "tiny-sdxl")


@pytest.fixture(scope="module")
def sd15(model_cache: Path) -> Engine:
    return load_engine(model_cache, "tiny-sd15")


def _from_texts(engine: Engine, negative: str | None, use_refiner: bool = False) -> np.ndarray:
    """The same request made the way diffusers documents it: the pipelines get the texts."""
    texts = {"prompt": PROMPT, "negative_prompt": negative, "guidance_scale": 7.5}
    generator = torch.Generator("cpu").manual_seed(SEED)
    common = {**texts, "num_inference_steps": STEPS, "generator": generator}
    if not use_refiner:
        out = engine.base(width=SIZE, height=SIZE, output_type="pt", **common).images
    else:
        split = 0.8
        latents = engine.base(
            width=SIZE, height=SIZE, denoising_end=split, output_type="latent", **common
        ).images
        out = engine.refiner(image=latents, denoising_start=split, output_type="pt", **common).images
    return np.asarray(tensor_to_pil(out)[0])


@contextmanager
def _encoder_calls(engine: Engine) -> Iterator[list[int]]:
    """The batch size of every call of the base's first text encoder."""
    calls: list[int] = []
    handle = engine.base.text_encoder.register_forward_pre_hook(
        lambda m, args: calls.append(args[0].shape[0])
    )
    try:
        yield calls
    finally:
        handle.remove()


@pytest.mark.parametrize("negative", [None, "blurry, low quality"])
def test_sd15_images_are_diffusers_own_from_the_texts(sd15: Engine, negative: str | None) -> None:
    image = generate(sd15, negative_prompt=negative)[0]
    assert np.array_equal(image, _from_texts(sd15, negative))


@pytest.mark.parametrize(
    ("negative", "use_refiner"), [(None, False), ("blurry", False), (None, True), ("blurry", True)]
)
def test_sdxl_images_are_diffusers_own_from_the_texts(
    sdxl: Engine, negative: str | None, use_refiner: bool
) -> None:
    # SDXL's base zeroes an absent negative prompt (force_zeros_for_empty_prompt); its refiner encodes ""
    assert sdxl.base.config.force_zeros_for_empty_prompt
    image = generate(sdxl, negative_prompt=negative, use_refiner=use_refiner)[0]
    assert np.array_equal(image, _from_texts(sdxl, negative, use_refiner))


def test_a_kept_text_is_not_encoded_again(model_cache: Path) -> None:
    engine = load_engine(model_cache, "tiny-sd15")
    with _encoder_calls(engine) as calls:
        first = generate(engine, negative_prompt="blurry")[0]
    assert calls == [1, 1]  # the prompt and the negative prompt, one text at a time
    with _encoder_calls(engine) as calls:
        again = generate(engine, negative_prompt="blurry")[0]
        generate(engine, prompt="a red bicycle", negative_prompt="blurry")
    assert calls == [1]  # only the new prompt
    assert np.array_equal(first, again)
    assert engine.embeddings.stats() == {"kept": 3, "size": 64, "hits": 3, "misses": 3}


def test_a_batch_encodes_each_distinct_text_once_and_gets_its_own_images(sd15: Engine) -> None:
    with _encoder_calls(sd15) as calls:
        images = generate(sd15, prompt="a green tractor", negative_prompt="fog", batch_size=3)
    assert len(calls) <= 2 and len(images) == 3
    assert not np.array_equal(images[0], images[1])  # seeds 5, 6, 7: three images, not one repeated


def test_the_store_keeps_the_most_recent_texts_only(model_cache: Path) -> None:
    engine = load_engine(model_cache, "tiny-sd15", prompt_cache_size=2)
    for prompt in ("one", "two", "three"):  # each request: the prompt and "" (no negative prompt)
        generate(engine, prompt=prompt)
    assert engine.embeddings.stats()["kept"] == 2
    with _encoder_calls(engine) as calls:
        generate(engine, prompt="three")  # "three" and "" were the last two used
    assert calls == []
    with _encoder_calls(engine) as calls:
        generate(engine, prompt="one")  # dropped: encoded again
    assert calls == [1]


def test_size_zero_encodes_every_text_every_time(model_cache: Path) -> None:
    engine = load_engine(model_cache, "tiny-sd15", prompt_cache_size=0)
    for _ in range(2):
        with _encoder_calls(engine) as calls:
            generate(engine, negative_prompt="blurry")
        assert calls == [1, 1]
    assert engine.embeddings.stats()["kept"] == 0


def test_unguided_requests_encode_no_negative(sd15: Engine) -> None:
    kwargs = sd15.embeddings.call_kwargs(sd15.base, ["a boat"], ["rain"], guided=False)
    assert set(kwargs) == {"prompt_embeds"}
    # encoded without autograd, as inside the pipeline (a graph pending backward slows CUDA graphs down)
    assert not kwargs["prompt_embeds"].requires_grad
    guided = sd15.embeddings.call_kwargs(sd15.base, ["a boat", "a car"], ["rain", "snow"], guided=True)
    assert guided["prompt_embeds"].shape[0] == guided["negative_prompt_embeds"].shape[0] == 2


def test_the_setting_is_bounded() -> None:
    assert ServiceSettings().prompt_cache_size == 64
    with pytest.raises(ValidationError, match="prompt_cache_size"):
        ServiceSettings(prompt_cache_size=-1)
