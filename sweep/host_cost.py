"""Host cost per eager call: what serving code pays on the CPU for one call of an op, beside torch and the peers.

A 1-3 us norm is worth nothing if its call costs 200 us of Python. Measured as DESIGN.md §Timing says: N
back-to-back calls without a sync, median over repeats. The GPU is held busy by a sleep kernel queued first,
so the calls only enqueue and the figure is pure host time even where the kernel would be slower than its
launch; N stays below the launch queue's depth so no call waits for a free slot.

Implementations (rows kind=host, impl=...):
  lutforge            the public op as a user calls it (outputs allocated by the op where it allocates)
  lutforge_unchecked  fused_moe with check_expert_ids=False (the default check reads the ids back: a sync)
  lutforge_custom_op  torch.ops.lutforge.norm, the custom op torch.compile graphs call (outputs preallocated)
  lutforge_launch     the compiled TVM-FFI function alone with prebuilt arguments: the floor of our call path
  cute_jit_launch     the same kernel compiled without TVM-FFI, called through CuTe-DSL's own executor with
                      prebuilt arguments (what the call path was built on before; rmsnorm only)
  torch_rms_norm      torch.nn.functional.rms_norm at the same shape: the budget every op is judged against
  torch_eager         the op written as torch ops (e.g. rms_norm then silu), as a user without lutforge would
  quack, liger, flashinfer  their public calls, where installed and where they have the op
"""
from __future__ import annotations

import statistics
import time

from kernels.problem import FP4_BLOCK, Problem

CALLS = 400  # per repeat; below the CUDA launch queue's ~1024 entries
REPEATS = 9
SLEEP_CYCLES_PER_CALL = 200_000  # ~100 us at ~2 GHz: more than any call here costs, so the GPU stays busy
IMPLS = ("lutforge", "lutforge_unchecked", "lutforge_custom_op", "lutforge_launch", "cute_jit_launch",
         "torch_rms_norm", "torch_eager", "quack", "liger", "flashinfer")


def _inputs(p: Problem, device):
    import torch

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[p.in_dtype]
    g = torch.Generator(device=device).manual_seed(0)
    shape = (p.T, p.heads, p.C) if p.spec.per_head else (p.T, p.C)
    x = (torch.randn(shape, generator=g, device=device) * 5 + 5).to(dt)
    w = (torch.rand(p.C, generator=g, device=device) + 0.5).to(dt)
    r = (torch.randn(shape, generator=g, device=device)).to(dt) if p.spec.residual else None
    return x, w, r


def calls(p: Problem, device="cuda") -> dict:
    """impl -> zero-argument callable doing one call of `p` the way that impl's users call it (only the impls
    that can run it here)."""
    import importlib.util

    import torch
    import torch.nn.functional as F

    from kernels import ops
    from kernels.family import family_of

    if family_of(p).name == "moe":
        return _moe_calls(p, device)
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


def _moe_calls(p, device) -> dict:
    """fused_moe as called eagerly (expert-id check included: it syncs), without that check (what serving code
    that trusts its router pays), and the torch grouped-GEMM baseline (W4A16 problems)."""
    from kernels import moe_runner

    from . import peers

    case = moe_runner.make_case(p, device)
    fns = {"lutforge": moe_runner.public_launcher(p, case),
           "lutforge_unchecked": moe_runner.public_launcher(p, case, check_expert_ids=False)}
    if peers.unsupported(p, "torch_eager") is None:
        fns["torch_eager"] = peers.build("torch_eager", p, case)[0]
    return fns


def time_host(fn, calls: int = CALLS, repeats: int = REPEATS) -> tuple[float, float, float]:
    """(median, p20, p80) host microseconds per call over `repeats` runs of `calls` back-to-back calls."""
    import torch

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(repeats):
        torch.cuda._sleep(SLEEP_CYCLES_PER_CALL * calls)  # the GPU is busy for longer than the loop takes
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        per_call.append((t1 - t0) / calls * 1e6)
    q = statistics.quantiles(per_call, n=5)
    return statistics.median(per_call), q[0], q[-1]


def measure(p: Problem, impls=IMPLS) -> list[dict]:
    """One dict per impl that can run `p` here: impl, host_us, host_p20_us, host_p80_us (or status/error)."""
    out = []
    for impl, fn in calls(p).items():
        if impl not in impls:
            continue
        try:
            med, p20, p80 = time_host(fn)
            out.append({"impl": impl, "status": "ok", "host_us": med, "host_p20_us": p20, "host_p80_us": p80})
        except Exception as e:  # a peer that fails here is reported, not fatal to the others
            out.append({"impl": impl, "status": "runtime_error", "error": f"{type(e).__name__}: {e}"[:500]})
    return out
