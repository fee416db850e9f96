"""VGGT aggregator: flashdino's default (fast) path vs its pure-PyTorch eager path, one process.

The model has VGGT-1B's aggregator shape (DINOv2-L/14 patch embedding with registers, 24 frame +
24 global blocks of width 1024, 16 heads) with random weights. For S frames of 518 x 518 it runs
the ``fast`` path (flashdino's dispatch as shipped) and the ``torch`` path (every op forced to the
PyTorch reference: RoPE + ``F.scaled_dot_product_attention``, PyTorch norms), each keeping all 24
layer outputs (VGGT's first release) or only the last (``intermediate_layer_idx=[-1]``), and
records, through flashdino's harness, the median latency with its quartiles, the peak CUDA memory
above the weights, throughput, MFU against a bf16 GEMM measured in the same run, the last layer's
agreement between the paths (cosine, relative error) and which backend ran each op.

    python benchmarks/bench_aggregator.py                       # CUDA: S = 1, 10, 50, 100
    python benchmarks/bench_aggregator.py --frames 1 10 --repeats 5
    python benchmarks/bench_aggregator.py --cpu-smoke           # tiny model on the CPU, seconds

Precision defaults to bf16 autocast (how VGGT runs); ``--precision bf16`` casts the weights,
``--precision fp32`` disables autocast. Out-of-memory cases are recorded as such. The files
``aggregator_<device>_<precision>.{json,md}`` are rewritten after every frame count.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import shlex
import sys
from pathlib import Path

import torch

try:
    import flashdino
except ImportError:  # a bare checkout: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import flashdino

from flashdino.bench.backends import backends_ran, forced_backend  # noqa: E402
from flashdino.bench.flops import aggregator_flops  # noqa: E402
from flashdino.bench.peers import compare_tokens  # noqa: E402
from flashdino.bench.probes import measure_gemm_rate  # noqa: E402
from flashdino.bench.report import device_tag, environment, environment_lines, loadavg, ran_summary, save  # noqa: E402
from flashdino.bench.timing import is_oom, peak_memory_mib, short_error, summarize, sync, time_calls  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VGGT_1B = dict(embed_dim=1024, depth=24, num_heads=16, patch_embed="dinov2_vitl14_reg")
SMOKE = dict(embed_dim=64, depth=2, num_heads=4, patch_embed="dinov2_vitl14_reg",
             patch_embed_kwargs=dict(embed_dim=64, depth=1, num_heads=4))
PATH_BACKEND = {"fast": None, "torch": "torch"}


def run_case(model, images, path: str, keep: str, precision: str, repeats: int, warmup: int) -> dict:
    device = images.device
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "autocast-bf16"
                else contextlib.nullcontext())
    layers = None if keep == "all" else [-1]

    def once(_=None):
        with forced_backend(PATH_BACKEND[path]), torch.inference_mode(), autocast:
            return model(images, intermediate_layer_idx=layers)[0]

    row = dict(path=path, keep=keep)
    try:
        gc.collect()
        out = once()
        row["backends"] = backends_ran()
        row["last_layer"] = out[-1][:, :2].float().cpu()  # two frames, off the GPU (keeps peaks honest)
        del out
        for _ in range(warmup - 1):
            once()
        sync(device)
        t = time_calls(once, [None], device, repeats)
        row.update(summarize(t.get("event_s") or t["wall_s"]))
        peak = peak_memory_mib(once, device)  # None on a CPU
        row["peak_above_weights_gib"] = peak / 1024 if peak is not None else None
    except Exception as exc:
        if not is_oom(exc):
            raise
        row.update(error="OOM", detail=short_error(exc))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def fmt(v, spec=".3f"):
    return "-" if v is None or (isinstance(v, float) and v != v) else format(v, spec)


def render(result: dict) -> str:
    meta, rows = result["meta"], result["rows"]
    lines = [f"# VGGT aggregator: fast path vs PyTorch eager ({meta['device']}, {meta['precision']})", ""]
    lines += environment_lines(result["environment"], result["command"])
    lines += [f"- model: {meta['parameters'] / 1e6:.1f}M parameters ({meta['shape']}, random weights), images "
              f"{meta['image_size'][0]}x{meta['image_size'][1]}, batch {meta['batch']}, median of {meta['repeats']}"
              + (f"; bf16 GEMM {meta['bf16_gemm_tflops']:.0f} TFLOP/s in this run" if meta["bf16_gemm_tflops"] else ""),
              "", "| S | keep | path | time (ms) | IQR (ms) | above weights (GiB) | TFLOP/s | MFU | frames/s | "
              "speed-up vs torch | ran |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    by_key = {(r["frames"], r["keep"], r["path"]): r for r in rows}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['frames']} | {r['keep']} | {r['path']} | {r['error']} | | | | | | | |")
            continue
        ref = by_key.get((r["frames"], r["keep"], "torch"))
        speed = ref["time_s"] / r["time_s"] if ref and "time_s" in ref else None
        lines.append(f"| {r['frames']} | {r['keep']} | {r['path']} | {r['time_s'] * 1e3:.1f} | "
                     f"{r['iqr_s'] * 1e3:.1f} | {fmt(r.get('peak_above_weights_gib'), '.2f')} | {r['tflops']:.3g} | "
                     f"{fmt(r.get('mfu'), '.1%')} | {r['frames_per_s']:.1f} | {fmt(speed, '.2f')} | "
                     f"{ran_summary(r.get('backends'))} |")
    agree = [f"S={r['frames']}: cos {r['fast_vs_torch']['cos']:.6f}, rel. error {r['fast_vs_torch']['rel_err']:.1e}"
             for r in rows if r["path"] == "fast" and r["keep"] == "all" and "cos" in r.get("fast_vs_torch", {})]
    if agree:
        lines += ["", "Last layer, fast vs torch path: " + "; ".join(agree) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, nargs="+", default=None, help="frame counts S (default 1 10 50 100)")
    ap.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="image size (default 518 518)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--precision", choices=["autocast-bf16", "bf16", "fp32"], default="autocast-bf16")
    ap.add_argument("--paths", nargs="+", choices=list(PATH_BACKEND), default=list(PATH_BACKEND))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU (checks the script, seconds)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default=None, help="file stem (default aggregator_<device>_<precision>)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        print("bench_aggregator: no CUDA device; skipping (use --cpu-smoke for a tiny CPU run)")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    if args.cpu_smoke:
        torch.set_num_threads(1)  # tiny tensors: more threads only add contention with other processes
        cfg, frames, (H, W) = SMOKE, args.frames or [1, 2, 4], tuple(args.size or (28, 42))
        args.repeats, args.warmup = min(args.repeats, 2), 1
    else:
        cfg, frames, (H, W) = VGGT_1B, args.frames or [1, 10, 50, 100], tuple(args.size or (518, 518))
    torch.manual_seed(0)
    model = flashdino.Aggregator(**cfg).eval().to(device)
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    rate = measure_gemm_rate(device, torch.bfloat16)["flops_per_s"] if cuda else None
    tag = "cpu-smoke" if args.cpu_smoke else device_tag(device)
    stem = args.name or f"aggregator_{tag}_{args.precision}"
    argv = sys.argv[1:] if argv is None else list(argv)
    result = dict(command=shlex.join(["python", "benchmarks/bench_aggregator.py", *argv]),
                  environment=environment(device), rows=[],
                  meta=dict(device=torch.cuda.get_device_name() if cuda else "cpu", precision=args.precision,
                            config={k: v for k, v in cfg.items()}, image_size=[H, W], batch=args.batch,
                            repeats=args.repeats, bf16_gemm_tflops=rate / 1e12 if rate else None,
                            parameters=sum(p.numel() for p in model.parameters()),
                            shape="tiny smoke config" if args.cpu_smoke else "VGGT-1B aggregator shape"))
    print(f"{result['meta']['device']}: {result['meta']['parameters'] / 1e6:.1f}M parameters, {args.precision}, "
          f"images {H}x{W}, batch {args.batch}" + (f", bf16 GEMM {rate / 1e12:.0f} TFLOP/s" if rate else ""))
    for S in frames:
        images = torch.rand(args.batch, S, 3, H, W, device=device)
        flops = aggregator_flops(model, args.batch, S, H, W)
        lasts, rows = {}, []
        for keep in ("all", "last"):
            for path in args.paths:
                r = run_case(model, images, path, keep, args.precision, args.repeats, args.warmup)
                r.update(frames=S, gflop=flops / 1e9)
                last = r.pop("last_layer", None)
                if last is not None:
                    lasts.setdefault(path, last)
                if "time_s" in r:
                    r.update(tflops=flops / r["time_s"] / 1e12, mfu=flops / r["time_s"] / rate if rate else None,
                             frames_per_s=args.batch * S / r["time_s"])
                rows.append(r)
                print(f"S={S:4d} keep={keep:4s} {path:5s} " + (r.get("error") or f"{r['time_s'] * 1e3:9.1f} ms  "
                      f"{r['tflops']:.3g} TFLOP/s  ran {r.get('backends')}"), flush=True)
        if "fast" in lasts and "torch" in lasts:
            agree = compare_tokens(lasts["fast"], lasts["torch"])
            for r in rows:
                r["fast_vs_torch"] = agree
        result["rows"] += rows
        del images, lasts
        gc.collect()
        result["environment"]["loadavg_end"] = loadavg()
        files = save(result, render(result), args.out, stem)
    print("wrote " + ", ".join(files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
