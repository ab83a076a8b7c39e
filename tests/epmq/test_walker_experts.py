"""Expert checkpoints in the forms they come in, matched to the merged model's tensor names."""

import functools
import json
import sys
import warnings
from collections import namedtuple

import pytest
import torch
from safetensors.torch import save_file

import epmq
from epmq.experts import ExpertWeights
from test_walker_models import Family, build


def _names(model):
    return list(model.state_dict())


def test_sharded_hf_directory(tmp_path):
    model = build("llama")
    model.save_pretrained(tmp_path / "e", max_shard_size="20KB")
    assert (tmp_path / "e" / "model.safetensors.index.json").is_file()
    expert = ExpertWeights(str(tmp_path / "e"), task="t")
    expert.bind(_names(model))
    for name, t in model.state_dict().items():
        if expert.key_for(name) is not None:
            assert torch.equal(expert.read(name), t)
    assert expert.shape("model.layers.1.mlp.down_proj.weight") == (32, 64)


def test_a_directory_is_read_as_from_pretrained_reads_it(tmp_path):
    """``save_pretrained`` into a directory that held a sharded save deletes the shards but
    leaves their index beside the new ``model.safetensors``; ``from_pretrained`` reads the
    single file, and so must an expert's or a merge's reader (it took the stale index, and
    refused the checkpoint for its missing shards)."""
    model = build("llama")
    model.save_pretrained(tmp_path / "e", max_shard_size="20KB")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(1.0)
    model.save_pretrained(tmp_path / "e")  # (one file now, the old index left behind)
    assert (tmp_path / "e" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "e" / "model.safetensors").is_file()
    expert = ExpertWeights(str(tmp_path / "e"), task="t")
    expert.bind(_names(model))
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(expert.read(name), model.state_dict()[name])


def test_expert_by_hub_id(tmp_path, monkeypatch):
    """An ``org/name`` that is no local path is a HF hub repository: here one in the hub's cache
    layout, read offline (what ``HF_HUB_OFFLINE=1`` does after a first download)."""
    import huggingface_hub.constants as hub

    model = build("llama")
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--org--expert"
    model.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # (so that "org/expert" is not a path by chance)
    expert = ExpertWeights("org/expert", task="t")
    expert.bind(_names(model))
    for name, t in model.state_dict().items():
        assert torch.equal(expert.read(name), t)
    with pytest.raises(FileNotFoundError, match=r"task 't'.*'org/missing' could not be fetched from the HF hub"):
        ExpertWeights("org/missing", task="t")
    with pytest.raises(FileNotFoundError, match="not found"):
        ExpertWeights("./org/missing", task="t")  # a relative path, not a hub id


def test_transformers4_clip_checkpoint_with_the_vision_model_prefix(tmp_path):
    """transformers 5 flattened CLIPVisionModel; checkpoints saved by 4.x keep ``vision_model.``."""
    model = build("hf_clip_vision")
    prefixed = {f"vision_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(prefixed, str(tmp_path / "e.safetensors"))
    expert = ExpertWeights(str(tmp_path / "e.safetensors"), task="t")
    expert.bind(_names(model))
    name = "encoder.layers.0.self_attn.q_proj.weight"
    assert expert.key_for(name) == f"vision_model.{name}"
    assert torch.equal(expert.read(name), model.state_dict()[name])


def test_vit_checkpoint_in_the_hub_naming(tmp_path):
    """transformers 5 renamed ViT's modules (``encoder.layer.N.attention.attention.query`` ->
    ``layers.N.attention.q_proj``) and still saves in the old naming, as hub checkpoints of
    ``ViTForImageClassification`` are (with ``vit.``): found through the model's renaming."""
    from epmq.checkpoint_io import key_renaming

    model = build("vit")
    model.save_pretrained(tmp_path / "saved")
    name = "layers.1.attention.q_proj.weight"
    expert = ExpertWeights(str(tmp_path / "saved"), task="t")
    assert name not in expert.keys()
    expert.bind(_names(model), rename=key_renaming(model))
    assert expert.key_for(name) == "encoder.layer.1.attention.attention.query.weight"
    for n, t in model.state_dict().items():
        assert torch.equal(expert.read(n), t), n
    hub = {f"vit.{k}": expert.reader.get(k) for k in expert.keys()}
    save_file(hub, str(tmp_path / "hub.safetensors"))
    expert = ExpertWeights(str(tmp_path / "hub.safetensors"), task="t")
    expert.bind(_names(model), rename=key_renaming(model))
    assert expert.key_for(name) == "vit.encoder.layer.1.attention.attention.query.weight"
    assert torch.equal(expert.read(name), model.state_dict()[name])
    unrenamed = ExpertWeights(str(tmp_path / "hub.safetensors"), task="t")
    unrenamed.bind(_names(model))
    assert unrenamed.key_for(name) is None


def test_full_open_clip_checkpoint_for_the_visual_tower(tmp_path):
    """A VisionTransformer merged model, experts saved as whole CLIP models: the text tower's
    unprefixed ``transformer.resblocks.*`` must not be taken for the visual one."""
    clip = build("open_clip_clip")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}, tmp_path / "e.pt")
    expert = ExpertWeights(str(tmp_path / "e.pt"), task="t")
    expert.bind(_names(clip.visual))
    name = "transformer.resblocks.0.attn.in_proj_weight"
    assert expert.key_for(name) == f"module.visual.{name}"
    assert torch.equal(expert.read(name), clip.visual.state_dict()[name])


def test_a_ddp_wrapped_visual_tower_saved_alone_is_the_visual_tower(tmp_path):
    """``torch.save(DDP(clip.visual).state_dict())``: "module.conv1.weight" is the full CLIP's
    "visual.conv1.weight" (a leading part stripped and another added), not a text-tower tensor
    that the same rest of a name ends ("module.transformer.resblocks.*")."""
    clip = build("open_clip_clip")
    torch.save({f"module.{k}": v for k, v in clip.visual.state_dict().items()}, tmp_path / "v.pt")
    expert = ExpertWeights(str(tmp_path / "v.pt"), task="t")
    expert.bind(_names(clip))
    name = "visual.transformer.resblocks.0.attn.in_proj_weight"
    assert expert.key_for(name) == "module.transformer.resblocks.0.attn.in_proj_weight"
    assert expert.key_for("transformer.resblocks.0.attn.in_proj_weight") is None  # the text tower's
    assert torch.equal(expert.read(name), clip.state_dict()[name])


def test_two_copies_of_the_model_in_one_checkpoint_are_refused(tmp_path):
    """A Lightning checkpoint with the trained weights ("model.") and an EMA copy
    ("ema_model.module."): nothing says which is the expert, so neither is taken."""
    model = build("llama")
    state = model.state_dict()
    ema = {f"ema_model.module.{k}": v * 0.5 for k, v in state.items()}
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in state.items()}, **ema}, "epoch": 1},
               tmp_path / "last.ckpt")
    expert = ExpertWeights(str(tmp_path / "last.ckpt"), task="t")
    with pytest.raises(ValueError, match=r"task 't' .* several copies \('.*' is both 'ema_model.module.*' and 'model."):
        expert.bind(_names(model))
    # timm's and others' nested form: the EMA beside the wrapper, under the same names
    for wrapper, twin in (("state_dict", "state_dict_ema"), ("model", "model_ema")):
        torch.save({wrapper: state, twin: {k: v * 0.5 for k, v in state.items()}, "epoch": 3},
                   tmp_path / "nested.pth")
        with pytest.raises(ValueError, match=f"task 't': .*nested.pth holds the model twice, under '{wrapper}' and "
                                             f"'{twin}'"):
            ExpertWeights(str(tmp_path / "nested.pth"), task="t").bind(_names(model))
    # nor are other tensors of the model's names under a key that says no average (DeepSpeed's
    # frozen_param_fragments beside its module)
    torch.save({"module": state, "frozen_param_fragments": {k: v for k, v in list(state.items())[:2]}},
               tmp_path / "mp_rank_00_model_states.pt")
    ExpertWeights(str(tmp_path / "mp_rank_00_model_states.pt"), task="t").bind(_names(model))
    # an optimizer's state beside the weights is no second copy
    torch.save({"state_dict": state, "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": []}},
               tmp_path / "with_optimizer.pth")
    ExpertWeights(str(tmp_path / "with_optimizer.pth"), task="t").bind(_names(model))
    # one copy alone binds
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, tmp_path / "one.ckpt")
    expert = ExpertWeights(str(tmp_path / "one.ckpt"), task="t")
    expert.bind(_names(model))
    assert expert.key_for("lm_head.weight") == "model.lm_head.weight"


def test_quantize_a_visual_tower_with_full_clip_experts(gen, tmp_path):
    fam = Family("open_clip_clip", gen)
    merged = fam.merged().visual
    experts = {}
    for task, expert in fam.experts.items():
        save_file({k: v.contiguous() for k, v in expert.state_dict().items()}, str(tmp_path / f"{task}.safetensors"))
        experts[task] = str(tmp_path / f"{task}.safetensors")
    calibration = {t: [item["image"] for item in items] for t, items in fam.calibration.items()}
    epmq.quantize_model(merged, epmq.QuantSpec(bits=4, group_size=16), method="epmq", targets="expert_path",
                        calibration=calibration, experts=experts, backend="torch", progress=False)
    assert len(merged.epmq_report.layers) == 8


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_llama4_experts_read_from_either_checkpoint_layout(layout, gen, tmp_path, monkeypatch):
    """Llama 4 checkpoints hold the experts fused and transposed, ``experts.gate_up_proj
    [E, H, 2I]`` and ``experts.down_proj [E, I, H]`` (the hub's, and what save_pretrained
    writes), or per expert as nn.Linear holds them, ``experts.{e}.gate_proj.weight [I, H]``:
    E-PMQ reads each expert projection's weight from either, as the expert computes with it."""
    from epmq.stats import EPMQStats

    fam = Family("llama4", gen, tasks=["a"])
    expert = fam.experts["a"]
    fused = expert.model.layers[1].feed_forward.experts
    inner = fused.gate_up_proj.shape[2] // 2
    want = {"gate_proj": lambda e: fused.gate_up_proj[e, :, :inner].T,
            "up_proj": lambda e: fused.gate_up_proj[e, :, inner:].T,
            "down_proj": lambda e: fused.down_proj[e].T}
    prefix = "model.layers.1.feed_forward.experts"
    if layout == "fused":
        expert.save_pretrained(tmp_path / "e")
        path = tmp_path / "e"
        keys = ExpertWeights(str(path)).keys()
        assert f"{prefix}.gate_up_proj" in keys and not any(f"{prefix}.0." in k for k in keys)
    else:
        state = {k: v for k, v in expert.state_dict().items() if not k.startswith(f"{prefix}.")}
        state.update({f"{prefix}.{e}.{p}.weight": w(e) for e in range(len(fused.gate_up_proj))
                      for p, w in want.items()})
        path = tmp_path / "e.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    read = {}
    begin_task = EPMQStats.begin_task

    def spy(self, W, weight=None, name=None, **kw):
        read[name.rpartition(" at ")[2]] = W.clone()
        return begin_task(self, W, weight, name, **kw)

    monkeypatch.setattr(EPMQStats, "begin_task", spy)
    epmq.quantize_model(fam.merged(), epmq.QuantSpec(bits=4, group_size=16), method="epmq",
                        calibration=fam.calibration, experts={"a": str(path)}, layers=r"\.experts\.",
                        backend="torch", progress=False)
    assert {name.rpartition(".")[2] for name in read} == set(want)
    for name, W in read.items():
        e, projection = name.split(".")[-2:]
        assert name.startswith(f"{prefix}.") and torch.equal(W, want[projection](int(e))), name


def test_a_tied_tensor_is_read_under_any_of_its_aliases():
    """``bind(aliases=)``: a checkpoint that saved a tied tensor under
    one name only (the embeddings) gives it for the other (the head)."""
    g = torch.Generator().manual_seed(0)
    state = {"embed.weight": torch.randn(6, 4, generator=g), "layer.weight": torch.randn(4, 4, generator=g)}
    expert = ExpertWeights(dict(state), task="t")
    expert.bind(["embed.weight", "layer.weight", "head.weight"], aliases={"head.weight": ["embed.weight"]})
    assert expert.key_for("head.weight") == "embed.weight"
    assert torch.equal(expert.read("head.weight"), state["embed.weight"])
    unaliased = ExpertWeights(dict(state), task="t")
    unaliased.bind(["embed.weight", "layer.weight", "head.weight"])
    assert unaliased.key_for("head.weight") is None


def test_an_swa_copy_beside_the_weights_is_refused(tmp_path):
    """An averaged copy under a key naming SWA is a second copy."""
    model = build("llama")
    state = model.state_dict()
    torch.save({"state_dict": state, "swa_state_dict": {k: v * 0.5 for k, v in state.items()}}, tmp_path / "s.pth")
    with pytest.raises(ValueError, match="holds the model twice, under 'state_dict' and 'swa_state_dict'"):
        ExpertWeights(str(tmp_path / "s.pth"), task="t").bind(_names(model))


def test_expert_weights_are_read_onto_the_solve_device(gen, monkeypatch):
    """The merged-path statistics read each expert's linear weights onto the device the block is
    solved on (from the CPU, where the read-ahead read them), so that their values are checked
    there (twice: the reader, the statistics) instead of in two CPU passes per expert (about
    1.8 s a Llama-8B block with 8 experts on a 2-core CPU, the host time E-PMQ's walks spent
    beyond GPTQ's on a GPU)."""
    fam = Family("open_clip_clip", gen)
    merged = fam.merged().visual
    experts = {task: {f"visual.{k}" if not k.startswith("visual.") else k: v
                      for k, v in expert.state_dict().items()}
               for task, expert in fam.experts.items()}
    checked = []
    check = ExpertWeights.check_values

    def spy(self, name, tensor):
        checked.append((name, tensor.device, tensor.dim()))
        return check(self, name, tensor)

    monkeypatch.setattr(ExpertWeights, "check_values", spy)
    calibration = {t: [item["image"] for item in items] for t, items in fam.calibration.items()}
    epmq.quantize_model(merged, epmq.QuantSpec(bits=4, group_size=16), method="epmq",
                        calibration=calibration, experts=experts, backend="torch", progress=False)
    linear_reads = [(name, device) for name, device, dim in checked if dim == 2]
    assert len(linear_reads) == len(merged.epmq_report.layers) * len(experts)
    assert all(device == torch.device("cpu") for _, device in linear_reads)


def _fetch_threads(monkeypatch):
    """(name, thread) of every expert tensor read, by the walk or its read-ahead."""
    import threading

    seen = []
    fetch = ExpertWeights.fetch

    def spy(self, name, index=None):
        seen.append((str(name), threading.current_thread().name))
        return fetch(self, name, index)

    monkeypatch.setattr(ExpertWeights, "fetch", spy)
    return seen


@pytest.mark.parametrize("arch,targets", [("llama", "merged_path"), ("qwen3_moe", "merged_path"),
                                          ("llama", "fp_path")])
def test_the_read_ahead_reads_in_the_background_and_changes_nothing(arch, targets, gen, tmp_path,
                                                                    monkeypatch):
    """Experts in files: their linear weights are read by the read-ahead's thread while the walk
    runs, and the quantized model is bit for bit the one of a walk that reads them in line, or
    with a budget of one tensor (every take then waits on, or does, the read: no deadlock), or
    with an MoE's experts some task's tokens never reach (their planned reads dropped)."""
    import epmq.walker as walker

    fam = Family(arch, gen)
    experts = {}
    for task, expert in fam.experts.items():
        path = tmp_path / f"{task}.safetensors"
        save_file({k: v.contiguous() for k, v in expert.state_dict().items()}, str(path))
        experts[task] = str(path)
    spec = epmq.QuantSpec(bits=4, group_size=16)
    models = {}
    for budget in (walker.EXPERT_READ_AHEAD_BYTES, 1, 0):
        with monkeypatch.context() as m:
            m.setattr(walker, "EXPERT_READ_AHEAD_BYTES", budget)
            seen = _fetch_threads(m)
            model = fam.merged()
            epmq.quantize_model(model, spec, method="epmq", targets=targets, calibration=fam.calibration,
                                experts=experts, backend="torch", progress=False)
        background = [name for name, thread in seen if thread.startswith("epmq-read-ahead")]
        assert bool(background) == (budget > 0), budget
        # (linears' weights only: an MoE's fused experts read by their rows)
        assert not any("norm" in name or "embed" in name for name in background)
        assert model.epmq_report.expert_read_seconds >= 0
        models[budget] = model.state_dict()
    for budget in (1, 0):
        assert models[budget].keys() == models[walker.EXPERT_READ_AHEAD_BYTES].keys()
        for k, v in models[walker.EXPERT_READ_AHEAD_BYTES].items():
            assert torch.equal(models[budget][k], v), (budget, k)


def test_a_bad_expert_read_ahead_is_reported_as_before(gen, tmp_path):
    """A NaN in an expert's weight, found by the read-ahead's read: the walk's own error, naming
    the task and tensor, and the model is left as it was."""
    fam = Family("llama", gen)
    state = {k: v.clone().contiguous() for k, v in fam.experts["dtd"].state_dict().items()}
    name = next(k for k in state if k.endswith("mlp.up_proj.weight"))
    state[name][0, 0] = float("nan")
    save_file(state, str(tmp_path / "dtd.safetensors"))
    experts = dict(fam.experts, dtd=str(tmp_path / "dtd.safetensors"))
    model = fam.merged()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"task 'dtd'.*up_proj.weight.*non-finite"):
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq",
                            calibration=fam.calibration, experts=experts, backend="torch", progress=False)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_a_bad_expert_of_an_moe_saved_one_tensor_an_expert_is_named(gen, tmp_path):
    """transformers 5 saves an MoE's experts one tensor each (the model fuses them): a NaN in one
    is reported under that tensor's own name, not the fused one the checkpoint does not hold."""
    from safetensors.torch import load_file

    fam = Family("qwen3_moe", gen)
    fam.experts["dtd"].save_pretrained(tmp_path / "dtd")
    path = next((tmp_path / "dtd").glob("*.safetensors"))
    state = load_file(str(path))
    name = "model.layers.0.mlp.experts.1.up_proj.weight"
    assert name in state
    state[name][0, 0] = float("nan")
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"task 'dtd'.*tensor '{name}' has non-finite"):
        epmq.quantize_model(fam.merged(), epmq.QuantSpec(bits=4, group_size=16), method="epmq",
                            calibration=fam.calibration, experts=dict(fam.experts, dtd=str(tmp_path / "dtd")),
                            backend="torch", progress=False)


@pytest.mark.cuda
def test_a_cpu_walk_reads_experts_held_on_the_gpu(gen):
    """Expert state dicts on the GPU, the walk on the CPU: each weight's copy to the host is
    waited for before its check and statistics read it (a non-blocking device-to-host copy
    would be read half-written); the same model as with the experts on the CPU."""
    fam = Family("llama", gen)
    spec = epmq.QuantSpec(bits=4, group_size=16)
    models = []
    for device in ("cpu", "cuda"):
        experts = {t: {k: v.to(device) for k, v in e.state_dict().items()} for t, e in fam.experts.items()}
        model = fam.merged()
        epmq.quantize_model(model, spec, method="epmq", calibration=fam.calibration, experts=experts,
                            backend="torch", progress=False)
        models.append(model.state_dict())
    assert all(torch.equal(models[1][k], v) for k, v in models[0].items())


def test_expert_tensors_the_merged_blocks_lack_are_warned_of_on_the_expert_path():
    """An expert with q/k/v and MLP biases (a Qwen2-style checkpoint of a bias-free Llama's
    shapes): the expert path runs the merged model's blocks, which have no biases, so its
    targets are not the expert's outputs. Warned, naming a tensor; the other paths read only the
    linears' weights and say nothing."""
    import transformers

    def llama(seed, **kw):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, **kw)).eval()

    biased = llama(1, attention_bias=True, mlp_bias=True).state_dict()
    calibration = {"a": [torch.randint(0, 64, (2, 8))]}
    for targets, warned in (("expert_path", True), ("merged_path", False)):
        model = llama(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", calibration=calibration,
                                experts={"a": biased}, targets=targets, backend="torch", progress=False)
        said = [str(w.message) for w in caught if "lack" in str(w.message)]
        assert bool(said) == warned
        if warned:
            assert "'a'" in said[0] and "q_proj.bias" in said[0] and "more" in said[0]
    # no false alarm: an expert of the model's own architecture with the buffers old checkpoints
    # saved (per-layer rotary inv_freq, which transformers drops), walked in two calls (the
    # second finds the first's layers packed)
    own = dict(llama(2).state_dict(), **{f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(4)
                                         for i in range(2)})
    model = llama(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for layers in ("self_attn", "mlp"):
            epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", calibration=calibration,
                                experts={"a": own}, targets="expert_path", layers=layers, backend="torch",
                                progress=False)
    assert not [w for w in caught if "lack" in str(w.message)]


def test_an_expert_given_as_a_lazy_state_dict_is_read_once(gen, tmp_path, monkeypatch):
    """The benches hand their experts to the walk as ``LazyStateDict``s over checkpoints on disk:
    the walk's shape checks take the shapes from the file, so each expert tensor is read from
    disk once, as when the expert is given by its path (they read every tensor whole, a second
    read of every expert)."""
    from epmq import checkpoint_io
    from epmq.checkpoint_io import open_state

    fam = Family("llama", gen)
    lazy = {}
    for task, model in fam.experts.items():
        model.save_pretrained(tmp_path / task)
        lazy[task] = open_state(tmp_path / task, fam.merged(), what=f"expert {task}")
    reads = {}
    get = checkpoint_io.CheckpointReader.get

    def counted(self, key, index=None):
        if self.path is not None:  # (a read from a file, under the lazy state dict)
            reads[self.path, key] = reads.get((self.path, key), 0) + 1
        return get(self, key, index)

    monkeypatch.setattr(checkpoint_io.CheckpointReader, "get", counted)
    epmq.quantize_model(fam.merged(), epmq.QuantSpec(bits=4, group_size=16), method="epmq",
                        calibration=fam.calibration, experts=lazy, progress=False)
    assert reads and set(reads.values()) == {1}
    assert ExpertWeights(lazy["cars"], task="cars").shape("model.layers.0.mlp.down_proj.weight") == (32, 64)


@pytest.mark.parametrize("index", ['{"metadata": {}, "weight_map": {"model.embed', '{"metadata": {}}', '[]',
                                   '{"weight_map": ["model-00001-of-00002.safetensors"]}'])
def test_a_damaged_shard_index_is_named(index, tmp_path):
    """A shard index cut short (an interrupted download) or without its weight map: the error
    names the expert and the index, not a bare JSONDecodeError or KeyError."""
    build("llama").save_pretrained(tmp_path / "e", max_shard_size="20KB")
    (tmp_path / "e" / "model.safetensors.index.json").write_text(index)
    with pytest.raises(ValueError, match=r"task 't'.*model\.safetensors\.index\.json"):
        ExpertWeights(str(tmp_path / "e"), task="t")


def test_a_shard_index_of_many_tensors_is_opened_with_one_path_a_shard(tmp_path):
    """A reader of a shard index held one Path object a tensor (an MoE model's index lists ~100k:
    DeepSeek-V3's experts and their scales), each parsed anew, and checked each for its file: 4 s
    and 32 MB for 77k tensors, per expert and per call that opens one. The tensors of a shard
    share its path: what a reader holds is about its keys' own size."""
    import json
    import tracemalloc

    from epmq.checkpoint_io import CheckpointReader

    weight_map = {}
    for shard in range(2):
        name = f"model-{shard + 1:05d}-of-00002.safetensors"
        keys = [f"model.layers.{shard}.mlp.experts.{e}.{p}.weight" for e in range(5000)
                for p in ("gate_proj", "up_proj")]
        save_file({k: torch.zeros(0) for k in keys}, str(tmp_path / name))
        weight_map.update(dict.fromkeys(keys, name))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    keys_bytes = sum(sys.getsizeof(k) for k in weight_map)
    tracemalloc.start()
    try:
        reader = CheckpointReader(tmp_path)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert set(reader.keys()) == set(weight_map)
    assert held < 2 * keys_bytes, (held, keys_bytes)  # (a Path each: 4.7 x; 1.2 x now)
    reader.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_torch_pickle_in_the_legacy_format_is_read(dtype, tmp_path):
    """A ``.bin`` written before torch 1.6 (or with ``_use_new_zipfile_serialization=False``),
    which torch.load cannot memory-map, is read (tensor by tensor), not refused."""
    model = build("llama").to(dtype)
    torch.save(model.state_dict(), tmp_path / "e.bin", _use_new_zipfile_serialization=False)
    expert = ExpertWeights(str(tmp_path / "e.bin"), task="t")
    expert.bind(_names(model))
    for name, t in model.state_dict().items():
        assert expert.reader.dtype(name) == dtype and expert.shape(name) == tuple(t.shape)
        assert torch.equal(expert.read(name), t)
    name = "model.layers.0.mlp.down_proj.weight"  # (a part of a tensor alone: one fused MoE expert's)
    part = expert.read(name, index=slice(3, 5))
    assert torch.equal(part, model.state_dict()[name][3:5]) and part.untyped_storage().nbytes() == part.nbytes
    expert.close()


def test_a_legacy_torch_pickle_of_a_layout_not_known_is_read_whole_and_said_so(tmp_path, monkeypatch):
    """Where the legacy file's layout is not the one read tensor by tensor, torch.load reads it
    whole, as before, and a warning names the file, its size and the remedy."""
    import epmq.checkpoint_io

    def unknown(file):
        raise ValueError("an unknown layout")

    model = build("llama")
    torch.save(model.state_dict(), tmp_path / "e.bin", _use_new_zipfile_serialization=False)
    monkeypatch.setattr(epmq.checkpoint_io, "_LegacyPickle", unknown)
    with pytest.warns(UserWarning, match=r"e\.bin is a torch pickle in the legacy .*an unknown layout.*read whole, "
                                         r"[\d.]+ MB held .*re-save it with torch\.save"):
        expert = ExpertWeights(str(tmp_path / "e.bin"), task="t")
    expert.bind(_names(model))
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(expert.read(name), model.state_dict()[name])
    expert.close()


@pytest.mark.parametrize("targets", ["merged_path", "expert_path"])
def test_an_expert_weight_of_integers_is_refused_by_name(targets, gen, tmp_path):
    """An expert whose weight is stored as integers (a bitsandbytes int8 checkpoint keeps its
    codes under ``weight``, its scales beside): on the expert path its block was built from the
    codes cast to float, silently; on every path the error names the expert and the tensor."""
    fam = Family("llama", gen)
    state = {k: v.contiguous() for k, v in fam.experts["dtd"].state_dict().items()}
    name = "model.layers.1.self_attn.o_proj.weight"
    state[name] = torch.randint(-127, 127, state[name].shape, dtype=torch.int8)
    save_file(state, str(tmp_path / "dtd.safetensors"))
    model = fam.merged()
    with pytest.raises(ValueError, match=rf"task 'dtd'.*tensor '{name}' is stored as torch.int8"):
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", targets=targets,
                            calibration=fam.calibration, experts=dict(fam.experts, dtd=str(tmp_path / "dtd.safetensors")),
                            progress=False)
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())


@pytest.mark.parametrize("targets", ["merged_path", "expert_path"])
def test_an_fp8_expert_weight_with_its_scales_beside_is_refused_by_name(targets, gen, tmp_path):
    """A fine-grained FP8 checkpoint (DeepSeek-V3's, the Hub's *-FP8 models) stores each weight
    as float8 divided by the scales it keeps in ``weight_scale_inv``: cast alone, the weight was
    taken as the expert's, silently (as integer codes were)."""
    fam = Family("llama", gen)
    state = {k: v.contiguous() for k, v in fam.experts["dtd"].state_dict().items()}
    name = "model.layers.1.self_attn.o_proj.weight"
    scale = state[name].abs().max() / 448
    state[name] = (state[name] / scale).to(torch.float8_e4m3fn)
    state[f"{name}_scale_inv"] = scale.reshape(1, 1).float()
    save_file(state, str(tmp_path / "dtd.safetensors"))
    model = fam.merged()
    with pytest.raises(ValueError, match=rf"task 'dtd'.*tensor '{name}' is stored as torch.float8_e4m3fn "
                                         rf"with its scales in '{name}_scale_inv'"):
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", targets=targets,
                            calibration=fam.calibration, experts=dict(fam.experts, dtd=str(tmp_path / "dtd.safetensors")),
                            progress=False)
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())


@pytest.mark.parametrize("layout", ["nf4", "int8"])
def test_a_bitsandbytes_expert_is_refused_as_quantized(layout, gen, tmp_path):
    """An expert saved quantized by bitsandbytes: a 4-bit one (its weight two codes a byte, [numel / 2,
    1] in uint8, its QuantState beside under ``weight.``) was refused as 'has shape (512, 1), the
    merged model's has (32, 32); experts must share the merged model's architecture', an int8 one
    (``SCB`` beside) as 'stored as torch.int8, not as floating point: is it a quantized checkpoint?';
    both are refused naming the tensor of bitsandbytes' state beside the weight."""
    fam = Family("llama", gen)
    state = {k: v.contiguous() for k, v in fam.experts["dtd"].state_dict().items()}
    name = "model.layers.1.self_attn.o_proj.weight"
    W = state[name]
    if layout == "int8":
        state[name] = torch.randint(-127, 128, W.shape, dtype=torch.int8)
        state[name.removesuffix("weight") + "SCB"] = torch.rand(W.shape[0])
        beside = name.removesuffix("weight") + "SCB"
    else:
        state[name] = torch.randint(0, 256, (W.numel() // 2, 1), dtype=torch.uint8)
        state[name + ".absmax"] = torch.rand(W.numel() // 64)
        state[name + ".quant_map"] = torch.rand(16)
        state[name + ".quant_state.bitsandbytes__nf4"] = torch.tensor(list(b'{"quant_type": "nf4"}'),
                                                                      dtype=torch.uint8)
        beside = name + ".absmax"
    save_file(state, str(tmp_path / "dtd.safetensors"))
    model = fam.merged()
    experts = dict(fam.experts, dtd=str(tmp_path / "dtd.safetensors"))
    with pytest.raises(ValueError, match=rf"task 'dtd'.*tensor '{name}' is stored as torch.u?int8 with "
                                         rf"bitsandbytes' quantization state in '{beside}'"):
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq",
                            calibration=fam.calibration, experts=experts, progress=False)
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())


def test_an_expert_of_another_patch_size_is_warned_of():
    """A ViT-B/16 expert given for a ViT-B/32 merge (FusionBench names both
    ``tanganke/clip-vit-base-patch{16,32}_<task>``): every block matrix fits, only the patch and
    position embeddings differ; the merged path reads the blocks alone, so this is warned of,
    naming them. An expert of the model's own configuration (and a vocabulary of its own, on a
    language model: added tokens) is not."""
    import transformers

    def clip(seed, patch_size):
        torch.manual_seed(seed)
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
            patch_size=patch_size)).eval()

    calibration = {"a": [{"pixel_values": torch.randn(2, 3, 16, 16)}]}
    for expert, warned in ((clip(1, 4), True), (clip(1, 8), False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            epmq.quantize_model(clip(0, 8), epmq.QuantSpec(bits=4, group_size=16), method="epmq",
                                calibration=calibration, experts={"a": expert.state_dict()}, progress=False)
        said = [str(w.message) for w in caught if "outside the blocks" in str(w.message)]
        assert bool(said) == warned
        if warned:
            assert "embeddings.patch_embedding.weight (32, 3, 4, 4) for (32, 3, 8, 8)" in said[0]
            assert "embeddings.position_embedding.weight (17, 32) for (5, 32)" in said[0]

    def llama(seed, vocab_size):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False)).eval()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        epmq.quantize_model(llama(0, 64), epmq.QuantSpec(bits=4, group_size=16), method="epmq",
                            calibration={"a": [torch.randint(0, 64, (2, 8))]},
                            experts={"a": llama(1, 72).state_dict()}, progress=False)
    assert not [w for w in caught if "outside the blocks" in str(w.message)]


def test_an_expert_with_added_tokens_of_a_model_with_final_logits_bias_is_not_warned_of():
    """BART (mBART, Marian, Pegasus) keeps a [1, vocabulary] final_logits_bias beside its
    embeddings, resized with them: an expert with added tokens is of the model's configuration
    and is not warned of (as a Llama expert with added tokens is not)."""
    import transformers

    def bart(seed, vocab_size):
        torch.manual_seed(seed)
        return transformers.BartForConditionalGeneration(transformers.BartConfig(
            vocab_size=vocab_size, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32)).eval()

    ids = torch.randint(4, 64, (2, 8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        epmq.quantize_model(bart(0, 64), epmq.QuantSpec(bits=4, group_size=16), method="epmq",
                            calibration={"a": [{"input_ids": ids, "decoder_input_ids": ids}]},
                            experts={"a": bart(1, 72).state_dict()}, progress=False)
    assert not [w for w in caught if "outside the blocks" in str(w.message)]


def test_a_tied_expert_of_an_untied_merge_gives_its_embeddings_as_its_head(gen, tmp_path):
    """A merge of experts with trained heads onto a tied base is untied (``epmq merge``); an
    expert among them whose head is its embeddings (tie_word_embeddings: true, saved without
    lm_head) was refused on the expert path ("has no tensor 'lm_head.weight'"): its head is its
    embeddings, an untied expert's its own."""
    import transformers

    def tiny(tie, seed):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=tie))

    tiny(True, 1).save_pretrained(tmp_path / "tied")
    tiny(False, 2).save_pretrained(tmp_path / "untied")
    merged = tiny(False, 3)
    experts = {"tied": tmp_path / "tied", "untied": tmp_path / "untied"}
    for task, path in experts.items():
        expert = ExpertWeights(path, task=task)
        expert.bind(_names(merged))
        own = transformers.AutoModelForCausalLM.from_pretrained(path)
        assert torch.equal(expert.read("lm_head.weight"), own.lm_head.weight)
    calibration = {task: [torch.randint(0, 64, (2, 8), generator=gen)] for task in experts}
    epmq.quantize_model(merged, epmq.QuantSpec(bits=4, group_size=16), method="epmq", calibration=calibration,
                        experts=experts, targets="expert_path", progress=False)


class _TinyBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(32, 48), torch.nn.Linear(48, 32)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class _HeadFirstLM(torch.nn.Module):
    """A tiny LM whose head, tied to its embeddings, is registered before them (its state dict
    lists ``head.weight`` first); it does not say which are its input embeddings."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.head = torch.nn.Linear(32, 64, bias=False)
        self.embed = torch.nn.Embedding(64, 32)
        self.layers = torch.nn.ModuleList(_TinyBlock() for _ in range(2))
        self.head.weight = self.embed.weight

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x)
        return self.head(x)


class _HeadFirstLMWithInputs(_HeadFirstLM):
    def get_input_embeddings(self):
        return self.embed


def test_an_untied_experts_head_is_not_taken_for_its_embeddings_on_the_expert_path(gen):
    """A tied merged model, an expert with its own trained head: the expert path reads each
    tensor outside the blocks under its first name, and where the head came first (registered
    before the embeddings) the expert's head was put in as its embeddings, so every target was
    another model's. The input embeddings' name is read (the head follows the blocks and shapes
    no target): the result is that of the expert with its head tied, its blocks' inputs the same.
    Where the model does not say which name feeds the blocks, such an expert is refused."""
    spec, calibration = epmq.QuantSpec(bits=4, group_size=16), {"a": [torch.randint(0, 64, (2, 8), generator=gen)]}
    tied = {n: t.detach().clone() for n, t in _HeadFirstLMWithInputs(1).state_dict().items()}
    assert list(tied)[0] == "head.weight"
    untied = dict(tied, **{"head.weight": tied["embed.weight"] + 0.5})

    def quantized(expert, says_inputs=True):
        model = epmq.quantize_model((_HeadFirstLMWithInputs if says_inputs else _HeadFirstLM)(0), spec, method="epmq", calibration=calibration,
                                    experts={"a": expert}, targets="expert_path", backend="torch", progress=False)
        return model.state_dict()

    want, got = quantized(tied), quantized(untied)
    assert all(torch.equal(got[n], want[n]) for n in want)
    quantized(tied, says_inputs=False)  # (held as one tensor: nothing to choose)
    with pytest.raises(ValueError, match=r"expert of task 'a' .* holds 'embed.weight' apart from 'head.weight', "
                                         r"which the merged model ties.*untie the merged model"):
        quantized(untied, says_inputs=False)


def test_a_data_parallel_model_says_which_tensor_feeds_its_blocks(gen):
    """A tied merged Llama in nn.DataParallel, an expert with its own trained head, on the
    expert path: the wrapper has no get_input_embeddings, so the walk refused the expert as if
    the model did not say which tensor its blocks are fed ("untie the merged model"); the model
    inside says. The result is the unwrapped model's."""
    import transformers

    def tiny(tie, seed):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=tie)).eval()

    expert = tiny(False, 2).state_dict()
    calibration = {"a": [torch.randint(0, 64, (2, 8), generator=gen)]}
    models = [tiny(True, 3), torch.nn.DataParallel(tiny(True, 3))]
    for model in models:
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", calibration=calibration,
                            experts={"a": expert}, targets="expert_path", backend="torch", progress=False)
    want, got = models[0].state_dict(), models[1].module.state_dict()
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_converted_tensors_are_looked_for_once_over_the_checkpoints_keys(tmp_path, monkeypatch):
    """The walk's check for tensors an expert holds converted (``_Walk._refuse_converted``) looked
    for each conversion rule's source tensors across every checkpoint key again for each tensor
    the expert lacks: 50k keys took 0.1 s per missing tensor, minutes for an expert of another
    architecture lacking thousands, before it was refused. The keys are scanned once; each missing
    tensor costs a match of the rules' targets. A refusal says how many tensors are held so."""
    import re
    import types

    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    from epmq import walker

    model = build("qwen3_moe")
    rules = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightConverter)]
    targets = sum(len(rule.target_patterns) for rule in rules)
    save_file({f"model.layers.{i // 50}.other.{i % 50}.weight": torch.zeros(1) for i in range(3000)},
              tmp_path / "model.safetensors")
    expert = ExpertWeights(str(tmp_path), task="a")
    calls = [0]

    def search(pattern, string):
        calls[0] += 1
        return re.search(pattern, string)

    monkeypatch.setattr(walker, "re", types.SimpleNamespace(search=search))
    counts = {}
    for lacking in (4, 400):
        calls[0] = 0
        present = {f"model.layers.{i}.mlp.experts.{i}.up_proj.weight": (16, 32) for i in range(lacking)}
        walker._Walk._refuse_converted(types.SimpleNamespace(model=model), expert, present)
        counts[lacking] = calls[0]
    assert counts[400] - counts[4] <= 396 * targets, counts

    held = {f"model.layers.{i}.mlp.experts.{e}.{p}.weight": torch.zeros(1)
            for i in range(2) for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")}
    save_file(held, tmp_path / "model.safetensors")
    expert = ExpertWeights(str(tmp_path), task="a")
    present = {f"model.layers.{i}.mlp.experts.{p}": (4, 32, 32)
               for i in range(2) for p in ("gate_up_proj", "down_proj")}
    with pytest.raises(ValueError, match=r"holds 'model.layers.0.mlp.experts.gate_up_proj' inside its "
                                         r"mlp.experts.\*.gate_proj.weight tensors \(and 3 more tensors so\)"):
        walker._Walk._refuse_converted(types.SimpleNamespace(model=model), expert, present)


def test_the_expert_path_checks_each_expert_tensor_once(gen, monkeypatch):
    """The expert path reads each expert's block again for every group of its linears (their
    targets' inputs are captured group by group, one expert block held at a time): each read was
    checked for NaN again (a pass over the tensor and, on a GPU, a wait for the device), 4 checks
    of every tensor of a Llama block per task where its bytes are the same. Checked once; a
    non-finite tensor still refused, named."""
    from collections import Counter

    fam = Family("llama", gen)
    checked = Counter()
    check = ExpertWeights.check_values
    monkeypatch.setattr(ExpertWeights, "check_values",
                        lambda self, name, t: checked.update([(self.task, str(name))]) or check(self, name, t))
    options = dict(method="epmq", targets="expert_path", calibration=fam.calibration, backend="torch",
                   progress=False)
    epmq.quantize_model(fam.merged(), epmq.QuantSpec(bits=4, group_size=16), experts=fam.experts, **options)
    blocks = [name for name in checked if ".layers." in name[1]]
    assert len(blocks) == len(fam.experts) * sum(1 for n in fam.base.state_dict() if ".layers." in n)
    assert set(checked.values()) == {1}
    bad = {task: expert.state_dict() for task, expert in fam.experts.items()}
    name = "model.layers.1.mlp.down_proj.weight"
    bad["dtd"][name] = bad["dtd"][name].clone()
    bad["dtd"][name][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"task 'dtd'.*down_proj.*non-finite"):
        epmq.quantize_model(fam.merged(), epmq.QuantSpec(bits=4, group_size=16), experts=bad, **options)


def test_an_expert_path_of_another_head_count_is_refused_by_quantize_model(tmp_path):
    """An expert checkpoint whose config.json splits the same-shaped weights into other heads was
    walked in silence as if of the model's heads (epmq quantize and the merges refuse it): the
    in-memory API compares an expert path's config with the model's as they do."""
    import transformers

    def llama(seed, heads):  # (q, k, v and o 32x32 whatever the heads: head_dim 32 // heads)
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=heads,
            num_key_value_heads=heads)).eval()

    llama(1, heads=2).save_pretrained(tmp_path / "other")
    llama(2, heads=4).save_pretrained(tmp_path / "own")
    calibration = {"a": [torch.randint(0, 64, (2, 8))]}
    spec = epmq.QuantSpec(bits=4, group_size=16)
    model = llama(0, heads=4)
    with pytest.raises(ValueError, match=r"the expert of task 'a' .*other.* reads its weights as \{.*"
                                         r"'num_attention_heads': 2.*\}, the model as \{.*'num_attention_heads': 4"):
        epmq.quantize_model(model, spec, method="epmq", calibration=calibration,
                            experts={"a": str(tmp_path / "other")}, backend="torch", progress=False)
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())
    # (one of the model's configuration is walked)
    epmq.quantize_model(model, spec, method="epmq", calibration=calibration,
                        experts={"a": str(tmp_path / "own")}, backend="torch", progress=False)


@pytest.mark.parametrize("kept", [False, True])
@pytest.mark.parametrize("reads_ahead", [False, True])
def test_the_expert_path_reads_an_expert_block_as_far_as_each_group_runs_it(reads_ahead, kept, gen, tmp_path,
                                                                               monkeypatch):
    """The expert path runs each expert's block once per group of its linears where the target
    inputs are not kept (``kept``: EXPERT_TARGET_INPUTS_KEPT_BYTES), one expert block held at a
    time, and read the whole block from its file each time: a Llama block's every tensor 4 times
    per expert, its MLP's (most of the bytes) too where the passes of the attention's groups stop
    before the MLP. A pass reads a module's tensors as it reaches it: down_proj once, the MLP's other
    tensors twice; the quantized model bit for bit the one of whole-block reads. A block whose
    forward reads a later module's weight before calling it (``reads_ahead``) is read whole, the same
    model again. Kept, the first group's pass reads the block whole and each later group its own
    weights: 13 reads a block and expert where 26 and 36 were."""
    from collections import Counter

    import epmq.walker as walker
    from epmq import checkpoint_io

    fam = Family("llama", gen)
    experts = {}
    for task, expert in fam.experts.items():
        save_file({k: v.contiguous() for k, v in expert.state_dict().items()}, str(tmp_path / f"{task}.safetensors"))
        experts[task] = str(tmp_path / f"{task}.safetensors")
    if reads_ahead:  # (scales its input by the MLP's norm before the attention runs)
        layer = type(fam.merged().model.layers[0])
        forward = layer.forward
        monkeypatch.setattr(layer, "forward", lambda self, hidden_states, *a, **kw: forward(
            self, hidden_states * (1 + 1e-3 * self.post_attention_layernorm.weight), *a, **kw))
    reads = Counter()
    get = checkpoint_io.CheckpointReader.get

    def counted(self, key, index=None):
        reads[self.path, key] += 1
        return get(self, key, index)

    models = {}
    for lazily in (False, True):
        reads.clear()
        with monkeypatch.context() as m:
            m.setattr(walker, "LAZY_EXPERT_BLOCKS", lazily)
            m.setattr(checkpoint_io.CheckpointReader, "get", counted)
            if not kept:
                m.setattr(walker, "EXPERT_TARGET_INPUTS_KEPT_BYTES", 0)
            model = fam.merged()
            epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", targets="expert_path",
                                calibration=fam.calibration, experts=experts, backend="torch", progress=False)
        models[lazily] = model.state_dict()
        per_tensor = {}  # tensor of block 1 (its end) -> its reads per expert
        for (path, key), n in reads.items():
            if key.startswith("model.layers.1."):
                per_tensor.setdefault(key.rpartition("layers.1.")[2], set()).add(n)
        assert len(per_tensor) == 9 and {n for (_, key), n in reads.items() if ".layers." not in key} == {1}
        if lazily and kept:
            assert per_tensor == {"input_layernorm.weight": {1}, "self_attn.q_proj.weight": {1},
                                  "self_attn.k_proj.weight": {1}, "self_attn.v_proj.weight": {1},
                                  "self_attn.o_proj.weight": {2}, "post_attention_layernorm.weight": {1},
                                  "mlp.gate_proj.weight": {2}, "mlp.up_proj.weight": {2},
                                  "mlp.down_proj.weight": {2}}
        elif lazily and not reads_ahead:
            assert per_tensor == {"input_layernorm.weight": {4}, "self_attn.q_proj.weight": {4},
                                  "self_attn.k_proj.weight": {4}, "self_attn.v_proj.weight": {4},
                                  "self_attn.o_proj.weight": {3}, "post_attention_layernorm.weight": {2},
                                  "mlp.gate_proj.weight": {2}, "mlp.up_proj.weight": {2},
                                  "mlp.down_proj.weight": {1}}
        else:
            assert all(n == {4} for n in per_tensor.values()), per_tensor
    assert models[True].keys() == models[False].keys()
    for k, v in models[False].items():
        assert torch.equal(models[True][k], v), k


def test_the_expert_path_of_one_expert_reads_its_block_once(gen, tmp_path, monkeypatch):
    """One expert (E-PMQ toward a single fine-tune): the target block holds its tensors from one group
    to the next, and the walk read them again for every group of the block's linears (a Llama block's
    attention 4 times). Each tensor of its block is read once; the model the same as of whole-block reads."""
    from collections import Counter

    import epmq.walker as walker
    from epmq import checkpoint_io

    fam = Family("llama", gen, tasks=["cars"])
    path = str(tmp_path / "cars.safetensors")
    save_file({k: v.contiguous() for k, v in fam.experts["cars"].state_dict().items()}, path)
    reads = Counter()
    get = checkpoint_io.CheckpointReader.get
    monkeypatch.setattr(checkpoint_io.CheckpointReader, "get",
                        lambda self, key, index=None: reads.update([key]) or get(self, key, index))
    models = {}
    for lazily in (False, True):
        reads.clear()
        with monkeypatch.context() as m:
            m.setattr(walker, "LAZY_EXPERT_BLOCKS", lazily)
            model = fam.merged()
            epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", targets="expert_path",
                                calibration=fam.calibration, experts={"cars": path},
                                backend="torch", progress=False)
        assert len(reads) == len(fam.base.state_dict()) and set(reads.values()) == {1}, reads
        models[lazily] = model.state_dict()
    for k, v in models[False].items():
        assert torch.equal(models[True][k], v), k


def _expert_path_walk(model, blocks, calibration, experts, monkeypatch, kept_bytes, **options) -> tuple:
    """A tiny E-PMQ expert-path walk of ``model`` with ``EXPERT_TARGET_INPUTS_KEPT_BYTES = kept_bytes``:
    its state dict, each layer's statistics as solved (H_e, H_m, G_e and c_e), and the passes of
    the expert blocks (calls of copies of ``blocks``, the model's: a hook of a block is copied with it)."""
    import epmq.walker as walker

    own = {id(b) for b in blocks}
    passes = []
    handles = [b.register_forward_pre_hook(lambda m, a: passes.append(1) if id(m) not in own else None)
               for b in blocks]
    solved = {}
    finalize_ = epmq.stats.EPMQStats.finalize

    def finalize(stats, join=True):
        out = finalize_(stats, join)
        solved[stats.task_names[0].partition(" at ")[2]] = (*out[:3], stats.c_e)
        return out

    with monkeypatch.context() as m:
        m.setattr(walker, "EXPERT_TARGET_INPUTS_KEPT_BYTES", kept_bytes)
        m.setattr(epmq.stats.EPMQStats, "finalize", finalize)
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", targets="expert_path",
                            calibration=calibration, experts=experts, backend="torch", progress=False, **options)
    for h in handles:
        h.remove()
    return model.state_dict(), solved, len(passes)


def _family_walk(fam, monkeypatch, kept_bytes) -> tuple:
    model = fam.merged()
    blocks = [b for _, tower in epmq.adapters.find_towers(model) for _, stack in tower for b in stack]
    return _expert_path_walk(model, blocks, fam.calibration, fam.experts, monkeypatch, kept_bytes)


def _assert_same_walks(walk, kept) -> None:
    """Two ``_expert_path_walk``s' statistics and models bit for bit."""
    (state, solved, _), (state_kept, solved_kept, _) = walk, kept
    assert solved and solved_kept.keys() == solved.keys()
    for layer, (H_e, H_m, G_e, c_e) in solved.items():
        mine = solved_kept[layer]
        assert torch.equal(mine[0], H_e) and torch.equal(mine[1], H_m) and torch.equal(mine[2], G_e), layer
        assert mine[3] == c_e, layer
    assert state_kept.keys() == state.keys() and all(torch.equal(state_kept[k], v) for k, v in state.items())


def test_the_expert_path_runs_each_items_target_block_once(gen, monkeypatch):
    """The expert path ran each expert's block once per group of its linears (each pass as far as
    the group's linears: a Llama block's four groups, 1.8 block passes an item), though the target,
    the expert's own block, does not change as the groups are solved: the first group's pass runs
    it to its end, keeping every later group's inputs (EXPERT_TARGET_INPUTS_KEPT_BYTES), one pass
    of an expert block per item and block; where they are not kept, one per group, as before."""
    fam = Family("llama", gen)
    items = sum(map(len, fam.calibration.values()))
    blocks, groups = len(fam.merged().model.layers), 4  # (q/k/v, o, gate/up, down)
    sizes = []  # (each kept pass's later inputs, bytes)
    capture = epmq.walker._Walk._capture

    def spy(self, *args, cuts=None, **kwargs):
        xs, output = capture(self, *args, cuts=cuts, **kwargs)
        if cuts and len(cuts) > 1:
            sizes.append(sum({id(xs[rel]): xs[rel].nbytes for rels in cuts[1:] for rel in rels}.values()))
        return xs, output

    with monkeypatch.context() as m:
        m.setattr(epmq.walker._Walk, "_capture", spy)
        assert _family_walk(fam, monkeypatch, 1 << 30)[2] == blocks * items
    assert _family_walk(fam, monkeypatch, 0)[2] == blocks * items * groups
    # (the first item kept, the others past the budget run for each group; an item that would cross it
    # is not kept: the budget bounds what is held)
    assert _family_walk(fam, monkeypatch, sizes[0])[2] == blocks * (1 + (items - 1) * groups)
    assert _family_walk(fam, monkeypatch, sizes[0] - 1)[2] == blocks * items * groups


@pytest.mark.parametrize("arch", ["llama", "t5", "bert", "open_clip_clip"])
def test_the_expert_paths_kept_target_inputs_give_the_statistics_of_a_pass_per_group(arch, gen, monkeypatch):
    """The target inputs the first group's pass keeps for the later groups (T5's cross-attention
    reading the encoder's states, open_clip's attention using out_proj's weight before calling it)
    are those each group's own pass took: every layer's statistics bit for bit, and so the codes,
    all items kept, or none (the first item's, past the budget, let go after its pass)."""
    fam = Family(arch, gen)
    walk = _family_walk(fam, monkeypatch, 0)
    for kept_bytes in (1, 1 << 30):
        _assert_same_walks(walk, _family_walk(fam, monkeypatch, kept_bytes))


class _AgainOnPositive(torch.nn.Module):
    """``a``, then ``b`` on its output, then ``again`` (``a``) once more on inputs of positive mean."""

    again = "a"

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x):
        y = x + self.a(x)
        y = y + self.b(y)
        return y + self.get_submodule(self.again)(y) if bool(x.mean() > 0) else y


def test_the_kept_target_inputs_of_a_linear_called_more_than_probed_stop_where_its_groups_pass_did(gen, monkeypatch):
    """An item that calls ``a`` again after ``b`` (the probe, on each task's first item, saw one call):
    ``a``'s group's own pass stopped at its first call, the pass run to the block's end takes both;
    kept, ``a`` takes the calls its group's pass would have (else its targets' tokens are twice the
    inputs'), the statistics bit for bit those of a pass per group."""
    import copy

    from test_walker_errors import Net

    torch.manual_seed(0)
    merged = Net(_AgainOnPositive)
    expert = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in merged.state_dict().items()}
    calibration = {"t": [torch.randn(4, 16, generator=gen) - 3, torch.randn(4, 16, generator=gen) + 3]}
    walks = []
    for kept_bytes in (0, 1 << 30):
        model = copy.deepcopy(merged)
        with warnings.catch_warnings():  # (a called twice on item 1, more than probed: said so)
            warnings.simplefilter("ignore")
            walks.append(_expert_path_walk(model, list(model.layers), calibration, {"t": expert}, monkeypatch,
                                           kept_bytes, adapter=epmq.Adapter("again", block_types=(_AgainOnPositive,))))
    _assert_same_walks(*walks)
    assert walks[1][2] == 2 * 2  # (kept: a pass per item and block)


class _LastAgainOnPositive(_AgainOnPositive):
    """``a``, then ``b`` on its output, then ``b``, the last group's, once more on inputs of positive mean."""

    again = "b"


@pytest.mark.parametrize("targets", ["expert_path", "fp_path"])
def test_the_last_groups_target_inputs_stop_where_its_quantized_pass_did(targets, gen, monkeypatch):
    """An item that calls ``b``, the last group's, again (the probe saw one call): the quantized
    pass stops at its first call, and the target's pass, run to the block's end for its output,
    took both, refused as 'x_expert ... has 8 tokens, the inputs 4' (on the expert path only where
    its inputs were not kept: EXPERT_TARGET_INPUTS_KEPT_BYTES decided); it takes the calls the
    quantized pass took, the walk the same whatever was kept."""
    import copy

    from test_walker_errors import Net

    torch.manual_seed(0)
    merged = Net(_LastAgainOnPositive)
    expert = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in merged.state_dict().items()}
    calibration = {"t": [torch.randn(4, 16, generator=gen) - 3, torch.randn(4, 16, generator=gen) + 3]}
    adapter = epmq.Adapter("again", block_types=(_LastAgainOnPositive,))
    with warnings.catch_warnings():  # (b called twice on item 1, more than probed: said so)
        warnings.simplefilter("ignore")
        if targets == "fp_path":
            model = copy.deepcopy(merged)
            epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", targets=targets,
                                calibration=calibration, experts={"t": expert}, backend="torch", progress=False,
                                adapter=adapter)
            assert {e["name"]: e["n_tokens"] for e in model.epmq_report.layers}["layers.0.b"] == 8
            return
        walks = []
        for kept_bytes in (0, 1 << 30):
            model = copy.deepcopy(merged)
            walks.append(_expert_path_walk(model, list(model.layers), calibration, {"t": expert}, monkeypatch,
                                           kept_bytes, adapter=adapter))
    _assert_same_walks(*walks)


def test_experts_with_heads_of_their_own_classes_are_walked_on_the_expert_path(gen):
    """Image classifiers fine-tuned on their own datasets (task arithmetic's setting) each hold a head
    of their own classes. The expert path refused them ('tensor classifier.weight has shape (10, 32),
    the merged model's has (5, 32); experts must share the merged model's architecture') though the
    head runs after the blocks and no target reaches it: walked, as with heads of the merged model's
    shape, bit for bit, and warned of; an expert whose other-shaped tensor its stream runs (position
    embeddings of another image size) is still refused, naming it."""
    import transformers

    def vit(labels, seed, image_size=16):
        torch.manual_seed(seed)
        config = transformers.ViTConfig(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_labels=labels)
        return transformers.ViTForImageClassification(config).eval()

    calibration = {t: [torch.randn(2, 3, 16, 16, generator=gen) for _ in range(2)] for t in ("a", "b")}

    def quantized(experts):
        model = vit(5, 0)
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", targets="expert_path",
                            calibration=calibration, experts=experts, backend="torch", progress=False)
        return model.state_dict()

    own = {"a": vit(10, 1), "b": vit(7, 2)}
    with pytest.warns(UserWarning, match=r"task 'a'.*classifier.weight \(10, 32\) for \(5, 32\)"):
        walked = quantized(own)
    same = {}
    for task, expert in own.items():  # (their heads of the merged model's shape, their blocks as they are)
        same[task] = {k: v for k, v in expert.state_dict().items() if not k.startswith("classifier.")}
        same[task].update({k: torch.zeros_like(v) for k, v in vit(5, 0).state_dict().items()
                           if k.startswith("classifier.")})
    for k, v in quantized(same).items():
        assert torch.equal(walked[k], v), k
    larger = dict(own, b=vit(7, 2, image_size=24))  # (9 + 1 position embeddings where the model has 4 + 1)
    with pytest.raises(ValueError, match=r"task 'b'.*vit.embeddings.position_embeddings.*\(1, 10, 32\).*\(1, 5, 32\)"):
        quantized(larger)


def test_an_expert_module_of_another_head_count_is_refused_by_quantize_model(tmp_path):
    """An expert given as a transformers module (the in-memory API's own form) whose config splits
    the same-shaped weights into other heads was walked in silence as if of the model's heads,
    where the same expert given as its checkpoint path is refused: its config is compared too."""
    import transformers

    def llama(seed, heads):  # (q, k, v and o 32x32 whatever the heads: head_dim 32 // heads)
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=heads,
            num_key_value_heads=heads)).eval()

    calibration = {"a": [torch.randint(0, 64, (2, 8))]}
    spec = epmq.QuantSpec(bits=4, group_size=16)
    model = llama(0, heads=4)
    for targets in ["merged_path", "expert_path"]:
        with pytest.raises(ValueError, match=r"the expert of task 'a' \(module LlamaForCausalLM\) reads its weights "
                                             r"as \{.*'num_attention_heads': 2.*\}, the model as \{.*"
                                             r"'num_attention_heads': 4"):
            epmq.quantize_model(model, spec, method="epmq", calibration=calibration, experts={"a": llama(1, heads=2)},
                                targets=targets, backend="torch", progress=False)
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())
    epmq.quantize_model(model, spec, method="epmq", calibration=calibration, experts={"a": llama(2, heads=4)},
                        backend="torch", progress=False)


# (families of every kind the walker runs: decoders, encoders, encoder-decoders, vision and audio towers,
# open_clip and timm; mamba's mixer reads its weights without calling its linears, so it is read whole)
_LAZY_FAMILIES = ["llama", "gemma3", "phi3", "falcon", "bloom", "mpt", "gptj", "bert", "deberta_v2",
                  "vit", "dinov2", "hf_clip", "t5", "whisper", "open_clip_clip", "timm_vit_registers", "mamba"]


@pytest.mark.parametrize("arch", _LAZY_FAMILIES)
def test_an_expert_block_read_as_each_pass_runs_it_gives_the_model_of_whole_reads(arch, gen, tmp_path, monkeypatch):
    """The expert path's passes before a block's last group leave its tensors unread, empty, until a
    module is called: a block that used an unread tensor in an op that takes an empty one (torch.cat
    leaves a 1-D one out; a size-1 dimension broadcasts) would solve toward a silently wrong target.
    Experts saved as checkpoints, every quantized tensor the same bit for bit as with whole reads,
    with fewer reads where the block runs each module it uses. (The target inputs not kept: every
    group's pass runs.)"""
    import copy
    from collections import Counter

    import epmq.walker as walker
    from epmq import checkpoint_io
    from test_walker_models import WIDER, perturb, tiny_timm_vit, wider_input

    if arch == "timm_vit_registers":  # (a class token and register tokens before the patches)
        torch.manual_seed(0)
        base = tiny_timm_vit(reg_tokens=2).eval()
        experts = {t: perturb(base, gen) for t in ("a", "b")}
        calibration = {t: [torch.randn(2, 3, 16, 16, generator=gen) for _ in range(2)] for t in experts}
    elif arch in WIDER:
        build_model, kind = WIDER[arch]
        torch.manual_seed(0)
        base = build_model().eval()
        experts = {t: perturb(base, gen) for t in ("a", "b")}
        calibration = {t: [wider_input(kind, gen) for _ in range(2)] for t in experts}
    else:
        fam = Family(arch, gen, tasks=("a", "b"))
        base, experts, calibration = fam.merged(), fam.experts, fam.calibration
    paths = {}
    for task, expert in experts.items():
        paths[task] = str(tmp_path / f"{task}.safetensors")
        save_file({k: v.detach().clone().contiguous() for k, v in expert.state_dict().items()}, paths[task])
    reads = Counter()
    get = checkpoint_io.CheckpointReader.get

    def counted(self, key, index=None):
        reads[key] += 1
        return get(self, key, index)

    models, n_reads = {}, {}
    for lazily in (False, True):
        reads.clear()
        with monkeypatch.context() as m, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m.setattr(walker, "LAZY_EXPERT_BLOCKS", lazily)
            m.setattr(walker, "EXPERT_TARGET_INPUTS_KEPT_BYTES", 0)
            m.setattr(checkpoint_io.CheckpointReader, "get", counted)
            model = copy.deepcopy(base)
            epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", targets="expert_path",
                                calibration=calibration, experts=paths, backend="torch", progress=False)
        models[lazily], n_reads[lazily] = model.state_dict(), sum(reads.values())
    assert models[True].keys() == models[False].keys()
    for k, v in models[False].items():
        assert torch.equal(models[True][k], v), k
    if arch != "mamba":
        assert n_reads[True] < n_reads[False], n_reads


def _scaled(x, gains):
    """``x`` times one plus the sum of ``gains`` (a dict of tensors, or a list of tuples of them): a
    torch function written in Python, whose body runs with the torch function modes off."""
    if torch.overrides.has_torch_function((x,)):
        return torch.overrides.handle_torch_function(_scaled, (x,), x, gains)
    leaves = gains.values() if isinstance(gains, dict) else [g for group in gains for g in group]
    return x * (1 + sum(g.sum() for g in leaves))


@pytest.mark.parametrize("taken", ["summed", "in a dict", "in a list of tuples"])
def test_a_block_that_sums_a_later_modules_weight_is_read_whole_on_the_expert_path(taken, gen):
    """A block that scales its input by a sum of its norm's weight before it calls the norm: the
    passes of the expert path's groups before the last left the norm's weight empty, and its sum is
    0 without a word, so ``a``'s targets were those of an unscaled input, every layer of both blocks
    solved toward them. Its use is refused in the pass, which reads the block whole: the model of
    whole reads, bit for bit. The weight handed to a torch function inside a dict or a nested list
    was not looked for, and its sum in there was 0 again."""
    from torch import nn

    from test_walker_errors import Net

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c, self.norm = nn.Linear(16, 16), nn.Linear(16, 16), nn.LayerNorm(16)

        def forward(self, x):
            w = self.norm.weight
            if taken == "summed":
                y = x * (1 + w.sum())
            else:
                y = _scaled(x, {"norm": w} if taken == "in a dict" else [(w,)])
            y = y + self.a(y)
            return y + self.c(self.norm(y))

    _assert_lazy_reads_as_whole(Net(Block), Block, gen)


class _ScriptedGain(torch.nn.Module):
    """``x`` times one plus the sum of a weight of its own, scripted below (TorchScript)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(16))

    def forward(self, x):
        return x * (1 + self.weight.sum())


def test_a_block_holding_a_torchscript_module_is_read_whole_on_the_expert_path(gen):
    """A block with a TorchScript module in it (timm's norm-act layers with jit=True): the lazy reads
    hooked it, which a ScriptModule refuses, and the walk failed (its rollback then failed on the
    ScriptModule too). Nor would the guard of unread tensors see its scripted ops: an unread weight
    summed there is 0 without a word. The block is read whole: the model of whole reads."""
    from torch import nn

    from test_walker_errors import Net

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c, self.gain = nn.Linear(16, 16), nn.Linear(16, 16), torch.jit.script(_ScriptedGain())

        def forward(self, x):
            y = self.gain(x)
            y = y + self.a(y)
            return y + self.c(y)

    _assert_lazy_reads_as_whole(Net(Block), Block, gen)


def _scaled_by(x, gains):
    """``x`` times one plus the sum of ``gains``."""
    return x * (1 + gains.sum())


def _scaled_by_size(x, gains):
    """``x`` times one plus the number of ``gains``: their shape read, not their values."""
    return x * (1 + gains.numel())


@pytest.mark.parametrize("scaled", [_scaled_by, _scaled_by_size])
def test_a_block_calling_a_scripted_function_on_a_later_module_s_weight_is_read_as_whole(scaled, gen):
    """A block that hands its norm's weight, before it calls the norm, to a function compiled by
    ``torch.jit.script``: the guard of unread tensors (a torch function mode) does not see the ops of
    scripted code, and the lazy passes' empty weight there summed to 0 (or counted 0 elements) without
    a word, ``a``'s targets those of an unscaled input. Its use is refused at torch's dispatch, which
    scripted code goes through, and the block read whole (its shape read kept): the model of whole reads."""
    from torch import nn

    from test_walker_errors import Net

    scripted = torch.jit.script(scaled)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.c, self.norm = nn.Linear(16, 16), nn.Linear(16, 16), nn.LayerNorm(16)

        def forward(self, x):
            y = scripted(x, self.norm.weight)
            y = y + self.a(y)
            return y + self.c(self.norm(y))

    _assert_lazy_reads_as_whole(Net(Block), Block, gen)


class _Gained(torch.nn.Module):
    """Two blocks of ``_TinyBlock`` on an input scaled by a sum of a gain outside them (``summed``;
    else cast to the gain's dtype)."""

    def __init__(self, gains=32, summed=True):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.zeros(gains))
        self.layers = torch.nn.ModuleList([_TinyBlock(), _TinyBlock()])
        self.summed = summed

    def forward(self, x):
        x = x * (1 + self.gain.sum()) if self.summed else x.to(self.gain.dtype)
        for layer in self.layers:
            x = layer(x)
        return x


def _check_said(refusal):
    """The refusal of an expert's tensor of another shape as the user's traceback shows it: under a
    public name (it read ``epmq.walker._Apart``, a private class), the walk's message itself, not the
    calibration's failure wrapped around it."""
    import traceback

    assert isinstance(refusal, epmq.ExpertShapeError) and isinstance(refusal, ValueError)
    said = traceback.format_exception_only(type(refusal), refusal)[-1]
    assert said.startswith("epmq.walker.ExpertShapeError: the expert of task 'b' "), said
    assert refusal.__cause__ is None


def test_an_expert_tensor_of_another_shape_its_stream_runs_is_refused_naming_it(gen):
    """The expert path left an expert's tensor outside the blocks of another shape than the merged
    model's empty in its stream's passes, refused only where a pass failed on it: a gain summed
    before the blocks (an empty sum is 0) gave the stream of task 'b' an unscaled input, every layer
    solved toward it, without a word. Its use is refused, naming the tensor, the task and why; a
    model that reads only its dtype (which the empty tensor in its place keeps) is walked."""
    torch.manual_seed(0)
    experts = {t: {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in _Gained(gains).state_dict().items()}
               for t, gains in (("a", 32), ("b", 16))}
    calibration = {t: [torch.randn(8, 32, generator=gen)] for t in experts}

    def quantize(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (warned of as the experts are bound)
            epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", targets="expert_path",
                                calibration=calibration, experts=experts, backend="torch", progress=False,
                                adapter=epmq.Adapter("tiny", block_types=(_TinyBlock,)))

    model = _Gained()
    with pytest.raises(ValueError, match=r"the expert of task 'b' .*gain of shape \(16,\).* the merged model's \(32,\)"
                                         r".*runs it in place of the model's") as refused:
        quantize(model)
    _check_said(refused.value)
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())
    model = _Gained(summed=False)
    quantize(model)
    assert all(isinstance(block.fc1, epmq.QuantLinear) for block in model.layers)


def test_an_expert_tensor_of_another_shape_a_scripted_function_uses_is_refused_naming_it(gen):
    """The gain of another shape in expert 'b' (held empty in its stream's passes), summed by a function
    compiled by ``torch.jit.script``, whose ops no torch function mode sees: its sum was 0, the stream's
    input unscaled, without a word. Its use is refused at torch's dispatch, which scripted code goes
    through, as the refusal itself (not the TorchScript interpreter's RuntimeError around it)."""
    scripted = torch.jit.script(_scaled_by)

    class ScriptGained(_Gained):
        def forward(self, x):
            x = scripted(x, self.gain)
            for layer in self.layers:
                x = layer(x)
            return x

    experts = {t: {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in _Gained(gains).state_dict().items()}
               for t, gains in (("a", 32), ("b", 16))}
    calibration = {t: [torch.randn(8, 32, generator=gen)] for t in experts}
    model = ScriptGained()
    said = r"the expert of task 'b' .*gain of shape \(16,\).* the merged model's \(32,\)"
    with warnings.catch_warnings(), pytest.raises(ValueError, match=said) as refused:
        warnings.simplefilter("ignore")  # (warned of as the experts are bound)
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", targets="expert_path",
                            calibration=calibration, experts=experts, backend="torch", progress=False,
                            adapter=epmq.Adapter("tiny", block_types=(_TinyBlock,)))
    _check_said(refused.value)
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())


_Shift = namedtuple("_Shift", "by")
_HANDED = {"as it is": (lambda t: t, lambda t: t), "in a list": (lambda t: [t], lambda t: t[0]),
           "in a dict": (lambda t: {"by": t}, lambda t: t["by"]), "in a named tuple": (_Shift, lambda t: t.by)}


class _ShiftBlock(torch.nn.Module):
    def __init__(self, handed):
        super().__init__()
        self.fc, self.handed = torch.nn.Linear(16, 16), handed

    def forward(self, x, shift):
        return x + self.fc(x + _HANDED[self.handed][1](shift)[:16])


class _Shifted(torch.nn.Module):
    """Two ``_ShiftBlock``s, each handed the model's ``shift`` (``width`` wide) ``handed`` as one of
    ``_HANDED``: the tensor itself (``as_is``) or a computed copy."""

    def __init__(self, handed, as_is=True, width=16):
        super().__init__()
        self.shift, self.handed, self.as_is = torch.nn.Parameter(torch.zeros(width)), handed, as_is
        self.layers = torch.nn.ModuleList([_ShiftBlock(handed), _ShiftBlock(handed)])

    def forward(self, x):
        shift = _HANDED[self.handed][0](self.shift if self.as_is else self.shift + 0)
        for layer in self.layers:
            x = layer(x, shift=shift)
        return x


def _quantize_shifted(model, experts, calibration):
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", targets="expert_path",
                        calibration=calibration, experts=experts, backend="torch", progress=False,
                        adapter=epmq.Adapter("shifted", block_types=(_ShiftBlock,)))


@pytest.mark.parametrize("handed", list(_HANDED))
def test_an_expert_tensor_the_model_hands_to_its_blocks_is_the_experts_in_its_stream(handed, gen):
    """A model that hands a tensor of its own outside the blocks (a shift) to every block as an
    argument: the expert stream's entry recorded the tensor itself, which held the merged model's
    values again once the entry was over, so each expert's blocks ran on the merged model's shift,
    without a word. They run on the expert's: the model that of one handing on a computed copy.
    Handed inside a dict or a named tuple, it was recorded as the model's tensor still."""
    import copy

    torch.manual_seed(0)
    net = _Shifted(handed)
    experts = {t: {k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in net.state_dict().items()}
               for t in ("a", "b")}
    calibration = {t: [torch.randn(8, 16, generator=gen)] for t in experts}
    models = {}
    for as_is in (True, False):
        model = copy.deepcopy(net)
        model.as_is = as_is
        _quantize_shifted(model, experts, calibration)
        models[as_is] = model.state_dict()
    for k, v in models[False].items():
        assert torch.equal(models[True][k], v), k


def _outside_reads(monkeypatch, names):
    """The reads of each of ``names`` from the experts, by name, as the walk makes them."""
    from collections import Counter

    reads, read = Counter(), ExpertWeights.read

    def counted(self, name, **kw):
        if name in names:
            reads[name] += 1
        return read(self, name, **kw)

    monkeypatch.setattr(ExpertWeights, "read", counted)
    return reads


def test_a_replayed_stack_reads_each_expert_s_tensors_outside_the_blocks_once_for_its_passes(gen, monkeypatch):
    """DeBERTa-v2-xlarge mixes a convolution of its embeddings into the first layer's output, so
    the expert path takes each block's input from a pass of the expert's model (``_replay_next``),
    whose tensors outside the blocks (embeddings, the convolution) were read anew for every block
    and task: 24 reads of a 128k-token embedding per expert for xlarge's 24 layers. They are kept
    between a stack's passes (one read for the stack's entry, one for its passes), the model bit for
    bit the one of fresh reads."""
    import copy

    import epmq.walker as walker
    from test_walker_models import VOCAB, _hf, perturb, wider_input

    layers = 3
    torch.manual_seed(0)
    base = _hf("DebertaV2Model", "DebertaV2Config", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
               num_hidden_layers=layers, num_attention_heads=4, conv_kernel_size=3)().eval()
    experts = {t: perturb(base, gen) for t in ("a", "b")}
    calibration = {t: [wider_input("masked_ids", gen) for _ in range(2)] for t in experts}
    outside = [name for name in base.state_dict() if not name.startswith("encoder.layer.")]
    models = []
    # (kept, then read each pass: tasks x (the stack's entry + the first pass, or a pass after each
    # block but the last))
    for kept, passes in ((True, 2), (False, layers)):
        with monkeypatch.context() as m, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not kept:
                m.setattr(walker, "EXPERT_OUTSIDE_KEPT_BYTES", 0)
            reads = _outside_reads(m, outside)
            model = epmq.quantize_model(copy.deepcopy(base), epmq.QuantSpec(bits=4, group_size=16), method="epmq",
                                        targets="expert_path", calibration=calibration, experts=experts,
                                        backend="torch", progress=False)
        assert model.epmq_report.replayed == ["encoder.layer"]
        assert "encoder.conv.conv.weight" in reads
        assert reads == {name: len(experts) * passes for name in outside}
        models.append(model.state_dict())
    assert all(torch.equal(models[1][k], v) for k, v in models[0].items())


class _Stepped(torch.nn.Module):
    """Three residual blocks, a counter outside them that each forward advances in place and adds
    after every block (so the walk replays the model between blocks)."""

    def __init__(self):
        super().__init__()
        from test_walker_errors import Residual

        self.layers = torch.nn.ModuleList([Residual() for _ in range(3)])
        self.register_buffer("step", torch.zeros(()))

    def forward(self, x):
        self.step.add_(1.0)
        for layer in self.layers:
            x = layer(x) + self.step
        return x


def test_an_expert_s_tensor_outside_the_blocks_written_by_a_pass_is_read_again(tmp_path, monkeypatch):
    """A pass that writes an expert's tensor outside the blocks in place (a step counter) leaves
    what a fresh read would not hold: it is not kept for the next pass, the model bit for bit the
    one of fresh reads."""
    import epmq.walker as walker
    from test_walker_errors import Residual

    calibration = {"task": [torch.randn(4, 16) for _ in range(2)], "other": [torch.randn(4, 16) for _ in range(2)]}
    states, reads = {}, {}
    for budget in (walker.EXPERT_OUTSIDE_KEPT_BYTES, 0):
        torch.manual_seed(0)
        model = _Stepped()
        experts = {t: str(tmp_path / f"{t}.safetensors") for t in calibration}
        for j, (t, path) in enumerate(experts.items()):
            # (in float64: each read converts it to the model's float32, a fresh copy)
            save_file({k: v.double() + 0.01 * (1 + j) for k, v in model.state_dict().items()}, path)
        with monkeypatch.context() as m:
            m.setattr(walker, "EXPERT_OUTSIDE_KEPT_BYTES", budget)
            reads[budget] = _outside_reads(m, {"step"})
            epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", targets="expert_path",
                                calibration=calibration, experts=experts, progress=False,
                                adapter=epmq.Adapter("blocks", block_types=(Residual,)))
        assert model.epmq_report.replayed == ["layers"]
        states[budget] = model.state_dict()
    assert all(torch.equal(states[0][k], v) for k, v in states[walker.EXPERT_OUTSIDE_KEPT_BYTES].items())
    # (the stack's entry and a pass after blocks 0 and 1)
    assert reads[0] == reads[walker.EXPERT_OUTSIDE_KEPT_BYTES] == {"step": len(calibration) * 3}


@pytest.mark.parametrize("handed", list(_HANDED))
def test_an_expert_tensor_of_another_shape_the_model_hands_to_its_blocks_is_refused(handed, gen):
    """The same shift of another shape in expert 'b' (a block takes its first 16): held empty in the
    entry, it was recorded so inside a dict, its use there unseen, and held the merged model's values
    again when the stream's block passes ran: every layer solved toward the merged model's shift for
    'b', without a word. It is refused, however the model hands it on."""
    experts = {t: {k: v + 0.5 * torch.randn(v.shape, generator=gen)
                   for k, v in _Shifted(handed, width=width).state_dict().items()}
               for t, width in (("a", 16), ("b", 24))}
    calibration = {t: [torch.randn(8, 16, generator=gen)] for t in experts}
    model = _Shifted(handed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (warned of as the experts are bound)
        with pytest.raises(ValueError, match=r"the expert of task 'b' .*shift of shape \(24,\).* the merged model's "
                                             r"\(16,\)") as refused:
            _quantize_shifted(model, experts, calibration)
    _check_said(refused.value)
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())


def test_open_clip_expert_paths_whose_config_reads_the_weights_otherwise_are_refused(gen, tmp_path):
    """An in-memory open_clip model has no config to compare with, so its experts' open_clip_config.json
    was never compared: a ViT-*-quickgelu fine-tune (QuickGELU) walked as an expert of a GELU model, in
    silence. The model's own model_cfg is read off its modules (its activation, each tower's heads and
    layers) and compared as the merges compare two open_clip checkpoints."""

    from test_walker_models import VOCAB

    fam = Family("open_clip_clip", gen, tasks=["a"], n_samples=1)
    model_cfg = _open_clip_cfg(VOCAB)

    def expert(name, **changes):
        return _open_clip_expert(tmp_path / name, fam.experts["a"].state_dict(), {**model_cfg, **changes})

    walk = functools.partial(_walk_epmq, fam)

    with pytest.raises(ValueError, match=r"the expert of task 'a' .*quick.* reads its weights as "
                                         r"\{'quick_gelu': True\}, the model as \{'quick_gelu': False\}"):
        walk(expert("quick", quick_gelu=True))
    with pytest.raises(ValueError, match=r"reads its weights as \{'text_cfg.heads': 2\}, the model as "
                                         r"\{'text_cfg.heads': 4\}"):
        walk(expert("heads", text_cfg={**model_cfg["text_cfg"], "heads": 2}))
    assert any(isinstance(m, epmq.QuantLinear) for m in walk(expert("own")).modules())
    from open_clip.model import CLIP

    quick = CLIP(**model_cfg, quick_gelu=True)  # (an expert given as a module: read off its modules too)
    quick.load_state_dict(fam.experts["a"].state_dict())
    with pytest.raises(ValueError, match=r"\(module CLIP\) reads its weights as \{'quick_gelu': True\}"):
        walk({"a": quick})


def test_timm_expert_paths_whose_config_builds_another_model_are_refused(gen, tmp_path):
    """A timm model made by create_model has no config to compare with either: its experts' config.json
    (save_for_hf's: architecture and model_args) was never compared. The model's architecture and
    model_args are as timm records them; a model built by its class records neither, and its experts
    are compared with the first of them, naming both."""
    import timm
    from timm.models._hub import save_for_hf

    from test_walker_models import tiny_timm_vit

    def create(**args):  # (q, k, v and proj 32-wide whatever the heads)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{
            **dict(img_size=16, patch_size=8, depth=2, embed_dim=32, num_heads=4, mlp_ratio=2.0, num_classes=0),
            **args}).eval()

    def expert(name, **args):
        save_for_hf(create(**args), tmp_path / name)
        return str(tmp_path / name)

    calibration = {t: [torch.randn(2, 3, 16, 16, generator=gen)] for t in ("a", "b")}

    def walk(model, experts):
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", calibration=calibration,
                            experts=experts, backend="torch", progress=False)
        return model

    own, other = expert("own"), expert("other", num_heads=2)
    with pytest.raises(ValueError, match=r"the expert of task 'b' .*other.* reads its weights as "
                                         r"\{'num_heads': 2\}, the model as \{'num_heads': 4\}"):
        walk(create(), {"a": own, "b": other})
    with pytest.raises(ValueError, match=r"the expert of task 'b' .*other.* reads its weights as \{'num_heads': 2\}, "
                                         r"the expert of task 'a' .*own.* as \{'num_heads': 4\}"):
        walk(tiny_timm_vit(), {"a": own, "b": other})
    for model in (create(), tiny_timm_vit()):
        assert any(isinstance(m, epmq.QuantLinear) for m in walk(model, {"a": own, "b": expert(f"{id(model)}")})
                   .modules())


class _Counted(torch.nn.Module):
    """``x + fc(x) + calls``, ``calls`` a buffer of the block that each forward advances in place."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 16)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1.0)
        return x + self.fc(x) + self.calls


class _CountedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([_Counted() for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("net, blocks", [(_Stepped, "Residual"), (_CountedNet, "_Counted")])
def test_a_pass_writing_an_expert_s_tensor_in_place_leaves_the_next_read_as_saved(tmp_path, gen, net, blocks):
    """Every read of a safetensors (or mapped torch) file's tensor is the same memory: a pass that
    wrote an expert's tensor in place (a step counter outside the blocks, or a block's own) left its
    write in the next pass's read, which the walk takes for the checkpoint's values. The quantized
    model depends on the experts' values alone: saved in float32 (read as they are) or float64 (each
    read a conversion, a copy), or given as state dicts (which the walk leaves as they were)."""
    from test_walker_errors import Residual

    block_types = (Residual,) if blocks == "Residual" else (_Counted,)
    calibration = {t: [torch.randn(4, 16, generator=gen) for _ in range(2)] for t in ("task", "other")}
    torch.manual_seed(int(torch.randint(1 << 30, (), generator=gen)))
    base = net()
    given = {t: {k: v + 0.01 * (1 + j) for k, v in base.state_dict().items()} for j, t in enumerate(calibration)}
    kept = {t: {k: v.clone() for k, v in state.items()} for t, state in given.items()}
    states = {}
    for form in ("float64", "float32", "state dict"):
        experts = dict(given)
        if form != "state dict":
            for t, state in given.items():
                experts[t] = str(tmp_path / f"{t}-{form}.safetensors")
                save_file({k: v.to(getattr(torch, form)) for k, v in state.items()}, experts[t])
        model = net()
        model.load_state_dict(base.state_dict())
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", targets="expert_path",
                            calibration=calibration, experts=experts, progress=False,
                            adapter=epmq.Adapter("blocks", block_types=block_types))
        states[form] = model.state_dict()
    for form in ("float32", "state dict"):
        assert all(torch.equal(states["float64"][k], v) for k, v in states[form].items()), form
    assert all(torch.equal(kept[t][k], v) for t, state in given.items() for k, v in state.items())


def test_a_read_of_its_own_is_not_the_next_read(tmp_path):
    """Two reads of a safetensors file's tensor are one memory; ``own=True`` gives a copy to write into."""
    save_file({"w": torch.zeros(8, 8)}, str(tmp_path / "x.safetensors"))
    expert = ExpertWeights(str(tmp_path / "x.safetensors"), task="t")
    expert.read("w", own=True).add_(1.0)
    assert not expert.read("w").any()


def _assert_lazy_reads_as_whole(net, block_type, gen):
    """E-PMQ's expert path of ``net`` (its blocks ``block_type``) quantizes bit for bit alike with
    the experts' blocks read lazily and read whole."""
    import copy

    import epmq.walker as walker

    torch.manual_seed(0)
    experts = {t: {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in net.state_dict().items()}
               for t in ("a", "b")}
    calibration = {t: [torch.randn(8, 16, generator=gen)] for t in experts}
    models = {}
    for lazily in (False, True):
        walker_lazily, walker.LAZY_EXPERT_BLOCKS = walker.LAZY_EXPERT_BLOCKS, lazily
        try:
            model = copy.deepcopy(net)
            epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", targets="expert_path",
                                calibration=calibration, experts=experts, backend="torch", progress=False,
                                adapter=epmq.Adapter("tiny", block_types=(block_type,)))
        finally:
            walker.LAZY_EXPERT_BLOCKS = walker_lazily
        models[lazily] = model.state_dict()
    for k, v in models[False].items():
        assert torch.equal(models[True][k], v), k


def test_open_clip_image_tower_alone_refuses_experts_whose_config_reads_its_weights_otherwise(gen, tmp_path):
    """An open_clip VisionTransformer walked alone had no config to compare with (it is no CLIP), so an
    expert's open_clip_config.json giving QuickGELU, or other heads or layers, was compared with the
    other experts' alone: a ViT-*-quickgelu fine-tune walked in silence beside a GELU tower. The tower
    is read as its CLIP's vision_cfg, and the expert's vision_cfg (with its activation) compared with it."""

    from open_clip.model import CLIP

    from test_walker_models import VOCAB

    fam = Family("open_clip_vit", gen, tasks=["a"], n_samples=1)
    model_cfg = _open_clip_cfg(VOCAB)

    def expert(name, **changes):
        clip = CLIP(**model_cfg)
        clip.visual.load_state_dict(fam.experts["a"].state_dict())
        return _open_clip_expert(tmp_path / name, clip.state_dict(), {**model_cfg, **changes})

    walk = functools.partial(_walk_epmq, fam)

    with pytest.raises(ValueError, match=r"the expert of task 'a' .*quick.*'s open_clip_vision_cfg tower reads its "
                                         r"weights as \{'quick_gelu': True\}, the model as \{'quick_gelu': False\}"):
        walk(expert("quick", quick_gelu=True))
    with pytest.raises(ValueError, match=r"reads its weights as \{'head_width': 16\}, the model as "
                                         r"\{'head_width': 8\}"):
        walk(expert("wide", vision_cfg={**model_cfg["vision_cfg"], "head_width": 16}))
    with pytest.raises(ValueError, match=r"counts its layers as \{'layers': 3\}, the model as \{'layers': 2\}"):
        walk(expert("deep", vision_cfg={**model_cfg["vision_cfg"], "layers": 3}))
    assert any(isinstance(m, epmq.QuantLinear) for m in walk(expert("own")).modules())


def test_open_clip_timm_image_tower_refuses_experts_built_as_another_timm_model_or_pool(gen, tmp_path):
    """An open_clip CLIP on a timm image tower (ViT-*-SigLIP*, EVA02-*) had its timm tower's settings
    compared with nothing: an expert whose open_clip_config.json names another timm model, or pools the
    trunk's tokens otherwise (timm_pool: the class token, their mean), walked in silence. The model's
    are read off its tower (its trunk's architecture, its pooling) and compared; a pretrained tag names
    weights, not another model, and a pool '' (the trunk's own) says nothing to compare."""

    from test_walker_models import TIMM_CLIP_CFG

    fam = Family("open_clip_timm", gen, tasks=["a"], n_samples=1)

    def expert(name, **changes):
        return _open_clip_expert(tmp_path / name, fam.experts["a"].state_dict(),
                                 {**TIMM_CLIP_CFG, "vision_cfg": {**TIMM_CLIP_CFG["vision_cfg"], **changes}})

    walk = functools.partial(_walk_epmq, fam)

    with pytest.raises(ValueError, match=r"the expert of task 'a' .*token.* reads its weights as "
                                         r"\{'vision_cfg.timm_pool': 'token'\}, the model as "
                                         r"\{'vision_cfg.timm_pool': 'avg'\}"):
        walk(expert("token", timm_pool="token"))
    with pytest.raises(ValueError, match=r"\{'vision_cfg.timm_model_name': 'vit_tiny_patch16_224'\}, the model as "
                                         r"\{'vision_cfg.timm_model_name': 'epmq_tiny_vit'\}"):
        walk(expert("other", timm_model_name="vit_tiny_patch16_224"))
    for name, changes in (("own", {}), ("tagged", dict(timm_model_name="epmq_tiny_vit.tuned", timm_pool=""))):
        assert any(isinstance(m, epmq.QuantLinear) for m in walk(expert(name, **changes)).modules())


def _open_clip_cfg(vocab: int) -> dict:
    """The model_cfg of the tiny open_clip CLIP the walker tests' families build."""
    return dict(embed_dim=16, vision_cfg=dict(layers=2, width=32, head_width=8, image_size=16, patch_size=8,
                                              mlp_ratio=2.0),
                text_cfg=dict(context_length=8, vocab_size=vocab, width=32, heads=4, layers=2, mlp_ratio=2.0))


def _open_clip_expert(directory, state_dict, model_cfg) -> dict:
    """Task 'a''s expert: ``state_dict`` saved as open_clip saves a model, under ``model_cfg``."""
    directory.mkdir()
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(directory / "open_clip_model.safetensors"))
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    return {"a": str(directory)}


def _open_clip_text_alone(clip, model_cfg):
    """A family whose merged model is ``clip``'s text tower alone (an open_clip TextTransformer)."""
    import types

    from open_clip.transformer import TextTransformer

    def text_tower():  # (CLIP keeps its text tower's modules on itself, by the names the tower gives them)
        tower = TextTransformer(**model_cfg["text_cfg"], output_dim=model_cfg["embed_dim"]).eval()
        names = tower.state_dict()
        tower.load_state_dict({k: v for k, v in clip.merged().state_dict().items() if k in names})
        return tower

    return types.SimpleNamespace(merged=text_tower, calibration={"a": [i["text"] for i in clip.calibration["a"]]})


def _walk_epmq(fam, experts):
    """``fam``'s merged model quantized by E-PMQ (4-bit, groups of 16) toward ``experts``."""
    model = fam.merged()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", calibration=fam.calibration,
                        experts=experts, backend="torch", progress=False)
    return model


def test_open_clip_text_and_timm_towers_alone_refuse_experts_whose_config_reads_their_weights_otherwise(
        gen, tmp_path):
    """An open_clip TextTransformer, or an image tower that is timm's (TimmModel), walked alone had no
    config to compare with (it is no CLIP), so an expert's open_clip_config.json giving QuickGELU or
    other heads to the text tower, or another timm model or pooling to the image tower, was compared
    with the other experts' alone and walked in silence. Each tower is read as its CLIP's text_cfg or
    vision_cfg and the expert's tower compared with it."""
    import types

    from test_walker_models import TIMM_CLIP_CFG, VOCAB

    model_cfg = _open_clip_cfg(VOCAB)
    clip = Family("open_clip_clip", gen, tasks=["a"], n_samples=1)
    timm_clip = Family("open_clip_timm", gen, tasks=["a"], n_samples=1)

    text = _open_clip_text_alone(clip, model_cfg)
    timm = types.SimpleNamespace(merged=lambda: timm_clip.merged().visual,
                                 calibration={"a": [i["image"] for i in timm_clip.calibration["a"]]})

    def text_expert(name, **changes):
        return _open_clip_expert(tmp_path / name, clip.experts["a"].state_dict(), {**model_cfg, **changes})

    def timm_expert(name, **changes):
        return _open_clip_expert(tmp_path / name, timm_clip.experts["a"].state_dict(),
                                 {**TIMM_CLIP_CFG, "vision_cfg": {**TIMM_CLIP_CFG["vision_cfg"], **changes}})

    with pytest.raises(ValueError, match=r"the expert of task 'a' .*quick.*'s open_clip_text_cfg tower reads its "
                                         r"weights as \{'quick_gelu': True\}, the model as \{'quick_gelu': False\}"):
        _walk_epmq(text, text_expert("quick", quick_gelu=True))
    with pytest.raises(ValueError, match=r"reads its weights as \{'heads': 2\}, the model as \{'heads': 4\}"):
        _walk_epmq(text, text_expert("heads", text_cfg={**model_cfg["text_cfg"], "heads": 2}))
    with pytest.raises(ValueError, match=r"the expert of task 'a' .*token.*'s open_clip_vision_cfg tower reads its "
                                         r"weights as \{'timm_pool': 'token'\}, the model as \{'timm_pool': 'avg'\}"):
        _walk_epmq(timm, timm_expert("token", timm_pool="token"))
    with pytest.raises(ValueError, match=r"\{'timm_model_name': 'vit_tiny_patch16_224'\}, the model as "
                                         r"\{'timm_model_name': 'epmq_tiny_vit'\}"):
        _walk_epmq(timm, timm_expert("other", timm_model_name="vit_tiny_patch16_224"))
    for tower, expert in ((text, text_expert("own")), (timm, timm_expert("own_timm"))):
        assert any(isinstance(m, epmq.QuantLinear) for m in _walk_epmq(tower, expert).modules())


def test_open_clip_coca_decoder_whole_or_alone_refuses_experts_whose_config_reads_it_otherwise(gen, tmp_path):
    """CoCa's captioning decoder (MultimodalTransformer, built by model_cfg's multimodal_cfg) was compared
    with nothing: an expert whose open_clip_config.json gave it other heads at its width (the same shapes)
    or other layers was walked in silence beside the CoCa, and the decoder walked alone took a QuickGELU
    expert too. The decoder is read as its CoCa's multimodal_cfg and the expert's compared with it."""
    import types

    from test_walker_models import COCA_CFG

    coca = Family("open_clip_coca", gen, tasks=["a"], n_samples=1)
    width = COCA_CFG["multimodal_cfg"]["width"]
    decoder = types.SimpleNamespace(merged=lambda: coca.merged().text_decoder, calibration={"a": [{
        "image_embs": torch.randn(2, 5, width, generator=gen), "text_embs": torch.randn(2, 8, width, generator=gen)}]})

    def expert(name, quick_gelu=False, **multimodal):
        model_cfg = {**COCA_CFG, "quick_gelu": quick_gelu,
                     "multimodal_cfg": {**COCA_CFG["multimodal_cfg"], **multimodal}}
        return _open_clip_expert(tmp_path / name, coca.experts["a"].state_dict(), model_cfg)

    with pytest.raises(ValueError, match=r"the expert of task 'a' .*heads.* reads its weights as "
                                         r"\{'multimodal_cfg.heads': 2\}, the model as \{'multimodal_cfg.heads': 4\}"):
        _walk_epmq(coca, heads := expert("heads", heads=2))
    with pytest.raises(ValueError, match=r"counts its layers as \{'multimodal_cfg.layers': 3\}, the model as "
                                         r"\{'multimodal_cfg.layers': 2\}"):
        _walk_epmq(coca, expert("deep", layers=3))
    with pytest.raises(ValueError, match=r"the expert of task 'a' .*heads.*'s open_clip_multimodal_cfg tower reads its "
                                         r"weights as \{'heads': 2\}, the model as \{'heads': 4\}"):
        _walk_epmq(decoder, heads)
    with pytest.raises(ValueError, match=r"'s open_clip_multimodal_cfg tower reads its weights as "
                                         r"\{'quick_gelu': True\}, the model as \{'quick_gelu': False\}"):
        _walk_epmq(decoder, expert("quick", quick_gelu=True))
    own = expert("own")
    for model in (coca, decoder):
        assert any(isinstance(m, epmq.QuantLinear) for m in _walk_epmq(model, own).modules())


def test_open_clip_timm_image_tower_takes_experts_naming_its_model_by_timm_s_hub(gen, tmp_path):
    """An expert's open_clip_config.json naming its timm model by timm's hub repository of its weights
    (hf-hub:timm/<architecture>.<tag>) was refused as another timm model than the tower's own (its
    trunk's architecture, a bare name). It is compared by the architecture it names."""
    from test_walker_models import TIMM_CLIP_CFG

    fam = Family("open_clip_timm", gen, tasks=["a"], n_samples=1)

    def expert(name, timm_model_name):
        return _open_clip_expert(tmp_path / name, fam.experts["a"].state_dict(), {
            **TIMM_CLIP_CFG, "vision_cfg": {**TIMM_CLIP_CFG["vision_cfg"], "timm_model_name": timm_model_name}})

    with pytest.raises(ValueError, match=r"\{'vision_cfg.timm_model_name': 'vit_tiny_patch16_224'\}, the model as "
                                         r"\{'vision_cfg.timm_model_name': 'epmq_tiny_vit'\}"):
        _walk_epmq(fam, expert("other", "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k"))
    model = _walk_epmq(fam, expert("hub", "hf-hub:timm/epmq_tiny_vit.tuned"))
    assert any(isinstance(m, epmq.QuantLinear) for m in model.modules())


def test_open_clip_experts_attending_otherwise_are_refused(gen, tmp_path):
    """Two open_clip settings run weights of the same shapes otherwise and were compared with nothing: a
    text tower built without its causal mask (text_cfg's no_causal_mask, as SigLIP-style towers are), and
    an image tower's attention pool of other heads (vision_cfg's attn_pooler_heads: CoCa's, whose tokens
    its decoder reads). An expert giving either was walked in silence, beside a CLIP or its text tower
    alone; the model's are read off its modules (its mask, its pool's heads) and compared."""
    from test_walker_models import COCA_CFG, VOCAB

    model_cfg = _open_clip_cfg(VOCAB)
    clip = Family("open_clip_clip", gen, tasks=["a"], n_samples=1)
    coca = Family("open_clip_coca", gen, tasks=["a"], n_samples=1)

    text = _open_clip_text_alone(clip, model_cfg)
    bidirectional = _open_clip_expert(tmp_path / "bidirectional", clip.experts["a"].state_dict(), {
        **model_cfg, "text_cfg": {**model_cfg["text_cfg"], "no_causal_mask": True}})
    with pytest.raises(ValueError, match=r"reads its weights as \{'text_cfg.no_causal_mask': True\}, the model as "
                                         r"\{'text_cfg.no_causal_mask': False\}"):
        _walk_epmq(clip, bidirectional)
    with pytest.raises(ValueError, match=r"'s open_clip_text_cfg tower reads its weights as "
                                         r"\{'no_causal_mask': True\}, the model as \{'no_causal_mask': False\}"):
        _walk_epmq(text, bidirectional)
    pooled = {k: v for k, v in COCA_CFG["vision_cfg"].items() if k != "attn_pooler_heads"}  # (open_clip's 8)
    with pytest.raises(ValueError, match=r"reads its weights as \{'vision_cfg.attn_pooler_heads': 8\}, the model as "
                                         r"\{'vision_cfg.attn_pooler_heads': 4\}"):
        _walk_epmq(coca, _open_clip_expert(tmp_path / "pooled", coca.experts["a"].state_dict(),
                                           {**COCA_CFG, "vision_cfg": pooled}))
    causal = _open_clip_expert(tmp_path / "causal", clip.experts["a"].state_dict(), {  # (open_clip's default)
        **model_cfg, "text_cfg": {**model_cfg["text_cfg"], "no_causal_mask": False}})
    for model in (clip, text):
        assert any(isinstance(m, epmq.QuantLinear) for m in _walk_epmq(model, causal).modules())


def test_open_clip_experts_of_another_gelu_or_norm_epsilon_are_refused_or_warned_of(gen, tmp_path):
    """open_clip builds a tower's GELU and LayerNorms with its act_kwargs and norm_kwargs (SigLIP's text
    towers: GELU's tanh approximation, epsilon 1e-6), which were compared with nothing: an expert giving
    others was walked in silence, beside a CLIP or its image tower alone. Another approximation is refused
    (the weights compute otherwise), another epsilon warned of, as a HF config's hidden_act and
    layer_norm_eps are; torch's defaults written out are open_clip's leaving them out."""
    from open_clip.model import CLIP

    from test_walker_models import VOCAB

    model_cfg = _open_clip_cfg(VOCAB)
    clip = Family("open_clip_clip", gen, tasks=["a"], n_samples=1)
    vit = Family("open_clip_vit", gen, tasks=["a"], n_samples=1)

    def expert(name, fam, tower, **kwargs):
        state = fam.experts["a"].state_dict()
        if fam is vit:  # (the tower's weights in its CLIP's checkpoint)
            whole = CLIP(**model_cfg)
            whole.visual.load_state_dict(state)
            state = whole.state_dict()
        return _open_clip_expert(tmp_path / name, state, {**model_cfg, tower: {**model_cfg[tower], **kwargs}})

    with pytest.raises(ValueError, match=r"reads its weights as \{'text_cfg.act_kwargs': \{'approximate': "
                                         r"'tanh'\}\}, the model as \{'text_cfg.act_kwargs': \{\}\}"):
        _walk_epmq(clip, expert("tanh", clip, "text_cfg", act_kwargs={"approximate": "tanh"}))
    with pytest.raises(ValueError, match=r"'s open_clip_vision_cfg tower reads its weights as "
                                         r"\{'act_kwargs': \{'approximate': 'tanh'\}\}"):
        _walk_epmq(vit, expert("vit_tanh", vit, "vision_cfg", act_kwargs={"approximate": "tanh"}))
    with pytest.warns(UserWarning, match=r"'s open_clip_vision_cfg tower runs its weights with \{'norm_kwargs': "
                                         r"\{'eps': 1e-06\}\}, the model with \{'norm_kwargs': \{\}\}"):
        _walk_epmq(vit, expert("vit_eps", vit, "vision_cfg", norm_kwargs={"eps": 1e-6}))
    defaults = expert("defaults", clip, "text_cfg", act_kwargs={"approximate": "none"}, norm_kwargs={"eps": 1e-5})
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        model = _walk_epmq(clip, defaults)
    assert not [str(w.message) for w in said if "expert" in str(w.message)]
    assert any(isinstance(m, epmq.QuantLinear) for m in model.modules())


def test_open_clip_experts_pooling_other_tokens_are_refused(gen, tmp_path):
    """open_clip's pool_type (which token a text tower's features are taken from: its EOT, "argmax", or
    its last, first or EOS token) pools the same weights otherwise and was compared with nothing: an expert
    whose text tower pooled its last token was walked in silence, beside a CLIP or its text tower alone.
    The model's pool is read off its modules (a CLIP's text_pool_type, a tower's pool_type, its class
    token) and compared."""
    from test_walker_models import VOCAB

    model_cfg = _open_clip_cfg(VOCAB)
    clip = Family("open_clip_clip", gen, tasks=["a"], n_samples=1)

    text = _open_clip_text_alone(clip, model_cfg)

    def expert(name, **text_cfg):
        return _open_clip_expert(tmp_path / name, clip.experts["a"].state_dict(),
                                 {**model_cfg, "text_cfg": {**model_cfg["text_cfg"], **text_cfg}})

    last = expert("last", pool_type="last")
    with pytest.raises(ValueError, match=r"reads its weights as \{'text_cfg.pool_type': 'last'\}, the model as "
                                         r"\{'text_cfg.pool_type': 'argmax'\}"):
        _walk_epmq(clip, last)
    with pytest.raises(ValueError, match=r"'s open_clip_text_cfg tower reads its weights as "
                                         r"\{'pool_type': 'last'\}, the model as \{'pool_type': 'argmax'\}"):
        _walk_epmq(text, last)
    own = expert("own", pool_type="argmax", eos_id=5)  # (an EOS id no pool reads)
    for model in (clip, text):
        assert any(isinstance(m, epmq.QuantLinear) for m in _walk_epmq(model, own).modules())


def test_open_clip_s_shipped_configs_are_read_as_the_models_they_build():
    """Each of open_clip's bundled model configs, its sizes made tiny, is read as the model it builds
    reads itself (its class token, pool, mask and heads as its modules run them): none is refused as its
    own model's expert. Those naming a timm or HF model (built from theirs) are compared with themselves."""
    from open_clip.coca_model import CoCa
    from open_clip.factory import _MODEL_CONFIGS
    from open_clip.model import CLIP, CustomTextCLIP

    from epmq.merge_checkpoint import _check_architectures, _open_clip_config
    from epmq.walker import _config_of

    assert _MODEL_CONFIGS
    for name, shipped in _MODEL_CONFIGS.items():
        config = _open_clip_config({"model_cfg": shipped})
        reference = config
        if not (shipped["vision_cfg"].get("timm_model_name") or shipped["text_cfg"].get("hf_model_name")):
            model_cfg = json.loads(json.dumps(shipped))
            model_cfg["embed_dim"] = 16
            vision = model_cfg["vision_cfg"]
            if isinstance(vision["layers"], list):  # (a ResNet)
                vision.update(layers=[1, 1, 1, 1], width=8, image_size=32)
            else:
                vision.update(layers=1, width=32, head_width=8, patch_size=8, image_size=16, attn_pooler_queries=4,
                              **({"attn_pooler_heads": 4} if vision.get("attentional_pool") else {}))
            for tower in ("text_cfg", "multimodal_cfg"):
                if tower in model_cfg:
                    model_cfg[tower].update(width=32, heads=4, layers=1, vocab_size=64, context_length=8)
            custom = model_cfg.pop("custom_text", False)
            built = (CoCa if "multimodal_cfg" in model_cfg else CustomTextCLIP) if custom else CLIP
            reference = _config_of(built(**model_cfg))
            config = _open_clip_config({"model_cfg": {**model_cfg, "custom_text": custom}})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _check_architectures(None, [None], [name], reference=reference, configs=[config])


def test_open_clip_custom_text_clip_in_memory_refuses_a_coca_expert():
    """A CustomTextCLIP and a CoCa are both built with custom_text; the CoCa's decoder (multimodal_cfg,
    text_decoder.*) was compared only where both configs gave one, and a CustomTextCLIP read from its modules
    gave none, so a CoCa's open_clip_config.json was taken as its expert. Read as built without one, the
    CoCa is refused naming multimodal_cfg; a CoCa read from its modules is its own config's model."""
    from open_clip.coca_model import CoCa
    from open_clip.model import CustomTextCLIP

    from epmq.merge_checkpoint import _check_architectures, _open_clip_config
    from epmq.walker import _config_of

    text = dict(width=32, heads=4, layers=1, vocab_size=64, context_length=8)
    model_cfg = dict(embed_dim=16, text_cfg=text, vision_cfg=dict(layers=1, width=32, head_width=8, patch_size=8,
                                                                  image_size=16))
    decoder = dict(text, attn_pooler_heads=4)
    coca = _open_clip_config({"model_cfg": {**model_cfg, "multimodal_cfg": decoder, "custom_text": True}})
    with pytest.raises(ValueError, match=r"reads its weights as \{'multimodal_cfg': \{.*\}, the model as "
                                         r"\{'multimodal_cfg': None\}"):
        _check_architectures(None, [None], ["coca"], experts=True, reference=_config_of(CustomTextCLIP(**model_cfg)),
                             configs=[coca])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_architectures(None, [None], ["coca"], experts=True,
                             reference=_config_of(CoCa(**model_cfg, multimodal_cfg=decoder)), configs=[coca])


def test_open_clip_hf_text_tower_whole_or_alone_refuses_experts_built_otherwise(gen, tmp_path):
    """An open_clip text tower that is HF's (HFTextEncoder) walked alone was read as its HF model's config
    (an 'xlm-roberta' one), so its own open_clip checkpoint was refused as another architecture; inside its
    CLIP it was read as nothing, so an expert giving another pooler (hf_pooler_type), projection
    (hf_proj_type) or HF model (hf_model_name) was walked in silence. The tower is read as its CLIP's
    text_cfg, as it was built (its pooler's and projection's classes, its HF config's name_or_path), its HF
    model's config a tower of it (a fine-tune of the HF model alone is compared with that)."""
    import copy

    import transformers
    from open_clip.model import CustomTextCLIP

    transformers.XLMRobertaModel(transformers.XLMRobertaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=20, pad_token_id=1)).save_pretrained(tmp_path / "xlm-roberta-base")
    text_cfg = dict(hf_model_name=str(tmp_path / "xlm-roberta-base"), hf_proj_type="linear",
                    hf_pooler_type="mean_pooler", hf_model_pretrained=False, context_length=8)
    model_cfg = dict(embed_dim=16, text_cfg=text_cfg, custom_text=True, vision_cfg=dict(
        layers=1, width=32, head_width=8, image_size=16, patch_size=8, mlp_ratio=2.0))
    clip = CustomTextCLIP(**{k: v for k, v in model_cfg.items() if k != "custom_text"}).eval()
    clip.text.config.name_or_path = "xlm-roberta-base"  # (as read from the hub)
    text = torch.ones(2, 8, dtype=torch.long)  # (1: the pad id)
    text[:, :5] = torch.randint(2, 64, (2, 5), generator=gen)
    whole = {"a": [{"image": torch.randn(2, 3, 16, 16, generator=gen), "text": text}]}

    def walk(model, calibration, experts):
        model = copy.deepcopy(model)
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", calibration=calibration,
                            experts=experts, backend="torch", progress=False)
        return model

    def expert(name, **changes):
        changes = {"hf_model_name": "xlm-roberta-base", **changes}
        return _open_clip_expert(tmp_path / name, clip.state_dict(), {**model_cfg, "text_cfg": {**text_cfg, **changes}})

    for model, calibration in ((clip, whole), (clip.text, {"a": [text]})):
        scope = "text_cfg." if model is clip else ""
        with pytest.raises(ValueError, match=rf"reads its weights as \{{'{scope}hf_pooler_type': 'cls_pooler'\}}, "
                                             rf"the model as \{{'{scope}hf_pooler_type': 'mean_pooler'\}}"):
            walk(model, calibration, expert(f"cls_{bool(scope)}", hf_pooler_type="cls_pooler"))
        with pytest.raises(ValueError, match=rf"\{{'{scope}hf_proj_type': 'mlp'\}}, the model as "
                                             rf"\{{'{scope}hf_proj_type': 'linear'\}}"):
            walk(model, calibration, expert(f"mlp_{bool(scope)}", hf_proj_type="mlp"))
        with pytest.raises(ValueError, match=rf"\{{'{scope}hf_model_name': 'FacebookAI/roberta-base'\}}, the model as "
                                             rf"\{{'{scope}hf_model_name': 'xlm-roberta-base'\}}"):
            walk(model, calibration, expert(f"roberta_{bool(scope)}", hf_model_name="FacebookAI/roberta-base"))
        own = expert(f"own_{bool(scope)}", hf_model_name="FacebookAI/xlm-roberta-base")
        assert any(isinstance(m, epmq.QuantLinear) for m in walk(model, calibration, own).modules())
    # (the tower alone takes a fine-tune of its HF model alone, compared with the HF model's config it holds)
    for heads in (4, 2):
        transformers.XLMRobertaModel(transformers.XLMRobertaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=heads,
            max_position_embeddings=20, pad_token_id=1), add_pooling_layer=False).save_pretrained(tmp_path / str(heads))
    tower = walk(clip.text, {"a": [text]}, {"a": str(tmp_path / "4")})
    assert any(isinstance(m, epmq.QuantLinear) for m in tower.modules())
    with pytest.raises(ValueError, match=r"reads its weights as \{'num_attention_heads': 2\}, the model's xlm-roberta "
                                         r"tower as \{'num_attention_heads': 4\}"):
        walk(clip.text, {"a": [text]}, {"a": str(tmp_path / "2")})


def test_an_open_clip_image_tower_of_an_empty_string_attentional_pool_pools_by_its_pool_type():
    """open_clip builds an attention pool where attentional_pool is truthy, a string one pooling
    "none": an empty string builds none, its tower pooling by pool_type. Read as "none", such a
    config was refused as its own model's expert."""
    from open_clip.model import CLIP

    from epmq.merge_checkpoint import _check_architectures, _open_clip_config
    from epmq.walker import _config_of

    for attentional in ("", False, "parallel"):
        model_cfg = {"embed_dim": 16, "vision_cfg": {"layers": 1, "width": 32, "head_width": 8, "patch_size": 8,
                                                     "image_size": 16, "attentional_pool": attentional,
                                                     "attn_pooler_queries": 4, "attn_pooler_heads": 4},
                     "text_cfg": {"width": 32, "heads": 4, "layers": 1, "vocab_size": 64, "context_length": 8}}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _check_architectures(None, [None], ["own"], reference=_config_of(CLIP(**model_cfg)),
                                 configs=[_open_clip_config({"model_cfg": model_cfg})])


def test_an_open_clip_model_built_with_other_block_options_takes_its_own_checkpoint_config():
    """open_clip's block options (LayerScale, q and k norms, ...), pre-norm and text projection are
    compared with open_clip's defaults filled in; a model in memory is not read for them: filled in as
    the defaults there, a model built with others refused its own checkpoint's config."""
    from open_clip.model import CLIP

    from epmq.merge_checkpoint import _check_architectures, _open_clip_config
    from epmq.walker import _config_of

    blocks = {"ls_init_value": 0.1, "qk_norm": True, "scale_fc": True}
    model_cfg = {"embed_dim": 16, "vision_cfg": {"layers": 1, "width": 32, "head_width": 8, "patch_size": 8,
                                                 "image_size": 16, "no_ln_pre": True, **blocks},
                 "text_cfg": {"width": 32, "heads": 4, "layers": 1, "vocab_size": 64, "context_length": 8,
                              "proj_type": "none", **blocks}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_architectures(None, [None], ["own"], reference=_config_of(CLIP(**model_cfg)),
                             configs=[_open_clip_config({"model_cfg": model_cfg})])


def test_an_open_clip_model_in_memory_takes_its_own_checkpoint_config_of_any_tokenizer():
    """No module of an open_clip model holds its tokenizer (hf_tokenizer_name, tokenizer_mode, tokenizer_kwargs,
    a HF text tower's context_length): a model in memory is not read for them, and its own checkpoint's config
    naming a tokenizer is its expert's, not refused as tokenizing its texts otherwise than open_clip's default."""
    from open_clip.model import CLIP

    from epmq.merge_checkpoint import _check_architectures, _open_clip_config
    from epmq.walker import _config_of

    model_cfg = {"embed_dim": 16, "vision_cfg": {"layers": 1, "width": 32, "head_width": 8, "patch_size": 8,
                                                 "image_size": 16},
                 "text_cfg": {"width": 32, "heads": 4, "layers": 1, "vocab_size": 64, "context_length": 8}}
    tokenizer = {"hf_tokenizer_name": "timm/ViT-B-16-SigLIP", "tokenizer_mode": "clips",
                 "tokenizer_kwargs": {"clean": "canonicalize"}}
    saved = {**model_cfg, "text_cfg": {**model_cfg["text_cfg"], **tokenizer}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_architectures(None, [None], ["own"], reference=_config_of(CLIP(**model_cfg)),
                             configs=[_open_clip_config({"model_cfg": saved})])


def test_open_clip_experts_are_compared_with_the_tokenizer_files_where_the_models_name_or_path_points(gen, tmp_path):
    """A model in memory keeps no tokenizer: open_clip experts tokenized by their directories' own files were
    compared among themselves alone, so a lone expert of other files than the model's was walked in silence. A
    model told where its files are (name_or_path, as from_pretrained sets it on a HF model) has each expert's
    compared with them."""
    import copy

    from open_clip.model import CLIP

    from test_merge_checkpoint import _word_tokenizer

    model_cfg = {"embed_dim": 16, "vision_cfg": {"layers": 1, "width": 32, "head_width": 8, "patch_size": 8,
                                                 "image_size": 16},
                 "text_cfg": {"width": 32, "heads": 4, "layers": 1, "vocab_size": 64, "context_length": 8}}
    clip = CLIP(**model_cfg).eval()
    saved = {**model_cfg, "text_cfg": {**model_cfg["text_cfg"], "hf_tokenizer_name": "someone/tok"}}
    expert = _open_clip_expert(tmp_path / "expert", clip.state_dict(), saved)
    _word_tokenizer(expert["a"], ["<unk>", "dog", "cat"])
    (tmp_path / "own").mkdir()
    _word_tokenizer(tmp_path / "own", ["<unk>", "cat", "dog"])
    batch = {"image": torch.randn(2, 3, 16, 16, generator=gen), "text": torch.randint(0, 64, (2, 8), generator=gen)}

    def walk(home):
        model = copy.deepcopy(clip)
        model.name_or_path = str(home)
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", calibration={"a": [batch]},
                            experts=expert, backend="torch", progress=False,
                            layers=r"transformer\.resblocks\.0\.mlp\.c_fc")

    with pytest.raises(ValueError, match=r"the expert of task 'a' \(\S*expert\) holds other tokenizer files than "
                                         r"the model \(\S*own\) \(other contents of tokenizer\.json\)"):
        walk(tmp_path / "own")
    walk(expert["a"])


@pytest.mark.parametrize("late", [KeyboardInterrupt, RuntimeError])
def test_an_error_after_a_refusal_the_model_caught_is_raised_as_itself(late):
    """The guard of placeholders raises the refusal of a use in place of the TorchScript interpreter's
    RuntimeError around it; it raised it in place of any error that followed a refusal the model
    caught (a fallback path), a KeyboardInterrupt or the block's own error too."""
    from epmq.walker import _Placeholders

    class Refused(ValueError):
        pass

    placeholders, weight = _Placeholders(), torch.ones(3)
    placeholders.hold("w", weight, Refused, "w unread")
    with pytest.raises(late, match="its own"):
        with placeholders:
            with pytest.raises(Refused):
                weight.sum()
            raise late("its own")


def test_open_clip_experts_tokenized_by_other_tokenizer_files_are_refused_as_a_merge_refuses_them(gen, tmp_path):
    """open_clip tokenizes a model loaded from its directory (local-dir:) by that directory's own tokenizer
    files, which its hf_tokenizer_name does not say: the merges refuse models whose files differ, but
    quantize_model compared none (a LoRA adapter was compared by its base's path, and the model in memory,
    which keeps no directory, gave none to compare with), so experts tokenizing the calibration texts as other
    tokens were walked in silence. The experts' files are compared with the first's, in the merges' words (an
    adapter's own, else its base's: the one given, not the one its config names)."""
    import copy

    from open_clip.model import CLIP

    from test_merge_checkpoint import _word_tokenizer

    model_cfg = {"embed_dim": 16, "vision_cfg": {"layers": 1, "width": 32, "head_width": 8, "patch_size": 8,
                                                 "image_size": 16},
                 "text_cfg": {"width": 32, "heads": 4, "layers": 1, "vocab_size": 64, "context_length": 8}}
    clip = CLIP(**model_cfg).eval()
    saved = {**model_cfg, "text_cfg": {**model_cfg["text_cfg"], "hf_tokenizer_name": "someone/tok"}}

    def checkpoint(name, words=("<unk>", "cat", "dog")):
        path = _open_clip_expert(tmp_path / name, clip.state_dict(), saved)["a"]
        if words:
            _word_tokenizer(path, list(words))
        return path

    def adapter(name, named, words=(), base=None):
        path = tmp_path / name
        path.mkdir()
        module = "transformer.resblocks.0.mlp.c_fc"
        save_file({f"base_model.model.{module}.lora_A.weight": torch.randn(4, 32, generator=gen),
                   f"base_model.model.{module}.lora_B.weight": torch.zeros(128, 4)},
                  str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_fc"],
             "base_model_name_or_path": str(named)}))
        if words:
            _word_tokenizer(path, list(words))
        return epmq.LoraExpert(path, base, prefix="")  # (the text tower's blocks, as named: the image tower's fit too)

    text = torch.randint(0, 64, (2, 8), generator=gen)
    batch = {"image": torch.randn(2, 3, 16, 16, generator=gen), "text": text}

    def walk(b):
        epmq.quantize_model(copy.deepcopy(clip), epmq.QuantSpec(bits=4, group_size=16), method="epmq",
                            calibration={"a": [batch], "b": [batch]}, experts={"a": first, "b": b},
                            backend="torch", progress=False, layers=r"transformer\.resblocks\.0\.mlp\.c_fc")

    first = checkpoint("first")
    refused = (r"the expert of task 'b' \([^()]*{}[^()]*\) holds other tokenizer files than the expert of task 'a' "
               r"\(\S*first\) \(other contents of tokenizer\.json\): open_clip tokenizes a model loaded from its "
               r"directory \(local-dir:\) by that directory's own files.*E-PMQ's experts must be of the model's "
               r"tokenizer")
    with pytest.raises(ValueError, match=refused.format("swapped")):
        walk(checkpoint("swapped", ("<unk>", "dog", "cat")))
    with pytest.raises(ValueError, match=refused.format("own")):
        walk(adapter("own", first, ("<unk>", "dog", "cat")))
    walk(adapter("bare", first))  # (tokenized by its base's files)
    # (the base it is read on, where one is given: not the one its config names)
    other_base = checkpoint("other_base", ("<unk>", "dog", "cat"))
    with pytest.raises(ValueError, match=refused.format("named_first")):
        walk(adapter("named_first", first, base=other_base))
    walk(adapter("named_other", other_base, base=first))
