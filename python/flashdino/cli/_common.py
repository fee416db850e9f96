"""Helpers shared by the commands: the user-error type, overrides, sizes, model construction."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_MODEL = "dinov3_vits16"


class CliError(Exception):
    """A user error: printed as ``flashdino: error: ...`` with exit status 2, no traceback."""


def parse_overrides(items: Optional[Sequence[str]]) -> dict:
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise CliError(f"--override expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def parse_size(text: str):
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


def build_model(args):
    """(model, path of the weights folder's preprocessor_config.json or None)."""
    import flashdino
    from flashdino.variants import resolve_name

    try:
        name = resolve_name(args.model)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    overrides = parse_overrides(args.override)
    pre_cfg = None
    if args.weights is None:
        print(f"flashdino: notice: no --weights given: {name} uses RANDOM weights, so the features are "
              "meaningless (fine for a smoke test). Pass --weights CHECKPOINT|HF_FOLDER|HUB_ID for real features.",
              file=sys.stderr)
        check_overrides(name, overrides)
        model = flashdino.create_model(name, **overrides)
    else:
        w = Path(args.weights)
        if w.is_dir() and (w / "preprocessor_config.json").is_file():
            pre_cfg = w / "preprocessor_config.json"
        if not w.exists() and looks_like_path(args.weights):
            raise CliError(f"weights file not found: {w}")
        check_overrides(name, overrides)
        model = flashdino.create_model(name, weights=args.weights, **overrides)
    return model, pre_cfg


def looks_like_path(text: str) -> bool:
    """True for things that can only be files (a hub id "org/name" is not one)."""
    return text.startswith(("/", ".", "~")) or text.endswith((".pth", ".pt", ".safetensors", ".bin")) \
        or text.count("/") > 1 or (os.sep != "/" and os.sep in text)


def check_overrides(name: str, overrides: dict) -> None:
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


