"""Where a measurement came from: device, clocks, driver and software versions, git commit, time.

Every Parquet row carries these columns so a number can be traced to the machine and code that
produced it; LUT export refuses rows it cannot trace (e.g. backend=synthetic).
"""
from __future__ import annotations

import datetime as _dt
import functools
import importlib.metadata as _md
import shutil
import subprocess
from pathlib import Path

from kernels.compile_cache import kernel_source_hash

REPO_ROOT = Path(__file__).resolve().parent.parent


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _version(dist: str) -> str | None:
    try:
        return _md.version(dist)
    except _md.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def lutforge_version() -> str | None:
    """The installed distribution's version, else the one in the checkout's pyproject.toml."""
    v = _version("lutforge")
    if v is not None:
        return v
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    except (OSError, KeyError):
        return None


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """HEAD of the checkout the code runs from, with '+dirty' when tracked files are modified."""
    if shutil.which("git") is None:
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def software() -> dict:
    """Versions shared by every backend (torch is read from metadata so no import is needed)."""
    return {
        "torch": _version("torch"),
        "cutlass_dsl": _version("nvidia-cutlass-dsl"),
        "lutforge": lutforge_version(),
        "git_commit": git_commit(),
        "kernel_source": kernel_source_hash(),
    }


def nvidia_smi_clocks(index: int = 0) -> dict:
    """Current SM/memory clocks (MHz) and driver version of GPU `index` via nvidia-smi; {} without it."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    try:
        r = subprocess.run([exe, "-i", str(index), "--query-gpu=clocks.sm,clocks.mem,driver_version",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if r.returncode != 0 or not r.stdout.strip():
        return {}
    parts = [s.strip() for s in r.stdout.strip().splitlines()[0].split(",")]
    out: dict = {}
    for key, val in zip(("sm_clock_mhz", "mem_clock_mhz"), parts[:2]):
        try:
            out[key] = float(val)
        except ValueError:
            pass
    if len(parts) > 2 and parts[2]:
        out["driver"] = parts[2]
    return out


def gpu_provenance(device_index: int = 0) -> dict:
    """Provenance of the current process's CUDA device `device_index` (needs torch with CUDA).

    Clocks come from nvidia-smi; where it is absent, torch's NVML-backed clock_rate gives the SM clock.
    The nvidia-smi index is the physical one when CUDA_VISIBLE_DEVICES narrows the view.
    """
    import os

    import torch

    from kernels.dispatch import device_class_of

    props = torch.cuda.get_device_properties(device_index)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    physical = device_index
    ids = [s.strip() for s in visible.split(",") if s.strip()]
    if ids and device_index < len(ids) and ids[device_index].isdigit():
        physical = int(ids[device_index])
    info = {
        "device_name": props.name,
        "device_class": device_class_of(props.name),
        "sm": props.major * 10 + props.minor,
        "sm_count": props.multi_processor_count,
        "sm_clock_mhz": None,
        "mem_clock_mhz": None,
        "driver": None,
        "cuda": torch.version.cuda,
        "backend": "gpu",
        **software(),
    }
    info.update(nvidia_smi_clocks(physical))
    if info["sm_clock_mhz"] is None:
        try:
            info["sm_clock_mhz"] = float(torch.cuda.clock_rate(device_index))
        except Exception:  # clock_rate needs pynvml; absent is fine, the column stays null
            pass
    return info


def make_row(*, problem, result: dict, device: dict, copy_gbps: float | None, knobs: dict | None, run_id: str,
             study: str | None, trial: int, kind: str, impl: str, config_source: str | None,
             problem_set: str | None) -> dict:
    """One Parquet row: the measurement `result` (status, timings, errors) plus where it came from.

    GB/s use the family's ideal_bytes (each tensor moved once); pct_copy compares with the copy roofline
    measured by the same timing process.
    """
    from kernels.family import family_of

    from .results_io import problem_columns
    from .timer import gbps as _gbps

    fam = family_of(problem)
    nbytes = fam.ideal_bytes(problem)
    status = result["status"]
    median = result.get("median_us") if status == "ok" else None
    g = _gbps(nbytes, median)
    row = {
        "run_id": run_id, "study": study, "trial": trial, "kind": kind, "impl": impl,
        "config_source": config_source, "problem_set": problem_set,
        **problem_columns(problem),
        "status": status, "error": result.get("error"),
        "median_us": median,
        "p20_us": result.get("p20_us") if status == "ok" else None,
        "p80_us": result.get("p80_us") if status == "ok" else None,
        **{k: result.get(k) if status == "ok" else None for k in ("host_us", "host_p20_us", "host_p80_us")},
        "bytes": nbytes, "gbps": g,
        "pct_copy": (100.0 * g / copy_gbps) if (g is not None and copy_gbps) else None,
        "copy_gbps": copy_gbps,
        "rel_err": result.get("rel_err"), "max_ulp": result.get("max_ulp"),
        "compile_s": result.get("compile_s"),
        "timestamp": utc_now(),
    }
    for k, v in (knobs or {}).items():
        row[f"knob_{k}"] = v
    for k in ("device_name", "device_class", "sm", "sm_count", "sm_clock_mhz", "mem_clock_mhz", "driver", "cuda",
              "torch", "cutlass_dsl", "lutforge", "git_commit", "kernel_source", "backend"):
        row[k] = device.get(k)
    row["kernel_source"] = fam.source_hash()  # the device's provenance names the row kernel's source
    return row
