"""Drop lutforge's RMSNorm into an existing model: `patch_rmsnorm(model)` / `unpatch_rmsnorm(model)`.

Serving stacks built on transformers (and most LLM code) define their own RMSNorm module: a `weight` of shape
[hidden] and an epsilon (`variance_epsilon` in LlamaRMSNorm, Qwen2/3, Mistral, Mixtral...; `eps` elsewhere),
normalising the last dim in fp32. The patch replaces each such module's forward with `ops.rmsnorm` (Gemma's
`1 + weight` form with `ops.gemma_rmsnorm`), per instance, so the model object, its weights, state dict and
hooks stay as they are. Norms over per-head tensors (Qwen3's q_norm/k_norm on [..., heads, head_dim]) are
rows too. A call the kernel cannot take - CPU tensors, fp32, a weight of another dtype, or autograd on - runs
the module's own forward, so training and CPU inference behave exactly as before.
"""
from __future__ import annotations

import types

import torch

from . import ops

_ORIG = "_lutforge_original_forward"
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def _eps_of(module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        v = getattr(module, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def is_rmsnorm(module) -> bool:
    """A module this patch can take: class name ending in RMSNorm, a 1-D weight parameter and a float epsilon."""
    w = getattr(module, "weight", None)
    return (type(module).__name__.lower().endswith("rmsnorm") and isinstance(w, torch.Tensor) and w.dim() == 1
            and _eps_of(module) is not None)


def _make_forward(module, gemma: bool):
    original = module.forward
    eps = _eps_of(module)
    op = ops.gemma_rmsnorm if gemma else ops.rmsnorm

    def forward(self, hidden_states, *args, **kwargs):
        w = self.weight
        x = hidden_states
        if (args or kwargs or x.dtype not in _KERNEL_DTYPES or x.dtype != w.dtype or not x.is_cuda
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return original(hidden_states, *args, **kwargs)
        return op(x, w, eps)

    return original, types.MethodType(forward, module)


def patch_rmsnorm(model: torch.nn.Module) -> int:
    """Route every RMSNorm module of `model` (itself included) through lutforge; returns how many were patched.
    Idempotent; `unpatch_rmsnorm` restores the original forwards."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    n = 0
    for m in model.modules():
        if hasattr(m, _ORIG) or not is_rmsnorm(m):
            continue
        gemma = "gemma" in type(m).__name__.lower()
        original, forward = _make_forward(m, gemma)
        setattr(m, _ORIG, original)
        m.forward = forward
        n += 1
    return n


def unpatch_rmsnorm(model: torch.nn.Module) -> int:
    """Undo `patch_rmsnorm`; returns how many modules were restored."""
    n = 0
    for m in model.modules():
        if hasattr(m, _ORIG):
            del m.forward  # the instance attribute; the class's forward shows through again
            delattr(m, _ORIG)
            n += 1
    return n
