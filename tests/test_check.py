"""The FP4 output check: a block amax on a scale boundary may pick the neighbouring scale (every code of
that block moves, by up to 2), which must pass; real corruption must not."""
import pytest
import torch

from kernels import encoders
from kernels.check import compare_outputs
from kernels.problem import FP4_BLOCK, Problem

T, C = 64, 256


def _quantize(fmt, y):
    return encoders.quantize_mxfp4(y) if fmt == "mxfp4" else encoders.quantize_nvfp4(y)


def _boundary_pair(fmt):
    """(reference input, kernel input): identical except one block's amax nudged 1 ulp across the value
    where its scale changes (fp32 norms differ in the last bit, so a kernel can land on either side)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(T, C, generator=g) * 3
    y[5, :32] = y[5, :32].clamp(-5.9, 5.9)  # the boundary element below is its block's amax
    # amax/6 exactly on a scale boundary: a power of two (ue8m0), or the e4m3 tie 1.0625 between 1 and 1.125
    y[5, 3] = 6.0 if fmt == "mxfp4" else 6.375
    y[5, 7] = 2.5  # a value that is a rounding tie on both grids
    y2 = y.clone()
    y2[5, 3] = torch.nextafter(y[5, 3], torch.tensor(float("inf")))
    return y, y2


def _outputs(problem, y):
    packed, scales = _quantize(problem.out_format, y)
    if problem.scale_layout == "swizzled":
        scales = encoders.swizzle_scales(scales)
    return {"out": packed, "block_scale": scales}


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("layout", ["rowmajor", "swizzled"])
def test_neighbouring_scale_passes_and_corruption_fails(fmt, layout):
    p = Problem(op="rmsnorm_fp4quant", T=T, C=C, out_format=fmt, scale_layout=layout)
    y, y2 = _boundary_pair(fmt)
    ref, got = _outputs(p, y), _outputs(p, y2)
    ref_sc, got_sc = _quantize(fmt, y)[1], _quantize(fmt, y2)[1]
    assert int((ref_sc != got_sc).sum()) == 1  # exactly the nudged block changed scale
    if fmt == "mxfp4":  # its codes moved by 2 (a binade): a per-code rule alone would reject this
        gc, rc = encoders.unpack_fp4(got["out"]), encoders.unpack_fp4(ref["out"])
        assert int(((gc.to(torch.int64) & 7) - (rc.to(torch.int64) & 7)).abs().max()) == 2
    res = compare_outputs(p, got, ref)
    assert res.ok, res.message

    bad = {k: v.clone() for k, v in got.items()}
    bad["out"].view(torch.uint8)[5, 1] &= 0x0F  # the moved block's amax element (high nibble) zeroed
    assert not compare_outputs(p, bad, ref).ok

    far = {k: v.clone() for k, v in got.items()}
    n_sf = C // FP4_BLOCK[fmt]
    sc = encoders.unswizzle_scales(far["block_scale"], T, n_sf) if layout == "swizzled" else far["block_scale"]
    sc[9, 0] += 2  # a scale two codes off
    far["block_scale"] = encoders.swizzle_scales(sc) if layout == "swizzled" else sc
    res = compare_outputs(p, far, ref)
    assert not res.ok and "block_scale" in res.message


def test_swizzled_padding_must_be_zero():
    p = Problem(op="rmsnorm_fp4quant", T=T - 3, C=C, out_format="nvfp4", scale_layout="swizzled")
    y = torch.randn(T - 3, C, generator=torch.Generator().manual_seed(2))
    ref = _outputs(p, y)
    got = {k: v.clone() for k, v in ref.items()}
    assert compare_outputs(p, got, ref).ok
    got["block_scale"][-1] = 0x7F  # the last byte pads rows T-3..127 of the last 128-row tile
    res = compare_outputs(p, got, ref)
    assert not res.ok and "padding" in res.message


def test_many_moved_scales_fail():
    p = Problem(op="rmsnorm_fp4quant", T=T, C=C, out_format="mxfp4")
    y = torch.randn(T, C, generator=torch.Generator().manual_seed(1))
    ref = _outputs(p, y)
    got = {k: v.clone() for k, v in ref.items()}
    got["block_scale"][:, :] += 1  # every block one binade up: values halve in code space
    res = compare_outputs(p, got, ref)
    assert not res.ok and "block scales differ" in res.message
