"""mergekit configs run by ``epmq merge``: each translated setting, and every refusal.

(That the translations give mergekit's own tensors is measured against mergekit itself in
``benchmarks/side_by_side_mergekit.py``: mergekit is not a dependency.)"""

import json
import warnings

import pytest
import torch
import transformers
import yaml

from epmq import merge
from epmq.benches.tiny import perturb, word_level_tokenizer
from epmq.cli import main
from epmq.mergekit_config import Schedule, from_mergekit, is_mergekit, num_layers


def gta(method, parameters=None, per_model=({"weight": 1.0}, {"weight": 0.5}), base="base", **extra):
    """A mergekit config of ``method`` with models e0, e1 (and their parameters)."""
    config = dict(merge_method=method, base_model=base,
                  models=[dict(model=f"e{k}", parameters=dict(p)) for k, p in enumerate(per_model)], **extra)
    if parameters is not None:
        config["parameters"] = parameters
    return config


@pytest.mark.parametrize("config, expected", [
    # mergekit's defaults stated: lambda 1, TIES's normalize (the disjoint mean), density 1
    (gta("task_arithmetic", {"lambda": 0.4}),
     dict(method="task_arithmetic", params=dict(scale=0.4, weights=[1.0, 0.5]))),
    (gta("task_arithmetic", {"normalize": True}),
     dict(method="task_arithmetic", params=dict(scale=1.0, weights=[1 / 1.5, 0.5 / 1.5]))),
    (gta("ties", {"lambda": 0.8, "int8_mask": True},
         [{"weight": 1.0, "density": 0.2}, {"weight": 2.0, "density": 0.2}]),
     dict(method="ties", params=dict(scale=0.8, weights=[1.0, 2.0], density=0.2, scope="tensor", merge="mean",
                                     convention="mergekit"))),
    (gta("ties", {"normalize": False}),
     dict(method="ties", params=dict(scale=1.0, weights=[1.0, 0.5], density=1.0, scope="tensor", merge="sum",
                                     convention="mergekit"))),
    (gta("breadcrumbs", {"normalize": True}, [{"weight": 1.0, "density": 0.9, "gamma": 0.02}] * 2),
     dict(method="breadcrumbs", params=dict(scale=1.0, weights=[0.5, 0.5], density=0.9, gamma=0.02,
                                            merge="sum", consensus=None, convention="mergekit"))),
    (gta("breadcrumbs_ties", None, [{"weight": 1.0}, {"weight": 3.0}]),
     dict(method="breadcrumbs", params=dict(scale=1.0, weights=[1.0, 3.0], density=1.0, gamma=0.01,
                                            merge="sum", consensus="sign", convention="mergekit"))),
    (gta("linear", None, [{"weight": 1.0}, {"weight": 3.0}], base=None),
     dict(method="average", base=None, params=dict(weights=[1.0, 3.0]))),
    (gta("model_stock", {"filter_wise": True}, [{}, {}]),
     dict(method="model_stock", params=dict(per_row=True, convention="mergekit"))),
    # densities that differ: one per model
    (gta("ties", None, [{"weight": 1.0, "density": 0.2}, {"weight": 1.0}]),
     dict(method="ties", params=dict(scale=1.0, weights=[1.0, 1.0], density=[0.2, 1.0], scope="tensor",
                                     merge="mean", convention="mergekit"))),
    # a per-model parameter for all, in parameters: (a model's own comes first)
    (gta("ties", {"weight": 0.3, "density": 0.5}, [{}, {"weight": 2.0}]),
     dict(method="ties", params=dict(scale=1.0, weights=[0.3, 2.0], density=0.5, scope="tensor", merge="mean",
                                     convention="mergekit"))),
    # linear averages every model it lists, the base too, and adds it where it is not listed
    (dict(gta("linear", None, [{"weight": 1.0}, {"weight": 3.0}]), models=[
        {"model": "base", "parameters": {"weight": 2.0}}, {"model": "e0", "parameters": {"weight": 1.0}}]),
     dict(method="average", base=None, models=["base", "e0"], params=dict(weights=[2.0, 1.0]), files_from="base")),
    (gta("linear", {"weight": 0.5}, [{"weight": 1.0}, {}]),
     dict(method="average", base=None, models=["e0", "e1", "base"], params=dict(weights=[1.0, 0.5, 0.5]),
          files_from="base")),
])
def test_each_method_and_its_defaults(config, expected):
    assert is_mergekit(config)
    translated = from_mergekit(config)
    assert translated == dict(dict(base="base", models=["e0", "e1"], dtype=None), **expected)


def test_sce():
    assert from_mergekit(gta("sce", {"select_topk": 0.3, "int8_mask": True}, [{}, {}])) == dict(
        method="sce", base="base", models=["e0", "e1"], dtype=None, params=dict(select_topk=0.3))
    with pytest.warns(UserWarning, match="sce: weight is not read"):  # (mergekit ignores it too)
        assert from_mergekit(gta("sce"))["params"] == dict(select_topk=1.0)
    # int8_mask (mergekit's memory) is read nowhere, whatever the method
    assert from_mergekit(gta("linear", {"int8_mask": True}, base=None))["method"] == "average"
    # linear without normalize: the weighted sum, which is the average where the weights sum to 1
    assert from_mergekit(gta("linear", {"normalize": False}, [{"weight": 0.5}, {"weight": 0.5}], base=None))[
        "params"] == dict(weights=[0.5, 0.5])
    # weights written in decimals that sum to 1 in binary only to 1e-16 (0.7 + 0.2 + 0.1)
    decimals = gta("linear", {"normalize": False}, [{"weight": 0.7}, {"weight": 0.2}, {"weight": 0.1}], base=None)
    assert from_mergekit(decimals)["params"] == dict(weights=[0.7, 0.2, 0.1])


def test_nuslerp():
    config = gta("nuslerp", {"nuslerp_flatten": False}, [{"weight": 1.0}, {"weight": 3.0}])
    config["models"].insert(0, {"model": "base"})  # (listed: it is still the base)
    assert from_mergekit(config) == dict(method="nuslerp", base="base", models=["e0", "e1"], dtype=None,
                                         params=dict(weights=[1.0, 3.0], row_wise=False, flatten=False))
    assert from_mergekit(gta("nuslerp", base=None))["base"] is None
    with pytest.raises(ValueError, match="nuslerp interpolates two models besides the base, got 3"):
        from_mergekit(gta("nuslerp", per_model=[{"weight": 1.0}] * 3))
    with pytest.raises(ValueError, match="weight is missing"):
        from_mergekit(gta("nuslerp", per_model=[{}, {}]))


def test_multislerp():
    assert from_mergekit(gta("multislerp", {"eps": 1e-6}, [{"weight": 1.0}, {"weight": 2.0}], base=None)) == dict(
        method="multislerp", base=None, models=["e0", "e1"], dtype=None,
        params=dict(weights=[1.0, 2.0], normalize_weights=True, eps=1e-6))


def test_karcher_takes_every_model():
    """mergekit's Karcher mean averages every model, the base among them (last where it is not
    listed, as mergekit orders them: the same sums, bit for bit)."""
    assert from_mergekit(gta("karcher", {"max_iter": 20}, [{}, {}])) == dict(
        method="karcher", base=None, models=["e0", "e1", "base"], dtype=None, params=dict(max_iter=20, tol=1e-5),
        files_from="base")
    listed = gta("karcher", None, [{}, {}])
    listed["models"].insert(0, {"model": "base"})
    assert from_mergekit(listed)["models"] == ["base", "e0", "e1"]
    with pytest.raises(ValueError, match="max_iter must be a whole number"):
        from_mergekit(gta("karcher", {"max_iter": 2.5}, [{}, {}]))


def test_nearswap():
    config = gta("nearswap", {"t": "1e-3"}, [{}])
    assert from_mergekit(config) == dict(method="nearswap", base="base", models=["e0"], dtype=None,
                                         params=dict(t=0.001))
    with pytest.raises(ValueError, match="nearswap needs base_model and parameters.t"):
        from_mergekit(gta("nearswap", None, [{}]))
    with pytest.raises(ValueError, match="toward one other model, got 2"):
        from_mergekit(gta("nearswap", {"t": 0.1}, [{}, {}]))


def test_ram_ramplus_and_arcee_fusion():
    """RAM and RAM+ (mergekit's tensor-local ramplus_tl) with mergekit's defaults stated; a
    per-model weight, which they ignore as mergekit does, is warned of; Arcee Fusion fuses one
    model into the base."""
    assert from_mergekit(gta("ram", None, [{}, {}])) == dict(method="ram", base="base", models=["e0", "e1"],
                                                             dtype=None, params=dict(epsilon=1e-5))
    assert from_mergekit(gta("ramplus_tl", {"r": 0.5}, [{}, {}]))["params"] == dict(r=0.5, alpha=0.2, epsilon=1e-5)
    assert from_mergekit(gta("ramplus_tl", None, [{}, {}]))["method"] == "ram_plus"
    with pytest.warns(UserWarning, match="ram: weight is not read"):
        from_mergekit(gta("ram"))
    assert from_mergekit(gta("arcee_fusion", None, [{}])) == dict(method="arcee_fusion", base="base", models=["e0"],
                                                                  dtype=None, params={})
    with pytest.raises(ValueError, match="fuses one other model into the base, got 2"):
        from_mergekit(gta("arcee_fusion", None, [{}, {}]))
    with pytest.raises(ValueError, match="ram needs base_model"):
        from_mergekit(gta("ram", None, [{}, {}], base=None))


def test_dare_is_the_same_merge_with_its_own_masks():
    """DARE-TIES and DARE-linear with mergekit's defaults (L1 rescaling, no normalize): epmq's
    DARE, said to draw its own masks."""
    config = gta("dare_ties", {"lambda": 0.5}, [{"weight": 1.0, "density": 0.4}, {"weight": 0.5, "density": 0.6}])
    with pytest.warns(UserWarning, match="dare_ties: DARE drops random entries, and epmq draws its masks"):
        translated = from_mergekit(config)
    assert translated == dict(method="dare", base="base", models=["e0", "e1"], dtype=None, params=dict(
        scale=0.5, weights=[1.0, 0.5], density=[0.4, 0.6], merge="sum", convention="mergekit", consensus="sign",
        rescale="l1", seed=0))
    with warnings.catch_warnings():  # (density 1: no mask is drawn, so nothing to warn of)
        warnings.simplefilter("error")
        translated = from_mergekit(gta("dare_linear", {"rescale": False, "normalize": True}))
    assert translated["params"] == dict(scale=1.0, weights=[1 / 1.5, 0.5 / 1.5], density=1.0, merge="sum",
                                        convention="mergekit", consensus=None, rescale=None, seed=0)


def test_della_is_the_same_merge_with_its_own_masks():
    """DELLA and DELLA-linear with mergekit's defaults (epsilon 0.15, L1 rescaling; DELLA's
    normalize, the disjoint mean): epmq's DELLA in mergekit's convention, said to draw its own
    masks; epsilon per model where the models give their own."""
    config = gta("della", {"lambda": 0.9}, [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}])
    with pytest.warns(UserWarning, match="della: DELLA drops random entries"):
        translated = from_mergekit(config)
    assert translated == dict(method="della", base="base", models=["e0", "e1"], dtype=None, params=dict(
        scale=0.9, weights=[1.0, 0.5], density=0.5, epsilon=0.15, merge="mean", convention="mergekit",
        consensus="sign", rescale="l1", seed=0))
    config = gta("della_linear", {"epsilon": 0.1}, [{"weight": 1.0, "density": 0.4},
                                                     {"weight": 1.0, "density": 0.6, "epsilon": 0.2}])
    with pytest.warns(UserWarning, match="della_linear"):
        translated = from_mergekit(config)
    assert translated["params"] == dict(scale=1.0, weights=[1.0, 1.0], density=[0.4, 0.6], epsilon=[0.1, 0.2],
                                        merge="sum", convention="mergekit", consensus=None, rescale="l1", seed=0)


def test_the_base_among_the_models_slerp_and_dtypes():
    config = gta("ties", None, [{"weight": 1.0, "density": 0.5}] * 2, dtype="bfloat16")
    config["models"].insert(0, {"model": "base"})  # (mergekit configs often list it)
    assert from_mergekit(config)["models"] == ["e0", "e1"]
    assert from_mergekit(config)["dtype"] == "bfloat16"
    assert from_mergekit(dict(config, out_dtype="float16"))["dtype"] == "float16"
    assert from_mergekit(dict(config, out_dtype=None))["dtype"] == "bfloat16"  # (`out_dtype:` left empty)
    # (mergekit reads its dtypes with torch.'s prefix too: 'torch.bfloat16' was refused as no dtype)
    assert from_mergekit(dict(config, dtype="torch.bfloat16"))["dtype"] == "bfloat16"
    assert from_mergekit(dict(config, out_dtype="torch.float16"))["dtype"] == "float16"
    assert from_mergekit(gta("ties", {"lambda": "5e-1"}))["params"]["scale"] == 0.5  # (YAML's string)
    with pytest.warns(UserWarning, match="task_arithmetic: density is not read"):  # (as mergekit: ignored)
        assert "density" not in from_mergekit(gta("task_arithmetic", None, [{"weight": 1, "density": 0.3},
                                                                            {"weight": 1, "density": 0.5}]))["params"]
    slerp = dict(merge_method="slerp", base_model="e1", parameters={"t": 0.3},
                 models=[{"model": "e0"}, {"model": "e1"}])
    assert from_mergekit(slerp) == dict(method="slerp", base=None, models=["e1", "e0"],
                                        params=dict(t=0.3), dtype=None)


@pytest.mark.parametrize("config, match", [
    (gta("passthrough"), "'passthrough' is not translated; translated: task_arithmetic, ties"),
    (gta("ties", slices=[]), "give models or slices, not both"),
    (gta("ties", lora_merge_cache="/tmp"), "lora_merge_cache not supported"),
    (gta("ties", {"lambda": [0, 0.5, 1]}), "parameters.lambda is a gradient or a per-tensor filter"),
    (gta("ties", {"lambda": [{"filter": "mlp", "value": 0.5}, {"value": 1}]}), "parameters.lambda is a gradient"),
    (gta("ties", {"rescale": True}), "rescale: true rescales the kept entries by the L1 norm"),
    (gta("ties", None, [{"weight": 1}, {"density": 0.5}]), r"models\[1\].parameters.weight is missing"),
    (gta("linear", None, [{"weight": 1}, {"weight": 1}]),
     r"base_model \(added to linear's models\).weight is missing"),
    (gta("ties", None, [{"weight": 1, "epsilon": 0.1}] * 2), r"models\[0\].parameters: epsilon not read"),
    (gta("ties", {"normalise": True}), "parameters: normalise not read by this method here"),
    (gta("ties", {"lambda": float("nan")}), "parameters.lambda must be a finite number"),
    (gta("ties", {"lambda": "one"}), "parameters.lambda must be a finite number, got 'one'"),
    (gta("linear", {"normalize": False}, base=None), "linear with normalize: false is a weighted sum"),
    (gta("ties", base=None), "ties needs base_model"),
    (dict(merge_method="ties", base_model="base", models=["e0", "e1"]), r"models\[0\] must be a mapping"),
    (dict(merge_method="ties", base_model="base", models=[{"model": "e0+lora/dir"}]), "is a model\\+LoRA source"),
    (dict(merge_method="ties", base_model="base", models=[{"model": "base"}]), "lists no model but the base"),
    (dict(merge_method="slerp", base_model="e2", parameters={"t": 0.3}, models=[{"model": "e0"}, {"model": "e1"}]),
     "slerp interpolates from base_model to the other of two models"),
    (dict(merge_method="slerp", base_model="e0", models=[{"model": "e0"}, {"model": "e1"}]),
     "slerp needs parameters.t"),
])
def test_what_is_not_translated_is_refused(config, match):
    with pytest.raises(ValueError, match=match):
        from_mergekit(config)


def test_epmq_merge_runs_a_mergekit_config(tmp_path, capsys):
    """The YAML a mergekit user has, run by ``epmq merge``: the checkpoint of the merge it
    states, in epmq's terms (printed), and a refusal is one error line naming the file."""
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False))
    base.save_pretrained(tmp_path / "base")
    noise = torch.Generator().manual_seed(1)
    experts = [perturb(base, noise, scale=0.05) for _ in range(2)]
    for k, expert in enumerate(experts):
        expert.save_pretrained(tmp_path / f"e{k}")
    config = dict(merge_method="ties", base_model=str(tmp_path / "base"), dtype="float32",
                  parameters={"lambda": 0.7, "normalize": True},
                  models=[{"model": str(tmp_path / "base")}]
                  + [{"model": str(tmp_path / f"e{k}"), "parameters": {"weight": w, "density": 0.3}}
                     for k, w in enumerate((1.0, 0.5))])
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "mk.yaml"), str(tmp_path / "out")]) == 0
    assert "mergekit config read as: {'method': 'ties'" in capsys.readouterr().out
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    expected = merge.ties(base.state_dict(), [e.state_dict() for e in experts], scale=0.7, density=0.3,
                          scope="tensor", merge="mean", weights=[1.0, 0.5], convention="mergekit")
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    # DELLA: the merge epmq.merge makes with its own masks (seed 0), warned
    della = dict(config, merge_method="della", parameters={"lambda": 0.7, "epsilon": 0.2})
    (tmp_path / "della.yaml").write_text(yaml.safe_dump(della))
    assert main(["merge", str(tmp_path / "della.yaml"), str(tmp_path / "della")]) == 0
    assert "della.yaml: note: della: DELLA drops random entries" in capsys.readouterr().err  # (a line, not a warning)
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "della").state_dict()
    expected = merge.della(base.state_dict(), [e.state_dict() for e in experts], scale=0.7, density=0.3,
                           epsilon=0.2, weights=[1.0, 0.5], rescale="l1", convention="mergekit", seed=0)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert not torch.equal(got["model.layers.0.mlp.up_proj.weight"],
                           base.state_dict()["model.layers.0.mlp.up_proj.weight"])
    # linear and karcher average the base as one of the models; the output has its files, as mergekit's
    for k, expert in enumerate(experts):
        expert.generation_config.update(do_sample=True, temperature=0.1 + k)
        expert.save_pretrained(tmp_path / f"e{k}")
    for method in ("linear", "karcher"):
        averaged = dict(config, merge_method=method, parameters={"weight": 1.0},
                        models=[{"model": str(tmp_path / f"e{k}")} for k in range(2)])
        (tmp_path / f"{method}.yaml").write_text(yaml.safe_dump(averaged))
        assert main(["merge", str(tmp_path / f"{method}.yaml"), str(tmp_path / method)]) == 0
        written = json.loads((tmp_path / method / "generation_config.json").read_text())
        assert "temperature" not in written, f"{method}: the generation config of a model, not the base's"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(dict(config, merge_method="passthrough")))
    assert main(["merge", str(tmp_path / "bad.yaml"), str(tmp_path / "out2")]) == 2
    assert "bad.yaml: mergekit merge_method 'passthrough' is not translated" in capsys.readouterr().err


def test_models_pinned_to_a_hub_revision(tmp_path, monkeypatch, capsys):
    """mergekit's ``org/name@revision`` (a branch, tag or commit of a hub repository) names that
    revision's snapshot, as mergekit downloads it, not main's (here the hub's cache, offline,
    main moved on to other weights); its layer count is read there too."""
    import huggingface_hub.constants as hub

    old, new = "1" * 40, "2" * 40
    weights = {}
    for commit, (seed, layers) in ((old, (0, 1)), (new, (5, 2))):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False))
        model.save_pretrained(tmp_path / "hub" / "models--org--base" / "snapshots" / commit)
        weights[commit] = model.state_dict()
    (tmp_path / "hub" / "models--org--base" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--base" / "refs" / "main").write_text(new)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    assert num_layers(f"org/base@{old}") == 1 and num_layers("org/base") == 2
    config = dict(merge_method="linear", dtype="float32", models=[{"model": f"org/base@{old}",
                                                                   "parameters": {"weight": 1.0}}])
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "mk.yaml"), str(tmp_path / "out")]) == 0, capsys.readouterr().err
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert got.keys() == weights[old].keys() and all(torch.equal(got[n], weights[old][n]) for n in got)
    config["models"][0]["model"] = "org/base@" + "3" * 40
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "mk.yaml"), str(tmp_path / "out2")]) == 2
    assert f"'org/base' at revision '{'3' * 40}' could not be fetched" in capsys.readouterr().err


def slerp_slices(ranges, t=0.5, **extra):
    return dict(merge_method="slerp", base_model="a", parameters={"t": t},
                slices=[dict(sources=[dict(model=m, layer_range=r) for m, r in zip("ab", ranges)], **extra)])


def test_slerp_gradients_filters_and_whole_model_slices():
    """mergekit's best-known config: one slice of whole models, t a gradient per filter; each
    tensor's t as mergekit reads it (layer i of N at i / (N - 1), outside the layers at 0)."""
    t = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
         {"value": 0.5}]
    config = slerp_slices([[0, 5], [0, 5]], t)
    translated = from_mergekit(config, layers=lambda model: 5)
    assert translated["models"] == ["a", "b"] and translated["method"] == "slerp"
    at = translated["params"]["t"]
    assert isinstance(at, Schedule) and "over 5 layers" in repr(at)
    for name, expected in [("model.layers.0.self_attn.q_proj.weight", 0.0),
                           ("model.layers.2.self_attn.o_proj.weight", 0.3),
                           ("model.layers.4.self_attn.k_proj.weight", 1.0), ("model.layers.1.mlp.up_proj.weight", 0.5),
                           ("model.layers.3.mlp.down_proj.weight", 0.3), ("model.layers.3.input_layernorm.weight", 0.5),
                           ("model.embed_tokens.weight", 0.5), ("lm_head.weight", 0.5)]:
        assert at(name) == pytest.approx(expected), name
    # between the gradient's points: 4 layers on 5 values, layer 1 at 1/3 -> 4/3 of the list
    four = Schedule([0.0, 0.3, 0.6, 0.9, 1.2], 4)
    assert four("model.layers.1.mlp.up_proj.weight") == pytest.approx(0.3 + 0.3 / 3)
    assert four("model.norm.weight") == 0.0
    # a layer is the number after its block list, not the first in the name (a tower's, a sublayer's)
    for name, layer in [("model.vision.0.layers.3.mlp.fc1.weight", 3), ("model.towers.1.h.2.attn.weight", 2),
                        ("encoder.block.2.layer.1.DenseReluDense.wi.weight", 2), ("layers.2.mixer.in_proj.weight", 2),
                        ("model.layers.1.block_sparse_moe.experts.3.w1.weight", 1)]:
        assert four(name) == pytest.approx([0.0, 0.4, 0.8, 1.2][layer]), name
    # ... and a number with no block list before it is no layer's: a tower's own tensors are outside the
    # layers, read at 0 as mergekit reads every tensor its architecture names outside them (tower 5 of 4
    # layers was refused as past them)
    for name in ("model.vision.1.embeddings.patch.weight", "model.vision.5.post_layernorm.weight",
                 "model.layers.2", "visual.proj.0.weight"):
        assert four(name) == 0.0, name
    with pytest.raises(ValueError, match="no filter matches tensor model.layers.0.input_layernorm.weight"):
        Schedule([{"filter": "mlp", "value": 0.3}], 4)("model.layers.0.input_layernorm.weight")
    with pytest.raises(ValueError, match="tensor model.layers.4.mlp.up_proj.weight is in layer 4, past the 4"):
        four("model.layers.4.mlp.up_proj.weight")
    with pytest.raises(ValueError, match=r"parameters.t\[1\]\[1\] must be a finite number"):
        Schedule([{"filter": "mlp", "value": 0.3}, {"value": [0, "x"]}], 4)
    with pytest.raises(ValueError, match="parameters.t is an empty gradient"):
        Schedule([], 4)
    with pytest.raises(ValueError, match=r"parameters.t\[0\] must be \{filter: a name part, value: ...\}"):
        Schedule([{"filters": "mlp", "value": 1}], 4)
    # a slice's own parameters come before the top level's
    assert from_mergekit(slerp_slices([[0, 5], [0, 5]], 0.9, parameters={"t": 0.2}),
                         layers=lambda m: 5)["params"]["t"] == 0.2
    # ... and where none of the slice's filters matches a tensor, the top level's setting is read
    at = from_mergekit(slerp_slices([[0, 5], [0, 5]], [{"filter": "mlp", "value": [0, 1]}, {"value": 0.9}],
                                    parameters={"t": [{"filter": "self_attn", "value": 0.3}]}),
                       layers=lambda m: 5)["params"]["t"]
    assert at("model.layers.1.self_attn.q_proj.weight") == 0.3
    assert at("model.layers.1.mlp.up_proj.weight") == pytest.approx(0.25)
    assert at("model.layers.1.input_layernorm.weight") == 0.9


@pytest.mark.parametrize("config, match", [
    (slerp_slices([[0, 4], [0, 5]]), r"slices\[0\].sources\[0\]: layer_range \[0, 4\] is not the whole model"),
    (dict(slerp_slices([[0, 5], [0, 5]]), slices=[{"sources": []}] * 2), "several slices \\(a frankenmerge\\)"),
    (slerp_slices([[0, 5], [0, 5]], residual_weight=0.5), r"slices\[0\]: residual_weight not supported"),
])
def test_slices_of_parts_of_models_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        from_mergekit(config, layers=lambda model: 5)


def test_layer_counts_from_config_json(tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"num_hidden_layers": 7, "hidden_size": 32}')
    assert num_layers(str(tmp_path / "llama")) == 7
    (tmp_path / "vlm").mkdir()
    (tmp_path / "vlm" / "config.json").write_text('{"text_config": {"num_hidden_layers": 7}, '
                                                  '"vision_config": {"num_hidden_layers": 4}}')
    with pytest.raises(ValueError, match=r"states several layer counts \[4, 7\]"):
        num_layers(str(tmp_path / "vlm"))
    with pytest.raises(ValueError, match="has no config.json"):
        num_layers(str(tmp_path))


def test_tokenizer_source_translated(tmp_path):
    """mergekit's tokenizer_source: base (or the base's path, or union; or tokenizer: {source:
    ...}) merges what a config without it merges where every model has the base's vocabulary,
    filling its embedding rows, and is dropped; where mergekit realigns or resizes the
    embeddings it becomes epmq's tokenizer_source (with pad_to_multiple_of); where mergekit
    strips tokens or picks its base in no fixed order, the config is refused saying why."""
    from epmq.mergekit_config import TokenizerDifference, base_tokenizer_changes_nothing

    config = lambda **extra: dict(gta("ties", None, [{"weight": 1.0, "density": 0.5}] * 2), **extra)  # noqa: E731
    plain = from_mergekit(config())
    same = lambda base, models, every_tokenizer: None  # noqa: E731
    for extra in (dict(tokenizer_source="base"), dict(tokenizer={"source": "base"}), dict(tokenizer_source="union"),
                  dict(tokenizer={}), dict(tokenizer={"source": "base", "tokens": {}, "pad_to_multiple_of": None})):
        assert from_mergekit(config(**extra), tokenizers=same) == plain
    by_path = dict(gta("ties", None, [{"weight": 1.0, "density": 0.5}] * 2, base="ckpt/b0"), tokenizer_source="ckpt/b0")
    assert from_mergekit(by_path, tokenizers=same)["base"] == "ckpt/b0"  # (the base's own path)
    for extra, match in [(dict(tokenizer_source="e1"), "gives the output another model's tokenizer"),
                         (dict(tokenizer={"source": "base", "lowercase": True}), "tokenizer: lowercase"),
                         (dict(tokenizer_source="base", tokenizer={"source": "base"}), "not both")]:
        with pytest.raises(ValueError, match=match):
            from_mergekit(config(**extra), tokenizers=same)
    assert from_mergekit(config(tokenizer={"pad_to_multiple_of": 64}), tokenizers=same) == dict(
        plain, tokenizer_source="union", pad_to_multiple_of=64)
    tokens = {"<x>": {"source": {"kind": "zero"}, "force": True}}  # (per-token rows: kept even where nothing differs)
    assert from_mergekit(config(tokenizer={"source": "base", "tokens": tokens}), tokenizers=same) == dict(
        plain, tokenizer_source="base", tokens=tokens)
    with pytest.raises(ValueError, match="'base': it differs: not translated"):
        from_mergekit(config(tokenizer_source="base"), tokenizers=lambda b, m, every_tokenizer: "it differs")
    differ = lambda b, m, every_tokenizer: TokenizerDifference("added tokens", True)  # noqa: E731
    for extra, source in ((dict(tokenizer_source="base"), "base"), (dict(tokenizer={}), "union")):
        assert from_mergekit(config(**extra), tokenizers=differ) == dict(plain, tokenizer_source=source)
    assert from_mergekit(dict(gta("linear", base=None), tokenizer_source="union"), tokenizers=differ)[
        "tokenizer_source"] == "union"
    with pytest.raises(ValueError, match="without base_model.*no fixed order, and here added tokens"):
        from_mergekit(dict(gta("linear", base=None), tokenizer_source="base"), tokenizers=differ)
    # linear and karcher average the base as a model: mergekit's vocabulary base has no counterpart
    for method in ("linear", "karcher"):
        with pytest.raises(ValueError, match="averages the base as one of the models.*not translated"):
            from_mergekit(dict(gta(method, per_model=({"weight": 1.0}, {"weight": 1.0})), tokenizer_source="union"),
                          tokenizers=differ)
    # without base_model every model must carry a tokenizer (mergekit's base is one of them)
    asked = []
    from_mergekit(dict(gta("linear", base=None), tokenizer_source="union"),
                  tokenizers=lambda b, m, every_tokenizer: asked.append((b, every_tokenizer)))
    assert asked == [("e0", True)]
    # chat_template: set on the output's tokenizer, Jinja text or auto; mergekit's named ones refused
    assert from_mergekit(config(chat_template="auto")) == dict(plain, chat_template="auto")
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    translated = from_mergekit(config(chat_template=jinja, tokenizer_source="base"), tokenizers=same)
    assert translated["chat_template"] == jinja
    with pytest.raises(ValueError, match="'chatml'.*named after a format"):
        from_mergekit(config(chat_template="chatml"))

    # the real check, on checkpoints that carry tokenizers: 64 embedding rows
    tokens = [f"t{i}" for i in range(64)]
    for name in ("base", "e0", "e1"):
        (tmp_path / name).mkdir()
        transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2).save_pretrained(tmp_path / name)
        word_level_tokenizer(tmp_path / name, tokens)
    base, models = str(tmp_path / "base"), [str(tmp_path / "e0"), str(tmp_path / "e1")]
    assert base_tokenizer_changes_nothing(base, models) is None
    word_level_tokenizer(tmp_path / "e1", tokens[:2] + [tokens[3], tokens[2]] + tokens[4:])  # (two ids swapped)
    assert "the vocabulary of" in base_tokenizer_changes_nothing(base, models)
    assert base_tokenizer_changes_nothing(base, models).translatable
    word_level_tokenizer(tmp_path / "e1", tokens)
    word_level_tokenizer(tmp_path / "base", tokens[:60])  # (padded embedding rows past the vocabulary)
    assert "has 64 embedding rows for the base tokenizer's 60 tokens" in base_tokenizer_changes_nothing(base, models)
    word_level_tokenizer(tmp_path / "base", tokens + ["<past>"])  # (a token past the embedding)
    assert "1 tokens past its 64 embedding rows" in base_tokenizer_changes_nothing(base, models)
    assert not base_tokenizer_changes_nothing(base, models).translatable
    word_level_tokenizer(tmp_path / "base", tokens)
    for f in (tmp_path / "e1").glob("tokenizer*"):
        f.unlink()  # (a model without a tokenizer: the base's, as mergekit takes it, unless no base is named)
    assert base_tokenizer_changes_nothing(base, models) is None
    assert "has no tokenizer, and without base_model" in base_tokenizer_changes_nothing(
        base, models, every_tokenizer=True)


def test_a_mistyped_name_in_a_config_with_a_tokenizer_is_said_as_one(tmp_path, capsys, monkeypatch):
    """With tokenizer: {source: ..., tokens: ...} every model's tokenizer is read first: a base_model
    mistyped (ckpt/bse beside ckpt/base) was said as the HF hub's failure alone, never as a local
    folder mistyped, as the merge says one; a tokenizer source mistyped (ckpt/bas) was said to be
    another model's tokenizer, 'give that model as base_model'. Each names what is there. The base's
    path spelled otherwise (./ckpt/base/) was refused alike; it is the base, as mergekit reads it."""
    import huggingface_hub.constants as hub

    tokens = [f"t{i}" for i in range(8)]
    for name in ("base", "e0"):
        transformers.LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2).save_pretrained(tmp_path / "ckpt" / name)
        word_level_tokenizer(tmp_path / "ckpt" / name, tokens)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    merged = dict(merge_method="task_arithmetic", models=[dict(model="ckpt/e0", parameters=dict(weight=1.0))])
    for base, source, said in [
            ("ckpt/bse", "union", "no folder {}: ckpt holds no 'bse' (its folders: base, e0), and 'ckpt/bse' is no "
                                  "HF hub repository that could be fetched either"),
            ("ckpt/base", "ckpt/bas", "tokenizer source 'ckpt/bas' is not base, union or a model of the merge "
                                      "('ckpt/base', 'ckpt/e0'): a mistyped name?")]:
        config = dict(merged, base_model=base, tokenizer={"source": source, "tokens": {"t1": {"source": "ckpt/e0"}}})
        (tmp_path / "mk.yaml").write_text(yaml.safe_dump(config))
        assert main(["merge", "mk.yaml", "out", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert said.format(tmp_path / "ckpt" / "bse") in err and err.count("\n") == 1, err
    # the base's path spelled otherwise is the base, as mergekit reads it (changing nothing here)
    for spelled in ("./ckpt/base/", str(tmp_path / "ckpt" / "base")):
        assert "tokenizer_source" not in from_mergekit(dict(merged, base_model="ckpt/base", tokenizer_source=spelled))


def test_a_tokenizer_read_as_saved_is_said_once_by_a_mergekit_merge(tmp_path, capsys, recwarn):
    """A Qwen2 tokenizer saved as TokenizersBackend is read as saved, warned of (``checkpoint_tokenizer``):
    the translation of tokenizer_source reads each model's, said as a note, and the merge read them
    again, said a second time as a warning."""
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False))
    noise = torch.Generator().manual_seed(1)
    for name in ("base", "e0", "e1"):
        (model if name == "base" else perturb(model, noise, scale=0.05)).save_pretrained(tmp_path / name)
        word_level_tokenizer(tmp_path / name, [f"t{i}" for i in range(8)])
    config = dict(gta("task_arithmetic", base=str(tmp_path / "base")), tokenizer_source="union", dtype="float32",
                  models=[{"model": str(tmp_path / f"e{k}"), "parameters": {"weight": 1.0}} for k in range(2)])
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(config))
    assert main(["merge", str(tmp_path / "mk.yaml"), str(tmp_path / "out"), "--quiet"]) == 0
    said = capsys.readouterr().err + "".join(f"{w.message}\n" for w in recwarn)
    for name in ("base", "e0", "e1"):
        assert said.count(f"AutoTokenizer loads the tokenizer of {tmp_path / name}, saved as") == 1, said


def test_tokenizer_rows_of_a_text_encoder_and_decoder_model(tmp_path):
    """MusicGen's config holds a text encoder's config (T5's tokens in) and a decoder's (audio codes
    out): transformers' get_text_config() refuses to choose, and the tokenizer check ended in its
    ValueError. The tokenizer's ids index the text encoder's embeddings (the model's input ones)."""
    from epmq.mergekit_config import _vocabulary, base_tokenizer_changes_nothing

    tokens = [f"t{i}" for i in range(64)]
    for name in ("base", "e0"):
        transformers.MusicgenConfig(
            text_encoder=dict(model_type="t5", vocab_size=64, d_model=8, d_ff=16, num_layers=1, num_heads=2, d_kv=4),
            audio_encoder=dict(model_type="encodec", hidden_size=8, num_filters=2, codebook_size=16,
                               upsampling_ratios=[2, 2], codebook_dim=8, num_residual_layers=1, num_lstm_layers=1),
            decoder=dict(vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32,
                         num_codebooks=2, pad_token_id=15, bos_token_id=15)).save_pretrained(tmp_path / name)
        word_level_tokenizer(tmp_path / name, tokens)
    vocab, rows, past = _vocabulary(str(tmp_path / "base"))
    assert (len(vocab), rows, past) == (64, 64, 0)
    assert base_tokenizer_changes_nothing(str(tmp_path / "base"), [str(tmp_path / "e0")]) is None


def test_chat_template_auto_and_text(tmp_path):
    """``chat_template`` of a merge: the template most models carry ("auto", as mergekit picks
    it; refused where several tie), or the given text, on the base's tokenizer."""
    from epmq.merge_checkpoint import merge_checkpoints

    torch.manual_seed(0)
    make = lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(  # noqa: E731
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    a, b = "{% for m in messages %}A{{ m['content'] }}{% endfor %}", "{% for m in messages %}B{% endfor %}"
    tokens = [f"t{i}" for i in range(64)]
    for name, template in (("base", None), ("e0", a), ("e1", a), ("e2", b)):
        make().save_pretrained(tmp_path / name)
        word_level_tokenizer(tmp_path / name, tokens)
        if template is not None:
            tok = transformers.AutoTokenizer.from_pretrained(tmp_path / name)
            tok.chat_template = template + "\n"  # (mergekit compares them stripped)
            tok.save_pretrained(tmp_path / name)
    models = [tmp_path / "e0", tmp_path / "e1", tmp_path / "e2"]
    out = merge_checkpoints("task_arithmetic", models, tmp_path / "auto", base=tmp_path / "base",
                            chat_template="auto", progress=False)
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == a
    out = merge_checkpoints("task_arithmetic", models, tmp_path / "text", base=tmp_path / "base",
                            chat_template=b, progress=False)
    assert transformers.AutoTokenizer.from_pretrained(out).chat_template == b
    untouched = merge_checkpoints("task_arithmetic", models[:1], tmp_path / "none", base=tmp_path / "base",
                                  chat_template="auto", progress=False)  # (e0's template...)
    assert transformers.AutoTokenizer.from_pretrained(untouched).chat_template == a
    for f in (tmp_path / "e0").glob("chat_template*"):
        f.unlink()
    cfg = json.loads((tmp_path / "e0" / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tmp_path / "e0" / "tokenizer_config.json").write_text(json.dumps(cfg))
    plain = merge_checkpoints("task_arithmetic", models[:1], tmp_path / "plain", base=tmp_path / "base",
                              chat_template="auto", progress=False)  # (...and none: none set, as mergekit)
    assert transformers.AutoTokenizer.from_pretrained(plain).chat_template is None
    with pytest.raises(ValueError, match="2 chat templates are each the models' most common"):
        merge_checkpoints("task_arithmetic", models[1:], tmp_path / "tie", base=tmp_path / "base",
                          chat_template="auto", progress=False)
    assert not (tmp_path / "tie").exists()  # (nothing written)
