"""Append-only Parquet storage of trial rows: one file per writer batch under a results directory,
read back as one DataFrame with the schema version checked (older versions upgraded on read)."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kernels.family import SIZE_FIELDS, family_of, family_of_op, problem_columns

from .schema import ADDED_IN, ADDED_KNOB_DEFAULTS, READABLE_VERSIONS, SCHEMA, SCHEMA_VERSION

# What one measurement answers: every family's key columns (kernels.family), the others at PROBLEM_DEFAULTS.
PROBLEM_COLUMNS = problem_columns()
_SINCE_V1 = ("op", "out_format", "in_dtype", "T", "C")  # in every row ever written: no default
# Rows without a column (another family's field, or older files): the row family for "family", the row
# family's values for its later columns, else 0 / "" (not applicable).
PROBLEM_DEFAULTS = {"family": "row", "scale_layout": "rowmajor", "heads": 1,
                    **{c: 0 if c in SIZE_FIELDS else "" for c in PROBLEM_COLUMNS
                       if c not in (*_SINCE_V1, "family", "scale_layout", "heads")}}


def problem_columns(p) -> dict:
    """The PROBLEM_COLUMNS values of a problem of any family (a Parquet row's problem part)."""
    fam = family_of(p)
    cols = dict(PROBLEM_DEFAULTS, family=fam.name, T=fam.positions(p))
    cols.update({k: getattr(p, k) for k in fam.key_fields})
    return cols


def size_label(row) -> str:
    """A result row's runtime size as tables and heatmap columns show it (its family's label: T, or N x S)."""
    from .families import harness

    return harness(row["family"]).size_label(row)


def problem_of_row(row):
    """The problem a result row (dict or Series with PROBLEM_COLUMNS) measured; ValueError if invalid."""
    fam = family_of_op(str(row["op"]))
    return fam.from_key(*(row[k] for k in fam.key_fields))
OWN_IMPLS = ("lutforge", "lutforge_heuristic")


def append_rows(results_dir: str | os.PathLike, rows: list[dict], prefix: str = "trials") -> Path | None:
    """Write `rows` as a new Parquet file (never rewriting an existing one); missing columns are null."""
    if not rows:
        return None
    d = Path(results_dir)
    d.mkdir(parents=True, exist_ok=True)
    unknown = set().union(*rows) - set(SCHEMA.names)
    if unknown:
        raise ValueError(f"columns not in schema v{SCHEMA_VERSION}: {sorted(unknown)}")
    full = [{name: r.get(name) for name in SCHEMA.names} | {"schema_version": SCHEMA_VERSION} for r in rows]
    table = pa.Table.from_pylist(full, schema=SCHEMA)
    path = d / f"{prefix}-{uuid.uuid4().hex[:12]}.parquet"
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # readers never see a half-written file
    return path


def read_results(results_dir: str | os.PathLike) -> pd.DataFrame:
    """All rows under `results_dir` (recursively). Raises ValueError on no files or a foreign schema."""
    d = Path(results_dir)
    if not d.exists():
        raise ValueError(f"results directory {d} does not exist")
    files = sorted(d.rglob("*.parquet"))
    if not files:
        raise ValueError(f"no Parquet files under {d}")
    frames = []
    for f in files:
        try:
            t = pq.read_table(f)
        except Exception as e:  # corrupt or not Parquet
            raise ValueError(f"{f}: not readable as Parquet ({e})") from e
        if "schema_version" not in t.column_names:
            raise ValueError(f"{f}: no schema_version column; not a lutforge results file")
        versions = set(t.column("schema_version").to_pylist())
        if not versions:  # a file of no rows adds nothing (and has no version to adapt)
            continue
        if not versions <= set(READABLE_VERSIONS):
            raise ValueError(f"{f}: schema version {sorted(versions)} but this lutforge reads "
                             f"v{', v'.join(map(str, READABLE_VERSIONS))}")
        frame = t.to_pandas()
        for name, version in ADDED_IN.items():
            if name not in frame.columns and min(versions) < version:
                frame[name] = None
                if name in ADDED_KNOB_DEFAULTS and "knob_threads" in frame.columns:
                    frame[name] = frame[name].astype(object)
                    frame.loc[frame["knob_threads"].notna(), name] = ADDED_KNOB_DEFAULTS[name]
        frames.append(frame)
    if not frames:
        raise ValueError(f"no rows in the Parquet files under {d}")
    df = pd.concat(frames, ignore_index=True)
    return df.assign(**{c: df[c].fillna(v) for c, v in PROBLEM_DEFAULTS.items() if c in df.columns})


def superseded(df: pd.DataFrame) -> pd.Series:
    """True for lutforge's own rows measured on a kernel source that a later run replaced on the same problem.

    Per problem and device class, lutforge's sweep rows (trials, re-benches) stand only for the kernel source
    of the newest sweep row, its bench rows for that of the newest bench row and its host-cost rows for that
    of the newest host row (a bench or host run of a newer kernel does not void the sweep that chose the
    configs it ran, nor one another's measurements); rows without a kernel_source (schema v1) count as one
    older source. Peer rows never are: they time other libraries and do not go stale when our kernel
    changes, except host-cost rows, every impl's: the host table judges lutforge against torch within one
    run, so an older run's peers go with its lutforge rows."""
    out = pd.Series(False, index=df.index)
    sweep_row = df["kind"].isin(("trial", "rebench"))
    host = df["kind"] == "host"
    own = sweep_row | host | df["impl"].isin(OWN_IMPLS)
    if not own.any():
        return out
    key = df.loc[own, [*PROBLEM_COLUMNS, "device_class"]].astype(object).fillna("").astype(str).agg("|".join, axis=1)
    group = sweep_row.map({True: "|sweep", False: "|bench"}).where(~host, "|host")
    mine = df[own].assign(_src=df.loc[own, "kernel_source"].fillna(""), _key=key + group[own])
    newest = mine.sort_values("timestamp", kind="stable").groupby("_key")["_src"].last()
    out[own] = mine["_src"].to_numpy() != newest.reindex(mine["_key"]).to_numpy()
    return out


def swept_keys(df: pd.DataFrame, device_class: str, kernel_source: str, trials: int | None = None) -> set[tuple]:
    """Problem keys (PROBLEM_COLUMNS order) swept on this device class and kernel source: with an ok re-bench
    row, or at least `trials` trial rows (a sweep stopped before its re-bench). What a sweep on a machine
    without the study database can skip."""
    mine = df[(df["device_class"] == device_class) & (df["kernel_source"] == kernel_source)]
    done = {problem_key(r) for r in
            mine[(mine["kind"] == "rebench") & (mine["status"] == "ok")][list(PROBLEM_COLUMNS)].to_dict("records")}
    if trials is not None:
        counts = mine[mine["kind"] == "trial"].groupby(list(PROBLEM_COLUMNS), dropna=False).size()
        done |= {problem_key(dict(zip(PROBLEM_COLUMNS, k))) for k, n in counts.items() if n >= trials}
    return done


def problem_key(p) -> tuple:
    """A problem's key from a problem of any family or a row dict, comparable between the two."""
    d = p if isinstance(p, dict) else problem_columns(p)
    return tuple(int(d[k]) if k in SIZE_FIELDS else str(d[k]) for k in PROBLEM_COLUMNS)


def current_kernel_rows(df: pd.DataFrame) -> pd.DataFrame:
    """`df` without the rows of replaced kernel sources (`superseded`)."""
    return df[~superseded(df)]
