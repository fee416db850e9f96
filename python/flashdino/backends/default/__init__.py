"""Pure-PyTorch reference implementations, registered as the "torch" backend of every op."""

from ... import dispatch
from .final_norm import final_norm
from .norms import residual_layernorm
from .patch_embed import patch_embed_tokens
from .rope_attention import rope_attention

dispatch.register("rope_attention", "torch", rope_attention)
dispatch.register("residual_layernorm", "torch", residual_layernorm)
dispatch.register("final_norm", "torch", final_norm)
dispatch.register("patch_embed_tokens", "torch", patch_embed_tokens)
