"""``flashdino export``: a backbone as an ONNX file with dynamic batch, height and width."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._common import CliError, build_model


def _parse_hw(text: str):
    from flashdino.deploy.onnx_export import MAX_STATIC_SIDE

    text = str(text).strip().lower()
    try:
        if "x" in text:
            h, w = (int(v) for v in text.split("x"))
        else:
            h = w = int(text)
    except ValueError:
        raise CliError(f"--static expects HxW (e.g. 224x224) or one int, got {text!r}") from None
    if h <= 0 or w <= 0:
        raise CliError(f"--static expects positive sizes, got {text!r}")
    if h > MAX_STATIC_SIDE or w > MAX_STATIC_SIDE:
        raise CliError(f"--static {h}x{w} is over the limit of {MAX_STATIC_SIDE} pixels a side; choose a smaller "
                       "size, or leave --static out for a dynamic export (any size at run time)")
    return h, w


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _check_out(out: str) -> None:
    path = Path(out).expanduser()
    try:
        is_dir = path.is_dir()
    except OSError as exc:  # e.g. a name longer than the filesystem allows
        raise CliError(f"--out {str(out)[:60]}...: {exc.strerror or exc}; choose another (shorter) path") from None
    if is_dir:
        raise CliError(f"--out {out} is a folder; give the .onnx file to write, e.g. --out {path / 'model.onnx'}")
    if path.suffix.lower() != ".onnx":
        raise CliError(f"--out {out}: the exported file must end in .onnx (e.g. --out {path.with_suffix('.onnx')})")


def check_arguments(args):
    """Every argument checked before the model is built: (static size or None, outputs, opset)."""
    from flashdino.deploy.onnx_export import MAX_STATIC_BATCH, check_opset

    _check_out(args.out)
    static = _parse_hw(args.static) if args.static else None
    if args.batch_size is not None and static is None:
        raise CliError("--batch-size fixes the batch of a --static export; a dynamic export (no --static) runs "
                       "any batch size: add --static HxW or drop --batch-size")
    if args.batch_size is not None and args.batch_size > MAX_STATIC_BATCH:
        raise CliError(f"--batch-size {args.batch_size} is over the limit of {MAX_STATIC_BATCH} for a static export")
    try:
        opset = check_opset(args.opset, "--opset")
    except ValueError as exc:
        raise CliError(str(exc).replace("export_onnx: ", "")) from None
    outputs = None
    if args.outputs:
        outputs = [int(o) if o.isdigit() else o for o in args.outputs.split(",") if o.strip()]
    return static, outputs, opset


def run(args) -> int:
    from flashdino.deploy import ExportError, export_onnx
    from flashdino.deploy._extras import MissingExtraError
    from flashdino.outputs import check_output_path

    static, outputs, opset = check_arguments(args)
    # Fail on the output location before the model is built and exported.
    check_output_path(args.out, overwrite=args.overwrite, inputs=[args.weights] if args.weights else [],
                      what="ONNX file")
    model, _ = build_model(args)
    if static and (static[0] < model.patch_size or static[1] < model.patch_size):
        raise CliError(f"--static {static[0]}x{static[1]} is smaller than one {model.patch_size}x{model.patch_size} patch")
    batch = args.batch_size or 1
    try:
        path = export_onnx(model, args.out, dynamic=static is None, static_size=static, batch_size=batch,
                           outputs=outputs, opset=opset, fp16=args.fp16, overwrite=args.overwrite)
    except (MissingExtraError, ExportError) as exc:
        raise CliError(str(exc)) from None
    shape = "B x 3 x H x W (dynamic)" if static is None else f"{batch} x 3 x {static[0]} x {static[1]}"
    print(f"wrote {path} (input pixel_values {shape}, opset {opset})", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a backbone to ONNX (dynamic batch / height / width)")
    p.add_argument("model", help="variant name, e.g. dinov3_vits16 or dinov2_vitb14_reg")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--weights", default=None, help="checkpoint, HF folder or hub id (default: random weights)")
    p.add_argument("--override", action="append", metavar="KEY=VALUE", help="architecture override")
    p.add_argument("--static", default=None, metavar="HxW", help="fix the image size (and the batch) instead of dynamic")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="batch size of a --static export (default 1; a dynamic export takes any batch)")
    p.add_argument("--fp16", action="store_true", help="float16 weights and input (DINOv3 overflows fp16 with real weights)")
    p.add_argument("--outputs", default=None,
                   help="comma-separated outputs, e.g. x_norm_clstoken,x_norm_patchtokens,layer_9,layer_11 "
                        "(default: CLS, extra tokens, patch tokens)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset, 18 to 23 (default 18)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(func=run)
