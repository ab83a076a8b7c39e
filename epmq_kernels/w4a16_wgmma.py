"""W4A16 for large batches on Hopper: ``wgmma`` with the weight dequantized in its registers (Gluon).

At a batch of hundreds of rows the product is compute bound, and the fastest path so far
dequantized chunks of the weight to fp16 in memory and called cuBLAS (``dqmm``: 0.75-0.81x fp16
cuBLAS at M = 1024 on an H200, 2026-12-04, the dequantization in series with the product).
Here the weight never leaves the chip dequantized: its packed words are dequantized into the
registers of the A operand of Hopper's warpgroup MMA (``wgmma.mma_async`` takes A from
registers, B from shared memory), so the int4 codes cross memory once and the tensor cores run
at wgmma's rate.

The product
-----------
``y^T = W^T x^T``: the weight ``[BLOCK_N, BLOCK_K]`` in registers (the instruction's M: 64 rows
a warpgroup, 16 a warp), the activations ``x^T`` ``[BLOCK_K, BLOCK_M]`` in shared memory (the
instruction's N: the batch, up to 256), both in their natural K order.

*Pipeline.* Each step of ``BLOCK_K = 32 KR`` inputs, its activations ``[BLOCK_M, BLOCK_K]`` and
packed words ``[4 KR, BLOCK_N]`` are copied straight into one of STAGES shared buffers by
``cp.async`` (no registers), STAGES - 1 steps ahead. One MMA stays in flight: step i's is
issued, step i - 1's waited for (freeing its stage and its A registers), and while step i's
runs the program starts the copies of step i + STAGES - 1 and dequantizes step i + 1 from
shared memory into the other set of A registers. The loop unrolls passes of STAGES steps, so
that each step's stage is known when compiling, and each stage is an allocation of its own:
Triton's barrier analysis then sees which buffer an access touches (2 barriers a step, not
3); with one step a pass, ptxas serialized every MMA (its warning C7513).

*The A operand in registers.* A warp's share of A has the layout of an ``mma.sync.m16n8k16``
A fragment: lane ``4 g + t`` holds, for its rows, the codes of inputs ``2 t`` and ``2 t + 1``
of every 8, which are byte t of each packed word (its low and high nibble). So every lane
reads all the words of its columns (the 4 lanes t of a row read the same words, a broadcast),
and one PRMT puts its byte t in both halves of a register; one LOP3 under the exponent of 1024
then makes the two fp16 ``1024 + q_lo`` and ``1024 + 16 q_hi``, and one half2 FMA gives
``q_lo - z`` and ``q_hi - z`` exactly (the ``1/16`` as in Marlin). bf16 has 3 significant bits
fewer: its PRMT takes the high nibble from the word shifted by 4 (one SHF a word), and the
LOP3 under 128 makes ``128 + q_lo`` and ``128 + q_hi``.
Output columns are permuted (as in :mod:`.w4a16_mma`) so that one load of J consecutive words
feeds J column tiles; the accumulator's rows are mapped back when y is written.

*Scales.* Unlike the small-batch paths, which scale the fp32 product of each group, the
dequantized weight is rounded once to the activation dtype: ``w = (q - z) * s`` as the
``dqmm`` path writes it (a second accumulator per group would double the registers of a
128 x 128 tile). With 16-bit scales of the activation dtype that is one half2 multiply of
the exact ``q - z``; with bf16 activations and fp16 scales (a GPTQ checkpoint's scales on a
bf16 model), each scale split into two bf16 parts, one exact half2 multiply and one half2 FMA
that rounds once; fp32 scales go through fp32. Per channel the scale multiplies the fp32
result once at the end instead.

Grid: ``(N / BLOCK_N, SPLIT_K, M / BLOCK_M)``, ``BLOCK_N = 16 WARPS J``; where the tiles are
fewer than the SMs (a batch of 64-256), K slices add into the fp32 workspace of
:mod:`epmq_kernels.w4a16` and the last to arrive writes y (one launch, as in ``mma``). Takes
fp16 or bf16 activations whose rows ``cp.async`` can copy (contiguous, 16-byte aligned),
per-channel or static groups of whole steps, zero points in 0..15; compiled for compute
capability 9.0 only (wgmma). Under the interpreter (see :mod:`._gluon`) the shared buffers are
tensors, the copies loads and the MMA ``tl.dot``.
"""

from ._runtime import INTERPRETED
from ._gluon import (HAS_GLUON, async_copy, constexpr_function, fence_async_shared, gl,
                     gluon_kernel, warpgroup_mma, warpgroup_mma_wait)
from .w4a16_mma import _add_slice, _fma2, _half_value, _halves, _pack_halves


@constexpr_function
def _x_smem_layout(BLOCK_M, BLOCK_K, CDT):
    """The activation buffer ``[BLOCK_M, BLOCK_K]`` (K contiguous) in the swizzled layout wgmma
    reads a K-major B operand from."""
    if INTERPRETED or not HAS_GLUON:
        return None
    return gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], CDT)


@constexpr_function
def _plain_smem_layout():
    if INTERPRETED or not HAS_GLUON:
        return None
    return gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])


@constexpr_function
def _copy_layout(ROWS, COLS, BYTES, WARPS):
    """A ``[ROWS, COLS]`` tile of BYTES-byte elements, 16 bytes a thread, warps across the rows
    and then the columns (a tile smaller than the threads is copied more than once)."""
    if INTERPRETED or not HAS_GLUON:
        return None
    vec = 16 // BYTES
    lanes_n = min(32, max(1, COLS // vec))
    warps_m = min(WARPS, max(1, ROWS // (32 // lanes_n)))
    return gl.BlockedLayout(size_per_thread=[1, vec], threads_per_warp=[32 // lanes_n, lanes_n],
                            warps_per_cta=[warps_m, WARPS // warps_m], order=[1, 0])


@constexpr_function
def _words_layout(KR, J, WARPS):
    """The packed words ``[4 KR, 4, BLOCK_N]`` (packed row, lane t, column) as the threads
    read them from shared memory: all 4 KR rows of a thread's 2 J columns (lane g, J
    consecutive words, two halves h_n; warp w), the same words on the 4 lanes t, which the
    second dimension tells apart (each takes its own byte t)."""
    if INTERPRETED or not HAS_GLUON:
        return None
    log2 = lambda n: n.bit_length() - 1  # noqa: E731
    regs = ([[0, 0, 1 << i] for i in range(log2(J))]
            + [[1 << i, 0, 0] for i in range(log2(4 * KR))] + [[0, 0, 8 * WARPS * J]])
    lanes = [[0, 1, 0], [0, 2, 0]] + [[0, 0, J << i] for i in range(3)]
    warps = [[0, 0, (8 * J) << i] for i in range(log2(WARPS))]
    return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=lanes, warp_bases=warps,
                                      block_bases=[], shape=[4 * KR, 4, 16 * WARPS * J])


@gluon_kernel
def _mul_pairs(d, p, CDT: gl.constexpr, ASM: gl.constexpr):
    """``d * p`` on the two 16-bit floats (CDT's) held in each int32, rounded once to CDT: one
    ``mul.rn.{f16x2,bf16x2}``, or, without ASM (the interpreter), the same in fp32."""
    if ASM:
        if CDT == gl.float16:
            return gl.inline_asm_elementwise("mul.rn.f16x2 $0, $1, $2;", "=r,r,r", [d, p],
                                             dtype=gl.int32, is_pure=True, pack=1)
        else:
            return gl.inline_asm_elementwise("mul.rn.bf16x2 $0, $1, $2;", "=r,r,r", [d, p],
                                             dtype=gl.int32, is_pure=True, pack=1)
    return _pack_halves(_half_value(d, 0, CDT) * _half_value(p, 0, CDT),
                        _half_value(d, 16, CDT) * _half_value(p, 16, CDT), CDT)


@gluon_kernel
def _mul2(d, s2, s_f32, CDT: gl.constexpr, HALF2: gl.constexpr, S_PARTS: gl.constexpr,
          ASM: gl.constexpr):
    """``d * s`` on the two 16-bit floats (CDT's) held in each int32, rounded once to CDT: one
    ``mul.rn.{f16x2,bf16x2}`` by ``s2`` (the scale's own 16 bits, twice) where HALF2; where
    S_PARTS (bf16 ``d``, fp16 scales), ``fma.rn.bf16x2(d, s_hi, d s_lo)`` with ``s2`` the pair
    of ``s_hi`` (s's top 8 significant bits, a bf16) and ``s_f32`` that of ``s_lo = s - s_hi``
    (3 bits): ``d s_lo`` (at most 7 bits) is exact in bf16 and the FMA rounds ``d s`` once;
    else in fp32 by ``s_f32`` (the product of a small integer and a 16-bit scale is exact in
    fp32, so every way rounds it once, to the same value)."""
    if S_PARTS:
        return _fma2(d, s2, _mul_pairs(d, s_f32, CDT, ASM), CDT, ASM)
    if HALF2 and ASM:
        return _mul_pairs(d, s2, CDT, ASM)
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
        return _pack_halves(lo, hi, CDT)


@gluon_kernel
def _byte_pairs(words, t, zero, magic, CDT: gl.constexpr, ASM: gl.constexpr):
    """Byte ``t`` of each word as two 16-bit floats: ``2^e + q_lo`` (low half) and, fp16,
    ``2^e + 16 q_hi`` (1024 + the high nibble read in place at bits 20-23: one PRMT, byte t
    into bytes 0 and 2, and one LOP3); bf16, which has 7 significant bits, ``2^e + q_hi`` (one
    PRMT of byte t of the word and of the word shifted by a nibble, one SHF more; the other
    bytes, whatever they hold, masked off). ``magic``, the exponent's bits in both halves, is
    a register, so that the mask and the OR are one LOP3."""
    if CDT == gl.float16:
        if ASM:
            sel = t * 0x101 + 0x4040  # (bytes 0 and 2: the word's byte t; 1 and 3: zero's)
            v = gl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r",
                                          [words, zero, sel], dtype=gl.int32, is_pure=True, pack=1)
        else:
            v = ((words >> (8 * t)) & 0xFF) * 0x10001
        return (v & 0x00F0000F) | magic
    else:
        if ASM:
            sel = t * 0x101 + 0x400  # (byte 0: the word's byte t; byte 2: the shifted word's)
            v = gl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r",
                                          [words, words >> 4, sel], dtype=gl.int32, is_pure=True,
                                          pack=1)
        else:
            v = ((words >> (8 * t)) & 0xF) | (((words >> (8 * t + 4)) & 0xF) << 16)
        return (v & 0x000F000F) | magic


@gluon_kernel
def _group_params(scales_ptr, zeros_ptr, g, cols, c_mask, stride_sg, stride_sn, stride_zg,
                  stride_zn, ONE_GROUP: gl.constexpr, HALF2: gl.constexpr,
                  S_PARTS: gl.constexpr, CDT: gl.constexpr, ASM: gl.constexpr):
    """Group ``g``'s zero points as the pair ``-(2^e + z)``, ``-(2^e / 16 + z)`` (fp16; bf16
    ``-(2^e + z)`` twice) that the codes of :func:`_byte_pairs` take off, and, grouped, its scales
    (the 16-bit pair where HALF2 and ASM; the pairs of the bf16 parts ``s_hi``, ``s_lo`` where
    S_PARTS; fp32), one per column, ``[1, 1, BLOCK_N]``."""
    z = gl.load(zeros_ptr + g * stride_zg + cols * stride_zn, mask=c_mask, other=0).to(gl.int32)
    if CDT == gl.float16:
        z_neg = (0xE400 + z) | ((0xD400 + 16 * z) << 16)
    else:
        z_neg = (0xC300 + z) * 0x10001
    if ONE_GROUP:
        s2, s_f32 = z, z.to(gl.float32)  # (unused: the result is scaled at the end)
    else:
        s = gl.load(scales_ptr + g * stride_sg + cols * stride_sn, mask=c_mask, other=0.0)
        s_f32 = s.to(gl.float32)
        if S_PARTS:  # (fp16 s, exact in fp32: its top 16 bits are s_hi, the rest s_lo, exactly)
            hi = s_f32.to(gl.int32, bitcast=True) & -65536
            lo = (s_f32 - hi.to(gl.float32, bitcast=True)).to(gl.int32, bitcast=True)
            s2 = ((hi >> 16) & 0xFFFF) * 0x10001
            s_f32 = ((lo >> 16) & 0xFFFF) * 0x10001
        elif HALF2 and ASM:
            s2 = (s.to(gl.int16, bitcast=True).to(gl.int32) & 0xFFFF) * 0x10001
        else:
            s2 = z
    return z_neg[None, None, :], s2[None, None, :], s_f32[None, None, :]


@gluon_kernel
def _dequant_a(words, t, zero, magic, z_neg, s2, s_f32, mult, a_layout: gl.constexpr,
               KR: gl.constexpr, J: gl.constexpr, WARPS: gl.constexpr, CDT: gl.constexpr,
               SCALE: gl.constexpr, HALF2: gl.constexpr, S_PARTS: gl.constexpr,
               ASM: gl.constexpr, TRIVIAL: gl.constexpr):
    """The packed words ``[4 KR, BLOCK_N]`` (each lane's copy) as the A operand ``[BLOCK_N,
    BLOCK_K]`` in CDT: ``q - z`` exactly, times the scale where SCALE (:func:`_mul2`; per
    channel the result is scaled instead), the rows in the permuted column order."""
    words, t = gl.broadcast(gl.expand_dims(words, 1), t)  # [p, t, n]: lane t's copy
    d = _fma2(_byte_pairs(words, t, zero, magic, CDT, ASM), mult, z_neg, CDT, ASM)
    if SCALE:
        d = _mul2(d, s2, s_f32, CDT, HALF2, S_PARTS, ASM)
    # [p, t, n = (h_n, w, g, j), h] -> A [rows (j, w, h_n, g), inputs 8 p + 2 t + h]
    a = gl.reshape(_halves(d, CDT), [4 * KR, 4, 2, WARPS, 8, J, 2])
    a = gl.reshape(gl.permute(a, [5, 3, 2, 4, 0, 1, 6]), [16 * WARPS * J, 32 * KR])
    return gl.convert_layout(a, a_layout, assert_trivial=TRIVIAL)


@gluon_kernel
def _stage(s: gl.constexpr, b0, b1, b2, b3):
    """Stage ``s``'s buffer (known when compiling)."""
    if s == 0:
        return b0
    elif s == 1:
        return b1
    elif s == 2:
        return b2
    else:
        return b3


@gluon_kernel
def _issue_step(x_buf, w_buf, x_ptrs, xk, x_rows_ok, w_ptrs, w_rows, w_cols_ok, k0, k_end, K,
                stride_xk, stride_qk, BLOCK_K: gl.constexpr, EVEN: gl.constexpr,
                WHOLE: gl.constexpr):
    """Start copying the activations ``[BLOCK_M, BLOCK_K]`` and packed words ``[4 KR,
    BLOCK_N]`` of the step at input ``k0`` into a stage, as one commit group: zeros past the
    slice's end ``k_end``, or, where every slice is whole passes (WHOLE), no mask along K (a
    step past the end is then only the look-ahead, whose stage is never read: it copies the
    last step again, in bounds), and no mask on the words where N is whole tiles too (EVEN)."""
    if WHOLE:
        k0 = gl.minimum(k0, K - BLOCK_K)
        async_copy.async_copy_global_to_shared(x_buf, x_ptrs + k0 * stride_xk, mask=x_rows_ok)
        if EVEN:
            async_copy.async_copy_global_to_shared(w_buf, w_ptrs + (k0 // 8) * stride_qk)
        else:
            async_copy.async_copy_global_to_shared(w_buf, w_ptrs + (k0 // 8) * stride_qk,
                                                   mask=w_cols_ok)
    else:
        async_copy.async_copy_global_to_shared(x_buf, x_ptrs + k0 * stride_xk,
                                               mask=x_rows_ok & ((k0 + xk) < k_end)[None, :])
        async_copy.async_copy_global_to_shared(
            w_buf, w_ptrs + (k0 // 8) * stride_qk,
            mask=((k0 // 8 + w_rows) * 8 < k_end)[:, None] & w_cols_ok)
    async_copy.commit_group()


def _w4a16_wgmma(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, y_ptr, sums_ptr, counters_ptr,
    M, N, K, group_size, k_per_split, opaque_zero,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_ym, stride_yn,
    BLOCK_M: gl.constexpr, KR: gl.constexpr, J: gl.constexpr, WARPS: gl.constexpr,
    STAGES: gl.constexpr, RELOAD: gl.constexpr, SPLIT: gl.constexpr, WHOLE: gl.constexpr,
    ONE_GROUP: gl.constexpr,
    HALF2: gl.constexpr, S_PARTS: gl.constexpr, EVEN: gl.constexpr, CDT: gl.constexpr,
    ASM: gl.constexpr, TRIVIAL: gl.constexpr,
):
    """A ``16 WARPS J x BLOCK_M`` tile of ``y^T`` over one K slice; see the module docstring."""
    BLOCK_N: gl.constexpr = 16 * WARPS * J
    BLOCK_K: gl.constexpr = 32 * KR
    gl.static_assert(STAGES >= 3, "the ring needs 3 stages at least (wait_group(STAGES - 3))")
    gl.static_assert(STAGES <= 4, "at most 4 stages: one allocation each (x0..x3, w0..w3)")
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                         instr_shape=[16, BLOCK_M, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    words_layout: gl.constexpr = _words_layout(KR, J, WARPS)  # [4 KR, 4, BLOCK_N]
    x_copy: gl.constexpr = _copy_layout(BLOCK_M, BLOCK_K, 2, WARPS)
    w_copy: gl.constexpr = _copy_layout(4 * KR, BLOCK_N, 4, WARPS)
    # the output, columns in natural order [BLOCK_N, BLOCK_M]: 8 columns (16 bytes) a thread
    y_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[8, 1], threads_per_warp=[8, 4],
                                              warps_per_cta=[1, WARPS], order=[0, 1])
    # one allocation a stage (Triton's barrier analysis tells allocations apart, not the
    # indices of one): at most 4 stages
    x_smem: gl.constexpr = _x_smem_layout(BLOCK_M, BLOCK_K, CDT)
    w_smem: gl.constexpr = _plain_smem_layout()
    x0 = gl.allocate_shared_memory(CDT, [BLOCK_M, BLOCK_K], x_smem)
    x1 = gl.allocate_shared_memory(CDT, [BLOCK_M, BLOCK_K], x_smem)
    x2 = gl.allocate_shared_memory(CDT, [BLOCK_M, BLOCK_K], x_smem)
    w0 = gl.allocate_shared_memory(gl.int32, [4 * KR, BLOCK_N], w_smem)
    w1 = gl.allocate_shared_memory(gl.int32, [4 * KR, BLOCK_N], w_smem)
    w2 = gl.allocate_shared_memory(gl.int32, [4 * KR, BLOCK_N], w_smem)
    if STAGES == 4:
        x3 = gl.allocate_shared_memory(CDT, [BLOCK_M, BLOCK_K], x_smem)
        w3 = gl.allocate_shared_memory(gl.int32, [4 * KR, BLOCK_N], w_smem)
    else:
        x3, w3 = x0, w0

    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    pid_m = gl.program_id(2)
    k_start = pid_k * k_per_split
    k_end = gl.minimum(K, k_start + k_per_split)

    # what the copies read: a step's activations and packed words, at input 0
    xm = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_copy))
    xk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_copy))
    x_ptrs = x_ptr + xm[:, None] * stride_xm + xk[None, :] * stride_xk
    x_rows_ok = (xm < M)[:, None]
    w_rows = gl.arange(0, 4 * KR, layout=gl.SliceLayout(1, w_copy))
    w_cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, w_copy))
    w_ptrs = qweight_ptr + w_rows[:, None] * stride_qk + w_cols[None, :] * stride_qn
    w_cols_ok = (w_cols < N)[None, :]
    for s in gl.static_range(STAGES - 1):
        _issue_step(_stage(s, x0, x1, x2, x3), _stage(s, w0, w1, w2, w3), x_ptrs, xk, x_rows_ok,
                    w_ptrs, w_rows, w_cols_ok, k_start + s * BLOCK_K, k_end, K, stride_xk,
                    stride_qk, BLOCK_K, EVEN, WHOLE)

    # what the dequantization takes: each lane's t, a zero, the columns' group parameters
    t = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, words_layout)))[None, :, None]
    zero = opaque_zero + gl.zeros([4 * KR, 4, BLOCK_N], gl.int32, layout=words_layout)
    cols = pid_n * BLOCK_N + gl.arange(
        0, BLOCK_N, layout=gl.SliceLayout(0, gl.SliceLayout(1, words_layout)))
    c_mask = cols < N
    if CDT == gl.float16:
        magic = opaque_zero + 0x64006400  # 1024.0, 1024.0
        mult = opaque_zero + 0x2C003C00  # 1 (low half), 1/16 (high half)
    else:
        magic = opaque_zero + 0x43004300  # bf16 128.0, 128.0
        mult = opaque_zero + 0x3F803F80  # bf16 1, 1
    z_neg, s2, s_f32 = _group_params(scales_ptr, zeros_ptr, gl.minimum(k_start, K - 1) // group_size,
                                     cols, c_mask, stride_sg, stride_sn, stride_zg, stride_zn,
                                     ONE_GROUP, HALF2, S_PARTS, CDT, ASM)

    async_copy.wait_group(STAGES - 2)  # (step 0's copies, this thread's)
    fence_async_shared()  # (before wgmma, an async-proxy read, sees them)
    gl.barrier()  # (every thread's)
    words_loaded: gl.constexpr = gl.SliceLayout(1, words_layout)  # (each lane's copy)
    a = _dequant_a(w0.load(words_loaded), t, zero, magic, z_neg, s2, s_f32, mult,
                   a_layout, KR, J, WARPS, CDT, not ONE_GROUP, HALF2, S_PARTS, ASM, TRIVIAL)

    # A pass is STAGES steps, unrolled, so that every step's stage is known at compile time
    # (step kk of a pass is in stage kk); the group's parameters for the next step are read
    # after every RELOAD-th step (a multiple of every group's end); a step past the slice
    # reads zeros. One MMA stays in flight: step i's is issued, then step i - 1's waited for
    # (which frees its A registers, the previous set, and its stage), then step i + 1
    # dequantized into the other set.
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=acc_layout)
    a_prev = a
    for k0 in range(k_start, k_end, STAGES * BLOCK_K):
        for kk in gl.static_range(STAGES):
            acc = warpgroup_mma(a, _stage(kk, x0, x1, x2, x3).permute((1, 0)), acc, is_async=True)
            acc, a_prev = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a_prev))
            if not ONE_GROUP and (kk + 1) % RELOAD == 0:
                g_next = gl.minimum(k0 + (kk + 1) * BLOCK_K, k_end - 1) // group_size
                z_neg, s2, s_f32 = _group_params(scales_ptr, zeros_ptr, g_next, cols, c_mask,
                                                 stride_sg, stride_sn, stride_zg, stride_zn,
                                                 ONE_GROUP, HALF2, S_PARTS, CDT, ASM)
            # step i + 1's copies landed, and every warp is past step i - 1's MMA, whose stage
            # the copies of step i + STAGES - 1 now refill (its words were read before)
            async_copy.wait_group(STAGES - 3)
            fence_async_shared()
            gl.barrier()
            _issue_step(_stage((kk + STAGES - 1) % STAGES, x0, x1, x2, x3),
                        _stage((kk + STAGES - 1) % STAGES, w0, w1, w2, w3), x_ptrs, xk, x_rows_ok, w_ptrs,
                        w_rows, w_cols_ok, k0 + (kk + STAGES - 1) * BLOCK_K, k_end, K,
                        stride_xk, stride_qk, BLOCK_K, EVEN, WHOLE)
            a_prev = a
            a = _dequant_a(_stage((kk + 1) % STAGES, w0, w1, w2, w3).load(words_loaded), t, zero, magic,
                           z_neg, s2, s_f32, mult, a_layout, KR, J, WARPS, CDT, not ONE_GROUP,
                           HALF2, S_PARTS, ASM, TRIVIAL)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a_prev))[0]
    # the look-ahead's copies (into stages never read) done before the epilogue's shuffle
    # through shared memory may reuse them
    async_copy.wait_group(0)
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
    mask = n_mask[:, None] & (m < M)[None, :]
    y_ptrs = y_ptr + m[None, :] * stride_ym + n[:, None] * stride_yn
    if not SPLIT:
        gl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        _add_slice(acc, mask, y_ptrs, sums_ptr + m[None, :] * N + n[:, None], counters_ptr,
                   pid_m * gl.num_programs(0) + pid_n)


_w4a16_wgmma_kernel = gluon_kernel(_w4a16_wgmma)
