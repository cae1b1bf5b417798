"""fused_moe correctness on a GPU against the float64 reference built from the dequantised weights.

Weights are random normal, quantised with ModelOpt's NVFP4 conventions (kernels/moe_quant.py); x is
randn (never zeros); the output is poisoned (NaN) before each call, so an unwritten element cannot pass.
W4A16 is compared element-wise (bf16 output, fp32 accumulation over K up to 2048: 2^-6 relative of the
output's scale); W4A4 by relative Frobenius error, since an fp32 activation a few ulps off the reference's
may round to the neighbouring e2m1 code (one FP4 step on a few elements of FC2's input).
"""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from kernels import fused_moe as fm
from kernels.fused_moe import fused_moe
from kernels.moe_config import MoEGemmConfig
from kernels.moe_runner import layer_tensors
from kernels.moe_reference import fused_moe_reference

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

DEV = "cuda"


def make_layer(E, H, I, activation, quant_mode, seed=0, n_local=None):  # noqa: E741
    return layer_tensors(n_local or E, 2 * I if activation == "silu" else I, H, I, quant_mode, DEV, seed)


def make_routing(T, E, k, seed=0, skew=None):
    g = torch.Generator(device=DEV).manual_seed(seed + 1)
    if skew == "one":  # every token's first choice is expert 0
        ids = torch.stack([torch.randperm(E - 1, generator=g, device=DEV)[: k - 1] + 1 for _ in range(T)]) \
            if k > 1 else torch.empty(T, 0, dtype=torch.long, device=DEV)
        ids = torch.cat([torch.zeros(T, 1, dtype=torch.long, device=DEV), ids], dim=1)
    else:
        ids = torch.stack([torch.randperm(E, generator=g, device=DEV)[:k] for _ in range(T)]) if T else \
            torch.empty(0, k, dtype=torch.long, device=DEV)
    w = torch.softmax(torch.randn(T, k, generator=g, device=DEV), dim=-1)
    return ids.to(torch.int32), w.float()


def run_and_check(T, E, k, H, I, activation, quant_mode, seed=0, skew=None, n_local=None, offset=0, configs=None):
    layer = make_layer(E, H, I, activation, quant_mode, seed, n_local)
    ids, w = make_routing(T, E, k, seed, skew)
    x = torch.randn(T, H, device=DEV, generator=torch.Generator(device=DEV).manual_seed(seed + 2)).to(torch.bfloat16)
    out = torch.full((T, H), float("nan"), dtype=torch.bfloat16, device=DEV)
    got = fused_moe(x, layer["w1_weight"], layer["w1_weight_sf"], layer["w2_weight"], layer["w2_weight_sf"], ids, w,
                    E, k, w1_alpha=layer["w1_alpha"], w2_alpha=layer["w2_alpha"],
                    fc2_input_scale=layer["fc2_input_scale"], num_local_experts=n_local, output=out,
                    activation=activation, quant_mode=quant_mode, local_expert_offset=offset, configs=configs)
    torch.cuda.synchronize()
    assert got.data_ptr() == out.data_ptr()
    ref = fused_moe_reference(x, layer["w1_weight"], layer["w1_weight_sf"], layer["w2_weight"], layer["w2_weight_sf"],
                              ids, w, w1_alpha=layer["w1_alpha"], w2_alpha=layer["w2_alpha"],
                              fc2_input_scale=layer["fc2_input_scale"], local_expert_offset=offset,
                              activation=activation, quant_mode=quant_mode)
    assert not torch.isnan(got).any(), "unwritten or NaN outputs"
    if T == 0:
        return
    scale = ref.abs().max().clamp(min=1e-6)
    err = (got.float() - ref).abs()
    if quant_mode == "w4a16":
        assert float(err.max() / scale) < 2**-6, f"max err {float(err.max())} vs scale {float(scale)}"
    else:
        rel = float(err.norm() / ref.norm().clamp(min=1e-6))
        assert rel < 0.03, f"relative Frobenius error {rel}"


@pytest.mark.parametrize("quant_mode", ["w4a16", "nvfp4"])
@pytest.mark.parametrize("activation", ["silu", "relu2"])
@pytest.mark.parametrize("T", [1, 7, 64, 333])
def test_modes_activations_sizes(T, activation, quant_mode):
    run_and_check(T, 16, 4, 256, 128, activation, quant_mode)


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_top_k(k):
    run_and_check(37, 16, k, 128, 64, "silu", "w4a16", seed=k)


def test_zero_tokens():
    run_and_check(0, 8, 2, 128, 64, "silu", "nvfp4")


def test_one_expert_takes_every_token_and_others_none():
    run_and_check(300, 8, 1, 128, 128, "silu", "w4a16", skew="one")
    run_and_check(300, 8, 3, 128, 128, "relu2", "nvfp4", skew="one")


@pytest.mark.parametrize("offset", [0, 4])
def test_expert_parallel_local_subset(offset):
    run_and_check(50, 16, 4, 128, 64, "silu", "w4a16", n_local=8, offset=offset)


@pytest.mark.parametrize("cfgs", [
    (MoEGemmConfig(16, 32, 256, 4, 1, 2), MoEGemmConfig(16, 32, 128, 4, 1, 2)),
    (MoEGemmConfig(64, 64, 128, 3, 2, 2), MoEGemmConfig(64, 32, 64, 3, 2, 2)),
    (MoEGemmConfig(128, 64, 64, 4, 4, 2), MoEGemmConfig(128, 64, 64, 2, 4, 2)),
    (MoEGemmConfig(32, 16, 64, 2, 2, 1), MoEGemmConfig(16, 16, 64, 5, 1, 1)),
])
def test_explicit_configs(cfgs):
    run_and_check(200, 8, 2, 256, 256, "silu", "w4a16", configs=cfgs)


# FC2 split-K (kernels/moe_config.py): forced (FC1, FC2) configs for a layer with H=256, I=512 (FC2's K = 512).
SPLIT_CFGS = {
    2: (MoEGemmConfig(16, 32, 128, 4, 1, 2), MoEGemmConfig(16, 32, 128, 4, 1, 2, 2)),  # 2 k-tiles per split
    4: (MoEGemmConfig(16, 16, 64, 2, 1, 1), MoEGemmConfig(16, 16, 64, 2, 1, 1, 4)),  # ReLU2's FC1 fits too
    8: (MoEGemmConfig(32, 32, 64, 3, 2, 2), MoEGemmConfig(32, 64, 64, 3, 2, 2, 8)),  # 1 k-tile per split: < stages
}


@pytest.mark.parametrize("splits", [2, 8])
@pytest.mark.parametrize("quant_mode", ["w4a16", "nvfp4"])
@pytest.mark.parametrize("T, n_local, offset", [(0, None, 0), (1, None, 0), (37, None, 0), (333, None, 0),
                                                (37, 8, 4), (1, 8, 8), (333, 8, 0)])
def test_fc2_split_k(T, n_local, offset, splits, quant_mode):
    """Every split's partial rows land (poisoned output, NaN if not), non-local experts' rows read 0 in every
    split (expert parallelism: y zero-initialised), several m-tiles per expert (T=333: 83 rows each)."""
    run_and_check(T, 16, 4, 256, 512, "silu", quant_mode, seed=splits + T, n_local=n_local, offset=offset,
                  configs=SPLIT_CFGS[splits])


def test_fc2_split_k_relu2_and_top_k_1():
    run_and_check(7, 16, 4, 256, 512, "relu2", "nvfp4", seed=3, configs=SPLIT_CFGS[4])
    run_and_check(45, 8, 1, 256, 512, "silu", "w4a16", seed=4, configs=SPLIT_CFGS[4])


def test_fc2_split_k_is_deterministic_and_agrees_with_the_unsplit_tile():
    E, k, H, I, T = 16, 4, 256, 512, 29  # noqa: E741
    layer = make_layer(E, H, I, "silu", "w4a16", seed=9)
    ids, w = make_routing(T, E, k, seed=9)
    x = torch.randn(T, H, device=DEV).to(torch.bfloat16)
    fc1, fc2 = SPLIT_CFGS[8]
    runs = []
    for c2 in (fc2, fc2, MoEGemmConfig(fc2.bm, fc2.bn, fc2.bk, fc2.stages, fc2.warps_m, fc2.warps_n)):
        out = torch.full((T, H), float("nan"), dtype=torch.bfloat16, device=DEV)
        runs.append(_call(layer, x, ids, w, E, k, out, "w4a16", configs=(fc1, c2)).float())
    torch.cuda.synchronize()
    assert torch.equal(runs[0], runs[1])  # no atomics: the same bits every call
    scale = runs[2].abs().max()
    assert float((runs[0] - runs[2]).abs().max() / scale) <= 2**-6  # fp32 sums reassociated: a bf16 ulp at most


def test_heuristic_decode_with_few_touched_experts():
    """A Mixtral-like decode step (E=8, top-2, T=1: 2 experts x 256/32 n-tiles): the family heuristic's tile,
    FC2 split when the dispatcher answers with the heuristic (no LUT entry for this layer)."""
    run_and_check(1, 8, 2, 256, 1024, "silu", "nvfp4", seed=5)
    run_and_check(1, 8, 2, 256, 1024, "silu", "w4a16", seed=6, n_local=4, offset=4)


def test_real_layer_shapes_decode_and_batch():
    run_and_check(4, 128, 8, 2048, 768, "silu", "nvfp4")  # Qwen3-30B-A3B, decode
    run_and_check(512, 128, 8, 2048, 768, "silu", "w4a16")


def test_expert_id_out_of_range_is_refused():
    """"sync" refuses in the call; the default (no sync) lets the call run with the bad pair routed nowhere and
    refuses at the next call once the GPU has run it, also for a CUDA-graph replay; "off" never refuses."""
    layer = make_layer(8, 128, 64, "silu", "w4a16")
    ids, w = make_routing(4, 8, 2)
    good = ids.clone()
    ids[1, 0] = 8
    x = torch.randn(4, 128, device=DEV).to(torch.bfloat16)

    def call(i, check="deferred"):
        return fused_moe(x, layer["w1_weight"], layer["w1_weight_sf"], layer["w2_weight"], layer["w2_weight_sf"], i, w,
                         8, 2, w1_alpha=layer["w1_alpha"], w2_alpha=layer["w2_alpha"], quant_mode="w4a16",
                         check_expert_ids=check)

    with pytest.raises(ValueError, match="outside"):
        call(ids, "sync")
    call(good, "sync")  # the sync check counts this call only
    out = call(ids)  # no sync, no error yet
    torch.cuda.synchronize()
    assert torch.isfinite(out.float()).all()
    dropped_ids, dropped_w = good.clone(), w.clone()
    dropped_w[1, 0] = 0.0  # the bad pair contributes nothing
    ref = fused_moe_reference(x, layer["w1_weight"], layer["w1_weight_sf"], layer["w2_weight"], layer["w2_weight_sf"],
                              dropped_ids, dropped_w, w1_alpha=layer["w1_alpha"], w2_alpha=layer["w2_alpha"],
                              quant_mode="w4a16")
    assert float((out.float() - ref).abs().max() / ref.abs().max()) < 2**-6
    with pytest.raises(ValueError, match="earlier fused_moe call on this device had 1 "):
        call(good)
    call(good)  # reported once
    call(ids, "off")
    torch.cuda.synchronize()
    call(good)  # "off" records nothing

    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        call(ids)
    torch.cuda.synchronize()
    call(good)  # the capture itself ran no kernel
    g.replay()
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match="earlier"):
        call(good)
    with pytest.raises(ValueError, match="check_expert_ids must be one of"):
        call(good, "always")


@pytest.mark.parametrize("T, E, k, n_local, offset", [(1, 128, 8, 128, 0), (333, 16, 4, 16, 0), (4096, 256, 8, 256, 0),
                                                      (50, 16, 4, 8, 4), (0, 8, 2, 8, 0)])
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
def test_routing_kernel_sorts_pairs_by_local_expert(T, E, k, n_local, offset, ids_dtype):
    ids, w = make_routing(T, E, k)
    ids = ids.to(ids_dtype)
    if T >= 50:  # ids out of range (under capture they route nowhere) are counted, not sorted in
        ids[3, 0], ids[7, 1] = E, -1
    if ids_dtype == torch.int64 and T >= 50:
        ids[9, 0] = (1 << 32) + 1  # not truncated into range
    r = fm._route(ids, w, n_local, offset, k, 16, 128, "sm_90a", num_experts=E)
    torch.cuda.synchronize()
    flat = ids.reshape(-1).long()
    in_range = (flat >= 0) & (flat < E)
    flat = flat - offset
    local = in_range & (flat >= 0) & (flat < n_local)
    assert int(r["bad"][0]) == int((~in_range).sum())
    assert torch.equal(r["valid"].bool(), local)
    counts = torch.bincount(flat[local], minlength=n_local)
    eo, out_rows = r["eo"], r["out_rows"]
    assert eo.tolist() == [0] + torch.cumsum(counts, 0).tolist()
    for t, bm in ((r["to1"], 16), (r["to2"], 128)):
        assert t.tolist() == [0] + torch.cumsum((counts + bm - 1) // bm, 0).tolist()
    n = int(eo[-1])
    pairs = out_rows[:n].long()
    assert sorted(out_rows.tolist()) == list(range(T * k))  # every pair exactly once
    assert (flat[pairs] == torch.repeat_interleave(torch.arange(n_local, device=DEV), counts)).all()
    assert (r["a_rows"][:n].long() == pairs // k).all() and torch.equal(r["row_scale"][:n], w.reshape(-1)[pairs])


def _call(layer, x, ids, w, E, k, out, quant_mode="nvfp4", configs=None):
    return fused_moe(x, layer["w1_weight"], layer["w1_weight_sf"], layer["w2_weight"], layer["w2_weight_sf"], ids, w, E,
                     k, w1_alpha=layer["w1_alpha"], w2_alpha=layer["w2_alpha"], fc2_input_scale=layer["fc2_input_scale"],
                     output=out, quant_mode=quant_mode, configs=configs)


def _graph_case(name):
    """(E, k, H, I, T, configs, skew of the second replay) of a CUDA-graph case: the dispatched configs, FC2
    split-K, the wgmma large-batch tile, the decode GEMV."""
    return {"dispatched": (16, 4, 256, 128, 40, None, None), "split": (16, 4, 256, 512, 40, SPLIT_CFGS[8], None),
            "wgmma": (8, 2, 512, 256, 300, WGMMA_CFGS["wg128"], "one"),
            "gemv": (8, 2, 512, 256, 3, GEMV_CFGS["16 rows, K groups, split"], "one")}[name]


@pytest.mark.parametrize("case", ["dispatched", "split", "wgmma", "gemv"])
def test_cuda_graph_replay_follows_new_inputs_in_the_same_buffers(case):
    E, k, H, I, T, configs, skew = _graph_case(case)  # noqa: E741
    layer = make_layer(E, H, I, "silu", "nvfp4")
    ids, w = make_routing(T, E, k, seed=3)
    x = torch.randn(T, H, device=DEV).to(torch.bfloat16)
    out = torch.empty(T, H, dtype=torch.bfloat16, device=DEV)
    _call(layer, x, ids, w, E, k, out, configs=configs)  # warm-up: compiles, caches the plan
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        _call(layer, x, ids, w, E, k, out, configs=configs)
    for seed in (5, 6):
        ids2, w2 = make_routing(T, E, k, seed=seed, skew=skew if seed == 6 else None)
        ids.copy_(ids2)
        w.copy_(w2)
        x.copy_(torch.randn(T, H, device=DEV).to(torch.bfloat16))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ref = fused_moe_reference(x, layer["w1_weight"], layer["w1_weight_sf"], layer["w2_weight"],
                                  layer["w2_weight_sf"], ids, w, w1_alpha=layer["w1_alpha"], w2_alpha=layer["w2_alpha"],
                                  fc2_input_scale=layer["fc2_input_scale"], quant_mode="nvfp4")
        assert float((out.float() - ref).norm() / ref.norm()) < 0.03


def test_torch_compile_traces_to_the_custom_op_and_matches_eager():
    E, k, H, I, T = 16, 2, 128, 64, 24
    layer = make_layer(E, H, I, "silu", "w4a16")
    ids, w = make_routing(T, E, k, seed=4)
    x = torch.randn(T, H, device=DEV).to(torch.bfloat16)

    def f(x, ids, w):
        return _call(layer, x, ids, w, E, k, None, "w4a16") * 2

    eager = f(x, ids, w)
    compiled = torch.compile(f, fullgraph=True)(x, ids, w)
    torch.cuda.synchronize()
    assert torch.equal(compiled, eager)


# --------------------------------------------------------------------------- the wgmma backend (SM90)
# Forced (FC1, FC2) configs on a small real layer (H=512, I=256, E=8, top-2: FC1 K=512 N=256, FC2 K=256
# N=512): two warpgroups along M (the large-batch tile; gated FC1's gate and up at bn 128), two of 128 rows
# each (bm 256: two 64-row instructions per warpgroup; T=1000 puts 4 such m-tiles on one expert), one warpgroup of
# 64 rows with bk 128 (FC2: one k-tile less than its stages), two warpgroups side by side along N, and wgmma
# FC1 beside an mma.sync FC2 (the backends share bm and stages, so they mix in one call).
WG = dict(mma="wgmma")
WGMMA_CFGS = {
    "wg128": (MoEGemmConfig(128, 128, 64, 4, 4, 2, **WG), MoEGemmConfig(128, 256, 64, 4, 4, 2, **WG)),
    "wg256": (MoEGemmConfig(256, 64, 64, 4, 4, 2, **WG), MoEGemmConfig(256, 128, 64, 4, 4, 2, **WG)),
    "wg64": (MoEGemmConfig(64, 64, 128, 3, 4, 1, **WG), MoEGemmConfig(64, 128, 128, 3, 4, 1, **WG)),
    "wg64n2": (MoEGemmConfig(64, 128, 64, 5, 4, 2, **WG), MoEGemmConfig(64, 64, 64, 5, 4, 2, **WG)),
    "wg_sync": (MoEGemmConfig(128, 64, 64, 4, 4, 2, **WG), MoEGemmConfig(128, 64, 64, 4, 4, 2)),
}


@pytest.mark.parametrize("cfgs", ["wg128", "wg256", "wg64"])
@pytest.mark.parametrize("quant_mode", ["w4a16", "nvfp4"])
@pytest.mark.parametrize("activation", ["silu", "relu2"])
@pytest.mark.parametrize("skew", [None, "one"])
@pytest.mark.parametrize("T", [1, 7, 300, 1000])
def test_wgmma_modes_activations_sizes(T, skew, activation, quant_mode, cfgs):
    """Every mode and activation through forced wgmma configs against the float reference; uniform routing
    and one expert taking every token (T=1000: 8 m-tiles of 128 rows for expert 0, the others few rows or
    none), so partial m-tiles, empty experts and several m-tiles per expert all occur."""
    run_and_check(T, 8, 2, 512, 256, activation, quant_mode, seed=T + 3, skew=skew, configs=WGMMA_CFGS[cfgs])


@pytest.mark.parametrize("cfgs", ["wg64n2", "wg_sync"])
@pytest.mark.parametrize("quant_mode", ["w4a16", "nvfp4"])
def test_wgmma_warpgroups_along_n_and_mixed_backends(cfgs, quant_mode):
    for T, skew in ((7, None), (1000, "one")):
        run_and_check(T, 8, 2, 512, 256, "silu", quant_mode, seed=T, skew=skew, configs=WGMMA_CFGS[cfgs])


def test_wgmma_expert_parallel_local_subset():
    run_and_check(300, 16, 4, 512, 256, "silu", "w4a16", n_local=8, offset=4, configs=WGMMA_CFGS["wg128"])
    run_and_check(300, 16, 4, 512, 256, "relu2", "nvfp4", n_local=8, offset=8, configs=WGMMA_CFGS["wg64"])
    run_and_check(300, 16, 4, 512, 256, "silu", "nvfp4", n_local=8, offset=4, configs=WGMMA_CFGS["wg256"])


@pytest.mark.parametrize("activation", ["silu", "relu2"])
def test_wgmma_agrees_with_mma_sync_up_to_summation_order(activation):
    """The same tile on both backends (W4A16): the B tile is the same exact bf16 expansion and both sum in
    fp32, so the outputs differ by reassociation only: at most a bf16 ulp or so of the output's scale, and
    almost every element identical or one ulp apart."""
    E, k, H, I, T = 8, 2, 512, 256, 1000  # noqa: E741
    layer = make_layer(E, H, I, activation, "w4a16", seed=21)
    ids, w = make_routing(T, E, k, seed=21)
    x = torch.randn(T, H, device=DEV).to(torch.bfloat16)
    runs = {}
    for mma in ("sync", "wgmma"):
        cfgs = (MoEGemmConfig(128, 64, 64, 4, 4, 2, mma=mma), MoEGemmConfig(128, 64, 64, 4, 4, 2, mma=mma))
        out = torch.full((T, H), float("nan"), dtype=torch.bfloat16, device=DEV)
        runs[mma] = fused_moe(x, layer["w1_weight"], layer["w1_weight_sf"], layer["w2_weight"], layer["w2_weight_sf"],
                              ids, w, E, k, w1_alpha=layer["w1_alpha"], w2_alpha=layer["w2_alpha"], output=out,
                              activation=activation, quant_mode="w4a16", configs=cfgs).float()
    torch.cuda.synchronize()
    a, b = runs["sync"], runs["wgmma"]
    assert not torch.isnan(b).any()
    scale = a.abs().max()
    assert float((a - b).abs().max() / scale) <= 2**-7
    assert float(((a - b).abs() > 2**-7 * a.abs() + 1e-6 * scale).float().mean()) < 0.01


def test_wgmma_configs_are_refused_where_they_cannot_run():
    layer = make_layer(8, 512, 256, "silu", "w4a16")
    ids, w = make_routing(4, 8, 2)
    x = torch.randn(4, 512, device=DEV).to(torch.bfloat16)
    bad = (MoEGemmConfig(128, 128, 64, 2, 4, 2, **WG), MoEGemmConfig(128, 256, 64, 2, 4, 2, **WG))
    with pytest.raises(ValueError, match="stages >= 3"):
        _call(layer, x, ids, w, 8, 2, None, "w4a16", configs=bad)


# The decode GEMV (mma="gemv", kernels/moe_gemv_kernel.py): m-tiles of 8 or 16 rows (one or two mma n-tiles), so
# a tile of T=7 with top-2 over 8 experts is partial and T=64 takes several m-tiles per expert; K groups
# (warps_m), two 16-row mma groups per warp and FC2's split-K; H=512 I=256 (FC2's 8 chunks over 4 splits leave
# two lanes of each quad and the second K group idle) and I=320 (FC2's 10 chunks: a partial round).
GEMV = dict(stages=2, bk=64, mma="gemv")
GEMV_CFGS = {
    "8 rows": (MoEGemmConfig(8, 32, warps_m=1, warps_n=4, **GEMV), MoEGemmConfig(8, 64, warps_m=1, warps_n=4, **GEMV)),
    "16 rows, K groups, split": (MoEGemmConfig(16, 32, warps_m=2, warps_n=4, **GEMV),
                                 MoEGemmConfig(16, 64, warps_m=4, warps_n=4, splits=2, **GEMV)),
    "two mma groups a warp, 4 K groups, 4 splits": (MoEGemmConfig(8, 32, warps_m=4, warps_n=2, **GEMV),
                                                    MoEGemmConfig(8, 64, warps_m=2, warps_n=2, splits=4, **GEMV)),
    "2 rounds loaded together": (MoEGemmConfig(16, 32, warps_m=1, warps_n=4, **dict(GEMV, stages=3)),
                                 MoEGemmConfig(16, 64, warps_m=1, warps_n=4, **dict(GEMV, stages=3))),
}


@pytest.mark.parametrize("cfgs", list(GEMV_CFGS))
@pytest.mark.parametrize("quant_mode", ["w4a16", "nvfp4"])
@pytest.mark.parametrize("activation", ["silu", "relu2"])
@pytest.mark.parametrize("skew", [None, "one"])
@pytest.mark.parametrize("T", [1, 7, 64])
def test_gemv_modes_activations_sizes(T, skew, activation, quant_mode, cfgs):
    """Every mode and activation through forced GEMV configs against the float reference; uniform routing
    and one expert taking every token (partial m-tiles, empty experts, many m-tiles of one expert)."""
    cfg1, cfg2 = GEMV_CFGS[cfgs]
    if activation == "relu2":  # ungated FC1: its warps may take twice the columns
        cfg1 = dataclasses.replace(cfg1, bn=2 * cfg1.bn)
    run_and_check(T, 8, 2, 512, 256, activation, quant_mode, seed=T + 5, skew=skew, configs=(cfg1, cfg2))


@pytest.mark.parametrize("quant_mode", ["w4a16", "nvfp4"])
def test_gemv_idle_lanes_top_k_and_expert_parallel(quant_mode):
    run_and_check(5, 16, 8, 512, 320, "silu", quant_mode, seed=3, configs=GEMV_CFGS["8 rows"])
    run_and_check(9, 16, 1, 512, 320, "relu2", quant_mode, seed=4, configs=(
        MoEGemmConfig(16, 64, warps_m=1, warps_n=4, **GEMV), MoEGemmConfig(16, 64, warps_m=2, warps_n=2, splits=2, **GEMV)))
    run_and_check(33, 16, 4, 512, 256, "silu", quant_mode, n_local=8, offset=4, configs=GEMV_CFGS["8 rows"])


def test_gemv_agrees_with_mma_sync_at_decode():
    """W4A16 at T=3 on Mixtral-like proportions (K 1024 / 2048): both backends multiply the same exact weights
    (the GEMV's times 2^-7, undone in its epilogue) with fp32 sums, so the outputs differ by summation order
    only. FC2's 64 chunks per row over two K groups give the second group chunks of its own, so their sum
    through shared memory adds non-zero partials."""
    E, k, H, I, T = 8, 2, 1024, 2048, 3  # noqa: E741
    layer = make_layer(E, H, I, "silu", "w4a16", seed=31)
    ids, w = make_routing(T, E, k, seed=31)
    x = torch.randn(T, H, device=DEV).to(torch.bfloat16)
    runs = []
    gemv = (MoEGemmConfig(8, 32, warps_m=1, warps_n=4, **GEMV), MoEGemmConfig(8, 64, warps_m=2, warps_n=4, **GEMV))
    # stages 3: two chunk rounds loaded together; FC2's 64 chunks per row at warps_m 1: 16 rounds of 4 lanes
    two_rounds = dict(GEMV, stages=3)
    gemv3 = (MoEGemmConfig(16, 32, warps_m=1, warps_n=4, **two_rounds),
             MoEGemmConfig(16, 64, warps_m=1, warps_n=4, splits=1, **two_rounds))
    for cfgs in ((MoEGemmConfig(16, 64, 128, 3, 1, 4), MoEGemmConfig(16, 64, 128, 3, 1, 4)), gemv, gemv3):
        out = torch.full((T, H), float("nan"), dtype=torch.bfloat16, device=DEV)
        runs.append(fused_moe(x, layer["w1_weight"], layer["w1_weight_sf"], layer["w2_weight"], layer["w2_weight_sf"],
                              ids, w, E, k, w1_alpha=layer["w1_alpha"], w2_alpha=layer["w2_alpha"], output=out,
                              quant_mode="w4a16", configs=cfgs).float())
    torch.cuda.synchronize()
    a = runs[0]
    for b in runs[1:]:
        assert not torch.isnan(b).any()
        assert float((a - b).abs().max() / a.abs().max()) <= 2**-7


@pytest.mark.parametrize("fc2_early, fold, fc1_early", [
    ("default", None, None), ("regs", None, None), ("l2", None, None), ("off", None, None), ("off", True, None),
    ("regs", True, True)])
def test_back_to_back_eager_calls_share_their_streams_workspace_and_stay_correct(fc2_early, fold, fc1_early):
    """Calls of two layers and sizes queued without a sync, on the current stream and a side stream: each reuses
    its stream's workspace arena (kernels.fused_moe._workspace) the moment the previous call is done with it.
    Each routing differs from the last, so an FC2 that read stale tables before its PDL wait
    (moe_config.FC2_EARLY, every mode) would compute the wrong experts' rows, and a folded combine
    (moe_config.FOLD_COMBINE) whose counters the routing launch did not zero would sum too early or never, and
    an FC1 routed from the ids (FC1_EARLY) that read a_rows before its wait would gather another call's rows."""
    with contextlib.nullcontext() if (fc2_early, fold, fc1_early) == ("default", None, None) else \
            fm.kernel_variant(None if fc2_early == "default" else fc2_early, fold, fc1_early):
        _back_to_back_calls()


DECODE_CASES = [  # (T, E, k, H, I, n_local, offset, ids dtype, skew, FC1 config, FC2 config)
    (1, 128, 8, 2048, 768, None, 0, torch.int32, None, MoEGemmConfig(8, 32, warps_m=4, warps_n=4, **GEMV),
     MoEGemmConfig(8, 64, warps_m=2, warps_n=4, splits=2, **GEMV)),  # Qwen3-30B-A3B at decode
    (5, 16, 4, 512, 256, None, 0, torch.int64, None, MoEGemmConfig(8, 32, warps_m=1, warps_n=4, **GEMV),
     MoEGemmConfig(8, 64, warps_m=1, warps_n=4, **GEMV)),  # 20 pairs, int64 ids
    (4, 16, 8, 512, 256, None, 0, torch.int32, "one", MoEGemmConfig(8, 32, warps_m=1, warps_n=4, **GEMV),
     MoEGemmConfig(8, 64, warps_m=1, warps_n=4, splits=2, **GEMV)),  # 32 pairs, expert 0 in every token: 1 tile
    (64, 64, 8, 1024, 512, None, 0, torch.int32, None, MoEGemmConfig(16, 64, warps_m=2, warps_n=4, **GEMV),
     MoEGemmConfig(16, 128, warps_m=2, warps_n=4, splits=2, **GEMV)),  # 512 pairs: FC1 waits for the tables
    (9, 16, 2, 512, 256, 8, 4, torch.int64, None, MoEGemmConfig(8, 32, warps_m=1, warps_n=4, **GEMV),
     MoEGemmConfig(8, 64, warps_m=1, warps_n=4, splits=2, **GEMV)),  # expert parallel: half the pairs elsewhere
]


@pytest.mark.parametrize("layer_call", [False, True])
@pytest.mark.parametrize("fold, fc1_early", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_decode_overlaps_write_the_same_bits(case, fold, fc1_early, layer_call, monkeypatch):
    """The combine folded into the decode GEMV's FC2 (moe_config.FOLD_COMBINE) adds the same fp32 partials in
    the same order as the combine kernel, and FC1 routing its tiles from the ids (moe_config.FC1_EARLY) reads
    the same weights and rows as from the routing tables: either way the outputs are bit for bit those of the
    plain call, through the four separate functions and through the layer function, split and unsplit, int32
    and int64 ids, one expert in every token, non-local pairs, and past 32 pairs (FC1 then waits for the
    tables); repeated calls (counters zeroed by each routing launch) agree too, and the plain call agrees with
    the float64 reference. A call whose pairs are all elsewhere writes zeros; int64 ids past 2^32 (out of
    range, routed nowhere with the check off) are not taken for their low word."""
    T, E, k, H, I, n_local, offset, ids_dtype, skew, c1, c2 = DECODE_CASES[case]  # noqa: E741
    monkeypatch.setattr(fm, "LAYER_CALL", layer_call)
    layer = make_layer(E, H, I, "silu", "w4a16", seed=case, n_local=n_local)
    ids, w = make_routing(T, E, k, seed=case, skew=skew)
    ids = ids.to(ids_dtype)
    x = torch.randn(T, H, device=DEV).to(torch.bfloat16)

    def call(ids, check="deferred"):
        out = torch.full((T, H), float("nan"), dtype=torch.bfloat16, device=DEV)
        return fused_moe(x, layer["w1_weight"], layer["w1_weight_sf"], layer["w2_weight"], layer["w2_weight_sf"],
                         ids, w, E, k, w1_alpha=layer["w1_alpha"], w2_alpha=layer["w2_alpha"],
                         num_local_experts=n_local, local_expert_offset=offset, output=out, quant_mode="w4a16",
                         configs=(c1, c2), check_expert_ids=check)

    far = ids.clone()
    far[:, 0] += 1 << 32 if ids_dtype == torch.int64 else 0
    with fm.kernel_variant(fold=False, fc1_early=False):
        plain = call(ids)
        plain_far = call(far, "off")
    with fm.kernel_variant(fold=fold, fc1_early=fc1_early):
        overlapped = [call(ids) for _ in range(3)]
        got_far = call(far, "off")
        if n_local is not None:  # every id outside [offset, offset + n_local): no CTA of FC2 has rows
            nowhere = call(torch.full_like(ids, offset + n_local))
    torch.cuda.synchronize()
    assert not torch.isnan(plain).any()
    for got in overlapped:
        assert torch.equal(got, plain)
    assert torch.equal(got_far, plain_far)
    ref = fused_moe_reference(x, layer["w1_weight"], layer["w1_weight_sf"], layer["w2_weight"], layer["w2_weight_sf"],
                              ids, w, w1_alpha=layer["w1_alpha"], w2_alpha=layer["w2_alpha"],
                              local_expert_offset=offset, quant_mode="w4a16")
    assert float((plain.float() - ref).abs().max() / ref.abs().max()) < 2**-6
    if n_local is not None:
        assert torch.equal(nowhere, torch.zeros_like(nowhere))


def _back_to_back_calls():
    layers = {H: make_layer(16, H, 128, "silu", "w4a16", seed=H) for H in (256, 512)}
    side = torch.cuda.Stream()
    calls = []
    for i, (H, T, stream) in enumerate([(256, 40, None), (512, 3, None), (256, 1, side), (512, 64, None),
                                        (256, 40, side), (256, 7, None)]):
        ids, w = make_routing(T, 16, 4, seed=10 + i)
        x = torch.randn(T, H, device=DEV).to(torch.bfloat16)
        out = torch.full((T, H), float("nan"), dtype=torch.bfloat16, device=DEV)
        torch.cuda.synchronize()  # inputs ready on every stream; nothing syncs between the calls below
        calls.append((layers[H], x, ids, w, out, stream))
    for layer, x, ids, w, out, stream in calls:
        with torch.cuda.stream(stream if stream is not None else torch.cuda.current_stream()):
            _call(layer, x, ids, w, 16, 4, out, quant_mode="w4a16")
    torch.cuda.synchronize()
    assert (torch.cuda.current_device(), side.cuda_stream) in fm._ARENAS
    for layer, x, ids, w, out, _ in calls:
        ref = fused_moe_reference(x, layer["w1_weight"], layer["w1_weight_sf"], layer["w2_weight"],
                                  layer["w2_weight_sf"], ids, w, w1_alpha=layer["w1_alpha"],
                                  w2_alpha=layer["w2_alpha"], quant_mode="w4a16")
        err = float((out.float() - ref).abs().max() / ref.abs().max())
        assert err < 2**-6, f"T={x.shape[0]} H={x.shape[1]}: max err {err}"
