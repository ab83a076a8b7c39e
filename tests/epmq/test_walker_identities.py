"""The walk feeds each layer exactly the statistics the method defines (EPMQ_MATH.md).

For one target layer (first linear of the last block of the last stack), with the layers of
every stack's first block quantized too (so the model being quantized really differs from the
full-precision one upstream of the target), the walker's packed layer must equal the layer
solved directly from statistics collected by hand with forward hooks:

    x        inputs at the target in the final quantized model (= what the walk saw: the target's
             own quantization happens after its inputs are taken)
    x_fp     inputs at the target in the full-precision merged model
    x_k      inputs at the target in expert k's own model, on task k's data

This checks stack entry, the per-block kwargs (masks, rotary, T5's position biases and
encoder states, across the encoder -> decoder replay), the streams and the solver calls.
"""

import pytest
import torch

import epmq
from epmq import quant
from epmq.adapters import find_adapter
from epmq.stats import EPMQStats, HessianStats
from test_walker_models import ARCHS, Family

SPEC = epmq.QuantSpec(bits=4, group_size=16)


def layer_inputs(model, name, items):
    """Per calibration item, the inputs (tokens x features) of module ``name``."""
    module = model.get_submodule(name)
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        out = []
        for item in items:
            seen.clear()
            with torch.no_grad():
                model(**item) if isinstance(item, dict) else model(item)
            out.append(torch.cat(seen))
        return out
    finally:
        handle.remove()


def chosen_layers(model):
    """(target layer name, predicate selecting it and every stack's block-0 linears)."""
    adapter = find_adapter(model)
    stacks = adapter.stacks(model)
    prefix, blocks = stacks[-1]
    target = f"{prefix}.{len(blocks) - 1}.{next(iter(adapter.linears(blocks[-1])))}"
    firsts = tuple(f"{p}.0." for p, _ in stacks)
    return target, lambda name: name == target or name.startswith(firsts)


def _prepared(model):
    find_adapter(model).prepare(model, lambda name, new: _set(model, name, new))
    return model


def _set(model, name, new):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)


def _assert_same_layer(q, expected):
    """The walker's packed layer and the one packed from the hand-made result."""
    ref = epmq.QuantLinear.from_result(expected, q.bias)
    W, W_ref = q.dequantize(), ref.dequantize()
    # The same statistics up to summation order: allow a rare code that rounds the other way.
    steps = ((W - W_ref).abs() / ref.scales.float()[ref.g_idx.long()].t()).round()
    assert (steps <= 1).all(), float(steps.max())
    assert (steps == 0).float().mean() > 0.99
    torch.testing.assert_close(q.scales, ref.scales, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,targets", [("gptq", "merged_path"), ("epmq", "expert_path")])
def test_walk_statistics_match_hand_made(arch, method, targets, gen):
    fam = Family(arch, gen)
    model = fam.merged()
    target, select = chosen_layers(_prepared(fam.merged()))
    W_m = _prepared(fam.merged()).get_submodule(target).weight.detach().clone()
    epmq.quantize_model(
        model, SPEC, method=method, targets=targets, calibration=fam.calibration,
        experts=fam.experts if method == "epmq" else None, layers=select, backend="torch", progress=False,
    )
    q = model.get_submodule(target)
    assert isinstance(q, epmq.QuantLinear)

    xs = {t: layer_inputs(model, target, items) for t, items in fam.calibration.items()}
    if method == "gptq":
        stats = HessianStats(W_m.shape[1], dtype=torch.float64)
        for t in fam.tasks:
            for x in xs[t]:
                stats.add_batch(x)
        expected = quant.gptq(W_m, stats.H, SPEC, backend="torch")
    else:
        stats = EPMQStats(W_m, dtype=torch.float64)
        for t in fam.tasks:
            expert = _prepared(fam.experts[t])
            x_k = layer_inputs(expert, target, fam.calibration[t])
            stats.begin_task(expert.get_submodule(target).weight.detach(), name=t)
            for x, xe in zip(xs[t], x_k):
                stats.add_batch(x, x_expert=xe)
            stats.end_task()
        expected = quant.epmq_from_stats(stats, SPEC, anchor=1.0, backend="torch")
    _assert_same_layer(q, expected)


@pytest.mark.parametrize("arch", ["t5", "bart", "llama", "open_clip_clip"])
@pytest.mark.parametrize("method", ["gptq", "epmq"])
def test_fp_path_statistics_match_hand_made(arch, method, gen):
    fam = Family(arch, gen)
    model = fam.merged()
    fp = _prepared(fam.merged())
    target, select = chosen_layers(fp)
    W_m = fp.get_submodule(target).weight.detach().clone()
    epmq.quantize_model(
        model, SPEC, method=method, targets="fp_path", calibration=fam.calibration,
        experts=fam.experts if method == "epmq" else None, layers=select, backend="torch", progress=False,
    )
    stats = EPMQStats(W_m, dtype=torch.float64)
    for t, items in fam.calibration.items():
        W_k = W_m if method == "gptq" else fam.experts[t].state_dict()[_ckpt(target)]
        stats.begin_task(W_k, weight=1.0 if method == "gptq" else None, name=t)
        for x, x_fp in zip(layer_inputs(model, target, items), layer_inputs(fp, target, items)):
            if method == "gptq":
                stats.add_batch(x, x_expert=x_fp)
            else:
                stats.add_batch(x, x_expert=x_fp, x_anchor=x_fp)
        stats.end_task()
    anchor = 0.0 if method == "gptq" else 1.0
    expected = quant.epmq_from_stats(stats, SPEC, anchor=anchor, backend="torch")
    _assert_same_layer(model.get_submodule(target), expected)


def _ckpt(name):
    """The merged model's name of a prepared open_clip tensor (in_proj.weight -> in_proj_weight)."""
    return name.replace("attn.in_proj", "attn.in_proj_weight") if name.endswith("attn.in_proj") else f"{name}.weight"


def test_fp_path_gptq_on_the_first_layer_is_plain_gptq(gen):
    """Before anything is quantized, the fp path's inputs are the model's own: the control is GPTQ."""
    fam = Family("llama", gen)
    model = fam.merged()
    name = "model.layers.0.self_attn.q_proj"
    W = model.get_submodule(name).weight.detach().clone()
    H = HessianStats(W.shape[1], dtype=torch.float64)
    for items in fam.calibration.values():
        for x in layer_inputs(model, name, items):
            H.add_batch(x)
    epmq.quantize_model(model, SPEC, method="gptq", targets="fp_path", calibration=fam.calibration,
                        layers=name, backend="torch", progress=False)
    _assert_same_layer(model.get_submodule(name), quant.gptq(W, H.H, SPEC, backend="torch"))
