"""``flashdino features-info DIR``: what a features folder holds (finished or not)."""

from __future__ import annotations

import json
from pathlib import Path

from ._common import CliError


def folder_info(folder) -> dict:
    """Counts, model and settings of a features folder; from its shards when the run has not finished."""
    from flashdino.extract import writer

    folder = Path(folder)
    if not folder.is_dir():
        raise CliError(f"no such folder: {folder}")
    settings = writer.read_settings(folder)
    num_shards = -(-settings["num_images"] // settings["shard_size"])
    done = [k for k in range(num_shards) if writer.shard_done(folder, k)]
    finished = (folder / writer.MANIFEST).is_file() and len(done) == num_shards
    if finished:
        with open(folder / writer.MANIFEST, encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh if line.strip()]
    else:
        records = [r for k in done for r in writer.shard_records(writer.shard_path(folder, k))]
    failed = [(r["id"], r["error"]) for r in records if r.get("error") is not None]
    return {
        "folder": str(folder), "finished": finished, "images": settings["num_images"],
        "processed": len(records), "good": len(records) - len(failed), "failed": len(failed),
        "shards_done": len(done), "shards": num_shards, "model": settings["model"], "weights": settings["weights"],
        "settings": {k: settings[k] for k in ("store", "patch_dtype", "layers", "dtype", "shard_size", "max_pixels")},
        "preprocess": {k: settings["preprocess"].get(k) for k in ("size", "resample", "image_mean", "image_std")},
        "failures": [{"id": i, "reason": r} for i, r in failed],
    }


def run(args) -> int:
    info = folder_info(args.folder)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    state = "finished" if info["finished"] else (f"NOT finished ({info['shards_done']} of {info['shards']} shards; "
                                                 "rerun the same features command to complete it)")
    print(f"{info['folder']}: {state}")
    print(f"  images: {info['images']} in the inputs, {info['processed']} processed, {info['good']} with features, "
          f"{info['failed']} failed")
    print(f"  model: {info['model']}, weights: {info['weights']}")
    s, p = info["settings"], info["preprocess"]
    print(f"  store: {','.join(s['store'])} (patch {s['patch_dtype']}), layers: {s['layers'] or 'last only'}, "
          f"model dtype: {s['dtype']}, shard size: {s['shard_size']}")
    print(f"  preprocess: size {p['size']}, resample {p['resample']}, mean {p['image_mean']}, std {p['image_std']}")
    shown = info["failures"] if args.all else info["failures"][:20]
    if shown:
        print("  failures:")
        for f in shown:
            print(f"    {f['id']}: {f['reason']}")
        if len(shown) < len(info["failures"]):
            print(f"    ... {len(info['failures']) - len(shown)} more (--all lists them)")
    return 0


def add_parser(sub) -> None:
    f = sub.add_parser("features-info", help="counts, model, settings and failures of a features folder",
                       description="Describe a folder written by flashdino features --out DIR.")
    f.add_argument("folder", metavar="DIR")
    f.add_argument("--all", action="store_true", help="list every failure (default: the first 20)")
    f.add_argument("--json", action="store_true", help="machine-readable output")
    f.set_defaults(func=run)
