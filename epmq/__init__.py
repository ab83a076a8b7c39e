"""epmq: merge fine-tuned experts into one model and quantize it without losing what they knew.

    import epmq
    spec = epmq.QuantSpec(bits=4, group_size=128)
    result = epmq.quant.epmq(W_merged, expert_weights, expert_hessians, spec)
"""

import sys

__all__ = ["QuantSpec", "QuantResult", "EPMQStats", "HessianStats", "LowRankExpert", "merge", "quant", "stats"]
__version__ = "0.1.0"

# `python -m epmq` imports this package (torch, transformers, Triton: seconds) before its __main__
# runs, out of reach of epmq_cli's catch of Ctrl-C while starting: caught here while python -m
# looks for the module (sys.argv[0] is "-m" then) and that module is epmq's; any other import of
# epmq keeps its interrupt (`python -m tool` whose package imports epmq: the tool's to handle)
try:
    from epmq_kernels import _runtime  # noqa: F401  (Triton's interpreter switch, before any kernel)

    from . import merge, quant, stats
    from .quant import QuantResult
    from .spec import QuantSpec
    from .stats import EPMQStats, HessianStats, LowRankExpert

    # Whole models: walk, packed layers, checkpoints (issue 5)
    from .adapters import Adapter, register_adapter
    from .checkpoint import load_quantized, save_quantized
    from .lora import LoraExpert
    from .merge_checkpoint import merge_checkpoints
    from .quantize_files import quantize_checkpoint
    from .qlinear import QuantLinear
    from .walker import QuantReport, quantize_model
except KeyboardInterrupt:
    _argv = getattr(sys, "orig_argv", [])
    _module = next((a[2:] or b for a, b in zip(_argv, _argv[1:] + [""]) if a.startswith("-m")), "")
    if sys.argv[:1] != ["-m"] or _module.partition(".")[0] != "epmq":
        raise
    print("\nepmq: interrupted while starting; nothing was done", file=sys.stderr)
    raise SystemExit(130) from None

__all__ += [
    "quantize_model", "QuantReport", "QuantLinear", "save_quantized", "load_quantized",
    "Adapter", "register_adapter", "merge_checkpoints",
    "quantize_checkpoint", "LoraExpert",
]
