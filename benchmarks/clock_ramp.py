"""How long does the GPU take to reach full speed after idling, and does that bias the timer's first samples?

The H200 idles at 345 MHz SM clock and boosts to 1980 MHz under load. A big problem's timing is short (about
nine 2 ms replays), so when it follows an idle gap (a compile, a reference check on the host) its samples can
be taken while the clock still ramps. This replays one graph of a memory-bound kernel (fused_add_rmsnorm_quant
32768 x 7168, the heuristic config, ~2 ms per replay like the timer's graphs) after idle gaps of several
lengths and prints each replay's time per launch against the GPU time spent since the gap ended.
Usage, on a GPU from the repository root: python benchmarks/clock_ramp.py"""
import statistics
import time

import torch

from kernels import runner
from kernels.config import heuristic
from kernels.problem import Problem

IDLE_S = (3.0, 1.0, 0.3, 0.1, 0.03, 0.0)
REPLAYS = 120
LAUNCHES = 5  # per graph: ~2 ms per replay


def main():
    p = Problem("fused_add_rmsnorm_quant", 32768, 7168, "bf16", "fp8")
    arch = runner.arch_of()
    case = runner.make_cases(p, 1)[0]
    launch = runner.launcher(p, heuristic(p, int(arch[3:-1])), case, arch)
    launch()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(g, stream=s):
        for _ in range(LAUNCHES):
            launch()
    g.replay()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(REPLAYS)]
    print(f"# {torch.cuda.get_device_name()}: {p.op} {p.T}x{p.C}, {LAUNCHES} launches per replay")
    print("idle s | us/launch of replays 1-5 | steady (median of 60-120) | GPU ms until within 2 % of steady")
    for idle in IDLE_S:
        time.sleep(idle)
        for a, b in ev:  # queued back to back: the GPU never idles between replays
            a.record()
            g.replay()
            b.record()
        torch.cuda.synchronize()
        us = [a.elapsed_time(b) * 1000.0 / LAUNCHES for a, b in ev]
        steady = statistics.median(us[60:])
        spent, settled = 0.0, None
        for i, u in enumerate(us):
            if settled is None and all(x <= steady * 1.02 for x in us[i:i + 5]):
                settled = spent
            spent += u * LAUNCHES / 1000.0
        print(f"{idle:5.2f} | {' '.join(f'{u:6.1f}' for u in us[:5])} | {steady:6.1f} | "
              f"{'never' if settled is None else f'{settled:.1f}'}")


if __name__ == "__main__":
    main()
