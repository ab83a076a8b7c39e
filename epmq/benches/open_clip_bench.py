"""open_clip (``family: open_clip``): merge and quantize the visual tower of an open_clip CLIP.

* base: ``model.base`` is an open_clip model name (``ViT-B-32``) with ``model.pretrained`` (a
  pretrained tag such as ``openai``, or a checkpoint file), or ``hf-hub:org/repo``, or
  ``local-dir:/path`` / a local directory holding ``open_clip_config.json`` (``model_cfg``,
  ``preprocess_cfg``) and ``open_clip_model.safetensors`` (or ``open_clip_pytorch_model.bin``).
* experts: state-dict files (``.safetensors``, ``.pt``/``.bin``, with or without a
  ``state_dict`` wrapper or a DDP ``module.`` prefix) of the visual tower alone or of the whole
  CLIP (``visual.*``); only the visual tower's tensors are read.
* tokenizer: open_clip's for the model, or ``model.tokenizer`` (an HF tokenizer directory or
  hub id, wrapped by open_clip's ``HFTokenizer`` at the model's context length).
* the model that is merged and quantized: ``clip.visual`` (its output is already projected).
* calibration items: image tensors ``[B, 3, H, W]`` (passed positionally).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

from ..checkpoint import OPEN_CLIP_CONFIG_FILE
from ..checkpoint_io import looks_like_hub_id
from .config import BenchConfig, BenchConfigError
from .vision import OPENAI_MEAN, OPENAI_STD, ImagePrep, ZeroShotImageBench


class OpenClipBench(ZeroShotImageBench):
    family = "open_clip"

    def __init__(self, config: BenchConfig, log):
        super().__init__(config, log)
        import open_clip

        m = config.model
        name = self._model_name(m.base)
        pretrained = m.pretrained
        if pretrained is not None:
            path = Path(pretrained).expanduser()
            path = path if path.is_absolute() else config.base_dir / path
            if path.exists():
                pretrained = str(path)
            elif pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt")) or "/" in pretrained:
                raise BenchConfigError(f"model.pretrained: no such checkpoint file: {path}")
        try:
            clip = open_clip.create_model(name, pretrained=pretrained, cache_dir=m.hub_cache_dir)
        except Exception as e:
            raise BenchConfigError(f"model.base: open_clip cannot create {name!r} (pretrained {pretrained!r}): "
                                   f"{type(e).__name__}: {e}") from e
        clip = clip.float().eval()  # (the frozen zero-shot heads in fp32 whatever the model dtype, as HF CLIP's)
        if not hasattr(clip, "visual") or not hasattr(clip, "encode_text"):
            raise BenchConfigError(f"model.base: {name!r} is not a CLIP model with a visual and a text tower")
        self._template = copy.deepcopy(clip.visual).to(self.dtype).eval()
        self.base_state = {k: v.detach().clone() for k, v in self._template.state_dict().items()}
        self.logit_scale = float(clip.logit_scale.detach().float().exp())

        pp = dict(getattr(clip.visual, "preprocess_cfg", {}) or {})
        size = pp.get("size", getattr(clip.visual, "image_size", 224))
        crop = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        resize_mode = pp.get("resize_mode") or "shortest"
        if resize_mode not in ("shortest", "squash"):
            raise BenchConfigError(f"model.base: {name!r} preprocesses images with open_clip's resize_mode "
                                   f"{resize_mode!r}, which this bench does not reproduce (shortest, squash)")
        # open_clip's eval transform: bilinear if it says so, else bicubic ("random" too); a
        # non-square size in shortest mode is ResizeKeepRatio's (bicubic whatever it says), and the
        # image is converted to RGB after resizing and cropping, in its own mode until then
        interpolation = "bilinear" if pp.get("interpolation") == "bilinear" else "bicubic"
        square = crop[0] == crop[1]
        if resize_mode == "shortest" and not square:
            interpolation = "bicubic"
        self.prep = ImagePrep(resize=crop[0] if square else crop, crop=crop, mean=tuple(pp.get("mean", OPENAI_MEAN)),
                              std=tuple(pp.get("std", OPENAI_STD)), interpolation=interpolation,
                              crop_offset="round",  # open_clip's transform is torchvision's CenterCrop
                              resize_mode=resize_mode, rgb="last")
        self._clip = clip
        self._serving_config = self._open_clip_config(open_clip, name, pp)
        self._tokenizer = self._make_tokenizer(open_clip, name, clip)
        self._open_experts(prefixes=("visual.", "module.visual.", "module."))
        self._open_data()

    def _open_clip_config(self, open_clip, name: str, preprocess_cfg: dict) -> Optional[dict]:
        """What ``epmq.load_quantized(dir)`` builds the vision tower from, in open_clip's own
        layout (``model_cfg``, ``preprocess_cfg``); None where open_clip does not say."""
        try:
            if name.startswith("local-dir:"):
                path = Path(name[len("local-dir:"):]) / OPEN_CLIP_CONFIG_FILE
                model_cfg = json.loads(path.read_text(encoding="utf-8"))["model_cfg"]
            elif name.startswith("hf-hub:"):
                from open_clip.factory import _get_hf_config

                hub_id, cache_dir = name[len("hf-hub:"):], self.config.model.hub_cache_dir
                model_cfg = _get_hf_config(hub_id, cache_dir=cache_dir)["model_cfg"]
            else:
                model_cfg = open_clip.get_model_config(name)
        except Exception as e:  # (a layout another open_clip version writes)
            self.log(f"[bench] open_clip's model config of {name!r} not found ({type(e).__name__}: {e}): "
                     f"quantized checkpoints load into bench.model() only")
            return None
        return None if model_cfg is None else {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg,
                                               "tower": "visual"}

    def save_extras(self, directory) -> None:
        """The vision tower's open_clip config: ``epmq.load_quantized(dir)`` builds it from it."""
        if self._serving_config is not None:
            (Path(directory) / OPEN_CLIP_CONFIG_FILE).write_text(json.dumps(self._serving_config, indent=1),
                                                                  encoding="utf-8")

    def _model_name(self, base: str) -> str:
        if base.startswith(("hf-hub:", "local-dir:")):
            if base.startswith("local-dir:"):
                path = Path(base[len("local-dir:"):]).expanduser()
                path = path if path.is_absolute() else self.config.base_dir / path
                if not path.is_dir():
                    raise BenchConfigError(f"model.base: no such directory: {path}")
                return f"local-dir:{path}"
            return base
        path = Path(base).expanduser()
        path = path if path.is_absolute() else self.config.base_dir / path
        if path.is_dir():
            return f"local-dir:{path}"
        if "/" in base and not looks_like_hub_id(base):
            raise BenchConfigError(f"model.base: no such directory: {path}")
        return base  # a built-in open_clip model name

    def _make_tokenizer(self, open_clip, name, clip):
        context_length = getattr(clip, "context_length", 77)
        if self.config.model.tokenizer is None:
            return open_clip.get_tokenizer(name, context_length=context_length)
        from open_clip.tokenizer import HFTokenizer

        tok_dir = self._resolve(self.config.model.tokenizer, "model.tokenizer", "tokenizer")
        try:
            return HFTokenizer(str(tok_dir), context_length=context_length)
        except Exception as e:
            raise BenchConfigError(f"model.tokenizer: cannot load a tokenizer from {tok_dir}: {e}") from e

    def read_class_names(self, names: List[str]) -> list:
        """Each name as the model's tokenizer reads it, its token ids: an HFTokenizer over XLM-R's or
        RoBERTa's keeps case ("Cat" and "cat" are two prompts), open_clip's own lowercases."""
        return [tuple(ids) for ids in self._tokenizer(list(names)).tolist()]

    # ----------------------------------------------------------------- text tower

    def _encode_texts(self, texts: List[str]) -> torch.Tensor:
        clip = self._clip.to(self.device)
        out = []
        for i in range(0, len(texts), 256):
            tokens = self._tokenizer(texts[i:i + 256]).to(self.device)
            out.append(clip.encode_text(tokens).float().cpu())
        return torch.cat(out)

    def _release_text_tower(self) -> None:
        self._clip = None
        self._tokenizer = None

    # ----------------------------------------------------------------- vision

    def _image_features(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values)
        return out[0] if isinstance(out, (tuple, list)) else out

    def _calibration_item(self, pixel_values: torch.Tensor):
        return pixel_values
