"""Prompt sets: the built-in one, and user files (`.txt`, `.csv`/`.tsv` with a `Prompt` column, `.jsonl`).

`.txt`: one prompt per line (blank lines and `#` comments skipped). `.csv` / `.tsv`: a `Prompt` column,
and a `Category` column when present (the PartiPrompts TSV layout). `.jsonl`: one object per line with
`prompt` and optionally `category`.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

BUILTIN_FILE = Path(__file__).with_name("prompts_builtin.yaml")
DEFAULT_CATEGORY = "general"
SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl")


class PromptFileError(ValueError):
    """A prompt file that cannot be read; the message names the file (and line or column)."""


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str = DEFAULT_CATEGORY


def builtin_prompts() -> list[Prompt]:
    """The project's own prompt set (people, faces, hands, animals, objects, scenes, text, counting, spatial)."""
    import yaml

    data = yaml.safe_load(BUILTIN_FILE.read_text(encoding="utf-8"))
    return [Prompt(text, category) for category, group in data.items() for text in group["prompts"]]


def builtin_categories() -> dict[str, str]:
    """Category -> one line about what it tests (shown in the report)."""
    import yaml

    data = yaml.safe_load(BUILTIN_FILE.read_text(encoding="utf-8"))
    return {category: group["about"] for category, group in data.items()}


def load_prompts(path: str | Path) -> list[Prompt]:
    """Read a prompt file; raises `PromptFileError` naming the file and what is wrong."""
    file = Path(path).expanduser()
    suffix = file.suffix.lower()
    if suffix not in SUFFIXES:
        raise PromptFileError(
            f"prompt file {str(file)!r}: suffix {suffix!r} is not one of {', '.join(SUFFIXES)}"
        )
    try:
        text = file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptFileError(f"prompt file {str(file)!r}: {exc}") from exc
    if suffix == ".txt":
        prompts = _from_txt(text)
    elif suffix == ".jsonl":
        prompts = _from_jsonl(text, file)
    else:
        prompts = _from_table(text, file, delimiter="\t" if suffix == ".tsv" else ",")
    if not prompts:
        raise PromptFileError(f"prompt file {str(file)!r} holds no prompts")
    return prompts


def _from_txt(text: str) -> list[Prompt]:
    lines = (line.strip() for line in text.splitlines())
    return [Prompt(line) for line in lines if line and not line.startswith("#")]


def _from_table(text: str, file: Path, delimiter: str) -> list[Prompt]:
    rows = csv.DictReader(text.splitlines(), delimiter=delimiter)
    columns = {name.strip().lower(): name for name in rows.fieldnames or []}
    if "prompt" not in columns:
        raise PromptFileError(
            f"prompt file {str(file)!r}: no 'Prompt' column (columns: {', '.join(rows.fieldnames or []) or 'none'})"
        )
    prompt_col, category_col = columns["prompt"], columns.get("category")
    prompts = []
    for row in rows:
        prompt = (row.get(prompt_col) or "").strip()
        if prompt:
            category = (row.get(category_col) or "").strip() if category_col else ""
            prompts.append(Prompt(prompt, category or DEFAULT_CATEGORY))
    return prompts


def _from_jsonl(text: str, file: Path) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise PromptFileError(f"prompt file {str(file)!r} line {number}: not JSON ({exc})") from exc
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptFileError(
                f"prompt file {str(file)!r} line {number}: needs a non-empty string 'prompt', got {line.strip()[:80]!r}"
            )
        prompts.append(Prompt(prompt.strip(), str(record.get("category") or DEFAULT_CATEGORY).strip()))
    return prompts


def spread(prompts: Sequence[Prompt], limit: int | None) -> list[Prompt]:
    """At most `limit` prompts, taken in turn from each category so that every category is represented."""
    if limit is None or limit >= len(prompts):
        return list(prompts)
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    return in_turn(prompts)[:limit]


def in_turn(prompts: Sequence[Prompt]) -> list[Prompt]:
    """Every prompt, taken in turn from each category: any prefix represents the categories evenly."""
    groups: dict[str, list[Prompt]] = {}
    for prompt in prompts:
        groups.setdefault(prompt.category, []).append(prompt)
    return [p for row in zip_longest(*groups.values()) for p in row if p is not None]
