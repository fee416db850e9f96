"""``flashdino bench``: flashdino end to end against HF transformers, torch.compile and timm.

Measures, in one process and on one device, each case (model, resolution, batch, dtype, mode)
for every peer (:mod:`.peers`): throughput at a large batch (``inference``), latency at batch 1
(``latency``), forward + backward throughput (``training``), each with its peak memory, and
``memory``: the largest square image one GPU handles at batch 1 (binary search, OOM caught).
Every row carries its MFU against the GEMM rate measured in the same run (:mod:`.probes`), the
check of its output tokens against flashdino's PyTorch path on the same input, and, for
flashdino, which backend ran each op (:mod:`.backends`). Timing follows :mod:`.timing`: CUDA
events per call on a GPU (latency: host wall clock, synchronised per call); on a CPU the peers
of a case take turns call by call, with a short GEMM probe every round.

    flashdino bench                                           # everything the device supports
    flashdino bench --ci                                      # the CI-sized CPU table
    flashdino bench --models vitl16 --res 512 --modes inference --peers flashdino,hf,hf-compile
    flashdino bench --modes memory --models vitl16            # largest image at batch 1 (GPU)
    flashdino bench --targets                                 # only the cases of the targets

Results: ``benchmarks/results/e2e_<device>.json`` and ``.md``, rewritten after each model so that
an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..variants import get_config, resolve_name
from .backends import backends_ran
from .flops import model_flops, tokens_per_image
from .peers import DTYPES, PEERS, Case, ModelGroup, Skip, compare_tokens, peer_available, res_for
from .probes import device_rates, measure_gemm_rate
from .report import device_tag as report_tag
from .report import environment, loadavg, rate_line, render_markdown, results_dir, save, table_row
from .targets import add_speedups, build_plan, evaluate_targets, fmt_target
from .timing import interleaved, is_oom, peak_memory_mib, short_error, summarize, sync, time_calls

__all__ = ["main", "build_parser", "search_largest", "MODES", "MODEL_ALIASES"]

MODES = ("inference", "latency", "training", "memory")

# Short names accepted by --models (any flashdino variant name or alias also works).
MODEL_ALIASES = {
    "vits16": "dinov3_vits16", "vits16plus": "dinov3_vits16plus", "vitb16": "dinov3_vitb16",
    "vitl16": "dinov3_vitl16", "vitl16plus": "dinov3_vitl16plus", "vith16plus": "dinov3_vith16plus",
    "vit7b16": "dinov3_vit7b16", "7b": "dinov3_vit7b16", "vitl14": "dinov2_vitl14",
}
GPU_DEFAULT_MODELS = ("dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16", "dinov3_vith16plus", "dinov3_vit7b16",
                      "dinov2_vitl14")
CPU_DEFAULT_MODELS = ("dinov3_vits16",)

# Default batches on a GPU: (low resolution <= 256, high resolution).
INFERENCE_BATCH = {"dinov3_vits16": (256, 64), "dinov3_vitb16": (256, 64), "dinov3_vitl16": (128, 64),
                   "dinov3_vith16plus": (64, 16), "dinov3_vit7b16": (32, 8), "dinov2_vitl14": (128, 64)}
TRAINING_BATCH = {"dinov3_vits16": (256, 32), "dinov3_vitb16": (128, 32), "dinov3_vitl16": (64, 16),
                  "dinov3_vith16plus": (32, 8), "dinov3_vit7b16": (4, 1), "dinov2_vitl14": (64, 16)}

def _default_batch(model: str, res: int, mode: str, device: torch.device, args) -> int:
    if mode == "latency":
        return args.latency_batch
    if mode == "training":
        if args.train_batch:
            return args.train_batch
        if args.batch:
            return args.batch
        if device.type != "cuda":
            return 2
        return TRAINING_BATCH.get(model, (32, 8))[0 if res <= 256 else 1]
    if args.batch:
        return args.batch
    if device.type != "cuda":
        return 8
    return INFERENCE_BATCH.get(model, (64, 16))[0 if res <= 256 else 1]


def _inputs(case: Case, size: int, n: int, device: torch.device) -> list[Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(1000 + size * 7 + case.batch)
    dtype = DTYPES[case.dtype] if case.dtype != "amp" else torch.float32
    return [torch.randn(case.batch, 3, size, size, generator=gen).to(device=device, dtype=dtype) for _ in range(n)]


class Runner:
    def __init__(self, args, device: torch.device, log: Callable[[str], None] = print):
        self.args, self.device, self.log = args, device, log
        self.rows: list[dict] = []
        self.memory_rows: list[dict] = []
        self.notes: list[str] = []
        self.rates: dict = {}
        self.needed_rates: set = {"bf16"}
        self._probes: dict = {}

    # -- device rates ---------------------------------------------------------------------------------
    def measure_rates(self, when: str) -> None:
        names = [n for n in ("bf16", "fp32") if n in self.needed_rates]
        entry = self.rates[when] = device_rates(self.device, names, gemm_size=self.args.gemm_size)
        self.log(f"{rate_line(when, entry)}  (load {entry['loadavg']})")

    def gemm_rate(self, dtype: str) -> Optional[float]:
        """The GEMM rate MFU is computed against: the highest of the measurements of this run."""
        key = "fp32" if dtype == "fp32" else "bf16"
        vals = [r[key]["flops_per_s"] for r in self.rates.values() if "flops_per_s" in r.get(key, {})]
        return max(vals) if vals else None

    # -- one case -------------------------------------------------------------------------------------
    def _row(self, case: Case, peer: str, size: int, **kw) -> dict:
        row = dict(model=case.model, family=case.cfg.family, depth=case.cfg.depth, res=size, batch=case.batch,
                   dtype=case.dtype, mode=case.mode, peer=peer, tokens=tokens_per_image(case.cfg, size),
                   flops=model_flops(case.cfg, size, batch=case.batch, training=case.training))
        row.update(kw)
        return row

    def _reference(self, group: ModelGroup, case: Case, size: int, x: Tensor) -> Tensor:
        key = (size, case.batch)
        if key not in group.refs:
            fn, tokens = group.call("flashdino-torch", dataclasses.replace(case, mode="inference"))
            group.activate("flashdino-torch")
            with torch.inference_mode():
                group.refs[key] = tokens(fn(x)).clone()
        return group.refs[key]

    def _is_reference_path(self, peer: str) -> bool:
        # On a CPU every flashdino op dispatches to the PyTorch reference path.
        return peer == "flashdino-torch" or (peer == "flashdino" and self.device.type != "cuda")

    def run_case(self, group: ModelGroup, case: Case, peers: Sequence[str]) -> None:
        a, dev = self.args, self.device
        size = res_for(case.cfg, case.res)
        active = []
        for peer in peers:
            why = group.why_unavailable(peer, case)
            if why:
                self.rows.append(self._row(case, peer, size, status="skipped", message=why))
            else:
                active.append(peer)
        if not active:
            return
        try:
            inputs = _inputs(case, size, a.rotate, dev)
        except Exception as exc:
            for peer in active:
                self.rows.append(self._row(case, peer, size, status="oom" if is_oom(exc) else "error",
                                           message=f"inputs: {short_error(exc)}"))
            return
        interleave = dev.type != "cuda" and not a.no_interleave
        states = {}
        for peer in active:
            states[peer] = self._prepare(group, case, peer, size, inputs)
            if not interleave:
                if states[peer].get("fn") is not None:
                    self._time_block(group, case, peer, states[peer], inputs)
                self._finish(group, case, peer, states[peer], inputs, size)
        if interleave:
            self._time_interleaved(group, case, states, inputs)
            for peer in active:
                self._finish(group, case, peer, states[peer], inputs, size)
        del inputs
        self._recover()

    @contextlib.contextmanager
    def _calling(self, group: ModelGroup, peer: str, case: Case):
        """The peer's model in train mode for training cases (eval otherwise), with autograd only there."""
        group.train_mode(peer, case.training)
        try:
            with torch.enable_grad() if case.training else torch.inference_mode():
                yield
        finally:
            group.train_mode(peer, False)

    def _fail(self, st: dict, exc: BaseException) -> None:
        st.update(status="oom" if is_oom(exc) else "error", message=short_error(exc), fn=None)
        if self.args.strict and not is_oom(exc):
            raise exc
        self._recover()

    def _prepare(self, group: ModelGroup, case: Case, peer: str, size: int, inputs: list) -> dict:
        """Builds the callable, runs the first (checked) call and the warm-up."""
        st: dict = dict(fn=None, status="ok", message="")
        try:
            group.activate(peer)
            fn, tokens = group.call(peer, case)
            t0 = time.perf_counter()
            with self._calling(group, peer, case):
                out = fn(inputs[0])
                sync(self.device)
                st["first_call_s"] = time.perf_counter() - t0
                if peer.startswith("flashdino"):
                    st["backends"] = backends_ran()
                if tokens is not None:
                    got = tokens(out)
                    if self._is_reference_path(peer) and (size, case.batch) not in group.refs:
                        group.refs[(size, case.batch)] = got.clone()
                        st["check"] = dict(cos=1.0, rel_err=0.0, max_abs_rel=0.0, reference=True)
                    else:
                        ref = self._reference(group, case, size, inputs[0])
                        group.activate(peer)
                        st["check"] = compare_tokens(got, ref)
                    del got
                del out
                for i in range(1, self.args.warmup + 1):
                    fn(inputs[i % len(inputs)])
                sync(self.device)
            st["fn"] = fn
        except Skip as exc:
            st.update(status="skipped", message=str(exc))
        except Exception as exc:
            self._fail(st, exc)
        return st

    def _recover(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.device)
            except Exception:
                pass
            torch.cuda.empty_cache()

    def _time_block(self, group: ModelGroup, case: Case, peer: str, st: dict, inputs: list) -> None:
        try:
            with self._calling(group, peer, case):
                st["timing"] = time_calls(st["fn"], inputs, self.device, self.args.repeats, start=1,
                                          sync_each=case.mode == "latency")
        except Exception as exc:
            self._fail(st, exc)

    def _time_interleaved(self, group: ModelGroup, case: Case, states: dict, inputs: list) -> None:
        """CPU: the peers of a case take turns call by call, with a GEMM probe before every round."""
        probes = self._probes.setdefault(case.key, [])
        probe_dtype = torch.float32 if case.dtype == "fp32" else torch.bfloat16

        def probe(_round: int) -> None:
            # The rate the CPU gives under the same load from other processes as the timed calls.
            try:
                probes.append(measure_gemm_rate(self.device, probe_dtype, n=self.args.gemm_size,
                                                repeats=1)["flops_per_s"])
            except Exception:
                pass

        def make(peer: str):
            fn = states[peer]["fn"]

            def call(r: int) -> None:
                with self._calling(group, peer, case):
                    fn(inputs[(1 + r) % len(inputs)])
            return call

        calls = {p: make(p) for p, st in states.items() if st.get("fn") is not None}
        samples, errors = interleaved(calls, self.args.repeats, before_round=probe)
        for peer in calls:
            states[peer]["timing"] = {"wall_s": samples[peer]}
            if peer in errors:
                self._fail(states[peer], errors[peer])

    def _finish(self, group: ModelGroup, case: Case, peer: str, st: dict, inputs: list, size: int) -> None:
        timing = st.get("timing") or {}
        row = self._row(case, peer, size, status=st["status"], message=st["message"])
        for key in ("check", "first_call_s", "backends"):
            if st.get(key) is not None:
                row[key] = st[key]
        cuda = self.device.type == "cuda"
        if case.mode == "latency" or not cuda:
            samples = timing.get("wall_s") or []
            row["timer"] = "host wall clock" + (", synchronised per call" if cuda else "")
        else:
            samples = timing.get("event_s") or []
            row["timer"] = "CUDA events"
            if "wall_block_s" in timing:
                row["wall_block_s"] = timing["wall_block_s"]
        if samples and st["status"] == "ok":
            row.update(summarize(samples))
            t, rate = row["time_s"], self.gemm_rate(case.dtype)
            row.update(times_s=[round(s, 7) for s in samples], imgs_per_s=case.batch / t,
                       flops_per_s=row["flops"] / t, mfu=(row["flops"] / t / rate) if rate else None)
            if case.mode == "latency" and timing.get("event_s"):
                row["gpu_time_s"] = statistics.median(timing["event_s"])
            probes = self._probes.get(case.key)
            if probes:
                row["gemm_probe_flops_per_s"] = statistics.median(probes)
                row["mfu_same_load"] = row["flops"] / t / row["gemm_probe_flops_per_s"]
        model = group.model_of(peer)
        row["param_mib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20 if model else 0
        if peer == "flashdino-graphs":
            runner = next(iter(group.graph_runners.values()), None)
            if runner is not None:
                row["graph_stats"] = dict(runner.stats)
                if not runner.stats["replays"]:
                    row["message"] = (row["message"] + "; " if row["message"] else "") + \
                        f"ran eagerly: {runner.last_reason}"
        if cuda and st.get("fn") is not None and st["status"] == "ok":
            row["peak_mem_mib"] = self._peak_memory(group, case, peer, st["fn"], inputs)
        if case.mode == "training" and peer == "hf":
            row["message"] = (row["message"] + "; " if row["message"] else "") + \
                "HF applies its RoPE coordinate augmentation in train mode"
        self.rows.append(row)
        self.log(f"{row['mode']:9s} {table_row(row)}")
        st["fn"] = None

    def _peak_memory(self, group: ModelGroup, case: Case, peer: str, fn, inputs) -> Optional[float]:
        try:
            with self._calling(group, peer, case):
                return peak_memory_mib(lambda: fn(inputs[0]), self.device)
        except Exception:
            self._recover()
            return None

    # -- memory mode ----------------------------------------------------------------------------------
    def run_memory(self, group: ModelGroup, model_name: str, peers: Sequence[str]) -> None:
        a, dev, cfg = self.args, self.device, group.cfg
        P = cfg.patch_size
        for peer in peers:
            if peer in ("flashdino-graphs", "hf-compile"):
                continue
            why = group.why_unavailable(peer, Case(model_name, cfg, 224, 1, group.dtype, "inference"))
            if why:
                self.memory_rows.append(dict(model=model_name, dtype=group.dtype, peer=peer, status="skipped",
                                             message=why))
                continue
            group.activate(peer)
            fn, _ = group.call(peer, Case(model_name, cfg, 224, 1, group.dtype, "inference"))
            tries: list[dict] = []

            def attempt(k: int) -> Optional[float]:
                size = k * P
                try:
                    x = torch.randn(1, 3, size, size, device=dev, dtype=DTYPES[group.dtype])
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        peak = peak_memory_mib(lambda: fn(x), dev)
                    secs = time.perf_counter() - t0
                    tries.append(dict(size=size, ok=True, seconds=secs, peak_mib=peak))
                    self.log(f"  memory {model_name} {peer}: {size}x{size} ok ({secs:.1f} s, {peak:.0f} MiB)")
                    return secs
                except Exception as exc:
                    tries.append(dict(size=size, ok=False, error="out of memory" if is_oom(exc) else short_error(exc)))
                    if not is_oom(exc):
                        raise
                    self.log(f"  memory {model_name} {peer}: {size}x{size} out of memory")
                    return None
                finally:
                    x = None
                    self._recover()

            status, message, lo_k, hi_k = "ok", "", None, None
            try:
                lo_k, hi_k, message = search_largest(attempt, max(1, 224 // P), max(1, a.max_size // P), a.max_try_s)
                if lo_k is None:
                    status = "oom"
                message = message.replace("the size limit", f"--max-size {a.max_size}")
            except Exception as exc:
                status, message = "error", short_error(exc)
            best = lo_k * P if lo_k else None
            self.memory_rows.append(dict(
                model=model_name, dtype=group.dtype, peer=peer, batch=1, status=status, message=message,
                max_size=best, first_oom=hi_k * P if hi_k else None,
                tokens=tokens_per_image(cfg, best) if best else None, tries=tries))
            self.log(f"memory {model_name} {group.dtype} {peer}: largest {best}x{best}"
                     + (f", {hi_k * P}x{hi_k * P} runs out of memory" if hi_k else "")
                     + (f" ({message})" if message else ""))


def search_largest(attempt: Callable[[int], Optional[float]], start: int, limit: int,
                   max_try_s: float = float("inf")) -> tuple[Optional[int], Optional[int], str]:
    """Largest k (image side in patches) for which ``attempt(k)`` fits, by doubling then bisection.

    ``attempt(k)`` returns the seconds the try took, or None when it ran out of memory. Growth stops
    at ``limit`` or after a try longer than ``max_try_s``. Returns (largest k that fits or None,
    smallest k that did not fit or None, a message saying why the search stopped early).
    """
    secs = attempt(start)
    if secs is None:
        return None, start, f"even the start size ({start} patches a side) does not fit"
    lo, hi, message = start, None, ""
    while True:
        nxt = min(lo * 2, limit)
        if nxt <= lo:
            message = "reached the size limit without running out of memory"
            break
        if secs > max_try_s:
            message = f"stopped growing: a try took > {max_try_s} s"
            break
        t = attempt(nxt)
        if t is None:
            hi = nxt
            break
        lo, secs = nxt, t
    if hi is not None:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if attempt(mid) is None:
                hi = mid
            else:
                lo = mid
    return lo, hi, message


# -- command line -----------------------------------------------------------------------------------------
def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="flashdino end-to-end benchmark (throughput, latency, "
                                "training, memory) against HF transformers, torch.compile and timm.")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--models", type=_csv, default=None,
                   help="comma-separated variants or short names (vits16, vitb16, vitl16, vith16plus, vit7b16, "
                        "vitl14 = dinov2_vitl14; default: those six on a GPU, vits16 on a CPU)")
    p.add_argument("--res", type=lambda s: [int(v) for v in _csv(s)], default=None,
                   help="image sizes (default 224,512; DINOv2 uses the nearest multiple of 14, 512 -> 518)")
    p.add_argument("--dtypes", type=_csv, default=None,
                   help="bf16 (bf16 weights), fp32, amp (fp32 weights under bf16 autocast); default bf16 on a GPU, "
                        "fp32,bf16 on a CPU")
    p.add_argument("--modes", type=_csv, default=None,
                   help="inference (large batch), latency (batch 1), training (forward + backward), memory "
                        "(largest image, GPU only); default inference,latency,training")
    p.add_argument("--peers", type=_csv, default=None,
                   help=f"subset of {','.join(PEERS)} (default: all on a GPU; flashdino,hf on a CPU)")
    p.add_argument("--batch", type=int, default=None, help="inference batch (default: per model, 8 on a CPU)")
    p.add_argument("--train-batch", type=int, default=None, help="training batch (default: per model, 2 on a CPU)")
    p.add_argument("--latency-batch", type=int, default=1)
    p.add_argument("--depth", type=int, default=None, help="override the depth of every model (smoke tests)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls after the checked first call "
                   "(default 5 on a GPU, 1 on a CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 30 on a GPU, 3 on a CPU)")
    p.add_argument("--rotate", type=int, default=None, help="distinct input tensors cycled through (default 4; 2 on a CPU)")
    p.add_argument("--gemm-size", type=int, default=None, help="GEMM size for the rate measurement "
                   "(default 8192 on a GPU; 1024 fp32 / 512 bf16 on a CPU)")
    p.add_argument("--max-size", type=int, default=8192, help="memory mode: largest image side tried")
    p.add_argument("--max-try-s", type=float, default=60.0, help="memory mode: stop growing after a try this long")
    p.add_argument("--no-interleave", action="store_true", help="CPU: time peers one after the other")
    p.add_argument("--targets", action="store_true",
                   help="run only the cases the performance targets are defined on (for this device type), "
                        "with the peers they compare against")
    p.add_argument("--ci", action="store_true",
                   help="the CI-sized CPU table: --device cpu --models vits16 --res 224 --batch 8 --dtypes fp32,bf16 "
                        "--modes inference --peers flashdino,hf --repeats 3")
    p.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results of the checkout, "
                   "else ./flashdino_bench_results)")
    p.add_argument("--name", default=None, help="file stem (default e2e_<device>)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--strict", action="store_true", help="raise on errors instead of recording them")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--render", default=None, metavar="RESULT.json",
                   help="only re-render the markdown of an earlier result file next to it")
    return p


def _resolve_models(names: Sequence[str]) -> list[str]:
    return [resolve_name(MODEL_ALIASES.get(n.lower(), n)) for n in names]


def _apply_defaults(args, gpu: bool) -> None:
    """Fills what the command line left open: the --ci table, then the per-device defaults."""
    if args.ci:
        args.models = args.models or ["dinov3_vits16"]
        args.res = args.res or [224]
        args.batch = args.batch or 8
        args.dtypes = args.dtypes or ["fp32", "bf16"]
        args.modes = args.modes or ["inference"]
        args.peers = args.peers or ["flashdino", "hf"]
        args.repeats = args.repeats or 3
        args.warmup = 0 if args.warmup is None else args.warmup  # the checked first call warms up
    args.res = args.res or [224, 512]
    args.dtypes = args.dtypes or (["bf16"] if gpu else ["fp32", "bf16"])
    args.modes = args.modes or ["inference", "latency", "training"]
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.repeats = args.repeats or (30 if gpu else 3)
    args.rotate = max(1, args.rotate or (4 if gpu else 2))
    for kind, values, allowed in (("dtype", args.dtypes, DTYPES), ("mode", args.modes, MODES),
                                  ("peer", args.peers or (), PEERS)):
        for v in values:
            if v not in allowed:
                raise SystemExit(f"flashdino bench: unknown {kind} {v!r} (use {', '.join(allowed)})")


def _select_peers(args, gpu: bool, log) -> tuple[list[str], dict]:
    peers = args.peers or (list(PEERS) if gpu else ["flashdino", "hf"])
    peers = [p for p in PEERS if p in peers]  # the reference path first, then the others
    skipped: dict[str, str] = {}
    for p in list(peers):
        why = peer_available(p) or ("CUDA graphs need a CUDA device" if p == "flashdino-graphs" and not gpu else None)
        if why:
            skipped[p] = why
            log(f"skipping peer {p}: {why}")
            peers.remove(p)
    if not gpu and "flashdino-torch" in peers and args.peers is None:
        peers.remove("flashdino-torch")  # on a CPU it is the same path as "flashdino"
    return peers, skipped


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> dict:
    """Runs the benchmark; returns the result dictionary (also written as JSON + markdown)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or "python -m flashdino.bench"
    args = build_parser(prog).parse_args(argv)
    log = (lambda *_: None) if args.quiet else (lambda s: print(s, flush=True))
    if args.render:
        path = Path(args.render)
        result = json.loads(path.read_text())
        path.with_suffix(".md").write_text(render_markdown(result) + "\n")
        log(f"wrote {path.with_suffix('.md')}")
        return result

    if args.ci and args.device == "auto":
        args.device = "cpu"
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("flashdino bench: --device cuda but CUDA is not available")
    gpu = device.type == "cuda"
    if gpu and device.index is not None:
        torch.cuda.set_device(device)
    _apply_defaults(args, gpu)
    if args.models:
        models = _resolve_models(args.models)
    elif args.modes == ["memory"]:
        models = ["dinov3_vitl16"]  # the memory question is asked of ViT-L/16
    else:
        models = list(GPU_DEFAULT_MODELS if gpu else CPU_DEFAULT_MODELS)
    modes = args.modes
    peers, skipped = _select_peers(args, gpu, log)

    runner = Runner(args, device, log)
    env = environment(device)
    if "memory" in modes and not gpu:
        runner.notes.append("memory mode skipped: it needs a GPU")
        log("memory mode skipped: it needs a GPU (largest image search catches CUDA out-of-memory errors)")
    runner.needed_rates = {"fp32" if d == "fp32" else "bf16" for d in args.dtypes} | {"bf16"}
    runner.measure_rates("start")
    plan = build_plan(device, models, args.dtypes, args.res, modes, peers, targets_only=args.targets,
                      models_given=bool(args.models))
    result = dict(command=shlex.join(prog.split() + argv), environment=env, rates=runner.rates, rows=runner.rows,
                  memory=runner.memory_rows, targets=[], skipped=skipped, notes=runner.notes,
                  settings=dict(models=models, res=args.res, dtypes=args.dtypes, modes=modes, peers=peers,
                                warmup=args.warmup, repeats=args.repeats, rotate=args.rotate, depth=args.depth,
                                interleaved=not gpu and not args.no_interleave))
    out_dir = Path(args.out_dir) if args.out_dir else results_dir()
    stem = args.name or f"e2e_{report_tag(device)}"

    t_start = time.perf_counter()
    overrides = {"depth": args.depth} if args.depth is not None else {}
    memory = "memory" in modes and gpu and not args.targets
    for (model_name, dtype), cases in plan.items():
        if not cases and not memory:
            continue
        cfg = get_config(model_name, **overrides)
        group_peers = [p for p in PEERS if any(p in c[3] for c in cases) or (memory and p in peers)]
        log(f"== {model_name} (depth {cfg.depth}) {dtype}: building models for {', '.join(group_peers)}")
        group = ModelGroup(cfg, dtype, device, group_peers, log)
        try:
            group.build()
        except Exception as exc:
            if args.strict:
                raise
            msg = f"building the models failed: {short_error(exc)}"
            log(msg)
            for res, mode, batch, case_peers in cases:
                case = Case(model_name, cfg, res, batch or _default_batch(model_name, res, mode, device, args),
                            dtype, mode)
                for peer in case_peers:
                    runner.rows.append(runner._row(case, peer, res_for(cfg, res),
                                                   status="oom" if is_oom(exc) else "error", message=msg))
            group.free()
            continue
        for peer, why in group.unavailable.items():
            skipped.setdefault(peer, why)
        for note in group.notes + [f"{model_name} {dtype}: weights from {group.weights_source}"]:
            if note not in runner.notes:
                runner.notes.append(note)
        for res, mode, batch, case_peers in cases:
            case = Case(model_name, cfg, res, batch or _default_batch(model_name, res, mode, device, args),
                        dtype, mode)
            runner.run_case(group, case, case_peers)
        if memory:
            runner.run_memory(group, model_name, group_peers)
        group.free()
        if not args.no_save:  # what is measured so far survives a run that is stopped later
            _finalize(result, runner, device, args, t_start)
            save(result, render_markdown(result), out_dir, stem)
    runner.measure_rates("end")
    _finalize(result, runner, device, args, t_start)
    if result["targets"]:
        log("targets:")
        for t in result["targets"]:
            log("  " + fmt_target(t))
    md = render_markdown(result)
    if args.no_save:
        log(md)
        return result
    result["files"] = save(result, md, out_dir, stem)
    log("wrote " + ", ".join(result["files"]))
    return result


def _finalize(result: dict, runner: Runner, device: torch.device, args, t_start: float) -> None:
    """MFU against the best GEMM rate of the run so far, speed-ups, targets and the load warning."""
    for r in runner.rows:
        if "time_s" in r:
            rate = runner.gemm_rate(r["dtype"])
            r["gemm_flops_per_s"] = rate
            r["mfu"] = r["flops"] / r["time_s"] / rate if rate else None
    add_speedups(runner.rows)
    env = result["environment"]
    env["loadavg_end"] = loadavg()
    env["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    result["targets"] = evaluate_targets(runner.rows, device, env.get("gpu"), args.depth is None)
    loads = [v for v in (env.get("loadavg_start"), env.get("loadavg_end")) if v]
    ncpu = os.cpu_count() or 1
    if device.type != "cuda" and loads and max(v[0] for v in loads) > 0.75 * ncpu:
        result["load_warning"] = (f"the machine was loaded by other processes (1-min load average up to "
                                  f"{max(v[0] for v in loads):.1f} on {ncpu} CPUs): absolute CPU times are noisy; "
                                  "peers were interleaved call by call so their ratios are comparable")


if __name__ == "__main__":  # pragma: no cover
    main()
