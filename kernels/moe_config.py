"""Knobs, constraints and the analytical heuristic of the fused-MoE grouped GEMM (kernels/moe_kernel.py).

A fused-MoE call runs two grouped GEMMs (FC1, FC2); each is compiled for a `MoEGemmShape` (the layer, its
activation, K and N and the output dtype: everything but the routed rows) and launched with a
`MoEGemmConfig`:

* bm, bn, bk: the CTA tile (rows of one expert x output columns x the k-tile). bn counts output columns;
  a gated FC1 CTA reads 2*bn weight rows (gate and up).
* stages: cp.async pipeline depth (k-tiles in flight).
* warps_m, warps_n: the warp grid over the tile (each warp a 16x16 mma.sync patch per step).
* splits (FC2 only): split-K. The grid gets a third axis of `splits` CTAs per (m-tile, n-tile); split s
  sums over K elements [s*K/splits, (s+1)*K/splits) and writes its whole fp32 partial tile to its own
  slice of the per-pair output y [splits, pairs, H]; the per-token sum after the GEMM adds the splits and
  the token's top_k pairs in one fp32 reduction (deterministic, no atomics). FC1 cannot split: its fused
  activation (silu(g)*u, relu^2) needs the whole sum. The price is the partials: splits * pairs * H * 4
  bytes written by FC2 and read back by the sum instead of pairs * H * 4 (Mixtral-8x7B at T=1 with 2
  splits: 64 KB more against 66 MB of FC2 weights and scales; the ratio grows with the rows, see
  violations: splits > 1 is declared for decode tiles, bm <= 32, only).

The heuristic picks a decode tile (bm 16: at T <= 64 an expert sees a handful of rows, so the weights'
bytes decide the time) or a large-batch tile by the rows each touched expert receives; at decode it splits
FC2's K when the touched experts' tiles alone leave the GPU short of CTAs (split_heuristic).
"""
from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, replace

from .config import Knobs

LAYERS = ("fc1", "fc2")
OUT_DTYPES = ("bf16", "fp32")
SMEM_LIMIT = 227 * 1024  # bytes of shared memory a CTA may opt into on SM90
MAX_THREADS = 512

MOE_KNOB_CHOICES = {
    "bm": (16, 32, 64, 128),
    "bn": (16, 32, 64, 128),
    "bk": (64, 128, 256),
    "stages": (2, 3, 4, 5),
    "warps_m": (1, 2, 4),
    "warps_n": (1, 2, 4),
    "splits": (1, 2, 4, 8),
}
SPLIT_MAX_BM = 32  # splits > 1 only with decode tiles (see violations)


@dataclass(frozen=True)
class MoEGemmShape:
    layer: str  # fc1 | fc2
    activation: str  # silu (gated FC1) | relu2
    K: int  # reduction length: H for FC1, I for FC2
    N: int  # output columns: I for FC1 (per half when gated), H for FC2
    out_dtype: str = "bf16"
    quant_a: bool = False  # W4A4 FC1: NVFP4-fake-quantise the A rows (x) in the kernel
    quant_out: bool = False  # W4A4 FC1: NVFP4-fake-quantise the output (FC2's input) in the epilogue

    def __post_init__(self):
        if self.layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {self.layer!r}")
        if self.out_dtype not in OUT_DTYPES:
            raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {self.out_dtype!r}")
        if (self.quant_a or self.quant_out) and self.layer != "fc1":
            raise ValueError("only FC1 quantises (its input x and its output, FC2's input)")
        if self.K % 64 or self.N % 16 or self.K < 64 or self.N < 16:
            raise ValueError(f"need K a multiple of 64 and N of 16, got K={self.K} N={self.N}")

    @property
    def gated(self) -> bool:
        return self.layer == "fc1" and self.activation == "silu"


@dataclass(frozen=True)
class MoEGemmConfig(Knobs):
    bm: int = 64
    bn: int = 64
    bk: int = 64
    stages: int = 3
    warps_m: int = 2
    warps_n: int = 2
    splits: int = 1  # split-K (FC2 only): CTAs per output tile, each over K / splits

    def short(self) -> str:
        split = f" k{self.splits}" if self.splits != 1 else ""
        return f"{self.bm}x{self.bn}x{self.bk} s{self.stages} w{self.warps_m}x{self.warps_n}{split}"

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n


def smem_bytes(sh: MoEGemmShape, cfg: MoEGemmConfig) -> int:
    """Shared memory of one CTA (kernels/moe_kernel.py's allocations, 16-byte padded rows)."""
    nb = cfg.bn * (2 if sh.gated else 1)
    pad = cfg.bk + 8
    per_stage = cfg.bm * pad * 2 + nb * cfg.bk // 2 + nb * cfg.bk // 16
    return cfg.stages * per_stage + nb * pad * 2 + cfg.bm * (cfg.bn + 4) * 4 + 64


def accumulators_per_thread(sh: MoEGemmShape, cfg: MoEGemmConfig) -> int:
    return cfg.bm * cfg.bn * (2 if sh.gated else 1) // cfg.threads


def violations(sh: MoEGemmShape, cfg: MoEGemmConfig) -> list[str]:
    """Why `cfg` cannot run `sh` (empty = valid)."""
    out = []
    for k, choices in MOE_KNOB_CHOICES.items():
        if getattr(cfg, k) not in choices:
            out.append(f"{k}={getattr(cfg, k)} not in {choices}")
    if out:
        return out
    if cfg.bm % (16 * cfg.warps_m):
        out.append(f"bm={cfg.bm} must be a multiple of 16*warps_m={16 * cfg.warps_m}")
    if cfg.bn % (16 * cfg.warps_n):
        out.append(f"bn={cfg.bn} must be a multiple of 16*warps_n={16 * cfg.warps_n}")
    if sh.K % cfg.bk:
        out.append(f"K={sh.K} must be a multiple of bk={cfg.bk}")
    if sh.N % cfg.bn:
        out.append(f"N={sh.N} must be a multiple of bn={cfg.bn}")
    if cfg.splits != 1:
        if sh.layer != "fc2":
            out.append(f"splits={cfg.splits}: only FC2 splits K (FC1's fused activation needs the whole sum)")
        if sh.K % (cfg.bk * cfg.splits):
            out.append(f"K={sh.K} must be a multiple of bk*splits={cfg.bk * cfg.splits} (equal k-ranges)")
        # A split only pays where the grid is short of CTAs: at decode, where each touched expert's rows fit
        # one bm 16/32 tile and the grid is experts x N/bn whatever T is. Larger tiles come with more rows
        # (more m-tiles: more CTAs of their own), and the partials a split writes grow with bm: bm*bn*4 bytes
        # against bn*K/(2*splits) of weights read, i.e. 8*bm*splits/K of the weight traffic.
        if cfg.bm > SPLIT_MAX_BM:
            out.append(f"splits={cfg.splits} needs a decode tile (bm <= {SPLIT_MAX_BM}), got bm={cfg.bm}")
    if sh.quant_out and cfg.bn % 16:
        out.append(f"bn={cfg.bn}: a quantised output stores whole 16-element NVFP4 blocks")
    if cfg.threads > MAX_THREADS:
        out.append(f"{cfg.threads} threads > {MAX_THREADS}")
    if smem_bytes(sh, cfg) > SMEM_LIMIT:
        out.append(f"shared memory {smem_bytes(sh, cfg)} B > {SMEM_LIMIT} B")
    # fp32 accumulators beyond 128 per thread spill (255 registers, fragments and addresses besides)
    if accumulators_per_thread(sh, cfg) > 128:
        out.append(f"{accumulators_per_thread(sh, cfg)} accumulators per thread > 128")
    return out


def heuristic(sh: MoEGemmShape, rows_per_expert: float, experts_touched: float = 0.0) -> MoEGemmConfig:
    """A valid config from the rows each touched expert receives: decode tiles (bm 16, deep k-tiles to keep
    weight bytes in flight) up to 16 rows, mid tiles to 64, large tiles beyond; FC2's K split by
    split_heuristic when `experts_touched` (kernels.moe_problem.expected_experts_touched; 0: unknown, no
    split) leaves the grid short of CTAs."""
    if rows_per_expert <= 16:
        # 16x64x128 s3 with 4 warps first: on the H200 (results/h200/e2e/fused_moe_decode.md, both GEMMs forced
        # to each tile) it beat the 2-warp 16x32x256 s4 tile at T=1 and 64 of Qwen3-30B-A3B, Mixtral-8x7B and
        # DeepSeek-V3 in both modes by 1.03-1.95x (e.g. DeepSeek T=64 W4A16 4515 vs 6755 us), except Mixtral
        # T=64 W4A16 (32x32x128 s4 2x2 919 us, this tile 1008): the FP4 expansion is ALU work, and two warps
        # per CTA left too few warps per SM to issue it
        wants = [MoEGemmConfig(16, 64, 128, 3, 1, 4), MoEGemmConfig(16, 64, 64, 3, 1, 4),
                 MoEGemmConfig(16, 32, 256, 4, 1, 2), MoEGemmConfig(16, 16, 256, 4, 1, 1),
                 MoEGemmConfig(16, 32, 128, 4, 1, 2), MoEGemmConfig(16, 16, 64, 4, 1, 1)]
    elif rows_per_expert <= 64:
        wants = [MoEGemmConfig(64, 64, 128, 3, 2, 2), MoEGemmConfig(64, 32, 64, 3, 2, 2),
                 MoEGemmConfig(32, 16, 64, 3, 2, 1)]
    else:
        wants = [MoEGemmConfig(128, 64, 64, 4, 4, 2), MoEGemmConfig(128, 32, 64, 4, 4, 2),
                 MoEGemmConfig(64, 32, 64, 3, 2, 2), MoEGemmConfig(64, 16, 64, 3, 2, 1)]
    for cfg in wants + [MoEGemmConfig(16, 16, 64, 2, 1, 1)]:
        if not violations(sh, cfg):
            return with_splits(sh, cfg, rows_per_expert, experts_touched)
    raise ValueError(f"no valid config for {sh}")


# The split-K threshold. SM_COUNT is the H200's (132 SMs, as the H100 SXM's): the part the LUTs are swept on.
# A decode FC2 CTA keeps (stages - 1) * bk * bn / 2 bytes of FP4 weights in flight (12 KB, plus 1.5 KB of
# scales, for the decode tile 16x32x256 s4), while the copy roofline needs bandwidth x latency / SMs ~ 4.2 TB/s
# x ~1 us / 132 ~ 30 KB per SM in flight: two to three such CTAs per SM. A grid below SPLIT_MIN_CTAS_PER_SM *
# SM_COUNT CTAs is split (the smallest split reaching it, else the largest allowed), never below
# SPLIT_MIN_K_TILES k-tiles per split (a one-tile split has no pipeline left to overlap) and never past
# SPLIT_MAX_ROWS rows per expert (large batches have m-tiles enough, and each split's partials grow with the
# rows). These are assumptions of the copy model, not sweep results: benchmarks/fused_moe.py --splits times
# the chosen config at each split on the device, and the sweep searches fc2_splits like any knob.
SM_COUNT = 132
SPLIT_MIN_CTAS_PER_SM = 2
SPLIT_MIN_K_TILES = 2
SPLIT_MAX_ROWS = 16


def fc2_ctas(sh: MoEGemmShape, cfg: MoEGemmConfig, rows_per_expert: float, experts_touched: float) -> float:
    """Expected CTAs of the grid without splitting: the touched experts' m-tiles times N / bn (a call that
    runs at all touches at least one expert)."""
    m_tiles = max(1.0, experts_touched) * max(1, math.ceil(rows_per_expert / cfg.bm))
    return m_tiles * (sh.N // cfg.bn)


def split_heuristic(sh: MoEGemmShape, cfg: MoEGemmConfig, rows_per_expert: float, experts_touched: float) -> int:
    """FC2's split-K for the tile `cfg` (its splits ignored): 1 unless the unsplit grid has fewer than
    SPLIT_MIN_CTAS_PER_SM * SM_COUNT CTAs at decode (e.g. Mixtral-8x7B at T=1: 2 experts x 4096/32 = 256)."""
    if sh.layer != "fc2" or experts_touched <= 0 or rows_per_expert > SPLIT_MAX_ROWS or cfg.bm > SPLIT_MAX_BM:
        return 1
    ctas = fc2_ctas(sh, cfg, rows_per_expert, experts_touched)
    best = 1
    for s in MOE_KNOB_CHOICES["splits"][1:]:
        if ctas * best >= SPLIT_MIN_CTAS_PER_SM * SM_COUNT:
            break
        if sh.K // (cfg.bk * s) < SPLIT_MIN_K_TILES or violations(sh, replace(cfg, splits=s)):
            break
        best = s
    return best


def with_splits(sh: MoEGemmShape, cfg: MoEGemmConfig, rows_per_expert: float,
                experts_touched: float) -> MoEGemmConfig:
    return replace(cfg, splits=split_heuristic(sh, cfg, rows_per_expert, experts_touched))


# --------------------------------------------------------------------------- the family's config: both GEMMs
SHARED_KNOBS = ("bm", "stages")  # both GEMMs see the same rows per expert: one row tile, one pipeline depth
FC2_KNOBS = ("splits",)  # FC2's alone (FC1 cannot split K): no fc1_splits column
PER_GEMM_KNOBS = tuple(k for k in MOE_KNOB_CHOICES if k not in SHARED_KNOBS + FC2_KNOBS)
FAMILY_KNOB_CHOICES = {**{k: MOE_KNOB_CHOICES[k] for k in SHARED_KNOBS},
                       **{f"{layer}_{k}": MOE_KNOB_CHOICES[k] for layer in LAYERS for k in PER_GEMM_KNOBS},
                       **{f"fc2_{k}": MOE_KNOB_CHOICES[k] for k in FC2_KNOBS}}


@dataclass(frozen=True)
class MoEConfig(Knobs):
    """One fused-MoE call's knobs: the row tile and pipeline depth both GEMMs use, each GEMM's column
    tile, k-tile and warp grid, and FC2's split-K (crossing two full GEMM spaces made 462k valid configs
    per layer, too many to count or search; the LUT entries along T are the cut-overs between decode and
    large-batch tiles). Fields in FAMILY_KNOB_CHOICES order (fc2_splits last: it came last)."""

    bm: int = 64
    stages: int = 3
    fc1_bn: int = 64
    fc1_bk: int = 64
    fc1_warps_m: int = 2
    fc1_warps_n: int = 2
    fc2_bn: int = 64
    fc2_bk: int = 64
    fc2_warps_m: int = 2
    fc2_warps_n: int = 2
    fc2_splits: int = 1

    @classmethod
    def of(cls, fc1: MoEGemmConfig, fc2: MoEGemmConfig) -> "MoEConfig":
        if (fc1.bm, fc1.stages) != (fc2.bm, fc2.stages):
            raise ValueError(f"both GEMMs share bm and stages, got {fc1.short()} and {fc2.short()}")
        if fc1.splits != 1:
            raise ValueError(f"only FC2 splits K, got FC1 {fc1.short()}")
        return cls(fc1.bm, fc1.stages, **{f"fc1_{k}": getattr(fc1, k) for k in PER_GEMM_KNOBS},
                   **{f"fc2_{k}": getattr(fc2, k) for k in PER_GEMM_KNOBS + FC2_KNOBS})

    def gemm(self, layer: str) -> MoEGemmConfig:
        own = PER_GEMM_KNOBS + (FC2_KNOBS if layer == "fc2" else ())
        return MoEGemmConfig(bm=self.bm, stages=self.stages, **{k: getattr(self, f"{layer}_{k}") for k in own})

    def short(self) -> str:
        return f"fc1 {self.gemm('fc1').short()} | fc2 {self.gemm('fc2').short()}"


def gemm_shapes(quant_mode: str, activation: str, H: int, inter: int) -> tuple[MoEGemmShape, MoEGemmShape]:
    """(FC1, FC2) of a layer: FC1 writes bf16 (W4A4: x and the output fake-quantised to NVFP4 in the kernel);
    FC2 writes fp32 per pair (summed per token after)."""
    w4a4 = quant_mode == "nvfp4"
    return (MoEGemmShape("fc1", activation, H, inter, "bf16", quant_a=w4a4, quant_out=w4a4),
            MoEGemmShape("fc2", activation, inter, H, "fp32"))


def layer_violations(shapes: tuple[MoEGemmShape, MoEGemmShape], cfg: MoEConfig) -> list[str]:
    return [f"{sh.layer}: {v}" for sh in shapes for v in violations(sh, cfg.gemm(sh.layer))]


def layer_heuristic(shapes: tuple[MoEGemmShape, MoEGemmShape], rows_per_expert: float,
                    experts_touched: float = 0.0) -> MoEConfig:
    """FC1's heuristic tile; FC2's own, or (when its row tile or depth differs) the first valid unsplit FC2
    config with FC1's bm and stages, preferring FC2's heuristic column tile; then FC2's split-K for that tile
    (split_heuristic: needs `experts_touched`, kernels.moe_problem.expected_experts_touched; 0 = unknown,
    no split)."""
    c1, c2 = heuristic(shapes[0], rows_per_expert), heuristic(shapes[1], rows_per_expert)
    if (c2.bm, c2.stages) != (c1.bm, c1.stages):
        same = [c for c in valid_gemm_configs(shapes[1]) if (c.bm, c.stages, c.splits) == (c1.bm, c1.stages, 1)]
        if not same:
            raise ValueError(f"no FC2 config with bm={c1.bm} stages={c1.stages} for {shapes[1]}")
        c2 = min(same, key=lambda c: (c.bn != c2.bn, c.bk != c2.bk, c.threads != c2.threads, -c.bn, -c.bk))
    return MoEConfig.of(c1, with_splits(shapes[1], c2, rows_per_expert, experts_touched))


def simplicity(cfg: MoEConfig, heur: MoEConfig) -> tuple:
    """Tie-break among equally fast configs: the heuristic first, then fewer FC2 splits (less partial
    traffic and workspace), fewer stages and threads, smaller tiles (less shared memory: room for a
    neighbour kernel)."""
    g1, g2 = cfg.gemm("fc1"), cfg.gemm("fc2")
    return (cfg != heur, g2.splits, g1.stages + g2.stages, g1.threads + g2.threads,
            g1.bm * g1.bn * g1.bk + g2.bm * g2.bn * g2.bk)


@functools.lru_cache(maxsize=64)
def valid_gemm_configs(sh: MoEGemmShape) -> tuple[MoEGemmConfig, ...]:
    """Every valid config of one GEMM shape (counted once per shape: the heuristic and the family's search
    space both ask)."""
    out = []
    for combo in itertools.product(*MOE_KNOB_CHOICES.values()):
        cfg = MoEGemmConfig(**dict(zip(MOE_KNOB_CHOICES, combo)))
        if not violations(sh, cfg):
            out.append(cfg)
    return tuple(out)


def valid_layer_configs(shapes: tuple[MoEGemmShape, MoEGemmShape]) -> list[tuple]:
    """Every valid MoEConfig of a layer as knob tuples (FAMILY_KNOB_CHOICES order): per shared (bm, stages),
    the two GEMMs' valid configs crossed (their other constraints are independent). FC1's are unsplit; FC2's
    split ones (decode tiles bm 16/32, K a multiple of bk*splits) take the moe set's layers from 32,115 to
    68,007 (Mixtral-8x7B K=14336, DeepSeek-V3 K=2048: every split on bm 16/32) and 44,319 (Qwen3-30B-A3B
    K=768 = 3 * 256: fewer); K an odd number of 64-tiles (gpt-oss-120b 2880, the ReLU2 layer's 1856) allows
    no split (2,896 and 8,848, unchanged)."""
    fc1, fc2 = (valid_gemm_configs(sh) for sh in shapes)
    out = []
    for bm in MOE_KNOB_CHOICES["bm"]:
        for st in MOE_KNOB_CHOICES["stages"]:
            a = [c for c in fc1 if (c.bm, c.stages) == (bm, st)]
            b = [c for c in fc2 if (c.bm, c.stages) == (bm, st)]
            out += [(bm, st, *(getattr(x, k) for k in PER_GEMM_KNOBS), *(getattr(y, k) for k in PER_GEMM_KNOBS),
                     *(getattr(y, k) for k in FC2_KNOBS)) for x in a for y in b]
    return out
