"""``flashdino convert``: a checkpoint (official .pth, timm, HF, URL, hub id) to flashdino safetensors."""

from __future__ import annotations

import sys

from ._common import CliError, check_overrides, check_source, cli_errors, parse_overrides, resolve_model


def run(args) -> int:
    from flashdino import loading
    from flashdino.outputs import missing_parents

    src = args.src
    check_source(src, "convert")
    if args.model:
        resolve_model(args.model)  # a misspelt --model is named before "output already exists"
    kwargs = {"model": args.model} if args.model else {}
    overrides = parse_overrides(args.override)
    if overrides:
        if not args.model:
            raise CliError("--override needs --model NAME (the variant the overrides change)")
        check_overrides(args.model, overrides)
        kwargs.update(overrides)
    if args.dtype:
        kwargs["dtype"] = args.dtype
    if args.overwrite:
        kwargs["overwrite"] = True
    created = missing_parents(args.out)
    result = cli_errors(loading.convert)(src, args.out, **kwargs)
    if created:
        print(f"flashdino: notice: created folder {created[-1]}", file=sys.stderr)
    print(f"wrote {result if result is not None else args.out}")
    return 0


def add_parser(sub) -> None:
    c = sub.add_parser("convert", help="convert a checkpoint (official .pth, timm, HF) to flashdino safetensors")
    c.add_argument("src", help="checkpoint file, Hugging Face folder, hub id or URL")
    c.add_argument("out", help="output .safetensors file (refused if it exists, unless --overwrite)")
    c.add_argument("--model", default=None, help="variant name when it cannot be inferred from the checkpoint")
    c.add_argument("--override", action="append", metavar="KEY=VALUE", help="architecture override (with --model)")
    c.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="cast floating tensors")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    c.set_defaults(func=run)
