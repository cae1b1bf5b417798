"""Synthetic-backend sweep rows for LUT export and dispatch tests: per problem, the heuristic plus every
valid config of a small knob grid, timed by the project's synthetic cost model (sweep.synthetic)."""
from __future__ import annotations

import itertools

from kernels.config import KernelConfig, heuristic, is_valid
from kernels.problem import Problem, ideal_bytes
from sweep import synthetic

FAMILIES = (  # (op, out_format, scale_layout, C values, heads)
    ("rmsnorm", "bf16", "rowmajor", (64, 256, 1024, 4096), 1),
    ("fused_rmsnorm_silu", "fp8", "rowmajor", (128, 1024), 1),
    ("rmsnorm_fp4quant", "nvfp4", "swizzled", (2048,), 1),
    ("qk_rmsnorm", "bf16", "rowmajor", (128,), 8),
)
TOKENS = (1, 16, 1560, 6240, 24960, 99840)
GRID = dict(threads=(128, 256, 1024), threads_per_row=(8, 32, 128, 1024), vec_bytes=(8, 16),
            stage=("reg", "smem"), ctas_per_sm=(0, 2), cluster=(1, 2))


def candidates(p: Problem) -> list[KernelConfig]:
    out = {heuristic(p)}
    for values in itertools.product(*GRID.values()):
        cfg = KernelConfig(**dict(zip(GRID, values)))
        if is_valid(p, cfg):
            out.add(cfg)
    return sorted(out, key=KernelConfig.short)


def problems(families=FAMILIES, tokens=TOKENS):
    for op, out, layout, cs, heads in families:
        for C in cs:
            for T in tokens:
                yield Problem(op, T, C, out_format=out, heads=heads, scale_layout=layout)


def synthetic_rows(families=FAMILIES, tokens=TOKENS, run_id: str = "synthetic-run-1") -> list[dict]:
    """One ok trial row per (problem, candidate) plus a failed row per problem that must be ignored."""
    info = synthetic.device_info()
    rows = []
    for p in problems(families, tokens):
        base = dict(run_id=run_id, study=f"{p.op}-{p.out_format}-{p.T}x{p.C}", kind="trial", impl="lutforge",
                    problem_set="test", op=p.op, out_format=p.out_format, scale_layout=p.scale_layout,
                    in_dtype=p.in_dtype, T=p.T, C=p.C, heads=p.heads, bytes=ideal_bytes(p),
                    timestamp="2026-11-22T10:00:00Z", **info)
        times = {cfg: synthetic.model_us(p, cfg) for cfg in candidates(p)}
        heur = heuristic(p)
        for i, (cfg, us) in enumerate(times.items()):
            rows.append(base | {f"knob_{k}": v for k, v in cfg.as_dict().items()}
                        | dict(trial=i, config_source="heuristic" if cfg == heur else "search", status="ok",
                               median_us=us, p20_us=us, p80_us=us))
        # A failed trial of the slowest config, timed as if it beat everything: export must ignore it.
        slowest = max(times, key=times.get)
        rows.append(base | {f"knob_{k}": v for k, v in slowest.as_dict().items()}
                    | dict(trial=len(times), config_source="search", status="wrong_result",
                           error="output mismatch", median_us=min(times.values()) / 2))
    return rows
