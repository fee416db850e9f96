"""``flashdino.patch`` vs the unpatched Hugging Face / timm DINO models, side by side in one process.

Each model is built once (random weights, the ViT-S configurations of the released checkpoints);
its calls are timed alternately unpatched and patched (``flashdino.patch`` / ``flashdino.unpatch``
on the same object, the order flipped every repeat), and the medians are compared. Writes
``benchmarks/results/patch_<device>.{json,md}``.

    python benchmarks/bench_patch.py                           # CPU, fp32, inference + training step
    python benchmarks/bench_patch.py --threads 1               # a CPU shared with other jobs
    python benchmarks/bench_patch.py --quick --no-save         # one model, 3 repeats
    python benchmarks/bench_patch.py --device cuda --dtype bf16 --batch 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import flashdino  # noqa: F401
except ImportError:  # a bare checkout: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import flashdino  # noqa: E402
from flashdino.bench.report import environment, loadavg  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("hf-dinov3-vits16", "hf-dinov2-vits14", "timm-dinov3-vits16", "timm-dinov2-vits14")


def build(name: str, res: int) -> torch.nn.Module:
    if name.startswith("hf-"):
        from transformers import DINOv3ViTConfig, DINOv3ViTModel, Dinov2Config, Dinov2Model

        if name == "hf-dinov3-vits16":
            return DINOv3ViTModel(DINOv3ViTConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                                                  num_attention_heads=6, patch_size=16, num_register_tokens=4,
                                                  image_size=224))
        # facebook/dinov2-small: 518 px position embeddings (interpolated to the input), patch 14
        return Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                                        image_size=518))
    import timm

    timm_name = {"timm-dinov3-vits16": "vit_small_patch16_dinov3", "timm-dinov2-vits14": "vit_small_patch14_dinov2"}
    return timm.create_model(timm_name[name], pretrained=False, num_classes=0, img_size=res)


def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).last_hidden_state if hasattr(model, "config") else model.forward_features(x)


def time_pair(model, x, mode: str, repeats: int, device: torch.device, autocast: bool):
    """Median seconds of one call unpatched and patched, alternating, plus the outputs' relative gap."""

    def call():
        torch.manual_seed(0)  # the same random draws (HF DINOv3's training RoPE augmentation) in both runs
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if mode == "inference":
                with torch.no_grad():
                    return features(model, x)
            model.zero_grad(set_to_none=True)
            out = features(model, x)
            out.float().square().mean().backward()
            return out.detach()

    def timed(patched: bool):
        (flashdino.patch if patched else flashdino.unpatch)(model)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    model.train(mode == "train")
    outs = {False: timed(False)[1], True: timed(True)[1]}  # warm-up (and the outputs compared)
    times = {False: [], True: []}
    for r in range(repeats):
        for patched in ((False, True) if r % 2 == 0 else (True, False)):
            times[patched].append(timed(patched)[0])
    flashdino.unpatch(model)
    gap = ((outs[True].float() - outs[False].float()).abs().max() / outs[False].float().abs().max()).item()
    return statistics.median(times[False]), statistics.median(times[True]), gap


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--modes", default="inference,train")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "amp", "bf16"), default="fp32",
                    help="fp32; amp: bf16 autocast; bf16: bf16 weights")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's). On a CPU shared with other jobs, 1 avoids "
                         "OpenMP barrier stalls that swamp the difference being measured")
    ap.add_argument("--quick", action="store_true", help="the first model only, 3 repeats")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models.split(",")[:1] if args.quick else args.models.split(",")
    repeats = 3 if args.quick else args.repeats
    env = environment(device)  # before the runs: its load average is the starting one
    rows = []
    for name in names:
        torch.manual_seed(0)
        model = build(name, args.res).to(device)
        if args.dtype == "bf16":
            model = model.to(torch.bfloat16)
        x = torch.randn(args.batch, 3, args.res, args.res, device=device,
                        dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
        for mode in args.modes.split(","):
            base, patched, gap = time_pair(model, x, mode, repeats, device, args.dtype == "amp")
            rows.append(dict(model=name, mode=mode, dtype=args.dtype, batch=args.batch, res=args.res,
                             unpatched_ms=round(base * 1e3, 1), patched_ms=round(patched * 1e3, 1),
                             speedup=round(base / patched, 3), max_rel_diff=float(f"{gap:.2e}")))
            print(rows[-1], flush=True)
    env["loadavg_end"] = loadavg()
    result = dict(command=" ".join(["python", "benchmarks/bench_patch.py", *(argv or sys.argv[1:])]), env=env,
                  repeats=repeats, rows=rows)
    md = [f"`{result['command']}` on {env.get('gpu') or env['cpu']} ({env['cpu_count']} CPUs, "
          f"{env['torch_threads']} torch threads, load average {env['loadavg_start']} -> {env['loadavg_end']}), "
          f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}, "
          f"timm {env['versions']['timm']}; medians of {repeats} alternating calls.", "",
          "| model | mode | dtype | batch x res | unpatched ms | patched ms | speedup | max rel diff |",
          "|---|---|---|---|---|---|---|---|"]
    md += [f"| {r['model']} | {r['mode']} | {r['dtype']} | {r['batch']} x {r['res']} | {r['unpatched_ms']} | "
           f"{r['patched_ms']} | {r['speedup']}x | {r['max_rel_diff']:.1e} |" for r in rows]
    if any(r["model"] == "hf-dinov3-vits16" and r["mode"] == "train" for r in rows):
        md += ["", "hf-dinov3-vits16 train: the released configuration has `pos_embed_rescale=2.0`, so in training HF "
               "draws RoPE coordinate augmentations, which flashdino's RoPE grid does not express; the patched model "
               "then runs HF's attention (the residual + LayerNorm and final norm are still flashdino's)."]
    text = "\n".join(md) + "\n"
    print(text)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        stem = RESULTS / f"patch_{env['device_tag']}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        stem.with_suffix(".md").write_text(text)
    return result


if __name__ == "__main__":
    main()
