"""The timer and a tiny real sweep on a GPU (run with `pytest -m gpu` on an H100)."""
from __future__ import annotations

import pytest

from kernels.channel_first import ChannelFirstProblem
from kernels.config import heuristic
from kernels.problem import Problem, ideal_bytes
from sweep.results_io import read_results

pytestmark = [pytest.mark.gpu, pytest.mark.timing]


@pytest.fixture(scope="module")
def cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    return torch


def test_copy_roofline_is_sane_and_rotates_past_three_l2(cuda):
    from sweep.timer import copy_roofline

    a, b = copy_roofline(), copy_roofline()
    t = a.timing
    assert t.sets >= 2 and t.rotated_bytes >= 3 * t.l2_bytes > 0
    assert len(t.samples_us) >= 7 and t.p20_us <= t.median_us <= t.p80_us
    assert 300 < a.gbps < 12000  # HBM-class copy bandwidth, counting read + write
    assert abs(a.gbps - b.gbps) / a.gbps < 0.1  # repeatable within 10 %


def test_kernel_timing_checks_first_rotates_and_stays_under_the_copy_roofline(cuda, tmp_path, monkeypatch):
    from kernels.runner import arch_of
    from sweep.timer import copy_roofline, gbps, l2_bytes, rotation_sets
    from sweep.trial_worker import measure_kernel

    monkeypatch.setenv("LUTFORGE_CACHE_DIR", str(tmp_path / "cache"))
    copy = copy_roofline().gbps
    for p in (Problem("rmsnorm", 16384, 4096), Problem("fused_rmsnorm_silu", 1560, 64)):
        res = measure_kernel(p, heuristic(p, 90), arch_of())
        assert res["status"] == "ok", res.get("error")
        assert len(res["samples_us"]) >= 7 and res["p20_us"] <= res["median_us"] <= res["p80_us"]
        assert gbps(ideal_bytes(p), res["median_us"]) <= 1.03 * copy  # rotation keeps L2 out of the number
    from kernels.runner import make_case

    case = make_case(Problem("fused_rmsnorm_silu", 1560, 64))
    assert rotation_sets(case.nbytes, l2_bytes()) * case.nbytes >= 3 * l2_bytes()


def test_tiny_real_sweep_writes_gpu_rows(cuda, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from sweep.cli import main

    monkeypatch.setenv("LUTFORGE_CACHE_DIR", str(tmp_path / "cache"))
    res = tmp_path / "results"
    r = CliRunner().invoke(main, ["sweep", "--op", "rmsnorm", "--problem-set", "wan_vae", "--out", "bf16",
                                  "--trials", "4", "--limit-shapes", "2", "--results", str(res),
                                  "--compile-workers", "4"])
    assert r.exit_code == 0, r.output
    df = read_results(res)
    assert set(df["backend"]) == {"gpu"} and df["device_name"].notna().all() and df["cutlass_dsl"].notna().all()
    print(r.output)  # the summary table, for the log of a GPU run
    ok = df[df["status"] == "ok"]
    assert len(ok) >= 4 and (ok["pct_copy"] < 103).all()
    assert ok[ok["kind"] == "trial"]["compile_s"].notna().all()  # re-bench rows only re-time
    assert set(df[df["kind"] == "rebench"]["study"]) == set(df[df["kind"] == "trial"]["study"])


def test_bench_times_torch_peers_beside_lutforge(cuda, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from sweep.cli import main

    monkeypatch.setenv("LUTFORGE_CACHE_DIR", str(tmp_path / "cache"))
    res = tmp_path / "bench"
    r = CliRunner().invoke(main, ["bench", "--problem-set", "wan_vae", "--op", "fused_rmsnorm_silu", "--out", "bf16,fp8",
                                  "--limit-shapes", "1", "--peers", "torch_eager,torch_compile", "--results", str(res)])
    assert r.exit_code == 0, r.output
    df = read_results(res)
    assert {"lutforge", "lutforge_heuristic", "torch_eager", "torch_compile"} <= set(df["impl"])
    assert (df[df["impl"].isin(["torch_eager", "torch_compile"])]["status"] == "ok").all(), df[["impl", "error"]]
    print(r.output)


@pytest.mark.parametrize("problem", [
    Problem("rmsnorm", 1000, 4096), Problem("fused_add_rmsnorm", 37, 2048), Problem("rmsnorm_quant", 513, 5120, "bf16", "fp8"),
    Problem("fused_add_rmsnorm_quant", 100, 4096, "bf16", "fp8"), Problem("qk_rmsnorm", 77, 128, "bf16", "bf16", 32),
    Problem("fused_rmsnorm_silu", 1560, 64, "bf16", "nvfp4"), Problem("fused_rmsnorm_silu", 6240, 512, "bf16", "fp8"),
    Problem("rmsnorm_fp4quant", 1560, 64, "bf16", "nvfp4", 1, "swizzled"),
    Problem("rmsnorm_fp4quant", 129, 2048, "bf16", "mxfp4", 1, "rowmajor"),
    ChannelFirstProblem(1, 96, 24960, silu=True, l2norm=True), ChannelFirstProblem(4, 384, 6241, bias=True),
    ChannelFirstProblem(2, 192, 9984, "bf16", "fp8", silu=True, l2norm=True),
], ids=str)
def test_public_op_is_checked_then_timed(cuda, tmp_path, monkeypatch, problem):
    """What the report calls lutforge: the public op on the case tensors, checked against the reference."""
    from sweep.public_op import measure_op

    monkeypatch.setenv("LUTFORGE_CACHE_DIR", str(tmp_path / "cache"))
    res = measure_op(problem)
    assert res["status"] == "ok", res.get("error")
    assert res["median_us"] > 0 and len(res["samples_us"]) >= 7


def test_channel_first_sweep_and_bench_beside_the_torch_peers(cuda, tmp_path, monkeypatch):
    """The channel-first family through the same sweep and bench: checked trials, a re-bench, the public op
    and the torch peers (diffusers' WanRMS_norm maths) on two WAN decoder shapes."""
    from click.testing import CliRunner

    from sweep.cli import main

    monkeypatch.setenv("LUTFORGE_CACHE_DIR", str(tmp_path / "cache"))
    res = tmp_path / "res"
    common = ["--problem-set", "wan_vae_decoder", "--op", "cf_l2norm_silu", "--out", "bf16", "--limit-shapes", "2",
              "--results", str(res)]
    r = CliRunner().invoke(main, ["sweep", *common, "--trials", "6"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["bench", *common, "--peers", "torch_eager,torch_compile"])
    assert r.exit_code == 0, r.output
    df = read_results(res)
    assert set(df["family"]) == {"channel_first"} and (df["N"] >= 1).all()
    ok = df[df["status"] == "ok"]
    assert {"trial", "rebench", "bench"} <= set(ok["kind"])
    assert {"lutforge", "torch_eager", "torch_compile"} <= set(ok[ok["kind"] == "bench"]["impl"])
    print(r.output)
