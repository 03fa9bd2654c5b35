"""Evaluation of the deployed image service: CLIP scores, the SD1.5 vs SDXL comparison, regression history,
and the HTML quality report.

The deploy gate calls `evaluate_services(...)` and `quality_gate(result, margin)`.
"""

from __future__ import annotations

from evaluation.compare import (
    EvaluationResult,
    GenerationSettings,
    collect,
    evaluate_services,
    quality_gate,
    score_generations,
    summarize,
)
from evaluation.prompts import Prompt, builtin_prompts, load_prompts

__all__ = [
    "EvaluationResult",
    "GenerationSettings",
    "Prompt",
    "builtin_prompts",
    "collect",
    "evaluate_services",
    "load_prompts",
    "quality_gate",
    "score_generations",
    "summarize",
]
