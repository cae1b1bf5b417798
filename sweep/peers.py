"""Peer implementations `lutforge bench` times beside lutforge, on the same timer and the same inputs.

Each peer does the op the way its users call it: torch eager and torch.compile run the reference
formula (fp32 inside, SiLU, static fp8 quantisation) writing into the preallocated outputs; quack's
rmsnorm_fwd, liger's LigerRMSNormFunction and flashinfer's norm ops are called through their public
APIs. A peer is checked against lutforge's reference (kernels.runner.check) before it is timed, so a
peer that computes something else is recorded wrong_result, not compared. A peer that cannot do an
op/output format is skipped with the reason `unsupported` gives. Channel-first problems (kernels.family's
channel_first family) have the torch peers only: diffusers' WanRMS_norm maths (F.normalize over dim 1,
times sqrt(C) * gamma, plus bias; or RMSNorm over dim 1) and SiLU, in fp32, on the same [N, C, S] tensors.
The fused MoE has torch eager with the weights dequantised to bf16 (W4A16 problems: torch has no FP4
activations) through torch._grouped_mm.
"""
from __future__ import annotations

import importlib.util
from typing import Callable

from kernels.family import family_of
from kernels.problem import FP4_BLOCK, Problem

PEERS = ("torch_eager", "torch_compile", "quack", "liger", "flashinfer")
_MODULE = {"torch_eager": "torch", "torch_compile": "torch", "quack": "quack", "liger": "liger_kernel",
           "flashinfer": "flashinfer"}
_QUACK_OPS = {"rmsnorm", "fused_add_rmsnorm"}
_LIGER_OPS = {"rmsnorm", "gemma_rmsnorm", "qk_rmsnorm", "gemma_qk_rmsnorm"}
_FLASHINFER_OPS = {"rmsnorm", "gemma_rmsnorm", "fused_add_rmsnorm", "gemma_fused_add_rmsnorm", "rmsnorm_quant",
                   "fused_add_rmsnorm_quant", "qk_rmsnorm", "gemma_qk_rmsnorm", "fused_rmsnorm_silu",
                   "rmsnorm_fp4quant"}


def parse_peers(spec: str) -> list[str]:
    """'all', 'none' (lutforge alone: comparing versions of our own kernel) or a comma list of PEERS names."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"peers must be 'all', 'none' or a comma list of {PEERS}")
    if spec.strip() == "all":
        return list(PEERS)
    if spec.strip() == "none":
        return []
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in PEERS]
    if bad:
        raise ValueError(f"unknown peers {bad}; known: {', '.join(PEERS)}")
    return list(dict.fromkeys(names))


def unsupported(problem: Problem, impl: str) -> str | None:
    """Why `impl` cannot run `problem` here (None = it can). Checks importability without importing (torch,
    whose grouped GEMM the MoE baseline needs, is imported)."""
    if impl not in PEERS:
        raise ValueError(f"unknown peer {impl!r}; known: {', '.join(PEERS)}")
    if importlib.util.find_spec(_MODULE[impl]) is None:
        return f"{_MODULE[impl]} is not installed"
    if family_of(problem).name == "channel_first":
        return None if impl in ("torch_eager", "torch_compile") else f"{impl} has no channel-first norm"
    if family_of(problem).name == "moe":
        if impl != "torch_eager":
            return f"{impl} has no fused MoE for Hopper" if impl != "torch_compile" else \
                "torch.compile of the grouped-GEMM baseline is not set up"
        if problem.quant_mode != "w4a16":
            return "torch has no FP4 activations (W4A4); its bf16 baseline is benched on the w4a16 problems"
        import torch

        return None if hasattr(torch, "_grouped_mm") else "this torch has no torch._grouped_mm"
    op, out = problem.op, problem.out_format
    if impl in ("torch_eager", "torch_compile"):
        if out in FP4_BLOCK:
            return "no torch formula for FP4 block quantisation in the peers"
        return None
    if impl == "quack":
        if op not in _QUACK_OPS:
            return f"quack has no {op}"
        return None
    if impl == "liger":
        if op not in _LIGER_OPS:
            return f"liger has no {op}"
        return None
    if op not in _FLASHINFER_OPS:
        return f"flashinfer has no {op}"
    return None


_COMPILED: dict = {}


def _eager_fn(p: Problem, eps: float, scale: float):
    """The reference formula as torch ops, writing the op's outputs in place (fp32 inside)."""
    import torch

    def fn(x, w, r, y):
        wf = w.float() + 1.0 if p.spec.gemma else w.float()
        if p.spec.residual:
            s = x.float() + r.float()
            r.copy_(s)
        else:
            s = x.float()
        v = s * torch.rsqrt(s.square().mean(-1, keepdim=True) + eps) * wf
        if p.spec.silu:
            v = v * torch.sigmoid(v)
        if p.out_format == "fp8":
            y.copy_((v / scale).clamp(-448.0, 448.0))
        elif y is None:
            x.copy_(v)  # fused add: the normalised value overwrites x
        else:
            y.copy_(v)

    return fn


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


_DEQUANT: list = []  # [(the case's w1 tensor, (W1, W2) bf16)]: one layer's dequantised weights at a time


def _moe_torch_fn(p, case):
    """The fused MoE as a torch user writes it with bf16 weights (dequantised once, outside the timing): sort
    the pairs by expert, torch._grouped_mm for FC1 and FC2 (SM90 bf16 grouped GEMM), SiLU-and-mul or ReLU2
    between, routing weights, index_add_ back to the tokens."""
    import torch

    from kernels.moe_quant import dequantize_weights

    a = case.args
    if not _DEQUANT or _DEQUANT[0][0] is not a["w1_weight"]:  # held, so its identity cannot be reused
        _DEQUANT.clear()
        W1 = (dequantize_weights(a["w1_weight"], a["w1_weight_sf"]) * a["w1_alpha"].view(-1, 1, 1)).bfloat16()
        W2 = (dequantize_weights(a["w2_weight"], a["w2_weight_sf"]) * a["w2_alpha"].view(-1, 1, 1)).bfloat16()
        _DEQUANT.append((a["w1_weight"], (W1, W2)))
    W1, W2 = _DEQUANT[0][1]
    x, ids, rw, out = a["x"], a["token_selected_experts"], a["token_final_scales"], a["out"]
    k, n_local = p.top_k, p.n_local

    def fn():
        flat = ids.reshape(-1).long()
        local = flat < n_local
        key_ = torch.where(local, flat, torch.full_like(flat, n_local))
        order = torch.argsort(key_, stable=True)
        counts = torch.zeros(n_local + 1, dtype=torch.long, device=ids.device).scatter_add_(
            0, key_, torch.ones_like(key_))[:n_local]  # bincount would sync (capture)
        rows = x[order // k]
        # rows past the last group (non-local pairs) are masked below: no host sync, capturable
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = torch._grouped_mm(rows, W1.transpose(1, 2), offs=offs)
        if p.activation == "silu":
            g, u = h.float().chunk(2, dim=-1)
            act = (torch.nn.functional.silu(g) * u).bfloat16()
        else:
            act = torch.relu(h.float()).square().bfloat16()
        y = torch._grouped_mm(act, W2.transpose(1, 2), offs=offs)
        w = rw.reshape(-1)[order[:y.shape[0]]] * local[order[:y.shape[0]]]
        y = torch.where(w.unsqueeze(1) != 0, y.float() * w.unsqueeze(1), 0.0)
        acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        acc.index_add_(0, order[:y.shape[0]] // k, y)
        out.copy_(acc)

    return fn


def _torch_peer(impl: str, p, case, make_fn):
    """The eager function, or its torch.compile'd graph (one per problem, shared by its rotation sets)."""
    import torch

    fn = make_fn(p, case.eps, case.scale)
    if impl == "torch_compile":
        key = (p, case.eps, case.scale)
        if key not in _COMPILED:
            torch._dynamo.reset()  # forget earlier problems' graphs: no recompile-limit fallback
            _COMPILED.clear()
            _COMPILED[key] = torch.compile(fn, dynamic=False)
        fn = _COMPILED[key]
    return fn


def build(impl: str, problem, case) -> tuple[Callable[[], object], Callable[[object], None]]:
    """(launch, write_back): launch runs the peer once on `case`; write_back puts a returned result into
    the case's output tensors so the family runner's check can judge it (no-op for peers writing in place)."""
    import torch

    p, a = problem, case.args
    none = lambda _res: None  # noqa: E731
    if family_of(p).name == "moe":
        return _moe_torch_fn(p, case), none
    if family_of(p).name == "channel_first":
        fn = _torch_peer(impl, p, case, _channel_first_fn)
        x, w, b, y = a["x"], a["weight"], a.get("bias"), a["y"]
        return (lambda: fn(x, w, b, y)), none
    x, w, r, y = a["x"], a["weight"], a.get("residual"), a.get("y")
    rows2d = not p.spec.per_head
    x2 = x.view(p.T, p.C) if rows2d else x
    y2 = None if y is None else (y.view(p.T, -1) if rows2d else y)
    if impl in ("torch_eager", "torch_compile"):
        fn = _torch_peer(impl, p, case, _eager_fn)
        return (lambda: fn(x2, w, r, y2)), none
    if impl == "quack":
        from quack.rmsnorm import rmsnorm_fwd

        if p.spec.residual:
            def write_back(res):
                out, res_out, _ = res
                r.copy_(res_out)
                x2.copy_(out)
            return (lambda: rmsnorm_fwd(x2, w, residual=r, eps=case.eps)), write_back
        return (lambda: rmsnorm_fwd(x2, w, eps=case.eps)), (lambda res: y2.copy_(res[0]))
    if impl == "liger":
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        offset, mode = (1.0, "gemma") if p.spec.gemma else (0.0, "llama")

        def launch():
            with torch.no_grad():
                return LigerRMSNormFunction.apply(x2, w, case.eps, offset, mode, False)
        return launch, (lambda res: y2.copy_(res.view_as(y2)))
    import flashinfer

    norm, eps = flashinfer.norm, case.eps
    op = p.op
    if op in ("rmsnorm", "qk_rmsnorm"):
        return (lambda: norm.rmsnorm(x2, w, eps, out=y2)), none
    if op in ("gemma_rmsnorm", "gemma_qk_rmsnorm"):
        return (lambda: norm.gemma_rmsnorm(x2, w, eps, out=y2)), none
    if op == "fused_add_rmsnorm":
        return (lambda: norm.fused_add_rmsnorm(x2, r, w, eps)), none
    if op == "gemma_fused_add_rmsnorm":
        return (lambda: norm.gemma_fused_add_rmsnorm(x2, r, w, eps)), none
    scale_t = torch.tensor([case.scale], dtype=torch.float32, device=x.device)
    if op == "rmsnorm_quant":
        return (lambda: norm.rmsnorm_quant(y2, x2, w, scale_t, eps)), none
    if op == "fused_add_rmsnorm_quant":
        return (lambda: norm.fused_add_rmsnorm_quant(y2, x2, r, w, scale_t, eps)), none
    bs = a.get("block_scale")
    if op == "fused_rmsnorm_silu":
        if p.out_format == "nvfp4":
            yq, bq = y2.view(torch.float4_e2m1fn_x2), bs.view(torch.float8_e4m3fn)
            return (lambda: norm.fused_rmsnorm_silu(x2, w, eps, out=yq, block_scale=bq)), none
        return (lambda: norm.fused_rmsnorm_silu(x2, w, eps, out=y2)), none
    if op == "rmsnorm_fp4quant":
        from flashinfer.cute_dsl import rmsnorm_fp4quant

        block = FP4_BLOCK[p.out_format]
        fmt = "e4m3" if p.out_format == "nvfp4" else "ue8m0"
        yq = y2.view(torch.float4_e2m1fn_x2)
        bq = bs.view(torch.float8_e4m3fn) if fmt == "e4m3" else bs
        gs = a.get("global_scale")
        return (lambda: rmsnorm_fp4quant(x2, w, y_fp4=yq, block_scale=bq, global_scale=gs, eps=eps,
                                         block_size=block, scale_format=fmt,
                                         is_sf_swizzled_layout=p.scale_layout == "swizzled")), none
    raise ValueError(f"flashinfer peer has no mapping for {op}")


def measure_peer(problem, impl: str) -> dict:
    """Check then time one peer on rotated buffers (runs in the timing process, on the GPU)."""
    from .trial_worker import check_then_time

    reason = unsupported(problem, impl)
    if reason:
        raise ValueError(f"{impl} cannot run {problem.op}/{problem.out_format}: {reason}")

    def make_launch(case):
        launch, write_back = build(impl, problem, case)
        return launch, lambda: write_back(launch())

    return check_then_time(problem, make_launch)
