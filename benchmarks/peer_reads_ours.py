"""Do peers read what we write, weight for weight? Our 2/3/4/8-bit checkpoints read by GPTQModel.

    pip install gptqmodel          # the peer, beside the package (not a dependency)
    python benchmarks/peer_reads_ours.py --python <interpreter with gptqmodel>
                                         [--archs llama] [--cases 2,2s,2a,2at,2g,3,3s,...]

For each case (bits; ``s``: symmetric; ``a``: act-order; ``t``: static groups; ``g``: per
channel, group_size -1; ``:format`` forces the checkpoint format; else groups of 32 and "auto")
a random-init decoder-only LM is quantized by ``epmq.quantize_model`` (GPTQ, random tokens) and
saved by ``epmq.save_quantized``. A process that never imports epmq then reads the directory
three ways:

* ``file``: GPTQModel's own safetensors dequantizer (``gptqmodel.utils.model_dequant.
  convert_gptq_file``, exact float32 ``(q - z) * s``, v1 zero points shifted by +1), given the
  quantize_config.json we wrote: ``max_abs_diff_file`` against our ``QuantLinear.dequantize()``
  is 0 where the packing, zero convention and config agree bit for bit.
* ``decode``: an independent decoder of the gptq layout written from GPTQModel's packer
  (``PackableQuantLinear.pack_block``: rows of 32 codes in ``bits`` words; 3 bits as 10 | 1 | 10
  | 1 | 10, codes 10 and 21 crossing words; qzeros the same along N; v1 stores z - 1):
  ``codes_equal`` / ``zeros_equal`` compare its integers with our ``codes()`` / ``zeros()``.
* ``transformers``: ``AutoModelForCausalLM.from_pretrained`` in float32 (GPTQModel's kernels);
  each kernel's ``dequantize_weight()`` against ours rounded to float16 (its product is
  float16 scales times integers: ``max_abs_diff_kernel_vs_fp16``), and the logits.
* ``gptqmodel``: ``GPTQModel.load`` in float16 (refuses asymmetric v1), the logits against
  ours in float16.
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
from _common import TINY_DECODERS, list_of, peer_version, write_json  # noqa: E402
from serve_with_gptqmodel import VOCAB, tiny_model  # noqa: E402

import epmq  # noqa: E402
from epmq.benches.tiny import word_tokenizer  # noqa: E402

PEER = textwrap.dedent("""
    import json, sys, os, torch
    from safetensors.torch import load_file
    directory, tokens, out = sys.argv[1:4]
    tokens = torch.load(tokens)
    qconfig = json.load(open(os.path.join(directory, "quantize_config.json")))
    result = dict(qconfig=qconfig)

    # 1. GPTQModel's own file dequantizer
    from gptqmodel.utils.model_dequant import convert_gptq_file
    deq = convert_gptq_file(__import__("pathlib").Path(directory, "model.safetensors"), torch.float32,
                            qconfig, "cpu")
    state = load_file(os.path.join(directory, "model.safetensors"))
    prefixes = [k[:-len(".qweight")] for k in state if k.endswith(".qweight")]
    result["file"] = {p: deq[p + ".weight"] for p in prefixes}

    # 2. an independent decoder of the layout (GPTQModel's pack_block: 32 codes -> bits words)
    def decode(words, bits, length):      # along dim 0
        w = words.to(torch.int64) & 0xFFFFFFFF
        if bits == 3:
            blocks = w.reshape(-1, 3, w.shape[1])
            a, b, c = blocks[:, 0], blocks[:, 1], blocks[:, 2]
            vals = [(a >> (3 * i)) & 7 for i in range(10)]
            vals.append(((a >> 30) & 3) | ((b & 1) << 2))
            vals += [(b >> (1 + 3 * i)) & 7 for i in range(10)]
            vals.append(((b >> 31) & 1) | ((c & 3) << 1))
            vals += [(c >> (2 + 3 * i)) & 7 for i in range(10)]
            q = torch.stack(vals, 1).reshape(-1, w.shape[1])
        else:
            per = 32 // bits
            q = torch.stack([(w >> (bits * i)) & (2 ** bits - 1) for i in range(per)], 1).reshape(-1, w.shape[1])
        return q[:length]
    bits, v1 = qconfig["bits"], qconfig.get("checkpoint_format", "gptq") == "gptq"
    result["decode"] = {}
    for p in prefixes:
        K, N = state[p + ".g_idx"].numel(), state[p + ".scales"].shape[1]
        z = decode(state[p + ".qzeros"].t(), bits, N).t()
        result["decode"][p] = dict(codes=decode(state[p + ".qweight"], bits, K),
                                   zeros=(z + 1) if v1 else z, g_idx=state[p + ".g_idx"],
                                   qweight_shape=list(state[p + ".qweight"].shape),
                                   qzeros_shape=list(state[p + ".qzeros"].shape))

    # 3. transformers' GPTQ integration, float32
    try:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(directory, device_map="cpu", dtype=torch.float32)
        mods = {n: m for n, m in model.named_modules() if type(m).__module__.startswith("gptqmodel")}
        with torch.no_grad():
            result["transformers"] = dict(
                logits=model(tokens).logits.float(),
                kinds=sorted({type(m).__name__ for m in mods.values()}),
                weights={n: m.dequantize_weight().float() for n, m in mods.items()
                         if hasattr(m, "dequantize_weight") and type(m).__name__ == "TorchLinear"})
    except Exception as e:
        result["transformers"] = dict(error=repr(e)[-1500:])

    # 4. GPTQModel's own loader, float16
    try:
        from gptqmodel import GPTQModel
        model = GPTQModel.load(directory, device="cpu", dtype=torch.float16)
        with torch.no_grad():
            result["gptqmodel"] = dict(
                logits=model(tokens).logits.float(),
                kinds=sorted({type(m).__name__ for m in model.model.modules()
                              if type(m).__module__.startswith("gptqmodel")}))
    except Exception as e:
        result["gptqmodel"] = dict(error=repr(e)[-1500:])
    torch.save(result, out)
""")


def parse_case(case):
    head, _, fmt = case.partition(":")
    bits = int(head.rstrip("satg"))
    flags = head[len(str(bits)):]
    return dict(bits=bits, sym="s" in flags, act_order="a" in flags, static_groups="t" in flags,
                group_size=-1 if "g" in flags else 32), fmt or "auto"


def checked_case(case):
    """A ValueError for a case epmq cannot quantize or write (its bits, its format)."""
    from epmq.checkpoint import FORMATS

    options, fmt = parse_case(case)
    epmq.QuantSpec(**options)
    if fmt not in FORMATS + ("auto",):
        raise ValueError(f"checkpoint_format must be 'auto' or one of {FORMATS}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", required=True, help="the interpreter that has gptqmodel installed")
    parser.add_argument("--archs", type=list_of(TINY_DECODERS.__getitem__, "a family of TINY_DECODERS"),
                        default="llama", help=f"comma separated, of {', '.join(TINY_DECODERS)}")
    parser.add_argument("--cases", type=list_of(checked_case, "a case"),
                        default="2,2s,2a,2at,2g,2:gptq_v2,3,3s,3a,3at,3g,3sa,3:gptq_v2,4at,4g,4sg,4sat,8at,8g,8sa,8s")
    parser.add_argument("--out", default="benchmarks/results/peer-reads-ours-cpu.json")
    args = parser.parse_args(argv)
    version = peer_version("peer_reads_ours", args.python, "gptqmodel")
    if version is None:
        return 2
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(3)
    calibration = {"a": [torch.randint(0, VOCAB, (4, 32), generator=g) for _ in range(4)]}
    rows = []
    with tempfile.TemporaryDirectory() as root:
        torch.save(tokens, os.path.join(root, "tokens.pt"))
        for arch in args.archs:
            for case in args.cases:
                options, fmt = parse_case(case)
                model = tiny_model(0, arch)
                epmq.quantize_model(model, epmq.QuantSpec(**options), method="gptq", calibration=calibration,
                                    backend="torch", progress=False)
                directory = os.path.join(root, f"{arch}-{case.replace(':', '-')}")
                epmq.save_quantized(model, directory, checkpoint_format=fmt)
                word_tokenizer(Path(directory))
                with open(os.path.join(directory, "quantize_config.json")) as f:
                    qconfig = json.load(f)
                out = os.path.join(root, f"peer-{arch}-{case.replace(':', '-')}.pt")
                done = subprocess.run([args.python, "-c", PEER, directory, os.path.join(root, "tokens.pt"), out],
                                      capture_output=True, text=True, cwd=root)
                row = dict(arch=arch, case=case, **options, config={k: v for k, v in qconfig.items() if k != "epmq"})
                if done.returncode:
                    rows.append(dict(row, error=done.stderr[-2000:]))
                    print(json.dumps(rows[-1])[:600], flush=True)
                    continue
                peer = torch.load(out, weights_only=False)
                layers = {n: m for n, m in model.named_modules() if isinstance(m, epmq.QuantLinear)}
                file_diff = kernel_diff = kernel_diff32 = 0.0
                codes_equal = zeros_equal = gidx_equal = True
                for name, layer in layers.items():
                    ours_w = layer.dequantize(torch.float32)  # [out, in]
                    file_diff = max(file_diff, float((peer["file"][name].t() - ours_w.t()).abs().max()))
                    d = peer["decode"][name]
                    codes_equal &= torch.equal(d["codes"].to(torch.int32), layer.codes())
                    zeros_equal &= torch.equal(d["zeros"].to(torch.int32), layer.zeros())
                    gidx_equal &= torch.equal(d["g_idx"].to(torch.int32), layer.g_idx.to(torch.int32))
                    w = peer.get("transformers", {}).get("weights", {}).get(name)
                    if w is not None:
                        kernel_diff = max(kernel_diff, float((w - ours_w.t().half().float()).abs().max()))
                        kernel_diff32 = max(kernel_diff32, float((w - ours_w.t()).abs().max()))
                row.update(file_max_abs_diff=file_diff, codes_equal=codes_equal, zeros_equal=zeros_equal,
                           g_idx_equal=gidx_equal, layers=len(layers))
                for loader, dtype in (("transformers", torch.float32), ("gptqmodel", torch.float16)):
                    got = peer[loader]
                    if "error" in got:
                        row[loader] = dict(loaded=False, error=got["error"][-400:])
                        continue
                    with torch.no_grad():
                        ours = model.to(dtype)(tokens).logits.float()
                    entry = dict(loaded=True, kinds=got["kinds"],
                                 max_abs_diff=float((got["logits"] - ours).abs().max()),
                                 logit_scale=float(ours.abs().max()),
                                 same_argmax=float((got["logits"].argmax(-1) == ours.argmax(-1)).double().mean()))
                    if loader == "transformers" and got["weights"]:
                        entry["kernel_weights_checked"] = len(got["weights"])
                        entry["max_abs_diff_kernel_vs_fp16"] = kernel_diff
                        entry["max_abs_diff_kernel_vs_fp32"] = kernel_diff32
                    row[loader] = entry
                model.to(torch.float32)
                rows.append(row)
                print(json.dumps(row), flush=True)
    write_json(args.out, dict(command="python benchmarks/peer_reads_ours.py " + " ".join(argv or sys.argv[1:]),
                              gptqmodel=version, torch=torch.__version__,
                              peer_torchdynamo_disabled=os.environ.get("TORCHDYNAMO_DISABLE") == "1", rows=rows))
    ok = all(r.get("codes_equal") and r.get("zeros_equal") and r.get("file_max_abs_diff") == 0.0 for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
