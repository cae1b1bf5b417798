"""Checks a LUT module must pass before it ships: well-formed literals, complete provenance, arch and
device class matching the file name, known knobs, every config valid for its shape, the range table
agreeing with the exact one; optionally that every entry compiles for its arch (CPU) and, on a GPU, that
it is correct and not slower than the heuristic beyond noise."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

from kernels.family import families, family_of_key
from kernels.luts import LUT_FORMAT, MODULE_NAME, LutFormatError, LutModule, read_lut
from sweep.schema import BACKENDS, SCHEMA_VERSION

from .render import RUN_FIELDS, TIME_FORMAT, VERSION_COLUMNS

READABLE_LUT_FORMATS = (2, LUT_FORMAT)  # 2: before PROVENANCE and RUNS; its entries' origin is METADATA's
METADATA_TYPES = {
    "lut_format": int, "schema_version": int, "arch": int, "device_class": str, "devices": list, "backend": str,
    "generated_at": str, "source_run_ids": list, "git_commits": list, "versions": dict,
}


def luts_dir() -> Path:
    """kernels/luts/, where shipped modules live."""
    import kernels.luts

    return Path(kernels.luts.__file__).resolve().parent


def shipped_paths() -> list[Path]:
    return sorted(p for p in luts_dir().glob("sm*.py") if MODULE_NAME.match(p.stem))


def is_shipped(path) -> bool:
    return Path(path).resolve().parent == luts_dir()


def check_metadata(lut: LutModule, shipped: bool) -> list[str]:
    md, errs = lut.metadata, []
    for k, t in METADATA_TYPES.items():
        if k not in md:
            errs.append(f"METADATA misses {k!r}")
        elif not isinstance(md[k], t) or (t is int and isinstance(md[k], bool)):
            errs.append(f"METADATA[{k!r}] must be {t.__name__}, got {md[k]!r}")
    errs += [f"METADATA has unknown key {k!r}" for k in md if k not in METADATA_TYPES]
    if errs:
        return errs
    if md["lut_format"] not in READABLE_LUT_FORMATS:
        errs.append(f"lut_format {md['lut_format']} but this lutforge reads "
                    f"{', '.join(map(str, READABLE_LUT_FORMATS))}; re-export")
    if not 1 <= md["schema_version"] <= SCHEMA_VERSION:
        errs.append(f"schema_version {md['schema_version']} unknown (current {SCHEMA_VERSION})")
    m = MODULE_NAME.match(lut.name)
    if m is None:
        errs.append(f"module name {lut.name!r} is not sm<arch>_<device class>")
    else:
        if int(m["arch"]) != md["arch"]:
            errs.append(f"METADATA arch {md['arch']} does not match module {lut.name} (sm{m['arch']})")
        if m["device_class"] != md["device_class"]:
            errs.append(f"METADATA device_class {md['device_class']!r} does not match module {lut.name} "
                        f"({m['device_class']!r})")
    if md["backend"] not in BACKENDS:
        errs.append(f"backend {md['backend']!r} not in {BACKENDS}")
    elif md["backend"] != "gpu" and shipped:
        errs.append(f"backend {md['backend']!r}: only GPU measurements may ship in kernels/luts/")
    # Lists that may be empty: a commit outside git, a driver without nvidia-smi, CUDA on the synthetic model.
    may_be_empty = {"git_commits", "driver"} | ({"cuda"} if md["backend"] != "gpu" else set())
    for k in ("devices", "source_run_ids", "git_commits"):
        if not isinstance(md[k], list) or not all(isinstance(v, str) and v for v in md[k]) \
                or (not md[k] and k not in may_be_empty):
            errs.append(f"METADATA[{k!r}] must be a non-empty list of names")
    if set(md["versions"]) != set(VERSION_COLUMNS):
        errs.append(f"METADATA['versions'] must have exactly {sorted(VERSION_COLUMNS)}, got {sorted(md['versions'])}")
    else:
        for k, v in md["versions"].items():
            if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v) \
                    or (not v and k not in may_be_empty):
                errs.append(f"METADATA['versions'][{k!r}] must be a non-empty list of version strings")
    try:
        _dt.datetime.strptime(md["generated_at"], TIME_FORMAT)
    except ValueError:
        errs.append(f"generated_at {md['generated_at']!r} is not YYYY-MM-DDTHH:MM:SSZ")
    return errs


def _config(fam, knobs) -> tuple[object | None, list[str]]:
    """The `fam` config of a knob dict, or the reasons it is not one (names and values checked strictly; a knob
    the family added after the entry was written may be absent: the entry means its default, fam.added_knobs)."""
    if not isinstance(knobs, dict):
        return None, [f"knobs must be a dict, got {type(knobs).__name__}"]
    choices_of = fam.knob_choices
    errs = [f"unknown knob {k!r}" for k in knobs if k not in choices_of]
    errs += [f"missing knob {k!r}" for k in choices_of if k not in knobs and k not in fam.added_knobs]
    for k, choices in choices_of.items():
        if k in knobs:
            v = knobs[k]
            if type(v) is not type(choices[0]) or v not in choices:
                errs.append(f"{k}={v!r} not in {choices}")
    return (None, errs) if errs else (fam.config_type(**knobs), [])


def _entry(lut: LutModule, where: str, p, knobs, fam=None) -> tuple[object | None, list[str]]:
    """The entry's config if its knobs are known and valid for `p` on the module's arch."""
    fam = fam or families()["row"]
    cfg, errs = _config(fam, knobs)
    if errs:
        return None, [f"{where}: {e}" for e in errs]
    arch = lut.metadata.get("arch")
    if type(arch) is not int:
        return cfg, []  # constraints depend on the arch; check_metadata already reports it
    why = fam.violations(p, cfg, arch)
    if why:
        return None, [f"{where}: {cfg.short()} invalid for the shape: {'; '.join(why)}"]
    return cfg, []


def _exact_problem(where: str, key) -> tuple[object, object | None, list[str]]:
    """(family, problem, errors) of an EXACT key of any family."""
    try:
        fam = family_of_key(key)
    except ValueError as e:
        return None, None, [f"{where}: {e}"]
    try:
        return fam, fam.problem_of_key(key), []
    except ValueError as e:
        return fam, None, [f"{where}: {e}"]


def _range_problem(where: str, key) -> tuple[object, object | None, list[str]]:
    """(family, the problem of a RANGE key at T=0, errors)."""
    try:
        fam = family_of_key(key)
    except ValueError as e:
        return None, None, [f"{where}: {e}"]
    bad = fam.range_key_error(key)
    if bad:
        return fam, None, [f"{where}: {bad}"]
    try:
        return fam, fam.problem_of_key(tuple(key) + (0,)), []
    except ValueError as e:
        return fam, None, [f"{where}: {e}"]


def _has_range_key(key) -> bool:
    """A well-formed EXACT key of a family with RANGE tables (one its RANGE entry should back)."""
    try:
        fam = family_of_key(key)
    except ValueError:
        return False
    return fam.has_range and fam.key_error(key) is None


def check_tables(lut: LutModule) -> list[str]:
    errs: list[str] = []
    exact: dict[tuple, object] = {}
    for key, knobs in lut.exact.items():
        where = f"EXACT[{key!r}]"
        fam, p, e = _exact_problem(where, key)
        cfg, e2 = _entry(lut, where, p, knobs, fam) if p else (None, [])
        errs += e + e2
        if cfg is not None and fam.has_range:
            exact[key] = cfg
    ranges: dict[tuple, list] = {}
    for key, segments in lut.range.items():
        where = f"RANGE[{key!r}]"
        fam, p, e = _range_problem(where, key)
        if p is None:
            errs += e
            continue
        if not isinstance(segments, list) or not segments:
            errs.append(f"{where}: must be a non-empty list of (T_below, knobs)")
            continue
        segs, prev, before = [], 0, len(errs)
        for i, seg in enumerate(segments):
            if not isinstance(seg, tuple) or len(seg) != 2:
                errs.append(f"{where}[{i}]: must be a (T_below, knobs) pair")
                continue
            bound, knobs = seg
            if i == len(segments) - 1:
                if bound is not None:
                    errs.append(f"{where}: the last segment must have T_below=None (cover every larger T)")
            elif type(bound) is not int or bound <= prev:
                errs.append(f"{where}[{i}]: T_below={bound!r} must be an int above {prev}")
            else:
                prev = bound
            if knobs is None:  # beyond the swept T: the runtime's later tiers answer
                segs.append((bound, None))
                continue
            cfg, e = _entry(lut, f"{where}[{i}]", p, knobs, fam)
            errs += e
            segs.append((bound, cfg))
        if all(c is None for _, c in segs):
            errs.append(f"{where}: no segment has knobs")
        if len(errs) == before:
            ranges[key] = segs
    for key, cfg in exact.items():
        if key[:-1] not in lut.range:
            errs.append(f"EXACT[{key!r}]: no RANGE entry for {key[:-1]!r}")
        elif key[:-1] in ranges:
            at = next(c for b, c in ranges[key[:-1]] if b is None or key[-1] < b)
            if at != cfg:
                errs.append(f"EXACT[{key!r}]: RANGE gives {at.short() if at else 'no config'} at T={key[-1]} but "
                            f"EXACT says {cfg.short()}")
    swept = {k[:-1] for k in lut.exact if _has_range_key(k)}
    errs += [f"RANGE[{k!r}]: no EXACT (swept) point backs it" for k in lut.range if k not in swept]
    if not lut.exact:
        errs.append("EXACT is empty: a LUT with no tuned entries is not worth shipping")
    return errs


def _names(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) and x for x in v)


def _run_info(info) -> str | None:
    if not isinstance(info, dict) or set(info) != set(RUN_FIELDS):
        return f"must be a dict of {', '.join(RUN_FIELDS)}"
    if not (_names(info["devices"]) and _names(info["git_commits"]) and isinstance(info["versions"], dict)
            and set(info["versions"]) == set(VERSION_COLUMNS) and all(map(_names, info["versions"].values()))):
        return f"devices and git_commits must be lists of names, versions lists for exactly {sorted(VERSION_COLUMNS)}"
    return None


def _provenance(p) -> str | None:
    if not (isinstance(p, tuple) and len(p) == 4):
        return "must be (run ids, kernel source, measured at, median us)"
    rids, src, at, us = p
    if not (isinstance(rids, tuple) and rids and all(isinstance(r, str) and r for r in rids)):
        return f"run ids {rids!r} must be a non-empty tuple of names"
    if src is not None and not (isinstance(src, str) and src):
        return f"kernel source {src!r} must be a name or None"
    if at is not None:
        try:
            _dt.datetime.strptime(at, TIME_FORMAT)
        except (TypeError, ValueError):
            return f"measured at {at!r} is not YYYY-MM-DDTHH:MM:SSZ or None"
    if us is not None and (type(us) not in (int, float) or not 0 < us < float("inf")):
        return f"median us {us!r} must be a positive number or None"
    return None


def check_provenance(lut: LutModule) -> list[str]:
    """lut_format 3: every EXACT entry has a PROVENANCE entry whose runs are in RUNS, and METADATA's runs,
    devices, commits and versions are the union of RUNS (what an export merges by)."""
    md, prov, runs = lut.metadata, lut.provenance, lut.runs
    if md.get("lut_format") != LUT_FORMAT:
        if md.get("lut_format") == 2 and (prov is not None or runs is not None):
            return ["lut_format 2 has no PROVENANCE or RUNS; re-export"]
        return []  # 2: provenance is METADATA's alone; an unknown format check_metadata reports
    missing = [t for t, v in (("PROVENANCE", prov), ("RUNS", runs)) if v is None]
    if missing:
        return [f"lut_format {LUT_FORMAT} needs {' and '.join(missing)}; re-export"]
    errs = [f"EXACT[{k!r}]: no PROVENANCE entry" for k in lut.exact if k not in prov]
    used: set[str] = set()
    for key, p in prov.items():
        bad = "no EXACT entry" if key not in lut.exact else _provenance(p)
        if bad:
            errs.append(f"PROVENANCE[{key!r}]: {bad}")
            continue
        errs += [f"PROVENANCE[{key!r}]: run {r!r} not in RUNS" for r in p[0] if r not in runs]
        used.update(p[0])
    for rid, info in runs.items():
        bad = _run_info(info)
        errs += [f"RUNS[{rid!r}]: {bad}"] if bad else []
        errs += [] if rid in used else [f"RUNS[{rid!r}]: no PROVENANCE entry comes from it"]
    if errs or not isinstance(md.get("versions"), dict):
        return errs
    union = {f: sorted({v for i in runs.values() for v in i[f]}) for f in ("devices", "git_commits")}
    union["source_run_ids"] = sorted(runs)
    for f, want in union.items():
        if md.get(f) != want:
            errs.append(f"METADATA[{f!r}] {md.get(f)!r} is not the union of RUNS {want!r}")
    for c in VERSION_COLUMNS:
        want = sorted({v for i in runs.values() for v in i["versions"][c]})
        if md["versions"].get(c) != want:
            errs.append(f"METADATA['versions'][{c!r}] {md['versions'].get(c)!r} is not the union of RUNS {want!r}")
    return errs


def check_module(lut: LutModule, shipped: bool = False) -> list[str]:
    """Every static problem of a parsed LUT module (empty list = valid)."""
    return check_metadata(lut, shipped) + check_tables(lut) + check_provenance(lut)


def compile_entries(lut: LutModule) -> list[str]:
    """Compile every distinct (compiled kernel, config) of the module for its arch (no GPU needed)."""
    from kernels.compile_cache import KernelCompileError, arch_name

    arch = arch_name(lut.metadata["arch"])
    todo: dict[tuple, tuple] = {}
    for key, knobs in lut.exact.items():
        fam = family_of_key(key)
        p = fam.problem_of_key(key)
        todo[(fam.name, fam.compile_key(p), tuple(knobs.items()))] = (fam, p, fam.config_type(**knobs))
    for key, segments in lut.range.items():
        fam = family_of_key(key)
        p = fam.problem_of_key(tuple(key) + (1,))
        for _, knobs in segments:
            if knobs is not None:
                todo[(fam.name, fam.compile_key(p), tuple(knobs.items()))] = (fam, p, fam.config_type(**knobs))
    errs = []
    for fam, p, cfg in todo.values():
        try:
            fam.precompile(p, cfg, arch)
        except KernelCompileError as e:
            errs.append(f"compile {arch}: {e}")
        except Exception as e:  # any other failure is a kernel bug the LUT must not ship with
            errs.append(f"compile {arch}: {p.op}/{p.out_format} C={p.C} {cfg.short()}: {type(e).__name__}: {e}")
    return errs


def validate_file(path, compile: bool = False, gpu: bool = False) -> list[str]:
    """All problems of the LUT module at `path`; later stages run only when the earlier ones pass."""
    try:
        lut = read_lut(path)
    except (LutFormatError, ValueError) as e:
        return [str(e)]
    errs = check_module(lut, shipped=is_shipped(path))
    if errs:
        return errs
    if compile:
        errs = compile_entries(lut)
        if errs:
            return errs
    if gpu:
        from .gpu_check import gpu_check

        errs = [f.message for f in gpu_check(lut)]
    return errs
