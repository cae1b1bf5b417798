"""Result files across schema versions, and rows of a replaced kernel source dropping out per problem."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kernels.compile_cache import kernel_source_hash
from kernels.config import KernelConfig, heuristic
from lut_export.export import export_lut
from kernels.problem import Problem
from sweep.results_io import append_rows, current_kernel_rows, problem_key, read_results, superseded, swept_keys
from sweep.schema import SCHEMA, SCHEMA_VERSION
from lut_export.winners import row_config

from results_rows import row

CFG_OLD = KernelConfig(threads=128, threads_per_row=32, vec_bytes=16)
CFG_NEW = KernelConfig(threads=256, threads_per_row=32, vec_bytes=8)


def _write_v1(path, rows):
    """A file as schema v1 wrote it: no kernel_source or l2_prefetch column, version 1."""
    fields = [f for f in SCHEMA if f.name not in ("kernel_source", "knob_l2_prefetch")]
    full = [{f.name: r.get(f.name) for f in fields} | {"schema_version": 1} for r in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(full, schema=pa.schema(fields)), path)


def test_v1_files_read_with_an_empty_kernel_source(tmp_path):
    _write_v1(tmp_path / "old.parquet", [row("rmsnorm", "bf16", 1560, 64, 2.0, cfg=CFG_OLD)])
    append_rows(tmp_path, [row("rmsnorm", "bf16", 1560, 128, 3.0, cfg=CFG_OLD) | {"kernel_source": "abc"}])
    df = read_results(tmp_path).sort_values("C")
    assert df["schema_version"].tolist() == [1, SCHEMA_VERSION]
    assert df["kernel_source"].isna().tolist() == [True, False]


def test_older_rows_read_the_value_their_kernel_ran_with_for_knobs_added_later(tmp_path):
    """A v1/v2 kernel had no L2 prefetch: its rows read l2_prefetch=False, peer rows (no knobs) stay empty."""
    _write_v1(tmp_path / "old.parquet", [row("rmsnorm", "bf16", 1560, 64, 2.0, cfg=CFG_OLD),
                                         row("rmsnorm", "bf16", 1560, 64, 3.0) | {"impl": "quack"}])
    df = read_results(tmp_path)
    ours, peer = df[df["knob_threads"].notna()], df[df["knob_threads"].isna()]
    assert len(ours) == 1 and len(peer) == 1
    assert ours["knob_l2_prefetch"].tolist() == [False]
    assert peer["knob_l2_prefetch"].isna().all()
    assert row_config(ours.iloc[0]) == CFG_OLD


def test_files_of_no_rows_are_skipped_and_a_directory_of_only_those_is_refused(tmp_path):
    _write_v1(tmp_path / "empty.parquet", [])
    with pytest.raises(ValueError, match="no rows in the Parquet files"):
        read_results(tmp_path)
    append_rows(tmp_path, [row("rmsnorm", "bf16", 1560, 128, 3.0, cfg=CFG_OLD) | {"kernel_source": "abc"}])
    assert read_results(tmp_path)["C"].tolist() == [128]


def test_unknown_schema_versions_are_refused(tmp_path):
    _write_v1(tmp_path / "old.parquet", [row("rmsnorm", "bf16", 1560, 64, 2.0) | {"schema_version": 99}])
    t = pq.read_table(tmp_path / "old.parquet")
    pq.write_table(t.set_column(0, "schema_version", pa.array([99], pa.int32())), tmp_path / "old.parquet")
    with pytest.raises(ValueError, match=r"schema version \[99\]"):
        read_results(tmp_path)


def _rows():
    """Problem A measured on a v1 kernel (old) and later on source 'new'; problem B only on the old one;
    a quack bench row on A from before the kernel changed."""
    old = dict(timestamp="2026-11-20T10:00:00Z")
    new = dict(timestamp="2026-11-23T10:00:00Z", kernel_source="new")
    return [
        row("fused_rmsnorm_silu", "bf16", 6240, 160, 3.0, cfg=CFG_OLD) | old,   # A, old kernel, fastest number
        row("fused_rmsnorm_silu", "bf16", 6240, 160, 3.5, cfg=CFG_NEW) | new,   # A, current kernel
        row("fused_rmsnorm_silu", "bf16", 399360, 128, 1.7, cfg=CFG_OLD) | old,   # B, only measured before
        row("fused_rmsnorm_silu", "bf16", 6240, 160, 4.0, kind="bench", impl="quack", config_source="peer") | old,
    ]


def test_rows_of_a_replaced_kernel_source_drop_out_per_problem(tmp_path):
    _write_v1(tmp_path / "old.parquet", [r for r in _rows() if "kernel_source" not in r])
    append_rows(tmp_path, [r for r in _rows() if "kernel_source" in r])
    cur = current_kernel_rows(read_results(tmp_path))
    a = cur[cur["T"] == 6240]
    assert sorted(a["impl"]) == ["lutforge", "quack"]  # the peer row stays
    assert a.loc[a["impl"] == "lutforge", "median_us"].tolist() == [3.5]
    assert cur.loc[cur["T"] == 399360, "median_us"].tolist() == [1.7]  # no newer source measured B


def test_export_takes_winners_from_the_current_kernel_source(tmp_path):
    # Each problem's heuristic was timed beside the configs (slower): export only trusts winners compared with it.
    heur = [row("fused_rmsnorm_silu", "bf16", T, C, 9.0, config_source="heuristic",
                cfg=heuristic(Problem("fused_rmsnorm_silu", T, C), 90)) for T, C in ((6240, 160), (399360, 128))]
    _write_v1(tmp_path / "res" / "old.parquet", [r for r in _rows() if "kernel_source" not in r] + heur[1:] +
              [heur[0] | dict(timestamp="2026-11-20T10:00:00Z")])
    append_rows(tmp_path / "res", [r for r in _rows() if "kernel_source" in r]
                + [heur[0] | dict(timestamp="2026-11-23T10:00:00Z", kernel_source="new")])
    out = tmp_path / "sm90_h100.py"
    export_lut(tmp_path / "res", out, arch="sm90", device_class="h100")
    ns: dict = {}
    exec(compile(out.read_text(), str(out), "exec"), ns)
    exact = ns["EXACT"]
    key = ("fused_rmsnorm_silu", "bf16", "rowmajor", "bf16", 160, 1, 6240)
    assert KernelConfig.from_dict(exact[key]) == CFG_NEW  # the current kernel's config, though its time is slower
    # B's heuristic has no PDL and no l2_prefetch (204 MB), so a v1 kernel could have timed today's heuristic
    only_old = ("fused_rmsnorm_silu", "bf16", "rowmajor", "bf16", 128, 1, 399360)
    assert KernelConfig.from_dict(exact[only_old]) == CFG_OLD


def test_rows_record_the_kernel_source():
    from sweep.provenance import software

    assert software()["kernel_source"] == kernel_source_hash()


def test_report_picks_skip_superseded_rows_and_says_how_many(tmp_path):
    from sweep.report import BEST_TRIAL, load_ok_rows, picks, render_report

    _write_v1(tmp_path / "old.parquet", [r for r in _rows() if "kernel_source" not in r])
    append_rows(tmp_path, [r for r in _rows() if "kernel_source" in r])
    rows = load_ok_rows(tmp_path)
    assert int(rows["superseded"].sum()) == 1  # the old kernel's row on A; B's only row and the peer stay
    tuned = picks(rows).query("series == @BEST_TRIAL").set_index("T")["median_us"]
    assert tuned.to_dict() == {6240: 3.5, 399360: 1.7}
    assert "1 lutforge rows measured a kernel source that a later run replaced" in render_report(rows)


def test_a_newer_bench_does_not_void_the_sweep_rows_its_configs_came_from(tmp_path):
    old = dict(timestamp="2026-11-20T10:00:00Z")
    new = dict(timestamp="2026-11-23T10:00:00Z", kernel_source="new")
    _write_v1(tmp_path / "old.parquet", [row("rmsnorm", "bf16", 2, 16384, 2.0, cfg=CFG_OLD) | old,
                                         row("rmsnorm", "bf16", 2, 16384, 2.2, kind="bench", cfg=CFG_OLD) | old])
    append_rows(tmp_path, [row("rmsnorm", "bf16", 2, 16384, 1.9, kind="bench", cfg=CFG_OLD) | new])
    df = read_results(tmp_path)
    stale = df[superseded(df)]
    assert stale[["kind", "median_us"]].values.tolist() == [["bench", 2.2]]  # only the older bench row


def test_swept_keys_count_a_rebench_or_enough_trials_on_this_device_and_kernel(tmp_path):
    k = {"kernel_source": "new"}
    append_rows(tmp_path, [row("rmsnorm", "bf16", 1, 4096, 2.0, kind="rebench") | k]  # re-benchmarked
                + [row("rmsnorm", "bf16", 16, 4096, 2.0, trial=i) | k for i in range(3)]  # stopped before re-bench
                + [row("rmsnorm", "bf16", 256, 4096, 2.0, trial=i) | k for i in range(2)]  # stopped early
                + [row("rmsnorm", "bf16", 4096, 4096, 2.0, kind="rebench") | {"kernel_source": "old"}]
                + [row("rmsnorm", "bf16", 8192, 4096, 2.0, kind="rebench", status="timeout") | k])
    df = read_results(tmp_path)
    key = lambda T: problem_key(Problem("rmsnorm", T, 4096))
    assert swept_keys(df, "h100", "new") == {key(1)}
    assert swept_keys(df, "h100", "new", trials=3) == {key(1), key(16)}
    assert swept_keys(df, "h200", "new", trials=1) == set()  # another device class swept nothing
    assert swept_keys(df, "h100", "old") == {key(4096)}
