"""Knobs, constraints and the analytical heuristic of the fused-MoE grouped GEMM (kernels/moe_kernel.py).

A fused-MoE call runs two grouped GEMMs (FC1, FC2); each is compiled for a `MoEGemmShape` (the layer, its
activation, K and N and the output dtype: everything but the routed rows) and launched with a
`MoEGemmConfig`:

* bm, bn, bk: the CTA tile (rows of one expert x output columns x the k-tile). bn counts output columns;
  a gated FC1 CTA reads 2*bn weight rows (gate and up).
* stages: cp.async pipeline depth (k-tiles in flight).
* warps_m, warps_n: the warp grid over the tile (each warp a 16x16 mma.sync patch per step).

The heuristic picks a decode tile (bm 16: at T <= 64 an expert sees a handful of rows, so the weights'
bytes decide the time) or a large-batch tile by the rows each touched expert receives.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

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
}


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

    def short(self) -> str:
        return f"{self.bm}x{self.bn}x{self.bk} s{self.stages} w{self.warps_m}x{self.warps_n}"

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


def heuristic(sh: MoEGemmShape, rows_per_expert: float) -> MoEGemmConfig:
    """A valid config from the rows each touched expert receives: decode tiles (bm 16, deep k-tiles to keep
    weight bytes in flight) up to 16 rows, mid tiles to 64, large tiles beyond."""
    if rows_per_expert <= 16:
        wants = [MoEGemmConfig(16, 32, 256, 4, 1, 2), MoEGemmConfig(16, 16, 256, 4, 1, 1),
                 MoEGemmConfig(16, 32, 128, 4, 1, 2), MoEGemmConfig(16, 16, 64, 4, 1, 1)]
    elif rows_per_expert <= 64:
        wants = [MoEGemmConfig(64, 64, 128, 3, 2, 2), MoEGemmConfig(64, 32, 64, 3, 2, 2),
                 MoEGemmConfig(32, 16, 64, 3, 2, 1)]
    else:
        wants = [MoEGemmConfig(128, 64, 64, 4, 4, 2), MoEGemmConfig(128, 32, 64, 4, 4, 2),
                 MoEGemmConfig(64, 32, 64, 3, 2, 2), MoEGemmConfig(64, 16, 64, 3, 2, 1)]
    for cfg in wants + [MoEGemmConfig(16, 16, 64, 2, 1, 1)]:
        if not violations(sh, cfg):
            return cfg
    raise ValueError(f"no valid config for {sh}")


# --------------------------------------------------------------------------- the family's config: both GEMMs
SHARED_KNOBS = ("bm", "stages")  # both GEMMs see the same rows per expert: one row tile, one pipeline depth
PER_GEMM_KNOBS = tuple(k for k in MOE_KNOB_CHOICES if k not in SHARED_KNOBS)
FAMILY_KNOB_CHOICES = {**{k: MOE_KNOB_CHOICES[k] for k in SHARED_KNOBS},
                       **{f"{layer}_{k}": MOE_KNOB_CHOICES[k] for layer in LAYERS for k in PER_GEMM_KNOBS}}


@dataclass(frozen=True)
class MoEConfig(Knobs):
    """One fused-MoE call's knobs: the row tile and pipeline depth both GEMMs use, and each GEMM's column
    tile, k-tile and warp grid (crossing two full GEMM spaces made 462k valid configs per layer, too many
    to count or search; the LUT entries along T are the cut-overs between decode and large-batch tiles)."""

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

    @classmethod
    def of(cls, fc1: MoEGemmConfig, fc2: MoEGemmConfig) -> "MoEConfig":
        if (fc1.bm, fc1.stages) != (fc2.bm, fc2.stages):
            raise ValueError(f"both GEMMs share bm and stages, got {fc1.short()} and {fc2.short()}")
        return cls(fc1.bm, fc1.stages, **{f"fc1_{k}": getattr(fc1, k) for k in PER_GEMM_KNOBS},
                   **{f"fc2_{k}": getattr(fc2, k) for k in PER_GEMM_KNOBS})

    def gemm(self, layer: str) -> MoEGemmConfig:
        return MoEGemmConfig(bm=self.bm, stages=self.stages,
                             **{k: getattr(self, f"{layer}_{k}") for k in PER_GEMM_KNOBS})

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


def layer_heuristic(shapes: tuple[MoEGemmShape, MoEGemmShape], rows_per_expert: float) -> MoEConfig:
    """FC1's heuristic tile; FC2's own, or (when its row tile or depth differs) the first valid FC2 config
    with FC1's bm and stages, preferring FC2's heuristic column tile."""
    c1, c2 = heuristic(shapes[0], rows_per_expert), heuristic(shapes[1], rows_per_expert)
    if (c2.bm, c2.stages) != (c1.bm, c1.stages):
        same = [c for c in valid_gemm_configs(shapes[1]) if (c.bm, c.stages) == (c1.bm, c1.stages)]
        if not same:
            raise ValueError(f"no FC2 config with bm={c1.bm} stages={c1.stages} for {shapes[1]}")
        c2 = min(same, key=lambda c: (c.bn != c2.bn, c.bk != c2.bk, c.threads != c2.threads, -c.bn, -c.bk))
    return MoEConfig.of(c1, c2)


def simplicity(cfg: MoEConfig, heur: MoEConfig) -> tuple:
    """Tie-break among equally fast configs: the heuristic first, then fewer stages and threads, smaller
    tiles (less shared memory: room for a neighbour kernel)."""
    g1, g2 = cfg.gemm("fc1"), cfg.gemm("fc2")
    return (cfg != heur, g1.stages + g2.stages, g1.threads + g2.threads,
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
    the two GEMMs' valid configs crossed (their other constraints are independent)."""
    fc1, fc2 = (valid_gemm_configs(sh) for sh in shapes)
    out = []
    for bm in MOE_KNOB_CHOICES["bm"]:
        for st in MOE_KNOB_CHOICES["stages"]:
            a = [c for c in fc1 if (c.bm, c.stages) == (bm, st)]
            b = [c for c in fc2 if (c.bm, c.stages) == (bm, st)]
            out += [(bm, st, *(getattr(x, k) for k in PER_GEMM_KNOBS), *(getattr(y, k) for k in PER_GEMM_KNOBS))
                    for x in a for y in b]
    return out
