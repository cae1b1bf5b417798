"""What a kernel is asked to do: the op table and the problem descriptor shared by every stage.

A `Problem` is the key of a study, of a Parquet row and of a LUT entry; `ideal_bytes` is the traffic
every timing is judged against (each tensor read or written exactly once).
"""
from __future__ import annotations

from dataclasses import dataclass

IN_DTYPES = ("bf16", "fp16")
ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1}
FP4_BLOCK = {"nvfp4": 16, "mxfp4": 32}
SCALE_LAYOUTS = ("rowmajor", "swizzled")


@dataclass(frozen=True)
class OpSpec:
    """Static facts about one public op: which outputs it can produce and what it fuses."""

    name: str
    out_formats: tuple[str, ...]  # "same" = the input dtype
    gemma: bool = False  # weight offset +1
    residual: bool = False  # residual += x, normalise the sum (in place)
    silu: bool = False
    per_head: bool = False  # 3D [tokens, heads, head_dim] input, C = head_dim
    fp4_scales: bool = False  # rmsnorm_fp4quant conventions (global scale, both layouts)


OPS: dict[str, OpSpec] = {
    s.name: s
    for s in (
        OpSpec("rmsnorm", ("same",)),
        OpSpec("gemma_rmsnorm", ("same",), gemma=True),
        OpSpec("fused_add_rmsnorm", ("same",), residual=True),
        OpSpec("gemma_fused_add_rmsnorm", ("same",), gemma=True, residual=True),
        OpSpec("rmsnorm_quant", ("fp8",)),
        OpSpec("fused_add_rmsnorm_quant", ("fp8",), residual=True),
        OpSpec("qk_rmsnorm", ("same",), per_head=True),
        OpSpec("gemma_qk_rmsnorm", ("same",), gemma=True, per_head=True),
        OpSpec("fused_rmsnorm_silu", ("same", "fp8", "nvfp4"), silu=True),
        OpSpec("rmsnorm_fp4quant", ("nvfp4", "mxfp4"), fp4_scales=True),
    )
}


def out_formats(op: str, in_dtype: str) -> tuple[str, ...]:
    """Concrete output formats of `op` for an input dtype ("same" resolved)."""
    return tuple(in_dtype if f == "same" else f for f in OPS[op].out_formats)


@dataclass(frozen=True)
class Problem:
    """One problem size: T rows (tokens) of C elements; per-head ops have T*heads rows of C=head_dim."""

    op: str
    T: int
    C: int
    in_dtype: str = "bf16"
    out_format: str = "bf16"
    heads: int = 1
    scale_layout: str = "rowmajor"  # FP4 block scales: rowmajor | swizzled (128x4 tiles)

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}; known: {', '.join(OPS)}")
        if self.in_dtype not in IN_DTYPES:
            raise ValueError(f"in_dtype must be one of {IN_DTYPES}, got {self.in_dtype!r}")
        allowed = out_formats(self.op, self.in_dtype)
        if self.out_format not in allowed:
            raise ValueError(f"{self.op} with {self.in_dtype} input has out formats {allowed}, got {self.out_format!r}")
        if self.T < 0 or self.C < 1 or self.heads < 1:
            raise ValueError(f"need T >= 0, C >= 1, heads >= 1; got T={self.T} C={self.C} heads={self.heads}")
        if self.heads != 1 and not OPS[self.op].per_head:
            raise ValueError(f"heads={self.heads} only applies to per-head ops")
        if self.scale_layout not in SCALE_LAYOUTS:
            raise ValueError(f"scale_layout must be one of {SCALE_LAYOUTS}, got {self.scale_layout!r}")
        if self.scale_layout == "swizzled" and not OPS[self.op].fp4_scales:
            raise ValueError("the swizzled scale layout exists only for rmsnorm_fp4quant")
        if self.out_format in FP4_BLOCK and self.C % FP4_BLOCK[self.out_format]:
            raise ValueError(f"{self.out_format} needs C divisible by {FP4_BLOCK[self.out_format]}, got C={self.C}")

    @property
    def rows(self) -> int:
        return self.T * self.heads

    @property
    def spec(self) -> OpSpec:
        return OPS[self.op]


def scale_bytes(p: Problem) -> int:
    """Bytes of FP4 block scales written (the swizzled buffer pads rows to 128 and scale columns to 4)."""
    if p.out_format not in FP4_BLOCK:
        return 0
    n_sf = p.C // FP4_BLOCK[p.out_format]
    if p.scale_layout == "swizzled":
        return -(-p.rows // 128) * 128 * (-(-n_sf // 4) * 4)
    return p.rows * n_sf


def ideal_bytes(p: Problem) -> int:
    """Fewest bytes the op must move through device memory: each tensor read or written once."""
    n = p.rows * p.C
    e_in = ELEM_BYTES[p.in_dtype]
    total = n * e_in + p.C * e_in  # x and weight
    if p.spec.residual:
        total += 2 * n * e_in  # residual read and written back
        if p.out_format == p.in_dtype:
            return total + n * e_in  # normalised value written over x
    if p.out_format in FP4_BLOCK:
        return total + n // 2 + scale_bytes(p)
    return total + n * ELEM_BYTES[p.out_format]
