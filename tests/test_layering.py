"""kernels/ is the runtime library shipped alone as `lutforge_kernels`: it may import only the standard
library, torch, what nvidia-cutlass-dsl installs (cutlass and its cuda-bindings dependency) and tvm_ffi
(apache-tvm-ffi, the call ABI of the compiled kernels), and
reaches its own modules only through relative imports, so it works unchanged under another name."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[1] / "kernels"
THIRD_PARTY = {"torch", "cutlass", "cuda", "tvm_ffi"}  # cuda: cuda-bindings, a dependency of nvidia-cutlass-dsl
PROJECT = {"kernels", "sweep", "lut_export", "problem_sets", "lutforge", "lutforge_kernels"}
DYNAMIC_IMPORTERS = {"import_module", "__import__"}


def kernel_files() -> list[Path]:
    return sorted(p for p in KERNELS.rglob("*.py") if "__pycache__" not in p.parts)


def import_problems(path: Path) -> list[str]:
    """Every import in `path` that breaks the layering rule, as 'line: reason'."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    depth = len(path.relative_to(KERNELS).parts)  # levels a relative import may climb and stay in kernels/
    out = []

    def absolute(name: str, line: int):
        top = name.split(".")[0]
        if top in PROJECT:
            out.append(f"{line}: absolute import of project module {name!r} (kernels/ must use relative "
                       "imports and never import sweep/ or lut_export/)")
        elif top not in THIRD_PARTY and top not in sys.stdlib_module_names and top != "__future__":
            out.append(f"{line}: imports {name!r}; the runtime wheel depends only on torch, nvidia-cutlass-dsl and apache-tvm-ffi")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                absolute(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                absolute(node.module or "", node.lineno)
            elif node.level > depth:
                out.append(f"{node.lineno}: relative import climbs out of kernels/ ({'.' * node.level}{node.module})")
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
            if name in DYNAMIC_IMPORTERS and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str) and not node.args[0].value.startswith("."):
                absolute(node.args[0].value, node.lineno)
    return out


def test_kernel_sources_are_found():
    names = {p.relative_to(KERNELS).as_posix() for p in kernel_files()}
    assert {"__init__.py", "config.py", "problem.py", "dispatch.py", "luts/__init__.py"} <= names


@pytest.mark.parametrize("path", kernel_files(), ids=lambda p: p.relative_to(KERNELS).as_posix())
def test_kernels_imports_follow_the_layering(path):
    assert import_problems(path) == []


@pytest.mark.parametrize("source, expected", [
    ("from sweep.schema import SCHEMA\n", "absolute import of project module 'sweep.schema'"),
    ("import lut_export.validate\n", "absolute import of project module 'lut_export.validate'"),
    ("from kernels.config import heuristic\n", "absolute import of project module 'kernels.config'"),
    ("import pandas as pd\n", "imports 'pandas'"),
    ("import importlib\nimportlib.import_module('optuna')\n", "imports 'optuna'"),
    ("from ...sweep import cli\n", "relative import climbs out of kernels/"),
])
def test_the_checker_catches_violations(tmp_path, monkeypatch, source, expected):
    # The checker itself must flag each kind of breach (a file one level inside kernels/).
    fake = tmp_path / "kernels"
    fake.mkdir()
    (fake / "mod.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "KERNELS", fake)
    problems = import_problems(fake / "mod.py")
    assert any(expected in p for p in problems), problems


def test_the_checker_accepts_allowed_imports(tmp_path, monkeypatch):
    fake = tmp_path / "kernels"
    (fake / "luts").mkdir(parents=True)
    (fake / "luts" / "m.py").write_text("from __future__ import annotations\nimport ast, logging\n"
                                        "import torch\nimport cutlass.cute as cute\nimport cuda.bindings.driver\n"
                                        "from ..config import KernelConfig\nfrom . import other\n")
    monkeypatch.setattr(sys.modules[__name__], "KERNELS", fake)
    assert import_problems(fake / "luts" / "m.py") == []
