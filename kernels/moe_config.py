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
  wgmma tiles are bm 64/128/256 (WGMMA_BM), with warps_m = 4 (one warpgroup's warps, 16 rows each of its
  64) and warps_n the number of warpgroups (bm/64 along M, or all of them each over several 64-row
  instructions; the rest along N), and never split K. "gemv"
  (kernels/moe_gemv_kernel.py): the decode GEMV, bm 8 or 16 rows, each lane expanding its own FP4 chunks
  straight into mma.sync fragments (no shared memory, no barrier in the main loop: at decode the mma.sync
  tile reads the weights at 9-26 % of the copy roofline, behind two barriers a k-tile); warps_n groups of
  bn / warps_n columns in 16-row mma groups, warps_m groups along K; stages - 1 chunk rounds loaded together
  (stages 2 or 3), bk unused (64).
* splits (FC2 only): split-K. The grid gets a third axis of `splits` CTAs per (m-tile, n-tile); split s
  sums over K elements [s*K/splits, (s+1)*K/splits) and writes its whole fp32 partial tile to its own
  slice of the per-pair output y [splits, pairs, H]; the per-token sum after the GEMM adds the splits and
  the token's top_k pairs in one fp32 reduction (deterministic, no atomics). FC1 cannot split: its fused
  activation (silu(g)*u, relu^2) needs the whole sum. The price is the partials: splits * pairs * H * 4
  bytes written by FC2 and read back by the sum instead of pairs * H * 4 (Mixtral-8x7B at T=1 with 2
  splits: 64 KB more against 66 MB of FC2 weights and scales; the ratio grows with the rows, see
  violations: splits > 1 is declared for decode tiles, bm <= 32, only).

The heuristic picks by the rows each touched expert receives: the decode GEMV (one 8- or 16-row m-tile an
expert: at decode an expert sees a handful of rows, so the weights' bytes decide the time) to GEMV_ROWS rows,
the wgmma tiles beyond WGMMA_MIN_ROWS on SM90, the mma.sync decode, mid and large tiles elsewhere; at decode
it splits FC2's K when the touched experts' tiles alone leave the GPU short of CTAs (split_heuristic).
GEMV_DECODE and WGMMA_LARGE_BATCH cite the measurements that switched those backends on.
Constraints and heuristic take the SM they are for (`arch`, 90 by default): wgmma is SM90's alone.
"""
from __future__ import annotations

import functools
import itertools
import math
import os
from dataclasses import dataclass, replace

from .config import Knobs

LAYERS = ("fc1", "fc2")
OUT_DTYPES = ("bf16", "fp32")
SMEM_LIMIT = 227 * 1024  # bytes of shared memory a CTA may opt into on SM90
MAX_THREADS = 512

MOE_KNOB_CHOICES = {
    "bm": (1, 2, 4, 8, 16, 32, 64, 128, 256),
    "bn": (16, 32, 64, 96, 128, 192, 256),
    "bk": (64, 128, 256),
    "stages": (2, 3, 4, 5),
    "warps_m": (1, 2, 4),
    "warps_n": (1, 2, 4),
    "splits": (1, 2, 4, 8),
    "mma": ("sync", "wgmma", "gemv"),
}
SPLIT_MAX_BM = 32  # splits > 1 only with decode tiles (see violations)
# mma.sync's column tiles: the space its sweeps, LUT entries and heuristic were measured on. The wider and
# the 96-multiple widths are wgmma's (a warpgroup instruction takes up to 256 columns; 96 and 192 divide
# gpt-oss-120b's 2880, which no power of two above 64 does).
SYNC_BN = (16, 32, 64, 128)
SYNC_MAX_BM = 128  # likewise its row tiles; bm 256 is wgmma's
WGMMA_ARCH = 90  # warpgroup MMA is SM90's (sm_90a); Blackwell's tensor cores take tcgen05 instead
WGMMA_WARPS_M = 4  # the four warps of a warpgroup, 16 rows each of its 64-row instruction
# wgmma row tiles. bm 256 (two warpgroups of 128 rows, two instructions each) halves the FP4 expansion per
# multiply-add against bm 128: a CTA expands its B tile once for all its rows, and at bm 128 the expansion's
# ~4.5 thread instructions per weight (8 warps, 4 schedulers) took about as many issue cycles as the
# k-tile's wgmma took tensor cycles (the large batches ran at 16-36 % of the mm rate on H100 and H200)
WGMMA_BM = (64, 128, 256)
WGMMA_MIN_STAGES = 3  # a k-tile's buffers are refilled two tiles later, once its asynchronous wgmma retired
# mma="gemv" (kernels/moe_gemv_kernel.py): m-tiles of one or two mma n-tiles (8 rows each); a warp's weight
# rows (its bn / warps_n columns, with their up rows when gated) fill whole 16-row mma groups, at most
# GEMV_MAX_GROUPS of them, so that the loaded chunks (8 words per group and round, 16 per n-tile and round) fit
# in registers beside the expansion
GEMV_BM = (8, 16)
GEMV_MAX_GROUPS = 2
GEMV_CHUNK = 32  # K elements per lane load (16 packed bytes): K must split into whole chunks per K split
# stages - 1: the chunk rounds whose loads a lane issues together (2: load a round, then use it; 3: two rounds
# per round trip; 5: four, a K group's whole share of a short K such as Qwen3-30B-A3B's FC1 at warps_m 4, 64
# chunks a row, in one round trip). Each round holds 8 words of weights per 16-row group and 16 of activations
# per 8-row n-tile a lane; a 512-thread CTA caps a thread at 128 registers (64K a CTA), so deep rounds on wide
# CTAs may spill: the sweep and benchmarks/fused_moe.py --tiles time them; the heuristic keeps stages 2
GEMV_STAGES = (2, 3, 4, 5)
# Programmatic dependent launch between a call's four kernels: FC1, FC2 and the combine are launched with
# programmatic stream serialisation and wait (griddepcontrol.wait) for their predecessor's grid before touching
# memory, and each kernel signals its dependents as soon as it runs, so the next grid's launch and CTA
# start-up overlap the previous one's tail instead of following its last CTA. The routing launch, first of
# the call, is launched plainly: it follows whatever the stream ran before. LUTFORGE_MOE_PDL=0 compiles the
# plain launches (for A/B timing; part of the kernels' cache keys). Measured in one H100 call at T=1 W4A16,
# public op with / without: Qwen3-30B-A3B 25.7 / 26.1 us, Mixtral-8x7B 92.6 / 94.7, gpt-oss-120b 44.1 / 45.6,
# DeepSeek-V3 96.9 / 97.7 (results/h100/e2e/fused_moe_decode.md, results/logs/moe_decode_nopdl_h100.md): 1-2 %,
# as the call's time is inside its kernels (ncu, results/logs/ncu_moe_decode_h100.txt), not between them.
PDL = os.environ.get("LUTFORGE_MOE_PDL", "1") != "0"
# Under PDL the decode GEMV's FC2 starts while FC1 runs, after the routing launch has finished (FC1 waits for
# it before releasing FC2): "regs" reads the tile's expert and rows and issues its first load batch of weights
# before griddepcontrol.wait, "l2" only pulls those weights into L2 there, "off" waits first
# (LUTFORGE_MOE_FC2_EARLY; part of the kernels' cache keys, for A/B timing). Why: in graph replay FC2 adds
# 7.9 us to Qwen3-30B-A3B's T=1 call for 6.3 MB of weights (2.1 us at the copy rate; H100,
# results/h100/e2e/fused_moe_host.md), most of it the wait, the table reads and the first DRAM round trip in
# series. "off" (the code before the switch) stays the default until the other modes are timed and checked on
# the GPU: benchmarks/fused_moe_host.py --gpu-only under each, and the GPU test of back-to-back calls per mode.
FC2_EARLY_MODES = ("regs", "l2", "off")
FC2_EARLY_CHOICES = f"{', '.join(FC2_EARLY_MODES[:-1])} or {FC2_EARLY_MODES[-1]}"  # as error messages name them
FC2_EARLY = os.environ.get("LUTFORGE_MOE_FC2_EARLY", "off")
if FC2_EARLY not in FC2_EARLY_MODES:
    raise ValueError(f"LUTFORGE_MOE_FC2_EARLY must be {FC2_EARLY_CHOICES}, got {FC2_EARLY!r}")
# The combine folded into the decode GEMV's FC2 (LUTFORGE_MOE_FOLD_COMBINE=1; kernels/moe_gemv_kernel.py): the
# last CTA of each column tile to finish (a counter per column tile, zeroed by the routing launch) sums its
# columns of every token's pairs and splits, in the combine kernel's order, into the output, and no combine
# launch follows. Why: the combine adds 3.3 us to Qwen3-30B-A3B's T=1 call in graph replay, a launch and a
# dependent wait for 8 pairs x 2 splits of one 2048-wide row (H100, results/h100/e2e/fused_moe_host.md). Off
# by default until timed and checked on the GPU (benchmarks/fused_moe_host.py times both in one run; the fold
# is part of FC2's shape, hence of its cache key).
FOLD_COMBINE = os.environ.get("LUTFORGE_MOE_FOLD_COMBINE", "0") == "1"
# FC1's loads before its wait for the routing launch (LUTFORGE_MOE_FC1_EARLY=1; kernels/moe_gemv_kernel.py): at
# up to 32 pairs the decode GEMV's FC1 works out its tile's expert and rows from the expert ids with warp
# shuffles (the routing kernel's layout, which is a function of the ids) and loads its first batch of weights
# while the routing launch runs; the rows' tokens and the activations follow the wait. Why: FC1 starts its
# weight reads only after the 2.2 us routing launch has finished (Qwen3-30B-A3B T=1 chain: routing 2.2, + FC1
# 9.6 us for 12.6 MB, 4.2 us at the copy rate; H100, results/h100/e2e/fused_moe_host.md). Off by default until
# timed and checked on the GPU; part of FC1's shape, hence of its cache key.
FC1_EARLY = os.environ.get("LUTFORGE_MOE_FC1_EARLY", "0") == "1"


@dataclass(frozen=True)
class MoEGemmShape:
    layer: str  # fc1 | fc2
    activation: str  # silu (gated FC1) | relu2
    K: int  # reduction length: H for FC1, I for FC2
    N: int  # output columns: I for FC1 (per half when gated), H for FC2
    out_dtype: str = "bf16"
    quant_out: bool = False  # W4A4 FC1: NVFP4-fake-quantise the output (FC2's input) in the epilogue
    combine_top_k: int = 0  # FC2 with the combine folded in (FOLD_COMBINE): the pairs per token it sums
    early_ids: bool = False  # FC1 routing its tile from the expert ids at decode (FC1_EARLY)

    def __post_init__(self):
        if self.layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {self.layer!r}")
        if self.out_dtype not in OUT_DTYPES:
            raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {self.out_dtype!r}")
        if self.quant_out and self.layer != "fc1":
            raise ValueError("only FC1 quantises its output (FC2's input)")
        if self.combine_top_k and self.layer != "fc2":
            raise ValueError("only FC2 takes the combine (the sum of each token's pairs)")
        if self.early_ids and self.layer != "fc1":
            raise ValueError("only FC1 routes its tiles from the expert ids (FC2 reads the routing tables)")
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
        """wgmma: the warpgroups along M and along N (warps_n of them in all): bm/64 along M, or all of them
        when fewer (each then covers bm / warps_n rows, several 64-row instructions)."""
        wg_m = max(1, min(self.bm // 64, self.warps_n))
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
    if cfg.mma == "gemv":  # the K groups' sums per (row, weight row), and the quantised output's staging
        rows = cfg.bn * (2 if sh.gated else 1)
        return 4 * cfg.warps_m * cfg.bm * rows + (4 * cfg.bm * cfg.bn if sh.quant_out else 0) + 64
    nb = cfg.bn * (2 if sh.gated else 1)
    pad = cfg.bk + 8
    per_stage = cfg.bm * pad * 2 + nb * cfg.bk // 2 + nb * cfg.bk // 16
    return cfg.stages * per_stage + nb * pad * 2 + cfg.bm * (cfg.bn + 4) * 4 + 64


def accumulators_per_thread(sh: MoEGemmShape, cfg: MoEGemmConfig) -> int:
    if cfg.mma == "gemv":  # per 16-row mma group and 8-row n-tile, a lane's 4 of the 16 x 8 sums
        return 4 * (gemv_rows(sh, cfg) // 16) * (cfg.bm // 8)
    return cfg.bm * cfg.bn * (2 if sh.gated else 1) // cfg.threads


def gemv_rows(sh: MoEGemmShape, cfg: MoEGemmConfig) -> int:
    """mma="gemv": the weight rows one warp streams (its columns, and their up rows when gated)."""
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
    if cfg.mma == "gemv":
        return _gemv_violations(sh, cfg) + _tile_violations(sh, cfg) + _budget_violations(sh, cfg)
    if cfg.bn not in SYNC_BN:
        out.append(f"bn={cfg.bn} is a wgmma tile width; mma=sync takes bn in {SYNC_BN}")
    if cfg.bm > SYNC_MAX_BM:
        out.append(f"bm={cfg.bm} is a wgmma row tile; mma=sync takes bm <= {SYNC_MAX_BM}")
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
    if cfg.bm not in WGMMA_BM:
        out.append(f"mma=wgmma tiles bm in {WGMMA_BM} (64-row warpgroup instructions), got bm={cfg.bm}")
        return out
    if cfg.warps_m != WGMMA_WARPS_M:
        out.append(f"mma=wgmma takes warps_m={WGMMA_WARPS_M} (a warpgroup's four warps, 16 rows each of its 64), "
                   f"got warps_m={cfg.warps_m}")
    wg_n = cfg.warpgroups[1]  # warps_n and bm / 64 are powers of two: the warpgroups always tile M
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
    """The decode GEMV's own constraints (kernels/moe_gemv_kernel.py). It has no k-tile pipeline: bk takes one
    value (64) so that the search does not time one kernel under many names; stages - 1 counts the chunk rounds
    loaded together."""
    out = []
    if cfg.bm not in GEMV_BM:
        out.append(f"mma=gemv is the decode GEMV: bm in {GEMV_BM} (one or two 8-row mma n-tiles), got bm={cfg.bm}")
    if cfg.stages not in GEMV_STAGES or cfg.bk != 64:
        out.append(f"mma=gemv has no k-tile pipeline: stages in {GEMV_STAGES} (one more than the chunk rounds "
                   f"loaded together) and bk=64 (unused), got stages={cfg.stages} bk={cfg.bk}")
    if cfg.bn % cfg.warps_n:
        out.append(f"mma=gemv: bn={cfg.bn} must split into warps_n={cfg.warps_n} equal column groups")
        return out
    rows = gemv_rows(sh, cfg)
    if rows % 16 or rows > 16 * GEMV_MAX_GROUPS:
        out.append(f"mma=gemv: a warp's {rows} weight rows (bn / warps_n columns"
                   + (", doubled for the gate and up rows" if sh.gated else "")
                   + f") must fill 1 to {GEMV_MAX_GROUPS} 16-row mma groups")
    if sh.K % (GEMV_CHUNK * cfg.splits):
        out.append(f"mma=gemv: K={sh.K} must be a multiple of {GEMV_CHUNK}*splits={GEMV_CHUNK * cfg.splits} "
                   "(whole 16-byte chunks per K split)")
    return out

def _tile_violations(sh: MoEGemmShape, cfg: MoEGemmConfig) -> list[str]:
    """Every backend walks whole tiles, and splits K only in FC2 (FC1's fused activation needs the whole sum);
    the combine folds, and FC1 routes from the ids, only in the decode GEMV."""
    out = []
    if sh.combine_top_k and cfg.mma != "gemv":
        out.append(f"the combine folds only into the decode GEMV's FC2 (mma=gemv), got mma={cfg.mma}")
    if sh.early_ids and cfg.mma != "gemv":
        out.append(f"only the decode GEMV's FC1 routes from the expert ids (mma=gemv), got mma={cfg.mma}")
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
# ... and past WGMMA_MIN_ROWS rows per expert, where the mma.sync mid tiles (64x64x128 s3, 64x32x64 s3) ran
# 1.4-2.2x slower than these bm-128 tiles at 32 and 64 rows an expert (H100 SXM, W4A16, both GEMMs forced
# per tile in one run, results/h100/e2e/fused_moe_mid.md): Qwen3-30B-A3B T=1024 839 vs 602 us, Mixtral-8x7B
# T=256 1699 vs 1097, DeepSeek-V3 T=1024 and 2048 9321 vs 8527 and 14382 vs 9434, gpt-oss-120b T=1024 and
# 2048 2994 vs 2115 and 5045 vs 2287. The 64-row wgmma tiles won at 16 rows (Qwen T=256: 342 vs 507) and at
# DeepSeek's 32 (6793 vs 8527) but lost at gpt-oss's 32 and every 64 but Qwen's: not taken.
WGMMA_MIN_ROWS = 16
# bm 256 (WGMMA_BM) from WGMMA_256_ROWS rows per touched expert: gated FC1 at bn 64 and FC2 at 128 (96 for
# N = 2880) hold 128 accumulators a thread, as the bm-128 tiles, and expand half the FP4 per multiply-add.
# H100 SXM, W4A16 T=4096, public op with both GEMMs forced to each tile in one run (results/h100/e2e/
# fused_moe_large.md; every GPU test passed, results/logs/moe_tests_wgmma256_h100.log): at 1024 rows an expert
# (Mixtral-8x7B) 256x64/256x128 beat 128x128/128x256 by 4.6 % (8783 vs 9190 us); at 256 (Qwen3-30B-A3B) it lost
# by 8.6 % (1763 vs 1624), at 128 (gpt-oss-120b, DeepSeek-V3) by 32 and 11 % (4595 vs 3487, 15623 vs 14111).
# Both tiles run one CTA per SM (164 and 178 KB of shared memory); routed rows scatter around the mean, so near
# 256 rows about half the experts pay a second, nearly empty 256-row tile where bm 128 pays a 128-row one. Five
# stages lost everywhere (11334, 2123, 20147 us). 512 sits between the measured loss and win: not measured itself.
WGMMA_256_ROWS = 512
WGMMA_256_TILES = tuple(MoEGemmConfig(256, bn, 64, 4, 4, 2, mma="wgmma") for bn in (128, 96, 64))


# The decode GEMV tiles (kernels/moe_gemv_kernel.py): bm 8 (one mma n-tile), 4 warps along N of one 16-row mma
# group each (gated FC1 at bn 32: 8 columns' gate and up rows; the other GEMMs at bn 64), the K groups from
# gemv_warps_m. The heuristic takes them up to GEMV_ROWS = 8 rows per touched expert, one m-tile: each expert's
# weights read once, as the 16-row mma.sync decode tile reads them, without its shared memory and barriers.
# H200, one call against the previous tree (whose T=1 ran the CUDA-core GEMV and T=64 the 16x64x128 mma.sync
# tile with the 13-instruction expansion; results/h200/e2e/fused_moe_decode.md, results/logs/
# moe_decode_prev_tree_h200.md; every MoE GPU test passed, results/logs/moe_tests_gemv_h200.log):
# - W4A16 T=1: 1.21-1.89x faster on every layer (Mixtral-8x7B 87.5 vs 165.4 us, 53 % of the weight roofline;
#   DeepSeek-V3 89.4 vs 156.5; gpt-oss-120b 41.4 vs 61.6; Qwen3-30B-A3B 27.0 vs 32.8);
# - at 2-4 rows (T=64 of gpt-oss-120b, DeepSeek-V3, Qwen3-30B-A3B): W4A16 2.77, 2.15 and 1.10x faster (676 vs
#   1870, 2080 vs 4477, 284 vs 312 us); NVFP4 1.10 and 1.10x faster on DeepSeek and Qwen, 2 % slower on gpt-oss;
# - NVFP4 T=1: faster on Qwen3-30B-A3B and DeepSeek-V3 (50.0 vs 55.1, 196.6 vs 217.4 us), slower than the former
#   CUDA-core GEMV on Mixtral-8x7B and gpt-oss-120b (227.8 vs 207.6, 89.7 vs 69.2): that GEMV's W4A4 FC1
#   fake-quantised each lane's 32 activations per chunk round, ~5x the round's weight expansion (x is now
#   quantised once per call by the routing launch, kernels/moe_route_kernel.py). 5-8 rows per expert were not
#   measured.
#
# Past 8 rows, to GEMV_ROWS = 16, the same tiles at bm 16 (two mma n-tiles per weight fragment): at Mixtral-8x7B
# T=64 (16 rows an expert) 16x32x64 s2 4x4 | 16x64x64 took 638 us against 1097 for the 64x64x128 s3 mma.sync
# mid tile the heuristic took there (its expected rows came out at 16 + 2e-7), and 698-757 for the 8-row GEMV's
# two m-tiles (H100 SXM, W4A16, both GEMMs forced, results/h100/e2e/fused_moe_decode_tiles.md). In that run
# deeper chunk rounds (stages 3, 5) and other K groups than gemv_warps_m's did not beat the tiles below at T=1
# on any layer nor at T=64 but Qwen3-30B-A3B (s5 w2x4: 160 vs 192 us): not taken. The public op at the new
# cut-overs, every output checked: results/h100/e2e/fused_moe_cutovers.md (Mixtral-8x7B T=64 631 us). A later
# H100 run (results/h100/e2e/fused_moe_decode_rounds*.md, W4A16, every output checked) agreed but for 4 rounds
# of 2 K groups at gpt-oss-120b T=1 (38.3 vs 41.8 us) and Qwen3-30B-A3B T=8 (77.0 vs 81.3), the same tile
# 1.1-1.4x slower at gpt-oss-120b T=8 and Mixtral-8x7B / Qwen3-30B-A3B T=64: per-T choices, the LUT's to make.
GEMV_DECODE = True
GEMV_ROWS = 16
GEMV_TILES = tuple(MoEGemmConfig(8, bn, 64, 2, 1, 4, mma="gemv") for bn in (32, 64))
# A GEMV warp keeps 32 lanes x 2 weight rows x 16 bytes = 1 KB of weights in flight per chunk round, and the
# copy roofline needs ~4.2 TB/s x ~1 us / 132 SMs ~ 32 KB per SM in flight: ~32 warps per SM. Where the
# grid's CTAs (touched experts x N / bn x FC2's splits) hold fewer, the K groups (warps_m 2, 4) multiply
# the warps (an assumption of the copy model, as SPLIT_MIN_CTAS_PER_SM; benchmarks/fused_moe.py --tiles
# times the alternatives)
GEMV_MIN_WARPS_PER_SM = 32


def gemv_warps_m(sh: MoEGemmShape, cfg: MoEGemmConfig, experts_touched: float) -> int:
    """The decode GEMV's K groups for `cfg` (its warps_m ignored): the fewest that bring the grid to
    GEMV_MIN_WARPS_PER_SM * SM_COUNT warps, while each K group keeps a whole round of chunks (4 lanes')."""
    warps = max(1.0, experts_touched) * (sh.N // cfg.bn) * cfg.splits * cfg.warps_n
    best = 1
    for wm in MOE_KNOB_CHOICES["warps_m"][1:]:
        if warps * best >= GEMV_MIN_WARPS_PER_SM * SM_COUNT or sh.K // (GEMV_CHUNK * cfg.splits) < 4 * wm:
            break
        best = wm
    return best


def heuristic(sh: MoEGemmShape, rows_per_expert: float, experts_touched: float = 0.0,
              arch: int = WGMMA_ARCH) -> MoEGemmConfig:
    """A valid config (on SM `arch`) from the rows each touched expert receives: the GEMV up to GEMV_ROWS
    (when GEMV_DECODE is on), else mma.sync decode tiles (bm 16, deep k-tiles to keep weight bytes in flight) up
    to 16 rows, mid tiles to 64, large tiles beyond, the wgmma ones first past WGMMA_MIN_ROWS (when
    WGMMA_LARGE_BATCH is on and the SM is 90);
    FC2's K split by split_heuristic when `experts_touched`
    (kernels.moe_problem.expected_experts_touched; 0: unknown, no split) leaves the grid short of CTAs."""
    rows_per_expert = round(rows_per_expert, 4)  # an expectation: 16 + 2e-7 rows is 16 (Mixtral-8x7B at T=64)
    if GEMV_DECODE and rows_per_expert <= GEMV_ROWS:
        bm = next(b for b in GEMV_BM if b >= min(rows_per_expert, GEMV_BM[-1]))  # one m-tile per expert
        wants = [replace(t, bm=bm) for t in GEMV_TILES]
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
    if WGMMA_LARGE_BATCH and rows_per_expert > WGMMA_MIN_ROWS:
        wants = list(WGMMA_TILES) + wants
        if rows_per_expert >= WGMMA_256_ROWS:
            wants = list(WGMMA_256_TILES) + wants
    for cfg in wants + [MoEGemmConfig(16, 16, 64, 2, 1, 1)]:
        if not violations(sh, cfg, arch):
            cfg = with_splits(sh, cfg, rows_per_expert, experts_touched)
            if cfg.mma == "gemv":
                cfg = replace(cfg, warps_m=gemv_warps_m(sh, cfg, experts_touched))
            return cfg
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
    """(FC1, FC2) of a layer: FC1 writes bf16 (W4A4: its output fake-quantised to NVFP4 in the kernel, its input
    x by the routing launch, kernels/moe_route_kernel.py); FC2 writes fp32 per pair (summed per token after)."""
    w4a4 = quant_mode == "nvfp4"
    return (MoEGemmShape("fc1", activation, H, inter, "bf16", quant_out=w4a4),
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
