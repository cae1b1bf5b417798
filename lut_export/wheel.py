"""Build the standalone runtime wheel: kernels/ (with its shipped LUTs) as the top-level package
`lutforge_kernels` (`kernels` is taken on PyPI), requiring only torch, nvidia-cutlass-dsl and apache-tvm-ffi.
With an ahead-of-time kernel library (`lutforge aot`, kernels/aot/ by default) the wheel ships it in
lutforge_kernels/aot/ and is tagged for this platform, since the library is a native shared object.

kernels/ imports its own modules relatively, so it ships unchanged under the new name. The wheel is
written directly (a zip with METADATA, WHEEL and RECORD per PEP 427) with fixed timestamps, so the same
tree always gives the same bytes and no build backend or network is needed.
"""
from __future__ import annotations

import base64
import hashlib
import platform
import re
import zipfile
from importlib import metadata as importlib_metadata
from pathlib import Path

PACKAGE = "lutforge_kernels"
DIST_NAME = "lutforge-kernels"
RUNTIME_REQUIREMENTS = ("torch", "nvidia-cutlass-dsl", "apache-tvm-ffi")
_EPOCH = (1980, 1, 1, 0, 0, 0)


def _req_name(req: str) -> str:
    return re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1).lower().replace("_", "-")


def project_info() -> tuple[str, str, list[str]]:
    """(version, requires-python, runtime requirements) of lutforge, from the checkout's pyproject.toml or,
    for an installed lutforge, its metadata; the runtime requirements keep lutforge's own pins."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    if pyproject.exists():
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
        version, python, deps = project["version"], project.get("requires-python", ""), project["dependencies"]
    else:
        md = importlib_metadata.metadata("lutforge")
        version, python = md["Version"], md.get("Requires-Python", "")
        deps = [r for r in (importlib_metadata.requires("lutforge") or []) if "extra ==" not in r]
    reqs = [d.strip() for d in deps if _req_name(d) in RUNTIME_REQUIREMENTS]
    missing = set(RUNTIME_REQUIREMENTS) - {_req_name(r) for r in reqs}
    if missing:
        raise ValueError(f"lutforge's dependencies do not list {sorted(missing)}")
    return version, python, reqs


def kernels_dir() -> Path:
    import kernels

    return Path(kernels.__file__).resolve().parent


def package_files(root: Path) -> list[tuple[str, Path]]:
    """(path inside the wheel, source) for every file of the runtime package; caches and temp files skipped."""
    out = []
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root)
        if not f.is_file() or "__pycache__" in rel.parts or f.suffix in (".pyc", ".tmp") \
                or any(part.startswith(".") for part in rel.parts) or rel.parts[0] == "aot":
            continue
        out.append((f"{PACKAGE}/{rel.as_posix()}", f))
    return out


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def aot_files(aot_dir) -> list[tuple[str, Path]]:
    """(path inside the wheel, source) of the AOT libraries and manifests in `aot_dir` (none: [])."""
    d = Path(aot_dir)
    if not d.is_dir():
        return []
    libs = sorted(f for f in d.glob("*.so") if f.with_suffix(".json").exists())
    return [(f"{PACKAGE}/aot/{f.name}", f) for lib in libs for f in (lib, lib.with_suffix(".json"))]


def build_wheel(dist_dir, aot_dir=None) -> Path:
    """Write dist_dir/lutforge_kernels-<version>-<tag>.whl and return its path: py3-none-any without an AOT
    library, else tagged for this platform. `aot_dir` defaults to kernels/aot/."""
    from .validate import check_module, shipped_paths
    from kernels.luts import LutFormatError, read_lut

    problems = []
    for p in shipped_paths():
        try:
            problems += [f"{p.name}: {e}" for e in check_module(read_lut(p), shipped=True)]
        except (LutFormatError, ValueError) as e:
            problems.append(str(e))
    if problems:
        raise ValueError("shipped LUT modules fail validation; not building the wheel:\n  " + "\n  ".join(problems))
    version, python, reqs = project_info()
    info = f"{PACKAGE}-{version}.dist-info"
    native = aot_files(kernels_dir() / "aot" if aot_dir is None else aot_dir)
    files = [(arc, src.read_bytes()) for arc, src in package_files(kernels_dir()) + native]
    tag = f"py3-none-linux_{platform.machine()}" if native else "py3-none-any"
    meta = "\n".join(["Metadata-Version: 2.1", f"Name: {DIST_NAME}", f"Version: {version}",
                      "Summary: lutforge runtime: tuned RMSNorm-family CuTe-DSL kernels and their lookup tables",
                      *([f"Requires-Python: {python}"] if python else []),
                      *(f"Requires-Dist: {r}" for r in reqs), ""])
    wheel = "\n".join(["Wheel-Version: 1.0", "Generator: lutforge export --wheel",
                       f"Root-Is-Purelib: {'false' if native else 'true'}", f"Tag: {tag}", ""])
    files += [(f"{info}/METADATA", meta.encode()), (f"{info}/WHEEL", wheel.encode()),
              (f"{info}/top_level.txt", f"{PACKAGE}\n".encode())]
    record = "".join(f"{arc},{_record_hash(data)},{len(data)}\n" for arc, data in files) + f"{info}/RECORD,,\n"
    files.append((f"{info}/RECORD", record.encode()))
    dist = Path(dist_dir)
    dist.mkdir(parents=True, exist_ok=True)
    path = dist / f"{PACKAGE}-{version}-{tag}.whl"
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for arc, data in files:
            zi = zipfile.ZipInfo(arc, date_time=_EPOCH)
            zi.external_attr = 0o644 << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(zi, data)
    tmp.replace(path)
    return path
