"""CLIP score with open_clip: per image `100 * max(cos(image, prompt), 0)`, batched, on the GPU when there is one;
`score_generations` scores a run directory's generations table.

The default backbone is ViT-L-14 with OpenAI's weights (the common reference for text-to-image scores);
any open_clip model works, e.g. `ClipScorer("ViT-H-14", "laion2b_s32b_b79k")`. `pretrained` is an open_clip
tag or a local checkpoint file. `TINY_CLIP` is a tiny random-weight model for tests and the demo: its
scores exercise the plumbing and say nothing about quality.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-L-14"
DEFAULT_PRETRAINED = "openai"
TINY_CLIP = "tiny-random-clip"
TINY_CLIP_CONFIG = Path(__file__).with_name(f"{TINY_CLIP}.json")
# Random weights from this seed give positive cosines for typical images (most seeds give negative ones,
# which all clamp to a score of 0 and would hide whether the plumbing works).
TINY_CLIP_SEED = 6
CHECKPOINT_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".npz"}


def register_tiny_clip() -> None:
    """Make `TINY_CLIP` known to open_clip (idempotent)."""
    import open_clip

    if TINY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(TINY_CLIP_CONFIG)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class ClipScorer:
    """Scores (image, prompt) pairs with one open_clip model.

    `pretrained=None` builds random weights (only sensible for `TINY_CLIP`, seeded so runs repeat).
    """

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        pretrained: str | None = DEFAULT_PRETRAINED,
        device: str | None = None,
        batch_size: int = 16,
    ) -> None:
        import open_clip
        import torch

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if model_name == TINY_CLIP:
            register_tiny_clip()
        if pretrained and Path(pretrained).suffix in CHECKPOINT_SUFFIXES and not Path(pretrained).is_file():
            raise FileNotFoundError(f"CLIP checkpoint file pretrained={pretrained!r} does not exist")
        self.model_name, self.pretrained = model_name, pretrained or None
        self.device = device or default_device()
        self.batch_size = batch_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_CLIP_SEED)
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=self.pretrained, device=self.device
            )
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(model_name)
        log.info("CLIP scorer %s on %s", self.describe(), self.device)

    @property
    def random_weights(self) -> bool:
        """True when the weights are random (the scores then mean nothing about quality)."""
        return self.pretrained is None

    def describe(self) -> str:
        """E.g. `ViT-L-14 (openai)` or `tiny-random-clip (random weights)`."""
        weights = Path(self.pretrained).name if self.pretrained else "random weights"
        return f"{self.model_name} ({weights})"

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """`100 * max(cos, 0)` for each (image, prompt) pair, in order."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts: they must pair up")
        scores: list[float] = []
        for start in range(0, len(images), self.batch_size):
            end = start + self.batch_size
            scores += self._score_batch(images[start:end], prompts[start:end]).tolist()
        return scores

    def _score_batch(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        import torch

        pixels = torch.stack([self.preprocess(image.convert("RGB")) for image in images]).to(self.device)
        tokens = self.tokenizer(list(prompts)).to(self.device)
        with torch.inference_mode():
            image_features = self.model.encode_image(pixels, normalize=True)
            text_features = self.model.encode_text(tokens, normalize=True)
        cosine = (image_features * text_features).sum(dim=-1)
        return (100 * cosine.clamp(min=0)).float().cpu()


@functools.lru_cache(maxsize=2)
def load_scorer(model_name: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED) -> ClipScorer:
    """One shared scorer per (model, weights) in this process (loading ViT-L-14 takes seconds)."""
    return ClipScorer(model_name, pretrained)


def tiny_scorer() -> ClipScorer:
    """The tiny random-weight scorer used by the tests and the demo."""
    return load_scorer(TINY_CLIP, None)


def score_generations(generations: pd.DataFrame, run_dir: str | Path, scorer: ClipScorer) -> pd.DataFrame:
    """A copy of `generations` with a `score` column (NaN where the request failed).

    Images are read from the run directory one batch at a time (hundreds of 1024 px images add up).
    """
    from PIL import Image

    def load(relative: str) -> Image.Image:
        with Image.open(Path(run_dir) / relative) as image:
            return image.convert("RGB")

    scored = generations.copy()
    scored["score"] = float("nan")
    done = scored.index[scored["image"].notna()]
    for start in range(0, len(done), scorer.batch_size):
        batch = done[start : start + scorer.batch_size]
        images = [load(relative) for relative in scored.loc[batch, "image"]]
        scored.loc[batch, "score"] = scorer.score(images, list(scored.loc[batch, "prompt"]))
    return scored
