"""Public ops on a GPU: results against the reference, torch.compile(fullgraph=True), CUDA-graph
capture, and a fuzz of bad inputs that must raise ValueError/TypeError without writing anything."""
from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from kernels import encoders, ops, reference  # noqa: E402
from kernels.problem import Problem  # noqa: E402

DEV = "cuda"
BF = torch.bfloat16


def _x(T, C, dtype=BF):
    return (torch.randn(T, C, device=DEV) * 5 + 5).to(dtype)


def _w(C, dtype=BF):
    return (torch.rand(C, device=DEV) * 1.5 + 0.5).to(dtype)


def _close(got, ref):
    assert not torch.isnan(got.float()).any()
    torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -7, atol=1e-3)


def _calls():
    """(name, fn) pairs: each fn runs one public op on fresh data and returns (got, expected) pairs."""
    T, C = 999, 1024

    def rms():
        x, w = _x(T, C), _w(C)
        return [(ops.rmsnorm(x, w), reference.rms_norm(x, w, 1e-6))]

    def gemma():
        x, w = _x(T, C), _w(C)
        return [(ops.gemma_rmsnorm(x, w), reference.rms_norm(x, w, 1e-6, gemma=True))]

    def fused_add():
        x, r, w = _x(T, C), _x(T, C), _w(C)
        y_ref, r_ref = reference.fused_add_rms_norm(x, r, w, 1e-6)
        ops.fused_add_rmsnorm(x, r, w)
        return [(x, y_ref), (r, r_ref)]

    def quant():
        x, w = _x(T, C), _w(C)
        out = torch.empty(T, C, device=DEV, dtype=torch.float8_e4m3fn)
        ops.rmsnorm_quant(out, x, w, 0.02)
        ref = encoders.quantize_fp8_static(reference.rms_norm(x, w, 1e-6).float(), 0.02)
        return [(out.float(), ref.float())]

    def qk():
        x = (torch.randn(T, 16, 256, device=DEV) * 5 + 5).to(BF)[:, :, :128]  # strided heads
        w = _w(128)
        return [(ops.qk_rmsnorm(x, w), reference.qk_rms_norm(x, w, 1e-6))]

    def silu():
        x, w = _x(T, C), _w(C)
        return [(ops.fused_rmsnorm_silu(x, w), reference.silu(reference.rms_norm(x, w, 1e-6)))]

    return {"rmsnorm": rms, "gemma_rmsnorm": gemma, "fused_add_rmsnorm": fused_add, "rmsnorm_quant": quant,
            "qk_rmsnorm": qk, "fused_rmsnorm_silu": silu}


@pytest.mark.parametrize("name", list(_calls()))
def test_public_op_matches_reference(name):
    for got, ref in _calls()[name]():
        if got.dtype == torch.float32 and name == "rmsnorm_quant":
            diff = (got - ref).abs()
            assert (diff <= ref.abs() * 0.126 + 1e-9).all()  # within one e4m3 step
        else:
            _close(got, ref)


def test_ops_under_torch_compile_fullgraph():
    x, r, w = _x(256, 512), _x(256, 512), _w(512)
    q = (torch.randn(64, 8, 128, device=DEV) * 5 + 5).to(BF)
    wq = _w(128)

    def f(x, r, w, q, wq):
        a = ops.rmsnorm(x, w)
        b = ops.fused_rmsnorm_silu(x, w)
        c = ops.fused_rmsnorm_silu(x, w, out=torch.empty(x.shape, device=x.device, dtype=torch.float8_e4m3fn))
        y4, sf = ops.rmsnorm_fp4quant(x, w, is_sf_swizzled_layout=True)
        d = ops.qk_rmsnorm(q, wq)
        x2 = x.clone()
        ops.fused_add_rmsnorm(x2, r, w)
        return a, b, c, y4, sf, d, x2, r

    eager = f(x.clone(), r.clone(), w, q, wq)
    compiled = torch.compile(f, fullgraph=True)(x.clone(), r.clone(), w, q, wq)
    for e, c in zip(eager, compiled):
        assert torch.equal(e.view(torch.uint8), c.view(torch.uint8))


def test_ops_under_cuda_graph_capture():
    x, w = _x(1560, 320), _w(320)
    out = torch.empty_like(x)
    y8 = torch.empty(x.shape, device=DEV, dtype=torch.float8_e4m3fn)
    ops.fused_rmsnorm_silu(x, w, out=out)  # warm up: compile outside capture
    ops.fused_rmsnorm_silu(x, w, out=y8)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ops.fused_rmsnorm_silu(x, w, out=out)
        ops.fused_rmsnorm_silu(x, w, out=y8)
    x.copy_(_x(1560, 320))
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    _close(out, reference.silu(reference.rms_norm(x, w, 1e-6)))


def test_leading_dims_flatten_without_copy():
    """[batch, seq, hidden] (and strided leading dims that still have one row stride) as serving code passes it."""
    x3, w = (torch.randn(3, 37, 1024, device=DEV) * 5 + 5).to(BF), _w(1024)
    _close(ops.rmsnorm(x3, w), reference.rms_norm(x3.reshape(-1, 1024), w, 1e-6).view_as(x3))
    _close(ops.fused_rmsnorm_silu(x3, w), reference.silu(reference.rms_norm(x3.reshape(-1, 1024), w, 1e-6)).view_as(x3))
    big = (torch.randn(4, 40, 1536, device=DEV) * 5 + 5).to(BF)
    xs = big[:, :, :1024]  # rows of stride 1536: leading dims still flatten (stride 40*1536 = 40 rows)
    _close(ops.rmsnorm(xs, w), reference.rms_norm(xs.reshape(-1, 1024), w, 1e-6).view_as(xs))
    r3 = (torch.randn(3, 37, 1024, device=DEV)).to(BF)
    y_ref, r_ref = reference.fused_add_rms_norm(x3.reshape(-1, 1024), r3.reshape(-1, 1024), w, 1e-6)
    xa, ra = x3.clone(), r3.clone()
    ops.fused_add_rmsnorm(xa, ra, w)
    _close(xa.view(-1, 1024), y_ref)
    _close(ra.view(-1, 1024), r_ref)
    q = (torch.randn(2, 9, 8, 128, device=DEV) * 5 + 5).to(BF)  # [batch, seq, heads, head_dim]
    wq = _w(128)
    _close(ops.qk_rmsnorm(q, wq), reference.qk_rms_norm(q.reshape(18, 8, 128), wq, 1e-6).view_as(q))


def test_cached_plan_follows_new_tensors_and_alignment():
    """The second call of a signature reuses its plan: results follow the new tensors, and a pointer of another
    alignment class gets its own plan (narrower vectors) instead of a misaligned launch."""
    w = _w(4096)
    for _ in range(3):
        x = _x(32, 4096)
        _close(ops.rmsnorm(x, w), reference.rms_norm(x, w, 1e-6))
    base = _x(33, 4096 + 8)
    for off in (0, 1, 2, 4):  # x starts 2, 4, 8 bytes past a 16-byte boundary
        x = base.view(-1)[off: off + 32 * (4096 + 8)].view(32, 4096 + 8)[:, :4096]
        _close(ops.rmsnorm(x, w), reference.rms_norm(x, w, 1e-6))


def test_patch_rmsnorm_in_a_transformers_model():
    transformers = pytest.importorskip("transformers")
    from kernels import patch_rmsnorm, unpatch_rmsnorm

    cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, vocab_size=1000)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(DEV, torch.bfloat16).eval()
    ids = torch.randint(0, 1000, (2, 17), device=DEV)
    with torch.inference_mode():
        ref = model(input_ids=ids).logits.float()
        assert patch_rmsnorm(model) == 2 * 2 + 1 and patch_rmsnorm(model) == 0
        got = model(input_ids=ids).logits.float()
        assert unpatch_rmsnorm(model) == 5
        again = model(input_ids=ids).logits.float()
    assert torch.equal(again, ref)
    assert ((got - ref).norm() / ref.norm()).item() < 2e-2


# ----------------------------------------------------------------------------- fuzz of bad inputs
def _bad_case(rng: random.Random):
    """One call with exactly one thing wrong; returns (callable, tensors that must stay unchanged)."""
    T, C = rng.choice([(4, 64), (33, 160), (7, 1024)])
    x, w = _x(T, C), _w(C)
    kind = rng.choice(["dtype", "wdtype", "shape", "wshape", "device", "stride", "outshape", "outdtype",
                       "alias", "eps", "scale", "dim", "fp4C", "block", "swz_small", "gs", "noncontig_w",
                       "resshape", "type"])
    op = rng.choice(["rmsnorm", "silu", "quant", "fp4", "add", "qk"])
    out = None
    if kind == "dtype":
        x = x.float()
    elif kind == "wdtype":
        w = w.half()
    elif kind == "shape":
        x = x.reshape(-1)
    elif kind == "wshape":
        w = _w(C + 1)
    elif kind == "device":
        w = w.cpu()
    elif kind == "stride":
        x = x.t()
    elif kind == "outshape":
        out = torch.empty(T + 1, C, device=DEV, dtype=BF)
    elif kind == "outdtype":
        out = torch.empty(T, C, device=DEV, dtype=torch.float32)
    elif kind == "alias":
        out = x
    elif kind == "eps":
        eps = rng.choice([-1.0, float("nan"), float("inf"), "1e-6", None])
        return (lambda: ops.rmsnorm(x, w, eps=eps)), [x]
    elif kind == "scale":
        s = rng.choice([0.0, -1.0, float("nan"), "x"])
        o = torch.empty(T, C, device=DEV, dtype=torch.float8_e4m3fn)
        return (lambda: ops.rmsnorm_quant(o, x, w, s)), [x]
    elif kind == "dim":
        x = x[0, 0]  # 0-D: no hidden dim
    elif kind == "fp4C":
        x, w = _x(T, 24), _w(24)
        return (lambda: ops.rmsnorm_fp4quant(x, w)), [x]
    elif kind == "block":
        b = rng.choice([8, 64, 0, True])
        return (lambda: ops.rmsnorm_fp4quant(x, w, block_size=b)), [x]
    elif kind == "swz_small":
        sf = torch.empty(10, device=DEV, dtype=torch.float8_e4m3fn)
        return (lambda: ops.rmsnorm_fp4quant(x, w, block_scale=sf, is_sf_swizzled_layout=True)), [x]
    elif kind == "gs":
        gs = rng.choice([torch.ones(2, device=DEV), torch.ones(1, device=DEV, dtype=torch.float16), 2.0])
        return (lambda: ops.rmsnorm_fp4quant(x, w, global_scale=gs)), [x]
    elif kind == "noncontig_w":
        w = _w(2 * C)[::2]
    elif kind == "resshape":
        r = _x(T + 1, C)
        return (lambda: ops.fused_add_rmsnorm(x, r, w)), [x, r]
    elif kind == "type":
        return (lambda: ops.rmsnorm(x.tolist(), w)), [w]
    if op == "rmsnorm":
        return (lambda: ops.rmsnorm(x, w, out=out)), [x]
    if op == "silu":
        return (lambda: ops.fused_rmsnorm_silu(x, w, out=out)), [x]
    if op == "quant":
        o = out if out is not None else torch.empty(T, C, device=DEV, dtype=torch.float8_e4m3fn)
        return (lambda: ops.rmsnorm_quant(o, x, w, 1.0)), [x]
    if op == "fp4":
        return (lambda: ops.rmsnorm_fp4quant(x, w, y_fp4=out)), [x]
    if op == "add":
        r = torch.empty_like(x) if x.dtype in (BF, torch.float16) and x.dim() == 2 else _x(T, C)
        return (lambda: ops.fused_add_rmsnorm(x, r if out is None else out, w)), [x]
    return (lambda: ops.qk_rmsnorm(x.unsqueeze(1) if x.dim() == 2 else x, w, out=out)), [x]


def test_fuzz_bad_inputs_raise_clean_errors():
    rng = random.Random(1234)
    n_raised = 0
    for i in range(1200):
        fn, watched = _bad_case(rng)
        before = [t.clone().reshape(-1) for t in watched if isinstance(t, torch.Tensor)]
        try:
            fn()
        except (ValueError, TypeError):
            n_raised += 1
        else:
            raise AssertionError(f"case {i}: a bad input was accepted")
        torch.cuda.synchronize()  # a launch that slipped through and faulted would surface here
        for b, t in zip(before, [t for t in watched if isinstance(t, torch.Tensor)]):
            assert torch.equal(b.view(torch.uint8), t.reshape(-1).view(torch.uint8)), f"case {i}: input modified"
    assert n_raised == 1200
