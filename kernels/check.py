"""Tolerances for judging kernel outputs against the torch reference.

- bf16/fp16 outputs: |got - ref| <= ATOL + RTOL[dtype] * |ref| elementwise (ref in fp32); NaN fails.
- residual written back: at most 1 ulp of the input dtype (the fp32 sum is rounded once).
- FP8 E4M3: codes at most 1 apart (order-preserving integer distance); the kernel's fp32 norm differs
  from the reference's in the last bits, which can move a value across a rounding boundary.
- FP4 (nvfp4/mxfp4): scale codes at most 1 apart, in at most FP4_MISMATCH_FRACTION of the blocks (a
  block amax within rounding of a scale boundary picks the neighbouring scale). In blocks with equal
  scales, e2m1 codes at most 1 apart and at most FP4_MISMATCH_FRACTION of them differ. In blocks whose
  scales differ every code moves, so their elements are judged by value: |got - ref| (e2m1 x block
  scale) within the coarser scale's largest e2m1 step (2 x scale). Bit-exactness against the encoder
  is checked separately (tests/) on the kernel's own pre-quantisation values.
"""
from __future__ import annotations

import torch

from . import encoders
from .problem import FP4_BLOCK

RTOL = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -9}
ATOL = 1e-3
FP4_MISMATCH_FRACTION = 0.01


def _ordered(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Sign-magnitude codes -> integers whose order matches the values' order."""
    c = codes.to(torch.int64)
    sign = 1 << (bits - 1)
    return torch.where(c & sign != 0, -(c & (sign - 1)), c)


def _float_check(name, got, ref):
    got32 = got.float()
    ref32 = ref.float()
    if torch.isnan(got32).any() and not torch.isnan(ref32).any():
        return False, float("nan"), f"{name}: NaN in output (unwritten element?)"
    tol = ATOL + RTOL.get(got.dtype, 2 ** -7) * ref32.abs()
    bad = (got32 - ref32).abs() > tol
    rel = float((got32 - ref32).norm() / ref32.norm().clamp_min(1e-30))
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        return False, rel, (f"{name}: {int(bad.sum())} of {bad.numel()} elements out of tolerance, first at {idx}: "
                            f"got {float(got32[tuple(idx)])}, expected {float(ref32[tuple(idx)])}")
    return True, rel, ""


def _code_check(name, got_codes, ref_codes, bits, max_dist=1, max_frac=1.0):
    g = _ordered(got_codes, bits)
    r = _ordered(ref_codes, bits)
    dist = (g - r).abs()
    n_diff = int((dist > 0).sum())
    worst = int(dist.max()) if dist.numel() else 0
    if worst > max_dist or (dist.numel() and n_diff > max_frac * dist.numel()):
        idx = (dist > 0).nonzero()[0].tolist()
        return False, worst, (f"{name}: {n_diff} of {dist.numel()} codes differ (max distance {worst}), first at "
                              f"{idx}: got {int(got_codes[tuple(idx)])}, expected {int(ref_codes[tuple(idx)])}")
    return True, worst, ""


def _row_major_scales(problem, scales: torch.Tensor, rows: int, n_sf: int) -> torch.Tensor:
    b = scales.reshape(-1).view(torch.uint8)
    if problem.scale_layout == "swizzled":
        return encoders.unswizzle_scales(b, rows, n_sf)
    return b.reshape(rows, n_sf)


def _fp4_check(problem, out, scales, ref_out, ref_scales):
    """Packed e2m1 codes and their block scales against the reference (rules in the module docstring)."""
    fmt, block = problem.out_format, FP4_BLOCK[problem.out_format]
    half = problem.C // 2
    g = out.reshape(-1).view(torch.uint8).reshape(-1, half)
    r = ref_out.reshape(-1, half)
    rows, n_sf = g.shape[0], problem.C // block
    gs, rs = _row_major_scales(problem, scales, rows, n_sf), _row_major_scales(problem, ref_scales, rows, n_sf)
    if fmt == "mxfp4":  # ue8m0 is unsigned: plain distance
        s_dist = (gs.to(torch.int64) - rs.to(torch.int64)).abs()
    else:
        s_dist = (_ordered(gs, 8) - _ordered(rs, 8)).abs()
    if s_dist.numel() and int(s_dist.max()) > 1:
        idx = (s_dist > 1).nonzero()[0].tolist()
        return False, int(s_dist.max()), (f"block_scale: codes differ by up to {int(s_dist.max())}, first at block "
                                          f"{idx}: got {int(gs[tuple(idx)])}, expected {int(rs[tuple(idx)])}")
    if problem.scale_layout == "swizzled" and not torch.equal(scales.reshape(-1).view(torch.uint8),
                                                              encoders.swizzle_scales(gs)):
        return False, 0, "block_scale: the swizzled layout's padding bytes are not zero"
    n_moved = int((s_dist > 0).sum())
    if n_moved > FP4_MISMATCH_FRACTION * max(s_dist.numel(), 1):
        return False, 1, f"block_scale: {n_moved} of {s_dist.numel()} block scales differ"
    gc, rc = encoders.unpack_fp4(g), encoders.unpack_fp4(r)  # [rows, C] codes
    same = (s_dist == 0).repeat_interleave(block, dim=1)
    good, worst, msg = _code_check("out", gc[same], rc[same], 4, max_dist=1, max_frac=FP4_MISMATCH_FRACTION)
    if not good or not n_moved:
        return good, worst, msg
    moved = ~same
    decode = encoders.decode_e4m3 if fmt == "nvfp4" else encoders.decode_ue8m0
    sg = decode(gs).repeat_interleave(block, dim=1)[moved]
    sr = decode(rs).repeat_interleave(block, dim=1)[moved]
    gv, rv = encoders.decode_e2m1(gc[moved]) * sg, encoders.decode_e2m1(rc[moved]) * sr
    bad = (gv - rv).abs() > 2 * torch.maximum(sg, sr)
    if bad.any():
        return False, worst, (f"out: {int(bad.sum())} elements of {n_moved} blocks with a neighbouring scale differ by "
                              f"more than one e2m1 step of the coarser scale")
    return True, worst, ""


def compare_outputs(problem, got: dict, expected: dict):
    from .runner import CheckResult

    fmt = problem.out_format
    rel_err, max_ulp, msgs, ok = 0.0, None, [], True
    for name, ref in expected.items():
        if name not in got:
            continue
        out = got[name]
        if name == "residual":
            g, r = out.reshape(ref.shape).float(), ref.float()
            good = torch.equal(g, r) or bool(((g - r).abs() <= RTOL[out.dtype] * r.abs()).all())
            if not good:
                ok, msgs = False, msgs + [f"residual: {(g != r).sum()} elements differ by more than 1 ulp"]
            continue
        if fmt in ("bf16", "fp16"):
            good, rel, msg = _float_check(name, out.reshape(ref.shape), ref)
            rel_err = max(rel_err, rel)
        elif fmt == "fp8":
            gv = out.reshape(ref.shape)
            good, ulp, msg = _code_check(name, gv.view(torch.uint8), ref.view(torch.uint8), 8)
            max_ulp = max(max_ulp or 0, ulp)
            ref_f, got_f = ref.float(), gv.float()
            rel_err = max(rel_err, float((got_f - ref_f).norm() / ref_f.norm().clamp_min(1e-30)))
        else:  # fp4: codes and scales are judged together, once, under "out"
            if name == "block_scale":
                continue
            good, ulp, msg = _fp4_check(problem, out, got["block_scale"], ref, expected["block_scale"])
            max_ulp = max(max_ulp or 0, ulp)
        if not good:
            ok = False
            msgs.append(msg)
    return CheckResult(ok, rel_err, max_ulp, "; ".join(msgs))
