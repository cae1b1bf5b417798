"""Results directory -> validated LUT module: select usable rows, pick winners, build the exact and range
tables, write the module only if it passes the static validation."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kernels.luts import MODULE_NAME, parse_lut
from sweep.results_io import current_kernel_rows, read_results

from .render import build_metadata, render, write_atomic
from .tables import build_tables
from .validate import check_module, is_shipped, luts_dir
from .winners import parse_arch, pick_winners, select_rows


@dataclass
class ExportResult:
    path: Path
    arch: int
    device_class: str
    backend: str
    exact: int
    ranges: int
    segments: int
    notes: list[str] = field(default_factory=list)


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root)


def export_lut(results_dir, out=None, arch=None, device_class: str | None = None,
               allow_synthetic: bool = False) -> ExportResult:
    """Write the LUT module for one (arch, device class) from the rows under `results_dir`.

    `out` defaults to kernels/luts/sm<arch>_<device class>.py. `allow_synthetic` (tests only) accepts
    synthetic-backend rows and then refuses any destination inside kernels/luts/.
    """
    arch = parse_arch(arch)
    if allow_synthetic and (out is None or _inside(Path(out), luts_dir())):
        raise ValueError("--allow-synthetic never writes into kernels/luts/; give --out outside it")
    sel = select_rows(current_kernel_rows(read_results(results_dir)), arch, device_class, allow_synthetic)
    path = Path(out) if out is not None else luts_dir() / f"sm{sel.arch}_{sel.device_class}.py"
    expected = f"sm{sel.arch}_{sel.device_class}"
    if not MODULE_NAME.match(expected):
        raise ValueError(f"device class {sel.device_class!r} cannot name a module (use [a-z0-9_])")
    if path.suffix != ".py" or path.stem != expected:
        raise ValueError(f"the LUT for sm{sel.arch}/{sel.device_class} must be named {expected}.py, got {path.name}")
    winners, notes = pick_winners(sel)
    if not winners:
        raise ValueError("no problem has a valid measured config; nothing to export:\n  " + "\n  ".join(notes))
    exact, ranges = build_tables({k: w.config for k, w in winners.items()})
    run_ids = {r for w in winners.values() for r in w.run_ids}
    metadata = build_metadata(sel.rows, sel.arch, sel.device_class, sel.backend, run_ids)
    text = render(metadata, exact, ranges)
    errs = check_module(parse_lut(text, path.stem), shipped=is_shipped(path))
    if errs:
        raise ValueError(f"refusing to write {path}: the generated LUT fails validation:\n  " + "\n  ".join(errs))
    write_atomic(path, text)
    return ExportResult(path, sel.arch, sel.device_class, sel.backend, len(exact), len(ranges),
                        sum(len(s) for s in ranges.values()), notes)
