"""Packed checkpoints: the serving-engine (``gptq``) convention, configs, atomic writes."""

import contextlib
import copy
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import epmq
import epmq.checkpoint as ckpt
from test_walker_models import ARCHS, COCA_CFG, Family, Stack, build, inputs, output


def quantized(gen, bits=4, sym=False, method="rtn", arch="llama"):
    fam = Family(arch, gen, n_samples=1)
    model = fam.merged()
    epmq.quantize_model(model, epmq.QuantSpec(bits=bits, group_size=16, sym=sym), method=method,
                        calibration=None if method == "rtn" else fam.calibration, backend="torch", progress=False)
    return fam, model


# --------------------------------------------------------------------------- the format


def decode_stream(words, bits, length):
    """Codes of one column of int32 words read as a little-endian bit stream (GPTQ's packing)."""
    stream = sum((int(w) & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(words))
    return [(stream >> (bits * k)) & (2**bits - 1) for k in range(length)]


def independent_dequantize(tensors, module, name, checkpoint_format):
    """The weight ``[out, in]`` as a serving engine reads it, with this test's own bit arithmetic."""
    bits, K, N = module["bits"], module["in_features"], module["out_features"]
    qweight, qzeros = tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"]
    scales, g_idx = tensors[f"{name}.scales"].float(), tensors[f"{name}.g_idx"].tolist()
    codes = [decode_stream(qweight[:, n].tolist(), bits, K) for n in range(N)]  # [N][K]
    offset = 1 if checkpoint_format == "gptq" else 0  # v1 stores z - 1
    zeros = [[z + offset for z in decode_stream(qzeros[g].tolist(), bits, N)] for g in range(qzeros.shape[0])]
    W = torch.empty(N, K)
    for n in range(N):
        for k in range(K):
            g = g_idx[k]
            W[n, k] = (codes[n][k] - zeros[g][n]) * scales[g, n]
    return W


@pytest.mark.parametrize(
    "bits,sym,checkpoint_format",
    [(4, False, "gptq"), (8, False, "gptq"), (3, True, "gptq"), (2, True, "gptq_v2"), (4, False, "gptq_v2")],
)
def test_serving_convention_recovers_the_weights(bits, sym, checkpoint_format, gen, tmp_path):
    fam, model = quantized(gen, bits=bits, sym=sym)
    merged = fam.merged()
    epmq.save_quantized(model, tmp_path / "q", checkpoint_format=checkpoint_format)
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    config = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    assert config["checkpoint_format"] == checkpoint_format and config["bits"] == bits
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        assert tensors[f"{name}.qweight"].dtype == torch.int32 and tensors[f"{name}.scales"].dtype == torch.float16
        W = independent_dequantize(tensors, config["epmq"]["modules"][name], name, checkpoint_format)
        assert torch.equal(W, model.get_submodule(name).dequantize())
        W_m = merged.get_submodule(name).weight.detach()
        assert float((W - W_m).norm() / W_m.norm()) < {2: 0.7, 3: 0.3, 4: 0.15, 8: 0.01}[bits]


def test_configs_in_the_hf_gptq_format(gen, tmp_path):
    fam, model = quantized(gen, bits=4, method="gptq")
    epmq.save_quantized(model, tmp_path / "q")
    files = sorted(os.listdir(tmp_path / "q"))
    assert files == [".epmq_files.json", "config.json", "generation_config.json", "model.safetensors",
                     "quantize_config.json"]
    hf = json.loads((tmp_path / "q" / "config.json").read_text())
    assert hf["model_type"] == "llama"
    assert hf["quantization_config"] == {
        "quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": False, "sym": False,
        "static_groups": False, "true_sequential": True, "checkpoint_format": "gptq",
        "model_file_base_name": "model", "block_name_to_quantize": "model.layers",
    }
    config = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    assert config["epmq"]["method"] == "gptq" and len(config["epmq"]["modules"]) == 14


@pytest.mark.parametrize("method", ["rtn", "gptq", "epmq"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_quantizer_and_width_loads_back_exactly_under_gptq_readers_fields(method, bits, gen, tmp_path):
    """Each quantizer at each width, in groups of 16, 32 or the whole row (-1), symmetric or not, with
    act-order where it has one: load_quantized gives the same outputs, rtol = atol = 0, and both configs
    say what GPTQ readers (GPTQModel's QuantizeConfig.from_quant_config, AutoGPTQ's) take from them: bits,
    group_size (-1 per channel), sym, desc_act (g_idx to honour), quant_method and checkpoint_format."""
    case = [2, 3, 4, 8].index(bits) + ["rtn", "gptq", "epmq"].index(method)
    group_size, sym, act_order = [16, 32, -1][case % 3], case % 2 == 1, method != "rtn" and case % 4 < 2
    fam = Family("llama", gen, n_samples=1)
    model = fam.merged()
    epmq.quantize_model(model, epmq.QuantSpec(bits=bits, group_size=group_size, sym=sym, act_order=act_order),
                        method=method, calibration=None if method == "rtn" else fam.calibration,
                        experts=fam.experts if method == "epmq" else None, backend="torch", progress=False)
    epmq.save_quantized(model, tmp_path / "q", progress=False)
    torch.testing.assert_close(output(epmq.load_quantized(tmp_path / "q", progress=False), fam.test_item),
                               output(model, fam.test_item), rtol=0, atol=0)
    # ("auto": v2 where a zero point is 0, which v1 cannot hold)
    format_ = "gptq_v2" if any(bool((m.zeros() == 0).any()) for m in model.modules()
                               if isinstance(m, ckpt.QuantLinear)) else "gptq"
    # (act-order in one group: any column order gives g_idx 0, which loaders need not honour)
    said = dict(quant_method="gptq", bits=bits, group_size=group_size, sym=sym,
                desc_act=act_order and group_size != -1, checkpoint_format=format_)
    for config in (json.loads((tmp_path / "q" / "quantize_config.json").read_text()),
                   json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]):
        assert {k: config[k] for k in said} == said


def test_act_order_sets_desc_act(gen, tmp_path):
    fam = Family("llama", gen, n_samples=1)
    model = fam.merged()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16, act_order=True), method="gptq",
                        calibration=fam.calibration, backend="torch", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "quantize_config.json").read_text())["desc_act"] is True
    fresh = epmq.load_quantized(tmp_path / "q", fam.fresh())
    torch.testing.assert_close(output(fresh, fam.test_item), output(model, fam.test_item), rtol=0, atol=1e-6)


def test_v1_cannot_store_a_zero_point_of_zero(gen, tmp_path):
    fam = Family("llama", gen, n_samples=1)
    model = fam.merged()
    with torch.no_grad():  # a row whose weights are all >= 0: min-max puts its zero point at 0
        model.model.layers[0].mlp.up_proj.weight[0].abs_()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj has zero points equal to 0.*gptq_v2"):
        epmq.save_quantized(model, tmp_path / "q", checkpoint_format="gptq")
    assert not (tmp_path / "q").exists() and os.listdir(tmp_path) == []
    with pytest.warns(UserWarning, match="writing checkpoint_format='gptq_v2'"):
        epmq.save_quantized(model, tmp_path / "q")  # "auto"
    assert json.loads((tmp_path / "q" / "quantize_config.json").read_text())["checkpoint_format"] == "gptq_v2"
    fresh = epmq.load_quantized(tmp_path / "q", fam.fresh())
    assert torch.equal(fresh.model.layers[0].mlp.up_proj.zeros(), model.model.layers[0].mlp.up_proj.zeros())


def test_load_rejects_another_architecture(gen, tmp_path):
    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q")
    # (its config's head_dim first: the tensors it names would not fit either)
    with pytest.raises(ValueError, match=r"the model given reads its weights as \{'head_dim': 12\}"):
        epmq.load_quantized(tmp_path / "q", _wider_llama())
    with pytest.raises(FileNotFoundError, match="quantize_config.json"):
        epmq.load_quantized(tmp_path, fam.fresh())


def test_a_model_quantized_already_is_refused_as_packed_not_as_another_shape(gen, tmp_path):
    """A model whose layers are packed (quantized, or loaded before) was refused as if the checkpoint's layer
    were of another shape: "QuantLinear(in_features=32, out_features=32, ...) in the model, the checkpoint has a
    32->32 linear". Said of the packed layer, with the fresh model or model=None to load into."""
    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q")
    for packed in (model, epmq.load_quantized(tmp_path / "q")):
        with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.q_proj' is packed already in the "
                                             r"model given \(QuantLinear\(.*\)\): .*fresh, unquantized.*model=None"):
            epmq.load_quantized(tmp_path / "q", packed)
    loaded = epmq.load_quantized(tmp_path / "q", fam.fresh())
    torch.testing.assert_close(output(loaded, fam.test_item), output(model, fam.test_item), rtol=0, atol=0)


def test_a_device_it_cannot_load_onto_is_named_not_the_checkpoint(gen, tmp_path):
    """device="cuda" without a GPU was reported as 'cannot read .../model.safetensors: RuntimeError:
    Found no NVIDIA driver', the checkpoint blamed; a misspelt device was torch's bare RuntimeError.
    Said of the device, as quantize_model and the commands say it, before anything is read."""
    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q")
    cases = [("bogus", "device must name a torch device .*got 'bogus'"),
             ("meta", "device='meta' holds no values to compute with")]
    if not torch.cuda.is_available():
        cases.append(("cuda", "device='cuda', but torch sees no CUDA device here"))
    for device, match in cases:
        with pytest.raises(ValueError, match=match):
            epmq.load_quantized(tmp_path / "q", device=device)


def test_a_cuda_device_past_those_torch_sees_is_named_not_the_checkpoint(gen, tmp_path, monkeypatch):
    """device="cuda:1" on a machine of one GPU passed the device check and failed in the read, the
    checkpoint blamed ('cannot read .../model.safetensors: ... invalid device ordinal'), as
    device="cuda" without a GPU did: said of the device, with the devices torch sees."""
    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device='cuda:1', but torch sees 1 CUDA device here \(cuda:0\)"):
        epmq.load_quantized(tmp_path / "q", device="cuda:1")


def test_hooks_on_the_layers_load_quantized_replaces_are_kept(gen, tmp_path):
    """A hook the caller registered on a layer of the model given to load_quantized was
    dropped without a word when the layer became a QuantLinear; it goes with the layer, as in
    quantize_model (its handle still removes it)."""
    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q")
    fresh, seen = fam.fresh(), []
    o_proj = fresh.model.layers[0].self_attn.o_proj
    handle = o_proj.register_forward_hook(lambda m, args, out: out * 2)
    pre = fresh.model.layers[0].mlp.up_proj.register_forward_pre_hook(lambda m, args: seen.append(1))
    epmq.load_quantized(tmp_path / "q", fresh)
    o_proj = fresh.model.layers[0].self_attn.o_proj
    assert isinstance(o_proj, epmq.QuantLinear) and list(o_proj._forward_hooks) == [handle.id]
    hooked = output(fresh, fam.test_item)
    assert seen == [1]
    handle.remove(), pre.remove()
    assert not o_proj._forward_hooks and not fresh.model.layers[0].mlp.up_proj._forward_pre_hooks
    assert not torch.equal(hooked, output(fresh, fam.test_item))



def test_a_model_given_to_load_quantized_of_another_config_is_refused_or_warned(gen, tmp_path):
    """A fresh model given to load_quantized whose config computes otherwise than the checkpoint's
    config.json (another activation; another norm epsilon) took its tensors, whose shapes fit, and
    served another model's outputs without a word: the first is refused, the second warned of."""
    import transformers

    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    other = {**config, "hidden_act": "gelu" if config["hidden_act"] != "gelu" else "silu"}
    fresh = type(model)(transformers.LlamaConfig(**other))
    with pytest.raises(ValueError, match=r"the model given reads its weights as \{'hidden_act'.*the checkpoint "
                                         r"as \{'hidden_act'"):
        epmq.load_quantized(tmp_path / "q", fresh, progress=False)
    fresh = type(model)(transformers.LlamaConfig(**{**config, "rms_norm_eps": 0.5}))
    with pytest.warns(UserWarning, match=r"the model given runs its weights with \{'rms_norm_eps': 0\.5\}"):
        epmq.load_quantized(tmp_path / "q", fresh, progress=False)
    assert torch.equal(output(epmq.load_quantized(tmp_path / "q", fam.fresh(), progress=False), fam.test_item),
                       output(model, fam.test_item))

def _wider_llama():
    import transformers

    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))


# --------------------------------------------------------------------------- names on disk

HF_ARCHS = [a for a in ARCHS if not a.startswith(("open_clip", "timm"))]
PACKED = (".qweight", ".qzeros", ".scales", ".g_idx")


def saved_keys(directory):
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return set(f.keys())


def as_unquantized(keys):
    """A packed checkpoint's keys with each packed layer's four tensors as its ``.weight``."""
    return {k[: -len(".qweight")] + ".weight" if k.endswith(".qweight") else k
            for k in keys if k.endswith(".qweight") or not k.endswith(PACKED)}


def per_expert(keys, n_experts):
    """Llama 4's fused experts, as save_pretrained writes them (``experts.gate_up_proj``,
    ``experts.down_proj``), under the names of each expert's projections, as the quantized
    Llama 4 checkpoints on the hub hold them (``experts.{e}.gate_proj.weight``, ...)."""
    out = set()
    for key in keys:
        head, _, fused = key.rpartition(".")
        if head.endswith(".experts") and fused in ("gate_up_proj", "down_proj"):
            projections = ("gate_proj", "up_proj") if fused == "gate_up_proj" else ("down_proj",)
            out |= {f"{head}.{e}.{p}.weight" for e in range(n_experts) for p in projections}
        else:
            out.add(key)
    return out


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_names_on_disk_are_those_save_pretrained_writes(arch, tmp_path):
    """Serving engines look tensors up by the names transformers writes, which transformers 5
    renames as it loads (Mixtral's ``block_sparse_moe``, ViT's ``attention.attention.query``,
    GPT-NeoX's ``embed_out``): a packed checkpoint keeps them, and loads back. (Llama 4's fused
    experts are packed per expert, under the names its quantized checkpoints use.)"""
    model = build(arch)
    model.save_pretrained(tmp_path / "fp")
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    keys = saved_keys(tmp_path / "q")
    expected = saved_keys(tmp_path / "fp")
    if arch == "llama4":
        expected = per_expert(expected, model.config.num_local_experts)
    assert as_unquantized(keys) == expected
    modules = json.loads((tmp_path / "q" / "quantize_config.json").read_text())["epmq"]["modules"]
    assert {f"{name}.qweight" for name in modules} == {k for k in keys if k.endswith(".qweight")}
    fresh = epmq.load_quantized(tmp_path / "q", build(arch, seed=1))
    item = inputs(arch, 1, torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(output(fresh, item), output(model, item), rtol=0, atol=0)


def test_an_untied_head_loads_apart_into_a_fresh_model_that_ties_it(tmp_path):
    """transformers 5 ties every T5's lm_head to shared (its config forces tie_word_embeddings),
    while FLAN-T5 / T5 v1.1 hold them as two tensors: from_pretrained unties them, and
    load_quantized into a fresh model loaded both into the one parameter, silently: the
    embeddings took the head's values."""
    import transformers

    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                   dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                   decoder_start_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    model.lm_head.weight = torch.nn.Parameter(torch.randn(64, 32))  # (FLAN-T5's own head)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    fresh = transformers.T5ForConditionalGeneration(transformers.AutoConfig.from_pretrained(tmp_path / "q"))
    assert fresh.lm_head.weight is fresh.shared.weight
    loaded = epmq.load_quantized(tmp_path / "q", fresh)
    assert torch.equal(loaded.shared.weight, model.shared.weight)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert loaded.encoder.embed_tokens.weight is loaded.shared.weight is loaded.decoder.embed_tokens.weight
    item = {"input_ids": torch.tensor([[5, 6, 7, 1]]), "decoder_input_ids": torch.tensor([[0, 5, 6]])}
    torch.testing.assert_close(output(loaded, item), output(model, item), rtol=0, atol=0)
    # whatever the names' order: the head first, the embeddings' two names (one value) stay one
    head, embeddings = torch.randn(6, 4), torch.randn(6, 4)
    tied = torch.nn.ModuleDict({"head": torch.nn.Linear(4, 6, bias=False), "a": torch.nn.Embedding(6, 4),
                                "b": torch.nn.Embedding(6, 4)})
    tied.a.weight = tied.b.weight = tied.head.weight
    tensors = {"head.weight": head, "a.weight": embeddings, "b.weight": embeddings.clone()}
    ckpt._untie_held_apart(tied, tensors, {})
    tied.load_state_dict(tensors)
    assert tied.a.weight is tied.b.weight and tied.a.weight is not tied.head.weight
    assert torch.equal(tied.a.weight, embeddings) and torch.equal(tied.head.weight, head)


@pytest.mark.parametrize("arch,first_key", [
    ("vit", "encoder.layer.0.attention.attention.query.qweight"),  # as save_pretrained writes it
    ("hf_clip_vision", "vision_model.encoder.layers.0.self_attn.q_proj.qweight"),  # transformers 4's
])
def test_a_model_from_pretrained_keeps_its_checkpoints_layout(arch, first_key, tmp_path):
    """A model loaded from a hub-layout checkpoint (ViT's old module names; a transformers 4
    CLIPVisionModel's ``vision_model.`` prefix) is saved in that layout, as save_pretrained
    does, and loads back into a model built from its config."""
    import transformers
    from safetensors.torch import save_file

    model = build(arch)
    if arch == "vit":
        model.save_pretrained(tmp_path / "fp")
    else:
        model.config.save_pretrained(tmp_path / "fp")
        save_file({f"vision_model.{k}": v.contiguous() for k, v in model.state_dict().items()},
                  str(tmp_path / "fp" / "model.safetensors"))
    model = getattr(transformers, type(model).__name__).from_pretrained(tmp_path / "fp")
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    keys = saved_keys(tmp_path / "q")
    assert first_key in keys
    assert as_unquantized(keys) == saved_keys(tmp_path / "fp")
    fresh = epmq.load_quantized(tmp_path / "q", build(arch, seed=1))
    item = inputs(arch, 1, torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(output(fresh, item), output(model, item), rtol=0, atol=0)


@pytest.mark.parametrize("arch,own_name", [("mixtral", "model.layers.0.mlp.experts.0.w1"),
                                           ("vit", "layers.0.attention.q_proj")])
def test_checkpoints_in_the_models_own_naming_still_load(arch, own_name, tmp_path, monkeypatch):
    """Checkpoints written before names on disk followed save_pretrained (module names as they
    are in transformers 5) load as before."""
    model = build(arch)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    monkeypatch.setattr(ckpt, "saved_key_renaming", lambda model: None)
    epmq.save_quantized(model, tmp_path / "q")
    monkeypatch.undo()
    assert f"{own_name}.qweight" in saved_keys(tmp_path / "q")
    fresh = epmq.load_quantized(tmp_path / "q", build(arch, seed=1))
    item = inputs(arch, 1, torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(output(fresh, item), output(model, item), rtol=0, atol=0)


@pytest.mark.parametrize("arch", HF_ARCHS)
def test_load_without_a_model_builds_it_from_the_config_on_meta(arch, tmp_path, monkeypatch):
    """``load_quantized(directory)``: the class config.json names, built with every parameter on
    the meta device (no full-precision weight allocated), all of them from the checkpoint."""
    model = build(arch)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    built = []
    real = ckpt._empty_hf_model

    def spy(directory):
        m = real(directory)
        built.append(all(p.is_meta for p in m.parameters()) and any(True for _ in m.parameters()))
        return m

    monkeypatch.setattr(ckpt, "_empty_hf_model", spy)
    loaded = epmq.load_quantized(tmp_path / "q")
    assert built == [True] and type(loaded) is type(model)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    item = inputs(arch, 1, torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(output(loaded, item), output(model, item), rtol=0, atol=0)
    # (a device by index, as torch names it: safetensors refused "cpu:0")
    on_cpu0 = epmq.load_quantized(tmp_path / "q", device="cpu:0")
    torch.testing.assert_close(output(on_cpu0, item), output(model, item), rtol=0, atol=0)


def test_a_model_built_from_the_checkpoint_holds_its_tensors_aligned(gen, tmp_path):
    """safetensors hands CPU tensors at the file's alignment (4 bytes for float32), which a model
    built on meta took as its weights: CPU BLAS sums in another order there, and LongCat-Flash's
    full-precision experts computed 7e-9 off the saved model's. Each tensor starts on 64 bytes,
    as torch allocates them, and the full-precision head computes as the saved one, bit for bit."""
    model = _tiny_llama(hidden=48, inter=80)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    loaded = epmq.load_quantized(tmp_path / "q")
    unaligned = [name for name, t in [*loaded.named_parameters(), *loaded.named_buffers()]
                 if t.numel() and t.data_ptr() % 64]
    assert not unaligned
    x = torch.randn(3, 5, 48, generator=gen)
    torch.testing.assert_close(loaded.lm_head(x), model.lm_head(x), rtol=0, atol=0)


def test_load_without_a_model_fills_no_buffer_the_checkpoint_replaces(tmp_path):
    """A model built from the checkpoint took its packed layers' tensors (assign), but each layer
    was first made with zero-filled qweight, qzeros, scales and g_idx on the device: buffers as
    large as the checkpoint's layers, held until the load (a 153 MiB bf16 Llama checkpoint peaked
    at +254 MiB of private memory, +132 MiB now; on a GPU, twice the model). Built on meta too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    model = build("llama")
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    packed = sum(t.numel() * t.element_size() for name, t in model.state_dict().items()
                 if name.endswith((".qweight", ".qzeros", ".scales", ".g_idx")))

    class Filled(TorchDispatchMode):
        bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.zeros.default and out.device.type != "meta":
                Filled.bytes += out.numel() * out.element_size()
            return out

    with Filled():
        loaded = epmq.load_quantized(tmp_path / "q")
    assert Filled.bytes < packed / 4  # (the model's own buffers built on the CPU, small)
    item = inputs("llama", 1, torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(output(loaded, item), output(model, item), rtol=0, atol=0)


def test_a_name_a_loading_rule_would_rename_to_no_tensor_is_kept(tmp_path):
    """DeepSeek-V4's loading rules rename its attention's ``.norm.`` to ``.kv_norm.``, which also
    matches the final ``model.norm.weight``; transformers keeps a name whose renaming leads to no
    tensor of the model where the name itself is one. Renamed regardless, every checkpoint of
    the model failed to load ("missing tensors ['model.norm.weight'], unexpected tensors
    ['model.kv_norm.weight']")."""
    import transformers

    if not hasattr(transformers, "DeepseekV4ForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no DeepseekV4ForCausalLM")
    config = transformers.DeepseekV4Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(config).eval()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    fresh = transformers.DeepseekV4ForCausalLM(config)
    for loaded in (epmq.load_quantized(tmp_path / "q"), epmq.load_quantized(tmp_path / "q", fresh)):
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_load_by_hub_id_from_the_hub_cache(tmp_path, monkeypatch, capsys):
    """``load_quantized("org/name")``: a GPTQ checkpoint on the HF hub, read from its snapshot in
    the hub's cache (here laid out as the hub lays it out: files are links into blobs/, read
    offline), which is left as it was; its bar is titled by the id given, not by the snapshot's
    commit hash; a directory that does not exist is said to be missing."""
    import huggingface_hub.constants as hub

    model = build("llama")
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    repo, commit = tmp_path / "hub" / "models--org--llama-gptq", "0" * 40
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    for k, f in enumerate(sorted((tmp_path / "q").iterdir())):
        shutil.copy(f, repo / "blobs" / f"blob{k}")
        (repo / "snapshots" / commit / f.name).symlink_to(Path("..", "..", "blobs", f"blob{k}"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    before = sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "hub").rglob("*"))
    capsys.readouterr()
    loaded = epmq.load_quantized("org/llama-gptq")
    err = capsys.readouterr().err
    assert "load org/llama-gptq: 100%" in err and commit not in err, err
    item = inputs("llama", 1, torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(output(loaded, item), output(model, item), rtol=0, atol=0)
    assert sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "hub").rglob("*")) == before
    with pytest.raises(FileNotFoundError, match="no local path .*org/missing, and 'org/missing' could not be fetched"):
        epmq.load_quantized("org/missing")
    with pytest.raises(FileNotFoundError, match="no checkpoint directory at .*typo"):
        epmq.load_quantized(tmp_path / "typo")


def test_the_hubs_refusals_are_said_in_one_line_with_what_to_do():
    """A repository the hub refuses (none of that name, gated, no such revision) was said in the
    hub's message, several lines for its Python callers; each is one line now."""
    from huggingface_hub import errors

    from epmq.checkpoint_io import hub_failure

    httpx = pytest.importorskip("httpx2")  # (what huggingface_hub's errors carry)
    response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co/api/models/org/x"))
    message = "404 Client Error.\n\nRepository Not Found for url: ...\nPlease make sure you are authenticated."
    said = {kind: hub_failure(kind(message, response=response))
            for kind in (errors.RepositoryNotFoundError, errors.GatedRepoError, errors.RevisionNotFoundError)}
    assert said == {errors.RepositoryNotFoundError: "no such repository on the hub (if it is private, log in: "
                                                    "hf auth login)",
                    errors.GatedRepoError: "the repository is gated: accept its terms on its hub page, then log "
                                           "in (hf auth login)",
                    errors.RevisionNotFoundError: "the repository has no such revision"}
    assert hub_failure(RuntimeError("first\nsecond")) == "RuntimeError: first"


def test_coca_loads_from_its_open_clip_config(tmp_path):
    """A quantized CoCa saved beside open_clip's config of it (``open_clip_config.json``, as in
    its hub directory) is built from that config by ``load_quantized(directory)``: its towers and
    captioning decoder packed (the cross-attention's q, k and v apart), outputs equal."""
    model = build("open_clip_coca")
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    (tmp_path / "q" / "open_clip_config.json").write_text(json.dumps({"model_cfg": dict(COCA_CFG, custom_text=True)}))
    loaded = epmq.load_quantized(tmp_path / "q")
    packed = {n for n, m in loaded.named_modules() if isinstance(m, epmq.QuantLinear)}
    assert packed == {n for n, m in model.named_modules() if isinstance(m, epmq.QuantLinear)}
    assert len(packed) == 36 and "text_decoder.cross_attn.1.attn.k_proj" in packed
    item = inputs("open_clip_coca", 1, torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(output(loaded, item), output(model, item), rtol=0, atol=0)


def test_an_open_clip_model_built_from_its_config_saves_it_again(tmp_path):
    """A vision tower saved with its ``open_clip_config.json`` (as the open_clip bench writes it,
    by ``extras``) loads by ``load_quantized(directory)``; saving that model again dropped the
    file (epmq had written it, and the new write did not): the directory no longer loaded, nor
    did a copy saved elsewhere. The model built from the config now writes it back."""
    from open_clip.model import _build_vision_tower

    model_cfg = dict(embed_dim=16, vision_cfg=dict(layers=2, width=32, head_width=8, image_size=16, patch_size=8,
                                                   mlp_ratio=2.0))
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"size": 16}, "tower": "visual"}
    torch.manual_seed(0)
    model = _build_vision_tower(16, model_cfg["vision_cfg"]).eval()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q",
                        extras=lambda d: (d / "open_clip_config.json").write_text(json.dumps(config)))
    image = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    loaded = epmq.load_quantized(tmp_path / "q")
    for directory in (tmp_path / "q", tmp_path / "copy"):
        epmq.save_quantized(loaded, directory)
        assert json.loads((directory / "open_clip_config.json").read_text()) == config
        torch.testing.assert_close(epmq.load_quantized(directory)(image), model(image), rtol=0, atol=0)


def test_an_open_clip_model_given_to_load_quantized_saves_its_config_again(tmp_path):
    """``load_quantized(d, model)`` with a model of the user's (open_clip's own create_model, say)
    and ``d`` holding its ``open_clip_config.json``: saving that model again in place dropped the
    file as for a model load_quantized built (epmq's own file, not made again), and
    ``load_quantized(d)`` no longer found what to build."""
    from open_clip.model import _build_vision_tower

    model_cfg = dict(embed_dim=16, vision_cfg=dict(layers=2, width=32, head_width=8, image_size=16, patch_size=8,
                                                   mlp_ratio=2.0))
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"size": 16}, "tower": "visual"}

    def fresh():
        return _build_vision_tower(16, model_cfg["vision_cfg"]).eval()

    torch.manual_seed(0)
    model = fresh()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q",
                        extras=lambda d: (d / "open_clip_config.json").write_text(json.dumps(config)))
    image = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    loaded = epmq.load_quantized(tmp_path / "q", fresh())
    for directory in (tmp_path / "q", tmp_path / "copy"):
        epmq.save_quantized(loaded, directory)
        assert json.loads((directory / "open_clip_config.json").read_text()) == config
        torch.testing.assert_close(epmq.load_quantized(directory)(image), model(image), rtol=0, atol=0)


def saved_bf16_model(arch, directory, **save):
    """A model of ``arch`` quantized (RTN, 4 bits, groups of 16), cast to bf16 and saved."""
    model = build(arch)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    model.to(torch.bfloat16)
    epmq.save_quantized(model, directory, **save)
    return model


def load_bf16(directory):
    """``load_quantized`` without a model of a bf16 checkpoint: every tensor and QuantLinear bf16."""
    assert json.loads((directory / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = epmq.load_quantized(directory)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert {m.weight.dtype for m in loaded.modules() if isinstance(m, epmq.QuantLinear)} == {torch.bfloat16}
    return loaded

def test_load_without_a_model_keeps_the_checkpoints_dtype(tmp_path):
    """A bf16 model comes back bf16, its QuantLinears reporting bf16 weights (model code casts
    activations to a linear's weight dtype)."""
    model = saved_bf16_model("t5", tmp_path / "q")
    loaded = load_bf16(tmp_path / "q")
    item = inputs("t5", 1, torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(output(loaded, item), output(model, item), rtol=0, atol=0)


def test_layers_kept_in_another_dtype_come_back_in_it(tmp_path):
    """T5 in fp16 keeps its feed-forward output (wo) in fp32 against overflow (transformers'
    _keep_in_fp32_modules): a model built from the checkpoint has them fp32 again."""
    model = build("t5").to(torch.float16)
    for block in [*model.encoder.block, *model.decoder.block]:
        block.layer[-1].DenseReluDense.wo.float()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    loaded = epmq.load_quantized(tmp_path / "q")
    dtypes = {n: m.weight.dtype for n, m in loaded.named_modules() if isinstance(m, epmq.QuantLinear)}
    assert dtypes == {n: m.weight.dtype for n, m in model.named_modules() if isinstance(m, epmq.QuantLinear)}
    assert {d for n, d in dtypes.items() if n.endswith(".wo")} == {torch.float32}
    assert {d for n, d in dtypes.items() if not n.endswith(".wo")} == {torch.float16}
    item = inputs("t5", 1, torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(output(loaded, item), output(model, item), rtol=0, atol=0)


@pytest.mark.parametrize("method, true_sequential", [("gptq", False), ("gptq", True), ("rtn", None)])
def test_the_config_says_what_the_walk_did(gen, tmp_path, method, true_sequential):
    """true_sequential as the walk ran (RTN: no sequence of layers); act_order as done (RTN
    orders no columns)."""
    fam = Family("llama", gen, n_samples=1)
    model = fam.merged()
    options = {} if method == "rtn" else dict(calibration=fam.calibration, true_sequential=true_sequential)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16, act_order=True, static_groups=True),
                        method=method, backend="torch", progress=False, **options)
    epmq.save_quantized(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    assert config["true_sequential"] is bool(true_sequential)
    assert config["epmq"]["act_order"] is (method != "rtn")
    loaded = epmq.load_quantized(tmp_path / "q")
    assert loaded.epmq_quant_config["true_sequential"] is bool(true_sequential)
    assert loaded.epmq_quant_config["act_order"] is (method != "rtn")


def test_a_model_quantized_in_two_calls_is_described_layer_by_layer(gen, tmp_path):
    """Calls of other options on parts of a model: the config's fields for the whole model are
    those the calls share; the others are written per layer (they used to be the last call's,
    for every layer), and come back per layer and on a second save."""
    fam = Family("llama", gen, n_samples=1)
    model = fam.merged()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16, act_order=True, static_groups=True),
                        method="gptq", calibration=fam.calibration, layers="mlp", true_sequential=False,
                        backend="torch", progress=False)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="gptq", calibration=fam.calibration,
                        layers="self_attn", backend="torch", progress=False)
    mixed = {"act_order": None, "static_groups": None, "true_sequential": None}
    assert model.epmq_quant_config == dict(bits=4, group_size=16, sym=False, method="gptq", targets="merged_path",
                                           adapter="hf-decoder", **mixed)
    epmq.save_quantized(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    assert "static_groups" not in config and "true_sequential" not in config
    assert config["epmq"]["act_order"] is None and config["epmq"]["method"] == "gptq"
    for name, entry in config["epmq"]["modules"].items():
        mlp = ".mlp." in name
        assert (entry["act_order"], entry["static_groups"], entry["true_sequential"]) == (mlp, mlp, not mlp), name
    loaded = epmq.load_quantized(tmp_path / "q")
    assert loaded.epmq_quant_config == model.epmq_quant_config
    for name, m in loaded.named_modules():
        if isinstance(m, epmq.QuantLinear):
            assert m.quantized_with == model.get_submodule(name).quantized_with, name
    epmq.save_quantized(loaded, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "quantize_config.json").read_text()) == config


def test_extras_are_written_with_the_checkpoint_or_not_at_all(gen, tmp_path):
    """``extras`` (a tokenizer, a report) go into the new directory before it replaces the old
    one: if they fail, the old checkpoint is still there, whole."""
    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q", extras=lambda d: (d / "tokenizer.json").write_text("{}"))
    assert (tmp_path / "q" / "tokenizer.json").read_text() == "{}"
    before = {p.name: p.read_bytes() for p in (tmp_path / "q").iterdir()}

    def failing(directory):
        (directory / "tokenizer.json").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        epmq.save_quantized(model, tmp_path / "q", extras=failing)
    assert {p.name: p.read_bytes() for p in (tmp_path / "q").iterdir()} == before
    assert os.listdir(tmp_path) == ["q"]  # no temporary directory left behind


def test_generation_config_is_saved_and_loaded(gen, tmp_path):
    """What generate() and serving engines default to travels with the checkpoint, as
    save_pretrained writes it."""
    fam, model = quantized(gen)
    model.generation_config.eos_token_id = [5, 7]
    model.generation_config.max_new_tokens = 9
    epmq.save_quantized(model, tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "generation_config.json").read_text())
    assert saved["eos_token_id"] == [5, 7] and saved["max_new_tokens"] == 9
    loaded = epmq.load_quantized(tmp_path / "q")
    assert loaded.generation_config.eos_token_id == [5, 7] and loaded.generation_config.max_new_tokens == 9
    import transformers

    assert transformers.GenerationConfig.from_pretrained(tmp_path / "q").max_new_tokens == 9


def test_load_without_a_model_needs_a_transformers_config(gen, tmp_path):
    fam, model = quantized(gen, arch="open_clip_vit")
    epmq.save_quantized(model, tmp_path / "q")
    with pytest.raises(ValueError, match="no config.json.*fresh instance"):
        epmq.load_quantized(tmp_path / "q")
    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "llama")
    with pytest.raises(ValueError, match="device= is for a model built from the checkpoint"):
        epmq.load_quantized(tmp_path / "llama", fam.fresh(), device="cpu")


def test_a_device_to_load_onto_that_is_not_there_is_refused(gen, tmp_path, monkeypatch):
    """device="gpu" ended in torch's bare list of device types; "cuda" on a machine without one and
    "meta" were said as the weights file's fault ("cannot read .../model.safetensors: Found no
    NVIDIA driver", "device meta is invalid"): refused naming the argument, as quantize_model does."""
    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device, match in (("gpu", "device must name a torch device"), ("cuda", "torch sees no CUDA device"),
                          ("meta", "device='meta' holds no values")):
        with pytest.raises(ValueError, match=match):
            epmq.load_quantized(tmp_path / "q", device=device)


@pytest.mark.skipif(torch.backends.mps.is_available() or torch.xpu.is_available(), reason="an MPS or XPU device")
def test_a_device_of_another_backend_that_is_not_there_is_refused(gen, tmp_path):
    """device="mps" or "xpu" where torch has none passed the device check (which knew CUDA's) and
    was said as the weights file's fault ("cannot read .../model.safetensors: RuntimeError: PyTorch
    is not linked with support for mps devices"): refused up front, naming the device."""
    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q")
    for device in ("mps", "xpu"):
        with pytest.raises(ValueError, match=f"device='{device}', but torch cannot use it here") as e:
            epmq.load_quantized(tmp_path / "q", device=device)
        assert "model.safetensors" not in str(e.value)


@pytest.mark.cuda
def test_cuda_load_without_a_model_onto_the_gpu(gen, tmp_path):
    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q")
    loaded = epmq.load_quantized(tmp_path / "q", device="cuda")
    assert all(t.is_cuda for t in [*loaded.parameters(), *loaded.buffers()])
    item = fam.test_item.cuda()
    torch.testing.assert_close(output(loaded, item).cpu(), output(model, fam.test_item),
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("arch,layout", [("llama", "autogptq"), ("llama", "autogptq_bin"), ("gemma", "hf_config_only"),
                                         ("gemma", "hf_bin_shards")])
def test_gptq_checkpoints_of_other_tools_load(arch, layout, tmp_path):
    """No ``epmq`` section: every ``qweight`` is a layer, shapes from the tensors. AutoGPTQ's
    layout (a ``model_file_base_name`` file, no quant_method or checkpoint_format: v1; saved with
    use_safetensors=False: a torch .bin, refused as holding 'no model.safetensors'); transformers'
    (the GPTQ config only in config.json; a save with safe_serialization=False: pytorch_model.bin
    shards). Gemma ties its head to the embedding,
    stored once: found through the model's own tying."""
    model = build(arch)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q", checkpoint_format="gptq")
    q = tmp_path / "q"
    qconfig = json.loads((q / "quantize_config.json").read_text())
    del qconfig["epmq"]
    if layout.startswith("autogptq"):
        for key in ("quant_method", "checkpoint_format"):
            del qconfig[key]
        qconfig["model_file_base_name"] = "gptq_model-4bit-16g"
        (q / "model.safetensors").rename(q / "gptq_model-4bit-16g.safetensors")
        (q / "quantize_config.json").write_text(json.dumps(qconfig))
    else:
        (q / "quantize_config.json").unlink()
    if layout.endswith("bin"):  # (with a trainer's pickle beside it, which is no weights file)
        from safetensors.torch import load_file

        torch.save(load_file(str(q / "gptq_model-4bit-16g.safetensors")), q / "gptq_model-4bit-16g.bin")
        (q / "gptq_model-4bit-16g.safetensors").unlink()
        torch.save({"args": [1, 2]}, q / "training_args.bin")
    elif layout.endswith("bin_shards"):
        from safetensors.torch import load_file

        tensors = load_file(str(q / "model.safetensors"))
        (q / "model.safetensors").unlink()
        names = sorted(tensors)
        shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
        for shard, held in shards.items():
            torch.save({n: tensors[n] for n in held}, q / shard)
        (q / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {n: shard for shard, held in shards.items() for n in held}}))
    item = inputs(arch, 1, torch.Generator().manual_seed(0))[0]
    for fresh in (None, build(arch, seed=1)):
        loaded = epmq.load_quantized(q, fresh)
        assert sum(isinstance(m, epmq.QuantLinear) for m in loaded.modules()) == 14
        torch.testing.assert_close(output(loaded, item), output(model, item), rtol=0, atol=0)
    assert loaded.epmq_quant_config["method"] == "gptq"


def test_layers_of_other_bits_and_groups_than_the_config_says(tmp_path):
    """GPTQModel's ``dynamic`` rules give some layers other bits or groups than the config's:
    each layer is read off its own tensors."""
    from safetensors.torch import load_file, save_file

    models = {}
    for bits, group in ((4, 16), (8, 32)):
        models[bits] = build("llama")
        epmq.quantize_model(models[bits], epmq.QuantSpec(bits=bits, group_size=group), method="rtn",
                            progress=False)
        epmq.save_quantized(models[bits], tmp_path / f"w{bits}")
    tensors = load_file(str(tmp_path / "w4" / "model.safetensors"))
    eight = load_file(str(tmp_path / "w8" / "model.safetensors"))
    spliced = ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj"]
    for name in spliced:
        for part in ("qweight", "qzeros", "scales", "g_idx"):
            tensors[f"{name}.{part}"] = eight[f"{name}.{part}"]
    save_file(tensors, str(tmp_path / "w4" / "model.safetensors"))
    qconfig = json.loads((tmp_path / "w4" / "quantize_config.json").read_text())
    del qconfig["epmq"]  # as another tool writes it: bits 4, groups of 16 for the whole model
    (tmp_path / "w4" / "quantize_config.json").write_text(json.dumps(qconfig))
    loaded = epmq.load_quantized(tmp_path / "w4")
    for name, m in loaded.named_modules():
        if isinstance(m, epmq.QuantLinear):
            source = models[8 if name in spliced else 4].get_submodule(name)
            assert m.bits == (8 if name in spliced else 4) and m.scales.shape == source.scales.shape
            assert torch.equal(m.dequantize(), source.dequantize())
    assert loaded.get_submodule(spliced[0]).group_size == 32  # 64 inputs, 2 groups


def test_a_v1_zero_point_of_zero_written_by_another_tool(tmp_path):
    """v1 cannot hold z = 0; writers that stored z - 1 anyway left 2^bits - 1 in its place,
    which reads back as 0 (modulo 2^bits), not as an error or as 2^bits."""
    from safetensors.torch import load_file, save_file

    from epmq.packing import pack_cols, unpack_cols

    model = build("llama")
    with torch.no_grad():  # a row of weights >= 0: its min-max zero point is 0
        model.model.layers[0].mlp.up_proj.weight[0].abs_()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q", checkpoint_format="gptq_v2")
    q = tmp_path / "q"
    name = "model.layers.0.mlp.up_proj"
    z = model.get_submodule(name).zeros()
    assert bool((z == 0).any())
    tensors = load_file(str(q / "model.safetensors"))
    for key in [k for k in tensors if k.endswith(".qzeros")]:  # rewritten as a v1 writer would
        n = unpack_cols(tensors[key], 4, tensors[key[: -len("qzeros")] + "scales"].shape[1])
        tensors[key] = pack_cols((n - 1) % 16, 4)
    save_file(tensors, str(q / "model.safetensors"))
    qconfig = json.loads((q / "quantize_config.json").read_text())
    del qconfig["epmq"]
    (q / "quantize_config.json").write_text(json.dumps(dict(qconfig, checkpoint_format="gptq")))
    loaded = epmq.load_quantized(q)
    assert torch.equal(loaded.get_submodule(name).zeros(), z)
    item = inputs("llama", 1, torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(output(loaded, item), output(model, item), rtol=0, atol=0)


def _as_gptqmodel_names_mixtral(q, suffix):
    """The Mixtral checkpoint ``q`` renamed as GPTQModel writes it (``mlp.experts.{e}.gate_proj``,
    ``up_proj``, ``down_proj`` for w1, w3, w2; no epmq section); ``suffix``: what its experts hold."""
    from safetensors.torch import load_file, save_file

    rename = {".block_sparse_moe.": ".mlp.", ".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}
    tensors = {}
    for key, t in load_file(str(q / "model.safetensors")).items():
        for old, new in rename.items():
            key = key.replace(old, new)
        tensors[key] = t
    assert f"model.layers.0.mlp.experts.1.up_proj.{suffix}" in tensors
    save_file(tensors, str(q / "model.safetensors"))
    qconfig = json.loads((q / "quantize_config.json").read_text())
    del qconfig["epmq"]
    (q / "quantize_config.json").write_text(json.dumps(qconfig))
    return q


def test_mixtral_experts_named_as_gptqmodel_names_them(tmp_path):
    """GPTQModel writes Mixtral's expert projections w1, w3, w2 as gate_proj, up_proj,
    down_proj under ``mlp``: the MoE adapter maps them to the model's own."""
    model = build("mixtral")
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    loaded = epmq.load_quantized(_as_gptqmodel_names_mixtral(tmp_path / "q", "qweight"))
    assert torch.equal(loaded.model.layers[0].mlp.experts[1].w3.qweight,
                       model.model.layers[0].mlp.experts[1].w3.qweight)
    item = inputs("mixtral", 1, torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(output(loaded, item), output(model, item), rtol=0, atol=0)


def test_mixtral_experts_left_in_full_precision_named_as_gptqmodel_names_them(tmp_path):
    """GPTQModel (transformers 5) writes Mixtral's routed experts as ``mlp.experts.{e}.gate_proj``,
    ``up_proj``, ``down_proj``; left in full precision, their ``.weight``s were neither the
    fused model's nor the rebuilt experts' w1, w3, w2 names, and loading failed with them
    "unexpected" and every expert's weight "missing"."""
    model = build("mixtral")
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", layers=r".*self_attn\..*",
                        progress=False)
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.model.layers[0].mlp.experts.modules())
    epmq.save_quantized(model, tmp_path / "q")
    loaded = epmq.load_quantized(_as_gptqmodel_names_mixtral(tmp_path / "q", "weight"))
    assert torch.equal(loaded.model.layers[0].mlp.experts[1].w3.weight, model.model.layers[0].mlp.experts[1].w3.weight)
    item = inputs("mixtral", 1, torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(output(loaded, item), output(model, item), rtol=0, atol=0)


def test_other_quantization_methods_are_refused(gen, tmp_path):
    _, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q")
    qconfig = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    (tmp_path / "q" / "quantize_config.json").write_text(json.dumps(dict(qconfig, quant_method="awq")))
    with pytest.raises(ValueError, match="unsupported quant_method 'awq'"):
        epmq.load_quantized(tmp_path / "q")


def test_gptqmodels_own_field_names_are_read(tmp_path):
    """GPTQModel names the fields "method" and "format" (quant_method and checkpoint_format are
    its deprecated aliases): a config with only "format": "gptq_v2" was read as v1, every zero
    point one off and the outputs silently wrong; "format": "marlin" (another packing) and
    "method": "awq" loaded as GPTQ."""
    model = build("llama")
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q", checkpoint_format="gptq_v2")
    q = tmp_path / "q"
    qconfig = json.loads((q / "quantize_config.json").read_text())
    del qconfig["epmq"], qconfig["checkpoint_format"], qconfig["quant_method"]

    def load(**fields):
        (q / "quantize_config.json").write_text(json.dumps(dict(qconfig, **fields)))
        return epmq.load_quantized(q)

    loaded = load(method="gptq", format="gptq_v2")
    item = inputs("llama", 1, torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(output(loaded, item), output(model, item), rtol=0, atol=0)
    with pytest.raises(ValueError, match="checkpoint_format 'marlin'"):
        load(format="marlin")
    with pytest.raises(ValueError, match="unsupported quant_method 'awq'"):
        load(method="awq")
    with pytest.raises(ValueError, match="says checkpoint_format 'gptq' but format 'gptq_v2'"):
        load(checkpoint_format="gptq", format="gptq_v2")


# --------------------------------------------------------------------------- shards


def test_large_state_dicts_are_sharded_as_transformers_shards_them(gen, tmp_path):
    from epmq.checkpoint_io import CheckpointReader

    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "one")
    whole = load_file(str(tmp_path / "one" / "model.safetensors"))
    limit = 4_000
    epmq.save_quantized(model, tmp_path / "q", max_shard_size=limit)
    files = sorted(os.listdir(tmp_path / "q"))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors" not in files
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(whole)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in whole.values())
    for shard in shards:
        held = load_file(str(tmp_path / "q" / shard))
        assert {k for k, f in index["weight_map"].items() if f == shard} == set(held)
        size = sum(t.numel() * t.element_size() for t in held.values())
        assert size <= limit or len(held) == 1
        for k, t in held.items():
            assert torch.equal(t, whole[k])
    reader = CheckpointReader(tmp_path / "q", "the sharded checkpoint")  # as any index is read
    assert sorted(reader.keys()) == sorted(whole)
    fresh = epmq.load_quantized(tmp_path / "q", fam.fresh())
    torch.testing.assert_close(output(fresh, fam.test_item), output(model, fam.test_item), rtol=0, atol=0)
    # written again in one file: the old shards and index go with the old checkpoint
    epmq.save_quantized(model, tmp_path / "q")
    assert sorted(os.listdir(tmp_path / "q")) == [".epmq_files.json", "config.json", "generation_config.json",
                                                   "model.safetensors", "quantize_config.json"]


def test_the_write_of_a_checkpoint_shows_its_bytes_shard_by_shard_unless_told_not_to(gen, tmp_path, capsys,
                                                                                       monkeypatch):
    """save_quantized wrote a 70B model's tens of GB with no word, minutes after the walk's bar had
    ended: a bar of the bytes written, advanced as each shard is on disk (synced: the page cache's
    flush came silently after the bar); silent with progress=False."""
    from tqdm import tqdm

    fam, model = quantized(gen)
    written, events = [], []
    fsync = ckpt._fsync
    monkeypatch.setattr(ckpt, "_fsync", lambda path: events.append(Path(path).name) or fsync(path))
    writer = ckpt.ShardWriter(tmp_path, 4_000, written=lambda size: written.append(size) or events.append(size))
    for name, t in model.state_dict().items():
        writer[name] = t
    writer.finish()
    shards = [load_file(str(p)) for p in sorted(tmp_path.glob("model-*.safetensors"))]
    assert len(shards) > 2 and written == [sum(t.numel() * t.element_size() for t in s.values()) for s in shards]
    # each shard's bytes counted once they are on disk, not in the page cache alone
    assert events == [e for k, size in enumerate(written) for e in (f".part-{k:05d}.safetensors", size)]
    capsys.readouterr()
    epmq.save_quantized(model, tmp_path / "q", max_shard_size=4_000)
    err = capsys.readouterr().err
    total = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    size = tqdm.format_sizeof(total, divisor=1024)
    assert "save q: 100%" in err and f"{size}/{size}" in err, err
    epmq.save_quantized(model, tmp_path / "q", progress=False)
    assert capsys.readouterr().err == ""


def test_the_read_of_a_checkpoint_shows_its_bytes_shard_by_shard_unless_told_not_to(gen, tmp_path, capsys,
                                                                                   monkeypatch):
    """load_quantized read tens of GB of shards (minutes) with no word: a bar of the bytes read,
    advanced as each shard is read, named by the directory (given as ".", its own name);
    silent with progress=False."""
    from tqdm import tqdm

    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q", max_shard_size=4_000, progress=False)
    shards = sorted((tmp_path / "q").glob("model-*.safetensors"))
    assert len(shards) > 2
    size = tqdm.format_sizeof(sum(f.stat().st_size for f in shards), divisor=1024)
    capsys.readouterr()
    for model in (fam.fresh(), None):  # (a model of one's own, and one built from the checkpoint)
        epmq.load_quantized(tmp_path / "q", model)
        err = capsys.readouterr().err
        assert "load q: 100%" in err and f"{size}/{size}" in err, err
        epmq.load_quantized(tmp_path / "q", model and fam.fresh(), progress=False)
        assert capsys.readouterr().err == ""
    monkeypatch.chdir(tmp_path / "q")  # (".": the bar said "load " and nothing)
    epmq.load_quantized(".")
    assert "load q: 100%" in capsys.readouterr().err


def test_a_damaged_index_or_shard_is_named(gen, tmp_path):
    """A truncated index, one without weight_map, or a truncated shard gave a bare
    JSONDecodeError, KeyError('weight_map') or SafetensorError naming no file."""
    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q", max_shard_size=4_000)
    index = tmp_path / "q" / "model.safetensors.index.json"
    good = index.read_text()
    for content, message in ((good[:40], "index.json is not valid JSON"),
                             (json.dumps({"metadata": {}}), "index.json has no weight_map")):
        index.write_text(content)
        with pytest.raises(ValueError, match=message):
            epmq.load_quantized(tmp_path / "q", fam.fresh())
    index.write_text(good)
    shard = sorted((tmp_path / "q").glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"cannot read .*{shard.name}"):
        epmq.load_quantized(tmp_path / "q", fam.fresh())


def test_a_single_weights_file_is_read_before_a_stale_index(gen, tmp_path):
    """As ``from_pretrained`` reads a directory where another tool's sharded save left its index
    beside the single file written later (the index's shards gone: it was refused)."""
    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q")
    (tmp_path / "q" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    fresh = epmq.load_quantized(tmp_path / "q", fam.fresh())
    torch.testing.assert_close(output(fresh, fam.test_item), output(model, fam.test_item), rtol=0, atol=0)


def test_the_config_describes_every_layer(gen, tmp_path):
    """sym tells engines to ignore qzeros: it is written only if every layer's grid is
    symmetric; layers of other bit widths get dynamic rules (the config holds one)."""
    fam = Family("llama", gen, n_samples=1)
    model = fam.merged()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", layers="self_attn",
                        progress=False)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16, sym=True), method="rtn", layers="mlp",
                        progress=False)
    with pytest.warns(UserWarning,
                      match="asymmetric grids and groups of 16: vLLM since .* refuses .* older vLLM and SGLang serve"):
        epmq.save_quantized(model, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["sym"] is False
    model = fam.merged()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", layers="self_attn",
                        progress=False)
    epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=-1), method="rtn", layers="mlp",
                        progress=False)
    epmq.save_quantized(model, tmp_path / "mixed")
    for q in _qconfigs(tmp_path / "mixed"):
        for name, m in model.named_modules():
            if isinstance(m, epmq.QuantLinear):
                assert _rule_settings(q, name) == (m.bits, m.group_size), name
    loaded = epmq.load_quantized(tmp_path / "mixed")
    torch.testing.assert_close(output(loaded, fam.test_item), output(model, fam.test_item), rtol=0, atol=0)


def test_what_epmq_wrote_is_replaced_and_what_the_user_changed_is_kept(two_models):
    """Files epmq itself wrote (here by ``extras``) belong to that checkpoint: the next save
    does not carry them over, unless the user changed them since."""
    fam, old, new, directory = two_models
    epmq.save_quantized(old, directory, extras=lambda d: [(d / n).write_text("old run") for n in
                                                         ("epmq_report.json", "tokenizer.json")])
    (directory / "tokenizer.json").write_text("the user's")
    epmq.save_quantized(new, directory)
    assert not (directory / "epmq_report.json").exists()
    assert (directory / "tokenizer.json").read_text() == "the user's"


def test_a_loaded_model_saved_again_keeps_its_tokenizer(two_models, tmp_path):
    """``m = load_quantized(d); save_quantized(m, d)`` (to rewrite it as gptq_v2, say) dropped
    the tokenizer ``epmq quantize`` had written there (epmq's own file, which the new write did
    not make): the model now carries its checkpoint's tokenizer and processor files, and writes
    them in place or elsewhere; not the old run's report or README."""
    fam, old, new, directory = two_models
    served = {"tokenizer.json": '{"the": "tokenizer"}', "tokenizer_config.json": "{}",
              "preprocessor_config.json": '{"size": 16}', "additional_chat_templates/rag.jinja": "{{ x }}"}

    def extras(d):
        (d / "additional_chat_templates").mkdir()
        for name, text in {**served, "epmq_report.json": "old run", "README.md": "old card"}.items():
            (d / name).write_text(text)

    epmq.save_quantized(old, directory, extras=extras)
    loaded = epmq.load_quantized(directory, fam.fresh())
    for target in (directory, tmp_path / "copy"):
        epmq.save_quantized(loaded, target, checkpoint_format="gptq_v2")
        assert {name: (target / name).read_text() for name in served} == served
        assert not (target / "epmq_report.json").exists() and not (target / "README.md").exists()
        again = epmq.load_quantized(target, fam.fresh())
        torch.testing.assert_close(output(again, fam.test_item), output(old, fam.test_item), rtol=0, atol=0)
    epmq.save_quantized(new, directory)  # (another model: the tokenizer is the write's to give)
    assert not (directory / "tokenizer.json").exists()


def test_a_model_loaded_from_a_hub_snapshot_keeps_its_tokenizer(two_models, tmp_path):
    """The HF hub's cache holds a snapshot's files as links to its blobs (load_quantized of
    ``org/name`` reads one): its tokenizer and processor files are carried as a directory's
    are, and written with the model saved elsewhere."""
    fam, old, _, directory = two_models
    served = {"tokenizer.json": '{"the": "tokenizer"}', "chat_template.jinja": "{{ m }}",
              "additional_chat_templates/rag.jinja": "{{ x }}"}

    def extras(d):
        (d / "additional_chat_templates").mkdir()
        for name, text in served.items():
            (d / name).write_text(text)

    epmq.save_quantized(old, directory, extras=extras)
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    for path in sorted(directory.rglob("*")):  # (as huggingface_hub lays out its cache)
        target = snapshot / path.relative_to(directory)
        if path.is_dir():
            target.mkdir(parents=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        blob = blobs / f"{len(os.listdir(blobs))}"
        shutil.copy(path, blob)
        target.symlink_to(os.path.relpath(blob, target.parent))
    loaded = epmq.load_quantized(snapshot, fam.fresh())
    epmq.save_quantized(loaded, tmp_path / "copy")
    assert {name: (tmp_path / "copy" / name).read_text() for name in served} == served
    assert not any(p.is_symlink() for p in (tmp_path / "copy").rglob("*"))


def test_symlinked_checkpoints_stay_links(two_models, tmp_path):
    fam, old, new, directory = two_models
    link = tmp_path / "link"
    link.symlink_to(directory)
    epmq.save_quantized(new, link)
    assert link.is_symlink() and link.resolve() == directory.resolve()
    assert json.loads((directory / "quantize_config.json").read_text())["bits"] == 8
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_killed_writes_temporary_is_removed_by_the_next(two_models, monkeypatch):
    fam, old, new, directory = two_models
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = directory.parent / f".{directory.name}.tmp-{dead.pid}-abc"
    live = directory.parent / f".{directory.name}.tmp-{os.getppid()}-abc"
    for path in (stale, live):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
    epmq.save_quantized(new, directory)
    assert not stale.exists() and live.exists()


def test_a_killed_writes_temporary_of_this_process_s_pid_is_removed_by_the_next(two_models):
    """A container restarted after a kill (a preempted job) runs the same command under the same
    pid: the killed save's temporary (a whole checkpoint) bears this process's pid, which is not
    the one that made it, and was kept by every later run of that pid."""
    fam, old, new, directory = two_models
    killed = directory.parent / f".{directory.name}.tmp-{os.getpid()}-abc"
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"partial")
    epmq.save_quantized(new, directory)
    assert not killed.exists()


def test_a_killed_json_writes_temporary_is_removed_by_the_next(tmp_path):
    """(results.json of ``epmq run``, block records of a resumable walk)"""
    from epmq._util import write_json_atomic

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = tmp_path / "results [1].json"  # (a name that is also a glob pattern)
    stale, live = (tmp_path / f".{path.name}.tmp-{pid}" for pid in (dead.pid, os.getppid()))
    other = tmp_path / f".other.json.tmp-{dead.pid}"
    for p in (stale, live, other):
        p.write_text("{")
    write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert not stale.exists() and live.exists() and other.exists()

def test_an_atomic_write_syncs_its_directory_after_the_rename(tmp_path, monkeypatch):
    """write_atomic (results.json of ``epmq run``, a resumable walk's records, the report) synced the
    new file and renamed it over the old one, but not the directory holding the rename: after a power
    loss the name could still point at the old file, or at none where there was none. The directory
    is synced after the rename."""
    from epmq import _util

    synced, fsync = [], os.fsync

    def recording(fd):
        synced.append((os.path.realpath(f"/proc/self/fd/{fd}"), (tmp_path / "out" / "r.json").exists()))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording)
    _util.write_json_atomic(tmp_path / "out" / "r.json", {"a": 1})
    assert json.loads((tmp_path / "out" / "r.json").read_text()) == {"a": 1}
    assert synced[-1] == (os.path.realpath(tmp_path / "out"), True)


def test_saving_into_the_working_directory(gen, tmp_path, monkeypatch):
    _, model = quantized(gen)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    epmq.save_quantized(model, ".")
    assert (tmp_path / "here" / "model.safetensors").is_file()


def test_the_working_directory_follows_the_checkpoint_it_was_in(gen, tmp_path, monkeypatch):
    """A write replaces the directory by a new one: a process working in it (or in a folder of
    it, carried over) was left in the deleted old one, where "." listed nothing, a second save
    into "." failed in os.getcwd() and load_quantized(".") found no checkpoint."""
    _, model = quantized(gen)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    for _ in range(2):  # (an empty directory, then a checkpoint of epmq's)
        epmq.save_quantized(model, ".")
        assert Path.cwd() == here and (Path(".") / "model.safetensors").is_file()
    epmq.load_quantized(".")
    (here / "notes").mkdir()  # a user's folder, carried over into the new checkpoint
    monkeypatch.chdir(here / "notes")
    epmq.save_quantized(model, here)
    assert Path.cwd() == here / "notes" and Path("../model.safetensors").is_file()


@pytest.mark.parametrize("size,want", [(1000, 1000), ("5GB", 5 * 10**9), ("500MiB", 500 * 2**20),
                                       ("1.5 kb", 1500), ("50GB", 50 * 10**9)])
def test_shard_sizes(size, want):
    assert ckpt._bytes(size) == want


def test_a_shard_size_of_numpy_is_the_same_size(gen, tmp_path):
    """max_shard_size=np.int64(4000) (a sweep's, or one read from an array) was refused as 'must be
    a number of bytes or a string like '5GB'', where transformers' save_pretrained takes it;
    the same shards as 4000 (np.bool_ and floats still refused)."""
    import numpy as np

    assert ckpt._bytes(np.int64(4000)) == 4000 and type(ckpt._bytes(np.uint32(4000))) is int
    _, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "int", max_shard_size=4000)
    epmq.save_quantized(model, tmp_path / "np", max_shard_size=np.int64(4000))
    assert sorted(os.listdir(tmp_path / "np")) == sorted(os.listdir(tmp_path / "int"))
    for size in (np.True_, np.float64(4000.5)):
        with pytest.raises(ValueError, match="max_shard_size"):
            ckpt._bytes(size)


@pytest.mark.parametrize("size", ["5 parsecs", "GB", 0, -1, True, 1.5, None, "inf", "1e400GB", "nan"])
def test_bad_shard_sizes(size, gen, tmp_path):
    _, model = quantized(gen)
    with pytest.raises(ValueError, match="max_shard_size"):
        epmq.save_quantized(model, tmp_path / "q", max_shard_size=size)
    assert not (tmp_path / "q").exists()


# --------------------------------------------------------------------------- atomic writes


def contents(directory):
    return {p: (directory / p).read_bytes() for p in sorted(os.listdir(directory))}


@pytest.fixture
def two_models(gen, tmp_path):
    """A checkpoint on disk (4 bits) and another model (8 bits) to write over it."""
    fam, old = quantized(gen, bits=4)
    epmq.save_quantized(old, tmp_path / "q")
    _, new = quantized(gen, bits=8)
    return fam, old, new, tmp_path / "q"


def assert_previous_checkpoint_intact(fam, old, directory, before):
    assert contents(directory) == before
    assert os.listdir(directory.parent) == ["q"]  # no temporary directory left behind
    loaded = epmq.load_quantized(directory, fam.fresh())
    torch.testing.assert_close(output(loaded, fam.test_item), output(old, fam.test_item), rtol=0, atol=1e-6)


def test_crash_while_writing_tensors_keeps_the_previous_checkpoint(two_models, monkeypatch):
    fam, old, new, directory = two_models
    before = contents(directory)

    def crash(tensors, path):
        path.write_bytes(b"\0" * 1000)  # half a file, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_tensors", crash)
    with pytest.raises(OSError, match="No space left"):
        epmq.save_quantized(new, directory)
    assert_previous_checkpoint_intact(fam, old, directory, before)


@pytest.mark.parametrize("message", [
    "Error while serializing: I/O error: No space left on device (os error 28)",  # (>= 0.6)
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })',
])
def test_a_disk_that_fills_up_under_safetensors_is_an_oserror(two_models, monkeypatch, message):
    """safetensors reports a full disk as its own SafetensorError (the messages of real ones on a
    full tmpfs, 0.8.0 and 0.5.3: before 0.6 it printed the Rust error's Debug form): it is raised
    as the OSError it is, which the CLI says in one line (it ended epmq merge, quantize, run and
    demo in a traceback), and nothing is left behind."""
    import safetensors.torch
    from safetensors import SafetensorError

    fam, old, new, directory = two_models
    before = contents(directory)

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError(message)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match="No space left on device") as error:
        epmq.save_quantized(new, directory)
    assert error.value.errno == 28
    assert_previous_checkpoint_intact(fam, old, directory, before)


def test_crash_before_the_swap_keeps_the_previous_checkpoint(two_models, monkeypatch):
    fam, old, new, directory = two_models
    before = contents(directory)
    real = ckpt._fsync

    def fsync(path):
        if path.is_dir():
            raise KeyboardInterrupt  # killed after writing, before the swap
        real(path)

    monkeypatch.setattr(ckpt, "_fsync", fsync)
    with pytest.raises(KeyboardInterrupt):
        epmq.save_quantized(new, directory)
    assert_previous_checkpoint_intact(fam, old, directory, before)


def test_every_file_of_the_new_checkpoint_is_fsynced_before_the_swap(two_models, monkeypatch):
    """A tokenizer's additional_chat_templates/ (transformers >= 4.54, written by extras) is part of
    what a crash after the swap must find whole: its files are fsynced before the swap, as the
    top-level ones are (they were not: a power loss could leave them empty in the new checkpoint,
    the old one already deleted)."""
    fam, old, new, directory = two_models
    synced, swapped = [], []
    real_fsync, real_replace = ckpt._fsync, ckpt._replace_dir
    monkeypatch.setattr(ckpt, "_fsync", lambda path: synced.append(path) or real_fsync(path))
    monkeypatch.setattr(ckpt, "_replace_dir", lambda a, b: swapped.append((a, list(synced))) or real_replace(a, b))

    def extras(tmp):
        (tmp / "additional_chat_templates").mkdir()
        (tmp / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")

    epmq.save_quantized(new, directory, extras=extras)
    tmp, before_swap = swapped[0]
    before_swap = {p.relative_to(tmp).as_posix() for p in before_swap if tmp in p.parents}
    for name in ("model.safetensors", "additional_chat_templates", "additional_chat_templates/tool_use.jinja"):
        assert name in before_swap, name
    assert (directory / "additional_chat_templates" / "tool_use.jinja").read_text() == "{{ tools }}"


def test_swap_replaces_the_checkpoint(two_models):
    fam, old, new, directory = two_models
    epmq.save_quantized(new, directory)
    assert os.listdir(directory.parent) == ["q"]
    assert json.loads((directory / "quantize_config.json").read_text())["bits"] == 8
    loaded = epmq.load_quantized(directory, fam.fresh())
    torch.testing.assert_close(output(loaded, fam.test_item), output(new, fam.test_item), rtol=0, atol=1e-6)


@pytest.mark.parametrize("failing", ["old aside", "new in"])
def test_two_rename_fallback_restores_on_failure(two_models, monkeypatch, failing):
    """Without renameat2 the swap is two renames: the old checkpoint aside, the new one into its
    place. Either failing leaves the old checkpoint where it was (the second: renamed back).
    (``Path.rename`` calls ``os.rename`` too while the shards are written: the failing call is
    picked by its paths.)"""
    fam, old, new, directory = two_models
    before = contents(directory)
    monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    real, failed = os.rename, []

    def rename(src, dst):
        src, dst = Path(src), Path(dst)
        if (src == directory and dst.name.startswith(f".{directory.name}.old-") if failing == "old aside"
                else src.name.startswith(f".{directory.name}.tmp-") and dst == directory):
            failed.append(src)
            raise OSError("rename failed")
        real(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        epmq.save_quantized(new, directory)
    monkeypatch.setattr(ckpt.os, "rename", real)
    assert len(failed) == 1
    assert_previous_checkpoint_intact(fam, old, directory, before)
    epmq.save_quantized(new, directory)  # and the fallback itself works
    assert json.loads((directory / "quantize_config.json").read_text())["bits"] == 8
    assert os.listdir(directory.parent) == ["q"]


def test_replacing_keeps_what_the_user_put_beside_the_checkpoint(two_models):
    """A tokenizer saved into the checkpoint directory survives the next save; weights files
    the user put there are neither kept (engines would read them as the checkpoint's) nor
    dropped: the save is refused, naming them, and nothing changes."""
    fam, old, new, directory = two_models
    (directory / "tokenizer.json").write_text("{}")
    (directory / "extra").mkdir()
    (directory / "extra" / "README.md").write_text("notes")
    for stray in ("model.safetensors.index.json", "training_args.bin"):
        (directory / stray).write_text("{}")
        before = sorted(os.listdir(directory))
        with pytest.raises(ValueError, match=f"weights files epmq did not write there \\({stray}\\)"):
            epmq.save_quantized(new, directory)
        assert sorted(os.listdir(directory)) == before
        (directory / stray).unlink()
    epmq.save_quantized(new, directory)
    assert sorted(os.listdir(directory)) == [".epmq_files.json", "config.json", "extra", "generation_config.json",
                                             "model.safetensors", "quantize_config.json", "tokenizer.json"]
    assert (directory / "extra" / "README.md").read_text() == "notes"
    assert json.loads((directory / "quantize_config.json").read_text())["bits"] == 8


def test_a_file_epmq_wrote_and_the_user_changed_is_kept(two_models):
    """generation_config.json edited by hand (max_new_tokens) survives the next save, with a
    warning naming it; the files epmq wrote and nobody changed are the new write's; the
    checkpoint's own configs are always the new write's."""
    import time

    fam, old, new, directory = two_models
    time.sleep(0.01)  # (a new modification time, whatever the file system's resolution)
    generation = json.loads((directory / "generation_config.json").read_text())
    (directory / "generation_config.json").write_text(json.dumps(dict(generation, max_new_tokens=7)))
    (directory / "quantize_config.json").write_text(json.dumps(
        dict(json.loads((directory / "quantize_config.json").read_text()), note="mine")))
    with pytest.warns(UserWarning, match=r"kept your changed generation_config\.json in place"):
        epmq.save_quantized(new, directory)
    assert json.loads((directory / "generation_config.json").read_text())["max_new_tokens"] == 7
    assert "note" not in json.loads((directory / "quantize_config.json").read_text())
    with warnings_recorded() as record:  # (the kept file is the user's from now on: kept again, said again)
        epmq.save_quantized(old, directory)
    assert [w for w in record if "kept your changed generation_config.json" in str(w.message)]
    (directory / "generation_config.json").unlink()
    epmq.save_quantized(new, directory)
    assert "max_new_tokens" not in json.loads((directory / "generation_config.json").read_text())


def test_a_folder_epmq_wrote_is_its_own(two_models):
    """A folder the write makes (a tokenizer's additional_chat_templates/) is listed in the
    manifest: written again unchanged, it is no user's change (it was kept, warned about);
    a write without it removes it (a template the source dropped was shipped on); a file of it
    the user changed keeps the folder, said."""
    fam, old, new, directory = two_models

    def templates(*names):
        def write(path):
            (path / "additional_chat_templates").mkdir()
            for name in names:
                (path / "additional_chat_templates" / f"{name}.jinja").write_text(f"{{{{ '{name}' }}}}")
        return write

    epmq.save_quantized(new, directory, extras=templates("tool_use", "rag"))
    with warnings_recorded() as record:
        epmq.save_quantized(new, directory, extras=templates("tool_use", "rag"))
    assert not [w for w in record if "kept your changed" in str(w.message)]
    epmq.save_quantized(new, directory, extras=templates("rag"))
    assert os.listdir(directory / "additional_chat_templates") == ["rag.jinja"]
    epmq.save_quantized(new, directory)
    assert not (directory / "additional_chat_templates").exists()
    epmq.save_quantized(new, directory, extras=templates("rag"))
    (directory / "additional_chat_templates" / "rag.jinja").write_text("mine")
    with pytest.warns(UserWarning, match="kept your changed additional_chat_templates in place"):
        epmq.save_quantized(new, directory, extras=templates("rag"))
    assert (directory / "additional_chat_templates" / "rag.jinja").read_text() == "mine"


def test_a_folder_saved_first_as_the_write_makes_it_is_not_the_users_change(two_models):
    """The tokenizer saved first with its additional_chat_templates/, then the checkpoint with
    the same tokenizer: the folder is the write's own, as an identical file is (it was warned
    of as 'your changed additional_chat_templates' kept)."""
    fam, old, new, directory = two_models
    shutil.rmtree(directory)
    directory.mkdir()

    def tokenizer(path):
        (path / "tokenizer.json").write_text('{"the": "tokenizer"}')
        (path / "additional_chat_templates").mkdir()
        (path / "additional_chat_templates" / "tool_use.jinja").write_text("{{ x }}")

    tokenizer(directory)
    with warnings_recorded() as record:
        epmq.save_quantized(new, directory, extras=tokenizer)
    assert not [w for w in record if "kept your changed" in str(w.message)]
    assert (directory / "additional_chat_templates" / "tool_use.jinja").read_text() == "{{ x }}"


def test_a_copied_checkpoint_is_replaced_by_the_next_write(two_models):
    """A copy (cp -r, scp, a hub download) gives every file a new time, not new content: epmq's
    files are still its own, and the next write's stand (not the copy's, with a warning). A
    manifest of 2026-12-02 (size and time) is still read."""
    fam, old, new, directory = two_models
    generation = directory / "generation_config.json"
    content = generation.read_text()
    os.utime(generation, ns=(10**18, 10**18))
    (directory / "generation_config.json").write_text(content)  # (the same content, written again)
    with warnings_recorded() as record:
        epmq.save_quantized(new, directory)
    assert not [w for w in record if "kept your changed" in str(w.message)]
    manifest = json.loads((directory / ckpt.MANIFEST_FILE).read_text())
    assert manifest["generation_config.json"][1] != content  # (a hash, not the text)
    stat = generation.stat()
    manifest["generation_config.json"] = [stat.st_size, stat.st_mtime_ns]
    (directory / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))
    with warnings_recorded() as record:
        epmq.save_quantized(old, directory)
    assert not [w for w in record if "kept your changed" in str(w.message)]


def test_a_gptq_checkpoint_another_tool_wrote_is_not_replaced(gen, tmp_path):
    """Every GPTQ tool writes a quantize_config.json: without epmq's manifest or its own section
    in that file, the directory is another tool's checkpoint and is left alone."""
    _, model = quantized(gen)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32, "desc_act": False}))
    (theirs / "gptq_model-4bit-32g.safetensors").write_bytes(b"weights")
    with pytest.raises(ValueError, match="holds a checkpoint epmq did not write"):
        epmq.save_quantized(model, theirs)
    assert sorted(os.listdir(theirs)) == ["gptq_model-4bit-32g.safetensors", "quantize_config.json"]
    # one epmq wrote before the manifest existed (its section in quantize_config.json) is replaced
    epmq.save_quantized(model, tmp_path / "ours")
    (tmp_path / "ours" / ckpt.MANIFEST_FILE).unlink()
    epmq.save_quantized(model, tmp_path / "ours")
    # without its manifest, weights files epmq's naming does not make are the user's: refused,
    # not dropped (the files it names are the checkpoint's own, replaced)
    ours = tmp_path / "ours"
    (ours / ckpt.MANIFEST_FILE).unlink()
    (ours / "training_args.bin").write_bytes(b"user data")
    (ours / "adapter_model.safetensors").write_bytes(b"x")
    before = sorted(os.listdir(ours))
    with pytest.raises(ValueError, match=r"did not write there \(adapter_model.safetensors, training_args.bin\)"):
        epmq.save_quantized(model, ours)
    assert sorted(os.listdir(ours)) == before and (ours / "training_args.bin").read_bytes() == b"user data"


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(gen, tmp_path):
    _, model = quantized(gen)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an epmq checkpoint"):
        epmq.save_quantized(model, tmp_path)
    assert os.listdir(tmp_path) == ["notes.txt"]
    # epmq merge's output is epmq's, but not a checkpoint save_quantized replaces: said so
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / ckpt.MERGE_RECIPE_FILE).write_text("{}")
    with pytest.raises(ValueError, match=r"holds a merged checkpoint \(epmq merge\)"):
        epmq.save_quantized(model, merged)
    assert os.listdir(merged) == [ckpt.MERGE_RECIPE_FILE]


def test_save_needs_a_quantized_model(gen, tmp_path):
    with pytest.raises(ValueError, match="quantize it first"):
        epmq.save_quantized(build("llama"), tmp_path / "q")


def test_peer_checkpoint_whose_group_size_does_not_divide_a_layer(tmp_path):
    """GPTQModel and AutoGPTQ write ceil(K / g) groups when g does not divide K (the last group
    shorter): such layers load, and compute (q - z[k // g]) * s[k // g] exactly."""
    import transformers
    from safetensors.torch import save_file

    from epmq.packing import unpack_cols, unpack_rows

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=96, intermediate_size=192, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128)).eval()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=32), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "c")
    tensors = load_file(str(tmp_path / "c" / "model.safetensors"))
    for key in [k for k in tensors if k.endswith(".g_idx")]:  # rewritten with groups of 64
        prefix, K = key[:-len(".g_idx")], tensors[key].numel()
        G = -(-K // 64)
        tensors[key] = (torch.arange(K) // 64).to(torch.int32)
        for name in ("scales", "qzeros"):
            tensors[f"{prefix}.{name}"] = tensors[f"{prefix}.{name}"][:G].contiguous()
    save_file(tensors, str(tmp_path / "c" / "model.safetensors"), metadata={"format": "pt"})
    for name in ("quantize_config.json", "config.json"):
        config = json.loads((tmp_path / "c" / name).read_text())
        qc = config.get("quantization_config", config)
        qc.pop("epmq", None)
        qc["group_size"] = 64
        (tmp_path / "c" / name).write_text(json.dumps(config))
    loaded = epmq.load_quantized(tmp_path / "c")
    layer = loaded.model.layers[0].self_attn.q_proj  # K = 96: groups of 64 and 32
    assert layer.scales.shape[0] == 2
    t = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.startswith("model.layers.0.self_attn.q_proj.")}
    g = torch.arange(96) // 64
    z = unpack_cols(t["qzeros"], 4, layer.out_features).long() + 1  # (v1 stores z - 1)
    W = (unpack_rows(t["qweight"], 4, 96).long() - z[g]).float() * t["scales"].float()[g]
    assert torch.equal(layer.dequantize().t(), W)
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        logits = loaded(ids).logits
        assert torch.isfinite(logits).all()
        bf16 = copy.deepcopy(loaded).to(torch.bfloat16)(ids).logits.float()  # (no int4 CPU kernel here)
    torch.testing.assert_close(bf16, logits, rtol=0.1, atol=0.1)


def test_tied_embeddings_stay_one_parameter(tmp_path):
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True)).eval()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=32), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "c")
    loaded = epmq.load_quantized(tmp_path / "c")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    loaded.to(torch.bfloat16)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    epmq.save_quantized(loaded, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "quantize_config.json").read_text())["epmq"]["tied"]


def test_hand_edited_configs_are_named_or_corrected(gen, tmp_path):
    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q")
    path = tmp_path / "q" / "quantize_config.json"
    original = json.loads(path.read_text())
    edited = json.loads(path.read_text())
    layer = next(iter(edited["epmq"]["modules"]))
    edited["epmq"]["modules"][layer]["bits"] = 8
    path.write_text(json.dumps(edited))
    with pytest.raises(ValueError, match=f"{layer}.qweight is .* describes a 8-bit layer"):
        epmq.load_quantized(tmp_path / "q", fam.fresh())
    path.write_text(json.dumps(dict(original, bits=3)))  # the top level only: the layers win
    with pytest.warns(UserWarning, match="says 3 bits, .* every layer holds 4 bits"):
        loaded = epmq.load_quantized(tmp_path / "q", fam.fresh())
    epmq.save_quantized(loaded, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]["bits"] == 4
    path.write_text("{bits: 4")  # (hand-edited into invalid JSON)
    with pytest.raises(ValueError, match="quantize_config.json is not valid JSON"):
        epmq.load_quantized(tmp_path / "q", fam.fresh())


@pytest.mark.parametrize("method,spec", [
    ("gptq", epmq.QuantSpec(bits=4, group_size=32, act_order=True)),
    ("epmq", epmq.QuantSpec(bits=3, group_size=64, sym=True, static_groups=True, act_order=True)),
])
def test_a_group_size_not_dividing_a_layer_quantizes_saves_and_loads(gen, tmp_path, method, spec):
    """Groups of 32 or 64 over the MLP input of 80 (and attention's 96 for 64): ceil(K / g) groups,
    the last shorter; the checkpoint loads to the same logits, and save warns about servers."""
    import transformers

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    config = transformers.LlamaConfig(hidden_size=96, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (2, 12), generator=gen)
    experts = {"a": {k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}}
    epmq.quantize_model(model, spec, method=method, calibration={"a": [dict(input_ids=ids)]},
                        experts=experts if method == "epmq" else None, progress=False)
    down = model.model.layers[0].mlp.down_proj
    assert down.scales.shape[0] == -(-80 // spec.group_size)
    with pytest.warns(UserWarning, match="does not divide"):
        epmq.save_quantized(model, tmp_path / "q")
    loaded = epmq.load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


# --------------------------------------------------------------------------- serving, from a review


def _as_foreign(directory):
    """The checkpoint as another writer leaves it: no epmq section in its configs."""
    for name in ("quantize_config.json", "config.json"):
        config = json.loads((directory / name).read_text())
        config.get("quantization_config", config).pop("epmq", None)
        (directory / name).write_text(json.dumps(config))


def _llama(seed, **kw):
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, **kw)).eval()


def test_a_model_loaded_and_run_under_inference_mode(gen, tmp_path):
    """The usual serving setup: buffers made under inference_mode have no version counter, which
    the caches of the layers and of the kernel launcher must not ask for."""
    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q")
    x = next(iter(fam.calibration.values()))[0]
    want = output(epmq.load_quantized(tmp_path / "q"), x)
    with torch.inference_mode():
        loaded = epmq.load_quantized(tmp_path / "q")
        assert torch.equal(output(loaded, x), want)
        assert torch.isfinite(output(copy.deepcopy(loaded).to(torch.bfloat16), x).float()).all()
        # quantizing under inference_mode, too
        again = fam.merged()
        epmq.quantize_model(again, epmq.QuantSpec(bits=4, group_size=16), method="gptq",
                            calibration=fam.calibration, progress=False)
        assert torch.isfinite(output(again, x)).all()


def _peer_checkpoint_with_a_packed_head(tmp_path, tie_word_embeddings):
    """A Llama RTN-quantized with its lm_head packed too, saved as a peer writes it (GPTQModel's
    lm_head=True), and the model load_quantized builds of it."""
    from epmq.walker import _quant_linear

    model = _llama(0, tie_word_embeddings=tie_word_embeddings)
    spec = epmq.QuantSpec(bits=4, group_size=16)
    epmq.quantize_model(model, spec, method="rtn", progress=False)
    model.lm_head = _quant_linear(epmq.quant.rtn(model.lm_head.weight.detach(), spec), model.lm_head)
    epmq.save_quantized(model, tmp_path / "q")
    _as_foreign(tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["tie_word_embeddings"] = tie_word_embeddings  # (the peer writes the model's config as it is)
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    return model, epmq.load_quantized(tmp_path / "q")


def test_a_peer_checkpoint_with_a_quantized_lm_head(tmp_path):
    """GPTQModel's QuantizeConfig(lm_head=True) stores lm_head packed and no lm_head.weight: the
    head transformers ties by default (_tied_weights_keys) is not tied to the embeddings then."""
    model, loaded = _peer_checkpoint_with_a_packed_head(tmp_path, tie_word_embeddings=False)
    assert isinstance(loaded.lm_head, epmq.QuantLinear)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_packed_head_of_a_tied_config_is_not_tied_by_transformers_with_a_bare_error(tmp_path):
    """A peer's checkpoint with lm_head packed (GPTQModel's lm_head=True) of a config that ties it
    (tie_word_embeddings=True): it loads untied, its own head, but model.tie_weights() (which
    scripts call after editing a config, and resize_token_embeddings calls) ended in nn.Module's
    bare "KeyError: attribute 'weight' already exists"; refused naming the packed layer and why."""
    model, loaded = _peer_checkpoint_with_a_packed_head(tmp_path, tie_word_embeddings=True)
    with pytest.raises(AttributeError, match=r"QuantLinear\(in_features=32, out_features=64, bits=4.*\) is packed: "
                                             r"its weight cannot be set or tied to another tensor.*"
                                             r"tie_word_embeddings = False"):
        loaded.tie_weights()
    loaded.config.tie_word_embeddings = False  # (what the error says: the packed head is the model's own)
    loaded.tie_weights()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_packed_head_of_a_tied_config_is_saved_untied(tmp_path):
    """A packed lm_head of a config that ties it (a peer's lm_head=True checkpoint, saved again) was
    written with tie_word_embeddings: true, which vLLM reads as 'skip lm_head.*' (the head tied to the
    embeddings, its packed tensors dropped) and transformers as a head to tie (tie_weights refused on
    our QuantLinear); the saved config says false, at every level the class reads it (LLaVA's text
    config too), and the checkpoint loads back with the head's own logits."""
    import transformers
    from test_walker_towers import tiny_llava

    from epmq.walker import _quant_linear

    model, _ = _peer_checkpoint_with_a_packed_head(tmp_path, tie_word_embeddings=True)
    assert model.config.tie_word_embeddings
    epmq.save_quantized(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["tie_word_embeddings"] is False
    config = transformers.AutoConfig.from_pretrained(tmp_path / "ours")
    assert not config.tie_word_embeddings
    config.quantization_config = None  # (the class as transformers builds it: nothing tied to the head)
    assert transformers.LlamaForCausalLM(config).get_expanded_tied_weights_keys(all_submodels=True) == {}
    loaded = epmq.load_quantized(tmp_path / "ours")
    loaded.tie_weights()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)

    vlm = tiny_llava()
    vlm.config.tie_word_embeddings = vlm.config.text_config.tie_word_embeddings = True
    vlm.tie_weights()
    spec = epmq.QuantSpec(bits=4, group_size=16)
    epmq.quantize_model(vlm, spec, method="rtn", progress=False)
    vlm.lm_head = _quant_linear(epmq.quant.rtn(vlm.lm_head.weight.detach(), spec), vlm.lm_head)
    epmq.save_quantized(vlm, tmp_path / "vlm")
    saved = json.loads((tmp_path / "vlm" / "config.json").read_text())
    assert saved["tie_word_embeddings"] is False and saved["text_config"]["tie_word_embeddings"] is False
    assert not transformers.AutoConfig.from_pretrained(tmp_path / "vlm").tie_word_embeddings
    assert vlm.config.tie_word_embeddings  # (the model's own config is left as it is)


@pytest.mark.parametrize("tie_word_embeddings", [False, True])
def test_resizing_the_vocabulary_of_a_packed_head_changes_nothing_before_it_is_refused(tie_word_embeddings, tmp_path):
    """resize_token_embeddings of a model whose lm_head is packed (a peer's lm_head=True checkpoint)
    resized the embeddings to 80 rows, then ended in transformers' 'Old language model head is of type
    QuantLinear, which is not an instance of Linear': a model of 80 embeddings and 64 logits, its config
    still 64. Refused before anything changes, naming the packed head and the sizes."""
    model, loaded = _peer_checkpoint_with_a_packed_head(tmp_path, tie_word_embeddings=tie_word_embeddings)
    embeddings = loaded.model.embed_tokens
    before = embeddings.weight.detach().clone()
    for kw in (dict(new_num_tokens=80), dict(new_num_tokens=60), dict(pad_to_multiple_of=48)):
        with pytest.raises(ValueError, match=r"lm_head is packed \(QuantLinear\(in_features=32, out_features=64, "
                                             r"bits=4.*\)\): its 64 rows cannot be resized to "
                                             rf"{kw.get('new_num_tokens', 96)} tokens"):
            loaded.resize_token_embeddings(**kw)
        assert loaded.model.embed_tokens is embeddings and torch.equal(embeddings.weight, before)
        assert loaded.config.vocab_size == 64 and loaded.lm_head.out_features == 64
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    if not tie_word_embeddings:  # (the vocabulary it has: nothing to resize, as transformers does it)
        assert loaded.resize_token_embeddings(64, pad_to_multiple_of=32) is embeddings
    plain = _llama(0)
    epmq.quantize_model(plain, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    assert plain.resize_token_embeddings(80, mean_resizing=False).weight.shape == (80, 32)
    assert plain.lm_head.weight.shape == (80, 32) and plain.config.vocab_size == 80
    import transformers

    class OneArgument(transformers.LlamaForCausalLM):  # (as IBert's: its own takes new_num_tokens alone)
        def resize_token_embeddings(self, new_num_tokens=None):
            return super().resize_token_embeddings(new_num_tokens, mean_resizing=False)

    torch.manual_seed(0)
    plain = OneArgument(_llama(0).config).eval()
    epmq.quantize_model(plain, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    assert plain.resize_token_embeddings(72).weight.shape == (72, 32) and plain.config.vocab_size == 72
    with pytest.raises(TypeError, match="mean_resizing"):  # (its own signature, not one epmq supposes)
        plain.resize_token_embeddings(80, mean_resizing=False)


def _remote_code_llama(directory):
    """A model of a class a checkpoint's own code defines (trust_remote_code, config.json's auto_map):
    a Llama under another name, built as AutoModelForCausalLM builds such a model."""
    import transformers

    directory.mkdir()
    (directory / "configuration_mini.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass MiniConfig(LlamaConfig):\n    model_type = 'mini-remote'\n")
    (directory / "modeling_mini.py").write_text(
        "from transformers import LlamaForCausalLM\n\nfrom .configuration_mini import MiniConfig\n\n\n"
        "class MiniForCausalLM(LlamaForCausalLM):\n    config_class = MiniConfig\n")
    config = _llama(0).config.to_dict()
    config.update(model_type="mini-remote", architectures=["MiniForCausalLM"],
                  auto_map={"AutoConfig": "configuration_mini.MiniConfig",
                            "AutoModelForCausalLM": "modeling_mini.MiniForCausalLM"})
    (directory / "config.json").write_text(json.dumps(config))
    config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=True)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=True).eval()


def test_a_remote_code_model_is_saved_with_its_code(tmp_path):
    """A model whose classes its checkpoint's code defines (trust_remote_code) was saved with config.json's
    auto_map naming configuration_mini.py and modeling_mini.py but neither file, so transformers (and
    engines reading remote code) could not read the checkpoint: 'does not appear to have a file named
    configuration_mini.py'. Written as save_pretrained writes them; the checkpoint loads back."""
    import transformers

    model = _remote_code_llama(tmp_path / "src")
    assert type(model).__name__ == "MiniForCausalLM" and type(model)._auto_class is not None
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    for name in ("configuration_mini.py", "modeling_mini.py"):
        assert (tmp_path / "q" / name).read_text() == (tmp_path / "src" / name).read_text()
    config = transformers.AutoConfig.from_pretrained(tmp_path / "q", trust_remote_code=True)
    assert type(config).__name__ == "MiniConfig" and config.quantization_config["bits"] == 4
    loaded = epmq.load_quantized(tmp_path / "q", _remote_code_llama(tmp_path / "fresh"))
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    epmq.save_quantized(loaded, tmp_path / "again")  # (a model load_quantized filled: its code too)
    assert (tmp_path / "again" / "modeling_mini.py").is_file()


def test_a_remote_code_checkpoint_loaded_without_its_model_is_refused_by_name(tmp_path, monkeypatch):
    """load_quantized(d) of a checkpoint whose config.json names its own code (auto_map, a model_type
    transformers does not know) ended in transformers asking 'Do you wish to run the custom code? [y/N]'
    on a terminal (waiting for an answer) and then 'Please pass the argument trust_remote_code=True',
    which load_quantized does not take; refused before any code is read, with how to pass the model."""
    import io
    import sys

    model = _remote_code_llama(tmp_path / "src")
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # (an answer to a prompt: none is asked)
    with pytest.raises(ValueError, match=r"config\.json names classes its own code defines \(model_type "
                                         r"'mini-remote', auto_map: AutoConfig, AutoModelForCausalLM\).*"
                                         r"trust_remote_code=True.*load_quantized\(directory, model\)"):
        epmq.load_quantized(tmp_path / "q")
    assert sys.stdin.read() == "y\n"


def test_an_unpacked_head_of_a_tied_config_stays_tied(tmp_path):
    model = _llama(0, tie_word_embeddings=True)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["tie_word_embeddings"] is True


def test_a_compiled_model_saves_and_loads_under_its_own_names(tmp_path):
    model = _llama(1)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    compiled = torch.compile(model)
    epmq.save_quantized(compiled, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not any(k.startswith("_orig_mod") for k in load_file(str(tmp_path / "q" / "model.safetensors")))
    into = torch.compile(_llama(2))
    assert epmq.load_quantized(tmp_path / "q", into) is into
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(into._orig_mod(ids).logits, model(ids).logits)


def test_a_data_parallel_models_save_pretrained_writes_the_quantized_checkpoint(tmp_path):
    """quantize_model(nn.DataParallel(model)): ``model.module.save_pretrained`` stayed
    transformers' own, which writes packed tensors with no quantization config (load_quantized
    refused it; from_pretrained would read it as unquantized, its linears left random)."""
    model = _llama(1)
    wrapped = torch.nn.DataParallel(model)
    epmq.quantize_model(wrapped, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    model.save_pretrained(tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["bits"] == 4
    loaded = epmq.load_quantized(tmp_path / "q")
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)



def test_a_data_parallel_model_saves_and_loads_under_its_own_names(tmp_path):
    """save_quantized(nn.DataParallel(model)) wrote every name under ``module.`` and no
    config.json: load_quantized refused the directory, which loaded only into another wrapper."""
    model = _llama(1)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(torch.nn.DataParallel(model), tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert not any(k.startswith("module.") for k in load_file(str(tmp_path / "q" / "model.safetensors")))
    into = torch.nn.DataParallel(_llama(2))
    assert epmq.load_quantized(tmp_path / "q", into) is into
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(into.module(ids).logits, model(ids).logits)
        assert torch.equal(epmq.load_quantized(tmp_path / "q")(ids).logits, model(ids).logits)

def _written(directory):
    """What a checkpoint directory holds: each file's tensors, or its JSON (the manifest's
    times and sizes aside)."""
    out = {}
    for path in sorted(directory.iterdir()):
        if path.suffix == ".safetensors":
            out[path.name] = load_file(str(path))
        elif path.name != ".epmq_files.json":
            out[path.name] = json.loads(path.read_text())
    return out


def assert_same_checkpoint(a, b):
    a, b = _written(a), _written(b)
    assert a.keys() == b.keys()
    for name, content in a.items():
        if isinstance(content, dict) and content and all(isinstance(t, torch.Tensor) for t in content.values()):
            assert content.keys() == b[name].keys()
            assert all(torch.equal(t, b[name][k]) for k, t in content.items()), name
        else:
            assert content == b[name], name


@pytest.mark.parametrize("arch", ["llama", "hf_clip"])
def test_save_pretrained_of_a_quantized_model_writes_save_quantizeds_checkpoint(arch, tmp_path):
    """transformers' save_pretrained wrote the packed tensors in epmq's layout with no
    quantization_config: from_pretrained then read a plain model, its linears left random.
    Quantized (or loaded quantized), it writes what save_quantized writes, shards included."""
    model = build(arch)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    model.save_pretrained(tmp_path / "p")
    assert "quantization_config" in json.loads((tmp_path / "p" / "config.json").read_text())
    assert_same_checkpoint(tmp_path / "q", tmp_path / "p")
    epmq.save_quantized(model, tmp_path / "q-shards", max_shard_size=4000)
    model.save_pretrained(tmp_path / "p-shards", max_shard_size="4KB", token=None, safe_serialization=True)
    assert (tmp_path / "p-shards" / "model.safetensors.index.json").is_file()
    assert_same_checkpoint(tmp_path / "q-shards", tmp_path / "p-shards")
    model.save_pretrained(tmp_path / "not-main", is_main_process=False)
    assert not (tmp_path / "not-main").exists()
    item = inputs(arch, 1, torch.Generator().manual_seed(0))[0]
    loaded = epmq.load_quantized(tmp_path / "p")
    torch.testing.assert_close(output(loaded, item), output(epmq.load_quantized(tmp_path / "q"), item), rtol=0, atol=0)
    torch.testing.assert_close(output(loaded, item), output(model, item), rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "again")  # (a model loaded quantized saves as one too)
    torch.testing.assert_close(output(epmq.load_quantized(tmp_path / "again"), item), output(model, item),
                               rtol=0, atol=0)


def test_save_pretrained_of_a_model_holding_the_one_quantized(tmp_path):
    """quantize_model(lm.model), then lm.save_pretrained: only lm.model's save_pretrained was
    bound, and lm's, transformers' own, wrote the packed tensors with no quantization_config
    (load_quantized refused it; from_pretrained read the linears as random). It writes
    save_quantized's checkpoint, which loads to lm's outputs; a class call is still transformers'."""
    lm = _llama(1)
    epmq.quantize_model(lm.model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(lm, tmp_path / "q")
    lm.save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]["bits"] == 4
    assert_same_checkpoint(tmp_path / "q", tmp_path / "p")
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(epmq.load_quantized(tmp_path / "p")(ids).logits, lm(ids).logits)
    type(lm).save_pretrained(lm, tmp_path / "own")
    assert "quantization_config" not in json.loads((tmp_path / "own" / "config.json").read_text())


def _files(directory):
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_save_pretrained_through_the_class_is_transformers_own_before_the_first_save_too(tmp_path):
    """``type(lm).save_pretrained(lm, d)`` on a model holding the one quantized bound lm and wrote
    save_quantized's checkpoint the first time, and transformers' own the second: the same call, two
    checkpoints. Through the class it is transformers' own each time, as for a model quantized itself;
    a model with no packed layer saved either way is written as transformers writes it."""
    lm = _llama(1)
    epmq.quantize_model(lm.model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    type(lm).save_pretrained(lm, tmp_path / "first")
    type(lm).save_pretrained(lm, tmp_path / "second")
    assert "quantization_config" not in json.loads((tmp_path / "first" / "config.json").read_text())
    assert _files(tmp_path / "first") == _files(tmp_path / "second")
    lm.save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]["bits"] == 4
    plain = _llama(2)
    plain.save_pretrained(tmp_path / "plain")
    type(plain).save_pretrained(plain, tmp_path / "plain-class")
    assert "save_pretrained" not in vars(plain)
    import transformers
    transformers.PreTrainedModel.save_pretrained(plain, tmp_path / "own")
    assert _files(tmp_path / "plain") == _files(tmp_path / "plain-class") == _files(tmp_path / "own")


def test_save_pretrained_of_a_subclass_of_its_own_holding_the_one_quantized(tmp_path):
    """A model class whose own save_pretrained writes the state dict itself, never calling
    transformers': after quantize_model(lm.model), lm.save_pretrained wrote the packed tensors with
    no quantization_config (from_pretrained read the linears as random). It writes save_quantized's
    checkpoint, as a model quantized itself does; through the class it is the class's own."""
    import transformers
    from safetensors.torch import save_file

    class OwnSave(transformers.LlamaForCausalLM):
        def save_pretrained(self, directory, **kwargs):
            Path(directory).mkdir()
            self.config.save_pretrained(directory)
            save_file({k: t for k, t in self.state_dict().items() if k != "lm_head.weight"},
                      str(Path(directory) / "model.safetensors"))

    torch.manual_seed(1)
    lm = OwnSave(_llama(1).config).eval()
    epmq.quantize_model(lm.model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(lm, tmp_path / "q")
    lm.save_pretrained(tmp_path / "p")
    assert_same_checkpoint(tmp_path / "q", tmp_path / "p")
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(epmq.load_quantized(tmp_path / "p", OwnSave(lm.config))(ids).logits, lm(ids).logits)
    type(lm).save_pretrained(lm, tmp_path / "own")
    assert "quantization_config" not in json.loads((tmp_path / "own" / "config.json").read_text())
    plain = OwnSave(lm.config)
    plain.save_pretrained(tmp_path / "plain")
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["config.json", "model.safetensors"]


def test_save_pretrained_of_a_subclass_defined_after_the_walk_that_is_handed_packed_layers(tmp_path):
    """A class whose own save_pretrained writes the state dict itself, defined (imported) after the
    last quantize or load, whose model is then handed packed layers: only the classes there at a walk
    were installed on, so its save wrote the packed tensors with no quantization_config (from_pretrained
    read the linears as random), silently. It writes save_quantized's checkpoint, which loads back."""
    import transformers
    from safetensors.torch import save_file

    lm = _llama(1)
    epmq.quantize_model(lm, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)

    class DefinedLater(transformers.LlamaForCausalLM):
        def save_pretrained(self, directory, **kwargs):
            Path(directory).mkdir()
            self.config.save_pretrained(directory)
            save_file({k: t for k, t in self.state_dict().items() if k != "lm_head.weight"},
                      str(Path(directory) / "model.safetensors"))

    torch.manual_seed(2)
    later = DefinedLater(lm.config).eval()
    later.model = lm.model
    epmq.save_quantized(later, tmp_path / "q")
    later.save_pretrained(tmp_path / "p")
    assert_same_checkpoint(tmp_path / "q", tmp_path / "p")
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(epmq.load_quantized(tmp_path / "p", DefinedLater(lm.config))(ids).logits,
                           later(ids).logits)


@pytest.mark.parametrize("holder", [False, True])
def test_save_pretrained_of_a_model_whose_packed_layers_were_all_replaced_is_transformers_own(holder, tmp_path):
    """A model quantized (itself, or the one it holds) and saved, whose packed layers were then
    each replaced by an nn.Linear of its dequantize(): save_pretrained stayed bound to
    save_quantized, which refused the float model ("no QuantLinear layer: quantize it first").
    It is saved as transformers saves it, and from_pretrained reads it back."""
    import transformers

    lm = _llama(1)
    epmq.quantize_model(lm.model if holder else lm, epmq.QuantSpec(bits=4, group_size=16), method="rtn",
                        progress=False)
    lm.save_pretrained(tmp_path / "q")
    for name, m in list(lm.named_modules()):
        if isinstance(m, ckpt.QuantLinear):
            linear = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            linear.weight.data = m.dequantize()
            lm.set_submodule(name, linear)
    lm.save_pretrained(tmp_path / "fp")
    type(lm).save_pretrained(lm, tmp_path / "own")
    assert _files(tmp_path / "fp") == _files(tmp_path / "own")
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "fp")(ids).logits, lm(ids).logits)


@pytest.mark.parametrize("holder", [True, False])
def test_save_pretrained_of_a_subclass_of_its_own_that_calls_super_keeps_what_it_adds(holder, tmp_path):
    """A model class whose own save_pretrained calls super().save_pretrained and adds a file: it
    was skipped for a model quantized itself (bound to save_quantized), and for one holding the one
    quantized ran on the first save only (which bound it). It is run at every save, its super() call
    writing save_quantized's checkpoint. One that calls super() for something else, writing the
    state dict itself, is named, and what it wrote said to be read as unquantized."""
    import transformers

    class Carded(transformers.LlamaForCausalLM):
        def save_pretrained(self, directory, **kwargs):
            super().save_pretrained(directory, **kwargs)
            (Path(directory) / "README.md").write_text("card")

    class StateDictOnly(transformers.LlamaForCausalLM):
        def save_pretrained(self, directory, **kwargs):
            Path(directory).mkdir()
            torch.save(super().state_dict(), Path(directory) / "pytorch_model.bin")

    config = _llama(1).config
    for cls in (Carded, StateDictOnly):
        torch.manual_seed(1)
        lm = cls(config).eval()
        epmq.quantize_model(lm.model if holder else lm, epmq.QuantSpec(bits=4, group_size=16), method="rtn",
                            progress=False)
        if cls is Carded:
            epmq.save_quantized(lm, tmp_path / "q")
            for directory in (tmp_path / "p", tmp_path / "again"):
                lm.save_pretrained(directory)
                assert (directory / "README.md").read_text() == "card"
                (directory / "README.md").unlink()
                assert_same_checkpoint(tmp_path / "q", directory)
        else:
            with pytest.raises(RuntimeError, match=r"StateDictOnly\.save_pretrained.*super\(\)\.save_pretrained.*"
                                                   r"unquantized.*epmq\.save_quantized"):
                lm.save_pretrained(tmp_path / "own")


@pytest.mark.parametrize("holder", [False, True])
def test_save_pretrained_of_a_subclass_of_its_own_that_saves_a_model_it_holds(holder, tmp_path):
    """A model class whose own save_pretrained (one that can call super()) saves the model it holds,
    ``self.inner.save_pretrained``: that save wrote save_quantized's checkpoint of the inner model, and
    the class's was then refused as if it had written the packed layers with no quantization_config. The
    inner model's checkpoint is kept, and loads back to its outputs."""
    import transformers

    class Delegates(transformers.PreTrainedModel):
        config_class = transformers.LlamaConfig
        _supports_sdpa = True  # (as the model it holds: the same attention, loaded back)

        def __init__(self, config):
            super().__init__(config)
            self.inner = transformers.LlamaForCausalLM(config)

        def forward(self, ids):
            return self.inner(ids)

        def save_pretrained(self, directory, whole=False, **kwargs):
            if whole:
                return super().save_pretrained(directory, **kwargs)
            return self.inner.save_pretrained(directory, **kwargs)

    torch.manual_seed(1)
    outer = Delegates(_llama(1).config).eval()
    epmq.quantize_model(outer.inner if holder else outer, epmq.QuantSpec(bits=4, group_size=16), method="rtn",
                        progress=False)
    epmq.save_quantized(outer.inner, tmp_path / "q")
    outer.save_pretrained(tmp_path / "p")
    assert_same_checkpoint(tmp_path / "q", tmp_path / "p")
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(epmq.load_quantized(tmp_path / "p")(ids).logits, outer(ids).logits)


@pytest.mark.parametrize("holder", [False, True])
def test_save_pretrained_through_two_overrides_calling_super_twice(holder, tmp_path, monkeypatch):
    """A chain of class overrides, one calling super().save_pretrained twice as GraniteSpeech's does (its
    PEFT adapters alone first, where loaded, then the base model; the PEFT branch stood in for): one
    quantized checkpoint is written, the outer override's card beside it, and loads back exactly. With
    adapters loaded, the base model's write found the adapter in the directory given empty and was refused
    as "not an epmq checkpoint: choose a new or empty directory"; the adapter is named."""
    import transformers

    class PeftStandIn(transformers.LlamaForCausalLM):  # (transformers' save with adapters loaded: them alone)
        def save_pretrained(self, directory, **kwargs):
            if not self._hf_peft_config_loaded:
                return super().save_pretrained(directory, **kwargs)
            Path(directory).mkdir()
            (Path(directory) / "adapter_config.json").write_text("{}")
            (Path(directory) / "adapter_model.safetensors").write_bytes(b"")

    class AdapterThenBase(PeftStandIn):
        def save_pretrained(self, directory, **kwargs):
            if self._hf_peft_config_loaded:
                super().save_pretrained(directory, **kwargs)
            loaded, self._hf_peft_config_loaded = self._hf_peft_config_loaded, False
            try:
                super().save_pretrained(directory, **kwargs)
            finally:
                self._hf_peft_config_loaded = loaded

    class Carded(AdapterThenBase):
        def save_pretrained(self, directory, **kwargs):
            super().save_pretrained(directory, **kwargs)
            (Path(directory) / "README.md").write_text("card")

    torch.manual_seed(1)
    lm = Carded(_llama(1).config).eval()
    epmq.quantize_model(lm.model if holder else lm, epmq.QuantSpec(bits=4, group_size=16), method="rtn",
                        progress=False)
    epmq.save_quantized(lm, tmp_path / "q")
    writes = []
    monkeypatch.setattr(ckpt, "save_quantized", lambda model, directory, **kwargs: writes.append(directory)
                        or epmq.save_quantized(model, directory, **kwargs))
    lm.save_pretrained(tmp_path / "p")
    assert writes == [tmp_path / "p"]
    assert (tmp_path / "p" / "README.md").read_text() == "card"
    (tmp_path / "p" / "README.md").unlink()
    assert_same_checkpoint(tmp_path / "q", tmp_path / "p")
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(epmq.load_quantized(tmp_path / "p", Carded(lm.config))(ids).logits, lm(ids).logits)
    lm._hf_peft_config_loaded = True
    # (the way out named is not the save that was refused: this class's own writes the base model after them)
    with pytest.raises(ValueError, match=r"holds a PEFT adapter \(adapter_config\.json.*GraniteSpeech.*apart "
                                         r"\(transformers\.PreTrainedModel\.save_pretrained\(model, directory\), with "
                                         r"them loaded, writes them alone; such a class's own"):
        lm.save_pretrained(tmp_path / "adapted")


@pytest.mark.parametrize("quantized", ["model", "encoder"])
def test_a_model_holding_the_one_quantized_unpickled_where_nothing_was_quantized(quantized, tmp_path, monkeypatch):
    """``torch.save(lm)`` after quantize_model(lm.model) (a transformers model) or
    quantize_model(clip.encoder) (a torch module), loaded in a process that quantized nothing:
    transformers' save_pretrained was not routed there (only a quantize or a load routed it), and
    save_pretrained wrote the packed tensors with no quantization_config. Unpickling a packed layer
    routes it, and the model saves save_quantized's checkpoint."""
    import pickle

    import transformers

    if quantized == "model":
        model = _llama(1)
    else:
        torch.manual_seed(1)
        model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8)).eval()
    epmq.quantize_model(getattr(model, quantized), epmq.QuantSpec(bits=4, group_size=16), method="rtn",
                        progress=False)
    pickled = pickle.dumps(model)
    # (the process that loads it: transformers' save_pretrained as it is before epmq routes it)
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", transformers.PreTrainedModel.save_pretrained)
    pickle.loads(pickled).save_pretrained(tmp_path / "p")
    epmq.save_quantized(model, tmp_path / "q")
    assert_same_checkpoint(tmp_path / "q", tmp_path / "p")


@pytest.mark.parametrize("kwargs", [{"state_dict": {}}, {"push_to_hub": True}, {"safe_serialization": False},
                                    {"variant": "fp16"}, {"save_original_format": False},
                                    {"distributed_checkpoint": True}, {"commit_message": "x"}])
def test_save_pretrained_refuses_what_the_format_cannot_honour(kwargs, tmp_path):
    model = _llama(0)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    with pytest.raises(ValueError, match=f"save_quantized.*{next(iter(kwargs))}="):
        model.save_pretrained(tmp_path / "p", **kwargs)
    assert not (tmp_path / "p").exists()


def test_save_pretrained_into_a_folder_holding_the_tokenizer_saved_first(tmp_path):
    """``tokenizer.save_pretrained(d); model.save_pretrained(d)``, the usual order, was refused
    ("not an epmq checkpoint"): a folder of files a checkpoint is served with (tokenizer, README)
    is written into, each of them kept as the user's (the same file the write also makes: theirs
    stands). One with a folder, configs, weights or other files in it is still refused, untouched."""
    model = _llama(0)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    directory = tmp_path / "d"
    directory.mkdir()
    (directory / "tokenizer.json").write_text('{"the": "tokenizer"}')
    (directory / "README.md").write_text("my card")
    (directory / "additional_chat_templates").mkdir()  # (as tokenizers of transformers >= 4.54 save)
    (directory / "additional_chat_templates" / "tool_use.jinja").write_text("{{ x }}")
    model.save_pretrained(directory)
    assert (directory / "additional_chat_templates" / "tool_use.jinja").read_text() == "{{ x }}"
    assert (directory / "tokenizer.json").read_text() == '{"the": "tokenizer"}'
    # saved again: the tokenizer is epmq's write's now, the card the user's; no "kept your changed"
    import warnings as w
    with w.catch_warnings(record=True) as record:
        w.simplefilter("always")
        model.save_pretrained(directory)
    assert not [r for r in record if "kept your changed" in str(r.message)]
    assert (directory / "README.md").read_text() == "my card"
    assert (directory / "README.md").read_text() == "my card"
    item = inputs("llama", 1, torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(output(epmq.load_quantized(directory), item), output(model, item), rtol=0, atol=0)
    for other in ("runs/", "config.json", "model.safetensors", "notes.txt"):
        held = tmp_path / other.rstrip("/")
        kept = tmp_path / f"kept-{other.rstrip('/')}"
        kept.mkdir()
        (kept / "tokenizer.json").write_text("{}")
        (kept / other.rstrip("/")).mkdir() if other.endswith("/") else (kept / other).write_text("{}")
        with pytest.raises(ValueError, match="refusing to replace it|weights files epmq did not write"):
            model.save_pretrained(kept)
        assert sorted(p.name for p in kept.iterdir()) == sorted(["tokenizer.json", other.rstrip("/")]), held


# what the tokenizers and processors of transformers 5.25 save beside tokenizer.json besides the
# names every family shares: Marian's SentencePiece models, DeBERTa-v2/v3's, SpeechT5's, Whisper's
# English spelling normalizer, a video-capable processor's (Qwen2-VL's) and an audio tokenizer's config;
# FSMT's two vocabularies, LUKE's and mLUKE's entity vocabulary, PhoBERT's and BERTweet's BPE codes,
# BARTpho's dictionary, ProphetNet's vocabulary, GPT-NeoX-Japanese's emoji, RoCBert's and MyT5's tables
OTHER_SERVED_WITH = ("source.spm", "target.spm", "target_vocab.json", "spm.model", "spm_char.model",
                     "normalizer.json", "video_preprocessor_config.json", "audio_tokenizer_config.json",
                     "vocab-src.json", "vocab-tgt.json", "entity_vocab.json", "bpe.codes", "dict.txt",
                     "prophetnet.tokenizer", "emoji.json", "word_shape.json", "word_pronunciation.json",
                     "byte_maps.json",
                     # Mistral's native vocabulary (save_pretrained(save_format="mistral"), which transformers and
                     # vLLM's tokenizer_mode="mistral" read; a dated one too) and a legacy tiktoken model
                     "tekken.json", "tekken_240911.json", "tiktoken.model")


def test_every_file_a_tokenizer_or_processor_saves_counts_as_one(tmp_path):
    """``tokenizer.save_pretrained(d); epmq.save_quantized(model, d)`` of a Marian, DeBERTa-v3 or
    Whisper tokenizer, or a Qwen2-VL processor, was refused ("exists and is not an epmq checkpoint"):
    the files those save besides tokenizer.json were not known as a tokenizer's; and a model
    load_quantized built from a checkpoint holding them dropped them when saved elsewhere."""
    model = _llama(0)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    served = {name: f'"{name}"' for name in ("tokenizer.json", *OTHER_SERVED_WITH)}
    directory = tmp_path / "d"
    directory.mkdir()
    for name, text in served.items():
        (directory / name).write_text(text)
    epmq.save_quantized(model, directory)
    assert {name: (directory / name).read_text() for name in served} == served
    loaded = epmq.load_quantized(directory)
    epmq.save_quantized(loaded, tmp_path / "copy")
    assert {name: (tmp_path / "copy" / name).read_text() for name in served} == served


def test_save_pretrained_of_a_model_with_peft_adapters_is_transformers_own(tmp_path, monkeypatch):
    """Adapters loaded through transformers (``model.add_adapter``): its save_pretrained writes
    them alone, in PEFT's format, which is what is asked for; passed on, not refused."""
    model = _llama(0)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    calls = []
    monkeypatch.setattr(type(model), "save_pretrained", lambda self, d, **kwargs: calls.append((self, d, kwargs)))
    model._hf_peft_config_loaded = True
    model.save_pretrained(tmp_path / "adapters", max_shard_size="1GB")
    assert len(calls) == 1 and calls[0][0] is model and calls[0][1] == tmp_path / "adapters"
    assert calls[0][2]["max_shard_size"] == "1GB"


def test_save_pretrained_of_models_quantized_otherwise_or_copied(tmp_path):
    """A compiled model, one quantized in two calls, a deep copy and an unpickled copy (each
    saving itself) write save_quantized's checkpoint; a model never quantized keeps
    transformers' save_pretrained, and open_clip's models get none."""
    import pickle

    plain = _llama(0)
    assert "save_pretrained" not in vars(plain)
    plain.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "quantize_config.json").exists()
    model = _llama(0)
    spec = epmq.QuantSpec(bits=4, group_size=16)
    epmq.quantize_model(model, spec, method="rtn", progress=False, layers=r"layers\.0\.")
    epmq.quantize_model(model, epmq.QuantSpec(bits=3, group_size=16), method="rtn", progress=False,
                        layers=r"layers\.1\.")
    epmq.save_quantized(model, tmp_path / "q")
    torch.compile(model).save_pretrained(tmp_path / "compiled")
    assert_same_checkpoint(tmp_path / "q", tmp_path / "compiled")
    copied = copy.deepcopy(model)
    unpickled = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        for twin in (copied, unpickled):
            twin.model.layers[0].mlp.up_proj.scales.mul_(2)  # (the copy saves itself, not the original)
            epmq.save_quantized(twin, tmp_path / "twin-q")
            twin.save_pretrained(tmp_path / "twin-p")
            assert_same_checkpoint(tmp_path / "twin-q", tmp_path / "twin-p")
            assert not torch.equal(load_file(str(tmp_path / "twin-p" / "model.safetensors"))[
                "model.layers.0.mlp.up_proj.scales"], model.model.layers[0].mlp.up_proj.scales.half())
    clip = _open_clip_clip()()
    epmq.quantize_model(clip, spec, method="rtn", progress=False)
    assert not hasattr(clip, "save_pretrained")


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_a_layer_shared_by_two_blocks(tmp_path, checkpoint_format):
    """Weight-shared blocks (ALBERT shares one layer across depths): every name of the shared
    layer is written in the format (v1: z - 1 for each), and it loads back shared."""
    from epmq.packing import unpack_cols

    model = _llama(3)
    model.model.layers[1].mlp = model.model.layers[0].mlp
    with pytest.raises(ValueError, match="model.layers.1.mlp.gate_proj is the same module as model.layers.0"):
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    # (shared after quantizing, as a model that ties them at load would)
    model.model.layers[1].mlp = copy.deepcopy(model.model.layers[0].mlp)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    model.model.layers[1].mlp = model.model.layers[0].mlp
    epmq.save_quantized(model, tmp_path / "q", checkpoint_format=checkpoint_format)
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    z = model.model.layers[0].mlp.down_proj.zeros()
    for i in (0, 1):
        key = f"model.layers.{i}.mlp.down_proj.qzeros"
        if key in tensors:  # (else stored once, tied)
            stored = unpack_cols(tensors[key], 4, z.shape[1])
            assert torch.equal(stored, z - 1 if checkpoint_format == "gptq" else z)
    fresh = _llama(4)
    fresh.model.layers[1].mlp = fresh.model.layers[0].mlp
    loaded = epmq.load_quantized(tmp_path / "q", fresh)
    assert loaded.model.layers[1].mlp.down_proj is loaded.model.layers[0].mlp.down_proj
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def _tied(seed, tie=True, bias_of_its_own=False):
    """A Llama whose second layer's up_proj holds the first's weight parameter (two modules, one
    weight: Zamba's attention block, which from_pretrained ties across its hybrid layers), or an
    equal copy of it (``tie=False``)."""
    model = _llama(seed, mlp_bias=bias_of_its_own)
    first, second = model.model.layers[0].mlp.up_proj, model.model.layers[1].mlp.up_proj
    second.weight = first.weight if tie else torch.nn.Parameter(first.weight.detach().clone())
    return model


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_tied_linears_share_one_packed_layer(gen, tmp_path, method):
    """Linears of two blocks that hold one weight are quantized once, on the first use's inputs,
    and share the packed layer: the model keeps its sharing and its size (each use was packed
    apart before); saved once, loaded back with one set of buffers, the same outputs."""
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    ids = torch.randint(0, 64, (2, 9), generator=gen)
    options = dict(method=method, calibration={"a": [{"input_ids": ids}]}, backend="torch", progress=False)
    spec = epmq.QuantSpec(bits=4, group_size=16)
    first, second = "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"
    model = epmq.quantize_model(_tied(seed), spec, **options)
    shared = model.get_submodule(first)
    assert isinstance(shared, epmq.QuantLinear) and model.get_submodule(second) is shared
    assert model.epmq_report.tied == {second: first}
    assert second not in {layer["name"] for layer in model.epmq_report.layers}
    # the packed layer is the one a walk of the untied model makes that leaves the second use alone
    alone = epmq.quantize_model(_tied(seed, tie=False), spec, layers=lambda name: name != second, **options)
    assert isinstance(alone.get_submodule(second), torch.nn.Linear)
    for part in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(getattr(alone.get_submodule(first), part), getattr(shared, part))
    epmq.save_quantized(model, tmp_path / "q")
    assert f"{second}.qweight" not in load_file(str(tmp_path / "q" / "model.safetensors"))
    loaded = epmq.load_quantized(tmp_path / "q", _tied(seed + 1))
    assert loaded.get_submodule(second).qweight is loaded.get_submodule(first).qweight
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_tied_weight_with_biases_of_its_own_is_packed_per_use(gen):
    """One weight under two biases: not one layer, so each use is quantized as it is called."""
    model = _tied(int(torch.randint(0, 2**31, (1,), generator=gen)), bias_of_its_own=True)
    ids = torch.randint(0, 64, (2, 9), generator=gen)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="gptq",
                        calibration={"a": [{"input_ids": ids}]}, backend="torch", progress=False)
    layers = [model.model.layers[i].mlp.up_proj for i in (0, 1)]
    assert all(isinstance(m, epmq.QuantLinear) for m in layers) and layers[0] is not layers[1]
    assert model.epmq_report.tied == {}


def test_a_layer_of_one_group_keeps_the_checkpoints_group_size(tmp_path):
    """A peer's group_size=32 checkpoint where q_proj has 32 inputs (one group): read back as
    group_size 32, not per channel, so saving it again writes no rule for another group size."""
    model = _llama(5)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=32), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    _as_foreign(tmp_path / "q")
    loaded = epmq.load_quantized(tmp_path / "q")
    assert {m.group_size for m in loaded.modules() if isinstance(m, epmq.QuantLinear)} == {32}
    epmq.save_quantized(loaded, tmp_path / "again")
    assert all("dynamic" not in q for q in _qconfigs(tmp_path / "again"))


# --------------------------------------------------------------------------- serving engines


def _tiny_llama(hidden=64, inter=128):
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)).eval()


def _qconfigs(directory):
    return [json.loads((directory / "config.json").read_text())["quantization_config"],
            json.loads((directory / "quantize_config.json").read_text())]


def test_partially_quantized_blocks_list_what_engines_must_build(tmp_path):
    """Linears left unquantized inside the blocks are named for engines (GPTQModel's ``dynamic``
    negative rules, transformers' and vLLM's ``modules_in_block_to_quantize``); a fused group
    left split is warned about (vLLM refuses it); epmq loads the checkpoint as before."""
    model = _tiny_llama()
    keep = lambda n: not n.endswith("k_proj") and n != "model.layers.1.mlp.down_proj"  # noqa: E731
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=32, sym=True), method="rtn", layers=keep,
                        progress=False)
    with pytest.warns(UserWarning, match="Detected some but not all shards") as record:
        epmq.save_quantized(model, tmp_path / "q")
    assert len([w for w in record if "vLLM refuses" in str(w.message)]) == 1
    for q in _qconfigs(tmp_path / "q"):
        # whole names: transformers (optimum) ignores the rules, and built layers.1's float down_proj as GPTQ
        groups = [["self_attn.q_proj", "self_attn.v_proj"], ["self_attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"]]
        assert q["modules_in_block_to_quantize"] == [[f"model.layers.{i}.{rel}" for rel in group] for i in (0, 1)
                                                     for group in groups + [["mlp.down_proj"]] * (i == 0)]
        assert q["dynamic"] == {r"-:model\.layers\.\d+\.self_attn\.k_proj$": {},
                                r"-:model\.layers\.1\.mlp\.down_proj$": {}}
        assert "lm_head" not in q
    import re

    rules = [r.removeprefix("-:") for r in _qconfigs(tmp_path / "q")[0]["dynamic"]]
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) or isinstance(m, epmq.QuantLinear):
            assert any(re.match(r, name) for r in rules) == (name.startswith("model.layers") and not keep(name))
    x = torch.randint(0, 64, (1, 8))
    loaded = epmq.load_quantized(tmp_path / "q")
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_a_vlms_language_model_quantized_in_part_lists_no_name_of_its_float_vision_tower(tmp_path):
    """vLLM takes a linear for quantized where any name of ``modules_in_block_to_quantize`` lies
    inside its name (``is_layer_gptq_quantized``; a fused qkv_proj by its q/k/v names), and LLaVA's
    vision tower is built with the checkpoint's quantization config too: a language model quantized
    in part listed 'self_attn.q_proj', which lies in the full-precision vision tower's
    'model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj', so vLLM built the tower's
    attention as GPTQ layers and could not load its weights. The names are listed whole there."""
    from test_walker_towers import tiny_llava

    vlm = tiny_llava()
    epmq.quantize_model(vlm, epmq.QuantSpec(bits=4, group_size=16, sym=True), method="rtn",
                        layers=r"language_model\.layers\.\d+\.(self_attn|mlp\.(gate|up)_proj)", progress=False)
    epmq.save_quantized(vlm, tmp_path / "q")
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))  # (the names on disk, as vLLM's)
    packed = [key.removesuffix(".qweight") for key in tensors if key.endswith(".qweight")]
    full = [key.removesuffix(".weight") for key, t in tensors.items()
            if key.endswith(".weight") and t.dim() == 2 and "embed" not in key]
    assert any("vision_tower." in name for name in full) and any("language_model." in name for name in full)
    for q in _qconfigs(tmp_path / "q"):
        listed = sum(q["modules_in_block_to_quantize"], [])
        assert [name for name in full if any(entry in name for entry in listed)] == []
        assert all(any(entry in name for entry in listed) for name in packed)
    ids = torch.randint(0, 290, (1, 12))
    ids[0, 1:5] = 299
    item = dict(input_ids=ids, pixel_values=torch.randn(1, 3, 16, 16))
    with torch.no_grad():
        torch.testing.assert_close(epmq.load_quantized(tmp_path / "q")(**item).logits, vlm(**item).logits,
                                   rtol=0, atol=0)


def _optimum_builds(q, model):
    """The linears transformers' GPTQ loader builds as GPTQ layers (optimum's convert_model): every
    nn.Linear, Conv1D and Conv2d whose name starts with ``block_name_to_quantize`` (guessed from a few
    decoder layouts where it is unsaid: ``transformer.h``, ``model.layers``, ``model.language_model.layers``
    ...), kept where it ends with a name of ``modules_in_block_to_quantize`` when that is written."""
    block = q.get("block_name_to_quantize")
    assert block is not None, "no block_name_to_quantize: the loader guesses one decoder layout's"
    listed = sum(q.get("modules_in_block_to_quantize") or [], [])
    return sorted(name for name, m in model.named_modules()
                  if type(m) in (torch.nn.Linear, torch.nn.Conv2d) or type(m).__name__ == "Conv1D"
                  if name.startswith(block) and (not listed or any(name.endswith(e) for e in listed)))


@pytest.mark.parametrize("arch", ["t5", "llava", "llama", "llava_text_and_head"])
def test_transformers_gptq_loader_builds_every_packed_layer_and_no_other(arch, tmp_path):
    """transformers' GPTQ loader (optimum) builds the linears under one block prefix as GPTQ layers,
    guessed from decoder layouts where the config names none: none fits T5's encoder.block and
    decoder.block (the load was refused, 'Block pattern could not be match'), and LLaVA's guess,
    model.language_model.layers, left its quantized vision tower as float linears without weights
    (randomly initialised). The config names the prefix all packed layers share, and where other
    linears lie under it (T5's lm_head, LLaVA's projector and patch convolution) the packed ones: whole
    where a float linear ends in a packed one's name past its block (a packed head beside LLaVA's language
    model: the prefix is all of it, and its float vision tower has a self_attn.q_proj too)."""
    from test_walker_towers import tiny_llava

    from epmq.walker import _quant_linear

    model = {"t5": lambda: build("t5"), "llava": tiny_llava, "llama": _tiny_llama,
             "llava_text_and_head": tiny_llava}[arch]()
    fresh = copy.deepcopy(model)  # (the float model transformers builds before the GPTQ layers)
    spec = epmq.QuantSpec(bits=4, group_size=16, sym=True)
    epmq.quantize_model(model, spec, method="rtn", progress=False,
                        layers=r"model\.language_model\." if arch == "llava_text_and_head" else None)
    if arch == "llava_text_and_head":
        model.lm_head = _quant_linear(epmq.quant.rtn(model.lm_head.weight.detach(), spec), model.lm_head)
    packed = sorted(name for name, m in model.named_modules() if isinstance(m, epmq.QuantLinear))
    assert packed and (arch != "llava" or any("vision_tower" in name for name in packed))
    epmq.save_quantized(model, tmp_path / "q")
    for q in _qconfigs(tmp_path / "q"):
        assert _optimum_builds(q, fresh) == packed
    loaded = epmq.load_quantized(tmp_path / "q")
    for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["one_block_float", "block_left_whole", "bert_ffn", "llava_in_part",
                                  "llava_in_part_and_head"])
def test_transformers_gptq_loader_builds_no_float_linear_of_a_model_quantized_in_part(case, tmp_path):
    """transformers' GPTQ loader (optimum's convert_model) ignores ``dynamic``: it builds every linear under
    ``block_name_to_quantize`` ending in a listed name as a GPTQ layer. A linear packed in some blocks and
    left in full precision in others (layers.1.mlp.down_proj; a block left whole) was listed by its name in
    the block, so it was built as a GPTQ layer in every block and its float weights were not loaded; a LLaVA
    quantized in part listed whole names as saved (language_model.model.layers...), which no module name of
    transformers' (model.language_model.layers...) ends in, so no GPTQ layer was built at all; its packed head
    beside it was listed as saved (language_model.lm_head), and built as a float linear left unloaded."""
    from test_walker_towers import tiny_llava

    from epmq.walker import _quant_linear

    model = tiny_llava() if case.startswith("llava") else build("bert") if case == "bert_ffn" else _tiny_llama()
    fresh = copy.deepcopy(model)  # (the float model transformers builds before the GPTQ layers)
    layers = {"one_block_float": lambda n: n != "model.layers.1.mlp.down_proj",
              "block_left_whole": r"model\.layers\.1\.",
              # (the float attention.output.dense ends in the packed output.dense)
              "bert_ffn": lambda n: n.endswith("intermediate.dense") or n.endswith("layer.0.output.dense")
              or n.endswith("layer.1.output.dense"),
              "llava_in_part": r"language_model\.layers\.\d+\.(self_attn|mlp\.(gate|up)_proj)"}
    spec = epmq.QuantSpec(bits=4, group_size=16, sym=True)
    epmq.quantize_model(model, spec, method="rtn", layers=layers[case.removesuffix("_and_head")], progress=False)
    if case.endswith("_and_head"):
        model.lm_head = _quant_linear(epmq.quant.rtn(model.lm_head.weight.detach(), spec), model.lm_head)
    packed = sorted(name for name, m in model.named_modules() if isinstance(m, epmq.QuantLinear))
    epmq.save_quantized(model, tmp_path / "q")
    for q in _qconfigs(tmp_path / "q"):
        assert _optimum_builds(q, fresh) == packed


def test_a_block_left_whole_gets_one_rule(tmp_path, recwarn):
    """A whole block in full precision: one rule for all of it (it also matches vLLM's fused
    names), and no split-group warning; a fully quantized model writes neither field."""
    model = _tiny_llama()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=32, sym=True), method="rtn",
                        layers=r"model\.layers\.1\.", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    for q in _qconfigs(tmp_path / "q"):
        assert q["dynamic"] == {r"-:model\.layers\.0\.": {}}
        assert sum(q["modules_in_block_to_quantize"], []) == [f"model.layers.1.{rel}" for rel in (
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert not [w for w in recwarn if "shards" in str(w.message) or "engines" in str(w.message)]
    model = _tiny_llama()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=32, sym=True), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "full")
    for q in _qconfigs(tmp_path / "full"):
        assert "dynamic" not in q and "modules_in_block_to_quantize" not in q
    assert not recwarn.list


def _vllm_builds_unquantized(rules, prefix):
    """vLLM's choice for a module (``get_dynamic_override``): a negative rule matching its name."""
    import re

    return any(re.match(r.removeprefix("-:"), prefix) for r in rules if r.startswith("-:"))


@pytest.mark.parametrize("layers", [r"self_attn", r"layers\.1\.mlp\.experts\.|self_attn"])
def test_moe_experts_left_in_full_precision_are_named_as_vllm_builds_them(layers, tmp_path, recwarn):
    """vLLM and SGLang build a block's routed experts as one FusedMoE module, ``<...>.mlp.experts``,
    and choose its precision by that name alone: experts left in full precision need a rule that
    matches it (rules per expert projection were not, so vLLM built GPTQ experts and could not load
    the full-precision ones)."""
    model = build("qwen3_moe")
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16, sym=True), method="rtn", layers=layers,
                        progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    for q in _qconfigs(tmp_path / "q"):
        rules = list(q["dynamic"])
        assert _vllm_builds_unquantized(rules, "model.layers.0.mlp.experts")
        assert _vllm_builds_unquantized(rules, "model.layers.1.mlp.experts") == (layers == "self_attn")
        assert not _vllm_builds_unquantized(rules, "model.layers.0.self_attn.qkv_proj")
    assert not [w for w in recwarn if "FusedMoE" in str(w.message)]
    x = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(epmq.load_quantized(tmp_path / "q")(x).logits, model(x).logits, rtol=0, atol=0)


def _vllm_plain_gptq_builds_experts_quantized(qconfig):
    """vLLM's plain GPTQ path (GPTQConfig.get_quant_method, taken where GPTQ Marlin is not: sym false, 2/3 bits)
    hands every FusedMoE to MoeWNA16Config.from_config({quant_method, bits, group_size, sym: True, lm_head})
    whose get_quant_method skips only modules_to_not_convert, [] for GPTQ: no dynamic rule is read
    (vllm-project/vllm moe_wna16.py at ca3fff65bc7d65026d67c76b678aa667615bb710; gptq.py's FusedMoE branch). This
    is vLLM before its GPTQ consolidation (vllm-project/vllm#38288), which removed that plain GPTQ path."""
    return not (qconfig["sym"] and qconfig["bits"] in (4, 8) and qconfig["group_size"] in (-1, 32, 64, 128))


@pytest.mark.parametrize("bits, sym", [(4, False), (3, True), (4, True)])
def test_moe_experts_left_in_full_precision_off_marlin_are_warned_of(bits, sym, tmp_path):
    """Off GPTQ Marlin (the default asymmetric grids; 2/3 bits) vLLM builds every block's experts with
    MoE WNA16, which reads no dynamic rule: the ``-:...mlp\\.experts$`` rule that keeps them in full
    precision on Marlin is not read there, and their float weights fail to load; save_quantized says so,
    naming the first block's experts (on Marlin the rule holds: nothing said)."""
    import warnings

    model = build("qwen3_moe")
    epmq.quantize_model(model, epmq.QuantSpec(bits=bits, group_size=16, sym=sym), method="rtn", layers="self_attn",
                        progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        epmq.save_quantized(model, tmp_path / "q", checkpoint_format="gptq_v2")
    q = _qconfigs(tmp_path / "q")[0]
    said = [str(w.message) for w in record if "MoE WNA16" in str(w.message) and "full precision" in str(w.message)]
    assert len(said) == _vllm_plain_gptq_builds_experts_quantized(q)
    if said:
        assert "model.layers.0.mlp.experts" in said[0] and "dynamic" in said[0] and "vLLM" in said[0]


@pytest.mark.parametrize("layers", [r"experts\.0\.", r"down_proj"])
def test_moe_experts_of_mixed_precision_in_one_block_are_warned_of(layers, tmp_path):
    """Some of a block's routed experts (or projections) quantized and others not: vLLM builds all
    of them as one FusedMoE of one precision and cannot load the others; save_quantized says so."""
    model = build("qwen3_moe")
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16, sym=True), method="rtn", layers=layers,
                        progress=False)
    with pytest.warns(UserWarning, match="FusedMoE") as record:
        epmq.save_quantized(model, tmp_path / "q")
    said = [str(w.message) for w in record if "FusedMoE" in str(w.message)]
    assert len(said) == 1 and "model.layers.0.mlp.experts" in said[0]


def test_a_router_among_the_experts_is_not_an_expert_left_in_full_precision(tmp_path, recwarn):
    """JetMoE's router sits inside its experts module (``experts.router.layer``) and stays in full
    precision: the experts are not quantized in part, and no rule builds them unquantized."""
    from test_walker_models import WIDER

    torch.manual_seed(0)
    model = WIDER["jetmoe"][0]().eval()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16, sym=True), method="rtn", progress=False)
    assert any(".experts.router." in name for name in model.epmq_report.routers)
    epmq.save_quantized(model, tmp_path / "q")
    assert not [w for w in recwarn if "FusedMoE" in str(w.message)]
    rules = list(_qconfigs(tmp_path / "q")[0]["dynamic"])
    assert not _vllm_builds_unquantized(rules, "model.layers.0.self_attention.experts")


def test_act_order_without_static_groups_warns_of_vllm(tmp_path):
    """Permuted g_idx (desc_act: true): vLLM's AutoGPTQConfig takes desc_act and its Marlin kernels read g_idx
    (auto_gptq.py at vllm-project/vllm 055e47c28003156421365af985d676fc921cb075; no vLLM release refused it,
    and there is no vLLM 0.34), but vllm-project/vllm#54809 then removed act-order from vLLM: the warning names
    that PR, and static groups as the fix."""
    fam = Family("llama", torch.Generator().manual_seed(0), n_samples=1)
    for static in (False, True):
        model = fam.merged()
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16, sym=True, act_order=True,
                                                  static_groups=static),
                            method="gptq", calibration=fam.calibration, backend="torch", progress=False)
        import warnings

        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            epmq.save_quantized(model, tmp_path / str(static))
        said = [str(w.message) for w in record if "desc_act: true" in str(w.message)]
        assert len(said) == (0 if static else 1)
        if said:
            assert "vllm-project/vllm#54809" in said[0] and "static_groups=True" in said[0]
            assert "0.34" not in said[0] and "MoE WNA16" not in said[0]


@pytest.mark.parametrize("inter, dropped", [(96, True), (128, False)])
def test_act_order_experts_vllm_builds_with_moe_wna16_are_said_to_lose_g_idx(gen, inter, dropped, tmp_path):
    """With act-order vLLM's MoE Marlin pads no width, so experts whose intermediate width is no multiple of
    max(64, group) go to MoE WNA16 (AutoGPTQConfig.get_quant_method), whose weight loader skips g_idx
    (moe_wna16.py, moe_wna16_weight_loader): a 4-bit grouped block loads there without error and is served with
    the scales of group k // group_size. The act-order warning was the same for every checkpoint; it now names
    the first such block."""
    said = _act_order_saved(_qwen3_moe(128, inter), gen, tmp_path, "desc_act: true")
    assert len(said) == 1 and "vllm-project/vllm#54809" in said[0]
    assert ("MoE WNA16 (first: model.layers.0.mlp.experts" in said[0]) == dropped, said[0]


@pytest.mark.parametrize("bits, group_size, sym, warned", [(4, -1, False, True), (4, -1, True, False),
                                                          (4, 32, False, False), (8, -1, False, False)])
def test_asymmetric_4bit_per_channel_is_warned_of_gptqmodel_on_cpu(bits, group_size, sym, warned, tmp_path):
    """GPTQModel's only CPU kernel for 4-bit per-channel layers (TorchFusedLinear) drops the zero
    points: such a checkpoint loads there with wrong outputs (review with GPTQModel 7.7)."""
    import warnings

    model = _tiny_llama()
    epmq.quantize_model(model, epmq.QuantSpec(bits=bits, group_size=group_size, sym=sym), method="rtn",
                        progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        epmq.save_quantized(model, tmp_path / "q", checkpoint_format="gptq_v2")
    said = [str(w.message) for w in record if "TorchFusedLinear" in str(w.message)]
    assert len(said) == (1 if warned else 0)
    if warned:
        assert "14 4-bit per-channel layers (first: model.layers.0.self_attn.q_proj)" in said[0]
        assert "sym=True" in said[0]


@pytest.mark.parametrize("bits, sym, engines", [(4, False, ["asymmetric", "GPTQModel"]),
                                                (3, True, None),
                                                (2, False, None),
                                                (8, True, None)])
def test_one_warning_names_the_engines_that_cannot_serve(bits, sym, engines, tmp_path):
    import warnings

    model = _tiny_llama()
    epmq.quantize_model(model, epmq.QuantSpec(bits=bits, group_size=32, sym=sym), method="rtn", progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        epmq.save_quantized(model, tmp_path / "q", checkpoint_format="gptq_v2" if bits == 2 else "auto")
    said = [str(w.message) for w in record if "engines that cannot serve" in str(w.message)]
    if engines is None:
        assert not said
        return
    assert len(said) == 1 and all(e in said[0] for e in engines)


@pytest.mark.parametrize("bits, sym", [(3, True), (2, True), (2, False), (4, False)])
def test_a_dense_model_off_marlin_is_served_by_the_plain_gptq_kernel(bits, sym, tmp_path):
    """2/3-bit and asymmetric GPTQ linears were warned of as what vLLM and SGLang 'cannot serve', where
    both take a config Marlin cannot to their plain GPTQ kernel (gptq_gemm: 2, 3, 4, 8 bits, zero points
    read, v1 or v2): no engine is said to refuse it (GPTQModel reads v2 files); one warning says it is
    served off Marlin, slower, and what Marlin takes."""
    import warnings

    model = _tiny_llama()
    epmq.quantize_model(model, epmq.QuantSpec(bits=bits, group_size=32, sym=sym), method="rtn", progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        epmq.save_quantized(model, tmp_path / "q", checkpoint_format="gptq_v2")
    said = [str(w.message) for w in record]
    assert not [m for m in said if "cannot serve" in m]
    slower = [m for m in said if "plain GPTQ kernel" in m]
    assert len(slower) == 1 and "vLLM and SGLang" in slower[0] and "QuantSpec(bits=4 or 8, sym=True)" in slower[0]
    assert (f"{bits}-bit layers" in slower[0]) == (bits != 4) and ("asymmetric" in slower[0]) == (not sym)
    epmq.quantize_model(model := _tiny_llama(), epmq.QuantSpec(bits=4, group_size=32, sym=True), method="rtn",
                        progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        epmq.save_quantized(model, tmp_path / "marlin")
    assert not [w for w in record if "plain GPTQ kernel" in str(w.message)]


@pytest.mark.parametrize("family, spec, partial", [
    ("llama", epmq.QuantSpec(bits=3, group_size=32, sym=True), None),
    ("llama", epmq.QuantSpec(bits=4, group_size=32, sym=False), None),
    ("llama", epmq.QuantSpec(bits=4, group_size=16, sym=True), None),
    ("qwen3_moe", epmq.QuantSpec(bits=4, group_size=16, sym=False), None),
    ("llama", epmq.QuantSpec(bits=4, group_size=32, sym=True), r"layers\.1\."),
])
def test_warnings_of_vllms_plain_gptq_path_say_the_newest_vllm_has_none(family, spec, partial, tmp_path, recwarn):
    """vLLM's GPTQ consolidation (vllm-project/vllm#38288) removed its plain GPTQ path: quant_method "gptq" and
    quantization='gptq' map to AutoGPTQConfig, which takes 4- or 8-bit symmetric grids only and verifies Marlin's
    group sizes (auto_gptq.py at 055e47c28003156421365af985d676fc921cb075). The warnings that sent 2/3-bit,
    asymmetric and odd-group checkpoints to vLLM's gptq_gemm (slower; experts on MoE WNA16), or offered
    quantization='gptq' for layers Marlin refuses, said nothing of the newer vLLM refusing them: now each names it,
    and keeps the older vLLM's path."""
    model = _tiny_llama() if family == "llama" else build(family)
    if partial:  # (block 1 at 3 bits under the config's Marlin 4 bits: Marlin refuses the rule's layers)
        epmq.quantize_model(model, epmq.QuantSpec(bits=3, group_size=32, sym=True), method="rtn", layers=partial,
                            progress=False)
    epmq.quantize_model(model, spec, method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q", checkpoint_format="gptq_v2")
    said = [str(w.message) for w in recwarn if "plain GPTQ kernel" in str(w.message)]
    assert len(said) == 1 and "vllm-project/vllm#38288" in said[0]
    if partial:
        assert "quantization='gptq'" in said[0] and "'gptq' is GPTQ Marlin too" in said[0]
    else:
        assert "refuses" in said[0] and "older vLLM" in said[0]


@pytest.mark.parametrize("group_size", [16, 256])
def test_a_group_size_marlin_does_not_take_is_off_marlin(group_size, tmp_path):
    """vLLM and SGLang pick GPTQ Marlin for 4- or 8-bit symmetric grids in groups of 32, 64 or 128 or per
    channel only (is_gptq_marlin_compatible: check_marlin_supported's MARLIN_SUPPORTED_GROUP_SIZES); other
    groups go to the plain GPTQ path, which builds routed experts with MoE WNA16 and reads no dynamic rule.
    Symmetric 4-bit groups of 16 or 256 were taken for Marlin: no word that a dense model is served off it,
    nor that an MoE's experts left in full precision by a -: rule are built quantized there."""
    import warnings

    model = _tiny_llama(256, 512)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=group_size, sym=True), method="rtn", progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        epmq.save_quantized(model, tmp_path / "dense")
    slower = [str(w.message) for w in record if "plain GPTQ kernel" in str(w.message)]
    assert len(slower) == 1 and f"groups of {group_size}" in slower[0] and "groups of 32, 64 or 128" in slower[0]
    model = build("qwen3_moe")
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=group_size, sym=True), method="rtn",
                        layers="self_attn", progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        epmq.save_quantized(model, tmp_path / "moe")
    said = [str(w.message) for w in record if "MoE WNA16" in str(w.message) and "full precision" in str(w.message)]
    assert len(said) == 1 and f"groups of {group_size}" in said[0] and "model.layers.0.mlp.experts" in said[0]


def _qwen3_moe(hidden, inter):
    import transformers

    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=inter,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
        num_experts_per_tok=2)).eval()


@pytest.mark.parametrize("hidden, inter, untiled", [(128, 64, False), (128, 128, False), (128, 96, True),
                                                     (64, 64, True), (192, 64, True)])
def test_experts_of_widths_sglangs_marlin_moe_kernel_cannot_tile_are_warned_of(hidden, inter, untiled, tmp_path,
                                                                               recwarn):
    """SGLang builds every block's quantized experts on GPTQ Marlin with its Marlin MoE kernel, checking no width
    and padding none, and the kernel's thread tiles (sgl-kernel csrc/moe/marlin_moe_wna16/ops.cu at
    65cf1ed0b8b1cec4c51690b3294f3d2367e09ef8: thread_k 64 or 128, thread_n 128 or 256, is_valid_config) need a
    hidden width that is a multiple of 128 and an intermediate one of 64, else 'Invalid thread config' at the first
    forward (a GPT-OSS-sized hidden width of 2880, reported). Such experts were saved in silence, as taken
    'whatever their widths' (vLLM pads an intermediate width of 96 to its tiles): now said, naming the block."""
    model = _qwen3_moe(hidden, inter)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=32, sym=True), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    said = [str(w.message) for w in recwarn if "Invalid thread config" in str(w.message)]
    assert len(said) == untiled
    if untiled:
        assert "SGLang" in said[0] and "model.layers.0.mlp.experts" in said[0]
        assert f"{hidden} wide, intermediate {inter}" in said[0]


@pytest.mark.parametrize("hidden, inter, off", [(128, 64, False), (128, 96, False), (128, 48, True), (64, 64, True)])
@pytest.mark.parametrize("ruled", ["float", "8-bit"])
def test_experts_of_widths_moe_marlin_refuses_follow_no_rule(hidden, inter, off, ruled, tmp_path):
    """On GPTQ Marlin (4-bit symmetric groups of 32) vLLM builds a block's experts with MoE Marlin only where
    the hidden width is a multiple of 128 and the intermediate one holds whole groups (check_moe_marlin_supports_layer;
    without act-order it pads it to Marlin's tiles: 96 was taken for unfit); other experts it builds with MoE WNA16
    from the config alone (GPTQMarlinConfig.get_quant_method), which reads no dynamic rule: experts a rule keeps in
    full precision or gives 8 bits are built at the config's 4 bits and fail to load. Nothing was said of it."""
    import warnings

    model = _qwen3_moe(hidden, inter)
    spec = epmq.QuantSpec(bits=4, group_size=32, sym=True)
    if ruled == "float":
        epmq.quantize_model(model, spec, method="rtn", layers="self_attn", progress=False)
    else:
        epmq.quantize_model(model, spec, method="rtn", layers=r"self_attn|layers\.0\.", progress=False)
        epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=32, sym=True), method="rtn",
                            layers=r"layers\.1\.mlp\.experts", progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        epmq.save_quantized(model, tmp_path / "q")
    said = [str(w.message) for w in record if "MoE Marlin" in str(w.message)]
    assert len(said) == off
    if off:
        first = "model.layers.0.mlp.experts" if ruled == "float" else "model.layers.1.mlp.experts"
        assert first in said[0] and "MoE WNA16" in said[0] and f"{hidden} wide, intermediate {inter}" in said[0]
        assert ("full precision" if ruled == "float" else "8 bits") in said[0]


@pytest.mark.parametrize("ruled", ["float", "8-bit", None])
def test_sglang_builds_experts_on_marlin_from_the_config_alone(ruled, tmp_path):
    """SGLang's GPTQMarlinConfig.get_quant_method builds every FusedMoE with its Marlin MoE method from the
    config's bits and group size, whatever the widths, reading no dynamic rule (its linears follow the rules):
    routed experts a -: rule keeps in full precision, or a + rule gives 8 bits, are built at the config's 4 bits
    and fail to load there, at widths vLLM's MoE Marlin takes (no warning of vLLM's). Nothing was said of it."""
    import warnings

    model = _qwen3_moe(128, 64)
    spec = epmq.QuantSpec(bits=4, group_size=32, sym=True)
    if ruled == "float":
        epmq.quantize_model(model, spec, method="rtn", layers="self_attn", progress=False)
    elif ruled == "8-bit":
        epmq.quantize_model(model, spec, method="rtn", layers=r"self_attn|layers\.0\.", progress=False)
        epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=32, sym=True), method="rtn",
                            layers=r"layers\.1\.mlp\.experts", progress=False)
    else:
        epmq.quantize_model(model, spec, method="rtn", progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        epmq.save_quantized(model, tmp_path / "q")
    said = [str(w.message) for w in record if "SGLang builds" in str(w.message)]
    assert len(said) == (ruled is not None)
    if ruled is not None:
        first = "model.layers.0.mlp.experts" if ruled == "float" else "model.layers.1.mlp.experts"
        assert first in said[0] and "4 bits in groups of 32" in said[0]
        assert ("full precision" if ruled == "float" else "8 bits") in said[0]
    assert not any("MoE Marlin" in str(w.message) for w in record)


@pytest.mark.parametrize("hidden, inter, bits, group_size, sym, warned", [
    (128, 48, 8, 32, True, True), (64, 64, 4, -1, True, True), (128, 48, 4, 32, True, False),
    (128, 64, 8, 32, True, False), (128, 96, 8, 32, True, False), (128, 64, 8, 32, False, True),
    (128, 64, 4, -1, False, True), (128, 64, 4, 32, False, False)])
def test_experts_moe_wna16_cannot_build_at_8_bits_or_per_channel(hidden, inter, bits, group_size, sym, warned,
                                                                 tmp_path):
    """vLLM builds a block's experts with MoE WNA16 off GPTQ Marlin (asymmetric grids here) and, on it, where their
    widths do not fit MoE Marlin (intermediate 48 in groups of 32, hidden 64), at the config's bits and group size;
    its MoeWNA16Method asserts group_size == -1 for 8 bits and sizes per-channel scales negative (ceil(width / -1)),
    so 8-bit experts and per-channel ones fail to build there, quantized as the config says. Nothing was said of
    it; intermediate 96, which MoE Marlin pads to its tiles, keeps them on it."""
    import warnings

    model = _qwen3_moe(hidden, inter)
    epmq.quantize_model(model, epmq.QuantSpec(bits=bits, group_size=group_size, sym=sym), method="rtn",
                        progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        epmq.save_quantized(model, tmp_path / "q", checkpoint_format="gptq_v2")
    said = [str(w.message) for w in record if "MoE WNA16 takes 8-bit experts" in str(w.message)]
    assert len(said) == warned
    if warned:
        groups = "per channel" if group_size == -1 else f"in groups of {group_size}"
        assert "model.layers.0.mlp.experts" in said[0] and f"config's {bits} bits {groups}" in said[0]
        assert ("off GPTQ Marlin" if not sym else f"{hidden} wide, intermediate {inter}") in said[0]


@pytest.mark.parametrize("arch, sym, warned", [("gemma4", True, True), ("gemma4", False, False),
                                                ("qwen3_moe", True, False)])
def test_sglang_marlin_moe_runs_no_gelu_experts(arch, sym, warned, tmp_path):
    """SGLang builds every FusedMoE on GPTQ Marlin (symmetric grids) with its Marlin MoE runner, which runs a gated
    SiLU only: Gemma 4's GELU experts (gelu_pytorch_tanh) load and fail at the first forward. Nothing was said of
    it; off Marlin (asymmetric grids) SGLang refuses the experts already, and SiLU experts (Qwen3-MoE) run."""
    import warnings

    from test_walker_models import WIDER

    torch.manual_seed(0)
    model = WIDER["gemma4"][0]().eval() if arch == "gemma4" else build(arch)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=-1, sym=sym), method="rtn", progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        epmq.save_quantized(model, tmp_path / "q", checkpoint_format="gptq_v2")
    said = [str(w.message) for w in record if "Marlin MoE runner" in str(w.message)]
    assert len(said) == warned
    if warned:
        assert "GELU activation (gelu_pytorch_tanh; first: model.layers.0.experts)" in said[0]


def test_a_model_of_a_text_encoder_and_a_decoder_is_saved(tmp_path):
    """save_quantized asks the config for the activation of the text model's MLPs (get_text_config):
    MusicGen's config holds a text encoder's and a decoder's, which transformers refuses to choose
    between ('Multiple valid text configs'), so a walk that went through ended in that error at the
    save; the decoder's is read, the one whose experts engines build."""
    from transformers import (EncodecConfig, MusicgenConfig, MusicgenDecoderConfig,
                              MusicgenForConditionalGeneration, T5Config)

    text = T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)
    audio = EncodecConfig(hidden_size=8, num_filters=4, codebook_size=16, codebook_dim=8, upsampling_ratios=[2, 2],
                          num_residual_layers=1, sampling_rate=16, target_bandwidths=[1.5])
    decoder = MusicgenDecoderConfig(vocab_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                                    ffn_dim=32, num_codebooks=2, max_position_embeddings=64)
    model = MusicgenForConditionalGeneration(MusicgenConfig(
        text_encoder=text.to_dict(), audio_encoder=audio.to_dict(), decoder=decoder.to_dict())).eval()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=-1), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    assert (tmp_path / "q" / "quantize_config.json").is_file()


def test_llama4_experts_follow_no_rule_on_marlin_whatever_their_widths(tmp_path):
    """vLLM's Llama 4 builds its experts' FusedMoE with apply_router_weight_on_input=True, which MoE Marlin does
    not take (check_moe_marlin_supports_layer), so on GPTQ Marlin they go to MoE WNA16, which reads no dynamic
    rule, at widths MoE Marlin takes too (128 wide, intermediate 64): experts a -: rule keeps in full precision
    are built quantized and fail to load. Nothing was said of it."""
    import warnings

    import transformers

    torch.manual_seed(0)
    model = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(
        vocab_size=64, hidden_size=128, intermediate_size=64, intermediate_size_mlp=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=1)).eval()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=32, sym=True), method="rtn", layers="self_attn",
                        progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        epmq.save_quantized(model, tmp_path / "q")
    said = [str(w.message) for w in record if "MoE Marlin" in str(w.message)]
    assert len(said) == 1 and "apply_router_weight_on_input" in said[0]
    assert "model.layers.0.feed_forward.experts" in said[0] and "full precision" in said[0]


@pytest.mark.parametrize("bits, sym, why", [(4, False, "zero points dropped"), (3, True, "4 or 8 bits only")])
def test_routed_experts_off_marlin_are_named_as_what_vllm_and_sglang_cannot_serve(bits, sym, why, tmp_path):
    """Off Marlin, vLLM builds a block's routed experts with its MoE WNA16 kernel (4 or 8 bits, GPTQ
    experts read as symmetric) and SGLang refuses them: said, naming the first expert layer."""
    import warnings

    model = build("qwen3_moe")
    epmq.quantize_model(model, epmq.QuantSpec(bits=bits, group_size=16, sym=sym), method="rtn", progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        epmq.save_quantized(model, tmp_path / "q", checkpoint_format="gptq_v2")
    said = [str(w.message) for w in record if "cannot serve" in str(w.message)]
    assert len(said) == 1 and "routed experts (first: model.layers.0.mlp.experts.0.gate_proj)" in said[0]
    assert why in said[0] and "SGLang" in said[0] and "QuantSpec(bits=4 or 8, sym=True)" in said[0]


@pytest.mark.parametrize("bits, inter, want", [(3, 128, 0), (3, 80, 6), (4, 128, 0), (4, 100, 6), (2, 104, 6),
                                             (8, 98, 6)])
def test_layers_whose_codes_fill_no_whole_words_are_warned_about_and_load_back(bits, inter, want, tmp_path):
    """Widths whose codes fill no whole 32-bit words (a multiple of 32 / gcd(bits, 32) values) are
    padded: other engines cannot load them (warned); epmq loads them, from config.json alone too
    (the bit width read off padded words: the config's where two fit)."""
    import warnings

    model = _tiny_llama(64, inter)
    epmq.quantize_model(model, epmq.QuantSpec(bits=bits, group_size=-1, sym=True), method="rtn", progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        epmq.save_quantized(model, tmp_path / "q")
    said = [str(w.message) for w in record if "fill no whole 32-bit words" in str(w.message)]
    assert len(said) == bool(want)
    if said:
        assert f"{want} layers" in said[0] and f"{bits}-bit" in said[0] and "GPTQModel and transformers" in said[0]
    (tmp_path / "q" / "quantize_config.json").unlink()  # the config.json's quantization_config alone
    loaded = epmq.load_quantized(tmp_path / "q")
    x = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_a_quantized_lm_head_is_declared(tmp_path):
    """``lm_head: true`` tells engines to build the head quantized; epmq loads it as saved."""
    from epmq.quant import rtn

    model = _tiny_llama()
    spec = epmq.QuantSpec(bits=4, group_size=32, sym=True)
    epmq.quantize_model(model, spec, method="rtn", progress=False)
    for q in _qconfigs(epmq.save_quantized(model, tmp_path / "plain")):
        assert "lm_head" not in q
    model.lm_head = epmq.QuantLinear.from_result(rtn(model.lm_head.weight.detach(), spec))
    for q in _qconfigs(epmq.save_quantized(model, tmp_path / "head")):
        assert q["lm_head"] is True and "dynamic" not in q
    loaded = epmq.load_quantized(tmp_path / "head")
    assert isinstance(loaded.lm_head, epmq.QuantLinear)
    x = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_a_quantized_lm_head_of_a_model_quantized_in_part_is_listed_for_vllm(tmp_path):
    """vLLM builds the head quantized only where ``modules_in_block_to_quantize`` (when written: a
    model quantized in part) names it (``is_layer_gptq_quantized``: any listed name inside the
    head's, "lm_head"); else it builds a float head, finds no ``lm_head.weight`` and fails on the
    packed tensors. The packed head is listed; epmq loads the checkpoint as saved."""
    from epmq.quant import rtn

    model = _tiny_llama()
    spec = epmq.QuantSpec(bits=4, group_size=32, sym=True)
    epmq.quantize_model(model, spec, method="rtn", layers=r"model\.layers\.1\.", progress=False)
    model.lm_head = epmq.QuantLinear.from_result(rtn(model.lm_head.weight.detach(), spec))
    epmq.save_quantized(model, tmp_path / "q")
    for q in _qconfigs(tmp_path / "q"):
        listed = sum(q["modules_in_block_to_quantize"], [])
        assert q["lm_head"] is True and any(name in "lm_head" for name in listed)
    loaded = epmq.load_quantized(tmp_path / "q")
    assert isinstance(loaded.lm_head, epmq.QuantLinear)
    x = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


# --------------------------------------------------------------------------- open_clip towers left whole


@contextlib.contextmanager
def warnings_recorded():
    import warnings

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield record


def _open_clip_clip():
    from open_clip.model import CLIP

    torch.manual_seed(0)
    cfg = {"embed_dim": 16,
           "vision_cfg": {"layers": 2, "width": 32, "head_width": 8, "image_size": 16, "patch_size": 8},
           "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 4, "layers": 2}}
    return lambda: CLIP(**cfg).eval()


@pytest.mark.parametrize("part", ["visual tower", "one in_proj left"])
def test_open_clip_attention_left_in_full_precision_loads_back(part, tmp_path):
    """The paper's CLIP setting quantizes the vision tower and keeps the text tower: saved whole,
    the text tower's attention keeps open_clip's own layout (in_proj_weight), as does an
    in_proj that layers= left out; the loader rebuilds those attentions too, and reads them."""
    make = _open_clip_clip()
    clip = make()
    spec = epmq.QuantSpec(bits=4, group_size=16)
    if part == "visual tower":
        epmq.quantize_model(clip.visual, spec, method="rtn", progress=False)
    else:
        epmq.quantize_model(clip, spec, method="rtn", progress=False,
                            layers=lambda n: n != "transformer.resblocks.1.attn.in_proj")
    epmq.save_quantized(clip, tmp_path / "q")
    loaded = epmq.load_quantized(tmp_path / "q", make())
    image, text = torch.randn(2, 3, 16, 16), torch.randint(1, 49, (2, 8))
    for got, want in zip(loaded(image, text), clip(image, text)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_shard_is_filled_up_to_exactly_max_shard_size(gen, tmp_path):
    """As transformers (huggingface_hub's splitter) shards: a new shard only when the next tensor
    would pass the limit, so tensors that add up to exactly ``max_shard_size`` share one file."""
    tensors = {f"t{i}": torch.randn(25, generator=gen) for i in range(4)}  # 100 bytes each
    writer = ckpt.ShardWriter(tmp_path, 200)
    for name, t in tensors.items():
        writer[name] = t
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"t0": "model-00001-of-00002.safetensors", "t1": "model-00001-of-00002.safetensors",
                                   "t2": "model-00002-of-00002.safetensors", "t3": "model-00002-of-00002.safetensors"}
    (tmp_path / "one").mkdir()
    writer = ckpt.ShardWriter(tmp_path / "one", 400)
    for name, t in tensors.items():
        writer[name] = t
    writer.finish()
    assert sorted(os.listdir(tmp_path / "one")) == ["model.safetensors"]
    held = load_file(str(tmp_path / "one" / "model.safetensors"))
    assert all(torch.equal(held[k], t) for k, t in tensors.items())


@pytest.mark.parametrize("edit", ["missing", "unexpected"])
def test_a_checkpoint_missing_or_adding_a_tensor_is_refused(edit, gen, tmp_path):
    """A fresh model given to load_quantized keeps none of its own values silently: a tensor the
    checkpoint lacks (or one the model has no place for) is an error naming it."""
    from safetensors.torch import save_file

    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q")
    path = tmp_path / "q" / "model.safetensors"
    tensors = load_file(str(path))
    if edit == "missing":
        del tensors["model.norm.weight"]
    else:
        tensors["model.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"does not fit .*{edit} tensors \['model\.(norm|extra)\.weight'\]"):
        epmq.load_quantized(tmp_path / "q", fam.fresh())


LAYER = "model.layers.0.self_attn.q_proj"


def _g_idx_at(value):
    def edit(tensors):
        g = tensors[f"{LAYER}.g_idx"].clone()
        g[-1] = value
        tensors[f"{LAYER}.g_idx"] = g
    return edit


def _nan_scale(tensors):
    scales = tensors[f"{LAYER}.scales"].clone()
    scales[0, 0] = float("nan")
    tensors[f"{LAYER}.scales"] = scales


def _scale_past_float16(tensors):
    """A float32 scale finite in the file, and inf in the float16 a given model's layer holds."""
    scales = tensors[f"{LAYER}.scales"].float()
    scales[0, 0] = 1e6
    tensors[f"{LAYER}.scales"] = scales


@pytest.mark.parametrize("peer", [False, True], ids=["ours", "another writer's"])
@pytest.mark.parametrize("edit,match", [
    (_g_idx_at(-2), r"g_idx holds groups in \[-2, .*outside the \d+ groups"),
    (_g_idx_at(99), r"g_idx holds groups in \[0, 99\], outside the \d+ groups"),
    (_nan_scale, r"q_proj.scales must be finite floats, got NaN or inf"),
    (_scale_past_float16, r"q_proj.scales must be finite floats, got NaN or inf \(as the layer's torch.float16\)"),
    (lambda t: t.pop(f"{LAYER}.qzeros"), r"has no model.layers.0.self_attn.q_proj.qzeros"),
    (lambda t: t.update({f"{LAYER}.qweight": t[f"{LAYER}.qweight"].flatten()}), r"q_proj.qweight is \(\d+,\)"),
    (lambda t: t.update({f"{LAYER}.qzeros": t[f"{LAYER}.qzeros"].flatten()}), r"q_proj.qzeros is \(\d+,\)"),
    (lambda t: t.update({f"{LAYER}.qweight": t[f"{LAYER}.qweight"].long()}), r"qweight must be int32"),
], ids=["g_idx -2", "g_idx 99", "NaN scale", "scale past float16", "no qzeros", "1-D qweight", "1-D qzeros",
      "int64 qweight"])
def test_a_corrupt_layer_is_refused_on_load(edit, match, peer, gen, tmp_path):
    """A packed layer's tensors that are missing, of another dtype or out of range (a corrupt or
    hand-edited file) are an error naming the layer when loading, in our checkpoints and other
    writers' (v1), not a layer that reads another group (a negative g_idx wrapped on the CPU)
    or gives NaN."""
    from safetensors.torch import save_file

    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q", checkpoint_format="gptq")
    if peer:
        config = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
        del config["epmq"]
        (tmp_path / "q" / "quantize_config.json").write_text(json.dumps(config))
    path = tmp_path / "q" / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=match):
        epmq.load_quantized(tmp_path / "q", fam.fresh())


@pytest.mark.parametrize("edit,match", [
    (lambda ours: ours["modules"][LAYER].pop("bias"), rf"module '{LAYER}' lacks bias"),
    (lambda ours: ours["modules"].update({LAYER: 4}), rf"module '{LAYER}' lacks in_features, out_features"),
    (lambda ours: ours.update(modules=[LAYER]), r"epmq section of its quantization config has no modules"),
    (lambda ours: ours.update(transposed=5), r"transposed must be a list of names, got 5"),
    (lambda ours: ours.update(rescaled=5), r"rescaled must be a list of module names, got 5"),
    (lambda ours: ours.update(rescaled=["model"]), r"saved as module 'model' rescales them .* has no such module"),
    (lambda ours: ours.update(undivided="rwkv"), r"undivided must be a list of module names, got 'rwkv'"),
], ids=["a module without bias", "a module entry no object", "modules a list", "transposed a number",
        "rescaled a number", "rescaled by a module the model lacks", "undivided a name"])
def test_a_damaged_epmq_section_is_refused_by_name(edit, match, gen, tmp_path):
    """The layers of an epmq checkpoint are read from its quantize_config.json's epmq section; one
    not as save_quantized writes it (hand-edited, damaged) ended load_quantized in a bare
    KeyError, AttributeError or TypeError: an error naming the checkpoint and the entry."""
    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q")
    path = tmp_path / "q" / "quantize_config.json"
    config = json.loads(path.read_text())
    edit(config["epmq"])
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        epmq.load_quantized(tmp_path / "q", fam.fresh())


def test_a_peers_int64_g_idx_is_loaded_and_saved_as_int32(gen, tmp_path):
    from safetensors.torch import save_file

    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q")
    path = tmp_path / "q" / "model.safetensors"
    tensors = load_file(str(path))
    tensors[f"{LAYER}.g_idx"] = tensors[f"{LAYER}.g_idx"].long()
    save_file(tensors, str(path), metadata={"format": "pt"})
    for loaded in (epmq.load_quantized(tmp_path / "q", fam.fresh()), epmq.load_quantized(tmp_path / "q")):
        assert loaded.get_buffer(f"{LAYER}.g_idx").dtype == torch.int32  # (copied into a model given, or assigned)
        torch.testing.assert_close(output(loaded, fam.test_item), output(model, fam.test_item), rtol=0, atol=0)
    epmq.save_quantized(loaded, tmp_path / "again")
    assert load_file(str(tmp_path / "again" / "model.safetensors"))[f"{LAYER}.g_idx"].dtype == torch.int32


def test_float32_scales_beyond_float16_are_refused_on_save(gen, tmp_path):
    fam, model = quantized(gen)
    layer = model.get_submodule(LAYER)
    layer.scales = layer.scales.float()  # (as a peer's fp32 scales load)
    layer.scales[0, 0] = 1e5
    with pytest.raises(ValueError, match="q_proj has scales up to 1e\\+05, beyond float16's range"):
        epmq.save_quantized(model, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_a_quantization_config_without_bits_is_refused(gen, tmp_path):
    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    del config["bits"], config["epmq"]
    (tmp_path / "q" / "quantize_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 8\), got None"):
        epmq.load_quantized(tmp_path / "q", fam.fresh())


@pytest.mark.parametrize("group_size", [0, -2, None, "128", True])
def test_a_quantization_config_with_a_malformed_group_size_is_refused(group_size, gen, tmp_path):
    """A peer's config (no epmq section) whose group_size is no group size: a clear error naming
    it (0, null and "128" gave ZeroDivisionError and TypeError)."""
    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    del config["epmq"]
    config["group_size"] = group_size
    (tmp_path / "q" / "quantize_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="group_size must be -1 or a positive integer"):
        epmq.load_quantized(tmp_path / "q", fam.fresh())


def test_a_peer_checkpoint_loads_in_the_dtype_its_config_names(tmp_path):
    """Another tool's checkpoint names no dtype per layer: built without a model, its
    QuantLinears take config.json's dtype, as its other tensors do, and the model runs."""
    saved_bf16_model("llama", tmp_path / "q", checkpoint_format="gptq")
    ours = epmq.load_quantized(tmp_path / "q")  # (each layer's dtype recorded under "epmq")
    (tmp_path / "q" / "quantize_config.json").unlink()  # transformers' layout: config.json only
    loaded = load_bf16(tmp_path / "q")
    item = inputs("llama", 1, torch.Generator().manual_seed(0))[0]
    # (the model built from the config keeps its rotary table in float32, as from_pretrained does)
    torch.testing.assert_close(output(loaded, item), output(ours, item), rtol=0, atol=0)


@pytest.mark.parametrize("tie", [True, False])
def test_tie_order_of_a_tied_and_an_untied_head(tie):
    """``tie_order``: aliases of one tied parameter share one list,
    the first name first; an untied head transformers would tie by default falls back to the
    embeddings, which do not fall back to it."""
    import transformers

    from epmq.checkpoint_io import tie_order

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=tie))
    order = tie_order(model)
    if tie:
        assert order["lm_head.weight"] == order["model.embed_tokens.weight"] == [
            "model.embed_tokens.weight", "lm_head.weight"]
    else:
        assert order["lm_head.weight"] == ["lm_head.weight", "model.embed_tokens.weight"]
        assert order["model.embed_tokens.weight"] == ["model.embed_tokens.weight"]
    assert order["model.norm.weight"] == ["model.norm.weight"]


def test_renamed_refuses_two_names_renamed_alike():
    """``renamed``: natural order, and a clear error on a collision."""
    from epmq.checkpoint_io import CheckpointError, renamed

    assert list(renamed(["l.10.w", "l.9.w", "l.2.w"], None)) == ["l.2.w", "l.9.w", "l.10.w"]
    assert renamed(["a.w", "b.w"], lambda n: "x." + n) == {"a.w": "x.a.w", "b.w": "x.b.w"}
    with pytest.raises(CheckpointError, match="renaming maps both 'a.w' and 'b.w' to 'c.w'"):
        renamed(["b.w", "a.w"], lambda n: "c.w")


def _moe_names(layers=50, experts=256):
    """A DeepSeek-V3-like checkpoint's tensor names: ~77k at 50 layers of 256 experts, FP8 scales beside."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for layer in range(layers):
        names += [f"model.layers.{layer}.{m}.weight" for m in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.o_proj", "mlp.gate")]
        names += [f"model.layers.{layer}.mlp.experts.{e}.{p}.{t}" for e in range(experts)
                  for p in ("gate_proj", "up_proj", "down_proj") for t in ("weight", "weight_scale_inv")]
    return names


@pytest.fixture
def bindings_checked(monkeypatch):
    """Every ``Binding`` made checks its rewrites' coverage against a lookup of every name under
    every rewrite (``_lookup``, as it finds a name afterwards); yields the list of bindings made."""
    from epmq.checkpoint_io import Binding

    made, coverage = [], Binding._coverage

    def checked(self, rewrites, names, fits):
        scores = coverage(self, rewrites, names, fits)
        every = {r: sum(k is not None and (fits is None or fits(n, self.original[k]))
                        for n, k in ((n, self._lookup(n, r)) for n in names)) for r in rewrites}
        assert scores == every
        made.append(self)
        return scores

    monkeypatch.setattr(Binding, "_coverage", checked)
    return made


def test_binding_finds_what_a_lookup_under_every_rewrite_finds(bindings_checked):
    """``Binding`` counts each rewrite's names in one pass (a lookup of 77k names under ~100
    rewrites took seconds, per expert opened): the counts, and so the rewrite chosen and the
    copies spotted, are those of a lookup of every name under every rewrite."""
    from epmq.checkpoint_io import Binding

    model = ["visual.conv1.weight", "visual.blocks.0.attn.weight", "visual.blocks.1.attn.weight",
             "visual.ln.weight", "logit_scale"]
    tied = {"lm_head.weight": ["model.embed_tokens.weight", "lm_head.weight"],
            "model.embed_tokens.weight": ["model.embed_tokens.weight", "lm_head.weight"],
            "model.layers.0.mlp.weight": ["model.layers.0.mlp.weight"]}
    cases = [  # (keys, Binding's arguments, the rewrite, key_for of the first name)
        (model, dict(names=model), ("", ""), "visual.conv1.weight"),
        (["module." + n for n in model], dict(names=model), ("", "module."), "module.visual.conv1.weight"),
        ([n.removeprefix("visual.") for n in model], dict(names=model), ("visual.", ""), "conv1.weight"),
        (["module." + n.removeprefix("visual.") for n in model], dict(names=model), ("visual.", "module."),
         "module.conv1.weight"),
        # a full CLIP checkpoint: the text tower unprefixed beside the visual one (the identity wins ties)
        (model + ["conv1.weight", "ln.weight"], dict(names=model), ("", ""), "visual.conv1.weight"),
        (["base_" + n for n in model], dict(names=model, prefixes=["base_"]), ("", "base_"),
         "base_visual.conv1.weight"),
        (["model.lm_head.weight", "model.model.layers.0.mlp.weight"], dict(order=tied), ("", "model."),
         "model.lm_head.weight"),
        (["m." + n.upper() for n in model], dict(names=model, rename=str.lower), ("", "m."),
         "m.VISUAL.CONV1.WEIGHT"),
        # the blocks' own keys do not fit (their shape): the copy of four whose do is found
        (model + ["ema." + n for n in model[:4]], dict(names=model, fits=lambda n, k: not k.startswith("visual.b")),
         ("", "ema."), "ema.visual.conv1.weight"),
    ]
    for keys, kwargs, rewrite, key in cases:
        binding = Binding(keys, **kwargs)
        assert (binding.rewrite, binding.key_for(binding._names[0]), binding.ambiguous()) == (rewrite, key, [])
    copies = Binding(["model." + n for n in model] + ["ema_model.module." + n for n in model], names=model)
    assert copies.ambiguous() == [("", "ema_model.module."), ("", "model.")]
    assert len(bindings_checked) == len(cases) + 1


def test_binding_of_an_moe_checkpoint_of_77k_tensors(bindings_checked):
    """A DeepSeek-V3-like index of 77k names: found under a DDP ``module.``, and two copies of it
    refused naming both, each as a lookup under every rewrite finds them."""
    from epmq.checkpoint_io import Binding, CheckpointError

    names = _moe_names()
    assert len(names) > 77_000
    order = {n: [n] for n in names}
    binding = Binding(["module." + n for n in names], order)
    assert binding.rewrite == ("", "module.") and not binding.ambiguous()
    assert binding.key_for(names[-1]) == "module." + names[-1]
    copies = Binding(["model." + n for n in names] + ["ema." + n for n in names], order)
    with pytest.raises(CheckpointError, match=r"several copies \('model.embed_tokens.weight' is both "
                                              r"'ema.model.embed_tokens.weight' and 'model.model.embed"):
        copies.refuse_ambiguity(CheckpointError)
    assert len(bindings_checked) == 2


def test_fused_experts_of_a_checkpoint_saved_per_expert_are_found_in_one_scan_of_its_keys(
        tmp_path, monkeypatch, bindings_checked):
    """A transformers 5 MoE (experts fused) read from the layout save_pretrained writes (one matrix
    per expert) finds each layer's pieces with the checkpoint's keys scanned once, not once a layer
    (Qwen3-30B-A3B's 48 layers of 128 experts: 13 s an expert opened), the same tensors."""
    import transformers
    from safetensors.torch import load_file

    from epmq import checkpoint_io

    scans = []
    keys = checkpoint_io.CheckpointReader.keys
    monkeypatch.setattr(checkpoint_io.CheckpointReader, "keys", lambda self: scans.append(1) or keys(self))
    counted = {}
    for layers in (2, 4):
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            vocab_size=32, hidden_size=8, intermediate_size=8, moe_intermediate_size=4, num_hidden_layers=layers,
            num_attention_heads=2, num_key_value_heads=1, head_dim=4, num_experts=4, num_experts_per_tok=2))
        model.save_pretrained(tmp_path / str(layers))
        saved = load_file(tmp_path / str(layers) / "model.safetensors")
        assert "model.layers.0.mlp.experts.3.down_proj.weight" in saved
        scans.clear()
        state = checkpoint_io.open_state(tmp_path / str(layers), model, what="expert")
        counted[layers] = len(scans)
        assert state.keys() == model.state_dict().keys()
        for name, tensor in model.state_dict().items():
            assert torch.equal(state[name], tensor), name
    assert counted[2] == counted[4]
    assert bindings_checked


def test_open_state_matches_the_checkpoint_keys_once(tmp_path, monkeypatch):
    """``open_state`` matched every checkpoint key to the model's names twice (``bind``'s Binding,
    then the same again for blocks past the model's), seconds an expert of an MoE checkpoint of
    77k tensors: once, the same tensors."""
    import transformers

    from epmq import checkpoint_io

    made = []
    init = checkpoint_io.Binding.__init__
    monkeypatch.setattr(checkpoint_io.Binding, "__init__", lambda self, *a, **k: made.append(1) or init(self, *a, **k))
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1))
    model.save_pretrained(tmp_path)
    state = checkpoint_io.open_state(tmp_path, model, what="expert")
    assert len(made) == 1
    assert state.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_checkpoint_gets_the_modes_the_umask_gives(gen, tmp_path, umask):
    """A server running as another user reads what a 022 umask allows (safetensors itself
    writes its files 0600, and the temporary directory is made 0700)."""
    _, model = quantized(gen, bits=4)
    old = os.umask(umask)
    try:
        epmq.save_quantized(model, tmp_path / "q", max_shard_size=2000)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "q").stat().st_mode) == 0o777 & ~umask
    files = list((tmp_path / "q").iterdir())
    assert sum(p.name.endswith(".safetensors") for p in files) > 1
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o666 & ~umask for p in files}


@pytest.mark.parametrize("tie", [False, True])
def test_a_missing_head_is_tied_only_where_the_config_ties_it(tie, tmp_path):
    """Another writer's checkpoint without ``lm_head.weight``: a model whose config ties the
    head to the embeddings takes them (as transformers does); one whose config unties them is
    refused (transformers reports the head MISSING), not loaded with the embeddings' rows."""
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(config).eval()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=32), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    quant_config = json.loads((tmp_path / "q" / "quantize_config.json").read_text())
    del quant_config["epmq"]  # (another writer's)
    (tmp_path / "q" / "quantize_config.json").write_text(json.dumps(quant_config))
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    tensors.pop("lm_head.weight", None)
    save_file(tensors, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})
    if tie:
        loaded = epmq.load_quantized(tmp_path / "q")
        assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    else:
        with pytest.raises(ValueError, match=r"missing tensors \['lm_head.weight'\]"):
            epmq.load_quantized(tmp_path / "q")


@pytest.mark.parametrize("desc_act", [False, True])
def test_a_peer_checkpoint_without_g_idx_has_its_groups_in_order(gen, tmp_path, desc_act):
    """Writers leave g_idx out without act-order (GPTQ-for-LLaMa, exllama exports): the layers
    load with the groups in order (what serving engines take), to the model's own outputs; with
    desc_act the order of the inputs is unknown, and that is said."""
    from safetensors.torch import save_file

    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q", checkpoint_format="gptq")
    config = json.loads((tmp_path / "q" / ckpt.CONFIG_FILE).read_text())
    del config["epmq"]  # (a peer's checkpoint)
    config["desc_act"] = desc_act
    (tmp_path / "q" / ckpt.CONFIG_FILE).write_text(json.dumps(config))
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith(".g_idx")}, tmp_path / "q" / "model.safetensors",
              metadata={"format": "pt"})
    if desc_act:
        with pytest.raises(ValueError, match="has no g_idx, which act-order"):
            epmq.load_quantized(tmp_path / "q", fam.fresh())
        return
    loaded = epmq.load_quantized(tmp_path / "q", fam.fresh())
    torch.testing.assert_close(output(loaded, fam.test_item), output(model, fam.test_item), rtol=0, atol=0)


def _drop_g_idx(directory, desc_act=None):
    """``directory`` as a peer writes it: no epmq section, no g_idx tensors."""
    from safetensors.torch import save_file

    config = json.loads((directory / ckpt.CONFIG_FILE).read_text())
    del config["epmq"]
    if desc_act is not None:
        config["desc_act"] = desc_act
    (directory / ckpt.CONFIG_FILE).write_text(json.dumps(config))
    tensors = load_file(directory / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith(".g_idx")}, directory / "model.safetensors",
              metadata={"format": "pt"})


class PaddedWordsBlock(torch.nn.Module):
    """A residual MLP of 32 -> 48 -> 32: 48 inputs fill no whole 32-bit words at 3 bits."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(32, 48), torch.nn.Linear(48, 32)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def test_peer_checkpoints_without_g_idx_of_one_group_or_of_padded_words():
    """Act-order per channel (one group: any order of the inputs gives the same g_idx, early
    GPTQ-for-LLaMa --act-order exports) loads; and a layer whose inputs fill no whole words at
    its width (3 bits, 48 inputs: 5 words, which alone read as 53 inputs) takes the model's 48."""
    import tempfile

    x = torch.randn(4, 32)
    for spec, method, desc_act in ((epmq.QuantSpec(bits=3, group_size=-1), "rtn", None),
                                   (epmq.QuantSpec(bits=4, group_size=-1, act_order=True), "gptq", True)):
        torch.manual_seed(0)
        model = Stack(PaddedWordsBlock()).eval()
        epmq.quantize_model(model, spec, method=method, calibration={"t": [torch.randn(8, 32)]}
                            if method == "gptq" else None, backend="torch", progress=False)
        directory = Path(tempfile.mkdtemp()) / "q"
        epmq.save_quantized(model, directory, checkpoint_format="gptq")
        _drop_g_idx(directory, desc_act)
        loaded = epmq.load_quantized(directory, Stack(PaddedWordsBlock()).eval())
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
        if spec.bits == 3:  # (a narrower layer of the same words: its codes past 44 are not padding)
            narrow = PaddedWordsBlock()
            narrow.up, narrow.down = torch.nn.Linear(32, 44), torch.nn.Linear(44, 32)
            with pytest.raises(ValueError, match="in_features=44.* the checkpoint has a 53->32"):
                epmq.load_quantized(directory, Stack(narrow).eval())


def test_a_peer_layer_of_padded_words_takes_its_dynamic_rules_group_size(tmp_path):
    """A layer a dynamic rule gives its own group size, of a width that fills no whole words (3 bits, 48
    inputs in groups of 20: 5 words, read as 53 inputs), written without g_idx: its inputs are the model's
    48, and its groups the rule's 20; the config's 16, which gives as many groups of 48 inputs, was
    taken, and the layer dequantized in groups of 16 (outputs off)."""
    torch.manual_seed(0)
    model = Stack(PaddedWordsBlock()).eval()
    epmq.quantize_model(model, epmq.QuantSpec(bits=3, group_size=16), method="rtn", layers=lambda n: n.endswith("up"),
                        progress=False)
    epmq.quantize_model(model, epmq.QuantSpec(bits=3, group_size=20), method="rtn", progress=False)
    with pytest.warns(UserWarning, match="fill no whole 32-bit words"):
        epmq.save_quantized(model, tmp_path / "q", checkpoint_format="gptq")
    _drop_g_idx(tmp_path / "q")
    config = json.loads((tmp_path / "q" / ckpt.CONFIG_FILE).read_text())
    assert config["group_size"] == 16 and list(config["dynamic"].values()) == [{"bits": 3, "group_size": 20}]
    loaded = epmq.load_quantized(tmp_path / "q", Stack(PaddedWordsBlock()).eval())
    down = [m for name, m in loaded.named_modules() if name.endswith("down")][0]
    assert (down.in_features, down.group_size) == (48, 20)
    x = torch.randn(4, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_a_checkpoint_without_its_manifest_is_replaced_whole(gen, tmp_path):
    """A checkpoint epmq wrote before the manifest existed (or copied without its dot-files):
    the new write's files stand (its tokenizer, not the old one; no warning), and none of the
    old weights files is carried over beside the new ones (a sharded checkpoint rewritten as one
    file left shards that engines, reading every weights file, would load too)."""
    _, model = quantized(gen)
    directory = tmp_path / "q"
    epmq.save_quantized(model, directory, max_shard_size="20KB",
                        extras=lambda d: (d / "tokenizer.json").write_text("old run"))
    assert (directory / ckpt.INDEX_FILE).is_file()
    (directory / ckpt.MANIFEST_FILE).unlink()
    with warnings_recorded() as record:
        epmq.save_quantized(model, directory, extras=lambda d: (d / "tokenizer.json").write_text("new run"))
    assert not [w for w in record if "kept your changed" in str(w.message)]
    assert (directory / "tokenizer.json").read_text() == "new run"
    assert sorted(p.name for p in directory.iterdir() if p.name.endswith(ckpt.WEIGHT_SUFFIXES)) == \
        [ckpt.WEIGHTS_FILE]


def test_a_ragged_layer_of_another_tools_checkpoint_takes_the_configs_group_size():
    """A width the config's group size does not divide has ceil(K / g) groups, the last shorter
    (as GPTQ, GPTQModel and epmq write them): read off the tensors, that is the config's g."""
    assert ckpt._group_size_of("x", 40, 3, 16) == 16
    assert ckpt._group_size_of("x", 48, 3, 16) == 16
    assert ckpt._group_size_of("x", 24, 1, 32) == 32
    assert ckpt._group_size_of("x", 48, 4, 32) == 12  # (not the config's: the one the tensors show)
    with pytest.raises(ValueError, match="no group size gives that"):
        ckpt._group_size_of("x", 40, 7, 16)


def test_a_directory_of_several_unnamed_safetensors_is_not_read_as_one_of_them(tmp_path):
    """Without a weights file of a known name (or an index), a single ``*.safetensors`` is the
    checkpoint; of two, neither is taken silently (the other's tensors would be lost)."""
    from safetensors.torch import save_file

    from epmq.checkpoint_io import CheckpointError, CheckpointReader, weights_in

    save_file({"a": torch.zeros(2)}, str(tmp_path / "part-a.safetensors"))
    assert weights_in(tmp_path) == tmp_path / "part-a.safetensors"
    assert list(CheckpointReader(tmp_path).keys()) == ["a"]
    save_file({"b": torch.zeros(2)}, str(tmp_path / "part-b.safetensors"))
    assert weights_in(tmp_path) is None
    with pytest.raises(CheckpointError, match="no weights in"):
        CheckpointReader(tmp_path)


def test_a_lazy_state_dict_casts_floating_point_tensors_only():
    """``dtype`` is the compute dtype of the weights: integer and boolean tensors (position ids,
    masks, counters) keep theirs, and ``dtype_of`` says what indexing gives."""
    from epmq.checkpoint_io import CheckpointReader, LazyStateDict

    state = {"w": torch.randn(2, 2), "ids": torch.arange(3), "mask": torch.ones(2, dtype=torch.bool)}
    lazy = LazyStateDict(CheckpointReader(state), {k: k for k in state}, dtype=torch.float16)
    assert {k: lazy[k].dtype for k in state} == {"w": torch.float16, "ids": torch.int64, "mask": torch.bool}
    assert {k: lazy.dtype_of(k) for k in state} == {k: lazy[k].dtype for k in state}
    assert torch.equal(lazy["ids"], state["ids"])


def test_a_group_size_written_as_a_whole_float_is_read(tmp_path):
    """``"group_size": 128.0`` (a config a script wrote through floats) is 128, as ``bits`` 4.0 is 4."""
    (tmp_path / ckpt.CONFIG_FILE).write_text(json.dumps({"bits": 4, "group_size": 32.0, "desc_act": False}))
    qconfig = ckpt._read_qconfig(tmp_path)
    assert qconfig["group_size"] == 32 and type(qconfig["group_size"]) is int


def test_an_index_whose_shards_lack_a_tensor_or_a_shard_is_refused(tmp_path):
    """A shard index that lists a tensor no shard holds (a stale index) is named, not loaded as a
    checkpoint without that tensor; one naming a shard that is not there is refused at once."""
    from safetensors.torch import save_file

    from epmq.checkpoint_io import CheckpointError, CheckpointReader

    save_file({"a": torch.zeros(2)}, str(tmp_path / "model-00001-of-00001.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00001.safetensors",
                                            "b": "model-00001-of-00001.safetensors"}}
    (tmp_path / ckpt.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"lists tensors its shards do not hold: \['b'\]"):
        ckpt._load_tensors(tmp_path, {})
    index["weight_map"]["b"] = "model-00002-of-00002.safetensors"
    (tmp_path / ckpt.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="shard.* listed in model.safetensors.index.json are missing"):
        CheckpointReader(tmp_path)
    # load_quantized's read too, before any shard is read (it read those before the missing one,
    # then ended in safetensors' bare 'No such file or directory', naming no index)
    index["weight_map"]["c"] = "model-00003-of-00003.safetensors"
    (tmp_path / ckpt.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"shard\(s\) listed in .*model.safetensors.index.json are missing: "
                                                r"\[.*model-00002-of-00002.safetensors.*model-00003-of-00003"):
        ckpt._load_tensors(tmp_path, {})


@pytest.mark.parametrize("outside", ["../private/secret.safetensors", "sub/../../private/secret.safetensors",
                                     "ABSOLUTE"])
def test_an_index_naming_a_shard_outside_its_directory_is_refused(outside, tmp_path):
    """A shard index comes with the checkpoint (a hub repository, a downloaded folder): a shard
    name that leaves its directory ("../x", an absolute path) was read, so another
    .safetensors file of the machine became the checkpoint's tensors (merged, quantized, served);
    refused, by the reader, load_quantized's and a hub download's. Shards that are links to
    files elsewhere (the HF hub cache's blobs) are still read."""
    from safetensors.torch import save_file

    from epmq.checkpoint_io import CheckpointError, CheckpointReader, shard_weight_map

    (tmp_path / "private").mkdir()
    save_file({"a": torch.full((2,), 42.0)}, str(tmp_path / "private" / "secret.safetensors"))
    if outside == "ABSOLUTE":
        outside = str(tmp_path / "private" / "secret.safetensors")
    home = tmp_path / "ckpt"
    home.mkdir()
    (home / ckpt.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": {"a": outside}}))
    with pytest.raises(CheckpointError, match="outside its directory"):
        CheckpointReader(home)
    with pytest.raises(ValueError, match="outside its directory"):
        ckpt._load_tensors(home, {})
    with pytest.raises(ValueError, match="outside its directory"):
        shard_weight_map(home / ckpt.INDEX_FILE)
    # a snapshot's shard linked to its blob outside the directory: read as before
    (home / "model-00001-of-00001.safetensors").symlink_to(tmp_path / "private" / "secret.safetensors")
    (home / ckpt.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "model-00001-of-00001.safetensors"}}))
    assert torch.equal(CheckpointReader(home).get("a"), torch.full((2,), 42.0))
    assert torch.equal(ckpt._load_tensors(home, {})["a"], torch.full((2,), 42.0))


@pytest.mark.parametrize("base_name", ["../private/secret", "ABSOLUTE"])
def test_a_model_file_base_name_outside_the_directory_is_refused(base_name, tmp_path):
    """AutoGPTQ's model_file_base_name names the weights file of the checkpoint's directory; the
    config comes with the checkpoint, and "../x" or an absolute path read another .safetensors
    file of the machine as its weights."""
    from safetensors.torch import save_file

    (tmp_path / "private").mkdir()
    save_file({"a": torch.full((2,), 42.0)}, str(tmp_path / "private" / "secret.safetensors"))
    if base_name == "ABSOLUTE":
        base_name = str(tmp_path / "private" / "secret")
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(ValueError, match="model_file_base_name .* is no file name of the checkpoint's directory"):
        ckpt._load_tensors(tmp_path / "ckpt", {"model_file_base_name": base_name})
    save_file({"a": torch.zeros(2)}, str(tmp_path / "ckpt" / "gptq_model-4bit-16g.safetensors"))
    tensors = ckpt._load_tensors(tmp_path / "ckpt", {"model_file_base_name": "gptq_model-4bit-16g"})
    assert torch.equal(tensors["a"], torch.zeros(2))


def test_a_directory_that_is_no_path_is_refused_by_name(gen, tmp_path):
    """save_quantized(model, None) (after converting every layer), load_quantized(None) and
    quantize_checkpoint(model, None) ended in pathlib's or os's bare 'expected str, bytes or
    os.PathLike object, not NoneType', naming no argument; refused naming it."""
    fam, model = quantized(gen)
    for bad in (None, 3, ["q"]):
        with pytest.raises(TypeError, match=f"directory must be a path .*got {type(bad).__name__}"):
            epmq.save_quantized(model, bad)
        with pytest.raises(TypeError, match=f"directory must be a path .*got {type(bad).__name__}"):
            epmq.load_quantized(bad)
        with pytest.raises(TypeError, match=f"out must be a path .*got {type(bad).__name__}"):
            epmq.quantize_checkpoint(tmp_path, bad, spec=epmq.QuantSpec(bits=4), method="rtn", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_model_to_quantize_that_is_no_path_is_refused_by_name(gen, tmp_path):
    """quantize_checkpoint(None, out) (an unset variable) ended in pathlib's bare 'expected str,
    bytes or os.PathLike object, not NoneType' (out was checked, 4f85862), and a model in memory
    given to it the same; refused naming model, a module pointed to epmq.quantize_model."""
    fam, model = quantized(gen)
    spec = epmq.QuantSpec(bits=4)
    for bad in (None, 3, model):
        with pytest.raises(TypeError, match=f"model must be a path .*got {type(bad).__name__}") as e:
            epmq.quantize_checkpoint(bad, tmp_path / "q", spec=spec, method="rtn", progress=False)
    assert "epmq.quantize_model" in str(e.value) and len(str(e.value)) < 300
    assert list(tmp_path.iterdir()) == []


def test_a_model_to_load_into_that_is_no_module_is_refused_by_name(gen, tmp_path):
    """load_quantized(directory, model=...) given the base model's path, its state dict or a number
    (f3c0d33 refused them as quantize_model's and save_quantized's model) ended in a bare
    AttributeError ("'str' object has no attribute 'parameters'"); refused naming model, before
    anything is read, a path pointed to model=None, which builds the model from the checkpoint."""
    fam, model = quantized(gen)
    epmq.save_quantized(model, tmp_path / "q")
    for bad in (str(tmp_path / "q"), {"w": torch.zeros(3)}, 3):
        with pytest.raises(TypeError, match=f"model must be a torch nn.Module .*got {type(bad).__name__}") as e:
            epmq.load_quantized(tmp_path / "q", model=bad)
        assert ("model=None" in str(e.value)) == isinstance(bad, str)


def _rule_settings(q, prefix):
    """``(bits, group_size)`` an engine builds the module ``prefix`` with from the config's ``dynamic``
    rules, read as vLLM's ``get_dynamic_override`` and GPTQModel's ``dynamic_get`` read them (the first
    rule whose regex ``re.match``-es the name decides; ``-:`` ones: not quantized, None)."""
    import re

    for rule, override in q.get("dynamic", {}).items():
        if re.match(rule[2:] if rule[:2] in ("-:", "+:") else rule, prefix):
            if rule.startswith("-:"):
                return None
            return override.get("bits", q["bits"]), override.get("group_size", q["group_size"])
    return q["bits"], q["group_size"]


def _vllm_names(arch):
    """The names vLLM gives the quantized modules of our tiny models, each with the checkpoint's
    names it loads into it (``packed_modules_mapping``: qkv_proj <- q/k/v_proj, gate_up_proj <-
    gate/up_proj; Qwen3-MoE's experts one ``FusedMoE`` named ``...mlp.experts``; LLaVA's language
    model under ``language_model.model.``)."""
    lead = {"llama": "model.layers", "qwen3_moe": "model.layers", "llava": "language_model.model.layers"}[arch]
    names = {}
    for i in range(2):
        block = f"{lead}.{i}"
        names[f"{block}.self_attn.qkv_proj"] = [f"{block}.self_attn.{p}_proj" for p in "qkv"]
        names[f"{block}.self_attn.o_proj"] = [f"{block}.self_attn.o_proj"]
        if arch == "qwen3_moe":
            names[f"{block}.mlp.experts"] = [f"{block}.mlp.experts.{e}.{p}_proj" for e in range(4)
                                             for p in ("gate", "up", "down")]
        else:
            names[f"{block}.mlp.gate_up_proj"] = [f"{block}.mlp.gate_proj", f"{block}.mlp.up_proj"]
            names[f"{block}.mlp.down_proj"] = [f"{block}.mlp.down_proj"]
    return names


def _vllm_builds_quantized(q, prefix, fused=("q_proj", "k_proj", "v_proj")):
    """vLLM's choice for a linear module ``prefix`` (gptq_utils.get_linear_quant_method): not where a -: rule
    re.match-es it, else where a name of modules_in_block_to_quantize (flattened) lies inside its shards'."""
    import re

    if any(re.match(r[2:], prefix) for r in q.get("dynamic", {}) if r.startswith("-:")):
        return False
    listed = sum(q.get("modules_in_block_to_quantize", []), [])
    parent, _, last = prefix.rpartition(".")
    shards = [f"{parent}.{p}" for p in fused] if last == "qkv_proj" else [prefix]
    return all(any(name in shard for name in listed) for shard in shards)


def test_a_llava_vision_tower_in_part_is_named_as_vllm_builds_it(tmp_path):
    """transformers 5 holds and saves LLaVA's CLIP tower without its vision_model level (vision_tower.encoder...),
    which vLLM's CLIPVisionModel keeps (vision_tower.vision_model.encoder.layers.N.self_attn.qkv_proj): the
    tower's block 1 quantized and block 0 left in full precision were listed and ruled by the saved names
    alone, inside none of vLLM's, so vLLM built block 1 in full precision and could not load its packed
    tensors. The rules and lists name vLLM's modules too."""
    from test_walker_towers import llava_inputs, tiny_llava

    model = tiny_llava()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=32, sym=True), method="rtn", progress=False,
                        layers=r"model\.language_model\.|vision_tower\.encoder\.layers\.1\.")
    epmq.save_quantized(model, tmp_path / "q")
    for q in _qconfigs(tmp_path / "q"):
        for i, quantized in ((0, False), (1, True)):
            for rel in ("self_attn.qkv_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
                name = f"vision_tower.vision_model.encoder.layers.{i}.{rel}"
                assert _vllm_builds_quantized(q, name) == quantized, name
        for rel in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.down_proj"):
            assert _vllm_builds_quantized(q, f"language_model.model.layers.1.{rel}")
    item = llava_inputs(1, torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(output(epmq.load_quantized(tmp_path / "q"), item), output(model, item), rtol=0, atol=0)


def _mixed_model(arch):
    """``arch``'s tiny model, its block 1 quantized at 8 bits in groups of 32 (the experts' 16 inputs:
    one group) and the rest at 4 bits in groups of 16, as two quantize_model calls leave it."""
    from test_walker_towers import tiny_llava

    model = {"llama": _tiny_llama, "qwen3_moe": lambda: build("qwen3_moe"), "llava": tiny_llava}[arch]()
    block1 = r"^model\.(language_model\.)?layers\.1\."
    epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=32, sym=True), method="rtn", layers=block1,
                        progress=False)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16, sym=True), method="rtn", progress=False)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "llava"])
def test_layers_of_other_bits_get_dynamic_rules_that_engines_match(arch, tmp_path, recwarn):
    """A model quantized at mixed bit widths / group sizes (block 1 at 8 bits) was only warned of
    ('engines ... will refuse the checkpoint'): its config held the first layer's bits, and GPTQModel
    and vLLM built every layer at them. ``dynamic`` ``+:`` rules give the other layers' bits and group
    size under both the checkpoint's names (GPTQModel) and vLLM's fused ones (qkv_proj, gate_up_proj,
    a block's experts); a reader following them recovers every layer's weights."""
    model = _mixed_model(arch)
    epmq.save_quantized(model, tmp_path / "q")
    # (not 'fuse': groups of 16 take vLLM and SGLang off Marlin, and 'SGLang refuses' the experts there)
    assert not [w for w in recwarn
                if any(said in str(w.message) for said in ("mix bit widths", "build as one", "fused with"))]
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    on_disk = {key.removesuffix(".qweight") for key in tensors if key.endswith(".qweight")}
    config = _qconfigs(tmp_path / "q")
    modules = config[1]["epmq"]["modules"]
    for q in config:
        assert (q["bits"], q["group_size"]) == (4, 16)
        fused = _vllm_names(arch)
        assert set(sum(fused.values(), [])) <= on_disk
        for name, shards in fused.items():
            assert {_rule_settings(q, name)} == {(modules[s]["bits"], modules[s]["group_size"]) for s in shards}, name
        if arch == "llava":  # (the vision tower, at the base config's bits, as vLLM names it and as saved)
            for name in ("vision_tower.vision_model.encoder.layers.1.self_attn.qkv_proj",
                         "vision_tower.vision_model.encoder.layers.1.mlp.fc1",
                         "vision_tower.encoder.layers.1.mlp.fc1"):
                assert _rule_settings(q, name) == (4, 16)
        for name in on_disk:
            bits, group_size = _rule_settings(q, name)
            assert (bits, group_size) == (modules[name]["bits"], modules[name]["group_size"]), name
            qweight, scales = tensors[f"{name}.qweight"], tensors[f"{name}.scales"]
            K = qweight.shape[0] * 32 // bits
            assert tensors[f"{name}.g_idx"].tolist() == [k // (K if group_size == -1 else group_size)
                                                         for k in range(K)]
            W = independent_dequantize(tensors, dict(bits=bits, in_features=K, out_features=scales.shape[1]),
                                       name, q["checkpoint_format"])
            in_model = name if arch != "llava" else "model." + name.replace("language_model.model.", "language_model.")
            assert torch.equal(W, model.get_submodule(in_model).dequantize())
            assert _rule_settings(q, in_model) == (bits, group_size)  # (transformers' name: GPTQModel's)


@pytest.mark.parametrize("arch, main_input", [("vit", "pixel_values"), ("dinov2", "pixel_values"), ("llama", None)])
def test_a_model_whose_main_input_is_no_text_is_said_to_defeat_transformers_loader(arch, main_input, tmp_path):
    """transformers' GPTQ loader (GptqHfQuantizer._process_model_before_weight_loading) refuses, quantized or
    not, any model whose class's main_input_name is not input_ids ('We can only quantize pure text model.'):
    a quantized ViT's checkpoint was saved without a word that from_pretrained cannot load it."""
    import warnings

    model = build(arch)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16, sym=True), method="rtn", progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        epmq.save_quantized(model, tmp_path / "q")
    said = [str(w.message) for w in record if "pure text model" in str(w.message)]
    assert len(said) == (main_input is not None)
    if said:
        assert f"{type(model).__name__}'s is {main_input}" in said[0] and "epmq.load_quantized" in said[0]
        assert issubclass(next(w.category for w in record if "pure text model" in str(w.message)),
                          ckpt.ServingWarning)
        item = inputs(arch, 1, torch.Generator().manual_seed(0))[0]  # (what the warning offers serves it)
        torch.testing.assert_close(output(epmq.load_quantized(tmp_path / "q"), item), output(model, item),
                                   rtol=0, atol=0)


def test_layers_of_other_bits_are_said_to_defeat_transformers_loader(tmp_path, recwarn):
    """transformers' from_pretrained loads GPTQ checkpoints through optimum's convert_model, which reads no
    ``dynamic`` rule: it builds every layer at the config's bits and group size, so block 1's 8-bit layers
    are built as 4-bit ones and their tensors fail to load. The warnings named only vLLM, SGLang and
    GPTQModel; the one of transformers is said once, naming a layer it builds wrong, and not for a
    checkpoint of one width."""
    model = _mixed_model("llama")
    epmq.save_quantized(model, tmp_path / "q")
    said = [str(w.message) for w in recwarn if "from_pretrained" in str(w.message)]
    assert len(said) == 1 and "model.layers.1." in said[0] and "bits=8, group_size=32" in said[0], said
    recwarn.clear()
    model = _tiny_llama()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16, sym=True), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "one")
    assert not [w for w in recwarn if "from_pretrained" in str(w.message)]


@pytest.mark.parametrize("arch,named", [("qwen3_moe", ""), ("mixtral", ""), ("falcon", ", FalconLinear")])
def test_layers_transformers_cannot_build_as_gptq_are_said_to_defeat_its_loader(arch, named, tmp_path, recwarn):
    """transformers' from_pretrained builds GPTQ layers through optimum, which finds none in a block's routed
    experts fused as one module of stacked tensors (transformers 5's Qwen3MoeExperts) and takes a module for
    an nn.Linear by its exact type only (Falcon's projections are FalconLinear): it cannot load their packed
    tensors (README), but save_quantized said nothing of it. Said once, naming the first such layer (and
    its class where a subclass); a save of Llama's plain linears does not say it."""
    model = build(arch)
    fresh = copy.deepcopy(model)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16, sym=True), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    unbuilt = [name for name, m in model.named_modules()
               if isinstance(m, epmq.QuantLinear) and (arch == "falcon" or ".experts." in name)]
    assert unbuilt and not set(unbuilt) & set(_optimum_builds(_qconfigs(tmp_path / "q")[0], fresh))
    said = [str(w.message) for w in recwarn if "from_pretrained" in str(w.message)]
    assert len(said) == 1 and f"first: {unbuilt[0]}{named}" in said[0], said
    recwarn.clear()
    model = _tiny_llama()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16, sym=True), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "dense")
    assert not [w for w in recwarn if "from_pretrained" in str(w.message)]


@pytest.mark.parametrize("arch,other,module", [
    ("llama", r"layers\.0\.self_attn\.q_proj", "model.layers.0.self_attn.qkv_proj"),
    ("qwen3_moe", r"layers\.0\.mlp\.experts\.0\.", "model.layers.0.mlp.experts")])
def test_linears_engines_load_as_one_at_other_bits_are_warned_of(arch, other, module, tmp_path):
    """q_proj at 8 bits beside k/v_proj at 4 (or one expert of a block's FusedMoE): vLLM and SGLang
    build them as one module of one width and cannot load the others, which save_quantized says,
    naming it; each linear still gets its own rule (GPTQModel loads them apart)."""
    model = {"llama": _tiny_llama, "qwen3_moe": lambda: build("qwen3_moe")}[arch]()
    epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=32, sym=True), method="rtn", layers=other,
                        progress=False)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16, sym=True), method="rtn", progress=False)
    with pytest.warns(UserWarning, match="build as one") as record:
        epmq.save_quantized(model, tmp_path / "q")
    said = [str(w.message) for w in record if "build as one" in str(w.message)]
    assert len(said) == 1 and f"first: {module} (" in said[0]
    for q in _qconfigs(tmp_path / "q"):
        for name, m in model.named_modules():
            if isinstance(m, epmq.QuantLinear):
                assert _rule_settings(q, name) == (m.bits, m.group_size), name


def test_layers_gptq_marlin_cannot_take_under_a_marlin_config_are_warned_of(tmp_path, recwarn):
    """The config's own 4-bit symmetric groups of 32 make vLLM and SGLang pick GPTQ Marlin for the
    whole checkpoint, and its dynamic rules then give block 1 3 bits, which Marlin refuses
    ('Unsupported quantization config: bits=3, sym=True'); said, with quantization='gptq' to serve it,
    and not 'served on their plain GPTQ kernel', which they would not pick by themselves."""
    model = _tiny_llama()
    epmq.quantize_model(model, epmq.QuantSpec(bits=3, group_size=32, sym=True), method="rtn",
                        layers=r"layers\.1\.", progress=False)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=32, sym=True), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    said = [str(w.message) for w in recwarn if "Marlin" in str(w.message)]
    assert len(said) == 1 and "quantization='gptq'" in said[0] and "bits=3" in said[0]
    q = _qconfigs(tmp_path / "q")[0]
    assert (q["bits"], q["group_size"], q["sym"]) == (4, 32, True)
    assert _rule_settings(q, "model.layers.1.mlp.gate_up_proj") == (3, 32)
    recwarn.clear()
    model = _tiny_llama()  # (a 4-bit config of groups of 16: plain GPTQ for all, as the warning said)
    epmq.quantize_model(model, epmq.QuantSpec(bits=3, group_size=16, sym=True), method="rtn",
                        layers=r"layers\.1\.", progress=False)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16, sym=True), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "plain")
    said = [str(w.message) for w in recwarn if "Marlin" in str(w.message)]
    assert len(said) == 1 and "plain GPTQ kernel" in said[0]


def test_routed_experts_gptq_marlin_cannot_take_are_not_offered_vllms_plain_gptq(tmp_path, recwarn):
    """Block 1 at 3 bits under a 4-bit symmetric config of groups of 32 (GPTQ Marlin, which refuses the rule's
    3 bits): quantization='gptq' was offered as serving every layer, but vLLM's plain GPTQ path hands every
    FusedMoE to MoE WNA16 built from the config's bits alone, reading no dynamic rule (gptq.py's FusedMoE branch,
    MoeWNA16Config.from_config at vllm-project/vllm ca3fff65bc7d65026d67c76b678aa667615bb710: vLLM before its GPTQ
    consolidation, vllm-project/vllm#38288, which removed that path), so block 1's 3-bit experts load there neither;
    the warning says so, naming them."""
    model = build("qwen3_moe")
    epmq.quantize_model(model, epmq.QuantSpec(bits=3, group_size=32, sym=True), method="rtn",
                        layers=r"layers\.1\.", progress=False)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=32, sym=True), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    said = [str(w.message) for w in recwarn if "Marlin refuses" in str(w.message)]
    assert len(said) == 1 and "quantization='gptq'" in said[0]
    assert "MoE WNA16" in said[0] and "model.layers.1.mlp.experts." in said[0]


def test_a_peers_checkpoint_whose_dynamic_rules_give_other_bits_loads_without_g_idx(tmp_path):
    """A checkpoint of another writer (no epmq section) whose ``dynamic`` rules give block 1 8 bits in
    groups of 32, and no g_idx (the inputs counted off the packed words): the words were counted at the
    config's 4 bits and the layer refused ('qweight (32, 64) packs no whole bit width for 256 inputs');
    each layer's inputs, bits and groups are read at the bits its rule gives, as engines read them."""
    model = _mixed_model("llama")
    epmq.save_quantized(model, tmp_path / "q")
    _as_foreign(tmp_path / "q")
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    ckpt._write_tensors({k: t for k, t in tensors.items() if not k.endswith(".g_idx")},
                        tmp_path / "q" / "model.safetensors")
    loaded = epmq.load_quantized(tmp_path / "q")
    for name, m in model.named_modules():
        if isinstance(m, epmq.QuantLinear):
            assert (loaded.get_submodule(name).bits, loaded.get_submodule(name).group_size) == (m.bits, m.group_size)
    x = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    for rules, message in (({r"+:model\.layers\.1\.": {"bits": 5}}, r"gives model\.layers\.1\..*bits must be one of"),
                           ({"+:model.layers.(1": {"bits": 8}}, r"'\+:model\.layers\.\(1' is no regular expression")):
        for name in ("quantize_config.json", "config.json"):
            config = json.loads((tmp_path / "q" / name).read_text())
            config.get("quantization_config", config)["dynamic"] = rules
            (tmp_path / "q" / name).write_text(json.dumps(config))
        with pytest.raises(ValueError, match=message):
            epmq.load_quantized(tmp_path / "q")


@pytest.mark.parametrize("version", ["2.5", "3"])
def test_dynamic_rules_of_a_vlm_match_the_names_vllm_loads_its_language_model_under(version, tmp_path):
    """vLLM loads Qwen2.5-VL's language model, saved as ``model.layers.*``, and Qwen3-VL's, saved as
    ``model.language_model.layers.*``, under ``language_model.model.layers.*`` (their hf_to_vllm_mapper)
    and matches the dynamic rules against those names, which the rules of the saved names missed: the
    8-bit block was built at the config's 4 bits (by GPTQModel too, which matches transformers' names,
    Qwen2.5-VL's ``model.language_model.layers.*``). The rules match all of them (and the vision
    tower's ``visual.blocks.*``, as vLLM names it, keeps the config's)."""
    from test_walker_towers import tiny_qwen2_vl, tiny_qwen3_vl

    model = tiny_qwen2_vl("2.5") if version == "2.5" else tiny_qwen3_vl()
    epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=32, sym=True), method="rtn",
                        layers=r"language_model\.layers\.1\.", progress=False)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16, sym=True), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    modules = _qconfigs(tmp_path / "q")[1]["epmq"]["modules"]
    lead = "model.layers" if version == "2.5" else "model.language_model.layers"
    assert f"{lead}.1.self_attn.q_proj" in modules
    for q in _qconfigs(tmp_path / "q"):
        for i, kind in ((0, (4, 16)), (1, (8, 32))):
            for vllm in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
                assert _rule_settings(q, f"language_model.model.layers.{i}.{vllm}") == kind, vllm
            for saved in ("self_attn.q_proj", "mlp.down_proj"):
                assert _rule_settings(q, f"{lead}.{i}.{saved}") == kind
        assert _rule_settings(q, "visual.blocks.1.attn.qkv") == (4, 16)
        assert _rule_settings(q, "visual.blocks.1.attn.proj") == (4, 16)
        for name, m in model.named_modules():  # (transformers' names, which GPTQModel matches them against)
            if isinstance(m, epmq.QuantLinear):
                assert _rule_settings(q, name) == (m.bits, m.group_size), name


def test_a_vlms_linears_left_in_full_precision_are_named_as_engines_name_them(tmp_path):
    """Qwen2.5-VL's language model quantized in part: the ``-:`` rules named its float linears as
    saved (``model.layers.1.mlp.down_proj``), which neither vLLM (``language_model.model.layers...``,
    its hf_to_vllm_mapper's) nor GPTQModel through transformers (``model.language_model.layers...``)
    matched, so they built those linears as GPTQ layers and failed on their float weights."""
    from test_walker_towers import tiny_qwen2_vl

    model = tiny_qwen2_vl("2.5")
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16, sym=True), method="rtn", progress=False,
                        layers=lambda n: "language_model" in n and n != "model.language_model.layers.1.mlp.down_proj")
    epmq.save_quantized(model, tmp_path / "q")
    for q in _qconfigs(tmp_path / "q"):
        rules = list(q["dynamic"])
        for lead in ("language_model.model.layers", "model.language_model.layers", "model.layers"):
            assert _vllm_builds_unquantized(rules, f"{lead}.1.mlp.down_proj")
            assert not _vllm_builds_unquantized(rules, f"{lead}.0.mlp.down_proj")
            assert not _vllm_builds_unquantized(rules, f"{lead}.1.mlp.gate_up_proj")


@pytest.mark.parametrize("hidden, inter, first", [(128, 96, "model.layers.0.mlp.down_proj"), (128, 128, None),
                                                  (64, 128, "model.layers.0.self_attn.q_proj")])
def test_act_order_linears_off_marlin_s_tiles_are_warned_of(gen, tmp_path, hidden, inter, first):
    """vLLM's GPTQ Marlin pads a linear's widths to its tiles except under act-order, where it takes in_features
    that are a multiple of 128 and out_features of 64 only (MarlinLinearKernel.can_implement at vllm-project/vllm
    055e47c28003156421365af985d676fc921cb075), as vLLM loads them: gate/up of 96 outputs each are one gate_up_proj
    of 192, which fits, and down_proj's 96 inputs do not. Elsewhere vLLM needs another kernel that reads g_idx,
    and a bfloat16 model off Hopper has none; the warnings said nothing of it."""
    said = _act_order_saved(_tiny_llama(hidden, inter), gen, tmp_path, "GPTQ Marlin does not take with act-order")
    assert len(said) == (first is not None)
    if said:
        assert f"(first: {first}, " in said[0] and "static_groups=True" in said[0], said[0]


def _vllm_desc_act(q, prefix):
    """Whether vLLM's AutoGPTQConfig builds the module ``prefix`` reading its g_idx: the config's desc_act, read as
    false per channel (AutoGPTQConfig.__init__), then the first ``+:`` rule matching it (override_config)."""
    import re

    desc_act = q["desc_act"] and q["group_size"] != -1
    for rule, override in q.get("dynamic", {}).items():
        if re.match(rule[2:] if rule[:2] in ("-:", "+:") else rule, prefix):
            return override.get("desc_act", desc_act)
    return desc_act


@pytest.mark.parametrize("base, other", [(-1, 32), (32, -1)])
def test_rules_of_act_order_layers_say_their_desc_act(gen, tmp_path, base, other):
    """A per-channel config (group_size -1) with block 1's MLP quantized in groups of 32 with act-order wrote
    desc_act true, which vLLM's AutoGPTQConfig turns off per channel, and rules of bits and group size only:
    vLLM built those grouped layers without their g_idx, served wrong without an error. The rules say desc_act
    where the config's, as vLLM reads it, is not the layers' (grouped under per channel, and the other way round)."""
    model = _tiny_llama()
    calibration = {"t": [torch.randint(0, 64, (1, 16), generator=gen) for _ in range(2)]}
    for group, layers in ((other, r"model\.layers\.1\.mlp\."), (base, None)):
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=group, sym=True, act_order=True),
                            method="gptq", calibration=calibration, backend="torch", layers=layers, progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    modules = _qconfigs(tmp_path / "q")[1]["epmq"]["modules"]
    for q in _qconfigs(tmp_path / "q"):
        assert (q["group_size"], q["desc_act"]) == (base, True)  # (some g_idx permuted)
        for name, shards in _vllm_names("llama").items():
            assert {_vllm_desc_act(q, name)} == {modules[s]["group_size"] != -1 for s in shards}, name


def test_act_order_warnings_read_desc_act_as_vllm_does_per_layer(gen, tmp_path):
    """vLLM reads a per-channel config's desc_act as false (AutoGPTQConfig) and a rule's own per layer. The serving
    warnings read the config's as such everywhere: routed experts left in full precision beside a per-channel
    config were warned of as off MoE Marlin's act-order tiles (an intermediate width of 96, which vLLM pads
    without act-order), and grouped act-order layers under a per-channel config, which their rules give act-order,
    were not warned of when GPTQ Marlin does not take their widths with it."""
    import warnings

    calibration = {"t": [torch.randint(0, 64, (1, 16), generator=gen) for _ in range(2)]}

    def said(model, name):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            epmq.save_quantized(model, tmp_path / name)
        assert _qconfigs(tmp_path / name)[0]["desc_act"] is True
        return " ".join(str(w.message) for w in record)

    def quantize(model, group, layers):  # (per channel: one group, whose order RTN's is as good as GPTQ's)
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=group, sym=True, act_order=True),
                            method="gptq" if group != -1 else "rtn", calibration=calibration, backend="torch",
                            layers=layers, progress=False)

    model = _qwen3_moe(128, 96)
    quantize(model, 32, r"model\.layers\.1\.self_attn\.o_proj")
    quantize(model, -1, "self_attn")
    assert "MoE Marlin does not take" not in said(model, "moe")
    model = _tiny_llama()  # (gate/up's 64 inputs: no multiple of 128)
    quantize(model, 32, r"model\.layers\.1\.mlp\.")
    quantize(model, -1, None)
    message = said(model, "llama")
    assert "1 act-order linears of widths vLLM's GPTQ Marlin does not take" in message, message
    assert "(first: model.layers.1.mlp.gate_proj, 64 inputs, 256 outputs" in message, message


def test_the_ties_of_a_model_of_a_text_encoder_and_a_decoder_are_read_from_the_decoder():
    """tie_order asks whether the config unties transformers' default ties (``tie_word_embeddings``)
    of the text config: MusicGen's holds a text encoder's and a decoder's, which transformers refuses
    to choose between, so asking ended in its 'Multiple valid text configs' error; the decoder's is read."""
    from transformers import EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, T5Config

    from epmq.checkpoint_io import _ties_off

    text = T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)
    audio = EncodecConfig(hidden_size=8, num_filters=4, codebook_size=16, codebook_dim=8, upsampling_ratios=[2, 2],
                          num_residual_layers=1, sampling_rate=16, target_bandwidths=[1.5])
    for tied in (True, False):
        decoder = MusicgenDecoderConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                                        ffn_dim=32, num_codebooks=2, tie_word_embeddings=tied)
        config = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=audio.to_dict(), decoder=decoder.to_dict())
        assert _ties_off(_WithConfig(config)) is not tied


class _WithConfig(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config


def _act_order_saved(model, gen, tmp_path, match: str) -> list:
    """The messages saying ``match`` that save_quantized gives of ``model`` quantized by GPTQ with act-order
    (4-bit, groups of 32), its config's desc_act true."""
    import warnings

    calibration = {"t": [torch.randint(0, 64, (1, 16), generator=gen) for _ in range(2)]}
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=32, sym=True, act_order=True), method="gptq",
                        calibration=calibration, backend="torch", progress=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        epmq.save_quantized(model, tmp_path / "q")
    assert _qconfigs(tmp_path / "q")[0]["desc_act"] is True
    return [str(w.message) for w in record if match in str(w.message)]
