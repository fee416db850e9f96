"""``flashdino export``: a backbone as an ONNX file with dynamic batch, height and width."""

from __future__ import annotations

import sys

from ._common import CliError, build_model


def _parse_hw(text: str):
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
    return h, w


def run(args) -> int:
    from flashdino.deploy import export_onnx
    from flashdino.deploy._extras import MissingExtraError
    from flashdino.outputs import check_output_path

    # Fail on the output location before the model is built and exported.
    check_output_path(args.out, overwrite=args.overwrite, inputs=[args.weights] if args.weights else [],
                      what="ONNX file")
    static = _parse_hw(args.static) if args.static else None
    outputs = None
    if args.outputs:
        outputs = [int(o) if o.isdigit() else o for o in args.outputs.split(",") if o.strip()]
    model, _ = build_model(args)
    if static and (static[0] < model.patch_size or static[1] < model.patch_size):
        raise CliError(f"--static {static[0]}x{static[1]} is smaller than one {model.patch_size}x{model.patch_size} patch")
    try:
        path = export_onnx(model, args.out, dynamic=static is None, static_size=static, batch_size=args.batch_size,
                           outputs=outputs, opset=args.opset, fp16=args.fp16, overwrite=args.overwrite)
    except MissingExtraError as exc:
        raise CliError(str(exc)) from None
    shape = "B x 3 x H x W (dynamic)" if static is None else f"{args.batch_size} x 3 x {static[0]} x {static[1]}"
    print(f"wrote {path} (input pixel_values {shape})", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a backbone to ONNX (dynamic batch / height / width)")
    p.add_argument("model", help="variant name, e.g. dinov3_vits16 or dinov2_vitb14_reg")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--weights", default=None, help="checkpoint, HF folder or hub id (default: random weights)")
    p.add_argument("--override", action="append", metavar="KEY=VALUE", help="architecture override")
    p.add_argument("--static", default=None, metavar="HxW", help="fix the image size (and the batch) instead of dynamic")
    p.add_argument("--batch-size", type=int, default=1, help="batch size of a --static export (default 1)")
    p.add_argument("--fp16", action="store_true", help="float16 weights and input (DINOv3 overflows fp16 with real weights)")
    p.add_argument("--outputs", default=None,
                   help="comma-separated outputs, e.g. x_norm_clstoken,x_norm_patchtokens,layer_9,layer_11 "
                        "(default: CLS, extra tokens, patch tokens)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(func=run)
