"""Helpers shared by the commands: the user-error type, overrides, sizes, model construction.

flashdino's torch-based modules are imported inside the functions that need them, so that parsing
arguments (and ``--help``) stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import warnings
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
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value  # check_overrides names the field and the expected type
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


def is_remote(text: str) -> bool:
    """A URL or a Hugging Face hub id: fetched, not looked up on disk."""
    from flashdino.loading.sources import is_hub_id, is_url

    return is_url(text) or (is_hub_id(text) and not looks_like_path(text))


def looks_like_path(text: str) -> bool:
    """True for things that can only be files (a hub id "org/name" or a URL is not one)."""
    if text.startswith(("http://", "https://")):
        return False
    return text.startswith(("/", ".", "~")) or text.endswith((".pth", ".pt", ".safetensors", ".bin")) \
        or text.count("/") > 1 or (os.sep != "/" and os.sep in text)


def check_source(text: str, flag: str) -> None:
    """A clear error for a local weights path that does not exist (before any model is built)."""
    if not is_remote(text) and not Path(text).expanduser().exists() and looks_like_path(text):
        raise CliError(f"{flag}: no such file or folder: {text}")


def carries_config(text: str) -> bool:
    """True when weights bring their own architecture: an HF folder or hub id, or a converted flashdino file."""
    from flashdino.loading.sources import is_hub_id

    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return True
        files = list(path.glob("*.safetensors"))
        return len(files) == 1 and carries_config(str(files[0]))
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:  # not a safetensors file: the loader names what it is
            return False
        return meta.get("format") == "flashdino" and "config" in meta
    return is_hub_id(text)


def cli_errors(func):
    """Runs ``func`` turning checkpoint errors into CLI errors with command-line advice."""
    from flashdino.loading import CheckpointError

    def run(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CheckpointError as exc:
            raise CliError(exc.cli_message()) from None
    return run


def resolve_model(name: str) -> str:
    """The variant name of ``--model NAME`` (a name or alias); an unknown one is a CliError with suggestions."""
    from flashdino.variants import resolve_name

    try:
        return resolve_name(name)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def check_model_args(args) -> tuple:
    """(variant name, overrides) of ``--model`` / ``--override``, and a local ``--weights`` path that exists.

    A command calls this before it looks at its output paths, so that a misspelt model is reported
    first (and not hidden behind "--out already exists"). Nothing is imported beyond the variant table.
    """
    name = resolve_model(getattr(args, "model", None) or DEFAULT_MODEL)
    overrides = parse_overrides(args.override)
    check_overrides(name, overrides)
    if args.weights is not None:
        check_source(str(args.weights), "--weights")
    return name, overrides


def build_model(args):
    """(model, path of the weights folder's preprocessor_config.json or None).

    Weights that carry their own configuration (``flashdino convert`` output, an HF folder or hub
    id) give the architecture, as ``flashdino.from_pretrained`` does; ``--model`` then only has to
    be given to insist on a variant (the configuration must then agree with it).
    """
    import flashdino

    requested = getattr(args, "model", None)
    name, overrides = check_model_args(args)
    if args.weights is None:
        made = "the exported model's outputs are" if getattr(args, "command", None) == "export" else "the features are"
        print(f"flashdino: notice: no --weights given: {name} uses RANDOM weights, so {made} meaningless (fine for "
              "a smoke test). Pass --weights CHECKPOINT|HF_FOLDER|HUB_ID for real weights.", file=sys.stderr)
        with warnings.catch_warnings():  # the notice above says it once, in CLI words
            warnings.simplefilter("ignore", flashdino.RandomWeightsWarning)
            return flashdino.create_model(name, **overrides), None
    weights = str(args.weights)
    w = Path(weights).expanduser()
    pre_cfg = w / "preprocessor_config.json" if w.is_dir() and (w / "preprocessor_config.json").is_file() else None
    if carries_config(weights) and (requested is None or name == DEFAULT_MODEL):
        model = cli_errors(flashdino.from_pretrained)(weights, **overrides)
        if requested is not None and model.cfg.name != name:
            print(f"flashdino: notice: {weights} holds a {model.cfg.name} model (its stored configuration); "
                  f"using it instead of the default --model {name}", file=sys.stderr)
        return model, pre_cfg
    return cli_errors(flashdino.create_model)(name, weights=weights, **overrides), pre_cfg


def check_overrides(name: str, overrides: dict) -> None:
    from flashdino.variants import VitConfig, check_field, get_config

    fields = sorted({f.name for f in dataclasses.fields(VitConfig)} - {"name", "family", "weights"})
    for key, value in overrides.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise CliError(f"--override {key}: unknown configuration field{hint} (fields: {', '.join(fields)})")
        try:
            check_field("--override", key, value)
        except ValueError as exc:
            raise CliError(f"--override {key}={value}: {_field_problem(exc)}") from None
    try:
        get_config(name, **overrides)
    except (TypeError, ValueError) as exc:
        raise CliError(f"--override: {exc}") from None


def _field_problem(exc: Exception) -> str:
    text = str(exc)
    return text.split(": ", 1)[1] if ": " in text else text
