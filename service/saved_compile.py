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

Off the request path (`BackgroundCompiler`, attached once the service is ready): a call whose signature has
no function yet runs the module uncompiled at once (the same images up to rounding), and its signature is
compiled and saved on a compile thread of the same process; the calls after it use the new function. Why a
thread: torch's ahead-of-time compile traces with fake tensors (it runs nothing on the GPU) and Dynamo's
frame hook is per thread, so the GPU worker thread keeps running requests (uncompiled, or other sizes'
compiled functions) while the compile thread traces and Inductor builds kernels; the new function is first
called - and its CUDA graphs recorded - on the GPU worker thread, the only thread whose graph tree the
service uses. Nothing is loaded twice (a compile process would hold a second copy of the model on the card).
The GIL: every torch op releases and takes back the GIL, so a worker thread that shares it with a busy
compile thread waits up to a switch interval (5 ms by default) at each of a UNet's ~2000 ops: measured on an
H200, an uncompiled SDXL request at 512 px took 89 s instead of 3.3 s beside a compile. So while a request
runs beside a compile (`BackgroundCompiler.request_running`, used by the engine) the interval is 20 us: the
worker waits microseconds per op and the compile goes on at a share of the GIL.
(Parking the compile thread with a profile hook kept requests at uncompiled speed but slowed the compile
itself several-fold: measured, docs/BENCHMARKS.md.)
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
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


def describe(label: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """A signature as /health names it: the label and the first tensor's shape, e.g. "unet 2x4x128x128"."""
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor):
            return f"{label} {'x'.join(map(str, leaf.shape))}"
    return label


class SavedCompile:
    """A module's call, compiled whole once per input signature and kept on disk in `cache_dir`."""

    def __init__(
        self, module: torch.nn.Module, cache_dir: Path, label: str, mode: str, name: str | None = None
    ) -> None:
        self.module = module
        self.cache_dir = cache_dir
        self.label = label
        self.name = name or label  # what /health calls it ("refiner unet"); files are named by `label`
        self.mode = mode
        self.background: BackgroundCompiler | None = None  # set: new signatures compile off the call path
        self.shapes: dict[str, str] = {}  # describe() -> compiled | queued | compiling | failed
        self.uncompiled_calls = 0  # calls run uncompiled while their signature compiled elsewhere (or failed)
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
        for fn in tuple(self._functions):  # the compile thread appends to it
            if fn.guard_check(self.module, *args, **kwargs):
                return fn(self.module, *args, **kwargs)
        key = signature(args, kwargs)
        if self.background is not None:  # ready: never compile in a request; this call runs uncompiled
            if key not in self._unsaveable:
                self.background.submit(self, key, args, kwargs)
            self.uncompiled_calls += 1
            return self.module._call_impl(*args, **kwargs)
        if key not in self._unsaveable:
            fn = self._function_for(key, args, kwargs)
            if fn is not None:
                self._functions.append(fn)
                self.shapes[describe(self.name, args, kwargs)] = "compiled"
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


def saved_compile(
    module: torch.nn.Module, cache_dir: Path, label: str, mode: str, name: str | None = None
) -> SavedCompile:
    """Make `module`'s calls go through a `SavedCompile` (as `module.compile()` would through torch.compile)."""
    call = SavedCompile(module, cache_dir, label, mode, name)
    module._compiled_call_impl = call
    return call


REQUEST_SWITCH_S = 2e-5  # the GIL's switch interval while a request runs beside a compile


def _copy(value: Any) -> Any:
    """A tensor's copy with the same shape, strides, dtype and device (the compile must not see later writes)."""
    if not isinstance(value, torch.Tensor):
        return value
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device).copy_(
        value
    )


class BackgroundCompiler:
    """One thread that compiles (or loads) the signatures handed to it, one at a time, in arrival order.

    `submit` is called by a `SavedCompile` on the GPU worker thread and returns at once; each signature is
    taken once (a failed one stays uncompiled: `on_failure` gets the warning). `idle()` says whether nothing
    is queued or compiling.
    """

    def __init__(self, on_failure: Callable[[str], None] = lambda warning: None) -> None:
        self.on_failure = on_failure
        self._queue: queue.Queue[
            tuple[SavedCompile, Signature, str, tuple[Any, ...], dict[str, Any], bool, bool]
        ]
        self._queue = queue.Queue()
        self._taken: set[tuple[int, Signature]] = set()
        self._busy = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="compile-worker", daemon=True)
        self._thread.start()

    def submit(
        self, call: SavedCompile, key: Signature, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Queue `key` of `call` unless it was queued before (copies of the inputs: the caller goes on)."""
        with self._lock:
            if (id(call), key) in self._taken:
                return
            self._taken.add((id(call), key))
            self._busy += 1
        shape = describe(call.name, args, kwargs)
        call.shapes[shape] = "queued"
        args, kwargs = pytree.tree_map(_copy, (args, kwargs))
        modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())  # thread-local: carried over
        log.info("saved compile: %s has no compiled function: served uncompiled, compiling it aside", shape)
        self._queue.put((call, key, shape, args, kwargs, *modes))

    def idle(self) -> bool:
        with self._lock:
            return self._busy == 0

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or compiling (tests, benchmarks); whether it got there."""
        deadline = time.monotonic() + timeout
        while not self.idle():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    @contextmanager
    def request_running(self) -> Iterator[None]:
        """Around a request on the GPU worker: while a compile runs, the GIL changes hands every
        REQUEST_SWITCH_S instead of every 5 ms (module doc: the GIL); the interval is restored after."""
        if self.idle():
            yield
            return
        before = sys.getswitchinterval()
        sys.setswitchinterval(REQUEST_SWITCH_S)
        try:
            yield
        finally:
            sys.setswitchinterval(before)

    def _loop(self) -> None:
        while True:
            call, key, shape, args, kwargs, grad, inference = self._queue.get()
            call.shapes[shape] = "compiling"
            started = time.perf_counter()
            try:
                with ExitStack() as modes:
                    if inference:
                        modes.enter_context(torch.inference_mode())
                    modes.enter_context(torch.set_grad_enabled(grad))
                    fn = call._function_for(key, args, kwargs)
            except Exception as exc:  # noqa: BLE001 - the thread lives on; the shape stays uncompiled
                call.fallbacks.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
                fn = None
            if fn is not None:
                call._functions.append(fn)
                call.shapes[shape] = "compiled"
                log.info(
                    "saved compile: %s ready after %.1f s off the request path",
                    shape,
                    time.perf_counter() - started,
                )
            else:
                call._unsaveable.add(key)
                call.shapes[shape] = "failed"
                reason = call.fallbacks[-1] if call.fallbacks else "unknown"
                warning = f"compile of {shape} failed ({reason}): that shape stays uncompiled"
                log.warning("saved compile: %s", warning)
                self.on_failure(warning)
            with self._lock:
                self._busy -= 1
