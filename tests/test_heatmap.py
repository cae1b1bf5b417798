"""`lutforge heatmap`: facets split by problem set and sized to their shapes, every view's cells and hover
come from the right rows (the public op for "lutforge", the re-bench for "best trial"), the buttons swap
every trace, runs / sets / shapes restrict what is plotted, the HTML works offline with plotly.js inlined
or shared, it draws and switches views in a real headless Chromium, and bad inputs end in a click error
rather than a traceback."""
from __future__ import annotations

import io
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from results_rows import DEVICE, public_op_rows, row, sweep_and_bench_rows
from sweep import heatmap
from sweep.cli import main
from sweep.heatmap import CELL_H, CELL_W, DIV_ID, NO_DATA, heatmap_figure, value_traces
from sweep.report import load_ok_rows
from sweep.results_io import append_rows

SHAPES = [(T, C) for T in (1, 16, 256, 4096) for C in (1024, 4096, 8192)]
N_FACETS = 3  # rmsnorm bf16, fused_rmsnorm_silu bf16 and fp8 (results_rows.sweep_and_bench_rows)
METRICS = ("pct_copy", "gbps", "vs_peer", "speedup_vs_heuristic")
VIEWS = [f"{m}:{s}" for s in ("lutforge", "best trial") for m in METRICS]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("results")
    append_rows(d, sweep_and_bench_rows(SHAPES))
    append_rows(d, public_op_rows(SHAPES), prefix="bench")
    return d


@pytest.fixture(scope="module")
def fig(results):
    return heatmap_figure(load_ok_rows(results))


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def src(op="rmsnorm", out="bf16", T=256, C=4096):
    """The rows behind one problem of the `results` fixture, by role."""
    rows = [r for r in sweep_and_bench_rows(SHAPES) + public_op_rows(SHAPES)
            if r["op"] == op and r["out_format"] == out and r["T"] == T and r["C"] == C and r["status"] == "ok"]
    by = lambda **kv: next(r for r in rows if all(r[k] == v for k, v in kv.items()))  # noqa: E731
    return dict(public=by(kind="bench", impl="lutforge"), rebench=by(kind="rebench"),
                trial=by(kind="trial", config_source="search"), heuristic=by(kind="bench", impl="lutforge_heuristic"),  # same run as the public op
                quack=by(impl="quack"), torch_compile=by(impl="torch_compile"))


def button(fig, key):
    return next(b for m in fig.layout.updatemenus for b in m.buttons if b.name == key)


def view(fig, key, facet=0):
    """What a button shows on one facet: the values layer's z and text, the shapes layer's text ("–"
    where the view has no row) and hover text."""
    a = button(fig, key).args[0]
    return dict(z=a["z"][2 * facet + 1], text=a["text"][2 * facet + 1], missing=a["text"][2 * facet],
                hover=a["hovertext"][2 * facet], template=a["hovertemplate"][2 * facet])


def at(grid, fig, T, C, facet=0):
    t = value_traces(fig)[facet]
    return grid[list(t.y).index(str(C))][list(t.x).index(str(T))]


def test_lutforge_is_the_public_op_and_best_trial_the_rebench(fig):
    s = src()
    assert s["trial"]["median_us"] < s["rebench"]["median_us"] < s["public"]["median_us"]
    assert fig.layout.meta["views"] == VIEWS and fig.layout.meta["initial"] == "pct_copy:lutforge"
    assert [t.name for t in value_traces(fig)] == [
        "demo · rmsnorm: bf16 → bf16", "demo · fused_rmsnorm_silu: bf16 → bf16",
        "demo · fused_rmsnorm_silu: bf16 → fp8"]
    t = value_traces(fig)[0]
    assert t.x == ("1", "16", "256", "4096") and t.y == ("1024", "4096", "8192")
    assert at(t.z, fig, 256, 4096) == pytest.approx(s["public"]["pct_copy"], rel=1e-5)  # the page opens on this
    assert at(view(fig, "gbps:lutforge")["z"], fig, 256, 4096) == pytest.approx(s["public"]["gbps"], rel=1e-5)
    # re-bench is preferred over the search trial even when the trial looked faster
    assert at(view(fig, "gbps:best trial")["z"], fig, 256, 4096) == pytest.approx(s["rebench"]["gbps"], rel=1e-5)
    assert DEVICE in fig.layout.title.text and "% of copy roofline of lutforge (public op)" in fig.layout.title.text
    assert "36 of 36 shapes" in fig.layout.title.text


def test_hover_shows_the_view_value_and_every_series(fig):
    s = src()
    shapes = fig.data[0]
    details = at(shapes.customdata, fig, 256, 4096)
    p, b, q = s["public"], s["rebench"], s["quack"]
    for part in (f"lutforge (public op): {p['median_us']:.2f} µs, {p['gbps']:.0f} GB/s, "
                 f"{p['pct_copy']:.1f} % of copy, dispatch lut_exact", "threads=256", "vec_bytes=16", "stage=reg",
                 f"best trial: {b['median_us']:.2f} µs, {b['gbps']:.0f} GB/s", "same knobs as lutforge (public op)",
                 f"quack: {q['median_us']:.2f} µs, {q['gbps']:.0f} GB/s, {q['pct_copy']:.1f} % of copy "
                 "← fastest peer",
                 f"torch_compile: {s['torch_compile']['median_us']:.2f} µs"):
        assert part in details, part
    v = view(fig, "gbps:lutforge")
    assert v["template"].startswith("T=%{x} C=%{y}<br>GB/s of lutforge (public op): %{hovertext}<br>%{customdata}")
    assert at(v["hover"], fig, 256, 4096) == f"<b>{p['gbps']:.0f}</b>"
    peer = view(fig, "vs_peer:best trial")
    assert "speedup vs best peer of best trial: " in peer["template"]
    assert at(peer["hover"], fig, 256, 4096) == f"<b>{q['median_us'] / b['median_us']:.2f}×</b>"


def test_every_view_prints_its_value_in_each_cell(fig):
    s = src()
    fastest = min(s["quack"]["median_us"], s["torch_compile"]["median_us"])
    for series, ours in (("lutforge", s["public"]), ("best trial", s["rebench"])):
        expect = {"pct_copy": f"{ours['pct_copy']:.0f}", "gbps": f"{ours['gbps']:.0f}",
                  "vs_peer": f"{fastest / ours['median_us']:.2f}×",
                  "speedup_vs_heuristic": f"{s['heuristic']['median_us'] / ours['median_us']:.2f}×"}
        for metric, text in expect.items():
            v = view(fig, f"{metric}:{series}")
            assert at(v["text"], fig, 256, 4096) == text, (metric, series)
            for f in range(N_FACETS):  # every cell of every facet prints something, and only values print
                v = view(fig, f"{metric}:{series}", f)
                for zr, tr, mr in zip(v["z"], v["text"], v["missing"]):
                    assert all(z is not None and t and not m for z, t, m in zip(zr, tr, mr))
    small = src(T=1, C=1024)["public"]["pct_copy"]
    assert small < 9.95 and at(view(fig, "pct_copy:lutforge")["text"], fig, 1, 1024) == f"{small:.1f}"  # not "0"


def test_buttons_restyle_every_trace_and_one_is_active(fig):
    first = button(fig, "pct_copy:lutforge").args[0]
    assert [list(map(list, t.z)) for t in fig.data] == first["z"]  # the page opens on what its button shows
    assert [list(map(list, t.text)) for t in fig.data] == first["text"]
    for m, menu in enumerate(fig.layout.updatemenus):
        assert menu.active == (0 if m == 0 else -1)
        for i, b in enumerate(menu.buttons):
            traces, layout = b.args
            for attr in ("z", "text", "hovertext", "hovertemplate"):
                assert len(traces[attr]) == len(fig.data) == 2 * N_FACETS
            assert {k: v for k, v in layout.items() if k.startswith("updatemenus")} == {
                f"updatemenus[{j}].active": (i if j == m else -1) for j in range(2)}
            assert b.name == VIEWS[4 * m + i]
            zs = [z for zz in traces["z"][1::2] for r in zz for z in r if z is not None]
            axis = layout["coloraxis"]
            if "speedup" in b.label:
                assert axis["colorscale"] == "RdBu" and axis["cmin"] == -axis["cmax"]
                assert axis["cmax"] == pytest.approx(max(map(abs, zs)))
            else:
                assert axis["colorscale"] == "Viridis" and (axis["cmin"], axis["cmax"]) == (min(zs), max(zs))
            assert layout["title.text"].startswith(f"lutforge on {DEVICE}: ")
    assert [b.label for b in fig.layout.updatemenus[0].buttons] == [
        "% of copy", "GB/s", "speedup vs best peer", "speedup vs heuristic"]
    labels = [a.text for a in fig.layout.annotations]
    assert labels[:2] == ["<b>lutforge (public op)</b>", "<b>best trial</b>"]


def test_speedup_views_diverge_around_one(results, fig):
    s = src(T=4096, C=8192)
    pub = s["public"]["median_us"]
    v = view(fig, "speedup_vs_heuristic:lutforge")
    assert at(v["z"], fig, 4096, 8192) == pytest.approx(math.log2(s["heuristic"]["median_us"] / pub), rel=1e-5)
    fastest = min(s["quack"]["median_us"], s["torch_compile"]["median_us"])
    assert at(view(fig, "vs_peer:lutforge")["z"], fig, 4096, 8192) == pytest.approx(math.log2(fastest / pub), rel=1e-5)
    axis = button(fig, "vs_peer:lutforge").args[1]["coloraxis"]
    labels = axis["colorbar"]["ticktext"]
    assert labels[len(labels) // 2] == "1×"
    assert float(labels[0][:-1]) == pytest.approx(1 / float(labels[-1][:-1]), 0.05)  # 1/x below, x above

    quack = heatmap_figure(load_ok_rows(results), "vs_peer", "quack")
    assert quack.layout.meta["initial"] == "vs_peer:lutforge"
    assert button(quack, "vs_peer:lutforge").label == "speedup vs quack" and "over quack" in quack.layout.title.text
    assert cell_now(quack, 4096, 8192) == pytest.approx(math.log2(s["quack"]["median_us"] / pub), rel=1e-5)


def cell_now(fig, T, C, facet=0):
    return at(value_traces(fig)[facet].z, fig, T, C, facet)


def test_facets_split_by_problem_set(tmp_path):
    append_rows(tmp_path, [
        row("rmsnorm", "bf16", 1, 4096, 3.0, problem_set="llm"),
        row("rmsnorm", "bf16", 16, 4096, 3.5, problem_set="llm"),
        row("rmsnorm", "bf16", 16, 8192, 4.0, problem_set="llm"),
        row("rmsnorm", "bf16", 1560, 64, 5.0, problem_set="wan_vae"),
        row("rmsnorm", "bf16", 6240, 128, 6.0, problem_set="wan_vae"),
        row("rmsnorm", "bf16", 16, 4096, 3.4, problem_set="wan_vae", run_id="run-b"),  # in both sets
    ])
    fig = heatmap_figure(load_ok_rows(tmp_path))
    llm, wan = value_traces(fig)
    assert (llm.name, wan.name) == ("llm · rmsnorm: bf16 → bf16", "wan_vae · rmsnorm: bf16 → bf16")
    assert (llm.x, llm.y) == (("1", "16"), ("4096", "8192"))
    assert (wan.x, wan.y) == (("16", "1560", "6240"), ("64", "128", "4096"))  # numeric order, not string order
    assert (llm.xaxis, llm.yaxis) != (wan.xaxis, wan.yaxis)
    assert fig.layout[wan.xaxis.replace("x", "xaxis")].categoryarray == wan.x
    # the problem in both sets shows the same pick (the fastest trial of both runs) in each
    assert cell_now(fig, 16, 4096, 0) == cell_now(fig, 16, 4096, 1)
    assert at(llm.z, fig, 1, 8192, 0) is None and at(fig.data[0].text, fig, 1, 8192, 0) == ""  # no shape there
    assert len(fig.layout.updatemenus) == 1 and fig.layout.meta["initial"] == "pct_copy:best trial"  # no bench rows


def _pixels(fig, trace):
    """(left, top, width, height) of a trace's cells on the page, in pixels."""
    L = fig.layout
    W, H = L.width - L.margin.l - L.margin.r, L.height - L.margin.t - L.margin.b
    xd, yd = L[trace.xaxis.replace("x", "xaxis")].domain, L[trace.yaxis.replace("y", "yaxis")].domain
    return xd[0] * W, (1 - yd[1]) * H, (xd[1] - xd[0]) * W, (yd[1] - yd[0]) * H


def test_facets_are_sized_to_their_shapes(tmp_path):
    append_rows(tmp_path, sweep_and_bench_rows([(T, C) for T in (1, 16, 256, 4096) for C in (1024, 4096, 8192)],
                                               (("rmsnorm", "bf16"),)))
    append_rows(tmp_path, sweep_and_bench_rows([(1560, 64)], (("fused_rmsnorm_silu", "nvfp4"),)))
    fig = heatmap_figure(load_ok_rows(tmp_path))
    big, one = (_pixels(fig, t) for t in value_traces(fig))
    assert big[2:] == pytest.approx((4 * CELL_W, 3 * CELL_H)) and one[2:] == pytest.approx((CELL_W, CELL_H))
    assert one[0] >= big[0] + big[2] or one[1] >= big[1] + big[3]  # side by side or below: never overlapping
    assert fig.layout.height < fig.layout.margin.t + 3 * CELL_H + 120  # one row of facets, as tall as the big one


def test_facets_split_scale_layouts_and_head_counts(tmp_path):
    append_rows(tmp_path, [
        row("rmsnorm_fp4quant", "nvfp4", 64, 4096, 5.0),
        row("rmsnorm_fp4quant", "nvfp4", 64, 4096, 6.0, scale_layout="swizzled"),
        row("qk_rmsnorm", "bf16", 64, 128, 3.0, heads=8),
        row("qk_rmsnorm", "bf16", 64, 128, 4.0, heads=32),
        row("qk_rmsnorm", "bf16", 1024, 128, 9.0, heads=32),
    ])
    fig = heatmap_figure(load_ok_rows(tmp_path), "gbps")
    assert [t.name for t in value_traces(fig)] == [
        "demo · qk_rmsnorm: bf16 → bf16, 8 heads", "demo · qk_rmsnorm: bf16 → bf16, 32 heads",
        "demo · rmsnorm_fp4quant: bf16 → nvfp4, rowmajor scales",
        "demo · rmsnorm_fp4quant: bf16 → nvfp4, swizzled scales"]
    assert [len(t.x) for t in value_traces(fig)] == [1, 2, 1, 1]
    assert "(32 heads)" in fig.data[2].hovertemplate


def no_peer_rows():
    """Sweep rows of two shapes, the public op benched on one of them, no peer anywhere."""
    sweep = [r for r in sweep_and_bench_rows([(16, 1024), (256, 1024)], (("rmsnorm", "bf16"),)) if r["kind"] != "bench"]
    return sweep + public_op_rows([(16, 1024)], (("rmsnorm", "bf16"),))


def test_a_view_without_data_leaves_its_cells_labelled(tmp_path):
    append_rows(tmp_path, no_peer_rows())
    fig = heatmap_figure(load_ok_rows(tmp_path), "vs_peer")
    v = view(fig, "vs_peer:lutforge")
    assert v["z"] == [[None, None]] and v["text"] == [["", ""]] and v["missing"] == [[NO_DATA, NO_DATA]]
    assert all("no bench row of any peer" in h for h in v["hover"][0])
    assert "no data: no bench row of any peer" in fig.layout.title.text
    gbps = view(fig, "gbps:lutforge")  # the public op was benched at T=16 only
    assert gbps["text"][0][0] != "" and gbps["missing"][0] == ["", NO_DATA]
    assert "no bench row of the public op" in gbps["hover"][0][1]
    heur = view(fig, "speedup_vs_heuristic:best trial")  # heuristic trials exist at both shapes
    assert all(t.endswith("×") for t in heur["text"][0]) and heur["missing"] == [["", ""]]
    assert heatmap.empty_views(fig) == ["speedup vs best peer of lutforge (public op)",
                                        "speedup vs best peer of best trial"]

    res = run("heatmap", "--results", tmp_path, "-o", tmp_path / "h.html", "--metric", "vs_peer")
    assert res.exit_code == 0, res.output
    assert "note: speedup vs best peer of lutforge (public op) has no data here" in res.output


def test_run_id_keeps_the_problems_those_runs_measured(tmp_path):
    append_rows(tmp_path, [row("rmsnorm", "bf16", 16, 1024, 3.0, run_id="old"),
                           row("rmsnorm", "bf16", 256, 1024, 4.0, run_id="old"),
                           row("rmsnorm", "bf16", 256, 1024, 5.0, run_id="new"),
                           row("rmsnorm", "bf16", 4096, 1024, 9.0, run_id="new"),
                           row("rmsnorm", "bf16", 4096, 2048, 12.0, run_id="new-bench", kind="bench",
                               config_source="lut_exact")])
    rows = load_ok_rows(tmp_path)
    fig = heatmap_figure(rows, "gbps", runs=["new"])
    t, = value_traces(fig)
    assert (t.x, t.y) == (("256", "4096"), ("1024",))
    gbps_4us = row("rmsnorm", "bf16", 256, 1024, 4.0)["gbps"]  # the pick is over all rows, as in the report
    assert cell_now(fig, 256, 1024) == pytest.approx(gbps_4us, rel=1e-5)
    assert "runs new" in fig.layout.title.text and "2 of 2 shapes" in fig.layout.title.text
    both = heatmap_figure(rows, runs=["new", "new-bench"])
    assert [(x.x, x.y) for x in value_traces(both)] == [(("256", "4096"), ("1024", "2048"))]
    assert len(value_traces(heatmap_figure(rows))[0].x) == 3
    with pytest.raises(ValueError, match="no ok rows of run.s. nope; runs there: new, new-bench, old"):
        heatmap_figure(rows, runs=["nope"])

    res = run("heatmap", "--results", tmp_path, "-o", tmp_path / "h.html", "--run-id", "new", "--run-id", "new-bench")
    assert res.exit_code == 0, res.output
    assert "runs new, new-bench" in (tmp_path / "h.html").read_text()


@pytest.fixture
def captured(monkeypatch):
    """The figures the CLI writes, in order."""
    figs = []
    real = heatmap.write_heatmap

    def write(fig, path, plotlyjs="inline"):
        figs.append(fig)
        return real(fig, path, plotlyjs)

    monkeypatch.setattr(heatmap, "write_heatmap", write)
    return figs


def test_problem_set_and_shapes_filter(tmp_path, captured):
    d = tmp_path / "r"
    append_rows(d, [row("rmsnorm", "bf16", 16, 4096, 3.0, problem_set="llm"),
                    row("rmsnorm", "bf16", 256, 4096, 4.0, problem_set="llm"),
                    row("rmsnorm", "bf16", 1560, 64, 5.0, problem_set="wan_vae"),
                    row("qk_rmsnorm", "bf16", 16, 128, 3.0, heads=8, problem_set="qk_norm")])
    out = tmp_path / "h.html"
    assert run("heatmap", "--results", d, "-o", out).exit_code == 0
    assert run("heatmap", "--results", d, "-o", out, "--problem-set", "llm").exit_code == 0
    assert run("heatmap", "--results", d, "-o", out, "--problem-set", "problem_sets/llm.toml",
               "--shapes", "256x4096,16x8x128").exit_code == 0
    assert run("heatmap", "--results", d, "-o", out, "--shapes", "256x4096,16x8x128").exit_code == 0
    names = [[(t.name.split(":")[0], t.x, t.y) for t in value_traces(f)] for f in captured]
    assert names == [
        [("llm · rmsnorm", ("16", "256"), ("4096",)), ("qk_norm · qk_rmsnorm", ("16",), ("128",)),
         ("wan_vae · rmsnorm", ("1560",), ("64",))],
        [("llm · rmsnorm", ("16", "256"), ("4096",))],
        [("llm · rmsnorm", ("256",), ("4096",))],
        [("llm · rmsnorm", ("256",), ("4096",)), ("qk_norm · qk_rmsnorm", ("16",), ("128",))]]
    res = run("heatmap", "--results", d, "-o", out, "--problem-set", "dit")
    assert res.exit_code == 1 and "no rows of problem set 'dit'; sets there: llm, qk_norm, wan_vae" in res.output
    res = run("heatmap", "--results", d, "-o", out, "--shapes", "16by4096")
    assert res.exit_code == 2 and "is not TxC or TxHxD" in res.output


def test_html_is_one_offline_file(results, tmp_path):
    out = tmp_path / "h.html"
    res = run("heatmap", "--results", results, "-o", out, "--op", "rmsnorm")
    assert res.exit_code == 0, res.output
    assert "(1 facets, 8 views, opening on pct_copy:lutforge)" in res.output
    html = out.read_text()
    assert "<script src=" not in html and "<link " not in html  # nothing fetched from the network
    assert "Plotly.newPlot" in html and len(html) > 1_000_000  # plotly.js itself is inlined
    assert "% of copy roofline of lutforge (public op)" in html and DEVICE in html


def test_pages_share_one_plotlyjs_by_a_relative_path(results, tmp_path):
    import plotly.offline

    tree = tmp_path / "results"
    js = tree / "plotly.min.js"
    for device in ("h100", "h200"):
        res = run("heatmap", "--results", results, "-o", tree / device / "heatmap.html", "--plotlyjs", js)
        assert res.exit_code == 0, res.output
        assert f"plotly.js from {js}" in res.output
    assert js.read_text() == plotly.offline.get_plotlyjs()
    stamp = js.stat().st_mtime_ns
    heatmap.write_heatmap(heatmap_figure(load_ok_rows(results)), tree / "h100" / "again.html", js)
    assert js.stat().st_mtime_ns == stamp  # an identical copy is reused, not rewritten
    for device in ("h100", "h200"):
        html = (tree / device / "heatmap.html").read_text()
        assert '<script charset="utf-8" src="../plotly.min.js"></script>' in html
        assert "Plotly.newPlot" in html and len(html) < 400_000  # the data only
    res = run("heatmap", "--results", results, "-o", tmp_path / "x.html", "--plotlyjs", tmp_path / "plotly.txt")
    assert res.exit_code == 1 and "must end in .js" in res.output


def test_synthetic_rows_are_labelled_in_the_title(tmp_path):
    append_rows(tmp_path, sweep_and_bench_rows([(16, 1024)], (("rmsnorm", "bf16"),)))
    append_rows(tmp_path, [row("rmsnorm", "bf16", 16, 2048, 3.0, backend="synthetic", run_id="syn-1")])
    fig = heatmap_figure(load_ok_rows(tmp_path), "gbps")
    assert "SYNTHETIC" in fig.layout.title.text and all("SYNTHETIC" in b.args[1]["title.text"]
                                                        for m in fig.layout.updatemenus for b in m.buttons)


def foreign_parquet(d):
    d.mkdir()
    pq.write_table(pa.table({"x": [1, 2]}), d / "other.parquet")


def no_ok_rows(d):
    append_rows(d, [row("rmsnorm", "bf16", 16, 1024, 1.0, status="compile_error")])


def only_sweep_rows(d):
    append_rows(d, [r for r in sweep_and_bench_rows([(16, 1024)], (("rmsnorm", "bf16"),)) if r["kind"] != "bench"])


def two_devices(d):
    append_rows(d, [row("rmsnorm", "bf16", 16, 1024, 3.0, device="NVIDIA H100 80GB HBM3"),
                    row("rmsnorm", "bf16", 16, 1024, 2.0, device="NVIDIA H200")])


def peers_only(d):
    append_rows(d, [row("rmsnorm", "bf16", 16, 1024, 3.0, kind="bench", impl="quack", config_source="peer")])


@pytest.mark.parametrize("make, args, message", [
    (lambda d: None, (), "does not exist"),
    (lambda d: d.mkdir(), (), "no Parquet files"),
    (foreign_parquet, (), "not a lutforge results file"),
    (no_ok_rows, (), "no rows with status ok"),
    (only_sweep_rows, ("--op", "rmsnorm_quant"), "no rows for op(s) rmsnorm_quant"),
    (only_sweep_rows, ("--peer", "quack"), "no bench rows of peer 'quack'; peers measured: none"),
    (lambda d: append_rows(d, sweep_and_bench_rows([(16, 1024)], (("rmsnorm", "bf16"),))),
     ("--metric", "vs_peer", "--peer", "cudnn"), "peers measured: quack, torch_compile"),
    (only_sweep_rows, ("--run-id", "nope"), "no ok rows of run(s) nope; runs there: run-a"),
    (two_devices, (), "several devices"),
    (two_devices, ("--device", "B200"), "no ok rows for device 'B200'"),
    (peers_only, (), "no ok lutforge rows"),
])
def test_bad_inputs_end_in_a_click_error(tmp_path, make, args, message):
    d = tmp_path / "results"
    make(d)
    res = run("heatmap", "--results", d, "-o", tmp_path / "h.html", *args)
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit), res.output
    assert message in res.output
    assert not (tmp_path / "h.html").exists()


def test_unwritable_output_is_a_click_error(results, tmp_path):
    (tmp_path / "file").write_text("")
    res = run("heatmap", "--results", results, "-o", tmp_path / "file" / "h.html")
    assert res.exit_code != 0 and isinstance(res.exception, SystemExit) and "cannot write" in res.output


def test_two_devices_plot_one_when_chosen(tmp_path):
    two_devices(tmp_path)
    fig = heatmap_figure(load_ok_rows(tmp_path, device="NVIDIA H200"), "gbps")
    assert "NVIDIA H200" in fig.layout.title.text and "H100" not in fig.layout.title.text


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1200")
ERROR_TRAP = ("window.__errors = [];"
              "window.addEventListener('error', e => window.__errors.push(String(e.message)));"
              "window.addEventListener('unhandledrejection', e => window.__errors.push(String(e.reason)));")
GD = f"document.getElementById('{DIV_ID}')"


def _browser_paths():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Chromium or chromedriver not on PATH (Debian: apt-get install chromium chromium-driver)")
    return chromium, driver


@pytest.fixture
def browser(tmp_path):
    chromium, chromedriver = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": ERROR_TRAP})
    try:
        yield driver
    finally:
        driver.quit()


def _open(driver, page, n_facets):
    """Load `page`, wait until every facet is drawn, and check the page raised no error."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(page.as_uri())
    drawn = f"return document.querySelectorAll('#{DIV_ID} g.hm image').length"
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(drawn) >= n_facets)
    assert driver.execute_script("return window.__errors") == []
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe
    assert driver.execute_script(f"return {GD}.data.filter(t => t.type === 'heatmap').length") == 2 * n_facets


def _click(driver, label_index):
    """Click the view button at `label_index` (over all rows of buttons) as a user would."""
    driver.execute_script("document.querySelectorAll('g.updatemenu-button')[arguments[0]]"
                          ".dispatchEvent(new MouseEvent('click', {bubbles: true}))", label_index)


def _hover(driver, xval, yval, prefix):
    """Hover the first facet's cell at (xval, yval) and return the hover texts once one starts with
    `prefix`: Plotly throttles hover calls (50 ms), so a call right after the previous one draws later."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    js = (f"Plotly.Fx.hover({GD}, {{xval: {xval}, yval: {yval}}}, 'xy');"
          "return Array.from(document.querySelectorAll('.hoverlayer .hovertext')).map(e => e.textContent)")
    try:
        return WebDriverWait(driver, 10, poll_frequency=0.1).until(
            lambda d: (h := d.execute_script(js)) and all(t.startswith(prefix) for t in h) and h)
    except TimeoutException:  # let the caller's assertion show what was drawn instead
        return driver.execute_script(js)


def _cell_texts(driver):
    return driver.execute_script(f"return Array.from(document.querySelectorAll('#{DIV_ID} .hm text'))"
                                 ".map(e => e.textContent)")


def _colours(driver) -> int:
    from PIL import Image

    png = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    px = np.asarray(png).reshape(-1, 3).astype(int)
    coloured = px[px.max(axis=1) - px.min(axis=1) > 40]  # saturated: heatmap cells, not text, grey or axes
    return len(np.unique(coloured, axis=0))


def test_buttons_switch_views_in_headless_chromium(results, tmp_path, browser):
    """A page sharing plotly.js by a relative path draws every facet; clicking each button shows that
    view's numbers, printed in the cells, coloured and on hover."""
    page = tmp_path / "results" / "h100" / "heatmap.html"
    res = run("heatmap", "--results", results, "-o", page, "--plotlyjs", tmp_path / "results" / "plotly.min.js")
    assert res.exit_code == 0, res.output
    fig = heatmap_figure(load_ok_rows(results))
    _open(browser, page, N_FACETS)
    title = browser.execute_script(f"return document.querySelector('#{DIV_ID} .gtitle').textContent")
    assert DEVICE in title and "% of copy" in title
    assert _colours(browser) >= 10, "screenshot shows no heatmap colours"
    buttons = [b for m in fig.layout.updatemenus for b in m.buttons]
    assert browser.execute_script("return Array.from(document.querySelectorAll('g.updatemenu-button'))"
                                  ".map(e => e.textContent)") == [b.label for b in buttons]
    s = src()
    for i, b in enumerate(buttons):
        _click(browser, i)
        shown = browser.execute_script(f"return {GD}.data.map(t => [t.z, t.text])")
        want = b.args[0]
        for (z, text), wz, wt in zip(shown, want["z"], want["text"]):
            assert text == wt
            assert np.allclose(np.array(z, dtype=float), np.array(wz, dtype=float), equal_nan=True)
        assert browser.execute_script(f"return {GD}.layout.title.text") == b.args[1]["title.text"]
        active = browser.execute_script(f"return {GD}.layout.updatemenus.map(m => m.active)")
        assert active == [i % 4 if m == i // 4 else -1 for m in range(2)]  # one highlighted button in all rows
        texts = _cell_texts(browser)
        assert at(view(fig, b.name)["text"], fig, 256, 4096) in texts
        hover = _hover(browser, 2, 1, f"T=256 C=4096{b.label} of ")  # T=256, C=4096 of the first facet
        assert len(hover) == 1 and hover[0].startswith(f"T=256 C=4096{b.label} of ")
        assert at(view(fig, b.name)["text"], fig, 256, 4096) in hover[0]
        assert f"lutforge (public op): {s['public']['median_us']:.2f} µs" in hover[0]
        assert "← fastest peer" in hover[0]
        if b.name == "vs_peer:lutforge":
            assert _colours(browser) >= 10, "the speedup view shows no diverging colours"
    browser.save_screenshot(str(tmp_path / "last_view.png"))


def test_a_facet_without_data_stays_labelled_in_headless_chromium(tmp_path, browser):
    """Plotly draws nothing for an all-empty trace; the shapes layer keeps such a facet's cells, "–"
    and hover."""
    append_rows(tmp_path / "r", no_peer_rows())
    page = tmp_path / "h.html"
    assert run("heatmap", "--results", tmp_path / "r", "-o", page, "--metric", "vs_peer").exit_code == 0
    _open(browser, page, 1)
    assert sorted(_cell_texts(browser)) == [NO_DATA, NO_DATA]
    hover = browser.execute_script(f"Plotly.Fx.hover({GD}, {{xval: 1, yval: 0}}, 'xy');"
                                   "return Array.from(document.querySelectorAll('.hoverlayer .hovertext'))"
                                   ".map(e => e.textContent)")
    assert len(hover) == 1 and "no bench row of any peer" in hover[0] and "best trial: " in hover[0]
    _click(browser, 0)  # % of copy of the public op: a value at T=16, "–" at T=256
    texts = _cell_texts(browser)
    assert NO_DATA in texts and len(texts) == 2 and any(t.replace(".", "").isdigit() for t in texts)
