"""Result rows for heatmap and report tests: times from a simple launch + bandwidth model, with GB/s and
% of copy derived from each problem's ideal traffic, as the sweep writes them."""
from __future__ import annotations

from kernels.config import KernelConfig, heuristic
from kernels.problem import Problem, ideal_bytes

DEVICE = "NVIDIA H100 80GB HBM3"
COPY_GBPS = 2976.0


def row(op: str, out_format: str, T: int, C: int, us: float, *, kind: str = "trial", impl: str = "lutforge",
        config_source: str = "search", cfg: KernelConfig | None = None, status: str = "ok",
        problem_set: str = "demo", backend: str = "gpu", run_id: str = "run-a", heads: int = 1,
        in_dtype: str = "bf16", device: str = DEVICE, trial: int = 1, scale_layout: str = "rowmajor") -> dict:
    p = Problem(op, T, C, in_dtype=in_dtype, out_format=out_format, heads=heads, scale_layout=scale_layout)
    b = ideal_bytes(p)
    gbps = b / us / 1e3
    r = dict(run_id=run_id, study=f"{op}-{out_format}-{T}x{C}", trial=trial if kind != "bench" else -1, kind=kind,
             impl=impl, config_source=config_source, problem_set=problem_set, op=op, out_format=out_format,
             scale_layout=p.scale_layout, in_dtype=in_dtype, T=T, C=C, heads=heads, status=status,
             median_us=us if status == "ok" else None, bytes=b, gbps=gbps if status == "ok" else None,
             pct_copy=100 * gbps / COPY_GBPS if status == "ok" else None, copy_gbps=COPY_GBPS, device_name=device,
             device_class="h100", sm=90, sm_count=132, driver="580.65", cuda="13.0", torch="2.13.0",
             cutlass_dsl="4.8.1", lutforge="0.1.0", git_commit="abc1234", timestamp="2026-11-22T10:00:00Z",
             backend=backend)
    if cfg is not None:
        r |= {f"knob_{k}": v for k, v in cfg.as_dict().items()}
    return r


def modelled_us(op: str, out_format: str, T: int, C: int, gbps: float, launch_us: float = 2.0) -> float:
    return launch_us + ideal_bytes(Problem(op, T, C, out_format=out_format)) / gbps / 1e3


def sweep_and_bench_rows(shapes, formats=(("rmsnorm", "bf16"), ("fused_rmsnorm_silu", "bf16"),
                                          ("fused_rmsnorm_silu", "fp8"))) -> list[dict]:
    """Per problem: heuristic trial 0, two search trials (one a failure), a re-bench of the winner, and
    bench rows of lutforge_heuristic, quack and torch_compile."""
    rows = []
    for op, out in formats:
        for T, C in shapes:
            h = heuristic(Problem(op, T, C, out_format=out))
            tuned = KernelConfig(threads=256, threads_per_row=min(256, C // 8), vec_bytes=16)
            speed = 1500 + 400 * (C >= 4096)
            rows += [
                row(op, out, T, C, modelled_us(op, out, T, C, 1200), config_source="heuristic", cfg=h, trial=0),
                row(op, out, T, C, modelled_us(op, out, T, C, speed), cfg=tuned, trial=1),
                row(op, out, T, C, 1.0, cfg=tuned, trial=2, status="compile_error"),
                row(op, out, T, C, modelled_us(op, out, T, C, speed * 0.98), kind="rebench", cfg=tuned, trial=1),
                row(op, out, T, C, modelled_us(op, out, T, C, 1150), kind="bench", impl="lutforge_heuristic",
                    config_source="heuristic", cfg=h, run_id="bench-a"),
                row(op, out, T, C, modelled_us(op, out, T, C, 1700, 3.0), kind="bench", impl="quack",
                    config_source="peer", run_id="bench-a"),
                row(op, out, T, C, modelled_us(op, out, T, C, 900), kind="bench", impl="torch_compile",
                    config_source="peer", run_id="bench-a"),
            ]
    return rows


PUBLIC_OP_SHARE = 0.95  # the public op's modelled bandwidth as a share of the tuned config's (dispatch costs)


def public_op_rows(shapes, formats=(("rmsnorm", "bf16"), ("fused_rmsnorm_silu", "bf16"), ("fused_rmsnorm_silu", "fp8")),
                   run_id: str = "bench-a", problem_set: str = "demo") -> list[dict]:
    """Bench rows of the public op ("lutforge" as `lutforge bench` writes it: kind bench, impl lutforge,
    dispatching the tuned config from the LUT), a little slower than the re-bench of
    `sweep_and_bench_rows` so tests can tell the two series apart."""
    rows = []
    for op, out in formats:
        for T, C in shapes:
            tuned = KernelConfig(threads=256, threads_per_row=min(256, C // 8), vec_bytes=16)
            speed = (1500 + 400 * (C >= 4096)) * PUBLIC_OP_SHARE
            rows.append(row(op, out, T, C, modelled_us(op, out, T, C, speed), kind="bench", impl="lutforge",
                            config_source="lut_exact", cfg=tuned, run_id=run_id, problem_set=problem_set))
    return rows
