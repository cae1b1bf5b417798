"""The fused MoE's set table, ``[moe]`` (kernels/moe_problem.py): a ``layers`` list of inline tables (name, E,
top_k, H, I, activation, optional local_experts) crossed with the ``tokens``, ``routing`` and ``quant_modes``
lists. A layer is a model's fixed shape, so layers are listed, not crossed from per-dimension axes; a problem
needs ten fields, so the set holds its problems rather than shape tuples."""
from __future__ import annotations

import itertools

from kernels.moe_problem import ACTIVATIONS, QUANT_MODES, ROUTINGS, MoEProblem

from . import SetFormat, load

MOE_KEYS = ("tokens", "routing", "quant_modes", "layers")
MOE_LAYER_KEYS = ("name", "E", "top_k", "H", "I", "activation")
MOE_LAYER_OPTIONAL = ("local_experts",)


def _list(file: str, table: dict, key: str, allowed: tuple[str, ...] | None = None) -> list:
    """One of [moe]'s lists: non-empty, no duplicates; integers >= 1 (tokens) or names from `allowed`."""
    values = table[key]
    where = f"{file}: moe.{key}"
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


def _layer(file: str, i: int, layer) -> tuple[str, dict]:
    """(name, MoEProblem fields) of moe.layers[i], checked as a T=1 problem so MoEProblem's own rules apply."""
    where = f"{file}: moe.layers[{i}]"
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
    where = f"{file}: moe.layers[{i}] ({name})"
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


def parse(file: str, table: dict) -> dict:
    """The problems, layers x tokens x routing x quant_modes in that order (quant_modes fastest), and each
    problem's layer name."""
    if set(table) != set(MOE_KEYS):
        unknown, missing = sorted(set(table) - set(MOE_KEYS)), [k for k in MOE_KEYS if k not in table]
        raise ValueError(f"{file}: [moe] must hold exactly {', '.join(MOE_KEYS)}"
                         + (f"; unknown: {unknown}" if unknown else "") + (f"; missing: {missing}" if missing else ""))
    tokens = _list(file, table, "tokens")
    routings = _list(file, table, "routing", ROUTINGS)
    quant_modes = _list(file, table, "quant_modes", QUANT_MODES)
    layers = table["layers"]
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"{file}: moe.layers must be a non-empty list of inline tables")
    named = [_layer(file, i, layer) for i, layer in enumerate(layers)]
    names = [n for n, _ in named]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{file}: moe.layers has duplicate names {dup}")
    shapes = [tuple(sorted(f.items())) for _, f in named]
    for i, s in enumerate(shapes):
        if s in shapes[:i]:
            raise ValueError(f"{file}: moe.layers {names[shapes.index(s)]!r} and {names[i]!r} are the same layer")
    probs, moe_names = [], []
    for (layer_name, f), t, routing, quant in itertools.product(named, tokens, routings, quant_modes):
        probs.append(MoEProblem("fused_moe", T=t, routing=routing, quant_mode=quant, **f))
        moe_names.append(layer_name)
    return {"moe_problems": probs, "moe_names": moe_names}


def problems(ps, op: str, in_dtype: str, out_format: str, scale_layout: str) -> list:
    if (in_dtype, out_format, scale_layout) != ("bf16", "bf16", "rowmajor"):
        raise ValueError("fused_moe takes bf16 x and writes bf16 (--in-dtype bf16 --out bf16)")
    return [p for p in ps.moe_problems if p.op == op]


def moe_problems(set_name: str, directory=None) -> list[MoEProblem]:
    """A fused-MoE set's problems, every op's: layers x tokens x routing x quant_modes, in that order
    (quant_modes fastest)."""
    ps = load(set_name, directory)
    if ps.family != "moe":
        raise ValueError(f"set {set_name!r} is a {ps.family.replace('_', '-')} set, not a moe set "
                         "(a [moe] table)")
    return list(ps.moe_problems)


SET_FORMAT = SetFormat(table="moe", parse=parse, problems=problems)
