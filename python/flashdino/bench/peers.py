"""The peers flashdino is measured against, all holding the same weights.

``flashdino`` (default dispatch: the fast kernels on CUDA), ``flashdino-torch`` (every op forced
to the pure-PyTorch reference path), ``flashdino-graphs`` (flashdino replayed from a CUDA graph),
``hf`` (transformers ``DINOv3ViTModel`` / ``Dinov2Model`` eager with ``attn_implementation="sdpa"``),
``hf-compile`` (``torch.compile`` of that model) and ``timm`` (eager). The HF model is initialised
and its state dict goes through flashdino's loader; timm gets flashdino's weights renamed to its
layout. HF and timm recompute fp32 RoPE periods while flashdino uses the official bf16-rounded
ones, so a small DINOv3 difference in the output tokens is expected.
"""

from __future__ import annotations

import contextlib
import gc
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cuda_graphs import CudaGraphRunner
from ..loading import load_weights
from ..models import build_model
from .backends import forced_backend
from .timing import short_error

__all__ = ["PEERS", "FLASHDINO_PEERS", "PEER_BACKEND", "DTYPES", "TIMM_NAMES", "Skip", "Case", "ModelGroup",
           "compare_tokens", "fd_to_timm", "fd_tokens", "res_for", "peer_available"]

PEERS = ("flashdino", "flashdino-torch", "flashdino-graphs", "hf", "hf-compile", "timm")
FLASHDINO_PEERS = ("flashdino", "flashdino-torch", "flashdino-graphs")
# The backend each flashdino peer forces (None: the default dispatch).
PEER_BACKEND = {"flashdino": None, "flashdino-torch": "torch", "flashdino-graphs": None}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "amp": torch.float32}  # amp: fp32 weights, bf16 autocast

TIMM_NAMES = {
    "dinov3_vits16": "vit_small_patch16_dinov3_qkvb", "dinov3_vits16plus": "vit_small_plus_patch16_dinov3_qkvb",
    "dinov3_vitb16": "vit_base_patch16_dinov3_qkvb", "dinov3_vitl16": "vit_large_patch16_dinov3_qkvb",
    "dinov3_vith16plus": "vit_huge_plus_patch16_dinov3_qkvb", "dinov3_vit7b16": "vit_7b_patch16_dinov3",
    "dinov2_vits14": "vit_small_patch14_dinov2", "dinov2_vitb14": "vit_base_patch14_dinov2",
    "dinov2_vitl14": "vit_large_patch14_dinov2", "dinov2_vitg14": "vit_giant_patch14_dinov2",
    "dinov2_vits14_reg": "vit_small_patch14_reg4_dinov2", "dinov2_vitb14_reg": "vit_base_patch14_reg4_dinov2",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2", "dinov2_vitg14_reg": "vit_giant_patch14_reg4_dinov2",
}


class Skip(Exception):
    """A peer or case that cannot run here (not installed, no CUDA, unsupported model...)."""


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


def _hf_model(cfg) -> tuple[type, Any]:
    """(model class, config) of the transformers model with ``cfg``'s architecture."""
    import transformers

    if cfg.family == "dinov3":
        gated = cfg.ffn != "mlp"
        return transformers.DINOv3ViTModel, transformers.DINOv3ViTConfig(
            hidden_size=cfg.embed_dim, intermediate_size=cfg.ffn_hidden, num_hidden_layers=cfg.depth,
            num_attention_heads=cfg.num_heads, hidden_act="silu" if gated else "gelu", use_gated_mlp=gated,
            layer_norm_eps=cfg.layer_norm_eps, rope_theta=cfg.rope_base, query_bias=cfg.qkv_bias, key_bias=False,
            value_bias=cfg.qkv_bias, proj_bias=cfg.proj_bias, mlp_bias=cfg.ffn_bias,
            num_register_tokens=cfg.n_storage_tokens, patch_size=cfg.patch_size, image_size=224,
            attn_implementation="sdpa")
    if cfg.ffn != "mlp":
        raise Skip(f"{cfg.name}: the HF peer covers DINOv2 models with an MLP FFN only")
    kwargs = dict(hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                  mlp_ratio=int(cfg.ffn_ratio) if float(cfg.ffn_ratio).is_integer() else cfg.ffn_ratio,
                  image_size=cfg.img_size, patch_size=cfg.patch_size, layer_norm_eps=cfg.layer_norm_eps,
                  layerscale_value=1.0, qkv_bias=cfg.qkv_bias, attn_implementation="sdpa")
    name = "Dinov2WithRegisters" if cfg.n_storage_tokens else "Dinov2"
    if cfg.n_storage_tokens:
        kwargs["num_register_tokens"] = cfg.n_storage_tokens
    return getattr(transformers, f"{name}Model"), getattr(transformers, f"{name}Config")(**kwargs)


def fd_to_timm(sd: dict, cfg) -> tuple[dict, list]:
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


def fd_tokens(out: dict) -> Tensor:
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
                cls, hf_cfg = _hf_model(cfg)
                with torch.device(dev):
                    hf = cls(hf_cfg)
                self.hf = hf.to(dtype=self.weight_dtype).eval()
                impl = getattr(hf.config, "_attn_implementation", None)
                self.notes.append(f"HF {cls.__name__} attention implementation: {impl}")
            except (AttributeError, Skip) as exc:  # an older transformers without this model class
                self.unavailable["hf"] = self.unavailable["hf-compile"] = str(exc)
        with torch.device(dev):
            fd = build_model(cfg)
        fd = fd.to(dtype=self.weight_dtype)
        if self.hf is not None:
            # The HF model's random weights, through flashdino's loader (HF layout -> canonical).
            report = load_weights(fd, self.hf.state_dict(), strict=True)
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
        sd, notes = fd_to_timm(self.fd.state_dict(), self.cfg)
        try:
            missing, unexpected = model.load_state_dict(sd, strict=False)
        except RuntimeError as exc:  # shape mismatches
            self.unavailable["timm"] = f"flashdino -> timm {name} weights do not fit: {short_error(exc)}"
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
        size = res_for(self.cfg, case.res)
        if peer == "timm" and size % self.cfg.patch_size:
            return f"timm needs an image size that is a multiple of the patch size {self.cfg.patch_size}"
        return None

    def call(self, peer: str, case: Case) -> tuple[Callable, Callable]:
        """(fn(x) -> output, tokens(output) -> [B, N, D]) for one peer and case."""
        ac = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if self.autocast \
            else contextlib.nullcontext
        backend = PEER_BACKEND.get(peer)
        if peer in ("flashdino", "flashdino-torch"):
            model = self.fd
            fwd, tokens, loss = model.forward_features, fd_tokens, _fd_loss
        elif peer == "flashdino-graphs":
            key = (case.res, case.batch, case.dtype)
            if key not in self.graph_runners:
                self.graph_runners.clear()
                self.graph_runners[key] = CudaGraphRunner(self.fd, method="forward_features", clone_outputs=False,
                                                          warmup_iters=3)
            model = self.fd
            fwd, tokens, loss = self.graph_runners[key], fd_tokens, _fd_loss
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
                with forced_backend(backend), ac():
                    out = fwd(x)
                    value = loss(out)
                value.backward()
                model.zero_grad(set_to_none=True)
                return value

            return step, None

        def infer(x):
            with forced_backend(backend), ac():
                return fwd(x)

        return infer, tokens

    def train_mode(self, peer: str, training: bool) -> None:
        model = self.model_of(peer)
        if model is not None:
            model.train(training)


def res_for(cfg, res: int) -> int:
    """The image size used for ``res`` (DINOv2: the nearest multiple of 14, e.g. 512 -> 518)."""
    P = cfg.patch_size
    return max(P, int(round(res / P)) * P) if cfg.family == "dinov2" else res


def peer_available(peer: str) -> Optional[str]:
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
