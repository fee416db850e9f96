"""Compile audit: every Triton launch configuration the dispatch can select, compiled for given
GPU architectures without a GPU, with registers, spills and shared memory per configuration.

How the configurations are found: the host functions of each op (the code that picks tiles and
constexprs and launches the kernels) are run on ``meta`` tensors with every Triton kernel of the
op's module replaced by a recorder. Each launch the host code would make is recorded with its
arguments, specialised exactly as Triton's launcher would (``native_specialize_impl``: pointer
dtypes, 16-divisibility, ints equal to 1) and compiled ahead of time for each target with
``triton.compile(ASTSource, GPUTarget("cuda", cc, 32))``. So the audit sees the launch
configurations the real code selects, not a copy of them.

Scenarios cover what the dispatch can route to the Triton backend: head dims of the variant table
(and every head dim the attention supports), fp16 / bf16 (and fp32 with TF32, opt-in), forward
and backward, every forward configuration on-device tuning may choose, each K-rotation mode, each RoPE mode with and without qk-norm, LayerNorm widths of
every model in the table (plus the largest supported), the final norm in both layouts and the
patch embedding. Scenarios reachable only through an opt-in setting are marked non-default:
reported, never fatal.

Resources come from ``ptxas -v`` (Triton runs it while compiling; registers, spill stores +
loads, stack frame) and the kernel's ``metadata.shared`` against the per-block shared-memory
limit of the architecture. A stack frame alone is not a spill (sin / cos keep their slow-path
argument reduction there).

Run with ``flashdino check --audit sm_80,sm_86,sm_89,sm_90 [--json FILE]``. Must run without
``TRITON_INTERPRET=1`` (kernels decorated under the interpreter cannot be compiled): a process
that imported them interpreted re-runs the audit in a clean subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

# Per-block shared memory (opt-in maximum, bytes) by architecture.
SHARED_LIMIT = {
    "sm_80": 166912, "sm_86": 101376, "sm_87": 166912, "sm_89": 101376, "sm_90": 232448,
    "sm_100": 232448, "sm_120": 101376,
}
DEFAULT_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")


class AuditUnavailable(RuntimeError):
    """Triton cannot compile here (not installed, no ptxas, no NVIDIA backend)."""


# ------------------------------------------------------------------------------------------------
# recording the launches of the host code
# ------------------------------------------------------------------------------------------------


@dataclass
class Launch:
    kernel: str
    fn: object  # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    num_warps: int
    num_stages: int

    def key(self) -> tuple:
        return (self.kernel, tuple(sorted(self.signature.items())), tuple(sorted((k, repr(v)) for k, v in
                self.constexprs.items())), tuple(sorted((k, repr(v)) for k, v in self.attrs.items())),
                self.num_warps, self.num_stages)

    def tile(self) -> str:
        blocks = [f"{k}={v}" for k, v in self.constexprs.items() if k.startswith("BLOCK")]
        return " ".join(blocks + [f"w{self.num_warps}", f"s{self.num_stages}"])


def _specialize(value) -> tuple[str, object]:
    """(type, attr) as Triton's launcher specialises an argument for the CUDA backend."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.nvidia.compiler import CUDABackend

        return native_specialize_impl(CUDABackend, value, False, True, True)
    except ImportError:  # older Triton: the same rules, by hand
        if isinstance(value, torch.Tensor):
            names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8",
                     torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}
            return "*" + names[value.dtype], "D"
        if isinstance(value, bool):
            return "u1", None
        if isinstance(value, int):
            if value == 1:
                return "constexpr", 1
            return ("i32" if -2**31 <= value < 2**31 else "i64"), ("D" if value % 16 == 0 else "")
        if isinstance(value, float):
            return "fp32", None
        raise


class _Recorder:
    def __init__(self, fn, sink: list):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        fn = self.fn
        names = fn.arg_names
        num_warps = kwargs.pop("num_warps", 4)
        num_stages = kwargs.pop("num_stages", 3)
        bound = dict(zip(names, args))
        bound.update(kwargs)
        signature, constexprs, attrs = {}, {}, {}
        for i, param in enumerate(fn.params):
            name = param.name
            if name not in bound:
                raise TypeError(f"{fn.__name__}: argument {name} missing in the recorded launch")
            value = bound[name]
            if param.is_constexpr:
                signature[name] = "constexpr"
                constexprs[name] = value
                continue
            kind, attr = _specialize(value)
            if kind == "constexpr":
                signature[name] = "constexpr"
                constexprs[name] = attr
                continue
            signature[name] = kind
            if isinstance(attr, str) and "D" in attr:
                attrs[(i,)] = [["tt.divisibility", 16]]
        self.sink.append(Launch(fn.__name__, fn, signature, constexprs, attrs, num_warps, num_stages))


@contextlib.contextmanager
def _recording(modules, sink: list):
    from triton.runtime.jit import JITFunction

    saved = []
    for module in modules:
        for name, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                saved.append((module, name, value))
                setattr(module, name, _Recorder(value, sink))
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


# ------------------------------------------------------------------------------------------------
# scenarios: what the dispatch can route to Triton
# ------------------------------------------------------------------------------------------------


@dataclass
class Scenario:
    op: str
    label: str
    run: Callable[[], None]  # calls the host code on meta tensors
    default: bool = True
    note: str = ""


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


@contextlib.contextmanager
def _tf32(allowed: bool):
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def table_head_dims() -> list[int]:
    from ..variants import VARIANTS

    return sorted({c.head_dim for c in VARIANTS.values()})


def table_widths() -> list[int]:
    from ..variants import VARIANTS

    return sorted({c.embed_dim for c in VARIANTS.values()})


def _name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def rope_scenarios() -> list[Scenario]:
    from ..ops.rope_attention import triton as tra

    out = []
    table = set(table_head_dims())
    for d in tra.SUPPORTED_HEAD_DIMS:
        heads = max(1, 1024 // d) if d <= 64 else 4096 // d
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            tf32 = dtype == torch.float32
            # (mode, qk-norm): DINOv2 (no RoPE), DINOv3, VGGT (qk-norm, rotation in the token dtype
            # or, under autocast, fp32) and a qk-norm without RoPE.
            combos = [("none", False), ("dinov3", False), ("vggt", True), ("vggt_f32", True), ("none", True)]
            if d not in table:
                combos = combos[:2]
            for mode, norm in combos:
                for k_rotation in tra.K_ROTATIONS:
                    if k_rotation != "prepass" and (mode == "none" and not norm):
                        continue  # nothing to rotate: identical to the prepass path
                    opt_in = [n for n, on in (("allow_tf32", tf32), (f"k_rotation={k_rotation}",
                                                                         k_rotation != "prepass")) if on]
                    label = f"d={d} {_name(dtype)} {mode}{'+qknorm' if norm else ''} {k_rotation}"
                    for bwd in ((False, True) if k_rotation == "prepass" else (False,)):
                        out.append(Scenario("rope_attention", label + (" bwd" if bwd else " fwd"),
                                            _rope_runner(tra, d, heads, dtype, mode, norm, k_rotation, bwd),
                                            default=not opt_in, note=", ".join(opt_in)))
            # The other forward configurations on-device tuning may choose (prepass K rotation):
            # stored tiles without (SOURCE 0) and with (SOURCE 1) a transform cover every mode.
            for cfg in tra.FWD_CANDIDATES.get((tra._precision(dtype), d), ()):
                for mode in ("none", "dinov3"):
                    out.append(Scenario("rope_attention", f"d={d} {_name(dtype)} {mode} prepass fwd tuned "
                                        f"{tra.config_name(cfg)}",
                                        _rope_runner(tra, d, heads, dtype, mode, False, "prepass", False, cfg)))
    return out


def _rope_runner(tra, d, heads, dtype, mode, norm, k_rotation, bwd, fwd_config=None):
    def run():
        H = W = 32
        n_prefix = 0 if mode == "none" else 5
        n = n_prefix + H * W if mode != "none" else 1 + 37 * 37
        B = 2
        qkv = _meta(B, n, 3 * heads * d, dtype=dtype)
        freqs = _meta(d // 4, dtype=torch.float32) if mode != "none" else None
        # the prepass, its backward post-pass and k_rotation="table" read the cos/sin table
        cos_sin = _meta(2, n_prefix + H * W, d, dtype=torch.float32) if mode != "none" else None
        qw = qb = kw = kb = None
        if norm:
            qw, qb, kw, kb = (_meta(d, dtype=dtype) for _ in range(4))
        denom = (float(H), float(W)) if mode == "dinov3" else (1.0, 1.0)
        scalars = (heads, H, W, n_prefix, mode, *denom, 1e-5, d ** -0.5)
        with _tf32(dtype == torch.float32):
            if not bwd:
                tra._forward(qkv, freqs, cos_sin, qw, qb, kw, kb, *scalars, k_rotation, fwd_config)
            else:
                out = _meta(B, n, heads * d, dtype=dtype)
                lse = _meta(B, heads, n, dtype=torch.float32)
                tra._backward(out, qkv, out, lse, freqs, cos_sin, qw, qb, kw, kb, *scalars)
    return run


def norm_scenarios() -> list[Scenario]:
    from ..ops.final_norm import triton as ftn
    from ..ops.residual_layernorm import triton as rtn

    widths = sorted(set(table_widths()) | {rtn.MAX_DIM})
    out = []
    for D in widths:
        beyond = D not in table_widths()
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            tag = f"D={D} {_name(dtype)}"

            def res_fwd(D=D, dtype=dtype):
                x = _meta(4, 257, D, dtype=dtype)
                g, w, b = (_meta(D, dtype=dtype) for _ in range(3))
                raw(rtn.residual_layernorm_fwd)(x, x, g, w, b, 1e-6, dtype)

            def res_bwd(D=D, dtype=dtype):
                x = _meta(4, 257, D, dtype=dtype)
                stats = _meta(4 * 257, dtype=torch.float32)
                rtn.layernorm_backward(x, x, stats, stats, _meta(D, dtype=dtype), True, dtype, x, x,
                                       _meta(D, dtype=dtype))

            def ln_bwd(D=D, dtype=dtype):  # the final norm's backward: no residual terms
                x = _meta(4, 257, D, dtype=dtype)
                stats = _meta(4 * 257, dtype=torch.float32)
                rtn.layernorm_backward(x, x, stats, stats, _meta(D, dtype=dtype), True, dtype)

            out += [Scenario("residual_layernorm", f"{tag} fwd", res_fwd),
                    Scenario("residual_layernorm", f"{tag} bwd", res_bwd),
                    Scenario("final_norm", f"{tag} bwd", ln_bwd)]
            for untied in (False, True):
                for nchw in (False, True):
                    def fin(D=D, dtype=dtype, untied=untied, nchw=nchw):
                        x = _meta(4, 5 + 32 * 32, D, dtype=dtype)
                        w, b = _meta(D, dtype=dtype), _meta(D, dtype=dtype)
                        raw(ftn.final_norm_fwd)(x, w, b, w if untied else None, b if untied else None, untied, 5,
                                                1e-6, 32, 32, nchw, dtype)
                    out.append(Scenario("final_norm", f"{tag} fwd{' untied' if untied else ''}"
                                        f"{' [B,D,H,W]' if nchw else ' tokens'}", fin))
        if beyond:
            for s in out:
                if s.label.startswith(f"D={D} "):
                    s.note = "beyond the variant table (supported width)"
    return out


def patch_scenarios() -> list[Scenario]:
    from ..ops.patch_embed import triton as ptn

    out = []
    for D in table_widths():
        for P in (14, 16):
            for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.uint8):
                wdtype = torch.bfloat16 if dtype == torch.uint8 else dtype
                for pos, masks, cl in ((P == 14, False, False), (P == 14, True, dtype == torch.uint8)):
                    tf32s = (True, False) if dtype == torch.float32 else (True,)
                    for tf32 in tf32s:
                        def run(D=D, P=P, dtype=dtype, wdtype=wdtype, pos=pos, masks=masks, cl=cl, tf32=tf32):
                            Hp = Wp = 16
                            shape = (2, Hp * P, Wp * P, 3) if cl else (2, 3, Hp * P, Wp * P)
                            x = _meta(*shape, dtype=dtype)
                            w = _meta(D, 3, P, P, dtype=wdtype)
                            before = torch.backends.cudnn.allow_tf32
                            torch.backends.cudnn.allow_tf32 = tf32
                            try:
                                raw(ptn.patch_embed_tokens_op)(
                                    x, w, _meta(D, dtype=wdtype), _meta(1, 1, D, dtype=wdtype), None,
                                    _meta(2, Hp * Wp, dtype=torch.bool) if masks else None,
                                    _meta(1, D, dtype=wdtype) if masks else None,
                                    _meta(1, 1 + Hp * Wp, D, dtype=wdtype) if pos else None, cl,
                                    [0.5] * 3 if dtype == torch.uint8 else None,
                                    [0.25] * 3 if dtype == torch.uint8 else None, wdtype, wdtype, wdtype)
                            finally:
                                torch.backends.cudnn.allow_tf32 = before
                        label = (f"D={D} P={P} {_name(dtype)}{' NHWC' if cl else ''}{' +pos' if pos else ''}"
                                 f"{' +masks' if masks else ''}{'' if tf32 else ' ieee'}")
                        out.append(Scenario("patch_embed", label, run, default=tf32,
                                            note="" if tf32 else "cudnn.allow_tf32=False"))
    return out


def scenarios() -> list[Scenario]:
    return rope_scenarios() + norm_scenarios() + patch_scenarios()


def raw(custom_op):
    """The Python function behind a ``torch.library.custom_op`` (its fake would run on meta)."""
    fn = getattr(custom_op, "_init_fn", None)
    if fn is None:
        raise AuditUnavailable("this torch has no CustomOpDef._init_fn; the audit needs torch >= 2.4")
    return fn


def _modules():
    from ..ops.final_norm import triton as a
    from ..ops.patch_embed import triton as b
    from ..ops.residual_layernorm import triton as c
    from ..ops.rope_attention import triton as d

    return (a, b, c, d)


def collect(selected: Optional[Callable[[Scenario], bool]] = None) -> list[tuple[Scenario, Launch]]:
    """(scenario, launch) for every kernel launch of every scenario."""
    out = []
    mods = _modules()
    for sc in scenarios():
        if selected is not None and not selected(sc):
            continue
        sink: list = []
        with _recording(mods, sink):
            sc.run()
        out += [(sc, launch) for launch in sink]
    return out


# ------------------------------------------------------------------------------------------------
# compiling
# ------------------------------------------------------------------------------------------------


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(path):
        return path
    found = shutil.which("cuobjdump")
    if not found:
        raise AuditUnavailable("no cuobjdump (Triton's bundled one is missing and none is on PATH)")
    return found


def _resources(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        name = f.name
    try:
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", name], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(name)
    usage = {}
    for key in ("REG", "STACK", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", text)
        usage[key] = int(m.group(1)) if m else 0
    return usage


_COMPILED: dict = {}


_PTXAS_LINE = re.compile(r"Used (\d+) registers.*?(\d+) bytes stack frame, (\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads", re.S)


def _ptxas_usage(ptx: str, cc: int) -> Optional[dict]:
    """Registers and spill bytes from ``ptxas -v`` on the kernel's PTX (Triton's own ptxas)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(cc).path
    except Exception:
        return None
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    m = _PTXAS_LINE.search(proc.stderr)
    if not m:
        return None
    return dict(REG=int(m.group(1)), STACK=int(m.group(2)), SPILL=int(m.group(3)) + int(m.group(4)))


def _parse_ptxas_log(text: str) -> Optional[dict]:
    m = _PTXAS_LINE.search(text or "")
    if not m:
        return None
    return dict(REG=int(m.group(1)), STACK=int(m.group(2)), SPILL=int(m.group(3)) + int(m.group(4)))


def compile_launch(launch: Launch, arch: str) -> dict:
    """{regs, spill, stack, shared, error} of one launch compiled for ``arch`` (cached per process).

    ``spill`` is ptxas's spill stores + loads in bytes (registers that did not fit). ``stack`` is
    the stack frame, which is not a spill by itself: the slow path of sin / cos (Payne-Hanek
    argument reduction) keeps a small array there.
    """
    key = (launch.key(), arch)
    if key in _COMPILED:
        return _COMPILED[key]
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    cc = int(arch.removeprefix("sm_"))
    try:
        src = ASTSource(fn=launch.fn, signature=launch.signature, constexprs=launch.constexprs, attrs=launch.attrs)
        log = io.StringIO()
        previous = os.environ.get("TRITON_DUMP_PTXAS_LOG")
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton runs ptxas -v; print its report
        try:
            with contextlib.redirect_stdout(log):
                ck = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                    options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
        finally:
            if previous is None:
                os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)
            else:
                os.environ["TRITON_DUMP_PTXAS_LOG"] = previous
        # A kernel from Triton's disk cache printed nothing: run ptxas -v on its PTX.
        usage = _parse_ptxas_log(log.getvalue()) or _ptxas_usage(ck.asm["ptx"], cc)
        if usage is None:  # no ptxas report: the cubin's local memory is the best estimate
            dump = _resources(ck.asm["cubin"])
            usage = dict(REG=dump["REG"], STACK=dump["STACK"], SPILL=dump["LOCAL"])
        result = dict(regs=usage["REG"], spill=usage["SPILL"], stack=usage["STACK"],
                      shared=int(ck.metadata.shared), error=None)
    except AuditUnavailable:
        raise
    except Exception as exc:
        result = dict(regs=None, spill=None, stack=None, shared=None,
                      error=f"{exc.__class__.__name__}: {str(exc)[:300]}")
    _COMPILED[key] = result
    return result


@dataclass
class Row:
    kernel: str
    arch: str
    config: str
    tile: str
    regs: Optional[int]
    spill: Optional[int]
    stack: Optional[int]
    shared: Optional[int]
    limit: int
    default: bool
    note: str
    scenarios: int = 1
    error: Optional[str] = None
    status: str = field(default="ok")


def _check_toolchain():
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise AuditUnavailable("TRITON_INTERPRET=1 is set (run the audit in a process without it)")
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except Exception as exc:
        raise AuditUnavailable(f"Triton cannot compile here: {exc}") from exc
    import inspect

    if "constexprs" not in inspect.signature(ASTSource).parameters:  # Triton < 3.3 names it differently
        raise AuditUnavailable(f"the audit needs the ASTSource(constexprs=...) API of Triton >= 3.3 "
                               f"(found triton {triton.__version__}); the kernels themselves support >= 3.2")
    _cuobjdump()


def select_scenarios(default_only: bool = False, quick: bool = False) -> Callable[[Scenario], bool]:
    """``default_only``: the configurations selectable by default; ``quick``: bf16 only (fp16 and
    fp32 compile to the same tiles; the CI test, the committed JSON has every dtype)."""
    def keep(s: Scenario) -> bool:
        return (s.default or not default_only) and (not quick or "bfloat16" in s.label)
    return keep


def run_audit(archs=DEFAULT_ARCHS, default_only: bool = False, progress=None, quick: bool = False) -> list[Row]:
    """Compiles every selectable launch for each arch; one row per distinct compiled kernel."""
    _check_toolchain()
    for arch in archs:
        if arch not in SHARED_LIMIT:
            raise ValueError(f"unknown architecture {arch!r} (known: {', '.join(SHARED_LIMIT)})")
    pairs = collect(select_scenarios(default_only, quick))
    # One row per distinct launch: the first scenario names it, default if any scenario is default.
    distinct: dict = {}
    for sc, launch in pairs:
        entry = distinct.setdefault(launch.key(), dict(launch=launch, sc=sc, default=False, notes=set(), n=0))
        entry["default"] |= sc.default
        entry["n"] += 1
        if sc.note:
            entry["notes"].add(sc.note)
    rows = []
    for arch in archs:
        for i, entry in enumerate(distinct.values()):
            launch, sc = entry["launch"], entry["sc"]
            res = compile_launch(launch, arch)
            limit = SHARED_LIMIT[arch]
            status = "ok"
            if res["error"]:
                status = "COMPILE ERROR"
            elif res["spill"]:
                status = "SPILL"
            elif res["shared"] > limit:
                status = "SMEM"
            notes = "" if entry["default"] else "; ".join(sorted(entry["notes"])) or "non-default"
            kernel = f"{sc.op}.{launch.kernel.strip('_').removesuffix('_kernel')}"
            rows.append(Row(kernel, arch, sc.label, launch.tile(), res["regs"], res["spill"], res["stack"],
                            res["shared"], limit, entry["default"], notes, entry["n"], res["error"], status))
            if progress:
                progress(arch, i + 1, len(distinct))
    return rows


def failures(rows: list[Row]) -> list[Row]:
    """Rows that make the audit fail: a problem in a configuration selectable by default."""
    return [r for r in rows if r.default and r.status != "ok"]


def format_table(rows: list[Row]) -> str:
    head = ("kernel", "arch", "config", "tile", "regs", "spill B", "smem B", "limit", "status")
    body = []
    for r in rows:
        status = r.status if r.default else f"{r.status} (non-default: {r.note})"
        body.append((r.kernel, r.arch, r.config, r.tile, "-" if r.regs is None else str(r.regs),
                     "-" if r.spill is None else str(r.spill), "-" if r.shared is None else str(r.shared),
                     str(r.limit), status))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def summary(rows: list[Row]) -> list[dict]:
    """Per kernel and arch: the worst registers / spill / shared memory over default configurations."""
    groups: dict = {}
    for r in rows:
        if not r.default or r.regs is None:
            continue
        g = groups.setdefault((r.kernel, r.arch), dict(kernel=r.kernel, arch=r.arch, configs=0, max_regs=0,
                                                       max_spill=0, max_shared=0, limit=r.limit))
        g["configs"] += 1
        g["max_regs"] = max(g["max_regs"], r.regs)
        g["max_spill"] = max(g["max_spill"], r.spill)
        g["max_shared"] = max(g["max_shared"], r.shared)
    return list(groups.values())


def to_json(rows: list[Row], archs, seconds: float) -> dict:
    import triton

    return dict(
        tool="flashdino check --audit", archs=list(archs), triton=triton.__version__, torch=torch.__version__,
        seconds=round(seconds, 1), failures=len(failures(rows)),
        default_configs=sum(r.default for r in rows), non_default_configs=sum(not r.default for r in rows),
        summary=summary(rows), rows=[asdict(r) for r in rows],
    )


def _progress(arch, done, total):
    if done % 25 == 0 or done == total:
        print(f"  {arch}: {done}/{total} compiled", file=sys.stderr, flush=True)


def main(archs=DEFAULT_ARCHS, json_path: Optional[str] = None, default_only: bool = False, out=None,
         quick: bool = False) -> int:
    """Prints the table; returns 0, 1 (a default configuration spills / overflows / fails) or 3
    (Triton cannot compile here)."""
    out = out or sys.stdout
    if os.environ.get("TRITON_INTERPRET") == "1" or _kernels_interpreted():
        return _in_subprocess(archs, json_path, default_only, out, quick)
    start = time.time()
    try:
        rows = run_audit(archs, default_only, _progress, quick)
    except AuditUnavailable as exc:
        print(f"flashdino check --audit: cannot compile here: {exc}", file=out)
        return 3
    seconds = time.time() - start
    print(format_table(rows), file=out)
    bad = failures(rows)
    flagged = [r for r in rows if not r.default and r.status != "ok"]
    print(f"\n{len(rows)} compiled configurations ({sum(r.default for r in rows)} selectable by default) for "
          f"{', '.join(archs)} in {seconds:.0f} s; {len(bad)} failing default configurations; "
          f"{len(flagged)} non-default configurations flagged (not fatal).", file=out)
    if json_path:
        text = json.dumps(to_json(rows, archs, seconds), indent=1)
        tmp = f"{json_path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        os.replace(tmp, json_path)
        print(f"wrote {json_path}", file=out)
    return 1 if bad else 0


def _kernels_interpreted() -> bool:
    """Whether flashdino's Triton kernels were decorated under the interpreter in this process."""
    mod = sys.modules.get("flashdino.ops.rope_attention.triton_kernels")
    if mod is None:
        return False
    from triton.runtime.jit import JITFunction

    return not isinstance(getattr(mod, "_fwd_kernel", None), JITFunction)


def _in_subprocess(archs, json_path, default_only, out, quick=False) -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "flashdino.check.audit", ",".join(archs)]
    if json_path:
        cmd += ["--json", json_path]
    if default_only:
        cmd += ["--default-only"]
    if quick:
        cmd += ["--quick"]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    out.write(proc.stdout)
    return proc.returncode


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m flashdino.check.audit")
    parser.add_argument("archs", nargs="?", default=",".join(DEFAULT_ARCHS))
    parser.add_argument("--json")
    parser.add_argument("--default-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="bf16 configurations only")
    a = parser.parse_args()
    sys.exit(main(tuple(x.strip() for x in a.archs.split(",") if x.strip()), a.json, a.default_only, quick=a.quick))
