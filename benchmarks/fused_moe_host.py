"""Where an eager fused_moe call's time goes, on the host and on the GPU, in one run:

    python benchmarks/fused_moe_host.py [--out FILE.md]

Host: each piece of the call's fast path (a repeated argument signature) timed alone the way sweep/host_cost.py
times whole calls: N back-to-back calls behind a sleep kernel, median over repeats. The pieces: the signature
key (kernels/fused_moe._call_key), the workspace (the stream's arena, kernels/fused_moe._workspace, against a
torch.empty of the same size), the output's torch.empty, the launch arguments (_Launch.arguments), each kernel's
TVM-FFI call alone (prebuilt arguments), the four together (the floor) and _Launch.run. Qwen3-30B-A3B, T=1, W4A16.

GPU: eager calls back to back under torch.profiler (CUPTI): each kernel's median duration and the span of a
call from its first kernel's start to its last one's end. With PDL a dependent kernel starts before its
predecessor ends and waits inside, so its duration includes that wait: only the span adds up.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import problem_sets  # noqa: E402
from kernels import fused_moe as fm  # noqa: E402
from kernels import moe_runner  # noqa: E402
from kernels.moe_problem import MoEProblem  # noqa: E402
from kernels.ops import _raw_stream  # noqa: E402
from sweep.host_cost import time_host  # noqa: E402

SPANS = (("qwen3-30b-a3b", 1), ("qwen3-30b-a3b", 64), ("gpt-oss-120b", 1), ("mixtral-8x7b", 64))


def problem(layer: str, T: int) -> MoEProblem:
    """The moe problem set's `layer` at T tokens, W4A16, uniform routing."""
    ps = problem_sets.load("moe")
    p = dict(zip(ps.moe_names, ps.moe_problems))[layer]
    return replace(p, T=T, quant_mode="w4a16", routing="uniform")


def host_pieces() -> list[tuple[str, float, float, float]]:
    """(piece, median, p20, p80 host us) of the Qwen3-30B-A3B T=1 W4A16 call's fast path."""
    p = problem("qwen3-30b-a3b", 1)
    a = moe_runner.make_case(p).args
    tensors = (a["x"], a["w1_weight"], a["w1_weight_sf"], a["w2_weight"], a["w2_weight_sf"],
               a["token_selected_experts"], a["token_final_scales"], a["w1_alpha"], a["w2_alpha"])

    def call(output=None):
        return fm.fused_moe(*tensors[:7], p.E, p.top_k, w1_alpha=a["w1_alpha"], w2_alpha=a["w2_alpha"], output=output,
                            quant_mode="w4a16", check_expert_ids="off")

    call(), call(a["out"])
    _, launch = fm._resolve(*tensors, None, a["out"], p.E, p.top_k, p.n_local, 0, "w4a16", "silu", torch.bfloat16,
                            None)
    dev = a["x"].device
    ws = torch.empty(launch.ws_bytes, dtype=torch.uint8, device=dev)
    base, st = ws.data_ptr(), _raw_stream(dev.index)
    run_args = (*tensors, None, a["out"], 0, p.E)
    route, fc1, fc2, comb = launch.arguments(base, base, *tensors, None, a["out"], 0, p.E, st)
    pieces = {
        "public op (output allocated)": (call, 4),
        "public op (output given)": (lambda: call(a["out"]), 4),
        "signature key (_call_key)": (lambda: fm._call_key(*tensors, None, None, p.E, p.top_k, None, 0, None, "fp4",
                                                           "silu", "modelopt", torch.bfloat16, "off"), 1),
        "output torch.empty": (lambda: torch.empty(p.T, p.H, dtype=torch.bfloat16, device=dev), 1),
        "workspace from the stream's arena": (lambda: fm._workspace(launch.ws_bytes, dev, st), 1),
        "workspace torch.empty (before the arena)": (
            lambda: torch.empty(launch.ws_bytes, dtype=torch.uint8, device=dev), 1),
        "launch arguments (_Launch.arguments)": (
            lambda: launch.arguments(base, base, *tensors, None, a["out"], 0, p.E, st), 1),
        "routing TVM-FFI call": (lambda: launch.route(*route), 1),
        "FC1 TVM-FFI call": (lambda: launch.fc1(*fc1), 1),
        "FC2 TVM-FFI call": (lambda: launch.fc2(*fc2), 1),
        "combine TVM-FFI call": (lambda: launch.combine(*comb), 1),
        "four calls, prebuilt arguments (the floor)": (launch.floor(*run_args), 4),
        "_Launch.run (arena, arguments, four calls)": (lambda: launch.run(*run_args, "off"), 4),
    }
    out = []
    for name, (fn, launches) in pieces.items():
        out.append((name, *time_host(fn, calls=200, launches=launches)))
        print(f"{name:45s} {out[-1][1]:7.2f} us", flush=True)
    return out


def gpu_spans(calls: int = 10) -> list[tuple[str, int, dict, float]]:
    """(layer, T, {kernel: median us}, median call span us) of eager back-to-back calls."""
    from torch.profiler import ProfilerActivity, profile

    out = []
    for layer, T in SPANS:
        p = problem(layer, T)
        fns = [moe_runner.public_launcher(p, c) for c in moe_runner.make_cases(p, 4)]
        for f in fns:
            f()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                for f in fns:
                    f()
            torch.cuda.synchronize()
        evs = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
        per = {}
        for e in evs:
            name = next((n for n in ("Route", "Gemv", "Wgmma", "Gemm", "Combine") if n in e.name), e.name[:40])
            per.setdefault(name, []).append(e.time_range.end - e.time_range.start)
        spans = sorted(evs[i + 3].time_range.end - evs[i].time_range.start for i in range(0, len(evs) - 3, 4))
        med = {n: sorted(d)[len(d) // 2] for n, d in per.items()}
        out.append((layer, T, med, spans[len(spans) // 2]))
        print(layer, T, med, spans[len(spans) // 2], flush=True)
    return out


def markdown(pieces, spans) -> str:
    lines = [f"# fused_moe eager call breakdown on {torch.cuda.get_device_name()}", "",
             "Host µs per piece of a repeated call's fast path (Qwen3-30B-A3B T=1 W4A16, expert-id check off), "
             "each timed alone back to back behind a sleep kernel, median over repeats (benchmarks/fused_moe_host.py).",
             "", "| piece | µs | p20 | p80 |", "|---|---|---|---|"]
    lines += [f"| {n} | {m:.2f} | {lo:.2f} | {hi:.2f} |" for n, m, lo, hi in pieces]
    lines += ["", "GPU: eager calls back to back (torch.profiler); a kernel's duration includes its PDL wait for "
              "its predecessor, so only the call span adds up.", "", "| layer | T | kernel medians (µs) | call span µs |",
              "|---|---|---|---|"]
    lines += [f"| {layer} | {T} | {', '.join(f'{n} {v:.1f}' for n, v in med.items())} | {span:.1f} |"
              for layer, T, med, span in spans]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="fused_moe_host.md")
    args = ap.parse_args()
    text = markdown(host_pieces(), gpu_spans())
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
