"""W4A16 matmul: every path against a float64 dequantized reference on fresh random inputs.

On CPU the kernels run under TRITON_INTERPRET with the small interpreter configs; the CUDA class
runs model-sized shapes through the autotuned launcher. Errors are measured against the bound
``|x| @ |W|`` (the magnitude a rounding error scales with), so one tolerance per dtype works for
every shape.
"""

import itertools
import json
import os
import re
import textwrap
import weakref

import pytest
import torch
import triton
import triton.language as tl

from epmq_kernels import autotune_cache
from epmq_kernels import w4a16 as W
from epmq_kernels.packing import pack_int4, unpack_int4
from epmq_kernels.w4a16 import (
    AUTOTUNE_SPACE,
    INTERPRETER_CONFIG,
    _g_idx_is_static,
    dequantize_int4_weight,
    w4a16_matmul,
    w4a16_matmul_reference,
)
from gpu_compile import Launches, compile_as_launched, ptxas_available, run_compile_script

# Relative to |x| @ |W|: the output rounding (2^-11 fp16, 2^-8 bf16) plus the weight rounding.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (group_size, g_idx kind): per channel; tiles inside one group (32); tiles straddling groups
# (16, smaller than the interpreter's BLOCK_K, so per-row groups); a g_idx equal to k // 32
# (static: must take the no-gather path); a permuted g_idx (act-order: gathered).
GROUPINGS = [(-1, None), (32, None), (16, None), (32, "static"), (32, "permuted")]


def make_problem(gen, K, N, group_size, g_idx_kind=None, scales_dtype=torch.float16,
                 zeros_dtype=torch.uint8):
    G = 1 if group_size == -1 else K // group_size
    codes = torch.randint(0, 16, (K, N), generator=gen)
    qweight = pack_int4(codes)
    scales = (torch.rand(G, N, generator=gen) * 0.02 + 0.002).to(scales_dtype)
    zeros = torch.randint(0, 16, (G, N), generator=gen).to(zeros_dtype)
    g_idx = None
    if g_idx_kind == "static":
        g_idx = (torch.arange(K) // group_size).to(torch.int32)
    elif g_idx_kind == "permuted":
        g_idx = (torch.arange(K) // group_size)[torch.randperm(K, generator=gen)].to(torch.int32)
    elif g_idx_kind == "monotone":  # (nondecreasing runs of unequal lengths, some groups empty)
        g_idx = torch.sort(torch.randint(0, G, (K,), generator=gen)).values.to(torch.int32)
    return qweight, scales, zeros, g_idx


def assert_close_to_reference(y, x, qweight, scales, zeros, group_size, g_idx):
    reference = w4a16_matmul_reference(x, qweight, scales, zeros, group_size, g_idx)
    W = dequantize_int4_weight(qweight, scales, zeros, group_size, g_idx)
    bound = (x.double().abs().reshape(-1, x.shape[-1]) @ W.abs()).reshape(reference.shape)
    assert y.dtype == x.dtype and y.shape == reference.shape
    assert torch.isfinite(y).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    error = ((y.double() - reference).abs() / bound.clamp_min(1e-30)).max().item()
    assert error <= TOLERANCE[x.dtype], f"max error {error:.3g} relative to |x| @ |W|"


# ----------------------------------------------------------------------------------------------
# Every path, dtype and grouping (interpreted on CPU)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size,g_idx_kind", GROUPINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("path,M,K,N", [("gemv", 1, 128, 40), ("splitk", 3, 64, 72),
                                        ("gemm", 17, 128, 40), ("dqmm", 5, 160, 37)])
def test_path_matches_reference(gen, path, M, K, N, dtype, group_size, g_idx_kind):
    qweight, scales, zeros, g_idx = make_problem(gen, K, N, group_size, g_idx_kind)
    x = torch.randn(M, K, generator=gen).to(dtype)
    out = torch.full((M, N), float("nan"), dtype=dtype)  # poison: every element must be written
    y = w4a16_matmul(x, qweight, scales, zeros, group_size, g_idx, out=out, path=path,
                     backend="triton")
    assert y is out
    assert_close_to_reference(y, x, qweight, scales, zeros, group_size, g_idx)


# (group_size, g_idx kind) the mma path takes: per channel, groups of one or several of its
# 32-input steps, a static g_idx
MMA_GROUPINGS = [(-1, None), (32, None), (64, None), (32, "static")]


@pytest.mark.parametrize("group_size,g_idx_kind", MMA_GROUPINGS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("path,M,K,N", [
    ("mma", 1, 128, 40), ("mma", 3, 64, 72), ("mma", 16, 192, 136), ("mma", 17, 64, 64),
    ("wgmma", 17, 64, 40), ("wgmma", 5, 192, 136), ("wgmma", 40, 320, 64)])
def test_mma_paths_match_reference(gen, path, M, K, N, dtype, group_size, g_idx_kind):
    """The Gluon kernels, interpreted through their shim (the same source line for line; for
    wgmma, shared buffers as tensors and the MMA as a dot), with the weight in the MMA
    operand's registers. mma: batch tiles of 8 and 16 and several of them, N not a multiple of
    a warp's 64 columns (masked) and a multiple (unmasked), K slices past K. wgmma: several
    batch tiles, the last one partial; N masked (not a multiple of its 32 columns) and not; K
    over 2 to 10 steps (the ring of 3 stages wraps)."""
    qweight, scales, zeros, g_idx = make_problem(gen, K, N, group_size, g_idx_kind)
    x = torch.randn(M, K, generator=gen).to(dtype)
    out = torch.full((M, N), float("nan"), dtype=dtype)
    w4a16_matmul(x, qweight, scales, zeros, group_size, g_idx, out=out, path=path,
                 backend="triton")
    assert_close_to_reference(out, x, qweight, scales, zeros, group_size, g_idx)


@pytest.mark.parametrize("config", [dict(KR=4, UNROLL=1, SPLIT_K=2, num_warps=2, PREFETCH=True),
                                    dict(KR=1, UNROLL=4, SPLIT_K=1, num_warps=2, PREFETCH=False)],
                         ids=["kr4-w2-prefetch", "kr1-w2"])
@pytest.mark.parametrize("group_size,N", [(128, 200), (-1, 256)])
@pytest.mark.parametrize("M", [5, 16])
def test_mma_warps_and_steps(gen, config, group_size, N, M):
    """Two warps (the column order across warps) and steps of 128 inputs (KR = 4: four packed
    rows a lane) beside the interpreter's one-warp KR = 1 default, masked and unmasked."""
    qweight, scales, zeros, _ = make_problem(gen, 256, N, group_size)
    x = torch.randn(M, 256, generator=gen).half()
    out = torch.full((M, N), float("nan"), dtype=torch.float16)
    w4a16_matmul(x, qweight, scales, zeros, group_size, out=out, path="mma", config=config,
                 backend="triton")
    assert_close_to_reference(out, x, qweight, scales, zeros, group_size, None)


@pytest.mark.parametrize("config", [dict(BLOCK_M=16, KR=2, J=4, num_warps=2, STAGES=3, SPLIT_K=1),
                                    dict(BLOCK_M=8, KR=4, J=1, num_warps=4, STAGES=4)],
                         ids=["kr2-j4-w2-s3", "kr4-j1-w4-s4-splitk"])
@pytest.mark.parametrize("dtype,scales_dtype", [(torch.float16, torch.float16),
                                                (torch.float16, torch.float32),
                                                (torch.bfloat16, torch.bfloat16),
                                                (torch.bfloat16, torch.float16)],
                         ids=["fp16-half2", "fp16-fp32scales", "bf16-half2", "bf16-fp16scales"])
@pytest.mark.parametrize("group_size,N", [(128, 200), (-1, 256)])
def test_wgmma_tiles_and_scales(gen, config, dtype, scales_dtype, group_size, N):
    """Warps and words a load (the column order), steps of 64 and 128 inputs, rings of 3 and 4
    stages (the look-ahead past K), one K slice and as many as the SMs ask for (2 here, of
    256 inputs: the workspace's protocol), and each way the weight is scaled: by a half2
    multiply where the scales are of the activation dtype, through fp32 otherwise (per
    channel: the result)."""
    qweight, scales, zeros, _ = make_problem(gen, 512, N, group_size, scales_dtype=scales_dtype)
    x = torch.randn(21, 512, generator=gen).to(dtype)
    out = torch.full((21, N), float("nan"), dtype=dtype)
    w4a16_matmul(x, qweight, scales, zeros, group_size, out=out, path="wgmma", config=config,
                 backend="triton")
    assert_close_to_reference(out, x, qweight, scales, zeros, group_size, None)


# (group, K, N, M, config): groups of 1-8 steps against rings of 3 and 4 stages (parameters
# read every gcd(group steps, STAGES) steps: 1, 2, 3, 4), K slices that start inside a group,
# a per-channel K that ends inside a step (the last pass's steps past the slice read zeros)
WGMMA_PASSES = [
    (96, 192, 40, 19, dict(BLOCK_M=16, KR=1, J=2, num_warps=1, STAGES=3, SPLIT_K=1)),
    (64, 320, 40, 19, dict(BLOCK_M=16, KR=2, J=1, num_warps=2, STAGES=4, SPLIT_K=2)),
    (-1, 80, 40, 19, dict(BLOCK_M=16, KR=1, J=2, num_warps=1, STAGES=3, SPLIT_K=1)),
    (96, 672, 40, 19, dict(BLOCK_M=16, KR=1, J=2, num_warps=1, STAGES=4, SPLIT_K=3)),
    (192, 576, 40, 17, dict(BLOCK_M=16, KR=1, J=2, num_warps=1, STAGES=4, SPLIT_K=2)),
    (256, 768, 32, 33, dict(BLOCK_M=16, KR=1, J=2, num_warps=1, STAGES=4, SPLIT_K=1)),
    (128, 640, 40, 5, dict(BLOCK_M=16, KR=1, J=2, num_warps=1, STAGES=3, SPLIT_K=4)),
    (384, 1152, 16, 18, dict(BLOCK_M=16, KR=2, J=1, num_warps=1, STAGES=3, SPLIT_K=2)),
    (-1, 208, 40, 19, dict(BLOCK_M=16, KR=2, J=2, num_warps=1, STAGES=4, SPLIT_K=2)),
]


@pytest.mark.parametrize("group_size,K,N,M,config", WGMMA_PASSES,
                         ids=[f"g{c[0]}-K{c[1]}-S{c[4]['STAGES']}-sk{c[4]['SPLIT_K']}"
                              for c in WGMMA_PASSES])
def test_wgmma_passes_groups_and_slices(gen, group_size, K, N, M, config):
    """Where a pass's parameters come from (each group's, at every end of a group) and where
    a slice starts and ends, against the float64 reference."""
    qweight, scales, zeros, _ = make_problem(gen, K, N, group_size)
    x = torch.randn(M, K, generator=gen).half()
    out = torch.full((M, N), float("nan"), dtype=torch.float16)
    w4a16_matmul(x, qweight, scales, zeros, group_size, out=out, path="wgmma", config=config,
                 backend="triton")
    assert_close_to_reference(out, x, qweight, scales, zeros, group_size, None)


def _weight_rounded_once(gen, dtype, scales_dtype, device="cpu"):
    """``(x, qweight, scales, zeros, W)``: a 64 x 64 problem of two groups of 32, ``x`` the
    identity (row k picks input k: every code position of a word, both nibbles of every byte)
    and ``W`` the weight ``(q - z) s`` rounded once to ``dtype``, which ``x @ W`` must be."""
    K, N = 64, 64
    codes = torch.randint(0, 16, (K, N), generator=gen)
    zeros = torch.randint(0, 16, (2, N), generator=gen).to(torch.uint8)
    scales = (torch.rand(2, N, generator=gen) * 0.02 + 0.002).to(scales_dtype)
    group = torch.arange(K) // 32
    W = ((codes - zeros[group].int()).float() * scales[group].float()).to(dtype)
    x = torch.eye(K, dtype=dtype)
    return (x.to(device), pack_int4(codes).to(device), scales.to(device), zeros.to(device),
            W.to(device))


@pytest.mark.parametrize("dtype,scales_dtype", [(torch.float16, torch.float32),
                                                (torch.bfloat16, torch.float32),
                                                (torch.bfloat16, torch.float16)])
def test_wgmma_weight_rounds_once(gen, dtype, scales_dtype):
    """The wgmma path rounds ``(q - z) s`` to the activation dtype once, as dqmm's dequantized
    chunk does on the GPU: the identity's product is the weight so rounded, bit for bit (fp16
    scales with bf16 activations: each scale as two bf16 parts, one FMA; random fp16 scales
    have a nonzero low part 7 times in 8)."""
    x, qweight, scales, zeros, W = _weight_rounded_once(gen, dtype, scales_dtype)
    y = w4a16_matmul(x, qweight, scales, zeros, 32, path="wgmma", backend="triton")
    assert torch.equal(y, W)


@triton.jit
def _codes_minus_zero_test_kernel(codes_ptr, zeros_ptr, out_ptr, n, CDT: tl.constexpr,
                                  WIDE_ZEROS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    b = W._biased_float(tl.load(codes_ptr + offs, mask=ok, other=0), CDT)
    z = tl.load(zeros_ptr + offs, mask=ok, other=0)
    tl.store(out_ptr + offs, W._codes_minus_zero(b, z, CDT, WIDE_ZEROS), mask=ok)


@triton.jit
def _biased_zero_test_kernel(zeros_ptr, out_ptr, n, CDT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(out_ptr + offs, W._biased_zero(tl.load(zeros_ptr + offs, mask=ok, other=0), CDT), mask=ok)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's bf16 conversions")
def test_codes_minus_zero_points_outside_the_grid_are_exact_in_bf16():
    """The dot kernel's ``q - z`` was ``(128 + q) - (128 + z)`` in bf16, whose 8 significant bits
    round 128 + z to an even neighbour for odd zero points from 129 (uint8 zero points of 8-bit
    grids, or v1 zeros gone astray): a whole group's weights a grid step off, compiled bf16 only.
    Zero points outside the 4-bit grid take WIDE_ZEROS: ``q - z`` formed in fp32, rounded once,
    exact for every code and uint8 zero point. (The interpreter has no bf16 arithmetic: the
    narrow path's subtraction runs compiled alone, the conversion that broke it runs here.)"""
    q, z = torch.meshgrid(torch.arange(16, dtype=torch.int32), torch.arange(256, dtype=torch.int32),
                          indexing="ij")
    q, z = q.flatten().contiguous(), z.flatten().to(torch.uint8).contiguous()
    for dtype, cdt in ((torch.bfloat16, tl.bfloat16), (torch.float16, tl.float16)):
        out = torch.full(q.shape, float("nan"), dtype=dtype)
        _codes_minus_zero_test_kernel[(triton.cdiv(q.numel(), 1024),)](q, z, out, q.numel(), CDT=cdt,
                                                                      WIDE_ZEROS=True, BLOCK=1024)
        assert torch.equal(out.float(), (q - z.int()).float()), dtype
    biased = torch.empty(256, dtype=torch.bfloat16)
    _biased_zero_test_kernel[(1,)](z[:256], biased, 256, CDT=tl.bfloat16, BLOCK=256)
    inexact = (biased.float() != z[:256].float() + 128).nonzero().flatten()
    assert inexact.tolist() == list(range(129, 256, 2))  # (why the narrow path is for the grid alone)


@pytest.mark.parametrize("path,config,group_size,g_idx_kind", [
    ("splitk", None, 32, None),  # pairs, the scale after the dot
    ("gemm", None, 32, None),  # codes one at a time, scaled in the tile, swapped
    ("splitk", dict(W.INTERPRETER_CONFIG["splitk"], SCALE_AFTER=False), 32, None),
    ("splitk", None, -1, None),  # one group: the scale after the loop
    ("gemm", None, 32, "permuted"),  # gathered per row
])
def test_dot_paths_dequantize_zero_points_past_the_bias_exactly(gen, path, config, group_size, g_idx_kind):
    """``(2^e + q) - (2^e + z)`` in the compute dtype is exact for zero points up to 2^e: in bf16,
    compiled, 128 (odd uint8 zero points from 129 were a grid step off); in fp16 1024, which the
    interpreter reproduces with int16 zero points. The identity's product is the weight ``(q - z)
    s`` rounded once to fp16 (fp16 scales), bit for bit, for zero points in and past the bias."""
    K = N = 64
    qweight, scales, _, g_idx = make_problem(gen, K, N, group_size, g_idx_kind)
    G = scales.shape[0]
    for lo, hi in ((16, 256), (1025, 2048)):
        zeros = torch.randint(lo, hi, (G, N), generator=gen).to(torch.int16)
        zeros[0, :8] = torch.arange(hi - 16, hi, 2, dtype=torch.int16) + 1  # (odd: never on an even grid)
        W_once = dequantize_int4_weight(qweight, scales, zeros, group_size, g_idx).half()
        x = torch.eye(K, dtype=torch.float16)
        y = w4a16_matmul(x, qweight, scales, zeros, group_size, g_idx, path=path, config=config,
                         backend="triton")
        assert torch.equal(y, W_once), (lo, hi, (y != W_once).sum())


def test_dot_launches_take_wide_zeros_outside_the_grid_alone(gen, monkeypatch):
    """Compiled (the launcher told so), a bf16 or fp16 dot launch takes WIDE_ZEROS where the zero
    points leave the 4-bit grid, and only there (the grid's keep the one subtraction a code);
    fp32 never (2^23 + z is exact). The launches that take it compile for sm_90 and sm_80."""
    launches = Launches(W._w4a16_dot_kernel, run=False)
    at = W._w4a16_dot_kernel.arg_names.index("WIDE_ZEROS")
    monkeypatch.setattr(W, "_w4a16_dot_kernel", launches)
    monkeypatch.setattr(W, "INTERPRETED", False)
    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    config = AUTOTUNE_SPACE["splitk"][0]
    for dtype, zs, wide in ((torch.bfloat16, zeros, False), (torch.bfloat16, zeros + 200, True),
                            (torch.float16, zeros + 16, True), (torch.float16, zeros, False),
                            (torch.float32, zeros + 200, False)):
        x = torch.randn(4, 64, generator=gen).to(dtype)
        w4a16_matmul(x, qweight, scales, zs, 32, path="splitk", config=config, backend="triton")
        assert launches.calls[-1][0][at] is wide, (dtype, wide)
    if ptxas_available():
        calls = [call for call in launches.calls if call[0][at]]
        proc = run_compile_script(compile_as_launched("epmq_kernels.w4a16", [("_w4a16_dot_kernel", calls)]),
                                  timeout=600)
        assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stdout[-600:] + proc.stderr[-3000:]


def test_dot_launches_read_the_zero_points_once_and_never_in_a_capture(gen, monkeypatch):
    """WIDE_ZEROS asks whether the zero points lie in the 4-bit grid, a read of the device (one
    host sync): made once per weights, so repeated forwards (cached plans, new batch sizes) read
    nothing more. Weights first seen inside a CUDA graph's capture (stood in for on the CPU) are
    not read, which would break it: they take WIDE_ZEROS (exact for any zero points) in a plan
    that is not kept, and once read outside, a later capture knows them."""
    launches = Launches(W._w4a16_dot_kernel, run=False)
    at = W._w4a16_dot_kernel.arg_names.index("WIDE_ZEROS")
    monkeypatch.setattr(W, "_w4a16_dot_kernel", launches)
    monkeypatch.setattr(W, "INTERPRETED", False)  # (bf16 stays bf16: WIDE_ZEROS is asked)
    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    # (counted from here: making the weights reads their codes' range too, pack_int4's one aminmax)
    reads = []
    aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: reads.append(a[0].dtype) or aminmax(*a, **k))
    entry = W._entry_for(qweight, scales, zeros, None, 32, 64, 40, 2)

    def forward(M):
        x = torch.randn(M, 64, generator=gen).to(torch.bfloat16)
        w4a16_matmul(x, qweight, scales, zeros, 32, backend="triton")
        return launches.calls[-1][0][at]

    with monkeypatch.context() as capture:
        capture.setattr(W, "_capturing", lambda device: True)
        assert forward(4) is True and reads == [] and not entry.plans
    assert [forward(M) for M in (4, 4, 4, 7, 7, 4)] == [False] * 6
    assert len(reads) == 1 and len(entry.plans) == 2
    with monkeypatch.context() as capture:
        capture.setattr(W, "_capturing", lambda device: True)
        assert forward(4) is False and len(reads) == 1


def test_mma_launch_flags_match_the_tiles_it_reads():
    """EVEN drops every mask and ONE_GROUP reads one scale per slice: both must follow from the
    geometry, which the interpreter cannot check (it reads out of bounds without complaint, and
    what it reads is multiplied by masked-off activations). A model of the kernel's tile loop
    over every candidate of a grid of problems: where EVEN, every tile (prefetched ones moved
    back inside K) lies inside K and N; where ONE_GROUP, each slice inside one group; and no
    candidate leaves a K slice empty."""
    for K, N, group_size in itertools.product((256, 768, 1024, 3072, 4096), (200, 256, 768, 2112),
                                              (-1, 32, 64, 128, 256)):
        if group_size != -1 and K % group_size:
            continue
        G = 1 if group_size == -1 else K // group_size
        group = K if group_size == -1 else group_size
        for M in (1, 16):
            for config in W._candidates("mma", M, K, G, group, False, torch.float16, N):
                grid, k_per_split, flags = W._mma_launch_shape(config, M, K, N, G, group,
                                                               torch.float16)
                block_k, block_n = 32 * flags["KR"], 64 * flags["WARPS"]
                assert grid[0] * block_n >= N and grid[1] * k_per_split >= K
                assert (grid[1] - 1) * k_per_split < K, (K, group_size, config)
                for pid_k in range(grid[1]):
                    k_start, k_end = pid_k * k_per_split, min(K, (pid_k + 1) * k_per_split)
                    if flags["ONE_GROUP"] and k_start < k_end:
                        assert k_start // group == (k_end - 1) // group, (K, group, config)
                    for g0 in range(k_start, k_end, flags["GROUP_K"]):
                        for k0 in range(g0, g0 + flags["GROUP_K"], block_k):
                            if flags["EVEN"]:
                                assert k0 + block_k <= K and N % block_n == 0, (K, N, config)
                                nxt = min(k0 + block_k, K - block_k)
                                assert 0 <= nxt and nxt + block_k <= K


def test_mma_choice_is_remembered_per_runnable_paths(gen, monkeypatch):
    """A layer whose zero points leave the 4-bit grid (GPTQ v1 zeros unpacked without the + 1
    reach 16) after one of the same shapes took the mma path: it must not be handed the other
    layer's remembered mma choice (the key names the paths that can run)."""
    monkeypatch.setattr(W, "_TUNE", True)
    monkeypatch.setattr(W, "_CHOSEN", {})
    offered = []

    def pick_mma(cache, key, candidates, run, **options):
        offered.append({c["PATH"] for c in candidates})
        return next((c for c in candidates if c["PATH"] == "mma"), candidates[0])

    monkeypatch.setattr(autotune_cache, "tune", pick_mma)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # (no CUDA)
    qweight, scales, zeros, _ = make_problem(gen, 128, 64, 32)
    x = torch.randn(3, 128, generator=gen).half()
    for zs in (zeros, zeros + 1):
        out = w4a16_matmul(x, qweight, scales, zs, 32, backend="triton")
        assert_close_to_reference(out, x, qweight, scales, zs, 32, None)
    assert offered == [{"splitk", "mma"}, {"splitk"}]


def test_act_order_runs_as_sorted_static_groups(gen, monkeypatch):
    """A permuted g_idx whose groups sorted are runs of group_size (GPTQ's act-order): the codes
    sorted once, the activations gathered per call, a static-group plan (no gather in the
    kernel), reused from the second call; a g_idx that is not such a permutation, and
    ACT_ORDER_REPACK = False, keep the gather paths; so do forced paths (their tests)."""
    calls = _count_slow_calls(monkeypatch)
    qweight, scales, zeros, g_idx = make_problem(gen, 128, 40, 32, "permuted")
    x = torch.randn(2, 3, 128, generator=gen).half()
    for _ in range(2):
        y = w4a16_matmul(x, qweight, scales, zeros, 32, g_idx, backend="triton")
        assert_close_to_reference(y, x, qweight, scales, zeros, 32, g_idx)
    assert len(calls) == 1  # (the second call took the cached plan, gather included)
    entry = W._ENTRIES[(id(qweight), id(scales), id(zeros), id(g_idx), 32)]
    perm, codes_sorted, sorted_entry = entry.sorted_form()
    assert torch.equal(g_idx[perm].long(), torch.arange(128) // 32) and not sorted_entry.permuted
    codes = unpack_int4(qweight)
    assert sorted_entry.tensors()[0] is codes_sorted
    assert torch.equal(unpack_int4(codes_sorted), codes[perm])
    (plan,) = entry.plans.values()
    assert isinstance(plan, W._ActOrderPlan)
    plan_info = W.w4a16_plan(x, qweight, scales, zeros, 32, g_idx)
    assert plan_info["act_order_sorted"] and not plan_info["gather"]
    out = torch.full((2, 3, 40), float("nan"), dtype=torch.float16)  # into a given output too
    assert w4a16_matmul(x, qweight, scales, zeros, 32, g_idx, out=out, backend="triton") is out
    assert_close_to_reference(out, x, qweight, scales, zeros, 32, g_idx)

    # groups of unequal sizes: not a permutation of runs, the gather paths
    uneven = torch.randint(0, 4, (128,), generator=gen).to(torch.int32)
    y = w4a16_matmul(x, qweight, scales, zeros, 32, uneven, backend="triton")
    assert_close_to_reference(y, x, qweight, scales, zeros, 32, uneven)
    assert W._ENTRIES[(id(qweight), id(scales), id(zeros), id(uneven), 32)].sorted_form() is None

    # the switch turned off: the same weights' next call takes the gather paths (a new plan)
    monkeypatch.setattr(W, "ACT_ORDER_REPACK", False)
    assert entry.sorted_form() is None and not W.w4a16_plan(x, qweight, scales, zeros, 32,
                                                             g_idx)["act_order_sorted"]
    y = w4a16_matmul(x, qweight, scales, zeros, 32, g_idx, backend="triton")
    assert_close_to_reference(y, x, qweight, scales, zeros, 32, g_idx)
    assert sum(not isinstance(p, W._ActOrderPlan) for p in entry.plans.values()) == 1
    q2, s2, z2, g2 = make_problem(gen, 128, 40, 32, "permuted")
    y = w4a16_matmul(x, q2, s2, z2, 32, g2, backend="triton")
    assert_close_to_reference(y, x, q2, s2, z2, 32, g2)
    assert W._ENTRIES[(id(q2), id(s2), id(z2), id(g2), 32)].sorted_form() is None
    assert W.w4a16_plan(x, q2, s2, z2, 32, g2)["gather"]


def test_act_order_copy_goes_with_its_weights(gen, monkeypatch):
    """The sorted copy is built once however many threads make the first call together, is
    shared by entries of other scales or zero points (a traced model passes new zero points
    every call), and goes when the codes or g_idx change or die, without waiting for the cyclic
    garbage collector (an entry and its weak references form no cycle)."""
    import gc
    import threading
    import time

    built = []
    sort = W._sort_rows

    def slow_sort(qweight, g_idx, group):
        built.append(group)
        time.sleep(0.2)  # (both threads' first calls inside the build)
        return sort(qweight, g_idx, group)

    monkeypatch.setattr(W, "_sort_rows", slow_sort)
    qweight, scales, zeros, g_idx = make_problem(gen, 128, 40, 32, "permuted")
    x = torch.randn(2, 128, generator=gen).half()
    entry = W._entry_for(qweight, scales, zeros, g_idx, 32, 128, 40, 4)
    # (the sort itself from two threads: Triton's interpreter runs one kernel at a time)
    forms = []

    def first_use(weights, into):
        into.append(weights.sorted_form())

    threads = [threading.Thread(target=first_use, args=(entry, forms)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and forms[0][1] is forms[1][1]  # (one copy of the codes)
    y = w4a16_matmul(x, qweight, scales, zeros, 32, g_idx, backend="triton")
    assert_close_to_reference(y, x, qweight, scales, zeros, 32, g_idx)
    assert W._ENTRIES[(id(qweight), id(scales), id(zeros), id(g_idx), 32)] is entry
    codes = weakref.ref(entry.sorted_form()[1])
    del entry, forms
    gc.disable()
    try:
        scales.mul_(1.0)  # (new scales: a new entry, the same sorted codes)
        y = w4a16_matmul(x, qweight, scales, zeros, 32, g_idx, backend="triton")
        assert_close_to_reference(y, x, qweight, scales, zeros, 32, g_idx)
        assert codes() is not None and len(built) == 1
        for _ in range(2):  # (new zero points every call, as a traced model passes them)
            w4a16_matmul(x, qweight, scales, zeros.clone(), 32, g_idx, backend="triton")
        assert len(built) == 1
        qweight.add_(0)  # (new codes: sorted again, the old copy gone)
        y = w4a16_matmul(x, qweight, scales, zeros, 32, g_idx, backend="triton")
        assert_close_to_reference(y, x, qweight, scales, zeros, 32, g_idx)
        assert codes() is None and len(built) == 2
        codes = weakref.ref(W._ENTRIES[(id(qweight), id(scales), id(zeros), id(g_idx), 32)]
                            .sorted_form()[1])
        del qweight, scales, zeros, g_idx
        assert codes() is None
    finally:
        gc.enable()


def test_act_order_sort_out_of_memory_is_retried(gen, monkeypatch):
    """No memory for the sorted copy: that call gathers and keeps no plan; the next sorts."""
    sort, failures = W._sort_rows, [1]

    def sort_once_out_of_memory(*args):
        if failures:
            failures.pop()
            raise torch.cuda.OutOfMemoryError("no room")
        return sort(*args)

    monkeypatch.setattr(W, "_sort_rows", sort_once_out_of_memory)
    qweight, scales, zeros, g_idx = make_problem(gen, 128, 40, 32, "permuted")
    x = torch.randn(3, 128, generator=gen).half()
    entry_key = (id(qweight), id(scales), id(zeros), id(g_idx), 32)
    for plan_kinds in ([], [W._ActOrderPlan]):
        y = w4a16_matmul(x, qweight, scales, zeros, 32, g_idx, backend="triton")
        assert_close_to_reference(y, x, qweight, scales, zeros, 32, g_idx)
        assert [type(p) for p in W._ENTRIES[entry_key].plans.values()] == plan_kinds


def test_act_order_inside_a_capture(gen, monkeypatch):
    """Inside a CUDA graph's capture (stood in for on the CPU): weights first seen there take
    the gather (a sort would read the device); once sorted outside, a capture takes the sorted
    plan (whose kernels a warm-up compiled) and the graph keeps the copy for good."""
    monkeypatch.setattr(W, "_GRAPH_HELD_SORTED", [])
    capturing = [True]
    monkeypatch.setattr(W, "_capturing", lambda device: capturing[0])
    qweight, scales, zeros, g_idx = make_problem(gen, 128, 40, 32, "permuted")
    x = torch.randn(3, 128, generator=gen).half()
    key = (id(qweight), id(scales), id(zeros), id(g_idx), 32)
    y = w4a16_matmul(x, qweight, scales, zeros, 32, g_idx, backend="triton")
    assert_close_to_reference(y, x, qweight, scales, zeros, 32, g_idx)
    assert W._ENTRIES[key]._sorted is None and not W._ENTRIES[key].plans
    capturing[0] = False
    w4a16_matmul(x, qweight, scales, zeros, 32, g_idx, backend="triton")  # (the warm-up)
    perm, codes, _ = W._ENTRIES[key].sorted_form()
    capturing[0] = True
    y = w4a16_matmul(x, qweight, scales, zeros, 32, g_idx, backend="triton")
    assert_close_to_reference(y, x, qweight, scales, zeros, 32, g_idx)
    assert [held[1] for held in W._GRAPH_HELD_SORTED] == [codes]


@pytest.mark.parametrize("path", ["mma", "wgmma"])
def test_mma_paths_refuse_what_they_cannot_compute(gen, path):
    """fp32 activations, permuted groups, zero points outside the 4-bit grid and groups that
    are not whole 32-input steps (or not whole steps of a forced config): a clear error when
    forced (the autotuner never offers them), naming what failed, not every requirement."""
    qweight, scales, zeros, perm = make_problem(gen, 64, 40, 32, "permuted")
    x = torch.randn(2, 64, generator=gen).half()
    # (the range read from the zero points drawn: 16..31 only where the draw holds both 0 and 15)
    fp32, act_order, zeros_out = ("activations of torch.float32", "act-order groups",
                                  f"zero points in {int(zeros.min()) + 16}..{int(zeros.max()) + 16}")
    cases = [((x.float(), zeros, 32, None), {fp32}), ((x, zeros, 32, perm), {act_order}),
             ((x, zeros + 16, 32, None), {zeros_out}),
             ((x.float(), zeros + 16, 32, perm), {fp32, act_order, zeros_out})]
    for (xs, zs, group, g_idx), failed in cases:
        with pytest.raises(ValueError, match=f"the {path} path cannot run") as error:
            w4a16_matmul(xs, qweight, scales, zs, group, g_idx, path=path, backend="triton")
        said = {r for r in (fp32, act_order, zeros_out) if r in str(error.value)}
        assert said == failed and ("float16 or bfloat16" in str(error.value)) == (fp32 in failed), \
            str(error.value)
    q16, s16, z16, _ = make_problem(gen, 64, 40, 16)
    with pytest.raises(ValueError, match="groups of 16 inputs, not a multiple of 32") as error:
        w4a16_matmul(x, q16, s16, z16, 16, path=path, backend="triton")
    assert "float16" not in str(error.value) and "zero points" not in str(error.value)
    assert W._candidates(path, 2, 64, 4, 16, False) == []
    q64, s64, z64, _ = make_problem(gen, 128, 40, 64)
    x128 = torch.randn(2, 128, generator=gen).half()
    config = (AUTOTUNE_SPACE["mma"][-1] if path == "mma"
              else dict(BLOCK_M=16, KR=4, J=1, num_warps=1, STAGES=3))
    with pytest.raises(ValueError, match="groups of 64 are not whole steps of 128"):
        w4a16_matmul(x128, q64, s64, z64, 64, path=path, config=config, backend="triton")


@pytest.mark.parametrize("path", ["mma", "wgmma"])
def test_mma_paths_say_a_nondecreasing_g_idx_is_not_the_contiguous_layout(gen, path):
    """A nondecreasing g_idx whose runs are not group_size inputs each (groups of other sizes,
    their boundaries moved) was refused as "act-order groups (a permuted g_idx ...)", which it is
    not: the refusal says it is nondecreasing but not k // group_size, and where it first departs."""
    K, group = 96, 32
    qweight, scales, zeros, _ = make_problem(gen, K, 40, group)
    cuts = sorted((torch.randperm(K - 1, generator=gen)[:2] + 1).tolist())
    if cuts == [group, 2 * group]:
        cuts[0] -= 1
    k = torch.arange(K)
    g_idx = (k[:, None] >= torch.tensor(cuts)).sum(1).to(torch.int32)
    first = int((g_idx != k // group).nonzero()[0])
    x = torch.randn(2, K, generator=gen).half()
    with pytest.raises(ValueError, match=f"the {path} path cannot run") as error:
        w4a16_matmul(x, qweight, scales, zeros, group, g_idx, path=path, backend="triton")
    said = (f"a g_idx that is nondecreasing but not the contiguous layout k // {group} "
            f"(g_idx[{first}] = {int(g_idx[first])}, not {first // group}; it takes static groups)")
    assert said in str(error.value) and "permuted" not in str(error.value), str(error.value)
    y = w4a16_matmul(x, qweight, scales, zeros, group, g_idx, backend="triton")  # (the gather paths take it)
    assert_close_to_reference(y, x, qweight, scales, zeros, group, g_idx)


def test_mma_refused_inside_a_capture_reads_no_zero_points(gen, monkeypatch):
    """Forced on zero points outside the 4-bit grid inside a CUDA graph's capture (stood in for on
    the CPU), the refusal names them without reading their range from the device, which would
    break the capture."""
    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    x = torch.randn(2, 64, generator=gen).half()
    zeros = zeros + 16
    span = rf"zero points in {int(zeros.min())}\.\.{int(zeros.max())}"
    with pytest.raises(ValueError, match=span):  # (read outside: its range)
        w4a16_matmul(x, qweight, scales, zeros, 32, path="mma", backend="triton")
    monkeypatch.setattr(W, "_capturing", lambda device: True)
    monkeypatch.setattr(torch, "aminmax", lambda *args, **kwargs: pytest.fail("read inside the capture"))
    with pytest.raises(ValueError, match=r"zero points outside 0\.\.15 \(it takes"):
        w4a16_matmul(x, qweight, scales, zeros, 32, path="mma", backend="triton")


def test_wgmma_takes_aligned_rows_and_three_stages(gen):
    """cp.async copies 16 bytes: activations transposed, with rows 8 bytes off alignment or a
    row stride that is not a multiple of 16 are not the wgmma path's (the autotuner leaves it
    out; forced, a clear error), the others take it; rings of 2 or 5 stages are refused."""
    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    base = torch.randn(40, 96, generator=gen).half()
    aligned = base[:20, :64]  # (row stride 96)
    cases = [(base[:, :64].T.contiguous().T[:20], "activation rows not contiguous"),  # (column-major)
             (base[:20, 4:68], "activations 8 bytes past a 16-byte boundary"),  # (rows 8 bytes off)
             (torch.randn(20, 72, generator=gen).half()[:, :64], "a row stride of 72 elements")]
    for x, failed in cases:
        entry = W._entry_for(qweight, scales, zeros, None, 32, 64, 40, 2)
        assert "wgmma" not in W._runnable_paths(x, entry)
        with pytest.raises(ValueError, match="rows contiguous, 16-byte aligned") as error:
            w4a16_matmul(x, qweight, scales, zeros, 32, path="wgmma", backend="triton")
        assert failed in str(error.value), str(error.value)
    entry = W._entry_for(qweight, scales, zeros, None, 32, 64, 40, 2)
    assert "wgmma" in W._runnable_paths(aligned, entry)
    y = w4a16_matmul(aligned, qweight, scales, zeros, 32, path="wgmma", backend="triton")
    assert_close_to_reference(y, aligned, qweight, scales, zeros, 32, None)
    for stages in (2, 5):
        with pytest.raises(ValueError, match="STAGES must be 3 or 4"):
            w4a16_matmul(aligned, qweight, scales, zeros, 32, path="wgmma", backend="triton",
                         config=dict(BLOCK_M=16, KR=1, J=2, num_warps=1, STAGES=stages))


@pytest.mark.parametrize("path", ["gemv", "splitk", "gemm", "dqmm"])
def test_paths_at_other_batch_sizes(gen, path):
    """Each kernel at M it is not chosen for: GEMV over several rows, dot paths at M = 1."""
    qweight, scales, zeros, g_idx = make_problem(gen, 64, 37, 32, "permuted")  # N odd
    for M in ((1, 3) if path == "gemv" else (1, 3, 17)):  # interpreted GEMV is slow per row
        x = torch.randn(M, 64, generator=gen).to(torch.float16)
        out = torch.full((M, 37), float("nan"), dtype=torch.float16)
        y = w4a16_matmul(x, qweight, scales, zeros, 32, g_idx, out=out, path=path,
                         backend="triton")
        assert_close_to_reference(y, x, qweight, scales, zeros, 32, g_idx)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_a_monotone_g_idx_of_runs_unlike_its_group_size(gen, dtype):
    """A nondecreasing g_idx whose runs are not k // group_size (groups of unequal lengths, some
    empty): not static, so every path gathers its groups, at M = 1, 3, 5 and 17."""
    qweight, scales, zeros, g_idx = make_problem(gen, 128, 40, 32, "monotone")
    assert not _g_idx_is_static(g_idx, 128, 4, 32)
    for path, M in (("gemv", 1), ("splitk", 3), ("gemm", 17), ("dqmm", 5)):
        x = torch.randn(M, 128, generator=gen).to(dtype)
        out = torch.full((M, 40), float("nan"), dtype=dtype)
        w4a16_matmul(x, qweight, scales, zeros, 32, g_idx, out=out, path=path, backend="triton")
        assert_close_to_reference(out, x, qweight, scales, zeros, 32, g_idx)


@pytest.mark.parametrize("g_idx_kind", [None, "permuted"])
@pytest.mark.parametrize("group_size,K", [(4, 64), (24, 96)])
def test_groups_inside_a_word_or_of_no_power_of_two(gen, group_size, K, g_idx_kind):
    """Groups of 4 inputs (two to a packed word: one word's codes take two groups' scales) and of
    24 (no power of two: groups start inside the kernels' K tiles and words), on every path at
    M = 1, 3, 5 and 17 and N = 37."""
    qweight, scales, zeros, g_idx = make_problem(gen, K, 37, group_size, g_idx_kind)
    for path, M in (("gemv", 1), ("splitk", 3), ("gemm", 17), ("dqmm", 5)):
        x = torch.randn(M, K, generator=gen).to(torch.float16)
        out = torch.full((M, 37), float("nan"), dtype=torch.float16)
        w4a16_matmul(x, qweight, scales, zeros, group_size, g_idx, out=out, path=path, backend="triton")
        assert_close_to_reference(out, x, qweight, scales, zeros, group_size, g_idx)


@pytest.mark.parametrize("path,M,group_size", [("gemv", 1, 128), ("gemv", 1, -1),
                                               ("splitk", 3, 128), ("splitk", 1, -1),
                                               ("gemm", 20, 128), ("dqmm", 20, 64),
                                               ("mma", 3, 128), ("mma", 1, -1), ("mma", 16, 128)])
def test_every_gpu_config_under_interpreter(gen, path, M, group_size):
    """The GPU autotune space itself (big tiles, masked K and N tails, many K slices, slices
    of one group, prefetch depths, swapped and paired dots), interpreted on a small problem: a
    config the tuner may pick must be correct."""
    qweight, scales, zeros, _ = make_problem(gen, 256, 72, group_size)
    x = torch.randn(M, 256, generator=gen).to(torch.float16)
    for config in AUTOTUNE_SPACE[path]:
        out = torch.full((M, 72), float("nan"), dtype=torch.float16)
        w4a16_matmul(x, qweight, scales, zeros, group_size, out=out, path=path, config=config,
                     backend="triton")
        assert_close_to_reference(out, x, qweight, scales, zeros, group_size, None)


def test_exact_float_bit_patterns():
    """The constants of the no-conversion dequantization: a code c ORed into the mantissa of
    2^e is the float 2^e + c, in every compute dtype (bf16 included, which the interpreter
    cannot run)."""
    codes = torch.arange(16, dtype=torch.int32)
    fp16 = (codes | 0x6400).to(torch.int16).view(torch.float16)
    bf16 = (codes | 0x4300).to(torch.int16).view(torch.bfloat16)
    fp32 = (codes | 0x4B000000).view(torch.float32)
    assert torch.equal(fp16.double(), 1024.0 + codes.double())
    assert torch.equal(bf16.double(), 128.0 + codes.double())
    assert torch.equal(fp32.double(), 2.0**23 + codes.double())
    for j in range(5):  # codes left in place at bits 4j (the GEMV's _code_f32)
        word = (codes << (4 * j)) | ((150 - 4 * j) << 23)
        assert torch.equal(word.view(torch.float32).double() - 2.0 ** (23 - 4 * j), codes.double())
    word = (codes << 16) | (134 << 23)  # codes 5..7, shifted down to bits 16..19
    assert torch.equal(word.view(torch.float32).double() - 128.0, codes.double())


@pytest.mark.parametrize("shape", [(64,), (1, 1, 64), (3, 64), (2, 3, 64), (17, 64)])
def test_dispatch_and_leading_dims(gen, shape):
    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 16)
    x = torch.randn(*shape, generator=gen).to(torch.float16)
    y = w4a16_matmul(x, qweight, scales, zeros, 16, backend="triton")
    assert y.shape == (*shape[:-1], 40)
    assert_close_to_reference(y, x, qweight, scales, zeros, 16, None)


@pytest.mark.parametrize("scales_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("zeros_dtype", [torch.int32, torch.int64, torch.int8])
def test_scale_and_zero_dtypes(gen, scales_dtype, zeros_dtype):
    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32, None, scales_dtype, zeros_dtype)
    for M, dtype in ((1, torch.float32), (3, torch.float16)):
        x = torch.randn(M, 64, generator=gen).to(dtype)
        y = w4a16_matmul(x, qweight, scales, zeros, 32, backend="triton")
        assert_close_to_reference(y, x, qweight, scales, zeros, 32, None)


def test_strided_operands(gen):
    qweight, scales, zeros, _ = make_problem(gen, 64, 80, 32)
    x = torch.randn(64, 5, generator=gen).t()  # [5, 64], K stride 5
    qweight, scales, zeros = qweight[:, ::2], scales[:, ::2], zeros[:, ::2]  # N = 40, stride 2
    out = torch.full((40, 5), float("nan")).t()  # non-contiguous out
    y = w4a16_matmul(x, qweight, scales, zeros, 32, out=out, backend="triton")
    assert y is out
    assert_close_to_reference(y, x, qweight, scales, zeros, 32, None)


def test_split_k_workspace_is_left_clean(gen):
    """The last K slice of each tile resets the shared partial sums and arrival counters, so
    back-to-back split-K launches (different shapes, paths, dtypes) never see stale sums."""
    from epmq_kernels.w4a16 import _WORKSPACES, _workspace_key

    for K, N, M, path in ((128, 40, 1, "gemv"), (64, 72, 3, "splitk"), (128, 40, 3, "gemv"),
                          (64, 72, 5, "splitk")):
        qweight, scales, zeros, _ = make_problem(gen, K, N, 32)
        x = torch.randn(M, K, generator=gen).to(torch.bfloat16)
        for _ in range(2):
            y = w4a16_matmul(x, qweight, scales, zeros, 32, path=path, backend="triton")
            assert_close_to_reference(y, x, qweight, scales, zeros, 32, None)
        sums, counters = _WORKSPACES[_workspace_key(x.device)]
        assert not sums.any() and not counters.any()


def test_static_g_idx_takes_the_no_gather_path(gen):
    """A g_idx equal to k // group_size is detected: bit-identical to passing none."""
    qweight, scales, zeros, g_idx = make_problem(gen, 128, 40, 32, "static")
    assert _g_idx_is_static(g_idx, 128, 4, 32)
    permuted = g_idx[torch.randperm(128, generator=gen)]
    assert not _g_idx_is_static(permuted, 128, 4, 32)
    for path, M in (("gemv", 1), ("splitk", 3), ("gemm", 17), ("dqmm", 9)):
        x = torch.randn(M, 128, generator=gen).to(torch.float16)
        with_g_idx = w4a16_matmul(x, qweight, scales, zeros, 32, g_idx, path=path,
                                  backend="triton")
        without = w4a16_matmul(x, qweight, scales, zeros, 32, path=path, backend="triton")
        assert torch.equal(with_g_idx, without)


def test_g_idx_changed_in_place_is_seen(gen):
    qweight, scales, zeros, g_idx = make_problem(gen, 64, 40, 16, "static")
    x = torch.randn(3, 64, generator=gen).to(torch.float16)
    w4a16_matmul(x, qweight, scales, zeros, 16, g_idx, backend="triton")
    g_idx.copy_(g_idx[torch.randperm(64, generator=gen)])  # now act-order
    y = w4a16_matmul(x, qweight, scales, zeros, 16, g_idx, backend="triton")
    assert_close_to_reference(y, x, qweight, scales, zeros, 16, g_idx)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_inference_tensors(gen, backend):
    """Weights and activations made under torch.inference_mode have no version counter: the
    launcher's caches key them without one (their in-place changes inside that mode are not
    seen, as documented; QuantLinear's load_state_dict gives its buffers new tensor objects)."""
    with torch.inference_mode():
        qweight, scales, zeros, g_idx = make_problem(gen, 64, 40, 16, "static")
        x = torch.randn(3, 64, generator=gen).to(torch.float16)
        for _ in range(2):  # (the second call takes the cached plan)
            y = w4a16_matmul(x, qweight, scales, zeros, 16, g_idx, backend=backend)
    assert_close_to_reference(y, x, qweight, scales, zeros, 16, g_idx)


@pytest.mark.parametrize("M", [1, 3])
def test_torch_backend(gen, M):
    qweight, scales, zeros, g_idx = make_problem(gen, 64, 40, 16, "permuted")
    x = torch.randn(M, 64, generator=gen).to(torch.bfloat16)
    for backend in ("torch", "auto"):  # CPU tensors: auto is the torch reference
        y = w4a16_matmul(x, qweight, scales, zeros, 16, g_idx, backend=backend)
        assert_close_to_reference(y, x, qweight, scales, zeros, 16, g_idx)


def test_operands_that_ask_for_a_derivative(gen):
    """The kernels have no derivative: an x (or scales) that requires grad got an output with no
    grad_fn, silently (an adapter trained beside them got no gradient through them; the torch
    backend's product has one), and a forward-mode tangent was dropped. The forward value is the
    kernels' own, after a plan is made too, and taking the derivative is refused naming it."""
    from torch.autograd import forward_ad

    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    x = torch.randn(2, 64, generator=gen).to(torch.float16)
    want = w4a16_matmul(x, qweight, scales, zeros, 32, backend="triton")  # (its plan made)
    for name, operands in (("x", (x.clone().requires_grad_(), scales)),
                           ("scales", (x, scales.clone().requires_grad_()))):
        y = w4a16_matmul(operands[0], qweight, operands[1], zeros, 32, backend="triton")
        assert torch.equal(y, want) and y.requires_grad
        with pytest.raises(RuntimeError, match=f"kernels have no derivative, and {name} asks for a gradient"):
            y.float().sum().backward()
        with torch.no_grad():
            assert torch.equal(w4a16_matmul(operands[0], qweight, operands[1], zeros, 32, backend="triton"), want)
        with pytest.raises(ValueError, match=f"out= takes no operand that requires grad \\({name} does\\)"):
            w4a16_matmul(*operands[:1], qweight, operands[1], zeros, 32, out=torch.empty_like(want), backend="triton")
        # (the torch backend's product is differentiable)
        assert w4a16_matmul(operands[0], qweight, operands[1], zeros, 32, backend="torch").requires_grad
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(ValueError, match="kernels have no derivative, and x carries a forward-mode tangent"):
            w4a16_matmul(dual, qweight, scales, zeros, 32, backend="triton")
        assert torch.equal(w4a16_matmul(x, qweight, scales, zeros, 32, backend="triton"), want)


def test_empty_batch(gen):
    qweight, scales, zeros, _ = make_problem(gen, 64, 40, -1)
    y = w4a16_matmul(torch.zeros(0, 64), qweight, scales, zeros, -1, backend="triton")
    assert y.shape == (0, 40)


# ----------------------------------------------------------------------------------------------
# dqmm: the chunk dequantizer and the chunked cuBLAS product
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size,g_idx_kind", GROUPINGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_dequant_kernel_rounds_once(gen, dtype, group_size, g_idx_kind):
    """Each element of a chunk is (q - z) * s rounded once (the product of a small integer and
    a 16-bit scale is exact in fp32): bit-identical to the float64 dequantization rounded, for
    any chunk of rows, including chunks that do not start at a group edge. (The interpreter
    converts fp32 to bf16 by truncation, the GPU rounds to nearest: 1 ulp allowed there.)"""
    K, N = 96, 37
    qweight, scales, zeros, g_idx = make_problem(gen, K, N, group_size, g_idx_kind)
    dense = dequantize_int4_weight(qweight, scales, zeros, group_size, g_idx)
    for k_first, k_rows in ((0, K), (32, 48), (8, 16)):
        out = torch.full((k_rows, N), float("nan"), dtype=dtype)
        got = W.w4a16_dequantize(qweight, scales, zeros, group_size, g_idx, k_first=k_first,
                                 k_rows=k_rows, dtype=dtype, out=out, backend="triton")
        assert got is out
        want = dense[k_first:k_first + k_rows]
        if dtype == torch.bfloat16:
            assert ((got.double() - want).abs() <= want.abs() * 2.0**-7).all()
        else:
            assert torch.equal(got, want.to(dtype))
    with pytest.raises(ValueError, match="multiples of 8"):
        W.w4a16_dequantize(qweight, scales, zeros, group_size, g_idx, k_first=4,
                           backend="triton")


def test_dequantize_refuses_an_unknown_backend(gen):
    """A misspelt backend ("Triton", "cuda") took the float64 torch path without a word, as
    w4a16_matmul and the packing functions refuse it."""
    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    for backend in ("Triton", "cuda", None):
        with pytest.raises(ValueError, match="backend must be"):
            W.w4a16_dequantize(qweight, scales, zeros, 32, backend=backend)


def test_dequantize_of_scales_that_ask_for_a_derivative(gen):
    """The chunk kernel has no derivative: scales that require grad got a weight with no grad_fn,
    silently (the torch backend's has one). The value is the kernel's, and taking the derivative
    is refused naming scales, as w4a16_matmul's."""
    from torch.autograd import forward_ad

    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    want = W.w4a16_dequantize(qweight, scales, zeros, 32, k_first=8, k_rows=40, backend="triton")
    trained = scales.clone().requires_grad_()
    got = W.w4a16_dequantize(qweight, trained, zeros, 32, k_first=8, k_rows=40, backend="triton")
    assert torch.equal(got, want) and got.requires_grad
    with pytest.raises(RuntimeError, match="w4a16_dequantize's kernels have no derivative, and scales asks"):
        got.float().sum().backward()
    with pytest.raises(ValueError, match=r"out= takes no operand that requires grad \(scales does\)"):
        W.w4a16_dequantize(qweight, trained, zeros, 32, k_first=8, k_rows=40, out=torch.empty_like(want),
                           backend="triton")
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(scales, torch.ones_like(scales))
        with pytest.raises(ValueError, match="kernels have no derivative, and scales carries a forward-mode tangent"):
            W.w4a16_dequantize(qweight, dual, zeros, 32, backend="triton")
    with torch.no_grad():
        assert torch.equal(W.w4a16_dequantize(qweight, trained, zeros, 32, k_first=8, k_rows=40, backend="triton"),
                           want)
    assert W.w4a16_dequantize(qweight, trained, zeros, 32, backend="torch").requires_grad


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_dequantize_into_an_expanded_out_is_refused(gen, backend):
    """An out whose elements share memory (expanded: a stride of 0) had the kernel write each of
    them over the others, silently, where the torch backend's copy_ refused it in torch's words;
    both refuse it naming out's strides. A transposed out is written."""
    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    want = W.w4a16_dequantize(qweight, scales, zeros, 32, k_first=8, k_rows=16, backend="torch")
    for out in (torch.empty(1, 40, dtype=torch.float16).expand(16, 40),
                torch.empty(16, 1, dtype=torch.float16).expand(16, 40)):
        with pytest.raises(ValueError, match=re.escape(f"out has elements that share memory (strides "
                                                       f"{tuple(out.stride())}: an expanded tensor?)")):
            W.w4a16_dequantize(qweight, scales, zeros, 32, k_first=8, k_rows=16, out=out, backend=backend)
    out = torch.empty(40, 16, dtype=torch.float16).t()
    assert W.w4a16_dequantize(qweight, scales, zeros, 32, k_first=8, k_rows=16, out=out, backend=backend) is out
    assert torch.equal(out, want)


def test_dequantize_into_an_out_past_2_31_elements(gen):
    """An out whose rows lie past 2^31 elements from its start (a whole 256000 x 18432 head
    dequantized, here 8 rows 2^31 / 7 elements apart): int32 offsets wrapped and wrote out of
    bounds. Only the rows written are touched (the rest of the 4 GiB is never backed)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    K, N = 8, 8
    qweight, scales, zeros, _ = make_problem(gen, K, N, -1)
    qweight, scales, zeros = qweight.to(device), scales.to(device), zeros.to(device)
    row_stride = 2**31 // 7 + 64  # (row 7 starts past 2^31)
    try:
        storage = torch.empty(7 * row_stride + N, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError):  # (strict overcommit, or a small GPU)
        pytest.skip("4 GiB of address space not available")
    out = storage.as_strided((K, N), (row_stride, 1))
    out.fill_(float("nan"))
    got = W.w4a16_dequantize(qweight, scales, zeros, -1, out=out, backend="triton")
    want = dequantize_int4_weight(qweight, scales, zeros, -1).to(torch.float16)
    assert torch.equal(got.cpu(), want.cpu())
    del storage, out, got


def test_dqmm_chunks(gen, monkeypatch):
    """K in several chunks (the last one partial), N odd, leading dims; the chunk is bounded by
    CHUNK_K and by DQMM_MAX_CHUNK_BYTES, and the workspace is reused between calls."""
    qweight, scales, zeros, _ = make_problem(gen, 160, 37, 32)
    config = dict(CHUNK_K=64, BLOCK_R=4, BLOCK_N=32, num_warps=4)
    assert W._dqmm_chunk(config, 160, 37, 2) == ("K", 64)
    assert W._dqmm_chunk(dict(config, CHUNK_K=4096), 160, 37, 2) == ("K", 160)  # all of K fits
    # column slabs: CHUNK_N columns, a multiple of BLOCK_N, bounded by the bytes of K rows
    slabs = dict(CHUNK_N=64, BLOCK_R=4, BLOCK_N=32, num_warps=4)
    assert W._dqmm_chunk(slabs, 160, 75, 2) == ("N", 64)
    assert W._dqmm_chunk(dict(slabs, CHUNK_N=4096), 160, 75, 2) == ("N", 75)  # all of N fits
    monkeypatch.setattr(W, "DQMM_MAX_CHUNK_BYTES", 37 * 2 * 40)
    assert W._dqmm_chunk(dict(config, CHUNK_K=4096), 160, 37, 2) == ("K", 32)  # one tile of rows
    monkeypatch.setattr(W, "DQMM_MAX_CHUNK_BYTES", 160 * 2 * 40)
    assert W._dqmm_chunk(dict(slabs, CHUNK_N=4096), 160, 75, 2) == ("N", 32)  # one tile of columns
    monkeypatch.undo()
    for dtype in DTYPES:
        x = torch.randn(2, 3, 160, generator=gen).to(dtype)
        y = w4a16_matmul(x, qweight, scales, zeros, 32, path="dqmm", config=config,
                         backend="triton")
        assert y.shape == (2, 3, 37)
        assert_close_to_reference(y, x, qweight, scales, zeros, 32, None)
    before = dict(W._DQ_WORKSPACES)
    w4a16_matmul(x, qweight, scales, zeros, 32, path="dqmm", config=config, backend="triton")
    assert all(W._DQ_WORKSPACES[k] is v for k, v in before.items())
    # two buffers, chunks alternating between them (a side stream dequantizes on a GPU; on the
    # CPU the same buffers in order), three chunks so that one buffer is used twice
    two = dict(config, STREAMS=2)
    for dtype in DTYPES:
        x = torch.randn(5, 160, generator=gen).to(dtype)
        y = w4a16_matmul(x, qweight, scales, zeros, 32, path="dqmm", config=two, backend="triton")
        assert_close_to_reference(y, x, qweight, scales, zeros, 32, None)
        assert torch.equal(y, w4a16_matmul(x, qweight, scales, zeros, 32, path="dqmm", config=config,
                                           backend="triton"))


@pytest.mark.parametrize("group_size,g_idx_kind", GROUPINGS)
def test_dqmm_column_slabs(gen, group_size, g_idx_kind):
    """The weight dequantized in column slabs, the last one narrower than its buffer (written
    and read with the buffer's row stride), each slab of y written by one product over all of
    K: against the float64 reference, with leading dims, for one buffer and for two (three
    slabs: one buffer used twice), the two bit for bit the same."""
    K, N = 96, 75
    qweight, scales, zeros, g_idx = make_problem(gen, K, N, group_size, g_idx_kind)
    one = dict(CHUNK_N=32, BLOCK_R=4, BLOCK_N=32, num_warps=4)
    for dtype in DTYPES:
        x = torch.randn(2, 3, K, generator=gen).to(dtype)
        y = w4a16_matmul(x, qweight, scales, zeros, group_size, g_idx, path="dqmm", config=one,
                         backend="triton")
        assert y.shape == (2, 3, N)
        assert_close_to_reference(y, x, qweight, scales, zeros, group_size, g_idx)
        two = w4a16_matmul(x, qweight, scales, zeros, group_size, g_idx, path="dqmm",
                           config=dict(one, STREAMS=2), backend="triton")
        assert torch.equal(two, y)


def _held_up(product):
    """``product`` with its stream held up (~1 ms) before it runs."""
    def run(*args, **kwargs):
        torch.cuda._sleep(2_000_000)
        return product(*args, **kwargs)
    return run


def test_dqmm_candidates_one_per_chunking():
    """dqmm's candidates for a problem: one config per chunking it makes (CHUNK_N 2048 and 4096
    both the whole of 2048 columns: one), none with two streams where the chunk is the whole
    axis (one buffer, one stream: the one-stream config's twin, timed twice, and named as
    overlapping in ``best_ms_by_path``)."""
    def chunkings(K, N):
        found = []
        for c in W._candidates("dqmm", 300, K, K // 128, 128, False, torch.float16, N):
            entry = W._dqmm_chunk(c, K, N, 2)
            found.append((*entry, c.get("STREAMS", 1)))
        assert len(set(found)) == len(found)
        return set(found)

    assert chunkings(8192, 8192) == {("K", 1024, 1), ("K", 1024, 2), ("K", 2048, 1), ("K", 2048, 2),
                                     ("N", 2048, 1), ("N", 2048, 2), ("N", 4096, 1), ("N", 4096, 2)}
    assert chunkings(4096, 2048) == {("K", 1024, 1), ("K", 1024, 2), ("K", 2048, 1), ("K", 2048, 2),
                                     ("N", 2048, 1)}
    assert chunkings(1024, 256) == {("K", 1024, 1), ("N", 256, 1)}
    # without N (the tests' and benchmarks' listing of the space): every config
    assert len(W._candidates("dqmm", 300, 1024, 8, 128, False)) == len(AUTOTUNE_SPACE["dqmm"])


def test_plan_reports_every_candidate_time(gen, monkeypatch):
    """w4a16_plan: the tuning's times of every candidate, fastest first, and the fastest of each
    path, dqmm's chunkings and stream counts apart (here the times are planted: nothing is
    timed on the CPU)."""
    K, N, M = 64, 256, 300
    qweight, scales, zeros, _ = make_problem(gen, K, N, 32)
    x = torch.randn(M, K, generator=gen).half()
    entry = W._entry_for(qweight, scales, zeros, None, 32, K, N, K // 32)
    key = ("w4a16", W._tuning_key(W._paths_for(M), x, entry))
    rows, slabs = dict(CHUNK_K=1024, BLOCK_R=16, BLOCK_N=128, num_warps=4), dict(
        CHUNK_N=2048, BLOCK_R=16, BLOCK_N=128, num_warps=4)
    planted = [(3.0, dict(rows, STREAMS=2, PATH="dqmm")), (1.0, dict(slabs, STREAMS=1, PATH="dqmm")),
               (2.0, dict(rows, STREAMS=1, PATH="dqmm")), (4.0, dict(slabs, STREAMS=2, PATH="dqmm")),
               (0.5, dict(BLOCK_M=128, PATH="gemm"))]
    monkeypatch.setitem(autotune_cache.TIMINGS, key, planted)
    plan = W.w4a16_plan(x, qweight, scales, zeros, 32)
    assert [ms for ms, _ in plan["timings"]] == [0.5, 1.0, 2.0, 3.0, 4.0]
    assert plan["timings"][1][1] == planted[1][1]
    assert plan["best_ms_by_path"] == {"gemm": 0.5, "dqmm+slabs": 1.0, "dqmm": 2.0,
                                       "dqmm+2streams": 3.0, "dqmm+slabs+2streams": 4.0}


def test_paths_offered_by_batch_size():
    """The autotuner's candidates: M = 1 times the GEMV against the swapped tensor-core dot,
    large M the Triton GEMM against dqmm."""
    assert W._paths_for(1) == ("gemv", "splitk", "mma")
    assert W._paths_for(W.MMA_MAX_M) == ("splitk", "mma")
    assert W._paths_for(W.MMA_MAX_M + 1) == ("splitk", "wgmma")
    assert W._paths_for(W.SPLITK_MAX_M + 1) == ("gemm", "wgmma")
    # mma: 16-bit activations and static groups of whole 32 KR-input steps only, no empty slices
    mma = W._candidates("mma", 16, 8192, 64, 128, False)
    assert all(c["BLOCK_M"] == 16 for c in mma)
    # (all but the prefetching configs whose slices are under 4 steps: their last prefetch,
    # of the next slice, would be a quarter of their loads or more)
    assert len(mma) == len(AUTOTUNE_SPACE["mma"]) - 3
    assert all(64 // c["SPLIT_K"] >= 4 for c in mma if c["PREFETCH"])
    assert all(c["BLOCK_M"] == 8 for c in W._candidates("mma", 8, 4096, 32, 128, False))
    assert {c["KR"] for c in W._candidates("mma", 1, 4096, 128, 32, False)} == {1}
    assert W._candidates("mma", 1, 4096, 32, 128, True) == []
    assert W._candidates("mma", 1, 4096, 32, 128, False, torch.float32) == []
    # (K slices: as many as leave none empty, 3 and 6 where the space says 4 to 32)
    assert {c["SPLIT_K"] for c in W._candidates("mma", 1, 768, 6, 128, False)} == {3, 6}
    assert {c["SPLIT_K"] for c in W._candidates("mma", 1, 64, 2, 32, False)} == {2}
    assert W._paths_for(W.DQMM_MIN_M) == ("gemm", "dqmm", "wgmma")
    # wgmma: the same activations and groups as mma; tiles of 128 or 256 rows only past 64
    wgmma = W._candidates("wgmma", 40, 4096, 32, 128, False)
    assert wgmma and all(c["BLOCK_M"] == 64 for c in wgmma)
    assert len(W._candidates("wgmma", 1024, 4096, 32, 128, False)) == len(AUTOTUNE_SPACE["wgmma"])
    assert {c["KR"] for c in W._candidates("wgmma", 1024, 4096, 128, 32, False)} == {1}
    assert W._candidates("wgmma", 1024, 4096, 32, 128, True) == []
    assert W._candidates("wgmma", 1024, 4096, 32, 128, False, torch.float32) == []
    at_one = W._candidates("splitk", 1, 4096, 32, 128, False)
    assert at_one and all(c["SWAP_AB"] and c["BLOCK_M"] == 16 for c in at_one)
    gemv = W._candidates("gemv", 1, 4096, 32, 128, False)
    assert gemv and all(c["BLOCK_K"] <= 128 for c in gemv)  # 256 would straddle groups
    assert any(c["BLOCK_K"] == 256 for c in W._candidates("gemv", 1, 4096, 1, 4096, False))
    assert all(c["SPLIT_K"] <= 6 for c in W._candidates("gemv", 1, 768, 6, 128, False))


# ----------------------------------------------------------------------------------------------
# Launch plans: checks once per set of weights, then a cached plan
# ----------------------------------------------------------------------------------------------
def _count_slow_calls(monkeypatch):
    calls = []
    real = W._matmul

    def counting(*args):
        calls.append(args[-3:-1])
        return real(*args)

    monkeypatch.setattr(W, "_matmul", counting)
    return calls


def test_steady_state_calls_reuse_the_plan(gen, monkeypatch):
    qweight, scales, zeros, g_idx = make_problem(gen, 64, 40, 32, "static")
    x = torch.randn(3, 64, generator=gen).half()
    first = w4a16_matmul(x, qweight, scales, zeros, 32, g_idx, backend="triton")
    slow = _count_slow_calls(monkeypatch)
    for _ in range(3):  # same tensors: the plan, and the same result
        assert torch.equal(w4a16_matmul(x, qweight, scales, zeros, 32, g_idx, backend="triton"),
                           first)
    other = torch.randn(3, 64, generator=gen).half()  # same layout, new values: same plan
    y = w4a16_matmul(other, qweight, scales, zeros, 32, g_idx, backend="triton")
    assert_close_to_reference(y, other, qweight, scales, zeros, 32, g_idx)
    assert not slow
    out = torch.full((3, 40), float("nan"), dtype=torch.float16)
    for _ in range(2):  # out=: one slow call, then the plan
        assert w4a16_matmul(x, qweight, scales, zeros, 32, g_idx, out=out,
                            backend="triton") is out
        assert torch.equal(out, first)
    x3 = torch.randn(2, 5, 64, generator=gen).half()  # a new shape: one slow call
    for _ in range(2):
        y = w4a16_matmul(x3, qweight, scales, zeros, 32, g_idx, backend="triton")
        assert_close_to_reference(y, x3, qweight, scales, zeros, 32, g_idx)
    assert len(slow) == 2
    # backend="auto" on CPU tensors stays the torch reference, plans or not
    ref = w4a16_matmul(x, qweight, scales, zeros, 32, g_idx)
    assert_close_to_reference(ref, x, qweight, scales, zeros, 32, g_idx)
    assert len(slow) == 3


def test_checks_still_apply_after_the_first_call(gen):
    """A plan is only found for arguments like those it was checked with; anything else takes
    the checked path and raises the same errors as a first call."""
    qweight, scales, zeros, g_idx = make_problem(gen, 64, 40, 32, "static")
    x = torch.randn(2, 64, generator=gen)
    for _ in range(2):
        w4a16_matmul(x, qweight, scales, zeros, 32, g_idx, backend="triton")
    with pytest.raises(ValueError, match=r"\[K // 8, N\]"):
        w4a16_matmul(torch.randn(2, 72), qweight, scales, zeros, 32, g_idx, backend="triton")
    with pytest.raises(ValueError, match="x must be"):
        w4a16_matmul(x.double(), qweight, scales, zeros, 32, g_idx, backend="triton")
    with pytest.raises(ValueError, match="out must be"):
        w4a16_matmul(x, qweight, scales, zeros, 32, g_idx, out=torch.empty(2, 41),
                     backend="triton")
    with pytest.raises(ValueError, match="group_size"):
        w4a16_matmul(x, qweight, scales, zeros, 32.0, g_idx, backend="triton")
    with pytest.raises(ValueError, match="different devices"):
        w4a16_matmul(x.to("meta"), qweight, scales, zeros, 32, g_idx, backend="triton")
    g_idx.add_(1)  # in place: out of range now, and must be seen
    with pytest.raises(ValueError, match=r"g_idx values must lie in \[0, 2\)"):
        w4a16_matmul(x, qweight, scales, zeros, 32, g_idx, backend="triton")


def test_weights_changed_in_place_are_seen(gen):
    """New codes, scales or zero points written into the same tensors change the result (the
    version counters retire the checked entry and its plans)."""
    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    x = torch.randn(1, 64, generator=gen).half()
    for _ in range(2):
        w4a16_matmul(x, qweight, scales, zeros, 32, backend="triton")
    new_q, new_s, new_z, _ = make_problem(gen, 64, 40, 32)
    for tensor, value in ((qweight, new_q), (scales, new_s), (zeros, new_z)):
        tensor.copy_(value)
        y = w4a16_matmul(x, qweight, scales, zeros, 32, backend="triton")
        assert_close_to_reference(y, x, qweight, scales, zeros, 32, None)


def test_weights_narrowed_through_data_are_seen(gen):
    """``.data = t[:, :n]`` keeps the data pointer and the version counter; the shapes change."""
    qweight, scales, zeros, _ = make_problem(gen, 64, 64, 32)
    x = torch.randn(3, 64, generator=gen).half()
    for _ in range(2):
        assert w4a16_matmul(x, qweight, scales, zeros, 32, backend="triton").shape == (3, 64)
    for tensor in (qweight, scales, zeros):
        tensor.data = tensor.data[:, :32]
    y = w4a16_matmul(x, qweight, scales, zeros, 32, backend="triton")
    assert_close_to_reference(y, x, qweight, scales, zeros, 32, None)


@pytest.mark.parametrize("path,M", [("gemv", 1), ("splitk", 3), ("gemm", 17), ("dqmm", 5)])
def test_out_may_be_the_input(gen, path, M):
    """``out`` sharing memory with ``x`` (K == N): computed into a new tensor first, as
    ``torch.mm(a, b, out=a)`` does (the kernels wrote y while other programs read x)."""
    qweight, scales, zeros, _ = make_problem(gen, 64, 64, 32)
    x = torch.randn(M, 64, generator=gen).half()
    expected = w4a16_matmul_reference(x, qweight, scales, zeros, 32).half()
    for _ in range(2):  # (the second call would find the plan of a first, non-aliasing one)
        w4a16_matmul(x.clone(), qweight, scales, zeros, 32, out=torch.empty_like(x), backend="triton")
        x_in = x.clone()
        y = w4a16_matmul(x_in, qweight, scales, zeros, 32, out=x_in, path=path, backend="triton")
        assert y is x_in
        torch.testing.assert_close(y, expected, rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="out must be"):
        w4a16_matmul(x, qweight, scales, zeros, 32, out=x.view(-1)[:M * 32].view(M, 32), backend="triton")



def test_out_may_share_memory_with_the_scales(gen):
    """``out`` a view of the scales (same dtype and columns): computed into a new tensor first, as
    for ``out`` sharing x's memory (dqmm dequantized its second chunk from scales its first
    product had overwritten; on a GPU the tiled paths could race the same way, a tile of some
    rows reading scales that a finished tile of other rows had overwritten, which the
    interpreter, one program at a time, cannot show)."""
    path, M = "dqmm", 5
    K, N, group_size = 128, 40, 4  # (G = 32 rows of scales: room for M rows of out)
    qweight, scales, zeros, _ = make_problem(gen, K, N, group_size)
    x = torch.randn(M, K, generator=gen).half()
    expected = w4a16_matmul_reference(x, qweight, scales, zeros, group_size).half()
    held = scales.clone()
    out = held[-M:]  # (the rows of the last groups: read after the first chunk's product)
    y = w4a16_matmul(x, qweight, held, zeros, group_size, out=out, path=path, backend="triton")
    assert y is out
    torch.testing.assert_close(y, expected, rtol=2e-3, atol=2e-3)


def test_dequantize_into_the_scales_it_reads(gen):
    """``w4a16_dequantize``'s ``out`` a view of the scales: the weight is made first and then
    copied (programs of later rows read scales that earlier ones had written over)."""
    K, N, group_size = 512, 32, 8  # (G = 64 rows of scales; 64 rows of weight, two programs)
    qweight, scales, zeros, _ = make_problem(gen, K, N, group_size)
    expected = dequantize_int4_weight(qweight, scales, zeros, group_size)[:64].half()
    for backend in ("triton", "torch"):
        held = scales.clone()
        got = W.w4a16_dequantize(qweight, held, zeros, group_size, k_rows=64, out=held, backend=backend)
        assert got is held and torch.equal(got, expected), backend


def test_fp32_plans_follow_the_tf32_switch(gen, monkeypatch):
    """allow_tf32 changed between calls: the next fp32 call launches the precision it now asks
    for (a plan kept the first call's)."""
    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    x = torch.randn(3, 64, generator=gen)
    seen = []
    build = W._build_plan
    monkeypatch.setattr(W, "_build_plan", lambda *a, **k: seen.append(W._dot_precision(torch.float32))
                        or build(*a, **k))
    for allow in (True, False, True):
        monkeypatch.setattr(W, "_allow_tf32", lambda allow=allow: allow)
        y = w4a16_matmul(x, qweight, scales, zeros, 32, backend="triton")
    assert seen == ["tf32", "tf32x3"]  # (the third call finds the first call's plan)
    assert_close_to_reference(y, x, qweight, scales, zeros, 32, None)


def test_dqmm_workspaces_are_per_thread(gen):
    """A dqmm call is several launches on one buffer: two threads on one stream must not share
    it (one's chunk could land between the other's dequantize and multiply)."""
    import threading

    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    x = torch.randn(5, 64, generator=gen).half()
    buffers, errors = {}, []
    both = threading.Barrier(2)  # (alive together: a finished thread's id may be given again)
    one_at_a_time = threading.Lock()  # (the Triton interpreter is not thread safe)

    def work(name):
        try:
            with one_at_a_time:
                y = w4a16_matmul(x, qweight, scales, zeros, 32, path="dqmm", backend="triton")
                assert_close_to_reference(y, x, qweight, scales, zeros, 32, None)
                buffers[name] = W._dequant_workspace(x.device, torch.float16, 1)
            both.wait(timeout=60)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert buffers[0].data_ptr() != buffers[1].data_ptr()
    key = W._ENTRIES[(id(qweight), id(scales), id(zeros), id(None), 32)].plan_key(x, None, None)
    assert threading.get_ident() in key


def test_plans_do_not_keep_weights_alive(gen):
    import gc
    import weakref

    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    x = torch.randn(1, 64, generator=gen).half()
    for _ in range(2):
        w4a16_matmul(x, qweight, scales, zeros, 32, backend="triton")
    key = (id(qweight), id(scales), id(zeros), id(None), 32)
    assert key in W._ENTRIES
    ref = weakref.ref(qweight)
    del qweight
    gc.collect()
    assert ref() is None and key not in W._ENTRIES


# ----------------------------------------------------------------------------------------------
# Bad arguments
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("path", ["gemv", "splitk", "gemm"])
def test_fp32_outlier_next_to_its_zero_point(gen, path, group_size):
    """An fp32 activation of 1e3 against codes equal to their zero point: the product is exact
    there, so no path may leave its rounding behind (the GEMV's biased-code sums did: 7e-5 of
    |x| @ |W|, above fp32's tolerance; it now forms q - z for fp32 activations)."""
    K, N = 128, 40
    qweight, scales, zeros, _ = make_problem(gen, K, N, group_size, scales_dtype=torch.float32)
    codes = unpack_int4(qweight)
    codes[7] = zeros[0].to(codes.dtype)
    qweight = pack_int4(codes)
    x = torch.randn(1 if path == "gemv" else 3, K, generator=gen)
    x[:, 7] = 1000.0
    y = w4a16_matmul(x, qweight, scales, zeros, group_size, path=path, backend="triton")
    reference = w4a16_matmul_reference(x, qweight, scales, zeros, group_size)
    bound = x.double().abs() @ dequantize_int4_weight(qweight, scales, zeros, group_size).abs()
    assert ((y.double() - reference).abs() / bound).max() < 1e-6


@pytest.mark.parametrize("path", ["splitk", "gemm"])
def test_wide_row_offsets(gen, path, monkeypatch):
    """The 64-bit row offsets a prefill of M x N >= 2^31 needs (WIDE_M), on a small problem."""
    rows = torch.empty(75000, 8)
    assert W._wide_rows(rows, torch.empty(1, 1).expand(75000, 28672), 28672)
    assert not W._wide_rows(rows[:64], torch.empty(1, 1).expand(64, 28672), 28672)
    monkeypatch.setattr(W, "_wide_rows", lambda x2, out2, N: True)
    qweight, scales, zeros, g_idx = make_problem(gen, 64, 40, 32)
    x = torch.randn(17, 64, generator=gen).half()
    y = w4a16_matmul(x, qweight, scales, zeros, 32, path=path, backend="triton")
    assert_close_to_reference(y, x, qweight, scales, zeros, 32, None)


def test_forced_gemv_of_rows_past_2_31(gen):
    """The GEMV forced on several rows (it takes one row a program) whose row offsets pass 2^31
    (here 3 rows 2^30 elements apart): ``pid_m * stride`` in int32 wrapped and read out of
    bounds. Only the rows read are touched (the rest of the 4 GiB is never backed)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    qweight, scales, zeros = qweight.to(device), scales.to(device), zeros.to(device)
    row_stride = 2**30 + 64
    try:
        storage = torch.empty(2 * row_stride + 64, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError):  # (strict overcommit, or a small GPU)
        pytest.skip("4 GiB of address space not available")
    x = storage.as_strided((3, 64), (row_stride, 1))
    x.copy_(torch.randn(3, 64, generator=gen).half())
    y = w4a16_matmul(x, qweight, scales, zeros, 32, path="gemv", backend="triton")
    assert_close_to_reference(y, x, qweight, scales, zeros, 32, None)
    del storage, x


def test_batches_past_the_grid_limit(gen):
    """The GEMV, mma and wgmma grids put the batch's row blocks on their third dimension, which
    CUDA limits to 65535 (a launch past it fails with 'invalid argument'). wgmma competes for
    every batch over 16 and a bucket's choice serves every larger batch: a small layer (256 x
    256, rows within int32 offsets) on millions of rows must leave it out; forced paths are
    refused clearly. (Rows by a stride-0 expand: no memory.)"""
    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    entry = W._entry_for(qweight, scales, zeros, None, 32, 64, 40, 2)
    row = torch.randn(1, 64, generator=gen).half()
    least = min(config["BLOCK_M"] for config in AUTOTUNE_SPACE["wgmma"])
    assert "wgmma" in W._runnable_paths(row.expand(65535 * least, 64), entry)
    assert "wgmma" not in W._runnable_paths(row.expand(65535 * least + 1, 64), entry)
    x = row.expand(65535 * 16 + 1, 64)
    out = torch.empty(1, 40, dtype=torch.float16)  # (never written: refused before any launch)
    for path, config in (("wgmma", W.INTERPRETER_CONFIG["wgmma"]),
                         ("mma", dict(W.INTERPRETER_CONFIG["mma"], BLOCK_M=16)),
                         ("gemv", W.INTERPRETER_CONFIG["gemv"])):
        with pytest.raises(ValueError, match="limit of 65535"):
            W._build_plan(entry, path, config, x, out)
    with pytest.raises(ValueError, match="at most"):
        w4a16_matmul(row.expand(65535 * least + 1, 64), qweight, scales, zeros, 32,
                     path="wgmma", backend="triton")


def test_a_forced_wgmma_config_is_bounded_by_its_own_block_m(gen):
    """A forced wgmma config's rows are bounded by its own BLOCK_M's grid, not the space's least:
    BLOCK_M = 256 launches at most 65535 x 256 rows, and was refused past 65535 x 64. (Built,
    not launched; rows by a stride-0 expand.)"""
    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    entry = W._entry_for(qweight, scales, zeros, None, 32, 64, 40, 2)
    least = min(config["BLOCK_M"] for config in AUTOTUNE_SPACE["wgmma"])
    config = max(AUTOTUNE_SPACE["wgmma"], key=lambda c: c["BLOCK_M"])
    assert config["BLOCK_M"] > least
    x = torch.randn(1, 64, generator=gen).half().expand(65535 * least + 1, 64)
    out = torch.empty(1, 40, dtype=torch.float16)
    plan = W._build_plan(entry, "wgmma", dict(config), x, out)
    assert plan.launches[0].grid[2] == -(-x.shape[0] // config["BLOCK_M"]) <= W.MAX_GRID_YZ
    with pytest.raises(ValueError, match="limit of 65535"):  # (past its own: still refused)
        W._build_plan(entry, "wgmma", dict(config),
                      x[:1].expand(65535 * config["BLOCK_M"] + 1, 64), out)


@pytest.mark.parametrize("path", ["gemv", "mma"])
def test_a_forced_path_past_the_grid_limit_is_refused_before_tuning(gen, tmp_path, monkeypatch, path):
    """A forced path (no config) past the grid's limit is refused with the limit named: tuned,
    every config failed its plan and the tuner said only 'no candidate config could run'. (The
    limit lowered to a small batch; the tuner on, under the interpreter, its timing replaced.)"""
    import triton

    monkeypatch.setenv("EPMQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("EPMQ_AUTOTUNE", "1")
    monkeypatch.setattr(W, "_TUNE", True)
    monkeypatch.setattr(W, "_CHOSEN", {})
    monkeypatch.setattr(W, "MAX_GRID_YZ", 1)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **options: (fn(), 1.0)[1])
    qweight, scales, zeros, _ = make_problem(gen, 1024, 40, 32)
    x = torch.randn(17, 1024, generator=gen).half()  # (2 row blocks of the mma path's 16)
    with pytest.raises(ValueError, match="limit of 1 "):
        w4a16_matmul(x, qweight, scales, zeros, 32, path=path, backend="triton")


def test_activations_read_transposed_past_int32_offsets_are_copied(gen, monkeypatch):
    """Offsets along K are int32 in the kernels: an ``X.T`` of 2^31 / K tokens would wrap them;
    such activations are made contiguous first (the bound lowered here to a small problem)."""
    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    x = torch.randn(64, 17, generator=gen).half().T  # [17, 64], stride 17 along K
    seen = []
    plan = W._build_plan
    monkeypatch.setattr(W, "_build_plan", lambda entry, path, config, x2, *a, **k: (
        seen.append(x2.stride()), plan(entry, path, config, x2, *a, **k))[1])
    monkeypatch.setattr(W, "INT32_OFFSETS", 17 * 64)
    y = w4a16_matmul(x, qweight, scales, zeros, 32, path="splitk", backend="triton")
    assert_close_to_reference(y, x, qweight, scales, zeros, 32, None)
    assert seen and all(stride[1] == 1 for stride in seen)


def test_bad_arguments_raise(gen):
    qweight, scales, zeros, g_idx = make_problem(gen, 64, 40, 32, "static")
    x = torch.randn(2, 64, generator=gen)

    def call(**changes):
        args = dict(x=x, qweight=qweight, scales=scales, zeros=zeros, group_size=32, g_idx=g_idx)
        args.update(changes)
        return w4a16_matmul(**args, backend="triton")

    cases = [
        (dict(x=torch.randn(2, 60)), "multiple of 8"),
        (dict(x=torch.randn(2, 72)), r"\[K // 8, N\]"),
        (dict(x=x.to(torch.int32)), "x must be"),
        (dict(x=x.double()), "x must be"),
        (dict(qweight=qweight.long()), "qweight must be int32"),
        (dict(qweight=qweight[:4]), r"\[K // 8, N\]"),
        (dict(group_size=48), "not a multiple of group_size"),
        (dict(group_size=0), "group_size"),
        (dict(group_size=32.0), "group_size must be an int"),
        (dict(group_size=-1), r"scales must be \[G, N\]"),
        (dict(scales=scales[:, :8]), r"scales must be \[G, N\]"),
        (dict(scales=scales.to(torch.int32)), "scales must be"),
        (dict(zeros=zeros.float()), "integer"),
        (dict(zeros=zeros[:1]), r"zeros must be \[G, N\]"),
        (dict(g_idx=g_idx[:32]), r"g_idx must be \[K\]"),
        (dict(g_idx=g_idx.float()), "g_idx must be int32"),
        (dict(g_idx=g_idx + 1), r"g_idx values must lie in \[0, 2\)"),
        (dict(g_idx=g_idx - 1), r"g_idx values must lie in \[0, 2\)"),
        (dict(g_idx=torch.stack([g_idx, g_idx], 1)[:, 0]), "g_idx must be contiguous"),
        (dict(x=torch.randn(2, 0), qweight=qweight[:0]), "must be positive"),
        (dict(scales=scales.to("meta")), "different devices"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            call(**changes)
    # the exported reference refuses them too (a negative index read Python's way is no group)
    for bad in (g_idx + 1, g_idx - 1):
        with pytest.raises(ValueError, match=r"g_idx values must lie in \[0, 2\)"):
            w4a16_matmul_reference(x, qweight, scales, zeros, 32, bad)
    with pytest.raises(ValueError, match="last dim of x"):
        call(x=torch.randn(2, 72))
    with pytest.raises(ValueError, match="path"):
        w4a16_matmul(x, qweight, scales, zeros, 32, path="gemm2")
    with pytest.raises(ValueError, match="backend"):
        w4a16_matmul(x, qweight, scales, zeros, 32, backend="cuda")
    with pytest.raises(ValueError, match="out must be"):
        w4a16_matmul(x, qweight, scales, zeros, 32, out=torch.empty(2, 41), backend="triton")


def test_a_forced_config_is_checked_against_its_path(gen):
    """A forced config naming an option its path does not have (a misspelt HALF_2, or a config of
    another path) was run without it, silently: a benchmark timed another config than the one it
    reported; one lacking an option the path needs failed deep in the plan as a bare KeyError
    ('BLOCK_K'). Both refused up front, naming the path and the options."""
    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    x = torch.randn(1, 64, generator=gen).half()
    good = dict(W.INTERPRETER_CONFIG["gemv"])
    cases = [(dict(good, HALF_2=True), "gemv", r"gemv path has no option.*HALF_2"),
             (dict(W.INTERPRETER_CONFIG["splitk"]), "gemv", r"gemv path has no option.*GROUP_M"),
             ({k: v for k, v in good.items() if k != "BLOCK_K"}, "gemv", r"gemv path needs.*BLOCK_K"),
             (dict(BLOCK_N=3), None, r"gemv path needs"),
             (dict(BLOCK_R=4, BLOCK_N=32, num_warps=4), "dqmm", r"dqmm path needs CHUNK_K or CHUNK_N"),
             (dict(good, PATH="splitk"), "gemv", r"PATH 'splitk'.*the gemv path")]
    for config, path, message in cases:
        with pytest.raises(ValueError, match=message):
            w4a16_matmul(x, qweight, scales, zeros, 32, path=path, config=config, backend="triton")
    for config in (good, dict(good, HALF2=True), dict(good, PATH="gemv")):  # (what the space holds)
        y = w4a16_matmul(x, qweight, scales, zeros, 32, path="gemv", config=config, backend="triton")
        assert_close_to_reference(y, x, qweight, scales, zeros, 32, None)


def test_a_forced_configs_values_are_checked(gen):
    """A forced config's values were taken unread: GROUP_M = 0 made the output NaN (and -1 wrote
    before it: out of bounds), SPLIT_K = 0 ended in a bare ZeroDivisionError, a BLOCK_K of 48 or 4
    in the interpreter's bare 'must be a power of 2', and a PREFETCH of 3 or STREAMS of 3 ran as
    2 and 1, silently (a benchmark timed another config than the one it reported). Each is
    refused naming the option; numpy's integers and bools (a sweep's) are taken as Python's."""
    import numpy as np

    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    cases = [("gemm", dict(GROUP_M=0), "GROUP_M must be a positive integer, got 0"),
             ("gemm", dict(GROUP_M=1.5), "GROUP_M must be a positive integer, got 1.5"),
             ("gemv", dict(SPLIT_K=0), "SPLIT_K must be a positive integer, got 0"),
             ("gemv", dict(BLOCK_K=48), "BLOCK_K must be a power of two, at least 8, got 48"),
             ("gemv", dict(BLOCK_K=4), "BLOCK_K must be a power of two, at least 8, got 4"),
             ("splitk", dict(BLOCK_M=24), "BLOCK_M must be a power of two, got 24"),
             ("gemv", dict(num_warps=3), "num_warps must be a power of two, got 3"),
             ("gemv", dict(PREFETCH=3), r"PREFETCH must be one of \(1, 2\), got 3"),
             ("gemv", dict(HALF2="yes"), "HALF2 must be True or False, got 'yes'"),
             ("dqmm", dict(STREAMS=3), r"STREAMS must be one of \(1, 2\), got 3"),
             ("mma", dict(SPLIT_K=0), "SPLIT_K must be a positive integer, got 0")]
    for path, change, message in cases:
        x = torch.randn(3, 64, generator=gen).half()
        with pytest.raises(ValueError, match=f"the {path} path's {message}"):
            w4a16_matmul(x, qweight, scales, zeros, 32, path=path, config=dict(W.INTERPRETER_CONFIG[path], **change),
                         backend="triton")
    x = torch.randn(3, 64, generator=gen).half()
    config = dict(W.INTERPRETER_CONFIG["splitk"], SPLIT_K=np.int64(2), PAIRS=np.True_)
    y = w4a16_matmul(x, qweight, scales, zeros, 32, path="splitk", config=config, backend="triton")
    assert_close_to_reference(y, x, qweight, scales, zeros, 32, None)


def test_a_config_naming_its_path_runs_on_that_path(gen):
    """An autotune candidate names its path (``PATH``, as ``explain``'s timings list them): given
    as config without path=, it was refused where the path chosen by M differed ("config names
    PATH 'splitk', but it is forced on the gemv path", no path having been forced); it runs on
    the path it names."""
    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    x = torch.randn(1, 64, generator=gen).half()
    assert W._path_for(1) != "splitk"
    config = dict(W.INTERPRETER_CONFIG["splitk"], PATH="splitk")
    y = w4a16_matmul(x, qweight, scales, zeros, 32, config=config, backend="triton")
    assert_close_to_reference(y, x, qweight, scales, zeros, 32, None)
    with pytest.raises(ValueError, match=r"config names PATH 'fast', not one of"):
        w4a16_matmul(x, qweight, scales, zeros, 32, config=dict(config, PATH="fast"), backend="triton")


def test_reference_refuses_what_the_matmul_refuses(gen):
    """The exported reference and dequantizer (the ground truth users check their weights
    against) refuse the weights ``w4a16_matmul`` refuses, instead of a plausible wrong answer:
    zero points truncated, groups of another size read, an int64 word's high codes dropped."""
    qweight, scales, zeros, g_idx = make_problem(gen, 64, 40, 16)
    x = torch.randn(2, 64, generator=gen)
    cases = [
        (dict(zeros=zeros.float() + 0.5), "integer"),
        (dict(qweight=qweight.long()), "qweight must be int32"),
        (dict(qweight=qweight.view(-1)), "qweight must be"),
        (dict(group_size=32), r"scales must be \[G, N\]"),  # (scales of 4 groups: 2 read)
        (dict(group_size=-1), r"scales must be \[G, N\]"),
        (dict(group_size=48), "not a multiple of group_size"),
        (dict(group_size=True), "group_size must be an int"),
        (dict(group_size=0), "group_size"),
        (dict(scales=(scales * 1e3).int()), "scales must be"),
        (dict(g_idx=(torch.arange(64) // 16).float() + 0.5), "g_idx must be int32"),
        (dict(g_idx=torch.arange(32) // 16), r"g_idx must be \[K\]"),
    ]
    for changes, message in cases:
        args = dict(qweight=qweight, scales=scales, zeros=zeros, group_size=16, g_idx=None)
        args.update(changes)
        with pytest.raises(ValueError, match=message):
            dequantize_int4_weight(**args)
        with pytest.raises(ValueError, match=message):
            w4a16_matmul_reference(x, **args)
    with pytest.raises(ValueError, match="last dim of x"):
        w4a16_matmul_reference(torch.randn(2, 72), qweight, scales, zeros, 16)
    # what it takes beyond the kernels: float64 activations, a non-contiguous g_idx
    static = torch.stack([torch.arange(64) // 16] * 2, 1)[:, 0]
    y = w4a16_matmul_reference(x.double(), qweight, scales, zeros, 16, static)
    assert torch.equal(y, w4a16_matmul_reference(x, qweight, scales, zeros, 16))


# ----------------------------------------------------------------------------------------------
# Autotune cache (no GPU needed: hits and EPMQ_AUTOTUNE=0 never time anything)
# ----------------------------------------------------------------------------------------------
def test_autotune_cache_persists(tmp_path, monkeypatch):
    monkeypatch.setenv("EPMQ_CACHE_DIR", str(tmp_path))
    space = AUTOTUNE_SPACE["gemm"]
    cache = autotune_cache.DiskCache("w4a16", "NVIDIA H100 80GB HBM3", space)
    assert cache.path.startswith(str(tmp_path / "autotune"))
    assert "nvidia-h100-80gb-hbm3" in os.path.basename(cache.path)
    assert cache.get("gemm|M1024") is None
    cache.put("gemm|M1024", space[3])

    second_process = autotune_cache.DiskCache("w4a16", "NVIDIA H100 80GB HBM3", space)
    assert second_process.get("gemm|M1024") == space[3]
    with open(second_process.path) as f:
        assert json.load(f)["entries"]["gemm|M1024"] == space[3]

    def must_not_time(config):
        raise AssertionError("a cached key must not be timed again")

    assert autotune_cache.tune(second_process, "gemm|M1024", space, must_not_time) == space[3]
    monkeypatch.setenv("EPMQ_AUTOTUNE", "0")
    assert autotune_cache.tune(second_process, "gemm|M64", space, must_not_time) == space[0]

    other_space = autotune_cache.DiskCache("w4a16", "NVIDIA H100 80GB HBM3", space[:2])
    assert other_space.path != cache.path and other_space.get("gemm|M1024") is None
    other_gpu = autotune_cache.DiskCache("w4a16", "NVIDIA A10", space)
    assert other_gpu.get("gemm|M1024") is None
    # another version of the kernels (their source changed): configs timed and verified for
    # other code are not taken
    monkeypatch.setattr(autotune_cache, "_CODE_ID", "0ther0de")
    other_code = autotune_cache.DiskCache("w4a16", "NVIDIA H100 80GB HBM3", space)
    assert other_code.path != cache.path and other_code.get("gemm|M1024") is None
    monkeypatch.undo()
    assert autotune_cache.code_id() == cache.code and len(cache.code) == 8


@pytest.mark.parametrize("big", [300.0, 5000.0, 60000.0])
def test_gemv_half2_with_massive_activations(gen, big):
    """Activations far past fp16's comfortable range (LLMs' "massive activations"): the HALF2
    GEMV's fp16 word sums would overflow (15 x 5000 x 8 > 65504); a row holding one is taken at
    2^-8, so the result stays finite and as accurate as the fp32 unpacking's, the small
    activations of the same rows included."""
    K, N = 256, 40
    qweight, scales, zeros, _ = make_problem(gen, K, N, 128)
    x = torch.randn(1, K, generator=gen)
    x[0, 3], x[0, 100] = big, -big / 3  # (rows 0 and 12 of the packed words)
    x[0, 8:16] = big / 7  # (a whole row of large ones)
    x = x.half()
    y = {}
    for half2 in (False, True):
        config = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, PREFETCH=2, num_warps=4, num_stages=1,
                      HALF2=half2)
        y[half2] = w4a16_matmul(x, qweight, scales, zeros, 128, path="gemv", config=config,
                                backend="triton")
    reference = w4a16_matmul_reference(x, qweight, scales, zeros, 128)
    bound = x.double().abs() @ dequantize_int4_weight(qweight, scales, zeros, 128).abs()
    finite = reference.abs() < 65504  # (an output past fp16's range is inf for every path)
    assert torch.equal(torch.isfinite(y[True]), finite) and torch.equal(torch.isfinite(y[False]), finite)
    err = {h: float(((y[h].double() - reference).abs() / bound)[finite].max()) for h in y}
    assert err[True] <= TOLERANCE[torch.float16] and err[True] <= 4 * err[False] + 1e-4, err


def test_gemv_half2_is_off_for_zero_points_outside_the_grid(gen):
    """Zero points past 15 (not GPTQ's, but not refused) would let HALF2's fp16 sums overflow
    (z = 100, x = 200: -inf); the option is then off for those weights, and the GEMV exact."""
    from epmq_kernels.w4a16 import _entry_for, _half2

    K, N = 128, 40
    qweight, scales, _, _ = make_problem(gen, K, N, 64)
    zeros = torch.full((2, N), 100, dtype=torch.uint8)
    x = torch.full((1, K), 200.0).half()
    config = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=1, PREFETCH=2, num_warps=4, num_stages=1, HALF2=True)
    entry = _entry_for(qweight, scales, zeros, None, 64, K, N, 2)
    assert _half2(config, x, False) and not _half2(config, x, False, entry)
    y = w4a16_matmul(x, qweight, scales, zeros, 64, path="gemv", config=config, backend="triton")
    assert bool(torch.isfinite(y).all())
    assert_close_to_reference(y, x, qweight, scales, zeros, 64, None)



def test_int64_zero_points_past_int32_are_outside_the_grid(gen):
    """int64 zero points of 2^32 + 5 (not GPTQ's, but not refused) were read as int32 by the grid
    check, 5, so HALF2 and the mma path ran on that wrapped zero point; now they are outside the
    grid: HALF2 is off (the GEMV matches the reference) and the mma path refuses them by value."""
    from epmq_kernels.w4a16 import _entry_for, _half2

    K, N = 128, 40
    qweight, _, _, _ = make_problem(gen, K, N, 64)
    scales = torch.rand(2, N, generator=gen) * 1e-9 + 1e-9  # (|q - z| s of about 4)
    zeros = torch.full((2, N), 2**32 + 5, dtype=torch.int64)
    x = torch.randn(1, K, generator=gen).half()
    config = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, PREFETCH=2, num_warps=4, num_stages=1, HALF2=True)
    entry = _entry_for(qweight, scales, zeros, None, 64, K, N, 2)
    assert not entry.zeros_in_grid() and not _half2(config, x, False, entry)
    y = w4a16_matmul(x, qweight, scales, zeros, 64, path="gemv", config=config, backend="triton")
    assert_close_to_reference(y, x, qweight, scales, zeros, 64, None)
    with pytest.raises(ValueError, match=f"zero points in {2**32 + 5}..{2**32 + 5}"):
        w4a16_matmul(x, qweight, scales, zeros, 64, path="mma", backend="triton")


def test_gemv_half2_reads_no_zero_points_inside_a_graph_capture(gen, monkeypatch):
    """Weights first seen inside a CUDA graph's capture: their zero points are not read (a
    read of the device breaks the capture), and HALF2 is off for them until they are read
    outside one (here the capture is simulated: this machine may have no GPU)."""
    import epmq_kernels.w4a16 as w

    K, N = 128, 40
    qweight, scales, zeros, _ = make_problem(gen, K, N, 64)
    x = torch.randn(1, K).half()
    config = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=1, PREFETCH=2, num_warps=4, num_stages=1, HALF2=True)
    entry = w._entry_for(qweight, scales, zeros, None, 64, K, N, 2)
    entry._zeros_in_grid = None
    monkeypatch.setattr(w, "_capturing", lambda device: True)
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: pytest.fail("a read during the capture"))
    assert not w._half2(config, x, False, entry) and entry._zeros_in_grid is None
    monkeypatch.undo()
    assert w._half2(config, x, False, entry) and entry._zeros_in_grid is True  # (read outside)
    monkeypatch.setattr(w, "_capturing", lambda device: True)
    assert w._half2(config, x, False, entry)  # (known: no read needed)


def test_tune_keeps_the_fastest_config_that_verifies(tmp_path, monkeypatch):
    """``tune``'s ``verify``: a wrong config is never kept however fast (asked fastest first,
    then the next), rejected ones are recorded, and a key whose every config fails is an
    error, not a silent pick."""
    import triton

    monkeypatch.setenv("EPMQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("EPMQ_AUTOTUNE", "1")
    space = [dict(BLOCK=b) for b in (16, 32, 64)]
    ms = {16: 3.0, 32: 1.0, 64: 2.0}  # 32 fastest, then 64
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: fn())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cache = autotune_cache.DiskCache("w4a16", "gpu", space)
    asked = []

    def verify(config):
        asked.append(config["BLOCK"])
        return config["BLOCK"] != 32

    assert autotune_cache.tune(cache, "k", space, lambda c: ms[c["BLOCK"]], verify=verify) == space[2]
    assert asked == [32, 64] and autotune_cache.REJECTED[("w4a16", "k")] == [space[1]]
    assert cache.get("k") == space[2]
    with pytest.raises(RuntimeError, match="failed verification"):
        autotune_cache.tune(cache, "other", space, lambda c: ms[c["BLOCK"]], verify=lambda c: False)


@pytest.mark.parametrize("enabled", ["0", "1"])
def test_tune_refuses_an_empty_candidate_list_by_kernel(tmp_path, monkeypatch, enabled):
    """No candidates ended in a bare IndexError naming no kernel (``candidates[0]`` with autotuning
    off, ``errors[0]`` with it on); refused naming the family and key, nothing run or cached."""
    monkeypatch.setenv("EPMQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("EPMQ_AUTOTUNE", enabled)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cache = autotune_cache.DiskCache("w4a16", "gpu", [])

    def must_not_run(config):
        raise AssertionError("nothing to run")

    with pytest.raises(ValueError, match=r"w4a16 gemm\|M64: no candidate config .*candidates is empty"):
        autotune_cache.tune(cache, "gemm|M64", [], must_not_run)
    assert cache.get("gemm|M64") is None


@pytest.mark.parametrize("tuning_x", ["random", "zeros", "nan", "huge", "large_weights"])
def test_tuner_verifies_on_its_own_input(gen, tmp_path, monkeypatch, tuning_x):
    """``_choose`` (the tuner, run here under the interpreter with its timing replaced) never
    keeps a wrong config, even the fastest, and judges on a fixed random activation of its own:
    a caller's tuning call of zeros (which every config gets right), NaN or overflowing values
    (which none can be checked on) neither hides a wrong config nor rejects every config; nor
    do weights so large (|W| up to 16000) that a unit activation's product overflows fp16."""
    import triton

    monkeypatch.setenv("EPMQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("EPMQ_AUTOTUNE", "1")
    monkeypatch.setattr(W, "_TUNE", True)
    monkeypatch.setattr(W, "_CHOSEN", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    good = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, PREFETCH=2, num_warps=4, num_stages=1)
    fast = dict(good, HALF2=True)
    broken = dict(good, BLOCK_N=64, BROKEN=True)
    crashing = dict(good, BLOCK_N=128, CRASH=True)  # (runs on the caller's x, fails on the probe)
    monkeypatch.setattr(W, "_candidates",
                        lambda path, *args: [good, fast, broken, crashing] if path == "gemv" else [])
    build = W._build_plan

    def build_plan(entry, path, config, x2, out2, lead=None):
        plan = build(entry, path, {k: v for k, v in config.items() if k not in ("BROKEN", "CRASH")},
                     x2, out2, lead)
        if config.get("CRASH") and x2 is not x:
            raise RuntimeError("PTXASError: not on this GPU")
        if not config.get("BROKEN"):
            return plan
        original = plan.__call__

        class Broken:  # a plan that writes a wrong result
            def __call__(self, x, out, where=None):
                original(x, out)
                out.mul_(-1)

            def usable(self):
                return True

            def warmup(self, x, out):
                pass

        return Broken()

    monkeypatch.setattr(W, "_build_plan", build_plan)
    ms = {id(good): 3.0, id(fast): 2.0, id(broken): 1.0, id(crashing): 0.5}
    current = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), ms[id(current[-1])])[1])
    tune = autotune_cache.tune

    def recording_tune(cache, key, candidates, run, **kw):
        def run_one(candidate):
            current.append(next(c for c in (crashing, broken, fast, good)
                                if all(candidate.get(k) == v for k, v in c.items())))
            return run(candidate)
        return tune(cache, key, candidates, run_one, **kw)

    monkeypatch.setattr(autotune_cache, "tune", recording_tune)
    qweight, scales, zeros, _ = make_problem(gen, 128, 40, 32)
    if tuning_x == "large_weights":
        scales = torch.full_like(scales, 1000.0)
    x = {"large_weights": 1e-3 * torch.randn(1, 128, generator=gen),
         "random": torch.randn(1, 128, generator=gen), "zeros": torch.zeros(1, 128),
         "nan": torch.full((1, 128), float("nan")),
         "huge": torch.full((1, 128), 60000.0)}[tuning_x].half()
    entry = W._entry_for(qweight, scales, zeros, None, 32, 128, 40, 4)
    path, config = W._choose(("gemv",), x, entry)
    assert path == "gemv" and config.get("HALF2") and not config.get("BROKEN")
    rejected = autotune_cache.REJECTED[("w4a16", W._tuning_key(("gemv",), x, entry))]
    assert [(c.get("CRASH"), c.get("BROKEN")) for c in rejected] == [(True, None), (None, True)]


@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("M,K,N", [(1, 256, 37), (3, 128, 72)])
def test_gemv_half2_matches_reference(gen, M, K, N, group_size):
    """The GEMV's HALF2 option (two fp16 codes per instruction; interpreted here in Triton's fp16
    arithmetic, on the GPU in PTX): every grouping, split-K slices of one group or several, N
    odd, several rows, fp16 and bf16 activations; on activations it cannot read as words (not
    16-byte aligned) it runs the fp32 unpacking instead, and for fp32 it is off, both still
    correct."""
    from epmq_kernels.w4a16 import _half2

    if group_size > K:
        pytest.skip("group wider than K")
    qweight, scales, zeros, _ = make_problem(gen, K, N, group_size)
    base = torch.randn(M, K + 8, generator=gen)
    aligned = [base[:, :K].to(dtype) for dtype in (torch.float16, torch.bfloat16)]
    for x in aligned + [base.half()[:, 1:K + 1]]:  # aligned; misaligned by 2 bytes
        for split_k in (1, 2):
            config = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=split_k, PREFETCH=2, num_warps=4,
                          num_stages=1, HALF2=True)
            assert _half2(config, x.reshape(-1, K), False) == (x.data_ptr() % 16 == 0)
            out = torch.full((M, N), float("nan"), dtype=x.dtype)
            w4a16_matmul(x, qweight, scales, zeros, group_size, out=out, path="gemv",
                         config=config, backend="triton")
            assert_close_to_reference(out, x, qweight, scales, zeros, group_size, None)
    assert not _half2(config, base[:, :K].contiguous(), False) and not _half2(config, aligned[0], True)


@pytest.mark.parametrize("half2", [False, True])
@pytest.mark.parametrize("K,group_size", [(192, 64), (384, 128)])
def test_gemv_slices_that_start_inside_a_group(gen, K, group_size, half2):
    """The GEMV counts the group of each tile along its K slice instead of dividing: a slice
    of 96 or 192 inputs (BLOCK_K = 32, two slices) starts a tile or more into a group of 64 or
    128, and neither is one group a slice nor a slice a group. The other GEMV tests start their
    slices at a group's edge (on a GPU: group 256 at K = 11008, eight slices of 1408)."""
    N, M = 37, 1
    qweight, scales, zeros, _ = make_problem(gen, K, N, group_size)
    config = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, PREFETCH=2, num_warps=4, num_stages=1, HALF2=half2)
    k_per_split = -(-K // 32 // 2) * 32
    assert k_per_split % group_size and group_size % k_per_split and group_size > 32
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(M, K, generator=gen).to(dtype)
        out = torch.full((M, N), float("nan"), dtype=dtype)
        w4a16_matmul(x, qweight, scales, zeros, group_size, out=out, path="gemv", config=config,
                     backend="triton")
        assert_close_to_reference(out, x, qweight, scales, zeros, group_size, None)


@pytest.mark.parametrize("big,scale", [(300.0, 1.0), (6e4, 1.0), (3e9, 1.0), (1e30, 1.0),
                                       (3e-6, 1e-7), (1e-9, 1e-10)])
def test_gemv_half2_takes_bf16_activations_of_any_size(gen, big, scale):
    """bf16 activations reach past fp16's range both ways (3e38 to 1e-38): HALF2 takes each
    row at the power of two that brings its largest |x| into [128, 256) (bf16 values are exact
    in fp16 there), so the result is as accurate as the fp32 unpacking's, rows of activations
    far below fp16's normal range (``scale``: a review found a row of 1e-7 off by 4.5e-2, of
    1e-10 all zero, when rows were only ever scaled down) and a row with a tiny one beside a
    large one included; NaN stays NaN."""
    K, N = 256, 40
    qweight, scales, zeros, _ = make_problem(gen, K, N, 128)
    x = scale * torch.randn(1, K, generator=gen)
    x[0, 3], x[0, 100] = big, -big / 3  # (rows 0 and 12 of the packed words)
    x[0, 8:16] = big / 7  # (a whole row of large ones)
    x[0, 17], x[0, 18] = big, big * 1e-3  # (a small one beside a large one)
    x = x.bfloat16()
    reference = w4a16_matmul_reference(x, qweight, scales, zeros, 128)
    bound = x.double().abs() @ dequantize_int4_weight(qweight, scales, zeros, 128).abs()
    y, err = {}, {}
    for half2 in (False, True):
        config = dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=2, PREFETCH=2, num_warps=4, num_stages=1,
                      HALF2=half2)
        y[half2] = w4a16_matmul(x, qweight, scales, zeros, 128, path="gemv", config=config,
                                backend="triton")
        assert bool(torch.isfinite(y[half2]).all())
        err[half2] = float(((y[half2].double() - reference).abs() / bound).max())
    assert err[True] <= TOLERANCE[torch.bfloat16] and err[True] <= 2 * err[False] + 1e-3, err
    x[0, 40] = float("nan")
    y = w4a16_matmul(x, qweight, scales, zeros, 128, path="gemv", config=config, backend="triton")
    assert bool(torch.isnan(y).all())



@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_an_inf_activation_at_batch_1_is_as_documented(gen, dtype):
    """``w4a16_matmul``'s docstring (and the README's kernel section): an inf activation at M = 1
    makes every output of the 16-bit GEMV without HALF2 NaN (its bias and zero-point terms, taken
    off after the sum, are inf too), where the reference gives +-inf, NaN only where that input's
    weight is 0; HALF2 and the other paths give the reference's. Should that GEMV come to follow
    the reference, this test and those two texts change with it."""
    K, N = 128, 40
    qweight, scales, zeros, _ = make_problem(gen, K, N, 64)
    x = torch.randn(1, K, generator=gen).to(dtype)
    x[0, 5] = float("inf")  # (code 5 of its word: biased by 128 on the GEMV's fast path)
    reference = w4a16_matmul_reference(x, qweight, scales, zeros, 64, dtype=torch.float32).to(dtype)
    assert bool(torch.isinf(reference).any()) and not bool(torch.isnan(reference).all())
    gemv = dict(INTERPRETER_CONFIG["gemv"])
    y = w4a16_matmul(x, qweight, scales, zeros, 64, path="gemv", config=gemv, backend="triton")
    assert bool(torch.isnan(y).all())
    for path, config in [("gemv", dict(gemv, HALF2=True)), ("splitk", None), ("gemm", None),
                         ("dqmm", None), ("mma", None), ("wgmma", None)]:
        y = w4a16_matmul(x, qweight, scales, zeros, 64, path=path, config=config, backend="triton")
        assert torch.equal(torch.isnan(y), torch.isnan(reference)), path
        assert torch.equal(y[~torch.isnan(y)], reference[~torch.isnan(reference)]), path


@pytest.mark.parametrize("group_size", [16, 32])
def test_fp16_weights_past_its_range_are_as_documented(group_size):
    """``w4a16_matmul``'s docstring (and the README's kernel section): with fp16 activations, a
    weight ``(q - z) s`` past 65504 is inf on the paths that dequantize into fp16 (dqmm; splitk or
    gemm tiles that straddle groups, gathered per row, here groups of 16 in tiles of 32; gemm's K
    slice of 64 spanning groups of 32 without SCALE_AFTER), and the outputs of its column inf, or
    NaN where its infinite weights meet activations of both signs or a zero; the GEMV stays
    finite, as the reference is."""
    K, N = 64, 32
    codes = torch.full((K, N), 8)
    zeros = torch.full((K // group_size, N), 8, dtype=torch.uint8)
    scales = torch.full((K // group_size, N), 0.01).half()
    scales[0, 0], codes[3, 0], codes[5, 0] = 20000.0, 15, 15  # (column 0: two weights of 140000)
    scales[0, 1], codes[7, 1], codes[6, 1] = 20000.0, 15, 1  # (column 1: 140000 and -140000)
    qweight = pack_int4(codes)
    positive = torch.full((2, K), 1e-3).half()
    with_a_zero, of_both_signs = positive.clone(), positive.clone()
    with_a_zero[:, 5], of_both_signs[:, 5] = 0.0, -1e-3
    paths = [("gemm", None), ("dqmm", None)]
    if group_size == 16:
        paths += [("splitk", None), ("splitk", dict(INTERPRETER_CONFIG["splitk"], SCALE_AFTER=False))]
    for x, column_0 in [(positive, float("inf")), (with_a_zero, float("nan")), (of_both_signs, float("nan"))]:
        reference = w4a16_matmul_reference(x, qweight, scales, zeros, group_size)
        assert bool(torch.isfinite(reference).all())
        y = w4a16_matmul(x, qweight, scales, zeros, group_size, path="gemv", config=INTERPRETER_CONFIG["gemv"],
                         backend="triton")
        assert_close_to_reference(y, x, qweight, scales, zeros, group_size, None)
        for path, config in paths:
            y = w4a16_matmul(x, qweight, scales, zeros, group_size, path=path, config=config, backend="triton")
            torch.testing.assert_close(y[:, 0], torch.full((2,), column_0, dtype=torch.float16), equal_nan=True)
            assert bool(torch.isnan(y[:, 1]).all()) and bool(torch.isfinite(y[:, 2:]).all()), path


def test_corrupt_cache_file_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("EPMQ_CACHE_DIR", str(tmp_path))
    cache = autotune_cache.DiskCache("w4a16", "gpu", AUTOTUNE_SPACE["gemv"])
    os.makedirs(os.path.dirname(cache.path))
    with open(cache.path, "w") as f:
        f.write("{not json")
    assert cache.get("k") is None
    cache.put("k", AUTOTUNE_SPACE["gemv"][0])
    assert autotune_cache.DiskCache("w4a16", "gpu", AUTOTUNE_SPACE["gemv"]).get("k") is not None
    # valid JSON of another shape: ignored too (a matmul must not fail on its cache)
    space = autotune_cache.space_id(AUTOTUNE_SPACE["gemv"])
    for text in ("null", "[]", '"x"', "3", json.dumps(dict(space=space, gpu="gpu", entries=[1, 2])),
                 json.dumps(dict(space=space, gpu="gpu", entries={"k": 3}))):
        with open(cache.path, "w") as f:
            f.write(text)
        fresh = autotune_cache.DiskCache("w4a16", "gpu", AUTOTUNE_SPACE["gemv"])
        assert fresh.get("k") is None, text
        fresh.put("j", AUTOTUNE_SPACE["gemv"][0])
        assert autotune_cache.DiskCache("w4a16", "gpu", AUTOTUNE_SPACE["gemv"]).get("j") is not None
    assert os.listdir(os.path.dirname(cache.path)) == [os.path.basename(cache.path)]  # (no temporaries)


def test_a_failed_cache_write_leaves_no_temporary(tmp_path, monkeypatch):
    monkeypatch.setenv("EPMQ_CACHE_DIR", str(tmp_path))
    cache = autotune_cache.DiskCache("w4a16", "gpu", AUTOTUNE_SPACE["gemv"])
    with pytest.raises(TypeError):
        cache.put("k", {"BLOCK_N": object()})  # (not JSON)
    assert os.listdir(os.path.dirname(cache.path)) == []


@pytest.mark.parametrize("value, enabled", [("0", False), ("off", False), ("OFF", False), ("FALSE", False),
                                            (" no ", False), ("1", True), ("on", True)])
def test_autotune_switch(value, enabled, monkeypatch):
    monkeypatch.setenv("EPMQ_AUTOTUNE", value)
    assert autotune_cache.autotune_enabled() is enabled


# ----------------------------------------------------------------------------------------------
# The compiled (GPU) path builds: compile for sm_90 on the CPU, no GPU needed
# ----------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "0"
    sys.path.insert(0, "benchmarks")
    sys.path.insert(0, os.path.join("tests", "kernels"))
    import torch
    import compile_report
    from gpu_compile import compile_sm90

    # one config per kernel variant: GEMV (prefetch depths, one-group slices, gather, 8 warps,
    # BLOCK_K 256), split-K dots (pairs, swapped, scaled after the dot, gather, fp32), GEMMs,
    # the dqmm chunk dequantizer
    rows = compile_report.report(compile_report.w4a16_cases(full=False))
    print("ROWS " + json.dumps(rows))

    from epmq_kernels import packing as P
    codes = torch.empty(1024, 4096, dtype=torch.int32)
    words = torch.empty(128, 4096, dtype=torch.int32)
    for kernel, args in [(P._pack_int4_kernel, [codes, words, 128, 4096, 4096, 1, 4096, 1]),
                         (P._unpack_int4_kernel, [words, codes, 128, 4096, 4096, 1, 4096, 1])]:
        blocks = dict(BLOCK_R=P._BLOCK_R, BLOCK_C=P._BLOCK_C)
        assert compile_sm90(kernel, args, blocks, 4, 1).asm["cubin"]
        print(kernel.__name__, "ok")

    # the Gluon mma kernel for an Ampere card too (mma.sync is sm_80's); its layout
    # conversions are asserted trivial at compile time, there as on sm_90
    for dtype in ("float16", "bfloat16"):
        name, kernel, args, constexprs, warps, stages = next(
            c for c in compile_report.w4a16_cases(full=False) if c[0].startswith("mma " + dtype))
        assert compile_sm90(kernel, args, constexprs, warps, stages, capability=80).asm["cubin"]
        print("mma sm_80 ok")
""")


# (M, K, N, group_size, g_idx kind, dtype, x a view one element into a wider matrix): one row
# and 16 (the mma path's), 33 (splitk or wgmma), 65 (gemm or wgmma) and 256 (dqmm too); K and N
# of no power of two (K = 136: 17 packed rows), N = 1 (strides of 1: constants), per channel,
# groups of 32 and 64, act-order; fp16, bf16 and fp32 activations, and unaligned ones
_W4A16_AS_LAUNCHED = [
    (1, 136, 37, -1, None, torch.float16, False),
    (1, 256, 40, 32, None, torch.bfloat16, False),
    (1, 136, 37, -1, None, torch.float32, False),
    (1, 64, 1, -1, None, torch.float16, False),
    (1, 128, 37, 32, "permuted", torch.float16, False),
    (16, 192, 37, 64, None, torch.float16, False),
    (16, 136, 40, -1, None, torch.bfloat16, True),
    (33, 192, 40, 32, None, torch.float16, False),
    (65, 136, 37, -1, None, torch.bfloat16, False),
    (256, 192, 37, 32, None, torch.float16, False),
]


@pytest.mark.skipif(not ptxas_available(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_as_launched(gen, monkeypatch):
    """The compile tests above hand the kernels the report's shapes (K = N = 4096); a launch
    specialises its integers (N = 1, one group, one K slice, strides of 1: constants) and the
    16-byte divisibility of its pointers, sizes and strides. The launches w4a16_matmul makes for
    a GPU (recorded with the module told it runs compiled: inline PTX, bf16 arithmetic) on
    every path _paths_for offers these rows, the first config the autotuner would try of each
    (and the last, up to 16 rows), compiled for sm_90 and sm_80 (wgmma: sm_90 alone, Hopper's)."""
    names = ("_w4a16_gemv_kernel", "_w4a16_dot_kernel", "_w4a16_dequant_kernel", "_w4a16_mma_kernel",
             "_w4a16_wgmma_kernel")
    launches = {name: Launches(getattr(W, name), run=False) for name in names}
    for name, launch in launches.items():
        monkeypatch.setattr(W, name, launch)
    monkeypatch.setattr(W, "INTERPRETED", False)
    seen = set()
    for M, K, N, group, kind, dtype, shifted in _W4A16_AS_LAUNCHED:
        qweight, scales, zeros, g_idx = make_problem(gen, K, N, group, kind)
        x = torch.randn(M, K + shifted, generator=gen).to(dtype)[:, int(shifted):]
        G = 1 if group == -1 else K // group
        for path in W._paths_for(M):
            configs = W._candidates(path, M, K, G, group if group > 0 else K, kind == "permuted", dtype, N)
            # (the last config too where the batch is small: the GEMV's HALF2 ones, mma's widest)
            for config in configs[:1] + (configs[-1:] if M <= 16 else []):
                try:
                    W.w4a16_matmul(x, qweight, scales, zeros, group, g_idx, path=path, config=config,
                                   backend="triton")
                except ValueError as error:  # (a path these activations cannot take: refused, not launched)
                    assert "cannot run" in str(error), (path, config, error)
                    continue
                seen.add(path)
    assert seen == {"gemv", "splitk", "mma", "wgmma", "gemm", "dqmm"}, seen
    sm90 = [(name, launches[name].calls) for name in names if name == "_w4a16_wgmma_kernel"]
    both = [(name, launches[name].calls) for name in names if name != "_w4a16_wgmma_kernel"]
    script = compile_as_launched("epmq_kernels.w4a16", both)
    script += "\n" + compile_as_launched("epmq_kernels.w4a16", sm90, capabilities=(90,))
    proc = run_compile_script(script, timeout=600)
    assert proc.returncode == 0 and proc.stdout.count("compiled") == 2, proc.stdout[-600:] + proc.stderr[-3000:]


class _StandInCompiled:
    """What Triton's JIT returns from a launch: a compiled kernel with a C launcher (``run``)."""

    packed_metadata, function = "meta", "fn"

    def __init__(self):
        self.runs = []

    def run(self, gx, gy, gz, stream, function, packed, meta, enter, exit_, *args):
        self.runs.append(args)


class _StandInJIT:
    """A ``@triton.jit`` function's launch interface: ``fn[grid](*args, **options)``."""

    def __init__(self):
        self.compiled, self.calls = _StandInCompiled(), []

    def __getitem__(self, grid):
        return lambda *args, **options: self.calls.append(args) or self.compiled


@pytest.mark.parametrize("direct", [True, False])
def test_direct_launch_only_with_a_known_launcher_convention(monkeypatch, direct):
    """From the second call a launch goes straight to the compiled kernel with integer pointers
    where Triton's launcher convention is the one it was written for (>= 3.4); with an older
    Triton every call goes through the JIT, with the tensors, and still reaches the kernel."""
    monkeypatch.setattr(W, "INTERPRETED", False)
    monkeypatch.setattr(W, "DIRECT_LAUNCH", direct)
    fn = _StandInJIT()
    x, y, w = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    launch = W._Launch(fn, (2, 1, 1), [x, w, 7, y], dict(num_warps=4), 0, 3, weak_slots=(1,))
    x2, y2 = torch.zeros(4), torch.zeros(4)
    for xs, ys in ((x, y), (x2, y2), (x2, y2)):
        launch(xs, ys, stream=0)
    if direct:
        assert len(fn.calls) == 1 and len(fn.compiled.runs) == 2
        assert fn.compiled.runs[-1] == (x2.data_ptr(), w.data_ptr(), 7, y2.data_ptr())
    else:
        assert len(fn.calls) == 3 and not fn.compiled.runs and launch.compiled is None
        assert fn.calls[-1][0] is x2 and fn.calls[-1][1] is w and fn.calls[-1][3] is y2


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests compile for the real GPU")
def test_direct_launches_without_gpu():
    """The compiled-mode launcher on this machine: kernels compiled for sm_90, a stand-in
    driver whose launcher checks its arguments (benchmarks/host_overhead_w4a16.py --smoke).
    Every path reaches its cached plan, launches directly with the same arguments as the JIT's
    first launch (but the activation and output addresses), one kernel launch per call."""
    import subprocess
    import sys

    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"no NVIDIA Triton backend: {error}")
    script = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks",
                          "host_overhead_w4a16.py")
    result = subprocess.run([sys.executable, script, "--smoke"], capture_output=True, text=True,
                            timeout=600)
    if result.returncode and "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip("ptxas not available")
    assert result.returncode == 0, result.stderr[-4000:]
    smoke = json.loads(next(line for line in result.stdout.splitlines()
                            if line.startswith("SMOKE "))[6:])["results"]
    assert len(smoke) == 16  # (10 path x grouping rows, mma at M = 1 and 16, 2 precompiled)
    for name, row in smoke.items():
        assert row["direct"] and row["launches_per_call"] == 1.0, (name, row)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests compile for the real GPU")
def test_kernels_compile_for_sm90():
    """Every kernel variant compiles for sm_90 with the Triton installed (run the tests with each
    Triton the GPU machines may have), within the shared memory of an H100, without register
    spills on the non-gather paths, with 16-byte weight loads, with wgmma (HGMMA) for the
    swapped small-batch dot and the GEMMs, and with packed fp16 arithmetic (HFMA2) on the GEMV's
    HALF2 configs."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"no NVIDIA Triton backend: {error}")
    result = run_compile_script(_COMPILE_SCRIPT, timeout=600)
    if result.returncode and "ptxas" in result.stderr and "not found" in result.stderr:
        pytest.skip("ptxas not available")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("_kernel ok") == 2 and result.stdout.count("mma sm_80 ok") == 2
    rows = json.loads(next(line for line in result.stdout.splitlines()
                           if line.startswith("ROWS "))[5:])
    assert len(rows) >= 27
    for row in rows:
        name = row["name"]
        assert 0 < row["registers"] <= 255 and row["shared"] <= 227 * 1024, row
        if "gather" not in name:
            # (Triton 3.6, the card's, spills 8 bytes in one 2-warp mma config: a few words)
            allowed = 16 if name.startswith("mma") else 0
            assert row["spill_stores"] <= allowed and row["spill_loads"] <= allowed, row
        if name.startswith(("gemv", "dequant")):
            assert row["ldg128"] > 0, row  # 16-byte loads of the packed weight
        if name.startswith("gemm") or "swap" in name:
            assert row["hgmma"] > 0 and row["hmma"] == 0, row
        if "half2" in name:  # two codes per packed fp16 instruction, few fp32 ones
            assert row["hfma2"] >= 16 and row["ffma"] < row["hfma2"], row
            # (fewer registers than the fp32 unpacking, no shared memory in the loop: an x load
            # split in registers once went through shared memory, with barriers, and took 128)
            assert row["registers"] <= 96 and row["loop_shared"] == 0, row
            # the instructions a packed word costs in the loop (26-33 for fp16, 30-36 for bf16
            # on 2026-12-05, against 43-48 for the fp32 unpacking): no silent regression
            assert row["loop_per_word"] <= (34 if name.startswith("gemv float16") else 38), row
        elif name.startswith("gemv") and "gather" not in name:
            assert 40 <= row["loop_per_word"] <= 51, row  # (50.125 with Triton 3.6, the card's)
        if name.startswith("mma"):
            # mma.sync on operands dequantized in their own registers: nothing through shared
            # memory (the conversions into the operand layouts compiled as trivial), one LOP3
            # and one HFMA2 per two codes; 15.7-21 instructions a packed word for fp16 and
            # 17-23 for bf16 (three more shifts a word) on 2026-12-05, against 35 for the splitk
            # dot at a batch of 16
            assert row["hmma"] > 0 and row["hgmma"] == 0 and row["loop_shared"] == 0, row
            assert row["lds"] <= 1 and row["sts"] <= 1 and row["hfma2"] >= 4 * row["hmma"] // 2, row
            assert row["loop_per_word"] <= (22 if name.startswith("mma float16") else 24), row
        if name.startswith("wgmma"):
            # warpgroup MMAs on a weight dequantized in their A registers (the conversion into
            # the operand layout compiled as trivial), activations and words copied into shared
            # memory by cp.async (LDGSTS), each lane reading its words there (LDS); 129-252
            # instructions a step on 2026-12-05 in these cases (the loop unrolls a pass of
            # STAGES steps), of which a PRMT, a LOP3 and 2 HFMA2/HMUL2 a register of two codes
            # (1 per channel), and 2 barriers (one allocation a stage: 3 with one for the ring)
            assert row["hgmma"] > 0 and row["hmma"] == 0 and row["ldgsts"] > 0, row
            assert row["loop_per_step"] <= 320 and row["loop_bar"] <= 2 * row["loop_steps"], row
            # (one step a pass serialized every MMA: each pass is two steps at least)
            assert row["wgmma_serialized"] == 0, row


# ----------------------------------------------------------------------------------------------
# GPU: model-sized shapes through the autotuned launcher
# ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
class TestCUDA:
    @pytest.fixture(autouse=True)
    def _private_cache(self, tmp_path, monkeypatch):
        # Correctness does not need timing: each new key takes its first valid config (one
        # compile instead of a dozen), except in the test of the autotuner itself.
        monkeypatch.setenv("EPMQ_CACHE_DIR", str(tmp_path))
        monkeypatch.setenv("EPMQ_AUTOTUNE", "0")

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
    @pytest.mark.parametrize("group_size,g_idx_kind", [(128, None), (-1, None),
                                                       (128, "permuted"), (128, "static")])
    @pytest.mark.parametrize("M", [1, 5, 16, 64, 300])
    def test_large_shapes(self, gen, dtype, group_size, g_idx_kind, M):
        K, N = 4096, 2048 + 64
        qweight, scales, zeros, g_idx = make_problem(gen, K, N, group_size, g_idx_kind)
        qweight, scales, zeros = qweight.cuda(), scales.cuda(), zeros.cuda()
        g_idx = g_idx.cuda() if g_idx is not None else None
        x = torch.randn(M, K, generator=gen).to(dtype).cuda()
        y = w4a16_matmul(x, qweight, scales, zeros, group_size, g_idx)
        assert_close_to_reference(y, x, qweight, scales, zeros, group_size, g_idx)

    @pytest.mark.parametrize("path,group_size", [("gemv", 128), ("gemv", -1), ("splitk", 128),
                                                 ("splitk", -1), ("gemm", 128), ("dqmm", 128),
                                                 ("mma", 128), ("mma", -1), ("wgmma", 128),
                                                 ("wgmma", 64)])  # (wgmma per channel: below)
    def test_every_config_of_every_path(self, gen, path, group_size):
        if path == "wgmma" and torch.cuda.get_device_capability() != (9, 0):
            pytest.skip("wgmma is Hopper's (compute capability 9.0)")
        K, N = 1024, 1536
        M = {"gemv": 1, "splitk": 8, "gemm": 200, "dqmm": 300, "mma": 16, "wgmma": 300}[path]
        qweight, scales, zeros, _ = make_problem(gen, K, N, group_size)
        qweight, scales, zeros = qweight.cuda(), scales.cuda(), zeros.cuda()
        x = torch.randn(M, K, generator=gen).half().cuda()
        # compile the whole space in parallel first, as the autotuner does
        G = 1 if group_size == -1 else K // group_size
        entry = W._entry_for(qweight, scales, zeros, None, group_size, K, N, G)
        scratch = torch.empty(M, N, dtype=torch.float16, device="cuda")
        configs = [dict(c, BLOCK_M=W._block_m_for_splitk(M)) if path == "splitk" else c
                   for c in AUTOTUNE_SPACE[path]]
        W._precompile([W._build_plan(entry, path, c, x, scratch) for c in configs], x, scratch)
        for config in configs:
            out = torch.full((M, N), float("nan"), dtype=torch.float16, device="cuda")
            w4a16_matmul(x, qweight, scales, zeros, group_size, out=out, path=path,
                         config=config)
            assert_close_to_reference(out, x, qweight, scales, zeros, group_size, None)

    @pytest.mark.parametrize("group_size,massive,dtype", [
        (128, False, torch.float16), (-1, False, torch.float16), (128, True, torch.float16),
        (128, True, torch.bfloat16)])  # (bf16 once: the GPU suite's test step is near its limit)
    def test_gemv_half2_at_model_sizes(self, gen, group_size, massive, dtype):
        """The HALF2 GEMV's PTX (fp16 pairs, one rounding per fused multiply-add) on 8192 inputs,
        every HALF2 config, fp16 and bf16 activations: as accurate as the fp32 unpacking against
        the float64 product (with ``massive`` activations too, whose rows the PTX scales by a
        power of two), and the autotuner's verification passes it."""
        K, N = 8192, 4096 + 8
        qweight, scales, zeros, _ = make_problem(gen, K, N, group_size)
        qweight, scales, zeros = qweight.cuda(), scales.cuda(), zeros.cuda()
        x = torch.randn(1, K, generator=gen)
        if massive:
            big = 5000.0 if dtype == torch.float16 else 3e7  # (bf16: past fp16's range)
            x[0, 5], x[0, 4000:4008] = big, -big / 5
            # (a lone large one at every position of a packed row: each must reach its max)
            for j in range(8):
                x[0, 800 + 8 * j + j] = big / (j + 2)
        x = x.to(dtype).cuda()
        reference = w4a16_matmul_reference(x, qweight, scales, zeros, group_size)
        bound = x.double().abs() @ dequantize_int4_weight(qweight, scales, zeros, group_size).abs()
        errors = {}
        G = 1 if group_size == -1 else K // group_size
        entry = W._entry_for(qweight, scales, zeros, None, group_size, K, N, G)

        def gathers(config):  # (tiles that straddle groups take the per-row path, without HALF2)
            return W._needs_gather("gemv", config, G, entry.group, entry.permuted, x.dtype)

        configs = [AUTOTUNE_SPACE["gemv"][0]] + [
            c for c in AUTOTUNE_SPACE["gemv"] if c.get("HALF2") and not gathers(c)]
        scratch = torch.empty(1, N, dtype=dtype, device="cuda")
        W._precompile([W._build_plan(entry, "gemv", c, x, scratch) for c in configs], x, scratch)
        for config in configs:
            # (the HALF2 configs' PTX runs)
            assert W._half2(config, x, gathers(config), entry) == bool(config.get("HALF2"))
            out = torch.full((1, N), float("nan"), dtype=dtype, device="cuda")
            w4a16_matmul(x, qweight, scales, zeros, group_size, out=out, path="gemv",
                         config=config)
            errors[bool(config.get("HALF2"))] = max(
                errors.get(bool(config.get("HALF2")), 0.0),
                float(((out.double() - reference).abs() / bound).max()))
            assert float((out.double() - reference).abs().max()) <= W.VERIFY_TOLERANCE * float(
                reference.abs().max())
        assert errors[True] <= TOLERANCE[dtype], errors
        assert errors[True] <= 4 * errors[False] + 1e-4, errors

    def test_fp32_activations_and_batch_dims(self, gen):
        qweight, scales, zeros, _ = make_problem(gen, 2048, 1024, 128)
        qweight, scales, zeros = qweight.cuda(), scales.cuda(), zeros.cuda()
        for shape in [(1, 2048), (2, 3, 2048), (4, 64, 2048)]:
            x = torch.randn(*shape, generator=gen).cuda()
            y = w4a16_matmul(x, qweight, scales, zeros, 128)
            assert y.shape == (*shape[:-1], 1024)
            assert_close_to_reference(y, x, qweight, scales, zeros, 128, None)

    def test_fp32_outlier_next_to_its_zero_point(self, gen):
        """The fp32 GEMV's exact path, compiled (see the interpreted test of the same name)."""
        K, N = 4096, 1024
        qweight, scales, zeros, _ = make_problem(gen, K, N, 128, scales_dtype=torch.float32)
        codes = unpack_int4(qweight)
        codes[7] = zeros[0].to(codes.dtype)
        qweight, scales, zeros = pack_int4(codes).cuda(), scales.cuda(), zeros.cuda()
        x = torch.randn(1, K, generator=gen)
        x[0, 7] = 1000.0
        y = w4a16_matmul(x.cuda(), qweight, scales, zeros, 128, path="gemv")
        reference = w4a16_matmul_reference(x.cuda(), qweight, scales, zeros, 128)
        bound = x.cuda().double().abs() @ dequantize_int4_weight(qweight, scales, zeros, 128).abs()
        assert ((y.double() - reference).abs() / bound).max() < 1e-6

    def test_rows_past_int32_offsets(self, gen):
        """M x N >= 2^31 (a 75k-token prefill into N = 28672): the tiled kernel's 64-bit row
        offsets (WIDE_M) write the last rows where they belong."""
        M, K, N = 75000, 128, 28672
        qweight, scales, zeros, _ = make_problem(gen, K, N, 128)
        qweight, scales, zeros = qweight.cuda(), scales.cuda(), zeros.cuda()
        x = torch.randn(M, K, generator=gen).half().cuda()
        assert W._wide_rows(x, torch.empty(1, 1, device="cuda").expand(M, N), N)
        config = dict(AUTOTUNE_SPACE["gemm"][0])
        y = w4a16_matmul(x, qweight, scales, zeros, 128, path="gemm", config=config)
        for rows in (slice(0, 64), slice(M - 64, M), slice(M // 2, M // 2 + 64)):
            assert_close_to_reference(y[rows], x[rows], qweight, scales, zeros, 128, None)
        del y

    @pytest.mark.parametrize("dtype,group_size,g_idx_kind", [
        (torch.float16, 128, None), (torch.float16, -1, None), (torch.bfloat16, 128, None),
        (torch.bfloat16, 128, "static")])  # (4 cases: the GPU suite's test step is near its limit)
    def test_mma_path_at_model_sizes(self, gen, dtype, group_size, g_idx_kind, monkeypatch):
        """The Gluon kernel compiled (its layouts, inline PTX and mma.sync), chosen by the
        launcher as the autotuner would (so its plans launch directly, with integer pointers,
        from the second call), at batches 1, 5 and 16, N a multiple of neither 64 nor 256."""
        monkeypatch.setattr(W, "_paths_for", lambda M: ("mma",))
        K, N = 4096, 2048 + 64 + 32
        qweight, scales, zeros, g_idx = make_problem(gen, K, N, group_size, g_idx_kind)
        qweight, scales, zeros = qweight.cuda(), scales.cuda(), zeros.cuda()
        g_idx = g_idx.cuda() if g_idx is not None else None
        for M in (1, 5, 16):
            x = torch.randn(M, K, generator=gen).to(dtype).cuda()
            first = w4a16_matmul(x, qweight, scales, zeros, group_size, g_idx)
            assert_close_to_reference(first, x, qweight, scales, zeros, group_size, g_idx)
            again = w4a16_matmul(x, qweight, scales, zeros, group_size, g_idx)
            torch.testing.assert_close(again, first, rtol=2e-3, atol=2e-3)
            key = (id(qweight), id(scales), id(zeros), id(g_idx), group_size)
            plans = [p for p in W._ENTRIES[key].plans.values() if p.M == M]
            assert plans and plans[0].path == "mma" and plans[0].launches[0].compiled is not None

    @pytest.mark.parametrize("scales_dtype", [torch.float16, torch.bfloat16])
    def test_wgmma_bf16_weight_rounds_once(self, gen, scales_dtype):
        """The Hopper kernel's bf16 PTX (the high nibble from the word shifted by 4; fp16 scales
        as two bf16 parts, one exact multiply and one FMA): the identity's product is the weight
        rounded once to bf16, bit for bit, at every code position of a word."""
        if torch.cuda.get_device_capability() != (9, 0):
            pytest.skip("wgmma is Hopper's (compute capability 9.0)")
        x, qweight, scales, zeros, W = _weight_rounded_once(gen, torch.bfloat16, scales_dtype, "cuda")
        y = w4a16_matmul(x, qweight, scales, zeros, 32, path="wgmma")
        assert torch.equal(y, W)

    @pytest.mark.parametrize("dtype,path,config,group_size,g_idx_kind", [
        (torch.bfloat16, "splitk", 0, 128, None),  # pairs, scaled in the tile, swapped
        (torch.bfloat16, "splitk", 8, 128, None),  # pairs, the scale after the dot
        (torch.bfloat16, "splitk", 0, -1, None),  # one group: the scale after the loop
        (torch.bfloat16, "gemm", 0, 128, None),  # codes one at a time, scaled in the tile
        (torch.bfloat16, "gemm", 0, 128, "permuted"),  # gathered per row
        (torch.float16, "splitk", 8, 128, None),
    ], ids=["bf16-splitk-pairs", "bf16-splitk-after", "bf16-splitk-one-group", "bf16-gemm", "bf16-gemm-gather",
            "fp16-splitk-after"])
    def test_dot_paths_take_zero_points_past_the_bias_exactly(self, gen, dtype, path, config,
                                                              group_size, g_idx_kind):
        """The tensor-core dot kernel compiled (the interpreter forms bf16 in fp32, so only a card
        shows it): ``(2^e + q) - (2^e + z)`` in bf16 put odd uint8 zero points from 129 a grid
        step off for a whole group, fp16's int16 ones from 1025. WIDE_ZEROS forms ``q - z`` in
        fp32: the identity's product is the weight ``(q - z) s`` rounded once (scales of the
        activations' dtype, which the tile's scaling takes as they are), bit for bit."""
        K, N = 256, 160
        qweight, scales, _, g_idx = make_problem(gen, K, N, group_size, g_idx_kind, scales_dtype=dtype)
        lo, hi, zeros_dtype = (129, 256, torch.uint8) if dtype == torch.bfloat16 else (1025, 2048, torch.int16)
        zeros = torch.randint(lo, hi, scales.shape, generator=gen).to(zeros_dtype)
        zeros[0, :8] = torch.arange(hi - 16, hi, 2).to(zeros_dtype) + 1  # (odd: never on an even grid)
        W_once = dequantize_int4_weight(qweight, scales, zeros, group_size, g_idx).to(dtype).cuda()
        qweight, scales, zeros = qweight.cuda(), scales.cuda(), zeros.cuda()
        g_idx = g_idx.cuda() if g_idx is not None else None
        x = torch.eye(K, dtype=dtype, device="cuda")
        y = w4a16_matmul(x, qweight, scales, zeros, group_size, g_idx, path=path,
                         config=AUTOTUNE_SPACE[path][config])
        assert torch.equal(y, W_once), (y != W_once).sum()

    @pytest.mark.parametrize("dtype,group_size,scales_dtype", [
        (torch.float16, 128, torch.float16), (torch.bfloat16, -1, torch.float16),
        (torch.bfloat16, 128, torch.float16), (torch.bfloat16, 64, torch.bfloat16)])
    def test_wgmma_path_at_model_sizes(self, gen, dtype, group_size, scales_dtype, monkeypatch):
        """The Hopper kernel compiled (wgmma on registers, shared activation buffers, inline
        PTX), chosen by the launcher, at batches 64, 300 and 1024 (a partial tile of rows), N a
        multiple of no tile's columns."""
        if torch.cuda.get_device_capability() != (9, 0):
            pytest.skip("wgmma is Hopper's (compute capability 9.0)")
        monkeypatch.setattr(W, "_paths_for", lambda M: ("wgmma",))
        K, N = 4096, 2048 + 64 + 32
        qweight, scales, zeros, _ = make_problem(gen, K, N, group_size, scales_dtype=scales_dtype)
        qweight, scales, zeros = qweight.cuda(), scales.cuda(), zeros.cuda()
        for M in (64, 300, 1024):
            x = torch.randn(M, K, generator=gen).to(dtype).cuda()
            first = w4a16_matmul(x, qweight, scales, zeros, group_size)
            assert_close_to_reference(first, x, qweight, scales, zeros, group_size, None)
            again = w4a16_matmul(x, qweight, scales, zeros, group_size)
            assert torch.equal(again, first)  # (no split-K: the same order every call)
            key = (id(qweight), id(scales), id(zeros), id(None), group_size)
            plans = [p for p in W._ENTRIES[key].plans.values() if p.M == M]
            assert plans and plans[0].path == "wgmma" and plans[0].launches[0].compiled is not None

    def test_plans_launch_directly_and_agree(self, gen):
        """Steady-state calls (cached plans, direct launches with integer pointers) give the
        first call's result (up to the order of split-K's atomic additions); new activations of
        the same layout too."""
        qweight, scales, zeros, _ = make_problem(gen, 2048, 1536, 128)
        qweight, scales, zeros = qweight.cuda(), scales.cuda(), zeros.cuda()
        for M in (1, 7, 16, 300):
            x = torch.randn(M, 2048, generator=gen).half().cuda()
            first = w4a16_matmul(x, qweight, scales, zeros, 128)
            assert_close_to_reference(first, x, qweight, scales, zeros, 128, None)
            for _ in range(3):
                again = w4a16_matmul(x, qweight, scales, zeros, 128)
                torch.testing.assert_close(again, first, rtol=2e-3, atol=2e-3)
            entry = W._ENTRIES[(id(qweight), id(scales), id(zeros), id(None), 128)]
            plans = [p for p in entry.plans.values() if p.M == M]
            assert plans and all(launch.compiled is not None for launch in plans[0].launches)
            other = torch.randn(M, 2048, generator=gen).half().cuda()
            y = w4a16_matmul(other, qweight, scales, zeros, 128)
            assert_close_to_reference(y, other, qweight, scales, zeros, 128, None)
            out = torch.full((M, 1536), float("nan"), dtype=torch.float16, device="cuda")
            for _ in range(2):
                assert w4a16_matmul(other, qweight, scales, zeros, 128, out=out) is out
                assert_close_to_reference(out, other, qweight, scales, zeros, 128, None)

    @pytest.mark.parametrize("mode,M,path", [("private", 1, None), ("private", 16, None),
                                             ("shared", 1, None), ("shared", 16, None),
                                             ("private", 16, "mma"), ("shared", 1, "mma")])
    def test_cuda_graph_capture(self, gen, mode, M, path, monkeypatch):
        """Split-K calls captured in a CUDA graph stay right across replays, with other work
        of the same graph allocating after them (which may reuse freed memory) and eager calls
        on another stream in between. The first config of each path splits K (autotuning is
        off here); the mma path's too, where it is the only path offered."""
        assert AUTOTUNE_SPACE["gemv"][0]["SPLIT_K"] > 1
        assert AUTOTUNE_SPACE["splitk"][0]["SPLIT_K"] > 1
        assert AUTOTUNE_SPACE["mma"][0]["SPLIT_K"] > 1
        if path is not None:
            monkeypatch.setattr(W, "_paths_for", lambda M: (path,))
        monkeypatch.setattr(W, "GRAPH_WORKSPACE", mode)
        K, N = 2048, 1024
        qweight, scales, zeros, _ = make_problem(gen, K, N, 128)
        qweight, scales, zeros = qweight.cuda(), scales.cuda(), zeros.cuda()
        x = torch.randn(M, K, generator=gen).half().cuda()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on the capture stream (plans, workspace)
            w4a16_matmul(x, qweight, scales, zeros, 128)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            y = w4a16_matmul(x, qweight, scales, zeros, 128)
            noise = torch.full((4 * M * N,), 7.0, device="cuda")  # may reuse freed memory
            y2 = w4a16_matmul(x * 2, qweight, scales, zeros, 128)
            del noise
        for _ in range(3):
            x.copy_(torch.randn(M, K, generator=gen).half())
            graph.replay()
            eager = w4a16_matmul(x, qweight, scales, zeros, 128)  # another stream, same weights
            torch.cuda.synchronize()
            assert_close_to_reference(y, x, qweight, scales, zeros, 128, None)
            assert_close_to_reference(y2, x * 2, qweight, scales, zeros, 128, None)
            assert_close_to_reference(eager, x, qweight, scales, zeros, 128, None)

    @pytest.mark.parametrize("M", [1, 16])
    def test_act_order_sorted_eagerly_and_in_a_capture(self, gen, M):
        """Act-order weights: eager calls run on the sorted codes (a cached plan with the
        activation gather); a CUDA graph captured after a warm-up takes that plan, keeps the
        sorted copy (held for good) and stays right across replays."""
        K, N = 2048, 1024
        qweight, scales, zeros, g_idx = make_problem(gen, K, N, 128, "permuted")
        qweight, scales, zeros, g_idx = qweight.cuda(), scales.cuda(), zeros.cuda(), g_idx.cuda()
        x = torch.randn(M, K, generator=gen).half().cuda()
        for _ in range(2):
            y = w4a16_matmul(x, qweight, scales, zeros, 128, g_idx)
            assert_close_to_reference(y, x, qweight, scales, zeros, 128, g_idx)
        entry = W._ENTRIES[(id(qweight), id(scales), id(zeros), id(g_idx), 128)]
        assert entry.sorted_form() is not None
        assert all(isinstance(p, W._ActOrderPlan) for p in entry.plans.values())
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # (the warm-up on the capture stream)
            w4a16_matmul(x, qweight, scales, zeros, 128, g_idx)
        stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            y = w4a16_matmul(x, qweight, scales, zeros, 128, g_idx)
        assert any(held[1] is entry.sorted_form()[1] for held in W._GRAPH_HELD_SORTED)
        for _ in range(2):
            x.copy_(torch.randn(M, K, generator=gen).half())
            graph.replay()
            torch.cuda.synchronize()
            assert_close_to_reference(y, x, qweight, scales, zeros, 128, g_idx)

    def test_dqmm_against_gemm(self, gen, monkeypatch):
        """The chunked dequantize + cuBLAS path: several chunks, per channel and act-order,
        and the autotuner choosing between it and the Triton GEMM."""
        K, N, M = 4096, 2048 + 64, 300
        for group_size, kind in ((128, None), (-1, None), (128, "permuted")):
            qweight, scales, zeros, g_idx = make_problem(gen, K, N, group_size, kind)
            qweight, scales, zeros = qweight.cuda(), scales.cuda(), zeros.cuda()
            g_idx = g_idx.cuda() if g_idx is not None else None
            # row chunks (four), and column slabs (five, the last narrower than its buffer)
            slabs = dict(AUTOTUNE_SPACE["dqmm"][0], CHUNK_N=512)
            del slabs["CHUNK_K"]
            for dtype, config in itertools.product((torch.float16, torch.bfloat16),
                                                   (AUTOTUNE_SPACE["dqmm"][0], slabs)):
                x = torch.randn(M, K, generator=gen).to(dtype).cuda()
                y = w4a16_matmul(x, qweight, scales, zeros, group_size, g_idx, path="dqmm",
                                 config=config)
                assert_close_to_reference(y, x, qweight, scales, zeros, group_size, g_idx)
                # the chunks on two streams (two buffers), one plan called again and again
                # (its launches after the first go to the side stream by handle), every
                # product held up on its stream first, so that a side stream that did not wait
                # for it would overwrite its buffer before it read it: the one-stream numbers
                # exactly
                G = 1 if group_size == -1 else K // group_size
                entry = W._entry_for(qweight, scales, zeros, g_idx, group_size, K, N, G)
                plan = W._build_plan(entry, "dqmm", dict(config, STREAMS=2), x,
                                     torch.empty(M, N, dtype=dtype, device="cuda"))
                assert len(plan.dq[2]) == 2
                assert (plan.dq[:2], len(plan.dq[3])) == ((("K", 1024), 4) if config is not slabs
                                                          else (("N", 512), 5))
                with monkeypatch.context() as held:
                    for cls, name in ((torch, "mm"), (torch.Tensor, "addmm_")):
                        held.setattr(cls, name, _held_up(getattr(cls, name)))
                    for _ in range(4):
                        y2 = plan(x, None)
                        assert torch.equal(y2, y)
        monkeypatch.setenv("EPMQ_AUTOTUNE", "1")
        # (an earlier test may have taken this bucket's first candidate untimed: forget it)
        monkeypatch.setattr(W, "_CHOSEN", {})
        plan = W.w4a16_plan(x, qweight, scales, zeros, group_size, g_idx)
        assert plan["path"] in ("gemm", "dqmm", "wgmma")  # (wgmma competes on Hopper)
        # every chunking timed and found right (N = 2112: two slabs of 2048 columns, or one)
        assert {"dqmm", "dqmm+2streams", "dqmm+slabs", "dqmm+slabs+2streams"} <= set(
            plan["best_ms_by_path"]) and plan["rejected"] == []
        y = w4a16_matmul(x, qweight, scales, zeros, group_size, g_idx)
        assert_close_to_reference(y, x, qweight, scales, zeros, group_size, g_idx)

    def test_autotune_writes_cache_once(self, gen, tmp_path, monkeypatch):
        monkeypatch.setenv("EPMQ_AUTOTUNE", "1")
        qweight, scales, zeros, _ = make_problem(gen, 1024, 1024, 128)
        qweight, scales, zeros = qweight.cuda(), scales.cuda(), zeros.cuda()
        x = torch.randn(1, 1024, generator=gen).half().cuda()
        w4a16_matmul(x, qweight, scales, zeros, 128)
        files = list((tmp_path / "autotune").glob("w4a16__*.json"))
        assert len(files) == 1
        entries = json.loads(files[0].read_text())["entries"]
        # (the competing paths: gemv and splitk, and mma where the card runs it)
        entry = W._entry_for(qweight, scales, zeros, None, 128, 1024, 1024, 8)
        key = W._tuning_key(W._runnable_paths(x, entry), x, entry)
        assert key.startswith("gemv+splitk") and "|M1|K1024|N1024" in key and key in entries


# ----------------------------------------------------------------------------------------------
# layouts, plans and the autotune cache
# ----------------------------------------------------------------------------------------------
def test_a_plan_is_not_reused_for_activations_of_other_strides(gen):
    """The launch plan holds the activation strides it was built with: activations of the same
    shape read with other strides (a transposed view) take a new plan, and the right values."""
    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    for path, M in (("splitk", 3), ("gemm", 17)):
        x = torch.randn(M, 64, generator=gen).half()
        for _ in range(2):  # (the second call takes the plan)
            w4a16_matmul(x, qweight, scales, zeros, 32, backend="triton")
        x_t = torch.randn(64, M, generator=gen).half().t()  # [M, 64], K stride M
        y = w4a16_matmul(x_t, qweight, scales, zeros, 32, backend="triton")
        assert_close_to_reference(y, x_t, qweight, scales, zeros, 32, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequant_chunks_that_start_inside_a_group(gen, dtype):
    """A chunk that starts off a dequant tile's edge (k_first = 24 with tiles of 32 rows) has
    tiles that straddle groups of 32: every row still gets its own group's scale and zero."""
    K, N = 96, 37
    qweight, scales, zeros, _ = make_problem(gen, K, N, 32)
    dense = dequantize_int4_weight(qweight, scales, zeros, 32)
    for k_first, k_rows in ((24, 16), (8, 64), (56, 40)):
        got = W.w4a16_dequantize(qweight, scales, zeros, 32, k_first=k_first, k_rows=k_rows,
                                 dtype=dtype, backend="triton")
        assert torch.equal(got, dense[k_first:k_first + k_rows].to(dtype))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_out_on_another_device_is_refused(gen, backend):
    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    x = torch.randn(3, 64, generator=gen).half()
    with pytest.raises(ValueError, match="out must be"):
        w4a16_matmul(x, qweight, scales, zeros, 32, out=torch.empty(3, 40, dtype=torch.float16,
                                                                    device="meta"),
                     backend=backend)


def test_a_wrong_out_is_refused_naming_what_it_is(gen):
    """An out of the wrong dtype, shape or device was refused with what it must be alone ('out
    must be a torch.float16 tensor of shape (3, 40) on cpu'), what was given left to find."""
    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    x = torch.randn(3, 64, generator=gen).half()
    for out, given in ((torch.empty(3, 40), "got a torch.float32 tensor of shape (3, 40) on cpu"),
                       (torch.empty(40, 3, dtype=torch.float16), "got a torch.float16 tensor of shape (40, 3)"),
                       (x.new_empty(3, 40).numpy(), "got a numpy.ndarray")):
        with pytest.raises(ValueError, match=r"out must be a torch.float16 tensor of shape \(3, 40\) on cpu") as error:
            w4a16_matmul(x, qweight, scales, zeros, 32, out=out, backend="triton")
        assert given in str(error.value), str(error.value)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_wrong_dequantize_out_is_refused_naming_what_it_is(gen, backend):
    """w4a16_dequantize's out of the wrong dtype, shape or device was refused with what it must
    be alone ('out must be a torch.float16 tensor of shape (64, 40) on cpu'), what was given left
    to find, as w4a16_matmul's was."""
    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    for out, given in ((torch.empty(64, 40), "got a torch.float32 tensor of shape (64, 40) on cpu"),
                       (torch.empty(40, 64, dtype=torch.float16), "got a torch.float16 tensor of shape (40, 64)"),
                       (torch.empty(64, 40, dtype=torch.float16, device="meta"), "on meta"),
                       (torch.empty(64, 40, dtype=torch.float16).numpy(), "got a numpy.ndarray")):
        with pytest.raises(ValueError, match=r"out must be a torch.float16 tensor of shape \(64, 40\) on cpu") as error:
            W.w4a16_dequantize(qweight, scales, zeros, 32, out=out, backend=backend)
        assert given in str(error.value), str(error.value)


def test_autotune_caches_follow_the_cache_directory(tmp_path, monkeypatch):
    """cache_for: one cache per directory (EPMQ_CACHE_DIR changed in a process starts another),
    with ``~`` expanded."""
    device = torch.device("cpu")
    monkeypatch.setenv("EPMQ_CACHE_DIR", str(tmp_path / "a"))
    a = autotune_cache.cache_for("w4a16", device, AUTOTUNE_SPACE["gemv"])
    monkeypatch.setenv("EPMQ_CACHE_DIR", str(tmp_path / "b"))
    b = autotune_cache.cache_for("w4a16", device, AUTOTUNE_SPACE["gemv"])
    assert a is not b and b.path.startswith(str(tmp_path / "b"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("EPMQ_CACHE_DIR", "~/epmq-cache")
    assert autotune_cache.cache_dir() == str(tmp_path / "epmq-cache" / "autotune")


def test_autotune_cache_of_another_gpu_with_the_same_file_name(tmp_path, monkeypatch):
    """Two GPU names that slug to one file name do not share entries: the file names its GPU."""
    monkeypatch.setenv("EPMQ_CACHE_DIR", str(tmp_path))
    space = AUTOTUNE_SPACE["gemv"]
    a = autotune_cache.DiskCache("w4a16", "NVIDIA A100-SXM4-80GB", space)
    b = autotune_cache.DiskCache("w4a16", "NVIDIA A100 SXM4 80GB", space)
    assert a.path == b.path
    a.put("k", space[1])
    assert autotune_cache.DiskCache("w4a16", "NVIDIA A100 SXM4 80GB", space).get("k") is None


def test_autotune_cache_merges_the_entries_of_other_processes(tmp_path, monkeypatch):
    """Two processes tuning at once (two DiskCache objects on one file) keep each other's
    entries: a put merges with what is on disk."""
    monkeypatch.setenv("EPMQ_CACHE_DIR", str(tmp_path))
    space = AUTOTUNE_SPACE["gemv"]
    first = autotune_cache.DiskCache("w4a16", "gpu", space)
    second = autotune_cache.DiskCache("w4a16", "gpu", space)
    assert first.get("a") is None and second.get("b") is None  # (both read the empty file)
    first.put("a", space[0])
    second.put("b", space[1])
    third = autotune_cache.DiskCache("w4a16", "gpu", space)
    assert third.get("a") == space[0] and third.get("b") == space[1]


def _put_many(directory, tag, n):
    os.environ["EPMQ_CACHE_DIR"] = directory
    cache = autotune_cache.DiskCache("w4a16", "gpu", AUTOTUNE_SPACE["gemv"])
    for i in range(n):
        cache.put(f"{tag}{i}", AUTOTUNE_SPACE["gemv"][i % 3])


def test_processes_writing_the_cache_at_once_keep_every_entry(tmp_path, monkeypatch):
    """Two processes putting 60 entries each at the same time: the file ends with all 120 (its
    read, merge and write under a lock file), readable by others (0644, not mkstemp's 0600)."""
    import multiprocessing

    monkeypatch.setenv("EPMQ_CACHE_DIR", str(tmp_path))
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_put_many, args=(str(tmp_path), tag, 60)) for tag in "ab"]
    for w in writers:
        w.start()
    for w in writers:
        w.join(timeout=300)
        assert w.exitcode == 0
    cache = autotune_cache.DiskCache("w4a16", "gpu", AUTOTUNE_SPACE["gemv"])
    assert all(cache.get(f"{tag}{i}") is not None for tag in "ab" for i in range(60))
    assert os.stat(cache.path).st_mode & 0o777 == 0o644


def test_a_cache_on_a_file_system_without_locks_is_still_written(tmp_path, monkeypatch):
    import errno

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setenv("EPMQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune_cache.fcntl, "flock", no_locks)
    cache = autotune_cache.DiskCache("w4a16", "gpu", AUTOTUNE_SPACE["gemv"])
    cache.put("k", AUTOTUNE_SPACE["gemv"][1])
    assert autotune_cache.DiskCache("w4a16", "gpu", AUTOTUNE_SPACE["gemv"]).get("k") == AUTOTUNE_SPACE["gemv"][1]


def test_a_cached_config_outside_the_candidates_is_not_used(tmp_path, monkeypatch):
    """A cache entry that is no longer among this problem's candidates (pruned for its shape, or
    hand-edited) is never launched: the key is tuned again (here: timing off, the first)."""
    monkeypatch.setenv("EPMQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("EPMQ_AUTOTUNE", "0")
    space = AUTOTUNE_SPACE["gemv"]
    cache = autotune_cache.DiskCache("w4a16", "gpu", space)
    cache.put("k", dict(space[0], BLOCK_K=4096))

    def must_not_time(config):
        raise AssertionError("timing is off")

    assert autotune_cache.tune(cache, "k", space[2:5], must_not_time) == space[2]


def test_tuning_keys_tell_the_problems_apart(gen):
    """The disk cache's key of a problem names everything the winner depends on: a permuted
    g_idx (gathered) and a static one are tuned apart, as are group counts and dtypes."""
    qweight, scales, zeros, g_idx = make_problem(gen, 64, 40, 32, "permuted")
    K, N, G = 64, 40, 2
    static = W._Weights(None, qweight, scales, zeros, None, 32, K, N, G, False)
    permuted = W._Weights(None, qweight, scales, zeros, g_idx, 32, K, N, G, True)
    per_channel = W._Weights(None, qweight, scales[:1], zeros[:1], None, -1, K, N, 1, False)
    x = torch.randn(3, 64, generator=gen).half()
    keys = {W._tuning_key(("splitk",), x, e) for e in (static, permuted, per_channel)}
    keys.add(W._tuning_key(("splitk",), x.float(), static))
    assert len(keys) == 4


def test_autotune_code_id_of_kernels_imported_from_a_zip(tmp_path):
    """The kernels run imported from a zip (an egg, a zipapp); code_id listed their folder on
    disk and failed with NotADirectoryError at the first autotuned launch. The id is the same
    as that of the same sources in a folder."""
    import subprocess
    import sys
    import zipfile

    folder = os.path.dirname(autotune_cache.__file__)
    archive = tmp_path / "kernels.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name in os.listdir(folder):
            if name.endswith(".py"):
                z.write(os.path.join(folder, name), f"epmq_kernels/{name}")
    out = subprocess.run([sys.executable, "-c", "import epmq_kernels.autotune_cache as a; print(a.__file__); "
                          "print(a.code_id())"], env={**os.environ, "PYTHONPATH": str(archive)},
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    where, code = out.stdout.split()
    assert where.startswith(str(archive)) and code == autotune_cache.code_id()


def test_dequantize_takes_integer_rows_of_any_kind_and_names_others(gen):
    """k_first / k_rows as numpy's integers (an index read from an array) ended in a bare
    InterpreterError inside the kernel, a float or a bool in a bare TypeError or a wrong chunk:
    numpy's integers are taken as ints, anything else is refused by name."""
    np = pytest.importorskip("numpy")
    qweight, scales, zeros, _ = make_problem(gen, 64, 40, 32)
    dense = dequantize_int4_weight(qweight, scales, zeros, 32).to(torch.float16)
    for backend in ("triton", "torch"):
        got = W.w4a16_dequantize(qweight, scales, zeros, 32, k_first=np.int64(8), k_rows=np.int32(16),
                                 backend=backend)
        assert torch.equal(got, dense[8:24])
        for bad in (dict(k_first=8.0), dict(k_rows=16.0), dict(k_first=True), dict(k_rows="16")):
            with pytest.raises(ValueError, match=f"{next(iter(bad))} must be an integer"):
                W.w4a16_dequantize(qweight, scales, zeros, 32, backend=backend, **bad)


def test_group_size_may_be_a_numpy_integer(gen):
    """group_size=np.int64(32) (a size read from a checkpoint's config array), which the grid
    and the solver take (grid.is_bits), was refused by every entry point as 'group_size must be
    an int'; it is taken as the int it is, by both backends, with the same result as 32."""
    np = pytest.importorskip("numpy")
    qweight, scales, zeros, g_idx = make_problem(gen, 64, 40, 32, "permuted")
    x = torch.randn(3, 64, generator=gen).to(torch.float16)
    dense = dequantize_int4_weight(qweight, scales, zeros, 32, g_idx)
    for gs in (np.int64(32), np.int32(32)):
        assert torch.equal(dequantize_int4_weight(qweight, scales, zeros, gs, g_idx), dense)
        assert torch.equal(w4a16_matmul_reference(x, qweight, scales, zeros, gs, g_idx),
                           w4a16_matmul_reference(x, qweight, scales, zeros, 32, g_idx))
        for backend in ("triton", "torch"):
            want = w4a16_matmul(x, qweight, scales, zeros, 32, g_idx, backend=backend)
            assert torch.equal(w4a16_matmul(x, qweight, scales, zeros, gs, g_idx, backend=backend), want)
            assert torch.equal(W.w4a16_dequantize(qweight, scales, zeros, gs, g_idx, backend=backend),
                               W.w4a16_dequantize(qweight, scales, zeros, 32, g_idx, backend=backend))
    for bad in (np.float64(32), np.True_):
        with pytest.raises(ValueError, match="group_size must be an int"):
            w4a16_matmul(x, qweight, scales, zeros, bad, g_idx)
