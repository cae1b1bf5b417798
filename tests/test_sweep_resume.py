"""Resume after `kill -9`: no finished trial is lost or repeated, the interrupted one is retried once."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from optuna.trial import TrialState

from kernels.config import KNOB_CHOICES
from sweep.results_io import read_results
from sweep.synthetic import FAULTS_ENV

from sweep_helpers import CLI, REPO, assert_one_row_per_trial, cli_env, measured_trials, run_cli, studies

ARGS = ["sweep", "--op", "rmsnorm", "--problem-set", "wan_vae", "--out", "bf16", "--backend", "synthetic",
        "--trials", "6", "--limit-shapes", "3", "--compile-workers", "1"]
SLOW = {FAULTS_ENV: json.dumps([{"when": {}, "fault": "slow"}])}  # every timed trial takes 0.3 s


def _snapshot(url):
    out = {}
    for name, st in studies(url).items():
        for t in st.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
            out[(name, t.number)] = (t.state, t.value, t.params)
    return out


def _running_owned(url):
    """Trials in flight that already carry their owner (so the kill lands inside a trial, not in ask())."""
    try:
        return [t for st in studies(url).values() for t in st.get_trials(states=(TrialState.RUNNING,))
                if t.user_attrs.get("worker") and len(t.params) == len(KNOB_CHOICES)]
    except Exception:  # the database may not exist yet
        return []


def test_kill_9_mid_sweep_then_resume_loses_and_repeats_nothing(tmp_path):
    res = tmp_path / "results"
    url = f"sqlite:///{res / 'optuna.db'}"
    args = ARGS + ["--results", str(res)]
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(CLI + args, cwd=REPO, env=cli_env(**SLOW), stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:  # the sweep may be creating the schema right now; the poller must not race it
            seen = len(_snapshot(url)) if (res / "optuna.db").exists() else 0
        except Exception:
            seen = 0
        if seen >= 8 and _running_owned(url):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the sweep finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()

    before = _snapshot(url)
    # Trials killed while their knobs were still being suggested had no config yet: nothing to retry.
    interrupted = {(st.study_name, t.number) for st in studies(url).values()
                   for t in st.get_trials(states=(TrialState.RUNNING,)) if len(t.params) == len(KNOB_CHOICES)}
    assert interrupted, "the kill should have interrupted a trial with a complete config"

    r = run_cli(args)  # at full speed: the slow timings only had to keep a trial in flight for the kill
    assert r.returncode == 0, r.stderr

    after = _snapshot(url)
    for key, (state, value, params) in before.items():  # nothing finished before the kill changed or vanished
        assert after[key] == (state, value, params)
    for name, number in interrupted:  # the killed trial failed and its config was measured exactly once since
        st = studies(url)[name]
        assert st.trials[number].state == TrialState.FAIL
        again = [t for t in measured_trials(st) if t.params == st.trials[number].params]
        assert len(again) == 1
    df = read_results(res)
    assert_one_row_per_trial(url, df)  # one Parquet row per finished trial, incl. those the killed run never flushed
    first_run = {tuple(k) for k in df[df["kind"] == "trial"][["study", "trial"]].itertuples(index=False)
                 if tuple(k) in before}
    assert first_run == {k for k in before if studies(url)[k[0]].trials[k[1]].user_attrs.get("row")
                         and studies(url)[k[0]].trials[k[1]].user_attrs.get("duplicate_of") is None}
    runs = df[df["kind"] == "trial"].groupby("run_id").size()
    assert len(runs) == 2  # rows of the first run were recovered with its run id, not re-measured
    for name, st in studies(url).items():
        ok_or_failed = [t for t in measured_trials(st) if t.user_attrs["row"]["status"] != "invalid"]
        assert len(ok_or_failed) >= 6, name
