"""The plain-text summary printed last: every scenario's baseline beside the service, then the other targets."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from bench.mixed import mixed_lines
from bench.scenarios import SCENARIOS

if TYPE_CHECKING:
    from bench.harness import Results


def fmt(value: Any, unit: str = "s") -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if unit == "ms":
        return f"{value:.1f} ms"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "GiB":
        return f"{value:.2f} GiB"
    return f"{value:.3f} s"


def table(results: Results) -> str:
    """A plain-text summary: every scenario's baseline beside the service, then the other targets."""
    r = results
    lines = [f"card: {r.meta.get('gpu')}  torch {r.meta.get('torch')}  diffusers {r.meta.get('diffusers')}"]
    head = (
        f"{'scenario':24} {'plain fp16':>11} {'+slicing':>11} {'+PNG/b64':>11} {'svc eager':>11} "
        f"{'service e2e':>12} {'target':>8}  same-seed"
    )
    lines += [head, "-" * len(head)]
    for s in SCENARIOS:
        b = r.baseline.get(s.family, {}).get(s.name, {})
        plain = b.get("fp16_eager", {})
        sliced = b.get("fp16_eager_attention_vae_slicing", {})
        eager = r.eager.get(s.family, {}).get(s.name, {})
        svc = r.service.get(s.family, {}).get(s.name, {})
        if not (plain or svc):
            continue
        same = svc.get("same_seed_vs_eager")
        same_txt = "-"
        if same:
            verdict = {True: "ok", False: "FAIL", None: "(opt-in: changes images)"}[same["ok"]]
            same_txt = f"{same['psnr_db']} dB (dtype floor {same.get('dtype_floor_psnr_db')} dB) {verdict}"
        met = ""
        if svc.get("e2e_p50_s") is not None and s.target_p50_s:
            met = " met" if svc["e2e_p50_s"] <= s.target_p50_s else " MISSED"
        lines.append(
            f"{s.name:24} {fmt(plain.get('pipeline_p50_s')):>11} {fmt(sliced.get('pipeline_p50_s')):>11} "
            f"{fmt(plain.get('pipeline_plus_png_b64_p50_s')):>11} {fmt(eager.get('p50_s')):>11} "
            f"{fmt(svc.get('e2e_p50_s')):>12} {fmt(s.target_p50_s):>8}{met}  {same_txt}"
        )
    for key, svc in r.service.items():
        family, _, variant = key.partition(":")
        for s in SCENARIOS if variant else ():
            row, default = svc.get(s.name, {}), r.service.get(family, {}).get(s.name, {})
            if row.get("e2e_p50_s") is None:
                continue
            vs = ""
            if default.get("e2e_p50_s"):
                vs = f" ({default['e2e_p50_s'] / row['e2e_p50_s']:.2f}x the default service)"
            eager = (row.get("same_seed_vs_eager") or {}).get("psnr_db", "-")
            default_psnr = (row.get("same_seed_vs_default") or {}).get("psnr_db", "-")
            lines.append(
                f"{s.name} [{variant}]: e2e {fmt(row['e2e_p50_s'])}{vs}; same seed vs the default service "
                f"{default_psnr} dB, vs eager {eager} dB; options {svc.get('quality_options') or 'none'}"
            )
    lines.append("")
    for family, svc in r.service.items():
        cold = svc.get("cold_start", {})
        lines.append(
            f"{family}: cold start to ready {fmt(cold.get('ready_s'))} (warm-up/compile "
            f"{fmt(cold.get('warmup_compile_s'))}); health after: {svc.get('health_after', {}).get('vram_available')}"
        )
        conc = svc.get("concurrency")
        if conc:
            lines.append(
                f"{family}: {conc['clients']} clients {conc['concurrent_images_per_s']} img/s vs single "
                f"{conc['single_stream_images_per_s']} img/s = {fmt(conc['speedup'], 'x')} (target 1.30x); "
                f"{conc.get('coalesced_requests', 0)} requests coalesced, "
                f"{conc.get('mean_requests_per_call', 1)} per call"
            )
        peaks = [
            v.get("peak_vram_gib") for v in svc.values() if isinstance(v, dict) and v.get("peak_vram_gib")
        ]
        if peaks:
            lines.append(
                f"{family}: peak VRAM allocated per request {fmt(max(peaks), 'GiB')} (target 16 GiB)"
            )
    for key, rs in r.restart.items():
        warm = rs.get("warm_start", {})
        lines.append(
            f"{key}: restart to ready, warm cache {fmt(warm.get('ready_s'))} (target 60 s); "
            f"warm-up {fmt(warm.get('warmup_compile_s'))}"
        )
    for family, m in r.mixed.items():
        lines.extend(mixed_lines(family, m))
    enc = r.encode
    for name in ("noise", "smooth_plus_noise"):
        if name in enc:
            e = enc[name]
            lines.append(
                f"encode 1024 {name}: fast PNG+b64 {fmt(e['fast_png_b64_ms'], 'ms')}, Pillow level 1 "
                f"{fmt(e['pillow_level1_b64_ms'], 'ms')}, Pillow default {fmt(e['pillow_default_b64_ms'], 'ms')} "
                f"(target 40 ms)"
            )
    if r.pytest:
        lines.append(f"pytest -m gpu: rc={r.pytest.get('returncode')} {r.pytest.get('tail', [''])[-1]}")
    for err in r.errors:
        lines.append(f"ERROR {err}")
    return "\n".join(lines)
