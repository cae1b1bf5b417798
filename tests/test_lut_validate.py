"""`lutforge validate`: a generated module passes; corrupted or hand-edited ones are rejected with a
message naming the problem; --compile compiles every entry for its arch on the CPU."""
from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from kernels.luts import LUT_FORMAT, parse_lut, read_lut
from lut_export.validate import check_module
from lut_rows import synthetic_rows
from sweep.cli import main
from sweep.results_io import append_rows

SMALL = (("rmsnorm", "bf16", "rowmajor", (1024,), 1), ("rmsnorm_fp4quant", "nvfp4", "swizzled", (2048,), 1))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("validate")
    append_rows(d / "results", synthetic_rows())
    out = d / "sm90_synthetic.py"
    r = CliRunner().invoke(main, ["export", "--results", str(d / "results"), "--allow-synthetic", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out.read_text()


def _validate(tmp_path, text: str, name: str = "sm90_synthetic.py", *flags):
    path = tmp_path / name
    path.write_text(text)
    return CliRunner().invoke(main, ["validate", *flags, str(path)])


def test_generated_module_passes(tmp_path, good):
    r = _validate(tmp_path, good)
    assert r.exit_code == 0, r.output
    assert r.output.startswith("ok ")


def _first_knobs_line(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("    (") and '"threads":' in line)


def _edit_first_entry(text: str, old: str, new: str) -> str:
    line = _first_knobs_line(text)
    assert old in line
    return text.replace(line, line.replace(old, new, 1), 1)


CORRUPTIONS = {
    "invalid knob value": (lambda t: _edit_first_entry(t, '"threads": ', '"threads": 96, "_x": '),
                           r"threads=96 not in|unknown knob '_x'"),
    "knob of the wrong type": (lambda t: _edit_first_entry(t, '"weight_smem": False', '"weight_smem": 0'),
                               r"weight_smem=0 not in \(False, True\)"),
    "unknown knob": (lambda t: _edit_first_entry(t, '"stage": ', '"warp_specialize": True, "stage": '),
                     r"unknown knob 'warp_specialize'"),
    "missing knob": (lambda t: _edit_first_entry(t, '"cluster": 1, ', ''), r"missing knob 'cluster'"),
    "wrong arch": (lambda t: t.replace('"arch": 90,', '"arch": 100,', 1),
                   r"METADATA arch 100 does not match module sm90_synthetic \(sm90\)"),
    "missing metadata": (lambda t: re.sub(r'\n    "source_run_ids": .*', "", t, count=1),
                         r"METADATA misses 'source_run_ids'"),
    "empty provenance": (lambda t: re.sub(r'"devices": \[.*?\]', '"devices": []', t, count=1),
                         r"METADATA\['devices'\] must be a non-empty list"),
    "syntax error": (lambda t: t[: len(t) // 2], r"syntax error at line \d+"),
    "code instead of literals": (lambda t: t + "\nimport os\n", r"only `NAME = <literal>` assignments"),
    "computed value": (lambda t: t + "\nEXACT = dict()\n", r"EXACT assigned twice|not a plain literal"),
    "missing table": (lambda t: t[: t.index("\nRANGE = {")] + "\n", r"missing RANGE"),
    "future format": (lambda t: t.replace(f'"lut_format": {LUT_FORMAT},', f'"lut_format": {LUT_FORMAT + 1},', 1),
                      rf"lut_format {LUT_FORMAT + 1} but this"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupted_module_is_rejected_with_a_clear_message(tmp_path, good, name):
    corrupt, pattern = CORRUPTIONS[name]
    r = _validate(tmp_path, corrupt(good))
    assert r.exit_code == 1, r.output
    assert r.output.startswith("FAIL ")
    assert re.search(pattern, r.output), r.output
    assert "1 of 1 LUT modules failed validation" in r.output


def test_config_invalid_for_its_shape_is_rejected(tmp_path, good):
    # 2-byte vectors and one thread per row: a 4096-wide row no longer fits in registers.
    key = '("rmsnorm", "bf16", "rowmajor", "bf16", 4096, 1, 99840): '
    line = next(line for line in good.splitlines() if line.strip().startswith(key))
    bad = '    ' + key + ('{"threads": 128, "threads_per_row": 1, "vec_bytes": 2, "cluster": 1, "stage": "reg", '
                          '"ctas_per_sm": 0, "weight_smem": False, "pdl": False, "l2_prefetch": False},')
    r = _validate(tmp_path, good.replace(line, bad))
    assert r.exit_code == 1
    assert "invalid for the shape" in r.output and "do not fit in registers" in r.output


def test_exact_and_range_must_agree(tmp_path, good):
    key = '("rmsnorm", "bf16", "rowmajor", "bf16", 1024, 1, 1560): '
    line = next(line for line in good.splitlines() if line.strip().startswith(key))
    knobs = line.split(": ", 1)[1]
    other = '{"threads": 1024, "threads_per_row": 1024, "vec_bytes": 2, "cluster": 1, "stage": "reg", ' \
            '"ctas_per_sm": 0, "weight_smem": False, "pdl": False, "l2_prefetch": False},'
    assert knobs != other
    r = _validate(tmp_path, good.replace(line, "    " + key + other))
    assert r.exit_code == 1
    assert "RANGE gives" in r.output and "but EXACT says t1024/r1024/v2" in r.output


def test_module_name_must_match_metadata(tmp_path, good):
    r = _validate(tmp_path, good, "sm90_h100.py")
    assert r.exit_code == 1 and "device_class 'synthetic' does not match module sm90_h100" in r.output
    r = _validate(tmp_path, good, "table.py")
    assert r.exit_code == 1 and "is not sm<arch>_<device class>" in r.output


def test_synthetic_modules_never_ship(good):
    lut = parse_lut(good, "sm90_synthetic")
    assert check_module(lut, shipped=False) == []
    assert any("only GPU measurements may ship" in e for e in check_module(lut, shipped=True))


def test_range_segments_without_knobs_defer_to_later_tiers_but_not_all_of_them(good):
    lut = parse_lut(good, "sm90_synthetic")
    key, segs = next((k, s) for k, s in lut.range.items() if any(c is None for _, c in s))
    assert check_module(lut) == []  # None segments beyond the swept T are valid
    lut.range[key] = [(b, None) for b, _ in segs]
    errs = check_module(lut)
    assert f"RANGE[{key!r}]: no segment has knobs" in errs


def test_validate_without_modules_checks_the_shipped_ones():
    r = CliRunner().invoke(main, ["validate"])
    # Shipped modules (if any) must all be valid; with none, the command says so and succeeds.
    assert r.exit_code == 0, r.output
    assert "nothing to validate" in r.output or r.output.startswith("ok ")


def test_validate_missing_file_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(main, ["validate", str(tmp_path / "sm90_h100.py")])
    assert r.exit_code == 2 and "does not exist" in r.output


def test_compile_every_entry_for_its_arch_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("LUTFORGE_CACHE_DIR", str(tmp_path / "cache"))
    append_rows(tmp_path / "res", synthetic_rows(SMALL, tokens=(16, 24960)))
    out = tmp_path / "sm90_synthetic.py"
    r = CliRunner().invoke(main, ["export", "--results", str(tmp_path / "res"), "--allow-synthetic", "--out", str(out)])
    assert r.exit_code == 0, r.output
    lut = read_lut(out)
    distinct = {(k[:-1], tuple(v.items())) for k, v in lut.exact.items()}
    r = CliRunner().invoke(main, ["validate", "--compile", str(out)])
    assert r.exit_code == 0, r.output
    objects = list((tmp_path / "cache").glob("*.o"))
    assert len(objects) == len(distinct)  # one sm_90a object per (family, config); T is dynamic


def test_compile_failure_is_reported(tmp_path, monkeypatch, good):
    import kernels.compile_cache as cc

    def refuse(problem, cfg, arch):
        raise cc.KernelCompileError(f"{problem.op} C={problem.C} {cfg.short()} {arch}: ptxas error")

    monkeypatch.setattr(cc, "precompile", refuse)
    r = _validate(tmp_path, good, "sm90_synthetic.py", "--compile")
    assert r.exit_code == 1 and "compile sm_90a:" in r.output and "ptxas error" in r.output
