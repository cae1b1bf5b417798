"""Helpers shared by the sweep tests: run the CLI in a subprocess, read studies and rows back."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-c", "import sys; from sweep.cli import main; sys.exit(main())"]


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_cli(args: list[str], timeout: float = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, cwd=REPO, env=cli_env(**env), capture_output=True, text=True, timeout=timeout)


def studies(url: str) -> dict[str, optuna.Study]:
    from sweep.study import normalize_url

    storage = optuna.storages.RDBStorage(normalize_url(url))
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage)
            for s in storage.get_all_studies()}


def measured_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Finished trials that carry their own Parquet row (not duplicates of another trial)."""
    return [t for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
            if t.user_attrs.get("row") and t.user_attrs.get("duplicate_of") is None]


def assert_one_row_per_trial(url: str, df) -> None:
    """Parquet trial rows and finished Optuna trials match one to one, and no config is measured twice."""
    rows = df[df["kind"] == "trial"]
    keys = list(zip(rows["study"], rows["trial"].astype(int)))
    assert len(keys) == len(set(keys)), "a trial has more than one Parquet row"
    expected = set()
    for name, st in studies(url).items():
        trials = measured_trials(st)
        configs = [tuple(sorted(t.params.items())) for t in trials]
        assert len(configs) == len(set(configs)), f"{name}: a config was measured twice"
        expected |= {(name, t.number) for t in trials}
        assert not st.get_trials(states=(TrialState.RUNNING, TrialState.WAITING)), f"{name}: unfinished trials left"
    assert set(keys) == expected


def assert_rows_round_trip(rows) -> None:
    """Each result row's problem columns name a problem whose key gives them back."""
    from sweep.results_io import problem_key, problem_of_row

    for _, r in rows.iterrows():
        assert problem_key(problem_of_row(r)) == problem_key(r.to_dict())


def export_checked(results, out_path):
    """`lutforge export` of synthetic rows into `out_path`, read back and statically valid: the LutModule."""
    from click.testing import CliRunner

    from kernels.luts import read_lut
    from lut_export.validate import check_module
    from sweep.cli import main

    r = CliRunner().invoke(main, ["export", "--results", str(results), "--allow-synthetic", "--out", str(out_path)])
    assert r.exit_code == 0, r.output
    lut = read_lut(out_path)
    assert check_module(lut) == []
    return lut
