"""Kernel families: the one interface through which the harness searches, measures, exports and dispatches.

A family is a kind of kernel with its own problem descriptor, knobs and constraints: the row norms
(kernels/problem.py, kernels/config.py: [tokens, C] rows), the channel-first norms
(kernels/channel_first.py: [N, C, S] normalised over C) and the fused MoE (kernels/moe_problem.py,
kernels/moe_config.py: a layer of E experts at T tokens; two grouped GEMMs per call). Sweep, Parquet rows, LUT export and validation,
runtime dispatch, report and heatmap ask `family_of(problem)` / `family_of_op(op)` for what differs and
share everything else; a new family is a new module that builds one `Family` and registers it here.

What a family declares:

* problem: `problem_type`, its `ops`, `out_formats(op, in_dtype)`, `key_fields` (the problem's identity:
  study names, Parquet key columns, LUT EXACT keys; the runtime size last), `from_key` (a problem back from
  those values), `positions` (the rows or positions it normalises: the report's and heatmap's x axis),
  `size_label` (its runtime size as tables print it).
* knobs: `config_type` (a kernels.config.Knobs dataclass), `knob_choices` (fixed, full lists), and
  `added_knobs`: knobs added after result rows and LUT entries were written, each with the value such a row
  or entry means (what the kernel did before the knob existed); rows and entries without them still load.
* constraints and heuristic: `violations(p, cfg, arch, stride, ptr_align)` (empty = valid; stride: the
  family's layout argument, None = dense), `heuristic(p, arch, stride, ptr_align)`, `fit(p, cfg, arch,
  stride, ptr_align)` (a tuned config made to fit the actual layout, or None), `space_key(p)` (the
  part of a problem validity depends on: one counted search space per key), `searchable(p, cfg)` (what
  the sampler proposes among valid configs), `simplicity(cfg, heuristic)` (tie-break sort key), and
  optionally `probes(p, arch)` (configs every sweep times after the heuristic).
* dispatch: `dispatch_key(p)`, the problem the public op looks up for a call of `p` (default `p`).
* cost: `ideal_bytes(p)` (each tensor moved once: GB/s and % of copy).
* compilation: `compile_key(p)` (what a compiled kernel depends on), `canonical(p)` (the problem with the
  runtime sizes zeroed), `cache_key(p, cfg, arch)` (its compiled function's name in the disk cache and the
  AOT library), `precompile(p, cfg, arch)`, `source_hash()` (the kernel source version rows and studies
  belong to).
* measurement (GPU, the sweep's timing process): `runner`, a module with make_case / make_cases (random
  inputs, poisoned outputs), poison, launcher (one config, graph-capturable), public_launcher (the public op
  as a user calls it: what bench and the report call "lutforge"), expected_outputs (the float reference) and
  check.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable


SIZE_FIELDS = ("C", "heads", "T", "N", "S", "E", "top_k", "I", "local_experts")  # integer fields of problem keys


def key_error(key, fields: tuple[str, ...]) -> str | None:
    """Why `key` is not a tuple of `fields` values (None = it is): names as str, sizes as ints (C >= 1,
    heads >= 1, the runtime sizes >= 0)."""
    if not isinstance(key, tuple) or len(key) != len(fields):
        return f"key must be a {len(fields)}-tuple {fields}"
    for name, v in zip(fields, key):
        if name in SIZE_FIELDS:
            low = 1 if name in ("C", "heads") else 0
            if type(v) is not int or v < low:
                return f"{name}={v!r} must be an int >= {low}"
        elif not isinstance(v, str):
            return f"{name}={v!r} must be a str"
    return None


@dataclass(frozen=True, eq=False)  # one object per family: hashed and compared by identity
class Family:
    name: str
    problem_type: type
    ops: tuple[str, ...]
    out_formats: Callable[[str, str], tuple]
    key_fields: tuple[str, ...]
    from_key: Callable[..., object]
    positions: Callable[[object], int]
    size_label: Callable[[object], str]
    config_type: type
    knob_choices: dict
    violations: Callable[..., list]
    heuristic: Callable[..., object]
    fit: Callable[..., object]
    space_key: Callable[[object], object]
    searchable: Callable[[object, object], bool]
    simplicity: Callable[[object, object], tuple]
    ideal_bytes: Callable[[object], int]
    compile_key: Callable[[object], tuple]
    canonical: Callable[[object], object]
    cache_key: Callable[..., str]
    precompile: Callable[..., object]
    source_hash: Callable[[], str]
    runner_module: str
    has_range: bool  # LUT RANGE tables along the last key field (the row family's T)
    # the valid knob tuples (knob_choices order) of a problem, where crossing every knob's choices is too
    # many to test one by one (the fused MoE's two GEMMs: 1728 x 6912); None = that product, filtered
    valid_configs: Callable[..., list] | None = None
    # configs every sweep of a problem times after the heuristic, most telling first (the row family: the
    # analytical config and its one-knob corrections, the learned fallback's evidence); None = none
    probes: Callable[..., list] | None = None
    # knob -> the value a result row or LUT entry written before the knob existed means (the fused MoE's
    # fc1_mma/fc2_mma: "sync", the only MMA it had); a row without the column, or null there, reads it
    added_knobs: dict = field(default_factory=dict)
    # the problem the public op dispatches on for a call of `p`: what its host code can see of the call (the
    # fused MoE's routing lives on the device, so kernels/fused_moe.py keys dispatch by uniform routing)
    dispatch_key: Callable[[object], object] = lambda p: p

    def __post_init__(self):
        unknown = set(self.added_knobs) - set(self.knob_choices)
        if unknown:
            raise ValueError(f"{self.name}: added_knobs {sorted(unknown)} are not knobs of the family")

    @property
    def runner(self):
        """The GPU measurement module (imported on first use: it needs torch on a CUDA device)."""
        return importlib.import_module(self.runner_module)

    def key(self, p) -> tuple:
        """The problem's identity as a tuple of `key_fields` values (the LUT EXACT key)."""
        return tuple(getattr(p, k) for k in self.key_fields)

    def key_error(self, key) -> str | None:
        """Why `key` is not a well-formed EXACT key of this family (None = it is)."""
        return key_error(key, self.key_fields)

    def range_key_error(self, key) -> str | None:
        """Why `key` is not a well-formed RANGE key of this family: its EXACT key without the runtime size."""
        if not self.has_range:
            return f"the {self.name} family has no RANGE table"
        return key_error(key, self.key_fields[:-1])

    def problem_of_key(self, key):
        """The problem an EXACT key names (ValueError when malformed or not a valid problem)."""
        bad = self.key_error(key)
        if bad:
            raise ValueError(bad)
        return self.from_key(*key)

    def row_config(self, row) -> object:
        """The config of a result row (knob_* columns), values converted to the types of knob_choices; a knob
        of `added_knobs` the row lacks (an older row: no column, or null) reads as the value it ran with."""
        d = {}
        for name, choices in self.knob_choices.items():
            if name in self.added_knobs:
                v = row.get(f"knob_{name}")
                if _missing(v):
                    v = self.added_knobs[name]
            else:
                v = row[f"knob_{name}"]
            t = type(choices[0])
            d[name] = bool(v) if t is bool else int(v) if t is int else str(v)
        return self.config_type(**d)


def _missing(v) -> bool:
    """None or a float NaN (a Parquet null read through pandas)."""
    return v is None or (isinstance(v, float) and v != v)


def _row_family() -> Family:
    from . import compile_cache, config, problem

    return Family(
        name="row", problem_type=problem.Problem, ops=tuple(problem.OPS), out_formats=problem.out_formats,
        key_fields=("op", "out_format", "scale_layout", "in_dtype", "C", "heads", "T"),
        from_key=lambda op, out_format, scale_layout, in_dtype, C, heads, T: problem.Problem(
            op, int(T), int(C), in_dtype, out_format, int(heads), scale_layout),
        positions=lambda p: p.T, size_label=lambda p: str(p.T) + (f"x{p.heads}h" if p.heads != 1 else ""),
        config_type=config.KernelConfig, knob_choices=config.KNOB_CHOICES,
        violations=lambda p, cfg, arch=90, stride=None, ptr_align=16: config.violations(p, cfg, arch, stride),
        heuristic=lambda p, arch=90, stride=None, ptr_align=16: config.heuristic(p, arch, stride, ptr_align),
        fit=config.fit_config, space_key=compile_cache.canonical,  # T does not change a row config's validity
        searchable=lambda p, cfg: config.iters_per_row(p, cfg) <= config.MAX_SEARCH_ITERS,
        simplicity=config.simplicity, ideal_bytes=problem.ideal_bytes,
        compile_key=lambda p: (p.op, p.in_dtype, p.out_format, p.C, p.heads, p.scale_layout),
        canonical=compile_cache.canonical, cache_key=compile_cache.cache_key,
        precompile=lambda p, cfg, arch: compile_cache.precompile(p, cfg, arch),  # late-bound: tests patch it
        source_hash=compile_cache.kernel_source_hash,
        runner_module="kernels.runner", has_range=True, probes=config.probes)


def _channel_first_family() -> Family:
    from . import channel_first as cf

    return Family(
        name="channel_first", problem_type=cf.ChannelFirstProblem, ops=cf.OPS,
        out_formats=lambda op, in_dtype: (in_dtype, "fp8", "nvfp4"),
        key_fields=("op", "out_format", "in_dtype", "C", "N", "S"),
        from_key=lambda op, out_format, in_dtype, C, N, S: cf.ChannelFirstProblem.from_op(
            op, int(N), int(C), int(S), in_dtype, out_format),
        positions=lambda p: p.positions, size_label=lambda p: f"{p.N}x{p.S}",
        config_type=cf.ChannelFirstConfig, knob_choices=cf.CF_KNOB_CHOICES,
        violations=cf.violations, heuristic=cf.heuristic,
        fit=lambda p, cfg, arch=90, stride=None, ptr_align=16: (
            None if cfg is None or cf.violations(p, cfg, arch, stride, ptr_align) else cfg),
        space_key=lambda p: p,  # S's divisibility and size and N's bound all matter to validity
        searchable=lambda p, cfg: True, simplicity=cf.simplicity, ideal_bytes=cf.ideal_bytes,
        compile_key=lambda p: cf.canonical(p).static_key, canonical=cf.canonical, cache_key=cf.cache_key,
        precompile=lambda p, cfg, arch: cf.precompile(p, cfg, arch), source_hash=cf.source_hash,
        runner_module="kernels.channel_first_runner", has_range=False)


def _moe_family() -> Family:
    from dataclasses import replace

    from . import moe_config as mc
    from . import moe_problem as mp

    def shapes(p):
        return mc.gemm_shapes(p.quant_mode, p.activation, p.H, p.I)

    def from_key(op, out_format, in_dtype, quant_mode, activation, routing, C, E, top_k, I, local_experts, T):  # noqa: E741
        if (out_format, in_dtype) != ("bf16", "bf16"):
            raise ValueError(f"fused_moe takes and returns bf16, got in {in_dtype!r} out {out_format!r}")
        return mp.MoEProblem(op, int(T), int(E), int(top_k), int(C), int(I), quant_mode, activation, routing,
                             int(local_experts))

    def fused():  # the op module (imports torch): only the compile hooks need it
        from . import fused_moe
        return fused_moe

    return Family(
        name="moe", problem_type=mp.MoEProblem, ops=mp.MOE_OPS, out_formats=lambda op, in_dtype: ("bf16",),
        key_fields=("op", "out_format", "in_dtype", "quant_mode", "activation", "routing", "C", "E", "top_k", "I",
                    "local_experts", "T"),
        from_key=from_key, positions=lambda p: p.T, size_label=lambda p: str(p.T),
        config_type=mc.MoEConfig, knob_choices=mc.FAMILY_KNOB_CHOICES,
        violations=lambda p, cfg, arch=90, stride=None, ptr_align=16: mc.layer_violations(shapes(p), cfg, arch),
        heuristic=lambda p, arch=90, stride=None, ptr_align=16: mc.layer_heuristic(
            shapes(p), mp.rows_per_expert(p), mp.expected_experts_touched(p), arch),
        fit=lambda p, cfg, arch=90, stride=None, ptr_align=16: (
            None if cfg is None or mc.layer_violations(shapes(p), cfg, arch) else cfg),
        space_key=lambda p: replace(p, T=0, routing="uniform", E=1, top_k=1, local_experts=0),  # validity: K, N
        searchable=lambda p, cfg: True, simplicity=mc.simplicity, ideal_bytes=mp.ideal_bytes,
        compile_key=lambda p: (p.op, p.quant_mode, p.activation, p.H, p.I), canonical=lambda p: replace(p, T=0),
        cache_key=lambda p, cfg, arch: fused().layer_cache_key(p, cfg, arch),
        precompile=lambda p, cfg, arch: fused().precompile_layer(p, cfg, arch),
        source_hash=lambda: fused().source_hash(), runner_module="kernels.moe_runner", has_range=True,
        valid_configs=lambda p, arch: mc.valid_layer_configs(shapes(p), arch), added_knobs=mc.ADDED_KNOBS,
        dispatch_key=lambda p: replace(p, routing="uniform"))


_FAMILIES: dict[str, Family] = {}


def families() -> dict[str, Family]:
    """Every registered family by name (built on first use: the modules import each other lazily)."""
    if not _FAMILIES:
        for make in (_row_family, _channel_first_family, _moe_family):
            f = make()
            _FAMILIES[f.name] = f
    return _FAMILIES


def all_ops() -> tuple[str, ...]:
    """Every family's op names, families in registration order (row first)."""
    return tuple(o for f in families().values() for o in f.ops)


def problem_columns() -> tuple[str, ...]:
    """The problem part of a result row: "family", then every family's key fields in registration order
    (shared names are one column; a field another family lacks holds PROBLEM_DEFAULTS in sweep.results_io)."""
    return ("family", *dict.fromkeys(k for f in families().values() for k in f.key_fields))


def family_of_op(op: str) -> Family:
    for f in families().values():
        if op in f.ops:
            return f
    raise ValueError(f"unknown op {op!r}; known: {', '.join(all_ops())}")


def family_of_key(key) -> Family:
    """The family of a LUT EXACT key (its first item is the op)."""
    if not (isinstance(key, tuple) and key and isinstance(key[0], str)):
        raise ValueError(f"key {key!r} must be a tuple starting with the op name")
    return family_of_op(key[0])


def family_of(problem) -> Family:
    for f in families().values():
        if isinstance(problem, f.problem_type):
            return f
    raise TypeError(f"{type(problem).__name__} is not the problem type of any kernel family")


def family_of_config(cfg) -> Family:
    for f in families().values():
        if isinstance(cfg, f.config_type):
            return f
    raise TypeError(f"{type(cfg).__name__} is not the config type of any kernel family")


def all_knob_choices() -> dict[str, tuple]:
    """The union of every family's knobs (Parquet knob_* columns); a knob two families share must have the
    same value type in both."""
    out: dict[str, tuple] = {}
    for f in families().values():
        for k, v in f.knob_choices.items():
            out.setdefault(k, v)
    return out
