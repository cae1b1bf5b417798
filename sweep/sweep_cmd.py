"""`lutforge sweep`: search the knobs of every problem of a problem set, on one or many GPUs (or the
synthetic cost model), resumably, and print the winners."""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import click

from kernels.family import all_ops, family_of, family_of_op
from kernels.problem import SCALE_LAYOUTS, Problem

from .families import harness
from .study import MEASURED
from .trial_worker import BACKENDS


@dataclass
class SweepSpec:
    """Everything a worker process needs (picklable: it crosses a spawn)."""

    problems: list[tuple[Problem, str]]  # (problem, problem set)
    backend: str
    storage: str
    results: str
    run_id: str
    trials: int | None
    time_budget: float | None
    trial_timeout: float
    compile_workers: int
    finalists: int
    seed: int | None = None
    env: dict = field(default_factory=dict)
    deadline: float | None = None  # epoch seconds by which search and re-bench should end (--wall-budget)
    skip_swept: bool = False  # leave out problems `results` holds as swept on this device and kernel (unswept)


def split_list(value: str, what: str) -> list[str]:
    items = [s.strip() for s in (value or "").split(",") if s.strip()]
    if not items:
        raise click.BadParameter(f"give at least one {what}")
    return list(dict.fromkeys(items))


def split_layouts(value: str) -> tuple[str, ...]:
    layouts = split_list(value, "scale layout")
    bad = [x for x in layouts if x not in SCALE_LAYOUTS]
    if bad:
        raise click.BadParameter(f"unknown scale layouts {bad}; known: {', '.join(SCALE_LAYOUTS)}",
                                 param_hint="--scale-layout")
    return tuple(layouts)


def out_label(out_format: str, scale_layout: str) -> str:
    """An output format as the sweep and bench tables show it: swizzled FP4 scales marked /swz."""
    return out_format + ("/swz" if scale_layout == "swizzled" else "")


SCALE_LAYOUT_HELP = ("FP4 block-scale layout(s), comma list of rowmajor,swizzled (swizzled applies to ops that "
                     "write FP4 scales).")


INLINE_SET = "inline"  # problem_set label of shapes given with --shapes
PROBLEM_SET_HELP = "Problem set: a shipped set's name (problem_sets/*.toml) or the path of your own .toml file."
SHAPES_HELP = "Shapes instead of a set: TxC for row ops, TxHxD for per-head ops (comma list, e.g. 1x4096,1x32x128)."


def shapes_option(problem_set: str | None, shapes: str | None):
    """The parsed --shapes, after checking that exactly one of --problem-set and --shapes is given."""
    if (problem_set is None) == (shapes is None):
        raise click.UsageError("give exactly one of --problem-set and --shapes")
    return parse_shapes(shapes) if shapes else None


def parse_shapes(text: str) -> list[tuple[int, int, int | None]]:
    """`--shapes 1x4096,32x4096,2048x32x128`: TxC for row ops -> (T, C, None), TxHxD for per-head ops ->
    (T, D, H)."""
    out = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        try:
            dims = [int(v) for v in item.lower().split("x")]
        except ValueError:
            dims = []
        if len(dims) not in (2, 3) or dims[0] < 0 or min(dims[1:]) < 1:
            raise click.BadParameter(f"shape {item!r} is not TxC or TxHxD with T >= 0 and sizes >= 1",
                                     param_hint="--shapes")
        out.append((dims[0], dims[-1], dims[1]) if len(dims) == 3 else (dims[0], dims[1], None))
    if not out:
        raise click.BadParameter("no shapes given", param_hint="--shapes")
    return out


def select_problems(problem_set: str | None, ops: list[str], outs: list[str], in_dtype: str,
                    limit_shapes: int | None, layouts: tuple[str, ...] = ("rowmajor",),
                    shapes: list[tuple[int, int, int | None]] | None = None) -> tuple[list[tuple[Problem, str]], list[str]]:
    """(problems, skipped (op, out, layout) descriptions). `limit_shapes` keeps that many shapes per
    (op, out, layout), spread evenly over the set so the sample spans small to large. `layouts` are the FP4
    block-scale layouts; swizzled applies to ops that write FP4 scales and is skipped for the others.
    `shapes` (T, C, heads) replace the set: row ops take those with heads 1, per-head ops the others."""
    import problem_sets

    set_dir = None
    if shapes is None and problem_set.endswith(".toml"):  # a user's own set file, anywhere
        path = Path(problem_set).expanduser().resolve()
        if not path.is_file():
            raise click.BadParameter(f"problem set file {problem_set!r} does not exist", param_hint="--problem-set")
        problem_set, set_dir = path.stem, path.parent
    elif shapes is None and problem_set not in problem_sets.list_sets():
        raise click.BadParameter(f"unknown problem set {problem_set!r}; known: {', '.join(problem_sets.list_sets())} "
                                 "(or give a path to a .toml set file)", param_hint="--problem-set")
    bad = [o for o in ops if o not in all_ops()]
    if bad:
        raise click.BadParameter(f"unknown ops {bad}; known: {', '.join(all_ops())}", param_hint="--op")
    chosen, skipped = [], []
    for op in ops:
        fam = family_of_op(op)
        for out in outs:
            allowed = fam.out_formats(op, in_dtype)
            if out not in allowed:
                skipped.append(f"{op}/{out} (outputs of {op} with {in_dtype} input: {allowed})")
                continue
            for layout in layouts:
                if layout not in harness(fam).scale_layouts(op, out):
                    skipped.append(f"{op}/{out}/{layout} (only ops writing FP4 block scales have a {layout} layout)")
                    continue
                try:
                    if shapes is not None:
                        ps = harness(fam).inline_problems(op, shapes, in_dtype, out, layout)
                    else:
                        ps = problem_sets.problems(problem_set, op, in_dtype, out, scale_layout=layout,
                                                   directory=set_dir)
                except ValueError as e:
                    skipped.append(f"{op}/{out}/{layout} ({e})")
                    continue
                if limit_shapes is not None and len(ps) > limit_shapes:
                    idx = sorted({round(i * (len(ps) - 1) / max(1, limit_shapes - 1)) for i in range(limit_shapes)})
                    ps = [ps[i] for i in idx]
                chosen += [(p, INLINE_SET if shapes is not None else problem_set) for p in ps]
    return chosen, skipped


def problem_options(f):
    """The options that choose a command's problems (sweep, bench, tune share them)."""
    for opt in reversed([
        click.option("--op", "ops", required=True, help="Op or comma list of ops (e.g. fused_rmsnorm_silu,rmsnorm)."),
        click.option("--problem-set", default=None, help=PROBLEM_SET_HELP),
        click.option("--shapes", default=None, help=SHAPES_HELP),
        click.option("--out", "outs", required=True, help="Output format(s), comma list (e.g. bf16,fp8)."),
        click.option("--in-dtype", default="bf16", show_default=True, type=click.Choice(["bf16", "fp16"])),
        click.option("--scale-layout", "layouts", default="rowmajor", show_default=True, help=SCALE_LAYOUT_HELP),
        click.option("--limit-shapes", type=click.IntRange(min=1), default=None,
                     help="At most N shapes per (op, out), spread over the set."),
    ]):
        f = opt(f)
    return f


def chosen_problems(ops, problem_set, shapes, outs, in_dtype, layouts, limit_shapes,
                    what: str) -> list[tuple[Problem, str]]:
    """The problems `problem_options` name, saying on stderr which combinations were skipped; a usage
    error when none is left to `what` (sweep, bench, tune)."""
    problems, skipped = select_problems(problem_set, split_list(ops, "op"), split_list(outs, "output format"),
                                        in_dtype, limit_shapes, split_layouts(layouts),
                                        shapes_option(problem_set, shapes))
    for s in skipped:
        click.echo(f"skipped {s}", err=True)
    if not problems:
        raise click.UsageError(f"no problem to {what}: every op/output format combination was skipped")
    return problems


def check_gpus(backend: str, gpus: list[str] | None) -> None:
    if backend != "gpu":
        return
    try:
        import torch
    except ImportError as e:
        raise click.ClickException(f"--backend gpu needs torch with CUDA ({e})")
    if not torch.cuda.is_available():
        raise click.ClickException("--backend gpu needs a CUDA GPU, but none is visible (torch.cuda.is_available() "
                                   "is False). Run on a GPU host, or use --backend synthetic to exercise the "
                                   "pipeline on a CPU.")
    n = torch.cuda.device_count()
    for g in gpus or []:
        if int(g) >= n:
            raise click.BadParameter(f"GPU {g} does not exist; {n} visible", param_hint="--gpus")


def run_worker(spec: SweepSpec, gpu: str | None, progress, search: bool = True, rebench: bool = True) -> dict:
    """Search (and/or re-benchmark) every problem of `spec` on one device; returns the device info."""
    from .study import Claims, RowWriter, StudyRun, open_storage, reconcile_rows
    from .trial_worker import Evaluator

    env = dict(spec.env)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    ev = Evaluator(spec.backend, spec.compile_workers, spec.trial_timeout, env=env)
    claims = None
    writer = RowWriter(spec.results)
    try:
        ev.start()
        problems = spec.problems
        if search and problems:
            preflight(ev, problems[0][0])
        if spec.skip_swept:
            problems = unswept(problems, spec.results, ev.info["provenance"]["device_class"], spec.trials)
            click.echo(f"--skip-swept: {len(spec.problems) - len(problems)} of {len(spec.problems)} problems "
                       f"already swept on this device class and kernel source", err=True)
        storage = open_storage(spec.storage)
        claims = Claims(spec.storage)
        run = StudyRun(ev, storage, claims, writer, spec.run_id, Path(spec.results), spec.trials, spec.time_budget,
                       n_jobs=spec.compile_workers, seed=spec.seed, on_trial=progress, deadline=spec.deadline,
                       finalists=spec.finalists)
        reconcile_rows(storage, [run.name(p) for p, _ in problems], spec.results)
        if search:
            search_groups(run, problems)
        if rebench:
            for p, pset in problems:
                run.rebench(p, pset)
        return ev.info
    finally:
        writer.flush()
        ev.close()
        if claims is not None:
            claims.close()


def preflight(ev, problem) -> None:
    """Compile the fallback config of one problem before any study records a trial: a broken toolchain
    (on the H200 a missing cutlass CUDA library) otherwise fails every trial as compile_error, and the
    studies then count as finished, so a rerun on a repaired machine resumes nothing."""
    from kernels.compile_cache import arch_number

    if ev.backend != "gpu":
        return
    fam = family_of(problem)
    res = ev.compile(problem, fam.heuristic(problem, arch_number(ev.arch)))
    if res["status"] != "ok":
        raise click.ClickException(f"cannot compile the fallback config of {problem.op} "
                                   f"{fam.size_label(problem)}x{problem.C}: "
                                   f"{res['status']}: {str(res.get('error'))[:800]}\nNothing was recorded; repair "
                                   "the toolchain (nvidia-cutlass-dsl and its CUDA library) and rerun.")


def unswept(problems: list[tuple[Problem, str]], results: str, device_class: str, trials: int | None
            ) -> list[tuple[Problem, str]]:
    """`problems` less those already swept on this device class and kernel source (re-benchmarked, or with
    `trials` trial rows), per the Parquet rows under `results`: the committed record, where the study
    database may be gone."""
    from .results_io import problem_key, read_results, swept_keys

    try:
        df = read_results(results)
    except ValueError:  # no rows yet
        return problems
    done: dict[str, set] = {}
    for f in {family_of(p) for p, _ in problems}:
        done[f.name] = swept_keys(df, device_class, f.source_hash(), trials)
    return [(p, s) for p, s in problems if problem_key(p) not in done[family_of(p).name]]


STUDY_GROUPS_AT_ONCE = 4


def kernel_groups(problems: list[tuple]) -> list[list[tuple]]:
    """Problems grouped by compiled kernel (the family's compile key: all but the runtime sizes), the groups
    taken in turn from each (op, dtypes) so that a sweep cut short by --wall-budget has reached every op, not
    finished the first: on the H100 an LLM sweep of four ops in 240 s searched only the first two. Each op's
    groups come in spread order (spread_order over their order in the set, which lists hidden sizes
    ascending), so the cut-off sweep has also reached the whole range of sizes, not its smallest ones: what a
    fallback fit on its rows needs (sweep/fallback_fit.py)."""
    by_kind: dict[tuple, dict[tuple, list]] = {}
    for p, pset in problems:
        kind = (p.op, p.in_dtype, p.out_format, p.scale_layout)
        by_kind.setdefault(kind, {}).setdefault(family_of(p).compile_key(p), []).append((p, pset))
    queues = [spread_order(list(g.values())) for g in by_kind.values()]
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def spread_order(items: list) -> list:
    """`items` reordered so that every prefix spans them: both ends, then the middle of each gap, halving the
    gaps in turn (0, n-1, n/2, n/4, 3n/4, ...)."""
    n = len(items)
    order, gaps = ([0, n - 1], [(0, n - 1)]) if n else ([], [])
    while gaps:
        gaps = [g for lo, hi in gaps if hi - lo > 1 for g in ((lo, (lo + hi) // 2), ((lo + hi) // 2, hi))]
        order += [hi for lo, hi in gaps[::2]]
    return [items[i] for i in dict.fromkeys(order)]


def search_groups(run, problems: list[tuple[Problem, str]], at_once: int = STUDY_GROUPS_AT_ONCE) -> None:
    """Search problems that share a compiled kernel (all but T) one after another, so each study is
    seeded by its siblings' winners, and up to `at_once` such groups side by side, so the GPU keeps
    timing one group's trials while another waits for compiles (a study ends only when its slowest
    compile does)."""
    from concurrent.futures import ThreadPoolExecutor

    groups = kernel_groups(problems)

    def one(group):
        for p, pset in group:
            run.run(p, pset)

    with ThreadPoolExecutor(max(1, min(at_once, len(groups)))) as pool:
        futures = [pool.submit(one, g) for g in groups]
        try:
            for f in futures:
                f.result()
        except BaseException:  # Ctrl-C, SIGTERM, a failed study: stop the others now, not after their budgets
            run.stop()
            raise


def _worker_process(spec: SweepSpec, gpu: str, progress_q) -> None:
    from .cli import exit_on_sigterm

    signal.signal(signal.SIGTERM, exit_on_sigterm)  # unwind: flush rows, stop workers
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    run_worker(spec, gpu, lambda status: progress_q.put(status), search=True, rebench=False)


def _progress_thread(q, bar) -> threading.Thread:
    def drain():
        while True:
            item = q.get()
            if item is StopIteration or item == "__stop__":
                return
            if item in MEASURED:  # invalid prefixes and duplicates are not measurements
                bar.update(1)
            bar.set_postfix_str(item or "duplicate", refresh=False)  # redrawn at the bar's own interval

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    return t


def format_summary(storage_url: str, spec: SweepSpec, info: dict) -> str:
    from .study import open_storage, study_name, summary
    from .timer import gbps

    storage = open_storage(storage_url)
    dev_class = info["provenance"]["device_class"]
    copy = info["copy_gbps"]
    head = f"{'op':<24} {'out':<10} {'T':>8} {'C':>6}  {'best config':<34} {'us':>9} {'GB/s':>8} {'%copy':>6} " \
           f"{'vs heur':>7}  trials"
    lines = [head, "-" * len(head)]
    for p, _ in spec.problems:
        s = summary(storage, study_name(p, dev_class))
        if s is None:
            continue
        st = s["statuses"]
        counts = " ".join(f"{k}={v}" for k, v in sorted(st.items()))
        fam = family_of(p)
        out = out_label(p.out_format, p.scale_layout)
        size = fam.size_label(p)
        if s["config"] is None:
            lines.append(f"{p.op:<24} {out:<10} {size:>8} {p.C:>6}  {'(no ok trial)':<34} {'':>9} {'':>8} "
                         f"{'':>6} {'':>7}  {counts}")
            continue
        g = gbps(fam.ideal_bytes(p), s["median_us"])
        sp = f"{s['heuristic_us'] / s['median_us']:.2f}x" if s["heuristic_us"] else "-"
        mark = "" if s["rebenched"] else "*"
        lines.append(f"{p.op:<24} {out:<10} {size:>8} {p.C:>6}  {s['config'].short() + mark:<34} "
                     f"{s['median_us']:>9.2f} {g:>8.0f} {100 * g / copy:>6.1f} {sp:>7}  {counts}")
    lines.append(f"copy roofline {copy:.0f} GB/s on {info['provenance']['device_name']} "
                 f"(backend {info['provenance']['backend']}); * = not re-benchmarked")
    return "\n".join(lines)


def run_sweep(problems: list[tuple[Problem, str]], backend: str, results_dir: Path, storage: str | None,
              gpu_list: list[str] | None, trials: int | None, time_budget: float | None, wall_budget: float | None,
              trial_timeout: float = 120.0, compile_workers: int | None = None, finalists: int = 3,
              seed: int | None = None, skip_swept: bool = False) -> tuple[SweepSpec, dict]:
    """Search then re-bench `problems` (resuming what the storage holds) with a live progress bar;
    returns the spec (run id, storage, results) and the device info. `sweep` and `tune` share it."""
    from tqdm import tqdm

    if trials is None and time_budget is None:
        trials = 100
    results = Path(results_dir).resolve()
    results.mkdir(parents=True, exist_ok=True)
    storage_url = storage
    if storage_url is None:
        from .study import default_storage_url

        storage_url = default_storage_url(results)
    try:
        from .study import open_storage

        open_storage(storage_url)
    except Exception as e:  # a bad URL, an unreachable server, a missing driver: say which, no traceback
        raise click.ClickException(f"cannot open storage {storage_url}: {type(e).__name__}: {e}")
    spec = SweepSpec(problems=problems, backend=backend, storage=storage_url, results=str(results),
                     run_id=uuid.uuid4().hex[:12], trials=trials, time_budget=time_budget,
                     trial_timeout=trial_timeout, compile_workers=compile_workers or os.cpu_count() or 1,
                     finalists=finalists, seed=seed,
                     deadline=None if wall_budget is None else time.time() + wall_budget,
                     skip_swept=skip_swept)
    total = len(problems) * trials if trials is not None else None
    click.echo(f"sweep {spec.run_id}: {len(problems)} problems, backend {backend}, storage {storage_url}", err=True)
    err = click.get_text_stream("stderr")
    # a terminal gets a live bar; a log file (batch jobs) a line every 10 s instead of one per trial
    bar = tqdm(total=total, unit="trial", desc="sweep", file=err, dynamic_ncols=True,
               mininterval=0.1 if err.isatty() else 10.0)
    try:
        if gpu_list is None or len(gpu_list) == 1:
            q: queue.Queue = queue.Queue()
            t = _progress_thread(q, bar)
            gpu = gpu_list[0] if gpu_list else None
            try:
                info = run_worker(spec, gpu, q.put)
            finally:
                q.put("__stop__")
                t.join()
        else:
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            t = _progress_thread(q, bar)
            procs = [ctx.Process(target=_worker_process, args=(spec, g, q), name=f"sweep-gpu{g}") for g in gpu_list]
            for p in procs:
                p.start()
            for p in procs:
                p.join()
            q.put("__stop__")
            t.join()
            failed = [f"GPU {g} ({p.exitcode})" for g, p in zip(gpu_list, procs) if p.exitcode != 0]
            if failed:
                raise click.ClickException(f"worker processes failed: {', '.join(failed)}; rerun to resume")
            # One process re-benchmarks finalists (and writes rows a dead worker left unflushed).
            info = run_worker(spec, gpu_list[0], None, search=False, rebench=True)
    finally:
        bar.close()
    return spec, info


def parse_gpus(gpus: str | None) -> list[str] | None:
    if gpus is None:
        return None
    gpu_list = split_list(gpus, "GPU index")
    if not all(g.isdigit() for g in gpu_list):
        raise click.BadParameter(f"GPU indices must be non-negative integers, got {gpus!r}", param_hint="--gpus")
    return gpu_list


@click.command("sweep")
@problem_options
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="Configs to measure per problem (total in the study, so a resume continues to N). "
                   "Default 100 when no --time-budget is given.")
@click.option("--time-budget", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds of search per problem and worker process, after the configs every sweep times (the "
                   "heuristic, neighbours' winners and the fallback's probe configs).")
@click.option("--wall-budget", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds for the whole sweep, re-bench included: the search stops when the time left is what "
                   "re-benchmarking the problems it reached will take (estimated from their measured timing "
                   "cost), then the finalists are re-benchmarked. Problems not reached keep what they had; rerun "
                   "to resume.")
@click.option("--storage", default=None, help="Optuna storage URL; default sqlite file <results>/optuna.db. "
                                              "postgresql://... lets many GPUs/hosts share one sweep.")
@click.option("--gpus", default=None, help="Comma list of GPU indices: one worker process per GPU on the same studies.")
@click.option("--results", "results_dir", default="results", show_default=True, type=click.Path(file_okay=False),
              help="Directory for Parquet rows (and the default sqlite storage).")
@click.option("--backend", default="gpu", show_default=True, type=click.Choice(list(BACKENDS)),
              help="gpu: real kernels; synthetic: the CPU cost model (rows marked backend=synthetic).")
@click.option("--trial-timeout", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
              help="Seconds a timed trial may take before its process is killed (status timeout).")
@click.option("--compile-workers", type=click.IntRange(min=1), default=None,
              help="Compile processes (and concurrent trials) per worker; default: CPU cores.")
@click.option("--finalists", type=click.IntRange(min=1), default=3, show_default=True,
              help="Best configs re-benchmarked (interleaved, with the heuristic) per problem.")
@click.option("--seed", type=int, default=None, help="Sampler seed.")
@click.option("--skip-swept", is_flag=True, default=False,
              help="Leave out problems already swept on this device class and kernel source per the rows under "
                   "--results (a re-bench, or --trials trials): resumes from the committed Parquet on a machine "
                   "without the study database.")
def sweep_command(ops, problem_set, shapes, outs, in_dtype, layouts, trials, time_budget, wall_budget, storage, gpus, results_dir, backend,
                  limit_shapes, trial_timeout, compile_workers, finalists, seed, skip_swept):
    """Tune the knobs of OP on every shape of a problem set (resumes by default)."""
    gpu_list = parse_gpus(gpus)
    check_gpus(backend, gpu_list)
    problems = chosen_problems(ops, problem_set, shapes, outs, in_dtype, layouts, limit_shapes, "sweep")
    spec, info = run_sweep(problems, backend, Path(results_dir), storage, gpu_list, trials, time_budget, wall_budget,
                           trial_timeout, compile_workers, finalists, seed, skip_swept)
    click.echo(format_summary(spec.storage, spec, info))
    click.echo(f"rows under {spec.results}")
