"""W4A16: a matmul with 16-bit activations and packed 4-bit weights, dequantized in registers.

The math
--------
The weight ``W [K, N]`` of a linear layer ``y = x @ W`` is stored as 4-bit grid codes ``q`` with
one scale ``s`` and one integer zero point ``z`` per group of input rows and output column:

    W[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n]
    y[m, n] = sum_k x[m, k] * W[k, n]

where ``g(k)`` is ``g_idx[k]`` when a group index is given and ``k // group_size`` otherwise
(``0`` for ``group_size = -1``, one group per column). The codes arrive packed eight to an
int32 word along K (the GPTQ ``qweight`` layout of :mod:`epmq_kernels.packing`): code ``q[k, n]``
is ``(qweight[k // 8, n] >> 4 (k % 8)) & 0xF``.

At batch 1 this product is a pure memory problem: the kernel must stream ``K N / 2`` bytes of
codes, a quarter of what an fp16 weight takes, so the ideal speedup over fp16 is close to 4x
(less the scales and zeros: ``G N (s + z)`` bytes). The dequantized weight therefore never
exists in memory: each program loads a tile of words, unpacks it and applies ``(q - z) * s`` in
registers, and hands the tile to a reduction (batch 1) or to ``tl.dot`` (batch > 1). Products
accumulate in fp32 whatever the input dtype.

Conventions
-----------
* ``zeros`` are unpacked integer codes ``[G, N]`` in an integer tensor (uint8 .. int64); the
  kernels read them in the dtype they are stored in, so ``uint8`` moves the fewest bytes. They
  are the zero points themselves ("v2"); checkpoints in the original GPTQ ("v1") format store
  ``z - 1`` in ``qzeros`` and need 1 added after :func:`~epmq_kernels.packing.unpack_int4_cols`.
  Zero points are assumed to lie in the 4-bit grid (0..15), as GPTQ produces them.
* ``scales`` are fp16, bf16 or fp32 ``[G, N]``. The output has the dtype of ``x``.
* A ``g_idx`` equal to ``k // group_size`` (static groups) is detected once per tensor (and
  per in-place change of it) and takes the same path as no ``g_idx``: the tile of BLOCK_K rows
  lies in one group, whose scale and zero point are loaded once per tile. A permuted ``g_idx``
  (act-order with dynamic groups) is honoured by gathering the scale and zero point of each
  row, which costs bandwidth and is slower.

Paths
-----
* ``gemv`` (M = 1): CUDA-core split-K GEMV (``_w4a16_gemv_kernel``). Each program streams
  ``BLOCK_K x BLOCK_N`` tiles of words with 16-byte, evict-first loads, prefetching the next
  tile before unpacking the current one, and keeps fp32 partial sums per packed row in
  registers so the cross-thread reduction happens once, after the K loop. Inside a group the
  zero point and the scale are factored out of the sum over a word's eight codes:
  ``sum_j (q_j - z) s x_j = s (sum_j q_j x_j - z sum_j x_j)``, so a code costs about four
  instructions (two logic ops, an add, an FMA; see ``_code_f32``).
* ``splitk`` (2 <= M <= 64) and ``gemm`` (M > 64) share ``_w4a16_dot_kernel``: the tiled
  ``tl.dot`` GEMM of the Triton matmul tutorial (grouped program order for L2 reuse), the
  weight tile dequantized in registers in fp16/bf16 (``(q - z) * s``, one rounding, like an
  fp16 weight) and pipelined over ``num_stages``. The split-K configs use a BLOCK_M of 16-64
  and split the K range over SPLIT_K programs so skinny problems still fill the GPU.

With SPLIT_K > 1 the K slices of an output tile add their fp32 partial sums into a workspace
with ``atomic_add`` and count their arrival on a per-tile counter; the last slice to arrive
reads the total back, writes y in the output dtype and resets the workspace and counter to
zero. Split-K thus stays one launch, with no zero-fill and no cast kernel (at M = 1 those would
cost as much as the product). The workspace is kept per device and stream; the autotuner times
the whole operation, so it only picks a split where it pays.

Converting codes to floats uses no int->float instruction (a low-throughput unit): a code
``c < 16`` ORed into the mantissa of a power of two ``2^e`` gives the float ``2^e + c`` exactly
(``2^10`` in fp16, ``2^7`` in bf16, ``2^23`` in fp32), and subtracting ``2^e + z`` leaves the
exact integer ``c - z``.

fp32 activations use 3xTF32 dots (about fp32 accuracy on tensor cores), or plain TF32 when
``torch.backends.cuda.matmul.allow_tf32`` is set. Under TRITON_INTERPRET, which has no bf16
arithmetic, bf16 inputs are dequantized and multiplied in fp32 instead (same kernel code, a
different compute-dtype constexpr); compiled, bf16 stays bf16.

Autotuning: the space is ``AUTOTUNE_SPACE`` below; winners are cached on disk per GPU name and
shape bucket by :mod:`epmq_kernels.autotune_cache`. Under TRITON_INTERPRET nothing is timed and
``INTERPRETER_CONFIG`` is used.
"""

import weakref

import torch
import triton
import triton.language as tl

from ._runtime import INTERPRETED, check_device
from . import autotune_cache

# ----------------------------------------------------------------------------------------------
# Autotune space (the only place launch configurations are stated)
# ----------------------------------------------------------------------------------------------
# Batch sizes that pick each path: M == 1 -> gemv, M <= SPLITK_MAX_M -> splitk, else gemm.
SPLITK_MAX_M = 64


def _product(**axes):
    configs = [{}]
    for name, values in axes.items():
        configs = [dict(c, **{name: v}) for c in configs for v in values]
    return configs


AUTOTUNE_SPACE = {
    # GEMV: 12 configs. BLOCK_K = 128 is one group of the common group size; a program with
    # SPLIT_K > 1 covers K / SPLIT_K rows, so large SPLIT_K gives many short programs (latency
    # hidden by occupancy), SPLIT_K = 1 one long loop per column block and a single launch.
    "gemv": _product(BLOCK_N=[32, 64, 128], BLOCK_K=[128], SPLIT_K=[1, 4, 8, 16],
                     num_warps=[4], num_stages=[1]),
    # Split-K GEMM for small M: 12 configs; BLOCK_M follows M (16, 32 or 64, not tuned).
    "splitk": (_product(BLOCK_N=[64, 128], BLOCK_K=[128], SPLIT_K=[1, 2, 4, 8, 16],
                        GROUP_M=[1], num_warps=[4], num_stages=[3])
               + _product(BLOCK_N=[64], BLOCK_K=[64], SPLIT_K=[4, 8],
                          GROUP_M=[1], num_warps=[4], num_stages=[4])),
    # GEMM for large M: 10 configs, the shapes that do well for fp16 matmul on Hopper.
    "gemm": [
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, GROUP_M=8, num_warps=w, num_stages=st)
        for bm, bn, bk, w, st in [
            (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3),
            (256, 128, 64, 8, 3), (128, 128, 128, 8, 3), (64, 128, 64, 4, 4),
            (128, 64, 64, 4, 4), (64, 256, 64, 8, 3), (64, 64, 64, 4, 4), (128, 128, 32, 4, 4),
        ]
    ],
}

# Under TRITON_INTERPRET (CPU) nothing is timed: one small config per path, with SPLIT_K = 2 so
# the split-K reduction is exercised too.
INTERPRETER_CONFIG = {
    "gemv": dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, num_warps=4, num_stages=1),
    "splitk": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, GROUP_M=1, num_warps=4,
                   num_stages=1),
    "gemm": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1, GROUP_M=2, num_warps=4,
                 num_stages=1),
}

PATHS = ("gemv", "splitk", "gemm")


# ----------------------------------------------------------------------------------------------
# Dequantization in registers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _biased_float(codes, CDT: tl.constexpr):
    """``2^e + codes`` exactly in CDT, with no int->float conversion: the 4-bit code is written
    into the low mantissa bits of the power of two ``2^e`` (e = 10, 7, 23 for fp16, bf16, fp32)."""
    if CDT == tl.float16:
        out = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    elif CDT == tl.bfloat16:
        out = (codes | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        out = (codes | 0x4B000000).to(tl.float32, bitcast=True)
    return out


@triton.jit
def _biased_zero(zeros, CDT: tl.constexpr):
    """``2^e + z`` in CDT (exact for grid zero points), to subtract from :func:`_biased_float`."""
    if CDT == tl.float16:
        out = (zeros.to(tl.float32) + 1024.0).to(tl.float16)
    elif CDT == tl.bfloat16:
        out = (zeros.to(tl.float32) + 128.0).to(tl.bfloat16)
    else:
        out = zeros.to(tl.float32) + 8388608.0
    return out


@triton.jit
def _code_f32(words, J: tl.constexpr):
    """Code J of each word (bits 4J..4J+3) as an exact fp32, without an int->float conversion.

    The word is masked and given the exponent that makes bit 4J worth 1: the float is then
    2^(23-4J) + code, two logic ops and one add (no shift). That needs the code below the
    exponent field (bit 23), so J < 5 stay in place and codes 5..7 are first shifted down to
    bits 16..19.
    """
    if J < 5:
        biased = (words & (0xF << (4 * J))) | ((150 - 4 * J) << 23)
        out = biased.to(tl.float32, bitcast=True) - (1 << (23 - 4 * J))
    else:
        biased = ((words >> (4 * (J - 4))) & 0xF0000) | (134 << 23)
        out = biased.to(tl.float32, bitcast=True) - 128.0
    return out


@triton.jit
def _unpack_codes_t(words):
    """Packed words ``[BLOCK_R, BLOCK_N]`` -> codes ``[BLOCK_N, 8 BLOCK_R]`` (transposed), column
    ``8 r + j`` being nibble j of word r.

    K is put last so that each interleave is a ``join`` + ``reshape`` of the minor dimension,
    which Triton lowers in registers (compiled for sm_90, the GEMM's only layout conversion is
    the one into the dot operand; a 3-D reshape or repeated loads of each word cost more shared
    memory traffic). Writing j = 4 b2 + 2 b1 + b0, three rounds of pairwise interleaving move
    nibble j of word r to column 2 (2 (2 r + b2) + b1) + b0 = 8 r + j.
    """
    w = tl.trans(words)
    BLOCK_N: tl.constexpr = w.shape[0]
    BLOCK_R: tl.constexpr = w.shape[1]
    c0 = w & 0xF
    c1 = (w >> 4) & 0xF
    c2 = (w >> 8) & 0xF
    c3 = (w >> 12) & 0xF
    c4 = (w >> 16) & 0xF
    c5 = (w >> 20) & 0xF
    c6 = (w >> 24) & 0xF
    c7 = (w >> 28) & 0xF
    a0 = tl.reshape(tl.join(c0, c4), (BLOCK_N, 2 * BLOCK_R))
    a1 = tl.reshape(tl.join(c1, c5), (BLOCK_N, 2 * BLOCK_R))
    a2 = tl.reshape(tl.join(c2, c6), (BLOCK_N, 2 * BLOCK_R))
    a3 = tl.reshape(tl.join(c3, c7), (BLOCK_N, 2 * BLOCK_R))
    b0 = tl.reshape(tl.join(a0, a2), (BLOCK_N, 4 * BLOCK_R))
    b1 = tl.reshape(tl.join(a1, a3), (BLOCK_N, 4 * BLOCK_R))
    return tl.reshape(tl.join(b0, b1), (BLOCK_N, 8 * BLOCK_R))


@triton.jit
def _write_output(acc, y_ptrs, sums_ptrs, mask, counter_ptr, SPLIT_K: tl.constexpr):
    """Store the fp32 tile ``acc`` to y, or, with SPLIT_K > 1, add it to the fp32 workspace and
    let the last K slice of this tile to arrive write y: one launch, no zero-fill, no cast.

    The barrier orders every thread's partial sums before the arrival is counted (acq_rel, by
    one thread); the last arrival reads the sums back through L2 atomics (never a stale L1
    line), writes y, and leaves the sums and the counter at zero for the next launch.
    """
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(sums_ptrs, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()
        arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.atomic_add(sums_ptrs, tl.zeros_like(acc), mask=mask, sem="relaxed")
            total = tl.where(mask, total, 0.0)  # masked lanes return garbage
            tl.store(sums_ptrs, tl.zeros_like(acc), mask=mask)
            tl.store(y_ptrs, total.to(y_ptrs.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counter_ptr, 0, sem="relaxed")


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, y_ptr, sums_ptr, counters_ptr,
    M, N, K, group_size, k_per_split,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_ym, stride_yn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GATHER: tl.constexpr, HAS_G_IDX: tl.constexpr,
):
    """One row of x against a BLOCK_N column slice of W over one K slice, on CUDA cores."""
    BLOCK_R: tl.constexpr = BLOCK_K // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    x_row = x_ptr + pid_m * stride_xm
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    # Partial sums per packed row, reduced across threads once after the loop.
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    # Software prefetch: the words of tile i + 1 are requested before tile i is unpacked, so
    # every warp keeps two tiles of weight traffic in flight (loads only block at first use).
    rows = k_start // 8 + tl.arange(0, BLOCK_R)
    word_ptrs = qweight_ptr + rows[:, None] * stride_qk + offs_n[None, :] * stride_qn
    next_words = tl.load(word_ptrs, mask=(rows * 8 < k_end)[:, None] & n_mask[None, :], other=0,
                         eviction_policy="evict_first")
    for k0 in range(k_start, k_end, BLOCK_K):
        rows = k0 // 8 + tl.arange(0, BLOCK_R)
        r_mask = rows * 8 < k_end
        words = next_words
        word_ptrs += BLOCK_R * stride_qk
        next_words = tl.load(word_ptrs, mask=((rows + BLOCK_R) * 8 < k_end)[:, None]
                             & n_mask[None, :], other=0, eviction_policy="evict_first")
        if GATHER:
            for j in tl.static_range(8):
                k = rows * 8 + j
                if HAS_G_IDX:
                    g = tl.load(g_idx_ptr + k, mask=r_mask, other=0)
                else:
                    g = k // group_size
                gn_mask = r_mask[:, None] & n_mask[None, :]
                s = tl.load(scales_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn,
                            mask=gn_mask, other=0.0).to(tl.float32)
                z = tl.load(zeros_ptr + g[:, None] * stride_zg + offs_n[None, :] * stride_zn,
                            mask=gn_mask, other=0)
                x_j = tl.load(x_row + k * stride_xk, mask=r_mask, other=0.0,
                              eviction_policy="evict_last").to(tl.float32)
                acc += (_code_f32(words, j) - z.to(tl.float32)) * s * x_j[:, None]
        else:
            # The whole tile lies in group k0 // group_size: one scale and zero point per column,
            # and the scale multiplies the sum over the eight codes of a word, not each code.
            g = k0 // group_size
            s = tl.load(scales_ptr + g * stride_sg + offs_n * stride_sn, mask=n_mask,
                        other=0.0).to(tl.float32)
            z = tl.load(zeros_ptr + g * stride_zg + offs_n * stride_zn, mask=n_mask, other=0)
            # sum_j (q_j - z) x_j = sum_j q_j x_j - z sum_j x_j: the zero point costs one FMA
            # per word, and the codes need no bias beyond the exact-float trick.
            part = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
            x_sum = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for j in tl.static_range(8):
                x_j = tl.load(x_row + (rows * 8 + j) * stride_xk, mask=r_mask, other=0.0,
                              eviction_policy="evict_last").to(tl.float32)
                part += _code_f32(words, j) * x_j[:, None]
                x_sum += x_j
            part -= x_sum[:, None] * z.to(tl.float32)[None, :]
            acc += part * s[None, :]
    y = tl.sum(acc, axis=0)
    _write_output(y, y_ptr + pid_m * stride_ym + offs_n * stride_yn, sums_ptr + pid_m * N + offs_n,
                  n_mask, counters_ptr + pid_m * tl.num_programs(0) + pid_n, SPLIT_K)


@triton.jit
def _w4a16_dot_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, y_ptr, sums_ptr, counters_ptr,
    M, N, K, group_size, k_per_split,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
    GATHER: tl.constexpr, HAS_G_IDX: tl.constexpr,
    CDT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """A BLOCK_M x BLOCK_N tile of y over one K slice, the weight dequantized into ``tl.dot``."""
    BLOCK_R: tl.constexpr = BLOCK_K // 8
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Grouped ordering: GROUP_M row blocks share each weight column block while it is in L2.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_rows
    pid_n = (pid % num_pid_in_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0,
                    eviction_policy="evict_last").to(CDT)
        rows = k0 // 8 + tl.arange(0, BLOCK_R)
        words = tl.load(qweight_ptr + rows[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                        mask=(rows * 8 < k_end)[:, None] & n_mask[None, :], other=0,
                        eviction_policy="evict_first")
        codes_t = _unpack_codes_t(words)                       # [BLOCK_N, BLOCK_K]
        if GATHER:
            if HAS_G_IDX:
                g = tl.load(g_idx_ptr + offs_k, mask=k_mask, other=0)
            else:
                g = offs_k // group_size
            nk_mask = n_mask[:, None] & k_mask[None, :]
            s_t = tl.load(scales_ptr + g[None, :] * stride_sg + offs_n[:, None] * stride_sn,
                          mask=nk_mask, other=0.0)
            z_t = tl.load(zeros_ptr + g[None, :] * stride_zg + offs_n[:, None] * stride_zn,
                          mask=nk_mask, other=0)
        else:
            g = k0 // group_size
            s_t = tl.load(scales_ptr + g * stride_sg + offs_n * stride_sn, mask=n_mask,
                          other=0.0)[:, None]
            z_t = tl.load(zeros_ptr + g * stride_zg + offs_n * stride_zn, mask=n_mask,
                          other=0)[:, None]
        w_t = (_biased_float(codes_t, CDT) - _biased_zero(z_t, CDT)) * s_t.to(CDT)
        acc = tl.dot(x, tl.trans(w_t), acc, input_precision=DOT_PRECISION)
    _write_output(acc, y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                  sums_ptr + offs_m[:, None] * N + offs_n[None, :],
                  m_mask[:, None] & n_mask[None, :], counters_ptr + pid, SPLIT_K)


# ----------------------------------------------------------------------------------------------
# Torch reference
# ----------------------------------------------------------------------------------------------
def _row_groups(K, group_size, g_idx, device):
    if g_idx is not None:
        return g_idx.to(device=device, dtype=torch.long)
    if group_size == -1:
        return torch.zeros(K, dtype=torch.long, device=device)
    return torch.arange(K, device=device) // group_size


def dequantize_int4_weight(qweight, scales, zeros, group_size, g_idx=None, dtype=torch.float64):
    """The dense weight ``W [K, N] = (q - z[g(k)]) * s[g(k)]`` in ``dtype`` (reference only:
    the kernels never build it)."""
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int64)
    q = ((qweight.to(torch.int64)[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(K, N)
    g = _row_groups(K, group_size, g_idx, qweight.device)
    z = zeros.to(torch.int64)[g]
    return (q - z).to(dtype) * scales.to(dtype)[g]


def w4a16_matmul_reference(x, qweight, scales, zeros, group_size, g_idx=None, *,
                           dtype=torch.float64):
    """``x @ W`` with W dequantized in ``dtype`` (float64 by default) and x converted to it:
    the ground truth the kernels are tested against. Returns ``dtype``, shape ``[..., N]``."""
    W = dequantize_int4_weight(qweight, scales, zeros, group_size, g_idx, dtype)
    return (x.to(dtype).reshape(-1, x.shape[-1]) @ W).reshape(*x.shape[:-1], W.shape[1])


# ----------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _check_arguments(x, qweight, scales, zeros, group_size, g_idx):
    for name, t in (("x", x), ("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., K]")
    K = x.shape[-1]
    if K % 8:
        raise ValueError(f"K = {K} (last dim of x) is not a multiple of 8, the int4 packing")
    if qweight.dtype != torch.int32:
        raise ValueError(f"qweight must be int32 (eight int4 codes per word), got {qweight.dtype}")
    if qweight.dim() != 2 or qweight.shape[0] * 8 != K:
        raise ValueError(f"qweight must be [K // 8, N] = [{K // 8}, N] for K = {K}, "
                         f"got {tuple(qweight.shape)}")
    N = qweight.shape[1]
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"group_size must be an int, got {group_size!r}")
    if group_size == -1:
        G = 1
    elif group_size <= 0:
        raise ValueError(f"group_size must be -1 (per channel) or positive, got {group_size}")
    elif K % group_size:
        raise ValueError(f"K = {K} is not a multiple of group_size = {group_size}")
    else:
        G = K // group_size
    if scales.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"scales must be float16, bfloat16 or float32, got {scales.dtype}")
    if tuple(scales.shape) != (G, N):
        raise ValueError(f"scales must be [G, N] = [{G}, {N}] (K = {K}, group_size = "
                         f"{group_size}), got {tuple(scales.shape)}")
    if zeros.dtype not in _INT_DTYPES:
        raise ValueError(f"zeros must be an integer tensor of grid codes (uint8..int64), got "
                         f"{zeros.dtype}; round and convert float zero points first")
    if tuple(zeros.shape) != (G, N):
        raise ValueError(f"zeros must be [G, N] = [{G}, {N}], got {tuple(zeros.shape)}")
    tensors, names = [x, qweight, scales, zeros], ["x", "qweight", "scales", "zeros"]
    if g_idx is not None:
        if not isinstance(g_idx, torch.Tensor):
            raise ValueError(f"g_idx must be a torch.Tensor, got {type(g_idx).__name__}")
        if g_idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"g_idx must be int32 (or int64), got {g_idx.dtype}")
        if tuple(g_idx.shape) != (K,):
            raise ValueError(f"g_idx must be [K] = [{K}], got {tuple(g_idx.shape)}")
        tensors.append(g_idx)
        names.append("g_idx")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        listing = ", ".join(f"{n}={t.device}" for n, t in zip(names, tensors))
        raise ValueError(f"tensors are on different devices: {listing}")
    return K, N, G


# A g_idx is inspected once (range check and static-or-permuted, one host sync) and the answer
# remembered for that tensor object until it is changed in place (its version counter moves).
_G_IDX_KINDS = {}


def _g_idx_is_static(g_idx, K, G, group_size):
    """True if g_idx[k] == k // group_size for all k (no gather needed); raises if out of range."""
    signature = (g_idx.data_ptr(), g_idx._version, K, G, group_size)
    hit = _G_IDX_KINDS.get(id(g_idx))
    if hit is not None and hit[0]() is g_idx and hit[1] == signature:
        return hit[2]
    if g_idx.is_cuda and torch.cuda.is_current_stream_capturing():
        return False  # cannot inspect during capture; the gather path is right for any g_idx
    lo, hi = (int(v) for v in torch.aminmax(g_idx))
    if lo < 0 or hi >= G:
        raise ValueError(f"g_idx values must lie in [0, {G}) (G = number of groups), "
                         f"got [{lo}, {hi}]")
    static = bool(torch.equal(g_idx.long(), torch.arange(K, device=g_idx.device) // group_size))
    if len(_G_IDX_KINDS) > 1024:
        _G_IDX_KINDS.clear()
    _G_IDX_KINDS[id(g_idx)] = (weakref.ref(g_idx), signature, static)
    return static


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _path_for(M):
    if M == 1:
        return "gemv"
    return "splitk" if M <= SPLITK_MAX_M else "gemm"


def _block_m_for_splitk(M):
    return 16 if M <= 16 else (32 if M <= 32 else 64)


def _m_bucket(path, M):
    if path == "gemv":
        return 1
    return min(triton.next_power_of_2(M), 8192)


def _needs_gather(config, G, group_size, permuted):
    """Per-row scales unless every BLOCK_K tile of rows lies in one group."""
    return permuted or (G > 1 and group_size % config["BLOCK_K"] != 0)


def _candidates(path, M, K, G, group_size, permuted):
    """The autotune space of a path, pruned to configs that make sense for this problem."""
    configs = []
    for config in AUTOTUNE_SPACE[path]:
        if path == "splitk":
            config = dict(config, BLOCK_M=_block_m_for_splitk(M))
        k_tiles = triton.cdiv(K, config["BLOCK_K"])
        if config["SPLIT_K"] > 1 and config["SPLIT_K"] > k_tiles:
            continue  # some K slices would be empty
        if config["BLOCK_K"] > max(32, triton.next_power_of_2(K)):
            continue
        configs.append(config)
    # A config whose tiles straddle groups needs the gather path: only keep those if nothing else.
    aligned = [c for c in configs if not _needs_gather(c, G, group_size, permuted)]
    configs = aligned or configs
    if not configs:  # tiny K: fall back to the smallest tiles of the space
        configs = [min(AUTOTUNE_SPACE[path], key=lambda c: (c["BLOCK_K"], c["SPLIT_K"]))]
        if path == "splitk":
            configs[0] = dict(configs[0], BLOCK_M=_block_m_for_splitk(M))
    return configs


def _dot_precision(x_dtype):
    if x_dtype != torch.float32:
        return "ieee"  # unused for 16-bit inputs
    # 3xTF32 keeps fp32 accuracy on the tensor cores; plain TF32 only if torch allows it too.
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"


def _compute_dtype(x_dtype):
    # The Triton interpreter (CPU) has no bf16 arithmetic, only bf16 <-> fp32 conversions, so
    # interpreted bf16 runs dequantize and dot in fp32. Compiled, bf16 stays bf16.
    if x_dtype == torch.float16:
        return tl.float16
    if x_dtype == torch.bfloat16 and not INTERPRETED:
        return tl.bfloat16
    return tl.float32


# Split-K workspace: fp32 partial sums and int32 arrival counters per (device, stream). The
# kernels leave both at zero, so a launch needs no zero-fill; one per stream because two
# launches must not share them concurrently. Grown (freshly zeroed) when a problem needs more.
_WORKSPACES = {}


def _workspace_key(device):
    return device, (torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)


def _split_k_workspace(device, n_sums, n_tiles):
    _, stream = _workspace_key(device)
    sums, counters = _WORKSPACES.get((device, stream), (None, None))
    if sums is None or sums.numel() < n_sums or counters.numel() < n_tiles:
        sums = torch.zeros(max(n_sums, 1 << 16), dtype=torch.float32, device=device)
        counters = torch.zeros(max(n_tiles, 1 << 12), dtype=torch.int32, device=device)
        # Memory allocated while a CUDA graph is captured belongs to that graph: not shared.
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _WORKSPACES[(device, stream)] = (sums, counters)
    return sums, counters


def _launch(path, config, x2, qweight, scales, zeros, g_idx, group_size, G, permuted, out):
    """Run one path with one config: y = x2 @ W into ``out`` [M, N] (x2's dtype)."""
    M, K = x2.shape
    N = qweight.shape[1]
    gather = _needs_gather(config, G, group_size, permuted)
    has_g_idx = gather and permuted
    split_k = config["SPLIT_K"]
    block_k = config["BLOCK_K"]
    k_per_split = triton.cdiv(triton.cdiv(K, block_k), split_k) * block_k
    if path == "gemv":
        grid = (triton.cdiv(N, config["BLOCK_N"]), split_k, M)
        tiles = grid[0] * M
    else:
        tiles = triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"])
        grid = (tiles, split_k)
    if split_k > 1:
        sums, counters = _split_k_workspace(x2.device, M * N, tiles)
    else:
        sums, counters = out, qweight  # never touched when SPLIT_K == 1
    g_idx_arg = g_idx if has_g_idx else qweight  # never read when HAS_G_IDX is False
    try:
        _run_kernel(path, config, grid, gather, has_g_idx, x2, qweight, scales, zeros, g_idx_arg,
                    out, sums, counters, group_size, k_per_split)
    except BaseException:
        # A launch that did not complete may leave partial sums behind: never reuse them.
        if split_k > 1:
            _WORKSPACES.pop(_workspace_key(x2.device), None)
        raise
    return out


def _run_kernel(path, config, grid, gather, has_g_idx, x2, qweight, scales, zeros, g_idx_arg,
                out, sums, counters, group_size, k_per_split):
    M, K = x2.shape
    N = qweight.shape[1]
    block_k, split_k = config["BLOCK_K"], config["SPLIT_K"]
    common = (
        x2, qweight, scales, zeros, g_idx_arg, out, sums, counters,
        M, N, K, group_size, k_per_split,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1),
        scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1),
        out.stride(0), out.stride(1),
    )
    if path == "gemv":
        _w4a16_gemv_kernel[grid](
            *common,
            BLOCK_N=config["BLOCK_N"], BLOCK_K=block_k, SPLIT_K=split_k,
            GATHER=gather, HAS_G_IDX=has_g_idx,
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
    else:
        _w4a16_dot_kernel[grid](
            *common,
            BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_K=block_k,
            SPLIT_K=split_k, GROUP_M=config["GROUP_M"],
            GATHER=gather, HAS_G_IDX=has_g_idx,
            CDT=_compute_dtype(x2.dtype), DOT_PRECISION=_dot_precision(x2.dtype),
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )


# Configs chosen in this process, so a steady-state call costs one dict lookup.
_CHOSEN = {}


def _choose_config(path, x2, qweight, scales, zeros, g_idx, group_size, G, permuted):
    if INTERPRETED:
        return INTERPRETER_CONFIG[path]
    M, K = x2.shape
    N = qweight.shape[1]
    key = (f"{path}|M{_m_bucket(path, M)}|K{K}|N{N}|G{G}|{'perm' if permuted else 'static'}"
           f"|x={str(x2.dtype)[6:]}|s={str(scales.dtype)[6:]}|z={str(zeros.dtype)[6:]}")
    chosen = _CHOSEN.get((x2.device, key))
    if chosen is not None:
        return chosen
    candidates = _candidates(path, M, K, G, group_size, permuted)
    cache = autotune_cache.cache_for("w4a16", x2.device, AUTOTUNE_SPACE)
    scratch = torch.empty((M, N), dtype=x2.dtype, device=x2.device)

    def run(config):
        _launch(path, config, x2, qweight, scales, zeros, g_idx, group_size, G, permuted, scratch)

    chosen = autotune_cache.tune(cache, key, candidates, run)
    if not torch.cuda.is_current_stream_capturing():
        _CHOSEN[(x2.device, key)] = chosen
    return chosen


def w4a16_plan(x, qweight, scales, zeros, group_size, g_idx=None):
    """What :func:`w4a16_matmul` will run for these arguments on the GPU (autotuning first if
    nothing is cached): ``dict(path=..., config=..., gather=...)``. For benchmarks and logs."""
    K, N, G = _check_arguments(x, qweight, scales, zeros, group_size, g_idx)
    group = K if group_size == -1 else group_size
    permuted = g_idx is not None and not _g_idx_is_static(g_idx, K, G, group)
    x2 = x.reshape(-1, K)
    path = _path_for(x2.shape[0])
    config = _choose_config(path, x2, qweight, scales, zeros, g_idx, group, G, permuted)
    return dict(path=path, config=config, gather=_needs_gather(config, G, group, permuted))


def w4a16_matmul(x, qweight, scales, zeros, group_size, g_idx=None, *, out=None, path=None,
                 config=None, backend="auto"):
    """``y = x @ ((q - z) * s)`` with q the int4 codes packed in ``qweight``; see the module
    docstring for the layout and conventions.

    Arguments
        x: ``[..., K]`` float16, bfloat16 or float32 activations.
        qweight: int32 ``[K // 8, N]``, codes packed along K (GPTQ layout).
        scales: ``[G, N]`` float16/bfloat16/float32.
        zeros: ``[G, N]`` integer zero-point codes, unpacked (any integer dtype).
        group_size: -1 (per channel, G = 1) or a positive divisor of K (G = K // group_size).
        g_idx: optional int32 ``[K]`` group of each input row.
    Keyword-only (tests and benchmarks)
        out: ``[..., N]`` tensor of x's dtype to write into.
        path: force ``"gemv"``, ``"splitk"`` or ``"gemm"`` instead of choosing by M.
        config: force a launch config (a dict like those of ``AUTOTUNE_SPACE``).
        backend: ``"auto"`` (Triton for CUDA tensors, the torch reference for CPU tensors),
            ``"triton"`` (also CPU tensors under TRITON_INTERPRET) or ``"torch"``.
    Returns ``[..., N]`` in x's dtype, accumulated in fp32.
    """
    K, N, G = _check_arguments(x, qweight, scales, zeros, group_size, g_idx)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if path is not None and path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    group = K if group_size == -1 else group_size
    lead = x.shape[:-1]
    if out is not None:
        if (not isinstance(out, torch.Tensor) or out.dtype != x.dtype
                or tuple(out.shape) != (*lead, N) or out.device != x.device):
            raise ValueError(f"out must be a {x.dtype} tensor of shape {(*lead, N)} on "
                             f"{x.device}")
    use_triton = backend == "triton" or (backend == "auto" and x.is_cuda and not INTERPRETED)
    if not use_triton:
        if g_idx is not None:
            _g_idx_is_static(g_idx, K, G, group)  # the same range check as the kernels
        y = w4a16_matmul_reference(x, qweight, scales, zeros, group_size, g_idx,
                                   dtype=torch.float32).to(x.dtype)
        if out is not None:
            out.copy_(y)
            return out
        return y
    names = ["x", "qweight", "scales", "zeros"] + (["g_idx"] if g_idx is not None else [])
    check_device(x, qweight, scales, zeros, *([g_idx] if g_idx is not None else []), names=names)
    permuted = g_idx is not None and not _g_idx_is_static(g_idx, K, G, group)

    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if out is None:
        out2 = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        out2 = out.view(M, N) if out.is_contiguous() else torch.empty_like(out).view(M, N)
    if M > 0 and N > 0:
        path = path or _path_for(M)
        if config is None:
            config = _choose_config(path, x2, qweight, scales, zeros, g_idx, group, G, permuted)
        elif path == "splitk" and "BLOCK_M" not in config:
            config = dict(config, BLOCK_M=_block_m_for_splitk(M))
        _launch(path, config, x2, qweight, scales, zeros, g_idx, group, G, permuted, out2)
    if out is None:
        return out2.view(*lead, N)
    if not out.is_contiguous():
        out.copy_(out2.view(*lead, N))
    return out
