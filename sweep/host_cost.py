"""Host cost per eager call: what serving code pays on the CPU for one call of an op, beside torch and the peers.

A 1-3 us norm is worth nothing if its call costs 200 us of Python. Measured as DESIGN.md §Timing says: N
back-to-back calls without a sync, median over repeats. The GPU is held busy by a sleep kernel queued first,
so the calls only enqueue and the figure is pure host time even where the kernel would be slower than its
launch; N stays below the launch queue's depth so no call waits for a free slot.

Implementations (rows kind=host, impl=...):
  lutforge            the public op as a user calls it (outputs allocated by the op where it allocates)
  lutforge_sync       fused_moe with check_expert_ids="sync" (reads this call's bad-id count back: a sync)
  lutforge_unchecked  fused_moe with check_expert_ids="off" (the default check reads a pinned word, no sync)
  lutforge_custom_op  torch.ops.lutforge.norm, the custom op torch.compile graphs call (outputs preallocated)
  lutforge_launch     the compiled TVM-FFI function alone with prebuilt arguments: the floor of our call path
  cute_jit_launch     the same kernel compiled without TVM-FFI, called through CuTe-DSL's own executor with
                      prebuilt arguments (what the call path was built on before; rmsnorm only)
  torch_rms_norm      torch.nn.functional.rms_norm at the same shape: the budget every op is judged against
  torch_eager         the op written as torch ops (e.g. rms_norm then silu), as a user without lutforge would
  quack, liger, flashinfer  their public calls, where installed and where they have the op
"""
from __future__ import annotations

import statistics
import time

from .families import harness_of

CALLS = 400  # per repeat, for one launch per call
QUEUE_LAUNCHES = 1000  # below the CUDA launch queue's ~1024 entries: more and the loop waits for the GPU (the
# H200 fused-MoE figures of 120-1350 us per call before this cap were 1600 launches per repeat: GPU time)
REPEATS = 9
SLEEP_CYCLES_PER_LAUNCH = 200_000  # ~100 us at ~2 GHz per enqueued launch: more than any launch's host cost,
# so the GPU stays busy for the whole loop
IMPLS = ("lutforge", "lutforge_sync", "lutforge_unchecked", "lutforge_custom_op", "lutforge_launch", "cute_jit_launch",
         "torch_rms_norm", "torch_eager", "quack", "liger", "flashinfer")


def calls(p, device="cuda") -> dict:
    """impl -> zero-argument callable doing one call of `p` the way that impl's users call it (only the impls
    that can run it here; the problem's family builds them, sweep/families)."""
    return harness_of(p).host_calls(p, device)


def time_host(fn, calls: int = CALLS, repeats: int = REPEATS, launches: int = 1) -> tuple[float, float, float]:
    """(median, p20, p80) host microseconds per call over `repeats` runs of `calls` back-to-back calls."""
    import torch

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(repeats):
        torch.cuda._sleep(SLEEP_CYCLES_PER_LAUNCH * launches * calls)  # busy for longer than the loop takes
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        per_call.append((t1 - t0) / calls * 1e6)
    q = statistics.quantiles(per_call, n=5)
    return statistics.median(per_call), q[0], q[-1]


def measure(p, impls=IMPLS) -> list[dict]:
    """One dict per impl that can run `p` here: impl, host_us, host_p20_us, host_p80_us (or status/error)."""
    out = []
    launches = harness_of(p).host_launches
    n = min(CALLS, QUEUE_LAUNCHES // launches)
    for impl, fn in calls(p).items():
        if impl not in impls:
            continue
        try:
            med, p20, p80 = time_host(fn, calls=n, launches=launches)
            out.append({"impl": impl, "status": "ok", "host_us": med, "host_p20_us": p20, "host_p80_us": p80})
        except Exception as e:  # a peer that fails here is reported, not fatal to the others
            out.append({"impl": impl, "status": "runtime_error", "error": f"{type(e).__name__}: {e}"[:500]})
    return out
