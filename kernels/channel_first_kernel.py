"""The CuTe-DSL kernel of the channel-first RMSNorm family: normalise x [N, C, S] over C, no copies.

Mapping. A CTA owns `positions_per_cta` consecutive positions of one n (grid = [ceil(S / P), N]). Thread
(lane, group) = (tid % lanes, tid // lanes) owns the v consecutive positions [lane*v, lane*v + v) of the CTA
and walks its channels: c = j*groups + group ("interleaved") or group*iters + j ("blocked"), j < iters. A
load is one v-element vector of one channel; the warp's lanes are adjacent along S, so for every channel a
warp reads lanes*v*elem contiguous bytes (512 B at 32 lanes of 16 B).

Reduction. Each thread keeps v fp32 partial sums of squares (one per position) over its channels; groups in
the same warp (lanes < 32) combine by butterfly shuffles across lanes*2^k; the remaining `slots` partials
per position go to shared memory, one thread per position sums them (barrier), and every thread reads back
the totals of its v positions (barrier).

Staging. stage=reg holds the thread's iters x v tile in registers (x is read from memory once); stage=smem
copies it into a [C, P] shared-memory tile with cp.async (each thread reads back only what it copied, so no
barrier is needed before the reduction) for C too large for registers. Pass 2 normalises, applies weight,
bias and SiLU, converts and stores one vector at a time. Everything fused is a compile-time branch.

Tensors arrive as raw pointers with N, S and the N/C strides dynamic (64-bit, in elements); the caller
guarantees S and the strides are multiples of v and the pointers aligned to the vector (constraints in
kernels/channel_first.py, checked by the entry point).

NVFP4 output (ChannelFirstNvfp4Kernel: its own host signature; the device code of every other format is
unchanged). Channels are dealt out in whole 16-channel scale blocks (channel_first.channel_unit: block
k*groups + g, or g*kb + k when blocked), so a thread holds all 16 values of each of its (position, block)
pairs: amax, the e4m3 scale (rmsnorm_fp4quant's convention, NormKernel._fp4_scale) and the e2m1 codes
(NormKernel._e2m1: the SM100 cvt, or SM90's exact integer emulation) need no exchange between threads. Pass 2
encodes one position's block at a time (16 fp32 values live) into 8 code bytes and one scale byte.

Why the codes are staged in shared memory. The output is channels-last [positions, C/2]: a thread's codes
are 8 bytes per (position, block), and its positions (and the lanes of a warp) are C/2 bytes apart, so
storing them directly puts each lane of a warp in its own 32-byte sector, 8 of whose 32 bytes it writes: four
partial-sector writes per sector, as many L2 write requests as the whole input's loads. But the CTA's P
positions are consecutive rows of one n, so its codes are one contiguous run of P*C/2 bytes (its row-major
scales one run of P*C/16): written from a shared-memory tile by consecutive threads, each warp store is 256
contiguous bytes (8-byte stores; C/2 is a multiple of 8) and each scale store 32 contiguous bytes. The tile
is indexed ((i*blocks + block)*pitch + lane) (channel_first.fp4_lane_pitch): the staging stores of a warp's
lanes are adjacent (conflict-free) and the row-major read-out strides by an odd pitch (8-byte words) or one of
4 mod 8 (bytes). It costs P*C*9/16 bytes of shared memory per CTA, a barrier, and a read-out loop of
v*C/16/groups iterations per thread. (Giving each thread 16 channels of one position and storing its 8 bytes
directly saves the barrier but not the partial sectors.) Swizzled scales go out as one 4-byte word per
(position, 4 scale columns), zero past C/16; the CTA of the last positions also zeroes the rows that pad the
last 128-row tile, so one launch writes the whole buffer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from .channel_first import (FP4_STORE_BYTES, NVFP4_BLOCK, ChannelFirstConfig, ChannelFirstProblem, channel_groups,
                            channels_per_thread, fp4_lane_pitch, lanes, reduction_slots, vec_elems, warp_groups)
from .norm_kernel import NormKernel, swizzled_sf_offset
from .pdl import await_predecessor_and_release
from .problem import OPS


@dataclass(frozen=True)
class ChannelFirstSpec:
    problem: ChannelFirstProblem  # N and S are ignored (dynamic)
    cfg: ChannelFirstConfig
    arch: int

    @property
    def key(self) -> tuple:
        return (self.problem.static_key, self.cfg, self.arch)


class ChannelFirstKernel:
    def __init__(self, spec: ChannelFirstSpec):
        p, cfg = spec.problem, spec.cfg
        self.spec = spec
        self.cfg = cfg
        self.C = p.C
        self.v = vec_elems(p, cfg)
        self.P = cfg.positions_per_cta
        self.lanes = lanes(p, cfg)
        self.groups = channel_groups(p, cfg)
        self.iters = channels_per_thread(p, cfg)
        self.wg = warp_groups(p, cfg)
        self.slots = reduction_slots(p, cfg)
        self.even = self.iters * self.groups == p.C  # no thread runs past the last channel
        self.staged = cfg.stage == "smem"
        self.interleaved = cfg.c_order == "interleaved"
        self.silu = p.silu
        self.has_bias = p.bias
        self.l2 = p.l2norm
        self.fp8 = p.out_format == "fp8"
        self.sqrt_c = math.sqrt(p.C)
        # per-thread weights (and biases) preloaded into registers while the loads are in flight; a long
        # channel loop (v=1, smem staging) reads them in pass 2 instead (L1 hits, broadcast over the lanes)
        self.preload_w = self.iters <= 32
        # butterfly offsets joining the groups of one warp: ln, 2ln, ... < 32
        self.shfl_offsets = tuple(self.lanes << k for k in range(8) if (self.lanes << k) < 32) if self.wg > 1 else ()
        # NVFP4 (ChannelFirstNvfp4Kernel): blocks of 16 channels, kb per thread; the attributes NormKernel's
        # borrowed helpers read (the rmsnorm_fp4quant scale convention; the SM100 e2m1 cvt)
        self.nvfp4 = p.out_format == "nvfp4"
        self.nb = p.C // NVFP4_BLOCK
        self.kb = self.iters // NVFP4_BLOCK
        self.swizzled = p.scale_layout == "swizzled"
        self.out_format = p.out_format
        self.op = OPS["rmsnorm_fp4quant"]
        self.hw_fp4 = spec.arch >= 100
        self.word_pitch, self.byte_pitch = fp4_lane_pitch(p, cfg) if self.nvfp4 else (0, 0)

    # one scale block's amax -> (multiplier gs / f32(s), e4m3 scale byte s), and fp32 -> e2m1 code: the row
    # kernel's own device functions (kernels/norm_kernel.py), so both families encode NVFP4 the same way
    _fp4_scale = NormKernel._fp4_scale
    _to_e4m3_bits = NormKernel._to_e4m3_bits
    _e4m3_bits_to_f32 = NormKernel._e4m3_bits_to_f32
    _e2m1 = NormKernel._e2m1

    # ------------------------------------------------------------------ host side
    @cute.jit
    def __call__(self, x_ptr: cute.Pointer, w_ptr: cute.Pointer, b_ptr, y_ptr: cute.Pointer, N: Int32, S: Int32,
                 sxn: cutlass.Int64, sxc: cutlass.Int64, syn: cutlass.Int64, syc: cutlass.Int64,
                 eps: Float32, qscale: Float32, stream):
        v, C = self.v, self.C
        Sv = cute.assume(S, divby=v)
        mX = cute.make_tensor(x_ptr, cute.make_layout(
            (N, C, Sv), stride=(cute.assume(sxn, divby=v), cute.assume(sxc, divby=v), 1)))
        mY = cute.make_tensor(y_ptr, cute.make_layout(
            (N, C, Sv), stride=(cute.assume(syn, divby=v), cute.assume(syc, divby=v), 1)))
        mW = cute.make_tensor(w_ptr, cute.make_layout((C,)))
        mB = None
        if const_expr(b_ptr is not None):
            mB = cute.make_tensor(b_ptr, cute.make_layout((C,)))
        self.kernel(mX, mW, mB, mY, eps, qscale).launch(
            grid=[cute.ceil_div(S, self.P), N, 1],
            block=[self.cfg.threads, 1, 1],
            stream=stream,
            use_pdl=self.cfg.pdl,
        )

    # ------------------------------------------------------------------ device side
    @cute.jit
    def _channel(self, j, g):
        if const_expr(self.nvfp4):  # whole blocks: channel j % 16 of the thread's block j // 16
            return self._block(j // NVFP4_BLOCK, g) * NVFP4_BLOCK + j % NVFP4_BLOCK
        c = g * self.iters + j
        if const_expr(self.interleaved):
            c = j * self.groups + g
        return c

    @cute.jit
    def _block(self, k, g):
        """NVFP4: the thread's k-th block of 16 channels (block-interleaved, or a run of kb blocks)."""
        b = g * self.kb + k
        if const_expr(self.interleaved):
            b = k * self.groups + g
        return b

    @cute.jit
    def _c_ok(self, c):
        ok = True
        if const_expr(not self.even):
            ok = c < self.C
        return ok

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mW: cute.Tensor, mB, mY: cute.Tensor, eps: Float32, qscale: Float32):
        self._body(mX, mW, mB, mY, None, None, eps, qscale)

    @cute.jit
    def _body(self, mX: cute.Tensor, mW: cute.Tensor, mB, mY: cute.Tensor, mSF, mGS, eps: Float32,
              qscale: Float32):
        """The whole kernel; mSF / mGS (NVFP4's scales and global scale) are None for the other formats."""
        v, ln, iters = self.v, self.lanes, self.iters
        tidx, _, _ = cute.arch.thread_idx()
        bidx, n, _ = cute.arch.block_idx()
        lane = tidx % ln
        g = tidx // ln
        pv = bidx * ln + lane  # this thread's position vector along S
        pos_ok = pv < mX.shape[2] // v
        qinv = Float32(1.0)
        if const_expr(self.fp8):  # one IEEE divide per thread; per element it costs ~10 instructions
            qinv = Float32(1.0) / qscale
        await_predecessor_and_release(self.cfg.pdl)

        smem = cutlass.utils.SmemAllocator()
        red = None
        if const_expr(self.slots > 1):
            red = smem.allocate_tensor(Float32, cute.make_layout((self.P, self.slots)), byte_alignment=16)
        sX = None
        if const_expr(self.staged):
            sX = smem.allocate_tensor(mX.element_type, cute.make_layout((v, ln, self.C)), byte_alignment=16)
        sQ = None
        sS = None
        if const_expr(self.nvfp4):  # staging tiles of the codes (8-byte words) and scales (bytes)
            nb, wp, bp = self.nb, self.word_pitch, self.byte_pitch
            sQ = smem.allocate_tensor(cutlass.Uint8, cute.make_layout(
                (FP4_STORE_BYTES, ln, nb, v), stride=(1, FP4_STORE_BYTES, FP4_STORE_BYTES * wp,
                                                      FP4_STORE_BYTES * wp * nb)), byte_alignment=16)
            sS = smem.allocate_tensor(cutlass.Uint8, cute.make_layout((ln, nb, v), stride=(1, bp, bp * nb)),
                                      byte_alignment=16)
        mXv = cute.zipped_divide(mX, (1, 1, v))
        mYv = None
        if const_expr(not self.nvfp4):
            mYv = cute.zipped_divide(mY, (1, 1, v))

        # Pass 1: issue every load of the thread's tile (registers, or cp.async into shared memory).
        x_frag = cute.make_rmem_tensor((v, 1 if self.staged else iters), mX.element_type)
        x_frag.fill(0.0)
        if const_expr(self.staged):
            atom = cute.make_copy_atom(cute.nvgpu.cpasync.CopyG2SOp(), mX.element_type,
                                       num_bits_per_copy=v * mX.element_type.width)
            for j in cutlass.range_constexpr(iters):
                c = self._channel(j, g)
                if pos_ok and self._c_ok(c):
                    cute.copy(atom, mXv[(0, 0, None), (n, c, pv)], sX[None, lane, c])
            cute.arch.cp_async_commit_group()
        else:
            for j in cutlass.range_constexpr(iters):
                c = self._channel(j, g)
                if pos_ok and self._c_ok(c):
                    cute.autovec_copy(mXv[(0, 0, None), (n, c, pv)], x_frag[None, j])
        w_frag = None
        b_frag = None
        if const_expr(self.preload_w):
            w_frag = cute.make_rmem_tensor((iters,), Float32)
            w_frag.fill(0.0)
            if const_expr(self.has_bias):
                b_frag = cute.make_rmem_tensor((iters,), Float32)
                b_frag.fill(0.0)
            for j in cutlass.range_constexpr(iters):
                c = self._channel(j, g)
                if self._c_ok(c):
                    w_frag[j] = Float32(mW[c])
                    if const_expr(self.has_bias):
                        b_frag[j] = Float32(mB[c])
        if const_expr(self.staged):
            cute.arch.cp_async_wait_group(0)

        # Sum of squares per position: this thread's channels, then the groups sharing the positions.
        acc = cute.make_rmem_tensor((v,), Float32)
        acc.fill(0.0)
        for j in cutlass.range_constexpr(iters):
            c = self._channel(j, g)
            if const_expr(self.staged):
                if self._c_ok(c):
                    self._accumulate(acc, x_frag, sX, j, lane, c)
            else:
                self._accumulate(acc, x_frag, sX, j, lane, c)
        if const_expr(self.wg > 1):
            for i in cutlass.range_constexpr(v):
                val = acc[i]
                for k in cutlass.range_constexpr(len(self.shfl_offsets)):
                    val = val + cute.arch.shuffle_sync_bfly(val, offset=self.shfl_offsets[k], mask=-1,
                                                            mask_and_clamp=31)
                acc[i] = val
        if const_expr(self.slots > 1):
            # partials -> red[pos, slot]; then thread t sums position t (t + threads, ...) over the slots into
            # red[pos, 0]; then every thread reads its v totals. (Summing all slots in every thread kept
            # slots x v loads in flight: 195 registers per thread at 16 slots x 8 positions.)
            if g % self.wg == 0:
                for i in cutlass.range_constexpr(v):
                    red[lane * v + i, g // self.wg] = acc[i]
            cute.arch.barrier()
            for q in cutlass.range_constexpr(-(-self.P // self.cfg.threads)):
                pos = q * self.cfg.threads + tidx
                if pos < self.P:
                    total = Float32(0.0)
                    for k in cutlass.range_constexpr(self.slots):
                        total = total + red[pos, k]
                    red[pos, 0] = total
            cute.arch.barrier()
            for i in cutlass.range_constexpr(v):
                acc[i] = red[lane * v + i, 0]

        # Per-position factor: rsqrt(mean + eps), or sqrt(C) / max(||x||, eps) (F.normalize's clamp).
        for i in cutlass.range_constexpr(v):
            if const_expr(self.l2):
                nrm = cute.math.sqrt(acc[i], fastmath=False)
                acc[i] = Float32(self.sqrt_c) / cute.arch.fmax(nrm, eps)
            else:
                acc[i] = cute.math.rsqrt(acc[i] / self.C + eps, fastmath=False)
        if const_expr(self.nvfp4):
            self._encode_fp4(x_frag, sX, w_frag, b_frag, mW, mB, acc, sQ, sS, lane, g, mGS)
            cute.arch.barrier()
            self._write_fp4(mX, mY, mSF, sQ, sS, tidx, bidx, n)
        else:
            r = acc.load()

            # Pass 2: normalise, fuse, convert and store one vector at a time.
            for j in cutlass.range_constexpr(iters):
                c = self._channel(j, g)
                if pos_ok and self._c_ok(c):
                    self._store_channel(x_frag, sX, w_frag, b_frag, mW, mB, mYv, r, j, lane, c, n, pv, qinv)

    @cute.jit
    def _accumulate(self, acc, x_frag, sX, j, lane, c):
        xv = self._x_vec(x_frag, sX, j, lane, c)
        acc.store(acc.load() + xv * xv)

    @cute.jit
    def _store_channel(self, x_frag, sX, w_frag, b_frag, mW, mB, mYv, r, j, lane, c, n, pv, qinv):
        """y = x * r * w (+ b) (SiLU) (* 1/scale) for channel c of this thread's positions, one vector store."""
        xv = self._x_vec(x_frag, sX, j, lane, c)
        w = Float32(0.0)
        b = Float32(0.0)
        if const_expr(self.preload_w):
            w = w_frag[j]
            if const_expr(self.has_bias):
                b = b_frag[j]
        else:
            w = Float32(mW[c])
            if const_expr(self.has_bias):
                b = Float32(mB[c])
        y = xv * r * w
        if const_expr(self.has_bias):
            y = y + b
        if const_expr(self.silu):
            y = self._silu(y)
        if const_expr(self.fp8):
            y = y * qinv  # within the last fp32 bit of y / scale: inside the 1-code e4m3 tolerance
        y_frag = cute.make_rmem_tensor((self.v,), mYv.element_type)
        y_frag.store(y.to(mYv.element_type))
        cute.autovec_copy(y_frag, mYv[(0, 0, None), (n, c, pv)])

    @cute.jit
    def _x_vec(self, x_frag, sX, j, lane, c):
        """Channel j's vector of this thread as fp32, from registers or the staged tile."""
        if const_expr(self.staged):
            cute.autovec_copy(sX[None, lane, c], x_frag[None, 0])
            return x_frag[None, 0].load().to(Float32)
        return x_frag[None, j].load().to(Float32)

    @cute.jit
    def _silu(self, y):
        """y * sigmoid(y) with one ex2 and one rcp per element, as the row kernel (within 1 ulp)."""
        f = cute.make_rmem_tensor((self.v,), Float32)
        f.store(y)
        for i in cutlass.range_constexpr(self.v):
            f[i] = f[i] * cute.arch.rcp_approx(1.0 + cute.math.exp(-f[i], fastmath=True))
        return f.load()

    # ------------------------------------------------------------------ NVFP4 output
    @cute.jit
    def _encode_fp4(self, x_frag, sX, w_frag, b_frag, mW, mB, acc, sQ, sS, lane, g, mGS):
        """Pass 2 of NVFP4: y = x * r * w (+ b) (SiLU) for each of the thread's (position, block) pairs, one
        position's 16 channels at a time, its amax -> e4m3 scale -> 8 bytes of e2m1 codes (even channel in the
        low nibble), staged with the scale byte in shared memory. Positions past S encode the zero-filled (or
        stale) tile and are never written out."""
        v, blk_n = self.v, NVFP4_BLOCK
        gs = mGS[0]
        xb = None
        if const_expr(self.staged):  # the block's 16 vectors from the staged tile
            xb = cute.make_rmem_tensor((v, blk_n), sX.element_type)
        wb = None
        bb = None
        if const_expr(not self.preload_w):
            wb = cute.make_rmem_tensor((blk_n,), Float32)
            if const_expr(self.has_bias):
                bb = cute.make_rmem_tensor((blk_n,), Float32)
        f = cute.make_rmem_tensor((blk_n,), Float32)
        q = cute.make_rmem_tensor((FP4_STORE_BYTES,), cutlass.Uint8)
        for k in cutlass.range_constexpr(self.kb):
            blk = self._block(k, g)
            if self._c_ok(blk * blk_n):
                if const_expr(self.staged):
                    for jj in cutlass.range_constexpr(blk_n):
                        cute.autovec_copy(sX[None, lane, blk * blk_n + jj], xb[None, jj])
                if const_expr(not self.preload_w):
                    for jj in cutlass.range_constexpr(blk_n):
                        wb[jj] = Float32(mW[blk * blk_n + jj])
                        if const_expr(self.has_bias):
                            bb[jj] = Float32(mB[blk * blk_n + jj])
                for i in cutlass.range_constexpr(v):
                    amax = Float32(0.0)
                    for jj in cutlass.range_constexpr(blk_n):
                        j = k * blk_n + jj
                        xval = Float32(0.0)
                        if const_expr(self.staged):
                            xval = Float32(xb[i, jj])
                        else:
                            xval = Float32(x_frag[i, j])
                        w = Float32(0.0)
                        b = Float32(0.0)
                        if const_expr(self.preload_w):
                            w = w_frag[j]
                            if const_expr(self.has_bias):
                                b = b_frag[j]
                        else:
                            w = wb[jj]
                            if const_expr(self.has_bias):
                                b = bb[jj]
                        y = xval * acc[i] * w  # the other formats' order of operations (_store_channel)
                        if const_expr(self.has_bias):
                            y = y + b
                        if const_expr(self.silu):
                            y = y * cute.arch.rcp_approx(1.0 + cute.math.exp(-y, fastmath=True))
                        f[jj] = y
                        amax = cute.arch.fmax(amax, cute.arch.fmax(y, -y))  # NaN ignored, as the encoder
                    mult, sf_byte = self._fp4_scale(amax, gs)
                    for jj in cutlass.range_constexpr(FP4_STORE_BYTES):
                        lo = self._e2m1(f[2 * jj] * mult)
                        hi = self._e2m1(f[2 * jj + 1] * mult)
                        q[jj] = cutlass.Uint8(lo | (hi << 4))
                    cute.autovec_copy(q, sQ[None, lane, blk, i])
                    sS[lane, blk, i] = cutlass.Uint8(sf_byte)

    @cute.jit
    def _write_fp4(self, mX, mY, mSF, sQ, sS, tidx, bidx, n):
        """The CTA's staged codes and scales to memory: codes as one contiguous run of 8-byte stores of
        consecutive threads (rows s0.. of n); row-major scales as one run of bytes; swizzled scales one 4-byte
        word (4 scale columns, zero past C/16) per (position, column tile), plus the zero rows padding the last
        128-row tile (by the CTA of the last positions)."""
        v, nb, P, T = self.v, self.nb, self.P, self.cfg.threads
        S = mX.shape[2]
        s0 = bidx * P
        q = cute.make_rmem_tensor((FP4_STORE_BYTES,), cutlass.Uint8)
        mYv = cute.zipped_divide(mY, (1, 1, FP4_STORE_BYTES))
        units = P * nb
        for it in cutlass.range_constexpr(-(-units // T)):
            u = it * T + tidx
            row = u // nb
            col = u % nb
            if self._unit_ok(u, units) and s0 + row < S:
                cute.autovec_copy(sQ[None, row // v, col, row % v], q)
                cute.autovec_copy(q, mYv[(0, 0, None), (n, s0 + row, col)])
        if const_expr(not self.swizzled):
            for it in cutlass.range_constexpr(-(-units // T)):
                u = it * T + tidx
                row = u // nb
                col = u % nb
                if self._unit_ok(u, units) and s0 + row < S:
                    mSF[n, s0 + row, col] = sS[row // v, col, row % v]
        else:
            kt = -(-nb // 4)
            words = P * kt
            w4 = cute.make_rmem_tensor((4,), cutlass.Uint8)
            r0 = cutlass.Int64(n) * cutlass.Int64(S) + cutlass.Int64(s0)
            for it in cutlass.range_constexpr(-(-words // T)):
                u = it * T + tidx
                row = u // kt
                kc = u % kt
                if self._unit_ok(u, words) and s0 + row < S:
                    for c4 in cutlass.range_constexpr(4):
                        col = kc * 4 + c4
                        w4[c4] = cutlass.Uint8(0)
                        if self._unit_ok(col, nb, nb % 4 == 0):
                            w4[c4] = sS[row // v, col, row % v]
                    self._store_sf_word(mSF, swizzled_sf_offset(r0 + row, kc * 4, kt), w4)
            # rows [N*S, N*S rounded up to 128) read as zero scales: the CTA of the last positions writes them
            n_cta, N, _ = cute.arch.grid_dim()
            if n == N - 1 and bidx == n_cta - 1:
                rows = cutlass.Int64(N) * cutlass.Int64(S)
                pad = Int32((rows + 127) // 128 * 128 - rows)
                for c4 in cutlass.range_constexpr(4):
                    w4[c4] = cutlass.Uint8(0)
                for u in cutlass.range(tidx, pad * kt, T, unroll=1):
                    self._store_sf_word(mSF, swizzled_sf_offset(rows + u // kt, (u % kt) * 4, kt), w4)

    @cute.jit
    def _unit_ok(self, u, count, always=None):
        """u < count, or True when the loop tiles `count` exactly (`always`: the caller's own static answer)."""
        ok = True
        if const_expr(always is None):
            always = count % self.cfg.threads == 0
        if const_expr(not always):
            ok = u < count
        return ok

    @cute.jit
    def _store_sf_word(self, mSF, offset, w4):
        """4 scale bytes at `offset` (a multiple of 4) of the swizzled buffer, one 32-bit store."""
        dst = cute.make_tensor(mSF.iterator + cute.assume(offset, divby=4), cute.make_layout((4,)))
        cute.autovec_copy(w4, dst)


class ChannelFirstNvfp4Kernel(ChannelFirstKernel):
    """NVFP4 output (module docstring): the same device code with an NVFP4 pass 2, behind its own host
    signature (codes, scales and global scale pointers; no static scale)."""

    @cute.jit
    def __call__(self, x_ptr: cute.Pointer, w_ptr: cute.Pointer, b_ptr, y_ptr: cute.Pointer, sf_ptr: cute.Pointer,
                 gs_ptr: cute.Pointer, N: Int32, S: Int32, sxn: cutlass.Int64, sxc: cutlass.Int64,
                 syn: cutlass.Int64, syr: cutlass.Int64, eps: Float32, stream):
        """y: packed codes [N, S, C/2] (strides syn, syr bytes: the dense S*C/2, C/2, passed 64-bit);
        sf: e4m3 scales, dense [N, S, C/16] or the flat swizzled buffer; gs: one float32."""
        v, C = self.v, self.C
        Sv = cute.assume(S, divby=v)
        mX = cute.make_tensor(x_ptr, cute.make_layout(
            (N, C, Sv), stride=(cute.assume(sxn, divby=v), cute.assume(sxc, divby=v), 1)))
        st = FP4_STORE_BYTES
        mY = cute.make_tensor(y_ptr, cute.make_layout(
            (N, S, C // 2), stride=(cute.assume(syn, divby=st), cute.assume(syr, divby=st), 1)))
        if const_expr(self.swizzled):
            mSF = cute.make_tensor(sf_ptr, cute.make_layout((4,)))  # addressed by swizzled_sf_offset
        else:
            mSF = cute.make_tensor(sf_ptr, cute.make_layout((N, S, self.nb), stride=(syn // st, syr // st, 1)))
        mW = cute.make_tensor(w_ptr, cute.make_layout((C,)))
        mB = None
        if const_expr(b_ptr is not None):
            mB = cute.make_tensor(b_ptr, cute.make_layout((C,)))
        mGS = cute.make_tensor(gs_ptr, cute.make_layout((1,)))
        self.kernel_fp4(mX, mW, mB, mY, mSF, mGS, eps).launch(
            grid=[cute.ceil_div(S, self.P), N, 1],
            block=[self.cfg.threads, 1, 1],
            stream=stream,
            use_pdl=self.cfg.pdl,
        )

    @cute.kernel
    def kernel_fp4(self, mX: cute.Tensor, mW: cute.Tensor, mB, mY: cute.Tensor, mSF: cute.Tensor,
                   mGS: cute.Tensor, eps: Float32):
        self._body(mX, mW, mB, mY, mSF, mGS, eps, Float32(1.0))
