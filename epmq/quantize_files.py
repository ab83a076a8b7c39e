"""Quantize a checkpoint on disk (a merge of experts, or any model) with calibration files.

    epmq.quantize_checkpoint("merged/ties", "merged/ties-w4", method="epmq",
                             spec=epmq.QuantSpec(bits=4, group_size=128, sym=True),
                             calibration={"math": "data/math.jsonl", "code": "data/code.txt"},
                             experts={"math": "ckpt/math", "code": "ckpt/code"}, anchor=0.1)

or ``epmq quantize CONFIG.yaml OUT``. The model is built from a directory or the HF hub as its
``config.json`` names it (``architectures``; where there is none, the seq2seq LM class of its
model type for an encoder-decoder, else the causal LM class), and each task's files become
calibration batches (``epmq.calibration``):

* language models (their forward takes ``input_ids``): texts, as GPTQ-style windows of tokens;
* encoder-decoders (T5, FLAN-T5, mT5, BART): input/target text pairs, the targets as labels;
* vision towers (``pixel_values``, e.g. ``CLIPVisionModel``, ViT, DINOv2, SigLIP's): images,
  preprocessed by the checkpoint's own image processor (``preprocessor_config.json``);
* speech encoders (``input_values`` or ``input_features``: Wav2Vec2, HuBERT, WavLM, Whisper's
  audio classifier): WAV files (FLAC, OGG, MP3, AIFF with soundfile), batched by the checkpoint's
  own feature extractor.

``epmq.quantize_model`` quantizes it block by block and ``epmq.save_quantized`` writes the
result with the tokenizer or image processor beside it: a GPTQ checkpoint that
``epmq.load_quantized``, transformers + GPTQModel and (4/8-bit symmetric) vLLM load. The
per-layer report goes to ``epmq_report.json`` in the same directory. Of a two-tower model
(``CLIPModel``) ``tower="vision"`` quantizes the vision tower.

GPTQ and E-PMQ write each block into ``OUT.resume`` as it is done (``epmq.resume``): after an
interruption the same call goes on from the next block (``resume=False``, ``--fresh``: start
over). The directory is removed once the checkpoint is written.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import re
import warnings
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from ._util import loading_bars, read_json_file
from .adapters import AUTO, find_towers
from .calibration import (audio_batches, audio_files, image_batches, image_files, pair_batches, position_limit,
                          read_pairs, read_texts, task_seeds, text_windows)
from .checkpoint import CONFIG_FILE, FORMATS, _bytes, check_output, is_quantized, save_quantized
from .checkpoint_io import DTYPES, local_checkpoint, local_checkpoint_or_none
from .checks import (check_calibration_paths, check_number, check_outside_calibration, check_path, check_seed,
                     device_argument, is_int)
from .experts import ExpertWeights
from .lora import adapter_directory, open_expert
from .merge_checkpoint import _check_architectures
from .resume import hold, hold_output, records, remove
from .spec import QuantSpec
from .vocabulary import checkpoint_tokenizer, holds_no_vocabulary
from .walker import METHODS, TARGETS, _reads_labels, _selector, quantize_model
from epmq_kernels.expert_residual import check_residual_precision
from epmq_kernels.grid import is_flag

REPORT_FILE = "epmq_report.json"
TOWERS = ("vision", "language")
AUDIO_INPUTS = ("input_values", "input_features")


def _config_json(directory: Path) -> dict:
    """The checkpoint's ``config.json`` ({} if it has none)."""
    path = directory / "config.json"
    return read_json_file(path) if path.is_file() else {}


def _model_class(directory: Path, tower: Optional[str], walked: bool = True):
    """``(model class, encoder-decoder)`` of the checkpoint (``tower``'s); ``walked``: its blocks
    are walked on the calibration (not for RTN, which reads none: Mllama's language model is
    refused only where the walk needs its cross-attention layers called)."""
    import transformers

    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory} has no config.json, which epmq builds the (transformers) model from"
                         + (": an open_clip model is quantized from Python, epmq.quantize_model"
                                    if (directory / "open_clip_config.json").is_file() else ""))
    config = _config_json(directory)
    names = config.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names else _auto_class(directory, config)
    if cls is None:
        raise ValueError(f"{directory}: config.json names architecture {names[0]!r}, which transformers "
                         f"{transformers.__version__} does not have")
    vlm = {"input_ids", "pixel_values"} <= _forward_takes(cls) and _vision_tower_class(cls) is None
    if tower == "language" and not vlm:
        raise ValueError(f"tower: language is for a vision-language model (Llava, Qwen2-VL, Gemma 3, ...), whose "
                         f"language model calibrates on texts; {cls.__name__} is "
                         + ("a two-tower model: tower: vision quantizes its vision tower" if _vision_tower_class(cls)
                            else "not one: leave tower: out"))
    if walked and tower == "language" and (config.get("text_config") or {}).get("cross_attention_layers"):
        # (Mllama's: on text alone the model skips them, and the walk calls every block in turn)
        raise ValueError(f"{cls.__name__}'s language model skips its cross-attention layers on text alone, and "
                         f"the walk needs every block called: quantize it with epmq.quantize_model on "
                         f"(image, text) samples, which walks the whole model")
    if walked and tower is None and not vlm and config.get("cross_attention_layers"):
        # (that language model saved alone, as AutoModelForCausalLM loads a Llama 3.2 Vision: it
        # failed in the walk, after the model and its calibration texts were read)
        raise ValueError(f"{cls.__name__} skips its cross-attention layers on text alone, and the walk needs every "
                         f"block called: quantize the whole vision-language model it was taken from with "
                         f"epmq.quantize_model on (image, text) samples")
    if tower == "vision":
        vision = _vision_tower_class(cls)
        if vision is None:
            what = ("a vision-language model: tower: language quantizes its language model (calibrated on "
                    "texts), epmq.quantize_model both towers in one call" if vlm
                    else "not a two-tower model: leave tower: out")
            raise ValueError(f"tower: vision is for a two-tower model with a vision-tower class "
                             f"(CLIPModel, SiglipModel); {cls.__name__} is {what}")
        cls = vision
    # (a T5EncoderModel saved by transformers 4 keeps its T5 config's "is_encoder_decoder": true,
    # FLUX's and SD3's T5-XXL text encoders among them: an encoder alone, it reads texts)
    return cls, bool(config.get("is_encoder_decoder")) and "decoder_input_ids" in _forward_takes(cls)


def _auto_class(directory: Path, config: dict):
    """The class of a checkpoint whose config.json names no architectures: its model type's
    seq2seq LM (an encoder-decoder) or causal LM, as the auto classes map it. (The auto class
    itself has no forward to read the inputs from: every such checkpoint was refused as taking
    "neither input_ids nor pixel_values".)"""
    import transformers

    auto = transformers.AutoModelForSeq2SeqLM if config.get("is_encoder_decoder") else transformers.AutoModelForCausalLM
    try:
        return auto._model_mapping[type(transformers.AutoConfig.from_pretrained(directory))]
    except (KeyError, ValueError, OSError) as e:  # (a model type this transformers lacks, or none of that kind)
        raise ValueError(f"{directory}: config.json names no architectures, and its model_type "
                         f"{config.get('model_type')!r} has no {auto.__name__} class here ({type(e).__name__}: "
                         f"{str(e)[:120]}): add \"architectures\": [\"<the model's class>\"] to it") from None


def _vision_tower_name(cls) -> str:
    # CLIPModel -> CLIPVisionModel, SiglipModel -> SiglipVisionModel: transformers loads the
    # tower from the two-tower checkpoint
    return cls.__name__.removesuffix("Model") + "VisionModel"


def _vision_tower_class(cls):
    """The vision-tower class of a two-tower model class, or None."""
    import transformers

    return getattr(transformers, _vision_tower_name(cls), None)


def _forward_takes(cls) -> set:
    """The names of the arguments the model class's forward takes."""
    forward = cls.forward if hasattr(cls, "forward") else None
    return set(inspect.signature(forward).parameters) if forward is not None else set()


def _modality(cls, encoder_decoder: bool, tower: Optional[str] = None) -> str:
    takes = _forward_takes(cls)
    if tower == "language":
        return "texts"
    if "input_ids" in takes and "pixel_values" in takes:
        if _vision_tower_class(cls) is not None:  # CLIPModel, SiglipModel
            raise ValueError(f"{cls.__name__} takes both texts and images: quantize its vision tower "
                             f"(tower: vision, calibrated on images), or both towers with "
                             f"epmq.quantize_model on (text, image) pairs")
        raise ValueError(f"{cls.__name__} takes both texts and images, and epmq quantize calibrates on "
                         f"one of them: tower: language quantizes its language model, calibrated on texts "
                         f"(the vision tower left in full precision); epmq.quantize_model with "
                         f"(input_ids, pixel_values) samples walks every tower in one call")
    if "pixel_values" in takes:
        return "images"
    if "input_ids" in takes:
        return "pairs" if encoder_decoder else "texts"
    if takes & set(AUDIO_INPUTS):  # (Wav2Vec2, HuBERT, WavLM; Whisper's, Wav2Vec2-BERT's features)
        return "audio"
    raise ValueError(f"{cls.__name__}: its forward takes none of input_ids, pixel_values, "
                     f"{', '.join(AUDIO_INPUTS)}")


PREPROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")


def calibrated(directory: Path, calibration: Mapping[str, object], *, samples: int = 128,
               seq_len: int = 512, batch_size: int = 8, seed: int = 0, tower: Optional[str] = None,
               preprocessor_dir: Optional[Path] = None, walked: bool = True, out=None):
    """``(model class, tokenizer or image processor, {task: batches})`` for the checkpoint in
    ``directory`` and each task's calibration files, by what the model's forward takes; the
    tokenizer or image processor comes from ``preprocessor_dir`` (default ``directory``);
    ``walked``: the model's blocks are walked on them (``_model_class``); ``out``: the output,
    refused inside a directory of texts or pairs (``check_outside_calibration``)."""
    seed = check_seed(seed)
    cls, encoder_decoder = _model_class(directory, tower, walked)
    modality = _modality(cls, encoder_decoder, tower)
    if modality == "pairs" and calibration and walked and not _reads_labels(cls):
        raise ValueError(f"{cls.__name__}'s forward takes no labels, so the pairs' targets would not reach its "
                         f"decoder: quantize it with epmq.quantize_model on input_ids and decoder_input_ids (the "
                         f"targets shifted right, the decoder's start token first), or with method: rtn")
    if out is not None and modality not in ("images", "audio"):
        # (an image or audio folder's reader takes none of the checkpoint's files: its output may lie there)
        check_outside_calibration(out, {f"task {t!r}": sources for t, sources in (calibration or {}).items()},
                                  resumed=True)
    if calibration and modality in ("texts", "pairs"):  # (RTN reads no windows)
        _check_positions(directory, seq_len)
    model_dir, directory = directory, directory if preprocessor_dir is None else preprocessor_dir
    options = dict(samples=samples, batch_size=batch_size)
    seeds = task_seeds(seed, calibration)  # (each task its own draw: see task_seeds)
    if modality in ("texts", "pairs"):
        preprocessor = tokenizer = _preprocessor(checkpoint_tokenizer, directory, "tokenizer", bool(calibration))
        if tower == "language":  # (the checkpoint takes the whole processor: it serves images too)
            preprocessor = _processor(directory) or tokenizer
        if modality == "texts":  # (conversations are rendered by the tokenizer's chat template)
            # (a .txt read where its windows are, not held: see calibration.TextFile)
            read, make = functools.partial(read_texts, tokenizer=tokenizer, stream=True), text_windows
        else:
            # (a pair read where it is drawn, not held: see calibration.PairLines)
            read, make = functools.partial(read_pairs, stream=True), pair_batches
        batches = {task: make(read(source), tokenizer, seq_len=seq_len, seed=seeds[task],
                              what=f"calibration[{task!r}]", **options)
                   for task, source in calibration.items()}
    elif modality == "audio":
        if encoder_decoder and calibration and walked:  # (RTN reads none: a sweep's calibration beside it is taken)
            raise ValueError(f"{cls.__name__} is an encoder-decoder whose decoder reads transcripts, which audio "
                             f"files do not hold: quantize it with epmq.quantize_model on (input_features or "
                             f"input_values, labels) samples, or with method: rtn")
        preprocessor = _audio_processor(directory, bool(calibration))
        frames = _feature_encoder(cls, model_dir) if calibration else None
        batches = {task: audio_batches(audio_files(source), preprocessor, seed=seeds[task],
                                       what=f"calibration[{task!r}]", model=frames, **options)
                   for task, source in calibration.items()}
    else:
        from transformers import AutoImageProcessor

        preprocessor = _preprocessor(AutoImageProcessor.from_pretrained, directory, "image processor",
                                     bool(calibration))
        batches = {task: image_batches(image_files(source), preprocessor, seed=seeds[task],
                                       what=f"calibration[{task!r}]", **options)
                   for task, source in calibration.items()}
    return cls, preprocessor, batches


def _feature_encoder(cls, directory: Path):
    """What says the frames ``cls``'s convolutions make of a clip, before the model is read: its
    ``_get_feat_extract_output_lengths`` on its config alone (a stand-in of its class's name, for
    ``audio_batches``); None where the class has none."""
    lengths = getattr(cls, "_get_feat_extract_output_lengths", None)
    if not callable(lengths):
        return None
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    return type(cls.__name__, (), {"config": config, "_get_feat_extract_output_lengths": lengths})()


def _broken_json(directory: Path) -> Optional[str]:
    """Which JSON file of ``directory`` is empty or no JSON (an interrupted copy or download),
    said as ``'PATH is empty'``: transformers' JSONDecodeError names no file. None where all read."""
    for path in sorted(Path(directory).glob("*.json")):
        try:
            if path.stat().st_size == 0:
                return f"{path} is empty"
            read_json_file(path)
        except ValueError as e:  # ('PATH is not valid JSON: ...')
            return str(e)
        except OSError:  # (unreadable: not what this says)
            continue
    return None


def _preprocessor(load, directory: Path, what: str, needed: bool):
    """The checkpoint's tokenizer or image processor (``load(directory)``: for a tokenizer,
    ``checkpoint_tokenizer``); where it has none that loads, a ValueError naming the directory
    if calibration data must be read with it, else (RTN) None, with a warning: the checkpoint is
    written without it."""
    error = None
    try:
        loaded = load(directory)
    except Exception as e:  # (transformers raises OSError, ValueError, TypeError, ... by the files)
        error = e
        cause = ((isinstance(e, json.JSONDecodeError) and _broken_json(directory))
                 or f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
    else:
        # (transformers 5 builds a model type's tokenizer of special tokens alone where no files are:
        # the texts read as no tokens, and RTN's checkpoint was written with it)
        if not (what == "tokenizer" and holds_no_vocabulary(loaded, directory)):
            return loaded
        cause = "no tokenizer files: transformers built one of the special tokens alone"
    message = (f"{directory} has no {what} that loads ({cause}); "
               f"it reads the calibration data: copy the base model's {what} files "
               f"({', '.join(PREPROCESSOR_FILES)}, ...) into it")
    if needed:
        raise ValueError(message) from error
    warnings.warn(message.replace("it reads the calibration data", "the checkpoint is written without one"))
    return None


def _audio_processor(directory: Path, needed: bool):
    """An audio checkpoint's processor (its feature extractor with a CTC model's tokenizer, which
    the checkpoint is served with), else its feature extractor (``_preprocessor``)."""
    from transformers import AutoFeatureExtractor, AutoProcessor

    # (only beside a tokenizer's files: without them transformers 5 makes Whisper's processor an
    # empty tokenizer of one token, which would be written beside the checkpoint)
    if any((Path(directory) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        try:
            return AutoProcessor.from_pretrained(directory)
        except Exception:  # noqa: BLE001 (one that does not load: the feature extractor alone, or its error)
            pass
    return _preprocessor(AutoFeatureExtractor.from_pretrained, directory, "feature extractor", needed)


def _processor(directory: Path):
    """A vision-language checkpoint's processor (tokenizer, image processor, chat template), or
    None with a warning: the checkpoint is then written with its tokenizer alone."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(directory)
    except Exception as e:  # (as _preprocessor: transformers raises many kinds)
        warnings.warn(f"{directory} has no processor that loads ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
                      f"the checkpoint is written with its tokenizer alone; copy the image processor's files "
                      f"(preprocessor_config.json, processor_config.json) beside it to serve images")
        return None


def _check_positions(directory: Path, seq_len: int) -> None:
    """A ValueError if ``seq_len`` exceeds the model's table of positions, where GPT-2 would fail in
    its embedding (a rotary, ALiBi or relative model has none: ``position_limit``)."""
    limit = position_limit(_config_json(directory))
    if limit is not None and seq_len > limit[0]:
        raise ValueError(f"seq_len={seq_len} is longer than the model's {limit[0]} positions "
                         f"(config.json): give seq_len <= {limit[0]}")


def check_quantize(method: str, calibration: Optional[Mapping[str, object]],
                   experts: Optional[Mapping[str, object]], *, dtype: Optional[str] = None,
                   tower: Optional[str] = None, checkpoint_format: str = "auto",
                   max_shard_size="5GB", targets: str = "merged_path",
                   residual_precision: Optional[str] = None) -> None:
    """Raise ValueError for a quantization ``quantize_checkpoint`` cannot run, before anything
    is read (the format and shard size too: a typo there must not wait for the walk)."""
    # (quantize_model checks these too, but only once the model is loaded and every task's files
    # tokenized: minutes for a large model before a misspelt expert-path was refused)
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    if method == "gptq" and targets == "expert_path":
        raise ValueError("targets='expert_path' needs experts: use method='epmq'")
    if residual_precision is not None:
        check_residual_precision(residual_precision, "residual_precision")
    if checkpoint_format not in FORMATS + ("auto",):
        raise ValueError(f"checkpoint_format must be 'auto' or one of {FORMATS}, got {checkpoint_format!r}")
    _bytes(max_shard_size)
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    for name, files in (("calibration", calibration), ("experts", experts)):
        if files is None:
            continue
        # (a task's calibration may be several files; its expert is one checkpoint: a list there
        # was accepted here and failed as a TypeError traceback once the model was loaded)
        several = name == "calibration"
        if not isinstance(files, Mapping) or not all(
                isinstance(v, (str, Path)) or (several and isinstance(v, (list, tuple)) and v and
                                               all(isinstance(f, (str, Path)) for f in v))
                for v in files.values()):
            what = "file(s) or a directory" if name == "calibration" else "a checkpoint path or hub id"
            raise ValueError(f"{name} must map each task to {what}, got {files!r}")
        for task, given in files.items():  # (Path('') is the current directory: its files were read in silence)
            if any(isinstance(v, str) and not v for v in (given if isinstance(given, (list, tuple)) else [given])):
                raise ValueError(f"{name}[{task!r}] holds an empty path (''), which reads as the current directory: "
                                 f"give the task's {'file(s) or directory' if several else 'checkpoint'}")
    if dtype is not None and (not isinstance(dtype, str) or dtype not in DTYPES):
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if tower not in (None,) + TOWERS:
        raise ValueError(f"tower must be 'vision' (the vision tower of a two-tower model) or 'language' (the "
                         f"language model of a vision-language model), got {tower!r}")
    if not calibration and method != "rtn":
        raise ValueError(f"method {method!r} needs calibration files: task -> text, image or audio file(s)")
    if method == "epmq":
        tasks, with_expert = set(calibration), set(experts or {})
        if tasks != with_expert:
            raise ValueError(f"E-PMQ needs one expert per calibration task: tasks without an expert "
                             f"{sorted(tasks - with_expert)}, experts without files {sorted(with_expert - tasks)}")
    elif experts:
        raise ValueError(f"method {method!r} takes no experts (only 'epmq' does)")


def quantize_checkpoint(model: Union[str, Path], out: Union[str, Path], *, spec: QuantSpec,
                        calibration: Optional[Mapping[str, object]] = None, method: str = "epmq",
                        experts: Optional[Mapping[str, object]] = None, anchor: float = 1.0,
                        weight_anchor: float = 0.0, targets: str = "merged_path",
                        samples: int = 128, seq_len: int = 512, batch_size: int = 8,
                        seed: int = 0, dtype: Optional[str] = None, device=None,
                        checkpoint_format: str = "auto", max_shard_size="5GB",
                        tower: Optional[str] = None, resume: bool = True,
                        layers: Optional[str] = None, percdamp: float = 0.01,
                        true_sequential: bool = True, residual_precision: Optional[str] = None,
                        lora_base: Optional[Union[str, Path]] = None, progress: bool = True) -> Path:
    """Quantize the model at ``model`` and save it to ``out``; returns ``out``.

    ``calibration``: task -> text, pair or image file(s) or directory (see
    ``epmq.calibration``); ``samples`` windows of ``seq_len`` tokens, pairs or images per task, each
    task drawn with its own seed (``epmq.calibration.task_seeds(seed, tasks)``). E-PMQ needs an
    expert for every task (``experts``: task -> directory, file or HF hub id; a LoRA adapter
    directory is the expert it makes of ``lora_base``, by default the base its config names:
    ``epmq.lora``). ``dtype``: the
    model's dtype while quantizing and in the checkpoint's unquantized tensors (default: the
    checkpoint's). ``device``: where the blocks are quantized (e.g. "cuda"; default the CPU): the
    model is loaded into CPU memory and each block visits the device for its turn, so a model
    larger than the GPU can be quantized on it.
    ``tower="vision"``: of a two-tower model (``CLIPModel``, ``SiglipModel``), quantize and save
    the vision tower alone (``CLIPVisionModel``), calibrated on images. ``tower="language"``: of
    a vision-language model (Llava, Qwen2-VL, ...), quantize its language model (the module
    ``get_decoder()`` gives), calibrated on texts; the vision tower and projector stay in full
    precision in the saved model.
    ``resume``: go on from the blocks an interrupted call left in ``OUT.resume`` (see the module
    docstring); False discards them. ``layers`` (a regular expression over the linears' names),
    ``percdamp``, ``true_sequential`` and ``residual_precision``: as ``epmq.quantize_model``'s.
    """
    check_quantize(method, calibration, experts, dtype=dtype, tower=tower, checkpoint_format=checkpoint_format,
                   max_shard_size=max_shard_size, targets=targets, residual_precision=residual_precision)
    seed = check_seed(seed)
    device_argument(device)  # (else refused by quantize_model once the model was read and calibrated)
    # (these too, and the expression's compiling: quantize_model refused them once the model was loaded
    # and every task's files tokenized, minutes for a large model)
    for value, what in ((anchor, "anchor"), (weight_anchor, "weight_anchor"), (percdamp, "percdamp")):
        check_number(value, what, 0)
    _selector(layers)
    if not is_flag(true_sequential):  # (as quantize_model refuses it: 'no' is truthy)
        raise ValueError(f"true_sequential must be True or False, got {true_sequential!r}")
    check_path(model, "model", ": a model in memory is quantized by epmq.quantize_model"
               if isinstance(model, torch.nn.Module) else "")
    check_path(out, "out")
    check_output(out)
    check_calibration_paths({f"task {t!r}": files for t, files in (calibration or {}).items()})
    resume_dir = None if method == "rtn" else resume_dir_for(Path(os.path.abspath(out)))
    # OUT (RTN's too: it keeps no resume directory) and the resume directory are held from here to the
    # latter's removal: no other run takes them meanwhile, and a second run into OUT is refused at its
    # start, not once it has read its calibration and loaded the model (minutes and a model's memory at 70B)
    with hold_output(out), hold(resume_dir, fresh=not resume) if resume_dir is not None else contextlib.nullcontext():
        try:
            if lora_base is not None and not any(adapter_directory(p) is not None
                                                 for p in (experts or {}).values()):
                raise ValueError("lora_base is the base model of LoRA adapter experts; no expert is an adapter")
            directory = local_checkpoint(model, directory=True)
            if is_quantized(directory):
                raise ValueError(f"{model} is a quantized checkpoint ({CONFIG_FILE}, or quantization_config in "
                                 f"its config.json): give the full-precision model")
            if experts:  # (as epmq merge checks its models: names and shapes alike say nothing of it)
                # (by hub id too: the snapshot is fetched here, as reading the expert would)
                local = {t: here for t, p in experts.items()
                         if (here := local_checkpoint_or_none(p)) is not None}
                # (adapters are read on lora_base, where given: its config and tokenizer, as the walk compares
                # them; one not found is named by open_expert)
                base = None if lora_base is None else local_checkpoint_or_none(lora_base, directory=True)
                # (another RoPE is warned of by quantize_model's check of the model as loaded: once)
                _check_architectures(directory, list(local.values()),
                                     [f"of task {t!r} ({p})" for t, p in local.items()], experts=True, warn=False,
                                     lora_base=base)
            # each expert opened as the walk opens it, before the model loads and the calibration files are
            # read: one holding no weights, or a path to no checkpoint (a folder mistyped), was named once the
            # model had loaded (minutes at 70B), then once every task's files had been read and tokenized
            sources = {t: open_expert(p, lora_base) for t, p in experts.items()} if experts else None
            for task, source in (sources or {}).items():
                ExpertWeights(source, task=task).close()
            cls, preprocessor, batches = calibrated(directory, calibration or {}, samples=samples,
                                                    seq_len=seq_len, batch_size=batch_size, seed=seed, tower=tower,
                                                    walked=method != "rtn", out=out)
            with loading_bars(progress):
                net, loading = _load_unreporting(cls, directory, _two_tower_keys(directory) if tower == "vision"
                                                 else (), dtype=DTYPES[dtype] if dtype else "auto")
            _check_none_missing(model, net, loading)
            net.eval()
            # (a feature extractor's float32 clips met a bf16 model's convolutions: 'expected scalar type
            # Float but found BFloat16', every item refused; transformers' pipelines give them in its dtype)
            batches = {task: [{k: v.to(net.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                               else v for k, v in item.items()} for item in items]
                       for task, items in batches.items()}
            _check_decoder_start(net, batches, directory)
            adapter = None
            if tower == "language":
                decoder = net.get_decoder()
                layers = _within(net, decoder, layers)
                # a language model no registered adapter walks beside a vision tower one does (Aria's) is
                # AUTO's, which the default takes only where no adapter finds blocks: nothing was selected
                prefix = next(name for name, m in net.named_modules() if m is decoder) + "."
                if not any(stack.startswith(prefix) for _, stacks in find_towers(net) for stack, _ in stacks):
                    adapter = AUTO
        except BaseException:  # (stopped before the walk: no block kept, no OUT.resume left)
            _drop_if_no_block(resume_dir)
            raise
        out = Path(os.path.abspath(out))  # ("." has no name to write beside)
        # the model stays in CPU memory; its blocks visit ``device`` one at a time
        try:
            quantize_model(net, spec, method=method, calibration=batches or None, adapter=adapter,
                           experts=sources,
                           anchor=anchor, weight_anchor=weight_anchor, targets=targets, device=device,
                           layers=layers, percdamp=percdamp, true_sequential=true_sequential,
                           **({} if residual_precision is None else {"residual_precision": residual_precision}),
                           resume_dir=resume_dir, progress=progress)
        except ValueError as e:
            if resume_dir is not None and str(e).startswith(f"resume_dir {resume_dir}"):
                raise ValueError(f"{e} (here: run with --fresh, or resume=False)") from e
            _drop_if_no_block(resume_dir)
            if isinstance(e.__cause__, IndexError):  # (the model's own error: name the token, if a token)
                _check_token_ids(net, batches, preprocessor)
            raise
        except BaseException:
            _drop_if_no_block(resume_dir)
            raise

        def extras(directory):
            if preprocessor is not None:
                preprocessor.save_pretrained(directory)
            net.epmq_report.to_json(directory / REPORT_FILE)

        saved = save_quantized(net, out, checkpoint_format=checkpoint_format, max_shard_size=max_shard_size,
                               extras=extras, progress=progress)
        if resume_dir is not None and os.name != "nt":  # (Windows: once the lock file is closed)
            remove(resume_dir)
    if resume_dir is not None and os.name == "nt":
        remove(resume_dir)
    return saved


def _two_tower_keys(directory: Path) -> list:
    """The tensor names of the two-tower model (CLIPModel, SiglipModel) whose checkpoint ``directory`` is, as its
    class built on the meta device from config.json has them. Empty where it cannot be built so."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(directory)
        with torch.device("meta"):
            return list(getattr(transformers, config.architectures[0])._from_config(config).state_dict())
    except Exception:  # (best effort: without them transformers' report stays as it is)
        return []


def _load_unreporting(cls, directory: Path, keys, **kwargs):
    """``cls.from_pretrained(directory, output_loading_info=True, **kwargs)``, whose load report says nothing of
    the unexpected checkpoint tensors named ``keys``: a two-tower checkpoint's text tower, projections and logit
    scale, which its vision tower leaves out on purpose (~23 UNEXPECTED rows, 'not ok if you expect identical
    arch', even under --quiet). Its other rows (tensors missing, unexpected ones inside the tower) stay."""
    if not keys:
        return cls.from_pretrained(directory, output_loading_info=True, **kwargs)
    attribute = "_keys_to_ignore_on_load_unexpected"
    # (exact names: transformers searches its patterns unanchored, and names a stray tensor inside the tower
    # by its name in the tower, which no two-tower name is)
    ours = {f"^{re.escape(key)}$" for key in keys}
    # (a subclass of this load's own holds them: they were set on the class for the load's duration, which
    # another thread's load of it meanwhile read, its report then silent on a two-tower checkpoint's tensors;
    # the model is the class's own instance again once loaded)
    loader = type(cls.__name__, (cls,), {attribute: set(getattr(cls, attribute, None) or ()) | ours,
                                         "__module__": cls.__module__, "__qualname__": cls.__qualname__})
    net, loading = loader.from_pretrained(directory, output_loading_info=True, **kwargs)
    net.__class__ = cls
    if attribute in vars(net):  # (transformers 5's post_init copies them, and the walk reads an expert's keys by them)
        setattr(net, attribute, set(vars(net)[attribute]) - ours)
    return net, loading


def _check_none_missing(model, net, loading: Mapping) -> None:
    """Refuse a checkpoint that lacks tensors of the model it builds: from_pretrained initialises them at
    random, says so only in its load report (under a vision tower's, beside the other tower's keys it does not
    load), and the walk quantized the noise into a checkpoint."""
    missing = sorted(loading.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 1} more (e.g. {', '.join(missing[1:3])})" if len(missing) > 1 else ""
        raise ValueError(f"{model} holds no {missing[0]!r} of {type(net).__name__}{more}: from_pretrained would "
                         f"leave it random-initialised; give the checkpoint of the whole model (its weights under the "
                         f"names its config.json's class loads)")


def _check_decoder_start(net, batches: Mapping[str, list], directory: Path) -> None:
    """Name a missing ``decoder_start_token_id`` before the walk, where the model's decoder inputs
    (its labels shifted right) need it: T5's _shift_right failed on its absence with a bare
    AttributeError mid-walk. Asked of the model itself, not of config.json: BART's config class
    supplies 2 where the file has none, and mBART's shift starts each row with its last token,
    never reading it (config.json's null there is no defect)."""
    if getattr(net.config, "decoder_start_token_id", None) is not None:
        return
    shift = getattr(net, "prepare_decoder_input_ids_from_labels", None)
    labels = next((item["labels"] for items in batches.values() for item in items
                   if isinstance(item, Mapping) and isinstance(item.get("labels"), torch.Tensor)), None)
    if shift is None or labels is None:
        return
    try:
        shift(labels=labels[:1])
    except (AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"{directory / 'config.json'} has no decoder_start_token_id, the token the decoder's "
                         f"inputs start with (T5's is its pad token, 0; BART's its </s>, 2): add it") from e


def _check_token_ids(net, batches: Mapping[str, list], tokenizer) -> None:
    """A ValueError naming a calibration token the model has no embedding row for, where the
    walk failed with an IndexError: a tokenizer with tokens added after the embeddings were sized
    (a chat expert's, copied beside a merge) fails so in the embedding, which names no token."""
    embeddings = net.get_input_embeddings() if hasattr(net, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if not is_int(rows):
        return
    for task, items in batches.items():
        # (an encoder-decoder's targets, labels, are token ids of the same embeddings: T5's decoder
        # reads them shifted right)
        for ids in (item.get(key) for item in items if isinstance(item, Mapping)
                    for key in ("input_ids", "labels", "decoder_input_ids")):
            if not isinstance(ids, torch.Tensor) or ids.numel() == 0 or int(ids.max()) < rows:
                continue
            bad = int(ids.max())
            token = getattr(tokenizer, "tokenizer", tokenizer).convert_ids_to_tokens(bad)
            raise ValueError(f"calibration[{task!r}]: token {token!r} (id {bad}) has no row in the model's "
                             f"{rows} embedding rows: the tokenizer ({len(getattr(tokenizer, 'tokenizer', tokenizer))} "
                             f"tokens) holds tokens the model's embeddings were not resized for; give the "
                             f"model's own tokenizer, or resize them (model.resize_token_embeddings), or merge "
                             f"with tokenizer_source: union")


def _within(model, module, layers: Optional[str]):
    """The predicate over linear names that selects those of ``module`` (a submodule of
    ``model``) that the regular expression ``layers`` (if any) also selects."""
    prefix = next(name for name, m in model.named_modules() if m is module) + "."
    select = _selector(layers)
    return lambda name: name.startswith(prefix) and select(name)


def _drop_if_no_block(resume_dir) -> None:
    """A walk that stopped before its first block leaves nothing worth keeping (of its own: a user's
    files in the directory are kept, and it with them)."""
    if resume_dir is not None and resume_dir.is_dir() and not resume_dir.is_symlink() and not records(resume_dir):
        remove(resume_dir)


def resume_dir_for(out: Path) -> Path:
    """Where ``quantize_checkpoint`` keeps the blocks done while it writes ``out``."""
    return out.with_name(f"{out.name}.resume")
