"""Run one channel-first (problem, config) on the GPU, as kernels/runner.py does for the row kernels: random
contiguous [N, C, S] inputs, poisoned outputs, a graph-capturable launch and a check against the float64
reference (kernels/check.py's tolerances). The sweep's timing process reaches it through kernels.family."""
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
    ybuf, ys = slot_views(n, shape, FP8 if p.out_format == "fp8" else dt, device)
    ybuf.view(torch.uint8).fill_(POISON_BYTE)
    cases = []
    for x, w, b, y in zip(xs, ws, bs, ys):
        args = {"x": x, "weight": w, "y": y}
        if b is not None:
            args["bias"] = b
        inputs = {k: v for k, v in args.items() if k != "y"}  # never written: the args are the pristine copies
        cases.append(Case(p, inputs, args, eps=_eps(p), outputs=("y",)))
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
    args = (x.data_ptr(), w.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(), problem.N, problem.S,
            x.stride(0), x.stride(1), y.stride(0), y.stride(1), float(case.eps), float(case.scale))

    def launch():
        fn(*args, torch.cuda.current_stream().cuda_stream)

    return launch


def expected_outputs(problem: cf.ChannelFirstProblem, case: Case) -> dict:
    i = case.inputs
    return {"out": cf.expected_output(problem, i["x"], i["weight"], i.get("bias"), case.eps, case.scale)}


def check(problem: cf.ChannelFirstProblem, case: Case, expected: dict | None = None) -> CheckResult:
    from .check import compare_outputs

    if expected is None:
        expected = expected_outputs(problem, case)
    return compare_outputs(problem, {"out": case.args["y"]}, expected)


def public_launcher(problem, case):
    """channel_first_rmsnorm on a channel-first case, writing into its poisoned y."""
    from .channel_first_op import channel_first_rmsnorm

    a, p = case.args, problem
    x, w, b, y = a["x"], a["weight"], a.get("bias"), a["y"]
    return lambda: channel_first_rmsnorm(x, w, b, case.eps, silu=p.silu, l2norm=p.l2norm, out=y, scale=case.scale)
