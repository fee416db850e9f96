"""On-device tuning: for each op, dtype and shape bucket, the fastest candidate that passed the
self-check, measured on this GPU the first time such a call runs.

A fixed preference order is a guess about speed on hardware nobody measured; this replaces it with
a measurement on the user's GPU. Candidates (``dispatch.variants``): each backend's default and
its registered variants -- for ``rope_attention`` every audited Triton forward configuration
(``ops/rope_attention/triton.py``, ``FWD_CONFIGS`` + ``FWD_CANDIDATES``), the CUDA RoPE + SDPA path
and the PyTorch path (plain RoPE + SDPA), each with SDPA's flash / efficient / cudnn kernel and
xformers where installed. Ops without a tuning workload (the norms, the patch embedding: one fast
backend each) keep the fixed order.

* When: the first eager call of an op on a CUDA device for a (dtype, head dim, RoPE mode, qk-norm,
  tokens rounded up to a power of two, batch x heads rounded up to a power of two) bucket. The
  forward is timed (``torch.no_grad``) on a call of that shape (batch capped so that qkv stays
  under 64 Mi elements); the backward of the chosen backend serves training.
* Cost: at most ``BUDGET_S`` (1 s) of timing per op and bucket (the fixed order's choice and the
  PyTorch path are always timed, the others while the budget lasts), plus first-use work reported
  apart: the first compile of each Triton configuration (cached on disk by Triton, so once per
  machine) and the variants' self-check probes. A candidate whose median is ``SLOWER``
  (1.5x) the best so far after ``MIN_RUNS`` samples is dropped. Once per machine: results are
  stored beside the self-check's (``tune.json`` in the self-check's cache folder) per GPU, driver,
  versions and overrides (``selfcheck.fingerprint``), and read back (and re-checked) by later
  processes.
* Never while ``torch.compile`` traces or a CUDA graph captures: then only the in-memory table
  is read (a bucket not tuned yet takes the fixed order), so traced code never times anything.
* ``FLASHDINO_TUNE=0``: the fixed preference order. ``backend=``, ``dispatch.use`` and
  ``FLASHDINO_BACKEND[_<OP>]`` win over tuning (and run the backend's default variant).
* ``flashdino check --tune`` tunes the models' typical calls with a larger budget and prints
  every candidate's time; ``flashdino info`` lists the stored choices.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import dispatch
from . import selfcheck

ENV_SWITCH = "FLASHDINO_TUNE"
BUDGET_S = 1.0  # timing per op and bucket on first use
SLOWER = 1.5  # dropped once its median is this much slower than the best so far
MIN_RUNS = 3
MAX_RUNS = 10
SAMPLE_S = 1e-3  # one sample repeats the call until it lasts about this long (launch overheads)
MAX_REPEATS = 50
MAX_ELEMENTS = 1 << 26  # the timed qkv's batch is capped to stay under this many elements

# Injectable for tests: seconds, monotonic. On CUDA each sample is bracketed by synchronisations.
_CLOCK: list = [time.perf_counter]
# (op, device key, bucket) -> (backend, variant, reason): the device-free table the dispatch
# consults; _DECISIONS holds the measurements behind each entry.
_TABLE: dict[tuple, Optional[tuple[str, str, str]]] = {}  # None: the fixed order (nothing passed)
_DECISIONS: dict[tuple, "Decision"] = {}
_MISSING = object()
_LOCK = threading.RLock()
_ACTIVE = threading.local()
# Test-only hook: device types, besides "cuda", on which calls are tuned (e.g. {"cpu"}).
EXTRA_DEVICE_TYPES: set = set()


def enabled() -> bool:
    value = os.environ.get(ENV_SWITCH)  # read at every call on a GPU: kept cheap
    return value is None or value.strip().lower() not in ("0", "false", "off", "no")


def set_clock(clock: Optional[Callable[[], float]] = None) -> None:
    """Replaces the clock of the measurements (None: ``time.perf_counter``)."""
    _CLOCK[0] = clock or time.perf_counter


# ------------------------------------------------------------------------------------------------
# workloads: the bucket of a call and a call of that shape to time
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    bucket: Callable[[object], Optional[tuple]]  # device-free key of the call's bucket (None: not tunable)
    build: Callable[[object, torch.device], tuple]  # arguments of a call of that shape
    describe: Callable[[tuple], str]


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _rope_bucket(call) -> Optional[tuple]:
    """Computed at every call on a GPU: plain attribute reads and integer arithmetic."""
    n, bh = call.n_tokens, call.batch * call.num_heads
    if type(n) is not int or type(bh) is not int:  # symbolic sizes (dynamic torch.compile): not tuned
        return None
    rope = call.rope
    return (call.dtype, call.head_dim, rope.mode if rope is not None else "none", call.qk_norm,
            1 << (n - 1).bit_length() if n > 1 else 1, 1 << (bh - 1).bit_length() if bh > 1 else 1)


def _rope_describe(bucket: tuple) -> str:
    dtype, d, mode, qk_norm, tokens, bh = bucket
    return (f"{str(dtype).removeprefix('torch.')} d={d} {mode}{'+qknorm' if qk_norm else ''} tokens<={tokens} "
            f"BxH<={bh}")


def _rope_build(call, device: torch.device) -> tuple:
    gen = torch.Generator(device="cpu").manual_seed(0)
    width = 3 * call.num_heads * call.head_dim
    # The call's batch, capped in memory by one that Triton specialises alike (the timed kernel is
    # the one the model runs: compiled once).
    batch = selfcheck.same_class(call.batch, max(2, MAX_ELEMENTS // max(call.n_tokens * width, 1)))
    qkv = torch.randn((batch, call.n_tokens, width), generator=gen).to(device=device, dtype=call.dtype)
    norms = (None, None)
    if call.qk_norm:
        norms = tuple((torch.ones(call.head_dim, device=device, dtype=call.dtype),
                       torch.zeros(call.head_dim, device=device, dtype=call.dtype)) for _ in range(2))
    return (qkv, call.num_heads, call.rope, norms[0], norms[1], 1e-5, None)


WORKLOADS: dict[str, Workload] = {"rope_attention": Workload(_rope_bucket, _rope_build, _rope_describe)}


def register_workload(op: str, workload: Workload) -> None:
    """Makes ``op`` tunable (ops without a workload keep the fixed preference order)."""
    WORKLOADS[op] = workload


# ------------------------------------------------------------------------------------------------
# decisions
# ------------------------------------------------------------------------------------------------


@dataclass
class Decision:
    backend: str
    variant: str
    bucket: str  # described
    # candidate name -> {"ms": median or None, "runs": n, "status": "timed" / "stopped early" /
    # "skipped: ..." / "failed: ..."}
    candidates: dict = field(default_factory=dict)
    pytorch_ms: Optional[float] = None
    seconds: float = 0.0  # timing (bounded by the budget)
    first_use_s: float = 0.0  # warm-ups (compilation) and the variants' self-check probes
    source: str = "measured"  # "measured" here, or "stored" (read back from tune.json)

    @property
    def name(self) -> str:
        return candidate_name(self.backend, self.variant)

    @property
    def ms(self) -> Optional[float]:
        return (self.candidates.get(self.name) or {}).get("ms")

    def reason(self) -> str:
        if self.ms is None or self.pytorch_ms is None:
            return f"tuned on this GPU ({self.bucket}): {self.name}"
        return (f"fastest on this GPU ({self.bucket}): {self.name} {self.ms:.3f} ms, PyTorch's path "
                f"{self.pytorch_ms:.3f} ms ({self.pytorch_ms / self.ms:.2f}x)")


def candidate_name(backend: str, variant: str) -> str:
    return backend if not variant else f"{backend}:{variant}"


def _device_key(device: torch.device) -> tuple:
    if device.type == "cuda" and device.index is None:
        return ("cuda", torch.cuda.current_device())
    return (device.type, device.index)


def choose(op: str, call, device: torch.device, measure: bool = True) -> Optional[tuple[str, str, str]]:
    """The dispatch hook: (backend, variant, reason) of the tuned choice, or None for the fixed
    order. Tunes the call's bucket first when it is new, unless ``measure`` is False, tracing or
    capture is under way, or tuning is off."""
    workload = WORKLOADS.get(op)
    if workload is None or (device.type != "cuda" and device.type not in EXTRA_DEVICE_TYPES) or not enabled():
        return None
    bucket = workload.bucket(call)
    if bucket is None:
        return None
    key = (op, _device_key(device), bucket)
    found = _TABLE.get(key, _MISSING)  # the hot path, and all that traced code does
    if found is not _MISSING:
        return found
    if not measure or getattr(_ACTIVE, "on", False) or selfcheck._tracing(device):
        return None
    with _LOCK:
        if key not in _TABLE:
            try:
                decision = _stored(op, call, device, bucket) or tune(op, call, device)
            except Exception as exc:  # e.g. out of memory for the timed copy: never fail the user's call
                warnings.warn(f"flashdino: tuning {op} ({workload.describe(bucket)}) failed, the fixed backend "
                              f"order serves it in this process: {exc.__class__.__name__}: {exc}", RuntimeWarning,
                              stacklevel=5)
                decision = None
            if decision is not None:
                _DECISIONS[key] = decision
            _TABLE[key] = None if decision is None else (decision.backend, decision.variant, decision.reason())
        return _TABLE[key]


def candidates(op: str, call, device: torch.device) -> list[tuple[str, str, Optional[str]]]:
    """(backend, variant, None or why its backend cannot run the call) for every candidate of
    ``call``: the fixed order's choice first, then PyTorch's path, then the others by backend
    preference. A backend's default has passed its self-check when the reason is None; a variant's
    own self-check runs when it is about to be timed (:func:`tune`)."""
    spec = dispatch._OPS[op]
    order = list(spec.preference) + [b for b in dispatch.backends(op) if b not in spec.preference]
    out = []
    for backend in order:
        why = dispatch._why_not(op, backend, device, call)
        out += [(backend, variant, why) for variant in dispatch.variants(op, backend, call)]
    fixed = next((c for c in out if c[2] is None and not c[1]), None)
    first = list(dict.fromkeys(c for c in (fixed, ("torch", "", None)) if c is not None))
    return first + [c for c in out if c not in first]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sample(run: Callable, repeats: int, device: torch.device) -> float:
    clock = _CLOCK[0]
    _sync(device)
    start = clock()
    for _ in range(repeats):
        run()
    _sync(device)
    return (clock() - start) / repeats


def tune(op: str, call, device: torch.device, budget: float = BUDGET_S) -> Optional[Decision]:
    """Times the candidates of ``call`` on a call of its shape and stores the decision."""
    workload = WORKLOADS[op]
    clock = _CLOCK[0]
    start = clock()
    # The budget bounds the timing; first-use work (compiling a Triton configuration, a cuDNN plan,
    # a variant's self-check probe) is reported apart: Triton caches compiled kernels on disk.
    first_use = [0.0]
    spent = lambda: clock() - start - first_use[0]  # noqa: E731
    _ACTIVE.on = True
    try:
        # Forward only, and as the self-check probes it: outside the caller's autocast.
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            args = workload.build(call, device)
            cands = candidates(op, call, device)  # runs the backends' first-use self-checks
            first_use[0] = clock() - start
            must = {(b, v) for b, v, why in cands[:2] if not v and why is None}  # fixed order's, PyTorch's
            results: dict[str, dict] = {}
            best = math.inf
            for backend, variant, why in cands:
                name = candidate_name(backend, variant)
                if why is None and (backend, variant) not in must and spent() > budget:
                    results[name] = dict(ms=None, runs=0, status=f"skipped: the {budget:g} s budget was spent")
                    continue
                if why is None and variant:  # never timed, never chosen unless it matches the reference
                    before = clock()
                    why = selfcheck.verify(op, backend, device, call, variant)
                    first_use[0] += clock() - before
                if why is not None:
                    results[name] = dict(ms=None, runs=0, status=f"skipped: {why}")
                    continue
                results[name] = _time_candidate(dispatch.implementation(op, backend, variant), args, device,
                                                best, spent, budget, first_use)
                if results[name]["ms"] is not None and results[name]["status"] == "timed":
                    best = min(best, results[name]["ms"] / 1000)  # seconds, like the samples
    finally:
        _ACTIVE.on = False
    timed = {n: r["ms"] for n, r in results.items() if r["ms"] is not None}
    if not timed:
        return None
    winner = min(timed, key=timed.get)
    backend, _, variant = winner.partition(":")
    decision = Decision(backend, variant, workload.describe(workload.bucket(call)), results,
                        timed.get("torch"), round(spent(), 4), round(first_use[0], 4))
    _store(op, device, workload.bucket(call), decision)
    return decision


def _time_candidate(fn: Callable, args: tuple, device: torch.device, best: float, spent: Callable[[], float],
                    budget: float, first_use: list) -> dict:
    run = lambda: fn(*args)  # noqa: E731
    try:
        first_use[0] += _sample(run, 1, device)  # warm-up: compilation, SDPA / cuDNN plans
        first = _sample(run, 1, device)
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        return dict(ms=None, runs=0, status=f"failed: {exc.__class__.__name__}: {first_line}"[:200])
    repeats = max(1, min(MAX_REPEATS, math.ceil(SAMPLE_S / first))) if first > 0 else MAX_REPEATS
    samples = [first]
    status = "timed"
    while len(samples) < MAX_RUNS:
        samples.append(_sample(run, repeats, device))
        if len(samples) >= MIN_RUNS:
            if statistics.median(samples) > SLOWER * best:
                status = "stopped early"
                break
            if spent() > budget:
                break
    return dict(ms=round(1000 * statistics.median(samples), 4), runs=len(samples), status=status)


# ------------------------------------------------------------------------------------------------
# the disk store, beside the self-check's results
# ------------------------------------------------------------------------------------------------


def store_path() -> Path:
    return selfcheck.cache_path().with_name("tune.json")


def _disk_key(op: str, bucket: tuple) -> str:
    return f"{op} | " + " | ".join(str(b).removeprefix("torch.") for b in bucket)


def load_store() -> dict:
    return selfcheck.read_json_object(store_path())


def _store(op: str, device: torch.device, bucket: tuple, decision: Decision) -> None:
    """Adds one decision to the store (atomic replace; a read-only cache is not an error)."""
    selfcheck.store_json_entry(store_path(), selfcheck.fingerprint(device), _disk_key(op, bucket), asdict(decision))


def _stored(op: str, call, device: torch.device, bucket: tuple) -> Optional[Decision]:
    """The stored decision of this bucket on this GPU / driver / versions / overrides, if it is
    well formed and its choice still exists and passes its checks here."""
    entry = load_store().get(selfcheck.fingerprint(device), {}).get(_disk_key(op, bucket))
    try:
        decision = Decision(**{k: entry[k] for k in ("backend", "variant", "bucket", "candidates", "pytorch_ms",
                                                     "seconds", "first_use_s")})
    except (TypeError, KeyError):
        return None
    if (not isinstance(decision.backend, str) or not isinstance(decision.variant, str)
            or decision.variant not in dispatch.variants(op, decision.backend, call)
            or dispatch._why_not(op, decision.backend, device, call) is not None
            or (decision.variant and selfcheck.verify(op, decision.backend, device, call, decision.variant))):
        return None
    decision.source = "stored"
    return decision


def reset() -> None:
    """Forgets this process's decisions (not the store)."""
    with _LOCK:
        _TABLE.clear()
        _DECISIONS.clear()


def decisions() -> dict[tuple, Decision]:
    """(op, device, bucket) -> the decision (with its measurements) made or read in this process."""
    return dict(_DECISIONS)


# ------------------------------------------------------------------------------------------------
# flashdino check --tune and flashdino info
# ------------------------------------------------------------------------------------------------


def typical_calls(device: torch.device) -> list[tuple[str, str, object]]:
    """(label, op, call): the attention calls of the models' usual settings, in bf16."""
    from ..ops.rope_attention import RopeAttentionCall, RopeGrid

    def dinov3(side, heads, d, batch):
        grid = RopeGrid("dinov3", side, side, 5, periods=torch.ones(d // 4, device=device))
        return RopeAttentionCall(dtype=torch.bfloat16, head_dim=d, n_tokens=grid.tokens_per_frame,
                                 token_stride=3 * heads * d, rope=grid, qk_norm=False, batch=batch, num_heads=heads)

    vggt = RopeGrid("vggt", 37, 37, 5)
    return [
        ("DINOv3 ViT-S/16 224 px, batch 256", "rope_attention", dinov3(14, 6, 64, 256)),
        ("DINOv3 ViT-B/16 224 px, batch 128", "rope_attention", dinov3(14, 12, 64, 128)),
        ("DINOv3 ViT-L/16 512 px, batch 64", "rope_attention", dinov3(32, 16, 64, 64)),
        ("DINOv3 ViT-7B/16 512 px, batch 8", "rope_attention", dinov3(32, 32, 128, 8)),
        ("DINOv2 ViT-L/14 518 px + 4 registers, batch 32", "rope_attention", RopeAttentionCall(
            dtype=torch.bfloat16, head_dim=64, n_tokens=1 + 4 + 37 * 37, token_stride=3 * 1024, rope=None,
            qk_norm=False, batch=32, num_heads=16)),
        ("VGGT frame attention, 10 frames of 518 px", "rope_attention", RopeAttentionCall(
            dtype=torch.bfloat16, head_dim=64, n_tokens=vggt.tokens_per_frame, token_stride=3 * 1024, rope=vggt,
            qk_norm=True, batch=10, num_heads=16)),
        ("VGGT global attention, 10 frames of 518 px", "rope_attention", RopeAttentionCall(
            dtype=torch.bfloat16, head_dim=64, n_tokens=10 * vggt.tokens_per_frame, token_stride=3 * 1024, rope=vggt,
            qk_norm=True, batch=1, num_heads=16)),
    ]


def run_report(device: torch.device, calls=None, budget: float = 4.0) -> list[dict]:
    """Tunes each call (again, with ``budget`` seconds each) and stores the decisions: one row per
    call with every candidate's time (``flashdino check --tune``)."""
    rows = []
    for label, op, call in (typical_calls(device) if calls is None else calls):
        workload = WORKLOADS[op]
        key = (op, _device_key(device), workload.bucket(call))
        error = None
        with _LOCK:
            try:
                decision = tune(op, call, device, budget=budget)
            except Exception as exc:  # e.g. out of memory: report it, tune the next call
                decision, error = None, f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if decision is not None:
                _DECISIONS[key] = decision
                _TABLE[key] = (decision.backend, decision.variant, decision.reason())
        rows.append(dict(label=label, op=op, bucket=workload.describe(workload.bucket(call)),
                         decision=None if decision is None else asdict(decision),
                         chosen=None if decision is None else decision.name, error=error))
    return rows


def format_report(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        lines.append(f"{row['op']}  {row['bucket']}  ({row['label']})")
        decision = row["decision"]
        if decision is None:
            lines.append(f"  no candidate could be timed{': ' + row['error'] if row.get('error') else ''}; the fixed "
                         f"backend order serves these calls")
            continue
        for name, result in decision["candidates"].items():
            ms = "-" if result["ms"] is None else f"{result['ms']:.3f} ms"
            mark = "*" if name == row["chosen"] else " "
            lines.append(f"  {mark} {name:<24} {ms:>12}  {result['runs']:>2} runs  {result['status']}")
        chosen_ms = decision["candidates"][row["chosen"]]["ms"]
        torch_ms = decision["pytorch_ms"]
        ratio = (f"chosen / PyTorch's path = {chosen_ms / torch_ms:.2f} ({torch_ms / chosen_ms:.2f}x the speed)"
                 if torch_ms and chosen_ms else "PyTorch's path was not timed")
        lines.append(f"  chosen: {row['chosen']} ({chosen_ms:.3f} ms); {ratio}; timing took "
                     f"{decision['seconds']:.2f} s, first-use compilation and checks {decision['first_use_s']:.2f} s")
    return "\n".join(lines)


def stored_choices() -> list[dict]:
    """The decisions in the store, for ``flashdino info``: one dict per GPU fingerprint and bucket."""
    out = []
    for fp, entries in sorted(load_store().items()):
        if not isinstance(entries, dict):
            continue
        for key, entry in sorted(entries.items()):
            if not isinstance(entry, dict):
                continue
            backend, variant = entry.get("backend"), entry.get("variant")
            ms = ((entry.get("candidates") or {}).get(candidate_name(str(backend), str(variant or ""))) or {}).get("ms")
            out.append(dict(gpu=fp, op=key.split(" | ")[0], bucket=entry.get("bucket"),
                            choice=candidate_name(str(backend), str(variant or "")), ms=ms,
                            pytorch_ms=entry.get("pytorch_ms")))
    return out
