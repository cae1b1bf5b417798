"""Kernel correctness on a GPU: every op x out format against the torch reference.

Inputs are randn*5+5 with weights in [0.5, 2]; outputs are poisoned twice (0xFF, then 0x00) and the
check must pass after each run, so an unwritten element cannot pass by matching the poison.
Tolerances: kernels/check.py (bf16 2^-7 rel + 1e-3 abs, fp16 2^-9 rel, fp8 <= 1 code, FP4 scales
<= 1 code and e2m1 codes <= 1 apart on < 1 % of elements; bit-exactness of FP4 in test_fp4_gpu.py).
"""
from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from kernels.config import KNOB_CHOICES, KernelConfig, heuristic, is_valid
from kernels.problem import FP4_BLOCK, OPS, Problem, out_formats

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from kernels import runner  # noqa: E402

ARCH = runner.arch_of()
SM = int(ARCH[3:-1])
C_VALUES = (1, 7, 33, 64, 160, 1000, 4096, 16384, 65536)
T_VALUES = (0, 1, 3, 1560, 99840)
MAX_ELEMS = 1 << 25  # keep each case under ~64 MB of bf16 input


def _problems():
    for op, spec in OPS.items():
        for fmt in out_formats(op, "bf16"):
            layouts = ("rowmajor", "swizzled") if spec.fp4_scales else ("rowmajor",)
            for layout in layouts:
                for C in C_VALUES:
                    if fmt in FP4_BLOCK and C % FP4_BLOCK[fmt]:
                        continue
                    heads = 4 if spec.per_head else 1
                    for T in T_VALUES:
                        if T * C * heads > MAX_ELEMS:
                            continue
                        yield Problem(op, T, C, "bf16", fmt, heads, layout)
    for op in ("rmsnorm", "fused_add_rmsnorm", "qk_rmsnorm", "fused_rmsnorm_silu"):  # fp16 inputs
        for C in (64, 1000, 4096):
            yield Problem(op, 1560, C, "fp16", "fp16", 4 if OPS[op].per_head else 1)


def _run_checked(p: Problem, cfg: KernelConfig, row_pad: int = 0, seed: int = 0):
    case = runner.make_case(p, seed=seed, row_pad=row_pad)
    launch = runner.launcher(p, cfg, case)
    results = []
    for byte in (0xFF, 0x00):
        runner.poison(case, byte)
        launch()
        torch.cuda.synchronize()
        if p.T:
            results.append(runner.check(p, case))
    for r in results:
        assert r.ok, f"{p} {cfg.short()} pad={row_pad}: {r.message}"
    return results


PROBLEMS = list(_problems())


@pytest.mark.parametrize("p", PROBLEMS, ids=lambda p: f"{p.op}-{p.out_format}-{p.scale_layout}-C{p.C}-T{p.T}")
def test_heuristic_config_matches_reference(p):
    _run_checked(p, heuristic(p, SM))


@pytest.mark.parametrize("op,fmt,C,pad", [
    ("rmsnorm", "bf16", 1000, 8), ("rmsnorm", "bf16", 33, 3), ("fused_add_rmsnorm", "bf16", 4096, 64),
    ("fused_rmsnorm_silu", "fp8", 160, 16), ("rmsnorm_quant", "fp8", 64, 8), ("qk_rmsnorm", "bf16", 128, 8),
    ("rmsnorm_fp4quant", "nvfp4", 1024, 32), ("fused_rmsnorm_silu", "nvfp4", 320, 64),
])
def test_strided_rows(op, fmt, C, pad):
    p = Problem(op, 1560, C, "bf16", fmt, 4 if OPS[op].per_head else 1)
    cfg = heuristic(p, SM, row_stride=C + pad)
    _run_checked(p, cfg, row_pad=pad)


PREFETCH_CASES = [Problem(op, T, C, "bf16", fmt, 4 if OPS[op].per_head else 1, layout)
                  for op, spec in OPS.items() for fmt in out_formats(op, "bf16")
                  for layout in (("rowmajor", "swizzled") if spec.fp4_scales else ("rowmajor",))
                  for T, C in ((1, 64), (1560, 160), (3001, 1024))]


@pytest.mark.parametrize("p", PREFETCH_CASES, ids=lambda p: f"{p.op}-{p.out_format}-{p.scale_layout}-C{p.C}-T{p.T}")
@pytest.mark.parametrize("ctas_per_sm", (0, 2))
def test_l2_prefetch_matches_reference(p, ctas_per_sm):
    """The prefetch before the PDL wait reads addresses only: results equal the plain kernel's reference,
    on a plain grid and on a persistent one (which prefetches only its first row block)."""
    cfg = replace(heuristic(p, SM), pdl=True, l2_prefetch=True, ctas_per_sm=ctas_per_sm)
    assert is_valid(p, cfg, SM), cfg.short()
    _run_checked(p, cfg)
    _run_checked(p, cfg, row_pad=16 if p.C % 8 == 0 else 0)


def _random_configs(p: Problem, n: int, seed: int):
    rng = random.Random(seed)
    seen, out = set(), []
    for _ in range(4000):
        cfg = KernelConfig(**{k: rng.choice(v) for k, v in KNOB_CHOICES.items()})
        if cfg not in seen and is_valid(p, cfg, SM):
            seen.add(cfg)
            out.append(cfg)
            if len(out) == n:
                break
    return out


SPREAD = [Problem("fused_rmsnorm_silu", 1560, 160, "bf16", "bf16"), Problem("fused_rmsnorm_silu", 999, 1024, "bf16", "fp8"),
          Problem("rmsnorm", 777, 4096), Problem("fused_add_rmsnorm", 500, 5120),
          Problem("qk_rmsnorm", 300, 128, heads=8), Problem("rmsnorm_fp4quant", 300, 2048, "bf16", "nvfp4", 1, "swizzled"),
          Problem("rmsnorm_fp4quant", 257, 1024, "bf16", "mxfp4"), Problem("fused_rmsnorm_silu", 1560, 640, "bf16", "nvfp4"),
          Problem("rmsnorm", 64, 65536), Problem("fused_add_rmsnorm_quant", 129, 3072, "bf16", "fp8")]


@pytest.mark.parametrize("p", SPREAD, ids=lambda p: f"{p.op}-{p.out_format}-C{p.C}")
def test_non_heuristic_knob_spread(p):
    cfgs = _random_configs(p, 12, seed=p.C)
    assert len(cfgs) >= 6, "the knob space should hold several valid configs"
    for cfg in cfgs:
        _run_checked(p, cfg, seed=1)


def test_int64_indexing_beyond_2_31_elements():
    """T*C >= 2^31: rows near the end must be right (32-bit offsets would wrap)."""
    C = 65536
    T = (1 << 31) // C + 2
    p = Problem("rmsnorm", T, C)
    x = (torch.randn(T, 1, C, device="cuda", dtype=torch.bfloat16) * 5 + 5)
    w = (torch.rand(C, device="cuda") * 1.5 + 0.5).to(torch.bfloat16)
    y = torch.full_like(x, float("nan"))
    case = runner.Case(p, {"x": x, "weight": w}, {"x": x, "weight": w, "y": y}, outputs=("y",))
    runner.launcher(p, heuristic(p, SM), case)()
    torch.cuda.synchronize()
    for rows in (slice(0, 2), slice(T - 3, T)):
        xs = x[rows, 0].float()
        ref = xs * torch.rsqrt((xs * xs).mean(-1, keepdim=True) + 1e-6) * w.float()
        got = y[rows, 0].float()
        assert not torch.isnan(got).any()
        assert torch.allclose(got, ref, rtol=2 ** -7, atol=1e-3)
