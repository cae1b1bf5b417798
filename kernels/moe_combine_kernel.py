"""The fused MoE's last step in one launch (CuTe-DSL): each token's output row is the fp32 sum of its top_k
pairs' FC2 rows (and of every K split's partial of them), rounded once to bf16.

It replaces `out.copy_(y.view(T, top_k, H).sum(1))` - a reduction, a temporary and a copy, three torch calls
of ~5 us host each, which at decode cost more than the layer's GPU time. FC2 (kernels/moe_kernel.py) writes
y [splits, P, H] fp32 by pair index; pairs whose expert is not local (expert parallelism, or an id out of range
under CUDA-graph capture) are written by no split, and the routing kernel marks them in valid [P]
(kernels/moe_route_kernel.py): they are skipped, so y is never zero-filled.

One thread per 8-column vector of an output row: it reads its vector of each pair and split (two 16-byte
loads each; a split's loads all issued before the first use), adds those of the local pairs in a fixed order
(split-major, then the pair's rank in the token: the result does not depend on the routing kernel's order)
and stores 16 bytes of bf16.
"""
from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64

from .moe_config import PDL
from .pdl import await_predecessor_and_release

THREADS = 256
VEC = 8  # fp32 elements per thread and row: two 16-byte loads, one 16-byte bf16 store


@dataclass(frozen=True)
class MoECombineSpec:
    top_k: int
    splits: int  # FC2's K splits (1: unsplit)
    H: int  # hidden size (a multiple of 64)


def grid_for(spec: MoECombineSpec, T: int) -> int:
    """CTAs a call with T tokens launches."""
    return -(-T * (spec.H // VEC) // THREADS)


class MoECombineKernel:
    def __init__(self, spec: MoECombineSpec):
        self.spec = spec

    @cute.jit
    def __call__(self, y_ptr: cute.Pointer, valid_ptr: cute.Pointer, out_ptr: cute.Pointer, T: Int32, P: Int32,
                 grid: Int32, stream):
        H, splits = self.spec.H, self.spec.splits
        mY = cute.make_tensor(y_ptr, cute.make_layout((splits * P, H), stride=(cute.assume(Int64(H), divby=8), 1)))
        mValid = cute.make_tensor(valid_ptr, cute.make_layout((P,)))
        mOut = cute.make_tensor(out_ptr, cute.make_layout((T, H), stride=(cute.assume(Int64(H), divby=8), 1)))
        self.kernel(mY, mValid, mOut, T, P).launch(grid=[grid, 1, 1], block=[THREADS, 1, 1], stream=stream,
                                                    use_pdl=PDL)

    @cute.kernel
    def kernel(self, mY: cute.Tensor, mValid: cute.Tensor, mOut: cute.Tensor, T: Int32, P: Int32):
        top_k, splits, H = self.spec.top_k, self.spec.splits, self.spec.H
        per_row = H // VEC
        tidx, _, _ = cute.arch.thread_idx()
        bidx, _, _ = cute.arch.block_idx()
        await_predecessor_and_release(PDL)  # moe_config.PDL
        i = bidx * THREADS + tidx
        t = i // per_row
        c = i % per_row
        if t < T:
            mYv = cute.zipped_divide(mY, (1, VEC))
            mOutv = cute.zipped_divide(mOut, (1, VEC))
            # the flags, then a split's vectors of every pair, loaded before any is used (no branch around the
            # loads): behind a per-pair branch they were a chain of dependent round trips, 9.7 us for one token
            # of Qwen3-30B-A3B (top_k 8, 2 splits) under ncu on the H100 (results/logs/ncu_moe_decode_h100.txt); with
            # the GEMMs' ballot expert count the layer's T=1 call went from 25.7 to 22.7 us (H100, two calls:
            # results/h100/e2e/fused_moe_decode.md, results/logs/moe_decode_latency_h100.md).
            # A row that is not local is read (y holds every pair's row) but never added.
            valid = cute.make_rmem_tensor((top_k,), Int32)
            for k in cutlass.range_constexpr(top_k):
                valid[k] = mValid[t * top_k + k]
            acc = cute.make_rmem_tensor((VEC,), Float32)
            acc.fill(0.0)
            parts = cute.make_rmem_tensor(cute.make_layout((VEC, top_k), stride=(1, VEC)), Float32)
            for z in cutlass.range_constexpr(splits):
                for k in cutlass.range_constexpr(top_k):
                    cute.autovec_copy(mYv[(0, None), (z * P + t * top_k + k, c)], parts[None, k])
                for k in cutlass.range_constexpr(top_k):
                    if valid[k] != 0:
                        acc.store(acc.load() + parts[None, k].load())
            o = cute.make_rmem_tensor((VEC,), cutlass.BFloat16)
            o.store(acc.load().to(cutlass.BFloat16))
            cute.autovec_copy(o, mOutv[(0, None), (t, c)])
