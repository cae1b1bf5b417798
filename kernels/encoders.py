"""Bit-exact quantizers and dequantizers for the low-precision outputs (FP8 E4M3, FP4 E2M1, the NVFP4
and MXFP4 block scales) and the 128x4 swizzled scale layout.

These are the contract the GPU kernels must reproduce bit for bit given the same fp32 inputs, so the
rounding is done with exact arithmetic on fp32 bit patterns, never with an approximate cast:

* Every conversion is round-to-nearest-even with *satfinite* saturation, as PTX
  ``cvt.rn.satfinite.{e4m3x2,e2m1x2}.f32`` does: |x| above the largest finite value (Inf included)
  becomes the sign-preserving largest finite value (448 for E4M3, 6 for E2M1).
* NaN: E4M3 has a NaN encoding and gets the canonical positive NaN ``0x7F`` (the sign is dropped, as
  CUDA's ``__nv_cvt_float_to_fp8`` does). E2M1 has no NaN; PTX converts NaN to positive MAX_NORM, so
  NaN encodes as ``0x7`` (+6.0). The E8M0 block exponent of an Inf or NaN amax is ``0xFF`` (E8M0's NaN).
* The sign of zero is kept: -0.0 and negative values that round to zero encode with the sign bit set.
* Block amax ignores NaN elements (like the PTX ``max.f32`` a kernel reduces with); an all-NaN block
  has amax 0.

FP4 packing: element 2i goes in the low nibble and element 2i+1 in the high nibble of byte i. This is
``torch.float4_e2m1fn_x2``'s layout (val0 in bits 3..0, val1 in bits 7..4) and PTX
``cvt.rn.satfinite.e2m1x2.f32 d, a, b`` stores ``a`` in d[7:4] and ``b`` in d[3:0]: a kernel passes
a = x[2i+1], b = x[2i].

Block-scale conventions (DESIGN.md section 2), all arithmetic in IEEE fp32 with RNE, in this order:

* NVFP4, rmsnorm_fp4quant: ``s = e4m3(fp32(fp32(gs * amax) / 6))``; ``f = fp32(gs / f32(s))`` (f = 0
  where s == 0); ``q = e2m1(fp32(y * f))``. ``gs`` (global scale) is multiplicative, default 1.
* NVFP4, fused_rmsnorm_silu (cuDNN heritage): ``sf = max(fp32(amax / 6), FLT_MIN)``; the stored scale
  is ``e4m3(sf)``; ``q = e2m1(fp32(y / sf))`` with the *unrounded* sf.
* MXFP4: ``v = fp32(amax / 6)``; ``e = clamp(ceil(log2 v) + 127, 0, 255)`` from v's bits (amax = 0 ->
  0); ``q = e2m1(fp32(y * 2^(127 - e)))``.

Codes are returned as uint8 tensors; view them as ``torch.float8_e4m3fn`` / ``torch.float4_e2m1fn_x2``
where a typed tensor is wanted.
"""
from __future__ import annotations

import torch

E4M3_MAX = 448.0
E2M1_MAX = 6.0
FLT_MIN = 2.0**-126  # smallest normal fp32
E4M3_NAN = 0x7F
E2M1_NAN = 0x7  # PTX satfinite: NaN -> +MAX_NORM (6.0); E2M1 has no NaN
UE8M0_NAN = 0xFF
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
SWIZZLE_ROWS = 128  # rows per swizzle tile
SWIZZLE_COLS = 4  # scale columns per swizzle tile
SWIZZLE_TILE_BYTES = SWIZZLE_ROWS * SWIZZLE_COLS  # 512

# Typed one-byte dtypes accepted wherever codes are expected (read as their uint8 bits).
_BYTE_VIEW_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e8m0fnu", "float4_e2m1fn_x2")
                          if hasattr(torch, n))

# E2M1 magnitudes by code 0..7 (sign is bit 3).
_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------

def _as_f32(x: torch.Tensor, what: str) -> torch.Tensor:
    """fp32 view of a float tensor; refuses float64 (rounding it to fp32 first would double-round)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{what} must be float32, bfloat16 or float16 (exactly representable in fp32), got {x.dtype}")
    return x.to(torch.float32)


def _as_codes(codes: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype in _BYTE_VIEW_DTYPES:
        codes = codes.view(torch.uint8)
    if codes.dtype != torch.uint8:
        raise TypeError(f"{what} must be a uint8 (or float8/float4 bit-view) tensor, got {codes.dtype}")
    return codes


def _check_last_dim(y: torch.Tensor, block: int, what: str) -> None:
    if y.dim() < 1 or y.shape[-1] % block:
        raise ValueError(f"{what} needs a last dimension divisible by {block}, got shape {tuple(y.shape)}")


# --------------------------------------------------------------------------------------------
# Scalar formats: E4M3 and E2M1
# --------------------------------------------------------------------------------------------

def _fdiv(a: torch.Tensor, b) -> torch.Tensor:
    """IEEE fp32 a / b. The divisor is materialised as a tensor: torch's CUDA division by a python
    scalar multiplies by its rounded reciprocal instead, which is not the same rounding."""
    return a / (b if isinstance(b, torch.Tensor) else torch.full_like(a, b))


def _pow2(exp: torch.Tensor) -> torch.Tensor:
    """Exact fp32 2**exp for integer exp in [-126, 127], built from the exponent bits."""
    return ((exp + 127) << 23).to(torch.int32).view(torch.float32)


def _encode_minifloat(x: torch.Tensor, mbits: int, bias: int, sign_bit: int, max_val: float,
                      nan_code: int) -> torch.Tensor:
    """RNE satfinite conversion of fp32 values to a sign/exponent/mantissa minifloat with subnormals
    and no infinities; returns the codes as uint8.

    The magnitude is rounded on its own binade's grid: q = 2^(max(e, emin) - mbits) with e taken from
    the fp32 exponent bits; |x| / q is exact (q is a power of two), torch.round rounds it half to even,
    and the product back by q is exact. The rounded value is then encoded from its own bits.
    """
    emin = 1 - bias
    sign = (x.view(torch.int32) < 0).to(torch.int32) << sign_bit
    a = x.abs()
    e = ((a.view(torch.int32) >> 23) - 127).clamp(min=emin)  # zero/fp32-subnormal -> emin; Inf/NaN -> 128
    r = (torch.round(a / _pow2(e - mbits)) * _pow2(e - mbits)).clamp(max=max_val)  # Inf -> max; NaN stays
    rb = r.view(torch.int32)
    normal_code = (((rb >> 23) - 127 + bias) << mbits) | ((rb >> (23 - mbits)) & ((1 << mbits) - 1))
    subnormal_code = (r * 2.0 ** (mbits - emin)).to(torch.int32)  # exact: r is a multiple of 2^(emin-mbits)
    code = torch.where(r >= 2.0**emin, normal_code, subnormal_code) | sign
    code = torch.where(torch.isnan(x), torch.full_like(code, nan_code), code)
    return code.to(torch.uint8)


def _decode_magnitude(code: torch.Tensor, mbits: int, bias: int) -> torch.Tensor:
    """Value of a sign-less minifloat code (int32 tensor) as fp32."""
    exp_field = code >> mbits
    mant = (code & ((1 << mbits) - 1)).to(torch.float32)
    frac = mant / (1 << mbits)
    normal = (1.0 + frac) * _pow2(exp_field - bias)
    subnormal = frac * _pow2(torch.full_like(exp_field, 1 - bias))
    return torch.where(exp_field > 0, normal, subnormal)


def encode_e4m3(x: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 (e4m3fn) codes of x: RNE, satfinite at +-448, NaN -> 0x7F, sign of zero kept."""
    return _encode_minifloat(_as_f32(x, "x"), mbits=3, bias=7, sign_bit=7, max_val=E4M3_MAX, nan_code=E4M3_NAN)


def decode_e4m3(codes: torch.Tensor) -> torch.Tensor:
    """fp32 values of E4M3 codes (0x7F / 0xFF are NaN)."""
    c = _as_codes(codes, "codes").to(torch.int32)
    mag = _decode_magnitude(c & 0x7F, mbits=3, bias=7)
    val = torch.where((c & 0x80) != 0, -mag, mag)
    return torch.where((c & 0x7F) == 0x7F, torch.full_like(val, float("nan")), val)


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """FP4 E2M1 codes (0..15, one per uint8) of x: RNE, satfinite at +-6, NaN -> 0x7 (+6)."""
    return _encode_minifloat(_as_f32(x, "x"), mbits=1, bias=1, sign_bit=3, max_val=E2M1_MAX, nan_code=E2M1_NAN)


def decode_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """fp32 values of E2M1 codes (one code per uint8, values 0..15)."""
    c = _as_codes(codes, "codes")
    if c.numel() and int(c.max()) > 15:
        raise ValueError("E2M1 codes are 4-bit (0..15); unpack packed bytes with unpack_fp4 first")
    table = torch.tensor(_E2M1_VALUES + tuple(-v for v in _E2M1_VALUES), dtype=torch.float32, device=c.device)
    return table[c.long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack E2M1 codes [..., 2n] into bytes [..., n]: element 2i in the low nibble, 2i+1 in the high."""
    c = _as_codes(codes, "codes")
    if c.dim() < 1 or c.shape[-1] % 2:
        raise ValueError(f"packing needs an even last dimension, got shape {tuple(c.shape)}")
    if c.numel() and int(c.max()) > 15:
        raise ValueError("E2M1 codes are 4-bit (0..15)")
    pairs = c.reshape(*c.shape[:-1], c.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_fp4: bytes [..., n] -> E2M1 codes [..., 2n]."""
    p = _as_codes(packed, "packed")
    if p.dim() < 1:
        raise ValueError("packed FP4 data needs at least one dimension")
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def as_fp4x2(packed: torch.Tensor) -> torch.Tensor:
    """Typed view of packed FP4 bytes as torch.float4_e2m1fn_x2 (the uint8 tensor where torch lacks it)."""
    p = _as_codes(packed, "packed")
    dt = getattr(torch, "float4_e2m1fn_x2", None)
    return p.view(dt) if dt is not None else p


# --------------------------------------------------------------------------------------------
# FP8 static per-tensor quantization
# --------------------------------------------------------------------------------------------

def quantize_fp8_static(y: torch.Tensor, scale: float) -> torch.Tensor:
    """float8_e4m3fn tensor of e4m3(fp32(y / scale)): clamp to +-448 (satfinite), RNE."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a python float, got {type(scale).__name__}")
    if not (scale > 0 and scale != float("inf")):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    y32 = _as_f32(y, "y")
    return encode_e4m3(_fdiv(y32, float(scale))).view(torch.float8_e4m3fn)


# --------------------------------------------------------------------------------------------
# Block scales: amax, UE8M0
# --------------------------------------------------------------------------------------------

def block_amax(y: torch.Tensor, block: int) -> torch.Tensor:
    """max |y| over consecutive blocks of the last dimension, NaN ignored (an all-NaN block gives 0)."""
    y32 = _as_f32(y, "y")
    _check_last_dim(y32, block, "block_amax")
    a = y32.abs()
    a = torch.where(torch.isnan(a), torch.zeros_like(a), a)
    blocks = a.reshape(*a.shape[:-1], a.shape[-1] // block, block)
    if blocks.numel() == 0:
        return blocks.sum(-1)  # empty rows -> correctly shaped empty result
    return blocks.amax(-1)


def ue8m0_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """MXFP4 block exponents: clamp(ceil(log2(fp32(amax / 6))) + 127, 0, 255), exact from the bits.

    amax = 0 -> 0; Inf or NaN amax -> 0xFF. Subnormal fp32 quotients are handled exactly (a quotient
    above 2^-127 gives 1, at or below it 0).
    """
    a = _as_f32(amax, "amax")
    if bool((a < 0).any()):
        raise ValueError("amax must be >= 0")
    v = _fdiv(a, 6.0)
    bits = v.view(torch.int32)
    exp_field = (bits >> 23) & 0xFF
    mant = bits & 0x7FFFFF
    normal = (exp_field + (mant != 0).to(torch.int32)).clamp(max=255)  # ceil(log2 v) + 127
    subnormal = (mant > (1 << 22)).to(torch.int32)  # v = mant * 2^-149 > 2^-127 -> ceil(log2 v) = -126
    code = torch.where(exp_field == 0, subnormal, normal)
    code = torch.where(exp_field == 255, torch.full_like(code, UE8M0_NAN), code)
    return code.to(torch.uint8)


def decode_ue8m0(codes: torch.Tensor) -> torch.Tensor:
    """fp32 values 2^(e - 127) of UE8M0 codes (0 -> 2^-127, a subnormal; 0xFF -> NaN)."""
    c = _as_codes(codes, "codes").to(torch.int32)
    val = torch.where(c == 0, torch.full_like(c, 1 << 22), c << 23).view(torch.float32)
    return torch.where(c == UE8M0_NAN, torch.full_like(val, float("nan")), val)


def _mx_factor(codes: torch.Tensor) -> torch.Tensor:
    """Exact fp32 2^(127 - e) for UE8M0 codes e (2^127 down to 2^-128, a subnormal)."""
    k = 127 - codes.to(torch.int32)  # in [-128, 127]
    subnormal = torch.bitwise_left_shift(torch.ones_like(k), (k + 149).clamp(min=0, max=22))
    return torch.where(k >= -126, (k + 127).clamp(min=1) << 23, subnormal).view(torch.float32)


# --------------------------------------------------------------------------------------------
# Block quantizers (y: [..., C] floating; return packed [..., C/2] uint8 and scales [..., C/block] uint8)
# --------------------------------------------------------------------------------------------

def _blocks(t: torch.Tensor, block: int) -> torch.Tensor:
    return t.reshape(*t.shape[:-1], t.shape[-1] // block, block)


def _global_scale_value(global_scale, device) -> torch.Tensor:
    if global_scale is None:
        return torch.ones((), dtype=torch.float32, device=device)
    if not isinstance(global_scale, torch.Tensor) or global_scale.dtype != torch.float32 or global_scale.numel() != 1:
        raise TypeError("global_scale must be None or a float32 tensor with one element")
    gs = global_scale.reshape(()).to(device)
    if not (bool(torch.isfinite(gs)) and float(gs) > 0):
        raise ValueError(f"global_scale must be finite and > 0, got {float(gs)}")
    return gs


def quantize_nvfp4(y: torch.Tensor, global_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 as rmsnorm_fp4quant: per 16 values s = e4m3(gs*amax/6); values times gs/f32(s) -> E2M1."""
    y32 = _as_f32(y, "y")
    _check_last_dim(y32, NVFP4_BLOCK, "NVFP4")
    gs = _global_scale_value(global_scale, y32.device)
    amax = block_amax(y32, NVFP4_BLOCK)
    s_codes = encode_e4m3(_fdiv(gs * amax, 6.0))
    s = decode_e4m3(s_codes)
    factor = torch.where(s == 0, torch.zeros_like(s), _fdiv(gs.expand_as(s), s))
    q = encode_e2m1((_blocks(y32, NVFP4_BLOCK) * factor.unsqueeze(-1)).reshape(y32.shape))
    return pack_fp4(q), s_codes


def quantize_nvfp4_unrounded(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 as fused_rmsnorm_silu (cuDNN heritage): sf = max(amax/6, FLT_MIN), stored as e4m3;
    values divided by the unrounded fp32 sf -> E2M1."""
    y32 = _as_f32(y, "y")
    _check_last_dim(y32, NVFP4_BLOCK, "NVFP4")
    sf = torch.clamp(_fdiv(block_amax(y32, NVFP4_BLOCK), 6.0), min=FLT_MIN)
    q = encode_e2m1((_blocks(y32, NVFP4_BLOCK) / sf.unsqueeze(-1)).reshape(y32.shape))
    return pack_fp4(q), encode_e4m3(sf)


def quantize_mxfp4(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4: per 32 values e = ue8m0(amax); values times 2^(127 - e) -> E2M1. No global scale."""
    y32 = _as_f32(y, "y")
    _check_last_dim(y32, MXFP4_BLOCK, "MXFP4")
    e = ue8m0_from_amax(block_amax(y32, MXFP4_BLOCK))
    q = encode_e2m1((_blocks(y32, MXFP4_BLOCK) * _mx_factor(e).unsqueeze(-1)).reshape(y32.shape))
    return pack_fp4(q), e


def dequantize_fp4(packed: torch.Tensor, scales: torch.Tensor, fmt: str,
                   global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 values of block-scaled FP4: e2m1 * scale (/ global_scale for NVFP4). fmt: nvfp4 | mxfp4.

    `scales` is row-major [..., C/block] (unswizzle a swizzled buffer first)."""
    if fmt not in ("nvfp4", "mxfp4"):
        raise ValueError(f"fmt must be 'nvfp4' or 'mxfp4', got {fmt!r}")
    if fmt == "mxfp4" and global_scale is not None:
        raise ValueError("MXFP4 has no global scale")
    block = NVFP4_BLOCK if fmt == "nvfp4" else MXFP4_BLOCK
    vals = decode_e2m1(unpack_fp4(packed))
    sc = _as_codes(scales, "scales")
    if tuple(sc.shape) != tuple(vals.shape[:-1]) + (vals.shape[-1] // block,) or vals.shape[-1] % block:
        raise ValueError(f"scales shape {tuple(sc.shape)} does not match {tuple(vals.shape)} values in blocks of {block}")
    s = decode_e4m3(sc) if fmt == "nvfp4" else decode_ue8m0(sc)
    if fmt == "nvfp4":
        s = s / _global_scale_value(global_scale, vals.device)
    return (_blocks(vals, block) * s.unsqueeze(-1)).reshape(vals.shape)


# --------------------------------------------------------------------------------------------
# 128x4 swizzled scale layout
# --------------------------------------------------------------------------------------------

def _check_rows_nsf(rows: int, n_sf: int) -> None:
    for name, v in (("rows", rows), ("n_sf", n_sf)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")


def swizzled_scale_bytes(rows: int, n_sf: int) -> int:
    """Bytes of the swizzled buffer: rows padded to 128, scale columns padded to 4."""
    _check_rows_nsf(rows, n_sf)
    return -(-rows // SWIZZLE_ROWS) * -(-n_sf // SWIZZLE_COLS) * SWIZZLE_TILE_BYTES


def swizzle_offset(row, sf, n_sf: int):
    """Byte offset of scale (row, sf) in the swizzled buffer (ints or integer tensors):
    m_tile*(k_tiles*512) + k_tile*512 + (row%32)*16 + ((row%128)//32)*4 + sf%4."""
    if isinstance(n_sf, bool) or not isinstance(n_sf, int) or n_sf < 1:
        raise ValueError(f"n_sf must be an int >= 1, got {n_sf!r}")
    k_tiles = -(-n_sf // SWIZZLE_COLS)
    m_tile, k_tile = row // SWIZZLE_ROWS, sf // SWIZZLE_COLS
    return (m_tile * (k_tiles * SWIZZLE_TILE_BYTES) + k_tile * SWIZZLE_TILE_BYTES
            + (row % 32) * 16 + ((row % SWIZZLE_ROWS) // 32) * 4 + sf % SWIZZLE_COLS)


def _offset_grid(rows: int, n_sf: int, device) -> torch.Tensor:
    r = torch.arange(rows, device=device, dtype=torch.int64).unsqueeze(1)
    c = torch.arange(n_sf, device=device, dtype=torch.int64).unsqueeze(0)
    return swizzle_offset(r, c, n_sf)


def swizzle_scales(scales: torch.Tensor) -> torch.Tensor:
    """Row-major scales [..., n_sf] (leading dims are rows) -> flat swizzled uint8 buffer; padding is 0."""
    sc = _as_codes(scales, "scales")
    if sc.dim() < 2:
        raise ValueError(f"scales must be [rows, n_sf] (or more leading dims), got shape {tuple(sc.shape)}")
    n_sf = sc.shape[-1]
    flat = sc.reshape(-1, n_sf)
    rows = flat.shape[0]
    out = torch.zeros(swizzled_scale_bytes(rows, n_sf), dtype=torch.uint8, device=sc.device)
    if rows and n_sf:
        out[_offset_grid(rows, n_sf, sc.device).reshape(-1)] = flat.reshape(-1)
    return out


def unswizzle_scales(buf: torch.Tensor, rows: int, n_sf: int) -> torch.Tensor:
    """Flat swizzled buffer -> row-major [rows, n_sf] uint8 scales."""
    b = _as_codes(buf, "buf")
    _check_rows_nsf(rows, n_sf)
    if b.dim() != 1 or b.numel() != swizzled_scale_bytes(rows, n_sf):
        raise ValueError(f"buffer must be 1-D with {swizzled_scale_bytes(rows, n_sf)} bytes for rows={rows} "
                         f"n_sf={n_sf}, got shape {tuple(b.shape)}")
    if rows == 0 or n_sf == 0:
        return torch.zeros(rows, n_sf, dtype=torch.uint8, device=b.device)
    return b[_offset_grid(rows, n_sf, b.device)]
