"""Compiled modules built by a compile step and only loaded by the serving process.

`torch.compile` in a serving process holds the GPU worker for minutes at every size it has not seen (the
compile holds the GIL that the request needs at each of the UNet's ~2000 ops: 117 s for a 512 px SDXL request
on an H200, docs/BENCHMARKS.md). So compiling is a build step: `sdxl-deploy serve --compile-only`
(`service/compile_step.py`) loads the model in a process of its own, compiles each module's calls with torch's
ahead-of-time compile (`torch.compile(..., fullgraph=True).aot_compile(...)`, torch >= 2.10) and saves each
function - its bytecode, guards and kernels - as one file; the service loads the files (seconds) and never
compiles after `/ready`. Several step processes may build into one folder side by side (`compile_jobs`): each
function is claimed by the first process to reach it (a lock beside its file), and the others run that call
uncompiled and go on to the next unclaimed one.

`SavedCompile` is a module's compiled call. Two kinds of function:
- static, one per input signature (the call's structure and every leaf's shape, dtype, device, strides or
  value) that the warm-up generations make: the default size, each coalesced batch, the `ready_sizes`;
- dynamic, one per call form of a one-image generation: the latent's height and width are symbolic
  (`maybe_mark_dynamic`), so one function serves every size its guards accept (multiples of the UNet's
  down-sampling factor) at compiled speed from the first request (within ~1.2x of a static function on an
  H100, docs/BENCHMARKS.md).
Each call tries the static functions, then the dynamic ones, by their guards. A call that none accepts (an
odd latent, a batch the step did not build) runs the module uncompiled, is logged once per shape and counted
(`uncompiled_calls`, `/metrics`); it is never compiled in the serving process.

Files live in the cache folder, named `<label>-<module key>-<signature key>.bin` with a `.json` beside each
that says what it covers. The module key hashes what the compiled code depends on - the module's code,
layers, parameter shapes and dtypes, attention processors, GPU generation, torch and diffusers versions and
the compile mode - and not the weights' values, which the function reads at call time: a release that
changes none of these reuses the files. The guards that cannot be saved (identities of functions, classes
and modules, and globals) are dropped: the module key covers what they check. A file that cannot be loaded
(damaged, foreign) is skipped by the service with a warning and built again by the next compile step.
A signature that cannot be compiled whole or saved runs under plain `torch.compile` in the compile step and
stays uncompiled in the service, with the reason (torch 2.11 cannot save a UNet call that returns diffusers'
output dataclass; the pipelines ask for tuples).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.mutation_guard import GenerationTracker
from torch.utils import _pytree as pytree

log = logging.getLogger(__name__)

FORMAT = 2  # bump when the way functions are compiled or saved changes, so old files are not loaded
FOLDER = "saved"  # under the compile cache folder

Signature = tuple[str, tuple[tuple[Any, ...], ...]]


class ClaimedElsewhere(Exception):
    """Another process of the compile step is building this function."""


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


def describe(label: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """A signature as /health names it: the label and the first tensor's shape, e.g. "unet 2x4x128x128"."""
    tensor = _first_tensor(args, kwargs)
    return label if tensor is None else f"{label} {'x'.join(map(str, tensor.shape))}"


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    return next((x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)), None)


def dynamic_signature(key: Signature) -> Signature:
    """The call form of a signature: the first tensor's height and width (and the strides they set) open."""
    structure_, leaves = key
    opened = list(leaves)
    for index, leaf in enumerate(leaves):
        if leaf[0] == "tensor":
            if len(leaf[1]) == 4:
                shape = (*leaf[1][:2], "H", "W")
                opened[index] = ("tensor", shape, leaf[2], leaf[3], "any")
            break
    return structure_, tuple(opened)


@dataclass(frozen=True)
class Function:
    """One compiled function of a module, and what it covers ("2x4x64x64", or "2x4xHxW" when dynamic)."""

    fn: Any
    file: str
    covers: str
    dynamic: bool
    source: str  # "loaded" (from disk) or "compiled" (by this process)


class SavedCompile:
    """A module's call through compiled functions kept on disk in `cache_dir` (module doc).

    `build`: calls with no function compile (or load) a static one and save it, and `build_dynamic()` adds
    the dynamic ones (the compile step, `service/compile_step.py`). Not building (the service): every file
    of this module is loaded at once, and a call no function accepts runs uncompiled.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        cache_dir: Path,
        label: str,
        mode: str,
        name: str | None = None,
        *,
        build: bool = False,
    ) -> None:
        self.module = module
        self.cache_dir = cache_dir
        self.label = label
        self.name = name or label  # what /health calls it ("refiner unet"); files are named by `label`
        self.mode = mode
        self.build = build
        self.recording = False  # building: keep each new call form for `build_dynamic` (one-image runs)
        self.forms: dict[Signature, tuple[tuple[Any, ...], dict[str, Any], bool]] = {}  # + its grad mode
        self.functions: list[Function] = []
        self.uncompiled: dict[str, int] = {}  # shape -> calls run uncompiled (no function accepted them)
        self.problems: list[str] = []  # files that could not be loaded, signatures that could not be saved
        self._key = hashlib.sha256(f"{structure(module)}\n{mode}".encode()).hexdigest()[:16]
        self._external = _wrapped_functions(module)
        self._unsaveable: set[Signature] = set()  # signatures that run under plain torch.compile instead
        self._plain: Any = None
        if not build:
            self.load_all()

    # ----- what it holds -------------------------------------------------------------------------

    @property
    def compiled(self) -> list[str]:
        """Files this process compiled and saved."""
        return [f.file for f in self.functions if f.source == "compiled"]

    @property
    def loaded(self) -> list[str]:
        """Files this process loaded."""
        return [f.file for f in self.functions if f.source == "loaded"]

    @property
    def uncompiled_calls(self) -> int:
        return sum(self.uncompiled.values())

    def covers(self) -> list[str]:
        """What each function covers, as /health lists it: "unet 2x4x64x64", "unet 2x4xHxW"."""
        return [f"{self.name} {f.covers}" for f in self.functions]

    # ----- calls ---------------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # each call is a new invocation for the CUDA-graph trees, as torch.compile's own calls are: without it
        # the UNet's calls in one request become one ever longer path of graphs, each recorded on first use
        GenerationTracker.generation += 1
        for function in self.functions:  # static ones first (exact), then dynamic
            if function.fn.guard_check(self.module, *args, **kwargs):
                return function.fn(self.module, *args, **kwargs)
        if not self.build:  # serving: never compile; this shape runs uncompiled
            shape = describe(self.name, args, kwargs)
            if shape not in self.uncompiled:
                log.warning("saved compile: no compiled function accepts %s: it runs uncompiled", shape)
            self.uncompiled[shape] = self.uncompiled.get(shape, 0) + 1
            return self.module._call_impl(*args, **kwargs)
        key = signature(args, kwargs)
        form = dynamic_signature(key)
        if self.recording and form not in self.forms:
            copied = pytree.tree_map(_copy, (args, kwargs))
            self.forms[form] = (*copied, torch.is_grad_enabled())
        if key not in self._unsaveable:
            try:
                function = self._function_for(key, args, kwargs, dynamic=False)
            except ClaimedElsewhere:  # its builder saves it; this warm-up call need not wait
                return self.module._call_impl(*args, **kwargs)
            if function is not None:
                self._add(function)
                return function.fn(self.module, *args, **kwargs)
            self._unsaveable.add(key)
        if self._plain is None:
            self._plain = torch.compile(
                self.module._call_impl, mode=self.mode, fullgraph=False, dynamic=False
            )
        return self._plain(*args, **kwargs)

    def build_dynamic(self) -> list[Function]:
        """Building: one dynamic-shape function for each call form recorded (loaded when its file is good)."""
        built = []
        for form, (args, kwargs, grad) in list(self.forms.items()):
            example, marked = _open_example(args, kwargs, mark=False), _open_example(args, kwargs, mark=True)
            if example is None or marked is None:
                continue
            try:
                with torch.set_grad_enabled(grad):  # as the call was made (the pipelines run under no_grad)
                    # a saved function's guards refuse a tensor marked dynamic: the file is checked with a plain one
                    function = self._function_for(form, *example, dynamic=True, compile_with=marked)
            except ClaimedElsewhere:
                continue
            if function is not None:
                self._add(function)
                built.append(function)
        return built

    def _add(self, function: Function) -> None:
        self.functions.append(function)
        self.functions.sort(key=lambda f: f.dynamic)  # static first: they are exact and fastest

    # ----- files ---------------------------------------------------------------------------------

    def path_for(self, key: Signature) -> Path:
        digest = hashlib.sha256(repr(key).encode()).hexdigest()[:16]
        return self.cache_dir / f"{self.label}-{self._key}-{digest}.bin"

    def load_all(self) -> None:
        """Load every saved function of this module (the service's start); a bad file is skipped, said why."""
        for path in sorted(self.cache_dir.glob(f"{self.label}-{self._key}-*.bin")):
            about = _read_about(path)
            function = self._load(path, about)
            if function is None:
                continue
            self._add(function)

    def _function_for(
        self,
        key: Signature,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        dynamic: bool,
        compile_with: tuple[tuple[Any, ...], dict[str, Any]] | None = None,
    ) -> Function | None:
        """The saved function for this call (loaded, or compiled and saved: from `compile_with`'s inputs when
        given); None if it cannot be saved; `ClaimedElsewhere` while another step process builds it."""
        path = self.path_for(key)
        with _claim(path):
            return self._load_or_compile(path, args, kwargs, dynamic=dynamic, compile_with=compile_with)

    def _load_or_compile(
        self,
        path: Path,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        dynamic: bool,
        compile_with: tuple[tuple[Any, ...], dict[str, Any]] | None,
    ) -> Function | None:
        if path.is_file():
            function = self._load(path, _read_about(path))
            if function is not None and function.fn.guard_check(self.module, *args, **kwargs):
                return function
            if function is not None:
                log.warning(
                    "saved compile: %s: %s does not accept this call; compiling it again",
                    self.label,
                    path.name,
                )
        try:
            return self._compile(path, *(compile_with or (args, kwargs)), dynamic=dynamic)
        except Exception as exc:  # noqa: BLE001 - any failure here leaves plain torch.compile, which works
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            self.problems.append(
                f"{describe(self.name, args, kwargs)}: cannot be compiled whole and saved ({reason})"
            )
            log.warning(
                "saved compile: %s cannot be compiled whole and saved for this call (%s)%s",
                self.label,
                reason,
                "" if dynamic else "; plain torch.compile runs it",
            )
            return None

    def _load(self, path: Path, about: dict[str, Any] | None) -> Function | None:
        started = time.perf_counter()
        try:
            if about is None:
                raise ValueError("its description (.json) is missing or unreadable")
            # the compile mode's Inductor options (CUDA graphs) are read when the function is loaded, not saved
            with (
                path.open("rb") as file,
                torch._inductor.config.patch(torch._inductor.list_mode_options(self.mode)),
            ):
                fn = torch.compiler.load_compiled_function(file, external_data=self._external)
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign file is built again by the compile step
            problem = f"{path.name}: cannot be loaded ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})"
            self.problems.append(problem)
            log.warning("saved compile: %s: %s; the compile step builds it again", self.label, problem)
            return None
        fn.disable_guard_check()  # checked by __call__ before each call
        log.info(
            "saved compile: %s loaded %s in %.1f s", self.label, path.name, time.perf_counter() - started
        )
        return Function(fn, path.name, str(about["covers"]), bool(about["dynamic"]), "loaded")

    def _compile(
        self, path: Path, args: tuple[Any, ...], kwargs: dict[str, Any], *, dynamic: bool
    ) -> Function:
        """Compile the module whole for these inputs and save it to `path` (written whole or not at all)."""
        shape = describe(self.name, args, kwargs)
        covers = _covers(args, kwargs, dynamic)
        log.info(
            "saved compile: compiling %s %s (%s; minutes for a full-size model)",
            self.name,
            covers,
            "every height and width its guards accept" if dynamic else "static",
        )
        started = time.perf_counter()
        options = {**torch._inductor.list_mode_options(self.mode), "guard_filter_fn": _saveable_guards}
        with torch._dynamo.config.patch(enable_aot_compile=True):
            compiled = torch.compile(self.module.forward, fullgraph=True, dynamic=False, options=options)
        fn = compiled.aot_compile((args, kwargs))
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.stem}.partial-{os.getpid()}")
        about = {"covers": covers, "dynamic": dynamic, "example": shape, "compile_s": 0.0}
        try:
            fn.save_compiled_function(str(partial), external_data=self._external)
            about["compile_s"] = round(time.perf_counter() - started, 1)
            path.with_suffix(".json").write_text(json.dumps(about))
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        fn.disable_guard_check()
        log.info(
            "saved compile: %s %s compiled and saved as %s in %.1f s",
            self.name,
            covers,
            path.name,
            about["compile_s"],
        )
        return Function(fn, path.name, covers, dynamic, "compiled")


@contextmanager
def _claim(path: Path) -> Iterator[None]:
    """Hold the exclusive claim on building `path` (an advisory lock on `<path>.claim`, released with the
    process if it dies); `ClaimedElsewhere` when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_suffix(".claim"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ClaimedElsewhere(path.name) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _read_about(path: Path) -> dict[str, Any] | None:
    try:
        about = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    return about if isinstance(about, dict) and {"covers", "dynamic"} <= about.keys() else None


def _covers(args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: bool) -> str:
    tensor = _first_tensor(args, kwargs)
    if tensor is None:
        return "any"
    dims = [str(d) for d in tensor.shape]
    if dynamic and len(dims) == 4:
        dims[2:] = ["H", "W"]
    return "x".join(dims)


def _open_example(
    args: tuple[Any, ...], kwargs: dict[str, Any], *, mark: bool
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """The recorded call with its first tensor (the latents) at a non-square size, its height and width marked
    dynamic with `mark`; None when the first tensor is not 4-D. Non-square: equal sizes would be one symbol."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    for index, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            if leaf.dim() != 4:
                return None
            n, c, h, w = leaf.shape
            step = 8
            w2 = w - step if h == w and w > 2 * step else (w + step if h == w else w)
            example = torch.randn(n, c, h, w2, dtype=leaf.dtype, device=leaf.device)
            example = example.contiguous(memory_format=_memory_format(leaf))
            if mark:
                torch._dynamo.maybe_mark_dynamic(example, 2)
                torch._dynamo.maybe_mark_dynamic(example, 3)
            leaves[index] = example
            opened = pytree.tree_unflatten(leaves, spec)
            return opened[0], opened[1]
    return None


def _memory_format(tensor: torch.Tensor) -> torch.memory_format:
    return (
        torch.channels_last
        if tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()
        else torch.contiguous_format
    )


def saved_compile(
    module: torch.nn.Module,
    cache_dir: Path,
    label: str,
    mode: str,
    name: str | None = None,
    *,
    build: bool = False,
) -> SavedCompile:
    """Make `module`'s calls go through a `SavedCompile` (as `module.compile()` would through torch.compile)."""
    call = SavedCompile(module, cache_dir, label, mode, name, build=build)
    module._compiled_call_impl = call
    return call


def _copy(value: Any) -> Any:
    """A tensor's copy with the same shape, strides, dtype and device (kept for a later compile)."""
    if not isinstance(value, torch.Tensor):
        return value
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device).copy_(
        value
    )
