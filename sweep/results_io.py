"""Append-only Parquet storage of trial rows: one file per writer batch under a results directory,
read back as one DataFrame with the schema version checked."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .schema import SCHEMA, SCHEMA_VERSION


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
        if versions != {SCHEMA_VERSION}:
            raise ValueError(f"{f}: schema version {sorted(versions)} but this lutforge reads v{SCHEMA_VERSION}")
        frames.append(t.to_pandas())
    return pd.concat(frames, ignore_index=True)
