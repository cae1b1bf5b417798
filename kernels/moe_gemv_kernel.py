"""The fused-MoE grouped GEMM for decode (CuTe-DSL): m-tiles of 8 or 16 rows on mma.sync fed from registers.

Why: at decode an expert sees a handful of rows, so the layer is a read of its FP4 weights, and what caps the
read is the ALU work of expanding them. The mma.sync tile kernel (kernels/moe_kernel.py) expands into shared
memory behind two CTA barriers per k-tile (9-26 % of the weight-bytes roofline on the H200); the CUDA-core
GEMV that replaced it at one row per expert spent ~8.5 instructions per weight (13 for each pair's expansion,
an unpack and an FMA per row: 18-42 % on the H100, results/h100/e2e/fused_moe_decode.md) and slowed with every
row it took. Here each lane expands its own 16-byte chunks of FP4 weights straight into the A fragment of a
bf16 mma.sync m16n8k16 (no shared memory, no barrier in the main loop) at 5 instructions a pair, and the
tensor core does the multiplies for up to 8 rows per instruction: the weights cost the same at 1 row or 16.

Fragments. mma.sync sums over its 16 k slots whatever k each slot holds, as long as a slot holds the same k
in A and B: lane (g, t) = (lane / 4, lane % 4) feeds A rows g and g + 8 and B column (token) g at slots
2t, 2t+1, 2t+8, 2t+9. So lane t's slots hold k's of its own chunk (the four lanes t of a warp read four
consecutive chunks of every row), and a 32-bit word of 8 codes (low nibble first) makes the pairs
(code j, code j + 4), j = 0..3 (fp4_pair's); the activation pair of the same two k's is one prmt of the
token's bf16 words (bf16_halves).

FP4 expansion: kernels/moe_kernel.fp4_pair (exact; the weights times 2^-7, undone with alpha in the epilogue).

Work split (the config's knobs, kernels/moe_config.py, mma="gemv"):
* grid (grid_m, N / bn, splits) as the mma kernels: x the m-tiles of the local experts (tile -> expert by
  a warp-wide count over tile_offsets), y the column tiles, z FC2's K splits (partials written to their own slice
  of the output rows, as the mma kernel's).
* a CTA of warps_m x warps_n warps: warps_n column groups of bn / warps_n output columns (gated FC1: each
  16-row mma group holds 8 columns' gate rows, then their up rows), warps_m groups along K (each a share of
  the split's chunks; their sums meet in shared memory).
* per round a warp reads 4 consecutive chunks (one per lane t) of each of its weight rows; `stages - 1`
  rounds are loaded together before the first is used (more bytes in flight per round trip where K is long).
  A round past the split's last chunk is skipped by the whole warp (mma is collective); a lane whose chunk
  is past it feeds zeros.
PDL: FC2 may read the routing tables and load its first batch of weights before waiting for FC1
(moe_config.FC2_EARLY, an A/B switch; "off" waits first, as every other GEMM). FC1 with shape.early_ids
(moe_config.FC1_EARLY) works out its tile's expert and rows from the expert ids themselves when the call has at
most IDS_WARP pairs (one per lane of a warp: the routing kernel's count, scan and tile order, from shuffles) and
loads its first batch of weights before waiting for the routing launch; only the rows' tokens (a_rows, whose
order the routing kernel's atomics decide) and the activations come after the wait.
Epilogue: the accumulators go to shared memory by (K group, row, weight row), the K groups add there, then
one thread per (row, column) applies alpha and the activation (gated SiLU, ReLU2), FC2's routing weight and
output row, and stores; W4A4 FC1 (x quantised by the routing launch) fake-quantises its output in 16-column
NVFP4 blocks (the FC2 input's global scale), as the mma kernel.
Folded combine (FC2 with shape.combine_top_k, moe_config.FOLD_COMBINE): after its partial rows are stored, a
CTA counts itself in its column tile's counter (the routing launch zeroed it); the last of the tile's m-tiles
x splits to arrive sums the tile's columns of every token's local pairs and splits, in the combine kernel's
order (split-major, then the pair's rank: the same fp32 additions, so the same bits), and stores them as bf16
into the output; no combine launch follows.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, Uint16, Uint32, const_expr

from .moe_config import FC2_EARLY, GEMV_CHUNK, PDL, gemv_rows
from .moe_kernel import (UNDO_SHIFT, MoEGemmSpec, _fake_quantize_block, bf16_halves, block_scale2, expert_of_tile,
                         fp4_pair, routing_tensors)
from .pdl import await_predecessor_and_release

LANES_K = 4  # lanes t of a quad: consecutive chunks of a row per round
PREFETCH_BATCHES = 2  # FC2_EARLY=l2: the load batches pulled into L2 before the PDL wait (_prefetch_l2)
FOLD_VEC = 4  # the folded combine's columns per thread and step: one 16-byte load per pair, an 8-byte store
IDS_WARP = 32  # FC1 early_ids: the most pairs whose routing a warp works out from the ids (one per lane)


@cute.jit
def _load_l2(ptr):
    """Four fp32 at `ptr` read from L2 (ld.global.cg): other CTAs wrote them in this grid, and L1 is not
    coherent with their stores."""
    return cute.arch.inline_ptx("ld.global.cg.v4.f32 {{$w0}, {$w1}, {$w2}, {$w3}}, [{$r0}];",
                                write_only_types=[Float32] * 4, read_only_args=[Int64(ptr.toint())])


@cute.jit
def _prefetch_line(ptr):
    cute.arch.inline_ptx("prefetch.global.L2 [{$r0}];", read_only_args=[Int64(ptr.toint())])


@cute.jit
def _block_scales(pair16):
    """A chunk's two e4m3 block scales (one 16-bit load) -> their block_scale2 words."""
    lo, hi = cute.arch.inline_ptx(
        "{ .reg .b16 p; .reg .b32 hh; .reg .f16 a, b; cvt.u16.u32 p, {$r0}; cvt.rn.f16x2.e4m3x2 hh, p;"
        " mov.b32 {a, b}, hh; cvt.f32.f16 {$w0}, a; cvt.f32.f16 {$w1}, b; }",
        write_only_types=[Float32, Float32], read_only_args=[pair16])
    return block_scale2(lo), block_scale2(hi)


@cute.jit
def _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
    """d = A(16x16 bf16) x B(16x8 bf16) + c, fp32 (mma.sync m16n8k16, row.col)."""
    return cute.arch.inline_ptx(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{$w0}, {$w1}, {$w2}, {$w3}}, "
        "{{$r0}, {$r1}, {$r2}, {$r3}}, {{$r4}, {$r5}}, {{$r6}, {$r7}, {$r8}, {$r9}};",
        write_only_types=[Float32, Float32, Float32, Float32],
        read_only_args=[a0, a1, a2, a3, b0, b1, c0, c1, c2, c3])


class MoEGemvKernel:
    def __init__(self, spec: MoEGemmSpec):
        sh, cfg = spec.shape, spec.cfg
        self.K, self.N = sh.K, sh.N
        self.gated = sh.layer == "fc1" and sh.activation == "silu"
        self.relu2 = sh.layer == "fc1" and sh.activation == "relu2"
        self.quant_out = sh.quant_out
        self.bm, self.bn, self.splits = cfg.bm, cfg.bn, cfg.splits
        self.wk, self.wn = cfg.warps_m, cfg.warps_n  # warps along K, along the columns
        self.threads = 32 * self.wk * self.wn
        self.early = FC2_EARLY if PDL and sh.layer == "fc2" else "off"  # FC2's loads before its wait (kernel)
        self.fold = sh.combine_top_k  # FC2 also sums each token's pairs into the output (0: a combine launch does)
        self.early_ids = sh.early_ids  # FC1 routes its tile from the ids and loads weights before its wait
        self.cols = cfg.bn // cfg.warps_n  # output columns per warp
        self.rows = gemv_rows(sh, cfg)  # weight rows per warp
        self.groups = self.rows // 16  # mma row groups (16 weight rows each) per warp
        self.ntok = cfg.bm // 8  # mma n-tiles (8 rows of the m-tile each)
        self.chunks = sh.K // (GEMV_CHUNK * cfg.splits)  # 16-byte chunks of a weight row per K split
        self.rounds = cfg.stages - 1  # chunk rounds whose loads are issued together, before the first use
        self.batches = -(-self.chunks // (LANES_K * self.wk * self.rounds))  # load batches of a warp

    # ------------------------------------------------------------------ host side
    @cute.jit
    def __call__(self, a_ptr: cute.Pointer, a_rows_ptr, w_ptr: cute.Pointer, sf_ptr: cute.Pointer,
                 alpha_ptr: cute.Pointer, row_scale_ptr, out_rows_ptr, out_ptr: cute.Pointer,
                 expert_offsets_ptr: cute.Pointer, tile_offsets_ptr: cute.Pointer,
                 a_count: Int32, n_rows: Int32, n_experts: Int32, grid_m: Int32,
                 w_stride_e: Int64, sf_stride_e: Int64, out_count: Int32, gs_ptr, stream, valid_ptr=None,
                 final_ptr=None, sem_ptr=None, ids_ptr=None, ids_stride=None, offset=None, num_experts=None):
        """The folded combine's (shape.combine_top_k) valid_ptr .. sem_ptr: the routing kernel's valid [n_rows]
        flags, the layer's bf16 output [n_rows / top_k, N] and the column tiles' counters [N / bn]. FC1's
        early_ids ids_ptr .. num_experts: the expert ids [n_rows] as 32-bit words (ids_stride 1: int32, 2: int64,
        low word first), the first local expert and the number of experts."""
        K, N = self.K, self.N
        nw = 2 * N if self.gated else N  # weight rows per expert
        # A and W as 32-bit words (bf16 pairs, 8 packed codes); the scales as 16-bit pairs (one chunk's two)
        mA = cute.make_tensor(cute.recast_ptr(a_ptr, dtype=Uint32),
                              cute.make_layout((a_count, K // 2), stride=(cute.assume(Int64(K // 2), divby=4), 1)))
        mW = cute.make_tensor(cute.recast_ptr(w_ptr, dtype=Uint32), cute.make_layout(
            (n_experts, nw, K // 8), stride=(cute.assume(w_stride_e // 4, divby=4), K // 8, 1)))
        mSF = cute.make_tensor(cute.recast_ptr(sf_ptr, dtype=Uint16), cute.make_layout(
            (n_experts, nw, K // 32), stride=(sf_stride_e // 2, K // 32, 1)))
        mAlpha, mEO, mTO, mOut, mARows, mScale, mORows, mGS = routing_tensors(
            N, n_experts, n_rows, out_count, alpha_ptr, expert_offsets_ptr, tile_offsets_ptr, out_ptr, a_rows_ptr,
            row_scale_ptr, out_rows_ptr, gs_ptr)
        mValid, mFinal, mSem = None, None, None
        if const_expr(self.fold):
            mValid = cute.make_tensor(valid_ptr, cute.make_layout((n_rows,)))
            mFinal = cute.make_tensor(final_ptr, cute.make_layout(
                (n_rows // self.fold, N), stride=(cute.assume(Int64(N), divby=8), 1)))
            mSem = cute.make_tensor(sem_ptr, cute.make_layout((N // self.bn,)))
        mIds = None
        if const_expr(self.early_ids):
            mIds = cute.make_tensor(cute.recast_ptr(ids_ptr, dtype=Int32), cute.make_layout((n_rows * ids_stride,)))
        else:
            ids_stride, offset, num_experts = Int32(1), Int32(0), Int32(0)
        self.kernel(mA, mARows, mW, mSF, mAlpha, mScale, mORows, mOut, mEO, mTO, mGS, n_rows, n_experts, mValid,
                    mFinal, mSem, mIds, ids_stride, offset, num_experts).launch(
            grid=[grid_m, N // self.bn, self.splits], block=[self.threads, 1, 1], stream=stream, use_pdl=PDL)

    # ------------------------------------------------------------------ device side
    @cute.kernel
    def kernel(self, mA: cute.Tensor, mARows, mW: cute.Tensor, mSF: cute.Tensor, mAlpha: cute.Tensor, mScale,
               mORows, mOut: cute.Tensor, mEO: cute.Tensor, mTO: cute.Tensor, mGS, n_rows: Int32, n_experts: Int32,
               mValid, mFinal, mSem, mIds, ids_stride: Int32, offset: Int32, num_experts: Int32):
        tidx, _, _ = cute.arch.thread_idx()
        tile, ntile, split = cute.arch.block_idx()
        if const_expr(self.early_ids):
            self._fc1_early(mA, mARows, mW, mSF, mAlpha, mScale, mORows, mOut, mEO, mTO, mGS, n_rows, n_experts,
                            mIds, ids_stride, offset, num_experts, tile, ntile, split, tidx)
        else:
            self._routed(mA, mARows, mW, mSF, mAlpha, mScale, mORows, mOut, mEO, mTO, mGS, n_rows, n_experts, mValid,
                         mFinal, mSem, tile, ntile, split, tidx)

    @cute.jit
    def _fc1_early(self, mA, mARows, mW, mSF, mAlpha, mScale, mORows, mOut, mEO, mTO, mGS, n_rows, n_experts, mIds,
                   ids_stride, offset, num_experts, tile, ntile, split, tidx):
        """FC1 with early_ids: up to IDS_WARP pairs, the tile's expert and rows from the ids and its first
        weights before the wait (pre = 1, _tile); more pairs, the wait first and the routing tables (pre = 0)."""
        pre = Int32(0)
        e, row0, row_end, n_tiles = Int32(0), Int32(0), Int32(0), Int32(0)
        if n_rows <= IDS_WARP:
            pre = Int32(1)
            e, row0, row_end, n_tiles = self._route_from_ids(mIds, ids_stride, offset, num_experts, n_rows,
                                                             n_experts, tile)
        else:
            await_predecessor_and_release(PDL)
            n_tiles = mTO[n_experts]
            e = expert_of_tile(mTO, tile, n_experts)
            if tile < n_tiles:
                row0 = mEO[e] + (tile - mTO[e]) * self.bm
                row_end = mEO[e + 1]
        if tile < n_tiles:
            self._tile(mA, mARows, mW, mSF, mAlpha, mScale, mORows, mOut, mGS, e, row0, row_end, ntile, split,
                       n_rows, tidx, None, None, None, n_tiles, pre)
        else:
            if pre == 1:
                await_predecessor_and_release(PDL)

    @cute.jit
    def _route_from_ids(self, mIds, ids_stride, offset, num_experts, n_rows, n_experts, tile):
        """(expert, first row, row end, tiles in all) of grid tile `tile` as the routing kernel lays them out
        (kernels/moe_route_kernel.py: local experts in order, ceil(count / bm) tiles each, rows in expert order),
        for n_rows <= IDS_WARP pairs, lane j holding pair j: its bucket (n_experts when the id is outside
        [0, num_experts) or not local), then by shuffles its expert's count, whether it is the expert's first
        lane, the tiles and rows of the experts before it, and the lane whose expert owns the tile."""
        lane = cute.arch.lane_idx()
        b = n_experts
        if lane < n_rows:
            lo = mIds[lane * ids_stride]
            hi = Int32(0)
            if ids_stride == 2:
                hi = mIds[lane * 2 + 1]
            if hi == 0 and lo >= 0 and lo < num_experts:
                if lo - offset >= 0 and lo - offset < n_experts:
                    b = lo - offset
        count = Int32(0)
        first = Int32(1)
        for i in cutlass.range_constexpr(32):
            bi = cute.arch.shuffle_sync(b, i)
            if bi == b:
                count = count + 1
                if lane > i:
                    first = Int32(0)
        tiles = Int32(0)
        if first == 1 and b < n_experts:
            tiles = (count + (self.bm - 1)) // self.bm
        start = Int32(0)  # tile_offsets[b]
        before = Int32(0)  # expert_offsets[b]: local pairs of lower experts
        total = Int32(0)
        for i in cutlass.range_constexpr(32):
            bi = cute.arch.shuffle_sync(b, i)
            ti = cute.arch.shuffle_sync(tiles, i)
            total = total + ti
            if bi < b:
                start = start + ti
                before = before + 1
        owns = tiles > 0 and tile >= start and tile < start + tiles
        mask = cute.arch.vote_ballot_sync(owns)
        src = cute.arch.popc((mask & (-mask)) - 1)  # the owning lane (32 when none: the tile is slack)
        src = src % 32
        e = cute.arch.shuffle_sync(b, src)
        row0 = cute.arch.shuffle_sync(before, src) + (tile - cute.arch.shuffle_sync(start, src)) * self.bm
        row_end = cute.arch.shuffle_sync(before, src) + cute.arch.shuffle_sync(count, src)
        return e, row0, row_end, total

    @cute.jit
    def _routed(self, mA, mARows, mW, mSF, mAlpha, mScale, mORows, mOut, mEO, mTO, mGS, n_rows, n_experts, mValid,
                mFinal, mSem, tile, ntile, split, tidx):
        """A tile of the routing tables: FC2 (its early-load modes, the folded combine) and FC1 without
        early_ids."""
        if const_expr(self.early != "off"):
            # FC2 launches while FC1 runs (PDL), and the routing launch has finished by then (FC1 waited for it
            # before releasing this grid): its tables are final and no kernel writes the weights. "regs": the
            # tile's expert, rows and first load batch of weights come before the wait, only FC1's output (the
            # activations) after it (_tile); "l2": those weights are pulled into L2 and the tables read again
            # after the wait
            e = expert_of_tile(mTO, tile, n_experts)
            if const_expr(self.early == "l2"):
                if tile < mTO[n_experts]:
                    self._prefetch_l2(mW, mSF, e, ntile, split, tidx)
        if const_expr(self.early != "regs"):
            await_predecessor_and_release(PDL)  # moe_config.PDL
            e = expert_of_tile(mTO, tile, n_experts)
        n_tiles = mTO[n_experts]
        if tile < n_tiles:
            row0 = mEO[e] + (tile - mTO[e]) * self.bm
            self._tile(mA, mARows, mW, mSF, mAlpha, mScale, mORows, mOut, mGS, e, row0, mEO[e + 1], ntile, split,
                       n_rows, tidx, mValid, mFinal, mSem, n_tiles, Int32(0))
        else:
            if const_expr(self.early == "regs"):
                await_predecessor_and_release(PDL)
            if const_expr(self.fold):
                if n_tiles == 0 and tile == 0 and split == 0:  # no local pair: nobody arrives, the sum is zero
                    self._combine(mOut, mValid, mFinal, ntile, n_rows, tidx, False)

    @cute.jit
    def _weight_rows(self, ntile, wn, g):
        """The lane's weight rows of the expert: group rg's A rows g and g + 8 (gated: column rg*8+g's gate and
        up rows; else columns rg*16+g and rg*16+g+8 of the warp's)."""
        wrow = cute.make_rmem_tensor((self.groups * 2,), Int32)
        col0 = ntile * self.bn + wn * self.cols
        for rg in cutlass.range_constexpr(self.groups):
            if const_expr(self.gated):
                wrow[2 * rg] = col0 + rg * 8 + g
                wrow[2 * rg + 1] = self.N + col0 + rg * 8 + g
            else:
                wrow[2 * rg] = col0 + rg * 16 + g
                wrow[2 * rg + 1] = col0 + rg * 16 + 8 + g
        return wrow

    @cute.jit
    def _prefetch_l2(self, mW, mSF, e, ntile, split, tidx):
        """Pull the chunks (and block scales) the lane's first PREFETCH_BATCHES load batches read into L2 while
        the predecessor drains: the same addresses as _tile's loads, so its first rounds hit L2 instead of
        waiting on DRAM after the wait. Nothing enters L1 or registers."""
        lane = tidx % 32
        warp = tidx // 32
        kw = warp % self.wk
        wrow = self._weight_rows(ntile, warp // self.wk, lane // 4)
        mWv = cute.zipped_divide(mW, (1, 1, 4))
        for it in cutlass.range_constexpr(min(PREFETCH_BATCHES, self.batches)):
            for q in cutlass.range_constexpr(self.rounds):
                cc = ((it * self.rounds + q) * self.wk + kw) * LANES_K + lane % 4
                if cc < self.chunks:
                    c = split * self.chunks + cc
                    for r in cutlass.range_constexpr(self.groups * 2):
                        _prefetch_line(mWv[(0, 0, None), (e, wrow[r], c)].iterator)
                        if lane % 4 == 0:  # the quad's four chunks' scales: 8 consecutive bytes
                            _prefetch_line(cute.domain_offset((e, wrow[r], c), mSF).iterator)

    @cute.jit
    def _load_weights(self, mWv, mSF, ld16, e, wrow, c, cc, q, wq, sf):
        """Load round `q`'s weight chunks (chunk `cc` of the split, `c` of the row) of the lane's rows and their
        block scales into wq[q] / sf[q] (zeros past the split's end: the mma is collective)."""
        for r in cutlass.range_constexpr(self.groups * 2):
            if cc < self.chunks:
                cute.copy(ld16, mWv[(0, 0, None), (e, wrow[r], c)], wq[q, r, None])
                sf[q, r] = Uint32(mSF[e, wrow[r], c])
            else:
                wq[q, r, None].fill(0)
                sf[q, r] = Uint32(0)

    @cute.jit
    def _first_batch_then_wait(self, mWv, mSF, ld16, e, wrow, c_base, kw, t, wq, sf):
        """Load batch 0's weight rounds of the lane (_tile's first batch), then wait for the predecessor grid."""
        for q in cutlass.range_constexpr(self.rounds):
            cc0 = (q * self.wk + kw) * LANES_K + t
            self._load_weights(mWv, mSF, ld16, e, wrow, c_base + cc0, cc0, q, wq, sf)
        await_predecessor_and_release(PDL)

    @cute.jit
    def _tile(self, mA, mARows, mW, mSF, mAlpha, mScale, mORows, mOut, mGS, e, row0, row_end, ntile, split, n_rows,
              tidx, mValid, mFinal, mSem, n_tiles, pre):
        bm, bn, rows, cols, wk, groups, ntok = self.bm, self.bn, self.rows, self.cols, self.wk, self.groups, self.ntok
        rounds = self.rounds
        lane = tidx % 32
        g = lane // 4  # A rows g, g + 8 of each mma group; token g of each n-tile
        t = lane % 4  # the quad's chunk of a round
        warp = tidx // 32
        kw = warp % wk  # the warp's K group
        wn = warp // wk  # and column group
        c_base = split * self.chunks  # the split's first chunk (of the row's K / 32)

        wrow = self._weight_rows(ntile, wn, g)

        smem = cutlass.utils.SmemAllocator()
        sRed = smem.allocate_tensor(Float32, cute.make_layout(
            (wk, bm, self.wn * rows), stride=(bm * self.wn * rows, self.wn * rows, 1)), byte_alignment=16)
        sC, sLast = None, None
        if const_expr(self.fold):  # the column tile counter's value before this CTA's arrival
            sLast = smem.allocate_tensor(Int32, cute.make_layout((1,)), byte_alignment=16)
        if const_expr(self.quant_out):
            sC = smem.allocate_tensor(Float32, cute.make_layout((bm, bn), stride=(bn, 1)), byte_alignment=16)

        acc = cute.make_rmem_tensor(cute.make_layout((groups, ntok, 4), stride=(ntok * 4, 4, 1)), Float32)
        acc.fill(0.0)
        mAv = cute.zipped_divide(mA, (1, 4))  # 4 words = 8 activations
        mWv = cute.zipped_divide(mW, (1, 1, 4))  # 4 words = 16 packed bytes = one chunk of a weight row
        ld16 = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), Uint32, num_bits_per_copy=128)  # one 16-byte load
        wq = cute.make_rmem_tensor(cute.make_layout((rounds, groups * 2, 4), stride=(groups * 8, 4, 1)), Uint32)
        sf = cute.make_rmem_tensor(cute.make_layout((rounds, groups * 2), stride=(groups * 2, 1)), Uint32)
        aw = cute.make_rmem_tensor(cute.make_layout((rounds, ntok, 4, 4), stride=(ntok * 16, 16, 1, 4)), Uint32)
        ap = cute.make_rmem_tensor(cute.make_layout((ntok, 16), stride=(16, 1)), Uint32)  # activation pairs
        if const_expr(self.early == "regs"):  # batch 0's weights before the wait (kernel)
            self._first_batch_then_wait(mWv, mSF, ld16, e, wrow, c_base, kw, t, wq, sf)
        if const_expr(self.early_ids):
            if pre == 1:  # FC1 routed from the ids (_fc1_early): batch 0's weights before the wait
                self._first_batch_then_wait(mWv, mSF, ld16, e, wrow, c_base, kw, t, wq, sf)
        # the lane's token of each n-tile (its A row; rows past the expert's end are never read): after the wait,
        # as the routing kernel writes a_rows
        src = cute.make_rmem_tensor((ntok,), Int32)
        live = cute.make_rmem_tensor((ntok,), cutlass.Boolean)
        for j in cutlass.range_constexpr(ntok):
            s = row0 + 8 * j + g
            live[j] = s < row_end
            src[j] = s
            if const_expr(mARows is not None):
                if s < row_end:
                    src[j] = mARows[s]
        for it in cutlass.range(self.batches, unroll=1):
            # the batch's rounds of weights, scales and activations first: loads in flight before any use
            for q in cutlass.range_constexpr(rounds):
                cc = ((it * rounds + q) * wk + kw) * LANES_K + t  # the lane's chunk within the split
                c = c_base + cc
                if const_expr(self.early == "regs"):
                    if it > 0:  # batch 0's came before the wait
                        self._load_weights(mWv, mSF, ld16, e, wrow, c, cc, q, wq, sf)
                elif const_expr(self.early_ids):
                    if it >= pre:  # pre = 1: batch 0's came before the wait
                        self._load_weights(mWv, mSF, ld16, e, wrow, c, cc, q, wq, sf)
                else:
                    self._load_weights(mWv, mSF, ld16, e, wrow, c, cc, q, wq, sf)
                for j in cutlass.range_constexpr(ntok):
                    if live[j] & (cc < self.chunks):
                        for v in cutlass.range_constexpr(4):
                            cute.copy(ld16, mAv[(0, None), (src[j], 4 * c + v)], aw[q, j, None, v])
                    else:  # a token past the expert's end (or no chunk): zeros, never NaN times a zero weight
                        aw[q, j, None, None].fill(0)
            for q in cutlass.range_constexpr(rounds):
                if ((it * rounds + q) * wk + kw) * LANES_K < self.chunks:  # the warp's round (uniform: mma)
                    for j in cutlass.range_constexpr(ntok):
                        words = aw[q, j, None, None]  # the token's 16 words of the chunk (32 activations)
                        for wi in cutlass.range_constexpr(4):  # words 4wi..4wi+3 hold code word wi's k's
                            for p in cutlass.range_constexpr(4):  # pair p: a[k], a[k + 4], k = 8wi + p
                                ap[j, 4 * wi + p] = bf16_halves(words[4 * wi + p // 2], words[4 * wi + 2 + p // 2],
                                                                p % 2 == 1)
                    for rg in cutlass.range_constexpr(groups):
                        s_g = _block_scales(sf[q, 2 * rg])  # bf16x2 scales of the chunk's two blocks
                        s_h = _block_scales(sf[q, 2 * rg + 1])
                        for wi in cutlass.range_constexpr(4):
                            w_g = wq[q, 2 * rg, wi]
                            w_h = wq[q, 2 * rg + 1, wi]
                            for p2 in cutlass.range_constexpr(2):  # one mma per two pairs of each A row
                                a0 = fp4_pair(w_g, 2 * p2, s_g[wi // 2])
                                a1 = fp4_pair(w_h, 2 * p2, s_h[wi // 2])
                                a2 = fp4_pair(w_g, 2 * p2 + 1, s_g[wi // 2])
                                a3 = fp4_pair(w_h, 2 * p2 + 1, s_h[wi // 2])
                                for j in cutlass.range_constexpr(ntok):
                                    d = _mma(a0, a1, a2, a3, ap[j, 4 * wi + 2 * p2], ap[j, 4 * wi + 2 * p2 + 1],
                                             acc[rg, j, 0], acc[rg, j, 1], acc[rg, j, 2], acc[rg, j, 3])
                                    for x in cutlass.range_constexpr(4):
                                        acc[rg, j, x] = d[x]

        # the accumulators by (K group, row, the CTA's weight row): lane (g, t) holds rows 2t, 2t+1 of n-tile j
        # at A rows g (c0, c1) and g + 8 (c2, c3)
        for rg in cutlass.range_constexpr(groups):
            for j in cutlass.range_constexpr(ntok):
                for x in cutlass.range_constexpr(4):
                    m = 8 * j + 2 * t + x % 2
                    if m < bm:
                        sRed[kw, m, wn * rows + rg * 16 + 8 * (x // 2) + g] = acc[rg, j, x]
        cute.arch.barrier()

        alpha = mAlpha[e] * UNDO_SHIFT  # the A fragments held the weights times 2^-7 (fp4_pair)
        row_base = Int32(0)  # split z writes its partial tile to output rows [z * n_rows, (z + 1) * n_rows)
        if const_expr(self.splits > 1):
            row_base = split * n_rows
        for i in cutlass.range_constexpr(-(-bm * bn // self.threads)):
            idx = tidx + i * self.threads
            m = idx // bn
            col = idx % bn
            if idx < bm * bn:
                s = row0 + m
                if s < row_end:
                    cw = col % cols
                    r_g = (col // cols) * rows + cw  # the column's (only) row in sRed
                    if const_expr(self.gated):  # groups of 8 columns: gate rows, then up rows
                        r_g = (col // cols) * rows + (cw // 8) * 16 + cw % 8
                    gsum = Float32(0.0)
                    for q in cutlass.range_constexpr(wk):
                        gsum = gsum + sRed[q, m, r_g]
                    val = gsum * alpha
                    if const_expr(self.gated):
                        u = Float32(0.0)
                        for q in cutlass.range_constexpr(wk):
                            u = u + sRed[q, m, r_g + 8]
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
                        mOut[dst + row_base, ntile * bn + col] = val.to(mOut.element_type)
        if const_expr(self.fold):
            # every thread's partials stored; one release of the tile's counter publishes them (the barrier
            # orders them before it), and the CTA that brings it to n_tiles * splits reads them all back
            cute.arch.barrier()
            if tidx == 0:
                cute.arch.fence_acq_rel_gpu()
                sLast[0] = cute.arch.atomic_add(mSem.iterator + ntile, Int32(1), sem="acq_rel", scope="gpu")
            cute.arch.barrier()
            if sLast[0] == n_tiles * self.splits - 1:
                cute.arch.fence_acq_rel_gpu()
                self._combine(mOut, mValid, mFinal, ntile, n_rows, tidx, True)
        if const_expr(self.quant_out):  # W4A4 FC1 (no routing weight, rows in pair order): 16-column blocks
            cute.arch.barrier()
            gs = mGS[0]
            mOutv = cute.zipped_divide(mOut, (1, 16))
            for i in cutlass.range_constexpr(-(-bm * (bn // 16) // self.threads)):
                idx = tidx + i * self.threads
                m = idx // (bn // 16)
                b = idx % (bn // 16)
                s = row0 + m
                if idx < bm * (bn // 16) and s < row_end:
                    frag = cute.make_rmem_tensor((16,), Float32)
                    for x in cutlass.range_constexpr(16):
                        frag[x] = sC[m, 16 * b + x]
                    _fake_quantize_block(frag, gs)
                    o = cute.make_rmem_tensor((16,), mOut.element_type)
                    o.store(frag.load().to(mOut.element_type))
                    cute.autovec_copy(o, mOutv[(0, None), (s, (ntile * bn // 16) + b)])

    @cute.jit
    def _combine(self, mY, mValid, mFinal, ntile, n_rows, tidx, add):
        """The combine kernel's sum (kernels/moe_combine_kernel.py) for the column tile's FOLD_VEC-column
        vectors of every token: per split, every pair's vector loaded before any is added, the local ones added
        in rank order; `add` False stores zeros (no pair is local)."""
        top_k, bn = self.fold, self.bn
        per_row = bn // FOLD_VEC
        mFinalv = cute.zipped_divide(mFinal, (1, FOLD_VEC))
        for i in cutlass.range(tidx, (n_rows // top_k) * per_row, self.threads, unroll=1):
            t = i // per_row
            c = ntile * bn + (i % per_row) * FOLD_VEC
            acc = cute.make_rmem_tensor((FOLD_VEC,), Float32)
            acc.fill(0.0)
            if const_expr(add):
                valid = cute.make_rmem_tensor((top_k,), Int32)
                for k in cutlass.range_constexpr(top_k):
                    valid[k] = mValid[t * top_k + k]
                parts = cute.make_rmem_tensor(cute.make_layout((FOLD_VEC, top_k), stride=(1, FOLD_VEC)), Float32)
                for z in cutlass.range_constexpr(self.splits):
                    for k in cutlass.range_constexpr(top_k):
                        v = _load_l2(cute.domain_offset((z * n_rows + t * top_k + k, c), mY).iterator)
                        for x in cutlass.range_constexpr(FOLD_VEC):
                            parts[x, k] = v[x]
                    for k in cutlass.range_constexpr(top_k):
                        if valid[k] != 0:
                            acc.store(acc.load() + parts[None, k].load())
            o = cute.make_rmem_tensor((FOLD_VEC,), cutlass.BFloat16)
            o.store(acc.load().to(cutlass.BFloat16))
            cute.autovec_copy(o, mFinalv[(0, None), (t, c // FOLD_VEC)])
