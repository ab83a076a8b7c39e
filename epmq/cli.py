"""The ``epmq`` command line.

    epmq demo                 the embedded 8-task benchmark (trains once, cached; then quantizes)
    epmq run CONFIG.yaml      a whole experiment from a config (merge, quantize, evaluate)
    epmq merge CONFIG.yaml OUT   merge checkpoints into a checkpoint (no evaluation)
    epmq quantize CONFIG.yaml OUT   quantize a checkpoint with calibration texts, images or audio
    epmq bench                the kernel benchmarks on a CUDA GPU

``demo`` and ``run`` write ``results.json``, ``table.md`` and ``accuracy.png`` into their output
directory and can be interrupted: run them again and they resume. ``merge`` and ``quantize``
write a checkpoint directory atomically; ``quantize`` keeps each block done in ``OUT.resume``
until then, so it resumes too. ``bench`` writes the benchmark JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

from ._util import loading_bars
from .checks import check_seed, is_int

EXAMPLES = """examples:
  epmq demo                                  # 3.5-7 min on 2 CPU cores (trains once, cached); a rerun reuses the results
  epmq demo --out runs/demo --seed 1         # another seed, its own cache entry
  epmq run configs/clip-vit-b32-8tasks.yaml  # CLIP-ViT-B/32 on 8 tasks (needs the HF hub)
  epmq run my.yaml --fresh                   # ignore earlier results in the output directory
  epmq bench --out benchmarks/results        # W4A16 and solver kernels vs torch (CUDA only)
  epmq merge ties.yaml merged/ties           # merge checkpoints (local or HF hub) into one
  epmq quantize w4.yaml merged/ties-w4       # then quantize the merge with E-PMQ
"""

MERGE_CONFIG = """A merge config (YAML; relative paths are relative to the current directory,
~ is your home; examples in configs/files/):

  method: ties                      # task_arithmetic, ties, dare, breadcrumbs, della, sce,
                                    # tsv, iso_c, model_stock, average, slerp, nuslerp,
                                    # multislerp, karcher, nearswap, ram, ram_plus,
                                    # arcee_fusion, regmean
  base: meta-llama/Llama-3.1-8B     # directory, weights file or HF hub id (none for average,
                                    # slerp, karcher, regmean; optional for nuslerp, multislerp)
  models: [ckpt/math, ckpt/code]    # the experts (slerp: two models, the first at t = 0):
                                    # checkpoints, or PEFT LoRA adapter directories (on the base)
  lora_base: ckpt/base              # optional, for LoRA adapters merged without a base
                                    # (average, slerp, karcher, regmean, ...): their base, if not
                                    # their config's
  params: {density: 0.2}            # the method's parameters (epmq.merge), e.g. scale, t,
                                    # weights (one per model)
  dtype: bfloat16                   # optional: float32, float16 or bfloat16 (default: the base's)
  max_shard_size: 5GB               # optional
  files_from: ckpt/math             # optional: the model whose config and tokenizer files the
                                    # output carries (default: the base, else the first model)
  chat_template: auto               # optional: the output tokenizer's template (Jinja text), or
                                    # auto: the one most of the models carry
  tokenizer_source: union           # optional, for experts with added tokens: lay every model's
                                    # embeddings out by the union of their tokens (or base: the
                                    # base's tokenizer); pad_to_multiple_of: 64 rounds the rows up;
                                    # tokens: {"<|im_start|>": {source: ckpt/chat}} names a row
  calibration: [data/math.jsonl, data/code.jsonl]   # regmean only: each model's own task files
                                    # (as epmq quantize reads them; samples, seq_len, batch_size, seed)

A mergekit config (merge_method:, base_model:, models: [{model:, parameters:}], parameters:)
runs as it is for task_arithmetic, ties, breadcrumbs(_ties), dare_ties, dare_linear, della,
della_linear, sce, linear, model_stock, slerp, nuslerp, multislerp, karcher, nearswap, ram,
ramplus_tl and arcee_fusion
(SLERP's t also as a gradient with filters; slices of whole models): epmq.mergekit_config says
how each maps, and the rest is refused by name.
"""


class CLIError(Exception):
    """A problem the user can fix; printed without a traceback."""


# --------------------------------------------------------------------------- demo


def _demo(args) -> int:
    from .demo import default_plan, prepare

    if not abs(args.seed) < 2 ** 32:  # (the demo draws with seed * 1000 + k: torch's generators take 64 bits)
        raise CLIError(f"--seed must be from -(2**32 - 1) to 2**32 - 1, got {args.seed}")
    torch_threads(args.threads)
    out = Path(args.out)
    check_out_dir(out)
    from .demo.train import default_cache_root

    check_out_dir(Path(args.cache_dir) if args.cache_dir is not None else default_cache_root(), "cache directory",
                  writable=False)
    with holding(out):
        t0 = time.perf_counter()
        try:
            bench = prepare(cache_dir=args.cache_dir, seed=args.seed, progress=not args.quiet)
        except OSError as e:  # (a cache directory not writable, a disk that fills up: as run says them)
            raise CLIError(f"{type(e).__name__}: {e}") from e
        plan = default_plan(quick=args.quick)
        from .resume import tensor_digest

        # the trained models themselves, by content: the folder's name is the configuration's hash,
        # and another machine's or torch's training of it (a cache cleared, another EPMQ_CACHE_DIR)
        # holds other weights, whose results must not be resumed from the first's. (Not by the
        # files' times: two demos training one cache at once write the same weights twice.)
        models = tensor_digest(
            [(f"base.{k}", v) for k, v in sorted(bench.base_state.items())]
            + [(f"{t}.{k}", v) for t in bench.task_names for k, v in sorted(bench.experts[t].items())]
            + [(f"heads.{t}", bench.heads[t]) for t in bench.task_names]
            + [(f"splits.{k}", v) for k, v in sorted(bench.splits.items())])
        identity = {"bench": "epmq-demo", "seed": args.seed, "cache": bench.cache_dir.name, "models": models}
        results = _run_pipeline(bench, plan, out, identity, args)
        from . import pipeline
        from .demo import sampling_note

        note = sampling_note(pipeline.table_rows(results, plan), bench.counts())
        _finish(results, plan, bench.task_names, out, t0, note)
        return 0


# --------------------------------------------------------------------------- merge

def _load_yaml(path: Path, help_text) -> dict:
    """The YAML mapping at ``path``; a CLIError (with ``help_text``) for anything else."""
    from .benches import BenchConfigError, load_config

    try:
        return load_config(path, expected=f"a mapping\n\n{help_text}")
    except BenchConfigError as e:
        raise CLIError(str(e)) from e


def _yaml_mapping(path: Path, keys, required, help_text, config: Optional[dict] = None) -> dict:
    """A merge or quantize config: the YAML mapping at ``path`` (or ``config``, read from it)
    with only ``keys``, all of ``required`` among them."""
    config = _load_yaml(path, help_text) if config is None else config
    unknown = sorted(set(config) - set(keys))
    if unknown:
        raise CLIError(f"{path}: unknown keys {unknown}; allowed: {sorted(keys)}")
    missing = [k for k in required if k not in config]
    if missing:
        raise CLIError(f"{path}: missing {missing}\n\n{help_text}")
    return {k: _key_expanded(k, v) if k in PATH_KEYS else v for k, v in config.items()}


# the keys of merge and quantize configs that hold paths (or lists or task mappings of them;
# tokens: {token: {source: model}} names a model as models gives it, so as it is expanded)
PATH_KEYS = ("model", "base", "models", "lora_base", "tokenizer_source", "files_from", "calibration", "experts",
             "tokens")
# those of a mergekit config (models: [{model: ...}], slices' sources, tokenizer: {source, tokens})
MERGEKIT_PATH_KEYS = ("base_model", "models", "slices", "tokenizer", "tokenizer_source")


def _home_expanded(value):
    """``~/x`` paths as the shell would expand them (as the bench configs' are); hub ids and
    keywords (``tokenizer_source: union``) do not start with ``~``."""
    if isinstance(value, str) and value.startswith("~"):
        return os.path.expanduser(value)
    if isinstance(value, list):
        return [_home_expanded(v) for v in value]
    if isinstance(value, dict):
        return {k: _home_expanded(v) for k, v in value.items()}
    return value


def _key_expanded(key, value):
    """A config entry's paths ~-expanded: in ``tokens`` (also under mergekit's ``tokenizer``),
    only the models a token's source names, never a token's text (``token: "~"`` is a token)."""
    if key == "tokenizer" and isinstance(value, dict):
        return {k: _key_expanded(k, v) for k, v in value.items()}
    if key != "tokens" or not isinstance(value, dict):
        return _home_expanded(value)
    out = {}
    for token, spec in value.items():
        if isinstance(spec, dict) and "source" in spec:
            source = spec["source"]
            if isinstance(source, dict) and "model" in source:  # (model_token: its token is text)
                source = {**source, "model": _home_expanded(source["model"])}
            elif isinstance(source, str):
                source = _home_expanded(source)
            spec = {**spec, "source": source}
        out[token] = spec
    return out


MERGE_KEYS = {"method", "base", "models", "params", "dtype", "max_shard_size", "calibration",
              "samples", "seq_len", "batch_size", "seed", "lora_base", "chat_template", "tokenizer_source",
              "pad_to_multiple_of", "tokens", "files_from"}


def _check_paths(config: dict, keys, where) -> None:
    """A clear error where a path of the config is not a string (YAML reads an unquoted
    2024-12-05 as a date, 123 as a number)."""
    for key in keys:
        value = config.get(key)
        if value is not None and not isinstance(value, str):
            hint = (" (YAML reads it as a " + type(value).__name__ + ": quote it)"
                    if isinstance(value, (int, float, datetime.date)) else "")
            raise CLIError(f"{where}: {key} must be a path or HF hub id, got {value!r}{hint}")


def _merge(args) -> int:
    from .merge_checkpoint import merge_checkpoints
    from .mergekit_config import from_mergekit, is_mergekit

    config = _load_yaml(Path(args.config), MERGE_CONFIG)
    notes = []
    if is_mergekit(config):
        # (its paths too: the translation below reads the models' config files)
        config = {k: _key_expanded(k, v) if k in MERGEKIT_PATH_KEYS else v for k, v in config.items()}
        try:
            with warnings.catch_warnings(record=True) as notes:
                warnings.simplefilter("always")
                config = {k: v for k, v in from_mergekit(config).items() if v is not None}
        except ValueError as e:
            raise CLIError(f"{args.config}: {e}") from e
        for note in notes:  # (what the translation warns of: a line each, not a Python warning)
            print(f"{args.config}: note: {note.message}", file=sys.stderr)
        if not args.quiet:
            print(f"mergekit config read as: {config}")
    config = _yaml_mapping(Path(args.config), MERGE_KEYS, ("method", "models"), MERGE_CONFIG, config)
    _check_paths(config, ("base", "lora_base", "tokenizer_source", "files_from"), args.config)
    models = config["models"]
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise CLIError(f"{args.config}: models must be a list of paths or HF hub ids, got {models!r}")
    reading = sorted({"samples", "seq_len", "batch_size", "seed"} & set(config))
    if reading and config["method"] != "regmean":
        raise CLIError(f"{args.config}: {', '.join(reading)} set how RegMean reads its calibration data; "
                       f"merge {config['method']} reads none"
                       + (" (DARE's and DELLA's own seed is params: {seed: ...})" if "seed" in reading else ""))
    torch_threads(args.threads)
    t0 = time.perf_counter()
    try:
        check_reading(config)
        data = {k: config[k] for k in ("calibration", "samples", "seq_len", "batch_size", "seed", "lora_base",
                                       "chat_template", "tokenizer_source", "pad_to_multiple_of", "tokens",
                                       "files_from")
                if k in config}
        # (OUT is held by merge_checkpoints from before the models are read, as quantize_checkpoint holds it)
        with warnings.catch_warnings():
            # (the translation read the models' tokenizers, and said how as notes: the merge reads them
            # again, and said each a second time as a warning)
            for note in notes:
                warnings.filterwarnings("ignore", re.escape(str(note.message)) + r"\Z", note.category)
            out = merge_checkpoints(config["method"], models, args.out, base=config.get("base"),
                                    params=config.get("params"), dtype=config.get("dtype"),
                                    max_shard_size=config.get("max_shard_size", "5GB"),
                                    device=args.device, progress=not args.quiet, **data)
    except (ValueError, OSError) as e:  # (OSError: a disk that fills up, a directory not writable)
        raise CLIError(str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}") from e
    print(f"merged {len(models)} models with {config['method']} into {out} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


# --------------------------------------------------------------------------- quantize

QUANTIZE_CONFIG = """A quantize config (YAML; relative paths are relative to the current directory,
~ is your home; examples in configs/files/):

  model: merged/ties                # the (merged) model: a causal LM, an encoder-decoder
                                    # (T5, BART), a vision tower (CLIPVisionModel, ViT, ...) or a
                                    # speech encoder (Wav2Vec2, HuBERT, WavLM): directory or hub id
  method: epmq                      # rtn, gptq or epmq
  calibration:                      # task -> texts (.txt / .jsonl / .json / .parquet; .gz too) for a
                                    # language model ({"text"}, {"messages"} through the chat
                                    # template, {"prompt", "completion"}: the task's fine-tuning
                                    # file), {"input", "target"} pairs (.jsonl / .json /
                                    # .parquet) for an encoder-decoder, images (a folder tree)
                                    # for a vision tower, .wav files (a folder tree; .flac,
                                    # .ogg, .mp3 with soundfile) for a speech encoder
    math: data/math.jsonl
    code: data/code.txt
  experts: {math: ckpt/math, code: ckpt/code}   # E-PMQ only: one expert per task (a checkpoint,
                                    # or a PEFT LoRA adapter directory)
  lora_base: ckpt/base              # optional: the base model of LoRA adapter experts (default:
                                    # the base_model_name_or_path of their adapter_config.json)
  bits: 4                           # 2, 3, 4 or 8
  group_size: 128                   # -1: per output channel
  sym: true                         # default false; true: symmetric grids (what vLLM's Marlin needs)
  act_order: false
  static_groups: false
  anchor: 0.1                       # E-PMQ's lam (default 1.0); weight_anchor: its mu (default 0);
                                    # targets: merged_path (default), expert_path or fp_path
  samples: 128                      # calibration windows (of seq_len tokens), images or clips per task
  seq_len: 512                      # a window's tokens; a pair's input and target each cut to it
  batch_size: 8
  seed: 0                           # the draw of the windows (their offsets), images or pairs;
                                    # of several tasks, each its own (from seed and its name)
  dtype: float16                    # optional: the model's dtype (default: the checkpoint's)
  checkpoint_format: auto           # gptq (v1), gptq_v2, or auto
  max_shard_size: 5GB
  tower: vision                     # optional, for a CLIPModel / SiglipModel: its vision tower alone;
                                    # language, for a vision-language model (Llava, Qwen2-VL, ...):
                                    # its language model, calibrated on texts
  layers: "self_attn|mlp"           # optional: a regular expression over the linears to quantize
  percdamp: 0.01                    # GPTQ's damping (fraction of the mean Hessian diagonal)
  true_sequential: true             # a block's linears in dependency groups (false: one pass)
  residual_precision: bf16x3        # E-PMQ's expert residual on the GPU: bf16x3, tf32x3, ieee, tf32
"""
SPEC_KEYS = ("bits", "group_size", "sym", "act_order", "static_groups")
QUANTIZE_KEYS = {"model", "method", "calibration", "experts", "anchor", "weight_anchor", "targets",
                 "samples", "seq_len", "batch_size", "seed", "dtype", "checkpoint_format",
                 "max_shard_size", "tower", "layers", "percdamp", "true_sequential",
                 "residual_precision", "lora_base", *SPEC_KEYS}


def check_reading(options: dict) -> None:
    """How calibration data is read (``epmq quantize``, ``epmq merge`` with RegMean): integers."""
    for key in ("samples", "seq_len", "batch_size"):
        value = options.get(key, 0)
        if not is_int(value):
            raise ValueError(f"{key} must be an integer, got {value!r}")
    check_seed(options.get("seed", 0))


# what each method does not read (a config switched from epmq to gptq must not keep an anchor
# that no longer acts)
UNREAD_BY = {
    # (RTN also has no column order, act_order, and its grid is the weight's own, static_groups:
    # both were accepted and dropped, desc_act false in a checkpoint asked for act_order)
    "rtn": {"calibration", "samples", "seq_len", "batch_size", "seed", "percdamp", "anchor", "weight_anchor",
            "targets", "true_sequential", "residual_precision", "experts", "lora_base", "act_order",
            "static_groups"},
    "gptq": {"anchor", "weight_anchor", "residual_precision", "experts", "lora_base"},
    "epmq": set(),
}


def _check_tasks_named(config: dict) -> None:
    """A ValueError showing the YAML to write where calibration or experts is given as files
    without the tasks they are of (``calibration: data/math.jsonl``): each is named by its
    file's stem, else task1, task2, ..."""
    import yaml

    for key in ("calibration", "experts"):
        given = config.get(key)
        paths = [given] if isinstance(given, str) else given
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            continue  # (a mapping, or what no example fits: check_quantize says it)
        tasks = [Path(p).stem for p in paths]
        if len(set(tasks)) < len(tasks) or not all(tasks):
            tasks = [f"task{k}" for k in range(1, len(paths) + 1)]
        example = yaml.safe_dump({key: dict(zip(tasks, paths))}, default_flow_style=False, sort_keys=False)
        what = "file(s) or directory" if key == "calibration" else "expert checkpoint"
        raise ValueError(f"{key} must map each task to its {what}, got {given!r}, which names no task; e.g.\n\n"
                         + "".join(f"  {line}\n" for line in example.splitlines()).rstrip("\n"))


def quantize_options(config: dict):
    """A quantize config's ``QuantSpec`` and the keyword arguments of ``quantize_checkpoint``
    (checked: ValueError for what it could not run)."""
    from .checks import check_number
    from .quantize_files import check_quantize
    from .spec import QuantSpec

    spec = QuantSpec(**{k: config[k] for k in SPEC_KEYS if k in config})
    options = {k: v for k, v in config.items() if k not in SPEC_KEYS and k != "model"}
    check_reading(options)
    unread = sorted(UNREAD_BY.get(options.get("method"), set()) & set(config))
    if unread:
        raise ValueError(f"method {options['method']} does not read {', '.join(unread)}: remove "
                         f"{'it' if len(unread) == 1 else 'them'}"
                         + (" (RTN rounds each weight alone, from no data)" if options["method"] == "rtn"
                            else " (or use method: epmq)"))
    if not isinstance(options.get("lora_base", ""), str):
        raise ValueError(f"lora_base must be a path or HF hub id, got {options['lora_base']!r}")
    if not isinstance(options.get("layers", ""), str):
        raise ValueError(f"layers must be a regular expression (a string), got {options['layers']!r}")
    if not isinstance(options.get("true_sequential", True), bool):
        raise ValueError(f"true_sequential must be true or false, got {options['true_sequential']!r}")
    for key in ("percdamp", "anchor", "weight_anchor"):
        # (>= 0, as the solver checks them: said before the model loads, not at its first block)
        check_number(options.get(key, 0.0), key, minimum=0.0)
    _check_tasks_named(options)
    check_quantize(options["method"], options.get("calibration"), options.get("experts"),
                   dtype=options.get("dtype"), tower=options.get("tower"),
                   checkpoint_format=options.get("checkpoint_format", "auto"),
                   max_shard_size=options.get("max_shard_size", "5GB"),
                   targets=options.get("targets", "merged_path"),
                   residual_precision=options.get("residual_precision"))
    return spec, options


def _quantize(args) -> int:
    from .quantize_files import REPORT_FILE, quantize_checkpoint
    from .walker import _out_of_memory

    config = _yaml_mapping(Path(args.config), QUANTIZE_KEYS, ("model", "method"), QUANTIZE_CONFIG)
    _check_paths(config, ("model", "lora_base"), args.config)
    if not config["model"]:  # (`model:` left empty reads as null: a TypeError deep in the loading)
        raise CLIError(f"{args.config}: model must be a path or HF hub id, got {config['model']!r}")
    torch_threads(args.threads)
    t0 = time.perf_counter()
    try:
        spec, options = quantize_options(config)
        out = quantize_checkpoint(config["model"], args.out, spec=spec, device=args.device,
                                  resume=not args.fresh, progress=not args.quiet, **options)
    except Exception as e:
        # (OSError: a disk that fills up, a directory not writable; out of memory: a GPU or the CPU a late
        # block outgrew, a RuntimeError, which would end in a traceback saying nothing of the blocks kept)
        if isinstance(e, (ValueError, OSError)) or _out_of_memory(e):
            message = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            # (the walk's note of the block, calibration item and pass an error was raised in: said too)
            message += "".join(f"\n{note}" for note in getattr(e, "__notes__", ()))
            raise CLIError(message + _blocks_kept(args.out, message)) from e
        # (another error keeps its traceback: the blocks kept said beneath it)
        kept = _blocks_kept(args.out, str(e))
        if kept:
            e.add_note(kept.lstrip("\n"))
        raise
    resumed = json.loads((Path(out) / REPORT_FILE).read_text(encoding="utf-8")).get("resumed")
    print(f"quantized {config['model']} with {config['method']} ({spec.bits}-bit) into {out} "
          f"in {time.perf_counter() - t0:.1f} s"
          + (f" ({len(resumed)} blocks loaded from the interrupted run)" if resumed else ""))
    return 0


def _blocks_kept(out, message: str) -> str:
    """What a failed quantization into ``out`` kept in OUT.resume (a full disk, a NaN in a late
    block: the blocks done need not be solved again, and a user freeing space might delete them)."""
    from .quantize_files import resume_dir_for
    from .resume import output_lock_file, records

    kept = resume_dir_for(Path(os.path.abspath(out)))
    # (refused: its own remedy; OUT in use: the blocks there are the other run's, which it goes on with)
    if message.startswith(f"resume_dir {kept}") or str(output_lock_file(out)) in message or not kept.is_dir():
        return ""
    n = len(records(kept))
    if not n:
        return ""
    blocks = "1 block done is" if n == 1 else f"{n} blocks done are"
    # (the checkpoint's own settings are not the walk's: a save refused for its format, v1 zero points of 0, goes on
    # from every block with checkpoint_format changed, which "the same settings" alone forbade)
    return (f"\n{blocks} kept in {kept}: a rerun with the same settings (without --fresh) resumes from them "
            f"(checkpoint_format and max_shard_size may change)")


# --------------------------------------------------------------------------- run


def _run(args) -> int:
    from . import pipeline
    from .benches import build_bench, load_config

    from .benches import BenchConfigError

    config_path = Path(args.config)
    try:
        config = load_config(config_path)
    except BenchConfigError as e:
        raise CLIError(str(e)) from None
    torch_threads(args.threads)
    known = {"seed", "model", "tasks", "data", "eval", "merge", "quantize", "output"}
    unknown = sorted(set(config) - known)
    if unknown:
        raise CLIError(f"{config_path}: unknown top-level keys {unknown}; allowed: {sorted(known)}")
    try:
        plan = pipeline.Plan.from_config(config.get("merge"), config.get("quantize"))
    except (TypeError, ValueError) as e:
        raise CLIError(f"{config_path}: {e}") from None
    output = config.get("output") or {}
    if not isinstance(output, dict) or set(output) - {"dir"} or not isinstance(output.get("dir", ""), str):
        raise CLIError(f"{config_path}: output must be a mapping with one key, dir (a path), got {output!r}")
    # (~ is the home, as in the bench sections' paths: else a folder named "~" beside the config)
    out = Path(args.out or os.path.expanduser(output.get("dir") or "") or f"runs/{config_path.stem}")
    if not out.is_absolute() and args.out is None and output.get("dir"):
        out = config_path.parent / out
    check_out_dir(out)
    with holding(out):
        t0 = time.perf_counter()
        try:
            bench = build_bench(config, base_dir=config_path.parent, progress=not args.quiet)
        except (FileNotFoundError, ValueError) as e:
            raise CLIError(f"{config_path}: {e}") from None
        identity = getattr(bench, "identity", None) or {
            "config": {k: config.get(k) for k in ("seed", "model", "tasks", "data", "eval")}}
        try:  # (the merges' parameters against the tasks' count: one line, not a traceback)
            pipeline.check_merges(plan, len(bench.task_names))
        except ValueError as e:
            raise CLIError(f"{config_path}: {e}") from None
        try:
            results = _run_pipeline(bench, plan, out, identity, args)
        except BenchConfigError as e:  # data problems found when a split is first read
            raise CLIError(f"{config_path}: {e}") from None
        _finish(results, plan, bench.task_names, out, t0)
        return 0


# --------------------------------------------------------------------------- bench


def _bench(args) -> int:
    import torch

    check_out_dir(Path(args.out))
    if not torch.cuda.is_available():
        raise CLIError("epmq bench times the GPU kernels and needs a CUDA GPU (none is visible)")
    root = Path(__file__).resolve().parents[1]
    scripts = root / "benchmarks"
    if not (scripts / "bench_w4a16.py").is_file():
        raise CLIError(
            f"the benchmark scripts are not next to this installation ({scripts}): "
            "run epmq bench from a source checkout installed with `pip install -e .`"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name().lower()).strip("-")
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    commands = []
    if args.only in (None, "w4a16"):
        commands.append([sys.executable, str(scripts / "bench_w4a16.py"), "--out", str(out / f"w4a16-{slug}.json"),
                         "--plot", str(out / f"w4a16-{slug}.png")])
    if args.only in (None, "solver"):
        commands.append([sys.executable, str(scripts / "bench_solver.py"), "--out", str(out)])
    failed = 0
    for cmd in commands:
        print("$", " ".join(cmd), flush=True)
        failed += subprocess.call(cmd, env=env) != 0
    print(f"results in {out}")
    return 1 if failed else 0


# --------------------------------------------------------------------------- shared


def torch_threads(n):
    if n is not None and n < 1:
        raise CLIError(f"--threads must be a positive number of threads, got {n}")
    if n:
        import torch

        torch.set_num_threads(n)


@contextlib.contextmanager
def holding(out: Path):
    """One run at a time in ``out`` (``epmq run``, ``epmq demo``), held from before the bench is
    built (the demo's training, minutes) to the report's end: another is refused at its start,
    naming the process that holds it (``resume.hold_run``)."""
    from .resume import hold_run

    with contextlib.ExitStack() as held:
        try:  # (taking the hold alone: the run's own ValueError or OSError is not said as the hold's)
            held.enter_context(hold_run(out, run=False))
        except (ValueError, OSError) as e:  # (OSError: the directory cannot be made)
            raise CLIError(str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}") from None
        yield


def _run_pipeline(bench, plan, out: Path, identity: dict, args) -> dict:
    """``pipeline.run`` as ``epmq run`` and ``epmq demo`` run it, a results file not epmq's and
    an OSError (a disk that fills up, a directory not writable) said in one line, as merge and
    quantize say them."""
    from . import pipeline

    try:
        return pipeline.run(bench, plan, out, resume=not args.fresh, progress=not args.quiet,
                            log=_log(args), identity=identity)
    except pipeline.ResultsFileError as e:
        raise CLIError(str(e)) from None
    except OSError as e:
        raise CLIError(f"{type(e).__name__}: {e}") from e


def check_out_dir(out: Path, what: str = "output directory", writable: bool = True) -> None:
    """A CLIError, before anything runs, where the output directory cannot be one: it, or the
    nearest of its parents that exists, is a file (else the first result written ended the run,
    after the base's evaluation or the demo's training, in a FileExistsError traceback), or,
    with ``writable``, cannot be written into (a read-only file system, another user's: the same
    failure, after the same work). The demo's cache is not asked to be: a complete one is only read."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                raise CLIError(f"{what} {out}: {path} is a file, not a directory")
            if writable and not os.access(path, os.W_OK | os.X_OK):
                raise CLIError(f"{what} {out}: {path} is not writable")
            return


def _log(args):
    if args.quiet:
        return lambda msg: None
    return lambda msg: print(msg, flush=True)


def _finish(results, plan, tasks, out: Path, t0: float, note: Optional[str] = None) -> None:
    from . import pipeline

    try:
        text = pipeline.report(results, plan, tasks, out)
    except OSError as e:  # (a disk that fills up at the last files: said as a step's failure is)
        raise CLIError(f"{type(e).__name__}: {e} (the results are in {out / 'results.json'}; "
                       f"the same command again writes the report)") from e
    print()
    print("Average test accuracy (%), per task and overall; merge scales and anchors chosen on validation:")
    print(text)
    if note:
        print(f"\n{note}")
    print(f"\nwrote {out / 'results.json'}, {out / 'table.md'}, {out / 'accuracy.png'}, "
          f"{out / 'accuracy_per_task.png'} ({time.perf_counter() - t0:.0f} s)")


def build_parser() -> argparse.ArgumentParser:
    from .benches import example_configs

    examples = example_configs()
    parser = argparse.ArgumentParser(
        prog="epmq",
        description="Merge fine-tuned experts and quantize the merged model without losing what they knew "
        "(RTN, GPTQ and E-PMQ: expert-guided post-merge quantization).",
        epilog=EXAMPLES + (f"\nthe configs/ named here (and configs/files/) are in {examples}\n" if examples else ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def common(p, out_default):
        where = out_default or ("the config's output.dir, relative to the config file; without one, "
                                "runs/<config name> in the current directory")
        p.add_argument("--out", default=out_default, help=f"output directory (default: {where})")
        p.add_argument("--fresh", action="store_true",
                       help="ignore earlier results in the output directory (they are kept aside: "
                            "results.before-<time>.json, checkpoints.before-<time>, table.before-<time>.md, ...)")
        p.add_argument("--quiet", action="store_true", help="no progress output")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")

    demo = sub.add_parser("demo", help="the embedded 8-task benchmark (runs anywhere, CPU is enough)",
                          description="Eight conflicting tasks built from scikit-learn's digits, a small CLIP-style "
                          "ViT pretrained as a shared base, eight experts with frozen heads, merged with Task "
                          "Arithmetic and TIES, then quantized with RTN, GPTQ and E-PMQ at 8, 4, 3 and 2 bits. "
                          "Trained models are cached, so a second run only quantizes.")
    common(demo, "runs/demo")
    demo.add_argument("--seed", type=int, default=0, help="seed of data splits and training (default 0)")
    demo.add_argument("--cache-dir", default=None,
                      help="trained-model cache, one subdirectory per configuration and seed "
                           "(default $EPMQ_CACHE_DIR/demo, else ~/.cache/epmq/demo)")
    demo.add_argument("--quick", action="store_true", help="one merge, one anchor: a smoke test")
    demo.set_defaults(func=_demo)

    run = sub.add_parser("run", help="a whole experiment from a YAML config",
                         description="Merge, quantize and evaluate as CONFIG.yaml says (see configs/ for examples).")
    run.add_argument("config", help="the experiment's YAML file")
    common(run, None)
    run.set_defaults(func=_run)

    def file_command(name, func, help, description, epilog, device_help):
        p = sub.add_parser(name, help=help, description=description, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("config", help=f"the {name} YAML file")
        p.add_argument("out", help=f"output directory (replaced atomically if epmq {name} wrote it before; "
                                   f"another command's output is refused)")
        p.add_argument("--device", default=None, help=f"{device_help}, e.g. cuda (default: CPU)")
        p.add_argument("--quiet", action="store_true", help="no progress output")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
        p.set_defaults(func=func)

    file_command("merge", _merge, "merge checkpoints (local or HF hub) into a checkpoint",
                 "Merge the checkpoints a YAML config names and write the merged model as "
                 "save_pretrained would (safetensors, config and tokenizer of the base).",
                 MERGE_CONFIG, "where the arithmetic runs")
    file_command("quantize", _quantize, "quantize a checkpoint with calibration texts, images or audio",
                 "Quantize the causal LM, encoder-decoder, vision tower or speech encoder a YAML config names "
                 "(RTN, GPTQ or E-PMQ with its experts) on the config's calibration texts, input/target pairs, "
                 "images or audio files (WAV; FLAC, OGG, MP3 with soundfile) and write a GPTQ checkpoint "
                 "with its tokenizer, image processor or feature extractor.",
                 QUANTIZE_CONFIG, "where the blocks are quantized, one at a time (the model stays in "
                 "CPU memory)")
    sub.choices["quantize"].add_argument(
        "--fresh", action="store_true",
        help="start over: discard the blocks an interrupted run left in OUT.resume (by default "
             "the same command goes on from the next block)")

    bench = sub.add_parser("bench", help="kernel benchmarks on a CUDA GPU (W4A16 matmul, GPTQ/E-PMQ solver)",
                           description="Time the W4A16 matmul against cuBLAS fp16 and the fused GPTQ/E-PMQ "
                                       "solver against the torch reference on this GPU; JSON and plots "
                                       "into --out (benchmarks/gpu_suite.sh runs these with the CUDA tests). The "
                                       "scripts live in the source checkout's benchmarks/: run it from a "
                                       "checkout installed with `pip install -e .`.")
    bench.add_argument("--out", default="benchmarks/results", help="output directory (default benchmarks/results)")
    bench.add_argument("--only", choices=["w4a16", "solver"], default=None, help="run one of the two benchmarks")
    bench.set_defaults(func=_bench)
    return parser


@contextlib.contextmanager
def epmq_warnings_said(command: str):
    """epmq's own warnings (its classes, ServingWarning; those its modules give) written as one
    line each, ``epmq quantize: warning: ServingWarning: ...``, as the mergekit notes are, not
    in Python's form (the path and line of epmq's source, then its ``warnings.warn(`` line, which
    tell a user of the command nothing); other libraries' keep theirs. Only the formatting is
    changed, and only while the command runs: the filters, -W error and a caller's recording
    stay as they were, and the library, imported, warns as any library does."""
    package = Path(__file__).resolve().parent
    python_form = warnings.formatwarning

    def is_epmq(category, filename) -> bool:
        if category.__module__.split(".")[0] == package.name:
            return True
        with contextlib.suppress(ValueError, OSError):
            return package in Path(filename).resolve().parents
        return False

    def formatted(message, category, filename, lineno, line=None):
        if not is_epmq(category, filename):
            return python_form(message, category, filename, lineno, line)
        kind = "" if category is UserWarning else f"{category.__name__}: "
        return f"epmq {command}: warning: {kind}{message}\n"

    warnings.formatwarning = formatted
    try:
        yield
    finally:
        warnings.formatwarning = python_form


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    # (stdout is in the locale's encoding, strict: cp1252 where Windows redirects it to a log, and
    # a path or task name in another script ended a finished command in UnicodeEncodeError; such
    # characters are escaped, as Python's stderr escapes them, the caller's stream restored after)
    console = sys.stdout if isinstance(sys.stdout, io.TextIOWrapper) and sys.stdout.errors == "strict" else None
    if console is not None:
        console.reconfigure(errors="backslashreplace")
    try:
        with loading_bars(not getattr(args, "quiet", False)), epmq_warnings_said(args.command):
            return args.func(args)  # (loading_bars: transformers' bars too)
    except CLIError as e:
        print(f"epmq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        then = ("run the same command again to resume" if args.command in ("demo", "run")
                else "nothing was written")
        if args.command == "quantize":  # (RTN keeps no blocks, nor a walk stopped before its first)
            from .quantize_files import resume_dir_for

            kept = resume_dir_for(Path(os.path.abspath(args.out))).is_dir()
            then = ("run the same command again to resume" if kept
                    else "nothing was kept to resume from: a rerun starts over")
        print(f"\nepmq {args.command}: interrupted; {then}", file=sys.stderr)
        return 130
    finally:
        if console is not None:
            console.reconfigure(errors="strict")


if __name__ == "__main__":
    sys.exit(main())
