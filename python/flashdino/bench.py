"""End-to-end benchmark: flashdino against Hugging Face transformers, torch.compile and timm.

Measures, in one process and on one device:

- throughput at a large batch (``inference``), latency at batch 1 (``latency``) and forward +
  backward throughput (``training``), with the peak memory of each call;
- the device's dense GEMM rate (bf16 and fp32; 8192^3 on a GPU, smaller on a CPU) and its copy
  bandwidth, so that every row carries its model FLOP utilisation
  (``MFU = model FLOPs / time / measured GEMM rate`` of the row's compute dtype);
- ``memory``: the largest square image one GPU handles at batch 1 (binary search, OOM caught).

Peers (``--peers``): ``flashdino`` (default dispatch: the fast kernels on CUDA),
``flashdino-torch`` (``FLASHDINO_BACKEND=torch``, the pure-PyTorch reference path),
``flashdino-graphs`` (flashdino replayed from a CUDA graph, latency only by default), ``hf``
(transformers ``DINOv3ViTModel`` / ``Dinov2Model`` eager, ``attn_implementation="sdpa"``),
``hf-compile`` (``torch.compile`` of that model) and ``timm`` (eager). Peers that are not installed
are skipped with a message. All peers hold the same random weights: the HF model is initialised
and its state dict goes through flashdino's loader; timm gets flashdino's weights renamed to its
layout. Before timing, each peer's output tokens are compared with flashdino's PyTorch path on the
same input (cosine similarity and relative error). HF and timm recompute fp32 RoPE periods while
flashdino uses the official bf16-rounded ones, so a small difference is expected for DINOv3.

Method: warm-up calls, then ``--repeats`` timed calls cycling through ``--rotate`` different input
tensors; CUDA events per call on a GPU (latency: host wall clock with a synchronise around each
call), ``time.perf_counter`` on a CPU, where the peers of one case are interleaved call by call so
that load from other processes affects them alike. The median is reported.

FLOPs (shared/SPEC.md section 4): per block ``8*N*D^2`` (qkv + proj) ``+ 4*N^2*D`` (attention)
``+ 4*N*D*hidden`` (MLP) or ``+ 6*N*D*hidden`` (SwiGLU, three GEMMs), i.e. ``24*N*D^2 + 4*N^2*D``
for an MLP x4; plus the patch-embedding GEMM ``2*HW*D*3*P^2``; training counts 3x.

    python benchmarks/e2e.py                                  # everything the device supports
    python benchmarks/e2e.py --ci                             # the CI-sized CPU table
    python benchmarks/e2e.py --models vitl16 --res 512 --modes inference --peers flashdino,hf,hf-compile
    python benchmarks/e2e.py --modes memory --models vitl16   # largest image at batch 1 (GPU)
    flashdino bench ...                                       # the same, from the command line

Results: ``benchmarks/results/e2e_<device>.json`` and ``.md`` (and ``.png`` when matplotlib is
importable), with the machine, driver, GPU, library versions, date and the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["main", "build_parser", "build_plan", "search_largest", "model_flops", "flop_breakdown", "tokens_per_image", "TARGETS", "PEERS",
           "MODEL_ALIASES", "measure_gemm_rate", "measure_copy_bandwidth", "compare_tokens"]

PEERS = ("flashdino", "flashdino-torch", "flashdino-graphs", "hf", "hf-compile", "timm")
FLASHDINO_PEERS = ("flashdino", "flashdino-torch", "flashdino-graphs")
MODES = ("inference", "latency", "training", "memory")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "amp": torch.float32}  # amp: fp32 weights, bf16 autocast

# Short names accepted by --models (any flashdino variant name or alias also works).
MODEL_ALIASES = {
    "vits16": "dinov3_vits16", "vits16plus": "dinov3_vits16plus", "vitb16": "dinov3_vitb16",
    "vitl16": "dinov3_vitl16", "vitl16plus": "dinov3_vitl16plus", "vith16plus": "dinov3_vith16plus",
    "vit7b16": "dinov3_vit7b16", "7b": "dinov3_vit7b16", "vitl14": "dinov2_vitl14",
}
GPU_DEFAULT_MODELS = ("dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16", "dinov3_vith16plus", "dinov3_vit7b16",
                      "dinov2_vitl14")
CPU_DEFAULT_MODELS = ("dinov3_vits16",)

# Default batches on a GPU: (low resolution <= 256, high resolution).
INFERENCE_BATCH = {"dinov3_vits16": (256, 64), "dinov3_vitb16": (256, 64), "dinov3_vitl16": (128, 64),
                   "dinov3_vith16plus": (64, 16), "dinov3_vit7b16": (32, 8), "dinov2_vitl14": (128, 64)}
TRAINING_BATCH = {"dinov3_vits16": (256, 32), "dinov3_vitb16": (128, 32), "dinov3_vitl16": (64, 16),
                  "dinov3_vith16plus": (32, 8), "dinov3_vit7b16": (4, 1), "dinov2_vitl14": (64, 16)}

TIMM_NAMES = {
    "dinov3_vits16": "vit_small_patch16_dinov3_qkvb", "dinov3_vits16plus": "vit_small_plus_patch16_dinov3_qkvb",
    "dinov3_vitb16": "vit_base_patch16_dinov3_qkvb", "dinov3_vitl16": "vit_large_patch16_dinov3_qkvb",
    "dinov3_vith16plus": "vit_huge_plus_patch16_dinov3_qkvb", "dinov3_vit7b16": "vit_7b_patch16_dinov3",
    "dinov2_vits14": "vit_small_patch14_dinov2", "dinov2_vitb14": "vit_base_patch14_dinov2",
    "dinov2_vitl14": "vit_large_patch14_dinov2", "dinov2_vitg14": "vit_giant_patch14_dinov2",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2", "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2", "dinov2_vitg14_reg": "vit_giant_patch14_reg4_dinov2",
}

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


class Skip(Exception):
    """A peer or case that cannot run here (not installed, no CUDA, unsupported model...)."""


# -- FLOPs ------------------------------------------------------------------------------------------------
def tokens_per_image(cfg, height: int, width: Optional[int] = None) -> int:
    """N = 1 + R + H*W for an image of height x width pixels (a remainder that is not a whole patch is dropped)."""
    width = height if width is None else width
    P = cfg.patch_size
    return 1 + cfg.n_storage_tokens + (height // P) * (width // P)


def flop_breakdown(cfg, height: int, width: Optional[int] = None) -> dict:
    """Forward FLOPs of one image (multiply-add = 2 FLOPs), split by part."""
    width = height if width is None else width
    N, D, P = tokens_per_image(cfg, height, width), cfg.embed_dim, cfg.patch_size
    hidden = cfg.ffn_hidden
    ffn_gemms = 2 if cfg.ffn == "mlp" else 3
    per_block = dict(
        qkv_proj=8.0 * N * D * D,
        attention=4.0 * N * N * D,
        ffn=2.0 * ffn_gemms * N * D * hidden,
    )
    block = sum(per_block.values())
    patch_embed = 2.0 * (height // P) * (width // P) * D * cfg.in_chans * P * P
    return dict(tokens=N, per_block=per_block, block=block, blocks=block * cfg.depth, patch_embed=patch_embed,
                total=block * cfg.depth + patch_embed)


def model_flops(cfg, height: int, width: Optional[int] = None, batch: int = 1, training: bool = False) -> float:
    """Model FLOPs of one call on ``batch`` images; training (forward + backward) counts 3x the forward."""
    return flop_breakdown(cfg, height, width)["total"] * batch * (3.0 if training else 1.0)


# -- environment ------------------------------------------------------------------------------------------
def _version(module: str) -> Optional[str]:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "?")
    except Exception:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_driver() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except Exception:
        pass
    try:
        v = torch._C._cuda_getDriverVersion()  # CUDA driver API version, e.g. 12080
        return f"CUDA driver API {v // 1000}.{v % 1000 // 10}"
    except Exception:
        return None


def _loadavg() -> Optional[list]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def device_tag(device: torch.device) -> str:
    """Short device name for file names: ``cpu``, ``h100-80gb-hbm3``, ..."""
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower()
    name = re.sub(r"^nvidia\s+", "", name)
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "cuda"


def environment(device: torch.device) -> dict:
    import flashdino

    env = dict(
        date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=str(device), device_tag=device_tag(device), python=sys.version.split()[0],
        platform=platform.platform(), machine=platform.machine(), cpu=_cpu_model(), cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
        loadavg_start=_loadavg(),
        versions=dict(flashdino=flashdino.__version__, torch=torch.__version__, triton=_version("triton"),
                      transformers=_version("transformers"), timm=_version("timm"),
                      cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None),
        flashdino_backend_env={k: v for k, v in os.environ.items() if k.startswith("FLASHDINO_BACKEND")},
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), gpu_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_sms=props.multi_processor_count,
                   driver=_gpu_driver(), allow_tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                   allow_tf32_cudnn=torch.backends.cudnn.allow_tf32)
    try:
        from . import dispatch

        env["dispatch"] = {op: f"{name} ({why})" for op, (name, why) in dispatch.explain(device).items()}
    except Exception as exc:  # never fail a benchmark for a report line
        env["dispatch"] = f"unavailable: {exc}"
    return env


# -- timing -----------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[Tensor], Any], inputs: Sequence[Tensor], device: torch.device, repeats: int,
               *, start: int = 0, sync_each: bool = False) -> dict:
    """Times ``repeats`` calls of ``fn`` cycling through ``inputs``; seconds per call.

    CUDA: one event pair per call, calls issued back to back (``event_s``) and the host wall time
    of the whole block per call (``wall_block_s``); with ``sync_each`` every call is bracketed by
    synchronisations and its host wall time is recorded (``wall_s``, the latency a caller sees).
    CPU: ``time.perf_counter`` around each call (``wall_s``).
    """
    k = len(inputs)
    out: dict = {}
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        walls = []
        _sync(device)
        t_block = time.perf_counter()
        for i in range(repeats):
            x = inputs[(start + i) % k]
            if sync_each:
                _sync(device)
                t0 = time.perf_counter()
            starts[i].record()
            fn(x)
            ends[i].record()
            if sync_each:
                _sync(device)
                walls.append(time.perf_counter() - t0)
        _sync(device)
        out["wall_block_s"] = (time.perf_counter() - t_block) / max(repeats, 1)
        out["event_s"] = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
        if sync_each:
            out["wall_s"] = walls
    else:
        walls = []
        for i in range(repeats):
            x = inputs[(start + i) % k]
            t0 = time.perf_counter()
            fn(x)
            walls.append(time.perf_counter() - t0)
        out["wall_s"] = walls
    return out


def measure_gemm_rate(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: Optional[int] = None,
                      repeats: Optional[int] = None) -> dict:
    """Dense n x n x n GEMM rate (FLOP/s): 8192 on a GPU, 1024 (fp32) / 512 (bf16) on a CPU by default.

    Measured with ``F.linear(a, w)`` (``a @ w.T``, the layout of every ``nn.Linear`` in the models):
    on CPUs without native bf16 the plain ``a @ b`` bf16 matmul takes a much slower path.
    """
    if n is None:
        n = 8192 if device.type == "cuda" else (1024 if dtype == torch.float32 else 512)
    repeats = repeats or (20 if device.type == "cuda" else 3)
    gen = torch.Generator(device="cpu").manual_seed(1)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    fn = lambda _: F.linear(a, b)  # noqa: E731
    for _ in range(3 if device.type == "cuda" else 1):
        fn(None)
    t = time_calls(fn, [a], device, repeats)
    secs = statistics.median(t["event_s"] if "event_s" in t else t["wall_s"])
    return dict(n=n, dtype=str(dtype).replace("torch.", ""), op="F.linear", median_s=secs,
                flops_per_s=2.0 * n**3 / secs)


def measure_copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, repeats: Optional[int] = None) -> dict:
    """Device-to-device copy bandwidth in bytes/s, counting the read and the write (2 x size)."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 64 << 20)
    repeats = repeats or (20 if device.type == "cuda" else 5)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    fn = lambda _: dst.copy_(src)  # noqa: E731
    fn(None)
    t = time_calls(fn, [src], device, repeats)
    secs = statistics.median(t["event_s"] if "event_s" in t else t["wall_s"])
    return dict(bytes=nbytes, median_s=secs, bytes_per_s=2.0 * nbytes / secs)


def compare_tokens(out: Tensor, ref: Tensor) -> dict:
    """Cosine similarity, relative L2 error and max-abs error relative to the reference's max (fp32 math)."""
    if out.shape != ref.shape:
        return dict(ok=False, error=f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    a, b = out.detach().float().flatten(), ref.detach().float().flatten()
    if not torch.isfinite(a).all():
        return dict(ok=False, error="non-finite outputs")
    cos = F.cosine_similarity(a, b, dim=0).item()
    rel = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    max_rel = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    return dict(cos=cos, rel_err=rel, max_abs_rel=max_rel)


# -- models -----------------------------------------------------------------------------------------------
def _param_bytes(model: Optional[nn.Module]) -> int:
    if model is None:
        return 0
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _hf_config(cfg):
    if cfg.family == "dinov3":
        from transformers import DINOv3ViTConfig

        gated = cfg.ffn != "mlp"
        return DINOv3ViTConfig(
            hidden_size=cfg.embed_dim, intermediate_size=cfg.ffn_hidden, num_hidden_layers=cfg.depth,
            num_attention_heads=cfg.num_heads, hidden_act="silu" if gated else "gelu", use_gated_mlp=gated,
            layer_norm_eps=cfg.layer_norm_eps, rope_theta=cfg.rope_base, query_bias=cfg.qkv_bias, key_bias=False,
            value_bias=cfg.qkv_bias, proj_bias=cfg.proj_bias, mlp_bias=cfg.ffn_bias,
            num_register_tokens=cfg.n_storage_tokens, patch_size=cfg.patch_size, image_size=224,
            attn_implementation="sdpa",
        )
    if cfg.ffn != "mlp":
        raise Skip(f"{cfg.name}: the HF peer covers DINOv2 models with an MLP FFN only")
    kwargs = dict(hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                  mlp_ratio=int(cfg.ffn_ratio) if float(cfg.ffn_ratio).is_integer() else cfg.ffn_ratio,
                  image_size=cfg.img_size, patch_size=cfg.patch_size,
                  layer_norm_eps=cfg.layer_norm_eps, layerscale_value=1.0, qkv_bias=cfg.qkv_bias,
                  attn_implementation="sdpa")
    if cfg.n_storage_tokens:
        from transformers import Dinov2WithRegistersConfig

        return Dinov2WithRegistersConfig(num_register_tokens=cfg.n_storage_tokens, **kwargs)
    from transformers import Dinov2Config

    return Dinov2Config(**kwargs)


def _hf_model_class(cfg):
    if cfg.family == "dinov3":
        from transformers import DINOv3ViTModel

        return DINOv3ViTModel
    if cfg.n_storage_tokens:
        from transformers import Dinov2WithRegistersModel

        return Dinov2WithRegistersModel
    from transformers import Dinov2Model

    return Dinov2Model


def _fd_to_timm(sd: dict, cfg) -> tuple[dict, list]:
    """flashdino (official) keys -> timm's layout (Eva for DINOv3, VisionTransformer for DINOv2)."""
    out, notes = {}, []
    for k, v in sd.items():
        if k in ("mask_token", "rope_embed.periods") or k.startswith(("local_cls_norm.", "cls_norm.")) \
                or k.endswith("bias_mask"):
            continue
        if k in ("storage_tokens", "register_tokens"):
            out["reg_token"] = v
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)$", k)
        if m and cfg.family == "dinov3":
            i, rest = m.groups()
            if rest == "attn.qkv.bias":
                D = v.shape[0] // 3
                if v[D:2 * D].abs().max().item() != 0:
                    notes.append("timm has no k bias: flashdino's non-zero k bias dropped")
                out[f"blocks.{i}.attn.q_bias"] = v[:D]
                out[f"blocks.{i}.attn.v_bias"] = v[2 * D:]
                continue
            rest = {"ls1.gamma": "gamma_1", "ls2.gamma": "gamma_2"}.get(rest, rest)
            rest = re.sub(r"^mlp\.w1\.", "mlp.fc1_g.", rest)
            rest = re.sub(r"^mlp\.w2\.", "mlp.fc1_x.", rest)
            rest = re.sub(r"^mlp\.w3\.", "mlp.fc2.", rest)
            k = f"blocks.{i}.{rest}"
        out[k] = v
    if cfg.family == "dinov2" and cfg.n_storage_tokens and "pos_embed" in out:
        # timm's DINOv2 register models keep no CLS position: it is folded into cls_token.
        pos = out["pos_embed"]
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out, notes


def _fd_tokens(out: dict) -> Tensor:
    extra = [k for k in ("x_storage_tokens", "x_norm_regtokens") if k in out]
    parts = [out["x_norm_clstoken"][:, None]] + [out[k] for k in extra] + [out["x_norm_patchtokens"]]
    return torch.cat(parts, dim=1)


def _fd_loss(out: dict) -> Tensor:
    extra = [k for k in ("x_storage_tokens", "x_norm_regtokens") if k in out]
    loss = out["x_norm_clstoken"].float().square().mean() + out["x_norm_patchtokens"].float().square().mean()
    for k in extra:
        if out[k].numel():
            loss = loss + out[k].float().square().mean()
    return loss


@contextlib.contextmanager
def backend_env(peer: str):
    """``FLASHDINO_BACKEND=torch`` for the reference peer; no backend variables for the others."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("FLASHDINO_BACKEND")}
    for k in saved:
        del os.environ[k]
    if peer == "flashdino-torch":
        os.environ["FLASHDINO_BACKEND"] = "torch"
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith("FLASHDINO_BACKEND")]:
            del os.environ[k]
        os.environ.update(saved)


@dataclass
class Case:
    model: str
    cfg: Any
    res: int
    batch: int
    dtype: str
    mode: str

    @property
    def key(self) -> tuple:
        return (self.model, self.res, self.batch, self.dtype, self.mode)

    @property
    def training(self) -> bool:
        return self.mode == "training"


class ModelGroup:
    """The models of one (architecture, dtype): flashdino, HF (+ compiled) and timm, sharing weights."""

    def __init__(self, cfg, dtype: str, device: torch.device, peers: Sequence[str], log: Callable[[str], None]):
        self.cfg, self.dtype, self.device, self.log = cfg, dtype, device, log
        self.weight_dtype = DTYPES[dtype]
        self.autocast = dtype == "amp"
        self.fd: Optional[nn.Module] = None
        self.hf: Optional[nn.Module] = None
        self.hf_compiled = None
        self.timm: Optional[nn.Module] = None
        self.graph_runners: dict = {}
        self.unavailable: dict[str, str] = {}
        self.notes: list[str] = []
        self.refs: dict = {}
        self.peers = list(peers)
        self.keep_all = True

    # -- construction ---------------------------------------------------------------------------------
    def build(self) -> None:
        import flashdino
        from .models import build_model

        cfg, dev = self.cfg, self.device
        wants_hf = any(p in self.peers for p in ("hf", "hf-compile"))
        if dev.type == "cuda":
            with torch.device("meta"):
                numel = sum(p.numel() for p in build_model(cfg).parameters())
            one = numel * torch.empty((), dtype=self.weight_dtype).element_size()
            copies = 1 + int(wants_hf) + int("timm" in self.peers)
            total = torch.cuda.get_device_properties(dev).total_memory
            self.keep_all = one * copies <= 0.45 * total
            if not self.keep_all:
                self.notes.append(f"{cfg.name} {self.dtype}: {copies} x {one / 2**30:.1f} GiB of weights; only the "
                                  "peer being measured is kept on the GPU (the others wait in host memory)")
        if wants_hf:
            try:
                hf_cfg = _hf_config(cfg)
                cls = _hf_model_class(cfg)
                with torch.device(dev):
                    hf = cls(hf_cfg)
                self.hf = hf.to(dtype=self.weight_dtype).eval()
                impl = getattr(hf.config, "_attn_implementation", None)
                self.notes.append(f"HF {cls.__name__} attention implementation: {impl}")
            except ImportError as exc:
                self.unavailable["hf"] = self.unavailable["hf-compile"] = f"transformers is not installed ({exc})"
            except Skip as exc:
                self.unavailable["hf"] = self.unavailable["hf-compile"] = str(exc)
        with torch.device(dev):
            fd = build_model(cfg)
        fd = fd.to(dtype=self.weight_dtype)
        if self.hf is not None:
            # The HF model's random weights, through flashdino's loader (HF layout -> canonical).
            report = flashdino.load_weights(fd, self.hf.state_dict(), strict=True)
            self.weights_source = f"HF {type(self.hf).__name__} random init -> flashdino.load_weights"
            summary = getattr(report, "summary", lambda: "")()
            if summary:
                self.notes.append(f"{cfg.name}: loader notes: {summary}")
            if not self.keep_all:
                self.hf.to("cpu")
        else:
            fd.init_weights()
            self.weights_source = "flashdino init_weights()"
        self.fd = fd.eval()
        if "timm" in self.peers:
            self._build_timm()
            if self.timm is not None and not self.keep_all:
                self.timm.to("cpu")
        if "hf-compile" in self.peers and self.hf is not None:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self.hf_compiled = torch.compile(self.hf, dynamic=False)

    def _build_timm(self) -> None:
        name = TIMM_NAMES.get(self.cfg.name)
        if name is None:
            self.unavailable["timm"] = f"no timm model for {self.cfg.name}"
            return
        try:
            import timm
        except ImportError as exc:
            self.unavailable["timm"] = f"timm is not installed ({exc})"
            return
        kwargs = dict(pretrained=False, num_classes=0, depth=self.cfg.depth, dynamic_img_size=True)
        if self.cfg.family == "dinov2":
            kwargs["img_size"] = self.cfg.img_size
        try:
            with torch.device(self.device):
                model = timm.create_model(name, **kwargs)
        except Exception as exc:
            self.unavailable["timm"] = f"timm.create_model({name!r}) failed: {exc}"
            return
        sd, notes = _fd_to_timm(self.fd.state_dict(), self.cfg)
        try:
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except RuntimeError as exc:  # shape mismatches
            self.unavailable["timm"] = f"flashdino -> timm {name} weights do not fit: {_short(exc)}"
            return
        missing = [k for k in missing if not k.startswith("rope")]
        if missing or unexpected:
            self.unavailable["timm"] = (f"flashdino -> timm {name} weights do not fit: missing {missing[:4]}, "
                                        f"unexpected {unexpected[:4]}")
            return
        self.notes.extend(f"{self.cfg.name}: {n}" for n in notes)
        self.timm = model.to(dtype=self.weight_dtype).eval()
        self.timm_name = name

    def free(self) -> None:
        self.fd = self.hf = self.hf_compiled = self.timm = None
        self.graph_runners.clear()
        self.refs.clear()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        with contextlib.suppress(Exception):
            torch._dynamo.reset()

    def model_of(self, peer: str) -> Optional[nn.Module]:
        if peer in FLASHDINO_PEERS:
            return self.fd
        if peer in ("hf", "hf-compile"):
            return self.hf
        if peer == "timm":
            return self.timm
        return None

    def activate(self, peer: str) -> None:
        """Keeps only ``peer``'s model on the GPU when the weights of all peers do not fit comfortably."""
        if self.keep_all:
            return
        active = self.model_of(peer)
        for m in (self.fd, self.hf, self.timm):
            if m is not None and m is not active:
                m.to("cpu")
        if active is not None:
            active.to(self.device)
        gc.collect()
        torch.cuda.empty_cache()

    # -- per-peer callables ---------------------------------------------------------------------------
    def why_unavailable(self, peer: str, case: Case) -> Optional[str]:
        if peer in self.unavailable:
            return self.unavailable[peer]
        if peer == "flashdino-graphs":
            if self.device.type != "cuda":
                return "CUDA graphs need a CUDA device"
            if case.training:
                return "CUDA graphs are for inference"
        if peer == "hf-compile" and self.hf_compiled is None:
            return "no HF model"
        size = _res_for(self.cfg, case.res)
        if peer == "timm" and size % self.cfg.patch_size:
            return f"timm needs an image size that is a multiple of the patch size {self.cfg.patch_size}"
        return None

    def call(self, peer: str, case: Case) -> tuple[Callable, Callable]:
        """(fn(x) -> output, tokens(output) -> [B, N, D]) for one peer and case."""
        ac = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if self.autocast \
            else contextlib.nullcontext
        if peer in ("flashdino", "flashdino-torch"):
            model = self.fd
            fwd, tokens, loss = model.forward_features, _fd_tokens, _fd_loss
        elif peer == "flashdino-graphs":
            from .cuda_graphs import CudaGraphRunner

            key = (case.res, case.batch, case.dtype)
            if key not in self.graph_runners:
                self.graph_runners.clear()
                self.graph_runners[key] = CudaGraphRunner(self.fd, method="forward_features", clone_outputs=False,
                                                          warmup_iters=3)
            model = self.fd
            fwd, tokens, loss = self.graph_runners[key], _fd_tokens, _fd_loss
        elif peer in ("hf", "hf-compile"):
            model = self.hf
            target = self.hf_compiled if peer == "hf-compile" else self.hf

            def fwd(x, _m=target):
                return _m(pixel_values=x).last_hidden_state

            tokens, loss = (lambda o: o), (lambda o: o.float().square().mean())
        elif peer == "timm":
            model = self.timm
            fwd, tokens, loss = model.forward_features, (lambda o: o), (lambda o: o.float().square().mean())
        else:
            raise Skip(f"unknown peer {peer!r}")

        if case.training:
            def step(x):
                with ac():
                    out = fwd(x)
                    value = loss(out)
                value.backward()
                model.zero_grad(set_to_none=True)
                return value

            return step, None

        def infer(x):
            with ac():
                return fwd(x)

        return infer, tokens

    def train_mode(self, peer: str, training: bool) -> None:
        model = self.model_of(peer)
        if model is not None:
            model.train(training)


# -- running ----------------------------------------------------------------------------------------------
def _res_for(cfg, res: int) -> int:
    """The image size used for ``res`` (DINOv2: the nearest multiple of 14, e.g. 512 -> 518)."""
    P = cfg.patch_size
    return max(P, int(round(res / P)) * P) if cfg.family == "dinov2" else res


def _default_batch(model: str, res: int, mode: str, device: torch.device, args) -> int:
    if mode == "latency":
        return args.latency_batch
    if mode == "training":
        if args.train_batch:
            return args.train_batch
        if args.batch:
            return args.batch
        if device.type != "cuda":
            return 2
        return TRAINING_BATCH.get(model, (32, 8))[0 if res <= 256 else 1]
    if args.batch:
        return args.batch
    if device.type != "cuda":
        return 8
    return INFERENCE_BATCH.get(model, (64, 16))[0 if res <= 256 else 1]


def _inputs(case: Case, size: int, n: int, device: torch.device) -> list[Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(1000 + size * 7 + case.batch)
    dtype = DTYPES[case.dtype] if case.dtype != "amp" else torch.float32
    return [torch.randn(case.batch, 3, size, size, generator=gen).to(device=device, dtype=dtype) for _ in range(n)]


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


class Runner:
    def __init__(self, args, device: torch.device, log: Callable[[str], None] = print):
        self.args, self.device, self.log = args, device, log
        self.rows: list[dict] = []
        self.memory_rows: list[dict] = []
        self.skipped: dict[str, str] = {}
        self.notes: list[str] = []
        self.rates: dict = {}
        self._probes: dict = {}

    # -- device rates ---------------------------------------------------------------------------------
    def measure_rates(self, when: str) -> None:
        dev, a = self.device, self.args
        entry = {}
        for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            if name not in self.needed_rates:
                continue
            try:
                entry[name] = measure_gemm_rate(dev, dt, n=a.gemm_size)
            except Exception as exc:
                entry[name] = dict(error=_short(exc))
        try:
            entry["copy"] = measure_copy_bandwidth(dev)
        except Exception as exc:
            entry["copy"] = dict(error=_short(exc))
        entry["loadavg"] = _loadavg()
        self.rates[when] = entry
        parts = [f"{k} GEMM {_rate(v['flops_per_s'])} (n={v['n']})" for k, v in entry.items()
                 if isinstance(v, dict) and "flops_per_s" in v]
        if "bytes_per_s" in entry.get("copy", {}):
            parts.append(f"copy {entry['copy']['bytes_per_s'] / 1e9:.1f} GB/s")
        self.log(f"[rates {when}] " + ", ".join(parts) + f"  (load {entry['loadavg']})")

    def gemm_rate(self, dtype: str) -> Optional[float]:
        """The GEMM rate MFU is computed against: the highest of the measurements of this run."""
        key = "fp32" if dtype == "fp32" else "bf16"
        vals = [r[key]["flops_per_s"] for r in self.rates.values() if "flops_per_s" in r.get(key, {})]
        return max(vals) if vals else None

    # -- one case -------------------------------------------------------------------------------------
    def _row(self, case: Case, peer: str, size: int, **kw) -> dict:
        row = dict(model=case.model, family=case.cfg.family, depth=case.cfg.depth, res=size, batch=case.batch,
                   dtype=case.dtype, mode=case.mode, peer=peer, tokens=tokens_per_image(case.cfg, size),
                   flops=model_flops(case.cfg, size, batch=case.batch, training=case.training))
        row.update(kw)
        return row

    def _reference(self, group: ModelGroup, case: Case, size: int, x: Tensor) -> Tensor:
        key = (size, case.batch)
        if key not in group.refs:
            fn, tokens = group.call("flashdino-torch", dataclasses.replace(case, mode="inference"))
            group.activate("flashdino-torch")
            with backend_env("flashdino-torch"), torch.inference_mode():
                group.refs[key] = tokens(fn(x)).clone()
        return group.refs[key]

    def _is_reference_path(self, peer: str) -> bool:
        # On a CPU every flashdino op dispatches to the PyTorch reference path.
        return peer == "flashdino-torch" or (peer == "flashdino" and self.device.type != "cuda")

    def run_case(self, group: ModelGroup, case: Case, peers: Sequence[str]) -> None:
        a, dev = self.args, self.device
        size = _res_for(case.cfg, case.res)
        active: dict[str, dict] = {}
        for peer in peers:
            why = group.why_unavailable(peer, case)
            if why:
                self.rows.append(self._row(case, peer, size, status="skipped", message=why))
                continue
            active[peer] = {}
        if not active:
            return
        try:
            inputs = _inputs(case, size, a.rotate, dev)
        except Exception as exc:
            for peer in active:
                self.rows.append(self._row(case, peer, size, status="oom" if _is_oom(exc) else "error",
                                           message=f"inputs: {_short(exc)}"))
            return
        interleave = dev.type != "cuda" and not a.no_interleave
        states = {}
        for peer in active:
            states[peer] = self._prepare(group, case, peer, size, inputs)
            if not interleave:
                if states[peer].get("fn") is not None:
                    self._time_block(group, case, peer, states[peer], inputs)
                self._finish(group, case, peer, states[peer], inputs, size)
        if interleave:
            self._time_interleaved(group, case, states, inputs)
            for peer in active:
                self._finish(group, case, peer, states[peer], inputs, size)
        del inputs
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def _grad_ctx(self, case: Case):
        return torch.enable_grad() if case.training else torch.inference_mode()

    def _prepare(self, group: ModelGroup, case: Case, peer: str, size: int, inputs: list) -> dict:
        """Builds the callable, runs the first (checked) call and the warm-up."""
        a = self.args
        st: dict = dict(fn=None, status="ok", message="", times=[])
        try:
            group.activate(peer)
            fn, tokens = group.call(peer, case)
            group.train_mode(peer, case.training)
            t0 = time.perf_counter()
            with backend_env(peer), self._grad_ctx(case):
                out = fn(inputs[0])
                _sync(self.device)
                st["first_call_s"] = time.perf_counter() - t0
                if tokens is not None:
                    got = tokens(out)
                    if self._is_reference_path(peer) and (size, case.batch) not in group.refs:
                        group.refs[(size, case.batch)] = got.clone()
                        st["check"] = dict(cos=1.0, rel_err=0.0, max_abs_rel=0.0, reference=True)
                    else:
                        ref = self._reference(group, case, size, inputs[0])
                        group.activate(peer)
                        st["check"] = compare_tokens(got, ref)
                    del got
                del out
                for i in range(1, a.warmup + 1):
                    fn(inputs[i % len(inputs)])
                _sync(self.device)
            st["fn"] = fn
        except Skip as exc:
            st.update(status="skipped", message=str(exc))
        except Exception as exc:
            st.update(status="oom" if _is_oom(exc) else "error", message=_short(exc))
            if a.strict and not _is_oom(exc):
                raise
            self._recover()
        finally:
            group.train_mode(peer, False)
        return st

    def _recover(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def _time_block(self, group: ModelGroup, case: Case, peer: str, st: dict, inputs: list) -> None:
        try:
            group.train_mode(peer, case.training)
            with backend_env(peer), self._grad_ctx(case):
                st["timing"] = time_calls(st["fn"], inputs, self.device, self.args.repeats, start=1,
                                          sync_each=case.mode == "latency")
        except Exception as exc:
            st.update(status="oom" if _is_oom(exc) else "error", message=_short(exc), fn=None)
            if self.args.strict and not _is_oom(exc):
                raise
            self._recover()
        finally:
            group.train_mode(peer, False)

    def _time_interleaved(self, group: ModelGroup, case: Case, states: dict, inputs: list) -> None:
        """CPU: the peers of a case take turns call by call (order rotated every round)."""
        peers = [p for p, st in states.items() if st.get("fn") is not None]
        for st in states.values():
            st["timing"] = {"wall_s": []}
        probes = self._probes.setdefault(case.key, [])
        probe_dtype = torch.float32 if case.dtype == "fp32" else torch.bfloat16
        for r in range(self.args.repeats):
            # A short GEMM probe every round: the rate the CPU gives under the same load as the calls.
            with contextlib.suppress(Exception):
                probes.append(measure_gemm_rate(self.device, probe_dtype, n=self.args.gemm_size, repeats=1)["flops_per_s"])
            order = peers[r % len(peers):] + peers[:r % len(peers)] if peers else []
            for peer in order:
                st = states[peer]
                if st.get("fn") is None:
                    continue
                try:
                    group.train_mode(peer, case.training)
                    with backend_env(peer), self._grad_ctx(case):
                        t = time_calls(st["fn"], inputs, self.device, 1, start=1 + r)
                    st["timing"]["wall_s"].extend(t["wall_s"])
                except Exception as exc:
                    st.update(status="oom" if _is_oom(exc) else "error", message=_short(exc), fn=None)
                    if self.args.strict and not _is_oom(exc):
                        raise
                finally:
                    group.train_mode(peer, False)

    def _finish(self, group: ModelGroup, case: Case, peer: str, st: dict, inputs: list, size: int) -> None:
        timing = st.get("timing") or {}
        row = self._row(case, peer, size, status=st["status"], message=st["message"])
        if "check" in st:
            row["check"] = st["check"]
        if st.get("first_call_s") is not None:
            row["first_call_s"] = st["first_call_s"]
        if case.mode == "latency" or self.device.type != "cuda":
            samples = timing.get("wall_s") or []
            row["timer"] = "host wall clock" + (", synchronised per call" if self.device.type == "cuda" else "")
        else:
            samples = timing.get("event_s") or []
            row["timer"] = "CUDA events"
            if "wall_block_s" in timing:
                row["wall_block_s"] = timing["wall_block_s"]
        if samples and st["status"] == "ok":
            t = statistics.median(samples)
            rate = self.gemm_rate(case.dtype)
            row.update(time_s=t, min_s=min(samples), max_s=max(samples), samples=len(samples),
                       times_s=[round(s, 7) for s in samples], imgs_per_s=case.batch / t,
                       flops_per_s=row["flops"] / t, mfu=(row["flops"] / t / rate) if rate else None)
            if case.mode == "latency" and timing.get("event_s"):
                row["gpu_time_s"] = statistics.median(timing["event_s"])
            probes = self._probes.get(case.key)
            if probes:
                row["gemm_probe_flops_per_s"] = statistics.median(probes)
                row["mfu_same_load"] = row["flops"] / t / row["gemm_probe_flops_per_s"]
        model = group.model_of(peer)
        row["param_mib"] = _param_bytes(model) / 2**20
        if peer == "flashdino-graphs":
            runner = next(iter(group.graph_runners.values()), None)
            if runner is not None:
                row["graph_stats"] = dict(runner.stats)
                if not runner.stats["replays"]:
                    row["message"] = (row["message"] + "; " if row["message"] else "") + \
                        f"ran eagerly: {runner.last_reason}"
        if self.device.type == "cuda" and st.get("fn") is not None and st["status"] == "ok":
            row["peak_mem_mib"] = self._peak_memory(group, case, peer, st["fn"], inputs)
        if case.mode == "training" and peer == "hf":
            row["message"] = (row["message"] + "; " if row["message"] else "") + \
                "HF applies its RoPE coordinate augmentation in train mode"
        self.rows.append(row)
        self.log(self._format_row(row))
        if st.get("fn") is not None:
            st["fn"] = None

    def _peak_memory(self, group: ModelGroup, case: Case, peer: str, fn, inputs) -> Optional[float]:
        """Peak memory (MiB) one call allocates above what is already resident (weights, inputs)."""
        dev = self.device
        try:
            group.train_mode(peer, case.training)
            with backend_env(peer), self._grad_ctx(case):
                gc.collect()
                torch.cuda.synchronize(dev)
                torch.cuda.reset_peak_memory_stats(dev)
                base = torch.cuda.memory_allocated(dev)
                out = fn(inputs[0])
                torch.cuda.synchronize(dev)
                peak = torch.cuda.max_memory_allocated(dev) - base
                del out
            return peak / 2**20
        except Exception:
            self._recover()
            return None
        finally:
            group.train_mode(peer, False)

    def _format_row(self, row: dict) -> str:
        head = f"{row['model']:18s} {row['res']:4d} b{row['batch']:<4d} {row['dtype']:4s} {row['mode']:9s} {row['peer']:16s}"
        if row.get("status") != "ok" or "time_s" not in row:
            return f"{head} {row.get('status')}: {row.get('message', '')}"
        chk = row.get("check") or {}
        chk_s = f" cos {chk['cos']:.6f} rel {chk['rel_err']:.1e}" if "cos" in chk else ""
        mfu = f" MFU {row['mfu'] * 100:5.1f}% (vs the start GEMM rate)" if row.get("mfu") is not None else ""
        if row.get("mfu_same_load") is not None:
            mfu += f" ({row['mfu_same_load'] * 100:.1f}% vs interleaved GEMM probes)"
        mem = f" peak {row['peak_mem_mib']:.0f} MiB" if row.get("peak_mem_mib") is not None else ""
        return (f"{head} {row['time_s'] * 1e3:10.2f} ms  {row['imgs_per_s']:9.1f} img/s{mfu}{mem}{chk_s}")

    # -- memory mode ----------------------------------------------------------------------------------
    def run_memory(self, group: ModelGroup, model_name: str, peers: Sequence[str]) -> None:
        a, dev, cfg = self.args, self.device, group.cfg
        P = cfg.patch_size
        for peer in peers:
            if peer in ("flashdino-graphs", "hf-compile"):
                continue
            why = group.why_unavailable(peer, Case(model_name, cfg, 224, 1, group.dtype, "inference"))
            if why:
                self.memory_rows.append(dict(model=model_name, dtype=group.dtype, peer=peer, status="skipped",
                                             message=why))
                continue
            group.activate(peer)
            fn, _ = group.call(peer, Case(model_name, cfg, 224, 1, group.dtype, "inference"))
            tries: list[dict] = []

            def attempt(k: int) -> Optional[float]:
                size = k * P
                x = None
                try:
                    gc.collect()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(dev)
                    base = torch.cuda.memory_allocated(dev)
                    dtype = DTYPES[group.dtype] if group.dtype != "amp" else torch.float32
                    x = torch.randn(1, 3, size, size, device=dev, dtype=dtype)
                    t0 = time.perf_counter()
                    with backend_env(peer), torch.inference_mode():
                        out = fn(x)
                        torch.cuda.synchronize(dev)
                    secs = time.perf_counter() - t0
                    del out
                    tries.append(dict(size=size, ok=True, seconds=secs,
                                      peak_mib=(torch.cuda.max_memory_allocated(dev) - base) / 2**20))
                    self.log(f"  memory {model_name} {peer}: {size}x{size} ok ({secs:.1f} s, "
                             f"{tries[-1]['peak_mib']:.0f} MiB)")
                    return secs
                except Exception as exc:
                    if not _is_oom(exc):
                        tries.append(dict(size=size, ok=False, error=_short(exc)))
                        raise
                    tries.append(dict(size=size, ok=False, error="out of memory"))
                    self.log(f"  memory {model_name} {peer}: {size}x{size} out of memory")
                    return None
                finally:
                    del x
                    self._recover()

            status, message, lo_k, hi_k = "ok", "", None, None
            try:
                lo_k, hi_k, message = search_largest(attempt, max(1, 224 // P), max(1, a.max_size // P), a.max_try_s)
                if lo_k is None:
                    status = "oom"
                message = message.replace("the size limit", f"--max-size {a.max_size}")
            except Exception as exc:
                status, message = "error", _short(exc)
            best = lo_k * P if lo_k else None
            self.memory_rows.append(dict(
                model=model_name, dtype=group.dtype, peer=peer, batch=1, status=status, message=message,
                max_size=best, first_oom=hi_k * P if hi_k else None,
                tokens=tokens_per_image(cfg, best) if best else None, tries=tries))
            self.log(f"memory {model_name} {group.dtype} {peer}: largest {best}x{best}"
                     + (f", {hi_k * P}x{hi_k * P} runs out of memory" if hi_k else "") + (f" ({message})" if message else ""))


def search_largest(attempt: Callable[[int], Optional[float]], start: int, limit: int,
                   max_try_s: float = float("inf")) -> tuple[Optional[int], Optional[int], str]:
    """Largest k (image side in patches) for which ``attempt(k)`` fits, by doubling then bisection.

    ``attempt(k)`` returns the seconds the try took, or None when it ran out of memory. Growth stops
    at ``limit`` or after a try longer than ``max_try_s``. Returns (largest k that fits or None,
    smallest k that did not fit or None, a message saying why the search stopped early).
    """
    secs = attempt(start)
    if secs is None:
        return None, start, f"even the start size ({start} patches a side) does not fit"
    lo, hi, message = start, None, ""
    while True:
        nxt = min(lo * 2, limit)
        if nxt <= lo:
            message = "reached the size limit without running out of memory"
            break
        if secs > max_try_s:
            message = f"stopped growing: a try took > {max_try_s} s"
            break
        t = attempt(nxt)
        if t is None:
            hi = nxt
            break
        lo, secs = nxt, t
    if hi is not None:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if attempt(mid) is None:
                hi = mid
            else:
                lo = mid
    return lo, hi, message


# -- targets, summaries, output ---------------------------------------------------------------------------
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


def _fmt_target(t: dict) -> str:
    if t["status"] == "n/a":
        return f"- n/a    {t['text']}: {t.get('detail', '')}"
    unit = "%" if "mfu" in t["id"] else "x"
    val = f"{t['value'] * 100:.1f}%" if unit == "%" else f"{t['value']:.3f}x"
    thr = f"{t['threshold'] * 100:.0f}%" if unit == "%" else f"{t['threshold']}x"
    peer = f" [{t['peer']}]" if t.get("peer") and t["peer"] != "flashdino" else ""
    extra = f" ({t['detail']})" if t.get("detail") else ""
    return f"- {t['status'].upper():6s} {t['text']}{peer}: {val} vs {thr}, margin {t['margin'] * 100:+.1f}%{extra}"


def _rate(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:.1f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.2f} GFLOP/s"


def _mib(v) -> str:
    return f"{v:.0f}" if v is not None else ""


def render_markdown(result: dict) -> str:
    env, rows = result["environment"], result["rows"]
    lines = [f"# flashdino end-to-end benchmark: {env.get('gpu') or env['cpu']}", ""]
    lines.append(f"- date (UTC): {env['date_utc']}")
    lines.append(f"- command: `{result['command']}`")
    if env.get("gpu"):
        lines.append(f"- GPU: {env['gpu']} (sm {env['gpu_capability']}, {env['gpu_memory_gib']} GiB, "
                     f"{env['gpu_sms']} SMs), driver {env.get('driver')}, CUDA {env['versions']['cuda']}")
    lines.append(f"- machine: {env['machine']}, CPU {env['cpu']} ({env['cpu_count']} logical CPUs, "
                 f"torch threads {env['torch_threads']}, {env['cpu_capability']}), {env['platform']}")
    v = env["versions"]
    lines.append(f"- versions: flashdino {v['flashdino']}, torch {v['torch']}, triton {v['triton']}, "
                 f"transformers {v['transformers']}, timm {v['timm']}, python {env['python']}")
    la0, la1 = env.get("loadavg_start"), env.get("loadavg_end")
    lines.append(f"- load average (1/5/15 min): start {la0}, end {la1}")
    if result.get("load_warning"):
        lines.append(f"- **{result['load_warning']}**")
    for when, r in result["rates"].items():
        parts = [f"{k} GEMM {_rate(x['flops_per_s'])} (n={x['n']})" for k, x in r.items()
                 if isinstance(x, dict) and "flops_per_s" in x]
        if isinstance(r.get("copy"), dict) and "bytes_per_s" in r["copy"]:
            parts.append(f"copy {r['copy']['bytes_per_s'] / 1e9:.1f} GB/s (read + write)")
        lines.append(f"- device rates ({when}): " + ", ".join(parts))
    lines.append("- MFU = model FLOPs / time / the highest GEMM rate measured in this run for the row's compute "
                 "dtype (bf16 for bf16 and amp rows, fp32 for fp32 rows; `F.linear` = the nn.Linear layout). "
                 "FLOPs per shared/SPEC.md section 4 plus the patch-embedding GEMM; training = 3x forward. "
                 "On a CPU the value in brackets is against GEMM probes run between the timed calls, i.e. under "
                 "the same load from other processes.")
    lines.append("- check: cosine similarity / relative L2 error of the output tokens against flashdino's "
                 "PyTorch path (`FLASHDINO_BACKEND=torch`) on the same input and weights. HF and timm use fp32 "
                 "RoPE periods, flashdino the official bf16-rounded ones: a small DINOv3 difference is expected. "
                 "HF DINOv2 interpolates its position table without the official 0.1 offset (differs below 518 px).")
    lines.append("- time: median over the timed calls; " + ("CUDA events per call (latency: host wall clock, "
                 "synchronised per call); peak mem = the most one call allocates above the resident weights and "
                 "inputs." if env.get("gpu") else "time.perf_counter per call, peers interleaved call by call; "
                 "peak memory is not measured on a CPU."))
    lines.append("")
    for mode in MODES[:3]:
        mrows = [r for r in rows if r["mode"] == mode]
        if not mrows:
            continue
        unit = "latency (ms)" if mode == "latency" else "time / call (ms)"
        if any(r.get("timer") == "host wall clock" for r in mrows):
            unit += " median [min]"
        lines += [f"## {mode}", "",
                  f"| model | res | batch | dtype | peer | {unit} | img/s | vs HF | vs compile | vs timm | MFU | "
                  "peak mem (MiB) | cos | rel err | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mrows:
            sp = r.get("speedup", {})
            sp_min = r.get("speedup_min", {}) if r.get("timer") == "host wall clock" and r.get("samples", 0) > 1 else {}
            chk = r.get("check") or {}
            if r.get("status") == "ok" and "time_s" in r:
                t_cell = f"{r['time_s'] * 1e3:.2f}" + (f" [{r['min_s'] * 1e3:.2f}]" if r.get("timer") == "host wall clock"
                                                        and r.get("samples", 0) > 1 else "")
                cells = [t_cell, f"{r['imgs_per_s']:.1f}",
                         *((f"{sp[p]:.2f}x" + (f" (min {sp_min[p]:.2f}x)" if p in sp_min else "")) if p in sp else ""
                           for p in ("hf", "hf-compile", "timm")),
                         (f"{r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else "")
                         + (f" ({r['mfu_same_load'] * 100:.1f}%)" if r.get("mfu_same_load") is not None else ""),
                         _mib(r.get("peak_mem_mib")),
                         "reference" if chk.get("reference") else (f"{chk['cos']:.6f}" if "cos" in chk else ""),
                         "" if chk.get("reference") else (f"{chk['rel_err']:.1e}" if "rel_err" in chk else ""),
                         r.get("message", "")]
            else:
                cells = ["", "", "", "", "", "", "", "", "", f"{r.get('status')}: {r.get('message', '')}"]
            name = r["model"] if r["depth"] == _full_depth(r["model"]) else f"{r['model']} (depth {r['depth']})"
            lines.append(f"| {name} | {r['res']} | {r['batch']} | {r['dtype']} | {r['peer']} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    if result.get("memory"):
        lines += ["## memory (largest square image at batch 1, inference)", "",
                  "| model | dtype | peer | largest size | tokens | first OOM size | note |", "|---|---|---|---|---|---|---|"]
        for m in result["memory"]:
            lines.append(f"| {m['model']} | {m['dtype']} | {m['peer']} | {m.get('max_size') or ''} | "
                         f"{m.get('tokens') or ''} | {m.get('first_oom') or ''} | {m.get('status')}: {m.get('message', '')} |")
        lines.append("")
    if result.get("targets"):
        lines += ["## targets", ""] + [_fmt_target(t) for t in result["targets"]] + [""]
    if result.get("skipped"):
        lines += ["## skipped peers", ""] + [f"- {p}: {why}" for p, why in result["skipped"].items()] + [""]
    if result.get("notes"):
        lines += ["## notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


def _full_depth(model: str) -> Optional[int]:
    from .variants import VARIANTS

    cfg = VARIANTS.get(model)
    return cfg.depth if cfg else None


def write_plot(result: dict, path: Path) -> Optional[str]:
    """A bar chart of throughput per case and peer (only when matplotlib is importable)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return f"no plot: matplotlib is not importable ({type(exc).__name__})"
    rows = [r for r in result["rows"] if r.get("status") == "ok" and "time_s" in r]
    if not rows:
        return "no plot: no measured rows"
    cases = sorted({(r["mode"], r["model"], r["res"], r["batch"], r["dtype"]) for r in rows})
    peers = [p for p in PEERS if any(r["peer"] == p for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases)), 4))
    width = 0.8 / max(len(peers), 1)
    for j, p in enumerate(peers):
        vals = []
        for c in cases:
            r = next((r for r in rows if (r["mode"], r["model"], r["res"], r["batch"], r["dtype"]) == c
                      and r["peer"] == p), None)
            vals.append(r["imgs_per_s"] if r else 0)
        ax.bar([i + j * width for i in range(len(cases))], vals, width, label=p)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels([f"{c[1].replace('dinov3_', '')}\n{c[2]} b{c[3]} {c[4]}\n{c[0]}" for c in cases], fontsize=7)
    ax.set_ylabel("images / s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# -- command line -----------------------------------------------------------------------------------------
def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="flashdino end-to-end benchmark (throughput, latency, "
                                "training, memory) against HF transformers, torch.compile and timm.")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1 ...")
    p.add_argument("--models", type=_csv, default=None,
                   help="comma-separated variants or short names (vits16, vitb16, vitl16, vith16plus, vit7b16, "
                        "vitl14 = dinov2_vitl14; default: those six on a GPU, vits16 on a CPU)")
    p.add_argument("--res", type=lambda s: [int(v) for v in _csv(s)], default=None,
                   help="image sizes (default 224,512; DINOv2 uses the nearest multiple of 14, 512 -> 518)")
    p.add_argument("--dtypes", type=_csv, default=None,
                   help="bf16 (bf16 weights), fp32, amp (fp32 weights under bf16 autocast); default bf16 on a GPU, "
                        "fp32,bf16 on a CPU")
    p.add_argument("--modes", type=_csv, default=None,
                   help="inference (large batch), latency (batch 1), training (forward + backward), memory "
                        "(largest image, GPU only); default inference,latency,training")
    p.add_argument("--peers", type=_csv, default=None,
                   help=f"subset of {','.join(PEERS)} (default: all on a GPU; flashdino,hf on a CPU)")
    p.add_argument("--batch", type=int, default=None, help="inference batch (default: per model, 8 on a CPU)")
    p.add_argument("--train-batch", type=int, default=None, help="training batch (default: per model, 2 on a CPU)")
    p.add_argument("--latency-batch", type=int, default=1)
    p.add_argument("--depth", type=int, default=None, help="override the depth of every model (smoke tests)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls after the checked first call "
                   "(default 5 on a GPU, 1 on a CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 30 on a GPU, 3 on a CPU)")
    p.add_argument("--rotate", type=int, default=None, help="distinct input tensors cycled through (default 4; 2 on a CPU)")
    p.add_argument("--gemm-size", type=int, default=None, help="GEMM size for the rate measurement "
                   "(default 8192 on a GPU; 1024 fp32 / 512 bf16 on a CPU)")
    p.add_argument("--max-size", type=int, default=8192, help="memory mode: largest image side tried")
    p.add_argument("--max-try-s", type=float, default=60.0, help="memory mode: stop growing after a try this long")
    p.add_argument("--no-interleave", action="store_true", help="CPU: time peers one after the other")
    p.add_argument("--targets", action="store_true",
                   help="run only the cases the performance targets are defined on (for this device type), "
                        "with the peers they compare against")
    p.add_argument("--ci", action="store_true",
                   help="the CI-sized CPU table: --device cpu --models vits16 --res 224 --batch 8 --dtypes fp32,bf16 "
                        "--modes inference --peers flashdino,hf --repeats 3")
    p.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results of the checkout, "
                   "else ./flashdino_bench_results)")
    p.add_argument("--name", default=None, help="file stem (default e2e_<device>)")
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--strict", action="store_true", help="raise on errors instead of recording them")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--render", default=None, metavar="RESULT.json",
                   help="only re-render the markdown (and plot) of an earlier result file next to it")
    return p


def _default_out_dir() -> Path:
    repo = Path(__file__).resolve().parents[2]
    if (repo / "benchmarks").is_dir() and (repo / "python" / "flashdino").is_dir():
        return repo / "benchmarks" / "results"
    return Path.cwd() / "flashdino_bench_results"


def _resolve_models(names: Sequence[str]) -> list[str]:
    from .variants import resolve_name

    return [resolve_name(MODEL_ALIASES.get(n.lower(), n)) for n in names]


def _needed_rates(dtypes: Sequence[str]) -> set:
    return {"fp32" if d == "fp32" else "bf16" for d in dtypes} | {"bf16"}


def _peer_available(peer: str) -> Optional[str]:
    import importlib.util

    if peer in ("hf", "hf-compile"):
        try:
            import transformers  # noqa: F401
        except Exception as exc:
            return f"transformers is not installed ({type(exc).__name__}: {exc})"
    if peer == "timm":
        try:
            import timm  # noqa: F401
        except Exception as exc:
            return f"timm is not installed ({type(exc).__name__}: {exc})"
    if peer == "hf-compile" and importlib.util.find_spec("torch._dynamo") is None:
        return "torch.compile is unavailable"
    return None


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


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> dict:
    """Runs the benchmark; returns the result dictionary (also written as JSON + markdown)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or "python -m flashdino.bench"
    args = build_parser(prog).parse_args(argv)
    log = (lambda *_: None) if args.quiet else (lambda s: print(s, flush=True))
    if args.render:
        path = Path(args.render)
        result = json.loads(path.read_text())
        path.with_suffix(".md").write_text(render_markdown(result) + "\n")
        if not args.no_plot:
            why = write_plot(result, path.with_suffix(".png"))
            if why:
                log(why)
        log(f"wrote {path.with_suffix('.md')}")
        return result

    if args.ci:
        args.device = "cpu" if args.device == "auto" else args.device
        args.models = args.models or ["dinov3_vits16"]
        args.res = args.res or [224]
        args.batch = args.batch or 8
        args.dtypes = args.dtypes or ["fp32", "bf16"]
        args.modes = args.modes or ["inference"]
        args.peers = args.peers or ["flashdino", "hf"]
        args.repeats = args.repeats or 3
        args.warmup = 0 if args.warmup is None else args.warmup  # the checked first call warms up
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("flashdino bench: --device cuda but CUDA is not available")
    gpu = device.type == "cuda"
    if gpu and device.index is not None:
        torch.cuda.set_device(device)
    if args.models:
        models = _resolve_models(args.models)
    elif args.modes == ["memory"]:
        models = ["dinov3_vitl16"]  # the memory question is asked of ViT-L/16
    else:
        models = list(GPU_DEFAULT_MODELS if gpu else CPU_DEFAULT_MODELS)
    resolutions = args.res or [224, 512]
    dtypes = args.dtypes or (["bf16"] if gpu else ["fp32", "bf16"])
    modes = args.modes or ["inference", "latency", "training"]
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"flashdino bench: unknown dtype {d!r} (use {', '.join(DTYPES)})")
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"flashdino bench: unknown mode {m!r} (use {', '.join(MODES)})")
    explicit_peers = args.peers is not None
    peers = args.peers or (list(PEERS) if gpu else ["flashdino", "hf"])
    for p in peers:
        if p not in PEERS:
            raise SystemExit(f"flashdino bench: unknown peer {p!r} (use {', '.join(PEERS)})")
    peers = [p for p in PEERS if p in peers]  # reference path first, then the others
    args.warmup = 5 if args.warmup is None and gpu else (1 if args.warmup is None else args.warmup)
    args.repeats = args.repeats or (30 if gpu else 3)
    args.rotate = max(1, args.rotate or (4 if gpu else 2))

    runner = Runner(args, device, log)
    env = environment(device)
    skipped: dict[str, str] = {}
    for p in list(peers):
        why = _peer_available(p)
        if why:
            skipped[p] = why
            log(f"skipping peer {p}: {why}")
            peers.remove(p)
    if not gpu and "flashdino-graphs" in peers:
        skipped["flashdino-graphs"] = "CUDA graphs need a CUDA device"
        log("skipping peer flashdino-graphs: CUDA graphs need a CUDA device")
        peers.remove("flashdino-graphs")
    if not gpu and "flashdino-torch" in peers and not explicit_peers:
        peers.remove("flashdino-torch")
    if "memory" in modes and not gpu:
        runner.notes.append("memory mode skipped: it needs a GPU")
        log("memory mode skipped: it needs a GPU (largest image search catches CUDA out-of-memory errors)")
    runner.needed_rates = _needed_rates(dtypes)
    runner.measure_rates("start")

    overrides = {"depth": args.depth} if args.depth is not None else {}
    from .variants import get_config

    plan = build_plan(device, models, dtypes, resolutions, modes, peers, targets_only=args.targets,
                      models_given=bool(args.models))

    t_start = time.perf_counter()
    for (model_name, dtype), cases in plan.items():
        if not cases and not ("memory" in modes and gpu and not args.targets):
            continue
        cfg = get_config(model_name, **overrides)
        group_peers = [p for p in PEERS if any(p in c[3] for c in cases) or ("memory" in modes and p in peers)]
        log(f"== {model_name} (depth {cfg.depth}) {dtype}: building models for {', '.join(group_peers)}")
        group = ModelGroup(cfg, dtype, device, group_peers, log)
        try:
            group.build()
        except Exception as exc:
            if args.strict:
                raise
            msg = f"building the models failed: {_short(exc)}"
            log(msg)
            for res, mode, batch, case_peers in cases:
                case = Case(model_name, cfg, res, batch or _default_batch(model_name, res, mode, device, args),
                            dtype, mode)
                for peer in case_peers:
                    runner.rows.append(runner._row(case, peer, _res_for(cfg, res),
                                                   status="oom" if _is_oom(exc) else "error", message=msg))
            group.free()
            continue
        for peer, why in group.unavailable.items():
            skipped.setdefault(peer, why)
        for note in group.notes + [f"{model_name} {dtype}: weights from {group.weights_source}"]:
            if note not in runner.notes:
                runner.notes.append(note)
        for res, mode, batch, case_peers in cases:
            case = Case(model_name, cfg, res, batch or _default_batch(model_name, res, mode, device, args),
                        dtype, mode)
            runner.run_case(group, case, case_peers)
        if "memory" in modes and gpu and not args.targets:
            runner.run_memory(group, model_name, group_peers)
        group.free()
    runner.measure_rates("end")
    # MFU against the best GEMM rate of the whole run (the progress lines used the start rate).
    for r in runner.rows:
        if "time_s" in r:
            rate = runner.gemm_rate(r["dtype"])
            r["gemm_flops_per_s"] = rate
            r["mfu"] = r["flops"] / r["time_s"] / rate if rate else None
    add_speedups(runner.rows)

    env["loadavg_end"] = _loadavg()
    env["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    full_depth = args.depth is None
    targets = evaluate_targets(runner.rows, device, env.get("gpu"), full_depth)
    result = dict(command=shlex.join(prog.split() + argv), environment=env, rates=runner.rates, rows=runner.rows,
                  memory=runner.memory_rows, targets=targets, skipped=skipped, notes=runner.notes,
                  settings=dict(models=models, res=resolutions, dtypes=dtypes, modes=modes, peers=peers,
                                warmup=args.warmup, repeats=args.repeats, rotate=args.rotate, depth=args.depth,
                                interleaved=not gpu and not args.no_interleave))
    loads = [v for v in (env.get("loadavg_start"), env.get("loadavg_end")) if v]
    ncpu = os.cpu_count() or 1
    if not gpu and loads and max(l[0] for l in loads) > 0.75 * ncpu:
        result["load_warning"] = (f"the machine was loaded by other processes (1-min load average up to "
                                  f"{max(l[0] for l in loads):.1f} on {ncpu} CPUs): absolute CPU times are noisy; "
                                  "peers were interleaved call by call so their ratios are comparable")
    if targets:
        log("targets:")
        for t in targets:
            log("  " + _fmt_target(t))
    md = render_markdown(result)
    if not args.no_save:
        out_dir = Path(args.out_dir) if args.out_dir else _default_out_dir()
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = args.name or f"e2e_{device_tag(device)}"
        (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        (out_dir / f"{stem}.md").write_text(md + "\n")
        result["files"] = [str(out_dir / f"{stem}.json"), str(out_dir / f"{stem}.md")]
        if not args.no_plot:
            why = write_plot(result, out_dir / f"{stem}.png")
            if why is None:
                result["files"].append(str(out_dir / f"{stem}.png"))
            else:
                log(why)
        log("wrote " + ", ".join(result["files"]))
    else:
        log(md)
    return result


if __name__ == "__main__":  # pragma: no cover
    main()
