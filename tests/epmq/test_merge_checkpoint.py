"""Merging checkpoints on disk: epmq.merge_checkpoints and ``epmq merge``."""

import functools
import io
import json
import re
import sys
import warnings

import pytest
import torch
import transformers
import yaml

from epmq import merge, merge_checkpoints
from epmq.benches.tiny import perturb, word_tokenizer
from epmq.cli import main
from epmq.merge_checkpoint import RECIPE_FILE
from test_merge import tied_llama


def tiny_llama(seed):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Llama base (sharded, with a tokenizer) and three experts (one .bin file)."""
    root = tmp_path_factory.mktemp("merge_ckpts")
    base = tiny_llama(0)
    base.save_pretrained(root / "base", max_shard_size="20KB")
    word_tokenizer(root / "base")
    (root / "base" / "tf_model.h5").write_bytes(b"the base's weights in another framework")
    (root / "base" / "README.md").write_text("the base's model card")
    experts, noise = [], torch.Generator().manual_seed(1)
    for k in range(3):
        expert = perturb(base, noise, scale=0.05)
        if k == 2:
            (root / "e2").mkdir()
            torch.save(expert.state_dict(), root / "e2" / "pytorch_model.bin")
        else:
            expert.save_pretrained(root / f"e{k}")
        experts.append({n: t.detach().clone() for n, t in expert.state_dict().items()})
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(experts[0][name], experts[1][name])  # three different experts
    return root, base.state_dict(), experts


def _load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.mark.parametrize("method, params", [
    ("ties", {"density": 0.3, "scope": "global"}), ("dare", {"density": 0.5, "consensus": "sign"}),
    ("tsv", {"scale": 0.5}), ("model_stock", {}), ("sce", {"select_topk": 0.5}),
    ("multislerp", {"weights": [1.0, 0.5, 2.0]}),
])
def test_merged_checkpoint_equals_the_in_memory_merge(checkpoints, tmp_path, method, params):
    root, base, experts = checkpoints
    out = merge_checkpoints(method, [root / "e0", root / "e1", root / "e2"], tmp_path / "out",
                            base=root / "base", params=params, max_shard_size="30KB",
                            progress=False)
    want = getattr(merge, method)(base, experts, **params)
    got = _load(out)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    # shards as transformers writes them, the base's tokenizer and config, the recipe
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["method"] == method and recipe["params"] == params and len(recipe["models"]) == 3
    assert transformers.AutoTokenizer.from_pretrained(out)("a b").input_ids
    assert not (out / "tf_model.h5").exists()  # the base's weights in another format
    card = (out / "README.md").read_text()
    assert card.startswith("---\ntags:") and method in card  # (no base_model: local sources, no hub ids)


def test_karcher_checkpoints(checkpoints, tmp_path):
    root, base, experts = checkpoints
    out = merge_checkpoints("karcher", [root / "base", root / "e0", root / "e1"], tmp_path / "out",
                            params={"max_iter": 5}, progress=False)
    want = merge.karcher([base] + experts[:2], max_iter=5)
    got = _load(out)
    assert all(torch.equal(got[name], want[name]) for name in want)


@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_checkpoints_with_or_without_a_base(checkpoints, tmp_path, with_base):
    root, base, experts = checkpoints
    out = merge_checkpoints("nuslerp", [root / "e0", root / "e1"], tmp_path / "out",
                            base=root / "base" if with_base else None, params={"weights": [1.0, 3.0]},
                            progress=False)
    want = merge.nuslerp(base if with_base else None, experts[:2], weights=[1.0, 3.0])
    got = _load(out)
    assert all(torch.equal(got[name], want[name]) for name in want)
    with pytest.raises(ValueError, match="nuslerp interpolates two models, got 3"):
        merge_checkpoints("nuslerp", [root / "e0", root / "e1", root / "e2"], tmp_path / "x")


def test_slerp_average_dtype_and_replacement(checkpoints, tmp_path):
    root, base, experts = checkpoints
    out = tmp_path / "out"
    merge_checkpoints("slerp", [root / "e0", root / "e1"], out, params={"t": 0.25}, dtype="bfloat16",
                      progress=False)
    want = merge.slerp(experts[0], experts[1], t=0.25)
    got = _load(out)
    assert all(torch.equal(got[n].float(), want[n].to(torch.bfloat16).float()) for n in want)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "model.safetensors").is_file()  # one file below the shard size
    # a second merge into the same directory replaces it; a file the user added stays
    (out / "README.md").write_text("mine")
    merge_checkpoints("average", [root / "e0", root / "e1"], out, params={"weights": [1, 3]},
                      progress=False)
    got = _load(out)
    want = merge.average(experts[:2], weights=[1, 3])
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert (out / "README.md").read_text() == "mine"


def test_an_output_that_is_one_of_the_inputs_is_refused(checkpoints, tmp_path):
    """(A directory an earlier epmq merge wrote is replaced by the next: given as the base, a
    model or a file in it, the merge read it and then replaced it, the earlier merge lost.)"""
    root, _, _ = checkpoints
    out = tmp_path / "v1"
    merge_checkpoints("average", [root / "e0", root / "e1"], out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (tmp_path / "link").symlink_to(out)
    for kw in (dict(models=[out, root / "e1"], base=root / "base"),
               dict(models=[root / "e0", root / "e1"], base=out / "model.safetensors"),
               dict(models=[tmp_path / "link", root / "e1"], base=root / "base")):
        with pytest.raises(ValueError, match=r"(is|holds) an input of this merge"):
            merge_checkpoints("task_arithmetic", out=out, progress=False, **kw)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # written elsewhere, it is an input like any other
    merge_checkpoints("task_arithmetic", [out, root / "e1"], tmp_path / "v2", base=root / "base", progress=False)


def test_an_output_epmq_may_not_replace_is_refused_before_any_model_is_read(checkpoints, tmp_path, monkeypatch):
    """A directory of the user's, or epmq quantize's checkpoint, given as out was refused only when
    the merge was written: after every model was read and merged (RegMean: after calibrating each),
    as epmq quantize refuses one at its start. Refused before any model is opened."""
    import epmq.merge_checkpoint

    root, _, _ = checkpoints

    def never(*args, **kwargs):
        raise AssertionError("read a model for an output that cannot be replaced")

    monkeypatch.setattr(epmq.merge_checkpoint, "_open", never)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "w4").mkdir()
    (tmp_path / "w4" / "quantize_config.json").write_text("{}")
    (tmp_path / "w4" / ".epmq_files.json").write_text("{}")
    for out, what in (("mine", "is not an epmq checkpoint"), ("w4", "holds a quantized checkpoint")):
        with pytest.raises(ValueError, match=f"exists and {what}.*refusing to replace it"):
            merge_checkpoints("task_arithmetic", [root / "e0", root / "e1"], tmp_path / out, base=root / "base",
                              progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_an_output_that_is_no_path_is_refused_by_name(checkpoints, tmp_path):
    """out=None (or a number) ended in os's bare 'expected str, bytes or os.PathLike object, not
    NoneType', naming no argument; refused naming it, before anything is read."""
    root, _, _ = checkpoints
    for bad in (None, 3):
        with pytest.raises(TypeError, match=f"out must be a path .*got {type(bad).__name__}"):
            merge_checkpoints("average", [root / "e0", root / "e1"], bad, progress=False)


def test_an_input_that_is_no_path_is_refused_by_name(checkpoints, tmp_path):
    """models, a model, the base or lora_base given as None (an unset variable) or a number ended in
    pathlib's bare 'expected str, bytes or os.PathLike object, not NoneType', naming none of them
    (out was checked, 4f85862); refused naming the argument, before anything is read."""
    root, _, _ = checkpoints
    for bad in (None, 3):
        with pytest.raises(TypeError, match=f"models\\[1\\] must be a path .*got {type(bad).__name__}"):
            merge_checkpoints("average", [root / "e0", bad], tmp_path / "a", progress=False)
    with pytest.raises(TypeError, match="base must be a path .*got int 3"):
        merge_checkpoints("task_arithmetic", [root / "e0", root / "e1"], tmp_path / "b", base=3, progress=False)
    with pytest.raises(TypeError, match="lora_base must be a path .*got int 3"):
        merge_checkpoints("average", [root / "e0", root / "e1"], tmp_path / "c", lora_base=3, progress=False)
    for bad in (None, 3):  # (no list at all: "'NoneType' object is not iterable")
        with pytest.raises(TypeError, match=f"models must be a list of paths .*got {type(bad).__name__}"):
            merge_checkpoints("average", bad, tmp_path / "e", progress=False)
    with pytest.raises(TypeError, match="models\\[0\\] must be a path .*got dict$"):  # (not its tensors' repr)
        merge_checkpoints("average", [{"w": torch.zeros(1000)}, root / "e1"], tmp_path / "d", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_output_that_is_the_base_its_adapters_name_is_refused(checkpoints, tmp_path):
    """LoRA adapters merged without a base (nor lora_base) are read on the base their configs
    name: an output there (an earlier epmq merge the adapters were trained on) replaced the
    adapters' base, as given lora_base it is refused."""
    peft = pytest.importorskip("peft")
    root, _, _ = checkpoints
    merged = tmp_path / "v1"
    merge_checkpoints("average", [root / "e0", root / "e1"], merged, progress=False)
    adapters = []
    for k in range(2):
        model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(merged),
                                    peft.LoraConfig(r=2, target_modules=["q_proj"]))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(0.1 * torch.randn(p.shape))
        model.save_pretrained(tmp_path / f"adapter{k}")
        adapters.append(tmp_path / f"adapter{k}")
    before = {p.name: p.read_bytes() for p in merged.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match=r"holds an input of this merge \(the base of model 0"):
        merge_checkpoints("average", adapters, merged, progress=False)
    assert {p.name: p.read_bytes() for p in merged.iterdir() if p.is_file()} == before


def test_a_model_listed_twice_or_as_the_base_is_refused(checkpoints, tmp_path, monkeypatch):
    """(Merged as given: the expert listed twice counted double, a weight the config never gave;
    the base among the models a zero task vector, which moved Model Stock's t.)"""
    root, _, _ = checkpoints
    monkeypatch.chdir(root)
    for method, models, base, match in (
            ("ties", ["e0", "e1", "./e0"], "base", r"model 2 \(\./e0\) is model 0 \(e0\) again"),
            ("average", ["e0", "e0"], None, r"model 1 \(e0\) is model 0 \(e0\) again"),
            ("model_stock", ["base", "e0", "e1"], "base", r"model 0 \(base\) is the base")):
        with pytest.raises(ValueError, match=match):
            merge_checkpoints(method, models, tmp_path / "x", base=base, progress=False)
        assert not (tmp_path / "x").exists()


def test_a_checkpoint_named_by_its_directory_and_by_its_weights_file_is_one_model(checkpoints, tmp_path,
                                                                                   monkeypatch):
    """(The check compared paths: e0 and e0/model.safetensors, or base and its shard index, were
    taken as two models, the expert's task vector counted twice or the base's zero one counted.)"""
    root, _, _ = checkpoints
    monkeypatch.chdir(root)
    for method, models, base, match in (
            ("ties", ["e0", "e1", "e0/model.safetensors"], "base",
             r"model 2 \(e0/model\.safetensors\) is model 0 \(e0\) again"),
            ("average", ["e2/pytorch_model.bin", "e2"], None, r"model 1 \(e2\) is model 0 \(e2/pytorch_model\.bin\) again"),
            ("model_stock", ["base/model.safetensors.index.json", "e0", "e1"], "base",
             r"model 0 \(base/model\.safetensors\.index\.json\) is the base")):
        with pytest.raises(ValueError, match=match):
            merge_checkpoints(method, models, tmp_path / "x", base=base, progress=False)
        assert not (tmp_path / "x").exists()


def test_two_revisions_whose_shard_indexes_are_one_cached_file_are_two_models(checkpoints, tmp_path):
    """The HF hub cache links each snapshot's files to blobs named by their content: two sharded
    revisions of one repository (training steps, org/name@step-1000) whose indexes are alike link
    them to one blob, while their shards differ. Resolved through the index's link, they were
    refused as one model listed twice."""
    import hashlib
    import shutil

    root, base, _ = checkpoints
    blobs, experts, noise = tmp_path / "cache" / "blobs", [], torch.Generator().manual_seed(7)
    blobs.mkdir(parents=True)
    model = tiny_llama(0)
    for k in range(2):
        expert = perturb(model, noise, scale=0.05)
        experts.append({n: t.detach().clone() for n, t in expert.state_dict().items()})
        expert.save_pretrained(tmp_path / "saved", max_shard_size="20KB")
        snapshot = tmp_path / "cache" / "snapshots" / f"step-{k}"
        snapshot.mkdir(parents=True)
        for f in (tmp_path / "saved").iterdir():
            blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
            shutil.copy(f, blob)
            (snapshot / f.name).symlink_to(blob)
        shutil.rmtree(tmp_path / "saved")
    index = "model.safetensors.index.json"
    snapshots = [tmp_path / "cache" / "snapshots" / f"step-{k}" for k in range(2)]
    assert (snapshots[0] / index).resolve() == (snapshots[1] / index).resolve()  # (one blob)
    out = merge_checkpoints("task_arithmetic", snapshots, tmp_path / "out", base=root / "base",
                            params={"scale": 0.4}, progress=False)
    want = merge.task_arithmetic(base, experts, scale=0.4)
    got = _load(out)
    assert [n for n in want if not torch.equal(got[n], want[n])] == []


def test_regmeans_parameters_are_checked_before_its_statistics(checkpoints, tmp_path, monkeypatch):
    """(alpha: 2 was refused by the merge, after every model had been loaded and run on its
    calibration data.)"""
    import epmq.merge_checkpoint

    root, _, _ = checkpoints
    monkeypatch.setattr(epmq.merge_checkpoint, "_expert_grams", lambda *a: pytest.fail("statistics taken"))
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got 2"):
        merge_checkpoints("regmean", [root / "e0", root / "e1"], tmp_path / "x", calibration=["a.txt", "b.txt"],
                          params={"alpha": 2}, progress=False)
    assert not (tmp_path / "x").exists()


def test_bad_merges_raise_before_writing(checkpoints, tmp_path):
    root, _, _ = checkpoints
    models = [root / "e0", root / "e1"]
    cases = [
        (dict(method="magic", models=models, base=root / "base"), "unknown merge method"),
        (dict(method="regmean", models=models), "regmean needs each model's activations"),
        (dict(method="ties", models=models, base=root / "base", calibration=["a", "b"]),
         "takes no calibration data"),
        (dict(method="ties", models=models), "needs the base"),
        (dict(method="average", models=models, base=root / "base"), "takes no base"),
        (dict(method="slerp", models=models + [root / "e2"]), "two models"),
        (dict(method="ties", models=models, base=root / "base", params={"densty": 0.2}),
         "unknown parameters \\['densty'\\]"),
        (dict(method="ties", models=models, base=root / "base", dtype="int8"), "dtype"),
        (dict(method="ties", models=[root / "nope"], base=root / "base"), "no checkpoint"),
        # (an entry that is no file: a TypeError traceback, after every model was loaded)
        *[(dict(method="regmean", models=models, calibration=["a.txt", entry]),
           r"calibration\[1\] \(model 1's files\) must be file\(s\) or a directory")
          for entry in (1, None, {"task": "b.txt"}, [], ["b.txt", None])],
    ]
    for kwargs, match in cases:
        method = kwargs.pop("method")
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            merge_checkpoints(method, out=tmp_path / "x", progress=False, **kwargs)
        assert not (tmp_path / "x").exists()
    # a checkpoint of another architecture: the merge's shape check, naming the model as given
    # (not epmq.merge's "expert 1"), nothing written
    # (its heads as wide as the base's: another head_dim is refused from config.json before any read)
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=f"model 1 \\({re.escape(str(tmp_path / 'other'))}\\) has shape"):
        merge_checkpoints("task_arithmetic", [root / "e0", tmp_path / "other"], tmp_path / "x",
                          base=root / "base", progress=False)
    # one that shares no tensor name at all (it used to give a copy of the base)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        image_size=16, patch_size=8)).save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match="is a 'clip_vision_model' checkpoint, the base a 'llama' one"):
        merge_checkpoints("ties", [root / "e0", tmp_path / "clip"], tmp_path / "x",
                          base=root / "base", progress=False)
    assert not (tmp_path / "x").exists()
    # a directory epmq did not write is never replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="refusing to replace"):
        merge_checkpoints("task_arithmetic", models, tmp_path / "mine", base=root / "base",
                          progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_cli_paths_under_home(checkpoints, tmp_path, monkeypatch):
    """``~/experts/e0`` in a config is the home's, as the shell and the bench configs take it
    (it was "no checkpoint at ~/experts/e0")."""
    root, base, experts = checkpoints
    monkeypatch.setenv("HOME", str(root))
    config = tmp_path / "ta.yaml"
    config.write_text(yaml.safe_dump(dict(method="task_arithmetic", base="~/base", models=["~/e0", "~/e1"])))
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 0
    got, want = _load(tmp_path / "out"), merge.task_arithmetic(base, experts[:2])
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_cli_says_a_path_its_console_cannot_encode_without_failing_after_the_merge(checkpoints, tmp_path,
                                                                                    monkeypatch):
    """epmq's output went to a stdout in the locale's encoding (cp1252 where Windows redirects it to a
    log), strict: a merge into a directory named in another script (a user's home 'Иван') was
    written, and then its one line ended the command in UnicodeEncodeError, exit 1. Said escaped."""
    root, base, experts = checkpoints
    config = tmp_path / "ta.yaml"
    config.write_text(yaml.safe_dump(dict(method="task_arithmetic", base=str(root / "base"),
                                          models=[str(root / "e0"), str(root / "e1")])))
    console = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", console)
    assert main(["merge", str(config), str(tmp_path / "Иван" / "out"), "--quiet"]) == 0
    console.flush()
    said = console.buffer.getvalue().decode("cp1252")
    assert "merged 2 models" in said and "\\u0418" in said, said
    assert console.errors == "strict"  # (as it was given: a caller's stream is left as it was)
    got, want = _load(tmp_path / "Иван" / "out"), merge.task_arithmetic(base, experts[:2])
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_cli_paths_under_home_in_mergekit_configs_and_tokens(checkpoints, tmp_path, monkeypatch):
    """A mergekit config's ``~/e0`` is the home's too (its translation reads the models' config
    files: it was "~/e0 is neither a directory nor an HF hub id"); and a model named in
    ``tokens`` as in ``models`` is still that model once both are expanded (it was "tokens:
    ['~/e0'] is not the base or one of the models")."""
    import epmq.merge_checkpoint as merge_checkpoint

    root, base, experts = checkpoints
    monkeypatch.setenv("HOME", str(root))
    config = tmp_path / "mk.yaml"
    n = json.loads((root / "e0" / "config.json").read_text())["num_hidden_layers"]

    def slices(home):  # (one slice of whole models: its layer counts are read from the models)
        return dict(merge_method="slerp", base_model=f"{home}/e0", dtype="float32", parameters={"t": 0.3},
                    slices=[{"sources": [{"model": f"{home}/e{k}", "layer_range": [0, n]} for k in range(2)]}])

    for home, out in (("~", "out"), (str(root), "want")):
        config.write_text(yaml.safe_dump(slices(home)))
        assert main(["merge", str(config), str(tmp_path / out), "--quiet"]) == 0
    got, want = _load(tmp_path / "out"), _load(tmp_path / "want")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    seen = {}
    monkeypatch.setattr(merge_checkpoint, "merge_checkpoints", lambda method, models, out, **kw: seen.update(
        models=models, **kw) or out)
    config.write_text(yaml.safe_dump(dict(method="average", models=["~/e0", "~/e1"], tokenizer_source="union",
                                          tokens={"<x>": {"source": "~/e0"}, "<y>": {"source": {"kind": "zero"}}})))
    assert main(["merge", str(config), str(tmp_path / "out2"), "--quiet"]) == 0
    assert seen["models"] == [str(root / "e0"), str(root / "e1")]
    assert seen["tokens"] == {"<x>": {"source": str(root / "e0")}, "<y>": {"source": {"kind": "zero"}}}


def test_cli_home_expansion_leaves_token_texts(tmp_path, monkeypatch):
    """Only the models in ``tokens`` are ~-expanded, not a model_token's token text: ``token:
    "~"`` (a token of most BPE vocabularies) was read as the home directory's path."""
    import epmq.merge_checkpoint as merge_checkpoint

    monkeypatch.setenv("HOME", str(tmp_path))
    seen = {}
    monkeypatch.setattr(merge_checkpoint, "merge_checkpoints", lambda method, models, out, **kw: seen.update(
        models=models, **kw) or out)
    tokens = {"~x": {"source": {"kind": "model_token", "model": "~/e0", "token": "~"}},
              "<y>": {"source": "~/e1", "force": True}}
    want = {"~x": {"source": {"kind": "model_token", "model": str(tmp_path / "e0"), "token": "~"}},
            "<y>": {"source": str(tmp_path / "e1"), "force": True}}
    config = tmp_path / "m.yaml"
    config.write_text(yaml.safe_dump(dict(method="average", models=["~/e0", "~/e1"], tokens=tokens)))
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 0
    assert seen["tokens"] == want
    # (a mergekit config's tokenizer: {source, tokens} is expanded before its translation)
    from epmq.cli import _key_expanded

    assert _key_expanded("tokenizer", {"source": "~/e0", "tokens": tokens}) == {"source": str(tmp_path / "e0"),
                                                                                 "tokens": want}


@pytest.mark.skipif(sys.platform == "win32", reason="a process waiting on its stdin: POSIX pipes")
def test_a_second_merge_checkpoints_into_an_out_in_use_is_refused_at_its_start(checkpoints, tmp_path, monkeypatch,
                                                                                 held_elsewhere):
    """merge_checkpoints called directly held OUT only while it wrote: a second call into an OUT another
    process holds read and merged every model before it was refused. It is refused before any model is
    read, naming OUT and the other process, as epmq merge is; OUT is free again once that one lets go."""

    from epmq import merge_checkpoint

    root, base, experts = checkpoints
    opened = []
    local = merge_checkpoint.local_checkpoint
    monkeypatch.setattr(merge_checkpoint, "local_checkpoint", lambda source: opened.append(source) or local(source))
    out = tmp_path / "out"
    with held_elsewhere("hold_output", out) as pid:
        with pytest.raises(ValueError, match=rf"output directory {re.escape(str(out))} is in use by another epmq "
                                             rf"merge or quantize \(process {pid} holds"):
            merge_checkpoints("task_arithmetic", [root / "e0", root / "e1"], out, base=root / "base",
                              progress=False)
        assert opened == []  # (refused before any model was read)
    merge_checkpoints("task_arithmetic", [root / "e0", root / "e1"], out, base=root / "base", progress=False)
    assert (out / "model.safetensors").is_file() and not (tmp_path / ".out.epmq-lock").exists()


def test_cli(checkpoints, tmp_path, capsys):
    root, base, experts = checkpoints
    config = tmp_path / "ties.yaml"
    config.write_text(yaml.safe_dump(dict(
        method="ties", base=str(root / "base"), models=[str(root / "e0"), str(root / "e1")],
        params=dict(density=0.2, scale=0.7))))
    assert main(["merge", str(config), str(tmp_path / "out"), "--quiet"]) == 0
    assert "merged 2 models with ties" in capsys.readouterr().out
    assert not (tmp_path / ".out.epmq-lock").exists()  # (OUT's lock let go with its file)
    # a merge refused leaves nothing, nor the folders OUT would have been made in
    config2 = tmp_path / "missing.yaml"
    config2.write_text(yaml.safe_dump(dict(method="ties", base=str(root / "base"),
                                           models=[str(root / "e0"), str(tmp_path / "nowhere")])))
    assert main(["merge", str(config2), str(tmp_path / "new" / "deep" / "out"), "--quiet"]) == 2
    assert "nowhere" in capsys.readouterr().err and not (tmp_path / "new").exists()
    got = _load(tmp_path / "out")
    want = merge.ties(base, experts[:2], density=0.2, scale=0.7)
    assert all(torch.equal(got[n], want[n]) for n in want)
    config.write_text(yaml.safe_dump(dict(method="ties", models=[str(root / "e0")], bases="x")))
    assert main(["merge", str(config), str(tmp_path / "out2")]) == 2
    assert "unknown keys ['bases']" in capsys.readouterr().err
    config.write_text(yaml.safe_dump(dict(method="ties", models=[str(root / "e0")])))
    assert main(["merge", str(config), str(tmp_path / "out2")]) == 2
    assert "needs the base" in capsys.readouterr().err
    # what only RegMean reads is refused elsewhere, not ignored (DARE's seed is a param)
    config.write_text(yaml.safe_dump(dict(method="dare", base=str(root / "base"), models=[str(root / "e0")],
                                          seed=1, samples=4)))
    assert main(["merge", str(config), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "samples, seed set how RegMean reads its calibration data; merge dare reads none" in err
    assert "params: {seed: ...}" in err and not (tmp_path / "out2").exists()


def test_a_merge_on_disk_shows_one_bar_of_its_tensors(checkpoints, tmp_path, capsys):
    """The merges in memory show a bar of their tensors by default: merge_checkpoints, whose
    writer counts them, shows its own alone (not two, one over the other); none with progress off."""
    root, _, _ = checkpoints
    merge_checkpoints("tsv", [root / "e0", root / "e1"], tmp_path / "out", base=root / "base")
    err = capsys.readouterr().err
    assert err.count("merge tsv: 100%") == 1, err
    merge_checkpoints("tsv", [root / "e0", root / "e1"], tmp_path / "quiet", base=root / "base", progress=False)
    assert "merge tsv" not in capsys.readouterr().err


def test_a_ties_merge_on_disk_shows_its_global_thresholds_pass(checkpoints, tmp_path, capsys):
    """TIES' global trim reads every model twice before the first merged tensor is written (the
    writer's bar at 0 all along, minutes on a large model): a bar of that pass under the merge's
    own, once; none with progress off."""
    root, _, _ = checkpoints
    models = [root / "e0", root / "e1"]
    merge_checkpoints("ties", models, tmp_path / "out", base=root / "base", params={"density": 0.3})
    err = capsys.readouterr().err
    assert "ties: global thresholds" in err and err.count("merge ties: 100%") == 1, err
    merge_checkpoints("ties", models, tmp_path / "quiet", base=root / "base", params={"density": 0.3}, progress=False)
    assert capsys.readouterr().err == ""


def test_sources_by_hub_id(checkpoints, tmp_path, monkeypatch):
    """``org/name`` sources that are no local path come from the HF hub: here its cache layout,
    read offline; the base's tokenizer and config come along."""
    import shutil

    import huggingface_hub.constants as hub

    root, base, experts = checkpoints
    commit = "0" * 40
    for name in ("base", "e0"):
        repo = tmp_path / "hub" / f"models--org--{name}"
        shutil.copytree(root / name, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    out = merge_checkpoints("task_arithmetic", ["org/e0", root / "e1"], "out", base="org/base",
                            params={"scale": 0.4}, progress=False)
    want = merge.task_arithmetic(base, experts[:2], scale=0.4)
    got = _load(out)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert (out / "tokenizer.json").is_file()
    with pytest.raises(FileNotFoundError, match="no local path .*org/missing, and 'org/missing' could not be fetched"):
        merge_checkpoints("task_arithmetic", ["org/missing"], "out2", base="org/base", progress=False)
    # a snapshot of the JSON files alone (a tokenizer-only fetch), read offline: said to be partial
    partial = tmp_path / "hub" / "models--org--partial"
    (partial / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(root / "e0" / "config.json", partial / "snapshots" / commit)
    (partial / "refs").mkdir()
    (partial / "refs" / "main").write_text(commit)
    # (huggingface_hub 1.0 and later have no huggingface-cli to download it with: hf)
    with pytest.raises(ValueError, match="no weights in .*the HF hub cache holds part of the repository.*HF_HUB_"
                                         "OFFLINE unset, or hf download org/partial\\)$"):
        merge_checkpoints("task_arithmetic", ["org/partial"], "out3", base="org/base", progress=False)


def test_sources_by_hub_id_downloaded_bring_the_chat_template(checkpoints, tmp_path, monkeypatch):
    """What is downloaded of a hub repository (``snapshot_download``'s ``allow_patterns``, here
    applied as the hub applies them to a repository's files) holds its tokenizer whole:
    transformers 5 saves the chat template as chat_template.jinja, which the merge carries."""
    import shutil

    import huggingface_hub

    root, base, experts = checkpoints
    template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    repository = tmp_path / "remote" / "base"
    shutil.copytree(root / "base", repository)
    tokenizer = transformers.AutoTokenizer.from_pretrained(repository)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(repository)
    assert (repository / "chat_template.jinja").is_file()
    remote = {"org/base": repository, "org/e0": root / "e0"}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_download(remote, tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    out = merge_checkpoints("task_arithmetic", ["org/e0", root / "e1"], "out", base="org/base",
                            params={"scale": 0.4}, progress=False)
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == template


def test_the_model_cards_base_model_names_hub_models_only(checkpoints, tmp_path, monkeypatch):
    """The hub refuses a commit whose README's base_model holds anything but model ids (HTTP 400,
    '"base_model" with value ... is not valid'): a merge of local checkpoints could not be
    uploaded as written. It names the sources that are hub models, without a revision (the
    recipe keeps every source as given)."""
    import shutil

    import huggingface_hub
    import yaml

    root, base, experts = checkpoints
    remote = {"org/base": root / "base", "org/e0": root / "e0"}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_download(remote, tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(root / "e2", tmp_path / "ckpt" / "e2")  # (a local path that reads like org/name)

    def metadata(out):
        card = (out / "README.md").read_text()
        return yaml.safe_load(card.split("---\n")[1])

    out = merge_checkpoints("task_arithmetic", ["org/e0@v1", root / "e1", "ckpt/e2"], "out", base="org/base",
                            progress=False)
    assert metadata(out) == {"base_model": ["org/base", "org/e0"], "tags": ["merge", "epmq"]}
    assert json.loads((out / RECIPE_FILE).read_text())["models"] == ["org/e0@v1", str(root / "e1"), "ckpt/e2"]
    out = merge_checkpoints("task_arithmetic", [root / "e1", "ckpt/e2"], "local", base=root / "base", progress=False)
    assert metadata(out) == {"tags": ["merge", "epmq"]}


def hub_download(remote: dict, cache):
    """A ``snapshot_download`` of the repositories ``remote`` (repo id -> directory): the files
    ``allow_patterns`` selects, as the hub selects them, copied into ``cache``."""
    import shutil

    from huggingface_hub.utils import filter_repo_objects

    def snapshot_download(repo_id, allow_patterns=None, **kwargs):
        files = [str(f.relative_to(remote[repo_id])) for f in remote[repo_id].rglob("*") if f.is_file()]
        local = cache / repo_id.replace("/", "--")
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(remote[repo_id] / name, local / name)
        return str(local)

    return snapshot_download


def test_sources_by_hub_id_download_only_the_shards_their_index_lists(checkpoints, tmp_path, monkeypatch):
    """A hub repository whose shard index lists its weights, beside another copy of them
    (Mistral's consolidated.safetensors): only the listed shards are downloaded."""
    import shutil

    import huggingface_hub

    root, base, experts = checkpoints
    repository = tmp_path / "remote" / "base"
    shutil.copytree(root / "base", repository)
    shutil.copy(root / "e0" / "model.safetensors", repository / "consolidated.safetensors")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_download({"org/base": repository}, tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    out = merge_checkpoints("task_arithmetic", [root / "e0", root / "e1"], "out", base="org/base",
                            params={"scale": 0.4}, progress=False)
    want = merge.task_arithmetic(base, experts[:2], scale=0.4)
    got = _load(out)
    assert all(torch.equal(got[n], want[n]) for n in want)
    fetched = {f.name for f in (tmp_path / "hub" / "org--base").iterdir()}
    assert "consolidated.safetensors" not in fetched
    assert {f.name for f in (root / "base").glob("model-*.safetensors")} <= fetched


def test_sources_by_hub_id_in_sharded_torch_files_are_downloaded_whole(checkpoints, tmp_path, monkeypatch):
    """An older hub repository holds its weights as .bin shards and pytorch_model.bin.index.json:
    the shards come with the index (the index alone, a JSON file, is not the weights)."""
    import huggingface_hub

    root, base, experts = checkpoints
    sharded = tmp_path / "remote" / "e2"
    sharded.mkdir(parents=True)
    names = list(experts[2])
    weight_map = {}
    for k, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
        shard = f"pytorch_model-0000{k + 1}-of-00002.bin"
        torch.save({n: experts[2][n] for n in part}, sharded / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (sharded / "config.json").write_text((root / "e0" / "config.json").read_text())
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_download({"org/e2": sharded}, tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    out = merge_checkpoints("task_arithmetic", [root / "e0", "org/e2"], "out", base=root / "base",
                            params={"scale": 0.4}, progress=False)
    want = merge.task_arithmetic(base, [experts[0], experts[2]], scale=0.4)
    got = _load(out)
    assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.filterwarnings("ignore:1 tensors of the base")
def test_base_tensors_the_experts_lack_are_copied(checkpoints, tmp_path):
    """As with CLIPVisionModel experts of a CLIPModel base: the base's other tensors (its text
    tower there, the LM head here) are copied, so that the output is the base's model."""
    from safetensors.torch import save_file

    root, base, experts = checkpoints
    partial = []
    for k in range(2):
        state = {n: t.contiguous() for n, t in experts[k].items() if n != "lm_head.weight"}
        (tmp_path / f"p{k}").mkdir()
        save_file(state, str(tmp_path / f"p{k}" / "model.safetensors"))
        partial.append(state)
    with pytest.warns(UserWarning, match="1 tensors of the base .*lm_head.weight.*copied from the base"):
        out = merge_checkpoints("ties", [tmp_path / "p0", tmp_path / "p1"], tmp_path / "out",
                                base=root / "base", params={"density": 0.3}, progress=False)
    got = _load(out)
    shared = {n: t for n, t in base.items() if n != "lm_head.weight"}
    want = merge.ties(shared, partial, density=0.3)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert torch.equal(got["lm_head.weight"], base["lm_head.weight"])
    # a tensor of an expert that the base lacks (a task head) is ignored, with a warning
    extra = dict(partial[0], **{"classifier.weight": torch.zeros(2)})
    save_file(extra, str(tmp_path / "p0" / "model.safetensors"))
    with pytest.warns(UserWarning, match="1 tensors with no counterpart .*classifier.weight"):
        out = merge_checkpoints("ties", [tmp_path / "p0", tmp_path / "p1"], tmp_path / "out2",
                                base=root / "base", params={"density": 0.3}, progress=False)
    got = _load(out)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_a_tensor_only_some_models_have_is_copied_from_the_base(checkpoints, tmp_path):
    """(It used to reach the merge and fail, blaming the model that has it.)"""
    from safetensors.torch import save_file

    root, base, experts = checkpoints
    state = {n: t.contiguous() for n, t in experts[1].items() if n != "model.norm.weight"}
    (tmp_path / "partial").mkdir()
    save_file(state, str(tmp_path / "partial" / "model.safetensors"))
    with pytest.warns(UserWarning, match="1 tensors of the base .*model.norm.weight"):
        out = merge_checkpoints("task_arithmetic", [root / "e0", tmp_path / "partial"],
                                tmp_path / "out", base=root / "base", params={"scale": 0.5},
                                progress=False)
    got = _load(out)
    want = merge.task_arithmetic({n: t for n, t in base.items() if n != "model.norm.weight"},
                                 [{n: t for n, t in experts[0].items() if n != "model.norm.weight"}, state],
                                 scale=0.5)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert torch.equal(got["model.norm.weight"], base["model.norm.weight"])


def test_remerging_onto_another_base_drops_the_first_bases_files(checkpoints, tmp_path):
    import shutil

    root, _, _ = checkpoints
    for name in ("a", "b"):
        shutil.copytree(root / "base", tmp_path / name)
    (tmp_path / "a" / "generation_config.json").write_text('{"from": "a"}')
    (tmp_path / "b" / "generation_config.json").unlink(missing_ok=True)
    models = [root / "e0", root / "e1"]
    merge_checkpoints("task_arithmetic", models, tmp_path / "out", base=tmp_path / "a", progress=False)
    assert (tmp_path / "out" / "generation_config.json").is_file()
    (tmp_path / "out" / "notes.txt").write_text("the user's")
    merge_checkpoints("task_arithmetic", models, tmp_path / "out", base=tmp_path / "b", progress=False)
    assert not (tmp_path / "out" / "generation_config.json").exists()
    assert (tmp_path / "out" / "notes.txt").read_text() == "the user's"


def test_files_from_names_the_model_whose_files_the_output_carries(checkpoints, tmp_path):
    import shutil

    root, _, _ = checkpoints
    for name in ("a", "b"):
        shutil.copytree(root / "e0", tmp_path / name)
        (tmp_path / name / "generation_config.json").write_text(json.dumps({"from": name}))
    models = [tmp_path / "a", tmp_path / "b"]
    merge_checkpoints("average", models, tmp_path / "out", files_from=tmp_path / "b", progress=False)
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["from"] == "b"
    assert json.loads((tmp_path / "out" / "epmq_merge.json").read_text())["files_from"] == str(tmp_path / "b")
    merge_checkpoints("average", models, tmp_path / "out", progress=False)  # (the first, by default)
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["from"] == "a"
    with pytest.raises(ValueError, match="files_from must be the base or one of the models"):
        merge_checkpoints("average", models, tmp_path / "out2", files_from=root / "e1", progress=False)


def test_the_written_config_says_the_dtype_of_the_written_tensors(checkpoints, tmp_path):
    """Without dtype= the merged tensors take the base's dtype; the config carried from another
    model (files_from, mergekit's linear with a base) said that model's, and from_pretrained, which
    loads by it, read float32 merged weights as bfloat16."""
    from safetensors import safe_open

    root, _, _ = checkpoints
    transformers.AutoModelForCausalLM.from_pretrained(root / "e1").to(torch.bfloat16).save_pretrained(tmp_path / "b")
    models = [root / "e0", tmp_path / "b"]
    out = merge_checkpoints("task_arithmetic", models, tmp_path / "out", base=root / "base",
                            files_from=tmp_path / "b", progress=False)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert transformers.AutoModelForCausalLM.from_pretrained(out).dtype == torch.float32
    out = merge_checkpoints("average", [tmp_path / "b", root / "e0"], tmp_path / "avg", progress=False)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # (the first model's)


def test_a_base_given_as_its_weights_file_still_gives_a_loadable_model(checkpoints, tmp_path):
    root, _, _ = checkpoints
    (tmp_path / "b").mkdir()
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    base.save_pretrained(tmp_path / "b")
    out = merge_checkpoints("task_arithmetic", [root / "e0", root / "e1"], tmp_path / "out",
                            base=tmp_path / "b" / "model.safetensors", progress=False)
    transformers.AutoModelForCausalLM.from_pretrained(out)
    (tmp_path / "b" / "config.json").unlink()
    with pytest.warns(UserWarning, match="no config.json beside it"):
        merge_checkpoints("task_arithmetic", [root / "e0", root / "e1"], tmp_path / "out2",
                          base=tmp_path / "b" / "model.safetensors", progress=False)


def test_cli_bad_values_are_errors_not_tracebacks(checkpoints, tmp_path, capsys):
    root, _, _ = checkpoints
    base = dict(method="task_arithmetic", base=str(root / "base"), models=[str(root / "e0"), str(root / "e1")])
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"\x00" * 4)
    cases = [
        (dict(params={"scale": "1e-1"}), "params.scale is the string '1e-1'"),
        (dict(params={"scale": [0.1]}), "scale must be a finite number"),
        (dict(method="ties", params={"density": "high"}), "density must be a finite number"),
        (dict(method="dare", params={"merge": "mean", "weights": [1.0, -1.0]}), "sum to 0"),
        (dict(params={"weights": [float("nan"), 1.0]}), "each weight must be a finite number"),
        (dict(method=["ties"]), "method must be a name"),
        (dict(params=[0.2]), "params must be a mapping"),
        (dict(models=[str(root / "e0"), str(tmp_path / "broken")]), "model 1 .*cannot read"),
        # RegMean's reading options checked as epmq quantize checks them
        (dict(method="regmean", calibration=["a.txt", "b.txt"], samples="4"), "samples must be an integer, got '4'"),
        (dict(method="regmean", calibration={"a": "a.txt", "b": "b.txt"}), "a list, one per model; got dict"),
    ]
    config = tmp_path / "m.yaml"
    for change, match in cases:
        config.write_text(yaml.safe_dump({**base, **change}))
        assert main(["merge", str(config), str(tmp_path / "x"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert re.search(match, err), (change, err)
        assert not (tmp_path / "x").exists()
    config.write_text(yaml.safe_dump(base))
    assert main(["merge", str(config), str(tmp_path / "x"), "--quiet", "--device", "meta"]) == 2
    assert "device='meta'" in capsys.readouterr().err
    (tmp_path / "a.txt").write_text("a file")
    assert main(["merge", str(config), str(tmp_path / "a.txt" / "x"), "--quiet"]) == 2
    assert "a.txt is a file, not a directory" in capsys.readouterr().err
    # a key given twice: YAML keeps the last one without a word
    config.write_text(yaml.safe_dump(base) + "params: {scale: 0.3}\nparams: {scale: 0.5}\n")
    assert main(["merge", str(config), str(tmp_path / "x"), "--quiet"]) == 2
    assert "'params' is given twice in one mapping" in capsys.readouterr().err


def test_clip_vision_experts_of_a_clip_base_then_e_pmq_on_the_tower(tmp_path):
    """The paper's CLIP setting: a ``CLIPModel`` base, ``CLIPVisionModel`` experts (saved by
    transformers 5 without the ``vision_model.`` prefix the base's names have), merged; then
    E-PMQ on the merged vision tower from per-task image folders."""
    from PIL import Image

    import epmq

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=16, patch_size=8)
    torch.manual_seed(0)
    base = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=16),
        vision_config=vision, projection_dim=16))
    base.save_pretrained(tmp_path / "base")
    transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
                                    ).save_pretrained(tmp_path / "base")
    tower = transformers.CLIPVisionModel.from_pretrained(tmp_path / "base").state_dict()
    experts, g = {}, torch.Generator().manual_seed(1)
    for task in ("cars", "dtd"):
        expert = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision))
        expert.load_state_dict({n: t + 0.05 * torch.randn(t.shape, generator=g) for n, t in tower.items()})
        expert.save_pretrained(tmp_path / task)
        experts[task] = tmp_path / task
        for i in range(4):
            (tmp_path / "images" / task).mkdir(parents=True, exist_ok=True)
            pixels = (torch.rand(18, 18, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / task / f"{i}.png")
    # a deeper tower than the base's (another configuration) is refused, as a deeper model is
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**dict(vision, num_hidden_layers=3))
                                 ).save_pretrained(tmp_path / "deeper")
    with pytest.raises(ValueError, match=r"counts its layers as \{'num_hidden_layers': 3\}, the base's "
                                         r"clip_vision_model tower as \{'num_hidden_layers': 2\}"):
        merge_checkpoints("task_arithmetic", [experts["cars"], tmp_path / "deeper"], tmp_path / "bad",
                          base=tmp_path / "base", params={"scale": 0.5}, progress=False)
    with pytest.warns(UserWarning, match="tensors of the base are in no or not every model"):
        merged = merge_checkpoints("task_arithmetic", list(experts.values()), tmp_path / "merged",
                                   base=tmp_path / "base", params={"scale": 0.5}, progress=False)
    got = transformers.CLIPModel.from_pretrained(merged).state_dict()
    base_sd = base.state_dict()
    expert_sds = [transformers.CLIPVisionModel.from_pretrained(p).state_dict() for p in experts.values()]
    name = "encoder.layers.1.mlp.fc1.weight"
    want = base_sd[f"vision_model.{name}"] + 0.5 * sum(e[name] - tower[name] for e in expert_sds)
    assert torch.equal(got[f"vision_model.{name}"], want)
    assert torch.equal(got["text_model.encoder.layers.0.mlp.fc1.weight"],
                       base_sd["text_model.encoder.layers.0.mlp.fc1.weight"])
    out = epmq.quantize_checkpoint(merged, tmp_path / "w4", spec=epmq.QuantSpec(bits=4, group_size=-1),
                                   method="epmq", tower="vision", experts=experts, anchor=0.1,
                                   calibration={t: tmp_path / "images" / t for t in experts},
                                   samples=4, batch_size=2, progress=False)
    loaded = epmq.load_quantized(out)
    report = json.loads((out / "epmq_report.json").read_text())
    assert type(loaded).__name__ == "CLIPVisionModel" and len(report["layers"]) == 12
    with torch.no_grad():
        assert torch.isfinite(loaded(pixel_values=torch.rand(1, 3, 16, 16)).pooler_output).all()


@pytest.mark.cuda
@pytest.mark.parametrize("method, params", [("ties", {"density": 0.3}), ("tsv", {}), ("dare", {"density": 0.5}),
                                           ("multislerp", {"weights": [1.0, 0.5, 2.0]})])
def test_merge_on_the_gpu_equals_the_cpu(checkpoints, tmp_path, method, params):
    root, _, _ = checkpoints
    models = [root / "e0", root / "e1", root / "e2"]
    cpu = _load(merge_checkpoints(method, models, tmp_path / "cpu", base=root / "base", params=params,
                                  progress=False))
    gpu = _load(merge_checkpoints(method, models, tmp_path / "gpu", base=root / "base", params=params,
                                  device="cuda", progress=False))
    for name in cpu:  # the same masks and votes; SVDs and sums differ in rounding only
        torch.testing.assert_close(gpu[name], cpu[name], atol=1e-5, rtol=1e-4)


def _regmean_sources(root, tmp_path):
    """Two expert directories with their config (the first with the base's tokenizer) and a
    text file of random words for each."""
    import shutil

    from epmq.benches.tiny import WORDS

    models = []
    for k in range(2):
        shutil.copytree(root / f"e{k}", tmp_path / f"m{k}")
        models.append(tmp_path / f"m{k}")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(root / "base" / f, models[0] / f)
    g = torch.Generator().manual_seed(0)
    texts = []
    for k in range(2):
        texts.append(tmp_path / f"t{k}.txt")
        texts[-1].write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (300,), generator=g)))
    return models, texts


def test_regmean_of_mllamas_language_models_is_not_refused_as_a_walk(tmp_path):
    """RegMean's Gram pass is one forward of each batch, not the quantizer's walk: Mllama's
    language models (MllamaForCausalLM experts) are merged, their cross-attention layers, which
    no text reaches, at the average (their Gram matrices are zero), as before the walk's refusal
    of them, which said to quantize the vision-language model."""
    from epmq.benches.tiny import WORDS

    config = transformers.MllamaTextConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                           num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1, 3],
                                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    g = torch.Generator().manual_seed(0)
    models, texts = [], []
    for k in range(2):
        torch.manual_seed(k)
        transformers.MllamaForCausalLM(config).save_pretrained(tmp_path / f"e{k}")
        models.append(tmp_path / f"e{k}")
        texts.append(tmp_path / f"t{k}.txt")
        texts[-1].write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (300,), generator=g)))
    word_tokenizer(models[0])
    out = merge_checkpoints("regmean", models, tmp_path / "out", calibration=[str(t) for t in texts],
                            params={"alpha": 0.9}, samples=4, seq_len=16, batch_size=2, progress=False)
    got, *experts = [transformers.MllamaForCausalLM.from_pretrained(p).state_dict() for p in (out, *models)]
    average = merge.average(experts)
    cross = "model.layers.1.cross_attn.q_proj.weight"
    torch.testing.assert_close(got[cross], average[cross], atol=1e-6, rtol=1e-6)
    assert not torch.equal(got["model.layers.0.mlp.up_proj.weight"], average["model.layers.0.mlp.up_proj.weight"])


def two_qwen3_moe_experts(tmp_path):
    """Two tiny Qwen3-MoE experts saved (a word tokenizer beside the first), each with a text of
    its own: (directories, texts, models)."""
    from epmq.benches.tiny import WORDS

    config = transformers.Qwen3MoeConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                                         num_experts_per_tok=2, moe_intermediate_size=16, pad_token_id=0)
    g = torch.Generator().manual_seed(0)
    models, texts, experts = [], [], []
    for k in range(2):
        torch.manual_seed(k)
        experts.append(transformers.Qwen3MoeForCausalLM(config))
        experts[-1].save_pretrained(tmp_path / f"e{k}")
        models.append(tmp_path / f"e{k}")
        texts.append(tmp_path / f"t{k}.txt")
        texts[-1].write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (300,), generator=g)))
    word_tokenizer(models[0])
    return models, texts, experts


def test_regmean_of_fused_experts_over_the_memory_budget_averages_them(tmp_path, monkeypatch):
    """One expert's Gram matrix of a fused parameter is held at once: a parameter whose single
    expert's passes epmq.merge_checkpoint.EXPERT_GRAM_BYTES is averaged, said with the size, and the
    other matrices merged by RegMean as before."""
    import epmq.merge_checkpoint

    models, texts, experts = two_qwen3_moe_experts(tmp_path)
    # (2 layers x 4 experts x (32^2 + 16^2) inputs' Gram matrices x 8 bytes)
    assert epmq.merge_checkpoint._fused_expert_gram_bytes(experts[0]) == 2 * 4 * (32 * 32 + 16 * 16) * 8
    monkeypatch.setattr(epmq.merge_checkpoint, "EXPERT_GRAM_BYTES", 32 * 32 * 8 - 1)  # (below a gate_up's expert)
    with pytest.warns(UserWarning, match=r"regmean: the Gram matrix of one expert of 2 of Qwen3MoeForCausalLM's "
                                         r"fused expert parameters would take up to 0\.0 GiB .*plain average"):
        merge_checkpoints("regmean", models, tmp_path / "out", calibration=[str(t) for t in texts],
                          samples=4, seq_len=16, batch_size=2, progress=False)
    got = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    name = "model.layers.0.mlp.experts.gate_up_proj"
    W_k = [e.state_dict()[name] for e in experts]
    torch.testing.assert_close(got[name], (W_k[0] + W_k[1]) / 2)
    for name in ("model.layers.1.mlp.experts.down_proj", "model.layers.0.self_attn.q_proj.weight"):  # (RegMean)
        assert not torch.allclose(got[name], (experts[0].state_dict()[name] + experts[1].state_dict()[name]) / 2)


@pytest.mark.parametrize("family", ["qwen3_moe", "dbrx"])
def test_regmean_of_fused_experts_over_the_memory_budget_is_warned_of_once(tmp_path, monkeypatch, family):
    """A fused parameter averaged because one expert's Gram matrix passes epmq.merge_checkpoint.
    EXPERT_GRAM_BYTES was warned of with its size, then a second time as a weight matrix 'no linear
    layer' (which it is not: its experts are called as linears); it is warned of once, with its
    size (DBRX's v1 with its w1, one stack), and no matrix is left for the other warning."""
    import epmq.merge_checkpoint

    models, texts, _ = (two_qwen3_moe_experts if family == "qwen3_moe" else two_dbrx_experts)(tmp_path)
    monkeypatch.setattr(epmq.merge_checkpoint, "EXPERT_GRAM_BYTES", 32 * 32 * 8 - 1)  # (below an expert of H inputs)
    caught = [str(w.message) for w in regmean_warnings(models, texts, tmp_path / "out")]
    assert len([m for m in caught if "would take up to" in m]) == 1, caught
    assert not [m for m in caught if "no linear layer" in m], caught


def recording_grams(monkeypatch) -> list:
    """Where the Gram matrices merge_checkpoints' RegMean collects go, a dict a gram_matrices call."""
    import epmq.stats

    seen, gram_matrices = [], epmq.stats.gram_matrices
    monkeypatch.setattr(epmq.stats, "gram_matrices", lambda *a, **kw: seen.append(gram_matrices(*a, **kw)) or seen[-1])
    return seen


def regmean_warnings(models, texts, out) -> list:
    """The warnings of RegMean of ``models`` calibrated on the ``texts`` files, written to ``out``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge_checkpoints("regmean", models, out, calibration=[str(t) for t in texts],
                          samples=4, seq_len=16, batch_size=2, progress=False)
    return caught


def test_regmean_of_fused_moe_experts_merges_each_expert(tmp_path, monkeypatch):
    """A Qwen3-MoE's experts, held fused in 3-D parameters by transformers 5, are merged by RegMean
    expert by expert, each on the Gram matrices of the tokens routed to it in each model, and its
    routers (weights applied by F.linear, no nn.Linear) on their inputs' (they were averaged)."""
    models, texts, experts = two_qwen3_moe_experts(tmp_path)
    seen = recording_grams(monkeypatch)
    caught = regmean_warnings(models, texts, tmp_path / "out")
    assert not [w for w in caught if "no linear layer" in str(w.message) or "no calibration token" in str(w.message)]
    got = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    # (RegMean of the experts' state dicts on the Gram matrices each model gave, per expert: test_merge's checks)
    want = merge.regmean([e.state_dict() for e in experts], {n: [grams[n] for grams in seen] for n in seen[0]
                                                                 if n in experts[0].state_dict()})
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
                 "model.layers.0.mlp.gate.weight"):
        W_k = [e.state_dict()[name] for e in experts]
        assert seen[0][name].shape == ((4,) if W_k[0].dim() == 3 else ()) + (W_k[0].shape[-1],) * 2
        torch.testing.assert_close(got[name], want[name].float(), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(got[name], (W_k[0] + W_k[1]) / 2, atol=1e-4)


def test_regmean_from_each_models_calibration_texts(checkpoints, tmp_path):
    """RegMean from the shell: each model's Gram matrices on its own task's texts (the
    tokenizer of whichever model directory has one), then the closed-form merge."""
    from epmq.calibration import read_texts, text_windows
    from epmq.stats import gram_matrices

    root, base, experts = checkpoints
    models, texts = _regmean_sources(root, tmp_path)
    options = dict(samples=4, seq_len=16, batch_size=2)
    out = merge_checkpoints("regmean", models, tmp_path / "out", calibration=[str(t) for t in texts],
                            params={"alpha": 0.9}, progress=False, **options)
    tok = transformers.AutoTokenizer.from_pretrained(root / "base")
    grams = []
    for k, path in enumerate(models):
        model = transformers.AutoModelForCausalLM.from_pretrained(path)
        grams.append(gram_matrices(model, text_windows(read_texts(texts[k]), tok, **options)))
    want = merge.regmean(experts[:2], {n: [G[n] for G in grams] for n in grams[0]}, alpha=0.9)
    got = _load(out)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-6)
    assert not torch.equal(got["model.layers.0.mlp.up_proj.weight"],
                           merge.average(experts[:2])["model.layers.0.mlp.up_proj.weight"])
    assert json.loads((out / RECIPE_FILE).read_text())["calibration"] == [str(t) for t in texts]


def test_regmeans_calibration_passes_show_their_progress(checkpoints, tmp_path, capsys):
    """RegMean's Gram passes (each model loaded and run on its calibration batches: minutes to
    hours a model at 7B) showed no progress: the merge's bar stood at its first tensor, its
    estimate taken from them; each model's pass has its bar of batches (none with progress off)."""
    root, base, experts = checkpoints
    models, texts = _regmean_sources(root, tmp_path)
    options = dict(calibration=[str(t) for t in texts], samples=4, seq_len=16, batch_size=2)
    merge_checkpoints("regmean", models, tmp_path / "out", progress=True, **options)
    err = capsys.readouterr().err
    for k in range(2):
        assert re.search(rf"regmean: model {k}'s Gram matrices:.*\b0/2 \[", err), err
    merge_checkpoints("regmean", models, tmp_path / "quiet", progress=False, **options)
    assert "Gram matrices" not in capsys.readouterr().err


@pytest.mark.parametrize("second, error", [("missing.txt", "no calibration file or directory at 1 path"),
                                           ("bad.jsonl", "expected a string, or an object")])
def test_a_later_models_calibration_files_are_read_before_the_first_models_pass(checkpoints, tmp_path,
                                                                                monkeypatch, second, error):
    """RegMean read each model's calibration files only when its turn came: a missing or
    unreadable file of the second model was found after the first model's whole Gram pass
    (hours at 7B); every model's are read before any pass, as epmq quantize reads its tasks'."""
    from epmq import stats

    root, base, experts = checkpoints
    models, texts = _regmean_sources(root, tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"foo": 1}\n')
    passes = []
    gram_matrices = stats.gram_matrices
    monkeypatch.setattr(stats, "gram_matrices",
                        lambda model, *a, **k: passes.append(1) or gram_matrices(model, *a, **k))
    with pytest.raises((ValueError, OSError), match=error):
        merge_checkpoints("regmean", models, tmp_path / "out", calibration=[str(texts[0]), str(tmp_path / second)],
                          samples=4, seq_len=16, batch_size=2, progress=False)
    assert passes == [], "the first model's Gram pass ran before the second model's files were read"
    assert not (tmp_path / "out").exists()


def test_every_models_missing_calibration_path_is_named_before_any_is_read(checkpoints, tmp_path, monkeypatch):
    """RegMean read each model's calibration files in turn: a misspelt path of the last model was
    refused once the files of those before it were read and tokenized, and a second typo only on
    the next run; every missing path is named at once, by its model, before any file is read."""
    import epmq.quantize_files

    root, base, experts = checkpoints
    models, texts = _regmean_sources(root, tmp_path)
    monkeypatch.setattr(epmq.quantize_files, "calibrated", lambda *a, **k: pytest.fail("the calibration was read"))
    with pytest.raises(ValueError) as raised:
        merge_checkpoints("regmean", models, tmp_path / "out",
                          calibration=[[str(texts[0]), str(tmp_path / "typo0.txt")], str(tmp_path / "typo1")],
                          samples=4, seq_len=16, batch_size=2, progress=False)
    message = str(raised.value)
    assert "typo0.txt (model 0)" in message and "typo1 (model 1)" in message, message
    assert str(texts[0]) not in message
    assert not (tmp_path / "out").exists()


def test_regmean_output_inside_a_models_calibration_directory_is_refused(checkpoints, tmp_path):
    """A RegMean output written inside a model's calibration directory (calibration=[data/, ...],
    out data/merged) was taken: its config.json, tokenizer and model card were then that model's
    documents, read by the same command again; refused before anything is read, as quantize's."""
    root, _, _ = checkpoints
    models, texts = _regmean_sources(root, tmp_path)
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    texts[0].rename(data / "t0.txt")
    for out in (data / "merged", data / "sub" / "merged"):
        with pytest.raises(ValueError, match=f"the output {re.escape(str(out))} is inside the calibration "
                                             f"directory {re.escape(str(data))} of model 0"):
            merge_checkpoints("regmean", models, out, calibration=[[texts[1], data], texts[1]],
                              samples=2, seq_len=16, progress=False)
    assert sorted(p.name for p in data.rglob("*")) == ["sub", "t0.txt"]


def assert_merged_inside_as_elsewhere(models, folders, tmp_path, cls, samples):
    """RegMean calibrated on ``folders`` writes into the first of them the merge it writes elsewhere."""
    options = dict(calibration=[str(f) for f in folders], samples=samples, batch_size=2, progress=False)
    elsewhere = merge_checkpoints("regmean", models, tmp_path / "out", **options)
    inside = merge_checkpoints("regmean", models, folders[0] / "merged", **options)
    want, got = [cls.from_pretrained(p).state_dict() for p in (elsewhere, inside)]
    assert want.keys() == got.keys() and all(torch.equal(got[n], want[n]) for n in want)


def test_regmean_output_inside_a_models_image_folder_is_taken(tmp_path):
    """The image reader takes none of the merged checkpoint's files (config.json,
    preprocessor_config.json, safetensors, model card): RegMean of vision towers may write its
    output inside a model's image folder, as quantize may (ea39033), and the next run reads the
    same images (an output inside a directory of texts is refused, as the test above checks)."""
    from PIL import Image

    from epmq.calibration import image_files

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  image_size=16, patch_size=8)
    g = torch.Generator().manual_seed(0)
    models, folders = [], []
    for k in range(2):
        torch.manual_seed(k)
        transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision)).save_pretrained(tmp_path / f"m{k}")
        models.append(tmp_path / f"m{k}")
        folders.append(tmp_path / f"images{k}")
        folders[-1].mkdir()
        for i in range(2):
            pixels = (torch.rand(18, 18, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folders[-1] / f"{i}.png")
    transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
                                    ).save_pretrained(models[0])
    assert_merged_inside_as_elsewhere(models, folders, tmp_path, transformers.CLIPVisionModel, samples=2)
    assert image_files(folders[0]) == sorted(folders[0].glob("*.png"))


def test_regmean_output_inside_a_models_audio_folder_is_taken(tmp_path):
    """RegMean of speech encoders (Wav2Vec2ForCTC) calibrated on folders of WAV files refused an
    output inside a model's folder, saying its files would be read as calibration documents: the
    audio reader takes .wav files alone (none of the merged checkpoint's), as quantize lets its
    output lie there; the merge is the one written elsewhere, and the next run reads the same clips."""
    from epmq.calibration import audio_files
    from test_quantize_files import _tiny_wav2vec2_ctc, _write_clips

    models, folders = [], []
    for k in range(2):
        _tiny_wav2vec2_ctc(k).save_pretrained(tmp_path / f"m{k}")
        models.append(tmp_path / f"m{k}")
        folders.append(tmp_path / f"audio{k}")
        _write_clips(folders[-1], (1600, 2400, 1200, 2000), 16000, seed=k)
    transformers.Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(models[0])
    assert_merged_inside_as_elsewhere(models, folders, tmp_path, transformers.Wav2Vec2ForCTC, samples=4)
    assert audio_files(folders[0]) == sorted(folders[0].glob("*.wav"))


def test_regmean_of_an_audio_encoder_decoder_is_refused_for_a_merge(tmp_path):
    """RegMean of Whisper encoder-decoders calibrated on WAV folders was refused with quantize's
    remedy ('quantize it with epmq.quantize_model ..., or with method: rtn'), which no merge has:
    refused as a merge, naming RegMean and what it needs (the decoder's transcripts), before any
    model is read."""
    from test_quantize_files import _write_clips

    config = transformers.WhisperConfig(
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=16, max_source_positions=20, max_target_positions=16,
        vocab_size=50, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    models = []
    for k in range(2):
        torch.manual_seed(k)
        transformers.WhisperForConditionalGeneration(config).save_pretrained(tmp_path / f"m{k}")
        models.append(tmp_path / f"m{k}")
    transformers.WhisperFeatureExtractor(feature_size=16, chunk_length=1, hop_length=400).save_pretrained(models[0])
    _write_clips(tmp_path / "audio", (8000, 12000), 16000, seed=0)
    with pytest.raises(ValueError) as refused:
        merge_checkpoints("regmean", models, tmp_path / "out", calibration=[str(tmp_path / "audio")] * 2,
                          samples=2, batch_size=2, progress=False)
    assert re.match(r"regmean: WhisperForConditionalGeneration \(model 0\) is an encoder-decoder whose decoder "
                    r"reads transcripts, which audio files do not hold", str(refused.value))
    assert "method: rtn" not in str(refused.value) and "quantize" not in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_regmeans_statistics_wait_on_disk_not_in_memory(checkpoints, tmp_path, monkeypatch):
    """Each model's Gram matrices are written out once computed and read back a weight at a
    time: held, they grew with layers times models (a 7B Llama's are 44 GB a model in float64).
    The files go with the output's temporary; the merge is the one of the matrices in memory."""
    from epmq.merge_checkpoint import _SpilledGrams

    root, base, experts = checkpoints
    models, texts = _regmean_sources(root, tmp_path)
    seen = {}
    regmean = merge.regmean

    def spying(sources, grams, **kwargs):
        if grams:
            seen["lazy"] = all(isinstance(g, _SpilledGrams) for g in grams.values())
            seen["files"] = sorted({f.name for g in grams.values() for parts in g.entries for f, _ in parts})
            seen["in_memory"] = {n: [G.clone() for G in g] for n, g in grams.items()}
        return regmean(sources, grams, **kwargs)

    monkeypatch.setattr(merge, "regmean", spying)
    out = merge_checkpoints("regmean", models, tmp_path / "out", calibration=[str(t) for t in texts],
                            progress=False, samples=4, seq_len=16, batch_size=2)
    assert seen["lazy"] and seen["files"] == ["grams-0.safetensors", "grams-1.safetensors"]
    assert not list(tmp_path.glob("**/.regmean-grams"))
    monkeypatch.setattr(merge, "regmean", regmean)
    want = merge.regmean(experts[:2], seen["in_memory"], alpha=0.9)
    got = _load(out)
    assert all(torch.equal(got[name], want[name].to(got[name].dtype)) for name in want)


@pytest.mark.parametrize("share", [3, None])
def test_regmeans_statistics_past_the_budget_are_collected_a_few_layers_a_pass(checkpoints, tmp_path, monkeypatch,
                                                                             share):
    """One model's Gram matrices were collected in one calibration pass, all held until it ended
    whatever their size (a 7B Llama's 44 GB in float64, a 70B's ~650 GB): past
    epmq.merge_checkpoint.GRAM_BYTES they are collected a few layers at a time, a pass each within
    it, and the merge is the one of a single pass (``share``: the budget a share of the matrices;
    None: below any, a matrix a pass, no pass of weights that have none: embeddings, a tied head)."""
    import epmq.merge_checkpoint

    root, _, _ = checkpoints
    models, texts = _regmean_sources(root, tmp_path)
    options = dict(calibration=[str(t) for t in texts], samples=4, seq_len=16, batch_size=2, progress=False)
    seen = recording_grams(monkeypatch)

    def held(grams):  # (bytes of the matrices a pass returns, one shared by q/k/v once)
        return sum({id(G): G.numel() * G.element_size() for G in grams.values()}.values())

    merge_checkpoints("regmean", models, tmp_path / "whole", **options)
    assert len(seen) == 2
    names, budget = set(seen[0]), held(seen[0]) // share if share else 1
    seen.clear()
    monkeypatch.setattr(epmq.merge_checkpoint, "GRAM_BYTES", budget, raising=False)
    merge_checkpoints("regmean", models, tmp_path / "out", **options)
    assert len(seen) > 2 and all(held(grams) <= max(budget, 8 * 48 ** 2) for grams in seen), [held(g) for g in seen]
    assert set().union(*seen[:len(seen) // 2]) == names  # (model 0's passes: every matrix of the single one)
    got, want = _load(tmp_path / "out"), _load(tmp_path / "whole")
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_regmeans_merge_holds_one_models_gram_matrix_of_a_weight_at_a_time(checkpoints, tmp_path, monkeypatch):
    """The merge read every model's spilled Gram matrix of a weight at once before solving it
    (K matrices of d_in^2 float64: a 70B Llama's down_proj 6.6 GB each, 52 GB for 8 models), where
    it sums them one at a time: each is read as it is summed, the others not held, the same merge."""
    import weakref

    from epmq.merge_checkpoint import _SpilledGrams

    root, _, _ = checkpoints
    models, texts = _regmean_sources(root, tmp_path)
    models.append(tmp_path / "m2")  # (a third model: the first two's matrices not both held)
    (tmp_path / "m2").mkdir()
    for f in (tmp_path / "m1").iterdir():
        (tmp_path / "m2" / f.name).write_bytes(f.read_bytes())
    texts.append(texts[0])
    options = dict(calibration=[str(t) for t in texts], samples=4, seq_len=16, batch_size=2, progress=False)
    merge_checkpoints("regmean", models, tmp_path / "whole", **options)
    alive, most, read = [], [0], _SpilledGrams.__getitem__

    def reading(self, k):
        G = read(self, k)
        alive.append(weakref.ref(G))
        most[0] = max(most[0], sum(ref() is not None for ref in alive))
        return G

    monkeypatch.setattr(_SpilledGrams, "__getitem__", reading)
    merge_checkpoints("regmean", models, tmp_path / "out", **options)
    assert alive and most[0] == 1, most
    got, want = _load(tmp_path / "out"), _load(tmp_path / "whole")
    assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize("family", ["llava", "clip"])
def test_regmean_of_a_model_of_texts_and_images_is_refused_as_a_merge(tmp_path, family):
    """RegMean of vision-language checkpoints (LLaVA) or two-tower ones (CLIPModel) was refused with
    epmq quantize's remedies ('tower: language quantizes its language model', 'quantize its vision
    tower (tower: vision ...)'), which no merge takes (epmq merge refuses a tower: key); refused as
    RegMean's, naming the model and what merges it, before any model is read."""
    from test_walker_towers import tiny_llava

    for k in range(2):
        if family == "llava":
            tiny_llava(k).save_pretrained(tmp_path / f"e{k}")
        else:
            torch.manual_seed(k)
            transformers.CLIPModel(transformers.CLIPConfig(
                text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=16),
                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   image_size=16, patch_size=8), projection_dim=16)).save_pretrained(tmp_path / f"e{k}")
        (tmp_path / f"t{k}.txt").write_text("a b c " * 50)
    with pytest.raises(ValueError, match=r"regmean: (Llava|CLIP)\w+ \(model 0\) takes both texts and images.*"
                                         r"epmq\.merge\.regmean.*gram_matrices") as refused:
        merge_checkpoints("regmean", [tmp_path / "e0", tmp_path / "e1"], tmp_path / "out",
                          calibration=[str(tmp_path / "t0.txt"), str(tmp_path / "t1.txt")], progress=False)
    assert "tower:" not in str(refused.value) and "epmq quantize" not in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_regmean_of_encoder_decoders_asks_the_model_for_its_decoder_start(tmp_path):
    """RegMean on input/target pairs: mBART (its config's decoder_start_token_id null, which its
    label shift never reads) is merged, not refused for what config.json says; a T5 without one,
    whose shift needs it, is named before its activations are collected."""
    from epmq.benches.tiny import t5_tokenizer

    size = dict(vocab_size=128, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                pad_token_id=0, eos_token_id=1, bos_token_id=2)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"input": f"a b {w}", "target": w}) + "\n" for w in "cdef"))
    for family in ("mbart", "t5"):
        models = []
        for k in range(2):
            torch.manual_seed(k)
            models.append(tmp_path / f"{family}{k}")
            if family == "mbart":
                model = transformers.MBartForConditionalGeneration(transformers.MBartConfig(**size))
            else:
                model = transformers.T5ForConditionalGeneration(transformers.T5Config(
                    vocab_size=128, d_model=8, d_kv=2, d_ff=16, num_layers=1, num_heads=4))
            model.save_pretrained(models[-1])
            t5_tokenizer(models[-1])
        options = dict(calibration=[str(pairs)] * 2, params={"alpha": 0.9}, progress=False, samples=2,
                       seq_len=16, batch_size=2)
        if family == "mbart":
            merge_checkpoints("regmean", models, tmp_path / "out", **options)
            assert (tmp_path / "out" / "config.json").is_file()
        else:
            with pytest.raises(ValueError, match="config.json has no decoder_start_token_id"):
                merge_checkpoints("regmean", models, tmp_path / "t5_out", **options)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_regmean_of_encoder_decoders_without_labels_is_refused_as_a_merge(tmp_path, family, headless_encoder_decoder):
    """T5Model and BartModel take no labels: the pairs' targets were dropped by their forward's **kwargs,
    T5Model's decoder then had no input (a failed pass, "You must specify exactly one of input_ids or
    inputs_embeds"), BartModel's Gram matrices were those of the inputs shifted, merged with nothing
    said. Refused as a merge, before any model is read."""
    from epmq.benches.tiny import t5_tokenizer

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"input": f"a b {w}", "target": w}) + "\n" for w in "cdef"))
    models = []
    for k in range(2):
        torch.manual_seed(k)
        models.append(tmp_path / f"{family}{k}")
        model = headless_encoder_decoder(family, vocab_size=128)
        model.save_pretrained(models[-1])
        t5_tokenizer(models[-1])
    with pytest.raises(ValueError) as refused:
        merge_checkpoints("regmean", models, tmp_path / "out", calibration=[str(pairs)] * 2, samples=2, seq_len=16,
                          batch_size=2, progress=False)
    assert re.match(rf"regmean: {type(model).__name__} \(model 0\)'s forward takes no labels, so the pairs' targets "
                    r"would not reach its decoder", str(refused.value))
    assert "method: rtn" not in str(refused.value) and "quantize" not in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_regmean_without_a_tokenizer_says_where_to_put_one(checkpoints, tmp_path):
    """Experts saved without their tokenizer (and RegMean takes no base): the error says which
    files to copy, and where."""
    root, _, _ = checkpoints
    models, texts = _regmean_sources(root, tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (models[0] / f).unlink()
    with pytest.raises(ValueError, match=r"copy the base model.s tokenizer "
                                         r"files \(tokenizer\.json.*into one of .*m0"):
        merge_checkpoints("regmean", models, tmp_path / "out", calibration=[str(t) for t in texts],
                          samples=4, seq_len=16, batch_size=2, progress=False)


def test_regmean_of_speech_encoders_without_a_feature_extractor_names_it(tmp_path):
    """Speech encoders (Wav2Vec2ForCTC) saved without their feature extractor: the error asked for
    'a tokenizer or image processor', neither of which reads WAV files; it names the feature
    extractor and its preprocessor_config.json."""
    from test_quantize_files import _tiny_wav2vec2_ctc, _write_clips

    models, folders = [], []
    for k in range(2):
        _tiny_wav2vec2_ctc(k).save_pretrained(tmp_path / f"m{k}")
        models.append(tmp_path / f"m{k}")
        folders.append(tmp_path / f"audio{k}")
        _write_clips(folders[-1], (1600, 2400), 16000, seed=k)
    with pytest.raises(ValueError, match=r"no model directory holds a feature extractor to prepare the "
                                         r"calibration audio with: copy the base model.s feature extractor "
                                         r"files \(preprocessor_config\.json.*into one of .*m0"):
        merge_checkpoints("regmean", models, tmp_path / "out", calibration=[str(f) for f in folders],
                          samples=2, batch_size=2, progress=False)


@pytest.mark.filterwarnings("ignore:.*is a weights file with no config.json")
def test_a_requested_dtype_takes_the_float32_arithmetic_not_the_bases_rounding(tmp_path):
    """bf16 checkpoints whose task vectors lie below bf16's precision, merged into float32: the
    result is the float32 arithmetic, not the base's dtype's rounding of it, and a value past
    fp16's range merges once float32 is asked for."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    W_0 = (1 + torch.rand(8, 16, generator=g)).to(torch.bfloat16)  # step 2^-7 near 1
    taus = [torch.randn(8, 16, generator=g) * 2e-3 for _ in range(2)]
    experts = [(W_0.float() + t).to(torch.bfloat16) for t in taus]
    for name, W in [("base", W_0), ("e0", experts[0]), ("e1", experts[1])]:
        save_file({"w": W}, tmp_path / f"{name}.safetensors")
    models = [tmp_path / "e0.safetensors", tmp_path / "e1.safetensors"]
    want = merge.task_arithmetic({"w": W_0.float()}, [{"w": e.float()} for e in experts], scale=0.3)["w"]
    out = merge_checkpoints("task_arithmetic", models, tmp_path / "f32", base=tmp_path / "base.safetensors",
                            dtype="float32", progress=False)
    from safetensors.torch import load_file
    got = load_file(out / "model.safetensors")["w"]
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert not torch.equal(want.to(torch.bfloat16).float(), want)  # (bf16 would have lost it)
    out = merge_checkpoints("task_arithmetic", models, tmp_path / "fp16", base=tmp_path / "base.safetensors",
                            dtype="float16", progress=False)
    assert torch.equal(load_file(out / "model.safetensors")["w"], want.half())  # one rounding
    # fp16 overflow: an error in the base's dtype, a result in float32
    big = {"w": torch.full((4,), 60000.0, dtype=torch.float16)}
    save_file(big, tmp_path / "big.safetensors")
    save_file({"w": big["w"] + 5000}, tmp_path / "big_e.safetensors")
    args = ("task_arithmetic", [tmp_path / "big_e.safetensors"])
    with pytest.raises(ValueError, match=r"not finite in torch.float16 \(the base's dtype\)"):
        merge_checkpoints(*args, tmp_path / "big16", base=tmp_path / "big.safetensors",
                          params={"scale": 2.0}, progress=False)
    out = merge_checkpoints(*args, tmp_path / "big32", base=tmp_path / "big.safetensors",
                            params={"scale": 2.0}, dtype="float32", progress=False)
    tau = (big["w"] + 5000).float() - 60000  # (65000 is 64992 in fp16)
    assert load_file(out / "model.safetensors")["w"].tolist() == (60000 + 2 * tau).tolist()


def test_float64_checkpoints_merge_in_float64(tmp_path, gen):
    """merge_checkpoints' docstring said the arithmetic is float32 whatever the dtype; float64
    checkpoints (as epmq.merge's float64 tensors) merge in float64: task vectors below float32's
    precision survive, the result equal to the in-memory merge's."""
    from safetensors.torch import load_file, save_file
    W_0 = 1 + torch.rand(8, 16, generator=gen, dtype=torch.float64)
    experts = [W_0 + 1e-9 * torch.randn(8, 16, generator=gen, dtype=torch.float64) for _ in range(2)]
    for name, W in [("base", W_0), ("e0", experts[0]), ("e1", experts[1])]:
        save_file({"w": W}, tmp_path / f"{name}.safetensors")
    out = merge_checkpoints("task_arithmetic", [tmp_path / "e0.safetensors", tmp_path / "e1.safetensors"],
                            tmp_path / "out", base=tmp_path / "base.safetensors", params={"scale": 0.5},
                            progress=False)
    got = load_file(out / "model.safetensors")["w"]
    want = merge.task_arithmetic({"w": W_0}, [{"w": e} for e in experts], scale=0.5)["w"]
    assert want.dtype == got.dtype == torch.float64 and torch.equal(got, want)
    assert not torch.equal(want.float().double(), want)  # (float32 arithmetic would have lost them)


def test_a_copied_tensor_the_requested_dtype_cannot_hold_is_refused(tmp_path):
    """dtype="float16" refused a merged tensor past fp16's range, but a tensor of the base the
    models lack (copied: a CLIPModel base's text tower) was cast by the writer and written as inf,
    in silence; it is refused as the merged ones are, naming it."""
    from safetensors.torch import load_file, save_file
    save_file({"w": torch.ones(4), "extra": torch.full((3,), 1e5)}, tmp_path / "base.safetensors")
    save_file({"w": torch.full((4,), 2.0)}, tmp_path / "e0.safetensors")
    args = ("task_arithmetic", [tmp_path / "e0.safetensors"])
    with pytest.warns(UserWarning, match="copied from the base"), \
            pytest.raises(ValueError, match=r"'extra' of the base \(copied.*not finite in torch.float16"):
        merge_checkpoints(*args, tmp_path / "f16", base=tmp_path / "base.safetensors", dtype="float16",
                          progress=False)
    assert not (tmp_path / "f16").exists()
    with pytest.warns(UserWarning, match="copied from the base"):
        out = merge_checkpoints(*args, tmp_path / "bf16", base=tmp_path / "base.safetensors", dtype="bfloat16",
                                progress=False)
    assert load_file(out / "model.safetensors")["extra"].tolist() == [99840.0] * 3  # (1e5 in bf16)


def test_checkpoint_forms_that_mislead_are_named(checkpoints, tmp_path, capsys):
    """The PyTorch tutorials' {"model_state_dict": ...} is read; a file with no tensors at its
    top level, a shard index listing a tensor its shard lacks and two copies of the model are
    errors naming the problem, from the API and the CLI alike."""
    import shutil

    from safetensors.torch import load_file, save_file

    root, base, experts = checkpoints
    torch.save({"epoch": 2, "model_state_dict": experts[0], "optimizer_state_dict": {}}, tmp_path / "tut.pt")
    out = merge_checkpoints("task_arithmetic", [tmp_path / "tut.pt", root / "e1"], tmp_path / "m",
                            base=root / "base", progress=False)
    want = merge.task_arithmetic(base, experts[:2])
    assert all(torch.equal(t, want[n]) for n, t in _load(out).items())
    torch.save({"epoch": 2, "weights": experts[0]}, tmp_path / "odd.pt")
    no_tensors = r"odd.pt holds no tensors at its top level \(its keys: \['epoch', 'weights'\]\)"
    with pytest.raises(ValueError, match=no_tensors):
        merge_checkpoints("task_arithmetic", [tmp_path / "odd.pt"], tmp_path / "m2", base=root / "base",
                          progress=False)
    # a stale index: a tensor listed in a shard that does not hold it, nor does any other
    shutil.copytree(root / "base", tmp_path / "stale")
    index_file = tmp_path / "stale" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name, shard = next(iter(index["weight_map"].items()))
    tensors = load_file(tmp_path / "stale" / shard)
    del tensors[name]
    save_file(tensors, tmp_path / "stale" / shard, metadata={"format": "pt"})
    index["weight_map"][name] = next(s for s in index["weight_map"].values() if s != shard)
    index_file.write_text(json.dumps(index))
    recipe = tmp_path / "stale.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(root / "base"),
                                      "models": [str(tmp_path / "stale"), str(root / "e1")]}))
    assert main(["merge", "--quiet", str(recipe), str(tmp_path / "m3")]) == 2
    err = capsys.readouterr().err
    assert f"lists tensor {name!r} in {index['weight_map'][name]}, which does not hold it" in err
    assert "Traceback" not in err and not (tmp_path / "m3").exists()
    # two copies: the weights and an EMA
    two = {**{f"model.{k}": v for k, v in experts[0].items()}, **{f"ema.{k}": v for k, v in base.items()}}
    torch.save({"state_dict": two}, tmp_path / "two.ckpt")
    with pytest.raises(ValueError, match=r"model 0 .* several copies \('.*' is both 'ema\..*' and 'model\."):
        merge_checkpoints("task_arithmetic", [tmp_path / "two.ckpt"], tmp_path / "m4", base=root / "base",
                          progress=False)


def test_a_model_pickled_whole_is_named(checkpoints, tmp_path, capsys):
    """A model saved whole, ``torch.save(model)`` (the task-vectors CLIP experts are pickled
    ImageEncoder modules): the refusal was torch's page on weights_only, telling the user to load the
    file with weights_only=False, which no epmq command can; it names the pickled class and what to
    save instead, from the API and the CLI alike."""
    root, base, experts = checkpoints
    whole = tiny_llama(0)
    whole.load_state_dict(experts[0])
    torch.save(whole, tmp_path / "whole.pt")
    said = (r"whole\.pt holds a pickled transformers\.models\.llama\.modeling_llama\.LlamaForCausalLM, not a "
            r"state dict: .*torch\.save\(model\.state_dict\(\), path\)")
    with pytest.raises(ValueError, match=said):
        merge_checkpoints("task_arithmetic", [tmp_path / "whole.pt"], tmp_path / "m", base=root / "base",
                          progress=False)
    recipe = tmp_path / "whole.yaml"
    recipe.write_text(yaml.safe_dump({"method": "task_arithmetic", "base": str(root / "base"),
                                      "models": [str(tmp_path / "whole.pt"), str(root / "e1")]}))
    assert main(["merge", "--quiet", str(recipe), str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err
    assert re.search(said, err) and "weights_only" not in err
    assert not (tmp_path / "m").exists() and not (tmp_path / "m2").exists()


def test_an_index_listing_a_tensor_in_another_shard_reads_it_from_the_shard_holding_it(checkpoints, tmp_path):
    """An index that lists a tensor in a shard without it, another shard holding it (a hub
    repository's index edited by hand, shards re-split): from_pretrained reads every shard's
    tensors, so the tensor is read from the shard holding it, with a warning naming it and both
    shards; held by two shards, which one is the tensor is unknown: refused naming both."""
    import shutil

    from safetensors.torch import load_file, save_file

    root, base, experts = checkpoints
    shutil.copytree(root / "base", tmp_path / "moved")
    index_file = tmp_path / "moved" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    name = "model.layers.1.mlp.up_proj.weight"
    held = index["weight_map"][name]
    listed = next(s for s in shards if s != held)
    index["weight_map"][name] = listed
    index_file.write_text(json.dumps(index))
    assert torch.equal(_load(tmp_path / "moved")[name], base[name])  # (as transformers reads it)
    with pytest.warns(UserWarning, match=rf"lists tensor {re.escape(repr(name))} in {listed}, which does not "
                                         rf"hold it: it is read from {held}, which does"):
        out = merge_checkpoints("task_arithmetic", [root / "e0", root / "e1"], tmp_path / "m", base=tmp_path / "moved",
                                progress=False)
    want = merge.task_arithmetic(base, experts[:2])
    assert all(torch.equal(t, want[n]) for n, t in _load(out).items())
    # a third shard holds it too: two copies, of which the index names neither
    other = next(s for s in shards if s not in (held, listed))
    tensors = load_file(tmp_path / "moved" / other)
    save_file({**tensors, name: torch.zeros_like(base[name])}, tmp_path / "moved" / other, metadata={"format": "pt"})
    first, second = sorted((held, other))
    with pytest.raises(ValueError, match=rf"lists tensor {re.escape(repr(name))} in {listed}, which does not hold "
                                         rf"it, and both {first} and {second} do"):
        merge_checkpoints("task_arithmetic", [root / "e0", root / "e1"], tmp_path / "m2", base=tmp_path / "moved",
                          progress=False)
    assert not (tmp_path / "m2").exists()
    del index["weight_map"][name]  # (listed nowhere, held twice)
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"does not list tensor {re.escape(repr(name))}, and both {first} and "
                                         rf"{second} do"):
        merge_checkpoints("task_arithmetic", [root / "e0", root / "e1"], tmp_path / "m2", base=tmp_path / "moved",
                          progress=False)


def test_identical_copies_of_a_tensor_the_index_does_not_list_where_they_are_are_read(checkpoints, tmp_path):
    """Two shards holding identical copies of a tensor the index lists nowhere, or in a third shard
    without it, were refused as if either might be the tensor, though a listed tensor's identical copy
    is read as listed: from_pretrained loads the same tensor either way, so it is read (from the last
    shard, as from_pretrained reads it; warned of where the index names a shard without it); copies
    that differ are still refused, saying so."""
    import shutil

    from safetensors.torch import load_file, save_file

    root, base, experts = checkpoints
    shutil.copytree(root / "base", tmp_path / "twice")
    index_file = tmp_path / "twice" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    held = index["weight_map"][name]
    listed, other = [s for s in sorted(set(index["weight_map"].values())) if s != held][:2]

    def copy_into_other(tensor):
        tensors = load_file(root / "base" / other)
        save_file({**tensors, name: tensor}, tmp_path / "twice" / other, metadata={"format": "pt"})

    copy_into_other(base[name].clone())
    want = merge.task_arithmetic(base, experts[:2])
    del index["weight_map"][name]
    index_file.write_text(json.dumps(index))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = merge_checkpoints("task_arithmetic", [root / "e0", root / "e1"], tmp_path / "m", base=tmp_path / "twice",
                                progress=False)
    assert all(torch.equal(t, want[n]) for n, t in _load(out).items())
    index["weight_map"][name] = listed
    index_file.write_text(json.dumps(index))
    last = max(held, other)
    with pytest.warns(UserWarning, match=rf"lists tensor {re.escape(repr(name))} in {listed}, which does not "
                                         rf"hold it: it is read from {last}, which does"):
        out = merge_checkpoints("task_arithmetic", [root / "e0", root / "e1"], tmp_path / "m2",
                                base=tmp_path / "twice", progress=False)
    assert all(torch.equal(t, want[n]) for n, t in _load(out).items())
    copy_into_other(base[name] + 1)
    first = min(held, other)
    with pytest.raises(ValueError, match=rf"lists tensor {re.escape(repr(name))} in {listed}, which does not hold "
                                         rf"it, and both {first} and {last} do, with copies that differ "
                                         rf"\(from_pretrained reads {last}'s"):
        merge_checkpoints("task_arithmetic", [root / "e0", root / "e1"], tmp_path / "m3", base=tmp_path / "twice",
                          progress=False)


def test_a_listed_tensor_another_shard_holds_a_differing_copy_of_is_refused(checkpoints, tmp_path):
    """An index listing a tensor in a shard that holds it while another shard holds a copy too (shards
    re-split by hand, a tensor appended to the wrong one): from_pretrained reads every shard in name
    order, the last copy winning, whichever the index lists; the listed copy was merged in silence,
    another tensor than the checkpoint loads. Copies that differ are refused naming both shards; an
    identical copy is the same tensor either way, merged as listed."""
    import shutil

    from safetensors.torch import load_file, save_file

    root, base, experts = checkpoints
    shutil.copytree(root / "base", tmp_path / "twice")
    index = json.loads((tmp_path / "twice" / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    listed = index["weight_map"][name]
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != listed)

    def copy_into_other(tensor):
        tensors = load_file(root / "base" / other)
        save_file({**tensors, name: tensor}, tmp_path / "twice" / other, metadata={"format": "pt"})

    copy_into_other(base[name].clone())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = merge_checkpoints("task_arithmetic", [root / "e0", root / "e1"], tmp_path / "m", base=tmp_path / "twice",
                                progress=False)
    want = merge.task_arithmetic(base, experts[:2])
    assert all(torch.equal(t, want[n]) for n, t in _load(out).items())
    copy_into_other(base[name] + 1)
    last = max(listed, other)
    assert torch.equal(_load(tmp_path / "twice")[name], base[name] + (1 if last == other else 0))
    with pytest.raises(ValueError, match=rf"lists tensor {re.escape(repr(name))} in {listed}, and {other} holds "
                                         rf"another copy of it that differs \(from_pretrained reads {last}'s"):
        merge_checkpoints("task_arithmetic", [root / "e0", root / "e1"], tmp_path / "m2", base=tmp_path / "twice",
                          progress=False)
    assert not (tmp_path / "m2").exists()


def test_a_tied_head_the_bases_raw_state_dict_stores_takes_the_merged_embeddings(tmp_path):
    """A tied base saved by torch.save(model.state_dict()) (lm_head beside the embeddings),
    experts by save_pretrained (the embeddings alone): the head is the merged embeddings, not the
    base's, so transformers ties the loaded model's as it was."""
    import shutil

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    base = transformers.LlamaForCausalLM(config)
    base.save_pretrained(tmp_path / "hf_base")
    (tmp_path / "base").mkdir()
    torch.save(base.state_dict(), tmp_path / "base" / "pytorch_model.bin")
    shutil.copy(tmp_path / "hf_base" / "config.json", tmp_path / "base")
    noise = torch.Generator().manual_seed(1)
    experts = []
    for k in range(2):
        expert = perturb(base, noise, scale=0.05)
        expert.save_pretrained(tmp_path / f"e{k}")
        experts.append(expert.state_dict())
    out = merge_checkpoints("task_arithmetic", [tmp_path / "e0", tmp_path / "e1"], tmp_path / "out",
                            base=tmp_path / "base", progress=False)
    name = "model.embed_tokens.weight"
    want = merge.task_arithmetic(base.state_dict(), experts)[name]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.model.embed_tokens.weight, want) and torch.equal(model.lm_head.weight, want)
    # and the file holds the head too (the base's names, for loaders that do not tie it), merged
    from safetensors.torch import load_file

    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(base.state_dict()) and torch.equal(written["lm_head.weight"], want)


def test_models_that_would_lose_the_others_updates_are_refused(checkpoints, tmp_path):
    """A model of the base's own architecture (its config.json says so) without a matrix the
    others have, one of fewer layers, or a quantized one: their tensors used to be copied from
    the base, dropping every model's update of them, with only a warning."""
    from safetensors.torch import save_file

    root, base, experts = checkpoints
    config = (root / "e0" / "config.json").read_text()
    (tmp_path / "partial").mkdir()
    save_file({n: t.contiguous() for n, t in experts[1].items() if n != "model.layers.1.mlp.up_proj.weight"},
              str(tmp_path / "partial" / "model.safetensors"))
    (tmp_path / "partial" / "config.json").write_text(config)
    shallow = tiny_llama(3)
    shallow.model.layers = shallow.model.layers[:1]
    shallow.config.num_hidden_layers = 1
    shallow.save_pretrained(tmp_path / "shallow")
    (tmp_path / "quantized").mkdir()
    for name in ("model.safetensors", "config.json"):
        (tmp_path / "quantized" / name).write_bytes((root / "e0" / name).read_bytes())
    (tmp_path / "quantized" / "quantize_config.json").write_text(json.dumps({"bits": 4, "quant_method": "gptq"}))
    for model, match in [("partial", r"lacks 1 tensors .*up_proj.*partial checkpoint"),
                         ("shallow", r"counts its layers as \{'num_hidden_layers': 1\}, the base as "
                                     r"\{'num_hidden_layers': 2\}"),
                         ("quantized", "is a quantized checkpoint")]:
        with pytest.raises(ValueError, match=match):
            merge_checkpoints("task_arithmetic", [root / "e0", tmp_path / model], tmp_path / "out",
                              base=root / "base", progress=False)
        assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"counts its layers as \{'num_hidden_layers': 2\}, the first model as"):
        merge_checkpoints("average", [tmp_path / "shallow", root / "e0"], tmp_path / "out", progress=False)


def test_buffers_older_writers_saved_and_layer_counts_one_config_leaves_out(checkpoints, tmp_path):
    """A model without a buffer older transformers saved (an int64 position_ids), a config that
    spells out a layer count another leaves to its default: merged, not refused."""
    from safetensors.torch import save_file

    root, base, experts = checkpoints
    config = json.loads((root / "e0" / "config.json").read_text())
    for name, state in (("base_old", base), ("e_old", experts[0])):
        (tmp_path / name).mkdir()
        save_file({**{n: t.contiguous() for n, t in state.items()},
                   "model.position_ids": torch.arange(8)[None]}, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    (tmp_path / "e_new").mkdir()
    save_file({n: t.contiguous() for n, t in experts[1].items()}, str(tmp_path / "e_new" / "model.safetensors"))
    (tmp_path / "e_new" / "config.json").write_text(json.dumps(dict(config, num_layers=2)))
    out = merge_checkpoints("task_arithmetic", [tmp_path / "e_old", tmp_path / "e_new"], tmp_path / "out",
                            base=tmp_path / "base_old", params={"scale": 0.5}, progress=False)
    want = merge.task_arithmetic(base, experts[:2], scale=0.5)
    got = _load(out)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_the_recipe_records_the_dtype_and_how_regmean_read_its_data(checkpoints, tmp_path):
    """The recipe is what made the checkpoint: the requested dtype, and for RegMean the
    calibration files and how they were read (samples, seq_len, seed)."""
    root, _, _ = checkpoints
    out = merge_checkpoints("task_arithmetic", [root / "e0", root / "e1"], tmp_path / "bf16", base=root / "base",
                            dtype="bfloat16", progress=False)
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["dtype"] == "bfloat16" and recipe["base"] == str(root / "base")
    assert "calibration" not in recipe
    models, texts = _regmean_sources(root, tmp_path)
    out = merge_checkpoints("regmean", models, tmp_path / "rm", calibration=[str(t) for t in texts],
                            samples=3, seq_len=12, batch_size=2, seed=5, progress=False)
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["method"] == "regmean" and recipe["base"] is None and recipe["dtype"] is None
    assert (recipe["samples"], recipe["seq_len"], recipe["seed"]) == (3, 12, 5)


def test_the_base_tokenizers_named_chat_templates_come_along(checkpoints, tmp_path):
    """transformers saves a tokenizer's named chat templates but the default in
    additional_chat_templates/: the merge has them all (it had the default alone); no other
    folder of the base is copied."""
    root, base, experts = checkpoints
    source = tmp_path / "base"
    source.mkdir()
    for entry in root.joinpath("base").iterdir():
        (source / entry.name).write_bytes(entry.read_bytes())
    tok = transformers.AutoTokenizer.from_pretrained(source)
    tok.chat_template = {"default": "{{ messages[0]['content'] }}", "tool_use": "{{ tools }}"}
    tok.save_pretrained(source)
    (source / "original").mkdir()
    (source / "original" / "consolidated.00.pth").write_bytes(b"another copy of the weights")
    out = merge_checkpoints("task_arithmetic", [root / "e0", root / "e1"], tmp_path / "out", base=source,
                            progress=False)
    assert sorted(transformers.AutoTokenizer.from_pretrained(out).chat_template) == ["default", "tool_use"]
    assert not (out / "original").exists()


def test_a_tensor_every_model_stores_twice_is_merged_once(tmp_path):
    """Raw torch.save checkpoints of a tied model list the head and the embeddings apart: the
    merge writes one value under both (DARE's masks, drawn per name, gave two, and transformers
    then left the model untied)."""
    from safetensors.torch import load_file

    for k, (name, noise) in enumerate([("base", 0.0), ("e0", 0.05), ("e1", 0.05)]):
        model = tied_llama(noise, k)
        model.config.save_pretrained(tmp_path / name)
        torch.save(model.state_dict(), tmp_path / name / "pytorch_model.bin")
    out = merge_checkpoints("dare", [tmp_path / "e0", tmp_path / "e1"], tmp_path / "out", base=tmp_path / "base",
                            params={"density": 0.5}, progress=False)
    written = load_file(str(out / "model.safetensors"))
    assert torch.equal(written["lm_head.weight"], written["model.embed_tokens.weight"])
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_a_tied_copy_only_the_base_stores_takes_the_merged_value_whatever_its_name(tmp_path):
    """The base's safetensors store the head beside the embeddings (``lm_head`` sorts first),
    the experts (save_pretrained) only the embeddings: the head is written with the merged
    embeddings, not copied from the base."""
    from safetensors.torch import load_file, save_file

    base = tied_llama(0.0, 0)
    base.config.save_pretrained(tmp_path / "base")
    save_file({k: v.clone().contiguous() for k, v in base.state_dict().items()},
              str(tmp_path / "base" / "model.safetensors"), metadata={"format": "pt"})
    for k in range(2):
        tied_llama(0.05, k + 1).save_pretrained(tmp_path / f"e{k}")
    out = merge_checkpoints("task_arithmetic", [tmp_path / "e0", tmp_path / "e1"], tmp_path / "out",
                            base=tmp_path / "base", params={"scale": 0.5}, progress=False)
    written = load_file(str(out / "model.safetensors"))
    assert torch.equal(written["lm_head.weight"], written["model.embed_tokens.weight"])
    assert not torch.equal(written["lm_head.weight"], base.lm_head.weight)


def test_an_untied_model_keeps_every_tensor_its_own(tmp_path):
    """tie_word_embeddings=False turns off every tie transformers makes by default, not only the
    head's: BERT's decoder bias, equal to the prediction bias in the base (both zero), gets its
    own merge, not the other's."""
    from safetensors.torch import load_file

    config = transformers.BertConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, tie_word_embeddings=False)
    for name, noise in [("base", 0.0), ("e0", 0.05), ("e1", 0.05)]:
        torch.manual_seed(0)
        model = transformers.BertForPreTraining(config)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * torch.randn_like(p))
        model.save_pretrained(tmp_path / name)
    out = merge_checkpoints("task_arithmetic", [tmp_path / "e0", tmp_path / "e1"], tmp_path / "out",
                            base=tmp_path / "base", params={"scale": 0.5}, progress=False)
    written = load_file(str(out / "model.safetensors"))
    base, e0, e1 = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("base", "e0", "e1"))
    key = "cls.predictions.decoder.bias"
    torch.testing.assert_close(written[key], base[key] + 0.5 * ((e0[key] - base[key]) + (e1[key] - base[key])))


@pytest.mark.filterwarnings("ignore:.*is a weights file with no config.json")
@pytest.mark.parametrize("suffix", ["_scale_inv", "_scale"])
def test_an_fp8_model_with_its_scales_beside_is_refused_without_a_config(tmp_path, suffix):
    """Fine-grained FP8 (``weight_scale_inv``) or compressed-tensors (``weight_scale``) weights
    with no config.json to say so: the float8 values were merged as the weights, silently."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    W_0 = torch.randn(8, 16, generator=g)
    save_file({"w": W_0}, tmp_path / "base.safetensors")
    W = W_0 + 0.01 * torch.randn(8, 16, generator=g)
    scale = W.abs().max() / 448
    save_file({"w": (W / scale).to(torch.float8_e4m3fn), f"w{suffix}": scale.reshape(1, 1)},
              tmp_path / "e0.safetensors")
    with pytest.raises(ValueError, match=rf"tensor 'w' is stored as torch.float8_e4m3fn with its scales in "
                                         rf"'w{suffix}': a quantized checkpoint"):
        merge_checkpoints("task_arithmetic", [tmp_path / "e0.safetensors"], tmp_path / "out",
                          base=tmp_path / "base.safetensors", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.filterwarnings("ignore:.*is a weights file with no config.json")
@pytest.mark.parametrize("layout", ["nf4", "int8"])
def test_a_bitsandbytes_model_is_refused_without_a_config(tmp_path, layout):
    """A model saved quantized by bitsandbytes with no config.json to say so: a 4-bit one (two codes
    a byte) was refused as 'model 0 ... has shape (64, 1), expected (8, 16)', an int8 one as an
    integer checkpoint; both are refused naming the tensor of bitsandbytes' state beside the weight."""
    from safetensors.torch import save_file
    save_file({"l.weight": torch.randn(8, 16)}, tmp_path / "base.safetensors")
    if layout == "int8":
        state = {"l.weight": torch.randint(-127, 128, (8, 16), dtype=torch.int8), "l.SCB": torch.rand(8)}
        beside = "l.SCB"
    else:
        state = {"l.weight": torch.randint(0, 256, (64, 1), dtype=torch.uint8), "l.weight.absmax": torch.rand(2),
                 "l.weight.quant_map": torch.rand(16)}
        beside = "l.weight.absmax"
    save_file(state, tmp_path / "e0.safetensors")
    with pytest.raises(ValueError, match=rf"tensor 'l.weight' is stored as torch.u?int8 with bitsandbytes' "
                                         rf"quantization state in '{beside}': a quantized checkpoint"):
        merge_checkpoints("task_arithmetic", [tmp_path / "e0.safetensors"], tmp_path / "out",
                          base=tmp_path / "base.safetensors", progress=False)
    assert not (tmp_path / "out").exists()


def _tiny_causal_lm(family, tie, seed, noise=0.0):
    """A tiny Llama or Qwen2 (one layer), its weights moved by ``noise``."""
    torch.manual_seed(0)  # (one base, of which the others are fine-tunes)
    cls, config = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
                   "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config)}[family]
    model = cls(config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if not tie:  # (an untied copy of the tied base: its head starts as the embeddings)
            model.lm_head.weight.copy_(model.get_input_embeddings().weight)
        for p in model.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
    return model


def _untied_state(model):
    """The model's tensors, a tied head as a tensor of its own (the model untied)."""
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_experts_with_trained_heads_untie_a_tied_base(family, tmp_path):
    """A base with tied word embeddings, experts with trained heads: an untied fine-tune and a
    LoRA adapter with ``modules_to_save: [lm_head]`` (beside a tied expert, whose head is its
    embeddings). The experts' heads were dropped with a warning (the base's tied head kept);
    the merge is now untied, as PEFT's merge_and_unload unties a trained head: its head the
    merge of the experts' heads, exactly the merge of the untied models, DARE's masks too."""
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    base = _tiny_causal_lm(family, True, 0)
    base.save_pretrained(tmp_path / "base")
    untied = _tiny_causal_lm(family, False, 1, noise=0.05)
    untied.save_pretrained(tmp_path / "untied")
    tied = _tiny_causal_lm(family, True, 2, noise=0.05)
    tied.save_pretrained(tmp_path / "tied")
    wrapped = peft.get_peft_model(type(base).from_pretrained(tmp_path / "base"), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    wrapped.save_pretrained(tmp_path / "adapter")
    lora = wrapped.merge_and_unload()  # (PEFT's own: untied, the trained head its own)
    assert not lora.config.tie_word_embeddings
    experts = [_untied_state(m) for m in (untied, lora, tied)]
    models = [tmp_path / "untied", tmp_path / "adapter", tmp_path / "tied"]
    for method, params in [("task_arithmetic", {"scale": 0.7}), ("dare", {"density": 0.5, "seed": 4})]:
        out = merge_checkpoints(method, models, tmp_path / method, base=tmp_path / "base", params=params,
                                progress=False)
        want = getattr(merge, method)(_untied_state(base), experts, **params)
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
        written = load_file(str(out / "model.safetensors"))
        assert set(written) == set(want)
        assert all(torch.equal(written[n], want[n]) for n in want), method
        model = transformers.AutoModelForCausalLM.from_pretrained(out)
        assert torch.equal(model.lm_head.weight, want["lm_head.weight"])
        assert torch.equal(model.get_input_embeddings().weight, want["model.embed_tokens.weight"])
    # without a base: the first model's tied head is its embeddings, the second's its own
    out = merge_checkpoints("average", [tmp_path / "tied", tmp_path / "untied"], tmp_path / "avg", progress=False)
    want = merge.average([experts[2], experts[0]])
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(want) and all(torch.equal(written[n], want[n]) for n in want)
    assert not transformers.AutoConfig.from_pretrained(out).tie_word_embeddings
    # the first model an adapter with its own head (its config is its tied base's)
    out = merge_checkpoints("average", [tmp_path / "adapter", tmp_path / "tied"], tmp_path / "avg-lora",
                            lora_base=tmp_path / "base", progress=False)
    want = merge.average([experts[1], experts[2]])
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(want) and all(torch.equal(written[n], want[n]) for n in want)
    assert not transformers.AutoConfig.from_pretrained(out).tie_word_embeddings
    # experts whose heads are their embeddings leave the merge tied, as it was
    out = merge_checkpoints("task_arithmetic", [tmp_path / "tied"], tmp_path / "still", base=tmp_path / "base",
                            progress=False)
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    assert transformers.AutoConfig.from_pretrained(out).tie_word_embeddings


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_tied_expert_beside_an_untied_base_has_its_embeddings_as_its_head(family, tmp_path):
    """A tied expert (no lm_head stored, tie_word_embeddings: true) beside an untied base was
    refused as "a partial checkpoint?" (or, with no other model holding a head, the base's head
    copied unchanged): its head is its embeddings, as from_pretrained loads it."""
    from safetensors.torch import load_file

    base = _tiny_causal_lm(family, False, 0, noise=0.05)
    base.save_pretrained(tmp_path / "base")
    tied = _tiny_causal_lm(family, True, 1, noise=0.05)
    tied.save_pretrained(tmp_path / "tied")
    untied = _tiny_causal_lm(family, False, 2, noise=0.05)
    untied.save_pretrained(tmp_path / "untied")
    assert "lm_head.weight" not in load_file(str(tmp_path / "tied" / "model.safetensors"))
    for names in (["tied", "untied"], ["tied"]):
        out = merge_checkpoints("task_arithmetic", [tmp_path / n for n in names],
                                tmp_path / ("out-" + "-".join(names)), base=tmp_path / "base", progress=False)
        want = merge.task_arithmetic(_untied_state(base), [_untied_state({"tied": tied, "untied": untied}[n])
                                                          for n in names])
        written = load_file(str(out / "model.safetensors"))
        assert set(written) == set(want) and all(torch.equal(written[n], want[n]) for n in want)
    out = merge_checkpoints("average", [tmp_path / "untied", tmp_path / "tied"], tmp_path / "avg", progress=False)
    want = merge.average([_untied_state(untied), _untied_state(tied)])
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(want) and all(torch.equal(written[n], want[n]) for n in want)


def test_a_model_that_cannot_be_untied_is_refused(tmp_path, monkeypatch):
    """Where the config written cannot untie the head (the model ties it whatever
    tie_word_embeddings says), the experts' own heads are refused by name, not dropped."""
    from epmq import merge_checkpoint

    _tiny_causal_lm("llama", True, 0).save_pretrained(tmp_path / "base")
    _tiny_causal_lm("llama", False, 1, noise=0.05).save_pretrained(tmp_path / "untied")
    monkeypatch.setattr(merge_checkpoint, "_untied", lambda config: config)  # (still tied)
    with pytest.raises(ValueError, match=r"model 0 .* holds its own \['lm_head.weight'\], which the reference ties "
                                         r"to \['model.embed_tokens.weight'\].*cannot keep them apart"):
        merge_checkpoints("task_arithmetic", [tmp_path / "untied"], tmp_path / "out", base=tmp_path / "base",
                          progress=False)
    assert not (tmp_path / "out").exists()


def test_global_ties_learns_the_bases_sizes_without_reading_it(checkpoints, tmp_path, monkeypatch):
    """The global threshold streams each task vector twice (2 reads of each base tensor per
    expert) and the merge one more; two further whole reads of the base, for each tensor's dtype
    and size, came on top: a 70B base read twice for its header's worth."""
    from collections import Counter
    from pathlib import Path

    from epmq.checkpoint_io import CheckpointReader

    root, _, _ = checkpoints
    reads, get = Counter(), CheckpointReader.get

    def counted(self, key, *args, **kwargs):
        if Path(self.path).resolve() == (root / "base").resolve():
            reads[key] += 1
        return get(self, key, *args, **kwargs)

    monkeypatch.setattr(CheckpointReader, "get", counted)
    merge_checkpoints("ties", [root / "e0", root / "e1"], tmp_path / "out", base=root / "base",
                      params={"density": 0.3, "scope": "global"}, progress=False)
    assert reads and max(reads.values()) <= 2 * 2 + 1, reads.most_common(3)


def test_flan_t5_checkpoints_whose_head_is_stored_apart_merge_untied(tmp_path):
    """FLAN-T5 as transformers 4.x wrote it (the hub's): lm_head.weight stored beside
    shared.weight with values of its own, tie_word_embeddings: false. transformers 5 builds T5
    tied whatever the config says, but from_pretrained leaves two stored tensors that differ
    untied; the untie check took the experts' heads for trained heads over a tied base and
    refused every FLAN-T5 merge ("cannot keep them apart"). Each tensor merges on its own, as
    before."""
    from safetensors.torch import load_file, save_file

    def flan(name, seed, noise):
        torch.manual_seed(0)
        model = transformers.T5ForConditionalGeneration(transformers.T5Config(
            vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0))
        state = {k: v.clone() for k, v in model.state_dict().items() if "embed_tokens" not in k}
        state["lm_head.weight"] = torch.randn(64, 16, generator=torch.Generator().manual_seed(9))
        g = torch.Generator().manual_seed(seed)
        state = {k: v + noise * torch.randn(v.shape, generator=g) for k, v in state.items()}
        (tmp_path / name).mkdir()
        save_file(state, str(tmp_path / name / "model.safetensors"), metadata={"format": "pt"})
        config = dict(model.config.to_dict(), tie_word_embeddings=False, architectures=[type(model).__name__])
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        return state

    base, experts = flan("base", 0, 0.0), [flan(f"e{k}", k + 1, 0.05) for k in range(2)]
    out = merge_checkpoints("task_arithmetic", [tmp_path / "e0", tmp_path / "e1"], tmp_path / "out",
                            base=tmp_path / "base", params={"scale": 0.5}, progress=False)
    want = merge.task_arithmetic(base, experts, scale=0.5)
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(want) and all(torch.equal(written[n], want[n]) for n in want)
    out = merge_checkpoints("average", [tmp_path / "e0", tmp_path / "e1"], tmp_path / "avg", progress=False)
    want = merge.average(experts)
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(want) and all(torch.equal(written[n], want[n]) for n in want)
    # LoRA adapters on that base, merged without one (the first adapter the reference)
    peft = pytest.importorskip("peft")
    adapters, merged = [], []
    for k in range(2):
        wrapped = peft.get_peft_model(transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "base"),
                                      peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"]))
        with torch.no_grad():
            for name, p in wrapped.named_parameters():
                if "lora_B" in name:
                    p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(k)))
        wrapped.save_pretrained(tmp_path / f"a{k}")
        adapters.append(tmp_path / f"a{k}")
        merged.append({n: t.detach().clone() for n, t in wrapped.merge_and_unload().state_dict().items()})
    out = merge_checkpoints("average", adapters, tmp_path / "avg-lora", lora_base=tmp_path / "base", progress=False)
    want = merge.average(merged)
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(base) and all(torch.equal(written[n], want[n]) for n in written)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64, torch.complex64])
def test_global_ties_of_a_base_with_a_tensor_of_a_rarer_dtype(tmp_path, dtype):
    """Global TIES learns each base tensor's dtype from the safetensors header, whose dtype
    names were looked up in a table without U16/U32/U64/C64: a base holding such a tensor (an
    index buffer, complex rotary frequencies) failed with KeyError('U32'), where reading the
    tensor (as before) merged it, the tensor copied from the base."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    other = torch.arange(6).to(dtype)
    for name, noise in (("base", 0.0), ("e0", 0.1), ("e1", 0.1)):
        (tmp_path / name).mkdir()
        save_file({"w": 1 + noise * torch.randn(6, 6, generator=g), "other": other},
                  str(tmp_path / name / "model.safetensors"))
    out = merge_checkpoints("ties", [tmp_path / "e0", tmp_path / "e1"], tmp_path / "out", base=tmp_path / "base",
                            params={"density": 0.5, "scope": "global"}, progress=False)
    written = load_file(str(out / "model.safetensors"))
    assert written["other"].dtype == dtype and torch.equal(written["other"], other)


def test_the_models_argument_of_karcher_is_no_parameter():
    """params: {models: ...} for karcher passed check_merge_params (its list of models is named
    models, not experts): epmq merge ended in a TypeError traceback ("got multiple values for
    argument 'models'"), the pipeline's MergePlan too."""
    from epmq.merge_checkpoint import check_merge_params

    for method in ("karcher", "average", "ties", "slerp", "regmean"):
        with pytest.raises(ValueError, match=r"unknown parameters \['(models|experts)'\]"):
            check_merge_params(method, {"models" if method == "karcher" else "experts": ["a", "b"]})
    check_merge_params("karcher", {"max_iter": 5, "tol": 1e-6})


@pytest.mark.parametrize("method, switch", [("model_stock", "per_row"), ("slerp", "per_row"),
                                            ("nuslerp", "row_wise"), ("nuslerp", "flatten"),
                                            ("multislerp", "normalize_weights")])
def test_a_switch_written_as_a_string_is_an_error(method, switch):
    """(params: {per_row: "false"} is a true string: Model Stock merged per row, silently, the
    opposite of what the config says; the run's MergePlan took it too.)"""
    from epmq.merge_checkpoint import check_merge_params
    from epmq.pipeline import MERGE_METHODS, MergePlan

    for value in ("false", "no", 0, None):
        with pytest.raises(ValueError, match=f"params.{switch} must be true or false"):
            check_merge_params(method, {switch: value})
    if method in MERGE_METHODS:
        with pytest.raises(ValueError, match=f"params.{switch} must be true or false"):
            MergePlan(method, params={switch: "false"})
    check_merge_params(method, {switch: False})
    check_merge_params(method, {switch: True})


def test_a_users_model_card_is_left_as_it_is_without_a_warning(checkpoints, tmp_path):
    """A README.md the user wrote over epmq's card is theirs: the next merge into the directory
    writes no card of its own (which carry-over would then warn of replacing)."""
    import warnings

    root, _, _ = checkpoints
    out = tmp_path / "m"
    merge_checkpoints("average", [root / "e0", root / "e1"], out, progress=False)
    assert "epmq" in (out / "README.md").read_text()
    (out / "README.md").write_text("mine")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        merge_checkpoints("average", [root / "e0", root / "e1"], out, progress=False)
    assert (out / "README.md").read_text() == "mine"
    assert not [w for w in record if "README" in str(w.message)], [str(w.message) for w in record]


def test_a_towers_vocab_size_is_set_to_the_vocabulary_s_rows(tmp_path):
    """A vision-language model keeps its vocabulary size in its text config: the laid-out
    vocabulary's rows are written there too (where a config holds it), not only at the top."""
    from types import SimpleNamespace

    from epmq.merge_checkpoint import _write_vocabulary

    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llava", "text_config": {"vocab_size": 10}, "vision_config": {"hidden_size": 4}}))
    tokenizer = SimpleNamespace(chat_template=None, save_pretrained=lambda target: None)
    _write_vocabulary(SimpleNamespace(tokenizer=tokenizer, rows=16), tmp_path, None)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == 16 and "vocab_size" not in config
    assert "vocab_size" not in config["vision_config"]


def test_a_merges_dtype_is_written_under_both_names_a_config_uses(tmp_path):
    """A config of transformers 4 names the dtype ``torch_dtype`` (which transformers 4 loads
    by): a merge written in another dtype sets it too, not ``dtype`` alone beside a stale one."""
    from epmq.merge_checkpoint import _copy_companions

    (tmp_path / "src").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float32"}))
    _copy_companions(tmp_path / "src", tmp_path / "out", "bfloat16")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"


def test_companion_files_are_read_and_written_as_utf8_whatever_the_locale(checkpoints, tmp_path, monkeypatch):
    """config.json and tokenizer_config.json are UTF-8 (transformers writes labels and chat templates
    unescaped); the merge rewrote them read with the locale's encoding: under cp1252 (Windows) a
    label 'café' came out 'cafÃ©' where dtype was set, silently."""
    import io

    root, base, experts = checkpoints
    source = tmp_path / "base"
    source.mkdir()
    for entry in root.joinpath("base").iterdir():
        (source / entry.name).write_bytes(entry.read_bytes())
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config["id2label"], config["label2id"] = {"0": "café", "1": "日本"}, {"café": 0, "日本": 1}
    (source / "config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    real_open = open

    def cp1252_open(file, mode="r", buffering=-1, encoding=None, *args, **kwargs):  # open() under a cp1252 locale
        if "b" not in mode and encoding in (None, "locale"):  # (pathlib passes "locale")
            encoding = "cp1252"
        return real_open(file, mode, buffering, encoding, *args, **kwargs)

    monkeypatch.setattr("builtins.open", cp1252_open)
    monkeypatch.setattr(io, "open", cp1252_open)
    try:
        out = merge_checkpoints("task_arithmetic", [root / "e0", root / "e1"], tmp_path / "out", base=source,
                                dtype="bfloat16", progress=False)
    except UnicodeError:
        out = None
    monkeypatch.undo()
    assert out is not None, "the merge failed to read or write a UTF-8 file"
    written = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert written["id2label"] == {"0": "café", "1": "日本"} and written["dtype"] == "bfloat16"


@pytest.mark.parametrize("held_transposed, files_from", [("base", None), ("e0", None), ("e0", "e0")])
def test_fused_experts_one_model_holds_transposed_merge_in_the_layout_of_the_written_config(
        tmp_path, held_transposed, files_from):
    """Qwen3-VL-MoE's hub checkpoints (and experts fine-tuned with transformers 4) hold the fused
    experts transposed, ``experts.gate_up_proj [E, H, 2I]``, which its conversion mapping
    transposes on loading; transformers 5 saves them as its model holds them, ``[E, 2I, H]``.
    transformers loads both, but their merge was refused ("tensor '...experts.down_proj': model 0
    has shape (4, 32, 8), expected (4, 8, 32)"). Each model is read in the layout of the checkpoint
    whose config the output carries, and the output is written in it: the merge of the models as
    transformers loads them."""
    from safetensors.torch import load_file, save_file
    from test_adapters import _qwen3_vl_moe

    torch.manual_seed(0)
    base = _qwen3_vl_moe()
    base.save_pretrained(tmp_path / "base")
    noise, experts = torch.Generator().manual_seed(1), []
    for k in range(2):
        expert = perturb(base, noise, scale=0.05)
        expert.save_pretrained(tmp_path / f"e{k}")
        experts.append(expert.state_dict())
    fused = ("experts.gate_up_proj", "experts.down_proj")
    held = tmp_path / held_transposed  # (as transformers 4 saved it)
    weights = load_file(held / "model.safetensors")
    save_file({k: t.transpose(1, 2).contiguous() if k.endswith(fused) else t for k, t in weights.items()},
              held / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((held / "config.json").read_text())
    (held / "config.json").write_text(json.dumps(dict(config, transformers_version="4.57.1")))
    out = merge_checkpoints("task_arithmetic", [tmp_path / "e0", tmp_path / "e1"], tmp_path / "out",
                            base=tmp_path / "base", files_from=None if files_from is None else tmp_path / files_from,
                            progress=False)
    written = tmp_path / (files_from or "base")
    saved, layout = load_file(out / "model.safetensors"), load_file(written / "model.safetensors")
    assert {k: t.shape for k, t in saved.items()} == {k: t.shape for k, t in layout.items()}
    assert json.loads((out / "config.json").read_text())["transformers_version"] == \
        json.loads((written / "config.json").read_text())["transformers_version"]
    want = merge.task_arithmetic(base.state_dict(), experts)
    got = type(base).from_pretrained(out).state_dict()
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_numpys_numbers_are_recorded_in_the_recipe_as_numbers(checkpoints, tmp_path):
    """A sweep's parameters read from numpy arrays (check_number takes them) were written into
    epmq_merge.json by str(), as strings ("scale": "0.25", "seed": "3"), which the same recipe
    given again refuses ('params.scale is the string ...'); written as the numbers they are."""
    import numpy as np

    root, base, experts = checkpoints
    params = dict(scale=np.float32(0.25), density=np.float64(0.5), seed=np.int64(3),
                  weights=[np.float32(1), np.int32(2)])
    out = merge_checkpoints("dare", [root / "e0", root / "e1"], tmp_path / "out", base=root / "base",
                            params=params, progress=False)
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["params"] == dict(scale=0.25, density=0.5, seed=3, weights=[1.0, 2])
    want = merge.dare(base, experts[:2], **params)
    got = _load(out)
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_numpy_arrays_of_weights_are_recorded_in_the_recipe_as_lists(checkpoints, tmp_path):
    """A sweep's weights given as the numpy array they were read as (np.array([1.0, 2.0]), which
    the merge takes as it takes a list) were merged and then ended the run as 'can only convert
    an array of size 1 to a Python scalar' while the recipe was written (acf6bcb's .item() of
    any numpy value), the merge lost; written as the list of numbers it is."""
    import numpy as np

    root, base, experts = checkpoints
    out = merge_checkpoints("task_arithmetic", [root / "e0", root / "e1"], tmp_path / "out", base=root / "base",
                            params=dict(scale=np.float32(0.5), weights=np.array([1.0, 2.0], dtype=np.float32)),
                            progress=False)
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["params"] == dict(scale=0.5, weights=[1.0, 2.0])
    want = merge.task_arithmetic(base, experts[:2], scale=0.5, weights=[1.0, 2.0])
    got = _load(out)
    assert all(torch.equal(got[name], want[name]) for name in want)


@pytest.mark.parametrize("content", [b"", b'{"version": "1.0", "model": {"vocab": {"a": '])
def test_a_base_whose_tokenizer_file_is_cut_is_refused_before_the_merge(checkpoints, tmp_path, content):
    """A base whose tokenizer.json is 0 bytes or cut (an interrupted copy or download) was
    merged in silence and the broken file copied into the output, which then failed to load
    its tokenizer; refused before the merge, naming the file."""
    import shutil

    root, _, _ = checkpoints
    base = tmp_path / "base"
    shutil.copytree(root / "base", base)
    (base / "tokenizer.json").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(base / "tokenizer.json")) + " is (empty|not valid JSON)"):
        merge_checkpoints("ties", [root / "e0", root / "e1"], tmp_path / "out", base=base,
                          params={"density": 0.5}, progress=False)
    assert not (tmp_path / "out").exists()


def test_regmean_of_an_expert_no_model_routes_a_token_to_is_averaged_and_said(tmp_path, monkeypatch):
    """transformers 5 saves a Qwen3-MoE's experts one matrix per expert (experts.3.gate_proj.weight),
    which merge_checkpoints merges by their own Gram matrices: an expert no model's router gave a
    calibration token was averaged in silence there (the README says it is warned of); a warning
    names its matrices and says they are averaged."""
    import epmq.stats

    models, texts, experts = two_qwen3_moe_experts(tmp_path)
    gram_matrices = epmq.stats.gram_matrices

    def never_3(*args, **kwargs):  # (as a router that never picks expert 3 of layer 0 would give them)
        grams = gram_matrices(*args, **kwargs)
        for param in ("gate_up_proj", "down_proj"):
            grams[f"model.layers.0.mlp.experts.{param}"][3].zero_()  # (the per-expert entries view it)
        return grams

    monkeypatch.setattr(epmq.stats, "gram_matrices", never_3)
    unreached = r"model\.layers\.0\.mlp\.experts\.3\.(gate|up|down)_proj\.weight"
    with pytest.warns(UserWarning, match=rf"regmean: 3 weights had no calibration input in any model .*{unreached}"
                                         r".*plain average"):
        merge_checkpoints("regmean", models, tmp_path / "out", calibration=[str(t) for t in texts],
                          samples=4, seq_len=16, batch_size=2, progress=False)
    got = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    name = "model.layers.0.mlp.experts.gate_up_proj"
    W_k = [e.state_dict()[name] for e in experts]
    torch.testing.assert_close(got[name][3], (W_k[0][3] + W_k[1][3]) / 2)
    assert not torch.allclose(got[name][2], (W_k[0][2] + W_k[1][2]) / 2, atol=1e-4)


def two_dbrx_experts(tmp_path):
    """Two tiny DBRX experts saved (a word tokenizer beside the first), each with a text of its own:
    (directories, texts, models)."""
    from epmq.benches.tiny import WORDS

    config = transformers.DbrxConfig(vocab_size=128, d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
                                     attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
                                     ffn_config=dict(ffn_hidden_size=16, moe_num_experts=4, moe_top_k=2),
                                     pad_token_id=0)
    g = torch.Generator().manual_seed(0)
    models, texts, experts = [], [], []
    for k in range(2):
        torch.manual_seed(k)
        experts.append(transformers.DbrxForCausalLM(config).eval())
        experts[-1].save_pretrained(tmp_path / f"e{k}")
        models.append(tmp_path / f"e{k}")
        texts.append(tmp_path / f"t{k}.txt")
        texts[-1].write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (300,), generator=g)))
    word_tokenizer(models[0])
    return models, texts, experts


def test_regmean_of_dbrx_checkpoints_merges_each_expert(tmp_path, monkeypatch):
    """DBRX's checkpoints hold its experts as three [E * I, H] matrices (ffn.experts.mlp.w1, v1, w2),
    which merge_checkpoints averaged, warned as matrices of no linear layer; each expert's rows are
    merged by RegMean on the Gram matrix of the tokens routed to it (w2's as [in, out])."""
    import epmq.merge_checkpoint

    models, texts, experts = two_dbrx_experts(tmp_path)
    # (2 layers x 4 experts x (32^2, w1's and v1's one, + 16^2) x 8 bytes: within the budget, counted)
    assert epmq.merge_checkpoint._fused_expert_gram_bytes(experts[0]) == 2 * 4 * (32 * 32 + 16 * 16) * 8
    seen = recording_grams(monkeypatch)
    caught = regmean_warnings(models, texts, tmp_path / "out")
    assert not [w for w in caught if "no linear layer" in str(w.message)]
    got = transformers.DbrxForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    want = merge.regmean([e.state_dict() for e in experts], {n: [grams[n] for grams in seen] for n in seen[0]
                                                                 if n in experts[0].state_dict()},
                         transposed=merge.conv1d_weights(experts[0]))
    for name in ("transformer.blocks.0.ffn.experts.mlp.w1", "transformer.blocks.1.ffn.experts.mlp.w2"):
        W_k = [e.state_dict()[name] for e in experts]
        assert seen[0][name].shape[0] == 4
        torch.testing.assert_close(got[name], want[name].float(), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(got[name], (W_k[0] + W_k[1]) / 2, atol=1e-4)


def spilled_reads(monkeypatch) -> list:
    """The shapes of the tensors merge_checkpoints' RegMean reads back from its spilled Gram matrices."""
    import safetensors

    shapes, safe_open = [], safetensors.safe_open

    class Recorded:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, key):
            shapes.append(tuple((t := self.f.get_tensor(key)).shape))
            return t

        def get_slice(self, key):
            whole = self.f.get_slice(key)

            class Slice:
                get_shape = whole.get_shape

                def __getitem__(self, index):
                    shapes.append(tuple((t := whole[index]).shape))
                    return t

            return Slice()

    monkeypatch.setattr(safetensors, "safe_open", lambda file, *args, **kwargs: (
        Recorded(safe_open(file, *args, **kwargs)) if ".regmean-grams" in str(file) else
        safe_open(file, *args, **kwargs)))
    return shapes


def test_regmean_of_fused_experts_reads_one_experts_gram_matrix_at_a_time(tmp_path, monkeypatch):
    """The merge of a checkpoint's fused experts (DBRX's [E * I, H], gpt-oss's [E, H, 2I]) read each
    model's Gram matrices of the weight whole from the spill, [E, in, in], all models' held at once
    (gpt-oss-120b's: 8.5 GB a model in float64) to solve one expert at a time: each expert's are read
    as it is solved, [in, in], and the merge is the same."""
    models, texts, experts = two_dbrx_experts(tmp_path)
    seen = recording_grams(monkeypatch)
    shapes = spilled_reads(monkeypatch)
    regmean_warnings(models, texts, tmp_path / "out")
    assert shapes and all(len(shape) == 2 for shape in shapes)
    assert shapes.count((16, 16)) == 2 * 2 * 4  # (w2's: 2 models x 2 layers x 4 experts, once each)
    got = transformers.DbrxForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    want = merge.regmean([e.state_dict() for e in experts], {n: [grams[n] for grams in seen] for n in seen[0]
                                                                 if n in experts[0].state_dict()},
                         transposed=merge.conv1d_weights(experts[0]))
    for name in ("transformer.blocks.0.ffn.experts.mlp.w1", "transformer.blocks.1.ffn.experts.mlp.w2"):
        torch.testing.assert_close(got[name], want[name].float(), atol=1e-5, rtol=1e-4)


def test_regmean_of_fused_experts_over_the_memory_budget_collects_them_a_few_at_a_time(tmp_path, monkeypatch):
    """Over epmq.merge_checkpoint.EXPERT_GRAM_BYTES one model's per-expert Gram matrices were not
    collected at all, and every expert averaged (Mixtral-8x7B's ~450 GB against 32 GiB): they are
    collected a few fused parameters at a time, one calibration pass each within the budget, spilled
    between, and the experts merged by RegMean as with the budget unbounded."""
    import epmq.merge_checkpoint
    import epmq.stats

    models, texts, experts = two_qwen3_moe_experts(tmp_path)
    seen = recording_grams(monkeypatch)
    merge_checkpoints("regmean", models, tmp_path / "whole", calibration=[str(t) for t in texts],
                      samples=4, seq_len=16, batch_size=2, progress=False)
    assert len(seen) == 2
    seen.clear()
    # (one layer's experts: 4 x (32^2 + 16^2) x 8 bytes; the model's are twice that)
    monkeypatch.setattr(epmq.merge_checkpoint, "EXPERT_GRAM_BYTES", 4 * (32 * 32 + 16 * 16) * 8)
    caught = regmean_warnings(models, texts, tmp_path / "out")
    assert not [w for w in caught if "plain average" in str(w.message)]
    assert len(seen) == 2 * 2  # (per model: layer 0's experts with the other matrices, then layer 1's)
    assert all(sum(G.numel() * 8 for n, G in grams.items() if G.dim() == 3) <= 4 * (32 * 32 + 16 * 16) * 8
               for grams in seen)
    got, want = (transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / d).state_dict() for d in ("out", "whole"))
    assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize("family", ["qwen3_moe", "dbrx"])
def test_regmean_of_a_fused_parameter_over_the_memory_budget_alone_collects_a_few_experts_at_a_time(
        family, tmp_path, monkeypatch):
    """A fused parameter whose Gram matrices, one per expert, alone passed epmq.merge_checkpoint.
    EXPERT_GRAM_BYTES (a DeepSeek-V3 layer's gate_up_proj, 256 experts of 7168 inputs: 105 GB) was
    averaged, every expert of it, whatever memory a few of them take: they are collected a few
    experts at a time, a calibration pass each within the budget, and merged by RegMean as with the
    budget unbounded (Qwen3-MoE's checkpoints hold a matrix per expert, DBRX's fused ones)."""
    import epmq.merge_checkpoint

    models, texts, experts = (two_qwen3_moe_experts if family == "qwen3_moe" else two_dbrx_experts)(tmp_path)
    cls = type(experts[0])
    seen = recording_grams(monkeypatch)
    merge_checkpoints("regmean", models, tmp_path / "whole", calibration=[str(t) for t in texts],
                      samples=4, seq_len=16, batch_size=2, progress=False)
    seen.clear()
    budget = 3 * 32 * 32 * 8  # (3 of a gate_up_proj's or w1's 4 experts; a down_proj's or w2's 4 x 16^2 x 8 within it)
    monkeypatch.setattr(epmq.merge_checkpoint, "EXPERT_GRAM_BYTES", budget)
    caught = regmean_warnings(models, texts, tmp_path / "out")
    assert not [w for w in caught if "plain average" in str(w.message)]
    # (DBRX's w1 and v1 one stack)
    assert all(sum({id(G): G.numel() * 8 for G in grams.values() if G.dim() == 3}.values()) <= budget for grams in seen)
    # (per model 2 x 4 x (32^2 + 16^2) x 8 bytes, in 4 passes filled in order, the first with the other matrices:
    # gate_up_proj 0's experts 0-2; its expert 3, down_proj 0, gate_up_proj 1's expert 0; its 1-3; down_proj 1)
    assert len(seen) == 2 * 4
    stacks = [G.shape[0] for grams in seen for n, G in grams.items() if n.endswith(("gate_up_proj", "mlp.w1"))]
    assert stacks == [3, 1, 1, 3] * 2
    got, want = (cls.from_pretrained(tmp_path / d).state_dict() for d in ("out", "whole"))
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_fused_expert_parameters_are_collected_in_chunks_within_the_budget():
    """The fused parameters whose Gram matrices are collected in one pass, each with the range of its
    experts there: each chunk within the budget, filled in order (a parameter over what is left of
    one goes on in the next: as few passes as the budget allows), DBRX's v1 with its w1 (one stack,
    counted under w1), a parameter whose single expert's matrix passes the budget (with its v1) in none."""
    from epmq.merge_checkpoint import _chunks

    # ({name: (experts, inputs)}: an expert's matrix inputs^2 x 8 bytes, 32 of a.gate_up_proj's)
    shapes = {"a.gate_up_proj": (5, 2), "a.down_proj": (2, 2), "b.mlp.w1": (3, 1), "b.mlp.v1": (3, 0),
              "b.mlp.w2": (3, 4)}
    w1 = range(0, 3)
    assert _chunks(shapes, 64) == [{"a.gate_up_proj": range(0, 2)}, {"a.gate_up_proj": range(2, 4)},
                                   {"a.gate_up_proj": range(4, 5), "a.down_proj": range(0, 1)},
                                   {"a.down_proj": range(1, 2), "b.mlp.w1": w1, "b.mlp.v1": w1}]
    assert _chunks(shapes, 1000) == [{"a.gate_up_proj": range(0, 5), "a.down_proj": range(0, 2), "b.mlp.w1": w1,
                                      "b.mlp.v1": w1, "b.mlp.w2": w1}]


def test_jetmoes_experts_count_in_the_gram_budget():
    """JetMoE holds its attention's and MLP's experts each as one weight [E, out, in], which RegMean's
    passes call one linear per expert (a Gram matrix per expert, ~55 GB a model for JetMoE-8B's), but
    epmq.merge_checkpoint.EXPERT_GRAM_BYTES counted none of them: they were collected whole whatever
    the budget; each counts, and is collected in the chunk that holds it."""
    from epmq.merge_checkpoint import _fused_expert_gram_sizes
    from epmq.stats import gram_matrices

    model = transformers.JetMoeForCausalLM(transformers.JetMoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, kv_channels=8, num_local_experts=4, pad_token_id=0, bos_token_id=0,
        eos_token_id=1)).eval()
    sizes = _fused_expert_gram_sizes(model)
    grams = gram_matrices(model, [{"input_ids": torch.randint(0, 64, (2, 7))}])
    stacks = {n: G.numel() * 8 for n, G in grams.items() if G.dim() == 3}
    assert sizes == stacks and len(sizes) == 2 * 4
    name = "model.layers.1.mlp.output_linear.weight"
    assert list(gram_matrices(model, [{"input_ids": torch.randint(0, 64, (2, 7))}], names={name})) == [name]


def test_experts_in_the_legacy_torch_format_merge_as_the_zip_format_does(checkpoints, tmp_path):
    """``.bin`` experts written before torch 1.6 (``_use_new_zipfile_serialization=False``), bare
    and wrapped (``{"state_dict": ...}``, a tied head sharing the embeddings' storage, a view into
    a larger storage), merge into the tensors the same experts in the zip format give."""
    root, base, experts = checkpoints
    for k, expert in enumerate(experts):
        state = dict(expert)
        if k == 1:  # (a view of another storage: the tensor at an offset into it)
            name = "model.layers.0.mlp.up_proj.weight"
            whole = torch.cat([torch.zeros(7), state[name].reshape(-1)])
            state[name] = whole[7:].view_as(state[name])
        for kind, zipped in (("zip", True), ("legacy", False)):
            (tmp_path / kind / f"e{k}").mkdir(parents=True)
            torch.save({"state_dict": state, "epoch": 3} if k == 2 else state,
                       tmp_path / kind / f"e{k}" / "pytorch_model.bin", _use_new_zipfile_serialization=zipped)
    outputs = {}
    for kind in ("zip", "legacy"):
        out = merge_checkpoints("ties", [str(tmp_path / kind / f"e{k}") for k in range(3)], tmp_path / f"out_{kind}",
                                base=str(root / "base"), params={"density": 0.3}, progress=False)
        outputs[kind] = _load(out)
    for name, t in outputs["zip"].items():
        assert torch.equal(outputs["legacy"][name], t), name


def test_experts_in_the_legacy_torch_format_are_not_held_whole_during_a_merge(tmp_path):
    """In a process of its own, RssAnon as each merged tensor is written: three experts of 64 MB
    in the legacy torch format (which torch.load cannot memory-map) were each read whole and held
    to the end of the merge; read tensor by tensor from the file, the merge holds less than one
    expert, as it does with the same experts in the zip format."""
    import os
    import subprocess

    from safetensors.torch import save_file

    noise = torch.Generator().manual_seed(0)
    base = {f"w{i}": torch.randn(512, 256, generator=noise) for i in range(128)}
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    for k in range(3):
        (tmp_path / f"e{k}").mkdir()
        torch.save({n: t + 0.01 * torch.randn(t.shape, generator=noise) for n, t in base.items()},
                   tmp_path / f"e{k}" / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    expert_bytes = sum(t.numel() * t.element_size() for t in base.values())
    code = f"""if True:
        import json, epmq, epmq.checkpoint

        def anonymous():
            return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                        if line.startswith("RssAnon"))

        seen, write = [], epmq.checkpoint.ShardWriter.__setitem__

        def record(self, name, t):
            seen.append(anonymous())
            return write(self, name, t)

        epmq.checkpoint.ShardWriter.__setitem__ = record
        before = anonymous()
        epmq.merge_checkpoints("task_arithmetic", [{str(tmp_path)!r} + f"/e{{k}}" for k in range(3)],
                               {str(tmp_path / "out")!r}, base={str(tmp_path / "base")!r}, max_shard_size="8MB",
                               progress=False)
        print(json.dumps({{"grown": max(seen) - before}}))"""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    grown = json.loads(done.stdout.splitlines()[-1])["grown"]
    assert grown < expert_bytes, (grown, expert_bytes)


@pytest.mark.parametrize("base_naming", ["saved", "in_memory"])
def test_llava_checkpoints_in_either_naming_are_merged_together(tmp_path, base_naming):
    """LLaVA's checkpoints are on the hub in two namings: transformers' save_pretrained writes
    ``language_model.model.*`` (pre-4.52 and 5.x), transformers 4.52-4.57 wrote its modules' own,
    ``model.language_model.*``; from_pretrained loads both. A merge of the two namings merges
    every tensor, as the models load."""
    from safetensors.torch import save_file
    from test_walker_towers import tiny_llava

    def save(model, directory, in_memory):
        if not in_memory:
            return model.save_pretrained(directory)
        directory.mkdir()
        model.config.architectures = [type(model).__name__]  # (as save_pretrained writes it)
        model.config.save_pretrained(directory)
        save_file({n: t.contiguous() for n, t in model.state_dict().items()}, directory / "model.safetensors",
                  metadata={"format": "pt"})

    save(tiny_llava(0), tmp_path / "base", base_naming == "in_memory")
    for k in range(2):  # (one in each naming)
        save(tiny_llava(k + 1), tmp_path / f"e{k}", k == 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no tensor ignored, none copied from the base alone)
        out = merge_checkpoints("task_arithmetic", [tmp_path / "e0", tmp_path / "e1"], tmp_path / "out",
                                base=tmp_path / "base", params={"scale": 1.0}, progress=False)

    def load(path):
        return transformers.LlavaForConditionalGeneration.from_pretrained(path).state_dict()

    base, got = load(tmp_path / "base"), load(out)
    experts = [load(tmp_path / f"e{k}") for k in range(2)]
    for name in base:
        want = base[name] + sum(e[name] - base[name] for e in experts)
        assert torch.allclose(got[name], want, atol=1e-6), name


def test_configs_spelling_one_field_otherwise_are_compared(tmp_path):
    """GPT-2's config.json spells its heads and layers n_head and n_layer, which transformers also
    reads as num_attention_heads and num_hidden_layers (its attribute_map; a config written by
    hand or by another tool, old Falcon's): an expert of other heads or layers spelled the other
    way was never compared, merged in silence; refused naming each config's spelling."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")

    def save(name, **fields):
        transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / name)
        written = json.loads((tmp_path / name / "config.json").read_text())
        for field in ("n_head", "n_layer"):
            written.pop(field)
        (tmp_path / name / "config.json").write_text(json.dumps({**written, **fields}))
        return tmp_path / name

    merge = dict(base=tmp_path / "base", params={"scale": 1.0}, progress=False)
    with pytest.raises(ValueError, match=r"model \S*heads reads its weights as \{'num_attention_heads': 2\}, the base "
                                         r"as \{'n_head': 4\} \(config.json\)"):
        merge_checkpoints("task_arithmetic", [save("heads", num_attention_heads=2, num_hidden_layers=2)],
                          tmp_path / "out", **merge)
    with pytest.raises(ValueError, match=r"model \S*deep counts its layers as \{'num_hidden_layers': 3\}, the base "
                                         r"as \{'n_layer': 2\}"):
        merge_checkpoints("task_arithmetic", [save("deep", num_attention_heads=4, num_hidden_layers=3)],
                          tmp_path / "out", **merge)
    same = save("same", num_attention_heads=4, num_hidden_layers=2)  # (the base's, spelled otherwise)
    assert transformers.AutoConfig.from_pretrained(same).n_head == 4
    merge_checkpoints("task_arithmetic", [same], tmp_path / "out", **merge)
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("mine, theirs, said", [
    # (the Qwen-VL vision towers' depth, XGLM's and Mllama's vision attention_heads, T5's d_kv, Falcon's
    # num_kv_heads and old n_head_kv, each against itself and the spelling transformers maps it to)
    ({"vision_config": {"model_type": "v", "depth": 4}}, {"vision_config": {"model_type": "v", "depth": 2}},
     r"counts its layers as \{'vision_config.depth': 4\}, the model as \{'vision_config.depth': 2\}"),
    ({"vision_config": {"model_type": "v", "num_hidden_layers": 4}},
     {"vision_config": {"model_type": "v", "depth": 2}},
     r"counts its layers as \{'vision_config.num_hidden_layers': 4\}, the model as \{'vision_config.depth': 2\}"),
    ({"attention_heads": 4}, {"attention_heads": 2}, r"\{'attention_heads': 4\}, the model as \{'attention_"),
    ({"attention_heads": 4}, {"num_attention_heads": 2}, r"\{'attention_heads': 4\}, the model as \{'num_atten"),
    ({"encoder_attention_heads": 4, "decoder_attention_heads": 4},
     {"encoder_attention_heads": 4, "decoder_attention_heads": 2},
     r"\{'decoder_attention_heads': 4\}, the model as \{'decoder_attention_heads': 2\}"),
    ({"d_kv": 8}, {"d_kv": 16}, r"\{'d_kv': 8\}, the model as \{'d_kv': 16\}"),
    ({"num_kv_heads": 1}, {"n_head_kv": 2}, r"\{'num_kv_heads': 1\}, the model as \{'n_head_kv': 2\}"),
    ({"num_kv_heads": 1}, {"num_key_value_heads": 2}, r"\{'num_kv_heads': 1\}, the model as \{'num_key_value"),
    ({"moe_k": 8}, {"num_experts_per_tok": 6}, r"\{'moe_k': 8\}, the model as \{'num_experts_per_tok': 6\}"),
    ({"moe_topk": [2]}, {"moe_topk": [1]}, r"\{'moe_topk': \[2\]\}, the model as \{'moe_topk': \[1\]\}"),
])
def test_head_and_layer_fields_of_every_spelling_are_compared(mine, theirs, said):
    """The fields that split a model's rows into heads or count its layers go by other names in
    other families (encoder-decoders' encoder_/decoder_attention_heads, the Qwen-VL vision towers'
    depth, XGLM's attention_heads, T5's d_kv, Falcon's num_kv_heads; ERNIE's and Hunyuan's experts per
    token): an expert of other heads, layers or routing spelled so was never compared, walked and
    merged as the model's; refused naming both."""
    from epmq.merge_checkpoint import _check_architectures

    def check(config, reference):
        _check_architectures(None, [None], ["x"], experts=True, reference={"model_type": "m", **reference},
                             configs=[{"model_type": "m", **config}])

    with pytest.raises(ValueError, match=said):
        check(mine, theirs)
    check(mine, mine)
    check(theirs, theirs)


@pytest.mark.parametrize("field, mine, theirs", [
    ("final_logit_softcapping", 30.0, None), ("attn_logit_softcapping", 50.0, 30.0), ("query_pre_attn_scalar", 64, 256),
    ("logits_scaling", 8.0, 1.0), ("logit_scale", 0.125, 0.0625), ("use_parallel_residual", False, True),
    ("parallel_attn", False, True), ("alibi", True, False), ("activation", "relu", "gelu"),
    ("feed_forward_proj", "gated-silu", "gated-gelu"), ("projector_hidden_act", "relu", "gelu"),
    ("num_experts_per_tok", 4, 2), ("norm_topk_prob", True, False), ("routed_scaling_factor", 1.0, 2.5),
    ("relative_attention_max_distance", 64, 128), ("scale_decoder_outputs", False, True),
])
def test_fields_that_change_what_the_weights_compute_are_compared(field, mine, theirs):
    """Capped or scaled logits (Gemma 2's softcapping and query scale, Granite's and Cohere's logit
    scales), another residual form (GPT-NeoX's and Falcon's parallel attention), Falcon's ALiBi and
    activation, T5's gated activation, its position bias read at other distances (the same buckets'
    table) and its tied head's scaling (transformers 5's scale_decoder_outputs: a T5 built with
    tie_word_embeddings=False, as FLAN-T5's config says, loaded a t5-small-style checkpoint's tensors
    and served unscaled logits), a mixture of experts routing to other experts: weights of
    the same shapes computing other things, walked and merged as the model's in silence; refused as
    other heads are. A softcapping written None is none (not its model's default): compared too."""
    from epmq.merge_checkpoint import _check_architectures

    def check(value, reference):
        _check_architectures(None, [None], ["x"], experts=True, reference={"model_type": "m", field: reference},
                             configs=[{"model_type": "m", field: value}])

    with pytest.raises(ValueError, match=rf"reads its weights as \{{'{field}': {re.escape(repr(mine))}\}}, "
                                         rf"the model as \{{'{field}': {re.escape(repr(theirs))}\}}"):
        check(mine, theirs)
    check(mine, mine)
    _check_architectures(None, [None], ["x"], experts=True, reference={"model_type": "m"},
                         configs=[{"model_type": "m", field: mine}])  # (unwritten: its default, unknown here)


@pytest.mark.parametrize("tied", [False, True, None])
@pytest.mark.parametrize("scaled", [False, True])
def test_t5s_decoder_output_scaling_is_compared_as_transformers_5_reads_a_config_without_it(tied, scaled):
    """transformers 4 wrote no scale_decoder_outputs: T5 scaled its decoder's outputs unless tie_word_embeddings
    was false (FLAN-T5's), as transformers 5 derives the field when absent. Compared only where both configs
    wrote it, a 4.x FLAN-T5 config against a 5.x one scaling its outputs (or two 4.x ones, tied and untied)
    was taken in silence, the tensors then served by a model scaling them otherwise; compared by the value
    transformers 5 reads, at the top and in a tower."""
    from epmq.merge_checkpoint import _check_architectures

    size = dict(vocab_size=8, d_model=8, d_kv=2, d_ff=8, num_layers=1, num_heads=2)
    old = {"model_type": "t5", **({} if tied is None else {"tie_word_embeddings": tied})}  # (transformers 4's)
    reads = transformers.T5Config.from_dict({**size, **old}).scale_decoder_outputs
    new = {"model_type": "t5", "scale_decoder_outputs": scaled, "tie_word_embeddings": True}
    assert transformers.T5Config.from_dict({**size, **new}).scale_decoder_outputs is scaled
    other = {"model_type": "t5", "tie_word_embeddings": not reads}  # (transformers 4's, scaling otherwise)

    def check(mine, theirs, tower):
        def wrap(c):
            return {"model_type": "musicgen", tower: c} if tower else c

        _check_architectures(None, [None], ["x"], experts=True, reference=wrap(theirs), configs=[wrap(mine)])

    for tower in ("", "text_encoder"):  # (at the top, and as MusicGen's text encoder)
        said = rf"\{{'{tower + '.' if tower else ''}scale_decoder_outputs': "
        if reads is scaled:
            check(old, new, tower)
        else:
            with pytest.raises(ValueError, match=rf"{said}{reads}\}}, the model as {said}{scaled}\}}"):
                check(old, new, tower)
        with pytest.raises(ValueError, match=rf"{said}{not reads}\}}, the model as {said}{reads}\}}"):
            check(other, old, tower)


@pytest.mark.parametrize("model_type, scope, field, mine, theirs", [
    ("mpt", "attn_config", "alibi", False, True), ("mpt", "attn_config", "clip_qkv", None, 6.0),
    ("mpt", "attn_config", "alibi_bias_max", 16, 8), ("dbrx", "attn_config", "kv_n_heads", 2, 8),
    ("dbrx", "attn_config", "clip_qkv", 6, 8), ("dbrx", "ffn_config", "moe_top_k", 2, 4),
])
def test_attention_and_feed_forward_settings_nested_without_a_model_type_are_compared(model_type, scope, field,
                                                                                       mine, theirs):
    """MPT and DBRX keep their attention's settings (ALiBi, clipped q, k and v, the key-value heads)
    and DBRX its experts per token in nested attn_config and ffn_config, which their hub configs
    write without a model_type: only towers' configs (with one) were looked into, so an expert
    attending otherwise was walked and merged as the model's. Compared, by scope, as a top field is."""
    from epmq.merge_checkpoint import _check_architectures

    def check(value, reference):
        _check_architectures(None, [None], ["x"], experts=True,
                             reference={"model_type": model_type, "n_heads": 4, scope: {field: reference}},
                             configs=[{"model_type": model_type, "n_heads": 4, scope: {field: value}}])

    with pytest.raises(ValueError, match=rf"reads its weights as \{{'{scope}.{field}': {re.escape(repr(mine))}\}}, "
                                         rf"the model as \{{'{scope}.{field}': {re.escape(repr(theirs))}\}}"):
        check(mine, theirs)
    check(mine, mine)


def test_a_gemma2_expert_of_other_softcapping_is_refused(tmp_path):
    """A Gemma 2 fine-tuned without logit softcapping (final_logit_softcapping: null, as for
    flash-attention training) beside a base that caps its logits at 30: merged in silence."""
    config = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    for name, softcap in (("base", 30.0), ("capped", 30.0), ("uncapped", None)):
        transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **config, final_logit_softcapping=softcap)).save_pretrained(tmp_path / name)
    merge = dict(base=tmp_path / "base", params={"scale": 1.0}, progress=False)
    with pytest.raises(ValueError, match=r"model \S*uncapped reads its weights as \{'final_logit_softcapping': None\}, "
                                         r"the base as \{'final_logit_softcapping': 30.0\}"):
        merge_checkpoints("task_arithmetic", [tmp_path / "capped", tmp_path / "uncapped"], tmp_path / "out", **merge)
    merge_checkpoints("task_arithmetic", [tmp_path / "capped"], tmp_path / "out", **merge)


def test_open_clip_checkpoints_whose_configs_read_the_weights_otherwise_are_refused(tmp_path):
    """open_clip's hub and local-dir checkpoints carry open_clip_config.json, no config.json: nothing
    was compared, so a fine-tune of ViT-B-32-quickgelu (QuickGELU; its config gives quick_gelu: true)
    merged beside a ViT-B-32 base (GELU; its config leaves quick_gelu out) or an expert of other
    heads went through in silence. Their model_cfg is compared as a config.json's, open_clip's
    defaults filled in."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    model_cfg = {"embed_dim": 16, "vision_cfg": {"layers": 2, "width": 32, "head_width": 8, "image_size": 16,
                                                  "patch_size": 8},
                 "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 32, "heads": 4, "layers": 2}}

    def save(name, **changes):
        cfg = json.loads(json.dumps(model_cfg))
        for key, value in changes.items():
            *tower, field = key.split(".")
            (cfg[tower[0]] if tower else cfg)[field] = value
        (tmp_path / name).mkdir()
        (tmp_path / name / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
        save_file({k: v.contiguous() for k, v in CLIP(**cfg).state_dict().items()},
                  str(tmp_path / name / "open_clip_model.safetensors"))
        return tmp_path / name

    save("base")
    plain = save("plain")
    merge = dict(base=tmp_path / "base", params={"scale": 1.0}, progress=False)
    with pytest.raises(ValueError, match=r"model \S*quickgelu reads its weights as \{'quick_gelu': True\}, the base as "
                                         r"\{'quick_gelu': False\}"):
        merge_checkpoints("task_arithmetic", [plain, save("quickgelu", quick_gelu=True)], tmp_path / "out", **merge)
    with pytest.raises(ValueError, match=r"\{'vision_cfg.head_width': 16\}, the base as \{'vision_cfg.head_width': 8"):
        merge_checkpoints("task_arithmetic", [plain, save("wide", **{"vision_cfg.head_width": 16})], tmp_path / "out",
                          **merge)
    with pytest.raises(ValueError, match=r"\{'text_cfg.heads': 8\}, the base as \{'text_cfg.heads': 4"):
        merge_checkpoints("task_arithmetic", [plain, save("heads", **{"text_cfg.heads": 8})], tmp_path / "out",
                          **merge)
    same = save("same", quick_gelu=False)  # (open_clip's default, written out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_checkpoints("task_arithmetic", [plain, same], tmp_path / "out", **merge)


def test_an_open_clip_weight_file_beside_a_transformers_config_is_compared_by_its_open_clip_config(tmp_path):
    """LAION's hub checkpoints hold the model twice: transformers' (model.safetensors, config.json of
    model_type clip) and open_clip's (open_clip_model.safetensors, open_clip_config.json). Given its
    open_clip file as the base of open_clip fine-tunes (which carry open_clip_config.json alone), the
    base was read by the config.json beside it, a 'clip' checkpoint, and every fine-tune refused as of
    another architecture; the config compared is the one of the weights read."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    model_cfg = {"embed_dim": 16, "vision_cfg": {"layers": 2, "width": 32, "head_width": 8, "image_size": 16,
                                                  "patch_size": 8},
                 "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 32, "heads": 4, "layers": 2}}

    def save(name, quick_gelu=False):
        cfg = dict(model_cfg, quick_gelu=quick_gelu)
        (tmp_path / name).mkdir()
        (tmp_path / name / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
        save_file({k: v.contiguous() for k, v in CLIP(**cfg).state_dict().items()},
                  str(tmp_path / name / "open_clip_model.safetensors"))
        return tmp_path / name

    base = save("base")
    (base / "config.json").write_text(json.dumps({  # (transformers' copy's, as LAION's repos carry it)
        "model_type": "clip", "text_config": {"model_type": "clip_text_model", "num_attention_heads": 4,
                                              "num_hidden_layers": 2},
        "vision_config": {"model_type": "clip_vision_model", "num_attention_heads": 4, "num_hidden_layers": 2}}))
    merge = dict(base=base / "open_clip_model.safetensors", params={"scale": 1.0}, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_checkpoints("task_arithmetic", [save("a"), save("b")], tmp_path / "out", **merge)
    with pytest.raises(ValueError, match=r"\{'quick_gelu': True\}, the base as \{'quick_gelu': False\}"):
        merge_checkpoints("task_arithmetic", [save("quickgelu", quick_gelu=True)], tmp_path / "out2", **merge)


def test_an_open_clip_merge_is_written_as_open_clip_loads_it(tmp_path):
    """A merge of open_clip checkpoints was written as model.safetensors, a name open_clip's hub loader
    never fetches (create_model("hf-hub:...") built the model random-initialised, a log line aside). Of a
    LAION checkpoint's open_clip file, transformers' config.json of its other copy came along, and
    from_pretrained built a CLIPModel from it, every weight random (the tensors bear open_clip's names);
    of an open_clip file alone, its open_clip_config.json was left behind. Each is written in open_clip's
    hub layout, which open_clip loads."""
    import open_clip
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    model_cfg = {"embed_dim": 16, "vision_cfg": {"layers": 2, "width": 32, "head_width": 8, "image_size": 16,
                                                  "patch_size": 8},
                 "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 32, "heads": 4, "layers": 2}}

    def save(name):
        (tmp_path / name).mkdir()
        (tmp_path / name / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                                           "preprocess_cfg": {}}))
        state = {k: v.contiguous() for k, v in CLIP(**model_cfg).state_dict().items()}
        save_file(state, str(tmp_path / name / "open_clip_model.safetensors"))
        return tmp_path / name, state

    (base, base_state), (a, a_state), (b, b_state) = save("base"), save("a"), save("b")
    laion = tmp_path / "laion"
    laion.mkdir()
    for entry in base.iterdir():
        (laion / entry.name).write_bytes(entry.read_bytes())
    (laion / "config.json").write_text(json.dumps({"model_type": "clip"}))  # (its transformers copy's)
    want = merge.task_arithmetic(base_state, [a_state, b_state], scale=0.5, progress=False)
    for name, source in (("dir", base), ("file", base / "open_clip_model.safetensors"),
                         ("laion", laion / "open_clip_model.safetensors")):
        out = merge_checkpoints("task_arithmetic", [a, b], tmp_path / f"out_{name}", base=source,
                                params={"scale": 0.5}, progress=False)
        assert {p.name for p in out.iterdir() if p.suffix in (".json", ".safetensors") and p.name[0] != "."} == {
            open_clip.constants.HF_SAFE_WEIGHTS_NAME, "open_clip_config.json", RECIPE_FILE}, name
        loaded = open_clip.create_model(f"local-dir:{out}").state_dict()
        assert all(torch.equal(loaded[k], want[k]) for k in want), name
    with pytest.warns(UserWarning, match=r"written in shards \(max_shard_size\), which open_clip does not load"):
        merge_checkpoints("task_arithmetic", [a, b], tmp_path / "shards", base=base, params={"scale": 0.5},
                          max_shard_size="10KB", progress=False)


def test_a_laion_checkpoints_transformers_copy_merges_without_its_open_clip_config(tmp_path):
    """A LAION checkpoint read by its transformers copy (model.safetensors, config.json) as the base of
    transformers fine-tunes: the open_clip_config.json of its other copy came along beside the merged
    transformers weights, and open_clip's loader of a directory (create_model("local-dir:...")) took
    it for an open_clip checkpoint, built open_clip's CLIP and failed on model.safetensors' names
    ("Missing key(s) in state_dict"). The merge of transformers weights carries transformers' config
    alone, which from_pretrained loads; open_clip says the directory has no open_clip config."""
    import open_clip
    from open_clip.model import CLIP
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=32, max_position_embeddings=8),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=16, patch_size=8), projection_dim=16)
    models = {name: CLIPModel(config) for name in ("laion", "a", "b")}
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
    model_cfg = {"embed_dim": 16, "vision_cfg": {"layers": 2, "width": 32, "head_width": 8, "image_size": 16,
                                                  "patch_size": 8},
                 "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 32, "heads": 4, "layers": 2}}
    (tmp_path / "laion" / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                                          "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in CLIP(**model_cfg).state_dict().items()},
              str(tmp_path / "laion" / "open_clip_model.safetensors"))
    out = merge_checkpoints("task_arithmetic", [tmp_path / "a", tmp_path / "b"], tmp_path / "out",
                            base=tmp_path / "laion", params={"scale": 0.5}, progress=False)
    assert {p.name for p in out.iterdir() if p.suffix in (".json", ".safetensors") and p.name[0] != "."} == {
        "config.json", "model.safetensors", RECIPE_FILE}
    states = {name: model.state_dict() for name, model in models.items()}
    want = merge.task_arithmetic(states["laion"], [states["a"], states["b"]], scale=0.5, progress=False)
    loaded = CLIPModel.from_pretrained(out).state_dict()
    assert all(torch.equal(loaded[k], want[k]) for k in want)
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        open_clip.create_model(f"local-dir:{out}")


@pytest.mark.parametrize("read", ["transformers", "open_clip"])
def test_the_config_of_a_laion_checkpoints_copy_not_read_is_not_checked(tmp_path, read):
    """A LAION checkpoint's config of the copy not read is left behind (96dec2a), yet an empty one stopped the
    merge as a file its output would carry and fail to load; the files checked are those copied, and the
    config of the copy read is still checked."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, vocab_size=32, max_position_embeddings=8),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, image_size=16, patch_size=8), projection_dim=16)
    model_cfg = {"embed_dim": 16, "vision_cfg": {"layers": 1, "width": 32, "head_width": 8, "image_size": 16,
                                                  "patch_size": 8},
                 "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 32, "heads": 4, "layers": 1}}
    for name in ("laion", "a", "b"):
        CLIPModel(config).save_pretrained(tmp_path / name)
        (tmp_path / name / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg,
                                                                           "preprocess_cfg": {}}))
        save_file({k: v.contiguous() for k, v in CLIP(**model_cfg).state_dict().items()},
                  str(tmp_path / name / "open_clip_model.safetensors"))
    read_config, other = (("config.json", "open_clip_config.json") if read == "transformers"
                          else ("open_clip_config.json", "config.json"))
    weights = "model.safetensors" if read == "transformers" else "open_clip_model.safetensors"
    laion = tmp_path / "laion"
    (laion / other).write_bytes(b"")
    out = merge_checkpoints("task_arithmetic", [tmp_path / n / weights for n in "ab"], tmp_path / "out",
                            base=laion / weights, params={"scale": 0.5}, progress=False)
    assert (out / read_config).is_file() and not (out / other).exists()
    (laion / other).write_text("{}")
    (laion / read_config).write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(str(laion / read_config)) + " is (empty|not valid JSON)"):
        merge_checkpoints("task_arithmetic", [tmp_path / n / weights for n in "ab"], tmp_path / "out2",
                          base=laion / weights, params={"scale": 0.5}, progress=False)


def test_timm_checkpoints_whose_configs_build_another_model_are_refused(tmp_path):
    """timm's hub checkpoints (save_for_hf: config.json giving its architecture and model_args, no
    model_type) were compared on nothing: a fine-tune pooling its tokens' mean (global_pool avg)
    merged beside a base reading its class token, or one of another architecture. Refused naming
    both; the global_pool beside model_args (what the exported model pooled, which loading does not
    read) is not compared, nor is a TimmWrapper config's."""
    import timm
    from timm.models._hub import save_for_hf

    def save(name, architecture="vit_tiny_patch16_224", **args):
        model = timm.create_model(architecture, pretrained=False, **{
            **dict(img_size=16, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=3), **args})
        save_for_hf(model, tmp_path / name)
        return tmp_path / name

    save("base")
    plain = save("plain")
    merge = dict(base=tmp_path / "base", params={"scale": 1.0}, progress=False)
    with pytest.raises(ValueError, match=r"model \S*avg reads its weights as \{'global_pool': 'avg'\}, the base as "
                                         r"\{'global_pool': 'token'\}"):
        merge_checkpoints("task_arithmetic", [plain, save("avg", global_pool="avg")], tmp_path / "out", **merge)
    with pytest.raises(ValueError, match=r"model \S*quick is a 'vit_base_patch16_clip_quickgelu_224' checkpoint, the "
                                         r"base a 'vit_tiny_patch16_224' one"):
        merge_checkpoints("task_arithmetic", [plain, save("quick", "vit_base_patch16_clip_quickgelu_224",
                                                          pre_norm=False)], tmp_path / "out", **merge)
    config = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({**config, "global_pool": "avg"}))  # (informational)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_checkpoints("task_arithmetic", [plain], tmp_path / "out", **merge)
    # transformers' TimmWrapper builds timm's model alike, from the same fields beside its model_type
    from epmq.merge_checkpoint import _check_architectures

    def wrapper(pooled, built):
        return {"model_type": "timm_wrapper", "architecture": "vit_tiny_patch16_224", "global_pool": pooled,
                "model_args": {"global_pool": built}}

    _check_architectures(None, [None], ["x"], experts=True, reference=wrapper("token", "token"),
                         configs=[wrapper("avg", "token")])
    with pytest.raises(ValueError, match=r"\{'global_pool': 'avg'\}, the model as \{'global_pool': 'token'\}"):
        _check_architectures(None, [None], ["x"], experts=True, reference=wrapper("token", "token"),
                             configs=[wrapper("avg", "avg")])


def test_models_whose_configs_read_the_weights_otherwise_are_refused_or_warned_of(tmp_path):
    """Weights of the same shapes under another head count or activation mean other things (the
    rows split into other heads): refused, as another layer count is. Another RoPE (a long-context
    fine-tune's rope_theta) is warned of: the output carries one config's. Fields that do not
    change what the weights compute (the name a model was loaded from, its dtype) are neither."""
    def save(name, **config):
        model = tiny_llama(1)
        model.config.update(config)
        model.save_pretrained(tmp_path / name)
        return tmp_path / name

    tiny_llama(0).save_pretrained(tmp_path / "base")
    plain = save("plain")
    merge = dict(base=tmp_path / "base", params={"scale": 1.0}, progress=False)
    with pytest.raises(ValueError, match=r"model \S*heads reads its weights as \{'head_dim': 4, "
                                         r"'num_attention_heads': 8, 'num_key_value_heads': 4\}, the base as "
                                         r"\{'head_dim': 8, 'num_attention_heads': 4, 'num_key_value_heads': 2\} "
                                         r"\(config.json\): merge models of one configuration"):
        merge_checkpoints("task_arithmetic", [plain, save("heads", num_attention_heads=8, num_key_value_heads=4,
                                                           head_dim=4)], tmp_path / "out", **merge)
    with pytest.raises(ValueError, match=r"'hidden_act': 'gelu'.*'hidden_act': 'silu'"):
        merge_checkpoints("task_arithmetic", [plain, save("gelu", hidden_act="gelu")], tmp_path / "out", **merge)
    with pytest.warns(UserWarning, match=r"model \S*rope computes its positions with \{'rope_parameters': "
                                         r"\{'rope_theta': 500000.0, 'rope_type': 'default'\}\}, the base with "
                                         r"\{'rope_parameters': \{'rope_theta': 10000.0"):
        merge_checkpoints("task_arithmetic", [plain, save("rope", rope_parameters={
            "rope_theta": 500000.0, "rope_type": "default"})], tmp_path / "out", **merge)
    renamed = save("renamed", _name_or_path="someone/expert", dtype="bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_checkpoints("task_arithmetic", [plain, renamed], tmp_path / "out2", **merge)


@pytest.mark.parametrize("mine, theirs, said", [
    ({"rms_norm_eps": 1e-5}, {"rms_norm_eps": 1e-6}, r"\{'rms_norm_eps': 1e-05\}, the model with \{'rms_norm_eps'"),
    ({"text_config": {"model_type": "t", "layer_norm_eps": 1e-5}},
     {"text_config": {"model_type": "t", "layer_norm_eps": 1e-6}}, r"\{'text_config.layer_norm_eps': 1e-05\}"),
    ({"sliding_window": None}, {"sliding_window": 4096}, r"\{'sliding_window': None\}, the model with "
                                                         r"\{'sliding_window': 4096\}"),
    ({"use_sliding_window": True, "sliding_window": 4096}, {"use_sliding_window": False, "sliding_window": 4096},
     r"\{'sliding_window': 4096\}, the model with \{'sliding_window': None\}"),
    ({"attention_window_size": 2048}, {"sliding_window": 4096}, r"\{'attention_window_size': 2048\}, the model "
                                                                  r"with \{'sliding_window': 4096\}"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, {"layer_types": ["full_attention"] * 2},
     r"\{'layer_types': \['sliding_attention', 'full_attention'\]\}"),
])
def test_another_norm_epsilon_or_sliding_window_is_warned_of(mine, theirs, said):
    """Another norm epsilon (Llama 2's hub config went from 1e-6 to 1e-5: its fine-tunes carry
    either) or sliding window (Mistral 7B v0.1's 4096, v0.2's none) changes what the same weights
    compute, a little or on long inputs alone: warned of as another RoPE is, where nothing was said.
    A window the config turns off (Qwen2's use_sliding_window: false) is none, whichever it gives."""
    from epmq.merge_checkpoint import _check_architectures

    def check(config, reference):
        _check_architectures(None, [None], ["x"], experts=True, reference={"model_type": "m", **reference},
                             configs=[{"model_type": "m", **config}])

    with pytest.warns(UserWarning, match=r"the expert x runs its weights with " + said):
        check(mine, theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check(mine, mine)
        check({"use_sliding_window": False, "sliding_window": 32768},
              {"use_sliding_window": False, "sliding_window": 131072})
        check({"rms_norm_eps": 1e-5}, {})  # (unwritten: its default, unknown here)


def test_a_mistral_expert_without_the_bases_sliding_window_is_warned_of(tmp_path):
    """A merge of Mistral 7B v0.1 (sliding_window 4096) and a fine-tune of v0.2 (none): the output
    attends as the base's config says, which nothing said."""
    config = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    for name, window in (("base", 4096), ("windowed", 4096), ("whole", None)):
        transformers.MistralForCausalLM(transformers.MistralConfig(
            **config, sliding_window=window)).save_pretrained(tmp_path / name)
    merge = dict(base=tmp_path / "base", params={"scale": 1.0}, progress=False)
    with pytest.warns(UserWarning, match=r"model \S*whole runs its weights with \{'sliding_window': None\}, the base "
                                         r"with \{'sliding_window': 4096\} \(config.json\): the merged weights are run "
                                         r"as the config the output carries says"):
        merge_checkpoints("task_arithmetic", [tmp_path / "windowed", tmp_path / "whole"], tmp_path / "out", **merge)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_checkpoints("task_arithmetic", [tmp_path / "windowed"], tmp_path / "out2", **merge)


def test_a_tensor_a_shard_holds_that_its_index_leaves_out_is_read_as_from_pretrained_reads_it(tmp_path):
    """transformers reads every tensor of the shards an index names, listed in its weight_map or
    not (an index written before a tensor was added, or edited by hand); a merge whose base's
    index left one out wrote an output without it, loaded randomly initialised."""
    name = "model.layers.1.mlp.up_proj.weight"
    for k, where in enumerate(["base", "e0", "e1"]):
        tiny_llama(k).save_pretrained(tmp_path / where, max_shard_size="20KB")
    for where in ["base", "e1"]:
        index = json.loads((tmp_path / where / "model.safetensors.index.json").read_text())
        del index["weight_map"][name]
        (tmp_path / where / "model.safetensors.index.json").write_text(json.dumps(index))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no tensor ignored)
        out = merge_checkpoints("task_arithmetic", [tmp_path / "e0", tmp_path / "e1"], tmp_path / "out",
                                base=tmp_path / "base", params={"scale": 1.0}, progress=False)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    base, e0, e1 = (_load(tmp_path / where)[name] for where in ["base", "e0", "e1"])
    assert torch.allclose(model.state_dict()[name], base + (e0 - base) + (e1 - base), atol=1e-6)


def test_another_rope_theta_is_warned_of_where_transformers_4_and_5_write_it_apart(tmp_path):
    """A hub base's config.json written by transformers 4 gives ``rope_theta`` at its top; an expert
    fine-tuned and saved by transformers 5 gives it in ``rope_parameters`` (its own reading of the
    4.x field): a long-context expert's other theta is warned of all the same."""
    tiny_llama(0).save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]  # (as transformers 4 wrote it)
    config["rope_scaling"] = None
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    for k, theta in enumerate([10000.0, 500000.0]):
        expert = tiny_llama(k + 1)
        expert.config.rope_parameters = {"rope_theta": theta, "rope_type": "default"}
        expert.save_pretrained(tmp_path / f"e{k}")
    with pytest.warns(UserWarning, match=r"model \S*e1 computes its positions with \{'rope_parameters': \{'rope_"
                                         r"theta': 500000.0, 'rope_type': 'default'\}\}, the base with \{'rope_param"
                                         r"eters': \{'rope_theta': 10000.0, 'rope_type': 'default'\}\}"):
        merge_checkpoints("task_arithmetic", [tmp_path / "e0", tmp_path / "e1"], tmp_path / "out",
                          base=tmp_path / "base", progress=False)


def test_a_default_rope_under_its_other_names_is_the_same_rope():
    """transformers 5 writes the default RoPE of the classes that turn positions by axes (Qwen3-VL's
    vision tower) as "axial", and reads Qwen2-VL's 4.x "mrope" as default: a 4.x config of either
    and a 5.x one of the same model turn positions alike (the tower a config.json gives is compared
    with the model's config as transformers 5 writes it)."""
    from epmq.merge_checkpoint import _rope, _ropes_differ

    five = _rope({"rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"}})
    assert not _ropes_differ(_rope({"rope_theta": 10000.0}), five)
    mrope = _rope({"rope_theta": 1e6, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}})
    assert not _ropes_differ(mrope, _rope({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                               "mrope_section": [1, 1, 2]}}))
    assert _ropes_differ(_rope({"rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0}}), five)


def test_gpt_neox_rope_fields_of_transformers_4_are_read_as_transformers_5_reads_them(tmp_path):
    """transformers 4 wrote GPT-NeoX's (Pythia's) RoPE as rotary_emb_base and rotary_pct, which 5
    reads into rope_parameters' rope_theta and partial_rotary_factor: a 4.x expert of another base
    (a long-context fine-tune's) beside a 5.x base gave no RoPE to compare, merged in silence."""
    config = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64)
    transformers.GPTNeoXForCausalLM(config).save_pretrained(tmp_path / "base")
    base = json.loads((tmp_path / "base" / "config.json").read_text())
    assert base["rope_parameters"] == {"rope_theta": 10000.0, "partial_rotary_factor": 0.25, "rope_type": "default"}

    def four(name, theta):
        transformers.GPTNeoXForCausalLM(config).save_pretrained(tmp_path / name)
        written = {k: v for k, v in base.items() if k != "rope_parameters"}
        (tmp_path / name / "config.json").write_text(json.dumps({**written, "rotary_emb_base": theta,
                                                                 "rotary_pct": 0.25}))
        assert transformers.AutoConfig.from_pretrained(tmp_path / name).rope_parameters["rope_theta"] == theta
        return tmp_path / name

    merge = dict(base=tmp_path / "base", params={"scale": 1.0}, progress=False)
    with pytest.warns(UserWarning, match=r"model \S*long computes its positions with \{'rope_parameters': \{'partial_"
                                         r"rotary_factor': 0.25, 'rope_theta': 1000000, 'rope_type': 'default'\}\}"):
        merge_checkpoints("task_arithmetic", [four("long", 1000000)], tmp_path / "out", **merge)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_checkpoints("task_arithmetic", [four("same", 10000)], tmp_path / "out2", **merge)


def test_another_rope_scaling_is_warned_of_where_transformers_4_and_5_write_it_apart(tmp_path):
    """transformers 4 wrote a RoPE's scaling as ``rope_scaling`` beside ``rope_theta`` (``type`` or
    ``rope_type``); transformers 5 writes both in ``rope_parameters``, which it reads the 4.x fields
    into. A base of one writing and an expert of the other were compared on no common field: a
    long-context expert's scaling (linear, factor 4) was merged in silence. The same RoPE written
    either way is not warned of."""
    def base(**rope):
        tiny_llama(0).save_pretrained(tmp_path / "base")
        config = json.loads((tmp_path / "base" / "config.json").read_text())
        del config["rope_parameters"]
        config.update(rope)  # (as transformers 4 wrote it)
        (tmp_path / "base" / "config.json").write_text(json.dumps(config))

    def expert(k, **rope_parameters):
        model = tiny_llama(k + 1)
        model.config.rope_parameters = rope_parameters
        model.save_pretrained(tmp_path / f"e{k}")
        return tmp_path / f"e{k}"

    merge = dict(base=tmp_path / "base", params={"scale": 1.0}, progress=False)
    base(rope_theta=10000.0, rope_scaling=None)
    plain = expert(0, rope_theta=10000.0, rope_type="default")
    long = expert(1, rope_theta=10000.0, rope_type="linear", factor=4.0)
    with pytest.warns(UserWarning, match=r"model \S*e1 computes its positions with \{'rope_parameters': \{'factor': "
                                         r"4.0, 'rope_theta': 10000.0, 'rope_type': 'linear'\}\}, the base with "
                                         r"\{'rope_parameters': \{'rope_theta': 10000.0, 'rope_type': 'default'\}\}"):
        merge_checkpoints("task_arithmetic", [plain, long], tmp_path / "out", **merge)
    base(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 4.0})
    with pytest.warns(UserWarning, match=r"model \S*e0 computes its positions with \{'rope_parameters': \{'rope_theta'"
                                         r": 10000.0, 'rope_type': 'default'\}\}, the base with \{'rope_parameters': "
                                         r"\{'factor': 4.0, 'rope_theta': 10000.0, 'rope_type': 'linear'\}\}"):
        merge_checkpoints("task_arithmetic", [plain, long], tmp_path / "out2", **merge)
    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    base(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **llama3}, partial_rotary_factor=0.5)
    same = [expert(k, rope_theta=500000.0, rope_type="llama3", partial_rotary_factor=0.5, **llama3)
            for k in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (one RoPE, written as each version writes it)
        merge_checkpoints("task_arithmetic", same, tmp_path / "out3", **merge)
    yarn = {"factor": 4.0, "original_max_position_embeddings": 16}
    base(rope_theta=10000.0, rope_scaling={"type": "yarn", "beta_fast": None, **yarn})  # (None: yarn's default)
    same = [expert(k, rope_theta=10000.0, rope_type="yarn", beta_fast=32.0, **yarn) for k in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merge_checkpoints("task_arithmetic", same, tmp_path / "out4", **merge)


def test_a_tensor_a_torch_shard_holds_that_its_index_leaves_out_is_read_as_from_pretrained_reads_it(tmp_path):
    """As with safetensors shards: transformers reads every tensor of the .bin shards
    pytorch_model.bin.index.json names (an older hub repository's), listed in its weight_map or
    not; a merge whose base's index left one out wrote an output without it, and an expert's was
    refused as a partial checkpoint."""
    name = "model.layers.1.mlp.up_proj.weight"
    for k, where in enumerate(["base", "e0", "e1"]):
        model = tiny_llama(k)
        (tmp_path / where).mkdir()
        state, weight_map = model.state_dict(), {}
        names = list(state)
        for i, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
            shard = f"pytorch_model-0000{i + 1}-of-00002.bin"
            torch.save({n: state[n] for n in part}, tmp_path / where / shard)
            weight_map.update(dict.fromkeys(part, shard))
        if where != "e0":
            del weight_map[name]
        (tmp_path / where / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {},
                                                                                  "weight_map": weight_map}))
        model.config.save_pretrained(tmp_path / where)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no tensor ignored)
        out = merge_checkpoints("task_arithmetic", [tmp_path / "e0", tmp_path / "e1"], tmp_path / "out",
                                base=tmp_path / "base", params={"scale": 1.0}, progress=False)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    base, e0, e1 = (tiny_llama(k).state_dict()[name] for k in range(3))
    assert torch.allclose(model.state_dict()[name], base + (e0 - base) + (e1 - base), atol=1e-6)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_merge_params_nan_or_inf_as_a_string_get_a_hint_that_fits(value):
    """YAML reads ``t: nan`` (and inf) as a string: it was refused with the hint 'YAML reads 1e-1 as a
    string: write 1.0e-1 or 0.1', which no writing of NaN or inf mends."""
    from epmq.merge_checkpoint import check_merge_params

    with pytest.raises(ValueError) as error:
        check_merge_params("slerp", {"t": value})
    message = str(error.value)
    assert f"params.t is the string {value!r}" in message
    assert "1e-1" not in message and "NaN and inf" in message
    with pytest.raises(ValueError, match=r"params.t is the string '1e-1', not a number \(YAML reads 1e-1"):
        check_merge_params("slerp", {"t": "1e-1"})


def test_open_clip_checkpoints_on_timm_image_towers_built_otherwise_are_refused(tmp_path):
    """open_clip checkpoints on a timm image tower (ViT-*-SigLIP*, EVA02-*) were compared on nothing of
    that tower: one naming another timm model, or pooling the trunk's tokens otherwise (timm_pool), was
    merged in silence. Both are compared, open_clip's default pool (avg) filled in; a pretrained tag
    names weights, not another model, and a pool '' (the trunk's own) says nothing to compare."""
    from epmq.merge_checkpoint import _check_architectures

    def save(name, **vision):
        return _open_clip_checkpoint(tmp_path / name,
                                     vision_cfg={"timm_model_name": "vit_base_patch16_siglip_224", **vision},
                                     text_cfg={"width": 32, "heads": 4, "layers": 2})

    base = save("base")
    with pytest.raises(ValueError, match=r"model \S*map reads its weights as \{'vision_cfg.timm_pool': 'map'\}, the "
                                         r"base as \{'vision_cfg.timm_pool': 'avg'\}"):
        _check_architectures(base, [save("map", timm_pool="map")], ["map"])
    with pytest.raises(ValueError, match=r"\{'vision_cfg.timm_model_name': 'vit_base_patch16_224'\}, the base as "
                                         r"\{'vision_cfg.timm_model_name': 'vit_base_patch16_siglip_224'\}"):
        _check_architectures(base, [save("plain", timm_model_name="vit_base_patch16_224")], ["plain"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_architectures(base, [save("same", timm_pool="avg", timm_model_name="vit_base_patch16_siglip_224.webli"),
                                    save("own", timm_pool="")], ["same", "own"])


def test_open_clip_coca_checkpoints_whose_decoders_read_the_weights_otherwise_are_refused(tmp_path):
    """CoCa's captioning decoder is built by model_cfg's multimodal_cfg, which was no tower compared: a
    CoCa whose decoder splits its width into other heads (the same shapes) was merged in silence. Its
    heads are compared, open_clip's default (8) filled in."""
    from epmq.merge_checkpoint import _check_architectures

    def save(name, **multimodal):
        return _open_clip_checkpoint(tmp_path / name, vision_cfg={"layers": 2, "width": 32, "head_width": 8},
                                     text_cfg={"width": 32, "heads": 4, "layers": 2},
                                     multimodal_cfg={"width": 32, "layers": 2, **multimodal})

    base = save("base", heads=4)
    with pytest.raises(ValueError, match=r"model \S*other reads its weights as \{'multimodal_cfg.heads': 2\}, the "
                                         r"base as \{'multimodal_cfg.heads': 4\}"):
        _check_architectures(base, [save("other", heads=2)], ["other"])
    with pytest.raises(ValueError, match=r"\{'multimodal_cfg.heads': 8\}, the base as \{'multimodal_cfg.heads': 4\}"):
        _check_architectures(base, [save("default")], ["default"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_architectures(base, [save("same", heads=4)], ["same"])


def test_open_clip_timm_model_names_from_timm_s_hub_are_compared_by_their_architecture(tmp_path):
    """open_clip's timm_model_name may name timm's hub repository of its weights (hf-hub:timm/<architecture>.
    <tag>, which timm builds as that architecture): compared with the bare name as written, one checkpoint
    was refused as another timm model than its twin's. Such a name is compared by its architecture; another
    owner's repository or a local directory says its architecture in its config.json alone, and is compared
    as written (a dot in it no tag)."""
    from epmq.merge_checkpoint import _check_architectures

    def save(name, timm_model_name):
        return _open_clip_checkpoint(tmp_path / name, vision_cfg={"timm_model_name": timm_model_name},
                                     text_cfg={"width": 32, "heads": 4, "layers": 2})

    base = save("base", "vit_base_patch16_siglip_224")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_architectures(base, [save("hub", "hf-hub:timm/vit_base_patch16_siglip_224.webli"),
                                    save("old", "hf_hub:timm/vit_base_patch16_siglip_224.v2_webli@main")],
                             ["hub", "old"])
    with pytest.raises(ValueError, match=r"\{'vision_cfg.timm_model_name': 'vit_base_patch16_224'\}, the base as "
                                         r"\{'vision_cfg.timm_model_name': 'vit_base_patch16_siglip_224'\}"):
        _check_architectures(base, [save("other", "hf-hub:timm/vit_base_patch16_224.augreg_in21k")], ["other"])
    with pytest.raises(ValueError, match=r"\{'vision_cfg.timm_model_name': 'local-dir:/models/siglip.v2'\}"):
        _check_architectures(base, [save("local", "local-dir:/models/siglip.v2")], ["local"])


def test_open_clip_checkpoints_attending_otherwise_are_refused(tmp_path):
    """open_clip's no_causal_mask (a text tower attending both ways) and attn_pooler_heads (an image tower's
    attention pool, CoCa's) run weights of the same shapes otherwise and were compared with nothing: such
    checkpoints were merged in silence. Both are compared, open_clip's defaults filled in; a pool's heads
    where the tower is built with no pool (attentional_pool) say nothing."""
    from epmq.merge_checkpoint import _check_architectures

    def save(name, vision=(), text=(), **towers):
        return _open_clip_checkpoint(tmp_path / name,
                                     vision_cfg={"layers": 2, "width": 32, "head_width": 8, **dict(vision)},
                                     text_cfg={"width": 32, "heads": 4, "layers": 2, **dict(text)}, **towers)

    base = save("base", vision={"attentional_pool": True, "attn_pooler_heads": 4})
    with pytest.raises(ValueError, match=r"\{'text_cfg.no_causal_mask': True\}, the base as "
                                         r"\{'text_cfg.no_causal_mask': False\}"):
        _check_architectures(base, [save("both_ways", vision={"attentional_pool": True, "attn_pooler_heads": 4},
                                         text={"no_causal_mask": True})], ["both_ways"])
    with pytest.raises(ValueError, match=r"\{'vision_cfg.attn_pooler_heads': 8\}, the base as "
                                         r"\{'vision_cfg.attn_pooler_heads': 4\}"):
        _check_architectures(base, [save("pooled", vision={"attentional_pool": True})], ["pooled"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_architectures(save("plain"), [save("unpooled", vision={"attn_pooler_heads": 2}),
                                             save("causal", text={"no_causal_mask": False})], ["unpooled", "causal"])
    # (CoCa's decoder: open_clip builds it with neither, which its multimodal_cfg, a text_cfg, may give)
    decoder = {"width": 32, "heads": 4, "layers": 2}
    coca = {name: save(f"coca_{name}", multimodal_cfg={**decoder, "attn_pooler_heads": heads, "no_causal_mask": mask})
            for name, heads, mask in (("a", 8, False), ("b", 12, True))}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_architectures(coca["a"], [coca["b"]], ["b"])


def test_open_clip_checkpoints_of_another_gelu_or_norm_epsilon_are_refused_or_warned_of(tmp_path):
    """open_clip's act_kwargs and norm_kwargs (SigLIP's text towers: GELU's tanh approximation, epsilon
    1e-6) were compared with nothing: such checkpoints were merged in silence. Another approximation is
    refused, another epsilon warned of; torch's defaults written out are open_clip's leaving them out, and
    CoCa's decoder, which open_clip builds without them, has none compared."""
    from epmq.merge_checkpoint import _check_architectures

    def save(name, **text):
        return _open_clip_checkpoint(tmp_path / name, vision_cfg={"layers": 2, "width": 32, "head_width": 8},
                                     text_cfg={"width": 32, "heads": 4, "layers": 2, **text},
                                     multimodal_cfg={"width": 32, "heads": 4, "layers": 2, **text})

    base = save("base")
    with pytest.raises(ValueError, match=r"model \S*tanh reads its weights as \{'text_cfg.act_kwargs': "
                                         r"\{'approximate': 'tanh'\}\}, the base as \{'text_cfg.act_kwargs': \{\}\}"):
        _check_architectures(base, [save("tanh", act_kwargs={"approximate": "tanh"})], ["tanh"])
    with pytest.warns(UserWarning, match=r"model \S*eps runs its weights with \{'text_cfg.norm_kwargs': "
                                         r"\{'eps': 1e-06\}\}, the base with \{'text_cfg.norm_kwargs': \{\}\}"):
        _check_architectures(base, [save("eps", norm_kwargs={"eps": 1e-6})], ["eps"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_architectures(base, [save("defaults", act_kwargs={"approximate": "none"}, norm_kwargs={"eps": 1e-5})],
                             ["defaults"])


def test_open_clip_resnet_image_towers_are_not_compared_by_gelu_or_norm_kwargs(tmp_path):
    """open_clip builds a ResNet image tower (its layers per stage) of ReLUs and BatchNorms, without
    act_kwargs and norm_kwargs: two such checkpoints written with others are one model, and were
    refused (another GELU approximation) or warned of (another epsilon) as if its tower were a ViT."""
    from epmq.merge_checkpoint import _check_architectures

    def save(name, **vision):
        return _open_clip_checkpoint(tmp_path / name, vision_cfg={"layers": [1, 1, 1, 1], "width": 8, **vision},
                                     text_cfg={"width": 32, "heads": 4, "layers": 2})

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_architectures(save("base"), [save("other", act_kwargs={"approximate": "tanh"},
                                                 norm_kwargs={"eps": 1e-6})], ["other"])


def test_open_clip_hf_text_towers_are_not_compared_by_fields_they_do_not_read(tmp_path):
    """open_clip builds a text tower naming a HF model (hf_model_name) from that model alone, without
    act_kwargs, norm_kwargs or no_causal_mask: two such checkpoints written with others are one model,
    and were refused (another GELU approximation, a mask) or warned of (another epsilon)."""
    from epmq.merge_checkpoint import _check_architectures

    def save(name, **text):
        text_cfg = {"hf_model_name": "roberta-base", "hf_pooler_type": "mean_pooler", **text}
        return _open_clip_checkpoint(tmp_path / name, custom_text=True,
                                     vision_cfg={"layers": 2, "width": 32, "head_width": 8}, text_cfg=text_cfg)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_architectures(save("base"), [save("other", act_kwargs={"approximate": "tanh"},
                                                 norm_kwargs={"eps": 1e-6}, no_causal_mask=True)], ["other"])


def test_a_chat_template_over_no_tokenizer_files_is_refused(tmp_path):
    """transformers 5 builds a Qwen2 (GPT-2, BERT, T5, ...) checkpoint without tokenizer files a
    tokenizer of its special tokens alone, no error: a chat_template given for such models was
    written on that one-token tokenizer beside the merge, in silence."""
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1))
    model.save_pretrained(tmp_path / "base")
    perturb(model, torch.Generator().manual_seed(1), scale=0.1).save_pretrained(tmp_path / "expert")
    with pytest.raises(ValueError, match=re.escape(f"chat_template: {tmp_path / 'base'} has no tokenizer to carry it "
                                                   f"(no tokenizer files)")):
        merge_checkpoints("task_arithmetic", [tmp_path / "expert"], tmp_path / "out", base=tmp_path / "base",
                          chat_template="{{ messages[0]['content'] }}", progress=False)
    assert not (tmp_path / "out").exists()


def _check_quietly(base, model):
    """``model``'s open_clip checkpoint compared with ``base``'s, any warning an error."""
    from epmq.merge_checkpoint import _check_architectures

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_architectures(base, [model], [model.name])


def test_open_clip_checkpoints_pooling_other_tokens_are_refused(tmp_path):
    """open_clip's pool_type (a text tower's "argmax", "last", "first", "eos" token or "none"; an image
    tower's "tok", "avg" or "none") pools the same weights' tokens otherwise and was compared with nothing:
    a text tower pooling its last token was merged in silence beside one pooling its EOT. It is compared as
    the tower pools: a text tower appending a class token (embed_cls, built whole: custom_text) pools the
    last, a string attentional_pool pools none; a CLIP keeps no class token, and timm's and HF's towers pool
    by their own fields."""
    def save(name, vision=(), text=(), **top):
        return _open_clip_checkpoint(tmp_path / name,
                                     vision_cfg={"layers": 2, "width": 32, "head_width": 8, **dict(vision)},
                                     text_cfg={"width": 32, "heads": 4, "layers": 2, **dict(text)}, **top)

    base = save("base")
    with pytest.raises(ValueError, match=r"\{'text_cfg.pool_type': 'last'\}, the base as "
                                         r"\{'text_cfg.pool_type': 'argmax'\}"):
        _check_quietly(base, save("last", text={"pool_type": "last"}))
    with pytest.raises(ValueError, match=r"\{'vision_cfg.pool_type': 'avg'\}, the base as "
                                         r"\{'vision_cfg.pool_type': 'tok'\}"):
        _check_quietly(base, save("avg", vision={"pool_type": "avg"}))
    with pytest.raises(ValueError, match=r"\{'text_cfg.eos_id': 1\}, the base as \{'text_cfg.eos_id': 2\}"):
        _check_quietly(save("eos", text={"pool_type": "eos"}), save("eos_1", text={"pool_type": "eos", "eos_id": 1}))
    _check_quietly(base, save("argmax", text={"pool_type": "argmax", "eos_id": 1}))  # (an EOS id no pool reads)
    custom_cls = save("custom_cls", text={"embed_cls": True}, custom_text=True)
    _check_quietly(save("custom_last", text={"pool_type": "last"}, custom_text=True), custom_cls)
    with pytest.raises(ValueError, match=r"\{'text_cfg.pool_type': 'last'\}, the base as "
                                         r"\{'text_cfg.pool_type': 'argmax'\}"):
        _check_quietly(save("custom", custom_text=True), custom_cls)
    _check_quietly(base, save("clip_cls", text={"embed_cls": True}))
    decoder = {"width": 32, "heads": 4, "layers": 2}  # (a CoCa's, built whole: custom_text or not)
    _check_quietly(save("coca_last", text={"pool_type": "last"}, multimodal_cfg=decoder),
          save("coca_cls", text={"embed_cls": True}, multimodal_cfg=decoder))
    _check_quietly(save("parallel", vision={"attentional_pool": "parallel"}),
          save("parallel_avg", vision={"attentional_pool": "parallel", "pool_type": "avg"}))
    with pytest.raises(ValueError, match=r"\{'vision_cfg.attentional_pool': 'cascade', 'vision_cfg.pool_type': 'none'\}"
                                         r", the base as \{'vision_cfg.attentional_pool': False, "
                                         r"'vision_cfg.pool_type': 'tok'\}"):
        _check_quietly(base, save("cascade", vision={"attentional_pool": "cascade"}))
    mean = save("mean", vision={"pool_type": "avg", "final_ln_after_pool": True})  # (CLIPA's)
    with pytest.raises(ValueError, match=r"\{'vision_cfg.final_ln_after_pool': False\}, the base as "
                                         r"\{'vision_cfg.final_ln_after_pool': True\}"):
        _check_quietly(mean, save("mean_normed", vision={"pool_type": "avg"}))
    # (a norm of one token, either way)
    _check_quietly(base, save("token_normed", vision={"final_ln_after_pool": True}))
    hf = {"hf_model_name": "roberta-base", "heads": 4, "layers": 2}
    _check_quietly(save("hf", text=hf, custom_text=True),
                   save("hf_last", text={**hf, "pool_type": "last"}, custom_text=True))
    timm = {"timm_model_name": "vit_tiny_patch16_224"}
    _check_quietly(save("timm", vision=timm), save("timm_avg", vision={**timm, "pool_type": "avg"}))


def test_open_clip_checkpoints_on_hf_text_towers_built_otherwise_are_refused(tmp_path):
    """open_clip's HF text towers (hf_model_name: the XLM-R, RoBERTa, mT5 CLIPs) were compared on nothing of
    their own: another HF model, pooler (hf_pooler_type: mean or CLS) or projection (hf_proj_type) was
    merged in silence, and CLIPTextCfg's heads and causal mask, which such a tower does not read, were filled
    in. Its own fields are compared, open_clip's defaults filled in; a hub name without its owner (the hub's
    legacy names) as its repository's."""

    def save(name, **text):
        return _open_clip_checkpoint(tmp_path / name, vision_cfg={"layers": 2, "width": 32, "head_width": 8},
                                     text_cfg={"hf_model_name": "xlm-roberta-base", **text}, custom_text=True)

    base = save("base")
    with pytest.raises(ValueError, match=r"\{'text_cfg.hf_pooler_type': 'cls_pooler'\}, the base as "
                                         r"\{'text_cfg.hf_pooler_type': 'mean_pooler'\}"):
        _check_quietly(base, save("cls", hf_pooler_type="cls_pooler"))
    with pytest.raises(ValueError, match=r"\{'text_cfg.hf_proj_type': 'linear'\}, the base as "
                                         r"\{'text_cfg.hf_proj_type': 'mlp'\}"):
        _check_quietly(base, save("linear", hf_proj_type="linear"))
    with pytest.raises(ValueError, match=r"\{'text_cfg.hf_model_name': 'FacebookAI/roberta-base'\}, the base as "
                                         r"\{'text_cfg.hf_model_name': 'xlm-roberta-base'\}"):
        _check_quietly(base, save("roberta", hf_model_name="FacebookAI/roberta-base"))
    (tmp_path / "copy").mkdir()
    _check_quietly(base, save("owned", hf_model_name="FacebookAI/xlm-roberta-base", hf_pooler_type="mean_pooler",
                     hf_proj_type="mlp", heads=12, no_causal_mask=True))
    with pytest.raises(ValueError, match=r"\{'text_cfg.hf_model_name': '\S*copy'\}, the base as "
                                         r"\{'text_cfg.hf_model_name': 'xlm-roberta-base'\}"):
        _check_quietly(base, save("local", hf_model_name=str(tmp_path / "copy")))


def test_open_clip_hf_text_towers_of_local_directories_are_compared_by_their_paths(tmp_path):
    """open_clip's hf_model_name may be a local directory, which was compared with nothing: a text tower
    built from a copy of another model (or a hub model's) was merged in silence. It is compared by its
    path (a copy of any model: only the same directory is known to be the same model), and a directory
    named as a hub repository is no legacy name of it."""
    save = functools.partial(_hf_text_tower_checkpoint, tmp_path)

    for copy in ("roberta", "xlm-roberta-base"):
        (tmp_path / "models" / copy).mkdir(parents=True)
    base = save("base", str(tmp_path / "models" / "xlm-roberta-base"))
    _check_quietly(base, save("same", str(tmp_path / "models" / "xlm-roberta-base") + "/"))
    with pytest.raises(ValueError, match=r"\{'text_cfg.hf_model_name': '\S*roberta'\}, the base as "
                                         r"\{'text_cfg.hf_model_name': '\S*xlm-roberta-base'\}"):
        _check_quietly(base, save("other", str(tmp_path / "models" / "roberta")))
    with pytest.raises(ValueError, match=r"\{'text_cfg.hf_model_name': 'xlm-roberta-base'\}, the base as "
                                         r"\{'text_cfg.hf_model_name': '\S*xlm-roberta-base'\}"):
        _check_quietly(base, save("hub", "xlm-roberta-base"))
    with pytest.raises(ValueError, match=r"\{'text_cfg.hf_model_name': './models/roberta'\}, the base as "
                                         r"\{'text_cfg.hf_model_name': 'roberta'\}"):
        _check_quietly(save("relative_base", "roberta"), save("relative", "./models/roberta"))


def test_open_clip_hf_text_towers_of_one_local_directory_spelled_otherwise_are_one_model(tmp_path, monkeypatch):
    """open_clip's hf_model_name of a local directory was compared as written: one directory named ./x and x,
    relative and absolute, or through a link was refused as another model's. Paths are compared as
    transformers reads them, from the working directory, links resolved; a local copy beside the hub name of
    the model it may hold stays refused, saying why."""
    save = functools.partial(_hf_text_tower_checkpoint, tmp_path)

    (tmp_path / "models" / "xlm").mkdir(parents=True)
    (tmp_path / "xlm-roberta-base").symlink_to(tmp_path / "models" / "xlm")
    monkeypatch.chdir(tmp_path)
    base = save("base", "models/xlm")
    for i, name in enumerate(("./models/xlm", str(tmp_path / "models" / "xlm"), "models/../models/xlm/",
                              "xlm-roberta-base")):  # (a directory here: transformers reads it before the hub)
        _check_quietly(base, save(f"same_{i}", name))
    with pytest.raises(ValueError, match=r"\{'text_cfg.hf_model_name': 'models'\}, the base as "):
        _check_quietly(base, save("parent", "models"))
    with pytest.raises(ValueError, match=r"\{'text_cfg.hf_model_name': 'FacebookAI/xlm-roberta-base'\}, the base as "
                                         r"\{'text_cfg.hf_model_name': './models/xlm'\} .*; the local directory "
                                         r"'./models/xlm' \(a copy of any model\) is not known to hold the hub's "
                                         r"'FacebookAI/xlm-roberta-base': name it alike in both configs$"):
        _check_quietly(save("local", "./models/xlm"), save("hub", "FacebookAI/xlm-roberta-base"))


def test_open_clip_hf_text_towers_of_two_owners_repositories_are_refused(tmp_path):
    """open_clip's hf_model_name was compared by its hub repository's name alone, its owner dropped (for the
    hub's legacy names, which leave it out): two owners' models of one name (a fine-tune published as
    someone/xlm-roberta-base) were one text tower. Named with owners they are compared whole; a legacy
    name without one is its repository's under the owner the hub moved it to."""
    save = functools.partial(_hf_text_tower_checkpoint, tmp_path)

    base = save("base", "FacebookAI/xlm-roberta-base")
    with pytest.raises(ValueError, match=r"\{'text_cfg.hf_model_name': 'someone/xlm-roberta-base'\}, the base as "
                                         r"\{'text_cfg.hf_model_name': 'FacebookAI/xlm-roberta-base'\}"):
        _check_quietly(base, save("someone", "someone/xlm-roberta-base"))
    _check_quietly(base, save("legacy", "xlm-roberta-base"))
    _check_quietly(base, save("slash", "FacebookAI/xlm-roberta-base/"))
    with pytest.raises(ValueError, match=r"\{'text_cfg.hf_model_name': 'roberta-base'\}, the base as "
                                         r"\{'text_cfg.hf_model_name': 'FacebookAI/xlm-roberta-base'\}"):
        _check_quietly(base, save("other", "roberta-base"))
    # (a name that is no string, which open_clip cannot build by: refused naming it, not a TypeError)
    with pytest.raises(ValueError, match=r"\{'text_cfg.hf_model_name': 123\}, the base as "
                                         r"\{'text_cfg.hf_model_name': 'FacebookAI/xlm-roberta-base'\}"):
        _check_quietly(base, save("number", 123))


def test_open_clip_hf_legacy_names_are_the_repository_of_their_hub_owner_alone(tmp_path):
    """A hub name without its owner (a legacy name: bert-base-uncased) was one HF model with any owner's
    repository of that name: a fine-tune published as someone/bert-base-uncased was merged as the text tower
    of the canonical model. The hub redirects a legacy name to the one owner it moved under: that owner's
    repository alone is the same model, and a legacy name whose owner is not known here is refused beside an
    owner's repository of its name, saying why."""
    save = functools.partial(_hf_text_tower_checkpoint, tmp_path)

    legacy = save("legacy", "bert-base-uncased")
    _check_quietly(legacy, save("owned", "google-bert/bert-base-uncased"))
    _check_quietly(save("owned_base", "google-bert/bert-base-uncased"), save("legacy_again", "bert-base-uncased"))
    someone = save("someone", "someone/bert-base-uncased")
    for ref, model in ((legacy, someone), (someone, legacy)):
        with pytest.raises(ValueError, match=r"reads its weights as \{'text_cfg.hf_model_name': .*; the hub reads "
                                             r"'bert-base-uncased' as 'google-bert/bert-base-uncased'$"):
            _check_quietly(ref, model)
    with pytest.raises(ValueError, match=r"\{'text_cfg.hf_model_name': 'someone/my-bert'\}, the base as "
                                         r"\{'text_cfg.hf_model_name': 'my-bert'\} .*; 'my-bert' is a legacy hub "
                                         r"name \(no owner\), which the hub redirects to the owner it moved under, "
                                         r"not known here"):
        _check_quietly(save("unknown", "my-bert"), save("unknown_owned", "someone/my-bert"))


def test_open_clip_hub_names_are_compared_in_any_case_as_the_hub_reads_them(tmp_path):
    """The hub's repository ids are case-insensitive (it reads Google-Bert/bert-base-uncased as
    google-bert/bert-base-uncased; huggingface_hub#2090): an open_clip hf_model_name, hf_tokenizer_name or
    timm_model_name of timm's hub written in another case was refused as another model. Hub names are
    compared in any case, a legacy name's owner found in any case; another owner's repository stays refused."""
    def save(name, hf_model_name, timm_model_name="vit_base_patch16_siglip_224", **text):
        return _open_clip_checkpoint(tmp_path / name, vision_cfg={"timm_model_name": timm_model_name},
                                     text_cfg={"hf_model_name": hf_model_name, **text}, custom_text=True)

    base = save("base", "google-bert/bert-base-uncased", hf_tokenizer_name="FacebookAI/roberta-base")
    _check_quietly(base, save("cased", "Google-Bert/BERT-base-uncased", hf_tokenizer_name="facebookai/Roberta-Base",
                              timm_model_name="hf-hub:Timm/ViT_Base_Patch16_SigLIP_224.webli"))
    _check_quietly(base, save("legacy", "BERT-Base-Uncased", hf_tokenizer_name="ROBERTA-base"))
    with pytest.raises(ValueError, match=r"\{'text_cfg.hf_model_name': 'Someone/BERT-base-uncased'\}, the base as "
                                         r".*; the hub reads 'bert-base-uncased' as 'google-bert/bert-base-uncased'$"):
        _check_quietly(save("legacy_base", "bert-base-uncased"), save("someone", "Someone/BERT-base-uncased"))


def test_open_clip_timm_model_names_of_another_owners_hub_repository_are_compared_as_timm_and_the_hub_read_them(
        tmp_path):
    """A timm_model_name of another owner's hub repository (its architecture in its config.json alone) was
    compared as written: hf-hub:Someone/Model and hf-hub:someone/model (one repository: the hub reads ids in any
    case, huggingface_hub#2090), or its prefix as hf_hub: (which timm reads as hf-hub:), were refused as other
    models. The repository is compared in any case, the prefix as timm reads it; a revision (after @) stays in
    its own case (none given: the hub's default branch, main), and another repository or revision is refused."""
    def save(name, timm_model_name):
        return _open_clip_checkpoint(tmp_path / name, vision_cfg={"timm_model_name": timm_model_name},
                                     text_cfg={"width": 32, "heads": 4, "layers": 2})

    written = "hf-hub:someone/vit-finetuned.v2@Release"
    base = save("base", written)
    for i, name in enumerate(("hf-hub:Someone/ViT-Finetuned.v2@Release", "hf_hub:someone/vit-finetuned.v2@Release",
                              "HF_Hub:SOMEONE/vit-finetuned.V2@Release")):
        _check_quietly(base, save(f"same_{i}", name))
    _check_quietly(save("default", "hf-hub:someone/vit-finetuned.v2"),
                   save("main", "hf-hub:Someone/vit-finetuned.v2@main"))
    for i, name in enumerate(("hf-hub:someone/vit-finetuned.v2@release", "hf-hub:someone/vit-finetuned.v3@Release",
                              "hf-hub:other/vit-finetuned.v2@Release", "local-dir:someone/vit-finetuned.v2@Release")):
        with pytest.raises(ValueError, match=rf"\{{'vision_cfg.timm_model_name': '{re.escape(name)}'\}}, the base as "
                                             rf"\{{'vision_cfg.timm_model_name': '{re.escape(written)}'"):
            _check_quietly(base, save(f"other_{i}", name))


def test_open_clip_timm_model_names_of_a_local_directory_here_are_compared_by_its_architecture(tmp_path):
    """open_clip's timm_model_name may name a local directory (local-dir:<directory>), which timm builds as
    the architecture its config.json names: compared as written, a checkpoint naming a copy of its twin's
    timm model was refused as another. A directory here is read for it; one that is not here is compared
    as written, and one whose config.json is no JSON refused naming it."""
    from epmq.merge_checkpoint import _check_architectures

    def save(name, timm_model_name):
        return _open_clip_checkpoint(tmp_path / name, vision_cfg={"timm_model_name": timm_model_name},
                                     text_cfg={"width": 32, "heads": 4, "layers": 2})

    def local(name, config):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(config)
        return f"local-dir:{tmp_path / name}"

    base = save("base", "vit_base_patch16_siglip_224")
    siglip = local("siglip.v2", json.dumps({"architecture": "vit_base_patch16_siglip_224", "num_classes": 0,
                                            "pretrained_cfg": {"tag": "v2"}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_architectures(base, [save("copy", siglip)], ["copy"])
    with pytest.raises(ValueError, match=r"\{'vision_cfg.timm_model_name': 'vit_base_patch16_224'\}, the base as "
                                         r"\{'vision_cfg.timm_model_name': 'vit_base_patch16_siglip_224'\}"):
        _check_architectures(base, [save("other", local("vit", json.dumps({"architecture": "vit_base_patch16_224"})))],
                             ["other"])
    with pytest.raises(ValueError, match=r"\{'vision_cfg.timm_model_name': 'local-dir:\S*absent'\}"):
        _check_architectures(base, [save("absent", f"local-dir:{tmp_path / 'absent'}")], ["absent"])
    with pytest.raises(ValueError, match=r"broken_timm\S*config.json is not valid JSON"):
        _check_architectures(base, [save("broken", local("broken_timm", "{"))], ["broken"])


def test_open_clip_timm_model_names_of_one_local_directory_spelled_otherwise_are_one_model(tmp_path, monkeypatch):
    """open_clip's timm_model_name of a local directory not here (to say its architecture) was compared as
    written: local-dir:./vit and local-dir:vit, relative and absolute, through a link, or its prefix in another
    case (as timm reads it) were refused as other models. Paths are compared as timm reads them, from the
    working directory, links resolved; another directory is refused, showing the name as written."""
    def save(name, timm_model_name):
        return _open_clip_checkpoint(tmp_path / name, vision_cfg={"timm_model_name": timm_model_name},
                                     text_cfg={"width": 32, "heads": 4, "layers": 2})

    (tmp_path / "models" / "vit").mkdir(parents=True)  # (no config.json: its architecture unknown here)
    (tmp_path / "vit_link").symlink_to(tmp_path / "models" / "vit")
    monkeypatch.chdir(tmp_path)
    base = save("base", "local-dir:models/vit")
    for i, name in enumerate(("local-dir:./models/vit", f"local-dir:{tmp_path / 'models' / 'vit'}",
                              "local-dir:models/../models/vit/", "local-dir:vit_link", "Local-Dir:models/vit")):
        _check_quietly(base, save(f"same_{i}", name))
    _check_quietly(save("gone_base", "local-dir:./gone"), save("gone", "local-dir:gone"))
    with pytest.raises(ValueError, match=r"\{'vision_cfg.timm_model_name': 'local-dir:./models'\}, the base as "
                                         r"\{'vision_cfg.timm_model_name': 'local-dir:models/vit'\}"):
        _check_quietly(base, save("parent", "local-dir:./models"))
    with pytest.raises(ValueError, match=r"\{'vision_cfg.timm_model_name': 'vit_base_patch16_224'\}"):
        _check_quietly(base, save("registry", "vit_base_patch16_224"))


def test_open_clip_timm_and_hf_towers_are_not_compared_by_transformer_sizes_they_do_not_read(tmp_path):
    """An image tower naming a timm model and a text tower naming a HF model are built by that model
    alone: the layers, heads and head_width their vision_cfg or text_cfg may also give (CLIPTextCfg's,
    CLIPVisionCfg's, for open_clip's own transformer) build nothing, and two checkpoints giving others were
    refused as counting their layers or reading their weights otherwise."""
    def save(name, **sizes):
        return _open_clip_checkpoint(tmp_path / name, custom_text=True,
                                     vision_cfg={"timm_model_name": "vit_base_patch16_siglip_224", **sizes},
                                     text_cfg={"hf_model_name": "xlm-roberta-base", **sizes})

    _check_quietly(save("base", layers=12, heads=12, head_width=64), save("other", layers=24, heads=16, head_width=80))


def _open_clip_saved(path, model_cfg, tower=None, **changes):
    """An open_clip CLIP checkpoint's directory at ``path``: its config (``model_cfg``, ``changes`` made in
    its ``tower``) and the weights it builds."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    cfg = json.loads(json.dumps(model_cfg))
    if tower:
        cfg[tower].update(changes)
    path.mkdir()
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file({k: v.contiguous() for k, v in CLIP(**cfg).state_dict().items()},
              str(path / "open_clip_model.safetensors"))
    return path


def test_open_clip_checkpoints_whose_blocks_or_projections_are_built_otherwise_are_refused(tmp_path):
    """open_clip's LayerScale (ls_init_value), pre-norm (no_ln_pre), q and k norms, cosine attention, head
    scales, inner norms (qk_norm, scaled_cosine_attn, scale_heads, scale_attn_inner, scale_attn, scale_fc),
    attention pools (attentional_pool) and text projection (proj_type, proj_bias) were compared with nothing:
    an expert built with another had other tensors, merged with a warning that they were copied from the base
    or dropped, the output run as the base's config says. They are compared, open_clip's defaults filled in;
    LayerScale's init value builds the same model, as does a text projection other than "none", and
    "parallel" and "cascade" pools, of the same tensors, read them otherwise."""
    model_cfg = {"embed_dim": 16, "vision_cfg": {"layers": 1, "width": 16, "head_width": 8, "image_size": 16,
                                                  "patch_size": 8, "attn_pooler_queries": 2, "attn_pooler_heads": 2},
                 "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 16, "heads": 2, "layers": 1}}

    def save(name, tower=None, **changes):
        return _open_clip_saved(tmp_path / name, model_cfg, tower, **changes)

    def merge(base, model):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            merge_checkpoints("task_arithmetic", [model], tmp_path / "out", base=base, params={"scale": 1.0},
                              progress=False)

    base = save("base")
    for tower, field, value, default in [
            ("vision_cfg", "ls_init_value", 0.1, None), ("vision_cfg", "no_ln_pre", True, False),
            ("vision_cfg", "qk_norm", True, False), ("vision_cfg", "scaled_cosine_attn", True, False),
            ("vision_cfg", "scale_heads", True, False), ("vision_cfg", "scale_attn_inner", True, False),
            ("vision_cfg", "scale_attn", True, False), ("vision_cfg", "scale_fc", True, False),
            ("vision_cfg", "attentional_pool", True, False), ("text_cfg", "ls_init_value", 0.1, None),
            ("text_cfg", "qk_norm", True, False), ("text_cfg", "proj_type", "none", "linear"),
            ("text_cfg", "proj_bias", True, False)]:
        other = save(f"{tower}_{field}", tower, **{field: value})
        for model, ref, mine, theirs in ((other, base, value, default), (base, other, default, value)):
            with pytest.raises(ValueError, match=re.escape(f"{{'{tower}.{field}': {mine!r}}}, the base as "
                                                           f"{{'{tower}.{field}': {theirs!r}}}")):
                merge(ref, model)
    merge(base, save("defaults", "vision_cfg", ls_init_value=None, no_ln_pre=False, qk_norm=False, scale_fc=False,
                     attentional_pool=""))
    merge(save("layer_scale", "vision_cfg", ls_init_value=1e-5),
          save("layer_scale_0.1", "vision_cfg", ls_init_value=0.1))
    merge(base, save("mlp", "text_cfg", proj_type="mlp"))  # (a text tower's projection: one linear, any but "none")
    with pytest.raises(ValueError, match=r"\{'vision_cfg.attentional_pool': 'cascade'\}, the base as "
                                         r"\{'vision_cfg.attentional_pool': 'parallel'\}"):
        merge(save("parallel", "vision_cfg", attentional_pool="parallel"),
              save("cascade", "vision_cfg", attentional_pool="cascade"))


def test_open_clip_towers_are_compared_by_block_options_they_read(tmp_path):
    """A ResNet image tower, CoCa's decoder (LayerScale alone) and a transformer of open_clip's "default"
    blocks (LayerScale alone) are built without the block options a vision_cfg, text_cfg or multimodal_cfg
    may give; a timm image tower projects its features by its timm_proj and timm_proj_bias (adding weights or
    not), and a text tower appending a class token, built whole, masks the padding its pad_id says."""
    def save(name, vision=(), text=(), **top):
        return _open_clip_checkpoint(tmp_path / name,
                                     vision_cfg={"layers": 2, "width": 32, "head_width": 8, **dict(vision)},
                                     text_cfg={"width": 32, "heads": 4, "layers": 2, **dict(text)}, **top)

    resnet = {"layers": [1, 1, 1, 1], "width": 8}
    _check_quietly(save("resnet", resnet), save("resnet_qk", {**resnet, "qk_norm": True, "no_ln_pre": True}))
    default = {"block_type": "default"}
    _check_quietly(save("default", default), save("default_qk", {**default, "qk_norm": True}))
    with pytest.raises(ValueError, match=r"\{'vision_cfg.ls_init_value': 0.1\}, the base as "
                                         r"\{'vision_cfg.ls_init_value': None\}"):
        _check_quietly(save("default_ls", default), save("default_ls_0.1", {**default, "ls_init_value": 0.1}))
    decoder = {"width": 32, "heads": 4, "layers": 2}
    _check_quietly(save("coca", multimodal_cfg=decoder), save("coca_qk", multimodal_cfg={**decoder, "qk_norm": True}))
    with pytest.raises(ValueError, match=r"\{'multimodal_cfg.ls_init_value': 0.1\}, the base as "
                                         r"\{'multimodal_cfg.ls_init_value': None\}"):
        _check_quietly(save("coca_ls", multimodal_cfg=decoder),
                       save("coca_ls_0.1", multimodal_cfg={**decoder, "ls_init_value": 0.1}))
    timm = {"timm_model_name": "vit_tiny_patch16_224"}
    with pytest.raises(ValueError, match=r"\{'vision_cfg.timm_proj': 'mlp'\}, the base as "
                                         r"\{'vision_cfg.timm_proj': 'linear'\}"):
        _check_quietly(save("timm", timm), save("timm_mlp", {**timm, "timm_proj": "mlp"}))
    with pytest.raises(ValueError, match=r"\{'vision_cfg.timm_proj_bias': True\}, the base as "
                                         r"\{'vision_cfg.timm_proj_bias': False\}"):
        _check_quietly(save("timm_bias", timm), save("timm_bias_true", {**timm, "timm_proj_bias": True}))
    _check_quietly(save("timm_qk", timm), save("timm_qk_true", {**timm, "qk_norm": True, "no_ln_pre": True}))
    for proj in ("none", ""):  # (no projection, or the trunk's head: no timm_proj_bias read)
        _check_quietly(save(f"timm_{proj}", {**timm, "timm_proj": proj}),
                       save(f"timm_{proj}_bias", {**timm, "timm_proj": proj, "timm_proj_bias": True}))
    cls = {"embed_cls": True}
    with pytest.raises(ValueError, match=r"\{'text_cfg.pad_id': 1\}, the base as \{'text_cfg.pad_id': 0\}"):
        _check_quietly(save("cls", text=cls, custom_text=True),
                       save("cls_pad", text={**cls, "pad_id": 1}, custom_text=True))
    # (a CLIP keeps no class token)
    _check_quietly(save("clip_cls", text=cls), save("clip_cls_pad", text={**cls, "pad_id": 1}))
    _check_quietly(save("none", text={"proj_type": "none"}),
                   save("none_bias", text={"proj_type": "none", "proj_bias": True}))


def test_open_clip_checkpoints_of_other_sizes_are_refused_by_their_shapes_and_training_options_merge(tmp_path):
    """The open_clip fields that compare no config field: those that size the weights (mlp_ratio, patch_size,
    image_size, context_length, vocab_size, embed_cls's class token, attn_pooler_queries) are refused by the
    tensors' shapes, naming the tensor; those of training or initialization alone (pos_embed_type, whose fixed
    table the checkpoint holds, an explicit block_type of the blocks built either way, patch_dropout, a text
    tower's final_ln_after_pool, which it does not read) read the same weights alike, and merge."""
    model_cfg = {"embed_dim": 16, "vision_cfg": {"layers": 1, "width": 16, "head_width": 8, "image_size": 16,
                                                  "patch_size": 8, "attentional_pool": True, "attn_pooler_queries": 2,
                                                  "attn_pooler_heads": 2},
                 "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 16, "heads": 2, "layers": 1}}

    def save(name, tower=None, **changes):
        return _open_clip_saved(tmp_path / name, model_cfg, tower, **changes)

    def merge(model):
        merge_checkpoints("task_arithmetic", [model], tmp_path / "out", base=base, params={"scale": 1.0},
                          progress=False)

    base = save("base")
    for tower, field, value, tensor in [
            ("vision_cfg", "mlp_ratio", 2.0, "visual.transformer.resblocks.0.mlp.c_fc.bias"),
            ("vision_cfg", "attn_pooler_queries", 3, "visual.attn_pool.query"),
            ("text_cfg", "context_length", 6, "positional_embedding"),
            ("text_cfg", "vocab_size", 40, "token_embedding.weight"),
            ("text_cfg", "embed_cls", True, "positional_embedding")]:
        with pytest.raises(ValueError, match=re.escape(f"tensor '{tensor}': model 0 ") + r"\S*" + field):
            merge(save(f"{tower}_{field}", tower, **{field: value}))
    for field, value in (("patch_size", 4), ("image_size", 32)):  # (another patch grid: its config says so first)
        with pytest.raises(ValueError, match=r"\{'vision_cfg.grid_size': \[4, 4\]\}, the base as "
                                             r"\{'vision_cfg.grid_size': \[2, 2\]\}"):
            merge(save(f"vision_cfg_{field}", "vision_cfg", **{field: value}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for tower, field, value in [("vision_cfg", "pos_embed_type", "sin_cos_2d"),
                                    ("vision_cfg", "block_type", "custom"), ("vision_cfg", "patch_dropout", 0.5),
                                    ("text_cfg", "block_type", "custom"), ("text_cfg", "final_ln_after_pool", True)]:
            merge(save(f"{tower}_{field}_alike", tower, **{field: value}))
def test_regmeans_budget_and_warning_name_the_routers_of_blocks_an_ordered_dict_named(gen):
    """merge_checkpoints' Gram budget (``_gram_sizes``) and its warning of the weight matrices no Gram
    matrix is collected for (``_warn_averaged_matrices``) named a router of the blocks by its block's
    position (blocks.0.router.weight) where an OrderedDict named the blocks (blocks.first): the budget
    left the routers out (their matrices in no pass, averaged), and the warning checked the wrong name. Each
    names the router's weight, as of the same blocks numbered."""
    from epmq.merge_checkpoint import _gram_sizes, _warn_averaged_matrices
    from epmq.stats import gram_matrices
    from test_merge import routed_stack

    routers = ["blocks.first.router.weight", "blocks.second.router.weight"]
    model = routed_stack(named=True)
    assert list(_gram_sizes(model, ())) == [n for n, p in model.named_parameters() if p.dim() == 2]
    assert list(_gram_sizes(routed_stack(named=False), ())) == [
        "blocks.0.fc.weight", "blocks.0.router.weight", "blocks.1.fc.weight", "blocks.1.router.weight", "head.weight"]
    grams = gram_matrices(model, [torch.randn(2, 5, 8, generator=gen)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_averaged_matrices(model, grams)
    with pytest.warns(UserWarning, match=r"regmean: 2 weight matrices .* \(e\.g\. blocks\.first\.router\.weight "
                                         r"\(3, 8\), blocks\.second\.router\.weight \(3, 8\);"):
        _warn_averaged_matrices(model, {n: G for n, G in grams.items() if n not in routers})


def _open_clip_checkpoint(path, **model_cfg):
    """An open_clip checkpoint's directory at ``path`` holding ``model_cfg`` alone (configs are compared first)."""
    path.mkdir()
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 16, **model_cfg}}))
    return path


def _hf_text_tower_checkpoint(root, name, hf_model_name):
    """``root / name``: a tiny open_clip checkpoint whose text tower is the HF model ``hf_model_name``."""
    return _open_clip_checkpoint(root / name, vision_cfg={"layers": 2, "width": 32, "head_width": 8},
                                 text_cfg={"hf_model_name": hf_model_name}, custom_text=True)


def test_open_clip_quick_gelu_is_not_compared_where_no_tower_is_built_with_it(tmp_path):
    """open_clip's quick_gelu picks the activation of its own transformers alone: a model of a timm image
    tower and a HF text tower (or a ResNet's) reads nothing of it, and two of them written with
    quick_gelu true and false were refused as reading their weights otherwise."""
    timm, hf = {"timm_model_name": "vit_tiny_patch16_224"}, {"hf_model_name": "roberta-base"}
    _check_quietly(_open_clip_checkpoint(tmp_path / "base", vision_cfg=timm, text_cfg=hf),
                   _open_clip_checkpoint(tmp_path / "quick", vision_cfg=timm, text_cfg=hf, quick_gelu=True))
    resnet = {"layers": [1, 1, 1, 1], "width": 32}
    text = {"width": 32, "heads": 4, "layers": 2}  # (open_clip's own: built with it)
    with pytest.raises(ValueError, match=r"\{'quick_gelu': True\}, the base as \{'quick_gelu': False\}"):
        _check_quietly(_open_clip_checkpoint(tmp_path / "resnet", vision_cfg=resnet, text_cfg=text),
                       _open_clip_checkpoint(tmp_path / "resnet_quick", vision_cfg=resnet, text_cfg=text,
                                             quick_gelu=True))


def test_open_clip_text_towers_of_other_tokenizers_are_refused(tmp_path):
    """open_clip's tokenizer fields (hf_tokenizer_name, tokenizer_mode, tokenizer_kwargs) were compared with
    nothing: a text tower fine-tuned on texts another tokenizer read (its embedding rows standing for other
    tokens) was merged in silence. They are compared as open_clip's get_tokenizer reads them (no
    hf_tokenizer_name: its own BPE; a tokenizer's default kwargs written out or left out alike) and refused
    naming the field; a HF text tower's context_length cuts long texts elsewhere, which is warned of."""
    from epmq.merge_checkpoint import _check_architectures

    vision = {"layers": 2, "width": 32, "head_width": 8}

    def save(name, **text):
        return _open_clip_checkpoint(tmp_path / name, vision_cfg=vision,
                                     text_cfg={"width": 32, "heads": 4, "layers": 2, **text})

    def hf(name, **text):
        return _open_clip_checkpoint(tmp_path / name, vision_cfg=vision, custom_text=True,
                                     text_cfg={"hf_model_name": "xlm-roberta-base", **text})

    bpe, siglip = save("bpe"), save("siglip", hf_tokenizer_name="timm/ViT-B-16-SigLIP")
    with pytest.raises(ValueError, match=r"model siglip tokenizes its texts as \{'text_cfg.hf_tokenizer_name': "
                                         r"'timm/ViT-B-16-SigLIP'\}, the base as \{'text_cfg.hf_tokenizer_name': ''\}"):
        _check_quietly(bpe, siglip)
    with pytest.raises(ValueError, match=r"\{'text_cfg.tokenizer_mode': 'clips'\}, the base as "
                                         r"\{'text_cfg.tokenizer_mode': ''\}"):
        _check_quietly(siglip, save("clips", hf_tokenizer_name="timm/ViT-B-16-SigLIP", tokenizer_mode="clips"))
    with pytest.raises(ValueError, match=r"\{'text_cfg.tokenizer_kwargs': \{'clean': 'canonicalize'\}\}, the "
                                         r"base as \{'text_cfg.tokenizer_kwargs': \{\}\}"):
        _check_quietly(siglip, save("canonical", hf_tokenizer_name="timm/ViT-B-16-SigLIP",
                                    tokenizer_kwargs={"clean": "canonicalize"}))
    _check_quietly(siglip, save("siglip_defaults", hf_tokenizer_name="timm/ViT-B-16-SigLIP/", tokenizer_mode=None,
                                tokenizer_kwargs={"clean": "whitespace", "strip_sep_token": False}))
    _check_quietly(bpe, save("bpe_defaults", hf_tokenizer_name="", tokenizer_kwargs={"clean": "lower"}))
    xlm = hf("xlm", hf_tokenizer_name="xlm-roberta-base")
    _check_quietly(xlm, hf("xlm_owned", hf_tokenizer_name="FacebookAI/xlm-roberta-base", context_length=77))
    with pytest.raises(ValueError, match=r"\{'text_cfg.hf_tokenizer_name': 'someone/xlm-roberta-base'\}.*; the hub "
                                         r"reads 'xlm-roberta-base' as 'FacebookAI/xlm-roberta-base'$"):
        _check_quietly(xlm, hf("xlm_someone", hf_tokenizer_name="someone/xlm-roberta-base"))
    with pytest.warns(UserWarning, match=r"model xlm_long tokenizes its texts with \{'text_cfg.context_length': "
                                         r"128\}, the base with \{'text_cfg.context_length': 77\}"):
        _check_architectures(xlm, [hf("xlm_long", hf_tokenizer_name="xlm-roberta-base", context_length=128)],
                             ["xlm_long"])


def _word_tokenizer(directory, words, **special):
    """A tokenizer of one token a word (``words``, the first the unknown one) saved into ``directory``."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token=words[0], **special).save_pretrained(directory)


def test_open_clip_models_tokenized_by_their_directories_other_tokenizer_files_are_refused(tmp_path):
    """open_clip's get_tokenizer reads a HF tokenizer (hf_tokenizer_name) of a model loaded from its directory
    (local-dir:) from that directory's files, not the name: a fine-tune holding another vocabulary under the
    same hf_tokenizer_name was merged in silence, the merged model then tokenizing by the base's files. A file
    both directories hold with other contents is refused, naming it, unless both load as one tokenizer (saved
    otherwise); a file one lacks, or a text tower of open_clip's own BPE (which reads no files), is not."""
    def save(name, words=("<unk>", "cat", "dog"), hf_tokenizer_name="someone/tok", **special):
        path = _open_clip_checkpoint(tmp_path / name, vision_cfg={"layers": 2, "width": 32, "head_width": 8},
                                     text_cfg={"width": 32, "heads": 4, "layers": 2,
                                               "hf_tokenizer_name": hf_tokenizer_name})
        if words:
            _word_tokenizer(path, list(words), **special)
        return path

    base = save("base")
    with pytest.raises(ValueError, match=r"model \S*swapped holds other tokenizer files than the base \(other "
                                         r"contents of tokenizer\.json\): open_clip tokenizes a model loaded from "
                                         r"its directory \(local-dir:\) by that directory's own files"):
        _check_quietly(base, save("swapped", ("<unk>", "dog", "cat")))
    with pytest.raises(ValueError, match=r"\(other contents of \S* ?tokenizer_config\.json\)"):  # (its pad token)
        _check_quietly(base, save("padded", pad_token="dog"))
    resaved = save("resaved", words=())  # (the base's tokenizer written otherwise: another JSON layout, option)
    for name, option in (("tokenizer.json", {}), ("tokenizer_config.json", {"padding_side": "left"})):
        (resaved / name).write_text(json.dumps({**json.loads((base / name).read_text()), **option}))
    _check_quietly(base, resaved)
    _check_quietly(base, save("without", words=()))
    _check_quietly(save("bpe_base", hf_tokenizer_name=""), save("bpe", ("<unk>", "dog", "cat"), hf_tokenizer_name=""))


def test_open_clip_models_tokenized_by_files_one_directory_holds_alone_or_by_a_lora_adapters_are_refused(tmp_path):
    """Only the tokenizer files both directories held were compared: a fine-tune saving the base's files and an
    added_tokens.json (tokens added in training, which transformers reads into the tokenizer) was merged in
    silence, as was a LoRA adapter holding its own tokenizer, or one without files (tokenized by its base's)
    beside a model of another vocabulary. A file one holds alone is refused, naming it and whose it is, where
    the two do not load as one tokenizer; one that changes nothing (a special_tokens_map.json restating the
    unknown token), or a README, is not."""
    def save(name, words=("<unk>", "cat", "dog")):
        text = {"width": 32, "heads": 4, "layers": 2, "hf_tokenizer_name": "someone/tok"}
        path = _open_clip_checkpoint(tmp_path / name, vision_cfg={"layers": 2, "width": 32, "head_width": 8},
                                     text_cfg=text)
        if words:
            _word_tokenizer(path, list(words))
        return path

    def adapter(name, base, words=()):
        path = tmp_path / name
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                              "base_model_name_or_path": str(base)}))
        if words:
            _word_tokenizer(path, list(words))
        return path

    base = save("base")
    added = save("added")
    (added / "added_tokens.json").write_text(json.dumps({"<new>": 3}))
    with pytest.raises(ValueError, match=r"model added holds other tokenizer files than the base \(added_tokens\.json: "
                                         r"model added's alone\): open_clip tokenizes"):
        _check_quietly(base, added)
    with pytest.raises(ValueError, match=r"model base holds other tokenizer files than the base \(added_tokens\.json: "
                                         r"the base's alone\)"):
        _check_quietly(added, base)
    plain = save("plain")
    (plain / "special_tokens_map.json").write_text(json.dumps({"unk_token": "<unk>"}))
    (plain / "README.md").write_text("a fine-tune\n")
    _check_quietly(base, plain)
    with pytest.raises(ValueError, match=r"model own holds other tokenizer files than the base \(other contents of "
                                         r"tokenizer\.json\)"):
        _check_quietly(base, adapter("own", base, ("<unk>", "cat", "dog", "<new>")))
    _check_quietly(base, adapter("bare", base))
    with pytest.raises(ValueError, match=r"model swapped holds other tokenizer files than the base \(other contents "
                                         r"of tokenizer\.json\)"):
        _check_quietly(adapter("on_base", base), save("swapped", ("<unk>", "dog", "cat")))


def _slow_bpe_tokenizer(directory, merges):
    """CTRL's BPE tokenizer (a slow one alone in transformers 5: no tokenizers pipeline) of a few words, merging
    characters by ``merges``, saved into ``directory``."""
    from transformers import CTRLTokenizer

    words = ["<unk>", "c@@", "a@@", "t", "d@@", "o@@", "g", "ca", "cat"]
    (directory / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(words)}))
    (directory / "merges.txt").write_text("".join(f"{pair}\n" for pair in ["#version: 0.2", *merges]))
    CTRLTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt")).save_pretrained(directory)


def test_open_clip_models_of_slow_tokenizers_that_load_alike_are_not_refused(tmp_path):
    """Tokenizers without a tokenizers pipeline (transformers 5's slow ones, CTRL's) were never taken to load
    alike, so a fine-tune's harmless special_tokens_map.json restating the unknown token was refused. They are
    compared by their class, vocabulary, special tokens and what they read a probe text as: other merges or
    another unknown token are still refused."""
    def save(name, merges=("c a", "ca t</w>")):
        path = _open_clip_checkpoint(tmp_path / name, vision_cfg={"layers": 2, "width": 32, "head_width": 8},
                                     text_cfg={"width": 32, "heads": 4, "layers": 2,
                                               "hf_tokenizer_name": "someone/tok"})
        _slow_bpe_tokenizer(path, merges)
        return path

    base = save("base")
    plain = save("plain")
    (plain / "special_tokens_map.json").write_text(json.dumps({"unk_token": "<unk>"}))
    _check_quietly(base, plain)
    with pytest.raises(ValueError, match=r"model unmerged holds other tokenizer files than the base \(other contents "
                                         r"of merges\.txt\)"):
        _check_quietly(base, save("unmerged", merges=("c a",)))
    unknown = save("unknown")  # (unknown characters read as "cat")
    (unknown / "tokenizer_config.json").write_text(json.dumps(
        {**json.loads((base / "tokenizer_config.json").read_text()), "unk_token": "cat"}))
    with pytest.raises(ValueError, match=r"model unknown holds other tokenizer files than the base \(other contents "
                                         r"of tokenizer_config\.json\)"):
        _check_quietly(base, unknown)


def test_open_clip_models_of_a_slow_tokenizer_and_a_fast_one_that_read_alike_are_not_refused(tmp_path):
    """A directory of a slow tokenizer alone (transformers 5's BertJapaneseTokenizer: no tokenizers pipeline) beside
    one of a fast tokenizer alone (BertTokenizer's tokenizer.json) was refused whatever they read: one's pipeline
    was compared with the other's reading of the probe. They are compared as two slow ones are, but for their
    classes, which differ: by vocabulary, special tokens and what they read the probe as. A fast one splitting
    the probe's CJK characters apart, which the slow one reads as one word, is still refused."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Hello", ",", "WORLD", "!", "it", "'", "s", "3", ".",
             "na", "##ï", "##ve", "Café", "—", "東", "京", "end"]

    def save(name, tokenizer):
        path = _open_clip_checkpoint(tmp_path / name, vision_cfg={"layers": 2, "width": 32, "head_width": 8},
                                     text_cfg={"width": 32, "heads": 4, "layers": 2,
                                               "hf_tokenizer_name": "someone/tok"})
        (path / "vocab.txt").write_text("".join(f"{w}\n" for w in words))
        tokenizer(str(path / "vocab.txt")).save_pretrained(path)
        if tokenizer is not slow_tokenizer:
            (path / "vocab.txt").unlink(missing_ok=True)  # (its tokenizer.json alone)
        return path

    def slow_tokenizer(vocab):
        return transformers.BertJapaneseTokenizer(vocab, word_tokenizer_type="basic", do_lower_case=False)

    slow = save("slow", slow_tokenizer)
    _check_quietly(slow, save("whole", lambda vocab: transformers.BertTokenizer(
        vocab=vocab, do_lower_case=False, tokenize_chinese_chars=False)))
    with pytest.raises(ValueError, match=r"model split holds other tokenizer files than the base \(other contents of "
                                         r"tokenizer_config\.json; tokenizer\.json: model split's alone; vocab\.txt: "
                                         r"the base's alone\)"):
        _check_quietly(slow, save("split", lambda vocab: transformers.BertTokenizer(vocab=vocab, do_lower_case=False)))


def test_a_lora_adapter_without_tokenizer_files_is_tokenized_by_the_base_it_is_merged_on(tmp_path):
    """An adapter holding no tokenizer files is tokenized by its base's, and the merge reads it on lora_base (or
    the merge's base) where one is given: its files were taken from the base its config names, so an adapter
    merged on a base of another vocabulary than its fellow models was merged in silence."""
    def save(name, words):
        text = {"width": 32, "heads": 4, "layers": 2, "hf_tokenizer_name": "someone/tok"}
        path = _open_clip_checkpoint(tmp_path / name, vision_cfg={"layers": 2, "width": 32, "head_width": 8},
                                     text_cfg=text)
        _word_tokenizer(path, list(words))
        return path

    named, given = save("named", ("<unk>", "cat", "dog")), save("given", ("<unk>", "dog", "cat"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                             "base_model_name_or_path": str(named)}))
    with pytest.raises(ValueError, match=r"model \S*fellow holds other tokenizer files than the first model "
                                         r"\(other contents of tokenizer\.json\)"):
        merge_checkpoints("average", [adapter, save("fellow", ("<unk>", "cat", "dog"))], tmp_path / "out",
                          lora_base=given)
    # (its config too is the base's it is read on: one naming a base not found was compared with nothing)
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                             "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(ValueError, match=r"model \S*fellow holds other tokenizer files than the first model"):
        merge_checkpoints("average", [adapter, tmp_path / "fellow"], tmp_path / "out", lora_base=given)


def test_open_clip_vits_of_a_transposed_patch_grid_are_refused(tmp_path):
    """An open_clip ViT's position embeddings are one per patch of its image_size // patch_size grid: a
    rectangular image_size transposed ([16, 32] against [32, 16], the same patch) holds tensors of the same
    shapes for other positions, and was merged in silence. Their grids are compared; one image_size of the
    same grid (a square one written as a number or a pair, a remainder no patch reads) is the same model."""
    def vit(name, **vision):
        return _open_clip_checkpoint(tmp_path / name, vision_cfg={"layers": 2, "width": 32, "head_width": 8,
                                                                  "patch_size": 8, **vision})

    with pytest.raises(ValueError, match=r"\{'vision_cfg.grid_size': \[4, 2\]\}, the base as "
                                         r"\{'vision_cfg.grid_size': \[2, 4\]\}"):
        _check_quietly(vit("wide", image_size=[16, 32]), vit("tall", image_size=[32, 16]))
    _check_quietly(vit("square", image_size=16), vit("pair", image_size=[16, 16]))
    _check_quietly(vit("square_again", image_size=16), vit("remainder", image_size=[17, 23]))
    with pytest.raises(ValueError, match=r"\{'vision_cfg.grid_size': \[14, 14\]\}"):  # (open_clip's 224 image)
        _check_quietly(vit("small", image_size=16), vit("default", patch_size=16))


def test_open_clip_models_of_another_logit_bias_or_text_tower_layout_are_refused(tmp_path):
    """open_clip builds a logit_bias parameter (SigLIP's) where init_logit_bias is given, and holds its text
    tower's tensors apart (text.*, CustomTextCLIP) where custom_text is, at the CLIP's top otherwise: such
    models merged beside others had the tensor or the whole text tower copied from the base with a warning.
    Refused; any init_logit_bias builds the same parameter (its value initializes it)."""
    vision, text = {"layers": 2, "width": 32, "head_width": 8}, {"width": 32, "heads": 4, "layers": 2}

    def save(name, **top):
        return _open_clip_checkpoint(tmp_path / name, vision_cfg=vision, text_cfg=text, **top)

    with pytest.raises(ValueError, match=r"\{'init_logit_bias': -10\}, the base as \{'init_logit_bias': None\}"):
        _check_quietly(save("base"), save("siglip", init_logit_bias=-10))
    _check_quietly(save("siglip_base", init_logit_bias=-10), save("siglip_other", init_logit_bias=-5.0))
    with pytest.raises(ValueError, match=r"\{'custom_text': True\}, the base as \{'custom_text': False\}"):
        _check_quietly(save("clip"), save("custom", custom_text=True))
    _check_quietly(save("custom_base", custom_text=True), save("custom_again", custom_text=True))


def test_open_clip_coca_beside_a_custom_text_clip_is_refused(tmp_path):
    """open_clip builds a CoCa, its captioning decoder's tensors text_decoder.*, where model_cfg has a
    multimodal_cfg, and a CustomTextCLIP without one, both custom_text: the decoder was compared only
    where both configs had it, and a CoCa merged beside a CustomTextCLIP had it copied from the base or
    dropped with a warning. Refused, naming multimodal_cfg, either way round; two CoCas are compared by
    their decoders' own fields."""
    vision, text = {"layers": 2, "width": 32, "head_width": 8}, {"width": 32, "heads": 4, "layers": 2}
    decoder = {"width": 32, "heads": 4, "layers": 2}

    def save(name, **top):
        return _open_clip_checkpoint(tmp_path / name, vision_cfg=vision, text_cfg=text, custom_text=True, **top)

    custom, coca = save("custom"), save("coca", multimodal_cfg=decoder)
    with pytest.raises(ValueError, match=r"reads its weights as \{'multimodal_cfg': \{.*\}, the base as "
                                         r"\{'multimodal_cfg': None\}"):
        _check_quietly(custom, coca)
    with pytest.raises(ValueError, match=r"reads its weights as \{'multimodal_cfg': None\}, the base as "
                                         r"\{'multimodal_cfg': \{.*\}"):
        _check_quietly(coca, custom)
    _check_quietly(coca, save("coca_again", multimodal_cfg=decoder))
