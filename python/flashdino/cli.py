"""The ``flashdino`` command line (also ``python -m flashdino``).

    flashdino features IMAGES_OR_FOLDERS --model NAME [--weights PATH] --out FILE.safetensors
                       [--batch-size N] [--device cpu|cuda] [--size 224] [--pca OUT.png]
    flashdino features --sample --model dinov3_vits16 --out sample.safetensors --pca sample_pca.png
    flashdino info
    flashdino convert SRC OUT [--model NAME]

``features`` writes a safetensors file with ``cls`` [N, D] and ``patch_tokens`` [N, h*w, D] (or
``patch_tokens.<i>`` per image when the grids differ, with ``--size 0``), and the file names, grids,
model and weights in its metadata. ``--pca`` renders the first three principal components of the
patch features as RGB next to each input image.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DEFAULT_MODEL = "dinov3_vits16"
PCA_MAX_IMAGES = 8  # rows of the --pca picture


class CliError(Exception):
    """A user error: printed as ``flashdino: error: ...`` with exit status 2, no traceback."""


# -- helpers ----------------------------------------------------------------------------------------------
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


def _parse_overrides(items: Optional[Sequence[str]]) -> dict:
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise CliError(f"--override expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _parse_size(text: str):
    text = str(text).strip().lower()
    if text in ("0", "none", "native", "keep"):
        return "native"
    try:
        if "x" in text:
            h, w = (int(v) for v in text.split("x"))
            return (h, w)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size expects an int, HxW, or 0 to keep each image's size; got {text!r}") from None


def _build_model(args):
    """(model, path of the weights folder's preprocessor_config.json or None)."""
    import flashdino
    from flashdino.variants import resolve_name

    try:
        name = resolve_name(args.model)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    overrides = _parse_overrides(args.override)
    pre_cfg = None
    if args.weights is None:
        print(f"flashdino: notice: no --weights given: {name} uses RANDOM weights, so the features are "
              "meaningless (fine for a smoke test). Pass --weights CHECKPOINT|HF_FOLDER|HUB_ID for real features.",
              file=sys.stderr)
        _check_overrides(name, overrides)
        model = flashdino.create_model(name, **overrides)
    else:
        w = Path(args.weights)
        if w.is_dir() and (w / "preprocessor_config.json").is_file():
            pre_cfg = w / "preprocessor_config.json"
        if not w.exists() and _looks_like_path(args.weights):
            raise CliError(f"weights file not found: {w}")
        _check_overrides(name, overrides)
        model = flashdino.create_model(name, weights=args.weights, **overrides)
    return model, pre_cfg


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the image header; a clear error naming the file when it is unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            w, h = img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise CliError(f"cannot read image {path}: {exc.__class__.__name__}: {exc}") from None
    return h, w


def _looks_like_path(text: str) -> bool:
    """True for things that can only be files (a hub id "org/name" is not one)."""
    return text.startswith(("/", ".", "~")) or text.endswith((".pth", ".pt", ".safetensors", ".bin")) \
        or text.count("/") > 1 or (os.sep != "/" and os.sep in text)


def _check_overrides(name: str, overrides: dict) -> None:
    import dataclasses
    import difflib

    from flashdino.variants import VitConfig, get_config

    fields = sorted({f.name for f in dataclasses.fields(VitConfig)} - {"name", "family", "weights"})
    for key in overrides:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise CliError(f"--override {key}: unknown configuration field{hint} (fields: {', '.join(fields)})")
    try:
        get_config(name, **overrides)
    except (TypeError, ValueError) as exc:
        raise CliError(f"--override: {exc}") from None


def _batches(items, size):
    for i in range(0, len(items), size):
        yield items[i: i + size]


# -- PCA rendering ---------------------------------------------------------------------------------------
def pca_rgb(features, grids, n_components: int = 3):
    """Projects patch features onto their first 3 principal components (fitted jointly) as [0, 1] RGB.

    features: list of [h*w, D] tensors; grids: list of (h, w). Returns a list of [h, w, 3] tensors.
    """
    import torch

    X = torch.cat([f.float() for f in features], dim=0)
    mean = X.mean(dim=0, keepdim=True)
    Xc = X - mean
    q = min(n_components, Xc.shape[0], Xc.shape[1])
    # SVD of the centred data: rows of Vh are the principal directions (deterministic, exact)
    _, _, Vh = torch.linalg.svd(Xc, full_matrices=False)
    comps = Xc @ Vh[:q].T
    if q < n_components:
        comps = torch.cat([comps, comps.new_zeros(comps.shape[0], n_components - q)], dim=1)
    # sign convention (SVD signs are arbitrary): the largest-magnitude projection is positive
    peak = comps.abs().argmax(dim=0)
    comps = comps * torch.sign(comps[peak, torch.arange(comps.shape[1])]).clamp_min(0).mul(2).sub(1)
    lo = torch.quantile(comps, 0.01, dim=0)
    hi = torch.quantile(comps, 0.99, dim=0)
    comps = ((comps - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    out, start = [], 0
    for (h, w) in grids:
        out.append(comps[start: start + h * w].reshape(h, w, n_components))
        start += h * w
    return out


def render_pca(images, features, grids, path, max_images: int = PCA_MAX_IMAGES):
    """Writes a PNG with one row per image: the (preprocessed) input next to its PCA colouring."""
    import numpy as np
    import torch
    from PIL import Image

    images, features, grids = images[:max_images], features[:max_images], grids[:max_images]
    rgbs = pca_rgb(features, grids)
    rows = []
    for img, rgb in zip(images, rgbs):  # img: [3, H, W] in [0, 1]
        H, W = img.shape[-2:]
        left = (img.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        right = torch.nn.functional.interpolate(rgb.permute(2, 0, 1)[None], size=(H, W), mode="nearest")[0]
        right = (right.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        rows.append(np.concatenate([left, right], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    canvas = np.concatenate(rows, axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


# -- commands --------------------------------------------------------------------------------------------
def cmd_features(args) -> int:
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

    model, pre_cfg = _build_model(args)
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


def cmd_info(args) -> int:
    try:
        from flashdino import info
    except ImportError:
        info = None
    if info is not None and hasattr(info, "main"):
        rv = info.main(list(args.rest))  # an explicit list: sys.argv still holds "info"
        return int(rv or 0)
    import platform

    import torch

    import flashdino

    print(f"flashdino {flashdino.__version__} (python {platform.python_version()}, torch {torch.__version__}, "
          f"cuda available: {torch.cuda.is_available()})")
    print("models: " + ", ".join(flashdino.list_models()))
    return 0


def cmd_convert(args) -> int:
    from flashdino import loading

    if not hasattr(loading, "convert"):
        raise CliError("this flashdino build has no checkpoint converter (flashdino.loading.convert)")
    src = args.src
    if not Path(src).exists() and _looks_like_path(src):
        raise CliError(f"no such file or folder: {src}")
    kwargs = {"model": args.model} if args.model else {}
    overrides = _parse_overrides(args.override)
    if overrides:
        if not args.model:
            raise CliError("--override needs --model NAME (the variant the overrides change)")
        _check_overrides(args.model, overrides)
        kwargs.update(overrides)
    if args.dtype:
        kwargs["dtype"] = args.dtype
    result = loading.convert(src, args.out, **kwargs)
    print(f"wrote {result if result is not None else args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    import flashdino

    parser = argparse.ArgumentParser(prog="flashdino", description="flashdino: fast DINOv2 / DINOv3 / VGGT backbones")
    parser.add_argument("--version", action="version", version=f"flashdino {flashdino.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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
    f.add_argument("--size", type=_parse_size, default=None,
                   help="resize to SIZE x SIZE or HxW; 0 keeps each image's size (cropped to a patch multiple). "
                        "Default: the weights folder's preprocessor_config.json, else 224")
    f.add_argument("--pca", default=None, metavar="OUT.png", help="also render a PCA visualisation of the patch features")
    f.add_argument("--override", action="append", metavar="KEY=VALUE",
                   help="architecture override, repeatable (e.g. --override depth=2)")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=cmd_features)

    i = sub.add_parser("info", help="environment, kernels and models", add_help=False)
    i.add_argument("rest", nargs=argparse.REMAINDER)
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("convert", help="convert a checkpoint (official .pth, timm, HF) to flashdino safetensors")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--model", default=None, help="variant name when it cannot be inferred from the checkpoint")
    c.add_argument("--override", action="append", metavar="KEY=VALUE", help="architecture override (with --model)")
    c.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="cast floating tensors")
    c.set_defaults(func=cmd_convert)

    b = sub.add_parser("bench", help="end-to-end benchmark against HF / torch.compile / timm (flashdino bench --help)",
                       add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(func=lambda a: _cmd_bench(a.rest))
    return parser


def _cmd_bench(rest) -> int:
    from flashdino.bench import main as bench_main

    bench_main(list(rest), prog="flashdino bench")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    if argv and argv[0] == "info":  # everything after `info` belongs to flashdino.info
        return cmd_info(argparse.Namespace(rest=argv[1:]))
    if argv and argv[0] == "bench":  # everything after `bench` belongs to flashdino.bench
        return _cmd_bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    from flashdino.integrations.config import ConfigError
    from flashdino.loading import CheckpointError, WeightsUnavailableError
    from flashdino.preprocess import PreprocessorConfigError

    if os.environ.get("FLASHDINO_DEBUG"):  # full tracebacks
        return args.func(args)
    try:
        return args.func(args)
    except (CliError, CheckpointError, WeightsUnavailableError, ConfigError, PreprocessorConfigError,
            FileNotFoundError, ValueError) as exc:
        print(f"flashdino: error: {exc}", file=sys.stderr)
        return 2


def console_main() -> None:  # pragma: no cover - the installed script
    sys.exit(main())


__all__ = ["main", "build_parser", "collect_images", "pca_rgb", "render_pca", "CliError"]
