"""Run one fused-MoE (problem, config) on the GPU for the sweep, as kernels/runner.py does for the norms:
random inputs, a poisoned output, a graph-capturable launch of the public op with the config forced, and a
check against the float64 reference (kernels/moe_reference.py).

A layer's weights (random normal, ModelOpt NVFP4) are made once per layer and shared by every case: they are
gigabytes for the large layers. Cases differ in x and in their routing, drawn from the problem's routing
model (kernels/moe_problem.py: uniform, or Zipf-skewed; top_k distinct experts per token), so the timer's
rotation over cases also rotates over experts; a case's `nbytes` counts the bytes one call touches (its
experts' weights, x, the output, the routing), which is what the rotation must exceed L2 by.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import moe_problem as mp
from .runner import POISON_BYTE, Case, CheckResult, poison  # noqa: F401 (family API)

W4A16_TOL = 2.0**-6  # max |err| over max |ref|: bf16 output, fp32 accumulation of bf16-exact products
W4A4_TOL = 0.03  # Frobenius: an fp32 activation ulps off the reference's may take the next e2m1 code

_LAYER: dict = {}  # (layer key, device) -> weights: one layer at a time


@dataclass
class MoECase(Case):
    touched_bytes: int = 0

    @property
    def nbytes(self) -> int:
        return self.touched_bytes


def layer_tensors(n_local: int, fc1_rows: int, H: int, I: int, quant_mode: str, device, seed: int = 1234) -> dict:  # noqa: E741
    """One layer's fused_moe weight arguments: random normal weights (std 0.05) in ModelOpt NVFP4, alphas
    carrying the global scales, and fc2_input_scale 4 for W4A4 (None for W4A16)."""
    from .moe_quant import quantize_weights

    g = torch.Generator(device=device).manual_seed(seed)

    def quantized(rows: int, K: int) -> tuple[torch.Tensor, ...]:
        # expert by expert: the fp32 weights of a whole DeepSeek-V3 layer at once (28 GB, and the encoder's
        # temporaries beside them) ran out of the H200's memory
        parts = [quantize_weights(torch.randn(1, rows, K, generator=g, device=device) * 0.05) for _ in range(n_local)]
        return tuple(torch.cat(t) for t in zip(*parts))

    w1q, w1sf, gs1 = quantized(fc1_rows, H)
    w2q, w2sf, gs2 = quantized(H, I)
    fc2s = torch.tensor([4.0], device=device) if quant_mode == "nvfp4" else None
    return dict(w1_weight=w1q, w1_weight_sf=w1sf, w2_weight=w2q, w2_weight_sf=w2sf, w1_alpha=(1.0 / gs1).float(),
                w2_alpha=(1.0 / (gs2 * (fc2s if fc2s is not None else 1.0))).float(), fc2_input_scale=fc2s)


def _weights(p: mp.MoEProblem, device) -> dict:
    key = (p.E, p.top_k, p.H, p.I, p.activation, p.quant_mode, p.local_experts, str(device))
    if key not in _LAYER:
        _LAYER.clear()
        _LAYER[key] = layer_tensors(p.n_local, p.fc1_rows, p.H, p.I, p.quant_mode, device)
    return _LAYER[key]


def draw_routing(p: mp.MoEProblem, g: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids int32 [T, top_k], routing weights fp32 [T, top_k] summing to 1 per token): top_k distinct
    experts per token drawn without replacement by the routing model's probabilities."""
    probs = torch.tensor(mp.routing_probabilities(p.E, p.routing), device=device)
    if p.T == 0:
        return (torch.empty(0, p.top_k, dtype=torch.int32, device=device),
                torch.empty(0, p.top_k, dtype=torch.float32, device=device))
    ids = torch.multinomial(probs.expand(p.T, p.E), p.top_k, replacement=False, generator=g)
    w = torch.softmax(torch.randn(p.T, p.top_k, generator=g, device=device), dim=-1)
    return ids.to(torch.int32), w.float()


def make_case(problem: mp.MoEProblem, device="cuda", seed: int = 0) -> MoECase:
    return make_cases(problem, 1, device, seed)[0]


def make_cases(problem: mp.MoEProblem, n: int, device="cuda", seed: int = 0) -> list[MoECase]:
    """`n` instances sharing the layer's weights: x randn (never zeros), routing drawn per case, output
    poisoned (NaN in bf16)."""
    if n < 1:
        raise ValueError(f"need at least one case, got {n}")
    p = problem
    w = _weights(p, device)
    g = torch.Generator(device=device).manual_seed(seed)
    touched = round(mp.ideal_bytes(p))
    cases = []
    for _ in range(n):
        x = torch.randn(p.T, p.H, generator=g, device=device).to(torch.bfloat16)
        ids, rw = draw_routing(p, g, device)
        out = torch.empty(p.T, p.H, dtype=torch.bfloat16, device=device)
        out.view(torch.uint8).fill_(POISON_BYTE)
        args = dict(x=x, token_selected_experts=ids, token_final_scales=rw, **w, out=out)
        inputs = {k: v for k, v in args.items() if k != "out"}
        cases.append(MoECase(p, inputs, args, outputs=("out",), touched_bytes=touched))
    return cases


def _call(p: mp.MoEProblem, case: Case, configs=None, check_expert_ids: str = "deferred"):
    """A zero-argument fused_moe call on the case's tensors (CUDA-graph capturable: the default expert-id check
    does not sync)."""
    from .fused_moe import fused_moe

    a = case.args
    return lambda: fused_moe(a["x"], a["w1_weight"], a["w1_weight_sf"], a["w2_weight"], a["w2_weight_sf"],
                             a["token_selected_experts"], a["token_final_scales"], p.E, p.top_k,
                             w1_alpha=a["w1_alpha"], w2_alpha=a["w2_alpha"], fc2_input_scale=a["fc2_input_scale"],
                             num_local_experts=p.n_local, output=a["out"], activation=p.activation,
                             quant_mode=p.quant_mode, configs=configs, check_expert_ids=check_expert_ids)


def launch_floor(problem: mp.MoEProblem, case: Case):
    """The dispatched call's launches with prebuilt arguments (kernels.fused_moe._Launch.floor): the floor of
    fused_moe's host cost, what its Python costs on top of the TVM-FFI calls themselves."""
    from . import fused_moe as fm

    a, p = case.args, problem
    fc2s = a["fc2_input_scale"] if p.quant_mode == "nvfp4" else None
    _, launch = fm._resolve(a["x"], a["w1_weight"], a["w1_weight_sf"], a["w2_weight"], a["w2_weight_sf"],
                            a["token_selected_experts"], a["token_final_scales"], a["w1_alpha"], a["w2_alpha"], fc2s,
                            a["out"], p.E, p.top_k, p.n_local, 0, p.quant_mode, p.activation, torch.bfloat16, None)
    if launch is None:
        return lambda: None
    return launch.floor(a["x"], a["w1_weight"], a["w1_weight_sf"], a["w2_weight"], a["w2_weight_sf"],
                        a["token_selected_experts"], a["token_final_scales"], a["w1_alpha"], a["w2_alpha"], fc2s,
                        a["out"], 0, p.E)


def launcher(problem: mp.MoEProblem, cfg, case: Case, arch: str | None = None):
    """The call with `cfg` (kernels.moe_config.MoEConfig) forced, on the current stream."""
    return _call(problem, case, configs=(cfg.gemm("fc1"), cfg.gemm("fc2")))


def expected_outputs(problem: mp.MoEProblem, case: Case) -> dict:
    from .moe_reference import fused_moe_reference

    i, p = case.inputs, problem
    return {"out": fused_moe_reference(
        i["x"], i["w1_weight"], i["w1_weight_sf"], i["w2_weight"], i["w2_weight_sf"], i["token_selected_experts"],
        i["token_final_scales"], w1_alpha=i["w1_alpha"], w2_alpha=i["w2_alpha"],
        fc2_input_scale=i["fc2_input_scale"], activation=p.activation, quant_mode=p.quant_mode)}


def compare(problem: mp.MoEProblem, got: torch.Tensor, ref: torch.Tensor) -> CheckResult:
    """W4A16: max |err| / max |ref| <= 2^-6; W4A4: Frobenius relative error <= 3 %; no NaN either way."""
    if torch.isnan(got).any():
        return CheckResult(False, float("inf"), None, "NaN in the output (unwritten or overflowed)")
    if got.numel() == 0:
        return CheckResult(True, 0.0, None, "empty")
    err = (got.float() - ref).abs()
    if problem.quant_mode == "w4a16":
        rel, tol, what = float(err.max() / ref.abs().max().clamp(min=1e-12)), W4A16_TOL, "max err / max |ref|"
    else:
        rel, tol, what = float(err.norm() / ref.norm().clamp(min=1e-12)), W4A4_TOL, "Frobenius relative error"
    return CheckResult(rel <= tol, rel, None, f"{what} {rel:.3g} (tolerance {tol:.3g})")


def check(problem: mp.MoEProblem, case: Case, expected: dict | None = None) -> CheckResult:
    if expected is None:
        expected = expected_outputs(problem, case)
    return compare(problem, case.args["out"], expected["out"])


def public_launcher(problem, case, check_expert_ids: str = "deferred"):
    """fused_moe on a fused-MoE case with no config forced: the LUT entry for the call's T or the heuristic,
    as a serving engine's call gets."""
    return _call(problem, case, check_expert_ids=check_expert_ids)
