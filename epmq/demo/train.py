"""Training the benchmark's models, with an on-disk cache.

* **Base** (the "pretrained CLIP"): trained from a seeded initialisation on the *training*
  images of plain grey digits with generic augmentations (random 1-pixel shifts, random
  per-channel gains, light noise), to classify the digit with a cosine classifier whose class
  embeddings are learned and then thrown away. It never sees a task's transform.
  40 epochs of 1078 images, batch 128, AdamW lr 1e-3, weight decay 0.05.
* **Heads**: each task's class prototypes from the base's features of the task's training
  images (``model.class_prototypes``), frozen from then on.
* **Experts**: the base encoder fine-tuned on one task (its training split, through its frozen
  head), all encoder parameters trained; only the encoder is kept. 15 epochs, batch 64, AdamW
  lr 5e-4, no weight decay.

Both use linear warmup (10% of the steps) then cosine decay, and the logit scale 1/0.07.
On one CPU thread the whole training takes about 75 s (base ~20 s, each expert ~7 s).

Everything is a deterministic function of the configuration and the seed. The artifacts go to
``<cache root>/<config hash>/`` as safetensors files written atomically (a temporary file in
the same folder, then ``os.replace``), with ``meta.json`` last; a second ``prepare`` with the
same configuration loads them and trains nothing, and an interrupted run resumes with what it
had finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from .._util import save_safetensors, umask, write_atomic, write_json_atomic
from .data import SplitSizes, TaskData
from .model import LOGIT_SCALE, ModelConfig, build_encoder, class_prototypes, encode, features

CACHE_VERSION = 1  # bump when training or data code changes what the artifacts are


@dataclass(frozen=True)
class DemoConfig:
    """Everything that determines the benchmark's trained artifacts (hashed for the cache),
    except ``threads``, which only sets how many CPU threads training uses."""

    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: Optional[Tuple[str, ...]] = None  # None: all eight
    splits: SplitSizes = field(default_factory=SplitSizes)
    data_limit: Optional[int] = None  # keep the first N images of each split (tiny test runs)
    logit_scale: float = LOGIT_SCALE
    base_epochs: int = 40
    base_batch: int = 128
    base_lr: float = 1e-3
    base_weight_decay: float = 0.05
    expert_epochs: int = 15
    expert_batch: int = 64
    expert_lr: float = 5e-4
    expert_weight_decay: float = 0.0
    calib_batch: int = 32
    # One thread: the matrices are tiny, so a second thread saves only ~20%, and on a shared
    # machine an OpenMP team that loses a core to another process waits at every barrier
    # (measured: 10x slower training). One thread is also exactly reproducible.
    threads: int = 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("threads")
        return d

    def key(self, seed: int) -> str:
        import transformers

        # (transformers' major version too: 4 and 5 name the CLIP vision tower's tensors apart)
        blob = json.dumps({"v": CACHE_VERSION, "seed": seed, "config": self.to_dict(),
                           "transformers": transformers.__version__.split(".")[0]}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_root() -> Path:
    env = os.environ.get("EPMQ_CACHE_DIR")
    if env:
        return Path(env) / "demo"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "epmq" / "demo"


# --------------------------------------------------------------------------- atomic files


def save_tensors(path: Path, tensors: Dict[str, torch.Tensor], metadata: Optional[dict] = None) -> None:
    """``safetensors`` file written atomically: a temporary file beside it (the one a killed
    write left removed), then a rename."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}

    def write(tmp: Path) -> None:
        save_safetensors(tensors, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        os.chmod(tmp, 0o666 & ~umask())  # (safetensors writes 0600: a cache shared by users, unreadable to others)

    write_atomic(path, write)


def load_tensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def load_cached(path: Path) -> Optional[Dict[str, torch.Tensor]]:
    """The tensors of the cache file ``path``; None where it is missing or damaged (then with a
    warning: the caller makes it again). Damage the writes cannot leave, a crash of the machine
    (an unsynced rename), a copy cut short, used to end every later demo in a SafetensorError
    traceback."""
    from safetensors import SafetensorError

    if not path.exists():
        return None
    try:
        return load_tensors(path)
    except SafetensorError as e:  # (truncated, not safetensors; failures to open raise as themselves)
        warnings.warn(f"{path} is damaged ({e}): making it again")
        return None


save_json = write_json_atomic


# --------------------------------------------------------------------------- training loop


@contextlib.contextmanager
def cpu_threads(n: int):
    """Train with ``n`` threads (at most the CPUs there are) and flush denormals, which
    otherwise slow a small transformer's backward pass on CPU by 10x; both restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, os.cpu_count() or 1)))
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(old)


def _lr_lambda(total: int, warmup_frac: float = 0.1):
    warmup = max(1, int(round(warmup_frac * total)))

    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return f


def _batches(n: int, batch: int, g: torch.Generator):
    order = torch.randperm(n, generator=g)
    for i in range(0, n, batch):
        yield order[i : i + batch]


def _fit(params, loss_fn, n, batch, epochs, lr, weight_decay, seed, desc, progress):
    """AdamW with linear warmup and cosine decay over ``epochs`` passes of ``n`` examples;
    ``loss_fn(idx, g)`` returns the loss of one batch of example indices."""
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(n / batch)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total))
    bar = _tqdm(total=total, desc=desc, disable=not progress)
    last = float("nan")
    for _ in range(epochs):
        for idx in _batches(n, batch, g):
            loss = loss_fn(idx, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            last = float(loss.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{last:.3f}", refresh=False)
    bar.close()
    return last


def _tqdm(**kwargs):
    from tqdm.auto import tqdm

    return tqdm(leave=False, **kwargs)


# --------------------------------------------------------------------------- base


def augment_pretraining(images: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Generic augmentations of grey digits ``[B, 8, 8]`` in [0, 1] -> RGB pixel values
    ``[B, 3, 8, 8]`` in [-1, 1]: a random shift of up to one pixel (zero fill), a random gain
    in [0.5, 1] per channel, Gaussian noise of 0.05."""
    B, H, W = images.shape
    padded = F.pad(images, (1, 1, 1, 1))
    dy = torch.randint(0, 3, (B,), generator=g)
    dx = torch.randint(0, 3, (B,), generator=g)
    rows = (dy[:, None] + torch.arange(H)[None])[:, :, None].expand(B, H, W)
    cols = (dx[:, None] + torch.arange(W)[None])[:, None, :].expand(B, H, W)
    shifted = padded[torch.arange(B)[:, None, None], rows, cols]
    gains = 0.5 + 0.5 * torch.rand(B, 3, 1, 1, generator=g)
    x = shifted[:, None] * gains + 0.05 * torch.randn(B, 3, H, W, generator=g)
    return (x.clamp(0, 1) - 0.5) / 0.5


def pretrain_base(config: DemoConfig, images, digits, seed: int, progress: bool = True) -> dict:
    """The base encoder's state dict (see the module docstring)."""
    encoder = build_encoder(config.model, seed=seed).train()
    g = torch.Generator().manual_seed(seed + 1)
    classes = torch.nn.Parameter(0.02 * torch.randn(10, config.model.hidden_size, generator=g))

    def loss_fn(idx, gen):
        x = augment_pretraining(images[idx], gen)
        z = features(encoder, x)
        out = config.logit_scale * z @ F.normalize(classes, dim=-1).t()
        return F.cross_entropy(out, digits[idx])

    _fit(
        list(encoder.parameters()) + [classes],
        loss_fn,
        len(images),
        config.base_batch,
        config.base_epochs,
        config.base_lr,
        config.base_weight_decay,
        seed + 2,
        "pretraining the base",
        progress,
    )
    return {k: v.detach().clone() for k, v in encoder.eval().state_dict().items()}


@torch.no_grad()
def make_heads(config: DemoConfig, base_state, data: Dict[str, TaskData]) -> Dict[str, torch.Tensor]:
    """Each task's frozen head ``[C, d]``: class prototypes of the base's features."""
    encoder = build_encoder(config.model, base_state)
    heads = {}
    for name, td in data.items():
        feats = encode(encoder, td.x["train"])
        heads[name] = class_prototypes(feats, td.y["train"], td.task.n_classes)
    return heads


def finetune_expert(
    config: DemoConfig, base_state, head: torch.Tensor, td: TaskData, seed: int, progress: bool = True
) -> Dict[str, torch.Tensor]:
    """The expert of one task: the base encoder fine-tuned through the frozen head."""
    encoder = build_encoder(config.model, base_state).train()
    x, y = td.x["train"], td.y["train"]

    def loss_fn(idx, gen):
        z = features(encoder, x[idx])
        return F.cross_entropy(config.logit_scale * z @ head.t(), y[idx])

    _fit(
        list(encoder.parameters()),
        loss_fn,
        len(x),
        config.expert_batch,
        config.expert_epochs,
        config.expert_lr,
        config.expert_weight_decay,
        seed,
        f"fine-tuning {td.task.name}",
        progress,
    )
    return {k: v.detach().clone() for k, v in encoder.eval().state_dict().items()}


# --------------------------------------------------------------------------- cache


@dataclass
class Artifacts:
    base: Dict[str, torch.Tensor]
    heads: Dict[str, torch.Tensor]
    experts: Dict[str, Dict[str, torch.Tensor]]
    meta: dict
    trained: bool  # whether anything was trained in this call


def expert_seed(seed: int, index: int) -> int:
    return seed * 1000 + 100 + index


def _read_meta(path: Path) -> dict:
    """``meta.json`` (timings and what the artifacts are: written again by the next training);
    {} where it is missing or damaged."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError:  # (JSONDecodeError, UnicodeDecodeError)
        warnings.warn(f"{path} is damaged: writing it again")
        return {}
    return meta if isinstance(meta, dict) else {}


def load_or_train(
    config: DemoConfig, seed: int, cache: Path, pretrain_data, data: Dict[str, TaskData], progress: bool = True
) -> Artifacts:
    """Load the base, heads and experts from ``cache`` (a config's folder), training and
    saving whatever is missing."""
    cache.mkdir(parents=True, exist_ok=True)
    meta_path = cache / "meta.json"
    meta = _read_meta(meta_path)
    timings = dict(meta.get("seconds", {}))
    trained = False  # anything trained in this call
    new_base = False  # the base was trained now: heads and experts must follow it

    with cpu_threads(config.threads):
        base_path = cache / "base.safetensors"
        base = load_cached(base_path)
        if base is None:
            t0 = time.perf_counter()
            base = pretrain_base(config, *pretrain_data, seed=seed, progress=progress)
            timings["base"] = time.perf_counter() - t0
            save_tensors(base_path, base, {"what": "base encoder", "seed": seed})
            trained = new_base = True

        heads_path = cache / "heads.safetensors"
        heads = None if new_base else load_cached(heads_path)
        if heads is None:
            heads = make_heads(config, base, data)
            save_tensors(heads_path, heads, {"what": "frozen class prototypes of the base"})

        experts = {}
        for k, (name, td) in enumerate(data.items()):
            path = cache / f"expert.{name}.safetensors"
            loaded = None if new_base else load_cached(path)
            if loaded is not None:
                experts[name] = loaded
                continue
            t0 = time.perf_counter()
            experts[name] = finetune_expert(config, base, heads[name], td, expert_seed(seed, k), progress)
            timings[f"expert.{name}"] = time.perf_counter() - t0
            save_tensors(path, experts[name], {"what": f"expert {name}", "seed": seed})
            trained = True

    if trained or not meta:
        meta = {
            "cache_version": CACHE_VERSION,
            "seed": seed,
            "config": config.to_dict(),
            "seconds": timings,
            "train_seconds": sum(timings.values()),
            "torch": torch.__version__,
        }
        save_json(meta_path, meta)
    return Artifacts(base, heads, experts, meta, trained)
