"""Test-only: chosen GPU trials launch a kernel that stores far out of bounds of the trial's input.

A real illegal-address fault is sticky: it poisons the CUDA context of the timing process, which is
exactly what the sweep's process isolation must survive (the trial is recorded runtime_error, the
timing process restarts, the sweep goes on). The synthetic backend can only imitate that with an abort;
this makes the GPU do it for real.

LUTFORGE_GPU_FAULTS holds a JSON list of {"when": {name: value, ...}, "fault": "illegal_address"} (matching
as in sweep/fault_injection.py); a selected trial runs the faulting kernel instead of its own.
"""
from __future__ import annotations

import ctypes
import functools

from kernels.config import KernelConfig
from kernels.problem import Problem

from . import fault_injection

FAULTS_ENV = "LUTFORGE_GPU_FAULTS"
FAULT_KINDS = ("illegal_address",)
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


def wants_fault(p: Problem, cfg: KernelConfig) -> bool:
    return fault_injection.fault_for(FAULTS_ENV, FAULT_KINDS, p, cfg) is not None


def _driver_call(lib, name: str, *args) -> None:
    rc = getattr(lib, name)(*args)
    if rc != 0:
        raise RuntimeError(f"{name} failed with CUresult {rc}")


@functools.lru_cache(maxsize=None)  # load the module once per process
def _function():
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernel.argtypes = ([ctypes.c_void_p] + [ctypes.c_uint] * 7
                                   + [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p])
    mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
    _driver_call(lib, "cuModuleLoadData", ctypes.byref(mod), ctypes.c_char_p(_PTX))
    _driver_call(lib, "cuModuleGetFunction", ctypes.byref(fn), mod, b"lutforge_oob_store")
    return lib, fn


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
