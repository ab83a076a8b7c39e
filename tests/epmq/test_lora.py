"""Experts given as PEFT LoRA adapters (epmq/lora.py), against PEFT's own merge_and_unload."""

import json
import re
from pathlib import Path

import pytest
import torch
import transformers
import yaml

import epmq
from epmq.benches.tiny import word_tokenizer
from epmq.checkpoint_io import CheckpointReader
from epmq.cli import main
from epmq.experts import ExpertWeights

peft = pytest.importorskip("peft")


def tiny_llama(seed, layers=2):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=24, intermediate_size=40, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def make_adapter(base_dir, out, seed, **lora):
    """A LoRA of the model at ``base_dir`` with random (nonzero) B, saved by PEFT; returns the
    expert PEFT itself makes of it (merge_and_unload), as a state dict."""
    torch.manual_seed(seed)
    return make_adapter_of(transformers.AutoModelForCausalLM, base_dir, out, **lora)


def make_adapter_of(cls, base_dir, out, **lora):
    base = cls.from_pretrained(base_dir)
    seed = int(torch.randint(0, 2**31, (1,)))
    config = dict(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"])
    model = peft.get_peft_model(base, peft.LoraConfig(**{**config, **lora}))
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            p.data = (torch.randn(p.shape, generator=g) * 0.3).to(p.dtype)
    model.save_pretrained(out)
    return {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}


def adapters_and_experts(base_dir, tmp_path, seeds):
    """Adapters ``tmp_path/adapterK`` and the experts PEFT merges of them, saved whole as
    ``tmp_path/fullK``."""
    adapters, full = [], []
    for k, seed in enumerate(seeds):
        state = make_adapter(base_dir, tmp_path / f"adapter{k}", seed=seed)
        model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
        model.load_state_dict(state)
        model.save_pretrained(tmp_path / f"full{k}")
        adapters.append(tmp_path / f"adapter{k}")
        full.append(tmp_path / f"full{k}")
    return adapters, full


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    tiny_llama(0).save_pretrained(root / "base")
    word_tokenizer(root / "base")
    return root / "base"


def assert_same_expert(expert, reference, tied=()):
    """(``tied``: names of the model that its checkpoints do not hold.)"""
    assert set(expert) == set(reference) - set(tied)
    reference = {n: W for n, W in reference.items() if n not in tied}
    for name, W in reference.items():
        got = expert[name]
        assert got.dtype == W.dtype and got.shape == W.shape, name
        torch.testing.assert_close(got, W, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("lora", [
    # per-module ranks and alphas (3 and 10 over 4: scales that are not powers of two), an
    # adapted embedding, a trained head kept whole (modules_to_save)
    dict(rank_pattern={"v_proj": 3}, alpha_pattern={"down_proj": 10},
         target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], modules_to_save=["lm_head"]),
    dict(use_rslora=True, r=5, lora_alpha=7),
    dict(target_modules=["gate_proj", "o_proj"], layers_to_transform=[1]),
])
def test_expert_equals_peft_merge(base_dir, tmp_path, lora):
    reference = make_adapter(base_dir, tmp_path / "adapter", seed=len(str(lora)), **lora)
    expert = epmq.LoraExpert(tmp_path / "adapter", base=base_dir)
    assert_same_expert(expert, reference)
    # the base is changed where the adapter says, not elsewhere
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    changed = {n for n in base if not torch.equal(base[n], expert[n])}
    assert changed and all(any(m in n for m in lora.get("target_modules", ["q_proj", "v_proj", "down_proj"])
                               + lora.get("modules_to_save", [])) for n in changed)
    assert expert.shape_of("model.layers.1.mlp.down_proj.weight") == (24, 40)


def test_a_callers_autocast_changes_no_expert_weight(base_dir, tmp_path):
    """W_0 + s B A is formed in float32: read under a caller's autocast (a training script's, or
    quantize_model called inside one) B A ran in bf16, and the expert's updated weights differed
    from PEFT's merge by ~1e-3, silently (E-PMQ's targets with them)."""
    reference = make_adapter(base_dir, tmp_path / "adapter", seed=3)
    expert = epmq.LoraExpert(tmp_path / "adapter", base=base_dir)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = {name: expert[name] for name in reference}
    assert_same_expert(cast, reference)


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    torch.manual_seed(1)
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=24, n_layer=2,
                                                                n_head=4, n_positions=32))
    base.save_pretrained(tmp_path / "base")
    reference = make_adapter(tmp_path / "base", tmp_path / "adapter", seed=2, target_modules=["c_attn", "c_fc"],
                             fan_in_fan_out=True)
    assert_same_expert(epmq.LoraExpert(tmp_path / "adapter", base=tmp_path / "base"), reference,
                       tied=["lm_head.weight"])


def test_a_path_to_an_adapter_is_the_expert_on_the_base_its_config_names(base_dir, tmp_path):
    reference = make_adapter(base_dir, tmp_path / "adapter", seed=3)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(base_dir)
    reader = CheckpointReader(tmp_path / "adapter")
    assert "LoRA adapter" in reader.description and reader.shape("model.layers.0.self_attn.q_proj.weight") == (24, 24)
    expert = ExpertWeights(str(tmp_path / "adapter"), task="t")
    expert.bind(reference)
    name = "model.layers.1.self_attn.v_proj.weight"
    torch.testing.assert_close(expert.read(name), reference[name], rtol=1e-6, atol=1e-6)


def test_what_a_weight_update_cannot_express_is_refused(base_dir, tmp_path):
    make_adapter(base_dir, tmp_path / "dora", seed=4, use_dora=True)
    with pytest.raises(ValueError, match="use_dora"):
        epmq.LoraExpert(tmp_path / "dora", base=base_dir)
    # the adapter of another model: a module the base lacks
    tiny_llama(5, layers=3).save_pretrained(tmp_path / "deeper")
    make_adapter(tmp_path / "deeper", tmp_path / "deep_adapter", seed=5)
    with pytest.raises(ValueError, match=r"no weight.*for the adapted module.*layers\.2"):
        epmq.LoraExpert(tmp_path / "deep_adapter", base=base_dir)
    # no base recorded, none given
    make_adapter(base_dir, tmp_path / "nameless", seed=6)
    config = tmp_path / "nameless" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": None}))
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        epmq.LoraExpert(tmp_path / "nameless")
    # half a pair
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "nameless" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors.pop(next(k for k in tensors if k.endswith("lora_B.weight")))
    save_file(tensors, weights)
    with pytest.raises(ValueError, match="has lora_A but not lora_B"):
        epmq.LoraExpert(tmp_path / "nameless", base=base_dir)


def test_a_pair_whose_ranks_differ_is_refused_when_opened(base_dir, tmp_path):
    """lora_B [out, r'] with lora_A [r, in], r' != r (a hand-edited or cut adapter; PEFT refuses
    to load it): accepted, then torch's bare 'mat1 and mat2 shapes cannot be multiplied' at the
    first read of that layer (in a walk, at its block), naming neither adapter nor module."""
    from safetensors.torch import load_file, save_file

    make_adapter(base_dir, tmp_path / "adapter", seed=6, target_modules=["q_proj", "embed_tokens"])
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    original = load_file(weights)
    for side in ("layers.1.self_attn.q_proj.lora_B", "embed_tokens.lora_embedding_B"):
        tensors = dict(original)
        key = next(k for k in tensors if side in k)
        tensors[key] = tensors[key][:, :3].contiguous()
        save_file(tensors, weights)
        module = side.rsplit(".", 1)[0]
        with pytest.raises(ValueError, match=rf"module '.*{module}' has lora_A of rank 4 and lora_B of rank 3"):
            epmq.LoraExpert(tmp_path / "adapter", base=base_dir)


def test_a_pair_of_no_matrices_or_of_rank_0_is_refused_when_opened(base_dir, tmp_path):
    """A LoRA tensor of one dimension (or none) in a damaged adapter was reported as a LoRA on a
    convolution (whose tensors have three to five), and lora_A of 0 rows with lora_B of 0 columns
    (rank 0, which PEFT refuses) ended in a bare ZeroDivisionError: both named by module and tensor."""
    from safetensors.torch import load_file, save_file

    make_adapter(base_dir, tmp_path / "adapter", seed=6, target_modules=["q_proj"])
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    original = load_file(weights)
    module = "layers.1.self_attn.q_proj"
    A = next(k for k in original if f"{module}.lora_A" in k)
    B = next(k for k in original if f"{module}.lora_B" in k)
    for key, damaged in ((A, original[A].flatten()), (B, original[B][0, 0])):
        save_file({**original, key: damaged.contiguous()}, weights)
        shape = re.escape(str(tuple(damaged.shape)))
        with pytest.raises(ValueError, match=rf"module '.*{module}': its {re.escape(key)} has shape {shape}, no "):
            epmq.LoraExpert(tmp_path / "adapter", base=base_dir)
    save_file({**original, A: original[A][:0].contiguous(), B: original[B][:, :0].contiguous()}, weights)
    with pytest.raises(ValueError, match=rf"module '.*{module}' has lora_A and lora_B of rank 0"):
        epmq.LoraExpert(tmp_path / "adapter", base=base_dir)


def test_merge_of_adapters_equals_merge_of_merged_experts(base_dir, tmp_path):
    """epmq merge with LoRA adapters as the models: the same tensors as with the experts PEFT
    merges, saved as full checkpoints."""
    _, full = adapters_and_experts(base_dir, tmp_path, seeds=(10, 11))
    params = dict(density=0.5)
    epmq.merge_checkpoints("ties", [tmp_path / "adapter0", tmp_path / "adapter1"], tmp_path / "from_lora",
                           base=base_dir, params=params, progress=False)
    epmq.merge_checkpoints("ties", full, tmp_path / "from_full", base=base_dir, params=params, progress=False)
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "from_lora").state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "from_full").state_dict()
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-6, msg=name)
    # without a base (average): the adapters' own base, whose config and tokenizer go along
    epmq.merge_checkpoints("average", [tmp_path / "adapter0", tmp_path / "adapter1"], tmp_path / "avg",
                           progress=False)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "avg")("the cat").input_ids
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "avg")


def test_epmq_quantize_with_adapter_experts(base_dir, tmp_path, capsys, monkeypatch):
    """E-PMQ's targets from adapters: the checkpoint of the experts' full tensors, up to their
    rounding (the adapters' targets are W_0 + s B A unrounded), at one product of the weight's
    size a layer for both experts (epmq.LowRankExpert) instead of one per expert."""
    import epmq.stats

    products, base_reads = [], []
    accumulate = epmq.stats.accumulate_residual
    monkeypatch.setattr(epmq.stats, "accumulate_residual",
                        lambda *a, **k: (products.append(tuple(a[1].shape)), accumulate(*a, **k))[1])
    own = epmq.LoraExpert._own
    monkeypatch.setattr(epmq.LoraExpert, "_own",
                        lambda self, key, index=None: (base_reads.append(key), own(self, key, index))[1])
    for k in range(2):
        make_adapter(base_dir, tmp_path / f"adapter{k}", seed=20 + k)
    merge = _yaml(tmp_path / "m.yaml", method="task_arithmetic", base=str(base_dir),
                  models=[str(tmp_path / "adapter0"), str(tmp_path / "adapter1")])
    assert main(["merge", str(merge), str(tmp_path / "merged"), "--quiet"]) == 0
    (tmp_path / "a.txt").write_text("\n".join(["the cat sat on the mat ."] * 8))
    (tmp_path / "b.txt").write_text("\n".join(["a dog ran in the park today ."] * 8))
    options = dict(method="epmq", bits=4, group_size=8, anchor=0.1, samples=4, seq_len=12, batch_size=2,
                   calibration={"a": str(tmp_path / "a.txt"), "b": str(tmp_path / "b.txt")})
    # the adapters' config names another path for the base: lora_base overrides it
    for k in range(2):
        config = tmp_path / f"adapter{k}" / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "gone/base"}))
    adapters = {"a": str(tmp_path / "adapter0"), "b": str(tmp_path / "adapter1")}
    base_reads.clear()  # (the merge's own reads before)
    assert main(["quantize", str(_yaml(tmp_path / "q1.yaml", model=str(tmp_path / "merged"), experts=adapters,
                                       lora_base=str(base_dir), **options)), str(tmp_path / "w4_lora"),
                 "--quiet"]) == 0
    # (2 blocks of q, k, v, o, gate, up, down: one product for the two adapters of each of q, v
    # and down; none where the merge left the base as it was)
    linears, adapted = 2 * 7, 2 * 3
    assert len(products) == adapted
    # (each linear's base weight read once for both adapters: one tensor, no comparison)
    linear_reads = [k for k in base_reads if k.endswith("proj.weight")]
    assert len(linear_reads) == len(set(linear_reads)) == linears
    report = json.loads((tmp_path / "w4_lora" / "epmq_report.json").read_text())
    assert [layer["low_rank_tasks"] for layer in report["layers"]] == [2] * linears
    for k, task in enumerate("ab"):
        state = epmq.LoraExpert(adapters[task], base=base_dir)
        model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
        model.load_state_dict(dict(state))
        model.save_pretrained(tmp_path / f"full{k}")
    full = {"a": str(tmp_path / "full0"), "b": str(tmp_path / "full1")}
    assert main(["quantize", str(_yaml(tmp_path / "q2.yaml", model=str(tmp_path / "merged"), experts=full,
                                       **options)), str(tmp_path / "w4_full"), "--quiet"]) == 0
    assert len(products) == adapted + 2 * linears
    a = epmq.load_quantized(tmp_path / "w4_lora").state_dict()
    b = epmq.load_quantized(tmp_path / "w4_full").state_dict()
    assert a.keys() == b.keys()
    words = sum(a[k].numel() for k in a if k.endswith("qweight"))
    changed = sum(int((a[k] != b[k]).sum()) for k in a if k.endswith("qweight"))
    assert changed <= 0.01 * words  # (codes at rounding ties of the experts' fp32 tensors)
    for k in a:
        if k.endswith((".scales", ".qzeros")):
            # a code flipped at a tie moves the error fed to its output's later groups, and so
            # their grids (as many as the groups after it); every other as close as fp32 gives
            off = ~torch.isclose(a[k], b[k], rtol=2e-3, atol=1e-4) if a[k].is_floating_point() else a[k] != b[k]
            layer = k.rsplit(".", 1)[0] + "."
            flips = int((a[layer + "qweight"] != b[layer + "qweight"]).sum())
            assert int(off.sum()) <= flips * (a[k].shape[0] - 1), (k, int(off.sum()), flips)
        elif a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=2e-3, atol=1e-4, msg=k)
        elif not k.endswith("qweight"):
            assert torch.equal(a[k], b[k]), k
    # the adapter's recorded base, gone and not an HF hub snapshot: named in the error
    capsys.readouterr()
    assert main(["quantize", str(_yaml(tmp_path / "q3.yaml", model=str(tmp_path / "merged"), experts=adapters,
                                       **options)), str(tmp_path / "w4_gone"), "--quiet"]) != 0
    err = capsys.readouterr().err
    assert "its base model 'gone/base' (named in its adapter_config.json) is not found" in err and "lora_base:" in err


def _yaml(path, **config):
    path.write_text(yaml.safe_dump(config))
    return path


def _peft_expert(model, adapter):
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.clone() for k, v in merged.state_dict().items()}


@pytest.mark.parametrize("text_width", [32, 48])
def test_a_vision_adapter_on_a_two_tower_base(tmp_path, text_width):
    """An adapter trained on CLIPVisionModel (transformers 5 names, no vision_model.) whose base is
    the whole CLIPModel: its modules fit the vision tower by shape, not the text tower that sorts
    first. Where both towers have the width, it cannot tell: refused, or told by prefix=."""
    torch.manual_seed(2)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=text_width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=64),
        vision_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=8))
    transformers.CLIPModel(config).save_pretrained(tmp_path / "clip")
    tower = transformers.CLIPVisionModel.from_pretrained(tmp_path / "clip")
    model = peft.get_peft_model(tower, peft.LoraConfig(r=4, target_modules=["q_proj", "fc1"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    model.save_pretrained(tmp_path / "adapter")
    reference = _peft_expert(transformers.CLIPVisionModel.from_pretrained(tmp_path / "clip"), tmp_path / "adapter")
    if text_width == 48:
        with pytest.raises(ValueError, match="several places.*text_model.*vision_model"):
            epmq.LoraExpert(tmp_path / "adapter")
    expert = epmq.LoraExpert(tmp_path / "adapter", prefix="vision_model." if text_width == 48 else None)
    for name in ("encoder.layers.1.self_attn.q_proj.weight", "encoder.layers.0.mlp.fc1.weight"):
        torch.testing.assert_close(expert[f"vision_model.{name}"], reference[name], rtol=1e-6, atol=1e-6)
    text = "text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(expert[text], expert.base.get(text))


def test_gpt2_conv1d_and_linear_layers_in_one_adapter(tmp_path):
    """PEFT transposes the update of a Conv1D ([in, out]) and not of an nn.Linear, but saves one
    fan_in_fan_out for the adapter (here False, from the Linear head): the base's module types
    decide, a square Conv1D included."""
    torch.manual_seed(3)
    config = transformers.GPT2Config(vocab_size=64, n_embd=24, n_layer=2, n_head=4, n_positions=32, num_labels=3,
                                     pad_token_id=0)
    transformers.GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "base")
    reference = make_adapter_of(transformers.GPT2ForSequenceClassification, tmp_path / "base", tmp_path / "adapter",
                                target_modules=["attn.c_proj", "c_fc", "score"])
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is False
    assert_same_expert(epmq.LoraExpert(tmp_path / "adapter", base=tmp_path / "base"), reference)


def _tied_qwen3_saved(path):
    """A tiny Qwen3 with tied embeddings (seed 4), saved at ``path``."""
    torch.manual_seed(4)
    config = transformers.Qwen3Config(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      tie_word_embeddings=True)
    transformers.Qwen3ForCausalLM(config).save_pretrained(path)


def test_a_lora_on_a_tied_head_updates_the_tensor_the_base_stores(tmp_path):
    """Qwen3 with tied embeddings: the base stores embed_tokens only; PEFT's merge changes the one
    tensor both names hold (by the head's update and the embedding's)."""
    _tied_qwen3_saved(tmp_path / "base")
    reference = make_adapter_of(transformers.Qwen3ForCausalLM, tmp_path / "base", tmp_path / "adapter",
                                target_modules=["q_proj", "lm_head", "embed_tokens"])
    expert = epmq.LoraExpert(tmp_path / "adapter", base=tmp_path / "base")
    assert_same_expert(expert, reference, tied=["lm_head.weight"])
    torch.testing.assert_close(expert["model.embed_tokens.weight"], reference["lm_head.weight"], rtol=1e-6, atol=1e-6)


def test_embeddings_saved_whole_over_a_tied_head_leave_the_head_the_bases(tmp_path):
    """``modules_to_save: [embed_tokens]`` over a base whose head is its embeddings (Qwen3,
    Gemma, Llama 3.2 1B, ...), as when new tokens are trained: PEFT wraps the embeddings alone,
    its head keeps the base's W_0, and merge_and_unload() returns them apart. The expert lacked a
    head, so everything that reads it (a merge, the model it is loaded into) tied the head to
    the trained embeddings: another model, silently."""
    _tied_qwen3_saved(tmp_path / "base")
    reference = make_adapter_of(transformers.Qwen3ForCausalLM, tmp_path / "base", tmp_path / "adapter",
                                target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    assert not torch.equal(reference["lm_head.weight"], reference["model.embed_tokens.weight"])
    expert = epmq.LoraExpert(tmp_path / "adapter", base=tmp_path / "base")
    assert_same_expert(expert, reference)
    assert expert.shape_of("lm_head.weight") == (64, 24)
    # a merge of it unties, as the merge of the expert PEFT merges, saved whole
    peft.PeftModel.from_pretrained(transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "base"),
                                   tmp_path / "adapter").merge_and_unload().save_pretrained(tmp_path / "full")
    for model in ("adapter", "full"):
        epmq.merge_checkpoints("task_arithmetic", [tmp_path / model], tmp_path / f"merged_{model}",
                               base=tmp_path / "base", params=dict(scale=0.5), progress=False)
    a, b = (transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / f"merged_{m}").state_dict()
            for m in ("adapter", "full"))
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("as_module", [False, True])
@pytest.mark.parametrize("saved, adapted", [("embed_tokens", "lm_head"), ("lm_head", "embed_tokens")])
def test_a_lora_on_one_of_a_tied_pair_whose_other_is_saved_whole(tmp_path, saved, adapted, as_module):
    """A tied head and its embeddings, one saved whole (``modules_to_save``) and the other
    adapted: PEFT wraps the saved one alone, so the two are apart, and merge_and_unload()
    updates the adapted module's W_0 only. The update went to the tensor the base stores (the
    embeddings saved whole took the head's update, the head stayed the base's) or, on a base
    in memory, to every name of it (the head saved whole took the embeddings' update)."""
    _tied_qwen3_saved(tmp_path / "base")
    reference = make_adapter_of(transformers.Qwen3ForCausalLM, tmp_path / "base", tmp_path / "adapter",
                                target_modules=["q_proj", adapted], modules_to_save=[saved])
    base = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path / "base") if as_module else tmp_path / "base"
    expert = epmq.LoraExpert(tmp_path / "adapter", base=base)
    assert_same_expert(expert, reference)


@pytest.mark.parametrize("as_module", [False, True])
def test_a_lora_on_a_tied_t5_head_whose_shared_embeddings_are_saved_whole(tmp_path, as_module):
    """T5 (v1.0) ties shared, its encoder's and decoder's embed_tokens and lm_head: with shared
    saved whole, PEFT's merge gives the three others the head's update, and shared the trained
    copy (bit for bit in bfloat16)."""
    torch.manual_seed(3)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4,
                                   tie_word_embeddings=True)
    transformers.T5ForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    reference = make_adapter_of(transformers.T5ForConditionalGeneration, tmp_path / "base", tmp_path / "adapter",
                                target_modules=["q", "lm_head"], modules_to_save=["shared"])
    base = (transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "base") if as_module
            else tmp_path / "base")
    expert = epmq.LoraExpert(tmp_path / "adapter", base=base)
    assert set(expert) == set(reference)
    assert all(torch.equal(expert[n], W) for n, W in reference.items())


def test_a_lora_on_an_untied_head_leaves_the_embeddings_alone(base_dir, tmp_path):
    """Llama with its own head (tie_word_embeddings=False, as Llama-3-8B or Mistral-7B): the
    head's update is the head's only (transformers' default tie of the head to the embeddings,
    a fallback for reading experts, is off for the base's own checkpoint)."""
    reference = make_adapter(base_dir, tmp_path / "adapter", seed=5, target_modules=["q_proj", "lm_head"])
    expert = epmq.LoraExpert(tmp_path / "adapter", base=base_dir)
    assert_same_expert(expert, reference)
    assert sorted(expert._updates) == ["lm_head.weight", "model.layers.0.self_attn.q_proj.weight",
                                       "model.layers.1.self_attn.q_proj.weight"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_bases_equal_peft_bit_for_bit(tmp_path, dtype):
    tiny_llama(5).to(dtype).save_pretrained(tmp_path / "base")
    reference = make_adapter(tmp_path / "base", tmp_path / "adapter", seed=5,
                             target_modules=["q_proj", "embed_tokens"])
    expert = epmq.LoraExpert(tmp_path / "adapter", base=tmp_path / "base")
    assert all(torch.equal(expert[n], W) for n, W in reference.items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_tied_head_and_its_embeddings_both_adapted_in_half_precision_equal_peft_bit_for_bit(tmp_path, dtype):
    """GPT-2's wte and lm_head are one tensor, which PEFT's merge updates twice, module by module
    (wte first) and rounded to the base's dtype after each; the sum of both updates rounded once
    differed from it in the last bit of some entries."""
    torch.manual_seed(7)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, n_positions=32)
                                 ).to(dtype).save_pretrained(tmp_path / "base")
    reference = make_adapter_of(transformers.AutoModelForCausalLM, tmp_path / "base", tmp_path / "adapter",
                                target_modules=["lm_head", "wte"])
    expert = epmq.LoraExpert(tmp_path / "adapter", base=tmp_path / "base")
    assert torch.equal(expert["transformer.wte.weight"], reference["transformer.wte.weight"])
    # a base given as a state dict (no modules to say their order: the state dict's, the model's,
    # not the adapter file's, whose names sort lm_head first)
    state = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    expert = epmq.LoraExpert(tmp_path / "adapter", base=state)
    for name in ("transformer.wte.weight", "lm_head.weight"):
        assert torch.equal(expert[name], reference["transformer.wte.weight"]), name


@pytest.mark.parametrize("option", [
    dict(layer_replication=[[0, 1], [0, 1]]),   # the model's layers repeated: another architecture
    dict(alora_invocation_tokens=[5, 6]),       # activated by tokens: PEFT itself cannot merge it
    dict(init_lora_weights="pissa"),            # W_0 changed at init: the base is not the saved one
    dict(some_future_option={"x": 1}),          # what epmq does not know, it does not guess
    dict(peft_type="LOHA"),                     # another PEFT method's adapter, named as such
])
def test_adapter_options_that_are_not_a_plain_update_are_refused(base_dir, tmp_path, option):
    make_adapter(base_dir, tmp_path / "adapter", seed=6)
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **option}))
    with pytest.raises(ValueError, match=f"uses {next(iter(option))}="):
        epmq.LoraExpert(tmp_path / "adapter", base=base_dir)


@pytest.mark.parametrize("given", ["peft model", "its state dict", "merged in place", "saved"])
def test_a_base_peft_has_wrapped_is_refused_naming_what_to_give(base_dir, tmp_path, given):
    """The model PEFT trained the adapter in (get_peft_model's, its LoRA layers in place: W_0 under
    ``base_layer``, maybe with the update merged in by merge_adapter()) given as the base was
    refused as 'not the adapter's base model', which it is; refused as a base PEFT has wrapped,
    naming a tensor of it and what to give."""
    make_adapter(base_dir, tmp_path / "adapter", seed=8)
    wrapped = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base_dir),
                                  peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj"]))
    if given == "merged in place":
        wrapped.merge_adapter()
    if given == "saved":
        wrapped.get_base_model().save_pretrained(tmp_path / "wrapped")
    base = {"its state dict": wrapped.state_dict(), "saved": tmp_path / "wrapped"}.get(given, wrapped)
    with pytest.raises(ValueError, match=r"PEFT has wrapped .*(base_layer|lora_A).*give the base .*before "
                                         r"get_peft_model") as refused:
        epmq.LoraExpert(tmp_path / "adapter", base=base)
    assert "not the adapter's base model" not in str(refused.value)


@pytest.mark.parametrize("as_module", [False, True])
def test_a_quantized_base_is_refused_naming_it_so(base_dir, tmp_path, as_module):
    """An adapter trained on a quantized base (QLoRA on a GPTQ model), or an epmq checkpoint given
    as the base, was refused as 'has no weight ... not the adapter's base model': its layers hold
    packed codes (qweight), no weight; refused as a quantized base, naming a packed tensor and
    to give the full-precision base."""
    make_adapter(base_dir, tmp_path / "adapter", seed=9)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=8), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "quantized")
    with pytest.raises(ValueError, match=r"a quantized model .*qweight.*give the full-precision base") as refused:
        epmq.LoraExpert(tmp_path / "adapter", base=model if as_module else tmp_path / "quantized")
    assert "not the adapter's base model" not in str(refused.value)


def bitsandbytes_checkpoint(base_dir, out, layout):
    """``base_dir``'s checkpoint with its blocks' linears as transformers saves a model bitsandbytes
    quantized (random codes): Linear4bit's ``weight`` packed two codes a byte, its QuantState beside
    it under ``weight.`` (double quantization adds the nested ones); Linear8bitLt's int8 ``weight`` of
    the same shape, its row scales ``SCB`` and ``weight_format``."""
    import safetensors.torch

    out.mkdir()
    (out / "config.json").write_text((base_dir / "config.json").read_text())
    state = {}
    for key, W in safetensors.torch.load_file(base_dir / "model.safetensors").items():
        if ".layers." not in key or not key.endswith("_proj.weight"):
            state[key] = W
        elif layout == "int8":
            state[key] = torch.randint(-127, 128, W.shape, dtype=torch.int8)
            state[key.removesuffix("weight") + "SCB"] = torch.rand(W.shape[0])
            state[key.removesuffix("weight") + "weight_format"] = torch.tensor(0, dtype=torch.uint8)
        else:
            kind, nested = layout.split("-") if "-" in layout else (layout, None)
            blocks = W.numel() // 64
            state[key] = torch.randint(0, 256, (W.numel() // 2, 1), dtype=torch.uint8)
            state[key + ".absmax"] = (torch.randint(0, 256, (blocks,), dtype=torch.uint8) if nested
                                      else torch.rand(blocks))
            state[key + ".quant_map"] = torch.rand(16)
            if nested:
                state[key + ".nested_absmax"] = torch.rand(1)
                state[key + ".nested_quant_map"] = torch.rand(256)
            quant_state = {"quant_type": kind, "blocksize": 64, "dtype": "float32", "shape": list(W.shape)}
            state[f"{key}.quant_state.bitsandbytes__{kind}"] = torch.tensor(
                list(json.dumps(quant_state).encode()), dtype=torch.uint8)
    safetensors.torch.save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("layout", ["nf4", "fp4-nested", "int8"])
def test_a_bitsandbytes_base_is_refused_naming_it_so(base_dir, tmp_path, layout):
    """A base saved bitsandbytes-quantized (a QLoRA's base saved as loaded) given to a LoRA: a
    4-bit one was refused as 'has no weight, or none of the update's shape ... not the adapter's
    base model' (its weight two codes a byte), an 8-bit one taken, W_0 + B A added to its int8
    codes and read back as int8 codes, in silence; refused as a quantized base, naming the tensor
    of bitsandbytes' state and asking for the full-precision base."""
    make_adapter(base_dir, tmp_path / "adapter", seed=9)
    base = bitsandbytes_checkpoint(base_dir, tmp_path / "bnb", layout)
    state = r"SCB|weight_format" if layout == "int8" else r"absmax|quant_map|quant_state"
    with pytest.raises(ValueError, match=rf"quantized by bitsandbytes .*\.({state})'.*give the full-precision "
                                         rf"base") as refused:
        epmq.LoraExpert(tmp_path / "adapter", base=base)
    assert "not the adapter's base model" not in str(refused.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_base_that_already_holds_the_update_is_warned_of(base_dir, tmp_path, dtype):
    """The model PEFT's merge_and_unload() made of the adapter, saved and given as its base, was
    taken: the expert held the update twice (W_0 + 2 s B A), in silence. Against the base the
    adapter's config names, found here, the given base's weight is seen to hold the update, and
    a warning says so; the base it was trained on, or another model, is taken as before."""
    import warnings

    make_adapter(base_dir, tmp_path / "adapter", seed=3)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    merged = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    for given in (tmp_path / "merged", merged.state_dict()):
        with pytest.warns(UserWarning, match=r"the base given already holds this adapter's update .*"
                                             r"merge_and_unload\(\).*applied twice"):
            epmq.LoraExpert(tmp_path / "adapter", base=given)
    tiny_llama(5).save_pretrained(tmp_path / "other")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for given in (base_dir, tmp_path / "other",
                      transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype).state_dict()):
            epmq.LoraExpert(tmp_path / "adapter", base=given)


def test_part_of_a_base_tensor_no_update_touches_is_read_alone(base_dir, tmp_path, monkeypatch):
    """One expert's rows of a base's fused MoE tensor (Llama 4's hub layout), read through a LoRA
    expert: only those rows leave the base checkpoint."""
    import epmq.checkpoint_io as io

    make_adapter(base_dir, tmp_path / "adapter", seed=7)
    expert = epmq.LoraExpert(tmp_path / "adapter", base=base_dir)
    read = []
    original = io._read_tensor
    monkeypatch.setattr(io, "_read_tensor", lambda store, key, index=None: read.append(
        original(store, key, index).numel()) or original(store, key, index))
    name = "model.layers.0.mlp.up_proj.weight"  # (not adapted)
    assert torch.equal(expert.part(name, (slice(3, 7),)), expert.base.get(name)[3:7])
    assert read[0] == 4 * 24
    adapted = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(expert.part(adapted, (slice(0, 2),)), expert[adapted][:2])


def test_an_adapter_and_its_base_from_the_hub(base_dir, tmp_path, monkeypatch):
    """An adapter by HF hub id whose config names its base by hub id (as PEFT records it after
    from_pretrained("org/base")): both from the hub's cache, offline."""
    import shutil

    import huggingface_hub.constants as hub

    reference = make_adapter(base_dir, tmp_path / "adapter", seed=8)
    commit = "0" * 40
    for name, source in (("base", base_dir), ("adapter", tmp_path / "adapter")):
        repo = tmp_path / "hub" / f"models--org--{name}"
        shutil.copytree(source, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    config = tmp_path / "hub" / "models--org--adapter" / "snapshots" / commit / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "org/base"}))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path / "hub")  # (no local path "org/...")
    expert = ExpertWeights("org/adapter", task="t")
    expert.bind(reference)
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(expert.read(name), reference[name], rtol=1e-6, atol=1e-6)


def test_an_adapter_on_the_revision_of_its_base_its_config_records(base_dir, tmp_path, monkeypatch):
    """PEFT records the hub revision of the base an adapter was trained on (``revision`` in
    adapter_config.json; AutoPeftModel loads the base at it): where main has moved on to other
    weights, the expert is the adapter on that revision's base, not on main's."""
    import shutil

    import huggingface_hub.constants as hub

    reference = make_adapter(base_dir, tmp_path / "adapter", seed=9)
    tiny_llama(1).save_pretrained(tmp_path / "base_v2")  # (other weights, pushed since)
    trained_on, later = "1" * 40, "2" * 40
    for commit, source in ((trained_on, base_dir), (later, tmp_path / "base_v2")):
        shutil.copytree(source, tmp_path / "hub" / "models--org--base" / "snapshots" / commit)
    (tmp_path / "hub" / "models--org--base" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--base" / "refs" / "main").write_text(later)
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "org/base",
                                  "revision": trained_on}))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path / "hub")  # (no local path "org/...")
    expert = epmq.LoraExpert(tmp_path / "adapter")
    assert expert.base.path.name == trained_on
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(expert[name], reference[name], rtol=1e-6, atol=1e-6)
    # its tokenizer (for expert-path targets over another vocabulary) is that revision's too
    from epmq import vocabulary
    from epmq.experts import on_model_vocabulary

    read = []
    real = vocabulary.load_tokenizer
    monkeypatch.setattr(vocabulary, "load_tokenizer", lambda d: read.append(Path(d).name) or real(d))
    on_model_vocabulary(tiny_llama(0), {"t": str(tmp_path / "adapter")})
    assert trained_on in read and later not in read
    config.write_text(json.dumps({**json.loads(config.read_text()), "revision": "3" * 40}))
    with pytest.raises(FileNotFoundError, match="'org/base' at revision '3{40}' could not be fetched"):
        epmq.LoraExpert(tmp_path / "adapter")


def test_adapters_merged_without_a_base_on_lora_base(base_dir, tmp_path):
    """average and slerp take no base model; adapters whose config names a base that is gone
    are given theirs by lora_base (epmq merge's lora_base:)."""
    for k in range(2):
        make_adapter(base_dir, tmp_path / f"adapter{k}", seed=30 + k)
        config = tmp_path / f"adapter{k}" / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "gone/base"}))
    adapters = [tmp_path / "adapter0", tmp_path / "adapter1"]
    with pytest.raises(FileNotFoundError, match="'gone/base' \\(named in its adapter_config.json\\)"):
        epmq.merge_checkpoints("average", adapters, tmp_path / "avg", progress=False)
    merge = _yaml(tmp_path / "m.yaml", method="average", models=[str(a) for a in adapters], lora_base=str(base_dir))
    assert main(["merge", str(merge), str(tmp_path / "avg"), "--quiet"]) == 0
    experts = [epmq.LoraExpert(a, base=base_dir) for a in adapters]
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "avg").state_dict()
    name = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[name], (experts[0][name] + experts[1][name]) / 2, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="base is given"):
        epmq.merge_checkpoints("task_arithmetic", adapters, tmp_path / "ta", base=base_dir, lora_base=base_dir,
                               progress=False)


def test_adapters_named_by_hub_id_on_lora_base(base_dir, tmp_path, monkeypatch):
    """Adapters named by hub id are adapters as their directories are: lora_base is their base
    (epmq merge's, epmq quantize's), not refused as given to no adapter, nor passed over for the
    base their config names."""
    import shutil

    import huggingface_hub.constants as hub

    from epmq.lora import open_expert

    make_adapter(base_dir, tmp_path / "adapter", seed=11)
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "gone/base"}))
    commit = "0" * 40
    shutil.copytree(tmp_path / "adapter", tmp_path / "hub" / "models--org--adapter" / "snapshots" / commit)
    (tmp_path / "hub" / "models--org--adapter" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--adapter" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path / "hub")  # (no local path "org/...")
    expert = open_expert("org/adapter", str(base_dir))
    assert isinstance(expert, epmq.LoraExpert) and expert.base.path == base_dir
    want = epmq.LoraExpert(tmp_path / "adapter", base=base_dir)
    # (one adapter: the same one listed twice is refused, test_merge_checkpoint's listed_twice)
    out = epmq.merge_checkpoints("average", ["org/adapter"], tmp_path / "avg", lora_base=base_dir, progress=False)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    name = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[name], want[name], rtol=1e-6, atol=1e-6)


def test_an_adapter_on_a_hub_base_is_checked_as_of_its_bases_architecture(base_dir, tmp_path, monkeypatch):
    """An adapter whose config names its base by hub id had no architecture to check (a Qwen2
    of the Llama's names and shapes merged into it silently): its base's config is read from
    the hub (its config files alone), as a local base's is."""
    import shutil

    import huggingface_hub.constants as hub

    make_adapter(base_dir, tmp_path / "adapter", seed=12)
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": "org/base"}))
    commit = "0" * 40
    shutil.copytree(base_dir, tmp_path / "hub" / "models--org--base" / "snapshots" / commit)
    (tmp_path / "hub" / "models--org--base" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--base" / "refs" / "main").write_text(commit)
    torch.manual_seed(1)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=96, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(tmp_path / "qwen")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path / "hub")  # (no local path "org/...")
    with pytest.raises(ValueError, match="qwen2"):
        epmq.merge_checkpoints("average", [tmp_path / "adapter", tmp_path / "qwen"], tmp_path / "avg", progress=False)
    assert not (tmp_path / "avg").exists()


def test_regmean_of_adapters_equals_regmean_of_merged_experts(base_dir, tmp_path):
    """RegMean builds each model to collect its Gram matrices: an adapter's is its base with the
    adapter's update, so the merge equals the one of the experts saved whole."""
    from epmq.benches.tiny import WORDS

    g = torch.Generator().manual_seed(0)
    adapters, full = adapters_and_experts(base_dir, tmp_path, seeds=(40, 41))
    texts = []
    for k in range(2):
        texts.append(tmp_path / f"t{k}.txt")
        texts[-1].write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (300,), generator=g)))
    word_tokenizer(full[0])
    options = dict(calibration=[str(t) for t in texts], params={"alpha": 0.9}, samples=4, seq_len=16,
                   batch_size=2, progress=False)
    epmq.merge_checkpoints("regmean", adapters, tmp_path / "from_lora", **options)
    epmq.merge_checkpoints("regmean", full, tmp_path / "from_full", **options)
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "from_lora").state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "from_full").state_dict()
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)
    # the adapted layers' Gram matrices differ from the base's: not an average
    name = "model.layers.1.mlp.down_proj.weight"
    average = (full_state(full[0])[name] + full_state(full[1])[name]) / 2
    assert not torch.allclose(a[name], average, atol=1e-4)


def test_regmean_collects_an_adapters_grams_with_its_trained_embeddings_over_a_tied_head(tmp_path, monkeypatch):
    """``modules_to_save: [embed_tokens]`` over a tied head: the expert has the trained embeddings
    and the base's head, which RegMean's model (the base's, built tied) holds as one tensor.
    Both were copied into it, the head last, so every Gram matrix was collected on the base's
    embeddings, not the expert's (PEFT's merge_and_unload runs the trained ones)."""
    import epmq.stats
    from epmq.benches.tiny import WORDS

    torch.manual_seed(4)
    tok = word_tokenizer(tmp_path / "base")
    config = transformers.Qwen3Config(vocab_size=len(tok), hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      tie_word_embeddings=True)
    transformers.Qwen3ForCausalLM(config).save_pretrained(tmp_path / "base")
    trained, texts = [], []
    g = torch.Generator().manual_seed(0)
    for k in range(2):
        reference = make_adapter_of(transformers.Qwen3ForCausalLM, tmp_path / "base", tmp_path / f"adapter{k}",
                                    target_modules=["q_proj"], modules_to_save=["embed_tokens"])
        trained.append(reference["model.embed_tokens.weight"])
        texts.append(tmp_path / f"t{k}.txt")
        texts[-1].write_text(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (300,), generator=g)))
    seen, gram_matrices = [], epmq.stats.gram_matrices

    def spying(model, *args, **kwargs):
        seen.append(model.get_input_embeddings().weight.detach().clone())
        return gram_matrices(model, *args, **kwargs)

    monkeypatch.setattr(epmq.stats, "gram_matrices", spying)
    epmq.merge_checkpoints("regmean", [tmp_path / "adapter0", tmp_path / "adapter1"], tmp_path / "out",
                           calibration=[str(t) for t in texts], params={"alpha": 0.9}, samples=4, seq_len=16,
                           batch_size=2, progress=False)
    assert len(seen) == 2 and all(torch.equal(s, t) for s, t in zip(seen, trained))


def full_state(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.mark.parametrize("target", ["lm_head", "wte"])
@pytest.mark.parametrize("kind", ["module", "state dict"])
def test_a_tied_base_in_memory_takes_the_update_under_both_names(tmp_path, target, kind):
    """GPT-2's head and embeddings are one parameter: a module's (or its state dict's) two names
    both take the update, as PEFT's merge changes the one tensor (only one of them did)."""
    torch.manual_seed(7)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4,
                                                         n_positions=32)).save_pretrained(tmp_path / "base")
    reference = make_adapter_of(transformers.AutoModelForCausalLM, tmp_path / "base", tmp_path / "adapter",
                                target_modules=[target])
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    expert = epmq.LoraExpert(tmp_path / "adapter", base=base if kind == "module" else base.state_dict())
    for name in ("lm_head.weight", "transformer.wte.weight"):
        torch.testing.assert_close(expert[name], reference["transformer.wte.weight"], rtol=1e-6, atol=1e-6,
                                   msg=name)


def test_tensors_the_adapter_saves_whole_take_the_bases_dtype(tmp_path):
    """An adapter trained in fp32 on a bf16 base: its saved head and embedding are loaded into the
    bf16 base by PEFT (rounded) before any update; PEFT's wrapper internals
    (``original_module``, ``modules_to_save``) are no tensors of the expert."""
    tiny_llama(8).save_pretrained(tmp_path / "fp32")
    make_adapter(tmp_path / "fp32", tmp_path / "adapter", seed=8, target_modules=["q_proj", "embed_tokens"],
                 modules_to_save=["lm_head"])
    peft_model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp32"),
                                                tmp_path / "adapter")
    peft_model.save_pretrained(tmp_path / "adapter", save_embedding_layers=True)  # (the wrapper's tensors too)
    tiny_llama(8).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    reference = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16"), tmp_path / "adapter").merge_and_unload()
    reference = reference.state_dict()
    expert = epmq.LoraExpert(tmp_path / "adapter", base=tmp_path / "bf16")
    assert set(expert) == set(reference)
    for name, W in reference.items():
        assert expert[name].dtype == W.dtype == torch.bfloat16 and torch.equal(expert[name], W), name


def test_a_lora_on_a_resized_embedding(tmp_path):
    """The adapter saves the resized embedding (its ``base_layer``): the update fits that, not
    the base checkpoint's smaller one."""
    tiny_llama(9).save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model.resize_token_embeddings(100)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    for name, p in lora.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape) * 0.3
    lora.save_pretrained(tmp_path / "adapter")
    reference = lora.merge_and_unload().state_dict()
    expert = epmq.LoraExpert(tmp_path / "adapter", base=tmp_path / "base")
    assert expert["model.embed_tokens.weight"].shape == (100, 24)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"):
        torch.testing.assert_close(expert[name], reference[name], rtol=1e-6, atol=1e-6, msg=name)


def test_an_adapter_of_another_architecture_is_refused_in_a_merge(base_dir, tmp_path):
    """As a full expert of another model_type is: the adapter's is its base's."""
    make_adapter(base_dir, tmp_path / "adapter", seed=10)
    torch.manual_seed(10)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=96, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(tmp_path / "qwen2")
    with pytest.raises(ValueError, match="is a 'llama' checkpoint, the base a 'qwen2' one"):
        epmq.merge_checkpoints("task_arithmetic", [tmp_path / "adapter"], tmp_path / "out", base=tmp_path / "qwen2",
                               progress=False)


def test_an_adapters_config_and_tokenizer_are_of_the_one_base_it_is_read_on(base_dir, tmp_path):
    """An adapter's config was read from the base its config names (where found), its tokenizer files from the
    one the merge reads it on (lora_base or base): the two came from different models, the adapter compared as
    neither. Both are of the base it is read on, else of the one it names; a base read on of another architecture
    than the one it names is refused, lora_base as the merge's base."""
    from epmq.merge_checkpoint import _config, _tokenizer_home

    make_adapter(base_dir, tmp_path / "adapter", seed=13)
    torch.manual_seed(13)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=96, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(tmp_path / "qwen2")
    word_tokenizer(tmp_path / "qwen2")
    read_on, named = tmp_path / "qwen2", base_dir
    assert _tokenizer_home(tmp_path / "adapter", read_on) == read_on
    assert _config(tmp_path / "adapter", read_on)["model_type"] == "qwen2"
    assert _tokenizer_home(tmp_path / "adapter") == named and _config(tmp_path / "adapter")["model_type"] == "llama"
    tiny_llama(1).save_pretrained(tmp_path / "fellow")
    with pytest.raises(ValueError, match=r"model \S*adapter \(a LoRA adapter of \S*base, its config's base\) is a "
                                         r"'llama' checkpoint, the lora_base a 'qwen2' one"):
        epmq.merge_checkpoints("average", [tmp_path / "adapter", tmp_path / "fellow"], tmp_path / "out",
                               lora_base=read_on, progress=False)


def test_an_expert_adapter_read_on_a_base_of_another_architecture_is_refused(base_dir, tmp_path):
    """E-PMQ's expert given as a LoraExpert on a base other than the one its config names was compared by the
    base it is read on alone, as the merges compare an adapter: one trained on a Llama read on a Qwen2 of the same
    shapes was walked in silence. It is refused as the merges refuse it."""
    make_adapter(base_dir, tmp_path / "adapter", seed=14)
    torch.manual_seed(14)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=96, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(tmp_path / "qwen2")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qwen2")
    with pytest.raises(ValueError, match=r"the expert of task 't' .*\(a LoRA adapter of \S*base, its config's base\) "
                                         r"is a 'llama' checkpoint, the base it is read on a 'qwen2' one"):
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=8), method="epmq",
                            experts={"t": epmq.LoraExpert(tmp_path / "adapter", base=tmp_path / "qwen2")},
                            calibration={"t": [torch.randint(0, 96, (1, 8))]}, progress=False)
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())


def test_alpha_pattern_matches_a_name_ending_in_it_after_a_dot(base_dir, tmp_path):
    """``alpha_pattern`` keys match as PEFT matches them: ``proj``
    ends ``q_proj`` but not after a dot, so it changes no scale; ``self_attn.v_proj`` does."""
    reference = make_adapter(base_dir, tmp_path / "adapter", seed=11,
                             alpha_pattern={"proj": 50, "self_attn.v_proj": 12})
    assert_same_expert(epmq.LoraExpert(tmp_path / "adapter", base=base_dir), reference)


def test_an_adapter_whose_update_does_not_fit_the_base_weight_is_refused(base_dir, tmp_path):
    """The base has the adapted module, but of another shape."""
    make_adapter(base_dir, tmp_path / "adapter", seed=12)
    torch.manual_seed(0)
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=24, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"none of the update's shape.*down_proj"):
        epmq.LoraExpert(tmp_path / "adapter", base=tmp_path / "other")


def test_a_resumed_walk_on_adapters_sees_an_update_below_the_bases_rounding(tmp_path, monkeypatch):
    """E-PMQ's targets from adapters are W_0 + s B A unrounded, so the resume log's digest takes
    the factors: an adapter changed by less than the bf16 base's rounding of W_k (the dense read
    unchanged) is another walk's, and the unchanged adapters resume."""
    from safetensors.torch import load_file, save_file
    from test_walker_resume import Interrupt, interrupt_at

    tiny_llama(0).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    for k in range(2):
        make_adapter(tmp_path / "base", tmp_path / f"adapter{k}", seed=30 + k)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    adapters = {task: epmq.LoraExpert(tmp_path / f"adapter{k}", base=tmp_path / "base")
                for k, task in enumerate("ab")}
    g = torch.Generator().manual_seed(5)
    calibration = {task: [torch.randint(0, 96, (2, 12), generator=g)] for task in adapters}

    def walk(experts, resume_dir):
        return epmq.quantize_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                   epmq.QuantSpec(bits=4, group_size=8), method="epmq", calibration=calibration,
                                   experts=experts, resume_dir=resume_dir, progress=False)

    with monkeypatch.context() as m:
        interrupt_at(m, 1)
        with pytest.raises(Interrupt):
            walk(adapters, tmp_path / "log")
    assert walk(adapters, tmp_path / "log").epmq_report.resumed == ["model.layers.0"]
    weights = tmp_path / "adapter1" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if "layers.0.self_attn.q_proj.lora_B" in k)
    B = tensors[key].float()
    B[0, 0] = torch.nextafter(B[0, 0], torch.tensor(float("inf")))  # (one fp32 step of one element)
    tensors[key] = B
    save_file(tensors, weights)
    changed = epmq.LoraExpert(tmp_path / "adapter1", base=tmp_path / "base")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(changed[name], adapters["b"][name])  # (below bf16's rounding of W_k)
    assert not torch.equal(changed.low_rank(name).U, adapters["b"].low_rank(name).U)
    with pytest.raises(ValueError, match="model.layers.0 was quantized from other weights"):
        walk({"a": adapters["a"], "b": changed}, tmp_path / "log")
    del base


def _gemma3_saved(path):
    """A tiny Gemma 3 (seed 0), saved by transformers at ``path`` in the hub's layout."""
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4))
    model.save_pretrained(path)
    return model


def test_an_adapter_on_both_towers_of_a_vlm_saved_in_its_hub_layout(tmp_path):
    """Gemma 3: transformers saves the towers under the hub's names (``language_model.model.``,
    ``vision_tower.``) and PEFT names them as the loaded model does (``model.language_model.``,
    ``model.vision_tower.``): each tower found by the model's renaming rules, and the expert
    equals PEFT's merge tensor for tensor."""
    from epmq.checkpoint_io import key_renaming

    model = _gemma3_saved(tmp_path / "base")
    reference = make_adapter_of(transformers.Gemma3ForConditionalGeneration, tmp_path / "base",
                                tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    expert = epmq.LoraExpert(tmp_path / "adapter", base=tmp_path / "base")
    rename = key_renaming(model)
    updated = sorted(rename(k) for k in expert._updates)
    assert len(updated) == 4
    assert any("vision_tower" in k for k in updated) and any("language_model" in k for k in updated)
    for key in expert.keys():
        torch.testing.assert_close(expert[key], reference[rename(key)], rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("adapt_the_other", [False, True])
@pytest.mark.parametrize("saved", ["embed_tokens", "lm_head"])
def test_a_module_saved_whole_of_a_tied_vlm_saved_in_its_hub_layout(tmp_path, saved, adapt_the_other):
    """Gemma 3 (tied head, ``language_model.model.embed_tokens`` in its checkpoint, PEFT's names
    ``model.language_model.``): the module saved whole is found under the model's renaming, and
    the tied one it leaves keeps the base's W_0, as in PEFT's merge (with its own update, where
    the adapter has a LoRA on it)."""
    from epmq.checkpoint_io import key_renaming

    model = _gemma3_saved(tmp_path / "base")
    reference = make_adapter_of(transformers.Gemma3ForConditionalGeneration, tmp_path / "base",
                                tmp_path / "adapter", modules_to_save=[saved], target_modules=["q_proj"] + (
                                    [{"lm_head": "embed_tokens", "embed_tokens": "lm_head"}[saved]]
                                    if adapt_the_other else []))
    assert not torch.equal(reference["lm_head.weight"], reference["model.language_model.embed_tokens.weight"])
    expert = epmq.LoraExpert(tmp_path / "adapter", base=tmp_path / "base")
    rename = key_renaming(model)
    assert sorted(rename(key) for key in expert.keys()) == sorted(reference)
    for key in expert.keys():
        torch.testing.assert_close(expert[key], reference[rename(key)], rtol=1e-6, atol=1e-6, msg=key)


def test_a_module_saved_whole_that_the_base_stores_in_another_layout_is_refused(tmp_path):
    """Mixtral's experts with ``modules_to_save: [experts]``: PEFT saves transformers 5's fused
    ``mlp.experts.gate_up_proj``, which the base checkpoint stores per expert
    (``block_sparse_moe.experts.N.w1``). The expert held both, and a merge (with a warning
    that it ignored them) and E-PMQ's targets (silently) took the base's experts for the
    trained ones."""
    torch.manual_seed(3)
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=2,
                                        num_experts_per_tok=1, max_position_embeddings=64)
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path / "base")
    make_adapter_of(transformers.MixtralForCausalLM, tmp_path / "base", tmp_path / "experts",
                    target_modules=["q_proj"], modules_to_save=["experts"])
    with pytest.raises(ValueError, match=r"mlp\.experts\.gate_up_proj.*another layout"):
        epmq.LoraExpert(tmp_path / "experts", base=tmp_path / "base")
    # the router saved whole is stored as the model names it, under the checkpoint's renaming
    reference = make_adapter_of(transformers.MixtralForCausalLM, tmp_path / "base", tmp_path / "router",
                                target_modules=["q_proj"], modules_to_save=["gate"])
    expert = epmq.LoraExpert(tmp_path / "router", base=tmp_path / "base")
    torch.testing.assert_close(expert["model.layers.0.block_sparse_moe.gate.weight"],
                               reference["model.layers.0.mlp.gate.weight"], rtol=0, atol=0)
    # (on the base as a module, whose names are the fused ones, the expert is PEFT's)
    expert = epmq.LoraExpert(tmp_path / "experts",
                             base=transformers.MixtralForCausalLM.from_pretrained(tmp_path / "base"))
    reference = _peft_expert(transformers.MixtralForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "experts")
    assert torch.equal(expert["model.layers.0.mlp.experts.gate_up_proj"],
                       reference["model.layers.0.mlp.experts.gate_up_proj"])


def test_a_lora_on_torch_multihead_attention_is_refused_by_name(tmp_path):
    """PEFT wraps nn.MultiheadAttention (open_clip's blocks) as one module whose update is its
    in_proj_weight, with its out_proj inside: not a weight update epmq reads; said so, not
    "not the adapter's base model"."""
    from safetensors.torch import save_file

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
            self.fc = torch.nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(self.attn(x, x, x)[0])

    torch.manual_seed(0)
    net = Net()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "base.safetensors")
    peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["attn", "fc"])).save_pretrained(
        tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"'attn.*nn\.MultiheadAttention.*merge_and_unload"):
        epmq.LoraExpert(tmp_path / "adapter", base=tmp_path / "base.safetensors")


def test_a_float8_base_with_its_scales_beside_is_refused(base_dir, tmp_path):
    """An adapter on a fine-grained FP8 base (float8 weights, their scales in ``weight_scale_inv``):
    its expert was ``W_0 + B A`` rounded to float8, and E-PMQ's low-rank form took the float8 W_0
    as the weight, silently; both are refused, as any expert's such tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    make_adapter(base_dir, tmp_path / "adapter", seed=1)
    shutil.copytree(base_dir, tmp_path / "fp8")
    state = load_file(str(tmp_path / "fp8" / "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    scale = state[name].abs().max() / 448
    state[name] = (state[name] / scale).to(torch.float8_e4m3fn)
    state[f"{name}_scale_inv"] = scale.reshape(1, 1).float()
    save_file(state, str(tmp_path / "fp8" / "model.safetensors"), metadata={"format": "pt"})
    expert = epmq.LoraExpert(tmp_path / "adapter", tmp_path / "fp8")
    weights = ExpertWeights(expert, task="t")
    weights.bind(list(tiny_llama(0).state_dict()))
    match = rf"tensor '{name}' is stored as torch.float8_e4m3fn with its scales in '{name}_scale_inv'"
    for read in (lambda: expert[name], lambda: weights.low_rank(name), lambda: weights.read(name)):
        with pytest.raises(ValueError, match=match):
            read()


def test_an_adapter_config_without_lora_alpha_takes_peft_s_default(base_dir, tmp_path):
    """PEFT's LoraConfig defaults lora_alpha to 8: a hand-written or trimmed adapter_config.json
    without it is read with that scale (8 / r), as PEFT loads it."""
    reference = make_adapter(base_dir, tmp_path / "adapter", seed=5, lora_alpha=8)
    config = tmp_path / "adapter" / "adapter_config.json"
    content = json.loads(config.read_text())
    del content["lora_alpha"]
    config.write_text(json.dumps(content))
    assert_same_expert(epmq.LoraExpert(tmp_path / "adapter", base=base_dir), reference)


@pytest.mark.parametrize("change,match", [
    ({"lora_alpha": float("nan")}, r"lora_alpha must be a finite number, got nan"),
    ({"lora_alpha": float("inf")}, r"lora_alpha must be a finite number, got inf"),
    ({"lora_alpha": "6"}, r"lora_alpha must be a finite number, got '6'"),
    ({"alpha_pattern": {"q_proj": float("nan")}}, r"alpha_pattern\['q_proj'\] must be a finite number, got nan"),
    ({"alpha_pattern": ["q_proj"]}, r"alpha_pattern must be an object"),
], ids=["NaN", "Infinity", "a string", "NaN in alpha_pattern", "alpha_pattern a list"])
def test_an_adapter_config_whose_alpha_is_no_finite_number_is_refused(change, match, base_dir, tmp_path):
    """Python's JSON reads ``NaN`` and ``Infinity``: a (downloaded) adapter_config.json with such a
    lora_alpha made every updated weight NaN or inf, taken into merges and quantization as the
    expert; a string ended in a bare TypeError. Refused, naming the config and the entry."""
    make_adapter(base_dir, tmp_path / "adapter", seed=5)
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **change}))
    with pytest.raises(ValueError, match=match):
        epmq.LoraExpert(tmp_path / "adapter", base=base_dir)


def test_a_tensor_an_adapter_saves_whole_is_not_shared_as_the_bases(base_dir, tmp_path):
    """``low_rank(..., bases=...)`` shares the base's tensor among adapters of one base; a tensor
    an adapter saved whole (``modules_to_save``: a trained head) is its own W_0, never served to
    (or from) the others, whichever asks first."""
    make_adapter(base_dir, tmp_path / "plain", seed=7)
    make_adapter(base_dir, tmp_path / "head", seed=8, modules_to_save=["lm_head"])
    plain = epmq.LoraExpert(tmp_path / "plain", base=base_dir)
    head = epmq.LoraExpert(tmp_path / "head", base=base_dir)
    name = "lm_head.weight"
    assert not torch.equal(plain[name], head[name])
    for order in ((plain, head), (head, plain)):
        bases = {}
        for expert in order:
            assert torch.equal(expert.low_rank(name, bases=bases).W_0, expert[name])


def _sarvam_base_and_q_proj_adapter(tmp_path):
    """A tiny Sarvam-MoE saved at tmp_path/base (its checkpoint holds q_proj as rows of
    attention.query_key_value) and a LoRA on its q_proj at tmp_path/adapter; the base model."""
    from test_walker_models import _decoder

    torch.manual_seed(0)
    base = _decoder("Glm4MoeForCausalLM", "SarvamMoEConfig", head_dim=8, moe_intermediate_size=16, n_routed_experts=4,
                    num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                    use_qk_norm=True, pad_token_id=0, bos_token_id=0, eos_token_id=1)().eval()
    base.save_pretrained(tmp_path / "base")
    peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "adapter")
    return base


def test_an_adapter_on_a_base_saved_with_its_modules_weights_converted_is_refused_naming_the_conversion(tmp_path):
    """Sarvam-MoE's checkpoints (and save_pretrained) hold attention's q, k and v as rows of one
    query_key_value, which transformers splits as it loads the model: a LoRA on q_proj over the
    base's directory was refused as "the base has no weight ... for the adapted module(s) ...:
    not the adapter's base model", though it is. Refused naming the tensor that holds the weight
    and what to give instead: the base loaded (then read as the adapter's base)."""
    base = _sarvam_base_and_q_proj_adapter(tmp_path)
    with pytest.raises(ValueError, match=r"query_key_value.*as it loads the model.*base= the base loaded") as said:
        epmq.LoraExpert(tmp_path / "adapter", base=tmp_path / "base")
    assert "not the adapter's base model" not in str(said.value), said.value
    base = type(base).from_pretrained(tmp_path / "base")
    assert "model.layers.0.self_attn.q_proj.weight" in epmq.LoraExpert(tmp_path / "adapter", base=base).keys()


def test_an_adapter_on_a_base_checkpoints_state_dict_holding_its_modules_converted_says_so(tmp_path):
    """The base given as its checkpoint's tensors (safetensors' load_file), which hold Sarvam-MoE's
    q_proj as rows of attention.query_key_value: no config says the model, so nothing said that the
    tensors lie converted, and the refusal said "not the adapter's base model", though it is.
    Refused naming the modules whose tensors are missing and the layer's tensors that may hold them,
    and what to give instead (the base loaded, or its state_dict())."""
    import safetensors.torch

    base = _sarvam_base_and_q_proj_adapter(tmp_path)
    saved = safetensors.torch.load_file(tmp_path / "base" / "model.safetensors")
    with pytest.raises(ValueError, match=r"no tensor model\.layers\.0\.self_attn\.q_proj\.weight.*"
                                         r"'model\.layers\.0\.attention\.query_key_value\.weight'.*"
                                         r"converts as it loads.*base= the base loaded") as said:
        epmq.LoraExpert(tmp_path / "adapter", base=saved)
    assert "not the adapter's base model" not in str(said.value), said.value
    with pytest.raises(ValueError, match="PEFT has wrapped") as said:  # (its LoRA tensors hold no weight)
        epmq.LoraExpert(tmp_path / "adapter", base=base.state_dict())
    assert "its layer holds" not in str(said.value), said.value
    loaded = type(base).from_pretrained(tmp_path / "base").state_dict()
    assert "model.layers.0.self_attn.q_proj.weight" in epmq.LoraExpert(tmp_path / "adapter", base=loaded).keys()


def _q_proj_adapter(directory, module, gen):
    """A rank-4 PEFT LoRA of the 32 -> 32 q_proj ``module`` written into ``directory``."""
    from safetensors.torch import save_file

    directory.mkdir()
    save_file({f"base_model.model.{module}.lora_A.weight": torch.randn(4, 32, generator=gen),
               f"base_model.model.{module}.lora_B.weight": torch.randn(32, 4, generator=gen)},
              str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}))


def test_the_tensors_said_to_hold_a_missing_weight_are_of_its_own_layer_past_a_towers_index(tmp_path, gen):
    """A base given as tensors whose layers are named past a tower's index (model.vision.0.layers.1):
    the layer was taken to end at that index, and the refusal said of layer 1's q_proj that "its
    layer holds" layer 0's query_key_value. It names layer 1's tensors alone."""
    base = {f"model.vision.0.layers.{i}.{name}.weight": torch.randn(shape, generator=gen)
            for i in range(2) for name, shape in (("attention.query_key_value", (96, 32)), ("mlp.fc1", (64, 32)))}
    module = "model.vision.0.layers.1.self_attn.q_proj"
    _q_proj_adapter(tmp_path / "adapter", module, gen)
    with pytest.raises(ValueError, match=r"its layer holds \['model\.vision\.0\.layers\.1\.attention\."
                                         r"query_key_value\.weight', 'model\.vision\.0\.layers\.1\.mlp\.fc1\."
                                         r"weight'\]: a checkpoint's tensors may hold"):
        epmq.LoraExpert(tmp_path / "adapter", base=base)


def test_the_tensors_said_to_hold_a_towers_own_missing_weight_are_none_of_its_layers(tmp_path, gen):
    """A base given as tensors, a LoRA on a tower's own module outside its layers
    (model.vision.1.embeddings.q_proj): its search for the tensors that may hold the weight spanned the whole
    tower, and the refusal said "its layer holds" the tower's layers' query_key_value. It names the tower's
    own tensors alone, outside its layers; with none, the refusal says the weight is missing."""
    layers = {f"model.vision.1.layers.{i}.attention.query_key_value.weight": torch.randn(96, 32, generator=gen)
              for i in range(2)}
    module = "model.vision.1.embeddings.q_proj"
    _q_proj_adapter(tmp_path / "adapter", module, gen)
    own = {"model.vision.1.attention.query_key_value.weight": torch.randn(96, 32, generator=gen)}
    with pytest.raises(ValueError, match=r"its layer holds \['model\.vision\.1\.attention\.query_key_value\."
                                         r"weight'\]: a checkpoint's tensors may hold"):
        epmq.LoraExpert(tmp_path / "adapter", base={**layers, **own})
    with pytest.raises(ValueError, match=r"has no weight, or none of the update's shape, for the adapted "
                                         r"module\(s\) \['model\.vision\.1\.embeddings\.q_proj'\]"):
        epmq.LoraExpert(tmp_path / "adapter", base=layers)


def test_the_tensors_said_to_hold_a_missing_weight_are_of_its_own_sequential_layer_in_a_tower(tmp_path, gen):
    """A base given as tensors whose tower holds its layers in a Sequential (model.vision.1.encoder.1, no block
    list's name): the tower's index was taken for the layer's number, and the refusal said of layer 1's q_proj
    that "its layer holds" layer 0's query_key_value and the tower's own pool's qkv. It names layer 1's
    tensors alone; a LoRA on the tower's own module, none of the Sequential's layers'."""
    base = {f"model.vision.1.encoder.{i}.attention.query_key_value.weight": torch.randn(96, 32, generator=gen)
            for i in range(2)}
    base["model.vision.1.pool.qkv.weight"] = torch.randn(96, 32, generator=gen)
    _q_proj_adapter(tmp_path / "layer", "model.vision.1.encoder.1.self_attn.q_proj", gen)
    with pytest.raises(ValueError, match=r"its layer holds \['model\.vision\.1\.encoder\.1\.attention\."
                                         r"query_key_value\.weight'\]: a checkpoint's tensors may hold"):
        epmq.LoraExpert(tmp_path / "layer", base=base)
    _q_proj_adapter(tmp_path / "own", "model.vision.1.embeddings.q_proj", gen)
    with pytest.raises(ValueError, match=r"its layer holds \['model\.vision\.1\.pool\.qkv\.weight'\]: "
                                         r"a checkpoint's tensors may hold"):
        epmq.LoraExpert(tmp_path / "own", base=base)


def test_a_base_checkpoint_holding_an_adapted_linear_inside_a_converted_tensor_is_refused_by_name(tmp_path):
    """A LoRA adapter on q_proj of a model whose checkpoints hold q, k and v as rows of one tensor
    that transformers splits (and permutes) on loading (Step 3.7's vision tower:
    ``attn.in_proj_weight``), read over that base's directory, was refused as "not the adapter's
    base model", though it is; refused naming the tensor holding the module and what to give
    instead (the base loaded)."""
    import transformers

    if not hasattr(transformers, "Step3p7VisionModel"):
        pytest.skip(f"transformers {transformers.__version__} has no Step3p7VisionModel")
    peft = pytest.importorskip("peft")
    config = transformers.Step3p7VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=4, image_size=28, patch_size=14,
                                              max_position_embeddings=4)
    torch.manual_seed(0)
    base = transformers.Step3p7VisionModel(config)
    base.save_pretrained(tmp_path / "base")
    adapted = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    adapted.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"adapted module 'layers\.0\.self_attn\.q_proj' inside "
                                         r".*attn\.in_proj_weight.*base= the base loaded"):
        epmq.LoraExpert(tmp_path / "adapter", base=tmp_path / "base")


def test_quantize_checkpoint_compares_an_adapter_read_on_lora_base_before_reading_the_calibration(tmp_path,
                                                                                                   monkeypatch):
    """quantize_checkpoint compares each expert's config with the model's before the model loads and the
    calibration files are tokenized (minutes at 70B), but read an adapter's base as the one its config names
    alone, not lora_base, which it is read on: an adapter whose named base is gone, read on a lora_base of other
    heads, was refused only by the walk, once all that was done. Its lora_base is compared at once."""
    import epmq.quantize_files

    def llama(name, heads):  # (q, k, v and o 24x24 whatever the heads: head_dim 24 // heads)
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=96, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=heads,
            num_key_value_heads=heads, max_position_embeddings=64)).save_pretrained(tmp_path / name)
        return tmp_path / name

    own, other = llama("own", heads=4), llama("other", heads=2)
    make_adapter(own, tmp_path / "adapter", seed=3)
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": str(tmp_path / "gone")}))
    (tmp_path / "a.txt").write_text("the cat sat on the mat .\n")
    monkeypatch.setattr(epmq.quantize_files, "calibrated", lambda *a, **k: pytest.fail("the calibration was read"))
    with pytest.raises(ValueError, match=r"the expert of task 'a' \(\S*adapter\) reads its weights as \{.*"
                                         r"'num_attention_heads': 2.*\}, the model as \{.*'num_attention_heads': 4"):
        epmq.quantize_checkpoint(own, tmp_path / "q", spec=epmq.QuantSpec(bits=4, group_size=8),
                                 calibration={"a": tmp_path / "a.txt"}, experts={"a": tmp_path / "adapter"},
                                 lora_base=other, progress=False)


def test_adapters_on_one_base_have_its_tokenizer_loaded_once_to_compare_their_numbering(base_dir, tmp_path,
                                                                                        monkeypatch):
    """quantize_model compares each expert's tokenizer with the model's: adapters without tokenizer files of
    their own are tokenized by their base's, which was loaded again for each of them (seconds each, for a
    vocabulary of 128k tokens) and for the model loaded from it."""
    import epmq.vocabulary

    loads = []
    load = epmq.vocabulary.load_tokenizer
    monkeypatch.setattr(epmq.vocabulary, "load_tokenizer", lambda path: (loads.append(path), load(path))[1])
    adapters, _ = adapters_and_experts(base_dir, tmp_path, seeds=[4, 5])
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    calibration = {t: [torch.randint(0, 96, (2, 8))] for t in "ab"}
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=8), method="epmq", calibration=calibration,
                        experts={"a": str(adapters[0]), "b": str(adapters[1])}, progress=False)
    assert loads == [base_dir]


def test_an_adapter_whose_base_reads_the_weights_otherwise_is_refused_by_quantize_model(tmp_path):
    """An expert checkpoint whose config.json splits the same-shaped weights into other heads is
    refused by quantize_model; a LoRA adapter's expert is W_0 + (alpha/r) B A on its base, whose
    config was never compared (the adapter's reader has no path): an adapter of a base of other
    heads was walked in silence as if of the model's. Its base's config is compared, given by path
    or as a LoraExpert, and an adapter of the model's own base is walked."""
    def llama(seed, heads):  # (q, k, v and o 24x24 whatever the heads: head_dim 24 // heads)
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=96, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=heads,
            num_key_value_heads=heads, max_position_embeddings=64))

    llama(0, heads=2).save_pretrained(tmp_path / "other")
    llama(0, heads=4).save_pretrained(tmp_path / "own")
    make_adapter(tmp_path / "other", tmp_path / "adapter-other", seed=1)
    make_adapter(tmp_path / "own", tmp_path / "adapter-own", seed=2)
    calibration = {"a": [torch.randint(0, 96, (2, 8))]}
    spec = epmq.QuantSpec(bits=4, group_size=8)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "own")
    for expert in [str(tmp_path / "adapter-other"), epmq.LoraExpert(tmp_path / "adapter-other")]:
        with pytest.raises(ValueError, match=r"the expert of task 'a' \(LoRA adapter \S*adapter-other on \S*other"
                                             r".*\) reads its weights as \{.*'num_attention_heads': 2.*\}, the model "
                                             r"as \{.*'num_attention_heads': 4"):
            epmq.quantize_model(model, spec, method="epmq", calibration=calibration, experts={"a": expert},
                                progress=False)
    on_module = epmq.LoraExpert(tmp_path / "adapter-other",
                                base=transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"the expert of task 'a' \(LoRA adapter \S*adapter-other on module "
                                         r"LlamaForCausalLM\) reads its weights as \{.*'num_attention_heads': 2"):
        epmq.quantize_model(model, spec, method="epmq", calibration=calibration, experts={"a": on_module},
                            progress=False)
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())
    epmq.quantize_model(model, spec, method="epmq", calibration=calibration,
                        experts={"a": str(tmp_path / "adapter-own")}, progress=False)
