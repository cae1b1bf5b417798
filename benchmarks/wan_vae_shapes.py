"""The norm shapes of diffusers' WAN VAE decoders: `wan_vae_norm_shapes(config, height, width, frames)`.

    python benchmarks/wan_vae_shapes.py                 # the table: WAN 2.1 and 2.2 at 480x832 and 720x1280
    python benchmarks/wan_vae_shapes.py --literal       # the WAN_VAE_NORM_SHAPES literal of kernels/wan_vae_norm_shapes.py

Needs diffusers (pure Python). The model is built on the meta device: no weights are downloaded or allocated
and the decode computes nothing, it only propagates shapes (and strides) through forward hooks on every
WanRMS_norm. The [axes] problem-set TOML format (problem_sets/) crosses hidden x tokens, which cannot express
these per-norm (C, N, S) triples, so they live as a generated list in kernels/wan_vae_norm_shapes.py instead.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter, namedtuple
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels import channel_first_op as cfo  # noqa: E402
from kernels.wan_vae_patch import WAN21_VAE_CONFIG, WAN_VAE_CONFIGS  # noqa: E402

RESOLUTIONS = ((480, 832), (720, 1280))  # (height, width): WAN's 480p and 720p (1280x720) video sizes
FRAMES = 81  # WAN's default clip: 21 latent frames

NormShape = namedtuple("NormShape", "C T H W layout N S calls")
NormShape.__doc__ = """One distinct input of the decoder's norms: C channels, T frames of H x W; layout "cthw"
(contiguous [B, C, T, H, W]), "tchw" (frame-major memory: an upsampler's permuted output) or "image" (the
attention block's [B*T, C, H, W]); the kernel's view [N, C, S]; how many norm calls see it in one decode."""


def _layout(x: torch.Tensor) -> str:
    if x.dim() == 4:
        return "image"
    if x.is_contiguous():
        return "cthw"
    view = cfo.channel_first_view(x)
    return "tchw" if view is not None and view[1] == x.shape[-1] * x.shape[-2] else "other"


def wan_vae_norm_shapes(config: dict | None = None, height: int = 480, width: int = 832, frames: int = FRAMES,
                        batch: int = 1) -> list[NormShape]:
    """The inputs every decoder WanRMS_norm sees while `AutoencoderKLWan(**config).decode` turns the latent of
    `frames` video frames at height x width back into pixels, with diffusers' frame-chunked decode (one latent
    frame per decoder call, the causal cache carrying the rest: T per chunk is 1 on the first chunk and grows
    through the temporal upsamplers on later ones). Sorted by (C, T, H, W, layout)."""
    from diffusers.models.autoencoders import autoencoder_kl_wan as wan

    with torch.device("meta"):
        vae = wan.AutoencoderKLWan(**dict(WAN21_VAE_CONFIG if config is None else config))
    c = vae.config
    sf_s, sf_t = c.scale_factor_spatial or 8, c.scale_factor_temporal or 4
    if height % sf_s or width % sf_s:
        raise ValueError(f"height and width must be multiples of the spatial compression {sf_s}")
    seen: Counter = Counter()

    def hook(module, inputs, output):
        x = inputs[0]
        view = cfo.channel_first_view(x)
        N, S = (view[0], view[1]) if view is not None else (0, 0)
        if x.dim() == 4:
            key = (x.shape[1], x.shape[0], x.shape[2], x.shape[3], "image", N, S)
        else:
            key = (x.shape[1], x.shape[2], x.shape[3], x.shape[4], _layout(x), N, S)
        seen[key] += 1

    handles = [m.register_forward_hook(hook) for m in vae.decoder.modules() if isinstance(m, wan.WanRMS_norm)]
    try:
        z = torch.empty(batch, c.z_dim, 1 + (frames - 1) // sf_t, height // sf_s, width // sf_s, device="meta")
        with torch.no_grad():
            vae.decode(z)
    finally:
        for h in handles:
            h.remove()
    return [NormShape(*k, calls=n) for k, n in sorted(seen.items(), key=lambda kv: kv[0][:5])]


def format_norm_shapes(shapes: list[NormShape]) -> str:
    """One tuple literal per line (how WAN_VAE_NORM_SHAPES is written)."""
    return "\n".join(f"    ({s.C}, {s.T}, {s.H}, {s.W}, {s.layout!r}, {s.N}, {s.S}, {s.calls})," for s in shapes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--literal", action="store_true", help="print the Python literal for kernels/wan_vae_norm_shapes.py")
    ap.add_argument("--frames", type=int, default=FRAMES)
    args = ap.parse_args()
    if args.literal:
        print("WAN_VAE_NORM_SHAPES: dict[tuple[str, int, int], tuple[tuple, ...]] = {")
    for model, cfg in WAN_VAE_CONFIGS.items():
        for h, w in RESOLUTIONS:
            shapes = wan_vae_norm_shapes(cfg, h, w, args.frames)
            if args.literal:
                print(f"    ({model!r}, {h}, {w}): (")
                print("\n".join("    " + line for line in format_norm_shapes(shapes).splitlines()))
                print("    ),")
                continue
            print(f"{model} {w}x{h}, {args.frames} frames: {sum(s.calls for s in shapes)} norm calls")
            print(f"  {'C':>5} {'T':>2} {'H':>4} {'W':>5} {'layout':6} {'N':>2} {'S':>8} {'calls':>5}")
            for s in shapes:
                print(f"  {s.C:5d} {s.T:2d} {s.H:4d} {s.W:5d} {s.layout:6} {s.N:2d} {s.S:8d} {s.calls:5d}")
    if args.literal:
        print("}")


if __name__ == "__main__":
    main()
