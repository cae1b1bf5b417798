"""The fused-MoE grouped GEMM for decode on CUDA cores (CuTe-DSL): a grouped GEMV, for m-tiles of 1-8 rows.

Why: at decode an expert sees a handful of rows, so the layer is a read of its FP4 weights, and the mma.sync
kernel (kernels/moe_kernel.py) spends that read behind two CTA barriers per k-tile, the FP4 expansion into
shared memory and a pipeline only `stages` tiles deep; on the H200 it ran the decode layers at 9-26 % of the
weight-bytes roofline (results/h200/BENCHMARKS.md, fused_moe rows at T <= 64). Here no shared memory or
barrier sits in the main loop: every lane streams its own 16-byte chunks of FP4 weights (32 codes, two
16-element scale blocks) for each of its weight rows, expands them in registers with the same exact sequence
as the mma kernel (kernels.moe_kernel._expand_pair: e2m1 x e4m3 is exact in bf16) and multiplies them with
the m-tile's activation rows in fp32 (an activation block unpacked once and used by every weight row, a weight
pair once per activation row). Latency is hidden by the many warps and the loads of all the lane's rows issued
before their first use.

Work split (the config's knobs, kernels/moe_config.py, mma="fma"):
* grid (grid_m, N / bn, splits) as the mma kernels: x the m-tiles of the local experts (tile -> expert by
  binary search over tile_offsets), y the column tiles, z FC2's K splits (partials written to their own slice
  of the output rows, as the mma kernel's).
* a CTA of warps_m x warps_n warps: warps_n column groups of bn / warps_n output columns each (a gated FC1
  warp also reads the columns' up rows), warps_m groups along K (each a share of the split's chunks; their
  sums meet in shared memory).
* a lane takes chunks lane, lane + 32 * warps_m, ... of its K group's range; per chunk and weight row one
  16-byte load and two scale bytes. `stages - 1` chunk rounds are loaded together before the first is used:
  more bytes in flight per round trip where K is long (DeepSeek-V3's 7168 takes 14 rounds at warps_m 1).
Epilogue: warp shuffles sum each (row, weight row) accumulator, the K groups add through shared memory, then
one thread per (row, column) applies alpha and the activation (gated SiLU, ReLU2), FC2's routing weight and
output row, and stores; W4A4 FC1 fake-quantises its activation rows per 16-element block as they are loaded
(global scale 1) and its output in 16-column NVFP4 blocks (the FC2 input's global scale), as the mma kernel.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, Uint32, const_expr

from .moe_config import GEMV_CHUNK, gemv_rows
from .moe_kernel import (MoEGemmSpec, _e4m3_to_f32, _expand_pair, _fake_quantize_block, expert_of_tile,
                         routing_tensors)



@cute.jit
def _unpack(w):
    """bf16x2 word -> (low, high) as fp32 (a bf16 is the top half of an fp32)."""
    return cute.arch.inline_ptx("{ shl.b32 {$w0}, {$r0}, 16; and.b32 {$w1}, {$r0}, 0xFFFF0000; }",
                                write_only_types=[Float32, Float32], read_only_args=[w])


class MoEGemvKernel:
    def __init__(self, spec: MoEGemmSpec):
        sh, cfg = spec.shape, spec.cfg
        self.K, self.N = sh.K, sh.N
        self.gated = sh.layer == "fc1" and sh.activation == "silu"
        self.relu2 = sh.layer == "fc1" and sh.activation == "relu2"
        self.quant_a, self.quant_out = sh.quant_a, sh.quant_out
        self.bm, self.bn, self.splits = cfg.bm, cfg.bn, cfg.splits
        self.wk, self.wn = cfg.warps_m, cfg.warps_n  # warps along K, along the columns
        self.threads = 32 * self.wk * self.wn
        self.cols = cfg.bn // cfg.warps_n  # output columns per warp
        self.rows = gemv_rows(sh, cfg)  # weight rows per warp
        self.chunks = sh.K // (GEMV_CHUNK * cfg.splits)  # 16-byte chunks of a weight row per K split
        self.rounds = cfg.stages - 1  # chunk rounds whose loads are issued together, before the first use
        self.batches = -(-self.chunks // (32 * self.wk * self.rounds))  # load batches of one lane

    # ------------------------------------------------------------------ host side
    @cute.jit
    def __call__(self, a_ptr: cute.Pointer, a_rows_ptr, w_ptr: cute.Pointer, sf_ptr: cute.Pointer,
                 alpha_ptr: cute.Pointer, row_scale_ptr, out_rows_ptr, out_ptr: cute.Pointer,
                 expert_offsets_ptr: cute.Pointer, tile_offsets_ptr: cute.Pointer,
                 a_count: Int32, n_rows: Int32, n_experts: Int32, grid_m: Int32,
                 w_stride_e: Int64, sf_stride_e: Int64, out_count: Int32, gs_ptr, stream):
        K, N = self.K, self.N
        nw = 2 * N if self.gated else N  # weight rows per expert
        # A and W as 32-bit words: bf16 pairs, and 8 packed codes
        mA = cute.make_tensor(cute.recast_ptr(a_ptr, dtype=Uint32),
                              cute.make_layout((a_count, K // 2), stride=(cute.assume(Int64(K // 2), divby=4), 1)))
        mW = cute.make_tensor(cute.recast_ptr(w_ptr, dtype=Uint32), cute.make_layout(
            (n_experts, nw, K // 8), stride=(cute.assume(w_stride_e // 4, divby=4), K // 8, 1)))
        mSF = cute.make_tensor(sf_ptr, cute.make_layout((n_experts, nw, K // 16), stride=(sf_stride_e, K // 16, 1)))
        mAlpha, mEO, mTO, mOut, mARows, mScale, mORows, mGS = routing_tensors(
            N, n_experts, n_rows, out_count, alpha_ptr, expert_offsets_ptr, tile_offsets_ptr, out_ptr, a_rows_ptr,
            row_scale_ptr, out_rows_ptr, gs_ptr)
        self.kernel(mA, mARows, mW, mSF, mAlpha, mScale, mORows, mOut, mEO, mTO, mGS, n_rows, n_experts).launch(
            grid=[grid_m, N // self.bn, self.splits], block=[self.threads, 1, 1], stream=stream)

    # ------------------------------------------------------------------ device side
    @cute.kernel
    def kernel(self, mA: cute.Tensor, mARows, mW: cute.Tensor, mSF: cute.Tensor, mAlpha: cute.Tensor, mScale,
               mORows, mOut: cute.Tensor, mEO: cute.Tensor, mTO: cute.Tensor, mGS, n_rows: Int32, n_experts: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        tile, ntile, split = cute.arch.block_idx()
        e = expert_of_tile(mTO, tile, n_experts)
        if tile < mTO[n_experts]:
            row0 = mEO[e] + (tile - mTO[e]) * self.bm
            self._tile(mA, mARows, mW, mSF, mAlpha, mScale, mORows, mOut, mGS, e, row0, mEO[e + 1], ntile, split,
                       n_rows, tidx)

    @cute.jit
    def _w_row(self, r, n0, wn):
        """Expert weight row of the warp's weight row r: its columns' gate rows, then (gated) their up rows."""
        col = n0 + wn * self.cols + r
        if const_expr(self.gated):
            if r >= self.cols:
                col = self.N + n0 + wn * self.cols + (r - self.cols)
        return col

    @cute.jit
    def _tile(self, mA, mARows, mW, mSF, mAlpha, mScale, mORows, mOut, mGS, e, row0, row_end, ntile, split, n_rows,
              tidx):
        bm, bn, rows, cols, wk = self.bm, self.bn, self.rows, self.cols, self.wk
        lane = tidx % 32
        warp = tidx // 32
        kw = warp % wk  # the warp's K group
        wn = warp // wk  # and column group
        n0 = ntile * bn
        c_base = split * self.chunks  # the split's first chunk (of the row's K / 32)

        # the tile's activation rows (A row of each; rows past the expert's end are never read)
        src = cute.make_rmem_tensor((bm,), Int32)
        live = cute.make_rmem_tensor((bm,), cutlass.Boolean)
        for m in cutlass.range_constexpr(bm):
            s = row0 + m
            live[m] = s < row_end
            src[m] = s
            if const_expr(mARows is not None):
                if s < row_end:
                    src[m] = mARows[s]

        smem = cutlass.utils.SmemAllocator()
        sRed = smem.allocate_tensor(Float32, cute.make_layout(
            (wk, bm, self.wn * rows), stride=(bm * self.wn * rows, self.wn * rows, 1)), byte_alignment=16)
        sC = None
        if const_expr(self.quant_out):
            sC = smem.allocate_tensor(Float32, cute.make_layout((bm, bn), stride=(bn, 1)), byte_alignment=16)

        acc = cute.make_rmem_tensor((bm * rows,), Float32)
        acc.fill(0.0)
        mAv = cute.zipped_divide(mA, (1, 8))  # 8 words = one 16-element scale block of a row
        mWv = cute.zipped_divide(mW, (1, 1, 4))  # 4 words = 16 packed bytes = one chunk of a weight row
        ld16 = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), Uint32, num_bits_per_copy=128)  # one 16-byte load
        rounds = self.rounds
        wq = cute.make_rmem_tensor(cute.make_layout((rounds, rows, 4), stride=(rows * 4, 4, 1)), Uint32)
        sf = cute.make_rmem_tensor(cute.make_layout((rounds, rows, 2), stride=(rows * 2, 2, 1)), Uint32)
        wx = cute.make_rmem_tensor((rows, 8), Uint32)  # one block of every weight row, expanded (bf16 pairs)
        av = cute.make_rmem_tensor((8,), Uint32)
        blk = cute.make_rmem_tensor((16,), Float32)
        for it in cutlass.range(self.batches, unroll=1):
            # every weight row's chunk and scales of the batch's rounds first: loads in flight before any use
            for q in cutlass.range_constexpr(rounds):
                cc = ((it * rounds + q) * wk + kw) * 32 + lane  # chunk within the split
                if cc < self.chunks:
                    c = c_base + cc
                    for r in cutlass.range_constexpr(rows):
                        row = self._w_row(r, n0, wn)
                        cute.copy(ld16, mWv[(0, 0, None), (e, row, c)], wq[q, r, None])
                        for b in cutlass.range_constexpr(2):
                            sf[q, r, b] = Uint32(mSF[e, row, 2 * c + b])
            for q in cutlass.range_constexpr(rounds):
                cc = ((it * rounds + q) * wk + kw) * 32 + lane
                if cc < self.chunks:
                    c = c_base + cc
                    for h in cutlass.range_constexpr(2):  # the chunk's two 16-element scale blocks
                        for r in cutlass.range_constexpr(rows):  # expanded once, used by every live row
                            scale = _e4m3_to_f32(sf[q, r, h])
                            scale2 = Uint32(cute.arch.inline_ptx("cvt.rn.bf16x2.f32 {$w0}, {$r0}, {$r0};",
                                                                 write_only_types=[Uint32], read_only_args=[scale]))
                            for wd in cutlass.range_constexpr(2):  # 8 codes per word, 2 words per block
                                for k in cutlass.range_constexpr(4):
                                    wx[r, 4 * wd + k] = _expand_pair(wq[q, r, 2 * h + wd], k, scale2)
                        for m in cutlass.range_constexpr(bm):
                            if live[m]:  # uniform over the CTA: rows past the expert's end cost nothing
                                cute.autovec_copy(mAv[(0, None), (src[m], 2 * c + h)], av)
                                for j in cutlass.range_constexpr(8):
                                    a_lo, a_hi = _unpack(av[j])
                                    blk[2 * j] = a_lo
                                    blk[2 * j + 1] = a_hi
                                if const_expr(self.quant_a):
                                    _fake_quantize_block(blk, Float32(1.0))
                                for r in cutlass.range_constexpr(rows):
                                    for j in cutlass.range_constexpr(8):
                                        w_lo, w_hi = _unpack(wx[r, j])
                                        acc[m * rows + r] = (acc[m * rows + r] + w_lo * blk[2 * j]
                                                             + w_hi * blk[2 * j + 1])

        # the warp's sums, then the K groups', through shared memory: sRed[kw, m, weight row of the CTA]
        for m in cutlass.range_constexpr(bm):
            for r in cutlass.range_constexpr(rows):
                v = cute.arch.warp_reduction_sum(acc[m * rows + r])
                if lane == 0:
                    sRed[kw, m, wn * rows + r] = v
        cute.arch.barrier()

        alpha = mAlpha[e]
        row_base = Int32(0)  # split z writes its partial tile to output rows [z * n_rows, (z + 1) * n_rows)
        if const_expr(self.splits > 1):
            row_base = split * n_rows
        for i in cutlass.range_constexpr(-(-bm * bn // self.threads)):
            t = tidx + i * self.threads
            m = t // bn
            col = t % bn
            if t < bm * bn:
                s = row0 + m
                if s < row_end:
                    r_g = (col // cols) * rows + col % cols  # the column's gate (or only) row in sRed
                    g = Float32(0.0)
                    for q in cutlass.range_constexpr(wk):
                        g = g + sRed[q, m, r_g]
                    val = g * alpha
                    if const_expr(self.gated):
                        u = Float32(0.0)
                        for q in cutlass.range_constexpr(wk):
                            u = u + sRed[q, m, r_g + cols]
                        val = val * cute.arch.rcp_approx(1.0 + cute.math.exp(-val, fastmath=True)) * (u * alpha)
                    if const_expr(self.relu2):
                        v = cute.arch.fmax(val, Float32(0.0))
                        val = v * v
                    if const_expr(self.quant_out):
                        sC[m, col] = val
                    else:
                        if const_expr(mScale is not None):
                            val = val * mScale[s]
                        dst = s
                        if const_expr(mORows is not None):
                            dst = mORows[s]
                        mOut[dst + row_base, n0 + col] = val.to(mOut.element_type)
        if const_expr(self.quant_out):  # W4A4 FC1 (no routing weight, rows in pair order): 16-column blocks
            cute.arch.barrier()
            gs = mGS[0]
            mOutv = cute.zipped_divide(mOut, (1, 16))
            for i in cutlass.range_constexpr(-(-bm * (bn // 16) // self.threads)):
                t = tidx + i * self.threads
                m = t // (bn // 16)
                b = t % (bn // 16)
                s = row0 + m
                if t < bm * (bn // 16) and s < row_end:
                    frag = cute.make_rmem_tensor((16,), Float32)
                    for j in cutlass.range_constexpr(16):
                        frag[j] = sC[m, 16 * b + j]
                    _fake_quantize_block(frag, gs)
                    o = cute.make_rmem_tensor((16,), mOut.element_type)
                    o.store(frag.load().to(mOut.element_type))
                    cute.autovec_copy(o, mOutv[(0, None), (s, (n0 // 16) + b)])
