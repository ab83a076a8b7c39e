"""Tasks' examples: local layouts or HF ``datasets``, split into train / val / test.

Sources (``DataSpec.source``):

* ``folder`` (images): ``<root>/<split>/<class name>/**/*.png|jpg|jpeg|...`` (at any depth); classes
  are the sorted directory names of the train split (the display name replaces ``_`` by spaces).
* ``jsonl`` (text): ``<root>/<split>.jsonl``, one example a line with GLUE's field names
  (``sentence``, ``sentence1``/``sentence2``, ``question``/``sentence``, ``question1``/
  ``question2``, ``premise``/``hypothesis``) and ``label``.
* ``hf``: ``datasets.load_dataset(path, name, split=...)`` (an optional dependency, imported
  when used); images from ``image_column``, labels from ``label_column``, class names from its
  ``ClassLabel`` feature (or the task's ``classnames``).

Splits. ``train`` and ``test`` are dataset splits. ``val`` is the dataset split named by
``splits.val``, or else a seeded hold-out of ``val_size`` training examples (the held-out
examples are never used for calibration). Calibration examples are a seeded sample of the
remaining training examples. ``eval.max_samples`` caps val/test by a seeded subsample. Every
draw is a fixed function of the seed and the task's name (and, where its CRC-32 key collides with
another task's of the bench, of that: ``generator``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..calibration import _PLUGIN_IMAGE_SUFFIXES, IMAGE_SUFFIXES, image_tree, keyed_seeds, upright
from .config import BenchConfigError, DataSpec, repeated_class_names


def generator(seed: int, task: str, tasks: Sequence[str], *purpose: str) -> torch.Generator:
    """The generator of ``task``'s draw ``purpose`` (its held-out val, calibration sample, a cap):
    seeded by the CRC-32 of ``"{seed}/{task}/{purpose}"``, unless another of the bench's ``tasks``
    shares it (``keyed_seeds``: one sample for two tasks of one source otherwise)."""
    def key(name):
        return "/".join([str(seed), name, *purpose])

    return torch.Generator().manual_seed(keyed_seeds(map(key, {task, *tasks}))[key(task)])


# --------------------------------------------------------------------------- sources


def class_folders(root: Path) -> list:
    """The class directories of an image folder, sorted; hidden ones (``.ipynb_checkpoints``,
    a copy's ``.git``) are none (they made an extra class of the zero-shot head), as the
    calibration reader skips them."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


class FolderImages:
    """``<root>/<class>/**/<image>``: items ``(PIL image, label)``, each class's images in the
    order of their paths."""

    def __init__(self, root: Path, classes: Sequence[str], what: str):
        self.root = root
        index = {c: i for i, c in enumerate(classes)}
        self.items = []
        # (an image beside the class folders has no label: it was left out in silence, the split smaller than
        # its folder; refused, as class folders the train split lacks and images of formats not read are)
        stray = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() in IMAGE_SUFFIXES + _PLUGIN_IMAGE_SUFFIXES)
        if stray:
            raise BenchConfigError(f"{what}: {len(stray)} image file(s) directly in {root} ({stray[0].name}, ...) "
                                   f"are in no class folder, so of no class: move each into its class's folder "
                                   f"({root}/<class>/), or out of the split")
        for d in class_folders(root):
            if d.name not in index:
                raise BenchConfigError(f"{what}: class directory {d} is not a class of the train split")
            # (at any depth: a class's images in folders of their own were left out in silence; .heic ones, read
            # where pillow-heif is, named where not, as calibration's)
            try:
                files = image_tree(d, split=False)
            except ValueError as e:
                raise BenchConfigError(f"{what}: {e}") from e
            self.items += [(f, index[d.name]) for f in files]
        if not self.items:
            raise BenchConfigError(f"{what}: no images under {root} (expected {root}/<class>/*.png|jpg)")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as img:
            return upright(img), label  # (a new image already: a .copy() of it was one more of each)


class HFRows:
    """Rows of an HF dataset; ``item`` picks what an example is."""

    def __init__(self, ds, item: Callable):
        self.ds, self.item = ds, item

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.item(self.ds[int(i)])


class Records:
    """A list of dict examples (JSONL)."""

    def __init__(self, records: List[dict]):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]


class ImageRow:
    """An HF row -> ``(PIL image, label)`` (a class, so that DataLoader workers can pickle it)."""

    def __init__(self, image_column: str, label_column: str, what: str = "the dataset"):
        self.image_column, self.label_column, self.what = image_column, label_column, what

    def __call__(self, row):
        label = row[self.label_column]
        try:
            value = float(label)
        except (TypeError, ValueError):
            value = None
        # (a column of class names, "cat", ended the run in int()'s bare ValueError; 1.5 was class 1)
        if value is None or not value.is_integer():
            raise BenchConfigError(f"{self.what}: the label column {self.label_column!r} holds {label!r}, not a class index "
                                   f"(0, 1, ...): set data.label_column to the dataset's column of class indices")
        return _to_image(row[self.image_column]), int(value)


def _to_image(value):
    from PIL import Image

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        import io

        return upright(Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]))
    try:
        import numpy as np

        return Image.fromarray(np.asarray(value))
    except Exception as e:
        raise TypeError(f"cannot read an image from a {type(value).__name__}") from e


def load_hf_split(spec: DataSpec, split: str, what: str):
    try:
        import datasets
    except ImportError as e:
        raise BenchConfigError(
            f"{what}: the data is an HF dataset ({spec.path}) but the `datasets` library is not installed: "
            f"`pip install datasets`, or use local data (data.root)"
        ) from e
    try:
        return datasets.load_dataset(spec.path, spec.name, split=split, revision=spec.revision)
    except ValueError as e:
        if "split" in str(e).lower():
            raise BenchConfigError(f"{what}: {spec.describe()} has no split {split!r}: {e}") from e
        raise BenchConfigError(f"{what}: cannot load {spec.describe()} split {split!r}: {e}") from e
    except Exception as e:
        raise BenchConfigError(f"{what}: cannot load {spec.describe()} split {split!r}: {type(e).__name__}: {e}") from e


def readable(name: str) -> str:
    """A class name fit for a prompt: ``/a/apartment_building/outdoor`` -> ``apartment building outdoor``."""
    parts = [str(name)]  # (a "/" inside a name is its own: "Ram C/V Cargo Van", "20km/h")
    if parts[0].startswith("/"):  # SUN397's paths
        parts = [p for p in parts[0].split("/") if p]
        if len(parts) > 1 and len(parts[0]) == 1:  # SUN397's leading letter directory
            parts = parts[1:]
    return " ".join(" ".join(parts).replace("_", " ").split())


# --------------------------------------------------------------------------- splits


@dataclass
class Split:
    """Examples ``indices`` of a source (``split[k]`` is ``source[indices[k]]``)."""

    source: object
    indices: List[int]
    name: str

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        return self.source[self.indices[k]]


@dataclass
class TaskData:
    name: str
    splits: Dict[str, Split]  # train (without the held-out val), val, test
    calibration: Split
    classnames: Optional[List[str]] = None  # image tasks: display names by label


def _draw(n: int, k: Optional[int], gen: torch.Generator) -> List[int]:
    """``k`` of ``range(n)`` at random (all if ``k`` is None or >= n), in increasing order."""
    if k is None or k >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=gen)[:k].tolist())


def make_task_data(name: str, sources: Dict[str, object], spec: DataSpec, *, seed: int, calib_samples: int,
                   caps: Dict[str, Optional[int]], tasks: Sequence[str], classnames=None,
                   log: Callable = print) -> TaskData:
    """Split ``sources`` (split name -> indexable source; ``val`` may be absent) as the module says;
    ``tasks``: the bench's task names, whose draws differ from this one's (``generator``)."""
    what = f"task {name!r}"
    train = sources["train"]
    n_train = len(train)
    if n_train == 0:
        raise BenchConfigError(f"{what}: the train split ({spec.splits['train']}) is empty")
    perm = torch.randperm(n_train, generator=generator(seed, name, tasks, "val")).tolist()
    if "val" in sources:
        val, pool = Split(sources["val"], list(range(len(sources["val"]))), "val"), sorted(perm)
    else:
        n_val = int(round(spec.val_size * n_train)) if spec.val_size < 1 else int(spec.val_size)
        n_val = max(1, n_val)
        if n_val >= n_train:
            raise BenchConfigError(
                f"{what}: val_size {spec.val_size} holds out {n_val} of {n_train} training examples: "
                f"nothing left for calibration"
            )
        val, pool = Split(train, sorted(perm[:n_val]), "val"), sorted(perm[n_val:])
    if len(val) == 0 or len(sources["test"]) == 0:
        raise BenchConfigError(f"{what}: the {'val' if len(val) == 0 else 'test'} split is empty")
    if calib_samples > len(pool):
        log(f"[bench] task {name}: {len(pool)} training examples for calibration, fewer than the "
            f"{calib_samples} asked for: using all")
    calib = [pool[i] for i in _draw(len(pool), calib_samples, generator(seed, name, tasks, "calibration"))]
    test = Split(sources["test"], list(range(len(sources["test"]))), "test")
    splits = {"train": Split(train, pool, "train"), "val": val, "test": test}
    for s in ("val", "test"):
        cap = caps.get(s)
        if cap is not None and cap < len(splits[s]):
            keep = _draw(len(splits[s]), cap, generator(seed, name, tasks, s, "cap"))
            splits[s] = Split(splits[s].source, [splits[s].indices[k] for k in keep], s)
    return TaskData(name=name, splits=splits, calibration=Split(train, calib, "calibration"), classnames=classnames)


def _split_names(spec: DataSpec) -> Dict[str, str]:
    return {s: n for s, n in spec.splits.items() if n is not None}


def open_image_sources(name: str, spec: DataSpec, classnames: Optional[List[str]], read=None):
    """``({split: source}, display class names)`` of an image task; names that ``read`` (the
    model's tokenizer, ``repeated_class_names``) reads alike are refused."""
    what = f"task {name!r}"
    sources = {}
    if spec.source == "folder":
        if not spec.root.is_dir():
            raise BenchConfigError(f"{what}: data directory not found: {spec.root}")
        train_dir = spec.root / spec.splits["train"]
        if not train_dir.is_dir():
            raise BenchConfigError(f"{what}: missing data split {spec.splits['train']!r}: no directory {train_dir}")
        classes = [p.name for p in class_folders(train_dir)]
        if not classes:
            raise BenchConfigError(f"{what}: no class directories in {train_dir}")
        for s, split in _split_names(spec).items():
            d = spec.root / split
            if not d.is_dir():
                raise BenchConfigError(f"{what}: missing data split {split!r}: no directory {d}")
            sources[s] = FolderImages(d, classes, f"{what} ({s} split)")
        names = [readable(c) for c in classes]
    else:
        item = ImageRow(spec.image_column, spec.label_column, what)
        names = None
        for s, split in _split_names(spec).items():
            ds = load_hf_split(spec, split, what)
            for column in (spec.image_column, spec.label_column):
                if column not in ds.column_names:
                    raise BenchConfigError(
                        f"{what}: {spec.describe()} split {split!r} has no column {column!r} "
                        f"(columns: {ds.column_names}); set data.image_column / data.label_column"
                    )
            if s == "train":
                feature = ds.features[spec.label_column]
                if hasattr(feature, "names"):
                    names = [readable(c) for c in feature.names]
            sources[s] = HFRows(ds, item)
        if names is None and classnames is None:
            raise BenchConfigError(
                f"{what}: the label column {spec.label_column!r} of {spec.describe()} has no class names "
                f"(not a ClassLabel): list them in the task's classnames"
            )
    if classnames is not None:
        if names is not None and len(classnames) != len(names):
            raise BenchConfigError(f"{what}: {len(classnames)} classnames given, the data has {len(names)} classes")
        names = list(classnames)
    # (the config's own are checked as it is read, as every tokenizer of the family reads them)
    repeated = repeated_class_names(names, read)
    if repeated:
        whose = "the task's classnames" if classnames is not None else "the class names the data gives"
        raise BenchConfigError(f"{what}: {whose} read alike to the model's tokenizer {repeated}: list distinct "
                               f"ones in the task's classnames")
    return sources, names


def _decodes(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def open_text_sources(name: str, spec: DataSpec, fields: Sequence[str]):
    """``{split: source}`` of a text task (examples are dicts with ``fields`` and ``label``)."""
    what = f"task {name!r}"
    sources = {}
    for s, split in _split_names(spec).items():
        if spec.source == "jsonl":
            path = spec.root / f"{split}.jsonl"
            if not path.is_file():
                raise BenchConfigError(f"{what}: missing data split {split!r}: no file {path}")
            records = []
            try:
                with open(path, encoding="utf-8-sig") as f:  # (UTF-8, a BOM or none, whatever the locale)
                    for line_no, line in enumerate(f, 1):
                        if line.strip():
                            try:
                                records.append(json.loads(line))
                            except json.JSONDecodeError as e:
                                raise BenchConfigError(f"{what}: {path} line {line_no} is not JSON: {e}") from e
            except UnicodeDecodeError as e:
                # (decoded in chunks: the error's position is the chunk's; the line is found in the bytes,
                # where no UTF-8 character spans a newline)
                line_no = next(n for n, raw in enumerate(path.read_bytes().split(b"\n"), 1)
                               if not _decodes(raw))
                raise BenchConfigError(f"{what}: {path} line {line_no} is not UTF-8 text ({e.reason}): "
                                       f"save it as UTF-8") from e
            source = Records(records)
            columns = set(records[0]) if records else set()

        else:
            ds = load_hf_split(spec, split, what)
            source = HFRows(ds, dict)
            columns = set(ds.column_names)
        missing = [c for c in list(fields) + ["label"] if c not in columns]
        if missing and len(source):
            raise BenchConfigError(f"{what}: the {split!r} examples lack field(s) {missing} (have {sorted(columns)})")
        if spec.source == "jsonl":  # every record, not only the first
            for i, record in enumerate(records):
                lacking = [c for c in list(fields) + ["label"] if not isinstance(record, dict) or c not in record]
                if lacking:
                    raise BenchConfigError(f"{what}: record {i + 1} of {path} lacks field(s) {lacking}")
        sources[s] = source
    return sources
