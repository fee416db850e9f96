"""The performance targets flashdino is held to, and which cases a run must measure to check them.

A target compares flashdino's median time on one case with a peer's (``speedup``: peer / flashdino
at least ``min``; ``time_ratio``: flashdino / peer at most ``max``) or with the device's measured
GEMM rate (``mfu``). GPU targets are set for an H100 SXM and full-depth models.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .peers import FLASHDINO_PEERS

__all__ = ["TARGETS", "evaluate_targets", "add_speedups", "fmt_target", "build_plan"]

# Targets (H100 SXM, bf16, full-depth models; CPU ones for the CI machine). value op threshold.
TARGETS = [
    dict(id="vitl16-512-b64-vs-hf", device="cuda", model="dinov3_vitl16", res=512, batch=64, dtype="bf16",
         mode="inference", kind="speedup", peer="hf", min=1.3, text="ViT-L/16 512px b64 inference >= 1.3x HF eager"),
    dict(id="vitl16-512-b64-vs-compile", device="cuda", model="dinov3_vitl16", res=512, batch=64, dtype="bf16",
         mode="inference", kind="speedup", peer="hf-compile", min=1.05,
         text="ViT-L/16 512px b64 inference >= 1.05x torch.compile(HF)"),
    dict(id="vitl16-512-b64-mfu", device="cuda", model="dinov3_vitl16", res=512, batch=64, dtype="bf16",
         mode="inference", kind="mfu", min=0.75, text="ViT-L/16 512px b64 inference >= 75% of the GEMM rate"),
    dict(id="vits16-224-b256-vs-hf", device="cuda", model="dinov3_vits16", res=224, batch=256, dtype="bf16",
         mode="inference", kind="speedup", peer="hf", min=2.0, text="ViT-S/16 224 b256 inference >= 2x HF eager"),
    dict(id="vits16-224-b256-vs-compile", device="cuda", model="dinov3_vits16", res=224, batch=256, dtype="bf16",
         mode="inference", kind="speedup", peer="hf-compile", min=1.2,
         text="ViT-S/16 224 b256 inference >= 1.2x torch.compile(HF)"),
    dict(id="vit7b16-512-b8-mfu", device="cuda", model="dinov3_vit7b16", res=512, batch=8, dtype="bf16",
         mode="inference", kind="mfu", min=0.80, text="ViT-7B/16 512px b8 inference >= 80% of the GEMM rate"),
    dict(id="vitb16-224-b1-latency", device="cuda", model="dinov3_vitb16", res=224, batch=1, dtype="bf16",
         mode="latency", kind="time_ratio", peer="hf", max=0.5, text="ViT-B/16 224 batch-1 latency <= 0.5x HF eager"),
    dict(id="vitb16-224-b128-training", device="cuda", model="dinov3_vitb16", res=224, batch=128, dtype="bf16",
         mode="training", kind="speedup", peer="hf", min=1.2, text="ViT-B/16 224 b128 training >= 1.2x HF eager"),
    dict(id="cpu-vits16-224-b8-fp32", device="cpu", model="dinov3_vits16", res=224, batch=8, dtype="fp32",
         mode="inference", kind="speedup", peer="hf", min=1.1, text="CPU ViT-S/16 224 b8 fp32 >= 1.1x HF eager"),
    dict(id="cpu-vits16-224-b8-bf16", device="cpu", model="dinov3_vits16", res=224, batch=8, dtype="bf16",
         mode="inference", kind="speedup", peer="hf", min=1.5,
         text="CPU ViT-S/16 224 b8 bf16 weights >= 1.5x HF bf16"),
    dict(id="cpu-vits16-224-b8-bf16-mfu", device="cpu", model="dinov3_vits16", res=224, batch=8, dtype="bf16",
         mode="inference", kind="mfu", min=0.45, text="CPU ViT-S/16 224 b8 bf16 >= 45% of the CPU's bf16 GEMM rate"),
]

def _find(rows, **kw) -> Optional[dict]:
    for r in rows:
        if all(r.get(k) == v for k, v in kw.items()) and r.get("status") == "ok" and "time_s" in r:
            return r
    return None


def add_speedups(rows: list[dict]) -> None:
    """``speedup[peer]`` = peer time / flashdino time, on every flashdino row of the same case."""
    cases: dict = {}
    for r in rows:
        if r.get("status") == "ok" and "time_s" in r:
            cases.setdefault((r["model"], r["res"], r["batch"], r["dtype"], r["mode"]), {})[r["peer"]] = r
    for peers in cases.values():
        for name in FLASHDINO_PEERS:
            fd = peers.get(name)
            if fd is None:
                continue
            fd["speedup"] = {p: peers[p]["time_s"] / fd["time_s"] for p in peers if p not in FLASHDINO_PEERS}
            # Ratio of the fastest calls: on a shared CPU the least disturbed call of each peer.
            fd["speedup_min"] = {p: peers[p]["min_s"] / fd["min_s"] for p in peers if p not in FLASHDINO_PEERS}


def evaluate_targets(rows: list[dict], device: torch.device, gpu_name: Optional[str], full_depth: bool) -> list[dict]:
    out = []
    for t in TARGETS:
        res = dict(id=t["id"], text=t["text"])
        if t["device"] != device.type:
            continue
        if not full_depth:
            res.update(status="n/a", detail="depth override: targets are for the full models")
            out.append(res)
            continue
        for peer in ("flashdino", "flashdino-graphs") if t["mode"] == "latency" else ("flashdino",):
            r = dict(res, peer=peer)
            fd = _find(rows, model=t["model"], res=t["res"], batch=t["batch"], dtype=t["dtype"], mode=t["mode"],
                       peer=peer)
            if fd is None:
                if peer == "flashdino":
                    out.append(dict(r, status="n/a", detail="case not measured in this run"))
                continue
            if t["kind"] == "mfu":
                value = fd.get("mfu")
            else:
                other = _find(rows, model=t["model"], res=t["res"], batch=t["batch"], dtype=t["dtype"],
                              mode=t["mode"], peer=t["peer"])
                if other is None:
                    out.append(dict(r, status="n/a", detail=f"{t['peer']} not measured in this run"))
                    continue
                value = other["time_s"] / fd["time_s"] if t["kind"] == "speedup" else fd["time_s"] / other["time_s"]
            if value is None:
                out.append(dict(r, status="n/a", detail="no GEMM rate"))
                continue
            if "min" in t:
                met, margin, thr = value >= t["min"], value / t["min"] - 1.0, t["min"]
            else:
                met, margin, thr = value <= t["max"], t["max"] / value - 1.0, t["max"]
            detail = ""
            if device.type == "cuda" and gpu_name and "H100" not in gpu_name:
                detail = f"target set for an H100 SXM; measured on {gpu_name}"
            out.append(dict(r, status="met" if met else "missed", value=value, threshold=thr, margin=margin,
                            detail=detail))
    return out


def fmt_target(t: dict) -> str:
    if t["status"] == "n/a":
        return f"- n/a    {t['text']}: {t.get('detail', '')}"
    unit = "%" if "mfu" in t["id"] else "x"
    val = f"{t['value'] * 100:.1f}%" if unit == "%" else f"{t['value']:.3f}x"
    thr = f"{t['threshold'] * 100:.0f}%" if unit == "%" else f"{t['threshold']}x"
    peer = f" [{t['peer']}]" if t.get("peer") and t["peer"] != "flashdino" else ""
    extra = f" ({t['detail']})" if t.get("detail") else ""
    return f"- {t['status'].upper():6s} {t['text']}{peer}: {val} vs {thr}, margin {t['margin'] * 100:+.1f}%{extra}"


def build_plan(device: torch.device, models: Sequence[str], dtypes: Sequence[str], resolutions: Sequence[int],
               modes: Sequence[str], peers: Sequence[str], targets_only: bool = False,
               models_given: bool = False) -> dict:
    """{(model, dtype): [(res, mode, batch or None for the default, [peers])]} in run order.

    ``targets_only``: the cases of :data:`TARGETS` for this device type (restricted to ``models``
    when they were given), each with flashdino, the peer it is compared against and, for latency,
    the CUDA-graph replay.
    """
    plan: dict[tuple, list] = {}
    if targets_only:
        for t in TARGETS:
            if t["device"] != device.type or (models_given and t["model"] not in models):
                continue
            want = {"flashdino", *(["flashdino-graphs"] if t["mode"] == "latency" else []),
                    *([t["peer"]] if t.get("peer") else [])}
            cases = plan.setdefault((t["model"], t["dtype"]), [])
            for c in cases:
                if (c[0], c[1], c[2]) == (t["res"], t["mode"], t["batch"]):
                    c[3].update(want)
                    break
            else:
                cases.append((t["res"], t["mode"], t["batch"], set(want)))
        return {k: [(r, m, b, [p for p in peers if p in want]) for r, m, b, want in v] for k, v in plan.items()}
    for model_name in models:
        for dtype in dtypes:
            plan[(model_name, dtype)] = [(res, mode, None, list(peers)) for res in resolutions for mode in modes
                                         if mode != "memory"]
    return plan
