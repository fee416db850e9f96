"""Start-up time of the command line: how long a user waits for `flashdino --help`, and a small job.

Each command runs in a fresh subprocess (cold interpreter, warm file cache), several times; the
table gives the median and the spread of the wall time. `python -c pass` and `import torch` are the
floor and the cost that the front door avoids. `flashdino features` on 16 generated JPEGs (640 x
480, ViT-S/16 with random weights) shows what start-up costs a small job: with its defaults and
with `--runtime eager`, against `import torch` plus the model build alone. Usage:

    python benchmarks/bench_startup.py [--repeats 7] [--features-images 16] [--json out.json]

It measures the flashdino that `python` imports (an installed one, else this checkout's python/).
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
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "python"


def _env() -> dict:
    env = dict(os.environ)
    probe = subprocess.run([sys.executable, "-c", "import flashdino"], capture_output=True, env=env)
    if probe.returncode != 0:  # not installed: this checkout's sources
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env


def feature_commands(folder: Path, n: int) -> list[tuple[str, list[str]]]:
    """`flashdino features` on ``n`` generated JPEGs in ``folder`` (defaults, and --runtime eager)."""
    import numpy as np
    from PIL import Image

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):  # photo-like: smooth colour fields plus fine noise
        low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((640, 480), Image.BICUBIC)
        arr = np.asarray(low).astype(np.int16) + rng.integers(-12, 13, (480, 640, 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(images / f"{i:03d}.jpg", quality=90)
    py = sys.executable
    base = [py, "-m", "flashdino", "features", str(images), "--model", "dinov3_vits16", "--quiet", "--overwrite"]
    build = ("import torch, flashdino; torch.manual_seed(0); "
             "flashdino.create_model('dinov3_vits16').eval()")
    return [
        ("python -c 'import torch, flashdino; create_model(vits16)' (floor of a job)", [py, "-W", "ignore", "-c", build]),
        (f"python -m flashdino features ({n} JPEGs, defaults)", base + ["--out", str(folder / "a.safetensors")]),
        (f"python -m flashdino features ({n} JPEGs, --runtime eager)",
         base + ["--runtime", "eager", "--out", str(folder / "b.safetensors")]),
    ]


def commands() -> list[tuple[str, list[str]]]:
    py = sys.executable
    cmds = [
        ("python -c pass (floor)", [py, "-c", "pass"]),
        ("python -c 'import torch' (avoided cost)", [py, "-c", "import torch"]),
        ("python -c 'import flashdino'", [py, "-c", "import flashdino"]),
        ("python -m flashdino --help", [py, "-m", "flashdino", "--help"]),
        ("python -m flashdino info --help", [py, "-m", "flashdino", "info", "--help"]),
    ]
    script = shutil.which("flashdino", path=str(Path(py).parent))  # the console script beside python
    if script:
        cmds += [("flashdino --help", [script, "--help"]), ("flashdino info --help", [script, "info", "--help"])]
    return cmds


def measure(argv: list[str], repeats: int, env: dict) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, env=env)
        times.append(time.perf_counter() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="runs per command (median reported)")
    parser.add_argument("--features-images", type=int, default=16,
                        help="images of the `flashdino features` runs (0: skip them)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    env = _env()
    rows = []
    print(f"{_cpu_name()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.2f}, {args.repeats} runs each")
    print("| command | median (s) | min (s) | max (s) |\n|---|---|---|---|")
    tmp = tempfile.TemporaryDirectory()
    cmds = commands()
    if args.features_images > 0:
        cmds += feature_commands(Path(tmp.name), args.features_images)
    for name, cmd in cmds:
        times = measure(cmd, args.repeats, env)
        rows.append(dict(command=name, median_s=statistics.median(times), min_s=min(times), max_s=max(times)))
        print(f"| `{name}` | {rows[-1]['median_s']:.3f} | {rows[-1]['min_s']:.3f} | {rows[-1]['max_s']:.3f} |", flush=True)
    tmp.cleanup()
    if args.json:
        args.json.write_text(json.dumps(dict(cpu=_cpu_name(), python=platform.python_version(), cpus=os.cpu_count(),
                                             repeats=args.repeats, load_end=os.getloadavg(), rows=rows), indent=2))
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
