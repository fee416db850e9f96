"""flashdino's PyTorch path vs Hugging Face ``DINOv3ViTModel`` on the CPU, interleaved in one process.

The cases of the README's CPU table, run by flashdino's harness (``flashdino bench``) with the
same weights in both models: ViT-S/16 at 224 (batch 8) and ViT-B/16 at 512 (batch 2), each in fp32,
under bf16 autocast (``amp``) and with bf16 weights. Writes ``benchmarks/results/cpu_vs_hf.{json,md}``.

    python benchmarks/bench_cpu_vs_hf.py                      # full table (minutes on 2 cores)
    python benchmarks/bench_cpu_vs_hf.py --quick              # ViT-S/16 only, 3 repeats
    python benchmarks/bench_cpu_vs_hf.py --quick --depth 1 --res 32 --batch 2 --no-save   # plumbing check

Any other option is passed to the harness (see ``flashdino bench --help``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

try:
    import flashdino  # noqa: F401
except ImportError:  # a bare checkout: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from flashdino.bench import main as bench_main  # noqa: E402
from flashdino.bench.report import render_markdown, save  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (model, resolution, batch) of each case.
CASES = (("vits16", 224, 8), ("vitb16", 512, 2))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ViT-S/16 only, 3 repeats")
    ap.add_argument("--fp32-only-large", action="store_true",
                    help="ViT-B/16 at 512 in fp32 only (bf16 GEMMs are very slow on CPUs without AMX/AVX512-BF16)")
    ap.add_argument("--no-save", action="store_true")
    args, rest = ap.parse_known_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    merged = None
    for model, res, batch in CASES[:1] if args.quick else CASES:
        dtypes = "fp32" if args.fp32_only_large and model == "vitb16" else "fp32,amp,bf16"
        harness = ["--device", "cpu", "--models", model, "--res", str(res), "--batch", str(batch), "--dtypes", dtypes,
                   "--modes", "inference", "--peers", "flashdino,hf", "--repeats", "3" if args.quick else "7",
                   "--no-save"] + rest  # later options win: the caller's override these defaults
        result = bench_main(harness + ["--quiet"], prog="flashdino bench")
        if merged is None:
            merged = result
        else:
            merged["rows"] += result["rows"]
            merged["notes"] += [n for n in result["notes"] if n not in merged["notes"]]
    merged["command"] = shlex.join(["python", "benchmarks/bench_cpu_vs_hf.py", *argv])
    md = render_markdown(merged)
    print(md)
    if not args.no_save:
        merged["files"] = save(merged, md, RESULTS, "cpu_vs_hf_quick" if args.quick else "cpu_vs_hf")
    return merged


if __name__ == "__main__":
    main()
