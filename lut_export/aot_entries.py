"""What the ahead-of-time library holds: every config dispatch can return, over all T, for the row-problem
families the shipped LUTs cover and for families a user declares (ops x row lengths x formats), plus the
exact entries of the other kernel families (channel-first: one config per swept problem)."""
from __future__ import annotations

from kernels.dispatch import default_dispatcher
from kernels.family import family_of_key
from kernels.luts import load_shipped
from kernels.problem import Problem
from kernels.warmup import families, reachable_configs


def lut_families(arch: int) -> tuple[dict[str, list[Problem]], dict[str, list[tuple]]]:
    """Per device class of the shipped LUT modules of `arch`: the (T-free) row-problem families its module
    answers, and the (problem, config) exact entries of its other kernel families, read in one pass."""
    rows: dict[str, list[Problem]] = {}
    others: dict[str, list[tuple]] = {}
    for lut in load_shipped():
        if lut.arch != arch:
            continue
        fams, exact = set(), []
        for key, knobs in lut.exact.items():
            f = family_of_key(key)
            if f.name != "row":
                exact.append((f.problem_of_key(key), f.config_type(**knobs)))
        for key in [k for k in [*lut.exact, *lut.range] if family_of_key(k).name == "row"]:
            op, fmt, layout, dt, C, heads = key[:6]
            fams.add(Problem(op, 0, C, dt, fmt, heads, layout))
        rows[lut.device_class] = sorted(fams, key=repr)
        others[lut.device_class] = exact
    return rows, others


def declared_families(ops, Cs, in_dtypes, out_formats, heads: int = 1) -> list[Problem]:
    fams = []
    for op in ops:
        for C in Cs:
            fams += families(op, int(C), in_dtypes, out_formats, heads)
    return fams


def entries(arch: int, device_classes, declared: list[Problem]) -> list[tuple[Problem, object]]:
    """(family, config) pairs to compile: for each device class (its LUT's families plus the declared ones)
    every config dispatch returns across T; with no class, the heuristic's answers for the declared ones."""
    default_dispatcher()
    by_class, exact_by_class = lut_families(arch)
    classes = list(device_classes) if device_classes else sorted(by_class) or [None]
    out, seen = [], set()
    for cls in classes:
        out += exact_by_class.get(cls, [])  # other families' exact entries, as they are
    for cls in classes:
        for fam in by_class.get(cls, []) + list(declared):
            for cfg in reachable_configs(fam, arch, cls):
                if (fam, cfg) not in seen:
                    seen.add((fam, cfg))
                    out.append((fam, cfg))
    return out
