"""`lutforge tune`: the whole loop for the local GPU in one command — sweep (resumable, within a wall
budget), export merged into the device class's LUT, GPU validation of what changed, bench of the public op
beside the peers, report and heatmap — printing where each artefact went. Five commands whose flags must
agree become one."""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import click

from kernels.family import family_of
from kernels.problem import Problem

from .sweep_cmd import chosen_problems, check_gpus, format_summary, parse_gpus, problem_options, run_sweep
from .trial_worker import BACKENDS

STAGES = ("sweep", "export", "validate", "bench", "report", "heatmap")


def _stage(i: int, what: str) -> float:
    click.echo(f"\n[{i + 1}/{len(STAGES)}] {STAGES[i]}: {what}", err=True)
    return time.monotonic()


def _done(t0: float, what: str) -> None:
    click.echo(f"      {what} ({time.monotonic() - t0:.0f} s)", err=True)


def _local_device_class(backend: str) -> str:
    """The device class rows and LUT are keyed by (as the sweep's provenance records it)."""
    if backend != "gpu":
        from .synthetic import device_info

        return device_info()["device_class"]
    import torch

    from kernels.dispatch import device_class_of

    return device_class_of(torch.cuda.get_device_name(0))


@click.command("tune")
@problem_options
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Configs to measure per problem (total in the study; a rerun continues). Default 100.")
@click.option("--wall-budget", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds for the sweep (search and re-bench); problems not reached keep what they had — rerun "
                   "to resume. Export, validation, bench and report follow.")
@click.option("--results", "results_dir", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Where rows, report and heatmap go (default results/<device class>).")
@click.option("--lut", "lut_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="LUT module to merge the winners into (default the device class's shipped "
                   "kernels/luts/sm<arch>_<class>.py, which the runtime then dispatches from).")
@click.option("--peers", "peer_spec", default="all", show_default=True,
              help="Peers benched beside the public op: all, none, or a comma list.")
@click.option("--storage", default=None, help="Optuna storage URL (default sqlite under --results).")
@click.option("--gpus", default=None, help="Comma list of GPU indices for the sweep (one worker each).")
@click.option("--backend", default="gpu", show_default=True, type=click.Choice(list(BACKENDS)),
              help="synthetic: the CPU cost model, for tests (needs --lut outside kernels/luts/).")
@click.option("--compile-workers", type=click.IntRange(min=1), default=None, help="Compile processes (default: cores).")
@click.option("--seed", type=int, default=None, help="Sampler seed.")
def tune_command(ops, problem_set, shapes, outs, in_dtype, layouts, trials, wall_budget, results_dir, lut_path,
                 peer_spec, storage, gpus, limit_shapes, backend, compile_workers, seed):
    """Tune OP on a problem set (or --shapes) for this GPU: sweep, merge into the LUT, validate, bench, report."""
    from lut_export.export import export_lut
    from lut_export.validate import is_shipped
    from kernels.dispatch import reload_luts
    from kernels.luts import exact_key

    from .bench_cmd import bench, format_table, table_impls
    from .heatmap import heatmap_figure, write_heatmap
    from .peers import parse_peers
    from .report import load_host_rows, load_ok_rows, render_report

    try:
        peers = parse_peers(peer_spec)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--peers")
    gpu_list = parse_gpus(gpus)
    check_gpus(backend, gpu_list)
    synthetic = backend != "gpu"
    if synthetic and lut_path is None:
        raise click.UsageError("--backend synthetic rows are not measurements: give --lut outside kernels/luts/")
    problems = chosen_problems(ops, problem_set, shapes, outs, in_dtype, layouts, limit_shapes, "tune")
    device_class = _local_device_class(backend)
    results = (results_dir or Path("results") / device_class).resolve()
    artefacts: list[tuple[str, str]] = [("rows (Parquet)", str(results))]

    budget = f"within {wall_budget:.0f} s" if wall_budget else "no wall budget"
    t0 = _stage(0, f"{len(problems)} problems on {device_class}, {budget}")
    spec, info = run_sweep(problems, backend, results, storage, gpu_list, trials, None, wall_budget,
                           compile_workers=compile_workers, seed=seed)
    click.echo(format_summary(spec.storage, spec, info))
    _done(t0, f"sweep {spec.run_id}")

    t0 = _stage(1, "winners merged into the device class's LUT")
    try:
        ex = export_lut(results, out=lut_path, device_class=device_class, allow_synthetic=synthetic)
    except ValueError as e:
        raise click.ClickException(f"export: {e}") from None
    artefacts.append(("LUT module", str(ex.path)))
    _done(t0, f"{ex.path}: {ex.exact} exact entries, {ex.ranges} range families; {ex.merge_text()}")
    reload_luts()  # this process's dispatch (the bench records its tier) must see the module just written
    which = "the new LUT" if is_shipped(ex.path) else f"the shipped LUT (the runtime does not load {ex.path})"

    keys = {exact_key(p) for p, _ in problems}
    t0 = _stage(2, "this run's LUT entries checked and re-timed against the fallback on this GPU")
    if synthetic:
        _done(t0, "skipped: the synthetic backend has no GPU")
    else:
        checked, findings, dropped = check_exported(ex.path, keys, info, results)
        for f in findings:
            click.echo(f"      FAIL {f.message}", err=True)
        if dropped:
            reload_luts()  # the bench below must dispatch those problems to the fallback, as users now will
        _done(t0, f"{checked - len(findings)} entries ok, {len(findings)} failed"
              + (f"; {dropped} removed from {ex.path.name}: those problems dispatch to the fallback" if dropped else ""))
        errs = [f.message for f in findings if f.kind != "slower"]
    # the bench and report still run: they show what the entries do. An entry that only lost to the fallback
    # is no error once removed; a wrong or crashing one is (the kernel or the check has a bug).
    failed = [] if synthetic else errs

    t0 = _stage(3, f"the public op (dispatching from {which}) beside {', '.join(peers) or 'no peers'}")
    rows, skipped_peers, _ = bench(problems, peers, backend, results, progress=_bench_progress(len(problems)))
    click.echo(format_table(rows, table_impls(peers, skipped_peers, len(problems))))
    bench_run = rows[0]["run_id"] if rows else None
    _done(t0, f"bench {bench_run}: {len(rows)} rows")

    t0 = _stage(4, "BENCHMARKS.md from every row under the results directory")
    try:
        all_rows = load_ok_rows(results, device=info["provenance"]["device_name"])
        text = render_report(all_rows, source=str(results), allow_synthetic=synthetic,
                             host=load_host_rows(results, info["provenance"]["device_name"]))
    except ValueError as e:
        raise click.ClickException(f"report: {e}") from None
    report_path = results / "BENCHMARKS.md"
    report_path.write_text(text)
    artefacts.append(("report", str(report_path)))
    _done(t0, str(report_path))

    t0 = _stage(5, "heatmap opening on what this run measured")
    runs = [r for r in (spec.run_id, bench_run) if r]
    try:
        fig = heatmap_figure(all_rows, runs=runs)
    except ValueError as e:
        raise click.ClickException(f"heatmap: {e}") from None
    except ImportError as e:  # a --no-deps install on a GPU host; rows, LUT and report are already written
        raise click.ClickException(f"heatmap: {e} (pip install plotly); the other artefacts are written: "
                                   + ", ".join(f"{w} {p}" for w, p in artefacts)) from None
    # one plotly.js beside the results folders, shared by every device's heatmap
    heat_path = write_heatmap(fig, results / "heatmap.html", plotlyjs=results.parent / "plotly.min.js")
    artefacts.append(("heatmap", str(heat_path)))
    _done(t0, str(heat_path))

    click.echo("\ntune done; artefacts:")
    for what, where in artefacts:
        click.echo(f"  {what:<15} {where}")
    if failed:
        raise click.ClickException(f"{len(failed)} GPU check failures (listed under stage 3) beyond entries slower than "
                                   f"the fallback; the entries concerned were removed from {ex.path}: a kernel or "
                                   "its check is wrong there")


def check_exported(path: Path, keys: set, info: dict, results: Path, check=None) -> tuple[int, list, int]:
    """Stage 3 of `tune`: the GPU check (lut_export.gpu_check, or `check`) of the module's entries for `keys`;
    its re-timings appended to `results` as one re-bench run, and the entries it rejected removed from the
    module. Returns (entries checked, findings, entries removed).

    Why keep the timings: export picks each problem's winner from its newest re-bench that timed the heuristic
    (lut_export.winners.newest_rebench), so an entry the check found slower is not re-elected from the sweep's
    older re-bench by the next `tune` of other shapes."""
    from kernels.luts import read_lut
    from lut_export.export import drop_entries
    from lut_export.gpu_check import gpu_check

    from .provenance import make_row
    from .results_io import append_rows

    lut = read_lut(path)
    rows: list[dict] = []
    run_id = uuid.uuid4().hex[:12]

    def record(p, cfg, source, t):
        rows.append(make_row(problem=p, result={"status": "ok", "median_us": t.median_us, "p20_us": t.p20_us,
                                                "p80_us": t.p80_us}, device=info["provenance"],
                             copy_gbps=info["copy_gbps"], knobs=cfg.as_dict(), run_id=run_id, study=None, trial=-1,
                             kind="rebench", impl="lutforge", config_source=source, problem_set=None))
    checked = keys & set(lut.exact)
    findings = (check or gpu_check)(lut, keys=checked, record=record)
    append_rows(results, rows, prefix="check")
    rejected = {f.key for f in findings if f.key is not None}
    return len(checked), findings, drop_entries(path, rejected) if rejected else 0


def _bench_progress(total: int):
    """One line per benched problem on stderr (a bench of many problems takes minutes)."""
    count = [0]

    def step(problem: Problem) -> None:
        count[0] += 1
        click.echo(f"      bench {count[0]}/{total}: {problem.op}/{problem.out_format} "
                   f"{family_of(problem).size_label(problem)}x{problem.C}",
                   err=True)
    return step
