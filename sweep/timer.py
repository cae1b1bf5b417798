"""The GPU timer every lutforge number comes from (trials, re-benchmarks, peers, the copy roofline).

Method (shared/DESIGN.md section 3): the caller builds one launcher per *rotation set* - a distinct
set of input and output buffers - with enough sets that together they exceed 3x the L2 cache, so no
launch reads or writes data a previous launch left in L2. N launches cycling over the sets are
captured in one CUDA graph; each replay is timed with CUDA events; the result is the median of >= 7
replays, with p20/p80 as the spread. Launch overhead inside the graph stays in the number: small
problems are launch-bound and that is what a user sees. A spin kernel ahead of each replay keeps the
CPU's submission of the timed work out of the timed region (SUBMIT_COVER_CYCLES); graphs of few long launches
get untimed replays first (WARM_MS).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable

L2_FACTOR = 3  # rotate at least this many L2 sizes of distinct buffers
MIN_REPLAYS = 7
# Big problems on an H100 sometimes time bimodally (541 vs 633 us for one config, results/logs/
# timer_repeatability_h100.log): while p80/p20 exceeds this, keep replaying, up to 3x the replays.
NOISY_SPREAD = 1.04
MAX_REPLAYS_FACTOR = 3
MIN_LAUNCH_US = 0.5  # the shortest time per launch the graph sizing assumes
MAX_SETS = 1 << 15  # below ~5 KB per set the rotation is capped; such problems are launch-bound anyway
COPY_BYTES = 256 << 20  # bytes per copy-roofline buffer (read once, written once per launch)
# GPU cycles of a spin kernel queued before each replay's start event, so the GPU is still busy while the
# CPU submits the event, the graph and the end event: otherwise a descheduled submitting thread (a sweep's
# compile processes fill every core) leaves the GPU idle inside the timed region. 200 us at ~2 GHz.
SUBMIT_COVER_CYCLES = 400_000
# Untimed replays before the first sample, for graphs of few long launches. Without them the public op of
# fused_add_rmsnorm_quant 32768x7168 timed 434 us (twice, in separate runs) against 394 us for the same config
# timed next through the harness (results/logs/tune_fused_add_rmsnorm_quant_fp8_multiply_h200.log); with
# 100 ms of them 394.3 vs 394.2, and 16384x12288 331.8 us, the sweep's 332.6 (bench_warm_quant_h200.log).
# Not the SM clock's ramp from idle: that settles within the first 2 ms replay (clock_ramp_h200.log). Graphs
# of many short launches showed no such bias with or without it (the held-out sweep: sweep_heldout_refit_
# fallback_h200.log vs sweep_heldout_clock_warm_h200.log), where it would double a sweep's wall time.
# 20 ms is enough: an A/B of 0/20/100 ms, two rounds, read 432-433 / 392.2-392.6 / 392.0-393.0 us through the
# public op against 391.6-392.9 us through the harness each time (timer_warmup_h200.log).
WARM_MS = 20.0
WARM_MAX_LAUNCHES = 64  # launches per replay up to which the warm-up runs (kernels of >= ~30 us)


@dataclass(frozen=True)
class Timing:
    median_us: float
    p20_us: float
    p80_us: float
    samples_us: tuple[float, ...]  # per-launch time of each replay
    launches: int  # launches per replay
    sets: int  # rotation sets
    rotated_bytes: int  # distinct bytes touched per pass over the sets
    l2_bytes: int


def percentile(xs, q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    s = sorted(xs)
    if not s:
        raise ValueError("percentile of no samples")
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(samples_us, *, launches: int = 0, sets: int = 0, rotated_bytes: int = 0, l2_bytes: int = 0) -> Timing:
    samples = tuple(float(x) for x in samples_us)
    return Timing(statistics.median(samples), percentile(samples, 20), percentile(samples, 80), samples,
                  launches, sets, rotated_bytes, l2_bytes)


def rotation_sets(set_bytes: int, l2_bytes: int, factor: int = L2_FACTOR, max_sets: int = MAX_SETS) -> int:
    """How many distinct buffer sets make the rotation exceed `factor` x L2 (at least 2)."""
    if set_bytes <= 0:
        raise ValueError(f"set_bytes must be positive, got {set_bytes}")
    if l2_bytes <= 0:
        raise ValueError(f"l2_bytes must be positive, got {l2_bytes}")
    return int(min(max_sets, max(2, -(-factor * l2_bytes // set_bytes))))


def l2_bytes(device=None) -> int:
    import torch

    return int(torch.cuda.get_device_properties(device).L2_cache_size)


def time_launchers(launchers: list[Callable[[], object]], *, set_bytes: int = 0, replays: int = 9,
                   target_ms: float = 2.0, max_launches: int = 1 << 15, warm_all: bool = True,
                   cover_submit: bool = True) -> Timing:
    """Time one launch by CUDA-graph replay over `launchers` (one per rotation set, in order).

    Launchers run once eagerly first (warm-up: module load, lazy allocations, autotuning of peers);
    `warm_all=False` warms only the first, for launchers that differ in nothing but their buffers (a
    decode shape has thousands of sets, and each eager launch costs Python time, not GPU time).
    Whatever a launcher returns is kept alive until timing ends, so a peer that allocates its output
    gets a fresh buffer per launch instead of re-using one that sits in L2. `cover_submit=False` drops the
    spin kernel before each replay (SUBMIT_COVER_CYCLES), only to measure what it guards against.
    """
    import torch

    if not launchers:
        raise ValueError("time_launchers needs at least one launcher")
    if replays < MIN_REPLAYS:
        raise ValueError(f"need >= {MIN_REPLAYS} replays for a stable median, got {replays}")
    n = len(launchers)
    keep = [f() for f in (launchers if warm_all else launchers[:1])]  # warm-up, eager
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    passes = 1  # enough when the rotation alone fills target_ms at the shortest launch time we assume
    if n * MIN_LAUNCH_US < target_ms * 1000.0:
        start.record()
        keep += [f() for f in launchers]
        end.record()
        end.synchronize()
        est_us = max(start.elapsed_time(end) * 1000.0 / n, MIN_LAUNCH_US)  # eager: an upper bound per launch
        passes = max(1, min(math.ceil(target_ms * 1000.0 / (est_us * n)), max_launches // n))
    launches = n * passes
    del keep
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(graph, stream=stream):
        keep = [launchers[i % n]() for i in range(launches)]
    graph.replay()  # first replay uploads the graph
    torch.cuda.synchronize()
    warm_ms = 0.0
    while launches <= WARM_MAX_LAUNCHES and warm_ms < WARM_MS:  # untimed replays first (WARM_MS)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        warm_ms += start.elapsed_time(end)
    samples: list[float] = []
    while len(samples) < replays or (len(samples) < MAX_REPLAYS_FACTOR * replays
                                     and percentile(samples, 80) > NOISY_SPREAD * percentile(samples, 20)):
        if cover_submit:
            torch.cuda._sleep(SUBMIT_COVER_CYCLES)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000.0 / launches)
    del keep, graph
    return summarize(samples, launches=launches, sets=n, rotated_bytes=set_bytes * n,
                     l2_bytes=l2_bytes(torch.cuda.current_device()))


@dataclass(frozen=True)
class CopyRoofline:
    gbps: float
    timing: Timing
    bytes_per_launch: int  # bytes read + bytes written


def copy_roofline(nbytes: int = COPY_BYTES, replays: int = 9) -> CopyRoofline:
    """Device-to-device copy bandwidth on the current device, timed exactly like a kernel.

    Counts bytes read plus bytes written, the same accounting as ideal_bytes, so pct_copy compares
    like with like.
    """
    import torch

    if nbytes <= 0:
        raise ValueError(f"nbytes must be positive, got {nbytes}")
    dev = torch.cuda.current_device()
    sets = rotation_sets(2 * nbytes, l2_bytes(dev))
    bufs = [(torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(i % 251),
             torch.empty(nbytes, dtype=torch.uint8, device=dev)) for i in range(sets)]

    def copier(src, dst):
        return lambda: dst.copy_(src)

    launchers = [copier(s, d) for s, d in bufs]
    timing = time_launchers(launchers, set_bytes=2 * nbytes, replays=replays)
    if not torch.equal(bufs[0][0], bufs[0][1]):
        raise RuntimeError("copy roofline: the copied buffer differs from its source")
    return CopyRoofline(2 * nbytes / (timing.median_us * 1e-6) / 1e9, timing, 2 * nbytes)


def gbps(nbytes: int, us: float | None) -> float | None:
    """Achieved GB/s (1e9 bytes per second) for `nbytes` moved in `us` microseconds."""
    if us is None or us <= 0:
        return None
    return nbytes / (us * 1e-6) / 1e9
