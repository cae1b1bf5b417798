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

Memory view: x is walked as [N, C, S]: S positions along the innermost contiguous run of spatial dims,
C strided by sC, and N = every other dim (the batch and any spatial dims outside the contiguous run, e.g.
the frames of diffusers' permuted upsampler output) flattened to one stride sN.
"""
from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import MAX_REG_VALUES_PER_THREAD, MAX_SMEM_BYTES, REG_VALUES_BUDGET, Knobs
from .problem import ELEM_BYTES

IN_DTYPES = ("bf16", "fp16")
OUT_FORMATS = ("bf16", "fp16", "fp8")
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
    # the row family's key columns, at the values that mean "not applicable" (results and tables share them)
    scale_layout = "rowmajor"
    heads = 1

    def __post_init__(self):
        if self.in_dtype not in IN_DTYPES:
            raise ValueError(f"in_dtype must be one of {IN_DTYPES}, got {self.in_dtype!r}")
        if self.out_format not in (self.in_dtype, "fp8"):
            raise ValueError(f"out_format must be {self.in_dtype!r} or 'fp8', got {self.out_format!r}")
        if self.N < 0 or self.S < 0 or self.C < 1:
            raise ValueError(f"need N >= 0, S >= 0, C >= 1; got N={self.N} C={self.C} S={self.S}")

    @property
    def op(self) -> str:
        """A name for sweep/LUT keys: the row family's op names with a channel-first prefix."""
        return ("cf_l2norm" if self.l2norm else "cf_rmsnorm") + ("_silu" if self.silu else "") \
            + ("_bias" if self.bias else "")

    @classmethod
    def from_op(cls, op: str, N: int, C: int, S: int, in_dtype: str = "bf16",
                out_format: str | None = None) -> "ChannelFirstProblem":
        """The problem an op name (OPS) stands for; out_format None = in_dtype."""
        if op not in OPS:
            raise ValueError(f"unknown channel-first op {op!r}; known: {', '.join(OPS)}")
        return cls(N, C, S, in_dtype, out_format or in_dtype, silu="_silu" in op, bias=op.endswith("_bias"),
                   l2norm=op.startswith("cf_l2norm"))

    @property
    def positions(self) -> int:
        return self.N * self.S

    @property
    def static_key(self) -> tuple:
        """What a compiled kernel depends on (N and S are runtime)."""
        return (self.C, self.in_dtype, self.out_format, self.silu, self.bias, self.l2norm)


def ideal_bytes(p: ChannelFirstProblem) -> int:
    """Each element of x read once and of y written once, plus the weight (and bias)."""
    e = ELEM_BYTES[p.in_dtype]
    n = p.N * p.C * p.S
    return n * e + n * ELEM_BYTES[p.out_format] + p.C * e * (2 if p.bias else 1)


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


@dataclass(frozen=True)
class ChannelFirstConfig(Knobs):
    """Thread (lane, group) of a CTA owns positions [lane*v, lane*v+v) of the CTA's positions_per_cta and
    loops over its channels (C / groups of them); lanes = positions_per_cta / v, groups = threads / lanes."""

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


def channels_per_thread(p: ChannelFirstProblem, cfg: ChannelFirstConfig) -> int:
    return -(-p.C // channel_groups(p, cfg))


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
    if groups > p.C:
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
SMALL_PROBLEM_BYTES = 32 << 20  # kernels/config.py's PDL threshold (launch latency dominates below)
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
    4. Small grids (< 2 CTAs per SM) trade positions per CTA for CTAs; PDL below 32 MB, as the row kernel.
    5. When the register tile cannot fit a 32-byte run (C > ~2048 at 16 B vectors), stage it in shared memory
       instead (cp.async), sized for two CTAs per SM.
    """
    e = ELEM_BYTES[p.in_dtype]
    pdl = arch >= 90 and ideal_bytes(p) < SMALL_PROBLEM_BYTES

    def build(stage: str, vb: int, tile_bytes: int = 0, strict: bool = True) -> ChannelFirstConfig | None:
        v = vb // e
        cap = HEURISTIC_REG_VALUES if strict else MAX_REG_VALUES_PER_THREAD
        max_iters = max(1, cap // v) if stage == "reg" else MAX_SMEM_ITERS
        groups = min(_pow2_ceil(-(-p.C // max_iters)), _pow2_floor(p.C))
        iters = -(-p.C // groups)
        if groups > 1024 or (stage == "reg" and iters * v > MAX_REG_VALUES_PER_THREAD):
            return None
        # positions the tile may hold: the CTA register budget, or the staged tile's bytes
        tile = REG_VALUES_BUDGET // (iters * groups) if stage == "reg" else tile_bytes // (p.C * e)
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
        while ln * groups < 32 and 2 * groups <= p.C:  # a whole warp at least: more groups, fewer channels
            groups *= 2
        while ln * groups < 32:
            ln *= 2
        return ChannelFirstConfig(threads=ln * groups, positions_per_cta=ln * v, vec_bytes=vb, stage=stage,
                                  pdl=pdl)

    widest = max_vec_bytes(p, stride_gcd, ptr_align)
    tries = []
    for strict in (True, False):  # full 32-byte sectors per channel first; then anything that runs
        for vb in [b for b in (16, 8, 4, 2) if e <= b <= widest]:
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


def expected_output(p: ChannelFirstProblem, x, gamma, bias=None, eps: float | None = None,
                    scale: float = 1.0) -> torch.Tensor:
    """What the kernel should write for `p`: fp32 values (bf16/fp16 outputs, compare with kernels/check.py's
    tolerances) or a float8_e4m3fn tensor (codes <= 1 apart) from the float64 reference rounded to fp32."""
    from . import encoders

    y = reference(x, gamma, bias, eps, "l2" if p.l2norm else "rms", silu=p.silu).to(torch.float32)
    if p.out_format == "fp8":
        return encoders.quantize_fp8_static(y, float(scale))
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
_CF_SOURCES = ("channel_first_kernel.py", "channel_first.py", "problem.py", "config.py")  # the kernel's inputs
_COMPILES = 0


def compile_count() -> int:
    """Channel-first kernels compiled by this process (not loaded from the disk cache)."""
    return _COMPILES


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in _CF_SOURCES:
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def canonical(p: ChannelFirstProblem) -> ChannelFirstProblem:
    """The compile-relevant part (N, S dynamic; kept at 0)."""
    return ChannelFirstProblem(0, p.C, 0, p.in_dtype, p.out_format, p.silu, p.bias, p.l2norm)


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
    y = ptr(cutlass.Float8E4M3FN if p.out_format == "fp8" else dt, v * ELEM_BYTES[p.out_format])
    i32, i64 = cutlass.Int32(0), cutlass.Int64(0)
    return (x, w, b, y, i32, i32, i64, i64, i64, i64, cutlass.Float32(1e-6), cutlass.Float32(1.0),
            make_fake_stream(use_tvm_ffi_env_stream=False))


def compile_channel_first(p: ChannelFirstProblem, cfg: ChannelFirstConfig, arch: str):
    """Compile one config for `arch` ("sm_90a", "sm_100a") as a TVM-FFI function, no GPU needed. ValueError for
    a config the constraints reject (S's divisibility is not checked: S is runtime), KernelCompileError when
    the DSL fails."""
    global _COMPILES
    from .channel_first_kernel import ChannelFirstKernel, ChannelFirstSpec
    from .compile_cache import arch_number, compile_dsl

    sm = arch_number(arch)
    cp = canonical(p)
    # S, N are runtime: judge the config for an S the vector divides
    why = violations(ChannelFirstProblem(1, p.C, 1 << 20, p.in_dtype, p.out_format, p.silu, p.bias, p.l2norm),
                     cfg, sm)
    if why:
        raise ValueError(f"invalid config {cfg.short()} for {p}: {'; '.join(why)}")
    compiled = compile_dsl(ChannelFirstKernel(ChannelFirstSpec(cp, cfg, sm)), _fake_args(cp, cfg), arch,
                           f"{p.op}/{p.out_format} C={p.C} {cfg.short()}")
    _COMPILES += 1
    return compiled


def get_compiled(p: ChannelFirstProblem, cfg: ChannelFirstConfig, arch: str):
    """The launchable tvm_ffi.Function for (p, cfg, arch), cached as the row kernels' are
    (compile_cache.cached_function; keys prefixed "cf"). Arguments: ChannelFirstKernel.__call__'s, pointers
    as ints (bias None when p.bias is False)."""
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
