"""Bit-exact checks of kernels/encoders.py against values derived by hand (derivations in comments).

E4M3 (e4m3fn): bias 7, 3 mantissa bits, code = s eeee mmm; normal value 2^(e-7) * (1 + m/8), subnormal
(e = 0) m * 2^-9; max finite 0x7E = 2^8 * 1.75 = 448; 0x7F is NaN.
E2M1: bias 1, 1 mantissa bit, code = s ee m; magnitudes by code 0..7: 0, 0.5, 1, 1.5, 2, 3, 4, 6.
"""
import math

import pytest
import torch

from kernels import encoders as E

INF, NAN = float("inf"), float("nan")


def f32(values):
    return torch.tensor(values, dtype=torch.float32)


def u8(values):
    return torch.tensor(values, dtype=torch.uint8)


def codes(t):
    return t.view(torch.uint8).tolist()


# ------------------------------------------------------------------ E2M1 --------------------------

def test_e2m1_ties_round_to_even():
    x = f32([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    # 0.25: halfway 0 (code 0, even) / 0.5 (code 1)     -> 0x0
    # 0.75: halfway 0.5 (code 1) / 1.0 (code 2, even)   -> 0x2
    # 1.25: halfway 1.0 (code 2, even) / 1.5 (code 3)   -> 0x2
    # 1.75: halfway 1.5 (code 3) / 2.0 (code 4, even)   -> 0x4
    # 2.5:  halfway 2 (code 4, even) / 3 (code 5)       -> 0x4
    # 3.5:  halfway 3 (code 5) / 4 (code 6, even)       -> 0x6
    # 5.0:  halfway 4 (code 6, even) / 6 (code 7)       -> 0x6
    assert codes(E.encode_e2m1(x)) == [0x0, 0x2, 0x2, 0x4, 0x4, 0x6, 0x6]


def test_e2m1_off_tie_and_exact_values():
    # just above a tie goes up, just below goes down; exact grid values keep their code
    x = f32([0.2500001, 0.2499999, 2.5000002, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    assert codes(E.encode_e2m1(x)) == [0x1, 0x0, 0x5, 0x1, 0x2, 0x3, 0x4, 0x5, 0x6, 0x7]


def test_e2m1_negative_values_and_signed_zero():
    # sign is bit 3: -0.5 -> 0x9, -3.5 -> tie to -4 (0xE), -5.0 -> -4 (0xE), -6 -> 0xF;
    # -0.0 and -0.25 (rounds to zero) keep the sign -> 0x8; +0.0 -> 0x0
    x = f32([-0.5, -3.5, -5.0, -6.0, -0.0, -0.25, 0.0])
    assert codes(E.encode_e2m1(x)) == [0x9, 0xE, 0xE, 0xF, 0x8, 0x8, 0x0]


def test_e2m1_saturates_at_6_and_specials():
    # satfinite: |x| > 6 -> +-6 (0x7 / 0xF), Inf too; NaN -> +MAX_NORM (0x7) as PTX cvt.satfinite does
    x = f32([6.5, 7.0, 100.0, 1e38, INF, -7.0, -INF, NAN, -NAN])
    assert codes(E.encode_e2m1(x)) == [0x7, 0x7, 0x7, 0x7, 0x7, 0xF, 0xF, 0x7, 0x7]


def test_e2m1_decode_table():
    got = E.decode_e2m1(torch.arange(16, dtype=torch.uint8)).tolist()
    assert got == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert math.copysign(1.0, got[8]) == -1.0
    with pytest.raises(ValueError, match="4-bit"):
        E.decode_e2m1(u8([16]))


def test_e2m1_every_midpoint_rounds_to_even_code():
    # RNE property over the whole positive grid: the midpoint of neighbours c, c+1 goes to the even code
    vals = E.decode_e2m1(torch.arange(8, dtype=torch.uint8))
    mids = (vals[:-1] + vals[1:]) / 2
    got = codes(E.encode_e2m1(mids))
    assert got == [c if c % 2 == 0 else c + 1 for c in range(7)]
    assert codes(E.encode_e2m1(vals)) == list(range(8))


def test_fp4_packing_matches_torch_and_ptx_order():
    # element 2i -> low nibble, 2i+1 -> high nibble: [0.5, 1.0] = codes [1, 2] -> byte 0x21;
    # [-6, 3] = codes [0xF, 0x5] -> 0x5F. torch.float4_e2m1fn_x2 documents val0 in bits 3..0;
    # PTX cvt.rn.satfinite.e2m1x2.f32 d, a, b puts a in d[7:4], b in d[3:0].
    packed = E.pack_fp4(E.encode_e2m1(f32([[0.5, 1.0, -6.0, 3.0]])))
    assert packed.tolist() == [[0x21, 0x5F]]
    assert E.unpack_fp4(packed).tolist() == [[0x1, 0x2, 0xF, 0x5]]
    typed = E.as_fp4x2(packed)
    if hasattr(torch, "float4_e2m1fn_x2"):
        assert typed.dtype == torch.float4_e2m1fn_x2
        assert E.unpack_fp4(typed).tolist() == [[0x1, 0x2, 0xF, 0x5]]  # typed views are accepted back
    with pytest.raises(ValueError, match="even"):
        E.pack_fp4(u8([1, 2, 3]))
    with pytest.raises(ValueError, match="4-bit"):
        E.pack_fp4(u8([1, 16]))


# ------------------------------------------------------------------ E4M3 --------------------------

def test_e4m3_normal_values_and_ties():
    x = f32([1.0, -1.5, 240.0, 1 + 1 / 16, 1 + 3 / 16, 1.9375, 0.75])
    # 1.0 = 2^0 -> e = 7 -> 0 0111 000 = 0x38
    # -1.5 = -2^0 * 1.5 -> 1 0111 100 = 0xBC
    # 240 = 2^7 * 1.875 -> e = 14, m = 7 -> 0 1110 111 = 0x77
    # 1.0625: halfway 1.0 (m=0, even) / 1.125 (m=1) -> 0x38
    # 1.1875: halfway 1.125 (m=1) / 1.25 (m=2, even) -> 0 0111 010 = 0x3A
    # 1.9375: halfway 1.875 (m=7) / 2.0 (m=0 of the next binade, even) -> e = 8 -> 0x40
    # 0.75 = 2^-1 * 1.5 -> e = 6, m = 4 -> 0 0110 100 = 0x34
    assert codes(E.encode_e4m3(x)) == [0x38, 0xBC, 0x77, 0x38, 0x3A, 0x40, 0x34]


def test_e4m3_subnormals():
    x = f32([2.0**-9, 7 * 2.0**-9, 2.0**-6, 2.0**-10, 2.0**-10 * (1 + 2.0**-20), 3 * 2.0**-10,
             5 * 2.0**-10, 15 * 2.0**-10, -(2.0**-10), 2.0**-11, 1e-30])
    # 2^-9: smallest subnormal, m = 1 -> 0x01;  7 * 2^-9: largest subnormal -> 0x07
    # 2^-6: smallest normal, e = 1 -> 0x08
    # 2^-10: halfway 0 / 2^-9 -> 0 (even) -> 0x00; a hair above -> 0x01
    # 3 * 2^-10 = 1.5 * 2^-9: halfway m=1 / m=2 -> 0x02;  5 * 2^-10 = 2.5 * 2^-9 -> m=2 -> 0x02
    # 15 * 2^-10 = 7.5 * 2^-9: halfway 7 / 8 -> 8 = 2^-6 (normal) -> 0x08
    # -2^-10 -> -0 -> 0x80;  2^-11 and 1e-30 -> 0x00
    assert codes(E.encode_e4m3(x)) == [0x01, 0x07, 0x08, 0x00, 0x01, 0x02, 0x02, 0x08, 0x80, 0x00, 0x00]


def test_e4m3_saturates_at_448_and_specials():
    x = f32([448.0, 449.0, 464.0, 480.0, 1e30, INF, -500.0, -INF, NAN, -NAN, -0.0])
    # 448 = 2^8 * 1.75 -> 0 1111 110 = 0x7E; everything larger (Inf included) saturates to 0x7E,
    # negatives to 0xFE; NaN -> canonical 0x7F (sign dropped, as CUDA's float->fp8 conversion); -0 -> 0x80
    assert codes(E.encode_e4m3(x)) == [0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0x7E, 0xFE, 0xFE, 0x7F, 0x7F, 0x80]


def test_e4m3_decode_hand_values():
    got = E.decode_e4m3(u8([0x00, 0x01, 0x07, 0x08, 0x38, 0x3A, 0x7E, 0xBC, 0xFE, 0x80])).tolist()
    assert got == [0.0, 2.0**-9, 7 * 2.0**-9, 2.0**-6, 1.0, 1.25, 448.0, -1.5, -448.0, -0.0]
    assert torch.isnan(E.decode_e4m3(u8([0x7F, 0xFF]))).all()


def test_e4m3_all_codes_round_trip_and_midpoints():
    c = torch.arange(0x7F, dtype=torch.uint8)  # 0x00..0x7E: all non-negative finite codes
    vals = E.decode_e4m3(c)
    assert torch.equal(E.encode_e4m3(vals), c)
    assert torch.equal(E.encode_e4m3(-vals[1:]), c[1:] | 0x80)
    mids = (vals[:-1] + vals[1:]) / 2  # exact in fp32
    even = torch.where(c[:-1] % 2 == 0, c[:-1], c[:-1] + 1)
    assert torch.equal(E.encode_e4m3(mids), even)
    assert torch.equal(E.encode_e4m3(torch.nextafter(mids, f32(INF))), c[1:])
    assert torch.equal(E.encode_e4m3(torch.nextafter(mids, f32(0.0))), c[:-1])


def test_e4m3_agrees_with_torch_cast_on_clamped_inputs():
    # torch's own float8_e4m3fn cast is only trusted after this check (and only for clamped input)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g) * torch.exp2(torch.randint(-14, 10, (20000,), generator=g).float())
    x = x.clamp(-448, 448)
    assert torch.equal(E.encode_e4m3(x), x.to(torch.float8_e4m3fn).view(torch.uint8))


def test_encoders_accept_half_types_and_refuse_float64():
    assert codes(E.encode_e4m3(torch.tensor([1.0], dtype=torch.bfloat16))) == [0x38]
    with pytest.raises(TypeError, match="float64"):
        E.encode_e4m3(torch.tensor([1.0], dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        E.encode_e2m1([1.0])


def test_fp8_static_quant():
    # y / scale: 1 / 0.5 = 2 -> 0x40; -1 / 0.5 -> 0xC0; 300 / 0.5 = 600 -> saturates 0x7E; NaN -> 0x7F
    out = E.quantize_fp8_static(f32([1.0, -1.0, 300.0, NAN]), 0.5)
    assert out.dtype == torch.float8_e4m3fn
    assert codes(out) == [0x40, 0xC0, 0x7E, 0x7F]
    for bad in (0.0, -1.0, INF):
        with pytest.raises(ValueError, match="scale"):
            E.quantize_fp8_static(f32([1.0]), bad)
    with pytest.raises(TypeError, match="scale"):
        E.quantize_fp8_static(f32([1.0]), torch.tensor(1.0))


# ------------------------------------------------------------------ UE8M0 -------------------------

def test_ue8m0_edge_cases():
    fmax = torch.finfo(torch.float32).max
    amax = f32([6.0, 12.0, 0.75, 6 + 2.0**-21, 6 - 2.0**-21, 0.0, 2.0**-149, 6 * 2.0**-127, 6 * 2.0**-126,
                9 * 2.0**-127, 3 * 2.0**126, fmax, INF, NAN])
    expected = [
        127,  # 6/6 = 1 = 2^0 -> 0 + 127
        128,  # 12/6 = 2 -> 1 + 127
        124,  # 0.75/6 = 2^-3 -> -3 + 127
        128,  # next fp32 above 6 is 6 + 2^-21; /6 = 1 + (2/3) 2^-23 -> rounds to 1 + 2^-23 -> ceil log2 = 1
        127,  # 6 - 2^-21; /6 = 1 - (4/3) 2^-24 -> rounds to 1 - 2^-24 -> ceil log2 = 0
        0,    # amax = 0 -> 0
        0,    # 2^-149 / 6 rounds to 0 in fp32 -> 0
        0,    # v = 2^-127 (an fp32 subnormal) -> -127 + 127
        1,    # v = 2^-126 -> 1
        1,    # v = 1.5 * 2^-127 (subnormal) -> ceil = -126 -> 1
        252,  # 3 * 2^126 / 6 = 2^125 -> 252
        253,  # FLT_MAX / 6 = (2^128 - 2^104) / 6, between 2^125 and 2^126 -> 126 + 127
        255,  # Inf -> 0xFF (E8M0 NaN)
        255,  # NaN -> 0xFF
    ]
    assert codes(E.ue8m0_from_amax(amax)) == expected
    with pytest.raises(ValueError, match=">= 0"):
        E.ue8m0_from_amax(f32([-1.0]))


def test_ue8m0_decode():
    got = E.decode_ue8m0(u8([0, 1, 126, 127, 128, 254, 255])).tolist()
    assert got[:6] == [2.0**-127, 2.0**-126, 0.5, 1.0, 2.0, 2.0**127]
    assert math.isnan(got[6])


# ------------------------------------------------------------------ block quantizers --------------

# One 16-element block, amax 12, chosen so every code is derived by hand (used by several tests).
BLOCK16 = [12.0, 6.0, -3.0, 1.0, 0.5, 5.0, 7.0, -12.0] + [0.0] * 8
# with scale 2 the scaled values are [6, 3, -1.5, 0.5, 0.25, 2.5, 3.5, -6, 0...] ->
# codes [7, 5, 0xB, 1, 0 (tie->0), 4 (tie->2.0), 6 (tie->4.0), 0xF, 0...] -> bytes (hi<<4 | lo):
BLOCK16_BYTES = [0x57, 0x1B, 0x40, 0xF6, 0, 0, 0, 0]


def test_nvfp4_hand_block():
    # s = e4m3(12 / 6 = 2) = 0x40; factor = 1 / 2
    packed, scales = E.quantize_nvfp4(f32([BLOCK16]))
    assert packed.tolist() == [BLOCK16_BYTES]
    assert scales.tolist() == [[0x40]]


def test_nvfp4_global_scale_is_multiplicative():
    # gs = 4: s = e4m3(4 * 12 / 6 = 8) = 2^3 -> e = 10 -> 0x50; factor = 4 / 8 = 0.5 -> same codes
    packed, scales = E.quantize_nvfp4(f32([BLOCK16]), f32([4.0]))
    assert packed.tolist() == [BLOCK16_BYTES]
    assert scales.tolist() == [[0x50]]


def test_nvfp4_uses_the_rounded_scale():
    # amax 6.375: s = e4m3(1.0625) -> tie -> 1.0 (0x38); factor 1 -> 6.375 saturates to 6 (0x7).
    block = [6.375, 1.25] + [0.0] * 14  # 1.25 -> tie -> 1.0 (0x2)
    packed, scales = E.quantize_nvfp4(f32([block]))
    assert scales.tolist() == [[0x38]]
    assert packed.tolist()[0][0] == 0x27
    # amax 7.125: s = e4m3(1.1875) -> tie -> 1.25 (0x3A); factor = fp32(1/1.25) = 0.800000011920929.
    # 7.125 * f = 5.70000008 -> 6 (0x7); 3.125 * f = 2.50000004 rounds to fp32 2.5 exactly, a tie -> 2.0 (0x4)
    block = [7.125, 3.125] + [0.0] * 14
    packed, scales = E.quantize_nvfp4(f32([block]))
    assert scales.tolist() == [[0x3A]]
    assert packed.tolist()[0][0] == 0x47


def test_nvfp4_zero_and_tiny_blocks():
    # amax 0 -> s = 0 -> factor 0: values encode as (signed) zero
    packed, scales = E.quantize_nvfp4(f32([[0.0] * 15 + [-0.0]]))
    assert scales.tolist() == [[0x00]] and packed.tolist() == [[0] * 7 + [0x80]]
    # amax 6e-4: s = e4m3(1e-4) -> 1e-4 / 2^-9 = 0.05 -> 0 -> factor 0 -> zeros (no Inf/NaN from 1/0)
    packed, scales = E.quantize_nvfp4(f32([[6e-4] + [0.0] * 15]))
    assert scales.tolist() == [[0x00]] and packed.tolist() == [[0] * 8]


def test_nvfp4_nan_and_inf():
    # NaN is ignored by amax (block amax 12 -> s = 0x40) and itself encodes as +6 (0x7)
    packed, scales = E.quantize_nvfp4(f32([[NAN, 12.0] + [0.0] * 14]))
    assert scales.tolist() == [[0x40]] and packed.tolist()[0][0] == 0x77
    # Inf: amax Inf -> s saturates to 448 (0x7E); Inf * (1/448) = Inf -> 6 (0x7); 1 * (1/448) -> 0
    packed, scales = E.quantize_nvfp4(f32([[INF, 1.0] + [0.0] * 14]))
    assert scales.tolist() == [[0x7E]] and packed.tolist()[0][0] == 0x07


def test_nvfp4_unrounded_convention():
    # amax 7.125 -> sf = 1.1875 (exact); stored e4m3(1.1875) -> tie -> 1.25 (0x3A);
    # values divided by the unrounded 1.1875: 7.125 -> 6 (0x7), 2.5 -> 2.105 -> 2.0 (0x4),
    # 3.5625 -> 3.0 (0x5), -1.78125 -> -1.5 (0xB)
    block = [7.125, 2.5, 3.5625, -1.78125] + [0.0] * 12
    packed, scales = E.quantize_nvfp4_unrounded(f32([block]))
    assert scales.tolist() == [[0x3A]]
    assert packed.tolist()[0][:2] == [0x47, 0xB5]
    # amax 0 -> sf = FLT_MIN, stored as e4m3(2^-126) = 0; 0 / FLT_MIN = 0
    packed, scales = E.quantize_nvfp4_unrounded(torch.zeros(1, 16))
    assert scales.tolist() == [[0]] and packed.tolist() == [[0] * 8]


def test_mxfp4_hand_blocks():
    # block 1: amax 12 -> v = 2 -> e = 128 -> factor 2^-1 -> same codes as BLOCK16 (padded to 32)
    # block 2: amax 7 -> v = 7/6 -> ceil log2 = 1 -> e = 128; 7 * 0.5 = 3.5 -> tie -> 4 (0x6);
    #          -2.5 * 0.5 = -1.25 -> tie -> -1.0 (0xA)
    # block 3: all zero -> e = 0 -> factor 2^127 -> zeros
    y = f32([BLOCK16 + [0.0] * 16 + [7.0, -2.5] + [0.0] * 30 + [0.0] * 32])
    packed, scales = E.quantize_mxfp4(y)
    assert scales.tolist() == [[128, 128, 0]]
    assert packed.tolist()[0][:8] == BLOCK16_BYTES
    assert packed.tolist()[0][16] == 0xA6
    assert packed.tolist()[0][32:] == [0] * 16


def test_block_quantizers_validate():
    with pytest.raises(ValueError, match="divisible by 16"):
        E.quantize_nvfp4(torch.zeros(2, 24))
    with pytest.raises(ValueError, match="divisible by 32"):
        E.quantize_mxfp4(torch.zeros(2, 16))
    with pytest.raises(TypeError, match="global_scale"):
        E.quantize_nvfp4(torch.zeros(1, 16), torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="global_scale"):
        E.quantize_nvfp4(torch.zeros(1, 16), f32([0.0]))
    with pytest.raises(ValueError, match="no global scale"):
        E.dequantize_fp4(u8([[0] * 16]), u8([[127]]), "mxfp4", f32([1.0]))
    with pytest.raises(ValueError, match="does not match"):
        E.dequantize_fp4(u8([[0] * 8]), u8([[1, 2]]), "nvfp4")
    with pytest.raises(ValueError, match="fmt"):
        E.dequantize_fp4(u8([[0] * 8]), u8([[1]]), "fp4")


def test_empty_rows():
    packed, scales = E.quantize_nvfp4(torch.zeros(0, 32))
    assert packed.shape == (0, 16) and scales.shape == (0, 2)


# ------------------------------------------------------------------ round trips -------------------

def _rand(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.exp2(torch.randint(-4, 5, (rows, 1), generator=g).float())


def test_nvfp4_round_trip_error_bound():
    # scaled error <= half the widest e2m1 step (1, between 4 and 6); saturation error when s rounded down
    # by up to 2^-4 is < 0.4 -> |deq - y| <= s / gs <= amax/6 * (1 + 2^-4)
    y = _rand(64, 256, 1)
    gs = f32([3.0])
    packed, scales = E.quantize_nvfp4(y, gs)
    deq = E.dequantize_fp4(packed, scales, "nvfp4", gs)
    amax = E.block_amax(y, 16).repeat_interleave(16, dim=-1)
    assert bool(((deq - y).abs() <= amax / 6 * (1 + 2**-4) * (1 + 1e-6)).all())


def test_nvfp4_unrounded_round_trip_error_bound():
    # stored scale differs from sf by <= 2^-4 relative: |deq - y| <= sf * (1 + 6 * 2^-4)
    y = _rand(64, 256, 2)
    packed, scales = E.quantize_nvfp4_unrounded(y)
    deq = E.dequantize_fp4(packed, scales, "nvfp4")
    sf = (E.block_amax(y, 16) / 6).repeat_interleave(16, dim=-1)
    assert bool(((deq - y).abs() <= sf * (1 + 6 * 2**-4) * (1 + 1e-6)).all())


def test_mxfp4_round_trip_error_bound():
    # 2^(e-127) >= amax/6 and < amax/3; scaled values <= 6, error <= 1 step-half (1) -> <= amax/3
    y = _rand(64, 256, 3)
    packed, scales = E.quantize_mxfp4(y)
    deq = E.dequantize_fp4(packed, scales, "mxfp4")
    amax = E.block_amax(y, 32).repeat_interleave(32, dim=-1)
    assert bool(((deq - y).abs() <= amax / 3).all())


def test_representable_values_survive_unchanged():
    g = torch.Generator().manual_seed(4)
    grid = E.decode_e2m1(torch.randint(0, 16, (8, 64), generator=g, dtype=torch.uint8))
    grid[:, ::16] = 6.0  # every 16-block has amax 6, so its scale is exactly the block multiplier
    # NVFP4: multipliers that are e4m3 values (not only powers of two: 1/s is inexact in fp32)
    mult = f32([0.5, 1.25, 3.0, 0.0390625, 1.75, 20.0, 96.0, 0.125]).unsqueeze(1)
    y = grid * mult
    packed, scales = E.quantize_nvfp4(y)
    assert torch.equal(E.dequantize_fp4(packed, scales, "nvfp4"), y)
    # MXFP4: power-of-two multipliers
    y = grid * torch.exp2(torch.arange(-4, 4).float()).unsqueeze(1)
    packed, scales = E.quantize_mxfp4(y)
    assert torch.equal(E.dequantize_fp4(packed, scales, "mxfp4"), y)
    # E4M3: every finite code survives
    vals = E.decode_e4m3(torch.arange(0x7F, dtype=torch.uint8))
    assert torch.equal(E.decode_e4m3(E.encode_e4m3(vals)), vals)


# ------------------------------------------------------------------ swizzle -----------------------

def test_swizzle_offsets_by_hand():
    # n_sf = 5 -> k_tiles = 2, a k tile is 512 bytes, an m tile 2 * 512 = 1024 bytes
    n = 5
    assert E.swizzle_offset(0, 0, n) == 0
    assert E.swizzle_offset(1, 0, n) == 16           # (row % 32) * 16
    assert E.swizzle_offset(32, 0, n) == 4           # ((row % 128) // 32) * 4
    assert E.swizzle_offset(33, 3, n) == 16 + 4 + 3
    assert E.swizzle_offset(100, 1, n) == 4 * 16 + 3 * 4 + 1   # 100 % 32 = 4, 100 // 32 = 3 -> 77
    assert E.swizzle_offset(127, 2, n) == 31 * 16 + 3 * 4 + 2  # 510
    assert E.swizzle_offset(0, 4, n) == 512          # k_tile 1
    assert E.swizzle_offset(129, 4, n) == 1024 + 512 + 16      # m_tile 1, k_tile 1, row % 32 = 1 -> 1552
    assert E.swizzle_offset(255, 4, n) == 1024 + 512 + 31 * 16 + 3 * 4  # 2044
    assert E.swizzled_scale_bytes(130, 5) == 2048    # ceil(130/128) = 2 m tiles x 2 k tiles x 512
    assert E.swizzled_scale_bytes(128, 4) == 512
    assert E.swizzled_scale_bytes(0, 4) == 0


def test_swizzle_layout_padding_and_inverse():
    rows, n_sf = 130, 5  # T not a multiple of 128, n_sf not a multiple of 4
    sc = (torch.arange(rows * n_sf) % 255 + 1).to(torch.uint8).reshape(rows, n_sf)  # all non-zero
    buf = E.swizzle_scales(sc)
    assert buf.shape == (2048,)
    assert buf[16].item() == sc[1, 0].item() and buf[1552].item() == sc[129, 4].item()
    assert buf[77].item() == sc[100, 1].item()
    assert int((buf == 0).sum()) == 2048 - rows * n_sf  # every padding byte is 0
    assert buf[3].item() == sc[0, 3].item() and buf[512 + 1].item() == 0  # column 5 of k tile 1 is padding
    assert torch.equal(E.unswizzle_scales(buf, rows, n_sf), sc)
    # leading dims are rows
    assert torch.equal(E.swizzle_scales(sc.reshape(2, 65, 5)), buf)


def test_swizzle_validation():
    with pytest.raises(ValueError, match="2048 bytes"):
        E.unswizzle_scales(torch.zeros(100, dtype=torch.uint8), 130, 5)
    with pytest.raises(ValueError, match="rows, n_sf"):
        E.swizzle_scales(u8([1, 2]))
    with pytest.raises(ValueError, match="n_sf"):
        E.swizzle_offset(0, 0, 0)
    with pytest.raises(TypeError, match="uint8"):
        E.swizzle_scales(torch.zeros(4, 4))


@pytest.mark.gpu
def test_cuda_matches_cpu_if_available():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    y = _rand(32, 128, 5)
    for fn in (E.quantize_mxfp4, E.quantize_nvfp4_unrounded, lambda t: E.quantize_nvfp4(t, f32([7.0]).to(t.device))):
        a, b = fn(y), fn(y.cuda())
        assert all(torch.equal(u, v.cpu()) for u, v in zip(a, b))
