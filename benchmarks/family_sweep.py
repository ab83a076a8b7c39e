"""Which of transformers' causal-LM architectures the walker quantizes: every model type of
``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``, built from its default config shrunk to a tiny one
(hidden 32, 2 layers, 4 heads, 4 experts, ... wherever the config has the attribute), run once,
then quantized by GPTQ (4 bits, groups of 16) on one padded batch of token ids.

    python benchmarks/family_sweep.py [--only TYPE ...] [--timeout 120] [--out FILE.json]

Each model type runs in its own process (a default config too large for memory, or a slow one,
costs only its own row). A row says where it stopped: ``config`` / ``build`` / ``forward`` (the
generic tiny config does not fit the architecture: not the walker's doing), ``quantize`` (the
walker's error, named), ``timeout``, or ``ok`` with the adapter that walked it (``auto``: no
adapter lists it, ``epmq.adapters.AUTO`` found its blocks) and the number of packed linears.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import write_json  # noqa: E402

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, head_dim=8, n_embd=32, n_layer=2, n_head=4,
            d_model=32, n_layers=2, n_heads=4, num_layers=2, num_heads=4, moe_intermediate_size=16, num_experts=4,
            num_local_experts=4, num_experts_per_tok=2, n_routed_experts=4, ffn_hidden_size=64, pad_token_id=0,
            bos_token_id=0, eos_token_id=1, d_ff=64, ffn_dim=64, n_positions=64)

_CHILD = r'''
import json, sys, warnings
import torch, transformers
from transformers import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
import epmq

model_type, tiny = sys.argv[1], json.loads(sys.argv[2])
row = {"stage": "config"}
try:
    config = CONFIG_MAPPING[model_type]()
    for key, value in tiny.items():
        if hasattr(config, key):
            try:
                setattr(config, key, value)
            except Exception:  # (read-only properties)
                pass
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:2]
    row["stage"] = "build"
    torch.manual_seed(0)
    model = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])(config).eval()
    batch = {"input_ids": torch.randint(3, 64, (2, 8)), "attention_mask": torch.tensor([[1] * 8, [1] * 6 + [0] * 2])}
    row["stage"] = "forward"
    with torch.no_grad():
        model(**batch)
    row["stage"] = "quantize"
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="gptq", calibration={"a": [batch]},
                            backend="torch", progress=False)
    row.update(stage="ok", adapter=model.epmq_report.adapter, linears=len(model.epmq_report.layers),
               skipped=len(model.epmq_report.skipped),
               warnings=[str(w.message)[:200] for w in said if "epmq" in str(w.filename)])
except Exception as e:
    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
print(json.dumps(row))
'''


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="model types (default: all)")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--out", default="benchmarks/results/family_sweep_cpu.json")
    args = parser.parse_args()
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from tqdm.auto import tqdm

    rows = {}
    for model_type in tqdm(args.only or list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), unit="model"):
        t0 = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, "-c", _CHILD, model_type, json.dumps(TINY)], capture_output=True,
                                  text=True, timeout=args.timeout)
            lines = done.stdout.strip().splitlines()
            row = json.loads(lines[-1]) if lines else {"stage": "crash", "error": done.stderr.strip()[-300:]}
        except subprocess.TimeoutExpired:
            row = {"stage": "timeout"}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows[model_type] = row
    stages = {}
    for row in rows.values():
        key = row["stage"]
        if key == "ok":
            key = "ok (auto)" if row["adapter"] == "auto" else "ok (built-in adapter)"
        stages[key] = stages.get(key, 0) + 1
    summary = {"transformers": transformers.__version__, "model_types": len(rows), "stages": stages}
    print(json.dumps(summary, indent=1))
    write_json(args.out, {"summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
