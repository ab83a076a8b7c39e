"""Do we read what a peer writes? GPTQModel's checkpoints loaded by ``epmq.load_quantized``.

    pip install gptqmodel          # the peer, beside the package (not a dependency)
    python benchmarks/load_peer_checkpoint.py --python <interpreter with gptqmodel>
                                              [--archs llama,qwen3,qwen3_moe,mixtral] [--cases 4,4s,4a,8]

For each architecture and case (bits; ``s``: symmetric; ``a``: act-order), a random-init
decoder-only LM (``_common.tiny_decoder``) is quantized by GPTQModel itself (its ``quantize``
on 16 random token sequences, groups of 32) in a process that never imports epmq, and saved with
its ``save``. The directory is then loaded twice: by ``epmq.load_quantized(dir)`` (no model
given: built from config.json, every ``qweight`` a ``QuantLinear``) and by the peer stack, in
float32 by transformers with GPTQModel's kernels (``AutoModelForCausalLM.from_pretrained``),
or, for a mixture of experts (Qwen3-MoE, Mixtral: transformers' GPTQ integration cannot load
them), in float16 by ``GPTQModel.load`` (ours in float16 too). Their logits on held-out tokens
are compared. GPTQModel names Mixtral's expert projections gate_proj, up_proj, down_proj; the
MoE adapter maps them to the model's w1, w3, w2.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import TINY_DECODERS, write_json  # noqa: E402
from serve_with_gptqmodel import DTYPES, LOADERS, VOCAB, tiny_model  # noqa: E402

import epmq  # noqa: E402
from epmq.benches.tiny import word_tokenizer  # noqa: E402

QUANTIZE = textwrap.dedent("""
    import sys, torch
    from gptqmodel import GPTQModel, QuantizeConfig
    source, out, bits, sym, desc_act = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5] == "1"
    g = torch.Generator().manual_seed(0)
    calibration = [{"input_ids": torch.randint(0, %d, (1, 32), generator=g),
                    "attention_mask": torch.ones(1, 32, dtype=torch.long)} for _ in range(16)]
    model = GPTQModel.load(source, QuantizeConfig(bits=bits, group_size=32, sym=sym, desc_act=desc_act),
                           device="cpu")
    model.quantize(calibration, batch_size=1)
    model.save(out)
""" % VOCAB)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", required=True, help="the interpreter that has gptqmodel installed")
    parser.add_argument("--archs", default="llama,qwen3,qwen3_moe,mixtral",
                        help=f"comma separated, of {', '.join(TINY_DECODERS)}")
    parser.add_argument("--cases", default="4,4s,4a,8", help="bits[s][a], comma separated")
    parser.add_argument("--out", default="benchmarks/results/load-gptqmodel-checkpoints-cpu.json")
    args = parser.parse_args(argv)
    try:
        peer = subprocess.run([args.python, "-c", "import gptqmodel; print(gptqmodel.__version__)"],
                              capture_output=True, text=True)
    except OSError as e:
        print(f"load_peer_checkpoint: cannot run --python {args.python}: {e}", file=sys.stderr)
        return 2
    if peer.returncode != 0 or not peer.stdout.strip():
        print(f"load_peer_checkpoint: {args.python} cannot import gptqmodel (pip install gptqmodel there): "
              f"{(peer.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
        return 2
    version = peer.stdout.strip().splitlines()[-1]
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS", "2"))
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))
    rows = []
    with tempfile.TemporaryDirectory() as root:
        torch.save(tokens, os.path.join(root, "tokens.pt"))
        for arch in args.archs.split(","):
            source = os.path.join(root, f"{arch}-fp")
            tiny_model(0, arch).save_pretrained(source)
            word_tokenizer(Path(source))
            for case in args.cases.split(","):
                bits, sym, desc_act = int(case.rstrip("sa")), "s" in case, "a" in case
                directory = os.path.join(root, f"{arch}-{case}")
                loader = "gptqmodel" if arch in ("qwen3_moe", "mixtral") else "transformers"
                row = dict(arch=arch, bits=bits, sym=sym, desc_act=desc_act, group_size=32, peer_loader=loader,
                           dtype=str(DTYPES[loader])[6:])
                made = subprocess.run([args.python, "-c", QUANTIZE, source, directory, str(bits),
                                       str(int(sym)), str(int(desc_act))], capture_output=True, text=True,
                                      env=env, cwd=root)  # (GPTQModel writes its logs/ there)
                if made.returncode:
                    rows.append(dict(row, quantized=False, error=made.stderr[-2000:]))
                    print(json.dumps(rows[-1])[:300], flush=True)
                    continue
                with open(os.path.join(directory, "quantize_config.json")) as f:
                    row["checkpoint_format"] = json.load(f).get("checkpoint_format")
                ours = epmq.load_quantized(directory).to(DTYPES[loader])
                with torch.no_grad():
                    our_logits = ours(tokens).logits.float()
                out = os.path.join(root, f"peer-{arch}-{case}.pt")
                peer = subprocess.run([args.python, "-c", LOADERS[loader], directory,
                                       os.path.join(root, "tokens.pt"), out], capture_output=True, text=True,
                                      env=env)
                row.update(quantized=True, our_layers=sum(isinstance(m, epmq.QuantLinear) for m in ours.modules()),
                           peer_loaded=peer.returncode == 0)
                if peer.returncode == 0:
                    peer_logits = torch.load(out)["logits"]
                    row.update(max_abs_diff=float((our_logits - peer_logits).abs().max()),
                               logit_scale=float(peer_logits.abs().max()),
                               same_argmax=float((our_logits.argmax(-1) == peer_logits.argmax(-1)).double().mean()))
                else:
                    row["error"] = peer.stderr[-2000:]
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
    write_json(args.out, dict(command="python benchmarks/load_peer_checkpoint.py " + " ".join(argv or sys.argv[1:]),
                              gptqmodel=version, torch=torch.__version__, rows=rows))
    return 0 if all(r.get("peer_loaded") and r.get("quantized") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
