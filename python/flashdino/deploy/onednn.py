"""Eager CPU inference with oneDNN matrix products (the ``"onednn"`` runtime of :func:`optimize`).

PyTorch's default CPU GEMM for float32 ``nn.Linear`` is MKL's, which runs at about half of
oneDNN's speed on the AMD EPYC (AVX-512) this was measured on; ``torch.compile`` with freezing
owes most of its gain to oneDNN. Here every ``nn.Linear`` of a structural copy of the model calls
``torch.ops.mkldnn._linear_pointwise`` directly, in eager mode, without compiling. The copy
shares the parameter tensors with the original (no extra memory). Results differ from MKL's by
float rounding of the sums only (~1e-6 relative); it is an opt-in runtime, not a default.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


def supported() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDnnLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.float32 or x.device.type != "cpu" or self.weight.requires_grad and torch.is_grad_enabled():
            return nn.functional.linear(x, self.weight, self.bias)  # oneDNN's op has no autograd
        lead = x.shape[:-1]
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, self.in_features), self.weight, self.bias,
                                                 "none", [], "")
        return out.reshape(*lead, self.out_features)


def onednn_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose ``nn.Linear`` layers run oneDNN; parameters and buffers are shared."""
    if not supported():
        raise RuntimeError("the 'onednn' runtime needs a PyTorch build with oneDNN (torch.backends.mkldnn)")
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    out = copy.deepcopy(model, memo)
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, OneDnnLinear(child))
    return out


__all__ = ["onednn_model", "OneDnnLinear", "supported"]
