"""The learned fallback (sweep/fallback_fit.py, kernels.config.heuristic): on synthetic sweep rows whose right
answer is known, the tree splits where the regimes change and picks each regime's correction; the emitted
module reproduces the model; held-out sizes never reach the fit; and whatever a tree says, the heuristic
returns configs the kernel can run (CPU)."""
from __future__ import annotations

import ast
import importlib.util
import json
import random
from dataclasses import replace

import pytest
from click.testing import CliRunner

from kernels import config
from kernels.config import (KernelConfig, analytical_heuristic, corrected, fallback_features, from_relative,
                            heuristic, max_vec_bytes, relative_of, violations)
from kernels.problem import FP4_BLOCK, OPS, Problem, out_formats
from sweep import fallback_fit
from sweep.cli import main
from sweep.results_io import append_rows

SMALL_C, LARGE_C = (64, 128, 256, 512), (2048, 4096, 8192, 16384)
TOKENS = (1024, 4096, 16384, 65536)
SMALL_FIX, LARGE_FIX = {"weight_smem": True}, {"ctas_per_sm": 2}


def _row(p: Problem, cfg: KernelConfig, us: float, kind: str = "trial", **extra) -> dict:
    return dict(run_id="synthetic-fit-1", study="s", trial=0, kind=kind, impl="lutforge", config_source="search",
                problem_set="test", op=p.op, out_format=p.out_format, scale_layout=p.scale_layout,
                in_dtype=p.in_dtype, T=p.T, C=p.C, heads=p.heads, status="ok", median_us=us, p20_us=us, p80_us=us,
                device_class="h200", device_name="NVIDIA H200", sm=90, backend="gpu", kernel_source="k1",
                timestamp="2026-12-01T00:00:00Z", **{f"knob_{k}": v for k, v in cfg.as_dict().items()}) | extra


def regime_rows(poison_C: int | None = None) -> list[dict]:
    """Small rows want the weight in shared memory, long rows a persistent grid; each problem also timed the
    analytical config (10 % slower), the other regime's fix (20 % slower), two poor configs and the other
    probes (30 % slower). At
    `poison_C` a staged config wins by 2x instead (what a fit that saw those rows would pick up)."""
    rows = []
    for C in SMALL_C + LARGE_C:
        for T in TOKENS:
            p = Problem("rmsnorm", T, C)
            base = analytical_heuristic(p, 90)
            good, other = (SMALL_FIX, LARGE_FIX) if C in SMALL_C else (LARGE_FIX, SMALL_FIX)
            times = {base: 11.0, corrected(p, base, good): 10.0, corrected(p, base, other): 12.0,
                     replace(base, vec_bytes=4): 14.0, replace(base, vec_bytes=2): 15.0}
            if C == poison_C:
                times[corrected(p, base, {"stage": "smem"})] = 5.0
            for cfg in config.probes(p, 90):  # every sweep times the probes (the fit trains on probed problems)
                times.setdefault(cfg, 13.0)
            rows += [_row(p, cfg, us, config_source="heuristic" if cfg == base else "search")
                     for cfg, us in times.items()]
    return rows


def rows_frame(tmp_path, rows, name="results"):
    d = tmp_path / name
    append_rows(d, rows)
    return d, fallback_fit.load_rows([d], 90)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    _, df = rows_frame(tmp_path_factory.mktemp("fit"), regime_rows())
    return fallback_fit.fit(df, 90)


def test_relative_form_round_trips_on_its_own_problem():
    rng = random.Random(1)
    for _ in range(300):
        p = Problem("fused_rmsnorm_silu", rng.randint(1, 1 << 18), rng.choice((64, 96, 160, 1000, 2304, 4096)))
        cfg = analytical_heuristic(p, 90)
        for alt in (cfg, replace(cfg, threads=256), replace(cfg, pdl=True, l2_prefetch=True)):
            if not violations(p, alt, 90):
                assert from_relative(p, relative_of(p, alt), 90) == alt


def test_tree_splits_the_two_regimes_and_picks_each_fix(fitted):
    split = fitted.tree
    assert isinstance(split, fallback_fit.Split) and split.feature == "C"
    assert max(SMALL_C) <= split.threshold < min(LARGE_C)
    assert fitted.choose(**fallback_features(Problem("rmsnorm", 5000, 300))) == SMALL_FIX
    assert fitted.choose(**fallback_features(Problem("rmsnorm", 5000, 6000))) == LARGE_FIX
    # below the fewest rows a correction was measured at, the analytical rules answer
    assert fitted.choose(**fallback_features(Problem("rmsnorm", min(TOKENS) - 1, 300))) is None
    for m in fitted.train:
        fix = SMALL_FIX if m.problem.C in SMALL_C else LARGE_FIX
        assert fitted.config(m.problem) == corrected(m.problem, analytical_heuristic(m.problem, 90), fix)
    s = fitted.scores["train"]
    assert s["learned"]["geomean_regret"] == pytest.approx(1.0) and s["learned"]["unmeasured"] == 0
    assert s["analytical"]["geomean_regret"] == pytest.approx(1.1)


def _load(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_emitted_module_reproduces_the_model_and_imports_nothing(fitted, tmp_path):
    path = tmp_path / "fallback_test.py"
    path.write_text(fallback_fit.render(fitted, "lutforge fit-fallback --results test"))
    tree = ast.parse(path.read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    module = _load(path)
    assert module.FITTED["fit_problems"] == len(fitted.train)
    rng = random.Random(2)
    feats = [fallback_features(m.problem) for m in fitted.train]
    feats += [fallback_features(Problem("rmsnorm", rng.randint(0, 1 << 20), rng.randint(1, 40000)), None,
                                rng.choice((2, 4, 8, 16))) for _ in range(500)]
    for f in feats:
        assert module.choose(**f) == fitted.choose(**f), f
    text = path.read_text()
    assert "synthetic-fit-1" in text and "e.g. h200 rmsnorm/bf16" in text  # leaves cite their rows


def test_held_out_sizes_never_reach_the_fit(tmp_path):
    _, df = rows_frame(tmp_path, regime_rows(poison_C=256))
    held = fallback_fit.fit(df, 90, holdout=(256,))
    assert {m.problem.C for m in held.train} == set(SMALL_C + LARGE_C) - {256}
    assert {m.problem.C for m in held.heldout} == {256} and len(held.heldout) == len(TOKENS)
    assert held.fit_rows == int((df["C"] != 256).sum())
    blind = fallback_fit.fit(df[df["C"] != 256].reset_index(drop=True), 90)  # never given those rows
    rng = random.Random(4)
    for _ in range(300):
        f = fallback_features(Problem("rmsnorm", rng.randint(0, 1 << 20), rng.randint(1, 40000)))
        assert held.choose(**f) == blind.choose(**f)
    h = held.scores["holdout"]["learned"]
    assert h["measured"] + h["unmeasured"] == len(TOKENS) and h["measured"] == len(TOKENS)
    assert h["geomean_regret"] == pytest.approx(2.0)  # scored against the held-out rows' own best (the poison)
    assert held.scores["holdout"]["analytical"]["geomean_regret"] == pytest.approx(2.2)


def test_a_correction_never_timed_at_a_hidden_size_does_not_reach_it(tmp_path):
    """EVERY_C: the long-row fix was never timed at C=4096, between sizes where it won; the fit may not carry it
    there (it cannot split 4096 off its neighbours), whereas without the rule it would, on coverage alone."""
    rows = [r for r in regime_rows() if not (r["C"] == 4096 and r["knob_ctas_per_sm"] == LARGE_FIX["ctas_per_sm"])]
    _, df = rows_frame(tmp_path, rows)
    strict, loose = fallback_fit.fit(df, 90), fallback_fit.fit(df, 90, every_c=False)
    assert strict.params["every_c"] and not loose.params["every_c"]
    at = [m for m in strict.train if m.problem.C == 4096]
    assert len(at) == len(TOKENS)
    for m in at:
        assert strict.config(m.problem) == analytical_heuristic(m.problem, 90)
        assert loose.config(m.problem) == corrected(m.problem, analytical_heuristic(m.problem, 90), LARGE_FIX)
        assert m.regret_of(loose.config(m.problem)) is None  # what the loose fit runs there was never measured
    assert strict.scores["train"]["learned"]["unmeasured"] == 0


def test_cli_writes_module_and_scores(tmp_path):
    d, _ = rows_frame(tmp_path, regime_rows())
    out, scores = tmp_path / "fallback_cli.py", tmp_path / "scores.json"
    r = CliRunner().invoke(main, ["fit-fallback", "--results", str(d), "--arch", "sm90", "--holdout-set", "none",
                                  "--holdout-C", "128,8192", "--validate-C", "4096", "-o", str(out),
                                  "--score-json", str(scores)])
    assert r.exit_code == 0, r.output
    s = json.loads(scores.read_text())
    assert s["arch"] == 90 and s["holdout_C"] == [128, 8192] and s["holdout_problems"] == 2 * len(TOKENS)
    assert s["holdout_measured"] + s["holdout_unmeasured"] == s["holdout_problems"]
    assert s["holdout_geomean_regret"] == pytest.approx(1.0) and s["train_analytical_geomean_regret"] == pytest.approx(1.1)
    assert s["validation"]["holdout_C"] == [128, 4096, 8192]
    module = _load(out)
    assert module.choose(**fallback_features(Problem("rmsnorm", 4096, 128))) == SMALL_FIX
    assert "--holdout-C 128,8192" in out.read_text()


def test_knobs_the_measured_kernel_lacked_are_compared_at_their_default(tmp_path):
    p = Problem("rmsnorm", 65536, 512)
    base = analytical_heuristic(p, 90)
    assert not base.pdl
    _, df = rows_frame(tmp_path, [_row(p, base, 10.0), _row(p, replace(base, vec_bytes=4), 12.0)])
    df["schema_version"] = 2  # before knob_l2_prefetch existed: its rows ran without the prefetch
    (m,) = fallback_fit.measured_problems(df)
    assert m.absent == ("l2_prefetch",)
    assert m.regret_of(replace(base, pdl=True, l2_prefetch=True)) is None
    assert m.regret_of(replace(base, l2_prefetch=True)) == pytest.approx(1.0)


def _random_case(rng: random.Random):
    op = rng.choice(sorted(OPS))
    dt = rng.choice(["bf16", "fp16"])
    fmt = rng.choice(out_formats(op, dt))
    C = rng.choice([rng.randint(1, 512), rng.randint(1, 20000), rng.randint(1, 131072)])
    blk = FP4_BLOCK.get(fmt)
    if blk:
        C = max(blk, C // blk * blk)
    heads = rng.randint(1, 64) if OPS[op].per_head else 1
    layout = rng.choice(["rowmajor", "swizzled"]) if OPS[op].fp4_scales else "rowmajor"
    p = Problem(op, rng.choice([0, 1, 333, rng.randint(1, 1 << 20)]), C, dt, fmt, heads, layout)
    stride = None if blk else rng.choice([None, C, C + rng.randint(0, 64)])
    return p, stride, 16 if blk else rng.choice([16, 8, 4, 2])


WILD = [None, {"pdl": True, "l2_prefetch": True}, {"rows_per_cta": 1, "pdl": True}, {"vectors_per_thread": 0.25},
        {"vectors_per_thread": 64.0, "threads": 1024}, {"cluster": 8, "threads": 32}, {"stage": "smem", "vec_bytes": 2},
        {"l2_prefetch": True, "pdl": False}, {"vec_bytes": 16, "weight_smem": True, "ctas_per_sm": 8},
        {"rows_per_cta": 64, "vectors_per_thread": 1.0}]


@pytest.mark.parametrize("tree", ["shipped", "wild"])
def test_heuristic_is_valid_whatever_the_tree_says(tree, monkeypatch):
    if tree == "wild":  # a tree asking for everything, including what cannot run: the rules must catch it
        monkeypatch.setattr(config, "_shipped_choose",
                            lambda arch: lambda **f: WILD[hash((f["C"], f["rows"], f["max_vec"])) % len(WILD)])
    rng = random.Random(3)
    for _ in range(3000):
        p, stride, align = _random_case(rng)
        for arch in (90, 100):
            cfg = heuristic(p, arch, row_stride=stride, ptr_align=align)
            assert not violations(p, cfg, arch, stride), (p, stride, align, cfg)
            assert cfg.vec_bytes <= max_vec_bytes(p, stride, align) and align % cfg.vec_bytes == 0


def test_shipped_model_is_sm90_only():
    assert config._shipped_choose(90) is not None and config._shipped_choose(100) is None
    p = Problem("rmsnorm", 50000, 6144)
    assert heuristic(p, 100) == analytical_heuristic(p, 100)  # sm100 has no model


def test_problems_that_never_timed_the_analytical_config_or_its_probes_are_left_out(tmp_path):
    """Against an imputed regret any measured correction looks like a gain: a problem whose sweep never timed
    the analytical config, or most of its probes, is no evidence and stays out of the fit."""
    rows = regime_rows()
    blind = Problem("rmsnorm", 2048, 512)  # a small-C problem whose rows lack the analytical config
    base = analytical_heuristic(blind, 90)
    rows += [_row(blind, corrected(blind, base, {"stage": "smem"}), 5.0),
             _row(blind, replace(base, vec_bytes=4), 20.0)]
    unprobed = Problem("rmsnorm", 3072, 512)  # timed the analytical config but none of its probes
    ubase = analytical_heuristic(unprobed, 90)
    rows += [_row(unprobed, ubase, 11.0), _row(unprobed, corrected(unprobed, ubase, {"stage": "smem"}), 5.0)]
    _, df = rows_frame(tmp_path, rows)
    model = fallback_fit.fit(df, 90)
    keys = {(m.problem.T, m.problem.C) for m in model.train}
    assert len(keys) == len(SMALL_C + LARGE_C) * len(TOKENS)
    assert (blind.T, blind.C) not in keys and (unprobed.T, unprobed.C) not in keys
    assert (unprobed.T, unprobed.C) in {(m.problem.T, m.problem.C) for m in fallback_fit.fit(df, 90, min_probed=0).train}
    assert {leaf.correction and tuple(leaf.correction) for leaf in model.leaves()} <= {("weight_smem",), ("ctas_per_sm",)}
