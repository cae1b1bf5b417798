"""A deterministic cost model standing in for the GPU so CI can run the whole sweep pipeline on a CPU.

Its numbers are a model, not measurements: every row it produces carries backend=synthetic and LUT
export refuses such rows. The model follows the physics the real kernels face - ideal bytes over a
bandwidth limited by loads in flight (Little's law), a launch floor, waves of CTAs, reduction and
cluster synchronisation costs - so a search over it has a landscape with structure to find.

Test-only fault injection: LUTFORGE_SYNTHETIC_FAULTS holds a JSON list of
{"when": {name: value, ...}, "fault": "abort" | "hang" | "wrong" | "compile_error" | "slow"}; a trial
whose knobs (and problem fields T, C, op, out_format) match every entry of "when" triggers the fault
in the compile or timing process, exercising the same isolation paths a CUDA fault or a hung kernel
takes on a GPU ("slow" only stretches the trial, so a test can interrupt a sweep mid-trial).
"""
from __future__ import annotations

import hashlib
import os
import time

from . import fault_injection
from .provenance import software

FAULTS_ENV = "LUTFORGE_SYNTHETIC_FAULTS"
FAULT_KINDS = ("abort", "hang", "wrong", "compile_error", "slow")
SLOW_S = 0.3

# Model device: an H100 SXM-like part.
SM_COUNT = 132
COPY_GBPS = 2976.0  # device-to-device copy measured on H100 80GB HBM3 (shared/DESIGN.md section 8)
LATENCY_S = 700e-9  # DRAM round trip a load must cover; Little's law gives bytes in flight needed
LAUNCH_US = 1.1  # smallest-shape time of the fastest peer (DESIGN.md section 8): the launch floor
WAVE_US = 0.25  # CTA scheduling and prologue per wave
MAX_THREADS_PER_SM = 2048
MAX_CTAS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
LOADS_IN_FLIGHT = 4  # unrolled vector loads a thread keeps outstanding
BLOCK_REDUCE_US = 0.04  # one shared-memory reduction step across warps, per wave
CLUSTER_SYNC_US = 0.6  # cluster barrier + DSMEM exchange, per wave


def device_info() -> dict:
    """Provenance columns of a synthetic row (the model device, plus the real software versions)."""
    return {
        "device_name": "synthetic cost model (H100 SXM-like)",
        "device_class": "synthetic",
        "sm": 90,
        "sm_count": SM_COUNT,
        "sm_clock_mhz": None,
        "mem_clock_mhz": None,
        "driver": None,
        "cuda": None,
        "backend": "synthetic",
        **software(),
    }


def model_us(p, cfg) -> float:
    """Modelled kernel time in microseconds (launch-bound when small, bandwidth-bound when large): each
    family's model of its kernel (sweep/families) on this module's device constants."""
    from .families import harness_of

    return harness_of(p).synthetic_us(p, cfg)


def _spread(p, cfg) -> float:
    """A deterministic relative spread in [0.5 %, 2 %) per (problem, config), for p20/p80."""
    h = hashlib.sha256(repr((p, cfg)).encode()).digest()
    return 0.005 + (h[0] / 255.0) * 0.015


def copy_gbps() -> float:
    return COPY_GBPS


def fault_for(p, cfg) -> str | None:
    return fault_injection.fault_for(FAULTS_ENV, FAULT_KINDS, p, cfg)


def precompile(p, cfg) -> dict:
    """The synthetic 'compile': nothing to build, but injected compile faults raise here."""
    t0 = time.perf_counter()
    if fault_for(p, cfg) == "compile_error":
        raise RuntimeError(f"injected synthetic compile error for {cfg.short()}")
    from .families import harness_of

    smem = harness_of(p).synthetic_smem(p, cfg)
    return {"compile_s": time.perf_counter() - t0, "registers": None, "smem_bytes": smem}


def measure(p, cfg) -> dict:
    """One synthetic timed trial, in the timing process (so injected aborts and hangs kill/stall it)."""
    fault = fault_for(p, cfg)
    if fault == "slow":
        time.sleep(SLOW_S)
    if fault == "abort":
        os.abort()
    if fault == "hang":
        while True:
            time.sleep(3600)
    if fault == "wrong":
        return {"status": "wrong_result", "error": "injected synthetic wrong result", "rel_err": None,
                "max_ulp": None}
    us = model_us(p, cfg)
    s = _spread(p, cfg)
    return {"status": "ok", "median_us": us, "p20_us": us * (1 - s), "p80_us": us * (1 + s),
            "rel_err": 0.0, "max_ulp": 0.0}
