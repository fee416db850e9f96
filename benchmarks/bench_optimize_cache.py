"""Start-up of ``flashdino.optimize()`` from its disk cache: cold, warm, and warm without compiled blobs.

Whole processes, alternated round by round, medians. Each process builds the same model (fixed
seed, so the same weights and cache key), calls ``optimize(model, runtime)`` and runs one batch:

- ``cold``: an empty cache (ONNX export, then the runtime compiles);
- ``warm``: the cache as the previous process left it (entry verified by SHA-256, OpenVINO's
  compiled model imported from its verified blob, no compile);
- ``warm, no blob`` (OpenVINO): the export is cached but the compiled models were removed (what a
  warm start cost before blobs were stored by flashdino, or after a shape change).

Usage: python benchmarks/bench_optimize_cache.py [--model dinov3_vits16] [--runtimes openvino onnxruntime]
       [--rounds 3] [--size 224] [--batch 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "python"

CHILD = r"""
import json, sys, time, warnings
t0 = time.perf_counter()
import torch, flashdino
warnings.simplefilter("ignore")
model_name, runtime, root, size, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
model = flashdino.create_model(model_name).eval()
model.weights_source = "benchmark (seeded)"
t1 = time.perf_counter()
opt = flashdino.optimize(model, runtime=runtime, cache_dir=root)
t2 = time.perf_counter()
opt(torch.randn(batch, 3, size, size))
t3 = time.perf_counter()
e = opt.cache_entry
print(json.dumps({"import_build_s": t1 - t0, "optimize_s": t2 - t1, "first_batch_s": t3 - t2,
                  "hit": e.hit, "blobs_loaded": e.blobs_loaded}))
"""


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env


def _cpu() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _run(args, root: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, args.model, args.runtime_now, str(root), str(args.size),
                           str(args.batch)], capture_output=True, text=True, env=_env(), timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["to_first_output_s"] = out["optimize_s"] + out["first_batch_s"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="dinov3_vits16")
    p.add_argument("--runtimes", nargs="+", default=["openvino", "onnxruntime"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results = {"cpu": _cpu(), "cores": os.cpu_count(), "model": args.model, "size": args.size, "batch": args.batch,
               "rounds": args.rounds, "runs": {}}
    for runtime in args.runtimes:
        args.runtime_now = runtime
        conditions = ["cold", "warm"] + (["warm, no blob"] if runtime == "openvino" else [])
        runs = {c: [] for c in conditions}
        for _ in range(args.rounds):
            for cond in conditions:  # alternated within each round
                root = Path(tempfile.mkdtemp(prefix="bench-optimize-cache-"))
                try:
                    if cond != "cold":
                        _run(args, root)  # fill the cache
                    if cond == "warm, no blob":
                        for entry in root.iterdir():
                            shutil.rmtree(entry / "openvino", ignore_errors=True)
                    runs[cond].append(_run(args, root))
                finally:
                    shutil.rmtree(root, ignore_errors=True)
        results["runs"][runtime] = runs
        for cond, rs in runs.items():
            med = {k: statistics.median(r[k] for r in rs) for k in ("optimize_s", "first_batch_s", "to_first_output_s")}
            print(f"{runtime:12s} {cond:14s} optimize() {med['optimize_s']:6.2f} s  first batch {med['first_batch_s']:6.2f} s"
                  f"  to first output {med['to_first_output_s']:6.2f} s  (hit={rs[0]['hit']}, "
                  f"blobs_loaded={rs[0]['blobs_loaded']})", flush=True)
    print(f"{args.model} at {args.size}x{args.size}, batch {args.batch}; {results['cpu']}, {results['cores']} cores; "
          f"medians of {args.rounds} alternated rounds of whole processes")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
