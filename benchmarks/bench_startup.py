"""Start-up time of the command line: how long a user waits for `flashdino --help`.

Each command runs in a fresh subprocess (cold interpreter, warm file cache), several times; the
table gives the median and the spread of the wall time. `python -c pass` and `import torch` are the
floor and the cost that the front door avoids. Usage:

    python benchmarks/bench_startup.py [--repeats 7] [--json out.json]

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
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "python"


def _env() -> dict:
    env = dict(os.environ)
    probe = subprocess.run([sys.executable, "-c", "import flashdino"], capture_output=True, env=env)
    if probe.returncode != 0:  # not installed: this checkout's sources
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    return env


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
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    env = _env()
    rows = []
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.2f}, {args.repeats} runs each")
    print("| command | median (s) | min (s) | max (s) |\n|---|---|---|---|")
    for name, cmd in commands():
        times = measure(cmd, args.repeats, env)
        rows.append(dict(command=name, median_s=statistics.median(times), min_s=min(times), max_s=max(times)))
        print(f"| `{name}` | {rows[-1]['median_s']:.3f} | {rows[-1]['min_s']:.3f} | {rows[-1]['max_s']:.3f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(dict(python=platform.python_version(), cpus=os.cpu_count(),
                                             repeats=args.repeats, rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
