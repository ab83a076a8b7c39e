"""The embedded eight-task post-merge-quantization benchmark.

    from epmq.demo import prepare
    from epmq.pipeline import MergePlan, choose_scale
    bench = prepare()                       # trains once (minutes), then loads from the cache
    bench.evaluate(bench.base_state)        # zero-shot base: {task: acc, ..., "avg": acc}
    scale, merged, _ = choose_scale(bench, MergePlan("task_arithmetic", DEFAULT_SCALES["task_arithmetic"]))
    bench.evaluate(merged, split="test")    # the scale was chosen on validation
    bench.calibration["digit"]              # list of pixel_values batches [B, 3, 8, 8]

Accuracies are fractions in [0, 1]; ``"avg"`` is the unweighted mean over the tasks.
See ``data.py`` for the tasks, ``model.py`` for the model and heads, ``train.py`` for the
training schedule and the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .._util import device_of
from .data import Task, TaskData, build_task_data, get_tasks, load_digits_tensors, make_splits, pretraining_images
from .model import build_encoder, logits
from .train import DemoConfig, default_cache_root, load_cached, load_or_train, save_tensors

StateDict = Mapping[str, torch.Tensor]


@dataclass
class Bench:
    """The prepared benchmark. ``experts`` and ``heads`` are ordered like ``tasks``."""

    config: DemoConfig
    seed: int
    cache_dir: Path
    tasks: Tuple[Task, ...]
    splits: Dict[str, torch.Tensor]  # image indices into the 1797 digits
    data: Dict[str, TaskData]
    base_state: Dict[str, torch.Tensor]
    experts: Dict[str, Dict[str, torch.Tensor]]
    heads: Dict[str, torch.Tensor]
    meta: dict
    trained: bool  # whether prepare() trained anything (False: all loaded from the cache)
    _base: Optional[nn.Module] = field(default=None, repr=False)

    @property
    def task_names(self) -> List[str]:
        return [t.name for t in self.tasks]

    @property
    def base(self) -> nn.Module:
        """The pretrained base encoder (a ``CLIPVisionModel``, eval mode)."""
        if self._base is None:
            self._base = build_encoder(self.config.model, self.base_state)
        return self._base

    def model(self, state: Optional[StateDict] = None) -> nn.Module:
        """A fresh encoder with ``state`` (default: the base's) loaded."""
        return build_encoder(self.config.model, self.base_state if state is None else state)

    def expert_model(self, task: str) -> nn.Module:
        return self.model(self.experts[task])

    @property
    def calibration(self) -> Dict[str, List[torch.Tensor]]:
        """Each task's calibration inputs (training images) as ``pixel_values`` batches."""
        b = self.config.calib_batch
        return {n: list(td.calib.split(b)) for n, td in self.data.items()}

    @torch.no_grad()
    def evaluate(
        self,
        model_or_state: Union[nn.Module, StateDict],
        split: str = "test",
        tasks: Optional[Sequence[str]] = None,
        batch_size: int = 512,
    ) -> Dict[str, float]:
        """Accuracy of an encoder (a module called as ``model(pixel_values=x)``, or a state dict
        of this benchmark's encoder) on each task's ``split`` through the frozen heads:
        ``{task: acc, ..., "avg": mean}``."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        model = model_or_state if isinstance(model_or_state, nn.Module) else self.model(model_or_state)
        was_training = model.training
        model.eval()
        device = device_of(model)
        out = {}
        try:
            for name in tasks or self.task_names:
                td = self.data[name]
                head = self.heads[name].to(device)
                correct = 0
                for x, y in zip(td.x[split].split(batch_size), td.y[split].split(batch_size)):
                    pred = logits(model, head, x.to(device), self.config.logit_scale).argmax(-1)
                    correct += int((pred.cpu() == y).sum())
                out[name] = correct / len(td.y[split])
        finally:
            model.train(was_training)
        out["avg"] = sum(out.values()) / len(out)
        return out

    def expert_accuracies(self, split: str = "test") -> Dict[str, float]:
        """Each expert on its own task, and their mean (``"avg"``)."""
        out = {n: self.evaluate(self.experts[n], split, tasks=[n])[n] for n in self.task_names}
        out["avg"] = sum(out.values()) / len(out)
        return out

    def counts(self, split: str = "test") -> Dict[str, int]:
        """Each task's number of images in ``split`` (what ``evaluate`` averages over)."""
        return {n: len(self.data[n].y[split]) for n in self.task_names}


# --------------------------------------------------------------------------- sampling error


def sampling_error(accs: Mapping[str, float], counts: Mapping[str, int], z: float = 1.96) -> float:
    """Half-width of the normal (binomial) interval of ``accs["avg"]``, the unweighted mean of the
    per-task accuracies ``accs[t]``, each over ``counts[t]`` test images:
    ``z * sqrt(sum_t p_t (1 - p_t) / n_t) / T`` (z = 1.96: 95%). It is what the test images
    alone leave open, the models held fixed; another calibration draw, seed or anchor moves a
    quantized model's accuracy on top of it."""
    if not counts or any(n <= 0 for n in counts.values()):
        raise ValueError(f"every task needs test images to have a sampling error, got counts {dict(counts)}")
    variance = sum(accs[t] * (1 - accs[t]) / n for t, n in counts.items())
    return z * math.sqrt(variance) / len(counts)


def sampling_note(rows: Sequence[Tuple[str, Mapping[str, float]]], counts: Mapping[str, int]) -> str:
    """One line under the demo's table: the 95% sampling error of its rows' averages and of the
    difference of two of them (as if independent: two models right on the same images make it
    smaller), so that a gap inside it is not read as a ranking: ``epmq demo --quick`` (seed 0)
    printed 2-bit E-PMQ 57.6 below GPTQ 58.3 with nothing to say that the two models, which
    disagree on a third of the 3,600 test images, are 0.7 apart inside an interval of about 2."""
    errors = sorted(sampling_error(accs, counts) for _, accs in rows)
    pair = math.hypot(*errors[-2:]) if len(errors) > 1 else errors[-1]
    sizes = sorted(counts.values())
    images = f"{sizes[0]}" if sizes[0] == sizes[-1] else f"{sizes[0]}-{sizes[-1]}"
    return (f"Test-set sampling error (95%, binomial; {len(counts)} tasks x {images} test images): "
            f"+-{100 * errors[0]:.1f} to +-{100 * errors[-1]:.1f} points on a row's avg, up to "
            f"+-{100 * pair:.1f} on the difference of two rows: closer rows are not told apart.")


# --------------------------------------------------------------------------- prepare


def prepare(
    cache_dir: Union[str, Path, None] = None,
    seed: int = 0,
    progress: bool = True,
    config: Optional[DemoConfig] = None,
) -> Bench:
    """Build the data, and train (first run) or load (later runs) the base, heads and experts.

    ``cache_dir``: the cache root (default ``$EPMQ_CACHE_DIR/demo`` or ``~/.cache/epmq/demo``);
    the artifacts of one configuration and seed live in ``<cache_dir>/<config hash>/``.
    """
    config = config or DemoConfig()
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    cache = root / config.key(seed)
    tasks = get_tasks(config.tasks)

    split_path = cache / "splits.safetensors"
    splits = load_cached(split_path)
    if splits is None:
        _, digits = load_digits_tensors()
        splits = make_splits(digits, seed, config.splits)
        save_tensors(split_path, splits, {"what": "indices into sklearn's load_digits()"})

    data = build_task_data(tasks, splits, seed, config.splits.calib, limit=config.data_limit)
    pretrain = pretraining_images(splits, limit=config.data_limit)
    art = load_or_train(config, seed, cache, pretrain, data, progress=progress)
    return Bench(
        config=config,
        seed=seed,
        cache_dir=cache,
        tasks=tasks,
        splits=splits,
        data=data,
        base_state=art.base,
        experts={t.name: art.experts[t.name] for t in tasks},
        heads={t.name: art.heads[t.name] for t in tasks},
        meta=art.meta,
        trained=art.trained,
    )


# --------------------------------------------------------------------------- merge scales

# The scales the demo chooses among on validation (epmq.pipeline.choose_scale).
DEFAULT_SCALES = {
    "task_arithmetic": (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0),
    "ties": (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0, 1.3, 1.6),  # disjoint mean: 1 = one task vector
}
