"""A/B of the L2 prefetch under PDL: per problem, its dispatched config (LUT or heuristic) with PDL, without
and with `l2_prefetch`, checked and timed in interleaved rounds by the sweep's timer (best median of the
rounds). Usage, on a GPU from the repository root: python benchmarks/ab_l2_prefetch.py [rounds]"""
import dataclasses
import multiprocessing as mp
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

import problem_sets
from kernels import runner
from kernels.compile_cache import arch_number, precompile
from kernels.config import is_valid
from kernels.dispatch import device_class_of, select_config
from kernels.problem import ideal_bytes
from sweep.timer import copy_roofline
from sweep.trial_worker import measure_kernel


def main():
    ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    SECTIONS = [  # (set, op, out, shape filter)
        ("wan_vae", "fused_rmsnorm_silu", "bf16", lambda T, C: True),
        ("wan_vae", "fused_rmsnorm_silu", "fp8", lambda T, C: T <= 24960),
        ("wan_vae", "rmsnorm", "bf16", lambda T, C: T <= 24960),
        ("llm", "rmsnorm", "bf16", lambda T, C: C in (2048, 4096, 8192) and T in (1, 16, 256, 2048, 16384)),
        ("llm", "fused_add_rmsnorm", "bf16", lambda T, C: C == 4096 and T in (1, 64, 1024, 8192)),
    ]

    arch = runner.arch_of()
    dev = torch.cuda.get_device_name()
    cls = device_class_of(dev)
    copy = copy_roofline().gbps
    print(f"# {dev} ({cls}, {arch}); copy roofline {copy:.0f} GB/s; {ROUNDS} interleaved rounds, best median", flush=True)
    plan = []
    for pset, op, out, keep in SECTIONS:
        for p in problem_sets.problems(pset, op, "bf16", out):
            if keep(p.T, p.C):
                base, tier = select_config(p, arch_number(arch), cls)
                variants = [dataclasses.replace(base, pdl=True, l2_prefetch=False),
                            dataclasses.replace(base, pdl=True, l2_prefetch=True)]
                plan.append((pset, p, base, tier, variants))
    with ProcessPoolExecutor(max(1, mp.cpu_count() - 2), mp_context=mp.get_context("spawn")) as pool:
        jobs = [pool.submit(precompile, p, c, arch) for _, p, _, _, vs in plan for c in vs if is_valid(p, c, arch_number(arch))]
        for j in jobs:
            j.result()
    print("set | op | out | T | C | base config (tier) | pdl us | pdl+prefetch us | speedup | pdl+prefetch % of copy")
    for pset, p, base, tier, variants in plan:
        if not all(is_valid(p, c, arch_number(arch)) for c in variants):
            print(f"{pset} | {p.op} | {p.out_format} | {p.T} | {p.C} | {base.short()} | invalid with pdl", flush=True)
            continue
        best = [float("inf")] * len(variants)
        for _ in range(ROUNDS):
            for i, c in enumerate(variants):
                r = measure_kernel(p, c, arch)
                if r["status"] != "ok":
                    raise SystemExit(f"{p} {c.short()}: {r['status']}: {r.get('error')}")
                best[i] = min(best[i], r["median_us"])
        gb = ideal_bytes(p) / (best[1] * 1e-6) / 1e9
        print(f"{pset} | {p.op} | {p.out_format} | {p.T} | {p.C} | {base.short()} ({tier}) | {best[0]:.2f} | "
              f"{best[1]:.2f} | {best[0] / best[1]:.3f} | {100 * gb / copy:.1f}", flush=True)


if __name__ == "__main__":
    main()
