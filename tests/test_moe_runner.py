"""The fused-MoE GPU runner's parts that run anywhere (on CPU tensors here): case construction (shared weights,
routing drawn from the problem's model, poisoned output, touched-bytes size), the check's tolerances, and the
torch peer (bf16 weights through torch._grouped_mm) judged by that check against the float64 reference."""
from __future__ import annotations

import pytest
import torch

from kernels import moe_problem as mp
from kernels import moe_runner as mr
from sweep.peers import build, unsupported


def problem(**kw):
    base = dict(op="fused_moe", T=37, E=8, top_k=2, H=128, I=64, quant_mode="w4a16", activation="silu",
                routing="uniform", local_experts=0)
    return mp.MoEProblem(**{**base, **kw})


def test_cases_share_the_layer_and_draw_distinct_experts_per_token():
    p = problem(routing="skewed", T=400)
    cases = mr.make_cases(p, 3, device="cpu", seed=5)
    assert all(c.args["w1_weight"] is cases[0].args["w1_weight"] for c in cases)  # one copy of the weights
    for c in cases:
        ids = c.args["token_selected_experts"]
        assert ids.dtype == torch.int32 and ids.shape == (p.T, p.top_k)
        assert (ids.sort(dim=1).values.diff(dim=1) != 0).all()  # top_k distinct experts per token
        assert torch.allclose(c.args["token_final_scales"].sum(1), torch.ones(p.T))
        assert torch.isnan(c.args["out"].float()).all()  # poisoned
        assert c.nbytes == mp.ideal_bytes(p)  # what one call touches, not every expert's weights
    counts = torch.bincount(cases[0].args["token_selected_experts"].reshape(-1).long(), minlength=p.E)
    assert counts[0] > 2 * counts[-1]  # Zipf: expert 0 is the hottest
    assert not torch.equal(cases[0].args["x"], cases[1].args["x"])


def test_zero_tokens_make_empty_cases():
    c = mr.make_case(problem(T=0), device="cpu")
    assert c.args["x"].shape == (0, 128) and c.args["token_selected_experts"].shape == (0, 2)
    assert mr.compare(problem(T=0), c.args["out"], torch.zeros(0, 128)).ok


@pytest.mark.parametrize("quant_mode, bump, ok", [("w4a16", 0.01, True), ("w4a16", 0.03, False),
                                                  ("nvfp4", 0.02, True), ("nvfp4", 0.05, False)])
def test_check_tolerances(quant_mode, bump, ok):
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(16, 128, generator=g)
    got = ref * (1 + bump * torch.sign(torch.randn(16, 128, generator=g)))  # error = bump in both measures
    assert mr.compare(problem(quant_mode=quant_mode), got, ref).ok is ok
    nan = got.clone()
    nan[3, 4] = float("nan")
    assert not mr.compare(problem(quant_mode=quant_mode), nan, ref).ok


@pytest.mark.parametrize("activation", ["silu", "relu2"])
@pytest.mark.parametrize("local_experts", [0, 3])
def test_torch_peer_passes_the_check(activation, local_experts):
    p = problem(activation=activation, routing="skewed", local_experts=local_experts)
    case = mr.make_case(p, device="cpu")
    launch, write_back = build("torch_eager", p, case)
    write_back(launch())
    res = mr.check(p, case)
    assert res.ok, res.message


def test_peers_that_cannot_run_a_moe_problem_say_why():
    assert "FP4 activations" in unsupported(problem(quant_mode="nvfp4"), "torch_eager")
    assert unsupported(problem(), "torch_eager") is None
    assert "torch.compile" in unsupported(problem(), "torch_compile")


def test_the_forced_config_launcher_passes_fc2_splits(monkeypatch):
    from kernels import fused_moe as fm
    from kernels.moe_config import MoEConfig

    seen = {}
    monkeypatch.setattr(fm, "fused_moe", lambda *a, **kw: seen.update(kw))
    p = problem(T=1)
    cfg = MoEConfig(16, 4, 32, 128, 1, 2, 32, 64, 1, 2, 4)
    mr.launcher(p, cfg, mr.make_case(p, device="cpu"))()
    fc1, fc2 = seen["configs"]
    assert (fc1.splits, fc2.splits) == (1, 4) and (fc2.bm, fc2.bn, fc2.bk, fc2.stages) == (16, 32, 64, 4)
