"""ONNX export of the DINOv2 / DINOv3 backbones (and the VGGT aggregator) with dynamic shapes.

The graph comes from the ``torch.onnx`` dynamo exporter (``torch.export`` + onnxscript); the
TorchScript exporter cannot trace the models (Python integer arithmetic on sizes). Batch, height
and width stay symbolic, so everything that depends on the image size is computed inside the
graph from H and W:

- DINOv3: the RoPE coordinates and angles (``torch.arange`` over the patch grid); a bottom/right
  remainder that is not a multiple of the patch is dropped by the strided conv, as in PyTorch.
- DINOv2: the bicubic resize of the learned position table (scale (H + 0.1) / 37 for the
  plain models, antialiased resize to (H, W) for the register models, no resize for the native
  grid), as two interpolation matrices built from H and W (:func:`pos_embed_in_graph`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..outputs import atomic_write, check_output_path
from ._extras import require

INPUT_NAME = "pixel_values"
ONNX_2GB = 2 * 1024**3
DEFAULT_OPSET = 18  # the dynamo exporter's well-tested opset; ONNX Runtime and OpenVINO both run it
# The exporter has no implementations below 18 and its down-conversion fails on these graphs
# (LayerNormalization has no earlier version; Split's attributes differ before 18).
MIN_OPSET = 18
# A static export traces a real example of the fixed shape: sizes that cannot be allocated or run
# are refused up front, with the limit named, instead of failing inside the tracer.
MAX_STATIC_SIDE = 8192
MAX_STATIC_BATCH = 1024
_LAYER = re.compile(r"^layer_(\d+)$")
_LAYER_PREFIX = re.compile(r"^layer_(\d+)_prefix$")  # block i's normalised [CLS, storage tokens]

PathLike = Union[str, os.PathLike]


class ExportError(RuntimeError):
    """The model cannot be exported as asked; the message says why and what to change."""


# -- the DINOv2 position table, resized inside the graph ----------------------------------------------

def _size_tensor(n) -> Tensor:
    """A size as a float64 tensor computed in the graph (a Python float of a symbolic size would be
    frozen to the traced value by torch.export)."""
    return torch.ones(n, dtype=torch.float64).sum()


def _cubic_weights(n_out, n_in: int, offset: float, native: Tensor) -> Tensor:
    """[n_out, n_in] matrix of PyTorch's bicubic (a = -0.75, half-pixel, clamped borders) with
    ``scale_factor = (n_out + offset) / n_in``; the identity where ``native`` (scale 1)."""
    scale = (n_in / (_size_tensor(n_out) + offset)).float()  # 1 / scale_factor, rounded like ATen's
    scale = torch.where(native, torch.ones_like(scale), scale)
    dst = torch.arange(n_out, dtype=torch.float32)
    real = scale * (dst + 0.5) - 0.5
    base = torch.floor(real)
    t = real - base
    A = -0.75

    def near(x):  # |x| <= 1
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

    coeffs = (far(t + 1), near(t), near(1 - t), far(2 - t))
    cols = torch.arange(n_in, dtype=torch.float32)
    out = torch.zeros_like(real[:, None] * cols[None, :])
    for k, c in enumerate(coeffs):
        idx = torch.clamp(base + (k - 1), 0, n_in - 1)
        out = out + (cols[None, :] == idx[:, None]).to(torch.float32) * c[:, None]
    return out


def _antialiased_cubic_weights(n_out, n_in: int) -> Tensor:
    """[n_out, n_in] matrix of PyTorch's antialiased bicubic (PIL's filter, a = -0.5): the support
    widens with the downscale factor, taps outside the image are dropped, rows are renormalised."""
    scale = (n_in / _size_tensor(n_out)).float()
    one = torch.ones_like(scale)
    down = scale >= 1
    support = torch.where(down, 2.0 * scale, 2.0 * one)
    invscale = torch.where(down, 1.0 / scale, one)
    center = scale * (torch.arange(n_out, dtype=torch.float32) + 0.5)
    xmin = torch.clamp(torch.floor(center - support + 0.5), min=0)
    xmax = torch.clamp(torch.floor(center + support + 0.5), max=n_in)
    cols = torch.arange(n_in, dtype=torch.float32)
    x = ((cols[None, :] - center[:, None] + 0.5) * invscale).abs()
    a = -0.5
    w = torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    torch.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, torch.zeros_like(x)))
    w = w * ((cols[None, :] >= xmin[:, None]) & (cols[None, :] < xmax[:, None])).to(torch.float32)
    return w / w.sum(dim=1, keepdim=True)


def pos_embed_in_graph(pos_embed: Tensor, H, W, offset: float, antialias: bool) -> Tensor:
    """``interpolate_pos_embed`` written as two interpolation matrices built from H and W.

    ONNX ``Resize`` cannot carry it: OpenVINO ignores its ``antialias`` attribute (measured: 2.0
    absolute error on a 37 -> 16 downscale), and the exporter freezes a Python scale factor. The
    matrices reproduce ATen's weights, so the table equals the reference to float rounding
    (checked against ``F.interpolate`` in tests/test_export.py), on every runtime.
    """
    n_grid = pos_embed.shape[1] - 1
    M = math.isqrt(n_grid)
    D = pos_embed.shape[-1]
    pos = pos_embed.float()
    grid = pos[0, 1:].reshape(M, M, D)
    if antialias:
        rows, cols = _antialiased_cubic_weights(H, M), _antialiased_cubic_weights(W, M)
    else:
        native = (_size_tensor(H) == M) & (_size_tensor(W) == M)
        rows, cols = _cubic_weights(H, M, offset, native), _cubic_weights(W, M, offset, native)
    table = torch.einsum("wj,hjd->hwd", cols, torch.einsum("hi,ijd->hjd", rows, grid))
    return torch.cat([pos[:, :1], table.reshape(1, -1, D)], dim=1).to(pos_embed.dtype)


# -- the exported graph -----------------------------------------------------------------------------

def default_outputs(model) -> list[str]:
    names = ["x_norm_clstoken"]
    if model.n_storage_tokens:
        names.append(model.extra_tokens_key)
    names.append("x_norm_patchtokens")
    return names


def resolve_outputs(model, outputs: Optional[Sequence[Union[str, int]]]) -> list[str]:
    """Output names of the graph: forward_features keys and ``layer_<i>`` (int i allowed)."""
    if outputs is None:
        return default_outputs(model)
    keys = ["x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"] + ([model.extra_tokens_key] if model.n_storage_tokens else [])
    names = []
    for item in outputs:
        name = f"layer_{item}" if isinstance(item, int) else str(item)
        m = _LAYER.match(name) or _LAYER_PREFIX.match(name)
        if m:
            i = int(m.group(1))
            if not 0 <= i < model.n_blocks:
                raise ValueError(f"export_onnx: output {name!r}: the model has blocks 0..{model.n_blocks - 1}")
        elif name not in keys:
            raise ValueError(f"export_onnx: unknown output {name!r}; choose from {keys}, 'layer_<i>' "
                             f"(0 <= i < {model.n_blocks}, get_intermediate_layers patches, normalised) or "
                             "'layer_<i>_prefix' (its class and storage tokens, normalised)")
        if name in names:
            raise ValueError(f"export_onnx: output {name!r} requested twice")
        names.append(name)
    if not names:
        raise ValueError("export_onnx: outputs is empty; pass None for the default outputs")
    return names


class ExportGraph(nn.Module):
    """``pixel_values -> tuple of outputs`` in the order of ``names``; one pass over the blocks.

    ``layer_<i>`` is block i's output after the final norm, patch tokens only ([B, HW, D]): the
    default of ``get_intermediate_layers``; ``layer_<i>_prefix`` its normalised class and storage
    tokens ([B, 1 + R, D]), what ``return_class_token`` / ``return_extra_tokens`` add.
    """

    def __init__(self, model, names: Sequence[str]):
        super().__init__()
        self.model = model
        self.names = list(names)
        self.layers = sorted({int(m.group(1)) for m in map(self._layer_match, names) if m})

    @staticmethod
    def _layer_match(name: str):
        return _LAYER.match(name) or _LAYER_PREFIX.match(name)

    def forward(self, x: Tensor):
        m = self.model
        tokens, rope, _ = m.prepare_tokens_with_masks(x)
        tokens, kept = m._run_blocks(tokens, rope, keep=self.layers)
        out = {}
        for i, t in zip(self.layers, kept):
            out[f"layer_{i}_prefix"], out[f"layer_{i}"] = m._final_norm(t)
        prefix, patches = m._final_norm(tokens)
        out["x_norm_clstoken"] = prefix[:, 0]
        out[m.extra_tokens_key] = prefix[:, 1:]
        out["x_norm_patchtokens"] = patches
        out["x_prenorm"] = tokens
        return tuple(out[n] for n in self.names)


class _ExportMode:
    """Traceable choices on the model for the duration of an export, undone afterwards.

    The reference backend runs (the Triton / CUDA kernels are opaque to the exporter), and
    DINOv2's position table is resized by :func:`pos_embed_in_graph`.
    """

    def __init__(self, model):
        self.model = model
        self.saved_env = None

    def __enter__(self):
        self.saved_env = os.environ.get("FLASHDINO_BACKEND")
        os.environ["FLASHDINO_BACKEND"] = "torch"
        m = self.model
        if hasattr(m, "pos_embed"):
            cfg = m.cfg

            def interpolated(H, W, dtype, m=m):
                return pos_embed_in_graph(m.pos_embed, H, W, float(cfg.interpolate_offset),
                                          bool(cfg.interpolate_antialias)).to(dtype)

            m.interpolated_pos_embed = interpolated  # instance attribute shadows the method
        return self

    def __exit__(self, *exc):
        if self.saved_env is None:
            os.environ.pop("FLASHDINO_BACKEND", None)
        else:
            os.environ["FLASHDINO_BACKEND"] = self.saved_env
        self.model.__dict__.pop("interpolated_pos_embed", None)
        return False


def _parse_static(static, patch: int) -> Optional[tuple[int, int]]:
    if static is None:
        return None
    if isinstance(static, int):
        static = (static, static)
    h, w = (int(v) for v in static)
    if h < patch or w < patch:
        raise ValueError(f"export_onnx: static size {h}x{w} is smaller than one {patch}x{patch} patch")
    if h > MAX_STATIC_SIDE or w > MAX_STATIC_SIDE:
        raise ValueError(f"export_onnx: static size {h}x{w} is over the limit of {MAX_STATIC_SIDE} pixels a side; "
                         "choose a smaller size, or a dynamic export (any size at run time)")
    return h, w


def check_batch_size(batch_size, flag: str = "batch_size") -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_STATIC_BATCH:
        raise ValueError(f"export_onnx: {flag} must be an integer from 1 to {MAX_STATIC_BATCH}, got {batch_size!r}")
    return batch_size


def supported_opsets() -> range:
    """Opsets both the installed onnx package and torch's exporter know."""
    import onnx

    top = onnx.defs.onnx_opset_version()
    try:
        from torch.onnx import _constants  # private, hence the guard; 23 in torch 2.14

        top = min(top, int(_constants.ONNX_MAX_OPSET))
    except (ImportError, AttributeError, TypeError, ValueError):
        pass
    return range(MIN_OPSET, top + 1)


def check_opset(opset: Optional[int], flag: str = "opset") -> int:
    """The opset to export with; one the exporter cannot write is refused before any tracing."""
    if opset is None:
        return DEFAULT_OPSET
    ok = supported_opsets()
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in ok:
        raise ValueError(f"export_onnx: {flag} {opset!r} is not supported: the exporter writes opsets "
                         f"{ok.start} to {ok.stop - 1} (default {DEFAULT_OPSET}); runtimes that need an older opset "
                         "cannot run these graphs (LayerNormalization is opset 17+)")
    return opset


def _check_destination(path) -> None:
    if Path(path).expanduser().is_dir():
        raise ValueError(f"export_onnx: {path} is a folder; give a file name inside it, e.g. "
                         f"{Path(path) / 'model.onnx'}")


def metadata(model, names: Sequence[str], dynamic: bool, dtype: torch.dtype) -> dict[str, str]:
    import flashdino

    cfg = model.cfg
    return {
        "flashdino_version": flashdino.__version__,
        "variant": cfg.name,
        "family": cfg.family,
        "patch_size": str(cfg.patch_size),
        "embed_dim": str(cfg.embed_dim),
        "depth": str(cfg.depth),
        "n_storage_tokens": str(cfg.n_storage_tokens),
        "image_mean": json.dumps(list(cfg.image_mean)),
        "image_std": json.dumps(list(cfg.image_std)),
        "weights_source": str(getattr(model, "weights_source", None) or "random initialisation (no weights loaded)"),
        "input": f"{INPUT_NAME} [B, 3, H, W] {str(dtype).replace('torch.', '')}, normalised with image_mean/image_std",
        "outputs": json.dumps(list(names)),
        "dynamic_shapes": "batch, height, width" if dynamic else "none",
        "torch_version": torch.__version__,
    }


def export_onnx(model, path: PathLike, *, dynamic: bool = True, outputs: Optional[Sequence[Union[str, int]]] = None,
                opset: Optional[int] = None, static_size=None, batch_size: int = 1, fp16: bool = False,
                external_data: Optional[bool] = None, overwrite: bool = True, check: bool = True) -> Path:
    """Writes ``model`` as an ONNX file at ``path`` and returns the path.

    Input ``pixel_values`` [B, 3, H, W] float32 (float16 with ``fp16``), already normalised like
    the model's input. Outputs are named after the ``forward_features`` keys (default:
    ``x_norm_clstoken``, the extra tokens if the model has any, ``x_norm_patchtokens``);
    ``outputs`` chooses them, including ``"layer_<i>"`` (or the int i) for block i's normalised
    patch tokens. ``dynamic=True`` leaves batch, height and width free; otherwise the graph is
    fixed to ``batch_size`` x ``static_size`` (an int or (H, W); default the model's img_size).
    ``external_data`` stores the weights in ``<path>.data`` (default: only above 2 GB, ONNX's limit).
    A VGGT ``Aggregator`` goes to :func:`export_aggregator_onnx` (``outputs``: layer indices).
    """
    from ..models import Aggregator

    if isinstance(model, Aggregator):
        layers = None if outputs is None else [int(_LAYER.match(str(o)).group(1)) if _LAYER.match(str(o)) else int(o)
                                               for o in outputs]
        return export_aggregator_onnx(model, path, dynamic=dynamic, layers=layers, opset=opset,
                                      static_size=static_size, external_data=external_data, overwrite=overwrite,
                                      check=check)
    from ..models import DinoVisionTransformer

    if not isinstance(model, DinoVisionTransformer):
        raise TypeError(f"export_onnx: expected a flashdino backbone (flashdino.create_model(...)), got {type(model).__name__}")
    require("onnxscript", "export_onnx")
    require("onnx", "export_onnx")  # fails early, naming the extra, before any tracing
    opset = check_opset(opset)
    check_batch_size(batch_size)
    _check_destination(path)
    out = check_output_path(path, overwrite=overwrite, what="ONNX file")
    names = resolve_outputs(model, outputs)
    P = model.patch_size
    weight = model.patch_embed.proj.weight
    if weight.device.type != "cpu":
        raise ExportError(f"export_onnx: the model is on {weight.device}; export from CPU (model.cpu()) so the "
                          "graph holds the reference ops")
    if fp16 and weight.dtype != torch.float16:
        import copy

        model = copy.deepcopy(model).half()
        if model.cfg.family == "dinov3":
            warnings.warn("export_onnx(fp16=True): DINOv3 activations overflow float16 with the released weights; "
                          "prefer a float32 export and the runtime's bf16 option", stacklevel=2)
    dtype = model.patch_embed.proj.weight.dtype
    static = _parse_static(static_size, P)
    if static is None:
        side = model.cfg.img_size if not dynamic else 0
        # A dynamic export traces a size other than the native grid so that nothing specialises on it.
        static = (side, side) if side else (P * 6, P * 5)
    example = torch.randn(batch_size if not dynamic else 2, model.cfg.in_chans, *static, dtype=dtype)
    model._check_input(example)
    dynamic_shapes = None
    if dynamic:
        dims = (torch.export.Dim("batch", min=1), torch.export.Dim("height", min=P), torch.export.Dim("width", min=P))
        dynamic_shapes = {"x": {0: dims[0], 2: dims[1], 3: dims[2]}}
    graph = ExportGraph(model, names).eval()
    was_training = model.training
    model.eval()
    try:
        with _ExportMode(model), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_compiling.*")
            program = torch.onnx.export(
                graph, (example,), None, dynamo=True, input_names=[INPUT_NAME], output_names=names,
                dynamic_shapes=dynamic_shapes, opset_version=opset,
                verbose=False)
    except Exception as exc:
        raise ExportError(f"export_onnx: torch.onnx (dynamo) could not export {model.cfg.name}: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    finally:
        model.train(was_training)
    return _finish(program, model, metadata(model, names, dynamic, dtype), out, external_data, check, opset)


def _finish(program, model, props: dict, out: Path, external_data: Optional[bool], check: bool, opset: int) -> Path:
    """Metadata into the graph, the file written (with external weights above ~2 GB), checked."""
    import onnx

    written = program.model.opset_imports.get("", None)
    if written != opset:  # the exporter falls back silently (with a logged traceback) when it cannot convert
        raise ExportError(f"export_onnx: asked for opset {opset} but the exporter produced opset {written}; "
                          f"use --opset {DEFAULT_OPSET} (the default)")
    for key, value in props.items():
        program.model.metadata_props[key] = value
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        _save(program.model, out, external_data if external_data is not None else size > ONNX_2GB * 0.9)
    except OSError as exc:  # disk full, a name too long for the filesystem, permissions changed meanwhile
        raise ExportError(f"cannot write {out}: {exc.strerror or exc}; free space there, or choose another (shorter) "
                          "output path") from exc
    if check:
        onnx.checker.check_model(str(out), full_check=False)
    return out


def _save(ir_model, out: Path, external: bool) -> None:
    import onnx_ir as ir

    if not external:
        with atomic_write(out) as tmp:
            ir.save(ir_model, tmp)
        return
    # Weights in "<name>.data" next to the graph; the graph names that file, so both are written
    # under their final names in a private folder and moved into place, data first.
    data_name = out.name + ".data"
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        ir.save(ir_model, staging / out.name, external_data=data_name)
        os.replace(staging / data_name, out.parent / data_name)
        os.replace(staging / out.name, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_metadata(path: PathLike) -> dict[str, str]:
    onnx = require("onnx", "read_metadata")
    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}


class AggregatorGraph(nn.Module):
    """``images [B, S, 3, H, W] -> (layer_<i> [B, S, P_tok, 2C], ...)`` for the kept layers."""

    def __init__(self, aggregator, layers: Sequence[int]):
        super().__init__()
        self.aggregator = aggregator
        self.layers = list(layers)

    def forward(self, images: Tensor):
        out, _ = self.aggregator(images, intermediate_layer_idx=self.layers)
        return tuple(out[i] for i in self.layers)


def export_aggregator_onnx(model, path: PathLike, *, dynamic: bool = True, layers: Optional[Sequence[int]] = None,
                           opset: Optional[int] = None, static_size=None, frames: int = 2,
                           external_data: Optional[bool] = None, overwrite: bool = True, check: bool = True) -> Path:
    """The VGGT ``Aggregator`` as ONNX: input ``images`` [B, S, 3, H, W] in [0, 1] (the aggregator
    normalises them), outputs ``layer_<i>`` [B, S, 5 + H/P * W/P, 2C] for the layers kept
    (``layers``, default the model's ``intermediate_layer_idx``, else every layer). With ``dynamic``
    batch, frames, height and width are free (frame 0 gets its own camera / register tokens, as in
    VGGT); the patch tokens start at index ``patch_start_idx`` (metadata)."""
    import flashdino

    require("onnxscript", "export_onnx")
    require("onnx", "export_onnx")  # fails early, naming the extra, before any tracing
    opset = check_opset(opset)
    check_batch_size(frames, "frames")
    _check_destination(path)
    out = check_output_path(path, overwrite=overwrite, what="ONNX file")
    P = model.patch_size
    if layers is None:
        layers = model.intermediate_layer_idx if model.intermediate_layer_idx is not None else range(model.depth)
    layers = model._normalise_layers(list(layers))
    names = [f"layer_{i}" for i in layers]
    h, w = _parse_static(static_size, P) or ((model.img_size // P) * P, (model.img_size // P) * P)
    if dynamic and static_size is None:
        h, w = P * 5, P * 6  # a small trace size that is not the native grid
    example = torch.rand(1, frames, 3, h, w)
    dynamic_shapes = None
    if dynamic:
        dynamic_shapes = {"images": {0: torch.export.Dim("batch", min=1), 1: torch.export.Dim("frames", min=1),
                                     3: torch.export.Dim("height", min=P), 4: torch.export.Dim("width", min=P)}}
    vit = model.patch_embed if isinstance(model.patch_embed, nn.Module) and hasattr(model.patch_embed, "cfg") else model
    rope_cache = getattr(model.rope, "_grids", None)
    saved = dict(rope_cache) if rope_cache is not None else None
    was_training = model.training
    model.eval()
    try:
        with _ExportMode(vit), torch.no_grad(), warnings.catch_warnings():
            # the RoPE grid cache is written while tracing; it is restored below
            warnings.filterwarnings("ignore", message=".*side effects happened.*")
            program = torch.onnx.export(AggregatorGraph(model, layers).eval(), (example,), None, dynamo=True,
                                        input_names=["images"], output_names=names, dynamic_shapes=dynamic_shapes,
                                        opset_version=opset, verbose=False)
    except Exception as exc:
        raise ExportError(f"export_onnx: torch.onnx (dynamo) could not export the Aggregator: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    finally:
        model.train(was_training)
        if saved is not None:  # tracing may have cached a grid of symbolic sizes
            rope_cache.clear()
            rope_cache.update(saved)
    props = {
        "flashdino_version": flashdino.__version__,
        "model": "vggt_aggregator",
        "patch_embed": str(model.patch_embed_name),
        "patch_size": str(P),
        "embed_dim": str(model.embed_dim),
        "depth": str(model.depth),
        "patch_start_idx": str(model.patch_start_idx),
        "image_mean": json.dumps([0.485, 0.456, 0.406]),
        "image_std": json.dumps([0.229, 0.224, 0.225]),
        "weights_source": str(getattr(model, "weights_source", None) or "random initialisation (no weights loaded)"),
        "input": "images [B, S, 3, H, W] float32 in [0, 1] (normalised inside the graph)",
        "outputs": json.dumps(names),
        "dynamic_shapes": "batch, frames, height, width" if dynamic else "none",
        "torch_version": torch.__version__,
    }
    return _finish(program, model, props, out, external_data, check, opset)


__all__ = ["export_onnx", "export_aggregator_onnx", "read_metadata", "resolve_outputs", "default_outputs", "ExportGraph", "ExportError",
           "INPUT_NAME", "check_opset", "check_batch_size", "supported_opsets", "MAX_STATIC_SIDE", "MAX_STATIC_BATCH"]
