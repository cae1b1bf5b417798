"""lutforge runtime: tuned RMSNorm-family kernels for serving code.

    from kernels import ops, patch_rmsnorm, warmup
    y = ops.rmsnorm(x, w)                       # [..., hidden], any leading dims
    patch_rmsnorm(model)                        # transformers' *RMSNorm modules -> lutforge
    warmup("rmsnorm", 4096)                     # make every kernel for C=4096 resident, all T

Submodules import lazily: `import kernels` alone costs nothing beyond the package.
"""
from __future__ import annotations

_LAZY = {"patch_rmsnorm": ("patch", "patch_rmsnorm"), "unpatch_rmsnorm": ("patch", "unpatch_rmsnorm"),
         "warmup": ("warmup", "warmup")}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
