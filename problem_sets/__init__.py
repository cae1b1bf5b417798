"""Named sets of problem shapes, one TOML file per set, expanded to problems of a kernel family.

A set file holds a ``description`` and exactly one family's table (the row norms' ``[axes]``, the
channel-first norms' ``[channel_first]``, the fused MoE's ``[moe]``). The set name is the file's stem. This
module is the part every family shares: finding and decoding the file, the description, the top-level keys,
the one-table rule. What a table holds, how it is validated and how a set expands to problems of an op are
the family's: problem_sets/<family name>.py, found by the family's name (as sweep.families finds a family's
harness side), so a new family adds a module here and this one does not change.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from kernels.family import families, family_of_op

SETS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ProblemSet:
    """One named set. Which fields a set fills is its family's business (problem_sets/<family>.py): shapes as
    (T, C, heads) tuples (per_head: the row family's per-head sets) or (C, N, S) triples, or, for a family whose
    problem needs more fields than a tuple says, the problems themselves (moe_problems, with moe_names[i] the
    set's name for the layer of moe_problems[i])."""

    name: str
    description: str
    per_head: bool = False
    shapes: list[tuple[int, int, int]] = field(default_factory=list)
    family: str = "row"
    moe_problems: list = field(default_factory=list)
    moe_names: list[str] = field(default_factory=list)


@dataclass(frozen=True, eq=False)
class SetFormat:
    """What a family's module (problem_sets/<family>.py) declares as its `SET_FORMAT`."""

    table: str  # the set file's table that makes a set of this family (its TOML key)
    # (file name, the table as a dict) -> ProblemSet fields besides name, description and family; a ValueError
    # names the file and the field
    parse: Callable[[str, dict], dict]
    # (set, op, in_dtype, out_format, scale_layout) -> the set's problems of an op of this family, or ValueError
    problems: Callable[..., list]


def set_format(family: str) -> SetFormat:
    """A family's set format (by family name)."""
    if family not in families():
        raise ValueError(f"unknown kernel family {family!r}; known: {', '.join(families())}")
    return importlib.import_module(f"{__name__}.{family}").SET_FORMAT


def _formats() -> dict[str, SetFormat]:
    return {name: set_format(name) for name in families()}



def _dir(directory) -> Path:
    d = SETS_DIR if directory is None else Path(directory)
    if not d.is_dir():
        raise ValueError(f"problem-set directory {str(d)!r} does not exist")
    return d


def list_sets(directory=None) -> list[str]:
    """Names of the sets in `directory` (default: the shipped sets), sorted."""
    return sorted(p.stem for p in _dir(directory).glob("*.toml"))


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
    formats = _formats()
    top_keys = ("description", *(f.table for f in formats.values()))
    unknown = set(data) - set(top_keys)
    if unknown:
        raise ValueError(f"{path.name}: unknown field(s) {sorted(unknown)}; allowed: {', '.join(top_keys)}")
    description = data.get("description")
    if not isinstance(description, str) or not description.strip():
        raise ValueError(f"{path.name}: description must be a non-empty string")
    every = [f"[{f.table}]" for f in formats.values()]
    choices = f"{', '.join(every[:-1])} or {every[-1]}" if len(every) > 1 else every[0]
    given = [(fam, f) for fam, f in formats.items() if f.table in data]
    if len(given) > 1:
        tables = [f"[{f.table}]" for _, f in given]
        raise ValueError(f"{path.name}: give {choices}, not {'both' if len(tables) == 2 else 'all of'} "
                         f"{' and '.join(tables)}")
    if not given:
        raise ValueError(f"{path.name}: give a problem table: {choices}")
    fam, fmt = given[0]
    table = data[fmt.table]
    if not isinstance(table, dict):
        raise ValueError(f"{path.name}: {fmt.table} must be a table ([{fmt.table}])")
    return ProblemSet(name=name, description=description.strip(), family=fam, **fmt.parse(path.name, table))


def problems(set_name: str, op: str, in_dtype: str, out_format: str, scale_layout: str = "rowmajor",
             directory=None) -> list:
    """The set's shapes as problems of `op`'s family for one dtype/output format (the problem type validates
    the combination)."""
    ps = load(set_name, directory)
    fam = family_of_op(op).name  # ValueError for an unknown op
    if fam != ps.family:
        raise ValueError(f"{op} is a {fam.replace('_', '-')} op but set {set_name!r} is a "
                         f"{ps.family.replace('_', '-')} set")
    return set_format(fam).problems(ps, op, in_dtype, out_format, scale_layout)
