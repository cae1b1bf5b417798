"""Run one channel-first (problem, config) on the GPU, as kernels/runner.py does for the row kernels: random
contiguous [N, C, S] inputs, poisoned outputs, a graph-capturable launch and a check against the float64
reference (kernels/check.py's tolerances). The sweep's timing process reaches it through kernels.family.

NVFP4 cases hold the channels-last codes y [N, S, C/2] (uint8), the block scales ([N, S, C/16], or the flat
swizzled buffer) and a random global scale in [0.5, 4.5), as the row family's rmsnorm_fp4quant cases; they are
judged as the row family judges FP4 (kernels/check.py: scales at most one code apart in at most 1 % of the
blocks, codes within one step where the scales agree, by value where they do not; the swizzled padding
exactly zero) against encoders.quantize_nvfp4 of the float64 reference's channels-last rows."""
from __future__ import annotations

import torch

from . import channel_first as cf
from .runner import POISON_BYTE, TORCH_DTYPE, Case, CheckResult, poison, slot_views  # noqa: F401 (family API)

FP8 = torch.float8_e4m3fn


def _eps(p: cf.ChannelFirstProblem) -> float:
    return cf.F_NORMALIZE_EPS if p.l2norm else cf.RMS_EPS


def make_case(problem: cf.ChannelFirstProblem, device="cuda", seed: int = 0) -> Case:
    return make_cases(problem, 1, device, seed)[0]


def make_cases(problem: cf.ChannelFirstProblem, n: int, device="cuda", seed: int = 0) -> list[Case]:
    """`n` instances (the timer's rotation sets): x randn*5+5 (never zeros), weight in [0.5, 2], bias
    randn*0.5, y poisoned; each role one buffer of aligned slots (kernels.runner.slot_views)."""
    if n < 1:
        raise ValueError(f"need at least one case, got {n}")
    p = problem
    g = torch.Generator(device=device).manual_seed(seed)
    dt = TORCH_DTYPE[p.in_dtype]
    shape = (p.N, p.C, p.S)

    def fill(scale, shift, dtype=dt):
        return lambda *nk: (torch.randn(*nk, generator=g, device=device) * scale + shift).to(dtype)

    xbuf, xs = slot_views(n, shape, dt, device, fill(5.0, 5.0))
    _, ws = slot_views(n, (p.C,), dt, device, lambda *nk: (torch.rand(*nk, generator=g, device=device) * 1.5
                                                            + 0.5).to(dt))
    bs = slot_views(n, (p.C,), dt, device, fill(0.5, 0.0))[1] if p.bias else [None] * n
    fp4 = {}
    if p.nvfp4:
        ybuf, ys = slot_views(n, (p.N, p.S, p.C // 2), torch.uint8, device)
        nb = p.C // cf.NVFP4_BLOCK
        sf_shape = (cf.scale_bytes(p),) if p.scale_layout == "swizzled" else (p.N, p.S, nb)
        sbuf, fp4["block_scale"] = slot_views(n, sf_shape, torch.uint8, device)
        sbuf.fill_(POISON_BYTE)
        _, fp4["global_scale"] = slot_views(n, (1,), torch.float32, device, lambda *nk: torch.rand(
            *nk, generator=g, device=device) * 4.0 + 0.5)
    else:
        ybuf, ys = slot_views(n, shape, FP8 if p.out_format == "fp8" else dt, device)
    ybuf.view(torch.uint8).fill_(POISON_BYTE)
    cases = []
    for i, (x, w, b, y) in enumerate(zip(xs, ws, bs, ys)):
        args = {"x": x, "weight": w, "y": y}
        if b is not None:
            args["bias"] = b
        args.update({k: v[i] for k, v in fp4.items()})
        # never written: the args are the pristine copies
        inputs = {k: v for k, v in args.items() if k not in ("y", "block_scale")}
        cases.append(Case(p, inputs, args, eps=_eps(p), outputs=("y", "block_scale") if p.nvfp4 else ("y",)))
    return cases


def launcher(problem: cf.ChannelFirstProblem, cfg: cf.ChannelFirstConfig, case: Case, arch: str | None = None):
    """A zero-argument callable launching `cfg` on the current stream (CUDA-graph capturable)."""
    from .runner import arch_of

    a = case.args
    arch = arch or arch_of(a["x"].device)
    if problem.positions == 0:
        return lambda: None
    fn = cf.get_compiled(problem, cfg, arch)
    x, w, y, b = a["x"], a["weight"], a["y"], a.get("bias")
    bp = None if b is None else b.data_ptr()
    if problem.nvfp4:  # ChannelFirstNvfp4Kernel.__call__: y [N, S, C/2] bytes, scales, global scale
        args = (x.data_ptr(), w.data_ptr(), bp, y.data_ptr(), a["block_scale"].data_ptr(),
                a["global_scale"].data_ptr(), problem.N, problem.S, x.stride(0), x.stride(1), y.stride(0),
                y.stride(1), float(case.eps))
    else:
        args = (x.data_ptr(), w.data_ptr(), bp, y.data_ptr(), problem.N, problem.S, x.stride(0), x.stride(1),
                y.stride(0), y.stride(1), float(case.eps), float(case.scale))

    def launch():
        fn(*args, torch.cuda.current_stream().cuda_stream)

    return launch


def expected_outputs(problem: cf.ChannelFirstProblem, case: Case) -> dict:
    i = case.inputs
    if problem.nvfp4:
        codes, sf = cf.expected_output(problem, i["x"], i["weight"], i.get("bias"), case.eps,
                                       global_scale=i["global_scale"])
        return {"out": codes, "block_scale": sf}
    return {"out": cf.expected_output(problem, i["x"], i["weight"], i.get("bias"), case.eps, case.scale)}


def check(problem: cf.ChannelFirstProblem, case: Case, expected: dict | None = None) -> CheckResult:
    from .check import compare_outputs

    if expected is None:
        expected = expected_outputs(problem, case)
    got = {"out": case.args["y"]}
    if problem.nvfp4:
        got["block_scale"] = case.args["block_scale"]
    return compare_outputs(problem, got, expected)


def public_launcher(problem, case):
    """channel_first_rmsnorm on a channel-first case, writing into its poisoned y."""
    from .channel_first_op import channel_first_rmsnorm

    a, p = case.args, problem
    x, w, b, y = a["x"], a["weight"], a.get("bias"), a["y"]
    if p.nvfp4:
        sf, gs = a["block_scale"].view(FP8), a["global_scale"]
        return lambda: channel_first_rmsnorm(x, w, b, case.eps, silu=p.silu, l2norm=p.l2norm, out=y, block_scale=sf,
                                             global_scale=gs, is_sf_swizzled_layout=p.scale_layout == "swizzled")
    return lambda: channel_first_rmsnorm(x, w, b, case.eps, silu=p.silu, l2norm=p.l2norm, out=y, scale=case.scale)
