"""Do we read what a peer writes? GPTQModel's checkpoints loaded by ``epmq.load_quantized``.

    pip install gptqmodel          # the peer, beside the package (not a dependency)
    python benchmarks/load_peer_checkpoint.py --python <interpreter with gptqmodel>
                                              [--archs llama,qwen3,qwen3_moe,mixtral] [--cases 4,4s,4a,8,3,3s,2,2s]

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

Then ``epmq.save_quantized`` writes what it loaded again, in the peer's checkpoint format, and
every ``qweight``, ``qzeros``, ``scales`` and ``g_idx`` is compared with the peer's bit for bit
(``resaved_identical``: our packer, 3-bit words included, and our v1 zero points are the
peer's; ``resave_error`` where we refuse to write what the peer wrote, e.g. a v1 zero point of
0 that the peer wrapped to ``2**bits - 1``).
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
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import TINY_DECODERS, list_of, peer_version, write_json  # noqa: E402
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


def resave(model, directory, checkpoint_format) -> dict:
    """Our save of the model we loaded from ``directory``, compared with the peer's tensors."""
    theirs = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            theirs.update(load_file(os.path.join(directory, name)))
    with tempfile.TemporaryDirectory() as again:
        try:
            epmq.save_quantized(model, again, checkpoint_format=checkpoint_format or "gptq")
        except ValueError as e:
            return dict(resave_error=str(e)[:300])
        ours = load_file(os.path.join(again, "model.safetensors"))
    keys = [k for k in theirs if k.rpartition(".")[2] in ("qweight", "qzeros", "scales", "g_idx")]
    differ = [k for k in keys if k not in ours or not torch.equal(ours[k].to(theirs[k].dtype), theirs[k])]
    return dict(resaved_tensors=len(keys), resaved_identical=not differ, resaved_differing=differ[:4])


def case_bits(case):
    """The bits of ``bits[s][a]``; a ValueError for bits GPTQModel and epmq do not write."""
    bits = int(case.rstrip("sa"))
    if bits not in (2, 3, 4, 8):
        raise ValueError("bits must be one of (2, 3, 4, 8)")
    return bits


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", required=True, help="the interpreter that has gptqmodel installed")
    parser.add_argument("--archs", type=list_of(TINY_DECODERS.__getitem__, "a family of TINY_DECODERS"),
                        default="llama,qwen3,qwen3_moe,mixtral",
                        help=f"comma separated, of {', '.join(TINY_DECODERS)}")
    parser.add_argument("--cases", type=list_of(case_bits, "a case"), default="4,4s,4a,8,3,3s,3a,2,2s",
                        help="bits[s][a], comma separated")
    parser.add_argument("--out", default="benchmarks/results/load-gptqmodel-checkpoints-cpu.json")
    args = parser.parse_args(argv)
    version = peer_version("load_peer_checkpoint", args.python, "gptqmodel")
    if version is None:
        return 2
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS=os.environ.get("GPTQMODEL_CPU_WORKERS", "2"))
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))
    rows = []
    with tempfile.TemporaryDirectory() as root:
        torch.save(tokens, os.path.join(root, "tokens.pt"))
        for arch in args.archs:
            source = os.path.join(root, f"{arch}-fp")
            tiny_model(0, arch).save_pretrained(source)
            word_tokenizer(Path(source))
            for case in args.cases:
                bits, sym, desc_act = case_bits(case), "s" in case, "a" in case
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
                row.update(resave(ours, directory, row["checkpoint_format"]))
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
