"""`lutforge compile-check`: compile every kernel family's compile-check cases (the row norms' ops x out
formats x a spread of C values and knob configs, the channel-first norms' decoder and spread problems, the
fused-MoE GEMMs of the moe set's layers: sweep/families) for one arch on a CPU-only machine, and print
registers / shared memory per kernel. A config that passes the knob constraints but fails to compile is a
kernel bug (or a missing constraint): exit non-zero."""
from __future__ import annotations

import time

import click

from kernels.compile_cache import ARCHS, KernelCompileError, resource_usage
from kernels.family import families

from .families import harness


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


@click.command("compile-check")
@click.option("--arch", type=click.Choice(sorted(ARCHS)), required=True, help="compile target")
@click.option("--configs", default=2, show_default=True, help="random valid configs per problem besides the heuristic")
@click.option("--quick", is_flag=True, help="fewer problems where a family has a spread to thin")
def compile_check(arch: str, configs: int, quick: bool):
    """Compile kernels for ARCH without a GPU and report their resource use."""
    failures, total = [], 0
    for name in families():
        cases, compile_fn, label, noun = harness(name).compile_cases(arch, configs, quick)
        failed = compile_all(cases, compile_fn, arch, label)
        click.echo(f"{len(cases) - len(failed)}/{len(cases)} {noun} compiled for {arch}")
        failures += failed
        total += len(cases)
    click.echo(f"{total - len(failures)}/{total} kernels compiled for {arch} ({', '.join(families())} families)")
    if failures:
        for f in failures:
            click.echo(f, err=True)
        raise SystemExit(1)
