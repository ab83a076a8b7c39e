"""Bad input gets a clear error, and a failed quantization leaves the model as it was."""

import ast
import copy
import dataclasses
import gc
import re
import signal
import types
import warnings
import weakref

import pytest
import torch
import transformers
from torch import nn
from torch.nn import functional as F

import epmq
from epmq import quant
from test_walker_models import Family, build, inputs, output, rel_err

SPEC = epmq.QuantSpec(bits=4, group_size=16)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=True, msg=k)


def quantize(fam, model, **kw):
    args = dict(method="epmq", calibration=fam.calibration, experts=fam.experts, backend="torch", progress=False)
    args.update(kw)
    return epmq.quantize_model(model, SPEC, **args)


def test_a_report_that_cannot_be_written_leaves_the_old_file_whole(tmp_path):
    """QuantReport.to_json wrote into the file it had truncated, so a value JSON cannot hold (or
    a kill, a full disk) left the report cut where the old one had been: it is written beside
    and renamed over it, the old file whole until the new one is."""
    from epmq.walker import QuantReport

    path = tmp_path / "report.json"
    QuantReport("gptq", "merged_path", {"bits": 4}, "llama", ["a"]).to_json(path)
    before = path.read_text()
    bad = QuantReport("gptq", "merged_path", {"bits": 4}, "llama", ["a"], layers=[{"loss": object()}])
    with pytest.raises(TypeError, match="not JSON serializable"):
        bad.to_json(path)
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_model_that_is_no_module_is_named(tmp_path):
    """A checkpoint's path, its state dict or None given as the model ended in a bare
    "'str' object has no attribute 'named_modules'" (quantize_model) or the same of the state
    dict (save_quantized); refused naming the argument, the path with the function that reads it."""
    for model in (str(tmp_path), {"w": torch.zeros(2, 2)}, None):
        with pytest.raises(TypeError, match=r"model must be a torch nn.Module .*got "
                                            + ("str.*quantize_checkpoint" if isinstance(model, str) else "")):
            epmq.quantize_model(model, SPEC, method="rtn", progress=False)
        with pytest.raises(TypeError, match=r"model must be a torch nn.Module .*quantized by epmq.quantize_model"):
            epmq.save_quantized(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_expert_of_another_shape_names_the_tensor(gen, tmp_path):
    fam = Family("llama", gen)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "wide")
    model = fam.merged()
    before = snapshot(model)
    experts = dict(fam.experts, dtd=str(tmp_path / "wide"))
    with pytest.raises(ValueError, match=r"'dtd'.*model\.layers\.0\.mlp\.gate_proj\.weight.*shape \(48, 32\)"):
        quantize(fam, model, experts=experts)
    assert_untouched(model, before)


def test_expert_of_another_architecture_names_the_missing_tensor(gen):
    fam = Family("llama", gen)
    model = fam.merged()
    experts = dict(fam.experts, svhn=build("t5").state_dict())
    with pytest.raises(ValueError, match=r"'svhn'.*has no tensor 'model\.layers\.0\.self_attn\.q_proj\.weight'"):
        quantize(fam, model, experts=experts)


def test_tasks_must_match_between_calibration_and_experts(gen):
    fam = Family("llama", gen)
    experts = {t: e for t, e in fam.experts.items() if t != "dtd"}
    with pytest.raises(ValueError, match=r"\['dtd'\] have calibration data but no expert"):
        quantize(fam, fam.merged(), experts=experts)
    calibration = {t: c for t, c in fam.calibration.items() if t != "svhn"}
    with pytest.raises(ValueError, match=r"\['svhn'\] have an expert but no calibration data"):
        quantize(fam, fam.merged(), calibration=calibration)
    # (a task named otherwise on each side: both names said)
    renamed = {("svhm" if t == "svhn" else t): e for t, e in fam.experts.items()}
    with pytest.raises(ValueError, match=r"\['svhn'\] have calibration data but no expert; "
                                         r"tasks \['svhm'\] have an expert but no calibration data"):
        quantize(fam, fam.merged(), experts=renamed)


def test_method_arguments(gen):
    fam = Family("llama", gen, n_samples=1)
    model = fam.merged()
    with pytest.raises(ValueError, match="uses no experts"):
        quantize(fam, model, method="gptq")
    with pytest.raises(ValueError, match="uses no experts"):
        quantize(fam, model, method="rtn")
    with pytest.raises(ValueError, match="needs experts"):
        quantize(fam, model, experts=None)
    with pytest.raises(ValueError, match="needs calibration"):
        quantize(fam, model, method="gptq", experts=None, calibration=None)
    with pytest.raises(ValueError, match="'expert_path' needs experts"):
        quantize(fam, model, method="gptq", experts=None, targets="expert_path")
    with pytest.raises(ValueError, match="targets must be"):
        quantize(fam, model, targets="fp")
    with pytest.raises(ValueError, match="is empty"):
        quantize(fam, model, calibration={t: [] for t in fam.tasks})
    with pytest.raises(ValueError, match=r"item 0: input_ids \(1, 0\) is empty: nothing to calibrate on"):
        quantize(fam, model, calibration={t: [dict(input_ids=torch.zeros(1, 0, dtype=torch.long))] for t in fam.tasks})
    with pytest.raises(ValueError, match="no layer .* is selected"):
        quantize(fam, model, layers="nothing-matches")
    with pytest.raises(ValueError, match="no layer .* is selected"):  # (a compiled pattern is one too)
        quantize(fam, model, layers=re.compile("nothing-matches"))
    # (a predicate's error printed its repr, 'layers=<function <lambda> at 0x7f...>', and named no
    # linear it was asked of: which stacks were considered, and a name it refused)
    with pytest.raises(ValueError, match=r"the layers= predicate selects none of the \d+ linears of the blocks at "
                                         r"model\.layers \(e\.g\. model\.layers\.0\.self_attn\.q_proj\)") as e:
        quantize(fam, model, layers=lambda name: False)
    assert "<function" not in str(e.value)
    with pytest.raises(ValueError, match=r"layers='nothing-matches' matches none of the \d+ linears of the blocks at "
                                         r"model\.layers \(e\.g\. model\.layers\.0\.self_attn\.q_proj\)"):
        quantize(fam, model, layers="nothing-matches")
    with pytest.raises(ValueError, match="residual_precision must be one of"):
        quantize(fam, model, residual_precision="fp16")
    for bad in (dict(anchor=float("inf")), dict(weight_anchor=float("nan")), dict(percdamp=float("inf")),
                dict(percdamp="0.01"), dict(anchor=-1.0)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be"):
            quantize(fam, model, **bad)
    with pytest.raises(ValueError, match="blocksize must be a positive integer"):
        quantize(fam, model, blocksize=0)
    with pytest.raises(ValueError, match="backend must be"):  # (RTN does not use it, but it is misspelt)
        quantize(fam, model, method="rtn", experts=None, calibration=None, backend="trition")
    # calibration the model cannot run: named as the calibration's
    with pytest.raises(ValueError, match=r"calibration\['.*'\] item 0: the model cannot run it \(IndexError"):
        quantize(fam, model, calibration={t: [torch.full((1, 4), 10**4)] for t in fam.tasks})
    # a misspelt input's name, or another modality's input: the model's own ValueError (transformers'
    # "You must specify exactly one of input_ids or inputs_embeds") came bare, naming no item
    for item in (dict(input_idz=torch.zeros(1, 4, dtype=torch.long)), dict(pixel_values=torch.randn(1, 3, 8, 8))):
        with pytest.raises(ValueError, match=r"calibration\['a'\] item 0: the model cannot run it \(ValueError: "
                                             r"You must specify exactly one of input_ids or inputs_embeds"):
            quantize(fam, model, method="gptq", experts=None, calibration={"a": [item]})
    # inputs_embeds bypass the embedding: the first block's failure, and items that disagree, too
    width = model.config.hidden_size
    for embeds, match in ((torch.randn(1, 4, width, dtype=torch.float64), r"item 0: the block 'model.layers.0' "
                           r"cannot run on its input \(RuntimeError"),
                          (torch.randn(1, 4, width - 1), r"item 0: the block 'model.layers.0' cannot run"),
                          (torch.ones(1, 4, width, dtype=torch.long), r"item 0: .* get torch.int64 hidden states")):
        with pytest.raises(ValueError, match=r"calibration\['.*'\] " + match):
            quantize(fam, model, method="gptq", experts=None, calibration={"a": [dict(inputs_embeds=embeds)]})
    # (but running out of memory is no calibration's fault: it stays what it is)
    handle = model.model.layers[0].register_forward_pre_hook(
        lambda *_: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory")))
    try:
        with pytest.raises(torch.OutOfMemoryError):
            quantize(fam, model, method="gptq", experts=None)
    finally:
        handle.remove()
    good = dict(inputs_embeds=torch.randn(1, 4, width))
    with pytest.raises(ValueError, match=r"calibration\['b'\] item 1: .* torch.float64 hidden states 32 wide, "
                                         r"calibration\['a'\] item 0 gives them torch.float32 and 32 wide"):
        quantize(fam, model, method="gptq", experts=None,
                 calibration={"a": [good], "b": [good, dict(inputs_embeds=torch.randn(1, 4, width).double())]})
    # an expert of more blocks than the model (the other way round, a missing tensor, is named too)
    deeper = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**dict(model.config.to_dict(), num_hidden_layers=3)))
    with pytest.raises(ValueError, match="has more blocks at 'model.layers' than the merged model's 2"):
        quantize(fam, model, experts=dict(fam.experts, **{fam.tasks[0]: deeper.state_dict()}))
    # (the module, by its config, before any tensor is read)
    with pytest.raises(ValueError, match=r"counts its layers as \{'num_hidden_layers': 3\}, the model as "
                                         r"\{'num_hidden_layers': 2\}"):
        quantize(fam, model, experts=dict(fam.experts, **{fam.tasks[0]: deeper}))
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())
    quantize(fam, model, method="rtn", experts=None, calibration=None)
    with pytest.raises(ValueError, match="already quantized"):
        quantize(fam, model, method="rtn", experts=None, calibration=None)


def test_an_expert_of_more_routed_experts_is_refused(tmp_path):
    """An MoE expert checkpoint of more routed experts per block than the merged model (saved one
    tensor per expert, as save_pretrained and the hub hold them) has every tensor the walk reads:
    refused as another configuration, as it is in memory (its fused tensors' shapes differ). One
    of fewer is refused naming the expert's tensor it lacks."""
    def qwen3_moe(num_experts):
        torch.manual_seed(0)
        return transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, num_experts=num_experts, num_experts_per_tok=2,
            moe_intermediate_size=16)).eval()

    qwen3_moe(8).save_pretrained(tmp_path / "eight")
    qwen3_moe(4).save_pretrained(tmp_path / "four")
    calibration = {"a": [torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))]}
    for expert in (tmp_path / "eight", qwen3_moe(8).state_dict()):
        model = qwen3_moe(4)
        before = snapshot(model)
        with pytest.raises(ValueError, match=r"more routed experts|has shape \(8,"):
            epmq.quantize_model(model, SPEC, method="epmq", calibration=calibration, experts={"a": expert},
                                progress=False)
        assert_untouched(model, before)
    with pytest.raises(ValueError, match=r"has more routed experts at 'model.layers.0.mlp.experts' than the merged "
                                         r"model's 4 \(it holds 'model.layers.0.mlp.experts.4.gate_proj.weight'\)"):
        epmq.quantize_model(qwen3_moe(4), SPEC, method="epmq", calibration=calibration,
                            experts={"a": tmp_path / "eight"}, progress=False)
    # one expert's tensors missing: named, not the fused tensor such a checkpoint never holds
    from safetensors.torch import load_file, save_file

    (tmp_path / "three").mkdir()
    save_file({k: v for k, v in load_file(tmp_path / "four" / "model.safetensors").items() if ".experts.3." not in k},
              tmp_path / "three" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "three" / "config.json").write_text((tmp_path / "four" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"has no tensor 'model.layers.0.mlp.experts.3.gate_proj.weight', nor "
                                         r"'model.layers.0.mlp.experts.gate_up_proj' holding it"):
        epmq.quantize_model(qwen3_moe(4), SPEC, method="epmq", calibration=calibration,
                            experts={"a": tmp_path / "three"}, progress=False)
    model = qwen3_moe(4)  # (an expert of the model's own count is taken)
    epmq.quantize_model(model, SPEC, method="epmq", calibration=calibration, experts={"a": tmp_path / "four"},
                        progress=False)
    assert any(isinstance(m, epmq.QuantLinear) for m in model.modules())


def test_a_layer_the_models_own_loading_ignores_is_no_extra_block(tmp_path):
    """DeepSeek-V3 and GLM-4.5 save a multi-token prediction layer as the layer after the last,
    which transformers ignores on load (``_keys_to_ignore_on_load_unexpected``): their own
    checkpoints are experts of their own architecture, not of another depth."""
    from safetensors.torch import save_file

    class WithPredictionLayer(transformers.LlamaForCausalLM):
        _keys_to_ignore_on_load_unexpected = [r"model\.layers\.2\..*"]

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4)
    torch.manual_seed(0)
    model = WithPredictionLayer(config).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.update({k.replace("layers.0.", "layers.2."): v.clone() for k, v in state.items()
                  if k.startswith("model.layers.0.")})
    save_file(state, str(tmp_path / "expert.safetensors"))
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=32), method="epmq",
                        calibration={"a": [{"input_ids": torch.randint(0, 64, (2, 8))}]},
                        experts={"a": str(tmp_path / "expert.safetensors")}, progress=False)
    assert len(model.epmq_report.layers) == 14


def test_meta_devices_and_weights_are_refused(gen):
    fam = Family("llama", gen, n_samples=1)
    model = fam.merged()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="device='meta' holds no values"):
        quantize(fam, model, method="gptq", experts=None, device="meta")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="on the meta device .* never loaded"):
        quantize(fam, fam.merged().to("meta"), method="gptq", experts=None)


def test_a_buffer_left_on_the_meta_device_is_named(gen):
    """A model built under ``torch.device("meta")`` and loaded with ``load_state_dict(assign=
    True)``: its non-persistent buffers (rotary ``inv_freq``) are in no state dict and stay on
    the meta device. The walk said "the model cannot run it (Cannot copy out of meta tensor)",
    as if the calibration item were at fault; it names the tensor."""
    fam = Family("llama", gen, n_samples=1)
    with torch.device("meta"):
        model = build("llama")
    model.load_state_dict(fam.merged_state, assign=True)
    with pytest.raises(ValueError, match=r"the model's model\.rotary_emb\.inv_freq is on the meta device: "
                                         r"it was never loaded"):
        quantize(fam, model, method="gptq", experts=None)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("arch", ["hf_clip_vision", "open_clip_vit"])
def test_a_labelled_batch_given_by_position_is_named(gen, arch, batch):
    """A labelled dataset's batches, ``(images, labels)`` as a torchvision ImageFolder's DataLoader
    yields them: the labels went to the forward's second parameter, and the walk said only the
    model's error ("Boolean value of Tensor with more than one value is ambiguous" for HF CLIP's
    vision tower, whose second is interpolate_pos_encoding; "takes 2 positional arguments but 3
    were given" for open_clip's): which parameters the elements went to is named. A batch of one
    image's label, a tensor of one value, passed as interpolate_pos_encoding's bool: the walk ran,
    the flag set by the label; a tensor given to a flag is refused before the model runs."""
    fam = Family(arch, gen, n_samples=1)
    model = fam.merged()
    before = snapshot(model)
    images = {t: (item["pixel_values"] if isinstance(item, dict) else item)[:batch]
              for t, (item,) in fam.calibration.items()}
    labelled = {t: [(x, 1 + torch.arange(x.shape[0]))] for t, x in images.items()}
    said, went = ((r"interpolate_pos_encoding is a flag, given a tensor", r"interpolate_pos_encoding")
                  if arch == "hf_clip_vision" else (r"the model cannot run it \(.*\)", r"takes 1 \(x\)"))
    with pytest.raises(ValueError, match=rf"item 0: {said}; its 2 elements were given by position, .*{went}.*"
                                         r"\(inputs, labels\)"):
        quantize(fam, model, method="gptq", experts=None, calibration=labelled)
    assert_untouched(model, before)


def test_an_encoder_decoders_item_without_the_decoders_inputs_is_named(gen):
    """T5 calibrated as a causal LM is, on its input_ids alone (a dict, a bare tensor, or a tuple of them
    and their mask): its decoder had nothing to run on, and the walk said transformers' "You must
    specify exactly one of input_ids or inputs_embeds" of items that hold input_ids. The missing
    decoder inputs are named; an item with them runs."""
    fam = Family("t5", gen, n_samples=1)
    model = fam.merged()
    before = snapshot(model)
    ids = next(iter(fam.calibration.values()))[0]["input_ids"]
    for item in (dict(input_ids=ids), ids, (ids, torch.ones_like(ids))):
        with pytest.raises(ValueError, match=r"item 0: the model cannot run it \(ValueError: .*\); an encoder-decoder "
                                             r"\(T5ForConditionalGeneration\) runs its decoder on labels .* or "
                                             r"decoder_input_ids, and the item has neither"):
            quantize(fam, model, method="gptq", experts=None, calibration={"a": [item]})
    assert_untouched(model, before)
    quantize(fam, model, method="gptq", experts=None,
             calibration={"a": [dict(input_ids=ids, labels=ids[:, :3])], "b": [(ids, None, ids[:, :3])]})


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_labels_for_an_encoder_decoder_without_a_head_are_refused(gen, family, headless_encoder_decoder):
    """T5Model and BartModel take no labels: their forward's **kwargs dropped them, T5Model's decoder then
    had no input (refused as "You must specify exactly one of input_ids or inputs_embeds", of items
    holding input_ids), BartModel's ran on the inputs shifted, calibrated on them with nothing said.
    Refused naming the labels and decoder_input_ids, which run."""
    ids = torch.randint(3, 32, (1, 6), generator=gen)
    model = headless_encoder_decoder(family).eval()
    before = snapshot(model)
    labelled = {"a": [dict(input_ids=ids, labels=ids[:, :3])]}
    with pytest.raises(ValueError, match=rf"calibration\['a'\] item 0: {type(model).__name__}'s forward takes no "
                                         r"labels, so its decoder would not read them: give decoder_input_ids"):
        epmq.quantize_model(model, SPEC, method="gptq", calibration=labelled, progress=False)
    assert_untouched(model, before)
    epmq.quantize_model(model, SPEC, method="gptq", progress=False,
                        calibration={"a": [dict(input_ids=ids, decoder_input_ids=ids[:, :3])]})


@pytest.mark.parametrize("targets", ["merged_path", "expert_path"])
def test_an_expert_on_the_meta_device_is_named(gen, targets):
    """An expert module built on the meta device (``torch.device("meta")``, accelerate's
    ``init_empty_weights``) and never loaded: torch's "Cannot copy out of meta tensor; no
    data!" came out of the walk, naming neither the expert nor the tensor."""
    fam = Family("llama", gen, n_samples=1)
    with torch.device("meta"):
        empty = build("llama")
    model = fam.merged()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"expert of task 'dtd' .*tensor 'model\..*' is on the meta device "
                                         r"\(its weights were never loaded\)"):
        quantize(fam, model, experts=dict(fam.experts, dtd=empty), targets=targets)
    assert_untouched(model, before)


def test_residual_precision_reaches_the_statistics(gen, monkeypatch):
    import epmq.walker as walker

    seen = []

    class Recording(walker.EPMQStats):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("residual_precision"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(walker, "EPMQStats", Recording)
    fam = Family("llama", gen, n_samples=1)
    quantize(fam, fam.merged(), residual_precision="tf32", layers=r"layers\.0\.mlp\.down_proj")
    assert seen and set(seen) == {"tf32"}


def test_non_finite_merged_weight_names_the_layer(gen):
    fam = Family("llama", gen, n_samples=1)
    model = fam.merged()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj .*non-finite"):
        quantize(fam, model)
    assert_untouched(model, before)


def test_a_layer_the_solver_refuses_is_named(gen, monkeypatch):
    """A Hessian that will not factor, however damped (here every factor is judged not finite, so
    each of the retries fails), ended the walk in 'the Hessian is not positive definite even
    with damping ...', naming none of the model's linears; it names the layer, and the model is
    left as it was."""
    fam = Family("llama", gen, n_samples=1)
    model = fam.merged()
    before = snapshot(model)
    monkeypatch.setattr(quant, "all_finite", lambda t: False)
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.self_attn\.[qkv]_proj: the Hessian is not positive "
                                         r"definite even with damping .* \(8 retries\)"):
        quantize(fam, model, method="gptq", experts=None)
    assert_untouched(model, before)


def test_a_layer_damped_more_than_percdamp_asked_is_named(gen):
    """48 calibration tokens for down_proj's 64 inputs: its H is singular, and at percdamp 0 its
    factor fails and is damped again. The warning said so naming no layer, where a walk solves
    hundreds; it names the layer."""
    fam = Family("llama", gen, n_samples=1)
    model = fam.merged()
    with pytest.warns(UserWarning) as said:
        quantize(fam, model, method="gptq", experts=None, percdamp=0.0, layers=r"mlp\.down_proj")
    retries = {e["name"]: e["damp_retries"] for e in model.epmq_report.layers}
    assert sorted(retries) == [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)] and all(retries.values())
    messages = sorted(str(w.message) for w in said if "percdamp" in str(w.message))
    assert len(messages) == len(retries)
    for message, (name, n) in zip(messages, sorted(retries.items())):
        assert re.fullmatch(rf"{re.escape(name)}: the Hessian did not factor at percdamp 0: solved at percdamp \S+ "
                            rf"\(damping that times H's mean diagonal; retries: {n}\)", message), message


def test_a_solve_that_warned_then_failed_ends_in_its_error_under_warnings_as_errors(gen, monkeypatch):
    """The solver's warnings are said again, named, after the solve; under ``-W error`` one said
    again after a failed solve raised in the failure's place, hiding why the walk ended."""
    fam = Family("llama", gen, n_samples=1)
    model = fam.merged()

    def warns_then_fails(*args, **kwargs):
        warnings.warn("damped again")
        raise ValueError("the solve failed")

    monkeypatch.setattr(quant, "gptq", warns_then_fails)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="the solve failed"):
            quantize(fam, model, method="gptq", experts=None, layers=r"mlp\.down_proj")


def test_a_warning_of_another_thread_during_a_solve_is_not_said_as_the_layers(gen, monkeypatch):
    """The solver's warnings are said again, named by the layer, caught by the process's
    filters and hook: what another thread (the experts' read-ahead) warned meanwhile was said as
    the layer's too, and escaped the caller's filters. It is said as it was, judged by them."""
    import threading

    fam = Family("llama", gen, n_samples=1)
    solve = quant.gptq

    def warns_beside_another_thread(*args, **kwargs):
        beside = threading.Thread(target=lambda: [warnings.warn(m) for m in ("read ahead", "not wanted")])
        beside.start()
        beside.join()
        warnings.warn("damped again")
        return solve(*args, **kwargs)

    monkeypatch.setattr(quant, "gptq", warns_beside_another_thread)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", "not wanted")
        quantize(fam, fam.merged(), method="gptq", experts=None, layers=r"mlp\.down_proj")
    layers = [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    messages = sorted(str(w.message) for w in said if re.search("damped again|read ahead|not wanted", str(w.message)))
    assert messages == sorted([*(f"{n}: damped again" for n in layers), "read ahead", "read ahead"]), messages


def test_a_warning_said_during_a_solve_keeps_its_source():
    """A warning's source (the object it is about, whose allocation's traceback -X tracemalloc shows)
    was lost when a solve's warning was said again named by the layer, and when another thread's was
    shown as it would have been: the hook that caught them is given the warning's fields but its source."""
    import threading

    from epmq import walker

    mine, theirs = object(), object()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with walker._warnings_of("layers.0.a"):
            beside = threading.Thread(target=lambda: warnings.warn("read ahead", ResourceWarning, source=theirs))
            beside.start()
            beside.join()
            warnings.warn("damped again", ResourceWarning, source=mine)
    assert [(str(w.message), w.source) for w in said] == [("read ahead", theirs), ("layers.0.a: damped again", mine)]


def test_a_layer_of_tiny_inputs_is_quantized(gen):
    """Block 1's MLP sees inputs of order 1e-27 (its norm's weight): GPTQ's Hessian of them, in
    float64, has a mean diagonal near 1e-52, which the solver refused ('scale it'), ending the
    walk. GPTQ does not depend on H's scale: it is solved, its loss of that scale."""
    fam = Family("llama", gen, n_samples=1)
    model = fam.merged()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.fill_(1e-27)
    quantize(fam, model, method="gptq", experts=None)
    losses = {e["name"]: e["loss"] for e in model.epmq_report.layers}
    for p in ("gate_proj", "up_proj"):
        assert 0 < losses[f"model.layers.1.mlp.{p}"] < 1e-40, losses


@pytest.mark.parametrize("device", [None, "cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_non_finite_expert_mid_walk_rolls_everything_back(gen, device):
    """open_clip: the attention rewrite is undone too, and the model computes as before (also
    when the blocks were visiting a device: the block in flight is brought back)."""
    fam = Family("open_clip_vit", gen, n_samples=1)
    bad = fam.experts["svhn"].state_dict()
    bad["transformer.resblocks.1.mlp.c_proj.weight"] = bad["transformer.resblocks.1.mlp.c_proj.weight"].clone()
    bad["transformer.resblocks.1.mlp.c_proj.weight"][0, 0] = float("inf")
    model = fam.merged()
    before, y = snapshot(model), output(model, fam.test_item)
    with pytest.raises(ValueError, match=r"'svhn'.*transformer\.resblocks\.1\.mlp\.c_proj\.weight.*non-finite"):
        quantize(fam, model, experts=dict(fam.experts, svhn=bad), device=device)
    assert all(isinstance(b.attn, nn.MultiheadAttention) for b in model.transformer.resblocks)
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    assert_untouched(model, before)
    assert torch.equal(output(model, fam.test_item), y)


def test_interrupt_mid_walk_rolls_back(gen, monkeypatch):
    fam = Family("t5", gen, n_samples=1)
    model = fam.merged()
    before = snapshot(model)
    calls = []
    real = quant.epmq_from_stats

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(quant, "epmq_from_stats", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize(fam, model)
    assert_untouched(model, before)


def test_a_walk_that_fails_on_a_model_holding_a_torchscript_module_rolls_back_and_says_why(gen, monkeypatch):
    """A model with a TorchScript module (timm's norm-act layers with jit=True) whose walk failed
    after its first block was quantized: the rollback cleared each module's buffers, which a
    ScriptModule's are not a dict to clear, so the walk's own error ended in AttributeError:
    'OrderedDictWrapper' object has no attribute 'clear', the rollback half done. It is undone,
    the walk's error raised."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.norm = nn.Linear(16, 16), torch.jit.script(nn.LayerNorm(16))

        def forward(self, x):
            return x + self.fc(self.norm(x))

    model = Net(Block)
    before = snapshot(model)
    real = quant.gptq

    def failing(*args, **kwargs):
        if any(isinstance(m, epmq.QuantLinear) for m in model.modules()):
            raise RuntimeError("the second block's solve failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(quant, "gptq", failing)
    with pytest.raises(RuntimeError, match="the second block's solve failed"):
        epmq.quantize_model(model, SPEC, method="gptq", calibration={"t": [torch.randn(4, 16, generator=gen)]},
                            backend="torch", progress=False, adapter=epmq.Adapter("scripted", block_types=(Block,)))
    assert_untouched(model, before)


def _interrupt_the_second_solve(model, monkeypatch):
    """A Ctrl-C in the solve of ``model``'s second block: once the first block holds a QuantLinear."""
    solve = quant.gptq

    def first_interrupt(*args, **kwargs):
        if any(isinstance(m, epmq.QuantLinear) for m in model.modules()):
            raise KeyboardInterrupt
        return solve(*args, **kwargs)

    monkeypatch.setattr(quant, "gptq", first_interrupt)


@pytest.mark.parametrize("second", ["rollback", "closing"])
def test_a_second_interrupt_while_a_stopped_walk_winds_up_leaves_the_model_whole(second, gen, monkeypatch):
    """A Ctrl-C in the second block's solve, and a second one while the walk winds up: in the rollback, it
    left the first block's quantized linear in the model; while the read-ahead waited for its read, the
    model's modules stayed in eval mode, their train modes lost. Each is finished, the interrupt raised after."""
    from epmq.read_ahead import ReadAhead

    model = Net(Residual).train()
    before = snapshot(model)

    interrupted = []

    def put_back(block, name, value):  # (the rollback's: a linear in the place of a QuantLinear)
        if not interrupted and isinstance(getattr(block, name, None), epmq.QuantLinear):
            interrupted.append(name)
            signal.raise_signal(signal.SIGINT)  # (a Ctrl-C: the rollback holds it until it is done)
        nn.Module.__setattr__(block, name, value)

    close = ReadAhead.close

    def closing(ahead):
        if not interrupted:
            interrupted.append("close")
            raise KeyboardInterrupt
        close(ahead)

    _interrupt_the_second_solve(model, monkeypatch)
    if second == "rollback":
        monkeypatch.setattr(Residual, "__setattr__", put_back)
    else:
        monkeypatch.setattr(ReadAhead, "close", closing)
    with pytest.raises(KeyboardInterrupt):
        epmq.quantize_model(model, SPEC, method="gptq", calibration={"t": [torch.randn(4, 16, generator=gen)]},
                            backend="torch", progress=False)
    assert interrupted == (["fc"] if second == "rollback" else ["close"])
    assert_untouched(model, before)
    assert all(m.training for m in model.modules())

def test_interrupts_that_keep_coming_while_a_stopped_walk_rolls_back_are_held_until_it_is_done(gen, monkeypatch):
    """A Ctrl-C that stopped the rollback of a stopped walk ran it again from its start, for as long as
    they kept coming (a key held down, a script's repeated signals). They are held until the rollback is
    done, once; then raised, the model whole."""
    model = Net(Residual).train()
    before = snapshot(model)

    put_backs = []

    def put_back(block, name, value):  # (the rollback's: a linear in the place of a QuantLinear)
        if isinstance(getattr(block, name, None), epmq.QuantLinear):
            put_backs.append(name)
            if len(put_backs) < 50:  # (a bound, for the test to end where each one runs it again)
                signal.raise_signal(signal.SIGINT)
                signal.raise_signal(signal.SIGINT)
        nn.Module.__setattr__(block, name, value)

    _interrupt_the_second_solve(model, monkeypatch)
    monkeypatch.setattr(Residual, "__setattr__", put_back)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        epmq.quantize_model(model, SPEC, method="gptq", calibration={"t": [torch.randn(4, 16, generator=gen)]},
                            backend="torch", progress=False)
    assert put_backs == ["fc"]
    assert_untouched(model, before)
    assert all(m.training for m in model.modules())
    assert signal.getsignal(signal.SIGINT) is handler


def test_a_step_run_to_its_end_outside_the_main_thread_runs_once_its_handler_untouched():
    """Only the main thread of the main interpreter may set SIGINT's handler, and only it is interrupted
    by Ctrl-C: elsewhere the step runs as it is (a walk in a worker thread rolls back)."""
    import threading

    from epmq import walker

    handler, seen = signal.getsignal(signal.SIGINT), []
    worker = threading.Thread(target=walker._to_the_end, args=(lambda: seen.append(signal.getsignal(signal.SIGINT)),))
    worker.start()
    worker.join()
    assert seen == [handler] and signal.getsignal(signal.SIGINT) is handler


def test_an_interrupt_in_the_read_aheads_close_still_closes_the_log_and_the_experts(gen, monkeypatch, tmp_path):
    """A Ctrl-C in the read-ahead's close (its wait for the read in flight) left the resume log's lock of
    its directory and the experts' checkpoints open, to the garbage collector (the walk, which holds them,
    is held by the interrupt's traceback). Each is closed, the modes given back, the interrupt raised."""
    from epmq import resume
    from epmq.experts import ExpertWeights
    from epmq.read_ahead import ReadAhead

    model = Net(Residual).train()
    experts = {t: {k: v + 0.01 for k, v in model.state_dict().items()} for t in ("a", "b")}
    closed = []
    close = ExpertWeights.close

    def closing(source):
        closed.append(source.task)
        close(source)

    def interrupted(ahead):
        raise KeyboardInterrupt

    monkeypatch.setattr(ExpertWeights, "close", closing)
    monkeypatch.setattr(ReadAhead, "close", interrupted)
    with pytest.raises(KeyboardInterrupt):
        epmq.quantize_model(model, SPEC, method="epmq", experts=experts, backend="torch", progress=False,
                            calibration={t: [torch.randn(4, 16, generator=gen)] for t in experts},
                            resume_dir=tmp_path / "resume")
    assert sorted(closed) == ["a", "b"]
    assert str((tmp_path / "resume").resolve()) not in resume._HELD
    assert all(m.training for m in model.modules())


def test_calibration_that_misses_a_tower(gen):
    """open_clip CLIP run on images only never reaches its text tower."""
    fam = Family("open_clip_clip", gen, n_samples=1)
    images_only = {t: [{"image": item["image"]} for item in items] for t, items in fam.calibration.items()}
    model = fam.merged()
    with pytest.raises(ValueError, match=r"never reaches the blocks at 'transformer\.resblocks'.*layers=") as e:
        quantize(fam, model, method="gptq", experts=None, calibration=images_only)
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())
    # the layers= the error gives leaves the tower out
    layers = ast.literal_eval(re.search(r"layers=(r'[^']*')", str(e.value)).group(1))
    quantize(fam, model, method="gptq", experts=None, calibration=images_only, layers=layers)
    assert len(model.epmq_report.layers) == 8
    assert all(layer["name"].startswith("visual.") for layer in model.epmq_report.layers)



def test_a_later_sample_that_misses_a_tower_leaves_the_model_and_experts_as_they_were(gen, monkeypatch):
    """Which towers calibration reaches is checked up front on each task's first sample alone: a later one
    (an image without its text) is refused by the probes at the text tower's entry, once the image tower's
    blocks are solved and packed. The model is rolled back, not left with its image tower quantized: its
    linears, their weights and every tensor as they were, its outputs the same, no report; the experts
    untouched."""
    fam = Family("open_clip_clip", gen, n_samples=2)
    calibration = {t: [items[0], {"image": items[1]["image"]}] for t, items in fam.calibration.items()}
    model = fam.merged()
    before, experts = snapshot(model), {t: snapshot(e) for t, e in fam.experts.items()}
    item = fam.calibration[next(iter(fam.calibration))][0]
    want = output(model, item)
    solved = []
    real = quant.epmq_from_stats

    def counted(*args, **kwargs):
        solved.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(quant, "epmq_from_stats", counted)
    with pytest.raises(ValueError, match=r"calibration sample 1 of task '\w+' never reaches the blocks at "
                                         r"'transformer\.resblocks'"):
        quantize(fam, model, calibration=calibration)
    assert solved  # (the image tower's blocks were solved before the refusal)
    assert_untouched(model, before)
    assert not hasattr(model, "epmq_report")
    torch.testing.assert_close(output(model, item), want, rtol=0, atol=0)
    for task, expert in fam.experts.items():
        assert_untouched(expert, experts[task])

class Net(nn.Module):
    """Two blocks of ``block_type`` in a ModuleList, called in turn."""

    def __init__(self, block_type):
        super().__init__()
        self.layers = nn.ModuleList([block_type(), block_type()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Residual(nn.Module):
    """``x + fc(x)``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return x + self.fc(x)


def test_unknown_model_says_how_to_add_an_adapter():
    """(A list repeating Residual is walked by AUTO, found by structure: one of two kinds is not.)"""
    model = Net(Residual)
    model.layers[1] = nn.Sequential(nn.Linear(16, 16))
    with pytest.raises(ValueError, match=r"no epmq adapter knows Net.*layers \(Residual, Sequential\).*register_"):
        epmq.quantize_model(model, SPEC, method="rtn", progress=False)


def test_a_convolutional_network_is_told_it_has_nothing_to_quantize():
    """(Not the list of every block type epmq knows: it has no linear layer but its head.)"""
    from transformers import ResNetConfig, ResNetForImageClassification

    model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    with pytest.raises(ValueError, match=r"ResNetForImageClassification: it holds one linear layer \(classifier.1\)"
                                         r".*a convolutional network has none to quantize"):
        epmq.quantize_model(model, SPEC, method="rtn", progress=False)


def test_calibration_must_be_per_task_iterables(gen):
    fam = Family("llama", gen, n_samples=1)
    with pytest.raises(TypeError, match="iterable of model inputs"):
        quantize(fam, fam.merged(), method="gptq", experts=None,
                 calibration={"cars": inputs("llama", 1, gen)[0]})


@pytest.mark.parametrize("method", ["gptq", "epmq"])
def test_layer_out_of_gpu_memory_is_solved_on_the_cpu(gen, monkeypatch, method):
    """An out-of-memory error in a layer's solve does not end the run: that layer is solved
    again by the torch reference on CPU copies of its statistics, with a warning and a note in
    the report, and gives what a normal solve gives."""
    import epmq.walker as walker

    fam = Family("llama", gen, n_samples=1)
    kw = dict(method=method, layers=r"layers\.0\.mlp\.down_proj")
    if method == "gptq":
        kw["experts"] = None
    reference = quantize(fam, fam.merged(), **kw)
    name = "gptq" if method == "gptq" else "epmq_from_stats"
    real = getattr(walker.quant, name)
    calls = []

    def flaky(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(walker.quant, name, flaky)
    with pytest.warns(UserWarning, match="out of GPU memory solving model.layers.0.mlp.down_proj"):
        model = quantize(fam, fam.merged(), **kw)
    assert calls == ["torch", "torch"]
    (layer,) = model.epmq_report.layers
    assert layer["solved_on"] == "cpu (out of GPU memory)"
    x = inputs("llama", 1, gen)[0]
    torch.testing.assert_close(output(model, x), output(reference, x))


def _kib(note: str, what: str) -> float:
    """The size ``note`` gives ``what`` (``"... 12.5 KiB of what"``), in KiB."""
    number, unit = re.search(r"([\d.]+) (KiB|MiB|GiB) of " + re.escape(what), note).groups()
    return float(number) * {"KiB": 1, "MiB": 2**10, "GiB": 2**20}[unit]


@pytest.mark.parametrize("where", ["statistics", "pass", "offloaded"])
def test_running_out_of_memory_in_the_walk_says_what_it_held_and_what_shrinks_it(where, gen, monkeypatch, tmp_path):
    """torch's out-of-memory error names the one allocation that failed: a walk that ran out of
    memory in a block's statistics or pass said nothing of what filled the device (the calibration's
    hidden states, the weights, the statistics) nor of the setting that shrinks each, nor that such a
    setting makes the blocks a resume_dir kept another walk's. The error stays what it is, noted with
    them; the model is rolled back."""
    from epmq.stats import HessianStats

    fam = Family("llama", gen)
    model, before = fam.merged(), None
    before = snapshot(model)

    def out_of_memory(*_, **__):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.50 GiB.")

    if where == "pass":
        model.model.layers[1].mlp.register_forward_pre_hook(out_of_memory)
    else:
        add_batch = HessianStats.add_batch
        monkeypatch.setattr(HessianStats, "add_batch", lambda self, x, **kw: out_of_memory()
                            if self.H.shape[0] == model.config.intermediate_size else add_batch(self, x, **kw))
    with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate 3.50 GiB") as raised:
        quantize(fam, model, method="gptq", experts=None,
                 **({"device": "cpu", "resume_dir": tmp_path} if where == "offloaded" else {}))
    (note,) = [n for n in raised.value.__notes__ if n.startswith("(out of memory")]
    assert note.endswith("a resume_dir's blocks done are then another walk's, refused)") == (where == "offloaded")
    assert "in block 'model.layers.1'" in note if where == "pass" else "in block 'model.layers.0'" in note, note
    # every item's input to the block, at least, B x T x width float32 activations
    hidden = sum(item.numel() * model.config.hidden_size * 4 for items in fam.calibration.values() for item in items)
    assert _kib(note, "the calibration's hidden states") >= hidden / 2**10, note
    assert "(6 item(s) of 3 task(s)), which fewer or shorter calibration items shrink (epmq quantize: samples, " \
           "seq_len; smaller batches, batch_size" in note, note
    assert ("of the block's weights" in note) == (where == "offloaded") != ("of the model's weights" in note), note
    if where == "pass":  # (block 1's first pass, the probe of its calls: no statistics held)
        assert "statistics" not in note and any("block 'model.layers.1'" in n for n in raised.value.__notes__)
    else:  # GPTQ's one float64 Hessian of the down projection's inputs, on the CPU
        assert _kib(note, "the statistics of the 1 linear(s) being solved (mlp.down_proj;") \
            == model.config.intermediate_size ** 2 * 8 / 2**10, note
    assert_untouched(model, before)


def _cpu_allocation_failure(*_, **__):
    """What torch's CPU allocator raises where it cannot allocate: a plain RuntimeError (c10's enforce,
    no OutOfMemoryError), asked of the allocator itself for more bytes than any machine has."""
    torch.empty(1 << 62, dtype=torch.uint8)


def _older_cpu_allocation_failure(*_, **__):
    raise RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1073741824 bytes.")


@pytest.mark.parametrize("fail", [_cpu_allocation_failure, _older_cpu_allocation_failure])
@pytest.mark.parametrize("where", ["embedding", "pass", "statistics"])
def test_running_out_of_cpu_memory_in_the_walk_says_what_it_held(where, fail, gen, monkeypatch):
    """torch's CPU allocator fails with a plain RuntimeError, not torch.OutOfMemoryError: a walk on the CPU
    that ran out of memory in the model's forward or a block's first pass was refused as calibration the
    model cannot run (a ValueError), and elsewhere ended without the note a GPU's gets of what the walk held
    and what shrinks it. It stays the allocator's error, noted as a GPU's is; the model is rolled back."""
    from epmq.stats import HessianStats

    fam = Family("llama", gen)
    model = fam.merged()
    before = snapshot(model)
    if where == "embedding":
        monkeypatch.setattr(model.model.embed_tokens, "forward", fail)
    elif where == "pass":
        monkeypatch.setattr(model.model.layers[0].mlp.act_fn, "forward", fail)
    else:
        add_batch = HessianStats.add_batch
        monkeypatch.setattr(HessianStats, "add_batch", lambda self, x, **kw: fail()
                            if self.H.shape[0] == model.config.intermediate_size else add_batch(self, x, **kw))
    with pytest.raises(RuntimeError, match="DefaultCPUAllocator: (can't allocate|not enough) memory") as raised:
        quantize(fam, model, method="gptq", experts=None)
    assert type(raised.value) is RuntimeError
    (note,) = [n for n in raised.value.__notes__ if n.startswith("(out of memory")]
    block = "the model's forward up to 'model.layers'" if where == "embedding" else "block 'model.layers.0'"
    assert note.startswith(f"(out of memory on cpu in {block}, the walk holding there "), note
    assert "of the calibration's hidden states" in note and "of the model's weights" in note, note
    assert ("of the statistics of the 1 linear(s) being solved (mlp.down_proj;" in note) == (where == "statistics")
    assert_untouched(model, before)


@pytest.mark.parametrize("method", ["gptq", "epmq"])
def test_a_layer_calibration_never_reaches_is_rounded_to_nearest_with_a_warning(gen, method):
    """Block 0's attention sees only zeros (its input norm's weight is 0): q, k, v, and o (the
    attention of zero values is zero) have no live input feature; they get RTN's weights and the
    user is told, the rest is solved. Both methods report them alike: every column dead, no
    damping."""
    fam = Family("llama", gen)
    model = fam.merged()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.zero_()
    W = {p: model.get_submodule(f"model.layers.0.self_attn.{p}").weight.detach().clone()
         for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    with pytest.warns(UserWarning, match="4 linear.s. got no calibration signal") as record:
        quantize(fam, model, **(dict(method="gptq", experts=None) if method == "gptq" else {}))
    assert sum("no calibration signal" in str(w.message) for w in record) == 1  # one warning
    assert set(model.epmq_report.unreached) == {f"model.layers.0.self_attn.{p}" for p in W}
    for entry in model.epmq_report.layers:
        if entry["name"] in model.epmq_report.unreached:
            assert entry["dead_columns"] == entry["shape"][1] and entry["damp"] == 0.0, entry
    for p, weight in W.items():
        q = model.get_submodule(f"model.layers.0.self_attn.{p}")
        rtn = epmq.QuantLinear.from_result(quant.rtn(weight, SPEC), q.bias)
        torch.testing.assert_close(q.dequantize(), rtn.dequantize(), rtol=0, atol=0)


def test_moe_needs_merged_path_targets(gen):
    """A target model's router may send a token to other experts than the quantized model's."""
    fam = Family("mixtral", gen)
    model = fam.merged()
    before = snapshot(model)
    with pytest.raises(ValueError, match="routes tokens to experts"):
        quantize(fam, model, targets="expert_path")
    assert_untouched(model, before)


def test_a_block_whose_linears_stop_sharing_their_input_is_reported():
    """Two linears read one tensor when the block is probed, then not: their Hessians differ,
    so sharing one would be wrong; the walk stops with a clear error and leaves the model whole."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return x + self.a(x) + self.b(x if self.calls == 1 else 2 * x)

    net = Net(Block)
    calibration = {"task": [torch.randn(4, 16) for _ in range(2)]}
    with pytest.raises(RuntimeError, match=r"b read the same tensor as a .*SHARE_INPUT_STATISTICS"):
        epmq.quantize_model(net, SPEC, method="gptq", calibration=calibration, progress=False,
                            adapter=epmq.Adapter("toggle", block_types=(Block,)))
    assert not any(isinstance(m, epmq.QuantLinear) for m in net.modules())


def test_a_linear_called_twice_shares_no_hessian(monkeypatch):
    """``a`` reads x and then 2x, ``b`` reads x only: their Hessians differ, so neither takes the
    other's (the probe compares every tensor each linear read); the walk is the one without any
    sharing."""
    from epmq import walker

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            return x + self.a(x) + self.a(2 * x) + self.b(x)

    calibration = {"task": [torch.randn(4, 16) for _ in range(2)]}
    models = {}
    for share in (True, False):
        monkeypatch.setattr(walker, "SHARE_INPUT_STATISTICS", share)
        torch.manual_seed(0)
        models[share] = epmq.quantize_model(Net(Block), SPEC, method="gptq", calibration=calibration,
                                            progress=False, adapter=epmq.Adapter("twice", block_types=(Block,)))
    a, b = models[True].state_dict(), models[False].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any("hessian_of" in layer for layer in models[True].epmq_report.layers)


def test_a_device_that_is_not_there_is_refused_up_front(gen, monkeypatch):
    fam = Family("llama", gen, n_samples=1)
    model = fam.merged()
    with pytest.raises(ValueError, match="device must name a torch device"):
        quantize(fam, model, method="gptq", experts=None, device="gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        quantize(fam, model, method="gptq", experts=None, device="cuda")
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())


class InPlaceNet(Net):
    """Adds 1 to the hidden states in place after every block."""

    def forward(self, x):
        x = x.clone()
        for layer in self.layers:
            x = layer(x)
            x.add_(1.0)
        return x


class OutOfPlaceNet(Net):
    def forward(self, x):
        for layer in self.layers:
            x = layer(x) + 1.0
        return x


class CopyingNet(Net):
    """Hands each block a copy of the previous one's output (the same values)."""

    def forward(self, x):
        for layer in self.layers:
            x = layer(x).clone()
        return x


class PlusOne(Residual):
    """``x + fc(x) + 1``: what InPlaceNet and OutOfPlaceNet do between blocks, inside them."""

    def forward(self, x):
        return super().forward(x) + 1.0


@pytest.mark.parametrize("net_type", [InPlaceNet, OutOfPlaceNet])
@pytest.mark.parametrize("method, targets", [("gptq", "merged_path"), ("epmq", "merged_path"),
                                             ("epmq", "expert_path"), ("gptq", "fp_path")])
def test_a_model_that_changes_the_hidden_states_between_blocks_is_walked_on_what_they_get(net_type, method, targets):
    """Block 1 gets block 0's output plus 1 (in place or not): fed block 0's output, the walk
    would solve it on inputs it never sees. Its input is taken from the model instead: the
    result equals the walk of the model whose blocks add the 1 themselves."""
    calibration = {"task": [torch.randn(4, 16) for _ in range(2)], "other": [torch.randn(4, 16) for _ in range(2)]}
    states, replayed = [], []
    for model_type, block_type in ((net_type, Residual), (Net, PlusOne)):
        torch.manual_seed(0)
        model = model_type(block_type)
        experts = None
        if method == "epmq":
            experts = {t: {k: v + 0.01 * (1 + j) for k, v in model.state_dict().items()}
                       for j, t in enumerate(calibration)}
        model = epmq.quantize_model(model, SPEC, method=method, targets=targets, calibration=calibration,
                                    experts=experts, progress=False,
                                    adapter=epmq.Adapter("blocks", block_types=(block_type,)))
        states.append(model.state_dict())
        replayed.append(model.epmq_report.replayed)
    assert replayed == [["layers"], []]
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


class ThreeNet(nn.Module):
    """Three blocks, called in the order ``order``."""

    def __init__(self, order):
        super().__init__()
        self.layers = nn.ModuleList([Residual() for _ in range(3)])
        self.order = order

    def forward(self, x):
        for i in self.order:
            x = self.layers[i](x)
        return x


@pytest.mark.parametrize("order, called, expected", [((2, 1, 0), 2, 0), ((0, 0, 1, 2), 0, 1), ((0, 2), 2, 1)])
def test_a_model_that_reorders_repeats_or_skips_its_blocks_is_refused(order, called, expected):
    torch.manual_seed(0)
    model = ThreeNet(order)
    before = snapshot(model)
    calibration = {"task": [torch.randn(4, 16) for _ in range(2)]}
    with pytest.raises(ValueError, match=rf"blocks at 'layers' \(blocks\) are not called once each in their order: "
                                         rf"block {called} is called where block {expected} is next"):
        epmq.quantize_model(model, SPEC, method="gptq", calibration=calibration, progress=False,
                            adapter=epmq.Adapter("blocks", block_types=(Residual,)))
    assert_untouched(model, before)


def test_a_model_that_hands_on_a_copy_of_the_hidden_states_is_walked():
    """A copy with the same values is the previous block's output: walked, as the model without it."""
    calibration = {"task": [torch.randn(4, 16) for _ in range(2)]}
    states = []
    for net_type in (CopyingNet, Net):
        torch.manual_seed(0)
        model = epmq.quantize_model(net_type(Residual), SPEC, method="gptq", calibration=calibration,
                                    progress=False, adapter=epmq.Adapter("blocks", block_types=(Residual,)))
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


@pytest.mark.parametrize("method", ["gptq", "epmq"])
def test_a_block_that_writes_its_input_in_place(method):
    """``x += fc(x)``: the walk runs each block several times on the same stored input (the
    probe, one pass per group, the advance); it must give every pass the input as stored, so the
    model equals the one quantized from ``x + fc(x)``."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            x += self.fc(x)
            return self.out(x)

    class OutOfPlace(Block):
        def forward(self, x):
            return self.out(x + self.fc(x))

    g = torch.Generator().manual_seed(0)
    calibration = {"a": [torch.randn(4, 16, generator=g) for _ in range(2)],
                   "b": [torch.randn(4, 16, generator=g) for _ in range(2)]}
    states = []
    for block_type in (Block, OutOfPlace):
        torch.manual_seed(0)
        model = Net(block_type)
        experts = None
        if method == "epmq":
            experts = {t: {k: v + 0.01 for k, v in model.state_dict().items()} for t in calibration}
        model = epmq.quantize_model(model, SPEC, method=method, calibration=calibration, experts=experts,
                                    progress=False, adapter=epmq.Adapter("blocks", block_types=(block_type,)))
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


class Failing(Residual):
    """Residual that raises ``error`` where ``fails(x, block)``, once ``failing`` (the block's own bug,
    on some inputs)."""

    error, fails, failing = None, None, False

    def forward(self, x):
        if self.failing and type(self).fails(x, self):
            raise type(self).error("the block's own bug")
        return super().forward(x)


@pytest.mark.parametrize("block, error, adapter, fails, item, during", [
    (1, KeyError, None, lambda x, b: len(x) == 4, 0, "the probe of which linears it calls"),
    (0, AttributeError, None, lambda x, b: len(x) == 4, 0, "the probe of which linears it calls"),
    (1, RuntimeError, None, lambda x, b: len(x) == 3, 1, "a pass taking its linears' statistics"),
    (1, ValueError, None, lambda x, b: len(x) == 3 and isinstance(b.fc, epmq.QuantLinear), 1,
     "the pass after its linears were quantized"),
    (1, KeyError, epmq.adapters.AUTO, lambda x, b: len(x) == 3, 1, "the model's own forward calling it"),
], ids=["probe", "first-block", "statistics", "after-quantization", "models-own-forward"])
def test_an_error_a_block_raises_names_the_block_the_item_and_the_pass(block, error, adapter, fails, item, during,
                                                                       gen, monkeypatch):
    """A block's own error (block 1's on one item, or a KeyError, AttributeError, ValueError of any
    block) ended the walk bare, naming no block, task or item: it goes on as it was raised, noted with
    them and the walk's pass that ran it, and the model is left as it was."""
    model = Net(Failing)
    model.layers[block].failing = True
    monkeypatch.setattr(Failing, "error", error)
    monkeypatch.setattr(Failing, "fails", staticmethod(fails))
    before = snapshot(model)
    calibration = {"a": [torch.randn(4, 16, generator=gen), torch.randn(3, 16, generator=gen)],
                   "b": [torch.randn(2, 16, generator=gen)]}
    with pytest.raises(error, match="the block's own bug") as raised:
        epmq.quantize_model(model, SPEC, method="gptq", calibration=calibration, progress=False,
                            adapter=adapter or epmq.Adapter("blocks", block_types=(Failing,)))
    assert raised.value.__notes__ == [f"(while the walk ran block 'layers.{block}' on calibration['a'] item {item}: "
                                      f"{during})"]
    assert_untouched(model, before)


@pytest.mark.parametrize("error", [RuntimeError, AttributeError])
@pytest.mark.parametrize("rows, item, how", [(3, 1, r"having run on calibration\['a'\] item 0"),
                                             (4, 0, "called with the model's own arguments")])
def test_a_block_that_raises_on_one_item_under_auto_is_named_as_raising_on_it(error, rows, item, how, gen,
                                                                              monkeypatch):
    """Under AUTO, a block's RuntimeError or AttributeError on one item (after it ran on item 0, or
    on item 0 called as the model called it, no cache taken) was refused as blocks the walker cannot
    quantize one by one, to be registered an adapter for: it is named as the block's own error on
    that item, its cause chained."""
    model = Net(Failing)
    model.layers[1].failing = True
    monkeypatch.setattr(Failing, "error", error)
    monkeypatch.setattr(Failing, "fails", staticmethod(lambda x, b: len(x) == rows))
    calibration = {"a": [torch.randn(4, 16, generator=gen), torch.randn(3, 16, generator=gen)]}
    with pytest.raises(ValueError, match=rf"block 1 at 'layers' raised on this calibration item \({error.__name__}: "
                                         rf"the block's own bug\), {how}: an error of the block's own") as raised:
        epmq.quantize_model(model, SPEC, method="gptq", calibration=calibration, progress=False,
                            adapter=epmq.adapters.AUTO)
    assert "register an adapter" not in str(raised.value) and type(raised.value.__cause__) is error
    assert raised.value.__notes__ == [f"(while the walk ran block 'layers.1' on calibration['a'] item {item}: "
                                      "the model's own forward calling it)"]


class FailingOnCache(Failing):
    """Failing handed a scale under the name of a cache, which it multiplies its input by."""

    def forward(self, x, cache=None):
        return super().forward(x * cache)


class CacheScalingNet(Net):
    def forward(self, x):
        for layer in self.layers:
            x = layer(x, cache=torch.full((16,), 3.0))
        return x


def test_a_block_that_raises_on_an_input_under_a_cache_s_name_under_auto_is_named_as_raising_on_it(gen,
                                                                                                   monkeypatch):
    """Under AUTO, a block's RuntimeError on item 0 was taken for one of a block the walk calls otherwise than
    the model where an argument had a cache's name, though the walk keeps a tensor there as given (the
    block's input): refused as blocks the walker cannot quantize one by one, to be registered an adapter
    for. Named as the block's own error on that item, called with the model's own arguments."""
    model = CacheScalingNet(FailingOnCache)
    model.layers[0].failing = True
    monkeypatch.setattr(Failing, "error", RuntimeError)
    monkeypatch.setattr(Failing, "fails", staticmethod(lambda x, b: True))
    with pytest.raises(ValueError, match=r"block 0 at 'layers' raised on this calibration item \(RuntimeError: "
                                         r"the block's own bug\), called with the model's own arguments") as raised:
        epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": [torch.randn(4, 16, generator=gen)]},
                            progress=False, adapter=epmq.adapters.AUTO)
    assert "register an adapter" not in str(raised.value) and type(raised.value.__cause__) is RuntimeError


class LookingUpNet(Net):
    """Looks a key up in its own table, before block ``at``, that a batch of 3 lacks (the model's own bug)."""

    at = 1

    def forward(self, x):
        for j, layer in enumerate(self.layers):
            if j == self.at:
                x = x * {4: 1.0, 2: 1.0}[len(x)]
            x = layer(x)
        return x


@pytest.mark.parametrize("at, where", [(1, "after block 'layers.0'"), (0, "before the blocks at 'layers'")])
def test_an_error_the_models_own_forward_raises_names_the_item(at, where, gen, monkeypatch):
    """An error of the model's own code around its blocks (a KeyError on one item) ended the walk bare,
    naming no task or item: it goes on as it was raised, noted with them."""
    model = LookingUpNet(Residual)
    monkeypatch.setattr(model, "at", at)
    calibration = {"a": [torch.randn(4, 16, generator=gen), torch.randn(3, 16, generator=gen)],
                   "b": [torch.randn(2, 16, generator=gen)]}
    with pytest.raises(KeyError, match="3") as raised:
        epmq.quantize_model(model, SPEC, method="gptq", calibration=calibration, progress=False,
                            adapter=epmq.Adapter("blocks", block_types=(Residual,)))
    assert raised.value.__notes__ == [f"(while the model's own forward ran calibration['a'] item 1, {where})"]
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())


class ReplayLookingUpNet(Net):
    """Adds 1 to block 0's output (the walk replays it to take block 1's input), then looks a key up that a
    batch of 3 lacks once ``broken`` (the model's own bug, hit in the replay alone)."""

    broken = False

    def forward(self, x):
        x = self.layers[0](x) + 1.0
        if self.broken:
            x = x * {4: 1.0, 2: 1.0}[len(x)]
        return self.layers[1](x)


def test_an_error_the_models_own_forward_raises_in_the_replay_names_the_block_and_item(gen, monkeypatch):
    """The model's own code between the blocks failing while the walk replays it on a block's output (to
    take the next one's input) ended the walk bare, naming no block, task, item or pass, where the walk's
    others are noted with them: it goes on as it was raised, noted so."""
    import epmq.walker as walker

    model = ReplayLookingUpNet(Residual)
    replay_next = walker._Walk._replay_next

    def broken(walk, *args):
        monkeypatch.setattr(model, "broken", True)
        return replay_next(walk, *args)

    monkeypatch.setattr(walker._Walk, "_replay_next", broken)
    calibration = {"a": [torch.randn(4, 16, generator=gen), torch.randn(3, 16, generator=gen)],
                   "b": [torch.randn(2, 16, generator=gen)]}
    with pytest.raises(KeyError, match="3") as raised:
        epmq.quantize_model(model, SPEC, method="gptq", calibration=calibration, progress=False,
                            adapter=epmq.Adapter("blocks", block_types=(Residual,)))
    assert raised.value.__notes__ == ["(while the walk ran block 'layers.0' on calibration['a'] item 1: the model's "
                                      "own forward replayed on its output, up to block 1's input)"]
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())


# --------------------------------------------------------------------------- models as users hold them


def test_unmerged_peft_adapters_are_refused_with_the_remedy(gen):
    peft = pytest.importorskip("peft")
    fam = Family("llama", gen, n_samples=1)
    model = peft.get_peft_model(fam.merged(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"q_proj is a PEFT adapter layer .*merge_and_unload"):
        quantize(fam, model, method="gptq", experts=None)
    assert_untouched(model, before)
    # adapters on layers the walk leaves out are left alone, and keep working
    quantize(fam, model, method="gptq", experts=None, layers="mlp")
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"], nn.Linear)
    fam2 = Family("llama", gen, n_samples=1)
    model = peft.get_peft_model(fam2.merged(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    quantize(fam2, model.merge_and_unload(), method="gptq", experts=None)  # the remedy works


def test_weights_offloaded_by_accelerate_get_the_offloading_named(gen):
    accelerate = pytest.importorskip("accelerate")
    fam = Family("llama", gen, n_samples=1)
    model = accelerate.cpu_offload(fam.merged(), execution_device="cpu")
    reference = output(model, fam.test_item)  # (it runs: accelerate loads the weights per call)
    with pytest.raises(ValueError, match=r"offloaded by accelerate .*device='cuda'"):
        quantize(fam, model, method="gptq", experts=None)
    torch.testing.assert_close(output(model, fam.test_item), reference, rtol=0, atol=0)


@pytest.mark.parametrize("targets", ["expert_path", "fp_path"])
@pytest.mark.parametrize("resume", [False, True])
def test_a_second_call_on_partly_quantized_blocks(gen, targets, resume, tmp_path):
    """The layers the first call quantized are run as they are by the target stream (an expert
    has no scales to read for them, nor does the resume record's digest read any)."""
    fam = Family("llama", gen, n_samples=1)
    model, reference = fam.merged(), fam.merged()
    quantize(fam, model, layers=r"mlp")
    with pytest.warns(UserWarning, match="quantized by an earlier call"):
        quantize(fam, model, targets=targets, resume_dir=tmp_path / "r" if resume else None)
    assert not any(isinstance(m, nn.Linear) for m in model.model.layers.modules())
    first, second = model.epmq_reports  # every call's report; epmq_report is the last one's
    assert second is model.epmq_report and second.targets == targets and first.targets == "merged_path"
    assert {layer["name"].rsplit(".", 2)[-2] for layer in first.layers} == {"mlp"}
    assert "mlp" not in {layer["name"].rsplit(".", 2)[-2] for layer in second.layers}
    y, ref = output(model, fam.test_item), output(reference, fam.test_item)
    assert float((y - ref).norm() / ref.norm()) < 0.1


def test_weight_norm_linears_are_quantized_without_a_warning_about_them(gen, recwarn):
    fam = Family("llama", gen, n_samples=1)
    model = fam.merged()
    for layer in model.model.layers:
        nn.utils.parametrizations.weight_norm(layer.mlp.up_proj)
    quantize(fam, model, method="gptq", experts=None)
    assert not [w for w in recwarn if "outside any linear" in str(w.message)]
    assert all(isinstance(layer.mlp.up_proj, epmq.QuantLinear) for layer in model.model.layers)
    # a real matrix outside every linear still warns
    model = fam.merged()
    model.model.layers[0].mlp.register_parameter("loose", nn.Parameter(torch.zeros(64, 64)))
    with pytest.warns(UserWarning, match="outside any linear") as said:
        quantize(fam, model, method="gptq", experts=None)
    # (named as what it is: no mixture of experts here)
    assert not [w for w in said if "mixture-of-experts" in str(w.message)]


@pytest.mark.parametrize("arch", ["open_clip_clip", "llama"])
def test_train_mode_is_restored_on_every_module(arch, gen):
    """Calibration runs in eval mode (no dropout); afterwards each module has its mode again,
    those the walk made included (open_clip's attention projections)."""
    fam = Family(arch, gen, n_samples=1)
    model = fam.merged().train()
    model.get_submodule(next(n for n, m in model.named_modules() if n and list(m.children()))).eval()
    before = {n: m.training for n, m in model.named_modules()}
    quantize(fam, model, method="gptq", experts=None)
    after = {n: m.training for n, m in model.named_modules()}
    for name, training in after.items():  # (a new module has its nearest old ancestor's mode)
        owner = max((n for n in before if name == n or name.startswith(f"{n}.") or not n), key=len)
        assert training == before[owner], name


def test_non_finite_merged_bias_names_the_layer(gen):
    """A non-finite bias is as fatal to the statistics as a non-finite weight: refused up front, by name."""
    fam = Family("gpt2", gen, n_samples=1)
    model = fam.merged()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.bias[3] = float("inf")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.mlp\.c_fc of the merged model has a non-finite bias"):
        quantize(fam, model, method="gptq", experts=None)
    assert_untouched(model, before)


@pytest.mark.parametrize("name", ["transformer.wte.weight", "transformer.h.0.ln_2.weight"])
def test_a_non_finite_tensor_outside_the_linears_is_named_not_blamed_on_the_data(gen, name):
    """A NaN in the embeddings or a norm reached the statistics as the calibration inputs' and
    was reported as bad calibration data; refused up front, by the tensor's name."""
    fam = Family("gpt2", gen, n_samples=1)
    model = fam.merged()
    with torch.no_grad():
        model.get_parameter(name).view(-1)[3] = float("nan")
    with pytest.raises(ValueError, match=rf"merged model's {re.escape(name)} has non-finite values"):
        quantize(fam, model, method="gptq", experts=None)


@pytest.mark.parametrize("method", ["gptq", "epmq"])
@pytest.mark.parametrize("true_sequential", [True, False])
def test_an_input_written_in_place_after_the_call_is_read_as_it_was(method, true_sequential):
    """``a`` reads y, then the block adds 1 to y in place and ``b`` reads it: ``a``'s Hessian is
    that of y as ``a`` saw it (the walk copies inputs at the call), and the two share nothing
    (same tensor, another version). With ``true_sequential=False`` both linears are captured in
    one pass, so the update happens while ``a``'s input is held. The model equals the one
    quantized from the same block written without the in-place update."""
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            y = x + 0
            h = self.a(y)
            y.add_(1.0)  # (not a scaling, to which the solvers are blind)
            return x + h + self.b(y)

    class OutOfPlace(InPlace):
        def forward(self, x):
            y = x + 0
            return x + self.a(y) + self.b(y + 1.0)

    g = torch.Generator().manual_seed(5)
    calibration = {"task": [torch.randn(4, 16, generator=g) for _ in range(2)]}
    models = {}
    for block_type in (InPlace, OutOfPlace):
        torch.manual_seed(0)
        net = Net(block_type)
        experts = None
        if method == "epmq":
            experts = {"task": {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(6))
                                for k, v in net.state_dict().items()}}
        models[block_type] = epmq.quantize_model(
            net, SPEC, method=method, calibration=calibration, experts=experts, true_sequential=true_sequential,
            progress=False, adapter=epmq.Adapter("in-place", block_types=(block_type,)))
    a, b = models[InPlace].state_dict(), models[OutOfPlace].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any("hessian_of" in layer for layer in models[InPlace].epmq_report.layers)


class GainedBlock(nn.Module):
    """``x + fc(x * gain)``, the gain handed to it nested: ``gains["gain"]`` or ``gains["all"][0]``, or an
    object's attribute ``gains.gain``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x, gains):
        if not isinstance(gains, dict):
            return x + self.fc(x * gains.gain)
        gain = gains["gain"] if "gain" in gains else gains["all"][0]
        return x + self.fc(x * gain)


class GainAdvancingNet(Net):
    """Two GainedBlocks, the gain a step counter advanced after each block: in place, in the one
    ``gains`` handed to both (``fresh``: a new tensor in a new dict per call)."""

    def __init__(self, nest, fresh=False):
        super().__init__(GainedBlock)
        self.nest, self.fresh = nest, fresh

    def forward(self, x):
        gain = torch.ones(())
        for layer in self.layers:
            x = layer(x, gains={"gain": gain} if self.nest == "dict" else {"all": [gain]})
            gain = gain + 1 if self.fresh else gain.add_(1)
        return x


@pytest.mark.parametrize("nest", ["dict", "list in a dict"])
def test_an_argument_written_in_place_after_the_call_inside_a_dict_is_refused(nest, gen, monkeypatch):
    """The walk calls each block again with its arguments as recorded: a tensor the model advances in
    place after the call holds the later value by then. The check looked only in flat lists and tuples:
    held in a dict, block 0's linear was solved on x * 3 where the model runs it on x * 1, without a
    word. Refused, naming the argument, however nested; a new tensor per call is walked on what the
    block gets."""
    _refused_then_walked_fresh(GainAdvancingNet, nest, gen, monkeypatch,
                               r"calibration\['a'\] item 0: the model writes in place into 'gains', an "
                               r"argument of block 0 at 'layers', after that block's call")


class GainReplacingNet(GainAdvancingNet):
    """GainAdvancingNet whose gain is advanced out of place, the new tensor put in the old one's
    place in the ``gains`` handed to both blocks."""

    def forward(self, x):
        gains = {"gain": torch.ones(())} if self.nest == "dict" else {"all": [torch.ones(())]}
        held, key = (gains, "gain") if self.nest == "dict" else (gains["all"], 0)
        for layer in self.layers:
            x = layer(x, gains=gains)
            held[key] = held[key] + 1
        return x


@pytest.mark.parametrize("nest", ["dict", "list in a dict"])
def test_an_argument_whose_tensor_the_model_replaces_after_the_call_is_refused(nest, gen):
    """A tensor the model puts in another's place inside an argument after the block's call (a dict's
    entry advanced out of place) has a version counter of its own, which the check compared alone:
    block 0's linear was solved on x * 3 where the model runs it on x * 1, without a word. Refused,
    naming the argument."""
    items = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    model = GainReplacingNet(nest)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"calibration\['a'\] item 0: the model puts other tensors into 'gains', "
                                         r"an argument of block 0 at 'layers', after that block's call; .*: give "
                                         r"the model a new dict per call"):
        epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": items}, backend="torch", progress=False,
                            adapter=epmq.Adapter("gained", block_types=(GainedBlock,)))
    assert_untouched(model, before)


@pytest.mark.parametrize("targets", ["fp_path", "expert_path"])
def test_interleaved_stacks_refuse_target_streams(targets, gen):
    """CoCa's decoder calls a block of one list, then one of the other: a target stream, which
    replays an earlier stack from its recorded outputs, cannot follow; refused, the model whole."""
    fam = Family("open_clip_coca", gen, n_samples=1)
    model = fam.merged()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"targets='{targets}': the model calls the blocks at "
                                         r"'text_decoder.resblocks' among those at 'text_decoder.cross_attn'"):
        quantize(fam, model, targets=targets, method="epmq" if targets == "expert_path" else "gptq",
                 experts=fam.experts if targets == "expert_path" else None)
    assert_untouched(model, before)


def test_a_model_that_is_its_own_list_of_blocks_is_refused_up_front():
    """An nn.Sequential of blocks as the model: its layers would have no names (".0.fc1"); the
    walk failed after solving the first block. Refused before any work, saying what to do."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            return x + self.fc2(torch.relu(self.fc1(x)))

    model = nn.Sequential(Block(), Block()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("gptq", "rtn"):
        with pytest.raises(ValueError, match="itself the list of blocks.*self.blocks"):
            epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method=method,
                                calibration={"t": [torch.randn(4, 16)]} if method == "gptq" else None,
                                progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("item", ["tensor", "dict", "tuple", "list"])
def test_token_ids_without_their_batch_dimension_are_named(item):
    """One sequence's ids as a 1-D tensor: the embeddings gave [length, hidden] and the first
    block failed deep inside ("the size of tensor a (4) must match ..."), nothing saying how
    the input should be shaped."""
    model = build("llama")
    ids = torch.randint(0, 64, (8,))
    calibration = {"a": [{"tensor": ids, "dict": {"input_ids": ids}, "tuple": (ids,), "list": [ids]}[item]]}
    with pytest.raises(ValueError, match=r"item 0: .*shape \(8,\): token ids go as \[batch, length\]"):
        epmq.quantize_model(model, SPEC, method="gptq", calibration=calibration, progress=False)
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())
    epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": [ids[None]]}, progress=False)


@pytest.mark.parametrize("calibration,named", [({"a": ["some text"]}, "the item"),
                                                ({"a": [{"input_ids": "some text"}]}, "input_ids")])
def test_text_given_as_calibration_is_named(calibration, named):
    """Raw text as an item: the model's embedding failed ('embedding(): argument 'indices' ... must be
    Tensor, not str'), said as calibration the model cannot run, nothing saying to tokenize it; a
    task's text given whole was read as items of one character each."""
    model = build("llama")
    with pytest.raises(ValueError, match=rf"calibration\['a'\] item 0: {named} is text: tokenize it first "
                                         r"\(epmq\.calibration\.text_windows"):
        epmq.quantize_model(model, SPEC, method="gptq", calibration=calibration, progress=False)
    with pytest.raises(TypeError, match=r"calibration\['a'\] must be an iterable .* got a single str"):
        epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": "some text"}, progress=False)
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())


@pytest.mark.parametrize("arch, calibration, named, hint", [
    ("open_clip_clip", {"a": [{"image": torch.zeros(2, 3, 16, 16), "text": ["a cat", "a dog"]}]}, "text",
     r"open_clip\.get_tokenizer\(model_name\)\(texts\)"),
    ("open_clip_clip", {"a": [(torch.zeros(2, 3, 16, 16), ["a cat", "a dog"])]}, "element 1",
     r"open_clip\.get_tokenizer"),
    ("plain", {"a": ["some text"]}, None, None),
    ("plain", {"a": [{"x": ["a cat"]}]}, None, None)],
    ids=["open_clip-keyword", "open_clip-positional", "plain-text", "plain-keyword"])
def test_text_given_as_calibration_of_a_model_outside_transformers_is_named(arch, calibration, named, hint):
    """Texts as calibration of an open_clip model or a plain module were refused for HF models alone: the
    others failed as calibration the model cannot run ('embedding(): ... must be Tensor, not list') or deep in
    a block ("'str' object has no attribute 'dtype'"), nothing saying to tokenize them. They are named, with
    the model's way to token ids; a plain module's where its forward hands them on to its blocks (it may
    tokenize them itself: test_a_plain_module_tokenizing_its_texts_in_its_forward_is_quantized)."""
    model = Net(Residual) if arch == "plain" else build(arch)
    said = (r"the model's forward hands its text on to the blocks at 'layers', which read tensors: tokenize it first"
            if arch == "plain" else rf"{named} is text: tokenize it first \({hint}")
    for adapter in ([None, epmq.Adapter("toy", block_types=("Residual",))] if arch == "plain" else [None]):
        with pytest.raises(ValueError, match=rf"^calibration\['a'\] item 0: {said}"):
            epmq.quantize_model(model, SPEC, method="gptq", calibration=calibration, progress=False, adapter=adapter)
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())


@pytest.mark.parametrize("item", ["some words here", ["a b c d", "e f g h"]], ids=["text", "texts"])
def test_a_plain_module_tokenizing_its_texts_in_its_forward_is_quantized(item):
    """A module outside transformers and open_clip whose forward takes texts and tokenizes them itself (a
    pipeline wrapping its tokenizer) was quantized on them, until 2407a0c refused every text item of such a
    model up front ('Net's forward takes tensors', which this one does not): it is quantized again."""

    class Tokenizing(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(64, 16)
            self.layers = nn.ModuleList([Residual(), Residual()])

        def forward(self, texts):
            texts = [texts] if isinstance(texts, str) else texts
            ids = torch.tensor([[sum(map(ord, word)) % 64 for word in text.split()] for text in texts])
            x = self.embedding(ids)
            for layer in self.layers:
                x = layer(x)
            return x

    model = Tokenizing().eval()
    epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": [{"texts": item}]}, progress=False)
    assert [layer["name"] for layer in model.epmq_report.layers] == ["layers.0.fc", "layers.1.fc"]


@pytest.mark.parametrize("form", ["tensor", "dict"])
def test_calibration_longer_than_the_models_positions_is_named(form, gen):
    """Items of more tokens than GPT-2's table of positions: calibration the model cannot run ('IndexError:
    index out of range in self'), nothing saying why. Named, with the config key bounding them; items of as
    many tokens as the positions run."""
    model = build("gpt2")
    limit = model.config.n_positions
    ids = torch.randint(0, 64, (2, limit + 1), generator=gen)

    def given(x):
        return x if form == "tensor" else {"input_ids": x}

    named = "the item" if form == "tensor" else "input_ids"
    with pytest.raises(ValueError, match=rf"calibration\['a'\] item 1: {named} holds {limit + 1} tokens, more than "
                                         rf"the model's {limit} positions \(n_positions in its config\)"):
        epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": [given(ids[:, :8]), given(ids)]},
                            progress=False)
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())
    epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": [given(ids[:, :limit])]}, progress=False)


_SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=8)


@pytest.mark.parametrize("model_class, config", [
    ("LlamaForCausalLM", transformers.LlamaConfig(**_SMALL, num_key_value_heads=2)),
    ("LlamaForCausalLM", transformers.LlamaConfig(  # (the key the length before scaling)
        **_SMALL, num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0})),
    ("MistralForCausalLM", transformers.MistralConfig(**_SMALL, num_key_value_heads=2, sliding_window=4)),
    ("GPTNeoXForCausalLM", transformers.GPTNeoXConfig(**_SMALL)),
    ("FalconForCausalLM", transformers.FalconConfig(**{k: v for k, v in _SMALL.items() if k != "intermediate_size"},
                                                    alibi=True)),
    ("DebertaV2Model", transformers.DebertaV2Config(**_SMALL, relative_attention=True, position_buckets=4,
                                                    position_biased_input=False, pos_att_type=["p2c", "c2p"])),
], ids=["llama", "llama-rope-scaling", "mistral", "gpt-neox", "falcon-alibi", "deberta-v2"])
def test_calibration_longer_than_a_position_key_no_table_holds_runs(model_class, config, gen):
    """Every max_position_embeddings bounded the items, as GPT-2's table does: a model whose positions are
    computed from each token's index (rotary angles, ALiBi slopes, DeBERTa's relative buckets) runs on longer
    sequences, and items past the key were refused ('more than the model's 8 positions'). They calibrate."""
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).eval()
    ids = torch.randint(3, 60, (2, 3 * config.max_position_embeddings), generator=gen)
    with torch.no_grad():  # (the model itself runs on them)
        assert torch.isfinite(model(input_ids=ids)[0]).all()
    epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": [{"input_ids": ids}]}, progress=False)
    assert any(isinstance(m, epmq.QuantLinear) for m in model.modules())


@pytest.mark.parametrize("decoder", ["decoder_input_ids", "labels"])
def test_an_encoder_decoders_decoder_inputs_longer_than_its_positions_are_named(gen, decoder):
    """Only an item's first token ids were held to the positions: BART's decoder ids (or the labels it shifts
    into them) past its table failed as calibration the model cannot run ('IndexError: index out of range in
    self') beside input_ids within it. Each sequence is held to them, named."""
    model = build("bart")
    limit = model.config.max_position_embeddings
    ids = torch.randint(4, 60, (1, 8), generator=gen)
    long = torch.randint(4, 60, (1, limit + 1), generator=gen)
    with pytest.raises(ValueError, match=rf"calibration\['a'\] item 0: {decoder} holds {limit + 1} tokens, more than "
                                         rf"the model's {limit} positions \(max_position_embeddings in its config\)"):
        epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": [{"input_ids": ids, decoder: long}]},
                            progress=False)
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())


@pytest.mark.parametrize("error", [OSError, ValueError])
def test_a_calibration_generator_failing_halfway_is_named(gen, error):
    """A generator (or dataset) raising while it gives a task's items ended the walk as its own error alone,
    naming no task nor item: the error goes on as it is, noted with both, before any layer is quantized. A
    ValueError too: the one the walk's padding check raises is its own, a generator's was replaced by
    'calibration['b']: ...' without the note naming the item or the generator's traceback."""
    model = build("llama")

    def items():
        yield torch.randint(0, 64, (1, 8), generator=gen)
        raise error("the shard is gone")

    with pytest.raises(error, match="^the shard is gone") as raised:
        epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": [torch.randint(0, 64, (1, 8))],
                                                                     "b": items()}, progress=False)
    assert raised.value.__notes__ == ["(while reading calibration['b'] item 1, before any layer was quantized)"]
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())


def test_hooks_on_a_quantized_layer_are_kept_and_seen_by_the_calibration(gen):
    """A forward hook the caller put on a linear went with it: the QuantLinear in its place
    had none (the model's outputs changed without a word) and the blocks after it were
    calibrated without the hook's effect. The hook moves to the packed layer (its handle still
    removes it), and the walk equals that of the same model with the effect in the weights."""
    fam = Family("llama", gen, n_samples=1)
    hooked, baked = fam.merged(), fam.merged()
    handle = hooked.model.layers[0].self_attn.o_proj.register_forward_hook(lambda m, args, out: out * 2)
    seen = []
    pre = hooked.model.layers[1].mlp.up_proj.register_forward_pre_hook(lambda m, args: seen.append(1))
    with torch.no_grad():
        baked.model.layers[0].self_attn.o_proj.weight.mul_(2)  # (a power of two: the same codes)
    for model in (hooked, baked):
        quantize(fam, model, method="gptq", experts=None)
    o_proj = hooked.model.layers[0].self_attn.o_proj
    assert isinstance(o_proj, epmq.QuantLinear) and list(o_proj._forward_hooks) == [handle.id]
    torch.testing.assert_close(output(hooked, fam.test_item), output(baked, fam.test_item), rtol=1e-5, atol=1e-6)
    called = len(seen)
    output(hooked, fam.test_item)
    assert len(seen) == called + 1
    handle.remove(), pre.remove()
    output(hooked, fam.test_item)
    assert not o_proj._forward_hooks and len(seen) == called + 1


@pytest.mark.parametrize("reparametrize", ["weight_norm", "spectral_norm", "prune"])
def test_hook_based_weight_reparametrizations_are_baked_in_not_kept(gen, reparametrize):
    """torch's older weight_norm, spectral_norm and prune compute ``weight`` in a pre-hook
    from the linear's own tensors (weight_g, weight_orig, ...): the quantized weight is the one
    they computed, and the packed layer, which has none of those tensors, does not take the
    hook (it failed at its first call). The model equals the one with the weight made plain
    (spectral_norm's removal recomputes it: the packed layer is that of the weight it computed)."""
    import torch.nn.utils.prune as prune

    fam = Family("llama", gen, n_samples=1)
    hooked, plain = fam.merged(), fam.merged()
    for model in (hooked, plain):
        for layer in model.model.layers:
            if reparametrize == "prune":
                prune.l1_unstructured(layer.mlp.up_proj, "weight", amount=0.3)
            else:
                getattr(nn.utils, reparametrize)(layer.mlp.up_proj)
    output(hooked, fam.test_item)  # (the hooks compute the weight they hold at a call)
    computed = [layer.mlp.up_proj.weight.detach().clone() for layer in hooked.model.layers]
    for layer in plain.model.layers:
        if reparametrize == "prune":
            prune.remove(layer.mlp.up_proj, "weight")
        else:
            getattr(nn.utils, f"remove_{reparametrize}")(layer.mlp.up_proj)
    for model in (hooked, plain):
        quantize(fam, model, method="gptq", experts=None)
    for layer, weight in zip(hooked.model.layers, computed):
        assert not layer.mlp.up_proj._forward_pre_hooks
        assert rel_err(layer.mlp.up_proj.dequantize(), weight) < 0.25  # (4 bits)
    if reparametrize != "spectral_norm":
        torch.testing.assert_close(output(hooked, fam.test_item), output(plain, fam.test_item), rtol=0, atol=0)


def test_a_calibration_item_with_a_filled_generation_cache_is_named(gen):
    """An item that carries ``past_key_values`` of earlier tokens (as a generation loop hands
    them on): the walk calls the blocks without a cache, so the masks made for the cached
    tokens failed deep inside ("the size of tensor a (4) must match ..."), nothing naming the
    cache. Named, the model untouched; an empty cache is what a first call gets: accepted."""
    from transformers import DynamicCache

    model = build("llama")
    ids = torch.randint(0, 64, (2, 8), generator=gen)
    with torch.no_grad():
        cache = model(ids[:, :4], use_cache=True).past_key_values
    assert cache.get_seq_length() == 4
    with pytest.raises(ValueError, match=r"item 0: past_key_values holds a generation cache of earlier tokens"):
        epmq.quantize_model(model, SPEC, method="gptq", progress=False,
                            calibration={"a": [{"input_ids": ids[:, 4:], "past_key_values": cache}]})
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())
    epmq.quantize_model(model, SPEC, method="gptq", progress=False,
                        calibration={"a": [{"input_ids": ids, "past_key_values": DynamicCache()}]})


class PastReading(nn.Module):
    """``x + fc(x + the sum of the values layer_past holds)``: one layer's legacy ``(key, value)`` of
    earlier tokens, [batch, 2 heads, tokens, 8], as GPT-J's, Bloom's and ChatGLM's blocks take theirs
    (None: none)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x, layer_past=None):
        if layer_past is not None:
            _, value = layer_past
            x = x + value.transpose(1, 2).flatten(2).sum(dim=1, keepdim=True)
        return x + self.fc(x)


class PastNet(Net):
    """Two PastReading handed the keys and values of ``tokens`` earlier tokens: ``given``, the model's
    own ``layer_past`` (one layer's, the same to both); else of a prefix the model runs itself."""

    def __init__(self, tokens=3, given=False):
        super().__init__(PastReading)
        self.prefix = nn.Parameter(torch.randn(1, 2, tokens, 8))
        self.given = given

    def forward(self, x, layer_past=None):
        if not self.given:
            layer_past = (self.prefix.expand(len(x), -1, -1, -1),) * 2
        for layer in self.layers:
            x = layer(x, layer_past=layer_past)
        return x


@pytest.mark.parametrize("adapter", ["registered", "auto"])
def test_one_layers_legacy_keys_and_values_of_earlier_tokens_are_named(adapter, gen, monkeypatch):
    """One layer's legacy ``(key, value)`` (GPT-J's, Bloom's, ChatGLM's ``layer_past``, ``kv_cache``)
    holding earlier tokens was taken for no cache (only the tuple of every layer's was), and dropped:
    the blocks were solved on their inputs without the tokens the model attends to, without a word.
    Refused by name where the model fills it before the blocks, and where a calibration item gives it;
    keys and values of no token are what a first call gets: walked on a plain forward's inputs."""
    from test_walker_models import assert_same_statistics, hooked_inputs, walked_inputs

    items = [torch.randn(2, 4, 16, generator=gen) for _ in range(2)]
    options = dict(method="gptq", backend="torch", progress=False,
                   adapter=epmq.adapters.AUTO if adapter == "auto" else
                   epmq.Adapter("past", block_types=(PastReading,)))
    model = PastNet()
    before = snapshot(model)
    # (named by the item the check ran on, as a state given with one item alone is)
    with pytest.raises(ValueError, match=r"^calibration\['a'\] item 0: the blocks at 'layers' \(\w+\) are "
                                         r"handed a layer_past \(a tuple of keys and values\) that the model filled "
                                         r"before them"):
        epmq.quantize_model(model, SPEC, calibration={"a": items}, **options)
    assert_untouched(model, before)
    model = PastNet(given=True)
    before = snapshot(model)
    past = (torch.randn(2, 2, 3, 8, generator=gen),) * 2
    with pytest.raises(ValueError, match=r"item 0: layer_past holds a generation cache of earlier tokens"):
        epmq.quantize_model(model, SPEC, calibration={"a": [{"x": x, "layer_past": past} for x in items]}, **options)
    assert_untouched(model, before)
    model = PastNet(tokens=0)
    hand = hooked_inputs(model, "layers.0.fc", [{"x": x} for x in items])
    seen = walked_inputs(monkeypatch)
    epmq.quantize_model(model, SPEC, calibration={"a": items}, **options, layers=lambda name: name == "layers.0.fc")
    assert_same_statistics(seen, hand)


def test_numpys_numbers_as_anchors_are_written_as_json(gen, tmp_path):
    """A sweep's anchor, weight_anchor and percdamp read from numpy arrays (np.float32, np.int64),
    which check_number takes, were kept as they came in the walk's report, so its JSON (the
    report file, the checkpoint's quantize_config.json) failed after the whole walk ('Object of
    type float32 is not JSON serializable'); held as Python's numbers, the same codes."""
    import json

    import numpy as np

    fam = Family("llama", gen)
    got = quantize(fam, fam.merged(), anchor=np.float32(0.5), weight_anchor=np.int64(0), percdamp=np.float32(0.25))
    want = quantize(fam, fam.merged(), anchor=0.5, weight_anchor=0, percdamp=float(np.float32(0.25)))
    assert json.loads(json.dumps(got.epmq_report.to_dict()))["anchor"] == 0.5
    got.epmq_report.to_json(tmp_path / "report.json")
    epmq.save_quantized(got, tmp_path / "q")
    codes = {k: v for k, v in want.state_dict().items() if k.endswith("qweight")}
    assert codes and all(torch.equal(got.state_dict()[k], v) for k, v in codes.items())


def test_a_numpy_blocksize_is_taken_as_the_solver_takes_it(gen, tmp_path):
    """A sweep's blocksize read from a numpy array (np.int64(8)), which gptq_solve takes since
    dfc8433 and beside which quantize_model takes the sweep's anchors (b451bdb), was refused by
    quantize_model as 'blocksize must be a positive integer, got np.int64(8)'; taken, the same
    codes as blocksize=8, and the report's JSON written."""
    import numpy as np

    fam = Family("llama", gen)
    got = quantize(fam, fam.merged(), blocksize=np.int64(8))
    want = quantize(fam, fam.merged(), blocksize=8)
    got.epmq_report.to_json(tmp_path / "report.json")
    codes = {k: v for k, v in want.state_dict().items() if k.endswith("qweight")}
    assert codes and all(torch.equal(got.state_dict()[k], v) for k, v in codes.items())
    for bad in (8.0, True, np.float32(8)):
        with pytest.raises(ValueError, match="blocksize must be a positive integer"):
            quantize(fam, fam.merged(), blocksize=bad)


def test_true_sequential_is_a_flag_as_the_cli_checks_it(gen, tmp_path):
    """quantize_model(true_sequential="no") (the CLI refuses it) ran true sequential, the string
    being truthy, and said 'no' in its report, silently; np.False_ (a sweep's, read from an
    array) ran one pass but its report failed to be written after the walk ('Object of type
    bool is not JSON serializable': quantize_checkpoint lost the walk so). A string or an int is
    refused before the walk, naming it; numpy's bools are the walk Python's give, held as them."""
    import numpy as np

    fam = Family("llama", gen)
    got = quantize(fam, fam.merged(), true_sequential=np.False_)
    want = quantize(fam, fam.merged(), true_sequential=False)
    assert got.epmq_report.true_sequential is False
    got.epmq_report.to_json(tmp_path / "report.json")
    codes = {k: v for k, v in want.state_dict().items() if k.endswith("qweight")}
    assert codes and all(torch.equal(got.state_dict()[k], v) for k, v in codes.items())
    for bad in ("no", "False", 0, None):
        model = fam.merged()
        before = snapshot(model)
        with pytest.raises(ValueError, match="true_sequential must be True or False"):
            quantize(fam, model, true_sequential=bad)
        assert_untouched(model, before)


class ReadingMixer(nn.Module):
    """``out(dt.weight @ up(x))``, as Mamba's mixer multiplies by ``dt_proj.weight``; ``gate``'s
    weight read by F.linear where the module's own setting says so, else the layer called; a read
    in training mode only, of the weight's dtype, and in isinstance, which a packed layer serves."""

    def __init__(self, fused=False):
        super().__init__()
        self.fused = fused
        self.up, self.gate, self.dt, self.out = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        if self.training and x.shape[0] > 0:
            return F.linear(x, self.out.weight)
        if isinstance(self.up.weight, torch.Tensor) and x.dtype != self.up.weight.dtype:
            x = x.to(self.up.weight.dtype)
        h = F.linear(self.up(x), self.gate.weight) if self.fused else self.gate(self.up(x))
        return self.out((self.dt.weight @ h.T).T)


class FusedReadingMixer(ReadingMixer):
    def __init__(self):
        super().__init__(fused=True)


def _called(layer, h):
    return layer(h)


def _scanned(layer, h):
    return _product(h, layer)


def _product(h, mixer):
    return (mixer.weight @ h.T).T


class HelperReadingMixer(nn.Module):
    """ReadingMixer's reads made by helpers the forward hands its layers to: ``gate``'s weight by a
    method (``self._gated(h, layer=self.gate)``), ``dt``'s by a module-level function through
    another; ``up`` called by one."""

    def __init__(self):
        super().__init__()
        self.up, self.gate, self.dt, self.out = (nn.Linear(16, 16) for _ in range(4))

    def _gated(self, h, layer):
        return F.linear(h, layer.weight) if not self.training else h

    def forward(self, x):
        return self.out(_scanned(self.dt, self._gated(_called(self.up, x), layer=self.gate)))


class AliasReadingMixer(nn.Module):
    """ReadingMixer's reads of layers named by local names: ``dt = self.dt``, and ``gates.0`` in a
    loop over a ModuleList."""

    def __init__(self):
        super().__init__()
        self.up, self.dt, self.out = (nn.Linear(16, 16) for _ in range(3))
        self.gates = nn.ModuleList([nn.Linear(16, 16)])

    def forward(self, x):
        h, dt = self.up(x), self.dt
        for layer in self.gates:
            h = F.linear(h, layer.weight)
        return self.out((dt.weight @ h.T).T)


def test_rtn_of_blocks_whose_code_it_cannot_read_says_so():
    """A block class with no source file (defined in a notebook, whose __main__ has none, or by exec)
    hides from RTN's reading whether its code uses a linear's weight without calling it, as this
    one does dt's: RTN packed it with no word, and the model computed garbage; RTN says that it
    cannot read the class, naming it, and what sees such a read (a walk: method='gptq')."""
    namespace = {"nn": nn, "__name__": "notebook"}
    exec("class NotebookMixer(nn.Module):\n"
         "    def __init__(self):\n"
         "        super().__init__()\n"
         "        self.up, self.dt = nn.Linear(16, 16), nn.Linear(16, 16)\n"
         "    def forward(self, x):\n"
         "        return (self.dt.weight @ self.up(x).T).T\n", namespace)
    block_type = namespace["NotebookMixer"]
    model = Net(block_type).eval()
    with pytest.warns(UserWarning, match=r"cannot read the code of NotebookMixer .*method='gptq'"):
        epmq.quantize_model(model, SPEC, method="rtn", progress=False,
                            adapter=epmq.Adapter("mixers", block_types=(block_type,)))


class ClosureReadingMixer(nn.Module):
    """ReadingMixer's reads made by a function its forward defines, handed ``gate`` and ``dt``."""

    def __init__(self):
        super().__init__()
        self.up, self.gate, self.dt, self.out = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        def scan(layer, h):
            return (layer.weight @ h.T).T

        return self.out(scan(self.dt, scan(h=self.up(x), layer=self.gate)))


class NamedReadingMixer(nn.Module):
    """ReadingMixer's reads of layers named as other than ``self.<name>``: ``self._modules["gate"]``
    and ``getattr(self, "dt")``; ``up`` called as ``self._modules["up"]``."""

    def __init__(self):
        super().__init__()
        self.up, self.gate, self.dt, self.out = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        h = F.linear(self._modules["up"](x), self._modules["gate"].weight)
        return self.out((getattr(self, "dt").weight @ h.T).T)


class LambdaReadingMixer(nn.Module):
    """ReadingMixer's reads made by a lambda its forward binds, handed ``dt`` and the last of a
    ModuleList by its index."""

    def __init__(self):
        super().__init__()
        self.up, self.dt, self.out = (nn.Linear(16, 16) for _ in range(3))
        self.gates = nn.ModuleList([nn.Linear(16, 16)])

    def forward(self, x):
        scan = lambda layer, h: (layer.weight @ h.T).T  # noqa: E731
        return self.out(scan(self.dt, scan(self.gates[-1], self.up(x))))


class LoopedReadingMixer(nn.Module):
    """ReadingMixer's reads of layers a loop takes from ``enumerate`` over a ModuleList and a
    comprehension from a ModuleDict's ``items()``."""

    def __init__(self):
        super().__init__()
        self.up, self.out = nn.Linear(16, 16), nn.Linear(16, 16)
        self.gates, self.dts = nn.ModuleList([nn.Linear(16, 16)]), nn.ModuleDict({"dt": nn.Linear(16, 16)})

    def forward(self, x):
        h = self.up(x)
        for i, layer in enumerate(self.gates):
            h = F.linear(h, layer.weight)
        dt = sum(layer.weight for name, layer in self.dts.items())
        return self.out((dt @ h.T).T)


class StackingReadingMixer(nn.Module):
    """ReadingMixer's reads of a ModuleList's layers stacked by a list comprehension, as an MoE's
    experts may be run as one batched product."""

    def __init__(self):
        super().__init__()
        self.up, self.out = nn.Linear(16, 16), nn.Linear(16, 16)
        self.gates = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])

    def forward(self, x):
        W = torch.stack([layer.weight for layer in self.gates])
        return self.out(torch.einsum("goi,ni->no", W, self.up(x)))


class GetattrReadingMixer(nn.Module):
    """ReadingMixer's reads of weights taken by ``getattr(layer, "weight")`` (with a default too);
    ``up``'s for its dtype alone."""

    def __init__(self):
        super().__init__()
        self.up, self.gate, self.dt, self.out = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        h = F.linear(self.up(x.to(getattr(self.up, "weight").dtype)), getattr(self.gate, "weight"))
        return self.out((getattr(self.dt, "weight", None) @ h.T).T)


@pytest.mark.parametrize("block_type, read", [(ReadingMixer, ["dt"]), (FusedReadingMixer, ["gate", "dt"]),
                                              (GetattrReadingMixer, ["gate", "dt"]),
                                              (LoopedReadingMixer, ["gates.0", "dts.dt"]),
                                              (StackingReadingMixer, ["gates.0", "gates.1"]),
                                              (NamedReadingMixer, ["gate", "dt"]),
                                              (LambdaReadingMixer, ["gates.0", "dt"]),
                                              (HelperReadingMixer, ["gate", "dt"]),
                                              (ClosureReadingMixer, ["gate", "dt"]),
                                              (AliasReadingMixer, ["gates.0", "dt"])])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_linears_whose_weight_a_block_reads_without_a_call_stay_in_full_precision(block_type, read, method):
    """What the blocks' code reads as a weight tensor and never calls stays a linear (RTN, which runs
    no forward, packed it, and the product read the packed layer's data-less stand-in: garbage);
    what it calls, or reads only for its dtype or in training mode, is packed."""
    torch.manual_seed(0)
    model = Net(block_type).eval()
    x = torch.randn(4, 16)
    kw = dict(calibration={"task": [x]}) if method == "gptq" else {}
    with pytest.warns(UserWarning, match="stay in full precision"):
        epmq.quantize_model(model, SPEC, method=method, progress=False,
                            adapter=epmq.Adapter("mixers", block_types=(block_type,)), **kw)
    left = [f"layers.{i}.{rel}" for i in range(2) for rel in read]
    assert sorted(model.epmq_report.skipped) == sorted(left)
    assert all(type(model.get_submodule(name)) is nn.Linear for name in left)
    packed = [name for name, m in model.named_modules() if isinstance(m, epmq.QuantLinear)]
    assert len(packed) == 2 * (4 - len(read)) == len(model.epmq_report.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(x), as_linears(model)(x))


def as_linears(model):
    """A copy of ``model`` with its packed layers as linears of their dequantized weights."""
    reference = copy.deepcopy(model)
    for name, layer in model.named_modules():
        if isinstance(layer, epmq.QuantLinear):
            parent, _, attr = name.rpartition(".")
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            linear.weight.data.copy_(layer.dequantize())
            if layer.bias is not None:
                linear.bias.data.copy_(layer.bias)
            setattr(reference.get_submodule(parent), attr, linear)
    return reference


class TiedMixer(nn.Module):
    """Calls ``q`` and reads its weight as values too, a projection tied to it (``q.weight``
    transposed), and for the device to put its input on."""

    def __init__(self):
        super().__init__()
        self.q, self.out = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x):
        h = self.q(x.to(self.q.weight.device))
        return self.out(F.linear(h, self.q.weight.T))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_linear_a_block_calls_and_reads_the_weight_of_is_packed_and_read_dequantized(method, gen):
    """A linear the block calls and whose weight it reads too was packed, and the read took the
    packed layer's meta stand-in: x.to(q.weight.device) put the input on the meta device (a bare
    "not on the expected device meta" error, in the walk's next pass), and the tied product was
    garbage without a word. It is packed, and the read takes its dequantized weight."""
    model = Net(TiedMixer).eval()
    x = torch.randn(4, 16, generator=gen)
    kw = dict(calibration={"task": [x]}) if method == "gptq" else {}
    epmq.quantize_model(model, SPEC, method=method, progress=False,
                        adapter=epmq.Adapter("mixers", block_types=(TiedMixer,)), **kw)
    assert not model.epmq_report.skipped
    assert all(isinstance(model.get_submodule(f"layers.{i}.{rel}"), epmq.QuantLinear)
               for i in range(2) for rel in ("q", "out"))
    with torch.no_grad():
        torch.testing.assert_close(model(x), as_linears(model)(x))


@pytest.mark.parametrize("batch", [1, 2])
def test_a_registered_adapter_whose_stand_ins_return_less_than_its_blocks_is_refused_naming_why(gen, batch):
    """WavLM's layers return (hidden, position bias), which its encoder unpacks. An epmq.Adapter registered
    for them, as the warning of a tower left in full precision offers, stood in for them with the hidden
    states alone, and the walk ended in the model's bare 'not enough values to unpack (expected 2, got 1)';
    with a batch of 2 the stand-in's tensor unpacked into its two rows, the second handed to the next block
    as its position bias, and the walk ended at block 1 in torch's bare "shape '[-1, 63, 63]' is invalid".
    Refused naming the blocks, what they return, what the stand-ins return and the remedy, under a
    public name (it read epmq.walker._StandInRefused, a private class), the model's error its cause."""
    import traceback

    from test_walker_towers import tiny_speech_encoder_decoder

    model = tiny_speech_encoder_decoder(False, family="WavLM")
    item = dict(input_values=torch.randn(batch, 640, generator=gen),
                decoder_input_ids=torch.randint(1, 64, (batch, 6), generator=gen))
    with pytest.raises(ValueError, match=r"the blocks at 'encoder\.encoder\.layers' \(mine\) return a tuple of 2 "
                                         r"\(block 0: WavLMEncoderLayer\) where the adapter's stand-ins return a "
                                         r"tensor, and the model .*passthrough_of.*adapters\.AUTO") as refused:
        epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method="gptq", calibration={"a": [item]},
                            progress=False, adapter=[epmq.adapters.GPT2, epmq.Adapter("mine", ("WavLMEncoderLayer",))])
    assert isinstance(refused.value, epmq.StandInError) and "StandInError" in epmq.__all__
    said = traceback.format_exception_only(type(refused.value), refused.value)[-1]
    assert said.startswith("epmq.walker.StandInError: the blocks at 'encoder.encoder.layers' (mine) return "), said
    if batch == 1:  # (the model failed unpacking the stand-in's tensor; with 2 rows it took them apart)
        assert "failed on that (ValueError: not enough values to unpack" in said
        assert isinstance(refused.value.__cause__, ValueError) and "unpack" in str(refused.value.__cause__)
    else:
        assert "took block 1's position_bias out of that" in said and refused.value.__cause__ is None


def test_a_linear_the_experts_pass_does_not_call_is_named_on_the_expert_path(gen):
    """A block whose calls depend on its input (a branch a plain Adapter does not know as routing):
    the expert's block 0 turns its stream negative, so block 1 of the expert's pass skips ``b``, which
    the quantized model's pass calls; E-PMQ has no target for it there. Refused naming the linear, the
    task and the remedy, where it ended in a bare KeyError: 'b'; the model left as it was."""
    from test_walker_calibration import Branch

    torch.manual_seed(0)
    net = Net(Branch)
    expert = {k: v.clone() for k, v in net.state_dict().items()}
    expert["layers.0.a.bias"] -= 10.0  # (its block 0's output, block 1's input, negative)
    calibration = {"task": [torch.randn(4, 16, generator=gen).abs() + 1]}
    before = snapshot(net)
    said = r"layers\.1\.b, .*task 'task' and the expert's pass does not.*targets='merged_path'"
    with pytest.raises(ValueError, match=said):
        epmq.quantize_model(net, SPEC, method="epmq", targets="expert_path", calibration=calibration,
                            experts={"task": expert}, backend="torch", progress=False,
                            adapter=epmq.Adapter("branch", block_types=(Branch,)))
    assert_untouched(net, before)


def test_a_layer_whose_packed_weights_overflow_float16_is_named(gen):
    """A float16 model's group spanning float16's whole range packs to weights past 65504 (the grid's
    rounded zero point shifts its ends by up to half a step): its outputs were inf. Refused, naming
    the layer, and the model is left as it was."""
    fam = Family("llama", gen, n_samples=1)
    model = fam.merged().half()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, :2] = torch.tensor([-65504.0, 65504.0])
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"^model\.layers\.1\.mlp\.up_proj: weights up to .* overflow float16"):
        epmq.quantize_model(model, SPEC, method="rtn", progress=False)
    assert_untouched(model, before)


class ValueChangingNet(GainAdvancingNet):
    """GainReplacingNet's gain a float, not a tensor, advanced after each block in the ``gains`` handed
    to both: put in the old one's place, or (``nest="appended"``) appended to the list that holds it
    (``fresh``: a new dict per call)."""

    def forward(self, x):
        gains = {"gain": 1.0} if self.nest == "dict" else {"all": [1.0]}
        for layer in self.layers:
            x = layer(x, gains=copy.deepcopy(gains) if self.fresh else gains)
            if self.nest == "dict":
                gains["gain"] += 1
            elif self.nest == "appended":
                gains["all"].append(gains["all"][-1] + 1)
            else:
                gains["all"][0] += 1
        return x


@pytest.mark.parametrize("nest", ["dict", "list in a dict", "appended"])
def test_an_argument_whose_plain_value_the_model_replaces_after_the_call_is_refused(nest, gen, monkeypatch):
    """The check of kept arguments looked at their tensors alone: a float the model puts in another's
    place inside an argument after the block's call (or a value it appends to a list there) went
    unseen, and block 0's linear was solved on x * 3 where the model runs it on x * 1, without a word.
    Refused, naming the argument and that a new dict per call (of new lists, where it holds one) is the
    fix; one is walked on what the block gets."""
    _refused_then_walked_fresh(ValueChangingNet, nest, gen, monkeypatch,
                               r"calibration\['a'\] item 0: the model puts other values into 'gains', "
                               r"an argument of block 0 at 'layers', after that block's call; .*: give "
                               r"the model a new dict per call"
                               + (r" \(and new lists and dicts in it\)" if nest != "dict" else ""))


@dataclasses.dataclass
class Gain:
    gain: object


@dataclasses.dataclass(slots=True)
class SlottedGain:
    gain: object


class ObjectAdvancingNet(GainAdvancingNet):
    """GainAdvancingNet whose gain is the attribute of one object handed to both blocks (a
    SimpleNamespace, a dataclass of slots), advanced after each block: set anew, or written in place
    where it is a tensor (``fresh``: a new object per call)."""

    def forward(self, x):
        kind = {"namespace": types.SimpleNamespace, "slotted dataclass": SlottedGain}.get(self.nest, Gain)
        gains = kind(gain=torch.ones(()) if self.nest == "tensor in a dataclass" else 1.0)
        for layer in self.layers:
            x = layer(x, gains=gains)
            if self.fresh:
                gains = kind(gain=gains.gain + 1)
            elif isinstance(gains.gain, torch.Tensor):
                gains.gain.add_(1)
            else:
                gains.gain += 1
        return x


@pytest.mark.parametrize("nest, said", [("namespace", "puts other values into 'gains'.*a new SimpleNamespace"),
                                        ("slotted dataclass", "puts other values into 'gains'.*a new SlottedGain"),
                                        ("tensor in a dataclass", "writes in place into 'gains'.*a new tensor")])
def test_an_object_whose_attribute_the_model_changes_after_the_call_is_refused(nest, said, gen, monkeypatch):
    """An object handed to the blocks (a SimpleNamespace, a dataclass) was held by the check of kept
    arguments as a value, the same object before and after: the gain the model advanced in it after
    block 0's call went unseen, and block 0's linear was solved on x * 3 where the model runs it on
    x * 1, without a word. Its attributes are looked into: refused, naming the argument; a new object
    per call is walked on what the block gets."""
    _refused_then_walked_fresh(ObjectAdvancingNet, nest, gen, monkeypatch,
                               rf"calibration\['a'\] item 0: the model {said} per call")


@pytest.mark.parametrize("nest", ["namespace", "tensor in a dataclass"])
def test_an_object_the_model_changes_between_blocks_auto_runs_is_refused(nest, gen):
    """Where the stand-ins run the blocks (AUTO), the check of kept arguments looks into no object at the
    end of the pass (what the blocks change in one is theirs), so the gain the model advanced in one
    between block 0's call and block 1's went unseen. Looked for between the calls: refused, naming
    the argument; the model as it was."""
    items = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    model = ObjectAdvancingNet(nest)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"calibration\['a'\] item 0: the model (puts other values|writes in place) "
                                         r"into 'gains', an argument of block 0 at 'layers', after that block's call"):
        epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": items}, backend="torch", progress=False,
                            adapter=epmq.adapters.AUTO)
    assert_untouched(model, before)


class SkippingGainNet(Net):
    """Three GainedBlocks, the one ``gains`` handed to blocks 0 and 2 alone, its gain advanced by the model
    between blocks 1 and 2: a change only block 2 gets."""

    def __init__(self):
        super().__init__(GainedBlock)
        self.layers.append(GainedBlock())

    def forward(self, x):
        gains = types.SimpleNamespace(gain=1.0)
        x = self.layers[1](self.layers[0](x, gains=gains), gains=types.SimpleNamespace(gain=1.0))
        gains.gain += 2
        return self.layers[2](x, gains=gains)


@pytest.mark.parametrize("adapter", ["registered", "auto"])
def test_an_object_the_model_changes_for_a_later_block_alone_is_refused(adapter, gen):
    """Where the stand-ins run the blocks (AUTO), the model's changes to an object were looked for between
    one block's call and the next among the arguments of the block called last alone: a gain the model
    advanced in the object block 0 got, between blocks 1 and 2, went unseen, and block 0 was solved on x * 3
    where the model runs it on x, without a word. Refused, naming the argument and block 0, as where the
    blocks are stand-ins; the model as it was."""
    items = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    model = SkippingGainNet()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"calibration\['a'\] item 0: the model puts other values into 'gains', an "
                                         r"argument of block 0 at 'layers', after that block's call"):
        epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": items}, backend="torch", progress=False,
                            adapter=epmq.adapters.AUTO if adapter == "auto" else
                            epmq.Adapter("gained", block_types=(GainedBlock,)))
    assert_untouched(model, before)


class Counted(nn.Module):
    """``x + fc(x * calls)``, ``calls`` this block's and the earlier ones' on ``counter``, an object
    handed to every block: an attribute each adds 1 to, or the tokens a transformers DynamicCache
    (under a name not a cache's) holds after each adds its token."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x, counter):
        if isinstance(counter, transformers.DynamicCache):
            calls = counter.update(x[None, None, :1], x[None, None, :1], 0)[0].shape[-2]
        else:
            counter.calls += 1
            calls = counter.calls
        return x + self.fc(x * calls)


class CountingNet(Net):
    def __init__(self, counter):
        super().__init__(Counted)
        self.counter = {"namespace": lambda: types.SimpleNamespace(calls=0),
                        "dataclass": lambda: dataclasses.make_dataclass("Calls", ["calls"])(0),
                        "DynamicCache": transformers.DynamicCache}[counter]

    def forward(self, x):
        counter = self.counter()
        for layer in self.layers:
            x = layer(x, counter=counter)
        return x


@pytest.mark.parametrize("adapter", ["registered", "auto"])
@pytest.mark.parametrize("counter", ["namespace", "dataclass", "DynamicCache"])
def test_an_object_a_block_changes_for_the_next_is_refused(counter, adapter, gen):
    """Block 0 changes an object it is handed for block 1 (a count of the calls before, as a cache
    under another name): the walk calls each block several times on its arguments as recorded, so
    block 0's statistics took counts of 1, 2, 3 and block 1's of 5 or more where the model's are 1
    and 2 (2.5x and 1.5x the model's statistics; 12.5x under AUTO, whose probe runs the blocks too),
    without a word. Refused, naming the block and the argument; the model as it was."""
    items = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    model = CountingNet(counter)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"calibration\['a'\] item 0: block 0 at 'layers' changes its argument "
                                         r"'counter' .*otherwise on each call"):
        epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": items}, backend="torch", progress=False,
                            adapter=epmq.adapters.AUTO if adapter == "auto" else
                            epmq.Adapter("counted", block_types=(Counted,)))
    assert_untouched(model, before)


class CountedUpTo(Counted):
    """Counted, failing past ``limit`` calls (a cache with room for so many)."""

    limit = 1

    def forward(self, x, counter):
        if counter.calls >= self.limit:
            raise RuntimeError(f"no room past {self.limit} calls")
        return super().forward(x, counter)


@pytest.mark.parametrize("adapter", ["registered", "auto"])
def test_an_object_a_block_changes_and_then_fails_on_is_refused(adapter, gen):
    """Block 0 changes an object it is handed, and fails when called again on what its call left there:
    the walk's call to compare ended in the block's own bare error (noted as that call's), as if the
    block could not run, not saying that it was the change it made that failed. Refused as a block that
    changes its argument, naming it and the block's error; the model as it was."""
    items = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    model = CountingNet("namespace")
    for layer in model.layers:
        layer.__class__ = CountedUpTo
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"calibration\['a'\] item 0: block 0 at 'layers' changes its argument "
                                         r"'counter' \(a SimpleNamespace\) and fails when called again on what that "
                                         r"call left there \(RuntimeError: no room past 1 calls\)"):
        epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": items}, backend="torch", progress=False,
                            adapter=epmq.adapters.AUTO if adapter == "auto" else
                            epmq.Adapter("counted", block_types=(CountedUpTo,)))
    assert_untouched(model, before)


class Gated(Residual):
    """``x + fc(x) + gate(x)``: two linears, of which a layers= may choose one."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(16, 16)

    def forward(self, x):
        return super().forward(x) + self.gate(x)


class Fronted(nn.Module):
    """Two Gated blocks (``front``) before those of ``net``, which get what they return."""

    def __init__(self, net):
        super().__init__()
        self.front, self.net = nn.ModuleList([Gated(), Gated()]), net

    def forward(self, x, **kwargs):
        for block in self.front:
            x = block(x)
        return self.net(x, **kwargs)


class Rerunning(Net):
    """Two Residual blocks, the last called ``again`` more times after them, as each item says."""

    def __init__(self):
        super().__init__(Residual)

    def forward(self, x, again):
        x = super().forward(x)
        for _ in range(again):
            x = self.layers[1](x)
        return x


@pytest.mark.parametrize("net, block, refused", [
    (lambda: GainAdvancingNet("dict"), GainedBlock, "the model writes in place into 'gains'"),
    (lambda: CountingNet("namespace"), Counted, "changes its argument 'counter'"),
    (Rerunning, Residual, "a number of times that depends on its input")])
def test_a_refusal_of_blocks_suggests_a_layers_keeping_the_users(net, block, refused, gen):
    """Three refusals of the blocks at 'net.layers' (the model writes into an argument after the call, a block
    changes one otherwise on each call, the model calls them a number of times its input decides) suggested the
    layers= selecting every linear outside them, whatever layers= was given: followed, it widened the selection
    (both linears of the front blocks, where the user chose their fc). It keeps theirs, as the refusal of towers
    calibration misses does."""
    x = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    items = [dict(x=x[0], again=1), dict(x=x[1], again=0)] if net is Rerunning else x
    adapter = epmq.Adapter("fronted", block_types=(Gated, block))
    options = dict(method="gptq", calibration={"a": items}, backend="torch", progress=False, adapter=adapter)
    with pytest.raises(ValueError, match=re.escape(refused) + r".*leave (the blocks|them) out: layers=r'") as e:
        epmq.quantize_model(Fronted(net()), SPEC, layers=r"\.fc$", **options)
    model = Fronted(net())
    suggested = ast.literal_eval(re.search(r"layers=(r'[^']*')", str(e.value)).group(1))
    epmq.quantize_model(model, SPEC, layers=suggested, **options)
    assert [name for name, m in model.named_modules() if isinstance(m, epmq.QuantLinear)] == [f"front.{i}.fc"
                                                                                            for i in (0, 1)]


class Flagged(nn.Module):
    """``x + fc(x * gain)``, the gain 1 on a ``ctx`` it has not marked seen, 3 on one it has; it marks it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x, ctx):
        gain = 3.0 if getattr(ctx, "seen", False) else 1.0
        ctx.seen = True
        return x + self.fc(x * gain)


class FlaggingNet(Net):
    def __init__(self):
        super().__init__(Flagged)

    def forward(self, x):
        ctx = types.SimpleNamespace()
        for layer in self.layers:
            x = layer(x, ctx=ctx)
        return x


class FlaggedNormed(Flagged):
    """``x + fc(rms_norm(x) * gain)``, the gain as ``Flagged``'s: a pre-norm residual block, whose branch is
    about 1 whatever the residual stream's largest features hold."""

    def forward(self, x, ctx):
        gain = 3.0 if getattr(ctx, "seen", False) else 1.0
        ctx.seen = True
        return x + self.fc(torch.nn.functional.rms_norm(x, (16,)) * gain)


class FlaggingNormedNet(FlaggingNet):
    def __init__(self):
        Net.__init__(self, FlaggedNormed)


@pytest.mark.parametrize("adapter", ["registered", "auto"])
@pytest.mark.parametrize("net,block,massive", [(FlaggingNet, Flagged, None),
                                               (FlaggingNormedNet, FlaggedNormed, 2000.0)])
def test_a_block_that_reads_what_its_call_set_on_an_object_is_refused(adapter, net, block, massive, gen):
    """Block 0 sets a flag on an object it is handed and reads it: the model's call of it sees the flag
    unset (gain 1), every call of the walk's but the first set (gain 3), and the flag set alike on each
    call passed the check of replayable blocks: block 0 solved on x * 3 where the model runs it on x,
    without a word. Refused, naming the block and the argument; the model as it was. Beside an LLM's
    massive activations (a few features hundreds of times the others) too: the hidden states' tolerance,
    1e-2 of their largest value, passed a pre-norm block whose other features came back ~100% apart;
    each feature is held to its own scale."""
    items = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    if massive:
        for item in items:
            item[0, 3] = massive
    model = net()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"calibration\['a'\] item 0: block 0 at 'layers' changes its argument "
                                         r"'ctx' \(a SimpleNamespace\) and returns other hidden states when called "
                                         r"again on what that call left there"):
        epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": items}, backend="torch", progress=False,
                            adapter=epmq.adapters.AUTO if adapter == "auto" else epmq.Adapter("flagged",
                                                                                                block_types=(block,)))
    assert_untouched(model, before)


class LateFlagged(Flagged):
    """Flagged whose flag a later block sets: ``flags``, it marks ``ctx`` seen and reads nothing (``x +
    fc(x)``); ``reads`` (else the gain is 1, whatever ``ctx`` holds)."""

    flags, reads = False, True

    def forward(self, x, ctx):
        if self.flags:
            ctx.seen = True
        gain = 3.0 if self.reads and not self.flags and getattr(ctx, "seen", False) else 1.0
        return x + self.fc(x * gain)


class LateFlaggingNet(FlaggingNet):
    """Two LateFlagged on one ``ctx``, block 1 flagging it after block 0 (reading it or not) ran."""

    def __init__(self, reads):
        Net.__init__(self, LateFlagged)
        self.layers[0].reads = reads
        self.layers[1].flags = True


@pytest.mark.parametrize("adapter", ["registered", "auto"])
@pytest.mark.parametrize("reads", [True, False])
def test_a_block_reading_what_a_later_block_sets_on_an_object_is_walked_as_the_model_ran_it(adapter, reads, gen,
                                                                                             monkeypatch):
    """Block 1 flags the ``ctx`` block 0 reads: the model runs block 0 on it unflagged (gain 1). AUTO's
    stand-ins run every block while they record the arguments, and the walk called block 0 again on the
    ``ctx`` block 1 had flagged since: solved on x * 3, without a word. Refused under AUTO, naming the block
    and the argument, the model as it was; walked where nothing reads the flag before it is set (block 0
    reading nothing, or a registered adapter, whose walk runs block 1 after it is done with block 0), on a
    plain forward's inputs."""
    from test_walker_models import assert_same_statistics, hooked_inputs, walked_inputs

    items = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    model = LateFlaggingNet(reads)
    options = dict(method="gptq", calibration={"a": items}, backend="torch", progress=False,
                   adapter=epmq.adapters.AUTO if adapter == "auto" else
                   epmq.Adapter("late", block_types=(LateFlagged,)))
    if adapter == "auto" and reads:
        before = snapshot(model)
        with pytest.raises(ValueError, match=r"calibration\['a'\] item 0: block 0 at 'layers' reads its argument "
                                             r"'ctx' \(a SimpleNamespace\), which a later block changes, and "
                                             r"returns other hidden states when called again on it as the later "
                                             r"blocks left it.*leave them out: layers=r'\^\(\?!\(\?:layers\)\\\.\)"
                                             r"\(\?=\.\*\(\?:\\\.fc\$\)\)'"):  # (the user's layers= kept)
            epmq.quantize_model(model, SPEC, **options, layers=r"\.fc$")
        assert_untouched(model, before)
        return
    hand = hooked_inputs(model, "layers.0.fc", [{"x": x} for x in items])
    seen = walked_inputs(monkeypatch)
    epmq.quantize_model(model, SPEC, **options, layers=lambda name: name == "layers.0.fc")
    assert_same_statistics(seen, hand)


def test_the_checks_of_a_handed_object_run_on_each_item_longer_than_those_checked_before(gen, monkeypatch):
    """AUTO's check of what a later block changes ran on each task's first item of each shape: every item of
    calibration of distinct lengths, each calling every block so handed once more. It runs on the first item
    and each one longer than all checked before it (the longest among them), here items 0, 2 and 5 of 6."""
    from epmq import walker

    checked, check = [], walker._check_read_before_changed

    def counted(stack, task, n, called):
        checked.append((task, n))
        return check(stack, task, n, called)

    monkeypatch.setattr(walker, "_check_read_before_changed", counted)
    items = [torch.randn(rows, 16, generator=gen) for rows in (6, 4, 8, 5, 8, 9)]
    epmq.quantize_model(LateFlaggingNet(reads=False), SPEC, method="gptq", calibration={"a": items, "b": items[1:2]},
                        backend="torch", progress=False, adapter=epmq.adapters.AUTO)
    assert checked == [("a", 0), ("a", 2), ("a", 5), ("b", 0)]


class LongFlagged(LateFlagged):
    """LateFlagged reading ``ctx`` only on an input longer than 4 tokens (another path on another length, as a
    sliding window past its width)."""

    def forward(self, x, ctx):
        if self.flags:
            ctx.seen = True
        gain = 3.0 if self.reads and not self.flags and len(x) > 4 and getattr(ctx, "seen", False) else 1.0
        return x + self.fc(x * gain)


class LongSelfFlagged(Flagged):
    """Flagged on an input longer than 4 tokens; ``x + fc(x)``, ``ctx`` untouched, on a shorter one."""

    def forward(self, x, ctx):
        return super().forward(x, ctx) if len(x) > 4 else x + self.fc(x)


class LongFlaggingNet(FlaggingNet):
    """Two LongFlagged on one ``ctx``, block 1 flagging it after block 0 ran, or two LongSelfFlagged."""

    def __init__(self, block):
        Net.__init__(self, block)
        self.layers[1].flags = True


_SELF_FLAGGED = (r"changes its argument 'ctx' \(a SimpleNamespace\) and returns other hidden states when called "
                 r"again on what that call left there")


@pytest.mark.parametrize("block,refusal,adapter", [
    (LongFlagged, r"reads its argument 'ctx' \(a SimpleNamespace\), which a later block changes, and returns other "
                  r"hidden states when called again on it as the later blocks left it", epmq.adapters.AUTO),
    (LongSelfFlagged, _SELF_FLAGGED, epmq.adapters.AUTO),
    (LongSelfFlagged, _SELF_FLAGGED, epmq.Adapter("long", block_types=(LongSelfFlagged,)))],
    ids=["auto-later-block", "auto-own-call", "registered-own-call"])
def test_a_block_that_reads_a_changed_object_only_on_a_longer_item_is_refused(block, refusal, adapter, gen):
    """Block 0 reads the ``ctx`` a block changes (block 1, or block 0's own call) on an input longer than item
    0's alone: AUTO's checks of blocks reading what their calls or later blocks changed ran on each task's
    item 0, so block 0 was solved on item 1 times 3, where the model runs it on item 1, without a word; a
    registered adapter's check of a block changing its own arguments, on the first task's item 0 alone, so
    too (block 0 called twice on item 1, layers.1.fc fed ~1.6x the model's inputs). They run on each task's
    first item and each one longer than those checked: refused, naming item 1; the model as it was."""
    items = [torch.randn(4, 16, generator=gen), torch.randn(8, 16, generator=gen)]
    model = LongFlaggingNet(block)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"calibration\['a'\] item 1: block 0 at 'layers' " + refusal):
        epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": items}, backend="torch", progress=False,
                            adapter=adapter)
    assert_untouched(model, before)


def test_a_registered_block_that_changes_its_own_object_only_on_another_task_is_refused(gen):
    """Block 0 changes the ``ctx`` it reads on task 'b''s input alone (longer than task 'a''s): a registered
    adapter's check of a block changing its own arguments ran on the first task's item 0 alone, so block 0 was
    solved on task 'b' times 3 without a word. It runs on each task's first item, as AUTO's: refused, naming
    task 'b''s item 0; the model as it was."""
    model = LongFlaggingNet(LongSelfFlagged)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"calibration\['b'\] item 0: block 0 at 'layers' " + _SELF_FLAGGED):
        epmq.quantize_model(model, SPEC, method="gptq", backend="torch", progress=False,
                            calibration={"a": [torch.randn(4, 16, generator=gen)],
                                         "b": [torch.randn(8, 16, generator=gen)]},
                            adapter=epmq.Adapter("long", block_types=(LongSelfFlagged,)))
    assert_untouched(model, before)


def test_a_registered_blocks_check_of_longer_items_calls_it_once_more_whatever_their_order(gen):
    """The registered adapter's check of items longer than item 0 called each block once more on every item
    longer than all before it: on calibration sorted by length, on every item. It calls it on the longest
    alone (and the first largest along any other dimension): one call more than on items of one length."""
    def calls(rows):
        model, seen = LongFlaggingNet(LongSelfFlagged), []
        model.layers[0].register_forward_hook(lambda *_: seen.append(1))
        epmq.quantize_model(model, SPEC, method="gptq", backend="torch", progress=False,
                            calibration={"a": [torch.randn(n, 16, generator=gen) for n in rows]},
                            adapter=epmq.Adapter("long", block_types=(LongSelfFlagged,)))
        return len(seen)

    assert calls([1, 2, 3, 4]) == calls([4, 4, 4, 4]) + 1


class LateFlaggingDeepNet(nn.Module):
    """``depth`` LateFlagged on one ``ctx``, reading nothing, the last flagging it; ``after`` called on the
    output, past the blocks (the model's forward goes on after the walk's check of the last block)."""

    def __init__(self, depth, after):
        super().__init__()
        self.layers = nn.ModuleList([LateFlagged() for _ in range(depth)])
        for layer in self.layers:
            layer.reads = False
        self.layers[-1].flags = True
        self.after = after

    def forward(self, x):
        ctx = types.SimpleNamespace()
        for layer in self.layers:
            x = layer(x, ctx=ctx)
        self.after()
        return x


def test_the_check_of_blocks_reading_what_a_later_block_sets_holds_each_hidden_state_once_until_the_last_block(
        gen, monkeypatch):
    """AUTO's check of blocks handed an object a later block may change holds, on item 0, a copy of each
    such block's input and output until the last block ran: every block's, each handed the object (Gemma 4's
    layers, sharing keys and values: 2.7 GB on the GPU for 62 layers of 2048 tokens). A block's input is the
    output of the block before it, held once (depth + 1 copies, not 2 x depth), and they are let go once the
    check ran, not held while the model's forward goes on past the blocks (to its head's logits)."""
    from epmq import walker

    depth, seen, left, alive = 4, [], [], []
    check = walker._check_read_before_changed

    def counted(stack, task, n, called):
        held = {id(copy): copy for block, hidden, named, versions, first in called.values() for copy in (hidden, first)}
        seen.append(len(held))
        left[:] = [weakref.ref(copy) for copy in held.values()]
        return check(stack, task, n, called)

    def after():  # (the walk lets what fails past the blocks pass: counted, asserted below)
        if left:
            gc.collect()
            alive.append(sum(copy() is not None for copy in left))
            left.clear()

    monkeypatch.setattr(walker, "_check_read_before_changed", counted)
    items = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    epmq.quantize_model(LateFlaggingDeepNet(depth, after), SPEC, method="gptq", calibration={"a": items},
                        backend="torch", progress=False, adapter=epmq.adapters.AUTO)
    assert (seen, alive) == ([depth + 1], [0])


def test_the_check_of_blocks_reading_what_a_later_block_sets_holds_its_copies_on_the_cpu_past_its_budget(
        monkeypatch):
    """Its copies stay on the device the model runs on within READ_CHECK_KEPT_BYTES, those past it are held
    on the CPU (moved back for a block called again); a model on the CPU holds them there whatever their
    size. (On the meta device: a GPU's copies, counted alike.)"""
    from epmq import walker

    hidden = torch.empty(4, 16, device="meta")
    size = hidden.numel() * hidden.element_size()
    monkeypatch.setattr(walker, "READ_CHECK_KEPT_BYTES", 3 * size)
    now = {"handed_bytes": 0}
    copies = [walker._check_copy(now, hidden) for _ in range(3)]
    assert [copy.tensor.device.type for copy in copies] == ["meta"] * 3
    assert [copy.fresh().device.type for copy in copies] == ["meta"] * 3
    assert now["handed_bytes"] == 3 * size
    assert walker._check_copy_device(hidden, now["handed_bytes"]) == torch.device("cpu")
    assert walker._check_copy_device(hidden, 2 * size + 1) == torch.device("cpu")
    assert walker._check_copy_device(torch.empty(4, 16), 3 * size) == torch.device("cpu")
    now = {"handed_bytes": 3 * size}
    on_cpu = walker._check_copy(now, torch.ones(4, 16))
    assert on_cpu.device_bytes == 0 and now["handed_bytes"] == 3 * size
    assert torch.equal(on_cpu.fresh(), torch.ones(4, 16)) and on_cpu.fresh() is not on_cpu.tensor


def test_a_block_called_again_is_held_to_its_hidden_states_rounding_feature_by_feature(gen):
    """A kernel's rounding apart (an MoE's experts summed in any order on a GPU: bfloat16's last bit), the
    hidden states of two calls are the same, a massive activation's feature and a value near zero, where
    terms of its feature's scale cancelled, among them; a feature ~10% apart beside them is not."""
    from epmq.walker import _same_output

    first = torch.randn(2, 8, 16, generator=gen).to(torch.bfloat16)
    first[0, 0, 3], first[1, 5, 3] = 2000.0, 1e-3  # (a massive activation, and its feature cancelled)
    # (the last of bfloat16's 8 significant bits of the largest term summed into each value: its feature's)
    ulp = first.float().abs().amax(dim=(0, 1)) / 128
    sign = torch.randint(0, 2, first.shape, generator=gen) * 2 - 1
    again = (first.float() + sign * ulp).to(torch.bfloat16)
    assert _same_output(first, again)
    off = again.clone()
    off[..., 7] *= 1.1
    assert not _same_output(first, off)


class Storing(GainedBlock):
    """GainedBlock reading its gain from the object it is handed or (``stores``) storing its output's
    mean there for the later ones, set anew by each call (as Gemma 4's layers store their keys and
    values for later ones)."""

    stores = False

    def forward(self, x, gains):
        if not self.stores:
            return super().forward(x, gains)
        y = x + self.fc(x)
        gains.gain = y.mean()
        return y


class StoringNet(Net):
    def __init__(self):
        super().__init__(Storing)
        self.layers[0].stores = True

    def forward(self, x):
        gains = types.SimpleNamespace()
        for layer in self.layers:
            x = layer(x, gains=gains)
        return x


@pytest.mark.parametrize("adapter", ["registered", "auto"])
def test_an_object_a_block_changes_alike_on_each_call_is_walked(adapter, gen, monkeypatch):
    """An object a block sets anew for the next one (as Gemma 4's KVSharingDict, which its layers
    storing their keys and values write) holds what one call leaves, however often the walk calls the
    block: walked, block 1 on what block 0 stored."""
    from test_walker_models import assert_same_statistics, hooked_inputs, walked_inputs

    items = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    model = StoringNet()
    hand = hooked_inputs(model, "layers.1.fc", [{"x": x} for x in items])
    seen = walked_inputs(monkeypatch)
    epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": items}, backend="torch", progress=False,
                        adapter=epmq.adapters.AUTO if adapter == "auto" else
                        epmq.Adapter("storing", block_types=(Storing,)), layers=lambda name: name == "layers.1.fc")
    assert_same_statistics(seen, hand)


class NaNRowStoring(Storing):
    """Storing whose output's first row is NaN where it stores (attention over a row of padding alone, in
    some kernels), storing the mean of the others."""

    def forward(self, x, gains):
        if not self.stores:
            return super().forward(x, gains)
        y = x + self.fc(x)
        gains.gain = y[1:].mean()
        return torch.cat([torch.full_like(y[:1], float("nan")), y[1:]])


class NaNStoring(Storing):
    """Storing that stores its output with a first row of NaN (keys of a row of padding alone, in some
    kernels) where it stores."""

    def forward(self, x, gains):
        if not self.stores:
            return super().forward(x, gains)
        y = x + self.fc(x)
        gains.gain = torch.cat([torch.full_like(y[:1], float("nan")), y[1:]])
        return y


@pytest.mark.parametrize("adapter", ["registered", "auto"])
@pytest.mark.parametrize("block", [NaNRowStoring, NaNStoring])
def test_a_block_storing_for_later_ones_with_a_nan_is_walked(adapter, block, gen, monkeypatch):
    """A block that stores what later ones read, alike on each call, is called again to see that it returns
    the same hidden states and stores the same. NaNRowStoring: their scale taken over a row of NaN
    (padding's, in some attention kernels) was NaN, and the walk ended in torch's bare "atol must be greater
    than or equal to zero". NaNStoring: a NaN stored (padding's) was never equal to the NaN stored again,
    and the block was refused as one changing its argument otherwise on each call. Walked, block 0 on what
    it gets."""
    from test_walker_models import assert_same_statistics, hooked_inputs, walked_inputs

    items = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    model = StoringNet()
    for layer in model.layers:
        layer.__class__ = block
    hand = hooked_inputs(model, "layers.0.fc", [{"x": x} for x in items])
    seen = walked_inputs(monkeypatch)
    epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": items}, backend="torch", progress=False,
                        adapter=epmq.adapters.AUTO if adapter == "auto" else
                        epmq.Adapter("storing", block_types=(block,)),
                        layers=lambda name: name == "layers.0.fc")
    assert_same_statistics(seen, hand)


def test_an_object_every_block_reads_unchanged_is_walked_on_what_they_get(gen, monkeypatch):
    """One SimpleNamespace handed to both blocks, which read its gain and change nothing: walked (its
    attributes are compared, not refused as an object; the model it also holds is held whole, though the
    walk swaps its linears), block 1's statistics a plain forward's."""
    from test_walker_models import assert_same_statistics, hooked_inputs, walked_inputs

    class SharedGainNet(Net):
        def forward(self, x):
            gains = types.SimpleNamespace(gain=2.0, seen=[self])
            for layer in self.layers:
                x = layer(x, gains=gains)
            return x

    items = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    model = SharedGainNet(GainedBlock)
    hand = hooked_inputs(model, "layers.1.fc", [{"x": x} for x in items])
    seen = walked_inputs(monkeypatch)
    epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": items}, backend="torch", progress=False,
                        adapter=epmq.Adapter("gained", block_types=(GainedBlock,)),
                        layers=lambda name: name == "layers.1.fc")
    assert_same_statistics(seen, hand)


class StateGained(nn.Module):
    """``x + fc(x * state.gain)``: its argument ``state`` (the name of RWKV's recurrent cache) an object
    it reads."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x, state):
        return x + self.fc(x * state.gain)


class OptionalStateGained(StateGained):
    """StateGained taking None for a gain of 1."""

    def forward(self, x, state=None):
        return x + self.fc(x * (1.0 if state is None else state.gain))


class StateNet(Net):
    """Its blocks handed one ``state`` whose gain is 3 (``advancing``: a gain the model advances by 1
    after each block)."""

    def __init__(self, block_type, advancing=False):
        super().__init__(block_type)
        self.advancing = advancing

    def forward(self, x):
        state = types.SimpleNamespace(gain=3.0)
        for layer in self.layers:
            x = layer(x, state=state)
            state.gain += self.advancing
        return x


@pytest.mark.parametrize("adapter", ["registered", "auto"])
@pytest.mark.parametrize("block_type", [StateGained, OptionalStateGained])
def test_a_block_argument_named_state_that_is_no_cache_is_walked_as_given(block_type, adapter, gen, monkeypatch):
    """``state`` is RWKV's recurrent cache, which the walk drops: a model handing its blocks an object of
    that name to read had every call of the walk get None: a bare AttributeError (or under AUTO a
    refusal saying the block fails as the model called it), or, where the block takes None for no
    state, block 0 solved on x where the model runs it on x * 3, without a word. Walked as given, on
    what the block gets; one the model changes after the call is refused naming it (the check of kept
    arguments)."""
    from test_walker_models import assert_same_statistics, hooked_inputs, walked_inputs

    items = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    options = dict(method="gptq", calibration={"a": items}, backend="torch", progress=False,
                   adapter=epmq.adapters.AUTO if adapter == "auto" else epmq.Adapter("s", block_types=(block_type,)))
    model = StateNet(block_type)
    hand = hooked_inputs(model, "layers.0.fc", [{"x": x} for x in items])
    seen = walked_inputs(monkeypatch)
    epmq.quantize_model(model, SPEC, **options, layers=lambda name: name == "layers.0.fc")
    assert_same_statistics(seen, hand)
    model = StateNet(block_type, advancing=True)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"the model puts other values into 'state', an argument of block 0"):
        epmq.quantize_model(model, SPEC, **options)
    assert_untouched(model, before)


class Modulated(nn.Module):
    """``x + fc(x * scale + shift)``, handed ``(scale, shift)`` or a lone scale (None: neither) under the
    name of a generation cache."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def modulated(self, x, by):
        if by is None:
            return x + self.fc(x)
        scale, shift = by if isinstance(by, tuple) else (by, 0.0)
        return x + self.fc(x * scale + shift)


class RequiredState(Modulated):
    def forward(self, x, state):
        return self.modulated(x, state)


class RequiredCache(Modulated):
    def forward(self, x, cache):
        return self.modulated(x, cache)


class OptionalKvCache(Modulated):
    def forward(self, x, kv_cache=None):
        return self.modulated(x, kv_cache)


class OptionalLayerPast(Modulated):
    def forward(self, x, layer_past=None):
        return self.modulated(x, layer_past)


class OptionalState(Modulated):
    def forward(self, x, state=None):
        return self.modulated(x, state)


class ModulatedNet(Net):
    """Its blocks handed one scale of 3 (and a shift of 1, as a tuple) under the name ``by``, of ``shape``."""

    def __init__(self, block_type, by, as_tuple, shape=(16,)):
        super().__init__(block_type)
        self.by, self.as_tuple, self.shape = by, as_tuple, shape

    def forward(self, x):
        scale = torch.full(self.shape, 3.0)
        modulation = (scale, torch.ones(self.shape)) if self.as_tuple else scale
        for layer in self.layers:
            x = layer(x, **{self.by: modulation})
        return x


@pytest.mark.parametrize("adapter", ["registered", "auto"])
@pytest.mark.parametrize("block_type, by, as_tuple", [(RequiredState, "state", True), (RequiredCache, "cache", True),
                                                      (OptionalKvCache, "kv_cache", False),
                                                      (OptionalLayerPast, "layer_past", False),
                                                      (OptionalState, "state", True),
                                                      (OptionalKvCache, "kv_cache", True),
                                                      (OptionalLayerPast, "layer_past", True)])
def test_a_block_input_under_a_cache_s_name_is_walked_as_given(block_type, by, as_tuple, adapter, gen, monkeypatch):
    """A block argument under a cache's name (cache, kv_cache, layer_past; state as a tuple of tensors, as
    RWKV's) was dropped whatever it held: a tensor the block reads, or a tuple its forward requires, went
    to every call of the walk as None, and a block taking None for none was solved on x where the model
    runs it on x * 3 (+ 1), without a word. A lone tensor, the value of a parameter without a default
    (a cache is optional, as every transformers block's is), and a tuple holding a tensor of fewer than 3
    dims (keys and values, RWKV's state, have more) are the block's input: walked as given."""
    from test_walker_models import assert_same_statistics, hooked_inputs, walked_inputs

    items = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    model = ModulatedNet(block_type, by, as_tuple)
    hand = hooked_inputs(model, "layers.0.fc", [{"x": x} for x in items])
    seen = walked_inputs(monkeypatch)
    epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": items}, backend="torch", progress=False,
                        adapter=epmq.adapters.AUTO if adapter == "auto" else
                        epmq.Adapter("modulated", block_types=(block_type,)), layers=lambda name: name == "layers.0.fc")
    assert_same_statistics(seen, hand)


@pytest.mark.parametrize("adapter", ["registered", "auto"])
@pytest.mark.parametrize("block_type, by, said", [
    (OptionalState, "state", r"are handed a state \(a tuple of tensors\) that block 0 returns other hidden states "
                             r"without: .*an input of the blocks' that is no recurrent state goes under another name"),
    (OptionalKvCache, "kv_cache", r"are handed a kv_cache \(a tuple of keys and values\) that the model filled "
                                  r"before them .*an input of the blocks' that is no cache goes under another name "
                                  r"than kv_cache")])
def test_a_block_input_under_a_cache_s_name_shaped_as_a_cache_is_refused(block_type, by, said, adapter, gen):
    """A (scale, shift) of [1, 1, 16] under a cache's name, to a parameter of default None, is shaped as a
    layer's keys and values or a recurrent state (RWKV's): dropped, and the block taking None for none was
    solved on x where the model runs it on x * 3 + 1, without a word. Not to be told from a cache by its
    shape, it is refused: a state, that the block returns other hidden states without; keys and values,
    that they hold tokens. The model as it was."""
    items = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    model = ModulatedNet(block_type, by, as_tuple=True, shape=(1, 1, 16))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"the blocks at 'layers' \(\w+\) " + said):
        epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": items}, backend="torch", progress=False,
                            adapter=epmq.adapters.AUTO if adapter == "auto" else
                            epmq.Adapter("modulated", block_types=(block_type,)))
    assert_untouched(model, before)


def _refused_then_walked_fresh(net_type, nest, gen, monkeypatch, said: str) -> None:
    """GPTQ of ``net_type(nest)``'s layers.0.fc (its blocks GainedBlock) is refused saying ``said``,
    the model as it was; ``net_type(nest, fresh=True)``, a new argument per call, is walked on what
    the block gets."""
    from test_walker_models import assert_same_statistics, hooked_inputs, walked_inputs

    items = [torch.randn(4, 16, generator=gen) for _ in range(2)]
    options = dict(method="gptq", calibration={"a": items}, backend="torch", progress=False,
                   adapter=epmq.Adapter("gained", block_types=(GainedBlock,)),
                   layers=lambda name: name == "layers.0.fc")
    model = net_type(nest)
    before = snapshot(model)
    with pytest.raises(ValueError, match=said):
        epmq.quantize_model(model, SPEC, **options)
    assert_untouched(model, before)
    model = net_type(nest, fresh=True)
    hand = hooked_inputs(model, "layers.0.fc", [{"x": x} for x in items])
    seen = walked_inputs(monkeypatch)
    epmq.quantize_model(model, SPEC, **options)
    assert_same_statistics(seen, hand)
