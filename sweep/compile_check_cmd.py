"""`lutforge compile-check`: compile every op x out format x a spread of C values and knob configs (and the
fused-MoE GEMMs of the moe set's layers) for one arch on a CPU-only machine, and print registers / shared
memory per kernel. A config that passes the knob constraints but fails to compile is a kernel bug (or a
missing constraint): exit non-zero."""
from __future__ import annotations

import random
import time

import click

from kernels.compile_cache import ARCHS, KernelCompileError, arch_number, compile_kernel, resource_usage
from kernels.config import KNOB_CHOICES, KernelConfig, heuristic, is_valid
from kernels.problem import FP4_BLOCK, OPS, Problem, out_formats

C_SPREAD = (1, 64, 160, 1000, 4096, 65536)


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


def compile_all(cases: list[tuple], compile_fn, arch: str, label) -> list[str]:
    """Compile every (problem, config) of one kernel family, one line each (`label(p, cfg)`, registers,
    shared memory, seconds); returns the failures."""
    failures = []
    for p, cfg in cases:
        t0 = time.perf_counter()
        try:
            regs, smem = resource_usage(compile_fn(p, cfg, arch))
            status = ""
        except KernelCompileError as e:
            regs = smem = None
            status = "FAILED"
            failures.append(f"{p} {cfg.short()}: {e}")
        click.echo(f"{label(p, cfg)} {regs if regs is not None else '-':>4} {smem if smem is not None else '-':>6} "
                   f"{time.perf_counter() - t0:5.2f} {status}")
    return failures


def moe_cases(configs: int) -> list[tuple]:
    """The fused-MoE GEMMs of every layer of the moe problem set (kernels.fused_moe.compile_check_cases)."""
    import problem_sets
    from kernels.fused_moe import compile_check_cases

    layers = dict.fromkeys((p.H, p.I, p.activation) for p in problem_sets.moe_problems("moe"))
    return compile_check_cases(list(layers), configs)


@click.command("compile-check")
@click.option("--arch", type=click.Choice(sorted(ARCHS)), required=True, help="compile target")
@click.option("--configs", default=2, show_default=True, help="random valid configs per problem besides the heuristic")
@click.option("--quick", is_flag=True, help="fewer C values")
def compile_check(arch: str, configs: int, quick: bool):
    """Compile kernels for ARCH without a GPU and report their resource use."""
    from kernels.channel_first import compile_channel_first, compile_check_cases  # the video-VAE family
    from kernels.fused_moe import compile_gemm

    sm = arch_number(arch)
    click.echo(f"{'op':24s} {'out':6s} {'layout':9s} {'C':>6s} {'config':38s} {'regs':>4s} {'smem':>6s} {'s':>5s}")
    rows = [(p, cfg) for i, p in enumerate(check_problems(quick)) for cfg in config_spread(p, sm, configs, seed=i)]
    failures = compile_all(rows, compile_kernel, arch,
                           lambda p, c: f"{p.op:24s} {p.out_format:6s} {p.scale_layout:9s} {p.C:6d} {c.short():38s}")
    click.echo(f"{len(rows) - len(failures)}/{len(rows)} kernels compiled for {arch}")
    cf = compile_check_cases(arch, configs)
    cf_failures = compile_all(cf, compile_channel_first, arch,
                              lambda p, c: f"{p.op:24s} {p.out_format:6s} C={p.C:<6d} S={p.S:<8d} {c.short():28s}")
    click.echo(f"{len(cf) - len(cf_failures)}/{len(cf)} channel-first kernels compiled for {arch}")
    failures += cf_failures
    moe = moe_cases(configs)
    moe_failures = compile_all(moe, compile_gemm, arch,
                               lambda sh, c: f"fused_moe {sh.layer:3s} {sh.activation:5s} {sh.out_dtype:4s} K={sh.K:<6d} "
                                             f"N={sh.N:<6d} {c.short():26s}")
    click.echo(f"{len(moe) - len(moe_failures)}/{len(moe)} fused-MoE GEMMs compiled for {arch}")
    failures += moe_failures
    total = len(rows) + len(cf) + len(moe)
    click.echo(f"{total - len(failures)}/{total} kernels compiled for {arch} (row, channel-first and fused-MoE "
               "families)")
    if failures:
        for f in failures:
            click.echo(f, err=True)
        raise SystemExit(1)
