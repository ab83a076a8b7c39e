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
from epmq.calibration import unpad
from epmq.stats import EPMQStats, HessianStats
from epmq.walker import _encoder_decoder
from test_walker_models import ARCHS, MOE, Family, assert_same_statistics, hooked_inputs, inputs, walked_inputs

SPEC = epmq.QuantSpec(bits=4, group_size=16)


def layer_inputs(model, name, items, routed=False):
    """Per calibration item, the inputs (tokens x features) of module ``name``; ``routed`` (an
    MoE expert): only for the items that route tokens to it."""
    module = model.get_submodule(name)
    # the walk's items: padded batches cut into batches of real tokens (padding is no token)
    items = [part for item in items for part in unpad(item, encoder_decoder=_encoder_decoder(model))]
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        out = []
        for item in items:
            seen.clear()
            with torch.no_grad():
                model(**item) if isinstance(item, dict) else model(item)
            if seen or not routed:
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
    if arch in MOE:
        targets = "merged_path"  # the target's router may choose other experts (an error there)
    if arch == "open_clip_coca":
        # (CoCa's decoder interleaving two stacks: refused for other targets, tests/epmq/test_walker_errors.py)
        targets = "merged_path"
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
    _assert_same_layer(q, hand_made(fam, target, W_m, xs, method, targets))


def hand_made(fam, target, W_m, xs, method, targets="merged_path"):
    """Layer ``target`` solved from statistics collected by hand, ``xs`` its inputs per task (a
    task with none adds nothing, as a task that routes no token to an MoE expert)."""
    if method == "gptq":
        stats = HessianStats(W_m.shape[1], dtype=torch.float64)
        for t in fam.tasks:
            for x in xs[t]:
                stats.add_batch(x)
        return quant.gptq(W_m, stats.H, SPEC, backend="torch")
    stats = EPMQStats(W_m, dtype=torch.float64)
    for t in fam.tasks:
        if not xs[t]:
            continue
        expert = _prepared(fam.experts[t])
        stats.begin_task(expert.get_submodule(target).weight.detach(), name=t)
        x_k = (layer_inputs(expert, target, fam.calibration[t]) if targets == "expert_path"
               else [None] * len(xs[t]))
        for x, xe in zip(xs[t], x_k):
            stats.add_batch(x, x_expert=xe)
        stats.end_task()
    return quant.epmq_from_stats(stats, SPEC, anchor=1.0, backend="torch")


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


@pytest.mark.parametrize("targets", ["merged_path", "expert_path"])
def test_default_task_weights_are_one_over_each_tasks_trace(targets, gen):
    """The walk's default ``a_k = 1 / tr(H_k)`` (EPMQ_MATH.md). ``Family``'s tasks have equal
    token counts and one input distribution, so their traces agree to 0.1% and any uniform
    ``a_k`` passes the test above; here one task has three times the calibration items (its
    trace three times the others'): ``a_k = 1`` moves about 9% of the codes."""
    fam = Family("llama", gen)
    first = fam.tasks[0]
    fam.calibration[first] = fam.calibration[first] + inputs("llama", 4, gen)
    model = fam.merged()
    target, select = chosen_layers(_prepared(fam.merged()))
    W_m = _prepared(fam.merged()).get_submodule(target).weight.detach().clone()
    epmq.quantize_model(model, SPEC, method="epmq", targets=targets, calibration=fam.calibration,
                        experts=fam.experts, layers=select, backend="torch", progress=False)
    xs = {t: layer_inputs(model, target, items) for t, items in fam.calibration.items()}
    expected = hand_made(fam, target, W_m, xs, "epmq", targets)
    traces = [sum(float(x.double().pow(2).sum()) for x in xs[t]) for t in fam.tasks]
    assert max(traces) > 2 * min(traces)  # (the test's premise: unequal traces)
    assert expected.info["task_weights"] == pytest.approx([1 / tr for tr in traces], rel=1e-6)
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


def test_streams_of_a_model_that_draws_in_eval_mode_see_the_same_draws(gen):
    """ViTMAE shuffles its patches by a random draw before its blocks, in eval mode too: every
    pass of an item (each stream's) runs with that item's seed, so the fp path's inputs are the
    quantized stream's, row for row, and on the first layer the control is plain GPTQ (the target
    stream saw the patches in another order: its cross statistics paired other patches' rows)."""
    import transformers

    def vitmae():
        torch.manual_seed(0)
        return transformers.ViTMAEModel(transformers.ViTMAEConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
            patch_size=4, mask_ratio=0.0)).eval()

    calibration = {"a": [{"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)} for _ in range(2)]}
    name = "layers.0.attention.q_proj"
    packed = {}
    for targets in ("merged_path", "fp_path"):
        model = vitmae()
        state = torch.get_rng_state()
        epmq.quantize_model(model, SPEC, method="gptq", targets=targets, calibration=calibration, layers=name,
                            backend="torch", progress=False)
        assert torch.equal(torch.get_rng_state(), state)  # (the caller's draws are its own)
        packed[targets] = model.get_submodule(name)
    for field in ("qweight", "scales", "qzeros"):
        assert torch.equal(getattr(packed["fp_path"], field), getattr(packed["merged_path"], field)), field


@pytest.mark.parametrize("arch", list(MOE))
@pytest.mark.parametrize("method", ["gptq", "epmq"])
def test_moe_expert_statistics_are_its_routed_tokens(arch, method, gen):
    """An expert's projections in the last block take the statistics of the tokens the quantized
    model routes to them, task by task (a task that routes none there adds nothing), and are
    solved like any layer; an expert no token reaches is rounded to nearest, with a warning."""
    from epmq.adapters.moe import LinearExperts

    fam = Family(arch, gen)
    reference = _prepared(fam.merged())
    stack, experts = next((name, m) for name, m in reference.named_modules()
                          if name.startswith("model.layers.1.") and isinstance(m, LinearExperts))
    counts = [sum(len(x) for t in fam.tasks for x in layer_inputs(reference, f"{stack}.{e}.{experts[e].names[2]}",
                                                                  fam.calibration[t], routed=True))
              for e in range(experts.num_experts)]
    e = max(range(len(counts)), key=counts.__getitem__)
    target = f"{stack}.{e}.{experts[e].names[2]}"
    W_m = reference.get_submodule(target).weight.detach().clone()
    model = fam.merged()
    epmq.quantize_model(model, SPEC, method=method, calibration=fam.calibration,
                        experts=fam.experts if method == "epmq" else None,
                        layers=lambda name: name.startswith(("model.layers.0.", f"{stack}.")),
                        backend="torch", progress=False)
    q = model.get_submodule(target)
    assert isinstance(q, epmq.QuantLinear)
    assert all(isinstance(m, epmq.QuantLinear) for m in model.get_submodule(stack).modules()
               if isinstance(m, torch.nn.Linear) or isinstance(m, epmq.QuantLinear))

    xs = {t: layer_inputs(model, target, fam.calibration[t], routed=True) for t in fam.tasks}
    _assert_same_layer(q, hand_made(fam, target, W_m, xs, method))



@pytest.mark.parametrize("method", ["gptq", "epmq"])
def test_moe_expert_no_token_reaches_is_rounded_to_nearest(method, gen):
    fam = Family("qwen3_moe", gen)
    model = fam.merged()
    router = model.model.layers[1].mlp.gate
    route = router.forward

    def never_expert_3(hidden_states):
        logits, weights, index = route(hidden_states)
        return logits, weights, index.masked_fill(index == 3, 0)

    router.forward = never_expert_3
    W = {n: model.model.layers[1].mlp.experts.gate_up_proj.detach()[3].clone() for n in ("gate_up",)}
    with pytest.warns(UserWarning, match="3 linear.s. got no calibration signal"):
        epmq.quantize_model(model, SPEC, method=method, calibration=fam.calibration,
                            experts=fam.experts if method == "epmq" else None, backend="torch", progress=False)
    unreached = {f"model.layers.1.mlp.experts.3.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(model.epmq_report.unreached) == unreached
    assert all(layer["loss"] == 0.0 for layer in model.epmq_report.layers if layer["name"] in unreached)
    inner = W["gate_up"].shape[0] // 2
    gate = model.get_submodule("model.layers.1.mlp.experts.3.gate_proj")
    rtn = epmq.QuantLinear.from_result(quant.rtn(W["gate_up"][:inner], SPEC), None)
    torch.testing.assert_close(gate.dequantize(), rtn.dequantize(), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["gptq", "epmq"])
def test_an_expert_of_a_list_no_token_reaches_is_rounded_to_nearest(method, gen):
    """Experts held in a list (Switch Transformers' ModuleDict) as for fused ones: an expert no
    token is routed to is rounded to nearest and reported, not left in full precision (it was,
    as a linear the calibration never called)."""
    from test_walker_models import WIDER, perturb, wider_input

    build_model, kind = WIDER["switch_transformers"]
    torch.manual_seed(0)
    model = build_model().eval()
    experts = model.encoder.block[1].layer[1].mlp.experts
    router = model.encoder.block[1].layer[1].mlp.router
    route = router.forward

    def never_0_or_2(hidden_states):
        index, probs, logits = route(hidden_states)
        return index * torch.tensor([0, 1, 0, 1]), probs, logits

    router.forward = never_0_or_2
    W = experts["expert_2"].wi.weight.detach().clone()
    tasks = {t: perturb(model, gen).state_dict() for t in ("a", "b")}
    calibration = {t: [wider_input(kind, gen) for _ in range(2)] for t in tasks}
    epmq.quantize_model(model, SPEC, method=method, calibration=calibration,
                        experts=tasks if method == "epmq" else None, backend="torch", progress=False)
    report = model.epmq_report
    assert not [name for name in report.skipped if ".experts." in name]
    reached = {name for name in report.unreached if name.startswith("encoder.block.1.")}
    assert reached == {f"encoder.block.1.layer.1.mlp.experts.{e}.{p}" for e in ("expert_0", "expert_2")
                       for p in ("wi", "wo")}
    rtn = epmq.QuantLinear.from_result(quant.rtn(W, SPEC), None)
    torch.testing.assert_close(experts["expert_2"].wi.dequantize(), rtn.dequantize(), rtol=0, atol=0)


class RoutedBlock(torch.nn.Module):
    """A block whose experts are linears themselves (``experts.<i>``), chosen per token by its
    input's first feature: < 0 expert 0, 0..5 expert 1, > 5 expert 2; expert 3 never."""

    def __init__(self, width=16):
        super().__init__()
        self.attn = torch.nn.Linear(width, width)
        self.experts = torch.nn.ModuleList([torch.nn.Linear(width, width) for _ in range(4)])

    def forward(self, x):
        pick = (x[..., 0] > 0).long() + (x[..., 0] > 5).long()
        x = x + self.attn(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            chosen = pick == e
            if chosen.any():
                out[chosen] = expert(x[chosen])
        return (x + out,)


class _RoutedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([RoutedBlock(), RoutedBlock()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)[0]
        return x


@pytest.mark.parametrize("layers", [None, r"experts\.2$"])
def test_experts_the_probe_misses_are_solved_on_the_samples_that_reach_them(layers, gen):
    """Experts that are linears themselves, and experts the first sample (the probe) does not
    reach: each is solved on the tokens later samples route to it, whether or not a called
    twin is among the layers quantized (it was left in full precision, as never called); one
    no sample reaches is rounded to nearest and reported."""
    from epmq.walker import _called_twin

    assert _called_twin("moe.experts.2", ["moe.experts.0"]) == "moe.experts.0"
    torch.manual_seed(0)
    model = _RoutedNet().eval()
    low = torch.randn(2, 5, 16, generator=gen)
    low[..., 0] = -low[..., 0].abs()  # experts 0 and 1 of block 0 only
    high = torch.randn(2, 5, 16, generator=gen)
    high[:, :3, 0] = 10.0  # 6 tokens to expert 2 of block 0
    epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": [low, high]}, layers=layers,
                        backend="torch", progress=False)
    report = model.epmq_report
    assert not report.skipped
    assert isinstance(model.layers[0].experts[2], epmq.QuantLinear)
    tokens = {entry["name"]: entry["n_tokens"] for entry in report.layers}
    assert tokens["layers.0.experts.2"] == 6
    if layers is None:
        assert "layers.0.experts.3" in report.unreached and isinstance(model.layers[0].experts[3], epmq.QuantLinear)


def test_moe_experts_are_solved_in_two_stages(gen, monkeypatch):
    """Not a group (a calibration pass) per expert: every expert's gate and up projections, which
    read the block's routed hidden states, then every expert's down projection."""
    from epmq import walker

    groups = []
    solve_group = walker._Walk._solve_group

    def spy(self, stack, block, template, prefix, group, *args, **kw):
        groups.append((prefix, list(group)))
        return solve_group(self, stack, block, template, prefix, group, *args, **kw)

    monkeypatch.setattr(walker._Walk, "_solve_group", spy)
    fam = Family("qwen3_moe", gen)
    epmq.quantize_model(fam.merged(), SPEC, method="gptq", calibration=fam.calibration, backend="torch",
                        progress=False)
    block_1 = [g for prefix, g in groups if prefix == "model.layers.1"]
    experts = "mlp.experts"
    assert block_1[:2] == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]
    assert sorted(block_1[2]) == sorted(f"{experts}.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj"))
    assert sorted(block_1[3]) == sorted(f"{experts}.{e}.down_proj" for e in range(4))
    assert len(block_1) == 4


# Linears on one input: Llama's q/k/v and gate/up, T5's self-attention q/k/v and cross-attention
# k/v, an MoE expert's gate/up. Factorizations per walk without sharing and with it.
SHARING_CASES = {
    ("llama", "gptq", "merged_path"): (14, 8),
    ("llama", "epmq", "merged_path"): (14, 8),
    ("llama", "epmq", "expert_path"): (14, 8),
    ("llama", "epmq", "fp_path"): (14, 8),
    ("llama", "gptq", "fp_path"): (14, 8),
    ("t5", "epmq", "merged_path"): (36, 22),
    ("open_clip_vit", "gptq", "merged_path"): (8, 8),  # (q/k/v are one in_proj: nothing to share)
    ("qwen3_moe", "epmq", "merged_path"): (32, 20),
}


CASES_SHARING = [(*case, ts, "torch") for case in SHARING_CASES for ts in (True, False)]
CASES_SHARING += [("llama", "epmq", "merged_path", True, "triton"), ("llama", "gptq", "merged_path", True, "triton")]


@pytest.mark.parametrize("arch,method,targets,true_sequential,backend", CASES_SHARING)
def test_shared_input_statistics_change_nothing(arch, method, targets, true_sequential, backend, gen,
                                                monkeypatch):
    """One Hessian (accumulated and factored once) for the linears that read the same tensor: the
    quantized model and every layer's loss are bit-identical to a walk that gives each linear
    its own, with fewer factorizations (the Triton kernels too, under the interpreter)."""
    from epmq import walker

    fam = Family(arch, gen)
    factored = []
    factor = quant._factor
    monkeypatch.setattr(quant, "_factor", lambda *a: factored.append(1) or factor(*a))
    runs = {}
    for share in (False, True):
        monkeypatch.setattr(walker, "SHARE_INPUT_STATISTICS", share)
        factored.clear()
        model = epmq.quantize_model(
            fam.merged(), SPEC, method=method, targets=targets, calibration=fam.calibration,
            experts=fam.experts if method == "epmq" else None, true_sequential=true_sequential,
            backend=backend, progress=False,
        )
        runs[share] = (model.state_dict(), [layer["loss"] for layer in model.epmq_report.layers],
                       len(factored))
    (state_off, loss_off, n_off), (state_on, loss_on, n_on) = runs[False], runs[True]
    assert state_on.keys() == state_off.keys()
    assert all(torch.equal(state_on[k], state_off[k]) for k in state_on)
    assert loss_on == loss_off
    if arch in MOE:  # an expert the probe's sample routes no token to shares nothing: its gate
        # and up are factored apart (results unchanged), so the count depends on the draw
        assert n_off == SHARING_CASES[arch, method, targets][0]
        assert SHARING_CASES[arch, method, targets][1] <= n_on < n_off
    else:
        assert (n_off, n_on) == SHARING_CASES[arch, method, targets]
    shared = [layer for layer in model.epmq_report.layers if "hessian_of" in layer]
    assert len(shared) == n_off - n_on
    if arch == "llama":
        def short(name):
            return name.rpartition(".")[2]

        assert {short(layer["name"]): short(layer["hessian_of"]) for layer in shared} == {
            "k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


@pytest.mark.parametrize("target, downstream", [
    ("text_decoder.resblocks.1.attn.in_proj", None), ("text_decoder.cross_attn.1.attn.q_proj", None),
    ("text_decoder.cross_attn.1.attn.k_proj", None),
    # (the self-attention list walked too, the layer after the target quantized: its blocks run
    # among the cross-attention list's as themselves, not replayed)
    ("text_decoder.cross_attn.0.mlp.c_fc", "text_decoder.resblocks.1.mlp.c_proj")])
def test_coca_decoder_layers_see_what_the_model_gives_them(target, downstream, gen, monkeypatch):
    """CoCa's decoder calls a self-attention block, then a cross-attention block of another list,
    in turn: each block's input is taken from the model (the other list's block in between), the
    cross-attention's k and v read the image tokens. A layer's statistics, nothing upstream
    quantized, equal those hooked from a plain forward."""
    fam = Family("open_clip_coca", gen)
    model = fam.merged()
    hand = hooked_inputs(_prepared(fam.merged()), target, [item for items in fam.calibration.values() for item in items])
    seen = walked_inputs(monkeypatch)
    chosen = [target] if downstream is None else [target, downstream]
    epmq.quantize_model(model, SPEC, method="gptq", calibration=fam.calibration, layers=lambda name: name in chosen,
                        backend="torch", progress=False)
    assert sorted(layer["name"] for layer in model.epmq_report.layers) == sorted(chosen)
    assert_same_statistics([x for x in seen if x.shape[-1] == hand[0].shape[-1]], hand)  # (the other reads 64 wide)
