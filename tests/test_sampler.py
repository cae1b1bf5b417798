"""The valid-config sampler: only valid, untried configs; exhaustive walks cover the space once;
Parzen scoring finds a near-best config of the synthetic cost model in a small budget."""
from __future__ import annotations

import optuna

from kernels.config import KNOB_CHOICES, KernelConfig, heuristic, violations
from kernels.problem import Problem
from sweep.sampler import ValidConfigSampler
from sweep.study import search_space
from sweep.synthetic import model_us

KNOBS = tuple(KNOB_CHOICES)


def _run(p: Problem, sampler, n: int, enqueue=()):
    study = optuna.create_study(sampler=sampler, direction="minimize")
    for cfg in enqueue:
        study.enqueue_trial(cfg.as_dict())
    seen = []

    def objective(trial):
        cfg = KernelConfig(**{k: trial.suggest_categorical(k, list(KNOB_CHOICES[k])) for k in KNOBS})
        seen.append(cfg)
        return float("inf") if violations(p, cfg, 90) else model_us(p, cfg)

    study.optimize(objective, n_trials=n)
    return study, seen


def test_exhaustive_walk_measures_every_valid_config_once_and_keeps_enqueued_ones():
    p = Problem("rmsnorm", 1560, 64)
    heur = heuristic(p, 90)
    valid = search_space(p, 90).valid[::5] + [tuple(heur.as_dict().values())]
    _, seen = _run(p, ValidConfigSampler(valid, KNOB_CHOICES, exhaustive=True, seed=1), len(valid), enqueue=[heur])
    assert seen[0] == heur
    assert len(seen) == len(set(seen)) == len(valid)
    assert {tuple(c.as_dict().values()) for c in seen} == set(valid)


def test_parzen_proposals_are_valid_and_new_and_find_a_near_best_config():
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for p in (Problem("fused_rmsnorm_silu", 6240, 512), Problem("rmsnorm", 399360, 1024),
              Problem("fused_rmsnorm_silu", 1560, 160, out_format="fp8")):
        space = search_space(p, 90)
        assert space.n_valid > 200  # large enough that 40 trials are a real search
        best = min(model_us(p, KernelConfig(*v)) for v in space.valid)
        found_best, rand_best = [], []
        for seed in range(3):
            _, seen = _run(p, ValidConfigSampler(space.valid, KNOB_CHOICES, exhaustive=False, seed=seed), 40)
            assert len(seen) == len(set(seen)) == 40
            assert all(not violations(p, c, 90) for c in seen)
            found = min(model_us(p, c) for c in seen)
            assert found <= 1.05 * best, (p, found, best)
            found_best.append(found)
            _, rnd = _run(p, optuna.samplers.RandomSampler(seed=seed), 40)
            rand_best.append(min((model_us(p, c) for c in rnd if not violations(p, c, 90)), default=float("inf")))
        assert sum(found_best) <= sum(rand_best)  # the search does at least as well as luck


def test_a_fully_taken_space_still_answers():
    p = Problem("rmsnorm", 1, 64)
    space = search_space(p, 90)
    s = ValidConfigSampler(space.valid[:2], KNOB_CHOICES, exhaustive=True, seed=0)
    _, seen = _run(p, s, 4)
    assert set(seen[:2]) == {KernelConfig(*v) for v in space.valid[:2]}
    assert set(seen[2:]) <= set(seen[:2])  # duplicates, which the sweep's claims turn into no-ops
