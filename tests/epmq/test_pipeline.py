"""epmq.pipeline on a bench without a model: which stored cells are reused, what is chosen on
validation, what the table and the report say (the quantizer replaced by a recording stub)."""

import json
import os
import re
from pathlib import Path

import pytest
import torch

from epmq import pipeline
from epmq.pipeline import MergePlan, Plan
from epmq.resume import RUN_LOCK_FILE


class Bench:
    task_names = ["a", "b"]

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.base_state = {"w": torch.randn(4, 4, generator=g)}
        self.experts = {t: {"w": self.base_state["w"] + torch.randn(4, 4, generator=g)} for t in self.task_names}
        self.calibration = {t: [] for t in self.task_names}

    def evaluate(self, state, split="test"):
        return {"a": 0.5, "b": 0.5, "avg": 0.5}

    def expert_accuracies(self, split="test"):
        return {"a": 1.0, "b": 1.0, "avg": 1.0}


class Named(Bench):
    """A bench of its own identity (``name``) scoring every task ``score``."""

    def __init__(self, name, score):
        super().__init__()
        self.identity, self.score = {"model": name}, score

    def evaluate(self, state, split="test"):
        return {"a": self.score, "b": self.score, "avg": self.score}


class Calls(list):
    pass


@pytest.fixture
def quiet():
    return lambda msg: None


def plan(**kw):
    options = dict(merges=[MergePlan("task_arithmetic", scales=[0.3])], methods=["rtn", "gptq", "epmq"],
                   bits=[4], anchors=[0.1], controls=[], save_checkpoints=False)
    options.update(kw)
    return Plan(**options)


@pytest.fixture
def calls_list(monkeypatch):
    calls = Calls()
    calls.scores = {}

    def fake(self, state, bits, method, targets, anchor, params):
        calls.append((method, targets, anchor, params))
        val, test = calls.scores.get(anchor, (0.5, 0.5))
        return {"val": {"avg": val}, "test": {"avg": test}}

    monkeypatch.setattr(pipeline.Runner, "_quantize", fake)
    return calls


def test_the_anchor_is_chosen_on_validation_not_test(calls_list, tmp_path, quiet):
    calls_list.scores.update({0.1: (0.9, 0.1), 1.0: (0.2, 0.95)})
    results = pipeline.run(Bench(), plan(methods=["epmq"], anchors=[0.1, 1.0]), tmp_path, log=quiet)
    assert results["steps"]["quant/TA/w4/E-PMQ"]["chosen_anchor"] == 0.1


@pytest.mark.parametrize("change", [
    dict(group_size=-1), dict(sym=True), dict(act_order=True), dict(static_groups=True),
    dict(targets="expert_path"), dict(weight_anchor=0.5),
    dict(merges=[MergePlan("task_arithmetic", scales=[0.7])]), dict(backend="torch"),
    dict(residual_precision="ieee"),
])
def test_a_changed_quantization_setting_is_not_served_from_the_store(calls_list, tmp_path, quiet, change):
    """What an E-PMQ cell depends on (the grid, the targets, mu, the merge's scale) is part of
    its fingerprint: a second run with another value quantizes again."""
    pipeline.run(Bench(), plan(methods=["epmq"]), tmp_path, log=quiet)
    assert len(calls_list) == 1
    pipeline.run(Bench(), plan(methods=["epmq"]), tmp_path, log=quiet)
    assert len(calls_list) == 1  # (the same plan: reused)
    pipeline.run(Bench(), plan(methods=["epmq"], **change), tmp_path, log=quiet)
    assert len(calls_list) == 2


def test_a_model_moved_to_the_gpu_is_not_served_the_cpus_numbers(calls_list, tmp_path, quiet, monkeypatch):
    """The solver's default backend follows the model's device (torch on the CPU, Triton on a
    GPU): results stored by a CPU run were served to the same config on CUDA (the bench's
    identity leaves the device out), and the CPU's stored results still match after."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_properties",  # (the run's identity names the GPU)
                        lambda device: SimpleNamespace(name="NVIDIA H100 PCIe", multi_processor_count=114))
    pipeline.run(Bench(), plan(methods=["epmq"]), tmp_path, log=quiet)
    on_gpu = Bench()
    on_gpu.device = torch.device("cuda")  # (the fake solve runs nothing there)
    pipeline.run(on_gpu, plan(methods=["epmq"]), tmp_path, log=quiet)
    assert len(calls_list) == 2 and calls_list[1][3]["backend"] == "triton"
    assert "backend" not in calls_list[0][3]
    pipeline.run(on_gpu, plan(methods=["epmq"], backend="triton"), tmp_path, log=quiet)
    assert len(calls_list) == 2  # (the same solver, said)


def test_plan_targets_are_e_pmqs_only(calls_list, tmp_path, quiet):
    """``quantize.targets`` sets E-PMQ's targets; RTN and GPTQ rows stay plain (merged path),
    the controls take their own."""
    p = plan(targets="expert_path", controls=[pipeline.Control("gptq", "fp_path", "GPTQ fp-path")])
    pipeline.run(Bench(), p, tmp_path, log=quiet)
    assert sorted((m, t) for m, t, _, _ in calls_list) == [
        ("epmq", "expert_path"), ("gptq", "fp_path"), ("gptq", "merged_path"), ("rtn", "merged_path")]


def test_anchors_that_differ_in_a_late_digit_are_cells_of_their_own(calls_list, tmp_path, quiet):
    calls_list.scores.update({0.1: (0.2, 0.2), 0.1000001: (0.9, 0.9)})
    results = pipeline.run(Bench(), plan(methods=["epmq"], anchors=[0.1, 0.1000001]), tmp_path, log=quiet)
    assert len(calls_list) == 2
    assert results["steps"]["quant/TA/w4/E-PMQ"]["chosen_anchor"] == 0.1000001


def test_the_report_names_the_chosen_anchor_and_prints_the_ablation(calls_list, tmp_path, quiet):
    calls_list.scores.update({0.1: (0.2, 0.2), 1.0: (0.9, 0.9)})
    p = plan(methods=["epmq"], anchors=[0.1, 1.0])
    results = pipeline.run(Bench(), p, tmp_path, log=quiet)
    labels = [label for label, _ in pipeline.table_rows(results, p)]
    assert "TA w4 E-PMQ (anchor 1)" in labels
    text = pipeline.report(results, p, Bench.task_names, tmp_path)
    assert "E-PMQ anchor ablation" in text and "| TA | 4 | E-PMQ | 0.1 |" in text and "| TA | 4 | E-PMQ | 1 |" in text
    assert "E-PMQ anchor ablation" in (tmp_path / "table.md").read_text()
    for name in ("accuracy.png", "accuracy_per_task.png"):
        assert (tmp_path / name).stat().st_size > 0
    # a control that runs E-PMQ (the demo's expert-path one) has its anchors listed too
    p = plan(methods=["epmq"], anchors=[0.1, 1.0],
             controls=[{"method": "epmq", "targets": "expert_path", "label": "E-PMQ expert-path"}])
    results = pipeline.run(Bench(), p, tmp_path / "control", log=quiet)
    text = pipeline.report(results, p, Bench.task_names, tmp_path / "control")
    assert "| TA | 4 | E-PMQ expert-path | 0.1 |" in text and "| TA | 4 | E-PMQ expert-path | 1 |" in text


@pytest.mark.parametrize("kw, message", [
    (dict(controls=[{"method": "gptq", "targets": "fp-path", "label": "x"}]), "targets one of"),
    (dict(controls=[{"method": "awq", "targets": "fp_path", "label": "x"}]), "method must be one of"),
    (dict(controls=[{"method": "gptq", "targets": "expert_path", "label": "x"}]), "needs experts"),
    # (a control that is a row already: both wrote one checkpoint folder, each clean-up the other's loss)
    (dict(targets="expert_path", controls=[{"method": "epmq", "targets": "expert_path", "label": "x"}]),
     "two quantizer rows are epmq with targets 'expert_path'"),
    (dict(methods=["gptq"], controls=[{"method": "gptq", "targets": "merged_path", "label": "x"}]),
     "two quantizer rows are gptq"),
    (dict(methods=["rtn"], controls=[{"method": "rtn", "targets": "fp_path", "label": "x"}]),
     "two quantizer rows are rtn with targets 'any'"),
    # (quantize.targets is E-PMQ's: the GPTQ row of methods runs merged-path whatever it says)
    (dict(targets="expert_path", controls=[{"method": "gptq", "targets": "merged_path", "label": "x"}]),
     "two quantizer rows are gptq with targets 'merged_path'"),
    (dict(targets="expert"), "targets must be one of"),
    (dict(anchors=[]), "anchors must be a non-empty list"),
    (dict(merges=[]), "merges is empty"),  # (accepted, the report's plot then failed with subplots(1, 0))
    (dict(sym="no"), "sym must be true or false"),
    (dict(group_size=0), "group_size must be -1"),
    (dict(group_size=True), "group_size must be -1"),  # (YAML's yes is no group size)
])
def test_bad_plans_raise(kw, message):
    with pytest.raises(ValueError, match=message):
        Plan(**kw)


def test_numpys_bools_are_taken_as_pythons():
    """sym=np.True_ (a sweep's flag from an array, as QuantSpec, quantize_model and the bench
    configs take) was refused as 'quantize.sym must be true or false, got np.True_'; taken and
    held as Python's bools, so a row's identity (JSON) is the one true and false give."""
    import numpy as np

    flags = dict(sym=True, act_order=True, static_groups=False, save_checkpoints=False)
    p, want = plan(**{k: np.bool_(v) for k, v in flags.items()}), plan(**flags)
    assert all(type(getattr(p, k)) is bool for k in flags)
    assert p == want and p.spec(4) == want.spec(4)
    with pytest.raises(ValueError, match="quantize.sym must be true or false, got np.int64"):
        plan(sym=np.int64(1))


def test_fp_path_targets_with_the_default_control_is_a_plan():
    """E-PMQ fp-path beside the default control (GPTQ fp-path): the GPTQ row of methods runs
    merged-path, so no two rows are one computation (refused as 'two quantizer rows')."""
    plan = Plan(targets="fp_path")
    assert [plan.method_targets(m) for m in plan.methods] == ["merged_path", "merged_path", "fp_path"]


def test_merge_entries_of_a_config():
    """``scale:`` is ``scales:`` of one value; any other key is an error."""
    p = Plan.from_config([{"method": "ties", "scale": 0.6}], None)
    assert p.merges[0].scales == [0.6]
    with pytest.raises(ValueError, match=r"merge\[0\]: unknown keys \['scael'\]"):
        Plan.from_config([{"method": "ties", "scael": 0.6}], None)
    with pytest.raises(ValueError, match=r"merge\[0\] needs a method"):
        Plan.from_config([{"scales": [0.6]}], None)
    with pytest.raises(ValueError, match=r"merge\[0\] gives both scale and scales"):  # (scale won, silently)
        Plan.from_config([{"method": "ties", "scales": [0.1, 0.5], "scale": 0.3}], None)
    # a merge without a scale: one value given was accepted and never applied (several were refused)
    for entry in ({"method": "model_stock", "scale": 0.5}, {"method": "regmean", "scales": [0.5]}):
        with pytest.raises(ValueError, match=rf"merge\[0\]: {entry['method']} has no scale"):
            Plan.from_config([entry], None)
    assert Plan.from_config([{"method": "model_stock"}], None).merges[0].method == "model_stock"
    with pytest.raises(ValueError, match="merge is empty"):  # (the default merge ran in its place)
        Plan.from_config([], None)
    assert Plan.from_config(None, None).merges[0].method == "task_arithmetic"


@pytest.mark.parametrize("quantize, unread", [
    ({"methods": ["rtn", "gptq"], "anchors": [0.1, 3.0]}, "anchors"),
    ({"methods": ["gptq"], "controls": [], "targets": "fp_path"}, "targets"),
    # (quantize.targets is the E-PMQ rows' of methods: an E-PMQ control has its own)
    ({"methods": ["gptq"], "targets": "fp_path",
      "controls": [{"method": "epmq", "targets": "expert_path", "label": "x"}]}, "targets"),
    ({"methods": ["rtn"], "controls": [], "weight_anchor": 0.5, "residual_precision": "ieee"},
     "residual_precision, weight_anchor are"),
    ({"methods": ["rtn"], "controls": [], "act_order": True}, "act_order"),
])
def test_a_quantize_key_no_row_reads_is_an_error(quantize, unread):
    """(It was accepted and ignored: GPTQ with targets: fp_path ran merged-path under its usual
    label, anchors of a plan without E-PMQ tuned nothing; epmq quantize refuses the same.)"""
    with pytest.raises(ValueError, match=f"quantize: {unread}.* read by no quantizer"):
        Plan.from_config(None, quantize)
    # read by a row: accepted (the anchors by an E-PMQ control too)
    Plan.from_config(None, {"methods": ["gptq"], "anchors": [0.1],
                            "controls": [{"method": "epmq", "targets": "expert_path", "label": "x"}]})
    Plan.from_config(None, {"methods": ["epmq"], "targets": "fp_path", "act_order": True, "controls": []})


@pytest.mark.parametrize("merge, message", [
    (MergePlan("task_arithmetic", params={"weights": [1.0]}), "merge TA: weights must give one number per expert"),
    (MergePlan("ties", params={"density": 1.5}), r"merge TIES: density must be in \[0, 1\]"),
    (MergePlan("regmean", scales=[0.3], params={"alpha": 2}), r"merge RegMean: alpha must be in \[0, 1\]"),
])
def test_merge_parameters_the_merge_refuses_are_said_before_any_evaluation(tmp_path, quiet, merge, message):
    """(They were found at the merge, after the base's and the experts' evaluations: hours on a
    paper-scale bench, then a traceback from epmq run.)"""
    evaluated = []

    class Watched(Bench):
        def evaluate(self, state, split="test"):
            evaluated.append(split)
            return super().evaluate(state, split)

    with pytest.raises(ValueError, match=message):
        pipeline.run(Watched(), plan(merges=[merge], methods=["rtn"]), tmp_path, log=quiet)
    assert evaluated == []
    pipeline.check_merges(plan(merges=[MergePlan("model_stock"), MergePlan("regmean")]), 2)  # (valid ones pass)


def test_the_pipelines_merges_show_no_bar_of_their_own(capsys):
    """The merges in memory show a bar of their tensors by default: the pipeline's merges (one a
    scale, seconds each) keep to the run's own lines, and --quiet stays quiet; their bar is no
    parameter a plan gives."""
    pipeline.check_merges(plan(merges=[MergePlan("tsv"), MergePlan("average"), MergePlan("regmean")]), 2)
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match=r"unknown parameters \['progress'\]"):
        MergePlan("tsv", params={"progress": True})


def test_a_users_table_without_results_is_not_overwritten(calls_list, tmp_path, quiet):
    (tmp_path / "table.md").write_text("mine")
    with pytest.raises(ValueError, match="holds table.md but no results.json"):
        pipeline.run(Bench(), plan(), tmp_path, log=quiet)
    assert (tmp_path / "table.md").read_text() == "mine"


def test_a_users_checkpoints_folder_without_results_is_not_written_into(calls_list, tmp_path, quiet):
    """An output directory holding a checkpoints/ folder of the user's (their experts, epmq run
    --out . in a project) and no results.json was taken: the run's checkpoints were written among
    them, and the next --fresh (or changed bench) moved the whole folder, theirs included, to
    checkpoints.before-<time>, away from where their config names them; refused as a table.md is."""
    mine = tmp_path / "checkpoints" / "expert_a"
    mine.mkdir(parents=True)
    (mine / "model.safetensors").write_bytes(b"the user's expert")
    with pytest.raises(ValueError, match="holds checkpoints/ but no results.json"):
        pipeline.run(Bench(), plan(), tmp_path, log=quiet)
    assert (mine / "model.safetensors").read_bytes() == b"the user's expert"
    assert not (tmp_path / "results.json").exists()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "checkpoints").mkdir()  # (an empty one holds nothing to mix with)
    pipeline.run(Bench(), plan(), tmp_path / "empty", log=quiet)


@pytest.mark.parametrize("fresh", [False, True])
@pytest.mark.parametrize("content", ['{"st', '{"results": {"acc": 0.9}}', '{"identity": {}, "steps": [1]}'])
def test_a_damaged_results_file_is_refused_not_overwritten(calls_list, tmp_path, quiet, fresh, content):
    """(It was read as no results: the run wrote over it and over the checkpoints it named. A
    JSON object without epmq's steps, another tool's results.json, was written over too.)"""
    (tmp_path / "checkpoints" / "TA-w4-rtn-merged_path").mkdir(parents=True)
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(pipeline.ResultsFileError, match="results.json is not a results file epmq wrote"):
        pipeline.run(Bench(), plan(), tmp_path, resume=not fresh, log=quiet)
    assert (tmp_path / "results.json").read_text() == content


@pytest.mark.parametrize("fresh", [False, True])
def test_a_run_interrupted_before_its_first_step_keeps_the_earlier_run_once(calls_list, tmp_path, quiet, fresh):
    """An earlier run is set aside once: a new run (another bench, or --fresh) stopped before it
    stored a step, then run again, leaves one ``results.before-*.json``, and it names the
    earlier run's own checkpoints, not the new run's written under the old names."""
    import json

    earlier = tmp_path / "checkpoints" / "TA-w4-rtn-merged_path"
    earlier.mkdir(parents=True)
    (earlier / "weights").write_text("earlier")
    (tmp_path / "results.json").write_text(json.dumps({
        "identity": {"tasks": ["old"]} if not fresh else {"tasks": ["a", "b"]},
        "steps": {"quant/TA/w4/RTN": {"checkpoint": str(earlier), "params_digest": "x"}}}))

    class Stopped(Bench):
        def evaluate(self, state, split="test"):
            raise KeyboardInterrupt  # (the first step, before anything is stored)

    with pytest.raises(KeyboardInterrupt):
        pipeline.run(Stopped(), plan(), tmp_path, resume=not fresh, log=quiet)
    pipeline.run(Bench(), plan(), tmp_path, resume=not fresh, log=quiet)  # (the same command again)
    assert_set_aside_with_its_checkpoint(tmp_path, earlier.name)


def test_a_set_aside_stopped_before_the_checkpoints_moved_is_finished_by_the_next_run(
        calls_list, tmp_path, quiet, monkeypatch):
    """Stopped between writing the kept results and moving the checkpoints, the set-aside is
    completed under the same name: one kept results file, naming the checkpoints it kept."""
    import json
    from pathlib import Path

    earlier = tmp_path / "checkpoints" / "TA-w4-rtn-merged_path"
    earlier.mkdir(parents=True)
    (earlier / "weights").write_text("earlier")
    (tmp_path / "results.json").write_text(json.dumps({
        "identity": {"tasks": ["old"]}, "steps": {"quant/TA/w4/RTN": {"checkpoint": str(earlier)}}}))
    real = Path.rename

    def stopped(self, target):
        if self.name == "checkpoints":
            raise KeyboardInterrupt
        return real(self, target)

    monkeypatch.setattr(Path, "rename", stopped)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(Bench(), plan(), tmp_path, log=quiet)
    monkeypatch.setattr(Path, "rename", real)
    pipeline.run(Bench(), plan(), tmp_path, log=quiet)
    assert_set_aside_with_its_checkpoint(tmp_path, earlier.name)


def assert_set_aside_with_its_checkpoint(run_dir, name):
    """The earlier results kept aside in ``run_dir`` name their checkpoint ``name`` where it was
    kept aside with them, the earlier run's."""
    (kept,) = run_dir.glob("results.before-*.json")
    (kept_checkpoints,) = run_dir.glob("checkpoints.before-*")
    named = json.loads(kept.read_text())["steps"]["quant/TA/w4/RTN"]["checkpoint"]
    assert named == str(kept_checkpoints / name)
    assert (kept_checkpoints / name / "weights").read_text() == "earlier"


def test_checkpoints_a_killed_run_half_wrote_are_removed_by_the_next(calls_list, tmp_path, quiet):
    import os
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "checkpoints").mkdir()
    stale = tmp_path / "checkpoints" / f".TA-w2-gptq.tmp-{dead.pid}-abc"
    live = tmp_path / "checkpoints" / f".TA-w2-gptq.tmp-{os.getppid()}-abc"
    for path in (stale, live):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
    pipeline.run(Bench(), plan(), tmp_path, log=quiet)
    assert not stale.exists() and live.exists()


def test_a_bench_is_resumed_only_from_its_own_results(calls_list, tmp_path):
    """Without identity=, a run takes the bench's own ``identity``: another bench of the same
    task names in the same directory is started over, not served the first one's numbers."""
    logs = []
    first = pipeline.run(Named("one", 0.25), plan(methods=["rtn"]), tmp_path, log=logs.append, progress=False)
    again = pipeline.run(Named("one", 0.25), plan(methods=["rtn"]), tmp_path, log=logs.append, progress=False)
    other = pipeline.run(Named("two", 0.75), plan(methods=["rtn"]), tmp_path, log=logs.append, progress=False)
    assert first["steps"]["base"]["test"]["avg"] == again["steps"]["base"]["test"]["avg"] == 0.25
    assert any("base: done before" in line for line in logs)
    assert other["steps"]["base"]["test"]["avg"] == 0.75
    # a bench with no identity of its own: its class and task names, said in the log
    logs.clear()
    pipeline.run(Bench(), plan(methods=["rtn"]), tmp_path / "plain", log=logs.append, progress=False)
    assert any("has no identity" in line for line in logs)


def test_a_run_under_other_float32_settings_is_started_over(calls_list, tmp_path, monkeypatch):
    """Every cell's forward (the quantizers' calibration, the evaluations) runs under the precision a
    user set for torch's float32 products (TF32 on a GPU; on a CPU, oneDNN's bf16), which the run's
    identity did not hold: a run stopped under one and resumed under another tabled the first's cells
    beside the second's in silence. It starts over (the earlier results kept aside, as for another
    bench); under torch's defaults nothing is recorded, so results stored before resume."""
    logs = []
    with monkeypatch.context() as m:
        m.setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16")
        pipeline.run(Named("one", 0.25), plan(methods=["rtn"]), tmp_path, log=logs.append, progress=False)
    assert calls_list
    calls_list.clear()
    pipeline.run(Named("one", 0.25), plan(methods=["rtn"]), tmp_path, log=logs.append, progress=False)
    assert calls_list, "a cell of the bf16 run was reused"
    assert any("starting over" in line and "'precision'" in line for line in logs), logs
    calls_list.clear()
    pipeline.run(Named("one", 0.25), plan(methods=["rtn"]), tmp_path, log=logs.append, progress=False)
    assert not calls_list and "precision" not in json.loads((tmp_path / "results.json").read_text())["identity"]


def test_a_run_resumed_with_another_thread_count_is_started_over(calls_list, tmp_path, monkeypatch):
    """On a CPU torch's thread count changes every cell's float arithmetic bit for bit (the walk's
    statistics, its solves), which the walk's own resume identity records but a run's did not: a run
    stopped under 2 threads and resumed under 1 tabled the first's cells beside the second's in
    silence. Both take their hardware from one function, and the run starts over, naming it."""
    logs = []
    with monkeypatch.context() as m:
        m.setattr(torch, "get_num_threads", lambda: 2)
        pipeline.run(Named("one", 0.25), plan(methods=["rtn"]), tmp_path, log=logs.append, progress=False)
    assert calls_list
    calls_list.clear()
    assert torch.get_num_threads() == 1  # (the tests' own: conftest)
    pipeline.run(Named("one", 0.25), plan(methods=["rtn"]), tmp_path, log=logs.append, progress=False)
    assert calls_list, "a cell of the 2-thread run was reused"
    assert any("starting over" in line and "'machine'" in line for line in logs), logs
    calls_list.clear()
    pipeline.run(Named("one", 0.25), plan(methods=["rtn"]), tmp_path, log=logs.append, progress=False)
    assert not calls_list


@pytest.mark.parametrize("merges, bits", [(1, [4, 2]), (1, [4]), (2, [8, 4, 3, 2])])
def test_the_plots_legends_fit_in_their_figures(calls_list, tmp_path, quiet, monkeypatch, merges, bits):
    """Every legend entry is drawn inside the saved figure and below the panels: one row of the
    7 entries of ``epmq demo --quick`` (one merge, 5.5 inches wide) ran off both edges, cutting
    "merged fp32" and the GPTQ fp-path bars' name."""
    figures = []
    monkeypatch.setattr(pipeline, "_save", lambda fig, path: figures.append(fig))
    mps = [MergePlan("task_arithmetic", scales=[0.3]), MergePlan("ties", scales=[0.6])][:merges]
    p = plan(merges=mps, bits=bits, controls=[pipeline.Control("gptq", "fp_path", "GPTQ fp-path"),
                                              pipeline.Control("epmq", "expert_path", "E-PMQ expert-path")])
    results = pipeline.run(Bench(), p, tmp_path, log=quiet)
    pipeline.report(results, p, Bench.task_names, tmp_path)
    assert len(figures) == 2
    for fig in figures:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        (legend,) = fig.legends
        box = legend.get_window_extent(renderer)
        assert 0 <= box.x0 and box.x1 <= fig.bbox.width and 0 <= box.y0
        panels = min(ax.get_tightbbox(renderer).y0 for ax in fig.axes)
        assert box.y1 <= panels + 1  # (not over the tick labels)
        assert "GPTQ fp-path" in [t.get_text() for t in legend.get_texts()]


def saving_checkpoints(scores: dict):
    """A stand-in for ``Runner._quantize`` that writes a checkpoint folder per anchor (a manifest
    naming its run and anchor) and scores it ``scores[anchor]`` (val, test), else 0.5."""
    def fake(self, state, bits, method, targets, anchor, params):
        from epmq.checkpoint import MANIFEST_FILE

        path = self.out / "checkpoints" / f"{method}-{anchor}"
        path.mkdir(parents=True, exist_ok=True)
        (path / MANIFEST_FILE).write_text(json.dumps({"made in": str(self.out), "anchor": anchor}))
        val, test = scores.get(anchor, (0.5, 0.5))
        return {"val": {"avg": val}, "test": {"avg": test}, "checkpoint": str(path),
                "checkpoint_files": pipeline._checkpoint_digest(path)}

    return fake


def test_a_run_in_a_copied_directory_leaves_the_originals_checkpoints(tmp_path, quiet, monkeypatch):
    """results.json names checkpoints by absolute path: a copy of a run's directory (to try
    another anchor) named the original's, and the copy's run deleted the original's chosen
    checkpoint as an unchosen candidate. A run deletes and delivers only checkpoints of its own."""
    import shutil

    monkeypatch.setattr(pipeline.Runner, "_quantize", saving_checkpoints({0.0: (0.9, 0.9)}))
    first = pipeline.run(Bench(), plan(methods=["epmq"], anchors=[0.1], save_checkpoints=True),
                         tmp_path / "a", log=quiet)
    original = first["steps"]["quant/TA/w4/E-PMQ"]["checkpoint"]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copy = pipeline.run(Bench(), plan(methods=["epmq"], anchors=[0.0, 0.1], save_checkpoints=True),
                        tmp_path / "b", log=quiet)
    assert Path(original).is_dir()  # (deleted from the original run's directory)
    named = [s["checkpoint"] for s in copy["steps"].values() if s.get("checkpoint")]
    assert named and all(c.startswith(str(tmp_path / "b")) for c in named)
    # the chosen cell's checkpoint is delivered in the run's own directory, not the original's
    again = pipeline.run(Bench(), plan(methods=["epmq"], anchors=[0.1], save_checkpoints=True),
                         tmp_path / "b", log=quiet)
    assert again["steps"]["quant/TA/w4/E-PMQ"]["checkpoint"].startswith(str(tmp_path / "b"))
    assert Path(original).is_dir()
    # a copy run again as it was: the copy's own checkpoints (copied under the same names) are
    # taken, not quantized again (hours at paper scale), and the original's are left alone
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    logs = []
    same = pipeline.run(Bench(), plan(methods=["epmq"], anchors=[0.1], save_checkpoints=True),
                        tmp_path / "c", log=logs.append)
    assert not any("quantizing again" in line for line in logs), logs
    assert same["steps"]["quant/TA/w4/E-PMQ"]["checkpoint"] == str(tmp_path / "c" / "checkpoints" / "epmq-0.1")
    assert Path(original).is_dir()
    # a's results.json copied alone into b, whose checkpoint of that name is b's own (other files):
    # not taken for a's, quantized again
    shutil.copy2(tmp_path / "a" / "results.json", tmp_path / "b" / "results.json")
    logs = []
    taken = pipeline.run(Bench(), plan(methods=["epmq"], anchors=[0.1], save_checkpoints=True),
                         tmp_path / "b", log=logs.append)
    assert any("quantizing again" in line for line in logs), logs
    step = taken["steps"]["quant/TA/w4/E-PMQ"]
    assert step["checkpoint_files"] == pipeline._checkpoint_digest(Path(step["checkpoint"]))


def test_an_unchosen_checkpoint_deleted_half_way_is_not_delivered_later(tmp_path, quiet, monkeypatch):
    """An unchosen anchor's checkpoint was deleted in place: a run stopped in the middle of
    that (Ctrl-C, a kill) left a folder missing some of its files under the name results.json
    gives the cell, and a later run that chose that anchor delivered it as the checkpoint."""
    scores = {0.1: (0.9, 0.9)}

    def fake(self, state, bits, method, targets, anchor, params):
        path = self.out / "checkpoints" / f"{method}-{anchor}"
        path.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors"):
            (path / name).write_text(name)
        val, test = scores.get(anchor, (0.5, 0.5))
        return {"val": {"avg": val}, "test": {"avg": test}, "checkpoint": str(path)}

    def stopped(path, *args, **kwargs):  # Ctrl-C after the first file
        next(Path(path).iterdir()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.Runner, "_quantize", fake)
    with monkeypatch.context() as m:
        m.setattr(pipeline.shutil, "rmtree", stopped)
        with pytest.raises(KeyboardInterrupt):
            pipeline.run(Bench(), plan(methods=["epmq"], anchors=[0.1, 1.0], save_checkpoints=True), tmp_path,
                         log=quiet)
    shown = [p for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith(".")]
    assert all(sorted(x.name for x in p.iterdir()) == ["config.json", "model.safetensors"] for p in shown)
    # (the folder moved aside, as a process killed there would leave it: the next run removes it)
    (hidden,) = [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    hidden.rename(hidden.with_name(hidden.name.replace(f".tmp-{os.getpid()}-", ".tmp-999999999-")))
    pipeline.run(Bench(), plan(methods=["epmq"], anchors=[0.1], save_checkpoints=True), tmp_path, log=quiet)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    logs = []
    again = pipeline.run(Bench(), plan(methods=["epmq"], anchors=[1.0], save_checkpoints=True), tmp_path,
                         log=logs.append)
    delivered = Path(again["steps"]["quant/TA/w4/E-PMQ"]["checkpoint"])
    assert sorted(x.name for x in delivered.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_run_reached_through_a_link_is_resumed_with_its_checkpoints(tmp_path, quiet, monkeypatch):
    """The same output directory given through a symbolic link holds the run's own checkpoints."""
    def fake(self, state, bits, method, targets, anchor, params):
        path = self.out / "checkpoints" / f"{method}-{anchor}"
        path.mkdir(parents=True, exist_ok=True)
        return {"val": {"avg": 0.5}, "test": {"avg": 0.5}, "checkpoint": str(path)}

    monkeypatch.setattr(pipeline.Runner, "_quantize", fake)
    p = plan(methods=["rtn"], save_checkpoints=True)
    pipeline.run(Bench(), p, tmp_path / "real", log=quiet)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    logs = []
    pipeline.run(Bench(), p, tmp_path / "link", log=logs.append)
    assert not any("quantizing again" in line for line in logs)


def test_the_tables_columns_name_tasks_that_share_their_first_characters_apart():
    """Headers were each task's first 8 characters: sentiment_en and sentiment_de were two
    columns headed 'sentimen', which no reader of table.md could tell apart."""
    tasks = ["sentiment_en", "sentiment_de", "nli"]
    rows = [("Base (zero-shot)", {"sentiment_en": 0.7849, "sentiment_de": 0.25, "nli": 0.5, "avg": 0.5116})]
    head, rule, row = pipeline.format_table(rows, tasks).splitlines()
    names = [c.strip() for c in head.strip("|").split("|")][1:]
    assert names == ["sentiment_en", "sentiment_de", "nli", "avg"]
    assert [c.strip() for c in row.strip("|").split("|")][1:] == ["78.5", "25.0", "50.0", "51.2"]
    assert len(rule) == len(head) == len(row)
    # names that differ within 8 characters keep the short columns
    head = pipeline.format_table(rows, ["digit", "inv_pairs_long"]).splitlines()[0]
    assert "inv_pair |" in head


def test_anchors_that_differ_in_a_late_digit_are_told_apart_in_the_report(calls_list, tmp_path, quiet):
    """They are cells of their own; the table's ':g' showed both as 0.1 (the chosen
    0.1000001 labelled "anchor 0.1", two ablation rows of one anchor)."""
    calls_list.scores.update({0.1: (0.2, 0.2), 0.1000001: (0.9, 0.9)})
    p = plan(methods=["epmq"], anchors=[0.1, 0.1000001, 1.0])
    results = pipeline.run(Bench(), p, tmp_path, log=quiet)
    text = pipeline.report(results, p, Bench.task_names, tmp_path)
    assert "TA w4 E-PMQ (anchor 0.1000001)" in text
    assert "| TA | 4 | E-PMQ | 0.1 |" in text and "| TA | 4 | E-PMQ | 0.1000001 |" in text
    assert "| TA | 4 | E-PMQ | 1 |" in text  # (round values stay short)


@pytest.mark.parametrize("fresh", [False, True])
def test_an_earlier_runs_report_is_set_aside_with_its_results(calls_list, tmp_path, quiet, fresh):
    """Starting over (another bench, or --fresh) kept the earlier results.json and checkpoints
    aside but left its table.md and plots in place: until the new run's report (hours for a
    paper-scale run, never if it stops) they showed the earlier bench's numbers beside the new
    results.json. They are kept aside under the same tag as its results."""
    p = plan(methods=["rtn"])
    first = pipeline.run(Named("one", 0.25), p, tmp_path, log=quiet)
    pipeline.report(first, p, Bench.task_names, tmp_path)
    table = (tmp_path / "table.md").read_text()

    class Stopped(Named):
        def evaluate(self, state, split="test"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # (the new run, stopped before its report)
        pipeline.run(Stopped("two" if not fresh else "one", 0.75), p, tmp_path, resume=not fresh, log=quiet)
    assert not any((tmp_path / name).exists() for name in pipeline.REPORT_FILES)
    (kept,) = tmp_path.glob("results.before-*.json")
    tag = kept.name[len("results."):-len(".json")]
    assert (tmp_path / f"table.{tag}.md").read_text() == table
    assert (tmp_path / f"accuracy.{tag}.png").stat().st_size > 0


def test_a_resumed_run_with_another_plan_stopped_before_its_report_shows_only_its_plan(calls_list, tmp_path,
                                                                                        quiet, monkeypatch):
    """A changed plan resumes the same bench: stopped before its report, its table.md was the
    earlier plan's (a w4 row the new plan does not give), though the README says the table shows
    the plan's. It holds the new plan's rows as they are done, written whole."""
    first = plan(methods=["rtn"])
    pipeline.report(pipeline.run(Bench(), first, tmp_path, log=quiet), first, Bench.task_names, tmp_path)
    assert "TA w4 RTN" in (tmp_path / "table.md").read_text()

    def stopped(self, state, bits, method, targets, anchor, params):
        if method == "gptq":
            raise KeyboardInterrupt
        return {"val": {"avg": 0.5}, "test": {"avg": 0.25}}

    monkeypatch.setattr(pipeline.Runner, "_quantize", stopped)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(Bench(), plan(methods=["rtn", "gptq"], bits=[3]), tmp_path, log=quiet)
    table = (tmp_path / "table.md").read_text()
    assert "TA w4" not in table and "TA w3 RTN" in table and "Base (zero-shot)" in table
    assert "results.json" in os.listdir(tmp_path) and not list(tmp_path.glob("*.tmp*"))


def test_a_resumed_run_with_another_plan_stopped_before_its_report_leaves_no_earlier_plot(calls_list, tmp_path,
                                                                                        quiet, monkeypatch):
    """Its table.md holds the new plan's rows as they are done, but accuracy.png and
    accuracy_per_task.png stayed the earlier plan's (its w4 bars beside a table of w3 rows) until
    a report the stopped run never writes. They go with the first table of the run; the report
    draws them again."""
    first = plan(methods=["rtn"])
    pipeline.report(pipeline.run(Bench(), first, tmp_path, log=quiet), first, Bench.task_names, tmp_path)
    assert all((tmp_path / name).exists() for name in pipeline.REPORT_FILES)

    def stopped(self, state, bits, method, targets, anchor, params):
        if method == "gptq":
            raise KeyboardInterrupt
        return {"val": {"avg": 0.5}, "test": {"avg": 0.25}}

    second = plan(methods=["rtn", "gptq"], bits=[3])
    with monkeypatch.context() as m:
        m.setattr(pipeline.Runner, "_quantize", stopped)
        with pytest.raises(KeyboardInterrupt):
            pipeline.run(Bench(), second, tmp_path, log=quiet)
    assert "TA w3 RTN" in (tmp_path / "table.md").read_text()
    assert [name for name in pipeline.REPORT_FILES if (tmp_path / name).exists()] == ["table.md"]
    # the same run again, to its report: its plots, beside its table
    pipeline.report(pipeline.run(Bench(), second, tmp_path, log=quiet), second, Bench.task_names, tmp_path)
    assert all((tmp_path / name).stat().st_size > 0 for name in pipeline.REPORT_FILES)


def test_a_resumed_runs_table_keeps_the_rows_it_will_reuse(calls_list, tmp_path, quiet, monkeypatch):
    """A plan that adds a quantizer resumes the earlier run's cells: its first table (after the
    base and experts) held only the rows reached so far, so while the new cells ran (hours at
    paper scale), or after a stop, the table lacked the w3 rows results.json holds for this
    very plan. The cells done before with this plan's parameters are in it from the start."""
    first = plan(methods=["rtn", "gptq"], bits=[4, 3])
    pipeline.report(pipeline.run(Bench(), first, tmp_path, log=quiet), first, Bench.task_names, tmp_path)

    def stopped(self, state, bits, method, targets, anchor, params):
        raise KeyboardInterrupt  # (the first new cell: w4 E-PMQ)

    monkeypatch.setattr(pipeline.Runner, "_quantize", stopped)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(Bench(), plan(methods=["rtn", "gptq", "epmq"], bits=[4, 3]), tmp_path, log=quiet)
    table = (tmp_path / "table.md").read_text()
    assert all(f"TA w{b} {m}" in table for b in (4, 3) for m in ("RTN", "GPTQ")), table
    assert "E-PMQ" not in table
    # a cell of other parameters (another group size) is not the plan's: not in its table
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(Bench(), plan(methods=["rtn", "gptq"], bits=[4, 3], group_size=32), tmp_path, log=quiet)
    table = (tmp_path / "table.md").read_text()
    assert "Base (zero-shot)" in table and "TA w3" not in table and "TA w4" not in table


def test_a_report_stopped_while_written_leaves_the_earlier_files_whole(calls_list, tmp_path, quiet, monkeypatch):
    """The table and plots were written in place: a run stopped in the middle of its report
    (Ctrl-C, a kill, a full disk) left a truncated PNG under the name of the report, the
    earlier whole one lost. They are written beside it and renamed over it."""
    import matplotlib.figure

    p = plan(methods=["rtn"])
    results = pipeline.run(Bench(), p, tmp_path, log=quiet)
    pipeline.report(results, p, Bench.task_names, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in pipeline.REPORT_FILES}

    def stopped(fig, fname, **kwargs):  # a PNG cut short by Ctrl-C
        with open(fname, "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(matplotlib.figure.Figure, "savefig", stopped)
        with pytest.raises(KeyboardInterrupt):
            pipeline.report(results, p, Bench.task_names, tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in pipeline.REPORT_FILES} == before
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(["results.json", RUN_LOCK_FILE, *pipeline.REPORT_FILES])
    pipeline.report(results, p, Bench.task_names, tmp_path)  # (the same command again: the report)
    assert {name: (tmp_path / name).read_bytes() for name in pipeline.REPORT_FILES} == before


def test_a_plot_named_without_a_suffix_is_a_png(calls_list, tmp_path, quiet):
    """matplotlib writes a name without a suffix as PNG; the atomic write's format, read off the
    name, was '' (a ValueError)."""
    p = plan(methods=["rtn"])
    results = pipeline.run(Bench(), p, tmp_path / "run", log=quiet)
    pipeline.plot(results, p, tmp_path / "accuracy")
    pipeline.plot_per_task(results, p, Bench.task_names, tmp_path / "per_task")
    for name in ("accuracy", "per_task"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
    assert not [x for x in tmp_path.iterdir() if x.name.startswith(".")]


def test_checkpoints_named_through_a_link_are_set_aside_by_a_run_through_the_real_path(
        calls_list, tmp_path, quiet):
    """A run started through a symlink to its directory names its checkpoints there; starting
    over through the real path (--fresh) moved them aside but kept their old names in the kept
    results, where the new run then writes its own checkpoints."""
    import json

    real = tmp_path / "run"
    earlier = real / "checkpoints" / "TA-w4-rtn-merged_path"
    earlier.mkdir(parents=True)
    (earlier / "weights").write_text("earlier")
    (tmp_path / "link").symlink_to(real)
    named = tmp_path / "link" / "checkpoints" / earlier.name
    (real / "results.json").write_text(json.dumps({
        "identity": {"tasks": ["a", "b"]}, "steps": {"quant/TA/w4/RTN": {"checkpoint": str(named)}}}))
    pipeline.run(Bench(), plan(), real, resume=False, log=quiet)
    assert_set_aside_with_its_checkpoint(real, earlier.name)


def test_restored_earlier_results_do_not_take_the_later_runs_checkpoint(tmp_path, quiet, monkeypatch):
    """An earlier run's results put back (results.before-*.json over results.json, the config
    changed back) name their checkpoints in checkpoints.before-*: the later run's checkpoint of
    the same name in checkpoints/, of another bench, is not theirs to take."""
    import shutil

    def fake(self, state, bits, method, targets, anchor, params):
        path = self.out / "checkpoints" / f"{method}-{anchor}"
        path.mkdir(parents=True, exist_ok=True)
        (path / "made_for").write_text(str(self.store.identity["v"]))
        return {"val": {"avg": 0.5}, "test": {"avg": 0.5}, "checkpoint": str(path)}

    monkeypatch.setattr(pipeline.Runner, "_quantize", fake)
    p = plan(methods=["epmq"], anchors=[0.1], save_checkpoints=True)
    pipeline.run(Bench(), p, tmp_path, log=quiet, identity={"v": 1})
    pipeline.run(Bench(), p, tmp_path, log=quiet, identity={"v": 2})  # (sets the first run aside)
    (kept,) = tmp_path.glob("results.before-*.json")
    shutil.copy(kept, tmp_path / "results.json")  # (the user takes the earlier results back)
    back = pipeline.run(Bench(), p, tmp_path, log=quiet, identity={"v": 1})
    delivered = Path(back["steps"]["quant/TA/w4/E-PMQ"]["checkpoint"])
    assert (delivered / "made_for").read_text() == "1"  # (not bench 2's model under bench 1's numbers)


def test_a_bench_returning_a_nan_accuracy_is_named_and_results_json_stays_json(tmp_path, quiet):
    """A custom bench's NaN accuracy was written into results.json as a NaN literal, which is
    not JSON: strict parsers (jq, JavaScript, Go) refused the whole file."""
    with pytest.raises(ValueError, match=r"base: the bench returned accuracies that are not numbers "
                                         r"\(val\['a'\] = nan"):
        pipeline.run(Named("nan", float("nan")), plan(), tmp_path, log=quiet)
    if (tmp_path / "results.json").exists():
        json.loads((tmp_path / "results.json").read_text(),
                   parse_constant=lambda c: pytest.fail(f"results.json holds {c}"))


def test_an_unchosen_candidate_of_another_directory_is_not_deleted(tmp_path, quiet, monkeypatch):
    """A run's results.json copied without its checkpoints names another directory's: a cell of
    it left unchosen is forgotten (its checkpoint None), and the other directory's checkpoint is
    left where it is (only the run's own are deleted)."""
    import shutil

    monkeypatch.setattr(pipeline.Runner, "_quantize", saving_checkpoints({0.0: (0.9, 0.9)}))
    first = pipeline.run(Bench(), plan(methods=["epmq"], anchors=[0.1], save_checkpoints=True),
                         tmp_path / "a", log=quiet)
    original = first["steps"]["quant/TA/w4/E-PMQ"]["checkpoint"]
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "results.json", tmp_path / "b" / "results.json")
    copy = pipeline.run(Bench(), plan(methods=["epmq"], anchors=[0.0, 0.1], save_checkpoints=True),
                        tmp_path / "b", log=quiet)
    assert Path(original).is_dir()
    assert copy["steps"]["quant/TA/w4/E-PMQ/anchor=0.1"]["checkpoint"] is None
    assert copy["steps"]["quant/TA/w4/E-PMQ"]["checkpoint"].startswith(str(tmp_path / "b"))


def test_equal_validation_scores_choose_the_first_scale():
    """``choose_scale``: ties (sums of per-task fractions equal but for their last bits, as
    0.4 and 0.39999999999999997) go to the first scale, as documented."""

    averages = iter([0.7 - 0.3, 0.4, 0.4])  # (the first, 0.39999999999999997, is the lowest by its last bits)
    assert 0.7 - 0.3 != 0.4

    class Tied(Bench):
        def evaluate(self, state, split="test"):
            avg = next(averages)  # (one evaluation per scale, in their order)
            return {"a": avg, "b": avg, "avg": avg}

    scale, _, scores = pipeline.choose_scale(Tied(), MergePlan("task_arithmetic", scales=[0.3, 0.5, 0.7]))
    assert len(set(round(v, 12) for v in scores.values())) == 1
    assert scale == 0.3


def test_the_two_plots_draw_each_series_in_one_colour(calls_list, tmp_path, quiet, monkeypatch):
    """accuracy.png coloured the quantizers from the first colour on, accuracy_per_task.png
    after the experts and the merge: E-PMQ was green in one and RTN green in the other."""
    from matplotlib.colors import to_hex
    from matplotlib.lines import Line2D

    figures = []
    monkeypatch.setattr(pipeline, "_save", lambda fig, path: figures.append(fig))
    p = plan(bits=[4, 2])
    results = pipeline.run(Bench(), p, tmp_path, log=quiet)
    pipeline.report(results, p, Bench.task_names, tmp_path)
    colours = []
    for fig in figures:
        (legend,) = fig.legends
        handles = legend.legend_handles if hasattr(legend, "legend_handles") else legend.legendHandles
        colours.append({t.get_text(): to_hex(h.get_color() if isinstance(h, Line2D) else h.get_facecolor())
                        for t, h in zip(legend.get_texts(), handles)})
    shared = set(colours[0]) & set(colours[1])
    assert {"RTN", "GPTQ", "E-PMQ", "experts"} <= shared
    assert {k: colours[0][k] for k in shared} == {k: colours[1][k] for k in shared}


def test_the_table_is_written_as_utf8_whatever_the_locale(tmp_path, monkeypatch):
    """table.md was written in the locale's encoding: under cp1252 (Windows) a task named in
    another script (a config's '日本語' task) ended the run's report in UnicodeEncodeError, and
    'café' was written as cp1252 bytes no UTF-8 reader reads."""
    import io

    real_open = open

    def cp1252_open(file, mode="r", buffering=-1, encoding=None, *args, **kwargs):  # open() under a cp1252 locale
        if "b" not in mode and encoding in (None, "locale"):  # (pathlib passes "locale")
            encoding = "cp1252"
        return real_open(file, mode, buffering, encoding, *args, **kwargs)

    rows = [("Base (zero-shot)", {"日本語": 0.5, "café": 0.25, "avg": 0.375})]
    text = pipeline.format_table(rows, ["日本語", "café"])
    monkeypatch.setattr("builtins.open", cp1252_open)
    monkeypatch.setattr(io, "open", cp1252_open)
    try:
        pipeline.write_table(tmp_path, text)
    except UnicodeError as e:
        failed = e
    else:
        failed = None
    monkeypatch.undo()
    assert failed is None, f"table.md was not written: {failed}"
    assert (tmp_path / "table.md").read_text(encoding="utf-8") == text + "\n"


def test_choose_scale_holds_one_merged_model_at_a_time(monkeypatch):
    """``choose_scale`` kept the best scale's merged state while it merged the next candidate:
    two merged models at once (a 7B's 28 GB in fp32, twice), where the best one's scale is all
    it needs to keep."""
    import gc
    import weakref

    class State(dict):
        __hash__ = object.__hash__  # (a WeakSet's member)

    live, held = weakref.WeakSet(), []

    def merged(bench, plan, scale):
        gc.collect()
        held.append(len(live))  # (merged states alive as another is made)
        state = State(scale=scale)
        live.add(state)
        return state

    class Scored(Bench):
        def evaluate(self, state, split="test"):
            avg = {0.1: 0.5, 0.3: 0.7, 0.5: 0.6}[state["scale"]]
            return {"a": avg, "b": avg, "avg": avg}

    monkeypatch.setattr(pipeline, "merged_state", merged)
    scale, state, scores = pipeline.choose_scale(Scored(), MergePlan("task_arithmetic", scales=[0.1, 0.3, 0.5]))
    assert scale == 0.3 and state["scale"] == 0.3
    assert scores == {"0.1": 0.5, "0.3": 0.7, "0.5": 0.6}
    assert max(held) == 0, f"merged states alive as the next was made: {held}"


def test_the_merges_of_a_scale_sweep_show_their_progress(calls_list, tmp_path, quiet, capsys, monkeypatch):
    """epmq run merged once a scale (ten in the paper configs, each with its validation pass)
    with no bar until the step's line: a bar of the merges, naming the scale being merged and
    the best one's merge again, each counted; none where the run is quiet."""
    from tqdm.auto import tqdm

    class Scored(Bench):
        def evaluate(self, state, split="test"):
            avg = 0.9 if torch.equal(state["w"], pipeline.merged_state(Bench(), sweep, 0.3)["w"]) else 0.5
            return {"a": avg, "b": avg, "avg": avg}

    sweep = MergePlan("task_arithmetic", scales=[0.1, 0.3, 0.5])
    closed, close = set(), tqdm.close  # (the merges done of how many, as each bar ends)
    monkeypatch.setattr(tqdm, "close", lambda self: closed.add((getattr(self, "desc", None), self.n, self.total))
                        or close(self))
    for progress in (True, False):
        capsys.readouterr()
        closed.clear()
        results = pipeline.run(Scored(), plan(merges=[sweep], methods=["rtn"]), tmp_path / str(progress),
                               progress=progress, log=quiet)
        assert results["steps"]["merge/TA"]["scale"] == 0.3
        err = capsys.readouterr().err
        if not progress:
            assert err == ""
            continue
        for said in ("merge/TA", "0/3", "scale 0.1]", "1/3", "scale 0.3]", "2/3", "scale 0.5]",
                     "3/4", "scale 0.3 again (the best)]"):
            assert said in err, (said, err)
        assert {c for c in closed if c[0] == "merge/TA"} == {("merge/TA", 4, 4)}, closed


def test_the_merge_a_run_chose_is_quantized_as_made_not_merged_again(calls_list, tmp_path, quiet, capsys,
                                                                    monkeypatch):
    """After its merge step had chosen a scale (and merged it), the run merged that scale once
    more for its quantizers, a whole merge of the model with nothing shown: the step's merge is
    quantized. A resumed run, whose step was done before, merges it once, on the merges' bar."""
    made, merge = [], pipeline.merged_state

    def counted(bench, plan, scale):
        if isinstance(bench, Bench):  # (not check_merges' tiny state)
            made.append(scale)
        return merge(bench, plan, scale)

    monkeypatch.setattr(pipeline, "merged_state", counted)
    sweep = plan(merges=[MergePlan("task_arithmetic", scales=[0.3, 0.5])], methods=["rtn"])
    pipeline.run(Bench(), sweep, tmp_path, log=quiet, progress=False)
    assert made == [0.3, 0.5, 0.3], made  # (the two candidates, then the best again: a tie, the first)
    made.clear()
    capsys.readouterr()
    pipeline.run(Bench(), sweep, tmp_path, log=quiet)
    assert made == [0.3], made
    err = capsys.readouterr().err
    assert "merge/TA" in err and "scale 0.3]" in err, err


def test_the_chosen_scales_validation_is_evaluated_once(calls_list, tmp_path, quiet):
    """The merge step evaluated the chosen scale's merge on validation twice: once to choose it,
    then again with its test evaluation (one whole pass over the validation split per merge,
    minutes at paper scale); its first is kept."""
    evaluations = []

    class Counted(Bench):
        def evaluate(self, state, split="test"):
            if state is not self.base_state:
                evaluations.append(split)
            return super().evaluate(state, split)

    for scales in ([0.3], [0.3, 0.5, 0.7]):
        evaluations.clear()
        results = pipeline.run(Counted(), plan(merges=[MergePlan("task_arithmetic", scales=scales)], methods=["rtn"]),
                               tmp_path / str(len(scales)), log=quiet)
        assert evaluations.count("val") == len(scales) and evaluations.count("test") == 1, evaluations
        assert results["steps"]["merge/TA"]["val"] == {"a": 0.5, "b": 0.5, "avg": 0.5}


def test_regmeans_calibration_passes_in_a_run_show_their_progress(calls_list, tmp_path, quiet, capsys):
    """A run's RegMean merge collected each expert's Gram matrices on its task's calibration
    batches (a pass a task) with no progress shown; each task's pass has its bar, none when
    the run is quiet."""

    class Linear(Bench):
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.base_state = {"weight": torch.randn(4, 4, generator=g)}
            self.experts = {t: {"weight": self.base_state["weight"] + torch.randn(4, 4, generator=g)}
                            for t in self.task_names}
            self.calibration = {t: [torch.randn(3, 4, generator=g) for _ in range(2)] for t in self.task_names}

        def model(self, state):
            net = torch.nn.Linear(4, 4, bias=False)
            net.load_state_dict(state)
            return net

    regmean = plan(merges=[MergePlan("regmean", scales=[0.3])], methods=["rtn"])
    for progress in (True, False):
        pipeline.run(Linear(), regmean, tmp_path / str(progress), progress=progress, log=quiet)
        err = capsys.readouterr().err
        assert all((f"regmean: task {t}'s Gram matrices" in err) == progress for t in Bench.task_names), err


@pytest.mark.parametrize("label", ["TA/0.3", "../TA", "TA\\0.3"])
def test_a_merge_label_that_is_no_folder_name_is_refused(label, tmp_path, quiet):
    """A merge's label names its checkpoint folders (checkpoints/<label>-w4-...): one holding a
    path separator wrote them into subfolders, or past the run's directory ('../TA'), where no
    --fresh sets them aside and a later run's replace them; refused, naming the label."""
    with pytest.raises(ValueError, match=re.escape(repr(label))):
        Plan.from_config([{"method": "task_arithmetic", "label": label}], None)


# a first run into sys.argv[1], stopped in its base's evaluation until a line comes on its stdin, then
# interrupted there (as ^C would)
FIRST_RUN = """
import sys
import torch
from epmq import pipeline
from epmq.pipeline import MergePlan, Plan

class Waiting:
    task_names = ["a", "b"]
    base_state = {"w": torch.zeros(4, 4)}
    experts = {t: {"w": torch.ones(4, 4)} for t in task_names}
    calibration = {t: [] for t in task_names}

    def evaluate(self, state, split="test"):
        print("running", flush=True)
        sys.stdin.readline()
        raise KeyboardInterrupt

plan = Plan(merges=[MergePlan("task_arithmetic", scales=[0.3])], methods=["rtn"], bits=[4], anchors=[0.1],
            controls=[], save_checkpoints=False)
pipeline.run(Waiting(), plan, sys.argv[1], log=lambda msg: None)
"""


def first_run(out):
    """A run into ``out`` in another process, under way (in its base's evaluation) once this returns."""
    import subprocess
    import sys

    other = subprocess.Popen([sys.executable, "-c", FIRST_RUN, str(out)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
                                 str(Path(pipeline.__file__).parents[1]), os.environ.get("PYTHONPATH")]))))
    assert other.stdout.readline().strip() == "running"
    return other


@pytest.mark.skipif(os.name == "nt", reason="a process stopped in its evaluation: POSIX pipes")
def test_a_second_run_into_a_directory_in_use_is_refused_naming_the_process(calls_list, tmp_path, quiet):
    """Two runs into one directory: results.json ended as whichever wrote last, and one's clean-up of
    unchosen anchors renamed checkpoints the other used. The second is refused at its start, naming
    the directory and the first's process; once the first has ended (interrupted, or killed: its lock
    goes with it), the directory is free."""
    for end in ("interrupted", "killed"):
        out = tmp_path / end
        other = first_run(out)
        try:
            with pytest.raises(ValueError) as refused:
                pipeline.run(Named("second", 0.7), plan(), out, log=quiet)
            assert str(out) in str(refused.value) and f"process {other.pid}" in str(refused.value)
            assert not calls_list and not (out / "results.json").exists()
        finally:
            if end == "interrupted":
                other.communicate("\n")
            else:
                other.kill()
                other.wait()
        results = pipeline.run(Named("second", 0.7), plan(), out, log=quiet)
        assert results["steps"]["base"]["test"]["avg"] == 0.7 and calls_list
        calls_list.clear()


def test_a_run_ended_by_an_error_lets_go_of_its_directory(calls_list, tmp_path, quiet, monkeypatch):
    """An error or ^C in a run leaves its output directory free for the next run, in this process too."""
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.Runner, "_quantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(Bench(), plan(), tmp_path, log=quiet)
    monkeypatch.undo()
    monkeypatch.setattr(pipeline.Runner, "_quantize", lambda self, *args: {"val": {"avg": 0.5}, "test": {"avg": 0.5}})
    assert "quant/TA/w4/RTN" in pipeline.run(Bench(), plan(), tmp_path, log=quiet)["steps"]
