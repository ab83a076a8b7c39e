"""E-PMQ with LoRA experts on the CPU: given as such (``epmq.LowRankExpert``) or dense.

    python benchmarks/epmq_lora_cpu.py [--shapes 768:3072,1024:4096] [--experts 8] [--rank 16]
                                       [--out benchmarks/results/epmq-lora-cpu.json]

Issue 3 asks E-PMQ with 8 experts for at most 1.5x the time of GPTQ on the same layer.
Dense experts cost one ``d_out x d_in x d_in`` product each for the residual
``sum_k a_k (W_k - W_m) H_k``. LoRA experts ``W_0 + U_k V_k`` of one base cost one such product
for all of them, ``(W_0 - W_m) H_e``, plus products of the rank's size (``epmq.stats``). Per
shape, the best of ``--repeats`` wall times of ``quant.gptq`` (Hessian of the pooled tasks)
and of ``quant.epmq`` (the statistics formed from the 8 Hessians, then solved) with the experts
in either form, torch backend, float64 statistics as on any CPU; and how the two forms' results
agree (codes, loss). The same rows on a GPU: ``bench_solver.py``'s ``epmq_lora_vs_gptq``.
"""

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _common import parse_pairs, write_json  # noqa: E402
from bench_solver import BLOCKSIZE, SPEC, make_layer, make_lora_experts  # noqa: E402
from epmq import quant  # noqa: E402


def best_s(fn, repeats):
    """(best wall seconds of ``repeats`` calls, the last result)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - started)
    return best, out


def measure(d_out, d_in, n_experts, rank, repeats):
    W_m, _, _, hessians = make_layer(d_out, d_in, torch.device("cpu"), n_experts=n_experts)
    lora = make_lora_experts(W_m, rank, n_experts=n_experts)
    dense = [e.dense() for e in lora]
    H_m = sum(hessians)
    kw = dict(blocksize=BLOCKSIZE, backend="torch")
    gptq_s, _ = best_s(lambda: quant.gptq(W_m, H_m, SPEC, **kw), repeats)
    lora_s, res_lora = best_s(lambda: quant.epmq(W_m, lora, hessians, SPEC, **kw), repeats)
    dense_s, res_dense = best_s(lambda: quant.epmq(W_m, dense, hessians, SPEC, **kw), repeats)
    return dict(shape=f"{d_out}x{d_in}", experts=n_experts, rank=rank, gptq_s=gptq_s,
                epmq_lora_s=lora_s, epmq_dense_s=dense_s, lora_ratio=lora_s / gptq_s,
                dense_ratio=dense_s / gptq_s, lora_speedup=dense_s / lora_s,
                codes_equal=float((res_lora.codes == res_dense.codes).double().mean()),
                loss_ratio=res_lora.loss / res_dense.loss)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="768:3072,1024:4096", help="d_out:d_in, comma separated")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "epmq-lora-cpu.json"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows = []
    for d_out, d_in in parse_pairs(args.shapes, []):
        rows.append(measure(d_out, d_in, args.experts, args.rank, args.repeats))
        r = rows[-1]
        print(f"{r['shape']:10s} GPTQ {r['gptq_s']:.2f} s; E-PMQ, {r['experts']} LoRA experts of rank "
              f"{r['rank']}: as such {r['epmq_lora_s']:.2f} s ({r['lora_ratio']:.2f}x GPTQ), dense "
              f"{r['epmq_dense_s']:.2f} s ({r['dense_ratio']:.2f}x); codes equal {r['codes_equal']:.5f}, "
              f"loss ratio {r['loss_ratio']:.8f}", flush=True)
    write_json(args.out, dict(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                              torch=torch.__version__, threads=torch.get_num_threads(),
                              command=" ".join(["python", "benchmarks/" + os.path.basename(__file__),
                                                *(argv if argv is not None else sys.argv[1:])]),
                              rows=rows, wall_s=time.perf_counter() - started))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
