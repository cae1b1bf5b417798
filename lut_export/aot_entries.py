"""What the ahead-of-time library holds: every config dispatch can return, over every runtime size, for the
problems of the families with a RANGE table that the shipped LUTs cover (row norms over T, fused-MoE layers
over T) and for row families a user declares (ops x row lengths x formats), plus the exact entries of the
other kernel families (channel-first: one config per swept problem)."""
from __future__ import annotations

from kernels.dispatch import default_dispatcher
from kernels.family import family_of_key
from kernels.luts import load_shipped
from kernels.problem import Problem
from kernels.warmup import families, reachable_configs


def lut_families(arch: int) -> tuple[dict[str, list], dict[str, list[tuple]]]:
    """Per device class of the shipped LUT modules of `arch`: the size-free problems (runtime size 0) of the
    families with a RANGE table (row norms, fused MoE) its module answers, whose every size dispatch walks,
    and the (problem, config) exact entries of the other families, read in one pass."""
    walked: dict[str, list] = {}
    others: dict[str, list[tuple]] = {}
    for lut in load_shipped():
        if lut.arch != arch:
            continue
        fams, exact = set(), []
        for key, knobs in lut.exact.items():
            f = family_of_key(key)
            if f.has_range:
                fams.add(f.from_key(*key[:-1], 0))
            else:
                exact.append((f.problem_of_key(key), f.config_type(**knobs)))
        for key in lut.range:
            fams.add(family_of_key(key).from_key(*key, 0))
        walked[lut.device_class] = sorted(fams, key=repr)
        others[lut.device_class] = exact
    return walked, others


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
