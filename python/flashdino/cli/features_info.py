"""``flashdino features-info DIR|FILE.safetensors``: what a features folder (finished or not) or file holds."""

from __future__ import annotations

import json
from pathlib import Path

from ._common import CliError


def folder_info(folder, *, verify: bool = False) -> dict:
    """Counts, model and settings of a features folder; from its shards when the run has not finished."""
    from flashdino.extract import writer

    folder = Path(folder)
    if not folder.is_dir():
        raise CliError(f"no such folder or features file: {folder}")
    settings = writer.read_settings(folder)
    num_shards = -(-settings["num_images"] // settings["shard_size"])
    if settings["format"] == writer.FORMAT:  # sizes, headers and row counts against the check records
        done = [k for k in range(num_shards) if writer.shard_done(folder, k)]
    else:  # an older folder, without check records
        done = [k for k in range(num_shards) if writer.shard_path(folder, k).is_file()]
    finished = (folder / writer.MANIFEST).is_file() and len(done) == num_shards
    if finished:
        with open(folder / writer.MANIFEST, encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
    else:
        records = [r for k in done for r in writer.shard_records(writer.shard_path(folder, k))]
    failed = [(r["id"], r["error"]) for r in records if r.get("error") is not None]
    damaged = []
    if verify:
        from flashdino.extract import shardfile

        for k in range(num_shards):
            if writer.shard_path(folder, k).exists():
                why = shardfile.verify(folder, k)
                if why:
                    damaged.append({"shard": k, "reason": why})
    return {
        "damaged": damaged,
        "nonfinite": sum(bool(r.get("nonfinite")) for r in records),
        "folder": str(folder), "finished": finished, "images": settings["num_images"],
        "processed": len(records), "good": len(records) - len(failed), "failed": len(failed),
        "shards_done": len(done), "shards": num_shards, "model": settings["model"], "weights": settings["weights"],
        "settings": {k: settings[k] for k in ("store", "patch_dtype", "layers", "dtype", "shard_size", "max_pixels")},
        "preprocess": {k: settings["preprocess"].get(k) for k in ("size", "resample", "image_mean", "image_std")},
        "failures": [{"id": i, "reason": r} for i, r in failed],
    }


def file_info(path) -> dict:
    """Model, images and tensors of a single features file (``--out FILE.safetensors``)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            shapes = {n: list(f.get_slice(n).get_shape()) for n in f.keys()}
    except Exception as exc:  # noqa: BLE001 - not safetensors, truncated: one line naming the file
        raise CliError(f"{path}: not a readable .safetensors file ({exc.__class__.__name__}: {exc})") from None
    if meta.get("format") != "flashdino.features/1":
        raise CliError(f"{path} is not a features file written by flashdino features (format "
                       f"{meta.get('format')!r}); for a checkpoint use flashdino info")
    try:
        files = json.loads(meta.get("files", "[]"))
        nonfinite = json.loads(meta.get("nonfinite", "[]"))
    except ValueError as exc:
        raise CliError(f"{path}: damaged metadata ({exc})") from None
    return {"file": str(path), "images": len(files), "model": meta.get("model"), "weights": meta.get("weights"),
            "store": meta.get("store"), "layers": meta.get("layers"), "nonfinite": len(nonfinite),
            "tensors": shapes, "ids": files}


def _run_file(args) -> int:
    info = file_info(args.folder)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{info['file']}: {info['images']} images, model {info['model']}, weights: {info['weights']}")
    print(f"  store: {info['store']}, layers: {info['layers']}")
    shown = list(info["tensors"].items())
    for name, shape in shown[: None if args.all else 12]:
        print(f"  {name}: {shape}")
    if not args.all and len(shown) > 12:
        print(f"  ... {len(shown) - 12} more tensors (--all lists them)")
    if info["nonfinite"]:
        print(f"  WARNING: {info['nonfinite']} images have non-finite features (metadata key nonfinite)")
    return 0


def run(args) -> int:
    if Path(args.folder).is_file():
        return _run_file(args)
    info = folder_info(args.folder, verify=args.verify)
    if args.json:
        print(json.dumps(info, indent=1))
        return 1 if info["damaged"] else 0
    state = "finished" if info["finished"] else (f"NOT finished ({info['shards_done']} of {info['shards']} shards; "
                                                 "rerun the same features command to complete it)")
    print(f"{info['folder']}: {state}")
    print(f"  images: {info['images']} in the inputs, {info['processed']} processed, {info['good']} with features, "
          f"{info['failed']} failed")
    if info["nonfinite"]:
        print(f"  WARNING: {info['nonfinite']} images have non-finite features (NaN or inf; records with nonfinite)")
    print(f"  model: {info['model']}, weights: {info['weights']}")
    s, p = info["settings"], info["preprocess"]
    print(f"  store: {','.join(s['store'])} (patch {s['patch_dtype']}), layers: {s['layers'] or 'last only'}, "
          f"model dtype: {s['dtype']}, shard size: {s['shard_size']}")
    print(f"  preprocess: size {p['size']}, resample {p['resample']}, mean {p['image_mean']}, std {p['image_std']}")
    for d in info["damaged"]:
        print(f"  DAMAGED shard {d['shard']}: {d['reason']} (rerun the features command: it redoes damaged shards)")
    if args.verify and not info["damaged"]:
        print("  verified: every finished shard matches its checksum")
    shown = info["failures"] if args.all else info["failures"][:20]
    if shown:
        print("  failures:")
        for f in shown:
            print(f"    {f['id']}: {f['reason']}")
        if len(shown) < len(info["failures"]):
            print(f"    ... {len(info['failures']) - len(shown)} more (--all lists them)")
    return 1 if info["damaged"] else 0


def add_parser(sub) -> None:
    f = sub.add_parser("features-info", help="counts, model, settings and failures of a features folder or file",
                       description="Describe a folder (flashdino features --out DIR) or a file "
                                   "(--out FILE.safetensors) written by flashdino features.")
    f.add_argument("folder", metavar="DIR_OR_FILE")
    f.add_argument("--all", action="store_true", help="list every failure (default: the first 20)")
    f.add_argument("--json", action="store_true", help="machine-readable output")
    f.add_argument("--verify", action="store_true",
                   help="also check every shard's checksum (reads the whole folder); exit 1 if one is damaged")
    f.set_defaults(func=run)
