"""NVFP4 conventions of the fused MoE (ModelOpt's, as the seed's `source_format="modelopt"`), in torch.

Weights of expert e, [rows, K]: global scale ``gs_e = 448 * 6 / amax(w_e)``; per 16 values along K the
e4m3 scale ``s = e4m3(gs_e * amax_block / 6)`` and codes ``q = e2m1(w * gs_e / s)`` (kernels/encoders.py's
quantize_nvfp4, bit-exact RNE). Packed bytes hold element 2i in the low nibble. The kernel multiplies
``e2m1(q) * s`` (exact in bf16) and the caller's per-expert ``alpha`` carries every global scale:

* "w4a16": w1_alpha = 1 / gs1_e, w2_alpha = 1 / gs2_e (activations stay bf16);
* "nvfp4" (W4A4): activations are quantised the same way; FC1's input with global scale 1 (the seed takes
  no FC1 input scale), FC2's input with ``fc2_input_scale``; so w1_alpha = 1 / gs1_e and
  w2_alpha = 1 / (fc2_input_scale * gs2_e).

`fake_quantize_nvfp4` returns ``e2m1(q) * s``, the bf16-exact values the tensor cores multiply, so W4A4
numerics are reproduced exactly by bf16 MMA with fp32 accumulation. Everything here is sync-free on a GPU
(no `.item()`), so the op may call it under CUDA-graph capture.
"""
from __future__ import annotations

import torch

from .encoders import E2M1_MAX, E4M3_MAX, _fdiv, block_amax, decode_e4m3, encode_e2m1, encode_e4m3, pack_fp4

NVFP4_BLOCK = 16
_E2M1_TABLE = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


_TABLES: dict = {}  # device -> the E2M1 table there (made once: a host-to-device copy cannot be graph-captured)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    """fp32 values of E2M1 codes (uint8 0..15), by table lookup (no range check: no host sync)."""
    table = _TABLES.get(codes.device)
    if table is None:
        table = _TABLES[codes.device] = torch.tensor(_E2M1_TABLE, dtype=torch.float32, device=codes.device)
    return table[codes.long()]


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Packed FP4 bytes [..., n] -> codes [..., 2n] (low nibble first)."""
    p = packed.view(torch.uint8)
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


def _scales_and_codes(y32: torch.Tensor, gs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 scale codes [..., K/16], e2m1 codes [..., K]) of y32 with global scale gs (broadcast over
    the leading dims: a scalar tensor or one per row block)."""
    blocks = y32.reshape(*y32.shape[:-1], y32.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
    amax = block_amax(y32, NVFP4_BLOCK)
    gs = gs.to(torch.float32)
    s_codes = encode_e4m3(_fdiv(gs * amax, 6.0))
    s = decode_e4m3(s_codes)
    factor = torch.where(s == 0, torch.zeros_like(s), _fdiv(gs.expand_as(s), s))
    return s_codes, encode_e2m1((blocks * factor.unsqueeze(-1)).reshape(y32.shape))


def fake_quantize_nvfp4(y: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """e2m1(q) * s of NVFP4-quantised y (last dim in blocks of 16), fp32: what W4A4 multiplies (the global
    scale's inverse is left to alpha)."""
    y32 = y.to(torch.float32)
    s_codes, q = _scales_and_codes(y32, global_scale)
    vals = e2m1_values(q).reshape(*y32.shape[:-1], y32.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
    return (vals * decode_e4m3(s_codes).unsqueeze(-1)).reshape(y32.shape)


def quantize_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ModelOpt NVFP4 of expert weights w [E, rows, K] (float): (packed uint8 [E, rows, K/2], e4m3 scales
    float8_e4m3fn [E, rows, K/16], global scales fp32 [E]). alpha for w4a16 is 1 / global scale."""
    if w.dim() != 3 or w.shape[-1] % NVFP4_BLOCK:
        raise ValueError(f"weights must be [E, rows, K] with K a multiple of 16, got {tuple(w.shape)}")
    w32 = w.to(torch.float32)
    amax = w32.abs().amax(dim=(1, 2)).clamp(min=1e-30)
    gs = (E4M3_MAX * E2M1_MAX) / amax
    s_codes, q = _scales_and_codes(w32, gs.view(-1, 1, 1))
    return pack_fp4(q), s_codes.view(torch.float8_e4m3fn), gs


def dequantize_weights(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 e2m1(q) * s of packed weights [E, rows, K/2] and scales [E, rows, K/16] (no global scale)."""
    vals = e2m1_values(unpack_codes(packed))
    s = decode_e4m3(scales.view(torch.uint8))
    blocks = vals.reshape(*vals.shape[:-1], vals.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
    return (blocks * s.unsqueeze(-1)).reshape(vals.shape)
