"""flashdino's PyTorch path vs Hugging Face ``DINOv3ViTModel`` on the CPU, side by side in one process.

Both models hold the same random weights (HF's are converted through flashdino's HF loader).
Cases: ViT-S/16 at 224 (batch 8) and ViT-B/16 at 512 (batch 2), in fp32, under bf16 autocast,
and with bf16 weights. Prints a markdown table and writes JSON + markdown to benchmarks/results/.

    python benchmarks/bench_cpu_vs_hf.py            # full table (a few minutes on 2 cores)
    python benchmarks/bench_cpu_vs_hf.py --quick    # CI-sized: ViT-S only, fewer repeats
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

CASES = {
    "vits16@224xb8": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                          size=224, batch=8),
    "vitb16@512xb2": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          size=512, batch=2),
}


def build_pair(case: dict):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    import flashdino

    cfg = DINOv3ViTConfig(
        hidden_size=case["hidden_size"], intermediate_size=case["intermediate_size"],
        num_hidden_layers=case["num_hidden_layers"], num_attention_heads=case["num_attention_heads"],
        num_register_tokens=4, patch_size=16, image_size=224, attn_implementation="sdpa",
    )
    hf = DINOv3ViTModel(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        fd = flashdino.from_pretrained(tmp).eval()
    return hf, fd


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_pair(fn_a, fn_b, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median times of two callables, interleaved call by call so load and clock drift hit both alike."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn_a()
            fn_b()
        times_a, times_b = [], []
        for i in range(repeats):
            order = ((fn_a, times_a), (fn_b, times_b)) if i % 2 == 0 else ((fn_b, times_b), (fn_a, times_a))
            for fn, times in order:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
    return statistics.median(times_a), statistics.median(times_b)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def run(cases: list[str], repeats: int, modes_wanted: dict) -> list[dict]:
    rows = []
    for name in cases:
        case = CASES[name]
        hf, fd = build_pair(case)
        x = torch.randn(case["batch"], 3, case["size"], case["size"])
        modes = {
            "fp32": (hf, fd, x, contextlib.nullcontext),
            "bf16 autocast": (hf, fd, x, lambda: torch.autocast("cpu", dtype=torch.bfloat16)),
        }
        hf16 = type(hf)(hf.config).eval()
        hf16.load_state_dict(hf.state_dict())
        fd16 = type(fd)(fd.cfg).eval()
        fd16.load_state_dict(fd.state_dict())
        modes["bf16 weights"] = (hf16.to(torch.bfloat16), fd16.to(torch.bfloat16), x.bfloat16(),
                                 contextlib.nullcontext)
        for mode, (hf_m, fd_m, inp, ctx) in modes.items():
            if mode not in modes_wanted.get(name, modes):
                continue
            def run_hf():
                with ctx():
                    return hf_m(pixel_values=inp).last_hidden_state

            def run_fd():
                with ctx():
                    return fd_m.forward_features(inp)

            with torch.inference_mode():
                ref = run_hf()
                out = run_fd()
            # Same weights, same semantics up to RoPE periods (HF recomputes fp32 periods).
            fd_tokens = torch.cat([out["x_norm_clstoken"][:, None], out["x_storage_tokens"],
                                   out["x_norm_patchtokens"]], dim=1)
            deviation = max_rel_diff(fd_tokens, ref)
            t_hf, t_fd = measure_pair(run_hf, run_fd, repeats)
            row = dict(case=name, mode=mode, hf_s=t_hf, flashdino_s=t_fd, speedup=t_hf / t_fd,
                       max_rel_deviation=deviation)
            rows.append(row)
            print(f"{name:16s} {mode:14s} HF {t_hf * 1e3:8.1f} ms  flashdino {t_fd * 1e3:8.1f} ms  "
                  f"x{t_hf / t_fd:.2f}  (max rel dev {deviation:.1e})", flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ViT-S/16 only, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--fp32-only-large", action="store_true",
                        help="ViT-B/16 at 512 in fp32 only (bf16 GEMMs are very slow on CPUs without AMX/AVX512-BF16)")
    args = parser.parse_args(argv)
    cases = ["vits16@224xb8"] if args.quick else list(CASES)
    repeats = args.repeats or (3 if args.quick else 7)
    torch.manual_seed(0)
    modes_wanted = {"vitb16@512xb2": ("fp32",)} if args.fp32_only_large else {}
    rows = run(cases, repeats, modes_wanted)
    import transformers

    import os

    meta = dict(date=datetime.date.today().isoformat(), machine=_cpu_name(), load_average=os.getloadavg(),
                cpu_threads=torch.get_num_threads(), torch=torch.__version__, transformers=transformers.__version__,
                python=sys.version.split()[0])
    lines = [f"{meta['machine']}, {meta['cpu_threads']} threads, torch {meta['torch']}, "
             f"transformers {meta['transformers']}, {meta['date']}, load average {meta['load_average'][0]:.1f}", "", "| case | mode | HF eager (ms) | flashdino (ms) | speed-up |", "|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['mode']} | {r['hf_s'] * 1e3:.1f} | {r['flashdino_s'] * 1e3:.1f} | "
              f"{r['speedup']:.2f}x |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stem = "cpu_vs_hf_quick" if args.quick else "cpu_vs_hf"
        (RESULTS / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
        (RESULTS / f"{stem}.md").write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
