"""Interactive bandwidth heatmaps: one self-contained HTML file (plotly.js inlined, works offline) with
one facet per op x output format, tokens along x, hidden size along y, and the winning knobs on hover.

Cells come from the same per-problem picks as the report (`sweep.report.picks`). Speedup views colour
log2(speedup) on a diverging scale centred at speedup 1, so a 2x win and a 2x loss are equally loud.
"""
from __future__ import annotations

import os
from pathlib import Path

import click
import numpy as np
import pandas as pd

from kernels.problem import OPS

from .report import BEST_PEER, HEURISTIC, TUNED, best_peer, load_ok_rows, peer_names, picks, speedups

METRICS = ("gbps", "pct_copy", "speedup_vs_heuristic", "vs_peer")
FACET_KEY = ["op", "out_format", "in_dtype", "scale_layout", "heads"]
DIV_ID = "lutforge-heatmap"  # the plotly graph div, for scripts and tests that inspect the page


def _measured(name: str, us: float, gbps: float, pct: float, knobs: str) -> str:
    s = f"{name}: {us:.2f} µs, {gbps:.0f} GB/s, {pct:.1f} % of copy"
    return s + (f"<br>knobs: {knobs.replace(', ', '<br>  ')}" if knobs else "")


def metric_cells(p: pd.DataFrame, metric: str, peer: str | None = None) -> tuple[pd.DataFrame, str]:
    """Per problem: `value` to colour and `hover` text for `metric`, plus the metric's title.
    Raises ValueError when the picks hold nothing to plot for it."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if peer is not None and metric != "vs_peer":
        raise ValueError("--peer applies only to --metric vs_peer")
    tuned = p[p["series"] == TUNED]
    if tuned.empty:
        raise ValueError("no ok lutforge rows (impl lutforge) to plot; run a sweep first")
    if metric in ("gbps", "pct_copy"):
        cells = tuned.copy()
        cells["value"] = cells[metric]
        cells["hover"] = [_measured(TUNED, r.median_us, r.gbps, r.pct_copy, r.knobs) for r in cells.itertuples()]
        return cells, ("GB/s" if metric == "gbps" else "% of copy roofline") + " of lutforge tuned"
    if metric == "speedup_vs_heuristic":
        against, title = HEURISTIC, "speedup of lutforge tuned over its heuristic"
        if (p["series"] == HEURISTIC).sum() == 0:
            raise ValueError("no heuristic rows (config_source heuristic or impl lutforge_heuristic) to compare with")
    else:
        names = peer_names(p)
        if not names:
            raise ValueError("no bench rows of peers (kind bench, impl other than lutforge*); run a bench first")
        peer = peer or "best"
        if peer == "best":
            p, against, title = pd.concat([p, best_peer(p)], ignore_index=True), BEST_PEER, \
                "speedup of lutforge tuned over the fastest peer per shape"
        elif peer in names:
            against, title = peer, f"speedup of lutforge tuned over {peer}"
        else:
            raise ValueError(f"no bench rows of peer {peer!r}; peers measured: {', '.join(names)} (or 'best')")
    cells = speedups(p, against)
    if cells.empty:
        raise ValueError(f"no problem has both a lutforge tuned row and a {against} row")
    cells["value"] = cells["speedup"]
    cells["hover"] = [
        f"speedup {r.speedup:.2f}×<br>" + _measured(TUNED, r.median_us, r.gbps, r.pct_copy, r.knobs) + "<br>"
        + _measured(r.impl_other if against == BEST_PEER else against, r.median_us_other, r.gbps_other,
                    r.pct_copy_other, r.knobs_other)
        for r in cells.itertuples()]
    return cells, title


def _facet_title(op: str, out: str, in_dtype: str, layout: str, heads: int) -> str:
    t = f"{op}: {in_dtype} → {out}"
    if OPS[op].fp4_scales:
        t += f", {layout} scales"
    if OPS[op].per_head:
        t += f", {heads} heads"
    return t


def heatmap_figure(rows: pd.DataFrame, metric: str = "gbps", peer: str | None = None):
    """A plotly Figure for the ok rows of one device (`load_ok_rows`): one heatmap trace per facet."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    cells, title = metric_cells(picks(rows), metric, peer)
    speedup = metric in ("speedup_vs_heuristic", "vs_peer")
    cells["z"] = np.log2(cells["value"]) if speedup else cells["value"]
    op_order = {op: i for i, op in enumerate(OPS)}
    facets = sorted(cells.groupby(FACET_KEY, sort=False), key=lambda kv: (op_order[kv[0][0]], *kv[0][1:]))
    n_cols = 1 if len(facets) == 1 else 2
    n_rows = -(-len(facets) // n_cols)
    fig = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=[_facet_title(*k) for k, _ in facets],
                        horizontal_spacing=0.1, vertical_spacing=min(0.3, 110 / (420 * n_rows)))
    z = cells["z"]
    if speedup:
        half = max(float(z.abs().max()), 0.1)  # symmetric around speedup 1 (log2 = 0)
        ticks = np.linspace(-half, half, 5)
        scale = dict(colorscale="RdBu", zmin=-half, zmax=half, zmid=0.0,
                     colorbar=dict(title="speedup", tickvals=ticks, ticktext=[f"{2 ** t:.2g}×" for t in ticks]))
    else:
        lo, hi = float(z.min()), float(z.max())
        scale = dict(colorscale="Viridis", zmin=lo, zmax=hi if hi > lo else lo + 1,
                     colorbar=dict(title="GB/s" if metric == "gbps" else "% of copy"))
    for i, (_, f) in enumerate(facets):
        ts, cs = sorted(f["T"].unique()), sorted(f["C"].unique())
        grid = f.set_index(["C", "T"])
        zz = [[grid.at[(c, t), "z"] if (c, t) in grid.index else None for t in ts] for c in cs]
        hover = [[f"T={t} C={c}<br>" + grid.at[(c, t), "hover"] if (c, t) in grid.index else "" for t in ts]
                 for c in cs]
        fig.add_trace(go.Heatmap(x=[str(t) for t in ts], y=[str(c) for c in cs], z=zz, text=hover,
                                 hovertemplate="%{text}<extra></extra>", xgap=1, ygap=1, showscale=(i == 0),
                                 **scale), row=i // n_cols + 1, col=i % n_cols + 1)
    fig.update_xaxes(type="category", title_text="tokens T (log-spaced)")
    fig.update_yaxes(type="category", title_text="hidden size C")
    device = "; ".join(sorted(rows["device_name"].dropna().unique())) or "unnamed device"
    n_syn = int((rows["backend"] == "synthetic").sum())
    label = f" — ⚠ {n_syn} SYNTHETIC-backend rows, not measurements" if n_syn else ""
    fig.update_layout(title=dict(text=f"lutforge: {title} — {device}{label}"), height=420 * n_rows + 140,
                      margin=dict(t=120), template="plotly_white")
    return fig


def write_heatmap(fig, path: str | os.PathLike) -> Path:
    """Write `fig` as one offline HTML file (plotly.js inlined, no network fetches)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(path, include_plotlyjs=True, full_html=True, div_id=DIV_ID, config={"displaylogo": False})
    return path


@click.command("heatmap")
@click.option("--results", "results_dir", required=True, type=click.Path(path_type=Path),
              help="Directory of Parquet results (searched recursively).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="HTML file to write.")
@click.option("--op", "ops", multiple=True, type=click.Choice(list(OPS)), metavar="OP",
              help=f"Only these ops (repeatable): {', '.join(OPS)}.")
@click.option("--metric", type=click.Choice(METRICS), default="gbps", show_default=True,
              help="Colour: bandwidth, % of copy, tuned/heuristic speedup, or lutforge/peer speedup.")
@click.option("--peer", default=None, help="For vs_peer: a peer impl name, or 'best' (default) per shape.")
@click.option("--device", default=None, help="Device name to plot when the rows span several.")
def heatmap_command(results_dir, output, ops, metric, peer, device):
    """Write an interactive, offline HTML heatmap of the results (x = tokens, y = hidden size)."""
    try:
        fig = heatmap_figure(load_ok_rows(results_dir, tuple(ops), device), metric, peer)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    try:
        path = write_heatmap(fig, output)
    except OSError as e:
        raise click.ClickException(f"cannot write {output}: {e}") from None
    click.echo(f"wrote {path} ({len(fig.data)} facets, metric {metric})")
