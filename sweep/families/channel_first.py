"""The channel-first norms' harness side (kernels/channel_first.py: [N, C, S] normalised over C): labels,
study-name parts, the cost model's kernel time, the torch peers (diffusers' WanRMS_norm maths: F.normalize
over dim 1 times sqrt(C) * gamma, plus bias, or RMSNorm over dim 1, and SiLU, in fp32, on the same tensors),
the host-cost calls and the compile-check cases (kernels.channel_first.compile_check_cases)."""
from __future__ import annotations

import math

from kernels import channel_first as cf

from .. import synthetic as model
from ..peers import torch_peer
from . import Harness


def describe_set(ps) -> tuple:
    rows = [[c, n, s, n * s] for c, n, s in ps.shapes]
    return len(ps.shapes), "channel-first", (["C", "N", "S", "positions"], rows, [f"{len(ps.shapes)} shapes"])


def peer_unsupported(p, impl: str) -> str | None:
    if impl not in ("torch_eager", "torch_compile"):
        return f"{impl} has no channel-first norm"
    return "no torch formula for NVFP4 block quantisation in the peers" if p.out_format == "nvfp4" else None


def _channel_first_fn(p, eps: float, scale: float):
    """The channel-first op as torch ops over dim 1 of [N, C, S], fp32 inside, writing y in place."""
    import math

    import torch

    def fn(x, w, b, y):
        s = x.float()
        if p.l2norm:
            v = torch.nn.functional.normalize(s, dim=1, eps=eps) * math.sqrt(p.C)
        else:
            v = s * torch.rsqrt(s.square().mean(1, keepdim=True) + eps)
        v = v * w.float().view(1, -1, 1)
        if b is not None:
            v = v + b.float().view(1, -1, 1)
        if p.silu:
            v = v * torch.sigmoid(v)
        y.copy_((v / scale).clamp(-448.0, 448.0) if p.out_format == "fp8" else v)

    return fn


def peer_build(impl: str, p, case) -> tuple:
    fn = torch_peer(impl, p, case, _channel_first_fn)
    a = case.args
    x, w, b, y = a["x"], a["weight"], a.get("bias"), a["y"]
    return (lambda: fn(x, w, b, y)), (lambda _res: None)


def host_calls(p, device="cuda") -> dict:
    """channel_first_rmsnorm as a decoder calls it (an output of x's dtype allocated by the op; fp8 into a
    buffer it keeps), and the torch formula on the same tensors."""
    from kernels import channel_first_runner as runner
    from kernels.channel_first_op import channel_first_rmsnorm

    case = runner.make_case(p, device)
    a = case.args
    x, w, b = a["x"], a["weight"], a.get("bias")
    if p.out_format == p.in_dtype:
        fns = {"lutforge": lambda: channel_first_rmsnorm(x, w, b, case.eps, silu=p.silu, l2norm=p.l2norm)}
    else:
        fns = {"lutforge": runner.public_launcher(p, case)}
    if peer_unsupported(p, "torch_eager") is None:
        fns["torch_eager"] = peer_build("torch_eager", p, case)[0]
    return fns


def synthetic_us(p: cf.ChannelFirstProblem, cfg: cf.ChannelFirstConfig) -> float:
    """The same physics for the channel-first kernel: a CTA owns positions_per_cta positions of one n and loads
    every channel of them; partial sums of channel groups in different warps meet in shared memory."""
    grid = max(1, p.N * -(-p.S // cfg.positions_per_cta))
    resident = min(model.MAX_THREADS_PER_SM // cfg.threads, model.MAX_CTAS_PER_SM,
                   max(1, model.SMEM_PER_SM // max(1, cf.smem_bytes(p, cfg))))
    slots = resident * model.SM_COUNT
    loads = model.LOADS_IN_FLIGHT if cfg.stage == "smem" else min(cf.channels_per_thread(p, cfg), model.LOADS_IN_FLIGHT)
    inflight = min(grid, slots) * cfg.threads * cfg.vec_bytes * loads
    bw = min(model.COPY_GBPS * 1e9, inflight / model.LATENCY_S)
    waves = -(-grid // slots)
    t = model.LAUNCH_US + model.WAVE_US * waves + cf.ideal_bytes(p) / bw * 1e6
    if cf.reduction_slots(p, cfg) > 1:
        t += model.BLOCK_REDUCE_US * math.log2(cf.reduction_slots(p, cfg)) * waves
    if cfg.vec_bytes * cf.lanes(p, cfg) < 32:
        t *= 1.3  # a warp's run per channel shorter than a 32-byte sector wastes bandwidth
    return t


def compile_cases(arch: str, configs: int, quick: bool) -> tuple:
    return (cf.compile_check_cases(arch, configs), cf.compile_channel_first,
            lambda p, c: f"{p.op:24s} {p.out_format:6s} {p.scale_layout:9s} C={p.C:<6d} S={p.S:<8d} {c.short():28s}",
            "channel-first kernels")



def _no_inline_shapes(op, shapes, in_dtype, out, layout) -> list:
    raise ValueError("--shapes gives row shapes (TxC, TxHxD); channel-first ops take a problem set with a [channel_first] shapes table (e.g. --problem-set wan_vae_decoder)")


HARNESS = Harness(
    x_title="positions N x S", x_symbol="N x S", c_title=lambda k: "channels C",
    shape_header="shape (N × C × S)", shape_text=lambda r: f"{r['N']} × {r['C']} × {r['S']}, {r['in_dtype']} in",
    # N * S alone does not tell two problems apart (192 x 1 x 399360 and 192 x 4 x 99840)
    size_label=lambda r: f"{int(r['N'])}x{int(r['S'])}",
    facet_fields=(), facet_subtitle=lambda k: f"{k['in_dtype']} → {k['out_format']}", describe_set=describe_set,
    scale_layouts=lambda op, out: ("rowmajor",), inline_problems=_no_inline_shapes,
    study_parts=lambda p: [], size_token=lambda p: f"P{p.N}x{p.S}",
    peer_unsupported=peer_unsupported, peer_build=peer_build, host_calls=host_calls,
    synthetic_us=synthetic_us, synthetic_smem=cf.smem_bytes, compile_cases=compile_cases)
