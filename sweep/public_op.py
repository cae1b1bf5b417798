"""lutforge as a user calls it: the public op (`kernels.ops` for the row family,
`kernels.channel_first_op.channel_first_rmsnorm` for the channel-first one, `kernels.fused_moe.fused_moe`) on a problem's case tensors, so what
the report calls "lutforge" includes everything the op does per call on the GPU (validation-cached runtime
dispatch: LUT tier or fallback; any extra launch), not only the kernel a sweep timed."""
from __future__ import annotations

from typing import Callable

from kernels.family import family_of
from kernels.problem import FP4_BLOCK, Problem


def build(problem: Problem, case) -> Callable[[], object]:
    """A zero-argument launch of the public op writing into `case`'s outputs (in place for fused adds)."""
    import torch

    from kernels import ops

    p, a = problem, case.args
    x, w, r, y = a["x"], a["weight"], a.get("residual"), a.get("y")
    eps, scale = case.eps, case.scale
    if not p.spec.per_head:  # the case holds [T, 1, C]; row ops take [..., C]
        x = x.view(p.T, p.C)
        y = None if y is None else y.view(p.T, -1)
    op = p.op
    if p.out_format in FP4_BLOCK:
        bs = a["block_scale"]
        if p.out_format == "nvfp4":
            bs = bs.view(torch.float8_e4m3fn)
        if op == "fused_rmsnorm_silu":
            return lambda: ops.fused_rmsnorm_silu(x, w, eps, out=y, block_scale=bs)
        gs = a.get("global_scale")
        return lambda: ops.rmsnorm_fp4quant(x, w, y_fp4=y, block_scale=bs, global_scale=gs, eps=eps,
                                            block_size=FP4_BLOCK[p.out_format],
                                            is_sf_swizzled_layout=p.scale_layout == "swizzled")
    fn = getattr(ops, op)
    if op == "rmsnorm_quant":
        return lambda: fn(y, x, w, scale, eps)
    if op == "fused_add_rmsnorm_quant":
        return lambda: fn(y, x, r, w, scale, eps)
    if p.spec.residual:  # fused add: x and residual updated in place
        return lambda: fn(x, r, w, eps)
    return lambda: fn(x, w, eps, out=y)


def build_channel_first(problem, case) -> Callable[[], object]:
    """channel_first_rmsnorm on a channel-first case, writing into its poisoned y."""
    from kernels.channel_first_op import channel_first_rmsnorm

    a, p = case.args, problem
    x, w, b, y = a["x"], a["weight"], a.get("bias"), a["y"]
    return lambda: channel_first_rmsnorm(x, w, b, case.eps, silu=p.silu, l2norm=p.l2norm, out=y, scale=case.scale)


def build_moe(problem, case) -> Callable[[], object]:
    """fused_moe on a fused-MoE case with no config forced: the LUT entry for the call's T or the heuristic,
    as a serving engine's call gets."""
    from kernels.fused_moe import fused_moe

    a, p = case.args, problem
    return lambda: fused_moe(a["x"], a["w1_weight"], a["w1_weight_sf"], a["w2_weight"], a["w2_weight_sf"],
                             a["token_selected_experts"], a["token_final_scales"], p.E, p.top_k,
                             w1_alpha=a["w1_alpha"], w2_alpha=a["w2_alpha"], fc2_input_scale=a["fc2_input_scale"],
                             num_local_experts=p.n_local, output=a["out"], activation=p.activation,
                             quant_mode=p.quant_mode)


BUILDERS = {"row": build, "channel_first": build_channel_first, "moe": build_moe}


def measure_op(problem) -> dict:
    """Check then time the public op on rotated buffers (in the timing process, on the GPU)."""
    from .trial_worker import check_then_time

    make = BUILDERS[family_of(problem).name]

    def make_launch(case):
        launch = make(problem, case)
        return launch, launch

    return check_then_time(problem, make_launch)
