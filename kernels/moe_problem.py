"""Fused-MoE problem descriptor: one whole mixture-of-experts layer with 4-bit (NVFP4) expert weights.

One problem is a layer for T tokens: route each token to top_k of E experts, FC1 grouped GEMM
(x [T, H] x W1_e^T -> [pairs, fc1_rows]), activation (gated SiLU: silu(gate) * up over the 2I FC1 rows, or
ReLU2: relu(h)^2 over I rows), FC2 grouped GEMM ([pairs, I] x W2_e^T -> [pairs, H]) and the routing-weighted
scatter-add back to y [T, H]. Expert weights are NVFP4: FP4 e2m1 values, one e4m3 scale per 16 consecutive
elements along K, and one fp32 global scale (alpha) per expert per GEMM. quant_mode says what the
activations are: "nvfp4" (W4A4) rounds them to NVFP4 inside the layer, "w4a16" keeps them bf16; both read
the same bf16 x and FP4 weights from memory, so they share one roofline.

Under expert parallelism a rank holds `local_experts` of the E experts (0: all of them); pairs routed to
the other experts are another rank's work, so they cost this rank neither weight bytes nor flops. The
descriptor places the local slice at expert ids 0 .. n_local-1 (local expert offset 0): only skewed routing
tells slices apart, and that one is the hottest.

The roofline quantities here (expected_experts_touched, ideal_bytes, flops) use the same routing model
(routing_probabilities / inclusion_probabilities) that GPU input generation draws from, so a measured time
and its ideal refer to the same traffic. Standard library only: the sweep and the runtime both import it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

MOE_OPS = ("fused_moe",)
QUANT_MODES = ("nvfp4", "w4a16")
ACTIVATIONS = ("silu", "relu2")
ROUTINGS = ("uniform", "skewed")
MAX_TOP_K = 8  # the largest top_k of the target models (DeepSeek-V3, Qwen3-MoE); per-token routing state is sized for it
DIM_MULTIPLE = 64  # H and I: a multiple of the 16-element NVFP4 scale block and of the kernels' 64-wide K tiles
SCALE_BLOCK = 16  # NVFP4: one e4m3 scale per 16 FP4 values along K
ACT_BYTES = 2  # x and y are bf16
ROUTING_BYTES = 4 + 4  # per (token, expert) pair: int32 expert id + fp32 routing weight
ALPHA_BYTES = 4  # per expert and GEMM: the fp32 global scale (w1_alpha, w2_alpha)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class MoEProblem:
    """One fused-MoE layer for T tokens. Everything but T is compile-time for a kernel; T (and the routing
    it draws) is the runtime size the LUT is keyed on, as the row family's T."""

    op: str
    T: int
    E: int
    top_k: int
    H: int
    I: int  # noqa: E741 -- the MoE intermediate size, named as in the model configs
    quant_mode: str = "nvfp4"
    activation: str = "silu"
    routing: str = "uniform"
    local_experts: int = 0  # 0: all E experts are local (no expert parallelism)
    # the attributes every family's problem shows the harness (Parquet columns, tables): bf16 in and out
    in_dtype = "bf16"
    out_format = "bf16"
    scale_layout = "rowmajor"
    heads = 1

    def __post_init__(self):
        if self.op not in MOE_OPS:
            raise ValueError(f"op must be one of {MOE_OPS}, got {self.op!r}")
        for name in ("T", "E", "top_k", "H", "I", "local_experts"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an int, got {getattr(self, name)!r}")
        if self.T < 0:
            raise ValueError(f"T must be >= 0, got {self.T}")
        if self.E < 1:
            raise ValueError(f"E must be >= 1, got {self.E}")
        if not 1 <= self.top_k <= min(self.E, MAX_TOP_K):
            raise ValueError(f"top_k must be in [1, min(E, {MAX_TOP_K})] = [1, {min(self.E, MAX_TOP_K)}] "
                             f"(each token picks top_k distinct experts), got {self.top_k}")
        for name in ("H", "I"):
            v = getattr(self, name)
            if v < DIM_MULTIPLE or v % DIM_MULTIPLE:
                raise ValueError(f"{name} must be a positive multiple of {DIM_MULTIPLE} (it is a GEMM K: NVFP4 "
                                 f"scales cover {SCALE_BLOCK}-element blocks and the kernels' K tiles are "
                                 f"{DIM_MULTIPLE} wide), got {v}")
        if self.quant_mode not in QUANT_MODES:
            raise ValueError(f"quant_mode must be one of {QUANT_MODES}, got {self.quant_mode!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if not 0 <= self.local_experts <= self.E:
            raise ValueError(f"local_experts must be in [0, E={self.E}] (0: all experts local), "
                             f"got {self.local_experts}")

    @property
    def C(self) -> int:
        """The hidden size under the name every family's tables use for the row length."""
        return self.H

    @property
    def n_local(self) -> int:
        """Experts whose weights this rank holds: experts 0 .. n_local-1."""
        return self.E if self.local_experts == 0 else self.local_experts

    @property
    def pairs(self) -> int:
        """(token, expert) pairs routed, local or not."""
        return self.T * self.top_k

    @property
    def fc1_rows(self) -> int:
        """FC1's output rows per expert: gate and up (2I) for gated SiLU, I for ReLU2 (not gated)."""
        return 2 * self.I if self.activation == "silu" else self.I


# --------------------------------------------------------------------------- routing model
def routing_probabilities(E: int, routing: str) -> list[float]:
    """Each expert's share of a token's routing mass, indexed by expert id.

    uniform: 1/E each. skewed: Zipf with s = 1, p_e proportional to 1 / (e + 1): expert 0 is the hottest
    (e.g. E=128: p_0 = 18 %, and the top 8 experts hold 50 % of the mass). A token draws top_k *distinct*
    experts by successive sampling without replacement with these probabilities (torch.multinomial(p,
    top_k, replacement=False)). Local experts are ids 0 .. n_local-1, so under skew a rank holds the hot
    ones: the most experts touched, the weight-bound worst case."""
    if not _is_int(E) or E < 1:
        raise ValueError(f"E must be an int >= 1, got {E!r}")
    if routing == "uniform":
        return [1.0 / E] * E
    if routing == "skewed":
        w = [1.0 / (e + 1) for e in range(E)]
        s = sum(w)
        return [x / s for x in w]
    raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")


def inclusion_probabilities(E: int, top_k: int, routing: str) -> list[float]:
    """P(expert e is among one token's top_k draws), for each expert; they sum to top_k.

    uniform: top_k / E, exactly. skewed: successive sampling is an exponential race (expert e arrives at
    Exp(1) / p_e; the first top_k arrivals are the draw), and Rosen's approximation replaces the top_k-th
    arrival time by the t with sum_e (1 - exp(-p_e t)) = top_k, giving q_e = 1 - exp(-p_e t). It is within
    ~1.5 % of sampling's touched-expert counts for the shipped layers; the simpler min(1, top_k * p_e) is
    off by up to ~11 % (it overweights the hot experts, which sampling without replacement caps at one
    draw per token)."""
    if not _is_int(top_k) or not 1 <= top_k <= E:
        raise ValueError(f"top_k must be an int in [1, E={E}], got {top_k!r}")
    p = routing_probabilities(E, routing)
    if routing == "uniform" or top_k == E:
        return [top_k / E] * E

    def mass(t: float) -> float:
        return sum(-math.expm1(-x * t) for x in p)

    lo, hi = 0.0, 1.0
    while mass(hi) < top_k:
        hi *= 2.0
    for _ in range(100):  # bisection to float precision; mass is increasing in t
        mid = 0.5 * (lo + hi)
        if mass(mid) < top_k:
            lo = mid
        else:
            hi = mid
    t = 0.5 * (lo + hi)
    return [-math.expm1(-x * t) for x in p]


def expected_experts_touched(p: MoEProblem) -> float:
    """Expected number of distinct local experts that receive >= 1 pair: the experts whose weights the layer
    must read. Tokens route independently, so expert e is untouched with probability (1 - q_e)^T (q_e its
    inclusion_probabilities); uniform gives n_local * (1 - (1 - top_k/E)^T)."""
    if p.T == 0:
        return 0.0
    q = inclusion_probabilities(p.E, p.top_k, p.routing)[:p.n_local]
    return sum(1.0 - (1.0 - x) ** p.T for x in q)


def local_pair_fraction(p: MoEProblem) -> float:
    """Expected fraction of the pairs routed to local experts: n_local / E for uniform, the local experts'
    inclusion probabilities over top_k for skewed."""
    if p.n_local == p.E:
        return 1.0
    return sum(inclusion_probabilities(p.E, p.top_k, p.routing)[:p.n_local]) / p.top_k


# --------------------------------------------------------------------------- roofline
def weight_bytes(p: MoEProblem, experts: float) -> float:
    """Bytes of `experts` experts' weights: FP4 values (half a byte each) and e4m3 scales (one byte per 16
    values) of W1 [fc1_rows, H] and W2 [H, I], plus the fp32 w1_alpha and w2_alpha."""
    elems = p.fc1_rows * p.H + p.H * p.I
    return experts * (elems / 2 + elems / SCALE_BLOCK + 2 * ALPHA_BYTES)


def ideal_bytes(p: MoEProblem) -> int:
    """Minimum DRAM traffic: the expected touched experts' weights, x read and y written once (bf16), and the
    routing tensors (expert ids and weights). At decode sizes (small T) the weights dominate, so the
    roofline is weight-bound and grows with the experts touched, not with T; at large T every local expert
    is touched and the activations take over."""
    act = 2 * p.T * p.H * ACT_BYTES
    return round(weight_bytes(p, expected_experts_touched(p))) + act + p.pairs * ROUTING_BYTES


def flops(p: MoEProblem) -> int:
    """GEMM flops of the local pairs: 2 * pairs * (fc1_rows * H + H * I) times local_pair_fraction (the
    activation and the scatter are negligible next to them)."""
    if p.T == 0:
        return 0
    return round(2 * p.pairs * (p.fc1_rows * p.H + p.H * p.I) * local_pair_fraction(p))


def layer_label(p: MoEProblem) -> str:
    """The compile-time layer shape, for tables and plots."""
    return f"E{p.E}k{p.top_k} H{p.H} I{p.I}"


def rows_per_expert(p: MoEProblem) -> float:
    """Expected rows (pairs) each touched local expert receives: what the grouped GEMMs' tiles are sized by."""
    touched = expected_experts_touched(p)
    return p.pairs * local_pair_fraction(p) / touched if touched > 0 else 0.0
