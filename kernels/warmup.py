"""Warm-up: load or compile, before serving, every kernel dispatch can return for given row lengths.

Dispatch answers per (op, C, formats) change with T (LUT entries, range bounds, heuristic thresholds), so a
process that compiled only the configs of the T it met so far compiles again when a batch of another size
arrives (~0.3 s each, measured on the H200). `warmup` walks every T (Dispatcher.segments) and makes each
answer's function resident; `reachable_configs` is the same walk for building the AOT library.
"""
from __future__ import annotations

from dataclasses import dataclass

from .compile_cache import arch_name, arch_number, compile_count, get_compiled
from .dispatch import default_dispatcher, device_class_of
from .problem import FP4_BLOCK, OPS, Problem, out_formats as op_out_formats


@dataclass(frozen=True)
class WarmupReport:
    kernels: int  # distinct functions made resident
    compiled: int  # of which compiled now (the rest came from the AOT library or the disk cache)
    families: int


def families(op: str, C: int, in_dtypes=("bf16",), out_formats=None, heads: int = 1,
             scale_layouts=None) -> list[Problem]:
    """The problem families (T=0) of `op` at row length C for the given input dtypes and output formats
    (default: every format the op has; FP4 formats only where C allows them)."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    out = []
    for dt in in_dtypes:
        fmts = op_out_formats(op, dt) if out_formats is None else tuple(dt if f == "same" else f for f in out_formats)
        for fmt in fmts:
            if fmt in FP4_BLOCK and C % FP4_BLOCK[fmt]:
                if out_formats is None:
                    continue
            layouts = scale_layouts or (("rowmajor", "swizzled") if OPS[op].fp4_scales else ("rowmajor",))
            for layout in layouts:
                out.append(Problem(op, 0, C, dt, fmt, heads if OPS[op].per_head else 1, layout))
    return out


def reachable_configs(family: Problem, arch: int, device_class: str | None) -> list:
    """Distinct configs dispatch returns for `family` over every T, for contiguous 16-byte-aligned data."""
    seen = []
    for _, _, sel in default_dispatcher().segments(family, arch, device_class):
        if sel.config not in seen:
            seen.append(sel.config)
    return seen


def warmup(op: str, C, in_dtypes=("bf16",), out_formats=None, heads: int = 1, scale_layouts=None, device=None,
           arch: str | None = None, device_class: str | None = None) -> WarmupReport:
    """Make resident every kernel `op` can dispatch to for row length(s) C, across all T, on `device` (default
    the current CUDA device) or, without a GPU, for `arch` (e.g. "sm_90a") and `device_class` (e.g. "h200"):
    then only the disk cache is filled, for later processes. Covers contiguous, 16-byte-aligned data (what
    torch allocates); other layouts narrow the vector and are compiled when first met."""
    if arch is None:
        import torch

        idx = torch.cuda.current_device() if device is None else torch.device(device).index or 0
        props = torch.cuda.get_device_properties(idx)
        arch = arch_name(props.major * 10 + props.minor)
        device_class = device_class or device_class_of(props.name)
    sm = arch_number(arch)
    before = compile_count()
    done = set()
    fams = []
    for c in ([C] if isinstance(C, int) else list(C)):
        fams += families(op, int(c), in_dtypes, out_formats, heads, scale_layouts)
    for fam in fams:
        for cfg in reachable_configs(fam, sm, device_class):
            if (fam, cfg) not in done:
                done.add((fam, cfg))
                get_compiled(fam, cfg, arch)
    return WarmupReport(len(done), compile_count() - before, len(fams))
