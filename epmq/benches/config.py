"""The ``model``, ``tasks``, ``data`` and ``eval`` sections of an experiment's YAML, validated.

Everything here is checked without touching a file or the network: ``parse_config`` raises
``BenchConfigError`` (a ``ValueError``) naming the offending key. Whether files, hub ids and
data splits exist is checked when the bench is built (``epmq.benches.build_bench``).

::

    seed: 0                          # seeds the validation hold-out, calibration and eval caps
    model:
      family: hf_clip                # hf_clip | open_clip | hf_t5 | hf_causal_lm
      base: openai/clip-vit-base-patch32   # hub id or local directory
                                     #   (open_clip: a model name, "hf-hub:org/repo",
                                     #    "local-dir:/path" or a local directory)
      pretrained: null               # open_clip with a model name: pretrained tag or checkpoint file
      tokenizer: null                # optional: another tokenizer (hub id or local directory)
      revision: null                 # hub revision of the base
      dtype: float32                 # float32 | float16 | bfloat16 (models and expert reads)
      device: auto                   # auto (cuda when available) | cpu | cuda | cuda:N
      hub_cache_dir: null            # huggingface_hub cache (default: its own)
      offline: false                 # true: never download, use the hub cache only
    tasks:                           # a list (or a mapping name -> task)
      - name: sun397
        expert: tanganke/clip-vit-base-patch32_sun397   # hub id, directory or weights file
        data: {path: tanganke/sun397}                    # overrides of the data section below
        classnames: null             # image families: class names for the prompts
        templates: null              # image families: prompt templates with one "{}"
        # text families only: glue_task (default: the name), template ("{sentence}" fields),
        # answers (one string per label), regression (true for a score target)
    data:                            # defaults for every task (a task's data: overrides them)
      source: null                   # hf | folder | jsonl (default: hf with path, else local)
      path: null                     # HF datasets: dataset id ...
      name: null                     # ... and its configuration name
      revision: null
      root: null                     # local layouts: a task's data is in <root>/<task name>
      splits: {train: train, val: null, test: test}   # dataset split names; val null: held out
      val_size: 0.1                  # held-out part of train (fraction, or a count if >= 1)
      image_column: image            # HF image datasets
      label_column: label
      max_input_tokens: 256          # text families: longer inputs lose the end of their fields (not the instruction)
      calibration: {samples: 128, batch_size: 32}     # per task, from train (never val or test)
    eval:
      batch_size: 128
      num_workers: 4                 # image decoding workers (0: in the main process)
      max_samples: {val: null, test: null}  # cap per task and split (seeded subsample)
      cache: none                    # decoded images: none | memory | disk
      cache_dir: null                # disk cache location (default ~/.cache/epmq/benches)
      decoding: score                # text families: score (answer likelihoods) | generate (exact match)
      max_new_tokens: 8              # text families with decoding: generate

Relative paths are relative to ``base_dir`` (the YAML file's directory).
"""

from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from epmq_kernels.grid import is_flag, is_integer

FAMILIES = ("hf_clip", "open_clip", "hf_t5", "hf_causal_lm")
TEXT_FAMILIES = ("hf_t5", "hf_causal_lm")
IMAGE_FAMILIES = ("hf_clip", "open_clip")
SOURCES = ("hf", "folder", "jsonl")
DTYPES = ("float32", "float16", "bfloat16")
CACHES = ("none", "memory", "disk")
DECODINGS = ("score", "generate")
SPLITS = ("train", "val", "test")
GLUE_DATASET = "nyu-mll/glue"


class BenchConfigError(ValueError):
    """A bad experiment configuration (or a file, hub id or data split it names that is missing)."""


# --------------------------------------------------------------------------- helpers


def check_has_vocabulary(tokenizer, directory):
    """``tokenizer``, loaded from ``directory``; a BenchConfigError where it is transformers 5's
    stand-in of special tokens alone for a directory without tokenizer files, which reads every
    text as nothing or unknown tokens (and the tasks were evaluated so)."""
    from ..vocabulary import holds_no_vocabulary

    if holds_no_vocabulary(tokenizer, directory):
        raise BenchConfigError(f"cannot load the tokenizer from {directory}: it holds no tokenizer files (transformers "
                               f"built one of special tokens alone); copy the model's tokenizer files into it, or "
                               f"name them with model.tokenizer")
    return tokenizer


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BenchConfigError(f"{where} must be a mapping, got {type(value).__name__}: {value!r}")
    return dict(value)


def _check_keys(d: Mapping, allowed, where: str) -> None:
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise BenchConfigError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in {where}; allowed: {', '.join(sorted(allowed))}"
        )


def _int(value, where: str, minimum: int = 1, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if not is_integer(value) or value < minimum:  # (numpy's too: a sweep's values read from arrays)
        raise BenchConfigError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return int(value)  # (held as Python's: the bench's identity is JSON)


def _choice(value, choices, where: str) -> str:
    if value not in choices:
        raise BenchConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _str(value, where: str, allow_none: bool = True) -> Optional[str]:
    if value is None and allow_none:
        return None
    if not isinstance(value, (str, Path)) or not str(value).strip():
        raise BenchConfigError(f"{where} must be a non-empty string, got {value!r}")
    return str(value)


def _str_list(value, where: str) -> Optional[List[str]]:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise BenchConfigError(f"{where} must be a non-empty list of strings, got {value!r}")
    return list(value)


def repeated_class_names(names: List[str], read=None) -> List[str]:
    """The names of ``names`` that the model's tokenizer reads as another's: ``read(names)``, how
    it reads each (its token ids); by default as CLIP's own tokenizers do (open_clip's and
    transformers' lowercase and collapse whitespace: "Cat" and " cat" are one prompt, one text
    embedding, and every example of either is predicted as the first). open_clip's HFTokenizer
    over a tokenizer that keeps case (XLM-R, RoBERTa CLIPs) reads "Cat" and "cat" as two."""
    read = [" ".join(name.split()).lower() for name in names] if read is None else list(read(names))
    return sorted({name for name, r in zip(names, read) if read.count(r) > 1})


def _bool(value, where: str) -> bool:
    if not is_flag(value):  # (np.True_ too)
        raise BenchConfigError(f"{where} must be true or false, got {value!r}")
    return bool(value)


# --------------------------------------------------------------------------- sections


@dataclass
class ModelSpec:
    family: str
    base: str
    pretrained: Optional[str] = None
    tokenizer: Optional[str] = None
    revision: Optional[str] = None
    dtype: str = "float32"
    device: str = "auto"
    hub_cache_dir: Optional[str] = None
    offline: bool = False

    KEYS = ("family", "base", "pretrained", "tokenizer", "revision", "dtype", "device", "hub_cache_dir", "offline")

    @classmethod
    def parse(cls, raw) -> "ModelSpec":
        d = _mapping(raw, "model")
        if not d:
            raise BenchConfigError("the config has no 'model' section (family and base)")
        _check_keys(d, cls.KEYS, "model")
        if "family" not in d:
            raise BenchConfigError(f"model.family is missing: one of {', '.join(FAMILIES)}")
        family = d["family"]
        if family not in FAMILIES:
            raise BenchConfigError(f"unknown model family {family!r}: one of {', '.join(FAMILIES)}")
        if not d.get("base"):
            raise BenchConfigError("model.base is missing: the pretrained model (hub id or local path)")
        if d.get("pretrained") is not None and family != "open_clip":
            raise BenchConfigError("model.pretrained is for the open_clip family only")
        device = _str(d.get("device", "auto"), "model.device", allow_none=False)
        if not (device in ("auto", "cpu", "cuda") or device.startswith("cuda:")):
            raise BenchConfigError(f"model.device must be auto, cpu, cuda or cuda:N, got {device!r}")
        return cls(
            family=family,
            base=_str(d["base"], "model.base", allow_none=False),
            pretrained=_str(d.get("pretrained"), "model.pretrained"),
            tokenizer=_str(d.get("tokenizer"), "model.tokenizer"),
            revision=_str(d.get("revision"), "model.revision"),
            dtype=_choice(d.get("dtype", "float32"), DTYPES, "model.dtype"),
            device=device,
            hub_cache_dir=_str(d.get("hub_cache_dir"), "model.hub_cache_dir"),
            offline=_bool(d.get("offline", False), "model.offline"),
        )


@dataclass
class DataSpec:
    """Where one task's examples come from (the global ``data`` section merged with the task's)."""

    source: str
    path: Optional[str] = None
    name: Optional[str] = None
    revision: Optional[str] = None
    root: Optional[Path] = None
    splits: Dict[str, Optional[str]] = field(default_factory=dict)
    val_size: float = 0.1
    image_column: str = "image"
    label_column: str = "label"

    KEYS = ("source", "path", "name", "revision", "root", "splits", "val_size", "image_column", "label_column")

    def describe(self) -> str:
        if self.source == "hf":
            return f"HF dataset {self.path}" + (f" ({self.name})" if self.name else "")
        return f"{self.source} data in {self.root}"


@dataclass
class CalibrationSpec:
    samples: int = 128
    batch_size: int = 32


@dataclass
class TaskSpec:
    name: str
    expert: str
    data: DataSpec
    expert_revision: Optional[str] = None
    classnames: Optional[List[str]] = None
    templates: Optional[List[str]] = None
    glue_task: Optional[str] = None
    template: Optional[str] = None
    answers: Optional[List[str]] = None
    regression: Optional[bool] = None

    IMAGE_KEYS = ("classnames", "templates")
    TEXT_KEYS = ("glue_task", "template", "answers", "regression")
    KEYS = ("name", "expert", "expert_revision", "data") + IMAGE_KEYS + TEXT_KEYS


@dataclass
class EvalSpec:
    batch_size: int = 128
    num_workers: int = 4
    max_samples: Dict[str, Optional[int]] = field(default_factory=lambda: {"val": None, "test": None})
    cache: str = "none"
    cache_dir: Optional[Path] = None
    decoding: str = "score"
    max_new_tokens: int = 8

    KEYS = ("batch_size", "num_workers", "max_samples", "cache", "cache_dir", "decoding", "max_new_tokens")

    @classmethod
    def parse(cls, raw, base_dir: Path) -> "EvalSpec":
        d = _mapping(raw, "eval")
        _check_keys(d, cls.KEYS, "eval")
        caps = d.get("max_samples", {})
        if caps is None or is_integer(caps):  # one cap for both splits
            caps = {"val": caps, "test": caps}
        caps = _mapping(caps, "eval.max_samples")
        _check_keys(caps, ("val", "test"), "eval.max_samples")
        cache_dir = d.get("cache_dir")
        return cls(
            batch_size=_int(d.get("batch_size", 128), "eval.batch_size"),
            num_workers=_int(d.get("num_workers", 4), "eval.num_workers", minimum=0),
            max_samples={s: _int(caps.get(s), f"eval.max_samples.{s}", allow_none=True) for s in ("val", "test")},
            cache=_choice(d.get("cache", "none"), CACHES, "eval.cache"),
            cache_dir=None if cache_dir is None else _path(cache_dir, base_dir),
            decoding=_choice(d.get("decoding", "score"), DECODINGS, "eval.decoding"),
            max_new_tokens=_int(d.get("max_new_tokens", 8), "eval.max_new_tokens"),
        )


@dataclass
class BenchConfig:
    model: ModelSpec
    tasks: List[TaskSpec]
    calibration: CalibrationSpec
    eval: EvalSpec
    seed: int = 0
    max_input_tokens: int = 256
    base_dir: Path = Path(".")

    @property
    def task_names(self) -> List[str]:
        return [t.name for t in self.tasks]


# --------------------------------------------------------------------------- parsing


def _path(value, base_dir: Path) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


def _default_splits(family: str, glue_task: Optional[str]) -> Dict[str, Optional[str]]:
    if family in TEXT_FAMILIES:  # GLUE's test labels are hidden: its validation split is the test set
        return {"train": "train", "val": None, "test": "validation_matched" if glue_task == "mnli" else "validation"}
    return {"train": "train", "val": None, "test": "test"}


def _data_spec(family: str, task_name: str, glue_task: Optional[str], shared: dict, own: dict,
               base_dir: Path) -> DataSpec:
    where = f"task {task_name!r}: data"
    _check_keys(own, DataSpec.KEYS, where)
    merged = {k: v for k, v in shared.items() if v is not None}
    own_splits = own.get("splits")
    merged.update({k: v for k, v in own.items() if k != "splits"})
    splits = _default_splits(family, glue_task)
    for part in (shared.get("splits"), own_splits):
        part = _mapping(part, f"{where}.splits")
        _check_keys(part, SPLITS, f"{where}.splits")
        splits.update(part)
    for s in ("train", "test"):
        if not splits.get(s):
            raise BenchConfigError(f"{where}.splits.{s} is missing: the name of the dataset's {s} split")
    for s, v in splits.items():
        if v is not None and not isinstance(v, str):
            raise BenchConfigError(f"{where}.splits.{s} must be a split name, got {v!r}")
    named = [(s, v) for s, v in splits.items() if v is not None]
    for j, (s, v) in enumerate(named):
        other = next((o for o, w in named[:j] if w == v), None)
        if other is not None:  # (choices made on test data, or training examples scored as test)
            raise BenchConfigError(f"{where}.splits: {other} and {s} both name the split {v!r}; each must be its "
                                   f"own (leave val out to hold it out of train)")

    local = "jsonl" if family in TEXT_FAMILIES else "folder"
    source = own.get("source")  # the task's own choice first, then the shared section's
    if source is None:
        if own.get("path"):
            source = "hf"
        elif own.get("root"):
            source = local
        elif shared.get("source"):
            source = shared["source"]
        elif shared.get("path") or family in TEXT_FAMILIES:
            source = "hf"
        elif shared.get("root"):
            source = local
        else:
            raise BenchConfigError(
                f"task {task_name!r} has no data: give data.path (an HF dataset id) or data.root (a local directory)"
            )
    if family in TEXT_FAMILIES and source == "hf" and not merged.get("path"):
        merged["path"] = GLUE_DATASET  # the GLUE benchmark on the HF hub
    _choice(source, SOURCES, f"{where}.source")
    if family in IMAGE_FAMILIES and source == "jsonl":
        raise BenchConfigError(f"{where}.source: jsonl holds text; image tasks use hf or folder")
    if family in TEXT_FAMILIES and source == "folder":
        raise BenchConfigError(f"{where}.source: folder holds images; text tasks use hf or jsonl")
    for column in ("image_column", "label_column"):
        if family in TEXT_FAMILIES and merged.get(column, column.split("_")[0]) != column.split("_")[0]:
            raise BenchConfigError(f"{where}.{column} is for image datasets; text tasks read the fields "
                                   f"their template names and 'label'")

    root = None
    if source == "hf":
        if not merged.get("path"):
            raise BenchConfigError(f"{where}.path is missing: the HF dataset id for source hf")
        if family in TEXT_FAMILIES:
            merged.setdefault("name", glue_task)
    else:
        if "root" in own:  # the task's own root is its directory
            root = _path(own["root"], base_dir)
        elif shared.get("root"):  # the shared root holds one directory per task
            root = _path(shared["root"], base_dir) / task_name
        else:
            raise BenchConfigError(f"{where}.root is missing: the local directory of the task's {source} data")

    val_size = merged.get("val_size", 0.1)
    if is_integer(val_size):  # (numpy's counts and fractions too, held as Python's)
        val_size = int(val_size)
    elif isinstance(val_size, numbers.Real) and not is_flag(val_size):
        val_size = float(val_size)
    # (not val_size > 0: NaN passes every comparison, and the hold-out ended in int()'s bare error)
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)) or not val_size > 0 or (
        isinstance(val_size, float) and val_size >= 1 and not float(val_size).is_integer()
    ):
        raise BenchConfigError(f"{where}.val_size must be a fraction in (0, 1) or a count >= 1, got {val_size!r}")
    return DataSpec(
        source=source,
        path=_str(merged.get("path"), f"{where}.path"),
        name=_str(merged.get("name"), f"{where}.name"),
        revision=_str(merged.get("revision"), f"{where}.revision"),
        root=root,
        splits={s: splits.get(s) for s in SPLITS},
        val_size=val_size,
        image_column=_str(merged.get("image_column", "image"), f"{where}.image_column", allow_none=False),
        label_column=_str(merged.get("label_column", "label"), f"{where}.label_column", allow_none=False),
    )


def _task_list(raw) -> List[dict]:
    if raw is None:
        raise BenchConfigError("the config has no 'tasks' section: a list of tasks with their experts and data")
    if isinstance(raw, Mapping):  # name -> spec
        items = []
        for name, spec in raw.items():
            spec = _mapping(spec, f"task {name!r}")
            if "name" in spec and spec["name"] != name:
                raise BenchConfigError(f"task {name!r} has a different name {spec['name']!r} inside")
            items.append(dict(spec, name=name))
        raw = items
    if not isinstance(raw, (list, tuple)) or not raw:
        raise BenchConfigError("tasks must be a non-empty list of tasks (or a mapping name -> task)")
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            raise BenchConfigError(f"task {item!r} has no expert: give a mapping with name, expert and data")
        out.append(_mapping(item, f"tasks[{i}]"))
    return out


def parse_config(config: Mapping[str, Any], *, base_dir=".") -> BenchConfig:
    """Validate the bench sections of ``config`` (a dict, as loaded from YAML)."""
    if not isinstance(config, Mapping):
        raise BenchConfigError(f"the config must be a mapping, got {type(config).__name__}")
    config = copy.deepcopy(dict(config))
    base_dir = Path(base_dir)
    model = ModelSpec.parse(config.get("model"))
    family = model.family

    shared = _mapping(config.get("data"), "data")
    _check_keys(shared, DataSpec.KEYS + ("calibration", "max_input_tokens"), "data")
    calib = _mapping(shared.pop("calibration", None), "data.calibration")
    _check_keys(calib, ("samples", "batch_size"), "data.calibration")
    calibration = CalibrationSpec(
        samples=_int(calib.get("samples", 128), "data.calibration.samples"),
        batch_size=_int(calib.get("batch_size", 32), "data.calibration.batch_size"),
    )
    max_input_tokens = _int(shared.pop("max_input_tokens", 256), "data.max_input_tokens")
    _choice(shared.get("source", "hf"), SOURCES, "data.source")

    tasks, seen = [], set()
    for raw in _task_list(config.get("tasks")):
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            raise BenchConfigError(f"a task has no name: {raw!r}")
        where = f"task {name!r}"
        _check_keys(raw, TaskSpec.KEYS, where)
        if name in seen:
            raise BenchConfigError(f"task {name!r} is listed twice")
        if name == "avg":  # (evaluate's {task: acc, ..., "avg": mean}: its accuracy became the mean)
            raise BenchConfigError("a task may not be named 'avg': the mean of the tasks is reported under it")
        seen.add(name)
        if not raw.get("expert"):
            raise BenchConfigError(f"task {name!r} has no expert: the fine-tuned checkpoint (hub id or local path)")
        wrong = TaskSpec.TEXT_KEYS if family in IMAGE_FAMILIES else TaskSpec.IMAGE_KEYS
        misplaced = [k for k in wrong if raw.get(k) is not None]
        if misplaced:
            raise BenchConfigError(f"{where}: {', '.join(misplaced)} do not apply to the {family} family")
        glue_task = raw.get("glue_task", name) if family in TEXT_FAMILIES else None
        regression = raw.get("regression")
        if regression is not None:
            _bool(regression, f"{where}.regression")
        task = TaskSpec(
            name=name,
            expert=_str(raw["expert"], f"{where}.expert", allow_none=False),
            expert_revision=_str(raw.get("expert_revision"), f"{where}.expert_revision"),
            data=_data_spec(family, name, glue_task, shared, _mapping(raw.get("data"), f"{where}.data"), base_dir),
            classnames=_str_list(raw.get("classnames"), f"{where}.classnames"),
            templates=_str_list(raw.get("templates"), f"{where}.templates"),
            glue_task=glue_task,
            template=_str(raw.get("template"), f"{where}.template"),
            answers=_str_list(raw.get("answers"), f"{where}.answers"),
            regression=regression,
        )
        for key in ("classnames", "answers"):
            # (one label's answer or class name given to another: both score the same, so every
            # example of either was predicted as the first, an accuracy with no error said)
            named = getattr(task, key) or []
            # a class name as CLIP's tokenizers see it (open_clip's and transformers' lowercase
            # and collapse whitespace): "Cat" and " cat" are one prompt, one text embedding; a
            # model's tokenizer may keep case (open_clip's HFTokenizer, hf_clip's model.tokenizer):
            # its bench reads them with it once it is built, and this as every tokenizer does
            spaced = (lambda names: [" ".join(n.split()) for n in names]) if family in IMAGE_FAMILIES else None
            repeated = repeated_class_names(named, spaced) if key == "classnames" else \
                sorted({v for v in named if named.count(v) > 1})
            if repeated:
                raise BenchConfigError(f"{where}.{key} repeats {repeated}: each label needs its own")
        if task.templates is not None:
            bad = [t for t in task.templates if t.count("{}") != 1]
            if bad:
                raise BenchConfigError(f"{where}.templates: each needs exactly one '{{}}' for the class name: {bad}")
        tasks.append(task)

    seed = config.get("seed", 0)
    if not is_integer(seed):  # (numpy's too, held as Python's)
        raise BenchConfigError(f"seed must be an integer, got {seed!r}")
    seed = int(seed)
    return BenchConfig(
        model=model,
        tasks=tasks,
        calibration=calibration,
        eval=EvalSpec.parse(config.get("eval"), base_dir),
        seed=seed,
        max_input_tokens=max_input_tokens,
        base_dir=base_dir,
    )
