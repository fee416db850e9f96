"""The one place that decides which backend runs each op.

The table of ops imports no backend. Each op package (``flashdino/ops/<op>/__init__.py``) declares
its op once with :func:`define` (the typed call description its ``supports`` rules read, the
preferred order on CUDA, a typical call for :func:`explain`), then registers its implementations:
the pure-PyTorch reference as "torch" (always present) with :func:`register`, and "triton" and
"cuda" with :func:`register_lazy`, a loader that imports the backend module and registers it the
first time something needs it (a call on tensors it can run on, a :func:`use` block for every op,
the tuner and the self-check through :func:`implementation` and :func:`variants`, the reports
:func:`explain`, :func:`backends`, :func:`unavailable`), so that a CPU-only process never imports
Triton. A backend that cannot load is recorded with :func:`mark_unavailable` and reported by
``flashdino info``.

Selection for one call, first match wins:

1. ``backend=`` passed to the op: that backend, or ``ValueError`` if it cannot run the call;
2. the innermost :func:`use` block naming the op (or all ops): that backend, or ``ValueError``;
   a block for all ops skips the ops that have no implementation in that backend;
3. the environment, ``FLASHDINO_BACKEND_<OP>`` then ``FLASHDINO_BACKEND`` (``torch``, ``triton``,
   ``cuda`` or ``auto``): a backend that cannot run the call falls back, with a warning;
4. on CUDA tensors, the on-device tuner's choice for this call's shape bucket (installed by
   ``flashdino.ops`` from ``flashdino.check.tune``; ``FLASHDINO_TUNE=0`` turns it off): the fastest
   of the backends and their registered variants (:func:`register_variant`: launch configurations,
   SDPA kernels) that passed the self-check;
5. otherwise the op's preference order, skipping backends that are missing or do not support
   the call; anywhere else the "torch" reference.

On CUDA a backend must also suit the GPU (rules installed by ``flashdino.ops`` from ``flashdino.check.device``: Triton needs sm_80+, ``_C``
a GPU it was built for) and pass its first-use self-check (``flashdino.check.selfcheck``).

Non-CUDA tensors run only on "torch", except "triton" under ``TRITON_INTERPRET=1`` (tests).
:func:`last_backend` reports the backend of the last eager call of an op.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("cuda", "triton", "torch")
_TITLES = {"cuda": "CUDA", "triton": "Triton", "torch": "PyTorch"}  # as the load failures name them


@dataclass(frozen=True)
class Op:
    name: str
    call_type: type  # the frozen dataclass every supports() rule of this op receives
    preference: tuple[str, ...]  # order tried on CUDA tensors
    typical: Callable[[torch.device], object]  # a representative call, for explain()


@dataclass(frozen=True)
class Impl:
    fn: Callable
    # Returns None when the backend can run the call, else a short reason it cannot.
    supports: Callable[[object], Optional[str]]


_OPS: dict[str, Op] = {}
_REGISTRY: dict[str, dict[str, Impl]] = {}
_UNAVAILABLE: dict[str, str] = {}  # backend -> why it could not be loaded
_VARIANTS: dict[str, dict[str, dict[str, "Impl"]]] = {}  # op -> backend -> variant name -> Impl
_LAST: dict[str, str] = {}
_PENDING: dict[str, dict[str, Callable[[], None]]] = {}  # op -> backend -> loader not yet run
_LOADING: set[tuple[str, str]] = set()  # (op, backend) whose loader runs now, in the thread holding the lock
# Held while a loader runs, so that a thread needing the same backend waits for its registration.
# Reentrant: a loader registers through this module and may ask for its op's other backends.
_LOAD_LOCK = threading.RLock()
# Innermost use() first: (backend, op or None for every op).
_FORCED: contextvars.ContextVar[tuple[tuple[str, Optional[str]], ...]] = contextvars.ContextVar(
    "flashdino_dispatch_forced", default=())


def _always(_call) -> Optional[str]:
    return None


def define(name: str, call_type: type, preference: tuple[str, ...], typical: Callable[[torch.device], object]) -> Op:
    """Declares an op once; its backends then :func:`register` against it."""
    if not dataclasses.is_dataclass(call_type):
        raise TypeError(f"{name}: the call description must be a dataclass, got {call_type!r}")
    unknown = [b for b in preference if b not in BACKENDS]
    if unknown:
        raise ValueError(f"{name}: unknown backends {unknown} in the preference order (known: {BACKENDS})")
    if name in _OPS and _OPS[name].call_type is not call_type:
        raise ValueError(f"op {name!r} is already defined with another call description")
    op = _OPS[name] = Op(name, call_type, tuple(preference), typical)
    _REGISTRY.setdefault(name, {})
    return op


def register(op: str, backend: str, fn: Callable,
             supports: Optional[Callable[[object], Optional[str]]] = None) -> None:
    if op not in _OPS:
        raise ValueError(f"register: op {op!r} is not defined (call dispatch.define first)")
    if backend not in BACKENDS:
        raise ValueError(f"register: unknown backend {backend!r} (known: {BACKENDS})")
    _REGISTRY[op][backend] = Impl(fn, supports or _always)


def register_lazy(op: str, backend: str, load: Callable[[], None]) -> None:
    """Registers ``backend`` of ``op`` on first need: ``load()`` imports the backend module and
    calls :func:`register` (and :func:`register_variant`) for it, or raises, which records the
    backend as unavailable with the exception as the reason while the reference keeps running.
    It runs at most once; a module that imports the backend module directly registers nothing."""
    if op not in _OPS:
        raise ValueError(f"register_lazy: op {op!r} is not defined (call dispatch.define first)")
    if backend not in BACKENDS or backend == "torch":
        raise ValueError(f"register_lazy: {backend!r} is not an optional backend (known: {BACKENDS[:-1]})")
    _PENDING.setdefault(op, {})[backend] = load


def _run_untraced(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result`` (the mark it sets) without importing
    ``torch._dynamo``, which imports Triton, the start-up cost the lazy loads avoid: traced code
    (torch.compile) calls ``fn`` as plain Python instead of tracing it. A load takes a lock and
    imports modules, which a trace cannot contain, and completes before the trace reads the
    registry it fills."""
    fn._dynamo_marked_constant = True
    return fn


@_run_untraced
def _load(op: str, backend: str) -> None:
    """Runs the pending loader of ``backend`` for ``op``, if any (once per process)."""
    if backend not in _PENDING.get(op, {}):  # the common case, without the lock
        return
    with _LOAD_LOCK:
        load = _PENDING.get(op, {}).get(backend)
        if load is None or (op, backend) in _LOADING:  # loaded meanwhile, or the loader itself asking
            return
        _LOADING.add((op, backend))
        try:
            load()
            if backend not in _REGISTRY[op]:
                raise RuntimeError(f"its loader registered no {backend} implementation of {op}")
        except Exception as exc:  # ImportError, or a broken toolchain: the other backends still run
            _REGISTRY[op].pop(backend, None)  # a loader that failed half-way leaves nothing behind
            _VARIANTS.get(op, {}).pop(backend, None)
            mark_unavailable(backend, f"{_TITLES[backend]} backend did not load: {exc}")
        finally:
            _LOADING.discard((op, backend))
            # Dropped only now: a thread that found it pending has waited for the lock until here.
            del _PENDING[op][backend]


def _runs_on(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` can run on ``device`` at all: off CUDA only the reference does, and
    Triton's interpreter under ``TRITON_INTERPRET=1`` (the tests)."""
    return backend == "torch" or device.type == "cuda" or (
        backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1")


@_run_untraced
def _load_runnable(op: str, device: torch.device) -> None:
    """Loads the pending backends of ``op`` that can run on ``device`` (none on a CPU, so a
    CPU-only process never imports them)."""
    for backend in list(_PENDING.get(op, {})):
        if _runs_on(backend, device):
            _load(op, backend)


def _load_all(op: Optional[str] = None) -> None:
    """Loads every pending backend of ``op`` (of every op when None)."""
    for name in ([op] if op is not None else list(_PENDING)):
        for backend in list(_PENDING.get(name, {})):
            _load(name, backend)


def register_variant(op: str, backend: str, variant: str, fn: Callable,
                     supports: Optional[Callable[[object], Optional[str]]] = None) -> None:
    """An alternative implementation of a registered backend with the same signature and results
    (a launch configuration, an SDPA kernel), which on-device tuning may time and choose.
    ``supports(call)`` says when the variant applies, on top of the backend's own rule and device
    rule, which apply to every variant. "" names the backend's default implementation."""
    _load(op, backend)
    if backend not in _REGISTRY.get(op, {}):
        raise ValueError(f"register_variant: {op!r} has no {backend} backend to add a variant to")
    if not variant:
        raise ValueError("register_variant: the empty name is the backend's default implementation")
    _VARIANTS.setdefault(op, {}).setdefault(backend, {})[variant] = Impl(fn, supports or _always)


def variants(op: str, backend: str, call=None) -> tuple[str, ...]:
    """The variants of ``backend`` for ``op``, "" (the registered default) first; with ``call``,
    only those whose own ``supports`` rule accepts it."""
    _load(op, backend)
    if backend not in _REGISTRY.get(op, {}):
        return ()
    named = _VARIANTS.get(op, {}).get(backend, {})
    return ("",) + tuple(v for v, impl in named.items() if call is None or impl.supports(call) is None)


def mark_unavailable(backend: str, reason: str) -> None:
    _UNAVAILABLE.setdefault(backend, reason)


def ops() -> tuple[str, ...]:
    return tuple(sorted(_OPS))


def backends(op: str) -> tuple[str, ...]:
    """Backends registered for ``op`` on this machine (loading those registered lazily)."""
    _load_all(op)
    return tuple(b for b in BACKENDS if b in _REGISTRY.get(op, {}))


def _check_backend(value: str, source: str) -> str:
    lowered = value.lower()
    if lowered not in BACKENDS:
        raise ValueError(f"{source}={value!r} is not one of {BACKENDS} (or 'auto' for the default order)")
    return lowered


def environment_problems() -> list[str]:
    """One message per ``FLASHDINO_BACKEND_<OP>`` that names no op (misspelt or outdated), which
    would otherwise be ignored silently."""
    known = ", ".join(f"FLASHDINO_BACKEND_{op.upper()}" for op in sorted(_REGISTRY))
    return [f"{key} names no flashdino op, so it has no effect; the per-op switches are {known}"
            for key in sorted(os.environ)
            if key.startswith("FLASHDINO_BACKEND_") and key[len("FLASHDINO_BACKEND_"):].lower() not in _REGISTRY]


def check_environment() -> None:
    """Warns (once per variable) about a ``FLASHDINO_BACKEND_<OP>`` that names no op. Run when
    ``flashdino.ops`` is imported and by :func:`explain`, not per call (it scans the whole
    environment). A warning, not an error: a stale variable in a user's shell must not stop
    ``import flashdino``."""
    for message in environment_problems():
        if message not in _WARNED_ENV:
            _WARNED_ENV.add(message)
            warnings.warn(message, UserWarning, stacklevel=2)


_WARNED_ENV: set = set()


def _env_choice(op: str) -> Optional[str]:
    for name in (f"FLASHDINO_BACKEND_{op.upper()}", "FLASHDINO_BACKEND"):
        value = os.environ.get(name)
        if value:
            return None if value.lower() == "auto" else _check_backend(value, name)
    return None


def _forced(op: str) -> Optional[str]:
    for backend, scope in _FORCED.get():
        if scope is None:
            _load(op, backend)  # whether the op has that backend decides whether the block applies
        if scope == op or (scope is None and backend in _REGISTRY[op]):
            return backend
    return None


@contextlib.contextmanager
def use(backend: str, op: Optional[str] = None) -> Iterator[None]:
    """Runs ``op`` (every op when None) on ``backend`` inside the block.

    ``with flashdino.dispatch.use("torch"): model(x)`` runs the PyTorch reference path. A call the
    forced backend cannot run raises ``ValueError`` naming the reason. The choice is per thread
    and per asyncio task (a context variable) and is read when a call is traced, so a
    ``torch.compile``d function keeps the backend it was compiled with.
    """
    backend = _check_backend(backend, "use(backend)")
    if op is not None and op not in _OPS:
        raise ValueError(f"use: unknown op {op!r} (known: {ops()})")
    token = _FORCED.set(((backend, op),) + _FORCED.get())
    try:
        yield
    finally:
        _FORCED.reset(token)


def _why_not(op: str, backend: str, device: torch.device, call) -> Optional[str]:
    runs_here = _runs_on(backend, device)
    if runs_here:  # a backend that cannot run on this device is not worth importing
        _load(op, backend)
    impls = _REGISTRY[op]
    if backend not in impls and backend not in _PENDING.get(op, {}):
        return _UNAVAILABLE.get(backend, f"no {backend} implementation of {op}")
    if not runs_here:
        return f"tensors are on {device.type}, the {backend} kernels need CUDA"
    why = impls[backend].supports(call) or _device_rule(backend, device)
    if why is None and backend != "torch":
        why = _first_use_check(op, backend, device, call)
    return why


# -- GPU safety: device rules and the first-use self-check -----------------------------------------
# Installed by ``flashdino.ops`` from ``flashdino.check`` (``device.backend_rule`` and
# ``selfcheck.verify``) as hooks, so that this module imports nothing of flashdino.
_GPU_RULES: dict[str, Optional[Callable]] = {"device_rule": None, "first_use_check": None}


def set_gpu_rules(*, device_rule: Optional[Callable[[str, torch.device], Optional[str]]] = None,
                  first_use_check: Optional[Callable[..., Optional[str]]] = None) -> None:
    """Installs the rules a non-reference backend must pass on a CUDA device.

    ``device_rule(backend, device)`` returns None or why the GPU cannot run that backend;
    ``first_use_check(op, backend, device, call)`` returns None or why the backend was disabled.
    """
    _GPU_RULES.update(device_rule=device_rule, first_use_check=first_use_check)


# (op, call, device) -> None or (backend, variant, reason): the on-device tuner's choice. It must
# never time anything while torch.compile traces or a CUDA graph captures (it then only reads its
# table). Installed by ``flashdino.ops`` from ``flashdino.check.tune``.
_TUNER: list = [None]


def set_tuner(tuner: Optional[Callable[..., Optional[tuple[str, str, str]]]]) -> None:
    """``tuner(op, call, device, measure)``: None or (backend, variant, reason); ``measure=False``
    (``explain``) only reads what is already decided."""
    _TUNER[0] = tuner


def _device_rule(backend: str, device: torch.device) -> Optional[str]:
    """Architecture rules of a backend on a CUDA device (compute capability, ``_C``'s build archs)."""
    rule = _GPU_RULES["device_rule"]
    if device.type != "cuda" or backend == "torch" or rule is None:
        return None
    return rule(backend, device)


def _first_use_check(op: str, backend: str, device: torch.device, call) -> Optional[str]:
    """None, or why ``backend`` is disabled for ``op`` after failing its first-use self-check."""
    check = _GPU_RULES["first_use_check"]
    return None if check is None else check(op, backend, device, call)


def implementation(op: str, backend: str, variant: str = "") -> Callable:
    """The registered function of ``backend`` (or one of its variants) for ``op`` (the self-check
    probes and the tuner call it directly)."""
    _load(op, backend)
    if op not in _REGISTRY or backend not in _REGISTRY[op]:
        raise ValueError(f"no {backend} implementation of {op!r}")
    if not variant:
        return _REGISTRY[op][backend].fn
    impl = _VARIANTS.get(op, {}).get(backend, {}).get(variant)
    if impl is None:
        raise ValueError(f"no variant {variant!r} of the {backend} implementation of {op!r}")
    return impl.fn


def _choose(op: str, call, device: torch.device, backend: Optional[str],
            measure: bool = True) -> tuple[Impl, str, str]:
    spec = _OPS.get(op)
    if spec is None:
        raise ValueError(f"unknown op {op!r} (known: {ops()})")
    if type(call) is not spec.call_type:
        raise TypeError(f"{op}: expected a {spec.call_type.__name__} call description, got {type(call).__name__}")
    # The loads first: a trace must not read the registry before a load fills it.
    _load_runnable(op, device)
    forced = _forced(op)
    impls = _REGISTRY[op]
    for chosen, source in ((backend, "requested by the caller"), (forced, "forced by dispatch.use")):
        if chosen is not None:
            chosen = _check_backend(chosen, "backend")
            why = _why_not(op, chosen, device, call)
            if why:
                raise ValueError(f"{op}: backend {chosen!r} ({source}) cannot run this call: {why}")
            return impls[chosen], chosen, source
    env = _env_choice(op)
    if env is not None:
        why = _why_not(op, env, device, call)
        if why is None:
            return impls[env], env, "forced by FLASHDINO_BACKEND"
        warnings.warn(f"{op}: FLASHDINO_BACKEND={env} cannot run this call ({why}); using the default order",
                      stacklevel=4)
    tuner = _TUNER[0]
    if tuner is not None:  # None off CUDA (except the tests' devices) and when FLASHDINO_TUNE=0
        picked = tuner(op, call, device, measure)
        if picked is not None and _why_not(op, picked[0], device, call) is None:
            name, variant, reason = picked
            return impls[name] if not variant else _VARIANTS[op][name][variant], name, reason
    if device.type != "cuda":
        return impls["torch"], "torch", f"tensors on {device.type}"
    reasons = []
    for name in spec.preference:
        why = _why_not(op, name, device, call)
        if why is None:
            return impls[name], name, "preferred on CUDA" if not reasons else "; ".join(reasons)
        reasons.append(f"{name}: {why}")
    return impls["torch"], "torch", "; ".join(reasons) or "reference path"


def select(op: str, call, device: torch.device, backend: Optional[str] = None) -> tuple[Callable, str, str]:
    """(implementation, backend name, reason) for one call described by ``call``."""
    impl, name, reason = _choose(op, call, device, backend)
    # Outside tracing only: a compiled graph has no Python-side effects to record.
    if not torch.compiler.is_compiling():
        _LAST[op] = name
    return impl.fn, name, reason


def last_backend(op: str) -> Optional[str]:
    """Backend that ran the last eager call of ``op`` in this process (None before the first)."""
    if op not in _OPS:
        raise ValueError(f"last_backend: unknown op {op!r} (known: {ops()})")
    return _LAST.get(op)


def explain(device: Optional[torch.device] = None) -> dict[str, tuple[str, str]]:
    """Backend and reason per op for the op's typical call on ``device`` (``flashdino info``); the
    tuned choice where one is known, never a new measurement."""
    check_environment()
    _load_all()  # the report names why a backend is missing, which only its load attempt can tell
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {}
    for op in ops():
        try:
            _, name, reason = _choose(op, _OPS[op].typical(device), device, None, measure=False)
        except Exception as exc:  # report, never crash the info command
            name, reason = "?", str(exc)
        out[op] = (name, reason)
    return out


def unavailable() -> dict[str, str]:
    """Backend -> why it could not be loaded (after attempting every pending load)."""
    _load_all()
    return dict(_UNAVAILABLE)
