"""Zero-shot image classification with frozen text heads: what the HF CLIP and open_clip benches share.

A task's head ``P [C, D]`` is built once from the *pretrained* model's text tower: for each
class, the normalized text embeddings of the task's prompt templates filled with the class
name are averaged and normalized again. Every model (base, experts, merged, quantized) is
scored through the same frozen heads:

    logits = logit_scale * normalize(image_features(model, x)) @ P^T

where ``image_features`` is the vision tower's output followed by the base's (frozen) visual
projection (inside the tower for open_clip). Only the vision tower is merged and quantized.

Images go through one fixed preprocessing, the model's own (resize, center crop, uint8); the
normalization by mean and std happens on the model's device. ``eval.cache`` keeps the uint8
crops of each (task, split) after the first pass, in memory or in a memory-mapped file under
``eval.cache_dir``, so that later evaluations skip decoding.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .._util import device_of, dtype_of, own_temporary, remove_stale_temporaries, temporary_beside
from ..calibration import rgb_image
from .common import EVALUATION_RULES, BenchBase, default_cache_dir, files_fingerprint
from .config import BenchConfigError
from .data import FolderImages, Split, make_task_data, open_image_sources
from .prompts import image_templates

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImagePrep:
    """Resize the shortest side to ``resize``, center-crop to ``crop`` (h, w), keep uint8; then
    (on the device) scale by ``rescale`` and normalize by ``mean``/``std``. ``resize`` (h, w): the
    image scaled, aspect ratio kept, until it covers (h, w) (open_clip's non-square ``shortest``).
    ``resize_mode="squash"``: the whole image resized to ``resize`` (h, w) (or to ``crop``),
    aspect ratio not kept (open_clip's squash, HF's ``size: {height, width}``), then cropped.
    ``rgb``: "first", to RGB before resizing, transparency onto white (HF's ``convert_to_rgb``);
    "last", resized in the image's own mode (a palette image: nearest), then ``convert("RGB")``
    (open_clip's eval transform)."""

    resize: Union[int, Tuple[int, int]]
    crop: Tuple[int, int]
    mean: Tuple[float, float, float] = OPENAI_MEAN
    std: Tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    crop_offset: str = "floor"  # "floor": (size - crop) // 2, as HF image processors; "round": as torchvision
    resize_mode: str = "shortest"  # or "squash"
    rgb: str = "first"  # or "last"
    rescale: float = 1 / 255

    def uint8(self, image) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        if self.rgb == "first":
            image = rgb_image(image)
        mode = InterpolationMode(self.interpolation)
        if self.resize_mode == "squash":
            size = self.resize if isinstance(self.resize, (tuple, list)) else self.crop
            image = TF.resize(image, list(size), interpolation=mode)
        elif isinstance(self.resize, (tuple, list)):
            ratio = min(image.height / self.resize[0], image.width / self.resize[1])
            image = TF.resize(image, [round(image.height / ratio), round(image.width / ratio)], interpolation=mode)
        else:
            image = TF.resize(image, self.resize, interpolation=mode)
        (h, w), (ch, cw) = (image.height, image.width), self.crop
        if h < ch or w < cw or self.crop_offset == "round":
            image = TF.center_crop(image, list(self.crop))
        else:
            top, left = (h - ch) // 2, (w - cw) // 2
            image = image.crop((left, top, left + cw, top + ch))
        return TF.pil_to_tensor(image if image.mode == "RGB" else image.convert("RGB"))  # ("last")

    def normalize(self, x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        x = x.float() / 255.0 if self.rescale == 1 / 255 else x.float() * self.rescale
        return ((x - mean) / std).to(dtype)


class _Images(Dataset):
    def __init__(self, split: Split, prep: ImagePrep):
        self.split, self.prep = split, prep

    def __len__(self):
        return len(self.split)

    def __getitem__(self, k):
        image, label = self.split[k]
        try:
            return self.prep.uint8(image), int(label)
        except ValueError as e:  # (rgb_image's, a float image off [0, 1]: named among the split's thousands)
            i, source = self.split.indices[k], self.split.source
            where = source.items[i][0] if isinstance(source, FolderImages) else f"example {i}"
            raise ValueError(f"{self.split.name} split: {where}: {e}") from e


class _Store:
    """uint8 crops and labels of one (task, split): filled on the first pass, then read back."""

    def __init__(self, n: int, shape, path: Optional[Path]):
        self.path = path
        self.complete = False
        if path is not None and self._file(".done").exists():
            import numpy as np

            self.x = torch.from_numpy(np.load(self._file(".npy"), mmap_mode="c"))
            # (tensors only, whatever torch's default: before 2.6 it unpickled anything,
            # running the code of any file put in the cache directory)
            self.y = torch.load(self._file(".labels.pt"), weights_only=True)
            self.complete = True
        elif path is not None:
            import numpy as np

            path.parent.mkdir(parents=True, exist_ok=True)
            # filled in a file of this store's own, put in place by finish(): another run filling
            # the same crops at once opened the shared file "w+", truncating it under this one's
            # map (the images written so far read back as zeros), and this one's .done then made
            # the zeros the cache of every later run
            remove_stale_temporaries(path.parent, glob.escape(path.name) + ".*")
            self._tmp = temporary_beside(path.with_name(path.name + ".npy"), unique=True)
            self._mm = np.lib.format.open_memmap(self._tmp, mode="w+", dtype=np.uint8, shape=(n, *shape))
            self.x = torch.from_numpy(self._mm)
            self.y = torch.empty(n, dtype=torch.int64)
        else:
            self.x = torch.empty((n, *shape), dtype=torch.uint8)
            self.y = torch.empty(n, dtype=torch.int64)

    def _file(self, suffix: str) -> Path:
        return self.path.parent / (self.path.name + suffix)

    def finish(self):
        if self.path is not None:
            self._mm.flush()
            labels = own_temporary(self._tmp.with_name(self._tmp.name.replace(".npy.tmp-", ".labels.pt.tmp-")))
            torch.save(self.y, labels)
            os.replace(self._tmp, self._file(".npy"))  # (the map stays this store's: the same file)
            os.replace(labels, self._file(".labels.pt"))
            self._file(".done").write_text(f"{len(self.y)} images\n", encoding="utf-8")
        self.complete = True


class ZeroShotImageBench(BenchBase):
    """Image tasks through frozen zero-shot heads (see the module docstring)."""

    prep: ImagePrep
    logit_scale: float = 100.0

    def _open_data(self) -> None:
        cfg = self.config
        for t in cfg.tasks:
            sources, names = open_image_sources(t.name, t.data, t.classnames, self.read_class_names)
            self.data[t.name] = make_task_data(
                t.name, sources, t.data, seed=cfg.seed, calib_samples=cfg.calibration.samples,
                caps=cfg.eval.max_samples, tasks=cfg.task_names, classnames=names, log=self.log,
            )
            d = self.data[t.name]
            self.log(f"[bench] task {t.name}: {len(names)} classes, {t.data.describe()}; "
                     + ", ".join(f"{s} {len(d.splits[s])}" for s in ("train", "val", "test")))
        self._heads: Optional[Dict[str, torch.Tensor]] = None
        self._stores: Dict[Tuple[str, str], _Store] = {}

    # How the model's tokenizer reads class names (``repeated_class_names``): CLIP's rule by default
    read_class_names = None

    # ----------------------------------------------------------------- heads

    def templates(self, task: str) -> List[str]:
        return self.specs[task].templates or image_templates(task)

    @property
    def heads(self) -> Dict[str, torch.Tensor]:
        """task -> frozen head ``[classes, D]`` (unit rows, float32, CPU), built once."""
        if self._heads is None:
            heads = {}
            with torch.no_grad():
                for t in self.task_names:
                    classes, templates = self.data[t].classnames, self.templates(t)
                    texts = [tpl.format(c) for c in classes for tpl in templates]
                    emb = self._encode_texts(texts).float().cpu()
                    emb = F.normalize(emb, dim=-1).view(len(classes), len(templates), -1).mean(1)
                    heads[t] = F.normalize(emb, dim=-1)
            self._heads = heads
            self._release_text_tower()
            self.log(f"[bench] zero-shot heads built ({sum(len(h) for h in heads.values())} classes)")
        return self._heads

    def _encode_texts(self, texts: List[str]) -> torch.Tensor:
        raise NotImplementedError

    def _release_text_tower(self) -> None:
        pass

    def _image_features(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _calibration_item(self, pixel_values: torch.Tensor):
        raise NotImplementedError

    def logits(self, model: nn.Module, task: str, pixel_values: torch.Tensor) -> torch.Tensor:
        head = self.heads[task].to(pixel_values.device)
        feats = F.normalize(self._image_features(model, pixel_values).float(), dim=-1)
        return self.logit_scale * feats @ head.t()

    # ----------------------------------------------------------------- images

    def _loader(self, split: Split, shuffle=False) -> DataLoader:
        ev = self.config.eval
        return DataLoader(_Images(split, self.prep), batch_size=ev.batch_size, shuffle=shuffle,
                          num_workers=ev.num_workers, persistent_workers=False)

    def _store_path(self, task: str, split: str) -> Optional[Path]:
        if self.config.eval.cache != "disk":
            return None
        spec = self.specs[task].data
        # the whole spec (revision, columns) and the local files' names, sizes and times: images
        # changed on disk, or another revision, are read again, not served from the old crops; and the
        # rules: crops read by other code (EXIF orientation, signed TIFFs) are read again too
        root = None if spec.root is None else Path(spec.root).absolute()
        ident = {"task": task, "rules": EVALUATION_RULES, "data": asdict(spec),
                 "files": files_fingerprint(root if root is not None and root.exists() else None),
                 "split": spec.splits.get(split), "seed": self.seed,
                 "indices": hashlib.sha256(str(self.data[task].splits[split].indices).encode()).hexdigest(),
                 "prep": asdict(self.prep)}
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
        root = self.config.eval.cache_dir or default_cache_dir()
        return Path(root) / f"{task}-{split}-{digest}"

    def image_batches(self, task: str, split: str):
        """``(uint8 images [B, 3, H, W], labels [B])`` of a task's split, in order."""
        bs = self.config.eval.batch_size
        store = self._stores.get((task, split))
        if store is None and self.config.eval.cache != "none":
            n = len(self.data[task].splits[split])
            store = _Store(n, (3, *self.prep.crop), self._store_path(task, split))
            self._stores[(task, split)] = store
        if store is not None and store.complete:
            for i in range(0, len(store.y), bs):
                yield store.x[i:i + bs], store.y[i:i + bs]
            return
        pos = 0
        for x, y in self._loader(self.data[task].splits[split]):
            if store is not None:
                store.x[pos:pos + len(y)] = x
                store.y[pos:pos + len(y)] = y
            pos += len(y)
            yield x, y
        if store is not None:
            store.finish()

    # ----------------------------------------------------------------- protocol parts

    def _evaluate_task(self, model: nn.Module, task: str, split: str) -> float:
        device, dtype = device_of(model), dtype_of(model)
        classes = len(self.data[task].classnames)  # (the rows of its head)
        correct = total = 0
        for x, y in self.image_batches(task, split):
            # a label with no row in the head (a split that hides its labels as -1, or fewer
            # class names than labels) is never the argmax: it was scored wrong, silently
            bad = (y < 0) | (y >= classes)
            if bool(bad.any()):
                raise BenchConfigError(
                    f"task {task!r}: the {split} split has label {int(y[bad][0])}, expected a label in "
                    f"0..{classes - 1} (one per class name; a split that hides its labels as -1 cannot be "
                    f"scored: name another as the test split)")
            pv = self.prep.normalize(x.to(device, non_blocking=True), dtype)
            pred = self.logits(model, task, pv).argmax(-1).cpu()
            correct += int((pred == y).sum())
            total += len(y)
        return correct / total

    def _build_calibration(self, task: str) -> list:
        split = self.data[task].calibration
        images = torch.cat([x for x, _ in self._loader(split)]) if len(split) else torch.empty(0)
        pixel_values = self.prep.normalize(images, self.dtype)
        return [self._calibration_item(x) for x in pixel_values.split(self.config.calibration.batch_size)]


_PROCESSORS = {"CLIPImageProcessor": 3, "CLIPImageProcessorFast": 3,  # (their default resample)
               "CLIPFeatureExtractor": 3,  # (what openai's own checkpoints name)
               "SiglipImageProcessor": 3, "SiglipImageProcessorFast": 3}


def prep_from_processor_config(cfg: dict, image_size: int) -> ImagePrep:
    """``ImagePrep`` equivalent to a CLIP (or SigLIP) image processor's ``preprocessor_config.json``;
    a setting it cannot reproduce is refused by name."""
    kind = cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or "CLIPImageProcessor"
    if kind not in _PROCESSORS:
        raise BenchConfigError(f"preprocessor_config.json: image_processor_type {kind!r} is not reproduced by this "
                               f"bench (only {', '.join(_PROCESSORS)})")
    crops = kind.startswith("CLIP") and cfg.get("do_center_crop", True)  # (SigLIP's processor never crops)
    if not cfg.get("do_resize", True):
        raise BenchConfigError("preprocessor_config.json: do_resize false (images of every size, uncropped or "
                               "padded) is not reproduced by this bench")
    size, squash = cfg.get("size", image_size), False
    if isinstance(size, dict):
        if set(size) == {"height", "width"}:
            size, squash = (int(size["height"]), int(size["width"])), True
        elif set(size) == {"shortest_edge"}:
            size = int(size["shortest_edge"])
        else:
            raise BenchConfigError(f"preprocessor_config.json: size {size} is not reproduced by this bench "
                                   f"(shortest_edge, or height and width)")
    if not crops and not squash:
        raise BenchConfigError("preprocessor_config.json: do_center_crop false with a shortest_edge size "
                               "(images of different shapes) is not reproduced by this bench")
    crop = cfg.get("crop_size", size) if crops else size
    if isinstance(crop, dict):
        crop = (crop.get("height", size), crop.get("width", size))
    elif isinstance(crop, int):
        crop = (crop, crop)
    resample = cfg.get("resample", _PROCESSORS[kind])
    interpolation = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(resample)
    if interpolation is None:
        raise BenchConfigError(f"preprocessor_config.json: resample {resample!r} is not reproduced by this bench "
                               f"(0 nearest, 2 bilinear, 3 bicubic)")
    normalize = cfg.get("do_normalize", True)
    return ImagePrep(resize=size, crop=tuple(int(c) for c in crop),
                     mean=tuple(cfg.get("image_mean", OPENAI_MEAN)) if normalize else (0.0, 0.0, 0.0),
                     std=tuple(cfg.get("image_std", OPENAI_STD)) if normalize else (1.0, 1.0, 1.0),
                     interpolation=interpolation, resize_mode="squash" if squash else "shortest",
                     rescale=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0)
