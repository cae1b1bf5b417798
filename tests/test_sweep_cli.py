"""`lutforge sweep` / `lutforge bench` end to end on the synthetic backend, and their input errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pandas as pd
import pytest
from click.testing import CliRunner

from kernels.config import KNOB_CHOICES, KernelConfig, heuristic
from kernels.family import families
from sweep.cli import main
from sweep.results_io import read_results
from sweep.schema import STATUSES, knob_columns
from sweep.study import study_name
from sweep.sweep_cmd import kernel_groups, select_problems, spread_order
from sweep.synthetic import FAULTS_ENV

from sweep_helpers import CLI, REPO, assert_one_row_per_trial, cli_env, run_cli, studies


def test_wan_vae_synthetic_sweep_end_to_end(tmp_path):
    res = tmp_path / "results"
    r = CliRunner().invoke(main, ["sweep", "--op", "fused_rmsnorm_silu", "--problem-set", "wan_vae",
                                  "--out", "bf16,fp8", "--backend", "synthetic", "--trials", "2",
                                  "--results", str(res), "--seed", "1"])
    assert r.exit_code == 0, r.output
    problems, skipped = select_problems("wan_vae", ["fused_rmsnorm_silu"], ["bf16", "fp8"], "bf16", None)
    assert len(problems) == 80 and not skipped
    table = [ln for ln in r.output.splitlines() if ln.startswith("fused_rmsnorm_silu")]
    assert len(table) == 80  # one summary line per problem

    df = read_results(res)
    url = f"sqlite:///{res / 'optuna.db'}"
    assert_one_row_per_trial(url, df)
    assert set(df["backend"]) == {"synthetic"} and set(df["status"]) <= set(STATUSES)
    assert set(df["problem_set"]) == {"wan_vae"}
    trials = df[df["kind"] == "trial"]
    assert set(trials["study"]) == {study_name(p, "synthetic") for p, _ in problems}

    ok = df[df["status"] == "ok"]
    assert len(ok) and ok[["median_us", "p20_us", "p80_us", "gbps", "pct_copy", "copy_gbps"]].notna().all().all()
    assert (ok["p20_us"] <= ok["median_us"]).all() and (ok["median_us"] <= ok["p80_us"]).all()
    assert ((ok["gbps"] - ok["bytes"] / (ok["median_us"] * 1e-6) / 1e9).abs() < 1e-6 * ok["gbps"]).all()
    assert (ok["pct_copy"] <= 100.0).all()  # the model never beats its own copy roofline
    assert ok[knob_columns(families()["row"])].notna().all().all()
    bad = df[df["status"] != "ok"]
    assert bad["median_us"].isna().all() and bad["gbps"].isna().all() and bad["error"].notna().all()
    for _, row in df[df["status"] == "invalid"].iterrows():
        assert row["error"].startswith("no valid config has")  # the reason, from kernels.config.violations
        assert row["knob_threads"] in KNOB_CHOICES["threads"]
    # Trial 0 of every study is the heuristic; every study re-benchmarked its finalists with it.
    heur = trials[trials["trial"] == 0]
    assert len(heur) == 80 and set(heur["config_source"]) == {"heuristic"}
    for _, row in heur.iterrows():
        p = next(p for p, _ in problems if study_name(p, "synthetic") == row["study"])
        assert KernelConfig(**{k: row[f"knob_{k}"] for k in KNOB_CHOICES}) == heuristic(p, 90)
    rebench = df[df["kind"] == "rebench"]
    assert set(rebench["study"]) == set(trials["study"])
    for st in studies(url).values():
        assert st.user_attrs["rebench"]["median_us"] > 0

    # A second run resumes: nothing left to do, so no trial and no row is added.
    n_trials = {n: len(s.trials) for n, s in studies(url).items()}
    r2 = CliRunner().invoke(main, ["sweep", "--op", "fused_rmsnorm_silu", "--problem-set", "wan_vae",
                                   "--out", "bf16,fp8", "--backend", "synthetic", "--trials", "2",
                                   "--results", str(res)])
    assert r2.exit_code == 0, r2.output
    assert {n: len(s.trials) for n, s in studies(url).items()} == n_trials
    assert len(read_results(res)) == len(df)


def _trial_rows(res, study):
    df = read_results(res)
    return df[(df["kind"] == "trial") & (df["study"] == study)].set_index("trial")


def test_faulting_trials_are_recorded_and_the_sweep_continues(tmp_path):
    """abort in the timing process -> runtime_error, hang -> timeout (process killed), wrong output ->
    wrong_result, compiler failure -> compile_error; every other trial still measures ok."""
    problems, _ = select_problems("wan_vae", ["rmsnorm"], ["bf16"], "bf16", 4)
    faults = []
    for (p, _), kind in zip(problems, ["abort", "hang", "wrong", "compile_error"]):
        faults.append({"when": {"T": p.T, "C": p.C, **heuristic(p, 90).as_dict()}, "fault": kind})
    res = tmp_path / "results"
    r = run_cli(["sweep", "--op", "rmsnorm", "--problem-set", "wan_vae", "--out", "bf16", "--backend", "synthetic",
                 "--trials", "3", "--limit-shapes", "4", "--results", str(res), "--trial-timeout", "3"],
                **{FAULTS_ENV: json.dumps(faults)})
    assert r.returncode == 0, r.stderr
    expected = {"abort": ("runtime_error", "SIGABRT"), "hang": ("runtime_error", ""), "wrong": ("wrong_result", ""),
                "compile_error": ("compile_error", "injected synthetic compile error")}
    expected["hang"] = ("timeout", "process killed")
    for (p, _), f in zip(problems, faults):
        rows = _trial_rows(res, study_name(p, "synthetic"))
        status, text = expected[f["fault"]]
        assert rows.loc[0, "status"] == status and text in rows.loc[0, "error"], rows.loc[0, "error"]
        assert (rows.drop(index=0)["status"].isin(["ok", "invalid"])).all()
        assert (rows["status"] == "ok").sum() >= 2  # the sweep went on after the fault
    assert_one_row_per_trial(f"sqlite:///{res / 'optuna.db'}", read_results(res))


@pytest.mark.gpu
def test_a_real_illegal_address_fault_costs_one_trial_on_the_gpu(tmp_path):
    """A trial whose kernel stores far out of bounds (sweep/gpu_faults.py) poisons the timing process's CUDA
    context: it is recorded runtime_error, the process restarts, and every other trial still measures ok."""
    from sweep.gpu_faults import FAULTS_ENV as GPU_FAULTS_ENV

    problems, _ = select_problems("wan_vae", ["rmsnorm"], ["bf16"], "bf16", 2)
    p = problems[0][0]
    when = {"T": p.T, "C": p.C, **heuristic(p, 90).as_dict()}
    res = tmp_path / "results"
    r = run_cli(["sweep", "--op", "rmsnorm", "--problem-set", "wan_vae", "--out", "bf16", "--trials", "3",
                 "--limit-shapes", "2", "--results", str(res), "--compile-workers", "4"], timeout=600,
                **{GPU_FAULTS_ENV: json.dumps([{"when": when, "fault": "illegal_address"}]),
                   "LUTFORGE_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-3000:]
    device_class = read_results(res)["device_class"].iloc[0]
    faulted = _trial_rows(res, study_name(p, device_class))
    assert faulted.loc[0, "status"] == "runtime_error", faulted.loc[0, "error"]
    assert "illegal" in faulted.loc[0, "error"].lower(), faulted.loc[0, "error"]
    assert (faulted.drop(index=0)["status"] == "ok").sum() >= 2  # the same study went on after the restart
    other = _trial_rows(res, study_name(problems[1][0], device_class))
    assert (other["status"] == "ok").all() and len(other) >= 2
    assert_one_row_per_trial(f"sqlite:///{res / 'optuna.db'}", read_results(res))


def test_bench_synthetic_times_dispatch_and_heuristic_and_lists_skipped_peers(tmp_path):
    res = tmp_path / "b"
    r = CliRunner().invoke(main, ["bench", "--problem-set", "wan_vae", "--op", "fused_rmsnorm_silu", "--out", "fp8",
                                  "--backend", "synthetic", "--limit-shapes", "2", "--results", str(res),
                                  "--peers", "torch_eager,flashinfer"])
    assert r.exit_code == 0, r.output
    df = read_results(res)
    assert set(df["kind"]) == {"bench"} and set(df["impl"]) == {"lutforge", "lutforge_heuristic"}
    assert (df["status"] == "ok").all() and (df["trial"] == -1).all()
    assert set(df["config_source"]) <= {"lut_exact", "lut_range", "heuristic"}
    assert "skipped torch_eager" in r.output and "skipped flashinfer" in r.output


def test_bench_stale_re_measures_only_rows_a_dispatch_change_left_behind(tmp_path):
    """After a LUT export or heuristic change, `bench --stale` times the problems whose newest public-op row
    names a config the runtime no longer dispatches, and no others."""
    from sweep.results_io import append_rows

    res = tmp_path / "b"
    args = ["bench", "--op", "rmsnorm", "--out", "bf16", "--shapes", "16x1024,256x4096", "--backend", "synthetic",
            "--peers", "none", "--results", str(res)]
    assert CliRunner().invoke(main, args).exit_code == 0
    first = read_results(res)
    r = CliRunner().invoke(main, args + ["--stale"])
    assert r.exit_code == 0 and "--stale: 0 of 2 problems" in r.output and len(read_results(res)) == len(first)
    # a later row of the public op at 256x4096 on a config dispatch does not return: what a bench before a LUT
    # change leaves
    row = {k: None if pd.isna(v) else v
           for k, v in first[(first["impl"] == "lutforge") & (first["T"] == 256)].iloc[0].to_dict().items()}
    other = KernelConfig(threads=512, threads_per_row=512, vec_bytes=2)
    row |= {f"knob_{k}": v for k, v in other.as_dict().items()} | {"timestamp": "2099-01-01T00:00:00+00:00"}
    append_rows(res, [row], prefix="bench")
    r = CliRunner().invoke(main, args + ["--stale"])
    assert r.exit_code == 0 and "--stale: 1 of 2 problems" in r.output, r.output
    new = read_results(res).loc[lambda d: ~d["run_id"].isin(set(first["run_id"]))]
    assert set(new["T"]) == {256} and set(new["impl"]) == {"lutforge", "lutforge_heuristic"}


def test_wall_budget_stops_the_search_then_rebenches_what_it_reached(tmp_path):
    res = tmp_path / "results"
    t0 = time.monotonic()
    r = run_cli(["sweep", "--op", "fused_rmsnorm_silu", "--problem-set", "wan_vae", "--out", "bf16,fp8",
                 "--backend", "synthetic", "--trials", "100", "--wall-budget", "10", "--results", str(res)])
    wall = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    df = read_results(res)
    trials, rebench = df[df["kind"] == "trial"], df[df["kind"] == "rebench"]
    reached = set(trials["study"])
    assert 0 < len(reached) < 80 and len(trials) < 80 * 100  # the budget, not the trial count, ended it
    assert set(rebench["study"]) == {s for s in reached if (trials[trials["study"] == s]["status"] == "ok").any()}
    assert wall < 10 + 60  # start-up, the last trials in flight and the re-bench


def test_wall_budget_leaves_time_for_the_rebench_of_what_the_search_reached(tmp_path):
    # Every timing takes 0.3 s, so re-benchmarking 4 problems (finalist + heuristic, 3 rounds) costs ~7 s of
    # a 15 s budget: the search must stop early enough for it, not at the budget's end.
    res, budget = tmp_path / "results", 15.0
    proc = subprocess.Popen(CLI + ["sweep", "--op", "fused_rmsnorm_silu", "--problem-set", "wan_vae", "--out", "bf16",
                                   "--backend", "synthetic", "--trials", "500", "--limit-shapes", "4", "--finalists",
                                   "1", "--compile-workers", "2", "--wall-budget", str(budget), "--results", str(res)],
                            cwd=REPO, env=cli_env(**{FAULTS_ENV: json.dumps([{"when": {}, "fault": "slow"}])}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()  # "sweep <run id>: ...", printed as the budget starts (imports are before it)
    t0 = time.time()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and first.startswith("sweep "), first + err
    df = read_results(res)
    stamp = lambda kind: pd.to_datetime(df[df["kind"] == kind]["timestamp"]).map(lambda t: t.timestamp())
    trials, rebench = stamp("trial"), stamp("rebench")
    # Every problem the search reached (timed ok at least once) was re-benchmarked. How many it reaches
    # depends on the machine's start-up time (a loaded CI box takes ~8 s of the 15 before the first trial).
    timed = df[(df["kind"] == "trial") & (df["status"] == "ok")]["study"]
    assert set(df[df["kind"] == "rebench"]["study"]) == set(timed) and timed.nunique() >= 1
    assert rebench.max() <= t0 + budget + 2.0  # ... within the budget (the last trials in flight: < 1 s)
    assert trials.max() >= t0 + budget / 3  # and the search used the time the re-bench left it
    assert len(trials) < 4 * 500
    # Trials stopped untimed by the budget (those waiting for the GPU when it ran out) hand their configs
    # back: a resume measures them, never calls them duplicates.
    first = studies(f"sqlite:///{res / 'optuna.db'}").values()
    assert any(t.user_attrs.get("unmeasured") for s in first for t in s.get_trials(deepcopy=False))
    r = run_cli(["sweep", "--op", "fused_rmsnorm_silu", "--problem-set", "wan_vae", "--out", "bf16", "--backend",
                 "synthetic", "--trials", "40", "--limit-shapes", "4", "--results", str(res)])
    assert r.returncode == 0, r.stderr
    for study in studies(f"sqlite:///{res / 'optuna.db'}").values():
        ts = study.get_trials(deepcopy=False)
        assert not [t for t in ts if t.user_attrs.get("duplicate_of") is not None
                    and ts[t.user_attrs["duplicate_of"]].user_attrs.get("unmeasured")]
    assert_one_row_per_trial(f"sqlite:///{res / 'optuna.db'}", read_results(res))


def test_scale_layouts_select_swizzled_problems_only_for_ops_that_write_fp4_scales():
    problems, skipped = select_problems("wan_vae", ["rmsnorm_fp4quant", "fused_rmsnorm_silu"], ["nvfp4"], "bf16", 2,
                                        ("rowmajor", "swizzled"))
    got = sorted((p.op, p.scale_layout) for p, _ in problems)
    assert got == [("fused_rmsnorm_silu", "rowmajor")] * 2 + [("rmsnorm_fp4quant", "rowmajor")] * 2 \
        + [("rmsnorm_fp4quant", "swizzled")] * 2
    assert any(s.startswith("fused_rmsnorm_silu/nvfp4/swizzled") for s in skipped)
    r = CliRunner().invoke(main, ["sweep", "--op", "rmsnorm", "--problem-set", "wan_vae", "--out", "bf16",
                                  "--backend", "synthetic", "--scale-layout", "diagonal"])
    assert r.exit_code != 0 and "unknown scale layouts ['diagonal']" in r.output


def test_a_bench_stopped_by_sigterm_keeps_the_rows_it_measured(tmp_path):
    """The last problem's heuristic hangs; SIGTERM (as `timeout` sends) while it hangs still leaves the
    rows of the problems measured before it in Parquet."""
    problems, _ = select_problems("wan_vae", ["rmsnorm"], ["bf16"], "bf16", 3)
    p = problems[-1][0]
    faults = [{"when": {"T": p.T, "C": p.C, **heuristic(p, 90).as_dict()}, "fault": "hang"}]
    res = tmp_path / "b"
    proc = subprocess.Popen(CLI + ["bench", "--problem-set", "wan_vae", "--op", "rmsnorm", "--out", "bf16",
                                   "--backend", "synthetic", "--limit-shapes", "3", "--results", str(res),
                                   "--peers", "torch_eager", "--trial-timeout", "120"],
                            cwd=REPO, env=cli_env(**{FAULTS_ENV: json.dumps(faults)}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(20)  # the synthetic backend measures the first problems in well under this; then it hangs
    assert proc.poll() is None, proc.communicate()[0]
    assert not list(res.glob("*.parquet"))  # the row writer batches: nothing is flushed yet
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out
    df = read_results(res)
    assert set(df["status"]) == {"ok"} and len(df) >= 2 * (len(problems) - 1)
    assert set(zip(df["T"], df["C"])) >= {(q.T, q.C) for q, _ in problems[:-1]}


def test_sigterm_to_the_whole_process_group_stops_a_sweep_without_failing_trials(tmp_path):
    """`timeout` and Ctrl-C signal every process of the group: the compile and timing children must not die
    mid-trial and turn valid configs into runtime_error rows. The sweep stops promptly; its cut-off trials
    leave no row and are measured by the resume."""
    res = tmp_path / "results"
    args = ["sweep", "--op", "fused_rmsnorm_silu", "--problem-set", "wan_vae", "--out", "bf16", "--backend",
            "synthetic", "--trials", "30", "--limit-shapes", "4", "--compile-workers", "2", "--results", str(res)]
    slow = {FAULTS_ENV: json.dumps([{"when": {}, "fault": "slow"}])}  # every timing 0.3 s
    proc = subprocess.Popen(CLI + args, cwd=REPO, env=cli_env(**slow), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    db, deadline = res / "optuna.db", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # start-up (slow on a loaded box), then some trials
        time.sleep(0.5)
        if db.exists():
            import sqlite3
            with sqlite3.connect(db) as con:
                try:
                    if con.execute("select count(*) from trials where state = 'COMPLETE'").fetchone()[0] >= 3:
                        break
                except sqlite3.OperationalError:  # tables not created yet
                    pass
    assert proc.poll() is None, proc.communicate()[0]
    os.killpg(proc.pid, signal.SIGTERM)
    t0 = time.monotonic()
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert time.monotonic() - t0 < 15, out  # stopped now, not after the studies' budgets
    first = read_results(res)
    assert 0 < len(first) < 4 * 30 and set(first["status"]) == {"ok"}
    r = run_cli(args)  # the resume at full speed: the slow timings only had to keep trials in flight for the signal
    assert r.returncode == 0, r.stderr
    df = read_results(res)
    assert set(df["status"]) == {"ok"}
    assert_one_row_per_trial(f"sqlite:///{res / 'optuna.db'}", df)


@pytest.mark.parametrize("args, message", [
    (["sweep", "--op", "rmsnorm", "--problem-set", "wan_vae", "--out", "bf16"], "needs a CUDA GPU"),
    (["sweep", "--op", "rmsnorm", "--problem-set", "nope", "--out", "bf16", "--backend", "synthetic"],
     "unknown problem set"),
    (["sweep", "--op", "nope", "--problem-set", "wan_vae", "--out", "bf16", "--backend", "synthetic"], "unknown ops"),
    (["sweep", "--op", "rmsnorm", "--problem-set", "wan_vae", "--out", "nvfp4", "--backend", "synthetic"],
     "no problem to sweep"),
    (["sweep", "--op", "rmsnorm", "--problem-set", "wan_vae", "--out", "bf16", "--backend", "synthetic",
      "--gpus", "a,b"], "non-negative integers"),
    (["sweep", "--op", "rmsnorm", "--problem-set", "wan_vae", "--out", "bf16", "--backend", "synthetic",
      "--storage", "nodb"], "cannot open storage"),
    (["sweep", "--op", "rmsnorm", "--problem-set", "wan_vae", "--out", "bf16", "--backend", "synthetic",
      "--trials", "0"], "--trials"),
    (["bench", "--op", "rmsnorm", "--problem-set", "wan_vae", "--out", "bf16", "--peers", "bogus"], "unknown peers"),
    (["bench", "--op", "rmsnorm", "--problem-set", "wan_vae", "--out", "bf16"], "needs a CUDA GPU"),
])
def test_bad_input_is_a_clear_error_not_a_traceback(tmp_path, args, message):
    r = CliRunner().invoke(main, args + ["--results", str(tmp_path / "r")])
    assert r.exit_code != 0
    assert message in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_skip_swept_resumes_from_parquet_without_the_study_database(tmp_path):
    res = tmp_path / "results"
    args = ["sweep", "--op", "rmsnorm", "--problem-set", "llm", "--out", "bf16", "--backend", "synthetic",
            "--trials", "2", "--limit-shapes", "3", "--results", str(res)]
    assert run_cli(args).returncode == 0
    first = read_results(res)
    (res / "optuna.db").unlink()  # the database is not committed; the Parquet rows are
    r = run_cli(args + ["--skip-swept"])
    assert r.returncode == 0, r.stderr
    assert "3 of 3 problems already swept" in r.stderr
    assert len(read_results(res)) == len(first)  # nothing measured again
    r = run_cli(args[:-4] + ["--limit-shapes", "5", "--results", str(res), "--skip-swept"])
    assert r.returncode == 0, r.stderr
    three = {study_name(p, "synthetic") for p, _ in select_problems("llm", ["rmsnorm"], ["bf16"], "bf16", 3)[0]}
    five = {study_name(p, "synthetic") for p, _ in select_problems("llm", ["rmsnorm"], ["bf16"], "bf16", 5)[0]}
    assert f"{len(three & five)} of 5 problems already swept" in r.stderr and three & five
    df = read_results(res)
    assert set(df["study"]) - set(first["study"]) == five - three  # only the new shapes were swept


def test_kernel_groups_take_every_op_in_turn():
    problems, _ = select_problems("llm", ["rmsnorm", "rmsnorm_quant"], ["bf16", "fp8"], "bf16", None, ("rowmajor",))
    groups = kernel_groups(problems)
    flat = [p for g in groups for p in g]
    assert len(flat) == len(problems) and set(flat) == set(problems)  # every problem once
    for g in groups:  # one compiled kernel per group
        assert len({(p.op, p.out_format, p.C) for p, _ in g}) == 1
    ops = [g[0][0].op for g in groups]
    n = min(ops.count("rmsnorm"), ops.count("rmsnorm_quant"))
    assert set(zip(ops[:2 * n:2], ops[1:2 * n:2])) == {("rmsnorm", "rmsnorm_quant")}  # alternating
    sizes = [g[0][0].C for g in groups if g[0][0].op == "rmsnorm"]
    # spread over the set's sizes: its smallest and largest first, then the middle, so a cut-off sweep spans them
    assert sizes[:2] == [min(sizes), max(sizes)] and min(sizes) < sizes[2] < max(sizes)


def test_spread_order_halves_the_gaps_in_turn():
    assert spread_order([]) == [] and spread_order(["a"]) == ["a"]
    assert spread_order(list(range(9))) == [0, 8, 4, 2, 6, 1, 3, 5, 7]
    for n in range(12):
        assert sorted(spread_order(list(range(n)))) == list(range(n))  # each item once


def test_shapes_inline_and_a_problem_set_file_of_ones_own(tmp_path):
    problems, skipped = select_problems(None, ["rmsnorm", "qk_rmsnorm"], ["bf16"], "bf16", None,
                                        shapes=[(1, 4096, None), (32, 8192, None), (4, 128, 32)])
    assert sorted((p.op, p.T, p.C, p.heads) for p, _ in problems) == [
        ("qk_rmsnorm", 4, 128, 32), ("rmsnorm", 1, 4096, 1), ("rmsnorm", 32, 8192, 1)]
    assert {s for _, s in problems} == {"inline"} and not skipped
    res = tmp_path / "results"
    r = CliRunner().invoke(main, ["sweep", "--op", "rmsnorm", "--shapes", "1x4096,32x8192", "--out", "bf16",
                                  "--backend", "synthetic", "--trials", "2", "--results", str(res)])
    assert r.exit_code == 0, r.output
    df = read_results(res)
    assert sorted(set(zip(df["T"], df["C"]))) == [(1, 4096), (32, 8192)] and set(df["problem_set"]) == {"inline"}
    own = tmp_path / "llama70b.toml"
    own.write_text('description = "Llama-70B norms"\n[axes]\nhidden = [8192]\ntokens = [1, 64]\n')
    r = CliRunner().invoke(main, ["sweep", "--op", "rmsnorm", "--problem-set", str(own), "--out", "bf16",
                                  "--backend", "synthetic", "--trials", "2", "--results", str(tmp_path / "r2")])
    assert r.exit_code == 0, r.output
    df = read_results(tmp_path / "r2")
    assert sorted(set(zip(df["T"], df["C"]))) == [(1, 8192), (64, 8192)] and set(df["problem_set"]) == {"llama70b"}
    for args, needle in ((["--shapes", "1x"], "TxC"), (["--problem-set", str(tmp_path / "nope.toml")], "does not exist"),
                         (["--problem-set", "wan_vae", "--shapes", "1x64"], "exactly one"), ([], "exactly one")):
        r = CliRunner().invoke(main, ["sweep", "--op", "rmsnorm", "--out", "bf16", "--backend", "synthetic", *args])
        assert r.exit_code != 0 and needle in r.output, (args, r.output)
