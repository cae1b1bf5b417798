"""Run one (problem, config) on the GPU: random inputs, poisoned outputs, a graph-capturable launch
closure, and a check against the torch reference. Used by the sweep, the GPU tests and validation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


from .compile_cache import arch_name, get_compiled
from .config import KernelConfig
from .problem import FP4_BLOCK, Problem, scale_bytes

TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}
POISON_BYTE = 0xFF  # NaN in bf16/fp16/e4m3, -6 in e2m1, NaN as ue8m0


@dataclass
class Case:
    """Tensors of one problem instance. `inputs` are pristine copies for the reference; the kernel
    reads/writes `args` (in-place ops mutate them)."""

    problem: Problem
    inputs: dict
    args: dict
    eps: float = 1e-6
    scale: float = 1.0
    outputs: tuple = field(default_factory=tuple)  # names in args the kernel writes

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.args.values() if isinstance(t, torch.Tensor))


@dataclass
class CheckResult:
    ok: bool
    rel_err: float
    max_ulp: float | None
    message: str


def arch_of(device=None) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return arch_name(major * 10 + minor)


SLOT_ALIGN = 256  # bytes: each instance's tensors start on their own aligned slot of a shared buffer


def slot_views(n: int, shape: tuple, dtype: torch.dtype, device, fill=None) -> tuple[torch.Tensor, list]:
    """(buffer [n, slot], the n views of `shape`) with every slot starting SLOT_ALIGN-aligned; `fill(n, per)`
    makes the buffer (random data) instead of torch.empty."""
    numel = math.prod(shape)
    esz = torch.empty(0, dtype=dtype).element_size()
    per = -(-numel * esz // SLOT_ALIGN) * SLOT_ALIGN // esz
    buf = fill(n, per) if fill is not None else torch.empty(n, per, dtype=dtype, device=device)
    return buf, [buf[i, :numel].view(shape) for i in range(n)]


def make_case(problem: Problem, device="cuda", seed: int = 0, row_pad: int = 0) -> Case:
    """Random inputs (randn*5+5, weights in [0.5, 2]) and poisoned outputs. `row_pad` > 0 makes x's
    rows (and heads) strided: each row lives in a buffer row_pad elements wider than C."""
    return make_cases(problem, 1, device, seed, row_pad)[0]


def make_cases(problem: Problem, n: int, device="cuda", seed: int = 0, row_pad: int = 0) -> list[Case]:
    """`n` independent instances (the timer's rotation sets), as `make_case` builds one. Each tensor role is
    one buffer of n aligned slots and each instance holds views on its slot, so a decode shape's tens of
    thousands of sets cost a few kernel launches instead of ~10 per set."""
    if n < 1:
        raise ValueError(f"need at least one case, got {n}")
    p = problem
    g = torch.Generator(device=device).manual_seed(seed)
    dt = TORCH_DTYPE[p.in_dtype]
    H, C = p.heads, p.C

    def slots(shape, dtype, fill=None):
        return slot_views(n, shape, dtype, device, fill)

    def uniform(shape, lo, span, dtype=dt):
        return slots(shape, dtype, lambda *nk: (torch.rand(*nk, generator=g, device=device) * span + lo).to(dtype))

    def rand(*shape, pad=0):
        full = (*shape[:-1], shape[-1] + pad)
        buf, views = slots(full, dt, lambda *nk: (torch.randn(*nk, generator=g, device=device) * 5 + 5).to(dt))
        return buf, [v[..., : shape[-1]] for v in views] if pad else views

    def clone_views(buf, views):
        copy = buf.clone()
        return [copy.as_strided(v.shape, v.stride(), v.storage_offset()) for v in views]

    xbuf, xs = rand(p.T, H, C, pad=row_pad)
    _, ws = uniform((C,), 0.5, 1.5)
    inputs = [{"x": x, "weight": w} for x, w in zip(clone_views(xbuf, xs), ws)]
    args = [{"x": x, "weight": w} for x, w in zip(xs, ws)]
    outputs = []
    out_bufs = []  # buffers the kernel writes and nothing restores: poisoned here
    scale = 1.0
    if p.spec.residual:
        rbuf, rs = rand(p.T, C)
        for i, (r, r0) in enumerate(zip(rs, clone_views(rbuf, rs))):
            args[i]["residual"], inputs[i]["residual"] = r, r0
        outputs.append("residual")
    if p.out_format in FP4_BLOCK:
        ybuf, ys = slots((p.T, H, C // 2), torch.uint8)
        sf_shape = (scale_bytes(p),) if p.scale_layout == "swizzled" else (p.rows, C // FP4_BLOCK[p.out_format])
        sbuf, sfs = slots(sf_shape, torch.uint8)
        out_bufs += [ybuf, sbuf]
        for a, y, sf in zip(args, ys, sfs):
            a["y"], a["block_scale"] = y, sf
        outputs += ["y", "block_scale"]
        if p.spec.fp4_scales and p.out_format == "nvfp4":
            _, gss = uniform((1,), 0.5, 4.0, torch.float32)
            for a, i, gs in zip(args, inputs, gss):
                a["global_scale"] = i["global_scale"] = gs
    elif p.spec.residual and p.out_format == p.in_dtype:
        outputs.append("x")  # normalised in place
    else:
        ydt = torch.float8_e4m3fn if p.out_format == "fp8" else dt
        ybuf, ys = slots((p.T, H, C), ydt)
        out_bufs.append(ybuf)
        for a, y in zip(args, ys):
            a["y"] = y
        outputs.append("y")
        if p.out_format == "fp8" and not p.spec.silu:
            scale = 0.02  # static quant scale: values up to ~10 hit the +-448 saturation
    for b in out_bufs:
        b.view(torch.uint8).fill_(POISON_BYTE)  # what `poison` does, for all instances at once
    return [Case(p, i, a, scale=scale, outputs=tuple(outputs)) for i, a in zip(inputs, args)]


def poison(case: Case, byte: int = POISON_BYTE) -> None:
    """Fill every output with a pattern a kernel must overwrite; in-place tensors are restored."""
    for name in case.outputs:
        t = case.args[name]
        if name in case.inputs:
            t.copy_(case.inputs[name])
        else:
            t.view(torch.uint8).fill_(byte)


def kernel_args(problem: Problem, cfg: KernelConfig, x, weight, residual, y, block_scale, global_scale) -> list:
    """Runtime arguments of NormKernel.__call__ before (eps, qscale, grid_limit, stream): integer pointers,
    sizes and strides in elements, as the compiled TVM-FFI function takes them. x and y are 3D [T, H, C]
    views (y [T, H, C/2] bytes for FP4); residual is [T, C]. The pointers' alignment is the caller's
    promise to the config (the vector width), checked by the ops' validation and the cases' slot alignment."""
    fp4 = problem.out_format in FP4_BLOCK
    expect = {"residual": (residual, problem.spec.residual), "block_scale": (block_scale, fp4),
              "global_scale": (global_scale, fp4 and problem.spec.fp4_scales and problem.out_format == "nvfp4")}
    for name, (t, needed) in expect.items():
        if (t is not None) != needed:  # a mismatch with the compiled signature is refused by the call
            raise ValueError(f"{problem.op}/{problem.out_format}: {name} must be "
                             f"{'given' if needed else 'None'}")
    sf_rows, sf0 = 0, 0
    if block_scale is not None:
        sf_rows = block_scale.shape[0]
        sf0 = block_scale.stride(0) if block_scale.dim() == 2 else 1

    def ptr(t):
        return None if t is None else t.data_ptr()

    return [ptr(x), ptr(weight), ptr(residual), ptr(y), ptr(block_scale), ptr(global_scale),
            x.shape[0], x.stride(0), x.stride(1), residual.stride(0) if residual is not None else 0,
            y.stride(0), y.stride(1), sf_rows, sf0]


def scale_padding(p: Problem) -> tuple[int, int] | None:
    """Byte range [lo, hi) of the 128x4 swizzled scale buffer that holds all its padding (rows past T, scale
    columns past C/block), which must read as zero: the whole buffer when columns are padded, else the last
    128-row tile; None when nothing is padded or the layout is row-major. The kernel writes the zeros."""
    if p.scale_layout != "swizzled" or p.out_format not in FP4_BLOCK:
        return None
    n_sf = p.C // FP4_BLOCK[p.out_format]
    k_tiles = -(-n_sf // 4)
    size = -(-p.rows // 128) * k_tiles * 512
    if n_sf % 4:
        return 0, size
    if p.rows % 128:
        return (p.rows // 128) * k_tiles * 512, size
    return None


def scale_padding_mask(p: Problem) -> torch.Tensor | None:
    """Bool mask (CPU) of exactly the swizzled buffer's padding bytes, for tests; None where scale_padding is."""
    if scale_padding(p) is None:
        return None
    from . import encoders

    n_sf = p.C // FP4_BLOCK[p.out_format]
    return encoders.swizzle_scales(torch.ones(p.rows, n_sf, dtype=torch.uint8)) == 0


def launcher(problem: Problem, cfg: KernelConfig, case: Case, arch: str | None = None):
    """A zero-argument callable launching the kernel on the current stream (CUDA-graph capturable)."""
    arch = arch or arch_of(case.args["x"].device)
    fn = get_compiled(problem, cfg, arch)
    a = case.args
    targs = kernel_args(case.problem, cfg, a["x"], a["weight"], a.get("residual"), a.get("y", a["x"]),
                        a.get("block_scale"), a.get("global_scale"))
    sm_count = torch.cuda.get_device_properties(a["x"].device).multi_processor_count
    tail = (case.eps, case.scale, max(1, sm_count * cfg.ctas_per_sm))
    if problem.rows == 0:  # an empty grid is not a valid launch; there is nothing to do
        return lambda: None

    def launch():
        # one launch: the kernel zeroes the swizzled scales' padding (a separate zero_() made swizzled
        # rmsnorm_fp4quant 4.2 us against 1.7 us row-major on the H200 at T=1560, C=64)
        fn(*targs, *tail, torch.cuda.current_stream().cuda_stream)

    return launch


def reference_inputs(problem: Problem, case: Case) -> dict:
    """The reference's inputs for `case`: its pristine tensors, eps and scale, rows as 2D [T, C]."""
    p = case.problem
    inp = dict(case.inputs, eps=case.eps, scale=case.scale)
    inp.setdefault("global_scale", None)
    if not p.spec.per_head:
        inp["x"] = inp["x"].reshape(p.T, p.C)
    return inp


def expected_outputs(problem: Problem, case: Case) -> dict:
    """The torch reference's outputs for `case` (what `check` compares against)."""
    from . import reference

    return reference.reference_outputs(problem, reference_inputs(problem, case))


def check(problem: Problem, case: Case, expected: dict | None = None) -> CheckResult:
    """Compare the kernel's outputs with the torch reference (tolerances in kernels/check.py).
    `expected` - the reference's outputs for this case - saves recomputing it for every config."""
    from .check import compare_outputs

    p = case.problem
    if expected is None:
        expected = expected_outputs(problem, case)
    a = case.args
    got = {"out": a["y"] if "y" in a else a["x"]}
    for name in ("block_scale", "residual"):
        if name in a:
            got[name] = a[name]
    if not p.spec.per_head:
        got["out"] = got["out"].reshape(p.T, -1)
    return compare_outputs(problem, got, expected)


def public_launcher(problem: Problem, case):
    """The public op as a user calls it (kernels.ops) on `case`'s tensors, writing into its outputs (in place for
    fused adds): what bench and the report call "lutforge"."""
    from . import ops

    p, a = problem, case.args
    x, w, r, y = a["x"], a["weight"], a.get("residual"), a.get("y")
    eps, scale = case.eps, case.scale
    if not p.spec.per_head:  # the case holds [T, 1, C]; row ops take [..., C]
        x = x.view(p.T, p.C)
        y = None if y is None else y.view(p.T, -1)
    op = p.op
    if p.out_format in FP4_BLOCK:
        bs = a["block_scale"]
        if p.out_format == "nvfp4":
            bs = bs.view(torch.float8_e4m3fn)
        if op == "fused_rmsnorm_silu":
            return lambda: ops.fused_rmsnorm_silu(x, w, eps, out=y, block_scale=bs)
        gs = a.get("global_scale")
        return lambda: ops.rmsnorm_fp4quant(x, w, y_fp4=y, block_scale=bs, global_scale=gs, eps=eps,
                                            block_size=FP4_BLOCK[p.out_format],
                                            is_sf_swizzled_layout=p.scale_layout == "swizzled")
    fn = getattr(ops, op)
    if op == "rmsnorm_quant":
        return lambda: fn(y, x, w, scale, eps)
    if op == "fused_add_rmsnorm_quant":
        return lambda: fn(y, x, r, w, scale, eps)
    if p.spec.residual:  # fused add: x and residual updated in place
        return lambda: fn(x, r, w, eps)
    return lambda: fn(x, w, eps, out=y)
