"""Public ops of the runtime library (signatures follow flashinfer's), eager-fast and torch.compile-able.

Every op validates dtype, shape, device, strides, alignment and aliasing and raises ValueError or TypeError
before anything is launched. Validation, dispatch (LUT, then heuristic) and the compiled function depend only
on the call's signature - shapes, strides, dtypes, devices and the pointers' 16-byte alignment class - so
they run once per signature and are cached in a `_Plan`; a repeated call costs a dict lookup, the output
allocation, an overlap check on the pointers and one TVM-FFI call with integer pointers on the current raw
stream (no torch dispatcher, no per-call objects). Under torch.compile the ops trace to the custom op
`lutforge::norm` (its fake needs no GPU), whose kernel runs the same eager path; CUDA-graph capture works on
either path since the launch goes to the current stream.

Inputs come as serving code passes them: `[..., hidden]` with any leading dims whose rows flatten without a
copy (a single row stride), per-head ops `[..., heads, head_dim]`.
"""
from __future__ import annotations

import math

import torch

from .compile_cache import arch_name, get_compiled
from .dispatch import device_class_of, on_reload, select_config
from .problem import FP4_BLOCK, Problem

_IN_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
_FP4_DTYPE = getattr(torch, "float4_e2m1fn_x2", None)
_FP8 = torch.float8_e4m3fn
_INF = math.inf
_DEVICE_INFO: dict = {}
_PLANS: dict = {}
PLAN_CACHE_SIZE = 8192  # signatures kept; a serving process meets a few dozen (T varies, C does not)
on_reload(_PLANS.clear)  # plans hold dispatch answers
_compiling = torch.compiler.is_compiling
# C entry points torch's own generated code uses (CPU builds of torch lack them; no launch happens there)
_get_device = getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", lambda d: torch.cuda.current_stream(d).cuda_stream)


# --------------------------------------------------------------------------- validation helpers
def _dtype_name(t, what: str) -> str:
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


def _rows(t: torch.Tensor, what: str, inner: int = 1, written: bool = False) -> tuple[int, int]:
    """(rows, row stride in elements) of `t` seen as rows over its leading dims (all but the last `inner`):
    the leading dims must flatten to one stride without a copy, the last dim must be contiguous."""
    shape, stride = t.shape, t.stride()
    if t.numel() and shape[-1] > 1 and stride[-1] != 1:
        raise ValueError(f"{what} must be contiguous in its last dimension (stride {stride[-1]})")
    for d in range(t.dim()):
        if shape[d] > 1 and stride[d] < 0:
            raise ValueError(f"{what} has a negative stride in dim {d}")
    lead = t.dim() - inner
    rows = math.prod(shape[:lead])
    row_stride, expect = None, None
    for d in reversed(range(lead)):
        if shape[d] == 1:
            continue
        if row_stride is None:
            row_stride = stride[d]
        elif stride[d] != expect:
            raise ValueError(f"{what} of shape {tuple(shape)} and strides {tuple(stride)}: its leading dims do not "
                             f"flatten to rows without a copy (pass a tensor whose rows have one stride, e.g. "
                             f".contiguous())")
        expect = stride[d] * shape[d]
    inner_extent = 1 + sum((s - 1) * st for s, st in zip(shape[lead:], stride[lead:]) if s > 0)
    if row_stride is None:
        row_stride = inner_extent
    if written and rows > 1 and row_stride < inner_extent:
        raise ValueError(f"{what} rows overlap in memory (row stride {row_stride} < row extent {inner_extent})")
    return rows, row_stride


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


def _check_scale(scale) -> float:
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError("scale must be a float or a one-element tensor")
        scale = float(scale.item())
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive float, got {scale!r}")
    return float(scale)


def _check_out(out, shape: tuple, dtype: torch.dtype, what: str = "out") -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{what} must have dtype {dtype}, got {out.dtype}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{what} must have shape {tuple(shape)}, got {tuple(out.shape)}")


def _extent_bytes(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    return (1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)) * t.element_size()


# --------------------------------------------------------------------------- plans
class _Plan:
    """Everything a call of one signature needs: the compiled function, the launch arguments that do not
    change per call, the outputs to allocate and the byte extents for the per-call overlap check."""

    __slots__ = ("fn", "dev", "tail", "grid", "y_shape", "y_dtype", "sf_shape", "sf_dtype", "device",
                 "extents", "problem", "config", "tier", "like")

    def __init__(self):
        self.fn = None
        self.extents = ()
        self.like = False  # y can be allocated as empty_like(x): x contiguous, y of x's shape (half the cost)

    def new_y(self, x: torch.Tensor) -> torch.Tensor:
        if self.like:
            return torch.empty_like(x) if self.y_dtype is x.dtype else torch.empty_like(x, dtype=self.y_dtype)
        return torch.empty(self.y_shape, dtype=self.y_dtype, device=self.device)


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


def _stride_with_divisibility(g: int, C: int) -> int:
    """A row stride >= C divisible by exactly the powers of two (up to 16) that divide g: what the
    knob constraints need to know about the real strides."""
    p = 1
    while p < 16 and g % (2 * p) == 0:
        p *= 2
    return p * (2 * (-(-C // (2 * p))) + 1)


def _align(*ptrs: int) -> int:
    a = 0
    for p in ptrs:
        a |= p
    a &= 15
    return 16 if a == 0 else a & -a


def _build_plan(problem: Problem, device: torch.device, x_ptrs: tuple, y_ptr_align: int, strides: tuple,
                sf_rows: int = 0, sf0: int = 0) -> _Plan:
    """Dispatch and compile for a validated signature. strides = (sx0, sx1, sr0, sy0, sy1) in elements of
    their tensors (FP4 y in bytes); x_ptrs the pointers read at 2-byte width (x, weight, residual)."""
    plan = _Plan()
    plan.problem = problem
    plan.dev = device.index if device.index is not None else torch.cuda.current_device()
    plan.device = torch.device("cuda", plan.dev)
    plan.tail = (problem.T,) + tuple(int(s) for s in strides) + (int(sf_rows), int(sf0))
    if problem.T == 0:
        return plan
    sm, dev_class, sm_count = _device_info(device)
    sx0, sx1, sr0, sy0, sy1 = strides
    # Every stride must be a multiple of the vector (in elements; FP4 bytes hold two elements).
    y_unit = 2 if problem.out_format in FP4_BLOCK else 1
    g = 0
    for s in [sx0, sy0 * y_unit] + ([sx1, sy1 * y_unit] if problem.heads > 1 else []) \
            + ([sr0] if problem.spec.residual else []):
        g = math.gcd(g, int(s))
    row_stride = _stride_with_divisibility(g, problem.C)
    # y vectors hold the same element count in 1/2 (fp8) or 1/4 (FP4) of the bytes
    y_scale = {"fp8": 2}.get(problem.out_format, 4 if problem.out_format in FP4_BLOCK else 1)
    align = min(_align(*x_ptrs), y_scale * y_ptr_align)
    cfg, tier = select_config(problem, sm, dev_class, row_stride=row_stride, ptr_align=align)
    plan.config, plan.tier = cfg, tier
    plan.fn = get_compiled(problem, cfg, arch_name(sm))
    plan.grid = max(1, sm_count * cfg.ctas_per_sm)
    return plan


def _remember(key, plan: _Plan) -> _Plan:
    if key is not None:
        if len(_PLANS) >= PLAN_CACHE_SIZE:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _overlap(a: int, alen: int, b: int, blen: int) -> bool:
    return alen and blen and a < b + blen and b < a + alen


def _check_overlaps(names: tuple, ptrs: tuple, extents: tuple) -> None:
    """Outputs must not alias inputs: checked on the pointers of every call (the extents are per signature)."""
    for i in range(len(ptrs)):
        for j in range(i + 1, len(ptrs)):
            if _overlap(ptrs[i], extents[i], ptrs[j], extents[j]):
                raise ValueError(f"{names[i]} and {names[j]} overlap in memory; outputs must not alias inputs")


def _launch(plan: _Plan, xp: int, wp: int, rp, yp: int, sfp, gsp, eps: float, scale: float) -> None:
    if plan.fn is None:
        return
    dev = plan.dev
    if _get_device() != dev:
        with torch.cuda.device(dev):
            return _launch(plan, xp, wp, rp, yp, sfp, gsp, eps, scale)
    # The kernel zeroes the swizzled scales' padding itself: the separate zero_() launch it replaces made
    # swizzled rmsnorm_fp4quant 4.2 us against 1.7 us row-major (H200, T=1560, C=64).
    plan.fn(xp, wp, rp, yp, sfp, gsp, *plan.tail, eps, scale, plan.grid, _raw_stream(dev))


def _launch_into(plan: _Plan, x, xp: int, wp: int, out, eps: float, scale: float):
    """Launch an op with one output: allocated per the plan when `out` is None, else checked against the inputs."""
    if out is None:
        out = plan.new_y(x)
        yp = out.data_ptr()
    else:
        yp = out.data_ptr()
        _check_overlaps(("input", "weight", "out"), (xp, wp, yp), plan.extents)
    _launch(plan, xp, wp, None, yp, None, None, eps, scale)
    return out


def _eps(eps) -> float:
    return eps if isinstance(eps, float) and 0.0 <= eps < _INF else _check_eps(eps)


# --------------------------------------------------------------------------- torch.compile path
@torch.library.custom_op("lutforge::norm", mutates_args=("x", "residual", "y", "block_scale"), device_types="cuda")
def _norm_op(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, y: torch.Tensor | None,
             block_scale: torch.Tensor | None, global_scale: torch.Tensor | None, op: str, eps: float,
             scale: float, swizzled: bool) -> None:
    """One custom op for the family: traced calls land here and run the eager path on real tensors
    (y None: the fused-add ops normalise x in place)."""
    _EAGER[op](x, weight, residual, y, block_scale, global_scale, eps, scale, swizzled)


@_norm_op.register_fake
def _norm_op_fake(x, weight, residual, y, block_scale, global_scale, op, eps, scale, swizzled) -> None:
    return None


# --------------------------------------------------------------------------- plain rows: rmsnorm, gemma, silu, quant
def _plain_key(op, x, w, out, fmt_tag):
    xp, wp = x.data_ptr(), w.data_ptr()
    k = (op, fmt_tag, type(x), x.shape, x.stride(), x.dtype, x.device, type(w), w.shape, w.stride(), w.dtype,
         w.device, (xp | wp) & 15)
    if out is not None:
        k += (type(out), out.shape, out.stride(), out.dtype, out.device, out.data_ptr() & 15)
    return k, xp, wp


def _plain_plan(op: str, x, w, out, out_dtype, key) -> _Plan:
    """Validate a row op with one output of x's shape (dtype out_dtype, None = x's) and build its plan."""
    dt = _dtype_name(x, "input")
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if x.dim() < 1:
        raise ValueError(f"input must be [..., hidden], got shape {tuple(x.shape)}")
    rows, sx = _rows(x, "input")
    C = x.shape[-1]
    _check_weight(w, C, x.dtype)
    if out is not None:
        _check_out(out, x.shape, out_dtype)
        _, sy = _rows(out, "out", written=True)
    else:
        sy = C
    dev = _same_device({"input": x, "weight": w, "out": out})
    fmt = {_FP8: "fp8"}.get(out_dtype, dt)
    p = Problem(op, rows, C, dt, fmt)
    plan = _build_plan(p, dev, (x.data_ptr(), w.data_ptr()), 16 if out is None else _align(out.data_ptr()),
                       (sx, 0, 0, sy, 0))
    plan.y_shape, plan.y_dtype = tuple(x.shape), out_dtype
    plan.like = x.is_contiguous()
    plan.extents = (_extent_bytes(x), _extent_bytes(w), 0 if out is None else _extent_bytes(out))
    return _remember(key, plan)


def _plain(op: str, x, w, eps, out, out_dtype=None, scale: float = 1.0):
    """rmsnorm-like ops: y[..., C] = f(x[..., C]) * w; out_dtype None = x's dtype."""
    if _compiling():
        od = x.dtype if out_dtype is None else out_dtype
        _plain_validate_traced(x, w, out, od)
        if out is None:
            out = torch.empty(x.shape, dtype=od, device=x.device)
        torch.ops.lutforge.norm(x, w, None, out, None, None, op, _check_eps(eps), scale, False)
        return out
    key = None
    try:
        key, xp, wp = _plain_key(op, x, w, out, out_dtype)
        plan = _PLANS[key]
    except (KeyError, AttributeError, TypeError, RuntimeError):
        _check_eps(eps)
        plan = _plain_plan(op, x, w, out, out_dtype, key)
        xp, wp = x.data_ptr(), w.data_ptr()
    return _launch_into(plan, x, xp, wp, out, _eps(eps), scale)


def _plain_validate_traced(x, w, out, out_dtype) -> None:
    """What can be checked on fake tensors at trace time (the eager kernel checks the rest at run time)."""
    _dtype_name(x, "input")
    _check_weight(w, x.shape[-1], x.dtype)
    if out is not None:
        _check_out(out, x.shape, out_dtype)


def _eager_plain(op):
    def run(x, w, residual, y, block_scale, global_scale, eps, scale, swizzled):
        _plain(op, x, w, eps, y, None if y.dtype == x.dtype else y.dtype, scale)
    return run


def rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None):
    """out = input / sqrt(mean(input^2) + eps) * weight over the last dim of [..., hidden]."""
    return _plain("rmsnorm", input, weight, eps, out)


def gemma_rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None):
    """RMSNorm with Gemma's weight offset: ... * (1 + weight)."""
    return _plain("gemma_rmsnorm", input, weight, eps, out)


def rmsnorm_quant(out: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, scale: float,
                  eps: float = 1e-6) -> torch.Tensor:
    """out (fp8 e4m3) = clamp(rmsnorm(input) * weight / scale, +-448), static per-tensor scale."""
    if out is None:
        raise TypeError("out must be a torch.Tensor, got NoneType")
    scale = scale if isinstance(scale, float) and 0.0 < scale < _INF else _check_scale(scale)
    return _plain("rmsnorm_quant", input, weight, eps, out, _FP8, scale)


def fused_rmsnorm_silu(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None,
                       block_scale: torch.Tensor | None = None):
    """SiLU(rmsnorm(input) * weight) over the last dim of [..., hidden]. The dtype of `out` selects the format:
    input dtype, float8_e4m3fn, or float4_e2m1fn_x2/uint8 [..., C/2] (NVFP4; returns (out, block_scale e4m3
    [..., C/16]))."""
    if out is not None and isinstance(out, torch.Tensor) and (out.dtype == torch.uint8 or out.dtype == _FP4_DTYPE):
        return _fp4("fused_rmsnorm_silu", input, weight, out, block_scale, None, eps, 16, False)
    od = None
    if out is not None and isinstance(out, torch.Tensor) and isinstance(input, torch.Tensor) and out.dtype != input.dtype:
        if out.dtype != _FP8:
            raise TypeError(f"out dtype must be {input.dtype}, float8_e4m3fn or float4_e2m1fn_x2; got {out.dtype}")
        od = _FP8
    return _plain("fused_rmsnorm_silu", input, weight, eps, out, od)


# --------------------------------------------------------------------------- fused add (in place)
def _fused_add(op: str, x, residual, w, eps, out=None, scale: float = 1.0):
    """residual += x; then x = norm(residual) * w in place, or out (fp8) = quant(norm(residual) * w)."""
    if _compiling():
        _dtype_name(x, "input")
        _check_weight(w, x.shape[-1], x.dtype)
        torch.ops.lutforge.norm(x, w, residual, out, None, None, op, _check_eps(eps), scale, False)
        return
    key = None
    try:
        xp, wp, rp = x.data_ptr(), w.data_ptr(), residual.data_ptr()
        key = (op, type(x), x.shape, x.stride(), x.dtype, x.device, type(residual), residual.shape,
               residual.stride(), residual.dtype, residual.device, type(w), w.shape, w.stride(), w.dtype, w.device,
               (xp | wp | rp) & 15)
        if out is not None:
            key += (type(out), out.shape, out.stride(), out.dtype, out.device, out.data_ptr() & 15)
        plan = _PLANS[key]
    except (KeyError, AttributeError, TypeError, RuntimeError):
        _check_eps(eps)
        plan = _fused_add_plan(op, x, residual, w, out, key)
        xp, wp, rp = x.data_ptr(), w.data_ptr(), residual.data_ptr()
    eps = _eps(eps)
    if out is None:
        _check_overlaps(("input", "residual", "weight"), (xp, rp, wp), plan.extents)
        yp = xp
    else:
        yp = out.data_ptr()
        _check_overlaps(("input", "residual", "weight", "out"), (xp, rp, wp, yp), plan.extents)
    _launch(plan, xp, wp, rp, yp, None, None, eps, scale)


def _fused_add_plan(op, x, residual, w, out, key) -> _Plan:
    dt = _dtype_name(x, "input")
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a torch.Tensor, got {type(residual).__name__}")
    if residual.dtype != x.dtype or tuple(residual.shape) != tuple(x.shape):
        raise ValueError(f"residual must match input ({tuple(x.shape)}, {x.dtype}); "
                         f"got {tuple(residual.shape)}, {residual.dtype}")
    if x.dim() < 1:
        raise ValueError(f"input must be [..., hidden], got shape {tuple(x.shape)}")
    C = x.shape[-1]
    _check_weight(w, C, x.dtype)
    rows, sx = _rows(x, "input", written=out is None)
    _, sr = _rows(residual, "residual", written=True)
    if out is not None:
        _check_out(out, x.shape, _FP8)
        _, sy = _rows(out, "out", written=True)
    else:
        sy = sx
    dev = _same_device({"input": x, "residual": residual, "weight": w, "out": out})
    p = Problem(op, rows, C, dt, dt if out is None else "fp8")
    plan = _build_plan(p, dev, (x.data_ptr(), w.data_ptr(), residual.data_ptr()),
                       _align(x.data_ptr() if out is None else out.data_ptr()), (sx, 0, sr, sy, 0))
    plan.y_shape, plan.y_dtype = tuple(x.shape), x.dtype if out is None else _FP8
    plan.extents = (_extent_bytes(x), _extent_bytes(residual), _extent_bytes(w)) \
        + (() if out is None else (_extent_bytes(out),))
    return _remember(key, plan)


def _eager_fused_add(op):
    def run(x, w, residual, y, block_scale, global_scale, eps, scale, swizzled):
        _fused_add(op, x, residual, w, eps, y, scale)
    return run


def fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> None:
    """In place: residual += input; input = rmsnorm(residual) * weight (flashinfer semantics)."""
    _fused_add("fused_add_rmsnorm", input, residual, weight, eps)


def gemma_fused_add_rmsnorm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            eps: float = 1e-6) -> None:
    """fused_add_rmsnorm with Gemma's weight offset (1 + weight)."""
    _fused_add("gemma_fused_add_rmsnorm", input, residual, weight, eps)


def fused_add_rmsnorm_quant(out: torch.Tensor, input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            scale: float, eps: float = 1e-6) -> torch.Tensor:
    """residual += input (in place); out (fp8) = clamp(rmsnorm(residual) * weight / scale, +-448)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != _FP8:
        raise TypeError(f"out must have dtype {_FP8}, got {out.dtype}")
    scale = scale if isinstance(scale, float) and 0.0 < scale < _INF else _check_scale(scale)
    _fused_add("fused_add_rmsnorm_quant", input, residual, weight, eps, out=out, scale=scale)
    return out


# --------------------------------------------------------------------------- per-head
def _qk(op: str, x, w, eps, out):
    if _compiling():
        _dtype_name(x, "input")
        _check_weight(w, x.shape[-1], x.dtype)
        if out is None:
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        torch.ops.lutforge.norm(x, w, None, out, None, None, op, _check_eps(eps), 1.0, False)
        return out
    key = None
    try:
        key, xp, wp = _plain_key(op, x, w, out, "qk")
        plan = _PLANS[key]
    except (KeyError, AttributeError, TypeError, RuntimeError):
        _check_eps(eps)
        plan = _qk_plan(op, x, w, out, key)
        xp, wp = x.data_ptr(), w.data_ptr()
    return _launch_into(plan, x, xp, wp, out, _eps(eps), 1.0)


def _qk_plan(op, x, w, out, key) -> _Plan:
    dt = _dtype_name(x, "input")
    if x.dim() < 3:
        raise ValueError(f"input must be 3D [tokens, heads, head_dim] (or [..., heads, head_dim]), "
                         f"got shape {tuple(x.shape)}")
    H, D = x.shape[-2], x.shape[-1]
    _check_weight(w, D, x.dtype)
    T, sx0 = _rows(x, "input", inner=2)
    sx1 = x.stride(-2) if H > 1 else D
    if out is not None:
        _check_out(out, x.shape, x.dtype)
        _, sy0 = _rows(out, "out", inner=2, written=True)
        sy1 = out.stride(-2) if H > 1 else D
        if H > 1 and D > 1 and abs(sy1) < D:
            raise ValueError("out heads overlap in memory")
    else:
        sy0, sy1 = H * D, D
    dev = _same_device({"input": x, "weight": w, "out": out})
    p = Problem(op, T, D, dt, dt, H)
    plan = _build_plan(p, dev, (x.data_ptr(), w.data_ptr()), 16 if out is None else _align(out.data_ptr()),
                       (sx0, sx1, 0, sy0, sy1))
    plan.y_shape, plan.y_dtype = tuple(x.shape), x.dtype
    plan.like = x.is_contiguous()
    plan.extents = (_extent_bytes(x), _extent_bytes(w), 0 if out is None else _extent_bytes(out))
    return _remember(key, plan)


def _eager_qk(op):
    def run(x, w, residual, y, block_scale, global_scale, eps, scale, swizzled):
        _qk(op, x, w, eps, y)
    return run


def qk_rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None):
    """Per-head RMSNorm of [tokens, heads, head_dim] (any token/head strides; more leading dims flatten into
    tokens), weight [head_dim]."""
    return _qk("qk_rmsnorm", input, weight, eps, out)


def gemma_qk_rmsnorm(input: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, out: torch.Tensor | None = None):
    """qk_rmsnorm with Gemma's weight offset (1 + weight)."""
    return _qk("gemma_qk_rmsnorm", input, weight, eps, out)


# --------------------------------------------------------------------------- FP4 outputs
def _fp4(op: str, x, w, y, sf, gs, eps, block: int, swizzled: bool):
    """FP4 outputs: y [..., C/2] bytes and block scales (row-major [..., C/block] or a 128x4-swizzled buffer)."""
    if _compiling():
        lead, C = tuple(x.shape[:-1]), x.shape[-1]
        if y is None:
            y = torch.empty(lead + (C // 2,), dtype=_FP4_DTYPE or torch.uint8, device=x.device)
        if sf is None:
            sf = torch.empty(_sf_shape(lead, C, block, swizzled), dtype=_sf_dtype(block), device=x.device)
        if op == "rmsnorm_fp4quant" and block == 16 and gs is None:
            gs = torch.ones(1, dtype=torch.float32, device=x.device)
        torch.ops.lutforge.norm(x, w, None, y, sf, gs, op, _check_eps(eps), 1.0, swizzled)
        return y, sf
    key = None
    try:
        xp, wp = x.data_ptr(), w.data_ptr()
        key = (op, block, swizzled, type(x), x.shape, x.stride(), x.dtype, x.device, type(w), w.shape, w.stride(),
               w.dtype, w.device, (xp | wp) & 15)
        for t in (y, sf, gs):
            key += (None,) if t is None else (type(t), t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15)
        plan = _PLANS[key]
    except (KeyError, AttributeError, TypeError, RuntimeError):
        _check_eps(eps)
        plan = _fp4_plan(op, x, w, y, sf, gs, block, swizzled, key)
        xp, wp = x.data_ptr(), w.data_ptr()
    eps = _eps(eps)
    if y is None:
        y = torch.empty(plan.y_shape, dtype=plan.y_dtype, device=plan.device)
    if sf is None:
        sf = torch.empty(plan.sf_shape, dtype=plan.sf_dtype, device=plan.device)
    yp, sfp = y.data_ptr(), sf.data_ptr()
    if op == "rmsnorm_fp4quant" and block == 16:
        gsp = _unit_global_scale(plan.dev).data_ptr() if gs is None else gs.data_ptr()
    else:
        gsp = None
    _check_overlaps(("input", "weight", "out", "block_scale"), (xp, wp, yp, sfp), plan.extents)
    _launch(plan, xp, wp, None, yp, sfp, gsp, eps, 1.0)
    return y, sf


def _sf_dtype(block: int) -> torch.dtype:
    return _FP8 if block == 16 else torch.uint8


def _sf_shape(lead: tuple, C: int, block: int, swizzled: bool) -> tuple:
    n_sf = C // block
    if swizzled:
        return (-(-math.prod(lead) // 128) * 128 * (-(-n_sf // 4) * 4),)
    return lead + (n_sf,)


def _fp4_plan(op, x, w, y, sf, gs, block, swizzled, key) -> _Plan:
    dt = _dtype_name(x, "input")
    if x.dim() < 1:
        raise ValueError(f"input must be [..., hidden], got shape {tuple(x.shape)}")
    lead, C = tuple(x.shape[:-1]), x.shape[-1]
    fmt = {16: "nvfp4", 32: "mxfp4"}[block]
    if C % block:
        if op == "fused_rmsnorm_silu":
            raise ValueError(f"NVFP4 output needs hidden_size divisible by 16, got {C}")
        raise ValueError(f"hidden size {C} is not divisible by block_size {block}")
    _check_weight(w, C, x.dtype)
    rows, sx = _rows(x, "input")
    if gs is not None:
        if not isinstance(gs, torch.Tensor) or gs.dtype != torch.float32 or gs.numel() != 1:
            raise ValueError("global_scale must be a float32 tensor with one element")
        if fmt == "mxfp4":
            raise ValueError("global_scale applies to NVFP4 (block_size=16) only")
    y_shape = lead + (C // 2,)
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.dtype not in (torch.uint8, _FP4_DTYPE):
            raise TypeError("y_fp4 must be a float4_e2m1fn_x2 or uint8 tensor")
        _check_out(y, y_shape, y.dtype, "out" if op == "fused_rmsnorm_silu" else "y_fp4")
        _, sy = _rows(y, "y_fp4", written=True)
    else:
        sy = C // 2
    sf_dtype, n_sf = _sf_dtype(block), C // block
    sf_shape = _sf_shape(lead, C, block, swizzled)
    if sf is not None:
        if not isinstance(sf, torch.Tensor) or sf.dtype != sf_dtype:
            raise TypeError(f"block_scale must be a {sf_dtype} tensor")
        if swizzled:
            if sf.numel() < sf_shape[0] or not sf.is_contiguous():
                raise ValueError(f"swizzled block_scale needs a contiguous buffer of {sf_shape[0]} elements "
                                 f"(rows padded to 128, scale columns to 4), got {sf.numel()}")
        else:
            _check_out(sf, sf_shape, sf_dtype, "block_scale")
            if not sf.is_contiguous():
                raise ValueError("block_scale must be contiguous")
    dev = _same_device({"input": x, "weight": w, "y_fp4": y, "block_scale": sf, "global_scale": gs})
    p = Problem(op, rows, C, dt, fmt, 1, "swizzled" if swizzled else "rowmajor")
    sf_rows, sf0 = (sf_shape[0] if sf is None else sf.numel(), 1) if swizzled else (rows, n_sf)
    plan = _build_plan(p, dev, (x.data_ptr(), w.data_ptr()), 16 if y is None else _align(y.data_ptr()),
                       (sx, 0, 0, sy, 0), sf_rows, sf0)
    plan.y_shape, plan.y_dtype = y_shape, _FP4_DTYPE or torch.uint8
    plan.sf_shape, plan.sf_dtype = sf_shape, sf_dtype
    # outputs allocated per call have one byte per element (uint8 / fp4x2 / e4m3)
    plan.extents = (_extent_bytes(x), _extent_bytes(w), math.prod(y_shape) if y is None else _extent_bytes(y),
                    math.prod(sf_shape) if sf is None else _extent_bytes(sf))
    return _remember(key, plan)


_ONES: dict = {}


def _unit_global_scale(dev: int) -> torch.Tensor:
    t = _ONES.get(dev)
    if t is None:
        t = _ONES[dev] = torch.ones(1, dtype=torch.float32, device=torch.device("cuda", dev))
    return t


def _eager_fp4(op):
    def run(x, w, residual, y, block_scale, global_scale, eps, scale, swizzled):
        block = 16 if block_scale.dtype == _FP8 else 32  # NVFP4 scales are e4m3, MXFP4 ue8m0 (uint8)
        _fp4(op, x, w, y, block_scale, global_scale, eps, block, swizzled)
    return run


def rmsnorm_fp4quant(input: torch.Tensor, weight: torch.Tensor, y_fp4: torch.Tensor | None = None,
                     block_scale: torch.Tensor | None = None, global_scale: torch.Tensor | None = None,
                     eps: float = 1e-6, block_size: int = 16, scale_format: str | None = None,
                     is_sf_swizzled_layout: bool = False, enable_pdl: bool | None = None):
    """RMSNorm then FP4 quantisation: NVFP4 (block 16, e4m3 scales, optional multiplicative global scale)
    or MXFP4 (block 32, ue8m0 scales); [..., C] input (rows flattened); row-major or 128x4 swizzled
    scales. Returns (y_fp4 [..., C/2], block_scale). `enable_pdl` is accepted for API compatibility."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in (16, 32):
        raise ValueError(f"block_size must be 16 (NVFP4) or 32 (MXFP4), got {block_size!r}")
    if scale_format is not None:
        expected_sf = {16: "e4m3", 32: "ue8m0"}[block_size]
        if scale_format != expected_sf:
            raise ValueError(f"block_size={block_size} uses scale_format {expected_sf!r}, got {scale_format!r}")
    if not isinstance(is_sf_swizzled_layout, bool):
        raise TypeError("is_sf_swizzled_layout must be a bool")
    return _fp4("rmsnorm_fp4quant", input, weight, y_fp4, block_scale, global_scale, eps, block_size,
                is_sf_swizzled_layout)


_EAGER = {
    "rmsnorm": _eager_plain("rmsnorm"), "gemma_rmsnorm": _eager_plain("gemma_rmsnorm"),
    "rmsnorm_quant": _eager_plain("rmsnorm_quant"),
    "fused_add_rmsnorm": _eager_fused_add("fused_add_rmsnorm"),
    "gemma_fused_add_rmsnorm": _eager_fused_add("gemma_fused_add_rmsnorm"),
    "fused_add_rmsnorm_quant": _eager_fused_add("fused_add_rmsnorm_quant"),
    "qk_rmsnorm": _eager_qk("qk_rmsnorm"), "gemma_qk_rmsnorm": _eager_qk("gemma_qk_rmsnorm"),
    "fused_rmsnorm_silu": lambda x, w, r, y, sf, gs, eps, scale, sw: (
        _fp4("fused_rmsnorm_silu", x, w, y, sf, None, eps, 16, False) if sf is not None
        else _plain("fused_rmsnorm_silu", x, w, eps, y, None if y.dtype == x.dtype else y.dtype)),
    "rmsnorm_fp4quant": _eager_fp4("rmsnorm_fp4quant"),
}


__all__ = ["rmsnorm", "gemma_rmsnorm", "fused_add_rmsnorm", "gemma_fused_add_rmsnorm", "rmsnorm_quant",
           "fused_add_rmsnorm_quant", "qk_rmsnorm", "gemma_qk_rmsnorm", "fused_rmsnorm_silu", "rmsnorm_fp4quant"]
