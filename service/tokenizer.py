"""An offline CLIP BPE tokenizer, converted from the vocabulary open_clip ships with its wheel.

The hub's `openai/clip-vit-large-patch14` tokenizer (used by SD1.5 and both SDXL text encoders) is the same
BPE as open_clip's `bpe_simple_vocab_16e6.txt.gz`: 256 byte characters, the same with `</w>`, the 48,894
merges, then `<|startoftext|>` and `<|endoftext|>`, 49,408 tokens in all. Ids equal `open_clip.tokenize`.
Only open_clip's data file is read, open_clip itself is not imported (a second of imports, and a GPU box that
carries open_clip as a `--no-deps` wheel lacks its dependencies).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
from pathlib import Path

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
BOS_TOKEN_ID, EOS_TOKEN_ID = CLIP_VOCAB_SIZE - 2, CLIP_VOCAB_SIZE - 1

_NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2
_TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": CLIP_MAX_LENGTH,
    "bos_token": BOS_TOKEN,
    "eos_token": EOS_TOKEN,
    "unk_token": EOS_TOKEN,
    "pad_token": EOS_TOKEN,
    "do_lower_case": True,
    "add_prefix_space": False,
    "errors": "replace",
}


def _open_clip_bpe_file() -> Path:
    """open_clip's bundled BPE merges file, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip_torch is not installed: its bpe_simple_vocab_16e6.txt.gz is needed")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


@functools.cache
def _converted_files() -> dict[str, str]:
    """File name -> text of the converted tokenizer (built once per process, ~0.3 s)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    bpe_file = _open_clip_bpe_file()
    lines = gzip.decompress(bpe_file.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]  # line 0 is a version header
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    if len(tokens) != CLIP_VOCAB_SIZE or len(set(tokens)) != CLIP_VOCAB_SIZE:
        raise RuntimeError(
            f"open_clip's BPE file {bpe_file} gave {len(tokens)} tokens, not {CLIP_VOCAB_SIZE}"
        )
    return {
        "vocab.json": json.dumps({token: i for i, token in enumerate(tokens)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(_TOKENIZER_CONFIG, indent=2),
    }


def write_clip_tokenizer(out_dir: Path) -> Path:
    """Write a CLIP tokenizer folder that `CLIPTokenizer.from_pretrained(out_dir)` loads; return `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in _converted_files().items():
        (out_dir / name).write_text(text, encoding="utf-8")
    return out_dir
