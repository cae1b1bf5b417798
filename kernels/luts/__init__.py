"""Tuned-config lookup tables: discovery and parsing of the generated `sm<arch>_<device class>.py` modules.

A LUT module holds literals and nothing else: METADATA (provenance), EXACT (one config per swept
problem), RANGE (configs along T between swept points) and, from lut_format 3, PROVENANCE (the runs,
kernel source and time of each EXACT entry, which `lutforge export` merges by) and RUNS (each run's
device and software). The runtime reads only the first three. They are read as data with
`ast.literal_eval`, never executed, so a hand-edited or corrupt file can be rejected with a clear reason
and shipping zero modules is a normal state (dispatch then uses the heuristic).
"""
from __future__ import annotations

import ast
import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

LUT_FORMAT = 3  # bump on any change to the layout below (2: RANGE knobs may be None; 3: PROVENANCE, RUNS)
# EXACT holds the entries of every kernel family (kernels.family), each keyed by its family's key_fields (the
# op, first, tells which): the row family's EXACT_KEY, the channel-first family's (op, out_format, in_dtype,
# C, N, S). RANGE is the row family's alone.
EXACT_KEY = ("op", "out_format", "scale_layout", "in_dtype", "C", "heads", "T")
RANGE_KEY = EXACT_KEY[:-1]  # RANGE[key] = [(T_below, knobs), ...]; the last T_below is None (no bound)


def exact_key(p) -> tuple:
    """A problem's EXACT key, of any family (a row problem's RANGE key is all but the last item)."""
    from ..family import family_of

    return family_of(p).key(p)
TABLES = ("METADATA", "EXACT", "RANGE")
OPTIONAL_TABLES = ("PROVENANCE", "RUNS")  # absent from lut_format 2 modules
MODULE_NAME = re.compile(r"^sm(?P<arch>\d+)_(?P<device_class>[a-z0-9][a-z0-9_]*)$")

_log = logging.getLogger(__name__)


class LutFormatError(ValueError):
    """A LUT module that is not a well-formed generated table (syntax, code instead of literals, missing table)."""


@dataclass(frozen=True)
class LutModule:
    """The three tables of one LUT module, as plain Python data."""

    name: str  # module stem, e.g. sm90_h100
    metadata: dict
    exact: dict
    range: dict
    provenance: dict | None = None  # EXACT key -> (run ids, kernel source, measured at, median us)
    runs: dict | None = None  # run id -> {"devices", "git_commits", "versions"}

    @property
    def arch(self):
        return self.metadata.get("arch")

    @property
    def device_class(self):
        return self.metadata.get("device_class")


def parse_lut(text: str, name: str) -> LutModule:
    """Read the METADATA/EXACT/RANGE literals of a LUT module's source; raise LutFormatError if it is not one."""
    if not isinstance(text, str):
        raise TypeError(f"LUT source must be str, got {type(text).__name__}")
    try:
        tree = ast.parse(text, filename=name)
    except SyntaxError as e:
        raise LutFormatError(f"{name}: syntax error at line {e.lineno}: {e.msg}") from None
    found: dict = {}
    for i, node in enumerate(tree.body):
        if i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str):
            continue  # module docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise LutFormatError(f"{name}: line {node.lineno}: only `NAME = <literal>` assignments are allowed "
                                 f"in a generated LUT module")
        target = node.targets[0].id
        if target not in TABLES + OPTIONAL_TABLES:
            raise LutFormatError(f"{name}: line {node.lineno}: unexpected name {target!r}; a LUT defines "
                                 f"{', '.join(TABLES + OPTIONAL_TABLES)}")
        if target in found:
            raise LutFormatError(f"{name}: line {node.lineno}: {target} assigned twice")
        try:
            found[target] = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
            raise LutFormatError(f"{name}: line {node.lineno}: {target} is not a plain literal ({e})") from None
    missing = [t for t in TABLES if t not in found]
    if missing:
        raise LutFormatError(f"{name}: missing {', '.join(missing)}")
    for t in found:
        if not isinstance(found[t], dict):
            raise LutFormatError(f"{name}: {t} must be a dict, got {type(found[t]).__name__}")
    return LutModule(name, found["METADATA"], found["EXACT"], found["RANGE"], found.get("PROVENANCE"),
                     found.get("RUNS"))


def read_lut(path) -> LutModule:
    """Parse the LUT module at a filesystem path."""
    p = Path(path)
    if p.suffix != ".py":
        raise ValueError(f"{p}: a LUT module is a .py file")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{p}: cannot read ({e.strerror})") from None
    return parse_lut(text, p.stem)


def shipped_names() -> list[str]:
    """Stems of the LUT modules shipped in this package, sorted (empty when none were generated yet)."""
    root = resources.files(__name__)
    return sorted(e.name[:-3] for e in root.iterdir()
                  if e.is_file() and e.name.endswith(".py") and MODULE_NAME.match(e.name[:-3]))


def shipped_path(name: str):
    """The resource of a shipped module (a filesystem path for a normal install)."""
    return resources.files(__name__) / f"{name}.py"


def load_shipped() -> list[LutModule]:
    """Every shipped LUT module that parses; a broken one is logged and skipped so the runtime keeps working
    on the heuristic (`lutforge validate` is what rejects it before it ships)."""
    out = []
    for name in shipped_names():
        try:
            out.append(parse_lut(shipped_path(name).read_text(encoding="utf-8"), name))
        except LutFormatError as e:
            _log.error("skipping LUT module %s: %s", name, e)
    return out
