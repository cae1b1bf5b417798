"""Does a busy CPU inflate graph-replay timings, and does the spin kernel before each replay's start event
(sweep.timer.SUBMIT_COVER_CYCLES) stop it? Times heuristic configs with every core busy at low priority (as a
sweep's compile processes are) and idle, with and without the cover; 3 measurements each, min and max of the
medians. Usage, on a GPU from the repository root: python benchmarks/timer_submit_cover.py"""
import functools
import multiprocessing as mp
import os
import time

import torch

import sweep.timer as timer
from kernels import runner
from kernels.config import heuristic
from kernels.problem import Problem
from sweep.trial_worker import measure_kernel


def burn():
    os.nice(10)
    while True:
        pass


def main():
    arch = runner.arch_of()
    problems = [Problem("fused_rmsnorm_silu", 1560, 64), Problem("fused_rmsnorm_silu", 6240, 320),
                Problem("rmsnorm", 16, 4096), Problem("fused_rmsnorm_silu", 99840, 256)]
    orig = timer.time_launchers
    print(f"# {torch.cuda.get_device_name()}, {mp.cpu_count()} cores; us per launch, min-max of 3 medians")
    print("problem | config | cpu | no cover | cover")
    for load in (False, True):
        procs = [mp.get_context("spawn").Process(target=burn, daemon=True) for _ in range(mp.cpu_count() if load else 0)]
        for pr in procs:
            pr.start()
        time.sleep(1.0)
        for p in problems:
            cfg = heuristic(p, int(arch[3:-1]))
            cells = []
            for cover in (False, True):
                timer.time_launchers = functools.partial(orig, cover_submit=cover)
                meds = [measure_kernel(p, cfg, arch)["median_us"] for _ in range(3)]
                cells.append(f"{min(meds):.3f}-{max(meds):.3f}")
            print(f"{p.op} {p.T}x{p.C} | {cfg.short()} | {'busy' if load else 'idle'} | {cells[0]} | {cells[1]}", flush=True)
        for pr in procs:
            pr.terminate()
    timer.time_launchers = orig


if __name__ == "__main__":
    main()
