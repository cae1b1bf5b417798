"""fused_moe on the GPU against its rooflines and the torch baseline, in one run:

    python benchmarks/fused_moe.py [--layers qwen3-30b-a3b,deepseek-v3] [--tokens 1,8,64,4096,16384]
                                   [--quant nvfp4,w4a16] [--splits 1,2,4,8] [--out FILE.md]

Measured in the same process, first: the device-to-device copy bandwidth (sweep.timer.copy_roofline) and the
dense bf16 matrix rate (torch.mm 8192^3, CUDA-graph replay, median). Then per (layer of the moe problem set,
T, quant mode), uniform routing:

* lutforge        the public op as serving code calls it (LUT entry or heuristic), CUDA-graph replay over
                  rotating cases (routing drawn per case, so the experts read rotate too: kernels/moe_runner.py)
* torch_grouped   the same layer with the weights dequantised to bf16 through torch._grouped_mm (W4A16:
                  torch has no FP4 activations)
* host            microseconds per eager call of fused_moe (the default expert-id check, which does not sync,
                  and no check), of its four kernel launches alone with prebuilt arguments (the floor) and of
                  the torch baseline, N back-to-back calls with the GPU held busy (sweep/host_cost.py)
* fc2 split-K     at decode (T <= 64), with --splits: the config lutforge chose with FC2's split-K forced to
                  each valid value (kernels/moe_config.py's split_heuristic threshold, checked on the device)

Each lutforge output is first checked against the float64 reference (kernels/moe_runner.check). The targets of
the fused-MoE issue: decode (T <= 64) at >= 70 % of the weight-bytes roofline (the FP4 weights and scales of
the experts a call routes to, read once, at the measured copy bandwidth: kernels/moe_problem.ideal_bytes);
T >= 4096 at >= 50 % of the measured dense bf16 rate (kernels/moe_problem.flops over the time).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import problem_sets  # noqa: E402
from dataclasses import replace  # noqa: E402

from kernels import dispatch, ops  # noqa: E402
from kernels import fused_moe as fm  # noqa: E402
from kernels import moe_config as mc  # noqa: E402
from kernels import moe_problem as mp  # noqa: E402
from kernels import moe_runner  # noqa: E402
from sweep import host_cost, peers  # noqa: E402
from sweep.timer import copy_roofline, l2_bytes, rotation_sets, time_launchers  # noqa: E402

DECODE_T, BATCH_T = 64, 4096
DECODE_GOAL, BATCH_GOAL = 0.70, 0.50
MM_N = 8192


def mm_rate_tflops() -> float:
    """Dense bf16 torch.mm 8192^3, median of graph replays: the matrix rate the large batches are judged by."""
    a = torch.randn(MM_N, MM_N, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(MM_N, MM_N, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(MM_N, MM_N, device="cuda", dtype=torch.bfloat16)
    t = time_launchers([lambda: torch.mm(a, b, out=c)], set_bytes=3 * MM_N * MM_N * 2)
    return 2 * MM_N**3 / (t.median_us * 1e-6) / 1e12


def timed(p, make_launch) -> float:
    """Median microseconds of one call over rotating cases (> 3x L2 of touched bytes)."""
    first = moe_runner.make_case(p)
    sets = rotation_sets(max(1, first.nbytes), l2_bytes())
    cases = [first] + moe_runner.make_cases(p, sets - 1, seed=1)
    return time_launchers([make_launch(c) for c in cases], set_bytes=first.nbytes).median_us


def bench(p, copy_gbps: float, tflops: float, splits: tuple[int, ...] = (), tiles: tuple[str, ...] = (),
          switches: tuple[str, ...] = ()) -> dict:
    row = {"layer": mp.layer_label(p), "T": p.T, "quant_mode": p.quant_mode, "activation": p.activation}
    case = moe_runner.make_case(p, seed=7)
    moe_runner.public_launcher(p, case)()
    torch.cuda.synchronize()
    chosen = fm._SELECTED.get((p, case.args["x"].device.index))  # the LUT entry or heuristic the call took
    row["config"] = chosen.short() if chosen is not None else None
    res = moe_runner.check(p, case)
    row["check"] = res.message
    if not res.ok:
        row["status"] = "wrong_result"
        return row
    us = timed(p, lambda c: moe_runner.public_launcher(p, c))
    if chosen is not None and p.T <= DECODE_T:
        row.update(split_times(p, chosen, splits))
    if tiles:
        row.update(tile_times(p, tiles))
    if switches:
        cfg = switched_heuristic(p, switches)
        row["switched_config"] = cfg.short()
        row["switched_us"] = forced_time(p, cfg)
    row.update(status="ok", lutforge_us=us, ideal_bytes=mp.ideal_bytes(p), flops=mp.flops(p))
    row["pct_weight_roofline"] = 100 * mp.ideal_bytes(p) / (us * 1e-6) / (copy_gbps * 1e9)
    row["pct_mm_rate"] = 100 * mp.flops(p) / (us * 1e-6) / (tflops * 1e12)
    if peers.unsupported(p, "torch_eager") is None:
        row["torch_grouped_us"] = timed(p, lambda c: peers.build("torch_eager", p, c)[0])
        row["speedup_vs_torch"] = row["torch_grouped_us"] / us
    for r in host_cost.measure(p, impls=("lutforge", "lutforge_unchecked", "lutforge_launch", "torch_eager")):
        row[f"host_{r['impl']}_us"] = r.get("host_us")
    return row


_POOL = []


def _pool() -> ProcessPoolExecutor:
    if not _POOL:
        _POOL.append(ProcessPoolExecutor(min(8, os.cpu_count() or 1), mp_context=multiprocessing.get_context("spawn")))
    return _POOL[0]


def parse_tile(text: str) -> mc.MoEGemmConfig:
    """'BMxBNxBK/STAGES/WMxWN[/MMA]' (e.g. 32x32x128/4/2x2, 128x128x64/4/4x2/wgmma, 8x64x64/2/1x4/gemv) -> the
    GEMM config both GEMMs of a forced layer take (MMA: mma.sync by default)."""
    try:
        tile, stages, warps, *mma = text.split("/")
        bm, bn, bk = (int(v) for v in tile.split("x"))
        wm, wn = (int(v) for v in warps.split("x"))
        if mma and mma[0] not in ("sync", "wgmma", "gemv") or len(mma) > 1:
            raise ValueError(text)
        return mc.MoEGemmConfig(bm, bn, bk, int(stages), wm, wn, mma=mma[0] if mma else "sync")
    except ValueError:
        raise SystemExit(f"--tiles takes BMxBNxBK/STAGES/WMxWN[/MMA] entries, got {text!r}") from None


def parse_tiles(text: str) -> tuple[mc.MoEGemmConfig, mc.MoEGemmConfig]:
    """'TILE' (both GEMMs) or 'FC1TILE:FC2TILE' (parse_tile each; they must share bm and stages)."""
    parts = text.split(":")
    if len(parts) > 2:
        raise SystemExit(f"--tiles entries are TILE or FC1TILE:FC2TILE, got {text!r}")
    return parse_tile(parts[0]), parse_tile(parts[-1])


SWITCHES = {"gemv": "GEMV_DECODE", "wgmma": "WGMMA_LARGE_BATCH"}


def switched_heuristic(p, switches: tuple[str, ...]) -> mc.MoEConfig:
    """The layer config kernels/moe_config.py's heuristic picks with the backend switches named in `switches`
    (SWITCHES) flipped: what the other setting would ship for problems the LUT does not hold (a switch that is
    on is timed against the backend it replaced)."""
    saved = {name: getattr(mc, name) for name in SWITCHES.values()}
    try:
        for s in switches:
            setattr(mc, SWITCHES[s], not saved[SWITCHES[s]])
        shapes = mc.gemm_shapes(p.quant_mode, p.activation, p.H, p.I)
        return mc.layer_heuristic(shapes, mp.rows_per_expert(p), mp.expected_experts_touched(p))
    finally:
        for name, value in saved.items():
            setattr(mc, name, value)


def tile_times(p, tiles: tuple[str, ...]) -> dict:
    """Median µs of the layer with both GEMMs forced to each tile of `tiles` the layer allows (FC2's split-K by
    the heuristic for that tile), each output checked: the evidence for the heuristic's tiles and backends."""
    shapes = mc.gemm_shapes(p.quant_mode, p.activation, p.H, p.I)
    runs = {}
    for text in tiles:
        g1, g2 = parse_tiles(text)
        fc2 = mc.with_splits(shapes[1], g2, mp.rows_per_expert(p), mp.expected_experts_touched(p))
        forced = mc.MoEConfig.of(g1, fc2)
        bad = mc.layer_violations(shapes, forced)
        if bad:  # named, not dropped silently: a tile given without /gemv is an mma.sync tile, often invalid here
            print(f"tile {text} skipped at E{p.E} H{p.H} I{p.I} T={p.T}: {'; '.join(bad)}", file=sys.stderr)
        else:
            runs[text] = forced
    # the kernels compiled side by side into the disk cache first (serially they took most of the run)
    list(_pool().map(fm.precompile_layer, [p] * len(runs), list(runs.values()), ["sm_90a"] * len(runs)))
    return {f"tile {text}{' k%d' % f.fc2_splits if f.fc2_splits > 1 else ''}": forced_time(p, f)
            for text, f in runs.items()}


def forced_time(p, cfg) -> float:
    """Median µs of the layer with its config forced to `cfg`, NaN when its output fails the check."""
    case = moe_runner.make_case(p, seed=11)
    moe_runner.launcher(p, cfg, case)()
    torch.cuda.synchronize()
    if not moe_runner.check(p, case).ok:
        return float("nan")
    return timed(p, lambda c: moe_runner.launcher(p, cfg, c))


def split_times(p, cfg, splits: tuple[int, ...]) -> dict:
    """Median µs of `cfg` with FC2's split-K forced to each of `splits` the layer allows, each output checked."""
    shapes = mc.gemm_shapes(p.quant_mode, p.activation, p.H, p.I)
    forced = {s: replace(cfg, fc2_splits=s) for s in splits}
    return {f"fc2_split{s}_us": forced_time(p, f) for s, f in forced.items() if not mc.layer_violations(shapes, f)}


def markdown(rows: list[dict], copy_gbps: float, tflops: float, device: str) -> str:
    lines = [f"# fused_moe on {device}", "",
             f"Copy roofline {copy_gbps:.0f} GB/s; dense bf16 torch.mm {MM_N}^3 {tflops:.0f} TFLOPS (same run).", "",
             "| layer | T | quant | µs | % weight roofline | % mm rate | torch grouped µs | speedup | "
             "host µs (checked / unchecked / launch floor / torch) | check |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['layer']} | {r['T']} | {r['quant_mode']} | – | – | – | – | – | – | {r['check']} |")
            continue
        f = lambda k, spec: format(r[k], spec) if r.get(k) is not None else "–"  # noqa: E731
        lines.append(f"| {r['layer']} | {r['T']} | {r['quant_mode']} | {r['lutforge_us']:.1f} | "
                     f"{r['pct_weight_roofline']:.1f} | {r['pct_mm_rate']:.1f} | {f('torch_grouped_us', '.1f')} | "
                     f"{f('speedup_vs_torch', '.2f')} | {f('host_lutforge_us', '.0f')} / "
                     f"{f('host_lutforge_unchecked_us', '.0f')} / {f('host_lutforge_launch_us', '.0f')} / "
                     f"{f('host_torch_eager_us', '.0f')} | {r['check']} |")
    dec = [r for r in rows if r["status"] == "ok" and r["T"] <= DECODE_T]
    big = [r for r in rows if r["status"] == "ok" and r["T"] >= BATCH_T]
    split_cols = sorted({k for r in dec for k in r if k.startswith("fc2_split")},
                        key=lambda k: int(k[len("fc2_split"):-len("_us")]))
    if split_cols:
        lines += ["", "FC2 split-K at decode (µs; the chosen config with fc2_splits forced):", "",
                  "| layer | T | quant | config | " + " | ".join(f"k{c[len('fc2_split'):-len('_us')]}"
                                                             for c in split_cols) + " |",
                  "|---|---|---|---|" + "---|" * len(split_cols)]
        for r in dec:
            cfg = (r.get("config") or "–").replace("|", "/")
            lines.append(f"| {r['layer']} | {r['T']} | {r['quant_mode']} | {cfg} | "
                         + " | ".join(format(r[c], ".1f") if c in r else "–" for c in split_cols) + " |")
    tiled = [r for r in rows if r["status"] == "ok"]
    tile_cols = list(dict.fromkeys(k for r in tiled for k in r if k.startswith("tile ")))
    if tile_cols:
        lines += ["", "Forced tiles (µs; both GEMMs forced to the tile, FC2 split by the heuristic; NaN: wrong "
                  "result):", "",
                  "| layer | T | quant | chosen µs | " + " | ".join(c[len("tile "):] for c in tile_cols) + " |",
                  "|---|---|---|---|" + "---|" * len(tile_cols)]
        for r in tiled:
            lines.append(f"| {r['layer']} | {r['T']} | {r['quant_mode']} | {r['lutforge_us']:.1f} | "
                         + " | ".join(format(r[c], ".1f") if c in r else "–" for c in tile_cols) + " |")
    switched = [r for r in rows if r["status"] == "ok" and "switched_us" in r]
    if switched:
        lines += ["", "The heuristic with backend switches flipped (forced, checked; NaN: wrong result):", "",
                  "| layer | T | quant | chosen | µs | switched config | µs | speedup |", "|---|---|---|---|---|---|---|---|"]
        for r in switched:
            lines.append(f"| {r['layer']} | {r['T']} | {r['quant_mode']} | {r.get('config') or '–'} | "
                         f"{r['lutforge_us']:.1f} | {r['switched_config']} | {r['switched_us']:.1f} | "
                         f"{r['lutforge_us'] / r['switched_us']:.2f} |")
    lines += [""]
    if dec:
        worst = min(r["pct_weight_roofline"] for r in dec)
        lines.append(f"Decode (T <= {DECODE_T}): lowest {worst:.1f} % of the weight-bytes roofline; goal "
                     f">= {100 * DECODE_GOAL:.0f} %: {'met' if worst >= 100 * DECODE_GOAL else 'not met'}.")
    if big:
        worst = min(r["pct_mm_rate"] for r in big)
        lines.append(f"Large batches (T >= {BATCH_T}): lowest {worst:.1f} % of the dense bf16 rate; goal "
                     f">= {100 * BATCH_GOAL:.0f} %: {'met' if worst >= 100 * BATCH_GOAL else 'not met'}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", default="qwen3-30b-a3b,mixtral-8x7b,deepseek-v3,gpt-oss-120b")
    ap.add_argument("--tokens", default="1,8,64,512,4096,16384")
    ap.add_argument("--quant", default="nvfp4,w4a16")
    ap.add_argument("--splits", default="", help="FC2 split-K values to time at decode, e.g. 1,2,4,8 (default: none)")
    ap.add_argument("--tiles", default="", help="tiles to time beside the chosen config, comma list of "
                                                "BMxBNxBK/STAGES/WMxWN[/MMA] (e.g. 32x32x128/4/2x2, "
                                                "128x128x64/4/4x2/wgmma, 8x64x64/2/1x4/gemv), each for both "
                                                "GEMMs or as FC1TILE:FC2TILE")
    ap.add_argument("--switches", default="", help="also time the heuristic's choice with these backend switches "
                                                   f"flipped, comma list of {', '.join(SWITCHES)}")
    ap.add_argument("--out", default="fused_moe.md")
    args = ap.parse_args()
    ps = problem_sets.load("moe")
    layers = {name: p for name, p in zip(ps.moe_names, ps.moe_problems)}
    want = [s.strip() for s in args.layers.split(",") if s.strip()]
    unknown = [w for w in want if w not in layers]
    if unknown:
        raise SystemExit(f"unknown layers {unknown}; the moe set has {sorted(layers)}")
    splits = tuple(int(s) for s in args.splits.split(",") if s.strip())
    tiles = tuple(t.strip() for t in args.tiles.split(",") if t.strip())
    for t in tiles:
        parse_tiles(t)
    switches = tuple(s.strip() for s in args.switches.split(",") if s.strip())
    if set(switches) - set(SWITCHES):
        raise SystemExit(f"--switches takes {', '.join(SWITCHES)}, got {args.switches!r}")
    copy = copy_roofline().gbps
    tflops = mm_rate_tflops()
    problems = [mp.MoEProblem(layers[name].op, T, layers[name].E, layers[name].top_k, layers[name].H,
                              layers[name].I, q, layers[name].activation, "uniform")
                for name in want for T in (int(t) for t in args.tokens.split(",")) for q in args.quant.split(",")]
    # the kernels every row times (the dispatched config, the switched one) compiled side by side into the
    # disk cache first: one by one in this process they took most of a run
    sm, dev_class, _ = ops._device_info(torch.device("cuda"))
    jobs = [(p, dispatch.default_dispatcher().lookup(p, sm, dev_class).config) for p in problems]
    jobs += [(p, switched_heuristic(p, switches)) for p in problems if switches]
    list(_pool().map(fm.precompile_layer, *zip(*jobs), ["sm_90a"] * len(jobs)))
    rows = []
    for p in problems:
        rows.append(bench(p, copy, tflops, splits, tiles, switches))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.write_text(markdown(rows, copy, tflops, torch.cuda.get_device_name()))
    out.with_suffix(".json").write_text(json.dumps({"copy_gbps": copy, "mm_tflops": tflops, "rows": rows}, indent=1))
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
