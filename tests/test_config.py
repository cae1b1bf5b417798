"""Knob constraints and the analytical heuristic (CPU)."""
from __future__ import annotations

import random

import pytest

from kernels.config import (KNOB_CHOICES, KernelConfig, analytical_heuristic, heuristic, is_valid, probes,
                            violations)
from kernels.problem import FP4_BLOCK, OPS, Problem, ideal_bytes, out_formats


def _random_problem(rng: random.Random) -> tuple[Problem, int | None, int]:
    op = rng.choice(list(OPS))
    dt = rng.choice(["bf16", "fp16"])
    fmt = rng.choice(out_formats(op, dt))
    C = rng.choice([rng.randint(1, 512), rng.randint(1, 20000), rng.randint(1, 131072)])
    if fmt in FP4_BLOCK:
        C = max(FP4_BLOCK[fmt], C // FP4_BLOCK[fmt] * FP4_BLOCK[fmt])
    heads = rng.randint(1, 64) if OPS[op].per_head else 1
    layout = rng.choice(["rowmajor", "swizzled"]) if OPS[op].fp4_scales else "rowmajor"
    p = Problem(op, rng.choice([0, 1, 3, rng.randint(1, 1 << 20)]), C, dt, fmt, heads, layout)
    stride = rng.choice([None, C, C + rng.randint(0, 64)])
    align = rng.choice([16, 16, 8, 4, 2])
    if fmt in FP4_BLOCK:  # packed pairs need >= 4-byte vectors: only aligned FP4 data is supported
        stride, align = None, 16
    return p, stride, align


def test_heuristic_valid_for_10000_random_problems():
    rng = random.Random(0)
    for _ in range(10000):
        p, stride, align = _random_problem(rng)
        for arch in (90, 100):
            cfg = heuristic(p, arch, row_stride=stride, ptr_align=align)
            assert not violations(p, cfg, arch, stride), (p, stride, cfg)
            assert cfg.vec_bytes <= align


def test_every_choice_list_is_fixed_and_the_default_config_uses_them():
    cfg = KernelConfig()
    for name, choices in KNOB_CHOICES.items():
        assert getattr(cfg, name) in choices


@pytest.mark.parametrize("cfg,needle", [
    (KernelConfig(threads=64, threads_per_row=128), "threads_per_row"),
    (KernelConfig(vec_bytes=16), "multiple of the vector"),  # C=33 is not a multiple of 8 elements
    (KernelConfig(stage="smem", vec_bytes=2, threads_per_row=32), "cp.async"),
    (KernelConfig(threads=17), "not in"),
    (KernelConfig(l2_prefetch=True), "only pdl has"),  # the prefetch is issued before the PDL wait
])
def test_violations_name_the_reason(cfg, needle):
    p = Problem("rmsnorm", 10, 33)
    assert any(needle in w for w in violations(p, cfg, 90)), violations(p, cfg, 90)


def test_cluster_rules():
    p = Problem("rmsnorm", 10, 65536)
    ok = KernelConfig(threads=1024, threads_per_row=1024, cluster=2)
    assert is_valid(p, ok, 90)
    assert not is_valid(p, ok, 80)  # clusters need SM90
    assert not is_valid(p, KernelConfig(threads=1024, threads_per_row=512, cluster=2), 90)


def test_fp4_block_constrains_vector_and_lanes():
    p = Problem("rmsnorm_fp4quant", 10, 64, out_format="mxfp4")
    # 32-element block with 8-element vectors spans 4 lanes: threads_per_row must be >= 4
    assert not is_valid(p, KernelConfig(threads=128, threads_per_row=2, vec_bytes=16), 90)
    assert is_valid(p, KernelConfig(threads=128, threads_per_row=4, vec_bytes=16), 90)
    assert not is_valid(p, KernelConfig(threads=128, threads_per_row=32, vec_bytes=2), 90)


def test_register_budget_forces_staging_or_cluster_for_long_rows():
    p = Problem("rmsnorm", 10, 131072)
    assert not is_valid(p, KernelConfig(threads=1024, threads_per_row=1024), 90)
    cfg = heuristic(p, 90)
    assert cfg.cluster > 1 or cfg.stage == "smem"


def test_ideal_bytes_counts_each_tensor_once():
    T, C = 1000, 512
    assert ideal_bytes(Problem("rmsnorm", T, C)) == 2 * T * C * 2 + 2 * C
    assert ideal_bytes(Problem("fused_add_rmsnorm", T, C)) == 4 * T * C * 2 + 2 * C  # x, res in; res, x out
    assert ideal_bytes(Problem("rmsnorm_quant", T, C, out_format="fp8")) == T * C * 3 + 2 * C
    assert ideal_bytes(Problem("fused_rmsnorm_silu", T, C, out_format="nvfp4")) == T * C * 2 + 2 * C + T * C // 2 + T * C // 16


def test_analytical_rules_prefetch_into_l2_with_pdl_only():
    """Measured rule (kernels/config.py, every H200 sweep pair): prefetch wherever PDL is on, never without it.
    The learned fallback may correct it where sweep rows say so, but never prefetches without PDL either."""
    for T, C in ((1, 64), (1560, 64), (6240, 320), (256, 8192), (24960, 256), (99840, 1024), (1, 65536)):
        for op in ("rmsnorm", "fused_rmsnorm_silu", "fused_add_rmsnorm"):
            p = Problem(op, T, C)
            cfg = analytical_heuristic(p, 90)
            assert cfg.l2_prefetch == cfg.pdl, (p, cfg.short())
            assert not heuristic(p, 90).l2_prefetch or heuristic(p, 90).pdl
            assert not heuristic(p, 80).l2_prefetch  # no PDL before SM90
    assert analytical_heuristic(Problem("rmsnorm", 1560, 64), 90).l2_prefetch
    assert not analytical_heuristic(Problem("rmsnorm", 399360, 1024), 90).pdl  # 1.6 GB: no PDL, no prefetch


@pytest.mark.parametrize("C,tpr", [(64, 8), (128, 16), (96, 4), (160, 4), (40, 1), (48, 2)])
def test_short_rows_leave_no_lane_idle_where_a_power_of_two_divides_them(C, tpr):
    """Measured rule (_threads_per_row): one vector per thread when the row is a power-of-two number of vectors
    (C=64, 128 bf16), else lanes that divide the row (C=96: 4 lanes x 3 vectors, not 16 lanes with 4 idle; at C=160
    the best config with 12 of 32 lanes idle lost to the best idle-free one on 34 of 36 sweep problems)."""
    for T in (333, 3000, 50000):
        cfg = analytical_heuristic(Problem("rmsnorm", T, C), 90)
        assert cfg.vec_bytes == 16 and cfg.threads_per_row == tpr, cfg.short()
        assert (C // 8) % cfg.threads_per_row == 0  # every lane has a vector in every iteration


def test_probes_are_distinct_valid_and_start_with_the_analytical_config():
    rng = random.Random(0)
    for _ in range(200):
        p = Problem(rng.choice(("rmsnorm", "fused_rmsnorm_silu", "fused_add_rmsnorm")), rng.randint(1, 1 << 17),
                    rng.choice((2, 6, 64, 96, 130, 1000, 4096, 65536)))
        for arch in (80, 90, 100):
            ps = probes(p, arch)
            assert ps[0] == analytical_heuristic(p, arch) and len(set(ps)) == len(ps)
            assert all(is_valid(p, c, arch) for c in ps), p
            assert arch >= 90 or not any(c.pdl for c in ps)
