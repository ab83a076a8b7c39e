"""W4A16 against fp16 cuBLAS, and int4 packing against torch, on one GPU.

Script mode (the GPU suite runs this)::

    python benchmarks/bench_w4a16.py --out benchmarks/results/h100.json [--plot h100.png]

times ``w4a16_matmul`` (group 128 and per channel) and ``torch.matmul`` on the dequantized fp16
weight (cuBLAS) in the same run, for every M in 1 .. 4096 and every (K, N) of ``SHAPES``, then
with bf16 activations against bf16 cuBLAS at M = 1 and 16 on ``BF16_SHAPES`` (group 128;
``activation_dtype`` in each row; the summary lists them last, the plot is fp16's). Each
case is checked against cuBLAS's product in the activations' dtype before it is timed (the
columns named ``cublas_fp16`` hold that product's time: bf16 cuBLAS in the bf16 rows). Times are medians of
``triton.testing.do_bench`` (events, warm-up, L2 flushed before every run); on top of that the
weights rotate over several copies whenever one copy would fit in L2, so no run finds its weight
in the cache.

Each case is timed twice per side: eagerly (``ms_w4a16``, ``ms_cublas_fp16``: the time between
the events includes any gap the host leaves when it launches slower than the GPU runs) and as
CUDA-graph replays (``ms_w4a16_graph``, ``ms_cublas_graph``: one graph per side runs the whole
rotation over the weight copies, repeated to at least ``GRAPH_CALLS`` calls for small M; the
time per call is the replay's median over the number of calls). Graph times are the GPU's own:
eager minus graph is what the host costs. The W4A16 graphs are captured with
``GRAPH_WORKSPACE = "shared"`` (the eager split-K workspace, no memset nodes; each graph is
replayed alone). Where this process autotuned a bucket, ``tuned_best_ms_by_path`` holds the
fastest tuning time of each competing path (M = 1: the CUDA-core GEMV against the swapped
tensor-core dot; M >= 256: the Triton GEMM against dequantize + cuBLAS), and ``tuned_us``
every candidate's time, fastest first, so one run shows how the alternatives compare and which
configs of the space are never near the best. Bandwidth counts the bytes the product must move,
as the benchmark's weights store them,

    bytes = K N / 2 + (K / g) N 3 + M K 2 + M N 2       (codes, fp16 scales + uint8 zeros, x, y)

(and 4 K for the act-order rows' int32 g_idx)
and is compared with the device-to-device copy bandwidth measured on the same card (bytes read
plus written, median of many copies). The JSON holds the card, versions, the copy bandwidth,
pack/unpack timings and one row per case; the plot shows the speedup over cuBLAS against M.

Pytest mode (``pytest benchmarks/bench_w4a16.py``, needs pytest-benchmark and CUDA; skipped
otherwise) times a few representative cases with the ``benchmark`` fixture.
"""

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import (Terminated, device_info, int_list, int_tuples, no_cuda, pyplot, pytest_marks,  # noqa: E402
                     raise_on_sigterm, save_figure, write_json)
from epmq_kernels.packing import (  # noqa: E402
    pack_int4,
    pack_int4_cols,
    unpack_int4,
    unpack_int4_cols,
)
from epmq_kernels import w4a16 as W4A16  # noqa: E402
from epmq_kernels.w4a16 import dequantize_int4_weight, w4a16_matmul, w4a16_plan  # noqa: E402

# the goal's shapes first (4096 x 4096 and 8192 x 8192), then the bf16 and act-order rows, then
# the other shapes: a run cut short by the suite's time limit keeps the most telling (the
# tuning of each new batch size's bucket takes its share of the step)
SHAPES = [(4096, 4096), (8192, 8192), (4096, 14336), (768, 3072), (3072, 768)]
GOAL_SHAPES = SHAPES[:2]
BATCHES = [1, 4, 16, 64, 256, 1024, 4096]
BF16_SHAPES = [(4096, 4096), (8192, 8192)]  # also timed with bf16 activations, M = 1 and 16
GROUPS = [128, -1]


def ideal_speedup(K, group_size):
    """The most a W4A16 product can gain over fp16 where the weights' bytes are all it moves
    (M = 1): 2 bytes a weight against half a byte plus each group's fp16 scale and uint8 zero
    (3 bytes) over its rows. 3.82x at group 128 and K = 4096; Marlin's figure is 3.87x for its
    own format, without zero points."""
    rows = K if group_size == -1 else group_size
    return 2 / (0.5 + 3 / rows)
GRAPH_CALLS = 16  # calls per captured graph at M <= 64 (at least one rotation otherwise)


def int4_bytes(M, K, N, group_size, act_order=False):
    """What the product reads and writes of ``make_weights``' format: a group's fp16 scale and uint8
    zero are 3 bytes a column (counted as 4, the bandwidth was overstated by K N / g bytes: 1.5%
    at group 128), act-order's int32 g_idx 4 bytes a row, 16-bit x and y."""
    groups = 1 if group_size == -1 else K // group_size
    return K * N // 2 + groups * N * 3 + (4 * K if act_order else 0) + M * K * 2 + M * N * 2


def fp16_bytes(M, K, N):
    return K * N * 2 + M * K * 2 + M * N * 2


def make_weights(K, N, group_size, device, gen):
    """Random int4 weights (codes, scales, zero points) and the fp16 weight they stand for."""
    G = 1 if group_size == -1 else K // group_size
    codes = torch.randint(0, 16, (K, N), device=device, dtype=torch.uint8, generator=gen)
    qweight = pack_int4(codes)
    scales = (torch.rand(G, N, device=device, generator=gen) * 0.02 + 0.002).half()
    zeros = torch.randint(0, 16, (G, N), device=device, dtype=torch.uint8, generator=gen)
    return qweight, scales, zeros


def copies_to_defeat_l2(nbytes, l2_bytes, limit=16):
    """How many copies of a buffer make a rotation larger than twice the L2 cache."""
    return 1 if nbytes >= 2 * l2_bytes else min(limit, math.ceil(2 * l2_bytes / nbytes))


def rotating(calls):
    """One callable that runs ``calls`` in turn, a different one each time."""
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(calls)
        calls[state["i"]]()

    return call


def median_ms(fn, warmup=25, rep=100):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


_CAPTURE_STREAM = []


def graph_ms(calls, M, warmup=10, rep=60):
    """Median milliseconds per call of ``calls`` (a rotation over buffer sets) replayed as one
    CUDA graph, repeated to GRAPH_CALLS calls at small M (at least one rotation otherwise).
    Warmed up on the capture stream first (cuBLAS handles, Triton plans and the split-K
    workspace of that stream)."""
    repeats = max(1, math.ceil((GRAPH_CALLS if M <= 64 else 1) / len(calls)))
    sequence = calls * repeats
    if not _CAPTURE_STREAM:
        _CAPTURE_STREAM.append(torch.cuda.Stream())  # one for the run: one set of workspaces
    stream = _CAPTURE_STREAM[0]
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in calls:
            fn()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    saved = W4A16.GRAPH_WORKSPACE
    W4A16.GRAPH_WORKSPACE = "shared"
    try:
        with torch.cuda.graph(graph, stream=stream):
            for fn in sequence:
                fn()
    finally:
        W4A16.GRAPH_WORKSPACE = saved
    graph.replay()
    torch.cuda.synchronize()
    ms = median_ms(graph.replay, warmup=warmup, rep=rep) / len(sequence)
    del graph
    return ms


def copy_bandwidth(device, nbytes=1 << 30):
    """Device-to-device copy, bytes read plus written over the median time, in GB/s."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).uniform_()
    ms = median_ms(lambda dst=torch.empty_like(src): dst.copy_(src), warmup=50, rep=400)
    return 2 * nbytes / (ms * 1e-3) / 1e9  # (both buffers freed on return)


def bench_packing(device, gen):
    rows = []
    for K, N in ((4096, 4096), (8192, 8192)):
        codes = torch.randint(0, 16, (K, N), device=device, dtype=torch.uint8, generator=gen)
        words = pack_int4(codes)
        assert torch.equal(words, pack_int4(codes, backend="torch"))
        assert torch.equal(unpack_int4(words), codes.int())
        zeros = codes[: K // 128]
        assert torch.equal(unpack_int4_cols(pack_int4_cols(zeros)), zeros.int())
        row = dict(K=K, N=N)
        for name, fn in {
            "pack_triton": lambda: pack_int4(codes, check_range=False),
            "pack_torch": lambda: pack_int4(codes, backend="torch", check_range=False),
            "unpack_triton": lambda: unpack_int4(words),
            "unpack_torch": lambda: unpack_int4(words, backend="torch"),
        }.items():
            row[f"{name}_ms"] = median_ms(fn)
        # Bytes the triton kernels must move: uint8 codes in, int32 words out (and back: int32).
        row["pack_triton_gbps"] = (K * N + K * N // 2) / row["pack_triton_ms"] / 1e6
        row["unpack_triton_gbps"] = (K * N // 2 + K * N * 4) / row["unpack_triton_ms"] / 1e6
        row["pack_speedup"] = row["pack_torch_ms"] / row["pack_triton_ms"]
        row["unpack_speedup"] = row["unpack_torch_ms"] / row["unpack_triton_ms"]
        rows.append(row)
        print(f"pack {K}x{N}: triton {row['pack_triton_ms'] * 1e3:.1f} us "
              f"({row['pack_speedup']:.1f}x torch), unpack {row['unpack_triton_ms'] * 1e3:.1f} us "
              f"({row['unpack_speedup']:.1f}x torch)", flush=True)
    return rows


def bench_matmul(device, gen, shapes, batches, groups, copy_gbps, l2_bytes, on_row=None,
                 dtype=torch.float16, rows=None, failures=0, act_order=None):
    """One row per (shape, group, M) with activations of ``dtype`` against cuBLAS in it,
    appended to ``rows``. ``act_order``: "sorted" or "gather", the weights' rows in act-order
    (a permuted g_idx, GPTQ's with dynamic groups), run by sorting the codes once (the default,
    ``ACT_ORDER_REPACK``) or by the kernels' per-row gather."""
    rows = [] if rows is None else rows
    repack = W4A16.ACT_ORDER_REPACK
    try:
        if act_order is not None:
            W4A16.ACT_ORDER_REPACK = act_order == "sorted"
        return _bench_matmul(device, gen, shapes, batches, groups, copy_gbps, l2_bytes, on_row,
                             dtype, rows, failures, act_order)
    finally:
        W4A16.ACT_ORDER_REPACK = repack


def _bench_matmul(device, gen, shapes, batches, groups, copy_gbps, l2_bytes, on_row, dtype,
                  rows, failures, act_order):
    for K, N in shapes:
        for group_size in groups:
            qweight, scales, zeros = make_weights(K, N, group_size, device, gen)
            g_idx = None
            if act_order is not None:
                if group_size == -1:
                    raise ValueError("act-order rows need groups (a group size, not -1)")
                order = torch.randperm(K, device=device, generator=gen)
                g_idx = (torch.arange(K, device=device) // group_size)[order].to(torch.int32)
            weight = dequantize_int4_weight(qweight, scales, zeros, group_size, g_idx, dtype=dtype)
            int4_set = qweight.nbytes + scales.nbytes + zeros.nbytes
            n_int4 = copies_to_defeat_l2(int4_set, l2_bytes)
            n_fp16 = copies_to_defeat_l2(weight.nbytes, l2_bytes)
            int4_sets = [(qweight, scales, zeros)] + [
                (qweight.clone(), scales.clone(), zeros.clone()) for _ in range(n_int4 - 1)]
            fp16_sets = [weight] + [weight.clone() for _ in range(n_fp16 - 1)]
            for M in batches:
                x = torch.randn(M, K, device=device, generator=gen).to(dtype)
                reference = torch.matmul(x, weight)

                started = time.perf_counter()
                y = w4a16_matmul(x, qweight, scales, zeros, group_size, g_idx)  # autotunes
                torch.cuda.synchronize()
                first_call_s = time.perf_counter() - started
                error = ((y.float() - reference.float()).abs().max()
                         / reference.float().abs().max().clamp_min(1e-6)).item()
                ok = bool(torch.isfinite(y).all()) and error < 1e-2

                int4_calls = [(lambda q=q, s=s, z=z: w4a16_matmul(x, q, s, z, group_size, g_idx))
                              for q, s, z in int4_sets]
                fp16_calls = [(lambda w=w: torch.matmul(x, w)) for w in fp16_sets]
                ms_int4 = median_ms(rotating(int4_calls))
                ms_fp16 = median_ms(rotating(fp16_calls))
                ms_int4_graph = graph_ms(int4_calls, M)
                ms_fp16_graph = graph_ms(fp16_calls, M)

                plan = w4a16_plan(x, qweight, scales, zeros, group_size, g_idx)
                nbytes = int4_bytes(M, K, N, group_size, act_order=g_idx is not None)
                actual = int4_set + (0 if g_idx is None else g_idx.nbytes) + x.nbytes + y.nbytes
                row = dict(
                    K=K, N=N, M=M, group_size=group_size, activation_dtype=str(dtype)[6:],
                    act_order=act_order, path=plan["path"], config=plan["config"],
                    gather=plan["gather"],
                    tuned_best_ms_by_path=plan["best_ms_by_path"], rejected_configs=plan["rejected"],
                    # (every candidate of the bucket, fastest first: how far the next ones were)
                    tuned_us=[[round(ms * 1e3, 2), candidate] for ms, candidate in plan["timings"]],
                    ms_w4a16=ms_int4, ms_cublas_fp16=ms_fp16, speedup=ms_fp16 / ms_int4,
                    ms_w4a16_graph=ms_int4_graph, ms_cublas_graph=ms_fp16_graph,
                    speedup_graph=ms_fp16_graph / ms_int4_graph,
                    host_gap_us_w4a16=(ms_int4 - ms_int4_graph) * 1e3,
                    bytes=nbytes, gbps=nbytes / (ms_int4 * 1e-3) / 1e9,
                    frac_copy_bw=nbytes / (ms_int4 * 1e-3) / 1e9 / copy_gbps,
                    gbps_graph=nbytes / (ms_int4_graph * 1e-3) / 1e9,
                    frac_copy_bw_graph=nbytes / (ms_int4_graph * 1e-3) / 1e9 / copy_gbps,
                    bytes_actual=actual,
                    frac_copy_bw_actual=actual / (ms_int4 * 1e-3) / 1e9 / copy_gbps,
                    cublas_gbps=fp16_bytes(M, K, N) / (ms_fp16 * 1e-3) / 1e9,
                    tflops=2 * M * K * N / (ms_int4 * 1e-3) / 1e12,
                    cublas_tflops=2 * M * K * N / (ms_fp16 * 1e-3) / 1e12,
                    tflops_graph=2 * M * K * N / (ms_int4_graph * 1e-3) / 1e12,
                    cublas_tflops_graph=2 * M * K * N / (ms_fp16_graph * 1e-3) / 1e12,
                    max_rel_err=error, ok=ok, first_call_s=first_call_s,
                    rotating_int4=n_int4, rotating_fp16=n_fp16,
                )
                rows.append(row)
                failures += not ok
                tuned = " ".join(f"{p}={ms * 1e3:.1f}us"
                                 for p, ms in sorted(plan["best_ms_by_path"].items()))
                print(f"K={K:5d} N={N:5d} g={group_size:4d} M={M:5d} {str(dtype)[6:]:8s} "
                      f"{'act-order ' + act_order + ' ' if act_order else ''}{plan['path']:6s} "
                      f"w4a16 {ms_int4 * 1e3:8.1f} us  cublas {ms_fp16 * 1e3:8.1f} us  "
                      f"x{row['speedup']:5.2f} | graph {ms_int4_graph * 1e3:8.1f} us  "
                      f"cublas {ms_fp16_graph * 1e3:8.1f} us  x{row['speedup_graph']:5.2f}  "
                      f"{row['gbps_graph']:5.0f} GB/s ({100 * row['frac_copy_bw_graph']:3.0f}% "
                      f"copy)  err {error:.1e}{'' if ok else '  WRONG'}  first call "
                      f"{first_call_s:.1f}s  tuned {tuned}", flush=True)
                if on_row is not None:
                    on_row(rows, failures)
            del int4_sets, fp16_sets, weight, int4_calls, fp16_calls
            torch.cuda.empty_cache()
    return rows, failures


def summary(rows):
    """The issue's targets, last (the caller may only see the tail): M = 1 and 16 on 4096^2 and
    8192^2 (>= 3.5x cuBLAS, >= 85% of copy bandwidth at M = 1) and M >= 1024 (>= 0.9x); the
    bf16 rows (against bf16 cuBLAS) and the act-order ones before them."""
    print("== summary (eager | graph): speedup over cuBLAS, fraction of copy bandwidth, path")
    for r in sorted(rows, key=lambda r: (r.get("activation_dtype", "float16") == "float16"
                                         and not r.get("act_order"))):
        small = (r["K"], r["N"]) in ((4096, 4096), (8192, 8192)) and r["M"] in (1, 16)
        if small or r["M"] >= 1024:
            print(f"  {r['K']}x{r['N']} g{r['group_size']:<4d} M={r['M']:<5d} "
                  f"{r.get('activation_dtype', 'float16'):8s} "
                  + (f"act-order {r['act_order']} " if r.get("act_order") else "") +
                  f"x{r['speedup']:5.2f} | x{r['speedup_graph']:5.2f}   "
                  f"{100 * r['frac_copy_bw']:3.0f}% | {100 * r['frac_copy_bw_graph']:3.0f}%   "
                  f"host gap {r['host_gap_us_w4a16']:6.1f} us   {r['path']}  tuned: "
                  + " ".join(f"{p}={ms * 1e3:.1f}us" for p, ms in
                             sorted(r.get("tuned_best_ms_by_path", {}).items())), flush=True)


def plot(rows, path, device_name):
    """Speedup over cuBLAS against M: eager (solid) and CUDA-graph replays (dashed, the GPU
    time alone), one panel per group size."""
    rows = [r for r in rows if r.get("activation_dtype", "float16") == "float16"
            and not r.get("act_order")]
    groups = sorted({r["group_size"] for r in rows}, reverse=True)
    if not groups:  # (stopped before its first fp16 row: subplots(1, 0) raised, losing the exit code 124)
        fig, ax = pyplot().subplots(figsize=(6, 4.5))
        ax.text(0.5, 0.5, "no fp16 row measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        save_figure(fig, path, f"W4A16 vs fp16 cuBLAS on {device_name}")
        return
    fig, axes = pyplot().subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, group_size in zip(axes[0], groups):
        for i, (K, N) in enumerate(sorted({(r["K"], r["N"]) for r in rows})):
            sel = sorted((r for r in rows if r["group_size"] == group_size
                          and (r["K"], r["N"]) == (K, N)), key=lambda r: r["M"])
            color = f"C{i}"
            ax.plot([r["M"] for r in sel], [r["speedup"] for r in sel], marker="o",
                    color=color, label=f"K={K}, N={N}")
            graph = [r for r in sel if "speedup_graph" in r]
            ax.plot([r["M"] for r in graph], [r["speedup_graph"] for r in graph], marker="x",
                    ls="--", color=color)
        # a case whose product failed its check (ok false; the run exits 1) is marked: drawn as
        # the others, a fast wrong kernel read as a speedup
        wrong = [r for r in rows if r["group_size"] == group_size and not r.get("ok", True)]
        if wrong:
            ax.scatter([r["M"] for r in wrong], [r["speedup"] for r in wrong], marker="X", s=90,
                       color="red", zorder=5, label="wrong result")
        ax.axhline(1.0, color="gray", lw=1, label="fp16 cuBLAS (1x)")
        ideal = ideal_speedup(max(r["K"] for r in rows if r["group_size"] == group_size), group_size)
        ax.axhline(ideal, color="gray", lw=1, ls="--", label=f"bytes' limit at M=1 ({ideal:.2f}x)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (batch rows)")
        ax.set_ylabel("speedup over fp16 cuBLAS (solid eager, dashed graphs)")
        ax.set_title("per channel" if group_size == -1 else f"group {group_size}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, f"W4A16 vs fp16 cuBLAS on {device_name}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="JSON file to write (required unless --replot)")
    parser.add_argument("--plot", help="PNG to write (default: beside --out, or --replot's JSON)")
    parser.add_argument("--replot", metavar="JSON", help="only draw the plot again from a JSON this benchmark "
                        "wrote (no GPU: a committed run's figure after a change to the plot)")
    parser.add_argument("--shapes", type=int_tuples("K:N"), help="K:N pairs, comma separated (default: all)")
    parser.add_argument("--batches", type=int_list("a batch (M >= 1)"), help="M values, comma separated (default: all)")
    parser.add_argument("--groups", type=int_list("a group size (>= 1, or -1: per channel)", also=(-1,)),
                        help="group sizes, comma separated, -1 per channel")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.replot:
        result = json.loads(Path(args.replot).read_text())
        plot(result["rows"], args.plot or re.sub(r"\.json$", "", args.replot) + ".png", result["device"])
        return 0
    if args.out is None:
        parser.error("--out is required (or --replot JSON)")
    if no_cuda("bench_w4a16"):
        return 0

    shapes = args.shapes or SHAPES
    batches = args.batches or BATCHES
    groups = args.groups or GROUPS
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    props = torch.cuda.get_device_properties(device)
    l2_bytes = getattr(props, "L2_cache_size", 50 * 2**20) or 50 * 2**20
    started = time.perf_counter()
    copy_gbps, packing = None, []  # (what a run stopped before measuring them writes)

    def result_of(rows, failures, partial):
        return dict(
            **device_info(device), l2_bytes=l2_bytes,
            cublas_dtype="the row's activation_dtype (float16 but for the bf16 rows)",
            zeros_dtype="uint8", scales_dtype="float16", graph_calls=GRAPH_CALLS,
            graph_workspace="shared",
            bytes_formula="K*N/2 + (K/g)*N*3 + M*K*2 + M*N*2 (+ 4*K act-order)",
            copy_bandwidth_gbps=copy_gbps, packing=packing, rows=rows, failures=failures,
            autotune_cache_dir=os.environ.get("EPMQ_CACHE_DIR", "~/.cache/epmq"),
            wall_s=time.perf_counter() - started, partial=partial,
        )

    # written after every row too, so that a run cut short by a time limit keeps what it
    # measured; stopped by SIGTERM, it still plots and summarizes that
    latest = dict(rows=[], failures=0)

    def on_row(rows, failures):
        latest.update(rows=rows, failures=failures)
        write_json(args.out, result_of(rows, failures, True))

    # caught from the start: stopped while it measures the copy bandwidth or the packing (the
    # first seconds of the step, longer on a busy card), the run still writes a JSON
    raise_on_sigterm()
    try:
        copy_gbps = copy_bandwidth(device)
        print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_gbps:.0f} GB/s, "
              f"L2 {l2_bytes / 2**20:.0f} MiB", flush=True)
        packing = bench_packing(device, gen)
        rows, failures = bench_matmul(device, gen, [s for s in shapes if s in GOAL_SHAPES],
                                      batches, groups, copy_gbps, l2_bytes, on_row=on_row)
        # bf16 activations (bf16 models) at the batch-1 and batch-16 targets, against bf16
        # cuBLAS: where the GEMV's HALF2 option takes them as fp16 pairs too
        rows, failures = bench_matmul(device, gen, [s for s in BF16_SHAPES if s in shapes],
                                      [m for m in (1, 16) if m in batches], [g for g in (128,) if g in groups],
                                      copy_gbps, l2_bytes, on_row=on_row, dtype=torch.bfloat16,
                                      rows=rows, failures=failures)
        # act-order weights (a permuted g_idx) at the batch-1 and batch-16 targets, group 128:
        # the codes sorted once (the default) against the kernels' per-row gather
        for act_order in ("sorted", "gather"):
            rows, failures = bench_matmul(device, gen, [s for s in BF16_SHAPES[:1] if s in shapes],
                                          [m for m in (1, 16) if m in batches],
                                          [g for g in (128,) if g in groups], copy_gbps, l2_bytes,
                                          on_row=on_row, rows=rows, failures=failures,
                                          act_order=act_order)
        rows, failures = bench_matmul(device, gen, [s for s in shapes if s not in GOAL_SHAPES],
                                      batches, groups, copy_gbps, l2_bytes, on_row=on_row,
                                      rows=rows, failures=failures)
        partial = False
    except Terminated:
        rows, failures, partial = list(latest["rows"]), latest["failures"], True
        print("bench_w4a16: stopped at its time limit; writing what it measured", flush=True)
    result = result_of(rows, failures, partial)
    write_json(args.out, result)
    plot_path = args.plot or re.sub(r"\.json$", "", args.out) + ".png"
    plot(rows, plot_path, result["device"])
    summary(rows)
    print(f"wrote {args.out} and {plot_path} in {result['wall_s']:.0f} s; "
          f"{failures} wrong results", flush=True)
    return 124 if partial else (1 if failures else 0)


# ----------------------------------------------------------------------------------------------
# pytest-benchmark mode (only under pytest: gemv_roofline.py imports this module as a library,
# where pytest_marks' skip without pytest-benchmark would escape as an error)
# ----------------------------------------------------------------------------------------------
if __name__ != "__main__" and "pytest" in sys.modules:
    import pytest

    pytestmark = pytest_marks()

    @pytest.fixture(scope="module")
    def _weights():
        gen = torch.Generator(device="cuda").manual_seed(0)
        return {g: make_weights(4096, 4096, g, torch.device("cuda"), gen) for g in (128, -1)}

    @pytest.mark.parametrize("group_size", [128, -1])
    @pytest.mark.parametrize("M", [1, 16, 1024])
    def test_w4a16(benchmark, _weights, M, group_size):
        qweight, scales, zeros = _weights[group_size]
        x = torch.randn(M, 4096, device="cuda").half()
        w4a16_matmul(x, qweight, scales, zeros, group_size)  # autotune outside the timing

        def run():
            w4a16_matmul(x, qweight, scales, zeros, group_size)
            torch.cuda.synchronize()

        benchmark(run)

    @pytest.mark.parametrize("M", [1, 16, 1024])
    def test_cublas_fp16(benchmark, _weights, M):
        qweight, scales, zeros = _weights[128]
        weight = dequantize_int4_weight(qweight, scales, zeros, 128, dtype=torch.float16)
        x = torch.randn(M, 4096, device="cuda").half()

        def run():
            torch.matmul(x, weight)
            torch.cuda.synchronize()

        benchmark(run)

    def test_pack_int4(benchmark):
        codes = torch.randint(0, 16, (4096, 4096), device="cuda", dtype=torch.uint8)

        def run():
            pack_int4(codes, check_range=False)
            torch.cuda.synchronize()

        benchmark(run)


if __name__ == "__main__":
    sys.exit(main())
