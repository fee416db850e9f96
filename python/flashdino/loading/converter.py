"""Writing any supported checkpoint as a flashdino safetensors file (canonical keys + metadata)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from .errors import CheckpointError
from .formats import canonicalize
from .load import FLASHDINO_FORMAT, _raise, config_for_source, config_to_json, expected_shapes, match_state_dict
from .sources import resolve

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def convert(source, out_path: Union[str, os.PathLike], model: Union[None, str, nn.Module] = None, *,
            dtype: Union[None, str, torch.dtype] = None, **overrides) -> Path:
    """Converts ``source`` (anything ``load_weights`` accepts) to a canonical safetensors file.

    ``model``: a variant name (plus ``overrides``), a flashdino model, or None to take the
    architecture from the source (HF config.json, flashdino metadata, or the keys). The file's
    metadata records ``format="flashdino"``, the variant name, the source layout and the full
    configuration, so ``load_weights`` and ``from_pretrained`` read it directly. ``dtype`` casts
    floating tensors (default: keep the checkpoint's dtypes; RoPE periods stay float32).
    """
    from safetensors.torch import save_file

    from ..variants import get_config

    if isinstance(model, nn.Module):
        cfg = model.cfg
        src = resolve(source, cfg.weights, cfg.name)
    elif isinstance(model, str):
        cfg = get_config(model, **overrides)
        src = resolve(source, cfg.weights, cfg.name)
    else:
        src = resolve(source)
        cfg = config_for_source(src, hint=str(source))
        if overrides:
            cfg = cfg.replace(**overrides).validate()
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    canon = canonicalize(src.state_dict, cfg)
    expected = expected_shapes(model if isinstance(model, nn.Module) else cfg)
    report = match_state_dict(canon, cfg, expected, src.origin)
    _raise(report, strict=True)
    tensors = {}
    seen = set()
    for key in expected:
        t = canon.state_dict[key].detach().to("cpu")
        if dtype is not None and t.is_floating_point() and not key.endswith("rope_embed.periods"):
            t = t.to(dtype)
        t = t.contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if ptr in seen or (t.numel() and t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.clone()
        if ptr:
            seen.add(ptr)
        tensors[key] = t
    metadata = {"format": FLASHDINO_FORMAT, "flashdino_format_version": "1", "variant": cfg.name,
                "source_format": canon.format, "config": config_to_json(cfg)}
    from .. import __version__

    metadata["flashdino_version"] = __version__
    out = Path(out_path)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"output {out} must end in .safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    return out


def main(argv: Optional[list] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m flashdino.loading.convert",
        description="Convert an official / timm / Hugging Face DINOv2 or DINOv3 checkpoint to a flashdino "
                    "safetensors file (canonical keys, metadata with the variant and configuration).")
    parser.add_argument("source", help="checkpoint file, HF model folder, hub id, or URL")
    parser.add_argument("output", help="output .safetensors path")
    parser.add_argument("--model", default=None, help="variant name (default: read from the source)")
    parser.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="cast floating tensors")
    args = parser.parse_args(argv)
    from .errors import WeightsUnavailableError

    try:
        out = convert(args.source, args.output, model=args.model, dtype=args.dtype)
    except (CheckpointError, WeightsUnavailableError, ValueError) as exc:
        print(f"error: {exc}", file=__import__("sys").stderr)
        return 1
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta, n = f.metadata(), len(list(f.keys()))
    print(f"wrote {out}: {meta.get('variant')} ({n} tensors, from {meta.get('source_format')})")
    return 0
