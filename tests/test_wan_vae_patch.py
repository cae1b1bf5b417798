"""patch_wan_vae on the CPU: a random-weight diffusers AutoencoderKLWan decodes the same patched and stock (the
patched modules' torch path there), state_dict keys stay, unpatch restores the original modules."""
from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from kernels.wan_vae_patch import (WAN22_VAE_CONFIG, WanFusedRMSNorm, patch_wan_vae,  # noqa: E402
                                   unpatch_wan_vae)

wan = pytest.importorskip("diffusers.models.autoencoders.autoencoder_kl_wan")
# a WAN 2.2-shaped VAE (residual up blocks with DupUp3D shortcuts, 2x2 patches) small enough for a CPU test
TINY_WAN22 = dict(WAN22_VAE_CONFIG, base_dim=16, decoder_base_dim=32, z_dim=8)
TINY_WAN21 = dict(base_dim=16)  # the WAN 2.1 layout (default config) at 1/6 of its channel widths


def _vae(config=None, seed=0):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLWan(**(config or {})).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 2.0)
    return vae


def _decode(vae, z):
    with torch.no_grad():
        return vae.decode(z).sample


@pytest.fixture(scope="module")
def wan21():
    return _vae()


def _modules(vae):
    return {name: m for name, m in vae.named_modules()}


def test_patch_replaces_every_norm_and_fuses_silu(wan21):
    before = _modules(wan21)
    n_norms = sum(isinstance(m, wan.WanRMS_norm) for m in before.values())
    keys = list(wan21.state_dict())
    try:
        assert patch_wan_vae(wan21) == n_norms
        assert patch_wan_vae(wan21) == 0  # idempotent
        after = _modules(wan21)
        assert not any(isinstance(m, wan.WanRMS_norm) for m in after.values())
        for name, m in after.items():
            if isinstance(m, wan.WanResidualBlock):
                assert m.norm1.silu and m.norm2.silu and isinstance(m.nonlinearity, torch.nn.Identity)
            if isinstance(m, wan.WanAttentionBlock):
                assert isinstance(m.norm, WanFusedRMSNorm) and not m.norm.silu
        assert wan21.decoder.norm_out.silu and isinstance(wan21.decoder.nonlinearity, torch.nn.Identity)
        assert list(wan21.state_dict()) == keys
        assert wan21.decoder.norm_out.gamma is before["decoder.norm_out"].gamma  # the same Parameter objects
    finally:
        assert unpatch_wan_vae(wan21) == n_norms
    restored = _modules(wan21)
    assert restored.keys() == before.keys()
    assert all(restored[k] is before[k] for k in before)
    assert unpatch_wan_vae(wan21) == 0


def test_patched_decode_matches_stock_fp32(wan21):
    """fp32 on the CPU: the patched modules run WanRMS_norm's own fp32 maths (then SiLU): bit-identical."""
    z = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    ref = _decode(wan21, z)
    patch_wan_vae(wan21)
    try:
        got = _decode(wan21, z)
    finally:
        unpatch_wan_vae(wan21)
    assert got.shape == (1, 3, 5, 64, 64)
    assert torch.equal(got, ref)
    assert torch.equal(_decode(wan21, z), ref)


def test_channels_last_patch_matches_and_unpatch_restores_weights(wan21):
    z = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(2))
    ref = _decode(wan21, z)
    conv = wan21.decoder.conv_in
    patch_wan_vae(wan21, channels_last=True)
    try:
        assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
        got = _decode(wan21, z)
    finally:
        unpatch_wan_vae(wan21)
    assert conv.weight.is_contiguous()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)  # channels-last convolutions sum in another order
    assert torch.equal(_decode(wan21, z), ref)


def test_bf16_patched_decode_is_as_close_to_fp32_as_stock():
    """bf16: the fused norm rounds once where WanRMS_norm rounds after normalize, scale, gamma and SiLU; the
    patched decode must be no further from the fp32 decode than the stock bf16 decode is."""
    vae = _vae(TINY_WAN21, seed=3)  # bf16 Conv3d on the CPU is slow: the full-width decoder took 18 min here
    z = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    ref32 = _decode(vae, z)
    vae = vae.to(torch.bfloat16)
    stock = _decode(vae, z.bfloat16()).float()
    patch_wan_vae(vae)
    got = _decode(vae, z.bfloat16()).float()
    unpatch_wan_vae(vae)
    err_stock = float((stock - ref32).abs().mean())
    err_patched = float((got - ref32).abs().mean())
    assert err_patched <= 1.25 * err_stock + 1e-3, (err_patched, err_stock)


def test_wan22_residual_vae_patch_matches():
    vae = _vae(TINY_WAN22, seed=4)
    z = torch.randn(1, 8, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    ref = _decode(vae, z)
    n = patch_wan_vae(vae)
    assert n == sum(isinstance(m, WanFusedRMSNorm) for m in vae.modules()) > 0
    assert any(isinstance(m, wan.WanResidualUpBlock) for m in vae.modules())
    got = _decode(vae, z)
    unpatch_wan_vae(vae)
    assert got.shape == (1, 3, 5, 64, 64)
    assert torch.equal(got, ref)


def test_wan22_full_config_patches_on_meta():
    """The real WAN 2.2 VAE (555M decoder parameters) patched without allocating it."""
    with torch.device("meta"):
        vae = diffusers.AutoencoderKLWan(**WAN22_VAE_CONFIG)
    keys = list(vae.state_dict())
    n_norms = sum(isinstance(m, wan.WanRMS_norm) for m in vae.modules())
    assert patch_wan_vae(vae) == n_norms
    assert list(vae.state_dict()) == keys
    assert {m.gamma.numel() for m in vae.decoder.modules() if isinstance(m, WanFusedRMSNorm)} == {256, 512, 1024}
    unpatch_wan_vae(vae)


def test_fused_module_torch_path_matches_stock_module_with_bias():
    norm = wan.WanRMS_norm(48, images=False, bias=True)
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 2.0)
        norm.bias.normal_()
    x = torch.randn(2, 48, 3, 5, 7) * 5 + 5
    fused = WanFusedRMSNorm(norm, silu=True)
    assert set(dict(fused.named_parameters())) == {"gamma", "bias"}
    with torch.no_grad():
        torch.testing.assert_close(fused(x), torch.nn.functional.silu(norm(x)), rtol=0, atol=0)
        xb = x.bfloat16()
        nb = wan.WanRMS_norm(48, images=False, bias=True).bfloat16()
        nb.load_state_dict(norm.state_dict())
        fb = WanFusedRMSNorm(nb, silu=False)
        torch.testing.assert_close(fb(xb).float(), nb(xb).float(), rtol=2 ** -6, atol=2e-2)


def test_row_route_arguments_reproduce_wan_norm():
    """The channels-last route runs RMSNorm with `row_args`: in float64 it must equal WanRMS_norm (+ SiLU)."""
    C = 96
    norm = wan.WanRMS_norm(C, images=False).double()
    with torch.no_grad():
        norm.gamma.uniform_(0.5, 2.0)
    x = torch.randn(2, C, 3, 4, 5, dtype=torch.float64) * 3
    fused = WanFusedRMSNorm(norm, silu=True)
    weight, eps = fused.row_args(C)
    rows = x.movedim(1, -1)
    got = torch.nn.functional.rms_norm(rows, (C,), weight.reshape(-1), eps)
    got = torch.nn.functional.silu(got).movedim(-1, 1)
    torch.testing.assert_close(got, torch.nn.functional.silu(norm(x)), rtol=1e-12, atol=1e-12)


def test_layout_only_patch_keeps_norms_and_converts_convs(wan21):
    before = _modules(wan21)
    z = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    ref = _decode(wan21, z)
    assert patch_wan_vae(wan21, channels_last=True, norms=False) == 0
    try:
        assert all(_modules(wan21)[k] is before[k] for k in before)
        assert wan21.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(_decode(wan21, z), ref, rtol=1e-4, atol=1e-4)
    finally:
        unpatch_wan_vae(wan21)
    assert wan21.decoder.conv_in.weight.is_contiguous()


def test_patch_rejects_non_modules_and_no_op_requests():
    with pytest.raises(TypeError):
        patch_wan_vae(object())
    with pytest.raises(ValueError, match="change nothing"):
        patch_wan_vae(torch.nn.Linear(2, 2), channels_last=False, norms=False)
