"""Exact and range tables from per-problem winners.

The range table covers every T of a (op, out, layout, dtype, C, heads) family: a swept point's config
holds from the geometric mean with its lower neighbour up to the geometric mean with its upper one (the
rule flashinfer's rmsnorm_silu table uses); neighbours that share a config are merged. Beyond the swept
T, the outermost winners answer up to EXTRAPOLATE times further; past that a segment holds None and the
runtime asks its later tiers. A winner says little about T far from where it won: at 32768 rows one was
1.3x slower than the heuristic at 2 rows (H100), and on the H200 the rmsnorm C=64 winner at T=1560 ran
0.66x, 0.33x and 0.27x of the heuristic's speed at 4x, 16x and 64x its T
(results/h200/bench/bench-f73340197abc.parquet), so the outermost winners reach as far as interior ones
(2x on the WAN set's 4x-spaced T).
"""
from __future__ import annotations

from math import isqrt

from kernels.config import KernelConfig


def breakpoint_between(t_lo: int, t_hi: int) -> int:
    """First T that belongs to `t_hi`: ceil(sqrt(t_lo * t_hi)), kept strictly above t_lo."""
    if not (isinstance(t_lo, int) and isinstance(t_hi, int)) or not 0 <= t_lo < t_hi:
        raise ValueError(f"need 0 <= t_lo < t_hi, got {t_lo}, {t_hi}")
    n = t_lo * t_hi
    r = isqrt(n)
    if r * r < n:
        r += 1
    return max(r, t_lo + 1)


EXTRAPOLATE = 2


def range_segments(points: dict[int, KernelConfig],
                   extrapolate: int = EXTRAPOLATE) -> list[tuple[int | None, KernelConfig | None]]:
    """[(T_below, config or None), ...] covering all T >= 0: a T < T_below of the first segment it fits;
    the last T_below is None. Consecutive segments with the same config are merged; None segments lie
    more than `extrapolate` times outside the swept T."""
    if not points:
        raise ValueError("a range needs at least one swept T")
    ts = sorted(points)
    segments: list[tuple[int | None, KernelConfig | None]] = []
    if ts[0] // extrapolate >= 1:
        segments.append((ts[0] // extrapolate, None))
    for i, t in enumerate(ts):
        bound = breakpoint_between(t, ts[i + 1]) if i + 1 < len(ts) else max(ts[-1], 1) * extrapolate + 1
        if segments and segments[-1][1] == points[t]:
            segments[-1] = (bound, points[t])
        else:
            segments.append((bound, points[t]))
    return segments + [(None, None)]


def build_tables(winners: dict[tuple, object]) -> tuple[dict, dict]:
    """(EXACT, RANGE) from {EXACT key: config} of any kernel family; RANGE for the families that have one
    (the row family, along T)."""
    from kernels.family import family_of_key

    exact = dict(sorted(winners.items()))  # two families' keys differ in their first item, the op
    families: dict[tuple, dict[int, KernelConfig]] = {}
    for key, cfg in exact.items():
        if family_of_key(key).has_range:
            families.setdefault(key[:-1], {})[key[-1]] = cfg
    return exact, {k: range_segments(v) for k, v in sorted(families.items())}
