"""The ``epmq`` command line: arguments, errors that say what to fix, resume after interruption."""

import json
import math
import os
from pathlib import Path

import pytest
import yaml

import epmq
import epmq.demo
from epmq.benches.tiny import write_tiny_clip
from epmq.cli import main, quantize_options
from epmq.demo import DemoConfig
from epmq.demo.data import SplitSizes
from epmq.demo.model import ModelConfig

TASKS = ("alpha", "beta")
PLAN = {
    "merge": [{"method": "task_arithmetic", "scales": [0.3, 1.0]}],
    "quantize": {"methods": ["rtn", "gptq", "epmq"], "bits": [8, 4], "group_size": -1, "anchors": [0.1, 1.0]},
}


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """A tiny HF CLIP experiment on disk: checkpoints, images and a config with a plan."""
    root = tmp_path_factory.mktemp("cli")
    config = write_tiny_clip(root, TASKS)
    config.update(PLAN)
    path = root / "experiment.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write(tmp_path, config, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_help(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    for word in ("demo", "run", "bench", "examples"):
        assert word in out
    assert main([]) == 2  # no command: the help, and a non-zero exit


def test_merge_help_names_the_methods_without_a_base():
    """The YAML in `epmq merge --help` names every method that takes no base (karcher was left
    out, so a user read it as needing one) and those where it is optional."""
    import re

    from epmq.cli import MERGE_CONFIG
    from epmq.merge_checkpoint import METHODS

    text = " ".join(line.split("#", 1)[1].strip() for line in MERGE_CONFIG.splitlines() if "#" in line)
    none_for, optional_for = re.search(r"\(none for ([^;)]*); optional for ([^)]*)\)", text).groups()
    assert set(none_for.replace(",", " ").split()) == {m for m, takes in METHODS.items() if takes is False}
    assert set(optional_for.replace(",", " ").split()) == {m for m, takes in METHODS.items() if takes is None}


def test_the_help_yaml_names_every_key_a_config_may_hold():
    """`epmq merge --help` and `epmq quantize --help` show the YAML: a key the config reads but
    the help never names (seed, which draws the calibration windows) is one a user cannot find."""
    import re

    from epmq.cli import MERGE_CONFIG, MERGE_KEYS, QUANTIZE_CONFIG, QUANTIZE_KEYS

    for keys, text in ((MERGE_KEYS, MERGE_CONFIG), (QUANTIZE_KEYS, QUANTIZE_CONFIG)):
        named = set(re.findall(r"[a-z_]+", text))
        assert set(keys) <= named, sorted(set(keys) - named)


def test_demo_help_names_the_cache_directory_it_uses(capsys, monkeypatch, tmp_path):
    """--cache-dir's stated default is where the demo caches when it is not given."""
    from epmq.demo.train import default_cache_root

    monkeypatch.setenv("EPMQ_CACHE_DIR", str(tmp_path))
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert default_cache_root() == tmp_path / "demo"
    assert "$EPMQ_CACHE_DIR/demo" in help_text and "~/.cache/epmq/demo" in help_text


def test_run_missing_config(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    # a directory is there: not "not found"
    for command in (["run", str(tmp_path)], ["merge", str(tmp_path), str(tmp_path / "o")],
                    ["quantize", str(tmp_path), str(tmp_path / "o")]):
        assert main(command) == 2
        assert f"{tmp_path} is a directory, not a config file" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(quantize={**c["quantize"], "bits": [5]}), "quantize.bits must be one of"),
        (lambda c: c.update(quantize={**c["quantize"], "group_size": 0}), "quantize.group_size must be -1"),
        (lambda c: c.update(merge=[{"method": "magic"}]), "unknown merge method 'magic'"),
        (lambda c: c.update(quantize={**c["quantize"], "methods": ["awq"]}), "unknown quantization method 'awq'"),
        (lambda c: c.update(quantize={**c["quantize"], "groupsize": 32}), "unknown keys \\['groupsize'\\]"),
        (lambda c: c.update(quantize={**c["quantize"], "residual_precision": "fp16"}),
         "residual_precision must be one of"),
        (lambda c: c.update(extra=1), "unknown top-level keys \\['extra'\\]"),
        (lambda c: c["tasks"][0].pop("expert"), "expert"),
        (lambda c: c["tasks"][1].update(expert="does/not/exist/here.safetensors"), "does/not/exist"),
        (lambda c: c.update(quantize={**c["quantize"], "anchors": [float("nan")]}), "each anchor must be a finite"),
        (lambda c: c.update(quantize={**c["quantize"], "anchors": ["1e-1"]}), "YAML reads 1e-1 as a string"),
        (lambda c: c.update(quantize={**c["quantize"], "anchors": ["nan"]}), "got 'nan' \\(NaN and inf"),
        (lambda c: c.update(quantize={**c["quantize"], "anchors": 0.1}), "quantize.anchors must be a list"),
        (lambda c: c.update(quantize={**c["quantize"], "anchors": [0.1, 0.1]}), "repeats a value"),
        (lambda c: c.update(quantize={**c["quantize"], "weight_anchor": -1}), "weight_anchor must be >= 0"),
        (lambda c: c.update(quantize={**c["quantize"], "backend": "cuda_magic"}), "backend must be torch or triton"),
        (lambda c: c.update(quantize={**c["quantize"], "bits": []}), "bits is empty"),
        (lambda c: c.update(quantize={**c["quantize"], "methods": [], "controls": []}), "nothing to quantize"),
        (lambda c: c.update(quantize={**c["quantize"], "save_checkpoints": "no"}), "save_checkpoints must be true"),
        (lambda c: c.update(merge=[{"method": "ties", "params": {"densty": 0.2}}]), "unknown parameters \\['densty'\\]"),
        (lambda c: c.update(merge=[{"method": "ties", "scales": ["3e-1"]}]), "each scale must be a finite"),
        (lambda c: c.update(merge=[{"method": "ties"}, {"method": "ties", "params": {"density": 0.9}}]),
         "two merges are labelled \\['TIES'\\]"),
        (lambda c: c.update(quantize={**c["quantize"], "controls": [{"method": "gptq", "targets": "fp_path",
                                                                     "label": "RTN"}]}),
         "two quantizers are labelled \\['RTN'\\]"),
        (lambda c: c.update(output="runs/x"), "output must be a mapping"),
        (lambda c: c.update(quantize={**c["quantize"], "controls": [{"method": "gptq", "target": "fp_path",
                                                                     "label": "x"}]}),
         "quantize.controls\\[0\\] must be a mapping of \\['label', 'method', 'targets'\\]"),
        (lambda c: c.update(quantize={**c["quantize"], "controls": ["gptq"]}), "quantize.controls\\[0\\] must be"),
        (lambda c: c.update(quantize={**c["quantize"], "controls": [{"method": "gptq", "targets": "fp_path",
                                                                     "label": 3}]}),
         "controls\\[0\\] .* \\(strings\\)"),
        (lambda c: c.update(quantize={**c["quantize"], "bits": [4, 4]}), "quantize.bits repeats \\[4\\]"),
        # (said by the merge itself, once the tasks are counted: after the evaluations, in a traceback)
        (lambda c: c.update(merge=[{"method": "task_arithmetic", "params": {"weights": [1.0]}}]),
         "merge TA: weights must give one number per expert \\(2\\)"),
    ],
)
def test_run_config_errors(tiny_config, tmp_path, capsys, change, message):
    config = yaml.safe_load(tiny_config.read_text())
    change(config)
    bad = write(tiny_config.parent, config, f"bad-{abs(hash(message))}.yaml")
    assert main(["run", str(bad), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert __import__("re").search(message, err), err


def test_run_writes_results_and_resumes(tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(tiny_config), "--out", str(out)]) == 0
    first = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    steps = results["steps"]
    assert {"base", "experts", "merge/TA", "quant/TA/w4/RTN", "quant/TA/w4/GPTQ", "quant/TA/w4/E-PMQ"} <= set(steps)
    assert steps["quant/TA/w4/E-PMQ"]["chosen_anchor"] in (0.1, 1.0)
    assert steps["merge/TA"]["scale"] in (0.3, 1.0)
    for name in ("table.md", "accuracy.png", "accuracy_per_task.png"):
        assert (out / name).stat().st_size > 0
    assert "Experts (individual)" in first and "TA w4 E-PMQ" in first
    # a checkpoint per row, the chosen anchor's only, loadable into a fresh model
    chosen = steps["quant/TA/w4/E-PMQ"]["checkpoint"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if "epmq" in p.name and "w4" in p.name) == [
        chosen.rsplit("/", 1)[-1]
    ]

    assert main(["run", str(tiny_config), "--out", str(out)]) == 0
    second = capsys.readouterr().out
    assert "[resume] quant/TA/w4/GPTQ: done before" in second
    assert json.loads((out / "results.json").read_text())["steps"].keys() == steps.keys()


def test_run_resumes_after_interruption(tiny_config, tmp_path, capsys, monkeypatch):
    out = tmp_path / "interrupted"
    calls = {"n": 0}
    real = epmq.quantize_model

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(epmq, "quantize_model", flaky)
    assert main(["run", str(tiny_config), "--out", str(out), "--quiet"]) == 130
    assert "run the same command again to resume" in capsys.readouterr().err
    done = set(json.loads((out / "results.json").read_text())["steps"])
    assert "quant/TA/w8/RTN" in done and "quant/TA/w4/RTN" not in done

    monkeypatch.setattr(epmq, "quantize_model", real)
    calls["n"] = 0
    assert main(["run", str(tiny_config), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    for step in sorted(done):
        assert f"[resume] {step}: done before" in log
    assert "quant/TA/w4/RTN" in json.loads((out / "results.json").read_text())["steps"]


def test_run_stopped_by_the_disk_is_one_error_line(tiny_config, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(epmq, "quantize_model", full)
    assert main(["run", str(tiny_config), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "OSError: [Errno 28] No space left on device" in capsys.readouterr().err


def test_demo_whose_cache_cannot_be_written_is_one_error_line(tmp_path, capsys, monkeypatch):
    """A read-only or full cache directory (the demo's training writes there first) ended the demo
    in an OSError traceback; run, merge and quantize say a disk's errors in one line."""
    def read_only(**kwargs):
        raise OSError(30, "Read-only file system", str(tmp_path / "cache"))

    monkeypatch.setattr(epmq.demo, "prepare", read_only)
    args = ["demo", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(args) == 2
    assert f"error: OSError: [Errno 30] Read-only file system: '{tmp_path / 'cache'}'" in capsys.readouterr().err


def test_a_run_or_demo_failing_before_it_writes_leaves_no_output_folder(tiny_config, tmp_path, capsys, monkeypatch):
    """A run refused at a missing expert, or a demo whose training failed, left OUT (and the folders
    made for it) behind, empty but for its lock file; a folder the user made is kept, whatever it holds."""
    config = yaml.safe_load(tiny_config.read_text())
    config["tasks"][1]["expert"] = "does/not/exist.safetensors"
    bad = write(tiny_config.parent, config, "missing-expert.yaml")

    def full(**kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(epmq.demo, "prepare", full)
    users = tmp_path / "users"
    users.mkdir()
    for command in (["run", str(bad)], ["demo", "--cache-dir", str(tmp_path / "cache")]):
        assert main([*command, "--out", str(tmp_path / "made" / "out"), "--quiet"]) == 2
        assert "error:" in capsys.readouterr().err
        assert not (tmp_path / "made").exists()
        assert main([*command, "--out", str(users), "--quiet"]) == 2
        assert users.is_dir()


@pytest.mark.parametrize("seed", [2 ** 64, 2 ** 60, -2 ** 40])
def test_a_demo_seed_past_what_its_draws_take_is_one_error_line(tmp_path, capsys, monkeypatch, seed):
    """The demo draws with seed * 1000 + k: a seed past 2**54 ended it in 'Overflow when
    unpacking long long' after its checks; one line before anything is trained."""
    monkeypatch.setattr(epmq.demo, "prepare", lambda **kwargs: pytest.fail("trained"))
    args = ["demo", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--quiet",
            "--seed", str(seed)]
    assert main(args) == 2
    assert f"error: --seed must be from -(2**32 - 1) to 2**32 - 1, got {seed}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_report_stopped_by_the_disk_is_one_error_line(tmp_path, capsys, monkeypatch):
    """The table and plots are written after the last step: a disk that filled up there (a
    PNG half written) ended run and demo in a traceback, not in the one line a step gets."""
    import epmq.benches
    import epmq.pipeline

    class Bench:
        task_names = ["a"]
        identity = {"x": 1}

    def full(*args):
        raise OSError(28, "No space left on device")

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"model": {"family": "hf_clip", "base": "b"}, "tasks": [{"name": "a", "expert": "e"}]}))
    monkeypatch.setattr(epmq.benches, "build_bench", lambda config, base_dir, progress: Bench())
    monkeypatch.setattr(epmq.pipeline, "run", lambda bench, plan, out, **kw: {"steps": {}})
    monkeypatch.setattr(epmq.pipeline, "report", full)
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "epmq run: error: OSError: [Errno 28] No space left on device" in err and "Traceback" not in err


def test_resumed_cells_follow_what_they_depend_on(tiny_config, tmp_path, capsys, monkeypatch):
    """A merge's parameters, the checkpoint a chosen cell must deliver, and the files of a
    task's data are part of what a cell was computed from; the config's own path is not."""
    config = yaml.safe_load(tiny_config.read_text())
    config["quantize"] = {**config["quantize"], "bits": [8], "methods": ["rtn", "epmq"], "controls": []}
    config["merge"] = [{"method": "ties", "scales": [1.0], "params": {"density": 0.2}}]
    path = write(tiny_config.parent, config, "depends.yaml")
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    steps = json.loads((out / "results.json").read_text())["steps"]
    chosen = steps["quant/TIES/w8/E-PMQ"]["chosen_anchor"]
    other = 1.0 if chosen == 0.1 else 0.1

    config["merge"][0]["params"] = {"density": 0.9}
    write(tiny_config.parent, config, "depends.yaml")
    assert main(["run", str(path), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "[resume] quant/TIES/w8/RTN: done before" not in log  # the merge changed under it

    # only the anchor that was not chosen (its checkpoint deleted) is left: it is redone
    config["quantize"]["anchors"] = [other]
    write(tiny_config.parent, config, "depends.yaml")
    assert main(["run", str(path), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert f"[resume] quant/TIES/w8/E-PMQ/anchor={other!r}: its checkpoint is missing" in log
    step = json.loads((out / "results.json").read_text())["steps"]["quant/TIES/w8/E-PMQ"]
    assert (out / "checkpoints").is_dir() and __import__("os").path.isdir(step["checkpoint"])

    # from another working directory: the same bench, nothing redone
    monkeypatch.chdir(tiny_config.parent.parent)
    assert main(["run", str(path.relative_to(tiny_config.parent.parent)), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "[resume] quant/TIES/w8/RTN: done before" in log
    assert "quantizing again" not in log and "starting over" not in log
    # a task's data changed on disk: another bench; the old results are kept aside
    data = next((tiny_config.parent / "data").rglob("*.png"))
    data.write_bytes(data.read_bytes())  # (same content, new time: conservatively another bench)
    __import__("os").utime(data, ns=(1, 1))
    assert main(["run", str(path), "--out", str(out)]) == 0
    assert "starting over; the earlier results are kept in" in capsys.readouterr().out
    first = json.loads((out / "results.json").read_text())
    (kept,) = out.glob("results.before-*.json")
    (kept_checkpoints,) = out.glob("checkpoints.before-*")  # (moved: the new run writes its own)
    assert json.loads(kept.read_text())["steps"] and any(kept_checkpoints.iterdir())
    # a second change keeps both earlier runs (the first backup was overwritten)
    config["seed"] = config.get("seed", 0) + 1
    write(tiny_config.parent, config, "depends.yaml")
    assert main(["run", str(path), "--out", str(out)]) == 0
    assert "starting over" in capsys.readouterr().out
    backups = sorted(out.glob("results.before-*.json"))
    assert len(backups) == 2 and first["identity"] in [json.loads(b.read_text())["identity"] for b in backups]


def test_fresh_ignores_earlier_results(tiny_config, tmp_path, capsys):
    out = tmp_path / "fresh"
    assert main(["run", str(tiny_config), "--out", str(out), "--quiet"]) == 0
    before = json.loads((out / "results.json").read_text())
    assert main(["run", str(tiny_config), "--out", str(out), "--fresh"]) == 0
    log = capsys.readouterr().out
    assert "[resume]" not in log and "[fresh] starting over; the earlier results are kept in" in log
    (kept,) = out.glob("results.before-*.json")  # (--fresh wrote over them at its first step)
    (kept_checkpoints,) = out.glob("checkpoints.before-*")
    kept = json.loads(kept.read_text())
    paths = [step["checkpoint"] for step in kept["steps"].values() if step.get("checkpoint")]
    assert paths and all(p.startswith(str(kept_checkpoints)) and __import__("os").path.isdir(p) for p in paths)
    assert kept["identity"] == before["identity"] and kept["steps"].keys() == before["steps"].keys()


def test_demo_on_a_tiny_configuration(tmp_path, capsys, monkeypatch):
    """``epmq demo`` end to end on a few images and one epoch (the real one trains for ~1 min)."""
    tiny = DemoConfig(
        model=ModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2),
        tasks=("digit", "inv_pairs", "perm_digit"),
        splits=SplitSizes(val=0.25, test=0.25, calib=8),
        data_limit=60,
        base_epochs=1,
        expert_epochs=1,
        calib_batch=4,
    )
    real_prepare = epmq.demo.prepare
    monkeypatch.setattr(epmq.demo, "prepare", lambda **kw: real_prepare(config=tiny, **kw))
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--quick", "--quiet"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["identity"]["bench"] == "epmq-demo"
    assert "quant/TA/w2/E-PMQ" in results["steps"] and "quant/TA/w2/GPTQ fp-path" in results["steps"]
    printed = capsys.readouterr().out
    assert "digit" in printed and "TA w2 GPTQ fp-path" in printed
    # the table says how far its averages are from resolved (60 test images a task, data_limit)
    rows = epmq.pipeline.table_rows(results, epmq.demo.default_plan(quick=True))
    errors = sorted(epmq.demo.sampling_error(accs, dict.fromkeys(tiny.tasks, 60)) for _, accs in rows)
    assert (f"Test-set sampling error (95%, binomial; 3 tasks x 60 test images): +-{100 * errors[0]:.1f} to "
            f"+-{100 * errors[-1]:.1f} points on a row's avg, up to +-{100 * math.hypot(*errors[-2:]):.1f} on the "
            f"difference of two rows") in printed
    assert main(args[:-1]) == 0  # second run: everything from the cache and the results
    assert "[resume] quant/TA/w2/E-PMQ/anchor=1.0: done before" in capsys.readouterr().out


def test_demo_results_follow_the_cached_models_not_only_their_configuration(tmp_path, capsys, monkeypatch):
    """The cache folder is named by the configuration's hash; another training of it (another
    machine's, a cleared cache retrained under another torch) holds other weights there. Its
    results used to be resumed as they were: every cell "done before", the old experts' numbers."""
    import torch
    from safetensors.torch import load_file, save_file

    tiny = DemoConfig(
        model=ModelConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2),
        tasks=("digit", "inv_pairs"), splits=SplitSizes(val=0.25, test=0.25, calib=8), data_limit=60,
        base_epochs=1, expert_epochs=1, calib_batch=4,
    )
    real_prepare = epmq.demo.prepare
    monkeypatch.setattr(epmq.demo, "prepare", lambda **kw: real_prepare(config=tiny, **kw))
    args = ["demo", "--out", str(tmp_path / "demo"), "--cache-dir", str(tmp_path / "cache"), "--quick"]
    assert main(args) == 0
    capsys.readouterr()
    (expert,) = (tmp_path / "cache").glob("*/expert.digit.safetensors")
    g = torch.Generator().manual_seed(1)
    save_file({k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in load_file(expert).items()}, expert)
    assert main(args) == 0
    log = capsys.readouterr().out
    assert "done before" not in log and "differs in ['models']" in log


def test_bench_needs_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_example_merge_and_quantize_configs_are_valid():
    """configs/files/: every key known, every merge and quantization runnable as written."""
    from pathlib import Path

    from epmq.cli import MERGE_KEYS, QUANTIZE_KEYS, _yaml_mapping, quantize_options
    from epmq.merge_checkpoint import check_merge

    root = Path(__file__).resolve().parents[2] / "configs" / "files"
    merges, quantizations = sorted(root.glob("merge-*.yaml")), sorted(root.glob("quantize-*.yaml"))
    assert merges and quantizations
    for path in merges:
        c = _yaml_mapping(path, MERGE_KEYS, ("method", "models"), "")
        check_merge(c["method"], c["models"], base=c.get("base"), params=c.get("params"), dtype=c.get("dtype"),
                    calibration=c.get("calibration"), chat_template=c.get("chat_template"),
                    tokenizer_source=c.get("tokenizer_source"), pad_to_multiple_of=c.get("pad_to_multiple_of"),
                    tokens=c.get("tokens"))
    for path in quantizations:
        spec, options = quantize_options(_yaml_mapping(path, QUANTIZE_KEYS, ("model", "method"), ""))
        assert spec.bits == 4 and options["method"] == "epmq"


def test_the_table_names_the_models_precision():
    from epmq import pipeline

    plan = pipeline.Plan(bits=[4], methods=["rtn"], controls=[])
    acc = {"val": {"avg": 0.5}, "test": {"avg": 0.5}}
    results = {"identity": {"model": {"dtype": "bfloat16"}},
               "steps": {"base": acc, "experts": acc, "merge/TA": dict(acc, scale=0.3), "quant/TA/w4/RTN": acc}}
    assert [label for label, _ in pipeline.table_rows(results, plan)][2] == "TA bf16 (scale 0.3)"
    results["identity"] = {"bench": "epmq-demo"}
    assert [label for label, _ in pipeline.table_rows(results, plan)][2] == "TA fp32 (scale 0.3)"
    # a merge that takes no scale is not labelled with the plan's default one
    plan = pipeline.Plan(merges=[pipeline.MergePlan("average", label="Avg")], bits=[4], methods=["rtn"],
                         controls=[])
    results["steps"] = {"base": acc, "experts": acc, "merge/Avg": dict(acc, scale=0.3), "quant/Avg/w4/RTN": acc}
    assert [label for label, _ in pipeline.table_rows(results, plan)][2] == "Avg fp32"


# --------------------------------------------------------------------------- options a method does not read, output.dir


@pytest.mark.parametrize("method, extra, unread", [
    ("rtn", {"percdamp": 0.01}, "percdamp"),
    ("rtn", {"targets": "fp_path"}, "targets"),
    ("rtn", {"true_sequential": False}, "true_sequential"),
    ("rtn", {"seed": 1}, "seed"),
    ("rtn", {"act_order": True}, "act_order"),        # (QuantSpec's: RTN has no column order,
    ("rtn", {"static_groups": True}, "static_groups"),  # and its grid is the weight's own)
    ("gptq", {"residual_precision": "ieee"}, "residual_precision"),
    ("gptq", {"lora_base": "ckpt/base"}, "lora_base"),
    ("gptq", {"weight_anchor": 0.1}, "weight_anchor"),
])
def test_a_key_the_method_does_not_read_is_an_error(method, extra, unread):
    config = {"model": "m", "method": method, **extra}
    if method != "rtn":
        config["calibration"] = {"a": "a.txt"}
    with pytest.raises(ValueError, match=f"method {method} does not read {unread}: remove it"):
        quantize_options(config)
    # what it reads is accepted (nothing is opened)
    if method == "gptq":
        quantize_options({"model": "m", "method": "gptq", "calibration": {"a": "a.txt"}, "percdamp": 0.01,
                          "targets": "fp_path", "true_sequential": False, "seed": 1})


def test_weight_anchor_must_be_a_number():
    config = {"model": "m", "method": "epmq", "calibration": {"a": "a.txt"}, "experts": {"a": "e"}}
    with pytest.raises(ValueError, match="weight_anchor must be a finite number"):
        quantize_options(dict(config, weight_anchor=float("inf")))
    # a negative one (and anchor, percdamp) is refused before the model loads, not at its first block
    for key in ("anchor", "weight_anchor", "percdamp"):
        with pytest.raises(ValueError, match=f"{key} must be >= 0, got -1"):
            quantize_options(dict(config, **{key: -1}))


@pytest.mark.parametrize("given, want", [
    (None, "runs/{stem}"),                  # no output section: runs/<config name> in the cwd
    ("../runs/x", "{config_dir}/../runs/x"),  # output.dir: relative to the config file
    ("--out", "elsewhere"),                 # --out: relative to the cwd
    ("~/runs/x", "{home}/runs/x"),          # ~ is the home, as in the config's other paths (was a "~" folder)
])
def test_where_run_writes(tmp_path, monkeypatch, given, want):
    import epmq.benches
    import epmq.cli
    import epmq.pipeline

    (tmp_path / "configs").mkdir()
    config = {"model": {"family": "hf_clip", "base": "b"}, "tasks": [{"name": "a", "expert": "e"}]}
    if given not in (None, "--out"):
        config["output"] = {"dir": given}
    path = tmp_path / "configs" / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    seen = {}

    class Bench:
        task_names = ["a"]
        identity = {"x": 1}

    monkeypatch.setattr(epmq.benches, "build_bench", lambda config, base_dir, progress: Bench())
    monkeypatch.setattr(epmq.pipeline, "run", lambda bench, plan, out, **kw: seen.setdefault("out", out))
    monkeypatch.setattr(epmq.cli, "_finish", lambda *a: None)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    args = ["run", str(path), "--quiet"] + (["--out", "elsewhere"] if given == "--out" else [])
    assert main(args) == 0
    expected = Path(want.format(stem="exp", config_dir=path.parent, home=tmp_path / "home"))
    assert Path(seen["out"]) == expected


def test_run_help_says_where_run_writes(capsys):
    """--out's stated default is test_where_run_writes's: output.dir, else runs/<config name>."""
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "output.dir, relative to the config file" in help_text
    assert "runs/<config name> in the current directory" in help_text


@pytest.mark.parametrize("section, message", [
    ({"data": {"calibration": {"samples": 8, "batchsize": 4}}}, r"'batchsize' in data.calibration"),
    ({"eval": {"max_samples": {"val": 4, "tst": 4}}}, r"'tst' in eval.max_samples"),
])
def test_unknown_keys_of_nested_bench_sections_are_errors(section, message):
    from epmq.benches import BenchConfigError, parse_config

    config = {"model": {"family": "hf_clip", "base": "b"},
              "tasks": [{"name": "a", "expert": "e", "data": {"root": "data/a"}}], **section}
    with pytest.raises(BenchConfigError, match=message):
        parse_config(config)


def test_threads_must_be_positive(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"model": {"family": "hf_clip", "base": "b"}}))
    assert main(["run", str(path), "--threads", "0", "--quiet"]) == 2
    assert "--threads must be a positive number" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "merge", "quantize"])
def test_a_key_yaml_reads_as_a_bool_is_an_error_not_a_traceback(tmp_path, capsys, command):
    """`on:` or `yes:` unquoted is a bool key in YAML 1.1 (it used to end in a TypeError)."""
    path = tmp_path / "c.yaml"
    path.write_text("method: ties\nmodels: [a, b]\nmodel: m\non: 1\n")
    assert main([command, str(path), str(tmp_path / "out")][:2 if command == "run" else 3] + ["--quiet"]) == 2
    assert "the key 'on' (line 4) is not a name" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "demo", "bench"])
def test_out_that_is_a_file_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch, command):
    """It used to end the run in a FileExistsError traceback at the first result written, after
    the bench was built and the base evaluated (the demo: after its training)."""
    import epmq.benches

    def never(*args, **kwargs):
        raise AssertionError("built a bench for an output directory that cannot be one")

    monkeypatch.setattr(epmq.benches, "build_bench", never)
    monkeypatch.setattr(epmq.demo, "prepare", never)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"model": {"family": "hf_clip", "base": "b"}, "tasks": [{"name": "a", "expert": "e"}]}))
    (tmp_path / "taken").write_text("someone's file")
    for out in ("taken", "taken/sub"):
        args = ([command] + ([str(path)] if command == "run" else []) + ["--out", str(tmp_path / out)]
                + (["--quiet"] if command != "bench" else []))
        assert main(args) == 2
        assert f"{tmp_path / 'taken'} is a file, not a directory" in capsys.readouterr().err
    assert (tmp_path / "taken").read_text() == "someone's file"
    if command == "demo":  # the cache, given or by $EPMQ_CACHE_DIR (a NotADirectoryError traceback)
        assert main(["demo", "--cache-dir", str(tmp_path / "taken"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
        monkeypatch.setenv("EPMQ_CACHE_DIR", str(tmp_path / "taken"))
        assert main(["demo", "--out", str(tmp_path / "o"), "--quiet"]) == 2
        assert capsys.readouterr().err.count(f"{tmp_path / 'taken'} is a file, not a directory") == 2


@pytest.mark.parametrize("command", ["run", "demo"])
def test_out_that_cannot_be_written_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch, command):
    """A read-only output directory (or one under a read-only parent) used to fail at the first
    result written: after the bench was built and the base evaluated, after the demo's training."""
    import os

    import epmq.benches

    def never(*args, **kwargs):
        raise AssertionError("built a bench for an output directory that cannot be written")

    monkeypatch.setattr(epmq.benches, "build_bench", never)
    monkeypatch.setattr(epmq.demo, "prepare", never)
    locked = tmp_path / "locked"  # (a read-only mount: chmod does not stop root, who runs the tests here)
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and access(path, mode, **kw))
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"model": {"family": "hf_clip", "base": "b"}, "tasks": [{"name": "a", "expert": "e"}]}))
    for out in ("locked", "locked/sub"):
        args = [command] + ([str(path)] if command == "run" else []) + ["--out", str(tmp_path / out), "--quiet"]
        assert main(args) == 2
        assert f"{locked} is not writable" in capsys.readouterr().err


@pytest.mark.skipif(os.name == "nt", reason="a process waiting on its stdin: POSIX pipes")
@pytest.mark.parametrize("command", ["run", "demo"])
def test_a_second_run_into_a_directory_in_use_is_refused_at_its_start(tmp_path, capsys, monkeypatch, command,
                                                                      held_elsewhere):
    """Two runs into one directory had no lock: results.json ended as whichever wrote last, and one's
    clean-up of unchosen anchors took checkpoints from the other. The second is refused before its
    bench is built (the demo's training), in one line naming the directory and the first's process;
    the directory is free again once that process has ended."""

    import epmq.benches

    def never(*args, **kwargs):
        raise AssertionError("built a bench for an output directory another run holds")

    monkeypatch.setattr(epmq.benches, "build_bench", never)
    monkeypatch.setattr(epmq.demo, "prepare", never)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({"model": {"family": "hf_clip", "base": "b"},
                                    "tasks": [{"name": "a", "expert": "e"}]}))
    out = tmp_path / "out"
    args = [command] + ([str(path)] if command == "run" else []) + ["--out", str(out), "--quiet"]
    with held_elsewhere("hold_run", out) as pid:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"output directory {out} is in use by another epmq run (process {pid} " in err, err
        assert len(err.strip().splitlines()) == 1, err
    with pytest.raises(AssertionError, match="another run holds"):  # (free: on to building the bench)
        main(args)


@pytest.mark.skipif(os.name == "nt", reason="a process waiting on its stdin: POSIX pipes")
@pytest.mark.parametrize("command, config", [
    ("merge", {"method": "ties", "base": "b", "models": ["e0", "e1"]}),
    ("quantize", {"model": "m", "method": "rtn", "bits": 4}),
    ("quantize", {"model": "m", "method": "gptq", "bits": 4, "calibration": {"a": "a.txt"}}),
])
def test_a_second_merge_or_quantize_into_an_out_in_use_is_refused_at_its_start(tmp_path, capsys, monkeypatch,
                                                                                command, config, held_elsewhere):
    """epmq merge took no lock on OUT, nor epmq quantize with RTN (GPTQ and E-PMQ hold OUT.resume): two
    into one OUT each replaced the other's checkpoint, and one's copy of the files kept beside it read
    the directory the other was replacing. The second is refused before any model is read, in one line
    naming OUT, the first's process and the lock file; OUT is free again once the first has let go."""

    import epmq.merge_checkpoint
    import epmq.quantize_files

    def never(*args, **kwargs):
        raise AssertionError("read a model for an output directory another process writes")

    monkeypatch.setattr(epmq.merge_checkpoint, "local_checkpoint", never)
    monkeypatch.setattr(epmq.quantize_files, "local_checkpoint", never)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("calibration text")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    if command == "quantize":  # (the first a GPTQ walk: its blocks are its own, not the refused one's to resume)
        (tmp_path / "out.resume").mkdir()
        (tmp_path / "out.resume" / "model.layers.0.json").write_text("{}")
    args = [command, str(path), str(out), "--quiet"]
    lock = tmp_path / ".out.epmq-lock"
    with held_elsewhere("hold_output", out) as pid:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert (f"output directory {out} is in use by another epmq merge or quantize (process {pid} "
                f"holds {lock})") in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert not lock.exists()  # (let go: the lock file is gone with it)
    with pytest.raises(AssertionError, match="another process writes"):  # (free: on to reading the model)
        main(args)
    assert not lock.exists() and (tmp_path / "out.resume").exists() == (command == "quantize")


def test_run_into_a_directory_of_another_tools_results(tiny_config, tmp_path, capsys):
    """Its results.json (a JSON object, without epmq's steps) used to be written over."""
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "results.json").write_text('{"results": {"acc": 0.9}}')
    assert main(["run", str(tiny_config), "--out", str(out), "--quiet"]) == 2
    assert "results.json is not a results file epmq wrote" in capsys.readouterr().err
    assert (out / "results.json").read_text() == '{"results": {"acc": 0.9}}'


def test_every_shipped_config_passes_the_checks_of_its_command(tmp_path, monkeypatch, capsys):
    """Every YAML under configs/ (a new one included) through the command it is for, every check
    made, up to the work itself (stubbed: no hub, no file it names is read)."""
    import epmq.benches
    import epmq.merge_checkpoint
    import epmq.quantize_files
    from epmq.benches import load_config, parse_config
    from epmq.pipeline import Plan

    reached = []
    monkeypatch.setattr(epmq.benches, "build_bench", lambda config, **kw: reached.append(config) or 1 / 0)
    monkeypatch.setattr(epmq.merge_checkpoint, "merge_checkpoints", lambda *a, **kw: reached.append(a) or 1 / 0)
    monkeypatch.setattr(epmq.quantize_files, "quantize_checkpoint", lambda *a, **kw: reached.append(a) or 1 / 0)
    root = Path(__file__).resolve().parents[2] / "configs"
    paths = sorted(root.rglob("*.yaml"))
    assert len(paths) >= 9
    for path in paths:
        command = path.name.split("-")[0] if path.parent.name == "files" else "run"
        assert command in ("run", "merge", "quantize"), path
        if command == "run":
            config = load_config(path)
            parse_config(config, base_dir=path.parent)
            Plan.from_config(config.get("merge"), config.get("quantize"))
        n = len(reached)
        with pytest.raises(ZeroDivisionError):  # (the stub: every check before it passed)
            main([command, str(path)] + (["--out", str(tmp_path / path.stem)] if command == "run"
                                         else [str(tmp_path / path.stem)]) + ["--quiet"])
        assert len(reached) == n + 1, (path, capsys.readouterr().err)


@pytest.mark.parametrize("value", ["", "''"])
def test_quantize_with_model_left_empty(tmp_path, capsys, value):
    """`model:` with no value is YAML's null (it ended in a TypeError traceback)."""
    path = tmp_path / "q.yaml"
    path.write_text(f"model: {value}\nmethod: rtn\n")
    assert main(["quantize", str(path), str(tmp_path / "out"), "--quiet"]) == 2
    assert "model must be a path or HF hub id, got " in capsys.readouterr().err


def test_python_dash_m_epmq_is_the_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "epmq", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage: epmq" in done.stdout


def test_engine_warnings_of_a_runs_checkpoints_quiet_with_it_and_said_once(tiny_config, tmp_path, capsys):
    """Each checkpoint `epmq run` (and the demo) saves warned which engines cannot serve it, the
    same two warnings for every one (~80 lines of a demo), --quiet or not; --quiet says none,
    a run without it each once, naming the checkpoint it is of."""
    import warnings

    config = yaml.safe_load(tiny_config.read_text())
    config["quantize"] = {**config["quantize"], "methods": ["rtn", "gptq"], "bits": [4], "controls": []}
    del config["quantize"]["anchors"]
    path = write(tiny_config.parent, config, "asym.yaml")
    said = []
    for quiet in (True, False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            args = ["run", str(path), "--out", str(tmp_path / f"out-{quiet}")] + ["--quiet"] * quiet
            assert main(args) == 0
        text = capsys.readouterr().out + "\n".join(str(w.message) for w in caught)
        said.append([text.count(what) for what in ("engines that cannot serve this checkpoint",
                                                   "asymmetric grids: on the CPU")])
    assert said == [[0, 0], [1, 1]]
    assert "checkpoints/TA-w4-rtn" in text


def test_engine_warnings_of_a_checkpoint_whose_save_failed_are_said(tiny_config, tmp_path, capsys, monkeypatch):
    """A run's save_quantized that raised (a full disk) lost the warnings it had given before, the
    serving warnings of the checkpoint among them, caught for the log and never said: they are
    said, in the log as for a saved checkpoint, and the save's error reported as it was."""
    import warnings

    from epmq import checkpoint

    config = yaml.safe_load(tiny_config.read_text())
    config["quantize"] = {**config["quantize"], "methods": ["rtn"], "bits": [4], "controls": []}
    del config["quantize"]["anchors"]
    path = write(tiny_config.parent, config, "asym-full-disk.yaml")

    def full_disk(tensors, where):
        warnings.warn("a warning of the save itself")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_tensors", full_disk)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert "No space left on device" in err
    assert "engines that cannot serve this checkpoint" in out and "checkpoints/TA-w4-rtn" in out
    assert "a warning of the save itself" in [str(w.message) for w in caught]


def test_a_failed_checkpoint_save_ends_in_its_own_error_not_a_warning_said_after_it(tiny_config, tmp_path,
                                                                                      monkeypatch, capsys):
    """A run's save that warned and then failed (a full disk) had its warnings said again in a
    `finally`: under -W error (or a log on the same full disk) that raised instead, and the run
    ended in the warning, the disk's error lost."""
    import errno
    import warnings

    import epmq

    def full_disk(model, path, **kwargs):
        warnings.warn("a warning of the save before its failure", UserWarning)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(epmq, "save_quantized", full_disk)
    config = yaml.safe_load(tiny_config.read_text())
    config["quantize"] = {**config["quantize"], "methods": ["rtn"], "bits": [4], "controls": []}
    del config["quantize"]["anchors"]
    path = write(tiny_config.parent, config, "full_disk.yaml")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="a warning of the save before its failure")
        code = main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"])
    assert code != 0 and "OSError: [Errno 28] No space left on device" in capsys.readouterr().err


def test_epmq_warnings_are_one_line_each_and_other_libraries_keep_their_form(tmp_path):
    """A command's own warnings (ServingWarning, an epmq module's UserWarning) reached the terminal
    in Python's form, epmq's source path and its `warnings.warn(` line beneath; they are one line
    each, as the mergekit notes are, and another library's keeps Python's form. (A subprocess: pytest
    records warnings, so the terminal's form is seen only in a process of its own.)"""
    import subprocess
    import sys

    script = tmp_path / "warns.py"
    script.write_text(
        "import sys, warnings\n"
        "from epmq import calibration, cli\n"
        "from epmq.checkpoint import ServingWarning\n"
        "def command(args):\n"
        "    warnings.warn('vLLM refuses this checkpoint', ServingWarning)\n"
        "    warnings.warn_explicit('fewer texts than samples', UserWarning, calibration.__file__, 1)\n"
        "    warnings.warn('a library of its own', FutureWarning)\n"
        "    return 0\n"
        "cli._quantize = command\n"
        "code = cli.main(['quantize', 'q.yaml', 'out'])\n"
        "warnings.warn('after the command', ServingWarning)\n"
        "sys.exit(code)\n")
    here = {**os.environ, "PYTHONPATH": str(Path(epmq.__file__).parents[1])}  # (this checkout's epmq)
    done = subprocess.run([sys.executable, "-W", "always", str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=here)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert "epmq quantize: warning: ServingWarning: vLLM refuses this checkpoint" in lines
    assert "epmq quantize: warning: fewer texts than samples" in lines
    assert f"{script}:7: FutureWarning: a library of its own" in lines
    assert f"{script}:11: ServingWarning: after the command" in lines  # (the library's form outside the command)


@pytest.mark.parametrize("key, given, example", [
    ("calibration", "data/math.jsonl", "  calibration:\n    math: data/math.jsonl\n"),
    ("calibration", ["data/math.jsonl", "data/code.txt"],
     "  calibration:\n    math: data/math.jsonl\n    code: data/code.txt\n"),
    ("calibration", ["a/train.jsonl", "b/train.jsonl"], "  calibration:\n    task1: a/train.jsonl\n    task2: "),
    ("experts", "ckpt/math", "  experts:\n    math: ckpt/math\n"),
])
def test_task_files_given_without_their_task_show_the_yaml_to_write(tmp_path, capsys, key, given, example):
    """`calibration: data/math.jsonl` (no task name) was refused as "must map each task to file(s)",
    which did not say how: the error shows the mapping in YAML, each task named by its file."""
    config = {"model": "merged/ties", "method": "epmq", "calibration": {"math": "data/math.jsonl"},
              "experts": {"math": "ckpt/math"}, key: given}
    assert main(["quantize", str(write(tmp_path, config)), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{key} must map each task to its" in err and "names no task" in err
    assert example in err + "\n"


def test_a_mistyped_local_folder_is_said_as_one_not_as_the_hubs_error(tiny_config, tmp_path, capsys, monkeypatch):
    """`model: merged/tie` beside a folder merged/ (an org/name in form) ended in the hub library's
    lines on the connection: it is said to be no folder there, naming the folders merged/ holds; an
    org/name with no such folder here keeps the hub's error. `epmq run`'s experts alike."""
    import huggingface_hub.constants as hub

    (tmp_path / "merged" / "ties").mkdir(parents=True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    said = {}
    for model in ("merged/tie", "org/missing"):
        path = write(tmp_path, {"model": model, "method": "rtn"})
        assert main(["quantize", str(path), "out", "--quiet"]) == 2
        said[model] = capsys.readouterr().err
    assert said["merged/tie"].count("\n") == 1
    assert f"no folder {tmp_path / 'merged' / 'tie'}: merged holds no 'tie' (its folders: ties)" in said["merged/tie"]
    assert "'org/missing' could not be fetched from the HF hub" in said["org/missing"]
    config = yaml.safe_load(tiny_config.read_text())
    config["tasks"][1]["expert"] = "experts/c"
    bad = write(tiny_config.parent, config, "mistyped-expert.yaml")
    assert main(["run", str(bad), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "experts holds no 'c' (its folders: alpha, beta)" in capsys.readouterr().err


@pytest.mark.parametrize("hub_off", [True, False])
def test_a_hub_id_not_fetched_is_one_line_without_the_hubs_advice(tmp_path, capsys, monkeypatch, hub_off):
    """`model: org/missing` with HF_HUB_OFFLINE set, or with the hub out of reach, printed epmq's
    line and then the hub library's own advice for its Python callers ('set HF_HUB_OFFLINE=0 as
    environment variable', a second line 'Please check your internet connection'): one line now,
    saying why and what holds no copy, a mistyped folder (org/ a folder here) alike."""
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", hub_off)
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # (refused at once: no hub is reached)
    monkeypatch.chdir(tmp_path)
    why = ("HF_HUB_OFFLINE is set, and the hub cache {} holds no complete snapshot of it: unset it to download"
           if hub_off else "the hub could not be reached (ConnectError: {{}}), and the hub cache {} holds no "
           "complete snapshot of it").format(tmp_path / "hub")
    for given, said in [("org/missing", f"no local path {tmp_path / 'org' / 'missing'}, and 'org/missing' could "
                                        f"not be fetched from the HF hub: {why}"),
                        ("org/mising", f"no folder {tmp_path / 'org' / 'mising'}: org holds no 'mising' (its "
                                       f"folders: missing), and 'org/mising' is no HF hub repository that could "
                                       f"be fetched either: {why}")]:
        path = write(tmp_path, {"model": given, "method": "rtn"})
        assert main(["quantize", str(path), "out", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "HF_HUB_OFFLINE=0" not in err and "internet connection" not in err
        head, _, tail = said.partition("{}")
        assert head in err and tail in err, err
        (tmp_path / "org" / "missing").mkdir(parents=True, exist_ok=True)
