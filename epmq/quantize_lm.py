"""Quantize a causal LM checkpoint (a merge of experts, or any model) with calibration texts.

    epmq.quantize_checkpoint("merged/ties", "merged/ties-w4", method="epmq",
                             spec=epmq.QuantSpec(bits=4, group_size=128, sym=True),
                             calibration={"math": "data/math.jsonl", "code": "data/code.txt"},
                             experts={"math": "ckpt/math", "code": "ckpt/code"}, anchor=0.1)

or ``epmq quantize CONFIG.yaml OUT``. The model is loaded with ``AutoModelForCausalLM`` from a
directory or the HF hub, each task's texts become GPTQ-style calibration windows
(``epmq.calibration``), ``epmq.quantize_model`` quantizes it block by block, and the result is
written by ``epmq.save_quantized`` with the tokenizer beside it: a GPTQ checkpoint that
``epmq.load_quantized``, transformers + GPTQModel and (4/8-bit symmetric) vLLM load. The
per-layer report goes to ``epmq_report.json`` in the same directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Union


from .calibration import read_texts, text_windows
from .checkpoint import save_quantized
from .checkpoint_io import DTYPES, local_checkpoint
from .spec import QuantSpec
from .walker import quantize_model

REPORT_FILE = "epmq_report.json"
def quantize_checkpoint(model: Union[str, Path], out: Union[str, Path], *, spec: QuantSpec,
                        calibration: Mapping[str, object], method: str = "epmq",
                        experts: Optional[Mapping[str, object]] = None, anchor: float = 1.0,
                        weight_anchor: float = 0.0, targets: str = "merged_path",
                        samples: int = 128, seq_len: int = 512, batch_size: int = 8,
                        seed: int = 0, dtype: Optional[str] = None, device=None,
                        checkpoint_format: str = "auto", max_shard_size="5GB",
                        progress: bool = True) -> Path:
    """Quantize the causal LM at ``model`` and save it to ``out``; returns ``out``.

    ``calibration``: task -> text file(s) (see ``epmq.calibration.read_texts``); E-PMQ needs an
    expert for every task (``experts``: task -> directory, file or HF hub id). ``dtype``: the
    model's dtype while quantizing and in the checkpoint's unquantized tensors (default: the
    checkpoint's). ``device``: where the model runs (e.g. "cuda"; default the CPU).
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not calibration and method != "rtn":
        raise ValueError(f"method {method!r} needs calibration texts: task -> text file(s)")
    if method == "epmq":
        tasks, with_expert = set(calibration), set(experts or {})
        if tasks != with_expert:
            raise ValueError(f"E-PMQ needs one expert per calibration task: tasks without an expert "
                             f"{sorted(tasks - with_expert)}, experts without texts {sorted(with_expert - tasks)}")
    elif experts:
        raise ValueError(f"method {method!r} takes no experts (only 'epmq' does)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = local_checkpoint(model, directory=True)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    batches = {task: text_windows(read_texts(source), tokenizer, samples=samples, seq_len=seq_len,
                                  batch_size=batch_size, seed=seed, what=f"calibration[{task!r}]")
               for task, source in (calibration or {}).items()}
    lm = AutoModelForCausalLM.from_pretrained(directory, dtype=DTYPES[dtype] if dtype else "auto")
    lm.eval()
    if device is not None:
        lm.to(device)
    quantize_model(lm, spec, method=method, calibration=batches or None,
                   experts=dict(experts) if experts else None, anchor=anchor,
                   weight_anchor=weight_anchor, targets=targets, progress=progress)
    out = save_quantized(lm, out, checkpoint_format=checkpoint_format, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    lm.epmq_report.to_json(out / REPORT_FILE)
    return out
