"""The Parquet row schema: one row per trial (or per bench measurement), shared by sweep, export,
heatmaps and reports. Bump SCHEMA_VERSION on any incompatible change.
"""
from __future__ import annotations

import pyarrow as pa

from kernels.config import KernelConfig
from kernels.family import SIZE_FIELDS, all_knob_choices, problem_columns
from kernels.moe_config import FAMILY_KNOB_CHOICES

SCHEMA_VERSION = 6
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)
# Columns a file of an older version lacks: read as empty (problem columns: results_io.PROBLEM_DEFAULTS),
# except row-kernel knobs added later, which read as the value the older kernel ran with (it had no such
# knob) on rows that carry knobs. v5: kernel families (the channel-first family's N, S and knobs).
ADDED_IN = {"kernel_source": 2, "knob_l2_prefetch": 3, "host_us": 4, "host_p20_us": 4, "host_p80_us": 4,
            "family": 5, "N": 5, "S": 5, "knob_positions_per_cta": 5, "knob_c_order": 5,
            **{c: 6 for c in ("quant_mode", "activation", "routing", "E", "top_k", "I", "local_experts")},
            **{f"knob_{k}": 6 for k in FAMILY_KNOB_CHOICES}}
ADDED_KNOB_DEFAULTS = {"knob_l2_prefetch": KernelConfig().l2_prefetch}
KNOB_CHOICES = all_knob_choices()  # every family's knobs: a row fills its own family's, the others stay null

STATUSES = ("ok", "invalid", "compile_error", "runtime_error", "timeout", "wrong_result")
BACKENDS = ("gpu", "synthetic")


def _knob_type(choices: tuple) -> pa.DataType:
    if all(isinstance(c, bool) for c in choices):
        return pa.bool_()
    if all(isinstance(c, int) for c in choices):
        return pa.int64()
    return pa.string()


FIELDS: list[pa.Field] = [
    pa.field("schema_version", pa.int32()),
    pa.field("run_id", pa.string()),
    pa.field("study", pa.string()),
    pa.field("trial", pa.int64()),  # Optuna trial number; -1 for bench rows
    pa.field("kind", pa.string()),  # trial | rebench | bench | host
    pa.field("impl", pa.string()),  # lutforge | lutforge_heuristic | torch_eager | torch_compile | quack | liger | flashinfer
    pa.field("config_source", pa.string()),  # search | heuristic | lut_exact | lut_range | peer (lut_nearest: old rows)
    pa.field("problem_set", pa.string()),
    # the problem: kernels.family.problem_columns() (family name, then every family's key fields: T is the
    # runtime size (rows, N * S positions, tokens), C the row length (hidden size), then each family's own)
    *[pa.field(c, pa.int64() if c in SIZE_FIELDS else pa.string()) for c in problem_columns()],
    *[pa.field(f"knob_{k}", _knob_type(v)) for k, v in KNOB_CHOICES.items()],
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
    pa.field("median_us", pa.float64()),
    pa.field("p20_us", pa.float64()),
    pa.field("p80_us", pa.float64()),
    pa.field("host_us", pa.float64()),  # kind host: CPU microseconds per eager call (sweep/host_cost.py)
    pa.field("host_p20_us", pa.float64()),
    pa.field("host_p80_us", pa.float64()),
    pa.field("bytes", pa.int64()),
    pa.field("gbps", pa.float64()),
    pa.field("pct_copy", pa.float64()),
    pa.field("copy_gbps", pa.float64()),
    pa.field("rel_err", pa.float64()),
    pa.field("max_ulp", pa.float64()),
    pa.field("compile_s", pa.float64()),
    pa.field("device_name", pa.string()),
    pa.field("device_class", pa.string()),  # e.g. h100, h200, b200
    pa.field("sm", pa.int32()),  # compute capability as 90, 100, ...
    pa.field("sm_count", pa.int32()),
    pa.field("sm_clock_mhz", pa.float64()),
    pa.field("mem_clock_mhz", pa.float64()),
    pa.field("driver", pa.string()),
    pa.field("cuda", pa.string()),
    pa.field("torch", pa.string()),
    pa.field("cutlass_dsl", pa.string()),
    pa.field("lutforge", pa.string()),
    pa.field("git_commit", pa.string()),
    pa.field("kernel_source", pa.string()),  # kernels.compile_cache.kernel_source_hash() of the measured kernel
    pa.field("timestamp", pa.string()),  # ISO 8601 UTC
    pa.field("backend", pa.string()),  # gpu | synthetic
]

SCHEMA = pa.schema(FIELDS, metadata={"lutforge_schema_version": str(SCHEMA_VERSION)})
KNOB_COLUMNS = [f"knob_{k}" for k in KNOB_CHOICES]


def knob_columns(family) -> list[str]:
    """The knob_* columns a kernels.family.Family's rows fill."""
    return [f"knob_{k}" for k in family.knob_choices]
