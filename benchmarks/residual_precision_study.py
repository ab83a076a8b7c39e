"""What the precision of the expert residual does to E-PMQ (CPU, no GPU needed).

    python benchmarks/residual_precision_study.py [--shapes 768:3072,3072:768] [--bits 4,2]
        [--anchors 0,0.1] [--out benchmarks/results/residual-precision-cpu.json]

E-PMQ's statistics ``G = sum_k a_k (W_k - W_m) H_k`` cost 8 GEMMs of the layer's size for 8
experts, most of E-PMQ's time on a GPU (benchmarks/results). Tensor cores would cut that
several-fold, at the price of rounding the operands. This study computes ``G`` as each GPU
product would, emulated exactly in torch, and runs the same E-PMQ solve (fp64 statistics, torch) on each:

    fp64        the reference (the CPU statistics)
    fp32        IEEE fp32 operands and sums (residual_precision="ieee")
    tf32        operands rounded to TF32 (10 mantissa bits, to nearest), fp32 sums: "tf32"
    tf32-trunc  the same with truncated operands (if the hardware drops the low bits)
    bf16        operands rounded to bf16 (7 bits): a coarser product, for contrast
    tf32x3      three TF32 products of operands split into a TF32 part and its remainder
                ("tf32x3" on cuBLAS), the conversion emulated by truncation, fp32 sums
    bf16x3      three bf16 products of operands split into two bf16 parts ("bf16x3", Triton's
                decomposition and cuBLAS's), products exact, fp32 sums

Each of those solves with R = G H~^{-1} and the anchor term in IEEE fp32 (the torch backend). On a
GPU the Triton backend lets them run as fast as the residual's precision allows, never below
bf16x3 (``quant._fp32_floor``); the rows ``<G's product>, R bf16x3`` take them in bf16x3 too.

For each it reports how far ``G`` and the target ``W*`` move, the fraction of grid codes that
change, and the true E-PMQ objective (expert term evaluated with the fp64 statistics, plus the
anchor term) relative to the fp64 run, next to what E-PMQ gains over GPTQ on the same layer.
Layers: a merged weight with 8 experts around it and ill-conditioned task Hessians (the layer
of benchmarks/bench_layer_solvers.py), the experts ``--spread`` (default 10%) of the weights'
scale away from the merge, so that E-PMQ gains clearly over GPTQ.
"""

import argparse
import copy
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import anchor_list, bit_widths, int_tuples, write_json, write_text  # noqa: E402
from bench_layer_solvers import layer  # noqa: E402

from epmq import QuantSpec, quant  # noqa: E402
from epmq.stats import EPMQStats  # noqa: E402
from epmq_kernels._runtime import (bf16_mm_emulated, bf16x3_mm, tf32_round, tf32_truncate,  # noqa: E402
                                   tf32x3_mm)


def _bf16(x):
    return x.float().bfloat16().float()


def _rounded(rounding):
    return lambda D, H: rounding(D) @ rounding(H)


def _tf32_mm(A, B):
    return tf32_truncate(A) @ tf32_truncate(B)


# each emulates one way of forming the fp32 product D @ H_k
PRODUCTS = {"fp32": _rounded(lambda x: x.float()), "tf32": _rounded(tf32_round),
            "tf32-trunc": _rounded(tf32_truncate), "bf16": _rounded(_bf16),
            "tf32x3": lambda D, H: tf32x3_mm(D, H, mm=_tf32_mm),
            "bf16x3": lambda D, H: bf16x3_mm(D, H, mm=bf16_mm_emulated)}


# E-PMQ's other large products (R = G H~^{-1} and the anchor term), for variants "<G>, R <R>":
# what the Triton backend runs on a GPU, where each residual precision sets their floor
# (quant._fp32_floor: "bf16x3" for the default and for "tf32"); the others take IEEE fp32
# (bf16x3_mm itself: E-PMQ's split_once then takes it as the GPU does, two GEMMs of side-by-side
# split operands per block, bf16_mm_emulated's products on the CPU)
R_PRODUCTS = {"bf16x3": bf16x3_mm}
R_VARIANTS = [("bf16x3", "bf16x3"), ("tf32", "bf16x3")]  # (G's product, R's)


def residual(W_m, experts, hessians, weights, product):
    """``sum_k a_k (W_k - W_m) H_k`` with each product formed by ``product``, summed in fp32."""
    G = torch.zeros(W_m.shape, dtype=torch.float32)
    for W_k, H_k, a in zip(experts, hessians, weights):
        G.add_(product(W_k.float() - W_m.float(), H_k.float()), alpha=a)
    return G.double()


def expert_objective(Q, stats, G_exact):
    """``sum_k a_k ||(Q - W_k) X_k||^2`` from the fp64 statistics."""
    E = (Q.double() - stats.W_merged.double())
    return float((E @ stats.H_e * E).sum()) - 2 * float((E * G_exact).sum()) + stats.c_e


def study(d_out, d_in, bits_list, anchors, group_size, spread, bar):
    W_m, experts, _, hessians = layer(d_out, d_in)
    # the bench layer's experts lie 1% from the merge; real task vectors are larger
    experts = [W_m + (spread / 0.01) * (W_k - W_m) for W_k in experts]
    stats = EPMQStats(W_m, dtype=torch.float64, backend="torch")
    for W_k, H_k in zip(experts, hessians):
        stats.add_task(W_k, H_k)
    G_exact = stats.G_e.clone()
    variants = {"fp64": (G_exact, None)}
    for name, product in PRODUCTS.items():
        variants[name] = (residual(W_m, experts, hessians, stats.task_weights, product), None)
    for g_name, r_name in R_VARIANTS:
        variants[f"{g_name}, R {r_name}"] = (variants[g_name][0], R_PRODUCTS[r_name])
    rows = []
    for bits in bits_list:
        spec = QuantSpec(bits=bits, group_size=group_size)
        gptq_Q = quant.gptq(W_m, stats.H_m, spec, backend="torch").weight
        E_gptq = gptq_Q.double() - W_m.double()
        for anchor in anchors:
            base = None
            for name, (G, r_mm) in variants.items():
                patched = copy.copy(stats)
                patched.G_e = G
                saved = quant.fp32_mm
                if r_mm is not None:  # (the torch backend's IEEE products replaced)
                    quant.fp32_mm = lambda device, floor, r_mm=r_mm: r_mm
                try:
                    result = quant.epmq_from_stats(patched, spec, anchor=anchor, backend="torch")
                finally:
                    quant.fp32_mm = saved
                # (the anchor term in float64 here: the solver's own value is from R's product)
                E = result.weight.double() - W_m.double()
                loss = (expert_objective(result.weight, stats, G_exact)
                        + result.info["lam_effective"] * float((E @ stats.H_m.double() * E).sum()))
                if base is None:
                    # GPTQ's Q under the same objective (expert term + the same anchor term)
                    lam = result.info["lam_effective"]
                    gptq_loss = (expert_objective(gptq_Q, stats, G_exact)
                                 + lam * float((E_gptq @ stats.H_m.double() * E_gptq).sum()))
                    base = result, loss
                ref, ref_loss = base
                correction = (ref.target.double() - W_m.double()).norm()
                rows.append(dict(
                    shape=f"{d_out}x{d_in}", bits=bits, group_size=group_size, anchor=anchor,
                    product=name,
                    G_rel_err=float((G - G_exact).norm() / G_exact.norm()),
                    target_move_rel_correction=float(
                        (result.target.double() - ref.target.double()).norm() / correction),
                    codes_changed=float((result.codes != ref.codes).double().mean()),
                    objective=loss,
                    objective_rel_change=(loss - ref_loss) / ref_loss,
                    gptq_expert_objective=gptq_loss,
                    change_per_epmq_gain=(loss - ref_loss) / (gptq_loss - ref_loss),
                ))
                bar.update(1)
    return rows


def table(rows):
    lines = ["| layer | bits | anchor | product | G rel. err | W* move / ‖R‖ | codes changed "
             "| objective change | share of E-PMQ's gain over GPTQ |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['bits']} | {r['anchor']} | {r['product']} | "
                     f"{r['G_rel_err']:.1e} | {r['target_move_rel_correction']:.1e} | "
                     f"{100 * r['codes_changed']:.2f}% | {r['objective_rel_change']:+.1e} | "
                     f"{r['change_per_epmq_gain']:+.1e} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", type=int_tuples("d_out:d_in"), default="",
                        help="d_out:d_in,... (default 768:3072,3072:768)")
    parser.add_argument("--bits", type=bit_widths, default="4,2")
    parser.add_argument("--anchors", type=anchor_list, default="0,0.1")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--spread", type=float, default=0.1,
                        help="experts' distance from the merge, relative to the weights' scale")
    parser.add_argument("--out", default="benchmarks/results/residual-precision-cpu.json")
    args = parser.parse_args(argv)
    shapes = args.shapes or [(768, 3072), (3072, 768)]
    bits, anchors = args.bits, args.anchors
    started = time.perf_counter()
    rows = []
    total = len(shapes) * len(bits) * len(anchors) * (1 + len(PRODUCTS) + len(R_VARIANTS))
    with tqdm(total=total, desc="E-PMQ solves") as bar:
        for d_out, d_in in shapes:
            rows += study(d_out, d_in, bits, anchors, args.group_size, args.spread, bar)
    text = table(rows)
    print(text)
    result = dict(command=" ".join(["python", "benchmarks/residual_precision_study.py"]
                                   + (argv if argv is not None else sys.argv[1:])),
                  torch=torch.__version__, seconds=round(time.perf_counter() - started, 1),
                  rows=rows)
    write_json(args.out, result)
    # (atomically, as the JSON: stopped while writing, the previous table is left whole)
    write_text(os.path.splitext(args.out)[0] + ".md", f"`{result['command']}` (CPU, torch {torch.__version__}, "
                                                      f"{result['seconds']} s)\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
