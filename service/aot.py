"""Ahead-of-time compiled modules: torch.export + AOTInductor packages, kept on disk and loaded at a restart.

`torch.compile` traces every module again at each start (Dynamo, then the cache lookups), even when all its
kernels are cached: for SDXL base + refiner that is most of a ~44 s warm-up (docs/BENCHMARKS.md). An
AOTInductor package is the compiled module itself (a shared library and its kernels); loading one takes
seconds and traces nothing.

`AotForward` replaces a module's `forward`. Each input signature (the call's structure, every tensor's
shape, dtype, device and strides, every other argument's value) gets its own package, compiled on the first
call that needs it and kept in the cache folder under a name hashed from the signature and the module's
structure (its code, layers, parameter shapes and layouts, attention processors) and the torch / diffusers
versions: another model of the same architecture reuses it, anything else compiles its own. The weights
stay out of the package: the module's own parameters are bound to it, not copied, so the GPU holds one
copy and a fine-tune of the same architecture needs no new package.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the way packages are made changes, so old ones are not loaded
# Weights are bound at load (user-managed), not baked into the shared library
INDUCTOR_CONFIGS: dict[str, Any] = {"aot_inductor.package_constants_in_so": False, "conv_1x1_as_mm": True}

Signature = tuple[str, tuple[tuple[Any, ...], ...]]


def signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Signature:
    """What a compiled package is specialised to: the call's structure and each leaf's static properties."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    return str(spec), tuple(_leaf(leaf) for leaf in leaves)


def _leaf(value: Any) -> tuple[Any, ...]:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype), str(value.device), value.stride())
    return ("value", repr(value))


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor, copied if its data is not 16-byte aligned (compiled kernels assume it; a pipeline's
    timestep is often an element of the scheduler's timesteps, at any offset)."""
    return tensor if tensor.data_ptr() % 16 == 0 else tensor.clone()


def structure(module: torch.nn.Module) -> str:
    """The module's architecture as text: class, layers, parameter shapes / dtypes / layouts, attention
    processors, and the versions that compiled it (what a package depends on, the weights' values aside)."""
    import diffusers

    tensors = [
        f"{name}:{tuple(t.shape)}:{t.dtype}:{t.stride()}"
        for name, t in (*module.named_parameters(), *module.named_buffers())
    ]
    processors = getattr(module, "attn_processors", {})
    device = next(module.parameters()).device
    gpu = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return "\n".join(
        [
            f"format={FORMAT} torch={torch.__version__} diffusers={diffusers.__version__} gpu={gpu}",
            f"{type(module).__module__}.{type(module).__qualname__}",
            repr(module),
            *tensors,
            *(f"{name}={type(p).__name__}" for name, p in sorted(processors.items())),
        ]
    )


class AotForward:
    """A module's `forward`, run by AOTInductor packages (one per input signature) kept in `cache_dir`."""

    def __init__(self, module: torch.nn.Module, cache_dir: Path, label: str) -> None:
        self.module = module
        self.cache_dir = cache_dir
        self.label = label
        self._structure = hashlib.sha256(structure(module).encode()).hexdigest()
        self._runners: dict[Signature, Any] = {}
        self.compiled: list[str] = []  # packages this process compiled (the others were loaded from disk)
        self.loaded: list[str] = []
        self.__signature__ = inspect.signature(
            module.forward
        )  # callers that inspect forward see the real one

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = pytree.tree_map_only(torch.Tensor, _aligned, (args, kwargs))
        key = signature(args, kwargs)
        runner = self._runners.get(key)
        if runner is None:
            runner = self._runners[key] = self._runner(key, args, kwargs)
        return runner(*args, **kwargs)

    def package_path(self, key: Signature) -> Path:
        digest = hashlib.sha256(f"{self._structure}\n{key!r}".encode()).hexdigest()[:24]
        return self.cache_dir / f"{self.label}-{digest}.pt2"

    def _runner(self, key: Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        path = self.package_path(key)
        if not path.is_file():
            self._compile(path, args, kwargs)
        started = time.perf_counter()
        runner = torch._inductor.aoti_load_package(str(path))
        tensors = {**dict(self.module.named_parameters()), **dict(self.module.named_buffers())}
        runner.load_constants(
            {name: tensors[name] for name in runner.get_constant_fqns()},
            check_full_update=True,
            user_managed=True,
        )
        self.loaded.append(path.name)
        log.info("aot: %s loaded %s in %.1f s", self.label, path.name, time.perf_counter() - started)
        return runner

    def _compile(self, path: Path, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Export the module for these inputs and compile it to `path` (written whole or not at all)."""
        log.info("aot: compiling %s for a new input signature (minutes for a full-size model)", self.label)
        started = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        with _eager_forward(self.module):
            program = torch.export.export(self.module, args, kwargs, strict=False)
        exported = time.perf_counter()
        partial = path.with_name(f"{path.stem}.partial-{os.getpid()}.pt2")
        try:
            torch._inductor.aoti_compile_and_package(
                program, package_path=str(partial), inductor_configs=INDUCTOR_CONFIGS
            )
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        self.compiled.append(path.name)
        log.info(
            "aot: %s compiled %s: export %.1f s, AOTInductor %.1f s",
            self.label,
            path.name,
            exported - started,
            time.perf_counter() - exported,
        )


@contextmanager
def _eager_forward(module: torch.nn.Module) -> Iterator[None]:
    """The module's class `forward` while exporting (the instance's AotForward set aside)."""
    override = module.__dict__.pop("forward")
    try:
        yield
    finally:
        module.forward = override


def compile_ahead(module: torch.nn.Module, cache_dir: Path, label: str) -> AotForward:
    """Run `module` through AOTInductor packages from now on (compiled on first use, kept in `cache_dir`)."""
    aot = AotForward(module, cache_dir, label)
    module.forward = aot
    return aot


def aot_forward(module: torch.nn.Module) -> AotForward | None:
    """The module's AotForward, if `compile_ahead` set one."""
    forward = module.__dict__.get("forward")
    return forward if isinstance(forward, AotForward) else None
