"""Whole-model quantization on one GPU: a Llama-shaped model held in CPU memory, its blocks
quantized on the GPU one at a time (``quantize_model(device="cuda")``), by GPTQ and by E-PMQ
with 8 experts; GPTQ with the model wholly on the GPU beside them.

    python benchmarks/bench_walker.py --out benchmarks/results [--hidden 4096]
        [--intermediate 14336] [--layers 2] [--tasks 8] [--samples 2] [--tokens 2048]
        [--device cuda]

What issue 3's per-layer ratio (``bench_solver.py``) becomes for a whole walk: the statistics
(``X^T X`` per shared input and task, E-PMQ's expert residuals), the factorizations, the fused
solves, the partial block forwards of true-sequential grouping and, with the model in CPU
memory, the blocks' trips to the GPU. Random weights (bf16), experts = weights + 1% noise (state
dicts in CPU memory), ``--tasks`` tasks of ``--samples`` sequences of ``--tokens`` random tokens;
4 bits, groups of 128.

Each walk runs twice on a fresh copy of the model and the second is timed: the first tunes the
kernels for these shapes (the choices are cached on disk). Per walk: wall-clock seconds, the
solvers' share (the report's per-layer seconds), peak GPU memory, the total layer loss. The
JSON (``walker-<card>.json``) is rewritten after every walk, so a run cut short keeps what it
measured. ``--device cpu`` runs the same on the CPU (small shapes: a check of the script).
``--profile-host-if-under S``: where the E-PMQ walk's host time goes (a third walk under
cProfile, its top functions in the JSON as ``epmq_host_profile``), if the walks left time.
``--in-line-reads-if-under S``: then, if the run has taken under S seconds, the timed E-PMQ walk
once more with the experts' weights read in line (``epmq.walker.EXPERT_READ_AHEAD_BYTES = 0``):
``read_ahead_speedup``, what reading them ahead in pinned memory (``epmq.read_ahead``) saves.
``--lora-if-under S``: then, if the run has taken under S seconds, an E-PMQ walk (timed: the
dense walks tuned the kernels for these shapes) whose experts are ``--tasks`` PEFT-format LoRA
adapters of rank 16 on every linear of the model taken as their base (the merged model their
task arithmetic): what the low-rank route (``epmq.LowRankExpert``, one residual product a
layer) makes of the walk's ratio to GPTQ (``epmq_lora_over_gptq``).
"""

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import attention_heads, device_info, no_cuda, write_json  # noqa: E402


def build(args, device):
    """The merged model (bf16, CPU memory), the experts' state dicts and the calibration."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads, kv_heads = attention_heads(args.hidden, 128, 4)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=8192,
                         max_position_embeddings=args.tokens)
    torch.manual_seed(0)
    with torch.device(device):  # random init where it is fast
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    g = torch.Generator(device=device).manual_seed(1)
    experts = {}
    for t in range(args.tasks):
        experts[f"task{t}"] = {
            k: (v + 0.01 * v.float().std() * torch.randn(v.shape, generator=g, device=device,
                                                         dtype=v.dtype)).cpu()
            for k, v in model.state_dict().items()
        }
    gc = torch.Generator().manual_seed(2)
    calibration = {t: [torch.randint(0, 8192, (1, args.tokens), generator=gc) for _ in range(args.samples)]
                   for t in experts}
    return model.cpu(), experts, calibration


def walk(model, method, experts, calibration, device, offload):
    import epmq

    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    model = model.to(device) if not offload else model
    t0 = time.perf_counter()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=128), method=method,
                        calibration=calibration, experts=experts if method == "epmq" else None,
                        device=device if offload else None, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    layers = model.epmq_report.layers
    return dict(
        walk_s=seconds,
        solver_s=sum(layer["seconds"] for layer in layers),
        layers=len(layers),
        shared_hessians=sum("hessian_of" in layer for layer in layers),
        loss=sum(layer["loss"] for layer in layers),
        peak_gpu_gb=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        expert_read_s=model.epmq_report.expert_read_seconds,
    )


def in_line_walk(merged, experts, calibration, device, result, path):
    """The E-PMQ walk (timed) with the experts' weights read in line, not ahead of the walk in
    pinned memory (``EXPERT_READ_AHEAD_BYTES = 0``): ``read_ahead_speedup``, what the read-ahead
    makes of the walk."""
    import epmq.walker as walker

    default = walker.EXPERT_READ_AHEAD_BYTES
    walker.EXPERT_READ_AHEAD_BYTES = 0
    try:
        row = walk(copy.deepcopy(merged), "epmq", experts, calibration, device, True)
    finally:
        walker.EXPERT_READ_AHEAD_BYTES = default
    print(f"epmq, experts read in line, timed: {row}", flush=True)
    result["rows"].append(dict(method="epmq_in_line_reads", offload=True, attempt="timed", **row))
    ahead = [r for r in result["rows"] if (r["method"], r["offload"], r["attempt"]) == ("epmq", True, "timed")]
    if ahead:
        result["read_ahead_speedup"] = row["walk_s"] / ahead[0]["walk_s"]
    write_json(path, result)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=8, help="tasks, one expert each")
    parser.add_argument("--samples", type=int, default=2, help="sequences per task")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--profile-host-if-under", type=float, default=None, metavar="S",
                        help="if the walks took under S seconds, walk E-PMQ (blocks visiting the device) "
                             "once more under cProfile: where its host time goes, into the JSON")
    parser.add_argument("--in-line-reads-if-under", type=float, default=None, metavar="S",
                        help="if the run took under S seconds, the E-PMQ walk once more with the experts "
                             "read in line (no read-ahead)")
    parser.add_argument("--lora-if-under", type=float, default=None, metavar="S",
                        help="if the run took under S seconds, E-PMQ walks on LoRA adapters as experts")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and no_cuda("bench_walker.py"):
        return 0
    info = device_info(device) if device.type == "cuda" else dict(device="cpu")
    slug = "".join(c if c.isalnum() else "-" for c in info["device"].lower()).strip("-")
    path = os.path.join(args.out, f"walker-{slug}.json")
    t0 = time.perf_counter()
    merged, experts, calibration = build(args, device)
    # partial until the last walk: the JSON is rewritten after every walk (warm-ups included),
    # so a step cut short by the suite's time limit still leaves what it measured
    result = dict(info, args=vars(args), build_s=time.perf_counter() - t0, rows=[], partial=True)
    print(f"built the model and {args.tasks} experts in {result['build_s']:.1f} s", flush=True)
    write_json(path, result)
    for method, offload in (("gptq", True), ("epmq", True), ("gptq", False)):
        for attempt in ("warm-up", "timed"):
            row = walk(copy.deepcopy(merged), method, experts, calibration, device, offload)
            print(f"{method} ({'blocks visit the device' if offload else 'model on the device'}), "
                  f"{attempt}: {row}", flush=True)
            result["rows"].append(dict(method=method, offload=offload, attempt=attempt, **row))
            timed = {(r["method"], r["offload"]): r for r in result["rows"] if r["attempt"] == "timed"}
            if ("gptq", True) in timed and ("epmq", True) in timed:
                result["epmq_over_gptq"] = timed["epmq", True]["walk_s"] / timed["gptq", True]["walk_s"]
            write_json(path, result)
    if args.profile_host_if_under is not None and time.perf_counter() - t0 < args.profile_host_if_under:
        result["epmq_host_profile"] = host_profile(merged, experts, calibration, device)
        print(result["epmq_host_profile"], flush=True)
    if args.in_line_reads_if_under is not None and time.perf_counter() - t0 < args.in_line_reads_if_under:
        in_line_walk(merged, experts, calibration, device, result, path)
    if args.lora_if_under is not None and time.perf_counter() - t0 < args.lora_if_under:
        del experts  # (the dense experts' memory, for the adapters' merged model)
        lora_walk(merged, calibration, device, result, path)
    result["partial"] = False
    write_json(path, result)
    lora = (f", on LoRA adapters {result['epmq_lora_over_gptq']:.2f}" if "epmq_lora_over_gptq" in result
            else "")
    print(f"E-PMQ / GPTQ walk time: {result['epmq_over_gptq']:.2f}{lora}; wrote {path}")
    return 0


def lora_walk(base, calibration, device, result, path, rank=16):
    """An E-PMQ walk (blocks visiting the device) whose experts are LoRA adapters of ``base``
    written in PEFT's files, the model their task arithmetic; its row into ``result`` (``method:
    epmq_lora``; no warm-up: the dense walks before it tuned the kernels for these shapes)."""
    import tempfile

    from epmq_lora_cpu import adapters_and_merge

    tasks = list(calibration)
    with tempfile.TemporaryDirectory() as tmp:
        adapters, merged = adapters_and_merge(base, tmp, tasks, rank)  # (the walk quantizes merged)
        try:
            row = walk(merged, "epmq", adapters, calibration, device, True)
        finally:
            for expert in adapters.values():
                expert.close()
    print(f"epmq on {len(tasks)} LoRA adapters of rank {rank}, timed: {row}", flush=True)
    result["rows"].append(dict(method="epmq_lora", offload=True, attempt="timed", rank=rank, **row))
    gptq = [r for r in result["rows"] if (r["method"], r["offload"], r["attempt"]) == ("gptq", True, "timed")]
    if gptq:
        result["epmq_lora_over_gptq"] = row["walk_s"] / gptq[0]["walk_s"]
    write_json(path, result)


def host_profile(merged, experts, calibration, device, top=30):
    """The E-PMQ walk (blocks visiting ``device``) once more under cProfile: the functions that
    take the most host time, cumulative, as text (the GPU's own work shows where the host waits
    for it: synchronizing calls). Not a timing: cProfile slows the Python side."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    walk(copy.deepcopy(merged), "epmq", experts, calibration, device, True)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    return text.getvalue()


if __name__ == "__main__":
    sys.exit(main())
