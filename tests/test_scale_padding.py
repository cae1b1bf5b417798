"""Swizzled FP4 scales: the kernel itself writes every byte of the 128x4-swizzled buffer, the padding as zeros
(no separate zeroing launch). A CPU model of which thread of which CTA writes which scale byte, built from the
kernel's own derived constants and offset arithmetic, must hit every byte exactly once for every config the
constraints allow (persistent grids and clusters included); a few padding-heavy configs compile for both arches."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kernels import encoders, runner
from kernels.compile_cache import compile_kernel
from kernels.config import KNOB_CHOICES, KernelConfig, is_valid
from kernels.norm_kernel import KernelSpec, NormKernel, scale_grid_rows, swizzled_sf_offset
from kernels.problem import FP4_BLOCK, Problem

MAPPING_KNOBS = ("threads", "threads_per_row", "vec_bytes", "cluster", "ctas_per_sm")  # what moves writes around


def mapping_configs(p: Problem, arch: int = 90) -> list[KernelConfig]:
    """One valid config per distinct thread mapping (stage, weight_smem, pdl do not change who writes what)."""
    out = []
    for vals in itertools.product(*(KNOB_CHOICES[k] for k in MAPPING_KNOBS)):
        for stage in ("reg", "smem"):
            cfg = KernelConfig(**dict(zip(MAPPING_KNOBS, vals)), stage=stage)
            if is_valid(p, cfg, arch):
                out.append(cfg)
                break
    return out


def model_scale_writes(p: Problem, cfg: KernelConfig, sm_count: int) -> tuple[np.ndarray, np.ndarray]:
    """(byte offsets, values) of every scale store the kernel issues, in the kernel's loop structure:
    grid x (persistent row-block loop) x cluster rank x thread x vector. Value: row*n_sf+col+1 for a real
    scale, 0 for padding."""
    k = NormKernel(KernelSpec(p, cfg, 90))
    rows = p.rows
    grid_rows = scale_grid_rows(rows) if k.swizzled else rows
    n_blocks = -(-grid_rows // k.rpc)
    grid_x = min(n_blocks, max(1, sm_count * cfg.ctas_per_sm)) if cfg.ctas_per_sm > 0 else n_blocks
    blk = k.fp4_block
    n_sf, lpb = p.C // blk, blk // k.v
    k_tiles = -(-n_sf // 4)
    rbs = np.array([rb for bidx in range(grid_x)
                    for rb in (range(bidx, n_blocks, grid_x) if cfg.ctas_per_sm > 0 else (bidx,))])
    rb, rank, tidx, i = np.meshgrid(rbs, np.arange(k.cluster), np.arange(cfg.threads), np.arange(k.iters),
                                    indexing="ij")
    lane, r_in_cta = tidx % k.tpr, tidx // k.tpr
    row = rb * k.rpc + r_in_cta
    vi_local = i * k.tpr + lane
    vi = rank * k.chunk_vecs + vi_local
    vec_ok = np.ones_like(vi, bool) if k.even else (vi_local < k.chunk_vecs) & (vi < k.n_vec)
    sel = vec_ok & (row < grid_rows) & (lane % lpb == 0)
    row, col = row[sel], (vi[sel] * k.v) // blk
    offs = [swizzled_sf_offset(row, col, k_tiles)]
    vals = [np.where(row < rows, row * n_sf + col + 1, 0)]
    if n_sf % 4:  # the owner of a row's last scale zeroes the row's padded columns
        last = row[col == n_sf - 1]
        for c in range(n_sf, 4 * k_tiles):
            offs.append(swizzled_sf_offset(last, c, k_tiles))
            vals.append(np.zeros_like(last))
    return np.concatenate(offs), np.concatenate(vals)


def expected_buffer(p: Problem) -> np.ndarray:
    n_sf = p.C // FP4_BLOCK[p.out_format]
    exp = np.zeros(encoders.swizzled_scale_bytes(p.rows, n_sf), np.int64)
    r = torch.arange(p.rows).unsqueeze(1)
    c = torch.arange(n_sf).unsqueeze(0)
    exp[encoders.swizzle_offset(r, c, n_sf).numpy()] = (r * n_sf + c + 1).numpy()
    return exp


SHAPES = [("nvfp4", 16), ("nvfp4", 48), ("nvfp4", 64), ("nvfp4", 160), ("nvfp4", 1008),
          ("mxfp4", 32), ("mxfp4", 64), ("mxfp4", 96), ("mxfp4", 1024)]


@pytest.mark.parametrize("T", [1, 127, 128, 129, 300])
@pytest.mark.parametrize("fmt,C", SHAPES, ids=lambda v: str(v))
def test_every_swizzled_scale_byte_written_once(fmt, C, T):
    p = Problem("rmsnorm_fp4quant", T, C, "bf16", fmt, 1, "swizzled")
    exp = expected_buffer(p)
    cfgs = mapping_configs(p)
    assert len(cfgs) > 10
    for cfg in cfgs:
        for sm_count in ((132, 3) if cfg.ctas_per_sm else (132,)):  # 3 SMs: persistent CTAs loop many times
            offs, vals = model_scale_writes(p, cfg, sm_count)
            assert offs.min() >= 0 and offs.max() < exp.size, cfg.short()
            hits = np.bincount(offs, minlength=exp.size)
            assert (hits == 1).all(), f"{cfg.short()}: bytes written {hits.min()}..{hits.max()} times"
            got = np.empty_like(exp)
            got[offs] = vals
            assert (got == exp).all(), f"{cfg.short()}: wrong scale or non-zero padding"


def test_offset_helper_matches_encoder():
    for n_sf in (1, 3, 4, 5, 63, 64):
        r = torch.arange(300).unsqueeze(1)
        c = torch.arange(n_sf).unsqueeze(0)
        assert torch.equal(swizzled_sf_offset(r, c, -(-n_sf // 4)), encoders.swizzle_offset(r, c, n_sf))
    assert [scale_grid_rows(t) for t in (0, 1, 127, 128, 129, 1560)] == [0, 128, 128, 128, 256, 1664]


def test_padding_mask():
    p = Problem("rmsnorm_fp4quant", 129, 48, "bf16", "nvfp4", 1, "swizzled")  # 3 scale columns of 4
    m = runner.scale_padding_mask(p)
    assert m.numel() == 256 * 4 and int(m.sum()) == 256 * 4 - 129 * 3
    assert runner.scale_padding_mask(Problem("rmsnorm_fp4quant", 128, 64, "bf16", "nvfp4", 1, "swizzled")) is None


@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a"])
@pytest.mark.parametrize("fmt,C,cfg", [
    ("nvfp4", 48, KernelConfig(threads=32, threads_per_row=2, vec_bytes=16)),  # 3 scale columns: padded
    ("nvfp4", 48, KernelConfig(threads=32, threads_per_row=32, vec_bytes=4, cluster=8, ctas_per_sm=2)),  # empty ranks
    ("mxfp4", 64, KernelConfig(threads=256, threads_per_row=4, vec_bytes=16, ctas_per_sm=1, stage="smem")),
    ("nvfp4", 1008, KernelConfig(threads=1024, threads_per_row=64, vec_bytes=16, pdl=True, l2_prefetch=True)),
], ids=lambda v: v.short() if isinstance(v, KernelConfig) else str(v))
def test_padding_configs_compile(fmt, C, cfg, arch, tmp_path, monkeypatch):
    monkeypatch.setenv("LUTFORGE_CACHE_DIR", str(tmp_path))
    p = Problem("rmsnorm_fp4quant", 0, C, "bf16", fmt, 1, "swizzled")
    assert is_valid(p, cfg, int(arch[3:-1])), cfg.short()
    compile_kernel(p, cfg, arch)
