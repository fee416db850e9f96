"""Helpers shared by the oracle tests (HF transformers, timm): random weights away from identity,
a scale-relative comparison, and token / layer plumbing."""

import math

import torch

from flashdino.layers import dinov3_periods

TOL = 2e-5  # relative to the largest magnitude of the reference output


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random and away from identity (norms, layer scales, biases, tokens)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2 and "token" not in name and "position" not in name and "pos_embed" not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif "lambda1" in name or "gamma" in name:
                p.copy_(0.3 + 0.7 * torch.rand(p.shape, generator=g))
            elif name.endswith("weight") and p.dim() == 1:  # LayerNorm weights
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            else:  # biases, cls / register / mask tokens, position tables
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def close(actual, expected, what: str, tol: float = TOL) -> float:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= tol * max(scale, 1.0), f"{what}: max abs error {err:.3g} (scale {scale:.3g})"
    return err / max(scale, 1.0)


def all_tokens(out: dict, extra_key: str) -> torch.Tensor:
    return torch.cat([out["x_norm_clstoken"][:, None], out[extra_key], out["x_norm_patchtokens"]], dim=1)


def use_fp32_periods(model) -> None:
    with torch.no_grad():
        model.rope_embed.periods.copy_(dinov3_periods(model.cfg.head_dim, model.cfg.rope_base, round_to_bf16=False))


def compare_intermediates(model, x, ref_module, extra_key: str, label: str) -> None:
    """All tokens of forward_features and the raw block outputs against timm's
    forward_features / forward_intermediates (blocks 0 and 1)."""
    with torch.no_grad():
        ref = ref_module.forward_features(x)
        out = model.forward_features(x)
        ref_inter = ref_module.forward_intermediates(x, indices=[0, 1], norm=False, output_fmt="NLC",
                                                     return_prefix_tokens=True, intermediates_only=True)
        mine = model.get_intermediate_layers(x, n=[0, 1], norm=False, return_class_token=True,
                                             return_extra_tokens=True)
    close(all_tokens(out, extra_key), ref, f"{label} forward_features")
    for i, ((spatial, prefix), (patches, cls, extra)) in enumerate(zip(ref_inter, mine)):
        close(patches, spatial, f"{label} block {i} patches")
        close(torch.cat([cls[:, None], extra], dim=1), prefix, f"{label} block {i} prefix tokens")
