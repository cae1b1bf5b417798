"""fused_moe without a GPU: argument checks, the routing permutation, the NVFP4 conventions, the float
reference against a per-pair loop, the configs' constraints and their compiles for sm_90a."""
from __future__ import annotations

import inspect
import itertools
import math
from dataclasses import replace

import pytest
import torch

from kernels import fused_moe as fm
from kernels.encoders import dequantize_fp4, quantize_nvfp4
from kernels import moe_config as mc
from kernels import moe_problem as mp
from kernels.moe_config import (MOE_KNOB_CHOICES, MoEConfig, MoEGemmConfig, MoEGemmShape, gemm_shapes, heuristic,
                                smem_bytes, violations)
from kernels.moe_quant import dequantize_weights, fake_quantize_nvfp4, quantize_weights
from kernels.moe_reference import fused_moe_reference
from kernels.moe_combine_kernel import MoECombineSpec
from kernels.moe_route_kernel import MoERouteSpec

E, H, I, T, K = 4, 128, 64, 6, 2


def layer(activation="silu", El=E, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows1 = 2 * I if activation == "silu" else I
    w1q, w1sf, g1 = quantize_weights(torch.randn(El, rows1, H, generator=g) * 0.1)
    w2q, w2sf, g2 = quantize_weights(torch.randn(El, H, I, generator=g) * 0.1)
    return w1q, w1sf, w2q, w2sf, (1 / g1).float(), (1 / g2).float()


def routing(seed=0, t=T, k=K, e=E):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).int()
    return ids, torch.rand(t, k, generator=g)


def call(**over):
    w1q, w1sf, w2q, w2sf, a1, a2 = layer()
    ids, sc = routing()
    args = dict(x=torch.randn(T, H).bfloat16(), w1_weight=w1q, w1_weight_sf=w1sf, w2_weight=w2q, w2_weight_sf=w2sf,
                token_selected_experts=ids, token_final_scales=sc, num_experts=E, top_k=K)
    kw = dict(w1_alpha=a1, w2_alpha=a2, fc2_input_scale=torch.tensor([2.0]))
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    return fm.fused_moe(*args.values(), **kw)


@pytest.mark.parametrize("over, exc, match", [
    (dict(x=torch.randn(T, H)), TypeError, "x must be bfloat16"),
    (dict(x=torch.randn(T, H, 1).bfloat16()), ValueError, r"\[num_tokens, hidden_size\]"),
    (dict(x=torch.randn(T, 2 * H).bfloat16()[:, ::2]), ValueError, "contiguous"),
    (dict(w1_weight=torch.zeros(E, 2 * I, H // 2 + 16, dtype=torch.uint8)), ValueError, "w1_weight must have shape"),
    (dict(w1_weight=torch.zeros(E, 2 * I, H // 2, dtype=torch.int8)), TypeError, "w1_weight must have dtype"),
    (dict(w1_weight_sf=torch.zeros(E, 2 * I, H // 32, dtype=torch.float8_e4m3fn)), ValueError,
     "w1_weight_sf must have shape"),
    (dict(w2_weight_sf=torch.zeros(E, H, I // 16, dtype=torch.float16)), TypeError, "w2_weight_sf must have dtype"),
    (dict(w2_weight=torch.zeros(E, H, I // 4, dtype=torch.uint8)), ValueError, "w2_weight must have shape"),
    (dict(token_selected_experts=torch.zeros(T, K + 1, dtype=torch.int32)), ValueError,
     "token_selected_experts must have shape"),
    (dict(token_selected_experts=torch.zeros(T, K)), TypeError, "token_selected_experts must have dtype"),
    (dict(token_final_scales=torch.zeros(T, K, dtype=torch.float16)), TypeError, "token_final_scales must have dtype"),
    (dict(w1_alpha=torch.ones(E - 1)), ValueError, "w1_alpha must have shape"),
    (dict(fc2_input_scale=None), ValueError, "needs fc2_input_scale"),
    (dict(fc2_input_scale=torch.ones(2)), TypeError, "fc2_input_scale"),
    (dict(top_k=9), ValueError, "top_k"),
    (dict(num_local_experts=E + 1), ValueError, "num_local_experts"),
    (dict(local_expert_offset=1), ValueError, "local_expert_offset"),
    (dict(activation="gelu"), ValueError, "activation"),
    (dict(activation="relu2"), ValueError, "w2_weight must have shape|w1_weight"),
    (dict(quant_mode="int4"), ValueError, "quant_mode"),
    (dict(activation_precision="fp8"), ValueError, "activation_precision"),
    (dict(source_format="compressed_tensors"), ValueError, "source_format"),
    (dict(output_dtype=torch.float16), TypeError, "output_dtype"),
    (dict(output=torch.empty(T, H, dtype=torch.float32)), TypeError, "output must have dtype"),
    (dict(check_expert_ids="always"), ValueError, "check_expert_ids must be one of"),
    (dict(), ValueError, "CUDA device"),  # every check passes on CPU tensors but the device
])
def test_bad_arguments_are_refused_before_launch(over, exc, match):
    with pytest.raises(exc, match=match):
        call(**over)


def test_w4a16_needs_no_fc2_input_scale_and_aliases_resolve():
    with pytest.raises(ValueError, match="CUDA device"):
        call(fc2_input_scale=None, quant_mode="w4a16")
    with pytest.raises(ValueError, match="CUDA device"):
        call(fc2_input_scale=None, activation_precision="bf16")
    with pytest.raises(ValueError, match="CUDA device"):
        call(quant_mode="w4a4")


@pytest.mark.parametrize("spec", [MoERouteSpec(128, 8, 16, 16, "int32", "fp32"),
                                  MoERouteSpec(256, 8, 128, 64, "int64", "bf16"), MoERouteSpec(8, 1, 32, 16, "int32", "fp32"),
                                  MoERouteSpec(8, 2, 8, 8, "int32", "fp32", quant_h=4096)])
def test_routing_kernel_compiles_for_sm90a(spec):
    assert fm.compile_route(spec, "sm_90a") is not None


def test_routing_launch_quantises_x_on_ctas_of_its_own():
    from kernels.moe_route_kernel import QUANT_MAX_CTAS, quant_ctas

    spec = MoERouteSpec(8, 2, 8, 8, "int32", "fp32", quant_h=4096)
    assert quant_ctas(MoERouteSpec(8, 2, 8, 8, "int32", "fp32"), 4096) == 0  # W4A16: routing alone
    assert quant_ctas(spec, 1) == 1 and quant_ctas(spec, 2) == 1  # 256 blocks of 16 per token, 512 threads
    assert quant_ctas(spec, 3) == 2 and quant_ctas(spec, 16384) == QUANT_MAX_CTAS


@pytest.mark.parametrize("spec", [MoECombineSpec(8, 1, 2048), MoECombineSpec(2, 8, 4096), MoECombineSpec(1, 2, 64)])
def test_combine_kernel_compiles_for_sm90a(spec):
    assert fm.compile_combine(spec, "sm_90a") is not None


def test_workspace_layout_is_aligned_and_disjoint():
    off, total = fm.workspace_layout(n_local=7, P=13, inter=768, H=2048, splits=2, xq_rows=5, counters=3)
    sizes = {"eo": 32, "to1": 32, "to2": 32, "a_rows": 52, "out_rows": 52, "row_scale": 52, "valid": 52, "bad": 4,
             "inter": 2 * 13 * 768, "y": 4 * 2 * 13 * 2048, "counters": 12, "xq": 2 * 5 * 2048}
    spans = sorted((off[k], off[k] + n) for k, n in sizes.items())
    assert all(o % 16 == 0 for o in off.values()) and set(off) == set(sizes)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])) and spans[-1][1] <= total


def test_weight_quantisation_is_modelopt_nvfp4():
    w = torch.randn(3, 32, 64)
    q, sf, gs = quantize_weights(w)
    assert q.dtype == torch.uint8 and q.shape == (3, 32, 32) and sf.dtype == torch.float8_e4m3fn
    deq = dequantize_weights(q, sf)
    for e in range(3):
        q2, s2 = quantize_nvfp4(w[e], gs[e].reshape(1))
        assert torch.equal(q2, q[e]) and torch.equal(s2, sf[e].view(torch.uint8))
        assert torch.allclose(deq[e] / gs[e], dequantize_fp4(q2, s2, "nvfp4", gs[e].reshape(1)), rtol=1e-6, atol=0)
    assert float((deq / gs.view(-1, 1, 1) - w).norm() / w.norm()) < 0.12  # FP4's error on normal data


def test_fake_quantisation_matches_the_encoder_and_is_bf16_exact():
    x = torch.randn(5, 64) * 3
    gs = torch.tensor(2.0)
    fq = fake_quantize_nvfp4(x, gs)
    q, s = quantize_nvfp4(x, gs.reshape(1))
    assert torch.allclose(fq / gs, dequantize_fp4(q, s, "nvfp4", gs.reshape(1)), rtol=1e-6, atol=0)
    assert torch.equal(fq.to(torch.bfloat16).float(), fq)


@pytest.mark.parametrize("activation", ["silu", "relu2"])
@pytest.mark.parametrize("quant_mode", ["w4a16", "nvfp4"])
def test_reference_equals_a_per_pair_loop(activation, quant_mode):
    w1q, w1sf, w2q, w2sf, a1, a2 = layer(activation, El=2)
    ids, sc = routing(1, t=5, k=2, e=E)  # experts 0..3, local 2..3 (offset 2)
    x = torch.randn(5, H).bfloat16()
    fc2s = torch.tensor([2.0])
    ref = fused_moe_reference(x, w1q, w1sf, w2q, w2sf, ids, sc, w1_alpha=a1, w2_alpha=a2, fc2_input_scale=fc2s,
                              local_expert_offset=2, activation=activation, quant_mode=quant_mode)
    W1, W2 = dequantize_weights(w1q, w1sf), dequantize_weights(w2q, w2sf)
    want = torch.zeros(5, H, dtype=torch.float64)
    for t in range(5):
        a = x[t].float() if quant_mode == "w4a16" else fake_quantize_nvfp4(x[t:t + 1].float(), torch.tensor(1.0))[0]
        for j in range(2):
            e = int(ids[t, j]) - 2
            if not 0 <= e < 2:
                continue
            h = (a.double() @ W1[e].double().T) * float(a1[e])
            act = torch.nn.functional.silu(h[:I]) * h[I:] if activation == "silu" else torch.relu(h) ** 2
            act = act.to(torch.bfloat16).double() if quant_mode == "w4a16" else \
                fake_quantize_nvfp4(act.float()[None], fc2s.reshape(()))[0].double()
            want[t] += (act @ W2[e].double().T) * float(a2[e]) * float(sc[t, j])
    assert torch.allclose(ref.double(), want, rtol=1e-5, atol=1e-6)


def test_configs_declare_their_constraints():
    sh = MoEGemmShape("fc1", "silu", 2048, 768)
    assert any("multiple of 16*warps_m" in v for v in violations(sh, MoEGemmConfig(16, 32, 64, 2, 2, 1)))
    assert any("K=2880 must be a multiple of bk=256" in v
               for v in violations(MoEGemmShape("fc1", "silu", 2880, 2880), MoEGemmConfig(16, 32, 256, 4, 1, 2)))
    assert any("shared memory" in v for v in violations(sh, MoEGemmConfig(128, 128, 256, 5, 4, 4)))
    assert any("not in" in v for v in violations(sh, MoEGemmConfig(bm=24)))
    with pytest.raises(ValueError, match="K a multiple of 64"):
        MoEGemmShape("fc1", "silu", 100, 64)


@pytest.mark.parametrize("H, I", [(2048, 768), (4096, 14336), (7168, 2048), (2880, 2880)])
@pytest.mark.parametrize("rows", [1, 8, 40, 1000])
@pytest.mark.parametrize("touched", [0.0, 0.3, 2.0, 128.0])
def test_heuristic_is_valid_for_real_layers(H, I, rows, touched):
    for sh in (MoEGemmShape("fc1", "silu", H, I), MoEGemmShape("fc2", "silu", I, H, "fp32")):
        cfg = heuristic(sh, rows, touched)
        assert not violations(sh, cfg) and smem_bytes(sh, cfg) <= 227 * 1024
        # the GEMV up to GEMV_ROWS per expert, decode tiles for a handful of rows
        assert cfg.bm == (8 if rows <= 8 else 16 if rows <= 16 else cfg.bm) and (cfg.bm <= 16) == (rows <= 16)
        assert (cfg.mma == "gemv") == (rows <= mc.GEMV_ROWS)
        assert cfg.splits == 1 or (sh.layer == "fc2" and rows <= 16 and sh.K // (cfg.bk * cfg.splits) >= 2)


def test_knob_choices_are_what_the_kernel_takes():
    assert set(MOE_KNOB_CHOICES) == set(MoEGemmConfig().as_dict())


# --------------------------------------------------------------------------- FC2 split-K
MIXTRAL = dict(E=8, top_k=2, H=4096, I=14336)
QWEN3 = dict(E=128, top_k=8, H=2048, I=768)


def _layer_heuristic(T, E, top_k, H, I, local_experts=0, routing="uniform"):  # noqa: E741
    """What the family's heuristic asks for a problem (kernels/family.py's _moe_family)."""
    p = mp.MoEProblem("fused_moe", T, E, top_k, H, I, "nvfp4", "silu", routing, local_experts)
    shapes = gemm_shapes(p.quant_mode, p.activation, p.H, p.I)
    return shapes, mc.layer_heuristic(shapes, mp.rows_per_expert(p), mp.expected_experts_touched(p))


def test_split_constraints():
    fc1, fc2 = gemm_shapes("w4a16", "silu", 4096, 14336)
    assert not violations(fc2, MoEGemmConfig(16, 32, 256, 4, 1, 2, 8))  # K=14336 = 7 * 256 * 8
    assert any("only FC2 splits K" in v for v in violations(fc1, MoEGemmConfig(16, 32, 256, 4, 1, 2, 2)))
    qwen_fc2 = gemm_shapes("w4a16", "silu", 2048, 768)[1]  # K=768 = 3 * 256
    assert any("multiple of bk*splits=512" in v for v in violations(qwen_fc2, MoEGemmConfig(16, 32, 256, 4, 1, 2, 2)))
    assert not violations(qwen_fc2, MoEGemmConfig(16, 32, 64, 4, 1, 2, 4))  # 768 = 3 * 64 * 4
    oss_fc2 = gemm_shapes("w4a16", "silu", 2880, 2880)[1]  # K=2880: 45 k-tiles of 64, no equal split
    assert all(any("bk*splits" in v for v in violations(oss_fc2, MoEGemmConfig(16, 16, 64, 4, 1, 1, s)))
               for s in (2, 4, 8))
    assert any("decode tile (bm <= 32)" in v for v in violations(fc2, MoEGemmConfig(64, 64, 128, 3, 2, 2, 2)))
    assert not violations(fc2, MoEGemmConfig(32, 64, 128, 3, 2, 2, 2))
    assert any("splits=3 not in" in v for v in violations(fc2, MoEGemmConfig(16, 32, 256, 4, 1, 2, 3)))
    with pytest.raises(ValueError, match="only FC2 splits K"):
        MoEConfig.of(MoEGemmConfig(16, 32, 256, 4, 1, 2, 2), MoEGemmConfig(16, 32, 256, 4, 1, 2))


def test_heuristic_splits_fc2_where_the_grid_is_short_of_ctas(monkeypatch):
    # the GEMV's 2 experts x 4096/64 = 128 CTAs: split 4 ways, then 4 K groups of warps (16 warps a CTA)
    gemv = _layer_heuristic(1, **MIXTRAL)[1]
    assert (gemv.fc2_mma, gemv.fc2_splits, gemv.fc2_warps_m) == ("gemv", 4, 4)
    # FC1: 2 x 14336/32 = 896 CTAs of 4 warps, short of 32 warps per SM: two K groups
    assert mc.gemv_warps_m(gemm_shapes("nvfp4", "silu", 4096, 14336)[0], mc.GEMV_TILES[0], 2.0) == 2
    assert mc.gemv_warps_m(gemm_shapes("nvfp4", "silu", 2048, 768)[1], mc.GEMV_TILES[1], 128.0) == 1  # many CTAs
    monkeypatch.setattr(mc, "GEMV_DECODE", False)  # the mma.sync decode tile's split
    shapes, cfg = _layer_heuristic(1, **MIXTRAL)  # 2 experts x 4096/64 = 128 CTAs unsplit: < 2 per SM
    g2 = cfg.gemm("fc2")
    assert cfg.fc2_splits == g2.splits > 1 and cfg.gemm("fc1").splits == 1
    assert not mc.layer_violations(shapes, cfg)
    assert mc.fc2_ctas(shapes[1], g2, 1.0, 2.0) * g2.splits >= mc.SPLIT_MIN_CTAS_PER_SM * mc.SM_COUNT
    assert shapes[1].K // (g2.bk * g2.splits) >= mc.SPLIT_MIN_K_TILES
    assert _layer_heuristic(4096, **QWEN3)[1].fc2_splits == 1  # large batch: never
    assert _layer_heuristic(1, **QWEN3)[1].fc2_splits == 2  # 8 experts x 2048/64 = 256 CTAs: just short
    assert _layer_heuristic(64, **MIXTRAL)[1].fc2_splits == 1  # every expert touched
    # expert parallelism: DeepSeek-V3 with 8 of 256 experts local sees one expert at T=1: 112 CTAs
    assert _layer_heuristic(1, 256, 8, 7168, 2048, local_experts=8)[1].fc2_splits == 4
    # no touched-expert count (the former call): no split
    assert mc.layer_heuristic(shapes, 1.0).fc2_splits == 1
    # 8 CTAs: as many splits as keep 2 k-tiles each (K=2048 with bk=256 has 8 k-tiles: 4, not 8)
    narrow = MoEGemmShape("fc2", "silu", 2048, 256, "fp32")
    assert mc.split_heuristic(narrow, MoEGemmConfig(16, 32, 256, 4, 1, 2), 1.0, 0.01) == 4
    assert mc.split_heuristic(narrow, MoEGemmConfig(16, 32, 64, 4, 1, 2), 1.0, 0.01) == 8


def test_valid_layer_configs_cross_the_split_fc2_configs_and_agree_with_violations():
    shapes = gemm_shapes("nvfp4", "silu", 4096, 14336)
    valid = mc.valid_layer_configs(shapes)
    # knobs added later come last, so older positional tuples keep their meaning: fc2_splits, then the MMAs
    assert list(mc.FAMILY_KNOB_CHOICES)[-3:] == ["fc2_splits", "fc1_mma", "fc2_mma"]
    assert "fc1_splits" not in mc.FAMILY_KNOB_CHOICES
    assert list(mc.FAMILY_KNOB_CHOICES) == list(MoEConfig().as_dict())  # tuples build MoEConfig positionally
    split_at = list(mc.FAMILY_KNOB_CHOICES).index("fc2_splits")
    splits = {v[split_at] for v in valid}
    assert splits == {1, 2, 4, 8}
    sync = [v for v in valid if v[-2:] == ("sync", "sync")]
    assert len([v for v in sync if v[split_at] == 1]) == 32115  # the mma.sync space before FC2 could split K
    assert len(sync) == 68007  # splits > 1 on decode tiles (bm 16, 32): about 2.1x
    gemv = [v for v in valid if "gemv" in v[-2:]]
    assert gemv and all(v[0] in mc.GEMV_BM and v[1] in mc.GEMV_STAGES for v in gemv)
    assert {v[0] for v in gemv} == {8, 16}
    # the decode GEMV alone takes 8-row m-tiles, so both GEMMs of such a layer config are GEMVs; at 16 rows it
    # crosses with the mma.sync decode tiles of the same stages
    assert all(v[-2:] == ("gemv", "gemv") for v in gemv if v[0] == 8)
    assert {v[-2:] for v in gemv if v[0] == 16} == {("gemv", "gemv"), ("gemv", "sync"), ("sync", "gemv")}
    # no wgmma off SM90: the mma.sync space and the GEMV's
    assert sorted(sync + gemv) == sorted(mc.valid_layer_configs(shapes, arch=100))
    wgmma = [v for v in valid if "wgmma" in v[-2:]]
    assert wgmma and all(v[0] in mc.WGMMA_BM and v[split_at] == 1 for v in wgmma)
    assert all(not mc.layer_violations(shapes, MoEConfig(*v)) for v in valid[::211])
    assert all(MoEConfig(*v).gemm("fc2").splits == v[split_at] and MoEConfig(*v).gemm("fc1").splits == 1
               for v in valid[::997])
    # complete: every valid FC2 config (split or not) appears with each FC1 config of its bm and stages
    fc1_bs = {(c.bm, c.stages) for c in mc.valid_gemm_configs(shapes[0])}
    fc2_keys = {(v[0], v[1], *v[6:split_at + 1], v[-1]) for v in valid}
    assert fc2_keys == {(c.bm, c.stages, c.bn, c.bk, c.warps_m, c.warps_n, c.splits, c.mma)
                        for c in mc.valid_gemm_configs(shapes[1]) if (c.bm, c.stages) in fc1_bs}


def test_family_knob_round_trip_and_old_entries_read_unsplit():
    from kernels.family import families

    fam = families()["moe"]
    cfg = MoEConfig.of(MoEGemmConfig(16, 32, 256, 4, 1, 2), MoEGemmConfig(16, 32, 256, 4, 1, 2, 4))
    assert cfg.fc2_splits == 4 and cfg.gemm("fc2") == MoEGemmConfig(16, 32, 256, 4, 1, 2, 4)
    row = {f"knob_{k}": v for k, v in cfg.as_dict().items()}
    assert "knob_fc2_splits" in row and fam.row_config(row) == cfg
    assert MoEConfig.from_dict(cfg.as_dict()) == cfg
    old = {k: v for k, v in cfg.as_dict().items() if k != "fc2_splits"}  # a LUT entry from before the knob
    assert MoEConfig(**old).fc2_splits == 1
    assert "k4" in cfg.short() and "k1" not in MoEConfig().short()


def test_splits_are_compile_time_and_in_the_cache_key():
    sh = gemm_shapes("w4a16", "silu", 4096, 14336)[1]
    keys = {fm.cache_key(sh, MoEGemmConfig(16, 32, 256, 4, 1, 2, s), "sm_90a") for s in (1, 2, 4, 8)}
    assert len(keys) == 4
    cases = fm.compile_check_cases([(4096, 14336, "silu")], configs=1)
    assert any(sh.layer == "fc2" and c.splits > 1 for sh, c in cases)  # compile-check covers a split tile
    with pytest.raises(ValueError, match="only FC2 splits K"):
        fm.compile_gemm(gemm_shapes("w4a16", "silu", 4096, 14336)[0], MoEGemmConfig(16, 32, 256, 4, 1, 2, 2),
                        "sm_90a")


@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a"])
@pytest.mark.parametrize("H, I, cfg", [
    (4096, 14336, MoEGemmConfig(16, 32, 256, 4, 1, 2, 2)),  # Mixtral's decode tile, 28 k-tiles per split
    (7168, 2048, MoEGemmConfig(32, 64, 64, 3, 2, 2, 8)),  # 4 k-tiles per split
    (2048, 768, MoEGemmConfig(16, 16, 64, 5, 1, 1, 4)),  # 3 k-tiles per split, fewer than the stages
])
def test_split_configs_compile(arch, H, I, cfg):  # noqa: E741
    sh = gemm_shapes("w4a16", "silu", H, I)[1]
    assert not violations(sh, cfg)
    assert fm.compile_gemm(sh, cfg, arch) is not None


@pytest.mark.parametrize("layer_kind, activation, out", [("fc1", "silu", "bf16"), ("fc1", "relu2", "fp32"),
                                                          ("fc2", "silu", "fp32")])
@pytest.mark.parametrize("rows", [1, 200])
def test_heuristic_configs_compile_for_sm90a(layer_kind, activation, out, rows):
    K, N = (2048, 768) if layer_kind == "fc1" else (768, 2048)
    sh = MoEGemmShape(layer_kind, activation, K, N, out)
    assert fm.compile_gemm(sh, heuristic(sh, rows), "sm_90a") is not None


@pytest.mark.parametrize("activation", ["silu", "relu2"])
@pytest.mark.parametrize("rows", [1, 200])
def test_w4a4_fc1_quantising_its_output_and_the_routing_launch_quantising_x_compile(activation, rows):
    sh = gemm_shapes("nvfp4", activation, 2048, 768)[0]
    assert sh.quant_out and sh.out_dtype == "bf16"
    assert fm.compile_gemm(sh, heuristic(sh, rows), "sm_90a") is not None
    with pytest.raises(ValueError, match="only FC1 quantises"):
        MoEGemmShape("fc2", activation, 768, 2048, "fp32", quant_out=True)
    p = mp.MoEProblem("fused_moe", 3, 8, 2, 2048, 768, "nvfp4", activation)
    spec = fm.route_spec(p, 64, 64)
    assert spec.quant_h == 2048 and fm.route_spec(replace(p, quant_mode="w4a16"), 64, 64).quant_h == 0
    assert fm.compile_route(spec, "sm_90a") is not None


def _bf16_value(bits: int) -> float:
    import struct

    return struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0]


def test_the_kernels_fp4_pairs_and_scales_are_exact():
    """A bit-level model of kernels/moe_kernel.fp4_pair, every backend's FP4 expansion (two shifts, two masks,
    an or, then one bf16x2 multiply by the block scale times 2^119) against the encoder's tables: every code pair at every
    pair position of a word, other nibbles set (they must not leak in), times every finite e4m3 scale, gives
    value * scale * 2^-7 exactly (the product of two bf16 values that are exact is exact when it is a normal
    bf16: at most 8 significant bits, exponent in range)."""
    from fractions import Fraction

    from kernels import moe_kernel as gk
    from kernels.encoders import decode_e2m1, decode_e4m3

    table = decode_e2m1(torch.arange(16, dtype=torch.uint8)).tolist()
    scales = [v for v in decode_e4m3(torch.arange(256, dtype=torch.uint8)).tolist() if math.isfinite(v)]

    def exact_bf16(x: Fraction) -> bool:
        if x == 0:
            return True
        m, e = abs(x), 0
        while m >= 2:
            m, e = m / 2, e + 1
        while m < 1:
            m, e = m * 2, e - 1
        return -126 <= e <= 127 and (m * 128).denominator == 1

    for scale in scales:  # the scale word: scale * 2^119, exactly a bf16 (4 significant bits), finite
        assert exact_bf16(Fraction(scale) * 2**gk.SCALE_SHIFT)
    for j in range(4):
        ptx = gk.fp4_pair_ptx(j)
        d_m, d_s = 6 - 4 * j, 12 - 4 * j
        for st in ([f"shl.b32 m, {{$r0}}, {d_m}" if d_m > 0 else f"shr.b32 m, {{$r0}}, {-d_m}"]
                   + [f"shl.b32 s, {{$r0}}, {d_s}" if d_s > 0 else "mov.b32 s, {$r0}"]
                   + ["and.b32 s, s, 0x80008000", "and.b32 m, m, 0x01C001C0", "or.b32 m, m, s",
                      "mul.rn.bf16x2 {$w0}, m, {$r1}"]):
            assert st in ptx, (j, st)
        for lo in range(16):
            for hi in range(16):
                w = (0x5A5A5A5A & ~((0xF << 4 * j) | (0xF << (16 + 4 * j)))) | lo << 4 * j | hi << (16 + 4 * j)
                m = ((w << d_m) if d_m > 0 else (w >> -d_m)) & 0x01C001C0
                sg = ((w << d_s) if d_s > 0 else w) & 0x80008000
                bits = (m | sg) & 0xFFFFFFFF
                for half, code in ((bits & 0xFFFF, lo), (bits >> 16, hi)):
                    assert _bf16_value(half) * 2.0**126 == table[code], (j, lo, hi)
                    for scale in scales[::7] + [scales[-1]]:
                        prod = Fraction(_bf16_value(half)) * Fraction(scale) * 2**gk.SCALE_SHIFT
                        assert exact_bf16(prod) and prod == Fraction(table[code]) * Fraction(scale) / 2**7
    assert gk.UNDO_SHIFT == 2.0**7
    # the tile kernels' prmt back to k order (bf16_halves): word k of the tile row holds codes 2k, 2k + 1
    sels = (0x5410, 0x7632)  # bf16_halves' selectors: low halves, high halves
    assert "0x7632 if high else 0x5410" in inspect.getsource(gk.bf16_halves)

    def prmt(a, b, sel):
        bs = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
        return sum(bs[(sel >> 4 * i) & 7] << 8 * i for i in range(4))

    w = 0x8A3F61C5  # codes 5, C, 1, 6, F, 3, A, 8 (low nibble first)
    pairs = []
    for j in range(4):
        d_m, d_s = 6 - 4 * j, 12 - 4 * j
        m = ((w << d_m) if d_m > 0 else (w >> -d_m)) & 0x01C001C0
        pairs.append((m | (((w << d_s) if d_s > 0 else w) & 0x80008000)) & 0xFFFFFFFF)
    for k in range(4):
        word = prmt(pairs[2 * (k % 2)], pairs[2 * (k % 2) + 1], sels[k >= 2])
        for half, code in ((word & 0xFFFF, (w >> 8 * k) & 0xF), (word >> 16, (w >> (8 * k + 4)) & 0xF)):
            assert _bf16_value(half) * 2.0**126 == table[code], k


def test_torch_compile_traces_one_custom_op():
    """Dynamo (fake CUDA tensors: no GPU needed) turns a fused_moe call into torch.ops.lutforge.fused_moe on a
    freshly allocated output, with no graph break."""
    import torch._dynamo
    from torch._subclasses.fake_tensor import FakeTensorMode

    E_, k, H_, I_, T_ = 8, 2, 128, 64, 4
    with FakeTensorMode():
        def t(*shape, dtype=torch.float32):
            return torch.empty(*shape, dtype=dtype, device="cuda")
        args = (t(T_, H_, dtype=torch.bfloat16), t(E_, 2 * I_, H_ // 2, dtype=torch.uint8),
                t(E_, 2 * I_, H_ // 16, dtype=torch.float8_e4m3fn), t(E_, H_, I_ // 2, dtype=torch.uint8),
                t(E_, H_, I_ // 16, dtype=torch.float8_e4m3fn), t(T_, k, dtype=torch.int32), t(T_, k), t(E_), t(E_))

    def f(x, w1, w1sf, w2, w2sf, ids, sc, a1, a2):
        return fm.fused_moe(x, w1, w1sf, w2, w2sf, ids, sc, E_, k, w1_alpha=a1, w2_alpha=a2, quant_mode="w4a16")

    gm, _ = torch._dynamo.export(f)(*args)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls if "lutforge" in str(n.target)] == [torch.ops.lutforge.fused_moe]
    assert str(torch.ops.lutforge.fused_moe.default._schema).count("Tensor(a") >= 1  # output is mutated


# --------------------------------------------------------------------------- the wgmma backend (SM90)
W = dict(mma="wgmma")


def _wgmma_shapes():
    """Every layer and mode the backend serves, on K/N sizes of Qwen3-30B-A3B: gated FC1 (W4A16, and W4A4
    quantising its input and output), ReLU2 FC1 (both modes), FC2 (fp32 rows scaled and scattered)."""
    return {"fc1 silu w4a16": gemm_shapes("w4a16", "silu", 2048, 768)[0],
            "fc1 silu nvfp4": gemm_shapes("nvfp4", "silu", 2048, 768)[0],
            "fc1 relu2 w4a16": gemm_shapes("w4a16", "relu2", 2048, 768)[0],
            "fc1 relu2 nvfp4": gemm_shapes("nvfp4", "relu2", 2048, 768)[0],
            "fc2 silu": gemm_shapes("w4a16", "silu", 2048, 768)[1],
            "fc2 relu2": gemm_shapes("w4a16", "relu2", 2048, 768)[1]}


# two warpgroups along M (the large-batch tile: gated FC1's gate and up accumulators at bn 128, FC2 at 256);
# two of 128 rows each (bm 256: two 64-row instructions a warpgroup);
# one warpgroup of 64 rows with bk 128 (two swizzle atoms along K); two warpgroups side by side along N
WGMMA_TILES = {"128 rows": lambda sh: MoEGemmConfig(128, 128 if sh.gated else 256, 64, 4, 4, 2, **W),
               "256 rows": lambda sh: MoEGemmConfig(256, 64 if sh.gated else 128, 64, 4, 4, 2, **W),
               "64 rows bk128": lambda sh: MoEGemmConfig(64, 64, 128, 3, 4, 1, **W),
               "64 rows 2 wg along N": lambda sh: MoEGemmConfig(64, 128, 64, 5, 4, 2, **W)}


@pytest.mark.parametrize("tile", list(WGMMA_TILES))
@pytest.mark.parametrize("mode", list(_wgmma_shapes()))
def test_wgmma_backend_compiles_every_layer_and_mode_for_sm90a(mode, tile):
    from kernels.compile_cache import resource_usage
    from kernels.moe_wgmma_kernel import MoEWgmmaKernel

    sh = _wgmma_shapes()[mode]
    cfg = WGMMA_TILES[tile](sh)
    assert not violations(sh, cfg), violations(sh, cfg)
    assert fm.gemm_kernel_class(cfg) is MoEWgmmaKernel
    assert fm.gemm_kernel_class(replace_mma(cfg, "sync")) is not MoEWgmmaKernel
    regs, _ = resource_usage(fm.compile_gemm(sh, cfg, "sm_90a"))
    assert regs is not None and regs <= 255


def replace_mma(cfg, mma):
    from dataclasses import replace

    return replace(cfg, mma=mma)


def test_wgmma_constraints_say_what_is_wrong():
    fc1, fc2 = gemm_shapes("w4a16", "silu", 2048, 768)

    def why(sh, cfg, arch=90):
        return "; ".join(violations(sh, cfg, arch))

    assert not why(fc2, MoEGemmConfig(128, 256, 64, 4, 4, 2, **W))
    assert "sm_90a only" in why(fc2, MoEGemmConfig(128, 256, 64, 4, 4, 2, **W), arch=100)
    assert "tiles bm in (64, 128, 256)" in why(fc2, MoEGemmConfig(32, 64, 64, 4, 4, 1, **W))
    assert "warps_m=4" in why(fc2, MoEGemmConfig(64, 64, 64, 4, 2, 2, **W))
    assert not why(fc2, MoEGemmConfig(128, 64, 64, 4, 4, 1, **W))  # one warpgroup of 128 rows: two instructions
    assert MoEGemmConfig(128, 64, 64, 4, 4, 1, **W).warpgroups == (1, 1)
    assert MoEGemmConfig(256, 128, 64, 4, 4, 2, **W).warpgroups == (2, 1)
    assert MoEGemmConfig(64, 128, 64, 4, 4, 2, **W).warpgroups == (1, 2)
    assert "not a wgmma width" in why(fc2, MoEGemmConfig(64, 16, 64, 4, 4, 4, **W))  # 4 columns per warpgroup
    assert "stages >= 3" in why(fc2, MoEGemmConfig(128, 256, 64, 2, 4, 2, **W))
    assert "does not split K" in why(fc2, MoEGemmConfig(64, 64, 64, 4, 4, 1, 2, **W))
    assert "accumulators per thread" in why(fc1, MoEGemmConfig(128, 256, 64, 4, 4, 2, **W))  # gate + up: 256
    assert "shared memory" in why(fc2, MoEGemmConfig(128, 256, 256, 5, 4, 2, **W))
    oss_fc1 = gemm_shapes("w4a16", "silu", 2880, 2880)[0]
    assert "N=2880 must be a multiple of bn=128" in why(oss_fc1, MoEGemmConfig(128, 128, 64, 4, 4, 2, **W))
    assert "mma='tensor' not in" in why(fc2, MoEGemmConfig(mma="tensor"))
    # the widths wgmma adds stay out of the mma.sync space swept so far
    assert "wgmma tile width" in why(fc2, MoEGemmConfig(64, 256, 64, 3, 2, 2))
    with pytest.raises(ValueError, match="sm_90a only"):
        fm.compile_gemm(fc2, MoEGemmConfig(128, 256, 64, 4, 4, 2, **W), "sm_100a")


def test_wgmma_shared_memory_is_the_kernels_arena():
    sh = gemm_shapes("w4a16", "silu", 4096, 14336)[0]
    cfg = MoEGemmConfig(128, 128, 64, 4, 4, 2, **W)
    off, total = mc.wgmma_smem_layout(sh, cfg)
    nb = 2 * cfg.bn
    assert off == {"a": 0, "b": 4 * 128 * 64 * 2, "w": 4 * 128 * 64 * 2 + 2 * nb * 64 * 2,
                   "sf": 4 * 128 * 64 * 2 + 2 * nb * 64 * 2 + 4 * nb * 32, "c": 0}
    assert total == off["sf"] + 4 * nb * 4 == smem_bytes(sh, cfg) == 167936  # 164 KB: one CTA per SM
    assert total >= cfg.bm * (cfg.bn + 8) * 4  # the fp32 staging tile fits over the operands
    assert all(v % 1024 == 0 for v in off.values())  # the 128-byte swizzle's 1024-byte atom


def test_wgmma_takes_large_batches_on_sm90_only(monkeypatch):
    assert mc.WGMMA_LARGE_BATCH is True  # switched on by the measurement moe_config.py cites
    for H, I, act in ((4096, 14336, "silu"), (2048, 768, "silu"), (2880, 2880, "silu"), (2688, 1856, "relu2"),
                      (7168, 2048, "silu")):
        for q in ("w4a16", "nvfp4"):
            sh2 = gemm_shapes(q, act, H, I)
            big = mc.layer_heuristic(sh2, 200, 8.0)
            assert (big.fc1_mma, big.fc2_mma) == ("wgmma", "wgmma") and not mc.layer_violations(sh2, big)
            assert big.bm == 128 and big.gemm("fc2").bn >= 192  # the wide FC2 tile (2880 = 15 x 192, 2688 = 14 x 192)
            huge = mc.layer_heuristic(sh2, mc.WGMMA_256_ROWS, 8.0)  # enough rows an expert for 256-row tiles
            assert (huge.bm, huge.fc1_mma, huge.fc2_mma) == (256, "wgmma", "wgmma")
            assert not mc.layer_violations(sh2, huge) and huge.gemm("fc2").bn in (96, 128)
            mid = mc.layer_heuristic(sh2, 40, 8.0)  # mid batches too, past WGMMA_MIN_ROWS rows an expert
            assert (mid.bm, mid.fc1_mma, mid.fc2_mma) == (128, "wgmma", "wgmma")
            assert mc.layer_heuristic(sh2, mc.WGMMA_MIN_ROWS + 0.5, 8.0).fc1_mma == "wgmma"
            assert mc.layer_heuristic(sh2, mc.WGMMA_MIN_ROWS, 8.0).fc1_mma == "gemv"
            assert mc.layer_heuristic(sh2, 40, 8.0, arch=100).fc1_mma == "sync"
            off_sm90 = mc.layer_heuristic(sh2, 1000, 8.0, arch=100)
            assert (off_sm90.fc1_mma, off_sm90.fc2_mma) == ("sync", "sync") and \
                not mc.layer_violations(sh2, off_sm90, arch=100)
    monkeypatch.setattr(mc, "WGMMA_LARGE_BATCH", False)
    shapes = gemm_shapes("nvfp4", "silu", 4096, 14336)
    for rows in (40, 1000, 4096):
        assert all(heuristic(sh, rows).mma == "sync" for sh in shapes)
        assert mc.layer_heuristic(shapes, rows, 8.0) == mc.layer_heuristic(shapes, rows, 8.0, arch=100)


GEMV = dict(stages=2, bk=64, mma="gemv")


@pytest.mark.parametrize("arch", ["sm_90a", "sm_100a"])
@pytest.mark.parametrize("tile", ["8 rows", "16 rows, two mma groups, 2 K groups, FC2 split"])
@pytest.mark.parametrize("mode", list(_wgmma_shapes()))
def test_gemv_backend_compiles_every_layer_and_mode(mode, tile, arch):
    """The decode GEMV compiles for every layer and mode (one source for SM90 and SM100), within the
    registers of its constraints, and is the kernel class of mma="gemv"."""
    from kernels.compile_cache import resource_usage
    from kernels.moe_gemv_kernel import MoEGemvKernel

    sh = _wgmma_shapes()[mode]
    if tile == "8 rows":
        cfg = MoEGemmConfig(8, 32 if sh.gated else 64, warps_m=1, warps_n=4, **GEMV)
    else:
        cfg = MoEGemmConfig(16, 64 if sh.gated else 128, warps_m=2, warps_n=4,
                            splits=2 if sh.layer == "fc2" else 1, **GEMV)
    assert not violations(sh, cfg, int(arch[3:5])), violations(sh, cfg)
    assert fm.gemm_kernel_class(cfg) is MoEGemvKernel
    regs, _ = resource_usage(fm.compile_gemm(sh, cfg, arch))
    assert regs is not None and regs <= 224  # 56-152 on these (W4A4's activation quantisation the most)


@pytest.mark.parametrize("early", ["regs", "l2", "off"])
def test_fc2_early_loads_compile_and_are_in_the_cache_key(early):
    """moe_config.FC2_EARLY (the A/B switch of FC2's loads before its PDL wait, set for a block by
    fused_moe.kernel_variant) compiles the decode GEMV's FC2 in each mode, split and unsplit, within the
    registers of its constraints; FC1 never moves its wait (its predecessor writes the tables it reads); the
    mode is part of the kernels' cache key."""
    from kernels.compile_cache import resource_usage
    from kernels.moe_gemv_kernel import MoEGemvKernel
    from kernels.moe_kernel import MoEGemmSpec

    fc1, fc2 = gemm_shapes("w4a16", "silu", 2048, 768)
    cfg = MoEGemmConfig(8, 64, warps_m=1, warps_n=4, **GEMV)
    with fm.kernel_variant("off"):
        off = fm.cache_key(fc2, cfg, "sm_90a")
    default = fm.FC2_EARLY
    with fm.kernel_variant(early):
        for c in (MoEGemmConfig(8, 64, warps_m=4, warps_n=4, splits=2, **GEMV),
                  MoEGemmConfig(16, 128, warps_m=2, warps_n=4, **GEMV)):
            regs, _ = resource_usage(fm.compile_gemm(fc2, c, "sm_90a"))
            assert regs is not None and regs <= 224
        assert MoEGemvKernel(MoEGemmSpec(fc2, cfg, 90)).early == (early if mc.PDL else "off")
        assert MoEGemvKernel(MoEGemmSpec(fc1, MoEGemmConfig(8, 32, warps_m=1, warps_n=4, **GEMV), 90)).early == "off"
        assert (fm.cache_key(fc2, cfg, "sm_90a") == off) == (early == "off")
    assert fm.FC2_EARLY == default
    with pytest.raises(ValueError, match="regs, l2 or off"):
        with fm.kernel_variant("early"):
            pass


@pytest.mark.parametrize("early", ["regs", "off"])
def test_folded_combine_and_fc1_routed_from_ids_compile_into_the_decode_gemv_alone(early):
    """The combine folded into FC2 (moe_config.FOLD_COMBINE): the decode GEMV's FC2 compiles with it, split and
    unsplit, in both early-load modes, within its registers, under a cache key of its own; the routing kernel
    that zeroes the counters compiles; layer_spec folds only where FC2 is the GEMV; the constraints refuse the
    fold on the other backends and on FC1. Likewise FC1 routing its tiles from the ids (FC1_EARLY), W4A16 and
    W4A4."""
    from dataclasses import replace

    from kernels.compile_cache import resource_usage
    from kernels.moe_gemv_kernel import MoEGemvKernel
    from kernels.moe_kernel import MoEGemmSpec

    fc1, fc2 = gemm_shapes("w4a16", "silu", 2048, 768)
    folded = replace(fc2, combine_top_k=8)
    p = mp.MoEProblem("fused_moe", 1, 128, 8, 2048, 768, "w4a16", "silu", "uniform", 0)
    with fm.kernel_variant(early):
        for c in (MoEGemmConfig(8, 64, warps_m=4, warps_n=4, splits=2, **GEMV),
                  MoEGemmConfig(16, 128, warps_m=2, warps_n=4, **GEMV)):
            assert not violations(folded, c)
            assert fm.cache_key(folded, c, "sm_90a") != fm.cache_key(fc2, c, "sm_90a")
            regs, _ = resource_usage(fm.compile_gemm(folded, c, "sm_90a"))
            assert regs is not None and regs <= 224
            assert MoEGemvKernel(MoEGemmSpec(folded, c, 90)).fold == 8
            ls = fm.layer_spec(p, MoEGemmConfig(c.bm, 32, warps_m=1, warps_n=4, **GEMV), c, fold=True)
            assert ls.combine is None and ls.fc2 == folded and ls.route.counters == 2048 // c.bn
    assert fm.compile_route(ls.route, "sm_90a") is not None
    sync = MoEGemmConfig(16, 64, 128, 3, 1, 4)
    assert fm.layer_spec(p, sync, sync, fold=True).combine is not None  # not the GEMV: a combine launch
    assert any("folds only into the decode GEMV" in v for v in violations(folded, sync))
    assert any("folds only into the decode GEMV" in v
               for v in violations(folded, MoEGemmConfig(128, 128, 64, 4, 4, 2, mma="wgmma")))
    with pytest.raises(ValueError, match="only FC2 takes the combine"):
        replace(fc1, combine_top_k=8)

    for quant_mode in ("w4a16", "nvfp4"):
        g1 = replace(gemm_shapes(quant_mode, "silu", 2048, 768)[0], early_ids=True)
        c = MoEGemmConfig(8, 32, warps_m=4, warps_n=4, **GEMV)
        assert not violations(g1, c) and fm.cache_key(g1, c, "sm_90a") != fm.cache_key(replace(g1, early_ids=False),
                                                                                        c, "sm_90a")
        regs, _ = resource_usage(fm.compile_gemm(g1, c, "sm_90a"))
        assert regs is not None and regs <= 224
    assert fm.layer_spec(p, c, c, fc1_early=True).fc1.early_ids
    assert not fm.layer_spec(p, sync, c, fc1_early=True).fc1.early_ids  # not the GEMV: it waits for the tables
    assert any("routes from the expert ids" in v for v in violations(g1, sync))
    with pytest.raises(ValueError, match="only FC1 routes"):
        replace(fc2, early_ids=True)


def test_gemv_constraints_say_what_is_wrong():
    fc1, fc2 = gemm_shapes("w4a16", "silu", 2048, 768)

    def why(sh, cfg):
        return "; ".join(violations(sh, cfg))

    assert not why(fc1, MoEGemmConfig(8, 32, warps_m=1, warps_n=4, **GEMV))
    assert not why(fc2, MoEGemmConfig(16, 64, warps_m=4, warps_n=4, splits=8, **GEMV))  # K=768 = 8 x 3 chunks
    assert "bm in (8, 16)" in why(fc2, MoEGemmConfig(4, 64, warps_m=1, warps_n=4, **GEMV))
    assert "bm in (8, 16)" in why(fc2, MoEGemmConfig(32, 64, warps_m=1, warps_n=4, **GEMV))
    assert "no k-tile pipeline" in why(fc2, MoEGemmConfig(8, 64, 128, 3, 1, 4, mma="gemv"))
    assert not why(fc2, MoEGemmConfig(8, 64, 64, 3, 1, 4, mma="gemv"))  # two chunk rounds loaded together
    assert not why(fc2, MoEGemmConfig(8, 64, 64, 5, 1, 4, mma="gemv"))  # four rounds loaded together
    assert "stages=6 not in" in why(fc2, MoEGemmConfig(8, 64, 64, 6, 1, 4, mma="gemv"))
    # a warp's weight rows fill whole 16-row mma groups, at most two
    assert "8 weight rows" in why(fc2, MoEGemmConfig(8, 32, warps_m=1, warps_n=4, **GEMV))
    assert "8 weight rows (bn / warps_n columns, doubled" in why(fc1, MoEGemmConfig(8, 16, warps_m=1, warps_n=4, **GEMV))
    assert "64 weight rows" in why(fc1, MoEGemmConfig(8, 32, warps_m=1, warps_n=1, **GEMV))
    assert not why(fc1, MoEGemmConfig(8, 32, warps_m=1, warps_n=2, **GEMV))  # 16 columns: 32 gate and up rows
    assert "multiple of 32*splits=256" in why(gemm_shapes("w4a16", "silu", 2048, 1856)[1],
                                              MoEGemmConfig(8, 64, warps_m=1, warps_n=4, splits=8, **GEMV))
    assert "only FC2 splits K" in why(fc1, MoEGemmConfig(8, 32, warps_m=1, warps_n=4, splits=2, **GEMV))
    # the tensor-core tile kernels refuse the GEMV's 8-row m-tiles
    assert "multiple of 16*warps_m" in why(fc2, MoEGemmConfig(8, 32, 64, 3, 1, 2))
    assert "tiles bm in" in why(fc2, MoEGemmConfig(8, 64, 64, 4, 4, 1, mma="wgmma"))


def test_gemv_takes_decode_up_to_gemv_rows(monkeypatch):
    assert mc.GEMV_DECODE is True  # switched on by the measurement moe_config.py cites
    for H, I, act in ((4096, 14336, "silu"), (2048, 768, "silu"), (2880, 2880, "silu"), (2688, 1856, "relu2"),
                      (7168, 2048, "silu")):
        for q in ("w4a16", "nvfp4"):
            sh2 = gemm_shapes(q, act, H, I)
            # one source serves both archs; one m-tile an expert: 8 rows, then 16 (an expectation of 16 + 2e-7
            # rows, Mixtral-8x7B's at T=64, is 16)
            for arch, rows in itertools.product((90, 100), (1.0, 1.46, 4.0, 8.0, 8.5, 12.0, 16.0, 16 + 2e-7)):
                cfg = mc.layer_heuristic(sh2, rows, 8.0, arch=arch)
                assert (cfg.fc1_mma, cfg.fc2_mma, cfg.bm) == ("gemv", "gemv", 8 if rows <= 8 else 16), (H, cfg.short())
                assert cfg.gemm("fc1").bn == (32 if act == "silu" else 64) and cfg.gemm("fc2").bn == 64
                assert not mc.layer_violations(sh2, cfg, arch=arch)
            # past GEMV_ROWS: the wgmma tiles on SM90, the mma.sync mid tiles elsewhere
            assert mc.layer_heuristic(sh2, mc.GEMV_ROWS + 0.5, 8.0).fc1_mma == "wgmma"
            assert mc.layer_heuristic(sh2, mc.GEMV_ROWS + 0.5, 8.0, arch=100).fc1_mma == "sync"
    monkeypatch.setattr(mc, "GEMV_DECODE", False)
    shapes = gemm_shapes("nvfp4", "silu", 4096, 14336)
    assert all(heuristic(sh, rows).mma == "sync" for sh in shapes for rows in (0.5, 1, 4))


def test_compile_check_covers_wgmma_on_sm90_only():
    layers = [(2048, 768, "silu"), (2880, 2880, "silu"), (2688, 1856, "relu2")]
    on90 = fm.compile_check_cases(layers, configs=1, arch="sm_90a")
    wg = [(sh, c) for sh, c in on90 if c.mma == "wgmma"]
    assert {(sh.layer, sh.activation, sh.quant_out) for sh, _ in wg} == {
        ("fc1", "silu", False), ("fc1", "silu", True), ("fc2", "silu", False), ("fc1", "relu2", False),
        ("fc2", "relu2", False)}  # a wgmma tile for every GEMM of every layer
    assert all(not violations(sh, c, 90) for sh, c in on90)
    shapes = {(sh.layer, sh.activation, sh.quant_out) for sh, _ in on90}
    for arch in ("sm_90a", "sm_100a", None):  # no target named: only what every target compiles
        cases = on90 if arch == "sm_90a" else fm.compile_check_cases(layers, configs=1, arch=arch)
        # the decode GEMV (mma.sync, which SM100 keeps) compiles for every target, for every GEMM of every layer
        assert {(sh.layer, sh.activation, sh.quant_out) for sh, c in cases if c.mma == "gemv"} == shapes
        if arch != "sm_90a":
            assert cases and all(c.mma != "wgmma" and not violations(sh, c, 100) for sh, c in cases)


def test_mma_is_compile_time_and_in_the_cache_key():
    sh = gemm_shapes("w4a16", "silu", 2048, 768)[1]
    keys = {fm.cache_key(sh, MoEGemmConfig(128, 128, 64, 4, 4, 2, mma=m), "sm_90a") for m in ("sync", "wgmma")}
    assert len(keys) == 2
    assert "wgmma" in MoEGemmConfig(128, 128, 64, 4, 4, 2, **W).short() and "sync" not in MoEGemmConfig().short()


def test_mma_knobs_come_last_and_older_rows_and_entries_read_sync():
    """fc1_mma/fc2_mma came after fc2_splits: a result row or LUT entry written before them (no such columns
    or keys, or nulls read back from Parquet) means mma.sync, the kernels' only MMA then."""
    from kernels.family import families
    from lut_export.validate import _config

    fam = families()["moe"]
    assert fam.added_knobs == {"fc1_mma": "sync", "fc2_mma": "sync"} == mc.ADDED_KNOBS
    assert all(getattr(MoEConfig(), k) == v for k, v in fam.added_knobs.items())  # dataclass defaults agree
    cfg = MoEConfig.of(MoEGemmConfig(128, 128, 64, 4, 4, 2, **W), MoEGemmConfig(128, 64, 64, 4, 4, 2))
    assert (cfg.fc1_mma, cfg.fc2_mma) == ("wgmma", "sync") and cfg.gemm("fc1").mma == "wgmma"
    row = {f"knob_{k}": v for k, v in cfg.as_dict().items()}
    assert fam.row_config(row) == cfg
    old = {k: v for k, v in row.items() if k not in ("knob_fc1_mma", "knob_fc2_mma")}
    got = fam.row_config(old)
    assert (got.fc1_mma, got.fc2_mma) == ("sync", "sync") and got.gemm("fc2") == cfg.gemm("fc2")
    assert fam.row_config({**old, "knob_fc1_mma": float("nan"), "knob_fc2_mma": None}) == got
    with pytest.raises(KeyError):  # knobs that were always there are still required
        fam.row_config({k: v for k, v in old.items() if k != "knob_fc2_bk"})
    entry = {k: v for k, v in cfg.as_dict().items() if not k.endswith("_mma")}  # a LUT entry from before
    assert MoEConfig.from_dict(entry) == got
    assert _config(fam, entry) == (got, [])
    assert any("missing knob 'fc2_bk'" in e for e in _config(fam, {k: v for k, v in entry.items() if k != "fc2_bk"})[1])
    assert "fc1_mma" not in families()["row"].added_knobs



def test_eager_workspace_arena_is_per_stream_grows_and_is_never_used_by_captures_or_large_calls(monkeypatch):
    monkeypatch.setattr(fm, "_ARENAS", {})
    monkeypatch.setattr(fm, "_capturing", lambda: False)
    dev = torch.device("cpu")
    a = fm._workspace(1000, dev, stream=7)
    assert fm._workspace(4000, dev, stream=7) is a  # a 1 MiB arena serves both
    assert fm._workspace(1000, dev, stream=8) is not a  # another stream: its own arena
    big = fm._workspace(3 << 20, dev, stream=7)
    assert big.numel() == 3 << 20 and fm._workspace(1000, dev, stream=7) is big  # grown, then reused
    huge = fm._workspace(fm.ARENA_MAX_BYTES + 1, dev, stream=7)
    assert huge is not big and fm._workspace(1000, dev, stream=7) is big  # too large: allocated per call
    monkeypatch.setattr(fm, "_capturing", lambda: True)
    assert fm._workspace(1000, dev, stream=7) is not big  # a capture allocates from the graph's pool


def _former_arguments(launch, base, bad, x, w1, w1sf, w2, w2sf, ids, sc, a1, a2, gs, out, offset, num_experts, st):
    """The four kernels' arguments as the call passed them before one host function launched all four (the
    separate functions' __call__ signatures), from the bound launch's layer spec and fixed values."""
    eo, to1, to2, a_rows, out_rows, row_scale, valid, _, inter, y, _, xq = [base + o for o in launch.offsets]
    T, P, El, nq, g1, g2, gc, s1, s1f, s2, s2f = launch.fixed
    quant = (x.data_ptr(), xq) if nq else (None, None)
    route = (ids.data_ptr(), sc.data_ptr(), eo, to1, to2, a_rows, out_rows, row_scale, valid, bad, P, offset,
             num_experts, *quant, nq, st)
    fc1 = (xq if nq else x.data_ptr(), a_rows, w1.data_ptr(), w1sf.data_ptr(), a1.data_ptr(), None, None, inter, eo,
           to1, T, P, El, g1, s1, s1f, P, None if gs is None else gs.data_ptr(), st)
    fc2 = (inter, None, w2.data_ptr(), w2sf.data_ptr(), a2.data_ptr(), row_scale, out_rows, y, eo, to2, P, P, El, g2,
           s2, s2f, launch.spec.cfg2.splits * P, None, st)
    return route, fc1, fc2, (y, valid, out.data_ptr(), T, P, gc, st)


def _arity(cls) -> tuple[int, int]:
    """(required, all) parameters of a kernel class's __call__ (self excluded)."""
    params = list(inspect.signature(cls.__call__).parameters.values())[1:]
    return sum(q.default is inspect.Parameter.empty for q in params), len(params)


@pytest.mark.parametrize("quant_mode, ids_dtype, scale_dtype, T, splits, fold, fc1_early", [
    ("w4a16", torch.int32, torch.float32, 1, 2, False, False),
    ("nvfp4", torch.int64, torch.bfloat16, 5, 1, False, False),
    ("w4a16", torch.int32, torch.float32, 3, 2, True, False),
    ("nvfp4", torch.int64, torch.bfloat16, 2, 1, True, True)])
def test_one_host_function_launches_the_four_kernels_with_their_former_arguments(quant_mode, ids_dtype, scale_dtype,
                                                                                  T, splits, fold, fc1_early,
                                                                                  monkeypatch):
    """A call's four kernels behind one TVM-FFI function (kernels/moe_layer_kernel.py): it compiles for sm_90a
    (W4A16 and W4A4, both id and weight dtypes, FC2 split and unsplit) into one object holding the four
    kernels; its parameters are moe_layer_kernel.ARGUMENTS, which _Launch.arguments fills; split back into the
    separate kernels' arguments they are exactly what the call passed those before, and each kernel's tuple
    has its __call__'s arity. With the combine folded into FC2 (moe_config.FOLD_COMBINE) the object holds
    three kernels, the routing kernel also gets the counters, FC2 also valid, the output and the counters
    (its optional parameters), and no combine is launched. With FC1 routing from the ids (FC1_EARLY) FC1 also
    gets the ids, their 32-bit words per id, the offset and num_experts."""
    from kernels.compile_cache import cache_dir
    from kernels.moe_combine_kernel import MoECombineKernel
    from kernels.moe_layer_kernel import ARGUMENTS, MoELayerKernel
    from kernels.moe_route_kernel import MoERouteKernel

    E, k, H, I = 8, 2, 256, 128  # noqa: E741
    shapes = gemm_shapes(quant_mode, "silu", H, I)
    cfg1 = MoEGemmConfig(8, 32, warps_m=1, warps_n=4, **GEMV)
    cfg2 = MoEGemmConfig(8, 64, warps_m=1, warps_n=4, splits=splits, **GEMV)
    assert not violations(shapes[0], cfg1) and not violations(shapes[1], cfg2)
    p = mp.MoEProblem("fused_moe", T, E, k, H, I, quant_mode, "silu", "uniform", 0)
    plan = fm._Plan(p, *shapes, "sm_90a", torch.device("cuda", 0), "int32" if ids_dtype == torch.int32 else "int64",
                    "fp32" if scale_dtype == torch.float32 else "bf16", (1 << 20, 1 << 16, 1 << 20, 1 << 16))
    monkeypatch.setattr(fm, "FOLD_COMBINE", fold)
    monkeypatch.setattr(fm, "FC1_EARLY", fc1_early)
    monkeypatch.setattr(fm, "LAYER_CALL", False)
    assert fm._Launch(plan, cfg1, cfg2).layer is None  # off: the four functions, loaded on first use
    monkeypatch.setattr(fm, "LAYER_CALL", True)
    launch = fm._Launch(plan, cfg1, cfg2)  # compiles (or loads) the layer function; no GPU needed
    assert type(launch.layer).__name__ == "Function"
    key = fm.layer_function_key(launch.spec, "sm_90a")
    both, shipped = MoEConfig.of(cfg1, cfg2), fm.layer_function_key(fm.layer_spec(p, cfg1, cfg2), "sm_90a")
    assert fm.layer_cache_key(p, both, "sm_90a").split("+")[0] == shipped  # precompiled (AOT) with the four
    monkeypatch.setattr(fm, "LAYER_CALL", False)
    assert shipped not in fm.layer_cache_key(p, both, "sm_90a").split("+")
    monkeypatch.setattr(fm, "LAYER_CALL", True)
    objects = cache_dir() / f"{key}.o"
    assert objects.exists() and objects.read_bytes().count(b".text.kernel_cutlass_kernel_kernels") >= 4 - fold
    assert (launch.spec.combine is None) == fold and launch.spec.fc2.combine_top_k == (k if fold else 0)
    assert launch.spec.route.counters == (H // cfg2.bn if fold else 0)
    assert launch.spec.fc1.early_ids == fc1_early

    params = list(inspect.signature(MoELayerKernel.__call__).parameters)[1:]
    assert [n.removesuffix("_ptr") for n in params] == list(ARGUMENTS)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, H, generator=g).bfloat16()
    w1, w1sf = torch.zeros(E, 2 * I, H // 2, dtype=torch.uint8), torch.zeros(E, 2 * I, H // 16, dtype=torch.uint8)
    w2, w2sf = torch.zeros(E, H, I // 2, dtype=torch.uint8), torch.zeros(E, H, I // 16, dtype=torch.uint8)
    ids, sc = torch.zeros(T, k, dtype=ids_dtype), torch.zeros(T, k, dtype=scale_dtype)
    a1, a2, out = torch.ones(E), torch.ones(E), torch.empty(T, H, dtype=torch.bfloat16)
    gs = torch.ones(1) if quant_mode == "nvfp4" else None
    call = (1 << 32, (1 << 32) + 96, x, w1, w1sf, w2, w2sf, ids, sc, a1, a2, gs, out, 3, 11, 77)
    args = launch.arguments(*call)
    assert len(args) == len(ARGUMENTS)
    route, fc1, fc2, comb = launch.split_arguments(*call)
    f_route, f_fc1, f_fc2, f_comb = _former_arguments(launch, *call)
    counters = call[0] + launch.off["counters"]
    if fc1_early:
        f_fc1 = (*f_fc1, None, None, None, ids.data_ptr(), 1 if ids_dtype == torch.int32 else 2, 3, 11)
    if fold:
        assert (route, fc1, fc2, comb) == ((*f_route, counters), f_fc1, (*f_fc2, f_comb[1], out.data_ptr(), counters),
                                           None)
        assert args[ARGUMENTS.index("counters")] == counters
    else:
        assert (route, fc1, fc2, comb) == (f_route, f_fc1, f_fc2, f_comb)
        assert args[ARGUMENTS.index("counters")] is None
    kernels = (MoERouteKernel, fm.gemm_kernel_class(cfg1), fm.gemm_kernel_class(cfg2), MoECombineKernel)
    # the optional parameters each passes: the counters; FC1's ids group after the fold's three (None); the fold's
    for cls, part, optional in zip(kernels, (route, fc1, fc2, comb), (fold, 7 * fc1_early, 3 * fold, 0)):
        if part is not None:
            required, every = _arity(cls)
            assert len(part) == required + optional <= every, cls.__name__
