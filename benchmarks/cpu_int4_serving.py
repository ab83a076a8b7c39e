"""QuantLinear on the CPU in bf16: torch's int4 kernel against dequantize + matmul (CPU).

    python benchmarks/cpu_int4_serving.py --out /tmp/cpu-int4-serving.json
    python benchmarks/cpu_int4_serving.py --out benchmarks/results/cpu-int4-serving-cpu.json  # the committed one

Both paths in the same run: one 4096 x 4096 layer (4-bit, groups of 128) at 1, 16 and 128 rows,
then a 125M-parameter random-init Llama (12 layers, hidden 768; GPTQ 4-bit, groups of 128, on
random tokens) in bf16: greedy generation speed (32 tokens, batch 1) and the logits' distance to
the same quantized model in fp32 (the exact path), with each of the two bf16 paths.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import write_json  # noqa: E402

import epmq  # noqa: E402
from epmq import qlinear  # noqa: E402


class dense_path:
    """Within the block, QuantLinear takes the dequantize + matmul path."""

    def __enter__(self):
        self.saved, qlinear._cpu_int4_mm = qlinear._cpu_int4_mm, None

    def __exit__(self, *exc):
        qlinear._cpu_int4_mm = self.saved


def ms(fn, repeats):
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # no default: the committed results' file was one, written over by any run (another machine's,
    # a trial's) that did not name a file
    parser.add_argument("--out", required=True, help="JSON file to write (the committed run's: "
                        "benchmarks/results/cpu-int4-serving-cpu.json)")
    args = parser.parse_args(argv)
    import transformers

    result = dict(threads=torch.get_num_threads(), torch=torch.__version__, layer=[], model={})
    torch.manual_seed(0)
    spec = epmq.QuantSpec(bits=4, group_size=128)
    layer = epmq.QuantLinear.from_result(epmq.quant.rtn(torch.randn(4096, 4096), spec), None)
    layer = layer.to(torch.bfloat16)
    for rows in (1, 16, 128):
        x = torch.randn(rows, 4096).bfloat16()
        kernel = ms(lambda: layer(x), 10)
        with dense_path():
            dense = ms(lambda: layer(x), 3)
        result["layer"].append(dict(rows=rows, kernel_ms=round(kernel, 2), dense_ms=round(dense, 1)))
        print(f"4096 x 4096, {rows} rows: kernel {kernel:.2f} ms, dequantize + matmul {dense:.1f} ms", flush=True)

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                                      num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4)
    model = transformers.LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    calibration = {"random": [{"input_ids": torch.randint(0, 32000, (4, 256), generator=g)}]}
    # (the walk takes the run's longest silence, minutes on 2 cores: its bar says where it is)
    epmq.quantize_model(model, spec, method="gptq", calibration=calibration, progress=True)
    ids = torch.randint(0, 32000, (1, 64), generator=g)
    with torch.no_grad():
        exact = model(input_ids=ids).logits.double()
        model.to(torch.bfloat16)
        generate = lambda: model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)  # noqa: E731
        runs = {}
        for name in ("kernel", "dense"):
            with (dense_path() if name == "dense" else torch.no_grad()):
                logits = model(input_ids=ids).logits.double()
                seconds = ms(generate, 1) / 1e3
                runs[name] = dict(tokens_per_s=round(32 / seconds, 1),
                                  max_abs_logit_diff_vs_fp32=float((logits - exact).abs().max()),
                                  argmax_agreement_vs_fp32=float((logits.argmax(-1) == exact.argmax(-1)).float().mean()))
            print(name, runs[name], flush=True)
    result["model"] = dict(params=params, max_abs_logit_fp32=float(exact.abs().max()), **runs)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
