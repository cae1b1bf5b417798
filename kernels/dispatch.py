"""Runtime choice of kernel knobs for a problem: exact LUT entry -> range along T -> analytical heuristic.

Problems of every kernel family (kernels.family) are answered here: the row family by all three tiers,
the channel-first family by its exact entries (keyed (op, out, in, C, N, S)) and then its own heuristic.

There is no guess from a neighbouring C: knobs tuned for another row length (and another T) lost to the
heuristic on the H100 (rmsnorm_quant fp8 32768x16384 with C=7168's config: 2.5x slower; geomean 0.90x over
the 10 benched shapes that tier answered), so an unswept C gets the heuristic, which is within a few percent
of the tuned configs on most shapes (BENCHMARKS.md).

Tables are per arch and device class (H100 and H200 are both sm90 but differ in bandwidth): only the
caller's class answers, and a class with no module of its own gets the heuristic. Another class's knobs lost
to the heuristic: on the H200 the H100 table's answers for 24 LLM rmsnorm shapes were 0.92x of the
heuristic's speed (geomean, worst 0.81x; results/h200/bench/bench-0767dc6d4549.parquet). A caller that names
no class gets every module of the arch, by name. Whatever a table
says, the answer is re-checked against the actual shape, row stride and pointer alignment (the vector
width is narrowed when the data is less aligned than the tuned case), so dispatch never returns a config
the kernel cannot run. Answers are memoised: a repeated call costs a dict hit, not a search.
"""
from __future__ import annotations

import bisect
import functools
import logging
import re
from dataclasses import dataclass, replace

from .config import KernelConfig
from .family import family_of, family_of_key
from .luts import LutModule, exact_key, load_shipped, read_lut
from .problem import ELEM_BYTES, Problem

TIERS = ("exact", "range", "heuristic")
CACHE_SIZE = 65536  # memoised (problem, arch, class, stride, alignment) answers; T varies per batch
T_MAX = 1 << 24  # largest token count `segments` walks (16.7M rows: past every heuristic threshold)

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Selection:
    """A dispatch answer and where it came from (for `lutforge explain` and logs)."""

    config: object  # the problem family's config (KernelConfig for the row family)
    tier: str  # one of TIERS
    source: str | None = None  # LUT module that answered
    key: tuple | None = None  # the LUT key that answered (EXACT_KEY or RANGE_KEY layout)


class _LutIndex:
    """One LUT module arranged for lookup: configs as their family's config type, ranges as sorted
    breakpoints (row family)."""

    def __init__(self, lut: LutModule):
        self.name = lut.name
        self.arch = lut.arch
        self.device_class = lut.device_class
        self.exact: dict[tuple, object] = {}
        self.range: dict[tuple, tuple[list[int], list[KernelConfig | None]]] = {}
        bad = 0
        for key, knobs in lut.exact.items():
            try:
                fam = family_of_key(key)
                why = fam.key_error(key)
                if why:
                    raise ValueError(why)
                self.exact[key] = fam.config_type.from_dict(knobs)
            except (TypeError, ValueError, AttributeError):
                bad += 1
        for key, segments in lut.range.items():
            try:
                fam = family_of_key(key)
                why = fam.range_key_error(key)
                if why:
                    raise ValueError(why)
                bounds = [int(b) for b, _ in segments[:-1]]
                if segments[-1][0] is not None or bounds != sorted(bounds):
                    raise ValueError("segments must ascend and end unbounded")
                self.range[key] = (bounds, [None if k is None else fam.config_type.from_dict(k) for _, k in segments])
            except (TypeError, ValueError, AttributeError, IndexError):
                bad += 1
        if bad:
            _log.error("LUT module %s: skipped %d malformed entries (run `lutforge validate`)", self.name, bad)

    def at(self, key: tuple, T: int) -> KernelConfig | None:
        """The range table's config for T under `key` (None if the key is absent or T lies too far from the
        swept T for the table to answer)."""
        entry = self.range.get(key)
        if entry is None:
            return None
        bounds, cfgs = entry
        return cfgs[bisect.bisect_right(bounds, T)]


class Dispatcher:
    """Lookup over a set of LUT modules; `select_config` below uses the modules shipped in kernels/luts/."""

    def __init__(self, luts=()):
        self._indexes = []
        for lut in luts:
            if not isinstance(lut, LutModule):
                raise TypeError(f"expected LutModule, got {type(lut).__name__}")
            if isinstance(lut.arch, bool) or not isinstance(lut.arch, int) or not isinstance(lut.device_class, str):
                _log.error("skipping LUT module %s: METADATA needs int arch and str device_class", lut.name)
                continue
            self._indexes.append(_LutIndex(lut))
        self._indexes.sort(key=lambda i: i.name)
        self._logged: set = set()
        self._answers: dict[tuple, Selection] = {}  # memo keyed by the caller's arguments as given
        self._tables = functools.lru_cache(maxsize=None)(self._tables_uncached)

    @classmethod
    def from_paths(cls, paths) -> "Dispatcher":
        """A dispatcher over LUT module files (e.g. a freshly exported one, before it ships)."""
        return cls([read_lut(p) for p in paths])

    @property
    def modules(self) -> list[str]:
        return [i.name for i in self._indexes]

    def _tables_uncached(self, arch: int, device_class: str | None) -> tuple[_LutIndex, ...]:
        same_arch = [i for i in self._indexes if i.arch == arch]
        return tuple(i for i in same_arch if device_class is None or i.device_class == device_class)

    def lookup(self, problem, arch: int, device_class: str | None = None,
               row_stride: int | None = None, ptr_align: int = 16, stride_gcd: int | None = None) -> Selection:
        """The config for `problem` and the tier that answered; see the module docstring for the order.

        Row family: `row_stride` is the distance between rows in elements when it is not C. Channel-first
        family: `stride_gcd` is the gcd (elements) of S and the C and N strides of x and y (None: S)."""
        args = (problem, arch, device_class, row_stride, ptr_align, stride_gcd)
        try:
            hit = self._answers.get(args)
        except TypeError:  # an unhashable argument: let the checks below name it
            hit = None
        if hit is not None:
            return hit
        fam = family_of(problem)  # TypeError for anything that is no family's problem
        if type(arch) is not int:
            raise TypeError(f"arch must be an int such as 90 (sm_90a), got {arch!r}")
        if arch <= 0:
            raise ValueError(f"arch must be positive, got {arch}")
        if device_class is not None:
            if not isinstance(device_class, str):
                raise TypeError(f"device_class must be str or None, got {type(device_class).__name__}")
            device_class = device_class.lower()
        if fam.name != "row":
            if row_stride is not None:
                raise ValueError(f"row_stride applies to row problems; {fam.name} problems take stride_gcd")
            if stride_gcd is not None and (type(stride_gcd) is not int or stride_gcd < 1):
                raise ValueError(f"stride_gcd must be a positive int, got {stride_gcd!r}")
            row_stride = stride_gcd
        elif stride_gcd is not None:
            raise ValueError("stride_gcd applies to channel-first problems; row problems take row_stride")
        elif row_stride is not None:
            if type(row_stride) is not int or row_stride < problem.C:
                raise ValueError(f"row_stride must be an int >= C={problem.C} (elements), got {row_stride!r}")
            if row_stride == problem.C:
                row_stride = None
        if type(ptr_align) is not int or ptr_align < ELEM_BYTES[problem.in_dtype] or ptr_align & (ptr_align - 1):
            raise ValueError(f"ptr_align must be a power of two >= the {problem.in_dtype} element size "
                             f"({ELEM_BYTES[problem.in_dtype]} B), got {ptr_align!r}")
        sel = self._lookup(problem, arch, device_class, row_stride, min(ptr_align, 16))
        if len(self._answers) >= CACHE_SIZE:
            self._answers.clear()
        self._answers[args] = sel
        return sel

    def select_config(self, problem: Problem, arch: int, device_class: str | None = None,
                      row_stride: int | None = None, ptr_align: int = 16) -> tuple[KernelConfig, str]:
        s = self.lookup(problem, arch, device_class, row_stride, ptr_align)
        return s.config, s.tier

    def segments(self, family, arch: int, device_class: str | None = None, row_stride: int | None = None,
                 ptr_align: int = 16, t_max: int = T_MAX) -> list[tuple[int, int, Selection]]:
        """Every answer dispatch gives for `family` (a problem of a family with a RANGE table, its runtime size
        ignored: T of the row norms and of the fused MoE) over sizes 1..t_max, as (first, last, selection)
        runs: what a warm-up must compile so that no later size compiles. The answer is piecewise constant in
        the size; its change points are the LUT's exact sizes (and ±1), its range bounds, and the heuristic's
        thresholds (each monotone in the size), found by bisection between powers of two."""
        fam = family_of(family)
        if not fam.has_range:
            raise ValueError(f"the {fam.name} family has no runtime-size axis to walk (its LUT is exact entries)")
        size = fam.key_fields[-1]

        def sized(T: int):
            return replace(family, **{size: T})

        def at(T: int) -> Selection:
            return self.lookup(sized(T), arch, device_class, row_stride, ptr_align)

        points = {1, t_max}
        rkey = fam.key(family)[:-1]
        for t in self._tables(arch, device_class.lower() if device_class else None):
            for key in t.exact:
                if key[:-1] == rkey:
                    points.update((key[-1] - 1, key[-1], key[-1] + 1))
            if rkey in t.range:
                for b in t.range[rkey][0]:
                    points.update((b - 1, b))

        def heur(T: int):
            return fam.heuristic(sized(T), arch, row_stride, ptr_align)

        grid = sorted({min(t_max, 1 << i) for i in range(t_max.bit_length() + 1)})

        def split(lo: int, hi: int) -> None:  # heur(lo) != heur(hi): find every change point between them
            if hi - lo <= 1:
                points.update((lo, hi))
                return
            mid = (lo + hi) // 2
            cm = heur(mid)
            if cm != heur(lo):
                split(lo, mid)
            if cm != heur(hi):
                split(mid, hi)

        for lo, hi in zip(grid, grid[1:]):
            if heur(lo) != heur(hi):
                split(lo, hi)
        runs: list[tuple[int, int, Selection]] = []
        ts = sorted(t for t in points if 1 <= t <= t_max)
        for i, T in enumerate(ts):
            sel = at(T)
            if runs and runs[-1][2] == sel:
                runs[-1] = (runs[-1][0], T, sel)
            else:
                if runs:  # the previous answer holds up to the point before this one
                    runs[-1] = (runs[-1][0], T - 1, runs[-1][2])
                runs.append((T, T, sel))
        if runs:
            runs[-1] = (runs[-1][0], t_max, runs[-1][2])
        return runs

    def _lookup(self, p, arch: int, device_class, stride, ptr_align) -> Selection:
        fam = family_of(p)

        def fit(cfg):  # the tuned config made to fit the actual stride/alignment, every constraint re-checked
            return fam.fit(p, cfg, arch, stride, ptr_align)

        tables = self._tables(arch, device_class)
        ekey = exact_key(p)
        for t in tables:
            cfg = fit(t.exact.get(ekey))
            if cfg is not None:
                return Selection(cfg, "exact", t.name, ekey)
        if fam.has_range:
            rkey = ekey[:-1]
            for t in tables:
                cfg = fit(t.at(rkey, p.T))
                if cfg is not None:
                    return Selection(cfg, "range", t.name, rkey)
        cfg = fam.heuristic(p, arch, stride, ptr_align)
        why = fam.violations(p, cfg, arch, stride, ptr_align)
        if why or ptr_align % getattr(cfg, "vec_bytes", 1):  # the fused MoE's GEMMs need 16 B, checked by the op
            raise ValueError(f"no valid config for {p} on sm{arch} (stride={stride}, ptr_align={ptr_align}): "
                             f"heuristic gave {cfg.short()}: {'; '.join(why) or 'vector wider than alignment'}")
        sel = Selection(cfg, "heuristic")
        self._log_fallback(p, arch, device_class, sel)
        return sel

    def _log_fallback(self, p: Problem, arch: int, device_class, sel: Selection) -> None:
        shape_class = (arch, device_class, p.op, p.out_format, p.scale_layout, p.in_dtype, p.C, p.heads)
        if shape_class in self._logged:
            return
        self._logged.add(shape_class)
        where = f"sm{arch}" + (f"/{device_class}" if device_class else "")
        _log.info("no tuned entry for %s %s->%s (%s) C=%d heads=%d on %s; using the analytical heuristic: %s",
                  p.op, p.in_dtype, p.out_format, p.scale_layout, p.C, p.heads, where, sel.config.short())


_default: Dispatcher | None = None


def default_dispatcher() -> Dispatcher:
    """The dispatcher over the LUT modules shipped in kernels/luts/ (loaded on first use)."""
    global _default
    if _default is None:
        _default = Dispatcher(load_shipped())
    return _default


_ON_RELOAD: list = []  # callables clearing the caches of ops that memoise dispatch answers per call signature


def on_reload(clear) -> None:
    """Register `clear` to run whenever reload_luts forgets the LUTs (an op's plan cache holds their answers)."""
    _ON_RELOAD.append(clear)


def reload_luts() -> None:
    """Forget the loaded LUTs and memoised answers (after kernels/luts/ changed on disk), the ops' plan caches
    included: a call after it dispatches from the modules on disk."""
    global _default
    _default = None
    for clear in _ON_RELOAD:
        clear()


def select_config(problem: Problem, arch: int, device_class: str | None = None,
                  row_stride: int | None = None, ptr_align: int = 16) -> tuple[KernelConfig, str]:
    """(config, tier) for `problem` on `arch`; tier is one of TIERS.

    `arch` is the compile target's number (90 for sm_90a, 100 for sm_100a: compile_cache.arch_number),
    `device_class` what device_class_of(device name) gives. `row_stride` is the distance between rows in
    elements when it is not C; `ptr_align` the byte alignment of the data pointers (the smallest over
    the tensors the kernel reads and writes).
    """
    s = (_default or default_dispatcher()).lookup(problem, arch, device_class, row_stride, ptr_align)
    return s.config, s.tier


def device_class_of(device_name: str) -> str:
    """The device class a LUT is keyed by, from a CUDA device name: "NVIDIA H100 80GB HBM3" -> "h100",
    "NVIDIA H100 PCIe" -> "h100_pcie" (different bandwidth, so a different class), "NVIDIA B200" -> "b200".
    Sweeps record the same string in the `device_class` column, so LUT modules and runtime agree."""
    if not isinstance(device_name, str) or not device_name.strip():
        raise ValueError(f"device_name must be a non-empty str, got {device_name!r}")
    m = re.search(r"\b(G?[A-Z]{1,2}\d{2,4}[A-Z]?)\b", device_name.upper())
    if m is None:  # no datacenter model token (e.g. "NVIDIA GeForce RTX 4090"): the whole name, as a slug
        return re.sub(r"[^a-z0-9]+", "_", device_name.lower().replace("nvidia", "")).strip("_")
    cls = m.group(1).lower()
    for variant in ("PCIE", "NVL"):
        if re.search(rf"\b{variant}\b", device_name.upper()):
            cls += "_" + variant.lower()
    return cls
