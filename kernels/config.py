"""Tuning knobs of the RMSNorm-family kernels: one frozen dataclass, fixed choice lists, constraints
and the analytical heuristic (the fallback of dispatch and trial 0 of every search).

A knob has one name everywhere: this dataclass field, the Optuna parameter, the Parquet column
`knob_<name>` and the LUT value.
"""
from __future__ import annotations

import functools
import importlib
import logging
import math
from dataclasses import asdict, dataclass, fields, replace

from .problem import ELEM_BYTES, FP4_BLOCK, Problem, ideal_bytes

# Fixed, full choice lists (Optuna cannot vary a categorical's choices between trials).
KNOB_CHOICES: dict[str, tuple] = {
    "threads": (32, 64, 128, 256, 512, 1024),  # threads per CTA
    "threads_per_row": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),  # rows per CTA = threads / this
    "vec_bytes": (2, 4, 8, 16),  # bytes of x per vector load
    "cluster": (1, 2, 4, 8),  # CTAs of a cluster splitting one row (SM90+)
    "stage": ("reg", "smem"),  # x kept in registers, or staged in shared memory by cp.async
    "ctas_per_sm": (0, 1, 2, 4, 8),  # 0: one CTA per row block; N: persistent grid of N x SMs
    "weight_smem": (False, True),  # weight read from shared memory instead of held in registers
    "pdl": (False, True),  # programmatic dependent launch: start while the previous kernel drains (SM90+)
    "l2_prefetch": (False, True),  # with pdl: prefetch the first rows of x into L2 before waiting on it
}

MAX_SMEM_BYTES = 227 * 1024  # SM90/SM100 opt-in shared memory per CTA
REG_VALUES_BUDGET = 32768  # fp32 row values a CTA may hold in registers (half the register file)
MAX_REG_VALUES_PER_THREAD = 128


class Knobs:
    """What every kernel family's knob dataclass shares: a dict form for rows, LUTs and Optuna."""

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown knobs {sorted(unknown)}; knobs are {sorted(names)}")
        return cls(**{k: d[k] for k in names if k in d})

    def off_choices(self, choices: dict) -> list[str]:
        """The knobs whose values are not among their declared `choices` (the first check of `violations`)."""
        return [f"{n}={getattr(self, n)!r} not in {c}" for n, c in choices.items() if getattr(self, n) not in c]


@dataclass(frozen=True)
class KernelConfig(Knobs):
    threads: int = 128
    threads_per_row: int = 32
    vec_bytes: int = 16
    cluster: int = 1
    stage: str = "reg"
    ctas_per_sm: int = 0
    weight_smem: bool = False
    pdl: bool = False
    l2_prefetch: bool = False

    @property
    def rows_per_cta(self) -> int:
        return self.threads // self.threads_per_row

    def short(self) -> str:
        return (f"t{self.threads}/r{self.threads_per_row}/v{self.vec_bytes}/c{self.cluster}/{self.stage}"
                f"/p{self.ctas_per_sm}/{'wsm' if self.weight_smem else 'wrg'}{'/pdl' if self.pdl else ''}"
                f"{'/pf' if self.l2_prefetch else ''}")


def vec_elems(p: Problem, cfg: KernelConfig) -> int:
    return cfg.vec_bytes // ELEM_BYTES[p.in_dtype]


def chunk_cols(p: Problem, cfg: KernelConfig) -> int:
    """Columns of a row one CTA owns: the row split evenly over the cluster in whole vectors (whole
    FP4 scale blocks where the output has them)."""
    unit = max(vec_elems(p, cfg), FP4_BLOCK.get(p.out_format, 1))
    n_units = -(-p.C // unit)
    return -(-n_units // cfg.cluster) * unit


def iters_per_row(p: Problem, cfg: KernelConfig) -> int:
    """Vector loads one thread issues per row (a compile-time loop count)."""
    return -(-chunk_cols(p, cfg) // (cfg.threads_per_row * vec_elems(p, cfg)))


# What the sweep proposes: valid configs whose unrolled row loop stays short. Longer ones take 10-80 s to
# compile and never won (max 10 iterations among the 80 WAN winners on the H100, results/h100); a problem
# with nothing else keeps them (sweep.study.SearchSpace).
MAX_SEARCH_ITERS = 32


def simplicity(cfg: KernelConfig, heur: KernelConfig) -> tuple:
    """Tie-break sort key, smaller = simpler: the heuristic itself, then no cluster, registers-only staging,
    a plain (non-persistent) grid, the weight in registers, no programmatic dependent launch and no L2
    prefetch - the configs with fewest moving parts."""
    return (cfg != heur, cfg.cluster, cfg.stage != "reg", cfg.ctas_per_sm != 0, cfg.weight_smem,
            cfg.pdl, cfg.l2_prefetch)


def smem_bytes(p: Problem, cfg: KernelConfig) -> int:
    """Shared memory the config asks for: staged x tile, weight copy, reduction scratch."""
    e = ELEM_BYTES[p.in_dtype]
    tile = cfg.rows_per_cta * iters_per_row(p, cfg) * cfg.threads_per_row * vec_elems(p, cfg) * e
    total = 0
    if cfg.stage == "smem":
        total += tile
    if cfg.weight_smem:
        total += iters_per_row(p, cfg) * cfg.threads_per_row * vec_elems(p, cfg) * e
    warps_per_row = max(1, cfg.threads_per_row // 32)
    total += cfg.rows_per_cta * warps_per_row * 4 + cfg.rows_per_cta * cfg.cluster * 4 + 64
    return total


def violations(p: Problem, cfg: KernelConfig, arch: int = 90, row_stride: int | None = None) -> list[str]:
    """Every reason `cfg` cannot run `p` on `arch` (empty list = valid).

    `row_stride` (elements) is the actual stride between rows when it differs from C; vector loads
    must stay aligned on every row.
    """
    why = cfg.off_choices(KNOB_CHOICES)
    if why:
        return why
    e = ELEM_BYTES[p.in_dtype]
    v = vec_elems(p, cfg)
    if v < 1:
        why.append(f"vec_bytes={cfg.vec_bytes} is smaller than one {p.in_dtype} element")
        return why
    if p.C % v:
        why.append(f"C={p.C} is not a multiple of the vector ({v} elements); vectors never straddle rows")
    if cfg.stage == "smem" and cfg.vec_bytes < 4:
        why.append("stage=smem copies with cp.async, which moves 4, 8 or 16 bytes")
    stride = p.C if row_stride is None else row_stride
    if (stride * e) % cfg.vec_bytes:
        why.append(f"row stride {stride * e} B is not a multiple of vec_bytes={cfg.vec_bytes}")
    if p.spec.per_head and (p.C * e) % cfg.vec_bytes:
        why.append(f"head_dim {p.C} x {e} B is not a multiple of vec_bytes={cfg.vec_bytes}")
    if cfg.threads_per_row > cfg.threads:
        why.append(f"threads_per_row={cfg.threads_per_row} > threads={cfg.threads}")
    if cfg.threads_per_row * v > max(32 * v, _next_pow2(chunk_cols(p, cfg))):
        why.append(f"threads_per_row x vector = {cfg.threads_per_row * v} elements is wider than the row "
                   f"chunk ({chunk_cols(p, cfg)}): idle threads")
    if cfg.pdl and arch < 90:
        why.append("programmatic dependent launch needs SM90+")
    if cfg.l2_prefetch and not cfg.pdl:
        why.append("l2_prefetch overlaps the wait on the previous kernel, which only pdl has")
    if cfg.cluster > 1:
        if arch < 90:
            why.append("clusters need SM90+")
        if cfg.rows_per_cta != 1:
            why.append("a cluster splits one row: threads_per_row must equal threads")
        if cfg.cluster * v > p.C:
            why.append(f"cluster={cfg.cluster} leaves a CTA without a vector of the row")
    if p.out_format in FP4_BLOCK:
        blk = FP4_BLOCK[p.out_format]
        if v < 2:
            why.append("FP4 packs element pairs into bytes: the vector needs >= 2 elements (vec_bytes >= 4)")
        if blk % v:
            why.append(f"{p.out_format} block {blk} is not a multiple of the vector ({v} elements)")
        elif blk // v > cfg.threads_per_row:
            why.append(f"{p.out_format} block spans {blk // v} lanes but threads_per_row={cfg.threads_per_row}")
    vals = iters_per_row(p, cfg) * v
    if cfg.stage == "reg" and (vals > MAX_REG_VALUES_PER_THREAD or vals * cfg.threads > REG_VALUES_BUDGET):
        why.append(f"{vals} row values per thread x {cfg.threads} threads do not fit in registers; "
                   "use stage=smem, more threads or a cluster")
    if smem_bytes(p, cfg) > MAX_SMEM_BYTES:
        why.append(f"needs {smem_bytes(p, cfg)} B shared memory > {MAX_SMEM_BYTES}")
    return why


def fit_config(p: Problem, cfg: KernelConfig | None, arch: int = 90, row_stride: int | None = None,
               ptr_align: int = 16) -> KernelConfig | None:
    """A tuned config narrowed to what the actual row stride and pointer alignment allow (the vector width),
    then re-checked against every constraint; None when it cannot run the problem."""
    if cfg is None:
        return None
    vb = max_vec_bytes(p, row_stride, ptr_align)
    if cfg.vec_bytes > vb:
        cfg = replace(cfg, vec_bytes=vb)
    return None if violations(p, cfg, arch, row_stride) else cfg


def is_valid(p: Problem, cfg: KernelConfig, arch: int = 90, row_stride: int | None = None) -> bool:
    return not violations(p, cfg, arch, row_stride)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def max_vec_bytes(p: Problem, row_stride: int | None = None, ptr_align: int = 16) -> int:
    """Widest vector (bytes) that keeps every row's loads aligned."""
    e = ELEM_BYTES[p.in_dtype]
    stride_b = _gcd((p.C if row_stride is None else row_stride) * e, p.C * e)
    for vb in (16, 8, 4, 2):
        if stride_b % vb == 0 and ptr_align % vb == 0:
            return vb
    return 2


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


SM_COUNT_GUESS = 132  # H100 SXM; only shapes the grid for small problems
# PDL below this: against the same config without it (pf off, every H200 sweep pair, 2026-12-04, 275 pairs)
# PDL was 25 % faster below 3 MB, 6-8 % at 3-32 MB, 3 % at 32-100 MB and even (1.000) from 100 MB up.
SMALL_PROBLEM_BYTES = 100 << 20  # 100 MiB
# Measurements behind the rules below: the H100 fused_rmsnorm_silu sweeps (bf16 and fp8), now results/h100;
# on those shapes the heuristic reaches 95 % of the tuned geomean (BENCHMARKS.md).


def _threads_per_row(n_vec: int) -> int:
    """Threads sharing a row of n_vec vectors."""
    if n_vec <= 16 and n_vec & (n_vec - 1) == 0:
        return n_vec  # one vector per thread wins for C <= 128 (bf16: 8 lanes at C=64)
    # Few vectors per thread keep loads in flight, but a partial last iteration idles lanes: take the
    # smallest power of two that divides the row into <= 5 iterations (C=640: 16 lanes x 5 beat 32 x 3
    # by 1.5x with fp8 out at T=99840). Short rows too (C=96 bf16: 4 lanes x 3, not 16 lanes with 4 idle):
    # at C=160 (20 vectors) the best one-vector-per-thread config, 12 of 32 lanes idle, was slower than the
    # best idle-free one on 34 of 36 problems, 2.1x geomean (wan_vae sweeps, results/h100 and results/h200).
    tpr = 1
    while n_vec % (2 * tpr) == 0 and n_vec // tpr > 5:
        tpr *= 2
    if n_vec // tpr <= 5:
        return min(1024, tpr)
    return min(1024, _next_pow2(-(-n_vec // 4)))


def heuristic(p: Problem, arch: int = 90, row_stride: int | None = None, ptr_align: int = 16) -> KernelConfig:
    """A valid config for any problem, from the shape alone: the analytical rules below, corrected by the
    learned fallback of `arch` where one is shipped (kernels/luts/fallback_sm<arch>.py, fitted to every sweep
    row of the arch by `lutforge fit-fallback`) and the corrected knobs can run this layout."""
    base = analytical_heuristic(p, arch, row_stride, ptr_align)
    return learned(p, base, arch, row_stride, ptr_align) or base


def analytical_heuristic(p: Problem, arch: int = 90, row_stride: int | None = None,
                         ptr_align: int = 16) -> KernelConfig:
    """A valid config for any problem, from hand rules (the last resort; sm100 has nothing else).

    Aim: 16-byte vectors, a few vector loads in flight per thread without idle lanes, 128 threads per
    CTA (fewer when the problem is too small to give every SM a few CTAs), and programmatic dependent
    launch for small problems, whose time is mostly launch and latency.
    """
    vb = max_vec_bytes(p, row_stride, ptr_align)
    if p.out_format in FP4_BLOCK:
        vb = min(vb, FP4_BLOCK[p.out_format] * ELEM_BYTES[p.in_dtype])
    v = vb // ELEM_BYTES[p.in_dtype]
    n_vec = -(-p.C // v)
    tpr = _threads_per_row(n_vec)
    if p.out_format in FP4_BLOCK:
        tpr = max(tpr, FP4_BLOCK[p.out_format] // v)
    threads = max(128, tpr)
    # Small problems: shrink the CTA until there are >= 2 CTAs per SM (T=1560, C=64: 32 threads,
    # 1.8 us, vs 128 threads, 3.0 us).
    while threads > max(32, tpr) and p.rows and -(-p.rows // (threads // tpr)) < 2 * SM_COUNT_GUESS:
        threads //= 2
    small = ideal_bytes(p) < SMALL_PROBLEM_BYTES
    # PDL won at every T=1560 and T=6240 shape of the WAN set (up to 1.8x with the CTA rule above).
    pdl = arch >= 90 and small
    # Prefetching x into L2 during the wait pays while the grid fits in a wave or two: against the same PDL
    # config without it (every H200 sweep pair, 2026-12-04, 351 pairs) it was 14 % faster at <= 1/4 wave,
    # 10 % at 1/4-1/2, 2 % at 1/2-1, 0.5 % at 1-2 waves and even beyond (0.999-1.000 geomean); with PDL
    # only below SMALL_PROBLEM_BYTES it is never a loss on average.
    prefetch = pdl
    cfg = KernelConfig(threads=threads, threads_per_row=tpr, vec_bytes=vb, pdl=pdl, l2_prefetch=prefetch)
    if is_valid(p, cfg, arch, row_stride):
        return cfg
    cfg = KernelConfig(threads=threads, threads_per_row=tpr, vec_bytes=vb)  # without PDL
    if is_valid(p, cfg, arch, row_stride):
        return cfg
    # Long rows: spread over a cluster (SM90+) or stage x through shared memory.
    candidates = []
    if arch >= 90:
        candidates += [KernelConfig(threads=1024, threads_per_row=1024, vec_bytes=vb, cluster=c) for c in (2, 4, 8)]
    candidates += [KernelConfig(threads=1024, threads_per_row=1024, vec_bytes=vb, stage="smem")]
    for c in candidates:
        if is_valid(p, c, arch, row_stride):
            return c
    # Last resort: smallest vector, one row per CTA, staged (valid for any C the smem can hold).
    for vb2 in (vb, 2):
        c = KernelConfig(threads=1024, threads_per_row=1024, vec_bytes=vb2, stage="smem",
                         cluster=8 if arch >= 90 else 1)
        if is_valid(p, c, arch, row_stride):
            return c
    raise ValueError(f"no valid kernel config for {p} with row_stride={row_stride} and {ptr_align}-byte aligned "
                     f"data: C is too large, or the data too misaligned for the output format (FP4 needs "
                     f">= 4-byte alignment)")


# The learned fallback: a generated decision tree maps shape features to corrections of the analytical rules,
# written *relative* to the problem (vectors per thread along the row, rows per CTA, ...) so that one leaf
# transfers across row lengths. `relative_of` and `from_relative` convert between knobs and that form.
RELATIVE_KNOBS = ("vec_bytes", "vectors_per_thread", "threads", "rows_per_cta", "cluster", "stage", "ctas_per_sm",
                  "weight_smem", "pdl", "l2_prefetch")
OUT_BITS = {"bf16": 16, "fp16": 16, "fp8": 8, "nvfp4": 4, "mxfp4": 4}


def fallback_features(p: Problem, row_stride: int | None = None, ptr_align: int = 16) -> dict:
    """What the learned tree may split on (all cheap integers)."""
    return {"C": p.C, "rows": p.rows, "ideal_bytes": ideal_bytes(p), "out_bits": OUT_BITS[p.out_format],
            "per_head": int(p.spec.per_head), "residual": int(p.spec.residual),
            "max_vec": max_vec_bytes(p, row_stride, ptr_align)}


def _row_vectors(p: Problem, vec_bytes: int, cluster: int) -> int:
    """Vectors of the row one CTA of a `cluster` owns."""
    n_vec = -(-p.C // (vec_bytes // ELEM_BYTES[p.in_dtype]))
    return -(-n_vec // cluster)


def relative_of(p: Problem, cfg: KernelConfig) -> dict:
    """`cfg` relative to `p`: the CTA as threads (or, where a correction says so, as rows_per_cta) and the row
    split as vectors per thread instead of threads_per_row."""
    d = cfg.as_dict()
    d["vectors_per_thread"] = round(_row_vectors(p, cfg.vec_bytes, cfg.cluster) / d.pop("threads_per_row"), 4)
    return d


def from_relative(p: Problem, rel: dict, arch: int = 90, row_stride: int | None = None,
                  ptr_align: int = 16) -> KernelConfig | None:
    """Knobs for `p` from a relative config: the vector narrowed to what the layout (and an FP4 block) allows,
    threads_per_row the power of two nearest to (CTA's vectors / vectors_per_thread), threads as given (at
    least one row) or rows_per_cta x threads_per_row within 32..1024; None when that cannot run `p`."""
    vb = min(rel["vec_bytes"], max_vec_bytes(p, row_stride, ptr_align))
    blk = FP4_BLOCK.get(p.out_format)
    if blk:
        vb = min(vb, blk * ELEM_BYTES[p.in_dtype])
    v, cluster = vb // ELEM_BYTES[p.in_dtype], rel["cluster"]
    if v < 1:
        return None
    x = _row_vectors(p, vb, cluster) / rel["vectors_per_thread"]
    tpr = 1 << min(10, max(0, math.floor(math.log2(x) + 0.5))) if x >= 1 else 1
    if blk:
        tpr = max(tpr, blk // v)
    tpr = min(tpr, max(32, _next_pow2(chunk_cols(p, KernelConfig(vec_bytes=vb, cluster=cluster))) // v))
    if cluster > 1:
        threads = tpr
    elif rel.get("rows_per_cta"):
        threads = min(1024, max(32, tpr * rel["rows_per_cta"]))
    else:
        threads = max(rel["threads"], tpr)
    cfg = KernelConfig(threads=threads, threads_per_row=tpr, vec_bytes=vb, cluster=cluster, stage=rel["stage"],
                       ctas_per_sm=rel["ctas_per_sm"], weight_smem=rel["weight_smem"], pdl=rel["pdl"],
                       l2_prefetch=rel["l2_prefetch"])
    return None if violations(p, cfg, arch, row_stride) or ptr_align % vb else cfg


def corrected(p: Problem, base: KernelConfig, correction: dict, arch: int = 90, row_stride: int | None = None,
              ptr_align: int = 16) -> KernelConfig | None:
    """`base` (the analytical rules' config) with a learned correction: the relative knobs it names replace
    base's; None when the result cannot run `p`."""
    return from_relative(p, relative_of(p, base) | correction, arch, row_stride, ptr_align)


def probes(p: Problem, arch: int = 90) -> list[KernelConfig]:
    """The analytical config and its one-step corrections, most telling first: what every sweep times beside
    the heuristic so that each problem measures the same corrections.

    Why: the learned fallback can only adopt a correction measured on most problems it changes
    (sweep.fallback_fit), and a search's own trials rarely coincide between problems; the analytical config
    itself is no longer trial 0 wherever the learned fallback changes it. Each probe is a correction the
    fit can name (relative knobs, kernels.config.RELATIVE_KNOBS), so its leaves draw on measured evidence."""
    base = analytical_heuristic(p, arch)
    vpt = relative_of(p, base)["vectors_per_thread"]
    steps = [{"pdl": True, "l2_prefetch": not (base.pdl and base.l2_prefetch)},
             {"pdl": not base.pdl, "l2_prefetch": False},
             {"vectors_per_thread": vpt / 2}, {"vec_bytes": base.vec_bytes // 2},
             {"threads": min(1024, base.threads * 2)}, {"rows_per_cta": 1}, {"stage": "smem"},
             {"vectors_per_thread": vpt * 2}, {"threads": max(32, base.threads // 2)}, {"weight_smem": True},
             {"ctas_per_sm": 4}]
    out = [base]
    for step in steps:  # a step the problem cannot run (PDL before SM90, a 1-byte vector, ...) gives None
        cfg = corrected(p, base, step, arch)
        if cfg is not None and cfg not in out:
            out.append(cfg)
    return out


@functools.lru_cache(maxsize=None)
def _shipped_choose(arch: int):
    """`choose` of the shipped learned fallback for `arch`; None when there is none, or it does not load (logged:
    the analytical rules then answer alone, as for an arch without a model)."""
    name = f".luts.fallback_sm{arch}"
    try:
        return importlib.import_module(name, __package__).choose
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}{name}":
            logging.getLogger(__name__).error("learned fallback %s does not load: %s", name, e)
    except Exception as e:  # a broken generated module must not take the runtime down
        logging.getLogger(__name__).error("learned fallback %s does not load: %s", name, e)
    return None


def learned(p: Problem, base: KernelConfig, arch: int = 90, row_stride: int | None = None, ptr_align: int = 16,
            choose=None) -> KernelConfig | None:
    """The learned fallback's config for `p` (`choose`: a tree's function, default the shipped one of `arch`):
    its leaf's correction applied to `base`; None when there is no tree, the leaf corrects nothing or the
    corrected knobs cannot run this layout."""
    choose = choose or _shipped_choose(arch)
    if choose is None:
        return None
    correction = choose(**fallback_features(p, row_stride, ptr_align))
    return corrected(p, base, correction, arch, row_stride, min(ptr_align, 16)) if correction else None
