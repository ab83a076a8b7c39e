"""epmq: merge fine-tuned experts into one model and quantize it without losing what they knew.

    import epmq
    spec = epmq.QuantSpec(bits=4, group_size=128)
    result = epmq.quant.epmq(W_merged, expert_weights, expert_hessians, spec)
"""

from epmq_kernels import _runtime  # noqa: F401  (Triton's interpreter switch, before any kernel)

from . import merge, quant, stats
from .quant import QuantResult
from .spec import QuantSpec
from .stats import EPMQStats, HessianStats, LowRankExpert

__all__ = ["QuantSpec", "QuantResult", "EPMQStats", "HessianStats", "LowRankExpert", "merge", "quant", "stats"]
__version__ = "0.1.0"

# Whole models: walk, packed layers, checkpoints (issue 5)
from .adapters import Adapter, register_adapter  # noqa: E402
from .checkpoint import load_quantized, save_quantized  # noqa: E402
from .lora import LoraExpert  # noqa: E402
from .merge_checkpoint import merge_checkpoints  # noqa: E402
from .quantize_files import quantize_checkpoint  # noqa: E402
from .qlinear import QuantLinear  # noqa: E402
from .walker import QuantReport, quantize_model  # noqa: E402

__all__ += [
    "quantize_model", "QuantReport", "QuantLinear", "save_quantized", "load_quantized",
    "Adapter", "register_adapter", "merge_checkpoints",
    "quantize_checkpoint", "LoraExpert",
]
