"""``flashdino features``: CLS / patch features of images, into one file or streamed into a folder.

    --out feats.safetensors   small jobs: everything in memory, one file at the end; any unreadable
                              image is an error
    --out feats/              data sets: shards streamed as they finish, resumable, bad images
                              recorded and skipped, any number of ranks under torchrun
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from ._common import DEFAULT_MODEL, CliError, build_model, check_model_args, parse_size
from .features_info import add_parser as add_info_parser  # noqa: F401 - registered by cli.build_parser
from .pca import PCA_MAX_IMAGES, PCA_SUFFIXES, render_pca, written_by_pca

# The OpenVINO export of a ViT-S/16 takes ~25-50 s on a 2-core CPU and saves ~0.1-0.3 s per image
# there: jobs this small on a cold cache run oneDNN instead (tests, quick tries stay quick).
EXPORT_MIN_IMAGES = 64

# single-file tensor names (kept from the first file format) for the pipeline's row names
_FILE_NAMES = {"cls": "cls", "patch": "patch_tokens", "pooled": "pooled", "storage": "storage_tokens"}


def collect_images(inputs) -> list[Path]:
    """Image files of the inputs (files, folders searched recursively, sorted), as paths."""
    from flashdino.extract.inputs import collect_items

    return [Path(it.path) for it in collect_items(inputs) if not it.in_tar]


def _is_file_output(out: str) -> bool:
    p = Path(out)
    if out.endswith(("/", "\\")) or os.path.isdir(p):  # os.path: a name too long is not a folder, not an error
        return False
    if p.suffix == ".safetensors":
        return True
    if p.suffix:
        raise CliError(f"--out must end in .safetensors (one file) or name a folder (for shards), got {out}; "
                       "end it with / to use a folder name with a dot")
    return False


FILE_FORMAT = "flashdino.features/1"  # the format marker of a single features file


def _own_features_file(path: Path) -> bool:
    """True for a file ``features --out FILE.safetensors`` wrote (by its format marker)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("format") == FILE_FORMAT
    except Exception:  # noqa: BLE001 - unreadable or not safetensors: not ours
        return False


def _parse_list(text: str, allowed, flag: str) -> tuple:
    items = tuple(t.strip() for t in str(text).split(",") if t.strip())
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise CliError(f"{flag}: unknown value(s) {bad or [text]}; choose from {', '.join(allowed)}")
    return tuple(dict.fromkeys(items))


def _options(args, workers: int):
    from flashdino.extract.runner import STORE_KEYS, ExtractOptions, parse_max_failures

    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.shard_size < 1:
        raise CliError(f"--shard-size must be >= 1, got {args.shard_size}")
    if args.workers is not None and args.workers < 0:
        raise CliError(f"--workers must be >= 0, got {args.workers}")
    if args.max_pixels is not None and args.max_pixels < 1:
        raise CliError(f"--max-pixels must be >= 1, got {args.max_pixels}")
    if args.max_source_pixels is not None and args.max_source_pixels < 1:
        raise CliError(f"--max-source-pixels must be >= 1, got {args.max_source_pixels}")
    if not args.decode_timeout > 0:
        raise CliError(f"--decode-timeout must be a number of seconds > 0, got {args.decode_timeout}")
    parse_max_failures(args.max_failures)
    layers = ()
    if args.layers:
        try:
            layers = tuple(sorted({int(v) for v in args.layers.split(",") if v.strip()}))
        except ValueError:
            raise CliError(f"--layers expects block indices like 3,7,11; got {args.layers!r}") from None
    from flashdino.extract.dataset import DEFAULT_MAX_PIXELS, DEFAULT_MAX_SOURCE_PIXELS

    return ExtractOptions(store=_parse_list(args.store, STORE_KEYS, "--store"), patch_dtype=args.patch_dtype,
                          layers=layers, shard_size=args.shard_size, batch_size=args.batch_size, workers=workers,
                          dtype=args.dtype, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
                          max_source_pixels=args.max_source_pixels or DEFAULT_MAX_SOURCE_PIXELS,
                          verify_checksums=not args.skip_checksums, decode_timeout=args.decode_timeout,
                          max_failures=args.max_failures, overwrite=args.overwrite, quiet=args.quiet)


def _notice_parents(path: Path, what: str) -> None:
    from flashdino.outputs import missing_parents

    created = missing_parents(path)
    if created:
        print(f"flashdino: notice: creating folder {created[-1]} for {what}", file=sys.stderr)


def _build(args, device: str):
    """(model, preprocessor) as the CLI always built them; random weights are seeded for every rank alike."""
    import torch

    from flashdino.preprocess import Preprocessor

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model, pre_cfg = build_model(args)
    # float32 still: a CPU runtime takes the float32 weights at any --dtype (_to_dtype after _runtime)
    model = model.to(device).eval().requires_grad_(False)
    P = model.patch_size
    if pre_cfg is None and isinstance(getattr(model, "preprocessor_config", None), dict):
        pre_cfg = model.preprocessor_config  # set by the loaders for HF folders / hub ids
    if pre_cfg is not None and args.size is None:
        pre = Preprocessor.from_preprocessor_config(pre_cfg, patch_size=P,
                                                    origin=f"{args.weights}: preprocessor_config.json")
    else:
        size = 224 if args.size is None else (None if args.size == "native" else args.size)
        pre = Preprocessor.from_variant(model.cfg, size=size)
    return model, pre


def _to_dtype(model, dtype: str):
    """The eager model in ``--dtype`` (a CPU runtime instead runs the float32 model at its precision)."""
    from flashdino.extract.runner import PATCH_DTYPES

    return model if dtype == "float32" else model.to(PATCH_DTYPES[dtype])


def _check_model_options(model, pre, opts) -> None:
    depth = len(model.blocks)
    bad = [L for L in opts.layers if not 0 <= L < depth]
    if bad:
        raise CliError(f"--layers {bad}: {model.cfg.name} has blocks 0..{depth - 1}")
    fixed = pre.fixed_output_size is not None  # a fixed --size: every input comes out alike
    h, w = pre.fixed_output_size or (0, 0)
    P = model.patch_size
    if fixed and (h < P or w < P):
        raise CliError(f"--size gives {w}x{h} pixels, less than one {P}x{P} patch of {model.cfg.name}; "
                       f"use --size {P} or more (e.g. 224)")
    max_pixels = opts.max_pixels
    if fixed and h * w > max_pixels:
        raise CliError(f"--size gives {w}x{h} = {h * w} pixels per image, over --max-pixels {max_pixels}; "
                       "raise --max-pixels if that is intended")


def run(args) -> int:
    from flashdino.extract.dataset import default_workers
    from flashdino.extract.inputs import Item, collect_items
    from flashdino.extract.runner import ExtractionStopped, init_distributed
    from flashdino.outputs import check_output_path

    inputs = list(args.inputs or [])
    if args.sample:
        from flashdino.assets import sample_image_path

        inputs.insert(0, str(sample_image_path()))
    if not inputs and not args.list:
        raise CliError("no input images: pass image files, folders or .tar shards, --list FILE, or --sample for "
                       "the packaged sample image")
    args.device = resolve_device(args.device)
    if args.pca and Path(args.pca).suffix.lower() not in PCA_SUFFIXES:
        raise CliError(f"--pca must name an image file (.png, .jpg, ...), got {args.pca}")
    from flashdino.env import env_int

    local_world = env_int("LOCAL_WORLD_SIZE", 1, minimum=1)
    opts = _options(args, default_workers(local_world) if args.workers is None else args.workers)
    if args.pca and "patch" not in opts.store:
        raise CliError("--pca needs the patch tokens: add patch to --store")
    items: list[Item] = collect_items(inputs, args.list)
    check_model_args(args)  # a misspelt --model or --override is reported before "--out exists"
    to_file = _is_file_output(args.out)
    out = Path(args.out)
    weights_input = [args.weights] if args.weights and Path(args.weights).exists() else []
    # every output location is checked before the model is loaded or any image decoded
    sources = inputs + ([args.list] if args.list else [])
    every_input = weights_input + sources + sorted({it.path for it in items})
    if to_file:
        if env_int("WORLD_SIZE", 1, minimum=1) > 1:
            raise CliError("a single .safetensors --out is for one process; under torchrun give --out a folder")
        check_output_path(out, overwrite=args.overwrite, inputs=every_input, what="--out")
        if (out.exists() or out.is_symlink()) and not _own_features_file(out):
            raise CliError(f"--out {out} exists and is not a features file written by flashdino (no "
                           f"{FILE_FORMAT} marker); flashdino never replaces it, --overwrite included: choose another "
                           "path or remove it yourself")
        _notice_parents(out, f"--out {out.name}")
    else:
        from flashdino.extract.writer import check_out_dir

        check_out_dir(out, inputs=weights_input + sources)
        if not out.exists() and env_int("RANK", 0, minimum=0) == 0:
            _notice_parents(out / "settings.json", "the --out folder")
    if args.pca:
        check_output_path(args.pca, overwrite=args.overwrite, inputs=every_input + [args.out], what="--pca")
        if (Path(args.pca).exists() or Path(args.pca).is_symlink()) and not written_by_pca(args.pca):
            raise CliError(f"--pca {args.pca} exists and is not a PCA picture flashdino wrote; flashdino never "
                           "replaces it, --overwrite included: choose another path or remove it yourself")

    dist_info = init_distributed(args.device) if not to_file else None
    device = dist_info.device if dist_info else args.device
    try:
        model, pre = _build(args, device)
        _check_model_options(model, pre, opts)
        fast = _runtime(model, args, opts, device, len(items))
        if fast is None:
            model = _to_dtype(model, opts.dtype)
        fns = {"forward_features": fast.forward_features if fast else None,
               "intermediate_layers": fast.get_intermediate_layers if fast and opts.layers else None,
               "prepare": fast.prepare if fast else None}
        if to_file:
            rows = _extract_in_memory(model, pre, items, opts, device, **fns)
            _write_file(out, items, rows, model, args, opts)
            shown = [(i, rows[i]) for i in range(min(len(items), PCA_MAX_IMAGES))]
        else:
            from flashdino.extract.runner import extract_to_dir, summary_line

            if args.weights:  # a local file is named absolutely: a rerun from another folder is the same run
                label = str(Path(args.weights).resolve()) if Path(args.weights).exists() else str(args.weights)
            else:
                label = f"random (seed {args.seed})"
            try:
                summary = extract_to_dir(model, pre, items, out, opts, dist_info, weights_label=label,
                                         sources=sources, **fns)
            except ExtractionStopped as exc:
                raise CliError(str(exc)) from None
            except BaseException as exc:
                if not isinstance(exc, Exception):  # Ctrl-C, SIGTERM: cli.main prints this hint
                    exc.flashdino_hint = (f"the shard in progress was discarded, the finished shards in {out} were "
                                          "kept: rerun the same command to resume")
                raise
            if dist_info.rank != 0:
                return 0
            print(summary_line(summary))
            print(f"wrote {out}: {summary['total_good']} images, {summary['total_failed']} failed "
                  f"(read it with flashdino.read_features({str(out)!r}); flashdino features-info {out})")
            _warn_nonfinite(summary.get("total_nonfinite", 0), f"their records in {out}/manifest.jsonl say "
                            f"nonfinite: true (flashdino features-info {out} lists them)")
            if summary["total_good"] == 0:
                raise CliError(f"none of the {summary['total_failed']} images gave features (all failed); see why "
                               f"with: flashdino features-info {out}")
            shown = _rows_from_folder(out, items) if args.pca else []
        if args.pca and shown:
            _render(args.pca, pre, items, shown)
    finally:
        if dist_info is not None:
            dist_info.close()
    return 0


def _warn_nonfinite(n: int, where: str) -> None:
    if n:
        print(f"flashdino: warning: {n} images have non-finite features (NaN or inf): the weights or those images are "
              f"broken; {where}", file=sys.stderr)


def resolve_device(device: str) -> str:
    """``--device``: "auto" is CUDA when available (under torchrun ``cuda``, which each rank turns
    into ``cuda:LOCAL_RANK``; a single process with LOCAL_RANK set takes that GPU), else the CPU."""
    import torch

    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        from flashdino.env import env_int

        if env_int("WORLD_SIZE", 1, minimum=1) > 1 or "LOCAL_RANK" not in os.environ:
            return "cuda"
        return f"cuda:{env_int('LOCAL_RANK', 0, minimum=0)}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {device} requested but CUDA is not available; use --device cpu (or auto)")
    return device


def _runtime(model, args, opts, device: str, n_images: int):
    """``flashdino.optimize(model, runtime)`` for ``--runtime``, or None for the model itself (eager).

    ``auto`` (the default): on a CPU with float32, the fastest installed fp32 runtime (OpenVINO with
    the [openvino] extra, else oneDNN matrix products, which need nothing extra); elsewhere eager,
    where flashdino's own kernels are the fast path. A runtime that needs an ONNX export (once per
    weights, cached) is used for a job of fewer than EXPORT_MIN_IMAGES images only when the export
    is already cached: a first small job would spend longer exporting than the export saves it.
    The runtimes give flashdino's numbers to ~1e-6 (tests/test_features_defaults.py,
    tests/test_export.py), so the choice is not part of a folder's settings (a run may resume with
    another runtime).

    ``--dtype bfloat16`` on a CPU (opt-in reduced precision, recorded in a folder's settings):
    ``auto`` and ``openvino`` compile the float32 export with OpenVINO's bf16 hint (bf16 matrix
    products on AMX / AVX512-BF16 with f32 accumulation; the same export as float32), else the
    eager model in bfloat16. Both are bf16-accurate, not equal to each other.
    """
    runtime = args.runtime
    cpu = str(device).startswith("cpu")
    precision = {"float32": "fp32", "bfloat16": "bf16"}.get(opts.dtype)
    if runtime == "eager" or (runtime == "auto" and (not cpu or precision is None)):
        return None
    if not cpu:
        raise CliError(f"--runtime {runtime} is for CPU inference; on {device} leave --runtime auto or eager")
    if precision is None or (precision == "bf16" and runtime not in ("auto", "openvino")):
        raise CliError(f"--runtime {runtime} does not run --dtype {opts.dtype}; use --runtime eager"
                       + (" or openvino (bf16 matrix products)" if precision == "bf16" else "")
                       + " (or drop --dtype: float32 is the default)")
    import time

    from flashdino.deploy import choose_runtime, installed_runtimes, optimize
    from flashdino.deploy.optimized import is_cached, needs_export

    # run_model reads the final block through get_intermediate_layers too when --layers is given
    layers = tuple(sorted(set(opts.layers) | {len(model.blocks) - 1})) if opts.layers else ()

    if runtime == "auto":
        runtime = choose_runtime() if precision == "fp32" else "openvino"
        if precision == "bf16" and runtime not in installed_runtimes():
            return None
        if needs_export(runtime) and n_images < EXPORT_MIN_IMAGES and not is_cached(model, runtime, layers=layers):
            if precision == "bf16":
                return None
            runtime = "onednn" if "onednn" in installed_runtimes() else "eager"
        if runtime == "eager":
            return None
    t0 = time.perf_counter()
    try:
        fast = optimize(model, runtime=runtime, layers=layers, precision=precision)
    except Exception as exc:  # noqa: BLE001 - auto must still extract: oneDNN needs no export and no extra
        if args.runtime != "auto" or runtime == "onednn":
            raise
        fallback = "onednn" if "onednn" in installed_runtimes() and precision == "fp32" else "eager"
        print(f"flashdino: notice: runtime {runtime} could not be prepared ({type(exc).__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else ''}); using {fallback}", file=sys.stderr)
        if fallback == "eager":
            return None
        fast = optimize(model, runtime=fallback, layers=layers)
    seconds = time.perf_counter() - t0
    if fast.cache_entry is not None and not fast.cache_entry.hit and not opts.quiet:
        print(f"flashdino: notice: runtime {fast.runtime}: exported these weights in {seconds:.0f} s, once (cached in "
              f"{fast.cache_entry.folder.parent}: later runs start at once; --runtime eager skips it)", file=sys.stderr)
    return fast


def _extract_in_memory(model, pre, items, opts, device, forward_features=None, intermediate_layers=None,
                       prepare=None) -> list:
    from flashdino.extract.dataset import ImageDataset
    from flashdino.extract.runner import Timings, iterate, shard_batches

    dataset = ImageDataset(items, pre, max_pixels=opts.max_pixels, max_source_pixels=opts.max_source_pixels)
    rows: list = [None] * len(items)
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc=f"features ({model.cfg.name})", unit="img", disable=opts.quiet, file=sys.stderr,
               mininterval=0.1 if sys.stderr.isatty() else 30)  # a log file gets a line per 30 s, not per batch
    try:
        for batch, got, failures in iterate(model, dataset, shard_batches(0, len(items), opts.batch_size), opts,
                                            device, Timings(), forward_features=forward_features,
                                            intermediate_layers=intermediate_layers, prepare=prepare):
            if failures:
                i, reason = failures[0]
                raise CliError(f"cannot read image {items[i].id}: {reason} (a folder --out records bad images "
                               "and goes on)")
            for i, row in got.items():
                rows[i] = row
            bar.update(len(batch))
    finally:
        bar.close()
    return rows


def _write_file(out: Path, items, rows, model, args, opts) -> None:
    import torch

    from flashdino.outputs import atomic_write

    grids = [tuple(r["grid"]) for r in rows]
    tensors = {}
    for name in rows[0]:
        if name in ("grid", "size", "nonfinite"):
            continue
        prefix, _, base = name.rpartition(".")
        fname = (prefix + "." if prefix else "") + _FILE_NAMES[base]
        if base == "patch" and len(set(grids)) > 1:
            for i, r in enumerate(rows):
                tensors[f"{fname}.{i}"] = r[name].contiguous()
        else:
            tensors[fname] = torch.stack([r[name] for r in rows]).contiguous()
    metadata = {
        "files": json.dumps([it.id for it in items]),
        "grids": json.dumps([list(g) for g in grids]),
        "sizes": json.dumps([list(r["size"]) for r in rows]),
        "model": model.cfg.name,
        "weights": str(args.weights) if args.weights else "random",
        "seed": str(args.seed),
        "patch_size": str(model.patch_size),
        "store": ",".join(opts.store),
        "layers": json.dumps(list(opts.layers)),
        "format": FILE_FORMAT,
    }
    nonfinite = [it.id for it, r in zip(items, rows) if r.get("nonfinite")]
    if nonfinite:
        metadata["nonfinite"] = json.dumps(nonfinite)
    from flashdino.extract.shardfile import write_safetensors
    from flashdino.extract.writer import filesystem_errors

    # ordinary writes: a full disk is an OSError reported in one line
    with filesystem_errors(out), atomic_write(out, overwrite=args.overwrite) as tmp, open(tmp, "wb") as fh:
        write_safetensors(fh, tensors, metadata)
    _warn_nonfinite(len(nonfinite), "the file's metadata key nonfinite lists them")
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in list(tensors.items())[:4])
    more = f", ... ({len(tensors)} tensors: grids differ: {sorted(set(grids))})" if len(tensors) > 4 else ""
    print(f"wrote {out}: {shapes}{more}")


def _rows_from_folder(out: Path, items) -> list:
    from flashdino.extract.reader import read_features

    fs = read_features(out)
    pos = {it.id: i for i, it in enumerate(items)}
    return [(pos[fs.ids[j]], {"patch": fs.patch(j), "grid": fs.grid(j)}) for j in range(min(len(fs), PCA_MAX_IMAGES))]


def _render(path, pre, items, shown) -> None:
    """The PCA picture of the first images: decoded again (cheap for 8) and shown as the model saw them."""
    from flashdino.extract.dataset import ImageDataset

    ds = ImageDataset(items, pre, max_pixels=None)
    images = [pre.denormalize(pre(ds.load(i)[0]))[0] for i, _ in shown]
    written = render_pca(images, [r["patch"].float() for _, r in shown], [tuple(r["grid"]) for _, r in shown], path)
    print(f"wrote {written}: PCA of the patch features (first 3 components as RGB)")


def add_parser(sub) -> None:
    f = sub.add_parser(
        "features", help="extract CLS / patch features of images (one file, or shards in a folder)",
        description="Extract features of images (files, folders, .tar shards, --list) into one .safetensors "
                    "file or, for data sets, into a folder of shards (resumable; torchrun for many GPUs).")
    f.add_argument("inputs", nargs="*", metavar="IMAGES_FOLDERS_OR_TARS")
    f.add_argument("--list", default=None, metavar="FILE",
                   help="text file (one path per line, optional TAB id) or CSV (path[,id]) of images")
    f.add_argument("--sample", action="store_true", help="add the packaged sample image to the inputs")
    f.add_argument("--model", default=DEFAULT_MODEL, help=f"variant name or alias (default {DEFAULT_MODEL})")
    f.add_argument("--weights", default=None, help="checkpoint file, Hugging Face folder or hub id (default: random)")
    f.add_argument("--seed", type=int, default=0, help="seed of random weights (without --weights; default 0)")
    f.add_argument("--out", default="features.safetensors",
                   help="FILE.safetensors (small jobs, all in memory) or a FOLDER (shards streamed, resumable); "
                        "default features.safetensors")
    f.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out file / a folder made with other settings")
    f.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    f.add_argument("--workers", type=int, default=None,
                   help="DataLoader processes decoding images (default: from the CPU count, up to 8; 0 = in the "
                        "main process)")
    f.add_argument("--shard-size", type=int, default=1000, help="images per shard with a folder --out (default 1000)")
    f.add_argument("--store", default="cls,patch",
                   help="what to keep, comma-separated from cls, pooled (mean patch token), patch, storage "
                        "(register tokens); default cls,patch")
    f.add_argument("--patch-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of stored patch tokens (default float32; float16 halves the disk)")
    f.add_argument("--layers", default=None, metavar="I,J,...",
                   help="also store these intermediate blocks (0-based), as layer<I>.cls / layer<I>.patch ...")
    f.add_argument("--max-failures", default=None, metavar="N|P%",
                   help="stop when more than N images (or P%% of those processed) failed; default: never")
    f.add_argument("--max-pixels", type=int, default=None,
                   help="refuse images whose processed size exceeds this many pixels (default 2048*2048; "
                        "matters with --size 0)")
    f.add_argument("--max-source-pixels", type=int, default=None,
                   help="refuse source images over this many pixels before decoding them, at any --size "
                        "(default 2**27, about 134 M)")
    f.add_argument("--decode-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="with --workers: a batch not decoded within this time is redone image by image, and an image "
                        "that stalls again is recorded as failed (default 600.0)")
    f.add_argument("--skip-checksums", action="store_true",
                   help="on resume, check finished shards' sizes, headers and records but not their checksums "
                        "(faster for huge folders; default: verify every checksum)")
    f.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto: CUDA when "
                                                    "available, else cpu; under torchrun cuda means cuda:LOCAL_RANK)")
    f.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="precision the model runs in (default float32). bfloat16: on GPUs that have it; on a CPU, "
                        "OpenVINO's bf16 (AMX / AVX512-BF16) with the [openvino] extra, else eager bf16: "
                        "faster, not equal to float32")
    f.add_argument("--runtime", default="auto", choices=["auto", "eager", "openvino", "onnxruntime", "inductor", "onednn"],
                   help="CPU runtime (flashdino.optimize), same numbers to ~1e-6: default auto = the fastest installed "
                        "(OpenVINO with the [openvino] extra, else oneDNN; eager PyTorch on GPUs); eager = plain "
                        "PyTorch")
    f.add_argument("--size", type=parse_size, default=None,
                   help="resize to SIZE x SIZE or HxW; 0 keeps each image's size (cropped to a patch multiple). "
                        "Default: the weights folder's preprocessor_config.json, else 224")
    f.add_argument("--pca", default=None, metavar="OUT.png",
                   help="also render a PCA visualisation of the patch features")
    f.add_argument("--override", action="append", metavar="KEY=VALUE",
                   help="architecture override, repeatable (e.g. --override depth=2)")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=run)
