"""The mixed-size table of `bench-gpu --mixed` (bench/mixed.py): the compile step, every request against its
size's uncompiled time, and the worst one against 0.6x."""

from __future__ import annotations

from bench.mixed import MIXED_SIZES, mixed_lines


def _request(size: str, seconds: float, uncompiled: int = 0) -> dict[str, object]:
    return {"size": size, "e2e_s": seconds, "uncompiled_calls_after": uncompiled}


def test_the_issues_sizes_in_its_order() -> None:
    assert MIXED_SIZES == ((1024, 1024), (512, 512), (832, 1216), (1216, 832), (768, 1344))


def test_the_table_shows_every_request_and_judges_the_worst() -> None:
    mixed = {
        "uncompiled_s": {"1024x1024": 2.0, "512x512": 1.0},
        "requests": [_request("1024x1024", 0.8), _request("512x512", 0.7, uncompiled=30)],
        "compile_step": {
            "wall_s": 300.0,
            "compile_s": 280.0,
            "peak_vram_gb": 9.5,
            "compiled": 2,
            "reused": 0,
            "functions": [
                {"module": "unet", "covers": "2x4x128x128"},
                {"module": "unet", "covers": "2x4xHxW"},
            ],
        },
        "restart": {"ready_s": 12.5},
    }
    text = "\n".join(mixed_lines("sdxl", mixed))
    assert text.startswith("sdxl (base only): mixed sizes")
    assert (
        "compile step 300.0 s in 1 process(es) (compiling 280.0 s), peak GPU memory 9.5 GiB (summed over "
        "processes): 2 built, 0 reused" in text
    )
    assert "unet 2x4x128x128, unet 2x4xHxW" in text and "restart to ready 12.5 s" in text
    assert "x0.40" in text and "x0.70" in text and "  30" in text
    assert "worst request: 512x512 at x0.70 its uncompiled time (target <= 0.6): OVER" in text
    mixed["requests"] = mixed["requests"][:1]
    assert "worst request: 1024x1024 at x0.40 its uncompiled time (target <= 0.6): ok" in "\n".join(
        mixed_lines("sdxl", mixed)
    )
