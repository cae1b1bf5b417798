"""The fused-MoE family through the harness the norms use (synthetic backend, CPU): `lutforge sweep` over the
moe set, rows keyed by the layer (family, op, quant mode, activation, routing, H, E, top_k, I, local experts,
T), export of winners into a LUT module beside row entries (EXACT, and RANGE along T: the cut-overs between
tiles), validation, runtime dispatch of a MoE problem from that module, and the report over those rows."""
from __future__ import annotations

from dataclasses import replace

import pytest
from click.testing import CliRunner

from kernels.dispatch import Dispatcher, default_dispatcher, select_config
from kernels.family import families, family_of, family_of_op
from kernels import moe_config as mc
from kernels.moe_config import MoEConfig, valid_gemm_configs, gemm_shapes
from kernels.moe_problem import MoEProblem
from sweep.cli import main
from sweep.results_io import read_results
from sweep.schema import knob_columns
from sweep.study import search_space, study_name

from sweep_helpers import assert_rows_round_trip, export_checked


def _sweep(results, *args):
    r = CliRunner().invoke(main, ["sweep", "--backend", "synthetic", "--results", str(results), "--trials", "8", *args])
    assert r.exit_code == 0, r.output
    return r.output


def test_moe_problems_round_trip_through_their_keys_and_have_one_space_per_layer_shape(monkeypatch):
    p = MoEProblem("fused_moe", 64, 128, 8, 2048, 768, "nvfp4", "silu", "skewed", 32)
    fam = family_of(p)
    assert fam is family_of_op("fused_moe") and fam.name == "moe"
    assert fam.problem_of_key(fam.key(p)) == p
    assert fam.key_error(fam.key(p)[:-1]) is not None
    sp = search_space(p, 90)
    assert sp is search_space(MoEProblem("fused_moe", 1, 8, 2, 2048, 768), 90)  # validity: K and N only
    fc1, fc2 = gemm_shapes("nvfp4", "silu", 2048, 768)
    same = {(a.bm, a.stages) for a in valid_gemm_configs(fc1)} & {(b.bm, b.stages) for b in valid_gemm_configs(fc2)}
    assert 10_000 < sp.n_valid and all((v[0], v[1]) in same for v in sp.valid)
    assert all(not fam.violations(p, MoEConfig(*v)) for v in sp.valid[::997])
    assert study_name(p, "h200").startswith("fused_moe:bf16:bf16:T64:C2048:nvfp4:silu:skewed:E128:k8:I768:L32:h200:k")
    for T in (1, 64, 4096):
        cfg = fam.heuristic(MoEProblem("fused_moe", T, 128, 8, 2048, 768))
        # one row per expert at T=1 and 4 at T=64: the GEMV's 8-row m-tiles
        assert not fam.violations(p, cfg) and cfg.bm == {1: 8, 64: 8}.get(T, cfg.bm) and (cfg.bm <= 16) == (T <= 64)
        assert (cfg.fc1_mma == "gemv") == (T <= 64)
    monkeypatch.setattr(mc, "GEMV_DECODE", False)  # the mma.sync decode tile's split
    mixtral = MoEProblem("fused_moe", 2, 8, 2, 4096, 14336)  # 3.5 experts x 4096/64 = 224 FC2 CTAs: split
    assert fam.heuristic(mixtral).fc2_splits > 1 and not fam.violations(mixtral, fam.heuristic(mixtral))
    assert fam.heuristic(MoEProblem("fused_moe", 4096, 8, 2, 4096, 14336)).fc2_splits == 1


def test_moe_sweep_export_dispatch_and_report(tmp_path):
    res = tmp_path / "results"
    _sweep(res, "--op", "fused_moe", "--problem-set", "moe", "--out", "bf16", "--limit-shapes", "4")
    _sweep(res, "--op", "rmsnorm", "--shapes", "256x4096", "--out", "bf16")  # a row problem in the same rows
    df = read_results(res)
    moe = df[df["family"] == "moe"]
    assert len(moe) and set(moe["op"]) == {"fused_moe"} and set(moe["C"]) <= {2048, 4096, 7168, 2880, 2688}  # C = H
    ok = moe[moe["status"] == "ok"]
    assert ok[knob_columns(families()["moe"])].notna().all().all()
    assert ok["knob_cluster"].isna().all() and ok["knob_positions_per_cta"].isna().all()
    assert set(ok["quant_mode"]) <= {"nvfp4", "w4a16"} and (ok["E"] > 0).all() and (ok["top_k"] > 0).all()
    assert_rows_round_trip(ok.head(5))

    lut_path = tmp_path / "sm90_synthetic.py"
    lut = export_checked(res, lut_path)
    moe_keys = [k for k in lut.exact if k[0] == "fused_moe"]
    # skewed routing is swept (what a call would want if the op could see it) but gets no entry: the public op
    # looks up uniform routing (Family.dispatch_key)
    layer_t = ["quant_mode", "activation", "C", "E", "top_k", "I", "T"]
    assert (ok["routing"] == "skewed").any() and len(moe_keys) == ok[ok["routing"] == "uniform"].groupby(layer_t).ngroups
    assert {k[5] for k in moe_keys} == {"uniform"} and any(k[0] == "rmsnorm" for k in lut.exact)
    moe_ranges = [k for k in lut.range if k[0] == "fused_moe"]
    assert set(moe_ranges) == {k[:-1] for k in moe_keys}  # one range along T per swept layer
    assert "('op', 'out_format', 'in_dtype', 'quant_mode', 'activation', 'routing', 'C', 'E', 'top_k', 'I', " \
           "'local_experts') -> [(T_below, knobs), ...] (moe family)" in lut_path.read_text()

    d = Dispatcher([lut])
    p = family_of_op("fused_moe").problem_of_key(moe_keys[0])
    sel = d.lookup(p, 90, "synthetic")
    assert sel.tier == "exact" and sel.config == MoEConfig(**lut.exact[moe_keys[0]])
    def at(T):
        return d.lookup(MoEProblem("fused_moe", T, p.E, p.top_k, p.H, p.I, p.quant_mode, p.activation, p.routing,
                                   p.local_experts), 90, "synthetic")
    near, far = at(p.T + 1), at(p.T * 4 + 5)  # within 2x of the swept T: the range answers; beyond: heuristic
    assert near.tier == "range" and near.config == sel.config
    assert far.tier == "heuristic" and not family_of(p).violations(p, far.config)
    # the walk over T (warm-up, AOT library) finds every answer: the exact T, the range's span, the heuristic
    t_max = 1 << 15
    segs = d.segments(replace(p, T=0), 90, "synthetic", t_max=t_max)
    assert segs[0][0] == 1 and segs[-1][1] == t_max
    for T in sorted({1, 2, 3, p.T - 1, p.T, p.T + 1, 2 * p.T, 4 * p.T + 5, 1000, t_max} - {0}):
        (run,) = [s for a, b, s in segs if a <= T <= b]
        assert run == at(T), T

    report = tmp_path / "BENCHMARKS.md"
    r = CliRunner().invoke(main, ["report", "--results", str(res), "--allow-synthetic", "-o", str(report)])
    assert r.exit_code == 0, r.output
    assert "fused_moe" in report.read_text()


@pytest.mark.parametrize("layer_call", [False, True])
def test_warmup_moe_makes_every_T_of_a_layer_resident(monkeypatch, layer_call):
    """After warmup_moe, whatever T a call brings, its two GEMMs and its routing kernel are already loaded (and
    under fused_moe.LAYER_CALL the host function launching the four)."""
    from kernels import fused_moe as fm
    from kernels.moe_combine_kernel import MoECombineSpec
    from kernels.moe_route_kernel import MoERouteSpec
    from kernels.warmup import warmup_moe

    loaded = []
    monkeypatch.setattr(fm, "get_compiled", lambda sh, cfg, arch: loaded.append((sh, cfg, arch)))
    monkeypatch.setattr(fm, "get_route", lambda spec, arch: loaded.append((spec, arch)))
    monkeypatch.setattr(fm, "get_combine", lambda spec, arch: loaded.append((spec, arch)))
    monkeypatch.setattr(fm, "get_layer", lambda spec, arch: loaded.append((spec, arch)))
    monkeypatch.setattr(fm, "LAYER_CALL", layer_call)
    report = warmup_moe(8, 2, 4096, 14336, arch="sm_90a", device_class="h200")  # Mixtral: decode splits FC2
    assert report.kernels == len(set(loaded)) == len(loaded) >= 3
    shapes = gemm_shapes("nvfp4", "silu", 4096, 14336)
    cfgs = set()
    for T in (1, 2, 3, 17, 64, 65, 300, 4096, 16384, 1 << 20):
        p = MoEProblem("fused_moe", T, 8, 2, 4096, 14336)
        cfg = default_dispatcher().lookup(p, 90, "h200").config
        cfgs.add(cfg)
        assert all((sh, cfg.gemm(sh.layer), "sm_90a") in loaded for sh in shapes), T
        # W4A4 (the problem's default mode): the routing launch quantises x
        assert (MoERouteSpec(8, 2, cfg.bm, cfg.bm, "int32", "fp32", quant_h=4096), "sm_90a") in loaded, T
        assert (MoECombineSpec(2, cfg.gemm("fc2").splits, 4096), "sm_90a") in loaded, T
        ls = fm.layer_spec(p, cfg.gemm("fc1"), cfg.gemm("fc2"))
        assert ((ls, "sm_90a") in loaded) == layer_call, T
    assert len(cfgs) >= 2  # decode and large-batch tiles both covered


def test_old_moe_rows_without_mma_columns_still_export(tmp_path, monkeypatch):
    """Parquet rows written before the knob (no knob_fc1_mma / knob_fc2_mma columns) are still usable rows
    and pick winners: their configs read as mma.sync."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lut_export.winners import pick_winners, select_rows

    for switch in ("GEMV_DECODE", "WGMMA_LARGE_BATCH"):  # the heuristic of then, whose sweeps were mma.sync
        monkeypatch.setattr(mc, switch, False)
    res = tmp_path / "results"
    _sweep(res, "--op", "fused_moe", "--problem-set", "moe", "--out", "bf16", "--limit-shapes", "2")
    for f in res.rglob("*.parquet"):  # rewrite every file as an older writer left it
        t = pq.read_table(f)
        keep = t.column("knob_fc1_mma").to_pylist(), t.column("knob_fc2_mma").to_pylist()
        rows = [i for i, (a, b) in enumerate(zip(*keep)) if a in (None, "sync") and b in (None, "sync")]
        # typed indices: a file holding no mma.sync row (an empty list) would reach take() as nulls
        pq.write_table(t.take(pa.array(rows, pa.int64())).drop_columns(["knob_fc1_mma", "knob_fc2_mma"]), f)
    df = read_results(res)
    assert "knob_fc1_mma" not in df.columns and (df["family"] == "moe").any()
    sel = select_rows(df, arch=90, allow_synthetic=True)
    winners, _ = pick_winners(sel)
    moe = {k: w for k, w in winners.items() if k[0] == "fused_moe"}
    uniform = df[(df["family"] == "moe") & (df["routing"] == "uniform")].groupby(
        ["quant_mode", "activation", "C", "E", "top_k", "I", "T"]).ngroups
    assert len(moe) == uniform > 0 and all(isinstance(w.config, MoEConfig) for w in moe.values())
    assert all(w.config.fc1_mma == w.config.fc2_mma == "sync" for w in moe.values())


def test_bench_records_the_config_the_public_op_dispatches_for_skewed_routing(tmp_path):
    """The public op cannot see a call's routing (it is on the device) and dispatches on uniform routing; the
    bench's "lutforge" row must name that config, not the skew-aware heuristic's (Qwen3-30B-A3B at T=256:
    16 rows per expert uniform, the decode GEMV's last; more per touched expert skewed, wgmma tiles)."""
    from sweep.bench_cmd import bench

    p = MoEProblem("fused_moe", 256, 128, 8, 2048, 768, "w4a16", "silu", "skewed", 0)
    fam = family_of(p)
    uniform = fam.dispatch_key(p)
    assert uniform.routing == "uniform" and fam.heuristic(p, 90) != fam.heuristic(uniform, 90)
    rows, _, _ = bench([(p, "moe")], [], "synthetic", tmp_path)
    got = {r["impl"]: fam.row_config(r) for r in rows}
    assert got["lutforge"] == select_config(uniform, 90, rows[0]["device_class"])[0]
    assert got["lutforge_heuristic"] == fam.heuristic(p, 90) != got["lutforge"]
    assert all(r["routing"] == "skewed" and r["status"] == "ok" for r in rows)  # timed on the skewed call
