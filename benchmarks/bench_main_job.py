"""The main job, whole processes: `flashdino features` against what users write instead.

One folder of JPEGs (128 of 640 x 480, generated), one Hugging Face folder of random DINOv3
ViT-S/16 weights (``DINOv3ViTModel.save_pretrained`` + a ``preprocessor_config.json``), and four
programs that turn the first into CLS features with the second, each a fresh process timed from
start to exit (interpreter start-up, imports, model loading, decoding, the model, writing):

- ``flashdino features DIR --weights HF_DIR --out OUT`` with its defaults;
- the same with ``--runtime eager`` (plain PyTorch);
- the same with ``--dtype bfloat16`` (opt-in reduced precision: OpenVINO's bf16 on a CPU with AMX /
  AVX512-BF16, else eager bf16; not equal to float32, so never a default);
- the HF loop of the transformers docs: AutoImageProcessor + AutoModel, PIL decoding, batches of
  16 under ``torch.inference_mode``;
- ``transformers.pipeline("image-feature-extraction")`` (batch 16, pooled output = CLS).

Runs are alternated (round r runs every program once, in a rotated order) so that the load of a
shared machine falls on all of them alike; the table gives medians, ratios to the HF loop, the
peak RSS of each process tree's largest process (``os.wait4``: the child and its waited-for
descendants) and the CLS cosine of each program against the HF loop (the weights are the same).

    python benchmarks/bench_main_job.py                       # 128 images, 3 rounds
    python benchmarks/bench_main_job.py --images 16 --rounds 1    # a quick look
Writes benchmarks/results/main_job_<tag>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "python"
RESULTS = HERE / "results"
BATCH = 16

HF_LOOP = r"""
import sys, glob
import numpy as np, torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

images_dir, hf_dir, out = sys.argv[1:4]
processor = AutoImageProcessor.from_pretrained(hf_dir)
model = AutoModel.from_pretrained(hf_dir).eval()
files = sorted(glob.glob(images_dir + "/*.jpg"))
cls = []
with torch.inference_mode():
    for i in range(0, len(files), 16):
        images = [Image.open(f).convert("RGB") for f in files[i:i + 16]]
        inputs = processor(images=images, return_tensors="pt")
        cls.append(model(**inputs).pooler_output)
np.save(out, torch.cat(cls).numpy())
"""

HF_PIPELINE = r"""
import sys, glob
import numpy as np
from transformers import pipeline

images_dir, hf_dir, out = sys.argv[1:4]
files = sorted(glob.glob(images_dir + "/*.jpg"))
extractor = pipeline("image-feature-extraction", model=hf_dir, device="cpu")
feats = extractor(files, batch_size=16, pool=True)
np.save(out, np.concatenate([np.asarray(f, dtype=np.float32).reshape(1, -1) for f in feats]))
"""


def make_hf_folder(folder: Path, seed: int = 0) -> Path:
    """Random DINOv3 ViT-S/16 weights as a Hugging Face folder (config, safetensors, preprocessor)."""
    import torch
    import transformers
    from transformers.models.dinov3_vit.image_processing_dinov3_vit import DINOv3ViTImageProcessor

    cfg = transformers.DINOv3ViTConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                                       num_attention_heads=6, num_register_tokens=4, patch_size=16,
                                       layerscale_value=1.0, key_bias=False)
    torch.manual_seed(seed)
    transformers.DINOv3ViTModel(cfg).eval().save_pretrained(folder)
    DINOv3ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return folder


def programs(images: Path, hf: Path, work: Path) -> dict:
    py = sys.executable
    fd = [py, "-m", "flashdino", "features", str(images), "--weights", str(hf), "--quiet", "--overwrite"]
    return {
        "flashdino features (defaults)": (fd + ["--out", str(work / "default.safetensors")],
                                          work / "default.safetensors"),
        "flashdino features --runtime eager": (fd + ["--runtime", "eager", "--out", str(work / "eager.safetensors")],
                                               work / "eager.safetensors"),
        "flashdino features --dtype bfloat16 (opt-in)": (fd + ["--dtype", "bfloat16", "--out",
                                                               str(work / "bf16.safetensors")],
                                                         work / "bf16.safetensors"),
        "HF loop (AutoImageProcessor + AutoModel)": ([py, "-c", HF_LOOP, str(images), str(hf),
                                                      str(work / "hf_loop.npy")], work / "hf_loop.npy"),
        'transformers.pipeline("image-feature-extraction")': ([py, "-c", HF_PIPELINE, str(images), str(hf),
                                                               str(work / "hf_pipeline.npy")],
                                                              work / "hf_pipeline.npy"),
    }


def run_once(argv: list, env: dict, log: Path) -> dict:
    """Wall time and peak RSS of one whole process (its largest waited-for process)."""
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(argv[:6])} ...` failed ({proc.returncode}):\n{log.read_text()[-2000:]}")
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}


def read_cls(path: Path):
    import numpy as np

    if path.suffix == ".npy":
        return np.load(path).astype(np.float64)
    from safetensors.numpy import load_file

    return load_file(str(path))["cls"].astype(np.float64)


def cosine_vs(ref, other) -> dict:
    import numpy as np

    cos = (ref * other).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(other, axis=1))
    rel = np.abs(ref - other).max() / np.abs(ref).max()
    return {"min_cosine": float(cos.min()), "max_rel_diff": float(rel)}


def machine() -> dict:
    cpu = platform.processor()
    flags = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and cpu in ("", platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    isa = ", ".join(f for f in ("avx512f", "avx512_bf16", "amx_tile") if f in flags.split())
    versions = {}
    for mod in ("torch", "torchvision", "transformers", "openvino", "onnxruntime", "PIL"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is reported as such
            versions[mod] = "not installed"
    return {"cpu": cpu, "isa": isa, "cpus": len(os.sched_getaffinity(0)), "platform": platform.platform(),
            "python": platform.python_version(), **versions}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="alternated runs of each program (median reported)")
    ap.add_argument("--only", default=None, help="comma-separated substrings: run only the matching programs")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--note", default="", help="a sentence for the results (e.g. machine load)")
    ap.add_argument("--keep", type=Path, default=None, help="build the inputs in this folder and keep them")
    ap.add_argument("--render", type=Path, default=None, help="only rewrite the .md of this results .json")
    args = ap.parse_args(argv)
    if args.render:
        info = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(render(info, info.get("note", "")))
        return 0
    sys.path.insert(0, str(HERE))
    from bench_extract import make_jpegs

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    # every program imports compiled bytecode, as installed packages do (pip compiles them): flashdino
    # runs from the source tree here, and PYTHONDONTWRITEBYTECODE would make it compile ~80 modules a run
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    info = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/bench_main_job.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine(), "load_start": list(os.getloadavg()),
            "settings": {"images": args.images, "jpeg": "640x480 q90 (generated)", "batch": BATCH,
                         "model": "DINOv3 ViT-S/16, random weights (seed 0), one HF folder, 224x224, fp32",
                         "rounds": args.rounds}}
    with tempfile.TemporaryDirectory() as d:
        root = args.keep or Path(d)
        images, hf, work = root / "images", root / "hf", root / "work"
        work.mkdir(parents=True, exist_ok=True)
        if not images.exists():
            make_jpegs(images, args.images)
        if not (hf / "config.json").exists():
            make_hf_folder(hf)
        # an empty optimize() cache: the warm-up run of the defaults is a user's first run (it exports)
        env["FLASHDINO_CACHE_DIR"] = str(work / f"optimize-cache-{time.time_ns()}")
        env["PYTHONPYCACHEPREFIX"] = str(work / "pycache")  # filled by the warm-up runs, for all programs alike
        progs = programs(images, hf, work)
        if args.only:
            keys = [k.strip() for k in args.only.split(",")]
            progs = {n: p for n, p in progs.items() if any(k in n for k in keys) or n.startswith("HF loop")}
        names = list(progs)
        # a first run of each (file cache; the defaults fill the optimize() cache): the timed runs are what a
        # user's second and later runs see; the first runs are reported too
        first = {name: run_once(progs[name][0], env, work / "warmup.log") for name in names}
        times = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                res = run_once(progs[name][0], env, work / "run.log")
                times[name].append(res)
                print(f"round {r}: {name}: {res['seconds']:.2f} s, peak RSS {res['peak_rss_mib']:.0f} MiB", flush=True)
        ref = read_cls(progs[names[[n.startswith("HF loop") for n in names].index(True)]][1])
        rows = []
        hf_median = statistics.median(t["seconds"] for t in times[next(n for n in names if n.startswith("HF loop"))])
        for name in names:
            secs = [t["seconds"] for t in times[name]]
            med = statistics.median(secs)
            rows.append({"program": name, "median_s": med, "runs_s": secs, "speedup_vs_hf_loop": hf_median / med,
                         "images_per_s": args.images / med, "first_run_s": first[name]["seconds"],
                         "peak_rss_mib": statistics.median(t["peak_rss_mib"] for t in times[name]),
                         **cosine_vs(ref, read_cls(progs[name][1]))})
    info["load_end"] = list(os.getloadavg())
    info["rows"] = rows
    info["note"] = args.note
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"main_job_{args.tag}.json").write_text(json.dumps(info, indent=1))
    text = render(info, args.note)
    (RESULTS / f"main_job_{args.tag}.md").write_text(text)
    print(text)
    bad = [r["program"] for r in rows if r["min_cosine"] < 0.9999]
    if bad:
        print(f"CLS features differ from the HF loop (cosine < 0.9999): {bad}", file=sys.stderr)
        return 1
    return 0


def render(info: dict, note: str = "") -> str:
    m, s = info["machine"], info["settings"]
    lines = [f"# The main job, whole processes: {m['cpu']}", "",
             f"- date (UTC): {info['date']}; command: `{info['command']}`",
             f"- machine: {m['cpu']} ({m['cpus']} logical CPUs; {m['isa']}), {m['platform']}",
             f"- versions: python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, transformers "
             f"{m['transformers']}, openvino {m['openvino']}, onnxruntime {m['onnxruntime']}, Pillow {m['PIL']}",
             f"- load average (1/5/15 min): start {[round(v, 2) for v in info['load_start']]}, "
             f"end {[round(v, 2) for v in info['load_end']]}",
             f"- inputs: {s['images']} JPEGs {s['jpeg']}; {s['model']}; batch {s['batch']}; {s['rounds']} alternated "
             "rounds after one warm-up run of each (warm file cache and optimize() cache)"]
    if note:
        lines.append(f"- **{note}**")
    lines += ["", "| program | median wall time (s) | runs (s) | vs HF loop | images/s | peak RSS (MiB) "
              "| CLS cosine vs HF loop (min) | first run (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in info["rows"]:
        runs = ", ".join(f"{v:.1f}" for v in r["runs_s"])
        lines.append(f"| {r['program']} | {r['median_s']:.2f} | {runs} | {r['speedup_vs_hf_loop']:.2f}x | "
                     f"{r['images_per_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['min_cosine']:.6f} | "
                     f"{r['first_run_s']:.1f} |")
    hf = next(r for r in info["rows"] if r["program"].startswith("HF loop"))
    lines += ["", "Ratios within each round (the HF loop's time / the program's, same round: the load of a shared "
              "machine drifts between rounds):", "", "| program | per round | median |", "|---|---|---|"]
    for r in info["rows"]:
        ratios = [h / v for h, v in zip(hf["runs_s"], r["runs_s"])]
        lines.append(f"| {r['program']} | {', '.join(f'{x:.2f}x' for x in ratios)} | "
                     f"{statistics.median(ratios):.2f}x |")
    lines += ["", "First run: the untimed run before the rounds, on an empty optimize() cache; for the defaults "
              "it includes the one-time OpenVINO export of these weights (cached for every later run)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
