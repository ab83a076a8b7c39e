"""Where the batch-1 W4A16 GEMV loses its bandwidth (issue 4): the same packed words streamed by
probes of the GEMV's tiling that do less and less of its work, timed beside it on one GPU.

    python benchmarks/gemv_roofline.py --out benchmarks/results [--shapes 4096:4096,8192:8192]
    TRITON_INTERPRET=1 python benchmarks/gemv_roofline.py --check     (the probes' results, CPU)

On the H200 (2026-12-04) the GEMV reached 25-41% of the copy bandwidth, and counting its
instructions per word put the arithmetic about as high as the loads: which one limits it is the
question this answers. For each (K, N) and each config of the GEMV's tiling (BLOCK_N columns,
BLOCK_K = 128 rows a tile, SPLIT_K slices of K, two tiles prefetched, as the GEMV's space):

    stream   every packed word loaded once (evict-first) and XORed into a per-thread value:
             what that access pattern reaches with no arithmetic
    unpack   each word also unpacked into its 8 codes as the GEMV unpacks them (the library's
             ``_code_exact`` / ``_code_b128``: LOP3 + FADD or SHF + LOP3) and each code
             multiplied-added into an fp32 sum (its FFMA), with no activations, scales or
             zero points
    unpack_half2   the same by the HALF2 configs' arithmetic (``_half2_word_sums``: two codes
             per packed fp16 instruction, activations 1 and zero points 0)
    stream_tiled   stream over the same words re-laid out so that each program's rows are one
             contiguous run (``tiled``: what an offline repack of the checkpoint's words would
             give; four configs of the tiling, ``TILED_CONFIGS``)
    gemv     ``w4a16_matmul`` at M = 1, per channel (its autotuned choice: the GEMV, or since
             2026-12-05 possibly the Gluon ``mma`` path; ``gemv_plan`` says which)

beside the device copy bandwidth (of 1 GiB, and of the words' own size: ``copy_same_bytes``,
a copy of half their bytes, as many read plus written) and cuBLAS fp16 at M = 1, all as
CUDA-graph replays over weight copies rotated past the L2 cache. Reading it: copy_same_bytes far
under the copy bandwidth, the product is too small for the card (launch and ramp: no kernel
gets nearer); stream far under copy_same_bytes, the tiling (bytes in flight, programs per SM, the
rows' 256-byte runs) limits the GEMV, and stream_tiled near copy_same_bytes says a repacked
layout lifts it; unpack far under stream, the instructions; gemv under unpack (or
unpack_half2, for the HALF2 configs), the activations, scales and the split-K reduction. Each
probe's result is checked against torch before it is timed (``--check`` runs only that, on
small shapes).
"""

import argparse
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from epmq_kernels.packing import pack_int4  # noqa: E402
from epmq_kernels._runtime import INTERPRETED  # noqa: E402
from epmq_kernels.w4a16 import (_code_b128, _code_exact, _exponents, _half2_word_sums,  # noqa: E402
                                 _zero_pairs)

SHAPES = [(4096, 4096), (8192, 8192), (4096, 14336)]
# the GEMV's tiling family (epmq_kernels.w4a16.AUTOTUNE_SPACE["gemv"], BLOCK_K = 128)
CONFIGS = [dict(BLOCK_N=bn, SPLIT_K=sk, num_warps=w) for bn, w in ((64, 4), (128, 4), (128, 8))
           for sk in (4, 8, 16, 32)]
BLOCK_K = 128
PROBES = ("stream", "unpack", "unpack_half2")  # (the probe kernel's UNPACK 0, 1, 2)
# the stream probe over tiled words: the GEMV's usual picks (a few, to stay in the step's time)
TILED_CONFIGS = [dict(BLOCK_N=bn, SPLIT_K=sk, num_warps=w) for bn, w in ((64, 4), (128, 8)) for sk in (4, 16)]


@triton.jit
def _probe_kernel(q_ptr, out_ptr, K8, N, rows_per_split, stride_qk, opaque_zero,
                  BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, UNPACK: tl.constexpr,
                  ASM: tl.constexpr, TILED: tl.constexpr = False):
    """Stream rows ``[pid_k rows_per_split, ...)`` of the packed words of a BLOCK_N column slice
    with the GEMV's two-tile prefetch; XOR them (UNPACK 0) or sum their codes (1: one fp32 code
    at a time; 2: the HALF2 pairs), and combine the slices into ``out`` with one atomic per
    column. ``TILED``: the words in :func:`tiled` order (each column slice's rows contiguous,
    ``stride_qk`` then its row count), so a program reads one contiguous run of bytes."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    r_start = pid_k * rows_per_split
    r_end = tl.minimum(K8, r_start + rows_per_split)
    rows = r_start + tl.arange(0, BLOCK_R)
    if TILED:
        ptrs = q_ptr + pid_n * stride_qk * BLOCK_N + rows[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        step = BLOCK_R * BLOCK_N
    else:
        ptrs = q_ptr + rows[:, None] * stride_qk + offs_n[None, :]
        step = BLOCK_R * stride_qk
    nxt = tl.load(ptrs, mask=(rows < r_end)[:, None] & n_mask[None, :], other=0, eviction_policy="evict_first")
    nxt2 = tl.load(ptrs + step, mask=(rows + BLOCK_R < r_end)[:, None] & n_mask[None, :], other=0,
                   eviction_policy="evict_first")
    e0, e1, e2, e3, e4 = _exponents(opaque_zero)
    # zero points 0 (the fp16 pairs the GEMV makes of them, from a value the compiler cannot
    # see through) and the activation pair (1.0, 1.0)
    zpair, zq = _zero_pairs((opaque_zero + tl.zeros((BLOCK_N,), dtype=tl.int32)).to(tl.uint8))
    one = opaque_zero + 0x3C003C00
    bits = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.int32)
    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        words = nxt
        nxt = nxt2
        ptrs += step
        nxt2 = tl.load(ptrs + step, mask=(r0 + 2 * BLOCK_R + tl.arange(0, BLOCK_R) < r_end)[:, None]
                       & n_mask[None, :], other=0, eviction_policy="evict_first")
        if UNPACK == 2:
            acc += _half2_word_sums(words, zpair, zq, one, one, one, one, ASM)
        elif UNPACK == 1:
            # (the masked rows hold 0: codes 0, and 128 for the biased ones, removed by the caller)
            acc += _code_exact(words, 0, e0)
            acc += _code_exact(words, 1, e1)
            acc += _code_exact(words, 2, e2)
            acc += _code_exact(words, 3, e3)
            acc += _code_b128(words, 4, e4)
            acc += _code_b128(words, 5, e4)
            acc += _code_b128(words, 6, e4)
            acc += _code_b128(words, 7, e4)
        else:
            bits = bits ^ words
    if UNPACK:
        tl.atomic_add(out_ptr + offs_n, tl.sum(acc, axis=0), mask=n_mask)
    else:
        tl.atomic_xor(out_ptr + offs_n, tl.xor_sum(bits, axis=0), mask=n_mask)


def tiled(qweight, block_n):
    """``qweight`` [K/8, N] re-laid out as [N / block_n, K/8, block_n] (N padded with zero
    words): each ``block_n`` column slice's words one contiguous run, as a GEMV program reads
    them (the layout an offline repack, Marlin's kind, would give the GEMV)."""
    K8, N = qweight.shape
    padded = torch.zeros(K8, triton.cdiv(N, block_n) * block_n, dtype=qweight.dtype, device=qweight.device)
    padded[:, :N] = qweight
    return padded.view(K8, -1, block_n).transpose(0, 1).contiguous()


def probe(qweight, config, unpack, out=None, tiled_words=None):
    """Run the probe over ``qweight`` [K/8, N] with one config; returns ``out`` (per column: the
    XOR of its words (``unpack`` 0), or the sum of its codes, with 128 per code 4..7 of every
    padded row (1) or not (2)). ``tiled_words``: read these (``tiled(qweight,
    config["BLOCK_N"])``) in place of ``qweight``, with the same result."""
    K8, N = qweight.shape
    splits = config["SPLIT_K"]
    rows_per_split = triton.cdiv(triton.cdiv(K8, splits), BLOCK_K // 8) * (BLOCK_K // 8)
    if out is None:
        out = torch.zeros(N, dtype=torch.float32 if unpack else torch.int32, device=qweight.device)
    else:
        out.zero_()
    grid = (triton.cdiv(N, config["BLOCK_N"]), triton.cdiv(K8, rows_per_split))
    words, stride = (qweight, qweight.stride(0)) if tiled_words is None else (tiled_words, K8)
    if tiled_words is not None and tuple(tiled_words.shape) != (grid[0], K8, config["BLOCK_N"]):
        raise ValueError(f"tiled words of shape {tuple(tiled_words.shape)} are not qweight "
                         f"{tuple(qweight.shape)} tiled by BLOCK_N {config['BLOCK_N']}")
    _probe_kernel[grid](words, out, K8, N, rows_per_split, stride, 0,
                        BLOCK_N=config["BLOCK_N"], BLOCK_R=BLOCK_K // 8, UNPACK=int(unpack),
                        ASM=not INTERPRETED, TILED=tiled_words is not None,
                        num_warps=config["num_warps"], num_stages=1)
    return out


def padded_rows(K8, config):
    """Rows of words the unpack probe reads as zeros past K (each adds 4 x 128 to its sum)."""
    rows_per_split = triton.cdiv(triton.cdiv(K8, config["SPLIT_K"]), BLOCK_K // 8) * (BLOCK_K // 8)
    splits = triton.cdiv(K8, rows_per_split)
    tile = BLOCK_K // 8
    total = 0
    for s in range(splits):
        n = min(K8, (s + 1) * rows_per_split) - s * rows_per_split
        total += triton.cdiv(n, tile) * tile - n
    return total


def check(qweight, codes, config):
    """Both probes' results against torch: ValueError naming the probe and config if wrong."""
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    want_xor = torch.zeros(qweight.shape[1], dtype=torch.int64, device=qweight.device)
    for r in range(words.shape[0]):
        want_xor ^= words[r]
    got_xor = probe(qweight, config, unpack=False).to(torch.int64) & 0xFFFFFFFF
    if not torch.equal(got_xor, want_xor):
        raise ValueError(f"stream probe {config}: wrong XOR of the words")
    got_tiled = probe(qweight, config, unpack=False, tiled_words=tiled(qweight, config["BLOCK_N"]))
    if not torch.equal(got_tiled.to(torch.int64) & 0xFFFFFFFF, want_xor):
        raise ValueError(f"stream_tiled probe {config}: wrong XOR of the words")
    K8 = qweight.shape[0]
    want_sum = codes.double().sum(0) + 128.0 * 4 * (K8 + padded_rows(K8, config))
    got_sum = probe(qweight, config, unpack=1).double()
    if not torch.allclose(got_sum, want_sum, rtol=1e-6, atol=0):
        raise ValueError(f"unpack probe {config}: sums off by {float((got_sum - want_sum).abs().max())}")
    got_half2 = probe(qweight, config, unpack=2).double()
    if not torch.equal(got_half2, codes.double().sum(0)):  # (sums of small integers: exact)
        raise ValueError(f"unpack_half2 probe {config}: sums off by "
                         f"{float((got_half2 - codes.double().sum(0)).abs().max())}")


def run_check(device):
    gen = torch.Generator(device=device).manual_seed(0)
    for K, N in ((256, 96), (384, 40)):
        codes = torch.randint(0, 16, (K, N), device=device, dtype=torch.uint8, generator=gen)
        qweight = pack_int4(codes, backend="torch") if device.type == "cpu" else pack_int4(codes)
        for config in (dict(BLOCK_N=32, SPLIT_K=2, num_warps=4), dict(BLOCK_N=64, SPLIT_K=3, num_warps=4)):
            check(qweight, codes, config)
    print("gemv_roofline: every probe agrees with torch on every checked shape and config")


def main(argv=None):
    from _common import int_tuples

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--shapes", type=int_tuples("K:N"), help="K:N pairs, comma separated")
    parser.add_argument("--check", action="store_true", help="only check the probes (small shapes)")
    args = parser.parse_args(argv)
    if args.check:
        run_check(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        return 0
    from _common import device_info, no_cuda, write_json
    from bench_w4a16 import copies_to_defeat_l2, copy_bandwidth, graph_ms, make_weights

    from epmq_kernels.w4a16 import dequantize_int4_weight, w4a16_matmul, w4a16_plan

    if no_cuda("gemv_roofline"):
        return 0
    device = torch.device("cuda")
    run_check(device)
    shapes = args.shapes or SHAPES
    gen = torch.Generator(device=device).manual_seed(0)
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20) or 50 * 2**20
    started = time.perf_counter()
    rows = []
    slug = "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name().lower()).strip("-")
    path = os.path.join(args.out, f"gemv-roofline-{slug}.json")
    # (written before the first measurement, partial: stopped by the suite's time limit before its
    # first shape was done, the run left no JSON at all, or the previous run's as if it were this one's)
    write_json(path, dict(**device_info(device), copy_bandwidth_gbps=None, rows=rows, wall_s=0.0, partial=True))
    copy_gbps = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    for K, N in shapes:
        n = copies_to_defeat_l2(K * N // 2, l2_bytes)
        weights = [make_weights(K, N, -1, device, gen) for _ in range(n)]
        x = torch.randn(1, K, device=device, dtype=torch.float16, generator=gen)
        word_bytes = K * N // 2
        result = dict(K=K, N=N, copies=n, word_bytes=word_bytes, probes=[])
        for config in CONFIGS:
            for unpack, kind in enumerate(PROBES):
                outs = [torch.zeros(N, dtype=torch.float32 if unpack else torch.int32, device=device) for _ in weights]
                calls = [lambda q=w[0], o=o: probe(q, config, unpack, out=o) for w, o in zip(weights, outs)]
                ms = graph_ms(calls, 1)
                result["probes"].append(dict(config, probe=kind, ms=ms,
                                             gbps=word_bytes / (ms * 1e-3) / 1e9))
        for config in TILED_CONFIGS:
            words = [tiled(w[0], config["BLOCK_N"]) for w in weights]
            outs = [torch.zeros(N, dtype=torch.int32, device=device) for _ in weights]
            calls = [lambda q=w[0], t=t, o=o: probe(q, config, 0, out=o, tiled_words=t)
                     for w, t, o in zip(weights, words, outs)]
            ms = graph_ms(calls, 1)
            result["probes"].append(dict(config, probe="stream_tiled", ms=ms, gbps=word_bytes / (ms * 1e-3) / 1e9))
            del words
        for kind in PROBES + ("stream_tiled",):
            best = max((p for p in result["probes"] if p["probe"] == kind), key=lambda p: p["gbps"])
            result[f"best_{kind}"] = best
        # The copy bandwidth at this size: a copy of half the words' bytes moves as many bytes
        # (read plus written) as the probes read, with the launch and ramp a product this small pays
        halves = [(torch.empty(word_bytes // 4, dtype=torch.float16, device=device),
                   torch.empty(word_bytes // 4, dtype=torch.float16, device=device)) for _ in weights]
        result["copy_same_bytes_ms"] = graph_ms([lambda d=d, s=s: d.copy_(s) for d, s in halves], 1)
        result["copy_same_bytes_gbps"] = word_bytes / (result["copy_same_bytes_ms"] * 1e-3) / 1e9
        del halves
        gemv_calls = [lambda w=w: w4a16_matmul(x, w[0], w[1], w[2], -1) for w in weights]
        result["gemv_plan"] = {k: v for k, v in w4a16_plan(x, *weights[0], -1).items() if k != "best_ms_by_path"}
        result["gemv_ms"] = graph_ms(gemv_calls, 1)
        dense = [dequantize_int4_weight(*w, -1).to(torch.float16) for w in weights[: max(1, (n + 3) // 4)]]
        result["cublas_ms"] = graph_ms([lambda W=W: x @ W for W in dense], 1)
        del dense
        gemv_bytes = word_bytes + N * 3 + K * 2 + N * 2  # (codes, fp16 scale + uint8 zero, x, y)
        result["gemv_gbps"] = gemv_bytes / (result["gemv_ms"] * 1e-3) / 1e9
        rows.append(result)
        print(f"{K}x{N}: copy {copy_gbps:.0f} GB/s, {result['copy_same_bytes_gbps']:.0f} at this size | "
              f"stream {result['best_stream']['gbps']:.0f} ({result['best_stream']['gbps'] / copy_gbps:.0%}), "
              f"tiled {result['best_stream_tiled']['gbps']:.0f} "
              f"({result['best_stream_tiled']['gbps'] / copy_gbps:.0%}) | unpack {result['best_unpack']['gbps']:.0f} "
              f"({result['best_unpack']['gbps'] / copy_gbps:.0%}) | unpack_half2 "
              f"{result['best_unpack_half2']['gbps']:.0f} "
              f"({result['best_unpack_half2']['gbps'] / copy_gbps:.0%}) | gemv {result['gemv_gbps']:.0f} "
              f"({result['gemv_gbps'] / copy_gbps:.0%}, {result['gemv_ms'] * 1e3:.1f} us) | cuBLAS fp16 "
              f"{result['cublas_ms'] * 1e3:.1f} us", flush=True)
        del weights
        # (after every shape: a run cut short by the suite's time limit keeps what it measured)
        write_json(path, dict(**device_info(device), copy_bandwidth_gbps=copy_gbps, rows=rows,
                              wall_s=time.perf_counter() - started, partial=len(rows) < len(shapes)))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
