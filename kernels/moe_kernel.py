"""The CuTe-DSL grouped GEMM of the fused-MoE family: one expert's rows times its NVFP4 weights, on SM90.

Hopper's tensor cores take no FP4, so the weights are dequantised in the main loop: each k-tile's packed
e2m1 bytes and e4m3 block scales arrive in shared memory by cp.async, the CTA expands them to a bf16 tile of
the weights times 2^-7 (fp4_pair: e2m1 x e4m3 has at most 6 significant bits, so the bf16 value is exact) and
the warps run bf16 mma.sync (16x8x16) on it with fp32 accumulation. The per-expert global scale (alpha, times
2^7) is applied in the epilogue.

Rows. The caller sorts the (token, expert) pairs by local expert (kernels/fused_moe.py): positions
[expert_offsets[e], expert_offsets[e+1]) belong to expert e, and tile t of the grid's x axis is m-tile
t - tile_offsets[e] of the expert e with tile_offsets[e] <= t < tile_offsets[e+1] (counted by every warp; CTAs
past the last tile exit). A row of the A operand is gathered: position s reads row a_rows[s] of A (FC1:
the pair's token; FC2: s itself, a_rows None).

One kernel serves both layers (compile-time flags):
* FC1 gated (SiLU): the CTA's B tile is bn gate rows [n0, n0+bn) and bn up rows [I+n0, I+n0+bn) of w1[e];
  two accumulators; out = silu(alpha*g) * (alpha*u).
* FC1 ReLU2: out = relu(alpha*acc)^2.
* FC2: out = alpha*acc*row_scale[s] (the routing weight), written to row out_rows[s] (the pair's index).
  Split-K (cfg.splits > 1, FC2 only; compile-time): the grid's z axis is the split: CTA (tile, ntile, z)
  walks k-tiles [z*K/(bk*splits), (z+1)*K/(bk*splits)) and writes its whole fp32 partial tile, scaled by
  alpha and the routing weight like an unsplit one (linear: the partials still sum to the output), to row
  z*n_rows + out_rows[s] of the [splits * n_rows, N] output; the caller sums the splits with the pairs.
Outputs are bf16 or fp32 rows (8-element vector stores from a shared-memory staging tile).
W4A4 ("nvfp4") FC1 reads x as the routing launch fake-quantised it (kernels/moe_route_kernel.py) and
fake-quantises its output (kernels/moe_quant.py: e2m1(q) * s, exact in bf16) in 16-element blocks with the FC2
input's global scale (read from device memory: no host sync), so FC2 reads the values W4A4 multiplies.

Pipeline per k-tile: wait for the tile's cp.async group, barrier, expand the packed B tile into the bf16
tile, issue the cp.async loads of the tile `stages - 1` ahead, barrier, ldmatrix + mma over the tile.
Shared tiles are padded by 16 bytes per row so ldmatrix and the stores are free of bank conflicts.

Launch geometry: grid (grid_m, N / bn, splits): x the m-tiles of every local expert (plus slack CTAs that
exit), y the column tiles, z the K splits (1 unsplit); one CTA of 32 * warps_m * warps_n threads each.

Sizes (K, N of the layer, the split count) are compile-time; rows, experts and strides are runtime
(64-bit strides: a DeepSeek-V3 FC1 weight holds 3.7 G bytes).
"""
from __future__ import annotations

from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, Int64, Uint32, const_expr

from .moe_config import PDL, MoEGemmConfig, MoEGemmShape
from .pdl import await_predecessor_and_release

EXPERT_ROUND = 256  # tile_offsets entries a warp compares per round trip (expert_of_tile): 8 per lane


@cute.jit
def _e4m3_to_f32(b):
    """One e4m3 byte (low 8 bits of b) as fp32 (exact; the SM89+ cvt)."""
    return Float32(cute.arch.inline_ptx(
        "{ .reg .b16 t; .reg .b32 hh; .reg .f16 lo, hi; cvt.u16.u32 t, {$r0}; "
        "cvt.rn.f16x2.e4m3x2 hh, t; mov.b32 {lo, hi}, hh; cvt.f32.f16 {$w0}, lo; }",
        write_only_types=[Float32], read_only_args=[b & 0xFF]))


# FP4 expansion (exact). A word holds 8 codes, low nibble first; pair j = (code j, code j + 4), the two nibbles 16
# bits apart, so one shift places both magnitudes at bf16 bits 6-8 and another both signs at bit 15: read as bf16
# that is 2^-126 times the e2m1 value (subnormal bf16 for the codes 0 and 0.5; bf16 arithmetic keeps them). One
# bf16x2 multiply by the block scale times 2^SCALE_SHIFT then gives value * scale * 2^-7: at most 6 significant
# bits and at least 2^-17, so exact and normal. 119 is the largest shift that keeps scale * 2^k finite in bf16 for
# every e4m3 scale (448 * 2^119 < 2^128), which leaves the products with activations the most headroom above
# fp32's underflow; each kernel's epilogue multiplies alpha by UNDO_SHIFT. 5 instructions a pair (the former
# per-byte sequence took 13).
SCALE_SHIFT = 119
UNDO_SHIFT = 2.0 ** (126 - SCALE_SHIFT)


def fp4_pair_ptx(j: int) -> str:
    """PTX of fp4_pair for pair j of a word (exposed for the bit-level model in the tests)."""
    def shift(reg: str, d: int) -> str:
        return (f"shl.b32 {reg}, {{$r0}}, {d};" if d > 0 else f"shr.b32 {reg}, {{$r0}}, {-d};" if d < 0
                else f"mov.b32 {reg}, {{$r0}};")
    return ("{ .reg .b32 m, s; " + shift("m", 6 - 4 * j) + " " + shift("s", 12 - 4 * j)
            + " and.b32 s, s, 0x80008000; and.b32 m, m, 0x01C001C0; or.b32 m, m, s; mul.rn.bf16x2 {$w0}, m, {$r1}; }")


_PAIR_PTX = tuple(fp4_pair_ptx(j) for j in range(4))


@cute.jit
def fp4_pair(w, j: cutlass.Constexpr, scale2):
    """Codes j and j + 4 of word w as a bf16x2 (low half code j) of value * scale * 2^-7; scale2 = block_scale2."""
    return Uint32(cute.arch.inline_ptx(_PAIR_PTX[j], write_only_types=[Uint32], read_only_args=[w, scale2]))


@cute.jit
def block_scale2(scale):
    """An fp32 block scale -> the bf16x2 word fp4_pair multiplies by: scale * 2^SCALE_SHIFT in both halves."""
    return Uint32(cute.arch.inline_ptx("{ .reg .f32 f; mul.f32 f, {$r0}, 0f7B000000; cvt.rn.bf16x2.f32 {$w0}, f, f; }",
                                       write_only_types=[Uint32], read_only_args=[scale]))


@cute.jit
def bf16_halves(lo_word, hi_word, high: cutlass.Constexpr):
    """The low (high: the high) bf16 halves of two words as one bf16x2, lo_word's first (one prmt). Puts two
    fp4_pair words of pairs (j, j + 4), (j + 1, j + 5) in a tile row's k order, codes (j, j + 1) (high: (j + 4,
    j + 5)); pairs a token's activation words as fp4_pair pairs its codes (the GEMV's B fragments)."""
    sel = 0x7632 if high else 0x5410
    return Uint32(cute.arch.inline_ptx(f"prmt.b32 {{$w0}}, {{$r0}}, {{$r1}}, {hex(sel)};",
                                       write_only_types=[Uint32], read_only_args=[lo_word, hi_word]))


@cute.jit
def _e4m3_bits(v):
    """fp32 -> e4m3 byte: round to nearest even, saturating at 448 (the SM89+ cvt)."""
    b = cute.arch.inline_ptx("{ .reg .b16 t; cvt.rn.satfinite.e4m3x2.f32 t, {$r0}, {$r1}; cvt.u32.u16 {$w0}, t; }",
                             write_only_types=[Uint32], read_only_args=[Float32(0.0), v])
    return Uint32(b) & 0xFF


@cute.jit
def _rint(v):
    return Float32(cute.arch.inline_ptx("cvt.rni.f32.f32 {$w0}, {$r0};", write_only_types=[Float32],
                                        read_only_args=[v]))


@cute.jit
def _e2m1_value(y):
    """y rounded to the nearest E2M1 value (ties to even, saturating at 6), as fp32: on the grid of
    |y|'s binade (steps 0.5 below 2, 1 below 4, 2 above; the scalings are powers of two, so exact), as
    kernels/encoders.encode_e2m1 rounds it. The sign of zero is not kept (it changes no product)."""
    a = cute.arch.fmax(y, -y)
    k, kinv = Float32(0.5), Float32(2.0)  # steps are powers of two: multiplying by 1/k is exact (no division)
    if a < 4.0:
        k, kinv = Float32(1.0), Float32(1.0)
    if a < 2.0:
        k, kinv = Float32(2.0), Float32(0.5)
    r = cute.arch.fmin(_rint(a * k) * kinv, Float32(6.0))
    if y < 0.0:
        r = -r
    return r


@cute.jit
def _fake_quantize_block(f, gs):
    """16 fp32 values in the rmem tensor f -> e2m1(v * gs / s) * s in place, s = e4m3(gs * amax / 6)
    (kernels/moe_quant.fake_quantize_nvfp4, IEEE division as there): the bf16-exact values W4A4 multiplies."""
    amax = Float32(0.0)
    for i in cutlass.range_constexpr(16):
        amax = cute.arch.fmax(amax, cute.arch.fmax(f[i], -f[i]))
    s = _e4m3_to_f32(_e4m3_bits((gs * amax) / 6.0))
    factor = Float32(0.0)
    if s != 0.0:
        factor = gs / s
    for i in cutlass.range_constexpr(16):
        f[i] = _e2m1_value(f[i] * factor) * s


@cute.jit
def expert_of_tile(mTO, tile, n_experts):
    """The local expert whose m-tiles hold grid tile `tile`: the last e with tile_offsets[e] <= tile (a tile
    past tile_offsets[n_experts] is slack and its CTA exits). tile_offsets is nondecreasing from 0, so that e
    is the count of experts whose first tile is <= tile, less one: each warp counts them EXPERT_ROUND at a
    time, one entry per lane and batch, the loads issued together, summed by ballot and popc. The binary
    search this replaced was a chain of ten dependent loads before a CTA knew which weights to read (with the
    combine's hoisted loads, T=1 W4A16 on the H100 in two calls: Qwen3-30B-A3B 25.7 -> 22.7 us, DeepSeek-V3
    96.9 -> 92.9, gpt-oss-120b 44.1 -> 42.4, Mixtral-8x7B 92.6 -> 93.0; results/logs/moe_decode_latency_h100.md)."""
    lane = cute.arch.lane_idx()
    count = Int32(0)
    for r in cutlass.range(0, n_experts, EXPERT_ROUND, unroll=1):
        for q in cutlass.range_constexpr(EXPERT_ROUND // 32):
            j = r + q * 32 + lane
            first = Int32(0x7FFFFFFF)
            if j < n_experts:
                first = mTO[j]
            count = count + cute.arch.popc(cute.arch.vote_ballot_sync(first <= tile))
    return count - 1


@cute.jit
def routing_tensors(N: int, n_experts, n_rows, out_count, alpha_ptr, expert_offsets_ptr, tile_offsets_ptr, out_ptr,
                    a_rows_ptr, row_scale_ptr, out_rows_ptr, gs_ptr):
    """The launch's tensors every fused-MoE GEMM backend shares: alphas, expert and tile offsets, the output
    rows of N columns, and the optional gather rows, routing weights, output rows and FC2 input scale (None
    where the layer has none)."""
    mAlpha = cute.make_tensor(alpha_ptr, cute.make_layout((n_experts,)))
    mEO = cute.make_tensor(expert_offsets_ptr, cute.make_layout((n_experts + 1,)))
    mTO = cute.make_tensor(tile_offsets_ptr, cute.make_layout((n_experts + 1,)))
    mOut = cute.make_tensor(out_ptr, cute.make_layout((out_count, N), stride=(cute.assume(Int64(N), divby=8), 1)))
    mARows = None
    if const_expr(a_rows_ptr is not None):
        mARows = cute.make_tensor(a_rows_ptr, cute.make_layout((n_rows,)))
    mScale = None
    if const_expr(row_scale_ptr is not None):
        mScale = cute.make_tensor(row_scale_ptr, cute.make_layout((n_rows,)))
    mORows = None
    if const_expr(out_rows_ptr is not None):
        mORows = cute.make_tensor(out_rows_ptr, cute.make_layout((n_rows,)))
    mGS = None
    if const_expr(gs_ptr is not None):
        mGS = cute.make_tensor(gs_ptr, cute.make_layout((1,)))
    return mAlpha, mEO, mTO, mOut, mARows, mScale, mORows, mGS


@dataclass(frozen=True)
class MoEGemmSpec:
    shape: MoEGemmShape
    cfg: MoEGemmConfig
    arch: int


class MoEGemmKernel:
    def __init__(self, spec: MoEGemmSpec):
        sh, cfg = spec.shape, spec.cfg
        self.K, self.N = sh.K, sh.N
        self.gated = sh.layer == "fc1" and sh.activation == "silu"
        self.relu2 = sh.layer == "fc1" and sh.activation == "relu2"
        self.quant_out = sh.quant_out  # W4A4 FC1: the output fake-quantised with the FC2 input's global scale
        self.bm, self.bn, self.bk, self.stages = cfg.bm, cfg.bn, cfg.bk, cfg.stages
        self.splits = cfg.splits  # split-K (FC2): CTAs along the grid's z axis, each over K / splits
        self.k_tiles = sh.K // (cfg.bk * cfg.splits)  # k-tiles one CTA walks
        self.wm, self.wn = cfg.warps_m, cfg.warps_n
        self.threads = 32 * self.wm * self.wn
        self.nb = self.bn * (2 if self.gated else 1)  # B rows per CTA
        self.a_pad = self.bk + 8  # bf16 elements per padded shared row (16 bytes of padding)
        self.c_pad = self.bn + 4  # fp32 elements per padded staging row
        self.a_chunks = self.bm * self.bk // 8  # 16-byte cp.async chunks per A tile
        self.w_chunks = self.nb * self.bk // 32  # 16-byte chunks of packed weights per tile
        self.sf_bytes = min(16, self.bk // 16)  # one cp.async of scales per B row and tile
        self.units = self.nb * self.bk // 16  # 16-element scale blocks to expand per tile
        self.vec = 16 if self.quant_out else 8  # output elements per store unit (an NVFP4 block when quantised)
        self.out_vecs = self.bm * self.bn // self.vec

    # ------------------------------------------------------------------ host side
    @cute.jit
    def __call__(self, a_ptr: cute.Pointer, a_rows_ptr, w_ptr: cute.Pointer, sf_ptr: cute.Pointer,
                 alpha_ptr: cute.Pointer, row_scale_ptr, out_rows_ptr, out_ptr: cute.Pointer,
                 expert_offsets_ptr: cute.Pointer, tile_offsets_ptr: cute.Pointer,
                 a_count: Int32, n_rows: Int32, n_experts: Int32, grid_m: Int32,
                 w_stride_e: Int64, sf_stride_e: Int64, out_count: Int32, gs_ptr, stream):
        K, N = self.K, self.N
        nw = 2 * N if self.gated else N  # weight rows per expert
        mA = cute.make_tensor(a_ptr, cute.make_layout((a_count, K), stride=(cute.assume(Int64(K), divby=8), 1)))
        mW = cute.make_tensor(w_ptr, cute.make_layout(
            (n_experts, nw, K // 2), stride=(cute.assume(w_stride_e, divby=16), K // 2, 1)))
        mSF = cute.make_tensor(sf_ptr, cute.make_layout(
            (n_experts, nw, K // 16), stride=(cute.assume(sf_stride_e, divby=self.sf_bytes), K // 16, 1)))
        mAlpha, mEO, mTO, mOut, mARows, mScale, mORows, mGS = routing_tensors(
            N, n_experts, n_rows, out_count, alpha_ptr, expert_offsets_ptr, tile_offsets_ptr, out_ptr, a_rows_ptr,
            row_scale_ptr, out_rows_ptr, gs_ptr)
        tiled_mma = self._make_tiled_mma()
        self.kernel(mA, mARows, mW, mSF, mAlpha, mScale, mORows, mOut, mEO, mTO, mGS, n_rows, n_experts,
                    tiled_mma).launch(grid=[grid_m, N // self.bn, self.splits], block=[self.threads, 1, 1],
                                      stream=stream, use_pdl=PDL)

    def _make_tiled_mma(self):
        """The warps' mma.sync grid: warps_m x warps_n warps, each a 16x16 patch per step (two 16x8x16 atoms)."""
        op = cute.nvgpu.warp.MmaF16BF16Op(cutlass.BFloat16, Float32, (16, 8, 16))
        return cute.make_tiled_mma(op, cute.make_layout((self.wm, self.wn, 1)),
                                   permutation_mnk=(self.wm * 16, self.wn * 16, 16))

    # ------------------------------------------------------------------ device side
    @cute.kernel
    def kernel(self, mA: cute.Tensor, mARows, mW: cute.Tensor, mSF: cute.Tensor, mAlpha: cute.Tensor, mScale,
               mORows, mOut: cute.Tensor, mEO: cute.Tensor, mTO: cute.Tensor, mGS, n_rows: Int32, n_experts: Int32,
               tiled_mma: cute.TiledMma):
        bm = self.bm
        tidx, _, _ = cute.arch.thread_idx()
        tile, ntile, split = cute.arch.block_idx()
        await_predecessor_and_release(PDL)  # moe_config.PDL

        e = expert_of_tile(mTO, tile, n_experts)
        if tile < mTO[n_experts]:
            row0 = mEO[e] + (tile - mTO[e]) * bm  # first sorted position of the tile
            row_end = mEO[e + 1]
            self._tile(mA, mARows, mW, mSF, mAlpha, mScale, mORows, mOut, mGS, tiled_mma, e, row0, row_end,
                       ntile, split, n_rows, tidx)

    @cute.jit
    def _tile(self, mA, mARows, mW, mSF, mAlpha, mScale, mORows, mOut, mGS, tiled_mma, e, row0, row_end, ntile,
              split, n_rows, tidx):
        bm, bn, bk, stages, nb = self.bm, self.bn, self.bk, self.stages, self.nb
        k_tiles = self.k_tiles  # this CTA's k-tiles: [kt0, kt0 + k_tiles) of the expert's K / bk
        kt0 = Int32(0)
        if const_expr(self.splits > 1):
            kt0 = split * k_tiles
        n0 = ntile * bn

        smem = cutlass.utils.SmemAllocator()
        sA = smem.allocate_tensor(cutlass.BFloat16, cute.make_layout(
            (bm, bk, stages), stride=(self.a_pad, 1, bm * self.a_pad)), byte_alignment=16)
        sWp = smem.allocate_tensor(cutlass.Uint8, cute.make_layout(
            (nb, bk // 2, stages), stride=(bk // 2, 1, nb * bk // 2)), byte_alignment=16)
        sSF = smem.allocate_tensor(cutlass.Uint8, cute.make_layout(
            (nb, bk // 16, stages), stride=(bk // 16, 1, nb * bk // 16)), byte_alignment=16)
        sB = smem.allocate_tensor(cutlass.BFloat16, cute.make_layout((nb, bk), stride=(self.a_pad, 1)),
                                  byte_alignment=16)
        sC = smem.allocate_tensor(Float32, cute.make_layout((bm, bn), stride=(self.c_pad, 1)), byte_alignment=16)

        cp16 = cute.make_copy_atom(cute.nvgpu.cpasync.CopyG2SOp(), cutlass.BFloat16, num_bits_per_copy=128)
        cp16b = cute.make_copy_atom(cute.nvgpu.cpasync.CopyG2SOp(), cutlass.Uint8, num_bits_per_copy=128)
        cp_sf = cute.make_copy_atom(cute.nvgpu.cpasync.CopyG2SOp(), cutlass.Uint8,
                                    num_bits_per_copy=8 * self.sf_bytes)
        mAv = cute.zipped_divide(mA, (1, 8))  # ((1, 8), (rows, K/8))
        sAv = cute.zipped_divide(sA, (1, 8, 1))
        mWv = cute.zipped_divide(mW, (1, 1, 16))  # 16 packed bytes = 32 weights
        sWv = cute.zipped_divide(sWp, (1, 16, 1))
        mSFv = cute.zipped_divide(mSF, (1, 1, self.sf_bytes))
        sSFv = cute.zipped_divide(sSF, (1, self.sf_bytes, 1))

        a_src, a_ok = self._a_sources(mARows, row0, row_end, tidx)
        for s in cutlass.range_constexpr(stages - 1):
            if s < k_tiles:
                self._issue(kt0 + s, s, a_src, a_ok, mAv, sAv, mWv, sWv, mSFv, sSFv, cp16, cp16b, cp_sf, e, n0,
                            tidx)
            cute.arch.cp_async_commit_group()

        # MMA partitions: ldmatrix copies from the padded tiles into the fragments.
        thr_mma = tiled_mma.get_slice(tidx)
        s2r = cute.make_copy_atom(cute.nvgpu.warp.LdMatrix8x8x16bOp(False, 4), cutlass.BFloat16)
        s2r_a = cute.make_tiled_copy_A(s2r, tiled_mma)
        s2r_b = cute.make_tiled_copy_B(s2r, tiled_mma)
        thr_a = s2r_a.get_slice(tidx)
        thr_b = s2r_b.get_slice(tidx)
        tCsA = thr_mma.partition_A(sA)
        tCrA = tiled_mma.make_fragment_A(tCsA[None, None, None, 0])
        tAs = thr_a.partition_S(sA)
        tAr = thr_a.retile(tCrA)
        tCsC = thr_mma.partition_C(sC)
        # one B half (gate, and up when gated) per accumulator, each a (bn, bk) view of the expanded tile
        tBs, tBr, tCrB, accs = [], [], [], []
        for h in cutlass.range_constexpr(self.nb // bn):
            sBh = cute.local_tile(sB, (bn, bk), (h, 0))
            frag = tiled_mma.make_fragment_B(thr_mma.partition_B(sBh))
            tBs.append(thr_b.partition_S(sBh))
            tBr.append(thr_b.retile(frag))
            tCrB.append(frag)
            acc = tiled_mma.make_fragment_C(tCsC)
            acc.fill(0.0)
            accs.append(acc)
        k_blocks = bk // 16
        sBw = cute.zipped_divide(cute.recast_tensor(sB, Uint32), (1, 8))  # bf16 pairs, 8 per 16-element block

        for kt in cutlass.range(k_tiles, unroll=1):
            stage = kt % stages
            cute.arch.cp_async_wait_group(stages - 2)
            cute.arch.barrier()
            self._expand(sWp, sSF, sBw, stage, tidx)
            nk = kt + stages - 1
            if nk < k_tiles:
                self._issue(kt0 + nk, nk % stages, a_src, a_ok, mAv, sAv, mWv, sWv, mSFv, sSFv, cp16, cp16b, cp_sf, e,
                            n0, tidx)
            cute.arch.cp_async_commit_group()
            cute.arch.barrier()
            for kb in cutlass.range_constexpr(k_blocks):
                cute.copy(s2r_a, tAs[None, None, kb, stage], tAr[None, None, kb])
                for h in cutlass.range_constexpr(len(accs)):
                    cute.copy(s2r_b, tBs[h][None, None, kb], tBr[h][None, None, kb])
                    cute.gemm(tiled_mma, accs[h], tCrA[None, None, kb], tCrB[h][None, None, kb], accs[h])
        cute.arch.cp_async_wait_group(0)
        self._epilogue(accs, tCsC, sC, mAlpha, mScale, mORows, mOut, mGS, e, row0, row_end, ntile,
                       split, n_rows, tidx)

    @cute.jit
    def _epilogue(self, accs, tCsC, sC, mAlpha, mScale, mORows, mOut, mGS, e, row0, row_end, ntile, split, n_rows,
                  tidx):
        """alpha and the activation in registers (accs: one accumulator, or gate and up when gated), staged
        through sC (the thread's part of it: tCsC), then `vec`-element row vectors to the output rows."""
        bn = self.bn
        alpha = mAlpha[e] * UNDO_SHIFT  # the B tile holds the weights times 2^-7 (fp4_pair)
        acc0 = accs[0]
        vals = acc0.load() * alpha
        if const_expr(self.gated):
            g = vals
            u = accs[1].load() * alpha
            sig = cute.make_rmem_tensor_like(acc0, Float32)
            sig.store(g)
            for i in cutlass.range_constexpr(cute.size(sig)):
                sig[i] = sig[i] * cute.arch.rcp_approx(1.0 + cute.math.exp(-sig[i], fastmath=True))
            vals = sig.load() * u
        if const_expr(self.relu2):
            r = cute.make_rmem_tensor_like(acc0, Float32)
            r.store(vals)
            for i in cutlass.range_constexpr(cute.size(r)):
                v = cute.arch.fmax(r[i], Float32(0.0))
                r[i] = v * v
            vals = r.load()
        acc0.store(vals)
        cute.autovec_copy(acc0, tCsC)
        cute.arch.barrier()
        vec = self.vec
        sCv = cute.zipped_divide(sC, (1, vec))
        mOutv = cute.zipped_divide(mOut, (1, vec))
        gs = Float32(1.0)
        if const_expr(self.quant_out):
            gs = mGS[0]
        row_base = Int32(0)  # split z writes its partial tile to output rows [z * n_rows, (z + 1) * n_rows)
        if const_expr(self.splits > 1):
            row_base = split * n_rows
        for i in cutlass.range_constexpr(-(-self.out_vecs // self.threads)):
            c = tidx + i * self.threads
            r = c // (bn // vec)
            cc = c % (bn // vec)
            s = row0 + r
            if c < self.out_vecs and s < row_end:
                self._store_vec(sCv, mOutv, mScale, mORows, r, cc, s, ntile, gs, row_base)

    @cute.jit
    def _store_vec(self, sCv, mOutv, mScale, mORows, r, cc, s, ntile, gs, row_base):
        """Row r's `vec` columns from cc*vec of the staged tile (times the row's scale; fake-quantised as one
        NVFP4 block under quant_out) to its output row (offset by the split's slice)."""
        vec = self.vec
        frag = cute.make_rmem_tensor((vec,), Float32)
        cute.autovec_copy(sCv[(0, None), (r, cc)], frag)
        if const_expr(self.quant_out):
            _fake_quantize_block(frag, gs)
        vals = frag.load()
        if const_expr(mScale is not None):
            vals = vals * mScale[s]
        dst = s
        if const_expr(mORows is not None):
            dst = mORows[s]
        if const_expr(self.splits > 1):
            dst = dst + row_base
        o = cute.make_rmem_tensor((vec,), mOutv.element_type)
        o.store(vals.to(mOutv.element_type))
        cute.autovec_copy(o, mOutv[(0, None), (dst, ntile * (self.bn // vec) + cc)])

    @cute.jit
    def _a_sources(self, mARows, row0, row_end, tidx):
        """The A rows this thread copies, the same every k-tile (its 16-byte chunks c = tidx + i * threads of the
        tile), and which of them exist. Rows past the expert's end are never loaded: whatever the shared tile
        holds there only reaches output rows the epilogue drops (an output row depends on its A row alone)."""
        a_per_thr = -(-self.a_chunks // self.threads)
        a_src = cute.make_rmem_tensor((a_per_thr,), Int32)
        a_ok = cute.make_rmem_tensor((a_per_thr,), cutlass.Boolean)
        for i in cutlass.range_constexpr(a_per_thr):
            c = tidx + i * self.threads
            s = row0 + c // (self.bk // 8)
            ok = c < self.a_chunks and s < row_end
            src = s
            if const_expr(mARows is not None):
                if ok:
                    src = mARows[s]
            a_src[i] = src
            a_ok[i] = ok
        return a_src, a_ok

    @cute.jit
    def _issue(self, kt, stage, a_src, a_ok, mAv, sAv, mWv, sWv, mSFv, sSFv, cp16, cp16b, cp_sf, e, n0, tidx):
        """cp.async of k-tile kt into `stage`: the gathered A rows, the packed weights and their scales."""
        bk, nb = self.bk, self.nb
        a_per_thr = -(-self.a_chunks // self.threads)
        for i in cutlass.range_constexpr(a_per_thr):
            c = tidx + i * self.threads
            if a_ok[i]:
                r = c // (bk // 8)
                kc = c % (bk // 8)
                cute.copy(cp16, mAv[(0, None), (a_src[i], kt * (bk // 8) + kc)], sAv[(0, None, 0), (r, kc, stage)])
        for i in cutlass.range_constexpr(-(-self.w_chunks // self.threads)):
            c = tidx + i * self.threads
            if c < self.w_chunks:
                n = c // (bk // 32)
                kc = c % (bk // 32)
                cute.copy(cp16b, mWv[(0, 0, None), (e, self._w_row(n, n0), kt * (bk // 32) + kc)],
                          sWv[(0, None, 0), (n, kc, stage)])
        for i in cutlass.range_constexpr(-(-nb // self.threads)):
            n = tidx + i * self.threads
            if n < nb:
                cute.copy(cp_sf, mSFv[(0, 0, None), (e, self._w_row(n, n0), kt * (bk // 16) // self.sf_bytes)],
                          sSFv[(0, None, 0), (n, 0, stage)])

    @cute.jit
    def _w_row(self, n, n0):
        """Weight row of the CTA's B row n: gate rows first, then (gated) the matching up rows."""
        row = n0 + n
        if const_expr(self.gated):
            if n >= self.bn:
                row = self.N + n0 + (n - self.bn)
        return row

    @cute.jit
    def _expand(self, sWp, sSF, sBw, stage, tidx):
        """Packed e2m1 + e4m3 scales of one stage -> the bf16 tile (times 2^-7), one 16-element block per unit,
        four fp4_pair words per code word put in k order by prmt: the expansion's instructions per weight cap the
        decode bandwidth (the H200 issues ~33 T thread-instructions/s against 8.4 T weights/s at copy speed).
        sBw: the (nb, bk) bf16 tile as words (bf16 pairs), zipped by 8: block (n, kb) is sBw[(0, None), (n, kb)]."""
        bk = self.bk
        words = cute.recast_tensor(sWp[None, None, stage], Uint32)  # (nb, bk/8) words of 8 codes
        for i in cutlass.range_constexpr(-(-self.units // self.threads)):
            u = tidx + i * self.threads
            if u < self.units:
                n = u // (bk // 16)
                kb = u % (bk // 16)
                scale2 = block_scale2(_e4m3_to_f32(Uint32(sSF[n, kb, stage])))
                o = cute.make_rmem_tensor((8,), Uint32)
                p = cute.make_rmem_tensor((4,), Uint32)
                for h in cutlass.range_constexpr(2):
                    w = Uint32(words[n, 2 * kb + h])
                    for j in cutlass.range_constexpr(4):
                        p[j] = fp4_pair(w, j, scale2)
                    for k in cutlass.range_constexpr(4):  # word k: codes 2k, 2k + 1
                        o[4 * h + k] = bf16_halves(p[2 * (k % 2)], p[2 * (k % 2) + 1], k >= 2)
                cute.autovec_copy(o, sBw[(0, None), (n, kb)])
