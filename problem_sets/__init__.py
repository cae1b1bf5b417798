"""Named sets of problem shapes, one TOML file per set, expanded to problems of a kernel family.

A set file holds a ``description`` and either an ``[axes]`` table whose lists are crossed (cartesian
product): ``hidden`` x ``tokens`` (row ops: C = hidden) or ``head_dim`` x ``heads`` x ``tokens`` (per-head
ops such as qk_rmsnorm: C = head_dim, rows = tokens * heads); or a ``[channel_first]`` table whose
``shapes`` list holds [C, N, S] triples (channel-first ops, kernels/channel_first.py: x walked as [N, C, S],
normalised over C; real models' shapes are triples, not a cross product); or a ``[moe]`` table (fused-MoE
layers, kernels/moe_problem.py) whose ``layers`` list of inline tables (name, E, top_k, H, I, activation,
optional local_experts) is crossed with its ``tokens``, ``routing`` and ``quant_modes`` lists (a layer is a
model's fixed shape, so layers are listed, not crossed from per-dimension axes). The set name is the file's stem.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from kernels.channel_first import ChannelFirstProblem
from kernels.family import family_of_op
from kernels.moe_problem import ACTIVATIONS, QUANT_MODES, ROUTINGS, MoEProblem
from kernels.problem import OPS, Problem

SETS_DIR = Path(__file__).resolve().parent
ROW_AXES = ("hidden", "tokens")
PER_HEAD_AXES = ("head_dim", "heads", "tokens")
_TOP_KEYS = ("description", "axes", "channel_first", "moe")
MOE_KEYS = ("tokens", "routing", "quant_modes", "layers")
MOE_LAYER_KEYS = ("name", "E", "top_k", "H", "I", "activation")
MOE_LAYER_OPTIONAL = ("local_experts",)


@dataclass(frozen=True)
class ProblemSet:
    """One named set: shapes are (T, C, heads) tuples (heads 1 for row sets), or (C, N, S) triples of a
    channel-first set (family "channel_first"). A fused-MoE set (family "moe") has no shapes tuples (a
    problem needs ten fields): its problems are `moe_problems`, and moe_names[i] is the set's name for the
    layer of moe_problems[i]."""

    name: str
    description: str
    per_head: bool
    shapes: list[tuple[int, int, int]]
    family: str = "row"
    moe_problems: list[MoEProblem] = field(default_factory=list)
    moe_names: list[str] = field(default_factory=list)


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
    tables = [f"[{k}]" for k in ("axes", "channel_first", "moe") if k in data]
    if len(tables) > 1:
        raise ValueError(f"{path.name}: give [axes], [channel_first] or [moe], not "
                         f"{'both' if len(tables) == 2 else 'all of'} {' and '.join(tables)}")
    if "channel_first" in data:
        return _channel_first_set(path, name, description.strip(), data)
    if "moe" in data:
        return _moe_set(path, name, description.strip(), data)
    axes = data.get("axes")
    if not isinstance(axes, dict):
        raise ValueError(f"{path.name}: axes must be a table ([axes]), or give a [channel_first] or [moe] table")
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


def _channel_first_set(path: Path, name: str, description: str, data: dict) -> ProblemSet:
    table = data["channel_first"]
    if not isinstance(table, dict) or set(table) != {"shapes"}:
        raise ValueError(f"{path.name}: [channel_first] must hold exactly `shapes`, a list of [C, N, S]")
    shapes = table["shapes"]
    if not isinstance(shapes, list) or not shapes:
        raise ValueError(f"{path.name}: channel_first.shapes must be a non-empty list of [C, N, S]")
    for v in shapes:
        if not (isinstance(v, list) and len(v) == 3 and all(type(d) is int for d in v) and v[0] >= 1
                and min(v) >= 1):
            raise ValueError(f"{path.name}: channel_first.shapes entries are [C, N, S] integers >= 1, got {v!r}")
    triples = [tuple(v) for v in shapes]
    if len(set(triples)) != len(triples):
        raise ValueError(f"{path.name}: channel_first.shapes has duplicate entries")
    return ProblemSet(name=name, description=description, per_head=False, shapes=triples, family="channel_first")


def _moe_list(path: Path, table: dict, key: str, allowed: tuple[str, ...] | None = None) -> list:
    """One of [moe]'s lists: non-empty, no duplicates; integers >= 1 (tokens) or names from `allowed`."""
    values = table[key]
    where = f"{path.name}: moe.{key}"
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where} must be a non-empty list")
    for v in values:
        if allowed is None and (type(v) is not int or v < 1):
            raise ValueError(f"{where} must hold integers >= 1, got {v!r}")
        if allowed is not None and v not in allowed:
            raise ValueError(f"{where} must hold values from {list(allowed)}, got {v!r}")
    if len(set(values)) != len(values):
        raise ValueError(f"{where} has duplicate values")
    return values


def _moe_layer(path: Path, i: int, layer) -> tuple[str, dict]:
    """(name, MoEProblem fields) of moe.layers[i], checked as a T=1 problem so MoEProblem's own rules apply."""
    where = f"{path.name}: moe.layers[{i}]"
    if not isinstance(layer, dict):
        raise ValueError(f"{where} must be an inline table {{name = ..., E = ..., ...}}, got {layer!r}")
    missing = [k for k in MOE_LAYER_KEYS if k not in layer]
    unknown = sorted(set(layer) - set(MOE_LAYER_KEYS) - set(MOE_LAYER_OPTIONAL))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: "
                         f"{', '.join(MOE_LAYER_KEYS + MOE_LAYER_OPTIONAL)}")
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}")
    name = layer["name"]
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}.name must be a non-empty string, got {name!r}")
    where = f"{path.name}: moe.layers[{i}] ({name})"
    for k in ("E", "top_k", "H", "I") + MOE_LAYER_OPTIONAL:
        if k in layer and type(layer[k]) is not int:
            raise ValueError(f"{where}.{k} must be an integer, got {layer[k]!r}")
    if layer["activation"] not in ACTIVATIONS:
        raise ValueError(f"{where}.activation must be one of {list(ACTIVATIONS)}, got {layer['activation']!r}")
    fields = {"local_experts": 0} | {k: v for k, v in layer.items() if k != "name"}
    try:
        MoEProblem("fused_moe", T=1, **fields)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return name, fields


def _moe_set(path: Path, name: str, description: str, data: dict) -> ProblemSet:
    table = data["moe"]
    if not isinstance(table, dict):
        raise ValueError(f"{path.name}: moe must be a table ([moe])")
    if set(table) != set(MOE_KEYS):
        unknown, missing = sorted(set(table) - set(MOE_KEYS)), [k for k in MOE_KEYS if k not in table]
        raise ValueError(f"{path.name}: [moe] must hold exactly {', '.join(MOE_KEYS)}"
                         + (f"; unknown: {unknown}" if unknown else "") + (f"; missing: {missing}" if missing else ""))
    tokens = _moe_list(path, table, "tokens")
    routings = _moe_list(path, table, "routing", ROUTINGS)
    quant_modes = _moe_list(path, table, "quant_modes", QUANT_MODES)
    layers = table["layers"]
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"{path.name}: moe.layers must be a non-empty list of inline tables")
    named = [_moe_layer(path, i, layer) for i, layer in enumerate(layers)]
    names = [n for n, _ in named]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{path.name}: moe.layers has duplicate names {dup}")
    shapes = [tuple(sorted(f.items())) for _, f in named]
    for i, s in enumerate(shapes):
        if s in shapes[:i]:
            raise ValueError(f"{path.name}: moe.layers {names[shapes.index(s)]!r} and {names[i]!r} are the same layer")
    probs, moe_names = [], []
    for (layer_name, f), t, routing, quant in itertools.product(named, tokens, routings, quant_modes):
        probs.append(MoEProblem("fused_moe", T=t, routing=routing, quant_mode=quant, **f))
        moe_names.append(layer_name)
    return ProblemSet(name=name, description=description, per_head=False, shapes=[], family="moe",
                      moe_problems=probs, moe_names=moe_names)


def moe_problems(set_name: str, directory=None) -> list[MoEProblem]:
    """A fused-MoE set's problems: layers x tokens x routing x quant_modes, in that order (quant_modes
    fastest)."""
    ps = load(set_name, directory)
    if ps.family != "moe":
        raise ValueError(f"set {set_name!r} is a {ps.family.replace('_', '-')} set, not a moe set "
                         "(a [moe] table)")
    return list(ps.moe_problems)


def problems(set_name: str, op: str, in_dtype: str, out_format: str, scale_layout: str = "rowmajor",
             directory=None) -> list:
    """The set's shapes as problems of `op`'s family for one dtype/output format (the problem type validates
    the combination)."""
    ps = load(set_name, directory)
    fam = family_of_op(op).name  # ValueError for an unknown op
    if fam != ps.family:
        raise ValueError(f"{op} is a {fam.replace('_', '-')} op but set {set_name!r} is a "
                         f"{ps.family.replace('_', '-')} set")
    if fam == "moe":
        if (in_dtype, out_format, scale_layout) != ("bf16", "bf16", "rowmajor"):
            raise ValueError("fused_moe takes bf16 x and writes bf16 (--in-dtype bf16 --out bf16)")
        return [p for p in ps.moe_problems if p.op == op]
    if fam == "channel_first":
        if scale_layout != "rowmajor":
            raise ValueError("channel-first ops write no FP4 block scales (scale_layout rowmajor)")
        return [ChannelFirstProblem.from_op(op, n, c, s, in_dtype, out_format) for c, n, s in ps.shapes]
    if OPS[op].per_head != ps.per_head:
        def kind(per_head: bool) -> str:
            return "per-head" if per_head else "row"
        raise ValueError(f"{op} is a {kind(OPS[op].per_head)} op but set {set_name!r} is a {kind(ps.per_head)} set; "
                         f"use a set with axes {', '.join(PER_HEAD_AXES if OPS[op].per_head else ROW_AXES)}")
    return [Problem(op=op, T=t, C=c, in_dtype=in_dtype, out_format=out_format, heads=h, scale_layout=scale_layout)
            for t, c, h in ps.shapes]
