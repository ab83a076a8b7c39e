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
exists in memory on the paths for small batches: each program loads a tile of words, unpacks it
and applies ``(q - z) * s`` in registers, and hands the tile to a reduction (batch 1) or to
``tl.dot``. Products accumulate in fp32 whatever the input dtype.

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
  (act-order with dynamic groups) is, where its groups sorted are runs of ``group_size`` (as
  GPTQ makes them), taken as static groups of sorted rows: the codes are sorted once per
  qweight and g_idx (a second copy of the packed codes, kept while both live unchanged;
  ``ACT_ORDER_REPACK``) and each call gathers x's columns into the same order, a small gather,
  after which every fast path applies. A CUDA graph captured after the copy exists (a warm-up
  made it) uses it and keeps it for good: its replays read that copy, so act-order weights
  changed in place after a capture need a new capture. Other permuted ``g_idx``, calls forcing
  a path or config and weights first seen inside a capture gather the scale and zero point of
  each row in the kernels, which costs bandwidth and instructions (the GEMV: about 90 a packed
  word against 26-33).

Paths
-----
* ``gemv`` (M = 1): CUDA-core split-K GEMV (``_w4a16_gemv_kernel``). Each program streams
  ``BLOCK_K x BLOCK_N`` tiles of words with 16-byte, evict-first loads, keeping PREFETCH tiles
  of weight traffic in flight ahead of the one being unpacked, and keeps fp32 partial sums per
  packed row in registers so the cross-thread reduction happens once, after the K loop. At this
  batch the kernel is bound by integer and FP32 issue as much as by memory (an H100 SM loads
  about 4 words per clock and issues 128 lane-operations, half of them integer), so a code costs
  as few instructions as possible (``_code_exact``, ``_code_b128``):

  - a code becomes a float with no int->float conversion: masked in place, it is ORed under the
    exponent of a power of two; the exponent patterns live in registers (``opaque_zero`` is a
    run-time 0, so the compiler cannot fold them into immediates), which makes mask-and-OR a
    single LOP3 instead of two;
  - codes 4..7 keep a bias of 128 (``128 + q``, exact; no FADD): the bias is subtracted once per
    packed row, together with the zero point, since ``sum_j (q_j - z) x_j`` =
    ``sum_j f_j x_j - z sum_j x_j - 128 sum_{j>=4} x_j`` with ``f_j`` the biased floats;
  - inside a group the scale multiplies the sum over a tile, not each code; when a program's
    whole K slice lies in one group (per channel, or SPLIT_K slices no wider than a group,
    ``ONE_GROUP``), the scale and the zero-point and bias terms are applied once, after the loop;
  - ``HALF2`` (configs of their own, fp16 or bf16 activations): two codes per instruction in packed
    fp16 (``_half2_word_sums``: ``q - z`` exact, products and the word's sum rounded to fp16,
    then fp32), the row's activations read as words of two, a row with an activation above
    256 taken at 2^-8 so that no word's sum overflows fp16 (``_x_pairs``). Its error: up to
    2^-10 of a word's sum of |terms|; at 8192 inputs an rms of 3.6e-4 of the output against
    fp16 rounding's 2.8e-4. Off where its bounds do not hold (zero points outside 0..15) or its
    PTX does not compile (compute capability below 8.0). Compiled for sm_90 that is 26-33
    instructions per packed word in the loop against 43-48 (28-34 before the odd codes took
    Marlin's 1/16 trick and x its 8-byte loads, 2026-12-05), and 63-96 registers against
    80-167 (more programs per SM). The autotuner keeps it only where it is faster, and only if
    its result verifies (``VERIFY_TOLERANCE``), like every config. bf16 activations are taken
    as fp16 pairs too (``_bf16_x_pairs``: each row at the power of two that brings its largest
    |x| into [128, 256), where bf16's 8 significant bits are exact in fp16): compiled for sm_90,
    30-36 instructions per packed word in the loop against 42-48 for bf16's fp32 unpacking.

* ``splitk`` (2 <= M <= 64; also a candidate at M = 1) and ``gemm`` (M > 64) share
  ``_w4a16_dot_kernel``: the tiled ``tl.dot`` GEMM of the Triton matmul tutorial (grouped
  program order for L2 reuse), the weight tile dequantized in registers in fp16/bf16 (``(q - z) *
  s``, one rounding, like an fp16 weight) and pipelined over ``num_stages``. Options (autotuned):

  - ``PAIRS``: two codes per 32-bit operation. ``(w >> 4i) & 0x000F000F | 0x64006400`` is two fp16
    values ``1024 + q`` (codes i and i + 4 of the word) in one register, so unpacking costs one
    shift and one LOP3 per pair instead of per code. The dot is indifferent to the order of K
    within a tile, so the kernel uses the order (4, 0, 5, 1, 6, 2, 7, 3) within each word and
    permutes the activation tile the same way (in registers; see ``_unpack_pairs_t``).
  - ``SWAP_AB``: computes ``y^T = W^T x^T`` so that the dequantized weight is the A operand (from
    registers on Hopper's wgmma) and the small batch the N dimension of the instruction
    (wgmma needs 64 rows of A per warpgroup, which a batch of 16 cannot fill).
  - ``ONE_GROUP`` (from the problem, as for the GEMV): the tile is ``q - z`` (exact small
    integers) and the scale multiplies the fp32 accumulator once at the end.

  The split-K configs use a BLOCK_M of 16-64 and split the K range over SPLIT_K programs so
  skinny problems still fill the GPU.

* ``mma`` (M <= 16, a candidate beside ``gemv`` and ``splitk``; fp16/bf16 activations, static
  groups, zero points in 0..15, compute capability 8.0+): :mod:`epmq_kernels.w4a16_mma`, a Gluon
  kernel that loads each packed word into the thread that holds its codes in the
  ``mma.sync`` operand and dequantizes it there (one LOP3 and one half2 FMA per two codes, ``q -
  z`` exact, the scale applied to the fp32 group product), so that nothing goes through shared
  memory: compiled for sm_90, 16-23 instructions per packed word in the loop against about 35
  for ``splitk`` at a batch of 16 and 26-33 for the HALF2 GEMV. Its K slices reduce like
  split-K's below. Triton's interpreter runs it through a shim (:mod:`epmq_kernels._gluon`).

* ``wgmma`` (M > 16, a candidate beside ``splitk``, ``gemm`` and ``dqmm``; the same activations
  and weights as ``mma``, compute capability 9.0 only): :mod:`epmq_kernels.w4a16_wgmma`, a
  Gluon kernel with the weight dequantized the same way into the registers of Hopper's
  warpgroup MMA (its A operand may live in registers; the activations, its B operand, and the
  packed words are copied by ``cp.async`` into a ring of shared buffers), rounded once to the
  activation dtype as ``dqmm`` rounds it, and no split-K.

* ``dqmm`` (M >= 256, a candidate beside ``gemm``): dequantize a bounded chunk of the weight
  (``_w4a16_dequant_kernel``, memory bound) into a reused workspace of the activation dtype and
  multiply by it with cuBLAS: CHUNK_K rows at a time, accumulated as ``y += x[:, chunk] @
  W_chunk`` (``torch.mm`` for the first chunk, ``addmm_`` with beta = 1 after), or CHUNK_N
  columns at a time, each slab of y written once by ``y[:, slab] = x @ W[:, slab]`` (in place: a
  column slice of y is a matrix cuBLAS writes with its row stride). This does not contradict
  "dequantize in registers, never a full fp16 copy": the workspace is bounded (CHUNK_K x N or K
  x CHUNK_N, at most ``DQMM_MAX_CHUNK_BYTES`` a buffer, reused across calls and chunks), and the
  path is only offered where the product is compute bound (M >= 256: ``2 M`` flops per weight
  element against the 2 + 2.25 bytes the chunk costs to write and read back), so the extra bytes
  cost a few percent while cuBLAS's tensor-core GEMM replaces a Triton GEMM that must dequantize
  every weight tile once per BLOCK_M rows of x. The autotuner times it against the ``gemm``
  configs and keeps whichever is faster per shape bucket. Row chunks round partial products to
  the activation dtype once per chunk (cuBLAS accumulates in fp32 within a chunk and adds the
  previous partial sum in fp32 before rounding), so the result is rounded ``ceil(K / CHUNK_K)``
  times instead of once, and each chunk after the first reads and writes y again; column slabs
  round once, as a dense product does, and read and write y once, with fewer output tiles per
  product (large M). With ``STREAMS = 2`` (a candidate) the chunks alternate between two buffers
  and each is dequantized on a side stream while cuBLAS multiplies by the previous one (CUDA
  events order the two; the same numbers as one stream), so that the memory-bound dequantization
  may hide behind the compute-bound product.

With SPLIT_K > 1 the K slices of an output tile add their fp32 partial sums into a workspace
with ``atomic_add`` and count their arrival on a per-tile counter; the last slice to arrive
reads the total back, writes y in the output dtype and resets the workspace and counter to
zero. Split-K thus stays one launch, with no zero-fill and no cast kernel (at M = 1 those would
cost as much as the product). The workspace is kept per device and stream; the autotuner times
the whole operation, so it only picks a split where it pays.

fp32 activations use 3xTF32 dots (about fp32 accuracy on tensor cores), or plain TF32 when
``torch.backends.cuda.matmul.allow_tf32`` is set. Under TRITON_INTERPRET, which has no bf16
arithmetic, bf16 inputs are dequantized and multiplied in fp32 instead (same kernel code, a
different compute-dtype constexpr); compiled, bf16 stays bf16.

Host overhead
-------------
At batch 1 the GPU work of a 4096 x 4096 product is a few microseconds, so the launcher must cost
less than that. Arguments are validated once per set of weight tensors (their identity, data
pointer, shape and version counter, which in-place changes and most metadata changes bump),
and each (weights, activation shape/strides/dtype/alignment, output, device, stream, thread)
gets a launch plan:
the path, config, grid, the workspace and the compiled kernel, launched directly with integer
pointers (no re-binding or re-specialisation of the arguments, no driver pointer checks). The
plan key holds everything Triton specialises a launch on (alignment of the activation and output
pointers, exact M and strides), so a plan is reused only where the compiled kernel is valid.
Not seen: writes that bypass the version counter (through ``.data``, a NumPy view) and in-place
writes to inference tensors (made under ``torch.inference_mode``, which have no counter): give
new tensors then (``QuantLinear.load_state_dict`` does it for its buffers). A
steady-state call is a few dictionary lookups, an output allocation and one launch (M = 1:
always exactly one launch): about 4 us of host time against 25-29 us for the previous
launcher, measured on a CPU with the launch stubbed (``benchmarks/host_overhead_w4a16.py``).

CUDA graphs: split-K and dqmm plans are not used while a graph is being captured; the call
takes the checked path and its workspace becomes an intermediate of the graph, zeroed by memset
nodes at every replay (``GRAPH_WORKSPACE = "private"``, always correct: between replays the graph
may give freed memory to other work). ``GRAPH_WORKSPACE = "shared"`` captures the stream's
persistent workspace instead (no memsets; for graphs that are never replayed concurrently).

Autotuning: the space is ``AUTOTUNE_SPACE`` below; winners (path and config) are cached on disk
per GPU name and shape bucket by :mod:`epmq_kernels.autotune_cache`. All candidates are compiled
in parallel before any is timed (``_precompile``). The fastest is kept only if its result on a
fixed random activation (aligned and contiguous, so that every option of the config runs)
matches the float32 dequantized product within ``VERIFY_TOLERANCE``; else the next fastest, and
so on (``autotune_cache.REJECTED`` records the others). Under TRITON_INTERPRET nothing is timed
and ``INTERPRETER_CONFIG`` is used.
"""

import functools
import math
import os
import threading
import weakref
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.autograd import forward_ad

from ._runtime import (INTERPRETED, check_device, check_same_device, on_tensor_device, shares_memory,
                       side_stream, version)
from ._gluon import HAS_GLUON
from .grid import is_flag, is_integer
from .packing import pack_int4, unpack_int4
from . import autotune_cache
from .w4a16_mma import _w4a16_mma_kernel
from .w4a16_wgmma import _w4a16_wgmma_kernel

# ----------------------------------------------------------------------------------------------
# Autotune space (the only place launch configurations are stated)
# ----------------------------------------------------------------------------------------------
# Batch sizes and the paths that compete for them (the autotuner times every candidate of each):
#   M == 1                  gemv + the splitk configs with SWAP_AB (tensor cores at batch 1) + mma
#   2 <= M <= MMA_MAX_M     splitk + mma
#   MMA_MAX_M < M <= SPLITK_MAX_M   splitk + wgmma
#   SPLITK_MAX_M < M < DQMM_MIN_M   gemm + wgmma
#   M >= DQMM_MIN_M         gemm + dqmm + wgmma
# (mma and wgmma where they can run: 16-bit activations, static groups; wgmma on sm_90 only)
SPLITK_MAX_M = 64
DQMM_MIN_M = 256
MMA_MAX_M = 16  # (the mma path competes up to here: beyond, each 16 rows dequantize again)
# Act-order weights (a permuted g_idx whose groups, sorted, are runs of group_size: GPTQ's
# act-order with dynamic groups) are run as static groups: the codes' rows sorted by group once
# (a copy of the packed codes, K N / 2 bytes, kept while the weights live) and each call's
# activations gathered in the same order (one small gather), so every fast path applies where
# the gather paths read a scale and zero point per row and code. False: the gather paths.
ACT_ORDER_REPACK = True
_SORT_CHUNK_COLUMNS = 2048  # (the sort unpacks this many columns of codes at a time, as int32)
_SORT_LOCK = threading.Lock()
MMA_DTYPES = (torch.float16, torch.bfloat16)
# A dqmm buffer never holds more than this many bytes of dequantized weight: the workspace, one
# buffer or two (STREAMS = 2), at most 128 MiB per device, stream, dtype and thread, whatever
# the model.
DQMM_MAX_CHUNK_BYTES = 64 << 20


def _product(**axes):
    configs = [{}]
    for name, values in axes.items():
        configs = [dict(c, **{name: v}) for c in configs for v in values]
    return configs


AUTOTUNE_SPACE = {
    # GEMV (20 configs, and 11 HALF2 ones for 16-bit activations). Bytes in flight per program:
    # (1 + PREFETCH) tiles of BLOCK_K / 8 x BLOCK_N words (BLOCK_N = 64: 4 KB a tile, 128: 8 KB).
    # Programs: N / BLOCK_N x SPLIT_K; at 4096 x 4096 with BLOCK_N = 64 and SPLIT_K = 8 that is
    # 512 (about 4 per SM on 132 SMs), 12 KB in flight each: the tens of KB per SM that 4 TB/s
    # needs (latency ~ 0.7 us x 32 GB/s per SM).
    # Compiled for sm_90 (benchmarks/compile_report.py): 4 warps, BLOCK_N = 64: ~95 registers,
    # 5 programs per SM; BLOCK_N = 128: ~170 (3 per SM), with 8 warps ~100 (2 per SM); no spills.
    # SPLIT_K = 32 at K = 4096 makes each slice one group of 128 (scale applied once). BLOCK_K
    # = 256 spans two groups of 128 and is only kept for wider groups and per channel. (On an
    # H200, 2026-12-04, every per-channel shape took BLOCK_K = 256 with 4 slices, the space's
    # edge; 256 x 2 slices and 512 x 2 or 4 slices (8 warps) were tried and never picked.)
    "gemv": (
        _product(BLOCK_N=[64], BLOCK_K=[128], SPLIT_K=[4, 8, 16, 32], PREFETCH=[2],
                 num_warps=[4], num_stages=[1])
        + _product(BLOCK_N=[128], BLOCK_K=[128], SPLIT_K=[2, 4, 8, 16, 32], PREFETCH=[2],
                   num_warps=[4], num_stages=[1])
        + _product(BLOCK_N=[128], BLOCK_K=[128], SPLIT_K=[4, 8, 16], PREFETCH=[2],
                   num_warps=[8], num_stages=[1])
        + _product(BLOCK_N=[32], BLOCK_K=[128], SPLIT_K=[8, 16], PREFETCH=[2],
                   num_warps=[2], num_stages=[1])
        + _product(BLOCK_N=[64, 128], BLOCK_K=[128], SPLIT_K=[8, 16], PREFETCH=[1],
                   num_warps=[4], num_stages=[1])
        + _product(BLOCK_N=[64], BLOCK_K=[256], SPLIT_K=[4, 8], PREFETCH=[1],
                   num_warps=[4], num_stages=[1])
        # HALF2 (fp16 and bf16 activations; 11 configs): two codes per instruction (_half2_word_sums).
        # Compiled for sm_90, 26-33 instructions per packed word in the loop against 43-48, and
        # 63-96 registers against 80-167 (benchmarks/compile_report.py); 128 x 128 with 4 warps
        # spilled in one-group slices, so 128 columns take 8 warps.
        + _product(BLOCK_N=[64], BLOCK_K=[128], SPLIT_K=[4, 8, 16, 32], PREFETCH=[2],
                   num_warps=[4], num_stages=[1], HALF2=[True])
        + _product(BLOCK_N=[32], BLOCK_K=[128], SPLIT_K=[8, 16], PREFETCH=[2],
                   num_warps=[2], num_stages=[1], HALF2=[True])
        + _product(BLOCK_N=[64], BLOCK_K=[256], SPLIT_K=[4, 8], PREFETCH=[1],
                   num_warps=[4], num_stages=[1], HALF2=[True])
        + _product(BLOCK_N=[128], BLOCK_K=[128], SPLIT_K=[4, 8, 16], PREFETCH=[2],
                   num_warps=[8], num_stages=[1], HALF2=[True])
    ),
    # Split-K GEMM for small M (18 configs); BLOCK_M follows M (16, 32 or 64, not tuned). The
    # SWAP_AB configs (weight as the wgmma A operand, batch as its N) also compete at M = 1.
    # SCALE_AFTER: the tile's dot runs on q - z and the fp32 result is scaled (BLOCK_M x BLOCK_N
    # FFMAs instead of BLOCK_K x BLOCK_N multiplies), at the price of waiting for each tile's
    # dot; with tiles of one group only.
    "splitk": (
        _product(BLOCK_N=[64, 128], BLOCK_K=[128], SPLIT_K=[2, 4, 8, 16], GROUP_M=[1],
                 PAIRS=[True], SWAP_AB=[True], SCALE_AFTER=[False], num_warps=[4],
                 num_stages=[3])
        + _product(BLOCK_N=[64, 128], BLOCK_K=[128], SPLIT_K=[4, 8], GROUP_M=[1],
                   PAIRS=[True], SWAP_AB=[True], SCALE_AFTER=[True], num_warps=[4],
                   num_stages=[3])
        + _product(BLOCK_N=[64], BLOCK_K=[128], SPLIT_K=[1, 4, 8], GROUP_M=[1],
                   PAIRS=[True], SWAP_AB=[False], SCALE_AFTER=[False], num_warps=[4],
                   num_stages=[3])
        + _product(BLOCK_N=[64], BLOCK_K=[128], SPLIT_K=[4, 8], GROUP_M=[1],
                   PAIRS=[False], SWAP_AB=[False], SCALE_AFTER=[False], num_warps=[4],
                   num_stages=[3])
        + _product(BLOCK_N=[64], BLOCK_K=[64], SPLIT_K=[8], GROUP_M=[1],
                   PAIRS=[False], SWAP_AB=[False], SCALE_AFTER=[False], num_warps=[4],
                   num_stages=[4])
    ),
    # GEMM for large M (11 configs): the shapes that do well for fp16 matmul on Hopper. Each
    # weight tile is dequantized once per BLOCK_M rows of x, so large BLOCK_M (and two
    # warpgroups sharing one dequantized tile) matter more here than for a plain GEMM.
    "gemm": [
        dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, GROUP_M=8, PAIRS=False,
             SWAP_AB=swap, SCALE_AFTER=False, num_warps=w, num_stages=st)
        for bm, bn, bk, w, st, swap in [
            (128, 128, 64, 8, 3, False), (128, 128, 64, 4, 4, False), (128, 256, 64, 8, 3, False),
            (256, 128, 64, 8, 3, False), (128, 128, 128, 8, 3, False), (64, 128, 64, 4, 4, False),
            (128, 64, 64, 4, 4, False), (64, 64, 64, 4, 4, False), (256, 128, 128, 8, 2, False),
            (128, 128, 64, 8, 3, True), (256, 128, 64, 8, 3, True),
        ]
    ],
    # Tensor cores with the weight dequantized in the registers of the MMA operand (Gluon,
    # :mod:`epmq_kernels.w4a16_mma`; 24 configs; fp16/bf16 activations, M <= MMA_MAX_M): a
    # program owns 64 num_warps columns, steps over KR tiles of 32 inputs and flushes its
    # group's partial product every UNROLL steps; PREFETCH loads each step's words and
    # activations one step ahead (a tile of 128 inputs: 32 words a thread in flight while it
    # computes on 32 more). BLOCK_M (8 or 16) follows M. At 4096 x 4096 with 4 warps and
    # SPLIT_K = 32 that is 16 x 32 = 512 programs (~4 per SM).
    "mma": (_product(KR=[1], UNROLL=[4], SPLIT_K=[4, 8, 16, 32], num_warps=[1, 2, 4],
                     PREFETCH=[False])
            + _product(KR=[4], UNROLL=[1], SPLIT_K=[4, 8, 16, 32], num_warps=[1, 2, 4],
                       PREFETCH=[True])),
    # Hopper's warpgroup MMA with the weight dequantized in the registers of its A operand (Gluon,
    # :mod:`epmq_kernels.w4a16_wgmma`; 6 configs; fp16/bf16 activations, M > MMA_MAX_M, compute
    # capability 9.0): a program owns BLOCK_N = 16 num_warps J columns and BLOCK_M rows of the
    # batch over a K slice, in steps of 32 KR inputs, each step's activations and packed words
    # copied into one of STAGES shared buffers STAGES - 1 steps ahead (a pass of STAGES steps
    # unrolled). Compiled for sm_90 (fp16, g128; BLOCK_N x BLOCK_M: registers, instructions a
    # step, shared memory; benchmarks/compile_report.py, 2026-12-05): 128 x 128, 220, 129 and
    # 40 KB; 256 x 128 (8 warps), 211, 126 and 48 KB; 128 x 64 (KR 2), 214, 233 and 48 KB;
    # 256 x 64, 254, 202 and 32 KB; 64 x 256, 216, 111 and 68 KB; 128 x 64, 146, 129 and 24 KB;
    # none spills (128 x 128 with KR 2 did, with 3 stages and 4, and left) and none has its MMAs
    # serialized by ptxas (C7513). bf16 activations: 140 instructions a step at 256 x 128 (8
    # warps), and 168 at 128 x 128 with fp16 scales (a GPTQ checkpoint on a bf16 model; 239
    # through fp32 before each scale was split into two bf16 parts), against fp16's 129.
    "wgmma": [dict(BLOCK_M=bm, KR=kr, J=j, num_warps=w, STAGES=st)
              for bm, kr, j, w, st in [(128, 1, 2, 4, 4), (128, 1, 2, 8, 4), (64, 2, 2, 4, 4),
                                       (64, 1, 4, 4, 4), (256, 1, 1, 4, 4), (64, 1, 2, 4, 4)]],
    # Dequantize CHUNK_K rows, or CHUNK_N columns, of the weight at a time (tiles of 8 BLOCK_R
    # rows x BLOCK_N columns) + cuBLAS (8 configs). STREAMS = 2: the next chunk dequantized on a
    # side stream (two buffers) while cuBLAS multiplies by this one; on an H200 (2026-12-04)
    # dqmm paid ~46 us of dequantization in series with 8192 x 8192 at M = 1024 (0.76x cuBLAS),
    # which overlap may hide. Column slabs (CHUNK_N) write each output slab once, by a product
    # over all of K: no read-modify-write of y per chunk (K chunks after the first are
    # ``addmm_``: 4 M N bytes more each, y read and written in 16 bits, 96 MiB at 8192 x 8192,
    # M = 1024, four chunks), one rounding; fewer output tiles a product, so they are for
    # large M.
    "dqmm": (_product(CHUNK_K=[1024, 2048], BLOCK_R=[16], BLOCK_N=[128], num_warps=[4],
                      STREAMS=[1, 2])
             + _product(CHUNK_N=[2048, 4096], BLOCK_R=[16], BLOCK_N=[128], num_warps=[4],
                        STREAMS=[1, 2])),
}

# Under TRITON_INTERPRET (CPU) nothing is timed: one small config per path, with SPLIT_K = 2 so
# the split-K reduction is exercised too.
INTERPRETER_CONFIG = {
    "gemv": dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, PREFETCH=2, num_warps=4, num_stages=1),
    "splitk": dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, GROUP_M=1, PAIRS=True,
                   SWAP_AB=False, SCALE_AFTER=True, num_warps=4, num_stages=1),
    "gemm": dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1, GROUP_M=2, PAIRS=False,
                 SWAP_AB=True, SCALE_AFTER=False, num_warps=4, num_stages=1),
    "dqmm": dict(CHUNK_K=64, BLOCK_R=4, BLOCK_N=32, num_warps=4),
    "mma": dict(KR=1, UNROLL=2, SPLIT_K=2, num_warps=1, PREFETCH=True),
    "wgmma": dict(BLOCK_M=16, KR=1, J=2, num_warps=1, STAGES=3, SPLIT_K=2),
}

PATHS = ("gemv", "splitk", "gemm", "dqmm", "mma", "wgmma")
# Options a path's configs may leave out (its launch takes a default). With the options of its
# configs above, they are what a forced config may name; those all its configs have, less
# these, what it must name (dqmm: CHUNK_K or CHUNK_N too).
_OPTIONAL = {"gemv": ("HALF2",), "splitk": ("BLOCK_M", "PAIRS", "SWAP_AB", "SCALE_AFTER"),
             "gemm": ("PAIRS", "SWAP_AB", "SCALE_AFTER"), "mma": ("BLOCK_M", "PREFETCH"),
             "wgmma": ("SPLIT_K",), "dqmm": ("CHUNK_K", "CHUNK_N", "STREAMS")}
# Activations the GEMV's HALF2 option takes (bf16 ones converted to fp16 pairs, exactly, per row)
HALF2_DTYPES = (torch.float16, torch.bfloat16)
# The autotuner keeps a config only if its result on the tuning call is within this fraction of
# the largest output of the float32 dequantized product (16-bit rounding is ~1e-3 of it)
VERIFY_TOLERANCE = 2e-2


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
def _codes_minus_zero(b, z, CDT: tl.constexpr, WIDE_ZEROS: tl.constexpr):
    """``q - z`` in CDT from the biased codes ``b = 2^e + q`` of :func:`_biased_float`.

    ``b - (2^e + z)`` is exact while ``2^e + z`` is, for zero points up to 2^e: 128 in bf16,
    whose odd zero points from 129 rounded to an even neighbour (``q - z`` a grid step off for
    a whole group), 1024 in fp16. ``WIDE_ZEROS`` (zero points outside the 4-bit grid) forms
    ``q - z`` in fp32 and rounds it once to CDT: exact up to ``|q - z|`` of 256 (bf16), 2048
    (fp16)."""
    if WIDE_ZEROS and CDT != tl.float32:
        bias = 1024.0 if CDT == tl.float16 else 128.0
        out = (b.to(tl.float32) - (z.to(tl.float32) + bias)).to(CDT)
    else:
        out = b - _biased_zero(z, CDT)
    return out


@triton.jit
def _exponents(opaque_zero):
    """The fp32 exponent patterns of ``_code_exact`` / ``_code_b128`` as run-time values.

    ``opaque_zero`` is a kernel argument that is always 0: the compiler cannot fold the
    patterns into immediates, so ``(w & mask) | pattern`` is one LOP3 (mask immediate, pattern
    register) instead of an AND and an OR with two immediates.
    """
    e0 = opaque_zero + 0x4B000000  # 2^23: code at bits 0..3
    e1 = opaque_zero + 0x49000000  # 2^19: bits 4..7
    e2 = opaque_zero + 0x47000000  # 2^15: bits 8..11
    e3 = opaque_zero + 0x45000000  # 2^11: bits 12..15
    e4 = opaque_zero + 0x43000000  # 2^7:  bits 16..19
    return e0, e1, e2, e3, e4


@triton.jit
def _code_exact(words, J: tl.constexpr, e):
    """Code J of each word (bits 4J..4J+3) as an exact fp32, with no int->float conversion.

    The word is masked and given the exponent ``e`` that makes bit 4J worth 1: the float is then
    2^(23-4J) + code (one LOP3 and one FADD). That needs the code below the exponent field (bit
    23), so codes 4..7 are first shifted to bits 16..19 (``e`` is then the 2^7 pattern).
    """
    if J < 4:
        out = ((words & (0xF << (4 * J))) | e).to(tl.float32, bitcast=True) - (1 << (23 - 4 * J))
    else:
        out = (((words >> (4 * (J - 4))) & 0xF0000) | e).to(tl.float32, bitcast=True) - 128.0
    return out


@triton.jit
def _code_b128(words, J: tl.constexpr, e4):
    """``128 + code`` for J >= 4 (shift, LOP3, no FADD): exact, the bias is removed per row."""
    return (((words >> (4 * (J - 4))) & 0xF0000) | e4).to(tl.float32, bitcast=True)


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
def _unpack_pairs_t(words, opaque_zero, CDT: tl.constexpr):
    """Packed words ``[BLOCK_R, BLOCK_N]`` -> biased 16-bit floats ``2^e + q`` (1024 + q in fp16,
    128 + q in bf16) ``[BLOCK_N, 8 BLOCK_R]``, two codes per 32-bit operation.

    ``((w >> 4i) & 0x000F000F) | magic`` holds codes i (low half) and i + 4 (high half) of a
    word as two 16-bit floats; one shift and one LOP3 (``magic`` is a register, see
    :func:`_exponents`) make two of them. Column ``8 r + 2 i + b`` holds code ``i + 4 (1 - b)`` of
    word r: the order (4, 0, 5, 1, 6, 2, 7, 3) within a word, which the caller applies to x too.
    (High half first: compiled for sm_90 that pairing needs fewer half-swapping PRMTs than
    low half first on the group-128 paths.)
    """
    w = tl.trans(words)
    BLOCK_N: tl.constexpr = w.shape[0]
    BLOCK_R: tl.constexpr = w.shape[1]
    if CDT == tl.float16:
        magic = opaque_zero + 0x64006400
    else:
        magic = opaque_zero + 0x43004300
    v0 = (w & 0x000F000F) | magic
    v1 = ((w >> 4) & 0x000F000F) | magic
    v2 = ((w >> 8) & 0x000F000F) | magic
    v3 = ((w >> 12) & 0x000F000F) | magic
    # column 4 r + i holds v_i (join: the last join picks the lowest index bit)
    v = tl.reshape(tl.join(tl.join(v0, v2), tl.join(v1, v3)), (BLOCK_N, 4 * BLOCK_R))
    lo = v.to(tl.int16).to(CDT, bitcast=True)
    hi = (v >> 16).to(tl.int16).to(CDT, bitcast=True)
    return tl.reshape(tl.join(hi, lo), (BLOCK_N, 8 * BLOCK_R))


@triton.jit
def _half2_word_sums(words, zpair, zq, xp0, xp1, xp2, xp3, ASM: tl.constexpr):
    """``sum_j (q_j - z) x_j`` over the 8 codes of each word, in fp16 pairs: two codes per
    instruction (the GEMV's HALF2 option, fp16 activations or bf16 ones taken as fp16).

    ``w & 0x000F000F | 0x6400_6400`` is the fp16 pair ``(1024 + q_0, 1024 + q_4)``; less
    ``zpair = (1024 + z, 1024 + z)`` it is ``(q_0 - z, q_4 - z)`` exactly. The next pair needs
    no shift: ``w & 0x00F000F0 | 0x6400_6400`` is ``(1024 + 16 q_1, 1024 + 16 q_5)``, and one
    fused multiply-add by 1/16 with ``zq = (-(64 + z), -(64 + z))`` makes it ``(q_1 - z,
    q_5 - z)`` exactly (the trick Marlin's dequantization uses); ``w >> 8`` gives codes 2, 6
    and 3, 7 the same way. The four pairs are multiplied by the activation pairs ``xp_i = (x_i,
    x_{i+4})`` and summed in fp16 (one rounding per fused multiply-add), the two halves added in
    fp16 and the result returned in fp32: per word one shift, 4 LOP3, 2 HSUB2, 6 HFMA2 (2 of
    them dequantizing), one HADD2 and one conversion (2026-12-05; 3 shifts and 4 HSUB2 before),
    against about twice that with one fp32 code at a time. Each product and partial sum rounds
    to fp16's 11 bits: up to 2^-10 of the word's sum of |terms| (an emulation of this PTX), at
    8192 inputs an rms of 3.6e-4 of the output, 1.3 times an fp16 output's own rounding. The
    caller scales rows with large activations so that no sum overflows fp16 (``_x_pairs``).

    ``ASM``: the inline PTX (compiled); else the same sums in Triton's fp16 arithmetic (the
    interpreter, which runs no PTX; it rounds a product and its sum separately), the odd codes
    dequantized through ``zq`` as the PTX does."""
    if ASM:
        out = tl.inline_asm_elementwise(
            asm="""
            {
            .reg .b32 v, t, s, m, c;
            .reg .f16 lo, hi, h;
            mov.b32 m, 0x64006400;
            mov.b32 c, 0x2C002C00;
            lop3.b32 v, $1, 0x000F000F, m, 0xEA;
            sub.rn.f16x2 v, v, $2;
            mul.rn.f16x2 s, v, $4;
            lop3.b32 v, $1, 0x00F000F0, m, 0xEA;
            fma.rn.f16x2 v, v, c, $3;
            fma.rn.f16x2 s, v, $5, s;
            shr.u32 t, $1, 8;
            lop3.b32 v, t, 0x000F000F, m, 0xEA;
            sub.rn.f16x2 v, v, $2;
            fma.rn.f16x2 s, v, $6, s;
            lop3.b32 v, t, 0x00F000F0, m, 0xEA;
            fma.rn.f16x2 v, v, c, $3;
            fma.rn.f16x2 s, v, $7, s;
            mov.b32 {lo, hi}, s;
            add.rn.f16 h, lo, hi;
            cvt.f32.f16 $0, h;
            }
            """,
            constraints="=r,r,r,r,r,r,r,r",
            args=[words, zpair, zq, xp0, xp1, xp2, xp3],
            dtype=tl.float32, is_pure=True, pack=1)
    else:
        z = (zpair & 0xFFFF) - 0x6400
        s_lo = _half(words & 0xF, z, xp0, 0)
        s_hi = _half((words >> 16) & 0xF, z, xp0, 16)
        s_lo = s_lo + _half_by_16(words & 0xF0, zq, xp1, 0)
        s_hi = s_hi + _half_by_16((words >> 16) & 0xF0, zq, xp1, 16)
        s_lo = s_lo + _half((words >> 8) & 0xF, z, xp2, 0)
        s_hi = s_hi + _half((words >> 24) & 0xF, z, xp2, 16)
        s_lo = s_lo + _half_by_16((words >> 8) & 0xF0, zq, xp3, 0)
        s_hi = s_hi + _half_by_16((words >> 24) & 0xF0, zq, xp3, 16)
        out = (s_lo + s_hi).to(tl.float32)
    return out


@triton.jit
def _half_by_16(q16, zq, xp, SHIFT: tl.constexpr):
    """``(q - z) x`` in fp16 from ``q16 = 16 q``: ``(1024 + 16 q) / 16 + zq`` with ``zq = -(64 +
    z)``, the fp16 at bits SHIFT..SHIFT+15 of the pair ``zq`` (as the PTX dequantizes)."""
    v = ((1024 + q16).to(tl.float16) * 0.0625 + _half_at(zq, SHIFT)).to(tl.float16)  # (exact)
    return v * _half_at(xp, SHIFT)


@triton.jit
def _half(q, z, xp, SHIFT: tl.constexpr):
    """``(q - z) x`` in fp16, x the fp16 at bits SHIFT..SHIFT+15 of the pair ``xp``."""
    return (q - z).to(tl.float16) * _half_at(xp, SHIFT)


@triton.jit
def _half_at(pair, SHIFT: tl.constexpr):
    """The fp16 at bits SHIFT..SHIFT+15 of the int32 word ``pair``."""
    return ((pair >> SHIFT) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _x_pairs(x_row, rows, r_mask, ASM: tl.constexpr):
    """The fp16 activation pairs ``(x_i, x_{i+4})`` of each packed row, as int32 words (low half
    first), from the row's 8 activations read as four words (x contiguous along K, 16-byte
    aligned: the launcher checks), and the row's fp32 factor ``f``.

    fp16 holds up to 65504: a word's sum ``sum_j (q_j - z) x_j`` can pass it from |x| ~ 550 on
    (an LLM's "massive activations" reach thousands). A row whose largest |x| is above 256 is
    taken at 2^-8 (exact, a power of two), ``f = 256``, else ``f = 1``: a word's sum then stays
    within 8 x 15 x 256 < 65504 for any finite fp16 x. (In such a row its small activations
    lose bits below 2^-6, negligible next to the large one.)"""
    # (two 8-byte loads a row, not four of 4: a [rows, 4] load split in registers went through
    # shared memory, with barriers, in some tilings)
    xd = (x_row + rows * 8).to(tl.pointer_type(tl.int64), bitcast=True)
    xa = tl.load(xd, mask=r_mask, other=0)
    xb = tl.load(xd + 1, mask=r_mask, other=0)
    x01, x23 = xa.to(tl.int32), (xa >> 32).to(tl.int32)
    x45, x67 = xb.to(tl.int32), (xb >> 32).to(tl.int32)
    if x_row.dtype.element_ty == tl.bfloat16:
        xp0, xp1, xp2, xp3, f = _bf16_x_pairs(x01, x23, x45, x67, ASM)
    elif ASM:
        xp0, xp1, xp2, xp3, f = tl.inline_asm_elementwise(
            asm="""
            {
            .reg .b32 a, b, c, d, m;
            .reg .b16 lo, hi, mm, big;
            .reg .pred p;
            and.b32 a, $5, 0x7FFF7FFF;
            and.b32 b, $6, 0x7FFF7FFF;
            and.b32 c, $7, 0x7FFF7FFF;
            and.b32 d, $8, 0x7FFF7FFF;
            max.f16x2 a, a, b;
            max.f16x2 c, c, d;
            max.f16x2 a, a, c;
            mov.b32 {lo, hi}, a;
            max.f16 mm, lo, hi;
            mov.b16 big, 0x5C00;
            setp.gt.f16 p, mm, big;
            selp.b32 m, 0x1C001C00, 0x3C003C00, p;
            selp.f32 $4, 0f43800000, 0f3F800000, p;
            prmt.b32 a, $5, $7, 0x5410;
            mul.rn.f16x2 $0, a, m;
            prmt.b32 a, $5, $7, 0x7632;
            mul.rn.f16x2 $1, a, m;
            prmt.b32 a, $6, $8, 0x5410;
            mul.rn.f16x2 $2, a, m;
            prmt.b32 a, $6, $8, 0x7632;
            mul.rn.f16x2 $3, a, m;
            }
            """,
            constraints="=r,=r,=r,=r,=f,r,r,r,r",
            args=[x01, x23, x45, x67],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32, tl.float32), is_pure=True, pack=1)
    else:
        big = (tl.maximum(tl.maximum(tl.maximum(_abs_bits(x01, 0), _abs_bits(x01, 16)),
                                     tl.maximum(_abs_bits(x23, 0), _abs_bits(x23, 16))),
                          tl.maximum(tl.maximum(_abs_bits(x45, 0), _abs_bits(x45, 16)),
                                     tl.maximum(_abs_bits(x67, 0), _abs_bits(x67, 16))))
               > 0x5C00)
        scale = tl.where(big, 0.00390625, 1.0).to(tl.float16)
        f = tl.where(big, 256.0, 1.0)
        xp0 = _scaled_pair(x01 & 0xFFFF, x45 & 0xFFFF, scale)
        xp1 = _scaled_pair((x01 >> 16) & 0xFFFF, (x45 >> 16) & 0xFFFF, scale)
        xp2 = _scaled_pair(x23 & 0xFFFF, x67 & 0xFFFF, scale)
        xp3 = _scaled_pair((x23 >> 16) & 0xFFFF, (x67 >> 16) & 0xFFFF, scale)
    return xp0[:, None], xp1[:, None], xp2[:, None], xp3[:, None], f[:, None]


@triton.jit
def _bf16_x_pairs(x01, x23, x45, x67, ASM: tl.constexpr):
    """``_x_pairs`` for bf16 activations (four words of two): the fp16 pairs ``(x_i, x_{i+4})``
    of the row's 8 activations taken at ``2^-k`` and the row's fp32 factor ``f = 2^k``, with
    ``2^-k`` the power of two that brings the largest |x| into [128, 256) (as for fp16 rows:
    no word's fp16 sum overflows; ``k`` >= -64, so only rows below 2^-57 stay below). bf16
    keeps 8 significant bits, fp16 11, so the scaled values are exact in fp16 down to 2^-24 of
    the row's largest (2^-17 absolute; smaller ones lose bits as fp16 subnormals); a bf16 row
    can be as large as 3e38 or as small as 1e-38, hence ``k`` from the exponent, not fp16's
    fixed 1 or 2^-8. NaN or inf stays NaN or inf.

    ``ASM``: in PTX, each pair one ``cvt.rn.f16x2.f32`` of two scaled fp32 values (about 35
    instructions a packed row against ~55 compiled from the Triton form below, which the
    interpreter runs)."""
    if ASM:
        return tl.inline_asm_elementwise(
            asm="""
            {
            .reg .b32 a, b, c, d, e, t;
            .reg .b16 lo, hi, mm;
            .reg .f32 s, fa, fb;
            and.b32 a, $5, 0x7FFF7FFF;
            and.b32 b, $6, 0x7FFF7FFF;
            and.b32 c, $7, 0x7FFF7FFF;
            and.b32 d, $8, 0x7FFF7FFF;
            max.bf16x2 a, a, b;
            max.bf16x2 c, c, d;
            max.bf16x2 a, a, c;
            mov.b32 {lo, hi}, a;
            max.bf16 mm, lo, hi;
            cvt.u32.u16 e, mm;
            shr.u32 e, e, 7;
            sub.s32 e, e, 134;
            max.s32 e, e, -64;
            sub.s32 t, 127, e;
            shl.b32 t, t, 23;
            mov.b32 s, t;
            add.s32 t, e, 127;
            shl.b32 t, t, 23;
            mov.b32 $4, t;
            shl.b32 a, $5, 16;
            shl.b32 b, $7, 16;
            mul.rn.f32 fa, a, s;
            mul.rn.f32 fb, b, s;
            cvt.rn.f16x2.f32 $0, fb, fa;
            and.b32 a, $5, 0xFFFF0000;
            and.b32 b, $7, 0xFFFF0000;
            mul.rn.f32 fa, a, s;
            mul.rn.f32 fb, b, s;
            cvt.rn.f16x2.f32 $1, fb, fa;
            shl.b32 a, $6, 16;
            shl.b32 b, $8, 16;
            mul.rn.f32 fa, a, s;
            mul.rn.f32 fb, b, s;
            cvt.rn.f16x2.f32 $2, fb, fa;
            and.b32 a, $6, 0xFFFF0000;
            and.b32 b, $8, 0xFFFF0000;
            mul.rn.f32 fa, a, s;
            mul.rn.f32 fb, b, s;
            cvt.rn.f16x2.f32 $3, fb, fa;
            }
            """,
            constraints="=r,=r,=r,=r,=f,r,r,r,r",
            args=[x01, x23, x45, x67],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32, tl.float32), is_pure=True, pack=1)
    # |x| bits (bf16 is the upper half of an fp32, ordered as |x| as integers, NaN above inf)
    m = tl.maximum(tl.maximum(tl.maximum(x01 & 0x7FFF, (x01 >> 16) & 0x7FFF),
                              tl.maximum(x23 & 0x7FFF, (x23 >> 16) & 0x7FFF)),
                   tl.maximum(tl.maximum(x45 & 0x7FFF, (x45 >> 16) & 0x7FFF),
                              tl.maximum(x67 & 0x7FFF, (x67 >> 16) & 0x7FFF)))
    # largest |x| in [2^(e - 127), 2^(e - 126)) for its biased exponent e: at 2^-k with
    # k = e - 134 it is in [2^7, 2^8)
    k = tl.maximum((m >> 7) - 134, -64)
    scale = ((127 - k) << 23).to(tl.float32, bitcast=True)
    f = ((127 + k) << 23).to(tl.float32, bitcast=True)
    xp0 = _bf16_pair(x01 << 16, x45 << 16, scale)
    xp1 = _bf16_pair((x01 >> 16) << 16, (x45 >> 16) << 16, scale)
    xp2 = _bf16_pair(x23 << 16, x67 << 16, scale)
    xp3 = _bf16_pair((x23 >> 16) << 16, (x67 >> 16) << 16, scale)
    return xp0, xp1, xp2, xp3, f


@triton.jit
def _bf16_pair(lo_bits, hi_bits, scale):
    """The fp16 pair ``(lo * scale, hi * scale)`` of two fp32 bit patterns (bf16 values), as an
    int32 word."""
    return _pack_halves((lo_bits.to(tl.float32, bitcast=True) * scale).to(tl.float16),
                        (hi_bits.to(tl.float32, bitcast=True) * scale).to(tl.float16))


@triton.jit
def _pack_halves(lo, hi):
    """Two fp16 tensors as the int32 words of their pairs, ``lo`` in the low half."""
    lo, hi = lo.to(tl.int16, bitcast=True), hi.to(tl.int16, bitcast=True)
    return (lo.to(tl.int32) & 0xFFFF) | (hi.to(tl.int32) << 16)


@triton.jit
def _abs_bits(word, SHIFT: tl.constexpr):
    """The bits of |x| for the fp16 x at bits SHIFT..SHIFT+15 of ``word`` (ordered as |x|)."""
    return (word >> SHIFT) & 0x7FFF


@triton.jit
def _scaled_pair(lo_bits, hi_bits, scale):
    """The fp16 pair ``(lo * scale, hi * scale)`` of two fp16 bit patterns, as an int32 word."""
    return _pack_halves(lo_bits.to(tl.int16).to(tl.float16, bitcast=True) * scale,
                        hi_bits.to(tl.int16).to(tl.float16, bitcast=True) * scale)


@triton.jit
def _zero_pairs(zeros):
    """The fp16 pairs ``(1024 + z, 1024 + z)`` and ``(-(64 + z), -(64 + z))`` of grid zero
    points ``z`` (0..15, a row of columns), as int32 words ``[1, BLOCK_N]`` (``_half2_word_sums``
    takes both)."""
    z = zeros.to(tl.int32)
    zq = (z * 16 + 0xD400).to(tl.uint32)  # (-(64 + z) in fp16: 64's bits, z in ulps of 1/16)
    return ((z + 0x6400) * 0x10001)[None, :], (zq | (zq << 16)).to(tl.int32, bitcast=True)[None, :]


@triton.jit
def _x_at(x_ptr, k, stride_xk, mask):
    """Activations ``x[k]`` in fp32, kept in L2 (every program of the row reads them)."""
    return tl.load(x_ptr + k * stride_xk, mask=mask, other=0.0,
                   eviction_policy="evict_last").to(tl.float32)


@triton.jit
def _row_scale_zero(k, r_mask, mask, offs_n, g_idx_ptr, group_size, scales_ptr, stride_sg,
                    stride_sn, zeros_ptr, stride_zg, stride_zn, HAS_G_IDX: tl.constexpr):
    """fp32 scale and zero point ``[rows, BLOCK_N]`` of the input rows ``k``, gathered row by row
    (their group is ``g_idx[k]``, or ``k // group_size`` for tiles that straddle groups)."""
    if HAS_G_IDX:
        g = tl.load(g_idx_ptr + k, mask=r_mask, other=0)
    else:
        g = k // group_size
    s = tl.load(scales_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=mask,
                other=0.0).to(tl.float32)
    z = tl.load(zeros_ptr + g[:, None] * stride_zg + offs_n[None, :] * stride_zn, mask=mask,
                other=0).to(tl.float32)
    return s, z


@triton.jit
def _pair_order(x, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Columns of ``x [BLOCK_M, BLOCK_K]`` in the order of :func:`_unpack_pairs_t`: column
    ``8 r + 2 i + b`` takes ``x[:, 8 r + i + 4 (1 - b)]`` (a permutation within 16 bytes)."""
    x4 = tl.permute(tl.reshape(x, (BLOCK_M, BLOCK_K // 8, 2, 4)), (0, 1, 3, 2))
    lo, hi = tl.split(x4)  # [BLOCK_M, BLOCK_K / 8, 4]: x[8 r + i], x[8 r + i + 4]
    return tl.reshape(tl.join(hi, lo), (BLOCK_M, BLOCK_K))


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
    M, N, K, group_size, k_per_split, opaque_zero,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_ym, stride_yn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    PREFETCH: tl.constexpr, GATHER: tl.constexpr, HAS_G_IDX: tl.constexpr,
    ONE_GROUP: tl.constexpr, HALF2: tl.constexpr, ASM: tl.constexpr,
):
    """One row of x against a BLOCK_N column slice of W over one K slice, on CUDA cores
    (``HALF2``: 16-bit activations, two codes per instruction, see ``_half2_word_sums``)."""
    BLOCK_R: tl.constexpr = BLOCK_K // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    # (int64: a forced GEMV of several rows whose row offsets, of x, y or the split-K sums, pass
    # 2^31 read and wrote out of bounds; one scalar, outside the loop)
    pid_m = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    x_row = x_ptr + pid_m * stride_xm
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    e0, e1, e2, e3, e4 = _exponents(opaque_zero)
    # Partial sums per packed row, reduced across threads once after the loop.
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    if ONE_GROUP:
        # The whole K slice lies in one group: its scale and zero point are applied after the
        # loop, with the sums of x (xs) and of the bias 128 of codes 4..7 (xb) kept per row.
        g = k_start // group_size
        one_mask = n_mask & (k_start < k_end)  # a forced SPLIT_K may leave a slice empty
        s_one = tl.load(scales_ptr + g * stride_sg + offs_n * stride_sn, mask=one_mask,
                        other=0.0).to(tl.float32)
        z_one = tl.load(zeros_ptr + g * stride_zg + offs_n * stride_zn, mask=one_mask,
                        other=0).to(tl.float32)
        xs_acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        xb_acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        if HALF2:
            zp_one, zq_one = _zero_pairs(tl.load(zeros_ptr + g * stride_zg + offs_n * stride_zn,
                                                 mask=one_mask, other=0))
    # Software prefetch: the words of the next PREFETCH tiles are requested before the current
    # tile is unpacked, so every warp keeps (1 + PREFETCH) tiles of weight traffic in flight
    # (loads only block at first use; masked tiles past the slice move no bytes).
    rows = k_start // 8 + tl.arange(0, BLOCK_R)
    word_ptrs = qweight_ptr + rows[:, None] * stride_qk + offs_n[None, :] * stride_qn
    tile_step = BLOCK_R * stride_qk
    next_words = tl.load(word_ptrs, mask=(rows * 8 < k_end)[:, None] & n_mask[None, :], other=0,
                         eviction_policy="evict_first")
    if PREFETCH >= 2:
        next_words2 = tl.load(word_ptrs + tile_step,
                              mask=((rows + BLOCK_R) * 8 < k_end)[:, None] & n_mask[None, :],
                              other=0, eviction_policy="evict_first")
    # The group of the current tile, counted along (tiles lie in one group off the gather path:
    # no integer division per tile, about 2.5 instructions per word at 8 words a thread)
    g_tile = k_start // group_size
    t_in_group = (k_start % group_size) // BLOCK_K
    tiles_per_group = group_size // BLOCK_K
    for k0 in range(k_start, k_end, BLOCK_K):
        rows = k0 // 8 + tl.arange(0, BLOCK_R)
        r_mask = rows * 8 < k_end
        words = next_words
        if PREFETCH >= 2:
            next_words = next_words2
            next_words2 = tl.load(word_ptrs + 2 * tile_step,
                                  mask=((rows + 2 * BLOCK_R) * 8 < k_end)[:, None]
                                  & n_mask[None, :], other=0, eviction_policy="evict_first")
        else:
            next_words = tl.load(word_ptrs + tile_step,
                                 mask=((rows + BLOCK_R) * 8 < k_end)[:, None] & n_mask[None, :],
                                 other=0, eviction_policy="evict_first")
        word_ptrs += tile_step
        if GATHER:
            # Per-row groups (act-order g_idx, or tiles that straddle groups): the scale and
            # zero point of every row are gathered, and each code is exact before the product.
            gn_mask = r_mask[:, None] & n_mask[None, :]
            for j in tl.static_range(8):
                k = rows * 8 + j
                s, z = _row_scale_zero(k, r_mask, gn_mask, offs_n, g_idx_ptr, group_size,
                                       scales_ptr, stride_sg, stride_sn, zeros_ptr, stride_zg,
                                       stride_zn, HAS_G_IDX)
                x_j = _x_at(x_row, k, stride_xk, r_mask)
                if j < 4:
                    e = e0 if j == 0 else (e1 if j == 1 else (e2 if j == 2 else e3))
                else:
                    e = e4
                acc += (_code_exact(words, j, e) - z) * s * x_j[:, None]
        elif HALF2:
            xp0, xp1, xp2, xp3, f = _x_pairs(x_row, rows, r_mask, ASM)
            if ONE_GROUP:
                acc += _half2_word_sums(words, zp_one, zq_one, xp0, xp1, xp2, xp3, ASM) * f
            else:
                g = g_tile
                s = tl.load(scales_ptr + g * stride_sg + offs_n * stride_sn, mask=n_mask,
                            other=0.0).to(tl.float32)
                zp, zq = _zero_pairs(tl.load(zeros_ptr + g * stride_zg + offs_n * stride_zn,
                                             mask=n_mask, other=0))
                acc += _half2_word_sums(words, zp, zq, xp0, xp1, xp2, xp3, ASM) * (f * s[None, :])
        else:
            xk = x_row + rows * 8 * stride_xk
            x0 = _x_at(xk, 0, stride_xk, r_mask)
            x1 = _x_at(xk, 1, stride_xk, r_mask)
            x2 = _x_at(xk, 2, stride_xk, r_mask)
            x3 = _x_at(xk, 3, stride_xk, r_mask)
            x4 = _x_at(xk, 4, stride_xk, r_mask)
            x5 = _x_at(xk, 5, stride_xk, r_mask)
            x6 = _x_at(xk, 6, stride_xk, r_mask)
            x7 = _x_at(xk, 7, stride_xk, r_mask)
            # sum_j (q_j - z) x_j = sum_j f_j x_j - z xs - xb, with f_j exact codes (j < 4) or
            # 128 + q_j (j >= 4), xs = sum_j x_j and xb = 128 sum_{j >= 4} x_j: per code one
            # LOP3 (+ FADD for j < 4, + shift for j > 4) and one FFMA.
            xs = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
            xb = ((x4 + x5) + (x6 + x7)) * 128.0
            if ONE_GROUP:
                xs_acc += xs
                xb_acc += xb
                part = acc
            else:
                g = g_tile
                s = tl.load(scales_ptr + g * stride_sg + offs_n * stride_sn, mask=n_mask,
                            other=0.0).to(tl.float32)
                z = tl.load(zeros_ptr + g * stride_zg + offs_n * stride_zn, mask=n_mask,
                            other=0).to(tl.float32)
                # the correction seeds the partial sum, so it costs one FFMA per word
                part = -(xs[:, None] * z[None, :] + xb[:, None])
            part += _code_exact(words, 0, e0) * x0[:, None]
            part += _code_exact(words, 1, e1) * x1[:, None]
            part += _code_exact(words, 2, e2) * x2[:, None]
            part += _code_exact(words, 3, e3) * x3[:, None]
            part += _code_b128(words, 4, e4) * x4[:, None]
            part += _code_b128(words, 5, e4) * x5[:, None]
            part += _code_b128(words, 6, e4) * x6[:, None]
            part += _code_b128(words, 7, e4) * x7[:, None]
            if ONE_GROUP:
                acc = part
            else:
                acc += part * s[None, :]
        if not GATHER and not ONE_GROUP:
            t_in_group += 1
            next_group = t_in_group == tiles_per_group
            g_tile += next_group.to(tl.int32)
            t_in_group = tl.where(next_group, 0, t_in_group)
    y = tl.sum(acc, axis=0)
    if ONE_GROUP:
        if HALF2:
            y = y * s_one
        elif not GATHER:
            y = (y - z_one * tl.sum(xs_acc, axis=0) - tl.sum(xb_acc, axis=0)) * s_one
    _write_output(y, y_ptr + pid_m * stride_ym + offs_n * stride_yn, sums_ptr + pid_m * N + offs_n,
                  n_mask, counters_ptr + pid_m * tl.num_programs(0) + pid_n, SPLIT_K)


@triton.jit
def _w4a16_dot_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, y_ptr, sums_ptr, counters_ptr,
    M, N, K, group_size, k_per_split, opaque_zero,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
    GATHER: tl.constexpr, HAS_G_IDX: tl.constexpr, ONE_GROUP: tl.constexpr,
    PAIRS: tl.constexpr, SWAP_AB: tl.constexpr, SCALE_AFTER: tl.constexpr,
    CDT: tl.constexpr, DOT_PRECISION: tl.constexpr, WIDE_M: tl.constexpr, WIDE_ZEROS: tl.constexpr,
):
    """A BLOCK_M x BLOCK_N tile of y over one K slice, the weight dequantized into ``tl.dot``
    (``WIDE_ZEROS``: zero points outside the 4-bit grid, see :func:`_codes_minus_zero`)."""
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
    if WIDE_M:  # row offsets past 2^31 (a long prefill: N = 28672 from 75k tokens); only then,
        # as 64-bit offsets cost the small-M configs registers and a program per SM on sm_90
        offs_m = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ONE_GROUP:
        g = k_start // group_size
        one_mask = n_mask & (k_start < k_end)  # a forced SPLIT_K may leave a slice empty
        z_one = tl.load(zeros_ptr + g * stride_zg + offs_n * stride_zn, mask=one_mask, other=0)
        zb_one = _biased_zero(z_one, CDT)[:, None]
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
        if PAIRS:
            x = _pair_order(x, BLOCK_M, BLOCK_K)
            b_t = _unpack_pairs_t(words, opaque_zero, CDT)         # [BLOCK_N, BLOCK_K]
            p = tl.arange(0, BLOCK_K)
            offs_kw = k0 + (p // 8) * 8 + (p % 8) // 2 + 4 - 4 * (p % 2)  # K of each column
        else:
            b_t = _biased_float(_unpack_codes_t(words), CDT)        # [BLOCK_N, BLOCK_K]
            offs_kw = offs_k
        if GATHER:
            kw_mask = offs_kw < k_end
            if HAS_G_IDX:
                g = tl.load(g_idx_ptr + offs_kw, mask=kw_mask, other=0)
            else:
                g = offs_kw // group_size
            nk_mask = n_mask[:, None] & kw_mask[None, :]
            s_t = tl.load(scales_ptr + g[None, :] * stride_sg + offs_n[:, None] * stride_sn,
                          mask=nk_mask, other=0.0)
            z_t = tl.load(zeros_ptr + g[None, :] * stride_zg + offs_n[:, None] * stride_zn,
                          mask=nk_mask, other=0)
            w_t = _codes_minus_zero(b_t, z_t, CDT, WIDE_ZEROS) * s_t.to(CDT)
        elif ONE_GROUP:
            # q - z: exact small integers; the scale comes after the loop
            if WIDE_ZEROS:
                w_t = _codes_minus_zero(b_t, z_one[:, None], CDT, WIDE_ZEROS)
            else:
                w_t = b_t - zb_one
        elif SCALE_AFTER:
            g = k0 // group_size
            z_t = tl.load(zeros_ptr + g * stride_zg + offs_n * stride_zn, mask=n_mask,
                          other=0)[:, None]
            w_t = _codes_minus_zero(b_t, z_t, CDT, WIDE_ZEROS)
        else:
            g = k0 // group_size
            s_t = tl.load(scales_ptr + g * stride_sg + offs_n * stride_sn, mask=n_mask,
                          other=0.0)[:, None]
            z_t = tl.load(zeros_ptr + g * stride_zg + offs_n * stride_zn, mask=n_mask,
                          other=0)[:, None]
            w_t = _codes_minus_zero(b_t, z_t, CDT, WIDE_ZEROS) * s_t.to(CDT)
        if SCALE_AFTER and not (GATHER or ONE_GROUP):
            # this tile is one group: scale its fp32 product (BLOCK_M x BLOCK_N multiplies)
            s_g = tl.load(scales_ptr + g * stride_sg + offs_n * stride_sn, mask=n_mask,
                          other=0.0).to(tl.float32)
            if SWAP_AB:
                acc += tl.dot(w_t, tl.trans(x), input_precision=DOT_PRECISION) * s_g[:, None]
            else:
                acc += tl.dot(x, tl.trans(w_t), input_precision=DOT_PRECISION) * s_g[None, :]
        elif SWAP_AB:
            acc = tl.dot(w_t, tl.trans(x), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w_t), acc, input_precision=DOT_PRECISION)
    if ONE_GROUP:
        if not GATHER:
            s_one = tl.load(scales_ptr + (k_start // group_size) * stride_sg + offs_n * stride_sn,
                            mask=one_mask, other=0.0).to(tl.float32)
            if SWAP_AB:
                acc = acc * s_one[:, None]
            else:
                acc = acc * s_one[None, :]
    if SWAP_AB:
        _write_output(acc, y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None] * stride_yn,
                      sums_ptr + offs_m[None, :] * N + offs_n[:, None],
                      m_mask[None, :] & n_mask[:, None], counters_ptr + pid, SPLIT_K)
    else:
        _write_output(acc, y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                      sums_ptr + offs_m[:, None] * N + offs_n[None, :],
                      m_mask[:, None] & n_mask[None, :], counters_ptr + pid, SPLIT_K)


@triton.jit
def _w4a16_dequant_kernel(
    qweight_ptr, scales_ptr, zeros_ptr, g_idx_ptr, w_ptr,
    N, k_first, k_rows, n_first, group_size, opaque_zero,
    stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn, stride_wk, stride_wn,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, GATHER: tl.constexpr,
    HAS_G_IDX: tl.constexpr,
):
    """``w[k - k_first, n - n_first] = (q[k, n] - z[g(k), n]) * s[g(k), n]`` for ``k_first <=
    k < k_first + k_rows`` and ``n_first <= n < N``, in w's dtype: the chunk of the dqmm path
    (memory bound: reads K N / 2 bytes of codes once, writes the chunk once; one rounding, from
    the exact fp32 product)."""
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    w_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = n_first + w_cols
    n_mask = offs_n < N
    local = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)      # packed rows of the chunk
    r_mask = local * 8 < k_rows
    rows = k_first // 8 + local
    mask = r_mask[:, None] & n_mask[None, :]
    words = tl.load(qweight_ptr + rows[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                    mask=mask, other=0, eviction_policy="evict_first")
    e0, e1, e2, e3, e4 = _exponents(opaque_zero)
    if not GATHER:
        # the tile's 8 BLOCK_R rows lie in one group
        g = (k_first + pid_r * BLOCK_R * 8) // group_size
        s = tl.load(scales_ptr + g * stride_sg + offs_n * stride_sn, mask=n_mask,
                    other=0.0).to(tl.float32)[None, :]
        z = tl.load(zeros_ptr + g * stride_zg + offs_n * stride_zn, mask=n_mask,
                    other=0).to(tl.float32)[None, :]
    # (int64: w4a16_dequantize writes a caller's out of k_rows x N, which passes 2^31 elements
    # for a large head, 256000 x 18432; with int32 offsets its far rows wrapped out of bounds)
    row_step = tl.cast(stride_wk, tl.int64)
    w_rows = (w_ptr + (local * 8).to(tl.int64)[:, None] * row_step
              + w_cols.to(tl.int64)[None, :] * stride_wn)
    for j in tl.static_range(8):
        if GATHER:
            s, z = _row_scale_zero(rows * 8 + j, r_mask, mask, offs_n, g_idx_ptr, group_size,
                                   scales_ptr, stride_sg, stride_sn, zeros_ptr, stride_zg,
                                   stride_zn, HAS_G_IDX)
        if j < 4:
            e = e0 if j == 0 else (e1 if j == 1 else (e2 if j == 2 else e3))
        else:
            e = e4
        w = (_code_exact(words, j, e) - z) * s
        tl.store(w_rows + j * row_step, w.to(w_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Torch reference
# ----------------------------------------------------------------------------------------------
def _as_group_size(group_size):
    """numpy's integers (a size read from a config array, which the grid and the solver take) as
    Python's int, before the plan caches key on it and the kernels take it as a constant; a
    float, bool or anything else is left for :func:`_check_arguments` to refuse by name."""
    if type(group_size) is not int and is_integer(group_size):
        return int(group_size)
    return group_size


def _row_groups(K, group_size, g_idx, device):
    if g_idx is not None:
        return g_idx.to(device=device, dtype=torch.long)
    if group_size == -1:
        return torch.zeros(K, dtype=torch.long, device=device)
    return torch.arange(K, device=device) // group_size


def _check_weights(qweight, scales, zeros, group_size, g_idx):
    """The weight checks of :func:`w4a16_matmul` for the reference (which takes any activation
    dtype and a g_idx of any strides): ``K``. Unchecked, it read float zero points truncated, an
    int64 word's low eight codes only, or the first groups of scales made for smaller groups."""
    if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2:
        shape = tuple(qweight.shape) if isinstance(qweight, torch.Tensor) else type(qweight).__name__
        raise ValueError(f"qweight must be an int32 tensor [K // 8, N], got {shape}")
    K = qweight.shape[0] * 8
    x = torch.empty((0, K), dtype=torch.float32, device=qweight.device)
    if isinstance(g_idx, torch.Tensor):
        g_idx = g_idx.contiguous()  # (only the kernels need it so)
    return _check_arguments(x, qweight, scales, zeros, group_size, g_idx)[0]


def dequantize_int4_weight(qweight, scales, zeros, group_size, g_idx=None, dtype=torch.float64):
    """The dense weight ``W [K, N] = (q - z[g(k)]) * s[g(k)]`` in ``dtype`` (reference only:
    the kernels never build it). Its arguments are checked as :func:`w4a16_matmul`'s are."""
    group_size = _as_group_size(group_size)
    _check_weights(qweight, scales, zeros, group_size, g_idx)
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int64)
    q = ((qweight.to(torch.int64)[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(K, N)
    g = _row_groups(K, group_size, g_idx, qweight.device)
    if g_idx is not None:
        _check_g_idx_range(g, scales.shape[0])
    z = zeros.to(torch.int64)[g]
    return (q - z).to(dtype) * scales.to(dtype)[g]


def w4a16_matmul_reference(x, qweight, scales, zeros, group_size, g_idx=None, *,
                           dtype=torch.float64):
    """``x @ W`` with W dequantized in ``dtype`` (float64 by default) and x converted to it:
    the ground truth the kernels are tested against. Returns ``dtype``, shape ``[..., N]``."""
    group_size = _as_group_size(group_size)
    K = _check_weights(qweight, scales, zeros, group_size, g_idx)
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != K:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be [..., K] with K = {K} (qweight [K // 8, N] = "
                         f"{tuple(qweight.shape)}), got {shape}: the last dim of x and the "
                         f"weight do not match")
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
    if K == 0:
        raise ValueError("K (the last dim of x) must be positive")
    if K % 8:
        raise ValueError(f"K = {K} (last dim of x) is not a multiple of 8, the int4 packing")
    if qweight.dtype != torch.int32:
        raise ValueError(f"qweight must be int32 (eight int4 codes per word), got {qweight.dtype}")
    if qweight.dim() != 2 or qweight.shape[0] * 8 != K:
        raise ValueError(f"qweight must be [K // 8, N] = [{K // 8}, N] for K = {K} (the last dim "
                         f"of x), got {tuple(qweight.shape)}: x and the weight do not match")
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
        if not g_idx.is_contiguous():
            raise ValueError("g_idx must be contiguous (the kernels read it with stride 1): pass "
                             "g_idx.contiguous()")
        tensors.append(g_idx)
        names.append("g_idx")
    check_same_device(*tensors, names=names)
    return K, N, G


# A g_idx is inspected once (range check and static-or-permuted, one host sync) and the answer
# remembered for that tensor object until it is changed in place (its version counter moves;
# writes through ``.data`` or a NumPy view, and to inference tensors, do not move it and are not
# seen: pass a new tensor).
_G_IDX_KINDS = {}


def _check_g_idx_range(g_idx, G):
    """A clear error where ``g_idx`` names a group outside ``[0, G)`` (one host sync)."""
    if not g_idx.numel():
        return
    lo, hi = (int(v) for v in torch.aminmax(g_idx))
    if lo < 0 or hi >= G:
        raise ValueError(f"g_idx values must lie in [0, {G}) (G = number of groups), "
                         f"got [{lo}, {hi}]")


def _g_idx_is_static(g_idx, K, G, group_size):
    """True if g_idx[k] == k // group_size for all k (no gather needed); raises if out of range."""
    signature = (g_idx.data_ptr(), version(g_idx), K, G, group_size)
    hit = _G_IDX_KINDS.get(id(g_idx))
    if hit is not None and hit[0]() is g_idx and hit[1] == signature:
        return hit[2]
    if g_idx.is_cuda and torch.cuda.is_current_stream_capturing():
        return False  # cannot inspect during capture; the gather path is right for any g_idx
    _check_g_idx_range(g_idx, G)
    static = bool(torch.equal(g_idx.long(), torch.arange(K, device=g_idx.device) // group_size))
    if len(_G_IDX_KINDS) > 1024:
        _G_IDX_KINDS.clear()
    _G_IDX_KINDS[id(g_idx)] = (weakref.ref(g_idx), signature, static)
    return static


# ----------------------------------------------------------------------------------------------
# Choosing a path and config
# ----------------------------------------------------------------------------------------------
def _paths_for(M):
    """The paths whose configs compete (in order: the first one's first config is the default)."""
    if M == 1:
        return ("gemv", "splitk", "mma")
    if M <= MMA_MAX_M:
        return ("splitk", "mma")
    if M <= SPLITK_MAX_M:
        return ("splitk", "wgmma")
    if M < DQMM_MIN_M:
        return ("gemm", "wgmma")
    return ("gemm", "dqmm", "wgmma")


def _path_for(M):
    return _paths_for(M)[0]


def _runnable_paths(x2, entry):
    """The paths that compete for this call: ``_paths_for(M)`` less ``mma`` and ``wgmma`` where
    they cannot run these activations and weights (so that the choice remembered for, and
    cached under, a problem's key is one it can run: the key names the paths)."""
    paths = _paths_for(x2.shape[0])
    if "mma" in paths and not _mma_runs(x2, entry):
        paths = tuple(p for p in paths if p != "mma")
    if "wgmma" in paths and not _mma_runs(x2, entry, wgmma=True):
        paths = tuple(p for p in paths if p != "wgmma")
    return paths


def _block_m_for_splitk(M):
    return 16 if M <= 16 else (32 if M <= 32 else 64)


def _block_m_for_mma(M):
    return 8 if M <= 8 else 16


def _mma_group_k(config, G, group_size):
    """The inputs between two flushes of the mma path's group product: 32 KR UNROLL, or the
    largest common multiple of 32 KR with the group that divides both (a divisor of the group)."""
    step = 32 * config["KR"] * config["UNROLL"]
    return step if G == 1 else math.gcd(step, group_size)


def _mma_straddles(G, group, kr=1):
    """Whether a step of 32 KR inputs of the mma path would straddle groups."""
    return G > 1 and group % (32 * kr) != 0


def _mma_runs(x2, entry, wgmma=False, bound_rows=True) -> bool:
    """Whether the mma path (``wgmma``: the wgmma path) can run these activations and weights:
    fp16/bf16, static groups of whole 32-input steps, zero points in the 4-bit grid (read once
    per weights; weights first seen inside a CUDA graph's capture, whose zero points were never
    read, go without it), row offsets within int32 and, compiled, Gluon and a GPU of compute
    capability 8.0 or newer (``mma.sync``; wgmma: 9.0 exactly, Hopper's sm_90a, and activation
    rows contiguous and 16-byte aligned, their stride a multiple of 16, and at most
    MAX_GRID_YZ programs of its least BLOCK_M along the batch: the third grid dimension;
    not ``bound_rows``: a given config's plan, whose own grid ``_check_grid`` bounds)."""
    return next(_mma_refusals(x2, entry, wgmma, bound_rows), None) is None


def _mma_refusals(x2, entry, wgmma=False, bound_rows=True):
    """What keeps :func:`_mma_runs` false, one phrase a requirement that fails, in the order
    checked (a generator: ``_mma_runs`` stops at the first, and reads no zero points after a
    failed check)."""
    if x2.dtype not in MMA_DTYPES:
        yield f"activations of {x2.dtype} (it takes float16 or bfloat16)"
    if entry.permuted:
        yield _not_static_groups(entry)
    if _wide_rows(x2, x2, entry.N):
        yield (f"{x2.shape[0]} rows of stride {x2.stride(0)} and {entry.N} outputs, whose row "
               f"offsets pass int32")
    if _mma_straddles(entry.G, entry.group):
        yield f"groups of {entry.group} inputs, not a multiple of 32 (its step)"
    if wgmma and not (x2.stride(1) == 1 and x2.stride(0) % 16 == 0 and x2.data_ptr() % 16 == 0):
        # (cp.async copies 16 bytes: rows contiguous and 16-byte aligned)
        off = ([f"activation rows not contiguous (strides {tuple(x2.stride())})"] * (x2.stride(1) != 1)
               + [f"a row stride of {x2.stride(0)} elements"] * (x2.stride(0) % 16 != 0)
               + [f"activations {x2.data_ptr() % 16} bytes past a 16-byte boundary"] * (x2.data_ptr() % 16 != 0))
        yield (f"{', '.join(off)} (it takes rows contiguous, 16-byte aligned, their stride a multiple of "
               f"16 elements)")
    if wgmma and bound_rows and _least_row_blocks("wgmma", x2.shape[0]) > MAX_GRID_YZ:
        # (a bucket's choice serves every larger batch: a config of that BLOCK_M tuned at 8192
        # rows would be launched on millions, which CUDA refuses; off for every config alike,
        # so that the choice is remembered under other paths)
        yield f"{x2.shape[0]} rows (it takes at most {MAX_GRID_YZ * _WGMMA_LEAST_BLOCK_M})"
    if x2.is_cuda:
        capability = torch.cuda.get_device_capability(x2.device)
        if not HAS_GLUON:
            yield "a Triton without Gluon"
        if (capability != (9, 0)) if wgmma else (capability < (8, 0)):
            yield (f"a GPU of compute capability {capability[0]}.{capability[1]} (it takes "
                   f"{'9.0, Hopper' if wgmma else '8.0 or newer'})")
    if entry._zeros_in_grid is None and _capturing(x2.device):
        yield ("zero points not yet read (weights first seen inside a CUDA graph's capture, which "
               "a read of the device would break; run them once before capturing)")
    elif not entry.zeros_in_grid():
        span = "outside 0..15"
        if not _capturing(x2.device):  # (their range read from the device: not inside a capture)
            lo, hi = torch.aminmax(entry.tensors()[2].to(torch.int64))
            span = f"in {int(lo)}..{int(hi)}"
        yield f"zero points {span} (it takes zero points in 0..15, the 4-bit grid)"


def _not_static_groups(entry):
    """What a g_idx other than ``k // group`` is, for the mma paths' refusal: act-order's
    permuted groups, or a nondecreasing g_idx whose runs are not ``group`` inputs each, which
    "permuted" misnamed (read from the device once per weights, never inside a capture)."""
    if entry._g_idx_said is None:
        if _capturing(entry.device):
            return ("a g_idx taken as other than k // group_size (inside a CUDA graph's capture, which a "
                    "read of it would break; it takes static groups)")
        g = entry.tensors()[3].long()
        if bool((g[1:] >= g[:-1]).all()):
            k = int((g != torch.arange(entry.K, device=g.device) // entry.group).nonzero()[0])
            entry._g_idx_said = (f"a g_idx that is nondecreasing but not the contiguous layout k // {entry.group} "
                                 f"(g_idx[{k}] = {int(g[k])}, not {k // entry.group}; it takes static groups)")
        else:
            entry._g_idx_said = "act-order groups (a permuted g_idx; it takes static groups)"
    return entry._g_idx_said


def _require_mma(x2, entry, wgmma=False, bound_rows=True):
    failed = list(_mma_refusals(x2, entry, wgmma, bound_rows))
    if failed:
        name = "wgmma" if wgmma else "mma"
        raise ValueError(f"the {name} path cannot run these activations and weights: "
                         + "; ".join(failed))


def _m_bucket(paths, M):
    if paths[0] == "gemv":
        return 1
    return min(triton.next_power_of_2(M), 8192)


def _needs_gather(path, config, G, group_size, permuted, x_dtype=None):
    """Per-row scales unless every tile of rows lies in one group. The GEMV takes the per-row
    path for fp32 activations too: it forms ``q - z`` before the product, where the fast path
    (codes biased by 128; bias and zero point taken off the sums) loses up to 7 bits to
    cancellation next to a large activation, below a 16-bit output's rounding but not an
    fp32 one's."""
    if permuted or (path == "gemv" and x_dtype == torch.float32):
        return True
    if path == "dqmm":
        return G > 1 and group_size % (8 * config["BLOCK_R"]) != 0
    if path in ("mma", "wgmma"):
        return False  # (they have no gather: permuted groups are not their candidates)
    return G > 1 and group_size % config["BLOCK_K"] != 0


def _dqmm_chunk(config, K, N, elem_size):
    """``(axis, size)``: the weight is dequantized CHUNK_K rows at a time (axis ``"K"``) or,
    with CHUNK_N in the config, CHUNK_N columns at a time (axis ``"N"``); at most the whole
    axis and DQMM_MAX_CHUNK_BYTES, a multiple of one dequant tile (8 BLOCK_R rows or BLOCK_N
    columns) unless it is the whole axis."""
    axis, length, across = ("N", N, K) if "CHUNK_N" in config else ("K", K, N)
    tile = config["BLOCK_N"] if axis == "N" else 8 * config["BLOCK_R"]
    fits = DQMM_MAX_CHUNK_BYTES // max(1, across * elem_size)
    size = min(config["CHUNK_" + axis], max(tile, fits))
    size = max(tile, size // tile * tile)
    return axis, (length if size >= length else size)


def _candidates(path, M, K, G, group_size, permuted, x_dtype=torch.float16, N=None):
    """The autotune space of a path, pruned to configs that make sense for this problem (dqmm,
    where ``N`` is given: one config per chunking it makes, none with two streams where the
    chunk is the whole axis)."""
    configs, chunkings = [], set()
    for config in AUTOTUNE_SPACE[path]:
        if config.get("HALF2") and x_dtype not in HALF2_DTYPES:
            continue  # (the option is for 16-bit activations: elsewhere a copy of its twin)
        if path == "dqmm":
            if N is not None:
                axis, chunk = _dqmm_chunk(config, K, N, x_dtype.itemsize)
                whole = chunk >= (K if axis == "K" else N)
                if config.get("STREAMS", 1) == 2 and whole:
                    continue  # (one chunk: one buffer, one stream, the same as STREAMS = 1)
                chunking = (axis, chunk, config.get("STREAMS", 1), config["BLOCK_R"],
                            config["BLOCK_N"], config["num_warps"])
                if chunking in chunkings:
                    continue  # (CHUNK_N 2048 and 4096 both the whole of N = 2048: one of them)
                chunkings.add(chunking)
            configs.append(dict(config))
            continue
        if path == "mma":
            if x_dtype not in MMA_DTYPES or permuted:
                return []
            if _mma_straddles(G, group_size, config["KR"]):
                continue
            # at most as many K slices as leave none empty (a short K: fewer than the config's)
            steps = triton.cdiv(K, _mma_group_k(config, G, group_size))
            split_k = _without_empty_slices(config["SPLIT_K"], steps)
            if config.get("PREFETCH") and triton.cdiv(steps, split_k) * config["UNROLL"] < 4:
                continue  # (a slice's last prefetch is of the next slice, unused: 1/4 at most)
            config = dict(config, SPLIT_K=split_k, BLOCK_M=_block_m_for_mma(M))
            if config not in configs:
                configs.append(config)
            continue
        if path == "wgmma":
            if x_dtype not in MMA_DTYPES or permuted:
                return []
            if _mma_straddles(G, group_size, config["KR"]):
                continue
            if config["BLOCK_M"] > max(64, triton.next_power_of_2(M)):
                continue  # (a tile mostly of rows past the batch)
            configs.append(dict(config))
            continue
        if path == "splitk":
            if M == 1 and not config["SWAP_AB"]:
                continue  # at M = 1 only the swapped dot competes with the GEMV
            config = dict(config, BLOCK_M=_block_m_for_splitk(M))
        k_tiles = triton.cdiv(K, config["BLOCK_K"])
        if config["SPLIT_K"] > 1 and config["SPLIT_K"] > k_tiles:
            continue  # some K slices would be empty
        if config["BLOCK_K"] > max(32, triton.next_power_of_2(K)):
            continue
        configs.append(config)
    if path in ("mma", "wgmma"):
        return configs
    # A config whose tiles straddle groups needs the gather path: only keep those if nothing else.
    aligned = [c for c in configs if not _needs_gather(path, c, G, group_size, permuted)]
    configs = aligned or configs
    if not configs:  # tiny K: fall back to the smallest tiles of the space
        configs = [dict(min(AUTOTUNE_SPACE[path], key=lambda c: (c["BLOCK_K"], c["SPLIT_K"])))]
        if path == "splitk":
            configs[0]["BLOCK_M"] = _block_m_for_splitk(M)
    return configs


# torch.backends.cuda.matmul.allow_tf32, read as cheaply as torch allows (every fp32 call reads it)
_allow_tf32 = getattr(torch._C, "_get_cublas_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32)


def _tf32(x_dtype) -> bool:
    """Whether fp32 activations may take plain TF32 (part of every plan and tuning key)."""
    return x_dtype is torch.float32 and bool(_allow_tf32())


def _dot_precision(x_dtype):
    if x_dtype != torch.float32:
        return "ieee"  # unused for 16-bit inputs
    # 3xTF32 keeps fp32 accuracy on the tensor cores; plain TF32 only if torch allows it too.
    return "tf32" if _tf32(x_dtype) else "tf32x3"


def _compute_dtype(x_dtype):
    # The Triton interpreter (CPU) has no bf16 arithmetic, only bf16 <-> fp32 conversions, so
    # interpreted bf16 runs dequantize and dot in fp32. Compiled, bf16 stays bf16.
    if x_dtype == torch.float16:
        return tl.float16
    if x_dtype == torch.bfloat16 and not INTERPRETED:
        return tl.bfloat16
    return tl.float32


# Chosen (path, config) per problem bucket in this process: a tuple key, one dict lookup.
_CHOSEN = {}
# Whether _choose times candidates: not under the interpreter, which takes INTERPRETER_CONFIG
# (a test turns it on there, with the timing replaced, to exercise the tuner's verification).
_TUNE = not INTERPRETED


def _precompile(plans, x2, out2, workers=None):
    """Compile the kernels of every plan in parallel, before any is timed: Triton releases the
    GIL in its compiler passes and ptxas runs as a process of its own, so a 16-core host
    compiles a space of ~30 configs in about the time of a few (2 cores here: 1.6x)."""
    workers = workers or min(16, os.cpu_count() or 1)
    if workers < 2 or INTERPRETED or not hasattr(triton, "AsyncCompileMode"):
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        with triton.AsyncCompileMode(pool, ignore_errors=True):
            for plan in plans:
                plan.warmup(x2, out2)


def _tuning_key(paths, x2, entry):
    """The disk-cache key of a problem bucket."""
    return (f"{'+'.join(paths)}|M{_m_bucket(paths, x2.shape[0])}|K{entry.K}|N{entry.N}|"
            f"G{entry.G}|{'perm' if entry.permuted else 'static'}|x={str(x2.dtype)[6:]}|"
            f"s={str(entry.scales_dtype)[6:]}|z={str(entry.zeros_dtype)[6:]}"
            + ("|tf32" if _tf32(x2.dtype) else "")
            # (bf16 buckets tuned before HALF2 took bf16 never timed it: their picks are not kept)
            + ("|h2" if x2.dtype == torch.bfloat16 else ""))


def _path_config(candidate):
    """An autotune candidate (a config with its ``PATH``) as ``(path, config)``."""
    return candidate["PATH"], {k: v for k, v in candidate.items() if k != "PATH"}


def _choose(paths, x2, entry):
    """``(path, config)``: from this process, the disk cache, or by timing every candidate of
    every competing path (the whole operation, launches and workspace included)."""
    if not _TUNE:
        return paths[0], dict(INTERPRETER_CONFIG[paths[0]])
    M = x2.shape[0]
    bucket = _m_bucket(paths, M)
    memo = (x2.device, paths, bucket, entry.K, entry.N, entry.G, entry.permuted, x2.dtype,
            entry.scales_dtype, entry.zeros_dtype, _tf32(x2.dtype))
    chosen = _CHOSEN.get(memo)
    if chosen is not None:
        return chosen
    candidates = []
    for path in paths:
        for config in _candidates(path, M, entry.K, entry.G, entry.group, entry.permuted,
                                  x2.dtype, entry.N):
            candidates.append(dict(config, PATH=path))
    key = _tuning_key(paths, x2, entry)
    cache = autotune_cache.cache_for("w4a16", x2.device, AUTOTUNE_SPACE)
    scratch = torch.empty((M, entry.N), dtype=x2.dtype, device=x2.device)

    plans = {}

    def plan_of(candidate):
        plan = plans.get(id(candidate))
        if plan is None or not plan.usable():
            plan = plans[id(candidate)] = _build_plan(entry, *_path_config(candidate), x2, scratch)
        return plan

    def run(candidate):
        plan_of(candidate)(x2, scratch)

    def precompile(candidates):
        _precompile([plan_of(c) for c in candidates], x2, scratch)

    probe = []

    def verify(candidate):
        # The candidate's result on a fixed random activation (not the caller's, which may hold
        # zeros, NaN or values whose product overflows: nothing to judge by) against the
        # float32 dequantized product, within VERIFY_TOLERANCE of its largest entry: a wrong
        # result, not rounding, fails. Fresh, aligned and contiguous, so every option the
        # candidate has (HALF2 included) runs; one that fails to compile or run there fails.
        try:
            return check(candidate)
        except torch.cuda.OutOfMemoryError:
            return True  # (no memory for the probe or a dequantized copy: the timing ran it)
        except Exception:  # noqa: BLE001 (a config that cannot run on the probe: not kept)
            return False

    def check(candidate):
        if not probe:
            gen = torch.Generator(device=x2.device).manual_seed(0)
            x_probe = torch.randn(x2.shape, generator=gen, device=x2.device).to(x2.dtype)
            qweight, scales, zeros, g_idx = entry.tensors()
            g = g_idx if entry.permuted else None
            y_ref = w4a16_matmul_reference(x_probe, qweight, scales, zeros, entry.group_size, g,
                                           dtype=torch.float32)
            # large weights (|W| ~ 1e3 at K = 4096) make a unit probe's product overflow x's
            # dtype in every candidate: the probe scaled by a power of two until it fits
            room = torch.finfo(x2.dtype).max / 16
            peak = float(y_ref.abs().max()) if y_ref.numel() else 0.0
            if math.isfinite(peak) and peak > room:
                x_probe = x_probe * 2.0 ** -math.ceil(math.log2(peak / room))
                y_ref = w4a16_matmul_reference(x_probe, qweight, scales, zeros, entry.group_size, g,
                                               dtype=torch.float32)
            probe.append((x_probe, torch.empty_like(scratch), y_ref))
        x_probe, y, y_ref = probe[0]
        if not bool(torch.isfinite(y_ref).all()):
            return True
        _build_plan(entry, *_path_config(candidate), x_probe, y)(x_probe, y)
        bound = VERIFY_TOLERANCE * float(y_ref.abs().max()) + 1e-6
        return bool(((y.float() - y_ref).abs().max() <= bound).item())

    # (8 ms of repetitions a candidate, not 12: these products take microseconds, so that is
    # still hundreds of samples, and a batch of 1-16 now has ~60 candidates across its paths)
    best = autotune_cache.tune(cache, key, candidates, run, rep_ms=8, prepare=precompile,
                               verify=verify)
    chosen = _path_config(best)
    if not torch.cuda.is_current_stream_capturing():
        _CHOSEN[memo] = chosen
    return chosen


# ----------------------------------------------------------------------------------------------
# Workspaces (split-K sums and counters, dqmm chunks): per device and stream, reused
# ----------------------------------------------------------------------------------------------
# Split-K: fp32 partial sums and int32 arrival counters. The kernels leave both at zero, so a
# launch needs no zero-fill; one per stream because two launches must not share them
# concurrently. Grown (freshly zeroed) when a problem needs more. dqmm: the dequantized chunk.
# Plans hold the workspace they were built with and the epoch; any replacement bumps the epoch,
# which retires every plan (memory is freed, the next call rebuilds its plan).
_WORKSPACES = {}
_DQ_WORKSPACES = {}
_EPOCH = [0]
# Split-K workspaces while a CUDA graph is captured:
#   "private" (default): an ordinary intermediate of the graph, zeroed by memset nodes at every
#       replay (the graph may reuse its memory between replays). Always correct; two memsets
#       per split-K call in the graph.
#   "shared": the capture stream's persistent workspace, as for eager calls (no memsets; the
#       kernels leave it at zero). Correct only if graphs captured this way are never replayed
#       concurrently with each other (or with eager calls on the capture stream); workspaces a
#       graph has used are never freed. For benchmarks and single-stream decode loops.
GRAPH_WORKSPACE = "private"
_GRAPH_HELD = []


def _stream_of(device):
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _workspace_key(device):
    return device, _stream_of(device)


def _capturing(device):
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _split_k_workspace(device, n_sums, n_tiles):
    if _capturing(device) and GRAPH_WORKSPACE != "shared":
        # Inside a CUDA graph the workspace is an ordinary intermediate: zeroed by memset nodes
        # of the graph at every replay, used by the kernel, freed (stream-ordered) afterwards.
        # It cannot rely on the previous launch having left it at zero: once freed, later
        # work of the same graph may reuse the memory between replays.
        return (torch.zeros(n_sums, dtype=torch.float32, device=device),
                torch.zeros(n_tiles, dtype=torch.int32, device=device))
    key = _workspace_key(device)
    sums, counters = _WORKSPACES.get(key, (None, None))
    if sums is None or sums.numel() < n_sums or counters.numel() < n_tiles:
        if _capturing(device):
            raise RuntimeError("w4a16: GRAPH_WORKSPACE = 'shared' needs the workspace of the "
                               "capture stream sized before the capture: run the same calls "
                               "on that stream once before capturing")
        sums = torch.zeros(max(n_sums, 1 << 16), dtype=torch.float32, device=device)
        counters = torch.zeros(max(n_tiles, 1 << 12), dtype=torch.int32, device=device)
        _WORKSPACES[key] = (sums, counters)
        _EPOCH[0] += 1
    elif _capturing(device) and not any(s is sums for s, _ in _GRAPH_HELD):
        _GRAPH_HELD.append((sums, counters))  # a graph uses it: never freed
    return sums, counters


def _dequant_workspace(device, dtype, numel):
    if _capturing(device):
        return torch.empty(numel, dtype=dtype, device=device)  # an intermediate of the graph
    # per thread too: a dqmm call is several launches (dequantize a chunk, multiply by it), and
    # another thread's chunk enqueued in between on the same stream would take its place
    key = _workspace_key(device) + (dtype, threading.get_ident())
    buf = _DQ_WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        buf = _DQ_WORKSPACES[key] = torch.empty(numel, dtype=dtype, device=device)
        _EPOCH[0] += 1
    return buf


def _drop_workspace(device):
    """After a failed launch: never reuse partial sums it may have left behind."""
    if _WORKSPACES.pop(_workspace_key(device), None) is not None:
        _EPOCH[0] += 1


# ----------------------------------------------------------------------------------------------
# Validated weights and launch plans
# ----------------------------------------------------------------------------------------------
# The current device and its current stream as integers, as cheaply as torch allows (Triton's
# own launcher asks torch the same way).
if hasattr(torch._C, "_cuda_getCurrentRawStream") and hasattr(torch._C, "_cuda_getDevice"):
    _raw_stream = torch._C._cuda_getCurrentRawStream
    _current_device = torch._C._cuda_getDevice
else:  # pragma: no cover (older torch)
    def _raw_stream(index):
        return torch.cuda.current_stream(index).cuda_stream

    _current_device = torch.cuda.current_device

_ENTRIES = {}
_MAX_ENTRIES = 4096
_MAX_PLANS = 256


def _forget_entry(key, entry_ref, _tensor_ref):
    """A weight tensor of the entry ``entry_ref`` died: the entry goes from the cache."""
    entries, entry = _ENTRIES, entry_ref()  # (None while the interpreter shuts down)
    if entries is not None and entry is not None and entries.get(key) is entry:
        del entries[key]


class _Weights:
    """One set of weight tensors (qweight, scales, zeros, g_idx, group_size), validated once.

    Valid while every tensor is the same live object with the same data pointer and version
    counter (in-place writes, ``resize_``, ``set_``, ``t_`` and the like all bump it); then the
    argument checks of the first call hold and its launch plans can be reused.
    """

    def __init__(self, key, qweight, scales, zeros, g_idx, group_size, K, N, G, permuted):
        tensors = (qweight, scales, zeros, g_idx)
        self.key = key
        # (the callback holds the entry weakly: no reference cycle, so an entry, its plans and an
        # act-order entry's sorted codes on the GPU go when the last reference does, not at the
        # next cyclic garbage collection)
        forget = functools.partial(_forget_entry, key, weakref.ref(self))
        self.refs = tuple(None if t is None else weakref.ref(t, forget) for t in tensors)
        self.sig = self.signature(qweight, scales, zeros, g_idx)
        self.group_size = group_size
        self.group = K if group_size == -1 else group_size
        self.K, self.N, self.G, self.permuted = K, N, G, permuted
        self.device = qweight.device
        self.dev_index = qweight.get_device()
        self.is_cuda = qweight.is_cuda
        self.scales_dtype, self.zeros_dtype = scales.dtype, zeros.dtype
        self.plans = {}
        self._zeros_in_grid = None
        self._g_idx_said = None  # (_not_static_groups)
        self._sorted = None  # act-order: (perm, sorted codes, their entry), or False (none)

    def zeros_in_grid(self) -> bool:
        """Whether every zero point lies in the 4-bit grid (0..15), as GPTQ's do: the HALF2
        GEMV's fp16 sums are bounded only then (read once per set of weights)."""
        if self._zeros_in_grid is None:
            zeros = self.tensors()[2]
            # (in int64, which holds every dtype's values: int64 ones read as int32 wrapped, 2^32 + 5
            # taken as 5, and HALF2 and mma ran on the wrapped zero point, silently)
            lo, hi = torch.aminmax(zeros.to(torch.int64)) if zeros.numel() else (0, 0)
            self._zeros_in_grid = bool(0 <= int(lo) and int(hi) <= 15)
        return self._zeros_in_grid

    def sorted_form(self):
        """For act-order weights while ACT_ORDER_REPACK is on: ``(perm, codes, entry)``,
        ``entry`` the same weights with the codes' rows in the order ``perm`` (``codes``: the
        copy :func:`_sorted_codes` keeps for this qweight and g_idx, whatever the scales and
        zero points) and static groups; else None. Inside a CUDA graph's capture only a copy
        made before it (built there, its checks would read the device); the graph keeps it
        (``_act_order_gather``)."""
        if not (self.permuted and ACT_ORDER_REPACK):
            return None
        if self._sorted is None:
            qweight, scales, zeros, g_idx = self.tensors()
            sorted_codes = _sorted_codes(qweight, g_idx, self.group, build=not _capturing(self.device))
            if sorted_codes is None:
                return None  # (not known yet: the gather paths, this time)
            if sorted_codes is False:
                self._sorted = False
            else:
                perm, codes = sorted_codes
                entry = _Weights(None, codes, scales, zeros, None, self.group_size, self.K,
                                 self.N, self.G, False)
                entry._zeros_in_grid = self._zeros_in_grid
                self._sorted = (perm, codes, entry)
        return self._sorted or None

    @staticmethod
    def signature(qweight, scales, zeros, g_idx):
        # (shapes too: ``.data = t[:, :n]`` keeps the pointer and the version)
        return (qweight.data_ptr(), version(qweight), qweight.shape, scales.data_ptr(), version(scales),
                scales.shape, zeros.data_ptr(), version(zeros), zeros.shape,
                None if g_idx is None else (g_idx.data_ptr(), version(g_idx), g_idx.shape))

    def current(self, qweight, scales, zeros, g_idx):
        refs = self.refs
        return (refs[0]() is qweight and refs[1]() is scales and refs[2]() is zeros
                and (g_idx is None or refs[3]() is g_idx)
                and self.signature(qweight, scales, zeros, g_idx) == self.sig)

    def tensors(self):
        return tuple(None if r is None else r() for r in self.refs)

    def plan_key(self, x, out, stream):
        """Everything a launch plan depends on beyond the weights: what Triton specialises on
        (exact shapes and strides, 16-byte alignment of the pointers), dtypes, devices, fp32's
        TF32 switch, and the current device, stream and thread (workspaces are per stream, the
        dqmm one per thread too)."""
        okey = None if out is None else (out.shape, out.stride(), out.dtype, out.device,
                                         out.data_ptr() % 16 == 0)
        return (x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16 == 0, okey, stream,
                x.dtype is torch.float32 and _allow_tf32(), threading.get_ident(),
                self.permuted and ACT_ORDER_REPACK)

    def stream(self):
        """``(current device, its current raw stream)`` for CUDA weights, else None."""
        if self.is_cuda:
            index = _current_device()
            return index, _raw_stream(index)
        return None


# qweight and g_idx ids -> (weak refs to them, their signature, (perm, sorted codes) or False)
_SORTED = {}


def _forget_sorted(key, _tensor_ref):
    """qweight or g_idx of a sorted copy died: the copy goes (unless a graph holds it)."""
    cache = _SORTED  # (None while the interpreter shuts down)
    if cache is not None:
        cache.pop(key, None)


def _sorted_codes(qweight, g_idx, group, build=True):
    """``(perm, codes)`` with ``g_idx[perm] == k // group`` and ``codes`` the packed codes' rows
    in the order ``perm`` (a copy), False where the sorted groups are not runs of ``group``, or
    None where not known (``build`` False, or no memory for the copy now). One copy per qweight
    and g_idx, kept while both live unchanged: the entries of other scales or zero points (a
    traced model passes new zero points every call) share it."""
    key = (id(qweight), id(g_idx), group)
    signature = (qweight.data_ptr(), version(qweight), qweight.shape, g_idx.data_ptr(),
                 version(g_idx), g_idx.shape)

    def cached():
        hit = _SORTED.get(key)
        if hit is not None and hit[0]() is qweight and hit[1]() is g_idx and hit[2] == signature:
            return hit
        return None

    hit = cached()
    if hit is not None or not build:
        return None if hit is None else hit[3]
    with _SORT_LOCK:  # (two threads' first calls: one copy, the one every plan uses)
        hit = cached()
        if hit is not None:
            return hit[3]
        try:
            result = _sort_rows(qweight, g_idx, group)
        except torch.cuda.OutOfMemoryError:
            return None
        if len(_SORTED) >= _MAX_ENTRIES:
            _SORTED.clear()
        forget = functools.partial(_forget_sorted, key)
        _SORTED[key] = (weakref.ref(qweight, forget), weakref.ref(g_idx, forget), signature,
                        result)
        return result


def _sort_rows(qweight, g_idx, group):
    K, N = g_idx.shape[0], qweight.shape[1]
    g = g_idx.long()
    perm = torch.argsort(g, stable=True)
    if not torch.equal(g[perm], torch.arange(K, device=g.device) // group):
        return False
    codes = torch.empty_like(qweight)
    for n0 in range(0, N, _SORT_CHUNK_COLUMNS):  # (the unpacked codes: 4 bytes each)
        columns = slice(n0, n0 + _SORT_CHUNK_COLUMNS)
        codes[:, columns] = pack_int4(unpack_int4(qweight[:, columns])[perm], check_range=False)
    if codes.is_cuda:  # (built on this stream; calls on another must find it done)
        torch.cuda.current_stream(codes.device).synchronize()
    return perm, codes


# Sorted copies a CUDA graph has used: it keeps their addresses, so they are never freed
_GRAPH_HELD_SORTED = []


def _act_order_gather(sorted_form, x2):
    """``x2``'s columns in the sorted codes' order; a CUDA graph being captured keeps the copy
    for good (it keeps the copy's address)."""
    if _capturing(x2.device) and not any(held[1] is sorted_form[1]
                                         for held in _GRAPH_HELD_SORTED):
        _GRAPH_HELD_SORTED.append(sorted_form)
    return x2.index_select(1, sorted_form[0])


class _ActOrderPlan:
    """A plan for act-order weights: the activations gathered into the sorted order, then the
    sorted weights' plan (which holds its weights weakly: this plan keeps them alive)."""

    def __init__(self, sorted_form, plan):
        self.sorted_form, self.plan = sorted_form, plan
        self.path, self.config, self.launches, self.M = plan.path, plan.config, plan.launches, plan.M

    def usable(self):
        return self.plan.usable()

    def __call__(self, x, out, where=None):
        return self.plan(_act_order_gather(self.sorted_form, x.reshape(self.M, -1)), out, where)


def _entry_for(qweight, scales, zeros, g_idx, group_size, K, N, G):
    """The validated-weights entry (arguments already checked by the caller)."""
    key = (id(qweight), id(scales), id(zeros), id(g_idx), group_size)
    entry = _ENTRIES.get(key)
    if entry is not None and entry.current(qweight, scales, zeros, g_idx):
        return entry
    group = K if group_size == -1 else group_size
    permuted = g_idx is not None and not _g_idx_is_static(g_idx, K, G, group)
    entry = _Weights(key, qweight, scales, zeros, g_idx, group_size, K, N, G, permuted)
    if g_idx is not None and g_idx.is_cuda and torch.cuda.is_current_stream_capturing():
        return entry  # the g_idx kind was assumed, not inspected: not to be remembered
    if len(_ENTRIES) >= _MAX_ENTRIES:
        _ENTRIES.clear()
    _ENTRIES[key] = entry
    return entry


_KNOBS = getattr(triton, "knobs", None)
# Direct launches follow the launcher convention of Triton >= 3.4 (the first to have
# ``triton.knobs``): every kernel argument, constexprs included, and the launch hooks from
# ``triton.knobs.runtime``. Triton 3.0-3.2 pass only the non-constexpr values and 3.0-3.3 keep
# the hooks on ``CompiledKernel``; there every call goes through the JIT (slower on the host,
# the same kernels).
DIRECT_LAUNCH = _KNOBS is not None


class _Launch:
    """One kernel launch with fixed arguments except the activation and output pointers.

    The first launch goes through Triton's JIT (binding, specialisation, compilation); it
    returns the compiled kernel, which later launches call directly with integer pointers.
    Under TRITON_INTERPRET every launch goes through the interpreter with tensors.
    """

    def __init__(self, fn, grid, args, options, x_slot, y_slot, weak_slots):
        self.fn, self.grid, self.options = fn, grid, options
        # the weights are held weakly (a plan must not keep them alive), workspaces strongly
        self.args = [weakref.ref(a) if i in weak_slots and a is not None else a
                     for i, a in enumerate(args)]
        self.weak_slots = weak_slots
        self.x_slot, self.y_slot = x_slot, y_slot
        self.compiled = None
        self.int_args = None

    def _tensor_args(self, x, y):
        args = [a() if i in self.weak_slots and a is not None else a
                for i, a in enumerate(self.args)]
        args[self.x_slot], args[self.y_slot] = x, y
        return args

    def warmup(self, x, y):
        """Compile (or fetch from Triton's caches) without launching."""
        if self.compiled is None:
            self.fn.warmup(*self._tensor_args(x, y), grid=self.grid, **self.options)

    def __call__(self, x, y, stream):
        if self.compiled is None:
            args = self._tensor_args(x, y)
            compiled = self.fn[self.grid](*args, **self.options)
            if (DIRECT_LAUNCH and not INTERPRETED and compiled is not None
                    and hasattr(compiled, "packed_metadata")):
                self.int_args = [a.data_ptr() if isinstance(a, torch.Tensor) else a
                                 for a in args]
                self.compiled = compiled
                self.args = None  # no references to the weights: integer pointers from now on
            return
        args = list(self.int_args)  # a copy: plans may be shared between threads
        args[self.x_slot], args[self.y_slot] = x.data_ptr(), y.data_ptr()
        kernel, grid = self.compiled, self.grid
        enter = _KNOBS.runtime.launch_enter_hook if _KNOBS is not None else None
        if enter is not None and getattr(enter, "calls", True):
            meta = kernel.launch_metadata(grid, stream, *args)
            kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata,
                       meta, enter, _KNOBS.runtime.launch_exit_hook, *args)
        else:
            kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata,
                       None, None, None, *args)


class _Plan:
    """Everything a call needs once the arguments are known to be valid: output shape, the
    launches, the workspaces they use. ``plan(x, out)`` runs the product."""

    def __init__(self, entry, path, config, M, lead, x_dtype, device, launches, dq=None,
                 shared_workspace=False):
        self.entry_ref = weakref.ref(entry)
        self.path, self.config = path, config
        self.M, self.N, self.K = M, entry.N, entry.K
        self.lead = lead
        self.x_dtype, self.device = x_dtype, device
        self.launches = launches
        # dqmm: (axis, chunk size, workspace [buffers, chunk, N] or [buffers, K, chunk],
        # per-chunk dequant launches)
        self.dq = dq
        self.events = None  # dqmm on two streams: its CUDA events, made at the first call
        self.shared_workspace = shared_workspace
        self.epoch = _EPOCH[0]
        self.out_shape = (*lead, entry.N)

    def usable(self):
        if not self.shared_workspace:
            return True
        return self.epoch == _EPOCH[0] and not _capturing(self.device)

    def warmup(self, x2, out2):
        """Compile every kernel of the plan without launching (for parallel autotuning)."""
        for launch in self.launches:
            launch.warmup(x2, out2)
        if self.dq is not None:
            for launch in self.dq[3]:
                launch.warmup(self.dq[2][0], self.dq[2][0])

    def __call__(self, x, out, where=None):
        x2 = x if x.dim() == 2 else x.reshape(self.M, self.K)
        if out is None:
            y = torch.empty(self.out_shape, dtype=self.x_dtype, device=self.device)
            y2 = y
        else:
            y = out
            y2 = out
        if where is not None:
            stream = where[1]
        elif self.device.type == "cuda":
            stream = _raw_stream(_current_device())
        else:
            stream = 0
        if self.dq is None:
            self.launches[0](x2, y2, stream)
            return y
        axis, chunk, work, dequants = self.dq
        y2 = y2.view(self.M, self.N)
        side = self._side_stream() if len(work) == 2 else None
        if side is not None:  # (the side stream starts after everything queued before the call)
            side.wait_stream(torch.cuda.current_stream(self.device))
        for i, launch in enumerate(dequants):
            at = i * chunk
            if axis == "K":
                w = work[i % len(work)][:min(chunk, self.K - at)]
            else:  # (a slab narrower than the buffer keeps its row stride: cuBLAS's ld)
                w = work[i % len(work)][:, :min(chunk, self.N - at)]
            if side is None:
                launch(w, w, stream)
            else:
                ready, free = self.events[0][i % 2], self.events[1][i % 2]
                if i >= 2:
                    side.wait_event(free)  # (the product two chunks back has read this buffer)
                with torch.cuda.stream(side):  # (a plan's first launch goes to the current stream)
                    launch(w, w, side.cuda_stream)
                ready.record(side)
                torch.cuda.current_stream(self.device).wait_event(ready)
            if axis == "N":  # (written in place: a column slice is a matrix with ld = N)
                torch.mm(x2, w, out=y2[:, at:at + w.shape[1]])
            elif i == 0:
                torch.mm(x2[:, at:at + w.shape[0]], w, out=y2)
            else:
                y2.addmm_(x2[:, at:at + w.shape[0]], w)
            if side is not None:
                free.record(torch.cuda.current_stream(self.device))
        return y

    def _side_stream(self):
        """The stream this plan dequantizes on beside the current one (CUDA only; None where
        the plan has one buffer or the current stream is being captured), with its events."""
        if self.device.type != "cuda" or _capturing(self.device):
            return None
        side = side_stream(self.device, owner=("dqmm", _stream_of(self.device)))
        if self.events is None:  # (ready, free) per buffer, reused by every call of the plan
            self.events = tuple([torch.cuda.Event(), torch.cuda.Event()] for _ in range(2))
        return side


def _dequant_launch(qweight, scales, zeros, g_idx_arg, out, k0, rows, group, config, gather,
                    has_g_idx, n0=0, cols=None):
    """The launch that writes rows ``k0 .. k0 + rows`` and columns ``n0 .. n0 + cols`` (default:
    to the last) of the dense weight into ``out``."""
    cols = qweight.shape[1] - n0 if cols is None else cols
    block_r, block_n = config["BLOCK_R"], config["BLOCK_N"]
    grid = (triton.cdiv(rows // 8, block_r), triton.cdiv(cols, block_n), 1)
    args = (qweight, scales, zeros, g_idx_arg, out, n0 + cols, k0, rows, n0, group, 0,
            qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
            zeros.stride(0), zeros.stride(1), out.stride(0), out.stride(1),
            block_r, block_n, gather, has_g_idx)
    return _Launch(_w4a16_dequant_kernel, grid, args, dict(num_warps=config["num_warps"]),
                   4, 4, (0, 1, 2, 3))


INT32_OFFSETS = 2**31
# CUDA's limit on a grid's second and third dimensions (the first takes 2^31 - 1): the GEMV,
# mma and wgmma grids put the batch's row blocks on the third
MAX_GRID_YZ = 65535
_WGMMA_LEAST_BLOCK_M = min(config["BLOCK_M"] for config in AUTOTUNE_SPACE["wgmma"])


def _least_row_blocks(path, M):
    """The fewest programs along the batch (a grid's third dimension) of any config of the GEMV
    (a row a program), mma or wgmma path for M rows; the other paths' grids are flat."""
    if path == "gemv":
        return M
    if path == "mma":
        return triton.cdiv(M, _block_m_for_mma(M))
    if path == "wgmma":
        return triton.cdiv(M, _WGMMA_LEAST_BLOCK_M)
    return 1


def _check_grid(path, grid, M):
    """A clear error where a grid passes CUDA's limits (a launch would fail with 'invalid
    argument')."""
    if grid[1] > MAX_GRID_YZ or grid[2] > MAX_GRID_YZ:
        raise ValueError(f"the {path} path's grid {tuple(grid)} for {M} rows passes CUDA's limit "
                         f"of {MAX_GRID_YZ} on its second and third dimensions: take another "
                         f"path (the gemm or dqmm path for large batches)")


def _wide_rows(x2, out2, N) -> bool:
    """Whether a row offset of x, y or the split-K sums (M x N) can pass int32."""
    M = x2.shape[0]
    return M * max(abs(x2.stride(0)), abs(out2.stride(0)), N) >= INT32_OFFSETS


def _half2(config, x2, gather, entry=None) -> bool:
    """Whether a GEMV config's HALF2 option applies: fp16 or bf16 activations read as words of two
    (contiguous along K, rows 16-byte aligned: part of the plan key), groups whole per tile,
    zero points in the 4-bit grid (``entry``'s, where given) and a GPU of compute capability 8.0
    or newer (its PTX's fp16 max). Weights first seen inside a CUDA graph's capture, whose zero
    points were never read (a read of the device, which would break the capture), take the
    config without HALF2."""
    return (bool(config.get("HALF2", False)) and x2.dtype in HALF2_DTYPES and not gather
            and x2.stride(1) == 1 and x2.data_ptr() % 16 == 0
            and (x2.shape[0] == 1 or x2.stride(0) % 8 == 0)
            and (not x2.is_cuda or torch.cuda.get_device_capability(x2.device) >= (8, 0))
            and (entry is None or _zeros_known_in_grid(entry, x2.device)))


def _zeros_known_in_grid(entry, device) -> bool:
    """Whether ``entry``'s zero points are known to lie in the 4-bit grid: read once per weights,
    but not for weights first seen inside a CUDA graph's capture (a read of the device would
    break it), which are taken as outside it."""
    return (entry._zeros_in_grid is not None or not _capturing(device)) and entry.zeros_in_grid()


def _build_plan(entry, path, config, x2, out2, lead=None):
    """The plan of one (path, config) for activations like ``x2 [M, K]`` into ``out2 [M, N]``
    (``lead``: the leading dimensions of the output the plan allocates; default ``(M,)``)."""
    qweight, scales, zeros, g_idx = entry.tensors()
    M, K = x2.shape
    N, G, group = entry.N, entry.G, entry.group
    device = x2.device
    gather = _needs_gather(path, config, G, group, entry.permuted, x2.dtype)
    has_g_idx = gather and entry.permuted
    g_idx_arg = g_idx if has_g_idx else qweight  # never read when HAS_G_IDX is False
    lead = (M,) if lead is None else tuple(lead)
    if path == "dqmm":
        axis, chunk = _dqmm_chunk(config, K, N, x2.element_size())
        length = K if axis == "K" else N
        # STREAMS = 2: two chunk buffers, the next chunk dequantized on a side stream while
        # cuBLAS multiplies by this one (one buffer under a graph's capture: one stream)
        buffers = 2 if config.get("STREAMS", 1) == 2 and triton.cdiv(length, chunk) > 1 \
            and not _capturing(device) else 1
        shape = (chunk, N) if axis == "K" else (K, chunk)  # (a buffer: rows, or a column slab)
        numel = buffers * shape[0] * shape[1]
        work = _dequant_workspace(device, x2.dtype, numel).view(-1)[:numel].view(buffers, *shape)
        # (first row, rows, first column, columns) of each chunk
        spans = ([(k0, min(chunk, K - k0), 0, N) for k0 in range(0, K, chunk)] if axis == "K"
                 else [(0, K, n0, min(chunk, N - n0)) for n0 in range(0, N, chunk)])
        dequants = [_dequant_launch(qweight, scales, zeros, g_idx_arg, work[0], k0, rows, group,
                                    config, gather, has_g_idx, n0, cols)
                    for k0, rows, n0, cols in spans]
        return _Plan(entry, path, config, M, lead, x2.dtype, device, [],
                     dq=(axis, chunk, work, dequants), shared_workspace=True)
    if path == "mma":
        return _build_mma_plan(entry, config, x2, out2, lead)
    if path == "wgmma":
        return _build_wgmma_plan(entry, config, x2, out2, lead)
    split_k = config["SPLIT_K"]
    block_k = config["BLOCK_K"]
    k_per_split = triton.cdiv(triton.cdiv(K, block_k), split_k) * block_k
    one_group = not gather and (G == 1 or group % k_per_split == 0)
    if path == "gemv":
        grid = (triton.cdiv(N, config["BLOCK_N"]), split_k, M)
        _check_grid(path, grid, M)
        tiles = grid[0] * M
    else:
        tiles = triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"])
        grid = (tiles, split_k, 1)
    if split_k > 1:
        sums, counters = _split_k_workspace(device, M * N, tiles)
        weak = (1, 2, 3, 4)
    else:
        sums, counters = qweight, qweight  # never touched when SPLIT_K == 1
        weak = (1, 2, 3, 4, 6, 7)
    common = [
        x2, qweight, scales, zeros, g_idx_arg, out2, sums, counters,
        M, N, K, group, k_per_split, 0,
        x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1),
        scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1),
        out2.stride(0), out2.stride(1),
    ]
    options = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
    if path == "gemv":
        args = common + [config["BLOCK_N"], block_k, split_k, config["PREFETCH"], gather,
                         has_g_idx, one_group, _half2(config, x2, gather, entry), not INTERPRETED]
        fn = _w4a16_gemv_kernel
    else:
        cdt = _compute_dtype(x2.dtype)
        pairs = bool(config.get("PAIRS", False)) and cdt in (tl.float16, tl.bfloat16)
        args = common + [config["BLOCK_M"], config["BLOCK_N"], block_k, split_k,
                         config["GROUP_M"], gather, has_g_idx, one_group, pairs,
                         bool(config.get("SWAP_AB", False)), bool(config.get("SCALE_AFTER", False)),
                         cdt, _dot_precision(x2.dtype), _wide_rows(x2, out2, N),
                         cdt != tl.float32 and not _zeros_known_in_grid(entry, device)]
        fn = _w4a16_dot_kernel
    launch = _Launch(fn, grid, args, options, 0, 5, weak)
    return _Plan(entry, path, config, M, lead, x2.dtype, device, [launch],
                 shared_workspace=split_k > 1)


def _mma_launch_shape(config, M, K, N, G, group, x_dtype):
    """``(grid, k_per_split, constexprs)`` of an mma config (constexprs in the kernel's order)."""
    warps, split_k = config["num_warps"], config["SPLIT_K"]
    group_k = _mma_group_k(config, G, group)
    k_per_split = triton.cdiv(triton.cdiv(K, group_k), split_k) * group_k
    block_m = config.get("BLOCK_M", _block_m_for_mma(M))
    block_n = 64 * warps
    grid = (triton.cdiv(N, block_n), split_k, triton.cdiv(M, block_m))
    constexprs = dict(BLOCK_M=block_m, KR=config["KR"], GROUP_K=group_k, WARPS=warps,
                      SPLIT_K=split_k, ONE_GROUP=G == 1 or group % k_per_split == 0,
                      EVEN=N % block_n == 0 and K % group_k == 0,
                      PREFETCH=bool(config.get("PREFETCH", False)),
                      CDT=_compute_dtype(x_dtype), ASM=not INTERPRETED, TRIVIAL=not INTERPRETED)
    return grid, k_per_split, constexprs


def _build_mma_plan(entry, config, x2, out2, lead):
    """The plan of an mma config (:mod:`epmq_kernels.w4a16_mma`)."""
    _require_mma(x2, entry)
    _require_whole_steps("mma", config, entry)
    M, K = x2.shape
    grid, k_per_split, constexprs = _mma_launch_shape(config, M, K, entry.N, entry.G,
                                                      entry.group, x2.dtype)
    return _gluon_plan("mma", _w4a16_mma_kernel, entry, config, x2, out2, lead, grid,
                       k_per_split, constexprs)


def _require_whole_steps(path, config, entry):
    if _mma_straddles(entry.G, entry.group, config["KR"]):
        raise ValueError(f"{path} config {config}: groups of {entry.group} are not whole steps "
                         f"of {32 * config['KR']} inputs")


def _gluon_plan(path, kernel, entry, config, x2, out2, lead, grid, k_per_split, constexprs):
    """The one launch of a Gluon kernel's plan (mma, wgmma: the same arguments), with the
    split-K workspace where the grid's second dimension splits K."""
    qweight, scales, zeros, _ = entry.tensors()
    M, K = x2.shape
    N = entry.N
    _check_grid(path, grid, M)
    split = grid[1] > 1
    if split:
        sums, counters = _split_k_workspace(x2.device, M * N, grid[0] * grid[2])
        weak = (1, 2, 3)
    else:
        sums, counters = qweight, qweight  # never touched without K slices
        weak = (1, 2, 3, 5, 6)
    args = [x2, qweight, scales, zeros, out2, sums, counters, M, N, K, entry.group, k_per_split,
            0, x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1),
            scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1),
            out2.stride(0), out2.stride(1), *constexprs.values()]
    launch = _Launch(kernel, grid, args, dict(num_warps=config["num_warps"]), 0, 4, weak)
    return _Plan(entry, path, config, M, lead, x2.dtype, x2.device, [launch],
                 shared_workspace=split)


def _wgmma_pass(config, G, group):
    """``(RELOAD, inputs a pass)`` of a wgmma config: a pass is STAGES steps of 32 KR inputs
    (unrolled: each step's stage known when compiling), and the group's parameters are read
    after every RELOAD-th step of it, a divisor of STAGES and of a group's steps (every end of
    a group is then one)."""
    block_k = 32 * config["KR"]
    reload = math.gcd(group // block_k, config["STAGES"]) if G > 1 else config["STAGES"]
    return reload, config["STAGES"] * block_k


def _wgmma_split_k(config, M, K, N, G, group):
    """K slices of a wgmma config: its SPLIT_K if it states one (at most as many as leave none
    empty), else enough to give the GPU's SMs a program each where the tiles are fewer (a batch
    of 64-256), each slice at least two passes."""
    passes = triton.cdiv(K, _wgmma_pass(config, G, group)[1])
    split = config.get("SPLIT_K")
    if split is None:
        tiles = triton.cdiv(N, 16 * config["num_warps"] * config["J"]) * triton.cdiv(
            M, config["BLOCK_M"])
        split = 1
        while tiles * split < _sm_count() and 2 * split <= passes // 2:
            split *= 2
    return _without_empty_slices(split, passes)


def _without_empty_slices(split, steps):
    """At most ``split`` K slices of whole steps (``steps`` in all), as many as leave none
    empty (slices of ``cdiv(steps, split)`` steps; a short K: fewer than asked for)."""
    split = max(1, split)
    while split > 1 and (split - 1) * triton.cdiv(steps, split) >= steps:
        split -= 1
    return split


@functools.lru_cache(maxsize=None)
def _sm_count_of(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count():
    """The current GPU's SMs (132, an H100's, without one)."""
    return _sm_count_of(torch.cuda.current_device()) if torch.cuda.is_available() else 132


def _wgmma_launch_shape(config, M, K, N, G, group, x_dtype, s_dtype):
    """``(grid, k_per_split, constexprs)`` of a wgmma config (constexprs in the kernel's
    order)."""
    warps, block_m = config["num_warps"], config["BLOCK_M"]
    block_n = 16 * warps * config["J"]
    reload, pass_k = _wgmma_pass(config, G, group)
    split_k = _wgmma_split_k(config, M, K, N, G, group)
    k_per_split = triton.cdiv(triton.cdiv(K, pass_k), split_k) * pass_k
    grid = (triton.cdiv(N, block_n), split_k, triton.cdiv(M, block_m))
    constexprs = dict(BLOCK_M=block_m, KR=config["KR"], J=config["J"], WARPS=warps,
                      STAGES=config["STAGES"], RELOAD=reload, SPLIT=split_k > 1,
                      WHOLE=K % pass_k == 0,
                      ONE_GROUP=G == 1, HALF2=s_dtype == x_dtype,
                      S_PARTS=x_dtype == torch.bfloat16 and s_dtype == torch.float16,
                      EVEN=N % block_n == 0,
                      CDT=_compute_dtype(x_dtype), ASM=not INTERPRETED, TRIVIAL=not INTERPRETED)
    return grid, k_per_split, constexprs


def _build_wgmma_plan(entry, config, x2, out2, lead):
    """The plan of a wgmma config (:mod:`epmq_kernels.w4a16_wgmma`)."""
    # (rows bounded by this config's own grid, in _gluon_plan: by the space's least BLOCK_M, a
    # forced BLOCK_M = 256 was refused on 4.2M to 16.8M rows, which its grid launches)
    _require_mma(x2, entry, wgmma=True, bound_rows=False)
    _require_whole_steps("wgmma", config, entry)
    if not INTERPRETED and config["num_warps"] % 4:
        raise ValueError(f"wgmma config {config}: num_warps must be a multiple of 4 (a "
                         f"warpgroup issues each MMA)")
    if config["STAGES"] not in (3, 4):
        raise ValueError(f"wgmma config {config}: STAGES must be 3 or 4 (the ring keeps one "
                         f"stage being read, one landing and one being refilled; one allocation "
                         f"each, four at most)")
    M, K = x2.shape
    grid, k_per_split, constexprs = _wgmma_launch_shape(config, M, K, entry.N, entry.G,
                                                        entry.group, x2.dtype,
                                                        entry.tensors()[1].dtype)
    return _gluon_plan("wgmma", _w4a16_wgmma_kernel, entry, config, x2, out2, lead, grid,
                       k_per_split, constexprs)


# ----------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------
@on_tensor_device  # (they launch kernels too: autotuning, the dqmm chunk kernel)
def w4a16_plan(x, qweight, scales, zeros, group_size, g_idx=None):
    """What :func:`w4a16_matmul` will run for these arguments on the GPU (autotuning first if
    nothing is cached): ``dict(path=..., config=..., gather=..., best_ms_by_path=...,
    rejected=..., timings=...)``: the fastest time of each competing path (``gemv+half2``, and
    dqmm's column slabs and two streams, ``dqmm+slabs+2streams``, apart) and every candidate's
    time, fastest first (``[(ms, config with its PATH)]``), when this process tuned the bucket
    (empty when the choice came from the disk cache), the configs the tuning timed but
    rejected as wrong, and whether act-order weights run on their sorted codes
    (``act_order_sorted``; then the rest describes the sorted problem). For benchmarks and
    logs."""
    group_size = _as_group_size(group_size)
    K, N, G = _check_arguments(x, qweight, scales, zeros, group_size, g_idx)
    entry = _entry_for(qweight, scales, zeros, g_idx, group_size, K, N, G)
    x2 = x.reshape(-1, K)
    act_order = entry.sorted_form()
    if act_order is not None:
        x2, entry = _act_order_gather(act_order, x2), act_order[2]
    paths = _runnable_paths(x2, entry)
    path, config = _choose(paths, x2, entry)
    best = {}
    timings = sorted(autotune_cache.TIMINGS.get(("w4a16", _tuning_key(paths, x2, entry)), []),
                     key=lambda t: t[0])
    for ms, candidate in timings:
        name = (candidate["PATH"] + ("+half2" if candidate.get("HALF2") else "")
                + ("+slabs" if "CHUNK_N" in candidate else "")
                + ("+2streams" if candidate.get("STREAMS", 1) == 2 else ""))
        if ms < best.get(name, float("inf")):
            best[name] = ms
    rejected = [dict(c) for c in autotune_cache.REJECTED.get(("w4a16", _tuning_key(paths, x2, entry)),
                                                             [])]
    return dict(path=path, config=config, best_ms_by_path=best, rejected=rejected,
                timings=[(ms, dict(candidate)) for ms, candidate in timings],
                act_order_sorted=act_order is not None,
                gather=_needs_gather(path, config, G, entry.group, entry.permuted, x2.dtype))


@on_tensor_device
def w4a16_dequantize(qweight, scales, zeros, group_size, g_idx=None, *, k_first=0, k_rows=None,
                     dtype=torch.float16, out=None, backend="auto"):
    """Rows ``k_first .. k_first + k_rows`` of the dense weight ``(q - z) * s`` in ``dtype``
    (each element rounded once), by the dqmm path's chunk kernel (CUDA tensors, or CPU tensors
    under TRITON_INTERPRET with ``backend="triton"``) or by the torch reference."""
    group_size = _as_group_size(group_size)
    K = qweight.shape[0] * 8 if isinstance(qweight, torch.Tensor) and qweight.dim() == 2 else 8
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    if backend not in ("auto", "triton", "torch"):  # (a misspelt one took the torch path silently)
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    device = qweight.device if isinstance(qweight, torch.Tensor) else "cpu"
    K, N, G = _check_arguments(torch.empty((0, K), dtype=dtype, device=device), qweight, scales,
                               zeros, group_size, g_idx)
    for name, value in (("k_first", k_first), ("k_rows", k_rows)):
        # (numpy's integers reached the kernel as such: a bare InterpreterError; a float a bare TypeError)
        if value is not None and not is_integer(value):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    k_first = int(k_first)
    k_rows = K - k_first if k_rows is None else int(k_rows)
    if k_first % 8 or k_rows % 8 or k_first < 0 or k_rows < 0 or k_first + k_rows > K:
        raise ValueError(f"rows [{k_first}, {k_first + k_rows}) must be multiples of 8 within "
                         f"[0, {K}]")
    if out is not None and (not isinstance(out, torch.Tensor) or out.dtype != dtype
                            or tuple(out.shape) != (k_rows, N) or out.device != qweight.device):
        raise ValueError(f"out must be a {dtype} tensor of shape {(k_rows, N)} on {device}, got {_given(out)}")
    if out is not None and any(stride == 0 and size > 1 for stride, size in zip(out.stride(), out.shape)):
        # (an expanded out: the kernel wrote each of its elements over the others, silently, where
        # the torch backend's copy_ refuses it)
        raise ValueError(f"out has elements that share memory (strides {tuple(out.stride())}: an expanded "
                         f"tensor?); give one whose elements are each its own, e.g. out.clone()")
    use_triton = backend == "triton" or (backend == "auto" and qweight.is_cuda and not INTERPRETED)
    asked = _derivatives_asked(scales=scales) if use_triton else None
    if asked:  # (the kernel has no derivative: see _NoDerivative)
        return _without_derivative("w4a16_dequantize", asked, out, dict(scales=scales), lambda: w4a16_dequantize(
            qweight, scales.detach(), zeros, group_size, g_idx, k_first=k_first, k_rows=k_rows, dtype=dtype,
            backend=backend))
    if out is not None and shares_memory(out, qweight, scales, zeros, g_idx):
        # (programs wrote rows of out over scales that later programs still read)
        return out.copy_(w4a16_dequantize(qweight, scales, zeros, group_size, g_idx, k_first=k_first,
                                          k_rows=k_rows, dtype=dtype, backend=backend))
    if out is None:
        out = torch.empty((k_rows, N), dtype=dtype, device=device)
    group = K if group_size == -1 else group_size
    if not use_triton:
        rows = slice(k_first, k_first + k_rows)
        if g_idx is not None:
            _g_idx_is_static(g_idx, K, G, group)
        W = dequantize_int4_weight(qweight, scales, zeros, group_size, g_idx)[rows]
        return out.copy_(W.to(dtype))
    check_device(qweight, scales, zeros, *([g_idx] if g_idx is not None else []))
    if k_rows == 0 or N == 0:
        return out
    entry = _entry_for(qweight, scales, zeros, g_idx, group_size, K, N, G)
    config = INTERPRETER_CONFIG["dqmm"] if INTERPRETED else AUTOTUNE_SPACE["dqmm"][0]
    gather = _needs_gather("dqmm", config, G, group, entry.permuted)
    gather = gather or k_first % (8 * config["BLOCK_R"]) != 0  # tiles must start at a group edge
    g_idx_arg = g_idx if gather and entry.permuted else qweight
    _dequant_launch(qweight, scales, zeros, g_idx_arg, out, k_first, k_rows, group, config,
                    gather, gather and entry.permuted)(out, out, None)
    return out


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
        path: force ``"gemv"``, ``"splitk"``, ``"gemm"`` or ``"dqmm"`` instead of choosing by M.
        config: force a launch config (a dict like those of ``AUTOTUNE_SPACE`` for the path: an
            option the path has not, or one missing that it needs, is refused).
        backend: ``"auto"`` (Triton for CUDA tensors, the torch reference for CPU tensors),
            ``"triton"`` (also CPU tensors under TRITON_INTERPRET) or ``"torch"``.
    Returns ``[..., N]`` in x's dtype, accumulated in fp32 (``dqmm``: see the module docstring).
    Accuracy: within the output's own rounding, with two limits. The 16-bit GEMV (M = 1) sums
    codes biased by 128 and takes the bias off afterwards, so an activation of |x| beyond ~1e3
    next to a code near its zero point costs more than the output's rounding (fp16 x = 6e4:
    0.06 absolute against 6e-4); fp32 activations take an exact path instead. The tensor-core
    paths use the scales in the activations' dtype, and all but ``mma`` may dequantize the
    weight into it (``dqmm``, ``wgmma``, and ``splitk`` or ``gemm`` tiles that straddle groups
    or, without SCALE_AFTER, K slices that span them; the autotuner may pick one at any M): for
    fp16 activations keep the scales in float16's normal range (the checkpoint format's dtype)
    and every weight ``(q - z) s`` within float16's range (65504), as an fp16 model's are.
    Beyond it such a weight is +-inf there, and the outputs of its column inf, or NaN where its
    infinite weights meet activations of both signs or a zero, where the reference is finite
    (the GEMV's and mma's stay so); bf16 and fp32 activations have the room.
    Non-finite activations: a NaN gives NaN in every output, as in the reference. An inf at M = 1
    makes every output of the 16-bit GEMV without HALF2 NaN (the bias and zero-point terms it
    takes off after the sum are inf too: inf - inf), where the reference gives +-inf, NaN only
    where that input's weight is 0 (the other paths follow it); matching it would take ``q - z``
    per code, the subtraction per code that path exists to save. Neither case is checked per
    call: that would be a pass over the activations or the weights.

    The kernels have no derivative: with ``x`` or ``scales`` requiring grad the value is theirs and
    backward through it is refused (a forward-mode tangent at once); ``backend="torch"``'s product
    has one.

    The first call with a set of weight tensors checks every argument; later calls with the
    same tensors (unchanged: same objects, data pointers and versions) and activations of the
    same shape, strides and dtype reuse the launch plan of the first (see "Host overhead").
    """
    if type(group_size) is not int:
        group_size = _as_group_size(group_size)
    # (the kernels have no derivative, which an operand asking for one is told where it is taken:
    # _NoDerivative; the flags are read first, the steady-state call's cost; no dual level open is
    # -1, a private name: without it the tangents are looked up)
    if (isinstance(x, torch.Tensor) and (x.requires_grad or getattr(forward_ad, "_current_level", 0) >= 0
                                         or getattr(scales, "requires_grad", False))
            and (backend == "triton" or (backend == "auto" and x.is_cuda and not INTERPRETED))):
        asked = _derivatives_asked(x=x, scales=scales)
        if asked:
            x_, scales_ = x.detach(), scales.detach() if isinstance(scales, torch.Tensor) else scales
            return _without_derivative("w4a16_matmul", asked, out, dict(x=x, scales=scales), lambda: w4a16_matmul(
                x_, qweight, scales_, zeros, group_size, g_idx, path=path, config=config, backend=backend))
    if out is not None and shares_memory(out, x, qweight, scales, zeros, g_idx):
        # the kernels would write y while other programs still read x or the weights (dqmm
        # dequantizes a later chunk from scales its first product has overwritten): into a new
        # tensor first, as torch.mm(a, b, out=a) does
        y = w4a16_matmul(x, qweight, scales, zeros, group_size, g_idx, path=path, config=config,
                         backend=backend)
        _check_out(out, x, y.shape[-1])
        return out.copy_(y)
    if (path is None and config is None and type(group_size) is int
            and isinstance(x, torch.Tensor)):
        entry = _ENTRIES.get((id(qweight), id(scales), id(zeros), id(g_idx), group_size))
        if (entry is not None and (backend == "triton" or (backend == "auto" and entry.is_cuda
                                                           and not INTERPRETED))
                and entry.current(qweight, scales, zeros, g_idx)):
            where = entry.stream()
            if where is not None and where[0] != entry.dev_index:
                with torch.cuda.device(entry.dev_index):  # (see _runtime.on_tensor_device)
                    return w4a16_matmul(x, qweight, scales, zeros, group_size, g_idx, out=out,
                                        backend=backend)
            plan = entry.plans.get(entry.plan_key(x, out, where))
            if plan is not None and plan.usable():
                return plan(x, out, where)
    return _matmul(x, qweight, scales, zeros, group_size, g_idx, out, path, config, backend)


def _derivatives_asked(**operands):
    """The derivatives the caller asks of the float ``operands`` (by name), as (reverse, forward)
    lists of their names (reverse: they require grad, grad mode on; forward: they carry a tangent),
    or None."""
    operands = [(name, t) for name, t in operands.items() if isinstance(t, torch.Tensor)]
    reverse = [name for name, t in operands if t.requires_grad and torch.is_grad_enabled()]
    forward = [name for name, t in operands if forward_ad.unpack_dual(t).tangent is not None]
    return (reverse, forward) if reverse or forward else None


def _names_do(names, one, several):
    """``"x asks"``, ``"x and scales ask"``: the names and a verb that agrees with them."""
    return f"{' and '.join(names)} {one if len(names) == 1 else several}"


def _instead(function):
    return ("run the dequantized product instead (backend='torch', or x @ dequantize_int4_weight(...))"
            if function == "w4a16_matmul" else "use backend='torch' (or dequantize_int4_weight)")


class _NoDerivative(torch.autograd.Function):
    """The value of a kernel (``product()``), whose backward refuses: the kernels have no derivative,
    and a result with no grad_fn left the operands without their gradient through it, silently (an
    adapter trained beside the kernels learnt from the rest of the loss alone)."""

    @staticmethod
    def forward(ctx, function, names, product, *operands):
        ctx.function, ctx.names = function, names
        return product()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(f"{ctx.function}'s kernels have no derivative, and {_names_do(ctx.names, 'asks', 'ask')} "
                           f"for a gradient through it: {_instead(ctx.function)}, or detach {ctx.names[0]}")


def _without_derivative(function, asked, out, operands, product):
    """``function``'s value for ``operands`` (by name) that ask for a derivative its kernels cannot
    give, ``product()`` computing it from them detached: an error where the derivative is taken
    (backward; a forward-mode one at once, and with ``out=``, which is the result itself)."""
    reverse, forward = asked
    if forward:
        raise ValueError(f"{function}'s kernels have no derivative, and {_names_do(forward, 'carries', 'carry')} "
                         f"a forward-mode tangent, which they would drop (jvp reporting 0): {_instead(function)}")
    if out is not None:  # (as torch's out= ops refuse them: out itself is the result, with no grad_fn to give)
        raise ValueError(f"{function}'s out= takes no operand that requires grad "
                         f"({_names_do(reverse, 'does', 'do')}): the kernels have no derivative; call it without "
                         f"out=, or under torch.no_grad()")
    return _NoDerivative.apply(function, reverse, product, *(operands[name] for name in reverse))


# The same product as a torch custom op (``torch.ops.epmq.w4a16_matmul``), so that
# ``torch.compile`` traces through a model that calls it, without a graph break: the launcher's
# host-side plan cache (ids, data pointers) is opaque to it. Its fake implementation gives the
# output's shape and dtype.
@torch.library.custom_op("epmq::w4a16_matmul", mutates_args=())
def w4a16_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor, group_size: int,
                    g_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    return w4a16_matmul(x, qweight, scales, zeros, group_size, g_idx)


@w4a16_matmul_op.register_fake
def _w4a16_matmul_fake(x, qweight, scales, zeros, group_size, g_idx=None):
    return x.new_empty((*x.shape[:-1], qweight.shape[1]))


# Options of a forced config whose values are tile sizes (tl.arange and the Gluon layouts take
# powers of two only), and those whose kernels tell only some values apart (another one ran as
# one of them: a benchmark timed another config than the one it reported)
_POWER_OF_TWO_OPTIONS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "num_warps", "KR", "J")
_CHOICES = {("gemv", "PREFETCH"): (1, 2), ("dqmm", "STREAMS"): (1, 2)}


def _check_config(path, config):
    """A clear error where a forced ``config`` names an option ``path`` has not (a misspelt one
    was run without, silently: a benchmark timed another config) or lacks one it needs (a bare
    KeyError deep in the plan), or gives one a value it cannot run (GROUP_M = 0 or -1: NaN, or
    writes before the output; SPLIT_K = 0: a bare ZeroDivisionError). Returns the config
    without its PATH, numpy's values (a sweep's, read from an array) as Python's."""
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict of launch options, got {type(config).__name__}")
    if path not in PATHS:  # (a PATH the config names)
        raise ValueError(f"config names PATH {path!r}, not one of {PATHS}")
    configs = [*AUTOTUNE_SPACE[path], INTERPRETER_CONFIG[path]]
    known = set().union(*configs, _OPTIONAL[path])
    needed = set.intersection(*(set(c) for c in configs)) - set(_OPTIONAL[path])
    if config.get("PATH", path) != path:  # (an autotune candidate names its path)
        raise ValueError(f"config names PATH {config['PATH']!r}, but it is forced on the {path} path")
    unknown = sorted(set(config) - known - {"PATH"})
    if unknown:
        raise ValueError(f"the {path} path has no option {', '.join(unknown)} (config {config}); "
                         f"its options are {', '.join(sorted(known))}")
    missing = sorted(needed - set(config))
    if missing:
        raise ValueError(f"the {path} path needs {', '.join(missing)} in a forced config, got {config}")
    if path == "dqmm" and "CHUNK_K" not in config and "CHUNK_N" not in config:
        raise ValueError(f"the dqmm path needs CHUNK_K or CHUNK_N in a forced config, got {config}")
    checked = {}
    for name, value in config.items():
        if name == "PATH":
            continue
        space = [c[name] for c in configs if name in c]
        if space and all(is_flag(v) for v in space):
            if not is_flag(value):
                raise ValueError(f"the {path} path's {name} must be True or False, got {value!r}")
            checked[name] = bool(value)
            continue
        choices = _CHOICES.get((path, name))
        least = 8 if name == "BLOCK_K" else 1  # (a tile of K is whole packed words: BLOCK_K / 8 rows)
        if (not is_integer(value) or value < least or (choices is not None and value not in choices)
                or (name in _POWER_OF_TWO_OPTIONS and value & (value - 1))):
            must = (f"one of {choices}" if choices is not None else "a power of two"
                    if name in _POWER_OF_TWO_OPTIONS else "a positive integer")
            must += f", at least {least}" if least > 1 else ""
            raise ValueError(f"the {path} path's {name} must be {must}, got {value!r}")
        checked[name] = int(value)
    return checked


def _given(out) -> str:
    """What an out= refused was, for its error (the wrong dtype, shape or device, or no tensor)."""
    if isinstance(out, torch.Tensor):
        return f"a {out.dtype} tensor of shape {tuple(out.shape)} on {out.device}"
    return f"a {type(out).__module__}.{type(out).__qualname__}"


def _check_out(out, x, N):
    lead = x.shape[:-1]
    if (not isinstance(out, torch.Tensor) or out.dtype != x.dtype
            or tuple(out.shape) != (*lead, N) or out.device != x.device):
        raise ValueError(f"out must be a {x.dtype} tensor of shape {(*lead, N)} on {x.device}, got {_given(out)}")


@on_tensor_device
def _matmul(x, qweight, scales, zeros, group_size, g_idx, out, path, config, backend):
    """The first call for a set of weights and activation layout (or one with forced options):
    every check, then a plan, which is kept for later calls where it can be."""
    K, N, G = _check_arguments(x, qweight, scales, zeros, group_size, g_idx)
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if path is not None and path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    lead = x.shape[:-1]
    if out is not None:
        _check_out(out, x, N)
    use_triton = backend == "triton" or (backend == "auto" and x.is_cuda and not INTERPRETED)
    group = K if group_size == -1 else group_size
    if not use_triton:
        if g_idx is not None:
            _g_idx_is_static(g_idx, K, G, group)  # the same range check as the kernels
        y = w4a16_matmul_reference(x, qweight, scales, zeros, group_size, g_idx,
                                   dtype=torch.float32).to(x.dtype)
        if out is not None:
            out.copy_(y)
            return out
        return y
    if abs(x.stride(-1)) * K >= INT32_OFFSETS:
        # the kernels' offsets along K (k * stride) are int32, which an activation read
        # transposed overflows (X.T of 2^31 / K tokens): copied, as the plan for it is keyed
        x = x.contiguous()
    names = ["x", "qweight", "scales", "zeros"] + (["g_idx"] if g_idx is not None else [])
    check_device(x, qweight, scales, zeros, *([g_idx] if g_idx is not None else []), names=names)
    entry = _entry_for(qweight, scales, zeros, g_idx, group_size, K, N, G)

    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    direct = out is None or out.is_contiguous()
    if out is None:
        result = torch.empty((*lead, N), dtype=x.dtype, device=x.device)
        out2 = result.view(M, N)
    else:
        result = out
        out2 = out.view(M, N) if direct else torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M > 0 and N > 0:
        forced = path is not None or config is not None
        run = entry
        act_order = None if forced else entry.sorted_form()  # (forced: the gather paths' tests)
        if act_order is not None:
            run, x2 = act_order[2], _act_order_gather(act_order, x2)
        # (a sort wanted but not made, for want of memory: no plan kept, the next call retries)
        keep = not (entry.permuted and ACT_ORDER_REPACK and entry._sorted is None)
        if config is not None:
            # (an autotune candidate names its path: there, not the one M would choose)
            path = path or (config.get("PATH") if isinstance(config, dict) else None) or _path_for(M)
            config = _check_config(path, config)
            if path == "splitk" and "BLOCK_M" not in config:
                config["BLOCK_M"] = _block_m_for_splitk(M)
        else:
            if path in ("mma", "wgmma"):
                _require_mma(x2, entry, wgmma=path == "wgmma")
            # (rows past the grid's limit fail every config of these paths alike: tuned, each
            # plan's clear error was swallowed and 'no candidate config could run' raised)
            if path in ("gemv", "mma"):
                _check_grid(path, (1, 1, _least_row_blocks(path, M)), M)
            path, config = _choose((path,) if path is not None else _runnable_paths(x2, run),
                                   x2, run)
        plan = _build_plan(run, path, config, x2, out2, lead)
        try:
            plan(x2, out2)
        except BaseException:
            # A launch that did not complete may leave partial sums behind: never reuse them.
            _drop_workspace(x2.device)
            raise
        if not forced and direct and keep and not _capturing(x2.device):
            if len(entry.plans) >= _MAX_PLANS:
                entry.plans.clear()
            if act_order is not None:
                plan = _ActOrderPlan(act_order, plan)
            entry.plans[entry.plan_key(x, out, entry.stream())] = plan
    if out is not None and not direct:
        out.copy_(out2.view(*lead, N))
    return result
