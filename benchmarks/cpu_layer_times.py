"""CPU times of one layer's GPTQ, E-PMQ's work beyond it, and QuantLinear's torch forward.

    python benchmarks/cpu_layer_times.py [--baseline REV] [--d 4096] [--rounds 1]
                                         [--out benchmarks/results/cpu-layer-times.json]

What a user without a GPU waits for, and what E-PMQ adds to GPTQ once its statistics are in
(issue 3 measures the same ratio on a GPU with ``bench_solver.py``):

- ``gptq_s``: ``quant.gptq`` of a ``d x d`` layer, 4-bit group 128 (torch backend);
- ``epmq_extra_s[anchor]``: ``quant.epmq_from_stats`` (2 tasks, statistics given) minus
  ``gptq_s``: the correction ``R``, the larger Hessian's factorization, the loss terms;
- ``qlinear_ms``: one ``QuantLinear`` forward on the torch path (the weight is dequantized per
  call), for ``d x d`` at batch 1, 768 x 3072 at 197 tokens and act-order 768 x 768.

``--baseline REV`` runs the same measurements on git revision REV (extracted with ``git
archive``, imported ahead of any installed copy), in alternating child processes, so that both
come from one machine and one session. Times are the best of 3 calls per child (the machine's
load varies; the GPTQ and E-PMQ calls are interleaved), then the median over rounds.
"""

import argparse
import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    checkout_revision, median_of, positive_int, run_child, versions_side_by_side, write_json,
)

_CHILD = textwrap.dedent(r'''
    import json, time
    import torch
    from epmq import QuantLinear, QuantSpec, quant
    from epmq.stats import EPMQStats

    def best_s(fn, n=3):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    g = torch.Generator().manual_seed(0)
    W = torch.randn(D, D, generator=g) / 64
    X = torch.randn(2 * D, D, generator=g)
    H = X.T @ X
    spec = QuantSpec(4, 128)
    stats = EPMQStats(W, dtype=torch.float64)
    for k in range(2):
        stats.add_task(W + 0.01 * torch.randn(D, D, generator=g) / 64, H * (1 + 0.1 * k))
    runs = {"gptq": lambda: quant.gptq(W, H, spec),
            "0.0": lambda: quant.epmq_from_stats(stats, spec, anchor=0.0),
            "1.0": lambda: quant.epmq_from_stats(stats, spec, anchor=1.0)}
    best = {name: float("inf") for name in runs}
    for _ in range(3):  # interleaved, so that a slow spell of the machine hits all three
        for name, fn in runs.items():
            best[name] = min(best[name], best_s(fn, 1))
    out = {"gptq_s": best["gptq"], "epmq_s": {a: best[a] for a in ("0.0", "1.0")},
           "epmq_extra_s": {a: best[a] - best["gptq"] for a in ("0.0", "1.0")}, "qlinear_ms": {}}
    for name, K, N, M, act in ((f"{D}x{D} batch 1", D, D, 1, False),
                               ("768x3072 197 tokens", 768, 3072, 197, False),
                               ("768x768 act-order 197 tokens", 768, 768, 197, True)):
        Wq = torch.randn(N, K, generator=g)
        Hq = torch.eye(K) + torch.diag(torch.rand(K, generator=g))
        res = quant.gptq(Wq, Hq, QuantSpec(4, 128, act_order=act))
        layer = QuantLinear.from_result(res, torch.randn(N, generator=g))
        x = torch.randn(M, K, generator=g)
        layer(x)
        out["qlinear_ms"][name] = 1e3 * best_s(lambda: layer(x), 5)
    print("RESULT " + json.dumps(out))
''')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", help="git revision to measure as well, in the same run")
    parser.add_argument("--d", type=int, default=4096, help="layer width (default 4096)")
    parser.add_argument("--rounds", type=positive_int, default=1, help="alternating rounds (default 1)")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args(argv)

    runs = versions_side_by_side(args.baseline, args.rounds,
                                 lambda src: run_child(_CHILD, src, D=args.d))
    versions = list(runs)
    result = {name: median_of(rs) for name, rs in runs.items()}
    result["runs"] = runs  # every child's result, in order
    result["machine"] = dict(cpus=os.cpu_count(), python=sys.version.split()[0])
    result["current_revision"] = checkout_revision()
    print(f"\n{'':46s}" + "".join(f"{name:>20s}" for name in versions))
    rows = [(f"GPTQ {args.d}^2 (s)", lambda r: r["gptq_s"])]
    rows += [(f"E-PMQ from statistics, anchor {a} (s)", lambda r, a=a: r["epmq_s"][a])
             for a in ("0.0", "1.0")]
    rows += [(f"E-PMQ beyond GPTQ, anchor {a} (s)", lambda r, a=a: r["epmq_extra_s"][a])
             for a in ("0.0", "1.0")]
    rows += [(f"QuantLinear {k} (ms)", lambda r, k=k: r["qlinear_ms"][k])
             for k in result["current"]["qlinear_ms"]]
    for label, get in rows:
        print(f"{label:46s}" + "".join(f"{get(result[name]):20.3f}" for name in versions))
    if args.out:
        write_json(args.out, dict(d=args.d, rounds=args.rounds, **result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
