"""The CLIP scorer: it agrees with torchmetrics' CLIPScore on the same weights, loads a local checkpoint file
through open_clip's real path, and the tiny random-weight scorer behaves (range, batching, repeatability).

The cross-check: a random tiny `transformers.CLIPModel` is scored by torchmetrics (an implementation nobody
here wrote); its weights, renamed into open_clip's layout and saved as a checkpoint file, are loaded by our
scorer with `open_clip.create_model_and_transforms(name, pretrained=<file>)`. Same weights, two code bases.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation.clip_score import TINY_CLIP, TINY_CLIP_CONFIG, ClipScorer, tiny_scorer

CROSS_CHECK_SEED = 0
PROMPTS = [
    "a photo of a cat",
    "two dogs on a red sofa",
    "a rainy street at night",
    "hands holding a cup",
    'a sign that says "OPEN"',
    "three apples on a plate",
]


def _images(size: tuple[int, int], count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(count)
    ]


def _hf_to_open_clip(sd: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """Rename a transformers CLIPModel state dict into open_clip's CLIP layout (q, k, v -> in_proj)."""
    out = {
        "logit_scale": sd["logit_scale"],
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T,
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].T,
    }
    renames = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2"}
    renames |= {"mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for hf_tower, oc_tower in (("text_model", ""), ("vision_model", "visual.")):
        for i in range(layers):
            src, dst = f"{hf_tower}.encoder.layers.{i}", f"{oc_tower}transformer.resblocks.{i}"
            for kind in ("weight", "bias"):
                out[f"{dst}.attn.in_proj_{kind}"] = torch.cat(
                    [sd[f"{src}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                )
                for hf_name, oc_name in renames.items():
                    out[f"{dst}.{oc_name}.{kind}"] = sd[f"{src}.{hf_name}.{kind}"]
    return {name: tensor.contiguous().clone() for name, tensor in out.items()}


@pytest.fixture(scope="module")
def same_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object, Path]:
    """(torchmetrics CLIPScore, its transformers model, an open_clip checkpoint file of the same weights)."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    from service.tokenizer import write_clip_tokenizer

    class FeatureCLIP(CLIPModel):
        """transformers 5 returns output objects from get_*_features; torchmetrics 1.9 expects tensors."""

        def get_image_features(self, *args, **kwargs):  # type: ignore[override]
            out = super().get_image_features(*args, **kwargs)
            return getattr(out, "pooler_output", out)

        def get_text_features(self, *args, **kwargs):  # type: ignore[override]
            out = super().get_text_features(*args, **kwargs)
            return getattr(out, "pooler_output", out)

    cfg = json.loads(TINY_CLIP_CONFIG.read_text())
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    common = {
        "hidden_act": "quick_gelu",
        "projection_dim": cfg["embed_dim"],
        "num_hidden_layers": vision["layers"],
    }
    config = CLIPConfig(
        text_config=common
        | {
            "hidden_size": text["width"],
            "intermediate_size": 4 * text["width"],
            "num_attention_heads": text["heads"],
            "vocab_size": text["vocab_size"],
            "max_position_embeddings": text["context_length"],
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        },
        vision_config=common
        | {
            "hidden_size": vision["width"],
            "intermediate_size": 4 * vision["width"],
            "num_attention_heads": vision["width"] // vision["head_width"],
            "image_size": vision["image_size"],
            "patch_size": vision["patch_size"],
        },
        projection_dim=cfg["embed_dim"],
    )
    # Random towers mostly point apart (every score clamps to 0); with this seed and the image projection
    # flipped, the test pairs get positive cosines, so real numbers are compared (asserted in the test).
    torch.manual_seed(CROSS_CHECK_SEED)
    model = FeatureCLIP(config).eval()
    with torch.no_grad():
        model.visual_projection.weight.mul_(-1)
    checkpoint = tmp_path_factory.mktemp("clip") / "tiny-clip-from-transformers.pt"
    torch.save(_hf_to_open_clip(model.state_dict(), vision["layers"]), checkpoint)

    size = vision["image_size"]
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        ),
        tokenizer=CLIPTokenizer.from_pretrained(write_clip_tokenizer(checkpoint.parent / "tokenizer")),
    )
    return CLIPScore(model_name_or_path=lambda: (model, processor)), model, checkpoint


def _torchmetrics_scores(metric: object, images: list[Image.Image], prompts: list[str]) -> list[float]:
    """One (image, prompt) pair per update: torchmetrics' max(mean, 0) of one pair is max(cos, 0) * 100."""
    scores = []
    for image, prompt in zip(images, prompts, strict=True):
        metric.reset()
        metric.update(torch.from_numpy(np.array(image)).permute(2, 0, 1), prompt)
        scores.append(float(metric.compute()))
    return scores


@pytest.mark.parametrize(("size", "tolerance"), [((64, 64), 1e-3), ((96, 80), 0.05)])
def test_scorer_agrees_with_torchmetrics_on_the_same_weights(
    same_weights: tuple[object, object, Path], size: tuple[int, int], tolerance: float
) -> None:
    """At the model's input size preprocessing is exact; resized images differ only by interpolation."""
    metric, _, checkpoint = same_weights
    ours = ClipScorer(TINY_CLIP, str(checkpoint), device="cpu", batch_size=4)
    assert not ours.random_weights and ours.describe() == f"{TINY_CLIP} ({checkpoint.name})"
    images = _images(size, len(PROMPTS), seed=5)
    theirs = _torchmetrics_scores(metric, images, PROMPTS)
    assert min(theirs) > 1.0, "the cross-check must compare real (unclamped) scores"
    assert ours.score(images, PROMPTS) == pytest.approx(theirs, abs=tolerance)


def test_a_missing_checkpoint_file_is_named() -> None:
    with pytest.raises(FileNotFoundError, match="nope/clip.pt"):
        ClipScorer(TINY_CLIP, "/nope/clip.pt")


def test_tiny_scorer_range_batching_and_repeatability() -> None:
    scorer = tiny_scorer()
    assert scorer.random_weights and "random weights" in scorer.describe()
    images = _images((64, 64), 6, seed=1) + _images((100, 60), 2, seed=2)
    prompts = PROMPTS + PROMPTS[:2]
    scores = scorer.score(images, prompts)
    assert len(scores) == 8 and all(0.0 <= s <= 100.0 for s in scores)
    assert max(scores) > 0, "the tiny scorer's seed gives positive scores for typical images"
    one_by_one = ClipScorer(TINY_CLIP, None, device="cpu", batch_size=1).score(images, prompts)
    assert one_by_one == pytest.approx(scores, abs=1e-4), "same seed, same weights; batching changes nothing"
    with pytest.raises(ValueError, match="8 images but 7 prompts"):
        scorer.score(images, prompts[:7])
