"""The eight tasks of the embedded benchmark, built from scikit-learn's bundled digits.

``sklearn.datasets.load_digits`` ships 1797 handwritten digits as 8x8 images with 17 grey
levels (0..16). Every task reads the same images through its own **input transform** and its
own **label map**, so that the tasks look like different domains to the model (different
activation statistics, as the eight CLIP merging tasks do) and ask for conflicting feature
geometry (one task must separate what another must merge):

============  ==========================================  =====================  ========
task          input transform                             label map              classes
============  ==========================================  =====================  ========
digit         grey digit, as in pretraining               digit 0..9             10
inv_pairs     inverted grey (dark digit on white)         digit // 2 (pairs)     5
rot_mod3      grey, rotated 90 degrees counter-clockwise  digit mod 3            3
perm_digit    grey, a fixed random permutation of pixels  digit 0..9             10
noise_mod5    grey plus strong Gaussian noise (sigma 0.3) digit mod 5            5
red_digit     red digit on a green background             digit 0..9             10
flip_loops    mirrored left-right, yellow on blue         closed loops 0/1/2     3
quad_digit    quadrants swapped (rolled by 4 px), blue    digit 0..9             10
============  ==========================================  =====================  ========

Closed loops of a digit: none for 1 2 3 5 7, one for 0 4 6 9, two for 8. Chance level
averages 18% over the eight tasks.

Why these: the previous design (transforms only, every task "which digit") merged almost
losslessly, since every expert moved the encoder the same way. Here the coarse label maps ask
for incompatible groupings of the same digits (pairs {0,1} {2,3}..., residues mod 3 and mod 5,
loop counts), and the frozen heads (class prototypes, ``model.py``) make an expert pull each
class onto its own prototype direction; the transforms (inversion, rotation, pixel
permutation, noise, colours, mirror, quadrant swap) make every task a different input domain,
so each task occupies its own part of the activation space, as the CLIP tasks do. Pretraining
sees only upright grey digits, so zero-shot accuracy on the transformed tasks is low.

Images are RGB (3 channels), pixel values scaled to [-1, 1] (``(x - 0.5) / 0.5`` from
[0, 1]). The pseudo-random parts of a transform (the pixel permutation, the noise) are drawn
once from the seed and the task's name, so a task's images are a fixed function of the seed.

Splits: one stratified (by digit) split of the 1797 images into train / validation / test,
shared by every task and by the base model's pretraining (which sees only training images).
Validation chooses merge scales and anchors; test is only for reporting. Each task's
calibration set is a seeded subset of its training images.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Sequence, Tuple

import torch

N_IMAGES = 1797
SIDE = 8
CHANNELS = 3


# --------------------------------------------------------------------------- the raw images


_DIGITS_CACHE: dict = {}


def load_digits_tensors() -> Tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits: images ``[N, 8, 8]`` float32 in [0, 1] and labels ``[N]`` int64."""
    if "digits" not in _DIGITS_CACHE:
        from sklearn.datasets import load_digits

        d = load_digits()
        images = torch.tensor(d.images, dtype=torch.float32) / 16.0
        labels = torch.tensor(d.target, dtype=torch.int64)
        _DIGITS_CACHE["digits"] = (images, labels)
    images, labels = _DIGITS_CACHE["digits"]
    return images.clone(), labels.clone()


def _generator(seed: int, *parts: str) -> torch.Generator:
    key = "/".join([str(seed), *parts]).encode()
    return torch.Generator().manual_seed(zlib.crc32(key))


# --------------------------------------------------------------------------- transforms
#
# A transform maps grey images [N, 8, 8] in [0, 1] to RGB images [N, 3, 8, 8] in [0, 1].
# It gets a generator (seeded by the seed and the task) for its fixed random parts.


def _grey(x):
    return x[:, None].expand(-1, CHANNELS, -1, -1).clone()


def _colour(x, fg, bg):
    fg = torch.tensor(fg, dtype=x.dtype)[None, :, None, None]
    bg = torch.tensor(bg, dtype=x.dtype)[None, :, None, None]
    x = x[:, None]
    return bg * (1 - x) + fg * x


def t_identity(x, g):
    return _grey(x)


def t_invert(x, g):
    return _grey(1.0 - x)


def t_rot90(x, g):
    return _grey(torch.rot90(x, 1, dims=(1, 2)))


def t_permute(x, g):
    perm = torch.randperm(SIDE * SIDE, generator=g)
    return _grey(x.reshape(-1, SIDE * SIDE)[:, perm].reshape(-1, SIDE, SIDE))


def t_noise(x, g, sigma=0.3):
    noise = sigma * torch.randn(x.shape, generator=g)
    return _grey((x + noise).clamp(0.0, 1.0))


def t_transpose(x, g):
    return _grey(x.transpose(1, 2))


def t_rot180(x, g):
    return _grey(torch.rot90(x, 2, dims=(1, 2)))


def t_red_on_green(x, g):
    return _colour(x, fg=(1.0, 0.0, 0.0), bg=(0.0, 0.6, 0.0))


def t_flip_yellow_on_blue(x, g):
    return _colour(torch.flip(x, dims=(2,)), fg=(1.0, 1.0, 0.0), bg=(0.0, 0.0, 0.7))


def t_quadrants_blue(x, g):
    return _colour(torch.roll(x, shifts=(4, 4), dims=(1, 2)), fg=(0.2, 0.4, 1.0), bg=(0.0, 0.0, 0.0))


TRANSFORMS: Dict[str, Callable] = {
    "identity": t_identity,
    "invert": t_invert,
    "rot90": t_rot90,
    "permute": t_permute,
    "noise": t_noise,
    "transpose": t_transpose,
    "rot180": t_rot180,
    "red_on_green": t_red_on_green,
    "flip_yellow_on_blue": t_flip_yellow_on_blue,
    "quadrants_blue": t_quadrants_blue,
}


# --------------------------------------------------------------------------- label maps
#
# A label map is a lookup table digit -> class; its length-10 tensor is the whole map.

_LOOPS = (1, 0, 0, 0, 1, 0, 1, 0, 2, 1)
_PRIME = (0, 0, 1, 1, 0, 1, 0, 1, 0, 0)

LABEL_MAPS: Dict[str, Tuple[int, ...]] = {
    "digit": tuple(range(10)),
    "parity": tuple(d % 2 for d in range(10)),
    "mod3": tuple(d % 3 for d in range(10)),
    "mod5": tuple(d % 5 for d in range(10)),
    "gt4": tuple(int(d > 4) for d in range(10)),
    "pairs": tuple(d // 2 for d in range(10)),
    "loops": _LOOPS,
    "prime": _PRIME,
}


@dataclass(frozen=True)
class Task:
    """One benchmark task: a transform of the digit images and a map of the digit labels."""

    name: str
    transform: str
    label_map: str
    description: str

    @property
    def label_table(self) -> torch.Tensor:
        return torch.tensor(LABEL_MAPS[self.label_map], dtype=torch.int64)

    @property
    def n_classes(self) -> int:
        return len(set(LABEL_MAPS[self.label_map]))

    def apply(self, images: torch.Tensor, digits: torch.Tensor, seed: int):
        """``(pixel_values [N, 3, 8, 8] in [-1, 1], labels [N])`` of this task for ``images``."""
        g = _generator(seed, "task", self.name)
        x = TRANSFORMS[self.transform](images, g)
        return ((x - 0.5) / 0.5).contiguous(), self.label_table[digits]


TASKS: Tuple[Task, ...] = (
    Task("digit", "identity", "digit", "grey digits as in pretraining; which digit"),
    Task("inv_pairs", "invert", "pairs", "inverted grey digits; digit // 2"),
    Task("rot_mod3", "rot90", "mod3", "grey digits rotated 90 degrees; digit mod 3"),
    Task("perm_digit", "permute", "digit", "a fixed random permutation of the pixels; which digit"),
    Task("noise_mod5", "noise", "mod5", "strong fixed Gaussian noise; digit mod 5"),
    Task("red_digit", "red_on_green", "digit", "red digit on green; which digit"),
    Task("flip_loops", "flip_yellow_on_blue", "loops", "mirrored, yellow on blue; closed loops"),
    Task("quad_digit", "quadrants_blue", "digit", "quadrants swapped, blue on black; which digit"),
)

TASKS_BY_NAME = {t.name: t for t in TASKS}


def get_tasks(names: Sequence[str] | None = None) -> Tuple[Task, ...]:
    if names is None:
        return TASKS
    unknown = [n for n in names if n not in TASKS_BY_NAME]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {list(TASKS_BY_NAME)}")
    return tuple(TASKS_BY_NAME[n] for n in names)


# --------------------------------------------------------------------------- splits


@dataclass(frozen=True)
class SplitSizes:
    """Fractions of the images for validation and test (the rest is training), and the size
    of each task's calibration subset (taken from its training images)."""

    val: float = 0.15
    test: float = 0.25
    calib: int = 64


def make_splits(labels: torch.Tensor, seed: int, sizes: SplitSizes = SplitSizes()) -> Dict[str, torch.Tensor]:
    """Stratified split of image indices: ``{"train", "val", "test"}`` -> sorted int64 indices.

    Within each digit the images are shuffled with the seed; the first ``round(test * n_d)`` go
    to test, the next ``round(val * n_d)`` to validation, the rest to training.
    """
    if not (0 < sizes.val < 1 and 0 < sizes.test < 1 and sizes.val + sizes.test < 1):
        raise ValueError(f"bad split fractions {sizes}")
    g = _generator(seed, "splits")
    parts = {"train": [], "val": [], "test": []}
    for d in range(int(labels.max()) + 1):
        idx = (labels == d).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test, n_val = round(sizes.test * len(idx)), round(sizes.val * len(idx))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    return {k: torch.sort(torch.cat(v)).values for k, v in parts.items()}


def calibration_indices(train_idx: torch.Tensor, task: Task, seed: int, n: int) -> torch.Tensor:
    """``n`` training images of ``task`` (a seeded choice, different for every task)."""
    if n > len(train_idx):
        raise ValueError(f"calibration set of {n} images > {len(train_idx)} training images")
    g = _generator(seed, "calib", task.name)
    return train_idx[torch.randperm(len(train_idx), generator=g)[:n]]


@dataclass
class TaskData:
    """One task's tensors: ``x[split]`` pixel values ``[N, 3, 8, 8]``, ``y[split]`` labels."""

    task: Task
    x: Dict[str, torch.Tensor]
    y: Dict[str, torch.Tensor]
    calib: torch.Tensor


def build_task_data(
    tasks: Sequence[Task], splits: Dict[str, torch.Tensor], seed: int, n_calib: int, limit: int | None = None
) -> Dict[str, TaskData]:
    """Every task's train / val / test tensors and calibration inputs for the given splits.

    ``limit`` keeps only the first ``limit`` images of each split (for tiny test runs).
    """
    images, digits = load_digits_tensors()
    out = {}
    for task in tasks:
        x_all, y_all = task.apply(images, digits, seed)
        xs, ys = {}, {}
        for split, idx in splits.items():
            idx = idx if limit is None else idx[:limit]
            xs[split], ys[split] = x_all[idx], y_all[idx]
        train_idx = splits["train"] if limit is None else splits["train"][:limit]
        cal = calibration_indices(train_idx, task, seed, min(n_calib, len(train_idx)))
        out[task.name] = TaskData(task, xs, ys, x_all[cal])
    return out


def pretraining_images(splits: Dict[str, torch.Tensor], limit: int | None = None):
    """The base model's pretraining data: the grey training images and their digits."""
    images, digits = load_digits_tensors()
    idx = splits["train"] if limit is None else splits["train"][:limit]
    return images[idx], digits[idx]
