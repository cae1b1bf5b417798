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
import math
import os
import time

from kernels import channel_first as cf
from kernels.config import KernelConfig, iters_per_row, smem_bytes
from kernels.family import family_of
from kernels.problem import Problem, ideal_bytes

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
    """Modelled kernel time in microseconds (launch-bound when small, bandwidth-bound when large)."""
    if family_of(p).name == "channel_first":
        return _channel_first_us(p, cfg)
    if family_of(p).name == "moe":
        return _moe_us(p, cfg)
    rows = p.rows
    rows_per_cta = cfg.rows_per_cta
    row_blocks = max(1, -(-rows // rows_per_cta))
    grid = row_blocks * cfg.cluster
    resident = min(MAX_THREADS_PER_SM // cfg.threads, MAX_CTAS_PER_SM,
                   max(1, SMEM_PER_SM // max(1, smem_bytes(p, cfg))))
    if cfg.ctas_per_sm:
        resident = min(resident, cfg.ctas_per_sm)
        grid = min(grid, cfg.ctas_per_sm * SM_COUNT)
    slots = resident * SM_COUNT
    concurrent = min(grid, slots)
    loads = min(iters_per_row(p, cfg), LOADS_IN_FLIGHT)
    if cfg.stage == "smem":
        loads = LOADS_IN_FLIGHT  # cp.async issues the whole tile before waiting
    inflight = concurrent * cfg.threads * cfg.vec_bytes * loads
    bw = min(COPY_GBPS * 1e9, inflight / LATENCY_S)
    waves = -(-grid // slots) if not cfg.ctas_per_sm else -(-row_blocks * cfg.cluster // slots)
    # Persistent grids pay one prologue but loop over row blocks; plain grids pay a prologue per wave.
    t = LAUNCH_US + (WAVE_US if cfg.ctas_per_sm else WAVE_US * waves)
    moved = ideal_bytes(p)
    if not cfg.weight_smem and rows_per_cta == 1 and p.C * 2 > 8192:
        moved += grid * p.C * 2 // 8  # weight re-fetched from L2 per CTA, partly overlapping HBM traffic
    t += moved / bw * 1e6
    warps_per_row = max(1, cfg.threads_per_row // 32)
    if warps_per_row > 1:
        t += BLOCK_REDUCE_US * math.log2(warps_per_row) * waves
    if cfg.cluster > 1:
        t += CLUSTER_SYNC_US * waves
    if cfg.stage == "smem":
        t *= 1.02  # the extra shared-memory round trip
    return t


def _channel_first_us(p: cf.ChannelFirstProblem, cfg: cf.ChannelFirstConfig) -> float:
    """The same physics for the channel-first kernel: a CTA owns positions_per_cta positions of one n and loads
    every channel of them; partial sums of channel groups in different warps meet in shared memory."""
    grid = max(1, p.N * -(-p.S // cfg.positions_per_cta))
    resident = min(MAX_THREADS_PER_SM // cfg.threads, MAX_CTAS_PER_SM,
                   max(1, SMEM_PER_SM // max(1, cf.smem_bytes(p, cfg))))
    slots = resident * SM_COUNT
    loads = LOADS_IN_FLIGHT if cfg.stage == "smem" else min(cf.channels_per_thread(p, cfg), LOADS_IN_FLIGHT)
    inflight = min(grid, slots) * cfg.threads * cfg.vec_bytes * loads
    bw = min(COPY_GBPS * 1e9, inflight / LATENCY_S)
    waves = -(-grid // slots)
    t = LAUNCH_US + WAVE_US * waves + cf.ideal_bytes(p) / bw * 1e6
    if cf.reduction_slots(p, cfg) > 1:
        t += BLOCK_REDUCE_US * math.log2(cf.reduction_slots(p, cfg)) * waves
    if cfg.vec_bytes * cf.lanes(p, cfg) < 32:
        t *= 1.3  # a warp's run per channel shorter than a 32-byte sector wastes bandwidth
    return t


MMA_SYNC_TFLOPS = 660.0  # dense bf16 mma.sync rate of the model device (about 2/3 of its wgmma peak)
MOE_GLUE_LAUNCHES = 3  # the routing launch, the per-token sum and its copy into the output, around the two GEMMs


def _moe_gemm_us(p, sh, g) -> float:
    """One grouped GEMM: its weight (and activation) bytes over the bandwidth its cp.async stages keep in
    flight, or its mma work over the tensor rate its tile reaches (rows padded to bm), whichever is longer."""
    from kernels.moe_config import smem_bytes as moe_smem
    from kernels.moe_problem import expected_experts_touched, rows_per_expert, weight_bytes

    touched = max(expected_experts_touched(p), 1e-9)
    rows = rows_per_expert(p)
    m_tiles = touched * max(1, -(-int(math.ceil(rows)) // g.bm))
    grid = max(1.0, m_tiles * (sh.N // g.bn))
    resident = max(1, min(MAX_THREADS_PER_SM // g.threads, MAX_CTAS_PER_SM, SMEM_PER_SM // moe_smem(sh, g)))
    slots = resident * SM_COUNT
    nb = g.bn * (2 if sh.gated else 1)
    inflight = min(grid, slots) * (g.stages - 1) * (nb * g.bk // 2 + g.bm * g.bk * 2)
    bw = min(COPY_GBPS * 1e9, inflight / LATENCY_S)
    share = (sh.N * (2 if sh.gated else 1)) * sh.K / (p.fc1_rows * p.H + p.H * p.I)
    nbytes = weight_bytes(p, touched) * share * m_tiles / touched  # each m-tile of an expert reads its slab
    nbytes += m_tiles * g.bm * sh.K * 2  # A rows (the n-tiles after the first hit L2)
    padded = m_tiles * g.bm * (sh.N * (2 if sh.gated else 1)) * sh.K * 2  # flops with rows padded to bm
    intensity = g.bm * g.bn / (g.bm + g.bn) / 32  # shared-memory reads per mma: 1 from a 64x64 tile up
    rate = MMA_SYNC_TFLOPS * 1e12 * min(1.0, intensity) * min(1.0, resident * g.threads / 256)
    waves = -(-grid // slots)
    return WAVE_US * waves + max(nbytes / bw, padded / rate) * 1e6


def _moe_us(p, cfg) -> float:
    """A fused-MoE call: the glue launches, then FC1 and FC2."""
    from kernels.moe_config import gemm_shapes

    if p.T == 0:
        return LAUNCH_US
    fc1, fc2 = gemm_shapes(p.quant_mode, p.activation, p.H, p.I)
    return LAUNCH_US * MOE_GLUE_LAUNCHES + _moe_gemm_us(p, fc1, cfg.gemm("fc1")) + _moe_gemm_us(p, fc2, cfg.gemm("fc2"))


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
    name = family_of(p).name
    if name == "moe":
        from kernels.moe_config import gemm_shapes, smem_bytes as moe_smem

        smem = max(moe_smem(sh, cfg.gemm(sh.layer)) for sh in gemm_shapes(p.quant_mode, p.activation, p.H, p.I))
    else:
        smem = cf.smem_bytes(p, cfg) if name == "channel_first" else smem_bytes(p, cfg)
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
