"""`lutforge export --wheel`: a standalone lutforge_kernels wheel that requires only torch, nvidia-cutlass-dsl
and apache-tvm-ffi, installs into a fresh venv, imports under its new name, dispatches (including from a LUT
module placed in the installed package) and, with an AOT library inside, serves a covered shape's kernel
without compiling anything or importing cutlass."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from lut_export.wheel import PACKAGE, package_files, kernels_dir
from lut_rows import synthetic_rows
from sweep.cli import main
from sweep.results_io import append_rows

FORBIDDEN_DEPS = ("optuna", "pandas", "plotly", "click", "pyarrow", "sqlalchemy", "tqdm")


RUNTIME_DEPS = ["apache-tvm-ffi", "nvidia-cutlass-dsl", "torch"]
AOT_FAMILY = ["--op", "rmsnorm", "--hidden", "4096", "--device-class", "h200", "--no-luts"]


@pytest.fixture(scope="module")
def aot_dir(tmp_path_factory):
    """A small AOT library: every kernel dispatch returns for rmsnorm bf16 C=4096 on the H200 at any T."""
    d = tmp_path_factory.mktemp("aot")
    r = CliRunner().invoke(main, ["aot", "--arch", "sm_90a", *AOT_FAMILY, "--dest", str(d / "lib"), "--jobs", "1"],
                           env={"LUTFORGE_CACHE_DIR": str(d / "cache")})
    assert r.exit_code == 0, r.output
    assert (d / "lib" / "sm_90a.so").exists() and "failed" not in r.output
    return d / "lib"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, aot_dir):
    d = tmp_path_factory.mktemp("wheel")
    r = CliRunner().invoke(main, ["export", "--wheel", "--dist", str(d), "--aot-dir", str(aot_dir)])
    assert r.exit_code == 0, r.output
    (path,) = d.glob("*.whl")
    assert r.output.strip() == f"built {path}"
    return path


def _metadata(z: zipfile.ZipFile) -> str:
    (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
    return z.read(name).decode()


def test_wheel_contents_and_metadata(wheel):
    assert wheel.name.startswith(f"{PACKAGE}-") and "-py3-none-linux_" in wheel.name  # it carries a native library
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        expected = {arc for arc, _ in package_files(kernels_dir())} | {f"{PACKAGE}/aot/sm_90a.so",
                                                                       f"{PACKAGE}/aot/sm_90a.json"}
        assert {n for n in names if not n.startswith(f"{PACKAGE}-")} == expected
        assert {f"{PACKAGE}/dispatch.py", f"{PACKAGE}/luts/__init__.py", f"{PACKAGE}/config.py"} <= expected
        assert not any(n.startswith(("sweep/", "lut_export/", "kernels/")) or "__pycache__" in n for n in names)
        meta = _metadata(z)
        requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
        assert sorted(r.split(">")[0].split("=")[0].split("<")[0].strip() for r in requires) == RUNTIME_DEPS
        assert not any(dep in meta for dep in FORBIDDEN_DEPS)
        # RECORD lists every other file with its sha256 and size (PEP 376/427).
        (record_name,) = [n for n in names if n.endswith(".dist-info/RECORD")]
        record = {}
        for line in z.read(record_name).decode().splitlines():
            path, digest, size = line.rsplit(",", 2)
            record[path] = (digest, size)
        assert set(record) == set(names)
        for n in names:
            if n == record_name:
                continue
            data = z.read(n)
            want = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert record[n] == (want, str(len(data))), n


def test_wheel_is_reproducible(wheel, aot_dir, tmp_path):
    r = CliRunner().invoke(main, ["export", "--wheel", "--dist", str(tmp_path), "--aot-dir", str(aot_dir)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / wheel.name).read_bytes() == wheel.read_bytes()


def test_wheel_installs_into_a_fresh_venv_and_dispatches(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    # The venv sees this interpreter's packages (torch, cutlass, tvm_ffi) through a .pth, whether this
    # interpreter is a system one or itself a virtualenv (whose --system-site-packages would skip them).
    venv_site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(p)]
    (Path(venv_site) / "outer_site.pth").write_text(  # addsitedir also runs their .pth files (cutlass's)
        "".join(f"import site; site.addsitedir({p!r})\n" for p in ours))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    pip = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr
    # A synthetic LUT placed inside the installed package must be discovered there.
    append_rows(tmp_path / "res", synthetic_rows((("rmsnorm", "bf16", "rowmajor", (4096,), 1),), tokens=(1560,)))
    lut = tmp_path / "sm90_synthetic.py"
    r = CliRunner().invoke(main, ["export", "--results", str(tmp_path / "res"), "--allow-synthetic", "--out", str(lut)])
    assert r.exit_code == 0, r.output
    script = textwrap.dedent(f"""
        import importlib, importlib.metadata, json, os, pkgutil, shutil, sys
        os.environ["LUTFORGE_CACHE_DIR"] = {str(tmp_path / "empty_cache")!r}  # nothing cached: AOT or compile
        import lutforge_kernels
        from lutforge_kernels import compile_cache, dispatch, warmup
        from lutforge_kernels.problem import Problem
        # Served from the shipped AOT library: no compile, and the DSL (cutlass, MLIR) is never imported.
        report = warmup.warmup("rmsnorm", 4096, out_formats=["bf16"], arch="sm_90a", device_class="h200")
        fn = compile_cache.get_compiled(Problem("rmsnorm", 1, 4096), *dispatch.select_config(
            Problem("rmsnorm", 1, 4096), 90, "h200")[:1], "sm_90a")
        aot = {{"kernels": report.kernels, "compiled": report.compiled, "count": compile_cache.compile_count(),
                "cutlass": "cutlass" in sys.modules, "fn": type(fn).__name__}}
        assert lutforge_kernels.__file__.startswith({str(venv)!r}), lutforge_kernels.__file__
        # Every module of the package imports under its new name (relative imports only).
        mods = [m.name for m in pkgutil.walk_packages(lutforge_kernels.__path__, "lutforge_kernels.")]
        for m in mods:
            importlib.import_module(m)
        leaked = [m for m in ("sweep", "lut_export", "kernels") if m in sys.modules]
        assert not leaked, leaked
        p = Problem("rmsnorm", 1560, 4096)
        shutil.copy({str(lut)!r}, lutforge_kernels.__path__[0] + "/luts/sm90_synthetic.py")
        dispatch.reload_luts()
        cfg, tier = dispatch.select_config(p, 90, "synthetic")
        print(json.dumps({{"requires": importlib.metadata.requires("lutforge-kernels"), "modules": mods,
                          "tier": tier, "cfg": cfg.as_dict(), "aot": aot}}))
    """)
    run = subprocess.run([str(py), "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted(r.split("=")[0].split(">")[0] for r in out["requires"]) == RUNTIME_DEPS
    from kernels.problem import Problem as P
    from kernels.warmup import reachable_configs

    reachable = len(reachable_configs(P("rmsnorm", 0, 4096), 90, "h200"))  # what dispatch can return at C=4096
    assert out["aot"] == {"kernels": reachable, "compiled": 0, "count": 0, "cutlass": False, "fn": "Function"}, out["aot"]
    assert "lutforge_kernels.dispatch" in out["modules"] and "lutforge_kernels.luts" in out["modules"]
    assert out["tier"] == "exact"
    from kernels.luts import read_lut

    assert out["cfg"] == next(iter(read_lut(lut).exact.values()))
