"""Public ops reject bad input with ValueError/TypeError before anything is launched (CPU: every
check that does not need a GPU; the GPU fuzz is tests/gpu/test_ops_gpu.py)."""
from __future__ import annotations

import pytest
import torch

from kernels import ops

BF = torch.bfloat16


def _x(T=4, C=64, dtype=BF):
    return torch.randn(T, C).to(dtype)


def _w(C=64, dtype=BF):
    return torch.rand(C).to(dtype) + 0.5


@pytest.mark.parametrize("call,err,needle", [
    (lambda: ops.rmsnorm(_x(dtype=torch.float32), _w()), TypeError, "bfloat16 or float16"),
    (lambda: ops.rmsnorm(_x(), _w(dtype=torch.float16)), TypeError, "must match input dtype"),
    (lambda: ops.rmsnorm(_x(), _w(65)), ValueError, "weight must have shape"),
    (lambda: ops.rmsnorm(_x().reshape(-1)[0], _w()), ValueError, "hidden"),
    (lambda: ops.rmsnorm(_x(), _w()), ValueError, "CUDA device"),
    (lambda: ops.rmsnorm(_x(64, 4).t(), _w(64)), ValueError, "contiguous in its last dimension"),
    (lambda: ops.rmsnorm(_x(), _w(), eps=-1.0), ValueError, "eps"),
    (lambda: ops.rmsnorm(_x(), _w(), eps="1e-6"), ValueError, "eps"),
    (lambda: ops.rmsnorm(_x(), _w(), out=torch.empty(5, 64, dtype=BF)), ValueError, "out must have shape"),
    (lambda: ops.rmsnorm(_x(), _w(), out=torch.empty(4, 64)), TypeError, "out must have dtype"),
    (lambda: ops.rmsnorm([[1.0]], _w()), TypeError, "torch.Tensor"),
    (lambda: ops.fused_add_rmsnorm(_x(), _x(5), _w()), ValueError, "residual must match"),
    (lambda: ops.rmsnorm_quant(torch.empty(4, 64, dtype=torch.float8_e4m3fn), _x(), _w(), 0.0), ValueError, "scale"),
    (lambda: ops.rmsnorm_quant(torch.empty(4, 64, dtype=BF), _x(), _w(), 1.0), TypeError, "float8_e4m3fn"),
    (lambda: ops.qk_rmsnorm(_x(), _w()), ValueError, "3D"),
    (lambda: ops.fused_rmsnorm_silu(_x(4, 24), _w(24), out=torch.empty(4, 12, dtype=torch.uint8)), ValueError,
     "divisible by 16"),
    (lambda: ops.fused_rmsnorm_silu(_x(), _w(), out=torch.empty(4, 64)), TypeError, "out dtype"),
    (lambda: ops.rmsnorm_fp4quant(_x(), _w(), block_size=8), ValueError, "block_size"),
    (lambda: ops.rmsnorm_fp4quant(_x(), _w(), block_size=True), ValueError, "block_size"),
    (lambda: ops.rmsnorm_fp4quant(_x(), _w(), block_size=16, scale_format="ue8m0"), ValueError, "scale_format"),
    (lambda: ops.rmsnorm_fp4quant(_x(4, 48), _w(48), block_size=32), ValueError, "not divisible"),
    (lambda: ops.rmsnorm_fp4quant(_x(), _w(), global_scale=torch.ones(2)), ValueError, "global_scale"),
    (lambda: ops.rmsnorm_fp4quant(_x(), _w(), block_size=32, global_scale=torch.ones(1)), ValueError, "NVFP4"),
    (lambda: ops.rmsnorm_fp4quant(_x(), _w(), block_scale=torch.empty(10, dtype=torch.float8_e4m3fn),
                                  is_sf_swizzled_layout=True), ValueError, "swizzled block_scale"),
    (lambda: ops.rmsnorm(_x(6, 64).view(2, 3, 64).transpose(0, 1), _w()), ValueError, "flatten to rows"),
])
def test_bad_input_raises_a_clear_error(call, err, needle):
    with pytest.raises(err, match=needle):
        call()
