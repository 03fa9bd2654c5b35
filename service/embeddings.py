"""Text embeddings for the pipeline calls: each distinct text encoded once, kept, and passed as embeddings.

Apps send the same negative prompt with nearly every request (or none, and SD1.5 then encodes the empty
text), and often the same prompt many times. Each text is encoded alone by the pipeline's own
`encode_prompt` (the same tokenizer, truncation and hidden-state choice as when diffusers gets the text) and
kept in a small least-recently-used store (setting `prompt_cache_size`), so a request pays only for texts
not seen lately. Encoding one text at a time also gives a compiled text encoder a single input shape.

The only rule repeated from diffusers is which negative an absent negative prompt means: SDXL pipelines with
`force_zeros_for_empty_prompt` (the base) use zeros, the others the empty text.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

_Encoded = tuple[torch.Tensor, torch.Tensor | None]  # (hidden states 1 x 77 x C, pooled 1 x P or None)


class TextEmbeddings:
    """Encodes texts with a pipeline's text encoder(s) and keeps the last `cache_size` of them (0 = none)."""

    def __init__(self, cache_size: int) -> None:
        self.cache_size = cache_size
        self._kept: OrderedDict[tuple[int, int, str], _Encoded] = OrderedDict()
        self.hits = self.misses = 0

    def call_kwargs(
        self, pipe: Any, prompts: list[str], negatives: list[str] | None, *, guided: bool
    ) -> dict[str, torch.Tensor]:
        """The embedding arguments of one pipeline call with one image per entry of `prompts` (with
        `num_images_per_prompt=1`): what the pipeline would have computed from the texts. `negatives`: one
        per image, or None for no negative prompt; they are used only when `guided` (CFG on)."""
        embeds, pooled = self._stack(pipe, prompts)
        kwargs = {"prompt_embeds": embeds}
        if pooled is not None:
            kwargs["pooled_prompt_embeds"] = pooled
        if not guided:
            return kwargs
        if negatives is None and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            negative, negative_pooled = torch.zeros_like(embeds), None
            if pooled is not None:
                negative_pooled = torch.zeros_like(pooled)
        else:
            negative, negative_pooled = self._stack(pipe, negatives or [""] * len(prompts))
        kwargs["negative_prompt_embeds"] = negative
        if negative_pooled is not None:
            kwargs["negative_pooled_prompt_embeds"] = negative_pooled
        return kwargs

    def _stack(self, pipe: Any, texts: list[str]) -> _Encoded:
        """Each text's embeddings, one row per text (a text repeated in the batch is encoded once)."""
        encoded = {text: self._encode(pipe, text) for text in dict.fromkeys(texts)}
        hidden = torch.cat([encoded[text][0] for text in texts])
        pooled = [p for text in texts if (p := encoded[text][1]) is not None]  # SDXL's; none for SD1.5
        return hidden, torch.cat(pooled) if pooled else None

    def _encode(self, pipe: Any, text: str) -> _Encoded:
        # keyed by the encoders, not the pipeline: the hires img2img pipeline shares the base's encoders
        key = (id(getattr(pipe, "text_encoder", None)), id(getattr(pipe, "text_encoder_2", None)), text)
        if key in self._kept:
            self.hits += 1
            self._kept.move_to_end(key)
            return self._kept[key]
        self.misses += 1
        with torch.no_grad():  # as inside the pipeline's call: no autograd graph (CUDA graphs need none)
            out = pipe.encode_prompt(
                prompt=text,
                device=pipe._execution_device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
        # copies: a text encoder compiled with CUDA graphs overwrites its outputs at its next call
        hidden = out[0].clone()
        pooled = out[2].clone() if len(out) == 4 else None  # SDXL pipelines: (embeds, negative, pooled, ...)
        if self.cache_size > 0:
            self._kept[key] = (hidden, pooled)
            if len(self._kept) > self.cache_size:
                self._kept.popitem(last=False)
        return hidden, pooled

    def stats(self) -> dict[str, int]:
        """Texts kept, and how many encodings were served from the store or computed."""
        return {"kept": len(self._kept), "size": self.cache_size, "hits": self.hits, "misses": self.misses}
