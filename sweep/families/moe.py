"""The fused MoE's harness side (kernels/moe_problem.py, kernels/moe_config.py: a layer of E experts at T
tokens): labels, study-name parts, the cost model's call time, the torch peer (the weights dequantised to
bf16 once, torch._grouped_mm for FC1 and FC2: W4A16 problems, torch has no FP4 activations), the host-cost
calls and the compile-check GEMMs of the moe set's layers."""
from __future__ import annotations

import math

from kernels.moe_config import gemm_shapes, smem_bytes as moe_smem
from kernels.moe_problem import expected_experts_touched, rows_per_expert, weight_bytes

from .. import synthetic as model
from . import Harness

MMA_SYNC_TFLOPS = 660.0  # dense bf16 mma.sync rate of the model device (about 2/3 of its wgmma peak)


def shape_text(row) -> str:
    """T and the layer."""
    local = f", {row['local_experts']} local" if row["local_experts"] else ""
    return (f"T={row['T']} E{row['E']} top-{row['top_k']} H{row['C']} I{row['I']}, {row['quant_mode']} "
            f"{row['activation']}, {row['routing']} routing{local}")


def facet_subtitle(k: dict) -> str:
    local = k["local_experts"]
    return f"{k['quant_mode']} {k['activation']}, {k['routing']} routing" + (f", {local} local experts" if local else "")


def describe_set(ps) -> tuple:
    """The set's layers, then the lists crossed with them (one line each, in file order)."""
    from kernels.moe_problem import layer_label

    layers = dict.fromkeys((n, p.E, p.top_k, p.H, p.I, p.activation, p.local_experts or "all", layer_label(p))
                           for n, p in zip(ps.moe_names, ps.moe_problems))
    footer = [f"{what}: {', '.join(map(str, dict.fromkeys(getattr(p, attr) for p in ps.moe_problems)))}"
              for what, attr in (("tokens", "T"), ("routing", "routing"), ("quant modes", "quant_mode"))]
    return len(ps.moe_problems), "moe", (["layer", "E", "top_k", "H", "I", "activation", "local", "label"],
                                         [list(r) for r in layers], footer + [f"{len(ps.moe_problems)} problems"])


def study_parts(p) -> list:
    """The layer and its routing besides C = H."""
    return [p.quant_mode, p.activation, p.routing, f"E{p.E}", f"k{p.top_k}", f"I{p.I}"] + \
        ([f"L{p.local_experts}"] if p.local_experts else [])


def peer_unsupported(p, impl: str) -> str | None:
    if impl != "torch_eager":
        return f"{impl} has no fused MoE for Hopper" if impl != "torch_compile" else \
            "torch.compile of the grouped-GEMM baseline is not set up"
    if p.quant_mode != "w4a16":
        return "torch has no FP4 activations (W4A4); its bf16 baseline is benched on the w4a16 problems"
    import torch

    return None if hasattr(torch, "_grouped_mm") else "this torch has no torch._grouped_mm"


_DEQUANT: list = []  # [(the case's w1 tensor, (W1, W2) bf16)]: one layer's dequantised weights at a time


def _dequantized_bf16(packed, scales, alpha):
    """bf16 alpha * e2m1(q) * s, one expert at a time: the fp32 values and int64 codes of a whole layer at once
    (DeepSeek-V3's FC1: 256 x 4096 x 7168) need 56 GiB more than the bf16 result."""
    import torch

    from kernels.moe_quant import dequantize_weights

    E, rows, half = packed.shape
    out = torch.empty(E, rows, 2 * half, dtype=torch.bfloat16, device=packed.device)
    for e in range(E):
        out[e] = (dequantize_weights(packed[e:e + 1], scales[e:e + 1])[0] * alpha[e]).bfloat16()
    return out


def _torch_fn(p, case):
    """The fused MoE as a torch user writes it with bf16 weights (dequantised once, outside the timing): sort
    the pairs by expert, torch._grouped_mm for FC1 and FC2 (SM90 bf16 grouped GEMM), SiLU-and-mul or ReLU2
    between, routing weights, index_add_ back to the tokens."""
    import torch

    a = case.args
    if not _DEQUANT or _DEQUANT[0][0] is not a["w1_weight"]:  # held, so its identity cannot be reused
        _DEQUANT.clear()
        W1, W2 = (_dequantized_bf16(a[f"w{i}_weight"], a[f"w{i}_weight_sf"], a[f"w{i}_alpha"]) for i in (1, 2))
        _DEQUANT.append((a["w1_weight"], (W1, W2)))
    W1, W2 = _DEQUANT[0][1]
    x, ids, rw, out = a["x"], a["token_selected_experts"], a["token_final_scales"], a["out"]
    k, n_local = p.top_k, p.n_local

    def fn():
        flat = ids.reshape(-1).long()
        local = flat < n_local
        key_ = torch.where(local, flat, torch.full_like(flat, n_local))
        order = torch.argsort(key_, stable=True)
        counts = torch.zeros(n_local + 1, dtype=torch.long, device=ids.device).scatter_add_(
            0, key_, torch.ones_like(key_))[:n_local]  # bincount would sync (capture)
        rows = x[order // k]
        # rows past the last group (non-local pairs) are masked below: no host sync, capturable
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = torch._grouped_mm(rows, W1.transpose(1, 2), offs=offs)
        if p.activation == "silu":
            g, u = h.float().chunk(2, dim=-1)
            act = (torch.nn.functional.silu(g) * u).bfloat16()
        else:
            act = torch.relu(h.float()).square().bfloat16()
        y = torch._grouped_mm(act, W2.transpose(1, 2), offs=offs)
        w = rw.reshape(-1)[order[:y.shape[0]]] * local[order[:y.shape[0]]]
        y = torch.where(w.unsqueeze(1) != 0, y.float() * w.unsqueeze(1), 0.0)
        acc = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
        acc.index_add_(0, order[:y.shape[0]] // k, y)
        out.copy_(acc)

    return fn


def peer_build(impl: str, p, case) -> tuple:
    return _torch_fn(p, case), (lambda _res: None)


def host_calls(p, device="cuda") -> dict:
    """fused_moe as called eagerly (the default, non-syncing expert-id check), with the syncing check, without
    any check, its kernel launches alone with prebuilt arguments (the floor), and the torch grouped-GEMM
    baseline (W4A16 problems)."""
    from kernels import moe_runner

    case = moe_runner.make_case(p, device)
    fns = {"lutforge": moe_runner.public_launcher(p, case),
           "lutforge_sync": moe_runner.public_launcher(p, case, check_expert_ids="sync"),
           "lutforge_unchecked": moe_runner.public_launcher(p, case, check_expert_ids="off"),
           "lutforge_launch": moe_runner.launch_floor(p, case)}
    if peer_unsupported(p, "torch_eager") is None:
        fns["torch_eager"] = peer_build("torch_eager", p, case)[0]
    return fns


MOE_GLUE_LAUNCHES = 2  # the routing and the combine launches, around the two GEMMs


def _gemm_us(p, sh, g) -> float:
    """One grouped GEMM: its weight (and activation) bytes over the bandwidth its cp.async stages keep in
    flight, or its mma work over the tensor rate its tile reaches (rows padded to bm), whichever is longer.
    FC2's split-K multiplies the grid by g.splits, each CTA over K / splits (at most that many k-tiles in
    flight), and adds its partials: the local pairs' fp32 rows once more per split, written and read back."""
    touched = max(expected_experts_touched(p), 1e-9)
    rows = rows_per_expert(p)
    m_tiles = touched * max(1, -(-int(math.ceil(rows)) // g.bm))
    grid = max(1.0, m_tiles * (sh.N // g.bn)) * g.splits
    resident = max(1, min(model.MAX_THREADS_PER_SM // g.threads, model.MAX_CTAS_PER_SM, model.SMEM_PER_SM // moe_smem(sh, g)))
    slots = resident * model.SM_COUNT
    nb = g.bn * (2 if sh.gated else 1)
    k_tiles = sh.K // (g.bk * g.splits)
    inflight = min(grid, slots) * min(g.stages - 1, k_tiles) * (nb * g.bk // 2 + g.bm * g.bk * 2)
    bw = min(model.COPY_GBPS * 1e9, inflight / model.LATENCY_S)
    share = (sh.N * (2 if sh.gated else 1)) * sh.K / (p.fc1_rows * p.H + p.H * p.I)
    nbytes = weight_bytes(p, touched) * share * m_tiles / touched  # each m-tile of an expert reads its slab
    nbytes += m_tiles * g.bm * sh.K * 2  # A rows (the n-tiles after the first hit L2)
    nbytes += (g.splits - 1) * touched * rows * sh.N * 4 * 2  # split partials: written, read back by the sum
    padded = m_tiles * g.bm * (sh.N * (2 if sh.gated else 1)) * sh.K * 2  # flops with rows padded to bm
    intensity = g.bm * g.bn / (g.bm + g.bn) / 32  # shared-memory reads per mma: 1 from a 64x64 tile up
    rate = MMA_SYNC_TFLOPS * 1e12 * min(1.0, intensity) * min(1.0, resident * g.threads / 256)
    waves = -(-grid // slots)
    return model.WAVE_US * waves + max(nbytes / bw, padded / rate) * 1e6


def synthetic_us(p, cfg) -> float:
    """A fused-MoE call: the glue launches, then FC1 and FC2."""
    if p.T == 0:
        return model.LAUNCH_US
    fc1, fc2 = gemm_shapes(p.quant_mode, p.activation, p.H, p.I)
    return model.LAUNCH_US * MOE_GLUE_LAUNCHES + _gemm_us(p, fc1, cfg.gemm("fc1")) + _gemm_us(p, fc2, cfg.gemm("fc2"))


def synthetic_smem(p, cfg) -> int:
    return max(moe_smem(sh, cfg.gemm(sh.layer)) for sh in gemm_shapes(p.quant_mode, p.activation, p.H, p.I))


def compile_cases(arch: str, configs: int, quick: bool) -> tuple:
    """The FC1/FC2 GEMMs of every layer of the moe problem set (kernels.fused_moe.compile_check_cases)."""
    from kernels.fused_moe import compile_check_cases, compile_gemm
    from problem_sets.moe import moe_problems

    layers = dict.fromkeys((p.H, p.I, p.activation) for p in moe_problems("moe"))
    return (compile_check_cases(list(layers), configs, arch=arch), compile_gemm,
            lambda sh, c: f"fused_moe {sh.layer:3s} {sh.activation:5s} {sh.out_dtype:4s} K={sh.K:<6d} N={sh.N:<6d} "
                          f"{c.short():26s}", "fused-MoE GEMMs")



def _no_inline_shapes(op, shapes, in_dtype, out, layout) -> list:
    raise ValueError("--shapes gives row shapes (TxC, TxHxD); fused_moe takes a problem set with a [moe] layers table (e.g. --problem-set moe)")


HARNESS = Harness(
    x_title="tokens T", x_symbol="T", c_title=lambda k: "hidden C", shape_header="layer", shape_text=shape_text,
    size_label=lambda row: str(int(row["T"])),
    facet_fields=("quant_mode", "activation", "routing", "local_experts"), facet_subtitle=facet_subtitle,
    describe_set=describe_set,
    scale_layouts=lambda op, out: ("rowmajor",), inline_problems=_no_inline_shapes,
    study_parts=study_parts, size_token=lambda p: f"T{p.T}",
    peer_unsupported=peer_unsupported, peer_build=peer_build, host_calls=host_calls,
    synthetic_us=synthetic_us, synthetic_smem=synthetic_smem, compile_cases=compile_cases,
    host_launches=32)  # the torch baseline's ~30 ops (fused_moe: 4 launches)
