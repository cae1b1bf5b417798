"""The row norms' set table, ``[axes]`` (kernels/problem.py): lists crossed (cartesian product), ``hidden`` x
``tokens`` (row ops: C = hidden) or ``head_dim`` x ``heads`` x ``tokens`` (per-head ops such as qk_rmsnorm:
C = head_dim, rows = tokens * heads); a row problem is two or three sizes, so a set is their cross product."""
from __future__ import annotations

import itertools

from kernels.problem import OPS, Problem

from . import SetFormat

ROW_AXES = ("hidden", "tokens")
PER_HEAD_AXES = ("head_dim", "heads", "tokens")


def _axis(file: str, axes: dict, key: str, minimum: int) -> list[int]:
    values = axes[key]
    where = f"{file}: axes.{key}"
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where} must be a non-empty list of integers")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"{where} must hold integers >= {minimum}, got {v!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{where} has duplicate values")
    return values


def parse(file: str, axes: dict) -> dict:
    """(T, C, heads) shapes, heads 1 for a row set; per_head tells which of the two axis sets it gave."""
    if set(axes) == set(ROW_AXES):
        hidden, tokens = _axis(file, axes, "hidden", 1), _axis(file, axes, "tokens", 1)
        return {"per_head": False, "shapes": [(t, c, 1) for c, t in itertools.product(hidden, tokens)]}
    if set(axes) == set(PER_HEAD_AXES):
        dims, heads = _axis(file, axes, "head_dim", 1), _axis(file, axes, "heads", 1)
        tokens = _axis(file, axes, "tokens", 1)
        return {"per_head": True, "shapes": [(t, d, h) for d, h, t in itertools.product(dims, heads, tokens)]}
    raise ValueError(f"{file}: axes must be exactly {{{', '.join(ROW_AXES)}}} or "
                     f"{{{', '.join(PER_HEAD_AXES)}}}, got {sorted(axes)}")


def problems(ps, op: str, in_dtype: str, out_format: str, scale_layout: str) -> list:
    """A per-head op takes a per-head set and a row op a row set (a set's shapes are one kind or the other)."""
    if OPS[op].per_head != ps.per_head:
        def kind(per_head: bool) -> str:
            return "per-head" if per_head else "row"
        raise ValueError(f"{op} is a {kind(OPS[op].per_head)} op but set {ps.name!r} is a {kind(ps.per_head)} set; "
                         f"use a set with axes {', '.join(PER_HEAD_AXES if OPS[op].per_head else ROW_AXES)}")
    return [Problem(op=op, T=t, C=c, in_dtype=in_dtype, out_format=out_format, heads=h, scale_layout=scale_layout)
            for t, c, h in ps.shapes]


SET_FORMAT = SetFormat(table="axes", parse=parse, problems=problems)
