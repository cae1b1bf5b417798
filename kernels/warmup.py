"""Warm-up: load or compile, before serving, every kernel dispatch can return for given row lengths (the norms)
or for a fused-MoE layer.

Dispatch answers per (op, C, formats) change with T (LUT entries, range bounds, heuristic thresholds), so a
process that compiled only the configs of the T it met so far compiles again when a batch of another size
arrives (~0.3 s each, measured on the H200). `warmup` / `warmup_moe` walk every T (Dispatcher.segments) and
make each answer's functions resident; `reachable_configs` is the same walk for building the AOT library.
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


def _target(device, arch, device_class) -> tuple[str, str | None]:
    """(arch name, device class): the given device's (default the current CUDA device), or arch and class as
    given (no GPU: only the disk cache is filled)."""
    if arch is None:
        import torch

        idx = torch.cuda.current_device() if device is None else torch.device(device).index or 0
        props = torch.cuda.get_device_properties(idx)
        arch = arch_name(props.major * 10 + props.minor)
        device_class = device_class or device_class_of(props.name)
    return arch, device_class


def warmup(op: str, C, in_dtypes=("bf16",), out_formats=None, heads: int = 1, scale_layouts=None, device=None,
           arch: str | None = None, device_class: str | None = None) -> WarmupReport:
    """Make resident every kernel `op` can dispatch to for row length(s) C, across all T, on `device` (default
    the current CUDA device) or, without a GPU, for `arch` (e.g. "sm_90a") and `device_class` (e.g. "h200"):
    then only the disk cache is filled, for later processes. Covers contiguous, 16-byte-aligned data (what
    torch allocates); other layouts narrow the vector and are compiled when first met."""
    arch, device_class = _target(device, arch, device_class)
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


def warmup_moe(num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, activation: str = "silu",
               quant_mode: str = "nvfp4", num_local_experts: int | None = None, ids_dtypes=("int32",),
               scale_dtypes=("fp32",), device=None, arch: str | None = None,
               device_class: str | None = None) -> WarmupReport:
    """Make resident every kernel `kernels.fused_moe.fused_moe` can run for one layer, across all T: the
    kernels of each config dispatch returns (kernels.fused_moe.layer_spec: both grouped GEMMs, the routing
    kernel, the combine unless FC2 folds it in) per routing-id dtype ("int32"/"int64") and routing-weight dtype
    ("fp32"/"bf16") the call will pass, and under kernels.fused_moe.LAYER_CALL the host function launching them.
    Same device / arch / device_class convention as `warmup`."""
    from . import fused_moe as fm
    from .moe_problem import MoEProblem

    arch, device_class = _target(device, arch, device_class)
    n_local = num_experts if num_local_experts is None else num_local_experts
    layer = MoEProblem("fused_moe", 0, num_experts, top_k, hidden_size, intermediate_size, quant_mode, activation,
                       "uniform", 0 if n_local == num_experts else n_local)  # what fused_moe's dispatch asks
    before, done = compile_count(), set()

    def load(key, get, *args):
        if key not in done:
            done.add(key)
            get(*args, arch)

    for cfg in reachable_configs(layer, arch_number(arch), device_class):
        for ids in ids_dtypes:
            for sc in scale_dtypes:
                ls = fm.layer_spec(layer, cfg.gemm("fc1"), cfg.gemm("fc2"), ids, sc)
                for sh, g in ((ls.fc1, ls.cfg1), (ls.fc2, ls.cfg2)):
                    load((sh, g), fm.get_compiled, sh, g)
                load(ls.route, fm.get_route, ls.route)
                if ls.combine is not None:
                    load(ls.combine, fm.get_combine, ls.combine)
                if fm.LAYER_CALL:  # the kernels behind one host function, as the call then runs them
                    load(ls, fm.get_layer, ls)
    return WarmupReport(len(done), compile_count() - before, 1)
