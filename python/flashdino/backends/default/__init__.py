"""Pure-PyTorch reference implementations, registered as the "torch" backend of every op."""

from ... import dispatch
from .norms import residual_layernorm
from .rope_attention import rope_attention

dispatch.register("rope_attention", "torch", rope_attention)
dispatch.register("residual_layernorm", "torch", residual_layernorm)
