"""The search: one Optuna study per (op, out format, problem, device class), its storage, and the
bookkeeping that makes a sweep resumable and safe to run from many processes at once.

- Parameters are the problem's kernel family's knobs with their fixed full choice lists (kernels.family).
  The sampler (sweep.sampler) proposes only valid configs no trial has taken: exhaustive when the
  counted valid space fits the budget, Parzen scoring otherwise. A config that is still invalid (an
  enqueued one, say) stops at the first knob that admits no valid completion and is recorded
  `invalid` with the reason. The objective is the median microseconds (minimised).
- The heuristic config is enqueued first, then the winners of sibling studies (same kernel, other T),
  then the family's probe configs (the row family: the analytical config and its one-knob corrections,
  so every problem measures the corrections the learned fallback may adopt).
- A claims table beside Optuna's tables (same database) gives each (study, config) to exactly one
  trial: a config another trial already measured is never measured again, across processes and
  hosts. A trial of a process that died (kill -9) is failed at once when its owner is a dead local
  process (or by Optuna's heartbeat otherwise) and its config retried by a new trial.
- Each finished trial stores its Parquet row in its user attributes before it is told; rows are
  buffered and appended to Parquet, and rows a killed process never flushed are written on resume
  (`reconcile_rows`), so Parquet holds exactly one row per finished trial.
- Finalists (top few plus the heuristic) are re-benchmarked interleaved; results within TIE_FRACTION
  are ties, resolved toward the simpler config (`simplicity`).
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import itertools
import json
import math
import os
import socket
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from kernels.family import Family, family_of, family_of_config, family_of_op

from .families import harness_of
from .provenance import make_row
from .results_io import append_rows, read_results
from .sampler import ValidConfigSampler
from .timer import summarize

optuna.logging.set_verbosity(optuna.logging.WARNING)  # per-trial INFO lines would drown the progress bar

BRUTE_FORCE_MAX = 512  # valid configs brute force may enumerate when no trial budget is given
TIE_FRACTION = 0.02  # re-benchmarked medians closer than this are ties
FINALISTS = 3
SEEDS = 3  # winners of sibling studies (other T) enqueued after the heuristic
PROBE_SHARE = 3  # a trial budget gives the family's probe configs at most 1/PROBE_SHARE of what seeds leave
REBENCH_ROUNDS = 3
HEARTBEAT_S = 30
GRACE_S = 120
MAX_RETRIES = 2  # a config whose trial was killed is retried at most this often
FLUSH_ROWS = 64
FLUSH_S = 30.0
MEASURED = ("ok", "compile_error", "runtime_error", "timeout", "wrong_result")


def size_token(p) -> str:
    """The runtime-size part of a study name (sibling studies differ only there): T, or the family's sizes
    joined by x after a letter (channel-first: P<N>x<S>)."""
    return harness_of(p).size_token(p)


def token_positions(token: str) -> int:
    """Positions a size token stands for (T, or the product of N x S)."""
    return math.prod(int(v) for v in token[1:].split("x"))


def study_name(p, device_class: str) -> str:
    """Deterministic study name: the problem key, the device class the numbers belong to and the kernel source
    version (a changed kernel starts new studies instead of resuming stale measurements)."""
    if not device_class or not isinstance(device_class, str):
        raise ValueError(f"device_class must be a non-empty str, got {device_class!r}")
    parts = [p.op, p.out_format, p.in_dtype, size_token(p), f"C{p.C}", *harness_of(p).study_parts(p)]
    return ":".join(parts + [device_class, f"k{family_of(p).source_hash()[:8]}"])


class SearchSpace:
    """The valid configs of one problem family's space key (T does not change a row config's validity),
    counted once."""

    def __init__(self, p, arch: int):
        self.problem, self.arch = p, arch
        self.family: Family = family_of(p)
        self.knobs = tuple(self.family.knob_choices)
        choices = self.family.knob_choices
        make = self.family.config_type
        self.valid: list[tuple] = []
        if self.family.valid_configs is not None:
            self.valid = list(self.family.valid_configs(p, arch))
        else:
            for combo in itertools.product(*(choices[k] for k in self.knobs)):
                if not self.family.violations(p, make(**dict(zip(self.knobs, combo))), arch):
                    self.valid.append(combo)
        self.prefixes = {v[:i] for v in self.valid for i in range(1, len(self.knobs) + 1)}
        # What the sampler proposes (the family's `searchable`, e.g. short row loops); all valid configs for
        # a problem that has nothing else.
        short = [v for v in self.valid if self.family.searchable(p, make(**dict(zip(self.knobs, v))))]
        self.searched = short or self.valid

    @property
    def n_valid(self) -> int:
        return len(self.valid)

    def config(self, params: dict):
        return self.family.config_type(**params)

    def dead_end(self, params: dict) -> bool:
        """True when no valid config starts with the knobs suggested so far."""
        return tuple(params[k] for k in self.knobs[:len(params)]) not in self.prefixes

    def explain(self, params: dict) -> str:
        """Why the partial config `params` has no valid completion (the defaults' violations as example)."""
        shown = ", ".join(f"{k}={v!r}" for k, v in params.items())
        make = self.family.config_type
        example = make(**{**make().as_dict(), **params})
        why = self.family.violations(self.problem, example, self.arch) or ["other knob values are needed"]
        return f"no valid config has {shown}; e.g. {example.short()}: " + "; ".join(why)


@functools.lru_cache(maxsize=256)
def _space(key, arch: int) -> SearchSpace:
    return SearchSpace(key, arch)


def search_space(p, arch: int) -> SearchSpace:
    return _space(family_of(p).space_key(p), arch)


def choose_sampler(space: SearchSpace, trials: int | None, seed: int | None = None) -> ValidConfigSampler:
    """Exhaustive when the counted valid space fits the budget, Parzen scoring otherwise."""
    limit = trials if trials is not None else BRUTE_FORCE_MAX
    return ValidConfigSampler(space.searched, space.family.knob_choices, exhaustive=len(space.searched) <= limit,
                              seed=seed)


def pick_winner(medians: dict, heur) -> tuple[object, str]:
    """The simplest config (its family's `simplicity`) among those within TIE_FRACTION of the fastest
    median, and why."""
    if not medians:
        raise ValueError("pick_winner needs at least one measured config")
    simplicity = family_of_config(heur).simplicity
    fastest = min(medians, key=medians.get)
    tied = [c for c, us in medians.items() if us <= medians[fastest] * (1 + TIE_FRACTION)]
    win = min(tied, key=lambda c: (simplicity(c, heur), medians[c]))
    if win == fastest:
        return win, "fastest"
    return win, f"tie within {TIE_FRACTION:.0%} of {fastest.short()}: simpler config preferred"


# ---------------------------------------------------------------------------------------------------
# Storage, process identity, claims


def default_storage_url(results_dir: str | os.PathLike) -> str:
    return f"sqlite:///{Path(results_dir).resolve() / 'optuna.db'}"


def normalize_url(url: str) -> str:
    """postgresql://... with whichever PostgreSQL driver is installed (SQLAlchemy 2.1 defaults to psycopg 3;
    the test extra installs psycopg2-binary)."""
    import importlib.util

    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme) and importlib.util.find_spec("psycopg") is None \
                and importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + url[len(scheme):]
    return url


def _engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 120}}
    return {"pool_pre_ping": True}


SCHEMA_RACE_RETRIES = 5


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna RDB storage with heartbeats; stale trials are failed and their configs retried."""
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"storage must be a database URL such as sqlite:///path.db or postgresql://..., got {url!r}")
    url = normalize_url(url)
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(SCHEMA_RACE_RETRIES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.simplefilter("ignore", FutureWarning)
                storage = optuna.storages.RDBStorage(
                    url, engine_kwargs=_engine_kwargs(url), heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=MAX_RETRIES))
            break
        except Exception as e:
            # Optuna checks for its tables, then creates them: a process opening a new database at the same
            # moment (a second --gpus worker, a monitor) can create them in between. They exist now: retry.
            if "already exists" not in str(e) or attempt == SCHEMA_RACE_RETRIES - 1:
                raise
            time.sleep(0.1 * (attempt + 1))
    if url.startswith("sqlite"):
        _serialise_sqlite(storage.engine)
    return storage


def _serialise_sqlite(engine) -> None:
    """Make every SQLite transaction take the write lock when it begins (BEGIN IMMEDIATE).

    Optuna pops an enqueued trial by reading WAITING then writing RUNNING; SQLite ignores SELECT ...
    FOR UPDATE, so two threads or processes could both pop the same trial. Serialised transactions
    close that race (PostgreSQL's row locks already do)."""
    import sqlalchemy as sa

    @sa.event.listens_for(engine, "connect")
    def _no_implicit_transactions(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        dbapi_conn.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
        dbapi_conn.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; a crash loses no commit order

    @sa.event.listens_for(engine, "begin")
    def _begin_immediate(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # pooled connections were opened before the listeners


def _proc_start(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks since boot


def owner_id() -> str:
    """host:pid:start - names this process uniquely even after its pid is reused."""
    return f"{socket.gethostname()}:{os.getpid()}:{_proc_start(os.getpid())}"


def owner_dead(owner: str) -> bool:
    """True only for an owner on this host whose process is gone; owners elsewhere are left to heartbeats."""
    host, pid, start = owner.rsplit(":", 2)
    if host != socket.gethostname():
        return False
    return _proc_start(int(pid)) != start or start == "None"


class Claims:
    """(study, key) -> trial, with a primary key: the database decides which trial measures a config."""

    def __init__(self, url: str):
        import sqlalchemy as sa

        self.sa = sa
        url = normalize_url(url)
        self.engine = sa.create_engine(url, **_engine_kwargs(url))
        meta = sa.MetaData()
        self.table = sa.Table("lutforge_claims", meta,
                              sa.Column("study", sa.String(512), primary_key=True),
                              sa.Column("key", sa.String(1024), primary_key=True),
                              sa.Column("trial", sa.Integer, nullable=False))
        for attempt in range(5):  # concurrent creators can race on CREATE TABLE
            try:
                meta.create_all(self.engine, checkfirst=True)
                break
            except sa.exc.SQLAlchemyError:
                if attempt == 4:
                    raise
                time.sleep(0.5)

    def claim(self, study: str, key: str, trial: int, takeover=lambda owner: False) -> int | None:
        """None if `trial` now owns (study, key); else the owning trial number. `takeover(owner)` says
        whether an existing owner (e.g. a failed trial) may be replaced."""
        sa, t = self.sa, self.table
        for _ in range(10):
            try:
                with self.engine.begin() as c:
                    c.execute(t.insert().values(study=study, key=key, trial=trial))
                return None
            except sa.exc.IntegrityError:
                pass
            with self.engine.begin() as c:
                owner = c.execute(sa.select(t.c.trial).where(t.c.study == study, t.c.key == key)).scalar()
            if owner is None:
                continue  # released in between; try the insert again
            if not takeover(owner):
                return owner
            with self.engine.begin() as c:
                n = c.execute(t.update().where(t.c.study == study, t.c.key == key, t.c.trial == owner)
                              .values(trial=trial)).rowcount
            if n == 1:
                return None
        raise RuntimeError(f"could not settle the claim on {study} {key}")

    def close(self) -> None:
        self.engine.dispose()


def config_key(params: dict) -> str:
    return json.dumps({k: params[k] for k in params}, sort_keys=True)


def reap_dead_trials(study: optuna.Study, storage: optuna.storages.RDBStorage) -> list[int]:
    """Fail RUNNING trials whose owner is a dead process on this host and enqueue their retries."""
    failed = []
    callback = storage.get_heartbeat_stale_trial_callback()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = (t.user_attrs.get("worker") or {}).get("owner")
        if not owner or not owner_dead(owner):
            continue
        try:
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                failed.append(t.number)
                if callback is not None:
                    callback(study, storage.get_trial(t._trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another process got there first
    return failed


# ---------------------------------------------------------------------------------------------------
# Parquet rows


class RowWriter:
    """Buffers rows and appends them to Parquet in batches (a batch file per flush, never rewritten)."""

    def __init__(self, results_dir: str | os.PathLike, flush_rows: int = FLUSH_ROWS, flush_s: float = FLUSH_S,
                 prefix: str = "trials"):
        self.results_dir = Path(results_dir)
        self.prefix = prefix
        self.flush_rows, self.flush_s = flush_rows, flush_s
        self._rows: list[dict] = []
        self._lock = threading.Lock()
        self._last = time.monotonic()

    def add(self, row: dict) -> None:
        with self._lock:
            self._rows.append(row)
            due = len(self._rows) >= self.flush_rows or time.monotonic() - self._last >= self.flush_s
        if due:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            rows, self._rows = self._rows, []
            self._last = time.monotonic()
            if rows:
                append_rows(self.results_dir, rows, prefix=self.prefix)


def _existing_trial_rows(results_dir: Path, studies: set[str]) -> set[tuple[str, int]]:
    try:
        df = read_results(results_dir)
    except ValueError as e:
        if "no Parquet files" in str(e) or "does not exist" in str(e):
            return set()
        raise
    df = df[(df["kind"] == "trial") & df["study"].isin(list(studies))]
    return set(zip(df["study"], df["trial"].astype(int)))


def reconcile_rows(storage: optuna.storages.RDBStorage, studies: list[str], results_dir: str | os.PathLike) -> int:
    """Write the rows of finished trials whose writer (a process on this host, same results dir) died
    before flushing them. Serialised by a file lock so concurrent resumes cannot both write a row."""
    rdir = Path(results_dir).resolve()
    rdir.mkdir(parents=True, exist_ok=True)
    with open(rdir / ".lutforge-reconcile.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        pending: dict[tuple[str, int], dict] = {}
        known = {s.study_name for s in storage.get_all_studies()}
        for name in studies:
            if name not in known:
                continue
            study = optuna.load_study(study_name=name, storage=storage)
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
                row, writer = t.user_attrs.get("row"), t.user_attrs.get("worker")
                if not row or t.user_attrs.get("duplicate_of") is not None or not writer:
                    continue
                if writer.get("results") != str(rdir) or not owner_dead(writer["owner"]):
                    continue
                pending[(name, t.number)] = row
        if not pending:
            return 0
        have = _existing_trial_rows(rdir, {s for s, _ in pending})
        missing = [row for k, row in sorted(pending.items()) if k not in have]
        append_rows(rdir, missing)
        return len(missing)


# ---------------------------------------------------------------------------------------------------
# One study


@dataclass
class StudyRun:
    """Everything one process needs to run studies against one device."""

    evaluator: object  # trial_worker.Evaluator (started)
    storage: optuna.storages.RDBStorage
    claims: Claims
    writer: RowWriter
    run_id: str
    results_dir: Path
    trials: int | None = None
    time_budget: float | None = None
    n_jobs: int = 1
    seed: int | None = None
    on_trial: object = None  # callable(status) for progress
    owner: str = field(default_factory=owner_id)
    deadline: float | None = None  # epoch seconds by which search and re-bench should be done (--wall-budget)
    finalists: int = FINALISTS
    rounds: int = REBENCH_ROUNDS
    reached: set = field(default_factory=set)  # problems whose search started in this process
    stopped: bool = False  # `stop` was called: no trial is timed any more

    def rebench_reserve_s(self) -> float:
        """Estimated seconds to re-benchmark every problem reached so far: (finalists + heuristic) x rounds
        timings at the mean cost of one timing of that problem (`Evaluator.timing_s`, which leaves out first
        timings: they carry one-time set-up), or the mean over problems for one not yet timed twice."""
        cost = dict(self.evaluator.timing_s)
        default = sum(cost.values()) / len(cost) if cost else 0.0
        return sum((self.finalists + 1) * self.rounds * cost.get(p, default) for p in list(self.reached))

    def search_time_left(self) -> float | None:
        """Seconds the search may still run so that the re-bench of what it reached ends by the deadline."""
        if self.deadline is None:
            return None
        return self.deadline - time.time() - self.rebench_reserve_s()

    def _optimize_timeout(self, budget: float | None) -> float | None:
        """`budget` seconds, cut to the search time the wall budget leaves (None: no limit)."""
        if self.deadline is None:
            return budget
        left = max(self.search_time_left(), 1e-3)
        return left if budget is None else min(budget, left)

    def in_time(self) -> bool:
        left = self.search_time_left()
        return not self.stopped and (left is None or left > 0)

    def stop(self) -> None:
        """Stop now (Ctrl-C, SIGTERM): trials waiting for the GPU stop untimed, those in flight fail with the
        workers, and neither leaves a row; their configs go to the next run."""
        self.stopped = True
        self.evaluator.close()

    @property
    def device(self) -> dict:
        return self.evaluator.info["provenance"]

    @property
    def copy_gbps(self) -> float:
        return self.evaluator.info["copy_gbps"]

    @property
    def arch_num(self) -> int:
        from kernels.compile_cache import arch_number

        return arch_number(self.evaluator.arch)

    def name(self, p) -> str:
        return study_name(p, self.device["device_class"])

    def row(self, p, problem_set, result: dict, knobs, trial: int, kind: str, impl: str, source) -> dict:
        return make_row(problem=p, result=result, device=self.device, copy_gbps=self.copy_gbps, knobs=knobs,
                        run_id=self.run_id, study=self.name(p), trial=trial, kind=kind, impl=impl,
                        config_source=source, problem_set=problem_set)

    def open_study(self, p, sampler=None, seeds: int = SEEDS, probes: int | None = None) -> optuna.Study:
        """Create or load the study; the creating process enqueues, exactly once, the heuristic, up to
        `seeds` sibling winners and up to `probes` of the family's probe configs (None: all)."""
        name = self.name(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = optuna.create_study(study_name=name, storage=self.storage, direction="minimize",
                                        sampler=sampler, load_if_exists=True)
        fam = family_of(p)
        wanted = (fam.probes(p, self.arch_num) if fam.probes else [])[:probes]
        if self.claims.claim(name, "enqueue:heuristic", -1) is None:
            heur = fam.heuristic(p, self.arch_num)
            study.enqueue_trial(heur.as_dict())
            queued = [heur]
            for cfg in self.sibling_winners(p, seeds) + wanted:
                if cfg not in queued:
                    study.enqueue_trial(cfg.as_dict())
                    queued.append(cfg)
        else:
            self.enqueue_missing_probes(study, fam, wanted)
        return study

    def enqueue_missing_probes(self, study: optuna.Study, fam, wanted: list) -> int:
        """Enqueue (exactly once per probe set) the probes an existing study never tried; return how many.

        Why: probes sit around the analytical rules of the day. When the rules change, a study swept before
        holds the old rules' probes, so the learned fallback cannot count its problem as probed
        (sweep.fallback_fit.probed) until a re-run times the new ones; enqueued trials run even when the
        trial budget is spent (Sweep.run's objective), so re-running the same sweep command measures them."""
        tried = {config_key(t.params) for t in study.get_trials(deepcopy=False) if t.params}
        missing = [cfg for cfg in wanted if config_key(cfg.as_dict()) not in tried]
        if not missing:
            return 0
        key = "enqueue:probes:" + hashlib.sha256(
            json.dumps(sorted(config_key(c.as_dict()) for c in missing)).encode()).hexdigest()[:16]
        if self.claims.claim(study.study_name, key, -1) is not None:
            return 0  # another process enqueued this set
        for cfg in missing:
            study.enqueue_trial(cfg.as_dict())
        return len(missing)

    def sibling_winners(self, p, limit: int = SEEDS) -> list:
        """Best configs of studies of the same kernel at other sizes (T; channel-first N x S), nearest first.

        The winner at a neighbouring size is the best first guess for this one (a row config is always valid
        at another T; other families' are checked); seeding with it lets a short search start where the last
        ended."""
        fam = family_of(p)
        mine = self.name(p).split(":")
        here = fam.positions(p)
        found = []
        for st in self.storage.get_all_studies():
            parts = st.study_name.split(":")
            if len(parts) != len(mine) or parts[:3] + parts[4:] != mine[:3] + mine[4:] or parts[3] == mine[3]:
                continue
            rb = st.user_attrs.get("rebench")
            if rb:
                params = rb["winner"]
            else:
                try:
                    params = self.storage.get_best_trial(st._study_id).params
                except ValueError:  # no finished trial yet
                    continue
            cfg = fam.config_type(**params)
            if fam.violations(p, cfg, self.arch_num):
                continue
            t = token_positions(parts[3])
            found.append((abs(math.log((t + 1) / (here + 1))), cfg))
        out: list = []
        for _, cfg in sorted(found, key=lambda x: x[0]):
            if cfg not in out:
                out.append(cfg)
        return out[:limit]

    def measured(self, study: optuna.Study) -> tuple[int, int, int]:
        """(configs measured, trials finished, trials waiting) - duplicates and invalid prefixes are not
        measurements; waiting trials are retries of killed ones (and the heuristic) still to run."""
        n = total = waiting = 0
        for t in study.get_trials(deepcopy=False):
            if t.state == TrialState.WAITING:
                waiting += 1
            elif t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                total += 1
                if t.user_attrs.get("duplicate_of") is None and status_of(t) in MEASURED:
                    n += 1
        return n, total, waiting

    def run(self, p, problem_set: str | None = None) -> optuna.Study | None:
        """Search one problem until the budget is spent (or brute force is exhausted); None when the
        sweep's deadline has passed before it started."""
        if self.trials is None and self.time_budget is None:
            raise ValueError("give a trial budget, a time budget or both")
        if not self.in_time():
            return None
        self.reached.add(p)
        space = search_space(p, self.arch_num)
        sampler = choose_sampler(space, self.trials, self.seed)
        sampler_name = sampler.name
        budget = None if self.trials is None else min(self.trials, len(space.searched))
        seeds = SEEDS if budget is None else min(SEEDS, budget - 1)
        study = self.open_study(p, sampler, seeds, None if budget is None else max(0, budget - 1 - seeds) // PROBE_SHARE)
        name = study.study_name
        reap_dead_trials(study, self.storage)
        n, _, waiting = self.measured(study)
        if budget is not None and n >= budget and not waiting:
            return study
        heur = space.family.heuristic(p, self.arch_num)
        results = str(self.results_dir.resolve())

        # Parallel trials (n_jobs) would overshoot the budget by up to n_jobs - 1: each takes a slot first.
        slots = [None if budget is None else budget - n]
        slot_lock = threading.Lock()

        def take_slot(delta: int, force: bool = False) -> bool:
            with slot_lock:
                if slots[0] is None:
                    return True
                if delta < 0 and slots[0] <= 0 and not force:
                    return False
                slots[0] += delta
                return True

        def objective(trial: optuna.Trial) -> float:
            if not take_slot(-1, force=bool(trial._fixed_params)):  # enqueued configs always run
                study.stop()
                raise optuna.TrialPruned("trial budget spent")
            inherited = trial.user_attrs  # a retry of a killed trial starts with its predecessor's attrs
            for k in ("row", "duplicate_of"):
                if inherited.get(k) is not None:
                    trial.set_user_attr(k, None)
            trial.set_user_attr("worker", {"owner": self.owner, "results": results, "sampler": sampler_name})
            params: dict = {}
            for k in space.knobs:
                params[k] = trial.suggest_categorical(k, list(space.family.knob_choices[k]))
                if space.dead_end(params):
                    break
            dup = self.claims.claim(name, config_key(params), trial.number,
                                    takeover=lambda owner: _reclaimable(study, owner))
            if dup is not None:
                take_slot(+1)  # nothing was measured
                trial.set_user_attr("duplicate_of", dup)
                prev = study.get_trials(deepcopy=False)[dup]
                if prev.state == TrialState.COMPLETE:
                    return prev.value
                raise optuna.TrialPruned(f"duplicate of trial {dup}")
            if space.dead_end(params):
                result = {"status": "invalid", "error": space.explain(params)}
            else:
                result = self.evaluator.evaluate(p, space.config(params), wanted=self.in_time)
                if result is None:  # time ran out while it compiled or waited for the GPU: not measured
                    take_slot(+1)
                    trial.set_user_attr("unmeasured", True)
                    raise optuna.TrialPruned("wall budget spent before it was timed")
            cfg_source = "heuristic" if (not space.dead_end(params) and space.config(params) == heur) else "search"
            row = self.row(p, problem_set, result, params, trial.number, "trial", "lutforge", cfg_source)
            trial.set_user_attr("row", row)
            if result["status"] == "ok":
                return result["median_us"]
            raise optuna.TrialPruned(result["status"])

        cap = None if self.trials is None else max(4 * self.trials, self.trials + 200)

        def after(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
            if t.user_attrs.get("row") and t.user_attrs.get("duplicate_of") is None \
                    and t.state in (TrialState.COMPLETE, TrialState.PRUNED):
                self.writer.add(t.user_attrs["row"])
            if self.on_trial is not None:
                self.on_trial(status_of(t))
            if not self.in_time():
                study.stop()
            elif self.trials is not None:
                n, total, waiting = self.measured(study)
                if (n >= budget and not waiting) or total >= cap:
                    study.stop()

        if self.time_budget is not None and waiting:
            # The enqueued configs (the heuristic, sibling winners, probes) run before the time budget starts: a
            # short --time-budget would otherwise end inside them, and the learned fallback counts a problem only
            # once it measured most of its probes (sweep.fallback_fit.probed). The wall budget still stops them.
            study.optimize(objective, n_trials=waiting, timeout=self._optimize_timeout(None), n_jobs=self.n_jobs,
                           callbacks=[after], gc_after_trial=False)
        timeout = self._optimize_timeout(self.time_budget)
        if self.in_time():
            study.optimize(objective, timeout=timeout, n_jobs=self.n_jobs, callbacks=[after], gc_after_trial=False)
        self.writer.flush()
        return study

    def rebench(self, p, problem_set: str | None = None) -> dict | None:
        """Re-time the best `finalists` configs and the heuristic interleaved, `rounds` times; store and return
        the winner."""
        finalists, rounds = self.finalists, self.rounds
        name = self.name(p)
        try:
            study = optuna.load_study(study_name=name, storage=self.storage)
        except KeyError:
            return None
        fam = family_of(p)
        heur = fam.heuristic(p, self.arch_num)
        ok = sorted((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                     if status_of(t) == "ok" and t.user_attrs.get("duplicate_of") is None),
                    key=lambda t: t.value)
        if not ok:
            return None
        cands: dict = {}
        for t in ok:
            cfg = fam.config_type(**t.params)
            if len(cands) < finalists and cfg not in cands:
                cands[cfg] = t.number
        # The heuristic always competes (trial -1 when the search never timed it, e.g. a --wall-budget stop):
        # a winner never compared with it could be slower than what dispatch would do without the table.
        cands.setdefault(heur, next((t.number for t in ok if fam.config_type(**t.params) == heur), -1))
        key = "rebench:" + json.dumps(sorted(cands.values()))
        prior = study.user_attrs.get("rebench")
        if prior and prior.get("key") == key:
            return prior
        if self.claims.claim(name, key, -1) is not None:
            return prior  # another process re-benchmarks this finalist set
        order = list(cands)
        samples: dict = {c: [] for c in order}
        failed: dict = {}
        for r in range(rounds):
            for c in order[r % len(order):] + order[:r % len(order)]:  # rotate who goes first
                if c in failed:
                    continue
                res = self.evaluator.evaluate(p, c)  # compiles only a heuristic the search never reached
                if res["status"] != "ok":
                    failed[c] = res
                else:
                    samples[c].extend(res.get("samples_us") or [res["median_us"]])
        rows, stats = [], {}
        for c in order:
            src = "heuristic" if c == heur else "search"
            if c in failed:
                rows.append(self.row(p, problem_set, failed[c], c.as_dict(), cands[c], "rebench", "lutforge", src))
                continue
            s = summarize(samples[c])
            stats[c] = s
            rows.append(self.row(p, problem_set, {"status": "ok", "median_us": s.median_us, "p20_us": s.p20_us,
                                                  "p80_us": s.p80_us}, c.as_dict(), cands[c], "rebench",
                                 "lutforge", src))
        for r in rows:
            self.writer.add(r)
        self.writer.flush()
        if not stats:
            return None
        win, reason = pick_winner({c: s.median_us for c, s in stats.items()}, heur)
        result = {
            "key": key, "winner_trial": cands[win], "winner": win.as_dict(), "median_us": stats[win].median_us,
            "p20_us": stats[win].p20_us, "p80_us": stats[win].p80_us,
            "heuristic_us": stats[heur].median_us if heur in stats else None,
            "reason": reason, "run_id": self.run_id,
        }
        study.set_user_attr("rebench", result)
        return result


def status_of(t: optuna.trial.FrozenTrial) -> str | None:
    """The lutforge status of a finished trial (from its row), None for duplicates and unfinished ones."""
    row = t.user_attrs.get("row")
    return row["status"] if row else None


def _reclaimable(study: optuna.Study, number: int) -> bool:
    """Whether trial `number`'s claim on its config may pass to a new trial: it failed (its process died),
    or it stopped unmeasured when the wall budget ran out."""
    t = study.get_trials(deepcopy=False)[number]
    return t.state == TrialState.FAIL or (t.state == TrialState.PRUNED and bool(t.user_attrs.get("unmeasured")))


def summary(storage: optuna.storages.RDBStorage, name: str) -> dict | None:
    """Best config of a study: the re-benchmark winner when there is one, else the best trial."""
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    statuses: dict[str, int] = {}
    heur_us = None
    for t in trials:
        if t.user_attrs.get("duplicate_of") is None and status_of(t):
            statuses[status_of(t)] = statuses.get(status_of(t), 0) + 1
        if (t.user_attrs.get("row") or {}).get("config_source") == "heuristic" and t.state == TrialState.COMPLETE:
            heur_us = t.value
    rb = study.user_attrs.get("rebench")
    ok = [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get("duplicate_of") is None]
    make = family_of_op(name.split(":")[0]).config_type
    if rb:
        return {"config": make(**rb["winner"]), "median_us": rb["median_us"],
                "heuristic_us": rb.get("heuristic_us") or heur_us, "statuses": statuses, "rebenched": True}
    if not ok:
        return {"config": None, "median_us": None, "heuristic_us": heur_us, "statuses": statuses, "rebenched": False}
    best = min(ok, key=lambda t: t.value)
    return {"config": make(**best.params), "median_us": best.value, "heuristic_us": heur_us,
            "statuses": statuses, "rebenched": False}
