"""Compiled modules saved whole, so that a restart loads them instead of tracing the model again.

`torch.compile` traces every compiled module again at each start, even when all of Inductor's kernels come
from the disk cache: for SDXL base + refiner that tracing (Dynamo's bytecode analysis and guard building,
~28 s) is most of a ~44 s warm-up (docs/BENCHMARKS.md). torch's ahead-of-time compile
(`torch.compile(..., fullgraph=True).aot_compile(...)`, torch >= 2.10, experimental) keeps what one such
compilation produced - the graph's bytecode, its guards and the compiled kernels - as one file that a later
process loads without tracing anything.

`SavedCompile` is a module's compiled call. Each input signature (the call's structure and every leaf's
shape, dtype, device, strides or value) gets its own compiled function, kept in the cache folder under a
name hashed from that signature, the module's structure and the versions; loaded or compiled on the first
call that needs it. Every call checks the function's guards, as torch.compile does; a call that none of
the loaded functions accepts compiles (and saves) another. The guards that cannot be saved (identities of
functions, classes and modules, and globals) are dropped: the file's name already covers what they check
(the module's code, layers and attention processors, and the torch / diffusers versions). A signature that
cannot be compiled whole or saved runs under plain `torch.compile` of the module, with a warning (torch
2.11 cannot save a UNet call that returns diffusers' output dataclass; the pipelines ask for tuples).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.mutation_guard import GenerationTracker
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the way functions are compiled or saved changes, so old files are not loaded
FOLDER = "saved"  # under the compile cache folder

Signature = tuple[str, tuple[tuple[Any, ...], ...]]


def available() -> bool:
    """Whether this torch can save and load compiled functions (torch >= 2.10)."""
    return hasattr(torch.compiler, "load_compiled_function") and hasattr(
        torch._dynamo.config, "enable_aot_compile"
    )


def signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Signature:
    """What one compiled function is specialised to: the call's structure and each leaf's static properties."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    # grad mode is guarded too: a call under another mode is another function, not a rejected file
    modes = f"grad={torch.is_grad_enabled()} inference={torch.is_inference_mode_enabled()}"
    return f"{spec} {modes}", tuple(_leaf(leaf) for leaf in leaves)


def _leaf(value: Any) -> tuple[Any, ...]:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), str(value.dtype), str(value.device), value.stride())
    return ("value", repr(value))


def structure(module: torch.nn.Module) -> str:
    """The module as far as its compiled code depends on it: class, layers, parameter shapes / dtypes /
    layouts, attention processors, the GPU generation and the versions (not the weights' values)."""
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


def _saveable_guards(entries: Sequence[Any]) -> list[bool]:
    """Keep the guards a saved function can carry (tensors' shapes, dtypes, strides; values; dict keys...);
    drop globals and identity checks, which the file's name covers instead, and every guard on something
    reached through a dropped one (e.g. a function's defaults under its dropped identity check)."""
    from torch._dynamo.guards import CheckFunctionManager

    unsaveable = set(CheckFunctionManager.UNSUPPORTED_SERIALIZATION_GUARD_TYPES)
    dropped = {
        entry.name
        for entry in entries
        if entry.is_global
        or entry.guard_type in unsaveable
        or unsaveable.intersection(entry.derived_guard_types or ())
    }

    def under_dropped(name: str) -> bool:
        return any(name.startswith(d) and name[len(d) : len(d) + 1] in (".", "[") for d in dropped)

    return [entry.name not in dropped and not under_dropped(entry.name) for entry in entries]


def _wrapped_functions(module: torch.nn.Module) -> dict[str, Any]:
    """The functions hidden under decorators of the module's `forward` (diffusers wraps the UNet's): they
    cannot be saved by name, so they are passed to the saved function as data, from the live class."""
    found: dict[str, Any] = {}
    fn = type(module).forward
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
        found[f"forward.__wrapped__.{len(found)}"] = fn
    return found


class SavedCompile:
    """A module's call, compiled whole once per input signature and kept on disk in `cache_dir`."""

    def __init__(self, module: torch.nn.Module, cache_dir: Path, label: str, mode: str) -> None:
        self.module = module
        self.cache_dir = cache_dir
        self.label = label
        self.mode = mode
        self._structure = hashlib.sha256(structure(module).encode()).hexdigest()
        self._external = _wrapped_functions(module)
        self._functions: list[Any] = []
        self._unsaveable: set[Signature] = set()  # signatures that run under plain torch.compile instead
        self._plain: Any = None
        self.compiled: list[str] = []  # files this process compiled and saved
        self.loaded: list[str] = []  # files this process loaded
        self.fallbacks: list[str] = []  # why a signature went to plain torch.compile

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # each call is a new invocation for the CUDA-graph trees, as torch.compile's own calls are: without it
        # the UNet's calls in one request become one ever longer path of graphs, each recorded on first use
        GenerationTracker.generation += 1
        for fn in self._functions:
            if fn.guard_check(self.module, *args, **kwargs):
                return fn(self.module, *args, **kwargs)
        key = signature(args, kwargs)
        if key not in self._unsaveable:
            fn = self._function_for(key, args, kwargs)
            if fn is not None:
                self._functions.append(fn)
                return fn(self.module, *args, **kwargs)
            self._unsaveable.add(key)
        if self._plain is None:
            self._plain = torch.compile(
                self.module._call_impl, mode=self.mode, fullgraph=False, dynamic=False
            )
        return self._plain(*args, **kwargs)

    def path_for(self, key: Signature) -> Path:
        digest = hashlib.sha256(f"{self._structure}\n{self.mode}\n{key!r}".encode()).hexdigest()[:24]
        return self.cache_dir / f"{self.label}-{digest}.bin"

    def _function_for(self, key: Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The saved function for this call (loaded, or compiled and saved); None if it cannot be saved."""
        path = self.path_for(key)
        if path.is_file():
            fn = self._load(path)
            if fn is not None and fn.guard_check(self.module, *args, **kwargs):
                return fn
            if fn is not None:
                log.warning(
                    "saved compile: %s: %s does not accept this call; compiling it again",
                    self.label,
                    path.name,
                )
        try:
            return self._compile(path, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure here leaves plain torch.compile, which works
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            self.fallbacks.append(reason)
            log.warning(
                "saved compile: %s cannot be compiled whole and saved for this call (%s); "
                "plain torch.compile runs it",
                self.label,
                reason,
            )
            return None

    def _load(self, path: Path) -> Any:
        started = time.perf_counter()
        try:
            # the compile mode's Inductor options (CUDA graphs) are read when the function is loaded, not saved
            with (
                path.open("rb") as file,
                torch._inductor.config.patch(torch._inductor.list_mode_options(self.mode)),
            ):
                fn = torch.compiler.load_compiled_function(file, external_data=self._external)
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign file is compiled again
            log.warning(
                "saved compile: %s: cannot load %s (%s); compiling it again", self.label, path.name, exc
            )
            return None
        fn.disable_guard_check()  # checked by __call__ before each call
        self.loaded.append(path.name)
        log.info(
            "saved compile: %s loaded %s in %.1f s", self.label, path.name, time.perf_counter() - started
        )
        return fn

    def _compile(self, path: Path, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Compile the module whole for this call's inputs and save it to `path` (written whole or not at all)."""
        log.info(
            "saved compile: compiling %s for a new input signature (minutes for a full-size model)",
            self.label,
        )
        started = time.perf_counter()
        options = {**torch._inductor.list_mode_options(self.mode), "guard_filter_fn": _saveable_guards}
        with torch._dynamo.config.patch(enable_aot_compile=True):
            compiled = torch.compile(self.module.forward, fullgraph=True, dynamic=False, options=options)
        fn = compiled.aot_compile((args, kwargs))
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.partial-{os.getpid()}")
        try:
            fn.save_compiled_function(str(partial), external_data=self._external)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        fn.disable_guard_check()
        self.compiled.append(path.name)
        log.info(
            "saved compile: %s compiled and saved %s in %.1f s",
            self.label,
            path.name,
            time.perf_counter() - started,
        )
        return fn


def saved_compile(module: torch.nn.Module, cache_dir: Path, label: str, mode: str) -> SavedCompile:
    """Make `module`'s calls go through a `SavedCompile` (as `module.compile()` would through torch.compile)."""
    call = SavedCompile(module, cache_dir, label, mode)
    module._compiled_call_impl = call
    return call
