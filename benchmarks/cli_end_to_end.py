"""``epmq merge`` then ``epmq quantize`` on a GPT-2-small-sized Llama, and a peer serving the result.

    python benchmarks/cli_end_to_end.py [--python <interpreter with gptqmodel>] [--device cuda]

A random-init Llama of 125M parameters (12 layers, hidden 768, vocabulary 32000) is the base;
two experts are the base plus noise; each task has 400 documents of random words. The script
runs the two shell commands a user runs, as subprocesses, and times them: a TIES merge (density
0.2), then E-PMQ (4 bits, groups of 128, symmetric, anchor 0.1, 32 windows of 512 tokens per
task). With ``--python`` naming an interpreter where GPTQModel is installed, that process
(which never imports epmq) loads the quantized checkpoint with transformers'
``AutoModelForCausalLM.from_pretrained`` and its logits are compared with
``epmq.load_quantized``'s. Writes JSON (default ``benchmarks/results/cli-end-to-end-cpu.json``).
"""

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import attention_heads, write_json  # noqa: E402

PEER = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="cpu", dtype=torch.float32)
ids = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(input_ids=ids).logits.float(), sys.argv[3])
print(type(model.model.layers[0].self_attn.q_proj).__name__)
"""


def write_inputs(root: Path, layers: int, hidden: int):
    import transformers
    import yaml

    from epmq.benches.tiny import WORDS, word_tokenizer

    heads, kv_heads = attention_heads(hidden, 64, 3)
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=8 * hidden // 3,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads,
                                      max_position_embeddings=1024)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    params = sum(p.numel() for p in base.parameters())
    base.save_pretrained(root / "base")
    word_tokenizer(root / "base")
    for k in range(2):
        with torch.no_grad():
            expert = transformers.LlamaForCausalLM(config)
            expert.load_state_dict(base.state_dict())
            for p in expert.parameters():
                p.add_(0.01 * torch.randn_like(p))
        expert.save_pretrained(root / f"expert{k}")
    rng = random.Random(0)
    for task in ("a", "b"):
        docs = [{"text": " ".join(rng.choice(WORDS) for _ in range(200))} for _ in range(400)]
        (root / f"{task}.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    merge = dict(method="ties", base=str(root / "base"), models=[str(root / "expert0"), str(root / "expert1")],
                 params=dict(density=0.2))
    quantize = dict(model=str(root / "merged"), method="epmq",
                    calibration={"a": str(root / "a.jsonl"), "b": str(root / "b.jsonl")},
                    experts={"a": str(root / "expert0"), "b": str(root / "expert1")},
                    bits=4, group_size=128, sym=True, anchor=0.1, samples=32, seq_len=512, batch_size=8)
    (root / "merge.yaml").write_text(yaml.safe_dump(merge))
    (root / "w4.yaml").write_text(yaml.safe_dump(quantize))
    return params, merge, quantize


def timed(command):
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return round(time.perf_counter() - started, 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", default=None, help="an interpreter with gptqmodel, to serve the result")
    parser.add_argument("--device", default=None, help="e.g. cuda (default: CPU)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--out", default="benchmarks/results/cli-end-to-end-cpu.json")
    args = parser.parse_args(argv)
    import epmq

    device = ["--device", args.device] if args.device else []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        params, merge, quantize = write_inputs(root, args.layers, args.hidden)
        epmq_cli = [sys.executable, "-m", "epmq.cli"]
        result = dict(params=params, layers=args.layers, hidden=args.hidden, device=args.device or "cpu",
                      threads=torch.get_num_threads(), merge_config=merge, quantize_config=quantize)
        result["merge_s"] = timed(epmq_cli + ["merge", str(root / "merge.yaml"), str(root / "merged"), "--quiet"] + device)
        result["quantize_s"] = timed(epmq_cli + ["quantize", str(root / "w4.yaml"), str(root / "w4"), "--quiet"] + device)
        sizes = {d: sum(f.stat().st_size for f in (root / d).iterdir()) for d in ("merged", "w4")}
        result["bytes"] = sizes
        print(f"{params / 1e6:.0f}M parameters: merge {result['merge_s']} s, quantize {result['quantize_s']} s, "
              f"{sizes['merged'] / 1e6:.0f} MB -> {sizes['w4'] / 1e6:.0f} MB", flush=True)
        if args.python:
            ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(0))
            torch.save(ids, root / "ids.pt")
            with torch.no_grad():
                ours = epmq.load_quantized(root / "w4")(input_ids=ids).logits.float()
            env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2")
            peer = subprocess.run([args.python, "-c", PEER, str(root / "w4"), str(root / "ids.pt"),
                                   str(root / "theirs.pt")], capture_output=True, text=True, env=env, cwd=tmp)
            if peer.returncode != 0:
                result["peer_error"] = peer.stderr[-2000:]
            else:
                theirs = torch.load(root / "theirs.pt")
                result["peer"] = dict(kernel=peer.stdout.strip().splitlines()[-1],
                                      max_abs_diff=float((ours - theirs).abs().max()),
                                      max_abs_logit=float(ours.abs().max()),
                                      same_argmax=bool((ours.argmax(-1) == theirs.argmax(-1)).all()))
            print("peer:", result.get("peer", result.get("peer_error")), flush=True)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
