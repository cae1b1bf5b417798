"""Channel-first kernel correctness on a GPU (kernels/channel_first.py, channel_first_kernel.py, channel_first_op.py).

Inputs are randn*5+5 (never zeros) with weights in [0.5, 2]; every output is poisoned twice (0xFF = NaN in
bf16/fp16/e4m3, then 0x00) and checked after each launch against the float64 reference, so an unwritten
element cannot pass. Tolerances are kernels/check.py's: bf16 2^-7 relative + 1e-3 absolute, fp16 2^-9,
fp8 e4m3 codes at most one step apart.
"""
from __future__ import annotations

import random

import pytest
import torch

from kernels import channel_first as cf
from kernels import channel_first_op as cfo
from kernels import wan_vae_norm_shapes as wan_shapes
from kernels.check import ATOL, RTOL

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

DEV = "cuda"
SM = torch.cuda.get_device_capability()[0] * 10 + torch.cuda.get_device_capability()[1]
ARCH = "sm_100a" if SM >= 100 else "sm_90a"
TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16}
MAX_ELEMS = 1 << 28  # per case: 512 MB of bf16 input, 2 GB of float64 reference


# --------------------------------------------------------------------------- helpers
def _inputs(shape, C, dtype, bias, seed=0, frame_major=False):
    g = torch.Generator(device=DEV).manual_seed(seed)
    if frame_major:  # [B, T, C, H, W] memory seen as [B, C, T, H, W] (diffusers' upsampler output)
        B, _, T, H, W = shape
        x = (torch.randn(B, T, C, H, W, generator=g, device=DEV) * 5 + 5).to(dtype).permute(0, 2, 1, 3, 4)
    else:
        x = (torch.randn(*shape, generator=g, device=DEV) * 5 + 5).to(dtype)
    w = (torch.rand(C, generator=g, device=DEV) * 1.5 + 0.5).to(dtype)
    b = (torch.randn(C, generator=g, device=DEV) * 0.5).to(dtype) if bias else None
    return x, w, b


def _ordered(codes: torch.Tensor) -> torch.Tensor:
    c = codes.view(torch.uint8).to(torch.int64)
    return torch.where(c & 0x80 != 0, -(c & 0x7F), c)


def _assert_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if got.dtype == torch.float8_e4m3fn:
        dist = (_ordered(got) - _ordered(expected)).abs()
        assert int(dist.max()) <= 1, f"{what}: fp8 codes {int(dist.max())} apart ({int((dist > 1).sum())} elements)"
        return
    g32 = got.float()
    assert not torch.isnan(g32).any(), f"{what}: NaN in output (unwritten element?)"
    tol = ATOL + RTOL[got.dtype] * expected.abs()
    bad = (g32 - expected).abs() > tol
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} out of tolerance, first at {idx}: got "
                             f"{float(g32[idx])}, expected {float(expected[idx])}")


def _run(x, w, b, *, silu=False, l2norm=False, fp8=False, scale=1.0, eps=None, cfg=None, what=""):
    """Launch on poisoned outputs (through the entry point, or one explicit config) and check each run."""
    p_fmt = "fp8" if fp8 else cfo._TORCH_IN[x.dtype]
    out = torch.empty_like(x, dtype=torch.float8_e4m3fn if fp8 else x.dtype)
    view = cfo.channel_first_view(x)
    p = cf.ChannelFirstProblem(view[0], x.shape[1], view[1], cfo._TORCH_IN[x.dtype], p_fmt, silu, b is not None,
                               l2norm)
    expected = cf.expected_output(p, x, w, b, eps, scale)
    for byte in (0xFF, 0x00):
        out.view(torch.uint8).fill_(byte)
        if cfg is None:
            cfo.channel_first_rmsnorm(x, w, b, eps, silu=silu, l2norm=l2norm, out=out, scale=scale)
        else:
            _launch_config(p, cfg, x, w, b, out, eps, scale)
        torch.cuda.synchronize()
        _assert_close(out, expected, f"{what} {p.op}/{p_fmt} C={p.C} N={p.N} S={p.S} "
                                     f"{cfg.short() if cfg else 'heuristic'} poison {byte:#x}")


def _launch_config(p, cfg, x, w, b, out, eps, scale):
    fn = cf.get_compiled(p, cfg, ARCH)
    N, S, sxn, sxc = cfo.channel_first_view(x)
    _, _, syn, syc = cfo.channel_first_view(out)
    eps = (cf.F_NORMALIZE_EPS if p.l2norm else cf.RMS_EPS) if eps is None else eps
    fn(x.data_ptr(), w.data_ptr(), None if b is None else b.data_ptr(), out.data_ptr(), N, S, sxn, sxc, syn, syc,
       float(eps), float(scale), torch.cuda.current_stream().cuda_stream)


def _random_configs(p, n, seed, stride_gcd=None):
    rng = random.Random(seed)
    out = []
    for _ in range(4000):
        if len(out) >= n:
            break
        c = cf.ChannelFirstConfig(**{k: rng.choice(v) for k, v in cf.CF_KNOB_CHOICES.items()})
        if c not in out and cf.is_valid(p, c, SM, stride_gcd):
            out.append(c)
    return out


# --------------------------------------------------------------------------- the decoders' real shapes
def _real_shapes():
    for key in (("wan2.1", 480, 832), ("wan2.2", 480, 832), ("wan2.1", 720, 1280)):
        for shape in wan_shapes.WAN_VAE_NORM_SHAPES[key]:
            C, T, H, W, layout, N, S, calls = shape
            if N * C * S <= MAX_ELEMS:
                yield pytest.param(shape, id=f"{key[0]}-{key[1]}p-C{C}-T{T}-{H}x{W}-{layout}")


@pytest.mark.parametrize("shape", list(_real_shapes()))
def test_decoder_shapes(shape):
    """Every decoder norm shape at 480p (and WAN 2.1 720p): the heuristic and three random configs, the
    patched module's form (l2norm, SiLU except after attention) in its real memory layout."""
    C, T, H, W, layout, N, S, calls = shape
    silu = layout != "image"
    if layout == "image":
        x, w, b = _inputs((T, C, H, W), C, torch.bfloat16, False)
    else:
        x, w, b = _inputs((1, C, T, H, W), C, torch.bfloat16, False, frame_major=layout == "tchw")
    assert cfo.channel_first_view(x)[:2] == (N, S)
    _run(x, w, b, silu=silu, l2norm=True, what="decoder")
    p = cf.ChannelFirstProblem(N, C, S, "bf16", "bf16", silu, False, True)
    for cfg in _random_configs(p, 3, seed=C * 7 + S):
        _run(x, w, b, silu=silu, l2norm=True, cfg=cfg, what="decoder")


# --------------------------------------------------------------------------- fused variants
VARIANTS = [dict(silu=s, l2norm=l, bias=b, fp8=f) for s in (False, True) for l in (False, True)
            for b in (False, True) for f in (False, True)]


@pytest.mark.parametrize("C,S", [(96, 6240), (192, 24960), (384, 1560), (1024, 1560), (160, 4096), (3, 8192),
                                 (4096, 512)])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(k for k, on in v.items() if on) or "plain")
def test_variants(C, S, variant):
    """rmsnorm / l2norm x SiLU x bias x bf16 / fp8 out (fp8: static scale 1/16 without SiLU, as rmsnorm_quant;
    1.0 with it, as fused_rmsnorm_silu), heuristic plus two random configs."""
    x, w, b = _inputs((2, C, S), C, torch.bfloat16, variant["bias"], seed=C + S)
    scale = 1.0 if (variant["silu"] or not variant["fp8"]) else 1 / 16
    kw = dict(silu=variant["silu"], l2norm=variant["l2norm"], fp8=variant["fp8"], scale=scale)
    _run(x, w, b, **kw, what="variant")
    p = cf.ChannelFirstProblem(2, C, S, "bf16", "fp8" if variant["fp8"] else "bf16", variant["silu"],
                               variant["bias"], variant["l2norm"])
    for cfg in _random_configs(p, 2, seed=C * 3 + S):
        _run(x, w, b, **kw, cfg=cfg, what="variant")


@pytest.mark.parametrize("C", [96, 384])
def test_fp16(C):
    x, w, b = _inputs((1, C, 2, 30, 52), C, torch.float16, True)
    _run(x, w, b, silu=True, l2norm=True, what="fp16")
    _run(x, w, b, what="fp16")


# --------------------------------------------------------------------------- layouts and tails
@pytest.mark.parametrize("C,S", [(96, 24961), (384, 1001), (192, 7), (1000, 33), (16, 1), (96, 6241)])
def test_odd_spatial(C, S):
    """S not a multiple of any vector: 2-byte loads, every position predicated."""
    x, w, b = _inputs((3, C, S), C, torch.bfloat16, True)
    assert cf.max_vec_bytes(cf.ChannelFirstProblem(3, C, S)) == 2 or S % 2 == 0
    _run(x, w, b, silu=True, l2norm=True, what="odd S")
    _run(x, w, b, what="odd S")
    p = cf.ChannelFirstProblem(3, C, S, "bf16", "bf16", True, True, True)
    for cfg in _random_configs(p, 3, seed=S):
        _run(x, w, b, silu=True, l2norm=True, cfg=cfg, what="odd S")


@pytest.mark.parametrize("S", [1000, 1002, 1004])
def test_partial_tiles_and_narrow_vectors(S):
    """S a multiple of 8, 2 or 4 but not of positions_per_cta: vector-granular tails."""
    C = 96
    x, w, b = _inputs((2, C, S), C, torch.bfloat16, False)
    _run(x, w, b, l2norm=True, silu=True, what="tail")


def test_misaligned_pointer():
    """x starting one element past a 16-byte boundary: the entry point narrows the vector to 2 bytes."""
    C, S = 96, 4096
    base, w, b = _inputs((1, C * S + 1), C, torch.bfloat16, False)
    x = base[0, 1:].view(1, C, S)
    assert x.data_ptr() % 16 == 2
    _run(x, w, b, l2norm=True, silu=True, what="misaligned")


def test_frame_major_and_image_layouts():
    C, T, H, W = 192, 4, 24, 40
    x, w, b = _inputs((1, C, T, H, W), C, torch.bfloat16, False, frame_major=True)
    assert not x.is_contiguous() and cfo.channel_first_view(x)[:2] == (T, H * W)
    _run(x, w, b, silu=True, l2norm=True, what="tchw")
    xi, _, _ = _inputs((T, C, H, W), C, torch.bfloat16, False)
    _run(xi, w, b, l2norm=True, what="image")


def test_channels_last_routes_to_row_kernel():
    """channels_last_3d memory is [positions, C] rows: the row ops on a zero-copy view (RMSNorm semantics)."""
    C = 384
    x, w, _ = _inputs((1, C, 2, 30, 52), C, torch.bfloat16, False)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    for silu in (False, True):
        y = cfo.channel_first_rmsnorm(x, w, eps=1e-6, silu=silu)
        assert y.is_contiguous(memory_format=torch.channels_last_3d)
        _assert_close(y, cf.reference(x, w, None, 1e-6, "rms", silu=silu).float(), "channels_last")
    with pytest.raises(ValueError, match="channels-last"):
        cfo.channel_first_rmsnorm(x, w, l2norm=True)


def test_l2norm_clamps_the_norm_like_f_normalize():
    """Positions with ||x|| ~ eps / 2: F.normalize divides by eps (max semantics) where RMSNorm with
    eps' = eps^2 / C divides by sqrt(||x||^2 + eps^2) (~11 % apart); the l2norm mode must follow F.normalize."""
    C, S, eps = 64, 512, 1e-12
    g = torch.Generator(device=DEV).manual_seed(3)
    x = ((torch.rand(1, C, S, generator=g, device=DEV) * 0.2 + 0.9) * (eps / 2 / C ** 0.5)).to(torch.bfloat16)
    w = torch.ones(C, device=DEV, dtype=torch.bfloat16)
    y = cfo.channel_first_rmsnorm(x, w, eps=eps, l2norm=True)
    _assert_close(y, cf.reference(x, w, None, eps, "l2").float(), "tiny norm")
    f = torch.nn.functional.normalize(x.double(), dim=1, eps=eps) * C ** 0.5
    _assert_close(y, f.float(), "tiny norm vs F.normalize")
    y_rms = cfo.channel_first_rmsnorm(x, w, eps=eps ** 2 / C)
    _assert_close(y_rms, cf.reference(x, w, None, eps ** 2 / C, "rms").float(), "tiny norm, rms")
    assert not torch.allclose(y_rms.float(), y.float(), rtol=0.05), "RMSNorm's additive eps differs here"


def test_repeated_calls_hit_the_plan_cache():
    C, S = 96, 4096
    x, w, b = _inputs((1, C, S), C, torch.bfloat16, False)
    y1 = cfo.channel_first_rmsnorm(x, w, l2norm=True, silu=True)
    n = len(cfo._PLANS)
    y2 = cfo.channel_first_rmsnorm(x.clone(), w.clone(), l2norm=True, silu=True)
    assert len(cfo._PLANS) == n and torch.equal(y1, y2)


# --------------------------------------------------------------------------- the patched WAN VAE
@pytest.mark.parametrize("channels_last", [False, True])
def test_patched_wan_vae_decode_matches_stock(channels_last):
    """A random-weight AutoencoderKLWan in bf16: the patched decode (channel-first kernel; with channels_last,
    the row kernel for channels-last norm inputs) is no further from the fp32 decode than stock bf16 is."""
    diffusers = pytest.importorskip("diffusers")
    from kernels.wan_vae_patch import patch_wan_vae, unpatch_wan_vae

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKLWan().to(DEV).eval()
    with torch.no_grad():
        for n, prm in vae.named_parameters():
            if n.endswith("gamma"):
                prm.uniform_(0.5, 2.0)
    z = torch.randn(1, 16, 3, 12, 16, device=DEV)
    with torch.no_grad():
        ref32 = vae.decode(z).sample
        vae = vae.to(torch.bfloat16)
        zb = z.bfloat16()
        stock = vae.decode(zb).sample.float()
        plans = len(cfo._PLANS)
        assert patch_wan_vae(vae, channels_last=channels_last) > 0
        got = vae.decode(zb).sample.float()
        assert len(cfo._PLANS) > plans, "the kernel path was not taken"
        unpatch_wan_vae(vae)
        again = vae.decode(zb).sample.float()
    assert torch.equal(again, stock), "unpatch must restore the stock model"
    assert not torch.isnan(got).any()
    err_stock = float((stock - ref32).abs().mean())
    err_patched = float((got - ref32).abs().mean())
    # the fused norm rounds once where stock rounds after normalize, scale, gamma and SiLU
    assert err_patched <= 1.25 * err_stock + 1e-3, (err_patched, err_stock)


# --------------------------------------------------------------------------- NVFP4 output
def _fp4_problem(x, b, silu, l2norm, swizzled):
    N, S = cfo.channel_first_view(x)[:2]
    return cf.ChannelFirstProblem(N, x.shape[1], S, cfo._TORCH_IN[x.dtype], "nvfp4", silu, b is not None, l2norm,
                                  "swizzled" if swizzled else "rowmajor")


def _fp4_outputs(x, swizzled):
    """Channels-last codes [B, *spatial, C/2] and e4m3 scales ([B, *spatial, C/16] or the swizzled buffer)."""
    from kernels.encoders import swizzled_scale_bytes

    C, lead = x.shape[1], (x.shape[0], *x.shape[2:])
    out = torch.empty(*lead, C // 2, dtype=torch.uint8, device=DEV)
    if swizzled:
        sf = torch.empty(swizzled_scale_bytes(out.numel() // (C // 2), C // 16), dtype=torch.float8_e4m3fn,
                         device=DEV)
    else:
        sf = torch.empty(*lead, C // 16, dtype=torch.float8_e4m3fn, device=DEV)
    return out, sf


def _check_fp4(p, out, sf, expected, what):
    from kernels.check import compare_outputs

    res = compare_outputs(p, {"out": out, "block_scale": sf}, {"out": expected[0], "block_scale": expected[1]})
    assert res.ok, f"{what}: {res.message}"


def _run_fp4(x, w, b, *, silu=False, l2norm=False, swizzled=False, gs=None, eps=None, cfg=None, what=""):
    """NVFP4 on poisoned outputs (0xFF: -6 in e2m1 and NaN as e4m3, then 0x00) through the entry point or one
    explicit config, judged after each run against encoders.quantize_nvfp4 of the float64 reference's
    channels-last rows (kernels/check.py's FP4 rules; the swizzled padding exactly zero)."""
    p = _fp4_problem(x, b, silu, l2norm, swizzled)
    out, sf = _fp4_outputs(x, swizzled)
    expected = cf.expected_output(p, x, w, b, eps, global_scale=gs)
    label = (f"{what} {p.op}/nvfp4{'/swz' if swizzled else ''} C={p.C} N={p.N} S={p.S} gs={gs is not None} "
             f"{cfg.short() if cfg else 'heuristic'}")
    for byte in (0xFF, 0x00):
        out.fill_(byte)
        sf.view(torch.uint8).fill_(byte)
        if cfg is None:
            got = cfo.channel_first_rmsnorm(x, w, b, eps, silu=silu, l2norm=l2norm, out=out, block_scale=sf,
                                            global_scale=gs, is_sf_swizzled_layout=swizzled)
            assert got[0] is out and got[1] is sf
        else:
            _launch_fp4_config(p, cfg, x, w, b, out, sf, gs, eps)
        torch.cuda.synchronize()
        _check_fp4(p, out, sf, expected, f"{label} poison {byte:#x}")
    return p


def _launch_fp4_config(p, cfg, x, w, b, out, sf, gs, eps):
    fn = cf.get_compiled(p, cfg, ARCH)
    N, S, sxn, sxc = cfo.channel_first_view(x)
    C = x.shape[1]
    eps = (cf.F_NORMALIZE_EPS if p.l2norm else cf.RMS_EPS) if eps is None else eps
    gs = torch.ones(1, device=DEV) if gs is None else gs
    fn(x.data_ptr(), w.data_ptr(), None if b is None else b.data_ptr(), out.data_ptr(), sf.data_ptr(), gs.data_ptr(),
       N, S, sxn, sxc, S * (C // 2), C // 2, float(eps), torch.cuda.current_stream().cuda_stream)


FP4_FORMS = [dict(silu=True, l2norm=True, bias=False), dict(silu=False, l2norm=False, bias=False),
             dict(silu=True, l2norm=False, bias=True), dict(silu=False, l2norm=True, bias=True)]


@pytest.mark.parametrize("C,S,N", [(96, 6240, 1), (384, 1560, 2), (512, 1001, 2), (1024, 33, 3), (16, 7, 3),
                                   (160, 24961, 1), (96, 6241, 2), (4096, 512, 1)])
@pytest.mark.parametrize("swizzled", [False, True], ids=["rowmajor", "swizzled"])
@pytest.mark.parametrize("form", FP4_FORMS, ids=lambda f: "-".join(k for k, on in f.items() if on) or "plain")
def test_nvfp4_variants(C, S, N, swizzled, form):
    """NVFP4 against the reference encoder: aligned and odd S, N > 1, both scale layouts (swizzled: positions not a
    multiple of 128 pad the last tile), with and without a global scale, the heuristic plus two random configs."""
    x, w, b = _inputs((N, C, S), C, torch.bfloat16, form["bias"], seed=C + S + N)
    kw = dict(silu=form["silu"], l2norm=form["l2norm"], swizzled=swizzled)
    gs = torch.tensor([2.75], device=DEV)
    p = _run_fp4(x, w, b, **kw, what="nvfp4")
    _run_fp4(x, w, b, **kw, gs=gs, what="nvfp4")
    for cfg in _random_configs(p, 2, seed=C * 5 + S):
        _run_fp4(x, w, b, **kw, gs=gs if cfg.c_order == "blocked" else None, cfg=cfg, what="nvfp4")


def test_nvfp4_swept_space_configs():
    """Shared-memory staging, the blocked order, 16-byte vectors (16 x 8 values per thread) and idle groups."""
    C, S = 96, 4096
    x, w, b = _inputs((2, C, S), C, torch.bfloat16, True, seed=11)
    p = _fp4_problem(x, b, True, True, True)
    for cfg in (cf.ChannelFirstConfig(threads=128, positions_per_cta=128, vec_bytes=16, stage="smem"),
                cf.ChannelFirstConfig(threads=128, positions_per_cta=32, vec_bytes=4, c_order="blocked", pdl=True),
                cf.ChannelFirstConfig(threads=256, positions_per_cta=256, vec_bytes=16),
                cf.ChannelFirstConfig(threads=32, positions_per_cta=32, vec_bytes=2)):
        assert cf.is_valid(p, cfg, SM), cf.violations(p, cfg, SM)
        _run_fp4(x, w, b, silu=True, l2norm=True, swizzled=True, cfg=cfg, what="swept")


def test_nvfp4_layouts_and_allocation():
    """5-D video, frame-major ([B, T, C, H, W] memory) and image inputs: codes [B, *spatial, C/2] in (b, t, h, w)
    order; outputs allocated by the op when not given (uint8 or float4_e2m1fn_x2 codes, e4m3 scales)."""
    C, T, H, W = 192, 3, 10, 14
    for frame_major in (False, True):
        x, w, _ = _inputs((2, C, T, H, W), C, torch.bfloat16, False, frame_major=frame_major)
        _run_fp4(x, w, None, silu=True, l2norm=True, what="video")
        _run_fp4(x, w, None, silu=True, l2norm=True, swizzled=True, gs=torch.tensor([0.75], device=DEV),
                 what="video")
    xi, w, _ = _inputs((T, C, H, W), C, torch.bfloat16, False)
    _run_fp4(xi, w, None, l2norm=True, what="image")
    x, w, _ = _inputs((1, C, T, H, W), C, torch.bfloat16, False)
    for dt in [torch.uint8] + ([torch.float4_e2m1fn_x2] if hasattr(torch, "float4_e2m1fn_x2") else []):
        for swizzled in (False, True):
            out, sf = cfo.channel_first_rmsnorm(x, w, silu=True, l2norm=True, out_dtype=dt,
                                                is_sf_swizzled_layout=swizzled)
            assert out.dtype == dt and out.shape == (1, T, H, W, C // 2) and sf.dtype == torch.float8_e4m3fn
            p = _fp4_problem(x, None, True, True, swizzled)
            _check_fp4(p, out, sf, cf.expected_output(p, x, w), f"allocated {dt} swizzled={swizzled}")


def test_nvfp4_fp16_and_misaligned_input():
    C, S = 384, 4096
    x, w, b = _inputs((1, C, 2, 30, 52), C, torch.float16, True)
    _run_fp4(x, w, b, silu=True, l2norm=True, what="fp16")
    base, w, _ = _inputs((1, C * S + 1), C, torch.bfloat16, False)
    xm = base[0, 1:].view(1, C, S)  # 2-byte aligned: 2-byte vectors
    _run_fp4(xm, w, None, silu=True, l2norm=True, swizzled=True, what="misaligned")


def test_nvfp4_channels_last_routes_to_rmsnorm_fp4quant():
    """channels-last RMSNorm input: the row kernel's rmsnorm_fp4quant on the [positions, C] view (same convention,
    same out / block_scale shapes); SiLU there would change the scale convention and is refused."""
    C = 384
    x, w, _ = _inputs((1, C, 2, 30, 52), C, torch.bfloat16, False)
    x = x.contiguous(memory_format=torch.channels_last_3d)
    gs = torch.tensor([1.5], device=DEV)
    for swizzled in (False, True):
        out, sf = _fp4_outputs(x, swizzled)
        out.fill_(0xFF)
        sf.view(torch.uint8).fill_(0xFF)
        cfo.channel_first_rmsnorm(x, w, eps=1e-6, out=out, block_scale=sf, global_scale=gs,
                                  is_sf_swizzled_layout=swizzled)
        p = cf.ChannelFirstProblem(1, C, 2 * 30 * 52, "bf16", "nvfp4", scale_layout="swizzled" if swizzled else
                                   "rowmajor")
        _check_fp4(p, out, sf, cf.expected_output(p, x, w, None, 1e-6, global_scale=gs), "channels_last")
    with pytest.raises(ValueError, match="channels-last"):
        cfo.channel_first_rmsnorm(x, w, silu=True, out_dtype=torch.uint8)


def test_nvfp4_validation_on_device():
    C, S = 96, 64
    x, w, _ = _inputs((1, C, S), C, torch.bfloat16, False)
    out, sf = _fp4_outputs(x, False)
    with pytest.raises(ValueError, match="8-byte aligned"):
        raw = torch.empty(out.numel() + 4, dtype=torch.uint8, device=DEV)
        cfo.channel_first_rmsnorm(x, w, out=raw[4:].view(out.shape), block_scale=sf)
    with pytest.raises(ValueError, match="block_scale must be on a CUDA device"):
        cfo.channel_first_rmsnorm(x, w, out=out, block_scale=sf.cpu())
    with pytest.raises(ValueError, match="global_scale must be on a CUDA device"):
        cfo.channel_first_rmsnorm(x, w, out=out, block_scale=sf, global_scale=torch.ones(1))
    with pytest.raises(ValueError, match="out must be on a CUDA device"):
        cfo.channel_first_rmsnorm(x, w, out=out.cpu(), block_scale=sf)
    with pytest.raises(ValueError, match="overlap"):
        buf = torch.empty(out.numel() + sf.numel(), dtype=torch.uint8, device=DEV)
        cfo.channel_first_rmsnorm(x, w, out=buf[:out.numel()].view(out.shape),
                                  block_scale=buf[out.numel() // 2:][:sf.numel()].view(torch.float8_e4m3fn)
                                  .view(sf.shape))
