"""Named sets of problem shapes, one TOML file per set, expanded to kernels.problem.Problem lists.

A set file holds a ``description`` and an ``[axes]`` table whose lists are crossed (cartesian product):
either ``hidden`` x ``tokens`` (row ops: C = hidden) or ``head_dim`` x ``heads`` x ``tokens`` (per-head
ops such as qk_rmsnorm: C = head_dim, rows = tokens * heads). The set name is the file name's stem.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from kernels.problem import OPS, Problem

SETS_DIR = Path(__file__).resolve().parent
ROW_AXES = ("hidden", "tokens")
PER_HEAD_AXES = ("head_dim", "heads", "tokens")
_TOP_KEYS = ("description", "axes")


@dataclass(frozen=True)
class ProblemSet:
    """One named set: shapes are (T, C, heads) tuples; heads is 1 for row sets."""

    name: str
    description: str
    per_head: bool
    shapes: list[tuple[int, int, int]]


def _dir(directory) -> Path:
    d = SETS_DIR if directory is None else Path(directory)
    if not d.is_dir():
        raise ValueError(f"problem-set directory {str(d)!r} does not exist")
    return d


def list_sets(directory=None) -> list[str]:
    """Names of the sets in `directory` (default: the shipped sets), sorted."""
    return sorted(p.stem for p in _dir(directory).glob("*.toml"))


def _axis(path: Path, axes: dict, key: str, minimum: int) -> list[int]:
    values = axes[key]
    where = f"{path.name}: axes.{key}"
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where} must be a non-empty list of integers")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"{where} must hold integers >= {minimum}, got {v!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{where} has duplicate values")
    return values


def load(name: str, directory=None) -> ProblemSet:
    """Read and validate one set; ValueError names the file and the offending field."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"set name must be a non-empty string, got {name!r}")
    d = _dir(directory)
    path = d / f"{name}.toml"
    if "/" in name or "\\" in name or not path.is_file():
        raise ValueError(f"unknown problem set {name!r}; known: {', '.join(list_sets(directory)) or '(none)'}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path.name}: not valid TOML: {e}") from None
    unknown = set(data) - set(_TOP_KEYS)
    if unknown:
        raise ValueError(f"{path.name}: unknown field(s) {sorted(unknown)}; allowed: {', '.join(_TOP_KEYS)}")
    description = data.get("description")
    if not isinstance(description, str) or not description.strip():
        raise ValueError(f"{path.name}: description must be a non-empty string")
    axes = data.get("axes")
    if not isinstance(axes, dict):
        raise ValueError(f"{path.name}: axes must be a table ([axes])")
    if set(axes) == set(ROW_AXES):
        hidden, tokens = _axis(path, axes, "hidden", 1), _axis(path, axes, "tokens", 1)
        shapes = [(t, c, 1) for c, t in itertools.product(hidden, tokens)]
        per_head = False
    elif set(axes) == set(PER_HEAD_AXES):
        dims, heads = _axis(path, axes, "head_dim", 1), _axis(path, axes, "heads", 1)
        tokens = _axis(path, axes, "tokens", 1)
        shapes = [(t, d_, h) for d_, h, t in itertools.product(dims, heads, tokens)]
        per_head = True
    else:
        raise ValueError(f"{path.name}: axes must be exactly {{{', '.join(ROW_AXES)}}} or "
                         f"{{{', '.join(PER_HEAD_AXES)}}}, got {sorted(axes)}")
    return ProblemSet(name=name, description=description.strip(), per_head=per_head, shapes=shapes)


def problems(set_name: str, op: str, in_dtype: str, out_format: str, scale_layout: str = "rowmajor",
             directory=None) -> list[Problem]:
    """The set's shapes as Problems for one op/dtype/output format (Problem validates the combination)."""
    ps = load(set_name, directory)
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    if OPS[op].per_head != ps.per_head:
        def kind(per_head: bool) -> str:
            return "per-head" if per_head else "row"
        raise ValueError(f"{op} is a {kind(OPS[op].per_head)} op but set {set_name!r} is a {kind(ps.per_head)} set; "
                         f"use a set with axes {', '.join(PER_HEAD_AXES if OPS[op].per_head else ROW_AXES)}")
    return [Problem(op=op, T=t, C=c, in_dtype=in_dtype, out_format=out_format, heads=h, scale_layout=scale_layout)
            for t, c, h in ps.shapes]
