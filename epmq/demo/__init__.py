"""The embedded eight-task post-merge-quantization benchmark (``epmq demo``).

Eight tasks built from scikit-learn's bundled digits (``data``), a small CLIP vision encoder
with frozen per-task heads (``model``), base pretraining and expert fine-tuning with an
on-disk cache (``train``), ``prepare`` and ``Bench.evaluate`` (``benchmark``), and what
``epmq demo`` runs on it (``plan``).
"""

from .benchmark import DEFAULT_SCALES, Bench, prepare, sampling_error, sampling_note
from .data import TASKS, Task
from .model import ModelConfig
from .plan import default_plan
from .train import DemoConfig

__all__ = ["Bench", "DEFAULT_SCALES", "DemoConfig", "ModelConfig", "TASKS", "Task", "default_plan", "prepare",
           "sampling_error", "sampling_note"]
