"""The bench config schema: defaults, per-task overrides, and a clear error for every bad config."""

import copy
import json
import zlib
import importlib.util

import pytest
import torch

from epmq.benches import BenchConfigError, build_bench, load_config, parse_config
from epmq.benches.data import readable
from epmq.benches.prompts import image_templates

CLIP = {
    "model": {"family": "hf_clip", "base": "base"},
    "tasks": [{"name": "a", "expert": "experts/a", "data": {"root": "data/a"}}],
}


def with_(config, path, value):
    """A copy of ``config`` with the dotted ``path`` set to ``value`` (None deletes it)."""
    config = copy.deepcopy(config)
    *parents, last = path.split(".")
    node = config
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
    if value is None:
        node.pop(last, None)
    else:
        node[last] = value
    return config


def test_defaults_and_paths(tmp_path):
    cfg = parse_config(CLIP, base_dir=tmp_path)
    (task,) = cfg.tasks
    assert cfg.model.family == "hf_clip" and cfg.model.device == "auto" and cfg.seed == 0
    assert task.data.source == "folder" and task.data.root == tmp_path / "data/a"
    assert task.data.splits == {"train": "train", "val": None, "test": "test"}
    assert cfg.calibration.samples == 128 and cfg.eval.max_samples == {"val": None, "test": None}


def test_shared_data_section_and_task_overrides(tmp_path):
    raw = {
        "model": {"family": "hf_clip", "base": "b"},
        "tasks": {"x": {"expert": "e/x"},
                  "y": {"expert": "e/y", "data": {"path": "org/y", "splits": {"test": "valid"}}}},
        "data": {"root": "shared", "splits": {"val": "validation"}, "val_size": 50,
                 "calibration": {"samples": 7, "batch_size": 3}},
        "eval": {"max_samples": 100},
    }
    cfg = parse_config(raw, base_dir=tmp_path)
    x, y = cfg.tasks
    assert (x.name, x.data.source, x.data.root) == ("x", "folder", tmp_path / "shared" / "x")
    assert (y.data.source, y.data.path) == ("hf", "org/y")
    assert y.data.splits == {"train": "train", "val": "validation", "test": "valid"}
    assert (cfg.calibration.samples, cfg.calibration.batch_size) == (7, 3)
    assert cfg.eval.max_samples == {"val": 100, "test": 100}


def test_a_sweeps_numpy_values_are_taken_as_the_python_ones(tmp_path):
    """A sweep's config built from numpy arrays (seeds from np.arange, sizes from a grid) was
    refused as 'seed must be an integer, got np.int64(1)' ('eval.max_samples must be a mapping'
    for one cap, 'val_size must be a fraction' for a count, 'model.offline must be true or false'
    for np.False_), where quantize_model and the calibration draws take numpy's numbers; they
    are the config the Python numbers make, held as Python's (the bench's identity is JSON)."""
    import numpy as np

    def raw(n, flag):
        return {"model": {"family": "hf_clip", "base": "b", "offline": flag(False)},
                "tasks": {"x": {"expert": "e/x"}},
                "data": {"root": "shared", "val_size": n(50), "max_input_tokens": n(64),
                         "calibration": {"samples": n(7), "batch_size": n(3)}},
                "eval": {"max_samples": n(100), "batch_size": n(16), "num_workers": n(0), "max_new_tokens": n(4)},
                "seed": n(1)}

    want = parse_config(raw(int, bool), base_dir=tmp_path)
    for n in (np.int64, np.int32, np.uint16):
        got = parse_config(raw(n, np.bool_), base_dir=tmp_path)
        assert got == want
        for value in (got.seed, got.calibration.samples, got.calibration.batch_size, got.max_input_tokens,
                      got.eval.batch_size, got.eval.num_workers, got.eval.max_new_tokens,
                      *got.eval.max_samples.values(), got.tasks[0].data.val_size):
            assert type(value) is int
        assert type(got.model.offline) is bool
    fraction = parse_config(with_(CLIP, "tasks.0.data.val_size", np.float32(0.25))).tasks[0].data.val_size
    assert type(fraction) is float and fraction == 0.25
    # (a float where a count goes, and a bool where a number goes, still refused)
    with pytest.raises(BenchConfigError, match="seed must be an integer"):
        parse_config(with_(CLIP, "seed", np.float64(1.0)))
    with pytest.raises(BenchConfigError, match="eval.batch_size must be an integer"):
        parse_config(with_(CLIP, "eval.batch_size", np.True_))


def test_a_task_own_data_beats_the_shared_section(tmp_path):
    raw = {"model": {"family": "hf_t5", "base": "b"}, "data": {"path": "org/glue-copy"},
           "tasks": [{"name": "rte", "expert": "e", "data": {"root": "local/rte"}}, {"name": "cola", "expert": "e"}]}
    rte, cola = parse_config(raw, base_dir=tmp_path).tasks
    assert (rte.data.source, rte.data.root) == ("jsonl", tmp_path / "local/rte")
    assert (cola.data.source, cola.data.path, cola.data.name) == ("hf", "org/glue-copy", "cola")


def test_t5_defaults_to_glue():
    cfg = parse_config({"model": {"family": "hf_t5", "base": "b"},
                        "tasks": [{"name": "mnli", "expert": "e"}, {"name": "cola", "expert": "e"}]})
    mnli, cola = cfg.tasks
    assert (mnli.data.source, mnli.data.path, mnli.data.name) == ("hf", "nyu-mll/glue", "mnli")
    assert mnli.data.splits["test"] == "validation_matched" and cola.data.splits["test"] == "validation"


@pytest.mark.parametrize("path,value,message", [
    ("model.family", "resnet", "unknown model family 'resnet'"),
    ("model.base", None, "model.base is missing"),
    ("model.dtype", "int8", "model.dtype must be one of"),
    ("model.device", "tpu", "model.device must be"),
    ("model.pretrained", "openai", "open_clip family only"),
    ("model.colour", "red", "unknown key(s) 'colour' in model"),
    ("tasks.0.expert", None, "task 'a' has no expert"),
    ("tasks.0.data", None, "task 'a' has no data"),
    ("tasks.0.data.splits", {"test": None}, "splits.test is missing"),
    # (anchors and scales chosen on the test data, or training examples scored as test)
    ("tasks.0.data.splits", {"val": "test"}, "val and test both name the split 'test'"),
    ("tasks.0.data.splits", {"test": "train"}, "train and test both name the split 'train'"),
    ("tasks.0.data.source", "jsonl", "jsonl holds text"),
    ("tasks.0.data.val_size", 0, "val_size must be"),
    # (NaN passed every comparison and the bench ended in int()'s bare 'cannot convert float NaN to integer')
    ("tasks.0.data.val_size", float("nan"), "val_size must be a fraction in (0, 1) or a count >= 1, got nan"),
    ("tasks.0.data.val_size", float("inf"), "val_size must be"),
    ("tasks.0.templates", ["no placeholder"], "exactly one '{}'"),
    ("tasks.0.answers", ["yes", "no"], "answers do not apply to the hf_clip family"),
    ("tasks.0.classnames", ["cat", "dog", "cat"], "task 'a'.classnames repeats ['cat']: each label needs its own"),
    ("tasks.0.expertt", "x", "unknown key(s) 'expertt' in task 'a'"),
    ("eval.batch_size", 0, "eval.batch_size must be an integer >= 1"),
    ("eval.cache", "ram", "eval.cache must be one of"),
    ("eval.batchsize", 4, "unknown key(s) 'batchsize' in eval"),
    ("data.calibration.samples", -1, "data.calibration.samples must be"),
    ("seed", "zero", "seed must be an integer"),
])
def test_bad_configs_raise_clear_errors(path, value, message):
    with pytest.raises(BenchConfigError) as e:
        parse_config(with_(CLIP, path, value))
    assert message in str(e.value)


def test_an_answer_given_to_two_labels_is_an_error():
    """(answers: [negative, negative] scored both labels alike: every example was predicted as
    label 0, the accuracy that of a constant guess, without an error.)"""
    config = {"model": {"family": "hf_causal_lm", "base": "b"},
              "tasks": [{"name": "sst2", "expert": "e", "answers": ["negative", "negative"]}]}
    with pytest.raises(BenchConfigError, match=r"task 'sst2'.answers repeats \['negative'\]"):
        parse_config(config)
    config["tasks"][0]["answers"] = ["negative", "positive"]
    assert parse_config(config).tasks[0].answers == ["negative", "positive"]


def test_class_names_the_tokenizer_reads_alike_are_an_error():
    """(CLIP's tokenizers collapse whitespace: "cat" and " cat" gave two classes one text
    embedding, and every image of the second was scored as the first, without an error. Case is
    the model's tokenizer's to read, when the bench is built: test_benches_clip.py.)"""
    with pytest.raises(BenchConfigError, match=r"classnames repeats \[' cat', 'cat'\]"):
        parse_config(with_(CLIP, "tasks.0.classnames", ["cat", "dog", " cat"]))
    assert parse_config(with_(CLIP, "tasks.0.classnames", ["Cat", "dog", "cat"])).tasks[0].classnames == \
        ["Cat", "dog", "cat"]


def test_bad_task_lists():
    with pytest.raises(BenchConfigError, match="no 'tasks' section"):
        parse_config({"model": CLIP["model"]})
    with pytest.raises(BenchConfigError, match="no 'model' section"):
        parse_config({"tasks": CLIP["tasks"]})
    with pytest.raises(BenchConfigError, match="listed twice"):
        parse_config(dict(CLIP, tasks=CLIP["tasks"] * 2))
    with pytest.raises(BenchConfigError, match="has no expert"):
        parse_config(dict(CLIP, tasks=["a"]))


def test_load_config_errors(tmp_path):
    with pytest.raises(BenchConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(BenchConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


def test_a_key_given_twice_is_an_error_but_a_merge_may_override(tmp_path):
    """YAML keeps the last of two equal keys without a word; a key of a "<<" merge, overridden
    by the mapping's own (an anchored one merged again, deeper), is no repetition."""
    (tmp_path / "twice.yaml").write_text("model: m\nsub:\n  bits: 3\n  bits: 4\n")
    with pytest.raises(BenchConfigError, match="'bits' is given twice in one mapping \\(line 4\\)"):
        load_config(tmp_path / "twice.yaml")
    (tmp_path / "merges.yaml").write_text(
        "defaults:\n  common: &common {bits: 4, group_size: 128}\n  gptq: &gptq\n    <<: *common\n    bits: 3\n"
        "run:\n  <<: *gptq\n  seed: 1\n")
    assert load_config(tmp_path / "merges.yaml")["run"] == {"bits": 3, "group_size": 128, "seed": 1}


def test_repo_configs_parse():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    expected = {"clip-vit-b32-8tasks.yaml": ("hf_clip", 8), "clip-vit-l14-20tasks.yaml": ("hf_clip", 20),
                "flan-t5-base-glue.yaml": ("hf_t5", 8)}
    for name, (family, n) in expected.items():
        cfg = parse_config(load_config(root / name), base_dir=root)
        assert cfg.model.family == family and len(cfg.tasks) == n
        assert all(t.expert.startswith("tanganke/") for t in cfg.tasks)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hf_data_without_datasets_library(tmp_path):
    from epmq.benches.tiny import write_tiny_t5

    cfg = write_tiny_t5(tmp_path, tasks=("sst2",), per_split={"train": 4, "validation": 2})
    cfg["data"] = {"source": "hf"}  # nyu-mll/glue
    with pytest.raises(BenchConfigError, match="`datasets` library is not installed"):
        build_bench(cfg, base_dir=tmp_path, progress=False)


def test_prompt_helpers():
    assert readable("/a/apartment_building/outdoor") == "apartment building outdoor"
    assert readable("Annual_Crop") == "Annual Crop"
    assert readable("Ram C/V Cargo Van Minivan 2012") == "Ram C/V Cargo Van Minivan 2012"  # (Stanford Cars)
    assert readable("speed limit (20km/h)") == "speed limit (20km/h)"  # (GTSRB)
    assert image_templates("Stanford-Cars") == image_templates("cars")
    assert image_templates("Oxford-IIIT Pets") == image_templates("pet") == image_templates("OxfordIIITPet")
    assert all(t.count("{}") == 1 for t in image_templates("unknown task"))


def test_glue_answers_are_the_words_the_experts_learned_by_label():
    from epmq.benches.prompts import GLUE, STSB_GRID, score_text

    want = {"cola": ["unacceptable", "acceptable"], "mnli": ["entailment", "neutral", "contradiction"],
            "mrpc": ["no", "yes"], "qqp": ["no", "yes"], "qnli": ["yes", "no"], "rte": ["yes", "no"],
            "sst2": ["negative", "positive"]}
    assert {k: v["answers"] for k, v in GLUE.items() if not v.get("regression")} == want
    assert GLUE["stsb"]["regression"] and GLUE["stsb"]["answers"] is None
    # STS-B: the scores 0.0, 0.1, ..., 5.0, written with one decimal
    assert len(STSB_GRID) == 51 and STSB_GRID[0] == 0 and STSB_GRID[-1] == 5.0
    assert [score_text(v) for v in STSB_GRID[:3]] == ["0.0", "0.1", "0.2"]
    assert score_text(3.14159) == "3.1" and score_text(2.96) == "3.0" and score_text(5) == "5.0"
    assert image_templates("Pets") == image_templates("oxford_iiit_pet") == image_templates("pet")


def test_held_out_validation_and_eval_caps_are_seeded_draws(gen):
    from epmq.benches.config import DataSpec
    from epmq.benches.data import make_task_data

    spec = DataSpec(source="jsonl", splits={"train": "train", "test": "test"}, val_size=0.25)
    sources = {"train": list(range(14)), "test": list(range(100, 120))}
    seed = int(torch.randint(0, 1000, (1,), generator=gen))
    td = make_task_data("t", sources, spec, seed=seed, calib_samples=4, caps={"val": None, "test": 5}, tasks=["t"],
                        log=lambda m: None)
    assert len(td.splits["val"]) == 4  # round(0.25 * 14)
    assert not set(td.splits["val"].indices) & set(td.splits["train"].indices)
    assert set(td.calibration.indices) <= set(td.splits["train"].indices)
    kept = [make_task_data("t", sources, spec, seed=s, calib_samples=4, caps={"test": 5}, tasks=["t"],
                           log=lambda m: None)
            .splits["test"].indices for s in range(seed, seed + 4)]
    assert all(len(k) == 5 and k == sorted(k) for k in kept) and any(k != list(range(5)) for k in kept)
    assert readable("Cattleya__orchid_") == "Cattleya orchid"
    assert readable("/apartment_building/outdoor") == "apartment building outdoor"


def test_bench_tasks_whose_names_collide_in_crc32_draw_apart_and_the_others_as_before(gen):
    """A bench task's draws were seeded by the CRC-32 of "{seed}/{task}/{purpose}": "plumless" and
    "buckeroo" share it at every seed, so two such tasks of one source held out one val split and
    calibrated on one sample. They now draw their own; other tasks draw as they did."""
    from epmq.benches.config import DataSpec
    from epmq.benches.data import make_task_data

    spec = DataSpec(source="jsonl", splits={"train": "train", "test": "test"}, val_size=0.25)
    sources = {"train": list(range(200)), "test": list(range(1000, 1100))}
    seed = int(torch.randint(0, 2 ** 31, (), generator=gen))
    tasks = ["plumless", "buckeroo", "math"]

    def drawn(task, tasks):
        td = make_task_data(task, sources, spec, seed=seed, calib_samples=8, caps={"test": 10}, tasks=tasks,
                            log=lambda m: None)
        return {s: td.splits[s].indices for s in ("val", "test")} | {"calibration": td.calibration.indices}

    plumless, buckeroo = drawn("plumless", tasks), drawn("buckeroo", tasks[::-1])
    assert all(plumless[s] != buckeroo[s] for s in plumless)
    assert plumless == drawn("plumless", tasks[::-1])  # (not the order's)
    for task in ("plumless", "math"):  # (a task none collides with: the CRC-32 draws of before)
        perm = torch.randperm(200, generator=torch.Generator().manual_seed(zlib.crc32(f"{seed}/{task}/val".encode())))
        assert drawn(task, ["plumless", "math"])["val"] == sorted(perm[:50].tolist())


def _class_folders(root, classes, per_class=2):
    """``root/{train,test}/<class>/<i>.png``: tiny images, each class its own colour."""
    from PIL import Image

    for split in ("train", "test"):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (4, 4), (40 * c, 10 * i, 0)).save(d / f"{i}.png")


def test_folder_class_names_follow_the_labels_of_their_directories(tmp_path):
    """Labels are the sorted directory names' positions; each display name stays with its own
    label even where the readable names sort otherwise ('-' sorts before '_', ' ' before '-')."""
    from epmq.benches.config import DataSpec
    from epmq.benches.data import open_image_sources

    _class_folders(tmp_path, ["sea_bass", "sea-lion", "Zebra"])
    spec = DataSpec(source="folder", root=tmp_path, splits={"train": "train", "val": None, "test": "test"})
    sources, names = open_image_sources("fish", spec, None)
    assert names == ["Zebra", "sea-lion", "sea bass"]  # the directories sorted: "Zebra" < "sea-lion" < "sea_bass"
    for path, label in sources["test"].items:
        assert readable(path.parent.name) == names[label]


def test_the_tasks_classnames_replace_the_names_the_data_carries(tmp_path):
    """A task's ``classnames`` (by label) are what the prompts say, for a folder dataset too."""
    from epmq.benches.config import DataSpec
    from epmq.benches.data import open_image_sources

    _class_folders(tmp_path, ["c0", "c1"])
    spec = DataSpec(source="folder", root=tmp_path, splits={"train": "train", "val": None, "test": "test"})
    assert open_image_sources("t", spec, None)[1] == ["c0", "c1"]
    _, names = open_image_sources("t", spec, ["annual crop", "forest"])
    assert names == ["annual crop", "forest"]
    with pytest.raises(BenchConfigError, match="3 classnames given, the data has 2"):
        open_image_sources("t", spec, ["a", "b", "c"])


def test_folder_class_names_the_tokenizer_reads_alike_are_an_error(tmp_path):
    """Directories 'Cat' and 'cat' (or 'sea_lion' and 'sea lion', read alike once readable) are
    two labels of one prompt: every example of either was predicted as the first. The task's
    own distinct classnames serve."""
    from epmq.benches.config import DataSpec
    from epmq.benches.data import open_image_sources

    _class_folders(tmp_path, ["Cat", "cat", "sea lion", "sea_lion", "dog"])
    spec = DataSpec(source="folder", root=tmp_path, splits={"train": "train", "val": None, "test": "test"})
    with pytest.raises(BenchConfigError, match=r"read alike.*\['Cat', 'cat', 'sea lion'\].*classnames"):
        open_image_sources("pets", spec, None)
    names = ["big cat", "cat", "sea lion", "seal", "dog"]
    assert open_image_sources("pets", spec, names)[1] == names


@pytest.mark.parametrize("text, shown, kind", [
    ("model: m\nyes: 1\nfoo: 2\n", "'yes'", "bool"),        # YAML 1.1: unquoted yes/no/on/off
    ("model: m\nsub: {1: x, bits: 4}\n", "'1'", "int"),
    ("model: m\n2024-12-05: x\n", "'2024-12-05'", "timestamp"),
])
def test_a_key_yaml_reads_as_no_string_is_an_error(tmp_path, text, shown, kind):
    """Every key epmq reads is a name: a bool or int key used to fail the unknown-key messages
    (sorted among strings) with a bare TypeError."""
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(BenchConfigError, match=f"the key {shown} \\(line \\d\\) is not a name: YAML reads it "
                                               f"as {kind}, not a string; quote it"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "q.yaml").write_text(text.replace(shown.strip("'") + ":", f"{shown}:"))
    load_config(tmp_path / "q.yaml")  # quoted: a name


def test_a_config_not_in_utf8_is_an_error(tmp_path):
    """A config saved as Latin-1 (an accent in a comment) used to end in a UnicodeDecodeError."""
    (tmp_path / "c.yaml").write_bytes("model: m\n# café\n".encode("latin-1"))
    with pytest.raises(BenchConfigError, match="c.yaml is not UTF-8 text \\(byte 14: .*\\): save it as UTF-8"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_bytes("model: m\n# café\n".encode("utf-8"))
    assert load_config(tmp_path / "c.yaml") == {"model": "m"}


def test_a_task_named_avg_is_refused():
    """The scores are {task: acc, ..., "avg": mean}: a task "avg" had its accuracy replaced by the
    mean in results.json and the table."""
    config = {"model": {"family": "hf_clip", "base": "b"}, "data": {"root": "d"},
              "tasks": [{"name": "a", "expert": "e"}, {"name": "avg", "expert": "f"}]}
    with pytest.raises(BenchConfigError, match="a task may not be named 'avg'"):
        parse_config(config)


def test_jsonl_text_tasks_are_read_as_utf8_whatever_the_locale(tmp_path, monkeypatch):
    """A task's .jsonl is UTF-8 (what datasets' to_json and json.dumps(ensure_ascii=False) write), with or
    without a BOM (Windows editors' "UTF-8"); read with the locale's encoding, a BOM failed as 'line 1 is not
    JSON' and a cp1252 locale read 'café' as 'cafÃ©', silently."""
    import io

    from epmq.benches.config import DataSpec
    from epmq.benches.data import open_text_sources

    rows = [{"sentence": "café naïve – ok", "label": 1}, {"sentence": "plain", "label": 0}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (tmp_path / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # (a BOM)
    (tmp_path / "test.jsonl").write_bytes(text.encode("utf-8"))
    real_open = open

    def latin_locale_open(file, mode="r", *args, **kwargs):  # what open() does under a cp1252 locale
        if "b" not in mode and kwargs.get("encoding", "locale") == "locale" and not args:
            kwargs["encoding"] = "cp1252"
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", latin_locale_open)
    monkeypatch.setattr(io, "open", latin_locale_open)
    spec = DataSpec(source="jsonl", root=tmp_path, splits={"train": "train", "test": "test"})
    sources = open_text_sources("t", spec, ["sentence"])
    for split in sources.values():
        assert [split[i] for i in range(len(split))] == rows


def test_a_jsonl_that_is_not_utf8_is_named(tmp_path):
    """A task's .jsonl saved in another encoding (cp1252's 'café', as Windows' Notepad did) ended
    the bench's opening in a bare UnicodeDecodeError naming neither the file nor the line."""
    from epmq.benches.config import DataSpec
    from epmq.benches.data import open_text_sources

    (tmp_path / "train.jsonl").write_bytes(b'{"sentence": "plain", "label": 0}\n'
                                           + '{"sentence": "café", "label": 1}\n'.encode("cp1252"))
    (tmp_path / "test.jsonl").write_bytes(b'{"sentence": "plain", "label": 0}\n')
    spec = DataSpec(source="jsonl", root=tmp_path, splits={"train": "train", "test": "test"})
    with pytest.raises(BenchConfigError, match=r"train\.jsonl line 2 is not UTF-8 text.*save it as UTF-8"):
        open_text_sources("t", spec, ["sentence"])
