"""Does torch.compile work here? Compile and run a tiny function the way the service compiles its models.

The service runs `compile_problem` before it compiles anything (a problem turns compile off for the process
and becomes a start-up warning); preflight runs `python -m service.compile_check [--device cuda|cpu|auto]`,
which prints one JSON line `{"ok", "device", "torch", "error"}` and exits 0 when ok, 1 otherwise.

Each check compiles new code (a fresh constant in the function), so a kernel cached on disk by an earlier
run cannot hide a compiler that no longer works. It compiles in Inductor's default mode on every device: what
fails on a box is the compiler toolchain (Triton and Inductor need a C compiler), which every mode uses, while a
CUDA graph recorded by the check would join the calling thread's CUDA-graph tree beside the models' graphs.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys

import torch

_known: dict[tuple[str, str], str | None] = {}  # (device, mode) -> the problem, checked once per process


def compile_problem(device: str | torch.device, mode: str = "default") -> str | None:
    """None when torch.compile (Inductor, static shapes, `mode`) compiles and runs a tiny function on `device`
    with eager's result; else what went wrong, in one line. Checked once per process, device and mode."""
    device = torch.device(device)
    key = (str(device), mode)
    if key not in _known:
        _known[key] = _check(device, mode)
    return _known[key]


def _check(device: torch.device, mode: str) -> str | None:
    salt = secrets.randbelow(1_000_000) + 1  # new code each time: nothing cached on disk answers for it

    def tiny(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(x @ w + salt * 1e-6).sum(dim=-1)

    try:
        generator = torch.Generator("cpu").manual_seed(0)
        x = torch.randn(4, 16, generator=generator).to(device)
        w = torch.randn(16, 16, generator=generator).to(device)
        compiled = torch.compile(tiny, mode=mode, fullgraph=True, dynamic=False)
        with torch.no_grad():
            expected = tiny(x, w)
            got = compiled(x, w)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-3)
    except Exception as exc:  # noqa: BLE001 - any failure is the answer
        return _one_line(exc)
    return None


def _one_line(exc: BaseException) -> str:
    """`Type: message`, first non-empty line of the message, at most 300 characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.compile_check", description=__doc__)
    parser.add_argument("--device", choices=("cuda", "cpu", "auto"), default="auto")
    args = parser.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        error: str | None = "no CUDA GPU is visible to torch"
    else:
        error = compile_problem(device)
    print(json.dumps({"ok": error is None, "device": device, "torch": torch.__version__, "error": error}))
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main())
