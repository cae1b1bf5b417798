"""The fused-MoE family through the harness the norms use (synthetic backend, CPU): `lutforge sweep` over the
moe set, rows keyed by the layer (family, op, quant mode, activation, routing, H, E, top_k, I, local experts,
T), export of winners into a LUT module beside row entries (EXACT, and RANGE along T: the cut-overs between
tiles), validation, runtime dispatch of a MoE problem from that module, and the report over those rows."""
from __future__ import annotations

from click.testing import CliRunner

from kernels.dispatch import Dispatcher
from kernels.family import families, family_of, family_of_op
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


def test_moe_problems_round_trip_through_their_keys_and_have_one_space_per_layer_shape():
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
        assert not fam.violations(p, cfg) and (cfg.bm == 16) == (T <= 64)  # 4 rows per expert at T=64


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
    assert len(moe_keys) == 4 and any(k[0] == "rmsnorm" for k in lut.exact)
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

    report = tmp_path / "BENCHMARKS.md"
    r = CliRunner().invoke(main, ["report", "--results", str(res), "--allow-synthetic", "-o", str(report)])
    assert r.exit_code == 0, r.output
    assert "fused_moe" in report.read_text()
