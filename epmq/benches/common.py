"""What every bench family shares: the model template, lazy experts, evaluation bookkeeping."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..checkpoint_io import DTYPES, LazyStateDict, open_state
from .checkpoints import load_into, resolve
from .config import TEXT_FAMILIES, BenchConfig, BenchConfigError

StateDict = Mapping[str, torch.Tensor]
EVAL_SPLITS = ("val", "test")


def make_log(progress) -> Callable[[str], None]:
    if callable(progress):
        return progress
    if progress:
        return lambda msg: print(msg, file=sys.stderr, flush=True)
    return lambda msg: None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchConfigError(f"model.device is {name!r} but CUDA is not available")
    return device


def default_cache_dir() -> Path:
    env = os.environ.get("EPMQ_CACHE_DIR")
    if env:
        return Path(env) / "benches"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "epmq" / "benches"


class BenchBase:
    """The bench protocol of ``epmq.pipeline`` (see its docstring); a family fills in
    ``_template`` (the base model, CPU, eval mode), ``base_state``, ``experts``, ``data`` and
    ``_evaluate_task`` / ``_build_calibration``.

    ``model(state)`` is a fresh copy of the template with ``state`` loaded, on the bench's
    device; ``base_state`` and ``experts`` are ``LazyStateDict``s over the checkpoints on disk.
    """

    family = "?"

    def __init__(self, config: BenchConfig, log: Callable[[str], None]):
        self.config = config
        self.log = log
        self.progress = False  # (build_bench sets it: a bar per evaluation, task by task)
        self.device = pick_device(config.model.device)
        self.dtype = DTYPES[config.model.dtype]
        self.seed = config.seed
        self.task_names: List[str] = list(config.task_names)
        self.specs = {t.name: t for t in config.tasks}
        self._template: Optional[nn.Module] = None
        self.base_state: StateDict = {}
        self.experts: Dict[str, LazyStateDict] = {}
        self.data: Dict[str, object] = {}
        self._calibration = None

    # ----------------------------------------------------------------- checkpoints

    def _resolve(self, source: str, what: str, kind: str, revision=None) -> Path:
        m = self.config.model
        return resolve(source, base_dir=self.config.base_dir, what=what, kind=kind, revision=revision,
                       cache_dir=m.hub_cache_dir, offline=m.offline)

    def _open_experts(self, prefixes: Iterable[str] = ()) -> None:
        """Bind every task's expert checkpoint to the template's names (lazily, shapes checked)."""
        for t in self.config.tasks:
            what = f"expert of task {t.name!r}"
            path = self._resolve(t.expert, what, "weights", t.expert_revision)
            self.experts[t.name] = open_state(path, self._template, what=what, dtype=self.dtype, prefixes=prefixes,
                                              error=BenchConfigError)
            self.log(f"[bench] {what}: {path}")
        self._untie_held_apart()

    def _untie_held_apart(self) -> None:
        """Untie the template where an expert holds its own copy of a tensor the base ties (an
        untied fine-tune's trained head over a base with tied word embeddings), as ``epmq merge``
        unties its output: loaded into the tied template, the expert's head and embeddings went
        into one parameter (the last copied kept), so the expert's row and every merge evaluated
        another model than theirs. The head gets a parameter of its own, the base's values (its
        embeddings), and the config says ``tie_word_embeddings: false`` (a quantized checkpoint is
        saved so); refused where the config cannot untie it (transformers 5 ties every T5's)."""
        from ..checkpoint_io import parameter_aliases
        from ..merge_checkpoint import _check_untie

        followers = {}  # name held apart -> the name it is tied to in the template, and whose
        states = [s for s in (self.base_state, *self.experts.values()) if isinstance(s, LazyStateDict)]
        for names in parameter_aliases(self._template):
            for name in names[1:]:
                # an equal copy under its own key (a raw torch.save of a tied model stores both
                # names) is the one tensor, read so: else the merges took the names for two
                # tensors (DARE drew a mask for each, global TIES counted it twice)
                for state in states:
                    if (name in state and names[0] in state
                            and state.checkpoint_key(name) != state.checkpoint_key(names[0])
                            and torch.equal(state[name], state[names[0]])):
                        state.read_as(name, names[0])
                whose = next((t for t, e in self.experts.items()
                              if e.checkpoint_key(name) != e.checkpoint_key(names[0])
                              and not torch.equal(e[name], e[names[0]])), None)
                if whose is not None:
                    followers[name] = (names[0], whose)
        if not followers:
            return
        name, (leader, whose) = next(iter(followers.items()))
        why = f"the expert of task {whose!r} holds its own {name!r}, which the base ties to {leader!r}"
        base = getattr(self, "base_dir", None)
        if base is None:
            raise BenchConfigError(f"{why}: this bench cannot untie its model; give experts whose {name!r} is "
                                   f"their {leader!r}")
        try:
            _check_untie(Path(base), {n: lead for n, (lead, _) in followers.items()}, why)
        except ValueError as e:
            raise BenchConfigError(str(e)) from e
        model = self._template
        for name, (leader, _) in followers.items():
            parent, _, attr = name.rpartition(".")
            owner = model.get_submodule(parent)
            shared = owner._parameters[attr]
            owner.register_parameter(attr, nn.Parameter(shared.detach().clone(), requires_grad=shared.requires_grad))
            getattr(model, "all_tied_weights_keys", {}).pop(name, None)  # (transformers would tie it again)
        config = getattr(model, "config", None)
        if config is not None:  # as _untied: the top and each tower's config that says it
            for c in [config, *(v for v in vars(config).values() if hasattr(v, "tie_word_embeddings"))]:
                if hasattr(c, "tie_word_embeddings"):
                    c.tie_word_embeddings = False
        self.log(f"[bench] {why}: the model is untied (tie_word_embeddings: false), as epmq merge unties it")

    @property
    def identity(self) -> dict:
        """What the bench's numbers depend on (for ``epmq.pipeline.run(identity=...)``): the
        model, seed, calibration, evaluation settings and every task's settings, with paths made
        absolute (the same config run from another directory is the same bench) and the files
        of local data, experts, base and tokenizer fingerprinted by name, size and time (new
        data or a new model at the same path is another bench)."""
        c = self.config
        base_dir = Path(c.base_dir).absolute()

        def local(source):
            path = Path(str(source).removeprefix("local-dir:")).expanduser()  # (open_clip's schema)
            path = path if path.is_absolute() else base_dir / path
            return path if path.exists() else None

        def task(t):
            # (data roots are already joined to the config's directory; experts are not)
            root = None if t.data.root is None else Path(t.data.root).absolute()
            data = dict(vars(t.data), root=None if root is None else str(root))
            expert = local(t.expert)
            return dict(
                {k: v for k, v in vars(t).items() if k != "data"},
                expert=str(expert or t.expert), data=data,
                data_files=files_fingerprint(root if root is not None and root.exists() else None),
                expert_files=files_fingerprint(expert))

        model = {k: v for k, v in vars(c.model).items() if k not in ("device", "hub_cache_dir", "offline")}
        for key in ("base", "pretrained", "tokenizer"):  # (new weights or tokenizer at the same path too)
            if model.get(key) is not None and local(model[key]) is not None:
                path = local(model[key])
                model[key] = str(path)
                model[f"{key}_files"] = files_fingerprint(path)
        return {
            "rules": EVALUATION_RULES,
            "family": self.family, "model": model, "seed": c.seed, "max_input_tokens": c.max_input_tokens,
            "calibration": [c.calibration.samples, c.calibration.batch_size],
            "eval": {"max_samples": dict(c.eval.max_samples),
                     **({"decoding": c.eval.decoding, "max_new_tokens": c.eval.max_new_tokens}
                        if self.family in TEXT_FAMILIES else {})},
            "tasks": [task(t) for t in c.tasks],
        }

    # ----------------------------------------------------------------- protocol

    def model(self, state: Optional[StateDict] = None) -> nn.Module:
        """A fresh model of the architecture with ``state`` (default: the base's) loaded, on the
        bench's device, in eval mode."""
        model = copy.deepcopy(self._template)
        if state is not None and state is not self.base_state:
            load_into(model, state, "the state")
        return model.to(self.device).eval()

    @property
    def calibration(self) -> Dict[str, list]:
        """task -> list of model inputs (batches) drawn from the task's training examples."""
        if self._calibration is None:
            self._calibration = {t: self._build_calibration(t) for t in self.task_names}
        return self._calibration

    @torch.no_grad()
    def evaluate(self, model_or_state: Union[nn.Module, StateDict], split: str = "test",
                 tasks: Optional[Sequence[str]] = None) -> Dict[str, float]:
        """``{task: accuracy, ..., "avg": mean}`` of a model (any module called like the
        template, quantized ones included) or a state dict, on ``split`` ("val" or "test")."""
        if split not in EVAL_SPLITS:
            raise ValueError(f"split must be one of {EVAL_SPLITS}, got {split!r}")
        tasks = list(tasks or self.task_names)
        unknown = [t for t in tasks if t not in self.data]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}: the bench has {self.task_names}")
        model = model_or_state if isinstance(model_or_state, nn.Module) else self.model(model_or_state)
        was_training = model.training
        model.eval()
        try:
            out = {}
            for t in self._bar(tasks, f"evaluate on {split}"):
                out[t] = float(self._evaluate_task(model, t, split))
        finally:
            model.train(was_training)
        out["avg"] = sum(out.values()) / len(out)
        return out

    def expert_accuracies(self, split: str = "test") -> Dict[str, float]:
        """Each expert on its own task, and their mean (``"avg"``)."""
        if split not in EVAL_SPLITS:  # (before the first expert is built)
            raise ValueError(f"split must be one of {EVAL_SPLITS}, got {split!r}")
        out = {}
        for t in self._bar(self.task_names, f"experts on {split}"):
            model = self.model(self.experts[t])
            out[t] = self.evaluate(model, split, tasks=[t])[t]  # (one task: no bar of its own)
            del model
        out["avg"] = sum(out.values()) / len(out)
        return out

    def _bar(self, tasks, desc):
        """``tasks``, with a progress bar naming the one being evaluated (a test set of a paper
        bench takes minutes)."""
        from tqdm.auto import tqdm

        bar = tqdm(tasks, desc=desc, unit="task", leave=False, disable=not self.progress or len(tasks) < 2)
        for t in bar:
            bar.set_postfix_str(t)
            yield t

    def save_extras(self, directory) -> None:
        """Write beside a quantized checkpoint what serving it needs besides the weights."""

    # ----------------------------------------------------------------- family parts

    def _evaluate_task(self, model: nn.Module, task: str, split: str) -> float:
        raise NotImplementedError

    def _build_calibration(self, task: str) -> list:
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.family}, tasks={self.task_names}, device={self.device})"


# How the benches evaluate, in every bench identity: change it with any change of the code that
# changes their numbers, so that results stored before are not reused.
EVALUATION_RULES = ("2026-12-05: class names keep their '/', open_clip's zero-shot heads in fp32, experts' own "
                    "heads over a tied base, a tied tensor merged once, image files upright by their EXIF orientation; "
                    "2026-12-07: a class's images at any depth, .avif read, signed 8- and 16-bit TIFFs offset to "
                    "unsigned")


def files_fingerprint(path: Optional[Path]) -> Optional[str]:
    """Digest of the names, sizes and modification times of the files at ``path`` (a file or
    a directory tree); None for None."""
    import hashlib

    if path is None:
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.blake2b(digest_size=12)
    for f in files:
        stat = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()

