"""W4A16 on tensor cores, the weight dequantized in the registers of the MMA operand (Gluon).

The ``splitk`` path of :mod:`epmq_kernels.w4a16` hands ``tl.dot`` a tile dequantized in a layout
Triton chooses for the arithmetic and then converts to the tensor core's operand layout through
shared memory: compiled for sm_90, about 35 instructions per packed word at a batch of 16, a third
of them shared-memory stores, loads and barriers. This kernel is written in Gluon (Triton with
explicit layouts): each thread loads exactly the packed words whose codes it holds in the
``mma.sync.m16n8k16`` A operand, so dequantizing is a few integer and half2 operations per word
in registers, and nothing goes through shared memory (16-23 instructions per packed word in
the loop, sm_90, 2026-12-05).

The product
-----------
``y^T = W^T x^T``: the weight is the A operand (16 output columns x 16 inputs an instruction),
the batch is the instruction's N (8 rows), so a batch of 1-8 wastes less than with x as A. A warp
owns 64 output columns; thread ``(g, t)`` (lane ``4 g + t``) holds, in each 16-column tile of
the A operand, rows ``g`` and ``g + 8`` and the reduction slots ``2 t, 2 t + 1, 2 t + 8, 2 t + 9``
of each 16-slot step.

*K order.* A dot product is indifferent to the order of its terms, so the kernel maps slots to
inputs such that a thread's slots over two steps are the 8 codes of one packed word: in a tile
of 32 inputs (4 packed rows), step ``s``, slot ``8 jr + 2 t + h`` is input ``8 t + 4 h + 2 s +
jr``, nibble ``4 h + 2 s + jr`` of packed row t. An operand register (slots ``2 t, 2 t + 1``)
then holds nibbles ``i`` and ``i + 4`` of a word (``i = 2 s + jr``), which ``(w >> 4 i) &
0x000F000F`` ORed under the exponent of 1024 (fp16; 128 for bf16) makes two 16-bit floats ``2^e
+ q`` in one LOP3. Activations, the B operand, follow the same order: thread ``(g, t)`` needs
inputs ``8 t .. 8 t + 7`` of batch row ``g``, one 16-byte load.

*N order.* Output columns are permuted too, so that a thread's 16-byte load of 4 consecutive
words feeds 4 different column tiles: with ``W`` warps, row ``8 h_n + g`` of tile ``j`` of warp
``w`` is column ``4 (8 (W h_n + w) + g) + j``. The accumulator's rows are mapped back when the
scales are read and y is written.

*Arithmetic.* Per packed word a thread does one shift (pairs 2 and 3 come from ``w >> 8``), four
LOP3 and four half2 FMAs that subtract ``2^e + z`` (with fp16, pairs 1 and 3 are read in place as
``2^e + 16 q`` and scaled by 1/16 in the same FMA, as Marlin does), then its share of two MMAs
(one for a batch of 8). ``q - z`` is exact, the products and their sums are fp32, and the scale
multiplies the fp32 group product once per group (``acc += part * s``): the weight itself is
never rounded.

The layouts (``gl.BlockedLayout`` for the words, a linear layout for the activations) are chosen
so that the reshapes and permutes above only rename registers: ``convert_layout(...,
assert_trivial=True)`` into the MMA operand layouts fails to compile otherwise.

Grid: ``(N / (64 WARPS), SPLIT_K, M / BLOCK_M)``; split-K slices add into the fp32 workspace of
:mod:`epmq_kernels.w4a16` and the last to arrive writes y (one launch, as there). Takes fp16 or
bf16 activations, per-channel or static groups (no ``g_idx`` or ``k // group_size``) of whole
32 KR-input steps, zero points in 0..15. Under the interpreter (see :mod:`._gluon`) bf16 runs as
its fp32 stand-in and the half2 FMAs in fp32, exactly.
"""

from ._runtime import INTERPRETED
from ._gluon import HAS_GLUON, constexpr_function, gl, gluon_kernel, mma_v2  # noqa: F401

@constexpr_function
def _x_layout(BLOCK_M, KR, WARPS):
    """Activations ``[BLOCK_M, 32 KR]`` as the B operand wants them, up to the order of a
    thread's registers: lane ``4 g + t`` holds inputs ``8 t .. 8 t + 7`` (one 16-byte load) of
    each 32 and batch rows ``g, g + 8, ..``; every warp holds all of it (the warps split the
    columns, not the batch)."""
    if INTERPRETED or not HAS_GLUON:  # (layouts mean nothing to the interpreter)
        return None
    log2 = lambda n: n.bit_length() - 1  # noqa: E731
    regs = [[0, 1], [0, 2], [0, 4]] + [[8 << i, 0] for i in range(log2(BLOCK_M // 8))] \
        + [[0, 32 << i] for i in range(log2(KR))]
    lanes = [[0, 8], [0, 16], [1, 0], [2, 0], [4, 0]]
    return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=lanes,
                                      warp_bases=[[0, 0]] * log2(WARPS), block_bases=[],
                                      shape=[BLOCK_M, 32 * KR])


@gluon_kernel
def _fma2(p, mult, neg_z, CDT: gl.constexpr, ASM: gl.constexpr):
    """``p * mult + neg_z`` on the two 16-bit floats (CDT's; bf16 for the fp32 stand-in) held
    in each int32, as int32: one ``fma.rn.{f16x2,bf16x2}``, or, without ASM (the interpreter),
    the same in fp32, which is exact for the small integers and powers of two it sees here."""
    if ASM:
        if CDT == gl.float16:
            return gl.inline_asm_elementwise("fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r",
                                             [p, mult, neg_z], dtype=gl.int32, is_pure=True,
                                             pack=1)
        else:
            return gl.inline_asm_elementwise("fma.rn.bf16x2 $0, $1, $2, $3;", "=r,r,r,r",
                                             [p, mult, neg_z], dtype=gl.int32, is_pure=True,
                                             pack=1)
    else:
        lo = _half_value(p, 0, CDT) * _half_value(mult, 0, CDT) + _half_value(neg_z, 0, CDT)
        hi = _half_value(p, 16, CDT) * _half_value(mult, 16, CDT) + _half_value(neg_z, 16, CDT)
        return _pack_halves(lo, hi, CDT)


@gluon_kernel
def _pack_halves(lo, hi, CDT: gl.constexpr):
    """fp32 ``lo`` and ``hi`` rounded to CDT (fp16, else bf16), to nearest even, as the low and
    high 16 bits of an int32 (the interpreter's side of the packed PTX)."""
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
def _half_value(word, SHIFT: gl.constexpr, CDT: gl.constexpr):
    """The 16-bit float at bits SHIFT.. of each int32, as fp32 (fp16 if CDT is, else bf16)."""
    bits = (word >> SHIFT) & 0xFFFF
    if CDT == gl.float16:
        return bits.to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
    else:
        return (bits << 16).to(gl.float32, bitcast=True)


@gluon_kernel
def _halves(d, CDT: gl.constexpr):
    """``[..]`` int32 pairs -> ``[.., 2]`` their low and high 16-bit floats, in CDT (for the fp32
    stand-in of bf16, the bf16 values in fp32)."""
    if CDT == gl.float32:
        return gl.join((d << 16).to(gl.float32, bitcast=True),
                       (d & -65536).to(gl.float32, bitcast=True))
    else:
        return gl.join(d.to(gl.int16).to(CDT, bitcast=True),
                       (d >> 16).to(gl.int16).to(CDT, bitcast=True))


@gluon_kernel
def _load_words(qweight_ptr, k0, r, cols, c_mask, k_end, K, stride_qk, stride_qn,
                BLOCK_K: gl.constexpr, EVEN: gl.constexpr):
    """The packed words of inputs ``k0 .. k0 + BLOCK_K`` (rows ``k0 / 8 + r``) and columns
    ``cols``: unmasked where the problem is EVEN (the tile moved back inside K if it starts past
    ``K - BLOCK_K``, which only a prefetch beyond its slice's end asks for, and discards)."""
    if EVEN:  # (no masks: no zeroed registers and predicates a load)
        rows = gl.minimum(k0, K - BLOCK_K) // 8 + r
        return gl.load(qweight_ptr + rows[:, None] * stride_qk + cols[None, :] * stride_qn,
                       eviction_policy="evict_first")
    rows = k0 // 8 + r
    return gl.load(qweight_ptr + rows[:, None] * stride_qk + cols[None, :] * stride_qn,
                   mask=(rows * 8 < k_end)[:, None] & c_mask[None, :], other=0,
                   eviction_policy="evict_first")


@gluon_kernel
def _load_x(x_rows, k0, xm, xk, M, k_end, stride_xk, CDT: gl.constexpr):
    """Activations ``x[xm, k0 + xk]`` in the compute dtype, zero outside the batch and slice."""
    kx = k0 + xk
    return gl.load(x_rows + kx[None, :] * stride_xk,
                   mask=(xm < M)[:, None] & (kx < k_end)[None, :], other=0.0,
                   eviction_policy="evict_last").to(CDT)


def _w4a16_mma(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, y_ptr, sums_ptr, counters_ptr,
    M, N, K, group_size, k_per_split, opaque_zero,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_ym, stride_yn,
    BLOCK_M: gl.constexpr, KR: gl.constexpr, GROUP_K: gl.constexpr, WARPS: gl.constexpr,
    SPLIT_K: gl.constexpr, ONE_GROUP: gl.constexpr, EVEN: gl.constexpr, PREFETCH: gl.constexpr,
    CDT: gl.constexpr, ASM: gl.constexpr, TRIVIAL: gl.constexpr,
):
    """A ``64 WARPS x BLOCK_M`` tile of ``y^T`` over one K slice; see the module docstring."""
    BLOCK_N: gl.constexpr = 64 * WARPS
    BLOCK_K: gl.constexpr = 32 * KR
    # the accumulator: warps split the columns (the instruction's M), the batch is its N
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[WARPS, 1],
                                                  instr_shape=[16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    # packed words [4 KR, BLOCK_N]: lane t = packed row mod 4, lane g and a 16-byte vector along N
    w_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[4, 8],
                                              warps_per_cta=[1, WARPS], order=[0, 1])
    x_layout: gl.constexpr = _x_layout(BLOCK_M, KR, WARPS)
    acc_rows: gl.constexpr = gl.SliceLayout(1, mma)
    acc_cols: gl.constexpr = gl.SliceLayout(0, mma)

    pid_n = gl.program_id(0)
    pid_k = gl.program_id(1)
    pid_m = gl.program_id(2)
    k_start = pid_k * k_per_split
    k_end = gl.minimum(K, k_start + k_per_split)

    r = gl.arange(0, 4 * KR, layout=gl.SliceLayout(1, w_layout))
    cols = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, w_layout))
    c_mask = cols < N
    xm = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, x_layout))
    xk = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, x_layout))
    x_rows = x_ptr + xm[:, None] * stride_xm
    # the accumulator's rows are output columns in the order of the operand (module docstring)
    slot = gl.arange(0, BLOCK_N, layout=acc_rows)
    h_n, w, g_lane, j = (slot // 8) % 2, (slot // 16) % WARPS, slot % 8, slot // (16 * WARPS)
    acc_n = pid_n * BLOCK_N + ((h_n * WARPS + w) * 8 + g_lane) * 4 + j
    acc_n_mask = acc_n < N

    # pair i of a word (i = 2 s + jr): nibbles i and i + 4 ORed under the exponent of 2^e,
    # two 16-bit floats 2^e + q in one register; with fp16 (10 significant bits) the odd pairs
    # are read in place, 2^e + 16 q, and scaled by 1/16 in the same FMA that removes 2^e + z
    if CDT == gl.float16:
        magic = opaque_zero + 0x64006400     # 1024.0, 1024.0
        one = opaque_zero + 0x3C003C00       # 1.0, 1.0
        sixteenth = opaque_zero + 0x2C002C00  # 0.0625, 0.0625
    else:
        magic = opaque_zero + 0x43004300     # bf16 128.0, 128.0
        one = opaque_zero + 0x3F803F80       # bf16 1.0, 1.0

    split_shape: gl.constexpr = [KR, 4, 2, WARPS, 8, 4]
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
    if PREFETCH:  # (the words and activations of each step loaded one step ahead)
        words_next = _load_words(qweight_ptr, k_start, r, cols, c_mask, k_end, K, stride_qk,
                                 stride_qn, BLOCK_K, EVEN)
        x_next = _load_x(x_rows, k_start, xm, xk, M, k_end, stride_xk, CDT)
    for g0 in range(k_start, k_end, GROUP_K):
        g = g0 // group_size
        z = gl.load(zeros_ptr + g * stride_zg + cols * stride_zn, mask=c_mask, other=0)
        z = gl.reshape(gl.broadcast(z.to(gl.int32)[None, :], r[:, None])[0], split_shape)
        # -(2^e + z) in both halves, as bits (an integer z is exact under 2^e's exponent):
        # fp16 -(1024 + z) = 0xE400 + z, -(64 + z) = 0xD400 + 16 z; bf16 -(128 + z) = 0xC300 + z
        if CDT == gl.float16:
            neg_z = (0xE400 + z) * 0x10001
            neg_z16 = (0xD400 + 16 * z) * 0x10001
        else:
            neg_z = (0xC300 + z) * 0x10001
        part = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=mma)
        for kk in gl.static_range(GROUP_K // BLOCK_K):
            k0 = g0 + kk * BLOCK_K
            if PREFETCH:
                words, xt = words_next, x_next
                words_next = _load_words(qweight_ptr, k0 + BLOCK_K, r, cols, c_mask, k_end, K,
                                         stride_qk, stride_qn, BLOCK_K, EVEN)
                x_next = _load_x(x_rows, k0 + BLOCK_K, xm, xk, M, k_end, stride_xk, CDT)
            else:
                words = _load_words(qweight_ptr, k0, r, cols, c_mask, k_end, K, stride_qk,
                                    stride_qn, BLOCK_K, EVEN)
                xt = _load_x(x_rows, k0, xm, xk, M, k_end, stride_xk, CDT)
            words = gl.reshape(words, split_shape)  # [kr, t, h_n, w, g, j]
            # q - z for pairs 0..3, two per register: one LOP3 and one half2 FMA each
            if CDT == gl.float16:
                w8 = words >> 8
                d0 = _fma2((words & 0x000F000F) | magic, one, neg_z, CDT, ASM)
                d1 = _fma2((words & 0x00F000F0) | magic, sixteenth, neg_z16, CDT, ASM)
                d2 = _fma2((w8 & 0x000F000F) | magic, one, neg_z, CDT, ASM)
                d3 = _fma2((w8 & 0x00F000F0) | magic, sixteenth, neg_z16, CDT, ASM)
            else:
                d0 = _fma2((words & 0x000F000F) | magic, one, neg_z, CDT, ASM)
                d1 = _fma2(((words >> 4) & 0x000F000F) | magic, one, neg_z, CDT, ASM)
                d2 = _fma2(((words >> 8) & 0x000F000F) | magic, one, neg_z, CDT, ASM)
                d3 = _fma2(((words >> 12) & 0x000F000F) | magic, one, neg_z, CDT, ASM)
            # [kr, t, h_n, w, g, j, h, jr, s] -> A [columns (j, w, h_n, g), slots (kr, s, jr, t, h)]
            a = gl.join(gl.join(_halves(d0, CDT), _halves(d1, CDT)),
                        gl.join(_halves(d2, CDT), _halves(d3, CDT)))
            a = gl.permute(a, [5, 3, 2, 4, 0, 8, 7, 1, 6])
            a = gl.convert_layout(gl.reshape(a, [BLOCK_N, BLOCK_K]), a_layout,
                                  assert_trivial=TRIVIAL)
            # input 32 kr + 8 t + 4 h + 2 s + jr -> B [slots (kr, s, jr, t, h), batch]
            xt = gl.permute(gl.reshape(xt, [BLOCK_M, KR, 4, 2, 2, 2]), [1, 4, 5, 2, 3, 0])
            b = gl.convert_layout(gl.reshape(xt, [BLOCK_K, BLOCK_M]), b_layout,
                                  assert_trivial=TRIVIAL)
            if ONE_GROUP:
                acc = mma_v2(a, b, acc)
            else:
                part = mma_v2(a, b, part)
        if not ONE_GROUP:
            s = gl.load(scales_ptr + g * stride_sg + acc_n * stride_sn, mask=acc_n_mask,
                        other=0.0).to(gl.float32)
            acc += part * s[:, None]
    if ONE_GROUP:
        # (a slice past K, which a forced SPLIT_K may leave, has no group: nothing to read)
        s = gl.load(scales_ptr + (k_start // group_size) * stride_sg + acc_n * stride_sn,
                    mask=acc_n_mask & (k_start < k_end), other=0.0).to(gl.float32)
        acc = acc * s[:, None]

    m = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=acc_cols)
    mask = acc_n_mask[:, None] & (m < M)[None, :]
    y_ptrs = y_ptr + m[None, :] * stride_ym + acc_n[:, None] * stride_yn
    if SPLIT_K == 1:
        gl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        _add_slice(acc, mask, y_ptrs, sums_ptr + m[None, :] * N + acc_n[:, None], counters_ptr,
                   pid_m * gl.num_programs(0) + pid_n)


@gluon_kernel
def _add_slice(acc, mask, y_ptrs, sums_ptrs, counters_ptr, tile):
    """A K slice's part of a tile of y (the grid's second dimension counts the slices), by the
    protocol of ``w4a16._write_output`` (a Triton function, which Gluon cannot call): added to
    the fp32 workspace; the last slice to arrive writes y and leaves both at zero."""
    gl.atomic_add(sums_ptrs, acc, mask=mask, sem="relaxed")
    gl.barrier()
    arrived = gl.atomic_add(counters_ptr + tile, 1, sem="acq_rel")
    if arrived == gl.num_programs(1) - 1:
        total = gl.atomic_add(sums_ptrs, gl.zeros_like(acc), mask=mask, sem="relaxed")
        total = gl.where(mask, total, 0.0)
        gl.store(sums_ptrs, gl.zeros_like(acc), mask=mask)
        gl.store(y_ptrs, total.to(y_ptrs.dtype.element_ty), mask=mask)
        gl.atomic_xchg(counters_ptr + tile, 0, sem="relaxed")


_w4a16_mma_kernel = gluon_kernel(_w4a16_mma)
