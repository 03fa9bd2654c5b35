"""Evaluation of the deployed image service: CLIP scores, the SD1.5 vs SDXL comparison, regression history,
and the HTML quality report.

One module per concern, imported from where it lives (this package re-exports nothing, so importing one
module never loads the rest): `results` (the result models, the run directory's files), `collect`
(prompts and seeds sent to a service over HTTP), `clip_score` (the scorer), `compare` (statistics and the
quality gate), `report` (the HTML report), `evaluate` (the whole comparison of two services),
`regression` (the regression benchmark), with `prompts`, `stats`, `metrics` and `history` below them.
The deploy gate calls `evaluate.evaluate_services(...)` (or its parts) and `compare.quality_gate(result,
margin)`.
"""
