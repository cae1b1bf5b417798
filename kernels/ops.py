"""Public ops of the runtime library (signatures follow flashinfer's), registered as torch custom ops.

Every op validates dtype, shape, device, strides, alignment and aliasing and raises ValueError or
TypeError before anything is launched. Knobs come from kernels.dispatch (LUT, then heuristic).
"""
from __future__ import annotations

import math

import torch

from .compile_cache import arch_name, get_compiled
from .dispatch import device_class_of, select_config
from .problem import ELEM_BYTES, FP4_BLOCK, Problem

_IN_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
_FP4_DTYPE = getattr(torch, "float4_e2m1fn_x2", None)
_DEVICE_INFO: dict = {}


# --------------------------------------------------------------------------- validation helpers
def _dtype_name(t: torch.Tensor, what: str) -> str:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _IN_DTYPES:
        raise TypeError(f"{what} must be bfloat16 or float16, got {t.dtype}")
    return _IN_DTYPES[t.dtype]


def _same_device(tensors: dict) -> torch.device:
    dev = None
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cuda":
            raise ValueError(f"{name} must be on a CUDA device, got {t.device}")
        if dev is None:
            dev = t.device
        elif t.device != dev:
            raise ValueError(f"{name} is on {t.device} but the other tensors are on {dev}")
    return dev


def _check_last_dim_contiguous(t: torch.Tensor, what: str) -> None:
    if t.numel() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{what} must be contiguous in its last dimension (stride {t.stride(-1)})")
    for d in range(t.dim() - 1):
        if t.shape[d] > 1 and t.stride(d) < 0:
            raise ValueError(f"{what} has a negative stride in dim {d}")


def _span(t: torch.Tensor) -> tuple[int, int]:
    lo = t.data_ptr()
    hi = lo + sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0) * t.element_size() + t.element_size()
    return lo, hi


def _no_overlap(named: dict) -> None:
    items = [(n, t) for n, t in named.items() if t is not None and t.numel()]
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            (a, ta), (b, tb) = items[i], items[j]
            a0, a1 = _span(ta)
            b0, b1 = _span(tb)
            if a0 < b1 and b0 < a1:
                raise ValueError(f"{a} and {b} overlap in memory; outputs must not alias inputs")


def _check_weight(weight, C: int, dtype: torch.dtype) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype != dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match input dtype {dtype}")
    if weight.dim() != 1 or weight.shape[0] != C:
        raise ValueError(f"weight must have shape ({C},), got {tuple(weight.shape)}")
    if weight.stride(0) != 1 and C > 1:
        raise ValueError("weight must be contiguous")


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite non-negative float, got {eps!r}")
    return float(eps)


def _check_out(out, shape: tuple, dtype: torch.dtype, what: str = "out") -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{what} must have dtype {dtype}, got {out.dtype}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{what} must have shape {tuple(shape)}, got {tuple(out.shape)}")
    _check_last_dim_contiguous(out, what)


def _as_2d(x: torch.Tensor, what: str = "input") -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{what} must be 2D [tokens, hidden], got shape {tuple(x.shape)}")
    return x


# --------------------------------------------------------------------------- launch
def _device_info(device: torch.device) -> tuple[int, str, int]:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    info = _DEVICE_INFO.get(idx)
    if info is None:
        props = torch.cuda.get_device_properties(idx)
        sm = props.major * 10 + props.minor
        if sm < 90:
            raise ValueError(f"lutforge kernels need an SM90+ GPU, {props.name} is sm_{sm}")
        info = (sm, device_class_of(props.name), props.multi_processor_count)
        _DEVICE_INFO[idx] = info
    return info


def _ptr_align(tensors) -> int:
    a = 16
    for t in tensors:
        if t is not None:
            a = math.gcd(a, t.data_ptr() % 16 or 16)
    return a


def _stride_with_divisibility(g: int, C: int) -> int:
    """A row stride >= C divisible by exactly the powers of two (up to 16) that divide g: what the
    knob constraints need to know about the real strides."""
    p = 1
    while p < 16 and g % (2 * p) == 0:
        p *= 2
    return p * (2 * (-(-C // (2 * p))) + 1)


def _launch(problem: Problem, x3, weight, residual, y3, block_scale, global_scale, eps: float, scale: float):
    """Pick knobs, compile (cached) and launch on the current stream. Shapes are validated already."""
    import cuda.bindings.driver as cuda
    from cutlass import Float32, Int32

    from .runner import kernel_args, zero_scale_padding

    if problem.T == 0:
        return
    sm, dev_class, sm_count = _device_info(x3.device)
    # Every stride must be a multiple of the vector (in elements; FP4 bytes hold two elements).
    y_unit = 2 if problem.out_format in FP4_BLOCK else 1
    strides = [x3.stride(0), y3.stride(0) * y_unit]
    if problem.heads > 1:
        strides += [x3.stride(1), y3.stride(1) * y_unit]
    if residual is not None:
        strides.append(residual.stride(0))
    g = 0
    for s in strides:
        g = math.gcd(g, int(s))
    row_stride = _stride_with_divisibility(g, problem.C)
    # y vectors hold the same element count in 1/2 (fp8) or 1/4 (FP4) of the bytes
    y_scale = {"fp8": 2}.get(problem.out_format, 4 if problem.out_format in FP4_BLOCK else 1)
    align = min(_ptr_align([x3, weight, residual]), y_scale * _ptr_align([y3]))
    cfg, _tier = select_config(problem, sm, dev_class, row_stride=row_stride, ptr_align=align)
    fn = get_compiled(problem, cfg, arch_name(sm))
    args = kernel_args(problem, cfg, x3, weight, residual, y3, block_scale, global_scale)
    with torch.cuda.device(x3.device):
        zero_scale_padding(problem, block_scale)
        stream = cuda.CUstream(torch.cuda.current_stream().cuda_stream)
        fn(*args, Float32(eps), Float32(scale), Int32(max(1, sm_count * cfg.ctas_per_sm)), stream)


@torch.library.custom_op(
    "lutforge::norm_kernel",
    mutates_args=("x", "residual", "y", "block_scale"),
    device_types="cuda",
    schema="(Tensor(a0!) x, Tensor weight, Tensor(a2!)? residual, Tensor(a3!) y, Tensor(a4!)? block_scale, "
           "Tensor? global_scale, str op, str in_dtype, str out_format, int heads, str scale_layout, float eps, "
           "float scale) -> ()",
)
def _norm_kernel(x: torch.Tensor, weight: torch.Tensor, residual, y: torch.Tensor, block_scale, global_scale,
                 op: str, in_dtype: str, out_format: str, heads: int, scale_layout: str, eps: float,
                 scale: float) -> None:
    p = Problem(op, x.shape[0], weight.shape[0], in_dtype, out_format, heads, scale_layout)
    # Aliasing needs data pointers, which torch.compile cannot trace: checked here, still before launch.
    # The fused-add ops with an input-dtype output normalise x in place: y is a second view of x.
    in_place = p.spec.residual and out_format == in_dtype and y.data_ptr() == x.data_ptr() \
        and y.shape == x.shape and y.stride() == x.stride()
    outputs = {} if in_place else {"out": y, "block_scale": block_scale}
    _no_overlap({"input": x, "residual": residual, **outputs})
    _launch(p, x, weight, residual, y, block_scale, global_scale, eps, scale)


@_norm_kernel.register_fake
def _norm_kernel_fake(x, weight, residual, y, block_scale, global_scale, op, in_dtype, out_format, heads,
                      scale_layout, eps, scale) -> None:
    return None


_ONES: dict = {}


def _unit_global_scale(device: torch.device) -> torch.Tensor:
    t = _ONES.get(device)
    if t is None:
        t = _ONES[device] = torch.ones(1, dtype=torch.float32, device=device)
    return t


def _run(op, x3, weight, residual, y3, block_scale=None, global_scale=None, *, out_format, heads=1,
         scale_layout="rowmajor", eps=1e-6, scale=1.0):
    in_dtype = _IN_DTYPES[x3.dtype]
    if op == "rmsnorm_fp4quant" and out_format == "nvfp4" and global_scale is None:
        global_scale = _unit_global_scale(x3.device)
    Problem(op, x3.shape[0], weight.shape[0], in_dtype, out_format, heads, scale_layout)  # validates combination
    if x3.shape[0] == 0:
        return
    torch.ops.lutforge.norm_kernel(x3, weight, residual, y3, block_scale, global_scale, op, in_dtype,
                                   out_format, heads, scale_layout, eps, scale)


# --------------------------------------------------------------------------- public ops
def _plain(op: str, input, weight, eps, out):
    dt = _dtype_name(input, "input")
    x = _as_2d(input)
    _check_last_dim_contiguous(x, "input")
    eps = _check_eps(eps)
    _check_weight(weight, x.shape[1], x.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _check_out(out, x.shape, x.dtype)
    _same_device({"input": x, "weight": weight, "out": out})
    _run(op, x.unsqueeze(1), weight, None, out.unsqueeze(1), out_format=dt, eps=eps)
    return out


def rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None):
    """out = input / sqrt(mean(input^2) + eps) * weight, per row of a [tokens, hidden] tensor."""
    return _plain("rmsnorm", input, weight, eps, out)


def gemma_rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None):
    """RMSNorm with Gemma's weight offset: ... * (1 + weight)."""
    return _plain("gemma_rmsnorm", input, weight, eps, out)


def _fused_add(op, input, residual, weight, eps, out=None, scale=None):
    dt = _dtype_name(input, "input")
    x = _as_2d(input)
    eps = _check_eps(eps)
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a torch.Tensor, got {type(residual).__name__}")
    if residual.dtype != x.dtype or tuple(residual.shape) != tuple(x.shape):
        raise ValueError(f"residual must match input ({tuple(x.shape)}, {x.dtype}); "
                         f"got {tuple(residual.shape)}, {residual.dtype}")
    _check_weight(weight, x.shape[1], x.dtype)
    _check_last_dim_contiguous(x, "input")
    _check_last_dim_contiguous(residual, "residual")
    _same_device({"input": x, "residual": residual, "weight": weight, "out": out})
    if out is None:
        _run(op, x.unsqueeze(1), weight, residual, x.unsqueeze(1), out_format=dt, eps=eps)
    else:
        _run(op, x.unsqueeze(1), weight, residual, out.unsqueeze(1), out_format="fp8", eps=eps, scale=scale)


def fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> None:
    """In place: residual += input; input = rmsnorm(residual) * weight (flashinfer semantics)."""
    _fused_add("fused_add_rmsnorm", input, residual, weight, eps)


def gemma_fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            eps: float = 1e-6) -> None:
    """fused_add_rmsnorm with Gemma's weight offset (1 + weight)."""
    _fused_add("gemma_fused_add_rmsnorm", input, residual, weight, eps)


def _check_scale(scale) -> float:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError("scale must be a float or a one-element tensor")
        scale = float(scale.item())
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive float, got {scale!r}")
    return float(scale)


def rmsnorm_quant(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, scale: float,
                  eps: float = 1e-6) -> torch.Tensor:
    """out (fp8 e4m3) = clamp(rmsnorm(input) * weight / scale, +-448), static per-tensor scale."""
    _dtype_name(input, "input")
    x = _as_2d(input)
    eps, scale = _check_eps(eps), _check_scale(scale)
    _check_weight(weight, x.shape[1], x.dtype)
    _check_out(out, x.shape, torch.float8_e4m3fn)
    _check_last_dim_contiguous(x, "input")
    _same_device({"input": x, "weight": weight, "out": out})
    _run("rmsnorm_quant", x.unsqueeze(1), weight, None, out.unsqueeze(1), out_format="fp8", eps=eps, scale=scale)
    return out


def fused_add_rmsnorm_quant(out: torch.Tensor, input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            scale: float, eps: float = 1e-6) -> torch.Tensor:
    """residual += input (in place); out (fp8) = clamp(rmsnorm(residual) * weight / scale, +-448)."""
    _dtype_name(input, "input")
    x = _as_2d(input)
    _check_out(out, x.shape, torch.float8_e4m3fn)
    _fused_add("fused_add_rmsnorm_quant", input, residual, weight, eps, out=out, scale=_check_scale(scale))
    return out


def _qk(op, input, weight, eps, out):
    dt = _dtype_name(input, "input")
    if input.dim() != 3:
        raise ValueError(f"input must be 3D [tokens, heads, head_dim], got shape {tuple(input.shape)}")
    eps = _check_eps(eps)
    T, H, D = input.shape
    _check_weight(weight, D, input.dtype)
    if out is None:
        out = torch.empty((T, H, D), dtype=input.dtype, device=input.device)
    _check_out(out, (T, H, D), input.dtype)
    _check_last_dim_contiguous(input, "input")
    _same_device({"input": input, "weight": weight, "out": out})
    _run(op, input, weight, None, out, out_format=dt, heads=H, eps=eps)
    return out


def qk_rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None):
    """Per-head RMSNorm of [tokens, heads, head_dim] (any token/head strides), weight [head_dim]."""
    return _qk("qk_rmsnorm", input, weight, eps, out)


def gemma_qk_rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None):
    """qk_rmsnorm with Gemma's weight offset (1 + weight)."""
    return _qk("gemma_qk_rmsnorm", input, weight, eps, out)


def fused_rmsnorm_silu(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None,
                       block_scale: torch.Tensor | None = None):
    """SiLU(rmsnorm(input) * weight). The dtype of `out` selects the format: input dtype, float8_e4m3fn,
    or float4_e2m1fn_x2/uint8 [T, C/2] (NVFP4; returns (out, block_scale e4m3 [T, C/16]))."""
    dt = _dtype_name(input, "input")
    x = _as_2d(input)
    eps = _check_eps(eps)
    T, C = x.shape
    _check_weight(weight, C, x.dtype)
    _check_last_dim_contiguous(x, "input")
    if out is None:
        out = torch.empty((T, C), dtype=x.dtype, device=x.device)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    fp4 = out.dtype == torch.uint8 or (_FP4_DTYPE is not None and out.dtype == _FP4_DTYPE)
    if fp4:
        if C % 16:
            raise ValueError(f"NVFP4 output needs hidden_size divisible by 16, got {C}")
        _check_out(out, (T, C // 2), out.dtype)
        if block_scale is None:
            block_scale = torch.empty((T, C // 16), dtype=torch.float8_e4m3fn, device=x.device)
        _check_out(block_scale, (T, C // 16), torch.float8_e4m3fn, "block_scale")
        if block_scale.stride(0) != C // 16 and T > 1:
            raise ValueError("block_scale must be contiguous")
        _same_device({"input": x, "weight": weight, "out": out, "block_scale": block_scale})
        _run("fused_rmsnorm_silu", x.unsqueeze(1), weight, None, out.view(torch.uint8).unsqueeze(1),
             block_scale.view(torch.uint8), out_format="nvfp4", eps=eps)
        return out, block_scale
    if out.dtype not in (x.dtype, torch.float8_e4m3fn):
        raise TypeError(f"out dtype must be {x.dtype}, float8_e4m3fn or float4_e2m1fn_x2; got {out.dtype}")
    _check_out(out, (T, C), out.dtype)
    _same_device({"input": x, "weight": weight, "out": out})
    fmt = "fp8" if out.dtype == torch.float8_e4m3fn else dt
    _run("fused_rmsnorm_silu", x.unsqueeze(1), weight, None, out.unsqueeze(1), out_format=fmt, eps=eps)
    return out


def rmsnorm_fp4quant(input: torch.Tensor, weight: torch.Tensor, y_fp4: torch.Tensor | None = None,
                     block_scale: torch.Tensor | None = None, global_scale: torch.Tensor | None = None,
                     eps: float = 1e-6, block_size: int = 16, scale_format: str | None = None,
                     is_sf_swizzled_layout: bool = False, enable_pdl: bool | None = None):
    """RMSNorm then FP4 quantisation: NVFP4 (block 16, e4m3 scales, optional multiplicative global scale)
    or MXFP4 (block 32, ue8m0 scales); 2D [B, C] or 3D [B, S, C] input; row-major or 128x4 swizzled
    scales. Returns (y_fp4 [..., C/2], block_scale). `enable_pdl` is accepted for API compatibility."""
    _dtype_name(input, "input")
    if input.dim() not in (2, 3):
        raise ValueError(f"input must be 2D or 3D, got shape {tuple(input.shape)}")
    eps = _check_eps(eps)
    if block_size not in (16, 32) or isinstance(block_size, bool):
        raise ValueError(f"block_size must be 16 (NVFP4) or 32 (MXFP4), got {block_size!r}")
    fmt = {16: "nvfp4", 32: "mxfp4"}[block_size]
    expected_sf = {16: "e4m3", 32: "ue8m0"}[block_size]
    if scale_format is not None and scale_format != expected_sf:
        raise ValueError(f"block_size={block_size} uses scale_format {expected_sf!r}, got {scale_format!r}")
    if not isinstance(is_sf_swizzled_layout, bool):
        raise TypeError("is_sf_swizzled_layout must be a bool")
    lead = tuple(input.shape[:-1])
    C = input.shape[-1]
    if C % block_size:
        raise ValueError(f"hidden size {C} is not divisible by block_size {block_size}")
    _check_weight(weight, C, input.dtype)
    _check_last_dim_contiguous(input, "input")
    rows = math.prod(lead)
    if global_scale is not None:
        if not isinstance(global_scale, torch.Tensor) or global_scale.dtype != torch.float32 \
                or global_scale.numel() != 1:
            raise ValueError("global_scale must be a float32 tensor with one element")
        if fmt == "mxfp4":
            raise ValueError("global_scale applies to NVFP4 (block_size=16) only")
    if y_fp4 is None:
        y_fp4 = torch.empty(lead + (C // 2,), dtype=_FP4_DTYPE or torch.uint8, device=input.device)
    if not isinstance(y_fp4, torch.Tensor) or y_fp4.dtype not in (torch.uint8, _FP4_DTYPE):
        raise TypeError("y_fp4 must be a float4_e2m1fn_x2 or uint8 tensor")
    _check_out(y_fp4, lead + (C // 2,), y_fp4.dtype, "y_fp4")
    n_sf = C // block_size
    sf_dtype = torch.float8_e4m3fn if fmt == "nvfp4" else torch.uint8
    if is_sf_swizzled_layout:
        size = -(-rows // 128) * 128 * (-(-n_sf // 4) * 4)
        if block_scale is None:
            block_scale = torch.empty((size,), dtype=sf_dtype, device=input.device)
        if not isinstance(block_scale, torch.Tensor) or block_scale.dtype != sf_dtype:
            raise TypeError(f"block_scale must be a {sf_dtype} tensor")
        if block_scale.numel() < size or not block_scale.is_contiguous():
            raise ValueError(f"swizzled block_scale needs a contiguous buffer of {size} elements "
                             f"(rows padded to 128, scale columns to 4), got {block_scale.numel()}")
        sf_view = block_scale.view(-1).view(torch.uint8)
    else:
        if block_scale is None:
            block_scale = torch.empty(lead + (n_sf,), dtype=sf_dtype, device=input.device)
        _check_out(block_scale, lead + (n_sf,), sf_dtype, "block_scale")
        if not block_scale.is_contiguous():
            raise ValueError("block_scale must be contiguous")
        sf_view = block_scale.view(torch.uint8).reshape(rows, n_sf)
    _same_device({"input": input, "weight": weight, "y_fp4": y_fp4, "block_scale": block_scale,
                  "global_scale": global_scale})
    # rows are flattened (B*S for 3D input); the input may be copied to get there, the output may not
    x3 = input.reshape(rows, 1, C) if input.dim() == 3 else input.unsqueeze(1)
    try:
        y3 = y_fp4.view(torch.uint8).view(rows, 1, C // 2)
    except RuntimeError as e:
        raise ValueError(f"y_fp4 rows must be flattenable to [{rows}, {C // 2}] without a copy: {e}") from None
    layout = "swizzled" if is_sf_swizzled_layout else "rowmajor"
    _run("rmsnorm_fp4quant", x3, weight, None, y3, sf_view, global_scale, out_format=fmt, scale_layout=layout, eps=eps)
    return y_fp4, block_scale


__all__ = ["rmsnorm", "gemma_rmsnorm", "fused_add_rmsnorm", "gemma_fused_add_rmsnorm", "rmsnorm_quant",
           "fused_add_rmsnorm_quant", "qk_rmsnorm", "gemma_qk_rmsnorm", "fused_rmsnorm_silu", "rmsnorm_fp4quant"]
