"""Our GPTQ side by side with the reference implementation (IST-DASLab/gptq), same layer, same H.

    git clone https://github.com/IST-DASLab/gptq /tmp/gptq-reference   # the peer, not shipped
    python benchmarks/side_by_side_gptq.py --reference-dir /tmp/gptq-reference \
        [--shapes 768:3072,3072:768] [--out benchmarks/results/gptq-side-by-side-cpu.json]

The reference's ``GPTQ`` class (``gptq.py``) and ``Quantizer`` (``quant.py``) are imported from
that checkout at run time; nothing of it is copied here. Both quantize the same weight with the
same Hessian (handed to the reference as its ``H``), with the options that mean the same thing:

    ours: QuantSpec(bits, group_size, sym, act_order, static_groups), blocksize, percdamp
    reference: Quantizer.configure(bits, perchannel=True, sym, mse=False);
               fasterquant(blocksize, percdamp, groupsize, actorder, static_groups)

For each configuration it reports the fraction of live weights (columns the calibration data
exercises) that come out identical, the largest difference in grid steps (a step is the weight's
group scale), the layer loss ``tr((Q - W) H (Q - W)^T)`` of each, and the CPU time of each.
Where the two may differ, and why:

- a weight on a rounding tie (float32 noise decides; the symmetric grid puts each group's most
  negative weight exactly on one); the error feedback then carries the difference along the row;
- the damping, wherever there are dead columns: the reference's percdamp multiplies a mean
  diagonal that counts each of them as 1, ours the live columns' mean (per output channel, at
  the reference's damping, the weights are identical);
- groups with dead columns (features that never fire): the reference fits a group's grid
  after it zeroes them (per output channel, before: there the grids agree); ours fits every
  grid with them, as RTN does, and rounds them on it rather than storing 0;
- dynamic groups smaller than the block (64 here, blocks of 128): the reference fits the grid of a group
  that starts inside a block to weights that lack the updates of the block's earlier columns;
  ours fits it to the updated weights, what the unblocked column loop sees.

The second table compares our own static and dynamic groups: the error feedback moves weights,
so grids fitted to the updated weights are wider than grids fitted to the original ones.
"""

import argparse
import contextlib
import io
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import int_tuples, write_json  # noqa: E402

from epmq import QuantSpec, quant  # noqa: E402

CONFIGS = [  # (bits, group_size, sym, act_order, static_groups)
    (4, 128, False, False, False),
    (4, -1, False, False, False),
    (4, 128, True, False, False),
    (3, 128, False, True, False),
    (4, 128, False, True, True),
    (2, 128, False, False, False),
    (4, 64, False, False, False),
    (2, 64, False, False, False),
]
# ours alone: the loss with static groups (grids from the original weights) over the loss with
# dynamic groups (grids from the error-corrected weights), no act-order
GRID_STUDY = [(bits, group_size) for bits in (2, 3, 4) for group_size in (64, 128)]


def layer(d_out, d_in, seed=0):
    """A weight ~ N(0, 1/d_in) and H = X^T X over 2 d_in tokens with log-normal feature scales
    (and a few dead features, which both must handle)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    X = torch.randn(2 * d_in, d_in, generator=g) * torch.exp(torch.randn(d_in, generator=g))
    X[:, :3] = 0
    return W, X.T @ X


def run_reference(module, W, H, bits, group_size, sym, act_order, static_groups):
    linear = nn.Linear(W.shape[1], W.shape[0], bias=False)
    linear.weight.data = W.clone()
    solver = module.GPTQ(linear)
    solver.H = H.clone()
    solver.quantizer = module.Quantizer()
    solver.quantizer.configure(bits, perchannel=True, sym=sym, mse=False)
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its time and error
        solver.fasterquant(blocksize=128, percdamp=0.01, groupsize=group_size, actorder=act_order,
                           static_groups=static_groups)
    return linear.weight.data.clone(), time.perf_counter() - started


def loss(Q, W, H):
    E = (Q.double() - W.double())
    return float((E @ H.double() * E).sum())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reference-dir", required=True, help="a checkout of IST-DASLab/gptq")
    parser.add_argument("--shapes", type=int_tuples("d_out:d_in"), default="",
                        help="d_out:d_in,... (default 768:3072,3072:768)")
    parser.add_argument("--out", default="benchmarks/results/gptq-side-by-side-cpu.json")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.reference_dir, "gptq.py")):
        print(f"side_by_side_gptq: {args.reference_dir} holds no gptq.py: give a checkout of "
              f"IST-DASLab/gptq as --reference-dir", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.abspath(args.reference_dir))
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None  # the reference syncs unconditionally
    with contextlib.redirect_stdout(io.StringIO()):  # "CUDA extension not installed."
        import gptq as module  # noqa: E402  (the reference's gptq.py, which star-imports quant.py)

    rows, grid_rows = [], []
    for d_out, d_in in args.shapes or [(768, 3072), (3072, 768)]:
        W, H = layer(d_out, d_in)
        for bits, group_size, sym, act_order, static_groups in CONFIGS:
            spec = QuantSpec(bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                             static_groups=static_groups)
            Q_ref, t_ref = run_reference(module, W, H, bits, group_size, sym, act_order,
                                         static_groups)
            started = time.perf_counter()
            ours = quant.gptq(W, H, spec, blocksize=128, percdamp=0.01, backend="torch")
            t_ours = time.perf_counter() - started
            Q = ours.weight
            steps = (Q - Q_ref).abs() / ours.scales[:, ours.g_idx.long()].abs().clamp_min(1e-30)
            live = H.diagonal() > 0  # (a dead column: the reference stores 0, ours its weight rounded)
            row = dict(shape=f"{d_out}x{d_in}", bits=bits, group_size=group_size, sym=sym,
                       act_order=act_order, static_groups=static_groups,
                       identical=float((steps[:, live] < 1e-3).double().mean()),
                       max_steps=float(steps[:, live].max()),
                       loss_ours=loss(Q, W, H), loss_reference=loss(Q_ref, W, H),
                       seconds_ours=round(t_ours, 3), seconds_reference=round(t_ref, 3))
            row["loss_ratio"] = row["loss_ours"] / row["loss_reference"]
            rows.append(row)
            print(json.dumps(row), flush=True)
        for bits, group_size in GRID_STUDY:
            losses = {}
            for static in (False, True):
                spec = QuantSpec(bits=bits, group_size=group_size, static_groups=static)
                losses[static] = loss(quant.gptq(W, H, spec, backend="torch").weight, W, H)
            row = dict(shape=f"{d_out}x{d_in}", bits=bits, group_size=group_size,
                       loss_static_over_dynamic=losses[True] / losses[False])
            grid_rows.append(row)
            print(json.dumps(row), flush=True)
    result = dict(command=" ".join(["python", "benchmarks/side_by_side_gptq.py"]
                                   + (argv if argv is not None else sys.argv[1:])),
                  reference="IST-DASLab/gptq", torch=torch.__version__,
                  threads=torch.get_num_threads(), rows=rows, static_vs_dynamic_groups=grid_rows)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
