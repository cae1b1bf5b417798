"""One fused_moe call's four launches (routing, FC1, FC2, combine) from one host function (CuTe-DSL).

Each kernel compiled alone is its own TVM-FFI function, and an eager call paid four TVM-FFI calls: 20.3 us of
the call's 34.5 us host time at Qwen3-30B-A3B T=1 on the H100 (results/h100/e2e/fused_moe_host.md), where a
norm's whole call costs 9-15 us. Here the four kernel objects' host functions are inlined into one, so a call
crosses into C once and passes each shared pointer once; the kernels, their grids, their PDL launches and
their order on the stream are those of the four separate functions (`split_arguments` is the one mapping
both use). The separate functions stay for what needs a gap between launches: check_expert_ids="sync" reads
the routing kernel's count back before FC1 launches, and the benchmarks cut the chain after each kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import cutlass.cute as cute
from cutlass import Int32, Int64, const_expr

from .moe_combine_kernel import MoECombineSpec
from .moe_config import MoEGemmConfig, MoEGemmShape
from .moe_route_kernel import MoERouteSpec

# the layer function's arguments, in order (kernels.fused_moe._Launch.arguments builds them)
ARGUMENTS = ("ids", "scales", "x", "xq", "fc1_a", "w1", "w1_sf", "alpha1", "gs", "w2", "w2_sf", "alpha2", "out",
             "eo", "to1", "to2", "a_rows", "out_rows", "row_scale", "valid", "bad", "inter", "y", "counters", "T",
             "P", "n_experts", "n_quant", "grid1", "grid2", "grid_combine", "w1_stride_e", "w1_sf_stride_e",
             "w2_stride_e", "w2_sf_stride_e", "offset", "num_experts", "stream")


@dataclass(frozen=True)
class MoELayerSpec:
    """The kernels of one call: routing, FC1 (shape and config), FC2 (shape and config), combine (None when FC2
    sums each token's pairs itself: fc2.combine_top_k, kernels/moe_gemv_kernel.py)."""
    route: MoERouteSpec
    fc1: MoEGemmShape
    cfg1: MoEGemmConfig
    fc2: MoEGemmShape
    cfg2: MoEGemmConfig
    combine: MoECombineSpec | None


def split_arguments(a: tuple, spec: MoELayerSpec) -> tuple[tuple, tuple, tuple, tuple | None]:
    """The layer function's arguments (ARGUMENTS order) as the routing, FC1, FC2 and combine kernels' own
    (their __call__ signatures) for the layer `spec`. W4A4: the routing launch quantises x into xq, which FC1
    reads as `fc1_a` and whose output it fake-quantises with gs; W4A16 passes None for x, xq and gs, and x as
    `fc1_a`. The combine folded into FC2 (spec.combine None): the routing launch zeroes the counters, FC2
    takes valid, out and them, and there is no combine launch (None). FC1 routing from the ids
    (spec.fc1.early_ids): FC1 takes the ids (as 32-bit words, two per int64 id), offset and num_experts."""
    (ids, scales, x, xq, fc1_a, w1, w1_sf, alpha1, gs, w2, w2_sf, alpha2, out, eo, to1, to2, a_rows, out_rows,
     row_scale, valid, bad, inter, y, counters, T, P, n_experts, n_quant, grid1, grid2, grid_c, s1, s1f, s2, s2f,
     offset, num_experts, stream) = a
    route = (ids, scales, eo, to1, to2, a_rows, out_rows, row_scale, valid, bad, P, offset, num_experts, x, xq,
             n_quant, stream)
    fc1 = (fc1_a, a_rows, w1, w1_sf, alpha1, None, None, inter, eo, to1, T, P, n_experts, grid1, s1, s1f, P, gs,
           stream)
    if spec.fc1.early_ids:
        fc1 += (None, None, None, ids, 1 if spec.route.ids_dtype == "int32" else 2, offset, num_experts)
    fc2 = (inter, None, w2, w2_sf, alpha2, row_scale, out_rows, y, eo, to2, P, P, n_experts, grid2, s2, s2f,
           P * spec.cfg2.splits, None, stream)
    if spec.combine is None:
        return (*route, counters), fc1, (*fc2, valid, out, counters), None
    return route, fc1, fc2, (y, valid, out, T, P, grid_c, stream)


class MoELayerKernel:
    """The routing, FC1, FC2 and combine kernel objects of one call (kernels/moe_route_kernel.py, each
    config's GEMM backend, kernels/moe_combine_kernel.py; no combine when FC2 folds it in), launched in that
    order by one host function."""

    def __init__(self, spec: MoELayerSpec, route, fc1, fc2, combine):
        self.spec = spec
        self.route, self.fc1, self.fc2, self.combine = route, fc1, fc2, combine

    @cute.jit
    def __call__(self, ids_ptr: cute.Pointer, scales_ptr: cute.Pointer, x_ptr, xq_ptr, fc1_a_ptr: cute.Pointer,
                 w1_ptr: cute.Pointer, w1_sf_ptr: cute.Pointer, alpha1_ptr: cute.Pointer, gs_ptr,
                 w2_ptr: cute.Pointer, w2_sf_ptr: cute.Pointer, alpha2_ptr: cute.Pointer, out_ptr: cute.Pointer,
                 eo_ptr: cute.Pointer, to1_ptr: cute.Pointer, to2_ptr: cute.Pointer, a_rows_ptr: cute.Pointer,
                 out_rows_ptr: cute.Pointer, row_scale_ptr: cute.Pointer, valid_ptr: cute.Pointer,
                 bad_ptr: cute.Pointer, inter_ptr: cute.Pointer, y_ptr: cute.Pointer, counters_ptr, T: Int32,
                 P: Int32, n_experts: Int32, n_quant: Int32, grid1: Int32, grid2: Int32, grid_combine: Int32,
                 w1_stride_e: Int64, w1_sf_stride_e: Int64, w2_stride_e: Int64, w2_sf_stride_e: Int64,
                 offset: Int32, num_experts: Int32, stream):
        route, fc1, fc2, combine = split_arguments((
            ids_ptr, scales_ptr, x_ptr, xq_ptr, fc1_a_ptr, w1_ptr, w1_sf_ptr, alpha1_ptr, gs_ptr, w2_ptr, w2_sf_ptr,
            alpha2_ptr, out_ptr, eo_ptr, to1_ptr, to2_ptr, a_rows_ptr, out_rows_ptr, row_scale_ptr, valid_ptr,
            bad_ptr, inter_ptr, y_ptr, counters_ptr, T, P, n_experts, n_quant, grid1, grid2, grid_combine,
            w1_stride_e, w1_sf_stride_e, w2_stride_e, w2_sf_stride_e, offset, num_experts, stream), self.spec)
        self.route(*route)
        self.fc1(*fc1)
        self.fc2(*fc2)
        if const_expr(self.combine is not None):
            self.combine(*combine)
