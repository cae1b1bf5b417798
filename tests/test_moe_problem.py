"""Fused-MoE problem descriptor (kernels/moe_problem.py): validation, roofline quantities against hand counts
and Monte-Carlo routing, and the [moe] problem-set table (problem_sets/moe.toml)."""
import math

import pytest
import torch
from click.testing import CliRunner

import problem_sets as PS
from problem_sets.moe import moe_problems
from kernels import moe_problem as M
from kernels.moe_problem import MoEProblem
from sweep.cli import main

BASE = dict(op="fused_moe", T=4, E=8, top_k=2, H=128, I=64)


def make(**kw) -> MoEProblem:
    return MoEProblem(**(BASE | kw))


@pytest.mark.parametrize("kw, match", [
    (dict(op="moe"), "op must be one of"),
    (dict(T=-1), "T must be >= 0"),
    (dict(T=1.0), "T must be an int"),
    (dict(E=True), "E must be an int"),
    (dict(E=0, top_k=1), "E must be >= 1"),
    (dict(top_k=0), r"top_k must be in \[1, min\(E, 8\)\] = \[1, 8\]"),
    (dict(top_k=9, E=16), r"top_k must be in \[1, min\(E, 8\)\] = \[1, 8\]"),
    (dict(top_k=3, E=2), r"= \[1, 2\]"),
    (dict(H=100), "H must be a positive multiple of 64.*16-element blocks.*K tiles"),
    (dict(H=0), "H must be a positive multiple of 64"),
    (dict(I=32), "I must be a positive multiple of 64"),
    (dict(quant_mode="fp8"), "quant_mode must be one of"),
    (dict(activation="gelu"), "activation must be one of"),
    (dict(routing="zipf"), "routing must be one of"),
    (dict(local_experts=-1), r"local_experts must be in \[0, E=8\]"),
    (dict(local_experts=9), r"local_experts must be in \[0, E=8\]"),
])
def test_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_properties_and_labels():
    p = make()
    assert (p.n_local, p.pairs, p.fc1_rows) == (8, 8, 128)
    assert make(local_experts=3).n_local == 3 and make(local_experts=8).n_local == 8
    assert make(activation="relu2").fc1_rows == 64
    assert make(T=0).pairs == 0
    assert M.layer_label(p) == "E8k2 H128 I64"
    with pytest.raises(AttributeError):
        p.T = 5  # frozen: problems are dict keys


def test_routing_probabilities():
    assert M.routing_probabilities(4, "uniform") == [0.25] * 4
    assert M.routing_probabilities(3, "skewed") == pytest.approx([6 / 11, 3 / 11, 2 / 11])
    for E in (1, 8, 128, 256):
        for r in M.ROUTINGS:
            assert math.fsum(M.routing_probabilities(E, r)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="routing must be one of"):
        M.routing_probabilities(4, "zipf")
    with pytest.raises(ValueError, match="E must be"):
        M.routing_probabilities(0, "uniform")
    for E, k in ((8, 2), (128, 8), (256, 8)):
        q = M.inclusion_probabilities(E, k, "skewed")
        assert math.fsum(q) == pytest.approx(k) and all(0 < x <= 1 for x in q)
        assert q == sorted(q, reverse=True)
    assert M.inclusion_probabilities(4, 4, "skewed") == [1.0] * 4


def _mc_touched(p: MoEProblem, trials: int, gen: torch.Generator) -> float:
    """Distinct local experts hit by T tokens, each drawing top_k distinct experts by successive sampling
    (the routing model's definition), averaged over trials."""
    probs = torch.tensor(M.routing_probabilities(p.E, p.routing), dtype=torch.float64)
    ids = torch.multinomial(probs.expand(trials * p.T, p.E), p.top_k, replacement=False, generator=gen)
    ids = ids.view(trials, p.T * p.top_k)
    hit = torch.zeros(trials, p.E, dtype=torch.bool)
    hit.scatter_(1, ids, True)
    return hit[:, :p.n_local].sum(1).double().mean().item()


@pytest.mark.parametrize("routing", M.ROUTINGS)
@pytest.mark.parametrize("E, top_k, local", [(128, 8, 0), (8, 2, 0), (256, 8, 0), (128, 4, 0), (128, 6, 32),
                                            (64, 1, 16)])
def test_expected_experts_touched_matches_monte_carlo(routing, E, top_k, local):
    gen = torch.Generator().manual_seed(1234)
    for T in (1, 3, 8, 32, 128, 1024):
        p = MoEProblem("fused_moe", T=T, E=E, top_k=top_k, H=64, I=64, routing=routing, local_experts=local)
        mc = _mc_touched(p, max(20, 20000 // T), gen)
        assert M.expected_experts_touched(p) == pytest.approx(mc, rel=0.03), (T, mc)


def test_expected_experts_touched_closed_forms():
    assert M.expected_experts_touched(make(T=0)) == 0.0
    assert M.expected_experts_touched(make(T=1)) == pytest.approx(2.0)  # one token touches exactly top_k
    assert M.expected_experts_touched(make(T=1, routing="skewed")) == pytest.approx(2.0)
    assert M.expected_experts_touched(make(T=4)) == pytest.approx(8 * (1 - 0.75 ** 4))
    assert M.expected_experts_touched(make(T=4, local_experts=2)) == pytest.approx(2 * (1 - 0.75 ** 4))
    assert M.expected_experts_touched(make(T=10 ** 6, routing="skewed")) == pytest.approx(8.0)
    # skew concentrates the same pairs on fewer experts; the local (hot) slice is hit more than uniform's
    assert M.expected_experts_touched(make(T=4, routing="skewed")) < M.expected_experts_touched(make(T=4))
    assert (M.expected_experts_touched(make(T=4, routing="skewed", local_experts=2))
            > M.expected_experts_touched(make(T=4, local_experts=2)))


def test_bytes_and_flops_hand_computed():
    p = make()  # T=4 E=8 top_k=2 H=128 I=64 silu: W1 [128, 128], W2 [128, 64]
    elems = 128 * 128 + 128 * 64  # 24576
    per_expert = elems / 2 + elems / 16 + 8  # FP4 values, e4m3 scales, two fp32 alphas
    assert per_expert == 13832
    assert M.weight_bytes(p, 1) == 13832 and M.weight_bytes(p, 2.5) == 2.5 * 13832
    touched = 8 * (1 - 0.75 ** 4)  # 5.46875
    assert M.ideal_bytes(p) == round(touched * 13832) + 2 * 4 * 128 * 2 + 4 * 2 * 8 == 75644 + 2048 + 64
    assert M.flops(p) == 2 * 8 * elems == 393216
    # a quarter of the experts local (uniform): a quarter of the flops, the local experts' weights only
    q = make(local_experts=2)
    assert M.flops(q) == 393216 // 4
    assert M.ideal_bytes(q) == round(2 * (1 - 0.75 ** 4) * 13832) + 2048 + 64
    # ReLU2: FC1 has I rows, not 2I
    r = make(activation="relu2")
    assert M.weight_bytes(r, 1) == (64 * 128 + 128 * 64) * (1 / 2 + 1 / 16) + 8
    assert M.flops(r) == 2 * 8 * (64 * 128 + 128 * 64)
    # the activation quantization of nvfp4 happens on-chip: the same traffic and flops as w4a16
    assert M.ideal_bytes(make(quant_mode="w4a16")) == M.ideal_bytes(p)
    assert M.flops(make(T=0)) == 0 and M.ideal_bytes(make(T=0)) == 0
    # skewed, local slice: the pairs' local fraction is the local inclusion probabilities over top_k
    s = make(routing="skewed", local_experts=2)
    frac = sum(M.inclusion_probabilities(8, 2, "skewed")[:2]) / 2
    assert 2 / 8 < frac < 1 and M.flops(s) == round(393216 * frac)
    assert M.flops(make(routing="skewed")) == 393216


def test_decode_is_weight_bound():
    p = MoEProblem("fused_moe", T=1, E=128, top_k=8, H=2048, I=768)
    assert M.weight_bytes(p, M.expected_experts_touched(p)) > 0.99 * M.ideal_bytes(p)


# --------------------------------------------------------------------------- problem_sets/moe.toml
def test_shipped_moe_set():
    s = PS.load("moe")
    assert s.family == "moe" and s.shapes == [] and not s.per_head and s.description
    probs = moe_problems("moe")
    assert len(probs) == 5 * 15 * 2 * 2 == len(s.moe_names)
    assert len(set(probs)) == len(probs) and all(isinstance(p, MoEProblem) for p in probs)
    assert probs[0] == MoEProblem("fused_moe", T=1, E=128, top_k=8, H=2048, I=768, quant_mode="nvfp4",
                                  activation="silu", routing="uniform")
    assert probs[1].quant_mode == "w4a16" and probs[2].routing == "skewed" and probs[4].T == 2  # quant fastest
    assert {M.layer_label(p) for p in probs} == {"E128k8 H2048 I768", "E8k2 H4096 I14336", "E256k8 H7168 I2048",
                                                 "E128k4 H2880 I2880", "E128k6 H2688 I1856"}
    assert dict(zip(s.moe_names, (p.activation for p in probs)))["nemotron-h-relu2"] == "relu2"
    assert sorted({p.T for p in probs}) == [2 ** k for k in range(15)]


def test_moe_set_expands_for_fused_moe_only():
    with pytest.raises(ValueError, match="rmsnorm is a row op but set 'moe' is a moe set"):
        PS.problems("moe", "rmsnorm", "bf16", "bf16")
    with pytest.raises(ValueError, match="unknown op"):
        PS.problems("moe", "layernorm", "bf16", "bf16")
    with pytest.raises(ValueError, match="set 'llm' is a row set, not a moe set"):
        moe_problems("llm")
    with pytest.raises(ValueError, match="takes bf16 x and writes bf16"):
        PS.problems("moe", "fused_moe", "bf16", "fp8")
    assert PS.problems("moe", "fused_moe", "bf16", "bf16") == moe_problems("moe")
    from sweep.fallback_fit import holdout_sizes
    from sweep.sweep_cmd import select_problems

    chosen, skipped = select_problems("moe", ["rmsnorm"], ["bf16"], "bf16", None)
    assert chosen == [] and len(skipped) == 1 and "moe set" in skipped[0]
    chosen, skipped = select_problems("moe", ["fused_moe"], ["bf16"], "bf16", 4)
    assert len(chosen) == 4 and not skipped
    with pytest.raises(ValueError, match="is a moe set: it has no row hidden sizes"):
        holdout_sizes(["moe"], "")


def test_cli_lists_the_moe_set():
    runner = CliRunner()
    res = runner.invoke(main, ["problems"])
    assert res.exit_code == 0, res.output
    assert any(line.split()[:3] == ["moe", "300", "moe"] for line in res.output.splitlines())
    res = runner.invoke(main, ["problems", "moe"])
    assert res.exit_code == 0, res.output
    assert "deepseek-v3       256  8      7168  2048   silu        all    E256k8 H7168 I2048" in res.output
    assert "routing: uniform, skewed" in res.output and res.output.rstrip().endswith("300 problems")


LAYER = '{name = "a", E = 8, top_k = 2, H = 128, I = 64, activation = "silu"}'


def moe_toml(tokens="[1, 2]", routing='["uniform"]', quant='["nvfp4"]', layers=f"[{LAYER}]", extra="") -> str:
    return (f'description = "d"\n[moe]\ntokens = {tokens}\nrouting = {routing}\nquant_modes = {quant}\n'
            f'layers = {layers}\n{extra}')


def test_custom_moe_set(tmp_path):
    (tmp_path / "m.toml").write_text(moe_toml(
        layers=f'[{LAYER}, {{name = "b", E = 16, top_k = 4, H = 64, I = 128, activation = "relu2", '
               'local_experts = 4}]', routing='["skewed", "uniform"]'))
    probs = moe_problems("m", tmp_path)
    assert len(probs) == 2 * 2 * 2
    assert probs[-1] == MoEProblem("fused_moe", T=2, E=16, top_k=4, H=64, I=128, activation="relu2",
                                   routing="uniform", local_experts=4)
    assert PS.load("m", tmp_path).moe_names == ["a"] * 4 + ["b"] * 4


@pytest.mark.parametrize("text, match", [
    (moe_toml(extra='[axes]\nhidden = [64]\ntokens = [1]\n'), r"not both \[axes\] and \[moe\]"),
    ('description = "d"\nmoe = 3\n', "bad.toml: moe must be a table"),
    (moe_toml(extra="E = [8]\n"), r"bad.toml: \[moe\] must hold exactly tokens, routing, quant_modes, layers; "
                                  r"unknown: \['E'\]"),
    ('description = "d"\n[moe]\ntokens = [1]\n', r"missing: \['routing', 'quant_modes', 'layers'\]"),
    (moe_toml(tokens="[]"), "bad.toml: moe.tokens must be a non-empty list"),
    (moe_toml(tokens="1"), "bad.toml: moe.tokens must be a non-empty list"),
    (moe_toml(tokens="[1.0]"), r"bad.toml: moe.tokens must hold integers >= 1, got 1.0"),
    (moe_toml(tokens="[0]"), "bad.toml: moe.tokens must hold integers >= 1"),
    (moe_toml(tokens="[true]"), "bad.toml: moe.tokens must hold integers >= 1"),
    (moe_toml(tokens="[1, 1]"), "bad.toml: moe.tokens has duplicate values"),
    (moe_toml(routing='["zipf"]'), r"bad.toml: moe.routing must hold values from \['uniform', 'skewed'\]"),
    (moe_toml(routing='["uniform", "uniform"]'), "bad.toml: moe.routing has duplicate values"),
    (moe_toml(quant='["fp8"]'), "bad.toml: moe.quant_modes must hold values from"),
    (moe_toml(quant='[]'), "bad.toml: moe.quant_modes must be a non-empty list"),
    (moe_toml(layers="[]"), "bad.toml: moe.layers must be a non-empty list"),
    (moe_toml(layers="[3]"), r"bad.toml: moe.layers\[0\] must be an inline table"),
    (moe_toml(layers=LAYER.join("[]").replace("}", ", experts = 8}")),
     r"bad.toml: moe.layers\[0\]: unknown key\(s\) \['experts'\]"),
    (moe_toml(layers=LAYER.join("[]").replace(', activation = "silu"', "")),
     r"bad.toml: moe.layers\[0\]: missing key\(s\) \['activation'\]"),
    (moe_toml(layers=LAYER.join("[]").replace('"a"', '""')), r"moe.layers\[0\].name must be a non-empty string"),
    (moe_toml(layers=LAYER.join("[]").replace("H = 128", "H = 128.0")),
     r"bad.toml: moe.layers\[0\] \(a\).H must be an integer, got 128.0"),
    (moe_toml(layers=LAYER.join("[]").replace("E = 8", 'E = "8"')), r"moe.layers\[0\] \(a\).E must be an integer"),
    (moe_toml(layers=LAYER.join("[]").replace("}", ", local_experts = true}")),
     r"moe.layers\[0\] \(a\).local_experts must be an integer"),
    (moe_toml(layers=LAYER.join("[]").replace('"silu"', '"gelu"')), r"moe.layers\[0\] \(a\).activation must be one"),
    (moe_toml(layers=LAYER.join("[]").replace("H = 128", "H = 96")),
     r"bad.toml: moe.layers\[0\] \(a\): H must be a positive multiple of 64"),
    (moe_toml(layers=LAYER.join("[]").replace("top_k = 2", "top_k = 9")), r"moe.layers\[0\] \(a\): top_k must be"),
    (moe_toml(layers=LAYER.join("[]").replace("}", ", local_experts = 9}")),
     r"moe.layers\[0\] \(a\): local_experts must be in"),
    (moe_toml(layers=f"[{LAYER}, {LAYER}]"), r"bad.toml: moe.layers has duplicate names \['a'\]"),
    (moe_toml(layers=f'[{LAYER}, {LAYER.replace(chr(34) + "a", chr(34) + "b")}]'),
     "bad.toml: moe.layers 'a' and 'b' are the same layer"),
    (moe_toml(layers=f'[{LAYER}, {LAYER.replace(chr(34) + "a", chr(34) + "b").replace("}", ", local_experts = 0}")}]'),
     "bad.toml: moe.layers 'a' and 'b' are the same layer"),  # local_experts 0 is the default
])
def test_malformed_moe_files_name_file_and_field(tmp_path, text, match):
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(ValueError, match=match):
        PS.load("bad", tmp_path)
