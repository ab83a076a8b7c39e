"""E-PMQ with full-precision-path inputs on the demo benchmark (CPU, after `epmq demo`: 3 to 5
min on 2 cores, 335 s of CPU time).

    python benchmarks/demo_epmq_fp_path.py [--out benchmarks/results/demo-epmq-fp-path-cpu.json]

`epmq demo` compares E-PMQ (merged-path calibration: targets from the experts, inputs from the
quantized model) with GPTQ under full-precision-path targets (asymmetric calibration, no
experts). This runs the combination, E-PMQ with ``targets="fp_path"`` (the experts' targets and
the anchor on the full-precision merged model's own activations), on the same merges, bits and
anchors, the anchor chosen on the validation split as the demo does. Per-channel grids.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bit_widths, demo_run, write_json  # noqa: E402

from epmq import QuantSpec, quantize_model  # noqa: E402
from epmq.demo import prepare  # noqa: E402
from epmq.demo.benchmark import DEFAULT_SCALES  # noqa: E402
from epmq.demo.plan import ANCHORS  # noqa: E402
from epmq.pipeline import MergePlan, choose_scale  # noqa: E402

MERGES = [MergePlan("task_arithmetic", DEFAULT_SCALES["task_arithmetic"]),
          MergePlan("ties", DEFAULT_SCALES["ties"],
                    params={"density": 0.2, "scope": "global", "merge": "mean"})]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bits", type=bit_widths, default="4,3,2")
    parser.add_argument("--out", default="benchmarks/results/demo-epmq-fp-path-cpu.json")
    args = parser.parse_args(argv)
    bench = prepare()
    experts = {t: bench.experts[t] for t in bench.task_names}
    rows = []
    for mp in MERGES:
        scale, merged, _ = choose_scale(bench, mp)
        for bits in args.bits:
            runs = []
            for anchor in ANCHORS:
                model = bench.model(merged)
                quantize_model(model, QuantSpec(bits=bits, group_size=-1), method="epmq",
                               targets="fp_path", calibration=bench.calibration, experts=experts,
                               anchor=anchor, progress=False)
                runs.append(dict(anchor=anchor,
                                 val=100 * bench.evaluate(model, split="val")["avg"],
                                 test=100 * bench.evaluate(model, split="test")["avg"]))
            best = max(runs, key=lambda r: r["val"])
            rows.append(dict(merge=mp.method, scale=scale, bits=bits, chosen_anchor=best["anchor"],
                             test=round(best["test"], 1), runs=runs))
            print(f"{mp.method:16s} w{bits}: E-PMQ fp-path {best['test']:.1f} "
                  f"(anchor {best['anchor']:g}, chosen on val)", flush=True)
    write_json(args.out, dict(**demo_run(__file__, argv, bench), rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
