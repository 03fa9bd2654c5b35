"""The self-contained HTML report of a run directory: verdict and gate table first, then speed and cost,
charts, categories, the history trend, and every prompt's images side by side with their scores.

Everything is inside the one file (images as base64 data URIs, charts as inline SVG images rendered with
matplotlib), so it opens from disk with nothing else running. Thumbnails link to the full-size images in
the run directory. `comparison` and `regression` build the template's context of each kind of run,
`charts` draws the figures, `parts` holds what both share.
"""

from __future__ import annotations

from pathlib import Path

from evaluation.report.comparison import comparison_context
from evaluation.report.regression import regression_context
from evaluation.results import REGRESSION_FILE, REPORT_FILE, RESULT_FILE

TEMPLATE = "report.html.jinja"

__all__ = ["render_report"]


def render_report(run_dir: str | Path, history_file: str | Path | None = None) -> Path:
    """Write `<run_dir>/report.html` for an evaluation or a regression run directory; return its path."""
    import jinja2

    run_dir = Path(run_dir)
    if (run_dir / RESULT_FILE).is_file():
        context = comparison_context(run_dir, history_file)
    elif (run_dir / REGRESSION_FILE).is_file():
        context = regression_context(run_dir, history_file)
    else:
        raise FileNotFoundError(
            f"{run_dir} holds neither {RESULT_FILE} nor {REGRESSION_FILE}: not a run directory"
        )
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    path = run_dir / REPORT_FILE
    path.write_text(env.get_template(TEMPLATE).render(**context), encoding="utf-8")
    return path
