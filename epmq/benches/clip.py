"""HF CLIP (``family: hf_clip``): merge and quantize the vision tower of a ``CLIPModel``.

* base: a ``CLIPModel`` (hub id such as ``openai/clip-vit-base-patch32``, or a local
  ``save_pretrained`` directory with ``config.json``, weights, tokenizer files and, optionally,
  ``preprocessor_config.json``).
* experts: ``CLIPVisionModel`` checkpoints (FusionBench's ``tanganke/clip-vit-base-patch32_<task>``
  or local directories / files; transformers 4 checkpoints name tensors ``vision_model.*``,
  transformers 5 ones without the prefix: both are read).
* the model that is merged and quantized: a ``CLIPVisionModel`` built from the base's vision
  config; the visual projection, logit scale and the text tower stay frozen in full precision.
* calibration items: ``{"pixel_values": [B, 3, H, W]}``.
* preprocessing: the base's image processor (``preprocessor_config.json``, or the
  ``image_processor`` of transformers 5's ``processor_config.json``; a CLIP or SigLIP one's:
  resize, center crop, rescale, mean/std; a setting not reproduced is refused by name) or,
  without one, the vision config's image size with CLIP's mean/std.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import List

import torch
from torch import nn

from .._util import loading_bars, read_json_file
from ..checkpoint_io import CheckpointReader, bind, key_renaming, tie_order
from ..vocabulary import checkpoint_tokenizer
from .checkpoints import load_into
from .config import BenchConfig, BenchConfigError, check_has_vocabulary
from .vision import ImagePrep, ZeroShotImageBench, prep_from_processor_config


def _image_processor_config(directory: Path):
    """``(file, settings)`` of the image processor saved in ``directory``, where transformers reads
    it: the ``image_processor`` entry of ``processor_config.json`` (transformers 5 saves a whole
    ``CLIPProcessor`` so, with no ``preprocessor_config.json``), else ``preprocessor_config.json``;
    ``(None, None)`` if neither holds one."""
    nested = directory / "processor_config.json"
    if nested.is_file():
        settings = read_json_file(nested).get("image_processor")
        if isinstance(settings, dict):
            return nested, settings
    flat = directory / "preprocessor_config.json"
    if flat.is_file():
        return flat, read_json_file(flat)
    return None, None


def _same_in_dtype(mine: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether ``mine`` is ``base`` as ``mine``'s dtype holds it."""
    return torch.equal(mine, base.to(mine.dtype))


class HFClipBench(ZeroShotImageBench):
    family = "hf_clip"

    def __init__(self, config: BenchConfig, log):
        super().__init__(config, log)
        from transformers import CLIPConfig, CLIPVisionModel

        self.base_dir = self._resolve(config.model.base, "model.base", "model", config.model.revision)
        if not (self.base_dir / "config.json").is_file():
            raise BenchConfigError(f"model.base: no config.json in {self.base_dir}: not a HF model directory")
        model_type = json.loads((self.base_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
        if model_type != "clip":
            raise BenchConfigError(f"model.base ({self.base_dir}) is a {model_type!r} model, not a CLIPModel "
                                   f"(expert checkpoints go in the tasks' expert)")
        try:
            clip_config = CLIPConfig.from_pretrained(self.base_dir)
        except Exception as e:
            raise BenchConfigError(f"model.base ({self.base_dir}): not a CLIPModel config: {e}") from e
        self.clip_config = clip_config

        self._template = CLIPVisionModel(clip_config.vision_config).to(self.dtype).eval()
        reader = CheckpointReader(self.base_dir, "model.base", error=BenchConfigError)
        shapes = {k: tuple(v.shape) for k, v in self._template.state_dict().items()}
        self.base_state = bind(reader, tie_order(self._template), what="model.base (vision tower)",
                               shapes=shapes, dtype=self.dtype, prefixes=("vision_model.",),
                               rename=key_renaming(self._template))
        load_into(self._template, self.base_state, "model.base (vision tower)")
        for key in ("visual_projection.weight", "logit_scale"):
            if key not in reader:
                raise BenchConfigError(f"model.base ({self.base_dir}) has no {key!r}: a full CLIPModel is needed")
        self.projection = reader.get("visual_projection.weight").float()  # [D, hidden]
        self.logit_scale = float(reader.get("logit_scale").float().exp())
        self._projection_on = {}

        self._processor = _image_processor_config(self.base_dir)  # (file, settings)
        processor = self._processor[1]
        image_size = clip_config.vision_config.image_size
        if processor is not None:
            self.prep = prep_from_processor_config(processor, image_size)
        else:
            self.prep = ImagePrep(resize=image_size, crop=(image_size, image_size))
        self._loaded_tokenizer = None
        self._open_experts(prefixes=("vision_model.",))
        self._say_unused_heads(reader)
        self._open_data()
        self._text = None

    def _say_unused_heads(self, base: CheckpointReader) -> None:
        """Warn where an expert holds a head of its own: a classifier (CLIPForImageClassification),
        or a projection trained apart (a whole CLIPModel fine-tuned end to end). Every model is
        scored by its vision tower through the base's projection and zero-shot text heads
        (FusionBench's protocol), so those are not used; nothing said so."""
        for task, state in self.experts.items():
            expert = state.reader
            own = ["a classifier (classifier.*)"] if any(k.startswith("classifier.") for k in expert.keys()) else []
            # (compared in the expert's dtype: a whole CLIPModel saved in float16 holds the base's
            # projections rounded so, which are not its own)
            own += [key for key in ("visual_projection.weight", "text_projection.weight")
                    if key in expert and key in base and not _same_in_dtype(expert.get(key), base.get(key))]
            if own:
                warnings.warn(f"the expert of task {task!r} holds {' and '.join(own)} of its own, not used: every "
                              f"model is scored through the base's projection and zero-shot text heads "
                              f"(FusionBench's protocol), the expert by its vision tower")

    def save_extras(self, directory) -> None:
        """The base's image preprocessing config, so that the vision tower is served as trained."""
        file, settings = self._processor
        if file is not None and file.name == "processor_config.json":
            # (the image processor alone: the whole processor names a tokenizer the vision tower's
            # checkpoint lacks, and AutoProcessor failed on it)
            (Path(directory) / "preprocessor_config.json").write_text(json.dumps(settings, indent=2) + "\n",
                                                                    encoding="utf-8")
        elif file is not None:
            shutil.copy2(file, Path(directory) / file.name)

    # ----------------------------------------------------------------- text tower

    @property
    def _tokenizer(self):
        """The base's tokenizer, or model.tokenizer's, loaded once (the class names are read with it
        as the data is opened)."""
        if self._loaded_tokenizer is None:
            tok_source = self.config.model.tokenizer
            tok_dir = self.base_dir if tok_source is None else self._resolve(tok_source, "model.tokenizer", "tokenizer")
            try:  # (as saved: see checkpoint_tokenizer)
                tokenizer = checkpoint_tokenizer(tok_dir)
            except Exception as e:
                raise BenchConfigError(f"cannot load the tokenizer from {tok_dir}: {e}") from e
            self._loaded_tokenizer = check_has_vocabulary(tokenizer, tok_dir)
        return self._loaded_tokenizer

    def read_class_names(self, names: List[str]) -> list:
        """Each name as the model's tokenizer reads it, its token ids: CLIP's lowercases ("Cat" and
        "cat" are one prompt), one that keeps case (model.tokenizer: XLM-R's, RoBERTa's) reads two."""
        return [tuple(ids) for ids in self._tokenizer(list(names))["input_ids"]]

    def _encode_texts(self, texts: List[str]) -> torch.Tensor:
        if self._text is None:
            from transformers import CLIPModel

            tokenizer = self._tokenizer
            with loading_bars(self.progress):  # (transformers' bar, silent with progress=False)
                clip = CLIPModel.from_pretrained(self.base_dir, dtype=torch.float32).eval()
            self._text = (tokenizer, clip.text_model.to(self.device), clip.text_projection.to(self.device))
            del clip
        tokenizer, text_model, text_projection = self._text
        max_len = self.clip_config.text_config.max_position_embeddings
        out = []
        for i in range(0, len(texts), 256):
            tokens = tokenizer(texts[i:i + 256], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            pooled = text_model(input_ids=tokens["input_ids"].to(self.device),
                                attention_mask=tokens["attention_mask"].to(self.device)).pooler_output
            out.append(text_projection(pooled).cpu())
        return torch.cat(out)

    def _release_text_tower(self) -> None:
        self._text = None

    # ----------------------------------------------------------------- vision

    def _image_features(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values=pixel_values)
        pooled = out.pooler_output if hasattr(out, "pooler_output") else out[1]
        proj = self._projection_on.get(pooled.device)
        if proj is None:
            proj = self._projection_on[pooled.device] = self.projection.to(pooled.device)
        return pooled.float() @ proj.t()

    def _calibration_item(self, pixel_values: torch.Tensor):
        return {"pixel_values": pixel_values}
