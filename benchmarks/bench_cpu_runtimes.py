"""CPU runtimes side by side: HF eager, flashdino eager, torch.compile, ONNX Runtime, OpenVINO, optimize().

One process, the same random weights everywhere (HF's converted through flashdino's HF loader),
every runtime called once per round in a rotating order (so load and clock drift hit all alike),
median over rounds. Fidelity is measured against flashdino eager fp32: max relative difference
(max |a - b| / max |b|) of the patch tokens and the CLS token, and for reduced precision the
minimum cosine similarity per image.

    python benchmarks/bench_cpu_runtimes.py                      # ViT-S/16 @ 224, batch 8
    python benchmarks/bench_cpu_runtimes.py --case vitb16@224xb1 --case vitl16@512xb1 --rounds 5
    python benchmarks/bench_cpu_runtimes.py --no-reduced         # fp32 runtimes only

Results are merged (per case) into benchmarks/results/cpu_runtimes.{json,md}. The ranking that
``flashdino.optimize(runtime="auto")`` uses lives in python/flashdino/deploy/measured.py: update it
from these numbers.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results"

CASES = {
    "vits16@224xb8": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                          size=224, batch=8),
    "vitb16@224xb1": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          size=224, batch=1),
    "vitl16@512xb1": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          size=512, batch=1),
}


def build_pair(case: dict):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    import flashdino

    cfg = DINOv3ViTConfig(hidden_size=case["hidden_size"], intermediate_size=case["intermediate_size"],
                          num_hidden_layers=case["num_hidden_layers"], num_attention_heads=case["num_attention_heads"],
                          num_register_tokens=4, patch_size=16, image_size=224, attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = DINOv3ViTModel(cfg).eval()
    with torch.no_grad():  # layer scales away from 1e-5 so that every block changes the tokens
        for name, p in hf.named_parameters():
            if "lambda1" in name:
                p.uniform_(0.3, 1.0)
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


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("transformers", "onnx", "onnxscript", "onnxruntime", "openvino"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def min_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(1), b.double().flatten(1), dim=1).min().item()  # fp32 rounds above 1


TARGET_RUNTIMES = ("HF eager", "flashdino eager", "OpenVINO (direct, f32 hint)", 'optimize(runtime="auto")')


def contestants(hf, fd, x, work: Path, reduced: bool, notes: list, only=None) -> dict:
    """name -> (callable x -> (cls, patches), precision label, setup seconds)."""
    import flashdino
    from flashdino.deploy import export_onnx, installed_runtimes

    n_prefix = 1 + fd.n_storage_tokens
    out: dict = {}

    def add(name, precision, make):
        if only is not None and name not in only:
            return
        t0 = time.perf_counter()
        try:
            fn = make()
            fn(x)  # first call: compile / load
        except Exception as exc:  # report and go on: one runtime failing must not hide the others
            notes.append(f"{name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
            return
        out[name] = (fn, precision, time.perf_counter() - t0)

    def from_dict(obj):
        return lambda x: (lambda d: (d["x_norm_clstoken"], d["x_norm_patchtokens"]))(obj.forward_features(x))

    def hf_call(x):
        h = hf(pixel_values=x).last_hidden_state
        return h[:, 0], h[:, n_prefix:]

    add("HF eager", "fp32", lambda: hf_call)
    add("flashdino eager", "fp32", lambda: from_dict(fd))
    if only is None:
        add("torch.compile(flashdino)", "fp32", lambda: from_dict(torch.compile(fd)))
    add("compile + freezing (optimize inductor)", "fp32",
        lambda: from_dict(flashdino.optimize(fd, runtime="inductor", cache_dir=work)))
    add("oneDNN eager (optimize onednn)", "fp32", lambda: from_dict(flashdino.optimize(fd, runtime="onednn", cache_dir=work)))
    installed = installed_runtimes()
    onnx_path = work / "direct.onnx"
    if "onnxruntime" in installed or "openvino" in installed:
        export_onnx(fd, onnx_path)  # the script's own export, dynamic shapes
        static_path = export_onnx(fd, work / "direct_static.onnx", dynamic=False, static_size=tuple(x.shape[-2:]),
                                  batch_size=x.shape[0])
    if "onnxruntime" in installed:
        def make_ort():
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # no busy-waiting threads after a call: they would slow the next runtime in the round
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            s = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
            return lambda x: tuple(torch.from_numpy(a) for a in s.run(["x_norm_clstoken", "x_norm_patchtokens"],
                                                                      {"pixel_values": x.numpy()}))

        add("ONNX Runtime (direct)", "fp32", make_ort)
    if "openvino" in installed:
        def make_ov(precision):
            import openvino as ov

            cm = ov.Core().compile_model(str(static_path), "CPU", {"INFERENCE_PRECISION_HINT": precision})

            def run(x):
                r = cm(x.numpy())
                return (torch.from_numpy(r[cm.output("x_norm_clstoken")].copy()),
                        torch.from_numpy(r[cm.output("x_norm_patchtokens")].copy()))

            return run

        add("OpenVINO (direct, f32 hint)", "fp32", lambda: make_ov("f32"))
    add('optimize(runtime="auto")', "fp32", lambda: from_dict(flashdino.optimize(fd, cache_dir=work)))
    if reduced:
        if "openvino" in installed:
            add('optimize("openvino", precision="bf16")', "bf16",
                lambda: from_dict(flashdino.optimize(fd, runtime="openvino", precision="bf16", cache_dir=work)))
        add('optimize("eager", precision="bf16") (autocast)', "bf16",
            lambda: from_dict(flashdino.optimize(fd, runtime="eager", precision="bf16", cache_dir=work)))
        add('optimize("eager", precision="int8") (dynamic quant.)', "int8",
            lambda: from_dict(flashdino.optimize(fd, runtime="eager", precision="int8", cache_dir=work)))
        if "onnxruntime" in installed:
            add('optimize("onnxruntime", precision="int8")', "int8",
                lambda: from_dict(flashdino.optimize(fd, runtime="onnxruntime", precision="int8", cache_dir=work)))
    return out


def run_case(name: str, rounds: int, reduced: bool, only=None) -> dict:
    case = CASES[name]
    hf, fd = build_pair(case)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(case["batch"], 3, case["size"], case["size"], generator=g)
    notes: list = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        runs = contestants(hf, fd, x, Path(tmp), reduced, notes, only)
        ref_cls, ref_patch = runs["flashdino eager"][0](x)
        names = list(runs)
        times = {n: [] for n in names}
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]  # rotate who runs first
            for n in order:
                t0 = time.perf_counter()
                runs[n][0](x)
                times[n].append(time.perf_counter() - t0)
            print(f"  round {r + 1}/{rounds} done", file=sys.stderr)
        rows = []
        for n in names:
            fn, precision, setup = runs[n]
            cls, patch = fn(x)
            rows.append({"runtime": n, "precision": precision, "median_ms": 1e3 * statistics.median(times[n]),
                         "times_ms": [round(1e3 * t, 2) for t in times[n]], "setup_s": round(setup, 2),
                         "rel_diff_cls": rel(cls, ref_cls), "rel_diff_patch": rel(patch, ref_patch),
                         "cos_cls": min_cos(cls, ref_cls), "cos_patch": min_cos(patch, ref_patch)})
    # Per-round ratios: each round runs every runtime back to back, so a ratio within a round
    # cancels most of the load that other jobs put on a shared machine.
    ov_name = "OpenVINO (direct, f32 hint)"
    for r in rows:
        for ref_name, key in (("HF eager", "round_ratio_vs_hf_eager"), (ov_name, "round_ratio_vs_openvino_direct")):
            if ref_name in times:
                r[key] = statistics.median(a / b for a, b in zip(times[ref_name], times[r["runtime"]]))
    base = {r["runtime"]: r["median_ms"] for r in rows}
    for r in rows:
        r["x_vs_flashdino_eager"] = base["flashdino eager"] / r["median_ms"]
        r["x_vs_hf_eager"] = base["HF eager"] / r["median_ms"] if "HF eager" in base else None
        ov = base.get("OpenVINO (direct, f32 hint)")
        r["x_vs_openvino_direct"] = ov / r["median_ms"] if ov else None
    del hf, fd
    gc.collect()
    return {"case": name, "batch": case["batch"], "size": case["size"], "rounds": rounds, "rows": rows, "notes": notes}


def to_markdown(data: dict) -> str:
    m = data["machine"]
    lines = [f"# CPU runtimes (benchmarks/bench_cpu_runtimes.py)", "",
             f"{m['cpu']}, {m['threads']} threads, {m['date']}, load average {m['load_start']} at start, "
             f"{m['load_end']} at end (the machine was shared with other jobs: ratios come from interleaved calls "
             f"in one process, medians; 'per-round ratio' is the median over rounds of the ratio within a round, "
             f"which cancels most of the load of other jobs). Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v), ""]
    for c in data["cases"].values():
        load = f"; load average {c['load_average']} at end" if c.get("load_average") else ""
        lines += [f"## {c['case']} (batch {c['batch']}, {c['size']}x{c['size']}, median of {c['rounds']} rounds{load})", "",
                  "| runtime | precision | median ms | x flashdino eager | x HF eager | x OpenVINO direct | "
                  "per-round ratio x HF eager | per-round ratio x OpenVINO direct | max rel diff patch | "
                  "max rel diff CLS | min cos patch | min cos CLS |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in c["rows"]:
            def f(v, fmt):
                return "" if v is None else format(v, fmt)
            lines.append(f"| {r['runtime']} | {r['precision']} | {r['median_ms']:.1f} | {f(r['x_vs_flashdino_eager'], '.2f')}x"
                         f" | {f(r['x_vs_hf_eager'], '.2f')}x | {f(r['x_vs_openvino_direct'], '.2f')}x"
                         f" | {f(r.get('round_ratio_vs_hf_eager'), '.2f')}x"
                         f" | {f(r.get('round_ratio_vs_openvino_direct'), '.2f')}x"
                         f" | {r['rel_diff_patch']:.1e} | {r['rel_diff_cls']:.1e} | {r['cos_patch']:.6f} | {r['cos_cls']:.6f} |")
        for note in c["notes"]:
            lines.append(f"\nNote: {note}")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", action="append", choices=sorted(CASES), help="case(s) to run (default vits16@224xb8)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per runtime (median; >= 5)")
    parser.add_argument("--no-reduced", action="store_true", help="skip the bf16 / int8 options")
    parser.add_argument("--target", action="store_true",
                        help="only the issue-13 target check (HF eager, flashdino eager, OpenVINO direct, optimize auto), "
                             "stored as '<case>:target'")
    parser.add_argument("--out", type=Path, default=RESULTS / "cpu_runtimes.json")
    args = parser.parse_args(argv)
    if args.rounds < 5:
        parser.error("--rounds must be at least 5 (a median of fewer calls is noise on a shared machine)")
    path = args.out
    data = json.loads(path.read_text()) if path.is_file() else {"cases": {}}
    load_start = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    for name in args.case or ["vits16@224xb8"]:
        print(f"{name} ...", file=sys.stderr)
        key = f"{name}:target" if args.target else name
        data["cases"][key] = run_case(name, args.rounds, not args.no_reduced and not args.target,
                                      TARGET_RUNTIMES if args.target else None)
        data["cases"][key]["case"] = key
        data["cases"][key]["load_average"] = f"{load_start} at start, " + ", ".join(f"{v:.1f}" for v in os.getloadavg())
        data["machine"] = {"cpu": _cpu_name(), "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(),
                           "load_start": load_start, "load_end": ", ".join(f"{v:.1f}" for v in os.getloadavg()),
                           "versions": _versions()}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1))
        path.with_suffix(".md").write_text(to_markdown(data))
        print(to_markdown({"machine": data["machine"], "cases": {key: data["cases"][key]}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
