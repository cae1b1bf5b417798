"""The row norms' harness side (kernels/problem.py, kernels/config.py: [tokens, C] rows): labels, study-name
parts, the cost model's kernel time, the peers (torch eager and compile, quack, liger, flashinfer through
their public APIs), the host-cost calls and the compile-check spread of ops x formats x C."""
from __future__ import annotations

import math
import random
from typing import Callable

from kernels.compile_cache import compile_kernel
from kernels.config import KNOB_CHOICES, KernelConfig, heuristic, is_valid, iters_per_row, smem_bytes
from kernels.problem import FP4_BLOCK, OPS, Problem, ideal_bytes, out_formats

from .. import synthetic as model
from ..peers import torch_peer
from . import Harness

C_SPREAD = (1, 64, 96, 160, 1000, 4096, 65536)  # compile-check: tiny, short non-power-of-two, odd, LLM, beyond-smem
_QUACK_OPS = {"rmsnorm", "fused_add_rmsnorm"}
_LIGER_OPS = {"rmsnorm", "gemma_rmsnorm", "qk_rmsnorm", "gemma_qk_rmsnorm"}
_FLASHINFER_OPS = {"rmsnorm", "gemma_rmsnorm", "fused_add_rmsnorm", "gemma_fused_add_rmsnorm", "rmsnorm_quant",
                   "fused_add_rmsnorm_quant", "qk_rmsnorm", "gemma_qk_rmsnorm", "fused_rmsnorm_silu",
                   "rmsnorm_fp4quant"}


# --------------------------------------------------------------------------- labels and studies
def shape_text(row) -> str:
    """T x C, plus what else tells this problem apart from its neighbours."""
    s = f"{row['T']} × {row['C']}"
    if OPS[row["op"]].per_head:
        s += f" ({row['heads']} heads)"
    if OPS[row["op"]].fp4_scales:
        s += f", {row['scale_layout']} scales"
    return s + f", {row['in_dtype']} in"


def facet_subtitle(k: dict) -> str:
    s = f"{k['in_dtype']} → {k['out_format']}"
    if k["op"] in OPS and OPS[k["op"]].fp4_scales:
        s += f", {k['scale_layout']} scales"
    if k["op"] in OPS and OPS[k["op"]].per_head:
        s += f", {k['heads']} heads"
    return s


def describe_set(ps) -> tuple:
    if ps.per_head:
        table = (["tokens", "heads", "head_dim", "rows"], [[t, h, c, t * h] for t, c, h in ps.shapes])
    else:
        table = (["tokens", "hidden"], [[t, c] for t, c, _ in ps.shapes])
    return len(ps.shapes), "per-head" if ps.per_head else "rows", (*table, [f"{len(ps.shapes)} shapes"])


def scale_layouts(op: str, out: str) -> tuple:
    return ("rowmajor", "swizzled") if out in FP4_BLOCK and OPS[op].fp4_scales else ("rowmajor",)


def inline_problems(op: str, shapes, in_dtype: str, out: str, layout: str) -> list:
    """`--shapes` (T, C, heads) tuples as problems: row ops take those without heads, per-head ops the others."""
    ps = [Problem(op, t, c, in_dtype, out, h or 1, layout) for t, c, h in shapes if (h is not None) == OPS[op].per_head]
    if not ps:
        raise ValueError("no shape of its kind (row ops: TxC, per-head ops: TxHxD)")
    return ps


def study_parts(p: Problem) -> list:
    return ([f"H{p.heads}"] if p.heads != 1 else []) + ([p.scale_layout] if p.scale_layout != "rowmajor" else [])


# --------------------------------------------------------------------------- peers
def peer_unsupported(problem: Problem, impl: str) -> str | None:
    """Why `impl` cannot run a row problem (None = it can; sweep.peers checks the name and the install)."""
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


def peer_build(impl: str, problem, case) -> tuple[Callable[[], object], Callable[[object], None]]:
    """(launch, write_back) of a row peer (sweep.peers.build)."""
    import torch

    p, a = problem, case.args
    none = lambda _res: None  # noqa: E731
    x, w, r, y = a["x"], a["weight"], a.get("residual"), a.get("y")
    rows2d = not p.spec.per_head
    x2 = x.view(p.T, p.C) if rows2d else x
    y2 = None if y is None else (y.view(p.T, -1) if rows2d else y)
    if impl in ("torch_eager", "torch_compile"):
        fn = torch_peer(impl, p, case, _eager_fn)
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


# --------------------------------------------------------------------------- host cost
def _inputs(p: Problem, device):
    import torch

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[p.in_dtype]
    g = torch.Generator(device=device).manual_seed(0)
    shape = (p.T, p.heads, p.C) if p.spec.per_head else (p.T, p.C)
    x = (torch.randn(shape, generator=g, device=device) * 5 + 5).to(dt)
    w = (torch.rand(p.C, generator=g, device=device) + 0.5).to(dt)
    r = (torch.randn(shape, generator=g, device=device)).to(dt) if p.spec.residual else None
    return x, w, r


def host_calls(p: Problem, device="cuda") -> dict:
    """impl -> zero-argument callable doing one call of `p` the way that impl's users call it (only the impls
    that can run it here)."""
    import importlib.util

    import torch
    import torch.nn.functional as F

    from kernels import ops

    x, w, r = _inputs(p, device)
    eps, C, op = 1e-6, p.C, p.op
    fp8 = torch.float8_e4m3fn
    fns: dict = {}
    y8 = torch.empty(x.shape, dtype=fp8, device=device)
    fp4 = p.out_format in FP4_BLOCK
    if op == "rmsnorm":
        fns["lutforge"] = lambda: ops.rmsnorm(x, w, eps)
    elif op == "fused_add_rmsnorm":
        fns["lutforge"] = lambda: ops.fused_add_rmsnorm(x, r, w, eps)
    elif op == "rmsnorm_quant":
        fns["lutforge"] = lambda: ops.rmsnorm_quant(y8, x, w, 0.02, eps)
    elif op == "fused_add_rmsnorm_quant":
        fns["lutforge"] = lambda: ops.fused_add_rmsnorm_quant(y8, x, r, w, 0.02, eps)
    elif op == "qk_rmsnorm":
        fns["lutforge"] = lambda: ops.qk_rmsnorm(x, w, eps)
    elif op == "fused_rmsnorm_silu":
        # fp8 and NVFP4 outputs are chosen by passing `out` (flashinfer's API): buffers a serving engine keeps,
        # so they are allocated once here, as for rmsnorm_quant; bf16 allocates per call inside the op
        if p.out_format == "fp8":
            fns["lutforge"] = lambda: ops.fused_rmsnorm_silu(x, w, eps, out=y8)
        elif fp4:
            y4 = torch.empty((p.T, C // 2), dtype=torch.float4_e2m1fn_x2, device=x.device)
            sf4 = torch.empty((p.T, C // 16), dtype=fp8, device=x.device)
            fns["lutforge"] = lambda: ops.fused_rmsnorm_silu(x, w, eps, out=y4, block_scale=sf4)
        else:
            fns["lutforge"] = lambda: ops.fused_rmsnorm_silu(x, w, eps)
    elif op == "rmsnorm_fp4quant":
        fns["lutforge"] = lambda: ops.rmsnorm_fp4quant(x, w, eps=eps, block_size=FP4_BLOCK[p.out_format],
                                                       is_sf_swizzled_layout=p.scale_layout == "swizzled")
    else:
        raise ValueError(f"no host-cost call for {op}")
    fns["lutforge"]()  # builds the plan (and compiles if nothing covers it) outside the timed region
    torch.cuda.synchronize()
    fns.update(_custom_op_and_launch(p, _latest_plan(p), x, w, r, eps))
    fns["torch_rms_norm"] = lambda: F.rms_norm(x, (C,), w, eps)
    if op == "rmsnorm":
        fns["torch_eager"] = fns["torch_rms_norm"]
    elif op in ("fused_add_rmsnorm", "fused_add_rmsnorm_quant"):
        def add_norm():
            r.add_(x)
            y = F.rms_norm(r, (C,), w, eps)
            if op == "fused_add_rmsnorm_quant":
                y8.copy_((y.float() / 0.02).clamp(-448, 448))
            else:
                x.copy_(y)
        fns["torch_eager"] = add_norm
    elif op == "rmsnorm_quant":
        fns["torch_eager"] = lambda: y8.copy_((F.rms_norm(x, (C,), w, eps).float() / 0.02).clamp(-448, 448))
    elif op == "qk_rmsnorm":
        fns["torch_eager"] = lambda: F.rms_norm(x, (C,), w, eps)
    elif op == "fused_rmsnorm_silu" and not fp4:
        if p.out_format == "fp8":
            fns["torch_eager"] = lambda: F.silu(F.rms_norm(x, (C,), w, eps)).to(fp8)
        else:
            fns["torch_eager"] = lambda: F.silu(F.rms_norm(x, (C,), w, eps))
    if importlib.util.find_spec("quack") and op in ("rmsnorm", "fused_add_rmsnorm"):
        from quack.rmsnorm import rmsnorm_fwd

        fns["quack"] = (lambda: rmsnorm_fwd(x, w, eps=eps)) if op == "rmsnorm" else \
            (lambda: rmsnorm_fwd(x, w, residual=r, eps=eps))
    if importlib.util.find_spec("liger_kernel") and op in ("rmsnorm", "qk_rmsnorm"):
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        def liger():
            with torch.no_grad():
                return LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False)
        fns["liger"] = liger
    if importlib.util.find_spec("flashinfer") and op in ("rmsnorm", "fused_add_rmsnorm", "fused_rmsnorm_silu"):
        import flashinfer

        fns["flashinfer"] = {"rmsnorm": lambda: flashinfer.norm.rmsnorm(x, w, eps),
                             "fused_add_rmsnorm": lambda: flashinfer.norm.fused_add_rmsnorm(x, r, w, eps),
                             "fused_rmsnorm_silu": lambda: flashinfer.norm.fused_rmsnorm_silu(x, w, eps)}[op]
    return fns


def _latest_plan(p: Problem):
    from kernels import ops

    plans = [pl for pl in ops._PLANS.values() if pl.problem == p]
    if not plans:
        raise RuntimeError(f"the public op built no plan for {p}")
    return plans[-1]


def _custom_op_and_launch(p: Problem, plan, x, w, r, eps) -> dict:
    """lutforge_custom_op and lutforge_launch (and cute_jit_launch for rmsnorm) for the plan the op built."""
    import torch

    from kernels import ops

    fp4 = p.out_format in FP4_BLOCK
    y = None if p.spec.residual and not p.out_format == "fp8" else \
        torch.empty(plan.y_shape, dtype=plan.y_dtype, device=x.device)
    sf = torch.empty(plan.sf_shape, dtype=plan.sf_dtype, device=x.device) if fp4 else None
    gs = ops._unit_global_scale(plan.dev) if p.op == "rmsnorm_fp4quant" and p.out_format == "nvfp4" else None
    scale = 0.02 if p.out_format == "fp8" and not p.spec.silu else 1.0
    swz = p.scale_layout == "swizzled"
    fns = {"lutforge_custom_op": lambda: torch.ops.lutforge.norm(x, w, r, y, sf, gs, p.op, eps, scale, swz)}
    args = (x.data_ptr(), w.data_ptr(), None if r is None else r.data_ptr(),
            (x if y is None else y).data_ptr(), None if sf is None else sf.data_ptr(),
            None if gs is None else gs.data_ptr(), *plan.tail, eps, scale, plan.grid)
    fn, dev = plan.fn, plan.dev
    raw = ops._raw_stream
    fns["lutforge_launch"] = lambda: fn(*args, raw(dev))
    if p.op == "rmsnorm":
        fns["cute_jit_launch"] = _cute_jit_launch(p, plan, args)
    return fns


def _cute_jit_launch(p: Problem, plan, int_args):
    """The plan's kernel compiled without TVM-FFI and called through CuTe-DSL's executor (cute pointers and
    numerics prebuilt once): the comparison point for the TVM-FFI call."""
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute
    import torch
    from cutlass.base_dsl.enums import AddressSpace
    from cutlass.cute.runtime import make_ptr

    from cutlass.cute.runtime import make_fake_stream

    from kernels.compile_cache import _fake_args, _target_arch, arch_number, canonical
    from kernels.norm_kernel import KernelSpec, NormKernel
    from kernels.runner import arch_of

    cfg, arch = plan.config, arch_of(plan.device)
    kernel = NormKernel(KernelSpec(canonical(p), cfg, arch_number(arch)))
    fake = list(_fake_args(p, cfg))
    fake[-1] = make_fake_stream()  # a CUstream argument, as the DSL's own executor takes it
    with _target_arch(arch):
        compiled = cute.compile(kernel, *fake)
    dt = cutlass.BFloat16 if p.in_dtype == "bf16" else cutlass.Float16
    vb = cfg.vec_bytes
    ptrs = [make_ptr(dt, int_args[0], AddressSpace.gmem, assumed_align=vb),
            make_ptr(dt, int_args[1], AddressSpace.gmem, assumed_align=vb), None,
            make_ptr(dt, int_args[3], AddressSpace.gmem, assumed_align=vb), None, None]
    t = int_args[6:14]
    rest = [cutlass.Int32(t[0]), *(cutlass.Int64(v) for v in t[1:6]), cutlass.Int32(t[6]), cutlass.Int64(t[7]),
            cutlass.Float32(int_args[14]), cutlass.Float32(int_args[15]), cutlass.Int32(int_args[16])]
    stream = cuda.CUstream(torch.cuda.current_stream().cuda_stream)
    full = ptrs + rest + [stream]
    return lambda: compiled(*full)


# --------------------------------------------------------------------------- the cost model (CPU tests)
def synthetic_us(p: Problem, cfg: KernelConfig) -> float:
    """The row kernel in the cost model: a CTA owns rows_per_cta rows (split over a cluster), its threads keep
    vector loads in flight, warps of a row meet in shared memory."""
    rows = p.rows
    rows_per_cta = cfg.rows_per_cta
    row_blocks = max(1, -(-rows // rows_per_cta))
    grid = row_blocks * cfg.cluster
    resident = min(model.MAX_THREADS_PER_SM // cfg.threads, model.MAX_CTAS_PER_SM,
                   max(1, model.SMEM_PER_SM // max(1, smem_bytes(p, cfg))))
    if cfg.ctas_per_sm:
        resident = min(resident, cfg.ctas_per_sm)
        grid = min(grid, cfg.ctas_per_sm * model.SM_COUNT)
    slots = resident * model.SM_COUNT
    concurrent = min(grid, slots)
    loads = min(iters_per_row(p, cfg), model.LOADS_IN_FLIGHT)
    if cfg.stage == "smem":
        loads = model.LOADS_IN_FLIGHT  # cp.async issues the whole tile before waiting
    inflight = concurrent * cfg.threads * cfg.vec_bytes * loads
    bw = min(model.COPY_GBPS * 1e9, inflight / model.LATENCY_S)
    waves = -(-grid // slots) if not cfg.ctas_per_sm else -(-row_blocks * cfg.cluster // slots)
    # Persistent grids pay one prologue but loop over row blocks; plain grids pay a prologue per wave.
    t = model.LAUNCH_US + (model.WAVE_US if cfg.ctas_per_sm else model.WAVE_US * waves)
    moved = ideal_bytes(p)
    if not cfg.weight_smem and rows_per_cta == 1 and p.C * 2 > 8192:
        moved += grid * p.C * 2 // 8  # weight re-fetched from L2 per CTA, partly overlapping HBM traffic
    t += moved / bw * 1e6
    warps_per_row = max(1, cfg.threads_per_row // 32)
    if warps_per_row > 1:
        t += model.BLOCK_REDUCE_US * math.log2(warps_per_row) * waves
    if cfg.cluster > 1:
        t += model.CLUSTER_SYNC_US * waves
    if cfg.stage == "smem":
        t *= 1.02  # the extra shared-memory round trip
    return t


# --------------------------------------------------------------------------- compile-check
def check_problems(quick: bool) -> list[Problem]:
    out = []
    for op, spec in OPS.items():
        for fmt in out_formats(op, "bf16"):
            for layout in (("rowmajor", "swizzled") if spec.fp4_scales else ("rowmajor",)):
                for C in (C_SPREAD[2:5] if quick else C_SPREAD):
                    if fmt in FP4_BLOCK and C % FP4_BLOCK[fmt]:
                        C = (C // FP4_BLOCK[fmt] + 1) * FP4_BLOCK[fmt]
                    out.append(Problem(op, 0, C, "bf16", fmt, 8 if spec.per_head else 1, layout))
    out.append(Problem("rmsnorm", 0, 4096, "fp16", "fp16"))
    return out


def config_spread(p: Problem, sm: int, n: int, seed: int) -> list[KernelConfig]:
    """The heuristic plus `n` random valid configs (deterministic per problem)."""
    rng = random.Random(seed)
    cfgs = [heuristic(p, sm)]
    for _ in range(2000):
        if len(cfgs) > n:
            break
        c = KernelConfig(**{k: rng.choice(v) for k, v in KNOB_CHOICES.items()})
        if c not in cfgs and is_valid(p, c, sm):
            cfgs.append(c)
    return cfgs


def compile_cases(arch: str, configs: int, quick: bool) -> tuple:
    from kernels.compile_cache import arch_number

    sm = arch_number(arch)
    cases = [(p, cfg) for i, p in enumerate(check_problems(quick)) for cfg in config_spread(p, sm, configs, seed=i)]
    return (cases, compile_kernel, lambda p, c: f"{p.op:24s} {p.out_format:6s} {p.scale_layout:9s} {p.C:6d} "
            f"{c.short():38s}", "row kernels")


HARNESS = Harness(
    x_title="tokens T", x_symbol="T",
    c_title=lambda k: "head dim C" if k["op"] in OPS and OPS[k["op"]].per_head else "hidden C",
    shape_header="shape (T × C)", shape_text=shape_text, size_label=lambda row: str(int(row["T"])),
    facet_fields=("scale_layout", "heads"), facet_subtitle=facet_subtitle, describe_set=describe_set,
    scale_layouts=scale_layouts, inline_problems=inline_problems,
    study_parts=study_parts, size_token=lambda p: f"T{p.T}",
    peer_unsupported=peer_unsupported, peer_build=peer_build, host_calls=host_calls,
    synthetic_us=synthetic_us, synthetic_smem=smem_bytes, compile_cases=compile_cases)
