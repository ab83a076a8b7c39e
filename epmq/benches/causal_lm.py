"""Decoder-only LMs on text tasks (``family: hf_causal_lm``): merge and quantize a whole
``AutoModelForCausalLM`` (Llama, Qwen, Gemma, Mistral, Phi, ... and their MoE variants).

The tasks, data and evaluation are the ``hf_t5`` bench's (``t5_glue``): an example is written
into the task's template (GLUE's by default, or the task's ``template`` and ``answers``); with
``eval.decoding: score`` the prediction is the candidate answer of highest log-likelihood as a
continuation of the prompt, ``log p(" " + answer, EOS | prompt)`` summed over the answer's
tokens (a leading space, as the answer follows the prompt's last word); with ``generate`` it is
the greedy continuation (inputs padded on the left), compared to the answers as text.

Calibration items: ``{"input_ids", "attention_mask"}`` of training prompts followed by their
gold answer, so every block sees the task's inputs and answers, as the experts were fine-tuned
on them.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from .config import BenchConfigError
from .t5_glue import MAX_LOGIT_ELEMENTS, T5GlueBench


def _logit_width(model: nn.Module) -> int:
    """How many logits a position has: the head's outputs (a config that wraps a text config, as
    Gemma 3's or Llama 4's, has no ``vocab_size`` of its own; a head may be padded past it)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    width = getattr(head, "out_features", None)
    if width is None:
        # (the decoder's: the logits are its, and MusicGen's config holds a text encoder's too, which
        # transformers will not choose between unasked)
        config = model.config
        if hasattr(config, "get_text_config"):
            config = config.get_text_config(decoder=True)
        width = getattr(config, "vocab_size", None)
    return width or 1 << 18  # (it only sizes the chunks of rows: unknown, take them small)


class CausalLMBench(T5GlueBench):
    family = "hf_causal_lm"

    def _check_model_type(self, model_type: str) -> None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise BenchConfigError(f"model.base ({self.base_dir}) is a {model_type!r} model, which "
                                   f"transformers has no causal-LM class for")

    def _load_template(self) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=self.dtype)

    def _candidate_ids(self, candidates: List[str]) -> List[List[int]]:
        eos = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        ids = [self.tokenizer(" " + c, add_special_tokens=False)["input_ids"] + eos for c in candidates]
        empty = [c for c, i in zip(candidates, ids) if not i]
        if empty:
            raise BenchConfigError(f"answers {empty} have no tokens under the tokenizer")
        return ids

    @torch.no_grad()
    def _score(self, model: nn.Module, inputs: List[List[int]], cand_ids: List[List[int]], device) -> torch.Tensor:
        """``[B, C]``: ``log p(candidate c | input b)`` summed over the candidate's tokens."""
        rows = [(b, c) for b in range(len(inputs)) for c in range(len(cand_ids))]
        width = max(len(p) for p in inputs) + max(len(c) for c in cand_ids)
        per_chunk = max(1, MAX_LOGIT_ELEMENTS // max(1, width * _logit_width(model)))
        scores = torch.empty(len(inputs), len(cand_ids), dtype=torch.float64)
        for i in range(0, len(rows), per_chunk):
            chunk = rows[i:i + per_chunk]
            seqs = [inputs[b] + cand_ids[c] for b, c in chunk]
            ids, mask = self._pad(seqs, device)
            logp = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for row, (b, c) in enumerate(chunk):
                start, n = len(inputs[b]), len(cand_ids[c])
                # position t predicts token t + 1: the candidate's tokens are predicted from start - 1 on
                targets = ids[row, start:start + n]
                scores[b, c] = float(logp[row, start - 1:start - 1 + n].gather(-1, targets[:, None]).sum())
        return scores

    def _generate_texts(self, model: nn.Module, inputs: List[List[int]], device) -> List[str]:
        ids, mask = self._pad(inputs, device, left=True)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.config.eval.max_new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=self.pad_id)
        return [s.strip() for s in self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]

    def _build_calibration(self, task: str) -> list:
        t = self.tasks[task]
        ids, labels = self._encode(task, "calibration")
        seqs = [p + self._candidate_ids([t.target(y)])[0] for p, y in zip(ids, labels)]
        bs = self.config.calibration.batch_size
        items = []
        for i in range(0, len(seqs), bs):
            inp, mask = self._pad(seqs[i:i + bs], torch.device("cpu"))
            items.append({"input_ids": inp, "attention_mask": mask})
        return items
