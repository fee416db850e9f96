"""``flashdino.optimize``: the model's API (``forward_features``, ``__call__``) on the fastest CPU runtime.

Runtimes (``runtime=``):

- ``"openvino"``: the ONNX export compiled by OpenVINO for each input shape (f32 precision hint,
  so numbers match eager to float rounding; ``precision="bf16"`` uses the bf16 hint);
- ``"onnxruntime"``: the ONNX export in ONNX Runtime (``precision="int8"``: its dynamic
  quantisation of the weights);
- ``"inductor"``: ``torch.compile`` with freezing (oneDNN weight prepacking);
- ``"onednn"``: eager PyTorch with oneDNN matrix products (no compile step);
- ``"eager"``: the model itself (``precision="bf16"``: CPU autocast; ``"int8"``: PyTorch dynamic
  quantisation of the Linear layers);
- ``"auto"``: the first installed runtime of the measured ranking in ``deploy/measured.py``.

Exports are cached on disk under ``cache_dir`` (default ``$FLASHDINO_CACHE_DIR`` or
``~/.cache/flashdino/optimized``), keyed by the architecture, a hash of the weights, the runtime
and its version, the precision and the flashdino / torch versions, so a second process starts
without exporting; OpenVINO's compiled models are stored there too (one per input shape and
precision, all from one export), so a warm start does not compile either. Every file is verified before it is loaded, the cache is
bounded in size, and a cache that cannot be written means running without one (``deploy/cache.py``).
Reduced precision changes the numbers and is therefore never chosen unless asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .cache import CacheEntry, default_cache_dir
from .measured import ranked as measured_ranking
from ._extras import available, require, version
from .onnx_export import DEFAULT_OPSET, INPUT_NAME, ExportGraph, export_onnx

RUNTIMES = ("openvino", "onnxruntime", "inductor", "onednn", "eager")
PRECISIONS = ("fp32", "bf16", "int8")
_PRECISION_SUPPORT = {
    "openvino": ("fp32", "bf16"),
    "onnxruntime": ("fp32", "int8"),
    "inductor": ("fp32", "bf16"),
    "onednn": ("fp32",),
    "eager": ("fp32", "bf16", "int8"),
}
_RUNTIME_MODULE = {"openvino": "openvino", "onnxruntime": "onnxruntime"}
_CACHE_FORMAT = 2
_OV_SHAPES_KEPT = 4  # compiled OpenVINO models kept per object, one per input shape


def installed_runtimes() -> list[str]:
    from .onednn import supported as onednn_supported

    out = []
    for name in RUNTIMES:
        if name in _RUNTIME_MODULE and not (available(_RUNTIME_MODULE[name]) and available("onnxscript")):
            continue
        if name == "onednn" and not onednn_supported():
            continue
        out.append(name)
    return out


def choose_runtime(device: torch.device = torch.device("cpu")) -> str:
    """The runtime ``"auto"`` picks: the fastest installed one in the recorded measurement."""
    if device.type != "cpu":
        return "eager"  # flashdino's own kernels are the fast path on GPUs
    installed = installed_runtimes()
    return next(name for name in measured_ranking() if name in installed)


def weights_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _runtime_version(runtime: str) -> str:
    if runtime in _RUNTIME_MODULE:
        return f"{_RUNTIME_MODULE[runtime]} {version(_RUNTIME_MODULE[runtime])}"
    return f"torch {torch.__version__}"


def cache_key(model, runtime: str, precision: str, names: Sequence[str]) -> dict:
    import flashdino

    cfg = {k: v for k, v in dataclasses.asdict(model.cfg).items() if k != "weights"}
    return {
        "format": _CACHE_FORMAT,
        "variant": model.cfg.name,
        "config": json.loads(json.dumps(cfg, default=str)),
        "weights_sha256": weights_sha256(model),
        "runtime": runtime,
        "runtime_version": _runtime_version(runtime),
        "precision": precision,
        "outputs": list(names),
        "opset": DEFAULT_OPSET,
        "flashdino": flashdino.__version__,
        "torch": torch.__version__,
    }


class OptimizedModel:
    """CPU inference of a flashdino backbone on one runtime, with the model's call API.

    ``forward_features(x)`` returns the model's dictionary (torch tensors; ``masks`` is None) and
    ``model(x)`` the CLS token. Inputs are checked like the model's own, before the runtime sees
    them: a clear error for a wrong shape, channel count, dtype or size, instead of a crash.
    """

    def __init__(self, model, runtime: str, precision: str, cache_dir: Path, run: Callable[[Tensor], tuple],
                 names: Sequence[str], entry: Optional[CacheEntry] = None):
        self.model = model
        self.runtime = runtime
        self.precision = precision
        self.cache_dir = cache_dir
        self.names = list(names)
        self.cache_entry = entry
        self._run = run
        self._prepare = getattr(run, "prepare", None)

    def __repr__(self) -> str:
        return f"OptimizedModel({self.model.cfg.name}, runtime={self.runtime!r}, precision={self.precision!r})"

    @property
    def patch_size(self) -> int:
        return self.model.patch_size

    def prepare(self, shape: Sequence[int]) -> None:
        """Readies the runtime for inputs of ``shape`` [B, 3, H, W] now (OpenVINO compiles, or loads the
        stored compiled model), so that the first call does not wait for it: a caller can overlap this
        with decoding its first images. Nothing to do for the other runtimes."""
        if self._prepare is not None:
            self._prepare(tuple(int(d) for d in shape))

    def check_input(self, x) -> None:
        m = self.model
        name = f"optimize({m.cfg.name}, runtime={self.runtime!r})"
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}: expected an image tensor [B, 3, H, W], got {type(x).__name__}")
        try:
            m._check_input(x)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{name}: {exc}") from None
        P = m.patch_size
        if m.cfg.family == "dinov2" and (x.shape[-2] % P or x.shape[-1] % P):
            raise ValueError(f"{name}: image {x.shape[-2]}x{x.shape[-1]} is not a multiple of the patch size {P} "
                             f"(the DINOv2 reference raises here); resize or crop to e.g. "
                             f"{x.shape[-2] // P * P}x{x.shape[-1] // P * P}")
        if x.shape[0] == 0:
            raise ValueError(f"{name}: empty batch (shape {tuple(x.shape)})")

    def _features(self, x: Tensor) -> dict:
        self.check_input(x)
        outs = self._run(x)
        got = dict(zip(self.names, outs))
        m = self.model
        key = m.extra_tokens_key
        if key not in got:  # no register tokens: the model's dict still holds an empty [B, 0, D]
            got[key] = got["x_norm_clstoken"].new_empty(x.shape[0], 0, m.embed_dim)
        return {"x_norm_clstoken": got["x_norm_clstoken"], key: got[key],
                "x_norm_patchtokens": got["x_norm_patchtokens"], "x_prenorm": got["x_prenorm"], "masks": None}

    def forward_features(self, x: Union[Tensor, Sequence[Tensor]], masks=None):
        if masks is not None:
            raise ValueError("optimize(): masks are not supported by the optimized runtimes; call the model itself "
                             "(model.forward_features(x, masks)) for masked inputs")
        if isinstance(x, (list, tuple)):
            return [self._features(xi) for xi in x]
        return self._features(x)

    def get_intermediate_layers(self, x: Tensor, n: Union[int, Sequence[int]] = 1, *,
                                return_class_token: bool = False, return_extra_tokens: bool = False):
        """``model.get_intermediate_layers(x, n, ...)`` (normalised, patch tokens [B, HW, D]) for the
        blocks given to ``optimize(..., layers=)``; the same tuples as the model's."""
        depth = len(self.model.blocks)
        wanted = list(range(depth - n, depth)) if isinstance(n, int) else [int(i) for i in n]
        missing = [i for i in wanted if f"layer_{i}" not in self.names]
        if missing:
            raise ValueError(f"optimize(): blocks {missing} were not prepared; pass layers={sorted(set(wanted))} "
                             "to flashdino.optimize")
        self.check_input(x)
        got = dict(zip(self.names, self._run(x)))
        out = []
        for i in wanted:
            patches, prefix = got[f"layer_{i}"], got[f"layer_{i}_prefix"]
            item = (patches,) + ((prefix[:, 0],) if return_class_token else ()) + \
                ((prefix[:, 1:],) if return_extra_tokens else ())
            out.append(item if len(item) > 1 else patches)
        return tuple(out)

    def __call__(self, x, masks=None):
        out = self.forward_features(x, masks)
        if isinstance(out, list):
            return [o["x_norm_clstoken"] for o in out]
        return out["x_norm_clstoken"]

    forward = __call__


def _to_numpy(x: Tensor):
    return x.detach().contiguous().numpy()


def _need_exporter(purpose: str) -> None:
    # Checked without importing onnxscript (about a second): a warm start never exports.
    if not available("onnxscript"):
        require("onnxscript", purpose)


def _entry(model, runtime: str, precision: str, names, root: Path) -> CacheEntry:
    # Weights without a recorded source (random, or set by hand) differ in every process: such
    # entries share one slot per variant/runtime/precision instead of piling up (cache.py).
    unnamed = getattr(model, "weights_source", None) is None
    return CacheEntry(root, cache_key(model, runtime, precision, names), unnamed_weights=unnamed)


def _onnxruntime(model, names, precision, entry_root, threads):
    ort = require("onnxruntime", 'optimize(runtime="onnxruntime")')
    _need_exporter('optimize(runtime="onnxruntime") (the ONNX export)')
    entry = _entry(model, "onnxruntime", precision, names, entry_root)
    fname = "model.onnx" if precision == "fp32" else "model.int8.onnx"

    def build(folder: Path):
        export_onnx(model, folder / "model.onnx", outputs=names, check=False)
        if precision == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(str(folder / "model.onnx"), str(folder / fname), weight_type=QuantType.QInt8)
            (folder / "model.onnx").unlink()  # only the quantised graph is loaded

    entry.get(build)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle ONNX Runtime threads otherwise spin after each call and slow whatever PyTorch runs next.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    def load():
        return ort.InferenceSession(str(entry.path(fname)), opts, providers=["CPUExecutionProvider"])

    try:
        try:
            session = load()
        except Exception:  # noqa: BLE001 - verified again: another process may have replaced the entry meanwhile
            entry.get(build)
            try:
                session = load()
            except Exception as exc:  # noqa: BLE001 - it verifies but does not load: rebuild once
                entry.rebuilt_because = f"ONNX Runtime could not load it ({type(exc).__name__})"
                entry.invalidate()
                entry.get(build)
                session = load()
    finally:
        entry.release()  # a private (no-cache) export is not needed once loaded

    def run(x: Tensor):
        return tuple(torch.from_numpy(o) for o in session.run(names, {INPUT_NAME: _to_numpy(x)}))

    return run, entry


def _openvino(model, names, precision, entry_root, threads):
    ov = require("openvino", 'optimize(runtime="openvino")')
    _need_exporter('optimize(runtime="openvino") (the ONNX export)')
    # One ONNX export serves every precision: the precision is OpenVINO's compile setting, so it
    # names the compiled blobs, not the entry (a bf16 run after an fp32 one does not export again).
    entry = _entry(model, "openvino", "fp32", names, entry_root)

    def build(folder: Path):
        export_onnx(model, folder / "model.onnx", outputs=names, check=False)

    entry.get(build, hashes=False)  # the export is hashed when it is read (read_graph), the blobs when loaded
    core = ov.Core()
    # Compiled models go through export_model / import_model rather than OpenVINO's CACHE_DIR, so that
    # flashdino records and verifies each blob and a read-only cache still serves the stored ones.
    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    graph = []  # the ONNX graph, read on the first compile (a warm start with stored blobs never reads it)
    compiled: "OrderedDict[tuple, object]" = OrderedDict()

    def read_graph():
        if not graph:
            why = None if entry.temporary else entry.problem()  # hashed now, before the export is read
            if why is not None:  # changed since it was recorded: export it again
                warnings.warn(f"flashdino.optimize: rebuilding the cache entry {entry.folder}: {why}", stacklevel=4)
                entry.invalidate()
                entry.get(build)
            try:
                graph.append(core.read_model(str(entry.path("model.onnx"))))
            except RuntimeError:  # evicted or removed by another process since: export it again
                entry.get(build)
                graph.append(core.read_model(str(entry.path("model.onnx"))))
            entry.release()  # a private (no-cache) export: the graph is in memory now
        return graph[0]

    if entry.temporary:
        read_graph()  # nothing stays behind in the temporary folder

    def compile_for(shape: tuple):
        tag = ("bf16-" if precision == "bf16" else "") + "x".join(str(d) for d in shape)
        blob = entry.read_blob(tag)
        if blob is not None:
            try:
                return core.import_model(blob, "CPU", config)
            except RuntimeError:  # recorded but unusable (another OpenVINO build): compile again
                pass
        shaped = read_graph().clone()
        shaped.reshape({INPUT_NAME: list(shape)})
        cm = core.compile_model(shaped, "CPU", config)
        if not entry.temporary:
            entry.write_blob(tag, cm.export_model().getvalue())
        return cm

    def compiled_for(shape: tuple):
        # One compiled model per input shape: static shapes are what OpenVINO's CPU plugin runs fastest.
        if shape not in compiled:
            compiled[shape] = compile_for(shape)
            while len(compiled) > _OV_SHAPES_KEPT:
                compiled.popitem(last=False)
        compiled.move_to_end(shape)
        return compiled[shape]

    def run(x: Tensor):
        cm = compiled_for(tuple(x.shape))
        result = cm(_to_numpy(x))
        return tuple(torch.from_numpy(result[cm.output(n)].copy()) for n in names)

    run.prepare = compiled_for
    return run, entry


def _torch_runtime(model, names, precision, runtime):
    graph_model = model
    if runtime == "onednn":
        from .onednn import onednn_model

        graph_model = onednn_model(model)
    if precision == "int8":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph_model = torch.ao.quantization.quantize_dynamic(graph_model, {nn.Linear}, dtype=torch.qint8)
    graph = ExportGraph(graph_model, names).eval()
    fn = graph
    if runtime == "inductor":
        fn = torch.compile(graph, options={"freezing": True})

    def run(x: Tensor):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            outs = fn(x)
        return tuple(o.float() if o.dtype != torch.float32 else o for o in outs)

    return run


def output_names(model, layers: Sequence[int] = ()) -> list[str]:
    """The graph outputs ``optimize`` runs: forward_features' tensors, then each block of ``layers``."""
    names = ["x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"]
    if model.n_storage_tokens:
        names.insert(1, model.extra_tokens_key)
    bad = [i for i in layers if not 0 <= int(i) < len(model.blocks)]
    if bad:
        raise ValueError(f"optimize: layers {bad}: {model.cfg.name} has blocks 0..{len(model.blocks) - 1}")
    for i in sorted({int(i) for i in layers}):
        names += [f"layer_{i}", f"layer_{i}_prefix"]
    return names


def needs_export(runtime: str) -> bool:
    return runtime in _RUNTIME_MODULE


def is_cached(model, runtime: str, cache_dir: Optional[Union[str, os.PathLike]] = None, *,
              layers: Sequence[int] = ()) -> bool:
    """Whether ``optimize(model, runtime, layers=layers)`` finds its export in the cache, so that it
    starts without exporting (for OpenVINO at any precision: they share the export); always True
    for runtimes without an export."""
    if not needs_export(runtime):
        return True
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    # sizes only: optimize() hashes every file before it loads them, so hashing here too would read
    # the export twice at every start (about a second per GB)
    return _entry(model, runtime, "fp32", output_names(model, layers), root).problem(hashes=False) is None


def optimize(model, runtime: str = "auto", cache_dir: Optional[Union[str, os.PathLike]] = None, *,
             precision: str = "fp32", threads: Optional[int] = None, layers: Sequence[int] = ()) -> OptimizedModel:
    """Prepares ``model`` (a flashdino DINOv2 / DINOv3 backbone, float32 on CPU) for inference.

    ``runtime``: ``"auto"`` (the fastest installed runtime in the recorded measurement), or one of
    ``"openvino"``, ``"onnxruntime"``, ``"inductor"``, ``"onednn"``, ``"eager"``. ``precision``:
    ``"fp32"`` (default: numbers equal eager to float rounding), ``"bf16"`` or ``"int8"`` (opt-in;
    changes the numbers, see benchmarks/results/cpu_runtimes.md for speed and fidelity).
    ``threads`` sets the runtime's thread count (default: the runtime's own choice).
    ``layers``: block indices whose normalised outputs ``get_intermediate_layers`` serves too
    (computed in the same pass; each adds outputs to the exported graph).
    The model must not be modified afterwards (the runtimes hold a copy of its weights).
    """
    from ..models import DinoVisionTransformer

    if not isinstance(model, DinoVisionTransformer):
        raise TypeError(f"optimize: expected a flashdino backbone (flashdino.create_model(...)), got "
                        f"{type(model).__name__}")
    if precision not in PRECISIONS:
        raise ValueError(f"optimize: precision must be one of {PRECISIONS}, got {precision!r}")
    weight = model.patch_embed.proj.weight
    if runtime == "auto":
        runtime = choose_runtime(weight.device)
    if runtime not in RUNTIMES:
        raise ValueError(f"optimize: unknown runtime {runtime!r}; choose 'auto' or one of {RUNTIMES}")
    if precision not in _PRECISION_SUPPORT[runtime]:
        others = [r for r in RUNTIMES if precision in _PRECISION_SUPPORT[r]]
        raise ValueError(f"optimize: runtime {runtime!r} does not offer precision {precision!r}; "
                         f"runtimes that do: {others}")
    if runtime != "eager" and (weight.device.type != "cpu" or weight.dtype != torch.float32):
        raise ValueError(f"optimize: runtime {runtime!r} runs float32 models on CPU; this one is {weight.dtype} on "
                         f"{weight.device} (use model.float().cpu(), or runtime='eager')")
    model.eval()
    names = output_names(model, layers)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    entry = None
    if runtime == "onnxruntime":
        run, entry = _onnxruntime(model, names, precision, root, threads)
    elif runtime == "openvino":
        run, entry = _openvino(model, names, precision, root, threads)
    else:
        run = _torch_runtime(model, names, precision, runtime)
    return OptimizedModel(model, runtime, precision, root, run, names, entry)


__all__ = ["optimize", "OptimizedModel", "output_names", "is_cached", "needs_export", "RUNTIMES", "PRECISIONS", "installed_runtimes", "choose_runtime",
           "default_cache_dir", "weights_sha256", "cache_key", "CacheEntry"]
