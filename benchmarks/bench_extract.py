"""Throughput and memory of data-set extraction (``flashdino features --out DIR``).

Measures, on JPEGs of 640 x 480 with ViT-S/16 at 224 (random weights: speed does not depend on them):
- decode-only: decode + preprocess of one image at a time in this process (what one worker does);
- model-only: the model on ready [B, 3, 224, 224] batches;
- pipeline: the whole loop (DataLoader, model, shard writing) with 0, 1 and 2 decoding workers,
  and its ratio to model-only (1.0 = decoding fully hidden behind the model);
- peak RSS of a run over 200 and over 2,000 images (a --list repeating the files under distinct ids),
  in fresh processes: streaming to shards must keep it flat.

    python benchmarks/bench_extract.py                         # full: 256 images, RSS 200 vs 2000
    python benchmarks/bench_extract.py --images 48 --rss-depth 1   # the small configuration
Writes benchmarks/results/extract_<tag>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

try:
    import flashdino  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import numpy as np
import torch

import flashdino
from flashdino.extract.dataset import ImageDataset
from flashdino.extract.inputs import collect_items
from flashdino.extract.runner import Dist, ExtractOptions, extract_to_dir
from flashdino.preprocess import Preprocessor

RESULTS = Path(__file__).resolve().parent / "results"


def make_jpegs(folder: Path, n: int, size=(640, 480), seed: int = 0) -> list[Path]:
    """Photo-like JPEGs: smooth colour fields plus fine noise (so they compress like photos, ~60 KB)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        arr = np.asarray(low).astype(np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
        p = folder / f"{i:05d}.jpg"
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(p, quality=90)
        paths.append(p)
    return paths


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
        isa = "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else "")
    except (OSError, StopIteration):
        isa = ""
    import PIL

    return {"cpu": cpu, "isa": isa, "cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "pillow": PIL.__version__, "flashdino": flashdino.__version__}


def model_and_pre(depth=None):
    torch.manual_seed(0)
    kw = {} if depth is None else {"depth": depth}
    model = flashdino.create_model("dinov3_vits16", **kw).eval().requires_grad_(False)
    return model, Preprocessor.from_variant(model.cfg, size=224)


def decode_only(items, pre, fast: bool = True) -> float:
    ds = ImageDataset(items, pre, fast=fast)
    t = time.perf_counter()
    for i in range(len(ds)):
        assert ds[i]["x"] is not None
    return len(ds) / (time.perf_counter() - t)


def decode_per_core(items, pre, rounds: int = 3) -> dict:
    """Images/s of one core (torch.set_num_threads(1), as in a DataLoader worker): Pillow + float resize
    against the fast path (libjpeg-turbo via torchvision + uint8 resize), alternated, best of ``rounds``;
    and the decoders alone."""
    from flashdino.extract.decode import decode_image

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rates = {"pil_decode_and_preprocess": [], "fast_decode_and_preprocess": [], "pil_decode": [],
                 "fast_decode": []}
        for _ in range(rounds):
            rates["pil_decode_and_preprocess"].append(decode_only(items, pre, fast=False))
            rates["fast_decode_and_preprocess"].append(decode_only(items, pre, fast=True))
            for name, fast in (("pil_decode", False), ("fast_decode", True)):
                t = time.perf_counter()
                for it in items:
                    decode_image(it.path, fast=fast)
                rates[name].append(len(items) / (time.perf_counter() - t))
    finally:
        torch.set_num_threads(threads)
    best = {k: max(v) for k, v in rates.items()}
    best["speedup_preprocessed"] = best["fast_decode_and_preprocess"] / best["pil_decode_and_preprocess"]
    best["speedup_decode"] = best["fast_decode"] / best["pil_decode"]
    return best


def model_only(model, n: int, batch: int) -> float:
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        model.forward_features(x)  # warm-up
        t = time.perf_counter()
        done = 0
        while done < n:
            model.forward_features(x)
            done += batch
    return done / (time.perf_counter() - t)


def pipeline(model, pre, items, workers: int, batch: int, folder: Path) -> dict:
    opts = ExtractOptions(store=("cls", "patch"), shard_size=max(batch, 64), batch_size=batch, workers=workers,
                          max_pixels=2048 * 2048, quiet=True)
    s = extract_to_dir(model, pre, items, folder, opts, Dist(), weights_label="random (seed 0)", log=lambda _: None)
    return {"workers": workers, "images_per_s": s["images"] / s["seconds"], "seconds": s["seconds"],
            "decode_wait_s": s["decode_wait"], "model_s": s["model"], "write_s": s["write"]}


def rss_child(list_file: str, out: str, depth: int, workers: int) -> None:
    """Runs one extraction and prints its peak RSS (this process; the workers separately)."""
    model, pre = model_and_pre(depth)
    items = collect_items([], list_file=list_file)
    opts = ExtractOptions(store=("cls", "patch"), shard_size=100, batch_size=16, workers=workers,
                          max_pixels=2048 * 2048, quiet=True)
    s = extract_to_dir(model, pre, items, out, opts, Dist(), weights_label="random (seed 0)", log=lambda _: None)
    print(json.dumps({"images": s["images"], "seconds": s["seconds"],
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "peak_rss_workers_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def rss(files: list[Path], n: int, tmp: Path, depth: int, workers: int) -> dict:
    lst = tmp / f"list{n}.csv"
    lst.write_text("path,id\n" + "".join(f"{files[i % len(files)]},img{i:06d}\n" for i in range(n)))
    env = dict(os.environ, PYTHONPATH=str(Path(flashdino.__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, __file__, "--rss-child", str(lst), str(tmp / f"rss{n}"), str(depth),
                           str(workers)], env=env, capture_output=True, text=True, check=True)
    return {"n": n, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256, help="images for the throughput runs")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--rss", default="200,2000", help="image counts for the peak-RSS runs ('' to skip)")
    ap.add_argument("--rss-depth", type=int, default=None,
                    help="blocks of the ViT-S in the RSS runs (default: all 12; fewer keeps them short)")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--note", default="", help="a sentence for the results (e.g. machine load)")
    ap.add_argument("--decode-only", action="store_true", help="only the per-core decoding rates (printed)")
    ap.add_argument("--rss-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        lf, out, depth, workers = args.rss_child
        rss_child(lf, out, int(depth), int(workers))
        return 0

    info = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/bench_extract.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine(), "load_start": list(os.getloadavg())}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        files = make_jpegs(tmp / "jpegs", max(args.images, 200))
        items = collect_items([str(p) for p in files[: args.images]])
        model, pre = model_and_pre()
        res = {"decode_per_core": decode_per_core(items, pre)}
        res["decode_only_images_per_s"] = res["decode_per_core"]["fast_decode_and_preprocess"]
        if args.decode_only:
            info.update(results=res, load_end=list(os.getloadavg()), note=args.note)
            RESULTS.mkdir(exist_ok=True)
            (RESULTS / f"extract_decode_{args.tag}.json").write_text(json.dumps(info, indent=1))
            print(json.dumps(res, indent=1))
            return 0
        before = model_only(model, args.images, args.batch_size)
        res["pipeline"] = [pipeline(model, pre, items, int(w), args.batch_size, tmp / f"out{w}")
                           for w in args.workers.split(",")]
        # measured on both sides of the pipeline runs: a shared machine's load drifts within minutes
        after = model_only(model, args.images, args.batch_size)
        res["model_only_images_per_s"] = (before + after) / 2
        res["model_only_before_after"] = [before, after]
        for p in res["pipeline"]:
            p["vs_model_only"] = p["images_per_s"] / res["model_only_images_per_s"]
            p["model_share"] = p["model_s"] / p["seconds"]  # within one run: immune to load drift
        counts = [int(v) for v in args.rss.split(",") if v.strip()]
        res["rss"] = [rss(files[:200], n, tmp, args.rss_depth or 12, 1) for n in counts]
    info["load_end"] = list(os.getloadavg())
    info["results"] = res
    info["settings"] = {"images": args.images, "batch_size": args.batch_size, "jpeg": "640x480 q90", "model":
                        "dinov3_vits16 (random weights), fp32, 224x224", "rss_depth": args.rss_depth or 12,
                        "rss_store": "cls,patch, shard size 100, 1 worker"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"extract_{args.tag}.json").write_text(json.dumps(info, indent=1))
    (RESULTS / f"extract_{args.tag}.md").write_text(render(info, args.note))
    print(render(info, args.note))
    return 0


def render(info: dict, note: str) -> str:
    m, r, s = info["machine"], info["results"], info["settings"]
    lines = [f"# flashdino data-set extraction: {m['cpu']}", "",
             f"- date (UTC): {info['date']}", f"- command: `{info['command']}`",
             f"- machine: {m['cpu']} ({m['cpus']} logical CPUs, {m['isa']}, torch threads {m['torch_threads']}), "
             f"{m['platform']}",
             f"- versions: flashdino {m['flashdino']}, torch {m['torch']}, Pillow {m['pillow']}, "
             f"python {m['python']}",
             f"- load average (1/5/15 min): start {[round(v, 2) for v in info['load_start']]}, "
             f"end {[round(v, 2) for v in info['load_end']]}",
             f"- inputs: {s['images']} JPEGs {s['jpeg']}; {s['model']}; batch {s['batch_size']}; "
             "store cls,patch (fp32)"]
    if note:
        lines.append(f"- **{note}**")
    lines += ["", "## throughput", "",
              "| stage | images/s | vs model-only | model share of wall time | decode wait (s) | model (s) "
              "| writing (s) |",
              "|---|---|---|---|---|---|---|",
              f"| decode + preprocess only (1 process) | {r['decode_only_images_per_s']:.1f} | | | | | |",
              f"| model only (mean of before / after the pipelines: "
              f"{r['model_only_before_after'][0]:.1f} / {r['model_only_before_after'][1]:.1f}) | "
              f"{r['model_only_images_per_s']:.1f} | 1.00 | | | | |"]
    for p in r["pipeline"]:
        lines.append(f"| pipeline, {p['workers']} workers | {p['images_per_s']:.1f} | {p['vs_model_only']:.2f} | "
                     f"{p['model_share']:.0%} | {p['decode_wait_s']:.1f} | {p['model_s']:.1f} | {p['write_s']:.1f} |")
    if "decode_per_core" in r:
        d = r["decode_per_core"]
        lines += ["", "## decoding per core (1 thread, as in a worker; best of 3 alternated rounds)", "",
                  "| path | Pillow (images/s) | fast path (images/s) | fast / Pillow |", "|---|---|---|---|",
                  f"| decode 640x480 JPEG | {d['pil_decode']:.1f} | {d['fast_decode']:.1f} | {d['speedup_decode']:.2f}x |",
                  f"| decode + preprocess to 224x224 | {d['pil_decode_and_preprocess']:.1f} | "
                  f"{d['fast_decode_and_preprocess']:.1f} | {d['speedup_preprocessed']:.2f}x |",
                  "", "Fast path: libjpeg-turbo through torchvision's decode_jpeg op (bit-identical to Pillow) and "
                  "the antialiased bilinear resize on uint8 (within 1/255 of the float resize)."]
    if r["rss"]:
        lines += ["", f"## peak memory (ViT-S/16 with {s['rss_depth']} blocks, {s['rss_store']})", "",
                  "| images | seconds | peak RSS main process (MiB) | peak RSS of a worker (MiB) |",
                  "|---|---|---|---|"]
        for x in r["rss"]:
            lines.append(f"| {x['n']} | {x['seconds']:.1f} | {x['peak_rss_mib']:.0f} | "
                         f"{x['peak_rss_workers_mib']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
