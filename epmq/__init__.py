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
    from .walker import ExpertShapeError, QuantReport, StandInError, quantize_model
except KeyboardInterrupt:
    def _module_run(argv) -> str:
        """The module ``python -m`` runs, read from the interpreter's arguments as it reads them:
        one-letter options cluster (``python -um epmq``, unbuffered), -W and -X take a value."""
        args = iter(argv[1:])
        for arg in args:
            if arg == "--check-hash-based-pycs":
                next(args, None)
            elif arg[:1] != "-" or arg in ("-", "--"):
                return ""  # (a script, or stdin)
            elif not arg.startswith("--"):
                for at, letter in enumerate(arg[1:], 2):
                    if letter in "cmWX":  # (their value: the rest of the cluster, or the next argument)
                        value = arg[at:] or next(args, "")
                        if letter in "cm":
                            return value if letter == "m" else ""
                        break
        return ""

    if sys.argv[:1] != ["-m"] or _module_run(getattr(sys, "orig_argv", [])).partition(".")[0] != "epmq":
        raise
    print("\nepmq: interrupted while starting; nothing was done", file=sys.stderr)
    raise SystemExit(130) from None

__all__ += [
    "quantize_model", "QuantReport", "QuantLinear", "save_quantized", "load_quantized",
    "Adapter", "register_adapter", "merge_checkpoints",
    "quantize_checkpoint", "LoraExpert", "ExpertShapeError", "StandInError",
]
