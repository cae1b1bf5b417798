"""Run diffusers' WAN VAE norms through the channel-first kernel: `patch_wan_vae(vae)` / `unpatch_wan_vae(vae)`.

`AutoencoderKLWan` normalises [B, C, T, H, W] activations over C with `WanRMS_norm` (fp32 F.normalize over
dim 1, times sqrt(C) * gamma, plus bias) and applies SiLU as a separate module: `WanResidualBlock` calls
`self.nonlinearity` (nn.SiLU) right after `norm1` and after `norm2`, the decoder and encoder right after
`norm_out`; `WanAttentionBlock.norm` has no SiLU after it. The patch replaces each WanRMS_norm with a
`WanFusedRMSNorm` holding the *same* parameters (state_dict keys and values unchanged) that calls
`kernels.channel_first_op.channel_first_rmsnorm(..., l2norm=True, silu=...)`, and the SiLU module of the
blocks whose norms now fuse it with nn.Identity. A call the kernel cannot take (CPU tensors, fp32, mixed
dtypes, autograd) computes the same fused maths in torch (fp32, one rounding), so the patched model runs
anywhere. `unpatch_wan_vae` puts the original modules back.

channels_last=True also converts every Conv3d weight to torch.channels_last_3d (Conv2d: channels_last)
and, through forward pre-hooks, the 5D inputs of the encoder, decoder and post_quant_conv, so cuDNN runs
channels-last convolutions and most norms see channels-last tensors: memory [positions, C] rows, which go
to the row kernel (kernels.ops.fused_rmsnorm_silu / rmsnorm) on a zero-copy view. The row kernel is
RMSNorm, so those norms compute sqrt(C) * x / sqrt(||x||^2 + eps^2) * gamma (RMSNorm's own sqrt(C), weight
gamma, eps' = eps^2 / C: `row_args`) instead of F.normalize's x / max(||x||, eps) * sqrt(C): both 0 at x = 0, within 0.5 % when
||x|| > 10 eps = 1e-11 or < 1e-13, at most 1/sqrt(2) apart at ||x|| = eps -- i.e. the same for any position
of a real activation (bf16 tolerance), not bit-for-bit F.normalize. Modules with a bias take torch there.
Norm inputs that stay channel-first (the attention block's [B*T, C, H, W] copy) keep the exact kernel.

Modules are recognised by class name (kernels/ imports no diffusers). The shapes every decoder norm sees are
recorded by benchmarks/wan_vae_shapes.py (forward hooks during a meta-device decode) and kept in
kernels/wan_vae_norm_shapes.py as WAN_VAE_NORM_SHAPES.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import channel_first as cf
from . import channel_first_op as cfo

_STATE = "_lutforge_wan_patch"
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)

# diffusers' AutoencoderKLWan configs. WAN 2.1 (and WAN 2.2 A14B) use the class defaults: base_dim 96,
# z_dim 16, dim_mult [1, 2, 4, 4], num_res_blocks 2, temperal_downsample [False, True, True], spatial 8x,
# temporal 4x. The WAN 2.2 TI2V-5B VAE (Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/config.json, as in diffusers'
# scripts/convert_wan_to_diffusers.py) is wider, residual (WanResidualUpBlock with DupUp3D shortcuts) and
# patchified 2x2: 16x spatial compression, a decoder of base 256 (channels 1024, 512, 256).
WAN21_VAE_CONFIG: dict = {}
WAN22_VAE_CONFIG: dict = {
    "base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
    "attn_scales": [], "temperal_downsample": [False, True, True], "dropout": 0.0, "is_residual": True,
    "in_channels": 12, "out_channels": 12, "patch_size": 2, "scale_factor_spatial": 16,
    "scale_factor_temporal": 4,
}
WAN_VAE_CONFIGS = {"wan2.1": WAN21_VAE_CONFIG, "wan2.2": WAN22_VAE_CONFIG}


class WanFusedRMSNorm(nn.Module):
    """A WanRMS_norm (optionally with the SiLU that follows it) as one channel-first kernel launch.

    Holds the original's `gamma` (and `bias`) Parameter objects under the same names, so state_dict keys,
    loading and parameter sharing are unchanged."""

    def __init__(self, norm: nn.Module, silu: bool):
        super().__init__()
        self.gamma = norm.gamma
        if isinstance(norm.bias, nn.Parameter):
            self.bias = norm.bias
        else:
            self.bias = None
        self.scale = norm.scale
        self.channel_first = norm.channel_first
        self.silu = silu
        self.eps = cf.F_NORMALIZE_EPS  # F.normalize's default, as WanRMS_norm calls it
        self.__dict__["_lutforge_original"] = norm  # not a submodule: keeps the state_dict as it was

    def extra_repr(self) -> str:
        return f"C={self.gamma.numel()}, silu={self.silu}, bias={self.bias is not None}"

    def route(self, x: torch.Tensor) -> str:
        """Which path forward takes: "channel_first" (the exact F.normalize kernel), "rows" (channels-last
        memory: the row kernel on a zero-copy view, no bias) or "torch" (anything the kernels cannot take)."""
        g, b = self.gamma, self.bias
        if (x.is_cuda and x.dtype in _KERNEL_DTYPES and g.dtype == x.dtype and (b is None or b.dtype == x.dtype)
                and x.dim() >= 3 and x.numel()
                and not (torch.is_grad_enabled() and (x.requires_grad or g.requires_grad
                                                      or (b is not None and b.requires_grad)))):
            view, rows = cfo.channel_first_view(x), cfo._channels_last_rows(x)
            if view is not None and (view[1] > 1 or rows is None):
                return "channel_first"
            if b is None and rows is not None:
                return "rows"
        return "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.route(x)
        if route == "channel_first":
            return cfo.channel_first_rmsnorm(x, self.gamma, self.bias, self.eps, silu=self.silu, l2norm=True)
        if route == "rows":
            weight, eps = self.row_args(x.shape[1])
            return cfo.channel_first_rmsnorm(x, weight, None, eps, silu=self.silu)
        return self.torch_forward(x)

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fused maths in torch: WanRMS_norm's fp32 normalize, the affine and SiLU, one final rounding."""
        C = x.shape[1]
        shape = (1, C) + (1,) * (x.dim() - 2)
        s = x.float() if x.dtype != torch.float64 else x
        y = F.normalize(s, dim=1, eps=self.eps) * self.scale * self.gamma.reshape(shape).to(s.dtype)
        if self.bias is not None:
            y = y + self.bias.reshape(shape).to(s.dtype)
        if self.silu:
            y = F.silu(y)
        return y.to(x.dtype)

    def row_args(self, C: int) -> tuple[torch.Tensor, float]:
        """(weight, eps) of the RMSNorm that matches this norm on the rows route: RMSNorm's rsqrt(mean + eps')
        already carries the sqrt(C) (x * sqrt(C) / sqrt(||x||^2 + C eps')), so the weight is gamma itself
        and eps' = eps^2 / C."""
        return self.gamma, self.eps ** 2 / C


# Which norms of which block are followed directly by the block's `nonlinearity` (diffusers'
# autoencoder_kl_wan.py: WanResidualBlock.forward, WanDecoder3d.forward / WanEncoder3d.forward "## head").
_FUSED = {"WanResidualBlock": ("norm1", "norm2"), "WanDecoder3d": ("norm_out",), "WanEncoder3d": ("norm_out",)}


def _is_wan_norm(m) -> bool:
    return type(m).__name__ == "WanRMS_norm" and getattr(m, "channel_first", False)


def patch_wan_vae(vae: nn.Module, channels_last: bool = False, norms: bool = True) -> int:
    """Route every channel-first WanRMS_norm of `vae` (an AutoencoderKLWan, or any module containing WAN VAE
    blocks) through the channel-first kernel, fusing the SiLU that follows it; returns how many norms were
    replaced. Idempotent (a patched model is left as it is). channels_last: see the module docstring.
    norms=False leaves the norms as they are and only converts the layout (with channels_last=True): the
    stock model in channels-last, to tell what the layout buys from what the fused norms buy."""
    if not isinstance(vae, nn.Module):
        raise TypeError(f"vae must be a torch.nn.Module, got {type(vae).__name__}")
    if not (norms or channels_last):
        raise ValueError("patch_wan_vae with norms=False and channels_last=False would change nothing")
    if _STATE in vae.__dict__:
        return 0
    swaps, n = [], 0
    for parent in (list(vae.modules()) if norms else []):
        names = _FUSED.get(type(parent).__name__, ())
        fusable = (isinstance(getattr(parent, "nonlinearity", None), nn.SiLU) and bool(names)
                   and all(_is_wan_norm(getattr(parent, k, None)) for k in names))
        for name, child in list(parent.named_children()):
            if _is_wan_norm(child):
                setattr(parent, name, WanFusedRMSNorm(child, silu=fusable and name in names))
                swaps.append((parent, name, child))
                n += 1
        if fusable:
            swaps.append((parent, "nonlinearity", parent.nonlinearity))
            parent.nonlinearity = nn.Identity()
    state = {"swaps": swaps, "hooks": [], "channels_last": channels_last}
    if channels_last:
        _to_channels_last(vae, True)
        for name in ("encoder", "decoder", "post_quant_conv"):
            sub = getattr(vae, name, None)
            if isinstance(sub, nn.Module):
                state["hooks"].append(sub.register_forward_pre_hook(_channels_last_inputs))
    vae.__dict__[_STATE] = state
    return n


def unpatch_wan_vae(vae: nn.Module) -> int:
    """Undo `patch_wan_vae` (modules, SiLUs, hooks, weight memory format); returns how many norms were restored."""
    state = vae.__dict__.pop(_STATE, None)
    if state is None:
        return 0
    n = 0
    for parent, name, original in reversed(state["swaps"]):
        setattr(parent, name, original)
        n += name != "nonlinearity"
    for h in state["hooks"]:
        h.remove()
    if state["channels_last"]:
        _to_channels_last(vae, False)
    return n


def _to_channels_last(vae: nn.Module, on: bool) -> None:
    """Conv weights to channels-last (Conv3d: channels_last_3d, Conv2d: channels_last) or back, in place
    (the Parameter objects stay, so optimisers and state_dict keys are unaffected)."""
    for m in vae.modules():
        fmt = None
        if isinstance(m, nn.Conv3d):
            fmt = torch.channels_last_3d if on else torch.contiguous_format
        elif isinstance(m, nn.Conv2d):
            fmt = torch.channels_last if on else torch.contiguous_format
        if fmt is not None:
            with torch.no_grad():
                m.weight.data = m.weight.data.contiguous(memory_format=fmt)


def _channels_last_inputs(module, args):
    return tuple(a.contiguous(memory_format=torch.channels_last_3d) if isinstance(a, torch.Tensor) and a.dim() == 5
                 else a for a in args)
