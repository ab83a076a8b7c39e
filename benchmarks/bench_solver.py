"""GPTQ / E-PMQ layer quantization: the fused Triton solver against the eager torch loop.

Script mode (the GPU suite runs this)::

    python benchmarks/bench_solver.py --out benchmarks/results [--shapes 4096:4096,...]

On one GPU, in one run, for every layer shape ``[d_out, d_in]`` of ``SHAPES`` (``d_in`` is the
input width: the Hessian is ``d_in x d_in``, 14336^2 fp32 = 822 MB for the largest):

  solve      ``gptq_solve`` alone (the column loop and its trailing updates), same ``Hinv`` and
             weights, backend "torch" (the reference loop, eager, on the same CUDA tensors)
             against "triton" (the fused kernels);
  gptq       the whole layer, ``epmq.quant.gptq(..., backend=)``: damping, factorisation,
             solve and loss; the factorisation is shared work, so this speedup is lower;
  epmq       ``epmq.quant.epmq`` with 8 experts (the residual statistics from the Triton
             kernel, ``R = G H~^{-1}``, the solve) against plain GPTQ (fused) on the same layer
             with the pooled Hessian; the goal is a ratio of at most 1.5. Timed once per
             residual precision ("ieee", "tf32x3", "bf16x3", the default, and "tf32": the least
             accurate product allowed, the autotuner keeping the fastest of it and the more
             accurate ones), each result checked against the IEEE one (codes, loss); the row
             records which fp32 product ``fp32_mm`` chose for R and the anchor term; the
             residual products run on a side stream while the Hessian is factored
             (``epmq.stats.RESIDUALS_ON_SIDE_STREAM``), and for bf16x3 and tf32 E-PMQ is timed
             with them on the current stream as well (``side_stream: false``; the same
             results bit for bit, checked);
  residual   the 8 experts' ``G += a_k (W_k - W_m) H_k`` alone: Triton (each precision,
             autotuned, the tuning outside the timing) against torch (cuBLAS fp32, TF32
             off), with torch's plain TF32 (TF32 on) as the tensor-core reference: tf32 should
             approach it, and tf32x3 does three TF32 products, so ~3x its time is its ceiling
             (bf16x3: three bf16 products, ~1.5x);
  sweep      the block kernel's rows and warps per program on 4096x4096 (for the launch
             heuristic).

Every fused result is checked against the reference in the same run (fraction of codes equal,
ratio of the layer losses) and the check is recorded beside the time. Times are wall clock
between ``torch.cuda.synchronize()`` calls, after a warm-up, median of the repeats. The eager
loop is slow (tens of microseconds of launches per column): it is warmed up on the first shape
only and repeated 3, 2 and 1 times on the three shapes; the JSON records every repeat.

Problems are random but shaped like real ones: weights ~ N(0, 1/d_in); ``H = X^T X`` over
``d_in + 1024`` tokens whose features have log-normal scales (a spread of ~e^1 per feature);
expert k's Hessian ``D_k H D_k`` with its own log-normal feature rescaling ``D_k``, and
``W_k = W_m + 1%`` noise. Spec: 4 bits, asymmetric, dynamic groups of 128, blocksize 128.

Writes ``solver-<card>.json`` (card, versions, one row per measurement) and ``solver-<card>.png``
(speedup per shape, E-PMQ / GPTQ time ratio) under ``--out``.

Pytest mode (``pytest benchmarks/bench_solver.py``, needs pytest-benchmark and CUDA; skipped
otherwise) times the fused solve, the eager solve and the residual on 4096x4096.
"""

import argparse
import json
import math
import os
import re
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _common import (Terminated, device_info, int_tuples, no_cuda, pyplot, pytest_marks,  # noqa: E402
                     raise_on_sigterm, save_figure, write_json, write_text)
from epmq import quant  # noqa: E402
from epmq import stats as epmq_stats  # noqa: E402
from epmq.spec import QuantSpec  # noqa: E402
from epmq.stats import LowRankExpert  # noqa: E402
from epmq_kernels.expert_residual import (  # noqa: E402
    DEFAULT_RESIDUAL_PRECISION,
    RESIDUAL_PRECISIONS,
    _residual_config,
    accumulate_residual_reference,
    accumulate_residual_triton,
)
from epmq_kernels.gptq_solve import gptq_solve, solver_launch_config  # noqa: E402
from epmq_kernels import autotune_cache  # noqa: E402
from epmq_kernels._runtime import fp32_matmul, fp32_mm  # noqa: E402

SHAPES = [(768, 3072), (4096, 4096), (4096, 14336)]  # [d_out, d_in]
EAGER_REPEATS = {3072: 3, 4096: 2, 14336: 1}  # by d_in; 1 for anything larger
N_EXPERTS = 8
LORA_RANK = 16
SPEC = QuantSpec(bits=4, group_size=128, sym=False)
BLOCKSIZE = 128
SWEEP = [(2, 1), (4, 1), (8, 1), (16, 1), (8, 4), (16, 4)]  # (block_rows, num_warps)


# ----------------------------------------------------------------------------------------------
# problems
# ----------------------------------------------------------------------------------------------
def make_layer(d_out, d_in, device, seed=0, n_experts=N_EXPERTS):
    g = torch.Generator(device=device).manual_seed(seed)
    W_m = torch.randn(d_out, d_in, device=device, generator=g) / d_in**0.5
    scale = torch.exp(torch.randn(d_in, device=device, generator=g))
    X = torch.randn(d_in + 1024, d_in, device=device, generator=g) * scale
    H = X.T @ X  # fp32, TF32 off (torch's default): data, but no reason to make it worse
    del X
    experts, hessians = [], []
    for _ in range(n_experts):
        experts.append(W_m + 0.01 * torch.randn(d_out, d_in, device=device, generator=g) / d_in**0.5)
        D = torch.exp(0.3 * torch.randn(d_in, device=device, generator=g))
        hessians.append(D[:, None] * H * D[None, :])
    return W_m, H, experts, hessians


def make_lora_experts(W_m, rank, n_experts=N_EXPERTS, seed=1):
    """``n_experts`` LoRA experts ``W_0 + U V`` of one base whose task-arithmetic merge (0.3 of
    the updates' sum) is ``W_m``."""
    d_out, d_in = W_m.shape
    g = torch.Generator(device=W_m.device).manual_seed(seed)
    parts = [(torch.randn(d_out, rank, device=W_m.device, generator=g) * 0.02 / rank**0.5,
              torch.randn(rank, d_in, device=W_m.device, generator=g) / d_in**0.5) for _ in range(n_experts)]
    W_0 = W_m - 0.3 * sum(U @ V for U, V in parts)
    return [LowRankExpert(W_0, U, V) for U, V in parts]


def make_hinv(H, percdamp=0.01):
    """Upper Cholesky factor of (H + damp I)^{-1} in float64, as GPTQ builds it."""
    H = H.double().clone()
    diag = H.diagonal()
    diag[diag == 0] = 1.0
    diag.add_(percdamp * float(diag.mean()))
    H_inv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    return torch.linalg.cholesky(H_inv, upper=True).float()


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------
def timed(fn, repeats, warmup=1):
    """Wall seconds of ``fn`` between device synchronisations: (times, last result)."""
    out = None
    for _ in range(warmup):
        out = fn()
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times, out


def med(times):
    return statistics.median(times) if times else float("nan")


def layer_loss(Q, W, H):
    E = (Q - W).float()
    return float(((E @ H.float()) * E).double().sum())


# ----------------------------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------------------------
def bench_shape(d_out, d_in, device, deadline, log, first):
    rows = []
    shape = dict(d_out=d_out, d_in=d_in, shape=f"{d_out}x{d_in}")
    W_m, H, experts, hessians = make_layer(d_out, d_in, device)
    H_m = sum(hessians)  # the pooled calibration set's Hessian: what plain GPTQ sees
    Hinv = make_hinv(H_m)
    eager_reps = EAGER_REPEATS.get(d_in, 1)
    solve_kw = dict(bits=SPEC.bits, sym=SPEC.sym, group_size=SPEC.group_size, blocksize=BLOCKSIZE)

    # -- the solve alone ------------------------------------------------------------------------
    t_tri, out_tri = timed(lambda: gptq_solve(W_m, Hinv, backend="triton", **solve_kw), 5)
    t_ref, out_ref = timed(lambda: gptq_solve(W_m, Hinv, backend="torch", **solve_kw), eager_reps,
                           warmup=1 if first else 0)
    agree = float((out_ref.codes == out_tri.codes).double().mean())
    max_step = int((out_ref.codes - out_tri.codes).abs().max())
    loss_ref, loss_tri = layer_loss(out_ref.Q, W_m, H_m), layer_loss(out_tri.Q, W_m, H_m)
    rows.append(dict(shape, kind="solve", t_torch_s=t_ref, t_triton_s=t_tri,
                     torch_s=med(t_ref), triton_s=med(t_tri), speedup=med(t_ref) / med(t_tri),
                     codes_equal=agree, max_code_step=max_step, loss_ratio=loss_tri / loss_ref,
                     launch=dict(zip(("block_rows", "num_warps"),
                                     solver_launch_config(d_out, BLOCKSIZE, device)))))
    log(rows[-1])
    del out_ref, out_tri

    # -- the whole GPTQ layer ---------------------------------------------------------------------
    t_gq, res_gq = timed(lambda: quant.gptq(W_m, H_m, SPEC, blocksize=BLOCKSIZE, backend="triton"), 3)
    if time.perf_counter() < deadline:
        t_gr, res_gr = timed(lambda: quant.gptq(W_m, H_m, SPEC, blocksize=BLOCKSIZE, backend="torch"),
                             eager_reps, warmup=0)
        rows.append(dict(shape, kind="gptq", t_torch_s=t_gr, t_triton_s=t_gq, torch_s=med(t_gr),
                         triton_s=med(t_gq), speedup=med(t_gr) / med(t_gq),
                         codes_equal=float((res_gr.codes == res_gq.codes).double().mean()),
                         loss_ratio=res_gq.loss / res_gr.loss))
        del res_gr
    else:
        rows.append(dict(shape, kind="gptq", t_triton_s=t_gq, triton_s=med(t_gq),
                         skipped_torch="time budget"))
    log(rows[-1])

    # -- E-PMQ with 8 experts against plain GPTQ, both fused, per residual precision -----------
    epmq_reps = 3 if d_in <= 4096 else 2

    def epmq_timed(precision, anchor=1.0):
        """E-PMQ timed with this residual precision and anchor, and its row (the last result)."""
        t_ep, res_ep = timed(lambda: quant.epmq(W_m, experts, hessians, SPEC, blocksize=BLOCKSIZE,
                                                anchor=anchor, backend="triton",
                                                residual_precision=precision), epmq_reps)
        row = dict(shape, kind="epmq_vs_gptq", residual_precision=precision, anchor=anchor,
                   experts=N_EXPERTS, side_stream=epmq_stats.RESIDUALS_ON_SIDE_STREAM, t_epmq_s=t_ep,
                   t_gptq_s=t_gq, epmq_s=med(t_ep), gptq_s=med(t_gq), ratio=med(t_ep) / med(t_gq),
                   fp32_mm=fp32_mm(W_m.device, quant._fp32_floor("triton", precision)).__name__)
        return row, res_ep

    results = {}
    for precision in RESIDUAL_PRECISIONS:
        row, res_ep = epmq_timed(precision)
        results[precision] = res_ep
        if precision == "ieee" and d_in <= 4096 and time.perf_counter() < deadline:
            # E-PMQ checked end to end against its torch path (eager solver) on the smaller shapes
            res_er = quant.epmq(W_m, experts, hessians, SPEC, blocksize=BLOCKSIZE, backend="torch")
            row.update(codes_equal_vs_torch=float((res_er.codes == res_ep.codes).double().mean()),
                       loss_ratio_vs_torch=res_ep.loss / res_er.loss)
            del res_er
        if precision != "ieee":
            base = results["ieee"]
            row.update(codes_equal_vs_ieee=float((base.codes == res_ep.codes).double().mean()),
                       loss_ratio_vs_ieee=res_ep.loss / base.loss)
        rows.append(row)
        log(row)
    # the anchors the demo picks are 0 or 0.1; at 0 the anchor term's product is skipped
    rows.append(epmq_timed("tf32", anchor=0.0)[0])
    log(rows[-1])
    # LoRA experts (W_0 + U V, rank LORA_RANK) given as such: one product of the weight's size
    # for all 8 instead of one each, at the default precision
    lora = make_lora_experts(W_m, LORA_RANK)
    t_lr, res_lr = timed(lambda experts=lora: quant.epmq(W_m, experts, hessians, SPEC, blocksize=BLOCKSIZE,
                                                         backend="triton"), epmq_reps)
    row = dict(shape, kind="epmq_lora_vs_gptq", residual_precision=DEFAULT_RESIDUAL_PRECISION,
               anchor=1.0, experts=N_EXPERTS, rank=LORA_RANK, t_epmq_s=t_lr, t_gptq_s=t_gq,
               epmq_s=med(t_lr), gptq_s=med(t_gq), ratio=med(t_lr) / med(t_gq))
    if d_in <= 4096:  # (the same experts dense: the product per expert they save)
        dense = [e.dense() for e in lora]
        t_ld, res_ld = timed(lambda experts=dense: quant.epmq(W_m, experts, hessians, SPEC, blocksize=BLOCKSIZE,
                                                              backend="triton"), epmq_reps)
        row.update(t_dense_s=t_ld, dense_s=med(t_ld), dense_ratio=med(t_ld) / med(t_gq),
                   codes_equal_vs_dense=float((res_ld.codes == res_lr.codes).double().mean()),
                   loss_ratio_vs_dense=res_lr.loss / res_ld.loss)
        del res_ld, dense
    rows.append(row)
    log(row)
    del lora, res_lr
    # the residual products on the current stream instead of the side stream (where they run
    # while the Hessian is factored): the same results bit for bit, the difference is time
    if epmq_stats.RESIDUALS_ON_SIDE_STREAM:
        for precision in ("bf16x3", "tf32"):
            epmq_stats.RESIDUALS_ON_SIDE_STREAM = False
            try:
                row, res_ep = epmq_timed(precision)
            finally:
                epmq_stats.RESIDUALS_ON_SIDE_STREAM = True
            row["same_as_side_stream"] = (torch.equal(res_ep.codes, results[precision].codes)
                                          and torch.equal(res_ep.target, results[precision].target))
            rows.append(row)
            log(rows[-1])
    del results, res_ep, res_gq

    # -- the residual statistics alone ----------------------------------------------------------
    def residual(fn, **kw):
        G = torch.zeros(d_out, d_in, device=device)

        def run():
            G.zero_()
            return sum(fn(G, W_k, W_m, H_k, 1.0 / float(H_k.diagonal().sum()), **kw)
                       for W_k, H_k in zip(experts, hessians))

        times, trace = timed(run, 3)  # the warm-up call autotunes (scratch G) and compiles
        return times, G.clone(), trace

    t_rr, G_r, c_r = residual(accumulate_residual_reference)
    with fp32_matmul(tf32=True):  # the tensor-core reference: plain TF32
        t_r32, _, _ = residual(accumulate_residual_reference)
    flop = 2 * N_EXPERTS * d_out * d_in * d_in
    scale = float(G_r.abs().max())
    row = dict(shape, kind="residual", experts=N_EXPERTS, t_torch_s=t_rr, t_torch_tf32_s=t_r32,
               torch_s=med(t_rr), torch_tf32_s=med(t_r32),
               tflops_torch_tf32=flop / med(t_r32) / 1e12, configs={})
    for precision in RESIDUAL_PRECISIONS:
        sfx = _suffix(precision)
        t_p, G_p, c_p = residual(accumulate_residual_triton, input_precision=precision)
        row.update({f"t_triton{sfx}_s": t_p, f"triton{sfx}_s": med(t_p),
                    f"speedup{sfx}": med(t_rr) / med(t_p), f"tflops{sfx}": flop / med(t_p) / 1e12,
                    f"max_rel_err{sfx}": float((G_p - G_r).abs().max()) / scale,
                    f"trace_rel_err{sfx}": abs(c_p - c_r) / abs(c_r)})
        row["configs"][precision] = list(_residual_config(G_r, experts[0], W_m, hessians[0],
                                                          precision))
        del G_p
    # every candidate's time from this process's tuning (the fused kernel's configs and cuBLAS,
    # for each precision a floor allows, and the fp32 product probe of fp32_mm), so that the
    # winner's margin is on record
    row["autotune_ms"] = {key: [[ms, config] for ms, config in timings]
                          for (family, key), timings in autotune_cache.TIMINGS.items()
                          if family == "residual" and f"|{d_out}x{d_in}|" in key
                          or family == "fp32_mm"}
    rows.append(row)
    log(rows[-1])
    return rows


def _suffix(precision):
    """The residual row's key suffix of a precision: triton_s (ieee), triton_tf32x3_s, ..."""
    return "" if precision == "ieee" else f"_{precision}"


def bench_sweep(device, log, d_out=4096, d_in=4096):
    """Rows per program and warps per program of the block kernel, on one layer."""
    W_m, H, _, _ = make_layer(d_out, d_in, device, n_experts=0)
    Hinv = make_hinv(H)
    kw = dict(bits=SPEC.bits, sym=SPEC.sym, group_size=SPEC.group_size, blocksize=BLOCKSIZE,
              backend="triton")
    rows = []
    for block_rows, num_warps in SWEEP:
        times, _ = timed(lambda: gptq_solve(W_m, Hinv, block_rows=block_rows, num_warps=num_warps,
                                            **kw), 3)
        rows.append(dict(kind="sweep", shape=f"{d_out}x{d_in}", block_rows=block_rows,
                         num_warps=num_warps, triton_s=med(times), t_triton_s=times))
        log(rows[-1])
    return rows


def plot(rows, path, device_name):
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(12, 4.5))
    shapes = [r["shape"] for r in rows if r["kind"] == "solve"]
    x = range(len(shapes))
    for offset, kind, label in ((-0.2, "solve", "solve only"), (0.2, "gptq", "whole GPTQ layer")):
        # a speedup not measured (the eager baseline skipped past --budget-s) is no bar and says
        # so: drawn as 0.0 it read as a fused layer infinitely slower than eager
        sp = {r["shape"]: r["speedup"] for r in rows if r["kind"] == kind and "speedup" in r}
        ax1.bar([i + offset for i in x], [sp.get(s, math.nan) for s in shapes], width=0.4, label=label)
        for i, s in enumerate(shapes):
            if s not in sp:
                ax1.text(i + offset, 0, "eager\nnot timed", ha="center", va="bottom", fontsize=7)
    ax1.axhline(10, color="gray", ls="--", lw=1, label="goal 10x")
    ax1.set_xticks(list(x), [f"{s}\n[d_out x d_in]" for s in shapes])
    ax1.set_xlim(-0.6, len(shapes) - 0.4)  # (a slot whose bar is missing still shown whole)
    ax1.set_ylabel("speedup of fused Triton over eager torch")
    ax1.legend()
    ax1.grid(True, axis="y", alpha=0.3)
    width = 0.8 / len(RESIDUAL_PRECISIONS)
    for j, precision in enumerate(RESIDUAL_PRECISIONS):
        ratio = {r["shape"]: r["ratio"] for r in rows if r["kind"] == "epmq_vs_gptq" and r.get("side_stream", True)
                 and r.get("residual_precision", "ieee") == precision and r.get("anchor", 1.0) == 1.0}
        offset = (j - (len(RESIDUAL_PRECISIONS) - 1) / 2) * width
        ax2.bar([i + offset for i in x], [ratio.get(s, math.nan) for s in shapes], width=width,
                label=f"residual {precision}")
    ax2.axhline(1.5, color="gray", ls="--", lw=1, label="goal <= 1.5")
    ax2.set_xticks(list(x), shapes)
    ax2.set_ylabel(f"E-PMQ ({N_EXPERTS} experts, anchor 1) time / GPTQ time")
    # headroom above the tallest bar, so that the legend covers none
    ax2.set_ylim(0, 1.45 * max([r["ratio"] for r in rows if r["kind"] == "epmq_vs_gptq"] + [1.5]))
    ax2.legend(ncol=2, loc="upper left")
    ax2.grid(True, axis="y", alpha=0.3)
    save_figure(fig, path, f"GPTQ / E-PMQ solver on {device_name}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory for solver-<card>.json/.png")
    parser.add_argument("--shapes", type=int_tuples("d_out:d_in"),
                        help="d_out:d_in pairs, comma separated (default: all)")
    parser.add_argument("--budget-s", type=float, default=200.0,
                        help="after this many seconds, skip the remaining eager baselines")
    parser.add_argument("--no-sweep", action="store_true", help="skip the launch-configuration sweep")
    parser.add_argument("--profile-if-under", type=float, default=80.0, metavar="S",
                        help="while the run has taken less than S seconds, write the torch-profiler "
                             "tables of one E-PMQ layer (bf16x3) and one GPTQ layer of one more "
                             "shape (largest first)")
    args = parser.parse_args(argv)
    if no_cuda("bench_solver"):
        return 0

    started = time.perf_counter()
    deadline = started + args.budget_s
    shapes = args.shapes or SHAPES
    device = torch.device("cuda")
    name = torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference's products are IEEE fp32 too

    def log(row):
        brief = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()
                 if not k.startswith("t_")}
        print(json.dumps(brief), flush=True)

    json_path = os.path.join(args.out, f"solver-{slug}.json")
    rows = []
    raise_on_sigterm()  # (stopped at the time limit, it still writes, plots and prints the rest)
    partial = False
    try:
        for i, (d_out, d_in) in enumerate(shapes):
            rows += bench_shape(d_out, d_in, device, deadline, log, first=i == 0)
            torch.cuda.empty_cache()
            # kept after every shape, so that a run cut short by a time limit keeps what it measured
            write_json(json_path, dict(**device_info(device), rows=rows, partial=True,
                                       wall_s=time.perf_counter() - started))
        if not args.no_sweep and time.perf_counter() < deadline:
            rows += bench_sweep(device, log)
    except Terminated:
        partial = True
        print("bench_solver: stopped at its time limit; writing what it measured", flush=True)

    # correctness: codes within one step and losses within 1e-3 (summation order may differ)
    bad = [r for r in rows if r.get("max_code_step", 0) > 1 or not r.get("same_as_side_stream", True)
           or abs(r.get("loss_ratio", 1.0) - 1) > 1e-3
           or abs(r.get("loss_ratio_vs_torch", 1.0) - 1) > 1e-3
           or abs(r.get("loss_ratio_vs_ieee", 1.0) - 1) > 1e-3
           or abs(r.get("loss_ratio_vs_dense", 1.0) - 1) > 1e-3  # (LoRA experts as such or dense)
           or r.get("max_rel_err", 0.0) > 1e-4 or r.get("max_rel_err_tf32x3", 0.0) > 1e-4
           or r.get("max_rel_err_bf16x3", 0.0) > 1e-3  # ~2^-16 of each term
           or r.get("max_rel_err_tf32", 0.0) > 1e-2]  # tf32: operands keep 10 mantissa bits
    result = dict(
        **device_info(device),
        spec=SPEC.to_dict(), blocksize=BLOCKSIZE, experts=N_EXPERTS,
        shapes_note="[d_out, d_in]; d_in is the input width (Hessian d_in x d_in)",
        timing_note="wall clock between torch.cuda.synchronize(); median of the repeats; eager "
                    "warm-up on the first shape only, repeats 3/2/1 by shape",
        rows=rows, failures=len(bad), wall_s=time.perf_counter() - started, partial=partial,
    )
    write_json(json_path, result)
    png_path = os.path.join(args.out, f"solver-{slug}.png")
    try:
        plot(rows, png_path, name)
    except ImportError as e:  # the numbers matter more than the picture
        print(f"bench_solver: no plot ({e})", file=sys.stderr)
    print("== E-PMQ residual precision (the default is 'bf16x3': the fastest of it, tf32x3 and IEEE)")
    for r in rows:
        if r["kind"] == "residual":
            triton = ", ".join(
                f"{p} {1e3 * r[f'triton{_suffix(p)}_s']:6.1f} ms (err "
                f"{r[f'max_rel_err{_suffix(p)}']:.1e})"
                for p in RESIDUAL_PRECISIONS)
            print(f"  {r['shape']:10s} residual x8: torch fp32 {1e3 * r['torch_s']:6.1f} ms, "
                  f"torch tf32 {1e3 * r['torch_tf32_s']:6.1f} ms; triton {triton}")
        if r["kind"] == "epmq_lora_vs_gptq":
            dense = (f" (dense experts {r['dense_ratio']:.2f}x, codes equal {r['codes_equal_vs_dense']:.5f})"
                     if "dense_ratio" in r else "")
            print(f"  {r['shape']:10s} E-PMQ, {r['experts']} LoRA experts of rank {r['rank']}: "
                  f"{r['epmq_s']:.3f} s, {r['ratio']:.2f}x GPTQ{dense}")
        if r["kind"] == "epmq_vs_gptq":
            extra = (f", codes equal to ieee {r['codes_equal_vs_ieee']:.5f}, loss ratio "
                     f"{r['loss_ratio_vs_ieee']:.6f}" if "codes_equal_vs_ieee" in r else "")
            side = "" if r.get("side_stream", True) else ", residuals on the current stream"
            print(f"  {r['shape']:10s} E-PMQ ({r['residual_precision']}, anchor {r['anchor']:g}, "
                  f"{r['fp32_mm']}{side}): {r['epmq_s']:.3f} s, "
                  f"{r['ratio']:.2f}x GPTQ{extra}")
    print(f"wrote {json_path} and {png_path} in {result['wall_s']:.0f} s; {len(bad)} failed checks",
          flush=True)
    if not partial and time.perf_counter() - started < args.profile_if_under:
        from profile_epmq_layer import profile_tables

        profile_path = os.path.join(args.out, f"epmq-layer-profile-{slug}.txt")
        tables = []
        # the default residual, the largest layer first (a few seconds each), then the small
        # one (host-bound, never profiled yet), one more shape while the run is under the
        # threshold, the file rewritten after each: what E-PMQ's time beyond GPTQ's and the
        # products is made of (kernels on the large layers, host time on the small one)
        for shape in ((4096, 14336), (768, 3072), (4096, 4096)):
            if time.perf_counter() - started >= args.profile_if_under:
                break
            try:
                tables.append(profile_tables(shapes=(shape,), precisions=("bf16x3",), rows=25))
            except Terminated:
                print("bench_solver: the time limit stopped the layer profile (results written)",
                      flush=True)
                return 124
            write_text(profile_path, "\n".join(tables))
            print(f"wrote {profile_path} ({len(tables)} shapes) at {time.perf_counter() - started:.0f} s",
                  flush=True)
    return 124 if partial else (1 if bad else 0)


# ----------------------------------------------------------------------------------------------
# pytest-benchmark mode (only under pytest: epmq_lora_cpu.py imports this module as a library,
# where pytest_marks' skip without pytest-benchmark would escape as an error)
# ----------------------------------------------------------------------------------------------
if __name__ != "__main__" and "pytest" in sys.modules:
    import pytest

    pytestmark = pytest_marks()

    @pytest.fixture(scope="module")
    def _layer():
        device = torch.device("cuda")
        W_m, H, experts, hessians = make_layer(4096, 4096, device, n_experts=2)
        return W_m, make_hinv(H), experts, hessians

    @pytest.mark.parametrize("backend", ["triton", "torch"])
    def test_solve_4096(benchmark, _layer, backend):
        W_m, Hinv, _, _ = _layer
        kw = dict(bits=4, sym=False, group_size=128, blocksize=BLOCKSIZE, backend=backend)
        gptq_solve(W_m, Hinv, **kw)  # compile outside the timing

        def run():
            gptq_solve(W_m, Hinv, **kw)
            torch.cuda.synchronize()

        benchmark.pedantic(run, rounds=5 if backend == "triton" else 1, warmup_rounds=0)

    @pytest.mark.parametrize("precision", RESIDUAL_PRECISIONS)
    def test_residual_4096(benchmark, _layer, precision):
        W_m, _, experts, hessians = _layer
        G = torch.zeros_like(W_m)

        def run():
            accumulate_residual_triton(G, experts[0], W_m, hessians[0], 1.0, input_precision=precision)
            torch.cuda.synchronize()

        run()
        benchmark(run)


if __name__ == "__main__":
    sys.exit(main())
