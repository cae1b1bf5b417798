"""The fused-MoE grouped GEMM on SM90's warpgroup MMA (mma="wgmma"): kernels/moe_kernel.py's GEMM with the
tensor-core work moved from per-warp mma.sync to asynchronous wgmma, for the large batches.

Why. mma.sync feeds the tensor cores from registers, one 16x8x16 step per warp instruction after ldmatrix
loads; on the H200 the large batches ran at 16-30 % of torch.mm 8192^3's rate with it (Mixtral-8x7B W4A16
T=8192: 29.5 ms against 13.5 ms for torch's grouped mm on the dequantised weights). wgmma reads both
operands from shared memory (descriptors, no ldmatrix), takes 64 x N x 16 per instruction for a whole
warpgroup and runs asynchronously: the FP4 expansion of the next k-tile overlaps it.

Semantics are MoEGemmKernel's, unchanged: the same launch arguments and grid (x the m-tiles of every local
expert counted over tile_offsets, y the column tiles), gathered A rows (a_rows), FC1 gated
SiLU (gate rows [n0, n0+bn) and up rows [I+n0, I+n0+bn): two accumulators), ReLU2, FC2's row scale and
out_rows, W4A4's fake quantisation of the output's 16-element blocks (x arrives quantised). It
reuses MoEGemmKernel's cp.async issue, its exact FP4 expansion (_expand: fp4_pair's bf16 arithmetic, so
the B tile is bit for bit the one mma.sync multiplies) and its epilogue; only fp32
summation order differs. It never splits K (violations declare splits=1).

Warps. warps_m = 4 and warps_n warpgroups: bm/64 of them along M (each 64 rows, its four warps 16 rows
apiece of the instruction), or, when there are fewer, all of them along M, each over bm / warps_n rows in
several 64-row instructions (bm 256 on two warpgroups: half the FP4 expansion per multiply-add of bm 128);
the rest along N (bn / that many columns each, one instruction per accumulator, 64 rows and k-step of 16). Every thread also copies and expands (no producer warps): the expansion is ALU work that
wants all the warps it can get.

Shared memory: one arena (kernels/moe_config.wgmma_smem_layout): `stages` A tiles (bf16, K-major, 128-byte
swizzled rows: the layout wgmma descriptors read without bank conflicts), `stages` packed-weight and scale
tiles as moe_kernel's, and two expanded bf16 B tiles (gate rows then up rows, K-major, swizzled alike). The
epilogue's fp32 staging tile overlays the arena once every wgmma has retired.

Pipeline per k-tile kt (prefetch distance stages - 2: the buffers of tile kt-1 are still being read by its
wgmma while kt's are prepared, so tile kt + stages - 2 goes into those of kt - 2):
  wait for kt's cp.async group; barrier (every thread's copies of kt landed; every warpgroup has retired
  kt-2's wgmma, so its B buffer and A stage are free); expand B into buffer kt % 2;
  issue the cp.async loads of tile kt + stages - 2; fence.proxy.async (the generic-proxy writes: cp.async,
  expansion, made visible to the async proxy wgmma reads through); barrier; wgmma over the
  tile's k-steps (warpgroup fence, commit); wait until at most this tile's group is in flight.
So kt's wgmma runs while the next iteration waits, expands and loads.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass import BFloat16, Float32, Uint32, const_expr
from cutlass.utils import LayoutEnum

from .moe_config import WGMMA_WARPS_M, violations, wgmma_smem_layout
from .moe_kernel import MoEGemmKernel, MoEGemmSpec

WARPGROUP_THREADS = 128


@cute.jit
def _swizzled_words(t: cute.Tensor, swizzle) -> cute.Tensor:
    """A swizzled bf16 shared tensor viewed as 32-bit words (bf16 pairs), swizzle kept: cute.recast_tensor
    drops a pointer's swizzle, which would leave the expansion writing the linear layout the wgmma
    descriptors do not read. The swizzle acts on byte addresses, so it holds for any element width."""
    w = cute.recast_tensor(t, Uint32)
    return cute.make_tensor(cute.recast_ptr(w.iterator, swizzle, dtype=Uint32), w.layout)


class MoEWgmmaKernel(MoEGemmKernel):
    def __init__(self, spec: MoEGemmSpec):
        sh, cfg = spec.shape, spec.cfg
        if cfg.mma != "wgmma":
            raise ValueError(f"MoEWgmmaKernel runs mma='wgmma' configs, got {cfg.short()}")
        why = violations(sh, cfg, spec.arch)
        if why:
            raise ValueError(f"invalid wgmma config {cfg.short()} for {sh}: {'; '.join(why)}")
        super().__init__(spec)
        assert self.wm == WGMMA_WARPS_M and self.splits == 1
        self.wg_m, self.wg_n = cfg.warpgroups
        self.c_pad = self.bn + 8  # fp32 staging rows: the accumulator's float2 stores hit 32 distinct banks
        self.smem_offsets, self.smem_total = wgmma_smem_layout(sh, cfg)
        self.k_blocks = self.bk // 16  # wgmma k-steps per k-tile

    def _make_tiled_mma(self):
        """bf16 x bf16 -> fp32 warpgroup MMA, both operands K-major in shared memory: 64 x bn/wg_n per
        instruction, warpgroups tiled wg_m along M and wg_n along N."""
        op = cute.nvgpu.warpgroup.MmaF16BF16Op(BFloat16, Float32, (64, self.bn // self.wg_n, 16),
                                               cute.nvgpu.warpgroup.OperandSource.SMEM,
                                               cute.nvgpu.OperandMajorMode.K, cute.nvgpu.OperandMajorMode.K)
        return cute.make_tiled_mma(cute.make_mma_atom(op), (self.wg_m, self.wg_n, 1))

    @cute.jit
    def _tile(self, mA, mARows, mW, mSF, mAlpha, mScale, mORows, mOut, mGS, tiled_mma, e, row0, row_end, ntile,
              split, n_rows, tidx):
        bm, bn, bk, stages, nb = self.bm, self.bn, self.bk, self.stages, self.nb
        k_tiles = self.k_tiles
        n0 = ntile * bn
        off = self.smem_offsets

        smem = cutlass.utils.SmemAllocator()
        base = smem.allocate(self.smem_total, byte_alignment=1024)
        a_layout = sm90_utils.make_smem_layout_a(LayoutEnum.ROW_MAJOR, (bm, bn, bk), BFloat16, stages)
        b_layout = sm90_utils.make_smem_layout_b(LayoutEnum.ROW_MAJOR, (bm, nb, bk), BFloat16, 2)
        sA = cute.make_tensor(cute.recast_ptr(base + off["a"], a_layout.inner, dtype=BFloat16), a_layout.outer)
        sB = cute.make_tensor(cute.recast_ptr(base + off["b"], b_layout.inner, dtype=BFloat16), b_layout.outer)
        sWp = cute.make_tensor(cute.recast_ptr(base + off["w"], dtype=cutlass.Uint8), cute.make_layout(
            (nb, bk // 2, stages), stride=(bk // 2, 1, nb * bk // 2)))
        sSF = cute.make_tensor(cute.recast_ptr(base + off["sf"], dtype=cutlass.Uint8), cute.make_layout(
            (nb, bk // 16, stages), stride=(bk // 16, 1, nb * bk // 16)))
        # the epilogue's staging tile: over the operands, written only after every wgmma retired
        sC = cute.make_tensor(cute.recast_ptr(base + off["c"], dtype=Float32),
                              cute.make_layout((bm, bn), stride=(self.c_pad, 1)))

        cp16 = cute.make_copy_atom(cute.nvgpu.cpasync.CopyG2SOp(), BFloat16, num_bits_per_copy=128)
        cp16b = cute.make_copy_atom(cute.nvgpu.cpasync.CopyG2SOp(), cutlass.Uint8, num_bits_per_copy=128)
        cp_sf = cute.make_copy_atom(cute.nvgpu.cpasync.CopyG2SOp(), cutlass.Uint8,
                                    num_bits_per_copy=8 * self.sf_bytes)
        mAv = cute.zipped_divide(mA, (1, 8))
        sAv = cute.zipped_divide(sA, (1, 8, 1))  # 16-byte chunks: whole under the 128-byte swizzle
        mWv = cute.zipped_divide(mW, (1, 1, 16))
        sWv = cute.zipped_divide(sWp, (1, 16, 1))
        mSFv = cute.zipped_divide(mSF, (1, 1, self.sf_bytes))
        sSFv = cute.zipped_divide(sSF, (1, self.sf_bytes, 1))

        a_src, a_ok = self._a_sources(mARows, row0, row_end, tidx)

        for s in cutlass.range_constexpr(stages - 2):
            if s < k_tiles:
                self._issue(s, s, a_src, a_ok, mAv, sAv, mWv, sWv, mSFv, sSFv, cp16, cp16b, cp_sf, e, n0, tidx)
            cute.arch.cp_async_commit_group()

        # Operand descriptors are per warpgroup (every thread of one sees the same), accumulators per thread.
        wg = cute.arch.make_warp_uniform(tidx // WARPGROUP_THREADS)
        thr_wg = tiled_mma.get_slice(wg * WARPGROUP_THREADS)
        tCrA = tiled_mma.make_fragment_A(thr_wg.partition_A(sA))  # (MMA, MMA_M, MMA_K, stages)
        tCsC = tiled_mma.get_slice(tidx).partition_C(sC)
        tCrB, accs = [], []
        for h in cutlass.range_constexpr(nb // bn):  # gate rows, then (gated) up rows of both B buffers
            sBh = cute.local_tile(sB, (bn, bk, 2), (h, 0, 0))
            tCrB.append(tiled_mma.make_fragment_B(thr_wg.partition_B(sBh)))  # (MMA, MMA_N, MMA_K, 2)
            acc = tiled_mma.make_fragment_C(tCsC)
            acc.fill(0.0)
            accs.append(acc)
        tiled_mma.set(cute.nvgpu.warpgroup.Field.ACCUMULATE, True)  # zeroed above: every k-step accumulates

        for kt in cutlass.range(k_tiles, unroll=1):
            stage = kt % stages
            buf = kt % 2
            cute.arch.cp_async_wait_group(stages - 3)
            cute.arch.barrier()
            sBw = cute.zipped_divide(_swizzled_words(sB[None, None, buf], b_layout.inner), (1, 8))
            self._expand(sWp, sSF, sBw, stage, tidx)
            nk = kt + stages - 2
            if nk < k_tiles:
                self._issue(nk, nk % stages, a_src, a_ok, mAv, sAv, mWv, sWv, mSFv, sSFv, cp16, cp16b, cp_sf, e, n0,
                            tidx)
            cute.arch.cp_async_commit_group()
            cute.arch.fence_proxy("async.shared", space="cta")
            cute.arch.barrier()
            cute.nvgpu.warpgroup.fence()
            for kb in cutlass.range_constexpr(self.k_blocks):
                for h in cutlass.range_constexpr(len(accs)):
                    cute.gemm(tiled_mma, accs[h], tCrA[None, None, kb, stage], tCrB[h][None, None, kb, buf], accs[h])
            cute.nvgpu.warpgroup.commit_group()
            cute.nvgpu.warpgroup.wait_group(1)
        cute.nvgpu.warpgroup.wait_group(0)
        cute.arch.cp_async_wait_group(0)
        cute.arch.barrier()  # every warpgroup done reading the operands sC overlays
        self._epilogue(accs, tCsC, sC, mAlpha, mScale, mORows, mOut, mGS, e, row0, row_end, ntile, split, n_rows,
                       tidx)
