"""ONNX export of the DINOv2 / DINOv3 backbones (and the VGGT aggregator) with dynamic shapes.

The graph comes from the ``torch.onnx`` dynamo exporter (``torch.export`` + onnxscript); the
TorchScript exporter cannot trace the models (Python integer arithmetic on sizes). Batch, height
and width stay symbolic, so everything that depends on the image size is computed inside the
graph from H and W:

- DINOv3: the RoPE coordinates and angles (``torch.arange`` over the patch grid); a bottom/right
  remainder that is not a multiple of the patch is dropped by the strided conv, as in PyTorch.
- DINOv2: the bicubic resize of the learned position table. ``torch.export`` turns the
  scale factor of the non-register models ((H + 0.1) / 37) into a constant of the example size,
  so the resize goes through a small custom op whose ONNX translation is a ``Resize`` with the
  scales computed from H and W, exactly the reference's coordinate mapping (half-pixel, cubic
  a = -0.75, borders clamped). The reference skips the resize for the native grid; the graph
  uses scale 1 there, which reproduces the table exactly.
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
DEFAULT_OPSET = 18  # Resize with antialias needs 18; ONNX Runtime and OpenVINO both run it.
_LAYER = re.compile(r"^layer_(\d+)$")

PathLike = Union[str, os.PathLike]


class ExportError(RuntimeError):
    """The model cannot be exported as asked; the message says why and what to change."""


# -- the DINOv2 position table as one traceable op ---------------------------------------------------

@torch.library.custom_op("flashdino_deploy::pos_embed", mutates_args=())
def _pos_embed_op(pos_embed: Tensor, height: int, width: int, offset: float, antialias: bool) -> Tensor:
    from ..models.vision_transformer import interpolate_pos_embed

    out = interpolate_pos_embed(pos_embed, height, width, offset, antialias)
    return out.clone() if out is pos_embed else out  # a custom op may not return its input


@_pos_embed_op.register_fake
def _(pos_embed, height, width, offset, antialias):
    return pos_embed.new_empty(1, 1 + height * width, pos_embed.shape[-1])


def _pos_embed_onnx(pos_embed, height, width, offset: float = 0.0, antialias: bool = False):
    """ONNX for ``interpolate_pos_embed``: Resize with scales or sizes computed from H and W."""
    from onnxscript import opset18 as op

    n_grid = pos_embed.shape[1] - 1
    M = int(math.isqrt(n_grid))
    D = pos_embed.shape[2]
    cls_pos = op.Slice(pos_embed, [0], [1], [1])
    grid = op.Transpose(op.Reshape(op.Slice(pos_embed, [1], [1 + M * M], [1]), [1, M, M, D]), perm=[0, 3, 1, 2])
    h64, w64 = op.Reshape(height, [1]), op.Reshape(width, [1])
    if offset:
        # scale_factor = (H + offset) / M, like F.interpolate(scale_factor=...); the reference skips
        # the resize for the native M x M grid, which scale 1 reproduces.
        native = op.And(op.Equal(h64, op.Constant(value_ints=[M])), op.Equal(w64, op.Constant(value_ints=[M])))
        one = op.Constant(value_floats=[1.0])

        def scale(n):
            s = op.Div(op.Add(op.Cast(n, to=1), op.Constant(value_floats=[float(offset)])),
                       op.Constant(value_floats=[float(M)]))
            return op.Where(native, one, s)

        scales = op.Concat(op.Constant(value_floats=[1.0, 1.0]), scale(h64), scale(w64), axis=0)
        out = op.Resize(grid, None, scales, mode="cubic", cubic_coeff_a=-0.75,
                        coordinate_transformation_mode="half_pixel", antialias=int(antialias))
    else:
        sizes = op.Concat(op.Constant(value_ints=[1, D]), h64, w64, axis=0)
        out = op.Resize(grid, None, None, sizes, mode="cubic", cubic_coeff_a=-0.75,
                        coordinate_transformation_mode="half_pixel", antialias=int(antialias))
    out = op.Reshape(op.Transpose(out, perm=[0, 2, 3, 1]), [1, -1, D])
    return op.Concat(cls_pos, out, axis=1)


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
        m = _LAYER.match(name)
        if m:
            i = int(m.group(1))
            if not 0 <= i < model.n_blocks:
                raise ValueError(f"export_onnx: output {name!r}: the model has blocks 0..{model.n_blocks - 1}")
        elif name not in keys:
            raise ValueError(f"export_onnx: unknown output {name!r}; choose from {keys} or 'layer_<i>' "
                             f"(0 <= i < {model.n_blocks}, get_intermediate_layers patches, normalised)")
        if name in names:
            raise ValueError(f"export_onnx: output {name!r} requested twice")
        names.append(name)
    if not names:
        raise ValueError("export_onnx: outputs is empty; pass None for the default outputs")
    return names


class ExportGraph(nn.Module):
    """``pixel_values -> tuple of outputs`` in the order of ``names``; one pass over the blocks.

    ``layer_<i>`` is block i's output after the final norm, patch tokens only ([B, HW, D]): the
    default of ``get_intermediate_layers``.
    """

    def __init__(self, model, names: Sequence[str]):
        super().__init__()
        self.model = model
        self.names = list(names)
        self.layers = sorted(int(_LAYER.match(n).group(1)) for n in names if _LAYER.match(n))

    def forward(self, x: Tensor):
        m = self.model
        tokens, rope, _ = m.prepare_tokens_with_masks(x)
        tokens, kept = m._run_blocks(tokens, rope, keep=set(self.layers))
        out = {f"layer_{i}": m._final_norm(t)[1] for i, t in zip(self.layers, kept)}
        prefix, patches = m._final_norm(tokens)
        out["x_norm_clstoken"] = prefix[:, 0]
        out[m.extra_tokens_key] = prefix[:, 1:]
        out["x_norm_patchtokens"] = patches
        out["x_prenorm"] = tokens
        return tuple(out[n] for n in self.names)


class _ExportMode:
    """Traceable choices on the model for the duration of an export, undone afterwards.

    The reference backend runs (the Triton / CUDA kernels are opaque to the exporter), and
    DINOv2's position table goes through the custom op above.
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
                return _pos_embed_op(m.pos_embed, H, W, float(cfg.interpolate_offset),
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
    return h, w


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
    The VGGT ``Aggregator`` is exported by :func:`export_aggregator_onnx`.
    """
    from ..models import Aggregator

    if isinstance(model, Aggregator):
        return export_aggregator_onnx(model, path, dynamic=dynamic, opset=opset, overwrite=overwrite, check=check)
    from ..models import DinoVisionTransformer

    if not isinstance(model, DinoVisionTransformer):
        raise TypeError(f"export_onnx: expected a flashdino backbone (flashdino.create_model(...)), got {type(model).__name__}")
    require("onnxscript", "export_onnx")
    onnx = require("onnx", "export_onnx")
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
                dynamic_shapes=dynamic_shapes, opset_version=opset or DEFAULT_OPSET,
                custom_translation_table={torch.ops.flashdino_deploy.pos_embed.default: _pos_embed_onnx},
                verbose=False)
    except Exception as exc:
        raise ExportError(f"export_onnx: torch.onnx (dynamo) could not export {model.cfg.name}: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    finally:
        model.train(was_training)
    for key, value in metadata(model, names, dynamic, dtype).items():
        program.model.metadata_props[key] = value
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    _save(program.model, out, external_data if external_data is not None else size > ONNX_2GB * 0.9)
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


def export_aggregator_onnx(model, path: PathLike, *, dynamic: bool = True, opset: Optional[int] = None,
                           overwrite: bool = True, check: bool = True) -> Path:
    raise ExportError("export_onnx: the VGGT Aggregator export is not implemented yet")


__all__ = ["export_onnx", "read_metadata", "resolve_outputs", "default_outputs", "ExportGraph", "ExportError",
           "INPUT_NAME"]
