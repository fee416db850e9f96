"""The extraction loop: shards, resume, ranks, progress, failure limits.

Work division: shard k holds images [k*S, (k+1)*S) of the input order, whatever the number of
ranks, and rank r takes the shards with k % world_size == r. So shards, manifest and features are
the same for one process and for any number of ranks, and a rerun (even with another number of
ranks) skips exactly the shards already committed.

Ranks meet once per shard round in an ``all_reduce`` of their counts (images, failures, seconds):
that gives rank 0's progress bar the global images/s and lets every rank stop together when
``--max-failures`` is exceeded, without any side channel. Decoding workers keep prefetching while
a rank waits there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..env import torchrun_env
from . import writer
from .dataset import (DEFAULT_DECODE_TIMEOUT, DEFAULT_MAX_SOURCE_PIXELS, ImageDataset, deadline, decode_isolated,
                      decode_jpegs_on_device, make_loader, nvjpeg_decoder, quiet_sigchld, worker_died)
from .inputs import Item, fingerprint

STORE_KEYS = ("cls", "pooled", "patch", "storage")
PATCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ExtractionStopped(RuntimeError):
    """--max-failures was exceeded; the committed shards stay and a rerun continues."""


# -- ranks ----------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: str = "cpu"
    owns_group: bool = False

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            if str(self.device).startswith("cuda"):
                dist.barrier(device_ids=[torch.device(self.device).index or 0])
            else:
                dist.barrier()

    def all_reduce(self, values: Sequence[float], op: str = "sum") -> list:
        if not self.active:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.cpu().tolist()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False


def init_distributed(device: str) -> Dist:
    """Joins the torchrun job described by the environment (RANK, WORLD_SIZE, LOCAL_RANK, ...).

    gloo on CPU, nccl on CUDA with one GPU per rank (``cuda:LOCAL_RANK``). A plain process is rank 0 of 1.
    """
    rank, world, local_rank, local_world = torchrun_env()
    cuda = str(device).startswith("cuda")
    if cuda and world > 1:
        if ":" in str(device):
            raise ValueError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda")
        n = torch.cuda.device_count()
        if local_rank >= n:
            raise ValueError(f"rank {rank} has LOCAL_RANK {local_rank} but this node has {n} GPUs; "
                             f"use --nproc_per_node={n} or fewer")
        device = f"cuda:{local_rank}"
    if cuda:
        torch.cuda.set_device(torch.device(device if ":" in str(device) else "cuda:0"))
    info = Dist(rank, world, local_rank, local_world, device)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
            info.owns_group = True
    return info


# -- settings -------------------------------------------------------------------------------------
def model_digest(model: torch.nn.Module, sample: int = 4096) -> str:
    """A digest of the weights that is cheap for 7B models: every tensor's name, shape and first values."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)[:sample].to("cpu", torch.float64)
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(flat.numpy().tobytes())
    return h.hexdigest()


@dataclass
class ExtractOptions:
    store: tuple = ("cls", "patch")
    patch_dtype: str = "float32"
    layers: tuple = ()
    shard_size: int = 1000
    batch_size: int = 32
    workers: int = 0
    dtype: str = "float32"
    max_pixels: Optional[int] = None
    max_source_pixels: Optional[int] = DEFAULT_MAX_SOURCE_PIXELS
    max_failures: Optional[str] = None
    verify_checksums: bool = True  # a resume hashes every finished shard before trusting it
    decode_timeout: float = DEFAULT_DECODE_TIMEOUT  # seconds to wait for a batch from the decoding workers
    overwrite: bool = False
    quiet: bool = False


def describe_sources(sources: Sequence[str]) -> list:
    """The inputs as given and as absolute paths: a refused resume then names the input that changed."""
    return [{"given": str(x), "absolute": os.path.abspath(os.path.expanduser(str(x)))} for x in sources]


def settings_for(model, pre, items: Sequence[Item], opts: ExtractOptions, weights_label: str,
                 sources: Sequence[str] = ()) -> dict:
    """Everything that changes the folder's contents; a rerun with other values is refused."""
    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(model.cfg).items()
           if k != "weights"}
    pre_d = {f.name: getattr(pre, f.name) for f in dataclasses.fields(pre) if f.name != "origin"}
    pre_d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in pre_d.items()}
    return {
        "format": writer.FORMAT,
        "model": model.cfg.name,
        "architecture": cfg,
        "weights": weights_label,
        "weights_digest": model_digest(model),
        "preprocess": pre_d,
        "store": list(opts.store),
        "patch_dtype": opts.patch_dtype,
        "layers": list(opts.layers),
        "dtype": opts.dtype,
        "max_pixels": opts.max_pixels,
        "max_source_pixels": opts.max_source_pixels,
        "shard_size": opts.shard_size,
        "num_images": len(items),
        "inputs": describe_sources(sources),
        "inputs_sha256": fingerprint(items),
    }


_LIBC_TRIM = None


def release_freed_memory() -> None:
    """Returns the heap's free pages to the OS (glibc only; elsewhere nothing to do).

    A shard's buffers (tens of MB of patch tokens, freed once it is written) stay in glibc's heap,
    and fragmentation there made a 2,000-image run end some 150 MB above a 200-image one; trimming
    after each shard keeps memory flat however many images a rank processes.
    """
    global _LIBC_TRIM
    if _LIBC_TRIM is None:
        try:
            import ctypes

            _LIBC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _LIBC_TRIM = False
    if _LIBC_TRIM:
        _LIBC_TRIM(0)


# -- the model step -------------------------------------------------------------------------------
def run_model(model, x: torch.Tensor, opts: ExtractOptions, forward_features: Optional[Callable] = None,
              intermediate_layers: Optional[Callable] = None) -> list[dict]:
    """Per-image dicts of CPU tensors for one equal-size batch (names as in the shards).

    ``forward_features`` / ``intermediate_layers``: other implementations of the model's
    ``forward_features`` / ``get_intermediate_layers`` (those of the object ``flashdino.optimize(model)``
    returns, for OpenVINO / ONNX Runtime / oneDNN on CPU); same outputs.
    """
    P = model.patch_size
    grid = (x.shape[-2] // P, x.shape[-1] // P)
    depth = len(model.blocks)
    outs = {}
    if opts.layers:
        wanted = sorted(set(opts.layers) | {depth - 1})
        res = (intermediate_layers or model.get_intermediate_layers)(x, n=wanted, return_class_token=True,
                                                                     return_extra_tokens=True)
        for L, (patch, cls, extra) in zip(wanted, res):
            prefix = "" if L == depth - 1 else f"layer{L}."
            outs[prefix] = (cls, extra, patch)
        for L in opts.layers:  # the last block asked for as a layer too: same tensors under both names
            if L == depth - 1:
                outs[f"layer{L}."] = outs[""]
    else:
        o = (forward_features or model.forward_features)(x)
        outs[""] = (o["x_norm_clstoken"], o[model.extra_tokens_key], o["x_norm_patchtokens"])
    pdt = PATCH_DTYPES[opts.patch_dtype]
    rows = [{"grid": grid} for _ in range(x.shape[0])]
    finite = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for cls, extra, patch in outs.values():  # the outputs themselves, before any dtype narrowing
        for t in (cls, extra, patch):
            if t is not None and t.numel():
                finite &= torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
    for row, ok in zip(rows, finite.tolist()):
        row["nonfinite"] = not ok
    for prefix, (cls, extra, patch) in outs.items():
        pooled = patch.float().mean(dim=1) if "pooled" in opts.store else None
        cls_c = cls.float().cpu() if "cls" in opts.store else None
        extra_c = extra.float().cpu() if "storage" in opts.store else None
        patch_c = patch.to(pdt).cpu() if "patch" in opts.store else None
        pooled_c = pooled.cpu() if pooled is not None else None
        for j, row in enumerate(rows):
            if cls_c is not None:
                row[prefix + "cls"] = cls_c[j]
            if pooled_c is not None:
                row[prefix + "pooled"] = pooled_c[j]
            if extra_c is not None:
                row[prefix + "storage"] = extra_c[j]
            if patch_c is not None:
                row[prefix + "patch"] = patch_c[j]
    return rows


def stack_rows(rows: list[dict], names: Sequence[str], dim: int, n_storage: int, pdt: torch.dtype) -> dict:
    """The shard tensors of its good rows (empty but well-shaped tensors for a shard of failures)."""
    out = {}
    for name in names:
        base = name.rsplit(".", 1)[-1]
        if base == "patch":
            out[name] = torch.cat([r[name] for r in rows]) if rows else torch.zeros(0, dim, dtype=pdt)
        elif rows:
            out[name] = torch.stack([r[name] for r in rows])
        else:
            out[name] = torch.zeros((0, n_storage, dim) if base == "storage" else (0, dim))
    out["grid"] = torch.tensor([list(r["grid"]) for r in rows], dtype=torch.int64).reshape(-1, 2)
    out["size"] = torch.tensor([list(r["size"]) for r in rows], dtype=torch.int64).reshape(-1, 2)
    return out


def tensor_names(opts: ExtractOptions, depth: int) -> list[str]:
    prefixes = [""] + [f"layer{L}." for L in opts.layers]
    return [p + k for p in prefixes for k in STORE_KEYS if k in opts.store]


@dataclass
class Timings:
    decode_wait: float = 0.0
    model: float = 0.0
    write: float = 0.0
    start: float = field(default_factory=time.perf_counter)


def iterate(model, dataset: ImageDataset, batches: Sequence[Sequence[int]], opts: ExtractOptions, device: str,
            timings: Timings, flush_after: Optional[Sequence[int]] = None,
            forward_features: Optional[Callable] = None, intermediate_layers: Optional[Callable] = None,
            prepare: Optional[Callable[[tuple], None]] = None):
    """Yields (batch index list, {index: row dict}, [(index, reason)]) for each of ``batches``, in order.

    Images of one processed size wait (at most 4 x batch_size images in all) for more of their size,
    so native-size inputs (``--size 0``) still run in full batches. ``flush_after``: positions in
    ``batches`` after which nothing may wait (a shard's last batch; default: the last batch). A
    batch's rows may therefore come with a later batch, never after the next flush point. With a
    fixed size every loader batch is one model batch, exactly as it was decoded.
    ``prepare(shape)``: readies a runtime for the first batch's shape (``OptimizedModel.prepare``);
    called once the decoding workers have started, so that it overlaps with their first images.
    """
    # a CPU runtime (forward_features given) takes float32 images at any --dtype: its precision is its own
    dtype = torch.float32 if forward_features is not None else PATCH_DTYPES[opts.dtype]
    flush = {len(batches) - 1} if flush_after is None else set(flush_after)
    cuda = str(device).startswith("cuda")
    # on a GPU, JPEGs are decoded there in batches (nvJPEG); workers only read headers and bytes
    gpu_decoder = nvjpeg_decoder() if cuda and dataset.fast else None
    dataset.jpegs_to_device = gpu_decoder is not None
    it = iter(make_loader(dataset, batches, workers=opts.workers, device=device))
    if opts.workers > 0:
        quiet_sigchld()
    if prepare is not None and opts.workers > 0 and batches and dataset.pre.fixed_output_size is not None:
        # the workers decode meanwhile (with --workers 0 nothing would overlap: the first call prepares)
        prepare((len(batches[0]), 3, *dataset.pre.fixed_output_size))
    waiting: dict = {}  # processed shape -> [(indices, x)], in arrival order
    sizes: dict = {}
    for pos, batch in enumerate(batches):
        t0 = time.perf_counter()
        try:
            with deadline(opts.decode_timeout if opts.workers > 0 else None):
                b = next(it)
        except Exception as exc:  # noqa: BLE001 - a worker's death (worker_died), or re-raised
            if opts.workers == 0 or not worker_died(exc):
                raise
            # a worker died (the OOM killer?) or stalled and took the loader with it: this batch image by
            # image, each in its own process, then a fresh loader for the rest
            del it
            b = decode_isolated(dataset, batch, opts.decode_timeout)
            rest = batches[pos + 1:]
            it = iter(make_loader(dataset, rest, workers=opts.workers, device=device)) if rest else iter(())
        if b.get("jpegs"):
            on_device = decode_jpegs_on_device(dataset, b["jpegs"], device, gpu_decoder)
            b["groups"] = [(ix, x.to(device, non_blocking=True)) for ix, x in b["groups"]] + on_device["groups"]
            b["failures"] = b["failures"] + on_device["failures"]
            b["sizes"].update(on_device["sizes"])
        t1 = time.perf_counter()
        sizes.update(b["sizes"])
        for indices, x in b["groups"]:
            waiting.setdefault(tuple(x.shape[1:]), []).append((list(indices), x))
        rows: dict = {}
        with torch.inference_mode():
            for indices, x in _model_batches(waiting, opts.batch_size, 4 * opts.batch_size, pos in flush):
                x = x.to(device, non_blocking=cuda).to(dtype)
                for i, row in zip(indices, run_model(model, x, opts, forward_features, intermediate_layers)):
                    row["size"] = sizes.pop(i)
                    rows[i] = row
        t2 = time.perf_counter()
        timings.decode_wait += t1 - t0
        timings.model += t2 - t1
        yield batch, rows, b["failures"]


def _model_batches(waiting: dict, batch_size: int, cap: int, flush: bool) -> list:
    """Takes model batches out of ``waiting``: every full one; then the largest groups while more than
    ``cap`` images wait, or everything at a flush point."""
    def count(shape) -> int:
        return sum(len(ix) for ix, _ in waiting[shape])

    def take(shape, n: int):
        chunks, idx, parts = waiting[shape], [], []
        while chunks and len(idx) < n:
            ix, x = chunks[0]
            k = min(n - len(idx), len(ix))
            idx += ix[:k]
            parts.append(x[:k])  # a view: a whole pinned batch goes to the device as it came
            if k == len(ix):
                chunks.pop(0)
            else:
                chunks[0] = (ix[k:], x[k:])
        if not chunks:
            del waiting[shape]
        return idx, parts[0] if len(parts) == 1 else torch.cat(parts)

    out = []
    for shape in list(waiting):
        while shape in waiting and count(shape) >= batch_size:
            out.append(take(shape, batch_size))
    while waiting and (flush or sum(count(s) for s in waiting) > cap):
        out.append(take(max(waiting, key=count), batch_size))
    return out


def shard_batches(start: int, end: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(i + batch_size, end))) for i in range(start, end, batch_size)]


def parse_max_failures(text: Optional[str]):
    """None, an image count, or a fraction (from "N%") of the images processed so far."""
    if text is None:
        return None
    t = str(text).strip()
    try:
        if t.endswith("%"):
            v = float(t[:-1]) / 100
            if not 0 <= v <= 1:
                raise ValueError
            return ("fraction", v)
        v = int(t)
        if v < 0:
            raise ValueError
        return ("count", v)
    except ValueError:
        raise ValueError(f"--max-failures expects a number of images (e.g. 100) or a percentage (e.g. 5%), "
                         f"got {text!r}") from None


def _over_limit(limit, failed: float, seen: float, total: int) -> bool:
    if limit is None:
        return False
    kind, v = limit
    if kind == "count":
        return failed > v
    # a fraction judged on too few images would stop a healthy run on its first bad file
    return seen >= min(total, 100) and failed > v * seen


def extract_to_dir(model, pre, items: Sequence[Item], out_dir, opts: ExtractOptions, dist_info: Dist, *,
                   weights_label: str, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
                   forward_features: Optional[Callable] = None, intermediate_layers: Optional[Callable] = None,
                   prepare: Optional[Callable[[tuple], None]] = None, sources: Sequence[str] = ()) -> dict:
    """Streams the features of ``items`` into shards under ``out_dir``; resumes; returns the summary.

    ``sources``: the inputs as the user gave them (recorded, so that a refused resume names the one
    that changed).
    """
    out = Path(out_dir)
    parse_max_failures(opts.max_failures)
    settings = settings_for(model, pre, items, opts, weights_label, sources)
    with writer.locked(out) if dist_info.rank == 0 else contextlib.nullcontext():
        return _extract_locked(model, pre, items, out, opts, dist_info, settings, log, forward_features,
                               intermediate_layers, prepare)


def _extract_locked(model, pre, items, out, opts, dist_info, settings, log, forward_features=None,
                    intermediate_layers=None, prepare=None) -> dict:
    from tqdm import tqdm

    limit = parse_max_failures(opts.max_failures)
    if dist_info.rank == 0:
        resuming = writer.prepare_dir(out, settings, overwrite=opts.overwrite, ids=[it.id for it in items])
    dist_info.barrier()
    if dist_info.rank != 0:
        theirs = writer.read_settings(out)
        # e.g. a rank that built another random model, or sees other files; "inputs" is left out: it
        # records rank 0's spelling and absolute paths (for messages), and nodes may mount data elsewhere
        same = {k: v for k, v in theirs.items() if k != "inputs"} == {k: v for k, v in settings.items() if k != "inputs"}
        if not same:
            raise writer.OutputDirError(f"rank {dist_info.rank}: settings differ from rank 0's "
                                        f"({'; '.join(writer._diff(theirs, settings)[:4])})")
        resuming = False
    S = opts.shard_size
    num_shards = math.ceil(len(items) / S)
    done = _finished_shards(out, items, S, num_shards, opts, dist_info, log)
    done_set = set(done)
    mine = [k for k in range(dist_info.rank, num_shards, dist_info.world) if k not in done_set]
    skipped = sum(min(S, len(items) - k * S) for k in done)
    rounds = int(dist_info.all_reduce([len(mine)], op="max")[0])
    if dist_info.rank == 0 and resuming and done:
        log(f"flashdino: resuming {out}: {len(done)} of {num_shards} shards already done ({skipped} images)")

    dataset = ImageDataset(items, pre, max_pixels=opts.max_pixels, max_source_pixels=opts.max_source_pixels)
    plan = [(k, b) for k in mine for b in shard_batches(k * S, min((k + 1) * S, len(items)), opts.batch_size)]
    names = tensor_names(opts, len(model.blocks))
    D = model.cfg.embed_dim
    n_storage = model.n_prefix_tokens - 1 if hasattr(model, "n_prefix_tokens") else model.cfg.n_storage_tokens
    pdt = PATCH_DTYPES[opts.patch_dtype]
    timings = Timings()
    bar = tqdm(total=len(items), initial=skipped, desc=f"features ({model.cfg.name})", unit="img",
               disable=opts.quiet or dist_info.rank != 0, file=sys.stderr, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 30)  # a log file gets a line per 30 s, not per batch
    shard_ends = [j for j in range(len(plan)) if j + 1 == len(plan) or plan[j + 1][0] != plan[j][0]]
    stream = iterate(model, dataset, [b for _, b in plan], opts, dist_info.device, timings, flush_after=shard_ends,
                     forward_features=forward_features, intermediate_layers=intermediate_layers, prepare=prepare)
    g_done = g_failed = g_nonfinite = 0.0
    t_start = time.perf_counter()
    # a shard is written and hashed in this thread while the next one is computed; at most one waits
    # (memory stays bounded at two shards) and its errors (a full disk) surface at the next commit
    committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flashdino-shard-writer")
    pending = None

    def commit(k: int, recs: list, tensors: dict) -> None:
        writer.write_shard(out, k, recs, tensors)
        writer.append_records(out, dist_info.rank, recs)

    try:
        pos = 0
        for r in range(rounds):
            n_img = n_fail = n_nonfinite = 0
            if r < len(mine):
                k = mine[r]
                rows, records = [], {}
                while pos < len(plan) and plan[pos][0] == k:
                    batch, got, failures = next(stream)
                    pos += 1
                    for i, reason in failures:
                        records[i] = {"error": reason}
                    n_nonfinite += sum(bool(r.get("nonfinite")) for r in got.values())
                    records.update(got)
                    n_img += len(batch)
                    n_fail += len(failures)
                    bar.update(len(batch) * dist_info.world)  # an estimate between rounds; set exactly below
                recs = []
                for i in range(k * S, min((k + 1) * S, len(items))):
                    row = records[i]
                    rec = {"index": i, "id": items[i].id, "shard": k}
                    if "error" in row:
                        rec.update(row=None, error=row["error"])
                    else:
                        rec.update(row=len(rows), size=list(row["size"]), grid=list(row["grid"]), error=None)
                        if row.get("nonfinite"):
                            rec["nonfinite"] = True
                        rows.append(row)
                    recs.append(rec)
                tensors = stack_rows(rows, names, D, n_storage, pdt)
                t0 = time.perf_counter()
                if pending is not None:
                    pending.result()
                pending = committer.submit(commit, k, recs, tensors)
                del rows, records, tensors
                release_freed_memory()
                timings.write += time.perf_counter() - t0
            d, f, nf = dist_info.all_reduce([n_img, n_fail, n_nonfinite])
            g_done += d
            g_failed += f
            g_nonfinite += nf
            bar.n = int(skipped + g_done)
            bar.refresh()
            if _over_limit(limit, g_failed, g_done, len(items) - skipped):
                raise ExtractionStopped(
                    f"stopped: {int(g_failed)} of {int(g_done)} images failed (--max-failures {opts.max_failures}); "
                    f"the committed shards are kept: see the records in {out}/manifest.rank*.jsonl, fix the inputs "
                    "or raise --max-failures, then rerun the same command")
        if pending is not None:
            t0 = time.perf_counter()
            pending.result()
            timings.write += time.perf_counter() - t0
    finally:
        bar.close()
        stream.close()
        committer.shutdown(wait=True)  # also on errors and Ctrl-C: the shard in the writer is finished
    seconds = time.perf_counter() - t_start
    tot = dist_info.all_reduce([timings.decode_wait, timings.model, timings.write, seconds], op="max")
    dist_info.barrier()
    summary = {"images": int(g_done), "failed": int(g_failed), "nonfinite": int(g_nonfinite), "skipped": skipped,
               "seconds": tot[3],
               "decode_wait": tot[0], "model": tot[1], "write": tot[2], "shards": num_shards, "ranks": dist_info.world}
    if dist_info.rank == 0:
        counts = writer.merge(out, num_shards)
        summary.update(total_good=counts["good"], total_failed=counts["failed"], total_nonfinite=counts["nonfinite"])
    return summary


def _finished_shards(out: Path, items, S: int, num_shards: int, opts: ExtractOptions, dist_info: Dist,
                     log: Optional[Callable]) -> list[int]:
    """Shards that are committed and verified (sizes, header, records, row counts; the checksum unless
    ``opts.verify_checksums`` is off). Each rank checks its share (k % world == rank), so hashing a
    large folder is spread over the ranks instead of keeping all but one waiting in a collective, and
    over threads within a rank (hashlib and file reads release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    def check(k: int) -> Optional[str]:
        if not writer.shard_path(out, k).exists():
            return "missing"
        lo, hi = k * S, min((k + 1) * S, len(items))
        return writer.shardfile.verify(out, k, indices=range(lo, hi), ids=[it.id for it in items[lo:hi]],
                                       checksum=opts.verify_checksums)

    flags = [0.0] * num_shards
    mine = list(range(dist_info.rank, num_shards, dist_info.world))
    threads = max(1, min(8, (os.cpu_count() or 1) // max(1, dist_info.local_world)))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for k, why in zip(mine, pool.map(check, mine)):
            if why is None:
                flags[k] = 1.0
            elif why != "missing" and log is not None:
                log(f"flashdino: shard {k} ({writer.shard_path(out, k)}) cannot be trusted: {why}; redoing it")
    flags = dist_info.all_reduce(flags)
    return [k for k in range(num_shards) if flags[k] > 0]


def summary_line(s: dict) -> str:
    ips = s["images"] / s["seconds"] if s["seconds"] > 0 else float("nan")
    done_before = f", {s['skipped']} already done" if s.get("skipped") else ""
    good = s["images"] - s["failed"]
    return (f"done: {s['images']} images ({good} with features, {s['failed']} failed{done_before}) "
            f"in {s['seconds']:.1f} s, {ips:.1f} images/s on {s.get('ranks', 1)} rank(s); "
            f"decode wait {s['decode_wait']:.1f} s, model {s['model']:.1f} s, writing {s.get('write', 0.0):.1f} s")


__all__ = ["ExtractOptions", "ExtractionStopped", "Dist", "init_distributed", "extract_to_dir", "iterate",
           "run_model", "summary_line", "parse_max_failures", "settings_for", "model_digest", "STORE_KEYS",
           "PATCH_DTYPES"]
