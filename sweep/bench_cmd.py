"""`lutforge bench`: lutforge as users get it (its public op, dispatching at run time) and its fallback
config, side by side with the importable peers, all on the same timer, inputs and correctness check;
rows kind=bench."""
from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

from .results_io import size_label
from .sweep_cmd import check_gpus, chosen_problems, out_label, problem_options
from .trial_worker import BACKENDS

_SOURCE = {"exact": "lut_exact", "range": "lut_range", "heuristic": "heuristic"}


def bench(problems, peers: list[str], backend: str, results_dir: Path, trial_timeout: float = 120.0,
          compile_workers: int | None = None, progress=None) -> tuple[list[dict], dict[str, list[str]], dict]:
    """Measure every problem; returns (rows, skipped peers -> reasons, device info). Rows are appended
    to Parquet under `results_dir` as they are measured (in batches), so a stopped bench keeps them.
    `progress(problem)` is called after each problem."""
    from kernels.compile_cache import arch_number
    from kernels.dispatch import select_config
    from kernels.family import family_of

    from .peers import unsupported
    from .provenance import make_row
    from .study import RowWriter
    from .trial_worker import Evaluator

    ev = Evaluator(backend, compile_workers or os.cpu_count() or 1, trial_timeout)
    run_id = uuid.uuid4().hex[:12]
    rows: list[dict] = []
    writer = RowWriter(results_dir, prefix="bench")
    skipped: dict[str, list[str]] = {}
    try:
        info = ev.start()
        dev, copy = info["provenance"], info["copy_gbps"]
        arch = arch_number(ev.arch)

        def add(p, pset, res, knobs, impl, source):
            r = make_row(problem=p, result=res, device=dev, copy_gbps=copy, knobs=knobs, run_id=run_id,
                         study=None, trial=-1, kind="bench", impl=impl, config_source=source, problem_set=pset)
            rows.append(r)
            writer.add(r)

        # the config recorded for "lutforge" is the one the public op dispatches: looked up on what its host code
        # sees of the call (family.dispatch_key: the fused MoE's skewed routing is timed but not seen)
        chosen = [(p, pset, *select_config(family_of(p).dispatch_key(p), arch, dev["device_class"]),
                   family_of(p).heuristic(p, arch)) for p, pset in problems]
        with ThreadPoolExecutor(ev.n_compile) as pool:  # compile everything first, in parallel
            list(pool.map(lambda pc: ev.compile(*pc), {(c[0], k) for c in chosen for k in (c[2], c[4])}))
        for p, pset, cfg, tier, heur in chosen:
            # "lutforge": the public op, dispatching itself (the config recorded is the one its dispatch picks);
            # the synthetic backend has no op to call and models the dispatched config instead
            res = ev.measure_op(p) if backend == "gpu" else ev.evaluate(p, cfg)
            add(p, pset, res, cfg.as_dict(), "lutforge", _SOURCE[tier])
            add(p, pset, ev.evaluate(p, heur), heur.as_dict(), "lutforge_heuristic", "heuristic")
            for peer in peers:
                why = "peers run only on the gpu backend" if backend != "gpu" else unsupported(p, peer)
                if why:
                    skipped.setdefault(peer, []).append(f"{p.op}/{p.out_format}: {why}")
                    continue
                add(p, pset, ev.measure_peer(p, peer), None, peer, "peer")
            if progress is not None:
                progress(p)
    finally:
        ev.close()
        writer.flush()
    return rows, skipped, info


def stale_problems(problems, results_dir: Path) -> list[tuple]:
    """The `problems` whose newest public-op row under `results_dir` timed a config this checkout's runtime no
    longer dispatches (sweep.report.stale_dispatch, what `lutforge report` counts): after a LUT export or a
    heuristic change, the ones a bench must re-measure, and no others."""
    from .report import load_ok_rows, picks, stale_dispatch
    from .results_io import problem_key

    try:
        rows = load_ok_rows(results_dir)
    except ValueError as e:
        raise click.UsageError(f"--stale reads the public-op rows under --results: {e}") from None
    stale = {problem_key(r) for r in stale_dispatch(picks(rows)).to_dict("records")}
    return [(p, pset) for p, pset in problems if problem_key(p) in stale]


def table_impls(peers: list[str], skipped: dict[str, list[str]], n_problems: int) -> list[str]:
    """The table's columns: lutforge, its fallback, and each peer that ran on at least one problem."""
    return ["lutforge", "lutforge_heuristic"] + [p for p in peers if len(skipped.get(p, ())) < n_problems]


def format_table(rows: list[dict], impls: list[str]) -> str:
    by_problem: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        out = out_label(r["out_format"], r["scale_layout"])
        by_problem.setdefault((r["op"], out, size_label(r), r["C"], r["heads"]), {})[r["impl"]] = r
    head = f"{'op':<24} {'out':<10} {'T':>8} {'C':>6}  " + " ".join(f"{i[:18]:>18}" for i in impls)
    lines = [head, "-" * len(head), "(GB/s; us in brackets; a status where the impl did not measure ok)"]
    for (op, out, T, C, _h), by_impl in by_problem.items():
        cells = []
        for i in impls:
            r = by_impl.get(i)
            if r is None:
                cells.append(f"{'-':>18}")
            elif r["status"] != "ok":
                cells.append(f"{r['status']:>18}")
            else:
                cells.append(f"{r['gbps']:>8.0f} ({r['median_us']:>7.2f})")
        lines.append(f"{op:<24} {out:<10} {T:>8} {C:>6}  " + " ".join(cells))
    return "\n".join(lines)


def bench_host(problems, results_dir: Path) -> list[dict]:
    """Host microseconds per eager call of every problem, lutforge's call paths beside torch and the peers,
    in this process (sweep/host_cost.py); rows kind=host."""
    from .host_cost import measure
    from .provenance import gpu_provenance, make_row
    from .study import RowWriter

    run_id = uuid.uuid4().hex[:12]
    dev = gpu_provenance(0)
    writer = RowWriter(results_dir, flush_rows=1 << 30, flush_s=float("inf"), prefix="host")  # one file per run
    rows = []
    try:
        for p, pset in problems:
            for res in measure(p):
                r = make_row(problem=p, result=res, device=dev, copy_gbps=None, knobs=None, run_id=run_id,
                             study=None, trial=-1, kind="host", impl=res["impl"], config_source=None,
                             problem_set=pset)
                rows.append(r)
                writer.add(r)
    finally:
        writer.flush()
    return rows


def _host_cell(r: dict | None) -> str:
    if r is None:
        return "-"
    return f"{r['host_us']:.1f}" if r["status"] == "ok" else r["status"]


def format_host_table(rows: list[dict]) -> str:
    from .host_cost import IMPLS

    impls = [i for i in IMPLS if any(r["impl"] == i for r in rows)]
    by_problem: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_problem.setdefault((r["op"], out_label(r["out_format"], r["scale_layout"]), r["T"], r["C"], r["heads"]),
                              {})[r["impl"]] = r
    head = f"{'op':<24} {'out':<10} {'T':>6} {'C':>5} {'H':>3}  " + " ".join(f"{i[:14]:>14}" for i in impls)
    lines = [head, "-" * len(head), "(host us per eager call, median of repeats)"]
    for (op, out, T, C, H), by_impl in by_problem.items():
        cells = [f"{_host_cell(by_impl.get(i)):>14}" for i in impls]
        lines.append(f"{op:<24} {out:<10} {T:>6} {C:>5} {H:>3}  " + " ".join(cells))
    return "\n".join(lines)


@click.command("bench")
@click.option("--host", is_flag=True, help="Measure host microseconds per eager call (public op, custom op, bare "
                                           "launch) beside torch and the peers instead of GPU time.")
@problem_options
@click.option("--peers", "peer_spec", default="all", show_default=True,
              help="all, none, or a comma list of torch_eager,torch_compile,quack,liger,flashinfer.")
@click.option("--results", "results_dir", default="results", show_default=True, type=click.Path(file_okay=False))
@click.option("--backend", default="gpu", show_default=True, type=click.Choice(list(BACKENDS)),
              help="synthetic times only lutforge, with the CPU cost model (for CI).")
@click.option("--trial-timeout", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True)
@click.option("--stale", is_flag=True, help="Only the chosen problems whose newest public-op row under --results "
                                            "timed a config the runtime no longer dispatches (what `lutforge "
                                            "report` counts): re-measure them after a LUT export or heuristic change.")
def bench_command(problem_set, shapes, host, ops, outs, in_dtype, layouts, peer_spec, results_dir, backend,
                  limit_shapes, trial_timeout, stale):
    """Time lutforge (dispatch and heuristic) beside the importable peers on one problem set."""
    from .peers import parse_peers

    try:
        peers = parse_peers(peer_spec)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--peers")
    check_gpus(backend, None)
    problems = chosen_problems(ops, problem_set, shapes, outs, in_dtype, layouts, limit_shapes, "bench")
    results = Path(results_dir).resolve()
    if stale:
        chosen = len(problems)
        problems = stale_problems(problems, results)
        click.echo(f"--stale: {len(problems)} of {chosen} problems have a public-op row of a config the runtime "
                   "no longer dispatches", err=True)
        if not problems:
            return
    if host:
        if backend != "gpu":
            raise click.UsageError("--host measures real calls: it needs --backend gpu")
        rows = bench_host(problems, results)
        click.echo(format_host_table(rows))
        click.echo(f"{len(rows)} rows under {results}")
        return
    rows, skipped, info = bench(problems, peers, backend, results, trial_timeout)
    click.echo(format_table(rows, table_impls(peers, skipped, len(problems))))
    for peer, reasons in skipped.items():
        shown = sorted(set(reasons))
        click.echo(f"skipped {peer}: " + "; ".join(shown[:5]) + (" ..." if len(shown) > 5 else ""))
    click.echo(f"copy roofline {info['copy_gbps']:.0f} GB/s on {info['provenance']['device_name']}; "
               f"{len(rows)} rows under {results}")
