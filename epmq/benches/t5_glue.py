"""FLAN-T5 on GLUE (``family: hf_t5``): merge and quantize a whole ``T5ForConditionalGeneration``.

* base: ``google/flan-t5-base`` or a local ``save_pretrained`` directory (with its tokenizer).
* experts: full ``T5ForConditionalGeneration`` checkpoints (FusionBench's
  ``tanganke/flan-t5-base_glue-<task>``). Tied tensors (the shared embedding and its aliases)
  are read as ``from_pretrained`` reads them.
* text to text: an example is written into the task's input template (``prompts.GLUE`` or the
  task's ``template``); the answer is one of the task's answer strings (``answers``, one per
  GLUE label) or, for a regression task (STS-B), the score written with one decimal.
* data: HF ``datasets`` (``nyu-mll/glue``, configuration = the GLUE task) or local JSONL files
  ``<root>/<split>.jsonl`` with GLUE's field names. GLUE's test labels are hidden, so the test
  split is GLUE's validation split (``validation_matched`` for MNLI) and val is held out of train.

Evaluation (deterministic, no sampling), ``eval.decoding``:

``score`` (default)
    the prediction is the candidate answer with the highest log-likelihood under the model
    (sum over its tokens, end-of-sequence included). STS-B's candidates are the 51 scores
    0.0, 0.1, ..., 5.0.
``generate``
    greedy decoding of at most ``eval.max_new_tokens`` tokens; a classification is right when
    the decoded text equals the gold answer (exact match, stripped); an STS-B output that is not
    a number counts as 2.5 (the middle of the scale).

Metrics: accuracy for the classification tasks; for STS-B, Spearman's rank correlation between
predicted and gold scores (GLUE's metric, as FusionBench reports it), which lies in [-1, 1]
and is 0 when the predictions are constant. ``"avg"`` averages the tasks' metrics.

Calibration items: ``{"input_ids", "attention_mask", "decoder_input_ids",
"decoder_attention_mask"}`` of training examples with their gold answer as the decoder input
(teacher forcing, shifted right), so both the encoder and the decoder see task data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .._util import device_of
from ..checkpoint_io import open_state, weights_in
from ..vocabulary import checkpoint_tokenizer
from .common import BenchBase
from .config import BenchConfig, BenchConfigError, check_has_vocabulary
from .data import make_task_data, open_text_sources
from .prompts import STSB_GRID, glue_prompt, score_text, template_fields

MAX_LOGIT_ELEMENTS = 1 << 27  # scoring works in chunks of at most this many logits


@dataclass
class TextTask:
    name: str
    template: str
    answers: Optional[List[str]]  # by label index; None for regression
    regression: bool
    fields: List[str]

    def prompt(self, example: dict) -> str:
        return self.template.format(**{f: example[f] for f in self.fields})

    def fitted_prompt(self, example: dict, tokenizer, max_tokens: int) -> str:
        """The prompt in at most ``max_tokens`` tokens: the example's own fields are shortened,
        the longest first, so that the instruction around them (often at the end: "Reply yes
        or no") survives, where cutting the prompt's end would drop it."""
        text = self.prompt(example)
        if len(tokenizer(text)["input_ids"]) <= max_tokens:
            return text
        fields = {f: tokenizer(str(example[f]), add_special_tokens=False)["input_ids"] for f in self.fields}
        for _ in range(8):  # (a field decoded after a cut may tokenize a little differently)
            over = len(tokenizer(text)["input_ids"]) - max_tokens
            if over <= 0 or not any(fields.values()):
                break
            for _ in range(over):  # one token at a time from the longest field
                longest = max(fields, key=lambda f: len(fields[f]))
                fields[longest] = fields[longest][:-1]
            shortened = {f: tokenizer.decode(ids, skip_special_tokens=True) for f, ids in fields.items()}
            text = self.template.format(**shortened)
        return text

    def target(self, label) -> str:
        return score_text(label) if self.regression else self.answers[int(label)]

    @property
    def candidates(self) -> List[str]:
        return [score_text(v) for v in STSB_GRID] if self.regression else list(self.answers)


def _text_task(spec) -> TextTask:
    where = f"task {spec.name!r}"
    default = glue_prompt(spec.glue_task) or {}
    template = spec.template or default.get("template")
    regression = spec.regression if spec.regression is not None else bool(default.get("regression", False))
    answers = spec.answers or default.get("answers")
    if template is None:
        raise BenchConfigError(
            f"{where}: {spec.glue_task!r} is not a GLUE task this bench knows (cola, mnli, mrpc, qnli, qqp, rte, "
            f"sst2, stsb): give glue_task, or template and answers (or regression: true)"
        )
    if not regression and not answers:
        raise BenchConfigError(f"{where}: a classification task needs answers (one string per label)")
    fields = template_fields(template)
    if not fields:
        raise BenchConfigError(f"{where}: the template has no {{field}} to fill in: {template!r}")
    return TextTask(spec.name, template, None if regression else list(answers), regression, fields)


def _bad_label(label, task: TextTask) -> bool:
    """Whether ``label`` is no label of ``task``: not a number (an answer word written as the
    label ended the run in int()'s bare ValueError), a class index that is not a whole number in
    range (1.5 was read as class 1), or a score that is negative or not finite (NaN was scored)."""
    try:
        value = float(label)
    except (TypeError, ValueError):
        return True
    if task.regression:
        return not (math.isfinite(value) and value >= 0)
    return not (value.is_integer() and 0 <= value < len(task.answers))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); 0 when either side is constant."""

    def ranks(x):
        x = torch.as_tensor(x, dtype=torch.float64)
        order = torch.argsort(x, stable=True)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for v in torch.unique(x):  # average ranks of ties
            m = x == v
            if m.sum() > 1:
                r[m] = r[m].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum()) / denom if denom > 0 else 0.0


class T5GlueBench(BenchBase):
    """The text-task bench; the parts a model family changes are ``_check_model_type``,
    ``_load_template``, ``_candidate_ids``, ``_score``, ``_generate_texts`` and
    ``_build_calibration`` (``causal_lm.CausalLMBench`` is the decoder-only one)."""

    family = "hf_t5"

    def _check_model_type(self, model_type: str) -> None:
        if model_type != "t5":
            raise BenchConfigError(f"model.base ({self.base_dir}) is a {model_type!r} model, not T5")

    def _load_template(self) -> nn.Module:
        from transformers import T5ForConditionalGeneration

        return T5ForConditionalGeneration.from_pretrained(self.base_dir, dtype=self.dtype)

    def __init__(self, config: BenchConfig, log):
        super().__init__(config, log)
        from transformers import AutoConfig

        self.base_dir = self._resolve(config.model.base, "model.base", "model", config.model.revision)
        if not (self.base_dir / "config.json").is_file():
            raise BenchConfigError(f"model.base: no config.json in {self.base_dir}: not a HF model directory")
        self._check_model_type(AutoConfig.from_pretrained(self.base_dir).model_type)
        if weights_in(self.base_dir) is None:
            raise BenchConfigError(f"model.base: no weights in {self.base_dir}")
        tok_source = config.model.tokenizer
        tok_dir = self.base_dir if tok_source is None else self._resolve(tok_source, "model.tokenizer", "tokenizer")
        try:  # (as saved: see checkpoint_tokenizer)
            self.tokenizer = checkpoint_tokenizer(tok_dir)
        except Exception as e:
            raise BenchConfigError(f"cannot load the tokenizer from {tok_dir}: {e}") from e
        check_has_vocabulary(self.tokenizer, tok_dir)
        # from_pretrained decides the tying of the embeddings and the head as transformers does
        self._template = self._load_template().eval()
        self.base_state = open_state(self.base_dir, self._template, what="model.base", dtype=self.dtype,
                                     error=BenchConfigError)
        self._open_experts()

        self.tasks: Dict[str, TextTask] = {}
        for t in config.tasks:
            task = self.tasks[t.name] = _text_task(t)
            sources = open_text_sources(t.name, t.data, task.fields)
            self.data[t.name] = make_task_data(t.name, sources, t.data, seed=config.seed,
                                               calib_samples=config.calibration.samples,
                                               caps=config.eval.max_samples, tasks=config.task_names, log=log)
            d = self.data[t.name]
            self.log(f"[bench] task {t.name}: {'regression' if task.regression else f'{len(task.answers)} answers'}, "
                     f"{t.data.describe()}; " + ", ".join(f"{s} {len(d.splits[s])}" for s in ("train", "val", "test")))
        self._encoded: Dict[tuple, tuple] = {}

    def save_extras(self, directory) -> None:
        self.tokenizer.save_pretrained(directory)  # a text model is served with its tokenizer

    # ----------------------------------------------------------------- tokens

    def _encode(self, task: str, split: str):
        """``(input id lists, labels)`` of a task's split (``split`` may be "calibration")."""
        key = (task, split)
        if key not in self._encoded:
            t = self.tasks[task]
            part = self.data[task].calibration if split == "calibration" else self.data[task].splits[split]
            examples = [part[k] for k in range(len(part))]
            labels = [ex["label"] for ex in examples]
            for lab in labels:
                if _bad_label(lab, t):
                    expected = "a score >= 0" if t.regression else f"a label in 0..{len(t.answers) - 1}"
                    raise BenchConfigError(
                        f"task {task!r}: the {split} split has label {lab!r}, expected {expected} (GLUE's test "
                        f"split hides its labels as -1: use the validation split as test)"
                    )
            limit = self.config.max_input_tokens
            prompts = [t.fitted_prompt(ex, self.tokenizer, limit) for ex in examples]
            # (truncation stays as a bound, for a template longer than the limit by itself)
            ids = self.tokenizer(prompts, truncation=True, max_length=limit)["input_ids"]
            self._encoded[key] = (ids, labels)
        return self._encoded[key]

    @property
    def pad_id(self) -> int:
        """The tokenizer's padding token (decoder-only tokenizers often have none: then EOS)."""
        for tid in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if tid is not None:
                return tid
        return 0

    def _pad(self, seqs: List[List[int]], device, left: bool = False) -> tuple:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            at = slice(width - len(s), width) if left else slice(0, len(s))
            ids[i, at] = torch.tensor(s, dtype=torch.long)
            mask[i, at] = 1
        return ids.to(device), mask.to(device)

    def _decoder_inputs(self, model_config, targets: List[List[int]], device):
        """Teacher-forcing decoder inputs (targets shifted right) and the padded targets."""
        start = model_config.decoder_start_token_id
        start = self.tokenizer.pad_token_id if start is None else start
        labels, mask = self._pad(targets, device)
        dec = torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], dim=1)
        # decoder position j reads label j-1 and predicts label j: it is real where label j is.
        # (The mask shifted right also marked the input after a shorter target's last label, so
        # its row counted one more decoder position batched beside a longer one than alone.)
        return dec, mask, labels, mask

    def _batches(self, n_items: int, lengths: List[int]):
        order = sorted(range(n_items), key=lambda i: lengths[i])
        bs = self.config.eval.batch_size
        for i in range(0, n_items, bs):
            yield order[i:i + bs]

    # ----------------------------------------------------------------- evaluation

    def _evaluate_task(self, model: nn.Module, task: str, split: str) -> float:
        t = self.tasks[task]
        ids, labels = self._encode(task, split)
        device = device_of(model)
        preds: List = [None] * len(ids)
        if self.config.eval.decoding == "score":
            cand_ids = self._candidate_ids(t.candidates)
            for batch in self._batches(len(ids), [len(s) for s in ids]):
                scores = self._score(model, [ids[i] for i in batch], cand_ids, device)
                best = scores.argmax(-1).tolist()
                for i, b in zip(batch, best):
                    preds[i] = STSB_GRID[b] if t.regression else b
        else:
            for batch in self._batches(len(ids), [len(s) for s in ids]):
                texts = self._generate_texts(model, [ids[i] for i in batch], device)
                for i, text in zip(batch, texts):
                    if t.regression:
                        try:
                            preds[i] = float(text)
                        except ValueError:
                            preds[i] = 2.5
                        if not math.isfinite(preds[i]):  # ("nan", "inf": no number either)
                            preds[i] = 2.5
                    else:
                        preds[i] = t.answers.index(text) if text in t.answers else -1
        if t.regression:
            return spearman(preds, [float(v) for v in labels])
        return sum(int(p == int(y)) for p, y in zip(preds, labels)) / len(labels)

    def _candidate_ids(self, candidates: List[str]) -> List[List[int]]:
        """Each candidate answer's target tokens (end-of-sequence included)."""
        return self.tokenizer(candidates)["input_ids"]

    def _generate_texts(self, model: nn.Module, inputs: List[List[int]], device) -> List[str]:
        """Greedy decoding of at most ``eval.max_new_tokens`` tokens per input, stripped."""
        inp, mask = self._pad(inputs, device)
        out = model.generate(input_ids=inp, attention_mask=mask, max_new_tokens=self.config.eval.max_new_tokens,
                             do_sample=False, num_beams=1)
        return [s.strip() for s in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    @torch.no_grad()
    def _score(self, model: nn.Module, inputs: List[List[int]], cand_ids: List[List[int]], device) -> torch.Tensor:
        """``[B, C]`` log-likelihoods of every candidate answer given every input."""
        inp, mask = self._pad(inputs, device)
        enc = model.get_encoder()(input_ids=inp, attention_mask=mask).last_hidden_state  # [B, L, d]
        dec, _, labels, lmask = self._decoder_inputs(model.config, cand_ids, device)  # [C, T]
        B, C, T = enc.shape[0], len(cand_ids), labels.shape[1]
        vocab = model.config.vocab_size
        per_chunk = max(1, MAX_LOGIT_ELEMENTS // max(1, T * vocab))  # (input, candidate) rows per forward
        rows = [(b, c) for b in range(B) for c in range(C)]
        scores = torch.empty(B, C, dtype=torch.float64)
        from transformers.modeling_outputs import BaseModelOutput

        for i in range(0, len(rows), per_chunk):
            chunk = rows[i:i + per_chunk]
            bi = torch.tensor([b for b, _ in chunk], device=device)
            ci = torch.tensor([c for _, c in chunk], device=device)
            out = model(encoder_outputs=BaseModelOutput(last_hidden_state=enc[bi]), attention_mask=mask[bi],
                        decoder_input_ids=dec[ci])
            logp = F.log_softmax(out.logits.float(), dim=-1).gather(-1, labels[ci].unsqueeze(-1)).squeeze(-1)
            total = (logp * lmask[ci]).sum(-1).double().cpu()
            for (b, c), v in zip(chunk, total.tolist()):
                scores[b, c] = v
        return scores

    # ----------------------------------------------------------------- calibration

    def _build_calibration(self, task: str) -> list:
        t = self.tasks[task]
        ids, labels = self._encode(task, "calibration")
        targets = self.tokenizer([t.target(y) for y in labels])["input_ids"]
        cpu = torch.device("cpu")
        items = []
        bs = self.config.calibration.batch_size
        for i in range(0, len(ids), bs):
            inp, mask = self._pad(ids[i:i + bs], cpu)
            dec, dec_mask, _, _ = self._decoder_inputs(self._template.config, targets[i:i + bs], cpu)
            items.append({"input_ids": inp, "attention_mask": mask, "decoder_input_ids": dec,
                          "decoder_attention_mask": dec_mask})
        return items
