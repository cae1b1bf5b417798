"""Tolerances for judging kernel outputs against the torch reference.

- bf16/fp16 outputs: |got - ref| <= ATOL + RTOL[dtype] * |ref| elementwise (ref in fp32); NaN fails.
- residual written back: at most 1 ulp of the input dtype (the fp32 sum is rounded once).
- FP8 E4M3: codes at most 1 apart (order-preserving integer distance); the kernel's fp32 norm differs
  from the reference's in the last bits, which can move a value across a rounding boundary.
- FP4 (nvfp4/mxfp4): scale codes at most 1 apart; e2m1 magnitude codes at most 1 apart, and no more
  than FP4_MISMATCH_FRACTION of them differ at all. Bit-exactness against the encoder is checked
  separately (tests/) on the kernel's own pre-quantisation values.
"""
from __future__ import annotations

import torch

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
        else:  # fp4: packed codes and scale bytes
            gv = out.reshape(ref.shape).view(torch.uint8)
            rv = ref.view(torch.uint8)
            if name == "block_scale":
                bits = 8
                good, ulp, msg = _code_check(name, gv, rv, bits, max_dist=1, max_frac=1.0)
                if fmt == "mxfp4":  # ue8m0 is unsigned: plain distance
                    d = (gv.to(torch.int64) - rv.to(torch.int64)).abs()
                    good = bool(d.max() <= 1) if d.numel() else True
                    msg = "" if good else f"block_scale: ue8m0 codes differ by up to {int(d.max())}"
            else:
                lo_g, hi_g = gv & 0xF, gv >> 4
                lo_r, hi_r = rv & 0xF, rv >> 4
                good, ulp, msg = _code_check(name, torch.cat([lo_g, hi_g]), torch.cat([lo_r, hi_r]), 4,
                                             max_dist=1, max_frac=FP4_MISMATCH_FRACTION)
                max_ulp = max(max_ulp or 0, ulp)
        if not good:
            ok = False
            msgs.append(msg)
    return CheckResult(ok, rel_err, max_ulp, "; ".join(msgs))
