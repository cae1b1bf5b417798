"""`lutforge report`: numbers computed from a small hand-built results set match hand-computed geomeans
and ratios; synthetic rows are refused or labelled; bad inputs end in a click error."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from kernels.config import KernelConfig
from results_rows import DEVICE, row
from sweep.cli import main
from sweep.report import BEST_PEER, BEST_TRIAL, HEURISTIC, LUTFORGE, load_ok_rows, picks, section_summary
from sweep.results_io import append_rows

A, B, C = (16, 1024), (256, 4096), (4096, 8192)
TUNED_CFG = KernelConfig(threads=256, threads_per_row=128, vec_bytes=16)


def hand(shape, us, gbps, pct, **kw):
    """A row whose time, GB/s and % of copy are the given round numbers (so geomeans are easy by hand)."""
    return row("rmsnorm", "bf16", *shape, us, problem_set="hand", **kw) | dict(median_us=us, gbps=gbps, pct_copy=pct)


def hand_rows():
    rows = []
    # lutforge tuned: re-bench rows stand for the problem, even where a search trial looked faster.
    for shape, us, gbps, pct in ((A, 10, 1000, 25), (B, 20, 2000, 50), (C, 40, 500, 12.5)):
        rows += [hand(shape, us, gbps, pct, kind="rebench", cfg=TUNED_CFG),
                 hand(shape, us / 2, 9999, 99, cfg=TUNED_CFG),
                 hand(shape, 0.1, 1e5, 999, cfg=TUNED_CFG, status="wrong_result")]
    # heuristic (trial 0): times 20, 20, 80 -> tuned speedups 2, 1, 2
    for shape, us, gbps, pct in ((A, 20, 500, 12.5), (B, 20, 2000, 50), (C, 80, 250, 6.25)):
        rows.append(hand(shape, us, gbps, pct, config_source="heuristic", trial=0, cfg=TUNED_CFG))
    bench = dict(kind="bench", config_source="peer", run_id="bench-1")
    # the public op as benched (LUT tier): what the report calls lutforge; as fast as the re-bench here
    rows += [hand(shape, us, gbps, pct, impl="lutforge", cfg=TUNED_CFG, **bench | {"config_source": "lut_exact"})
             for shape, us, gbps, pct in ((A, 10, 1000, 25), (B, 20, 2000, 50), (C, 40, 500, 12.5))]
    # quack on A and C only: times 5, 80 -> speedups 0.5, 2
    rows += [hand(A, 5, 2000, 50, impl="quack", **bench), hand(C, 80, 250, 6.25, impl="quack", **bench)]
    # torch_compile: times 30, 40, 40 -> speedups 3, 2, 1
    rows += [hand(s, us, 1, 1, impl="torch_compile", **bench) for s, us in ((A, 30), (B, 40), (C, 40))]
    return rows


@pytest.fixture
def results(tmp_path):
    append_rows(tmp_path / "r", hand_rows())
    return tmp_path / "r"


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_section_numbers_match_hand_computed_geomeans(results):
    s = section_summary(picks(load_ok_rows(results))).set_index("series")
    assert list(s.index) == [LUTFORGE, BEST_TRIAL, HEURISTIC, "quack", "torch_compile", BEST_PEER]
    assert s.loc[LUTFORGE, "geomean_gbps"] == pytest.approx((1000 * 2000 * 500) ** (1 / 3))  # = 1000
    assert s.loc[LUTFORGE, "geomean_pct_copy"] == pytest.approx(25)
    assert s.loc[LUTFORGE, "geomean_us"] == pytest.approx(20)
    # best trial: the re-bench rows, not the faster-looking search trials
    assert s.loc[BEST_TRIAL, "geomean_us"] == pytest.approx(20) and s.loc[BEST_TRIAL, "speedup"] == pytest.approx(1)
    assert s.loc[HEURISTIC, "geomean_gbps"] == pytest.approx((500 * 2000 * 250) ** (1 / 3))
    assert s.loc[HEURISTIC, "speedup"] == pytest.approx(4 ** (1 / 3))
    assert (s.loc["quack", "speedup"], s.loc["quack", "speedup_shapes"]) == (pytest.approx(1.0), 2)
    assert s.loc["torch_compile", "speedup"] == pytest.approx(6 ** (1 / 3))
    # fastest peer per shape: quack 5 on A, torch_compile 40 on B and C -> speedups 0.5, 2, 1
    assert (s.loc[BEST_PEER, "speedup"], s.loc[BEST_PEER, "speedup_shapes"]) == (pytest.approx(1.0), 3)


def test_markdown_report(results):
    res = run("report", "--results", results, "--worst", "2")
    assert res.exit_code == 0, res.output
    md = res.output
    assert "## hand — rmsnorm → bf16" in md and "3 shapes." in md
    assert "| lutforge | 3 | 20.00 | 1000 | 25.0 | 1 (reference) |" in md
    assert "| best trial | 3 | 20.00 | 1000 | 25.0 | 1.00× (3 shapes) |" in md
    assert "| lutforge heuristic | 3 | 31.75 | 630 | 15.7 | 1.59× (3 shapes) |" in md
    assert "| quack | 2 | 20.00 | 707 | 17.7 | 1.00× (2 shapes) |" in md
    assert "| torch_compile | 3 | 36.34 | 1 | 1.0 | 1.82× (3 shapes) |" in md
    worst = md.split("Worst shapes for lutforge (lowest % of copy, 2 of 3):")[1].splitlines()
    assert worst[4].startswith("| 4096 × 8192, bf16 in | 40.00 | 500 | 12.5 | gpu | threads=256, threads_per_row=128")
    assert worst[5].startswith("| 16 × 1024, bf16 in | 10.00 | 1000 | 25.0 |")
    assert f"| device_name | {DEVICE} |" in md and "| torch | 2.13.0 |" in md and "| runs | bench-1; run-a |" in md
    assert "rows by backend | gpu: 17" in md and "SYNTHETIC" not in md


def test_problem_sets_versions_and_output_file(results, tmp_path):
    append_rows(results, [row("rmsnorm", "bf16", *B, 25.0, problem_set="llm", cfg=TUNED_CFG) | {"torch": "2.14.0"},
                          row("fused_rmsnorm_silu", "fp8", *A, 4.0, problem_set="llm", cfg=TUNED_CFG)])
    out = tmp_path / "docs" / "BENCHMARKS.md"
    res = run("report", "--results", results, "-o", out)
    assert res.exit_code == 0, res.output
    md = out.read_text()
    heads = [line for line in md.splitlines() if line.startswith("## ") and "—" in line]
    assert heads == ["## hand — rmsnorm → bf16", "## llm — fused_rmsnorm_silu → fp8",
                     "## llm — rmsnorm → bf16"]
    llm_rms = md.split("## llm — rmsnorm → bf16")[1]
    # the same problem in another set: its picks (the public op's bench row) stand for it here too
    assert "1 shapes.\n" in llm_rms and "| 256 × 4096, bf16 in | 20.00 | 2000 | 50.0 |" in llm_rms
    fused = md.split("## llm — fused_rmsnorm_silu → fp8")[1].split("\n## ")[0]
    assert "1 shapes. No bench run of the public op here: speedups are against the best trial." in fused
    assert "| torch | 2.13.0; 2.14.0 |" in md
    assert run("report", "--results", results, "--op", "fused_rmsnorm_silu").output.count("\n## ") == 3  # + Targets


def test_sweep_rows_without_impl_count_as_lutforge(tmp_path):
    append_rows(tmp_path, [r | {"impl": None} for r in hand_rows() if r["kind"] != "bench"])
    s = section_summary(picks(load_ok_rows(tmp_path))).set_index("series")
    assert LUTFORGE not in s.index  # no bench run: the best trial is the reference
    assert s.loc[BEST_TRIAL, "geomean_gbps"] == pytest.approx(1000)
    assert s.loc[HEURISTIC, "speedup"] == pytest.approx(4 ** (1 / 3))


def test_synthetic_rows_are_refused_unless_allowed_then_labelled(results):
    append_rows(results, [row("rmsnorm", "bf16", *B, 5.0, problem_set="hand", backend="synthetic",
                              run_id="synth-7", kind="rebench", cfg=TUNED_CFG)])
    res = run("report", "--results", results)
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit)
    assert "1 of 18 ok rows come from the synthetic backend (runs synth-7)" in res.output
    res = run("report", "--results", results, "--allow-synthetic")
    assert res.exit_code == 0, res.output
    assert "**⚠ SYNTHETIC BACKEND — NOT MEASUREMENTS.** 1 of 18 rows" in res.output
    assert "**⚠ 1 of 14 picks here are synthetic-backend rows.**" in res.output
    assert "| best trial ⚠ synthetic | 3 |" in res.output and "gpu: 17; synthetic: 1" in res.output


def bad_schema_version(d):
    d.mkdir()
    pq.write_table(pa.table({"schema_version": pa.array([99], pa.int32())}), d / "x.parquet")


def missing_columns(d):
    d.mkdir()
    pq.write_table(pa.table({"schema_version": pa.array([1], pa.int32()), "op": ["rmsnorm"]}), d / "x.parquet")


@pytest.mark.parametrize("make, args, message", [
    (lambda d: None, (), "does not exist"),
    (lambda d: d.mkdir(), (), "no Parquet files"),
    (bad_schema_version, (), "schema version [99]"),
    (missing_columns, (), "rows lack columns"),
    (lambda d: append_rows(d, [row("rmsnorm", "bf16", *A, 1.0, status="timeout")]), (), "statuses: timeout: 1"),
    (lambda d: append_rows(d, hand_rows()), ("--op", "qk_rmsnorm"), "ops there: rmsnorm"),
    (lambda d: append_rows(d, hand_rows()), ("--op", "nonsense"), "Invalid value for '--op'"),
    (lambda d: append_rows(d, hand_rows()), ("--worst", "-1"), "Invalid value for '--worst'"),
    (lambda d: append_rows(d, [row("rmsnorm", "bf16", *A, 1.0) | {"op": "layernorm"}]), (), "does not know: layernorm"),
    (lambda d: append_rows(d, [row("rmsnorm", "bf16", *A, 1.0, kind="bench") | {"impl": None}]), (),
     "1 ok rows have no impl"),
])
def test_bad_inputs_end_in_a_click_error(tmp_path, make, args, message):
    d = tmp_path / "results"
    make(d)
    res = run("report", "--results", d, *args)
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), res.output
    assert message in res.output


def test_host_section_judges_each_run_against_torch_in_that_run():
    import pandas as pd

    from sweep.report import render_host

    def row(run, op, out, impl, us):
        return {"run_id": run, "op": op, "out_format": out, "in_dtype": "bf16", "scale_layout": "rowmajor",
                "heads": 1, "T": 1, "C": 4096, "impl": impl, "host_us": us}
    host = pd.DataFrame([row("a", "rmsnorm", "bf16", "lutforge", 8.0), row("a", "rmsnorm", "bf16", "torch_rms_norm", 9.0),
                         row("b", "rmsnorm", "bf16", "lutforge", 14.0), row("b", "rmsnorm", "bf16", "torch_rms_norm", 15.0),
                         row("a", "rmsnorm_fp4quant", "nvfp4", "lutforge", 19.0),
                         row("a", "rmsnorm_fp4quant", "nvfp4", "torch_rms_norm", 9.0)])
    text = "\n".join(render_host(host))
    assert "| rmsnorm | bf16 | 1 × 4096, bf16 in | 11.0 | 12.0 | 0.91 | yes |" in text  # slower machine in run b: ratio holds
    assert "| rmsnorm_fp4quant | nvfp4 | 1 × 4096, rowmajor scales, bf16 in | 19.0 | 9.0 | 2.11 | **no** |" in text  # FP4: 2x budget
    assert "within budget on 1 of 2 problems" in text
    assert render_host(host.iloc[0:0]) == []


def test_the_public_op_stands_by_its_newest_bench(tmp_path):
    """A later bench that got slower (a LUT change) is what users get now; the faster old one must not hide it."""
    old = hand(A, 5, 2000, 50, impl="lutforge", kind="bench", config_source="lut_exact", run_id="bench-old",
               cfg=TUNED_CFG) | {"timestamp": "2026-11-20T10:00:00Z"}
    new = hand(A, 9, 1100, 27, impl="lutforge", kind="bench", config_source="lut_range", run_id="bench-new",
               cfg=TUNED_CFG) | {"timestamp": "2026-11-23T10:00:00Z"}
    append_rows(tmp_path, [old, new])
    p = picks(load_ok_rows(tmp_path))
    ours = p[p["series"] == LUTFORGE]
    assert len(ours) == 1 and ours.iloc[0]["run_id"] == "bench-new" and ours.iloc[0]["median_us"] == 9


def test_host_rows_of_an_older_kernel_source_drop_out(tmp_path):
    """A host run on a newer call path (fused_moe's expert-id check stopped syncing) replaces the older runs of
    that problem instead of being averaged with them; problems the new run did not measure keep their rows."""
    from sweep.report import load_host_rows, render_host

    def host(run, C, impl, us, src, ts):
        return {"run_id": run, "kind": "host", "status": "ok", "impl": impl, "op": "rmsnorm", "out_format": "bf16",
                "in_dtype": "bf16", "scale_layout": "rowmajor", "heads": 1, "T": 1, "C": C, "host_us": us,
                "kernel_source": src, "timestamp": ts, "device_name": DEVICE}
    append_rows(tmp_path, [host("old", 4096, "lutforge", 3300.0, "s1", "2026-11-01T00:00:00Z"),
                           host("old", 4096, "torch_rms_norm", 10.0, "s1", "2026-11-01T00:00:00Z"),
                           host("old", 2048, "lutforge", 9.0, "s1", "2026-11-01T00:00:00Z"),
                           host("new", 4096, "lutforge", 40.0, "s2", "2026-12-01T00:00:00Z")], prefix="host")
    rows = load_host_rows(tmp_path, DEVICE)
    assert sorted(zip(rows["run_id"], rows["C"])) == [("new", 4096), ("old", 2048)]
    text = "\n".join(render_host(rows))
    assert "| rmsnorm | bf16 | 1 × 4096, bf16 in | 40.0 | – | – |" in text  # no torch row left: not judged


def test_public_op_rows_of_a_config_the_runtime_no_longer_dispatches_are_flagged(tmp_path):
    """A bench row of the public op stands for what a user's call gets only while dispatch still returns the
    config it timed; after a LUT export or heuristic change the report says how many rows predate it."""
    from kernels.dispatch import select_config
    from kernels.problem import Problem
    from sweep.report import render_report, stale_dispatch

    now = {s: select_config(Problem("rmsnorm", *s), 90, "h100")[0] for s in (A, B, C)}
    other = KernelConfig(threads=512, threads_per_row=512, vec_bytes=2)
    assert all(c != other for c in now.values())
    bench = dict(kind="bench", impl="lutforge", config_source="lut_exact", run_id="bench-1")
    rows = [hand(A, 10, 1000, 25, cfg=now[A], **bench), hand(B, 20, 2000, 50, cfg=other, **bench),
            hand(C, 40, 500, 12.5, cfg=other, **bench)]
    append_rows(tmp_path, rows)
    ok = load_ok_rows(tmp_path)
    assert sorted(stale_dispatch(picks(ok))["T"]) == [B[0], C[0]]
    assert "2 of 3 public-op rows timed a config the runtime of this checkout no longer dispatches" in \
        render_report(ok)
