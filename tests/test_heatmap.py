"""`lutforge heatmap`: the figure's cells and hover come from the right rows, the HTML works offline and
draws in a real headless Chromium, and bad inputs end in a click error rather than a traceback."""
from __future__ import annotations

import io
import math
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from results_rows import DEVICE, row, sweep_and_bench_rows
from sweep.cli import main
from sweep.heatmap import DIV_ID, heatmap_figure
from sweep.report import load_ok_rows
from sweep.results_io import append_rows

SHAPES = [(T, C) for T in (1, 16, 256, 4096) for C in (1024, 4096, 8192)]
N_FACETS = 3  # rmsnorm bf16, fused_rmsnorm_silu bf16 and fp8 (results_rows.sweep_and_bench_rows)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("results")
    append_rows(d, sweep_and_bench_rows(SHAPES))
    return d


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def cell(trace, T, C):
    return trace.z[list(trace.y).index(str(C))][list(trace.x).index(str(T))]


def test_gbps_cells_are_the_rebench_rows_with_knobs_on_hover(results):
    fig = heatmap_figure(load_ok_rows(results), "gbps")
    assert len(fig.data) == N_FACETS and all(t.type == "heatmap" for t in fig.data)
    assert [a.text for a in fig.layout.annotations] == [
        "rmsnorm: bf16 → bf16", "fused_rmsnorm_silu: bf16 → bf16", "fused_rmsnorm_silu: bf16 → fp8"]
    rows = [r for r in sweep_and_bench_rows(SHAPES) if r["op"] == "rmsnorm" and r["T"] == 256 and r["C"] == 4096]
    rebench = next(r for r in rows if r["kind"] == "rebench")
    trial = next(r for r in rows if r["kind"] == "trial" and r["config_source"] == "search" and r["status"] == "ok")
    assert trial["median_us"] < rebench["median_us"]  # re-bench is preferred even when the trial looked faster
    t = fig.data[0]
    assert t.x == ("1", "16", "256", "4096") and t.y == ("1024", "4096", "8192")
    assert cell(t, 256, 4096) == pytest.approx(rebench["gbps"])
    hover = t.text[list(t.y).index("4096")][list(t.x).index("256")]
    for part in ("T=256 C=4096", f"{rebench['median_us']:.2f} µs", f"{rebench['gbps']:.0f} GB/s",
                 f"{rebench['pct_copy']:.1f} % of copy", "threads=256", "vec_bytes=16", "stage=reg"):
        assert part in hover
    assert DEVICE in fig.layout.title.text and "GB/s" in fig.layout.title.text
    zs = [z for tr in fig.data for r in tr.z for z in r]
    assert {tr.zmin for tr in fig.data} == {min(zs)} and {tr.zmax for tr in fig.data} == {max(zs)}


def test_facets_split_scale_layouts_and_head_counts(tmp_path):
    append_rows(tmp_path, [
        row("rmsnorm_fp4quant", "nvfp4", 64, 4096, 5.0),
        row("rmsnorm_fp4quant", "nvfp4", 64, 4096, 6.0, scale_layout="swizzled"),
        row("qk_rmsnorm", "bf16", 64, 128, 3.0, heads=8),
        row("qk_rmsnorm", "bf16", 64, 128, 4.0, heads=32),
        row("qk_rmsnorm", "bf16", 1024, 128, 9.0, heads=32),
    ])
    fig = heatmap_figure(load_ok_rows(tmp_path), "gbps")
    assert [a.text for a in fig.layout.annotations] == [
        "qk_rmsnorm: bf16 → bf16, 8 heads", "qk_rmsnorm: bf16 → bf16, 32 heads",
        "rmsnorm_fp4quant: bf16 → nvfp4, rowmajor scales", "rmsnorm_fp4quant: bf16 → nvfp4, swizzled scales"]
    assert [len(t.x) for t in fig.data] == [1, 2, 1, 1]


def test_speedup_views_diverge_around_one(results):
    rows = load_ok_rows(results)
    fig = heatmap_figure(rows, "speedup_vs_heuristic")
    src = [r for r in sweep_and_bench_rows(SHAPES) if r["op"] == "rmsnorm" and r["T"] == 4096 and r["C"] == 8192]
    tuned = next(r for r in src if r["kind"] == "rebench")["median_us"]
    heur = next(r for r in src if r["config_source"] == "heuristic" and r["kind"] == "trial")["median_us"]
    assert cell(fig.data[0], 4096, 8192) == pytest.approx(math.log2(heur / tuned))
    for t in fig.data:
        assert t.colorscale[0][1] != t.colorscale[-1][1] and t.zmid == 0 and t.zmin == -t.zmax
    labels = fig.data[0].colorbar.ticktext
    assert labels[len(labels) // 2] == "1×"
    assert float(labels[0][:-1]) == pytest.approx(1 / float(labels[-1][:-1]), 0.05)  # 1/x below, x above

    fig = heatmap_figure(rows, "vs_peer", "quack")
    quack = next(r for r in src if r["impl"] == "quack")["median_us"]
    assert cell(fig.data[0], 4096, 8192) == pytest.approx(math.log2(quack / tuned))
    assert "quack" in fig.layout.title.text
    best = heatmap_figure(rows, "vs_peer")  # best peer per shape: the faster of quack and torch_compile
    fastest = min(r["median_us"] for r in src if r["impl"] in ("quack", "torch_compile"))
    assert cell(best.data[0], 4096, 8192) == pytest.approx(math.log2(fastest / tuned))


def test_html_is_one_offline_file(results, tmp_path):
    out = tmp_path / "h.html"
    res = run("heatmap", "--results", results, "-o", out, "--op", "rmsnorm", "--metric", "pct_copy")
    assert res.exit_code == 0, res.output
    html = out.read_text()
    assert "<script src=" not in html and "<link " not in html  # nothing fetched from the network
    assert "Plotly.newPlot" in html and len(html) > 1_000_000  # plotly.js itself is inlined
    assert "% of copy roofline of lutforge tuned" in html and DEVICE in html


def test_synthetic_rows_are_labelled_in_the_title(tmp_path):
    append_rows(tmp_path, sweep_and_bench_rows([(16, 1024)], (("rmsnorm", "bf16"),)))
    append_rows(tmp_path, [row("rmsnorm", "bf16", 16, 2048, 3.0, backend="synthetic", run_id="syn-1")])
    fig = heatmap_figure(load_ok_rows(tmp_path), "gbps")
    assert "SYNTHETIC" in fig.layout.title.text


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
    (only_sweep_rows, ("--metric", "vs_peer"), "no bench rows of peers"),
    (lambda d: append_rows(d, sweep_and_bench_rows([(16, 1024)], (("rmsnorm", "bf16"),))),
     ("--metric", "vs_peer", "--peer", "cudnn"), "peers measured: quack, torch_compile"),
    (only_sweep_rows, ("--peer", "quack"), "--peer applies only to --metric vs_peer"),
    (two_devices, (), "several devices"),
    (two_devices, ("--device", "B200"), "no ok rows for device 'B200'"),
    (peers_only, (), "no ok lutforge rows"),
    (lambda d: append_rows(d, [row("rmsnorm", "bf16", 16, 1024, 3.0)]), ("--metric", "speedup_vs_heuristic"),
     "no heuristic rows"),
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


def _browser_paths():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("Chromium or chromedriver not on PATH (Debian: apt-get install chromium chromium-driver)")
    return chromium, driver


def test_renders_in_headless_chromium(results, tmp_path):
    chromium, chromedriver = _browser_paths()
    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    pages = {}
    for metric in ("gbps", "vs_peer"):
        pages[metric] = tmp_path / f"{metric}.html"
        assert run("heatmap", "--results", results, "-o", pages[metric], "--metric", metric).exit_code == 0
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": ERROR_TRAP})
        for metric, page in pages.items():
            driver.get(page.as_uri())
            drawn = f"return document.querySelectorAll('#{DIV_ID} g.hm image').length"
            WebDriverWait(driver, 30).until(lambda d: d.execute_script(drawn) >= N_FACETS)
            assert driver.execute_script("return window.__errors") == []
            severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert severe == [], severe
            traces = driver.execute_script(
                f"return document.getElementById('{DIV_ID}').data.filter(t => t.type === 'heatmap').length")
            assert traces == N_FACETS and driver.execute_script(drawn) == N_FACETS
            title = driver.execute_script(f"return document.querySelector('#{DIV_ID} .gtitle').textContent")
            assert DEVICE in title
            png = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
            px = np.asarray(png).reshape(-1, 3).astype(int)
            coloured = px[px.max(axis=1) - px.min(axis=1) > 40]  # saturated: heatmap cells, not text or axes
            assert len(np.unique(coloured, axis=0)) >= 10, f"{metric}: screenshot shows no heatmap colours"
            png.save(tmp_path / f"{metric}.png")
    finally:
        driver.quit()
