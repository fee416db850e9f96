"""``flashdino features``: CLS and patch features of images into a safetensors file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from ._common import DEFAULT_MODEL, CliError, build_model, parse_size
from .pca import PCA_MAX_IMAGES, render_pca

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def collect_images(inputs: Sequence[str]) -> list[Path]:
    """Image files from files and folders (folders: their image files, sorted, not recursive)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise CliError(f"no images found in folder {p} (looked for {', '.join(IMAGE_EXTENSIONS)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise CliError(f"no such file or folder: {p}")
    return files


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the image header; a clear error naming the file when it is unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            w, h = img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise CliError(f"cannot read image {path}: {exc.__class__.__name__}: {exc}") from None
    return h, w


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i: i + size]


def run(args) -> int:
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from flashdino.preprocess import Preprocessor, load_image

    inputs = list(args.inputs or [])
    if args.sample:
        from flashdino.assets import sample_image_path

        inputs.insert(0, str(sample_image_path()))
    if not inputs:
        raise CliError("no input images: pass image files or folders, or --sample for the packaged sample image")
    files = collect_images(inputs)
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {args.device} requested but CUDA is not available; use --device cpu")
    out_path = Path(args.out)
    if out_path.suffix != ".safetensors":
        raise CliError(f"--out must end in .safetensors, got {out_path}")
    if args.pca and Path(args.pca).suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"):
        raise CliError(f"--pca must name an image file (.png, .jpg, ...), got {args.pca}")

    model, pre_cfg = build_model(args)
    model = model.to(args.device).eval().requires_grad_(False)
    P = model.patch_size
    if pre_cfg is None and isinstance(getattr(model, "preprocessor_config", None), dict):
        pre_cfg = model.preprocessor_config  # set by the loaders for HF folders / hub ids
    if pre_cfg is not None and args.size is None:
        pre = Preprocessor.from_preprocessor_config(pre_cfg, patch_size=P,
                                                    origin=f"{args.weights}: preprocessor_config.json")
    else:
        size = 224 if args.size is None else (None if args.size == "native" else args.size)
        pre = Preprocessor.from_variant(model.cfg, size=size)

    # read every header first (fails early, naming an unreadable file), decode the pixels per batch;
    # batch images whose processed size agrees (all of them with a fixed --size)
    order: dict = {}
    for i, f in enumerate(files):
        order.setdefault(pre.output_size(*image_size(f)), []).append(i)
    cls = [None] * len(files)
    patches = [None] * len(files)
    grids = [None] * len(files)
    shown = {} if args.pca else None  # the first PCA_MAX_IMAGES inputs, as the model saw them
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if dtype != torch.float32:
        model = model.to(dtype)
    bar = tqdm(total=len(files), desc=f"features ({model.cfg.name})", unit="img", disable=args.quiet,
               file=sys.stderr)
    with torch.inference_mode():
        for idx in order.values():
            for chunk in _batches(idx, args.batch_size):
                # each image through the preprocessor on the device, then one batch
                x = torch.cat([pre(load_image(files[i]), device=args.device) for i in chunk]).to(dtype)
                out = model.forward_features(x)
                h, w = x.shape[-2] // P, x.shape[-1] // P
                for j, i in enumerate(chunk):
                    cls[i] = out["x_norm_clstoken"][j].float().cpu()
                    patches[i] = out["x_norm_patchtokens"][j].float().cpu()
                    grids[i] = (h, w)
                    if shown is not None and i < PCA_MAX_IMAGES:
                        shown[i] = pre.denormalize(x[j: j + 1].float())[0].cpu()
                bar.update(len(chunk))
    bar.close()

    tensors = {"cls": torch.stack(cls).contiguous()}
    if len(set(grids)) == 1:
        tensors["patch_tokens"] = torch.stack(patches).contiguous()
    else:
        for i, p in enumerate(patches):
            tensors[f"patch_tokens.{i}"] = p.contiguous()
    metadata = {
        "files": json.dumps([str(f) for f in files]),
        "grids": json.dumps([list(g) for g in grids]),
        "model": model.cfg.name,
        "weights": str(args.weights) if args.weights else "random",
        "patch_size": str(P),
        "format": "flashdino.features/1",
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_path), metadata=metadata)
    D = tensors["cls"].shape[1]
    layout = (f"patch_tokens {list(tensors['patch_tokens'].shape)}" if "patch_tokens" in tensors
              else f"per-image patch_tokens.<i> (grids differ: {sorted(set(grids))})")
    print(f"wrote {out_path}: cls [{len(files)}, {D}], {layout}")
    if args.pca:
        keep = sorted(shown)
        path = render_pca([shown[i] for i in keep], [patches[i] for i in keep], [grids[i] for i in keep], args.pca)
        print(f"wrote {path}: PCA of the patch features (first 3 components as RGB)")
    return 0




def add_parser(sub) -> None:
    f = sub.add_parser("features", help="extract CLS and patch features of images into a safetensors file",
                       description="Extract CLS and patch features of images (files or folders) into a safetensors file.")
    f.add_argument("inputs", nargs="*", metavar="IMAGES_OR_FOLDERS")
    f.add_argument("--sample", action="store_true", help="add the packaged sample image to the inputs")
    f.add_argument("--model", default=DEFAULT_MODEL, help=f"variant name or alias (default {DEFAULT_MODEL})")
    f.add_argument("--weights", default=None, help="checkpoint file, Hugging Face folder or hub id (default: random)")
    f.add_argument("--out", default="features.safetensors", help="output .safetensors file (default features.safetensors)")
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    f.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    f.add_argument("--size", type=parse_size, default=None,
                   help="resize to SIZE x SIZE or HxW; 0 keeps each image's size (cropped to a patch multiple). "
                        "Default: the weights folder's preprocessor_config.json, else 224")
    f.add_argument("--pca", default=None, metavar="OUT.png", help="also render a PCA visualisation of the patch features")
    f.add_argument("--override", action="append", metavar="KEY=VALUE",
                   help="architecture override, repeatable (e.g. --override depth=2)")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=run)

