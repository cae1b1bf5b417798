"""The harness side of each kernel family: what the sweep, bench, report and heatmap need besides the runtime
side (kernels.family), one module per family named after it (sweep/families/<family name>.py).

The runtime declaration (problem key, knobs, constraints, heuristic, bytes model, compile and launch) is
kernels.family.Family; the harness adds, per family, what only measuring and presenting need: labels for
tables and axes, the study-name parts, the synthetic cost model CI times with, the peers it is benched
beside, the host-cost calls and the compile-check cases. Shared harness modules ask `harness(family)` and
never name a family, so a new family is a kernels module registered in kernels.family plus one module here.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from kernels.family import Family, families, family_of


@dataclass(frozen=True, eq=False)
class Harness:
    # labels
    x_title: str  # the heatmap's x axis (the runtime size): "tokens T"
    x_symbol: str  # the same in a hover line: "T"
    c_title: Callable[[object], str]  # the heatmap's y axis for a facet key dict: "hidden C"
    shape_header: str  # the report's shape column
    shape_text: Callable[[object], str]  # a result row's shape as the report prints it
    size_label: Callable[[object], str]  # a result row's runtime size (heatmap columns, bench tables)
    facet_fields: tuple[str, ...]  # problem columns besides family/op/formats that split heatmap facets
    facet_subtitle: Callable[[dict], str]  # a facet's second title line from its key values
    # (count, kind, (headers, rows, footer lines)) of a problem set of this family: `lutforge problems`
    describe_set: Callable[[object], tuple]
    # problems
    scale_layouts: Callable[[str, str], tuple]  # (op, out format) -> the FP4 block-scale layouts it writes
    inline_problems: Callable[..., list]  # (op, --shapes tuples, in_dtype, out, layout) -> problems, or ValueError
    # studies
    study_parts: Callable[[object], list]  # name parts besides op, formats, size token and C
    size_token: Callable[[object], str]  # the runtime-size part of a study name (siblings differ only there)
    # measurement
    peer_unsupported: Callable[[object, str], str | None]  # why a peer cannot run a problem (None: it can)
    peer_build: Callable[..., tuple]  # (impl, problem, case) -> (launch, write_back)
    host_calls: Callable[..., dict]  # (problem, device) -> impl -> zero-argument eager call
    # CPU
    synthetic_us: Callable[[object, object], float]  # the cost model's kernel time
    synthetic_smem: Callable[[object, object], int]  # shared memory of a config (the synthetic "compile")
    compile_cases: Callable[..., tuple]  # (arch, configs, quick) -> (cases, compile_fn, label_fn, noun)
    # kernel launches one host-cost call of the family's busiest impl enqueues: sweep/host_cost.py keeps its
    # back-to-back calls below the launch queue's depth, or the loop would wait for the GPU
    host_launches: int = 1


def harness(fam: Family | str) -> Harness:
    """The harness side of a family (by Family or name)."""
    name = fam if isinstance(fam, str) else fam.name
    if name not in families():
        raise ValueError(f"unknown kernel family {name!r}; known: {', '.join(families())}")
    return importlib.import_module(f"{__name__}.{name}").HARNESS


def harness_of(problem) -> Harness:
    return harness(family_of(problem))


def facet_fields() -> list[str]:
    """Every family's facet fields, registration order, once each."""
    return list(dict.fromkeys(f for name in families() for f in harness(name).facet_fields))
