"""The benchmark report: which row stands for each problem (lutforge as its public op delivers, the best
search trial, the heuristic, each peer), their geomeans and speedup ratios per problem set, rendered as
BENCHMARKS.md-style markdown.

Everything in the report is computed from the Parquet rows; the heatmaps use the same per-problem picks
(`picks`) so both views agree on which measurement a problem's number comes from.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import click
import numpy as np
import pandas as pd

from kernels.family import all_ops, family_of_op
from kernels.problem import FP4_BLOCK

from .families import harness
from .host_cost import IMPLS as HOST_IMPLS
from .results_io import OWN_IMPLS, PROBLEM_COLUMNS, PROBLEM_DEFAULTS, problem_of_row, read_results, superseded
from .schema import KNOB_CHOICES, KNOB_COLUMNS

# A problem: the shape and formats one measurement answers (the device is fixed per report/heatmap).
PROBLEM_KEY = list(PROBLEM_COLUMNS)
REQUIRED_COLUMNS = {"kind", "impl", "config_source", "status", "problem_set", "median_us", "gbps", "pct_copy",
                    "copy_gbps", "device_name", "backend", "run_id", *PROBLEM_KEY, *KNOB_COLUMNS}
# "lutforge" is what a user's call of the public op gets (bench rows: runtime dispatch, LUT tier or
# fallback); "best trial" the fastest config the search measured, which a user gets only where the LUT
# ships it; "lutforge heuristic" the fallback config alone.
LUTFORGE, BEST_TRIAL, HEURISTIC, BEST_PEER = "lutforge", "best trial", "lutforge heuristic", "best peer"
OWN_SERIES = (LUTFORGE, BEST_TRIAL, HEURISTIC, BEST_PEER)
# Which kind of row stands for a problem when several exist: interleaved re-bench of the finalists is
# the most careful timing, then the search trials, then bench runs.
KIND_PREFERENCE = ("rebench", "trial", "bench")
VERSION_FIELDS = ("device_name", "device_class", "sm", "sm_count", "sm_clock_mhz", "mem_clock_mhz", "driver",
                  "cuda", "torch", "cutlass_dsl", "lutforge", "git_commit")


def load_ok_rows(results_dir: str | os.PathLike, ops: tuple[str, ...] = (), device: str | None = None) -> pd.DataFrame:
    """The ok rows of one device under `results_dir`, restricted to `ops`; ValueError says what is missing."""
    df = read_results(results_dir)
    missing = REQUIRED_COLUMNS - set(df.columns)
    if missing:
        raise ValueError(f"{results_dir}: rows lack columns {sorted(missing)}; not lutforge results")
    if df.empty:
        raise ValueError(f"{results_dir}: the results hold no rows")
    df = df.assign(superseded=superseded(df))  # kept for harness facts (sweep wall time); picks skip them
    unknown = set(ops) - set(all_ops())
    if unknown:
        raise ValueError(f"unknown op(s) {sorted(unknown)}; known: {', '.join(all_ops())}")
    if ops:
        present = sorted(df["op"].dropna().unique())
        df = df[df["op"].isin(ops)]
        if df.empty:
            raise ValueError(f"no rows for op(s) {', '.join(ops)} in {results_dir}; ops there: {', '.join(present)}")
    ok = df[(df["status"] == "ok") & (df["kind"] != "host")].copy()  # host rows: load_host_rows
    if ok.empty:
        seen = ", ".join(f"{s}: {n}" for s, n in df["status"].value_counts(dropna=False).items())
        raise ValueError(f"no rows with status ok in {results_dir} (statuses: {seen})")
    devices = sorted(ok["device_name"].dropna().unique())
    if device is not None:
        ok = ok[ok["device_name"] == device]
        if ok.empty:
            raise ValueError(f"no ok rows for device {device!r}; devices there: {', '.join(devices) or 'none named'}")
    elif len(devices) > 1:
        raise ValueError(f"ok rows come from several devices ({'; '.join(devices)}); choose one with --device")
    own = ok["kind"].isin(("trial", "rebench"))
    ok.loc[own, "impl"] = ok.loc[own, "impl"].fillna("lutforge")  # search rows are lutforge's own configs
    for col in ("op", "out_format", "in_dtype", "T", "C", "kind", "impl"):
        if ok[col].isna().any():
            raise ValueError(f"{int(ok[col].isna().sum())} ok rows have no {col}; the results are damaged")
    foreign = sorted(set(ok["op"]) - set(all_ops()))
    if foreign:
        raise ValueError(f"rows name ops this lutforge does not know: {', '.join(foreign)}")
    bad_time = ~(ok["median_us"] > 0)
    if bad_time.any():
        raise ValueError(f"{int(bad_time.sum())} ok rows have no positive median_us; the results are damaged")
    for col, default in PROBLEM_DEFAULTS.items():
        ok[col] = ok[col].fillna(default)
    ok = ok.astype({"heads": "int64", "T": "int64", "C": "int64", "N": "int64", "S": "int64"})
    return ok


def filter_rows(rows: pd.DataFrame, problem_set: str | None = None,
                shapes: list[tuple[int, int, int | None]] | None = None) -> pd.DataFrame:
    """`rows` of one problem set (a shipped name, or a .toml path: rows carry its file stem) and/or of
    the given shapes ((T, C, heads) as `sweep_cmd.parse_shapes` returns; heads None = a row op);
    ValueError when nothing is left, naming what there is."""
    if problem_set is not None:
        name = Path(problem_set).stem if problem_set.endswith(".toml") else problem_set
        there = sorted(rows["problem_set"].dropna().unique())
        rows = rows[rows["problem_set"] == name]
        if rows.empty:
            raise ValueError(f"no rows of problem set {name!r}; sets there: {', '.join(there) or 'none'}")
    if shapes is not None:
        wanted: dict = {}  # (op, formats, layout) -> the problem keys the shapes name (families without: none)

        def named(r) -> bool:
            kind = (r["op"], r["in_dtype"], r["out_format"], r["scale_layout"])
            fam = family_of_op(kind[0])
            if kind not in wanted:
                try:
                    wanted[kind] = {fam.key(p) for p in harness(fam).inline_problems(*kind[:1], shapes, *kind[1:])}
                except ValueError:
                    wanted[kind] = set()
            return tuple(r[f] for f in fam.key_fields) in wanted[kind]

        rows = rows[[named(r) for _, r in rows.iterrows()]]
        if rows.empty:
            raise ValueError("no rows of the shapes given (TxC for row ops, TxHxD for per-head ops)")
    return rows


def load_host_rows(results_dir: str | os.PathLike, device: str | None = None) -> pd.DataFrame:
    """The ok host-cost rows (kind host, `lutforge bench --host`) under `results_dir`; empty if none."""
    df = read_results(results_dir)
    if "host_us" not in df.columns:
        return df.iloc[0:0]
    # per problem, only runs of the newest kernel source: an older call path is not what users get
    host = df[(df["kind"] == "host") & (df["status"] == "ok") & (df["host_us"] > 0) & ~superseded(df)]
    if device is not None:
        host = host[host["device_name"] == device]
    for col, default in PROBLEM_DEFAULTS.items():
        host = host.assign(**{col: host[col].fillna(default)})
    return host


HOST_BUDGET_FP4 = 2.0  # FP4 ops may cost up to 2x torch's F.rms_norm on the host (their outputs are two tensors)


def render_host(host: pd.DataFrame) -> list[str]:
    """Host microseconds per eager call per problem and impl (median over runs), with the verdict against
    torch's F.rms_norm at the same shape: at or below it, FP4 outputs within HOST_BUDGET_FP4 of it."""
    if host.empty:
        return []
    host = host.assign(**{c: v for c, v in PROBLEM_DEFAULTS.items() if c not in host.columns})
    per_run = host.groupby(["run_id"] + PROBLEM_KEY + ["impl"], sort=True)["host_us"].median().unstack("impl")
    med = per_run.groupby(level=PROBLEM_KEY, sort=True).median()
    # the verdict compares lutforge with torch inside each run (same machine, same moment), then takes the median
    ratio = (per_run["lutforge"] / per_run["torch_rms_norm"]).groupby(level=PROBLEM_KEY).median() \
        if {"lutforge", "torch_rms_norm"} <= set(per_run.columns) else pd.Series(dtype=float)
    impls = [i for i in HOST_IMPLS if i in med.columns]
    runs = host["run_id"].nunique()
    lines = ["## Host cost per eager call", "",
             f"`lutforge bench --host` (sweep/host_cost.py), {len(host)} rows from {runs} run(s) "
             f"({_distinct(host['run_id'])}): host µs per call, median over repeats of back-to-back calls while a "
             "sleep kernel keeps the GPU busy (CPU time only), then over runs. lutforge = the public op; "
             "lutforge_custom_op = the torch custom op torch.compile graphs call; lutforge_launch = the compiled "
             "TVM-FFI function alone (the floor); cute_jit_launch = the same kernel through CuTe-DSL's own "
             "executor; torch_rms_norm = F.rms_norm at that shape (the budget); torch_eager = the op as torch ops. "
             "ratio = lutforge / torch_rms_norm within a run, median over runs.", ""]
    body, met, total = [], 0, 0
    for key, r in med.iterrows():
        k = dict(zip(PROBLEM_KEY, key))
        op, out, layout = k["op"], k["out_format"], k["scale_layout"]
        limit = HOST_BUDGET_FP4 if out in FP4_BLOCK else 1.0
        q = ratio.get(key, float("nan"))
        judged = q == q
        ok = judged and q <= limit
        total += judged
        met += bool(ok)
        body.append([op, out + ("/swz" if layout == "swizzled" else ""), shape_text(k)]
                    + [_fmt(r.get(i), ".1f") for i in impls]
                    + [_fmt(q, ".2f"), ("yes" if ok else "**no**") if judged else "–"])
    lines += _table(["op", "out", "shape", *impls, "ratio", "≤ budget"], body) + [""]
    lines += [f"lutforge within budget on {met} of {total} problems (budget: torch's F.rms_norm at the same shape "
              f"in the same run; FP4 outputs {HOST_BUDGET_FP4:g}× it).", ""]
    return lines


def render_e2e(results_dir) -> list[str]:
    """The end-to-end records under `results_dir`/e2e (benchmarks/llama_forward.py, wan_vae_decode.py,
    cold_start.py)."""
    import json

    d = Path(results_dir) / "e2e"
    lines = []
    llama = d / "llama_forward.json"
    if llama.exists():
        rec = json.loads(llama.read_text())
        c = rec["config"]
        lines += ["## End to end: transformers LlamaForCausalLM", "",
                  f"`benchmarks/llama_forward.py` on {rec['device']} (torch {rec.get('torch', '?')}): {c['layers']} "
                  f"layers, hidden {c['hidden']}, GQA {c['heads']}/{c['kv_heads']}, random weights, bf16, one "
                  "sequence; stock vs `kernels.patch_rmsnorm` (every LlamaRMSNorm through ops.rmsnorm). ms per "
                  "forward; error = ‖logits − fp32 model's‖ / ‖fp32 model's‖.", ""]
        body = [[str(r["T"]), str(r["patched_norms"]), _fmt(r["stock_eager_ms"], ".3f"), _fmt(r["lutforge_eager_ms"], ".3f"),
                 _fmt(r["eager_speedup"], ".2f") + "×", _fmt(r["stock_graph_ms"], ".3f"),
                 _fmt(r["lutforge_graph_ms"], ".3f"), _fmt(r["graph_speedup"], ".2f") + "×",
                 _fmt(r.get("stock_rel_err_vs_fp32"), ".2e"), _fmt(r.get("lutforge_rel_err_vs_fp32"), ".2e"),
                 str(r["compiles"])] for r in rec["rows"]]
        lines += _table(["T", "norms", "stock eager", "lutforge eager", "speedup", "stock graph", "lutforge graph",
                         "speedup", "error stock", "error lutforge", "compiles"], body) + [""]
    decode = d / "wan_vae_decode.md"
    if decode.exists():  # benchmarks/wan_vae_decode.py's own table, its headings one level down
        lines += [("#" + ln if ln.startswith("#") else ln) for ln in decode.read_text().splitlines()] + [""]
    cold = d / "cold_start.json"
    if cold.exists():
        rec = json.loads(cold.read_text())
        lines += ["## Cold start", "", f"`benchmarks/cold_start.py`: a fresh process with an empty disk cache imports "
                  f"kernels.ops and calls {rec['op']} at {rec['T']}×{rec['C']} (seconds; torch's own import and CUDA "
                  "context are listed apart).", ""]
        body = [[mode, _fmt(r["import_torch_s"], ".2f"), _fmt(r["import_kernels_s"], ".3f"), _fmt(r["cuda_init_s"], ".2f"),
                 _fmt(r["first_call_s"], ".3f"), _fmt(r["kernels_import_plus_first_call_s"], ".3f"), str(r["compiles"]),
                 str(r["cutlass_imported"])] for mode in ("aot", "jit") for r in rec.get(mode, [])]
        lines += _table(["library", "import torch", "import kernels", "CUDA init", "first call",
                         "kernels import + first call", "compiles", "cutlass imported"], body) + [""]
    return lines


def _knob_value(name: str, v):
    """A knob value as its choice list types it (pandas turns int columns with gaps into floats)."""
    kind = type(KNOB_CHOICES[name][0])
    return kind(v) if kind in (bool, int) else v


def knob_text(row: pd.Series, sep: str = ", ") -> str:
    """The knobs a row ran with, as name=value (empty for peers, which have none)."""
    return sep.join(f"{c[len('knob_'):]}={_knob_value(c[len('knob_'):], row[c])}"
                    for c in KNOB_COLUMNS if c in row and pd.notna(row[c]))


def _pick(rows: pd.DataFrame, series: str, prefer: tuple[str, ...] = KIND_PREFERENCE) -> pd.DataFrame:
    """Per problem: among rows of the most preferred kind present, the fastest."""
    rank = rows["kind"].map({k: i for i, k in enumerate(prefer)}).fillna(len(prefer))
    best = (rows.assign(_rank=rank).sort_values(["_rank", "median_us"], kind="stable")
            .groupby(PROBLEM_KEY, sort=True).head(1).drop(columns="_rank"))
    best = best.assign(series=series)
    best["knobs"] = best.apply(knob_text, axis=1) if len(best) else pd.Series(dtype=str)
    return best


def _newest(rows: pd.DataFrame, series: str) -> pd.DataFrame:
    """Per problem, its newest row: what the public op does now. A LUT or dispatch change can make a later
    bench slower (on the H200 a LUT range stretched 64x past its swept T made rmsnorm 99840x64 3.8x slower
    than the fallback, bench f73340197abc), and the fastest of several benches would hide that."""
    if "timestamp" not in rows.columns or rows.empty:
        return _pick(rows, series)
    newest = rows.assign(_t=pd.to_datetime(rows["timestamp"], utc=True, format="ISO8601", errors="coerce"))
    newest = newest.sort_values("_t", kind="stable").groupby(PROBLEM_KEY, sort=True).tail(1).drop(columns="_t")
    return _pick(newest, series)


def picks(rows: pd.DataFrame) -> pd.DataFrame:
    """The row that stands for each (problem, series): `LUTFORGE` (the public op, timed by `lutforge
    bench`: its newest row), `BEST_TRIAL` (the fastest search row), `HEURISTIC` (the fallback config: config_source
    heuristic, or the lutforge_heuristic bench impl) and every peer measured by a bench run (kind bench, by
    impl). Rows of a replaced kernel source (`superseded`) stand for nothing."""
    if "superseded" in rows.columns:
        rows = rows[~rows["superseded"]]
    impl, src, kind = rows["impl"], rows["config_source"], rows["kind"]
    parts = [_newest(rows[(impl == "lutforge") & (kind == "bench")], LUTFORGE),
             _pick(rows[(impl == "lutforge") & kind.isin(("rebench", "trial"))], BEST_TRIAL),
             # the fallback's bench row first: timed in the same run as the public op it is compared with
             _pick(rows[(impl == "lutforge_heuristic") | ((impl == "lutforge") & (src == "heuristic"))], HEURISTIC,
                   ("bench", "rebench", "trial"))]
    peers = rows[(rows["kind"] == "bench") & ~impl.isin(OWN_IMPLS)]
    parts += [_pick(g, name) for name, g in peers.groupby("impl", sort=True)]
    return pd.concat(parts, ignore_index=True)


def stale_dispatch(p: pd.DataFrame) -> pd.DataFrame:
    """The `LUTFORGE` picks of `p` whose timed config is not what this checkout's runtime dispatches for their
    problem now (kernels.dispatch.select_config on the family's dispatch_key, the bench's contiguous aligned
    tensors): a LUT export or heuristic change after the bench. Their figures are what the op did then; a new
    `lutforge bench` of their set measures what it does now."""
    from kernels.dispatch import select_config
    from kernels.family import family_of

    stale = []
    for i, r in p[p["series"] == LUTFORGE].iterrows():
        try:
            prob = problem_of_row(r)
            fam = family_of(prob)
            now = select_config(fam.dispatch_key(prob), int(r["sm"]), r["device_class"])[0]
            was = fam.row_config(r)
        except (ValueError, KeyError, TypeError):  # a row this checkout cannot rebuild: nothing to compare
            continue
        if was != now:
            stale.append(i)
    return p.loc[stale]


def peer_names(p: pd.DataFrame) -> list[str]:
    return sorted(set(p["series"]) - set(OWN_SERIES))


def reference(p: pd.DataFrame) -> str:
    """The series speedups are taken against: the public op where it was benched, else the best trial
    (a sweep without a bench run has nothing else)."""
    return LUTFORGE if (p["series"] == LUTFORGE).any() else BEST_TRIAL


def best_peer(p: pd.DataFrame) -> pd.DataFrame:
    """Per problem, the fastest peer's pick (its `impl` names which peer), as series `BEST_PEER`."""
    peers = p[p["series"].isin(peer_names(p))]
    best = peers.sort_values("median_us", kind="stable").groupby(PROBLEM_KEY, sort=True).head(1)
    return best.assign(series=BEST_PEER)


def speedups(p: pd.DataFrame, against: str, ours: str | None = None) -> pd.DataFrame:
    """Per problem having both: `against`'s time / `ours`'s time (default `reference(p)`; > 1: lutforge is
    faster), with both picks."""
    ours = ours or reference(p)
    both = p[p["series"] == ours].merge(p[p["series"] == against], on=PROBLEM_KEY, suffixes=("", "_other"))
    return pd.concat([both, (both["median_us_other"] / both["median_us"]).rename("speedup")], axis=1)


def geomean(values) -> float:
    v = np.asarray(list(values), dtype=float)
    if v.size == 0 or not np.all(v > 0):
        raise ValueError("geomean needs one or more positive values")
    return float(np.exp(np.mean(np.log(v))))


def section_summary(p: pd.DataFrame) -> pd.DataFrame:
    """One row per series of a section's picks: shapes, geomean µs/GB/s/% of copy (over shapes with
    positive bandwidth) and the reference series' (`reference`) geomean speedup over that series on the
    shapes both have."""
    if len(peer_names(p)) > 1:
        p = pd.concat([p, best_peer(p)], ignore_index=True)
    ref = reference(p)
    order = [LUTFORGE, BEST_TRIAL, HEURISTIC, *peer_names(p), BEST_PEER]
    out = []
    for s in order:
        sp = p[p["series"] == s]
        if sp.empty:
            continue
        pos = sp[sp["gbps"] > 0]
        ratio = speedups(p, s, ref) if s != ref else None
        out.append({
            "series": s,
            "shapes": len(sp),
            "geomean_us": geomean(sp["median_us"]),
            "geomean_gbps": geomean(pos["gbps"]) if len(pos) else math.nan,
            "geomean_pct_copy": geomean(pos["pct_copy"]) if len(pos) and (pos["pct_copy"] > 0).all() else math.nan,
            "speedup": geomean(ratio["speedup"]) if ratio is not None and len(ratio) else math.nan,
            "speedup_shapes": len(ratio) if ratio is not None else len(sp),
            "synthetic": int((sp["backend"] == "synthetic").sum()),
        })
    return pd.DataFrame(out)


def shape_text(row: pd.Series) -> str:
    """The row's shape as its family prints it (T x C; channel-first N x C x S; fused MoE T and the layer),
    plus what else tells this problem apart from its neighbours."""
    return harness(row["family"]).shape_text(row)


def _fmt(x: float, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _distinct(values) -> str:
    vals = sorted({str(v) for v in values if pd.notna(v) and str(v) != ""})
    return "; ".join(vals) if vals else "not recorded"


def render_report(rows: pd.DataFrame, source: str = "", worst: int = 5, allow_synthetic: bool = False,
                  host: pd.DataFrame | None = None) -> str:
    """Markdown for `rows` (the output of `load_ok_rows`). Refuses synthetic-backend rows unless
    `allow_synthetic`, and then labels them on every level they appear."""
    if worst < 0:
        raise ValueError(f"worst must be >= 0, got {worst}")
    synthetic = rows[rows["backend"] == "synthetic"]
    if len(synthetic) and not allow_synthetic:
        raise ValueError(f"{len(synthetic)} of {len(rows)} ok rows come from the synthetic backend "
                         f"(runs {_distinct(synthetic['run_id'])}): they are not measurements. Point --results at "
                         "GPU runs, or pass --allow-synthetic for a report labelled as synthetic.")
    p = picks(rows)
    lines = ["# lutforge benchmarks", ""]
    if len(synthetic):
        lines += [f"> **⚠ SYNTHETIC BACKEND — NOT MEASUREMENTS.** {len(synthetic)} of {len(rows)} rows come from "
                  f"the synthetic backend (runs {_distinct(synthetic['run_id'])}); numbers computed from them describe "
                  "the test generator, not a GPU. Sections below say how many of their picks are synthetic.", ""]
    lines += [f"Generated by `lutforge report` from {len(rows)} ok rows" + (f" under `{source}`" if source else "")
              + ". Per problem, **lutforge** is the public op as a user calls it (timed by `lutforge bench`: the "
              "runtime's dispatch, LUT tier or fallback), best trial the fastest config the sweep measured "
              "(re-bench preferred over search trials), lutforge heuristic the fallback config, and each peer its "
              "bench row. Speedup = the other time / lutforge's time on the shapes both have (> 1: lutforge is "
              "faster); a section without bench rows takes best trial as the reference and says so. Geomeans of "
              "GB/s and % of copy leave out shapes with no bandwidth (T = 0)."
              + (f" {int(rows['superseded'].sum())} lutforge rows measured a kernel source that a later run "
                 "replaced on the same problem; they stand for nothing here except the sweep wall time."
                 if "superseded" in rows.columns and rows["superseded"].any() else ""), ""]
    stale = stale_dispatch(p)
    if len(stale):
        n_pub = int((p["series"] == LUTFORGE).sum())
        ops = "; ".join(f"{op} {n}" for op, n in stale["op"].value_counts().sort_index().items())
        lines += [f"> **{len(stale)} of {n_pub} public-op rows timed a config the runtime of this checkout no longer "
                  f"dispatches** (a LUT export or heuristic change came after their bench: {ops}). Their figures, "
                  "targets included, are what the op did then; `lutforge bench` over their sets measures what it "
                  "does now.", ""]
    lines += ["## Device and versions", ""]
    info = [[f, _distinct(rows[f])] for f in VERSION_FIELDS if f in rows.columns]
    copy = rows["copy_gbps"].dropna()
    info.append(["copy roofline GB/s (median, min–max of rows)",
                 f"{copy.median():.0f} ({copy.min():.0f}–{copy.max():.0f})" if len(copy) else "not recorded"])
    info.append(["runs", _distinct(rows["run_id"])])
    info.append(["timestamps", f"{rows['timestamp'].min()} – {rows['timestamp'].max()}"
                 if "timestamp" in rows.columns and rows["timestamp"].notna().any() else "not recorded"])
    info.append(["rows by backend", "; ".join(f"{b}: {n}" for b, n in rows["backend"].fillna("unknown")
                                              .value_counts().sort_index().items())])
    lines += _table(["field", "value"], info) + [""]
    from .targets import render as render_targets  # targets build on this module's picks

    lines += render_targets(rows)
    if host is not None:
        lines += render_host(host)
    if source:
        lines += render_e2e(source)

    members = rows[PROBLEM_KEY + ["problem_set"]].assign(problem_set=rows["problem_set"].fillna("(no problem set)"))
    members = members.drop_duplicates()
    for (pset, op, out), mem in members.groupby(["problem_set", "op", "out_format"], sort=True):
        sec = p.merge(mem[PROBLEM_KEY].drop_duplicates(), on=PROBLEM_KEY, how="inner")
        if sec.empty:
            continue
        lines += _section(pset, op, out, sec, worst)
    return "\n".join(lines).rstrip() + "\n"


def _section(pset: str, op: str, out: str, sec: pd.DataFrame, worst: int) -> list[str]:
    n_shapes = len(sec[PROBLEM_KEY].drop_duplicates())
    lines = [f"## {pset} — {op} → {out}", "", f"{n_shapes} shapes."]
    n_syn = int((sec["backend"] == "synthetic").sum())
    if n_syn:
        lines[-1] += f" **⚠ {n_syn} of {len(sec)} picks here are synthetic-backend rows.**"
    ref = reference(sec)
    if ref != LUTFORGE:
        lines[-1] += " No bench run of the public op here: speedups are against the best trial."
    zero = sec[(sec["series"] == ref) & ~(sec["gbps"] > 0)]
    if len(zero):
        lines[-1] += f" {len(zero)} shapes without bandwidth (T = 0) left out of the GB/s geomeans."
    summary = section_summary(sec)
    body = []
    for r in summary.itertuples():
        speed = "1 (reference)" if r.series == ref else f"{_fmt(r.speedup, '.2f')}× ({r.speedup_shapes} shapes)"
        name = r.series + (" ⚠ synthetic" if r.synthetic else "")
        body.append([name, str(r.shapes), _fmt(r.geomean_us, ".2f"), _fmt(r.geomean_gbps, ".0f"),
                     _fmt(r.geomean_pct_copy, ".1f"), speed])
    lines += [""] + _table(["implementation", "shapes", "geomean µs", "geomean GB/s", "geomean % of copy",
                            f"{ref} speedup (geomean)"], body) + [""]
    tuned = sec[sec["series"] == ref].sort_values(["pct_copy", "T", "C"], kind="stable").head(worst)
    if len(tuned):
        lines += [f"Worst shapes for {ref} (lowest % of copy, {len(tuned)} of {n_shapes}):", ""]
        body = [[shape_text(r), _fmt(r["median_us"], ".2f"), _fmt(r["gbps"], ".0f"), _fmt(r["pct_copy"], ".1f"),
                 r["backend"], r["knobs"] or "–"] for _, r in tuned.iterrows()]
        shape = harness(tuned["family"].iloc[0]).shape_header if tuned["family"].nunique() == 1 else "shape"
        lines += _table([shape, "µs", "GB/s", "% of copy", "backend", "knobs"], body) + [""]
    return lines


@click.command("report")
@click.option("--results", "results_dir", required=True, type=click.Path(path_type=Path),
              help="Directory of Parquet results (searched recursively).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Markdown file to write (default: print to stdout).")
@click.option("--op", "ops", multiple=True, type=click.Choice(list(all_ops())), metavar="OP",
              help=f"Only these ops (repeatable): {', '.join(all_ops())}.")
@click.option("--device", default=None, help="Device name to report on when the rows span several.")
@click.option("--problem-set", default=None, help="Only this problem set: a shipped name or a .toml path.")
@click.option("--shapes", default=None, help="Only these shapes: TxC for row ops, TxHxD for per-head ops (comma list).")
@click.option("--worst", default=5, show_default=True, type=click.IntRange(min=0),
              help="Worst shapes listed per section.")
@click.option("--allow-synthetic", is_flag=True,
              help="Accept synthetic-backend rows; the report is then labelled as synthetic throughout.")
def report_command(results_dir, output, ops, device, problem_set, shapes, worst, allow_synthetic):
    """Write a BENCHMARKS.md-style summary: geomean GB/s, % of copy and speedups per problem set."""
    from .sweep_cmd import parse_shapes

    try:
        rows = filter_rows(load_ok_rows(results_dir, tuple(ops), device), problem_set,
                           parse_shapes(shapes) if shapes else None)
        host = load_host_rows(results_dir, device)
        if ops:
            host = host[host["op"].isin(ops)]
        text = render_report(rows, source=str(results_dir), worst=worst, allow_synthetic=allow_synthetic, host=host)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
    except OSError as e:
        raise click.ClickException(f"cannot write {output}: {e}") from None
    click.echo(f"wrote {output}", err=True)
