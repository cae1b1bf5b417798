"""`fused_moe`: a whole MoE layer on SM90 with NVFP4 weights, the seed's `b12x_fused_moe` signature.

One call: validate (cached per argument signature), sort the (token, expert) pairs by local expert (one
routing launch, kernels/moe_route_kernel.py, which under W4A4 also fake-quantises x once), FC1 grouped GEMM
with the activation fused (kernels/moe_kernel.py), FC2 grouped GEMM scaled by the routing weights and written
per pair (per pair and K split when FC2 splits K: fp32 partials [splits, pairs, H]), then the sum of each
token's pairs (and splits) into the output, one fp32 reduction and one rounding (kernels/moe_combine_kernel.py).
Numerics and scale conventions: kernels/moe_quant.py; the float reference: kernels/moe_reference.py.

Host cost: a repeated signature costs a dict lookup, its workspace (routing tables, FC1's output and FC2's
partials are byte ranges of it, passed as integer pointers; eager calls up to decode and mid-batch sizes reuse
their stream's arena, _workspace, instead of allocating), the output's allocation when none is given and
four TVM-FFI calls on the raw current stream (W4A4's quantised x is one more byte range), or with
LUTFORGE_MOE_LAYER_CALL=1 one call that launches all four kernels (kernels/moe_layer_kernel.py); the
functions, grids and workspace layout are bound once per signature (_Launch).

Expert ids are checked against [0, num_experts) without a host sync by default: the routing kernel counts
the ids out of range, routes their pairs nowhere (like non-local experts) and, when there are any, writes the
count into a pinned host word of the device (_BadIds); every call reads that word first, a memory load, and
raises once the GPU has run a call that saw bad ids, naming the count. The error arrives one or more calls
late (the sync the exact check needs would cost the call all the GPU work queued before it: 3.3-4.5 ms per
call measured on the H200, results/h200/BENCHMARKS.md host table) and also covers CUDA-graph replays.
check_expert_ids="sync" reads this call's count back before FC1 launches (a sync; nothing but the workspace
has been written when it raises); "off" (or False) skips both. Under torch.compile a call traces
to the custom op `lutforge::fused_moe`, which runs (and validates) the eager op on the real tensors.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from dataclasses import dataclass, replace

import torch

from . import dispatch as _dispatch
from .moe_config import (FC1_EARLY, FC2_EARLY, FC2_EARLY_CHOICES, FC2_EARLY_MODES, FOLD_COMBINE, PDL, MoEConfig,
                         MoEGemmConfig, MoEGemmShape, gemm_shapes, heuristic, violations)
from .moe_problem import ACTIVATIONS, DIM_MULTIPLE, MAX_TOP_K, MoEProblem
from .moe_quant import NVFP4_BLOCK
from .ops import _get_device, _raw_stream

QUANT_ALIASES = {"nvfp4": "nvfp4", "w4a4": "nvfp4", "w4a16": "w4a16"}
PRECISION_ALIASES = {"fp4": "nvfp4", "bf16": "w4a16"}
_SOURCES = ("moe_kernel.py", "moe_wgmma_kernel.py", "moe_gemv_kernel.py", "moe_config.py", "moe_route_kernel.py",
            "moe_combine_kernel.py", "moe_layer_kernel.py", "pdl.py")
_CACHE_VERSION = 1
_FP4_DTYPES = tuple(getattr(torch, n) for n in ("uint8", "float4_e2m1fn_x2") if hasattr(torch, n))
_SF_DTYPES = (torch.float8_e4m3fn, torch.uint8)


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    from .compile_cache import files_hash

    return files_hash(_SOURCES)


def cache_key(sh: MoEGemmShape, cfg: MoEGemmConfig, arch: str) -> str:
    raw = repr((_CACHE_VERSION, sh, sorted(cfg.as_dict().items()), arch, source_hash(), PDL, FC2_EARLY))
    return "moe" + hashlib.sha256(raw.encode()).hexdigest()[:21]


def _fake_args(sh: MoEGemmShape):
    """Compile-time stand-ins for MoEGemmKernel.__call__'s arguments."""
    import cutlass
    from cutlass.base_dsl.enums import AddressSpace
    from cutlass.cute.runtime import make_fake_stream, nullptr

    def ptr(dt, align):
        return nullptr(dt, AddressSpace.gmem, assumed_align=align)

    fc1 = sh.layer == "fc1"
    i32, i64 = cutlass.Int32(0), cutlass.Int64(0)
    out = ptr(cutlass.Float32 if sh.out_dtype == "fp32" else cutlass.BFloat16, 16)
    # the optional trailing parameters (kernels/moe_gemv_kernel.py): the fold's valid, output and counters; FC1's
    # early_ids after the fold's three (None): the ids as 32-bit words, their stride, offset, num_experts
    optional = (ptr(cutlass.Int32, 4), ptr(cutlass.BFloat16, 16), ptr(cutlass.Int32, 4)) if sh.combine_top_k else ()
    if sh.early_ids:
        optional = (None, None, None, ptr(cutlass.Int32, 4), i32, i32, i32)
    return (ptr(cutlass.BFloat16, 16), ptr(cutlass.Int32, 4) if fc1 else None, ptr(cutlass.Uint8, 16),
            ptr(cutlass.Uint8, 16), ptr(cutlass.Float32, 4), None if fc1 else ptr(cutlass.Float32, 4),
            None if fc1 else ptr(cutlass.Int32, 4), out, ptr(cutlass.Int32, 4), ptr(cutlass.Int32, 4),
            i32, i32, i32, i32, i64, i64, i32, ptr(cutlass.Float32, 4) if sh.quant_out else None,
            make_fake_stream(use_tvm_ffi_env_stream=False), *optional)


def gemm_kernel_class(cfg: MoEGemmConfig):
    """The kernel class that runs `cfg`: its MMA backend (kernels/moe_kernel.py for mma.sync,
    kernels/moe_wgmma_kernel.py for warpgroup MMA, kernels/moe_gemv_kernel.py for the decode GEMV).
    All take the same launch arguments and grid."""
    if cfg.mma == "gemv":
        from .moe_gemv_kernel import MoEGemvKernel

        return MoEGemvKernel
    if cfg.mma == "wgmma":
        from .moe_wgmma_kernel import MoEWgmmaKernel

        return MoEWgmmaKernel
    from .moe_kernel import MoEGemmKernel

    return MoEGemmKernel


def _refuse_invalid(sh: MoEGemmShape, cfg: MoEGemmConfig, arch: str) -> None:
    from .compile_cache import arch_number

    why = violations(sh, cfg, arch_number(arch))
    if why:
        raise ValueError(f"invalid config {cfg.short()} for {sh} on {arch}: {'; '.join(why)}")


def compile_gemm(sh: MoEGemmShape, cfg: MoEGemmConfig, arch: str):
    """Compile one grouped GEMM for `arch` as a TVM-FFI function (no GPU needed); ValueError for a config
    the constraints reject there (e.g. mma="wgmma" for sm_100a)."""
    from .compile_cache import arch_number, compile_dsl
    from .moe_kernel import MoEGemmSpec

    _refuse_invalid(sh, cfg, arch)
    return compile_dsl(gemm_kernel_class(cfg)(MoEGemmSpec(sh, cfg, arch_number(arch))), _fake_args(sh), arch,
                       f"fused_moe {sh.layer} K={sh.K} N={sh.N} {cfg.short()}")


def route_spec(p: MoEProblem, bm1: int, bm2: int, ids_dtype: str = "int32", scale_dtype: str = "fp32",
               counters: int = 0):
    """The routing kernel a call of layer `p` launches for FC1 and FC2 row tiles `bm1`, `bm2` (routing ids and
    weights of these dtypes; int32 / fp32 unless the caller passes others), zeroing `counters` FC2 column-tile
    counters (the folded combine's)."""
    from .moe_route_kernel import MoERouteSpec

    return MoERouteSpec(p.n_local, p.top_k, bm1, bm2, ids_dtype, scale_dtype, quant_h(p), counters)


def quant_h(p: MoEProblem) -> int:
    """The routing launch's x quantisation (kernels/moe_route_kernel.py): H for W4A4, else 0."""
    return p.H if p.quant_mode == "nvfp4" else 0


def layer_spec(p: MoEProblem, cfg1: MoEGemmConfig, cfg2: MoEGemmConfig, ids_dtype: str = "int32",
               scale_dtype: str = "fp32", fold: bool | None = None, fc1_early: bool | None = None):
    """The kernels (kernels/moe_layer_kernel.MoELayerSpec) a call of layer `p` runs with GEMM configs `cfg1`,
    `cfg2` and routing ids and weights of these dtypes: the combine folded into FC2 where `fold` (default
    moe_config.FOLD_COMBINE) and FC2 is the decode GEMV, else a combine launch; FC1 routing its tiles from the
    ids where `fc1_early` (default moe_config.FC1_EARLY) and FC1 is the decode GEMV."""
    from .moe_combine_kernel import MoECombineSpec
    from .moe_layer_kernel import MoELayerSpec

    fc1, fc2 = gemm_shapes(p.quant_mode, p.activation, p.H, p.I)
    if (FC1_EARLY if fc1_early is None else fc1_early) and cfg1.mma == "gemv":
        fc1 = replace(fc1, early_ids=True)
    folded = (FOLD_COMBINE if fold is None else fold) and cfg2.mma == "gemv"
    if folded:
        fc2 = replace(fc2, combine_top_k=p.top_k)
    return MoELayerSpec(route_spec(p, cfg1.bm, cfg2.bm, ids_dtype, scale_dtype, p.H // cfg2.bn if folded else 0),
                        fc1, cfg1, fc2, cfg2, None if folded else MoECombineSpec(p.top_k, cfg2.splits, p.H))


def _layer_kernels(p: MoEProblem, cfg, arch: str) -> list[tuple[str, object]]:
    """(disk-cache key, compile function) of every function one call can run: under LAYER_CALL the layer's one
    host function (every eager call and graph capture but check_expert_ids="sync"), then FC1, FC2, routing and
    combine (unless folded into FC2) alone (the "sync" check, the benchmarks' kernel chain, and every call
    without LAYER_CALL)."""
    ls = layer_spec(p, cfg.gemm("fc1"), cfg.gemm("fc2"))
    layer = [(layer_function_key(ls, arch), functools.partial(compile_layer, ls, arch))] if LAYER_CALL else []
    combine = [] if ls.combine is None else [
        (combine_cache_key(ls.combine, arch), functools.partial(compile_combine, ls.combine, arch))]
    return layer + [
        (cache_key(sh, c, arch), functools.partial(compile_gemm, sh, c, arch))
        for sh, c in ((ls.fc1, ls.cfg1), (ls.fc2, ls.cfg2))] + [
        (route_cache_key(ls.route, arch), functools.partial(compile_route, ls.route, arch))] + combine


def layer_cache_key(p: MoEProblem, cfg, arch: str) -> str:
    """The disk-cache names of the kernels a call of layer `p` with knobs `cfg` (a MoEConfig) runs, joined
    by '+' (the AOT library links them all)."""
    return "+".join(k for k, _ in _layer_kernels(p, cfg, arch))


def precompile_layer(p: MoEProblem, cfg, arch: str):
    """Compile a call's kernels (both GEMMs, routing and the combine) into the disk cache (idempotent): one
    compile_cache.CompileInfo, times summed, the largest register and shared-memory use."""
    from .compile_cache import CompileInfo, precompile_key

    infos = [precompile_key(k, fn) for k, fn in _layer_kernels(p, cfg, arch)]
    worst = lambda vals: max((v for v in vals if v is not None), default=None)  # noqa: E731
    return CompileInfo(sum(i.compile_s for i in infos), worst(i.registers for i in infos),
                       worst(i.smem_bytes for i in infos), all(i.from_cache for i in infos))


def compile_layer(ls, arch: str):
    """Compile a call's kernels behind one host function (kernels/moe_layer_kernel.py) for `arch` (no
    GPU needed); ValueError for a GEMM config the constraints reject there."""
    import cutlass
    from cutlass.base_dsl.enums import AddressSpace
    from cutlass.cute.runtime import make_fake_stream, nullptr

    from .compile_cache import arch_number, compile_dsl
    from .moe_combine_kernel import MoECombineKernel
    from .moe_kernel import MoEGemmSpec
    from .moe_layer_kernel import MoELayerKernel
    from .moe_route_kernel import MoERouteKernel

    sm = arch_number(arch)
    for sh, c in ((ls.fc1, ls.cfg1), (ls.fc2, ls.cfg2)):
        _refuse_invalid(sh, c, arch)

    def ptr(dt, align=4):
        return nullptr(dt, AddressSpace.gmem, assumed_align=align)

    i32, i64, u8 = cutlass.Int32(0), cutlass.Int64(0), cutlass.Uint8
    q = bool(ls.route.quant_h)
    ids = cutlass.Int32 if ls.route.ids_dtype == "int32" else cutlass.Int64
    sc = cutlass.Float32 if ls.route.scale_dtype == "fp32" else cutlass.BFloat16
    bf = functools.partial(ptr, cutlass.BFloat16, 16)
    args = (ptr(ids), ptr(sc), bf() if q else None, bf() if q else None, bf(), ptr(u8, 16), ptr(u8, 16),
            ptr(cutlass.Float32), ptr(cutlass.Float32) if ls.fc1.quant_out else None, ptr(u8, 16), ptr(u8, 16),
            ptr(cutlass.Float32), bf(), *(ptr(cutlass.Int32) for _ in range(5)), ptr(cutlass.Float32),
            ptr(cutlass.Int32), ptr(cutlass.Int32), bf(), ptr(cutlass.Float32, 16),
            ptr(cutlass.Int32) if ls.combine is None else None, *(i32,) * 7, *(i64,) * 4, i32, i32,
            make_fake_stream(use_tvm_ffi_env_stream=False))
    kernel = MoELayerKernel(ls, MoERouteKernel(ls.route),
                            gemm_kernel_class(ls.cfg1)(MoEGemmSpec(ls.fc1, ls.cfg1, sm)),
                            gemm_kernel_class(ls.cfg2)(MoEGemmSpec(ls.fc2, ls.cfg2, sm)),
                            None if ls.combine is None else MoECombineKernel(ls.combine))
    return compile_dsl(kernel, args, arch, f"fused_moe layer {ls}")


def layer_function_key(ls, arch: str) -> str:
    """The disk-cache name of a layer's one host function: its kernels' own keys hashed together."""
    raw = repr((_CACHE_VERSION, cache_key(ls.fc1, ls.cfg1, arch), cache_key(ls.fc2, ls.cfg2, arch),
                route_cache_key(ls.route, arch), ls.combine and combine_cache_key(ls.combine, arch)))
    return "moel" + hashlib.sha256(raw.encode()).hexdigest()[:20]


@functools.lru_cache(maxsize=1024)
def get_layer(ls, arch: str):
    """A layer's one host function, memoised like get_route."""
    from .compile_cache import cached_function

    return cached_function(layer_function_key(ls, arch), arch, lambda: compile_layer(ls, arch))


def compile_route(spec, arch: str):
    """Compile the routing kernel (kernels/moe_route_kernel.py) for `arch` (no GPU needed)."""
    import cutlass
    from cutlass.base_dsl.enums import AddressSpace
    from cutlass.cute.runtime import make_fake_stream, nullptr

    from .compile_cache import compile_dsl
    from .moe_route_kernel import MoERouteKernel

    def ptr(dt):
        return nullptr(dt, AddressSpace.gmem, assumed_align=4)

    ids = cutlass.Int32 if spec.ids_dtype == "int32" else cutlass.Int64
    sc = cutlass.Float32 if spec.scale_dtype == "fp32" else cutlass.BFloat16
    x = nullptr(cutlass.BFloat16, AddressSpace.gmem, assumed_align=16) if spec.quant_h else None
    xq = nullptr(cutlass.BFloat16, AddressSpace.gmem, assumed_align=16) if spec.quant_h else None
    args = (ptr(ids), ptr(sc), *(ptr(cutlass.Int32) for _ in range(5)), ptr(cutlass.Float32), ptr(cutlass.Int32),
            ptr(cutlass.Int32), cutlass.Int32(0), cutlass.Int32(0), cutlass.Int32(0), x, xq, cutlass.Int32(0),
            make_fake_stream(use_tvm_ffi_env_stream=False), *((ptr(cutlass.Int32),) if spec.counters else ()))
    return compile_dsl(MoERouteKernel(spec), args, arch, f"fused_moe routing {spec}")


def route_cache_key(spec, arch: str) -> str:
    raw = repr((_CACHE_VERSION, spec, arch, source_hash(), PDL))
    return "moer" + hashlib.sha256(raw.encode()).hexdigest()[:20]


def compile_combine(spec, arch: str):
    """Compile the combine kernel (kernels/moe_combine_kernel.py) for `arch` (no GPU needed)."""
    import cutlass
    from cutlass.base_dsl.enums import AddressSpace
    from cutlass.cute.runtime import make_fake_stream, nullptr

    from .compile_cache import compile_dsl
    from .moe_combine_kernel import MoECombineKernel

    args = (nullptr(cutlass.Float32, AddressSpace.gmem, assumed_align=16),
            nullptr(cutlass.Int32, AddressSpace.gmem, assumed_align=4),
            nullptr(cutlass.BFloat16, AddressSpace.gmem, assumed_align=16), cutlass.Int32(0), cutlass.Int32(0),
            cutlass.Int32(0), make_fake_stream(use_tvm_ffi_env_stream=False))
    return compile_dsl(MoECombineKernel(spec), args, arch, f"fused_moe combine {spec}")


def combine_cache_key(spec, arch: str) -> str:
    raw = repr((_CACHE_VERSION, spec, arch, source_hash(), PDL))
    return "moec" + hashlib.sha256(raw.encode()).hexdigest()[:20]


@functools.lru_cache(maxsize=256)
def get_combine(spec, arch: str):
    """The combine kernel's function, memoised like get_route."""
    from .compile_cache import cached_function

    return cached_function(combine_cache_key(spec, arch), arch, lambda: compile_combine(spec, arch))


@functools.lru_cache(maxsize=256)
def get_route(spec, arch: str):
    """The routing kernel's function, memoised on the (hashable) spec: its cache key (a sha256 of the spec and
    the sources) cost ~20 us per eager call."""
    from .compile_cache import cached_function

    return cached_function(route_cache_key(spec, arch), arch, lambda: compile_route(spec, arch))


@functools.lru_cache(maxsize=1024)
def get_compiled(sh: MoEGemmShape, cfg: MoEGemmConfig, arch: str):
    """A GEMM's function, memoised like get_route."""
    from .compile_cache import cached_function

    return cached_function(cache_key(sh, cfg, arch), arch, lambda: compile_gemm(sh, cfg, arch))


@dataclass(frozen=True)
class _Plan:
    """What validation settled for one argument signature."""

    problem: MoEProblem  # the call's layer at its T (uniform routing: what dispatch is keyed by)
    fc1: MoEGemmShape
    fc2: MoEGemmShape
    arch: str  # the compile target of x's device
    device: torch.device
    ids_dtype: str  # "int32" | "int64"
    scale_dtype: str  # "fp32" | "bf16"
    w_strides: tuple  # per-expert strides in bytes of w1, w1_sf, w2, w2_sf

    @property
    def out_shape(self) -> tuple[int, int]:
        return self.problem.T, self.problem.H


def _sig(t):
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15)


def _call_key(x, w1, w1sf, w2, w2sf, ids, sc, a1, a2, fc2s, output, *options) -> tuple:
    """A call's signature (its tensors', then `options`: the other arguments as given) as one flat tuple (a
    per-tensor helper in a loop cost ~40 % more host time, profiled on CPU with the kernels mocked): shapes,
    strides, dtypes and devices, and one alignment class for the tensors that must be 16-byte aligned
    (validation refuses any other, so a nonzero class never finds a plan). AttributeError or TypeError for an
    argument that is no tensor: validation names it."""
    k = (x.shape, x.stride(), x.dtype, x.device, w1.shape, w1.stride(), w1.dtype, w1.device, w1sf.shape,
         w1sf.stride(), w1sf.dtype, w1sf.device, w2.shape, w2.stride(), w2.dtype, w2.device, w2sf.shape,
         w2sf.stride(), w2sf.dtype, w2sf.device, ids.shape, ids.stride(), ids.dtype, ids.device, sc.shape,
         sc.stride(), sc.dtype, sc.device, a1.shape, a1.stride(), a1.dtype, a1.device, a2.shape, a2.stride(),
         a2.dtype, a2.device, (x.data_ptr() | w1.data_ptr() | w1sf.data_ptr() | w2.data_ptr() | w2sf.data_ptr()
                               | (0 if output is None else output.data_ptr())) & 15,
         None if fc2s is None else (fc2s.shape, fc2s.dtype, fc2s.device), options)
    return k if output is None else k + (output.shape, output.stride(), output.dtype, output.device)


def _need(cond: bool, msg: str, exc=ValueError) -> None:
    if not cond:
        raise exc(msg)


def _check_tensor(name, t, dtypes, shape, device):
    _need(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}", TypeError)
    _need(t.dtype in dtypes, f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {t.dtype}", TypeError)
    _need(tuple(t.shape) == tuple(shape), f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    _need(t.device == device, f"{name} is on {t.device}, x on {device}")
    _need(t.is_contiguous(), f"{name} must be contiguous (strides {t.stride()} for shape {list(t.shape)})")


def _aligned(t) -> bool:
    return t.data_ptr() % 16 == 0


def _validate(x, w1, w1sf, w2, w2sf, ids, sc, w1_alpha, w2_alpha, fc2_input_scale, num_experts, top_k,
              num_local, offset, quant_mode, activation, output, output_dtype) -> _Plan:
    """Every check of the public op, raising ValueError/TypeError before anything launches."""
    _need(isinstance(x, torch.Tensor), f"x must be a torch.Tensor, got {type(x).__name__}", TypeError)
    _need(x.dim() == 2, f"x must be [num_tokens, hidden_size], got shape {list(x.shape)}")
    _need(x.dtype == torch.bfloat16, f"x must be bfloat16, got {x.dtype}", TypeError)
    _need(x.is_contiguous() and _aligned(x), "x must be contiguous and 16-byte aligned")
    T, H = x.shape
    dev = x.device
    _need(H % DIM_MULTIPLE == 0 and H >= DIM_MULTIPLE, f"hidden_size must be a multiple of {DIM_MULTIPLE} "
                                                       f"(16-value scale blocks, 64-wide k-tiles), got {H}")
    _need(activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    _need(output_dtype == torch.bfloat16, f"output_dtype must be torch.bfloat16, got {output_dtype}", TypeError)
    _need(isinstance(num_experts, int) and num_experts >= 1, f"num_experts must be an int >= 1, got {num_experts!r}",
          TypeError if not isinstance(num_experts, int) else ValueError)
    _need(isinstance(top_k, int) and 1 <= top_k <= min(MAX_TOP_K, num_experts),
          f"top_k must be an int in [1, min({MAX_TOP_K}, num_experts)], got {top_k!r}")
    _need(isinstance(num_local, int) and 1 <= num_local <= num_experts,
          f"num_local_experts must be in [1, num_experts={num_experts}], got {num_local!r}")
    _need(isinstance(offset, int) and 0 <= offset <= num_experts - num_local,
          f"local_expert_offset must be in [0, num_experts - num_local_experts = {num_experts - num_local}], "
          f"got {offset!r}")
    _need(isinstance(w1, torch.Tensor) and w1.dim() == 3,
          f"w1_weight must be a 3-D tensor [E, rows, hidden_size // 2], got {getattr(w1, 'shape', type(w1))}")
    rows1 = w1.shape[1]
    if activation == "silu":
        _need(rows1 % 2 == 0, f"gated (silu) w1_weight needs 2 * intermediate_size rows, got {rows1}")
        inter = rows1 // 2
    else:
        inter = rows1
    _need(inter % DIM_MULTIPLE == 0 and inter >= DIM_MULTIPLE,
          f"intermediate_size must be a multiple of {DIM_MULTIPLE}, got {inter}")
    El = num_local
    _check_tensor("w1_weight", w1, _FP4_DTYPES, (El, rows1, H // 2), dev)
    _check_tensor("w1_weight_sf", w1sf, _SF_DTYPES, (El, rows1, H // NVFP4_BLOCK), dev)
    _check_tensor("w2_weight", w2, _FP4_DTYPES, (El, H, inter // 2), dev)
    _check_tensor("w2_weight_sf", w2sf, _SF_DTYPES, (El, H, inter // NVFP4_BLOCK), dev)
    for name, t in (("w1_weight", w1), ("w2_weight", w2), ("w1_weight_sf", w1sf), ("w2_weight_sf", w2sf)):
        _need(_aligned(t), f"{name} must be 16-byte aligned")
    _check_tensor("token_selected_experts", ids, (torch.int32, torch.int64), (T, top_k), dev)
    _check_tensor("token_final_scales", sc, (torch.float32, torch.bfloat16), (T, top_k), dev)
    _check_tensor("w1_alpha", w1_alpha, (torch.float32,), (El,), dev)
    _check_tensor("w2_alpha", w2_alpha, (torch.float32,), (El,), dev)
    if quant_mode == "nvfp4":
        _need(fc2_input_scale is not None, "quant_mode='nvfp4' needs fc2_input_scale (the FC2 input's global "
                                           "scale, a float32 tensor of one element)")
        _need(isinstance(fc2_input_scale, torch.Tensor) and fc2_input_scale.dtype == torch.float32
              and fc2_input_scale.numel() == 1 and fc2_input_scale.device == dev,
              f"fc2_input_scale must be a float32 tensor of one element on {dev}", TypeError)
    if output is not None:
        _check_tensor("output", output, (torch.bfloat16,), (T, H), dev)
        _need(_aligned(output), "output must be 16-byte aligned")
    _need(x.is_cuda, f"x must be on a CUDA device, got {x.device}")  # last: CPU tests reach every check above
    fc1, fc2 = gemm_shapes(quant_mode, activation, H, inter)
    problem = MoEProblem("fused_moe", T, num_experts, top_k, H, inter, quant_mode, activation, "uniform",
                         0 if El == num_experts else El)
    return _Plan(problem, fc1, fc2, _arch(dev), dev, "int32" if ids.dtype == torch.int32 else "int64",
                 "fp32" if sc.dtype == torch.float32 else "bf16",
                 (w1.stride(0), w1sf.stride(0), w2.stride(0), w2sf.stride(0)))


_PLANS: dict = {}  # argument signature -> [_Plan, _Launch of the dispatched configs or None]
# One TVM-FFI call launches a call's four kernels (kernels/moe_layer_kernel.py) when on; off, the four separate
# functions are called one after another, as before it. Off by default until the fused-MoE GPU tests and the host
# breakdown (benchmarks/fused_moe_host.py) have run it on a GPU. The "sync" check always calls the four.
LAYER_CALL = os.environ.get("LUTFORGE_MOE_LAYER_CALL", "0") == "1"
_CALLS: dict = {}  # a call's whole signature (tensors and options) -> (_Plan, _Launch or None, check mode, fc2s used)
PLAN_CACHE_SIZE = 4096  # signatures kept (T varies per batch; the weights' signature does not)


def _arch(device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    _need(major == 9, f"fused_moe runs on SM90 (Hopper); this device is sm_{major}{minor}")
    return "sm_90a"


_SELECTED: dict = {}  # (problem, device index) -> MoEConfig


def _dispatched(plan: _Plan) -> MoEConfig:
    """The layer's knobs at this T: the device class's LUT entry, else the family heuristic (kernels.dispatch,
    as the norms; memoised per problem and device until kernels.dispatch.reload_luts)."""
    key = (plan.problem, plan.device.index)
    cfg = _SELECTED.get(key)
    if cfg is None:
        from .ops import _device_info

        sm, dev_class, _ = _device_info(plan.device)
        cfg = _SELECTED[key] = _dispatch.default_dispatcher().lookup(plan.problem, sm, dev_class).config
    return cfg


_dispatch.on_reload(_PLANS.clear)
_dispatch.on_reload(_CALLS.clear)
_dispatch.on_reload(_SELECTED.clear)


def _align16(n: int) -> int:
    return (n + 15) & ~15


def workspace_layout(n_local: int, P: int, inter: int, H: int, splits: int, xq_rows: int = 0,
                     counters: int = 0) -> tuple[dict, int]:
    """Byte offsets of the buffers one call uses inside its single workspace allocation, and its size: the
    routing tables (int32: expert_offsets, FC1 and FC2 tile offsets [E+1]; a_rows, out_rows, row_scale (fp32),
    valid [P]; bad [1]), FC1's output (bf16 [P, I]), FC2's fp32 partials [splits, P, H], its column tiles'
    counters (int32 [counters], the folded combine's) and W4A4's quantised x (bf16 [xq_rows, H]; 0 rows
    otherwise). 16-byte aligned."""
    sizes = {"eo": 4 * (n_local + 1), "to1": 4 * (n_local + 1), "to2": 4 * (n_local + 1), "a_rows": 4 * P,
             "out_rows": 4 * P, "row_scale": 4 * P, "valid": 4 * P, "bad": 4, "inter": 2 * P * inter,
             "y": 4 * splits * P * H, "counters": 4 * counters, "xq": 2 * xq_rows * H}
    offsets, at = {}, 0
    for name, n in sizes.items():
        offsets[name] = at
        at += _align16(n)
    return offsets, at


# the workspace buffers `_Launch.run` passes, in the order it unpacks their pointers
_RUN_BUFFERS = ("eo", "to1", "to2", "a_rows", "out_rows", "row_scale", "valid", "bad", "inter", "y", "counters",
                "xq")


ARENA_MAX_BYTES = 32 << 20  # the largest workspace an eager call takes from its stream's arena: decode and mid
# batches, where the allocation is a share of the call (heuristic configs: T=64 4.2-16 MiB, T=256 17-22 MiB
# but DeepSeek-V3's 64 MiB); larger ones allocate per call
_ARENAS: dict[tuple[int, int], torch.Tensor] = {}  # (device index, raw stream) -> that stream's workspace arena
_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", torch.cuda.is_current_stream_capturing)


def _workspace(nbytes: int, device, stream: int) -> torch.Tensor:
    """A call's workspace. Eager calls of up to ARENA_MAX_BYTES share one growing buffer per (device, stream),
    kept for the process (at most ARENA_MAX_BYTES a stream): a call's routing launch (no PDL) starts only once
    the stream's earlier work has finished, so the previous call on the stream is done with the buffer, as
    with the block torch's caching allocator would hand back, minus the allocation and free each call paid
    (every table is rewritten before it is read, so nothing needs zeroing). A CUDA-graph capture allocates
    its own (from the graph's pool: a replay must not share a buffer eager calls or other graphs write),
    as do larger calls."""
    if nbytes > ARENA_MAX_BYTES or _capturing():
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    key = (device.index, stream)
    ws = _ARENAS.get(key)
    if ws is None or ws.numel() < nbytes:
        ws = _ARENAS[key] = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, device=device)
    return ws


class _BadIds:
    """Per device, two pinned host int32 words the routing kernel writes the count of out-of-range expert ids
    into when a call has any (pinned memory is addressable from kernels by its host pointer under unified
    addressing): [0] collects the default check's counts, read at the start of every call (a memory load,
    no sync); [1] is the "sync" check's, zeroed before the routing launch and read after a stream sync."""

    _words: dict[int, "_BadIds"] = {}

    def __init__(self):
        self.buf = torch.zeros(2, dtype=torch.int32, pin_memory=True)  # held for the process: graphs keep it
        self.host = self.buf.numpy()
        self.deferred_ptr = self.buf.data_ptr()
        self.sync_ptr = self.deferred_ptr + 4

    @classmethod
    def of(cls, index: int) -> "_BadIds":
        w = cls._words.get(index)
        if w is None:
            w = cls._words[index] = cls()
        return w

    def raise_pending(self, num_experts: int) -> None:
        """Raise for a count an earlier call (eager or graph replay) on this device left, clearing it."""
        n = int(self.host[0])
        if n:
            self.host[0] = 0
            raise ValueError(f"an earlier fused_moe call on this device had {n} token_selected_experts ids outside "
                             f"[0, num_experts={num_experts}) (checked without a sync, so reported late; their "
                             "pairs were routed nowhere). check_expert_ids='sync' refuses them in the call itself")


CHECK_MODES = {"deferred": "deferred", "sync": "sync", "off": "off", True: "deferred", False: "off"}


class _Launch:
    """One call's kernels bound for an argument signature and a config pair: the layer's host function, grids,
    workspace layout and the launch arguments that do not change between calls."""

    __slots__ = ("device", "spec", "arch", "layer", "_parts", "ws_bytes", "off", "offsets", "n_quant", "fixed")

    def __init__(self, plan: _Plan, cfg1: MoEGemmConfig, cfg2: MoEGemmConfig):
        from .moe_combine_kernel import grid_for
        from .moe_route_kernel import quant_ctas

        p = plan.problem
        self.device, self.arch = plan.device, plan.arch
        self.spec = layer_spec(p, cfg1, cfg2, plan.ids_dtype, plan.scale_dtype)
        self.layer = get_layer(self.spec, plan.arch) if LAYER_CALL else None
        self._parts = None
        self.n_quant = quant_ctas(self.spec.route, p.T)  # W4A4: the routing launch's CTAs quantising x into xq
        off, self.ws_bytes = workspace_layout(p.n_local, p.pairs, p.I, p.H, cfg2.splits, p.T if self.n_quant else 0,
                                              self.spec.route.counters)
        self.off = off
        self.offsets = tuple(off[n] for n in _RUN_BUFFERS)
        P, El = p.pairs, p.n_local
        # m-tiles of every expert, at most one partial tile each
        grid1, grid2 = -(-P // cfg1.bm) + min(El, P), -(-P // cfg2.bm) + min(El, P)
        # T .. w2_sf_stride_e of kernels/moe_layer_kernel.ARGUMENTS
        grid_c = 0 if self.spec.combine is None else grid_for(self.spec.combine, p.T)
        self.fixed = (p.T, P, El, self.n_quant, grid1, grid2, grid_c, *plan.w_strides)

    def parts(self) -> tuple:
        """The routing, FC1, FC2 and combine (None when folded into FC2) kernels as separate functions (loaded
        on first use): what the "sync" expert-id check and the kernel-chain benchmarks launch one at a time."""
        if self._parts is None:
            s, arch = self.spec, self.arch
            self._parts = (get_route(s.route, arch), get_compiled(s.fc1, s.cfg1, arch),
                           get_compiled(s.fc2, s.cfg2, arch), s.combine and get_combine(s.combine, arch))
        return self._parts

    def arguments(self, base: int, bad: int, x, w1, w1sf, w2, w2sf, ids, scales, alpha1, alpha2, gs, out,
                  offset: int, num_experts: int, st) -> tuple:
        """The layer function's arguments (kernels/moe_layer_kernel.ARGUMENTS) over the workspace at `base`,
        the routing kernel counting bad expert ids at `bad`."""
        eo, to1, to2, a_rows, out_rows, row_scale, valid, _, inter, y, counters, xq = [base + o for o in self.offsets]
        xp = x.data_ptr()
        q = self.n_quant  # W4A4: x in, its quantised rows out, FC1 reading those
        return (ids.data_ptr(), scales.data_ptr(), xp if q else None, xq if q else None, xq if q else xp,
                w1.data_ptr(), w1sf.data_ptr(), alpha1.data_ptr(), None if gs is None else gs.data_ptr(),
                w2.data_ptr(), w2sf.data_ptr(), alpha2.data_ptr(), out.data_ptr(), eo, to1, to2, a_rows, out_rows,
                row_scale, valid, bad, inter, y, None if self.spec.combine else counters, *self.fixed, offset,
                num_experts, st)

    def split_arguments(self, *args) -> tuple[tuple, tuple, tuple, tuple | None]:
        """`arguments(*args)` as the separate kernels' (routing, FC1, FC2, combine: None when folded)."""
        from .moe_layer_kernel import split_arguments

        return split_arguments(self.arguments(*args), self.spec)

    def run(self, x, w1, w1sf, w2, w2sf, ids, scales, alpha1, alpha2, gs, out, offset: int, num_experts: int,
            check: str):
        dev = self.device
        if _get_device() != dev.index:
            with torch.cuda.device(dev):
                return self.run(x, w1, w1sf, w2, w2sf, ids, scales, alpha1, alpha2, gs, out, offset, num_experts,
                                check)
        st = _raw_stream(dev.index)
        ws = _workspace(self.ws_bytes, dev, st)
        b = ws.data_ptr()
        bad = b + self.off["bad"]
        if check != "off":
            words = _BadIds.of(dev.index)
            words.raise_pending(num_experts)
            bad = words.deferred_ptr
            if check == "sync":
                words.host[1] = 0
                bad = words.sync_ptr
        if check != "sync" and LAYER_CALL:
            self.layer(*self.arguments(b, bad, x, w1, w1sf, w2, w2sf, ids, scales, alpha1, alpha2, gs, out, offset,
                                       num_experts, st))
            return out
        route, fc1, fc2, comb = self.split_arguments(b, bad, x, w1, w1sf, w2, w2sf, ids, scales, alpha1, alpha2, gs,
                                                     out, offset, num_experts, st)
        fns = self.parts()
        fns[0](*route)
        if check == "sync":
            torch.cuda.current_stream(dev).synchronize()
            n_bad = int(words.host[1])
            _need(n_bad == 0, f"token_selected_experts holds {n_bad} ids outside [0, num_experts={num_experts})")
        fns[1](*fc1)
        fns[2](*fc2)
        if comb is not None:
            fns[3](*comb)
        return out

    def floor(self, x, w1, w1sf, w2, w2sf, ids, scales, alpha1, alpha2, gs, out, offset: int, num_experts: int):
        """A zero-argument callable launching the call's kernels with every argument prebuilt (workspace held,
        stream fixed): what `run` costs without its Python, the floor of the call path's host cost."""
        ws = torch.empty(self.ws_bytes, dtype=torch.uint8, device=self.device)
        b = ws.data_ptr()
        call = (b, b + self.off["bad"], x, w1, w1sf, w2, w2sf, ids, scales, alpha1, alpha2, gs, out, offset,
                num_experts, _raw_stream(self.device.index))
        if self.layer is not None:
            fn, args = self.layer, self.arguments(*call)

            def launch(ws=ws):  # ws held: the pointers stay valid
                fn(*args)
            return launch
        parts = tuple((f, a) for f, a in zip(self.parts(), self.split_arguments(*call)) if a is not None)

        def launch_parts(ws=ws):
            for f, a in parts:
                f(*a)
        return launch_parts


@contextlib.contextmanager
def kernel_variant(fc2_early: str | None = None, fold: bool | None = None, fc1_early: bool | None = None):
    """Compile and bind the calls inside the block with moe_config.FC2_EARLY = `fc2_early`, FOLD_COMBINE =
    `fold` and FC1_EARLY = `fc1_early` (None: as they are), for A/B timing and tests in one process: the
    kernels' cache keys carry all three, and the calls bound outside the block are dropped on the way in and
    out."""
    from . import moe_gemv_kernel

    if fc2_early is not None and fc2_early not in FC2_EARLY_MODES:
        raise ValueError(f"FC2 early mode must be {FC2_EARLY_CHOICES}, got {fc2_early!r}")
    global FC2_EARLY, FOLD_COMBINE, FC1_EARLY
    saved = FC2_EARLY, FOLD_COMBINE, FC1_EARLY
    try:
        FC2_EARLY = moe_gemv_kernel.FC2_EARLY = saved[0] if fc2_early is None else fc2_early
        FOLD_COMBINE = saved[1] if fold is None else fold
        FC1_EARLY = saved[2] if fc1_early is None else fc1_early
        _bind.cache_clear()
        _CALLS.clear()
        yield
    finally:
        FC2_EARLY = moe_gemv_kernel.FC2_EARLY = saved[0]
        FOLD_COMBINE, FC1_EARLY = saved[1:]
        _bind.cache_clear()
        _CALLS.clear()


@functools.lru_cache(maxsize=1024)
def _bind(plan: _Plan, cfg1: MoEGemmConfig, cfg2: MoEGemmConfig) -> _Launch:
    return _Launch(plan, cfg1, cfg2)


def _route(ids, scales, n_local: int, offset: int, top_k: int, bm1: int, bm2: int, arch: str,
           num_experts: int | None = None) -> dict:
    """The routing kernel alone (for tests): its tables as int32 views (row_scale fp32) of a fresh workspace,
    by workspace_layout's names."""
    from .moe_route_kernel import MoERouteSpec

    P = ids.numel()
    spec = MoERouteSpec(n_local, top_k, bm1, bm2, "int32" if ids.dtype == torch.int32 else "int64",
                        "fp32" if scales.dtype == torch.float32 else "bf16")
    off, nbytes = workspace_layout(n_local, P, 0, 0, 1)
    ws = torch.zeros(nbytes, dtype=torch.uint8, device=ids.device)  # the kernel writes `bad` only when nonzero
    b = ws.data_ptr()
    get_route(spec, arch)(ids.data_ptr(), scales.data_ptr(), *(b + off[n] for n in (
        "eo", "to1", "to2", "a_rows", "out_rows", "row_scale", "valid", "bad")), P, offset,
        n_local + offset if num_experts is None else num_experts, None, None, 0,
        torch.cuda.current_stream(ids.device).cuda_stream)
    n = {"eo": n_local + 1, "to1": n_local + 1, "to2": n_local + 1, "a_rows": P, "out_rows": P, "row_scale": P,
         "valid": P, "bad": 1}
    views = {k: ws[off[k]:off[k] + 4 * v].view(torch.int32) for k, v in n.items()}
    views["row_scale"] = views["row_scale"].view(torch.float32)
    return views


def fused_moe(x: torch.Tensor, w1_weight: torch.Tensor, w1_weight_sf: torch.Tensor, w2_weight: torch.Tensor,
              w2_weight_sf: torch.Tensor, token_selected_experts: torch.Tensor, token_final_scales: torch.Tensor,
              num_experts: int, top_k: int, *, w1_alpha: torch.Tensor, w2_alpha: torch.Tensor,
              fc2_input_scale: torch.Tensor | None = None, num_local_experts: int | None = None,
              output: torch.Tensor | None = None, output_dtype: torch.dtype = torch.bfloat16,
              activation: str = "silu", activation_precision: str = "fp4", quant_mode: str | None = None,
              source_format: str = "modelopt", local_expert_offset: int = 0,
              configs: tuple[MoEGemmConfig, MoEGemmConfig] | None = None,
              check_expert_ids: str | bool = "deferred") -> torch.Tensor:
    """Run a fused MoE layer (routing permutation, FC1, activation, FC2, weighted scatter) on SM90.

    Arguments as flashinfer's `b12x_fused_moe` (see kernels/moe_quant.py for the scale conventions);
    in addition `local_expert_offset` (the first local expert's global id under expert parallelism, default
    0) and `configs` (explicit (FC1, FC2) kernel configs, FC2's possibly splitting K; default: the device
    class's LUT entry for this T, else the family heuristic by rows per expert and experts touched).
    `check_expert_ids` refuses ids outside [0, num_experts) with a ValueError: "deferred" (default, or True)
    without a sync, raised by a later call on the device once the GPU has run this one (its bad pairs route
    nowhere); "sync" in this call, reading the count back (a host sync; under CUDA-graph capture it acts as
    "deferred"); "off" (or False) not at all (bad pairs route nowhere).
    Returns `output` (allocated when None), [num_tokens, hidden_size] bfloat16."""
    if configs is None and not torch.compiler.is_compiling():
        try:  # a repeated call: one lookup of everything validation and dispatch settled for its signature
            key = _call_key(x, w1_weight, w1_weight_sf, w2_weight, w2_weight_sf, token_selected_experts,
                            token_final_scales, w1_alpha, w2_alpha, fc2_input_scale, output, num_experts, top_k,
                            num_local_experts, local_expert_offset, quant_mode, activation_precision, activation,
                            source_format, output_dtype, check_expert_ids)
            plan, launch, check, uses_fc2s = _CALLS[key]
        except (KeyError, AttributeError, TypeError):
            key = None
        if key is not None:
            out = output if output is not None else torch.empty(plan.out_shape, dtype=torch.bfloat16,
                                                                device=x.device)
            if launch is None:
                return out
            if check == "sync" and _capturing():
                check = "deferred"
            return launch.run(x, w1_weight, w1_weight_sf, w2_weight, w2_weight_sf, token_selected_experts,
                              token_final_scales, w1_alpha, w2_alpha, fc2_input_scale if uses_fc2s else None,
                              out, local_expert_offset, num_experts, check)
    return _fused_moe_first(x, w1_weight, w1_weight_sf, w2_weight, w2_weight_sf, token_selected_experts,
                            token_final_scales, num_experts, top_k, w1_alpha, w2_alpha, fc2_input_scale,
                            num_local_experts, output, output_dtype, activation, activation_precision, quant_mode,
                            source_format, local_expert_offset, configs, check_expert_ids)


def _fused_moe_first(x, w1_weight, w1_weight_sf, w2_weight, w2_weight_sf, token_selected_experts, token_final_scales,
                     num_experts, top_k, w1_alpha, w2_alpha, fc2_input_scale, num_local_experts, output, output_dtype,
                     activation, activation_precision, quant_mode, source_format, local_expert_offset, configs,
                     check_expert_ids):
    """fused_moe's every check, dispatch and binding: a signature's first call (and every call that forces
    `configs` or traces under torch.compile), remembering what it settled for the next calls."""
    requested_mode = quant_mode
    if quant_mode is None:
        _need(activation_precision in PRECISION_ALIASES,
              f"activation_precision must be one of {tuple(PRECISION_ALIASES)}, got {activation_precision!r}")
        quant_mode = PRECISION_ALIASES[activation_precision]
    _need(quant_mode in QUANT_ALIASES, f"quant_mode must be one of {tuple(QUANT_ALIASES)}, got {quant_mode!r}")
    quant_mode = QUANT_ALIASES[quant_mode]
    _need(source_format == "modelopt", f"source_format {source_format!r} is not supported: only ModelOpt NVFP4 "
                                       "weights (packed e2m1, e4m3 block scales [E, rows, K/16])")
    n_local = num_experts if num_local_experts is None else num_local_experts
    check = CHECK_MODES.get(check_expert_ids) if isinstance(check_expert_ids, (str, bool)) else None
    _need(check is not None, f"check_expert_ids must be one of {tuple(CHECK_MODES)}, got {check_expert_ids!r}")
    if torch.compiler.is_compiling():  # traced: one opaque custom op, whose eager call validates everything
        _need(configs is None, "configs cannot be forced under torch.compile (the LUT or heuristic answers)")
        fc2s = fc2_input_scale if quant_mode == "nvfp4" else None
        out = output if output is not None else torch.empty(x.shape, dtype=torch.bfloat16, device=x.device)
        torch.ops.lutforge.fused_moe(x, w1_weight, w1_weight_sf, w2_weight, w2_weight_sf, token_selected_experts,
                                     token_final_scales, w1_alpha, w2_alpha, fc2s, out, num_experts, top_k, n_local,
                                     local_expert_offset, quant_mode, activation, check)
        return out
    fc2s = fc2_input_scale if quant_mode == "nvfp4" else None
    plan, launch = _resolve(x, w1_weight, w1_weight_sf, w2_weight, w2_weight_sf, token_selected_experts,
                            token_final_scales, w1_alpha, w2_alpha, fc2s, output, num_experts, top_k, n_local,
                            local_expert_offset, quant_mode, activation, output_dtype, configs)
    out = output if output is not None else torch.empty(plan.out_shape, dtype=torch.bfloat16, device=x.device)
    if configs is None:
        if len(_CALLS) >= PLAN_CACHE_SIZE:
            _CALLS.clear()
        # not remembered when an argument validation let through because it goes unused (a W4A16 call's
        # fc2_input_scale, a quant_mode call's activation_precision) is no tensor or unhashable
        with contextlib.suppress(AttributeError, TypeError):
            _CALLS[_call_key(x, w1_weight, w1_weight_sf, w2_weight, w2_weight_sf, token_selected_experts,
                             token_final_scales, w1_alpha, w2_alpha, fc2_input_scale, output, num_experts, top_k,
                             num_local_experts, local_expert_offset, requested_mode, activation_precision,
                             activation, source_format, output_dtype, check_expert_ids)] = (
                plan, launch, check, fc2s is not None)
    if launch is None:  # no pairs
        return out
    if check == "sync" and _capturing():
        check = "deferred"  # a capture cannot sync; replays report late like the default
    return launch.run(x, w1_weight, w1_weight_sf, w2_weight, w2_weight_sf, token_selected_experts,
                      token_final_scales, w1_alpha, w2_alpha, fc2s, out, local_expert_offset, num_experts, check)


def _resolve(x, w1, w1sf, w2, w2sf, ids, sc, w1_alpha, w2_alpha, fc2s, output, num_experts, top_k, n_local, offset,
             quant_mode, activation, output_dtype, configs) -> tuple[_Plan, _Launch | None]:
    """The call's plan (validated once per argument signature) and its bound kernels (None without pairs):
    the dispatched configs' bound once per signature, forced configs checked against the layer."""
    try:
        key = (tuple(_sig(t) if isinstance(t, torch.Tensor) else (type(t),) for t in (
            x, w1, w1sf, w2, w2sf, ids, sc, w1_alpha, w2_alpha, fc2s, output)), num_experts, top_k, n_local, offset,
            quant_mode, activation, output_dtype)
        entry = _PLANS.get(key)
    except TypeError:  # an unhashable argument: validation names it
        key, entry = None, None
    if entry is None:
        entry = [_validate(x, w1, w1sf, w2, w2sf, ids, sc, w1_alpha, w2_alpha, fc2s, num_experts, top_k, n_local,
                           offset, quant_mode, activation, output, output_dtype), None]
        if key is not None:
            if len(_PLANS) >= PLAN_CACHE_SIZE:
                _PLANS.clear()
            _PLANS[key] = entry
    plan = entry[0]
    if plan.problem.pairs == 0:
        return plan, None
    if configs is None:
        if entry[1] is None:
            cfg = _dispatched(plan)
            entry[1] = _bind(plan, cfg.gemm("fc1"), cfg.gemm("fc2"))
        return plan, entry[1]
    cfg1, cfg2 = configs
    from .compile_cache import arch_number

    for sh, c in ((plan.fc1, cfg1), (plan.fc2, cfg2)):
        why = violations(sh, c, arch_number(plan.arch))
        _need(not why, f"config {c.short()} cannot run {sh.layer}: {'; '.join(why)}")
    return plan, _bind(plan, cfg1, cfg2)


def compile_check_cases(layers, configs: int = 1, seed: int = 0,
                        arch: str | None = None) -> list[tuple[MoEGemmShape, MoEGemmConfig]]:
    """(shape, config) pairs `lutforge compile-check` compiles for `layers` ((H, I, activation) triples) and
    target `arch`: FC1 and FC2 of W4A16 (and W4A4's quantising FC1 for the first layer), each with the
    heuristic configs of decode, mid and large batches (FC2 also at decode with one touched expert: the
    split-K tile where K allows), the first large-batch wgmma tile that fits (where the arch has wgmma: SM90),
    the first decode GEMV tile (mma="gemv") that fits, plus `configs` random valid ones. Without an arch, only
    configs valid on every compile target (compile_cache.ARCHS) are listed: no wgmma, which is SM90's alone."""
    import random

    from .compile_cache import ARCHS, arch_number
    from .moe_config import GEMV_TILES, MOE_KNOB_CHOICES, WGMMA_TILES

    archs = [arch_number(arch)] if arch is not None else sorted(ARCHS.values())

    def ok(sh, c):
        return all(not violations(sh, c, a) for a in archs)

    rng = random.Random(seed)
    out: list[tuple[MoEGemmShape, MoEGemmConfig]] = []
    for i, (H, inter, activation) in enumerate(layers):
        shapes = list(gemm_shapes("w4a16", activation, H, inter))
        if i == 0:
            shapes.append(gemm_shapes("nvfp4", activation, H, inter)[0])
        for sh in shapes:
            heur = [heuristic(sh, rows, arch=a) for a in archs for rows in (1, 40, 1000)]
            heur += [heuristic(sh, 1, experts_touched=1.0, arch=a) for a in archs] if sh.layer == "fc2" else []
            firsts = [next((t for t in tiles if ok(sh, t)), None) for tiles in (WGMMA_TILES, GEMV_TILES)]
            cfgs = list(dict.fromkeys(c for c in heur + firsts if c is not None and ok(sh, c)))
            want = len(cfgs) + configs
            for _ in range(500):
                if len(set(cfgs)) >= want:
                    break
                c = MoEGemmConfig(**{k: rng.choice(v) for k, v in MOE_KNOB_CHOICES.items()})
                if ok(sh, c):
                    cfgs.append(c)
            out += [(sh, c) for c in dict.fromkeys(cfgs)]
    return out


# --------------------------------------------------------------------------- torch.compile path
@torch.library.custom_op("lutforge::fused_moe", mutates_args=("output",), device_types="cuda")
def _fused_moe_op(x: torch.Tensor, w1_weight: torch.Tensor, w1_weight_sf: torch.Tensor, w2_weight: torch.Tensor,
                  w2_weight_sf: torch.Tensor, token_selected_experts: torch.Tensor, token_final_scales: torch.Tensor,
                  w1_alpha: torch.Tensor, w2_alpha: torch.Tensor, fc2_input_scale: torch.Tensor | None,
                  output: torch.Tensor, num_experts: int, top_k: int, num_local_experts: int,
                  local_expert_offset: int, quant_mode: str, activation: str, check_expert_ids: str) -> None:
    """What a traced fused_moe call lowers to: the eager op on real tensors, writing `output`."""
    fused_moe(x, w1_weight, w1_weight_sf, w2_weight, w2_weight_sf, token_selected_experts, token_final_scales,
              num_experts, top_k, w1_alpha=w1_alpha, w2_alpha=w2_alpha, fc2_input_scale=fc2_input_scale,
              num_local_experts=num_local_experts, output=output, activation=activation, quant_mode=quant_mode,
              local_expert_offset=local_expert_offset, check_expert_ids=check_expert_ids)


@_fused_moe_op.register_fake
def _fused_moe_fake(x, w1_weight, w1_weight_sf, w2_weight, w2_weight_sf, token_selected_experts, token_final_scales,
                    w1_alpha, w2_alpha, fc2_input_scale, output, num_experts, top_k, num_local_experts,
                    local_expert_offset, quant_mode, activation, check_expert_ids) -> None:
    return None
