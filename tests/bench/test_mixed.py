"""The mixed-size table of `bench-gpu --mixed` (bench/mixed.py): every request against 2x its size's
uncompiled time, and the worst one."""

from __future__ import annotations

from bench.mixed import MIXED_SIZES, mixed_lines


def _request(size: str, seconds: float, compiling: int = 0) -> dict[str, object]:
    return {"size": size, "phase": "after the start", "e2e_s": seconds, "compiling_after": ["x"] * compiling}


def test_the_issues_sizes_in_its_order() -> None:
    assert MIXED_SIZES == ((1024, 1024), (512, 512), (832, 1216), (1216, 832), (768, 1344))


def test_the_table_shows_every_request_and_judges_the_worst() -> None:
    mixed = {
        "uncompiled_s": {"1024x1024": 2.0, "512x512": 1.0},
        "requests": [_request("1024x1024", 1.0), _request("512x512", 2.5, compiling=1)],
        "compiles_done_s": 90.0,
    }
    text = "\n".join(mixed_lines("sdxl", mixed))
    assert "x0.50" in text and "x2.50" in text
    assert "worst request: 512x512 at x2.50" in text and "OVER" in text
    mixed["requests"] = mixed["requests"][:1]
    assert "worst request: 1024x1024 at x0.50 its uncompiled time (target <= 2): ok" in "\n".join(
        mixed_lines("sdxl", mixed)
    )
