"""The sampler of a lutforge study: it proposes only valid configs that no trial has taken yet.

Optuna's stock samplers suggest knob by knob, independently, and most of a kernel's knob grid is
invalid for a given shape (a vector wider than the row, a cluster on a short row, ...). Walking those
dead ends cost more storage round trips than the GPU spent timing. Here the valid configs are
enumerated up front (`SearchSpace`), and each trial gets one of them in a single relative sample:

- exhaustive while the valid space fits the budget: every config once, in a seeded random order;
- otherwise Parzen scoring in the spirit of TPE: after `n_startup` random configs, split the measured
  trials at the `gamma` quantile of their medians (failed trials count as bad) and score each untried
  config by sum over knobs of log l(value) / g(value) (smoothed counts among good vs bad trials); the
  next config is drawn among the best `top` by that score, so concurrent trials rarely collide.
"""
from __future__ import annotations

import math
import random
import threading

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState


class ValidConfigSampler(optuna.samplers.BaseSampler):
    def __init__(self, valid: list[tuple], knob_choices: dict, exhaustive: bool, seed: int | None = None,
                 n_startup: int = 8, gamma: float = 0.25, top: int = 4, prior: float = 1.0):
        if not valid:
            raise ValueError("the search space has no valid config")
        self.choices = dict(knob_choices)  # the family's knobs, in the order of the tuples in `valid`
        self.order = tuple(self.choices)
        self.valid, self.exhaustive = list(valid), exhaustive
        self.n_startup, self.gamma, self.top, self.prior = n_startup, gamma, top, prior
        self._rng = random.Random(seed)
        self._order = self._rng.sample(self.valid, len(self.valid))  # exhaustive walk order
        self._proposed: set[tuple] = set()  # handed to trials of this process, maybe not yet stored
        self._lock = threading.Lock()
        self._fallback = optuna.samplers.RandomSampler(seed=seed)
        # Configs as rows of choice indices, so scoring every valid config is one vector sum per knob.
        self._index = [{v: j for j, v in enumerate(self.choices[k])} for k in self.order]
        self._codes = np.array([[self._index[i][v] for i, v in enumerate(c)] for c in self.valid], dtype=np.int64)

    @property
    def name(self) -> str:
        return "exhaustive" if self.exhaustive else "parzen"

    def infer_relative_search_space(self, study, trial):
        return {k: CategoricalDistribution(list(self.choices[k])) for k in self.order}

    def sample_relative(self, study, trial, search_space):
        if not search_space or "fixed_params" in trial.system_attrs:
            return {}  # an enqueued trial (the heuristic, a seed, a retry) brings its own config
        trials = study.get_trials(deepcopy=False)
        with self._lock:
            taken = {self._config(t.params) for t in trials if len(t.params) == len(self.order)} | self._proposed
            pick = self._pick(trials, taken)
            if pick is None:  # every valid config is taken: the study is done; any proposal is a duplicate
                pick = self._rng.choice(self.valid)
            self._proposed.add(pick)
        return dict(zip(self.order, pick))

    def _pick(self, trials, taken: set) -> tuple | None:
        if self.exhaustive:
            return next((c for c in self._order if c not in taken), None)
        free = np.array([c not in taken for c in self.valid])
        if not free.any():
            return None
        done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                and len(t.params) == len(self.order)]
        ok = sorted((t for t in done if t.state == TrialState.COMPLETE and t.value is not None),
                    key=lambda t: t.value)
        if len(ok) < self.n_startup:
            return self.valid[self._rng.choice(np.flatnonzero(free).tolist())]
        n_good = max(1, math.ceil(self.gamma * len(ok)))
        good = {t.number for t in ok[:n_good]}
        score = np.zeros(len(self.valid))
        for i, k in enumerate(self.order):  # sum over knobs of log l(value) - log g(value)
            n = len(self.choices[k])
            cg, cb = np.full(n, self.prior), np.full(n, self.prior)
            for t in done:
                (cg if t.number in good else cb)[self._index[i][t.params[k]]] += 1
            score += (np.log(cg / cg.sum()) - np.log(cb / cb.sum()))[self._codes[:, i]]
        score[~free] = -np.inf
        best = np.argsort(-score, kind="stable")[:min(self.top, int(free.sum()))]
        return self.valid[int(self._rng.choice(best.tolist()))]

    def sample_independent(self, study, trial, param_name, param_distribution):
        # Only reached for a parameter outside the relative space (none today): stay correct anyway.
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def _config(self, params: dict) -> tuple:
        return tuple(params.get(k) for k in self.order)
