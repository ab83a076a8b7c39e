"""Tiny offline benches: random-init checkpoints, tokenizers and data in the real layouts.

For tests and smoke runs without the hub: each ``write_tiny_*`` writes, under ``root``,

* ``base/``: the pretrained model as ``save_pretrained`` (or open_clip's ``local-dir``) writes
  it, with a tokenizer built here (a character-level CLIP BPE, a T5 Unigram model, or a
  word-level one for the decoder-only LM);
* ``experts/``: perturbed copies of the base in the experts' layouts (several on purpose:
  transformers-5 ``save_pretrained`` directories, transformers-4 names with ``vision_model.``
  in two safetensors shards with an index, a bare visual-tower file, a DDP training pickle);
* ``data/<task>/...``: a few PNG images per class (``<split>/<class>/*.png``) or JSONL lines;
* ``config.yaml``: a config of the family pointing at all of it (also returned as a dict).

Nothing here downloads anything. The models are random: accuracies are near chance.
"""

from __future__ import annotations

import copy
import json
import string
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

CHARS = string.ascii_lowercase + string.digits + ".,:'-?!"
EXPERT_NOISE = 0.05


def perturb(model, gen: torch.Generator, scale: float = EXPERT_NOISE):
    """An "expert": a copy of ``model`` plus independent noise of ``scale`` times each tensor's spread."""
    expert = copy.deepcopy(model)
    with torch.no_grad():
        for p in expert.parameters():
            spread = p.std() if p.numel() > 1 else p.abs() + 1e-3
            p.add_(torch.randn(p.shape, generator=gen) * scale * spread)
    return expert


def _start(root, per_split, default_per_split, seed):
    """``(root, per_split, gen)`` of a ``write_tiny_*``; seeds torch's global generator too (model init)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return Path(root), per_split or default_per_split, gen


def _write_config(root: Path, model: dict, experts: Dict[str, str], data: dict, evaluation: dict) -> dict:
    """The bench's config (tasks in the order of ``experts``), written to ``root/config.yaml``."""
    import yaml

    config = {
        "seed": 0,
        "model": model,
        "tasks": [{"name": t, "expert": path} for t, path in experts.items()],
        "data": data,
        "eval": evaluation,
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return config


def clip_tokenizer(directory: Path):
    """A character-level CLIP tokenizer (``</w>`` marks a word's last character) saved in ``directory``."""
    from transformers import CLIPTokenizer

    vocab = {}
    for ch in CHARS:
        vocab[ch] = len(vocab)
    for ch in CHARS:
        vocab[ch + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # the largest id, as in CLIP (argmax pooling finds it)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(directory)
    return tok


def _images(root: Path, tasks: Sequence[str], classes: int, per_split: Dict[str, int], size, gen):
    from PIL import Image

    for ti, task in enumerate(tasks):
        for split, n in per_split.items():
            for c in range(classes):
                d = root / task / split / f"class_{string.ascii_lowercase[c]}"
                d.mkdir(parents=True, exist_ok=True)
                for i in range(n):  # a class colour plus noise
                    base = torch.tensor([(c * 80 + ti * 40) % 256, (c * 30) % 256, 255 - c * 60], dtype=torch.float32)
                    px = (base.view(1, 1, 3) + 40 * torch.randn(size[1], size[0], 3, generator=gen)).clamp(0, 255)
                    Image.fromarray(px.to(torch.uint8).numpy()).save(d / f"{i}.png")


# --------------------------------------------------------------------------- HF CLIP


def write_tiny_clip(root, tasks: Sequence[str] = ("alpha", "beta"), *, classes: int = 3,
                    per_split: Dict[str, int] = None, seed: int = 0) -> dict:
    """A tiny ``hf_clip`` bench under ``root`` (see the module docstring)."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionModel

    root, per_split, gen = _start(root, per_split, {"train": 6, "test": 3}, seed)
    tok = clip_tokenizer(root / "base")
    text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=8)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    clip.save_pretrained(root / "base")
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(root / "base")

    vision_model = CLIPVisionModel(clip.config.vision_config).eval()
    vision_model.load_state_dict({k[len("vision_model."):]: v for k, v in clip.state_dict().items()
                                  if k.startswith("vision_model.")})
    experts = {}
    for i, task in enumerate(tasks):
        expert = perturb(vision_model, gen)
        d = root / "experts" / task
        if i % 2 == 0:  # transformers 5 save_pretrained: flat names
            expert.save_pretrained(d)
        else:  # transformers 4 naming (vision_model.*), two shards with an index
            d.mkdir(parents=True, exist_ok=True)
            state = {f"vision_model.{k}": v.contiguous() for k, v in expert.state_dict().items()}
            keys = list(state)
            shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
                      "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
            for name, ks in shards.items():
                save_file({k: state[k] for k in ks}, str(d / name), metadata={"format": "pt"})
            index = {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}
            (d / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
            (d / "config.json").write_text(json.dumps(expert.config.to_dict()), encoding="utf-8")
        experts[task] = f"experts/{task}"
    _images(root / "data", tasks, classes, per_split, (20, 24), gen)
    return _write_config(root, {"family": "hf_clip", "base": "base", "device": "cpu"}, experts,
                         {"root": "data", "val_size": 0.25, "calibration": {"samples": 4, "batch_size": 2}},
                         {"batch_size": 8, "num_workers": 0})


# --------------------------------------------------------------------------- open_clip


def write_tiny_open_clip(root, tasks: Sequence[str] = ("alpha", "beta"), *, classes: int = 3,
                         per_split: Dict[str, int] = None, seed: int = 0, coca: bool = False,
                         vision_cfg: Optional[dict] = None) -> dict:
    """A tiny ``open_clip`` bench under ``root`` (see the module docstring); ``coca``: the base
    is a CoCa (attention-pooled image tower, a text tower with a class token, a decoder);
    ``vision_cfg``: open_clip's config of the image tower instead of the tiny ViT (a timm one)."""
    from open_clip.coca_model import CoCa
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    root, per_split, gen = _start(root, per_split, {"train": 6, "test": 3}, seed)
    tok = clip_tokenizer(root / "tokenizer")
    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"layers": 2, "width": 32, "head_width": 8, "image_size": 16, "patch_size": 8, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": 32, "vocab_size": len(tok), "width": 32, "heads": 4, "layers": 2,
                     "mlp_ratio": 2.0},
    }
    if vision_cfg is not None:
        model_cfg["vision_cfg"] = dict(vision_cfg)
    if coca:  # (its decoder reads the image tokens in the embedding width)
        model_cfg["embed_dim"] = 32
        model_cfg["vision_cfg"].update(attentional_pool=True, attn_pooler_heads=4, attn_pooler_queries=5,
                                       output_tokens=True)
        model_cfg["text_cfg"].update(embed_cls=True, output_tokens=True)
        model_cfg["multimodal_cfg"] = dict(model_cfg["text_cfg"], attn_pooler_heads=4, embed_cls=False)
        model_cfg["custom_text"] = True
        clip = CoCa(**{k: v for k, v in model_cfg.items() if k != "custom_text"}).eval()
        with torch.no_grad():  # (open_clip leaves it uninitialised)
            clip.text_decoder.text_projection.normal_(std=32**-0.5, generator=gen)
    else:
        clip = CLIP(**model_cfg).eval()
    base = root / "base"
    base.mkdir(parents=True, exist_ok=True)
    (base / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}),
                                               encoding="utf-8")
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(base / "open_clip_model.safetensors"))
    experts = {}
    (root / "experts").mkdir(parents=True, exist_ok=True)
    for i, task in enumerate(tasks):
        expert = perturb(clip, gen)
        if i % 2 == 0:  # the visual tower alone, a bare safetensors file
            path = root / "experts" / f"{task}.safetensors"
            save_file({k: v.contiguous() for k, v in expert.visual.state_dict().items()}, str(path))
        else:  # a whole-model training checkpoint: DDP prefix inside a state_dict wrapper
            path = root / "experts" / f"{task}.pt"
            torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in expert.state_dict().items()}}, path)
        experts[task] = str(path.relative_to(root))
    _images(root / "data", tasks, classes, per_split, (20, 24), gen)
    return _write_config(root, {"family": "open_clip", "base": "base", "tokenizer": "tokenizer", "device": "cpu"},
                         experts,
                         {"root": "data", "val_size": 0.25, "calibration": {"samples": 4, "batch_size": 2}},
                         {"batch_size": 8, "num_workers": 0})


# --------------------------------------------------------------------------- T5


WORDS = ["the", "a", "cat", "dog", "film", "good", "bad", "is", "was", "not", "very", "sat", "ran", "on", "mat",
         "movie", "fun", "dull", "he", "she", "said", "it", "rains", "today"]
ANSWER_WORDS = ["yes", "no", "positive", "negative", "acceptable", "unacceptable", "entailment", "neutral",
                "contradiction"]


def t5_tokenizer(directory: Path):
    """A small T5 Unigram tokenizer (characters, a few whole words) saved in ``directory``."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in CHARS] + [("\u2581" + c, -2.5) for c in CHARS]
    pieces += [("\u2581" + w, -1.0) for w in WORDS + ANSWER_WORDS]
    # (each piece once: a word that is one character, "a", is that character's piece already; a
    # duplicate left an id no token has, which the vocabulary union refuses)
    first = {}
    for piece, score in pieces:
        first.setdefault(piece, score)
    tok = T5Tokenizer(vocab=list(first.items()), extra_ids=0)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(directory)
    return tok


_GLUE_FIELDS = {"cola": ["sentence"], "sst2": ["sentence"], "mrpc": ["sentence1", "sentence2"],
                "rte": ["sentence1", "sentence2"], "stsb": ["sentence1", "sentence2"],
                "qnli": ["question", "sentence"], "qqp": ["question1", "question2"], "mnli": ["premise", "hypothesis"]}
_GLUE_CLASSES = {"cola": 2, "sst2": 2, "mrpc": 2, "rte": 2, "qnli": 2, "qqp": 2, "mnli": 3}


def write_tiny_t5(root, tasks: Sequence[str] = ("sst2", "rte", "stsb"), *,
                  per_split: Dict[str, int] = None, seed: int = 0) -> dict:
    """A tiny ``hf_t5`` GLUE bench under ``root`` (GLUE task names; JSONL data)."""
    from transformers import T5Config, T5ForConditionalGeneration

    root, per_split, gen = _start(root, per_split, {"train": 12, "validation": 6}, seed)
    tok = t5_tokenizer(root / "base")
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )).eval()
    return _text_bench(root, "hf_t5", model, tasks, per_split, gen)


def _text_bench(root: Path, family: str, model, tasks, per_split, gen) -> dict:
    """The rest of a tiny text bench: the base (its tokenizer already in ``base/``), one
    perturbed expert per task, GLUE-style JSONL data and the config."""
    model.save_pretrained(root / "base")
    experts = {}
    for task in tasks:
        perturb(model, gen).save_pretrained(root / "experts" / task)
        experts[task] = f"experts/{task}"
    _glue_jsonl(root, tasks, per_split, gen)
    return _write_config(root, {"family": family, "base": "base", "device": "cpu"}, experts,
                         {"source": "jsonl", "root": "data", "val_size": 0.25, "max_input_tokens": 64,
                          "calibration": {"samples": 4, "batch_size": 2}},
                         {"batch_size": 4})


def _glue_jsonl(root: Path, tasks: Sequence[str], per_split: Dict[str, int], gen: torch.Generator) -> None:
    """``data/<task>/<split>.jsonl`` with GLUE's fields and labels, sentences of random WORDS."""

    def sentence():
        n = int(torch.randint(3, 8, (1,), generator=gen))
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=gen))

    for task in tasks:
        fields = _GLUE_FIELDS.get(task, ["sentence"])
        d = root / "data" / task
        d.mkdir(parents=True, exist_ok=True)
        for split, n in per_split.items():
            with open(d / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for i in range(n):
                    ex = {k: sentence() for k in fields}
                    if task == "stsb":
                        ex["label"] = round(float(torch.rand(1, generator=gen)) * 5, 2)
                    else:
                        ex["label"] = int(torch.randint(0, _GLUE_CLASSES.get(task, 2), (1,), generator=gen))
                    ex["idx"] = i
                    f.write(json.dumps(ex) + "\n")


def word_level_tokenizer(directory, words: Sequence[str], added: Sequence[tuple] = ()):
    """A word-level tokenizer of ``words`` (ids in order; the first also stands for any other
    word), split at whitespace and punctuation, with ``added`` tokens ((text, special) pairs, in
    order: what fine-tuning with ChatML's tokens adds), saved in ``directory``; returns it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AddedToken, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=words[0])
    for text, special in added:
        fast.add_tokens([AddedToken(text, special=special)])
    fast.save_pretrained(directory)
    return fast


def word_tokenizer(directory: Path):
    """A word-level tokenizer (the bench's words, answers and characters; anything else
    ``<unk>``) with BOS, EOS and padding, saved in ``directory`` as a fast HF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + list(dict.fromkeys(WORDS + ANSWER_WORDS + list(CHARS)))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    return fast


def write_tiny_causal_lm(root, tasks: Sequence[str] = ("sst2", "rte", "stsb"), *,
                         per_split: Dict[str, int] = None, seed: int = 0) -> dict:
    """A tiny ``hf_causal_lm`` GLUE bench under ``root``: a Llama, a word-level tokenizer,
    JSONL data (the ``hf_t5`` bench's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root, per_split, gen = _start(root, per_split, {"train": 12, "validation": 6}, seed)
    tok = word_tokenizer(root / "base")
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )).eval()
    return _text_bench(root, "hf_causal_lm", model, tasks, per_split, gen)
