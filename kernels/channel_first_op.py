"""The channel-first norms' runtime entry point: `channel_first_rmsnorm(x, weight, bias, ...)` on [B, C, *spatial].

It views x as [N, C, S] without a copy (`channel_first_view`), validates dtypes, shapes, devices, strides,
alignment and aliasing once per call signature (a repeated call costs a dict lookup), picks the config by
kernels.dispatch (the LUT's exact entry, else the channel-first heuristic) and launches the TVM-FFI function
on the current stream. Channels-last memory ([positions, C] rows) goes to the row ops on a zero-copy view.
Semantics, eps and the kernel's knobs: kernels/channel_first.py.

NVFP4 output (an `out` or `out_dtype` of torch.float4_e2m1fn_x2 or uint8; C % 16 == 0) is channels-last, what
an FP4 GEMM takes: `out` is [B, *spatial, C/2] (x's shape with C moved last and halved; its rows are the
positions in the order of the non-C dims) and `block_scale` float8_e4m3fn [B, *spatial, C/16], or with
is_sf_swizzled_layout=True a flat buffer of at least encoders.swizzled_scale_bytes(positions, C/16) bytes
in the 128x4-swizzled layout (its padding written as zeros). Both are contiguous; the call returns
(out, block_scale) as rmsnorm_fp4quant does, with the same optional global_scale (a float32 one-element
tensor on x's device, multiplicative: kernels/encoders.quantize_nvfp4).
"""
from __future__ import annotations

import math

import torch

from .channel_first import F_NORMALIZE_EPS, MAX_GRID_Y, RMS_EPS, ChannelFirstProblem, _gcd_all, get_compiled
from .dispatch import on_reload

_TORCH_IN = {torch.bfloat16: "bf16", torch.float16: "fp16"}
_FP8 = torch.float8_e4m3fn
_FP4 = getattr(torch, "float4_e2m1fn_x2", None)
_FP4_DTYPES = tuple(d for d in (_FP4, torch.uint8) if d is not None)  # NVFP4 output: packed e2m1 pairs
_PLANS: dict = {}
on_reload(_PLANS.clear)  # plans hold dispatch answers
PLAN_CACHE_SIZE = 4096


def channel_first_view(t: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(N, S, sN, sC) when t [B, C, *spatial] can be walked as [N, C, S] (S the innermost contiguous run of
    spatial dims, every other dim but C flattening to one stride sN) without a copy; None otherwise."""
    if t.dim() < 2:
        return None
    shape, stride = list(t.shape), list(t.stride())
    k, S = t.dim() - 1, 1
    while k >= 2 and (shape[k] == 1 or stride[k] == S):  # the contiguous suffix of spatial dims
        S *= shape[k]
        k -= 1
    batch = [d for d in [0] + list(range(2, k + 1)) if shape[d] != 1]
    N = math.prod(shape[d] for d in batch)
    sN = None
    for a, b in zip(batch, batch[1:]):
        if stride[a] != stride[b] * shape[b]:
            return None
    if batch:
        sN = stride[batch[-1]]
    sC = stride[1] if shape[1] > 1 else S
    if sN is None:
        sN = sC * shape[1]
    if any(s < 0 for s in (sN, sC)):
        return None
    return N, S, sN, sC


def _channels_last_rows(t: torch.Tensor) -> torch.Tensor | None:
    """t [B, C, *spatial] with C innermost (channels_last / channels_last_3d) as a zero-copy [..., C] view whose
    rows flatten (what the row ops take), else None."""
    if t.dim() < 3 or (t.shape[1] > 1 and t.stride(1) != 1):
        return None
    rows = t.movedim(1, -1)
    shape, stride = rows.shape, rows.stride()
    expect = shape[-1]
    for d in reversed(range(rows.dim() - 1)):
        if shape[d] == 1:
            continue
        if stride[d] != expect:
            return None
        expect = stride[d] * shape[d]
    return rows


class _Plan:
    """Validated signature: the route, the compiled function and its fixed launch arguments."""

    __slots__ = ("route", "fn", "tail", "dev", "y_dtype", "problem", "config", "tier", "extents", "fp4",
                 "y_shape", "sf_shape", "device")


def _flat_param(t, C: int, dtype: torch.dtype, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{what} dtype {t.dtype} must match the input dtype {dtype}")
    if t.numel() != C or sum(1 for s in t.shape if s != 1) > 1:
        raise ValueError(f"{what} must hold C={C} elements along one dim (e.g. ({C},) or ({C}, 1, 1, 1)), "
                         f"got shape {tuple(t.shape)}")
    flat = t.reshape(C)
    if C > 1 and flat.stride(0) != 1:
        raise ValueError(f"{what} must be contiguous")
    return flat


def _check_number(v, what: str, positive: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"{what} must be a finite {'positive' if positive else 'non-negative'} float, got {v!r}")
    return float(v)


def _fp4_shapes(x: torch.Tensor, swizzled: bool) -> tuple[tuple, tuple]:
    """(codes shape [B, *spatial, C/2], block_scale shape: [B, *spatial, C/16] or the flat swizzled buffer)."""
    from .encoders import swizzled_scale_bytes

    C = x.shape[1]
    lead = (x.shape[0], *x.shape[2:])
    if swizzled:
        return lead + (C // 2,), (swizzled_scale_bytes(math.prod(lead), C // 16),)
    return lead + (C // 2,), lead + (C // 16,)


def _check_fp4_outputs(x, out, block_scale, global_scale, swizzled: bool) -> tuple[tuple, tuple]:
    """Validate NVFP4's out / block_scale / global_scale against x (module docstring); their shapes."""
    C = x.shape[1]
    if C % 16:
        raise ValueError(f"NVFP4 output needs C divisible by 16 (its scale blocks run along C), got C={C}")
    y_shape, sf_shape = _fp4_shapes(x, swizzled)
    if out is not None:
        if tuple(out.shape) != y_shape:
            raise ValueError(f"NVFP4 out must be channels-last [B, *spatial, C/2] = {y_shape}, got "
                             f"{tuple(out.shape)}")
        if not out.is_contiguous():
            raise ValueError("NVFP4 out must be contiguous")
        if out.numel() and out.data_ptr() % 8:
            raise ValueError(f"NVFP4 out must be 8-byte aligned (8-byte code stores), got address "
                             f"{out.data_ptr():#x}")
    if block_scale is not None:
        if not isinstance(block_scale, torch.Tensor):
            raise TypeError(f"block_scale must be a torch.Tensor, got {type(block_scale).__name__}")
        if block_scale.dtype != _FP8:
            raise TypeError(f"block_scale must be a {_FP8} tensor (NVFP4's e4m3 scales), got {block_scale.dtype}")
        if not block_scale.is_contiguous():
            raise ValueError("block_scale must be contiguous")
        if swizzled:
            if block_scale.numel() < sf_shape[0]:
                raise ValueError(f"swizzled block_scale needs a contiguous buffer of {sf_shape[0]} elements "
                                 f"(positions padded to 128, scale columns to 4), got {block_scale.numel()}")
            if block_scale.numel() and block_scale.data_ptr() % 4:
                raise ValueError("swizzled block_scale must be 4-byte aligned (4-byte scale stores)")
        elif tuple(block_scale.shape) != sf_shape:
            raise ValueError(f"block_scale must have shape [B, *spatial, C/16] = {sf_shape}, got "
                             f"{tuple(block_scale.shape)}")
    if global_scale is not None:
        if not isinstance(global_scale, torch.Tensor) or global_scale.dtype != torch.float32 \
                or global_scale.numel() != 1:
            raise ValueError("global_scale must be a float32 tensor with one element")
    return y_shape, sf_shape


def _build_plan(x, w, b, out, out_dtype, silu: bool, l2norm: bool, scale: float, block_scale=None,
                global_scale=None, swizzled: bool = False) -> _Plan:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _TORCH_IN:
        raise TypeError(f"input must be bfloat16 or float16, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"input must be [B, C, *spatial], got shape {tuple(x.shape)}")
    C = x.shape[1]
    if C < 1:
        raise ValueError("input has no channels (C=0)")
    if out is not None and not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    y_dtype = out.dtype if out is not None else (x.dtype if out_dtype is None else out_dtype)
    fp4 = y_dtype in _FP4_DTYPES
    if y_dtype not in (x.dtype, _FP8) and not fp4:
        raise TypeError(f"output dtype must be {x.dtype}, {_FP8} or NVFP4's "
                        f"{' / '.join(str(d) for d in _FP4_DTYPES)}, got {y_dtype}")
    if out_dtype is not None and out is not None and out.dtype != out_dtype:
        raise TypeError(f"out has dtype {out.dtype} but out_dtype={out_dtype}")
    _flat_param(w, C, x.dtype, "weight")
    if b is not None:
        _flat_param(b, C, x.dtype, "bias")
    y_shape = sf_shape = None
    if fp4:
        y_shape, sf_shape = _check_fp4_outputs(x, out, block_scale, global_scale, swizzled)
    else:
        if block_scale is not None or global_scale is not None or swizzled:
            raise ValueError("block_scale, global_scale and is_sf_swizzled_layout apply to NVFP4 output only (an "
                             "out / out_dtype of torch.float4_e2m1fn_x2 or uint8)")
        if out is not None and tuple(out.shape) != tuple(x.shape):
            raise ValueError(f"out must have shape {tuple(x.shape)}, got {tuple(out.shape)}")
    if scale != 1.0 and y_dtype != _FP8:
        raise ValueError("scale applies to fp8 output only")
    for name, t in (("input", x), ("weight", w), ("bias", b), ("out", out), ("block_scale", block_scale),
                    ("global_scale", global_scale)):
        if t is not None and t.device.type != "cuda":
            raise ValueError(f"{name} must be on a CUDA device, got {t.device}")
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but the input is on {x.device}")
    plan = _Plan()
    plan.y_dtype = y_dtype
    plan.fp4, plan.y_shape, plan.sf_shape = fp4, y_shape, sf_shape
    plan.device = x.device
    plan.extents = ()
    view = channel_first_view(x)
    rows = _channels_last_rows(x) if (view is None or view[1] == 1) else None
    if rows is not None and view is not None and (l2norm or b is not None or (fp4 and silu)) \
            and math.prod(x.shape[2:]) == 1:
        rows = None  # [B, C, 1...] is channel-first and channels-last at once: the exact kernel takes it
    if rows is not None and x.numel():
        # channels-last memory is [positions, C] rows: the row ops on a zero-copy view. Exact for RMSNorm only:
        # the row kernel has neither a bias nor F.normalize's max(||x||, eps) clamp.
        if l2norm or b is not None:
            raise ValueError("channels-last input goes to the row kernel, which has no l2norm (F.normalize's "
                             "max(||x||, eps)) and no bias; pass a channel-first (contiguous) tensor, or "
                             "l2norm=False without bias (RMSNorm: eps on the mean square)")
        if fp4 and silu:
            raise ValueError("channels-last input goes to the row kernels, whose NVFP4 SiLU op "
                             "(fused_rmsnorm_silu) quantises with the unrounded scale, not rmsnorm_fp4quant's "
                             "rounded one; pass a channel-first (contiguous) tensor")
        if not fp4 and out is not None and _channels_last_rows(out) is None:
            raise ValueError("out must be channels-last like the input")
        if silu and y_dtype == _FP8 and scale != 1.0:
            raise ValueError("fused_rmsnorm_silu's fp8 output has no scale (scale must be 1.0)")
        plan.route = "rows"
        plan.fn, plan.problem, plan.config, plan.tail, plan.dev = None, None, None, (), None
        return plan
    if view is None:
        raise ValueError(f"input of shape {tuple(x.shape)} and strides {tuple(x.stride())} is neither channel-first "
                         f"(an innermost contiguous run of spatial dims, other dims flattening to one stride) nor "
                         f"channels-last; pass x.contiguous()")
    N, S, sxn, sxc = view
    if fp4:  # dense channels-last rows [N*S, C/2] (checked above), in bytes
        syn, syc = S * (C // 2), C // 2
    elif out is not None:
        oview = channel_first_view(out)
        if oview is None or oview[:2] != (N, S):
            raise ValueError(f"out (strides {tuple(out.stride())}) must walk as [N={N}, C, S={S}] like the input")
        syn, syc = oview[2:]
    else:  # y is allocated as empty_like(x), which keeps a dense tensor's strides
        if not _dense(x):
            raise ValueError("input has gaps between its elements; pass out or x.contiguous()")
        syn, syc = sxn, sxc
    plan.route = "cf"
    fmt = "nvfp4" if fp4 else "fp8" if y_dtype == _FP8 else _TORCH_IN[x.dtype]
    p = ChannelFirstProblem(N, C, S, _TORCH_IN[x.dtype], fmt, bool(silu), b is not None, bool(l2norm),
                            "swizzled" if swizzled else "rowmajor")
    if N > MAX_GRID_Y:
        raise ValueError(f"N={N} > {MAX_GRID_Y} batch positions per launch")
    plan.problem = p
    if x.numel() == 0:
        plan.fn, plan.config, plan.tail, plan.dev = None, None, (), None
        return plan
    from .dispatch import default_dispatcher
    from .ops import _align, _device_info  # pointer alignment class; SM90+ check (here: ops imports dispatch)

    sm, dev_class, _ = _device_info(x.device)
    dev = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if fp4:  # the codes are not vectorised along S: only x's strides and alignment constrain the config
        g = _gcd_all(S, *(s for s, n in ((sxn, N), (sxc, C)) if n > 1))
        align = _align(x.data_ptr())
    else:
        g = _gcd_all(S, *(s for s, n in ((sxn, N), (syn, N), (sxc, C), (syc, C)) if n > 1))
        y_align = 16 if out is None else _align(out.data_ptr())
        align = min(_align(x.data_ptr()), (2 if fmt == "fp8" else 1) * y_align)
    # the LUT's exact entry for this (op, formats, C, N, S) when it fits the strides and alignment, else the
    # heuristic (kernels.dispatch; memoised per call signature like everything else in the plan)
    sel = default_dispatcher().lookup(p, sm, dev_class, ptr_align=align, stride_gcd=g or None)
    cfg = sel.config
    plan.config, plan.tier = cfg, sel.tier
    plan.fn = get_compiled(p, cfg, _arch_name(sm))
    plan.tail = (N, S, sxn, sxc, syn, syc)
    plan.dev = dev
    plan.extents = (_extent(x), _extent(w), 0 if b is None else _extent(b), 0 if out is None else _extent(out),
                    0 if block_scale is None else _extent(block_scale))
    return plan


def _dense(t: torch.Tensor) -> bool:
    return t.numel() == 0 or _extent(t) == t.numel() * t.element_size()


def _extent(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    return (1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)) * t.element_size()


def _arch_name(sm: int) -> str:
    from .compile_cache import arch_name
    return arch_name(sm)


def _overlaps(a: int, alen: int, b: int, blen: int) -> bool:
    return bool(alen and blen and a < b + blen and b < a + alen)


def channel_first_rmsnorm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                          eps: float | None = None, silu: bool = False, l2norm: bool = False,
                          out: torch.Tensor | None = None, *, out_dtype: torch.dtype | None = None,
                          scale: float = 1.0, block_scale: torch.Tensor | None = None,
                          global_scale: torch.Tensor | None = None, is_sf_swizzled_layout: bool = False):
    """Normalise x [B, C, *spatial] over dim 1 on the GPU (module docstring: semantics, eps).

    x: bf16/fp16 CUDA tensor, channel-first (contiguous, or any layout channel_first_view accepts: no copy) or
    channels-last (torch.channels_last(_3d): routed to kernels.ops.rmsnorm / fused_rmsnorm_silu /
    rmsnorm_quant / rmsnorm_fp4quant on a zero-copy [positions, C] view; RMSNorm without bias only). weight,
    bias: C elements in x's dtype, any shape of C elements (WanRMS_norm's gamma (C, 1, 1, 1) as it is). eps:
    None = 1e-12 for l2norm (F.normalize's default), 1e-6 otherwise. Output: x's dtype, or float8_e4m3fn via
    out / out_dtype (e4m3(y / scale)), or NVFP4 via an out / out_dtype of torch.float4_e2m1fn_x2 or uint8:
    then returns (out [B, *spatial, C/2], block_scale e4m3 [B, *spatial, C/16] or the swizzled buffer with
    is_sf_swizzled_layout), allocating whichever is not given (module docstring; global_scale as
    rmsnorm_fp4quant's). Validation, dispatch and compilation run once per signature; a repeated call costs a
    dict lookup, the output allocation and one TVM-FFI launch on the current stream."""
    eps = (F_NORMALIZE_EPS if l2norm else RMS_EPS) if eps is None else eps
    key = None
    try:
        key = (type(x), x.shape, x.stride(), x.dtype, x.device, x.data_ptr() & 15, weight.shape, weight.stride(),
               weight.dtype, weight.device, silu, l2norm, out_dtype, scale != 1.0, is_sf_swizzled_layout)
        key += (None,) if bias is None else (bias.shape, bias.stride(), bias.dtype, bias.device)
        for t in (out, block_scale, global_scale):
            key += (None,) if t is None else (type(t), t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15)
        plan = _PLANS[key]
    except (KeyError, AttributeError, TypeError, RuntimeError):
        plan = None
    if plan is None:
        _check_number(eps, "eps", False)
        _check_number(scale, "scale", True)
        if not isinstance(is_sf_swizzled_layout, bool):
            raise TypeError("is_sf_swizzled_layout must be a bool")
        plan = _build_plan(x, weight, bias, out, out_dtype, silu, l2norm, float(scale), block_scale, global_scale,
                           is_sf_swizzled_layout)
        if key is not None:
            if len(_PLANS) >= PLAN_CACHE_SIZE:
                _PLANS.clear()
            _PLANS[key] = plan
    if not (isinstance(eps, float) and 0.0 <= eps < math.inf):
        eps = _check_number(eps, "eps", False)
    if not (isinstance(scale, float) and 0.0 < scale < math.inf):
        scale = _check_number(scale, "scale", True)
    if plan.route == "rows":
        return _rows_route(x, weight, plan, eps, silu, out, float(scale), block_scale, global_scale,
                           is_sf_swizzled_layout)
    if plan.fp4:
        return _fp4_launch(plan, x, weight, bias, out, block_scale, global_scale, eps)
    given = out is not None
    if out is None:
        out = torch.empty_like(x, dtype=plan.y_dtype)
    if plan.fn is None:
        return out
    xp, wp, yp = x.data_ptr(), weight.data_ptr(), out.data_ptr()
    bp = None if bias is None else bias.data_ptr()
    if given:
        for i, ptr in enumerate((xp, wp, bp or 0)):
            if _overlaps(ptr, plan.extents[i], yp, plan.extents[3]):
                raise ValueError("out overlaps an input in memory; outputs must not alias inputs")
    dev = plan.dev
    if _get_device() != dev:
        with torch.cuda.device(dev):
            plan.fn(xp, wp, bp, yp, *plan.tail, eps, float(scale), _raw_stream(dev))
    else:
        plan.fn(xp, wp, bp, yp, *plan.tail, eps, float(scale), _raw_stream(dev))
    return out


# the C entry points kernels/ops.py launches with (CPU builds of torch lack them; nothing launches there)
_get_device = getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", lambda d: torch.cuda.current_stream(d).cuda_stream)


def _fp4_launch(plan: _Plan, x, weight, bias, out, block_scale, global_scale, eps: float):
    """NVFP4 through the channel-first kernel: allocate what is not given, check aliasing, launch."""
    if out is None:
        out = torch.empty(plan.y_shape, dtype=plan.y_dtype, device=plan.device)
    if block_scale is None:
        block_scale = torch.empty(plan.sf_shape, dtype=_FP8, device=plan.device)
    if plan.fn is None:
        return out, block_scale
    xp, wp, yp, sfp = x.data_ptr(), weight.data_ptr(), out.data_ptr(), block_scale.data_ptr()
    bp = None if bias is None else bias.data_ptr()
    y_len = plan.extents[3] or out.numel()
    sf_len = plan.extents[4] or block_scale.numel()
    for i, ptr in enumerate((xp, wp, bp or 0)):
        if _overlaps(ptr, plan.extents[i], yp, y_len) or _overlaps(ptr, plan.extents[i], sfp, sf_len):
            raise ValueError("out or block_scale overlaps an input in memory; outputs must not alias inputs")
    if _overlaps(yp, y_len, sfp, sf_len):
        raise ValueError("out and block_scale overlap in memory")
    dev = plan.dev
    from .ops import _unit_global_scale

    gsp = _unit_global_scale(dev).data_ptr() if global_scale is None else global_scale.data_ptr()
    if _get_device() != dev:
        with torch.cuda.device(dev):
            plan.fn(xp, wp, bp, yp, sfp, gsp, *plan.tail, eps, _raw_stream(dev))
    else:
        plan.fn(xp, wp, bp, yp, sfp, gsp, *plan.tail, eps, _raw_stream(dev))
    return out, block_scale


def _rows_route(x, weight, plan: _Plan, eps: float, silu: bool, out, scale: float, block_scale=None,
                global_scale=None, swizzled: bool = False):
    """Channels-last input through the row ops (RMSNorm semantics, no bias; fp8: rmsnorm_quant's scale,
    fused_rmsnorm_silu's unscaled e4m3; NVFP4: rmsnorm_fp4quant, whose out / block_scale shapes
    [B, *spatial, C/2] / [B, *spatial, C/16] are this op's)."""
    from . import ops

    rows = _channels_last_rows(x)
    w = weight.reshape(-1)
    if plan.fp4:
        return ops.rmsnorm_fp4quant(rows, w, y_fp4=out, block_scale=block_scale, global_scale=global_scale,
                                    eps=eps, block_size=16, is_sf_swizzled_layout=swizzled)
    yrows = None if out is None else _channels_last_rows(out)
    if plan.y_dtype == _FP8:
        if yrows is None:
            yrows = torch.empty(rows.shape, dtype=_FP8, device=x.device)
        y = ops.fused_rmsnorm_silu(rows, w, eps, out=yrows) if silu else ops.rmsnorm_quant(yrows, rows, w, scale, eps)
    elif silu:
        y = ops.fused_rmsnorm_silu(rows, w, eps, out=yrows)
    else:
        y = ops.rmsnorm(rows, w, eps, out=yrows)
    return y.movedim(-1, 1) if out is None else out
