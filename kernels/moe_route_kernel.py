"""The fused MoE's routing permutation in one launch (CuTe-DSL, one CTA): what kernels/fused_moe.route does with
~20 torch ops, whose host cost (about 5 us each) would dwarf a decode layer's GPU time.

From expert ids [P] (P = tokens * top_k pairs) it writes, for the grouped GEMMs (kernels/moe_kernel.py):
expert_offsets [E+1] (the sorted positions of each local expert), tile offsets [E+1] for FC1's and FC2's
row tile, and per sorted position the pair's token (FC1's A row), the pair index (FC2's output row) and its
routing weight. Pairs of experts outside [offset, offset + E) count under a last bucket E: sorted after the
local ones, covered by no tile. Per pair it also writes whether it is local (valid [P]: the combine kernel,
kernels/moe_combine_kernel.py, skips the others' never-written FC2 rows, so no buffer is zero-filled), and
the number of ids outside [0, num_experts) when there are any (bad [1], written only then: fused_moe points
it at a pinned host word its check reads, kernels/fused_moe.py, instead of running its own reduction).
With the combine folded into FC2 (kernels/moe_gemv_kernel.py) it also zeroes FC2's column-tile counters.

1. count: each thread walks pairs tid, tid + threads, ... and adds 1 to its expert's shared counter (atomics);
2. scan (warp 0): lane l sums experts [l*c, (l+1)*c), an inclusive shuffle scan gives its start, then the
   lane writes its experts' offsets, tile offsets and cursors;
3. scatter: each pair takes the next position of its expert (atomic add on the cursor) and writes its row
   data there. Rows of one expert come out in no fixed order: every GEMM row is independent and FC2 writes
   by pair index, so the layer's output does not depend on it.
One CTA: at T=16384, top-8 (131072 pairs) this is ~256 shared atomics per thread, microseconds next to the
GEMMs' milliseconds; at decode sizes it is one short launch.

W4A4 (spec.quant_h = H): the launch's other CTAs fake-quantise x to NVFP4 (kernels/moe_quant.py conventions,
global scale 1, one 16-element block per thread and step) into xq [T, H] bf16, the values FC1 multiplies, while
CTA 0 routes. Once per call: done inside FC1 instead, every CTA of a row tile re-quantised the same rows (N / bn
CTAs of them), and the decode GEMV every lane's 32 activations per chunk round, ~5x the round's weight
expansion (W4A4 Mixtral-8x7B at T=1 ran at 227.8 us against W4A16's 87.5 on the H200:
results/h200/e2e/fused_moe_decode.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import BFloat16, Float32, Int32, const_expr

from .moe_config import PDL
from .moe_kernel import _fake_quantize_block

THREADS = 512
QUANT_MAX_CTAS = 264  # the quantising CTAs of a launch: two per SM of the H200 (132); more T loops over them


@dataclass(frozen=True)
class MoERouteSpec:
    n_local: int  # local experts (compile-time: a layer's own)
    top_k: int
    bm1: int  # FC1's row tile
    bm2: int  # FC2's row tile
    ids_dtype: str  # int32 | int64
    scale_dtype: str  # fp32 | bf16
    quant_h: int = 0  # W4A4: x's hidden size, fake-quantised into xq by the other CTAs (0: no quantisation)
    counters: int = 0  # the FC2 column tiles' arrival counters it zeroes (the folded combine's; 0: none)


def quant_ctas(spec: MoERouteSpec, T: int) -> int:
    """The quantising CTAs of a launch for T tokens (0 without quantisation): a block of 16 per thread."""
    if not spec.quant_h:
        return 0
    return max(1, min(QUANT_MAX_CTAS, -(-T * (spec.quant_h // 16) // THREADS)))


class MoERouteKernel:
    def __init__(self, spec: MoERouteSpec):
        self.spec = spec
        self.E = spec.n_local
        self.per_lane = -(-(spec.n_local + 1) // 32)  # buckets each lane of the scanning warp owns

    @cute.jit
    def __call__(self, ids_ptr: cute.Pointer, scale_ptr: cute.Pointer, eo_ptr: cute.Pointer, to1_ptr: cute.Pointer,
                 to2_ptr: cute.Pointer, a_rows_ptr: cute.Pointer, out_rows_ptr: cute.Pointer,
                 row_scale_ptr: cute.Pointer, valid_ptr: cute.Pointer, bad_ptr: cute.Pointer, P: Int32,
                 offset: Int32, num_experts: Int32, x_ptr, xq_ptr, n_quant: Int32, stream, counters_ptr=None):
        E = self.E
        mIds = cute.make_tensor(ids_ptr, cute.make_layout((P,)))
        mScale = cute.make_tensor(scale_ptr, cute.make_layout((P,)))
        mEO = cute.make_tensor(eo_ptr, cute.make_layout((E + 1,)))
        mTO1 = cute.make_tensor(to1_ptr, cute.make_layout((E + 1,)))
        mTO2 = cute.make_tensor(to2_ptr, cute.make_layout((E + 1,)))
        mARows = cute.make_tensor(a_rows_ptr, cute.make_layout((P,)))
        mORows = cute.make_tensor(out_rows_ptr, cute.make_layout((P,)))
        mRScale = cute.make_tensor(row_scale_ptr, cute.make_layout((P,)))
        mValid = cute.make_tensor(valid_ptr, cute.make_layout((P,)))
        mBad = cute.make_tensor(bad_ptr, cute.make_layout((1,)))
        mX, mXq = None, None
        if const_expr(self.spec.quant_h):  # [T * H / 16] 16-element blocks of x and of xq
            blocks = (P // self.spec.top_k) * (self.spec.quant_h // 16)
            mX = cute.zipped_divide(cute.make_tensor(x_ptr, cute.make_layout((blocks * 16,))), (16,))
            mXq = cute.zipped_divide(cute.make_tensor(xq_ptr, cute.make_layout((blocks * 16,))), (16,))
        mCounters = None
        if const_expr(self.spec.counters):
            mCounters = cute.make_tensor(counters_ptr, cute.make_layout((self.spec.counters,)))
        self.kernel(mIds, mScale, mEO, mTO1, mTO2, mARows, mORows, mRScale, mValid, mBad, P, offset,
                    num_experts, mX, mXq, mCounters).launch(
            grid=[1 + n_quant, 1, 1], block=[THREADS, 1, 1], stream=stream)

    @cute.jit
    def _bucket(self, mIds, j, offset, num_experts):
        """(local bucket of pair j's expert, E when not local; 1 when its id is outside [0, num_experts)),
        compared in the ids' own dtype (an int64 id is not truncated into range)."""
        v = mIds[j]
        b = Int32(self.E)
        bad = Int32(1)
        if v >= 0 and v < num_experts:
            bad = Int32(0)
            e = Int32(v) - offset
            if e >= 0 and e < self.E:
                b = e
        return b, bad

    @cute.kernel
    def kernel(self, mIds: cute.Tensor, mScale: cute.Tensor, mEO: cute.Tensor, mTO1: cute.Tensor,
               mTO2: cute.Tensor, mARows: cute.Tensor, mORows: cute.Tensor, mRScale: cute.Tensor,
               mValid: cute.Tensor, mBad: cute.Tensor, P: Int32, offset: Int32, num_experts: Int32, mX, mXq,
               mCounters):
        bid, _, _ = cute.arch.block_idx()
        if const_expr(PDL):  # FC1 may launch now: it waits for this grid before reading anything (moe_config.PDL)
            cute.arch.griddepcontrol_launch_dependents()
        if bid == 0:
            self._route(mIds, mScale, mEO, mTO1, mTO2, mARows, mORows, mRScale, mValid, mBad, P, offset, num_experts)
            if const_expr(self.spec.counters):  # FC2 counts on them only after FC1, which waits for this grid
                tidx, _, _ = cute.arch.thread_idx()
                for i in cutlass.range_constexpr(-(-self.spec.counters // THREADS)):
                    if tidx + i * THREADS < self.spec.counters:
                        mCounters[tidx + i * THREADS] = Int32(0)
        if const_expr(self.spec.quant_h):
            if bid > 0:
                self._quantize(mX, mXq, bid - 1)

    @cute.jit
    def _quantize(self, mX, mXq, cta):
        """Blocks cta * THREADS + tid, then a grid's worth further on, of x into xq."""
        tidx, _, _ = cute.arch.thread_idx()
        nq, _, _ = cute.arch.grid_dim()
        n = cute.size(mX, mode=[1])
        for b in cutlass.range(cta * THREADS + tidx, n, (nq - 1) * THREADS, unroll=1):
            blk = cute.make_rmem_tensor((16,), BFloat16)
            cute.autovec_copy(mX[(None,), b], blk)
            f = cute.make_rmem_tensor((16,), Float32)
            f.store(blk.load().to(Float32))
            _fake_quantize_block(f, Float32(1.0))
            blk.store(f.load().to(BFloat16))
            cute.autovec_copy(blk, mXq[(None,), b])

    @cute.jit
    def _route(self, mIds, mScale, mEO, mTO1, mTO2, mARows, mORows, mRScale, mValid, mBad, P, offset, num_experts):
        E, per = self.E, self.per_lane
        bm1, bm2 = self.spec.bm1, self.spec.bm2
        tidx, _, _ = cute.arch.thread_idx()
        smem = cutlass.utils.SmemAllocator()
        cnt = smem.allocate_tensor(Int32, cute.make_layout((E + 1,)), byte_alignment=16)
        cur = smem.allocate_tensor(Int32, cute.make_layout((E + 1,)), byte_alignment=16)
        nbad = smem.allocate_tensor(Int32, cute.make_layout((1,)), byte_alignment=16)
        if tidx == 0:
            nbad[0] = Int32(0)
        for i in cutlass.range_constexpr(-(-(E + 1) // THREADS)):
            b = tidx + i * THREADS
            if b < E + 1:
                cnt[b] = Int32(0)
        cute.arch.barrier()

        for j in cutlass.range(tidx, P, THREADS, unroll=1):
            b, bad = self._bucket(mIds, j, offset, num_experts)
            cute.arch.atomic_add(cnt.iterator + b, Int32(1), scope="cta")
            if bad != 0:
                cute.arch.atomic_add(nbad.iterator, Int32(1), scope="cta")
        cute.arch.barrier()
        if tidx == 0:
            if nbad[0] > 0:  # only a bad call writes: a later good one cannot erase the count before it is read
                mBad[0] = nbad[0]

        if tidx < 32:
            rows = Int32(0)
            t1 = Int32(0)
            t2 = Int32(0)
            for q in cutlass.range_constexpr(per):
                b = tidx * per + q
                if b < E:
                    c = cnt[b]
                    rows = rows + c
                    t1 = t1 + (c + (bm1 - 1)) // bm1
                    t2 = t2 + (c + (bm2 - 1)) // bm2
            r_in, t1_in, t2_in = rows, t1, t2
            for d in cutlass.range_constexpr(5):
                step = 1 << d
                vr = cute.arch.shuffle_sync_up(r_in, offset=step)
                v1 = cute.arch.shuffle_sync_up(t1_in, offset=step)
                v2 = cute.arch.shuffle_sync_up(t2_in, offset=step)
                if tidx >= step:
                    r_in = r_in + vr
                    t1_in = t1_in + v1
                    t2_in = t2_in + v2
            run_r, run_1, run_2 = r_in - rows, t1_in - t1, t2_in - t2  # this lane's first bucket's offsets
            for q in cutlass.range_constexpr(per):
                b = tidx * per + q
                if b <= E:  # bucket E (non-local pairs) gets the totals: the end of every table
                    mEO[b] = run_r
                    mTO1[b] = run_1
                    mTO2[b] = run_2
                    cur[b] = run_r
                if b < E:
                    c = cnt[b]
                    run_r = run_r + c
                    run_1 = run_1 + (c + (bm1 - 1)) // bm1
                    run_2 = run_2 + (c + (bm2 - 1)) // bm2
        cute.arch.barrier()

        for j in cutlass.range(tidx, P, THREADS, unroll=1):
            b, _ = self._bucket(mIds, j, offset, num_experts)
            pos = cute.arch.atomic_add(cur.iterator + b, Int32(1), scope="cta")
            local = Int32(0)
            if b < self.E:
                local = Int32(1)
            mValid[j] = local
            mARows[pos] = j // self.spec.top_k
            mORows[pos] = j
            mRScale[pos] = Float32(mScale[j])
