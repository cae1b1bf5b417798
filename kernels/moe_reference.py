"""The float reference of `fused_moe`: dequantised weights, float64 GEMMs, the op's conventions.

What it models, step by step (kernels/fused_moe.py does the same with bf16 tensor cores, fp32 accumulation):

1. FC1 input: x (bf16 values) in "w4a16"; its NVFP4 fake-quantisation with global scale 1 in "nvfp4".
2. h = (a @ W1_e^T) * w1_alpha[e], W1_e = e2m1 * e4m3 (no global scale: alpha carries it).
3. "silu": silu(h[:, :I]) * h[:, I:] (gate rows first, as vLLM's SiluAndMul); "relu2": relu(h)^2.
4. FC2 input: the activation rounded to bf16 ("w4a16"), or NVFP4 fake-quantised with fc2_input_scale.
5. y = (act @ W2_e^T) * w2_alpha[e] * routing weight; out[t] = sum over the token's local pairs.

Pairs whose expert is not local ([local_expert_offset, + num_local_experts)) contribute nothing.
"""
from __future__ import annotations

import torch

from .moe_quant import dequantize_weights, fake_quantize_nvfp4


def fused_moe_reference(x, w1_weight, w1_weight_sf, w2_weight, w2_weight_sf, token_selected_experts,
                        token_final_scales, *, w1_alpha, w2_alpha, fc2_input_scale=None, local_expert_offset=0,
                        activation="silu", quant_mode="nvfp4") -> torch.Tensor:
    """float32 [T, H] (the op rounds it to its output dtype)."""
    T, H = x.shape
    n_local = w1_weight.shape[0]
    a_in = x.float()
    if quant_mode == "nvfp4":
        a_in = fake_quantize_nvfp4(a_in, torch.ones((), device=x.device))
    out = torch.zeros(T, H, dtype=torch.float64, device=x.device)
    ids = token_selected_experts.long() - local_expert_offset
    for e in range(n_local):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        # one expert's weights at a time: a whole DeepSeek-V3 layer in float64 would be 60 GB
        W1 = dequantize_weights(w1_weight[e:e + 1], w1_weight_sf[e:e + 1])[0].double()
        W2 = dequantize_weights(w2_weight[e:e + 1], w2_weight_sf[e:e + 1])[0].double()
        h = (a_in[tok].double() @ W1.T) * float(w1_alpha[e])
        if activation == "silu":
            inter = h.shape[1] // 2
            act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
        else:
            act = torch.relu(h) ** 2
        if quant_mode == "nvfp4":
            act = fake_quantize_nvfp4(act.float(), fc2_input_scale.reshape(()).float())
        else:
            act = act.to(torch.bfloat16)
        y = (act.double() @ W2.T) * float(w2_alpha[e]) * token_final_scales[tok, slot].double().unsqueeze(1)
        out.index_add_(0, tok, y)
    return out.float()
