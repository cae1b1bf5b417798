"""`lutforge tune` end to end on the synthetic backend: every stage runs and leaves its artefact, a second
run on other shapes merges into the same LUT, and misuse is refused before any work."""
from __future__ import annotations

from kernels.luts import read_lut
from sweep.results_io import read_results
from sweep_helpers import run_cli

ARGS = ["tune", "--backend", "synthetic", "--op", "rmsnorm", "--out", "bf16", "--trials", "4", "--peers", "none",
        "--compile-workers", "2", "--seed", "1"]


def test_tune_runs_every_stage_and_merges_a_second_run(tmp_path):
    results, lut = tmp_path / "r", tmp_path / "luts" / "sm90_synthetic.py"
    r = run_cli(ARGS + ["--shapes", "16x4096,2048x4096", "--results", str(results), "--lut", str(lut)])
    assert r.returncode == 0, r.stdout + r.stderr
    for i, stage in enumerate(("sweep", "export", "validate", "bench", "report", "heatmap")):
        assert f"[{i + 1}/6] {stage}:" in r.stderr
    assert "skipped: the synthetic backend has no GPU" in r.stderr
    assert f"dispatching from the shipped LUT (the runtime does not load {lut})" in r.stderr  # a candidate file
    assert "bench 2/2: rmsnorm/bf16 2048x4096" in r.stderr
    for what, path in (("LUT module", lut), ("report", results / "BENCHMARKS.md"),
                       ("heatmap", results / "heatmap.html")):
        assert f"{what:<15} {path}" in r.stdout and path.is_file()
    first = set(read_lut(lut).exact)
    assert first == {("rmsnorm", "bf16", "rowmajor", "bf16", 4096, 1, t) for t in (16, 2048)}
    df = read_results(results)
    bench = df[df["kind"] == "bench"]
    assert set(bench["impl"]) == {"lutforge", "lutforge_heuristic"} and len(bench) == 4
    assert "## inline — rmsnorm → bf16" in (results / "BENCHMARKS.md").read_text()

    r = run_cli(ARGS + ["--shapes", "64x5120", "--results", str(results), "--lut", str(lut)])
    assert r.returncode == 0, r.stdout + r.stderr
    merged = set(read_lut(lut).exact)
    assert merged == first | {("rmsnorm", "bf16", "rowmajor", "bf16", 5120, 1, 64)}  # unswept entries kept


def test_tune_refuses_synthetic_rows_without_a_lut_outside_the_package(tmp_path):
    r = run_cli(ARGS + ["--shapes", "16x4096", "--results", str(tmp_path / "r")])
    assert r.returncode != 0 and "give --lut outside kernels/luts/" in r.stderr
    assert not (tmp_path / "r").exists()


def test_tune_names_bad_shapes_and_sets(tmp_path):
    r = run_cli(ARGS + ["--shapes", "16by4096", "--lut", str(tmp_path / "x.py")])
    assert r.returncode != 0 and "is not TxC or TxHxD" in r.stderr
    r = run_cli(ARGS + ["--problem-set", "nope", "--lut", str(tmp_path / "x.py")])
    assert r.returncode != 0 and "unknown problem set 'nope'" in r.stderr


def test_an_entry_the_gpu_check_rejects_is_removed_and_not_re_elected(tmp_path):
    """Stage 3 on its own, its GPU check replaced by one that finds the 2048x4096 entry slower than the
    heuristic: the entry leaves the module, the check's two timings join the rows as a re-bench run, and the
    next export elects the heuristic there instead of the entry the older sweep re-bench preferred."""
    from dataclasses import replace

    from kernels.config import heuristic
    from kernels.problem import Problem
    from lut_export.export import export_lut
    from lut_export.gpu_check import Finding
    from sweep.timer import Timing
    from sweep.tune_cmd import check_exported

    results, lut = tmp_path / "r", tmp_path / "luts" / "sm90_synthetic.py"
    r = run_cli(ARGS + ["--shapes", "16x4096,2048x4096", "--results", str(results), "--lut", str(lut)])
    assert r.returncode == 0, r.stdout + r.stderr
    key = ("rmsnorm", "bf16", "rowmajor", "bf16", 4096, 1, 2048)
    p = Problem("rmsnorm", 2048, 4096)
    heur = heuristic(p, 90)
    entry = replace(heur, threads=2 * heur.threads)  # what the module holds there, made not the heuristic
    df = read_results(results)
    first = df.iloc[0]
    info = {"provenance": {k: None if first.isna()[k] else first[k] for k in ("device_name", "device_class", "sm", "sm_count", "driver", "cuda",
                                                 "torch", "cutlass_dsl", "lutforge", "git_commit", "backend")},
            "copy_gbps": float(first["copy_gbps"])}

    def timing(us):
        return Timing(us, 0.99 * us, 1.01 * us, (us,), 1, 2, 1, 1)

    def fake_check(module, keys, record):
        assert set(keys) == {key, ("rmsnorm", "bf16", "rowmajor", "bf16", 4096, 1, 16)}
        record(p, entry, "search", timing(30.0))
        record(p, heur, "heuristic", timing(20.0))
        return [Finding(key, "slower", "slower than the heuristic")]

    checked, findings, dropped = check_exported(lut, {key, ("rmsnorm", "bf16", "rowmajor", "bf16", 4096, 1, 16)},
                                                info, results, check=fake_check)
    assert (checked, dropped) == (2, 1) and key not in read_lut(lut).exact
    rows = read_results(results)
    check_rows = rows[(rows["kind"] == "rebench") & (rows["trial"] == -1)]
    assert len(check_rows) == 2 and set(check_rows["config_source"]) == {"search", "heuristic"}
    export_lut(results, out=lut, device_class="synthetic", allow_synthetic=True)
    assert read_lut(lut).exact[key] == heur.as_dict()  # the check's head-to-head decides, not the sweep's
