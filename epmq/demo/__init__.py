"""The embedded eight-task post-merge-quantization benchmark (``epmq demo``).

Eight tasks built from scikit-learn's bundled digits (``data``), a small CLIP vision encoder
with frozen per-task heads (``model``), base pretraining and expert fine-tuning with an
on-disk cache (``train``), and ``prepare`` / ``merges`` / ``Bench.evaluate`` (``benchmark``).
"""

from .benchmark import Bench, merge_state, merges, prepare
from .data import TASKS, Task
from .model import ModelConfig
from .plan import default_plan
from .train import DemoConfig

__all__ = ["Bench", "DemoConfig", "ModelConfig", "TASKS", "Task", "default_plan", "merge_state", "merges", "prepare"]
