"""Pick the winning config per problem from result rows: measured on a GPU, status ok, re-bench rows
preferred over trial rows, and ties broken by the sweep's own `pick_winner`, so the exported LUT holds
the config the sweep reported as the winner."""
from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from kernels.config import KernelConfig
from kernels.family import SIZE_FIELDS, families
from sweep.results_io import OWN_IMPLS, PROBLEM_DEFAULTS
from sweep.study import TIE_FRACTION, pick_winner

from .render import utc_stamp

TIE = TIE_FRACTION  # the sweep's tie margin, named here for gpu_check
USED_KINDS = ("trial", "rebench")  # bench rows measure peers or already-exported LUTs


@dataclass(frozen=True)
class Winner:
    config: object  # the problem family's config
    median_us: float
    kind: str  # rows it was chosen from: rebench | trial
    candidates: int  # distinct valid configs compared
    run_ids: tuple[str, ...]  # runs whose rows were compared
    reason: str  # pick_winner's why: "fastest" or the tie it broke
    kernel_source: str | None = None  # of the compared rows; None if they predate schema v2
    measured_at: str | None = None  # newest compared row's timestamp (render.TIME_FORMAT)


@dataclass(frozen=True)
class UsableRows:
    """The rows an export uses and the device they describe."""

    rows: pd.DataFrame
    arch: int
    device_class: str
    backend: str  # gpu | synthetic


def parse_arch(arch) -> int | None:
    """"sm90", "sm_90a", "90" or 90 -> 90."""
    if arch is None:
        return None
    if isinstance(arch, bool):
        raise ValueError(f"arch must look like sm90 or 90, got {arch!r}")
    if isinstance(arch, int):
        n = arch
    else:
        s = str(arch).strip().lower().removeprefix("sm").lstrip("_").rstrip("a")
        if not s.isdigit():
            raise ValueError(f"arch must look like sm90 or 90, got {arch!r}")
        n = int(s)
    if n < 1:
        raise ValueError(f"arch must be positive, got {arch!r}")
    return n


def select_rows(df: pd.DataFrame, arch=None, device_class: str | None = None,
                allow_synthetic: bool = False) -> UsableRows:
    """The usable rows for one (arch, device class): status ok, with their family's knobs, from trials or
    re-benches of lutforge itself. Synthetic-backend rows are refused unless `allow_synthetic` (tests only)."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"expected a DataFrame of result rows, got {type(df).__name__}")
    arch = parse_arch(arch)
    df = df.assign(**{col: df[col].fillna(default) if col in df else default
                      for col, default in PROBLEM_DEFAULTS.items()})
    has_knobs = pd.Series(False, index=df.index)
    for fam in families().values():
        # knobs added after older rows were written may be absent or null there: those rows read their default
        needed = [f"knob_{k}" for k in fam.knob_choices if k not in fam.added_knobs]
        if all(c in df for c in needed):
            has_knobs |= (df["family"] == fam.name) & df[needed].notna().all(axis=1)
    own = df["kind"].isin(USED_KINDS) & (df["impl"].isna() | df["impl"].isin(OWN_IMPLS)) & has_knobs
    ok = own & (df["status"] == "ok") & (df["median_us"] > 0)
    if arch is not None:
        ok &= df["sm"] == arch
    if device_class is not None:
        ok &= df["device_class"] == device_class.lower()
    rows = df[ok]
    where = f"sm{arch}" if arch is not None else "any arch"
    where += f"/{device_class}" if device_class else ""
    if rows.empty:
        statuses = df.loc[own, "status"].value_counts().to_dict()
        raise ValueError(f"no usable rows for {where}: need kind in {USED_KINDS} with status ok and knobs; "
                         f"{len(df)} rows in all, statuses of lutforge rows {statuses}, "
                         f"devices {sorted(set(zip(df['sm'].dropna().astype(int), df['device_class'].dropna())))}")
    for col, label, opt in (("sm", "archs", "--arch"), ("device_class", "device classes", "--device-class")):
        values = sorted(rows[col].dropna().unique().tolist())
        if rows[col].isna().any():
            raise ValueError(f"rows for {where} lack {col}; every result row must name its device")
        if len(values) != 1:
            raise ValueError(f"rows for {where} span {label} {values}; pick one with {opt}")
    synthetic = int((rows["backend"] == "synthetic").sum())
    if synthetic and not allow_synthetic:
        raise ValueError(f"{synthetic} of {len(rows)} usable rows for {where} come from the synthetic backend; "
                         "a LUT ships only GPU measurements (--allow-synthetic exists for tests)")
    bad_backend = sorted(set(rows["backend"].fillna("<missing>")) - {"gpu", "synthetic"})
    if bad_backend:
        raise ValueError(f"rows with unknown backend {bad_backend}; expected gpu")
    backend = "synthetic" if synthetic else "gpu"
    return UsableRows(rows, int(rows["sm"].iloc[0]), str(rows["device_class"].iloc[0]), backend)


def row_config(row) -> KernelConfig:
    """The KernelConfig of a row-family result row (knob values as the Python types of its choices)."""
    return families()["row"].row_config(row)


def _typed_key(fam, values) -> tuple:
    return tuple(int(v) if k in SIZE_FIELDS else str(v) for k, v in zip(fam.key_fields, values))


def swept_keys(rows: pd.DataFrame) -> set[tuple]:
    """The EXACT keys of every problem in `rows` (any family)."""
    out = set()
    for fam in families().values():
        mine = rows[rows["family"] == fam.name]
        out |= {_typed_key(fam, k) for k in mine[list(fam.key_fields)].drop_duplicates().itertuples(index=False)}
    return out


def newest_rebench(group: pd.DataFrame, heur, fam) -> pd.DataFrame:
    """The rows of the newest re-bench run of one problem that timed today's heuristic `heur` (all rows when
    none did: the caller then finds the heuristic unmeasured).

    Why: a re-bench is a fresh interleaved head-to-head; a later one (another sweep's finalists, or `tune`'s
    GPU check of the exported entry against the fallback) ran under today's clocks, driver and neighbours.
    Pooled with an older one, the older samples could re-elect an entry the newer comparison rejected."""
    runs = group["run_id"].astype(str)
    if runs.nunique() < 2:
        return group

    def timed_heuristic(g) -> bool:
        for _, r in g.iterrows():
            try:
                if fam.row_config(r) == heur:
                    return True
            except (TypeError, ValueError):  # unreadable knobs: the caller notes them
                pass
        return False

    newest = None
    for _, g in group.groupby(runs, sort=True):
        stamp = max((s for s in map(utc_stamp, g["timestamp"]) if s), default="")
        if timed_heuristic(g) and (newest is None or stamp > newest[0]):
            newest = (stamp, g)
    return group if newest is None else newest[1]


def pick_winners(sel: UsableRows) -> tuple[dict[tuple, Winner], list[str]]:
    """Winner per problem (keyed by its family's EXACT key), and notes about rows that could not be used."""
    notes = []
    winners: dict[tuple, Winner] = {}
    for fam in families().values():
        _family_winners(fam, sel, winners, notes)
    return dict(sorted(winners.items())), notes  # keys of two families differ in their first item, the op


def _family_winners(fam, sel: UsableRows, winners: dict, notes: list) -> None:
    rows = sel.rows[sel.rows["family"] == fam.name]
    for key, group in rows.groupby(list(fam.key_fields), sort=True):
        key = _typed_key(fam, key)
        try:
            p = fam.from_key(*key)
        except ValueError as e:
            notes.append(f"{key}: not a valid problem ({e}); skipped")
            continue
        if fam.dispatch_key(p) != p:  # the public op never looks it up (the fused MoE's skewed routing)
            notes.append(f"{key}: dispatch looks up {fam.key(fam.dispatch_key(p))} for such calls; no entry")
            continue
        heur = fam.heuristic(p, sel.arch)
        kind = "rebench" if (group["kind"] == "rebench").any() else "trial"
        group = group[group["kind"] == kind]
        if kind == "rebench":
            group = newest_rebench(group, heur, fam)
        times: dict = {}
        for _, r in group.iterrows():
            try:
                cfg = fam.row_config(r)
            except (TypeError, ValueError) as e:
                notes.append(f"{key}: unreadable knobs ({e}); row skipped")
                continue
            why = fam.violations(p, cfg, sel.arch)
            if why:
                notes.append(f"{key}: {cfg.short()} breaks current constraints ({why[0]}); row skipped")
                continue
            times.setdefault(cfg, []).append(float(r["median_us"]))
        if not times:
            notes.append(f"{key}: no valid measured config; left to the heuristic")
            continue
        if heur not in times:
            # A table entry must beat what dispatch does without it: unknown unless today's heuristic was timed
            # alongside. The heuristic of the sweep's time is not enough: on the H200 the rmsnorm 1560x64 entry,
            # the heuristic before l2_prefetch, ran 0.78x of today's (results/h200/bench/bench-f73340197abc.parquet).
            notes.append(f"{key}: the heuristic ({heur.short()}) was not measured among the {kind} rows; "
                         "left to the heuristic")
            continue
        # Sorted so that full ties (same simplicity and median) do not depend on row order.
        med = {cfg: float(pd.Series(times[cfg]).median()) for cfg in sorted(times, key=lambda c: c.short())}
        win, reason = pick_winner(med, heur)
        # current_kernel_rows left one kernel source per problem; several would mean unknown.
        sources = set(group["kernel_source"].dropna().astype(str))
        stamps = [s for s in map(utc_stamp, group["timestamp"]) if s]
        winners[key] = Winner(win, med[win], kind, len(med), tuple(sorted(set(group["run_id"].dropna()))),
                              reason, sources.pop() if len(sources) == 1 else None, max(stamps, default=None))
