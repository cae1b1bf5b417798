"""Where an eager fused_moe call's time goes, on the host and on the GPU, in one run:

    python benchmarks/fused_moe_host.py [--out FILE.md]

Host: each piece of the call's fast path (a repeated argument signature) timed alone the way sweep/host_cost.py
times whole calls: N back-to-back calls behind a sleep kernel, median over repeats. The pieces: the signature
key (kernels/fused_moe._call_key), the workspace (the stream's arena, kernels/fused_moe._workspace, against a
torch.empty of the same size), the output's torch.empty, the launch arguments (_Launch.arguments), the layer's
launches with prebuilt arguments (the floor: with LUTFORGE_MOE_LAYER_CALL=1 one TVM-FFI call of the layer
function, kernels/moe_layer_kernel.py), each kernel's own function called alone and the four of them back to
back, and _Launch.run. Qwen3-30B-A3B, T=1, W4A16.

GPU: CUDA-graph replay over rotating cases (> 3x L2) of the call's kernel chain cut after each kernel, with
prebuilt arguments and PDL as the call launches them: the routing launch alone, then with FC1, with FC2 and
with the combine (the whole call), beside the public op. The differences say what each kernel adds to a
call's GPU time (eager spans under a profiler measure the host's launch cadence instead: a call's four
launches take longer on the host than its kernels on the GPU at decode). --fc2-early off,l2,regs times FC2's
early-load modes (kernels/moe_config.FC2_EARLY), --fold off,on the combine as a launch or folded into the
decode GEMV's FC2 (FOLD_COMBINE) and --fc1-early off,on FC1 waiting for the routing tables or routing its tiles
from the ids (FC1_EARLY) side by side on the same cases, every combination of the three; --spans picks the
(layer, T) cases.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import problem_sets  # noqa: E402
from kernels import fused_moe as fm  # noqa: E402
from kernels import moe_config as mc  # noqa: E402
from kernels import moe_runner  # noqa: E402
from kernels.moe_problem import MoEProblem  # noqa: E402
from kernels.ops import _raw_stream  # noqa: E402
from sweep.host_cost import time_host  # noqa: E402
from sweep.timer import l2_bytes, rotation_sets, time_launchers  # noqa: E402

ON_OFF = {"off": False, "on": True}
SPANS = (("qwen3-30b-a3b", 1), ("qwen3-30b-a3b", 8), ("qwen3-30b-a3b", 64), ("gpt-oss-120b", 1),
         ("mixtral-8x7b", 1), ("mixtral-8x7b", 64))


def problem(layer: str, T: int) -> MoEProblem:
    """The moe problem set's `layer` at T tokens, W4A16, uniform routing."""
    ps = problem_sets.load("moe")
    p = dict(zip(ps.moe_names, ps.moe_problems))[layer]
    return replace(p, T=T, quant_mode="w4a16", routing="uniform")


def _bound(p: MoEProblem, a: dict) -> tuple[tuple, object]:
    """A case's tensor arguments in fused_moe's order (x .. w2_alpha) and the _Launch the public op binds for
    them (W4A16, SiLU, no FC2 input scale)."""
    tensors = (a["x"], a["w1_weight"], a["w1_weight_sf"], a["w2_weight"], a["w2_weight_sf"],
               a["token_selected_experts"], a["token_final_scales"], a["w1_alpha"], a["w2_alpha"])
    _, launch = fm._resolve(*tensors, None, a["out"], p.E, p.top_k, p.n_local, 0, "w4a16", "silu", torch.bfloat16,
                            None)
    return tensors, launch


def host_pieces() -> list[tuple[str, float, float, float]]:
    """(piece, median, p20, p80 host us) of the Qwen3-30B-A3B T=1 W4A16 call's fast path."""
    p = problem("qwen3-30b-a3b", 1)
    a = moe_runner.make_case(p).args
    tensors, launch = _bound(p, a)

    def call(output=None):
        return fm.fused_moe(*tensors[:7], p.E, p.top_k, w1_alpha=a["w1_alpha"], w2_alpha=a["w2_alpha"], output=output,
                            quant_mode="w4a16", check_expert_ids="off")

    call(), call(a["out"])
    dev = a["x"].device
    ws = torch.empty(launch.ws_bytes, dtype=torch.uint8, device=dev)
    base, st = ws.data_ptr(), _raw_stream(dev.index)
    run_args = (*tensors, None, a["out"], 0, p.E)
    args = launch.split_arguments(base, base, *tensors, None, a["out"], 0, p.E, st)
    parts = [(f, x) for f, x in zip(launch.parts(), args) if x is not None]  # no combine when FC2 folds it
    names = ("routing", "FC1", "FC2", "combine")
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
        "the call's kernels, prebuilt arguments (the floor)": (launch.floor(*run_args), len(parts)),
        **{f"{n} function alone": (lambda f=f, x=x: f(*x), 1) for n, (f, x) in zip(names, parts)},
        f"the {len(parts)} functions back to back": (lambda: [f(*x) for f, x in parts], len(parts)),
        "_Launch.run (arena, arguments, launches)": (lambda: launch.run(*run_args, "off"), len(parts)),
    }
    out = []
    for name, (fn, launches) in pieces.items():
        out.append((name, *time_host(fn, calls=200, launches=launches)))
        print(f"{name:45s} {out[-1][1]:7.2f} us", flush=True)
    return out


def _chains(p: MoEProblem, case) -> list:
    """The call's kernels with prebuilt arguments over a workspace of their own, filled by one full run:
    [routing], [routing, FC1], [.., FC2], [.., combine] (none when FC2 folds it in) as zero-argument launchers
    (each a chain prefix)."""
    a = case.args
    tensors, launch = _bound(p, a)
    dev = a["x"].device
    ws = torch.empty(launch.ws_bytes, dtype=torch.uint8, device=dev)
    base = ws.data_ptr()
    fns = launch.parts()

    def prefix(n: int):
        def run(ws=ws):  # ws held: the pointers stay valid; the stream is the current one (a graph captures)
            args = launch.split_arguments(base, base + launch.off["bad"], *tensors, None, a["out"], 0, p.E,
                                          _raw_stream(dev.index))
            for f, x in zip(fns[:n], args[:n]):
                f(*x)
        return run
    chains = [prefix(n) for n in range(1, 4 if launch.spec.combine is None else 5)]
    chains[-1]()
    return chains


def gpu_chain(layer: str, T: int, variants) -> dict[tuple[str, bool, bool], tuple[list[float], float]]:
    """Per (FC2 early-load mode, fold, FC1 early) variant (kernels.moe_config.FC2_EARLY, FOLD_COMBINE, FC1_EARLY):
    CUDA-graph replay medians (us) of the call's kernel chain cut after each kernel (routing; + FC1; + FC2;
    + combine, absent when folded), over rotating cases (> 3x L2, as benchmarks/fused_moe.py), and of the public
    op itself; every variant on the same cases, one after another."""
    p = problem(layer, T)
    first = moe_runner.make_case(p)
    cases = [first] + moe_runner.make_cases(p, rotation_sets(max(1, first.nbytes), l2_bytes()) - 1, seed=1)
    out = {}
    for mode, fold, fc1_early in variants:
        with fm.kernel_variant(mode, fold, fc1_early):
            per_case = [_chains(p, c) for c in cases]
            torch.cuda.synchronize()
            cut = [time_launchers([ch[n] for ch in per_case], set_bytes=first.nbytes).median_us
                   for n in range(len(per_case[0]))]
            public = time_launchers([moe_runner.public_launcher(p, c, "off") for c in cases],
                                    set_bytes=first.nbytes).median_us
        out[mode, fold, fc1_early] = (cut, public)
        print(layer, T, mode, "folded" if fold else "", "fc1-ids" if fc1_early else "", [f"{v:.1f}" for v in cut],
              f"public {public:.1f}", flush=True)
    return out


def markdown(pieces, spans) -> str:
    lines = [f"# fused_moe eager call breakdown on {torch.cuda.get_device_name()}"]
    if pieces:  # not under --gpu-only
        lines += ["", "Host µs per piece of a repeated call's fast path (Qwen3-30B-A3B T=1 W4A16, expert-id check "
                  "off), each timed alone back to back behind a sleep kernel, median over repeats "
                  "(benchmarks/fused_moe_host.py).", "", "| piece | µs | p20 | p80 |", "|---|---|---|---|"]
        lines += [f"| {n} | {m:.2f} | {lo:.2f} | {hi:.2f} |" for n, m, lo, hi in pieces]
    lines += ["", "GPU: CUDA-graph replay medians over rotating cases (> 3x L2) of the call's kernel chain cut after "
              "each kernel (prebuilt arguments, PDL as the call launches them): what each kernel adds to the chain, "
              "and the public op (W4A16, uniform routing, expert-id check off).", "",
              "| layer | T | FC1 routing | FC2 early loads | combine | routing | + FC1 | + FC2 | + combine (all four) "
              "| public op |", "|---|---|---|---|---|---|---|---|---|---|"]
    for layer, T, by_variant in spans:
        for (mode, fold, fc1_early), (cut, pub) in by_variant.items():
            cells = [f"{v:.1f}" for v in cut] + ["–"] * (4 - len(cut))
            lines.append(f"| {layer} | {T} | {'from ids' if fc1_early else 'tables'} | {mode} | "
                         f"{'in FC2' if fold else 'launch'} | {' | '.join(cells)} | {pub:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="fused_moe_host.md")
    ap.add_argument("--gpu-only", action="store_true", help="only the kernel-chain table (no host pieces)")
    ap.add_argument("--fc2-early", default=mc.FC2_EARLY, help="FC2 early-load modes to time side by side, comma "
                                                              "list of off, l2, regs (default: the current one)")
    ap.add_argument("--fold", default="on" if mc.FOLD_COMBINE else "off",
                    help="the combine as a launch (off) or folded into the decode GEMV's FC2 (on), comma list "
                         "(default: the current one); the host pieces run as the process is configured")
    ap.add_argument("--fc1-early", default="on" if mc.FC1_EARLY else "off",
                    help="FC1 routing from the tables (off) or from the ids (on), comma list (default: the current)")
    ap.add_argument("--spans", default=",".join(f"{layer}:{T}" for layer, T in SPANS),
                    help="the kernel-chain cases, comma list of layer:T (default: %(default)s)")
    args = ap.parse_args()
    modes = tuple(m.strip() for m in args.fc2_early.split(",") if m.strip())
    bad = [m for m in modes if m not in mc.FC2_EARLY_MODES]
    if bad or not modes:  # before anything runs
        ap.error(f"--fc2-early takes a comma list of {', '.join(mc.FC2_EARLY_MODES)}, got {args.fc2_early!r}")
    switches = []
    for name, value in (("--fold", args.fold), ("--fc1-early", args.fc1_early)):
        picked = tuple(f.strip() for f in value.split(",") if f.strip())
        if not picked or any(f not in ON_OFF for f in picked):
            ap.error(f"{name} takes a comma list of {', '.join(ON_OFF)}, got {value!r}")
        switches.append([ON_OFF[f] for f in picked])
    try:
        cases = [(layer, int(T)) for layer, T in (c.strip().rsplit(":", 1) for c in args.spans.split(",") if c.strip())]
        for layer, T in cases:  # each a layer of the moe set
            problem(layer, T)
    except (ValueError, KeyError) as e:
        ap.error(f"--spans takes a comma list of layer:T of the moe problem set, got {args.spans!r} ({e})")
    variants = list(itertools.product(modes, *switches))
    spans = [(layer, T, gpu_chain(layer, T, variants)) for layer, T in cases]
    text = markdown([] if args.gpu_only else host_pieces(), spans)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
