"""CPU times of whole-model quantization (``epmq.quantize_model``), GPTQ and E-PMQ, on a
random-init Llama, with the quantized model's fingerprint so that two versions can be shown to
give the same model.

    python benchmarks/walker_times.py [--baseline REV] [--hidden 2048] [--intermediate 5632]
        [--layers 2] [--tokens 512] [--samples 4] [--rounds 1] [--out FILE.json]

Calibration: two tasks, ``--samples`` sequences of ``--tokens`` tokens each; E-PMQ's two
experts are the base plus 1% noise (read as state dicts, so no disk time). What a walk costs
beyond the solves: the statistics (``X X^T`` per linear and task), the partial block forwards of
true-sequential grouping, the factorizations.

``--baseline REV`` times git revision REV in alternating child processes of the same run
(``benchmarks/_common.py``); ``same_model`` says whether both quantized every tensor
identically (sha256 of the state dict). Times are the best of ``--repeats`` walks per child,
then the median over rounds.
"""

import argparse
import json
import os
import sys
import textwrap

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (  # noqa: E402
    checkout_revision, median_of, positive_int, run_child, versions_side_by_side, write_json,
)

_CHILD = textwrap.dedent(r'''
    import copy, hashlib, json, time
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from _common import attention_heads

    torch.manual_seed(0)
    heads, kv_heads = attention_heads(HIDDEN, 128, 4)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         vocab_size=2048, max_position_embeddings=TOKENS)
    merged = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    state = merged.state_dict()
    experts = {t: {k: v + 0.01 * v.std() * torch.randn(v.shape, generator=g) for k, v in state.items()}
               for t in ("a", "b")}
    calibration = {t: [torch.randint(0, 2048, (1, TOKENS), generator=g) for _ in range(SAMPLES)]
                   for t in experts}

    def fingerprint(model):
        h = hashlib.sha256()
        for name, t in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    out = {"walk_s": {}, "fingerprint": {}}
    for method in ("gptq", "epmq"):
        best = float("inf")
        for _ in range(REPEATS):
            model = copy.deepcopy(merged)
            t0 = time.perf_counter()
            epmq.quantize_model(model, epmq.QuantSpec(4, 128), method=method, calibration=calibration,
                                experts=experts if method == "epmq" else None, progress=False)
            best = min(best, time.perf_counter() - t0)
        out["walk_s"][method] = best
        out["fingerprint"][method] = fingerprint(model)
    print("RESULT " + json.dumps(out))
''')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", help="git revision to time as well, in the same run")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--samples", type=int, default=4, help="sequences per task")
    parser.add_argument("--repeats", type=positive_int, default=1, help="walks per child (best kept)")
    parser.add_argument("--rounds", type=positive_int, default=1, help="alternating rounds")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args(argv)
    shape = dict(HIDDEN=args.hidden, INTERMEDIATE=args.intermediate, LAYERS=args.layers,
                 TOKENS=args.tokens, SAMPLES=args.samples, REPEATS=args.repeats)

    runs = versions_side_by_side(args.baseline, args.rounds,
                                 lambda src: run_child(_CHILD, src, **shape))
    versions = list(runs)
    result = {name: median_of(rs) for name, rs in runs.items()}
    result["rounds"] = runs  # every child's result, in order
    prints = {json.dumps(r["fingerprint"], sort_keys=True) for rs in runs.values() for r in rs}
    result["same_model"] = len(prints) == 1
    result["machine"] = dict(cpus=os.cpu_count(), python=sys.version.split()[0])
    result["current_revision"] = checkout_revision()
    print(f"\n{'':32s}" + "".join(f"{name:>20s}" for name in versions))
    for method in ("gptq", "epmq"):
        print(f"{method + ' walk (s)':32s}" + "".join(f"{result[v]['walk_s'][method]:20.2f}" for v in versions))
    print(f"same quantized model in every run: {result['same_model']}")
    if args.out:
        write_json(args.out, dict(args=vars(args), **result))
    return 0 if result["same_model"] else 1


if __name__ == "__main__":
    sys.exit(main())
