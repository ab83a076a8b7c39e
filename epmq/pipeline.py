"""The whole post-merge-quantization experiment: merge, quantize, evaluate, report.

A *bench* supplies the models, data and evaluation; the pipeline does the rest the same way for
the embedded demo and for real checkpoints. A bench has:

    task_names                  list of task names
    base_state                  the pretrained model's state dict (a Mapping; may be lazy)
    experts                     task -> expert state dict (a Mapping; may be lazy)
    model(state) -> nn.Module   a fresh model of the architecture with ``state`` loaded
    calibration                 task -> iterable of model inputs at the quantized model
    evaluate(model_or_state, split) -> {task: accuracy, ..., "avg": mean}
    expert_accuracies(split)    each expert on its own task, and "avg"
    save_extras(directory)      optional: what a saved checkpoint is served with (a tokenizer)

Every step's result goes into ``<out>/results.json`` as soon as it is done (written
atomically), keyed by what it depends on, so an interrupted run resumes where it stopped.
Merge scales and E-PMQ anchors are chosen on the validation split, never on test.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from . import merge as merge_lib
from ._util import (changed_keys, read_json, remove_stale_temporaries, temporary_beside, write_atomic,
                    write_json_atomic)
from .checks import check_number, resolve_backend
from .spec import QuantSpec
from epmq_kernels.expert_residual import check_residual_precision
from epmq_kernels.grid import is_flag

# method of epmq.merge -> its label in tables; the merges of one base and N experts
MERGE_LABELS = {
    "task_arithmetic": "TA", "ties": "TIES", "dare": "DARE", "breadcrumbs": "Breadcrumbs",
    "della": "DELLA", "sce": "SCE", "tsv": "TSV-M", "iso_c": "Iso-C", "model_stock": "Model Stock",
    "multislerp": "Multi-SLERP", "karcher": "Karcher", "average": "Avg", "regmean": "RegMean",
}
MERGE_METHODS = tuple(MERGE_LABELS)
# merges without a scale to choose (the pipeline's scale is ignored)
UNSCALED_MERGES = ("average", "model_stock", "sce", "multislerp", "karcher", "regmean")
QUANT_METHODS = ("rtn", "gptq", "epmq")
TARGETS = ("merged_path", "expert_path", "fp_path")
LABELS = {"rtn": "RTN", "gptq": "GPTQ", "epmq": "E-PMQ"}


def _anchor_key(anchor: float) -> str:
    """An anchor in result keys: every digit (``:g`` made 0.1 and 0.1000001 one key)."""
    return repr(float(anchor))


@dataclass
class MergePlan:
    """One merge: ``method`` of ``epmq.merge`` with ``params``; the scale is chosen on
    validation among ``scales`` (a single value means no choice)."""

    method: str
    scales: list = field(default_factory=lambda: [0.3])
    params: dict = field(default_factory=dict)
    label: Optional[str] = None

    def __post_init__(self):
        if not isinstance(self.method, str) or self.method not in MERGE_METHODS:
            raise ValueError(f"unknown merge method {self.method!r}: one of {', '.join(MERGE_METHODS)}")
        if not isinstance(self.scales, (list, tuple)):
            self.scales = [self.scales]
        if not self.scales:
            raise ValueError(f"merge {self.method}: no scale to choose from")
        for s in self.scales:
            check_number(s, f"merge {self.method}: each scale")
        if self.method in UNSCALED_MERGES and len(self.scales) > 1:
            raise ValueError(f"merge {self.method} has no scale: give no scales, not {self.scales}")
        if not isinstance(self.params, dict):
            raise ValueError(f"merge {self.method}: params must be a mapping name -> value, got {self.params!r}")
        from .merge_checkpoint import check_merge_params

        check_merge_params(self.method, self.params, reserved={"scale"})
        self.label = self.label or MERGE_LABELS[self.method]
        if not isinstance(self.label, str):
            raise ValueError(f"merge {self.method}: label must be a string, got {self.label!r}")
        if "/" in self.label or "\\" in self.label:
            # (it names the checkpoint folders, checkpoints/<label>-w4-...: subfolders, or past the
            # run's directory for '../', where no --fresh sets them aside)
            raise ValueError(f"merge {self.method}: label {self.label!r} names its checkpoint folders: "
                             f"give one without '/' or '\\'")


@dataclass
class Control:
    """An extra quantizer row: ``method`` with ``targets`` (e.g. GPTQ with fp-path targets)."""

    method: str
    targets: str
    label: str


def _control(i: int, c) -> Control:
    """``quantize.controls[i]`` (a mapping of method, targets and label) as a ``Control``."""
    keys = {"method", "targets", "label"}
    if not isinstance(c, dict) or set(c) != keys or not all(isinstance(v, str) for v in c.values()):
        raise ValueError(f"quantize.controls[{i}] must be a mapping of {sorted(keys)} (strings), e.g. "
                         f"{{method: gptq, targets: fp_path, label: GPTQ fp-path}}, got {c!r}")
    return Control(**c)


@dataclass
class Plan:
    merges: list = field(default_factory=lambda: [MergePlan("task_arithmetic")])
    methods: list = field(default_factory=lambda: list(QUANT_METHODS))
    bits: list = field(default_factory=lambda: [4, 3, 2])
    group_size: int = 128
    sym: bool = False
    act_order: bool = False
    static_groups: bool = False
    anchors: list = field(default_factory=lambda: [1.0])
    weight_anchor: float = 0.0
    targets: str = "merged_path"
    controls: list = field(default_factory=lambda: [Control("gptq", "fp_path", "GPTQ fp-path")])
    save_checkpoints: bool = True
    backend: Optional[str] = None
    # E-PMQ's residual product on the GPU (quantize_model); None: the library's default
    residual_precision: Optional[str] = None

    def __post_init__(self):
        for name in ("merges", "methods", "bits", "anchors", "controls"):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise ValueError(f"quantize.{name} must be a list, got {getattr(self, name)!r}")
        self.merges = [m if isinstance(m, MergePlan) else MergePlan(**m) for m in self.merges]
        self.controls = [c if isinstance(c, Control) else _control(i, c) for i, c in enumerate(self.controls)]
        # (the run evaluated base and experts, then its report's plot had no panel: a matplotlib ValueError)
        if not self.merges:
            raise ValueError("merges is empty: give at least one merge to quantize")
        if not self.bits:
            raise ValueError("quantize.bits is empty: give the bit widths to quantize to")
        if not self.methods and not self.controls:
            raise ValueError("quantize.methods and quantize.controls are both empty: nothing to quantize with")
        for name in ("save_checkpoints", "sym", "act_order", "static_groups"):
            if not is_flag(getattr(self, name)):
                raise ValueError(f"quantize.{name} must be true or false, got {getattr(self, name)!r}")
            # (numpy's held as Python's: a row's identity is JSON, np.True_ there the string 'True')
            setattr(self, name, bool(getattr(self, name)))
        repeated = sorted({b for b in self.bits if self.bits.count(b) > 1})
        if repeated:
            raise ValueError(f"quantize.bits repeats {repeated}: each width is one row of the table")
        if self.backend not in (None, "torch", "triton"):
            raise ValueError(f"quantize.backend must be torch or triton (or absent), got {self.backend!r}")
        check_number(self.weight_anchor, "quantize.weight_anchor", minimum=0.0)
        for a in self.anchors:
            check_number(a, "quantize.anchors: each anchor", minimum=0.0)
        keys = [_anchor_key(a) for a in self.anchors]
        if len(set(keys)) != len(keys):
            raise ValueError(f"quantize.anchors repeats a value: {self.anchors}")
        for what, labels in (("merge", [m.label for m in self.merges]),
                             ("quantizer", [LABELS.get(m, m) for m in self.methods] + [c.label for c in self.controls])):
            repeated = sorted({x for x in labels if labels.count(x) > 1})
            if repeated:
                raise ValueError(f"two {what}s are labelled {repeated}: give each its own label "
                                 f"(their results would overwrite each other)")
        for m in self.methods:
            if m not in QUANT_METHODS:
                raise ValueError(f"unknown quantization method {m!r}: one of {', '.join(QUANT_METHODS)}")
        for c in self.controls:
            if c.method not in QUANT_METHODS or c.targets not in TARGETS:
                raise ValueError(f"control {c.label!r}: method must be one of {QUANT_METHODS}, targets one of {TARGETS}")
            # (quantize_model's rules, said before any row is computed)
            if c.method == "gptq" and c.targets == "expert_path":
                raise ValueError(f"control {c.label!r}: targets 'expert_path' needs experts: only epmq reads them")
        # (the targets each row runs with: quantize.targets is E-PMQ's, RTN and GPTQ rows of
        # quantize.methods quantize merged-path, as Runner.run does)
        # (RTN reads no targets: its rows of any targets are one computation)
        rows = [(m, "any" if m == "rtn" else self.method_targets(m)) for m in self.methods]
        rows += [(c.method, "any" if c.method == "rtn" else c.targets) for c in self.controls]
        twice = sorted({row for row in rows if rows.count(row) > 1})
        if twice:  # (the same computation twice, into one checkpoint folder, each row's clean-up the other's loss)
            method, targets = twice[0]
            raise ValueError(f"two quantizer rows are {method} with targets {targets!r} (quantize.methods with "
                             f"quantize.targets, and quantize.controls; RTN reads none): drop one")
        if self.residual_precision is not None:
            check_residual_precision(self.residual_precision, "residual_precision")
        if self.targets not in TARGETS:
            raise ValueError(f"targets must be one of {', '.join(TARGETS)}, got {self.targets!r}")
        if not self.anchors:
            raise ValueError(f"anchors must be a non-empty list of values >= 0, got {self.anchors}")
        for b in self.bits:
            try:
                self.spec(b)  # validates bits and group size early, with QuantSpec's message
            except ValueError as e:  # (which names its field, not the config's key it came from)
                raise ValueError(f"quantize.{e}") from None

    def method_targets(self, method: str) -> str:
        """The targets a row of ``methods`` quantizes with: ``targets`` for E-PMQ, merged-path
        for RTN and GPTQ (the paper's baselines; other targets are controls)."""
        return self.targets if method == "epmq" else "merged_path"

    def spec(self, bits: int) -> QuantSpec:
        return QuantSpec(bits=bits, group_size=self.group_size, sym=self.sym,
                         act_order=self.act_order, static_groups=self.static_groups)

    @classmethod
    def from_config(cls, merge: Optional[list], quantize: Optional[dict]) -> "Plan":
        """A plan from a config's ``merge`` list and ``quantize`` section; unknown keys raise."""
        fields = {f for f in cls.__dataclass_fields__ if f != "merges"}
        if quantize is not None and not isinstance(quantize, dict):
            raise ValueError(f"quantize must be a mapping of options, got {quantize!r}")
        quantize = dict(quantize or {})
        unknown = sorted(set(quantize) - fields)
        if unknown:
            raise ValueError(f"quantize: unknown keys {unknown}; allowed: {sorted(fields)}")
        merges = []
        if merge is not None and not isinstance(merge, list):
            raise ValueError(f"merge must be a list of merges (each a mapping with a method), got {merge!r}")
        if merge == []:  # (it was read as no merge given: the default ran in its place, unsaid)
            raise ValueError("merge is empty: list at least one merge, or leave merge out for Task Arithmetic")
        for i, m in enumerate(merge or [{"method": "task_arithmetic"}]):
            if not isinstance(m, dict):
                raise ValueError(f"merge[{i}] must be a mapping with a method, got {m!r}")
            allowed = {"method", "scales", "scale", "params", "label"}
            bad = sorted(set(m) - allowed)
            if bad:
                raise ValueError(f"merge[{i}]: unknown keys {bad}; allowed: {sorted(allowed)}")
            m = dict(m)
            if "scale" in m:
                if "scales" in m:
                    raise ValueError(f"merge[{i}] gives both scale and scales: give one (scale: one value)")
                m["scales"] = m.pop("scale")
            if "method" not in m:
                raise ValueError(f"merge[{i}] needs a method ({', '.join(MERGE_METHODS)})")
            if "scales" in m and m["method"] in UNSCALED_MERGES:
                # (one value was accepted and never applied: the row read as a scaled merge)
                raise ValueError(f"merge[{i}]: {m['method']} has no scale: remove its scale(s)")
            merges.append(MergePlan(**m))
        plan = cls(merges=merges, **quantize)
        # keys of quantize that no row of the plan reads (anchors left after epmq was dropped from
        # methods, targets: fp_path beside GPTQ alone) were accepted and ignored, as epmq quantize
        # refuses them: quantize.targets is the E-PMQ rows of methods'; the anchors and the
        # residual's precision any E-PMQ row's; act-order and static groups GPTQ's and E-PMQ's
        rows = set(plan.methods) | {c.method for c in plan.controls}
        readers = {"targets": set(plan.methods) & {"epmq"}, "anchors": rows & {"epmq"},
                   "weight_anchor": rows & {"epmq"}, "residual_precision": rows & {"epmq"},
                   "act_order": rows & {"gptq", "epmq"}, "static_groups": rows & {"gptq", "epmq"}}
        unread = sorted(k for k, read_by in readers.items() if k in quantize and not read_by)
        if unread:
            raise ValueError(f"quantize: {', '.join(unread)} {'is' if len(unread) == 1 else 'are'} read by no "
                             f"quantizer of the plan (methods {plan.methods}, controls "
                             f"{[c.method for c in plan.controls]}): remove {'it' if len(unread) == 1 else 'them'}")
        return plan


# --------------------------------------------------------------------------- results store


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


REPORT_FILES = ("table.md", "accuracy.png", "accuracy_per_task.png")  # what report() writes


class ResultsFileError(ValueError):
    """A ``results.json`` in the output directory that epmq did not write (a user's problem:
    ``epmq run`` and ``epmq demo`` print it without a traceback)."""


class Store:
    """``results.json``: one entry a step, each remembering the parameters it was run with."""

    def __init__(self, out_dir: Path, identity: dict, resume: bool, log: Callable = print):
        self.path = Path(out_dir) / "results.json"
        if (Path(out_dir) / "checkpoints").is_dir():  # (checkpoints a killed run half wrote)
            remove_stale_temporaries(Path(out_dir) / "checkpoints", "*")
        identity = json.loads(json.dumps(identity, default=str))  # (as it reads back)
        self.identity = identity
        self.data = {"identity": identity, "steps": {}}
        self.now = {}  # the steps this run has done or reused: its plan's, never an earlier plan's
        theirs = [name for name in REPORT_FILES if (Path(out_dir) / name).exists()]
        # (a run writes its checkpoints after its results.json: a folder of them without it is the user's,
        # whose files the run's were written among, and moved aside with them by a later --fresh)
        checkpoints = Path(out_dir) / "checkpoints"
        if checkpoints.is_dir() and any(not (p.name.startswith(".") and ".tmp-" in p.name)  # (a run's temporaries)
                                        for p in checkpoints.iterdir()):
            theirs.append("checkpoints/")
        if theirs and not self.path.exists():  # (report() writes them beside a results.json: not a run's)
            raise ResultsFileError(f"{out_dir} holds {', '.join(theirs)} but no results.json: not a directory epmq "
                                   f"run writes into, and the run's report and checkpoints would replace or mix "
                                   f"with them; give another output directory or move them")
        if self.path.exists():
            old = read_json(self.path, strict=True)  # (an unreadable disk raises as itself)
            # (epmq writes it atomically: damaged by something else; a JSON object without epmq's
            # steps, another tool's results.json, was written over as if it held no results)
            if not isinstance(old, dict) or not isinstance(old.get("steps"), dict):
                raise ResultsFileError(
                    f"{self.path} is not a results file epmq wrote (not a JSON object with its steps): move "
                    f"it away to start over; the checkpoints beside it are left as they are")
            if resume and old.get("identity") == identity:
                self.data = old
            elif old.get("steps"):
                why = ("[fresh] " if not resume else
                       f"[resume] {self.path} was written for another bench, on other hardware or under "
                       f"other float settings of torch, or by another version of epmq or of its models or "
                       f"data (differs in "
                       f"{changed_keys(old.get('identity') or {}, identity)}): ")
                kept = self._set_aside(Path(out_dir))
                # at once, not at the first step: a run stopped before it would set the earlier
                # run aside again (a second copy naming checkpoints this run then writes)
                write_json_atomic(self.path, self.data)
                log(f"{why}starting over; the earlier results are kept in {', '.join(str(k) for k in kept)}")

    def _set_aside(self, out_dir: Path) -> list:
        """The earlier run's results (a copy), report and checkpoints (moved), under names of their time,
        so that no run overwrites another's (a second change of the config, ``--fresh``). The
        copy, naming where the checkpoints go, is written before they move; a set-aside stopped
        in between is finished under the same name by the next run."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.path.stat().st_mtime))
        checkpoints = out_dir / "checkpoints"
        moving = checkpoints.is_dir() and any(checkpoints.iterdir())
        earlier = read_json(self.path)
        n = 1
        while True:
            tag = f"before-{stamp}{'' if n == 1 else f'-{n}'}"
            kept = [out_dir / f"results.{tag}.json", out_dir / f"checkpoints.{tag}"]
            content = _moved(earlier, checkpoints, kept[1]) if moving else earlier
            if not any(k.exists() for k in kept):
                break
            if read_json(kept[0]) == content and not kept[1].exists():
                break  # (this very set-aside, stopped before the checkpoints moved)
            n += 1
        write_json_atomic(kept[0], content)
        # its report too (table.md, the plots), under the same tag: left in place, it showed the
        # earlier run's numbers beside the new results.json until the new run's report, which a
        # run stopped before its end never writes
        reports = []
        for name in REPORT_FILES:
            if (out_dir / name).exists():
                reports.append(out_dir / f"{Path(name).stem}.{tag}{Path(name).suffix}")
                os.replace(out_dir / name, reports[-1])
        if not moving:
            return kept[:1] + reports
        # the kept results name the checkpoints where they now are (the new run writes its own
        # under the old names)
        checkpoints.rename(kept[1])
        return kept + reports

    def get(self, key: str, params: dict):
        step = self.data["steps"].get(key)
        if step is not None and step.get("params_digest") == _digest(params):
            self.now[key] = step
            return step
        return None

    def put(self, key: str, params: dict, result: dict) -> dict:
        result = dict(result, params=params, params_digest=_digest(params))
        self.data["steps"][key] = result
        self.now[key] = result
        write_json_atomic(self.path, self.data)
        return result


def _moved(value, old: Path, new: Path):
    """``value`` with the paths under directory ``old`` under ``new`` instead (also those that
    reach it through a link: a run started through a symlink to its directory names its
    checkpoints so, and one started later through the real path set them aside still named
    there, where the new run writes its own)."""
    old, real, new = str(old.absolute()), old.resolve(), str(new.absolute())

    def moved(value):
        if isinstance(value, dict):
            return {k: moved(v) for k, v in value.items()}
        if isinstance(value, list):
            return [moved(v) for v in value]
        if isinstance(value, str) and (value == old or value.startswith((old + "/", old + os.sep))):
            return new + value[len(old):]
        if isinstance(value, str) and os.path.isabs(value):
            path = Path(value).resolve()
            if path == real or real in path.parents:
                return str(Path(new, path.relative_to(real)))
        return value

    return moved(value)


# --------------------------------------------------------------------------- running


def merged_state(bench, plan: MergePlan, scale):
    """The bench's experts merged as ``plan`` says, with ``scale``."""
    # (no bar of the merge's tensors: a merge of each scale, seconds each, between the steps' own lines)
    progress = False
    experts = [bench.experts[t] for t in bench.task_names]
    if plan.method in ("average", "karcher"):  # (the experts alone)
        return getattr(merge_lib, plan.method)(experts, progress=progress, **plan.params)
    if plan.method == "regmean":
        grams = expert_grams(bench)  # task -> name -> Gram
        per_name = {n: [grams[t][n] for t in bench.task_names] for n in grams[bench.task_names[0]]}
        return merge_lib.regmean(experts, per_name, progress=progress, **plan.params)
    fn = getattr(merge_lib, plan.method)
    if plan.method in UNSCALED_MERGES:
        return fn(bench.base_state, experts, progress=progress, **plan.params)
    return fn(bench.base_state, experts, scale=scale, progress=progress, **plan.params)


def check_merges(plan: Plan, n_experts: int) -> None:
    """ValueError, naming the merge, for parameters its method refuses with ``n_experts``
    experts (weights of another length, a density past 1, Model Stock with one expert): each
    merge of ``plan`` run once on a tiny random state. They were found at the merge itself, after
    the base's and the experts' evaluations, and ``epmq run`` ended there in a traceback."""
    import types
    import warnings

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(4, 4, generator=g)}
    experts = {f"t{k}": {"w": base["w"] + torch.randn(4, 4, generator=g)} for k in range(n_experts)}
    tiny = types.SimpleNamespace(base_state=base, experts=experts, task_names=list(experts),
                                 _epmq_expert_grams={t: {"w": torch.eye(4)} for t in experts})
    for mp in plan.merges:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                merged_state(tiny, mp, mp.scales[0])
        except ValueError as e:
            raise ValueError(f"merge {mp.label}: {e}") from e


def expert_grams(bench, progress: bool = False) -> dict:
    """task -> ``{linear weight name: X^T X}`` of the task's expert on the task's calibration
    inputs (RegMean's statistics), computed once per bench; ``progress``: a bar of each task's
    batches."""
    from tqdm.auto import tqdm

    from .stats import gram_matrices

    cached = getattr(bench, "_epmq_expert_grams", None)
    if cached is None:
        cached = {t: gram_matrices(bench.model(bench.experts[t]),
                                   tqdm(bench.calibration[t], desc=f"regmean: task {t}'s Gram matrices",
                                        unit="batch", leave=False, disable=not progress), task=t)
                  for t in bench.task_names}
        bench._epmq_expert_grams = cached
    return cached


def _val(avg: float) -> float:
    """A validation average as compared: equal averages of equal counts are equal (sums of
    per-task fractions differ in the last bits by order, 0.39999999999999997 against 0.4), so
    that ties go to the first candidate as documented."""
    return round(avg, 12)


def choose_scale(bench, plan: MergePlan, progress: bool = False):
    """``(scale, merged state, {scale: val avg})``: the scale of ``plan.scales`` whose merge has
    the best average accuracy on the validation split (never test); ties go to the first.
    One merged model is held at a time: the best one's scale is kept, and it is merged again
    unless it was the last (keeping its state held two while the next was merged).
    ``progress``: a bar of the merges, naming the scale being merged."""
    return _choose_scale(bench, plan, progress)[:3]


def _choose_scale(bench, plan: MergePlan, progress: bool = False):
    """``choose_scale``'s answer and the chosen merge's validation accuracies (``evaluate``'s)."""
    best, scores, state = None, {}, None
    # (a merge and a validation pass a scale, ten scales a merge in the paper configs: minutes
    # at paper scale, said by nothing until the step's line)
    with _merges_bar(plan, len(plan.scales), progress) as bar:
        for i, s in enumerate(plan.scales):
            state = None  # (the last candidate's, dropped before the next is made)
            state = _merged_shown(bench, plan, s, bar)
            val = bench.evaluate(state, split="val")
            scores[str(s)] = val["avg"]
            if best is None or _val(scores[str(s)]) > _val(best[0]):
                best = (scores[str(s)], s, i, val)
        if best[2] != len(plan.scales) - 1:
            state = None
            bar.total += 1
            state = _merged_shown(bench, plan, best[1], bar, " again (the best)")
    return best[1], state, scores, best[3]


def _merges_bar(plan: MergePlan, total: int, progress: bool):
    """A bar of ``total`` merges of ``plan`` (the merges' own bars, of their tensors, are off)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"merge/{plan.label}", unit="merge", leave=False, disable=not progress)


def _merged_shown(bench, plan: MergePlan, scale, bar, note: str = ""):
    """``merged_state``, counted on ``bar``, which names the scale being merged."""
    if plan.method not in UNSCALED_MERGES:
        bar.set_postfix_str(f"scale {_number(scale)}{note}")
    state = merged_state(bench, plan, scale)
    bar.update()
    return state


class Runner:
    def __init__(self, bench, plan: Plan, out_dir, *, resume=True, progress=True, log: Callable = print,
                 identity: Optional[dict] = None):
        # (absolute: results.json names the checkpoints, whatever directory it is read from)
        self.bench, self.plan, self.out = bench, plan, Path(out_dir).absolute()
        self.progress, self.log = progress, log
        if identity is None:
            identity = getattr(bench, "identity", None)
        if identity is None:
            # (a bench that cannot say what its numbers depend on: resuming trusts the caller that
            # out_dir holds this bench's results, as the log says)
            identity = {"bench": f"{type(bench).__module__}.{type(bench).__qualname__}",
                        "tasks": list(bench.task_names)}
            if resume:
                log(f"[resume] {type(bench).__name__} has no identity: results in {self.out} are taken "
                    f"as its own by its class and task names (pass identity= to tell benches apart)")
        from .walker import arithmetic_identity

        # every cell's forward and solve runs under torch's float arithmetic (TF32) on the bench's
        # hardware (a CPU's thread count): a run under others is another's, as a walk's is
        identity = dict(identity, **arithmetic_identity(torch.device(getattr(bench, "device", "cpu"))))
        self.store = Store(self.out, identity, resume, log)
        self._plots_gone = False
        self._serving_said = set()  # (the engine warnings of the run's checkpoints said so far)
        self._chosen = None  # (the merged state its merge step chose, while the run takes it)

    def step(self, key: str, params: dict, fn: Callable[[], dict], *, redo: bool = False) -> dict:
        done = None if redo else self.store.get(key, params)
        if done is not None:
            self.log(f"[resume] {key}: done before")
            self._write_table()
            return done
        t0 = time.perf_counter()
        result = fn()
        # (results.json holds numbers only: a NaN literal is not JSON, strict parsers refuse the file)
        bad = [f"{split}[{task!r}] = {v}" for split in ("val", "test") for task, v in (result.get(split) or {}).items()
               if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            raise ValueError(f"{key}: the bench returned accuracies that are not numbers ({', '.join(bad[:4])})")
        result["seconds"] = time.perf_counter() - t0
        self.log(f"{key}: avg val {result.get('val', {}).get('avg', float('nan')):.4f} "
                 f"test {result.get('test', {}).get('avg', float('nan')):.4f} ({result['seconds']:.1f} s)")
        result = self.store.put(key, params, result)
        self._write_table()
        return result

    def _write_table(self) -> None:
        """table.md as this run stands: the rows of its plan done so far (report() writes the
        whole report at its end). A resumed run with another plan, stopped before its report,
        left the earlier plan's table, its rows beside a results.json that no longer gives them."""
        now = self.store.now
        if "base" in now and "experts" in now:
            results = {"identity": self.store.identity, "steps": now}
            write_table(self.out, report_text(results, self.plan, list(self.bench.task_names)))
            if not self._plots_gone:
                # the plots an earlier report drew (another plan's bars, stopped before this run's
                # report, stayed beside this run's table); report() draws this run's. Not redrawn
                # per step: the demo's two plots take ~3 s to draw on 2 cores, for each of ~100 cells
                for name in REPORT_FILES[1:]:
                    (self.out / name).unlink(missing_ok=True)
                self._plots_gone = True

    def evaluate(self, model_or_state) -> dict:
        return {"val": self.bench.evaluate(model_or_state, split="val"),
                "test": self.bench.evaluate(model_or_state, split="test")}

    def run(self) -> dict:
        bench, plan = self.bench, self.plan
        check_merges(plan, len(bench.task_names))  # (before the evaluations, not after them)
        self._done_before()
        self.step("base", {}, lambda: self.evaluate(bench.base_state))
        self.step("experts", {}, lambda: {"val": bench.expert_accuracies("val"),
                                          "test": bench.expert_accuracies("test")})
        for mp in plan.merges:
            if mp.method == "regmean":  # (its passes, a task each, shown as they run; a resumed merge's too)
                expert_grams(bench, progress=self.progress)
            merged = self.step(f"merge/{mp.label}", _merge_params(mp), lambda mp=mp: self._choose_scale(mp))
            state, self._chosen = self._chosen, None
            if state is None:  # (the step was done before: its chosen scale merged again, shown)
                with _merges_bar(mp, 1, self.progress) as bar:
                    state = _merged_shown(bench, mp, merged["scale"], bar)
            for bits in plan.bits:
                for method, targets, label in self._rows():
                    self._quantize_rows(mp, merged["scale"], state, bits, method, targets, label)
        return self.store.data

    def _rows(self) -> list:
        """``(method, targets, label)`` of each quantizer row, the plan's methods then its controls."""
        plan = self.plan
        return ([(m, plan.method_targets(m), LABELS[m]) for m in plan.methods]
                + [(c.method, c.targets, c.label) for c in plan.controls])

    def _done_before(self) -> None:
        """The plan's cells that results.json holds with this plan's parameters, which the run
        reuses, in the table from its start: it showed only the rows the run had reached, so while
        a resumed run computed the cells its new plan added (hours at paper scale), and after a
        stop, the rows it was about to reuse were missing."""
        plan, get = self.plan, self.store.get
        if get("base", {}) is None or get("experts", {}) is None:
            return
        for mp in plan.merges:
            merged = get(f"merge/{mp.label}", _merge_params(mp))
            for bits in plan.bits if merged is not None else []:
                for method, targets, label in self._rows():
                    anchors = plan.anchors if method == "epmq" else [None]
                    done = [get(_quant_key(mp.label, bits, label, a),
                                self._cell_params(mp, merged["scale"], bits, method, targets, a)) for a in anchors]
                    if anchors != [None] and None not in done:
                        get(_quant_key(mp.label, bits, label), {"chosen_from": [r["params"]["anchor"] for r in done]})
        self._write_table()

    def _choose_scale(self, mp: MergePlan) -> dict:
        scale, state, scores, val = _choose_scale(self.bench, mp, self.progress)
        # (its validation accuracies are those it was chosen by: evaluated again, a whole pass a merge)
        result = dict(val=val, test=self.bench.evaluate(state, split="test"), scale=scale, val_by_scale=scores)
        self._chosen = state  # (what the run quantizes next: it was merged again, a whole merge)
        return result

    def _cell_params(self, mp, scale, bits, method, targets, anchor) -> dict:
        # the merge this quantizes (its method and parameters: its label alone may stay the
        # same while they change), then the quantizer
        params = {"merge": mp.label, "merge_method": mp.method, "merge_params": mp.params,
                  "scale": scale, "spec": self.plan.spec(bits).to_dict(),
                  "method": method, "targets": targets, "anchor": anchor,
                  "weight_anchor": self.plan.weight_anchor if method == "epmq" else None}
        if method == "epmq" and self.plan.residual_precision is not None:
            # only when set, so that results stored before the option existed still match
            params["residual_precision"] = self.plan.residual_precision
        backend = resolve_backend(self.plan.backend, torch.device(getattr(self.bench, "device", "cpu")))
        if method != "rtn" and (self.plan.backend is not None or backend != "torch"):
            # the solver's kernels (Triton or torch) round apart, and GPTQ's sequential rounding
            # carries that on: a backend switched for a comparison, or by moving the model to a
            # GPU (Triton by default there), must not be served the other's numbers (recorded
            # where set or Triton, so that results stored before the option existed still match)
            params["backend"] = backend
        return params

    def _quantize_rows(self, mp, scale, state, bits, method, targets, label):
        anchors = self.plan.anchors if method == "epmq" else [None]
        runs, cells = [], []
        for anchor in anchors:
            params = self._cell_params(mp, scale, bits, method, targets, anchor)
            key = _quant_key(mp.label, bits, label, anchor)
            def run(a=anchor, p=params):
                return self._quantize(state, bits, method, targets, a, p)

            runs.append(self.step(key, params, run))
            cells.append((key, params, run))
        i = max(range(len(runs)), key=lambda j: _val(runs[j]["val"]["avg"]))  # chosen on validation
        own = self.out / "checkpoints"
        for j, r in enumerate(runs):
            # (a copy of a run's directory: its results.json names the original's checkpoints, and
            # its own checkpoints/ holds their copies under the same names: those are this run's)
            copied = _copied_checkpoint(r, own)
            if copied is not None:
                runs[j] = self.store.put(cells[j][0], cells[j][1], dict(r, checkpoint=str(copied)))
        if self.plan.save_checkpoints and not _has_checkpoint(runs[i], own):
            # (a cell done before whose checkpoint is gone: an unchosen anchor's, or one run
            # without saving; or one in another directory, a copied run's original): the chosen
            # cell's checkpoint is what the run delivers, in its own directory
            self.log(f"[resume] {cells[i][0]}: its checkpoint is missing from {own}, quantizing again")
            runs[i] = self.step(*cells[i], redo=True)
        # keep the chosen anchor's checkpoint only: the others were candidates. Only this run's
        # own are deleted: a copy of a run's directory names the original's checkpoints, which
        # the copy's run deleted as candidates (the original's chosen ones among them)
        for j, r in enumerate(runs):
            if j != i and r.get("checkpoint"):
                if _has_checkpoint(r, own):
                    # moved off its name first (to a temporary the next run removes): deleted in
                    # place, a deletion stopped half way left a folder short of files under the
                    # name results.json gives the cell, delivered whole by a run choosing it later
                    doomed = Path(r["checkpoint"])
                    gone = temporary_beside(doomed, unique=True)
                    os.rename(doomed, gone)
                    shutil.rmtree(gone)
                runs[j] = self.store.put(cells[j][0], cells[j][1], dict(r, checkpoint=None))
        if anchors != [None]:
            best = runs[i]
            self.store.put(_quant_key(mp.label, bits, label), {"chosen_from": [r["params"]["anchor"] for r in runs]},
                           dict(best, chosen_anchor=best["params"]["anchor"]))
            self._write_table()

    def _quantize(self, state, bits, method, targets, anchor, params) -> dict:
        from . import quantize_model, save_quantized

        bench, plan = self.bench, self.plan
        model = bench.model(state)
        kwargs = dict(method=method, calibration=bench.calibration, targets=targets,
                      backend=plan.backend, progress=self.progress)
        if method == "epmq":
            kwargs["experts"] = {t: bench.experts[t] for t in bench.task_names}
            kwargs.update(anchor=anchor, weight_anchor=plan.weight_anchor)
            if plan.residual_precision is not None:
                kwargs["residual_precision"] = plan.residual_precision
        model = quantize_model(model, plan.spec(bits), **kwargs)
        result = self.evaluate(model)
        report = getattr(model, "epmq_report", None)
        if report is not None:
            result["layers"] = len(report.layers)
            result["loss"] = sum(r.get("loss") or 0.0 for r in report.layers)
        if plan.save_checkpoints:
            name = "-".join(str(v) for v in (params["merge"], f"w{bits}", method, targets, anchor) if v is not None)
            path = self.out / "checkpoints" / name
            # (save_extras is optional in the protocol; written into the checkpoint atomically)
            caught = []
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    save_quantized(model, path, extras=getattr(bench, "save_extras", None), progress=self.progress)
            except BaseException:
                # (a save that raised, a full disk, says what it had warned of too, but its error is
                # the one raised: a warning made an error (-W error), or a log on that full disk,
                # raised from a finally had replaced it)
                with contextlib.suppress(Exception):
                    self._say_serving(caught, path)
                raise
            self._say_serving(caught, path)
            result["checkpoint"] = str(path)
            result["checkpoint_files"] = _checkpoint_digest(path)
        return result


    def _say_serving(self, caught, path: Path) -> None:
        """The warnings of saving checkpoint ``path``, its engine warnings in the log, each once a
        run: every checkpoint of a run is alike to engines, and they were warned for each (~80
        lines of a demo, --quiet too); the others warned as they came."""
        from .checkpoint import ServingWarning

        for w in caught:
            if not issubclass(w.category, ServingWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
            elif str(w.message) not in self._serving_said:
                self._serving_said.add(str(w.message))
                self.log(f"[checkpoint] {path.relative_to(self.out)}: {w.message} (said once for the run's "
                         f"checkpoints)")


def _merge_params(mp: MergePlan) -> dict:
    return {"method": mp.method, "scales": list(mp.scales), "params": mp.params}


def _quant_key(merge_label: str, bits: int, label: str, anchor: Optional[float] = None) -> str:
    return f"quant/{merge_label}/w{bits}/{label}" + (f"/anchor={_anchor_key(anchor)}" if anchor is not None else "")


def _has_checkpoint(result: dict, own: Path) -> bool:
    """Whether ``result`` names a checkpoint that exists in ``own``, the run's checkpoints
    directory (resolved: the same directory reached through a link is the run's own)."""
    path = result.get("checkpoint")
    return bool(path) and Path(path).is_dir() and own.resolve() in Path(path).resolve().parents


def _copied_checkpoint(result: dict, own: Path) -> Optional[Path]:
    """The checkpoint of ``result`` in ``own`` under the name it has elsewhere (a run directory
    copied whole: results.json names the original's), where it is not ``own``'s already."""
    path = result.get("checkpoint")
    if not path or _has_checkpoint(result, own):
        return None
    if Path(path).parent.name != own.name:
        # (not another run directory's checkpoints/: an earlier run's set aside here, in
        # checkpoints.before-*, whose results a user put back; own's of that name are the later
        # run's, of another bench or config)
        return None
    here = own / Path(path).name
    # (the same files as the checkpoint the result was stored with: a folder of that name written
    # by another run or config, behind a results.json copied alone, is not it)
    recorded = result.get("checkpoint_files")
    return here if recorded is not None and _checkpoint_digest(here) == recorded else None


def _checkpoint_digest(path: Path) -> Optional[str]:
    """A digest of checkpoint ``path``'s file list (``save_quantized``'s manifest: its files'
    sizes, and the configs' contents); None without one."""
    from .checkpoint import MANIFEST_FILE

    try:
        return hashlib.sha256((Path(path) / MANIFEST_FILE).read_bytes()).hexdigest()
    except OSError:
        return None


def run(bench, plan: Plan, out_dir, *, resume=True, progress=True, log: Callable = print,
        identity: Optional[dict] = None) -> dict:
    """Run ``plan`` on ``bench``, writing ``<out_dir>/results.json`` (and ``table.md``, the plan's
    rows as they are done, an earlier report's plots removed; ``report`` writes the whole report);
    returns its content.
    ``identity`` (default: ``bench.identity``): what the results depend on; results in
    ``out_dir`` of another identity are not resumed from. One run at a time in ``out_dir``:
    ValueError, naming the process, where another holds it (``resume.hold_run``)."""
    from .resume import hold_run

    with hold_run(Path(out_dir).absolute()):
        return Runner(bench, plan, out_dir, resume=resume, progress=progress, log=log, identity=identity).run()


# --------------------------------------------------------------------------- reporting


def _precision(results: dict) -> str:
    """The unquantized models' dtype, as the table names it (the bench's ``model.dtype``)."""
    model = results.get("identity", {}).get("model")
    dtype = model.get("dtype") if isinstance(model, dict) else None
    return {"bfloat16": "bf16", "float16": "fp16"}.get(dtype, "fp32")


def _number(x: float) -> str:
    """A scale or anchor as the report shows it: short (``:g``) where that is the value, every
    digit where ``:g`` would round it (0.1 and 0.1000001 are cells of their own, both shown
    as 0.1)."""
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))


def _scale_note(mp, merged) -> str:
    """' (scale s)' for the merges a scale changes; nothing for those that take none."""
    return "" if mp.method in UNSCALED_MERGES else f" (scale {_number(merged['scale'])})"


def table_rows(results: dict, plan: Plan) -> list:
    """``(label, {task: acc, "avg": acc})`` rows in the paper's shape (test split)."""
    steps = results["steps"]
    rows = [("Base (zero-shot)", steps["base"]["test"]), ("Experts (individual)", steps["experts"]["test"])]
    labels = [LABELS[m] for m in plan.methods] + [c.label for c in plan.controls]
    for mp in plan.merges:
        merged = steps.get(f"merge/{mp.label}")
        if merged is None:
            continue
        rows.append((f"{mp.label} {_precision(results)}{_scale_note(mp, merged)}", merged["test"]))
        for bits in plan.bits:
            for label in labels:
                step = steps.get(f"quant/{mp.label}/w{bits}/{label}")
                if step is not None:
                    extra = f" (anchor {_number(step['chosen_anchor'])})" if "chosen_anchor" in step else ""
                    rows.append((f"{mp.label} w{bits} {label}{extra}", step["test"]))
    return rows


def _column_names(tasks: list, length: int) -> list:
    """The tasks' names cut to ``length`` characters, or whole where two would be cut to one
    (sentiment_en and sentiment_de were two columns headed 'sentimen')."""
    short = [t[:length] for t in tasks]
    return short if len(set(short)) == len(short) else list(tasks)


def format_table(rows: list, tasks: list) -> str:
    width = max(len(r[0]) for r in rows)
    names = _column_names(tasks, 8)
    widths = [max(8, len(n)) for n in names]
    head = f"| {'':<{width}} | " + " | ".join(f"{n:>{w}}" for n, w in zip(names, widths)) + " |      avg |"
    line = "|" + "-" * (width + 2) + "|" + "|".join("-" * (w + 2) for w in widths) + "|----------|"
    body = [f"| {label:<{width}} | "
            + " | ".join(f"{100 * accs.get(t, float('nan')):{w}.1f}" for t, w in zip(tasks, widths))
            + f" | {100 * accs['avg']:8.1f} |" for label, accs in rows]
    return "\n".join([head, line] + body)


def ablation_rows(results: dict, plan: Plan) -> list:
    """The validation and test average of every E-PMQ row (the method's, and the controls that
    run E-PMQ, as its expert-path one) for every anchor tried, per merge and bit width."""
    steps = results["steps"]
    labels = [LABELS["epmq"]] * ("epmq" in plan.methods) + [c.label for c in plan.controls if c.method == "epmq"]
    out = []
    for mp in plan.merges:
        for bits in plan.bits:
            for label in labels:
                for anchor in plan.anchors:
                    step = steps.get(_quant_key(mp.label, bits, label, anchor))
                    if step is not None:
                        out.append((mp.label, bits, label, anchor, step["val"]["avg"], step["test"]["avg"]))
    return out


def format_ablation(rows: list) -> str:
    lines = ["| merge | bits | quantizer | anchor | val avg | test avg |", "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {b} | {q} | {_number(a)} | {100 * v:.1f} | {100 * t:.1f} |" for m, b, q, a, v, t in rows]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    # (the format said, as matplotlib reads it off the name: the temporary's does not end in it)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format=Path(path).suffix[1:] or "png"))
    _pyplot().close(fig)


def _score_axis(ax) -> None:
    """0 to 100, extended below 0 for scores that go there (a negative correlation, STS-B)."""
    lows = [bar.get_height() for bar in ax.patches if math.isfinite(bar.get_height())]
    ax.set_ylim(min([0.0] + [v - 5 for v in lows if v < 0]), 100)


def _quantizer_labels(plan: Plan) -> list:
    return [LABELS[m] for m in plan.methods] + [c.label for c in plan.controls]


def _test_acc(steps: dict, key: str, task: str = "avg") -> float:
    return 100 * steps.get(key, {}).get("test", {}).get(task, float("nan"))


def _colour(series: int) -> str:
    """The colour of a series in both plots of the report: 0 the experts, 1 the unquantized
    merge, 2 on each quantizer in the plan's order (accuracy.png drew the quantizers from C0 and
    accuracy_per_task.png from C2: E-PMQ green in one, RTN green in the other)."""
    return f"C{series}"


def _legend_below(fig, axes) -> None:
    """The first panel's legend under the panels, in as many rows as the figure's width needs
    (one row of 7 entries under a single 5.5-inch panel, ``epmq demo --quick``'s, ran off both
    edges: "merged fp32" and the last quantizer's name were cut); the panels, their tick labels
    included, are laid out above it."""
    handles, names = axes[0][0].get_legend_handles_labels()
    renderer = fig.canvas.get_renderer()
    for ncol in range(min(len(names), 8), 0, -1):
        legend = fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize=8)
        if ncol == 1 or legend.get_window_extent(renderer).width <= 0.98 * fig.bbox.width:
            break
        legend.remove()
    height = legend.get_window_extent(renderer).height / fig.bbox.height
    fig.tight_layout(rect=(0, min(0.5, height + 0.02), 1, 1))


def plot(results: dict, plan: Plan, path) -> None:
    """Average test accuracy per bit width and quantizer, one panel a merge."""
    plt = _pyplot()
    steps = results["steps"]
    labels = _quantizer_labels(plan)
    fig, axes = plt.subplots(1, len(plan.merges), figsize=(5.5 * len(plan.merges), 4.4), squeeze=False)
    for ax, mp in zip(axes[0], plan.merges):
        merged = steps.get(f"merge/{mp.label}")
        if merged is None:
            continue
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            ys = [_test_acc(steps, f"quant/{mp.label}/w{b}/{label}") for b in plan.bits]
            ax.bar([j + (i - (len(labels) - 1) / 2) * width for j in range(len(plan.bits))], ys, width, label=label,
                   color=_colour(2 + i))
        ax.axhline(100 * merged["test"]["avg"], color=_colour(1), ls="--", lw=1, label=f"merged {_precision(results)}")
        ax.axhline(100 * steps["experts"]["test"]["avg"], color=_colour(0), ls=":", lw=1, label="experts")
        ax.axhline(100 * steps["base"]["test"]["avg"], color="grey", ls="-.", lw=1, label="base")
        ax.set_xticks(range(len(plan.bits)), [f"{b}-bit" for b in plan.bits])
        _score_axis(ax)
        ax.set_ylabel("average test accuracy (%)")
        ax.set_title(f"{mp.label}{_scale_note(mp, merged)}")
    _legend_below(fig, axes)
    _save(fig, path)


def plot_per_task(results: dict, plan: Plan, tasks: list, path) -> None:
    """Test accuracy per task: experts, each merge unquantized and its quantizers, one panel per
    merge and bit width."""
    plt = _pyplot()
    steps = results["steps"]
    labels = _quantizer_labels(plan)
    rows, cols = len(plan.merges), len(plan.bits)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.4 * rows), squeeze=False)
    for r, mp in enumerate(plan.merges):
        for c, bits in enumerate(plan.bits):
            ax = axes[r][c]
            series = [("experts", "experts"), (f"merged {_precision(results)}", f"merge/{mp.label}")]
            series += [(label, f"quant/{mp.label}/w{bits}/{label}") for label in labels]
            width = 0.85 / len(series)
            for i, (name, key) in enumerate(series):
                ys = [_test_acc(steps, key, t) for t in tasks]
                ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(tasks))], ys, width, label=name,
                       color=_colour(i))
            ax.set_xticks(range(len(tasks)), _column_names(tasks, 10), rotation=45, ha="right", fontsize=7)
            _score_axis(ax)
            ax.set_title(f"{mp.label}, {bits}-bit", fontsize=9)
            if c == 0:
                ax.set_ylabel("test accuracy (%)")
    _legend_below(fig, axes)
    _save(fig, path)


def report_text(results: dict, plan: Plan, tasks: list) -> str:
    """The table (and the anchor ablation) of ``plan``'s rows in ``results``."""
    text = format_table(table_rows(results, plan), tasks)
    ablation = ablation_rows(results, plan)
    if len(plan.anchors) > 1 and ablation:
        text += "\n\nE-PMQ anchor ablation (chosen on validation):\n" + format_ablation(ablation)
    return text


def write_table(out: Path, text: str) -> None:
    # (UTF-8 whatever the locale: task names may be of any script)
    write_atomic(out / REPORT_FILES[0], lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))


def report(results: dict, plan: Plan, tasks: list, out_dir) -> str:
    """Print-ready tables; also writes ``table.md``, ``accuracy.png`` and
    ``accuracy_per_task.png`` into ``out_dir``."""
    text = report_text(results, plan, tasks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table, accuracy, per_task = (out / name for name in REPORT_FILES)
    write_table(out, text)
    plot(results, plan, accuracy)
    plot_per_task(results, plan, tasks, per_task)
    return text


def plan_dict(plan: Plan) -> dict:
    return asdict(plan)
