"""E-PMQ walks whose experts are files on disk: their weights read in line, or ahead of the walk
by a background thread (``epmq.read_ahead``; ``epmq.walker.EXPERT_READ_AHEAD_BYTES``).

    python benchmarks/expert_read_ahead.py [--hidden 1024] [--intermediate 2816] [--layers 2]
        [--tasks 8] [--samples 2] [--tokens 128] [--rounds 2] [--device cpu|cuda]
        [--out benchmarks/results/expert-read-ahead-<device>.json]

A random Llama (bf16 weights; its experts the weights plus 1% noise, one ``.safetensors`` file
each in a temporary directory), quantized by E-PMQ (4 bits, groups of 128) with the read-ahead
on and off, alternating, ``--rounds`` times each. Before each walk the page cache is dropped
(``/proc/sys/vm/drop_caches``, where this process may write it: ``cold_cache`` says whether it
could), so each walk reads its experts from the disk, as a walk over experts larger than memory
does. Per walk: wall seconds and the report's ``expert_read_seconds`` (what the walk spent on
the experts' weights: reading, or waiting for the read-ahead, and checking them); and whether
both settings quantized every tensor identically.
"""

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _common import device_info, positive_int, write_json  # noqa: E402
from epmq.resume import tensor_digest  # noqa: E402
from bench_walker import build  # noqa: E402


def drop_page_cache() -> bool:
    """Whether the kernel's page cache could be dropped (root, a writable /proc/sys)."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


def walk(model, experts, calibration, device, budget):
    import epmq
    import epmq.walker as walker

    walker.EXPERT_READ_AHEAD_BYTES = budget
    model = copy.deepcopy(model)
    cold = drop_page_cache()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=128), method="epmq",
                        calibration=calibration, experts=experts,
                        device=device if device.type == "cuda" else None, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return dict(walk_s=seconds, expert_read_s=model.epmq_report.expert_read_seconds,
                cold_cache=cold), tensor_digest(sorted(model.state_dict().items()))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=positive_int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"expert-read-ahead-{device.type}.json")
    import epmq.walker as walker
    from safetensors.torch import save_file

    default = walker.EXPERT_READ_AHEAD_BYTES
    model, experts, calibration = build(args, torch.device("cpu"))
    rows, digests = [], {}
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out))) as root:
        files = {}
        for task, state in experts.items():
            files[task] = os.path.join(root, f"{task}.safetensors")
            save_file({k: v.contiguous() for k, v in state.items()}, files[task])
        del experts
        expert_gb = sum(os.path.getsize(f) for f in files.values()) / 1e9
        for r in range(args.rounds):
            for budget in (default, 0) if r % 2 == 0 else (0, default):
                row, digests[budget] = walk(model, files, calibration, device, budget)
                row.update(read_ahead_bytes=budget, round=r)
                rows.append(row)
                print(row, flush=True)
    best = {b: min(r["walk_s"] for r in rows if r["read_ahead_bytes"] == b) for b in (default, 0)}
    machine = device_info(device) if device.type == "cuda" else dict(device="cpu", cpus=os.cpu_count())
    result = dict(args=vars(args), device=machine, experts_on_disk_gb=expert_gb,
                  rows=rows, best_walk_s={"read_ahead": best[default], "in_line": best[0]},
                  speedup=best[0] / best[default], same_model=digests[default] == digests[0])
    write_json(out, result)
    print({k: result[k] for k in ("best_walk_s", "speedup", "same_model", "experts_on_disk_gb")})


if __name__ == "__main__":
    main()
