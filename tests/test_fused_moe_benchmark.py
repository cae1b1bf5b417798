"""benchmarks/fused_moe.py's parts that need no GPU: the --tiles syntax and the markdown it writes from rows."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from kernels.moe_config import MoEGemmConfig

_spec = importlib.util.spec_from_file_location("bench_fused_moe",
                                               Path(__file__).resolve().parent.parent / "benchmarks" / "fused_moe.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_tile_syntax():
    assert bench.parse_tile("16x64x128/3/1x4") == MoEGemmConfig(16, 64, 128, 3, 1, 4)
    for bad in ("16x64x128/3", "16x64/3/1x4", "a/b/c"):
        with pytest.raises(SystemExit, match="BMxBNxBK/STAGES/WMxWN"):
            bench.parse_tile(bad)


def test_markdown_tables_and_goals():
    row = dict(layer="E8k2 H4096 I14336", T=1, quant_mode="w4a16", status="ok", lutforge_us=300.0,
               pct_weight_roofline=15.0, pct_mm_rate=0.3, torch_grouped_us=350.0, speedup_vs_torch=350 / 300,
               host_lutforge_us=250.0, host_lutforge_unchecked_us=150.0, host_lutforge_launch_us=12.0,
               host_torch_eager_us=90.0, check="ok", config="fc1 a | fc2 b",
               fc2_split1_us=301.0, fc2_split2_us=280.0, **{"tile 16x64x128/3/1x4 k4": 190.0,
                                                            "tile 32x32x128/4/2x2": math.nan})
    big = dict(row, T=4096, pct_mm_rate=15.0)
    text = bench.markdown([row, big], 4249.0, 788.0, "NVIDIA H200")
    assert "| E8k2 H4096 I14336 | 1 | w4a16 | 300.0 | 15.0 | 0.3 | 350.0 | 1.17 | 250 / 150 / 12 / 90 | ok |" in text
    assert "| chosen µs | 16x64x128/3/1x4 k4 | 32x32x128/4/2x2 |" in text
    assert "| 300.0 | 190.0 | nan |" in text
    assert "| k1 | k2 |" in text and "| 301.0 | 280.0 |" in text
    assert "lowest 15.0 % of the weight-bytes roofline; goal >= 70 %: not met" in text
    assert "lowest 15.0 % of the dense bf16 rate; goal >= 50 %: not met" in text
