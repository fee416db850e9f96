"""VGGT aggregator: flashdino's default (fast) path vs its pure-PyTorch eager path, one process.

The model has VGGT-1B's aggregator shape (DINOv2-L/14 patch embedding with registers, 24 frame +
24 global blocks of width 1024, 16 heads) with random weights. For S frames of 518 x 518 it runs

* ``fast``: flashdino's dispatch as shipped (Triton / CUDA kernels where they apply);
* ``torch``: ``FLASHDINO_BACKEND=torch``, i.e. PyTorch RoPE + ``F.scaled_dot_product_attention``
  and PyTorch norms, eager (the reference algorithm);

each keeping all 24 layer outputs (VGGT's first release) or only the last one
(``intermediate_layer_idx=[-1]``), and records the median latency, peak CUDA memory (absolute
and above the weights), throughput and model FLOP utilisation against a bf16 GEMM measured in the
same run. Writes JSON + markdown to benchmarks/results/.

    python benchmarks/bench_aggregator.py                       # CUDA: S = 1, 10, 50, 100
    python benchmarks/bench_aggregator.py --frames 1 10 --repeats 5
    python benchmarks/bench_aggregator.py --cpu-smoke           # tiny model on the CPU, < 1 minute

Precision defaults to bf16 autocast (how VGGT runs); ``--precision bf16`` casts the weights,
``--precision fp32`` disables autocast. Out-of-memory cases are recorded as such.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

VGGT_1B = dict(embed_dim=1024, depth=24, num_heads=16, patch_embed="dinov2_vitl14_reg")
SMOKE = dict(embed_dim=64, depth=2, num_heads=4, patch_embed="dinov2_vitl14_reg",
             patch_embed_kwargs=dict(embed_dim=64, depth=1, num_heads=4))


def flops(model, B: int, S: int, H: int, W: int) -> float:
    """Forward FLOPs (2 per multiply-add) of the patch-embedding ViT and all aggregator blocks."""
    P = model.patch_size
    hw = (H // P) * (W // P)
    D = model.embed_dim

    def block(n_tok: int, seq: int, dim: int, hidden: int) -> float:  # one block over n_tok tokens in seqs of seq
        gemm = 2 * n_tok * dim * (3 * dim + dim + 2 * hidden)
        attn = 4 * n_tok * seq * dim
        return gemm + attn

    pe = model.patch_embed
    total = 2 * B * S * hw * 3 * P * P * D  # patch projection
    if hasattr(pe, "blocks"):
        n = 1 + pe.n_storage_tokens + hw
        hidden = pe.blocks[0].mlp.fc1.out_features if hasattr(pe.blocks[0].mlp, "fc1") else 4 * pe.embed_dim
        total += len(pe.blocks) * block(B * S * n, n, pe.embed_dim, hidden)
    n_tok = model.patch_start_idx + hw
    hidden = model.frame_blocks[0].mlp.fc1.out_features
    total += model.depth * block(B * S * n_tok, n_tok, D, hidden)  # frame attention
    total += model.depth * block(B * S * n_tok, S * n_tok, D, hidden)  # global attention
    return float(total)


def gemm_rate(device: torch.device, dtype=torch.bfloat16, n: int = 8192) -> float:
    """Measured dense GEMM rate (FLOP/s) of this device, for the utilisation column."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    reps = 20
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3)


class BackendSpy:
    """Records which backend ran each op (during the warm-up run only)."""

    def __init__(self):
        from flashdino import dispatch

        self.dispatch = dispatch
        self.used: dict[str, set] = {}

    def __enter__(self):
        self.orig = self.dispatch.select

        def spy(op, *args, **kwargs):
            result = self.orig(op, *args, **kwargs)
            self.used.setdefault(op, set()).add(result[1])
            return result

        self.dispatch.select = spy
        return self

    def __exit__(self, *exc):
        self.dispatch.select = self.orig


@contextlib.contextmanager
def backend_env(path: str):
    old = os.environ.get("FLASHDINO_BACKEND")
    if path == "torch":
        os.environ["FLASHDINO_BACKEND"] = "torch"
    else:
        os.environ.pop("FLASHDINO_BACKEND", None)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FLASHDINO_BACKEND", None)
        else:
            os.environ["FLASHDINO_BACKEND"] = old


def run_case(model, images, path: str, keep, precision: str, repeats: int, warmup: int) -> dict:
    device = images.device
    cuda = device.type == "cuda"
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "autocast-bf16"
                else contextlib.nullcontext())
    layers = None if keep == "all" else [-1]

    def once():
        with torch.inference_mode(), autocast:
            out, _ = model(images, intermediate_layer_idx=layers)
        return out

    result = {"path": path, "keep": keep}
    with backend_env(path):
        try:
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            with BackendSpy() as spy:
                out = once()
            result["backends"] = {op: sorted(v) for op, v in sorted(spy.used.items())}
            last = out[-1][:, :2].float().cpu()  # first two frames, off the GPU (keeps peaks honest)
            del out
            for _ in range(warmup - 1):
                once()
            times = []
            for _ in range(repeats):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = once()
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                del out
            result["time_s"] = statistics.median(times)
            result["time_min_s"] = min(times)
            if cuda:
                peak = torch.cuda.max_memory_allocated()
                result["peak_mem_gib"] = peak / 2**30
                result["peak_above_weights_gib"] = (peak - base) / 2**30
            result["last_layer"] = last
        except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - GPU only
            result["error"] = "OOM"
            result["detail"] = str(exc).splitlines()[0]
            gc.collect()
            torch.cuda.empty_cache()
    return result


def fmt(v, spec=".3f"):
    return "-" if v is None or (isinstance(v, float) and v != v) else format(v, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, nargs="+", default=None, help="frame counts S (default 1 10 50 100)")
    ap.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="image size (default 518 518)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", choices=["autocast-bf16", "bf16", "fp32"], default="autocast-bf16")
    ap.add_argument("--paths", nargs="+", choices=["fast", "torch"], default=["fast", "torch"])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU (checks the script, < 1 min)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import flashdino

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        print("bench_aggregator: no CUDA device; skipping (use --cpu-smoke for a tiny CPU run)")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    if args.cpu_smoke:
        torch.set_num_threads(1)  # tiny tensors: threads only add contention
        cfg, frames, (H, W) = SMOKE, args.frames or [1, 2, 4], tuple(args.size or (28, 42))
        args.repeats, args.warmup = min(args.repeats, 2), 1
    else:
        cfg, frames, (H, W) = VGGT_1B, args.frames or [1, 10, 50, 100], tuple(args.size or (518, 518))

    torch.manual_seed(0)
    model = flashdino.Aggregator(**cfg).eval().to(device)
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    rate = gemm_rate(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"device {torch.cuda.get_device_name() if cuda else platform.processor() or 'cpu'}, "
          f"{n_params / 1e6:.1f}M parameters, {args.precision}, images {H}x{W}, batch {args.batch}"
          + (f", bf16 GEMM {rate / 1e12:.0f} TFLOP/s" if cuda else ""))

    rows = []
    for S in frames:
        images = torch.rand(args.batch, S, 3, H, W, device=device)
        f = flops(model, args.batch, S, H, W)
        lasts = {}
        for keep in ("all", "last"):
            for path in args.paths:
                r = run_case(model, images, path, keep, args.precision, args.repeats, args.warmup)
                r.update(frames=S, gflop=f / 1e9)
                last = r.pop("last_layer", None)
                if last is not None:
                    lasts.setdefault(path, last)
                if "time_s" in r:
                    r["tflops"] = f / r["time_s"] / 1e12
                    r["mfu"] = f / r["time_s"] / rate if cuda else None
                    r["frames_per_s"] = args.batch * S / r["time_s"]
                rows.append(r)
                print(f"S={S:4d} keep={keep:4s} {path:5s} "
                      + (r.get("error") or f"{r['time_s'] * 1e3:9.1f} ms  "
                         f"peak {fmt(r.get('peak_mem_gib'), '.2f')} GiB  {r['tflops']:.1f} TFLOP/s"), flush=True)
        if "fast" in lasts and "torch" in lasts:
            a, b = lasts["fast"], lasts["torch"]
            dev = ((a - b).abs().max() / b.abs().max()).item()
            cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
            for r in rows:
                if r["frames"] == S:
                    r["fast_vs_torch_max_rel"] = dev
                    r["fast_vs_torch_cos"] = cos
        del images, lasts
        gc.collect()

    meta = {
        "benchmark": "aggregator",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "flashdino": flashdino.__version__,
        "config": {k: v for k, v in cfg.items()},
        "image_size": [H, W],
        "batch": args.batch,
        "precision": args.precision,
        "repeats": args.repeats,
        "bf16_gemm_tflops": rate / 1e12 if cuda else None,
        "parameters": n_params,
        "cpu_smoke": args.cpu_smoke,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "cpu-smoke" if args.cpu_smoke else torch.cuda.get_device_name().replace(" ", "-").lower()
    stem = args.out / f"aggregator_{tag}_{args.precision}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))

    lines = [f"# VGGT aggregator: fast path vs PyTorch eager ({meta['device']}, {args.precision})", "",
             f"{meta['date']}, torch {torch.__version__}, {n_params / 1e6:.1f}M parameters "
             f"({'tiny smoke config' if args.cpu_smoke else 'VGGT-1B aggregator shape'}, random weights), "
             f"images {H}x{W}, batch {args.batch}, median of {args.repeats}"
             + (f"; bf16 GEMM measured at {rate / 1e12:.0f} TFLOP/s" if cuda else "") + ".", "",
             "| S | keep | path | time (ms) | peak mem (GiB) | above weights (GiB) | TFLOP/s | MFU | frames/s | "
             "speed-up vs torch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    by_key = {(r["frames"], r["keep"], r["path"]): r for r in rows}
    for r in rows:
        ref = by_key.get((r["frames"], r["keep"], "torch"))
        speed = (ref["time_s"] / r["time_s"]) if ref and "time_s" in ref and "time_s" in r else None
        if "error" in r:
            lines.append(f"| {r['frames']} | {r['keep']} | {r['path']} | {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['frames']} | {r['keep']} | {r['path']} | {r['time_s'] * 1e3:.1f} | {fmt(r.get('peak_mem_gib'), '.2f')} | "
            f"{fmt(r.get('peak_above_weights_gib'), '.2f')} | {r['tflops']:.2f} | {fmt(r.get('mfu'), '.1%')} | "
            f"{r['frames_per_s']:.1f} | {fmt(speed, '.2f')} |")
    devs = sorted({(r["frames"], r.get("fast_vs_torch_max_rel"), r.get("fast_vs_torch_cos")) for r in rows
                   if r.get("fast_vs_torch_max_rel") is not None})
    if devs:
        lines += ["", "Last layer, fast vs torch path: "
                  + "; ".join(f"S={s}: max rel {d:.2e}, cos {c:.6f}" for s, d, c in devs) + "."]
    backends = {}
    for r in rows:
        backends.setdefault(r["path"], r.get("backends"))
    lines += ["", "Backends used: " + "; ".join(f"{p}: {b}" for p, b in backends.items()) + "."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
