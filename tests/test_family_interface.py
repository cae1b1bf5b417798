"""The harness serves every kernel family through kernels.family (runtime side), sweep/families (harness
side) and problem_sets/<family>.py (its set table): the shared sweep, export and problem-set modules never
name a family or import one family's kernel modules, so a new family is a kernels module plus a
sweep/families module and a problem_sets module, not edits across the harness."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from kernels.family import families
from problem_sets import SetFormat, set_format
from sweep.families import Harness, facet_fields, harness

ROOT = Path(__file__).resolve().parents[1]
SHARED = sorted([*(ROOT / "sweep").glob("*.py"), *(ROOT / "lut_export").glob("*.py"),
                 ROOT / "problem_sets" / "__init__.py"])
# The row family is also the schema's default for rows written before families existed, and the fallback
# fitter fits the row heuristic; the other families' names may appear nowhere in shared code.
NAMED = {name for name in families() if name != "row"}
FAMILY_MODULES = ("kernels.channel_first", "kernels.moe", "kernels.fused_moe", "kernels.wan_vae")
HISTORY = {("schema.py", "kernels.moe_config")}  # schema v6 added the fused-MoE knob columns


@pytest.mark.parametrize("path", SHARED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shared_harness_modules_name_no_family(path):
    bad = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and node.value in NAMED:
            bad.append(f"{node.lineno}: names the {node.value!r} family")
        mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        bad += [f"{node.lineno}: imports {m}" for m in mods
                if m.startswith(FAMILY_MODULES) and (path.name, m) not in HISTORY]
        if isinstance(node, ast.ImportFrom) and node.level > 0:  # a sibling named after a family
            bad += [f"{node.lineno}: imports {'.' * node.level}{m}" for m in
                    [*(node.module or "").split("."), *(a.name for a in node.names)] if m in NAMED]
    assert not bad, "\n".join(bad)


def test_every_family_has_a_complete_harness_side():
    for name in families():
        h = harness(name)
        assert isinstance(h, Harness) and all(v is not None for v in vars(h).values()), name
    assert {"scale_layout", "heads", "quant_mode", "routing"} <= set(facet_fields())
    with pytest.raises(ValueError, match="unknown kernel family"):
        harness("nonesuch")


def test_every_family_has_a_problem_set_format():
    tables = []
    for name in families():
        f = set_format(name)
        assert isinstance(f, SetFormat) and f.table and callable(f.parse) and callable(f.problems), name
        tables.append(f.table)
    assert len(set(tables)) == len(tables) and "description" not in tables
    with pytest.raises(ValueError, match="unknown kernel family"):
        set_format("nonesuch")
