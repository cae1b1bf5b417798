"""Knobs, constraints and the analytical heuristic of the fused-MoE grouped GEMM (kernels/moe_kernel.py,
kernels/moe_wgmma_kernel.py).

A fused-MoE call runs two grouped GEMMs (FC1, FC2); each is compiled for a `MoEGemmShape` (the layer, its
activation, K and N and the output dtype: everything but the routed rows) and launched with a
`MoEGemmConfig`:

* bm, bn, bk: the CTA tile (rows of one expert x output columns x the k-tile). bn counts output columns;
  a gated FC1 CTA reads 2*bn weight rows (gate and up).
* stages: cp.async pipeline depth (k-tiles in flight).
* warps_m, warps_n: the warp grid over the tile (each warp a 16x16 mma.sync patch per step).
* mma: the tensor-core instruction. "sync" (kernels/moe_kernel.py): each warp runs mma.sync 16x8x16 on
  its own patch of the tile. "wgmma" (kernels/moe_wgmma_kernel.py, SM90 only): warpgroups of four warps run
  asynchronous warpgroup MMAs (64 rows x bn/warpgroups columns per instruction) straight from shared memory,
  the bf16 B tile expanded into the other of two buffers while the previous k-tile's wgmma runs. mma.sync
  cannot reach Hopper's dense bf16 rate (the large batches ran at 16-30 % of torch.mm 8192^3 with it); the
  wgmma tiles are bm 64/128 only, with warps_m = 4 (one warpgroup's warps, 16 rows each of its 64) and
  warps_n the number of warpgroups (bm/64 along M, the rest along N), and never split K. "fma"
  (kernels/moe_gemv_kernel.py): no tensor core, a grouped GEMV on CUDA cores for decode m-tiles of bm 1-8
  rows; warps_n groups of bn / warps_n columns, warps_m groups along K; stages - 1 chunk rounds loaded
  together (stages 2 or 3), bk unused (64). At decode the mma.sync tile reads the weights at 9-26 % of the copy roofline, behind two barriers a k-tile.
* splits (FC2 only): split-K. The grid gets a third axis of `splits` CTAs per (m-tile, n-tile); split s
  sums over K elements [s*K/splits, (s+1)*K/splits) and writes its whole fp32 partial tile to its own
  slice of the per-pair output y [splits, pairs, H]; the per-token sum after the GEMM adds the splits and
  the token's top_k pairs in one fp32 reduction (deterministic, no atomics). FC1 cannot split: its fused
  activation (silu(g)*u, relu^2) needs the whole sum. The price is the partials: splits * pairs * H * 4
  bytes written by FC2 and read back by the sum instead of pairs * H * 4 (Mixtral-8x7B at T=1 with 2
  splits: 64 KB more against 66 MB of FC2 weights and scales; the ratio grows with the rows, see
  violations: splits > 1 is declared for decode tiles, bm <= 32, only).

The heuristic picks by the rows each touched expert receives: the CUDA-core GEMV to 1.5 rows (T=1-4), an
mma.sync decode tile (bm 16: at T <= 64 an expert sees a handful of rows, so the weights' bytes decide the
time) to 16, mid tiles to 64, the wgmma tiles beyond; at decode it splits FC2's K when the touched experts'
tiles alone leave the GPU short of CTAs (split_heuristic). GEMV_DECODE and WGMMA_LARGE_BATCH cite the
measurements that switched those backends on.
Constraints and heuristic take the SM they are for (`arch`, 90 by default): wgmma is SM90's alone.
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
    "bm": (1, 2, 4, 8, 16, 32, 64, 128),
    "bn": (16, 32, 64, 96, 128, 192, 256),
    "bk": (64, 128, 256),
    "stages": (2, 3, 4, 5),
    "warps_m": (1, 2, 4),
    "warps_n": (1, 2, 4),
    "splits": (1, 2, 4, 8),
    "mma": ("sync", "wgmma", "fma"),
}
SPLIT_MAX_BM = 32  # splits > 1 only with decode tiles (see violations)
# mma.sync's column tiles: the space its sweeps, LUT entries and heuristic were measured on. The wider and
# the 96-multiple widths are wgmma's (a warpgroup instruction takes up to 256 columns; 96 and 192 divide
# gpt-oss-120b's 2880, which no power of two above 64 does).
SYNC_BN = (16, 32, 64, 128)
WGMMA_ARCH = 90  # warpgroup MMA is SM90's (sm_90a); Blackwell's tensor cores take tcgen05 instead
WGMMA_WARPS_M = 4  # the four warps of a warpgroup, 16 rows each of its 64-row instruction
WGMMA_MIN_STAGES = 3  # a k-tile's buffers are refilled two tiles later, once its asynchronous wgmma retired
# mma="fma" (kernels/moe_gemv_kernel.py): decode m-tiles of at most GEMV_MAX_BM rows; each warp's weight rows
# (its bn / warps_n columns, with their up rows when gated) and rows x weight rows fp32 accumulators stay within
# what fits in registers beside the loaded chunks and their expansion (at 16 weight rows, or 2 x 16 accumulators
# with 16 rows, the compiled GEMV reached 237-255 registers on sm_90a; within 8 and 32 it takes 48-202, W4A4's
# activation quantisation the most)
GEMV_MAX_BM = 8
GEMV_MAX_ROWS = 8
GEMV_MAX_ACC = 32
GEMV_CHUNK = 32  # K elements per lane load (16 packed bytes): K must split into whole chunks per K split
# stages - 1: the chunk rounds whose loads a lane issues together (2: load a round, then use it; 3: two rounds
# per round trip); 6 registers per chunk and weight row, so two rounds of GEMV_MAX_ROWS at most
GEMV_STAGES = (2, 3)


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
    mma: str = "sync"  # "sync": per-warp mma.sync; "wgmma": SM90 warpgroup MMA (warps_n = warpgroups)

    def short(self) -> str:
        split = f" k{self.splits}" if self.splits != 1 else ""
        mma = f" {self.mma}" if self.mma != "sync" else ""
        return f"{self.bm}x{self.bn}x{self.bk} s{self.stages} w{self.warps_m}x{self.warps_n}{split}{mma}"

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    @property
    def warpgroups(self) -> tuple[int, int]:
        """wgmma: the warpgroups along M and along N (warps_n of them in all, bm/64 along M)."""
        wg_m = max(1, self.bm // 64)
        return wg_m, max(1, self.warps_n // wg_m)


def wgmma_smem_layout(sh: MoEGemmShape, cfg: MoEGemmConfig) -> tuple[dict[str, int], int]:
    """Byte offsets in the wgmma kernel's one shared-memory arena and its size (kernels/moe_wgmma_kernel.py
    carves its tensors out of it, so the two cannot drift): per stage the A tile (bf16, 128-byte swizzled
    rows), the packed weights and the scales; two expanded bf16 B tiles (the one wgmma reads, the one being
    written); the epilogue's fp32 staging tile (rows of bn + 8: conflict-free for the accumulator layout)
    overlays them all once the main loop is done. Sections 1024-byte aligned (the swizzle atom)."""
    nb = cfg.bn * (2 if sh.gated else 1)
    sizes = {"a": cfg.stages * cfg.bm * cfg.bk * 2, "b": 2 * nb * cfg.bk * 2,
             "w": cfg.stages * nb * cfg.bk // 2, "sf": cfg.stages * nb * cfg.bk // 16}
    offsets, at = {}, 0
    for name, n in sizes.items():
        offsets[name] = at
        at += -(-n // 1024) * 1024
    offsets["c"] = 0
    return offsets, max(at, cfg.bm * (cfg.bn + 8) * 4)


def smem_bytes(sh: MoEGemmShape, cfg: MoEGemmConfig) -> int:
    """Shared memory of one CTA (kernels/moe_kernel.py's allocations, 16-byte padded rows; the wgmma kernel's
    arena: wgmma_smem_layout)."""
    if cfg.mma == "wgmma":
        return wgmma_smem_layout(sh, cfg)[1]
    if cfg.mma == "fma":  # the K groups' sums per (row, weight row), and the quantised output's staging
        rows = cfg.bn * (2 if sh.gated else 1)
        return 4 * cfg.warps_m * cfg.bm * rows + (4 * cfg.bm * cfg.bn if sh.quant_out else 0) + 64
    nb = cfg.bn * (2 if sh.gated else 1)
    pad = cfg.bk + 8
    per_stage = cfg.bm * pad * 2 + nb * cfg.bk // 2 + nb * cfg.bk // 16
    return cfg.stages * per_stage + nb * pad * 2 + cfg.bm * (cfg.bn + 4) * 4 + 64


def accumulators_per_thread(sh: MoEGemmShape, cfg: MoEGemmConfig) -> int:
    if cfg.mma == "fma":  # every lane holds all of its warp's (row, weight row) sums
        return cfg.bm * gemv_rows(sh, cfg)
    return cfg.bm * cfg.bn * (2 if sh.gated else 1) // cfg.threads


def gemv_rows(sh: MoEGemmShape, cfg: MoEGemmConfig) -> int:
    """mma="fma": the weight rows one warp streams (its columns, and their up rows when gated)."""
    return cfg.bn // cfg.warps_n * (2 if sh.gated else 1)


def violations(sh: MoEGemmShape, cfg: MoEGemmConfig, arch: int = WGMMA_ARCH) -> list[str]:
    """Why `cfg` cannot run `sh` on SM `arch` (empty = valid)."""
    out = []
    for k, choices in MOE_KNOB_CHOICES.items():
        if getattr(cfg, k) not in choices:
            out.append(f"{k}={getattr(cfg, k)!r} not in {choices}")
    if out:
        return out
    if cfg.mma == "wgmma":
        return _wgmma_violations(sh, cfg, arch) + _tile_violations(sh, cfg) + _budget_violations(sh, cfg)
    if cfg.mma == "fma":
        return _gemv_violations(sh, cfg) + _tile_violations(sh, cfg) + _budget_violations(sh, cfg)
    if cfg.bn not in SYNC_BN:
        out.append(f"bn={cfg.bn} is a wgmma tile width; mma=sync takes bn in {SYNC_BN}")
    if cfg.bm % (16 * cfg.warps_m):
        out.append(f"bm={cfg.bm} must be a multiple of 16*warps_m={16 * cfg.warps_m}")
    if cfg.bn % (16 * cfg.warps_n):
        out.append(f"bn={cfg.bn} must be a multiple of 16*warps_n={16 * cfg.warps_n}")
    out += _tile_violations(sh, cfg)
    if cfg.splits != 1:
        if sh.K % (cfg.bk * cfg.splits):
            out.append(f"K={sh.K} must be a multiple of bk*splits={cfg.bk * cfg.splits} (equal k-ranges)")
        # A split only pays where the grid is short of CTAs: at decode, where each touched expert's rows fit
        # one bm 16/32 tile and the grid is experts x N/bn whatever T is. Larger tiles come with more rows
        # (more m-tiles: more CTAs of their own), and the partials a split writes grow with bm: bm*bn*4 bytes
        # against bn*K/(2*splits) of weights read, i.e. 8*bm*splits/K of the weight traffic.
        if cfg.bm > SPLIT_MAX_BM:
            out.append(f"splits={cfg.splits} needs a decode tile (bm <= {SPLIT_MAX_BM}), got bm={cfg.bm}")
    return out + _budget_violations(sh, cfg)


def _wgmma_violations(sh: MoEGemmShape, cfg: MoEGemmConfig, arch: int) -> list[str]:
    """The warpgroup-MMA backend's own constraints (kernels/moe_wgmma_kernel.py)."""
    out = []
    if arch != WGMMA_ARCH:
        out.append(f"mma=wgmma is SM90's warpgroup MMA (sm_90a only; sm_{arch} has none: Blackwell's tensor cores "
                   "take tcgen05); use mma=sync")
    if cfg.bm not in (64, 128):
        out.append(f"mma=wgmma tiles bm=64 (one warpgroup of 64 rows) or 128 (two along M), got bm={cfg.bm}")
        return out
    if cfg.warps_m != WGMMA_WARPS_M:
        out.append(f"mma=wgmma takes warps_m={WGMMA_WARPS_M} (a warpgroup's four warps, 16 rows each of its 64), "
                   f"got warps_m={cfg.warps_m}")
    wg_m = cfg.bm // 64
    if cfg.warps_n % wg_m:
        out.append(f"mma=wgmma: warps_n={cfg.warps_n} warpgroups cannot cover bm={cfg.bm} ({wg_m} along M)")
    else:
        wg_n = cfg.warps_n // wg_m
        if cfg.bn % (8 * wg_n) or cfg.bn // wg_n > 256:
            out.append(f"mma=wgmma: bn={cfg.bn} over {wg_n} warpgroups along N is not a wgmma width per warpgroup "
                       "(a multiple of 8, at most 256)")
    if cfg.stages < WGMMA_MIN_STAGES:
        out.append(f"mma=wgmma needs stages >= {WGMMA_MIN_STAGES} (a k-tile's buffers are refilled two tiles "
                   f"later, once its asynchronous wgmma has retired), got stages={cfg.stages}")
    if cfg.splits != 1:
        out.append(f"mma=wgmma does not split K (splits=1), got splits={cfg.splits}")
    return out


def _gemv_violations(sh: MoEGemmShape, cfg: MoEGemmConfig) -> list[str]:
    """The CUDA-core decode GEMV's own constraints (kernels/moe_gemv_kernel.py). It has no k-tile pipeline:
    bk takes one value (64) so that the search does not time one kernel under many names; stages - 1 counts
    the chunk rounds loaded together."""
    out = []
    if cfg.bm > GEMV_MAX_BM:
        out.append(f"mma=fma is the decode GEMV: bm <= {GEMV_MAX_BM} rows per m-tile, got bm={cfg.bm}")
    if cfg.stages not in GEMV_STAGES or cfg.bk != 64:
        out.append(f"mma=fma has no k-tile pipeline: stages in {GEMV_STAGES} (one more than the chunk rounds "
                   f"loaded together) and bk=64 (unused), got stages={cfg.stages} bk={cfg.bk}")
    if cfg.bn % cfg.warps_n:
        out.append(f"mma=fma: bn={cfg.bn} must split into warps_n={cfg.warps_n} equal column groups")
        return out
    rows = gemv_rows(sh, cfg)
    if rows > GEMV_MAX_ROWS:
        out.append(f"mma=fma: {rows} weight rows per warp > {GEMV_MAX_ROWS} (bn / warps_n columns"
                   + (", doubled for the gate and up rows)" if sh.gated else ")"))
    if cfg.bm * rows > GEMV_MAX_ACC:
        out.append(f"mma=fma: bm x weight rows = {cfg.bm * rows} accumulators per lane > {GEMV_MAX_ACC}")
    if sh.K % (GEMV_CHUNK * cfg.splits):
        out.append(f"mma=fma: K={sh.K} must be a multiple of {GEMV_CHUNK}*splits={GEMV_CHUNK * cfg.splits} "
                   "(whole 16-byte chunks per K split)")
    return out


def _tile_violations(sh: MoEGemmShape, cfg: MoEGemmConfig) -> list[str]:
    """Every backend walks whole tiles, and splits K only in FC2 (FC1's fused activation needs the whole sum)."""
    out = []
    if cfg.splits != 1 and sh.layer != "fc2":
        out.append(f"splits={cfg.splits}: only FC2 splits K (FC1's fused activation needs the whole sum)")
    if sh.K % cfg.bk:
        out.append(f"K={sh.K} must be a multiple of bk={cfg.bk}")
    if sh.N % cfg.bn:
        out.append(f"N={sh.N} must be a multiple of bn={cfg.bn}")
    return out


def _budget_violations(sh: MoEGemmShape, cfg: MoEGemmConfig) -> list[str]:
    """Constraints both backends share: whole NVFP4 output blocks, the thread, shared-memory and register
    budgets."""
    out = []
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


# The large-batch wgmma tiles (kernels/moe_wgmma_kernel.py), widest first: two warpgroups along M, 128
# accumulators per thread at most (gated FC1 at bn 128 holds gate and up: 2 x 64 x 128 / 128 threads each);
# 192 and 96 for N = 2880 (gpt-oss-120b), which no power of two above 64 divides. The heuristic prefers them
# for rows_per_expert > 64: at T=4096 they beat the 128x64x64 mma.sync tile on every layer and mode, 1.41-1.53x
# (H100 SXM, results/logs/moe_wgmma_h100.log: Qwen3-30B-A3B 2322 vs 3512 us NVFP4 and 1777 vs 2506 W4A16,
# Mixtral-8x7B 13984 vs 21972 and 10138 vs 14731, gpt-oss-120b 6069 vs 9065 and 3960 vs 6009, DeepSeek-V3
# 20987 vs 32038 NVFP4), and agreed with the reference in every GPU test (results/logs/
# moe_tests_wgmma_gemv_h100.log). WGMMA_LARGE_BATCH off restores the mma.sync tiles.
WGMMA_LARGE_BATCH = True
WGMMA_TILES = tuple(MoEGemmConfig(128, bn, 64, 4, 4, 2, mma="wgmma") for bn in (256, 192, 128, 96, 64))


# The decode GEMV tiles (kernels/moe_gemv_kernel.py): one row per m-tile, 4 warps along N, a warp's weight rows
# within GEMV_MAX_ROWS. The heuristic takes them up to GEMV_ROWS rows per touched expert (H100 SXM, both GEMMs
# forced to each tile, outputs checked):
# - T=1 (1 row): 1.09-2.14x over the 16x64x128 mma.sync decode tile on every layer and mode (results/logs/
#   moe_gemv_h100.log: Qwen3-30B-A3B 40.6 vs 55.8 us NVFP4 and 33.2 vs 47.2 W4A16, Mixtral-8x7B 208.7 vs 227.0
#   and 166.9 vs 190.1, gpt-oss-120b 69.7 vs 142.1 and 62.2 vs 133.3, DeepSeek-V3 193.0 vs 216.7 NVFP4);
# - T=4 (1.06-1.46 rows, the second row of an expert a second m-tile re-reading its weights): faster in 7 of 8
#   (results/logs/moe_decode_h100.log: gpt-oss-120b 223.7 vs 347.8 and 166.6 vs 322.4, Qwen3-30B-A3B 79.8 vs
#   103.6 W4A16, DeepSeek-V3 519.9 vs 647.6 W4A16), 2 % slower on Mixtral-8x7B NVFP4 at 1.46 (666.2 vs 653.3);
# - T=64 (2.3-4 rows): 1.8-3.8x slower, the CUDA-core FMAs growing with the rows (gpt-oss-120b 4x16x64 3485 vs
#   1964 us, Qwen3-30B-A3B 1196 vs 353: results/logs/moe_gemv_h100.log).
# bn 16 first for FC2 too: both GEMMs at 1x16x64 beat FC2 at 1x32x64 in 4 of those 7 T=1 rows (by 1.03-1.04x,
# e.g. 40.6 vs 42.1 us), tied in 2 and lost DeepSeek-V3 (193.0 vs 189.4); stages 2: a second chunk round in
# flight (stages 3) was no faster in 6 of 7 (gpt-oss NVFP4 80.1 vs 69.7 us), Mixtral W4A16 163.4 vs 166.9.
GEMV_DECODE = True
GEMV_ROWS = 1.5
GEMV_TILES = tuple(MoEGemmConfig(1, bn, 64, 2, 1, 4, mma="fma") for bn in (16, 32))


def heuristic(sh: MoEGemmShape, rows_per_expert: float, experts_touched: float = 0.0,
              arch: int = WGMMA_ARCH) -> MoEGemmConfig:
    """A valid config (on SM `arch`) from the rows each touched expert receives: the GEMV up to GEMV_ROWS
    (when GEMV_DECODE is on), decode tiles (bm 16, deep k-tiles to keep weight bytes in flight) up to 16 rows,
    mid tiles to 64, large tiles beyond (the wgmma ones first when WGMMA_LARGE_BATCH is on and the SM is 90);
    FC2's K split by split_heuristic when `experts_touched`
    (kernels.moe_problem.expected_experts_touched; 0: unknown, no split) leaves the grid short of CTAs."""
    if GEMV_DECODE and rows_per_expert <= GEMV_ROWS:
        wants = list(GEMV_TILES)
    elif rows_per_expert <= 16:
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
        if WGMMA_LARGE_BATCH:
            wants = list(WGMMA_TILES) + wants
    for cfg in wants + [MoEGemmConfig(16, 16, 64, 2, 1, 1)]:
        if not violations(sh, cfg, arch):
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
# Per-GEMM knobs added after LUT entries and result rows were written: their fields and columns come after
# fc2_splits (positional knob tuples and older rows keep their meaning), and a row or entry without one
# means ADDED_KNOBS' value, what the kernels did before the knob existed (mma.sync).
LATE_PER_GEMM_KNOBS = ("mma",)
PER_GEMM_KNOBS = tuple(k for k in MOE_KNOB_CHOICES if k not in SHARED_KNOBS + FC2_KNOBS + LATE_PER_GEMM_KNOBS)
FAMILY_KNOB_CHOICES = {**{k: MOE_KNOB_CHOICES[k] for k in SHARED_KNOBS},
                       **{f"{layer}_{k}": MOE_KNOB_CHOICES[k] for layer in LAYERS for k in PER_GEMM_KNOBS},
                       **{f"fc2_{k}": MOE_KNOB_CHOICES[k] for k in FC2_KNOBS},
                       **{f"{layer}_{k}": MOE_KNOB_CHOICES[k] for k in LATE_PER_GEMM_KNOBS for layer in LAYERS}}
ADDED_KNOBS = {f"{layer}_mma": "sync" for layer in LAYERS}


@dataclass(frozen=True)
class MoEConfig(Knobs):
    """One fused-MoE call's knobs: the row tile and pipeline depth both GEMMs use, each GEMM's column
    tile, k-tile and warp grid, and FC2's split-K (crossing two full GEMM spaces made 462k valid configs
    per layer, too many to count or search; the LUT entries along T are the cut-overs between decode and
    large-batch tiles) and each GEMM's MMA backend. Fields in FAMILY_KNOB_CHOICES order: knobs added later
    come last (fc2_splits, then fc1_mma and fc2_mma), defaulting to what entries written before them ran."""

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
    fc1_mma: str = "sync"
    fc2_mma: str = "sync"

    @classmethod
    def of(cls, fc1: MoEGemmConfig, fc2: MoEGemmConfig) -> "MoEConfig":
        if (fc1.bm, fc1.stages) != (fc2.bm, fc2.stages):
            raise ValueError(f"both GEMMs share bm and stages, got {fc1.short()} and {fc2.short()}")
        if fc1.splits != 1:
            raise ValueError(f"only FC2 splits K, got FC1 {fc1.short()}")
        return cls(fc1.bm, fc1.stages, **{f"fc1_{k}": getattr(fc1, k) for k in PER_GEMM_KNOBS + LATE_PER_GEMM_KNOBS},
                   **{f"fc2_{k}": getattr(fc2, k) for k in PER_GEMM_KNOBS + FC2_KNOBS + LATE_PER_GEMM_KNOBS})

    def gemm(self, layer: str) -> MoEGemmConfig:
        own = PER_GEMM_KNOBS + LATE_PER_GEMM_KNOBS + (FC2_KNOBS if layer == "fc2" else ())
        return MoEGemmConfig(bm=self.bm, stages=self.stages, **{k: getattr(self, f"{layer}_{k}") for k in own})

    def short(self) -> str:
        return f"fc1 {self.gemm('fc1').short()} | fc2 {self.gemm('fc2').short()}"


def gemm_shapes(quant_mode: str, activation: str, H: int, inter: int) -> tuple[MoEGemmShape, MoEGemmShape]:
    """(FC1, FC2) of a layer: FC1 writes bf16 (W4A4: x and the output fake-quantised to NVFP4 in the kernel);
    FC2 writes fp32 per pair (summed per token after)."""
    w4a4 = quant_mode == "nvfp4"
    return (MoEGemmShape("fc1", activation, H, inter, "bf16", quant_a=w4a4, quant_out=w4a4),
            MoEGemmShape("fc2", activation, inter, H, "fp32"))


def layer_violations(shapes: tuple[MoEGemmShape, MoEGemmShape], cfg: MoEConfig, arch: int = WGMMA_ARCH) -> list[str]:
    return [f"{sh.layer}: {v}" for sh in shapes for v in violations(sh, cfg.gemm(sh.layer), arch)]


def layer_heuristic(shapes: tuple[MoEGemmShape, MoEGemmShape], rows_per_expert: float,
                    experts_touched: float = 0.0, arch: int = WGMMA_ARCH) -> MoEConfig:
    """FC1's heuristic tile; FC2's own, or (when its row tile or depth differs) the first valid unsplit FC2
    config with FC1's bm and stages, preferring FC2's heuristic MMA backend and column tile; then FC2's
    split-K for that tile (split_heuristic: needs `experts_touched`, kernels.moe_problem.expected_experts_touched;
    0 = unknown, no split). Valid on SM `arch`."""
    c1, c2 = heuristic(shapes[0], rows_per_expert, arch=arch), heuristic(shapes[1], rows_per_expert, arch=arch)
    if (c2.bm, c2.stages) != (c1.bm, c1.stages):
        same = [c for c in valid_gemm_configs(shapes[1], arch) if (c.bm, c.stages, c.splits) == (c1.bm, c1.stages, 1)]
        if not same:
            raise ValueError(f"no FC2 config with bm={c1.bm} stages={c1.stages} for {shapes[1]}")
        c2 = min(same, key=lambda c: (c.mma != c2.mma, c.bn != c2.bn, c.bk != c2.bk, c.threads != c2.threads,
                                      -c.bn, -c.bk))
    return MoEConfig.of(c1, with_splits(shapes[1], c2, rows_per_expert, experts_touched))


def simplicity(cfg: MoEConfig, heur: MoEConfig) -> tuple:
    """Tie-break among equally fast configs: the heuristic first, then fewer FC2 splits (less partial
    traffic and workspace), fewer stages and threads, smaller tiles (less shared memory: room for a
    neighbour kernel)."""
    g1, g2 = cfg.gemm("fc1"), cfg.gemm("fc2")
    return (cfg != heur, g2.splits, g1.stages + g2.stages, g1.threads + g2.threads,
            g1.bm * g1.bn * g1.bk + g2.bm * g2.bn * g2.bk)


@functools.lru_cache(maxsize=64)
def valid_gemm_configs(sh: MoEGemmShape, arch: int = WGMMA_ARCH) -> tuple[MoEGemmConfig, ...]:
    """Every valid config of one GEMM shape on SM `arch` (counted once per shape: the heuristic and the
    family's search space both ask)."""
    out = []
    for combo in itertools.product(*MOE_KNOB_CHOICES.values()):
        cfg = MoEGemmConfig(**dict(zip(MOE_KNOB_CHOICES, combo)))
        if not violations(sh, cfg, arch):
            out.append(cfg)
    return tuple(out)


def valid_layer_configs(shapes: tuple[MoEGemmShape, MoEGemmShape], arch: int = WGMMA_ARCH) -> list[tuple]:
    """Every valid MoEConfig of a layer on SM `arch` as knob tuples (FAMILY_KNOB_CHOICES order): per shared
    (bm, stages), the two GEMMs' valid configs crossed (their other constraints are independent). FC1's are
    unsplit; FC2's split ones (decode tiles bm 16/32, K a multiple of bk*splits) took the moe set's mma.sync
    spaces from 32,115 to 68,007 (Mixtral-8x7B K=14336, DeepSeek-V3 K=2048: every split on bm 16/32) and
    44,319 (Qwen3-30B-A3B K=768 = 3 * 256: fewer); K an odd number of 64-tiles (gpt-oss-120b 2880, the ReLU2
    layer's 1856) allows no split (2,896 and 8,848). On SM90 the wgmma tiles (bm 64/128, either GEMM) add
    their crossings with every config of the same bm and stages."""
    fc1, fc2 = (valid_gemm_configs(sh, arch) for sh in shapes)
    out = []
    for bm in MOE_KNOB_CHOICES["bm"]:
        for st in MOE_KNOB_CHOICES["stages"]:
            a = [c for c in fc1 if (c.bm, c.stages) == (bm, st)]
            b = [c for c in fc2 if (c.bm, c.stages) == (bm, st)]
            out += [(bm, st, *(getattr(x, k) for k in PER_GEMM_KNOBS), *(getattr(y, k) for k in PER_GEMM_KNOBS),
                     *(getattr(y, k) for k in FC2_KNOBS), *(getattr(g, k) for k in LATE_PER_GEMM_KNOBS for g in (x, y)))
                    for x in a for y in b]
    return out
