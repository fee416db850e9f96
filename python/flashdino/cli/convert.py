"""``flashdino convert``: a checkpoint (official .pth, timm, HF) to flashdino safetensors."""

from __future__ import annotations

from pathlib import Path

from ._common import CliError, check_overrides, looks_like_path, parse_overrides


def run(args) -> int:
    from flashdino import loading

    if not hasattr(loading, "convert"):
        raise CliError("this flashdino build has no checkpoint converter (flashdino.loading.convert)")
    src = args.src
    if not Path(src).exists() and looks_like_path(src):
        raise CliError(f"no such file or folder: {src}")
    kwargs = {"model": args.model} if args.model else {}
    overrides = parse_overrides(args.override)
    if overrides:
        if not args.model:
            raise CliError("--override needs --model NAME (the variant the overrides change)")
        check_overrides(args.model, overrides)
        kwargs.update(overrides)
    if args.dtype:
        kwargs["dtype"] = args.dtype
    result = loading.convert(src, args.out, **kwargs)
    print(f"wrote {result if result is not None else args.out}")
    return 0



def add_parser(sub) -> None:
    c = sub.add_parser("convert", help="convert a checkpoint (official .pth, timm, HF) to flashdino safetensors")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--model", default=None, help="variant name when it cannot be inferred from the checkpoint")
    c.add_argument("--override", action="append", metavar="KEY=VALUE", help="architecture override (with --model)")
    c.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="cast floating tensors")
    c.set_defaults(func=run)

