"""`lutforge validate --gpu` on a real GPU: entries exported from measured rows pass the correctness and
re-timing checks; an entry hand-edited to a valid but slow config is flagged as slower than the heuristic."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from kernels.config import KNOB_CHOICES, KernelConfig, heuristic
from kernels.luts import read_lut
from kernels.problem import Problem, ideal_bytes
from lut_export.render import render
from lut_export.tables import build_tables
from sweep.cli import main
from sweep.results_io import append_rows

pytestmark = [pytest.mark.gpu, pytest.mark.timing]

PROBLEMS = (Problem("rmsnorm", 16384, 4096), Problem("fused_rmsnorm_silu", 1560, 320, out_format="fp8"))
SLOW = KernelConfig(threads=32, threads_per_row=32, vec_bytes=2)  # one warp per row, 2-byte loads


def test_validate_gpu_passes_measured_winners_and_flags_a_slow_entry(tmp_path, monkeypatch):
    from kernels import runner
    from kernels.runner import arch_of, make_case
    from lut_export.gpu_check import _time
    from sweep.provenance import gpu_provenance

    monkeypatch.setenv("LUTFORGE_CACHE_DIR", str(tmp_path / "cache"))
    info = gpu_provenance()
    arch = arch_of()
    rows = []
    for p in PROBLEMS:
        h = heuristic(p, info["sm"])
        t = _time(runner, p, h, [make_case(p, seed=i) for i in range(3)], arch)
        rows.append(dict(run_id="gpu-validate", study="gpu-validate", trial=0, kind="trial", impl="lutforge",
                         config_source="heuristic", problem_set="test", op=p.op, out_format=p.out_format,
                         scale_layout=p.scale_layout, in_dtype=p.in_dtype, T=p.T, C=p.C, heads=p.heads,
                         status="ok", median_us=t.median_us, p20_us=t.p20_us, p80_us=t.p80_us,
                         bytes=ideal_bytes(p), timestamp="2026-11-22T10:00:00Z", **info,
                         **{f"knob_{k}": getattr(h, k) for k in KNOB_CHOICES}))
    append_rows(tmp_path / "res", rows)
    out = tmp_path / f"sm{info['sm']}_{info['device_class']}.py"
    r = CliRunner().invoke(main, ["export", "--results", str(tmp_path / "res"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["validate", "--compile", "--gpu", str(out)])
    assert r.exit_code == 0, r.output

    # Hand-edit: the big rmsnorm entry becomes a valid but slow config (tables rebuilt as export does).
    lut = read_lut(out)
    p = PROBLEMS[0]
    winners = {k: KernelConfig(**v) for k, v in lut.exact.items()}
    winners[(p.op, p.out_format, p.scale_layout, p.in_dtype, p.C, p.heads, p.T)] = SLOW
    out.write_text(render(lut.metadata, *build_tables(winners)))
    r = CliRunner().invoke(main, ["validate", "--gpu", str(out)])
    assert r.exit_code == 1, r.output
    assert "slower than the heuristic" in r.output and SLOW.short() in r.output
