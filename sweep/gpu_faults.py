"""Test-only: chosen GPU trials launch a kernel that stores far out of bounds of the trial's output.

A real illegal-address fault is sticky: it poisons the CUDA context of the timing process, which is
exactly what the sweep's process isolation must survive (the trial is recorded runtime_error, the
timing process restarts, the sweep goes on). The synthetic backend can only imitate that with an abort;
this makes the GPU do it for real.

LUTFORGE_GPU_FAULTS holds a JSON list of {"when": {name: value, ...}}; a trial whose knobs and problem
fields (T, C, op, out_format) match every entry of one "when" runs the faulting kernel instead of its own.
"""
from __future__ import annotations

import ctypes
import json
import os

from kernels.config import KernelConfig
from kernels.problem import Problem

FAULTS_ENV = "LUTFORGE_GPU_FAULTS"
OOB_BYTES = 1 << 44  # far past any allocation: the store hits unmapped device memory

_PTX = b"""
.version 7.0
.target sm_70
.address_size 64
.visible .entry lutforge_oob_store(.param .u64 addr)
{
  .reg .b64 %rd<2>;
  .reg .b32 %r<2>;
  ld.param.u64 %rd1, [addr];
  mov.u32 %r1, 1;
  st.global.u32 [%rd1], %r1;
  ret;
}
"""
_FUNCTION: list = []  # the loaded CUfunction, once per process


def _whens() -> list[dict]:
    raw = os.environ.get(FAULTS_ENV)
    if not raw:
        return []
    try:
        faults = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{FAULTS_ENV} is not JSON: {e}") from e
    if not isinstance(faults, list) or not all(isinstance(f, dict) and isinstance(f.get("when"), dict)
                                               for f in faults):
        raise ValueError(f"{FAULTS_ENV} must be a list of {{'when': {{knob or T/C/op/out_format: value}}}}")
    return [f["when"] for f in faults]


def wants_fault(p: Problem, cfg: KernelConfig) -> bool:
    d = {**cfg.as_dict(), "T": p.T, "C": p.C, "op": p.op, "out_format": p.out_format}
    return any(all(d.get(k) == v for k, v in when.items()) for when in _whens())


def _driver_call(lib, name: str, *args) -> None:
    rc = getattr(lib, name)(*args)
    if rc != 0:
        raise RuntimeError(f"{name} failed with CUresult {rc}")


def _function():
    if not _FUNCTION:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p,
                                                                                   ctypes.POINTER(ctypes.c_void_p),
                                                                                   ctypes.c_void_p]
        mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
        _driver_call(lib, "cuModuleLoadData", ctypes.byref(mod), ctypes.c_char_p(_PTX))
        _driver_call(lib, "cuModuleGetFunction", ctypes.byref(fn), mod, b"lutforge_oob_store")
        _FUNCTION.extend([lib, fn])
    return _FUNCTION


def out_of_bounds_launcher(target):
    """A zero-argument launch storing 4 bytes OOB_BYTES past `target` (a CUDA tensor) on the current stream."""
    import torch

    torch.cuda.synchronize()  # makes torch's primary context current on this thread before the driver calls
    lib, fn = _function()
    addr = ctypes.c_uint64(target.data_ptr() + OOB_BYTES)
    params = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.byref(addr), ctypes.c_void_p))

    def launch(_keep=addr):  # params points into addr: keep it alive as long as the launcher
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        _driver_call(lib, "cuLaunchKernel", fn, 1, 1, 1, 1, 1, 1, 0, stream, params, None)

    return launch
