"""Does the timer need untimed replays before sampling (sweep.timer.WARM_MS), and how many?

fused_add_rmsnorm_quant 32768 x 7168 timed through the public op once measured 434 us against 394 us for the
same config timed next through the harness. This prepares the problem afresh (rotation sets, reference)
for each warm-up length, times the public op first and the same config through the harness second, twice.
Usage, on a GPU from the repository root: python benchmarks/timer_warmup.py"""
import torch

import sweep.timer as timer
from kernels import runner
from kernels.dispatch import device_class_of, select_config
from kernels.problem import Problem
from sweep.public_op import measure_op
from sweep.trial_worker import PREPARED, measure_kernel

WARM_LENGTHS_MS = (0.0, 20.0, 100.0)


def main():
    arch = runner.arch_of()
    p = Problem("fused_add_rmsnorm_quant", 32768, 7168, "bf16", "fp8")
    cfg, tier = select_config(p, int(arch[3:-1]), device_class_of(torch.cuda.get_device_name()))
    print(f"# {torch.cuda.get_device_name()}: {p.op} {p.T}x{p.C}, dispatched config {cfg.short()} ({tier})")
    print("round | warm ms | public op us | same config, harness us")
    for rnd in (1, 2):
        for warm in WARM_LENGTHS_MS:
            timer.WARM_MS = warm
            PREPARED._items.clear()
            torch.cuda.empty_cache()
            pub = measure_op(p)
            har = measure_kernel(p, cfg, arch)
            print(f"{rnd} | {warm:5.0f} | {pub.get('median_us', float('nan')):8.2f} {pub['status']} | "
                  f"{har.get('median_us', float('nan')):8.2f} {har['status']}", flush=True)


if __name__ == "__main__":
    main()
