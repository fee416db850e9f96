"""First-use self-check: a fast kernel proves itself on a small probe before it serves a call.

The first time the dispatch would run a non-reference backend of an op on a GPU (per device,
dtype and probe variant), it runs that backend and the PyTorch reference on a small probe built
like the call (same dtype, head dim, RoPE mode, qk-norm, row width, patch size) and compares them.
The attention probe has the call's heads, grid and prefix count, its token stride, and a batch and
token count that Triton specialises like the call's (``same_class``), so the probe compiles the
very kernel the model then runs: one compilation per process, not two. On-device tuning
(``check/tune.py``) checks each of its candidates (a backend's variants) the same way before
timing it; a failing variant is left out quietly (it is one candidate among several).
A mismatch or an exception disables that backend for that op on that device for the rest of the
process: the dispatch then takes the next backend, and ONE warning names the op, the GPU and
``FLASHDINO_BACKEND=torch``. Never a wrong number from an untested GPU / driver / Triton pairing.

* ``FLASHDINO_SELFCHECK=0`` turns it off.
* Results are cached on disk per GPU name + driver + flashdino / torch / triton versions + the
  overriding switches set (``overrides()``: ``FLASHDINO_ROPE_ATTN_*``, ``FLASHDINO_BACKEND*``,
  ``FLASHDINO_TUNE``) (``FLASHDINO_SELFCHECK_CACHE``, default ``$XDG_CACHE_HOME/flashdino/selfcheck.json`` or
  ``~/.cache/flashdino/selfcheck.json``), so the probes run once per machine. Exceptions are not
  cached (an out-of-memory error may be transient); mismatches and passes are.
* It never runs inside ``torch.compile`` tracing or CUDA graph capture: there the backend is
  trusted (or refused if it already failed) and the check runs on the next eager call.
* Only the forward pass is probed at first use; ``flashdino check`` runs the full set, backward
  included, on the current GPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import dispatch

ENV_SWITCH = "FLASHDINO_SELFCHECK"
ENV_CACHE = "FLASHDINO_SELFCHECK_CACHE"

# (op, backend, device key, dtype, variant) -> None (passed) or the reason it failed.
_RESULTS: dict[tuple, Optional[str]] = {}
# (op, backend, device key) -> reason: backends disabled for the process.
_DISABLED: dict[tuple, str] = {}
# (op, backend) -> reason, device-free: what traced code (torch.compile) consults.
_DISABLED_OPS: dict[tuple, str] = {}
_LOCK = threading.RLock()
_ACTIVE = threading.local()  # re-entrancy guard: a probe never checks itself
# Test-only hook: device types, besides "cuda", on which the self-check runs (e.g. {"cpu"} under
# TRITON_INTERPRET=1). Empty in normal use.
EXTRA_DEVICE_TYPES: set = set()


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def _tracing(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return True
    if device.type == "cuda":
        try:
            return bool(torch.cuda.is_current_stream_capturing())
        except Exception:
            return False
    return False


# ------------------------------------------------------------------------------------------------
# probes: small inputs built like the call; every backend of an op takes the same arguments
# ------------------------------------------------------------------------------------------------


@dataclass
class Probe:
    variant: str  # what the probe exercises beyond (op, dtype): part of the cache key
    args: tuple
    tol: float  # bound on max |fast - ref| / (max |ref| + 1e-6), per output
    backward: bool = False  # whether the full set (flashdino check) also compares gradients


def _tolerance(dtype: torch.dtype) -> float:
    # bf16 keeps 8 mantissa bits, fp16 11; fp32 may legitimately run as TF32 (10 bits).
    return {torch.bfloat16: 3e-2, torch.float16: 5e-3}.get(dtype, 5e-3)


def _gen(device: torch.device) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(1234)


def _randn(shape, dtype, device, gen, scale=1.0):
    return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)


def same_class(n: int, cap: int) -> int:
    """A size <= ``cap`` (at least 16) that Triton specialises like ``n``: its launcher makes an int
    argument equal to 1 a constant and marks multiples of 16 as divisible, so a probe of this size
    compiles the kernel the real call runs (``n`` itself when it is small)."""
    if n <= cap:
        return n
    if n % 16 == 0:
        return max(16, cap // 16 * 16)
    return cap if cap % 16 else cap - 1


def _probe_frames(frames: int, tokens_per_frame: int) -> int:
    """Frames of a RoPE probe: at most the call's, two or more when it has several (the per-frame
    position wrap), with a token count specialised like the call's."""
    if frames <= 2:
        return frames
    divisible = frames * tokens_per_frame % 16 == 0
    return next((f for f in range(2, 17) if (f * tokens_per_frame % 16 == 0) == divisible), frames)


def rope_probe_shape(call) -> tuple[int, int, int]:
    """(batch, tokens, token stride) of the rope_attention probe: the call's heads, head dim, grid
    and prefix count, and sizes Triton specialises like the call's (so the process compiles each
    kernel once, for the probe and the model alike)."""
    batch = same_class(getattr(call, "batch", 2), 16 if getattr(call, "batch", 2) % 16 == 0 else 2)
    if call.rope is not None:
        tpf = call.rope.tokens_per_frame
        n = tpf * _probe_frames(max(call.n_tokens // tpf, 1), tpf)
    else:
        n = same_class(call.n_tokens, 64)
    width = 3 * getattr(call, "num_heads", 2) * call.head_dim
    stride = call.token_stride if call.token_stride > width and call.token_stride <= 2 * width else width
    return batch, n, stride


def _rope_probe(call, device: torch.device) -> Probe:
    from ..ops.rope_attention import RopeGrid

    d, heads, gen = call.head_dim, getattr(call, "num_heads", 2), _gen(device)
    rope = None
    if call.rope is not None:
        g = call.rope
        if g.mode == "dinov3":
            periods = 100.0 ** (2 * torch.arange(d // 4, dtype=torch.float32) / (d // 2))
            rope = RopeGrid("dinov3", g.height, g.width, g.n_prefix, periods=periods.to(device), normalize=g.normalize)
        else:
            rope = RopeGrid(g.mode, g.height, g.width, g.n_prefix, base=g.base)
    batch, n, stride = rope_probe_shape(call)
    # A qkv view with the call's token stride (a slice of a wider row) when it has one.
    qkv = _randn((batch, n, stride), call.dtype, device, gen)[..., :3 * heads * d]
    norms = (None, None)
    if call.qk_norm:
        norms = tuple((_randn((d,), call.dtype, device, gen, 0.2) + 1, _randn((d,), call.dtype, device, gen, 0.1))
                      for _ in range(2))
    variant = f"d{d}-{call.rope.mode if call.rope is not None else 'norope'}{'-qknorm' if call.qk_norm else ''}"
    return Probe(variant, (qkv, heads, rope, norms[0], norms[1], 1e-5, None), _tolerance(call.dtype), backward=True)


def _residual_probe(call, device: torch.device) -> Probe:
    D, gen = call.dim, _gen(device)
    x = _randn((3, 7, D), call.dtype, device, gen)
    branch = _randn((3, 7, D), call.branch_dtype, device, gen)
    gamma, weight, bias = (_randn((D,), call.dtype, device, gen, 0.5) for _ in range(3))
    return Probe(f"D{D}-{str(call.branch_dtype).removeprefix('torch.')}",
                 (x, branch, gamma, weight, bias, 1e-6), _tolerance(call.dtype), backward=True)


def _final_norm_probe(call, device: torch.device) -> Probe:
    D, gen = call.dim, _gen(device)
    x = _randn((2, 2 + 12, D), call.dtype, device, gen)
    weight, bias = (_randn((D,), call.dtype, device, gen, 0.5) for _ in range(2))
    # The [B, D, H, W] output is the layout with the most index arithmetic.
    return Probe(f"D{D}-nchw", (x, 2, weight, bias, 1e-6, None, (3, 4)), _tolerance(call.dtype))


def _patch_embed_probe(call, device: torch.device) -> Probe:
    P, gen, D = call.patch_size, _gen(device), 64
    if call.dtype == torch.uint8:
        x = torch.randint(0, 256, (2, 3, 3 * P, 2 * P), generator=gen, dtype=torch.uint8).to(device)
    else:
        x = _randn((2, 3, 3 * P, 2 * P), call.dtype, device, gen)
    weight = _randn((D, 3, P, P), call.weight_dtype, device, gen, 0.05)
    bias = _randn((D,), call.weight_dtype, device, gen)
    cls = _randn((1, 1, D), call.weight_dtype, device, gen)
    mean, std = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) if call.dtype == torch.uint8 else (None, None)
    args = (x, weight, bias, cls, None, None, None, None, False, mean, std)
    return Probe(f"P{P}-w{str(call.weight_dtype).removeprefix('torch.')}", args, _tolerance(call.weight_dtype))


PROBES: dict[str, Callable[[object, torch.device], Probe]] = {
    "rope_attention": _rope_probe,
    "residual_layernorm": _residual_probe,
    "final_norm": _final_norm_probe,
    "patch_embed": _patch_embed_probe,
}


def register_probe(op: str, factory: Callable[[object, torch.device], Probe]) -> None:
    """Declares the probe of an op (ops without a probe are not checked)."""
    PROBES[op] = factory


# ------------------------------------------------------------------------------------------------
# running one probe
# ------------------------------------------------------------------------------------------------


def _tensors(out) -> list:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _compare(fast, ref, tol: float, what: str, same_dtype: bool = True) -> tuple[Optional[str], float]:
    fast, ref = _tensors(fast), _tensors(ref)
    if len(fast) != len(ref):
        return f"{what}: {len(fast)} outputs, the reference returns {len(ref)}", math.inf
    worst = 0.0
    for i, (a, b) in enumerate(zip(fast, ref)):
        if a.shape != b.shape or (same_dtype and a.dtype != b.dtype):
            return (f"{what} {i}: {a.dtype} {tuple(a.shape)}, the reference gives {b.dtype} {tuple(b.shape)}",
                    math.inf)
        a, b = a.detach().float(), b.detach().float()
        if not bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all()):
            return f"{what} {i}: non-finite values where the reference is finite", math.inf
        err = float((a - b).abs().max()) / (float(b.abs().max()) + 1e-6) if b.numel() else 0.0
        worst = max(worst, err)
        if not err <= tol:
            return f"{what} {i}: max error {err:.2e} of the output's range (tolerance {tol:.0e})", err
    return None, worst


def _upcast(args) -> list:
    def one(a):
        if isinstance(a, torch.Tensor):
            return a.float() if a.is_floating_point() else a
        if isinstance(a, tuple):
            return tuple(one(x) for x in a)
        return a
    return [one(a) for a in args]


def _grads(fn, args) -> list:
    args = [a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    outs = [t for t in _tensors(fn(*args)) if t.is_floating_point()]
    seed = torch.Generator(device="cpu").manual_seed(7)
    loss = sum((o.float() * torch.randn(o.shape, generator=seed).to(o.device)).sum() for o in outs)
    return [g if g is not None else torch.zeros_like(a)
            for g, a in zip(torch.autograd.grad(loss, leaves, allow_unused=True), leaves)]


def run_probe(op: str, backend: str, device: torch.device, call,
              backward: bool = False, variant: str = "") -> tuple[Optional[str], float, str]:
    """(None or the failure, max relative error, probe variant): ``backend`` vs the reference.

    The bound adapts to the probe: a fast kernel may differ from the reference by up to three
    times the reference's own distance from its fp32 computation (both round, differently), and
    never less than the dtype's fixed tolerance. A wrong kernel is off by far more; a healthy
    one is not disabled for rounding.
    """
    probe = PROBES[op](call, device)
    fast_fn = dispatch.implementation(op, backend, variant)
    ref_fn = dispatch.implementation(op, "torch")
    low_precision = getattr(call, "dtype", None) in (torch.float16, torch.bfloat16, torch.uint8)
    _ACTIVE.on = True
    try:
        with torch.autocast(device.type, enabled=False):
            if not backward:
                with torch.no_grad():
                    out = fast_fn(*probe.args)
                    ref = ref_fn(*probe.args)
                    tol = probe.tol
                    if low_precision:
                        tol = max(tol, 3 * _compare(ref, ref_fn(*_upcast(probe.args)), math.inf, "", False)[1])
                return (*_compare(out, ref, tol, "output"), probe.variant)
            fast, ref = _grads(fast_fn, probe.args), _grads(ref_fn, probe.args)
            tol = 2 * probe.tol
            if low_precision:
                tol = max(tol, 3 * _compare(ref, _grads(ref_fn, _upcast(probe.args)), math.inf, "", False)[1])
            return (*_compare(fast, ref, tol, "gradient"), probe.variant + "-bwd")
    finally:
        _ACTIVE.on = False


# ------------------------------------------------------------------------------------------------
# the disk cache
# ------------------------------------------------------------------------------------------------


def cache_path() -> Path:
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "flashdino" / "selfcheck.json"


def _versions() -> str:
    import flashdino

    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "none"
    return f"flashdino {flashdino.__version__} | torch {torch.__version__} | triton {tv}"


def _driver(device: torch.device) -> str:
    if device.type != "cuda":
        return "none"
    getter = getattr(torch._C, "_cuda_getDriverVersion", None)
    if getter is not None:
        try:
            return str(getter())
        except Exception:
            pass
    try:
        from .._native import native_status
        module = native_status()[0]
        if module is not None and hasattr(module, "cuda_driver_version"):
            return str(module.cuda_driver_version())
    except Exception:
        pass
    return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device.index if device.index is not None else torch.cuda.current_device())
    return f"{device.type} (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else device.type


# Switches that change which kernel runs or how it is compiled: part of every cache key (the
# self-check's and the tuner's), so that no result is reused after one of them changed.
OVERRIDE_PREFIXES = ("FLASHDINO_ROPE_ATTN_", "FLASHDINO_BACKEND", "FLASHDINO_TUNE")


def overrides() -> str:
    """The overriding switches set in the environment, ``NAME=value`` sorted, or "none"."""
    found = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith(OVERRIDE_PREFIXES) and v)
    return ",".join(found) or "none"


def fingerprint(device: torch.device) -> str:
    """What a cached result is valid for: the GPU model, the driver, the software versions and
    the overrides in the environment."""
    return (f"{device_name(device)} | driver {_driver(device)} | CUDA {torch.version.cuda} | {_versions()} | "
            f"overrides {overrides()}")


def read_json_object(path) -> dict:
    """The JSON object stored at ``path``; {} when it is missing, unreadable or not an object (a cache
    that cannot be trusted is rebuilt, never an error)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _load_cache() -> dict:
    return read_json_object(cache_path())


def store_json_entry(path: Path, fp: str, key: str, value) -> None:
    """Sets ``data[fp][key] = value`` in the JSON object at ``path`` by an atomic replace. A cache
    that cannot be written (read-only home, full disk) is not an error: the result is then only
    kept in memory, and no temporary file stays behind."""
    tmp = None
    try:
        data = read_json_object(path)
        data.setdefault(fp, {})[key] = value
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
        tmp = None
    except OSError:
        pass
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _store(fp: str, key: str, value: str) -> None:
    """Adds one result to the cache file."""
    store_json_entry(cache_path(), fp, key, value)


# ------------------------------------------------------------------------------------------------
# the dispatch hook
# ------------------------------------------------------------------------------------------------


def _device_key(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{device.index if device.index is not None else torch.cuda.current_device()}"
    return str(device)


def _disable(op: str, backend: str, device: torch.device, dtype, reason: str) -> str:
    """Disables ``backend`` (or one variant, "backend:variant") of ``op`` on ``device``. A variant
    is one tuning candidate among several: it is left out of the timing without a warning
    (``flashdino check --tune`` lists it), e.g. an SDPA kernel that does not take fp32."""
    key = (op, backend, _device_key(device))
    _DISABLED_OPS.setdefault((op, backend), reason)
    if key not in _DISABLED:
        _DISABLED[key] = reason
        if ":" in backend:
            return f"disabled by the self-check on this GPU: {reason}"
        warnings.warn(
            f"flashdino: the {backend} kernel of {op} failed its self-check on {device_name(device)} ({dtype}): "
            f"{reason}. It is disabled for {op} in this process (the next backend runs instead). Set "
            f"FLASHDINO_BACKEND=torch to run everything on the PyTorch reference, and please report this GPU, "
            f"driver and `flashdino info`.", RuntimeWarning, stacklevel=6)
    return f"disabled by the self-check on this GPU: {reason}"


def verify(op: str, backend: str, device: torch.device, call, variant: str = "") -> Optional[str]:
    """None when ``backend`` (its ``variant``, a tuning candidate) may run ``op`` on ``device``;
    else the reason (it failed its probe)."""
    if (backend == "torch" and not variant) or op not in PROBES:
        return None
    if variant:
        backend = f"{backend}:{variant}"  # a variant is checked and disabled on its own
    if torch.compiler.is_compiling():
        # Traced code (torch.compile) runs no probe, takes no lock and queries no device: a
        # backend that already failed stays refused, anything else is checked at the next eager call.
        reason = _DISABLED_OPS.get((op, backend))
        return None if reason is None else f"disabled by the self-check on this GPU: {reason}"
    if not enabled():
        return None
    if device.type != "cuda" and device.type not in EXTRA_DEVICE_TYPES:
        return None
    if getattr(_ACTIVE, "on", False):
        return None
    dkey = _device_key(device)
    dtype = getattr(call, "dtype", None)
    key = (op, backend, dkey, str(dtype), _call_key(call))
    # Hot path (every dispatch on a GPU): a known result needs no lock and no CUDA query.
    if (op, backend, dkey) in _DISABLED:
        return f"disabled by the self-check on this GPU: {_DISABLED[(op, backend, dkey)]}"
    if key in _RESULTS and _RESULTS[key] is None:
        return None
    with _LOCK:
        if (op, backend, dkey) in _DISABLED:
            return f"disabled by the self-check on this GPU: {_DISABLED[(op, backend, dkey)]}"
        if key in _RESULTS:
            reason = _RESULTS[key]
            return None if reason is None else _disable(op, backend, device, dtype, reason)
        if _tracing(device):  # no kernels run while capturing a CUDA graph; checked at the next eager call
            return None
        fp = fingerprint(device)
        disk_key = f"{op} | {backend} | {dtype} | {_call_key(call)}"
        cached = _load_cache().get(fp, {}).get(disk_key)
        if cached is not None:
            reason = None if cached == "ok" else cached
        else:
            try:
                name, _, variant = backend.partition(":")
                reason = run_probe(op, name, device, call, variant=variant)[0]
            except Exception as exc:  # an exception disables too, but is not cached (may be transient)
                reason = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                _RESULTS[key] = reason
                return _disable(op, backend, device, dtype, reason)
            _store(fp, disk_key, "ok" if reason is None else reason)
        _RESULTS[key] = reason
        return None if reason is None else _disable(op, backend, device, dtype, reason)


def _call_key(call) -> str:
    """The facts of a call that select a different probe (and kernel variant)."""
    parts = []
    for name in ("head_dim", "dim", "patch_size", "qk_norm", "branch_dtype", "weight_dtype"):
        if hasattr(call, name):
            parts.append(f"{name}={getattr(call, name)}")
    rope = getattr(call, "rope", None)
    if hasattr(call, "rope"):
        parts.append(f"rope={rope.mode if rope is not None else None}")
        if rope is not None:
            parts.append(f"grid={rope.height}x{rope.width}+{rope.n_prefix}"
                         f"{'/' + rope.normalize if rope.mode == 'dinov3' else ''}")
        batch, n, stride = rope_probe_shape(call)
        parts.append(f"heads={getattr(call, 'num_heads', 2)},probe={batch}x{n}x{stride}")
    return ",".join(parts)


def reset() -> None:
    """Forgets this process's results (not the disk cache)."""
    with _LOCK:
        _RESULTS.clear()
        _DISABLED.clear()
        _DISABLED_OPS.clear()


def disabled() -> dict[tuple, str]:
    """(op, backend, device) -> reason, for ``flashdino info`` / ``flashdino check``."""
    return dict(_DISABLED)


# ------------------------------------------------------------------------------------------------
# the full probe set (flashdino check)
# ------------------------------------------------------------------------------------------------


def probe_calls(device: torch.device) -> list[tuple[str, object]]:
    """(op, call) pairs covering the kernel variants the models use, in every dtype."""
    from ..ops.final_norm import FinalNormCall
    from ..ops.patch_embed import PatchEmbedCall
    from ..ops.residual_layernorm import ResidualLayerNormCall
    from ..ops.rope_attention import RopeAttentionCall, RopeGrid

    out = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for d in (64, 128):
            for rope, norm in ((None, False), (RopeGrid("dinov3", 4, 5, 1, periods=torch.ones(d // 4)), False),
                               (RopeGrid("vggt", 4, 5, 1), True)):
                if d == 128 and norm:
                    continue
                out.append(("rope_attention", RopeAttentionCall(dtype=dtype, head_dim=d, n_tokens=21,
                                                                token_stride=3 * 2 * d, rope=rope, qk_norm=norm)))
        for D in (384, 1024, 4096):
            out.append(("residual_layernorm", ResidualLayerNormCall(dtype=dtype, branch_dtype=dtype, dim=D)))
            out.append(("final_norm", FinalNormCall(dtype=dtype, dim=D, mixed_affine=False)))
        for P in (14, 16):
            out.append(("patch_embed", PatchEmbedCall(dtype=dtype, weight_dtype=dtype, patch_size=P,
                                                             needs_grad=False)))
    out.append(("patch_embed", PatchEmbedCall(dtype=torch.uint8, weight_dtype=torch.bfloat16, patch_size=16,
                                                     needs_grad=False)))
    return out


def run_all(device: torch.device) -> list[dict]:
    """Every probe (forward, and backward where the op has one) on every fast backend of ``device``."""
    rows = []
    for op, call in probe_calls(device):
        for backend in dispatch.backends(op):
            if backend == "torch":
                continue
            why = dispatch._device_rule(backend, device) or dispatch._REGISTRY[op][backend].supports(call)
            passes = (False, True) if PROBES[op](call, device).backward else (False,)
            for backward in passes:
                row = dict(op=op, backend=backend, dtype=str(getattr(call, "dtype", "")).removeprefix("torch."),
                           variant=_call_key(call) + (" bwd" if backward else ""), result="", error=None, ms=0.0)
                if why:
                    row["result"] = f"skipped: {why}"
                    rows.append(row)
                    continue
                start = time.perf_counter()
                try:
                    reason, err, variant = run_probe(op, backend, device, call, backward=backward)
                    row["variant"], row["error"] = variant, err
                    row["result"] = "ok" if reason is None else f"FAIL: {reason}"
                except Exception as exc:
                    row["result"] = f"FAIL: {exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                row["ms"] = 1000 * (time.perf_counter() - start)
                rows.append(row)
    return rows


@contextlib.contextmanager
def checking_device_type(device_type: str):
    """Test-only: runs the self-check on tensors of ``device_type`` too (e.g. "cpu" under the
    Triton interpreter), with fresh in-process results."""
    EXTRA_DEVICE_TYPES.add(device_type)
    reset()
    try:
        yield
    finally:
        EXTRA_DEVICE_TYPES.discard(device_type)
        reset()
