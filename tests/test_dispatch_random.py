"""Dispatch never returns a config the kernel cannot run: 10,000 random shapes, row strides and pointer
alignments, against an exported LUT (so every tier is exercised) and against no LUT at all."""
from __future__ import annotations

import random
from collections import Counter

import pytest
from click.testing import CliRunner

from kernels.config import max_vec_bytes, violations
from kernels.dispatch import TIERS, Dispatcher
from kernels.luts import read_lut
from kernels.problem import FP4_BLOCK, IN_DTYPES, OPS, Problem, out_formats
from lut_rows import TOKENS, synthetic_rows
from sweep.cli import main
from sweep.results_io import append_rows

N = 10_000
ALIGNMENTS = (2, 4, 8, 16, 32, 256)


@pytest.fixture(scope="module")
def lut_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("random")
    append_rows(d / "results", synthetic_rows())
    out = d / "sm90_synthetic.py"
    r = CliRunner().invoke(main, ["export", "--results", str(d / "results"), "--allow-synthetic", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


def _log_uniform(rng: random.Random, hi: int) -> int:
    return max(1, int(round(2 ** rng.uniform(0, hi.bit_length()))))


def random_case(rng: random.Random, tuned: list[tuple]):
    """A random (problem, row_stride, ptr_align); half the time near a tuned family so LUT tiers answer."""
    if rng.random() < 0.5:
        op, out, layout, dtype, C, heads = rng.choice(tuned)
        if rng.random() < 0.3:  # a neighbouring C of the same family
            blk = FP4_BLOCK.get(out, 1)
            C = max(blk, (C * rng.choice((3, 5, 7)) // 4) // blk * blk)
        T = rng.choice(TOKENS) if rng.random() < 0.5 else rng.randrange(0, 200_000)
    else:
        op = rng.choice(sorted(OPS))
        dtype = rng.choice(IN_DTYPES)
        out = rng.choice(out_formats(op, dtype))
        layout = "swizzled" if OPS[op].fp4_scales and rng.random() < 0.5 else "rowmajor"
        blk = FP4_BLOCK.get(out, 1)
        C = blk * _log_uniform(rng, 32768 // blk)
        heads = rng.randint(1, 64) if OPS[op].per_head else 1
        T = rng.choice((0, 1, _log_uniform(rng, 1 << 20)))
    p = Problem(op, T, C, in_dtype=dtype, out_format=out, heads=heads, scale_layout=layout)
    stride = None if rng.random() < 0.4 else C + rng.choice((0, 1, 2, 3, 4, 8, rng.randrange(0, 4096)))
    return p, stride, rng.choice(ALIGNMENTS)


@pytest.mark.parametrize("with_lut", [True, False], ids=["exported-lut", "no-lut"])
def test_dispatch_never_returns_an_invalid_config(lut_path, with_lut):
    d = Dispatcher.from_paths([lut_path]) if with_lut else Dispatcher([])
    tuned = sorted({k[:-1] for k in read_lut(lut_path).exact})
    rng = random.Random(20261122)
    tiers = Counter()
    unsupported = 0
    for _ in range(N):
        p, stride, align = random_case(rng, tuned)
        if p.out_format in FP4_BLOCK and max_vec_bytes(p, stride, align) < 4:
            # FP4 packs element pairs per thread: 2-byte aligned data has no valid config, and says so
            with pytest.raises(ValueError, match="no valid kernel config"):
                d.select_config(p, 90, "synthetic", row_stride=stride, ptr_align=align)
            unsupported += 1
            continue
        cfg, tier = d.select_config(p, 90, "synthetic", row_stride=stride, ptr_align=align)
        tiers[tier] += 1
        why = violations(p, cfg, 90, stride)
        assert not why, (p, stride, align, tier, cfg, why)
        assert cfg.vec_bytes <= max_vec_bytes(p, stride, align), (p, stride, align, tier, cfg)
        assert min(align, 16) % cfg.vec_bytes == 0, (p, stride, align, tier, cfg)
    assert set(tiers) <= set(TIERS)
    if with_lut:
        assert all(tiers[t] > 100 for t in TIERS), tiers  # every tier was exercised
    else:
        assert tiers == {"heuristic": N - unsupported}
    assert unsupported < N // 10
