"""Ahead-of-time kernel library: compiled TVM-FFI functions linked into one shared object per arch.

`lutforge aot` compiles (on any machine, no GPU) every config dispatch can return for a declared set of
problem families and links the objects into `<arch>.so` with a JSON manifest beside it; the runtime wheel
ships them in kernels/aot/. At run time `lookup` loads the library with tvm_ffi alone: no cutlass import,
no MLIR, no compile, so a serving process starts in the time torch takes to import (see BENCHMARKS.md,
cold start). Extra library folders can be named in LUTFORGE_AOT_DIR (os.pathsep-separated, searched
first); LUTFORGE_AOT=0 turns the library off. A library built from another kernel source simply has no
matching keys.
"""
from __future__ import annotations

import ctypes
import glob
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import threading
from pathlib import Path

MANIFEST_FORMAT = 1
_log = logging.getLogger(__name__)
_LOCK = threading.Lock()
_LIBS: dict[str, list] = {}  # arch -> [(symbols, tvm_ffi.Module)] in search order


def package_dir() -> Path:
    return Path(__file__).resolve().parent / "aot"


def search_dirs() -> list[Path]:
    if os.environ.get("LUTFORGE_AOT", "1") == "0":  # measuring the JIT path (benchmarks/cold_start.py)
        return []
    extra = [Path(p) for p in os.environ.get("LUTFORGE_AOT_DIR", "").split(os.pathsep) if p]
    return extra + [package_dir()]


def runtime_library() -> str:
    """Path of libcute_dsl_runtime.so (the CuTe-DSL host runtime the objects call), found without importing
    cutlass: CUTE_DSL_LIBS if set, else the installed nvidia-cutlass-dsl's lib folder."""
    for p in os.environ.get("CUTE_DSL_LIBS", "").split(os.pathsep):
        if p.endswith("libcute_dsl_runtime.so") and os.path.exists(p):
            return p
    spec = importlib.util.find_spec("nvidia_cutlass_dsl")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        hits = sorted(glob.glob(os.path.join(root, "cu*", "lib", "libcute_dsl_runtime.so")), reverse=True)
        if hits:
            return hits[0]
    raise FileNotFoundError("libcute_dsl_runtime.so not found: install nvidia-cutlass-dsl or set CUTE_DSL_LIBS")


def _load(arch: str) -> list:
    import tvm_ffi

    libs = []
    for d in search_dirs():
        so, manifest = d / f"{arch}.so", d / f"{arch}.json"
        if not (so.exists() and manifest.exists()):
            continue
        try:
            meta = json.loads(manifest.read_text())
            if meta.get("format") != MANIFEST_FORMAT or meta.get("arch") != arch:
                raise ValueError(f"manifest format {meta.get('format')} / arch {meta.get('arch')}")
            ctypes.CDLL(runtime_library(), mode=ctypes.RTLD_GLOBAL)
            libs.append((frozenset(meta["symbols"]), tvm_ffi.load_module(str(so))))
        except Exception as e:  # a broken library must not stop the runtime: it compiles instead
            _log.error("skipping AOT library %s: %s", so, e)
    return libs


def lookup(arch: str, name: str):
    """The function `name` from the first AOT library of `arch` that has it, else None."""
    libs = _LIBS.get(arch)
    if libs is None:
        with _LOCK:
            libs = _LIBS.get(arch)
            if libs is None:
                libs = _LIBS[arch] = _load(arch)
    for symbols, mod in libs:
        if name in symbols:
            return mod[name]
    return None


def forget() -> None:
    """Drop loaded libraries (after a rebuild in the same process)."""
    _LIBS.clear()


# --------------------------------------------------------------------------- building (no GPU needed)
def _compile_one(args) -> tuple[str, str | None]:
    """Worker: compile one (problem, cfg) of any kernel family into the disk cache; (key, error or None)."""
    from .family import family_of

    problem, cfg, arch = args
    fam = family_of(problem)
    try:
        fam.precompile(problem, cfg, arch)
        return fam.cache_key(problem, cfg, arch), None
    except Exception as e:  # reported, not fatal: the runtime compiles what the library lacks
        return fam.cache_key(problem, cfg, arch), f"{type(e).__name__}: {e}"


def build_library(entries, arch: str, out_dir, jobs: int = 1, log=print) -> dict:
    """Compile every (problem, cfg) of `entries` for `arch` and link them into out_dir/<arch>.so with its
    manifest. Objects come from (and go to) the disk cache, so a rebuild compiles only what changed."""
    from .compile_cache import cache_dir, kernel_source_hash, symbol
    from .family import family_of

    seen, todo = set(), []
    for problem, cfg in entries:
        k = (family_of(problem).canonical(problem), cfg)
        if k not in seen:
            seen.add(k)
            todo.append((*k, arch))
    errors, keys = [], []
    if jobs > 1 and len(todo) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(_compile_one, todo, chunksize=4))
    else:
        results = [_compile_one(t) for t in todo]
    for (problem, cfg, _), (key, err) in zip(todo, results):
        if err:
            errors.append(f"{problem.op}/{problem.out_format} C={problem.C} {cfg.short()}: {err}")
        else:
            keys += key.split("+")  # a family whose call runs several kernels names them all (fused MoE: FC1+FC2)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("linking the AOT library needs a C compiler driver (cc, gcc or clang) on PATH")
    so = out / f"{arch}.so"
    tmp = so.with_suffix(".so.tmp")
    objs = [str(cache_dir() / f"{k}.o") for k in sorted(set(keys))]
    if objs:
        subprocess.run([cc, "-shared", "-o", str(tmp), *objs], check=True)
        os.replace(tmp, so)
    manifest = {"format": MANIFEST_FORMAT, "arch": arch, "kernel_source": kernel_source_hash(),
                "symbols": sorted(symbol(k) for k in set(keys))}
    (out / f"{arch}.json").write_text(json.dumps(manifest, indent=0) + "\n")
    log(f"AOT {arch}: {len(manifest['symbols'])} kernels -> {so} ({so.stat().st_size // 1024 if objs else 0} KiB)"
        + (f"; {len(errors)} failed to compile" if errors else ""))
    for e in errors:
        log(f"  compile error: {e}")
    forget()
    return manifest
