"""E-PMQ with LoRA experts on the CPU: given as such (``epmq.LowRankExpert``) or dense.

    python benchmarks/epmq_lora_cpu.py [--shapes 768:3072,1024:4096] [--experts 8] [--rank 16]
                                       [--walk HIDDEN:INTERMEDIATE:LAYERS]
                                       [--out benchmarks/results/epmq-lora-cpu.json]

Issue 3 asks E-PMQ with 8 experts for at most 1.5x the time of GPTQ on the same layer.
Dense experts cost one ``d_out x d_in x d_in`` product each for the residual
``sum_k a_k (W_k - W_m) H_k``. LoRA experts ``W_0 + U_k V_k`` of one base cost one such product
for all of them, ``(W_0 - W_m) H_e``, plus products of the rank's size (``epmq.stats``). Per
shape, the best of ``--repeats`` wall times of ``quant.gptq`` (Hessian of the pooled tasks)
and of ``quant.epmq`` (the statistics formed from the 8 Hessians, then solved) with the experts
in either form, torch backend, float64 statistics as on any CPU; and how the two forms' results
agree (codes, loss). The same rows on a GPU: ``bench_solver.py``'s ``epmq_lora_vs_gptq``.

``--walk``: also whole ``quantize_model`` walks of a random Llama (fp32) whose 8 experts are
PEFT-format LoRA adapters on every linear, written here, the merged model their task
arithmetic (0.3): GPTQ, and E-PMQ with the experts as adapters (``epmq.LoraExpert``: the
low-rank route) and as the same experts saved whole (``.safetensors``: dense), 2 x 2 x 128
tokens of calibration per task.
"""

import argparse
import copy
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _common import attention_heads, int_tuples, positive_int, write_json  # noqa: E402
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


LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def write_adapters(base, directory, n_experts, rank, seed=3):
    """``n_experts`` LoRA adapters of ``base`` on every linear of its blocks, in PEFT's files
    (lora_alpha = r: scale 1); returns their directories and the merged weights (0.3 of the
    updates' sum added to the base's, rounded once to its dtype)."""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = base.state_dict()
    merged = {k: v.clone() for k, v in state.items()}
    stds = {}  # (each base weight's spread, which the updates are scaled by)
    updates = {}  # module -> [(B, A)] of every adapter, summed into the merge at the end
    dirs = []
    for t in range(n_experts):
        tensors = {}
        for i in range(base.config.num_hidden_layers):
            for linear in LINEARS:
                module = f"model.layers.{i}.{linear}"
                W = state[f"{module}.weight"]
                std = stds.setdefault(module, float(W.float().std()))
                A = torch.randn(rank, W.shape[1], generator=g) / W.shape[1] ** 0.5
                B = 0.05 * torch.randn(W.shape[0], rank, generator=g) * std * W.shape[1] ** 0.5 / rank ** 0.5
                tensors[f"base_model.model.{module}.lora_A.weight"] = A
                tensors[f"base_model.model.{module}.lora_B.weight"] = B
                updates.setdefault(module, []).append((B, A))
        path = os.path.join(directory, f"adapter{t}")
        os.makedirs(path, exist_ok=True)
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump(dict(peft_type="LORA", r=rank, lora_alpha=rank,
                           target_modules=[m.split(".")[-1] for m in LINEARS]), f)
        dirs.append(path)
    for module, parts in updates.items():  # (the updates' sum as one product of rank n r)
        key = f"{module}.weight"
        B = torch.cat([B for B, _ in parts], dim=1)
        A = torch.cat([A for _, A in parts], dim=0)
        merged[key] = torch.addmm(merged[key].float(), B, A, alpha=0.3).to(merged[key].dtype)
    return dirs, merged


def adapters_and_merge(base, directory, tasks, rank):
    """``(adapters, merged)``: a ``epmq.LoraExpert`` per task in ``tasks``, written by
    :func:`write_adapters` into ``directory`` on ``base`` (a model, not written to), and a copy of
    ``base`` holding their task arithmetic."""
    import epmq

    dirs, merged_state = write_adapters(base, directory, len(tasks), rank)
    merged = copy.deepcopy(base)
    merged.load_state_dict(merged_state)
    adapters = {task: epmq.LoraExpert(d, base=base.state_dict()) for task, d in zip(tasks, dirs)}
    return adapters, merged


def measure_walks(hidden, intermediate, layers, n_experts, rank, repeats):
    """Seconds of whole walks (best of ``repeats``): GPTQ, E-PMQ on adapters, E-PMQ on dense."""
    import tempfile

    import epmq
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads, kv_heads = attention_heads(hidden, 64, 4)
    base = LlamaForCausalLM(LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads,
        vocab_size=2048, max_position_embeddings=256)).eval()
    g = torch.Generator().manual_seed(4)
    with tempfile.TemporaryDirectory() as tmp:
        adapters, merged = adapters_and_merge(base, tmp, [f"task{t}" for t in range(n_experts)], rank)
        dense = {}  # (the same experts saved whole, read from files as the adapters are)
        from safetensors.torch import save_file

        for task, expert in adapters.items():
            dense[task] = os.path.join(tmp, f"{task}.safetensors")
            save_file({k: v.contiguous() for k, v in dict(expert).items()}, dense[task])
        calibration = {task: [torch.randint(0, 2048, (2, 128), generator=g) for _ in range(2)]
                       for task in adapters}
        spec = epmq.QuantSpec(bits=4, group_size=128)

        def walk(method, experts):
            model = copy.deepcopy(merged)
            epmq.quantize_model(model, spec, method=method, calibration=calibration, experts=experts,
                                progress=False)
            return model

        runs = {"gptq": lambda: walk("gptq", None), "epmq_lora": lambda: walk("epmq", adapters),
                "epmq_dense": lambda: walk("epmq", dense)}
        best, models = dict.fromkeys(runs, float("inf")), {}
        for _ in range(repeats):  # (interleaved: a slow spell of the machine hits all three)
            for name, run in runs.items():
                seconds, models[name] = best_s(run, 1)
                best[name] = min(best[name], seconds)
        a, b = models["epmq_lora"].state_dict(), models["epmq_dense"].state_dict()
        words = [k for k in a if k.endswith("qweight")]
        changed = sum(int((a[k] != b[k]).sum()) for k in words) / sum(a[k].numel() for k in words)
        low_rank = [layer.get("low_rank_tasks", 0) for layer in models["epmq_lora"].epmq_report.layers]
        # (GPTQ's codes flip at rounding ties and the flips travel down the row and into later
        # blocks: the objective, summed over the layers, says more than the codes)
        losses = {name: sum(layer["loss"] for layer in models[name].epmq_report.layers)
                  for name in ("epmq_lora", "epmq_dense")}
        for expert in adapters.values():
            expert.close()
    return dict(walk=f"llama {hidden}/{intermediate} x {layers} layers", experts=n_experts, rank=rank,
                gptq_s=best["gptq"], epmq_lora_s=best["epmq_lora"], epmq_dense_s=best["epmq_dense"],
                lora_ratio=best["epmq_lora"] / best["gptq"], dense_ratio=best["epmq_dense"] / best["gptq"],
                lora_speedup=best["epmq_dense"] / best["epmq_lora"], qweight_words_changed=changed,
                loss_lora=losses["epmq_lora"], loss_dense=losses["epmq_dense"],
                layers_on_the_low_rank_route=sum(n == n_experts for n in low_rank), layers=len(low_rank))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=int_tuples("d_out:d_in"), default="768:3072,1024:4096",
                        help="d_out:d_in, comma separated")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=positive_int, default=2)
    parser.add_argument("--walk", type=int_tuples("HIDDEN:INTERMEDIATE:LAYERS"), default="",
                        help="HIDDEN:INTERMEDIATE:LAYERS of a Llama walk too (comma separated: walks)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "epmq-lora-cpu.json"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows = []
    for d_out, d_in in args.shapes:
        rows.append(measure(d_out, d_in, args.experts, args.rank, args.repeats))
        r = rows[-1]
        print(f"{r['shape']:10s} GPTQ {r['gptq_s']:.2f} s; E-PMQ, {r['experts']} LoRA experts of rank "
              f"{r['rank']}: as such {r['epmq_lora_s']:.2f} s ({r['lora_ratio']:.2f}x GPTQ), dense "
              f"{r['epmq_dense_s']:.2f} s ({r['dense_ratio']:.2f}x); codes equal {r['codes_equal']:.5f}, "
              f"loss ratio {r['loss_ratio']:.8f}", flush=True)
    walks = []
    for hidden, intermediate, layers in args.walk:
        walks.append(measure_walks(hidden, intermediate, layers, args.experts, args.rank, args.repeats))
        w = walks[-1]
        print(f"{w['walk']}: GPTQ {w['gptq_s']:.1f} s; E-PMQ on {w['experts']} adapters {w['epmq_lora_s']:.1f} s "
              f"({w['lora_ratio']:.2f}x GPTQ), on the same experts dense {w['epmq_dense_s']:.1f} s "
              f"({w['dense_ratio']:.2f}x); {w['layers_on_the_low_rank_route']} of {w['layers']} layers on the "
              f"low-rank route; {100 * w['qweight_words_changed']:.2f}% of packed words differ, layer losses "
              f"summed {w['loss_lora']:.6g} against {w['loss_dense']:.6g}", flush=True)
    write_json(args.out, dict(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                              torch=torch.__version__, threads=torch.get_num_threads(),
                              command=" ".join(["python", "benchmarks/" + os.path.basename(__file__),
                                                *(argv if argv is not None else sys.argv[1:])]),
                              rows=rows, walks=walks, wall_s=time.perf_counter() - started))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
