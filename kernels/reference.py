"""Plain-torch references for every op of the RMSNorm family: what a kernel's output is checked against.

Maths is float32 by default (``compute_dtype=torch.float64`` for a tighter reference); tensors may live
on any device and have any strides. Definitions, over the last dimension of C elements:

* ``rms_norm``: y = x * rsqrt(mean(x^2) + eps) * w, with w + 1 for the gemma variants (the offset is
  added in the compute dtype, as flashinfer's gemma kernels do).
* ``fused_add_rms_norm``: s = fp32(x + residual); the new residual is s rounded to the input dtype, and
  the normalised output is computed from the *unrounded* fp32 sum s -- flashinfer's
  fused_add_rmsnorm keeps the sum in fp32 registers and only rounds it when storing the residual.
* SiLU(y) = y / (1 + exp(-y)).
* ``qk_rms_norm``: per-head RMSNorm of a [T, H, D] tensor over D (arbitrary strides).
* L2Norm (``l2_norm``): x / sqrt(sum(x^2) + eps_l2). RMSNorm with eps' = eps_l2 / C (cuDNN's note,
  ``rmsnorm_eps_for_l2norm``) equals sqrt(C) * L2Norm(x) * w exactly in real arithmetic, because
  mean(x^2) + eps_l2/C = (sum(x^2) + eps_l2) / C; WAN-VAE folds that sqrt(C) into its ``scale``.

Quantised outputs are produced by kernels.encoders from the fp32 value of y (rounded to fp32 first when
computing in float64), with the conventions documented there. Because a kernel's fp32 reduction order
and rsqrt differ from torch's by a few ulps, quantised outputs can legitimately differ by one code step
where y sits on a rounding boundary; comparisons must allow that.
"""
from __future__ import annotations

import math

import torch

from . import encoders
from .problem import FP4_BLOCK, Problem

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_COMPUTE_DTYPES = (torch.float32, torch.float64)
_INPUT_KEYS = {"x", "weight", "residual", "scale", "global_scale", "eps"}


def _check_compute(compute_dtype: torch.dtype) -> None:
    if compute_dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0 <= eps < math.inf):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def _check_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    return t


def _check_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    _check_tensor(weight, "weight")
    if x.dim() < 1 or weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must have shape ({x.shape[-1] if x.dim() else '?'},), got {tuple(weight.shape)}")


def _normalise(s: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    """s (already in the compute dtype) normalised over its last dimension and scaled by the weight."""
    w = weight.to(s.dtype)
    if gemma:
        w = w + 1.0
    rstd = torch.rsqrt(s.square().mean(dim=-1, keepdim=True) + eps)
    return s * rstd * w


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, gemma: bool = False,
             compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """RMSNorm over the last dimension, returned in compute_dtype."""
    _check_tensor(x, "x")
    _check_weight(x, weight)
    _check_compute(compute_dtype)
    return _normalise(x.to(compute_dtype), weight, _check_eps(eps), gemma)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
                       gemma: bool = False, compute_dtype: torch.dtype = torch.float32
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised fp32 sum in compute_dtype, new residual = fp32(x + residual) rounded to x.dtype)."""
    _check_tensor(x, "x")
    _check_tensor(residual, "residual")
    if residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"residual must match x: shape {tuple(x.shape)} dtype {x.dtype}, "
                         f"got {tuple(residual.shape)} {residual.dtype}")
    _check_weight(x, weight)
    _check_compute(compute_dtype)
    s = x.to(torch.float32) + residual.to(torch.float32)
    return _normalise(s.to(compute_dtype), weight, _check_eps(eps), gemma), s.to(x.dtype)


def silu(y: torch.Tensor) -> torch.Tensor:
    """SiLU(y) = y / (1 + exp(-y)), in y's dtype."""
    _check_tensor(y, "y")
    return y / (1.0 + torch.exp(-y))


def qk_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, gemma: bool = False,
                compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-head RMSNorm of x [T, H, D] (any strides) over D with weight [D]."""
    _check_tensor(x, "x")
    if x.dim() != 3:
        raise ValueError(f"qk_rms_norm needs x of shape [tokens, heads, head_dim], got {tuple(x.shape)}")
    return rms_norm(x, weight, eps, gemma=gemma, compute_dtype=compute_dtype)


def l2_norm(x: torch.Tensor, eps: float = 1e-12, *, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """L2Norm over the last dimension: x / sqrt(sum(x^2) + eps)."""
    _check_tensor(x, "x")
    _check_compute(compute_dtype)
    s = x.to(compute_dtype)
    return s * torch.rsqrt(s.square().sum(dim=-1, keepdim=True) + _check_eps(eps))


def rmsnorm_eps_for_l2norm(eps_l2: float, C: int) -> float:
    """The RMSNorm epsilon that turns RMSNorm into sqrt(C) * L2Norm: eps_l2 / C (cuDNN's note)."""
    if isinstance(C, bool) or not isinstance(C, int) or C < 1:
        raise ValueError(f"C must be an int >= 1, got {C!r}")
    return _check_eps(eps_l2) / C


# --------------------------------------------------------------------------------------------
# The harness entry point
# --------------------------------------------------------------------------------------------

def _check_inputs(problem: Problem, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a kernels.problem.Problem, got {type(problem).__name__}")
    if not isinstance(inputs, dict):
        raise TypeError(f"inputs must be a dict, got {type(inputs).__name__}")
    unknown = set(inputs) - _INPUT_KEYS
    if unknown:
        raise ValueError(f"unknown input keys {sorted(unknown)}; known: {sorted(_INPUT_KEYS)}")
    for key in ("x", "weight", "eps"):
        if inputs.get(key) is None:
            raise ValueError(f"inputs[{key!r}] is required for {problem.op}")
    spec, dtype = problem.spec, TORCH_DTYPES[problem.in_dtype]
    x, weight = _check_tensor(inputs["x"], "x"), _check_tensor(inputs["weight"], "weight")
    shape = (problem.T, problem.heads, problem.C) if spec.per_head else (problem.T, problem.C)
    if tuple(x.shape) != shape or x.dtype != dtype:
        raise ValueError(f"x must have shape {shape} and dtype {dtype} for {problem}, got {tuple(x.shape)} {x.dtype}")
    if tuple(weight.shape) != (problem.C,) or weight.dtype != dtype:
        raise ValueError(f"weight must have shape ({problem.C},) and dtype {dtype}, got {tuple(weight.shape)} {weight.dtype}")

    residual = inputs.get("residual")
    if spec.residual and residual is None:
        raise ValueError(f"inputs['residual'] is required for {problem.op}")
    if not spec.residual and residual is not None:
        raise ValueError(f"{problem.op} takes no residual")

    scale = inputs.get("scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not 0 < scale < math.inf):
        raise ValueError(f"inputs['scale'] must be a finite python float > 0, got {scale!r}")
    if scale is None and problem.out_format == "fp8" and not spec.silu:  # rmsnorm_quant family
        raise ValueError(f"inputs['scale'] (a python float) is required for {problem.op}")

    if inputs.get("global_scale") is not None and not (spec.fp4_scales and problem.out_format == "nvfp4"):
        raise ValueError("global_scale applies only to rmsnorm_fp4quant with nvfp4 output")
    return x, weight, _check_eps(inputs["eps"])


def reference_outputs(problem: Problem, inputs: dict, compute_dtype: torch.dtype = torch.float32) -> dict:
    """Expected outputs of `problem` for `inputs`.

    inputs: x ([T, C], or [T, heads, head_dim] for per-head ops, any strides), weight [C], eps (float),
    residual (residual ops), scale (python float; used by rmsnorm_quant / fused_add_rmsnorm_quant, ignored
    by the other ops so a harness may always pass one), global_scale (float32 tensor of one element or None; rmsnorm_fp4quant nvfp4).

    Returns a dict with
      "out": float32 values for bf16/fp16 outputs; a float8_e4m3fn tensor for fp8; for nvfp4/mxfp4 the
             packed uint8 codes [T, C/2] (element 2i in the low nibble);
      "block_scale": nvfp4/mxfp4 only -- uint8 bits of the e4m3 / ue8m0 scales, row-major [T, C/block]
             or, for scale_layout="swizzled", the flat 128x4-swizzled buffer;
      "residual": residual ops only -- the new residual in the input dtype.
    """
    _check_compute(compute_dtype)
    x, weight, eps = _check_inputs(problem, inputs)
    spec = problem.spec
    result: dict = {}
    if spec.residual:
        y, result["residual"] = fused_add_rms_norm(x, inputs["residual"], weight, eps, gemma=spec.gemma,
                                                   compute_dtype=compute_dtype)
    else:
        y = rms_norm(x, weight, eps, gemma=spec.gemma, compute_dtype=compute_dtype)
    if spec.silu:
        y = silu(y)
    y32 = y.to(torch.float32)

    fmt = problem.out_format
    if fmt in TORCH_DTYPES:
        result["out"] = y32
    elif fmt == "fp8":
        if spec.silu:
            result["out"] = encoders.encode_e4m3(y32).view(torch.float8_e4m3fn)
        else:
            result["out"] = encoders.quantize_fp8_static(y32, inputs["scale"])
    elif fmt in FP4_BLOCK:
        if fmt == "mxfp4":
            packed, scales = encoders.quantize_mxfp4(y32)
        elif spec.fp4_scales:
            packed, scales = encoders.quantize_nvfp4(y32, inputs.get("global_scale"))
        else:
            packed, scales = encoders.quantize_nvfp4_unrounded(y32)
        result["out"] = packed
        result["block_scale"] = encoders.swizzle_scales(scales) if problem.scale_layout == "swizzled" else scales
    else:  # Problem validation makes this unreachable; keep the failure loud if OPS grows
        raise ValueError(f"no reference for output format {fmt!r}")
    return result
