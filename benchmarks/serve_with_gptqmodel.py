"""Can a serving stack load what we save? Our checkpoint loaded by transformers + GPTQModel.

    pip install gptqmodel          # the peer loader, beside the package (not a dependency)
    python benchmarks/serve_with_gptqmodel.py [--archs llama,qwen3,gemma3,phi3]
                                              [--cases 4,4:gptq_v2,4a,4s,3,2,8]
                                              [--loader transformers|gptqmodel] [--out ...json]

For each architecture and case (bits; ``a``: act-order, whose ``g_idx`` is not monotone; ``s``:
a symmetric grid; ``:format`` forces the checkpoint format): a random-init decoder-only LM (HF
transformers: a Llama, a Qwen3, a Gemma 3 with sliding-window layers, a Phi-3 with fused
projections, the mixture-of-experts Qwen3-MoE and Mixtral) is merged from a base and three
experts (Task Arithmetic), quantized by ``epmq.quantize_model`` (E-PMQ, groups of 32) and saved
by ``epmq.save_quantized`` in the ``gptq`` format. The directory is then loaded, in a fresh
process that never imports epmq, the way a user of the HF stack would load any GPTQ checkpoint:

* ``--loader transformers``: ``AutoModelForCausalLM.from_pretrained(dir)`` (transformers' GPTQ
  integration with GPTQModel's kernels; on a CPU its torch kernel), in float32. It quantizes
  ``nn.Linear`` modules only, so it cannot load the experts of a transformers 5 MoE (fused 3-D
  parameters), whoever wrote the checkpoint.
* ``--loader gptqmodel``: ``GPTQModel.load(dir)``, GPTQModel's own loader, which splits fused
  experts into one linear each, in float16 (its float32 CPU kernel is not exact here); our model
  runs in float16 too for the comparison. It needs a tokenizer in the directory (a word-level one
  is saved there) and refuses asymmetric v1 (``gptq``) checkpoints that it did not write itself.

Its logits on held-out tokens are compared with those of our in-memory quantized model and with
the full-precision merged model.

What a pass means: the packed tensors, the zero-point convention (v1 ``z - 1``, or v2 where v1
cannot hold a zero point) and the config are read by a loader we did not write as we meant
them. ``max_abs_diff_vs_epmq`` is then the loaders' arithmetic difference (fp16 scales, its
kernel's order of summation), against ``max_abs_diff_vs_fp`` for the quantization itself.
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
from _common import TINY_DECODERS, list_of, peer_version, tiny_decoder, write_json  # noqa: E402

import epmq  # noqa: E402
from epmq import merge  # noqa: E402
from epmq.benches.tiny import word_tokenizer  # noqa: E402

VOCAB = 128


def tiny_model(seed, arch):
    return tiny_decoder(seed, vocab_size=VOCAB, hidden_size=128, intermediate_size=256,
                             arch=arch)


def merged_family(arch, tasks=("a", "b", "c")):
    """Base, experts (base + task vectors), their Task Arithmetic merge, per-task token data."""
    base = tiny_model(0, arch)
    g = torch.Generator().manual_seed(1)
    experts, calibration = {}, {}
    for k, task in enumerate(tasks):
        expert = tiny_model(0, arch)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g) * p.abs().mean())
        experts[task] = expert
        # each task draws its tokens from its own part of the vocabulary
        lo = k * VOCAB // len(tasks)
        calibration[task] = [torch.randint(lo, lo + VOCAB // len(tasks), (4, 32), generator=g)
                             for _ in range(4)]
    model = tiny_model(0, arch)
    model.load_state_dict(merge.task_arithmetic(base, list(experts.values()), scale=0.4))
    return model, experts, calibration


LOADERS = {  # a script each: load the directory, save its logits and GPTQModel's module kinds
    "transformers": textwrap.dedent("""
        import sys, torch
        from transformers import AutoModelForCausalLM
        directory, tokens, out = sys.argv[1:4]
        model = AutoModelForCausalLM.from_pretrained(directory, device_map="cpu", dtype=torch.float32)
        kinds = sorted({type(m).__name__ for m in model.modules()
                        if type(m).__module__.startswith("gptqmodel")})
        with torch.no_grad():
            logits = model(torch.load(tokens)).logits.float()
        torch.save(dict(logits=logits, kinds=kinds), out)
    """),
    "gptqmodel": textwrap.dedent("""
        import sys, torch
        from gptqmodel import GPTQModel
        directory, tokens, out = sys.argv[1:4]
        model = GPTQModel.load(directory, device="cpu", dtype=torch.float16)
        kinds = sorted({type(m).__name__ for m in model.model.modules()
                        if type(m).__module__.startswith("gptqmodel")})
        with torch.no_grad():
            logits = model(torch.load(tokens)).logits.float()
        torch.save(dict(logits=logits, kinds=kinds), out)
    """),
}
DTYPES = {"transformers": torch.float32, "gptqmodel": torch.float16}


def parse_case(case):
    """``bits[a][s][:checkpoint_format]`` -> ``(QuantSpec, format)``; a ValueError for a case epmq
    cannot write."""
    from epmq.checkpoint import FORMATS

    bits, _, fmt = case.partition(":")
    act_order, sym = "a" in bits, "s" in bits
    bits, fmt = int(bits.rstrip("as")), fmt or "auto"
    if fmt not in FORMATS + ("auto",):
        raise ValueError(f"checkpoint_format must be 'auto' or one of {FORMATS}")
    return epmq.QuantSpec(bits=bits, group_size=32, act_order=act_order, sym=sym), fmt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", type=list_of(TINY_DECODERS.__getitem__, "a family of TINY_DECODERS"),
                        default="llama", help=f"comma separated, of {', '.join(TINY_DECODERS)}")
    parser.add_argument("--cases", type=list_of(parse_case, "a case"),
                        default="4,4:gptq_v2,4a,3,2,8",
                        help="bits[a][s][:checkpoint_format], comma separated (a: act-order, "
                             "s: symmetric; format default: auto)")
    parser.add_argument("--loader", choices=sorted(LOADERS), default="transformers")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter that has gptqmodel installed")
    parser.add_argument("--out", help="default: benchmarks/results/serve-with-gptqmodel-cpu.json "
                                      "(--loader gptqmodel: serve-with-gptqmodel-native-cpu.json)")
    args = parser.parse_args(argv)
    args.out = args.out or ("benchmarks/results/serve-with-gptqmodel-cpu.json" if args.loader == "transformers"
                            else "benchmarks/results/serve-with-gptqmodel-native-cpu.json")
    version = peer_version("serve_with_gptqmodel", args.python, "gptqmodel")
    if version is None:
        return 2
    rows = []
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))
    with tempfile.TemporaryDirectory() as root:
        torch.save(tokens, os.path.join(root, "tokens.pt"))
        for arch, case in [(a, c) for a in args.archs for c in args.cases]:
            spec, fmt = parse_case(case)
            model, experts, calibration = merged_family(arch)
            with torch.no_grad():
                fp_logits = model(tokens).logits.float()
            epmq.quantize_model(model, spec, method="epmq",
                                calibration=calibration, experts=experts, anchor=0.1,
                                backend="torch", progress=False)
            with torch.no_grad():
                our_logits = model.to(DTYPES[args.loader])(tokens).logits.float()
            directory = os.path.join(root, f"{arch}-w{case.replace(':', '-')}")
            epmq.save_quantized(model, directory, checkpoint_format=fmt)
            word_tokenizer(Path(directory))  # GPTQModel.load loads one; the tokens are given as ids
            with open(os.path.join(directory, "config.json")) as f:
                qconfig = json.load(f)["quantization_config"]
            out = os.path.join(root, f"peer-{arch}-w{case.replace(':', '-')}.pt")
            peer = subprocess.run([args.python, "-c", LOADERS[args.loader], directory,
                                   os.path.join(root, "tokens.pt"), out],
                                  capture_output=True, text=True)
            row = dict(arch=arch, loader=args.loader, dtype=str(DTYPES[args.loader])[6:], bits=spec.bits,
                       group_size=32, act_order=spec.act_order, sym=spec.sym, desc_act=qconfig.get("desc_act"),
                       checkpoint_format=qconfig.get("checkpoint_format"),
                       loaded=peer.returncode == 0)
            if peer.returncode == 0:
                result = torch.load(out)
                peer_logits = result["logits"]
                row.update(peer_modules=result["kinds"],
                           max_abs_diff_vs_epmq=float((peer_logits - our_logits).abs().max()),
                           max_abs_diff_vs_fp=float((our_logits - fp_logits).abs().max()),
                           logit_scale=float(fp_logits.abs().max()),
                           same_argmax=float((peer_logits.argmax(-1) == our_logits.argmax(-1))
                                             .double().mean()))
            else:
                row["error"] = peer.stderr[-2000:]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
            if not row["loaded"]:
                print(row["error"], file=sys.stderr)
    result = dict(command="python benchmarks/serve_with_gptqmodel.py " + " ".join(argv or sys.argv[1:]),
                  gptqmodel=version,
                  torch=torch.__version__, rows=rows)
    write_json(args.out, result)
    return 0 if all(r["loaded"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
