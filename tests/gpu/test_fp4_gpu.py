"""FP4 outputs on a GPU, bit for bit.

Bit-exact part: rows are built so that the normalisation is exact in fp32 (integer values up to 256,
sum of squares exactly 256*C, eps = 0, weights in {0.5, 1, 1.5, 2}), so the kernel's pre-quantisation
values equal the reference's exactly and the packed FP4 bytes and scale bytes must be identical to the
reference encoder's. Random-data part: codes within the stated tolerance, and the dequantised error
against the fp32 reference is reported.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from kernels import encoders, ops, reference, runner  # noqa: E402
from kernels.problem import Problem  # noqa: E402

DEV = "cuda"


def _four_squares(r: int) -> list[int]:
    for a in range(math.isqrt(r), -1, -1):
        ra = r - a * a
        for b in range(min(a, math.isqrt(ra)), -1, -1):
            rb = ra - b * b
            for c in range(min(b, math.isqrt(rb)), -1, -1):
                d2 = rb - c * c
                d = math.isqrt(d2)
                if d * d == d2 and d <= c:
                    return [a, b, c, d]
    raise AssertionError(f"no four squares for {r}")


def exact_row(C: int, rng: np.random.Generator, outlier: bool = False) -> np.ndarray:
    """Integers |v| <= 256 whose mean square is a power of 4 (rstd is then an exact power of 2)."""
    while True:
        m = min(C, 8 + C // 500)
        free = rng.integers(-3, 4, C - m) if outlier else rng.integers(-24, 25, C - m)
        vals = list(free)
        if outlier and C - m > 0:
            vals[0] = 256
        s = int(sum(int(v) * int(v) for v in vals))
        ms = 1
        while ms * C < s:
            ms *= 4
        r = ms * C - s
        tail = []
        for _ in range(m - 4):
            a = min(256, math.isqrt(r))
            tail.append(a)
            r -= a * a
        last = _four_squares(r)
        if r <= 4 * 256 * 256 and max(last) <= 256:
            tail += last
            row = np.array(vals + tail, dtype=np.int64)
            row *= rng.choice([-1, 1], size=C)
            return rng.permutation(row)


def exact_input(T: int, C: int, seed: int, zero_rows=(), outlier_rows=()):
    rng = np.random.default_rng(seed)
    rows = [np.zeros(C, np.int64) if t in zero_rows else exact_row(C, rng, t in outlier_rows) for t in range(T)]
    x = torch.tensor(np.stack(rows), dtype=torch.float32).to(torch.bfloat16)
    w = torch.tensor(rng.choice([0.5, 1.0, 1.5, 2.0], size=C), dtype=torch.float32).to(torch.bfloat16)
    return x.to(DEV), w.to(DEV)


def _expected(x2d, w, fmt, gs, layout, eps):
    y = reference.rms_norm(x2d, w, eps, compute_dtype=torch.float64).float()
    if fmt == "nvfp4":
        packed, sf = encoders.quantize_nvfp4(y, gs)
    else:
        packed, sf = encoders.quantize_mxfp4(y)
    if layout == "swizzled":
        sf = encoders.swizzle_scales(sf)
    return packed, sf


CASES = []
for fmt, block in (("nvfp4", 16), ("mxfp4", 32)):
    for C in (32, 64, 160, 1024, 2048, 16384):
        for T in (1, 3, 127, 129, 300):
            for layout in ("rowmajor", "swizzled"):
                CASES.append((fmt, C, T, layout, fmt == "nvfp4" and T % 2 == 1))
CASES.append(("nvfp4", 16, 5, "rowmajor", False))


@pytest.mark.parametrize("fmt,C,T,layout,use_gs", CASES, ids=lambda v: str(v))
def test_fp4quant_bit_identical_to_encoder(fmt, C, T, layout, use_gs):
    x, w = exact_input(T, C, seed=C * 1000 + T)
    gs = torch.tensor([1.75 if T % 4 == 1 else 0.375], device=DEV) if use_gs else None
    y4, sf = ops.rmsnorm_fp4quant(x, w, global_scale=gs, eps=0.0, block_size=16 if fmt == "nvfp4" else 32,
                                  is_sf_swizzled_layout=layout == "swizzled")
    exp_y, exp_sf = _expected(x, w, fmt, gs, layout, 0.0)
    assert torch.equal(y4.view(torch.uint8).reshape(exp_y.shape), exp_y)
    got_sf = sf.view(torch.uint8).reshape(-1)[: exp_sf.numel()].reshape(exp_sf.shape)
    assert torch.equal(got_sf, exp_sf)


@pytest.mark.parametrize("layout", ["rowmajor", "swizzled"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4quant_3d_zero_rows_and_outliers(fmt, layout):
    B, S, C = 3, 70, 512
    x, w = exact_input(B * S, C, seed=7, zero_rows={0, 5, 130}, outlier_rows={1, 2, 140, 209})
    x3 = x.reshape(B, S, C)
    # zero rows need eps > 0 (0/0 otherwise); with eps > 0 nonzero rows lose exactness, so use two calls
    y_zero, sf_zero = ops.rmsnorm_fp4quant(x3[:1, :6], w, eps=1e-6, block_size=16 if fmt == "nvfp4" else 32)
    assert (y_zero.view(torch.uint8)[0, [0, 5]] == 0).all() and (sf_zero.view(torch.uint8)[0, [0, 5]] == 0).all()
    nz = torch.ones(B * S, dtype=torch.bool)
    nz[[0, 5, 130]] = False
    x_nz = x[nz.to(DEV)].reshape(-1, 69, C)  # 207 rows as [3, 69, C]
    y4, sf = ops.rmsnorm_fp4quant(x_nz, w, eps=0.0, block_size=16 if fmt == "nvfp4" else 32,
                                  is_sf_swizzled_layout=layout == "swizzled")
    exp_y, exp_sf = _expected(x_nz.reshape(-1, C), w, fmt, None, layout, 0.0)
    assert y4.shape == (3, 69, C // 2)
    assert torch.equal(y4.view(torch.uint8).reshape(exp_y.shape), exp_y)
    assert torch.equal(sf.view(torch.uint8).reshape(-1)[: exp_sf.numel()].reshape(exp_sf.shape), exp_sf)


@pytest.mark.parametrize("op,fmt,C", [("rmsnorm_fp4quant", "nvfp4", 4096), ("rmsnorm_fp4quant", "mxfp4", 4096),
                                      ("fused_rmsnorm_silu", "nvfp4", 160), ("fused_rmsnorm_silu", "nvfp4", 1024)])
def test_fp4_random_data_dequantised_error(op, fmt, C, capsys):
    """Random randn*5+5 rows: codes within the check tolerance; report the dequantised error."""
    p = Problem(op, 1560, C, "bf16", fmt)
    case = runner.make_case(p, seed=3)
    from kernels.config import heuristic

    runner.launcher(p, heuristic(p, int(runner.arch_of()[3:-1])), case)()
    torch.cuda.synchronize()
    r = runner.check(p, case)
    assert r.ok, r.message
    x = case.inputs["x"].reshape(p.T, C)
    y = reference.rms_norm(x, case.inputs["weight"], case.eps).float()
    if op == "fused_rmsnorm_silu":
        y = reference.silu(y)
    gs = case.inputs.get("global_scale")
    deq = encoders.dequantize_fp4(case.args["y"].reshape(p.T, C // 2), case.args["block_scale"], fmt,
                                  gs if fmt == "nvfp4" and op == "rmsnorm_fp4quant" else None)
    rel = float((deq - y).norm() / y.norm())
    with capsys.disabled():
        print(f"\n{op} {fmt} C={C}: dequantised rel. L2 error vs fp32 reference {rel:.4f}; "
              f"codes max distance {r.max_ulp}")
    # e2m1 has 1 mantissa bit: ~9-10 % rms error is the format's own; MXFP4's power-of-two (ceil)
    # scales leave the block maximum anywhere in [3, 6], costing up to one more bit
    assert rel < (0.15 if fmt == "mxfp4" else 0.11)


# --------------------------------------------------------------------------- swizzled scale padding
# The kernel writes the 128x4-swizzled buffer's padding (rows past T up to the 128-row tile, scale columns
# past C/block up to 4) as zeros itself; nothing clears the buffer first. Outputs are poisoned before every
# launch, so a forgotten padding byte fails; a guard region past the buffer must stay untouched.
PAD_SHAPES = [("nvfp4", 16), ("nvfp4", 48), ("nvfp4", 64), ("nvfp4", 1008), ("mxfp4", 64), ("mxfp4", 96),
              ("mxfp4", 1024)]  # scale columns 1, 3, 4, 63 | 2, 3, 32
PAD_T = (1, 127, 128, 129, 1560)
POISONS = (0xFF, 0x7F)
GUARD = 512


def _padding_configs(p: Problem) -> list:
    """The heuristic plus configs spreading rows over CTAs differently: rows per CTA 1..256, persistent grids
    (which loop over row blocks), clusters (some ranks without a scale block), smem staging, PDL."""
    from dataclasses import replace

    from kernels.config import KernelConfig, heuristic, is_valid

    sm = int(runner.arch_of()[3:-1])
    cands = [heuristic(p, sm),
             KernelConfig(threads=32, threads_per_row=2, vec_bytes=16),
             KernelConfig(threads=32, threads_per_row=4, vec_bytes=16),
             KernelConfig(threads=128, threads_per_row=8, vec_bytes=8, ctas_per_sm=1),
             KernelConfig(threads=256, threads_per_row=2, vec_bytes=16, ctas_per_sm=8),  # 128 rows per CTA
             KernelConfig(threads=1024, threads_per_row=4, vec_bytes=16, ctas_per_sm=2),  # 256 rows per CTA
             KernelConfig(threads=512, threads_per_row=16, vec_bytes=8, stage="smem", ctas_per_sm=4),
             KernelConfig(threads=128, threads_per_row=128, vec_bytes=8),  # one row per CTA
             KernelConfig(threads=32, threads_per_row=32, vec_bytes=4, cluster=2),
             KernelConfig(threads=32, threads_per_row=32, vec_bytes=4, cluster=8, ctas_per_sm=2),
             KernelConfig(threads=64, threads_per_row=64, vec_bytes=8, cluster=4, ctas_per_sm=1, pdl=True)]
    cands.append(replace(cands[0], pdl=True, l2_prefetch=True, ctas_per_sm=2))
    out = []
    for c in cands:
        if c not in out and is_valid(p, c, sm):
            out.append(c)
    return out


def _fp4_case(p: Problem, x, w, gs):
    """A runner.Case over given inputs, the scale buffer followed by a GUARD region."""
    from kernels.problem import scale_bytes

    T, C = p.T, p.C
    y = torch.empty(T, 1, C // 2, dtype=torch.uint8, device=DEV)
    sf_full = torch.empty(scale_bytes(p) + GUARD, dtype=torch.uint8, device=DEV)
    args = {"x": x.reshape(T, 1, C), "weight": w, "y": y, "block_scale": sf_full}
    if gs is not None:
        args["global_scale"] = gs
    return runner.Case(p, dict(args), args, eps=0.0, outputs=("y", "block_scale"))


@pytest.mark.parametrize("T", PAD_T)
@pytest.mark.parametrize("fmt,C", PAD_SHAPES, ids=lambda v: str(v))
def test_swizzled_padding_written_by_kernel(fmt, C, T):
    p = Problem("rmsnorm_fp4quant", T, C, "bf16", fmt, 1, "swizzled")
    x, w = exact_input(T, C, seed=C * 7 + T)
    gs = torch.tensor([1.75], device=DEV) if fmt == "nvfp4" else None
    exp_y, exp_sf = _expected(x, w, fmt, gs, "swizzled", 0.0)
    pad = runner.scale_padding_mask(p)
    cfgs = _padding_configs(p)
    assert len(cfgs) >= 5
    for cfg in cfgs:
        case = _fp4_case(p, x, w, gs)
        launch = runner.launcher(p, cfg, case)
        sf_full = case.args["block_scale"]
        for byte in POISONS:
            case.args["y"].fill_(byte)
            sf_full.fill_(byte)
            launch()
            torch.cuda.synchronize()
            sf = sf_full[: exp_sf.numel()]
            what = f"{cfg.short()} poison {byte:#x}"
            assert torch.equal(case.args["y"].reshape(exp_y.shape), exp_y), what
            if pad is not None:
                assert int(sf[pad.to(DEV)].count_nonzero()) == 0, f"{what}: padding not zeroed"
            assert torch.equal(sf, exp_sf), f"{what}: scales differ from the encoder"
            assert bool((sf_full[exp_sf.numel():] == byte).all()), f"{what}: wrote past the scale buffer"


@pytest.mark.parametrize("T", PAD_T)
@pytest.mark.parametrize("fmt,C", [("nvfp4", 48), ("nvfp4", 64), ("mxfp4", 64), ("mxfp4", 96)], ids=lambda v: str(v))
def test_swizzled_padding_public_op_poisoned_buffer(fmt, C, T):
    """The public op launches only the kernel: a caller's poisoned (and oversized) buffer comes back with
    zero padding and the encoder's scales, the bytes past the layout untouched."""
    x, w = exact_input(T, C, seed=C * 11 + T)
    gs = torch.tensor([0.375], device=DEV) if fmt == "nvfp4" else None
    exp_y, exp_sf = _expected(x, w, fmt, gs, "swizzled", 0.0)
    buf = torch.empty(exp_sf.numel() + GUARD, dtype=torch.uint8, device=DEV)
    sf_arg = buf.view(torch.float8_e4m3fn) if fmt == "nvfp4" else buf
    for byte in POISONS:
        buf.fill_(byte)
        y4, sf = ops.rmsnorm_fp4quant(x, w, block_scale=sf_arg, global_scale=gs, eps=0.0,
                                      block_size=16 if fmt == "nvfp4" else 32, is_sf_swizzled_layout=True)
        torch.cuda.synchronize()
        assert sf is sf_arg
        assert torch.equal(y4.view(torch.uint8).reshape(exp_y.shape), exp_y)
        assert torch.equal(buf[: exp_sf.numel()], exp_sf), f"poison {byte:#x}"
        assert bool((buf[exp_sf.numel():] == byte).all())


def test_swizzled_random_data_check_catches_padding():
    """runner.check judges the padding too: it passes after the kernel, fails once a padding byte is dirtied."""
    from kernels.config import heuristic

    p = Problem("rmsnorm_fp4quant", 1560, 48, "bf16", "nvfp4", 1, "swizzled")
    case = runner.make_case(p, seed=5)  # outputs poisoned with 0xFF
    runner.launcher(p, heuristic(p, int(runner.arch_of()[3:-1])), case)()
    torch.cuda.synchronize()
    r = runner.check(p, case)
    assert r.ok, r.message
    pad = runner.scale_padding_mask(p).nonzero()
    case.args["block_scale"][int(pad[-1])] = 0x7F
    r = runner.check(p, case)
    assert not r.ok and "padding" in r.message
