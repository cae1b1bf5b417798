"""Rotation sets built in bulk: every instance is independent (own aligned slot), inputs random and equal to
their pristine copies, outputs poisoned, and writing one instance never touches another."""
from __future__ import annotations

import pytest
import torch

from kernels import runner
from kernels.problem import Problem

PROBLEMS = [Problem("qk_rmsnorm", 1, 64, heads=32), Problem("rmsnorm", 3, 100),
            Problem("fused_add_rmsnorm", 5, 64), Problem("fused_add_rmsnorm_quant", 4, 160, out_format="fp8"),
            Problem("rmsnorm_fp4quant", 130, 64, out_format="nvfp4", scale_layout="swizzled"),
            Problem("rmsnorm_fp4quant", 3, 64, out_format="mxfp4"),
            Problem("fused_rmsnorm_silu", 4, 160, out_format="nvfp4"), Problem("rmsnorm", 0, 64)]


@pytest.mark.parametrize("p", PROBLEMS, ids=lambda p: f"{p.op}-{p.out_format}-{p.T}x{p.C}")
def test_instances_are_independent_aligned_and_poisoned(p):
    cases = runner.make_cases(p, 4, device="cpu", seed=1)
    one = runner.make_case(p, device="cpu")
    for c in cases:
        assert c.outputs == one.outputs and c.nbytes == one.nbytes and c.scale == one.scale
        assert {k: v.shape for k, v in c.args.items()} == {k: v.shape for k, v in one.args.items()}
        for name, t in c.args.items():
            assert (t.data_ptr() - cases[0].args[name].data_ptr()) % runner.SLOT_ALIGN == 0
            if name in c.inputs:
                assert torch.equal(t, c.inputs[name])
        for name in c.outputs:
            if name not in c.inputs:
                assert (c.args[name].view(torch.uint8) == runner.POISON_BYTE).all()
    if p.T == 0:
        return
    xs = [c.args["x"].float() for c in cases]
    assert all(x.std() > 1 for x in xs) and not torch.equal(xs[0], xs[1])  # randn*5+5, distinct per instance
    out = next(n for n in cases[0].outputs if n not in cases[0].inputs or n == "x")
    before = [c.args[out].clone() for c in cases[1:]]
    cases[0].args[out].view(torch.uint8).fill_(0)
    assert all(torch.equal(c.args[out].view(torch.uint8), b.view(torch.uint8)) for c, b in zip(cases[1:], before))
    cases[0].args["x"].fill_(0)
    runner.poison(cases[0])  # in-place outputs come back from the pristine copy; others are re-poisoned
    for name in cases[0].outputs:
        if name in cases[0].inputs:
            assert torch.equal(cases[0].args[name], cases[0].inputs[name])


def test_at_least_one_case():
    with pytest.raises(ValueError):
        runner.make_cases(PROBLEMS[0], 0, device="cpu")
