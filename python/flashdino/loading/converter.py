"""Writing any supported checkpoint as a flashdino safetensors file (canonical keys + metadata)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .. import __version__
from ..outputs import OutputPathError, atomic_write, check_output_path
from ..variants import VitConfig, get_config
from .errors import CheckpointError, WeightsUnavailableError
from .load import FLASHDINO_FORMAT, config_to_json, read_checkpoint
from .sources import is_hub_id, is_url

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _local_inputs(source) -> list:
    """The files a local source reads (a folder's files too), which the output must never replace."""
    if not isinstance(source, (str, os.PathLike)):
        return []
    text = os.fspath(source)
    if is_url(text) or (is_hub_id(text) and not os.path.exists(text)):
        return []
    path = Path(text).expanduser()
    if path.is_dir():
        return [path] + [p for p in path.iterdir() if p.is_file()]
    return [path]


def convert(source, out_path: Union[str, os.PathLike], model: Union[None, str, nn.Module] = None, *,
            dtype: Union[None, str, torch.dtype] = None, overwrite: bool = False, **overrides) -> Path:
    """Converts ``source`` (anything ``load_weights`` accepts) to a canonical safetensors file.

    ``model``: a variant name (plus ``overrides``), a flashdino model, or None to take the
    architecture from the source (HF config.json, flashdino metadata, or the keys). The file's
    metadata records ``format="flashdino"``, the variant name, the source layout and the full
    configuration, so ``load_weights`` and ``from_pretrained`` read it directly. ``dtype`` casts
    floating tensors (default: keep the checkpoint's dtypes; RoPE periods stay float32).

    An existing ``out_path`` is refused unless ``overwrite=True`` (the default protects files a
    script did not mean to replace; converting again is cheap, a lost checkpoint is not), and an
    output that is one of the source's files is refused always. The file is written to a unique
    temporary name beside ``out_path`` and renamed into place, so readers and concurrent
    conversions never see half a file.
    """
    out = Path(out_path).expanduser()
    if out.suffix != ".safetensors":
        raise CheckpointError(f"output {out} must end in .safetensors")
    check_output_path(out, overwrite=overwrite, inputs=_local_inputs(source), what="output")
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if isinstance(model, nn.Module):
        cfg: Optional[VitConfig] = model.cfg
    elif isinstance(model, str):
        cfg = get_config(model, **overrides)
    else:
        cfg = None
    ckpt = read_checkpoint(source, cfg, strict=True, hint=str(source), **({} if cfg is not None else overrides))
    if isinstance(model, nn.Module):
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        wrong = [k for k in expected if k not in ckpt.state_dict or tuple(ckpt.state_dict[k].shape) != expected[k]]
        if wrong:
            raise CheckpointError(f"{ckpt.source.origin} does not fit the given model: {', '.join(wrong[:5])}")
        keys = list(expected)
    else:
        keys = [k for k in ckpt.state_dict if k not in ckpt.report.unexpected]
    tensors = _tensors(ckpt.state_dict, keys, dtype)
    cfg = ckpt.cfg
    metadata = {"format": FLASHDINO_FORMAT, "flashdino_format_version": "1", "variant": cfg.name,
                "source_format": ckpt.canonical.format, "config": config_to_json(cfg),
                "flashdino_version": __version__}
    with atomic_write(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return out


def _tensors(sd: dict, keys: list, dtype: Optional[torch.dtype]) -> dict:
    tensors, seen = {}, set()
    for key in keys:
        t = sd[key].detach().to("cpu")
        if dtype is not None and t.is_floating_point() and not key.endswith("rope_embed.periods"):
            t = t.to(dtype)
        t = t.contiguous()
        # safetensors refuses shared or partial storages: give each tensor its own.
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if ptr in seen or (t.numel() and t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.clone()
        if ptr:
            seen.add(ptr)
        tensors[key] = t
    return tensors


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flashdino.loading.convert",
        description="Convert an official / timm / Hugging Face DINOv2 or DINOv3 checkpoint to a flashdino "
                    "safetensors file (canonical keys, metadata with the variant and configuration). "
                    "The same as `flashdino convert`.")
    parser.add_argument("source", help="checkpoint file, HF model folder, hub id, or URL")
    parser.add_argument("output", help="output .safetensors path")
    parser.add_argument("--model", default=None, help="variant name (default: read from the source)")
    parser.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="cast floating tensors")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    try:
        out = convert(args.source, args.output, model=args.model, dtype=args.dtype, overwrite=args.overwrite)
    except CheckpointError as exc:
        print(f"error: {exc.cli_message()}", file=sys.stderr)
        return 1
    except (WeightsUnavailableError, OutputPathError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with safe_open(str(out), framework="pt") as f:
        meta, n = f.metadata(), len(list(f.keys()))
    print(f"wrote {out}: {meta.get('variant')} ({n} tensors, from {meta.get('source_format')})")
    return 0
