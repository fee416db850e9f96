"""The mechanics every library patch shares: version ranges, instance-level method swaps and their
undoing, the error type, and the pieces of a forward that are the same in Hugging Face and timm.

How a module is patched: its method (``forward``, or a RoPE module's ``get_embed``) is replaced on
the *instance* (``module.forward = MethodType(fn, module)``, the way Liger-Kernel patches a model
it is handed), not on the class and not by swapping ``module.__class__``. So the class, its name,
``isinstance``, the parameters, their names and the ``state_dict`` stay exactly what they were;
other instances of the class (an unpatched teacher beside a patched student) are untouched; and
Hugging Face's output-capturing hooks, gradient checkpointing and PEFT's wrapping of the Linear
layers keep working, because they act on module calls, which still happen. The method it replaced
is kept on the instance (``_flashdino_original_<name>``) so that a call flashdino has no op for
runs the library's own code, and so that :func:`unpatch` can put it back.
"""

from __future__ import annotations

import re
from types import MethodType
from typing import Callable, Iterable, Optional

from torch import Tensor, nn

from .. import ops

ORIGINAL = "_flashdino_original_"  # prefix of the saved methods on a patched module
_PREVIOUS = "_flashdino_previous_"  # what the instance itself held under that name (usually nothing)
_MARK = "_flashdino_patch"  # attribute set on every replacement function


class PatchError(ValueError):
    """``flashdino.patch`` cannot patch this model (unknown class, configuration or library version)."""


def replacement(method: str = "forward") -> Callable[[Callable], Callable]:
    """Marks a function as flashdino's replacement for ``method``, so patched modules can be recognised.

    Its ``__name__`` becomes ``method``: a bound method pickles as ``getattr(module, __name__)``, so
    a whole patched module saved with ``torch.save(model)`` loads as the library's unpatched module
    (``flashdino.patch`` it again) instead of failing to load.
    """
    def mark(fn: Callable) -> Callable:
        setattr(fn, _MARK, True)
        fn.__name__ = method
        return fn
    return mark


def is_replaced(module: nn.Module, name: str) -> bool:
    return getattr(getattr(module.__dict__.get(name), "__func__", None), _MARK, False)


def original(module: nn.Module, name: str = "forward") -> Callable:
    """The method ``name`` that ``module`` had before it was patched (bound to ``module``)."""
    return module.__dict__[ORIGINAL + name]


def replace(module: nn.Module, name: str, fn: Callable, **state) -> None:
    """Binds ``fn`` as ``module.<name>`` on this instance; keeps the method it replaces. ``state``:
    extra plain attributes the replacement reads (stored as ``_flashdino_<key>``, removed by
    :func:`restore`). Replacing an already replaced method is a no-op (patching is idempotent)."""
    if is_replaced(module, name):
        return
    module.__dict__[ORIGINAL + name] = getattr(module, name)
    # A method already set on the instance (by the user or another patcher) goes back on restore.
    module.__dict__[_PREVIOUS + name] = None if _is_class_method(module, name) else module.__dict__.get(name)
    for key, value in state.items():
        module.__dict__["_flashdino_" + key] = value
    module.__dict__[name] = MethodType(fn, module)


def _is_class_method(module: nn.Module, name: str) -> bool:
    """Whether the instance holds its class's own method under ``name`` (what unpickling a patched
    module leaves: see :func:`replacement`)."""
    held = module.__dict__.get(name)
    return getattr(held, "__self__", None) is module and getattr(held, "__func__", None) is getattr(type(module), name)


def restore(module: nn.Module) -> bool:
    """Undoes every :func:`replace` on ``module``; returns whether there was one."""
    found = False
    for key in [k for k in module.__dict__ if k.startswith(ORIGINAL)]:
        name = key[len(ORIGINAL):]
        previous = module.__dict__.get(_PREVIOUS + name)
        if is_replaced(module, name) or _is_class_method(module, name):
            found = found or is_replaced(module, name)
            if previous is None:
                del module.__dict__[name]
            else:
                module.__dict__[name] = previous
    for key in [k for k in module.__dict__ if k.startswith("_flashdino_")]:
        del module.__dict__[key]
    return found


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading release numbers of a version string: "5.26.0.dev0" -> (5, 26, 0)."""
    parts = []
    for piece in version.split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
        if match.group() != piece:
            break
    return tuple(parts)


def check_version(library: str, version: str, minimum: tuple[int, ...], below: tuple[int, ...]) -> None:
    """Raises :class:`PatchError` unless ``minimum <= version < below``."""
    found = version_tuple(version)
    if not (minimum <= found < below):
        low, high = ".".join(map(str, minimum)), ".".join(map(str, below))
        raise PatchError(
            f"flashdino.patch supports {library} >={low},<{high} (the module structure it replaces was checked "
            f"there); this is {library} {version}. Install a supported {library}, or use flashdino's own models "
            f"(flashdino.from_pretrained / flashdino.convert)."
        )


def require(condition: bool, what: str, fix: str = "") -> None:
    if not condition:
        raise PatchError(f"flashdino.patch: {what}" + (f"; {fix}" if fix else ""))


def check_layernorm(norm: nn.Module, dim: int, where: str) -> None:
    """The norms whose parameters flashdino's ops read must be plain LayerNorms over the last dim."""
    require(isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) == (dim,),
            f"{where} is {type(norm).__name__}{getattr(norm, 'normalized_shape', '')}, not a LayerNorm over {dim} "
            f"channels", "flashdino only replaces the standard DINO blocks")


def all_of(modules: Iterable[nn.Module], cls: type) -> bool:
    return all(type(m) is cls for m in modules)


def residual_norm(x: Tensor, branch: Tensor, gamma: Optional[Tensor], norm: nn.LayerNorm, drop_path: nn.Module,
                  training: bool) -> tuple[Tensor, Tensor]:
    """``x + drop_path(gamma * branch)`` and its LayerNorm ``norm``, in one ``ops.residual_layernorm``.

    While stochastic depth is active (training with a DropPath), the LayerScale product and the
    DropPath run first, as the libraries order them (the same random draw, the same rounding), and
    only the residual add and the norm are fused.
    """
    if training and not isinstance(drop_path, nn.Identity):
        branch = drop_path(branch * gamma if gamma is not None else branch)
        gamma = None
    return ops.residual_layernorm(x, branch, gamma, norm.weight, norm.bias, norm.eps)


@replacement()
def final_norm_forward(self: nn.LayerNorm, x: Tensor) -> Tensor:
    """A model's last LayerNorm as ``ops.final_norm`` (one launch on a GPU); other ranks run the
    original LayerNorm."""
    if x.dim() != 3:
        return original(self)(x)
    # n_prefix=0: every token is normalised with this norm and comes back as one [B, N, D] tensor.
    return ops.final_norm(x, 0, self.weight, self.bias, self.eps)[1]
