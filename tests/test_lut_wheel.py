"""`lutforge export --wheel`: a standalone lutforge_kernels wheel that requires only torch and
nvidia-cutlass-dsl, installs into a fresh venv, imports under its new name and dispatches (including
from a LUT module placed in the installed package)."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest
from click.testing import CliRunner

from lut_export.wheel import PACKAGE, package_files, kernels_dir
from lut_rows import synthetic_rows
from sweep.cli import main
from sweep.results_io import append_rows

FORBIDDEN_DEPS = ("optuna", "pandas", "plotly", "click", "pyarrow", "sqlalchemy", "tqdm")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    d = tmp_path_factory.mktemp("wheel")
    r = CliRunner().invoke(main, ["export", "--wheel", "--dist", str(d)])
    assert r.exit_code == 0, r.output
    (path,) = d.glob("*.whl")
    assert r.output.strip() == f"built {path}"
    return path


def _metadata(z: zipfile.ZipFile) -> str:
    (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
    return z.read(name).decode()


def test_wheel_contents_and_metadata(wheel):
    assert wheel.name.startswith(f"{PACKAGE}-") and wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        expected = {arc for arc, _ in package_files(kernels_dir())}
        assert {n for n in names if not n.startswith(f"{PACKAGE}-")} == expected
        assert {f"{PACKAGE}/dispatch.py", f"{PACKAGE}/luts/__init__.py", f"{PACKAGE}/config.py"} <= expected
        assert not any(n.startswith(("sweep/", "lut_export/", "kernels/")) or "__pycache__" in n for n in names)
        meta = _metadata(z)
        requires = [line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Requires-Dist:")]
        assert sorted(r.split(">")[0].split("=")[0].split("<")[0].strip() for r in requires) == \
            ["nvidia-cutlass-dsl", "torch"]
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


def test_wheel_is_reproducible(wheel, tmp_path):
    r = CliRunner().invoke(main, ["export", "--wheel", "--dist", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / wheel.name).read_bytes() == wheel.read_bytes()


def test_wheel_installs_into_a_fresh_venv_and_dispatches(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
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
        import importlib, importlib.metadata, json, pkgutil, shutil, sys
        import lutforge_kernels
        from lutforge_kernels import dispatch
        from lutforge_kernels.problem import Problem
        assert lutforge_kernels.__file__.startswith({str(venv)!r}), lutforge_kernels.__file__
        # Every module of the package imports under its new name (relative imports only).
        mods = [m.name for m in pkgutil.walk_packages(lutforge_kernels.__path__, "lutforge_kernels.")]
        for m in mods:
            importlib.import_module(m)
        assert "sweep" not in sys.modules and "lut_export" not in sys.modules and "kernels" not in sys.modules
        p = Problem("rmsnorm", 1560, 4096)
        shutil.copy({str(lut)!r}, lutforge_kernels.__path__[0] + "/luts/sm90_synthetic.py")
        dispatch.reload_luts()
        cfg, tier = dispatch.select_config(p, 90, "synthetic")
        print(json.dumps({{"requires": importlib.metadata.requires("lutforge-kernels"), "modules": mods,
                          "tier": tier, "cfg": cfg.as_dict()}}))
    """)
    run = subprocess.run([str(py), "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert sorted(r.split("=")[0].split(">")[0] for r in out["requires"]) == ["nvidia-cutlass-dsl", "torch"]
    assert "lutforge_kernels.dispatch" in out["modules"] and "lutforge_kernels.luts" in out["modules"]
    assert out["tier"] == "exact"
    from kernels.luts import read_lut

    assert out["cfg"] == next(iter(read_lut(lut).exact.values()))
