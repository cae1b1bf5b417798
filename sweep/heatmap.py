"""Interactive heatmaps of the results of one device: one HTML page, one small facet per problem set x
op/format (tokens T along x, hidden size C along y), each cell printing its value, and buttons that swap
every facet to another view (% of copy, GB/s, speedup over the best peer or the heuristic, for the public
op or for the best sweep trial) without leaving the page.

Cells come from the same per-problem picks as the report (`sweep.report.picks`), so both agree on which
row a number comes from. Speedup views colour log2(speedup) on a diverging scale centred at speedup 1, so
a 2x win and a 2x loss are equally loud.

Each facet is two heatmap traces on the same axes: a grey "shapes" layer with a cell for every problem
of the facet, which carries the hover and marks cells the shown view has no row for ("–"), and a
"values" layer on top, coloured and printing each value. Plotly draws nothing, not even text or hover,
for a trace whose z is all empty, so a view with no data in a facet needs the layer below to stay
labelled.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import pandas as pd

from kernels.family import all_ops

from .families import facet_fields, harness
from .report import (BEST_PEER, BEST_TRIAL, HEURISTIC, LUTFORGE, PROBLEM_KEY, best_peer, filter_rows, load_ok_rows,
                     peer_names, picks, reference, speedups)
from .results_io import size_label

METRICS = ("pct_copy", "gbps", "vs_peer", "speedup_vs_heuristic")
SERIES = (LUTFORGE, BEST_TRIAL)  # whose numbers a view shows: the public op, or the best sweep trial
SERIES_LABEL = {LUTFORGE: "lutforge (public op)", BEST_TRIAL: "best trial", HEURISTIC: "lutforge heuristic"}
# a facet: one kind of kernel (the fused MoE's quant mode, activation and routing make kinds of their own)
FACET_KEY = ["family", "op", "out_format", "in_dtype", *facet_fields()]
NO_SET = "(no problem set)"
DIV_ID = "lutforge-heatmap"  # the plotly graph div, for scripts and tests that inspect the page
NO_DATA = "–"  # the text of a cell the shown view has no row for
SHAPES, VALUES = "shapes", "values"  # trace meta of a facet's two layers
SHAPE_GREY = "#e4e4e4"

# Why a cell of a view is empty, by the series it lacks.
MISSING = {LUTFORGE: "no bench row of the public op (lutforge bench)", BEST_TRIAL: "no ok sweep row",
           HEURISTIC: "no heuristic row", BEST_PEER: "no bench row of any peer"}

# Page geometry in pixels: cells have one size everywhere, so a facet's size follows its shape counts.
CELL_W, CELL_H = 56, 24
PAD_L, PAD_R, PAD_T, PAD_B = 66, 24, 44, 46  # around a facet's cells: y ticks, gap, title, x ticks + title
ROW_W = 1240  # facets of one problem set share a row of the page up to this width
MENU_ROW_H, LABEL_W, TITLE_H = 34, 150, 64
MIN_W = LABEL_W + 4 * 170  # room for a row of view buttons
TEXT_PX = 6.6  # the width of one character of a 12 px title, for sizing facets to their titles


@dataclass(frozen=True)
class View:
    """One button's worth of cells: `metric` of `series`, per problem key a (value, cell text)."""

    metric: str
    series: str
    against: str | None  # the series a speedup view divides by; None for gbps / pct_copy
    label: str  # button text
    title: str  # page title while shown
    cells: dict  # problem key tuple -> (value, text)

    @property
    def key(self) -> str:
        return f"{self.metric}:{self.series}"

    @property
    def speedup(self) -> bool:
        return self.against is not None

    @property
    def headline(self) -> str:
        """The hover's line for this view, before the cell's hovertext (its value, or why there is none)."""
        return f"{self.label} of {SERIES_LABEL[self.series]}: "


@dataclass(frozen=True)
class Facet:
    """One panel: the problems of one problem set and op/format; its own axes, sized to Ts x Cs."""

    problem_set: str
    key: tuple  # FACET_KEY values
    Ts: list[str]  # x labels in axis order: T (row family) or N x S (channel-first)
    Cs: list[int]
    cells: dict  # (x label, C) -> problem key (PROBLEM_KEY values) of this set's problems

    @property
    def fields(self) -> dict:
        return dict(zip(FACET_KEY, self.key))

    @property
    def harness(self):
        return harness(self.key[0])

    @property
    def title_lines(self) -> list[str]:
        return [f"{self.problem_set} · {self.key[1]}", self.harness.facet_subtitle(self.fields)]

    @property
    def x_title(self) -> str:
        return self.harness.x_title

    @property
    def name(self) -> str:
        return ": ".join(self.title_lines)


def _key(r: dict) -> tuple:
    return tuple(r[c] for c in PROBLEM_KEY)


def _label(series: str) -> str:
    return SERIES_LABEL.get(series, series)  # peers go by their impl name


def _why(series: str) -> str:
    return MISSING.get(series, f"no bench row of {series}")


# --- what the cells say -------------------------------------------------------------------------------

def _measured(name: str, r: dict, knobs: str | None) -> str:
    """One pick as hover lines: time, bandwidth, % of copy; for the public op how it dispatched; knobs
    (five a line, so the hover stays narrow)."""
    s = f"{name}: {r['median_us']:.2f} µs, {r['gbps']:.0f} GB/s, {r['pct_copy']:.1f} % of copy"
    if r["series"] == LUTFORGE and isinstance(r.get("config_source"), str):
        s += f", dispatch {r['config_source']}"  # lut_exact, lut_range or heuristic (the fallback)
    parts = knobs.split(", ") if knobs else []
    return s + "".join("<br>    " + ", ".join(parts[i:i + 5]) for i in range(0, len(parts), 5))


def problem_details(p: pd.DataFrame) -> dict[tuple, str]:
    """Per problem, one hover entry per series measured (public op, best trial, heuristic, each peer, the
    fastest marked). It is the same under every view, so the page stores it once per cell (customdata)
    and each view adds only its headline."""
    fastest = {_key(r): r["impl"] for r in best_peer(p).to_dict("records")}
    lines: dict[tuple, list[str]] = {}
    knobs_of: dict[tuple, dict[str, str]] = {}  # per problem: knob text -> the first series that ran it
    for s in (LUTFORGE, BEST_TRIAL, HEURISTIC, *peer_names(p)):
        for r in p[p["series"] == s].to_dict("records"):
            k, knobs = _key(r), r.get("knobs") if isinstance(r.get("knobs"), str) else None
            first = knobs_of.setdefault(k, {}).setdefault(knobs, _label(s)) if knobs else None
            text = _measured(_label(s), r, knobs if first in (None, _label(s)) else f"same knobs as {first}")
            lines.setdefault(k, []).append(text + (" ← fastest peer" if fastest.get(k) == s else ""))
    return {k: "<br>".join(v) for k, v in lines.items()}


def check_peer(p: pd.DataFrame, peer: str | None) -> str:
    """The series peer views divide by: BEST_PEER for None/'best', else a peer that was measured."""
    if peer in (None, "best"):
        return BEST_PEER
    names = peer_names(p)
    if peer not in names:
        raise ValueError(f"no bench rows of peer {peer!r}; peers measured: {', '.join(names) or 'none'} (or 'best')")
    return peer


def _pct_text(v: float) -> str:
    return f"{v:.0f}" if v >= 9.95 else f"{v:.1f}"  # "97", and "0.3" rather than "0" for tiny shapes


def measure_view(p: pd.DataFrame, metric: str, series: str, peer: str = BEST_PEER) -> View:
    """The cells of `metric` for `series` from the picks `p` (which hold BEST_PEER rows when peers exist):
    per problem the value and the text the cell prints ("97", "3950", "1.23×")."""
    who = SERIES_LABEL[series]
    if metric in ("gbps", "pct_copy"):
        text = (lambda v: f"{v:.0f}") if metric == "gbps" else _pct_text
        cells = {_key(r): (r[metric], text(r[metric])) for r in p[p["series"] == series].to_dict("records")
                 if np.isfinite(r[metric])}
        title = ("GB/s" if metric == "gbps" else "% of copy roofline") + f" of {who}"
        return View(metric, series, None, "GB/s" if metric == "gbps" else "% of copy", title, cells)
    against = HEURISTIC if metric == "speedup_vs_heuristic" else peer
    ratios = speedups(p, against, series).to_dict("records")
    cells = {_key(r): (r["speedup"], f"{r['speedup']:.2f}×") for r in ratios if np.isfinite(r["speedup"])}
    label = "speedup vs " + {HEURISTIC: "heuristic", BEST_PEER: "best peer"}.get(against, against)
    vs = {HEURISTIC: "the lutforge heuristic", BEST_PEER: "the fastest peer per shape"}.get(against, against)
    return View(metric, series, against, label, f"speedup of {who} over {vs}", cells)


def all_views(p: pd.DataFrame, peer: str | None = None) -> list[View]:
    """Every metric for each series the picks hold (the public op, the best trial, or both)."""
    present = [s for s in SERIES if (p["series"] == s).any()]
    if not present:
        raise ValueError("no ok lutforge rows (bench rows of the public op or sweep trials) to plot; "
                         "run a sweep or a bench first")
    against = check_peer(p, peer)
    if against == BEST_PEER and peer_names(p):
        p = pd.concat([p, best_peer(p)], ignore_index=True)
    return [measure_view(p, m, s, against) for s in present for m in METRICS]


def initial_view(views: list[View], metric: str, p: pd.DataFrame) -> View:
    """The view the page opens on: `metric` of the public op where it was benched, else of the best trial."""
    return next(v for v in views if v.metric == metric and v.series == reference(p))


def keys_by_series(p: pd.DataFrame) -> dict[str, set]:
    """The problem keys each series of the picks `p` has a row for; BEST_PEER: those of any peer."""
    keys = lambda q: set(map(tuple, q[PROBLEM_KEY].itertuples(index=False)))  # noqa: E731
    have = {s: keys(g) for s, g in p.groupby("series")}
    have[BEST_PEER] = keys(p[p["series"].isin(peer_names(p))])
    return have


# --- which problems, in which facets ------------------------------------------------------------------

def problem_members(rows: pd.DataFrame, runs: list[str] | None = None) -> pd.DataFrame:
    """(problem key, problem set) pairs to plot: a problem appears once per set it was measured in. With
    `runs`, only the problems and sets of rows of those runs (e.g. what one `lutforge tune` measured)."""
    if runs:
        there = set(rows["run_id"].dropna())
        if not there & set(runs):
            raise ValueError(f"no ok rows of run(s) {', '.join(runs)}; "
                             f"runs there: {', '.join(sorted(there)) or 'none'}")
        rows = rows[rows["run_id"].isin(runs)]
    members = rows[PROBLEM_KEY + ["problem_set"]].assign(problem_set=rows["problem_set"].fillna(NO_SET))
    return members.drop_duplicates()


def _x_order(r: dict) -> tuple:
    return (int(r["T"]), int(r["N"]))


def make_facets(members: pd.DataFrame) -> list[Facet]:
    """One facet per problem set x FACET_KEY, ordered by set, then op as the families list them, then formats."""
    op_order = {op: i for i, op in enumerate(all_ops())}
    out = []
    for (pset, *key), m in members.groupby(["problem_set"] + FACET_KEY, sort=False):
        recs = sorted(m.to_dict("records"), key=_x_order)
        xs = list(dict.fromkeys(size_label(r) for r in recs))
        out.append(Facet(pset, tuple(key), xs, sorted(m["C"].unique().tolist()),
                         {(size_label(r), r["C"]): _key(r) for r in recs}))
    return sorted(out, key=lambda f: (f.problem_set, op_order[f.key[1]], *f.key[2:]))


# --- one view on one facet ----------------------------------------------------------------------------

def _z(v: float, speedup: bool) -> float:
    """The colour value of a cell: log2 for speedups; 6 significant digits keep the page small."""
    return float(f"{np.log2(v) if speedup else v:.6g}")


@dataclass(frozen=True)
class Grid:
    """A view on a facet, rows by C and columns by T: the values layer's z and printed text, the shapes
    layer's printed text ("–" where the view has no row) and hover text (the value, or why there is none)."""

    z: list
    text: list
    missing: list
    hover: list


def facet_grid(facet: Facet, view: View, have: dict[str, set]) -> Grid:
    """`view` on `facet`; `have` (`keys_by_series`) says which series a cell without a value lacks."""
    cols: tuple[list, list, list, list] = ([], [], [], [])
    for c in facet.Cs:
        row: tuple[list, list, list, list] = ([], [], [], [])
        for t in facet.Ts:
            k = facet.cells.get((t, c))
            if k is None:
                cell = (None, "", "", "")  # white, no hover: the set has no problem here
            elif k in view.cells:
                v, s = view.cells[k]
                cell = (_z(v, view.speedup), s, "", f"<b>{s}</b>")
            else:
                why = [_why(s) for s in (view.series, view.against) if s is not None and k not in have.get(s, ())]
                cell = (None, "", NO_DATA, f"<b>{NO_DATA}</b><br>" + "; ".join(why))
            for part, x in zip(row, cell):
                part.append(x)
        for whole, part in zip(cols, row):
            whole.append(part)
    return Grid(*cols)


def hover_template(facet: Facet, view: View) -> str:
    """Shape, the view's headline and the cell's hovertext (its value or why none), then every series'
    numbers (customdata)."""
    heads = f" ({facet.fields['heads']} heads)" if facet.fields.get("heads", 1) != 1 else ""  # per-head ops
    x = facet.harness.x_symbol
    return f"{x}=%{{x}} C=%{{y}}{heads}<br>{view.headline}%{{hovertext}}<br>%{{customdata}}<extra></extra>"


def shape_z(facet: Facet) -> list:
    """The shapes layer's z: a cell (0, grey) for each problem of the facet, a gap elsewhere."""
    return [[0 if (t, c) in facet.cells else None for t in facet.Ts] for c in facet.Cs]


def restyle_args(facets: list[Facet], view: View, grids: list[Grid]) -> dict:
    """Trace attributes that show `view`, one entry per trace in figure order (shapes, values per facet)."""
    out: dict[str, list] = {"z": [], "text": [], "hovertext": [], "hovertemplate": []}
    for f, g in zip(facets, grids):
        out["z"] += [shape_z(f), g.z]  # shapes z is fixed; listed so each list covers every trace
        out["text"] += [g.missing, g.text]
        out["hovertext"] += [g.hover, None]
        out["hovertemplate"] += [hover_template(f, view), None]
    return out


def facet_traces(i: int, facet: Facet, view: View, grid: Grid, details: dict[tuple, str]) -> list:
    """Facet i's two layers on its own axes, showing `view`: grey shape cells that carry the hover (the
    view's headline, then every series' numbers as customdata, which no button changes) and print "–"
    where the view has no row; on top the coloured values, printing their text."""
    import plotly.graph_objects as go

    n = "" if i == 0 else str(i + 1)
    where = dict(x=list(facet.Ts), y=[str(c) for c in facet.Cs], xaxis=f"x{n}", yaxis=f"y{n}",
                 xgap=1, ygap=1, texttemplate="%{text}", textfont=dict(size=11), name=facet.name)
    details = [[details.get(facet.cells.get((t, c)), "") for t in facet.Ts] for c in facet.Cs]
    shapes = go.Heatmap(**where, z=shape_z(facet), colorscale=[[0, SHAPE_GREY], [1, SHAPE_GREY]], showscale=False,
                        text=grid.missing, hovertext=grid.hover, hovertemplate=hover_template(facet, view),
                        customdata=details, hoverongaps=False, meta=SHAPES)  # no hover where the set has no shape
    values = go.Heatmap(**where, z=grid.z, text=grid.text, coloraxis="coloraxis", hoverinfo="skip", meta=VALUES)
    return [shapes, values]


# --- the page -----------------------------------------------------------------------------------------

def colour_axis(view: View, zs: list[float]) -> dict:
    """The shared colour axis of a view: Viridis over its range, or RdBu symmetric around speedup 1."""
    bar = dict(lenmode="pixels", len=320, thickness=16, y=1, yanchor="top", x=1, xanchor="left", xpad=18)
    if view.speedup:
        half = max(max((abs(z) for z in zs), default=0.0), 0.1)
        ticks = np.linspace(-half, half, 5)
        return dict(colorscale="RdBu", cmin=-half, cmax=half,
                    colorbar=dict(bar, title=dict(text="speedup"), tickvals=ticks.tolist(),
                                  ticktext=[f"{2 ** t:.2g}×" for t in ticks]))
    lo, hi = (min(zs), max(zs)) if zs else (0.0, 1.0)
    return dict(colorscale="Viridis", cmin=lo, cmax=hi if hi > lo else lo + 1,
                colorbar=dict(bar, title=dict(text=view.label)))


def place(facets: list[Facet]) -> tuple[list[tuple[float, float, float, float]], float, float]:
    """Pixel rectangles (left, top, width, height) of each facet's cells, and the plot area's size.
    Facets fill rows left to right; a new problem set starts a new row; a row is as tall as its tallest."""
    rects, x, y, row_h, last_set, width = [], 0.0, 0.0, 0.0, None, 0.0
    for f in facets:
        w, h = len(f.Ts) * CELL_W, len(f.Cs) * CELL_H
        slot_w = PAD_L + max(w, TEXT_PX * max(map(len, f.title_lines))) + PAD_R
        if last_set is not None and (f.problem_set != last_set or x + slot_w > ROW_W):
            x, y, row_h = 0.0, y + row_h, 0.0
        rects.append((x + PAD_L, y + PAD_T, w, h))
        x, row_h, last_set, width = x + slot_w, max(row_h, PAD_T + h + PAD_B), f.problem_set, max(width, x + slot_w)
    return rects, max(width, MIN_W), y + row_h


def _axes(i: int, f: Facet, rect, W: float, H: float) -> dict:
    """Layout entries of facet i's own category axes, placed on its pixel rectangle (a short y title
    where the facet is too low for the long one)."""
    left, top, w, h = rect
    n = "" if i == 0 else str(i + 1)
    y_title = f.harness.c_title(f.fields) if len(f.Cs) >= 3 else "C"
    common = dict(type="category", fixedrange=True, tickfont=dict(size=10), showgrid=False, title_standoff=4)
    return {f"xaxis{n}": dict(common, domain=[left / W, (left + w) / W], anchor=f"y{n}", title_text=f.x_title,
                              categoryorder="array", categoryarray=list(f.Ts)),
            f"yaxis{n}": dict(common, domain=[1 - (top + h) / H, 1 - top / H], anchor=f"x{n}", title_text=y_title,
                              categoryorder="array", categoryarray=[str(c) for c in f.Cs])}


def _facet_title(f: Facet, rect, W: float, H: float) -> dict:
    left, top, _, _ = rect
    return dict(text="<br>".join(f.title_lines), xref="paper", yref="paper", x=(left - PAD_L + 8) / W,
                y=1 - (top - 4) / H, xanchor="left", yanchor="bottom", align="left", showarrow=False,
                font=dict(size=12))


def _view_title(view: View, head: str, n_problems: int) -> str:
    shown = len(view.cells)
    note = f"{shown} of {n_problems} shapes" if shown else f"no data: {_why(view.against or view.series)}"
    return f"{head}: {view.title} — {note}"


def _menus(facets: list[Facet], views: list[View], grids: dict, titles: dict, axes: dict, initial: str,
           W: float, H: float) -> tuple[list, list]:
    """One row of buttons per series (and its label); each button restyles every trace to its view and
    relayouts the colour axis, the title and which button shows as active (one across the rows)."""
    series = list(dict.fromkeys(v.series for v in views))
    menus, labels = [], []
    for row, s in enumerate(series):
        buttons = []
        for v in (v for v in views if v.series == s):
            active = {f"updatemenus[{j}].active": -1 for j in range(len(series))}
            active[f"updatemenus[{row}].active"] = len(buttons)
            buttons.append(dict(label=v.label, name=v.key, method="update",
                                args=[restyle_args(facets, v, grids[v.key]),
                                      {"coloraxis": axes[v.key], "title.text": titles[v.key], **active}]))
        y = 1 + (10 + (len(series) - row - 0.5) * MENU_ROW_H) / H
        start = next((i for i, b in enumerate(buttons) if b["name"] == initial), -1)
        menus.append(dict(type="buttons", direction="right", showactive=True, active=start, buttons=buttons,
                          x=LABEL_W / W, xanchor="left", y=y, yanchor="middle", pad=dict(t=0, b=0, l=0, r=0),
                          font=dict(size=12)))
        labels.append(dict(text=f"<b>{SERIES_LABEL[s]}</b>", xref="paper", yref="paper", x=0, y=y,
                           xanchor="left", yanchor="middle", showarrow=False, font=dict(size=12)))
    return menus, labels


def _page_head(plotted: pd.DataFrame, runs: list[str] | None) -> str:
    """The start of every view's title: the device, a synthetic-backend warning, the runs shown."""
    device = "; ".join(sorted(plotted["device_name"].dropna().unique())) or "unnamed device"
    n_syn = int((plotted["backend"] == "synthetic").sum())
    head = f"lutforge on {device}" + (f" — ⚠ {n_syn} SYNTHETIC-backend rows, not measurements" if n_syn else "")
    return head + (f" — runs {', '.join(runs)}" if runs else "")


def heatmap_figure(rows: pd.DataFrame, metric: str = "pct_copy", peer: str | None = None,
                   runs: list[str] | None = None):
    """A plotly Figure for the ok rows of one device (`load_ok_rows`, maybe `filter_rows`): two heatmap
    traces per facet, opening on `metric` of the public op (of the best trial without bench rows), with
    buttons for every view. `peer` (a peer name or 'best') sets whom the peer views divide by; `runs`,
    when given, keeps only the problems those runs measured (their numbers are still the picks over all
    `rows`, as in the report). ValueError when no view has anything to show."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    members = problem_members(rows, runs)
    keys = members[PROBLEM_KEY].drop_duplicates()
    p = picks(rows).merge(keys, on=PROBLEM_KEY, how="inner")
    views = all_views(p, peer)
    facets = make_facets(members)
    have = keys_by_series(p)
    grids = {v.key: [facet_grid(f, v, have) for f in facets] for v in views}
    head = _page_head(rows.merge(keys, on=PROBLEM_KEY, how="inner"), runs)
    titles = {v.key: _view_title(v, head, len(keys)) for v in views}
    return _assemble(facets, views, grids, titles, problem_details(p), initial_view(views, metric, p))


def _assemble(facets: list[Facet], views: list[View], grids: dict, titles: dict, details: dict, first: View):
    """The Figure: the traces of each facet showing `first`, facet titles, the colour axis, the buttons."""
    import plotly.graph_objects as go

    axes = {v.key: colour_axis(v, [z for g in grids[v.key] for r in g.z for z in r if z is not None])
            for v in views}
    rects, W, H = place(facets)
    menus, labels = _menus(facets, views, grids, titles, axes, first.key, W, H)
    fig = go.Figure()
    layout = {}
    for i, (f, rect) in enumerate(zip(facets, rects)):
        fig.add_traces(facet_traces(i, f, first, grids[first.key][i], details))
        layout |= _axes(i, f, rect, W, H)
        labels.append(_facet_title(f, rect, W, H))
    top = TITLE_H + len(menus) * MENU_ROW_H + 16
    height = H + top + 16
    fig.update_layout(**layout, coloraxis=axes[first.key], updatemenus=menus, annotations=labels,
                      title=dict(text=titles[first.key], x=0.01, xanchor="left", y=1 - 14 / height, yanchor="top",
                                 font=dict(size=15)),
                      width=W + 140, height=height, autosize=False, margin=dict(l=20, r=120, t=top, b=16),
                      template="plotly_white", hoverlabel=dict(align="left"),
                      meta=dict(views=[v.key for v in views], initial=first.key))
    return fig


def value_traces(fig) -> list:
    """The coloured layer of each facet, in facet order (what a view's numbers are read from)."""
    return [t for t in fig.data if t.meta == VALUES]


def empty_views(fig) -> list[str]:
    """The buttons whose view has no cell with data anywhere (to warn about on the console)."""
    out = []
    for menu in fig.layout.updatemenus:
        for b in menu.buttons:
            if all(z is None for zz in b.args[0]["z"][1::2] for r in zz for z in r):
                out.append(f"{b.label} of {SERIES_LABEL[b.name.split(':', 1)[1]]}")
    return out


# --- writing it ---------------------------------------------------------------------------------------

def shared_plotlyjs(js_path: str | os.PathLike) -> Path:
    """Write plotly's own bundled plotly.min.js to `js_path` unless an identical copy is already there,
    so every page of a results tree can load one copy (the directory travels with every GPU call)."""
    import plotly.offline

    js_path = Path(js_path)
    if js_path.suffix != ".js":
        raise ValueError(f"the shared plotly.js path must end in .js, got {js_path}")
    js = plotly.offline.get_plotlyjs().encode()
    if not (js_path.is_file() and js_path.stat().st_size == len(js) and js_path.read_bytes() == js):
        js_path.parent.mkdir(parents=True, exist_ok=True)
        js_path.write_bytes(js)
    return js_path


def write_heatmap(fig, path: str | os.PathLike, plotlyjs: str | os.PathLike = "inline") -> Path:
    """Write `fig` as an HTML page that works offline. plotlyjs="inline" (default) embeds plotly.js: one
    self-contained ~4.6 MB file. A path instead writes plotly.js there once (`shared_plotlyjs`) and the
    page loads it by a path relative to the page, e.g. results/h100/heatmap.html and
    results/h200/heatmap.html both loading ../plotly.min.js (keep the tree together when moving it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    include: str | bool = True
    if str(plotlyjs) != "inline":
        js = shared_plotlyjs(plotlyjs).resolve()
        try:
            include = Path(os.path.relpath(js, path.parent.resolve())).as_posix()
        except ValueError:  # another drive (Windows): no relative path exists
            include = js.as_uri()
    fig.write_html(path, include_plotlyjs=include, full_html=True, div_id=DIV_ID, config={"displaylogo": False})
    return path


@click.command("heatmap")
@click.option("--results", "results_dir", required=True, type=click.Path(path_type=Path),
              help="Directory of Parquet results (searched recursively).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="HTML file to write.")
@click.option("--op", "ops", multiple=True, type=click.Choice(list(all_ops())), metavar="OP",
              help=f"Only these ops (repeatable): {', '.join(all_ops())}.")
@click.option("--metric", type=click.Choice(METRICS), default="pct_copy", show_default=True,
              help="The view the page opens on (the others are a button away): % of copy, bandwidth, speedup "
                   "over the best (or --peer) peer, or over the heuristic.")
@click.option("--peer", default=None, help="Whom the peer views divide by: a peer impl name, or 'best' (default, "
                                           "the fastest per shape).")
@click.option("--device", default=None, help="Device name to plot when the rows span several.")
@click.option("--problem-set", default=None, help="Only this problem set: a shipped name or a .toml path.")
@click.option("--shapes", default=None, help="Only these shapes: TxC for row ops, TxHxD for per-head ops (comma list).")
@click.option("--run-id", "runs", multiple=True, metavar="RUN",
              help="Only the problems this run measured (repeatable; e.g. a tune's sweep and bench runs).")
@click.option("--plotlyjs", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Share this plotly.js file (written once, e.g. results/plotly.min.js) and load it by a relative "
                   "path instead of inlining 4.6 MB into the page.")
def heatmap_command(results_dir, output, ops, metric, peer, device, problem_set, shapes, runs, plotlyjs):
    """Write an interactive, offline HTML heatmap of the results (x = tokens, y = hidden size): one facet
    per problem set and op/format, a button per view."""
    from .sweep_cmd import parse_shapes

    try:
        rows = filter_rows(load_ok_rows(results_dir, tuple(ops), device), problem_set,
                           parse_shapes(shapes) if shapes else None)
        fig = heatmap_figure(rows, metric, peer, list(runs) or None)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    try:
        path = write_heatmap(fig, output, plotlyjs or "inline")
    except (OSError, ValueError) as e:
        raise click.ClickException(f"cannot write {output}: {e}") from None
    for view in empty_views(fig):
        click.echo(f"note: {view} has no data here; its cells show {NO_DATA} and their hover says why", err=True)
    meta = fig.layout.meta
    click.echo(f"wrote {path} ({len(value_traces(fig))} facets, {len(meta['views'])} views, opening on "
               f"{meta['initial']})" + (f"; plotly.js from {plotlyjs}" if plotlyjs else ""))
