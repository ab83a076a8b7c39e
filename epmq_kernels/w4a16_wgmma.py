"""W4A16 for large batches on Hopper: ``wgmma`` with the weight dequantized in its registers (Gluon).

At a batch of hundreds of rows the product is compute bound, and the fastest path so far
dequantized chunks of the weight to fp16 in memory and called cuBLAS (``dqmm``: 0.75-0.81x fp16
cuBLAS at M = 1024 on an H200, 2026-12-04, the dequantization in series with the product).
Here the weight never leaves the registers: it is the A operand of Hopper's warpgroup MMA
(``wgmma.mma_async``, which takes A from registers and B from shared memory), so the int4
codes cross memory once, as in the ``mma`` path (:mod:`epmq_kernels.w4a16_mma`), and the
tensor cores run at wgmma's rate, not ``mma.sync``'s.

The product
-----------
``y^T = W^T x^T``, the weight ``[BLOCK_N, BLOCK_K]`` in registers (the instruction's M: 64 rows
a warpgroup, 16 a warp), the activations ``x^T`` ``[BLOCK_K, BLOCK_M]`` in shared memory (the
instruction's N: the batch, up to 256). A warp's share of the A operand has the layout of an
``mma.sync.m16n8k16`` A fragment, so the K order (a thread's operand registers over two 16-input
steps are the 8 codes of one packed word) and the N order (a load of ``J`` consecutive words
feeds ``J`` column tiles) of :mod:`.w4a16_mma` apply unchanged, with ``J`` words a load instead
of 4. Activations are loaded from global memory in natural order and written to shared memory
in the permuted K order (a thread's 8 consecutive inputs are 4 pairs of adjacent slots), two
buffers: the next step's tile is written while the current step's MMA runs.

*Scales.* Unlike the small-batch paths, which scale the fp32 product of each group, the
dequantized weight is rounded once to the activation dtype: ``w = (q - z) * s`` as the
``dqmm`` path writes it (a second accumulator per group would double the registers of a
128 x 128 tile). With 16-bit scales of the activation dtype that is one half2 multiply of
the exact ``q - z``; other scales go through fp32. Per channel the scale multiplies the fp32
result once at the end instead.

*Pipeline, per step of 32 KR inputs:* issue the MMA on the step's dequantized weight and
activation buffer; while it runs, load the next step's words and activations, dequantize the
words and write the activations to the other buffer; then wait for the MMA (which frees its
register and shared operands) and synchronize the warps.

Grid: ``(N / BLOCK_N, M / BLOCK_M)``, ``BLOCK_N = 16 WARPS J``; no split-K (the batch fills the
GPU). Takes fp16 or bf16 activations, per-channel or static groups of whole steps, zero
points in 0..15; compiled for compute capability 9.0 only (wgmma). Under the interpreter (see
:mod:`._gluon`) the shared buffers are tensors and the MMA is ``tl.dot``.
"""

from ._runtime import INTERPRETED
from ._gluon import (HAS_GLUON, constexpr_function, fence_async_shared, gl, gluon_kernel,
                     warpgroup_mma, warpgroup_mma_wait)
from .w4a16_mma import _fma2, _half_value, _halves, _load_words


@constexpr_function
def _x_smem_layout(BLOCK_M, BLOCK_K, CDT):
    """The activation buffer ``[BLOCK_M, BLOCK_K]`` (K contiguous) in the swizzled layout wgmma
    reads a K-major B operand from."""
    if INTERPRETED or not HAS_GLUON:
        return None
    return gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], CDT)


@gluon_kernel
def _mul2(d, s2, s_f32, CDT: gl.constexpr, HALF2: gl.constexpr, ASM: gl.constexpr):
    """``d * s`` on the two 16-bit floats (CDT's) held in each int32, rounded once to CDT: one
    ``mul.rn.{f16x2,bf16x2}`` by ``s2`` (the scale's own 16 bits, twice) where HALF2, else in
    fp32 by ``s_f32`` (the product of a small integer and a 16-bit scale is exact in fp32, so
    both round it once, to the same value)."""
    if HALF2 and ASM:
        if CDT == gl.float16:
            return gl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [d, s2],
                                             dtype=gl.int32, is_pure=True, pack=1)
        else:
            return gl.inline_asm_elementwise("mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", [d, s2],
                                             dtype=gl.int32, is_pure=True, pack=1)
    else:
        lo = _half_value(d, 0, CDT) * s_f32
        hi = _half_value(d, 16, CDT) * s_f32
        if ASM:  # (one cvt packs both, rounded to nearest even)
            if CDT == gl.float16:
                return gl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi],
                                                 dtype=gl.int32, is_pure=True, pack=1)
            else:
                return gl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,f,f",
                                                 [lo, hi], dtype=gl.int32, is_pure=True, pack=1)
        return _bits16(lo, CDT) | (_bits16(hi, CDT) << 16)


@gluon_kernel
def _bits16(v, CDT: gl.constexpr):
    """fp32 ``v`` rounded to CDT (fp16, else bf16), its 16 bits in an int32."""
    if CDT == gl.float16:
        return v.to(gl.float16).to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF
    else:  # (integer rounding to nearest even: the interpreter's fp32 stand-in of bf16 too)
        u = v.to(gl.int32, bitcast=True)
        return ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) & 0xFFFF


@gluon_kernel
def _load_x_tile(x_rows, k0, xm, xk, M, k_end, stride_xk, CDT: gl.constexpr):
    """Activations ``x[xm, k0 + xk]`` in the compute dtype, zero outside the batch and K."""
    kx = k0 + xk
    return gl.load(x_rows + kx[None, :] * stride_xk,
                   mask=(xm < M)[:, None] & (kx < k_end)[None, :], other=0.0).to(CDT)


@gluon_kernel
def _permute_x(xt, BLOCK_M: gl.constexpr, KR: gl.constexpr, BLOCK_K: gl.constexpr):
    """Input ``32 kr + 8 t + 4 h + 2 s + jr`` -> slot ``32 kr + 16 s + 8 jr + 2 t + h``: the K
    order of the weight's registers (:mod:`.w4a16_mma`)."""
    xt = gl.permute(gl.reshape(xt, [BLOCK_M, KR, 4, 2, 2, 2]), [0, 1, 4, 5, 2, 3])
    return gl.reshape(xt, [BLOCK_M, BLOCK_K])


@gluon_kernel
def _dequant_a(words, z_neg, z_neg16, s2, s_f32, magic, one, sixteenth, a_layout: gl.constexpr,
               BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, CDT: gl.constexpr,
               SCALE: gl.constexpr, HALF2: gl.constexpr, ASM: gl.constexpr,
               TRIVIAL: gl.constexpr):
    """The packed words (``[kr, t, h_n, w, g, j]``) as the A operand ``[BLOCK_N, BLOCK_K]`` in
    CDT: ``q - z`` exactly, times the scale where SCALE (see :func:`_mul2`; per channel the
    scale multiplies the result instead)."""
    if CDT == gl.float16:
        w8 = words >> 8
        d0 = _fma2((words & 0x000F000F) | magic, one, z_neg, CDT, ASM)
        d1 = _fma2((words & 0x00F000F0) | magic, sixteenth, z_neg16, CDT, ASM)
        d2 = _fma2((w8 & 0x000F000F) | magic, one, z_neg, CDT, ASM)
        d3 = _fma2((w8 & 0x00F000F0) | magic, sixteenth, z_neg16, CDT, ASM)
    else:
        d0 = _fma2((words & 0x000F000F) | magic, one, z_neg, CDT, ASM)
        d1 = _fma2(((words >> 4) & 0x000F000F) | magic, one, z_neg, CDT, ASM)
        d2 = _fma2(((words >> 8) & 0x000F000F) | magic, one, z_neg, CDT, ASM)
        d3 = _fma2(((words >> 12) & 0x000F000F) | magic, one, z_neg, CDT, ASM)
    if SCALE:
        d0 = _mul2(d0, s2, s_f32, CDT, HALF2, ASM)
        d1 = _mul2(d1, s2, s_f32, CDT, HALF2, ASM)
        d2 = _mul2(d2, s2, s_f32, CDT, HALF2, ASM)
        d3 = _mul2(d3, s2, s_f32, CDT, HALF2, ASM)
    # [kr, t, h_n, w, g, j, h, jr, s] -> A [columns (j, w, h_n, g), slots (kr, s, jr, t, h)]
    a = gl.join(gl.join(_halves(d0, CDT), _halves(d1, CDT)),
                gl.join(_halves(d2, CDT), _halves(d3, CDT)))
    a = gl.permute(a, [5, 3, 2, 4, 0, 8, 7, 1, 6])
    return gl.convert_layout(gl.reshape(a, [BLOCK_N, BLOCK_K]), a_layout, assert_trivial=TRIVIAL)


def _w4a16_wgmma(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, y_ptr,
    M, N, K, group_size, opaque_zero,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_ym, stride_yn,
    BLOCK_M: gl.constexpr, KR: gl.constexpr, J: gl.constexpr, WARPS: gl.constexpr,
    GROUP_STEPS: gl.constexpr, ONE_GROUP: gl.constexpr, HALF2: gl.constexpr, EVEN: gl.constexpr,
    CDT: gl.constexpr, ASM: gl.constexpr, TRIVIAL: gl.constexpr,
):
    """A ``16 WARPS J x BLOCK_M`` tile of ``y^T`` over all of K; see the module docstring."""
    BLOCK_N: gl.constexpr = 16 * WARPS * J
    BLOCK_K: gl.constexpr = 32 * KR
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                         instr_shape=[16, BLOCK_M, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    # packed words [4 KR, BLOCK_N]: lane t = packed row mod 4, lane g and J words along N
    w_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, J], threads_per_warp=[4, 8],
                                              warps_per_cta=[1, WARPS], order=[0, 1])
    # activations [BLOCK_M, BLOCK_K]: 8 consecutive inputs (16 bytes) a thread
    x_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8],
                                              threads_per_warp=[32 * 8 // BLOCK_K, BLOCK_K // 8],
                                              warps_per_cta=[WARPS, 1], order=[1, 0])
    # the output, columns in natural order [BLOCK_N, BLOCK_M]: 8 columns (16 bytes) a thread
    y_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[8, 1], threads_per_warp=[8, 4],
                                              warps_per_cta=[1, WARPS], order=[0, 1])
    x_smem = gl.allocate_shared_memory(CDT, [2, BLOCK_M, BLOCK_K],
                                       _x_smem_layout(BLOCK_M, BLOCK_K, CDT))

    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)

    r = gl.arange(0, 4 * KR, layout=gl.SliceLayout(1, w_layout))
    cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, w_layout))
    c_mask = cols < N
    xm = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_layout))
    xk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_layout))
    x_rows = x_ptr + xm[:, None] * stride_xm

    if CDT == gl.float16:
        magic = opaque_zero + 0x64006400     # 1024.0, 1024.0
        one = opaque_zero + 0x3C003C00       # 1.0, 1.0
        sixteenth = opaque_zero + 0x2C002C00  # 0.0625, 0.0625
    else:
        magic = opaque_zero + 0x43004300     # bf16 128.0, 128.0
        one = opaque_zero + 0x3F803F80       # bf16 1.0, 1.0
        sixteenth = one

    split_shape: gl.constexpr = [KR, 4, 2, WARPS, 8, J]  # (words: [kr, t, h_n, w, g, j])
    # step 0: its activations to buffer 0, its weights dequantized with group 0's parameters
    z_neg, z_neg16, s2, s_f32 = _group_params(scales_ptr, zeros_ptr, 0, r, cols, c_mask,
                                              stride_sg, stride_sn, stride_zg, stride_zn, KR, J,
                                              WARPS, ONE_GROUP, HALF2, CDT, ASM)
    xt = _load_x_tile(x_rows, 0, xm, xk, M, K, stride_xk, CDT)
    x_smem.index(0).store(_permute_x(xt, BLOCK_M, KR, BLOCK_K))
    words = gl.reshape(_load_words(qweight_ptr, 0, r, cols, c_mask, K, K, stride_qk, stride_qn,
                                   BLOCK_K, EVEN), split_shape)
    a = _dequant_a(words, z_neg, z_neg16, s2, s_f32, magic, one, sixteenth, a_layout, BLOCK_N,
                   BLOCK_K, CDT, not ONE_GROUP, HALF2, ASM, TRIVIAL)
    fence_async_shared()
    gl.barrier()

    # GROUP_STEPS steps a pass (unrolled): the next group's parameters are read in the last
    # one, for the step after it; the last step's look-ahead reads a clamped tile, unused
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=acc_layout)
    for k0 in range(0, K, GROUP_STEPS * BLOCK_K):
        for kk in gl.static_range(GROUP_STEPS):
            i = k0 // BLOCK_K + kk
            acc = warpgroup_mma(a, x_smem.index(i % 2).permute((1, 0)), acc, is_async=True)
            # while it runs: the next step's weights, dequantized, and activations, to the other
            # buffer (which the previous step's MMA, waited for, no longer reads)
            k_next = k0 + (kk + 1) * BLOCK_K
            if kk == GROUP_STEPS - 1 and not ONE_GROUP:
                z_neg, z_neg16, s2, s_f32 = _group_params(
                    scales_ptr, zeros_ptr, gl.minimum(k_next, K - 1) // group_size, r, cols,
                    c_mask, stride_sg, stride_sn, stride_zg, stride_zn, KR, J, WARPS, ONE_GROUP,
                    HALF2, CDT, ASM)
            words = gl.reshape(_load_words(qweight_ptr, k_next, r, cols, c_mask, K, K, stride_qk,
                                           stride_qn, BLOCK_K, EVEN), split_shape)
            xt = _load_x_tile(x_rows, k_next, xm, xk, M, K, stride_xk, CDT)
            a_next = _dequant_a(words, z_neg, z_neg16, s2, s_f32, magic, one, sixteenth,
                                a_layout, BLOCK_N, BLOCK_K, CDT, not ONE_GROUP, HALF2, ASM,
                                TRIVIAL)
            x_smem.index((i + 1) % 2).store(_permute_x(xt, BLOCK_M, KR, BLOCK_K))
            fence_async_shared()
            # (the wait keeps this step's A registers, which the MMA reads, until it is done)
            acc, a = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a))
            a = a_next
            gl.barrier()

    # rows of acc are columns in the operand's order (tile j of warp w, row 8 h_n + g is column
    # J (8 (WARPS h_n + w) + g) + j): back to natural order, then 16-byte stores along N
    acc = gl.reshape(acc, [J, WARPS, 2, 8, BLOCK_M])
    acc = gl.reshape(gl.permute(acc, [2, 1, 3, 0, 4]), [BLOCK_N, BLOCK_M])
    acc = gl.convert_layout(acc, y_layout)
    n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, y_layout))
    m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, y_layout))
    n_mask = n < N
    if ONE_GROUP:
        s_n = gl.load(scales_ptr + n * stride_sn, mask=n_mask, other=0.0).to(gl.float32)
        acc = acc * s_n[:, None]
    gl.store(y_ptr + m[None, :] * stride_ym + n[:, None] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=n_mask[:, None] & (m < M)[None, :])


@gluon_kernel
def _group_params(scales_ptr, zeros_ptr, g, r, cols, c_mask, stride_sg, stride_sn, stride_zg,
                  stride_zn, KR: gl.constexpr, J: gl.constexpr, WARPS: gl.constexpr,
                  ONE_GROUP: gl.constexpr, HALF2: gl.constexpr, CDT: gl.constexpr,
                  ASM: gl.constexpr):
    """Group ``g``'s zero points as ``-(2^e + z)`` bit pairs (:mod:`.w4a16_mma`) and, grouped,
    its scales (the 16-bit pair where HALF2 and ASM, and fp32), in the words' shape."""
    split_shape: gl.constexpr = [KR, 4, 2, WARPS, 8, J]
    z = gl.load(zeros_ptr + g * stride_zg + cols * stride_zn, mask=c_mask, other=0).to(gl.int32)
    z = gl.reshape(gl.broadcast(z[None, :], r[:, None])[0], split_shape)
    if CDT == gl.float16:
        z_neg = (0xE400 + z) * 0x10001
        z_neg16 = (0xD400 + 16 * z) * 0x10001
    else:
        z_neg = (0xC300 + z) * 0x10001
        z_neg16 = z_neg
    if ONE_GROUP:
        s2, s_f32 = z, z.to(gl.float32)  # (unused: the result is scaled at the end)
    else:
        s = gl.load(scales_ptr + g * stride_sg + cols * stride_sn, mask=c_mask, other=0.0)
        s = gl.reshape(gl.broadcast(s[None, :], r[:, None])[0], split_shape)
        s_f32 = s.to(gl.float32)
        if HALF2 and ASM:
            s2 = (s.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF) * 0x10001
        else:
            s2 = z
    return z_neg, z_neg16, s2, s_f32


_w4a16_wgmma_kernel = gluon_kernel(_w4a16_wgmma)
