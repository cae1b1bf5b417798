"""Launch arguments: what the runner and the ops hand the compiled TVM-FFI function matches its signature
(argument count, pointer/int/float kinds, None where the op has no such tensor). Without a GPU the call gets
as far as the CUDA runtime, which proves the arguments decoded; a mismatch raises TypeError first."""
from __future__ import annotations

import pytest
import torch

from kernels import runner
from kernels.compile_cache import get_compiled
from kernels.config import heuristic
from kernels.problem import Problem

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU pointers must never reach a real launch")


def test_pointers_follow_the_tensors():
    p = Problem("fused_add_rmsnorm", 3, 2048)
    case = runner.make_case(p, device="cpu", seed=0)
    a = case.args
    cfg = heuristic(p, 90)
    args = runner.kernel_args(p, cfg, a["x"], a["weight"], a["residual"], a["x"], None, None)
    assert args[:6] == [a["x"].data_ptr(), a["weight"].data_ptr(), a["residual"].data_ptr(), a["x"].data_ptr(),
                        None, None]
    assert args[6:] == [3, a["x"].stride(0), a["x"].stride(1), a["residual"].stride(0), a["x"].stride(0),
                        a["x"].stride(1), 0, 0]
    with pytest.raises(ValueError, match="residual must be given"):
        runner.kernel_args(p, cfg, a["x"], a["weight"], None, a["x"], None, None)


@pytest.mark.parametrize("problem", [
    Problem("rmsnorm", 5, 4096),
    Problem("fused_add_rmsnorm_quant", 5, 1024, out_format="fp8"),
    Problem("qk_rmsnorm", 5, 128, heads=4),
    Problem("rmsnorm_fp4quant", 5, 256, out_format="nvfp4", scale_layout="swizzled"),
], ids=lambda p: p.op)
def test_compiled_function_accepts_the_runner_arguments(problem, tmp_path, monkeypatch):
    monkeypatch.setenv("LUTFORGE_CACHE_DIR", str(tmp_path))
    cfg = heuristic(problem, 90)
    fn = get_compiled(problem, cfg, "sm_90a")
    case = runner.make_case(problem, device="cpu", seed=1)
    a = case.args
    args = runner.kernel_args(problem, cfg, a["x"], a["weight"], a.get("residual"), a.get("y", a["x"]),
                              a.get("block_scale"), a.get("global_scale"))
    with pytest.raises(TypeError):
        fn(*args, 1e-6, 1.0, 132)  # the stream is missing: refused before anything runs
    with pytest.raises(RuntimeError, match="(?i)cuda"):
        fn(*args, 1e-6, 1.0, 132, 0)  # every argument decoded; only the missing driver stops it
