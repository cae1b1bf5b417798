"""Results directory -> validated LUT module: select usable rows, pick winners, merge them into the module
already at the destination (so exporting new problems never drops the ones it had), build the exact and
range tables, write the module only if it passes the static validation."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kernels.family import family_of_key
from kernels.luts import MODULE_NAME, LutFormatError, LutModule, parse_lut
from sweep.results_io import current_kernel_rows, read_results
from sweep.schema import BACKENDS

from .render import Provenance, build_metadata, render, runs_from_rows, union_runs, write_atomic
from .tables import build_tables
from .validate import check_module, is_shipped, luts_dir
from .winners import UsableRows, parse_arch, pick_winners, select_rows, swept_keys

Entry = tuple[object, Provenance]  # (the key's family's config, provenance)
REPLACE_HINT = "fix or remove it, or export with --replace to build the module from the rows alone"


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
    merged: bool = False  # a module at `path` contributed its entries
    new: int = 0  # entries of problems the module did not have (all of them without a merge)
    replaced: int = 0  # module entries the rows measured anew
    kept_unswept: int = 0  # module entries the rows have no winner for
    kept_newer: int = 0  # module entries not older than the rows' measurement of their problem

    def merge_text(self, replace: bool = False) -> str:
        """What the export did to the module, for the CLI (export and tune)."""
        if self.merged:
            return (f"merged into the module there: {self.new} new, {self.replaced} replaced by newer measurements, "
                    f"{self.kept_unswept} kept (no winner in these rows), {self.kept_newer} kept (not older than "
                    "these rows)")
        return f"{self.new} entries, all from these rows (" + (
            "--replace: nothing merged)" if replace else "no module there before)")


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root)


def newer(new: Provenance, old: Provenance) -> bool:
    """Whether a measurement supersedes an entry. One of unknown kernel source (exported before PROVENANCE)
    yields to any; otherwise the later measurement wins, as the newest row names the current kernel source
    in sweep.results_io.superseded."""
    if old.kernel_source is None:
        return True
    if new.measured_at is None:
        return False
    return old.measured_at is None or new.measured_at > old.measured_at  # TIME_FORMAT sorts as text


def module_entries(lut: LutModule) -> tuple[dict[tuple, Entry], dict[str, dict]]:
    """A validated module's entries with their provenance, and its RUNS. A lut_format 2 module has neither
    table: its entries count as measured at its generated_at by all its runs, kernel source unknown."""
    md = lut.metadata
    if lut.provenance is None:
        legacy = Provenance(tuple(md["source_run_ids"]), None, md["generated_at"], None)
        info = {"devices": md["devices"], "git_commits": md["git_commits"], "versions": md["versions"]}
        prov, runs = {k: legacy for k in lut.exact}, {rid: info for rid in md["source_run_ids"]}
    else:
        prov, runs = {k: Provenance(*p) for k, p in lut.provenance.items()}, lut.runs
    return {k: (family_of_key(k).config_type(**knobs), prov[k]) for k, knobs in lut.exact.items()}, runs


def merge_entries(old: dict[tuple, Entry], new: dict[tuple, Entry]) -> tuple[dict[tuple, Entry], dict[str, int]]:
    """`old` plus `new`, a problem in both taken from `new` only when `newer`; and how many went each way."""
    counts = dict(new=0, replaced=0, kept_unswept=0, kept_newer=0)
    merged: dict[tuple, Entry] = {}
    for key, entry in old.items():
        case = "kept_unswept" if key not in new else "replaced" if newer(new[key][1], entry[1]) else "kept_newer"
        counts[case] += 1
        merged[key] = new[key] if case == "replaced" else entry
    for key in new.keys() - old.keys():
        counts["new"] += 1
        merged[key] = new[key]
    return dict(sorted(merged.items())), counts


def _existing(path: Path, sel: UsableRows, name: str) -> LutModule | None:
    """The valid module of the rows' device already at `path`, None if there is none."""
    if not path.exists():
        return None
    try:
        lut = parse_lut(path.read_text(encoding="utf-8"), name)  # `name`: outside kernels/luts/ any file name
    except (LutFormatError, OSError, ValueError) as e:
        raise ValueError(f"cannot merge into {path}: not a readable LUT module ({e}); {REPLACE_HINT}") from None
    named = isinstance(lut.arch, int) and isinstance(lut.device_class, str)  # else validation says what is amiss
    if named and (lut.arch, lut.device_class) != (sel.arch, sel.device_class):
        raise ValueError(f"cannot merge into {path}: it holds the LUT of sm{lut.arch}/{lut.device_class}, the rows "
                         f"are sm{sel.arch}/{sel.device_class}; give another --out (--replace overwrites it)")
    if named and lut.metadata.get("backend") in BACKENDS and lut.metadata["backend"] != sel.backend:
        raise ValueError(f"cannot merge into {path}: it holds {lut.metadata.get('backend')!r}-backend entries, the "
                         f"rows are {sel.backend!r}; give another --out (--replace overwrites it)")
    errs = check_module(lut, shipped=is_shipped(path))
    if errs:
        raise ValueError(f"cannot merge into {path}: it fails validation:\n  " + "\n  ".join(errs) + f"\n{REPLACE_HINT}")
    return lut


def export_lut(results_dir, out=None, arch=None, device_class: str | None = None,
               allow_synthetic: bool = False, merge: bool = True) -> ExportResult:
    """Write the LUT module for one (arch, device class) from the rows under `results_dir`, merged into the
    module already at the destination unless `merge` is False (then from the rows alone).

    `out` defaults to kernels/luts/sm<arch>_<device class>.py, the only name the runtime finds there; outside
    kernels/luts/ any name but another LUT's will do. `allow_synthetic` (tests only) accepts synthetic-backend
    rows and then refuses any destination inside kernels/luts/.
    """
    arch = parse_arch(arch)
    if allow_synthetic and (out is None or _inside(Path(out), luts_dir())):
        raise ValueError("--allow-synthetic never writes into kernels/luts/; give --out outside it")
    sel = select_rows(current_kernel_rows(read_results(results_dir)), arch, device_class, allow_synthetic)
    expected = f"sm{sel.arch}_{sel.device_class}"
    if not MODULE_NAME.match(expected):
        raise ValueError(f"device class {sel.device_class!r} cannot name a module (use [a-z0-9_])")
    path = Path(out) if out is not None else luts_dir() / f"{expected}.py"
    if path.suffix != ".py":
        raise ValueError(f"a LUT module is a .py file, got {path.name}")
    if (_inside(path, luts_dir()) or MODULE_NAME.match(path.stem)) and path.stem != expected:
        raise ValueError(f"the LUT for sm{sel.arch}/{sel.device_class} must be named {expected}.py, got {path.name}")
    winners, notes = pick_winners(sel)
    if not winners:
        raise ValueError("no problem has a valid measured config; nothing to export:\n  " + "\n  ".join(notes))
    entries = {k: (w.config, Provenance(w.run_ids, w.kernel_source, w.measured_at, w.median_us))
               for k, w in sorted(winners.items())}
    runs = runs_from_rows(sel.rows, {r for w in winners.values() for r in w.run_ids})
    counts = dict(new=len(entries))
    existing = _existing(path, sel, expected) if merge else None
    if existing is not None:
        old, old_runs = module_entries(existing)
        entries, counts = merge_entries(old, entries)
        runs = union_runs(old_runs, runs)
        swept = swept_keys(sel.rows)
        notes += [f"{k}: no winner in the rows; the entry {path.name} had is kept"
                  for k in old if k in swept and k not in winners]
    exact, ranges = _write_module(path, expected, entries, runs, sel.arch, sel.device_class, sel.backend)
    return ExportResult(path, sel.arch, sel.device_class, sel.backend, len(exact), len(ranges),
                        sum(len(s) for s in ranges.values()), notes, merged=existing is not None, **counts)


def _write_module(path: Path, name: str, entries: dict[tuple, Entry], runs: dict[str, dict], arch: int,
                  device_class: str, backend: str) -> tuple[dict, dict]:
    """Render `entries` (RUNS trimmed to the runs they cite) and write the module only if it validates."""
    used = {r for _, p in entries.values() for r in p.run_ids}
    runs = {rid: info for rid, info in union_runs(runs).items() if rid in used}
    exact, ranges = build_tables({k: cfg for k, (cfg, _) in entries.items()})
    metadata = build_metadata(runs, arch, device_class, backend)
    text = render(metadata, exact, ranges, {k: p for k, (_, p) in entries.items()}, runs)
    errs = check_module(parse_lut(text, name), shipped=is_shipped(path))
    if errs:
        raise ValueError(f"refusing to write {path}: the generated LUT fails validation:\n  " + "\n  ".join(errs))
    write_atomic(path, text)
    return exact, ranges


def drop_entries(path, keys) -> int:
    """Remove the EXACT entries `keys` from the module at `path` (their problems then dispatch to the
    fallback); the number removed.

    Why: `tune` re-times each exported entry against the fallback on the GPU (lut_export.gpu_check); an
    entry that is wrong there, or slower than the fallback beyond noise, is worse than no entry at all."""
    path = Path(path)
    lut = parse_lut(path.read_text(encoding="utf-8"), path.stem)
    entries, runs = module_entries(lut)
    gone = set(keys) & entries.keys()
    if gone:
        _write_module(path, path.stem, {k: e for k, e in entries.items() if k not in gone}, runs, lut.arch,
                      lut.device_class, lut.metadata["backend"])
    return len(gone)
