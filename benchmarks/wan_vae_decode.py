"""End-to-end WAN VAE decode on the GPU: stock diffusers vs `patch_wan_vae`, both layouts, eager.

    python benchmarks/wan_vae_decode.py [--res 480x832,720x1280] [--frames 9] [--runs 5] [--out FILE.md]

A random-weight `AutoencoderKLWan` (WAN 2.1 config: the class defaults; no download) decodes a random bf16
latent of `frames` video frames. Variants, each timed as the median of `runs` eager `vae.decode` calls
(CUDA-synchronised wall time, after warm-up decodes that compile every kernel):

* stock           diffusers as shipped, NCDHW
* patched         patch_wan_vae(vae): every norm (+ the SiLU after it) one channel-first kernel, NCDHW
* stock_cl        patch_wan_vae(vae, channels_last=True, norms=False): Conv3d weights and inputs
                  channels_last_3d, stock norms
* patched_cl      patch_wan_vae(vae, channels_last=True)
* free, free_cl   every WanRMS_norm and the SiLU after it replaced by identity: the bound a norm can reach

Norm time per decode: CUDA events recorded by forward hooks around each norm module and the SiLU module
that follows it (stock) or the fused module (patched), summed -- the GPU time from a norm's first kernel
to its last, on the one stream the decode runs on. Each norm call's route (channel-first kernel, row
kernel on a channels-last view, torch) is counted. Correctness: the patched decodes against the stock
NCDHW decode of the same latent (bf16 rounds differently once per norm, so not bit-identical).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels.wan_vae_patch import WanFusedRMSNorm, patch_wan_vae, unpatch_wan_vae  # noqa: E402

VARIANTS = ("stock", "patched", "stock_cl", "patched_cl", "free", "free_cl")


def build_vae(seed: int = 0) -> nn.Module:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan().eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 2.0)  # trained gammas are not all ones; keep the affine honest
    return vae.to("cuda", torch.bfloat16)


def _norm_sites(vae: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """(parent, child name, has_silu_after) of every WanRMS_norm, as patch_wan_vae fuses them."""
    from kernels.wan_vae_patch import _FUSED

    sites = []
    for parent in vae.modules():
        names = _FUSED.get(type(parent).__name__, ())
        for name, child in parent.named_children():
            if type(child).__name__ == "WanRMS_norm":
                sites.append((parent, name, name in names and isinstance(parent.nonlinearity, nn.SiLU)))
    return sites


def make_free(vae: nn.Module) -> list:
    """Norms and the SiLUs after them as identity; returns what to put back."""
    undo = []
    for parent, name, silu in _norm_sites(vae):
        undo.append((parent, name, getattr(parent, name)))
        setattr(parent, name, nn.Identity())
        if silu and not any(u[0] is parent and u[1] == "nonlinearity" for u in undo):
            undo.append((parent, "nonlinearity", parent.nonlinearity))
            parent.nonlinearity = nn.Identity()
    return undo


def undo_free(undo: list) -> None:
    for parent, name, m in reversed(undo):
        setattr(parent, name, m)


class NormTimer:
    """CUDA events around every norm call, extended over a stock norm's SiLU when the SiLU takes the norm's
    output (WanResidualBlock / the decoder head); counts the routes the fused module's inputs take."""

    def __init__(self, vae: nn.Module):
        self.pairs: list[list[torch.cuda.Event]] = []  # [start, end] per norm call
        self.routes: dict[str, int] = {}
        self._last_out = None
        self.handles = []
        for m in vae.modules():
            if type(m).__name__ in ("WanRMS_norm", "WanFusedRMSNorm"):
                self.handles += [m.register_forward_pre_hook(self._start), m.register_forward_hook(self._end)]
            elif isinstance(m, nn.SiLU):
                self.handles.append(m.register_forward_hook(self._silu))

    @staticmethod
    def _event() -> torch.cuda.Event:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def _start(self, module, args):
        self.pairs.append([self._event(), None])
        if isinstance(module, WanFusedRMSNorm):
            route = module.route(args[0])
            self.routes[route] = self.routes.get(route, 0) + 1

    def _end(self, module, args, out):
        self.pairs[-1][1] = self._event()
        self._last_out = out

    def _silu(self, module, args, out):
        if self._last_out is not None and args[0] is self._last_out:
            self.pairs[-1][1] = self._event()
        self._last_out = None

    def total_ms(self) -> float:
        torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in self.pairs)

    def remove(self):
        for h in self.handles:
            h.remove()


def decode(vae, z) -> torch.Tensor:
    with torch.inference_mode():
        return vae.decode(z).sample


def time_decode(vae, z, runs: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        decode(vae, z)
    torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        decode(vae, z)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def apply(vae, variant: str):
    """Put `vae` into `variant`; returns the function that takes it back to stock NCDHW."""
    if variant == "stock":
        return lambda: None
    if variant in ("patched", "patched_cl"):
        patch_wan_vae(vae, channels_last=variant == "patched_cl")
        return lambda: unpatch_wan_vae(vae)
    if variant == "stock_cl":
        patch_wan_vae(vae, channels_last=True, norms=False)
        return lambda: unpatch_wan_vae(vae)
    undo = make_free(vae)
    if variant == "free_cl":
        patch_wan_vae(vae, channels_last=True, norms=False)
    return lambda: (unpatch_wan_vae(vae), undo_free(undo))


def measure(vae, height: int, width: int, frames: int, runs: int) -> dict:
    lat_t = 1 + (frames - 1) // 4
    g = torch.Generator(device="cuda").manual_seed(1)
    z = torch.randn(1, 16, lat_t, height // 8, width // 8, generator=g, device="cuda").to(torch.bfloat16)
    ref = decode(vae, z).float()
    out = {"height": height, "width": width, "frames": frames, "latent": list(z.shape), "variants": {}}
    for variant in VARIANTS:
        restore = apply(vae, variant)
        try:
            times = time_decode(vae, z, runs)
            row = {"ms": statistics.median(times), "runs_ms": times}
            if not variant.startswith("free"):
                timer = NormTimer(vae)
                try:
                    y = decode(vae, z).float()
                    row["norm_ms"] = timer.total_ms()
                    row["norm_calls"] = len(timer.pairs)
                    if timer.routes:
                        row["routes"] = dict(timer.routes)
                finally:
                    timer.remove()
                d = (y - ref).abs()
                row["max_abs_diff_vs_stock"] = float(d.max())
                row["rel_l2_vs_stock"] = float((y - ref).norm() / ref.norm())
        finally:
            restore()
        out["variants"][variant] = row
        print(f"{height}x{width} {variant:10s} {row['ms']:8.1f} ms"
              + (f"  norms {row['norm_ms']:6.1f} ms" if "norm_ms" in row else ""), flush=True)
    return out


def markdown(results: list[dict], device: str) -> str:
    lines = [f"# WAN 2.1 VAE decode, random weights, bf16, eager ({device})", "",
             "Generated by `python benchmarks/wan_vae_decode.py`; median of the timed decodes, CUDA-synchronised.",
             "Norm time: CUDA events around each norm (+ the SiLU after it), summed over one decode.", ""]
    for r in results:
        v = r["variants"]
        base = v["stock"]["ms"]
        lines += [f"## {r['height']}x{r['width']}, {r['frames']} frames (latent {'x'.join(map(str, r['latent']))})", "",
                  "| variant | decode ms | speedup vs stock | norm ms | norm share | routes | rel. L2 vs stock |",
                  "|---|---:|---:|---:|---:|---|---:|"]
        for name, row in v.items():
            nm = f"{row['norm_ms']:.1f}" if "norm_ms" in row else "0 (identity)"
            share = f"{100 * row['norm_ms'] / row['ms']:.1f} %" if "norm_ms" in row else "-"
            routes = ", ".join(f"{k} {n}" for k, n in sorted(row.get("routes", {}).items())) or "-"
            err = f"{row['rel_l2_vs_stock']:.2e}" if "rel_l2_vs_stock" in row else "-"
            lines.append(f"| {name} | {row['ms']:.1f} | {base / row['ms']:.2f}x | {nm} | {share} | {routes} | {err} |")
        s, p = v["stock"], v["patched"]
        share_cut = (s["norm_ms"] / s["ms"]) / (v["patched_cl"]["norm_ms"] / v["patched_cl"]["ms"])
        lines += ["", f"- norm time: stock {s['norm_ms']:.1f} ms -> patched {p['norm_ms']:.1f} ms "
                      f"({s['norm_ms'] / p['norm_ms']:.1f}x less), patched_cl {v['patched_cl']['norm_ms']:.1f} ms",
                  f"- norms' share of decode: stock {100 * s['norm_ms'] / s['ms']:.1f} % -> patched_cl "
                  f"{100 * v['patched_cl']['norm_ms'] / v['patched_cl']['ms']:.1f} % ({share_cut:.1f}x smaller)",
                  f"- channels-last convolutions alone (stock_cl vs stock): {s['ms'] / v['stock_cl']['ms']:.2f}x", ""]
        if (r["height"], r["width"]) == (480, 832):
            lines += ["Goals at 480p: " + "; ".join(
                f"{what} {value:.2f}x (goal >= {goal}x: {'met' if value >= goal else 'not met'})" for what, value, goal in (
                    ("whole decode, patched_cl vs stock", base / v["patched_cl"]["ms"], 1.4),
                    ("patched NCDHW vs stock", base / p["ms"], 1.2),
                    ("norms' share cut (patched_cl)", share_cut, 5.0),
                    ("norms' share cut (patched NCDHW)", (s["norm_ms"] / s["ms"]) / (p["norm_ms"] / p["ms"]), 5.0)))
                + f"; bound with free norms in channels-last {base / v['free_cl']['ms']:.2f}x.", ""]
    return "\n".join(lines)


def main_markdown_from_json(path: Path, device: str) -> str:
    """The table again from a saved FILE.json (e.g. after the report format changed)."""
    results = json.loads(path.read_text())
    return markdown(results, results[0].get("device", device))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", default="480x832,720x1280", help="comma-separated HEIGHTxWIDTH")
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, help="write the markdown table here (and FILE.json beside it)")
    ap.add_argument("--from-json", type=Path, help="rewrite --out's table from a saved FILE.json (no GPU needed)")
    ap.add_argument("--device", default="NVIDIA H200", help="with --from-json: the device the JSON was measured on")
    args = ap.parse_args()
    if args.from_json:
        text = main_markdown_from_json(args.from_json, args.device)
        (args.out.write_text(text) if args.out else print(text))
        return
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    vae = build_vae()
    results = []
    for res in args.res.split(","):
        h, w = (int(v) for v in res.lower().split("x"))
        results.append(dict(measure(vae, h, w, args.frames, args.runs), device=torch.cuda.get_device_name()))
    text = markdown(results, torch.cuda.get_device_name())
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
