"""Runtime dispatch: the tier order, device-class preference, re-checks against the actual strides and
alignment, logging once per shape class, memoised cost, and robustness to missing or broken LUTs."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

import kernels.luts as luts
from kernels.config import KernelConfig, heuristic, max_vec_bytes, violations
from kernels.dispatch import Dispatcher, device_class_of, select_config
from kernels.luts import LutModule
from kernels.problem import Problem
from lut_export.tables import build_tables

X = KernelConfig(threads=256, threads_per_row=256, vec_bytes=16)
Y = KernelConfig(threads=512, threads_per_row=512, vec_bytes=16)
Z = KernelConfig(threads=128, threads_per_row=128, vec_bytes=16, cluster=2)
KEY = ("rmsnorm", "bf16", "rowmajor", "bf16", 4096, 1)


def make_lut(name: str, winners: dict) -> LutModule:
    """An in-memory LUT module (the tables exactly as export builds them) for sm<arch>_<class> `name`."""
    arch, cls = name[2:].split("_", 1)
    exact, ranges = build_tables(winners)
    return LutModule(name, {"arch": int(arch), "device_class": cls},
                     {k: c.as_dict() for k, c in exact.items()},
                     {k: [(b, c and c.as_dict()) for b, c in segs] for k, segs in ranges.items()})


@pytest.fixture
def h100():
    return make_lut("sm90_h100", {KEY + (16,): X, KEY + (1560,): Y, KEY + (24960,): Z})


def test_tiers_in_order(h100):
    d = Dispatcher([h100])
    assert d.select_config(Problem("rmsnorm", 1560, 4096), 90, "h100") == (Y, "exact")
    # breakpoint between 16 and 1560 is ceil(sqrt(16 * 1560)) = 158
    assert d.select_config(Problem("rmsnorm", 157, 4096), 90, "h100") == (X, "range")
    assert d.select_config(Problem("rmsnorm", 158, 4096), 90, "h100") == (Y, "range")
    assert d.select_config(Problem("rmsnorm", 24960 * 2, 4096), 90, "h100") == (Z, "range")
    # beyond 2x the largest swept T the table does not answer: no other family, so the heuristic does
    p = Problem("rmsnorm", 24960 * 2 + 1, 4096)
    assert d.select_config(p, 90, "h100") == (heuristic(p, 90), "heuristic")
    p = Problem("rmsnorm", 1560, 5120)  # an unswept C is not guessed from C=4096's knobs
    assert d.select_config(p, 90, "h100") == (heuristic(p, 90), "heuristic")
    p = Problem("gemma_rmsnorm", 1560, 4096)
    assert d.select_config(p, 90, "h100") == (heuristic(p, 90), "heuristic")
    p = Problem("rmsnorm", 1560, 4096)
    assert d.select_config(p, 100, "h100") == (heuristic(p, 100), "heuristic")  # LUTs are per arch


def test_only_the_device_class_tables_answer(h100):
    h200 = make_lut("sm90_h200", {KEY + (1560,): Z, KEY[:4] + (8192, 1, 1560): Y})
    d = Dispatcher([h200, h100])
    p = Problem("rmsnorm", 1560, 4096)
    assert d.lookup(p, 90, "h200").source == "sm90_h200" and d.select_config(p, 90, "h200") == (Z, "exact")
    assert d.select_config(p, 90, "h100") == (Y, "exact")
    assert d.select_config(p, 90, "H100") == (Y, "exact")  # classes are case-insensitive
    assert d.lookup(p, 90, None).source == "sm90_h100"  # no class: modules of the arch by name
    assert d.select_config(p, 90, "h800") == (heuristic(p, 90), "heuristic")  # a class with no module
    # A shape only the other class tuned is not answered from that class's knobs.
    q = Problem("rmsnorm", 1560, 8192)
    assert d.select_config(q, 90, "h100") == (heuristic(q, 90), "heuristic")
    assert d.lookup(q, 90, None).source == "sm90_h200"


def test_vector_narrowed_to_the_actual_alignment(h100):
    d = Dispatcher([h100])
    p = Problem("rmsnorm", 1560, 4096)
    assert d.select_config(p, 90, "h100", ptr_align=8) == (KernelConfig(512, 512, 8), "exact")
    assert d.select_config(p, 90, "h100", row_stride=4096 + 4) == (KernelConfig(512, 512, 8), "exact")
    assert d.select_config(p, 90, "h100", row_stride=4096 + 1) == (KernelConfig(512, 512, 2), "exact")
    assert d.select_config(p, 90, "h100", row_stride=4096) == (Y, "exact")  # stride == C is contiguous


def test_entry_that_cannot_run_the_actual_layout_falls_through():
    # Two threads per row cover an NVFP4 block of 16 with 8-element vectors; a row stride of 66
    # elements (132 B) allows only 4-byte (2-element) vectors, so the block would span 8 lanes and
    # the entry must not be returned.
    key = ("rmsnorm_fp4quant", "nvfp4", "rowmajor", "bf16", 64, 1)
    tight = KernelConfig(threads=128, threads_per_row=2, vec_bytes=16)
    d = Dispatcher([make_lut("sm90_h100", {key + (64,): tight})])
    p = Problem("rmsnorm_fp4quant", 64, 64, out_format="nvfp4")
    assert d.select_config(p, 90) == (tight, "exact")
    assert violations(p, KernelConfig(threads=128, threads_per_row=2, vec_bytes=4), 90, 66)
    cfg, tier = d.select_config(p, 90, row_stride=66)
    assert tier == "heuristic" and not violations(p, cfg, 90, 66) and cfg.vec_bytes == 4
    # FP4 packs element pairs per thread: an odd stride leaves no valid config, and says so
    with pytest.raises(ValueError, match="no valid kernel config"):
        d.select_config(p, 90, row_stride=65)


def test_zero_modules_is_a_normal_state():
    d = Dispatcher([])
    p = Problem("fused_rmsnorm_silu", 1560, 320, out_format="fp8")
    assert d.select_config(p, 90, "h100") == (heuristic(p, 90), "heuristic")
    assert d.modules == []
    assert isinstance(luts.shipped_names(), list)
    cfg, tier = select_config(p, 90, "h100")  # the shipped set, whatever it holds
    assert tier in ("exact", "range", "heuristic") and not violations(p, cfg, 90)


def test_broken_shipped_module_is_skipped_and_logged(tmp_path, monkeypatch, caplog, h100):
    from lut_export.render import render

    good = render({"arch": 90, "device_class": "h100"},
                  {k: KernelConfig(**v) for k, v in h100.exact.items()},
                  {k: [(b, c and KernelConfig(**c)) for b, c in s] for k, s in h100.range.items()})
    (tmp_path / "sm90_h100.py").write_text(good)
    (tmp_path / "sm90_h200.py").write_text("METADATA = {\n")
    monkeypatch.setattr(luts, "shipped_names", lambda: ["sm90_h100", "sm90_h200"])
    monkeypatch.setattr(luts, "shipped_path", lambda name: tmp_path / f"{name}.py")
    with caplog.at_level(logging.ERROR, logger="kernels.luts"):
        loaded = luts.load_shipped()
    assert [m.name for m in loaded] == ["sm90_h100"]
    assert "skipping LUT module sm90_h200" in caplog.text and "syntax error" in caplog.text
    assert Dispatcher(loaded).select_config(Problem("rmsnorm", 16, 4096), 90, "h100") == (X, "exact")


def test_malformed_entries_are_skipped_not_trusted(caplog, h100):
    bad_exact = dict(h100.exact)
    bad_exact[KEY + (1560,)] = dict(h100.exact[KEY + (1560,)], threads=96)  # not a valid knob value
    bad_exact[("rmsnorm", "bf16")] = X.as_dict()  # wrong key shape
    bad_range = dict(h100.range)
    bad_range[KEY] = [(None, dict(X.as_dict(), threads=96))]
    with caplog.at_level(logging.ERROR, logger="kernels.dispatch"):
        d = Dispatcher([LutModule("sm90_h100", h100.metadata, bad_exact, bad_range)])
    assert "skipped 1 malformed entries" in caplog.text
    p = Problem("rmsnorm", 1560, 4096)
    assert d.select_config(p, 90, "h100") == (heuristic(p, 90), "heuristic")
    assert d.select_config(Problem("rmsnorm", 16, 4096), 90, "h100") == (X, "exact")


def test_fallback_logged_once_per_shape_class(caplog, h100):
    d = Dispatcher([h100])
    with caplog.at_level(logging.INFO, logger="kernels.dispatch"):
        for T in range(8, 200):  # the fixture's C=4096 family answers from 16 / EXTRAPOLATE up
            d.select_config(Problem("rmsnorm", T, 5120), 90, "h100")  # heuristic: C not swept
            d.select_config(Problem("gemma_rmsnorm", T, 5120), 90, "h100")  # heuristic: op not swept
            d.select_config(Problem("rmsnorm", T, 4096), 90, "h100")  # exact / range: not a fallback
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2, msgs
    assert "rmsnorm bf16->bf16 (rowmajor) C=5120" in msgs[0] and "gemma_rmsnorm" in msgs[1]
    assert all("analytical heuristic" in m for m in msgs)


def test_lookup_cost_is_negligible_next_to_a_kernel(h100):
    d = Dispatcher([h100])
    problems = [Problem("rmsnorm", T, 4096) for T in (1, 158, 1560, 99840)] + [Problem("gemma_rmsnorm", 7, 896)]
    t0 = time.perf_counter()
    for p in problems:
        d.select_config(p, 90, "h100")
    miss_us = (time.perf_counter() - t0) / len(problems) * 1e6
    n = 20000
    t0 = time.perf_counter()
    for i in range(n):
        d.select_config(problems[i % len(problems)], 90, "h100")
    hit_us = (time.perf_counter() - t0) / n * 1e6
    print(f"\ndispatch cost: {hit_us:.2f} us per memoised call, {miss_us:.1f} us per first call")
    assert all(d.lookup(p, 90, "h100") is d.lookup(p, 90, "h100") for p in problems)  # answers are memoised
    assert hit_us < 20.0


@pytest.mark.parametrize("call, error, message", [
    (lambda d: d.select_config(("rmsnorm", 1, 64), 90), TypeError, "is not the problem type of any kernel family"),
    (lambda d: d.select_config(Problem("rmsnorm", 1, 64), "sm90"), TypeError, "arch must be an int"),
    (lambda d: d.select_config(Problem("rmsnorm", 1, 64), 0), ValueError, "arch must be positive"),
    (lambda d: d.select_config(Problem("rmsnorm", 1, 64), 90, 100), TypeError, "device_class must be str"),
    (lambda d: d.select_config(Problem("rmsnorm", 1, 64), 90, row_stride=32), ValueError, "row_stride must be"),
    (lambda d: d.select_config(Problem("rmsnorm", 1, 64), 90, row_stride=[64]), ValueError, "row_stride must be"),
    (lambda d: d.select_config(Problem("rmsnorm", 1, 64), 90, ptr_align=12), ValueError, "power of two"),
    (lambda d: d.select_config(Problem("rmsnorm", 1, 64), 90, ptr_align=1), ValueError, "power of two"),
])
def test_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call(Dispatcher([]))


def test_from_paths_rejects_non_modules(tmp_path):
    with pytest.raises(ValueError, match="a LUT module is a .py file"):
        Dispatcher.from_paths([tmp_path / "sm90_h100.txt"])
    with pytest.raises(ValueError, match="cannot read"):
        Dispatcher.from_paths([tmp_path / "sm90_h100.py"])
    with pytest.raises(TypeError, match="expected LutModule"):
        Dispatcher([Path("sm90_h100.py")])


@pytest.mark.parametrize("name, cls", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100_pcie"), ("NVIDIA H100 NVL", "h100_nvl"),
    ("NVIDIA H200", "h200"), ("NVIDIA GH200 480GB", "gh200"), ("NVIDIA B200", "b200"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA GeForce RTX 4090", "geforce_rtx_4090"),
])
def test_device_class_of(name, cls):
    assert device_class_of(name) == cls
    assert luts.MODULE_NAME.match(f"sm90_{cls}")  # every class can name a LUT module


def test_device_class_of_rejects_empty():
    with pytest.raises(ValueError):
        device_class_of(" ")
    assert max_vec_bytes(Problem("rmsnorm", 1, 64)) == 16  # sanity of the helper the re-check relies on
