"""Does torch.compile work here? Compile and run a tiny function on a device; one JSON line, exit 0 when ok.

`python -m service.compile_check [--device cuda|cpu|auto]` prints
`{"ok": bool, "device": str, "torch": str, "error": str | null}`. The deploy runs it with the release's
python before anything is stopped; the service calls `compile_problem(device)` before it compiles.
(Minimal version from the `env` branch; the `svc` branch owns this module.)
"""

from __future__ import annotations

import argparse
import json
import sys


def resolve_device(device: str) -> str:
    """`auto` is CUDA when torch sees a GPU, else the CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def compile_problem(device: str) -> str | None:
    """None when a tiny function compiles and runs with torch.compile on `device`; else why not."""
    try:
        import torch

        def tiny(x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.gelu(x * 2.0 + 1.0).sum(dim=-1)

        x = torch.randn(4, 16, device=device)
        compiled = torch.compile(tiny, fullgraph=True)
        if not torch.allclose(compiled(x), tiny(x), atol=1e-4, rtol=1e-4):
            return "the compiled function gave a different result than eager"
    except Exception as exc:  # any failure means: serve uncompiled
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:500]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu", "auto"), default="auto")
    args = parser.parse_args(argv)
    torch_version = ""
    try:
        import torch

        torch_version = torch.__version__
        device = resolve_device(args.device)
        error = compile_problem(device)
    except Exception as exc:
        device, error = args.device, f"{type(exc).__name__}: {exc}"
    print(json.dumps({"ok": error is None, "device": device, "torch": torch_version, "error": error}))
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main())
