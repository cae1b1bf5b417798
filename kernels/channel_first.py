"""Channel-first RMSNorm family: normalise over dim 1 of [B, C, *spatial] without permuting.

The WAN VAE (diffusers' `AutoencoderKLWan`) keeps activations as [B, C, T, H, W] and normalises each
position's C channels (`WanRMS_norm`); the row ops (kernels/ops.py) need [tokens, C] rows, which costs two
permute copies. This module describes the channel-first kernel family (kernels/family.py): the problem
descriptor, the knobs with their choices, constraints and analytical heuristic, a float64 reference and a
compile function (TVM-FFI, CPU-only compile like kernels/compile_cache.py) with a process cache. The CuTe-DSL
kernel is kernels/channel_first_kernel.py, the runtime entry point `channel_first_rmsnorm`
kernels/channel_first_op.py, the WAN decoders' norm shapes kernels/wan_vae_norm_shapes.py.

Semantics, per position p (all C channels of one (b, t, h, w)), computed in fp32, rounded once:

* RMSNorm (l2norm=False): y = x * rsqrt(mean_c(x^2) + eps) * w (+ b)
* L2Norm (l2norm=True), F.normalize's exact semantics: y = x / max(||x||_2, eps) * sqrt(C) * w (+ b).
  F.normalize clamps the *norm* at eps; RMSNorm adds eps to the *mean square*. RMSNorm with
  eps' = eps^2 / C equals sqrt(C) * x / sqrt(||x||^2 + eps^2) (kernels/reference.py), which is not
  x / max(||x||, eps) * sqrt(C): the ratio max(n, eps) / sqrt(n^2 + eps^2) of the two lies in [1/sqrt(2), 1],
  is 1/sqrt(2) at ||x|| = eps, within 0.5 % only for ||x|| > 10 eps or < eps / 10, and both give 0 at x = 0.
  WanRMS_norm uses F.normalize's default eps = 1e-12.
* silu=True applies y * sigmoid(y) after the affine (WanResidualBlock's norm -> SiLU pair).
* fp8 e4m3 output: e4m3(y / scale), saturating at +-448 (a static per-tensor scale as the row kernel's
  rmsnorm_quant; scale=1.0 is fused_rmsnorm_silu's unscaled fp8 convention).
* NVFP4 output (C % 16 == 0): 16-channel blocks of each position, rmsnorm_fp4quant's convention
  (kernels/encoders.quantize_nvfp4): s = e4m3(gs * amax / 6), codes e2m1(y * gs / f32(s)), gs the optional
  multiplicative global scale (a one-element float32 device tensor; 1 when absent). The blocks run along C,
  the axis a following FP4 GEMM / implicit-GEMM convolution contracts over, so the output is channels-last:
  packed codes [positions, C/2] (two channels per byte, the even channel in the low nibble, as
  encoders.pack_fp4), positions in the (n, s) order of the [N, C, S] view (a contiguous [B, C, T, H, W]
  input gives [B, T, H, W, C/2]); e4m3 block scales [positions, C/16] row-major, or the 128x4-swizzled
  layout of rmsnorm_fp4quant's is_sf_swizzled_layout=True (the kernel writes its zero padding).

Memory view: x is walked as [N, C, S]: S positions along the innermost contiguous run of spatial dims,
C strided by sC, and N = every other dim (the batch and any spatial dims outside the contiguous run, e.g.
the frames of diffusers' permuted upsampler output) flattened to one stride sN.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import torch

from .config import MAX_REG_VALUES_PER_THREAD, MAX_SMEM_BYTES, REG_VALUES_BUDGET, Knobs
from .problem import ELEM_BYTES

IN_DTYPES = ("bf16", "fp16")
OUT_FORMATS = ("bf16", "fp16", "fp8", "nvfp4")
NVFP4_BLOCK = 16  # channels per NVFP4 scale block (encoders.NVFP4_BLOCK)
SCALE_LAYOUTS = ("rowmajor", "swizzled")  # NVFP4 block scales: [positions, C/16], or 128x4-swizzled tiles
F_NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default, used by WanRMS_norm
RMS_EPS = 1e-6  # the row ops' default
MAX_GRID_Y = 65535  # N is the grid's y extent
# Op names (sweep, Parquet, LUT keys): the form (RMSNorm or F.normalize's L2Norm), then the fused parts.
OPS = tuple(f"cf_{form}{silu}{bias}" for form in ("rmsnorm", "l2norm") for silu in ("", "_silu")
            for bias in ("", "_bias"))


# --------------------------------------------------------------------------- problem
@dataclass(frozen=True)
class ChannelFirstProblem:
    """x [N, C, S] normalised over C at each of the N*S positions. N and S are runtime values of the
    compiled kernel (only their divisibility by the vector matters to a config); C, dtypes and the fused
    parts are compile-time."""

    N: int
    C: int
    S: int
    in_dtype: str = "bf16"
    out_format: str = "bf16"
    silu: bool = False
    bias: bool = False
    l2norm: bool = False
    # NVFP4 block scales' layout (the row family's key column; "rowmajor" = not applicable otherwise)
    scale_layout: str = "rowmajor"
    # the row family's key column, at the value that means "not applicable" (results and tables share it)
    heads = 1

    def __post_init__(self):
        if self.in_dtype not in IN_DTYPES:
            raise ValueError(f"in_dtype must be one of {IN_DTYPES}, got {self.in_dtype!r}")
        if self.out_format not in (self.in_dtype, "fp8", "nvfp4"):
            raise ValueError(f"out_format must be {self.in_dtype!r}, 'fp8' or 'nvfp4', got {self.out_format!r}")
        if self.N < 0 or self.S < 0 or self.C < 1:
            raise ValueError(f"need N >= 0, S >= 0, C >= 1; got N={self.N} C={self.C} S={self.S}")
        if self.out_format == "nvfp4" and self.C % NVFP4_BLOCK:
            raise ValueError(f"NVFP4 output needs C divisible by {NVFP4_BLOCK} (its scale blocks run along C), "
                             f"got C={self.C}")
        if self.scale_layout not in SCALE_LAYOUTS:
            raise ValueError(f"scale_layout must be one of {SCALE_LAYOUTS}, got {self.scale_layout!r}")
        if self.scale_layout != "rowmajor" and self.out_format != "nvfp4":
            raise ValueError(f"scale_layout {self.scale_layout!r} applies to NVFP4 output only")

    @property
    def op(self) -> str:
        """A name for sweep/LUT keys: the row family's op names with a channel-first prefix."""
        return ("cf_l2norm" if self.l2norm else "cf_rmsnorm") + ("_silu" if self.silu else "") \
            + ("_bias" if self.bias else "")

    @classmethod
    def from_op(cls, op: str, N: int, C: int, S: int, in_dtype: str = "bf16",
                out_format: str | None = None, scale_layout: str = "rowmajor") -> "ChannelFirstProblem":
        """The problem an op name (OPS) stands for; out_format None = in_dtype."""
        if op not in OPS:
            raise ValueError(f"unknown channel-first op {op!r}; known: {', '.join(OPS)}")
        return cls(N, C, S, in_dtype, out_format or in_dtype, silu="_silu" in op, bias=op.endswith("_bias"),
                   l2norm=op.startswith("cf_l2norm"), scale_layout=scale_layout)

    @property
    def positions(self) -> int:
        return self.N * self.S

    @property
    def nvfp4(self) -> bool:
        return self.out_format == "nvfp4"

    @property
    def static_key(self) -> tuple:
        """What a compiled kernel depends on (N and S are runtime)."""
        return (self.C, self.in_dtype, self.out_format, self.silu, self.bias, self.l2norm, self.scale_layout)


def scale_bytes(p: ChannelFirstProblem) -> int:
    """Bytes of the NVFP4 block scales (0 for other formats): [positions, C/16], or the swizzled buffer
    (positions padded to 128, scale columns to 4)."""
    if not p.nvfp4:
        return 0
    n_sf = p.C // NVFP4_BLOCK
    if p.scale_layout == "swizzled":
        return -(-p.positions // 128) * 128 * (-(-n_sf // 4) * 4)
    return p.positions * n_sf


def ideal_bytes(p: ChannelFirstProblem) -> int:
    """Each element of x read once and of y written once (NVFP4: half a byte each plus the block scales),
    plus the weight (and bias)."""
    e = ELEM_BYTES[p.in_dtype]
    n = p.N * p.C * p.S
    out = n // 2 + scale_bytes(p) if p.nvfp4 else n * ELEM_BYTES[p.out_format]
    return n * e + out + p.C * e * (2 if p.bias else 1)


# --------------------------------------------------------------------------- knobs
# Fixed, full choice lists (as kernels/config.KNOB_CHOICES: Optuna needs them constant).
CF_KNOB_CHOICES: dict[str, tuple] = {
    "threads": (32, 64, 128, 256, 512, 1024),  # threads per CTA
    "positions_per_cta": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),  # along S
    "vec_bytes": (2, 4, 8, 16),  # bytes of x per load: that many consecutive positions of one channel
    "c_order": ("interleaved", "blocked"),  # thread group g walks channels g, g+G, ... or a block of C/G
    "stage": ("reg", "smem"),  # the C x positions tile held in registers, or in shared memory (cp.async)
    "pdl": (False, True),  # programmatic dependent launch (SM90+)
}
MAX_SMEM_ITERS = 64  # channels per thread with stage=smem: the loop is unrolled at compile time
MIN_SEGMENT_BYTES = 32  # a warp's contiguous run per channel: one full 32-byte sector at least
# NVFP4: the CTA's codes leave shared memory as one contiguous run in 8-byte stores (one 16-channel block
# each; C/2 is a multiple of 8 for any C % 16 == 0), so the output pointer must be 8-byte aligned
FP4_STORE_BYTES = 8


@dataclass(frozen=True)
class ChannelFirstConfig(Knobs):
    """Thread (lane, group) of a CTA owns positions [lane*v, lane*v+v) of the CTA's positions_per_cta and
    loops over its channels (C / groups of them); lanes = positions_per_cta / v, groups = threads / lanes.
    NVFP4 output deals channels out in whole 16-channel scale blocks (c_order then orders blocks)."""

    threads: int = 256
    positions_per_cta: int = 128
    vec_bytes: int = 16
    c_order: str = "interleaved"
    stage: str = "reg"
    pdl: bool = False

    def short(self) -> str:
        return (f"t{self.threads}/p{self.positions_per_cta}/v{self.vec_bytes}/{self.c_order[:3]}/{self.stage}"
                f"{'/pdl' if self.pdl else ''}")


def vec_elems(p: ChannelFirstProblem, cfg: ChannelFirstConfig) -> int:
    return cfg.vec_bytes // ELEM_BYTES[p.in_dtype]


def lanes(p: ChannelFirstProblem, cfg: ChannelFirstConfig) -> int:
    """Threads side by side along S (one vector each)."""
    return max(1, cfg.positions_per_cta // max(1, vec_elems(p, cfg)))


def channel_groups(p: ChannelFirstProblem, cfg: ChannelFirstConfig) -> int:
    """Threads sharing one position vector, each summing its own channels."""
    return max(1, cfg.threads // lanes(p, cfg))


def channel_unit(p: ChannelFirstProblem) -> int:
    """Channels dealt to a thread at a time: one, or a whole NVFP4 scale block (its amax, scale and codes then
    stay in the thread: no exchange between threads before the block is encoded)."""
    return NVFP4_BLOCK if p.nvfp4 else 1


def channels_per_thread(p: ChannelFirstProblem, cfg: ChannelFirstConfig) -> int:
    u = channel_unit(p)
    return u * -(-(p.C // u) // channel_groups(p, cfg))


def fp4_lane_pitch(p: ChannelFirstProblem, cfg: ChannelFirstConfig) -> tuple[int, int]:
    """Shared-memory pitches (in units: 8-byte code words, scale bytes) between one lane's rows of the NVFP4
    staging tiles. Unit (lane, block, i) of position lane*v + i sits at ((i * blocks + block) * pitch + lane):
    the lanes of a warp store adjacent units (conflict-free), and the row-major read-out, which walks
    (i, block) with the lane fixed, strides by the pitch: odd for the 8-byte words (16 distinct 8-byte bank
    pairs per half warp), 4 mod 8 for the bytes (32 distinct 4-byte banks per warp)."""
    ln = lanes(p, cfg)
    return (ln + 1 if ln > 1 else 1), ln + (4 - ln % 8) % 8


def fp4_staging_bytes(p: ChannelFirstProblem, cfg: ChannelFirstConfig) -> tuple[int, int]:
    """(codes, scales) bytes of the NVFP4 staging tiles in shared memory (0, 0 for other formats)."""
    if not p.nvfp4:
        return 0, 0
    v, nb = vec_elems(p, cfg), p.C // NVFP4_BLOCK
    wp, bp = fp4_lane_pitch(p, cfg)
    return v * nb * wp * 8, v * nb * bp


def warp_groups(p: ChannelFirstProblem, cfg: ChannelFirstConfig) -> int:
    """Channel groups inside one warp (lanes < 32): their partial sums meet by shuffles, not smem."""
    return min(channel_groups(p, cfg), max(1, 32 // lanes(p, cfg)))


def reduction_slots(p: ChannelFirstProblem, cfg: ChannelFirstConfig) -> int:
    """Partial sums per position that meet in shared memory (1: no shared-memory reduction)."""
    return channel_groups(p, cfg) // warp_groups(p, cfg)


def smem_bytes(p: ChannelFirstProblem, cfg: ChannelFirstConfig) -> int:
    total = 64
    if reduction_slots(p, cfg) > 1:
        total += reduction_slots(p, cfg) * cfg.positions_per_cta * 4
    if cfg.stage == "smem":
        total += p.C * cfg.positions_per_cta * ELEM_BYTES[p.in_dtype]
    if p.nvfp4:
        codes, scales = fp4_staging_bytes(p, cfg)
        total += codes + scales + 32  # each tile 16-byte aligned
    return total


def _gcd_all(*vals: int) -> int:
    g = 0
    for v in vals:
        g = math.gcd(g, int(v))
    return g


def violations(p: ChannelFirstProblem, cfg: ChannelFirstConfig, arch: int = 90, stride_gcd: int | None = None,
               ptr_align: int = 16) -> list[str]:
    """Every reason `cfg` cannot run `p` on `arch` (empty = valid).

    stride_gcd: gcd (elements) of S and the C and N strides of x and y; default S (contiguous [N, C, S]).
    ptr_align: the pointers' alignment in bytes of x (an fp8 y's alignment counts twice, as in ops)."""
    why = cfg.off_choices(CF_KNOB_CHOICES)
    if why:
        return why
    v = vec_elems(p, cfg)
    if v < 1:
        return [f"vec_bytes={cfg.vec_bytes} is smaller than one {p.in_dtype} element"]
    g = p.S if stride_gcd is None else stride_gcd
    if g % v:
        why.append(f"S and the strides (gcd {g}) are not multiples of the vector ({v} elements): vectors along S "
                   f"would straddle channels or lose alignment")
    if ptr_align % cfg.vec_bytes:
        why.append(f"pointers aligned to {ptr_align} B cannot take {cfg.vec_bytes}-byte vectors")
    if cfg.positions_per_cta % v:
        why.append(f"positions_per_cta={cfg.positions_per_cta} is not a multiple of the vector ({v})")
        return why
    ln = lanes(p, cfg)
    if ln > cfg.threads or cfg.threads % ln:
        why.append(f"positions_per_cta / vector = {ln} lanes do not divide threads={cfg.threads}")
        return why
    groups = channel_groups(p, cfg)
    if p.nvfp4 and groups > _pow2_ceil(p.C // NVFP4_BLOCK):
        # whole blocks per group and a power of two of groups: up to the next power of two above the block
        # count some groups idle (C=96: 8 groups for 6 blocks, against 4 groups holding 2 blocks each, 243
        # registers per thread at 4 positions on sm_90a); beyond it at least half of them would
        why.append(f"{groups} channel groups > {_pow2_ceil(p.C // NVFP4_BLOCK)} (the power of two above "
                   f"{p.C // NVFP4_BLOCK} NVFP4 blocks of 16 channels): idle threads")
    elif groups > p.C:
        why.append(f"{groups} channel groups > C={p.C}: idle threads")
    if cfg.threads > 32 and cfg.positions_per_cta > v and cfg.positions_per_cta >= 2 * max(p.S, 1):
        why.append(f"positions_per_cta={cfg.positions_per_cta} is over twice S={p.S}: idle lanes "
                   f"(only a one-warp CTA may idle)")
    iters = channels_per_thread(p, cfg)
    if cfg.stage == "reg":
        if iters * v > MAX_REG_VALUES_PER_THREAD or iters * v * cfg.threads > REG_VALUES_BUDGET:
            why.append(f"{iters} channels x {v} positions per thread x {cfg.threads} threads do not fit in "
                       f"registers (<= {MAX_REG_VALUES_PER_THREAD} per thread, {REG_VALUES_BUDGET} per CTA); "
                       f"use more threads, fewer positions or stage=smem")
    else:
        if cfg.vec_bytes < 4:
            why.append("stage=smem copies with cp.async, which moves 4, 8 or 16 bytes")
        if iters > MAX_SMEM_ITERS:
            why.append(f"{iters} channels per thread > {MAX_SMEM_ITERS} (compile-time unrolled loop)")
        if p.nvfp4 and NVFP4_BLOCK * v > MAX_REG_VALUES_PER_THREAD:  # one scale block's 16 vectors at a time
            why.append(f"an NVFP4 block of {NVFP4_BLOCK} channels x {v} positions does not fit in registers")
    if smem_bytes(p, cfg) > MAX_SMEM_BYTES:
        why.append(f"needs {smem_bytes(p, cfg)} B shared memory > {MAX_SMEM_BYTES}")
    if cfg.pdl and arch < 90:
        why.append("programmatic dependent launch needs SM90+")
    if p.N > MAX_GRID_Y:
        why.append(f"N={p.N} > {MAX_GRID_Y} (the grid's y extent)")
    return why


def is_valid(p: ChannelFirstProblem, cfg: ChannelFirstConfig, arch: int = 90, stride_gcd: int | None = None,
             ptr_align: int = 16) -> bool:
    return not violations(p, cfg, arch, stride_gcd, ptr_align)


def simplicity(cfg: ChannelFirstConfig, heur: ChannelFirstConfig) -> tuple:
    """Tie-break sort key, smaller = simpler: the heuristic itself, then register staging, no programmatic
    dependent launch, the interleaved channel walk, fewer threads."""
    return (cfg != heur, cfg.stage != "reg", cfg.pdl, cfg.c_order != "interleaved", cfg.threads)


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


SM_COUNT_GUESS = 132  # H100/H200 SXM; only shapes the grid of small problems
SMALL_PROBLEM_BYTES = 32 << 20  # PDL below this (launch latency dominates); the row family measured 100 MB, not re-measured here
# Values of x per thread the heuristic keeps in registers: half the constraint's cap. The fp32 copies of x
# stay live across the reduction barrier, so 12 channels x 8 positions took 185 registers per thread
# (C=96, t256/p256, sm_90a cubin) against 64 for 6 x 8 (t512/p256): two 512-thread CTAs per SM instead of one.
HEURISTIC_REG_VALUES = 64
HEURISTIC_MAX_THREADS = 256
SMEM_TILE_TARGET = 96 << 10  # staged tile per CTA: two CTAs per SM keep ~190 KB of loads in flight


def max_vec_bytes(p: ChannelFirstProblem, stride_gcd: int | None = None, ptr_align: int = 16) -> int:
    """Widest vector along S that every channel's positions stay aligned for."""
    e = ELEM_BYTES[p.in_dtype]
    g = p.S if stride_gcd is None else stride_gcd
    for vb in (16, 8, 4, 2):
        if vb >= e and (g % (vb // e) == 0) and ptr_align % vb == 0:
            return vb
    return e


def heuristic(p: ChannelFirstProblem, arch: int = 90, stride_gcd: int | None = None,
              ptr_align: int = 16) -> ChannelFirstConfig:
    """A valid config for any C up to ~32K (more with aligned S) and any S, from the shape alone.

    The op is pure bandwidth: every element is read once and written once, and a position's C channels are
    S elements apart, so a load can only be wide along S. Hence:
    1. The widest vector along S the alignment allows (16 B = 8 bf16 positions): coalesced warp loads of
       lanes x 16 B per channel.
    2. Registers hold the C x positions tile (x is read once): per thread HEURISTIC_REG_VALUES (64) values,
       so C is split over groups = C / (64 / v) threads per position (a power of two); per CTA at most
       REG_VALUES_BUDGET values, so positions_per_cta = 32768 / C (C=96: 256, C=384: 64, C=1024: 32).
    3. At most one warp of lanes per channel (a 512-byte run per load at 16 B vectors); fewer lanes when the
       budget says so, but never below a 32-byte sector per channel per warp.
    4. Small grids (< 2 CTAs per SM) trade positions per CTA for CTAs; PDL below 32 MB (the row kernel's
       former threshold; not re-measured here).
    5. When the register tile cannot fit a 32-byte run (C > ~2048 at 16 B vectors), stage it in shared memory
       instead (cp.async), sized for two CTAs per SM.
    6. NVFP4 deals whole 16-channel blocks (channel_unit), so a thread holds at least 16 channels: within the
       64-value budget of 2. that means 8-byte vectors (16 x 4 positions); 16-byte vectors (16 x 8 = 128
       values, the hard cap) only in the second, non-strict round. The shared-memory tile counts its codes and
       scales staging (C/2 + C/16 bytes per position) besides x.
    """
    e = ELEM_BYTES[p.in_dtype]
    pdl = arch >= 90 and ideal_bytes(p) < SMALL_PROBLEM_BYTES
    unit = channel_unit(p)
    units = p.C // unit  # channels, or NVFP4 blocks
    # bytes per position of a staged tile: x, and NVFP4's codes and scales staging
    pos_bytes = p.C * e + (p.C // 2 + p.C // NVFP4_BLOCK if p.nvfp4 else 0)

    def build(stage: str, vb: int, tile_bytes: int = 0, strict: bool = True) -> ChannelFirstConfig | None:
        v = vb // e
        cap = HEURISTIC_REG_VALUES if strict else MAX_REG_VALUES_PER_THREAD
        max_iters = max(1, cap // v) if stage == "reg" else MAX_SMEM_ITERS
        max_units = max_iters // unit if unit > 1 else max_iters
        if max_units < 1:  # not one NVFP4 block per thread within the budget
            return None
        # at most one group per channel (NVFP4: per block, up to the power of two above: violations)
        groups = min(_pow2_ceil(-(-units // max_units)), _pow2_ceil(units) if unit > 1 else _pow2_floor(units))
        iters = unit * -(-units // groups)
        if groups > 1024 or (stage == "reg" and iters * v > MAX_REG_VALUES_PER_THREAD):
            return None
        # positions the tile may hold: the CTA register budget, or the staged tile's bytes
        tile = REG_VALUES_BUDGET // (iters * groups) if stage == "reg" else tile_bytes // pos_bytes
        if tile < v:
            return None
        # one warp of lanes per channel at most (a 512-byte run at 16 B); 2-byte vectors take up to 256
        # lanes, since with v=1 more lanes mean fewer groups to reduce over
        ln = _pow2_floor(min(32 if v > 1 else 256, tile // v))
        min_lanes = max(1, MIN_SEGMENT_BYTES // vb)
        if strict and ln < min_lanes:  # a warp would fetch half sectors: try another staging first
            return None
        while ln * groups < 128 and 2 * ln * v <= tile:  # >= 4 warps per CTA where the tile allows
            ln *= 2
        # <= 256 threads: ~80-128 registers per thread at 6-8 channels x 8 positions (sm_90a ptxas) fit three
        # 256-thread CTAs per SM, against one 512-thread CTA
        while ln > 1 and ln * groups > HEURISTIC_MAX_THREADS:
            ln //= 2
        while ln > 1 and ln * v >= 2 * max(p.S, 1):  # tiny S: no idle lanes
            ln //= 2
        # few CTAs: more, smaller CTAs for the SMs, but not below a 32-byte sector per channel and warp
        while ln > min_lanes and p.positions and p.N * -(-p.S // (ln * v)) < 2 * SM_COUNT_GUESS:
            ln //= 2
        while ln * groups < 32 and 2 * groups <= units:  # a whole warp at least: more groups, fewer channels
            groups *= 2
        while ln * groups < 32:
            ln *= 2
        return ChannelFirstConfig(threads=ln * groups, positions_per_cta=ln * v, vec_bytes=vb, stage=stage,
                                  pdl=pdl)

    widest = max_vec_bytes(p, stride_gcd, ptr_align)
    tries = []
    for strict in (True, False):  # full 32-byte sectors per channel first; then anything that runs
        vbs = [b for b in (16, 8, 4, 2) if e <= b <= widest]
        if p.nvfp4:  # registers at a narrower vector before a staged tile (6.)
            tries += [build("reg", vb, strict=strict) for vb in vbs]
        for vb in vbs:
            if not p.nvfp4:
                tries += [build("reg", vb, strict=strict)]
            if vb >= 4:
                tries += [build("smem", vb, SMEM_TILE_TARGET, strict), build("smem", vb, MAX_SMEM_BYTES - 8192, strict)]
    for cfg in tries:
        if cfg is None:
            continue
        for c in (cfg, ChannelFirstConfig(**{**cfg.as_dict(), "pdl": False})):
            if is_valid(p, c, arch, stride_gcd, ptr_align):
                return c
    raise ValueError(f"no valid channel-first config for {p} (stride gcd {stride_gcd}, {ptr_align}-byte aligned): "
                     f"C is too large for one CTA's registers or shared memory")


# --------------------------------------------------------------------------- reference
def reference(x: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None = None, eps: float | None = None,
              mode: str = "rms", *, silu: bool = False) -> torch.Tensor:
    """float64 reference over dim 1 of x [B, C, *spatial] (any strides, any float dtype).

    mode "rms": x * rsqrt(mean_c(x^2) + eps) * gamma (+ bias); mode "l2": F.normalize's semantics,
    x / max(||x||, eps) * sqrt(C) * gamma (+ bias). gamma / bias: C elements of any shape (WanRMS_norm's
    (C, 1, 1[, 1]) included). silu: y * sigmoid(y) afterwards. eps None: 1e-6 (rms) or 1e-12 (l2)."""
    if mode not in ("rms", "l2"):
        raise ValueError(f"mode must be 'rms' or 'l2', got {mode!r}")
    if x.dim() < 2:
        raise ValueError(f"x must be [B, C, *spatial], got shape {tuple(x.shape)}")
    eps = (F_NORMALIZE_EPS if mode == "l2" else RMS_EPS) if eps is None else float(eps)
    C = x.shape[1]
    bshape = (1, C) + (1,) * (x.dim() - 2)
    s = x.to(torch.float64)
    if mode == "rms":
        y = s * torch.rsqrt(s.square().mean(dim=1, keepdim=True) + eps)
    else:
        y = s / s.square().sum(dim=1, keepdim=True).sqrt().clamp_min(eps) * math.sqrt(C)
    y = y * gamma.reshape(bshape).to(torch.float64)
    if bias is not None:
        y = y + bias.reshape(bshape).to(torch.float64)
    if silu:
        y = y * torch.sigmoid(y)
    return y


def channels_last_rows(y: torch.Tensor) -> torch.Tensor:
    """y [B, C, *spatial] as [positions, C] rows, positions in the (n, s) order of the [N, C, S] view (the
    order of the non-C dims): what the NVFP4 output holds."""
    return y.movedim(1, -1).reshape(-1, y.shape[1])


def expected_output(p: ChannelFirstProblem, x, gamma, bias=None, eps: float | None = None,
                    scale: float = 1.0, global_scale: torch.Tensor | None = None):
    """What the kernel should write for `p`: fp32 values (bf16/fp16 outputs, compare with kernels/check.py's
    tolerances) or a float8_e4m3fn tensor (codes <= 1 apart) from the float64 reference rounded to fp32.

    NVFP4: (codes, block_scale) of encoders.quantize_nvfp4 on the fp32 reference's channels-last rows
    (`global_scale` as rmsnorm_fp4quant's), both uint8: packed codes [positions, C/2] and the scales
    [positions, C/16], or flat in the 128x4-swizzled layout (zero padding) for scale_layout "swizzled"."""
    from . import encoders

    y = reference(x, gamma, bias, eps, "l2" if p.l2norm else "rms", silu=p.silu).to(torch.float32)
    if p.out_format == "fp8":
        return encoders.quantize_fp8_static(y, float(scale))
    if p.nvfp4:
        gs = None if global_scale is None else global_scale.detach().to(y.device, torch.float32)
        codes, sf = encoders.quantize_nvfp4(channels_last_rows(y), gs)
        return codes, (encoders.swizzle_scales(sf) if p.scale_layout == "swizzled" else sf)
    return y


def torch_channel_first(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        eps: float | None = None, silu: bool = False, l2norm: bool = False) -> torch.Tensor:
    """The op in plain torch (fp32 maths, one rounding to x's dtype): the CPU / fallback path of the WAN patch."""
    eps = (F_NORMALIZE_EPS if l2norm else RMS_EPS) if eps is None else float(eps)
    C = x.shape[1]
    bshape = (1, C) + (1,) * (x.dim() - 2)
    s = x.float()
    if l2norm:
        y = torch.nn.functional.normalize(s, dim=1, eps=eps) * math.sqrt(C)
    else:
        y = s * torch.rsqrt(s.square().mean(dim=1, keepdim=True) + eps)
    y = y * weight.reshape(bshape).float()
    if bias is not None:
        y = y + bias.reshape(bshape).float()
    if silu:
        y = torch.nn.functional.silu(y)
    return y.to(x.dtype)


# --------------------------------------------------------------------------- compile
# Mirrors kernels/compile_cache.compile_kernel / get_compiled (and shares its lock, arch names and disk cache
# directory): no GPU needed, fake pointers carry the signature, TVM-FFI host functions.
_CF_CACHE_VERSION = "1"
# the kernel's inputs (norm_kernel.py: the NVFP4 scale and e2m1 device helpers it borrows)
_CF_SOURCES = ("channel_first_kernel.py", "channel_first.py", "problem.py", "config.py", "norm_kernel.py", "pdl.py")
_COMPILES = 0


def compile_count() -> int:
    """Channel-first kernels compiled by this process (not loaded from the disk cache)."""
    return _COMPILES


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """The family's source version (kernels.compile_cache.files_hash of _CF_SOURCES)."""
    from .compile_cache import files_hash

    return files_hash(_CF_SOURCES)


def canonical(p: ChannelFirstProblem) -> ChannelFirstProblem:
    """The compile-relevant part (N, S dynamic; kept at 0)."""
    return ChannelFirstProblem(0, p.C, 0, p.in_dtype, p.out_format, p.silu, p.bias, p.l2norm, p.scale_layout)


def cache_key(p: ChannelFirstProblem, cfg: ChannelFirstConfig, arch: str) -> str:
    raw = repr((_CF_CACHE_VERSION, p.static_key, sorted(cfg.as_dict().items()), arch, source_hash()))
    return "cf" + hashlib.sha256(raw.encode()).hexdigest()[:22]


def _fake_args(p: ChannelFirstProblem, cfg: ChannelFirstConfig):
    """Compile-time stand-ins for ChannelFirstKernel.__call__'s arguments."""
    import cutlass
    from cutlass.base_dsl.enums import AddressSpace
    from cutlass.cute.runtime import make_fake_stream, nullptr

    dt = {"bf16": cutlass.BFloat16, "fp16": cutlass.Float16}[p.in_dtype]
    v = vec_elems(p, cfg)

    def ptr(dtype, align):
        return nullptr(dtype, AddressSpace.gmem, assumed_align=align)

    x = ptr(dt, cfg.vec_bytes)
    w = ptr(dt, ELEM_BYTES[p.in_dtype])
    b = ptr(dt, ELEM_BYTES[p.in_dtype]) if p.bias else None
    i32, i64 = cutlass.Int32(0), cutlass.Int64(0)
    stream = make_fake_stream(use_tvm_ffi_env_stream=False)
    if p.nvfp4:  # ChannelFirstNvfp4Kernel.__call__: codes (8-byte stores), scales, global scale
        y = ptr(cutlass.Uint8, FP4_STORE_BYTES)
        sf = ptr(cutlass.Uint8, 4 if p.scale_layout == "swizzled" else 1)
        gs = ptr(cutlass.Float32, 4)
        return (x, w, b, y, sf, gs, i32, i32, i64, i64, i64, i64, cutlass.Float32(1e-6), stream)
    y = ptr(cutlass.Float8E4M3FN if p.out_format == "fp8" else dt, v * ELEM_BYTES[p.out_format])
    return (x, w, b, y, i32, i32, i64, i64, i64, i64, cutlass.Float32(1e-6), cutlass.Float32(1.0), stream)


def compile_channel_first(p: ChannelFirstProblem, cfg: ChannelFirstConfig, arch: str):
    """Compile one config for `arch` ("sm_90a", "sm_100a") as a TVM-FFI function, no GPU needed. ValueError for
    a config the constraints reject (S's divisibility is not checked: S is runtime), KernelCompileError when
    the DSL fails."""
    global _COMPILES
    from .channel_first_kernel import ChannelFirstKernel, ChannelFirstNvfp4Kernel, ChannelFirstSpec
    from .compile_cache import arch_number, compile_dsl

    sm = arch_number(arch)
    cp = canonical(p)
    # S, N are runtime: judge the config for an S the vector divides
    why = violations(ChannelFirstProblem(1, p.C, 1 << 20, p.in_dtype, p.out_format, p.silu, p.bias, p.l2norm,
                                         p.scale_layout), cfg, sm)
    if why:
        raise ValueError(f"invalid config {cfg.short()} for {p}: {'; '.join(why)}")
    kernel = (ChannelFirstNvfp4Kernel if p.nvfp4 else ChannelFirstKernel)(ChannelFirstSpec(cp, cfg, sm))
    layout = "/swz" if p.scale_layout == "swizzled" else ""
    compiled = compile_dsl(kernel, _fake_args(cp, cfg), arch, f"{p.op}/{p.out_format}{layout} C={p.C} {cfg.short()}")
    _COMPILES += 1
    return compiled


def get_compiled(p: ChannelFirstProblem, cfg: ChannelFirstConfig, arch: str):
    """The launchable tvm_ffi.Function for (p, cfg, arch), cached as the row kernels' are
    (compile_cache.cached_function; keys prefixed "cf"). Arguments: ChannelFirstKernel.__call__'s
    (ChannelFirstNvfp4Kernel.__call__'s for NVFP4), pointers as ints (bias None when p.bias is False)."""
    from .compile_cache import cached_function

    return cached_function(cache_key(p, cfg, arch), arch, lambda: compile_channel_first(p, cfg, arch))


def precompile(p: ChannelFirstProblem, cfg: ChannelFirstConfig, arch: str):
    """Compile into the disk cache (idempotent): a compile_cache.CompileInfo, as for the row kernels."""
    from .compile_cache import precompile_key

    return precompile_key(cache_key(p, cfg, arch), lambda: compile_channel_first(p, cfg, arch))


# --------------------------------------------------------------------------- compile check (CPU)
def compile_check_cases(arch: str = "sm_90a", configs: int = 2, seed: int = 0) -> list[tuple]:
    """(problem, config) pairs `lutforge compile-check` compiles without a GPU: the heuristic config plus
    `configs` random valid ones of every WAN decoder norm problem and of a spread of C x (aligned, odd S) x
    fused variants (a config the constraints admit that fails to compile is a kernel bug)."""
    import random

    from .compile_cache import arch_number

    sm = arch_number(arch)
    problems = {}
    from .wan_vae_norm_shapes import WAN_VAE_NORM_SHAPES, wan_vae_problems

    for key in WAN_VAE_NORM_SHAPES:
        for p, _ in wan_vae_problems(*key):
            problems.setdefault((p.static_key, p.S % 16 == 0), p)
    for C in (1, 3, 64, 96, 160, 192, 384, 1000, 1024, 4096, 16384):
        for S, silu, bias, l2, fmt in ((6240, True, False, True, "bf16"), (24961, False, True, False, "fp8")):
            p = ChannelFirstProblem(1, C, S, "bf16", fmt, silu, bias, l2)
            problems.setdefault((p.static_key, S % 16 == 0), p)
        if C % NVFP4_BLOCK == 0:  # NVFP4: both scale layouts, the WAN form and plain RMSNorm + bias
            for S, silu, bias, l2, layout in ((6240, True, False, True, "rowmajor"), (24961, False, True, False,
                                                                                      "swizzled")):
                p = ChannelFirstProblem(1, C, S, "bf16", "nvfp4", silu, bias, l2, layout)
                problems.setdefault((p.static_key, S % 16 == 0), p)
    rng = random.Random(seed)
    cases = []
    for p in problems.values():
        cfgs = [heuristic(p, sm)]
        for _ in range(3000):
            if len(cfgs) > configs:
                break
            c = ChannelFirstConfig(**{k: rng.choice(v) for k, v in CF_KNOB_CHOICES.items()})
            if c not in cfgs and is_valid(p, c, sm) and channels_per_thread(p, c) <= 64:
                cfgs.append(c)
        cases += [(p, cfg) for cfg in cfgs]
    return cases
