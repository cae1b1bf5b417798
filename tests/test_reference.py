"""kernels/reference.py against rows computed by hand (derivations in comments)."""
import math

import pytest
import torch

from kernels import encoders as E
from kernels import reference as R
from kernels.problem import Problem

BF16 = torch.bfloat16


def bf(values):
    return torch.tensor(values, dtype=BF16)


# x = [2, -2, 2, -2]: mean(x^2) = 4, rstd = 1/2 -> x * rstd = [1, -1, 1, -1]
X4 = [2.0, -2.0, 2.0, -2.0]
W4 = [1.0, 2.0, 0.5, -1.0]
Y4 = [1.0, -2.0, 0.5, 1.0]  # [1, -1, 1, -1] * W4
Y4_GEMMA = [2.0, -3.0, 1.5, 0.0]  # [1, -1, 1, -1] * (W4 + 1)


def test_rms_norm_hand_rows():
    assert R.rms_norm(bf([X4]), bf(W4), eps=0.0).tolist() == [Y4]
    assert R.rms_norm(bf([X4]), bf(W4), eps=0.0, gemma=True).tolist() == [Y4_GEMMA]
    # x = 1s, eps = 3: rstd = 1/sqrt(1 + 3) = 1/2
    assert R.rms_norm(bf([[1.0] * 4]), bf([1.0] * 4), eps=3.0).tolist() == [[0.5] * 4]
    y = R.rms_norm(bf([X4]), bf(W4), eps=0.0, compute_dtype=torch.float64)
    assert y.dtype == torch.float64 and y.tolist() == [Y4]


def test_fused_add_hand_row():
    # s = x + r = [2, -2, 2, -2] -> y = [1, -1, 1, -1] * w; the new residual is s
    y, res = R.fused_add_rms_norm(bf([[1.0, -3.0, 1.5, 0.5]]), bf([[1.0, 1.0, 0.5, -2.5]]), bf(W4), eps=0.0)
    assert y.tolist() == [Y4]
    assert res.dtype == BF16 and res.tolist() == [X4]
    y, _ = R.fused_add_rms_norm(bf([[1.0, -3.0, 1.5, 0.5]]), bf([[1.0, 1.0, 0.5, -2.5]]), bf(W4), eps=0.0, gemma=True)
    assert y.tolist() == [Y4_GEMMA]


def test_fused_add_normalises_the_fp32_sum_not_the_rounded_residual():
    # x = [1, 1], r = [2^-9, 0]: the fp32 sum 1 + 2^-9 rounds to 1.0 in bf16 (2^-9 < half a bf16 ulp at 1,
    # 2^-8), so the residual is [1, 1], but y is computed from [1 + 2^-9, 1]:
    # y0 = (1 + 2^-9) / sqrt(((1 + 2^-9)^2 + 1) / 2)  (!= 1, which the rounded sum would give)
    y, res = R.fused_add_rms_norm(bf([[1.0, 1.0]]), bf([[2.0**-9, 0.0]]), bf([1.0, 1.0]), eps=0.0)
    a = 1 + 2.0**-9
    expected = a / math.sqrt((a * a + 1) / 2)
    assert res.tolist() == [[1.0, 1.0]]
    assert y[0, 0].item() != 1.0
    assert abs(y[0, 0].item() - expected) < 1e-6


def test_silu_hand_values():
    # silu(1) = 1 / (1 + e^-1) = 0.7310585786; silu(-1) = -1 / (1 + e) = -0.2689414214; silu(0) = 0
    got = R.silu(torch.tensor([1.0, -1.0, 0.0])).tolist()
    assert got == pytest.approx([0.7310585786, -0.2689414214, 0.0], abs=1e-7)


def test_qk_norm_per_head_with_strides():
    # head 0 = X4 -> [1, -1, 1, -1] * w; head 1 = [3, 3, 3, 3] -> [1, 1, 1, 1] * w
    buf = torch.zeros(2, 2, 8, dtype=BF16)
    buf[:, 0, :4] = bf(X4)
    buf[:, 1, :4] = bf([3.0] * 4)
    x = buf[:, :, :4]  # non-contiguous: head stride 8, token stride 16
    assert not x.is_contiguous()
    y = R.qk_rms_norm(x, bf(W4), eps=0.0)
    assert y.tolist() == [[Y4, W4], [Y4, W4]]
    # transposed storage (heads outermost) gives the same
    xt = buf.transpose(0, 1).contiguous().transpose(0, 1)[:, :, :4]
    assert torch.equal(R.qk_rms_norm(xt, bf(W4), eps=0.0), y)
    assert R.qk_rms_norm(x, bf(W4), eps=0.0, gemma=True)[0, 0].tolist() == Y4_GEMMA
    with pytest.raises(ValueError, match="tokens, heads, head_dim"):
        R.qk_rms_norm(bf([X4]), bf(W4))


def test_l2norm_equivalence_hand_row():
    # x = [3, 4], C = 2, eps_l2 = 11: L2Norm = [3, 4] / sqrt(25 + 11) = [1/2, 2/3];
    # RMSNorm with eps = 11/2: mean(x^2) + 5.5 = 18 -> [3, 4] / sqrt(18) = [1/sqrt2, 4/(3 sqrt2)] = sqrt(2) * L2Norm
    x, w = torch.tensor([[3.0, 4.0]]), torch.ones(2)
    assert R.rmsnorm_eps_for_l2norm(11.0, 2) == 5.5
    assert R.l2_norm(x, 11.0)[0].tolist() == pytest.approx([0.5, 2 / 3])
    assert R.rms_norm(x, w, 5.5)[0].tolist() == pytest.approx([1 / math.sqrt(2), 4 / (3 * math.sqrt(2))])


def test_l2norm_equivalence_random():
    # cuDNN: eps_cudnn = eps_l2 / C makes RMSNorm == sqrt(C) * L2Norm; holds to fp32 rounding. Small x so
    # that eps is not negligible against sum(x^2) (~0.0256 vs 0.01).
    g = torch.Generator().manual_seed(0)
    C, eps_l2 = 256, 1e-2
    x = torch.randn(64, C, generator=g) * 0.01
    w = torch.randn(C, generator=g)
    for dt, rtol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        rms = R.rms_norm(x, w, R.rmsnorm_eps_for_l2norm(eps_l2, C), compute_dtype=dt)
        l2 = math.sqrt(C) * R.l2_norm(x, eps_l2, compute_dtype=dt) * w.to(dt)
        torch.testing.assert_close(rms, l2, rtol=rtol, atol=0)
    with pytest.raises(ValueError, match="C must"):
        R.rmsnorm_eps_for_l2norm(1e-6, 0)


# ------------------------------------------------------------------ reference_outputs -------------

def run(op, out, x, w, **extra):
    C = w.shape[0]
    heads = x.shape[1] if x.dim() == 3 else 1
    p = Problem(op, T=x.shape[0], C=C, in_dtype="bf16", out_format=out, heads=heads,
                scale_layout=extra.pop("layout", "rowmajor"))
    return R.reference_outputs(p, {"x": x, "weight": w, "eps": extra.pop("eps", 0.0), **extra})


def test_outputs_same_dtype_ops():
    out = run("rmsnorm", "bf16", bf([X4]), bf(W4))
    assert set(out) == {"out"} and out["out"].dtype == torch.float32 and out["out"].tolist() == [Y4]
    assert run("gemma_rmsnorm", "bf16", bf([X4]), bf(W4))["out"].tolist() == [Y4_GEMMA]
    out = run("fused_add_rmsnorm", "bf16", bf([[1.0, -3.0, 1.5, 0.5]]), bf(W4), residual=bf([[1.0, 1.0, 0.5, -2.5]]))
    assert out["out"].tolist() == [Y4] and out["residual"].tolist() == [X4]
    out = run("gemma_fused_add_rmsnorm", "bf16", bf([[1.0, -3.0, 1.5, 0.5]]), bf(W4),
              residual=bf([[1.0, 1.0, 0.5, -2.5]]))
    assert out["out"].tolist() == [Y4_GEMMA]
    x = torch.stack([bf([X4]), bf([[3.0] * 4])], dim=1)  # [T=1, H=2, D=4]
    assert run("qk_rmsnorm", "bf16", x, bf(W4))["out"].tolist() == [[Y4, W4]]
    # silu of y = [1, -1, 0, -1] (w = [1, 1, 0, 1])
    out = run("fused_rmsnorm_silu", "bf16", bf([X4]), bf([1.0, 1.0, 0.0, 1.0]))
    assert out["out"].tolist() == [pytest.approx([0.7310585786, -0.2689414214, 0.0, -0.2689414214], abs=1e-7)]


def test_outputs_fp8():
    # y = [1, -2, 0.5, 1]; / 0.5 = [2, -4, 1, 2] -> e4m3 [0x40, 0xC8, 0x38, 0x40]
    out = run("rmsnorm_quant", "fp8", bf([X4]), bf(W4), scale=0.5)
    assert out["out"].dtype == torch.float8_e4m3fn
    assert out["out"].view(torch.uint8).tolist() == [[0x40, 0xC8, 0x38, 0x40]]
    # scale 1/512: [512, -1024, 256, 512] -> saturate 0x7E / 0xFE; 256 = 2^8 -> 0 1111 000 = 0x78
    out = run("rmsnorm_quant", "fp8", bf([X4]), bf(W4), scale=1 / 512)
    assert out["out"].view(torch.uint8).tolist() == [[0x7E, 0xFE, 0x78, 0x7E]]
    out = run("fused_add_rmsnorm_quant", "fp8", bf([[1.0, -3.0, 1.5, 0.5]]), bf(W4),
              residual=bf([[1.0, 1.0, 0.5, -2.5]]), scale=0.5)
    assert out["out"].view(torch.uint8).tolist() == [[0x40, 0xC8, 0x38, 0x40]]
    assert out["residual"].tolist() == [X4]
    # silu, no scale: silu(1) = 0.7311 -> 16ths of [0.5, 1): 11.70 -> 12 -> 0.75 = 0 0110 100 = 0x34;
    # silu(-1) = -0.2689 -> 32nds of [0.25, 0.5): 8.61 -> 9 -> 0.28125 = 1 0101 001 = 0xA9; silu(0) -> 0x00
    out = run("fused_rmsnorm_silu", "fp8", bf([X4]), bf([1.0, 1.0, 0.0, 1.0]), scale=1.0)  # scale ignored
    assert out["out"].view(torch.uint8).tolist() == [[0x34, 0xA9, 0x00, 0xA9]]


# x = 2s: rstd = 1/2, so y = w exactly. First 16 are test_encoders' hand block (amax 12), then 16 x 3.0.
FP4_W = [12.0, 6.0, -3.0, 1.0, 0.5, 5.0, 7.0, -12.0] + [0.0] * 8 + [3.0] * 16
BLOCK16_BYTES = [0x57, 0x1B, 0x40, 0xF6, 0, 0, 0, 0]


def test_outputs_rmsnorm_fp4quant_nvfp4():
    x = bf([[2.0] * 32])
    # block 1: s = e4m3(2) = 0x40; block 2: amax 3 -> s = e4m3(0.5) = 0 0110 000 = 0x30, 3 * 2 = 6 -> 0x7
    out = run("rmsnorm_fp4quant", "nvfp4", x, bf(FP4_W))
    assert out["out"].dtype == torch.uint8 and out["out"].tolist() == [BLOCK16_BYTES + [0x77] * 8]
    assert out["block_scale"].tolist() == [[0x40, 0x30]]
    # global scale 4 (multiplicative): s = e4m3(8) = 0x50 and e4m3(2) = 0x40; factors 1/2 and 2 again
    out = run("rmsnorm_fp4quant", "nvfp4", x, bf(FP4_W), global_scale=torch.tensor([4.0]))
    assert out["out"].tolist() == [BLOCK16_BYTES + [0x77] * 8]
    assert out["block_scale"].tolist() == [[0x50, 0x40]]
    # swizzled: one row, k_tiles = 1 -> 512-byte buffer with the two scales at offsets 0 and 1
    out = run("rmsnorm_fp4quant", "nvfp4", x, bf(FP4_W), layout="swizzled")
    buf = out["block_scale"]
    assert buf.shape == (512,) and buf[:2].tolist() == [0x40, 0x30] and int(buf[2:].sum()) == 0


def test_outputs_rmsnorm_fp4quant_mxfp4():
    # one block of 32, amax 12 -> ue8m0 128, factor 1/2: first half as BLOCK16, 3.0 -> 1.5 (code 3) -> 0x33
    out = run("rmsnorm_fp4quant", "mxfp4", bf([[2.0] * 32]), bf(FP4_W))
    assert out["out"].tolist() == [BLOCK16_BYTES + [0x33] * 8]
    assert out["block_scale"].tolist() == [[128]]


def test_outputs_fused_rmsnorm_silu_nvfp4():
    # y = w = [12, -12, 6, 3, 1, 0...]; silu -> [11.99993, -7.4e-5, 5.98516, 2.85772, 0.73106, 0...]
    # sf = 11.99993 / 6 = 1.999988 -> e4m3 -> 2.0 (0x40); values / sf -> [6.0, -3.7e-5, 2.993, 1.4289, 0.3655]
    # -> codes [7, 0x8 (-0), 5, 3, 1, 0...] -> bytes [0x87, 0x35, 0x01, 0...]
    w = [12.0, -12.0, 6.0, 3.0, 1.0] + [0.0] * 11
    out = run("fused_rmsnorm_silu", "nvfp4", bf([[2.0] * 16]), bf(w))
    assert out["out"].tolist() == [[0x87, 0x35, 0x01, 0, 0, 0, 0, 0]]
    assert out["block_scale"].tolist() == [[0x40]]


def test_outputs_accept_strided_and_empty_inputs():
    g = torch.Generator().manual_seed(1)
    buf = torch.randn(8, 128, generator=g).to(BF16)
    w = torch.randn(64, generator=g).to(BF16)
    a = run("rmsnorm_fp4quant", "nvfp4", buf[:, :64], w, eps=1e-6)
    b = run("rmsnorm_fp4quant", "nvfp4", buf[:, :64].contiguous(), w, eps=1e-6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    empty = run("rmsnorm_fp4quant", "nvfp4", torch.zeros(0, 64, dtype=BF16), w, layout="swizzled")
    assert empty["out"].shape == (0, 32) and empty["block_scale"].shape == (0,)
    assert run("rmsnorm", "bf16", torch.zeros(0, 64, dtype=BF16), w)["out"].shape == (0, 64)


def test_float64_compute_matches_float32_closely():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 256, generator=g).to(BF16)
    w = torch.randn(256, generator=g).to(BF16)
    p = Problem("fused_rmsnorm_silu", T=16, C=256)
    a = R.reference_outputs(p, {"x": x, "weight": w, "eps": 1e-6})
    b = R.reference_outputs(p, {"x": x, "weight": w, "eps": 1e-6}, compute_dtype=torch.float64)
    torch.testing.assert_close(a["out"], b["out"], rtol=1e-5, atol=1e-6)


def test_reference_outputs_validation():
    x, w = bf([X4]), bf(W4)
    p = Problem("rmsnorm", T=1, C=4)
    ok = {"x": x, "weight": w, "eps": 1e-6}
    cases = [
        ({**ok, "bogus": 1}, ValueError, "unknown input keys"),
        ({"x": x, "weight": w}, ValueError, "eps"),
        ({**ok, "x": x.float()}, ValueError, "dtype"),
        ({**ok, "x": bf([X4, X4])}, ValueError, "shape"),
        ({**ok, "weight": bf([1.0] * 3)}, ValueError, "weight"),
        ({**ok, "residual": x}, ValueError, "takes no residual"),
        ({**ok, "eps": -1.0}, ValueError, "eps"),
        ({**ok, "scale": 0.0}, ValueError, "scale"),
        ({**ok, "global_scale": torch.tensor([1.0])}, ValueError, "global_scale"),
        ({**ok, "x": [1.0, 2.0]}, TypeError, "torch.Tensor"),
    ]
    for inputs, exc, match in cases:
        with pytest.raises(exc, match=match):
            R.reference_outputs(p, inputs)
    with pytest.raises(ValueError, match="residual"):
        R.reference_outputs(Problem("fused_add_rmsnorm", T=1, C=4), ok)
    with pytest.raises(ValueError, match="scale"):
        R.reference_outputs(Problem("rmsnorm_quant", T=1, C=4, out_format="fp8"), ok)
    with pytest.raises(ValueError, match="global_scale"):
        R.reference_outputs(Problem("rmsnorm_fp4quant", T=1, C=32, out_format="mxfp4"),
                            {"x": bf([[2.0] * 32]), "weight": bf(FP4_W), "eps": 0.0,
                             "global_scale": torch.tensor([1.0])})
    with pytest.raises(TypeError, match="Problem"):
        R.reference_outputs("rmsnorm", ok)
    with pytest.raises(ValueError, match="compute_dtype"):
        R.reference_outputs(p, ok, compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="weight"):
        R.rms_norm(x, bf([1.0, 2.0]))


@pytest.mark.gpu
def test_cuda_reference_matches_cpu_if_available():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 128, generator=g).to(BF16)
    w = torch.randn(128, generator=g).to(BF16)
    p = Problem("rmsnorm_fp4quant", T=32, C=128, out_format="nvfp4", scale_layout="swizzled")
    a = R.reference_outputs(p, {"x": x, "weight": w, "eps": 1e-6})
    b = R.reference_outputs(p, {"x": x.cuda(), "weight": w.cuda(), "eps": 1e-6})
    assert torch.equal(a["block_scale"], b["block_scale"].cpu())
    assert E.unpack_fp4(a["out"]).ne(E.unpack_fp4(b["out"].cpu())).float().mean() < 0.01
