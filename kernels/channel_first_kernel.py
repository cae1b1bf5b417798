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
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cutlass
import cutlass.cute as cute
from cutlass import Float32, Int32, const_expr

from .channel_first import (ChannelFirstConfig, ChannelFirstProblem, channel_groups, channels_per_thread, lanes,
                            reduction_slots, vec_elems, warp_groups)


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
        c = g * self.iters + j
        if const_expr(self.interleaved):
            c = j * self.groups + g
        return c

    @cute.jit
    def _c_ok(self, c):
        ok = True
        if const_expr(not self.even):
            ok = c < self.C
        return ok

    @cute.kernel
    def kernel(self, mX: cute.Tensor, mW: cute.Tensor, mB, mY: cute.Tensor, eps: Float32, qscale: Float32):
        v, ln, iters = self.v, self.lanes, self.iters
        tidx, _, _ = cute.arch.thread_idx()
        bidx, n, _ = cute.arch.block_idx()
        lane = tidx % ln
        g = tidx // ln
        pv = bidx * ln + lane  # this thread's position vector along S
        pos_ok = pv < mX.shape[2] // v
        if const_expr(self.cfg.pdl):
            cute.arch.griddepcontrol_wait()
            cute.arch.griddepcontrol_launch_dependents()

        smem = cutlass.utils.SmemAllocator()
        red = None
        if const_expr(self.slots > 1):
            red = smem.allocate_tensor(Float32, cute.make_layout((self.P, self.slots)), byte_alignment=16)
        sX = None
        if const_expr(self.staged):
            sX = smem.allocate_tensor(mX.element_type, cute.make_layout((v, ln, self.C)), byte_alignment=16)
        mXv = cute.zipped_divide(mX, (1, 1, v))
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
        r = acc.load()

        # Pass 2: normalise, fuse, convert and store one vector at a time.
        for j in cutlass.range_constexpr(iters):
            c = self._channel(j, g)
            if pos_ok and self._c_ok(c):
                self._store_channel(x_frag, sX, w_frag, b_frag, mW, mB, mYv, r, j, lane, c, n, pv, qscale)

    @cute.jit
    def _accumulate(self, acc, x_frag, sX, j, lane, c):
        xv = self._x_vec(x_frag, sX, j, lane, c)
        acc.store(acc.load() + xv * xv)

    @cute.jit
    def _store_channel(self, x_frag, sX, w_frag, b_frag, mW, mB, mYv, r, j, lane, c, n, pv, qscale):
        """y = x * r * w (+ b) (SiLU) (/ scale) for channel c of this thread's positions, one vector store."""
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
            y = y / qscale  # IEEE division as the reference; the e4m3 cvt saturates at +-448
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
