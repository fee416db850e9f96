"""CUDA graphs for small-batch latency: capture a backbone's whole forward once, replay it.

At batch 1 a ViT forward is a few hundred short kernels and the GPU waits on the Python launches;
a CUDA graph replays all of them with one launch. A graph is only valid for the exact input it was
captured with (shape, strides, dtype, device), the exact weight tensors (addresses) and the same
grad / autocast / train-eval state, so :class:`CudaGraphRunner` checks those on every call and
runs the model eagerly whenever anything differs. On a machine without CUDA, or for CPU inputs,
it is a plain pass-through (the eager result, bit for bit).

    runner = flashdino.cuda_graphs.capture(model.eval(), torch.randn(1, 3, 224, 224, device="cuda"))
    with torch.inference_mode():
        cls = runner(x)                      # replayed when x matches the captured input
    runner.stats                             # {'replays': ..., 'eager': ..., 'captures': ...}
    runner.explain(x)                        # None if x would replay, else the reason

Rules:

- Replays run only without autograd: under ``torch.no_grad()`` / ``torch.inference_mode()``, or
  when neither the input nor any parameter requires grad. Training calls run eagerly.
- The model must be in eval mode (dropout / drop-path draw random numbers in training).
- Weights may be updated in place (``load_state_dict`` copies into the same tensors); moving or
  replacing them (``model.to(...)``, a new ``nn.Parameter``) is detected and the graph is
  recaptured on the next call (``check_weights=True``, the default).
- Outputs are cloned by default. With ``clone_outputs=False`` the returned tensors are the graph's
  static output buffers: the next replay overwrites them (fastest, for a caller that consumes each
  result before the next call).
- ``max_graphs`` (default 1) shapes are captured lazily, least recently used evicted; any other
  shape runs eagerly. A capture that fails (an op that synchronises with the host, say) is
  recorded, warned about once, and that shape runs eagerly from then on.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Hashable, Optional

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

__all__ = ["CudaGraphRunner", "capture", "graphs_available"]


def graphs_available(device: Optional[torch.device] = None) -> Optional[str]:
    """None when CUDA graphs can be used on ``device`` (default: the current CUDA device), else why not."""
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if device is not None and torch.device(device).type != "cuda":
        return f"input is on {torch.device(device).type}, CUDA graphs need a CUDA tensor"
    return None


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    static_input: Tensor
    static_output: Any
    weights: tuple


class _NoStoreCache(dict):
    """A cache dict that never holds anything: lookups miss and stores are dropped."""

    def __setitem__(self, key, value):  # noqa: D401 - dict protocol
        return None

    def __contains__(self, key):
        return False


@contextlib.contextmanager
def _caches_disabled(model: nn.Module):
    """Disables per-module tensor caches (``_pos_cache``) while capturing.

    A cached tensor read by a graph is referenced only by its address: if the cache later drops
    it (another image size evicts it), a replay would read freed memory. With the caches off, the
    captured graph computes those tables itself and owns their memory.
    """
    saved = []
    for module in model.modules():
        cache = module.__dict__.get("_pos_cache")
        if isinstance(cache, dict):
            saved.append((module, cache))
            module._pos_cache = _NoStoreCache()
    try:
        yield
    finally:
        for module, cache in saved:
            module._pos_cache = cache


def _weights_fingerprint(model: nn.Module) -> tuple:
    return tuple((t.data_ptr(), t.dtype, t.device) for t in
                 [*model.parameters(), *model.buffers()])


class CudaGraphRunner(nn.Module):
    """Replays a captured CUDA graph of ``getattr(model, method)(x)`` when ``x`` fits; eager otherwise.

    Args:
        model: the backbone (any ``nn.Module`` whose ``method`` takes one tensor).
        example_input: captured right away when given (and on CUDA); otherwise the first eligible
            call captures.
        method: ``"forward"`` (CLS embedding), ``"forward_features"`` (the output dict), ...
        warmup_iters: eager calls on a side stream before capturing (Triton autotuning / compiling
            and cuDNN / cuBLAS workspace allocation must happen outside the capture).
        clone_outputs: return copies (default) or the graph's static output buffers.
        max_graphs: how many input signatures keep a graph (LRU); others run eagerly.
        check_weights: detect moved / replaced weights and recapture.
        pool: a ``torch.cuda.graph_pool_handle()`` to share graph memory between runners that
            never run concurrently (default: a private pool per graph).
    """

    def __init__(self, model: nn.Module, example_input: Optional[Tensor] = None, *, method: str = "forward",
                 warmup_iters: int = 3, clone_outputs: bool = True, max_graphs: int = 1,
                 check_weights: bool = True, pool=None):
        super().__init__()
        if not hasattr(model, method):
            raise AttributeError(f"{type(model).__name__} has no method {method!r}")
        if max_graphs < 0:
            raise ValueError(f"max_graphs must be >= 0, got {max_graphs}")
        self.model = model
        self.method = method
        self.warmup_iters = int(warmup_iters)
        self.clone_outputs = clone_outputs
        self.max_graphs = int(max_graphs)
        self.check_weights = check_weights
        self.pool = pool
        self._graphs: "OrderedDict[Hashable, _Graph]" = OrderedDict()
        self._failed: dict = {}
        self.stats = {"replays": 0, "eager": 0, "captures": 0, "capture_failures": 0, "recaptures": 0}
        self.last_reason: Optional[str] = None
        if example_input is not None:
            self.capture(example_input)

    # -- eligibility ------------------------------------------------------------------------------
    def _key(self, x: Tensor) -> tuple:
        dev = x.device
        autocast = (torch.is_autocast_enabled(dev.type),
                    torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else None)
        return (tuple(x.shape), x.stride(), x.dtype, dev, autocast)

    def _why_eager(self, x, args: tuple, kwargs: dict) -> Optional[str]:
        if not isinstance(x, Tensor):
            return "input is not a tensor"
        why = graphs_available(x.device)
        if why:
            return why
        if args or any(v is not None for v in kwargs.values()):
            return "extra arguments (only a single image tensor is captured)"
        if self.model.training:
            return "the model is in training mode"
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.model.parameters())):
            return "autograd is enabled (call under torch.no_grad() or torch.inference_mode())"
        if torch.cuda.is_current_stream_capturing():
            return "already inside a CUDA graph capture"
        if torch.compiler.is_compiling():
            return "inside torch.compile"
        if x.is_sparse or not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last):
            return "input is not dense"
        return None

    def explain(self, x, *args, **kwargs) -> Optional[str]:
        """None when ``self(x)`` would replay (or capture) a graph, else the reason it runs eagerly."""
        why = self._why_eager(x, args, kwargs)
        if why:
            return why
        key = self._key(x)
        if key in self._failed:
            return f"capture failed earlier for this input: {self._failed[key]}"
        if self.max_graphs <= 0:
            return "max_graphs=0"
        return None

    # -- capture / replay -------------------------------------------------------------------------
    def _eager(self, x, *args, **kwargs):
        self.stats["eager"] += 1
        return getattr(self.model, self.method)(x, *args, **kwargs)

    def _capture(self, key, x: Tensor) -> Optional[_Graph]:
        fn = getattr(self.model, self.method)
        # Normal (not inference-mode) tensors, so that calls under no_grad and under
        # inference_mode can both write the static input and read the static outputs.
        with torch.inference_mode(False), torch.no_grad():
            return self._capture_impl(key, x, fn)

    def _capture_impl(self, key, x: Tensor, fn) -> Optional[_Graph]:
        static_input = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
        static_input.copy_(x)
        try:
            with _caches_disabled(self.model):
                side = torch.cuda.Stream(device=x.device)
                side.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(side):
                    for _ in range(max(self.warmup_iters, 1)):
                        fn(static_input)
                torch.cuda.current_stream(x.device).wait_stream(side)
                torch.cuda.synchronize(x.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    static_output = fn(static_input)
        except Exception as exc:  # capture is an optimisation: never fail the call for it
            self._failed[key] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            self.stats["capture_failures"] += 1
            warnings.warn(f"CUDA graph capture of {type(self.model).__name__}.{self.method} failed for input "
                          f"{tuple(x.shape)} {x.dtype} ({self._failed[key]}); running eagerly", stacklevel=3)
            with contextlib.suppress(Exception):
                torch.cuda.synchronize(x.device)
            return None
        entry = _Graph(graph, static_input, static_output, _weights_fingerprint(self.model))
        self._graphs[key] = entry
        self.stats["captures"] += 1
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return entry

    def capture(self, example_input: Tensor) -> bool:
        """Captures a graph for ``example_input``'s signature now; False when it cannot (see ``explain``)."""
        with torch.no_grad():
            why = self._why_eager(example_input, (), {})
            if why:
                self.last_reason = why
                return False
            return self._capture(self._key(example_input), example_input) is not None

    def reset(self) -> None:
        """Drops every captured graph (their memory is released) and the record of failed captures."""
        self._graphs.clear()
        self._failed.clear()

    @property
    def captured(self) -> list:
        """Input signatures (shape, stride, dtype, device, autocast state) that have a graph."""
        return list(self._graphs)

    def forward(self, x, *args, **kwargs):
        why = self._why_eager(x, args, kwargs)
        if why is not None:
            self.last_reason = why
            return self._eager(x, *args, **kwargs)
        key = self._key(x)
        if key in self._failed:
            self.last_reason = f"capture failed earlier: {self._failed[key]}"
            return self._eager(x)
        entry = self._graphs.get(key)
        if entry is not None and self.check_weights and entry.weights != _weights_fingerprint(self.model):
            # Weights were moved or replaced: the graph reads stale addresses.
            del self._graphs[key]
            self.stats["recaptures"] += 1
            entry = None
        if entry is None:
            if self.max_graphs <= 0:
                self.last_reason = "max_graphs=0"
                return self._eager(x)
            entry = self._capture(key, x)
            if entry is None:
                self.last_reason = f"capture failed: {self._failed.get(key)}"
                return self._eager(x)
        else:
            self._graphs.move_to_end(key)
        self.last_reason = None
        entry.static_input.copy_(x)
        entry.graph.replay()
        self.stats["replays"] += 1
        if self.clone_outputs:
            return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, entry.static_output)
        return entry.static_output


def capture(model: nn.Module, example_input: Optional[Tensor] = None, **kwargs) -> CudaGraphRunner:
    """A :class:`CudaGraphRunner` for ``model``, captured for ``example_input`` when it is a CUDA tensor.

    On CPU (or without CUDA) the runner simply calls the model: the same results, no graphs.
    Keyword arguments go to :class:`CudaGraphRunner` (``method``, ``clone_outputs``, ``max_graphs``...).
    """
    return CudaGraphRunner(model, example_input, **kwargs)

