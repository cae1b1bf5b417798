"""The channel-first family through the harness the row family uses (synthetic backend, CPU): `lutforge
sweep` over the WAN decoder set, rows keyed (family, op, formats, C, N, S), export of winners into a LUT module
beside row entries, validation, and runtime dispatch answering a channel-first problem from that module."""
from __future__ import annotations

from click.testing import CliRunner

from kernels import channel_first as cf
from kernels.dispatch import Dispatcher
from kernels.family import families, family_of, family_of_op
from sweep.cli import main
from sweep.results_io import read_results
from sweep.schema import knob_columns
from sweep.study import search_space, study_name

from sweep_helpers import assert_rows_round_trip, export_checked


def _sweep(results, *args):
    r = CliRunner().invoke(main, ["sweep", "--backend", "synthetic", "--results", str(results), "--trials", "8", *args])
    assert r.exit_code == 0, r.output
    return r.output


def test_every_op_has_one_family_and_problems_round_trip_through_their_keys():
    fams = families()
    ops = [o for f in fams.values() for o in f.ops]
    assert len(ops) == len(set(ops)) and "rmsnorm" in ops and "cf_l2norm_silu" in ops
    p = cf.ChannelFirstProblem(4, 192, 99840, silu=True, l2norm=True)
    fam = family_of(p)
    assert fam is family_of_op(p.op) and fam.name == "channel_first"
    assert fam.problem_of_key(fam.key(p)) == p
    assert fam.key_error(("cf_l2norm_silu", "bf16", "bf16", 192, 4)) is not None
    # validity depends on S (and N), so each channel-first problem has its own counted space
    odd = cf.ChannelFirstProblem(4, 192, 99841, silu=True, l2norm=True)
    assert search_space(p, 90).n_valid > search_space(odd, 90).n_valid > 0
    assert study_name(p, "h200").startswith("cf_l2norm_silu:bf16:bf16:P4x99840:C192:h200:k")


def test_channel_first_sweep_export_and_dispatch(tmp_path):
    res = tmp_path / "results"
    out = _sweep(res, "--op", "cf_l2norm_silu", "--problem-set", "wan_vae_decoder", "--out", "bf16,fp8",
                 "--limit-shapes", "3")
    assert "1x399360" in out  # the size column names N x S
    _sweep(res, "--op", "rmsnorm", "--shapes", "256x4096", "--out", "bf16")  # a row problem in the same rows
    df = read_results(res)
    cfr = df[df["family"] == "channel_first"]
    assert len(cfr) and set(cfr["op"]) == {"cf_l2norm_silu"} and (cfr["T"] == cfr["N"] * cfr["S"]).all()
    ok = cfr[cfr["status"] == "ok"]
    assert ok[knob_columns(families()["channel_first"])].notna().all().all()
    assert ok["knob_cluster"].isna().all()  # the row family's own knobs stay empty
    assert_rows_round_trip(ok.head(5))

    lut_path = tmp_path / "sm90_synthetic.py"
    lut = export_checked(res, lut_path)
    cf_keys = [k for k in lut.exact if k[0] == "cf_l2norm_silu"]
    assert len(cf_keys) == 6 and any(k[0] == "rmsnorm" for k in lut.exact)
    assert all(k[0] != "cf_l2norm_silu" for k in lut.range)  # no range table along N x S
    assert "('op', 'out_format', 'in_dtype', 'C', 'N', 'S') -> knobs (channel_first family)" in lut_path.read_text()

    d = Dispatcher([lut])
    key = cf_keys[0]
    p = family_of_op(key[0]).problem_of_key(key)
    sel = d.lookup(p, 90, "synthetic")
    assert sel.tier == "exact" and sel.config == cf.ChannelFirstConfig(**lut.exact[key])
    # a stride the tuned vector cannot take falls back to the heuristic for that layout
    odd = d.lookup(p, 90, "synthetic", stride_gcd=1)
    assert odd.tier == "heuristic" and not cf.violations(p, odd.config, 90, 1)
    unseen = cf.ChannelFirstProblem(1, p.C, 1000, p.in_dtype, p.out_format, p.silu, p.bias, p.l2norm)
    assert d.lookup(unseen, 90, "synthetic").tier == "heuristic"
