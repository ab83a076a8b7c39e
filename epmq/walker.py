"""Quantize a whole (merged) model block by block: ``quantize_model``.

    import epmq
    merged = CLIPVisionModel(config)
    merged.load_state_dict(epmq.merge.task_arithmetic(base, experts, scale=0.3))
    epmq.quantize_model(
        merged, epmq.QuantSpec(bits=4, group_size=128), method="epmq",
        calibration={"cars": cars_batches, "dtd": dtd_batches},      # task -> model inputs
        experts={"cars": "ckpt/clip-cars", "dtd": "ckpt/clip-dtd"},  # task -> expert
    )
    merged.epmq_report.to_json("report.json")   # per layer: loss, expert/anchor terms, ...
    epmq.save_quantized(merged, "clip-epmq-w4")   # packed gptq format, atomically
    model = epmq.load_quantized("clip-epmq-w4", CLIPVisionModel(config))

The sequential scheme of GPTQ, for RTN, GPTQ and E-PMQ (EPMQ_MATH.md):

1. **Stack entry.** For each stack of blocks (``epmq.adapters``), run the model on every
   calibration sample with the stack's blocks replaced by stand-ins that record what each block
   is called with (the hidden states of the first; the keyword arguments of every one: masks,
   rotary embeddings, T5's encoder states) and stop the forward at the last block. Earlier
   stacks of the same family (T5's encoder, for its decoder) are replayed from their recorded
   outputs; a tower of another family (a VLM's vision tower, for its language model) runs its
   quantized blocks, since the next may read any of their outputs (its hidden states).
2. **Per block**, solve its linears in groups (below): forward hooks collect each linear's inputs
   on every task's samples into the layer statistics (``HessianStats`` for GPTQ, ``EPMQStats``
   task by task for E-PMQ), the layer is solved and replaced by a packed ``QuantLinear``.
3. Run the now-quantized block on every sample: its outputs are the next block's inputs. Where
   the stack entry saw the model change the hidden states between two blocks (DeBERTa-v2's
   convolution after its first layer, Qwen3-VL's DeepStack image features, CoCa's decoder,
   which calls a block of another list in between), the next block's inputs are instead taken
   from one pass of the model per sample, the stack's blocks stubbed and the quantized block's
   output handed on (``_replay_next``). An earlier stack of the family whose blocks the model
   calls among a later one's (CoCa's self- and cross-attention lists) runs its own, quantized,
   blocks when the later one is entered, as a tower of another family does.

Streams. The *q stream* is what the model being quantized sees (earlier blocks quantized).
``targets`` adds a *target stream* whose inputs define the targets (EPMQ_MATH.md "Variants"):

=============  ===========================================================================
merged_path    none: targets ``W_k x`` on the q stream's own inputs (E-PMQ's default).
fp_path        the full-precision merged model (a copy of each block taken before it is
               quantized): ``x_expert = x_anchor = x_fp``. GPTQ with fp_path is the
               expert-free control: ``EPMQStats`` with ``W_expert = W_m``, weight 1, anchor 0.
expert_path    each expert's own model on its own task's data: ``x_expert`` = expert k's
               input at this layer (its block built from its checkpoint, its embeddings and
               other non-block tensors swapped in at each stack entry). The anchor stays on
               the q stream (``W_m x``).
=============  ===========================================================================

**True sequential (default).** A block's linears are solved in groups, in the order the block
calls them; linears that receive the very same input tensor form one group (q/k/v; gate/up;
T5's cross-attention k/v, which read the encoder states). Each group's statistics are taken
with the earlier groups already quantized, as GPTQ's ``true_sequential`` does, at the cost of
one partial block forward per group (stopped as soon as the group's inputs are seen).
``true_sequential=False`` takes every linear's statistics from one pass of the unquantized block.
Linears that read the very same tensor have one Hessian: it is accumulated once (E-PMQ keeps
each linear's own expert residual ``G``) and factored once (``quant.FactorCache``), which is
what makes a Llama block's q/k/v and gate/up cost one Hessian each; results are unchanged.

**Experts** are read lazily (``epmq.experts``): the walk holds the tensors of one group of one
expert at a time (expert_path: one block of one expert, plus that expert's non-block tensors
while its stream enters a stack), never K models. On the merged and fp paths each expert
weight is read exactly once; on the expert path the first group's pass of each item runs the
expert's block to its end, keeping the later groups' target inputs
(``EXPERT_TARGET_INPUTS_KEPT_BYTES``), and each later group reads its own weights of the expert
again (groups must be the outer loop, and holding K expert blocks would cost K times the
memory); items past that budget run the block again for each group, each pass before the last
group's as far as it runs (``LAZY_EXPERT_BLOCKS``: a Llama block's MLP read twice, its down_proj
once); the block of a single expert is read once.
There, E-PMQ reads them ahead of the walk in a background thread (``epmq.read_ahead``; into
pinned memory for a GPU), in the order the block's groups will take them, up to
``EXPERT_READ_AHEAD_BYTES`` held at once: the file reads and the copies' staging overlap the
calibration forwards and the solves instead of stopping them. Results do not depend on it.

**Failure leaves the model as it was.** Replaced modules are logged and put back if anything
raises (bad expert, non-finite weights, Ctrl-C); the price is that the full-precision linears
stay alive until the walk ends. With ``resume_dir``, what was done is not lost either: each
finished block is written there, and the same call made again loads those blocks and goes on
from the next (``epmq.resume``; bit-identical to an uninterrupted walk).
"""

from __future__ import annotations

import ast
import bisect
import contextlib
import copy
import dataclasses
import enum
import functools
import hashlib
import inspect
import itertools
import json
import math
import os
import re
import signal
import sys
import textwrap
import threading
import time
import types
import warnings
import zlib
from contextlib import contextmanager, nullcontext
from functools import cached_property
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Union

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import quant
from ._util import rescale_outside_compilation, rescaled_divisors, wrapped_model, write_atomic
from .adapters import (Adapter, Part, Transposed, checkpoint_names, find_towers, named_blocks, prepare_towers,
                       remember, warn_other_towers)
from .adapters import _expression as adapter_expression
from .calibration import CACHE_KWARGS as _CACHE_KWARGS, bound_to_forward, position_limit, token_rows, unpad
from .checkpoint import bind_save_pretrained
from .checkpoint_io import hub_reference, ignored_on_load, key_renaming, loads_transposed
from .checks import all_finite, check_number, device_argument
from .experts import ExpertWeights, OnVocabulary, model_home, on_model_vocabulary, unshared
from .qlinear import QuantLinear, common_quant_config
from .read_ahead import ReadAhead
from .resume import BlockLog, config_of, data_digest, fingerprint, tensor_digest
from .spec import QuantSpec
from .stats import EPMQStats, HessianStats, stacks_of
from epmq_kernels._runtime import version
from epmq_kernels.expert_residual import DEFAULT_RESIDUAL_PRECISION, check_residual_precision
from epmq_kernels.grid import is_bits, is_flag

METHODS = ("epmq", "gptq", "rtn")
TARGETS = ("merged_path", "expert_path", "fp_path")
# Linears that read the very same tensor share one Hessian (accumulated and factored once). Off
# only to compare against (the results are the same) or for a block whose calls vary by input.
SHARE_INPUT_STATISTICS = True
# Bytes of experts' weights E-PMQ reads ahead of the walk (``epmq.read_ahead``), in pinned
# memory for a GPU: about eight 4096 x 14336 bf16 weights, a Llama-8B MLP group's for 4 tasks.
# 0 reads them in line. Results do not depend on it.
EXPERT_READ_AHEAD_BYTES = 1 << 30
# Bytes of the experts' tensors outside the blocks (embeddings, norms, DeBERTa-v2's convolution)
# kept between the target stream's passes of a stack whose model changes the hidden states
# between blocks (``_replay_next``: one pass a block and task, each of which read them all again).
# Tasks past it are read each pass. Results do not depend on it.
EXPERT_OUTSIDE_KEPT_BYTES = 1 << 30
# Bytes of a group's statistics held at once: a group past it (a MoE block's stage of experts,
# a Hessian each: Qwen3-235B's 128 gate/up projections of 4096 inputs held 35.4 GB with E-PMQ's
# three Hessians each, in float32) is solved in chunks of linears, each chunk's statistics taken (a partial
# pass over the block per item again) and solved before the next one's. Results do not depend on it.
EXPERT_STATISTICS_BYTES = 8 << 30
# The expert path's passes of a block before its last group read an expert's tensors module by
# module as the pass calls them (``_Walk._expert_block``), not the whole block. Off only to compare
# against (the results are the same).
LAZY_EXPERT_BLOCKS = True
# Bytes of the expert path's target inputs kept on the walk's device for a block's later groups:
# its first group's pass of each item runs the expert's block to its end, keeping every linear's
# input, and the later groups take them instead of running it again, each as far as its own
# linears (a Llama block's four groups: 1.8 passes an item, 1). An item whose inputs would cross it
# is not kept, nor any after it: they are run again for each group. Results do not depend on it.
EXPERT_TARGET_INPUTS_KEPT_BYTES = 1 << 30
# Bytes of hidden states AUTO's check of blocks handed a shared object (``_check_read_before_changed``) keeps
# on the device the model runs on, per item checked (each task's first, and each longer than those before it),
# until its last block ran: the input and output of each block handed one (Gemma 4's every layer, its keys and
# values shared: 62 layers of 2048 tokens 5376 wide in bf16 held 2.7 GB there for the check alone). Past it they
# are held on the CPU (pinned for a GPU), each moved back for its block's call again. Results do not depend on it.
READ_CHECK_KEPT_BYTES = 256 << 20


# --------------------------------------------------------------------------- report


@dataclass
class QuantReport:
    """What ``quantize_model`` did, one dict per quantized linear in ``layers``:

    name, block, method, targets, shape ``[out, in]``, bits, group_size, loss (the solver's
    ``tr((Q - W*) H (Q - W*)^T)``; RTN's, which has no H, ``||Q - W||_F^2``), expert_loss /
    anchor_loss / weight_anchor_loss (E-PMQ's three terms; None for RTN and for GPTQ on the
    merged path; GPTQ with fp-path targets reports its objective, ``sum_k ||Q X_k - W_m X~_k||^2``,
    as expert_loss, its anchor terms 0), damp, damp_retries, dead_columns, seconds (solver),
    n_tokens (calibration tokens seen); solved_on, only for a layer the GPU had no memory for
    ("cpu (out of GPU memory)"); hessian_of, only for a linear that read the same tensor as an
    earlier one: that linear's name (their Hessian was accumulated and factored once, for it).
    ``skipped``: linears the calibration never reached, or whose weight the blocks' code reads
    without a call (Mamba's dt_proj; by RTN too): left in full precision. ``unreached``:
    quantized linears whose calibration inputs were all zero or that no token was routed to (an
    MoE expert): rounded to nearest. ``resumed``: blocks loaded
    from ``resume_dir`` (done by an earlier, interrupted call) instead of solved. ``replayed``:
    stacks whose model changes the hidden states between their blocks, whose inputs were
    therefore taken from a pass of the model per block (slower; see the module docstring).
    ``tied``: linears tied to another (the same weight and bias parameters, as Zamba's shared
    attention block), each mapped to the linear whose packed layer it shares (solved on that
    first use's inputs). ``expert_read_seconds`` (E-PMQ): of ``seconds``, those the walk spent on
    the experts' tensors: reading them or waiting for the read-ahead (``EXPERT_READ_AHEAD_BYTES``),
    moving them to the device, checking their values (on a GPU the check's read back also waits
    for the work queued before it). ``routers``: the linears that route tokens to experts, left
    in full precision (``epmq.adapters.routers``). ``repeated``: blocks the model calls again
    after their stack's last block (weights shared across depth), each with its number of calls
    in one forward pass: the one block of a stack called in a row, each call on the previous one's
    output with the same other arguments (ALBERT's one layer, called once per layer of the
    model), is solved on the inputs of every call; others on their first call's (warned).
    """

    method: str
    targets: Optional[str]
    spec: dict
    adapter: str
    tasks: list
    anchor: Optional[float] = None
    weight_anchor: Optional[float] = None
    true_sequential: Optional[bool] = None
    layers: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    unreached: list = field(default_factory=list)
    resumed: list = field(default_factory=list)
    replayed: list = field(default_factory=list)
    tied: dict = field(default_factory=dict)
    routers: list = field(default_factory=list)
    repeated: dict = field(default_factory=dict)
    seconds: float = 0.0
    expert_read_seconds: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, path) -> None:
        # (written into the file it truncated, a value JSON cannot hold or a kill left it cut)
        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, indent=1)

        write_atomic(path, write)

    def __repr__(self):
        total = sum(layer["loss"] for layer in self.layers)
        return (
            f"QuantReport({self.method}, {self.targets}, {len(self.layers)} layers, "
            f"total loss {total:.4g}, {self.seconds:.1f} s)"
        )


# --------------------------------------------------------------------------- entry point


def quantize_model(
    model: nn.Module,
    spec: QuantSpec,
    *,
    method: str = "epmq",
    calibration: Optional[Mapping[str, Iterable]] = None,
    experts: Optional[Mapping[str, object]] = None,
    anchor: float = 1.0,
    weight_anchor: float = 0.0,
    targets: str = "merged_path",
    layers: Union[None, str, Callable[[str], bool]] = None,
    true_sequential: bool = True,
    percdamp: float = 0.01,
    blocksize: int = 128,
    backend: Optional[str] = None,
    residual_precision: str = DEFAULT_RESIDUAL_PRECISION,
    adapter: Optional[Adapter] = None,
    device: Union[None, str, torch.device] = None,
    resume_dir=None,
    progress: bool = True,
) -> nn.Module:
    """Replace the linears of ``model``'s blocks by packed ``QuantLinear``s, in place.

    calibration  task name -> iterable of model inputs; each item is passed positionally (a
                 tensor, or a tuple of them) or as keyword arguments (a dict). Not needed by RTN.
    experts      task name -> the task's expert: ``nn.Module``, state dict, checkpoint path
                 (HF ``save_pretrained`` directory, ``.safetensors`` file, open_clip checkpoint)
                 or HF hub id (``org/name``, downloaded once, read tensor by tensor).
                 Required by ``method="epmq"`` (same task names as ``calibration``); GPTQ and
                 RTN take none. Their tokenizers are compared with the one saved where
                 ``model.name_or_path`` points (from_pretrained's directory; a model built in
                 memory may be told it so), else with each other's.
    anchor, weight_anchor   E-PMQ's lam and mu, relative to the expert term (EPMQ_MATH.md).
    targets      "merged_path" | "fp_path" | "expert_path"; see the module docstring.
    layers       which linears (qualified names, e.g. ``"encoder.layers.0.mlp.fc1"``) to
                 quantize, among the adapter's rule (every ``nn.Linear`` inside a block): a
                 regular expression (``re.search``) or a predicate. Default: all of them.
    percdamp     GPTQ's damping: ``percdamp`` times the mean diagonal of H (over the columns any
                 input reached) added to H's diagonal before it is inverted (default 0.01).
    blocksize    columns solved per block of the GPTQ/E-PMQ solve (default 128); changes the
                 order of float operations only, not the mathematics.
    true_sequential   solve a block's linears in dependency groups (default) or in one pass.
    backend      solver kernels: None (Triton on CUDA, torch on CPU), "torch" or "triton".
    residual_precision   the least accurate product allowed for E-PMQ's expert residual on the
                 Triton backend: "bf16x3" (default: three bf16 products, the fastest of it,
                 tf32x3 and IEEE), "tf32x3" (IEEE fp32's accuracy class), "ieee" (fp32 FMA
                 only) or "tf32"; see ``epmq.EPMQStats``.
    adapter      which blocks to walk (``epmq.adapters``): None (default) walks every tower the
                 registered adapters know, in one pass (a VLM's vision tower and language model,
                 each calibrated on what the quantized towers before it give); an ``Adapter``, or a
                 list of them, walks only their blocks (e.g. ``epmq.adapters.HF_DECODERS``: a
                 VLM's language model alone, from text-only calibration).
    device       where the blocks are quantized (e.g. "cuda"), when the model is elsewhere (in CPU
                 memory, because it does not fit on the GPU): each block moves there for its turn
                 and back when it is done, quantized; the calibration's hidden states live
                 there, the model's other modules stay where they are. Default: the model's device.
    resume_dir   a directory where each block is written when it is done (GPTQ and E-PMQ). If
                 the walk is interrupted, the same call with the same ``resume_dir`` loads the
                 blocks done and goes on from the next; the result is bit-identical to an
                 uninterrupted walk. Other arguments, data or weights than those the directory
                 was written with raise ValueError. The directory is left in place at the end.
    progress     a tqdm bar over the blocks (default True).

    Returns ``model`` with ``model.epmq_report`` (this call's ``QuantReport``) and
    ``model.epmq_reports`` (every call's on this model, in order).
    """
    t0 = time.perf_counter()
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be an epmq.QuantSpec, got {type(spec).__name__}")
    if not isinstance(model, nn.Module):
        hint = (": a checkpoint on disk is quantized by epmq.quantize_checkpoint, or loaded first "
                "(transformers' from_pretrained)" if isinstance(model, (str, os.PathLike)) else "")
        raise TypeError(f"model must be a torch nn.Module (the model itself, not its state dict), "
                        f"got {type(model).__name__}{hint}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
    if method in ("gptq", "rtn") and experts is not None:
        raise ValueError(f"method={method!r} uses no experts: pass experts=None (or use method='epmq')")
    if method == "gptq" and targets == "expert_path":
        raise ValueError("targets='expert_path' needs experts: use method='epmq'")
    if method == "rtn" and resume_dir is not None:
        raise ValueError("resume_dir is for the GPTQ and E-PMQ walks (RTN takes seconds and no calibration)")
    if method == "epmq" and not experts:
        raise ValueError("method='epmq' needs experts: a mapping task name -> expert")
    if method != "rtn" and not calibration:
        raise ValueError(f"method={method!r} needs calibration data: a mapping task name -> inputs")
    for value, what in ((anchor, "anchor"), (weight_anchor, "weight_anchor"), (percdamp, "percdamp")):
        check_number(value, what, 0)
    # (numpy's numbers, a sweep's, held as Python's: the report and quantize_config.json are JSON)
    anchor, weight_anchor, percdamp = (v if isinstance(v, (int, float)) else float(v)
                                       for v in (anchor, weight_anchor, percdamp))
    if not is_bits(blocksize) or blocksize <= 0:  # (an integer as gptq_solve takes it: numpy's too)
        raise ValueError(f"blocksize must be a positive integer, got {blocksize!r}")
    blocksize = int(blocksize)
    # ('no' is truthy: it ran true sequential, silently, as the CLI refuses it; np.False_ ran, and
    # the report's JSON failed after the walk)
    if not is_flag(true_sequential):
        raise ValueError(f"true_sequential must be True or False, got {true_sequential!r}")
    true_sequential = bool(true_sequential)
    if method == "rtn":  # (the walks resolve it; RTN would ignore a misspelt one)
        quant.resolve_backend(backend, torch.device("cpu"))
    check_residual_precision(residual_precision, "residual_precision")
    device = device_argument(device)
    calibration = _calibration(calibration, model) if method != "rtn" else {}
    if method == "epmq":
        _check_tasks(calibration, experts)

    towers = find_towers(model, adapter)
    # (adapter= given too: Llama 4's vision encoder beside adapter=MOE_DECODERS, RN50's attention
    # pool beside adapter=OPEN_CLIP stayed in full precision without a word)
    warn_other_towers(model, towers, chosen=adapter is not None,
                      selected=None if layers is None else _selector(layers))
    adapter_names = "+".join(a.name for a, _ in towers)
    families = _families(model, towers, layers)
    if len(families) > 1 and method != "rtn" and targets != "merged_path":
        raise ValueError(
            f"targets={targets!r} across towers of different families ({'+'.join(families)}) is not "
            f"supported: a tower may read the inner outputs of the one before (a VLM's image "
            f"features), which the target stream does not replay; use targets='merged_path', or walk "
            f"one tower a call (adapter=), the later tower first: a call's target stream runs the towers "
            f"earlier calls quantized as they are"
        )
    routing = [a.name for a, stacks in towers if a.routes(stacks)]
    if routing and method != "rtn" and targets != "merged_path":
        raise ValueError(
            f"targets={targets!r} needs the target model to send each token through the same "
            f"layers as the model being quantized; {routing[0]} routes tokens to experts, and "
            f"the target's router may choose others: use targets='merged_path'"
        )
    edits = _Edits(model)
    sources, walk = {}, None
    packed_before = {id(m) for m in model.modules() if isinstance(m, QuantLinear)}
    modes = {m: m.training for m in model.modules()}
    try:
        # (under a caller's inference_mode too: the walk tracks in-place writes by version
        # counters, which inference tensors lack)
        with torch.inference_mode(False), torch.no_grad():
            renames = _prepare_walked(model, towers, layers, edits)
            # (after prepare, whose new modules, open_clip's attention projections, take the
            # modes of those they replace: restored with the rest at the end)
            modes = {m: m.training for m in model.modules()}
            model.eval()
            divisors = _rescale_for_inference(model)
            stacks, tied, routers = _plan(model, towers, layers)
            read = _take_weights_read(stacks)
            if method == "rtn":
                _warn_unread(stacks)
            _refuse_adapter_layers(stacks)
            if method != "rtn" and targets != "merged_path":
                _warn_quantized_elsewhere(model, targets, len(_families(model, stacks_of(model), every=True)) > 1)
            _check_finite(model, stacks)
            _warn_unquantized_matrices(stacks)
            report = QuantReport(
                method=method,
                targets=None if method == "rtn" else targets,
                spec=spec.to_dict(),
                adapter=adapter_names,
                tasks=list(calibration),
                anchor=anchor if method == "epmq" else None,
                weight_anchor=weight_anchor if method == "epmq" else None,
                true_sequential=None if method == "rtn" else true_sequential,
                routers=routers,
                skipped=read,
            )
            if method == "rtn":
                _rtn(stacks, spec, edits, report, progress, device, divisors)
            else:
                if method == "epmq":
                    if targets == "expert_path":  # (experts numbering the tokens otherwise: their row maps)
                        experts = on_model_vocabulary(model, experts)
                    sources = {task: ExpertWeights(experts[task], task=task) for task in calibration}
                    for task, source in sources.items():
                        if not _rescaled_for_inference(experts[task]):
                            source.divisors = divisors
                    _check_expert_configs(model, sources, experts, targets)
                walk = _Walk(
                    model, stacks, renames, spec, method, targets, calibration, sources,
                    edits, report, anchor=anchor, weight_anchor=weight_anchor,
                    true_sequential=true_sequential, percdamp=percdamp, blocksize=blocksize,
                    backend=backend, residual_precision=residual_precision, device=device,
                    resume_dir=resume_dir, divisors=divisors,
                )
                walk.run(progress)
            _share_tied(model, tied, edits, report)
    except BaseException:
        _to_the_end(edits.rollback)
        raise
    finally:
        def restore_modes():
            for module, training in modes.items():
                module.training = training
            edits.match_modes()
            edits.forget_output_capture()

        def close_ahead():
            _to_the_end(walk._ahead.close)  # (its read in flight done before the sources it reads are closed)
            if method == "epmq":
                report.expert_read_seconds = walk.expert_read_seconds

        # (each closed, last to first, whatever one closed before it raised: a Ctrl-C in the read-ahead's
        # close left the log's lock of resume_dir and the experts' files to the garbage collector)
        with contextlib.ExitStack() as closing:
            closing.callback(_to_the_end, restore_modes)
            for source in sources.values():
                closing.callback(source.close)
            if walk is not None:
                if walk.log is not None:
                    closing.callback(walk.log.close)
                closing.callback(close_ahead)
    report.seconds = time.perf_counter() - t0
    if report.unreached:  # one warning for the whole walk: an MoE model may have hundreds
        warnings.warn(
            f"{len(report.unreached)} linear(s) got no calibration signal (no token routed to them, "
            f"or only zero inputs), so nothing guided their quantization: rounded to nearest "
            f"(RTN's grid). First: {', '.join(report.unreached[:3])}; all in epmq_report.unreached"
        )
    if report.skipped:
        why = ("have their weight read without a call by the model's code (as Jamba's and Mamba's "
               "dt_proj: self.dt_proj.weight @ x), which a packed layer serves only by dequantizing its "
               "whole weight at each read"
               if method == "rtn" else
               "were never called on the calibration data's first items (from each task's first the walk "
               "learns a block's linears; a path it does not take, as cross-attention without encoder "
               "inputs, or a weight read without a call, as Jamba's dt_proj)")
        warnings.warn(
            f"{len(report.skipped)} linear(s) in the blocks {why}, so they stay in full precision. "
            f"First: {', '.join(report.skipped[:3])}; all in epmq_report.skipped"
        )
    remember(model, renames)
    # (a model quantized in several calls, a VLM's towers one by one, keeps every call's report)
    model.epmq_reports = [*getattr(model, "epmq_reports", ()), report]
    model.epmq_report = report
    call = dict(spec.to_dict(), method=method, targets=report.targets, adapter=adapter_names,
                true_sequential=bool(report.true_sequential))
    if method == "rtn":  # (what RTN did: no column order to keep)
        call["act_order"] = False
    packed = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for m in packed:
        if id(m) not in packed_before:
            m.quantized_with = dict(call)
    # (of every packed layer: an earlier call's too, whose fields are None where the calls differ)
    model.epmq_quant_config = common_quant_config(m.quantized_with or {} for m in packed)
    # (transformers' save_pretrained would write a checkpoint from_pretrained reads as unquantized)
    bind_save_pretrained(model)
    return model


def _to_the_end(step: Callable[[], None]) -> None:
    """``step`` run to its end, a Ctrl-C meanwhile held until it is and raised then: a second Ctrl-C while a
    stopped walk rolled back left the model half rolled back, some of its blocks quantized; run again from
    its start where a Ctrl-C stopped it, it ran for as long as they kept coming. Held by SIGINT's handler,
    in the main thread, the only one Ctrl-C interrupts; one handler Python did not set is left as it is."""
    held = []
    previous = signal.getsignal(signal.SIGINT)
    holding = previous is not None
    if holding:
        try:
            signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
        except ValueError:  # (not the main thread of the main interpreter: no Ctrl-C reaches it)
            holding = False
    try:
        step()
    finally:
        if holding:
            signal.signal(signal.SIGINT, previous)
            if held:  # (to the handler it was meant for: Python's raises KeyboardInterrupt)
                signal.raise_signal(signal.SIGINT)


# --------------------------------------------------------------------------- inputs


def _encoder_decoder(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _reads_labels(cls) -> bool:
    """Whether labels given to a model of class ``cls`` reach its decoder: T5Model's and BartModel's
    **kwargs drop them, T5Model's decoder then has no input, BartModel's reads the inputs shifted."""
    forward = getattr(cls, "forward", None)
    return forward is not None and "labels" in inspect.signature(forward).parameters


def _check_labels_read(model, item, where: str):
    """Refuses an ``item`` whose labels an encoder-decoder of transformers' drops (``_reads_labels``): its
    decoder would run on no input or on the inputs shifted, with nothing said."""
    transformers = sys.modules.get("transformers")  # (not imported: the model is none of its)
    if (isinstance(item, Mapping) and item.get("labels") is not None and _encoder_decoder(model)
            and transformers is not None and isinstance(model, transformers.PreTrainedModel)
            and not _reads_labels(type(model))):
        raise ValueError(f"{where}: {type(model).__name__}'s forward takes no labels, so its decoder would not "
                         f"read them: give decoder_input_ids (the labels shifted right, the decoder's start token "
                         f"first)")


def _calibration(calibration, model) -> dict:
    """Every task's items, padded batches split into batches without padding (``unpad``; a
    positional item that passes a mask taken as ``model``'s keyword arguments)."""
    model = wrapped_model(model)  # (the items still go to the wrapper: it calls this model with them)
    encoder_decoder = _encoder_decoder(model)
    transformers = sys.modules.get("transformers")  # (not imported: the model is none of its)
    hf_model = transformers is not None and isinstance(model, transformers.PreTrainedModel)
    if not isinstance(calibration, Mapping):
        raise TypeError("calibration must be a mapping task name -> iterable of model inputs")
    # (past them GPT-2's table fails as an IndexError naming nothing; a rotary or ALiBi model has no table: none)
    positions = position_limit(model.config.to_dict()) if hf_model else None
    out = {}
    for task, items in calibration.items():
        if isinstance(items, (torch.Tensor, Mapping, str)):
            raise TypeError(
                f"calibration[{task!r}] must be an iterable of model inputs (e.g. a list of batches), "
                f"got a single {type(items).__name__}"
            )
        out[task] = []
        for item in _read_items(items, task):
            try:
                parts = unpad(item, encoder_decoder=encoder_decoder, model=model)
            except ValueError as e:  # (unpad's alone: a generator's own ValueError goes on with _read_items' note)
                raise ValueError(f"calibration[{task!r}]: {e}") from None
            out[task] += [_counted(part) for part in parts]
        if not out[task]:
            raise ValueError(f"calibration[{task!r}] is empty")
        for n, item in enumerate(out[task]):
            # (a list: read by both checks below; an enumerate() left the second none of a tuple's)
            parts = list(item.items() if isinstance(item, Mapping) else enumerate(item)
                         if isinstance(item, (tuple, list)) else [("input", item)])
            empty = next((f"{name} {tuple(t.shape)}" for name, t in parts
                          if isinstance(t, torch.Tensor) and t.numel() == 0), None)
            if empty is not None:  # (a sequence of 0 tokens: the model fails deep inside, unnamed)
                raise ValueError(f"calibration[{task!r}] item {n}: {empty} is empty: nothing to calibrate on")
            _check_labels_read(model, item, f"calibration[{task!r}] item {n}")
            # (the walk calls the blocks without a cache: the tokens it holds would be missing from
            # their attention, the masks and positions made for them wrong, unnamed deep inside)
            # (a recurrent state, RWKV's, is a list of tensors whether it holds tokens or not)
            cache = next((name for name, value in parts if name in _CACHE_KWARGS and _holds_tokens(value)
                          and not (name == "state" and _recurrent_state(value))), None)
            if cache is not None:
                raise ValueError(f"calibration[{task!r}] item {n}: {cache} holds a generation cache of earlier "
                                 f"tokens, which calibration does not run with: give whole sequences")
            # (a model outside both may tokenize its texts in its forward: where it hands them on to its
            # blocks instead, _run_block refuses them)
            text = None if not (hf_model or _open_clip_model(model)) else next(
                (name for name, t in parts if isinstance(t, str) and (hf_model or name in (0, "input"))
                 or _texts(t)), None)
            if text is not None:  # (else 'embedding(): ... must be Tensor, not str', as the model's, or deeper)
                named = "the item" if text in (0, "input") else f"element {text}" if isinstance(text, int) else text
                raise ValueError(f"calibration[{task!r}] item {n}: {named} is text: tokenize it first "
                                 f"({_tokenize_hint(hf_model)})")
            flag = _flag_given_a_tensor(model, item)
            if flag is not None:  # (a batch of one label: bool() of it ran, a flag set by the label's value)
                raise ValueError(f"calibration[{task!r}] item {n}: {flag} is a flag, given a tensor"
                                 f"{_positional_hint(model, item)}")
            tokens = None if positions is None else next(
                ((name, length) for name, length in _sequence_lengths(parts, encoder_decoder)
                 if length > positions[0]), None)
            if tokens is not None:
                raise ValueError(f"calibration[{task!r}] item {n}: "
                                 f"{'the item' if tokens[0] in (0, 'input') else tokens[0]} holds {tokens[1]} "
                                 f"tokens, more than the model's {positions[0]} positions ({positions[1]} in its "
                                 f"config): cut it to at most {positions[0]} (text_windows' seq_len)")
            if hf_model:  # (one sequence's ids without their batch dimension: the blocks fail deep inside)
                flat = next((f"{'the item' if name in (0, 'input') else name} has shape {tuple(t.shape)}"
                             for name, t in parts if name in (0, "input", "input_ids", "decoder_input_ids")
                             and isinstance(t, torch.Tensor) and t.dim() == 1 and not t.is_floating_point()),
                            None)
                if flat is not None:
                    raise ValueError(f"calibration[{task!r}] item {n}: {flat}: token ids go as [batch, length] "
                                     f"(ids[None] for one sequence)")
    return out


def _sequence_lengths(parts, encoder_decoder: bool):
    """``(name, tokens)`` of each sequence of an item's ``parts`` that the model gives positions to: its ids or
    embeddings, and an encoder-decoder's decoder's (labels too, which it shifts into its decoder's ids)."""
    embeds = ("inputs_embeds", "decoder_inputs_embeds")
    ids = (0, "input", "input_ids", "decoder_input_ids") + (("labels",) if encoder_decoder else ())
    for name, t in parts:
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            if name in embeds:
                yield name, t.shape[-2]
            elif name in ids and not t.is_floating_point():
                yield name, t.shape[-1]


def _read_items(items, task):
    """``items`` one by one, an error raised in giving one (a generator's or dataset's own, which names no task)
    noted with the task and the item's place: it ended the walk as that error alone."""
    iterator = iter(items)
    for n in itertools.count():
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as e:
            e.add_note(f"(while reading calibration[{task!r}] item {n}, before any layer was quantized)")
            raise
        yield item


def _texts(value) -> bool:
    """Whether ``value`` is a batch of texts (a list or tuple of strings), which no block reads: a setting a
    forward takes as a string (a mode's name) is one string, left to the model outside HF's."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) for v in value)


def _open_clip_model(model) -> bool:
    return type(model).__module__.split(".")[0] == "open_clip"


def _tokenize_hint(hf_model: bool) -> str:
    """How texts become the token ids the forward of an HF model, else an open_clip one, takes (another
    model's forward may tokenize them itself: _calibration leaves its texts to it)."""
    if hf_model:
        return ("epmq.calibration.text_windows(texts, tokenizer) cuts texts into windows of token ids, or "
                "tokenizer(text, return_tensors='pt')")
    return "open_clip.get_tokenizer(model_name)(texts) gives its [batch, context_length] token ids"


def _counted(item):
    """``item`` with its inference tensors (made under ``torch.inference_mode``: a tokenizer's or
    image processor's output there, ``inputs_embeds``) copied into tensors with version counters,
    which the walk reads to see in-place writes; the item itself where it holds none."""
    if isinstance(item, torch.Tensor):
        if not item.is_inference():
            return item
        with torch.inference_mode(False):  # (a copy made in the mode would be one too)
            return item.clone()
    if isinstance(item, Mapping):
        counted = {k: _counted(v) for k, v in item.items()}
        return item if all(counted[k] is v for k, v in item.items()) else counted
    if isinstance(item, (tuple, list)) and not hasattr(item, "_fields"):
        counted = [_counted(v) for v in item]
        return item if all(a is b for a, b in zip(counted, item)) else type(item)(counted)
    return item


def _holds_tokens(cache) -> bool:
    """Whether a cache argument holds earlier tokens: a transformers ``Cache`` that has some (an empty
    one, or None, is what a first call gets), or a legacy one holding a token: the tuple of per-layer
    key and value tensors, or one layer's ``(key, value)`` (what GPT-J's, Bloom's and ChatGLM's models
    hand each block, which went unseen), its tensors keys and values of 3 dims or more ([batch, heads,
    tokens, head dim], Bloom's [batch x heads, ...]): ``_cache_shaped``."""
    if callable(getattr(cache, "get_seq_length", None)):
        return cache.get_seq_length() > 0
    return _cache_shaped(cache) and any(isinstance(t, torch.Tensor) and t.numel() for t in tree_flatten(cache)[0])


def _cache_shaped(value) -> bool:
    """Whether a list or tuple (however nested) holds tensors as a cache does, none of fewer than 3 dims:
    keys and values, a recurrent state (RWKV's [batch, hidden, layers], xLSTM's). One holding a tensor of
    fewer is the block's own input under a cache's name (a modulation's (scale, shift))."""
    return isinstance(value, (tuple, list)) and all(t.dim() >= 3 for t in tree_flatten(value)[0]
                                                    if isinstance(t, torch.Tensor))


def _config_of(module) -> Optional[dict]:
    """A module's config, as its checkpoint's config file says it (None: none is known): a transformers
    module's config.json; an open_clip model's open_clip_config.json and a timm model's config.json as
    far as the model says them (``_open_clip_model_cfg``, ``_timm_config``)."""
    if not isinstance(module, nn.Module):
        return None
    library = type(module).__module__.partition(".")[0]
    config = getattr(module, "config", None)
    # (open_clip's HF text tower holds its HF model's config: its own is its CLIP's text_cfg)
    if callable(getattr(config, "to_dict", None)) and library != "open_clip":
        return config.to_dict()
    if library == "open_clip":
        from .merge_checkpoint import OPEN_CLIP_BLOCKS, TOKENIZED_BY, _open_clip_config, _tower_config

        model_cfg = _open_clip_model_cfg(module)
        config = _open_clip_config({"model_cfg": model_cfg}) if model_cfg else None
        if config is not None and "quick_gelu" not in model_cfg:  # (not open_clip's default: unknown)
            config.pop("quick_gelu", None)
        # (how its blocks and projections were built, which the modules are not read for: unknown, not the defaults
        # filled in. Each other one adds weights, which the experts' tensors are held to. Its tokenizer, which
        # no module holds, unknown alike)
        for tower, tower_config in (config or {}).items():
            for field in (*OPEN_CLIP_BLOCKS, "no_ln_pre", "proj_type", "proj_bias", "timm_proj", "timm_proj_bias",
                          *TOKENIZED_BY, "context_length"):
                if isinstance(tower_config, dict) and field not in model_cfg.get(tower, {}):
                    tower_config.pop(field, None)
        if config is not None and not isinstance(getattr(module, "visual", None), nn.Module):
            # (a tower walked alone: its CLIP's vision_cfg or text_cfg, which an expert's
            # open_clip_config.json holds and _check_architectures compares as a tower of it)
            config = _tower_config(config, f"open_clip_{OPEN_CLIP_TOWERS[type(module).__name__]}")
        return config
    return _timm_config(module) if library == "timm" else None


# open_clip's towers, by class, and the model_cfg section that builds each (an image tower timm's: TimmModel;
# a text tower HF's: HFTextEncoder; CoCa's decoder: MultimodalTransformer)
OPEN_CLIP_TOWERS = {"VisionTransformer": "vision_cfg", "TimmModel": "vision_cfg", "TextTransformer": "text_cfg",
                    "HFTextEncoder": "text_cfg", "MultimodalTransformer": "multimodal_cfg"}


def _open_clip_model_cfg(model) -> dict:
    """The fields of an open_clip model's ``model_cfg`` that are compared, as its modules were built by
    them: QuickGELU or GELU (``quick_gelu``), the layers and heads of each tower that is open_clip's
    transformer (the image tower's heads as their ``head_width``; its attention pool's, the text tower's causal
    mask or none; their GELU's approximation and norms' epsilon), an image tower's that is timm's
    (``_open_clip_timm_cfg``), a text tower's that is HF's (``_open_clip_hf_cfg``), CoCa's decoder's
    (``multimodal_cfg``), an image tower's image and patch sizes, and whether the model holds a logit bias
    (``init_logit_bias``) and its text tower apart (``custom_text``); of a tower alone (``OPEN_CLIP_TOWERS``),
    its CLIP's vision_cfg, text_cfg or multimodal_cfg. {} where it is neither, or none of its towers is such
    (a ResNet)."""
    if isinstance(getattr(model, "visual", None), nn.Module):
        # (CLIP keeps its text tower's modules on itself, CustomTextCLIP and CoCa as .text)
        decoder = getattr(model, "text_decoder", None)  # (CoCa's)
        towers = (("vision_cfg", model.visual), ("text_cfg", getattr(model, "text", model)),
                  *([("multimodal_cfg", decoder)] if isinstance(decoder, nn.Module) else []))
    elif type(model).__name__ in OPEN_CLIP_TOWERS:
        towers = ((OPEN_CLIP_TOWERS[type(model).__name__], model),)
    else:
        return {}
    model_cfg, activations = {}, set()
    for scope, tower in towers:
        if scope == "vision_cfg" and type(tower).__name__ == "TimmModel":
            model_cfg.update({scope: timm_cfg} if (timm_cfg := _open_clip_timm_cfg(tower)) else {})
            continue
        if scope == "text_cfg" and type(tower).__name__ == "HFTextEncoder":
            model_cfg[scope] = _open_clip_hf_cfg(tower)
            continue
        # (CoCa's decoder is itself open_clip's Transformer, its blocks on it)
        transformer = getattr(tower, "transformer", tower)
        blocks = getattr(transformer, "resblocks", None)
        heads = getattr(getattr(blocks[0], "attn", None), "num_heads", None) if blocks else None
        if not isinstance(heads, int) or not isinstance(getattr(transformer, "width", None), int):
            continue
        model_cfg[scope] = {"layers": len(blocks), **({"head_width": transformer.width // heads}
                                                      if scope == "vision_cfg" else {"heads": heads})}
        if scope == "vision_cfg":  # (its patches' grid: _open_clip_grid)
            model_cfg[scope].update({k: list(getattr(tower, k)) for k in ("image_size", "patch_size")
                                     if isinstance(getattr(tower, k, None), tuple)})
        if scope != "multimodal_cfg":  # (open_clip builds its decoder without act_kwargs and norm_kwargs)
            gelu = next((m for m in blocks.modules() if isinstance(m, nn.GELU)), None)
            norm = next((m for m in blocks.modules() if isinstance(m, nn.LayerNorm)), None)
            if gelu is not None:
                model_cfg[scope]["act_kwargs"] = {"approximate": gelu.approximate}
            if norm is not None:
                model_cfg[scope]["norm_kwargs"] = {"eps": norm.eps}
        if scope == "text_cfg" and hasattr(tower, "attn_mask"):  # (no_causal_mask: built without one)
            model_cfg[scope]["no_causal_mask"] = tower.attn_mask is None
        if scope != "multimodal_cfg":
            model_cfg[scope].update(_open_clip_pool_of(tower))
        pool = getattr(tower, "attn_pool", None)  # (attentional_pool: CoCa's, whose tokens its decoder reads)
        if scope == "vision_cfg" and isinstance(getattr(pool, "attn", None), nn.MultiheadAttention):
            # (a string: "parallel" or "cascade", its two pools reading the tokens side by side or one after the other)
            model_cfg[scope].update(attentional_pool=getattr(tower, "attn_pool_type", "") or True,
                                    attn_pooler_heads=pool.attn.num_heads)
        elif scope == "vision_cfg" and hasattr(tower, "attn_pool"):
            model_cfg[scope]["attentional_pool"] = False
        activations |= {type(m).__name__ for m in blocks.modules() if type(m).__name__ in ("QuickGELU", "GELU")}
    if len(activations) == 1:
        model_cfg["quick_gelu"] = activations == {"QuickGELU"}
    if model_cfg and isinstance(getattr(model, "visual", None), nn.Module):  # (what _open_clip_config fills in)
        bias = getattr(model, "logit_bias", None)
        model_cfg.update(custom_text=isinstance(getattr(model, "text", None), nn.Module),
                         init_logit_bias=float(bias.flatten()[0]) if isinstance(bias, torch.Tensor) else None)
    return model_cfg


def _open_clip_pool_of(tower) -> dict:
    """The ``pool_type`` (and ``eos_id``, where it pools at the EOS; an image tower's LayerNorm before or
    after it, ``final_ln_after_pool``) by which an open_clip tower pools its tokens, as it runs: a CLIP's
    text tower (its modules on the CLIP) by its text_pool_type, a TextTransformer by the class token it
    appends (embed_cls, "last") or its pool_type, an image tower by its pool_type (which a string
    attentional_pool made "none"). {} where it says none."""
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", None))
    eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
    if getattr(tower, "cls_emb", None) is not None:
        pool = "last"
    if not isinstance(pool, str):
        return {}
    ln_after_pool = getattr(tower, "final_ln_after_pool", None)
    return {"pool_type": pool, **({"eos_id": eos_id} if pool == "eos" and eos_id is not None else {}),
            **({"final_ln_after_pool": ln_after_pool} if isinstance(ln_after_pool, bool) else {})}


def _open_clip_hf_cfg(tower) -> dict:
    """The text_cfg fields compared of an open_clip text tower that is HF's (``HFTextEncoder``), as it
    was built by them: the HF model (``hf_model_name``, as its config was read: ``name_or_path``), its
    pooler (``hf_pooler_type``, open_clip's name of its class) and projection (``hf_proj_type``: one
    linear, or two, an MLP; none where the features are the model's own); and the HF model's config
    itself (``hf_model_config``, a tower of it: a fine-tune of the HF model alone is compared with it)."""
    from open_clip.hf_model import _POOLERS

    config = getattr(tower, "config", None)
    hf_cfg = {"hf_model_name": getattr(config, "name_or_path", None),
              "hf_pooler_type": next((k for k, v in _POOLERS.items() if type(tower.pooler) is v), None),
              "hf_proj_type": {nn.Linear: "linear", nn.Sequential: "mlp"}.get(type(getattr(tower, "proj", None)))}
    return {**{k: v for k, v in hf_cfg.items() if isinstance(v, str) and v},
            **({"hf_model_config": config.to_dict()} if callable(getattr(config, "to_dict", None)) else {})}


def _open_clip_timm_cfg(tower) -> dict:
    """The vision_cfg fields compared of an open_clip image tower that is timm's (``TimmModel``), as it
    was built by them: the timm model (``timm_model_name``, its trunk's architecture) and how its
    features are pooled (``timm_pool``: an attention pool in its head, else its trunk's global_pool).
    {} where timm's create_model did not build its trunk (no architecture)."""
    timm_config = _timm_config(getattr(tower, "trunk", None))
    if timm_config is None:
        return {}
    attention_pools = {"AttentionPool2d": "abs_attn", "RotAttentionPool2d": "rot_attn"}
    pool = next((attention_pools[type(m).__name__] for m in tower.head.children()
                 if type(m).__name__ in attention_pools), timm_config.get("model_args", {}).get("global_pool"))
    return {"timm_model_name": timm_config["architecture"], **({"timm_pool": pool} if isinstance(pool, str) else {})}


def _timm_config(model) -> Optional[dict]:
    """A timm model's config.json as timm's ``save_for_hf`` writes it, as far as the model says it: its
    architecture (``pretrained_cfg``'s, which ``create_model`` sets) and the ``model_args`` it was
    created with (``timm.models.get_model_args``, the values JSON writes: a class given as act_layer is
    no name config.json would hold). None where ``create_model`` did not build it: no architecture."""
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    architecture = pretrained_cfg.get("architecture") if isinstance(pretrained_cfg, Mapping) else None
    if not isinstance(architecture, str):
        return None
    try:
        from timm.models import get_model_args
    except ImportError:  # (a timm before it: the architecture alone)
        return {"architecture": architecture}
    model_args = {k: v for k, v in get_model_args(model).items() if isinstance(v, (str, int, float, bool))}
    return {"architecture": architecture, "model_args": model_args}


def _check_expert_configs(model, sources, experts, targets: str = "merged_path") -> None:
    """Experts (checkpoints, or modules) whose config reads the same-shaped weights otherwise than
    the model's config (other heads, activation, layer count; another architecture) are refused, as
    ``epmq quantize`` and the merges refuse them: they were walked in silence as the model's. A model
    whose config is not known (a plain module, timm's built by its class) has its experts compared
    with the first of them that has one. Experts tokenized by their directories' own tokenizer files are
    refused where those differ (``_check_expert_tokenizers``); others numbering tokens otherwise than the model's
    tokenizer are warned of where no row map bridges them (``_warn_of_expert_numbering``)."""
    from .merge_checkpoint import _check_architectures, _check_trained_on, _config

    # task -> (its path, its config in place of the path's, its description, (its tokenizer's path, its base))
    found = {}
    for task, s in sources.items():
        given = experts[task].source if isinstance(experts[task], OnVocabulary) else experts[task]
        if s.reader.lora is not None:  # (W_0 + (alpha/r) B A on its base, whose config is the one to compare)
            lora = s.reader.lora
            if lora.base.path is not None:  # (read on another base than it names: of that one's architecture?)
                _check_trained_on(lora.directory, f"of task {task!r} ({s.description})", Path(lora.base.path),
                                  "base it is read on", experts=True)
            found[task] = (lora.base.path, None if lora.base.path else _config_of(lora._base_given), s.description,
                           (lora.directory, lora.base.path))  # (tokenized by the adapter's own files, else its base's)
        else:
            found[task] = (s.reader.path, _config_of(given), str(s.reader.path) if s.reader.path else s.description,
                           (s.reader.path, None))
    found = {task: f for task, f in found.items() if f[0] is not None or f[1] is not None}
    if not found:
        return
    tasks = list(found)
    configs = {t: found[t][1] if found[t][1] is not None else _config(found[t][0]) for t in tasks}
    reference, ref_name = _config_of(model), None
    if reference is None:
        first = next((t for t in tasks if configs[t]), None)
        if first is None:  # (state dicts, files without a config: nothing says how they read their weights)
            return
        reference, ref_name = configs[first], f"expert of task {first!r} ({found[first][2]})"
    _check_architectures(None, [found[t][0] for t in tasks], [f"of task {t!r} ({found[t][2]})" for t in tasks],
                         experts=True, reference=reference, configs=[found[t][1] for t in tasks], ref_name=ref_name)
    tokenized = {t: (found[t][3], configs[t], found[t][2]) for t in tasks}
    home = _model_home(model)
    _check_expert_tokenizers(tokenized, home)
    if targets != "expert_path":  # (there each expert runs through its row of each of the model's tokens)
        _warn_of_expert_numbering(model, tokenized, home)


def _model_home(model) -> Optional[Path]:
    """The local directory of the files ``model.name_or_path`` names (``experts.model_home``: from_pretrained's
    directory, or a hub id's snapshot in the local hub cache; a model built in memory, an open_clip one, may be
    given it), whose tokenizer files are the model's. A hub id the cache holds no snapshot of is warned of: its
    tokenizer is not fetched to compare with, and experts numbering its tokens otherwise went unsaid."""
    home = model_home(model)
    name = getattr(model, "name_or_path", None)
    if home is None and isinstance(name, str) and not Path(name).exists() and hub_reference(name) is not None:
        warnings.warn(f"the model's name_or_path {name!r} is an HF hub id the local hub cache holds no snapshot of: "
                      f"its tokenizer is not compared with the experts' (nothing is downloaded for a check; load the "
                      f"model from a directory holding its tokenizer, or fetch it: hf download {name})")
    return home


def _check_expert_tokenizers(found: dict, home: Optional[Path] = None) -> None:
    """Experts (``found``: task -> its checkpoint's path and base, its config, its description) tokenized by their
    directories' own files (open_clip's HF tokenizers: ``_reads_own_tokenizer``) whose files differ from those of
    the model's directory ``home`` (``_model_home``), refused in the merges' words: E-PMQ's targets are each
    expert's outputs on the model's calibration tokens, which an expert tokenizing its texts otherwise reads as
    other tokens. A model in memory keeps no tokenizer (no module of an open_clip model holds it): without a home
    holding tokenizer files, the experts are compared with the first of them, as a merge without a base compares
    its models; the model's tokens can be those of one of them at most."""
    from .merge_checkpoint import HF_TOKENIZER_FILES, _check_tokenizer_files, _reads_own_tokenizer, _tokenizer_home

    homes = {t: _tokenizer_home(path, base) for t, ((path, base), config, _) in found.items()
             if path is not None and _reads_own_tokenizer(config)}
    if homes and home is not None and any((home / name).is_file() for name in HF_TOKENIZER_FILES):
        reference, ref_name, others = home, f"model ({home})", list(homes)
    elif len(homes) >= 2:
        first, *others = homes
        reference, ref_name = homes[first], f"expert of task {first!r} ({found[first][2]})"
    else:
        return
    for task in others:
        _check_tokenizer_files(homes[task], reference, f"the expert of task {task!r} ({found[task][2]})", ref_name,
                               "E-PMQ's experts must be of the model's {}")


def _warn_of_expert_numbering(model, found: dict, home: Optional[Path]) -> None:
    """HF experts (``found`` as ``_check_expert_tokenizers`` takes it) whose tokenizers put other tokens, each held
    by both, under one row (``vocabulary.rows_apart``) than the model's tokenizer (saved in ``home``: ``_model_home``),
    else than the first of them: a merge laying the rows out by position (no tokenizer_source) mixed rows of
    other tokens, in silence here. Warned of, as the merges warn, not refused: merged_path and fp_path read no
    embeddings, and a merge laying them out by token (tokenizer_source) makes one row of experts numbering a
    token otherwise (ChatML's tokens added in another order); where the model's epmq_merge.json says it did,
    nothing is said."""
    from ._util import read_json_file
    from .checkpoint import MERGE_RECIPE_FILE
    from .merge_checkpoint import HF_TOKENIZER_FILES, _reads_own_tokenizer, _tokenizer_home
    from .vocabulary import load_tokenizer, rows_apart

    @functools.lru_cache(maxsize=None)  # (adapters on one base: its tokenizer loaded once)
    def vocabulary_at(directory):
        if directory is None or not any((directory / name).is_file() for name in HF_TOKENIZER_FILES):
            return None
        try:
            tokenizer = load_tokenizer(directory)
        except ValueError as e:  # (these targets read no embedding rows: a cut file leaves only this check undone)
            warnings.warn(f"{e}; its numbering of tokens is not compared with the other tokenizers")
            return None
        return None if tokenizer is None else tokenizer.get_vocab()

    recipe = home / MERGE_RECIPE_FILE if home is not None else None
    if recipe is not None and recipe.is_file() and "tokenizer_source" in (read_json_file(recipe) or {}):
        return
    theirs = {task: vocabulary for task, ((path, base), config, _) in found.items()
              if path is not None and not _reads_own_tokenizer(config)  # (open_clip's own files: refused apart)
              and (vocabulary := vocabulary_at(_tokenizer_home(path, base))) is not None}
    own = vocabulary_at(home) if theirs else None
    if own is not None:
        reference, ref_name = own, f"the model ({home})"
    elif theirs:
        first = next(iter(theirs))
        reference, ref_name = theirs.pop(first), f"the expert of task {first!r} ({found[first][2]})"
    for task, vocabulary in theirs.items():
        apart = rows_apart(reference, vocabulary)
        if apart:
            said = "; ".join(f"row {i}: {there!r} there, {here!r} here" for i, there, here in apart[:3])
            warnings.warn(f"the expert of task {task!r} ({found[task][2]}) numbers {len(apart)} tokens otherwise than "
                          f"{ref_name} ({said}): a merge laying their embedding rows out by position (without "
                          f"tokenizer_source) mixed rows of other tokens, and the merged model reads them so; one "
                          f"laying them out by token (tokenizer_source='union') did not")


def _check_tasks(calibration, experts):
    if not isinstance(experts, Mapping):
        raise TypeError("experts must be a mapping task name -> expert (module, state dict or path)")
    no_expert = [t for t in calibration if t not in experts]
    no_data = [t for t in experts if t not in calibration]
    # (both at once: a task's name spelled two ways, which one side alone does not show)
    said = ([f"tasks {no_expert} have calibration data but no expert"] * bool(no_expert)
            + [f"tasks {no_data} have an expert but no calibration data"] * bool(no_data))
    if said:
        raise ValueError("; ".join(said))


def _refuse_adapter_layers(stacks) -> None:
    """PEFT's LoRA (and IA3) layers hold the base linear and the adapter's matrices as
    separate linears: the walk would quantize them apart, and PEFT's merge afterwards would drop
    the update. Their one weight is the merged one (``merge_and_unload()``); ask for it where
    the walk would quantize such a layer (adapters on layers left out are left alone)."""
    for stack in stacks:
        for i, block in enumerate(stack.blocks):
            for rel in stack.chosen[i]:
                parts = rel.split(".")
                for k in range(len(parts)):
                    name = ".".join(parts[:k])
                    module = block.get_submodule(name)
                    if any(c.__name__ == "BaseTunerLayer" for c in type(module).__mro__):
                        raise ValueError(
                            f"{stack.names[i]}.{name} is a PEFT adapter layer ({type(module).__name__}): "
                            f"the model holds unmerged adapters, whose base and adapter matrices would be "
                            f"quantized apart; merge them first (model = model.merge_and_unload()), pass "
                            f"the adapter as an expert (epmq.LoraExpert), or leave the layer out (layers=)")


def _selector(layers) -> Callable[[str], bool]:
    if layers is None:
        return lambda name: True
    if isinstance(layers, (str, re.Pattern)):
        try:
            pattern = re.compile(layers)
        except re.error as e:
            raise ValueError(f"layers={layers!r} is not a regular expression: {e}") from None
        return lambda name: pattern.search(name) is not None
    if callable(layers):
        return layers
    raise TypeError(f"layers must be None, a regular expression or a predicate, got {type(layers).__name__}")


@dataclass
class _Stack:
    prefix: str
    blocks: nn.ModuleList
    chosen: list  # per block: names (inside the block) of the linears to quantize
    adapter: Adapter  # how its blocks are called
    # the model changes the hidden states between its blocks (found when the stack is entered):
    # each block's input is then taken from the model itself, not from the previous output
    replay: bool = False
    # keyword arguments a block is handed from the previous block's outputs (found where the stand-ins
    # run the blocks): {block index: {name: index in the previous block's output}}
    handoff: dict = field(default_factory=dict)
    # a stack of one block that the model calls this many times in a row, each call on the previous
    # one's output with the same other arguments (ALBERT's one layer): solved on every call's inputs
    loops: int = 1
    # a stack of several blocks the model runs this many times in a row as a group (ALBERT with
    # several layers a group): solved on the first round's inputs; what it hands the stacks after
    # it has been through every round of its quantized blocks (_more_rounds)
    rounds: int = 1
    layers: object = None  # the user's layers=, which the one a refusal of the blocks suggests keeps
    names: list = field(init=False)  # each block's qualified name (named_blocks)

    def __post_init__(self):
        self.names = [name for name, _ in named_blocks(self.prefix, self.blocks)]

    def left_out(self) -> str:
        """The ``layers=`` that selects what the user's does but these blocks' linears (``_leaving_out``)."""
        return _leaving_out(re.escape(self.prefix), self.layers)


def _following_name(block: str) -> Optional[str]:
    """The name a block after ``block`` would have: its number after the last one's (``layers.11``
    -> ``layers.12``, torchvision's ``encoder_layer_11`` -> ``encoder_layer_12``); None where the
    last block's name holds no number."""
    number = re.search(r"\d+$", block)
    return None if number is None else f"{block[:number.start()]}{int(number.group()) + 1}"


def _families(model, towers, layers=None, every: bool = False) -> list:
    """The families of ``towers`` for the target streams, which replay only a tower's final output:
    one per adapter, and AUTO's (an adapter that runs its blocks) in a language model that takes a
    tower's features at its image or audio tokens one per kind of stack (Mllama's vision encoders,
    its language model), as such a language model may read the tower's inner outputs (the streams
    went on with the tower's input in their place, silently, or ended in an IndexError). An
    encoder-decoder's decoder reads its encoder's last output (M2M-100's layers of two classes), and
    the towers of a dual encoder their own inputs (ChineseCLIP's). Stacks ``layers`` selects no
    linear of are not walked (a language model walked alone: the model runs its tower itself);
    ``every``: each stack counts, its linears quantized already or not (the model's families)."""
    config = getattr(model, "config", None)
    joined = not getattr(config, "is_encoder_decoder", False) and any(
        getattr(config, key, None) is not None
        for key in ("image_token_id", "image_token_index", "audio_token_id", "audio_token_index"))
    families = []
    select = _selector(layers)
    for adapter, stacks in towers:
        kinds = [sorted({type(b).__name__ for b in blocks}) for prefix, blocks in stacks
                 if every or any(select(f"{name}.{rel}") for name, b in named_blocks(prefix, blocks)
                                 for rel in adapter.linears(b))]
        # (a tower none of whose linears is selected is not walked, whatever its adapter: LLaVA's
        # vision tower beside its language model selected alone is run by the model itself)
        if kinds and not (adapter.runs_blocks and joined):
            kinds = [[]]
        families += [f"{adapter.name}: {'/'.join(kind)}" if kind else adapter.name
                     for kind in dict.fromkeys(tuple(kind) for kind in kinds)]
    # (open_clip's dual encoders run each tower on its own input, the image or the text, whatever their adapters:
    # its text tower beside timm's image tower, as ViT-*-SigLIP*, PE-Core-* and EVA02-* build them, reads nothing
    # of the other; CoCa's decoder reads the image tower's tokens)
    if len(families) > 1 and type(model).__name__ in ("CLIP", "CustomTextCLIP") and (
            type(model).__module__.partition(".")[0] == "open_clip"):
        families = ["+".join(families)]
    return families


def _one_family(earlier: _Stack, stack: _Stack, quantized: bool = True) -> bool:
    """Whether ``stack`` reads of ``earlier`` its final output alone (T5's decoder of its encoder),
    so that the walk may replay that output in place of running ``earlier``'s blocks. AUTO takes
    every family's stacks: a VLM's language model there reads its vision tower's inner hidden
    states (Mllama's intermediate layers, LLaVA's vision_feature_layer), which a replayer's blocks
    leave as their inputs, so on the ``quantized`` (q) stream stacks of other blocks than its own
    run, the model's own. A target stream's earlier stacks are its own path's (the full-precision
    or expert encoder of an M2M-100's decoder), which the model's blocks are not: replayed."""
    if earlier.adapter is not stack.adapter:
        return False
    return (not quantized or not stack.adapter.runs_blocks
            or {type(b) for b in earlier.blocks} == {type(b) for b in stack.blocks})


def _prepare_walked(model, towers, layers, edits) -> dict:
    """``prepare_towers`` of the towers ``layers`` selects a linear of, as prepared (a fused expert's
    linears have names only then); a tower it leaves out is put back as it was, its own layout, as
    ``load_quantized`` rebuilds only the towers holding quantized layers (an MoE language model beside
    a vision tower selected alone had its experts rebuilt, saved one linear per expert, and refused
    when loaded)."""
    select = _selector(layers)
    names = checkpoint_names(model)
    for adapter, stacks in towers:
        mark = len(edits.log)
        prepared = prepare_towers(model, [(adapter, stacks)], edits.swap)
        if any(select(f"{name}.{rel}") for prefix, blocks in stacks for name, block in named_blocks(prefix, blocks)
               for rel in adapter.linears(block) if rel not in adapter.routers(block)):
            names.update(prepared)
        else:
            edits.undo(mark, [block for _, blocks in stacks for block in blocks])
    return names


def _rescale_for_inference(model) -> dict:
    """RWKV (transformers' ``RwkvModel``, ``rescale_every`` > 0) divides block i's
    ``attention.output`` and ``feed_forward.value`` weights by ``2 ** (i // rescale_every)`` in place
    on its first forward in eval mode (its hidden states are halved to match), so that fp16 does
    not overflow. A packed layer's weight took no writes: RTN packed the undivided weights and the
    division was dropped (logits 40% off), and a GPTQ walk packed the divided ones only because its
    calibration ran the model first. The division is done here, before anything is packed, so the
    codes are always of the weights the model runs in eval mode (the layers hold the undivided
    weights' scales, the division as their ``weight_multiplier``: ``_quant_linear``), and
    ``layers_are_rescaled`` says so (``save_quantized`` writes them multiplied back, as RWKV's
    checkpoints hold them). Returns
    ``{tensor name: divisor}`` of every weight so divided: an expert's tensors are read undivided."""
    for module in model.modules():
        every = getattr(getattr(module, "config", None), "rescale_every", 0)
        if (hasattr(module, "layers_are_rescaled") and hasattr(module, "_rescale_layers")
                and isinstance(every, int) and every > 0):
            module._rescale_layers()  # (in eval mode: divides once, a model already run divided already)
    rescale_outside_compilation(model)
    return rescaled_divisors(model)


def _rescaled_for_inference(expert) -> bool:
    """An expert given as a module that has run in eval mode holds its weights divided already
    (``_rescale_for_inference``)."""
    expert = expert.source if isinstance(expert, OnVocabulary) else expert
    return isinstance(expert, nn.Module) and any(getattr(m, "layers_are_rescaled", False) is True
                                                 for m in expert.modules())


def _plan(model, towers, layers) -> tuple:
    """The stacks to walk, in the order their modules are registered (the walk takes them in the
    order the forward reaches them: ``_Walk._in_forward_order``); and the tied linears, ``{name: the name of the linear whose weight and
    bias it holds}``, left out of the stacks (``_share_tied``); and the routers
    (``Adapter.routers``), left out too."""
    select = _selector(layers)
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    stacks, routers = [], []
    for adapter, tower in towers:
        for prefix, blocks in tower:
            chosen = []
            for name, block in named_blocks(prefix, blocks):
                routing = adapter.routers(block)
                routers += [f"{name}.{rel}" for rel in routing]
                chosen.append([rel for rel in adapter.linears(block)
                               if rel not in routing and select(f"{name}.{rel}")])
            if any(chosen):
                stacks.append(_Stack(prefix, blocks, chosen, adapter, layers=layers))
    stacks.sort(key=lambda stack: position[stack.prefix])
    owner, first_use, tied = {}, {}, {}  # a linear's first name; by its weight and bias; the ties
    for stack in stacks:
        for i, block in enumerate(stack.blocks):
            keep = []
            for rel in stack.chosen[i]:
                linear, name = block.get_submodule(rel), f"{stack.names[i]}.{rel}"
                first = owner.setdefault(id(linear), name)
                if first != name:
                    raise ValueError(
                        f"{name} is the same module as {first} (weight sharing across blocks, as in "
                        f"ALBERT): the walk quantizes each block's linears from that block's inputs; "
                        f"untie the blocks (copy.deepcopy each) or exclude one with layers=")
                # (id(None) for every bias-free one)
                first = first_use.setdefault((id(linear.weight), id(linear.bias)), name)
                if first == name:
                    keep.append(rel)
                else:
                    tied[name] = first
            stack.chosen[i] = keep
    if not stacks:
        done = any(isinstance(m, QuantLinear) for m in model.modules())
        # (a predicate's repr, '<function <lambda> at 0x...>', said neither what it was asked of nor where)
        asked = [f"{name}.{rel}" for adapter, tower in towers for prefix, blocks in tower
                 for name, block in named_blocks(prefix, blocks) for rel in adapter.linears(block)
                 if rel not in adapter.routers(block)]
        prefixes = ", ".join(dict.fromkeys(prefix for _, tower in towers for prefix, _ in tower)) or "none"
        if layers is None or not asked:
            why = f"the blocks at {prefixes} hold no linear to quantize"
        else:
            name = getattr(layers, "__qualname__", "")
            what = (f"layers={getattr(layers, 'pattern', layers)!r} matches" if isinstance(layers, (str, re.Pattern))
                    else f"the layers= predicate{'' if '<lambda>' in name or not name else ' ' + name} selects")
            why = f"{what} none of the {len(asked)} linears of the blocks at {prefixes} (e.g. {asked[0]})"
        raise ValueError(f"no layer of {type(model).__name__} is selected for quantization: {why}"
                         + ("; its blocks' linears are already quantized (QuantLinear)" if done else ""))
    return stacks, tied, routers


# what a tensor's attributes say of it without its values: the packed layer's weight
# (QuantLinear.weight, a PackedWeight) answers these without dequantizing, as T5 reads wo.weight.dtype
_TENSOR_METADATA = frozenset({"dtype", "device", "shape", "ndim", "layout", "is_meta", "is_cuda", "requires_grad",
                              "size", "dim", "numel", "nelement", "element_size", "is_floating_point"})
# calls that ask what an object is, not what it holds (T5: isinstance(self.wo.weight, torch.Tensor))
_INSPECTING = frozenset({"isinstance", "hasattr", "getattr", "type", "callable", "id"})
# the calls a branch's condition may make to be decided from the module's own settings
_DECIDING = {"isinstance": isinstance, "hasattr": hasattr, "getattr": getattr, "len": len, "callable": callable}
# methods that build or initialize a module, not what its forward computes
_SETUP_METHODS = frozenset({"__init__", "reset_parameters", "_init_weights", "init_weights"})
_UNDECIDED = object()
_CLASS_TREES: dict = {}
_CLASS_UNREAD: dict = {}  # class -> the classes of its bases whose source is not found


def _class_trees(cls) -> list:
    """``(parsed source, the globals it was written in)`` of ``cls`` and its bases that have a
    source (not nn.Module's), parsed once a class."""
    trees = _CLASS_TREES.get(cls)
    if trees is None:
        trees, unread = [], []
        for klass in cls.__mro__:
            if klass in (nn.Module, object):
                continue
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
            except Exception:  # (no file, a class made at run time, a source inspect cannot place)
                unread.append(klass)
                continue
            trees.append((tree, vars(sys.modules[klass.__module__]) if klass.__module__ in sys.modules else {}))
        _CLASS_TREES[cls], _CLASS_UNREAD[cls] = trees, unread
    return trees


def _warn_unread(stacks) -> None:
    """RTN leaves a linear whose weight the code reads without a call in full precision
    (``_take_weights_read``), which it finds in the classes' source: say which classes holding the
    linears it packs have none (one defined in a notebook, whose ``__main__`` has no file, or by
    exec), whose reads it cannot see."""
    unread = {}
    for stack in stacks:
        for i, block in enumerate(stack.blocks):
            for rel in stack.chosen[i]:
                parts = rel.split(".")
                for k in range(len(parts)):
                    cls = type(block.get_submodule(".".join(parts[:k])))
                    _class_trees(cls)
                    unread.update(dict.fromkeys(_CLASS_UNREAD[cls]))
    if unread:
        names = [klass.__qualname__ for klass in unread]
        warnings.warn(
            f"RTN cannot read the code of {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} (no source "
            f"file: a class defined in a notebook or by exec), so it cannot see whether it uses a linear's "
            f"weight without calling the layer (as Mamba's mixers use dt_proj's), which a packed layer serves "
            f"only by dequantizing its whole weight at each read; their linears are packed. Where the code does, "
            f"quantize with method='gptq' (its "
            f"walk leaves a linear it never sees called in full precision), or keep the linear out with layers="
        )


def _self_path(node, roots=None) -> Optional[tuple]:
    """``("mamba", "dt_proj")`` of ``self.mamba.dt_proj``; None for any other expression. ``roots``
    maps names to the paths they stand for (a helper's parameter ``layer`` handed ``self.dt_proj``:
    ``layer.weight``'s is ``("dt_proj", "weight")``)."""
    roots = {"self": ()} if roots is None else roots
    path = []
    while isinstance(node, ast.Attribute):
        path.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in roots and (path or roots[node.id]):
        return roots[node.id] + tuple(reversed(path))
    return None


_HELPER_TREES: dict = {}


def _helper_tree(function) -> Optional[ast.AST]:
    """The parsed source of a function the blocks' code calls (None where it has none), once a function."""
    if function not in _HELPER_TREES:
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
            _HELPER_TREES[function] = tree if isinstance(tree, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
        except Exception:  # (a builtin, a source inspect cannot place)
            _HELPER_TREES[function] = None
    return _HELPER_TREES[function]


class _WeightReads(ast.NodeVisitor):
    """The attribute paths ``p`` of ``self.<p>.weight`` that the code of ``module``'s class uses as
    values (``paths``), and those of the modules it calls (``self.<p>(...)``: ``called``), on the
    paths its own settings take: a branch whose condition they decide
    (``if self.pretraining_tp > 1 and self.slow_but_exact``, BLOOM's; ``if self.training and ...``,
    the fused training kernels' of Mamba-family mixers, the module in eval mode;
    ``if hasattr(self.config, "_is_quantized")``, Jamba's) is followed the way they decide it, one
    that depends on the inputs both ways. A function the code hands a module to (``f(self.dt_proj, x)``,
    ``self._mix(h, layer=self.gate)``) is read too, its parameters standing for what they were handed,
    as ``x @ layer.weight.T`` there reads the weight as surely as in the class."""

    def __init__(self, module, scope, roots=None, followed=None):
        self.module, self.scope, self.paths, self.called = module, scope, set(), set()
        self.roots = {"self": ()} if roots is None else roots
        self.followed = set() if followed is None else followed  # (helpers read, with what they were handed)
        self.defs, self.inside = {}, False  # (the functions defined in the function read, by name)

    def path(self, node):
        """``_self_path``'s, and a module named otherwise where the module's settings decide which:
        ``getattr(self, "dt_proj")``, ``self._modules["dt_proj"]``, ``self.gates[-1]`` (a ModuleList's,
        a Sequential's or a ModuleDict's item)."""
        path = self._path(node)
        return path or None  # (not self itself)

    def _path(self, node) -> Optional[tuple]:
        if isinstance(node, ast.Name):
            return self.roots.get(node.id)
        if isinstance(node, ast.Attribute):
            owner = self._path(node.value)
            return None if owner is None else owner + (node.attr,)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                and node.func.id not in self.scope and len(node.args) == 2 and not node.keywords):
            owner, name = self._path(node.args[0]), self.value(node.args[1])
            return owner + (name,) if owner is not None and isinstance(name, str) else None
        if isinstance(node, ast.Subscript):
            owner, key = self._path(node.value), self.value(node.slice)
            if owner is None:
                return None
            if owner[-1:] == ("_modules",):
                return owner[:-1] + (key,) if isinstance(key, str) else None
            held = self.value(node.value)
            if isinstance(held, nn.ModuleDict) and isinstance(key, str) and key in held:
                return owner + (key,)
            if (isinstance(held, (nn.ModuleList, nn.Sequential)) and isinstance(key, int)
                    and not isinstance(key, bool) and -len(held) <= key < len(held)):
                return owner + (list(held._modules)[key],)
        return None

    def every_path(self, node) -> list:
        """``[path(node)]``, or where ``node`` is an item of a list of modules by an index the inputs
        decide (``self.dt_projs[i]``), every item's: the code may take any of them."""
        path = self.path(node)
        if path is not None:
            return [path]
        if isinstance(node, ast.Subscript) and not isinstance(node.slice, ast.Slice):
            owner, held = self.path(node.value), self.value(node.value)
            if owner is not None and isinstance(held, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
                return [owner + (name,) for name in held._modules]
        return []

    def value(self, node):
        """``node``'s value where the module's attributes and constants decide it, else _UNDECIDED."""
        try:
            if isinstance(node, ast.Constant):
                return node.value
            if isinstance(node, ast.Name):
                if node.id in self.roots:
                    return functools.reduce(getattr, self.roots[node.id], self.module)
                return self.scope.get(node.id, _UNDECIDED)
            if isinstance(node, ast.Attribute):
                owner = self.value(node.value)
                return _UNDECIDED if owner is _UNDECIDED else getattr(owner, node.attr)
            if isinstance(node, ast.Subscript):  # (self._modules["dt"], self.gates[0])
                path = self.path(node)
                return _UNDECIDED if path is None else functools.reduce(getattr, path, self.module)
            if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
                truth = self.truth(node.operand)
                return _UNDECIDED if truth is None else not truth
            if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):  # (self.gates[-1])
                operand = self.value(node.operand)
                return operand if operand is _UNDECIDED else -operand
            if isinstance(node, ast.BoolOp):
                truths = [self.truth(v) for v in node.values]
                settles = isinstance(node.op, ast.Or)  # (what one operand settles the whole to)
                return settles if settles in truths else (not settles if None not in truths else _UNDECIDED)
            if isinstance(node, ast.Compare):
                left = self.value(node.left)
                for op, right in zip(node.ops, map(self.value, node.comparators)):
                    if left is _UNDECIDED or right is _UNDECIDED:
                        return _UNDECIDED
                    holds = _COMPARISONS[type(op)](left, right)
                    if not isinstance(holds, bool):  # (a tensor's elementwise comparison)
                        return _UNDECIDED
                    if not holds:
                        return False
                    left = right
                return True
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _DECIDING
                    and node.func.id not in self.scope and not node.keywords):
                args = [self.value(a) for a in node.args]
                return _UNDECIDED if _UNDECIDED in args else _DECIDING[node.func.id](*args)
        except Exception:  # (an attribute it lacks, a comparison of other types: not decided)
            return _UNDECIDED
        return _UNDECIDED

    def truth(self, node):
        value = self.value(node)
        if value is _UNDECIDED or isinstance(value, torch.Tensor):
            return None
        try:
            return bool(value)
        except Exception:
            return None

    def visit_FunctionDef(self, node):
        # (nor a method the module's own attribute stands in for: WavLM's attention made to call
        # its projections, epmq.adapters.attention.call_projections)
        if self.inside:
            self.defs[node.name] = node
        if node.name not in _SETUP_METHODS and node.name not in vars(self.module):
            roots, defs, inside = self.roots, self.defs, self.inside
            self.roots, self.defs, self.inside = dict(roots), dict(defs), True  # (the names it binds are its own)
            self.generic_visit(node)
            self.roots, self.defs, self.inside = roots, defs, inside

    visit_AsyncFunctionDef = visit_FunctionDef

    def bind(self, target, value) -> None:
        """A local name bound to a module (``dt = self.dt_proj``) stands for it; rebound, no more."""
        if isinstance(target, ast.Name):
            path = self.path(value) if isinstance(value, (ast.Attribute, ast.Subscript, ast.Call)) else (
                self.roots.get(value.id) if isinstance(value, ast.Name) else None)
            if path is not None and isinstance(self.value(value), nn.Module):
                self.roots[target.id] = path
            else:
                self.roots.pop(target.id, None)
        elif (isinstance(target, (ast.Tuple, ast.List)) and isinstance(value, (ast.Tuple, ast.List))
              and len(target.elts) == len(value.elts)):
            for t, v in zip(target.elts, value.elts):
                self.bind(t, v)
        else:
            for name in ast.walk(target):
                if isinstance(name, ast.Name):
                    self.roots.pop(name.id, None)

    def visit_Assign(self, node):
        self.generic_visit(node)
        for target in node.targets:
            self.bind(target, node.value)
            if isinstance(target, ast.Name) and self.inside:
                # (a lambda bound to a name is read where it is called, as a function defined there)
                lam = node.value
                if isinstance(lam, ast.Lambda):
                    self.defs[target.id] = ast.FunctionDef(name=target.id, args=lam.args, body=[ast.Return(lam.body)],
                                                           decorator_list=[], returns=None, type_params=[])
                else:
                    self.defs.pop(target.id, None)

    def items(self, node) -> Optional[list]:
        """What a loop over ``node`` binds its target to, where the module's settings say: the
        modules of a tuple or list of them, of a ModuleList or Sequential, of ``.children()`` or a
        ModuleDict's ``.values()``, ``(name, module)`` of ``.items()`` and ``.named_children()``,
        ``(i, module)`` of ``enumerate`` over any of these; None for anything else."""
        if isinstance(node, (ast.Tuple, ast.List)):
            return list(node.elts)
        if isinstance(node, ast.Call) and not node.keywords:
            f = node.func
            if isinstance(f, ast.Name) and f.id not in self.scope and len(node.args) == 1:
                inner = self.items(node.args[0]) if f.id in ("enumerate", "reversed", "list", "tuple", "iter") else None
                if f.id == "enumerate" and inner is not None:
                    return [ast.Tuple(elts=[ast.Constant(i), item], ctx=ast.Load()) for i, item in enumerate(inner)]
                return None if inner is None else inner[::-1] if f.id == "reversed" else inner
            held = self.value(f.value) if isinstance(f, ast.Attribute) and not node.args else None
            if isinstance(held, nn.Module) and self._path(f.value) is not None and (
                    f.attr in ("children", "named_children")
                    or isinstance(held, nn.ModuleDict) and f.attr in ("values", "items")):
                names = [name for name, module in held._modules.items() if module is not None]
                items = [ast.Attribute(value=f.value, attr=name, ctx=ast.Load()) for name in names]
                if f.attr in ("items", "named_children"):
                    items = [ast.Tuple(elts=[ast.Constant(n), item], ctx=ast.Load()) for n, item in zip(names, items)]
                return items
            return None
        held = self.value(node)
        if isinstance(held, (nn.ModuleList, nn.Sequential)) and self.path(node) is not None:
            return [ast.Attribute(value=node, attr=name, ctx=ast.Load()) for name in held._modules]
        return None

    def visit_For(self, node):
        """A loop over modules (``for layer in (self.q, self.k)``, over a ModuleList) is read once
        for each, its name standing for it."""
        self.visit(node.iter)
        for item in self.items(node.iter) or [ast.Constant(None)]:  # (over anything else: no module known)
            self.bind(node.target, item)
            for statement in node.body:
                self.visit(statement)
        for statement in node.orelse:
            self.visit(statement)

    def visit_ListComp(self, node):
        """A comprehension over modules (``torch.stack([e.weight for e in self.experts])``) is read
        as a loop: once for each, its name standing for it (in the comprehension alone)."""
        roots = dict(self.roots)
        self._comprehend(node, node.generators)
        self.roots = roots

    visit_SetComp = visit_GeneratorExp = visit_DictComp = visit_ListComp

    def _comprehend(self, node, generators) -> None:
        if not generators:
            for part in (node.key, node.value) if isinstance(node, ast.DictComp) else (node.elt,):
                self.visit(part)
            return
        self.visit(generators[0].iter)
        for item in self.items(generators[0].iter) or [ast.Constant(None)]:
            self.bind(generators[0].target, item)
            for condition in generators[0].ifs:
                self.visit(condition)
            self._comprehend(node, generators[1:])

    def visit_If(self, node):
        self.visit(node.test)
        truth = self.truth(node.test)
        for statement in (node.body if truth is not False else []) + (node.orelse if truth is not True else []):
            self.visit(statement)

    def visit_IfExp(self, node):
        self.visit(node.test)
        truth = self.truth(node.test)
        for branch in ([node.body] if truth is not False else []) + ([node.orelse] if truth is not True else []):
            self.visit(branch)

    def follow(self, node):
        """Read the helper ``node`` calls where it is handed a module (``self.<p>``, or ``self``): a
        function of the code's globals, a method, or one defined in the function that calls it."""
        handed = list(node.args)
        keywords = {k.arg: k.value for k in node.keywords if k.arg is not None}
        local = self.defs.get(node.func.id) if isinstance(node.func, ast.Name) else None
        if local is not None:  # (its closure sees the names around it, but those its parameters take)
            params = [a.arg for a in (*local.args.posonlyargs, *local.args.args)]
            if any(isinstance(arg, ast.Starred) for arg in handed) or len(handed) > len(params):
                return
            bound = {**dict(zip(params, handed)), **keywords}
            own = {a.arg for a in ast.walk(local.args) if isinstance(a, ast.arg)}
            tree, scope, which = local, self.scope, id(local)
            around = {k: v for k, v in self.roots.items() if k not in own}
        else:
            function = self.value(node.func)
            if inspect.ismethod(function):  # (self.<method>(...): its first parameter is what it is bound to)
                owner = node.func.value if isinstance(node.func, ast.Attribute) else None
                handed.insert(0, owner)
                function = function.__func__
            if not inspect.isfunction(function) or any(isinstance(arg, ast.Starred) for arg in handed):
                return
            try:
                bound = inspect.signature(function).bind_partial(*handed, **keywords).arguments
            except (TypeError, ValueError):
                return
            tree, scope, which, around = _helper_tree(function), function.__globals__, function, {}
        roots = {}
        for name, arg in bound.items():
            path = self.path(arg) if isinstance(arg, ast.AST) else None
            if path is not None or (isinstance(arg, ast.Name) and arg.id in self.roots):
                path = self.roots[arg.id] if path is None else path
                if isinstance(self.value(arg), nn.Module):
                    roots[name] = path
        key = (which, tuple(sorted(roots.items())))
        if not roots or key in self.followed or len(self.followed) > 64:
            return
        self.followed.add(key)
        if tree is not None:
            helper = _WeightReads(self.module, scope, {**around, **roots}, self.followed)
            if local is not None:
                helper.defs, helper.inside = dict(self.defs), True
            for statement in tree.body:
                helper.visit(statement)
            self.paths |= helper.paths
            self.called |= helper.called

    def weight_of(self, node):
        """``X`` of ``X.weight`` and of ``getattr(X, "weight")`` (with a default or not), else None."""
        if isinstance(node, ast.Attribute) and node.attr == "weight":
            return node.value
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                and node.func.id not in self.scope and len(node.args) in (2, 3) and not node.keywords
                and self.value(node.args[1]) == "weight"):
            return node.args[0]
        return None

    def visit_Call(self, node):
        self.follow(node)
        for called in self.every_path(node.func):
            self.called.add(called[:-1] if called[-1] == "forward" else called)
        owner = self.weight_of(node)
        if owner is not None:  # (getattr(self.dt, "weight"): self.dt.weight)
            self.paths.update(self.every_path(owner))
            for arg in (owner, *node.args[2:]):
                self.visit(arg)
            return
        if isinstance(node.func, ast.Name) and node.func.id in _INSPECTING:
            for arg in node.args:  # (what the weight is, not what it holds)
                owner = self.weight_of(arg)
                self.visit(arg if owner is None else owner)
            for keyword in node.keywords:
                self.visit(keyword)
            return
        self.generic_visit(node)

    def visit_Attribute(self, node):
        owner = self.weight_of(node.value) if node.attr in _TENSOR_METADATA else None
        if owner is not None:
            self.visit(owner)  # (its dtype, shape or device: the stand-in has them)
            return
        if node.attr == "weight":
            self.paths.update(self.every_path(node.value))
        self.generic_visit(node)


_COMPARISONS = {ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
                ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
                ast.Is: lambda a, b: a is b, ast.IsNot: lambda a, b: a is not b,
                ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}


def _weight_reads(module, seen: dict) -> tuple:
    """``(paths, called)`` of ``_WeightReads`` over ``module``'s class code (its bases' too), once a
    module (``seen``)."""
    found = seen.get(id(module))
    if found is None:
        found = seen[id(module)] = set(), set()
        for tree, scope in _class_trees(type(module)):
            visitor = _WeightReads(module, scope)
            visitor.visit(tree)
            found[0].update(visitor.paths)
            found[1].update(visitor.called)
    return found


def _take_weights_read(stacks) -> list:
    """Take out of the stacks the linears whose weight the module holding them reads as a tensor of
    values and the blocks' code never calls (Jamba's, Mamba's and Falcon-Mamba's mixers:
    ``self.dt_proj.weight @ time_step``), and return their names. A packed layer serves such a
    read only by dequantizing its whole weight at each one (``PackedWeight``); the walks see no
    call of such a layer and leave it, but RTN runs no forward and would pack it. The blocks'
    classes are read (their source), as no forward can be run without inputs. (A linear called
    there too is packed, its reads served dequantized: Reformer's LSH attention calls query_key,
    and reads its weight on a cached path.)"""
    read, seen = [], {}
    for stack in stacks:
        for i, block in enumerate(stack.blocks):
            keep = []
            for rel in stack.chosen[i]:
                parts = rel.split(".")
                found = [(tuple(parts[k:]), _weight_reads(block.get_submodule(".".join(parts[:k])), seen))
                         for k in range(len(parts))]
                # (read by the module that holds it; not by one further out reaching in, as
                # nn.TransformerEncoderLayer's fast path does self.self_attn.out_proj.weight, which
                # the attention AUTO rebuilds turns off; a list of modules holds none, its owner does)
                holder = max(k for k in range(len(parts)) if k == 0 or not isinstance(
                    block.get_submodule(".".join(parts[:k])), (nn.ModuleList, nn.ModuleDict)))
                if (found[holder][0] in found[holder][1][0]
                        and not any(path in called for path, (_, called) in found)):
                    read.append(f"{stack.names[i]}.{rel}")
                else:
                    keep.append(rel)
            stack.chosen[i] = keep
    return read


def _share_tied(model, tied, edits, report) -> None:
    """A linear tied to another (the same weight and bias parameters in another module: Zamba's
    attention block, shared by its hybrid layers) gets the other's packed layer: the quantized
    model keeps the sharing and its size, as the checkpoint it came from. The layer is solved
    on its first use's inputs (the walk runs the later uses in full precision)."""
    for name, first in tied.items():
        layer = model.get_submodule(first)
        if isinstance(layer, QuantLinear):  # (else left in full precision: never called)
            edits.swap(name, layer, keep_hooks=False)  # (the first use's layer, its hooks its own)
            report.tied[name] = first


def _warn_quantized_elsewhere(model, targets, families: bool = False) -> None:
    """The target stream runs the model's layers outside the walked blocks as they are: where an
    earlier call quantized them (another tower), its targets are not the full-precision model's.
    ``families``: the model's towers are of several families, whose walk in one call these targets
    are refused for (the remedy was that call)."""
    done = [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    if done:
        remedy = (f"quantize this tower before them (the walk of every tower in one call takes "
                  f"targets={targets!r} within one family's towers only)" if families
                  else "quantize every tower in one call (adapter=None)")
        warnings.warn(f"targets={targets!r}: {len(done)} layers were quantized by an earlier call (e.g. "
                      f"{done[0]}), and the target stream runs them quantized; to have it run the "
                      f"full-precision model, {remedy}")


def _check_finite(model, stacks):
    checked = set()
    for stack in stacks:
        for i, block in enumerate(stack.blocks):
            for rel in stack.chosen[i]:
                linear = block.get_submodule(rel)
                if linear.weight.is_meta:
                    if any(hasattr(m, "_hf_hook") for m in block.modules()):  # (accelerate's)
                        raise ValueError(
                            f"layer {stack.names[i]}.{rel} is offloaded by accelerate (its weight is on "
                            f"the meta device and loaded at each call: device_map with offload, or "
                            f"cpu_offload): load the model without offloading (device_map=None or "
                            f"'cpu') and pass quantize_model(..., device='cuda'), which moves each block "
                            f"to the GPU for its turn")
                    raise ValueError(f"layer {stack.names[i]}.{rel} is on the meta device (the "
                                     f"model's weights were never loaded): load them first")
                for what, t in (("weight", linear.weight), ("bias", linear.bias)):
                    checked.add(id(t))
                    if t is not None and not all_finite(t):
                        raise ValueError(
                            f"layer {stack.names[i]}.{rel} of the merged model has a non-finite "
                            f"{what} (NaN or inf)"
                        )
    # the rest (embeddings, norms): a NaN there reaches the statistics as the calibration
    # inputs' and would be blamed on the data
    for name, p in model.named_parameters():
        if id(p) not in checked and p.is_floating_point() and not p.is_meta and not all_finite(p):
            raise ValueError(f"the merged model's {name} has non-finite values (NaN or inf)")


def _meta_hint(model, error) -> str:
    """Where the model failed on a tensor of the meta device: the first such tensor it holds. A
    model built under ``torch.device("meta")`` and loaded with ``load_state_dict(assign=True)``
    keeps its non-persistent buffers (rotary ``inv_freq``) there: no state dict holds them."""
    if "meta" not in str(error):
        return ""
    name = next((n for n, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta), None)
    return "" if name is None else f"; the model's {name} is on the meta device: it was never loaded"


def _flag_given_a_tensor(model, item) -> Optional[str]:
    """The parameter of ``model``'s forward, a flag (its default True or False), that a tensor of a
    positional ``item`` goes to. A labelled dataset's batch of one image, ``(image, label)``, gave
    the label to HF CLIP's vision tower's interpolate_pos_encoding: a tensor of one value passes
    as a bool, so the walk ran, with the flag set by the label's value (the larger batches' labels
    fail there: ``_positional_hint``)."""
    bound = None if hasattr(item, "_fields") else bound_to_forward(model, item)
    if bound is None:
        return None
    params = bound.signature.parameters
    return next((name for name, value in bound.arguments.items()
                 if isinstance(value, torch.Tensor) and isinstance(params[name].default, bool)), None)


def _positional_hint(model, item) -> str:
    """Which of the forward's parameters the elements of a positional ``item`` went to. A labelled
    dataset's batches, ``(images, labels)`` as a torchvision ImageFolder's DataLoader yields them, gave
    the labels as the second parameter (HF CLIP's vision tower's interpolate_pos_encoding), and the
    model's own error ("Boolean value of Tensor with more than one value is ambiguous") said nothing of it."""
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        return ""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # (a forward of no signature: nothing to name)
        return ""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p.name for p in params if p.kind in kinds]
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        return ""  # (*args: the forward takes them all, so the position says nothing)
    went = (f"and {type(model).__name__}.forward takes {len(positional)} ({', '.join(positional)})"
            if len(item) > len(positional) else
            f"to {type(model).__name__}.forward's {', '.join(positional[:len(item)])}")
    return (f"; its {len(item)} elements were given by position, {went}: a labelled dataset's batches, "
            f"(inputs, labels)? give the model's inputs alone, or a dict of them")


def _decoder_inputs_hint(model, item, error) -> str:
    """That an encoder-decoder's ``item`` gives its decoder nothing to run on. T5 given its encoder's
    input_ids alone, as a causal LM is calibrated, failed in its decoder with transformers' "You must
    specify exactly one of input_ids or inputs_embeds", of an item holding input_ids. (BART makes its
    decoder's inputs from input_ids: an item without them runs, and fails, if it does, for another cause,
    not with a ValueError of its inputs.)"""
    model = wrapped_model(model)
    if not (_encoder_decoder(model) and isinstance(error, ValueError)):
        return ""
    if isinstance(item, Mapping):
        given = {k for k, v in item.items() if v is not None}
    else:
        bound = bound_to_forward(model, item if isinstance(item, (tuple, list)) else (item,))
        if bound is None:  # (it does not bind: a TypeError of the call, no ValueError to hint at)
            return ""
        given = {name for name, v in bound.arguments.items() if v is not None}
    if given & {"labels", "decoder_input_ids", "decoder_inputs_embeds"}:
        return ""
    return (f"; an encoder-decoder ({type(model).__name__}) runs its decoder on labels (the targets, "
            f"teacher-forced) or decoder_input_ids, and the item has neither: give them beside its input_ids")


def _warn_unquantized_matrices(stacks, share: float = 0.05) -> None:
    """Warn when the blocks hold weight matrices outside any linear layer (fused 3-D MoE
    experts of a model the adapter does not rebuild, raw parameters) worth more than ``share``
    of their parameters, or any stacked (3-D) one, whatever its share (a test model's small
    experts beside a large shared one are most of the real model's weights): those stay in full
    precision, and nothing else would say so."""
    layers = (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd)
    left, total, outside, stacked = [], 0, 0, False
    for stack in stacks:
        for i, block in enumerate(stack.blocks):
            # a parametrized layer's (weight_norm's) weight lives in a child's parameters
            parametrized = tuple(f"{rel}.parametrizations." if rel else "parametrizations."
                                 for rel, m in block.named_modules()
                                 if isinstance(m, layers) and torch.nn.utils.parametrize.is_parametrized(m))
            for rel, module in block.named_modules():
                for name, p in module.named_parameters(recurse=False):
                    total += p.numel()
                    # (linears the adapter leaves out on purpose, routers, are linears still)
                    if (p.dim() < 2 or not p.is_floating_point() or isinstance(module, layers)
                            or f"{rel}.".startswith(parametrized)):
                        continue
                    outside += p.numel()
                    # (not Swin V2's per-head logit_scale [heads, 1, 1])
                    stacked = stacked or (p.dim() > 2 and min(p.shape[-2:]) > 1)
                    left.append(f"{stack.names[i]}.{rel + '.' if rel else ''}{name} {tuple(p.shape)}")
    if total and (outside > share * total or stacked):
        experts = any("expert" in name.lower() for name in left)
        warnings.warn(
            f"{100 * outside / total:.0f}% of the blocks' parameters are matrices outside any linear "
            f"layer and stay in full precision (e.g. {', '.join(left[:3])}): "
            + ("fused experts of a mixture-of-experts model its adapter does not rebuild? "
               "(epmq.adapters.MoEAdapter)" if experts else
               "weights the blocks read without a linear layer (as a state-space mixer's per-head "
               "projections), which no packed layer replaces")
        )


# What the walk's statistics count, named in every resume directory's identity (the package
# version does not move with each commit): change it when a change of the code changes them.
STATISTICS_RULES = ("padding cut (unpad); open_clip text tokens up to the end token; every call the "
                    "probes of each task saw; tasks with zero inputs left out; a one-block stack "
                    "called again in a chain solved on every call; experts of a list no token "
                    "reaches rounded with their called twin; LoRA experts' merged-path targets "
                    "W_0 + U V unrounded; JetMoE's experts a stage of their module; routed slots of "
                    "weight zero no expert's tokens")


def _versions() -> dict:
    """The installed versions of the code a walk's numbers come from (not what happens to be
    imported: that depends on the caller)."""
    from importlib import metadata

    from . import __version__

    def installed(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return dict({n: installed(n) for n in ("torch", "triton", "transformers", "open_clip_torch")},
                epmq=__version__)


# which kernels scaled_dot_product_attention may choose (flash and math on a CPU too), and whether its
# math kernel reduces fp16/bf16 in their precision: each changes the attention's outputs
_SDP = {"flash": ("flash_sdp_enabled", True), "mem_efficient": ("mem_efficient_sdp_enabled", True),
        "math": ("math_sdp_enabled", True), "cudnn": ("cudnn_sdp_enabled", True),
        "fp16_bf16_reduction_math": ("fp16_bf16_reduction_math_sdp_allowed", False)}


def _sdp(*names) -> tuple:
    # (an older torch without a setting: read as its default)
    return tuple((f"sdp.{n}", lambda read=read, default=default: getattr(torch.backends.cuda, read, lambda: default)(),
                  default) for n in names for read, default in [_SDP[n]])


def _float32_matmul_precision() -> str:
    """``torch.get_float32_matmul_precision()``, which raises (RuntimeError) once a backend's
    precision was set by torch's per-backend API (``torch.backends.cuda.matmul.fp32_precision =
    "tf32"``, as torch's docs now advise; oneDNN's bf16 on the CPU), and otherwise what CUDA's
    backend says, by the older API's names: TF32 is "high"."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return "high" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "highest"


# torch's settings of its float arithmetic on a device that a user may change (a training script's
# TF32), and their defaults: (name, how read, default)
_PRECISION = {
    "cuda": (("float32_matmul_precision", _float32_matmul_precision, "highest"),
             ("cudnn.allow_tf32", lambda: torch.backends.cudnn.allow_tf32, True),
             ("matmul.allow_fp16_reduced_precision_reduction",
              lambda: torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction, True),
             ("matmul.allow_bf16_reduced_precision_reduction",
              lambda: torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction, True),
             ("matmul.allow_fp16_accumulation",
              lambda: getattr(torch.backends.cuda.matmul, "allow_fp16_accumulation", False), False),
             *_sdp(*_SDP)),
    # (oneDNN's fp32 products in bf16 or TF32, on CPUs that have them: "none" takes the default, IEEE)
    "cpu": (("mkldnn.matmul.fp32_precision",
             lambda: getattr(torch.backends.mkldnn.matmul, "fp32_precision", "none").replace("none", "ieee"), "ieee"),
            ("mkldnn.conv.fp32_precision",
             lambda: getattr(torch.backends.mkldnn.conv, "fp32_precision", "none").replace("none", "ieee"), "ieee"),
            *_sdp("flash", "math", "fp16_bf16_reduction_math")),
}


def _float_precision(device: torch.device) -> dict:
    """The settings of torch's float arithmetic on ``device`` that differ from its defaults. The
    statistics and solves are IEEE fp32 whatever they say, but the blocks' forward, which makes the
    inputs every later block is solved from, runs under them: blocks done under other settings are
    another walk's. (Defaults are left out: a directory written before this was recorded resumes.)"""
    return {name: value for name, read, default in _PRECISION.get(device.type, ()) if (value := read()) != default}


def _machine(device: torch.device) -> dict:
    """What the walk's float arithmetic on ``device`` depends on, bit for bit, beyond torch's
    settings (``_float_precision``). On a CPU: torch's thread count (1 and 2 threads factor one
    4096-wide Hessian differently: MKL splits its reductions by thread; a full ``sum`` of 2^20
    floats differs too) and the instruction set ATen's kernels run on (the width of their
    vectorized reductions). On a GPU: its model and number of SMs, which cuBLAS chooses its
    kernels by (its results are reproducible only on GPUs of one architecture and SM count)."""
    if device.type == "cpu":
        return {"threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability()}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return {"gpu": properties.name, "sms": properties.multi_processor_count}
    return {}


def _blocks_and_model(read, device: torch.device, model_device: torch.device, others=()) -> dict:
    """``read`` (``_machine``, ``_float_precision``) of the blocks' ``device``, and, where the model
    lies on other hardware (``quantize_model(device=)``: the model on the CPU, each block visiting
    a GPU), that of ``model_device`` too, its entries named ``model.*``: the model's own code
    outside the blocks (its embeddings, what its stack does between blocks) runs there, and
    computes every block's inputs, which that hardware and its settings change bit for bit. So
    does that of the ``others`` the model lies on (a device_map over several GPUs), its entries
    named by the device (``cuda:1.*``); each where its entries differ from the blocks'."""
    blocks = read(device)
    named = dict(blocks)
    for prefix, on in (("model", model_device), *((str(d), d) for d in others)):
        if (entries := read(on)) != blocks:
            named.update({f"{prefix}.{k}": v for k, v in entries.items()})
    return named


def arithmetic_identity(device: torch.device, model_device: Optional[torch.device] = None, others=()) -> dict:
    """What float arithmetic on ``device`` (and the model's, ``model_device``, and ``others`` it lies
    on: ``_blocks_and_model``) depends on bit for bit besides the code and the data: torch's settings
    of it where not its defaults (``precision``) and the hardware (``machine``). One for a walk's
    resume identity and a run's (``pipeline.Runner``): a setting recorded by one alone let the other
    resume across it."""
    model_device = device if model_device is None else model_device
    others = [d for d in dict.fromkeys(others) if d not in (device, model_device)]
    precision = _blocks_and_model(_float_precision, device, model_device, others)
    return dict({"precision": precision} if precision else {},
                machine=_blocks_and_model(_machine, device, model_device, others))


# what transformers 5 (utils/output_capturing.py) sets on a model once its output-capturing hooks
# are installed
CAPTURE_MARK = "_output_capturing_hooks_installed"
# a module's hooks on its calls (not those on its state dict, which name its own tensors)
_CALL_HOOKS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook")


def _weight_hooks() -> tuple:
    """torch's hook-based weight reparametrizations (``nn.utils.weight_norm``, ``spectral_norm``,
    ``prune``): pre-hooks that compute ``weight`` from the module's own tensors before each call.
    The quantized weight is the one they computed; a packed layer has none of those tensors."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return WeightNorm, SpectralNorm, BasePruningMethod


_WEIGHT_HOOKS = _weight_hooks()


def _attributes(module: nn.Module) -> list:
    """A module's plain attributes (not its parameters, buffers, children, hooks or mode)."""
    return [(k, v) for k, v in vars(module).items() if not k.startswith("_") and k != "training"]


_PLAIN = (bool, int, float, str, type(None))
# where a model was loaded from, not how it computes (config_of drops it too)
_PROVENANCE = {"name_or_path", "kernel_config"}


def _settings(module: nn.Module) -> str:
    """The plain settings of ``module`` and its submodules that ``repr`` does not show (numbers,
    strings, flags, and tuples of them: an attention's ``scaling``, a rotary embedding's
    ``attention_scaling``): a resumed walk must see them unchanged."""
    return "\n".join(f"{name}.{k}={v!r}" for name, m in module.named_modules() for k, v in _attributes(m)
                     if k not in _PROVENANCE and (isinstance(v, _PLAIN) or (
                         isinstance(v, (tuple, list)) and all(isinstance(x, _PLAIN) for x in v))))


def keep_call_hooks(old: nn.Module, new: nn.Module) -> None:
    """``new``, put in the place of ``old``, takes the forward and backward hooks registered on
    it (the same dictionaries, so the caller's handles still remove them), but not torch's
    weight reparametrizations, which compute a ``weight`` from tensors ``new`` does not have."""
    for key in _CALL_HOOKS:
        hooks = getattr(old, key)
        if isinstance(hooks, dict) and any(isinstance(h, _WEIGHT_HOOKS) for h in hooks.values()):
            hooks = type(hooks)((k, h) for k, h in hooks.items() if not isinstance(h, _WEIGHT_HOOKS))
        setattr(new, key, hooks)


class _Edits:
    """Module replacements made on the user's model, undone if quantization fails."""

    def __init__(self, model):
        self.model = model
        self.log = []
        # buffers and plain attributes as they were: a forward may change them (dynamic RoPE
        # rescales inv_freq past the trained length, and sets max_seq_len_cached), and a failed
        # walk leaves the model as it found it
        self.states = [(m, dict(m._buffers), {n: b.clone() for n, b in m._buffers.items() if b is not None},
                        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in _attributes(m)})
                       for m in model.modules()]
        self.capture = {m: (set(m._forward_hooks), CAPTURE_MARK in vars(m)) for m in model.modules()}

    def swap(self, name: str, new: nn.Module, keep_hooks: bool = True) -> None:
        """Put ``new`` in the place of module ``name``, in its mode. ``keep_hooks``: ``new``
        takes the forward and backward hooks registered on the module it replaces (the same
        dictionaries, so the caller's handles still remove them): a replacement is called as
        the module was, and a hook on a quantized linear would otherwise be dropped without a
        word, and the blocks after it calibrated on outputs the hooked model never gives."""
        parent_name, _, attr = name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        old = getattr(parent, attr)
        self.log.append((parent, attr, old))
        if keep_hooks:
            keep_call_hooks(old, new)
            self.capture[new] = self.capture.get(old, (set(), False))  # (its hooks, not the walk's)
        setattr(parent, attr, new.train(old.training))
        return old

    def match_modes(self) -> None:
        """Each replacement takes the train/eval mode of the module it replaced."""
        for parent, attr, old in self.log:
            getattr(parent, attr).train(old.training)

    def forget_output_capture(self) -> None:
        """Undo transformers' output capture set up during the walk. transformers 5 hooks the
        modules whose outputs ``output_hidden_states`` / ``output_attentions`` collect on a model's
        first forward, and marks the model so that it never does again; when that forward is the
        walk's, the blocks are stand-ins, so the hooks miss them for good (hidden_states came back
        empty, and LLaVA's vision features, read from them, failed). The next forward sets it up
        again, on the real blocks."""
        for module in self.model.modules():
            hooks, marked = self.capture.get(module, (set(), False))
            if not marked:
                vars(module).pop(CAPTURE_MARK, None)
            for key, hook in list(module._forward_hooks.items()):
                if key not in hooks and getattr(hook, "__module__", "").startswith("transformers."):
                    del module._forward_hooks[key]

    def undo(self, mark: int, blocks: list) -> None:
        """Undo the replacements made since the log held ``mark`` of them, and the settings
        changed on the modules of ``blocks`` (EVA's separate q/v bias, WavLM's called projections)."""
        for parent, attr, old in reversed(self.log[mark:]):
            setattr(parent, attr, old)
        del self.log[mark:]
        inside = {m for block in blocks for m in block.modules()}
        for module, _, _, attributes in self.states:
            if module in inside:
                for name in [k for k, _ in _attributes(module) if k not in attributes]:
                    delattr(module, name)
                module.__dict__.update(attributes)

    def rollback(self) -> None:
        for parent, attr, old in reversed(self.log):
            setattr(parent, attr, old)
        self.log.clear()
        for module, buffers, values, attributes in self.states:
            for name, buffer in buffers.items():  # the same tensors, with the same values
                if buffer is not None and not buffer.is_meta and not torch.equal(buffer, values[name]):
                    with torch.inference_mode(buffer.is_inference()):
                        buffer.copy_(values[name])
            if not isinstance(module, torch.jit.ScriptModule):  # (a ScriptModule's buffers are its compiled
                # module's, no dict to clear, and the walk adds or drops none: clearing them raised, hiding
                # the walk's own error)
                module._buffers.clear()
                module._buffers.update(buffers)
            for name in [k for k, _ in _attributes(module) if k not in attributes]:
                delattr(module, name)
            module.__dict__.update(attributes)


# checkpoint keys transformers drops on load whatever the model class says (its
# _adjust_missing_and_unexpected_keys): buffers older versions saved
_IGNORED_ON_LOAD = (r"rotary_emb\.inv_freq", r"(^|\.)position_ids$", r"\.masked_bias$")


def _input_embeddings(model: nn.Module):
    """``(name, weight)`` of the model's input token embeddings (``get_input_embeddings``), or
    None where it does not say. (Asked of the model inside a DataParallel or torch.compile
    wrapper, which has it; the name is the wrapper's.)"""
    get = getattr(wrapped_model(model), "get_input_embeddings", None)
    try:
        module = get() if callable(get) else None
    except (NotImplementedError, AttributeError, TypeError):
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    path = next((n for n, m in model.named_modules() if m is module), None)
    return None if path is None else (f"{path}.weight" if path else "weight", weight)


def _expert_tensors(block) -> list:
    """``(name, tensor)`` of the block's float tensors that an expert has: not those of layers
    an earlier call quantized (an expert holds no scales; the target stream runs those layers
    as they are, as it does outside the blocks)."""
    packed = {id(t) for m in block.modules() if isinstance(m, QuantLinear)
              for t in m.state_dict(keep_vars=True).values()}
    return [(rel, t) for rel, t in block.state_dict(keep_vars=True).items()
            if t.is_floating_point() and id(t) not in packed]


class _OfOneThread(type):
    """The metaclass of a warning category (``thread``: a thread's id) that holds the warnings of
    that thread alone, whatever their class: a filter of it acts on that thread's warnings only."""

    def __subclasscheck__(cls, category):
        return threading.get_ident() == cls.thread


@contextmanager
def _warnings_of(name):
    """The body's warnings, said as layer ``name``'s: the solver's (a layer damped more than
    percdamp asked) name none, and a walk solves hundreds. Only this thread's: the filters and
    the hook are the process's, and another thread's warnings meanwhile (the experts'
    read-ahead's) were said as the layer's, past the caller's filters."""
    said, thread = [], threading.get_ident()
    # (the hook of the whole message, as catch_warnings(record=True) sets it: showwarning's arguments leave out
    # its source, whose tracemalloc traceback -X tracemalloc shows)
    shown_elsewhere, shown_elsewhere_whole = warnings.showwarning, warnings._showwarnmsg_impl

    def show(msg):
        if threading.get_ident() == thread:
            said.append(msg)
        # (judged by the caller's filters, as outside a solve: shown as they would have been)
        elif shown_elsewhere is not warnings._showwarning_orig:
            shown_elsewhere(msg.message, msg.category, msg.filename, msg.lineno, msg.file, msg.line)
        else:
            shown_elsewhere_whole(msg)

    def say_again():
        for w in said:
            warnings.warn_explicit(f"{name}: {w.message}", w.category, w.filename, w.lineno, source=w.source)

    try:
        with warnings.catch_warnings():
            # (all of this thread's: the caller's filters judge them as said again, named)
            warnings.simplefilter("always", _OfOneThread("ThisThreadsWarning", (Warning,), {"thread": thread}))
            warnings.showwarning = warnings._showwarning_orig  # (so that the whole message's hook is called)
            warnings._showwarnmsg_impl = show
            yield
    except BaseException:  # (a solve that failed too: what it said before its error)
        with contextlib.suppress(Warning):  # (under -W error the failure, not a warning, says why)
            say_again()
        raise
    say_again()


def _on_cpu(stats):
    """A shallow copy of a layer's statistics with every tensor moved to the CPU."""
    if hasattr(stats, "join"):
        stats.join()  # (its residual products may still be running on the side stream)
    # (not copy.copy: EPMQStats' copy takes a product the low-rank route owes first, here on the
    # GPU that just ran out of memory; every tensor is copied, so nothing is shared)
    moved = object.__new__(type(stats))
    for key, value in vars(stats).items():
        setattr(moved, key, value.to("cpu", copy=True) if isinstance(value, torch.Tensor) else value)
    moved.backend = "torch"  # (a product still owed, the low-rank route's, runs there as the solve)
    return moved


def _touch_pages(tensor: torch.Tensor, page: int = 4096) -> None:
    """Read a CPU tensor's memory pages (a mapped file's: from disk) by one byte each, in numpy,
    whose loop releases the GIL and takes no thread pool: a torch op in the read-ahead's thread
    contends with the walk's own for the CPU's threads (a check there made CPU walks 30%
    slower on 2 cores)."""
    if tensor.is_contiguous() and tensor.numel():
        tensor.detach().reshape(-1).view(torch.uint8).numpy()[::page].sum()


def _low_rank_print(expert, prints: Optional[dict] = None) -> tuple:
    """What a block's digest takes of an expert tensor read as ``W_0 + U V``: the fingerprints of
    ``W_0``, ``U`` and ``V`` (no dense tensor formed; ``prints``: ``W_0``'s by tensor, where the
    experts of a layer share one)."""
    W_0 = expert.W_0
    base = prints.get(id(W_0)) if prints is not None else None
    if base is None:
        base = fingerprint(W_0)
        if prints is not None:
            prints[id(W_0)] = base
    U, V = fingerprint(expert.U), fingerprint(expert.V)
    return base[0], base[1], f"{base[2]} + U {U[0]} {U[1]} {U[2]} V {V[0]} {V[1]} {V[2]}"


def _quant_linear(result, linear: nn.Linear, name: Optional[str] = None, divisor: int = 1) -> QuantLinear:
    """``result`` packed. ``divisor``: what the model divided the linear's weight by for inference
    (RWKV's, ``_rescale_for_inference``): the layer holds the undivided weight's scales and the
    division as its ``weight_multiplier``, as a checkpoint loaded and run holds them (the same codes:
    a power of two), so small scales are not rounded into float16's subnormals."""
    try:
        if divisor != 1:
            result = dataclasses.replace(result, scales=result.scales * divisor)
        packed = QuantLinear.from_result(result, linear.bias, dtype=linear.weight.dtype)
    except ValueError as error:  # (a layer the packed format or the model's dtype cannot hold: which one)
        if name is None:
            raise
        raise ValueError(f"{name}: {error}") from None
    if divisor != 1:
        packed.weight_multiplier = 1 / divisor
    return packed.to(linear.weight.device)


def _layer_report(name, block, method, targets, result, n_tokens=None) -> dict:
    out_f, in_f = result.codes.shape
    entry = dict(name=name, block=block, method=method, targets=targets, shape=[out_f, in_f],
                 bits=result.spec.bits, group_size=result.spec.group_size, n_tokens=n_tokens)
    entry.update({k: v for k, v in result.report().items() if k != "task_weights"})
    return entry


# --------------------------------------------------------------------------- RTN


def _rtn(stacks, spec, edits, report, progress, device=None, divisors=None):
    from tqdm.auto import tqdm

    total = sum(len(s.blocks) for s in stacks)
    with tqdm(total=total, desc="rtn", unit="block", disable=not progress) as bar:
        for stack in stacks:
            for i, block in enumerate(stack.blocks):
                for rel in stack.chosen[i]:
                    linear = block.get_submodule(rel)
                    W = linear.weight.detach()
                    result = quant.rtn(W if device is None else W.to(device), spec)
                    name = f"{stack.names[i]}.{rel}"
                    edits.swap(name, _quant_linear(result, linear, name, (divisors or {}).get(f"{name}.weight", 1)))
                    report.layers.append(_layer_report(name, stack.names[i], "rtn", None, result))
                bar.update()


# --------------------------------------------------------------------------- the walk


class _Stop(Exception):
    """Raised by a stand-in or hook to end a forward pass once what it needs is recorded."""


class _Unread(RuntimeError):
    """A pass used an expert tensor a lazy ``_Walk._expert_block`` left unread: it is read whole."""


class ExpertShapeError(ValueError):
    """An expert holds a tensor outside the blocks (an embedding, a norm, a gain) of another shape than
    the merged model's, which ``targets='expert_path'`` would run in place of the model's: a pass of
    the expert's stream used it (``_Walk._expert_outside``), so the expert is of another configuration.
    Public by name (``epmq.ExpertShapeError``): it is what the user's traceback shows, and the stack
    entry passes it on as it is, not as the calibration's failure."""


class _Placeholders(torch.overrides.TorchFunctionMode):
    """The placeholders the expert stream's passes hold in place of an expert's tensors (``held``: id
    -> (name, tensor, refusal, why)), whose use, while the mode is entered, raises ``refusal(why)``: an
    op on values that are not the expert's would give the pass a silently wrong answer (an empty
    tensor's sum is 0, torch.cat leaves a 1-D one out). They are looked for inside
    lists, tuples and dicts too: a torch function written in Python runs its body with the mode off,
    so a tensor it takes nested is used there unseen. What a placeholder keeps of its tensor (dtype,
    device) may be read. Compiled code (``torch.jit.script``) runs its ops where no torch function mode
    sees them, but through torch's dispatch: a dispatch mode (``_Dispatched``) refuses them there, and
    the placeholder keeps its tensor's shape for that code's reads of it (``size``, ``numel``)."""

    _KEPT = frozenset({torch.Tensor.dtype.__get__, torch.Tensor.device.__get__, torch.Tensor.requires_grad.__get__,
                       torch.Tensor.is_floating_point})

    def __init__(self):
        super().__init__()
        self.held = {}
        self._dispatched = _Dispatched(self)
        self._refused = None  # (the last refusal raised: the TorchScript interpreter raises its own around it)

    def hold(self, name, tensor, refusal, why, shape=None) -> None:
        """``tensor``'s values let go (its dtype and device kept, and ``shape``, by default its own,
        as a view of one NaN: no memory, and NaN should a use escape both modes), its use refused."""
        self.held[id(tensor)] = name, tensor, refusal, why
        one = torch.full((1,), math.nan if tensor.is_floating_point() else 0, dtype=tensor.dtype, device=tensor.device)
        tensor.data = one.expand(tensor.shape if shape is None else shape)

    def release(self, i) -> tuple:
        """``(name, tensor)`` of the placeholder of id ``i``, no longer refused (its data the caller's to set)."""
        return self.held.pop(i)[:2]

    def held_as(self, refusal) -> list:
        return [i for i, (_, _, held_as, _) in self.held.items() if held_as is refusal]

    def _held_in(self, values):
        for value in values:
            if isinstance(value, torch.Tensor):
                if id(value) in self.held:
                    return self.held[id(value)]
            elif isinstance(value, (list, tuple, dict)):
                found = self._held_in(value.values() if isinstance(value, dict) else value)
                if found is not None:
                    return found
        return None

    def refuse_in(self, values) -> None:
        """Raises the refusal of the first placeholder among ``values`` (nested in lists, tuples, dicts)."""
        found = self._held_in(values)
        if found is not None:
            _, _, refusal, why = found
            self._refused = refusal(why)
            raise self._refused

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self._KEPT:
            self.refuse_in(itertools.chain(args, kwargs.values()))
        return func(*args, **kwargs)

    def __enter__(self):
        super().__enter__()
        self._dispatched.__enter__()
        return self

    def __exit__(self, kind, error, traceback):
        self._dispatched.__exit__(kind, error, traceback)
        super().__exit__(kind, error, traceback)
        refused, self._refused = self._refused, None
        # (scripted code's failure on a placeholder: the refusal, not the interpreter's RuntimeError around it,
        # which does not carry it, nor what the walk made of that; any other error is its own, one raised
        # after a refusal the model caught too)
        if refused is not None and error is not refused and _from_scripted(error):
            raise refused from None


def _from_scripted(error) -> bool:
    """Whether ``error`` is, or was raised from, the TorchScript interpreter's failure of an op."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, RuntimeError) and str(error).startswith(
                "The following operation failed in the TorchScript interpreter"):
            return True
        error = error.__cause__ or error.__context__
    return False


class _Dispatched(TorchDispatchMode):
    """The refusal of ``placeholders``' use by ops that reach torch's dispatch unseen by its torch
    function mode: those of compiled code (``torch.jit.script``)."""

    def __init__(self, placeholders):
        super().__init__()
        self.placeholders = placeholders

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.placeholders.refuse_in(itertools.chain(args, kwargs.values()))
        return func(*args, **kwargs)


class StandInError(ValueError):
    """The blocks an adapter walks return more than its stand-ins for them (``Adapter.passthrough_of``),
    and the model fails on, or takes a later block's argument out of, what a stand-in returned
    (``_refuse_stand_in``): the adapter does not fit the blocks. Public by name
    (``epmq.StandInError``): it is what the user's traceback shows, and the stack entry passes it on
    as it is, not as the calibration's failure (the model's error, where it failed, is its cause)."""


class _Interleaved(Exception):
    """An earlier stack of the family was called after the stack being entered had begun."""

    def __init__(self, t):
        super().__init__(t)
        self.t = t


# (passes on, unnoted: the walk's control flow, and refusals that name what they refuse)
_UNNOTED = (_Stop, _Interleaved, _Unread, StandInError, ExpertShapeError)


@contextmanager
def _running(block: str, task, n, how: str):
    """An error raised while the walk runs ``block`` on calibration item ``n`` of ``task``
    (``how``: which of its passes) goes on as it is, its type and traceback the block's, with
    a note naming them: it said nothing of where in the walk it happened (a KeyError of block 7's
    code on one item of one task ended the walk with the key alone)."""
    try:
        yield
    except _UNNOTED:
        raise
    except Exception as error:
        error.add_note(f"(while the walk ran block {block!r} on calibration[{task!r}] item {n}: {how})")
        raise


class _StandIn(nn.Module):
    """Takes a block's place in its ModuleList while the model runs up to a stack; attribute
    reads fall through to the block (models read e.g. ``layer.attention_type``)."""

    def __init__(self, block, fn):
        super().__init__()
        self.__dict__["_block"] = block
        self.__dict__["_fn"] = fn

    def forward(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


_SIGNATURES: dict = {}


def _bind(block, args, kwargs):
    """``(hidden, kwargs)`` of a block call, every argument but the first by name."""
    forward = getattr(block.forward, "__func__", block.forward)
    signature = _SIGNATURES.get(forward)
    if signature is None:
        signature = _SIGNATURES[forward] = inspect.signature(block.forward)
    bound = signature.bind(*args, **kwargs)
    named = {}
    for p in signature.parameters.values():
        if p.name not in bound.arguments:
            continue
        value = bound.arguments[p.name]
        if p.kind == p.VAR_KEYWORD:
            named.update(value)
        elif p.kind == p.VAR_POSITIONAL:
            if value:
                raise ValueError(f"{type(block).__name__} takes *args: the walker cannot name them")
        else:
            named[p.name] = value
    hidden = named.pop(next(iter(signature.parameters)))
    for key in _caches_in(named, signature):
        named[key] = None
    if "use_cache" in named:
        named["use_cache"] = False
    return hidden, named


def _caches_in(named, signature) -> list:
    """The names of a block call's arguments that carry a generation cache (``_CACHE_KWARGS``), which
    the walk calls the block without: a transformers Cache or another object, a list or tuple shaped as
    a cache (a legacy cache of keys and values: ``_cache_shaped``; a (scale, shift) under such a name went
    to every call of the walk as None, without a word); ``state`` only where it is a list or tuple of
    tensors, the recurrent state RWKV's and xLSTM's models hand their blocks. Not a lone tensor, nor the value of a
    parameter of ``signature`` (the block's forward) without a default, whatever its name: a cache is
    optional, None by default (every transformers block's is; calibration's rule for a model's inputs),
    and such an argument is the block's own input, which went to every call of the walk as None (a bare
    error, or a block taking None for none walked on other inputs than the model's, without a word)."""
    required = {p.name for p in signature.parameters.values()
                if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return [key for key in _CACHE_KWARGS if key in named and key not in required
            and not isinstance(named[key], torch.Tensor)
            and (not isinstance(named[key], (list, tuple)) or _cache_shaped(named[key]))
            and (key != "state" or _recurrent_state(named[key]))]


def _recurrent_state(value) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in value)


def _refuse_filled_cache(stack, block, args, kwargs, task, n) -> None:
    """Refuse ``stack`` where the model hands its first block a cache holding tokens (PI05's action
    expert attends to the KV cache its VLM filled with the prefix): the walk calls every block
    without a cache, so their attention would miss those tokens, the masks made for them would not
    fit (torch's bare shape error deep inside) or, where they did, the statistics would be wrong.
    Named by calibration[``task``] item ``n``: a state comes with some items alone (RWKV's, of a
    generation's earlier tokens, given by the user), and the refusal named none of them."""
    signature = inspect.signature(block.forward)
    try:
        bound = signature.bind(*args, **kwargs).arguments
    except TypeError:  # (_bind says what is wrong with the call)
        return
    for p in signature.parameters.values():
        if p.kind == p.VAR_KEYWORD:
            bound.update(bound.pop(p.name, {}))
    for key in _caches_in(bound, signature):
        cache = bound[key]
        # (_caches_in's state, RWKV's recurrent one, is a list of tensors whether it holds tokens or not)
        if key == "state" and not _starts_afresh(stack, block, args, kwargs, cache):
            raise ValueError(
                f"calibration[{task!r}] item {n}: the blocks at {stack.prefix!r} ({stack.adapter.name}) are handed a "
                f"state (a {type(cache).__name__} of tensors) that block 0 returns other hidden states without: the "
                f"walk calls the blocks without a recurrent state (RWKV's, which they write their tokens into), and "
                f"cannot replay one that holds earlier tokens: give whole sequences without one; an input of the "
                f"blocks' that is no recurrent state goes under another name")
        if key != "state" and _holds_tokens(cache):
            legacy = not callable(getattr(cache, "get_seq_length", None))
            held = (f" (a {type(cache).__name__} of keys and values)" if legacy
                    else f" of {cache.get_seq_length()} tokens")
            raise ValueError(
                f"calibration[{task!r}] item {n}: the blocks at {stack.prefix!r} ({stack.adapter.name}) are handed "
                f"a {key}{held} that the model filled before them (PI05's action expert attends to the KV cache its "
                f"VLM filled with the prefix): the walk calls each block without a cache and cannot replay it, so "
                f"their inputs would not be those of the model; leave them out (walk the other towers: the default "
                f"walk, adapter= without the one taking them, or layers=), and they stay in full precision"
                + (f"; an input of the blocks' that is no cache goes under another name than {key}" if legacy else ""))


def _starts_afresh(stack, block, args, kwargs, state) -> bool:
    """Whether ``block`` called with ``args`` and ``kwargs`` returns the same hidden states handed a copy of
    the recurrent ``state`` as without one (what the walk calls it with): a state as a model makes it for a
    first call (RWKV's zeros), not one holding earlier tokens nor an input of the block's under that name.
    (A copy: the block writes its tokens into it.)"""
    hidden, named = _bind(block, args, kwargs)
    leaves, spec = tree_flatten(state)
    try:
        without = block(hidden.clone() if isinstance(hidden, torch.Tensor) else hidden, **named)
        given = block(hidden.clone() if isinstance(hidden, torch.Tensor) else hidden,
                      **dict(named, state=tree_unflatten([t.clone() for t in leaves], spec)))
    except Exception as e:
        if _out_of_memory(e):
            raise
        return True  # (the walk's own calls of the block say what fails)
    return _same_output(stack.adapter.hidden_of(without), stack.adapter.hidden_of(given))


def _check_hidden(stack, hidden):
    """Every calibration item's input to ``stack``'s first block: floating, of one dtype and
    width (``inputs_embeds`` given by hand bypass the model's embedding, and its checks)."""
    first = None
    for task, items in hidden.items():
        for n, h in enumerate(items):
            if not isinstance(h, torch.Tensor) or h.dim() == 0:
                continue
            if not h.is_floating_point():
                raise ValueError(f"calibration[{task!r}] item {n}: the blocks at {stack.prefix!r} get {h.dtype} "
                                 f"hidden states; give floating ones (inputs_embeds in the model's dtype)")
            if first is None:
                first = task, n, h.dtype, h.shape[-1]
            elif (h.dtype, h.shape[-1]) != first[2:]:
                raise ValueError(f"calibration[{task!r}] item {n}: the blocks at {stack.prefix!r} get {h.dtype} "
                                 f"hidden states {h.shape[-1]} wide, calibration[{first[0]!r}] item {first[1]} "
                                 f"gives them {first[2]} and {first[3]} wide")


_OBJECTS_DEEP = 8  # (objects within objects past it are held whole)


def _versions_of(named: dict, count=version, depth: int = _OBJECTS_DEEP) -> dict:
    """Each keyword argument as it is now, however nested (lists, tuples, dicts, named tuples:
    torch's pytree; a write into a tensor held in a dict went unseen; objects' attributes down to
    ``depth`` objects deep: ``_fields_of``): its structure and its leaves, each tensor with its
    version counter (None for an inference tensor, a buffer of a model made under
    ``torch.inference_mode``, which has none and cannot be written outside that mode; None for any
    other value). The leaves are held, not their ids: one the model puts in another's place (a
    dict's entry advanced out of place) may take the freed one's id."""
    return {name: _structure_and_leaves(value, count, depth) for name, value in named.items()}


def _structure_and_leaves(value, count, depth, inside=frozenset()) -> tuple:
    """``_versions_of`` of one value; an object holding attributes stands as its class, then its
    attributes' leaves (``inside``: the ids of the objects it lies in, a cycle back to one is held
    whole)."""
    leaves, spec = tree_flatten(value)
    inner, held = [], []
    for t in leaves:
        fields = None if id(t) in inside or len(inside) >= depth else _fields_of(t)
        if fields is None:
            held.append((t, count(t) if isinstance(t, torch.Tensor) else None))
        else:  # (the class compared as a value: one put in its place with equal attributes is the same)
            opened, leaves_in = _structure_and_leaves(fields, count, depth, inside | {id(t)})
            inner.append(opened)
            held += [(type(t), None), *leaves_in]
    return (spec, tuple(inner)), held


_HELD_WHOLE = (torch.Tensor, nn.Module, type, enum.Enum, types.FunctionType, types.BuiltinFunctionType,
               types.MethodType, types.ModuleType, functools.partial)


def _fields_of(value) -> Optional[dict]:
    """The attributes (``__dict__`` and slots) of an object a block is handed that a block or the
    model may change in place (a SimpleNamespace, a dataclass, a transformers Cache under a name not
    a cache's), or None: a value without any, or one held whole (tensors, modules: the model's own,
    functions, classes). The object is the same one before and after such a change, so that the
    check of kept arguments looking at it alone took block 0's ``ctx.gain += 1`` for no change."""
    if isinstance(value, _HELD_WHOLE):
        return None
    fields = dict(getattr(value, "__dict__", None) or {})
    for cls in type(value).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            if slot not in ("__dict__", "__weakref__") and hasattr(value, slot):
                fields[slot] = getattr(value, slot)
    return fields or None


def _replaced(given, now) -> Optional[str]:
    """What of an argument (``_versions_of``) is no longer what it was given: "tensors" where
    others stand in its tensors' places, "values" where its other values are no longer equal ones
    (``_same_arguments``: a float put in another's place) or its structure changed (a list appended
    to); None where neither."""
    (spec, leaves), (spec_now, leaves_now) = given, now
    tensors, tensors_now = ([t for t, _ in ls if isinstance(t, torch.Tensor)] for ls in (leaves, leaves_now))
    if len(tensors) != len(tensors_now) or any(t is not u for t, u in zip(tensors, tensors_now)):
        return "tensors"
    values, values_now = ({i: t for i, (t, _) in enumerate(ls) if not isinstance(t, torch.Tensor)}
                          for ls in (leaves, leaves_now))
    return None if spec == spec_now and _same_arguments(values_now, values) else "values"


def _changed(given, now) -> bool:
    """Whether an argument (``_versions_of``) was replaced in part or written in place since."""
    return _replaced(given, now) is not None or any(v != w for (_, v), (_, w) in zip(given[1], now[1]))


def _changed_arguments(given, named) -> list:
    """The names of the arguments in ``named`` changed (``_changed``) since their ``_versions_of`` ``given``."""
    return [name for name, now in _versions_of(named).items() if _changed(given[name], now)]


def _kept_depth(stack) -> int:
    """How deep into objects ``_check_kept`` looks: not at all where the adapter's stand-ins run the
    blocks (AUTO), since what they change in an object (Gemma 4's layers storing keys and values for
    later ones) is the blocks', not the model's: ``_check_replayable``'s; the model's are seen between
    one block's call and the next's, and after the last, there (``_check_left``: in the arguments of
    every block called so far)."""
    return 0 if stack.adapter.runs_blocks else _OBJECTS_DEEP


def _check_kept(stack, now, task, n) -> None:
    """A ValueError if the model wrote in place into a keyword argument of a block after calling
    it (a step counter advanced between calls), or put other tensors or values into it (a dict's
    entry, a list appended to): the walk calls each block again with the arguments as recorded,
    which would then hold the later values."""
    _check_left(stack, now["left"], task, n)
    for j, (named, versions) in enumerate(zip(now["kwargs"], now["versions"])):
        if named is not None:
            _check_kept_of(stack, j, named, versions, task, n, _kept_depth(stack))


def _left_by_blocks(left: dict, j: Optional[int] = None, named: Optional[dict] = None) -> dict:
    """Where the stand-ins run the blocks (AUTO): every argument the blocks of a pass were handed so far
    (``left``: its id -> the first block handed it, its name there, itself and its ``_versions_of``),
    block ``j``'s ``named`` joined, each as the blocks' calls left it. Those of earlier blocks too: the
    model's change to an object only a later block gets went unseen (looked for among the last block's
    arguments alone), and the earlier block was walked on what the model had changed there since."""
    joined = dict(left)
    for name, value in (named or {}).items():
        joined.setdefault(id(value), (j, name, value, None))
    return {key: (k, name, value, _versions_of({name: value})[name]) for key, (k, name, value, _) in joined.items()}


def _check_left(stack, left: dict, task, n) -> None:
    """``_check_kept`` of the arguments in ``left`` (``_left_by_blocks``) since the blocks' last call:
    what the model changed there (in objects too: ``_kept_depth``'s blocks' changes are not among it)."""
    for j, name, value, versions in left.values():
        _check_kept_of(stack, j, {name: value}, {name: versions}, task, n, _OBJECTS_DEEP)


def _check_kept_of(stack, j, named, versions, task, n, depth) -> None:
    """``_check_kept`` of block ``j``'s arguments ``named`` (``versions``: their ``_versions_of`` as
    recorded), ``depth`` objects deep."""
    for name, now_versions in _versions_of(named, version, depth).items():
        if _changed(versions[name], now_versions):
            replaced = _replaced(versions[name], now_versions)
            how = f"puts other {replaced} into" if replaced else "writes in place into"
            # (a new container per call keeps the one recorded as it was, unless the containers
            # inside it are shared still; a write in place reaches the tensor wherever it is held)
            value = named[name]
            inner = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
            nested = any(isinstance(v, (list, tuple, dict)) for v in inner)
            fix = (f"a new {type(value).__name__} per call{' (and new lists and dicts in it)' if nested else ''}"
                   if replaced else "a new tensor per call")
            raise ValueError(
                f"calibration[{task!r}] item {n}: the model {how} {name!r}, an argument of "
                f"block {j} at {stack.prefix!r}, after that block's call; the walk calls each block again "
                f"with its arguments as they were given, which they no longer are: give the model "
                f"{fix}, or leave the blocks out: {stack.left_out()}")


def _same_contents(given, now) -> bool:
    """Whether two ``_versions_of(..., count=torch.clone)`` of an argument hold the same structure
    and values (tensors equal, whether the same ones or not)."""
    (spec, leaves), (spec_now, leaves_now) = given, now
    # (NaN where NaN was: keys of a row of padding alone, stored alike on each call, are the same ones)
    return spec == spec_now and all(
        torch.equal(a, b) or a.is_floating_point() and bool(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (a.shape, a.dtype) == (b.shape, b.dtype)
        else _same_arguments({0: u}, {0: t})
        for (t, a), (u, b) in zip(leaves, leaves_now))


def _longer_than_checked(shape, longest):
    """``longest`` (the largest size along each dimension of the items checked so far, None before any)
    grown by an item of ``shape`` where that item is the first or longer along any dimension than all of
    them, so checked too; else None. (A block may read what its arguments hold on a longer item alone, past
    a sliding window's width; checking every item of distinct lengths would call each block once more per
    item: of n items in random order, about ln n are checked so, the longest too.)"""
    if longest is None:
        return shape
    return tuple(map(max, shape, longest)) if any(size > most for size, most in zip(shape, longest)) else None


def _items_checked(items) -> list:
    """The indices of the ``items`` (a task's inputs of a block, all known here, unlike in the model's own
    forward) checked: item 0 and the first largest along each dimension, the longest among them. (Not
    ``_longer_than_checked``'s: of items sorted by length it would check every one, a call of each block
    more per item.)"""
    shapes = [tuple(getattr(item, "shape", ())) for item in items]
    checked = {0}
    for d in range(max(map(len, shapes), default=0)):
        sizes = [shape[d] if d < len(shape) else -1 for shape in shapes]
        checked.add(sizes.index(max(sizes)))
    return sorted(checked)


def _check_replayable(stack, i, block, probed, stream) -> None:
    """A ValueError where block ``i`` changes an argument it is handed otherwise on each call (a count
    it advances, a cache it adds to under a name not a cache's) or reads what its call left there (a
    flag it sets on its first call): the model hands the later blocks what its one call left there,
    the walk calls each block several times (probes, statistics, the pass after) on its arguments as
    they were given, so that each call got them changed by the ones before and block ``i + 1`` by
    every one (a SimpleNamespace whose count block 0 advances: 2.5x the statistics of the model's).
    One that each call changes alike (Gemma 4's layers storing their keys and values for later ones
    to read) holds what one call leaves. ``probed``: of each task's item 0 whose first call in the walk
    (``_groups``' probe) changed an argument, the task, input, arguments, the first argument changed and
    the hidden states the block returned; the block is called once more on it, to compare. Where its
    blocks ran in the model's own forward (AUTO) they were checked there on the items
    ``_longer_than_checked`` checks; else it is called on the others ``_items_checked`` picks of a task too,
    and once more where that call changed an argument (on a longer item alone: past a sliding window's width)."""
    prefix = stack.names[i]
    for task, hidden, named, name, first in probed:
        with _running(prefix, task, 0, "called again to see whether it changes its arguments"):
            _check_called_again(stack, i, block, task, 0, hidden, named, name, first)
    if stack.adapter.runs_blocks:
        return
    for task, items in stream.hidden.items():
        for n in _items_checked(items)[1:]:
            hidden, named = items[n], stream.kwargs[task][n]
            before = _versions_of(named)
            with _running(prefix, task, n, "called to see whether it changes its arguments"):
                # (a copy: a block may write its input in place, as _groups' probe)
                output = block(hidden.clone() if isinstance(hidden, torch.Tensor) else hidden, **named)
                changed = _changed_arguments(before, named)
                if changed:
                    _check_called_again(stack, i, block, task, n, hidden, named, changed[0],
                                        stack.adapter.hidden_of(output))


def _check_called_again(stack, i, block, task, n, hidden, named, name, first) -> None:
    """``_check_replayable`` of block ``i``, whose call on item ``n`` of ``task`` returned the hidden
    states ``first`` from ``hidden`` and changed its argument ``name``: called once more on what that
    call left in ``named``, refused where that changes them otherwise or returns other hidden states
    (the walk's later calls would see what the model's one call did not)."""
    once = _versions_of(named, count=torch.clone)
    try:
        again = block(hidden.clone() if isinstance(hidden, torch.Tensor) else hidden, **named)
    except Exception as e:
        if _out_of_memory(e):
            raise
        # (it ran on these arguments as the model gave them; failing on what its call left there, it
        # is the change that fails, which the block's own error, noted as this call's, did not say)
        how = f"and fails when called again on what that call left there ({_error_said(e)})"
        raise ValueError(_unreplayable(stack, i, task, n, name, named, how)) from e
    twice = _versions_of(named, count=torch.clone)
    changed = [name for name in named if not _same_contents(once[name], twice[name])]
    if changed:
        raise ValueError(_unreplayable(stack, i, task, n, changed[0], named, "otherwise on each call"))
    if not _same_output(first, stack.adapter.hidden_of(again)):
        raise ValueError(_unreplayable(stack, i, task, n, name, named, "and returns other hidden states when "
                                                                      "called again on what that call left there"))


# (torch's CPU allocator fails by c10's enforce: a plain RuntimeError, told by its message alone)
_CPU_OUT_OF_MEMORY = ("DefaultCPUAllocator: can't allocate memory", "DefaultCPUAllocator: not enough memory")


def _out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation that failed: a GPU's torch.OutOfMemoryError, or the CPU allocator's
    RuntimeError. No calibration's or block's fault, so never refused as theirs."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and any(said in str(e) for said in _CPU_OUT_OF_MEMORY))


# the model's errors on an item it cannot run (token ids past the vocabulary, other widths or dtypes): the item's
_ITEMS_ERRORS = (RuntimeError, IndexError, TypeError, NotImplementedError)


def _error_said(e: BaseException) -> str:
    """An error in one line, as the walk's refusals quote a block's or the model's: its type and the first
    300 characters of its message's first line."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def _holds_objects(value) -> bool:
    """Whether a block's argument holds what another block may change in place other than a tensor (a dict,
    a list, an object's attributes: ``_fields_of``, or one without any yet), however deep in tuples."""
    if isinstance(value, tuple):
        return any(_holds_objects(v) for v in value)
    return (isinstance(value, (dict, list)) or _fields_of(value) is not None
            or hasattr(value, "__dict__") and not isinstance(value, _HELD_WHOLE))


def _check_copy_device(tensor: torch.Tensor, kept: int) -> torch.device:
    """Where ``_check_read_before_changed`` holds its copy of ``tensor``, ``kept`` bytes of its copies held
    off the CPU so far: on the tensor's device within ``READ_CHECK_KEPT_BYTES``, else on the CPU."""
    size = tensor.numel() * tensor.element_size()
    return tensor.device if tensor.device.type == "cpu" or kept + size <= READ_CHECK_KEPT_BYTES \
        else torch.device("cpu")


class _CheckCopy:
    """A copy of a block's hidden states ``_check_read_before_changed`` holds (``_check_copy_device``), the
    device they were on, and the bytes of it held off the CPU; ``fresh``: a copy of its own back there (a
    block may write its input in place)."""

    def __init__(self, tensor: torch.Tensor, kept: int):
        self.device = tensor.device
        where = _check_copy_device(tensor, kept)
        if where == tensor.device:
            self.tensor = tensor.clone()
        else:  # (pinned: its copy back needs no staging)
            self.tensor = torch.empty_like(tensor, device=where, pin_memory=tensor.device.type == "cuda")
            self.tensor.copy_(tensor)
        self.device_bytes = 0 if where.type == "cpu" else tensor.numel() * tensor.element_size()

    def fresh(self, own: bool = True) -> torch.Tensor:
        return self.tensor.to(self.device, non_blocking=self.tensor.is_pinned(), copy=own)


def _check_copy(now, value):
    """``_check_read_before_changed``'s copy of ``value`` (a ``_CheckCopy`` of a tensor, else the value
    itself), held off the CPU within ``READ_CHECK_KEPT_BYTES`` (``now["handed_bytes"]`` held so far)."""
    if not isinstance(value, torch.Tensor):
        return value
    copy = _CheckCopy(value, now["handed_bytes"])
    now["handed_bytes"] += copy.device_bytes
    return copy


def _check_input_copy(now, j, unwritten):
    """``_check_copy`` of block ``j``'s input ``unwritten`` (a copy of it as the block was called), held once
    where it holds what the block before returned, as that block returned it: that block's copy of its
    output, which a model of blocks handed objects each (Gemma 4) holds for it. (Its values compared, not
    the tensor: Gemma 4's first layer reusing earlier keys and values is handed another one, on the same
    memory.)"""
    before = now["handed"].get(j - 1)
    if before is not None and isinstance(before[4], _CheckCopy) and isinstance(unwritten, torch.Tensor):
        passed, then = now["passed"]
        if (then is not None and version(passed) == then and unwritten.shape == passed.shape
                and unwritten.dtype == passed.dtype and unwritten.device == passed.device
                and torch.equal(unwritten, passed)):
            return before[4]
    return _check_copy(now, unwritten)


def _check_read_before_changed(stack, task, n, called) -> None:
    """A ValueError where a block reads what a block after it changes in an object they are both handed (a
    flag that block 1 sets on a ``ctx`` block 0 reads): the model's call of the earlier block saw the object
    as given, the walk calls it again on what the later blocks left there (AUTO's stand-ins ran every
    block as they recorded the arguments), and solved it on other inputs than the model's without a word.
    ``called``: block -> its input, arguments, their ``_versions_of`` as its call left them and the hidden
    states it returned (a tensor's as a ``_CheckCopy``), of the blocks handed objects on item ``n`` of ``task``;
    each whose arguments were changed since is called once more, as the walk will call it (one that reads
    nothing changed returns the same: Gemma 4's layers storing keys and values, each into the dict the others
    get)."""
    for j, (block, hidden, named, left, first) in called.items():
        now = _versions_of(named)
        name = next((name for name in named if _changed(left[name], now[name])), None)
        if name is None:
            continue
        try:
            again = block(hidden.fresh() if isinstance(hidden, _CheckCopy) else hidden, **named)
        except Exception as e:
            if _out_of_memory(e):
                raise
            how = f"fails when called again on it ({_error_said(e)})"
        else:
            if _same_output(first.fresh(own=False) if isinstance(first, _CheckCopy) else first,
                            stack.adapter.hidden_of(again)):
                continue
            how = "returns other hidden states when called again on it"
        raise ValueError(
            f"calibration[{task!r}] item {n}: block {j} at {stack.prefix!r} reads its argument {name!r} (a "
            f"{type(named[name]).__name__}), which a later block changes, and {how} as the later blocks left it; "
            f"the model called block {j} before they changed it, the walk calls each block again on its arguments "
            f"as all the blocks left them: have the blocks hand on what they change in a new object, or leave them "
            f"out: {stack.left_out()}")


def _next_call_of(blocks):
    """A global forward pre-hook ending the model's forward at its next module call unless that is one of
    ``blocks`` (their stand-ins), called again."""
    def hook(module, args):
        if not any(module is block for block in blocks):
            raise _Stop
    return hook


def _same_output(first, again) -> bool:
    """Whether two calls of a block returned the same hidden states, a kernel's rounding apart (an MoE's
    experts summed by index_add_'s atomics on a GPU, in any order)."""
    if not isinstance(first, torch.Tensor) or not isinstance(again, torch.Tensor):
        return True
    if (first.shape, first.dtype) != (again.shape, again.dtype):
        return False
    if not first.numel():
        return True
    first, again = first.float(), again.to(first.device).float()
    # (its finite values' scale: a NaN where a row is all padding, attention's over no token, made it NaN,
    # and the walk of a block storing its keys for later ones ended in torch's bare error on a NaN atol)
    magnitude = torch.where(first.isfinite(), first.abs(), 0.0)
    # each feature's own: an LLM's residual stream holds a few features (massive activations) hundreds of
    # times its others, and 1e-2 of their scale passed the others ~100% apart; a near-zero value's rounding
    # is of the terms summed into it, of its feature's scale
    scale = magnitude.amax(dim=tuple(range(first.dim() - 1)), keepdim=True) if first.dim() > 1 else magnitude.max()
    close = (again - first).abs() <= 1e-2 * (scale + magnitude)
    return bool((close | (again == first) | (again.isnan() & first.isnan())).all())


def _leaving_out(prefixes: str, layers) -> str:
    """The ``layers=`` that selects what the user's ``layers`` does but the linears inside the blocks at
    ``prefixes`` (escaped, ``|``-joined): one regex where theirs is one (its ``re.search`` a lookahead beside
    the exclusion), else what to add to theirs (a predicate, a compiled pattern's flags, no regex holds)."""
    out = f"(?!(?:{prefixes})\\.)"
    if isinstance(layers, re.Pattern) and layers.flags == re.compile(layers.pattern).flags:
        layers = layers.pattern
    if layers is None:
        return f"layers=r'^{out}'"
    if isinstance(layers, str) and "'" not in layers and not layers.endswith("\\"):  # (written as r'...')
        combined = f"^{out}(?=.*(?:{layers}))"
        try:
            re.compile(combined)
            return f"layers=r'{combined}'"
        except re.error:  # (global flags of theirs, (?i), allowed at a regex's start alone)
            pass
    return f"add to your layers= that it selects no name re.match(r'(?:{prefixes})\\.', name) matches"


def _unreplayable(stack, i, task, n, name, named, how) -> str:
    """``_check_replayable``'s refusal of block ``i``, which changes its argument ``name`` ``how``."""
    return (f"calibration[{task!r}] item {n}: block {i} at {stack.prefix!r} changes its argument {name!r} (a "
            f"{type(named[name]).__name__}) {how}; the model hands the later blocks what its one call left "
            f"there, the walk calls each block several times on its arguments as they were given: have the "
            f"block return what later blocks read, or leave the blocks out: {stack.left_out()}")


def _run_block(stack, j, block, hidden, named, ran_on=None):
    """Block ``j`` of ``stack`` called as the walk will call it (where the adapter's stand-ins
    run the blocks, ``AUTO``), refused by name unless it returns hidden states of its input's
    shape and leaves what it is given as it was. ``ran_on``: the calibration item it ran on
    before, if any; an error on this one is then the block's own on this input, as one where
    the walk hands it what the model gave it."""
    try:
        # (tensors alone: an object a block changes alike on each call is _check_replayable's)
        given = _versions_of(named, depth=0)
        output = block(hidden, **named)
        wrong = stack.adapter.returned(block, hidden, output)
        written = [name for name, v in given.items() if _changed(v, _versions_of(named, depth=0)[name])]
        if written and not wrong:  # (so no two calls of the block would agree)
            wrong = (f"block {j} writes in place into its argument {written[0]!r} (a state or cache the walk "
                     f"cannot hand each of its calls as the model's one call left it)")
    except (RuntimeError, IndexError, TypeError, NotImplementedError, AttributeError) as e:
        if _out_of_memory(e):
            raise
        # (called alike on an item before, or handed just what the model gave it, no cache taken nor a
        # TypeError of the walk's calling it by name: not a block the walk cannot call, but its own error;
        # an input under a cache's name that the walk keeps, _caches_in's, is what the model gave it)
        taken = [key for key in _CACHE_KWARGS if key in named and named[key] is None]
        as_given = not isinstance(e, TypeError) and not taken and "use_cache" not in named
        if ran_on is not None or as_given:
            how = f"having run on {ran_on}" if ran_on is not None else "called with the model's own arguments"
            raise ValueError(f"block {j} at {stack.prefix!r} raised on this calibration item ({_error_said(e)}), "
                             f"{how}: an error of the block's own on this input") from e
        wrong = f"block {j} fails when called as the model called it ({_error_said(e)})"
    if wrong:
        raise ValueError(f"the blocks at {stack.prefix!r} ({stack.adapter.name}) are not blocks the walker can "
                         f"quantize one by one: {wrong}; register an adapter for this family "
                         f"(epmq.register_adapter, see epmq/adapters/__init__.py)")
    return output


def _cut_from(value, output) -> bool:
    """Whether ``value`` is a part of the tensor ``output`` (a view of it of another shape): what a model
    took apart of a stand-in's tensor where the block returns a tuple."""
    return (isinstance(value, torch.Tensor) and isinstance(output, torch.Tensor)
            and value.layout == output.layout == torch.strided and not value.is_nested and not output.is_nested
            and value.shape != output.shape and output.device.type != "meta"
            and output.untyped_storage().data_ptr() != 0
            and value.untyped_storage().data_ptr() == output.untyped_storage().data_ptr())


def _refuse_stand_in(stack, called, error, taken: Optional[str] = None):
    """Where the model failed after a stand-in of ``stack``'s blocks returned (``called``: its block,
    input and arguments), or ``taken`` a part of what it returned as a later block's argument, refused
    naming why if the block returns more than the stand-in does (WavLM's layers return ``(hidden,
    position bias)``, which the model unpacks: a plain ``Adapter`` registered for them, as the warning
    of towers left in full precision offers, ended in the model's bare 'not enough values to unpack')."""
    j, block, hidden, named = called

    def kind(output):
        return f"a {type(output).__name__} of {len(output)}" if isinstance(output, (tuple, list)) else "a tensor"

    try:
        with torch.no_grad():
            real = block(hidden, **named)
    except Exception:  # (the block itself fails: nothing to tell of its stand-in)
        return
    given = stack.adapter.passthrough_of(block, hidden)
    # (more outputs than the stand-in's: what the model takes of them after the block is missing)
    if isinstance(real, (tuple, list)) and len(real) > (len(given) if isinstance(given, (tuple, list)) else 1):
        raise StandInError(
            f"the blocks at {stack.prefix!r} ({stack.adapter.name}) return {kind(real)} (block {j}: "
            f"{type(block).__name__}) where the adapter's stand-ins return {kind(given)}, and the model "
            + (f"took {taken} out of that" if taken else f"failed on that ({_error_said(error)})")
            + ": give the adapter a passthrough_of returning what they return (and a next_kwargs handing on what a "
              "later block takes of it, as epmq.adapters.WAVLM's position bias), or walk them with "
              "epmq.adapters.AUTO, which runs them") from error


_LISTED_EXPERT = re.compile(r"^(.*\bexperts\.)([^.]+)((?:\..+)?)$")  # (an expert may be a linear itself)


def _called_twin(rel, called):
    """The same projection of another expert of the same list, among the linears ``called``
    (``mlp.experts.expert_0.wi`` for ``mlp.experts.expert_2.wi``), or None."""
    match = _LISTED_EXPERT.match(rel)
    if match is None:
        return None
    head, _, tail = match.groups()
    for other in called:
        twin = _LISTED_EXPERT.match(other)
        if twin is not None and twin.group(1) == head and twin.group(3) == tail:
            return other
    return None


def _looped(stack, block, hidden, kwargs):
    """The block's output where the model calls it ``stack.loops`` times, each call on the
    previous one's output (once, for all but such looped stacks)."""
    for call in range(stack.loops):
        output = block(hidden, **kwargs)
        hidden = stack.adapter.hidden_of(output)
    return output


def _same_arguments(named, first) -> bool:
    """Whether a block's keyword arguments are those of its first call (the same tensors, or
    equal ones; equal plain values)."""
    if named.keys() != first.keys():
        return False
    for name, value in named.items():
        other = first[name]
        if value is other:
            continue
        if isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor):
            if (value.shape, value.dtype) != (other.shape, other.dtype):
                return False
            if not torch.equal(value, other.to(value.device)):
                return False
        elif isinstance(value, torch.Tensor) or isinstance(other, torch.Tensor) or isinstance(value, nn.Module):
            return False
        else:
            try:
                if not bool(value == other):
                    return False
            except Exception:  # (values that cannot say)
                return False
    return True


def _chained(hidden, passed) -> bool:
    """Whether a block got the hidden states the block before it returned (``passed``: that
    tensor and its version then; the stand-ins return their input). The walk feeds each block's
    output to the next; a model that changes them between two blocks (DeBERTa-v2 with
    ``conv_kernel_size`` mixes a convolution into the first layer's output; Qwen3-VL adds image
    features after its first layers) has each block's input taken from the model instead."""
    before, then = passed
    if not isinstance(hidden, torch.Tensor) or not isinstance(before, torch.Tensor):
        return True
    if hidden is before and version(hidden) == then:
        return True
    return (version(before) == then and hidden.shape == before.shape and hidden.dtype == before.dtype
            and torch.equal(hidden.to(before.device), before))


def _token_positions(mask, device):
    """``mask`` (``Adapter.token_mask``, bool ``[B, L]``, or None) with the indices of its tokens
    on ``device``, found once per item: ``_token_rows`` takes a linear's input's rows by them, where
    ``x[mask]`` at each call copied the mask to the device and counted its tokens there (a boolean
    index: on a GPU a wait for the device, per linear, call and pass over the block)."""
    return None if mask is None else (mask, tuple(i.to(device) for i in mask.nonzero(as_tuple=True)))


def _token_rows(x: torch.Tensor, positions) -> torch.Tensor:
    """``token_rows(x, mask)`` of ``positions`` (``_token_positions``): the same rows."""
    if positions is None or x.shape[:-1] != positions[0].shape:
        return token_rows(x, None)
    return x[tuple(i.to(x.device) for i in positions[1])]


def _held_bytes(values, device=None) -> int:
    """Bytes of the tensors in ``values`` (nested as a block's arguments are) on ``device`` (any:
    None), each storage once (T5's encoder states are in every decoder block's arguments)."""
    storages = {}
    for t, _ in _structure_and_leaves(values, lambda t: None, _OBJECTS_DEEP)[1]:
        if isinstance(t, torch.Tensor) and (device is None or _same_device(t.device, device)):
            storage = t.untyped_storage()
            storages[t.device, storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Whether ``a`` is ``b``, where an index left out ("cuda") is the current one."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _gib(size: int) -> str:
    """``size`` bytes for a person: in GiB, MiB or KiB, whichever reads from 0.1."""
    unit = next((u for u in (30, 20) if size >= 2**u / 10), 10)
    return f"{size / 2**unit:.1f} {dict([(30, 'GiB'), (20, 'MiB'), (10, 'KiB')])[unit]}"


def _to_device(item, device, moved=None):
    """``item`` (tensors, nested in dicts, lists, tuples) on ``device``; a tensor that appears
    more than once (T5's encoder states, in every decoder block's kwargs) is moved once."""
    moved = {} if moved is None else moved
    if isinstance(item, torch.Tensor):
        if id(item) not in moved:
            moved[id(item)] = (item, item.to(device))  # (item kept: its id stays unique)
        return moved[id(item)][1]
    if isinstance(item, Mapping):
        out = {k: _to_device(v, device, moved) for k, v in item.items()}
        if type(item) is dict or not all(isinstance(k, str) for k in out):
            return out
        try:  # (a block's ModelOutput is read by attribute by the next one)
            rebuilt = type(item)(**out)
        except TypeError:  # (a mapping not built from keywords)
            return out
        # (a constructor that takes some keys as its own arguments may not keep them)
        same = list(rebuilt.keys()) == list(out) and all(rebuilt[k] is v for k, v in out.items())
        return rebuilt if same else out
    if isinstance(item, (tuple, list)):
        out = [_to_device(v, device, moved) for v in item]
        if hasattr(item, "_fields"):  # a named tuple (Reformer's blocks return one)
            return type(item)(*out)
        return type(item)(out)
    return item


def _call(model, item, device, seed=None, devices=None):
    """``model`` on ``item``; with ``seed``, under the random state that seed gives (the caller's
    own state kept). Every pass of one calibration item runs with one seed (that of its task and
    number), so a model that draws random numbers in eval mode draws the same ones in each:
    ViTMAE shuffles (and masks) its patches by a random draw before its blocks, and the target
    streams (fp or expert path) saw other patches in another order than the quantized stream, row
    for row, with nothing said: their cross statistics paired rows of different patches."""
    if seed is None:
        return _call_now(model, item, device)
    # the generator of every accelerator the model lies on too, whichever it is (CUDA, XPU, Apple's
    # MPS: a model there draws from its own; one spread over GPUs by a device_map, or with a block
    # offloaded to one, draws from each), each forked and seeded alone (``devices``: those, found
    # once by the caller: a model of thousands of parameters makes the search cost per item)
    kinds = {}
    for on in _model_devices(model, device) if devices is None else devices:
        accelerator = _generator_module(on)
        if accelerator is not None:
            kinds.setdefault(on.type, (accelerator, []))[1].append(on)
    with contextlib.ExitStack() as forks:
        for kind, (_, devices) in kinds.items():
            forks.enter_context(torch.random.fork_rng(devices=devices, device_type=kind))
        if not kinds:
            forks.enter_context(torch.random.fork_rng(devices=[]))
        # (not torch.manual_seed: it seeds every GPU, whose states fork_rng does not restore)
        torch.random.default_generator.manual_seed(seed)
        for accelerator, devices in kinds.values():
            for on in devices:
                # (manual_seed seeds the current device; MPS has one, and no device context)
                with accelerator.device(on) if hasattr(accelerator, "device") else contextlib.nullcontext():
                    accelerator.manual_seed(seed)
        return _call_now(model, item, device)


def _model_devices(model, device) -> list:
    """``device`` and every other device ``model``'s parameters and buffers lie on, each once."""
    devices = {device: None}
    for t in itertools.chain(model.parameters(), model.buffers()):
        devices.setdefault(t.device, None)
    return list(devices)


def _generator_module(device):
    """torch's module of ``device``'s generators (``torch.cuda``, ``torch.xpu``, ``torch.mps``), or
    None: a CPU, or a device torch registers no such module for (XLA, HPU without theirs), whose
    draws the CPU's seed is all that is given."""
    if not isinstance(device, torch.device) or device.type in ("cpu", "meta"):
        return None
    try:
        module = torch.get_device_module(device.type)
    except RuntimeError:
        return None
    return module if all(hasattr(module, f) for f in ("get_rng_state", "set_rng_state", "manual_seed")) else None


def _item_seed(task, n) -> int:
    """The seed of every pass of item ``n`` of ``task`` (``_call``)."""
    return zlib.crc32(f"{task}/{n}".encode())


def _call_now(model, item, device):
    item = _to_device(item, device)
    if isinstance(item, Mapping):
        return model(**item)
    if isinstance(item, (tuple, list)):
        return model(*item)
    return model(item)


class _Stream:
    """Every calibration sample's input to the current block, as one model variant sees it."""

    def __init__(self, name, experts=False):
        self.name = name
        self.experts = experts  # task k's samples run through expert k's own weights
        self.hidden = {}  # task -> [hidden states]
        self.kwargs = {}  # task -> [kwargs of the current block]
        self.recorded = {}  # task -> [[kwargs of each block of the stack, as recorded]]
        self.masks = {}  # task -> [which positions are tokens (_token_positions), or None: all]
        self.finals = {}  # stack index -> task -> [output hidden states of the stack]


class _Walk:
    def __init__(self, model, stacks, renames, spec, method, targets, calibration,
                 experts, edits, report, *, anchor, weight_anchor, true_sequential, percdamp,
                 blocksize, backend, residual_precision, device=None, resume_dir=None, divisors=None):
        self.model, self.stacks, self.renames = model, stacks, renames
        self.divisors = divisors or {}  # (RWKV's weights divided for inference: _quant_linear)
        self.spec, self.method, self.targets = spec, method, targets
        self.calibration, self.experts = calibration, experts
        self.edits, self.report = edits, report
        self.anchor, self.weight_anchor = anchor, weight_anchor
        self.true_sequential = true_sequential
        self.solver = dict(percdamp=percdamp, blocksize=blocksize, backend=backend)
        # the model stays on its device; with ``device`` given, each block visits that one
        self.model_device = next(model.parameters()).device
        self.offload = device is not None
        self.device = torch.device(device) if self.offload else self.model_device
        # (every device the model's passes draw on: its own, and the one a block visits)
        self.seeded_devices = list(dict.fromkeys(_model_devices(model, self.model_device) + [self.device]))
        self._in_forward_order()
        # statistics in float64 on the CPU (cheap there), float32 on a GPU, as quant.epmq does
        self.stats_dtype = torch.float64 if self.device.type == "cpu" else torch.float32
        self.stats_backend = quant.resolve_backend(backend, self.device)
        self.residual_precision = residual_precision
        self.writes_input = False  # whether the current block writes its input in place
        self._solving = None  # (prefix, linears, leader) of the group whose statistics are held
        self._bar = None  # (run's: its postfix says which task's statistics or which solve a block is at)
        self._at_drawn = -math.inf  # (when _at last drew it)
        self.calls = {}  # per linear of the current block: its calls in one pass (the probes' most)
        # earlier stacks whose blocks the model calls among a later stack's (CoCa's decoder calls
        # a self-attention and a cross-attention block of two lists in turn): they run their own
        # (quantized) blocks when a later stack is entered, as a tower of another family does
        self.interleaved = set()
        self.q = _Stream("q")
        self.t = None if targets == "merged_path" else _Stream(targets, experts=targets == "expert_path")
        self._tensors_by_name()
        if experts:
            self._bind_experts()
        self._reads = None  # (task, name) -> fingerprint of each expert read, while a block is solved
        self._bases = None  # LoRA experts' base tensors, shared while a group's tasks are read
        self._base_prints = None  # (and their fingerprints, for the resume log)
        self._previous = ""  # the digest of the block walked last (``_block_digest``)
        self._ahead = ReadAhead(EXPERT_READ_AHEAD_BYTES)  # the experts' weights, read in the background
        self._outside_kept = {}  # task -> name -> its tensor outside the blocks, kept by _expert_outside
        self.expert_read_seconds = 0.0  # (QuantReport.expert_read_seconds)
        self._values_checked = set()  # (task, tensor name) of the expert reads checked for NaN
        self._placeholders = _Placeholders()  # expert tensors a pass of the expert stream holds empty
        self._outside_values = {}  # id of a tensor outside the blocks -> the expert's values it holds (_expert_outside)
        self._lazily = LAZY_EXPERT_BLOCKS  # (off for the rest of the walk once a block read ahead of its calls)
        self.log = None if resume_dir is None else BlockLog(resume_dir, self._identity(), left_out=report.skipped)

    def _in_forward_order(self) -> None:
        """The stacks in the order the model's forward reaches them, as the first calibration item
        runs (stopped at the last stack's first block): a model may register its language model
        before the tower it reads (Kosmos-2, Dots3, Hunyuan-VL), whose walk then calibrated the
        language model on the full-precision tower's features and quantized the tower after it.
        Each task's first item is run so: one that runs and misses stacks is refused, naming them all
        (``_never_reached``), before any block is quantized (a task's items are most often of one kind,
        text or text with images: another task's missing a tower was refused by the probes once the
        towers before it were quantized); one the model cannot run is refused there (``_reached``)."""
        if len(self.stacks) < 2:
            return
        every, order = range(len(self.stacks)), None
        for task, items in self.calibration.items():
            reached = self._reached(task, 0, items[0], every)
            if len(reached) < len(self.stacks):
                raise self._never_reached(task, 0, [s for s in every if s not in reached])
            if order is None:
                order = reached + [s for s in every if s not in reached]
        self.stacks = [self.stacks[s] for s in order]

    def _reached(self, task, n, item, candidates) -> list:
        """Which of the stacks ``candidates`` (indices) the model's forward of calibration[task] item
        ``n`` calls the first block of, in the order it calls them (the pass stopped once all are). An
        error of that pass is raised from it, as the probes would (``_cannot_run``): it was swallowed,
        for the probes to meet it again, but an error of this pass alone (memory, all the stacks in
        full precision) left the stacks in the modules' order, or had a model that ran whole in the
        probe refused as never reaching the stacks after the error."""
        reached = []
        if not candidates:
            return reached

        def first_call(s):
            def hook(module, args):
                if s not in reached:
                    reached.append(s)
                if len(reached) == len(candidates):
                    raise _Stop
            return hook

        hooks = [self.stacks[s].blocks[0].register_forward_pre_hook(first_call(s)) for s in candidates]
        try:
            _call(self.model, item, self.model_device, _item_seed(task, n), self.seeded_devices)
        except _Stop:
            pass
        except Exception as e:
            # (no stand-in runs here: a ValueError before any stack is the item's, as in the probes)
            # (an encoder-decoder's item giving its decoder no inputs fails past the encoder's stack: the item's)
            if not _out_of_memory(e) and (isinstance(e, _ITEMS_ERRORS) or isinstance(e, ValueError) and (
                    not reached or _decoder_inputs_hint(self.model, item, e))):
                raise self._cannot_run(task, n, item, e) from e
            e.add_note(f"(while the model's forward ran calibration[{task!r}] item {n} to find the order it "
                       f"reaches the stacks in)")
            raise
        finally:
            for hook in hooks:
                hook.remove()
        return reached

    def _cannot_run(self, task, n, item, e) -> ValueError:
        """The refusal of calibration[task] item ``n``, whose forward failed with ``e``, the item's fault."""
        return ValueError(f"calibration[{task!r}] item {n}: the model cannot run it ({_error_said(e)})"
                          f"{_meta_hint(self.model, e)}{_positional_hint(self.model, item)}"
                          f"{_decoder_inputs_hint(self.model, item, e)}")

    def _never_reached(self, task, n, missed) -> ValueError:
        """The refusal of calibration[task] item ``n``, which reaches none of the stacks ``missed``
        (indices): each named in one message (the Qwen2.5-Omni thinker's audio tower and vision
        tower, on text: one a run), with the ``layers=`` that leaves them all out of the user's
        (``_leaving_out``), and the ``adapter=`` that walks only the towers it reaches where no adapter
        walks both kinds."""
        stacks = [self.stacks[s] for s in missed]
        towers = ", nor those at ".join(f"{stack.prefix!r} ({stack.adapter.name})" for stack in stacks)
        prefixes = "|".join(re.escape(stack.prefix) for stack in stacks)
        reached = list(dict.fromkeys(stack.adapter for s, stack in enumerate(self.stacks) if s not in missed))
        chosen = ""
        if reached and not {stack.adapter for stack in stacks} & set(reached):
            names = [adapter_expression(a) for a in reached]
            chosen = (f", or walk the towers it reaches alone: adapter="
                      f"{names[0] if len(names) == 1 else '[' + ', '.join(names) + ']'}")
        return ValueError(f"calibration sample {n} of task {task!r} never reaches the blocks at {towers}: give "
                          f"inputs that run through them, or leave them out: "
                          f"{_leaving_out(prefixes, stacks[0].layers)}{chosen}")

    def ckpt(self, name: str) -> str:
        """A tensor's name in the experts' checkpoints (before ``adapter.prepare`` renamed it; a
        ``Transposed`` name where the checkpoint holds the transpose)."""
        return self.renames.get(name, name)

    def _ckpt_shape(self, name: str, shape) -> tuple:
        """The shape a model tensor has in the experts' checkpoints."""
        return tuple(reversed(shape)) if isinstance(self.ckpt(name), Transposed) else tuple(shape)

    def _held_as(self, source, key):
        """``key``, or, where ``source`` holds it neither under its name nor in the fused tensor,
        the ``Part`` of the tensor ``save_pretrained`` wrote holding it (``Part.saved``); where it
        holds the fused experts transposed (dims 1 and 2) and the model's loading transposes them
        (Qwen3-VL-MoE's hub checkpoints: ``gate_up_proj [E, H, 2I]``), its ``Part`` of that."""
        if not isinstance(key, Part) or source.key_for(key) is not None:
            return key
        if (key.saved is not None and source.key_for(key.fused) is None
                and source.key_for(key.saved.fused) is not None):
            return key.saved
        if key.index is not None and len(key.fused_shape) == 3 and source.key_for(key.fused) is not None:
            shape = (key.fused_shape[0], key.fused_shape[2], key.fused_shape[1])
            if (shape != key.fused_shape and tuple(source.shape(key.fused)) == shape
                    and self._loads_transposed(key.fused)):
                return Part(str(key), key.fused, key.index, key.rows, shape, not key.transposed, key.cols)
        return key

    def _loads_transposed(self, name: str) -> bool:
        """Whether the model's conversion mapping transposes its checkpoint tensor ``name``'s last two
        dims as it loads it (``checkpoint_io.loads_transposed``, found once per name)."""
        found = self.__dict__.setdefault("_transposed_on_load", {})
        if name not in found:
            if "_loads_transposed_rule" not in self.__dict__:
                self.__dict__["_loads_transposed_rule"] = loads_transposed(self.model)
            found[name] = self.__dict__["_loads_transposed_rule"](name)
        return found[name]

    @staticmethod
    def _fused_in(source, key) -> bool:
        """Whether ``source`` holds the ``Part`` ``key`` only as a slice of its fused tensor (an
        expert in memory, in transformers 5's fused layout; Llama 4's checkpoints, whose fused
        experts are transposed: ``Part.take`` reads them in the model's layout)."""
        return isinstance(key, Part) and source.key_for(key) is None

    def _read_expert(self, task, name: str, like: Optional[torch.Tensor] = None,
                     device=None, low_rank: bool = False):
        """Expert ``task``'s tensor for the model tensor ``name``, in the model's layout (``like``:
        to be put in place of the module's tensor ``like``, in its dtype and on its device, a copy
        of its own, as a forward may write it; ``device``: on that device, in its own dtype).
        ``low_rank``: as a ``LowRankExpert`` on ``device`` where E-PMQ reads it so (``_low_rank_of``:
        its residual then costs one product for all such experts)."""
        source = self.experts[task]
        key = self._held_as(source, self.ckpt(name))
        device = like.device if like is not None else device
        logged = self._reads is not None
        if low_rank:
            expert = self._low_rank_of(task, key, device)
            if expert is not None:
                if logged:  # (the resume log's digest: see _expert_print)
                    self._reads[(task, name)] = _low_rank_print(expert, self._base_prints)
                return expert
        # read on the CPU (by the read-ahead, where it planned this read), fingerprinted there for
        # the resume log, then moved and checked on the device
        t0 = time.perf_counter()
        tensor, printed = self._ahead.take((task, name), lambda: (self._fetch_expert(task, name), None))
        stored = tensor
        if logged and (task, name) not in self._reads:  # a block being solved for the resume log: its
            # digest's part (once: the expert path reads a block again for each group, the same bytes)
            self._reads[(task, name)] = printed or fingerprint(tensor)
        if device is not None:  # (from pinned memory, where read ahead for a GPU: no staging;
            # any other copy waits for its data, as a device-to-host copy must be read)
            tensor = tensor.to(device, non_blocking=device.type == "cuda" and tensor.is_pinned())
        if (task, name) not in self._values_checked:  # (the expert path reads a block again for
            # each group of its linears: the same bytes, each check a pass and a wait on a GPU)
            source.check_values(key.fused if self._fused_in(source, key) else key, tensor)
            self._values_checked.add((task, name))
        if like is not None:  # (a module's: a fresh read must not hold what a pass wrote into it)
            tensor = unshared(tensor.to(dtype=like.dtype).contiguous(), stored)
        self.expert_read_seconds += time.perf_counter() - t0
        return tensor

    def _fetch_expert(self, task, name: str, ahead: bool = False) -> torch.Tensor:
        """Expert ``task``'s tensor for the model tensor ``name`` as its checkpoint holds it, in
        the model's layout, its values unchecked. ``ahead`` (the read-ahead's reads): its bytes
        read here, not where the walk first touches them (a safetensors file's tensor is mapped,
        its pages read from disk on first touch): for a GPU walk by a copy to pinned memory (then
        copied to the device without staging), else by touching its pages."""
        source = self.experts[task]
        key = self._held_as(source, self.ckpt(name))
        fused = self._fused_in(source, key)  # (only this expert's rows of the fused tensor are read)
        tensor = source.fetch(key.fused, index=key.where) if fused else source.fetch(key)
        if ahead and tensor.device.type == "cpu":
            if self.device.type == "cuda":
                tensor = tensor.pin_memory()
            else:
                _touch_pages(tensor)
        if fused:
            tensor = key.take(tensor, read=True)
        return tensor.t() if isinstance(key, Transposed) else tensor

    def _fetch_ahead(self, task, name: str) -> tuple:
        """The read-ahead's read: ``_fetch_expert``'s tensor and, for the resume log, its
        fingerprint (a CRC over its bytes, taken in the background rather than by the walk), or None."""
        tensor = self._fetch_expert(task, name, ahead=True)
        return tensor, None if self.log is None else fingerprint(tensor)

    def _plan_reads(self, prefix, groups) -> None:
        """The read-ahead's plan for a block about to be solved: every expert weight its groups'
        statistics will read as dense tensors, in the order they will (group, task, linear)."""
        if self.method != "epmq" or self.targets == "expert_path":
            return  # (the expert path's targets run each expert's block, read whole)
        self._ahead.plan(((task, name), functools.partial(self._fetch_ahead, task, name))
                         for group in groups for task in self.calibration
                         if self.experts[task].reader.lora is None  # (a LoRA adapter: W_0 + U V)
                         for name in (f"{prefix}.{rel}.weight" for rel in group))

    # ----------------------------------------------------------------- resuming

    def _identity(self) -> dict:
        """What the walk's result depends on besides each block's weights (``BlockLog``)."""
        identity = dict(
            method=self.method, targets=self.targets, spec=self.spec.to_dict(),
            # (as numbers: anchor=1 and anchor=1.0 are one walk)
            anchor=float(self.anchor) if self.method == "epmq" else None,
            weight_anchor=float(self.weight_anchor) if self.method == "epmq" else None,
            true_sequential=bool(self.true_sequential), percdamp=float(self.solver["percdamp"]),
            blocksize=int(self.solver["blocksize"]),
            backend=quant.resolve_backend(self.solver["backend"], self.device),
            residual_precision=self.residual_precision, device=self.device.type,
            **arithmetic_identity(self.device, self.model_device, self.seeded_devices),
            adapter=self.report.adapter, share_input_statistics=SHARE_INPUT_STATISTICS,
            model=type(self.model).__qualname__, config=config_of(self.model),
            # what the config does not say: the modules' own settings (eps of norms outside the
            # blocks of models without a config, an attention's scaling), and the code that computes
            modules=hashlib.blake2b((repr(self.model) + _settings(self.model)).encode(), digest_size=16).hexdigest(),
            versions=_versions(), statistics=STATISTICS_RULES,
            # every buffer, the non-persistent ones too (rotary inv_freq: rope_theta)
            buffers=tensor_digest(self.model.named_buffers()),
            # (by index; by child name where the blocks have names of their own, as resume's messages name them)
            blocks=[[s.prefix, s.chosen if keys == [str(i) for i in range(len(keys))] else dict(zip(keys, s.chosen))]
                    for s in self.stacks for keys in [list(s.blocks._modules)]], tasks=list(self.calibration),
            calibration=data_digest(self.calibration),
            # the embeddings and other tensors outside the blocks shape every block's inputs
            outside=tensor_digest((names[0], t) for t, names in self.outside),
        )
        if self.targets == "expert_path":
            identity["experts_outside"] = {
                task: tensor_digest((names[0], self.experts[task].read(names[0])) for _, names in self.outside)
                for task in self.experts}
        return identity

    def _block_digest(self, own, prefix, rels, seen=None) -> str:
        """The weights block ``prefix`` is solved from: the merged block's (``own``: its float
        tensors' fingerprints and its description, from ``_own_prints``), and the experts' tensors
        the method reads there, read one at a time, or taken from ``seen`` (the fingerprints of
        the reads its solve made: a block solved now is not read twice); and the digest of the
        block before it (``self._previous``), whose output is its input: a block solved again from
        other weights makes every later record another walk's."""
        prints, text, expert_rels = own
        seen = seen or {}
        if self.experts and self.targets == "expert_path":
            rels = expert_rels
        else:
            rels = [f"{rel}.weight" for rel in rels]
        experts = ((f"{task}:{rel}", seen.get((task, f"{prefix}.{rel}"))
                    or self._expert_print(task, f"{prefix}.{rel}"))
                   for task in self.experts for rel in rels)
        return tensor_digest(itertools.chain(prints, experts), text=f"{text}\nafter {self._previous}")

    def _expert_print(self, task, name: str):
        """What a block's digest takes of expert ``task``'s tensor ``name``: the tensor as read
        (fingerprinted by ``tensor_digest``), or, where E-PMQ reads it as ``W_0 + U V`` (a LoRA
        adapter's layer on the merged path: its targets unrounded), the factors' fingerprints
        (an update below the dense tensor's rounding makes another walk)."""
        expert = self._low_rank_of(task, self.ckpt(name))
        return self._read_expert(task, name) if expert is None else _low_rank_print(expert)

    def _low_rank_of(self, task, key, device=None):
        """Expert ``task``'s tensor ``key`` (checkpoint name) as ``W_0 + U V`` where E-PMQ reads
        it so: merged-path targets, a LoRA adapter's plain 2-D layer (``ExpertWeights.low_rank``;
        the base's tensors shared while a group's tasks are read); else None."""
        if self.method != "epmq" or self.t is not None or isinstance(key, (Part, Transposed)):
            return None  # (Part and Transposed: str subclasses, names of a fused or [in, out] tensor)
        return self.experts[task].low_rank(key, device, self._bases)

    @staticmethod
    def _own_prints(block) -> tuple:
        """The merged block's part of its digest, taken before it is quantized: its float tensors'
        fingerprints, its description (``repr``: its modules' eps and shapes; ``_settings``: what
        ``repr`` does not show), and the names of the tensors an expert has there
        (``_expert_tensors``)."""
        return ([(rel, fingerprint(t)) for rel, t in block.state_dict().items() if t.is_floating_point()],
                repr(block) + _settings(block), [rel for rel, _ in _expert_tensors(block)])

    def _restore(self, record, prefix):
        """Swap in the layers of a block done before, and its report entries."""
        for rel, layer in record["layers"].items():
            replaced = self.edits.swap(f"{prefix}.{rel}", layer)
            if self.offload:
                replaced.to(self.model_device)
        self.report.layers += record["entries"]
        self.report.skipped += record["skipped"]
        self.report.unreached += record["unreached"]
        self.report.resumed.append(prefix)

    # ----------------------------------------------------------------- experts

    def _tensors_by_name(self):
        """Unique float tensors of the model with all their names; those outside walked blocks."""
        by_id = {}
        for name, tensor in self.model.state_dict(keep_vars=True).items():
            if tensor.is_floating_point():
                by_id.setdefault(id(tensor), (tensor, []))[1].append(self.ckpt(name))
        # each expert's tensor of one of several names (a head tied to the embeddings) is read
        # under the first: the input embeddings' name, where the model says which it is (the
        # head follows the blocks and shapes no target; a head registered before the embeddings
        # put an untied expert's trained head in the walk as its embeddings)
        fed = _input_embeddings(self.model)
        self._fed = None if fed is None else id(fed[1])
        if fed is not None and id(fed[1]) in by_id and self.ckpt(fed[0]) in by_id[id(fed[1])][1]:
            names = by_id[id(fed[1])][1]
            names.insert(0, names.pop(names.index(self.ckpt(fed[0]))))
        self.aliases = {n: [m for m in names if m != n] for _, names in by_id.values() for n in names}
        prefixes = tuple(f"{s.prefix}." for s in self.stacks)
        # (a layer an earlier call quantized is no expert's: the expert stream runs it as it is)
        packed = {id(t) for m in self.model.modules() if isinstance(m, QuantLinear)
                  for t in m.state_dict(keep_vars=True).values()}
        self.outside = [(t, names) for t, names in by_id.values()
                        if not names[0].startswith(prefixes) and id(t) not in packed]
        self.shapes = {names[0]: tuple(t.shape) for t, names in by_id.values()}

    def _bind_experts(self):
        self._apart = {}  # task -> name -> the model's shape of its tensors outside the blocks of other shapes
        needed = {}
        for stack in self.stacks:
            for i, block in enumerate(stack.blocks):
                prefix = stack.names[i]
                if self.targets == "expert_path":
                    for rel, t in _expert_tensors(block):
                        name = f"{prefix}.{rel}"
                        needed[self.ckpt(name)] = self._ckpt_shape(name, t.shape)
                else:
                    for rel in stack.chosen[i]:
                        name = f"{prefix}.{rel}.weight"
                        needed[self.ckpt(name)] = self._ckpt_shape(name, block.get_submodule(rel).weight.shape)
        if self.targets == "expert_path":
            needed.update({names[0]: tuple(t.shape) for t, names in self.outside})
        rename = key_renaming(self.model)
        ignored = ignored_on_load(self.model)
        for source in self.experts.values():
            source.bind(self.shapes, self.aliases, rename=rename)
            if self.targets == "expert_path":
                self._check_vocabulary(source)
            present = {}
            mapped = self._vocabulary_names if source.rows is not None else ()
            for key, shape in needed.items():
                key = self._held_as(source, key)
                if self._fused_in(source, key):
                    if source.key_for(key.fused) is None:  # (named as a checkpoint of one tensor per
                        # expert names it: an expert missing there, not the fused tensor it never held)
                        raise ValueError(f"the expert of task {source.task!r} ({source.description}) has no tensor "
                                         f"{str(key)!r}, nor {key.fused!r} holding it: it must be a checkpoint "
                                         f"of the merged model's architecture")
                    key, shape = key.fused, key.fused_shape
                if key in mapped:  # (its own rows, laid out by its row map as it is read)
                    shape = (source.shape(key)[0], *shape[1:])
                present[key] = shape
            self._join_saved(source, present)
            self._refuse_converted(source, present)
            if self.targets == "expert_path":  # (not refused here: where the expert stream runs them)
                self._apart[source.task] = {name: present.pop(name) for name in self._outside_apart(source, present)}
            source.check(present)
            if self.targets == "expert_path":
                if self._apart[source.task]:
                    self._warn_of_other_shapes_outside(source)
                self._check_held_apart(source)
                self._warn_of_extra_block_tensors(source, present)
            else:
                self._warn_of_other_shapes_outside(source)
            self._take_divided_as_held(source)
            # an expert of more blocks than the model (another configuration) has every tensor
            # the walk reads: what it has past the model's last block says so (unless the model's
            # own loading ignores it: DeepSeek-V3's multi-token prediction layer, saved as the
            # layer after the last)
            for stack in self.stacks:
                n = len(stack.blocks)
                rel = next((rel for rel in stack.blocks[0].state_dict()
                            if f"{stack.names[0]}.{rel}" not in self.renames), None)
                following = _following_name(stack.names[-1])
                past = None if rel is None or following is None else f"{following}.{rel}"
                key = None if past is None else source.key_for(past)
                if key is not None and not any(p.search(str(key)) or p.search(past) for p in ignored):
                    raise ValueError(f"the expert of task {source.task!r} ({source.description}) has more blocks at "
                                     f"{stack.prefix!r} than the merged model's {n}: it must be a checkpoint of "
                                     f"the merged model's architecture")
            self._check_expert_count(source)

    @staticmethod
    def _join_saved(source, present) -> None:
        """Where an expert directory holds a tensor the walk reads as parts of other tensors that
        the model's loading joins (OLMo-hybrid's linear_attn.conv1d, saved as q_conv1d, k_conv1d
        and v_conv1d), the expert reads it made of them (``ExpertWeights.join_saved``)."""
        missing = [key for key in present if type(key) is str and source.key_for(key) is None]
        if missing:
            source.join_saved(missing)

    def _refuse_converted(self, source, present) -> None:
        """A checkpoint holding a tensor the model's loading makes of another (Sarvam-MoE's q, k
        and v, split from its query_key_value) has no tensor of that name, though it is one of the
        model's architecture: refused naming the tensor that holds it."""
        missing = [key for key in present if isinstance(key, str) and source.key_for(key) is None]
        if not missing or source.reader.path is None:  # (a module or state dict holds the model's names)
            return
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter

            rules = [t for t in get_model_conversion_mapping(self.model) if isinstance(t, WeightConverter)]
        except Exception:  # (no transformers model, or a transformers without converters)
            return
        # each rule's source pattern the checkpoint holds, found in one pass over its keys (found
        # again for every missing tensor, 50k keys took 0.1 s a tensor: an expert lacking thousands, minutes)
        patterns = list(dict.fromkeys(p for rule in rules for p in rule.source_patterns))
        held = set()
        for k in source.keys():
            held.update(p for p in patterns if p not in held and re.search(p, k))
            if len(held) == len(patterns):
                break
        converted = []
        for key in missing:
            rule = next((rule for rule in rules if any(p in held for p in rule.source_patterns)
                         and any(re.search(p, key) for p in rule.target_patterns)), None)
            if rule is not None:
                converted.append((key, next(p for p in rule.source_patterns if p in held)))
        if converted:
            (key, pattern), more = converted[0], len(converted) - 1
            raise ValueError(
                f"the expert of task {source.task!r} ({source.description}) holds {key!r} inside its "
                f"{pattern.replace(chr(92), '')} tensors{f' (and {more} more tensors so)' if more else ''}, which "
                f"transformers converts as it loads the model; epmq reads a checkpoint tensor by tensor: give "
                f"this expert loaded (from_pretrained(...), or its state dict)")

    def _check_expert_count(self, source) -> None:
        """Refuse an expert of more routed experts per block than the model (another
        configuration): held one tensor per expert, as checkpoints hold them, it has every tensor
        the walk reads, and the extra ones would be ignored (fused, its shape says so already)."""
        for part in self.renames.values():
            if not isinstance(part, Part) or part.index != 0:
                continue
            experts = part.fused.rpartition(".")[0] + "."  # (``<experts>.``: a part is ``<experts>.<e>.<rest>``)
            if not str(part).startswith(f"{experts}0."):
                continue
            count = part.fused_shape[0]
            past = f"{experts}{count}.{str(part)[len(experts) + 2:]}"
            if source.key_for(part) is not None and source.key_for(past) is not None:
                raise ValueError(f"the expert of task {source.task!r} ({source.description}) has more routed experts "
                                 f"at {experts[:-1]!r} than the merged model's {count} (it holds {past!r}): it must "
                                 f"be a checkpoint of the merged model's architecture")

    def _take_divided_as_held(self, source) -> None:
        """An RWKV expert given as tensors (a state dict, a checkpoint) that were read after it ran in
        eval mode holds its weights divided for inference already, and nothing but their size says so:
        divided again, the merged model's layers were aimed at 1 / 2 ** k of them. Its most divided
        weight tells: an expert near the merged model is near its weight (as the walk divided it)
        read divided, or near 2 ** k times it read so, i.e. divided already."""
        held = {name: d for name, d in source.divisors.items() if source.key_for(self.ckpt(name)) is not None}
        if not held:  # (none the walk reads: layers= left them out, and the expert need not hold them)
            return
        name, divisor = max(held.items(), key=lambda item: item[1])
        read = source.fetch(self.ckpt(name)).double()
        merged = self.model.get_submodule(name.removesuffix(".weight")).weight.double()
        if float((read * divisor - merged).norm()) < float((read - merged).norm()):
            source.divisors = {}

    def _check_held_apart(self, source) -> None:
        """Refuse an expert that holds its own tensors under the names of one of the merged
        model's tensors outside the blocks (a trained head where the merged model's is tied to
        another tensor) where the model does not say which of them feeds the blocks: the expert
        path runs the expert with one tensor for all those names, read under the first, which
        may be one its blocks never see. (For the input embeddings, which ``get_input_embeddings``
        names, that name is read: the head follows the blocks.)"""
        for tensor, names in self.outside:
            if len(names) < 2 or id(tensor) == self._fed:
                continue
            first = source.key_for(names[0])
            apart = [n for n in names[1:] if source.key_for(n) not in (None, first)]
            if first is None or not apart:
                continue
            value = source.fetch(names[0])
            apart = [n for n in apart if not torch.equal(source.fetch(n), value)]
            if apart:
                raise ValueError(
                    f"the expert of task {source.task!r} ({source.description}) holds {apart[0]!r} apart from "
                    f"{names[0]!r}, which the merged model ties (one tensor): targets='expert_path' runs the "
                    f"expert with one tensor for both, and the model does not say which of them its blocks are "
                    f"fed (no get_input_embeddings naming it); untie the merged model (give {apart[0]!r} a "
                    f"parameter of its own), or use targets='merged_path'")

    def _warn_of_other_shapes_outside(self, source) -> None:
        """Warn where the expert's tensors outside the blocks have other shapes than the merged
        model's: the blocks' matrices alone can fit another configuration (a ViT-B/16 expert of a
        ViT-B/32 merge differs only in its patch and position embeddings), whose targets would be
        another model's. Not the token embeddings and an untied head, whose rows may differ (the
        experts' added tokens), nor tensors the expert lacks; a warning, not an error: a
        classification head of the expert's own classes differs too."""
        from .vocabulary import vocabulary_columns

        # (BART's, Marian's and Pegasus' final_logits_bias [1, vocabulary] is resized with the
        # embeddings: an expert with added tokens has its own columns)
        vocabulary = self._vocabulary_names | set(vocabulary_columns(self.model, [n[0] for _, n in self.outside]))
        other = []
        for tensor, names in self.outside:
            name = names[0]
            if name in vocabulary or source.key_for(name) is None:
                continue
            got = tuple(source.shape(name))
            if got != tuple(tensor.shape):
                other.append(f"{name} {got} for {tuple(tensor.shape)}")
        if other:
            more = f" and {len(other) - 3} more" if len(other) > 3 else ""
            warnings.warn(f"the expert of task {source.task!r} ({source.description}) has tensors outside the "
                          f"blocks of other shapes than the merged model's ({'; '.join(other[:3])}{more}): is it "
                          f"of the merged model's configuration? Its block weights are the targets", stacklevel=4)

    def _warn_of_extra_block_tensors(self, source, present) -> None:
        """Warn where the expert's blocks hold weights the merged model's lack (a Qwen2-style
        expert's q/k/v biases beside a bias-free merge): the expert path runs the merged
        model's blocks with the expert's weights, so those are left out of its targets. Only
        float tensors of more than one value count, less what transformers itself drops on load
        (old checkpoints' per-layer rotary inv_freq, position_ids, GPT-2's masked_bias): those are
        buffers, not weights."""
        used = {source.key_for(name) for name in present} | source.joined_keys()
        prefixes = set()
        for stack in self.stacks:
            for i, block in enumerate(stack.blocks):
                prefix = stack.names[i]
                rel = next((rel for rel, _ in _expert_tensors(block)), None)
                key = None if rel is None else source.key_for(self.ckpt(f"{prefix}.{rel}"))
                if isinstance(key, str) and key.endswith(rel):
                    prefixes.add(key[: len(key) - len(rel)])
                # (a layer an earlier call packed: its weight and bias are the expert's too)
                for name, m in block.named_modules():
                    if isinstance(m, QuantLinear):
                        used.update(source.key_for(self.ckpt(f"{prefix}.{name}.{kind}")) for kind in ("weight", "bias"))
        ignored = [*ignored_on_load(self.model), *(re.compile(p) for p in _IGNORED_ON_LOAD)]
        extra = [k for k in source.keys() if k not in used and k.startswith(tuple(prefixes))
                 and not any(p.search(k) for p in ignored) and source.reader.dtype(k).is_floating_point
                 and math.prod(source.reader.shape(k)) > 1]
        if extra:
            more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
            warnings.warn(f"the expert of task {source.task!r} ({source.description}) has tensors in its blocks "
                          f"that the merged model's blocks lack ({', '.join(extra[:3])}{more}): targets="
                          f"'expert_path' runs the merged model's blocks with the expert's weights, without "
                          f"them; is the expert of the merged model's architecture?", stacklevel=4)

    @cached_property
    def _vocabulary_names(self) -> frozenset:
        """The non-block tensors indexed by the vocabulary (token embeddings, an untied head);
        found once per walk (the expert path reads them for every block and task)."""
        from .vocabulary import vocabulary_names

        try:
            return frozenset(vocabulary_names(self.model, [names[0] for _, names in self.outside]))
        except ValueError:  # (no token embedding: a vision tower)
            return frozenset()

    def _check_vocabulary(self, source):
        """An expert whose token embeddings have other rows than the merged model's (experts with
        added tokens, merged with ``tokenizer_source``) runs on the merged model's token ids only
        through its row map (``experts.OnVocabulary``, which ``quantize_model`` builds from the
        tokenizers: ``experts.on_model_vocabulary``); without one it is refused."""
        for name in self._vocabulary_names:
            if source.key_for(name) is None:
                continue
            rows, merged = source.shape(name)[0], self.shapes[name][0]
            if source.rows is not None:
                if len(source.rows) != merged or int(source.rows.max()) >= rows:
                    raise ValueError(f"the expert of task {source.task!r}: its row map has {len(source.rows)} "
                                     f"rows up to {int(source.rows.max())}, for {merged} rows of the merged "
                                     f"model's {name} and {rows} of the expert's")
            elif rows != merged:
                raise ValueError(
                    f"the expert of task {source.task!r} ({source.description}) has {rows} token embeddings "
                    f"({name}), the merged model {merged}: their vocabularies differ (a merge with "
                    f"tokenizer_source over experts with added tokens?). targets='expert_path' runs each expert "
                    f"on the merged model's token ids, which needs one vocabulary or a map of its rows to the "
                    f"merged model's tokens: built from the tokenizers saved with the model (where its "
                    f"name_or_path points) and with the expert, or given as epmq.experts.OnVocabulary(expert, "
                    f"epmq.vocabulary.rows_by_token(...)); the default targets ('merged_path') read no "
                    f"embeddings")

    def _outside_apart(self, source, present) -> list:
        """The tensors outside the blocks that expert ``source`` holds in other shapes than the
        model's (``present``: the shapes it was checked for), weights and not a quantized
        checkpoint's: a classification head of the expert's own classes, which runs after the
        blocks and which no target reaches, or another configuration's (position embeddings of
        another image size), refused where a pass of its stream runs it (``_expert_outside``)."""
        return [name for name in (names[0] for _, names in self.outside)
                if name in present and source.key_for(name) is not None
                and tuple(source.shape(name)) != tuple(present[name])
                and source.reader.quantized_with_scales(source.key_for(name)) is None]

    @contextmanager
    def _expert_outside(self, task, keep=False):
        """Expert ``task``'s non-block tensors (embeddings, norms, ...) in place of the model's;
        those of other shapes than the model's (``_outside_apart``) held empty: a pass that uses
        one is refused, naming it (``_Placeholders``). ``keep``: what is read is kept for the task's
        next pass (within EXPERT_OUTSIDE_KEPT_BYTES, until ``_forget_outside``), unless the pass wrote
        one of them in place: a fresh read would not hold what it wrote."""
        saved, held = [], []
        source = self.experts[task]
        mapped = self._vocabulary_names if source.rows is not None else ()
        apart = self._apart.get(task, {})
        kept = self._outside_kept.get(task, {})
        read = {}
        try:
            for tensor, names in self.outside:
                saved.append((tensor, tensor.data))
                if names[0] in apart:
                    held.append(id(tensor))
                    self._placeholders.hold(
                        names[0], tensor, ExpertShapeError,
                        f"the expert of task {task!r} ({source.description}) holds {names[0]} of shape "
                        f"{tuple(source.shape(names[0]))}, the merged model's {tuple(apart[names[0]])}, and "
                        f"targets='expert_path' runs it in place of the model's, which its stream's passes use "
                        f"(before, between or as an argument of the blocks): experts must share the merged "
                        f"model's configuration (a tensor of another shape is left out only where its stream "
                        f"never runs it: a classification head of the expert's own classes, after the blocks)",
                        shape=source.shape(names[0]))
                    continue
                new = kept.get(names[0])
                if new is None:
                    new = source.read(names[0], like=tensor, own=names[0] not in mapped)
                    if names[0] in mapped:  # (the merged model's rows for the tokens the expert lacks)
                        rows = source.rows.to(tensor.device)
                        have = rows >= 0
                        laid_out = tensor.detach().clone()
                        laid_out[have] = new[rows[have]]
                        new = laid_out
                tensor.data = new
                self._outside_values[id(tensor)] = new
                read[names[0]] = new
            versions = [version(tensor) for tensor, _ in saved]  # (after the swaps, which count as writes)
            with self._placeholders if held else nullcontext():
                yield
            if None in versions or versions != [version(tensor) for tensor, _ in saved]:
                self._outside_kept.pop(task, None)  # (written in place, or an inference tensor: no count)
            elif keep and task not in self._outside_kept and sum(
                    t.numel() * t.element_size() for named in (*self._outside_kept.values(), read)
                    for t in named.values()) <= EXPERT_OUTSIDE_KEPT_BYTES:
                self._outside_kept[task] = read
        finally:
            self._outside_values = {}
            for i in held:
                self._placeholders.release(i)
            for tensor, data in reversed(saved):
                tensor.data = data

    def _expert_values(self, named) -> dict:
        """A block call's keyword arguments ``named`` with the model's tensors outside the blocks that
        it hands to the block as they are (in lists, tuples, dicts, named tuples too) replaced by the
        expert's values they hold in an expert stream's pass (``_expert_outside``): recorded as the
        tensors themselves, they held the merged model's values again when the stream's block passes
        ran. An argument holding none is kept as it is (the same object: ``_same_arguments``). One of
        another shape than the model's, held empty (``_expert_outside``), is refused: recorded, it held
        the merged model's values in those passes too, and only a use of it in this one was refused."""
        self._placeholders.refuse_in(named.values())

        def own(value):
            leaves, spec = tree_flatten(value)
            if not any(id(t) in self._outside_values for t in leaves if isinstance(t, torch.Tensor)):
                return value
            return tree_unflatten([self._outside_values.get(id(t), t) if isinstance(t, torch.Tensor) else t
                                   for t in leaves], spec)

        return {name: own(value) for name, value in named.items()} if self._outside_values else named

    def _forget_outside(self) -> None:
        """Let go of the experts' tensors ``_expert_outside`` kept."""
        self._outside_kept.clear()

    def _expert_block(self, template, prefix, task, lazily=False):
        """``template`` (a copy of the block) with every tensor read from expert ``task``;
        ``lazily``: each module's own tensors read as a pass calls it (or its weight is taken:
        ``_read_unread``), the others left unread, empty, so that a pass stopped at a group's
        linears reads none after them. (The pass refuses any use of an unread one, ``_Placeholders``:
        a block that uses a module's tensors before calling it is read whole, ``_capture_target``.) A
        block holding a TorchScript module is read whole: it takes no hooks to read on call."""
        lazily = lazily and self._lazily and not any(isinstance(m, torch.jit.ScriptModule) for m in template.modules())
        if getattr(template, "_epmq_expert", None) == task:  # (one expert: its block holds what the
            # passes of the groups before read of it, the rest unread)
            if not lazily:
                self._read_unread(self._placeholders.held_as(_Unread))
            return template
        for i in self._placeholders.held_as(_Unread):  # (the block before's, or another expert's)
            self._placeholders.release(i)
        for rel, tensor in _expert_tensors(template):
            if lazily:  # (a tensor of two names read under the last, as below)
                self._hold_unread(f"{prefix}.{rel}", tensor)
            else:
                tensor.data = self._read_expert(task, f"{prefix}.{rel}", like=tensor)
        template._epmq_expert = task
        if lazily and not getattr(template, "_epmq_reads_on_call", False):
            template._epmq_reads_on_call = True  # (the template is the block's: hooked once)
            for module in template.modules():
                own = [id(t) for t in itertools.chain(module._parameters.values(), module._buffers.values())
                       if t is not None]
                if own:
                    module.register_forward_pre_hook(lambda m, args, own=own: self._read_unread(own))
        self._unread_task = task
        return template

    def _hold_unread(self, name, tensor) -> None:
        self._placeholders.hold(name, tensor, _Unread, f"{name} used before its module was called")

    def _read_unread(self, ids) -> None:
        """The target block's tensors ``ids`` (those a lazy ``_expert_block`` left unread) read."""
        for i in ids:
            if i in self._placeholders.held:  # (left unread where the read fails: read again, failing as it did)
                name, tensor = self._placeholders.release(i)  # (before it is read: its use is refused)
                try:
                    tensor.data = self._read_expert(self._unread_task, name, like=tensor)
                except BaseException:
                    self._hold_unread(name, tensor)
                    raise

    def _capture_target(self, target, *args, **kwargs):
        """``_capture`` of the target block; one lazily read that fails with tensors unread (a block
        that uses a module's tensors before calling it: nn.MultiheadAttention's out_proj, or an
        expert tensor the walk refuses, whose read fails again here) is read whole and run again,
        and the rest of the walk reads expert blocks whole."""
        try:
            with self._placeholders if self._placeholders.held else nullcontext():
                return self._capture(target, *args, **kwargs)
        except Exception as e:
            if _out_of_memory(e) or not self._placeholders.held_as(_Unread):
                raise
        self._lazily = False
        self._read_unread(self._placeholders.held_as(_Unread))
        return self._capture(target, *args, **kwargs)

    # ----------------------------------------------------------------- stack entry

    def _enter(self, s, stream):
        """Record stack ``s``'s input and per-block kwargs for every sample into ``stream``."""
        stack = self.stacks[s]
        last = len(stack.blocks) - 1
        now = {}

        def recorder(j, block):
            def fn(*args, **kwargs):
                if j == 0 and not now["past"]:
                    _refuse_filled_cache(stack, block, args, kwargs, now["task"], now["n"])
                hidden, named = _bind(block, args, kwargs)
                if j == 0 and not now["past"] and (isinstance(hidden, str) or _texts(hidden)):
                    # (a forward that does not tokenize the item's text: the walk's own error deep inside, or
                    # 'must be Tensor, not str' as blocks the walk cannot quantize one by one)
                    raise ValueError(f"calibration[{now['task']!r}] item {now['n']}: the model's forward hands its "
                                     f"text on to the blocks at {stack.prefix!r}, which read tensors: tokenize it "
                                     f"first (its tokenizer's token ids, not strings)")
                named = self._expert_values(named)
                if now["past"]:  # (called again after the last block: weights shared across depth)
                    if not now["watch"]:  # (an item followed past them: counted from here, as a watched one)
                        now["peek"].remove()
                        now.update(watch=True, again={})
                    now["again"][j] = now["again"].get(j, 1) + 1
                    now["chain"] &= _chained(hidden, now["passed"]) and _same_arguments(named, now["kwargs"][j])
                    # (the block itself: how often the model calls it may depend on what it returns)
                    with _running(stack.names[j], now["task"], now["n"],
                                  "the model's own forward calling it again after the last block"):
                        output = block(*args, **kwargs)
                    if stack.adapter.runs_blocks:  # (what a block changes is its own)
                        now["left"] = _left_by_blocks(now["left"])
                    passed = stack.adapter.hidden_of(output)
                    now["passed"] = passed, version(passed) if isinstance(passed, torch.Tensor) else None
                    return output
                if j != now["next"]:
                    raise ValueError(
                        f"the blocks at {stack.prefix!r} ({stack.adapter.name}) are not called once each in "
                        f"their order: block {j} is called where block {now['next']} is next (a model that "
                        f"skips, repeats or reorders its blocks cannot be quantized block by block)")
                now["next"] = j + 1
                _check_left(stack, now["left"], now["task"], now["n"])
                if j and not stack.adapter.runs_blocks and now["called"] is not None:
                    # (WavLM's encoder unpacks (hidden, position bias): a stand-in's tensor of a batch of 2
                    # unpacked into its rows, the second handed on as the bias, the walk's error torch's at
                    # a later block, bare)
                    cut = [name for name, value in named.items() if _cut_from(value, now["output"])]
                    if cut:
                        _refuse_stand_in(stack, now["called"], None, taken=f"block {j}'s {', '.join(cut)}")
                now["called"] = j, block, hidden, named
                now["kwargs"][j] = named
                # (None: an inference tensor keeps no count)
                now["versions"][j] = _versions_of(named, version, _kept_depth(stack))
                if j == 0:  # (a copy: the model may write it in place before the pass stops)
                    now["hidden"] = hidden.clone() if isinstance(hidden, torch.Tensor) else hidden
                    # (the checks of what a block's call or a later block changes in its arguments: each calls
                    # every block so handed once more, so on the items _longer_than_checked picks alone)
                    grown = _longer_than_checked(tuple(getattr(hidden, "shape", ())), now["probed"].get(now["task"]))
                    now["probing"] = stream is self.q and grown is not None
                    if now["probing"]:
                        now["probed"][now["task"]] = grown
                else:
                    if not _chained(hidden, now["passed"]):
                        stack.replay = True
                    if stack.adapter.runs_blocks and isinstance(now["output"], (tuple, list)):
                        handed = {name: k for name, value in named.items() if isinstance(value, torch.Tensor)
                                  for k, given in enumerate(now["output"]) if value is given}
                        if handed:
                            stack.handoff[j] = handed
                # (the last one runs too: what its stand-in returns later is learnt from it)
                if stack.adapter.runs_blocks:
                    ran = now.setdefault("ran", {})
                    # (as the walk's probe of a block it runs: what its call changes in an object only
                    # the model's call of it sees unchanged, _check_replayable's would not)
                    probing = now["probing"]
                    given = _versions_of(named) if probing else None
                    unwritten = hidden.clone() if probing and isinstance(hidden, torch.Tensor) else hidden
                    with _running(stack.names[j], now["task"], now["n"], "the model's own forward calling it"):
                        output = _run_block(stack, j, block, hidden, named, ran.get(j))
                    ran.setdefault(j, f"calibration[{now['task']!r}] item {now['n']}")
                    changed = _changed_arguments(given, named) if probing else []
                    if changed:
                        with _running(stack.names[j], now["task"], now["n"], "called again to see whether it "
                                                                             "changes its arguments"):
                            _check_called_again(stack, j, block, now["task"], now["n"], unwritten, named, changed[0],
                                                stack.adapter.hidden_of(output))
                    if probing and any(_holds_objects(v) for v in named.values()):
                        now["handed"][j] = (block, _check_input_copy(now, j, unwritten), named,
                                            _versions_of(named), _check_copy(now, stack.adapter.hidden_of(output)))
                    if probing and j == last:
                        _check_read_before_changed(stack, now["task"], now["n"], now["handed"])
                        now.update(handed={}, handed_bytes=0)  # (the model's forward goes on: the copies let go)
                else:
                    output = stack.adapter.passthrough_of(block, hidden)
                if stack.adapter.runs_blocks:  # (its arguments as the block left them: _kept_depth)
                    now["left"] = _left_by_blocks(now["left"], j, named)
                if j == last and not now["watch"]:
                    if stream is not self.q:
                        raise _Stop
                    # (an item its task's first did not make repeat the blocks may: xLSTM's forward runs an
                    # input past max_inference_chunksize a chunk at a time through every block, whose later
                    # chunks went unseen. The model's forward is followed to its next module call alone.)
                    now["peek"] = nn.modules.module.register_module_forward_pre_hook(_next_call_of(stack.blocks))
                # (with its version: a write between the blocks is a change too)
                passed = stack.adapter.hidden_of(output)
                now["passed"] = passed, version(passed) if isinstance(passed, torch.Tensor) else None
                now["output"] = output
                if j == last:  # (this pass goes on, to see whether the blocks are called again)
                    now.update(past=True, chain=True)
                return output

            return fn

        while True:
            for key in ("again", "repeats", "looping"):
                now.pop(key, None)
            now["probed"] = {}  # task -> the largest size along each dimension of the items checked
            try:
                self._probe(s, stream, now, recorder)
                if stack.replay and stack.prefix not in self.report.replayed:
                    self.report.replayed.append(stack.prefix)
                if "repeats" in now:
                    self._note_repeats(s, *now["repeats"][2:])
                return
            except _Interleaved as e:
                if self.t is not None:
                    raise ValueError(
                        f"targets={self.targets!r}: the model calls the blocks at {self.stacks[e.t].prefix!r} among "
                        f"those at {stack.prefix!r} (CoCa's decoder), which the target stream cannot replay; use "
                        f"targets='merged_path', or leave them out (layers=)") from None
                self.interleaved.add(e.t)

    def _note_repeats(self, s, again, chain) -> None:
        """Blocks of stack ``s`` called again after its last one (in the watched passes,
        ``again``: block -> its calls) are kept in the report. The one block of a stack called in
        a row, each call on the previous one's output with the same other arguments (``chain``),
        is solved on the inputs of every call (``_Stack.loops``); a stack of several run so as a
        group, on its first round's (``_Stack.rounds``); other blocks on their first call's:
        said."""
        stack = self.stacks[s]
        if not again:
            return
        calls = {stack.names[j]: n for j, n in sorted(again.items())}
        self.report.repeated.update(calls)
        if chain and len(stack.blocks) == 1:
            stack.loops = again[0]
            return
        name, n = next(iter(calls.items()))
        rounds = set(again.values())
        if chain and set(again) == set(range(len(stack.blocks))) and len(rounds) == 1:
            if self.t is not None:
                raise ValueError(f"targets={self.targets!r}: the model runs the blocks at {stack.prefix!r} as a group "
                                 f"{n} times in a row (weights shared across depth), which the target stream "
                                 f"cannot replay; use targets='merged_path'")
            stack.rounds = n
            warnings.warn(
                f"the model runs the blocks at {stack.prefix!r} as a group {n} times in a row, each round on the last "
                f"one's output (weights shared across depth, as ALBERT's with several layers a group): their "
                f"linears are solved on the inputs of the first round only; what the stacks after them get has "
                f"been through every round of the quantized blocks (epmq_report.repeated)")
            return
        warnings.warn(
            f"the model calls the blocks at {stack.prefix!r} again after the last one ({name}: {n} calls in one "
            f"forward pass; weights shared across depth, as ALBERT's): their linears are solved on the inputs of "
            f"each block's first call only, and every call runs the quantized weights (epmq_report.repeated)")

    def _count_repeats(self, stack, now, task, n) -> None:
        """After a watched pass: how often it called each block again, the same in every watched
        pass (else a ValueError: a count that depends on the input cannot be solved for)."""
        seen = (task, n, dict(now["again"]), bool(now.get("chain")))
        first = now.setdefault("repeats", seen)
        if seen[2] != first[2]:
            def said(counts):
                return ", ".join(f"block {j}: {c} calls" for j, c in sorted(counts.items())) or "each block once"

            raise ValueError(
                f"the model calls the blocks at {stack.prefix!r} a number of times that depends on its input "
                f"(calibration[{first[0]!r}] item {first[1]}: {said(first[2])}; calibration[{task!r}] item {n}: "
                f"{said(seen[2])}), which the walk cannot solve block by block; leave them out: "
                f"{stack.left_out()}")
        now["repeats"] = first[:3] + (first[3] and seen[3],)
        now["looping"] = bool(first[2])

    def _probe(self, s, stream, now, recorder):
        """One pass of the model per calibration item up to stack ``s``, its blocks ``recorder``s."""
        stack, last = self.stacks[s], len(self.stacks[s].blocks) - 1
        with self._stand_ins(s, stream, now, recorder):
            for task, items in self.calibration.items():
                with self._expert_outside(task) if stream.experts else nullcontext():
                    hidden, recorded, masks = [], [], []
                    for n, item in enumerate(items):
                        # (the quantized stream's first pass of each task, and every pass once a block
                        # was called again, goes on past the last block: the calls after it are counted;
                        # its other passes up to the model's next module call, counted if that is a block)
                        watch = stream is self.q and (n == 0 or bool(now.get("looping")))
                        now.update(task=task, n=n, kwargs=[None] * (last + 1), versions=[None] * (last + 1),
                                   hidden=None, next=0, started=False, watch=watch, past=False, called=None,
                                   left={}, raised=None, handed={}, handed_bytes=0, peek=None, probing=False)
                        if watch:
                            now["again"] = {}
                        try:
                            _call(self.model, item, self.model_device, _item_seed(task, n), self.seeded_devices)
                        except _Stop:
                            pass
                        except (StandInError, ExpertShapeError):
                            raise
                        except Exception as e:
                            if _out_of_memory(e):
                                raise
                            if not now["past"] and now["called"] is not None and not stack.adapter.runs_blocks:
                                _refuse_stand_in(stack, now["called"], e)
                            if now["past"]:  # (what runs after the stack only had to call it or not)
                                pass
                            elif isinstance(e, _ITEMS_ERRORS) or isinstance(e, ValueError) and not now["started"]:
                                # (token ids past the vocabulary, float ids, other widths or dtypes,
                                # a misspelt input's name before any block: the model's own error,
                                # named as the calibration's; a block's ValueErrors are epmq's own)
                                raise self._cannot_run(task, n, item, e) from e
                            else:
                                if e is not now["raised"]:  # (the model's own code between the blocks)
                                    where = (f"after block {stack.names[now['called'][0]]!r}" if now["called"]
                                             else f"before the blocks at {stack.prefix!r}")
                                    e.add_note(f"(while the model's own forward ran calibration[{task!r}] item {n}, "
                                               f"{where})")
                                raise
                        else:
                            if not now["past"]:  # (the model ran whole: which later stacks did it reach?)
                                later = range(s + 1, len(self.stacks))
                                reached = self._reached(task, n, item, later)
                                raise self._never_reached(task, n, [s] + [t for t in later if t not in reached])
                        finally:
                            if now["peek"] is not None:
                                now["peek"].remove()
                        _check_kept(stack, now, task, n)
                        if now["watch"]:
                            self._count_repeats(stack, now, task, n)
                        hidden.append(self._here(now["hidden"]))
                        recorded.append(self._here(now["kwargs"]))
                        masks.append(_token_positions(stack.adapter.token_mask(self.model, stack.prefix, item),
                                                      self.device))
                stream.hidden[task] = hidden
                stream.recorded[task] = recorded
                stream.masks[task] = masks
                stream.kwargs[task] = [r[0] for r in recorded]
            _check_hidden(stack, stream.hidden)

    @contextmanager
    def _stand_ins(self, s, stream, now, stand_in):
        """The model with stack ``s``'s blocks replaced by ``stand_in(j, block)`` (a function
        called as the block would be) and the earlier stacks of its family by replayers of
        ``stream``'s recorded outputs (``now``: the task and item being run), for one pass of
        the model up to stack ``s``."""
        stack = self.stacks[s]

        def mine(j, block):
            fn = stand_in(j, block)

            def started(*args, **kwargs):
                now["started"] = True
                try:
                    return fn(*args, **kwargs)
                except _UNNOTED:
                    raise
                except Exception as error:  # (a block's, noted by _running, or the walk's own refusal)
                    now["raised"] = error
                    raise

            return started

        def replayer(t, j, block):
            final = j == len(self.stacks[t].blocks) - 1

            def fn(*args, **kwargs):
                if now.get("started"):
                    raise _Interleaved(t)
                if final:
                    hidden = _to_device(stream.finals[t][now["task"]][now["n"]], self.model_device)
                else:
                    hidden = _bind(block, args, kwargs)[0]
                return self.stacks[t].adapter.passthrough_of(block, hidden)

            return fn

        originals = []
        try:
            for t in range(s + 1):
                # a tower of another family runs its own (quantized) blocks: the next may read any
                # of their outputs (LLaVA's image features are the vision tower's hidden states)
                if t < s and (not _one_family(self.stacks[t], stack, stream is self.q) or t in self.interleaved):
                    continue
                blocks = self.stacks[t].blocks
                for j, block in enumerate(blocks):
                    originals.append((blocks, j, block))
                    blocks[j] = _StandIn(block, mine(j, block) if t == s else replayer(t, j, block))
            # (the model's output capture is set up again by each entry, on the blocks it runs)
            self.edits.forget_output_capture()
            yield
        finally:
            for blocks, j, block in reversed(originals):
                blocks[j] = block
            self.edits.forget_output_capture()

    def _replay_next(self, s, i, stream, outputs):
        """Block ``i + 1``'s input for every item of ``stream``, in a stack whose model changes
        the hidden states between blocks: the model run with block ``i`` returning its output
        ``outputs[task][n]`` (as the block returned it) and block ``i + 1`` recording what it
        gets. The blocks before ``i`` hand their input on (block ``i`` ignores it); what runs
        between them and around the stack is the model's own (an expert stream's with its
        expert's tensors)."""
        stack = self.stacks[s]
        now = {}

        def stand_in(j, block):
            def fn(*args, **kwargs):
                if j == i + 1:
                    hidden = _bind(block, args, kwargs)[0]
                    now["hidden"] = hidden.clone() if isinstance(hidden, torch.Tensor) else hidden
                    raise _Stop
                if j == i:
                    return now["out"]
                return stack.adapter.passthrough_of(block, _bind(block, args, kwargs)[0])

            return fn

        with self._stand_ins(s, stream, now, stand_in):
            for task, items in self.calibration.items():
                with self._expert_outside(task, keep=True) if stream.experts else nullcontext():
                    for n, item in enumerate(items):
                        now.update(task=task, n=n, out=_to_device(outputs[task][n], self.model_device),
                                   started=False)
                        try:
                            # (the model's own code between the blocks: its error said nothing of where in the
                            # walk it came, as the walk's others do)
                            with _running(stack.names[i], task, n, f"the model's own forward replayed on its "
                                                                   f"output, up to block {i + 1}'s input"):
                                _call(self.model, item, self.model_device, _item_seed(task, n), self.seeded_devices)
                        except _Stop:
                            stream.hidden[task][n] = self._here(now["hidden"])
                        else:  # (the entry reached block i + 1 with this item)
                            raise RuntimeError(f"calibration[{task!r}] item {n} no longer reaches block {i + 1} "
                                               f"of {stack.prefix!r}")

    def _here(self, item):
        """``item`` (tensors, nested in dicts, lists, tuples) on the device blocks run on."""
        return _to_device(item, self.device) if self.offload else item

    @staticmethod
    def _advance(stream, stack, task, n, i, output):
        """The block's output becomes the next block's input."""
        stream.hidden[task][n] = stack.adapter.hidden_of(output)
        recorded = stream.recorded[task][n]
        if i + 1 < len(recorded):
            kwargs = stack.adapter.next_kwargs(recorded[i + 1], output)
            handed = stack.handoff.get(i + 1, {})
            stream.kwargs[task][n] = dict(kwargs, **{name: output[k] for name, k in handed.items()})

    # ----------------------------------------------------------------- the walk

    def run(self, progress):
        from tqdm.auto import tqdm

        total = sum(len(s.blocks) for s in self.stacks)
        label = self.method if self.t is None else f"{self.method} ({self.targets})"
        where = None  # (stack, block) being walked, block None while entering the stack: for _memory_note
        try:
            with tqdm(total=total, desc=label, unit="block", disable=not progress) as bar:
                self._bar = bar
                for s, stack in enumerate(self.stacks):
                    where = s, None
                    for stream in filter(None, (self.q, self.t)):
                        self._enter(s, stream)
                    for i, block in enumerate(stack.blocks):
                        where = s, i
                        bar.set_postfix_str(stack.names[i])
                        self._block(s, i, block)
                        bar.set_postfix_str(stack.names[i], refresh=False)  # (done: not its last linear's solve)
                        bar.update()
                    where = None  # (later rounds of its blocks: not said, each block's share is not told)
                    self._forget_outside()
                    for stream in filter(None, (self.q, self.t)):
                        # (read by a later stack of its family alone, whose replayers return them, and by
                        # the rounds: a tower of another family is run by the model, and its outputs for
                        # every item were held on the walk's device through the rest of the walk)
                        if stack.rounds > 1 or any(_one_family(stack, later, stream is self.q)
                                                   for later in self.stacks[s + 1:]):
                            stream.finals[s] = {task: list(h) for task, h in stream.hidden.items()}
                    if stack.rounds > 1:
                        self._more_rounds(s)
        except RuntimeError as error:
            # (torch's message names one allocation: not what filled the device, nor what shrinks it)
            note = None if where is None or not _out_of_memory(error) else self._memory_note(*where)
            if note is not None:
                error.add_note(note)
            raise

    def _at(self, where: str) -> None:
        """Say on the walk's bar what the block is at, drawn at most once per the bar's
        ``mininterval`` as its updates are (a log file of a long walk is not a line per task and
        linear); nothing where it is off."""
        bar = self._bar
        if bar is None or bar.disable:
            return
        now = time.monotonic()
        drawn = now - self._at_drawn >= bar.mininterval
        bar.set_postfix_str(where, refresh=drawn)
        if drawn:
            self._at_drawn = now

    def _memory_note(self, s, i) -> Optional[str]:
        """What the walk held on its device when it ran out of memory in stack ``s``'s block ``i``
        (None: entering the stack), each part with the setting that shrinks it; None where it
        cannot be told (the note must not replace the error it explains)."""
        try:
            stack, device = self.stacks[s], self.device
            streams = [stream for stream in (self.q, self.t) if stream is not None]
            items = sum(len(items) for items in self.calibration.values())
            inputs = _held_bytes([[st.hidden, st.kwargs, st.recorded, st.finals] for st in streams], device)
            held = [f"{_gib(inputs)} of the calibration's hidden states and block arguments ({items} item(s) of "
                    f"{len(self.calibration)} task(s)"
                    + (f", twice: the {self.t.name} targets' too" if self.t is not None else "")
                    + "), which fewer or shorter calibration items shrink (epmq quantize: samples, seq_len; "
                      "smaller batches, batch_size, lower a block pass's own peak)"]
            if self.offload and i is not None:  # (the block, back off the device by now, was there)
                held.append(f"{_gib(_held_bytes([list(stack.blocks[i].state_dict().values())]))} of the block's "
                            f"weights")
            elif not self.offload:
                weights = _held_bytes([list(self.model.state_dict(keep_vars=True).values())], device)
                held.append(f"{_gib(weights)} of the model's weights, which the model kept in CPU memory and "
                            f"quantize_model's device={device.type!r} bring to one block at a time (epmq quantize "
                            f"does so)" if device.type != "cpu" else f"{_gib(weights)} of the model's weights")
            if self._solving is not None:
                prefix, linears, leader = self._solving
                size = sum(self._stats_bytes(linear, leader[rel] == rel, f"{prefix}.{rel}.weight")
                           for rel, linear in linears.items())
                names = ", ".join(list(linears)[:3]) + (", ..." if len(linears) > 3 else "")
                if not self.true_sequential:
                    fewer = ", which true_sequential=True holds one dependency group at a time"
                elif stack.loops == 1 and len(set(leader[rel] for rel in linears)) > 1:  # (_chunked's cuts)
                    fewer = (f", which a smaller epmq.walker.EXPERT_STATISTICS_BYTES (now "
                             f"{_gib(EXPERT_STATISTICS_BYTES)}) cuts into chunks of linears, solved one after another")
                else:
                    fewer = ""
                held.append(f"{_gib(size)} of the statistics of the {len(linears)} linear(s) being solved "
                            f"({names}; in {str(self.stats_dtype).removeprefix('torch.')}, growing with their widths, "
                            f"not with the calibration){fewer}")
            block = f"block {stack.names[i]!r}" if i is not None else f"the model's forward up to {stack.prefix!r}"
            return (f"(out of memory on {device} in {block}, the walk holding there " + "; ".join(held)
                    + ("; or quantize on the CPU, in its memory (slower): quantize_model's device='cpu', "
                       "epmq quantize's default" if device.type != "cpu" else "")
                    # (the blocks kept are refused by a walk of other calibration, options or hardware)
                    + (". Other calibration, options or devices change the walk's result: a resume_dir's blocks "
                       "done are then another walk's, refused" if self.log is not None else "") + ")")
        except Exception:
            return None

    def _more_rounds(self, s):
        """What a group run in rounds hands on (``_Stack.rounds``; the target streams were
        refused): its first round's output run through the rest of the rounds of its quantized
        blocks. (A replayer returns it at each round's last block: the rounds chain, nothing
        runs between them.)"""
        stack, finals = self.stacks[s], self.q.finals[s]
        for _ in range(stack.rounds - 1):
            for j, block in enumerate(stack.blocks):
                with self._visiting(block):
                    for task, hidden in finals.items():
                        for n in range(len(hidden)):
                            with _running(stack.names[j], task, n, "a later round of the blocks"):
                                out = block(hidden[n], **self.q.recorded[task][n][j])
                            hidden[n] = stack.adapter.hidden_of(out)

    @contextmanager
    def _visiting(self, block):
        """``block`` on the device blocks run on, back in CPU memory after (when offloading)."""
        if not self.offload:
            yield
            return
        block.to(self.device)
        try:
            yield
        finally:
            block.to(self.model_device)

    def _block(self, s, i, block):
        with self._visiting(block):
            try:
                self._quantize_block(s, i, block)
            finally:  # (the layers _solve_group held dequantized for the block's later passes)
                for module in block.modules():
                    if isinstance(module, QuantLinear):
                        module._hold_dequantized(False)

    def _quantize_block(self, s, i, block):
        stack = self.stacks[s]
        prefix = stack.names[i]
        # the full-precision merged block: the fp path's block, the expert path's template
        template = copy.deepcopy(block) if self.t is not None else None
        t_out = None
        self.calls = {}  # (set by _groups; a block restored from the log, or of no linear, has none)
        self._captured = {}  # (task, item) -> linear -> the calls whose inputs its statistics took
        own = None if self.log is None else self._own_prints(block)
        record = None
        if self.log is not None and self.log.has(prefix):
            digest = self._block_digest(own, prefix, stack.chosen[i])
            record = self.log.load(prefix, digest, self.device)
        if record is not None:
            self._restore(record, prefix)
            self._previous = digest
        else:
            seen = len(self.report.layers), len(self.report.skipped), len(self.report.unreached)
            self._reads = None if self.log is None else {}
            groups, leader = (self._groups(block, prefix, stack.chosen[i], stack.adapter, first=i == 0)
                              if stack.chosen[i] else ([], {}))
            if stack.chosen[i]:  # (a block not probed is called once per item: what the model does)
                _check_replayable(stack, i, block, self.probed, self.q)
                # (its output held on to the next probe: a vision tower's last, through the language model's)
                self.probed = None
            groups = self._chunked(block, prefix, groups, leader, stack.loops)
            self._plan_reads(prefix, groups)
            t_out = {} if self.t is not None and groups else None
            # (the expert path's targets do not change as the groups are solved: their inputs, taken
            # by the first group's passes to the block's end, EXPERT_TARGET_INPUTS_KEPT_BYTES)
            keep = self.targets == "expert_path" and stack.loops == 1 and len(groups) > 1
            kept = {}  # (task, item) -> the later groups' linears -> their target inputs
            for g, group in enumerate(groups):
                self._solve_group(stack, block, template, prefix, group, leader, t_out, kept,
                                  full_target=g == len(groups) - 1, later=groups[1:] if keep and g == 0 else None)
            if self.log is not None:
                digest = self._block_digest(own, prefix, stack.chosen[i], self._reads)
                self._previous = digest
                self._reads = None
                self.log.save(prefix, digest, {rel: block.get_submodule(rel) for group in groups for rel in group},
                              entries=self.report.layers[seen[0]:], skipped=self.report.skipped[seen[1]:],
                              unreached=self.report.unreached[seen[2]:])
        replay = stack.replay and i + 1 < len(stack.blocks)
        if self.t is not None:
            if t_out is None:  # no group ran the target blocks to the end
                t_out = self._run_targets(stack, template, prefix)
            for (task, n), out in t_out.items():
                self._advance(self.t, stack, task, n, i, out)
            if replay:
                self._replay_next(s, i, self.t, {task: [t_out[task, n] for n in range(len(hidden))]
                                                 for task, hidden in self.t.hidden.items()})
        outputs = {}
        counts = {}  # (calls of each linear in this pass: a block whose calls depend on its data)

        def count(rel):
            return lambda module, args: counts.__setitem__(rel, counts.get(rel, 0) + 1)

        watched = {rel for taken in self._captured.values() for rel in taken}
        # (learnt from each task's item 0 alone, _groups: one first called on a later item was left in
        # full precision, said to be never called)
        unprobed = [rel for rel in stack.chosen[i] if not isinstance(block.get_submodule(rel), QuantLinear)]
        counted = [block.get_submodule(rel).register_forward_pre_hook(count(rel))
                   for rel in watched.union(unprobed)]
        more, late = None, {}  # late: an unprobed linear -> the first (task, item) that called it
        try:
            for task, hidden in self.q.hidden.items():
                for n in range(len(hidden)):
                    counts.clear()
                    with _running(prefix, task, n, "the pass after its linears were quantized"):
                        out = _looped(stack, block, hidden[n], self.q.kwargs[task][n])
                    taken = self._captured.get((task, n), {})
                    more = more or next(((task, n, rel, k, taken[rel]) for rel, k in counts.items()
                                         if rel in taken and k > taken[rel]), None)
                    for rel in unprobed:
                        if rel in counts:
                            late.setdefault(rel, (task, n))
                    self._advance(self.q, stack, task, n, i, out)
                    if replay:
                        outputs.setdefault(task, []).append(out)
        finally:
            for h in counted:
                h.remove()
        if more is not None:
            task, n, rel, k, taken = more
            warnings.warn(f"{prefix}.{rel} was called {k} times on item {n} of task {task!r}, more than on the "
                          f"items the walk probed: its statistics took the inputs of {taken} of those calls "
                          f"(a block whose calls depend on its data)")
        if late:
            said = ", ".join(f"{prefix}.{rel} (item {n} of task {task!r})" for rel, (task, n) in late.items())
            warnings.warn(f"{said}: called there but not when the walk probed the block (on each task's item 0, "
                          f"before its linears were quantized) to learn which linears it calls, so left in full "
                          f"precision (in epmq_report.skipped); to quantize it, make an item that calls it a "
                          f"task's first")
        if replay:
            self._replay_next(s, i, self.q, outputs)

    def _groups(self, block, prefix, rels, adapter, first=False):
        """The linears in the order the block calls them, grouped by shared input tensor; and
        ``leader``: each linear -> the first of its group that read the same tensors (itself if
        none did), whose Hessian it shares. ``first``: the stack's first block, whose input is
        the calibration's own (``inputs_embeds``): an error running it is the calibration's."""
        seen, order = {}, []
        reads = {}  # every tensor each linear read, in order (a linear may be called twice),
        # with its version: the same tensor changed in place in between is not the same input.
        # Over all probes: linears share statistics only if they read the same tensors in each.
        keep = []  # holding the inputs keeps their ids unique during the probe

        def hook(rel):
            def fn(module, args, kwargs):
                x = args[0] if args else kwargs["input"]
                keep.append(x)
                reads.setdefault(rel, []).append((id(x), version(x)))  # (in-place writes bump it)
                if rel not in seen:
                    seen[rel] = reads[rel][0]
                    order.append(rel)

            return fn

        handles = [block.get_submodule(rel).register_forward_pre_hook(hook(rel), with_kwargs=True) for rel in rels]
        # Probed on each task's first sample: a branch one task's data takes and another's does
        # not is still found (and grouped, and solved), whatever the order of the tasks. On a
        # copy: a block that writes its input in place must not change the stream's, and if it
        # does, every later pass over this block gets a copy too (_capture).
        self.writes_input = False
        calls = {}  # linear -> the most calls it got in one probe (a pass stops after them)
        self.probed = []  # (_check_replayable's: only where a probe changed an argument, its output held)
        try:
            for task in self.q.hidden:
                named = self.q.kwargs[task][0]
                given = _versions_of(named)
                probe = self.q.hidden[task][0]
                probe = probe.clone() if isinstance(probe, torch.Tensor) else probe
                before = version(probe) if isinstance(probe, torch.Tensor) else None
                counted = {rel: len(reads.get(rel, ())) for rel in rels}
                try:
                    with _running(prefix, task, 0, "the probe of which linears it calls"):
                        output = block(probe, **named)
                    changed = _changed_arguments(given, named)
                    if changed:
                        self.probed.append((task, self.q.hidden[task][0], named, changed[0], adapter.hidden_of(output)))
                except (RuntimeError, IndexError, TypeError) as e:
                    if not first or _out_of_memory(e):  # (an error of the block's, noted; memory, no input's fault)
                        raise
                    raise ValueError(f"calibration[{task!r}] item 0: the block {prefix!r} cannot run on its "
                                     f"input ({_error_said(e)})") from e
                self.writes_input |= before is not None and version(probe) != before
                for rel in rels:
                    calls[rel] = max(calls.get(rel, 0), len(reads.get(rel, ())) - counted[rel])
        finally:
            for h in handles:
                h.remove()
        self.calls = calls
        # Linears of one stage (the adapter's; MoE experts) form one group where the first of them
        # was called, those the probe did not call (an expert no token was routed to) included;
        # the others are grouped by the tensor (and its version) they first read.
        stage = {rel: adapter.stage(block, rel) for rel in rels}
        key = {rel: ("stage", stage[rel]) if stage[rel] is not None else ("input", seen.get(rel))
               for rel in rels}
        # An expert of a list (Switch's, NLLB-MoE's) that no token of the probes reached joins the
        # group of the same projection of an expert that was called; where none of those is
        # quantized, a group of such experts of its own, after the others. Either way it is solved
        # on what the later samples route to it, or rounded to nearest if none do (reported).
        for rel in rels:
            if rel not in seen and stage[rel] is None:
                twin = _called_twin(rel, order)
                listed = _LISTED_EXPERT.match(rel)
                if twin is not None:
                    key[rel] = key[twin]
                elif listed is not None:
                    key[rel] = ("listed", listed.group(1), listed.group(3))
                stage[rel] = "twin" if listed is not None else None  # (a twin implies a listed expert)
        seen_keys = {key[rel] for rel in order}
        order += [rel for rel in rels if rel not in seen and stage[rel] is not None
                  and (key[rel] in seen_keys or stage[rel] == "twin")]
        for rel in rels:
            if rel not in order:
                self.report.skipped.append(f"{prefix}.{rel}")
        if not self.true_sequential:
            groups = [order] if order else []
        else:
            groups, by_key = [], {}
            for rel in order:
                if key[rel] not in by_key:
                    by_key[key[rel]] = []
                    groups.append(by_key[key[rel]])
                by_key[key[rel]].append(rel)
        leader = {}
        for group in groups:
            first = {}
            for rel in group:
                shared = rel in reads and SHARE_INPUT_STATISTICS
                leader[rel] = first.setdefault(tuple(reads[rel]), rel) if shared else rel
        return groups, leader

    def _chunked(self, block, prefix, groups, leader, loops) -> list:
        """``groups``, each whose statistics would take more than ``EXPERT_STATISTICS_BYTES`` cut
        into consecutive chunks of linears, solved (and swapped in) one after the other. Only
        where no linear of a group reads what another of it computes in the same pass, so that
        the chunks' statistics are the group's, bit for bit: groups of one stage (MoE experts)
        or one input tensor (true sequential), a block called once per item and each linear once
        in it (a second call's inputs would come from the chunks already quantized). A chunk
        ends only where no linear after it shares a Hessian with one before it."""
        if not self.true_sequential or loops > 1:
            return groups
        chunked = []
        for group in groups:
            if any(self.calls.get(rel, 1) > 1 for rel in group):
                chunked.append(group)
                continue
            at = {rel: j for j, rel in enumerate(group)}
            # (the first linear whose Hessian each suffix of the group reads: a cut before j is
            # allowed where it is j's or later)
            first_read = [len(group)] * (len(group) + 1)
            for j in range(len(group) - 1, -1, -1):
                first_read[j] = min(first_read[j + 1], at[leader[group[j]]])
            chunks, held = [[]], 0
            for j, rel in enumerate(group):
                size = self._stats_bytes(block.get_submodule(rel), leader[rel] == rel, f"{prefix}.{rel}.weight")
                if chunks[-1] and held + size > EXPERT_STATISTICS_BYTES and first_read[j] >= j:
                    chunks.append([])
                    held = 0
                chunks[-1].append(rel)
                held += size
            chunked += chunks
        return chunked

    def _stats_bytes(self, linear, leads: bool, name: str) -> int:
        """The bytes ``linear``'s (the model's weight ``name``) statistics (``_new_stats``) hold at
        their peak, a task's last batch: the Hessians its group's first reader of the input holds
        (GPTQ's H; E-PMQ's H_e, H_m and the task's H_k), E-PMQ's G_e and the task's expert weight
        (``_expert_itemsize``), and with asymmetric targets (expert or fp path) the task's G_k, its
        ``W_k - W_m``, the fp path's G_m and ``W_m`` in the statistics' dtype (``EPMQStats.add_batch``)."""
        d_out, d_in = linear.weight.shape
        if self.method == "gptq" and self.t is None:
            return (d_in * d_in if leads else 0) * self.stats_dtype.itemsize
        hessians = 3 * d_in * d_in if leads else 0
        matrices = 1  # G_e
        # (GPTQ's fp-path control takes W_m itself as its W_k)
        W_k = self._expert_itemsize(linear, name) if self.method == "epmq" else 0
        if self.t is not None:
            matrices += 1  # G_k
            if self.method == "epmq":
                matrices += 1  # W_k - W_m
                if self.targets == "fp_path":
                    matrices += 1  # G_m
            if linear.weight.dtype != self.stats_dtype:  # (otherwise W_m is its own cast)
                matrices += 1
        return (hessians + matrices * d_out * d_in) * self.stats_dtype.itemsize + W_k * d_out * d_in

    def _expert_itemsize(self, linear, name: str) -> int:
        """The most bytes an element of a task's expert weight for ``name`` takes in E-PMQ's
        statistics: the model's dtype's on the expert path (read into the expert's block); on the
        others each checkpoint's own (``_read_expert``: float32 experts beside a bfloat16 model were
        priced at half their bytes), and a LoRA adapter's the statistics' dtype (its dense form,
        where its task is taken dense; its low-rank form holds less)."""
        if self.targets == "expert_path":
            return linear.weight.element_size()
        sizes = []
        for source in self.experts.values():
            if source.reader.lora is not None:
                sizes.append(self.stats_dtype.itemsize)
                continue
            key = self._held_as(source, self.ckpt(name))
            sizes.append(source.dtype(key.fused if self._fused_in(source, key) else key).itemsize)
        return max(sizes)

    def _capture(self, block, hidden, kwargs, rels, full, leader, mask=None, taken=None, cuts=None):
        """Run ``block``; the inputs of the linears ``rels`` (tokens x features), and its output
        when ``full`` (otherwise the pass stops once every one of them has been called). A linear
        that shares its leader's input gets the leader's tensor (checked to be the same).
        ``mask``: the positions that are tokens (``Adapter.token_mask`` with their indices:
        ``_token_positions``), for inputs of that ``[B, L]`` shape. ``taken``: each linear's count
        of captured calls, added to. ``cuts``: groups of ``rels`` whose inputs one full pass takes,
        each linear's calls up to where its group's own pass would have stopped."""
        calls = {rel: [] for rel in rels}  # (input, its version) of every call
        at = {rel: [] for rel in rels}  # (each call's place among the pass's calls, for cuts)
        called = itertools.count()
        inputs = {rel: [] for rel in rels}  # copies taken at the call (the block may write the
        # tensor in place afterwards)
        waiting = set(rels)

        def hook(rel):
            def fn(module, args, kw):
                x = args[0] if args else kw["input"]
                calls[rel].append((x, version(x)))
                at[rel].append(next(called))
                if leader[rel] == rel:
                    rows = _token_rows(x.detach(), mask)
                    same = rows.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
                    inputs[rel].append(rows.clone() if same else rows)  # (one copy either way)
                if len(calls[rel]) >= self.calls.get(rel, 1):  # (a linear called twice: both)
                    waiting.discard(rel)
                if not waiting and not full:
                    raise _Stop

            return fn

        handles = [block.get_submodule(rel).register_forward_pre_hook(hook(rel), with_kwargs=True) for rel in rels]
        output = None
        try:
            output = block(hidden.clone() if self.writes_input else hidden, **kwargs)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        for group in cuts or ():
            # (as the pass's own wait: a linear the probes did not call, 0, waits for a call)
            needs = {rel: max(self.calls.get(rel, 1), 1) for rel in group}
            if all(len(at[rel]) >= needs[rel] for rel in group):  # (else its pass ran to the end)
                stop = max(at[rel][needs[rel] - 1] for rel in group)
                for rel in group:
                    k = bisect.bisect_right(at[rel], stop)
                    calls[rel], inputs[rel] = calls[rel][:k], inputs[rel][:k]
        if taken is not None:
            for rel in rels:
                taken[rel] = taken.get(rel, 0) + len(calls[rel])
        out = {}
        for rel in rels:
            first, xs = leader[rel], inputs[rel]
            if first != rel:
                mine, theirs = calls[rel], calls[first]
                if len(mine) != len(theirs) or any(
                        a is not b or va != vb for (a, va), (b, vb) in zip(mine, theirs)):
                    raise RuntimeError(
                        f"{rel} read the same tensor as {first} when the block was probed, but not "
                        f"in this pass: the block's calls depend on its input; quantize it with "
                        f"epmq.walker.SHARE_INPUT_STATISTICS = False"
                    )
                if first in out:
                    out[rel] = out[first]
            elif xs:
                out[rel] = xs[0] if len(xs) == 1 else torch.cat(xs)
        return out, output

    def _target_block(self, template, prefix, task, lazily=False):
        if self.targets == "expert_path":
            return self._expert_block(template, prefix, task, lazily)
        return template

    def _run_targets(self, stack, template, prefix):
        outputs = {}
        for task, items in self.t.hidden.items():
            target = self._target_block(template, prefix, task)
            for n in range(len(items)):
                with _running(prefix, task, n, f"its target's pass (targets={self.targets!r})"):
                    outputs[task, n] = _looped(stack, target, self.t.hidden[task][n], self.t.kwargs[task][n])
                self.t.hidden[task][n] = None  # (as _solve_group lets it go)
        return outputs

    def _new_stats(self, linear, inputs_of=None):
        """Statistics for ``linear``; ``inputs_of``: those of a linear that reads the same input
        (GPTQ: the same object, E-PMQ: statistics that share its Hessians)."""
        W_m = linear.weight.detach()
        if self.method == "gptq" and self.t is None:
            return inputs_of or HessianStats(W_m.shape[1], device=W_m.device, dtype=self.stats_dtype,
                                             backend=self.stats_backend)
        # (side_stream: the weights the statistics read, the model's and the experts' read for
        # the walk, are not written to before the layer is solved)
        return EPMQStats(W_m, dtype=self.stats_dtype, backend=self.stats_backend,
                         residual_precision=self.residual_precision, inputs_of=inputs_of,
                         side_stream=True)

    def _solve_group(self, stack, block, template, prefix, group, leader, t_out, kept, *, full_target, later=None):
        """Statistics of the linears ``group`` over every task, then solve and swap them in. The
        target blocks' outputs go into ``t_out`` (``(task, item) -> output``) where a pass runs
        them to their end: ``full_target`` (the block's last group), or ``later``: the groups after
        this one, whose target inputs its passes keep in ``kept`` (``(task, item) -> linear ->
        input``) up to ``EXPERT_TARGET_INPUTS_KEPT_BYTES``; an item's kept there is not run again."""
        loops, adapter = stack.loops, stack.adapter
        linears = {rel: block.get_submodule(rel) for rel in group}
        self._solving = prefix, linears, leader  # (what _memory_note prices, until they are solved)
        stats = {}
        for rel in group:  # (a leader comes before the linears that share its input)
            stats[rel] = self._new_stats(linears[rel], None if leader[rel] == rel else stats[leader[rel]])
        n_tokens = dict.fromkeys(group, 0)
        later_rels = [rel for rels in later or () for rel in rels]
        # (bytes the target inputs kept may still take: an item's that would cross it are let go, and
        # no later item is tried, each try a pass to the block's end)
        room = EXPERT_TARGET_INPUTS_KEPT_BYTES if later is not None else 0
        # LoRA experts of one base read its tensors once for the group (LoraExpert.low_rank)
        self._bases, self._base_prints = {}, {}
        for k, (task, items) in enumerate(self.calibration.items()):
            # (a block of a large model takes minutes, its bar still until its end: where it is said)
            self._at(f"{prefix}: statistics of task {task!r} ({k + 1}/{len(self.calibration)})")
            # (a pass of a group before the last may stop before the block's end: read as far as it
            # runs; none runs where every item's inputs were kept, which reads the group's weights)
            whole = room > 0 or full_target and any((task, n) not in kept for n in range(len(items)))
            target = (self._target_block(template, prefix, task, lazily=not whole)
                      if self.t is not None else None)
            begun = set()  # a task begins at a linear with its first tokens there (MoE experts
            # may get none from a task)

            def begin(rel):
                checked = False
                if self.method == "gptq":  # fp_path control: the targets are W_m x_fp
                    W_k, weight = stats[rel].W_merged, 1.0  # (itself: no product of W_k - W_m = 0)
                elif target is not None and self.targets == "expert_path":
                    W_k = target.get_submodule(rel).weight
                    self._read_unread([id(W_k)])  # (a linear the target pass did not call)
                    W_k, weight = W_k.detach(), None
                else:
                    # (on the solve's device: read there and its values checked there, by the
                    # reader: the statistics check its shape only)
                    # (a LoRA expert's layer as W_0 + U V where it can be: see LowRankExpert)
                    W_k = self._read_expert(task, f"{prefix}.{rel}.weight",
                                            device=linears[rel].weight.device, low_rank=True)
                    weight, checked = None, True
                stats[rel].begin_task(W_k, weight=weight, name=f"task {task!r} at {prefix}.{rel}",
                                      values_checked=checked)
                begun.add(rel)

            for n in range(len(items)):
                hidden = self.q.hidden[task][n]
                t_hidden = None if target is None else self.t.hidden[task][n]
                for call in range(loops):  # (a looped block: each call's inputs, on the last one's output)
                    again = call + 1 < loops
                    with _running(prefix, task, n, "a pass taking its linears' statistics"):
                        xs, output = self._capture(block, hidden, self.q.kwargs[task][n], group, again, leader,
                                                   self.q.masks[task][n], self._captured.setdefault((task, n), {}))
                    x_t = None
                    mine = kept.get((task, n))
                    if mine is not None:
                        x_t = {rel: mine.pop(rel) for rel in group if rel in mine}
                        if full_target:
                            del kept[task, n]
                    elif target is not None:
                        keep = room > 0
                        with _running(prefix, task, n, f"its target's pass (targets={self.targets!r})"):
                            x_t, out = self._capture_target(
                                target, t_hidden, self.t.kwargs[task][n], group + later_rels if keep else group,
                                full_target or again or keep, leader, self.t.masks[task][n],
                                # (each linear's calls as far as the quantized pass took them: that
                                # pass stops once its group is called, where this one may run on)
                                cuts=None if again else [group, *later] if keep else [group])
                        if keep:
                            theirs = {rel: x_t.pop(rel) for rel in later_rels if rel in x_t}
                            size = sum({id(x): x.nbytes for x in theirs.values()}.values())
                            keep = size <= room
                            room = room - size if keep else 0
                            if keep:
                                kept[task, n] = theirs
                        if (full_target or keep) and not again:
                            t_out[task, n] = out
                            # (its input, read for the last time: held, every item's input and output
                            # were the stream twice over until the block's end hands the outputs on)
                            self.t.hidden[task][n] = None
                        t_hidden = adapter.hidden_of(out) if again else None
                    hidden = adapter.hidden_of(output) if again else None
                    for rel, x in xs.items():
                        if not x.shape[0]:  # (an MoE expert a block calls on no token)
                            continue
                        n_tokens[rel] += x.shape[0]
                        if isinstance(stats[rel], HessianStats):
                            if leader[rel] == rel:
                                stats[rel].add_batch(x, what=f"calibration input of task {task!r} at {prefix}.{rel}")
                        else:
                            if x_t is not None and rel not in x_t:
                                raise ValueError(
                                    f"targets='expert_path': at {prefix}.{rel}, the quantized model's pass calls "
                                    f"the linear on calibration item {n} of task {task!r} and the expert's "
                                    f"pass does not (a block whose calls depend on its input or weights: a "
                                    f"branch, or routing its adapter does not declare), so E-PMQ has no "
                                    f"expert input for it; use targets='merged_path'")
                            if rel not in begun:
                                begin(rel)
                            x_target = None if x_t is None else x_t[rel]
                            x_anchor = x_target if (self.targets == "fp_path" and self.method == "epmq") else None
                            stats[rel].add_batch(x, x_expert=x_target, x_anchor=x_anchor)
            for rel in begun:
                stats[rel].end_task()
            # (planned reads of linears no token of the task reached: an MoE's experts)
            self._ahead.drop((task, f"{prefix}.{rel}.weight") for rel in group if rel not in begun)
            target = None  # (the task's target block freed before the next one is built)
        self._bases = self._base_prints = None  # (the statistics hold what they need of them)
        # one factorization per shared Hessian, kept until the last linear that reads it
        readers = {}
        for rel in group:
            readers[leader[rel]] = readers.get(leader[rel], 0) + 1
        factors = {first: quant.FactorCache() for first, n in readers.items() if n > 1}
        for rel in group:
            name = f"{prefix}.{rel}"
            self._at(f"{prefix}: solving {rel}")
            readers[leader[rel]] -= 1
            cache = factors.get(leader[rel]) if readers[leader[rel]] else factors.pop(leader[rel], None)
            empty = stats[rel].empty_tasks if isinstance(stats[rel], EPMQStats) else []
            if n_tokens[rel] == 0 or (empty and not stats[rel].task_weights):  # an MoE expert no
                # calibration token was routed to; inputs that were all zero for every task
                result = quant.rtn(linears[rel].weight.detach(), self.spec)
                result.loss = 0.0  # its calibration objective: no token, no loss
                result.dead_columns = linears[rel].weight.shape[1]  # (no column had an input)
                self.report.unreached.append(name)
            else:
                result = self._solve(linears[rel], stats[rel], name, cache)
                if result.dead_columns == linears[rel].weight.shape[1]:
                    self.report.unreached.append(name)
            stats[rel] = None  # free the Hessians before the next solve
            packed = _quant_linear(result, linears[rel], name, self.divisors.get(f"{name}.weight", 1))
            # (run in every later pass over the block: dequantized once, not at each call; not
            # where blocks are offloaded to the device, whose memory is what the walk saves there:
            # the replaced linears go back to the model's device, the held copies would not)
            packed._hold_dequantized(not self.offload)
            replaced = self.edits.swap(name, packed)
            if self.offload:  # (kept until the walk ends, for a rollback: not on the device)
                replaced.to(self.model_device)
            entry = _layer_report(name, prefix, self.method, self.targets, result, n_tokens[rel])
            if leader[rel] != rel:
                entry["hessian_of"] = f"{prefix}.{leader[rel]}"
            if empty:  # (left out of the layer's objective: they add nothing to it)
                entry["tasks_with_zero_inputs"] = empty
            self.report.layers.append(entry)
        self._solving = None

    def _solve(self, linear, stats, name, factors=None):
        # (the solver's refusals, a Hessian it cannot factor or scale, name no layer: this one's)
        try:
            try:
                return self._solve_with(linear.weight.detach(), stats, dict(self.solver, factors=factors), name)
            except torch.cuda.OutOfMemoryError:
                pass  # (outside the handler, so that the failed attempt's tensors can be freed)
            # A layer the GPU cannot hold next to the model is solved on the CPU: the same math in
            # the torch reference, slower, instead of losing the whole run (GPTQModel does the same).
            torch.cuda.empty_cache()
            warnings.warn(f"out of GPU memory solving {name}: solving this layer on the CPU")
            result = self._solve_with(linear.weight.detach().cpu(), _on_cpu(stats),
                                      dict(self.solver, backend="torch"), name)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e
        result.info["solved_on"] = "cpu (out of GPU memory)"
        return result

    def _solve_with(self, W_m, stats, solver, name):
        with _warnings_of(name):
            if isinstance(stats, HessianStats):
                return quant.gptq(W_m, stats.H, self.spec, **solver)
            if self.method == "gptq":
                return quant.epmq_from_stats(stats, self.spec, anchor=0.0, weight_anchor=0.0, **solver)
            return quant.epmq_from_stats(
                stats, self.spec, anchor=self.anchor, weight_anchor=self.weight_anchor, **solver
            )
