"""The HF CLIP bench on a tiny random CLIPModel written in the real layouts (no hub, no network)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from epmq.benches import BenchConfigError, build_bench
from epmq.benches.clip import HFClipBench
from epmq.benches.tiny import write_tiny_clip
from epmq.checkpoint_io import LazyStateDict
from epmq.merge import task_arithmetic

TASKS = ("alpha", "beta")
WRITE_TINY = write_tiny_clip  # the ``tiny`` and ``bench`` fixtures (conftest.py)


def _in_unit_interval(acc, tasks):
    assert set(acc) == set(tasks) | {"avg"}
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    assert acc["avg"] == pytest.approx(sum(acc[t] for t in tasks) / len(tasks))


def test_structure(bench):
    assert isinstance(bench, HFClipBench)
    assert bench.task_names == list(TASKS)
    model = bench.model()
    assert type(model).__name__ == "CLIPVisionModel"
    assert set(bench.base_state.keys()) == set(model.state_dict().keys())
    assert bench.data["alpha"].classnames == ["class a", "class b", "class c"]
    # the held-out val and the calibration examples come out of train, disjoint
    d = bench.data["alpha"]
    assert not set(d.splits["val"].indices) & set(d.splits["train"].indices)
    assert set(d.calibration.indices) <= set(d.splits["train"].indices)
    assert len(d.splits["train"]) + len(d.splits["val"]) == 18 and len(d.splits["test"]) == 9


def test_experts_are_lazy_and_read_the_checkpoints(bench, tiny, monkeypatch):
    from safetensors.torch import load_file

    root, _ = tiny
    names = set(bench.model().state_dict().keys())
    for task in TASKS:
        expert = bench.experts[task]
        assert isinstance(expert, LazyStateDict) and set(expert.keys()) == names
        reads = []
        real_get = expert.reader.get
        monkeypatch.setattr(expert.reader, "get", lambda key, real_get=real_get: reads.append(key) or real_get(key))
        w = expert["encoder.layers.1.mlp.fc1.weight"]
        assert len(reads) == 1  # one tensor read, nothing else
        files = {}
        for f in sorted((root / "experts" / task).glob("*.safetensors")):
            files.update(load_file(f))
        key = expert.checkpoint_key("encoder.layers.1.mlp.fc1.weight")
        assert key == ("encoder." if task == "alpha" else "vision_model.encoder.") + "layers.1.mlp.fc1.weight"
        assert torch.equal(w, files[key])
        assert not torch.equal(w, bench.base_state["encoder.layers.1.mlp.fc1.weight"])


def test_merge_reads_each_expert_tensor_once(bench, monkeypatch):
    counts = {t: 0 for t in TASKS}
    for t in TASKS:
        real_get = bench.experts[t].reader.get

        def counting(key, t=t, real_get=real_get):
            counts[t] += 1
            return real_get(key)

        monkeypatch.setattr(bench.experts[t].reader, "get", counting)
    merged = task_arithmetic(bench.base_state, [bench.experts[t] for t in TASKS], scale=0.3)
    assert counts == {t: len(bench.base_state) for t in TASKS}
    assert set(merged) == set(bench.base_state)
    bench.model(merged)  # loads


def test_calibration_batches(bench):
    calib = bench.calibration
    assert set(calib) == set(TASKS)
    for items in calib.values():
        assert len(items) == 2  # 4 samples in batches of 2
        for item in items:
            assert set(item) == {"pixel_values"}
            assert item["pixel_values"].shape == (2, 3, 16, 16) and item["pixel_values"].dtype == torch.float32


def test_evaluate_base_expert_merged_and_module(bench):
    merged = task_arithmetic(bench.base_state, [bench.experts[t] for t in TASKS], scale=0.3)
    for split in ("val", "test"):
        for state in (bench.base_state, bench.experts["alpha"], merged):
            _in_unit_interval(bench.evaluate(state, split), TASKS)
    model = bench.model(merged)
    assert bench.evaluate(model, "test") == bench.evaluate(merged, "test")
    experts = bench.expert_accuracies("test")
    _in_unit_interval(experts, TASKS)
    assert experts["beta"] == bench.evaluate(bench.experts["beta"], "test", tasks=["beta"])["beta"]
    with pytest.raises(ValueError, match="split must be"):
        bench.evaluate(bench.base_state, "train")


def test_heads_come_from_the_text_tower(bench, tiny):
    from transformers import AutoTokenizer, CLIPModel

    root, _ = tiny
    heads = bench.heads
    assert {t: tuple(h.shape) for t, h in heads.items()} == {t: (3, 16) for t in TASKS}
    assert torch.allclose(heads["alpha"].norm(dim=-1), torch.ones(3))
    # by hand: CLIPModel's text tower and projection over the templates, averaged per class
    clip = CLIPModel.from_pretrained(root / "base").eval()
    tok = AutoTokenizer.from_pretrained(root / "base")
    templates = bench.templates("alpha")
    rows = []
    with torch.no_grad():
        for c in ["class a", "class b", "class c"]:
            t = tok([tpl.format(c) for tpl in templates], padding=True, return_tensors="pt")
            emb = clip.text_projection(clip.text_model(**t).pooler_output)
            rows.append(F.normalize(F.normalize(emb, dim=-1).mean(0), dim=-1))
    assert torch.allclose(heads["alpha"], torch.stack(rows), atol=1e-5)
    # and the image side is CLIP's: vision tower pooled output through the visual projection
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = clip.visual_projection(clip.vision_model(pixel_values=x).pooler_output)
        got = bench._image_features(bench.model(), x)
    assert torch.allclose(got, want, atol=1e-5)
    assert bench.logit_scale == pytest.approx(float(clip.logit_scale.detach().exp()))


def test_preprocessing_matches_the_image_processor(tiny):
    from PIL import Image
    from transformers import CLIPImageProcessor

    root, config = tiny
    bench = build_bench(config, base_dir=root, progress=False)
    img = Image.open(next((root / "data" / "alpha" / "test" / "class_b").glob("*.png")))
    want = CLIPImageProcessor.from_pretrained(root / "base")(images=img, return_tensors="pt")["pixel_values"]
    got = bench.prep.normalize(bench.prep.uint8(img)[None])
    assert got.shape == want.shape == (1, 3, 16, 16)
    assert (got - want).abs().max() < 0.05  # resampling implementations differ by a grey level or so


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_image_cache(tiny, tmp_path, monkeypatch, cache):
    root, config = tiny
    config = dict(config, eval=dict(config["eval"], cache=cache, cache_dir=str(tmp_path / "cache")))
    bench = build_bench(config, base_dir=root, progress=False)
    first = bench.evaluate(bench.base_state, "test")

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(bench, "_loader", no_decoding)
    assert bench.evaluate(bench.base_state, "test") == first
    if cache == "disk":  # a new bench finds the crops on disk
        again = build_bench(config, base_dir=root, progress=False)
        monkeypatch.setattr(again, "_loader", no_decoding)
        assert again.evaluate(again.base_state, "test") == first
        assert len(list((tmp_path / "cache").glob("*.done"))) == 2


def test_two_runs_filling_one_disk_cache_at_once_keep_every_image(tmp_path):
    """A second run of the same config (eval.cache: disk) that starts while the first fills a
    split's crops opened the shared file "w+": the first's images written so far read back as
    zeros, in its own later evaluations and, once its .done was written, in every later run's."""
    from epmq.benches.vision import _Store

    path, n = tmp_path / "task-val-digest", 8
    first = _Store(n, (3, 4, 4), path)
    first.x[:4], first.y[:4] = 7, 1
    second = _Store(n, (3, 4, 4), path)  # (started meanwhile; still filling when the first ends)
    first.x[4:], first.y[4:] = 7, 1
    first.finish()
    later = _Store(n, (3, 4, 4), path)
    assert later.complete
    for store in (first, later):
        assert store.x.unique().tolist() == [7] and store.y.tolist() == [1] * n
    second.x[:], second.y[:] = 7, 1
    second.finish()
    assert _Store(n, (3, 4, 4), path).x.unique().tolist() == [7]


class _Planted:
    """A pickle that runs code when unpickled (what a file put in a shared cache could hold)."""

    ran = []

    def __reduce__(self):
        return (_Planted.ran.append, ("code ran",))


def test_the_disk_caches_labels_are_read_as_tensors_only(tmp_path, monkeypatch):
    """The labels of a disk cache were read with torch.load's default, which before torch 2.6
    (setup.py allows 2.4) unpickles anything: a .labels.pt put in the cache directory ran its
    code when a bench read the crops. Read as tensors only, whatever the torch."""
    import pickle

    from epmq.benches.vision import _Store

    path, n = tmp_path / "task-val-digest", 4
    store = _Store(n, (3, 4, 4), path)
    store.x[:], store.y[:] = 7, 1
    store.finish()
    (tmp_path / "task-val-digest.labels.pt").write_bytes(pickle.dumps(_Planted()))
    load = torch.load
    # (torch 2.4 and 2.5's default)
    monkeypatch.setattr(torch, "load", lambda *a, weights_only=False, **kw: load(*a, weights_only=weights_only, **kw))
    with pytest.raises(pickle.UnpicklingError):
        _Store(n, (3, 4, 4), path)
    assert _Planted.ran == []


def test_the_disk_cache_reads_images_again_under_other_rules(bench, monkeypatch):
    """The disk cache's crops were keyed by the data and the preparation, not by the code that reads
    the files: crops made before images were turned upright by their EXIF orientation, or before signed
    16-bit TIFFs kept their negatives, were served to the benches after, whose identities named the new
    rules. They are keyed by the evaluation rules too."""
    from epmq.benches import common, vision

    monkeypatch.setattr(bench.config.eval, "cache", "disk")
    task = bench.task_names[0]
    before = bench._store_path(task, "test")
    monkeypatch.setattr(vision, "EVALUATION_RULES", common.EVALUATION_RULES + "; another rule", raising=False)
    assert bench._store_path(task, "test") != before


def test_the_disk_cache_reads_images_that_changed_again(tiny, tmp_path):
    """Same files, new pixels: the crops are decoded again, not served from the old ones."""
    from PIL import Image

    root, config = tiny
    root = shutil.copytree(root, tmp_path / "copy")
    config = dict(config, eval=dict(config["eval"], cache="disk", cache_dir=str(tmp_path / "cache")))
    first = build_bench(config, base_dir=root, progress=False)
    before = torch.cat([x for x, _ in first.image_batches(first.task_names[0], "test")])
    g = torch.Generator().manual_seed(5)
    for path in sorted(Path(root).rglob("test/*/*.png")):
        Image.fromarray(torch.randint(0, 256, (24, 20, 3), generator=g, dtype=torch.uint8).numpy()).save(path)
    again = build_bench(config, base_dir=root, progress=False)
    after = torch.cat([x for x, _ in again.image_batches(again.task_names[0], "test")])
    fresh = build_bench(dict(config, eval=dict(config["eval"], cache="none")), base_dir=root, progress=False)
    assert not torch.equal(after, before)
    assert torch.equal(after, torch.cat([x for x, _ in fresh.image_batches(fresh.task_names[0], "test")]))


def _broken(tiny, tmp_path, edit):
    root, config = tiny
    config = json.loads(json.dumps(config))
    edit(config)
    return lambda: build_bench(config, base_dir=root, progress=False)


def test_build_errors(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    root, config = tiny

    def expert(path, task=0):
        return lambda c: c["tasks"][task].update(expert=path)

    cases = [
        (expert("experts/nowhere/at/all"), "no such file or directory"),
        (expert("no-such-org/no-such-expert"), "could not be fetched from the HF hub"),
        (lambda c: c["model"].update(base="experts/alpha"), "not a CLIPModel"),
        (lambda c: c["tasks"][0].update(data={"splits": {"test": "holdout"}}), "missing data split 'holdout'"),
        (lambda c: c["tasks"][1].update(classnames=["x", "y"]), "2 classnames given, the data has 3"),
        (lambda c: c["data"].update(val_size=18), "nothing left for calibration"),
    ]
    for edit, message in cases:
        if "HF hub" in message:
            edit = (lambda e: (lambda c: (e(c), c["model"].update(offline=True))))(edit)
        with pytest.raises(BenchConfigError, match=message):
            _broken(tiny, tmp_path, edit)()

    # an expert of another architecture: a tensor of the wrong shape, or tensors missing
    state = load_file(root / "experts" / "alpha" / "model.safetensors")
    state["post_layernorm.weight"] = torch.ones(33)
    save_file(state, str(tmp_path / "wrong_shape.safetensors"))
    del state["post_layernorm.weight"], state["post_layernorm.bias"]
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(BenchConfigError, match="'post_layernorm.weight' has shape"):
        _broken(tiny, tmp_path, expert(str(tmp_path / "wrong_shape.safetensors")))()
    with pytest.raises(BenchConfigError, match="lacks 2 of the model's"):
        _broken(tiny, tmp_path, expert(str(tmp_path / "missing.safetensors")))()
    # a shard listed in the index but gone
    shutil.copytree(root / "experts" / "beta", tmp_path / "beta")
    (tmp_path / "beta" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(BenchConfigError, match="shard"):
        _broken(tiny, tmp_path, expert(str(tmp_path / "beta"), task=1))()


def test_pipeline_end_to_end(bench, tmp_path):
    """One merge, RTN + GPTQ + E-PMQ at 8 bits with one anchor, through epmq.pipeline.run."""
    import epmq
    from epmq.pipeline import MergePlan, Plan, run

    assert hasattr(epmq, "quantize_model")
    plan = Plan(merges=[MergePlan("task_arithmetic", scales=[0.2, 0.4])], methods=["rtn", "gptq", "epmq"],
                bits=[8], group_size=16, anchors=[1.0], controls=[])
    results = run(bench, plan, tmp_path / "run", progress=False, log=lambda m: None, identity=bench.identity)
    steps = results["steps"]
    assert {"base", "experts", "merge/TA", "quant/TA/w8/RTN", "quant/TA/w8/GPTQ",
            "quant/TA/w8/E-PMQ/anchor=1.0"} <= set(steps)
    merged = steps["merge/TA"]
    assert merged["scale"] in (0.2, 0.4) and set(merged["val_by_scale"]) == {"0.2", "0.4"}
    for key in ("base", "experts", "merge/TA", "quant/TA/w8/RTN", "quant/TA/w8/GPTQ", "quant/TA/w8/E-PMQ/anchor=1.0"):
        for split in ("val", "test"):
            _in_unit_interval(steps[key][split], TASKS)
    assert steps["quant/TA/w8/GPTQ"]["layers"] == 12  # 2 blocks x (q, k, v, out, fc1, fc2)
    # 8-bit quantization barely moves the predictions of a tiny model
    assert abs(steps["quant/TA/w8/RTN"]["test"]["avg"] - merged["test"]["avg"]) <= 0.2
    assert (tmp_path / "run" / "results.json").is_file()
    # each checkpoint is served as it is: the vision tower and its image preprocessing
    checkpoint = Path(steps["quant/TA/w8/E-PMQ/anchor=1.0"]["checkpoint"])
    assert (checkpoint / "preprocessor_config.json").is_file()
    loaded = epmq.load_quantized(checkpoint)
    assert type(loaded).__name__ == "CLIPVisionModel"


# --------------------------------------------------------------------------- HF datasets (faked)


class _ClassLabel:
    def __init__(self, names):
        self.names = names


class _Dataset:
    """What the bench uses of a ``datasets.Dataset``: len, rows as dicts, column_names, features."""

    def __init__(self, rows, features):
        self.rows, self.features, self.column_names = rows, features, list(rows[0])

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return dict(self.rows[i])


def fake_datasets(monkeypatch, splits, features, calls):
    import sys
    import types

    module = types.ModuleType("datasets")

    def load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split))
        if split not in splits:
            raise ValueError(f'Unknown split "{split}". Should be one of {list(splits)}.')
        return _Dataset(splits[split], features)

    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hf_image_dataset(tiny, monkeypatch):
    from PIL import Image

    root, config = tiny
    gen = torch.Generator().manual_seed(0)

    def rows(n):
        return [{"img": Image.fromarray((torch.rand(20, 20, 3, generator=gen) * 255).to(torch.uint8).numpy()),
                 "label": i % 2} for i in range(n)]

    calls = []
    fake_datasets(monkeypatch, {"train": rows(10), "test": rows(4)},
                  {"img": None, "label": _ClassLabel(["/a/apartment_building/outdoor", "Annual_Crop"])}, calls)
    config = dict(config, tasks=[{"name": "alpha", "expert": "experts/alpha",
                                  "data": {"path": "org/alpha", "name": "cfg", "image_column": "img"}}])
    bench = build_bench(config, base_dir=root, progress=False)
    assert ("org/alpha", "cfg", "train") in calls and ("org/alpha", "cfg", "test") in calls
    assert bench.data["alpha"].classnames == ["apartment building outdoor", "Annual Crop"]
    assert bench.heads["alpha"].shape == (2, 16)
    acc = bench.evaluate(bench.base_state, "test")
    assert 0 <= acc["alpha"] <= 1
    assert bench.calibration["alpha"][0]["pixel_values"].shape == (2, 3, 16, 16)

    cases = [({"splits": {"test": "validation"}}, "has no split 'validation'"),
             ({"image_column": "image"}, "has no column 'image'")]
    for extra, message in cases:
        bad = dict(config, tasks=[dict(config["tasks"][0], data=dict(config["tasks"][0]["data"], **extra))])
        with pytest.raises(BenchConfigError, match=message):
            build_bench(bad, base_dir=root, progress=False)
    fake_datasets(monkeypatch, {"train": rows(10), "test": rows(4)}, {"img": None, "label": None}, calls)
    with pytest.raises(BenchConfigError, match="list them in the task's classnames"):
        build_bench(config, base_dir=root, progress=False)
    named = dict(config, tasks=[dict(config["tasks"][0], classnames=["zero", "one"])])
    assert build_bench(named, base_dir=root, progress=False).data["alpha"].classnames == ["zero", "one"]


@pytest.mark.parametrize("test_labels, shown", [([-1, -1], "-1"), ([0, 2], "2")])
def test_a_label_with_no_class_name_is_refused_not_scored_wrong(tiny, monkeypatch, test_labels, shown):
    """A test split hiding its labels as -1, or labels beyond the class names: no head row is
    theirs, so every such image counted as a miss (0% accuracy, no word of why)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)

    def rows(labels):
        return [{"img": Image.fromarray((torch.rand(20, 20, 3, generator=gen) * 255).to(torch.uint8).numpy()),
                 "label": y} for y in labels]

    assert_test_split_refused(tiny, monkeypatch, rows([0, 1] * 5), rows(test_labels),
                              rf"task 'alpha': the test split has label {shown}, expected a label in 0\.\.1")


def assert_test_split_refused(tiny, monkeypatch, train: list, test: list, match: str) -> None:
    """A one-task bench of an HF image dataset of ``train`` and ``test`` rows ({"img", "label"},
    classes cat and dog): evaluating its test split is refused, saying ``match``."""
    root, config = tiny
    fake_datasets(monkeypatch, {"train": train, "test": test}, {"img": None, "label": _ClassLabel(["cat", "dog"])},
                  [])
    config = dict(config, tasks=[{"name": "alpha", "expert": "experts/alpha",
                                  "data": {"path": "org/alpha", "image_column": "img"}}])
    bench = build_bench(config, base_dir=root, progress=False)
    with pytest.raises(BenchConfigError, match=match):
        bench.evaluate(bench.base_state, "test")


@pytest.mark.parametrize("label", ["dog", 1.5])
def test_a_label_column_of_no_class_indices_is_refused_by_name(tiny, monkeypatch, label):
    """A column of class names ended the run in int()'s bare ValueError; 1.5 was read as class 1."""
    from PIL import Image

    image = Image.fromarray(torch.zeros(20, 20, 3, dtype=torch.uint8).numpy())
    assert_test_split_refused(tiny, monkeypatch, [{"img": image, "label": i % 2} for i in range(10)],
                              [{"img": image, "label": 0}, {"img": image, "label": label}],
                              rf"task 'alpha': the label column 'label' holds {label!r}, not a class index")


def test_identity_follows_the_base_checkpoint_files(bench):
    """New base weights (or tokenizer, preprocessor) at the same path are another bench: its
    stored results were reused before."""
    import os

    before = bench.identity
    base = Path(before["model"]["base"])
    assert base.is_dir() and before["model"]["base_files"]
    f = next(p for p in sorted(base.rglob("*")) if p.is_file())
    stat = f.stat()
    try:
        os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        assert bench.identity["model"]["base_files"] != before["model"]["base_files"]
    finally:
        os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert bench.identity == before


def test_evaluation_shows_progress_task_by_task(bench, capsys):
    """(A paper bench's test sets take minutes each: the steps printed nothing until done.)"""
    bench.progress = True
    try:
        bench.evaluate(bench.base_state, "val")
        bench.expert_accuracies("val")
    finally:
        bench.progress = False
    err = capsys.readouterr().err
    assert "evaluate on val" in err and "experts on val" in err and TASKS[-1] in err
    with pytest.raises(ValueError, match="split must be one of"):
        bench.expert_accuracies("train")


class _ScaleBench:
    """A bench of the shared protocol (``common.BenchBase``) over a one-weight model whose
    "accuracy" on a task and split is a known function of that weight, so that what
    ``evaluate`` and ``expert_accuracies`` report can be checked number by number."""

    OFFSET = {"val": 0.0, "test": 0.5}

    @classmethod
    def make(cls, weights):
        from torch import nn

        from epmq.benches.common import BenchBase

        class Bench(BenchBase):
            def _evaluate_task(self, model, task, split):
                return float(model.weight) / 10 + cls.OFFSET[split] + self.task_names.index(task) / 100

        bench = Bench.__new__(Bench)
        bench.progress, bench.device = False, torch.device("cpu")
        bench.task_names = list(weights)
        bench.data = {t: None for t in weights}
        bench._template = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            bench._template.weight.zero_()
        bench.base_state = {"weight": torch.zeros(1, 1)}
        bench.experts = {t: {"weight": torch.full((1, 1), float(w))} for t, w in weights.items()}
        return bench


def test_expert_accuracies_are_each_expert_on_its_own_task_and_split(gen):
    weights = {t: float(w) for t, w in zip("abc", torch.randperm(9, generator=gen)[:3] + 1)}
    bench = _ScaleBench.make(weights)
    for split, offset in _ScaleBench.OFFSET.items():
        got = bench.expert_accuracies(split)
        want = {t: w / 10 + offset + i / 100 for i, (t, w) in enumerate(weights.items())}
        assert list(got) == [*weights, "avg"]
        assert all(got[t] == pytest.approx(v) for t, v in want.items())
        assert got["avg"] == pytest.approx(sum(want.values()) / 3)


def test_evaluate_reports_the_asked_tasks_on_the_asked_split_and_their_mean(gen):
    weights = {"a": 1.0, "b": 2.0, "c": 3.0}
    bench = _ScaleBench.make(weights)
    w = float(torch.randint(1, 9, (1,), generator=gen))
    state = {"weight": torch.full((1, 1), w)}
    for split, offset in _ScaleBench.OFFSET.items():
        every = bench.evaluate(state, split)
        want = {t: w / 10 + offset + i / 100 for i, t in enumerate(weights)}
        assert list(every) == ["a", "b", "c", "avg"]
        assert all(every[t] == pytest.approx(v) for t, v in want.items())
        assert every["avg"] == pytest.approx(sum(want.values()) / 3)
        some = bench.evaluate(state, split, tasks=["c", "a"])
        assert list(some) == ["c", "a", "avg"]
        assert some["avg"] == pytest.approx((want["c"] + want["a"]) / 2)
    # the base state is the template's; a module keeps its own training mode
    assert bench.evaluate(bench.base_state, "val")["a"] == pytest.approx(0.0)
    for mode in (True, False):
        model = bench.model(state).train(mode)
        assert bench.evaluate(model, "test", tasks=["b"])["b"] == pytest.approx(w / 10 + 0.51)
        assert model.training is mode


def test_loading_a_state_needs_every_tensor_of_the_model():
    from torch import nn

    from epmq.benches.checkpoints import load_into

    model = nn.Linear(3, 2)
    full = {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}
    assert torch.equal(load_into(model, full).weight, full["weight"])
    with pytest.raises(ValueError, match="missing"):
        load_into(nn.Linear(3, 2), {"weight": torch.ones(2, 3)})
    with pytest.raises(ValueError, match="unexpected"):
        load_into(nn.Linear(3, 2), {**full, "extra": torch.ones(1)})
    with pytest.raises(ValueError, match="shape"):
        load_into(nn.Linear(3, 2), {"weight": torch.ones(3, 2), "bias": torch.zeros(2)})
    # a bitsandbytes int8 weight (its SCB scales bound elsewhere or dropped) is not cast into weights
    with pytest.raises(ValueError, match=r"'weight' is stored as torch.int8.*quantized checkpoint"):
        load_into(nn.Linear(3, 2), {"weight": torch.ones(2, 3, dtype=torch.int8), "bias": torch.zeros(2)})
    ids = nn.Module()  # (an integer buffer, position ids, is copied as it is)
    ids.register_buffer("position_ids", torch.zeros(4, dtype=torch.long))
    assert torch.equal(load_into(ids, {"position_ids": torch.arange(4)}).position_ids, torch.arange(4))


def test_accuracy_is_the_share_of_images_whose_best_class_is_their_label(bench):
    """Counted by hand over every image of the split, the last short batch included."""
    model = bench.model(bench.experts["beta"])
    for split in ("val", "test"):
        got = bench.evaluate(model, split)
        for t in TASKS:
            right = total = 0
            for x, y in bench.image_batches(t, split):
                with torch.no_grad():
                    logits = bench.logits(model, t, bench.prep.normalize(x))
                right += int((logits.argmax(-1) == y).sum())
                total += len(y)
            assert total == len(bench.data[t].splits[split])
            assert got[t] == right / total, (split, t)


def test_pixels_are_scaled_to_the_unit_range_then_standardized():
    from epmq.benches.vision import ImagePrep

    prep = ImagePrep(resize=2, crop=(2, 2), mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 2, 2)
    got = prep.normalize(x)
    assert torch.allclose(got[0, :, 0, 0], torch.tensor([-1.0, -1.0, 0.0]))
    assert torch.allclose(got[0, :, 0, 1], torch.tensor([1.0, 3.0, 0.5]))


def test_a_16_bit_image_gets_the_pixels_epmq_quantize_calibrates_on():
    """(The bench clipped it to near-white where calibration scaled it to 8 bits.)"""
    import numpy as np
    from PIL import Image

    from epmq.benches.vision import ImagePrep
    from epmq.calibration import rgb_image

    image = Image.fromarray(np.array([[0, 16384], [32768, 65535]], dtype=np.uint16))
    got = ImagePrep(resize=2, crop=(2, 2)).uint8(image)
    want = torch.from_numpy(np.asarray(rgb_image(image))).permute(2, 0, 1)
    assert torch.equal(got.reshape(want.shape), want) and want[0, 0, 1] == 64


def test_a_float_image_off_its_scale_is_refused_naming_its_file(tmp_path):
    """A float ('F') image is read on [0, 1], as calibration reads it; one off it is refused, the bench's error
    naming its file among the split's thousands (rgb_image's alone named none)."""
    import numpy as np
    from PIL import Image

    from epmq.benches.data import FolderImages, Split
    from epmq.benches.vision import ImagePrep, _Images

    (tmp_path / "cat").mkdir()
    Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)).save(tmp_path / "cat" / "a.tiff")
    Image.fromarray(np.array([[0.0, 50.0], [100.0, 200.0]], dtype=np.float32)).save(tmp_path / "cat" / "b.tiff")
    images = _Images(Split(FolderImages(tmp_path, ["cat"], "test"), [0, 1], "test"), ImagePrep(resize=2, crop=(2, 2)))
    pixels, label = images[0]
    assert pixels.reshape(3, 2, 2)[0].tolist() == [[0, 128], [255, 64]] and label == 0
    with pytest.raises(ValueError, match=r"test split: .*cat/b\.tiff: a float \(F\) image holds values in \[0, 200\]"):
        images[1]


def test_calibration_eval_caps_and_templates_come_from_the_config(tiny):
    root, config = tiny
    config = dict(config, eval=dict(config["eval"], max_samples={"val": 1, "test": 2}),
                  tasks=[dict(config["tasks"][0], templates=["a drawing of {}."]), config["tasks"][1]])
    bench = build_bench(config, base_dir=root, progress=False)
    assert bench.templates("alpha") == ["a drawing of {}."] and bench.templates("beta") != ["a drawing of {}."]
    for t in TASKS:
        assert len(bench.data[t].splits["val"]) == 1 and len(bench.data[t].splits["test"]) == 2
        calib = bench.data[t].calibration
        want = torch.stack([bench.prep.normalize(bench.prep.uint8(calib[k][0])[None])[0] for k in range(len(calib))])
        got = torch.cat([item["pixel_values"] for item in bench.calibration[t]])
        assert torch.equal(got, want)


def test_images_are_prepared_as_the_checkpoints_own_image_processor_says(tiny, tmp_path):
    """A checkpoint whose processor resizes past the crop and normalizes with its own mean and
    std (not CLIP's): the pixels the bench evaluates and calibrates on are the processor's."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    root, config = tiny
    root = shutil.copytree(root, tmp_path / "copy")
    mean, std = [0.3, 0.5, 0.7], [0.5, 0.4, 0.3]
    CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 16, "width": 16}, image_mean=mean,
                       image_std=std).save_pretrained(root / "base")
    bench = build_bench(config, base_dir=root, progress=False)
    assert (bench.prep.resize, bench.prep.crop, bench.prep.mean, bench.prep.std) == (20, (16, 16), tuple(mean), tuple(std))
    processor = CLIPImageProcessor.from_pretrained(root / "base")
    for path in sorted((root / "data" / "alpha" / "test").glob("*/*.png"))[:3]:
        img = Image.open(path)
        want = processor(images=img, return_tensors="pt")["pixel_values"]
        got = bench.prep.normalize(bench.prep.uint8(img)[None])
        assert got.shape == want.shape == (1, 3, 16, 16)
        assert (got - want).abs().max() < 0.05  # resampling implementations differ by a grey level or so


def test_a_progress_callable_gets_the_lines_and_no_bars_are_drawn(tiny, capsys):
    """``progress=callable``: what is loaded goes to the callable, nothing to stderr (no
    evaluation bars either: a caller collecting the lines has no terminal to draw them on)."""
    root, config = tiny
    lines = []
    bench = build_bench(config, base_dir=root, progress=lines.append)
    bench.heads  # (loading the text tower: transformers' own bar is silenced too)
    bench.evaluate(bench.base_state, "val")
    bench.expert_accuracies("val")
    assert any("task alpha" in line for line in lines)
    assert capsys.readouterr().err == ""


def _odd_images():
    """Landscape, portrait, smaller than the crop, greyscale, RGBA with transparent pixels and a
    palette image with a transparent index: what image folders hold."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)

    def smooth(h, w, c=3):  # (noise would measure resampling implementations, not preprocessing)
        small = rng.integers(0, 256, (4, 5, c), dtype=np.uint8)
        return Image.fromarray(small.squeeze()).resize((w, h), Image.BILINEAR)

    rgba = np.array(smooth(25, 29, 4))
    rgba[..., 3] = 255
    rgba[:, :10, 3], rgba[:, 10:18, 3] = 0, 128  # a transparent and a half-transparent band
    palette = smooth(26, 33).quantize(16)
    palette.info["transparency"] = 3
    return {"landscape": smooth(23, 37), "portrait": smooth(31, 21), "small": smooth(9, 13),
            "grey": smooth(27, 31, 1), "rgba": Image.fromarray(rgba), "palette": palette}


def test_a_transparent_colour_key_is_composited_onto_white():
    """A greyscale or RGB PNG whose transparency is one colour (a tRNS chunk, no alpha band):
    the image processor makes those pixels white, and so must the bench's preparation (it kept
    them black once it took calibration's conversion)."""
    import io

    import numpy as np
    from PIL import Image
    from transformers import CLIPImageProcessor

    from epmq.benches.vision import ImagePrep

    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    prep = ImagePrep(resize=16, crop=(16, 16))
    grey = np.zeros((20, 20), dtype=np.uint8)
    grey[5:15, 5:15] = 200
    for pixels, key in ((grey, 0), (np.stack([grey] * 3, axis=-1), (0, 0, 0))):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="png", transparency=key)
        image = Image.open(buffer)
        want = processor(images=image, return_tensors="pt")["pixel_values"]
        got = prep.normalize(prep.uint8(image)[None])
        assert (got - want).abs().max() < 0.05, image.mode


def _bench_with_processor(tiny, tmp_path, processor):
    root, config = tiny
    root = shutil.copytree(root, tmp_path / "copy")
    processor.save_pretrained(root / "base")
    return build_bench(config, base_dir=root, progress=False), root


@pytest.mark.parametrize("settings", [
    {"size": {"height": 20, "width": 24}, "crop_size": {"height": 16, "width": 16}},  # resized to 20 x 24, then cropped
    {"size": {"shortest_edge": 20}, "crop_size": 16, "resample": 2},
    {"size": {"shortest_edge": 18}, "crop_size": {"height": 16, "width": 12}, "do_normalize": False},
    {"size": {"shortest_edge": 18}, "crop_size": 16, "rescale_factor": 1 / 127.5},
    {"size": {"height": 16, "width": 20}, "do_center_crop": False},
    "siglip",  # SigLIP's processor: squashed to its size, mean and std 0.5, never cropped
])
def test_images_are_prepared_as_every_setting_of_the_image_processor_says(tiny, tmp_path, settings):
    """Sizes as height and width (squashed, not shortest edge), no normalization, another
    rescale factor, transparency composited onto white: the processor's pixels, each image kind."""
    from transformers import AutoImageProcessor, CLIPImageProcessor, SiglipImageProcessor

    processor = SiglipImageProcessor(size={"height": 16, "width": 20}) if settings == "siglip" \
        else CLIPImageProcessor(**settings)
    bench, root = _bench_with_processor(tiny, tmp_path, processor)
    processor = AutoImageProcessor.from_pretrained(root / "base")  # (what the checkpoint's users get)
    for kind, img in _odd_images().items():
        want = processor(images=img, return_tensors="pt")["pixel_values"]
        got = bench.prep.normalize(bench.prep.uint8(img)[None])
        assert got.shape == want.shape, kind
        scale = 255 * getattr(processor, "rescale_factor", 1 / 255)
        assert (got - want).abs().max() < 0.05 * scale, kind  # (resampling implementations: a grey level or so)


@pytest.mark.parametrize("settings, name", [
    ({"do_resize": False}, "do_resize"),
    ({"do_center_crop": False}, "do_center_crop"),
    ({"resample": 1}, "resample 1"),
    ({"size": {"shortest_edge": 20, "longest_edge": 40}}, "size"),
])
def test_a_processor_setting_the_bench_cannot_reproduce_is_refused_by_name(tiny, tmp_path, settings, name):
    from transformers import CLIPImageProcessor

    with pytest.raises(BenchConfigError, match=name):
        _bench_with_processor(tiny, tmp_path, CLIPImageProcessor(**settings))


def test_another_kind_of_image_processor_is_refused_by_name(tiny, tmp_path):
    """(a ConvNeXT processor crops by crop_pct: read as a CLIP one, it would be silently wrong)"""
    from transformers import ConvNextImageProcessor

    with pytest.raises(BenchConfigError, match="ConvNextImageProcessor"):
        _bench_with_processor(tiny, tmp_path, ConvNextImageProcessor(size={"shortest_edge": 16}))


def test_openais_own_preprocessor_config_is_read():
    """openai/clip-vit-base-patch32's file, as published: a feature extractor, sizes as ints."""
    from epmq.benches.vision import prep_from_processor_config

    cfg = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
           "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
           "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}
    prep = prep_from_processor_config(cfg, 224)
    assert (prep.resize, prep.crop, prep.interpolation, prep.resize_mode) == (224, (224, 224), "bicubic", "shortest")
    assert prep.mean == tuple(cfg["image_mean"]) and prep.std == tuple(cfg["image_std"])


def test_a_processor_saved_whole_by_transformers_5_is_read_and_served(tiny, tmp_path):
    """transformers 5 saves a ``CLIPProcessor`` as one ``processor_config.json`` (the image
    processor nested in it) and no ``preprocessor_config.json``: the bench prepares images as it
    says (not with CLIP's defaults) and the quantized checkpoint is served with it."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, CLIPImageProcessor, CLIPProcessor

    root, config = tiny
    root = shutil.copytree(root, tmp_path / "copy")
    (root / "base" / "preprocessor_config.json").unlink()
    mean, std = [0.3, 0.5, 0.7], [0.5, 0.4, 0.3]
    image_processor = CLIPImageProcessor(size={"shortest_edge": 20}, crop_size={"height": 16, "width": 16},
                                         image_mean=mean, image_std=std)
    CLIPProcessor(image_processor=image_processor,
                  tokenizer=AutoTokenizer.from_pretrained(root / "base")).save_pretrained(root / "base")
    assert not (root / "base" / "preprocessor_config.json").exists()
    assert AutoImageProcessor.from_pretrained(root / "base").image_mean == tuple(mean)
    bench = build_bench(config, base_dir=root, progress=False)
    assert (bench.prep.resize, bench.prep.crop, bench.prep.mean, bench.prep.std) == (20, (16, 16), tuple(mean), tuple(std))
    served = tmp_path / "served"
    served.mkdir()
    bench.save_extras(served)
    assert AutoImageProcessor.from_pretrained(served).image_mean == tuple(mean)
    # (the image processor alone: the vision tower's checkpoint has no tokenizer for a whole
    # CLIPProcessor, on which AutoProcessor failed)
    assert isinstance(AutoProcessor.from_pretrained(served), CLIPImageProcessor)


@pytest.mark.parametrize("layout", ["transformers 5", "transformers 4"])
def test_an_expert_of_more_blocks_than_the_base_is_refused(tiny, tmp_path, layout):
    """An expert of another depth holds every tensor of the base's blocks and more: it is
    another configuration, not a fine-tune of the base (merged and used as E-PMQ's targets, its
    blocks past the base's would be dropped without a word)."""
    from safetensors.torch import load_file, save_file

    root, config = tiny
    state = load_file(root / "experts" / "alpha" / "model.safetensors")
    blocks = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    state.update({k.replace("encoder.layers.0.", f"encoder.layers.{blocks}."): v.clone()
                  for k, v in state.items() if k.startswith("encoder.layers.0.")})
    if layout == "transformers 4":
        state = {f"vision_model.{k}": v for k, v in state.items()}
    save_file(state, str(tmp_path / "deeper.safetensors"))
    with pytest.raises(BenchConfigError, match=f"more blocks at 'encoder.layers' than the model's {blocks}"):
        _broken(tiny, tmp_path, lambda c: c["tasks"][0].update(expert=str(tmp_path / "deeper.safetensors")))()


def test_a_layer_the_models_own_loading_ignores_is_no_extra_block(tmp_path):
    """DeepSeek-V3 saves its multi-token prediction layer as the layer after the last, which
    transformers ignores on load (``_keys_to_ignore_on_load_unexpected``): not another depth."""
    from safetensors.torch import save_file

    from epmq.checkpoint_io import CheckpointError, open_state

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

    model = Stack()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.update({k.replace("layers.0.", "layers.2."): v.clone() for k, v in state.items() if k.startswith("layers.0.")})
    save_file(state, str(tmp_path / "deeper.safetensors"))
    with pytest.raises(CheckpointError, match="more blocks at 'layers' than the model's 2"):
        open_state(tmp_path / "deeper.safetensors", model, what="expert")
    model._keys_to_ignore_on_load_unexpected = [r"layers\.2\..*"]
    assert set(open_state(tmp_path / "deeper.safetensors", model, what="expert")) == set(model.state_dict())


def test_bench_images_are_turned_upright_as_calibrations_are(tmp_path):
    """A sideways-stored photo (EXIF orientation) was calibrated upright by epmq quantize but
    evaluated and calibrated as stored by the benches: one reading of a file for both."""
    import io

    import numpy as np
    from PIL import Image

    from epmq.benches.data import FolderImages, _to_image
    from epmq.calibration import upright

    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, :16] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation: rotated 90 degrees
    (tmp_path / "a").mkdir()
    image.save(tmp_path / "a" / "photo.jpg", exif=exif, quality=100)
    with Image.open(tmp_path / "a" / "photo.jpg") as f:
        want = np.asarray(upright(f))
    assert want.shape[:2] == (32, 16)
    got, label = FolderImages(tmp_path, ["a"], "test")[0]
    assert label == 0 and np.array_equal(np.asarray(got), want)
    data = (tmp_path / "a" / "photo.jpg").read_bytes()
    for value in ({"bytes": data}, {"path": str(tmp_path / "a" / "photo.jpg")}):
        assert np.array_equal(np.asarray(_to_image(value)), want)
    assert np.array_equal(np.asarray(_to_image(Image.open(io.BytesIO(data)))).shape, (16, 32, 3))


def test_an_image_of_unreadable_exif_is_read_as_stored(tmp_path):
    """A PNG whose eXIf chunk is damaged: Pillow's EXIF reading raises SyntaxError ('not a TIFF
    file'), which stopped the bench at that image once upright() read every image's EXIF (the
    pixels were read before); it is taken as stored, with a warning naming its file (it named none)."""
    import io
    import struct
    import zlib

    import numpy as np
    from PIL import Image

    from epmq.benches.data import FolderImages
    from epmq.calibration import image_batches, upright

    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, :16] = 255
    (tmp_path / "a").mkdir()
    Image.fromarray(pixels).save(tmp_path / "a" / "photo.png")
    data = (tmp_path / "a" / "photo.png").read_bytes()
    payload = b"garbage, not a TIFF header"
    chunk = (struct.pack(">I", len(payload)) + b"eXIf" + payload
             + struct.pack(">I", zlib.crc32(b"eXIf" + payload) & 0xFFFFFFFF))
    at = data.index(b"IDAT") - 4
    (tmp_path / "a" / "photo.png").write_bytes(data[:at] + chunk + data[at:])
    with pytest.warns(UserWarning, match=r"a[/\\]photo\.png's EXIF cannot be read"):  # (its file named: of thousands)
        got, label = FolderImages(tmp_path, ["a"], "test")[0]
    assert label == 0 and np.array_equal(np.asarray(got), pixels)
    with pytest.warns(UserWarning, match=r"a[/\\]photo\.png's EXIF cannot be read"):  # (as calibration reads it)
        image_batches([tmp_path / "a" / "photo.png"], lambda images, return_tensors: {"pixel_values": torch.zeros(1)},
                      samples=1)
    with pytest.warns(UserWarning, match=r"an image's EXIF cannot be read"):  # (no file: bytes of a dataset's row)
        with Image.open(io.BytesIO((tmp_path / "a" / "photo.png").read_bytes())) as image:
            upright(image)


def test_hidden_folders_are_no_classes(tmp_path):
    """``train/.ipynb_checkpoints`` (Jupyter's, beside the class folders) became a class of the
    zero-shot head, moving every accuracy, and a test split holding one was refused."""
    import numpy as np
    from PIL import Image

    from epmq.benches.data import FolderImages, class_folders

    for name in ("b", "a", ".ipynb_checkpoints"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / name / "x.png")
    assert [p.name for p in class_folders(tmp_path)] == ["a", "b"]
    assert [label for _, label in FolderImages(tmp_path, ["a", "b"], "test").items] == [0, 1]


def test_images_beside_the_class_folders_are_refused(tmp_path):
    """``train/stray.jpg`` next to ``train/cat/x.jpg`` has no class: it was left out of the split in
    silence. Refused, naming how many and one; hidden files and files not images stay ignored."""
    import numpy as np
    from PIL import Image

    from epmq.benches.data import FolderImages

    (tmp_path / "a").mkdir()
    for name in ("a/x.png", ".thumb.png"):
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("labels by folder")
    assert len(FolderImages(tmp_path, ["a"], "test")) == 1
    for name in ("stray.JPG", "later.png"):
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / name, format="PNG")
    with pytest.raises(BenchConfigError, match=r"test: 2 image file\(s\) directly in .* \(later\.png, \.\.\.\) are in "
                                               r"no class folder"):
        FolderImages(tmp_path, ["a"], "test")


def test_a_class_s_images_in_nested_folders_are_read(tmp_path):
    """A class's images kept in folders of their own (``train/cat/2019/x.jpg``, a photo library's export)
    were left out in silence: only the files directly in the class folder were read (a class of nested
    ones alone had no examples). They are read at any depth, in the order of their paths."""
    import numpy as np
    from PIL import Image

    from epmq.benches.data import FolderImages

    for name in ("a/x.png", "a/2019/y.png", "a/2019/deep/z.png", "b/2020/w.png", "b/.hidden/v.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / name)
    items = FolderImages(tmp_path, ["a", "b"], "test").items
    assert [(str(f.relative_to(tmp_path)), label) for f, label in items] == [
        ("a/2019/deep/z.png", 0), ("a/2019/y.png", 0), ("a/x.png", 0), ("b/2020/w.png", 1)]


def test_a_class_s_images_of_a_format_not_read_are_named(tmp_path):
    """A phone's .heic photos in a class folder beside its .jpg ones were left out of the split in silence
    (and not read where pillow-heif is, as calibration reads them; .avif ones not where Pillow reads them);
    named, as calibration names them."""
    import numpy as np
    from PIL import Image, features

    from epmq.benches.data import FolderImages

    if Image.registered_extensions().get(".heic"):
        pytest.skip("pillow-heif reads .heic here")
    (tmp_path / "a" / "trip").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "a" / "x.png")
    (tmp_path / "a" / "trip" / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    with pytest.raises(BenchConfigError, match=r"test: .*/a: 1 image file\(s\) under the directory \(.*trip/"
                                               r"IMG_0001\.HEIC, \.\.\.\) are of a format epmq does not read"):
        FolderImages(tmp_path, ["a"], "test")
    (tmp_path / "a" / "trip" / "IMG_0001.HEIC").unlink()
    if features.check("avif"):
        Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "a" / "trip" / "y.avif")
        assert [f.name for f, _ in FolderImages(tmp_path, ["a"], "test").items] == ["y.avif", "x.png"]


def test_a_folder_image_is_copied_once(tmp_path, monkeypatch):
    """upright() returns a new image (turned, or a copy): FolderImages copied it once more, an
    extra full-size copy per image read (a fifth more time on large photos)."""
    import numpy as np
    from PIL import Image

    from epmq.benches.data import FolderImages

    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "a" / "x.png")
    copies = []
    copy = Image.Image.copy
    monkeypatch.setattr(Image.Image, "copy", lambda self: copies.append(1) or copy(self))
    image, _ = FolderImages(tmp_path, ["a"], "test")[0]
    assert len(copies) == 1 and image.size == (8, 8)
    image.load()  # (read in full: the file is closed)


@pytest.mark.parametrize("own", ["projection", "classifier", "neither", "neither, in float16"])
def test_an_expert_with_a_head_of_its_own_is_said_to_be_scored_without_it(tiny, tmp_path, own):
    """Every model is scored through the base's projection and zero-shot text heads (FusionBench's
    protocol): an expert saved whole with a projection trained apart, or with a classifier of its
    own (CLIPForImageClassification), was scored without them, and nothing said so. An expert
    saved whole in float16 holds the base's projections as they are in float16: not its own."""
    import warnings

    from safetensors.torch import load_file, save_file

    root, config = tiny
    state = load_file(root / "experts" / "alpha" / "model.safetensors")
    base = load_file(root / "base" / "model.safetensors")
    if own == "projection":  # (a whole CLIPModel: its text tower as the base's, its projection not)
        state = {**{k: v for k, v in base.items() if not k.startswith("vision_model.")},
                 **{f"vision_model.{k}": v for k, v in state.items()}}
        state["visual_projection.weight"] = state["visual_projection.weight"] + 0.1
    elif own == "neither, in float16":  # (a whole CLIPModel saved in half precision, heads untrained)
        state = {**{k: v for k, v in base.items() if not k.startswith("vision_model.")},
                 **{f"vision_model.{k}": v for k, v in state.items()}}
        state = {k: v.half() for k, v in state.items()}
    elif own == "classifier":
        state["classifier.weight"] = torch.randn(3, state["post_layernorm.weight"].shape[0])
    save_file(state, str(tmp_path / "expert.safetensors"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _broken(tiny, tmp_path, lambda c: c["tasks"][0].update(expert=str(tmp_path / "expert.safetensors")))()
    said = [str(w.message) for w in caught if "scored through the base's" in str(w.message)]
    if own.startswith("neither"):
        assert not said, said
    else:
        assert len(said) == 1 and "'alpha'" in said[0]
        assert ("visual_projection.weight" if own == "projection" else "classifier") in said[0]


def save_cased_letters_tokenizer(directory):
    """A tokenizer that keeps case (one token a letter, fewer than the tiny text towers' vocab),
    saved to ``directory``: the benches' class names "Cat" and "cat" are two names to it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    letters = "<pad> <s> </s> <unk>".split() + list("CATcatdogs{} .")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(letters)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(directory)


def test_class_names_are_read_as_the_models_tokenizer_reads_them(tiny, tmp_path):
    """A tokenizer that keeps case (model.tokenizer: XLM-R's, RoBERTa's) reads "Cat" and "cat" as two
    prompts: the task's classnames were refused as repeats by CLIP's rule (lowercased) whatever the
    tokenizer. Names the model's tokenizer reads alike (CLIP's, which lowercases) are refused when
    the bench is built, naming them."""
    root, config = tiny
    named = json.loads(json.dumps(config))
    named["tasks"][0]["classnames"] = ["Cat", "cat", "dog"]
    with pytest.raises(BenchConfigError, match=r"task 'alpha'.*read alike.*\['Cat', 'cat'\]"):
        build_bench(named, base_dir=root, progress=False)  # (the tiny base's CLIP tokenizer lowercases)
    save_cased_letters_tokenizer(tmp_path / "cased")
    named["model"]["tokenizer"] = str(tmp_path / "cased")
    # (the name first: this tokenizer adds no end token, so the text tower pools the first position)
    named["tasks"][0]["templates"] = ["{} ."]
    bench = build_bench(named, base_dir=root, progress=False)
    assert bench.data["alpha"].classnames == ["Cat", "cat", "dog"]
    heads = bench.heads["alpha"]
    assert not torch.allclose(heads[0], heads[1])


def test_a_tokenizer_saved_from_its_file_is_read_as_saved(tiny, tmp_path):
    """model.tokenizer saved as TokenizersBackend beside a Qwen2 config: transformers 5's AutoTokenizer
    loads it as Qwen2Tokenizer, which reads the word-level tokenizer.json as byte-level BPE and drops
    the space of "Cat ."; the class names' prompts were read so (the text bench reads it as saved)."""
    import warnings

    import transformers

    root, config = tiny
    named = json.loads(json.dumps(config))
    save_cased_letters_tokenizer(tmp_path / "cased")
    transformers.Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1).save_pretrained(tmp_path / "cased")
    named["model"]["tokenizer"] = str(tmp_path / "cased")
    named["tasks"][0]["templates"] = ["{} ."]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        bench = build_bench(named, base_dir=root, progress=False)
        read = bench.read_class_names(["Cat ."])
    saved = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "cased")
    assert read == [tuple(saved("Cat .")["input_ids"])]
    assert any("as Qwen2Tokenizer: a BPE model for its WordLevel; it is read as saved" in str(w.message) for w in said)
