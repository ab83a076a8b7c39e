"""End to end on every family: merge three experts, quantize (RTN, GPTQ, E-PMQ) at 8 and 4
bits, save, load into a fresh model, and compare outputs."""

import copy
import json
import re
import warnings

import pytest
import torch

import epmq
from epmq.adapters import find_adapter
from test_walker_models import (ARCHS, DECODERS, ENCODERS, MOE, VOCAB, WIDER, Family, _hf, assert_same_statistics,
                                hooked_inputs, output, perturb, rel_err, walked_inputs, wider_input)

SPEC_4 = epmq.QuantSpec(bits=4, group_size=16)

# Linears in the blocks: 2 blocks per stack; open_clip: in_proj, out_proj, c_fc, c_proj; HF CLIP:
# q, k, v, out, fc1, fc2; T5 (gated): 4 self-attn + 4 cross-attn (decoder) + wi_0, wi_1, wo;
# Llama family: q, k, v, o, gate, up, down.
N_LINEARS = {"open_clip_vit": 8, "open_clip_clip": 16, "open_clip_timm": 16,
             # CoCa's towers, its decoder's self-attention blocks, its cross-attention blocks (q, k,
             # v, out, c_fc, c_proj)
             "open_clip_coca": 16 + 8 + 2 * 6,
             "timm_vit": 8, "timm_eva": 8,  # qkv, proj, fc1, fc2 (EVA's fc1: gate and value fused)
             "hf_clip_vision": 12, "hf_clip": 24,
             "t5": 2 * 7 + 2 * 11, "mt5": 2 * 7 + 2 * 11, "llama": 14,
             # encoder q, k, v, out, fc1, fc2; decoder also the cross attention's q, k, v, out
             "bart": 2 * 6 + 2 * 10, "qwen2": 14, "mistral": 14,
             "gpt2": 8,  # c_attn, attn.c_proj, c_fc, mlp.c_proj
             # fused projections: phi3 qkv, o, gate_up, down; gpt_neox and falcon qkv, dense,
             # h_to_4h, 4h_to_h; phi q, k, v, dense, fc1, fc2
             **{name: 14 for name in ("qwen3", "gemma", "gemma2", "gemma3", "olmo2", "granite",
                                      "cohere", "stablelm")},
             "phi3": 8, "gpt_neox": 8, "falcon": 8, "phi": 12,
             # q, k, v, o and 4 experts' gate, up and down (the router is no nn.Linear)
             "qwen3_moe": 2 * (4 + 4 * 3), "mixtral": 2 * (4 + 4 * 3),
             # q, k, v, o twice; layer 0's MLP; layer 1's shared expert and 4 experts (not the router)
             "llama4": 2 * 4 + 3 + 3 + 4 * 3,
             # q, k, v, attention output, intermediate, output
             **{name: 12 for name in ("bert", "roberta", "deberta_v2", "vit", "dinov2", "siglip")}}


def expert_sources(fam, tmp_path):
    """The three experts in three forms: a module, a state dict, a checkpoint on disk."""
    t0, t1, t2 = fam.tasks
    on_disk = fam.experts[t2]
    if fam.arch in ("open_clip_vit", "timm_vit", "timm_eva"):  # a bare safetensors file
        from safetensors.torch import save_file

        path = tmp_path / "expert.safetensors"
        save_file({k: v.contiguous() for k, v in on_disk.state_dict().items()}, str(path))
    elif fam.arch in ("open_clip_clip", "open_clip_coca", "open_clip_timm"):  # an open_clip training checkpoint (DDP prefix, wrapper)
        path = tmp_path / "epoch_1.pt"
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in on_disk.state_dict().items()}}, path)
    else:  # a HF save_pretrained directory
        path = tmp_path / "expert"
        on_disk.save_pretrained(path)
    return {t0: fam.experts[t0], t1: fam.experts[t1].state_dict(), t2: str(path)}


# Every method on the families with an adapter of their own; E-PMQ (the path that reads experts
# and uses every statistic) on the families that share the decoder and encoder adapters.
CASES = [(arch, method) for arch in ARCHS for method in ("rtn", "gptq", "epmq")
         if method == "epmq" or arch not in {**DECODERS, **ENCODERS}]


@pytest.mark.parametrize("arch,method", CASES)
def test_quantize_save_load(arch, method, gen, tmp_path):
    fam = Family(arch, gen)
    experts = expert_sources(fam, tmp_path) if method == "epmq" else None
    calibration = None if method == "rtn" else fam.calibration
    reference = output(fam.merged(), fam.test_item)
    n_linears = N_LINEARS[arch]

    errors = {}
    for bits in (8, 4):
        model = fam.merged()
        epmq.quantize_model(model, epmq.QuantSpec(bits=bits, group_size=16), method=method,
                            calibration=calibration, experts=experts, backend="torch", progress=False)
        errors[bits] = rel_err(output(model, fam.test_item), reference)

    # every block linear (open_clip: in_proj and out_proj for each attention) is packed
    packed = [m for m in model.modules() if isinstance(m, epmq.QuantLinear)]
    if method != "rtn":  # (blocks that chain: no pass of the model per block; CoCa's decoder lists do not)
        coca = ["text_decoder.resblocks", "text_decoder.cross_attn"]
        assert model.epmq_report.replayed == (coca if arch == "open_clip_coca" else [])
    assert len(packed) == len(model.epmq_report.layers) == n_linears
    assert not any(type(m) is torch.nn.Linear for name, m in model.named_modules() if name in
                   {layer["name"] for layer in model.epmq_report.layers})

    # 8 bits: close to the merged model (E-PMQ's target is pulled toward the experts, so a
    # little further); 4 bits: bounded, and worse than 8
    assert errors[8] < (0.05 if method == "epmq" else 0.03), errors
    assert errors[8] < errors[4] < 0.5, errors

    # save, load into a freshly initialised model, same outputs
    epmq.save_quantized(model, tmp_path / "ckpt")
    fresh = epmq.load_quantized(tmp_path / "ckpt", fam.fresh())
    torch.testing.assert_close(output(fresh, fam.test_item), output(model, fam.test_item), rtol=0, atol=1e-6)

    report = tmp_path / "report.json"
    model.epmq_report.to_json(report)
    layers = json.loads(report.read_text())["layers"]
    assert {"name", "block", "loss", "expert_loss", "anchor_loss", "weight_anchor_loss",
            "damp_retries", "seconds", "shape"} <= set(layers[0])
    if method == "epmq":
        assert all(layer["expert_loss"] is not None for layer in layers)


@pytest.mark.parametrize(
    "arch,targets", [("t5", "expert_path"), ("qwen2", "fp_path"), ("open_clip_clip", "expert_path")]
)
def test_target_variants_end_to_end(arch, targets, gen, tmp_path):
    fam = Family(arch, gen)
    reference = output(fam.merged(), fam.test_item)
    model = fam.merged()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", targets=targets,
                        calibration=fam.calibration, experts=expert_sources(fam, tmp_path),
                        backend="torch", progress=False)
    assert rel_err(output(model, fam.test_item), reference) < 0.5
    assert model.epmq_report.targets == targets
    epmq.save_quantized(model, tmp_path / "ckpt", checkpoint_format="gptq_v2")
    fresh = epmq.load_quantized(tmp_path / "ckpt", fam.fresh())
    torch.testing.assert_close(output(fresh, fam.test_item), output(model, fam.test_item), rtol=0, atol=1e-6)


def test_layers_filter_and_one_pass(gen):
    fam = Family("llama", gen)
    model = fam.merged()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="gptq",
                        calibration=fam.calibration, layers=r"\.mlp\.", true_sequential=False,
                        backend="torch", progress=False)
    names = [layer["name"] for layer in model.epmq_report.layers]
    assert len(names) == 6 and all(".mlp." in n for n in names)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_progress_bar_over_blocks(gen, capsys):
    fam = Family("llama", gen, n_samples=1)
    epmq.quantize_model(fam.merged(), epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=True)
    assert "2/2" in capsys.readouterr().err
    epmq.quantize_model(fam.merged(), epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    assert capsys.readouterr().err == ""


def test_the_bar_says_which_task_and_linear_a_block_is_at(gen, capsys, monkeypatch):
    """A block of a large model takes minutes (a task's statistics, a wide linear's solve), the bar
    still and naming the block alone until its end: its postfix says the task (of how many) and the
    linear being solved; the block's name once done; nothing with progress=False."""
    from tqdm.auto import tqdm

    fam = Family("llama", gen, n_samples=1)
    said, drawn = [], []
    postfix = tqdm.set_postfix_str
    monkeypatch.setattr(tqdm, "set_postfix_str", lambda self, s="", refresh=True:
                        said.append(s) or drawn.append(refresh) or postfix(self, s, refresh))
    epmq.quantize_model(fam.merged(), SPEC_4, method="epmq", calibration=fam.calibration, experts=fam.experts,
                        backend="torch", progress=True)
    tasks = list(fam.calibration)
    for k, task in enumerate(tasks):
        assert f"model.layers.1: statistics of task {task!r} ({k + 1}/{len(tasks)})" in said
    assert "model.layers.1: solving mlp.down_proj" in said and said[-1] == "model.layers.1"
    assert drawn[0] and not all(drawn)  # (the block's name once done is set, not drawn)
    capsys.readouterr()
    epmq.quantize_model(fam.merged(), SPEC_4, method="gptq", calibration=fam.calibration, backend="torch",
                        progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("arch", ["llama", "t5", "gpt2"])
def test_half_precision_model(arch, dtype, gen, tmp_path):
    """Real checkpoints are loaded in bf16 or fp16: the model, its experts and its calibration
    inputs in that dtype (statistics still accumulate in float64 here), outputs in that dtype."""
    fam = Family(arch, gen)
    model = fam.merged().to(dtype)
    experts = {t: e.to(dtype) for t, e in fam.experts.items()}
    reference = output(model, fam.test_item).float()
    epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method="epmq",
                        calibration=fam.calibration, experts=experts, backend="torch", progress=False)
    y = output(model, fam.test_item)
    assert y.dtype == dtype and rel_err(y.float(), reference) < 0.05
    assert all(m.scales.dtype == torch.float16 for m in model.modules() if isinstance(m, epmq.QuantLinear))
    epmq.save_quantized(model, tmp_path / "ckpt")
    fresh = epmq.load_quantized(tmp_path / "ckpt", fam.fresh().to(dtype))
    torch.testing.assert_close(output(fresh, fam.test_item), y, rtol=0, atol=0)


def _on_cuda(item):
    if isinstance(item, dict):
        return {k: v.cuda() for k, v in item.items()}
    return item.cuda()


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["llama", "hf_clip_vision"])
def test_cuda_end_to_end(arch, gen, tmp_path, monkeypatch):
    """The whole GPU path on a tiny model: statistics by the Triton kernels (the expert residual
    at the default precision), the fused solver, W4A16 layers, save and load; as good as the
    same walk on the CPU (torch reference, float64 statistics)."""
    monkeypatch.setenv("EPMQ_AUTOTUNE", "0")  # first configs: the suite's minutes go to benchmarks
    fam = Family(arch, gen)
    spec = epmq.QuantSpec(bits=4, group_size=16)
    item = _on_cuda(fam.test_item)
    reference = output(fam.merged(), fam.test_item)
    cpu = fam.merged()
    epmq.quantize_model(cpu, spec, method="epmq", calibration=fam.calibration, experts=fam.experts,
                        backend="torch", progress=False)
    gpu = fam.merged().cuda()
    epmq.quantize_model(gpu, spec, method="epmq", calibration=fam.calibration, experts=fam.experts,
                        progress=False)
    assert {layer["name"] for layer in gpu.epmq_report.layers} == {
        layer["name"] for layer in cpu.epmq_report.layers}
    err_gpu = rel_err(output(gpu, item).float().cpu(), reference)
    err_cpu = rel_err(output(cpu, fam.test_item), reference)
    assert err_gpu < 1.5 * err_cpu + 0.01, (err_gpu, err_cpu)
    epmq.save_quantized(gpu, tmp_path / "ckpt")
    fresh = epmq.load_quantized(tmp_path / "ckpt", fam.fresh().cuda())
    torch.testing.assert_close(output(fresh, item), output(gpu, item), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("arch", list(MOE))
def test_moe_experts_left_unquantized_save_and_load(arch, gen, tmp_path):
    """Experts outside ``layers`` stay nn.Linear views of transformers' fused parameters (disjoint
    parts of one storage, which safetensors writes); the checkpoint loads back."""
    fam = Family(arch, gen)
    model = fam.merged()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="gptq",
                        calibration=fam.calibration, layers=lambda name: ".experts." not in name,
                        backend="torch", progress=False)
    assert not any(".experts." in layer["name"] for layer in model.epmq_report.layers)
    epmq.save_quantized(model, tmp_path / "ckpt")
    fresh = epmq.load_quantized(tmp_path / "ckpt", fam.fresh())
    torch.testing.assert_close(output(fresh, fam.test_item), output(model, fam.test_item), rtol=0, atol=0)


@pytest.mark.parametrize("arch,method,targets", [
    ("llama", "epmq", "merged_path"), ("t5", "epmq", "expert_path"),
    ("open_clip_clip", "gptq", "fp_path"), ("hf_clip_vision", "rtn", "merged_path"),
    ("qwen3_moe", "epmq", "merged_path"),
])
def test_blocks_visiting_a_device_give_the_same_model(arch, method, targets, gen, monkeypatch):
    """``device=``: the model stays where it is and each block visits the device for its turn.
    On the CPU the moves are no-ops, but every step of that path runs (each block sent over and
    back, the replaced linears sent back, hidden states and kwargs placed on the device, a
    finished stack's outputs brought back for the next one): the model is the in-place walk's."""
    from torch import nn

    fam = Family(arch, gen)
    kw = dict(method=method, targets=targets, calibration=None if method == "rtn" else fam.calibration,
              experts=fam.experts if method == "epmq" else None, backend="torch", progress=False)
    in_place = epmq.quantize_model(fam.merged(), SPEC_4, **kw)
    moves = []
    to = nn.Module.to
    monkeypatch.setattr(nn.Module, "to", lambda self, *a, **k: moves.append(self) or to(self, *a, **k))
    visited = epmq.quantize_model(fam.merged(), SPEC_4, device="cpu", **kw)
    monkeypatch.undo()
    a, b = in_place.state_dict(), visited.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if method != "rtn":
        blocks = [block for _, stack in find_adapter(visited).stacks(visited) for block in stack]
        assert [sum(m is block for m in moves) for block in blocks] == [2] * len(blocks)  # there, back
        replaced = [m for m in moves if isinstance(m, nn.Linear)]
        assert len(replaced) == len(visited.epmq_report.layers)  # each sent back once


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ["llama", "t5", "open_clip_clip", "qwen3_moe"])
def test_blocks_visit_the_gpu_from_cpu_memory(arch, gen, monkeypatch):
    """A model in CPU memory quantized on the GPU block by block (``device="cuda"``): it ends in
    CPU memory, nothing of it is left on the GPU, and it is the model quantized wholly on the GPU
    (the stack entry runs on the CPU there, so the hidden states may differ in the last bits)."""
    monkeypatch.setenv("EPMQ_AUTOTUNE", "0")
    fam = Family(arch, gen)
    kw = dict(method="epmq", calibration=fam.calibration, experts=fam.experts, progress=False)
    on_gpu = epmq.quantize_model(fam.merged().cuda(), SPEC_4, **kw)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    visited = epmq.quantize_model(fam.merged(), SPEC_4, device="cuda", **kw)
    assert all(t.device.type == "cpu" for t in visited.state_dict().values())

    def on_gpu_in(value):
        if isinstance(value, torch.Tensor):
            return value.is_cuda
        if isinstance(value, (tuple, list)):
            return any(on_gpu_in(v) for v in value)
        return isinstance(value, dict) and any(on_gpu_in(v) for v in value.values())

    # nor in any attribute (a layer's derived zeros and grids included)
    assert not [f"{name}.{k}" for name, m in visited.named_modules() for k, v in vars(m).items()
                if on_gpu_in(v)]
    del kw
    import gc

    gc.collect()
    assert torch.cuda.memory_allocated() <= before + (1 << 20)
    item = _on_cuda(fam.test_item)
    reference = output(fam.merged(), fam.test_item)
    err_gpu = rel_err(output(on_gpu, item).float().cpu(), reference)
    err_visited = rel_err(output(visited.cuda(), item).float().cpu(), reference)
    assert err_visited < 1.5 * err_gpu + 0.01, (err_visited, err_gpu)
    a, b = on_gpu.state_dict(), visited.state_dict()
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = [((t.cpu().unsqueeze(-1) >> shifts) & 15) for k in a if k.endswith("qweight")
               for t in (a[k], b[k])]
    same = sum(int((x == y).sum()) for x, y in zip(nibbles[::2], nibbles[1::2]))
    assert same >= 0.8 * sum(x.numel() for x in nibbles[::2])


def test_a_tensor_shared_by_block_kwargs_moves_once():
    """T5's encoder states are in every decoder block's recorded kwargs: moving a sample's
    kwargs to the device makes one copy of them, not one per block."""
    from epmq.walker import _to_device

    states, mask = torch.randn(2, 5, 8), torch.ones(2, 5)
    kwargs = [dict(encoder_hidden_states=states, mask=mask, pos=(mask, 3)) for _ in range(4)]
    moved = _to_device(kwargs, "meta")
    assert all(k["encoder_hidden_states"].device.type == "meta" for k in moved)
    assert len({id(k["encoder_hidden_states"]) for k in moved}) == 1
    assert all(k["mask"] is k["pos"][0] and k["pos"][1] == 3 for k in moved)


def test_block_outputs_keep_their_types_when_moved():
    """A block's output moved between devices is what the next block reads: a named tuple
    (Reformer's) and a ModelOutput keep their type and fields, read by name."""
    from collections import namedtuple

    from transformers.modeling_outputs import BaseModelOutput

    from epmq.walker import _to_device

    Out = namedtuple("Out", ["attn_output", "hidden_states"])
    a, h = torch.randn(2, 3), torch.randn(2, 3)
    moved = _to_device([Out(a, h), BaseModelOutput(last_hidden_state=h), {1: a}], "meta")
    assert type(moved[0]) is Out and moved[0].hidden_states.device.type == "meta"
    assert type(moved[1]) is BaseModelOutput and moved[1].last_hidden_state.device.type == "meta"
    assert moved[2][1].device.type == "meta"

    class Inputs(dict):  # (a calibration item's class whose constructor takes one of its keys)
        def __init__(self, data=None, scale=1.0, **kw):
            super().__init__(data or {}, **kw)
            self.scale = scale

    moved = _to_device(Inputs({"x": a, "scale": h}), "meta")
    assert sorted(moved) == ["scale", "x"] and moved["scale"].device.type == "meta"


@pytest.mark.parametrize("arch", list(WIDER))
def test_wider_families_quantize_save_load(arch, gen, tmp_path, recwarn):
    """Families that share a built-in adapter's convention (and MoE models whose experts it
    rebuilds): E-PMQ reaches every linear of every block the block calls (no plain nn.Linear is
    left unreported, no weight matrix outside one), and the checkpoint loads to the same outputs."""
    build_model, kind = WIDER[arch]
    torch.manual_seed(0)
    base = build_model().eval()
    experts = {t: perturb(base, gen).state_dict() for t in ("a", "b")}
    calibration = {t: [wider_input(kind, gen) for _ in range(2)] for t in experts}
    model = copy.deepcopy(base)
    epmq.quantize_model(model, SPEC_4, method="epmq", calibration=calibration, experts=experts,
                        backend="torch", progress=False)
    adapter = find_adapter(model)
    # (but those the block never calls, using their weight directly: Mamba's dt_proj, reported;
    # routers, reported; and those the adapter leaves out on purpose: Swin V2's position-bias MLP)
    left = {f"{prefix}.{i}.{rel}" for prefix, blocks in adapter.stacks(model) for i, block in enumerate(blocks)
            for rel, m in adapter.linears(block).items() if type(m) is torch.nn.Linear}
    assert left <= set(model.epmq_report.skipped) | set(model.epmq_report.routers)
    said = [str(w.message) for w in recwarn if "never called on the calibration data" in str(w.message)]
    assert len(said) == bool(model.epmq_report.skipped) and all(model.epmq_report.skipped[0] in s for s in said)
    outside = [str(w.message) for w in recwarn if "outside any linear" in str(w.message)]
    # (Zamba's mixers keep per-head projections as raw tensors: 15% of a block this small, 3% of
    # Zamba-7B's, where nothing is said)
    assert all("mamba.x_proj_weight" in s for s in outside) if arch == "zamba" else not outside
    # (nor fused experts left, however small their share of this tiny model: Nemotron-H's were)
    assert not [name for name, p in model.named_parameters() if p.dim() == 3 and "expert" in name]
    # (Zamba's hybrid layers tie one attention block's weights: packed once, shared by all)
    assert all(model.get_submodule(name) is model.get_submodule(first)
               for name, first in model.epmq_report.tied.items())
    assert bool(model.epmq_report.tied) == (arch == "zamba")
    assert len(model.epmq_report.layers) == sum(isinstance(m, epmq.QuantLinear) for m in model.modules()) > 0
    # (each block's output is the next one's input, but where the model changes it in between:
    # no pass of the model per block where it is not needed; Reformer's reversible blocks are
    # called with two streams by keyword, which the model hands on from a named tuple)
    replayed = {"deberta_v2_conv": ["encoder.layer"], "reformer": ["reformer.encoder.layers"]}
    assert model.epmq_report.replayed == replayed.get(arch, [])
    # (no block is called twice in one pass, but ALBERT's one layer, once per layer)
    repeated = {"albert": {"albert.encoder.albert_layer_groups.0.albert_layers.0": 3}}
    assert model.epmq_report.repeated == repeated.get(arch, {})
    epmq.save_quantized(model, tmp_path / "ckpt")
    loaded = epmq.load_quantized(tmp_path / "ckpt")
    item = wider_input(kind, gen)
    torch.testing.assert_close(output(loaded, item), output(model, item), rtol=0, atol=0)


def with_dequantized_linears(model):
    """A copy of ``model`` whose packed layers are ``nn.Linear``s holding their dequantized weights:
    what the quantized model computes, with no packed layer for the model's code to misread."""
    reference = copy.deepcopy(model)
    for name, layer in list(reference.named_modules()):
        if isinstance(layer, epmq.QuantLinear):
            linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            linear.weight.data.copy_(layer.dequantize(torch.float32))
            if layer.bias is not None:
                linear.bias.data.copy_(layer.bias)
            parent, _, attr = name.rpartition(".")
            setattr(reference.get_submodule(parent), attr, linear)
    return reference


@pytest.mark.parametrize("arch", ["jamba", "mamba", "falconmamba"])
def test_rtn_leaves_linears_whose_weight_the_model_reads_in_full_precision(arch, gen, tmp_path):
    """Jamba's, Mamba's and Falcon-Mamba's mixers multiply by ``dt_proj.weight`` without calling
    the layer: RTN, which runs no forward to see it, packed it all the same, and the mixer read the
    packed layer's data-less stand-in (NaN or garbage logits, silently). It is left in full precision,
    said and reported as the walks report it; the model computes what its dequantized weights give,
    and its checkpoint loads back the same."""
    build_model, kind = WIDER[arch]
    torch.manual_seed(0)
    model = build_model().eval()
    with pytest.warns(UserWarning, match="weight read without a call") as said:
        epmq.quantize_model(model, SPEC_4, method="rtn", progress=False)
    skipped = model.epmq_report.skipped
    assert skipped and all(name.endswith(".dt_proj") for name in skipped)
    assert all(type(model.get_submodule(name)) is torch.nn.Linear for name in skipped)
    assert any(skipped[0] in str(w.message) for w in said)
    assert sum(isinstance(m, epmq.QuantLinear) for m in model.modules()) == len(model.epmq_report.layers) > 0
    item = wider_input(kind, gen)
    got = output(model, item)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, output(with_dequantized_linears(model), item), rtol=1e-4, atol=1e-5)
    epmq.save_quantized(model, tmp_path / "ckpt")
    loaded = epmq.load_quantized(tmp_path / "ckpt")
    torch.testing.assert_close(output(loaded, item), got, rtol=0, atol=0)


def test_fused_experts_an_adapter_leaves_alone_are_warned_about(gen):
    """A plain Adapter on an MoE decoder: the routers (nn.Linear subclasses returning top-k) are
    left alone, and the fused 3-D experts it cannot quantize are named in a warning."""
    build_model, kind = WIDER["phimoe"]
    torch.manual_seed(0)
    model = build_model().eval()
    calibration = {"a": [wider_input(kind, gen)]}
    with pytest.warns(UserWarning, match="outside any linear layer .*experts.gate_up_proj.*MoEAdapter"):
        epmq.quantize_model(model, SPEC_4, method="gptq", calibration=calibration, backend="torch",
                            adapter=epmq.Adapter("plain", block_types=("PhimoeDecoderLayer",)), progress=False)
    assert not any("router" in layer["name"] for layer in model.epmq_report.layers)


@pytest.mark.parametrize("arch", list(WIDER))
def test_wider_families_replay_what_the_model_computes(arch, gen, monkeypatch):
    """The walk feeds the last block of the last stack exactly the inputs the model's own
    forward gives it (masks, rotary or ALiBi, T5-style biases, encoder states replayed): its first
    linear's statistics equal those hooked from a plain forward (nothing upstream quantized)."""
    from epmq.calibration import unpad
    from epmq.walker import _encoder_decoder

    build_model, kind = WIDER[arch]
    torch.manual_seed(0)
    model = build_model().eval()
    calibration = {"a": [wider_input(kind, gen) for _ in range(2)]}
    adapter = find_adapter(model)
    prefix, blocks = adapter.stacks(model)[-1]
    # (the walk's items: padded batches cut into batches of real tokens)
    items = [part for item in calibration["a"] for part in unpad(item, encoder_decoder=_encoder_decoder(model))]
    # its first linear the forward calls (LongCat-Flash's router reads its classifier's weight),
    # but routers (kept in full precision)
    routers = adapter.routers(blocks[-1])
    for rel in [rel for rel in adapter.linears(blocks[-1]) if rel not in routers]:
        target = f"{prefix}.{len(blocks) - 1}.{rel}"
        hand = hooked_inputs(model, target, items)
        if hand:
            break
    if kind == "patches":  # (SigLIP 2's padded patches change nothing the model returns: no tokens)
        hand = [rows[item["pixel_attention_mask"].reshape(-1) != 0] for rows, item in zip(hand, items, strict=True)]
    seen = walked_inputs(monkeypatch)
    epmq.quantize_model(model, SPEC_4, method="gptq", calibration=calibration, layers=lambda name: name == target,
                        backend="torch", progress=False)
    assert_same_statistics(seen, hand)


def test_a_reformer_of_more_than_two_layers_is_walked_on_what_its_blocks_get(gen, monkeypatch):
    """Reformer's layers return a named tuple (hidden states, attention output, ...), and the model
    hands each layer the attention output by keyword: the walk replays the model after each block,
    the blocks before it stand-ins returning that tuple with the hidden states alone. A named tuple
    is built from its fields, not from one list: from a third layer on (Reformer models have 6 to
    12) the walk ended in a bare "ReformerOutput.__new__() missing 3 required positional
    arguments". The last block's first linear gets exactly what a plain forward gives it."""
    from epmq.calibration import unpad
    from test_walker_models import VOCAB, _hf

    torch.manual_seed(0)
    model = _hf("ReformerModelWithLMHead", "ReformerConfig", vocab_size=VOCAB, hidden_size=32, attention_head_size=8,
                num_attention_heads=4, feed_forward_size=64, attn_layers=["local", "lsh", "local"],
                axial_pos_embds_dim=[16, 16], axial_pos_shape=[8, 8], is_decoder=True, hash_seed=0, pad_token_id=0,
                eos_token_id=1)().eval()
    calibration = {"a": [wider_input("ids", gen) for _ in range(2)]}
    items = [part for item in calibration["a"] for part in unpad(item)]
    prefix, blocks = find_adapter(model).stacks(model)[-1]
    target = f"{prefix}.2.{next(iter(find_adapter(model).linears(blocks[2])))}"
    hand = hooked_inputs(model, target, items)
    seen = walked_inputs(monkeypatch)
    epmq.quantize_model(model, SPEC_4, method="gptq", calibration=calibration, layers=lambda name: name == target,
                        backend="torch", progress=False)
    assert model.epmq_report.replayed == ["reformer.encoder.layers"]
    assert_same_statistics(seen, hand)


def test_fsmt_decoder_cache_argument_is_kept_out_of_the_walk(gen, monkeypatch):
    """FSMT's decoder layers take their generation cache as ``layer_state`` (the model makes one
    whenever ``use_cache``, its config's default): handed to every call of a block, the cross
    attention read its keys and values from what the first call cached, so its k_proj and v_proj
    were never called, stayed in full precision and were reported as a path the data does not take."""
    from test_walker_models import VOCAB, _hf

    torch.manual_seed(0)
    model = _hf("FSMTForConditionalGeneration", "FSMTConfig", langs=["en", "de"], src_vocab_size=VOCAB,
                tgt_vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)().eval()
    items = [{"input_ids": torch.randint(3, VOCAB, (2, 8), generator=gen),
              "decoder_input_ids": torch.randint(3, VOCAB, (2, 5), generator=gen)} for _ in range(2)]
    target = "model.decoder.layers.1.encoder_attn.k_proj"
    hand = hooked_inputs(model, target, items)
    seen = walked_inputs(monkeypatch)
    epmq.quantize_model(model, SPEC_4, method="gptq", calibration={"a": items}, layers=lambda name: name == target,
                        backend="torch", progress=False)
    assert model.epmq_report.skipped == []
    assert isinstance(model.get_submodule(target), epmq.QuantLinear)
    assert_same_statistics(seen, hand)


# (first call's layers, second call's): the second walks modules the first rewrote (GPT-2's
# Conv1D as nn.Linear, fused MoE experts as linears, open_clip's attention as linears)
SECOND_CALL = {"gpt2": (r"\.mlp\.", r"\.attn\."), "qwen3_moe": ("self_attn", r"\.mlp\."),
               "open_clip_vit": (r"\.mlp\.", r"\.attn\.")}


@pytest.mark.parametrize("arch", list(SECOND_CALL))
def test_a_second_call_reads_the_experts_as_the_first(arch, gen, tmp_path):
    """Experts equal to the merged model, in the family's own layout: the target is the merged
    weight itself, so E-PMQ's expert term is its whole loss (anchors 0). A second call read them
    without the first call's renames: transposed (GPT-2, silently), or not at all (refused)."""
    fam = Family(arch, gen)
    first, second = SECOND_CALL[arch]
    model = fam.merged()
    epmq.quantize_model(model, SPEC_4, method="gptq", calibration=fam.calibration, layers=first,
                        backend="torch", progress=False)
    experts = {t: fam.merged_state for t in fam.tasks}
    epmq.quantize_model(model, SPEC_4, method="epmq", calibration=fam.calibration, experts=experts, layers=second,
                        anchor=0.0, weight_anchor=0.0, percdamp=0.0, backend="torch", progress=False)
    layers = model.epmq_report.layers
    assert layers and all(first not in layer["name"] for layer in layers)
    for layer in layers:
        assert layer["expert_loss"] == pytest.approx(layer["loss"], rel=1e-3, abs=1e-9), layer["name"]
    epmq.save_quantized(model, tmp_path / "ckpt")
    fresh = epmq.load_quantized(tmp_path / "ckpt", fam.fresh())
    torch.testing.assert_close(output(fresh, fam.test_item), output(model, fam.test_item), rtol=0, atol=0)


def test_gpt2_linears_left_in_full_precision_are_saved_in_conv1d_layout(gen, tmp_path):
    """The walk rewrites every Conv1D of the blocks as nn.Linear; those it leaves in full precision
    are written as GPT-2 stores them ([in, out]), the layout engines build them in (the config's
    ``dynamic`` rules say so); ``load_quantized`` transposes them back."""
    from safetensors.torch import load_file

    fam = Family("gpt2", gen)
    model = fam.merged()
    epmq.quantize_model(model, SPEC_4, method="gptq", calibration=fam.calibration, layers=r"\.mlp\.",
                        backend="torch", progress=False)
    epmq.save_quantized(model, tmp_path / "ckpt")
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_proj.weight"):
        assert torch.equal(saved[name], fam.merged_state[name]), name
    assert "transformer.h.0.mlp.c_fc.qweight" in saved
    fresh = epmq.load_quantized(tmp_path / "ckpt", fam.fresh())
    torch.testing.assert_close(output(fresh, fam.test_item), output(model, fam.test_item), rtol=0, atol=0)
    # what epmq wrote before (the nn.Linear layout, not listed as transposed) still loads as it is
    config = json.loads((tmp_path / "ckpt" / "quantize_config.json").read_text())
    listed = config["epmq"].pop("transposed")
    assert sorted(listed) == sorted(n for n in saved if ".attn." in n and n.endswith(".weight"))
    from safetensors.torch import save_file

    save_file({n: t.t().contiguous() if n in listed else t for n, t in saved.items()},
              str(tmp_path / "ckpt" / "model.safetensors"))
    (tmp_path / "ckpt" / "quantize_config.json").write_text(json.dumps(config))
    old = epmq.load_quantized(tmp_path / "ckpt", fam.fresh())
    torch.testing.assert_close(output(old, fam.test_item), output(model, fam.test_item), rtol=0, atol=0)
    # another writer's (no epmq section): the family's own layout, as transformers saves GPT-2
    del config["epmq"]
    save_file(saved, str(tmp_path / "ckpt" / "model.safetensors"))
    (tmp_path / "ckpt" / "quantize_config.json").write_text(json.dumps(config))
    theirs = epmq.load_quantized(tmp_path / "ckpt", fam.fresh())
    torch.testing.assert_close(output(theirs, fam.test_item), output(model, fam.test_item), rtol=0, atol=0)


def test_a_quantized_moe_model_copies_and_pickles(gen, tmp_path):
    """It keeps its walk's names (``Part``s of fused experts), which copy and pickle whole."""
    fam = Family("qwen3_moe", gen)
    model = fam.merged()
    epmq.quantize_model(model, SPEC_4, method="rtn", progress=False)
    torch.save(copy.deepcopy(model), tmp_path / "model.pt")
    again = torch.load(tmp_path / "model.pt", weights_only=False)
    torch.testing.assert_close(output(again, fam.test_item), output(model, fam.test_item), rtol=0, atol=0)
    for m in again.modules():  # (pickled before layers recorded what quantized them)
        vars(m).pop("quantized_with", None)
    epmq.save_quantized(again, tmp_path / "ckpt")


def test_a_packed_layer_its_weights_renaming_rule_names_otherwise_loads_back(gen, tmp_path):
    """Inkling 2's hub checkpoints store a convolution's weight_proj bare, and transformers'
    rule for it (``sconv.weight_proj`` -> ``sconv.weight_proj.weight``) renames that layer's
    packed tensors too (``sconv.weight_proj.qweight`` -> ``sconv.weight_proj.weight.qweight``):
    no Inkling 2 checkpoint loaded ('quantizes ...sconv.weight_proj.weight, which
    Inkling2ForCausalLM does not have')."""
    from test_walker_models import _decoder

    torch.manual_seed(0)
    model = _decoder("Inkling2ForCausalLM", "Inkling2TextConfig", head_dim=8, swa_num_attention_heads=4,
                     swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=4, n_routed_experts=4,
                     moe_intermediate_size=16, num_experts_per_tok=2, layer_types=["hybrid_sliding", "hybrid"],
                     pad_token_id=0, bos_token_id=0, eos_token_id=1)().eval()
    item = wider_input("ids", gen)
    epmq.quantize_model(model, SPEC_4, method="rtn", progress=False)
    name = "model.layers.1.self_attn.k_proj.sconv.weight_proj"
    assert isinstance(model.get_submodule(name), epmq.QuantLinear)
    epmq.save_quantized(model, tmp_path / "ckpt")
    loaded = epmq.load_quantized(tmp_path / "ckpt")
    assert isinstance(loaded.get_submodule(name), epmq.QuantLinear)
    torch.testing.assert_close(output(loaded, item), output(model, item), rtol=0, atol=0)


def test_an_expert_checkpoint_holding_q_k_v_in_one_tensor_is_read_as_the_loaded_expert(gen, tmp_path):
    """Sarvam-MoE's checkpoints hold attention's q, k and v as one query_key_value, which
    transformers splits as it loads the model: an expert saved by save_pretrained was refused as
    'no tensor ...q_proj.weight: it must be a checkpoint of the merged model's architecture',
    though it is one. Each linear is read by its rows of the saved tensor: the walk with the
    expert's directory is the walk with the expert loaded, exactly."""
    from test_walker_models import _decoder

    torch.manual_seed(0)
    base = _decoder("Glm4MoeForCausalLM", "SarvamMoEConfig", head_dim=8, moe_intermediate_size=16, n_routed_experts=4,
                    num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
                    use_qk_norm=True, pad_token_id=0, bos_token_id=0, eos_token_id=1)().eval()
    expert, other = perturb(base, gen), perturb(base, gen).state_dict()
    expert.save_pretrained(tmp_path / "expert")
    items, item = [wider_input("ids", gen)], wider_input("ids", gen)
    outputs = []
    for b in (str(tmp_path / "expert"), expert.state_dict()):
        model = copy.deepcopy(base)
        epmq.quantize_model(model, SPEC_4, method="epmq", calibration={"a": items, "b": items},
                            experts={"a": other, "b": b}, layers=r"self_attn", backend="torch", progress=False)
        quantized = {layer["name"].rsplit(".", 1)[-1] for layer in model.epmq_report.layers}
        assert quantized >= {"q_proj", "k_proj", "v_proj"}
        outputs.append(output(model, item))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


class _ResidualLayer(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.proj = torch.nn.Linear(width, width)

    def forward(self, x):
        return x + self.proj(x)


class _Squeeze(torch.nn.Module):  # (a module between the layers that is no *Layer or *Block)
    def __init__(self, width):
        super().__init__()
        self.proj = torch.nn.Linear(width, width)

    def forward(self, x):
        return self.proj(x)


class _Stages(torch.nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.stages = torch.nn.ModuleList([
            torch.nn.ModuleList([_ResidualLayer(width), _ResidualLayer(width), _Squeeze(width), _ResidualLayer(width)]),
            torch.nn.ModuleList([_ResidualLayer(width), _ResidualLayer(width)])])

    def forward(self, x):
        for stage in self.stages:
            for layer in stage:
                x = layer(x)
        return x


def test_stacks_of_mixed_blocks_left_in_full_precision_are_warned_about(gen):
    """A stage listing residual layers with another module between them (as LeViT's first stages,
    before its own adapter took their subsampling attention): the walk quantizes the last stage
    only (its list is all blocks); the other stays in full precision, which was said of lists of one
    block type only (LeViT's 15 of 19 linears were left silently)."""
    model = _Stages().eval()
    calibration = {"a": [torch.randn(2, 4, 32, generator=gen)]}
    with pytest.warns(UserWarning, match="no adapter knows the blocks at stages.0 ") as said:
        epmq.quantize_model(model, SPEC_4, method="gptq", calibration=calibration, backend="torch", progress=False)
    said = [str(w.message) for w in said if "no adapter knows" in str(w.message)]
    assert len(said) == 1 and "stages.1 (" not in said[0]
    assert {layer["name"].rsplit(".", 2)[0] for layer in model.epmq_report.layers} == {"stages.1"}


def test_a_stack_of_mixed_blocks_is_walked_as_the_warning_says(gen):
    """The warning told to walk such a list with epmq.adapters.AUTO, which had walked the model and
    takes no list holding a module that is no *Layer or *Block (as a registered adapter naming only
    the repeated kind takes none): it names every kind the list holds, and an adapter of those
    walks it."""
    model = _Stages().eval()
    calibration = {"a": [torch.randn(2, 4, 32, generator=gen)]}
    with pytest.warns(UserWarning, match="no adapter knows the blocks at stages.0 ") as said:
        epmq.quantize_model(model, SPEC_4, method="rtn", progress=False)
    said = next(str(w.message) for w in said if "no adapter knows" in str(w.message))
    assert "block_types=('_ResidualLayer', '_Squeeze')" in said
    model = _Stages().eval()
    epmq.quantize_model(model, SPEC_4, method="gptq", calibration=calibration, backend="torch", progress=False,
                        adapter=epmq.Adapter("stages", block_types=("_ResidualLayer", "_Squeeze")))
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())


def test_an_expert_checkpoint_holding_a_tensor_in_parts_is_read_as_the_loaded_expert(gen, tmp_path):
    """OLMo-hybrid's checkpoints hold each linear attention's short convolution as three tensors
    (linear_attn.q_conv1d, k_conv1d, v_conv1d), which transformers concatenates into one conv1d
    as it loads the model: the expert path refused such an expert directory ('holds
    ...linear_attn.conv1d.weight inside its linear_attn.q_conv1d.weight tensors ...: give this
    expert loaded'). The tensor is made of its parts as transformers makes it: the walk with the
    expert's directory is the walk with the expert loaded, exactly."""
    from safetensors import safe_open

    torch.manual_seed(0)
    base = WIDER["olmohybrid"][0]().eval()
    expert, other = perturb(base, gen), perturb(base, gen).state_dict()
    expert.save_pretrained(tmp_path / "expert")
    with safe_open(str(tmp_path / "expert" / "model.safetensors"), "pt") as saved:
        assert "model.layers.0.linear_attn.q_conv1d.weight" in saved.keys()
    items, item = [wider_input("ids", gen)], wider_input("ids", gen)
    outputs = []
    for b in (str(tmp_path / "expert"), expert.state_dict()):
        model = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # (no part taken for a tensor the model lacks)
            epmq.quantize_model(model, SPEC_4, method="epmq", calibration={"a": items, "b": items},
                                experts={"a": other, "b": b}, targets="expert_path", backend="torch",
                                progress=False)
        outputs.append(output(model, item))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_an_expert_checkpoint_holding_its_embeddings_in_two_tensors_is_read_as_the_loaded_expert(gen, tmp_path):
    """Molmo2's text model saves its token embeddings as wte.embedding and wte.new_embedding (the
    added tokens' rows), which transformers concatenates into embed_tokens as it loads the model:
    the expert path refused such an expert directory ('holds 'embed_tokens.weight' inside its
    wte.embedding tensors ...: give this expert loaded'). The embeddings are made of the two as
    transformers makes them: the walk with the directory is the walk with the expert loaded."""
    import transformers

    if not hasattr(transformers, "Molmo2TextModel"):
        pytest.skip(f"transformers {transformers.__version__} has no Molmo2TextModel")
    torch.manual_seed(0)
    base = transformers.Molmo2TextModel(transformers.Molmo2TextConfig(
        hidden_size=32, num_hidden_layers=2, vocab_size=60, additional_vocab_size=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, head_dim=8, max_position_embeddings=64)).eval()
    expert, other = perturb(base, gen), perturb(base, gen).state_dict()
    expert.save_pretrained(tmp_path / "expert")
    items = [{"input_ids": torch.randint(0, 64, (2, 8), generator=gen)}]
    item = {"input_ids": torch.randint(0, 64, (2, 8), generator=gen)}
    outputs = []
    for b in (str(tmp_path / "expert"), expert.state_dict()):
        model = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            epmq.quantize_model(model, SPEC_4, method="epmq", calibration={"a": items, "b": items},
                                experts={"a": other, "b": b}, targets="expert_path", backend="torch",
                                progress=False)
        with torch.no_grad():
            outputs.append(model(**item).last_hidden_state)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_a_base_models_walk_reads_a_tensor_in_parts_from_its_causal_lms_expert_directory(gen, tmp_path):
    """The expert path reads a base model's tensors from a directory of its causal LM (their names
    one prefix apart): OLMo-hybrid's conv1d, saved in three parts, was looked for under the base
    model's name only, and the directory refused ('holds 'layers.0.linear_attn.conv1d.weight'
    inside its linear_attn.q_conv1d.weight tensors'); found under the same prefix as the others."""
    torch.manual_seed(0)
    full = WIDER["olmohybrid"][0]().eval()
    expert = perturb(full, gen)
    expert.save_pretrained(tmp_path / "expert")
    base, other = full.model, perturb(full.model, gen).state_dict()
    items = [{"input_ids": wider_input("ids", gen)["input_ids"]}]
    outputs = []
    for b in (str(tmp_path / "expert"), expert.model.state_dict()):
        model = copy.deepcopy(base)
        epmq.quantize_model(model, SPEC_4, method="epmq", calibration={"a": items, "b": items},
                            experts={"a": other, "b": b}, targets="expert_path", backend="torch", progress=False)
        with torch.no_grad():
            outputs.append(model(**items[0]).last_hidden_state)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_a_lora_adapter_on_a_base_directory_holding_a_tensor_in_parts_is_read_as_its_expert(gen, tmp_path):
    """A LoRA adapter read over OLMo-hybrid's base directory, whose conv1d is saved in three parts
    (q_conv1d, k_conv1d, v_conv1d), was refused by the expert path as 'has no tensor
    'model.layers.0.linear_attn.conv1d.weight': it must be a checkpoint of the merged model's
    architecture', though it is one; the parts are read from the base's checkpoint, and the walk
    with the adapter is the walk with the expert PEFT merges of it, exactly."""
    import transformers

    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = WIDER["olmohybrid"][0]().eval()
    base.save_pretrained(tmp_path / "base")
    adapted = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                  peft.LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"]))
    for name, p in adapted.named_parameters():
        if "lora_" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.3
    adapted.save_pretrained(tmp_path / "adapter")
    expert = {k: v.clone() for k, v in adapted.merge_and_unload().state_dict().items()}
    other = perturb(base, gen).state_dict()
    items = [{"input_ids": wider_input("ids", gen)["input_ids"]}]
    outputs = []
    for b in (str(tmp_path / "adapter"), expert):
        model = copy.deepcopy(base)
        epmq.quantize_model(model, SPEC_4, method="epmq", calibration={"a": items, "b": items},
                            experts={"a": other, "b": b}, targets="expert_path", backend="torch", progress=False)
        outputs.append(output(model, items[0]))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def _rwkv(rescale_every, **config):
    return _hf("RwkvForCausalLM", "RwkvConfig", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4,
               attention_hidden_size=32, intermediate_size=64, context_length=64, rescale_every=rescale_every,
               **config)()


@pytest.mark.parametrize("method,targets", [("rtn", "merged_path"), ("gptq", "merged_path"),
                                            ("epmq", "merged_path"), ("epmq", "expert_path")])
def test_rwkv_layers_rescaled_for_inference_are_packed_as_they_run(method, targets, gen, tmp_path):
    """RWKV with rescale_every > 0 divides block i's attention.output and feed_forward.value weights
    by 2 ** (i // rescale_every) in place on its first forward in eval mode, and its hidden states
    to match: it computes what the model without rescaling computes, at another scale. RTN packed
    the undivided weights, whose division the packed layer then dropped (logits 40% off), and E-PMQ
    aimed the divided weights at its experts' undivided ones. Quantized, it computes what the model
    without rescaling quantized alike computes (the division is by a power of two: the same codes),
    before and after a save and load, and no division is dropped on the way."""
    torch.manual_seed(0)
    # (the blocks' LayerNorms' eps below float32's resolution of their inputs' variance: at another scale they
    # add another share of it, and the rescaled blocks then saw inputs ~1e-5 apart, whose Hessians moved a few
    # of GPTQ's and E-PMQ's codes across a rounding boundary, 13 to 91 of 9216 words: 1e-3 of the logits,
    # past the bound 1 seed in 30 (EPMQ_TEST_SEED=29). So they see the same inputs, at a power of two)
    base = _rwkv(2, layer_norm_epsilon=1e-12)  # (never run: its weights undivided, as a checkpoint holds them)
    plain = _rwkv(0, layer_norm_epsilon=1e-12)
    plain.load_state_dict(base.state_dict())
    experts = {t: perturb(base, gen) for t in ("a", "b")}
    undivided = {t: {k: v.clone() for k, v in expert.state_dict().items()} for t, expert in experts.items()}
    item = wider_input("ids", gen)
    output(experts["a"].eval(), item)  # (an expert module run in eval mode holds its weights divided)
    experts["b"] = undivided["b"]
    calibration = {t: [wider_input("ids", gen) for _ in range(2)] for t in experts}
    kwargs = {} if method == "rtn" else dict(calibration=calibration, targets=targets, backend="torch")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        got = []
        for model, own in ((base.eval(), experts), (plain.eval(), undivided)):
            epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method=method, progress=False,
                                **kwargs, **({"experts": own} if method == "epmq" else {}))
            got.append(output(model, item))
        epmq.save_quantized(base, tmp_path / "ckpt")
        loaded = epmq.load_quantized(tmp_path / "ckpt").eval()
        got.append(output(loaded, item))
    # (the same codes: what is left is ln_out's eps, fixed at 1e-5 in RwkvModel, over a variance 16 times
    # smaller: 5e-5 of the logits in full precision, and quantized (5.0e-5 to 5.4e-5, 4 seeds of each). Unscaled,
    # RTN was 40% off, E-PMQ 20%)
    assert rel_err(got[0], got[1]) < 1e-4
    torch.testing.assert_close(got[2], got[0], rtol=0, atol=0)
    assert not [w for w in said if "is dropped" in str(w.message)]


def test_an_rwkv_handed_its_state_of_earlier_tokens_is_refused(gen, monkeypatch):
    """RWKV hands its blocks its recurrent state (a list of 5 tensors), which the walk calls them without:
    a fresh one (a first call's zeros) changes nothing, but one of earlier tokens given with calibration
    items (a generation's next tokens) was dropped as well, the blocks solved on inputs the model never
    gives them, without a word. Refused, naming the state, the model untouched; without it (the model's
    own fresh state) walked on a plain forward's inputs."""
    from test_walker_models import hooked_inputs, walked_inputs

    model, ids, state = _rwkv_with_a_state(gen)
    items = [{"input_ids": i[:, 4:], "state": [s.clone() for s in state]} for i in ids]
    _refused_untouched(model, items, r"the blocks at 'rwkv\.blocks' \(auto\) are handed a state \(a list of "
                                     r"tensors\) that block 0 returns other hidden states without")
    target = "rwkv.blocks.0.attention.key"
    hand = hooked_inputs(model, target, [{"input_ids": i} for i in ids])
    seen = walked_inputs(monkeypatch)
    epmq.quantize_model(model, SPEC_4, method="gptq", calibration={"a": [{"input_ids": i} for i in ids]},
                        backend="torch", progress=False, layers=lambda name: name == target)
    assert_same_statistics(seen, hand)


def test_an_rwkv_state_given_with_one_item_alone_is_refused_naming_that_item(gen):
    """The refusal of a state of earlier tokens is made item by item (each item's own state, block 0 run
    with and without it), but named no item: with one among many calibration items carrying a state, the
    user was not told which. Named by task and item, the model untouched."""
    model, ids, state = _rwkv_with_a_state(gen)
    items = [{"input_ids": ids[0]}, {"input_ids": ids[1][:, 4:], "state": [s.clone() for s in state]}]
    _refused_untouched(model, items, r"^calibration\['a'\] item 1: the blocks at 'rwkv\.blocks' \(auto\) are "
                                     r"handed a state \(a list of tensors\)")


def _rwkv_with_a_state(gen):
    """A tiny RWKV, two items' ids of 8 tokens, and the state its first item's first 4 leave."""
    model = _rwkv(0).eval()
    ids = [torch.randint(0, VOCAB, (1, 8), generator=gen) for _ in range(2)]
    with torch.no_grad():
        state = model(ids[0][:, :4], use_cache=True).state
    return model, ids, state


def _refused_untouched(model, items, match):
    """The walk of ``model`` on ``items`` refused (``match``), the model left as it was."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        epmq.quantize_model(model, SPEC_4, method="gptq", calibration={"a": items}, backend="torch", progress=False)
    assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_xlstm_item_run_in_chunks_after_a_shorter_first_item_is_refused(gen, monkeypatch):
    """xLSTM's forward runs an input longer than max_inference_chunksize a chunk at a time, each chunk through
    every block on the recurrent state the last left: its blocks called again after the last one. How often is
    counted on each task's first item (and every item once one repeats): a first item of one chunk and a later
    one of three were walked on the later one's first chunk alone (14 of its 30 rows, the statistics 66% off),
    without a word, where the reverse order was refused. Either order is refused, naming both counts, the model
    untouched; items of one chunk are walked on a plain forward's inputs."""
    build = _hf("xLSTMForCausalLM", "xLSTMConfig", vocab_size=VOCAB, hidden_size=64, embedding_dim=64,
                num_hidden_layers=2, num_blocks=2, num_heads=2, qk_dim_factor=1.0, max_inference_chunksize=8)
    one, three = (torch.randint(0, VOCAB, (1, length), generator=gen) for length in (6, 24))  # (chunks)
    options = dict(method="gptq", backend="torch", progress=False)
    for order, said in (((one, three), r"item 0: each block once; calibration\['a'\] item 1: block 0: 3 calls"),
                        ((three, one), r"item 0: block 0: 3 calls, block 1: 3 calls; calibration\['a'\] item 1: "
                                        r"each block once")):
        model = build().eval()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError, match=r"calls the blocks at 'backbone\.blocks' a number of times that "
                                             r"depends on its input \(calibration\['a'\] " + said):
            epmq.quantize_model(model, SPEC_4, calibration={"a": [{"input_ids": x} for x in order]}, **options)
        assert not any(isinstance(m, epmq.QuantLinear) for m in model.modules())
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    target = "backbone.blocks.0.mlstm_layer.q"
    items = [{"input_ids": one}, {"input_ids": torch.randint(0, VOCAB, (1, 8), generator=gen)}]
    hand = hooked_inputs(model, target, items)
    seen = walked_inputs(monkeypatch)
    epmq.quantize_model(model, SPEC_4, calibration={"a": items}, layers=lambda name: name == target, **options)
    assert_same_statistics(seen, hand)


def test_a_checkpoint_of_a_rescaled_rwkv_holds_its_weights_as_transformers_loads_them(gen, tmp_path):
    """RWKV's checkpoints hold its weights undivided: transformers' loader (a serving engine's)
    leaves layers_are_rescaled False and divides them on the first forward in eval mode. epmq
    wrote them divided (recording "rescaled", which only its own loader reads): a model loaded
    so divided them twice, 2 ** k off. The weights saved are now the model's multiplied back."""
    torch.manual_seed(0)
    model, item = _rwkv(2).eval(), wider_input("ids", gen)
    epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method="rtn", progress=False)
    want = output(model, item)
    epmq.save_quantized(model, tmp_path / "ckpt")
    assert "rescaled" not in json.loads((tmp_path / "ckpt" / "quantize_config.json").read_text())["epmq"]
    loaded = epmq.load_quantized(tmp_path / "ckpt")
    # (the dense model transformers would build of the checkpoint, the packed layers dequantized)
    state = loaded.state_dict()
    for name, layer in loaded.named_modules():
        if isinstance(layer, epmq.QuantLinear):
            state = {k: v for k, v in state.items() if not k.startswith(f"{name}.")}
            state[f"{name}.weight"] = layer.dequantize()
    dense = _rwkv(2).eval()
    dense.load_state_dict(state)
    assert rel_err(output(dense, item), want) < 1e-5
    torch.testing.assert_close(output(loaded.eval(), item), want, rtol=0, atol=0)
    # (one epmq wrote before, the weights divided and "rescaled" saying so, loads as it ran too)
    safetensors = pytest.importorskip("safetensors.torch")
    path, config = tmp_path / "ckpt" / "model.safetensors", tmp_path / "ckpt" / "quantize_config.json"
    tensors = safetensors.load_file(path)
    for name, divisor in epmq._util.rescaled_divisors(model).items():
        tensors[name.replace(".weight", ".scales")] /= divisor
    safetensors.save_file(tensors, path, metadata={"format": "pt"})
    said = json.loads(config.read_text())
    said["epmq"]["rescaled"] = ["rwkv"]
    config.write_text(json.dumps(said))
    torch.testing.assert_close(output(epmq.load_quantized(tmp_path / "ckpt").eval(), item), want, rtol=0, atol=0)


def test_a_packed_rwkv_compiled_divides_its_layers_as_it_runs_uncompiled(gen, tmp_path):
    """RWKV divides its rescaled layers' weights in place (weight.div_) on its first forward in eval
    mode: under torch.compile a packed layer's weight is a dequantized copy, so the division went into
    it and was dropped (logits ~50% off, a compiled dense RWKV exact). The rescale runs outside the
    graph, for a model quantized and one loaded; a copy of the model rescales its own layers."""
    torch.manual_seed(0)
    model, item = _rwkv(2), wider_input("ids", gen)
    epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(model.train(), tmp_path / "ckpt")
    want = output(epmq.load_quantized(tmp_path / "ckpt").eval(), item)
    output(model, item)  # (in train mode: its layers multiplied back)
    for fresh in (lambda: epmq.load_quantized(tmp_path / "ckpt").eval(), lambda: copy.deepcopy(model).eval()):
        compiled = torch.compile(fresh(), backend="eager")
        torch.testing.assert_close(output(compiled, item), want, rtol=0, atol=0)
    assert model.rwkv.layers_are_rescaled is False  # (the copy rescaled its own layers, not the model's)
    assert {m.weight_multiplier for m in model.modules() if isinstance(m, epmq.QuantLinear)} == {1.0}


def test_an_rwkvs_rescaled_layers_are_packed_undivided_their_division_their_multiplier():
    """The walk divides RWKV's rescaled weights for inference before packing them, and the packed
    layers held the divided weights' scales: small ones in float16's subnormals (warned of, their
    precision lost). They hold the undivided weights' scales (those the model without rescaling,
    quantized alike, holds) and the division as their weight_multiplier."""
    torch.manual_seed(0)
    base = _rwkv(1)
    rescaled = {f"rwkv.blocks.{i}.{rel}": 2 ** i for i in range(4)
                for rel in ("attention.output", "feed_forward.value")}
    with torch.no_grad():
        for name in rescaled:  # (8-bit scales ~2e-4: divided by 2 ** 3, subnormal)
            base.get_submodule(name).weight.mul_(2 ** -4)
    plain = _rwkv(0)
    plain.load_state_dict(base.state_dict())
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*below float16's normal range")
        for model in (base.eval(), plain.eval()):
            epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method="rtn", progress=False)
    for name, divisor in rescaled.items():
        packed, whole = base.get_submodule(name), plain.get_submodule(name)
        assert torch.equal(packed.qweight, whole.qweight) and torch.equal(packed.scales, whole.scales), name
        assert packed.weight_multiplier == 1 / divisor and whole.weight_multiplier == 1


def test_an_rwkv_checkpoint_loaded_into_a_model_that_ran_in_eval_mode_is_divided_for_inference(gen, tmp_path):
    """load_quantized(directory, model) into an RWKV that had run in eval mode (layers_are_rescaled set,
    its own weights divided) loaded the checkpoint's undivided weights under that flag: its forward
    divided none of them (logits ~30% off). The flag is the file's: unset, but where "rescaled" says."""
    torch.manual_seed(0)
    model, item = _rwkv(2).eval(), wider_input("ids", gen)
    epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method="rtn", progress=False)
    want = output(model, item)
    epmq.save_quantized(model, tmp_path / "ckpt")
    ran = _rwkv(2).eval()
    output(ran, item)
    loaded = epmq.load_quantized(tmp_path / "ckpt", ran)
    assert not loaded.rwkv.layers_are_rescaled
    torch.testing.assert_close(output(loaded, item), want, rtol=0, atol=0)


def test_a_packed_rwkvs_state_dict_holds_its_weights_undivided_whichever_model_takes_it(gen, tmp_path):
    """A packed RWKV run in eval mode held its division in its layers' state dicts (weight_multiplier): a
    strict loader of the gptq layout found unexpected keys, and a model that had not run took the division
    and divided again at its first forward (2 ** k off). The state dict holds the layout's tensors alone,
    the weights undivided as RWKV's checkpoints hold them: a fresh model and one that ran both take it, and
    one an older epmq wrote, whose multipliers they leave to the model's own division."""
    torch.manual_seed(0)
    model, item = _rwkv(2).eval(), wider_input("ids", gen)
    epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method="rtn", progress=False)
    want = output(model, item)
    epmq.save_quantized(model, tmp_path / "ckpt")
    state = {name: t.clone() for name, t in model.state_dict().items()}
    assert not [name for name in state if name.endswith("weight_multiplier")]
    older = dict(state, **{f"{name}.weight_multiplier": torch.tensor(m.weight_multiplier, dtype=torch.float64)
                           for name, m in model.named_modules() if isinstance(m, epmq.QuantLinear)})
    assert any(t.item() != 1 for name, t in older.items() if name.endswith("weight_multiplier"))
    for given in (state, older):
        for taker in (epmq.load_quantized(tmp_path / "ckpt"), model):
            taker.load_state_dict(given)  # (strict)
            torch.testing.assert_close(output(taker.eval(), item), want, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_an_rwkv_checkpoint_that_does_not_say_whether_its_weights_are_divided_is_refused(method, gen, tmp_path):
    """epmq's GPTQ and E-PMQ checkpoints of a rescaled RWKV held its weights divided for inference
    (the calibration had run the model in eval mode) and said nothing of it until "rescaled" was
    recorded; later ones hold them multiplied back, and said nothing either: a divided one was
    divided again at its first forward in eval mode, 2 ** k off. Checkpoints now say "undivided",
    and one of a walk that ran the model that says neither is refused, saying how to tell it. RTN ran
    none: its weights undivided but where the model had run in eval mode before it was quantized, which
    nothing in the file tells (it was loaded as undivided in silence): loaded so, with a warning saying
    how to say which."""
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    model, item = _rwkv(2).eval(), wider_input("ids", gen)
    kwargs = {} if method == "rtn" else dict(calibration={"a": [wider_input("ids", gen)]}, backend="torch")
    epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method=method, progress=False, **kwargs)
    want = output(model, item)
    epmq.save_quantized(model, tmp_path / "ckpt")
    path, config = tmp_path / "ckpt" / "model.safetensors", tmp_path / "ckpt" / "quantize_config.json"
    said = json.loads(config.read_text())
    assert said["epmq"]["undivided"] == ["rwkv"]
    torch.testing.assert_close(output(epmq.load_quantized(tmp_path / "ckpt").eval(), item), want, rtol=0, atol=0)
    # (as epmq wrote them first: divided, nothing said)
    tensors = safetensors.load_file(path)
    for name, divisor in epmq._util.rescaled_divisors(model).items():
        tensors[name.replace(".weight", ".scales")] /= divisor
    safetensors.save_file(tensors, path, metadata={"format": "pt"})
    del said["epmq"]["undivided"]
    config.write_text(json.dumps(said))
    unsaid = r"'rwkv' divides its weights for inference \(RWKV's rescale_every=2\), and this "
    if method == "rtn":
        with pytest.warns(UserWarning, match=unsaid + r"rtn checkpoint does not say whether .*: loaded as undivided"
                                                       r".* nothing in the file tells the two apart\. .* add "
                                                       r"\"rescaled\": \[\"rwkv\"\] for one written so"):
            epmq.load_quantized(tmp_path / "ckpt")
    else:
        with pytest.raises(ValueError, match=unsaid + r"gptq checkpoint does not say whether .* add "
                                                      r"\"rescaled\": \[\"rwkv\"\]"):
            epmq.load_quantized(tmp_path / "ckpt")
    said["epmq"]["rescaled"] = ["rwkv"]  # (as the message says, for one written before)
    config.write_text(json.dumps(said))
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        torch.testing.assert_close(output(epmq.load_quantized(tmp_path / "ckpt").eval(), item), want, rtol=0, atol=0)
    assert not [w for w in warned if "does not say whether" in str(w.message)]


def test_an_rwkv_checkpoint_multiplied_back_saying_nothing_loads_with_the_entry_its_refusal_names(gen, tmp_path):
    """epmq's GPTQ checkpoints of a rescaled RWKV written between 2026-12-07 09:13 and the change that made them
    say "undivided" hold the weights multiplied back and say nothing: refused, the refusal names the file, the
    section and the entry, and with that entry added where it says the checkpoint loads as it ran."""
    torch.manual_seed(0)
    model, item = _rwkv(2).eval(), wider_input("ids", gen)
    epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method="gptq", progress=False,
                        calibration={"a": [wider_input("ids", gen)]}, backend="torch")
    want = output(model, item)
    epmq.save_quantized(model, tmp_path / "ckpt")
    config = tmp_path / "ckpt" / "quantize_config.json"
    said = json.loads(config.read_text())
    del said["epmq"]["undivided"]
    config.write_text(json.dumps(said))
    with pytest.raises(ValueError) as refused:
        epmq.load_quantized(tmp_path / "ckpt")
    assert str(refused.value).endswith('In the epmq section of its quantize_config.json add "rescaled": ["rwkv"] for '
                                       'one written before, "undivided": ["rwkv"] for one written after')
    assert "before 2026-12-07 07:35 UTC" in str(refused.value)
    said["epmq"]["undivided"] = ["rwkv"]
    config.write_text(json.dumps(said))
    torch.testing.assert_close(output(epmq.load_quantized(tmp_path / "ckpt").eval(), item), want, rtol=0, atol=0)


def test_an_rwkv_causal_lm_checkpoint_given_a_bare_rwkv_model_is_refused_as_of_another_class(gen, tmp_path):
    """A GPTQ checkpoint of an RwkvForCausalLM loaded into a bare RwkvModel was refused as not saying whether
    it holds its weights divided (it says so, of 'rwkv'): the refusal is of what is wrong, the checkpoint's
    layers under 'rwkv.' of a model that has them at its root."""
    torch.manual_seed(0)
    model = _rwkv(2).eval()
    epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method="gptq", progress=False,
                        calibration={"a": [wider_input("ids", gen)]}, backend="torch")
    epmq.save_quantized(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"quantizes 'rwkv.blocks.0.attention.key', which RwkvModel does not have "
                                         r"\(it has 'blocks.0.attention.key': .* holds a RwkvModel as 'rwkv'"):
        epmq.load_quantized(tmp_path / "ckpt", type(model.rwkv)(model.config))


def test_a_loaded_rwkvs_tiny_rescaled_weights_are_divided_for_inference_and_saved_back_exactly(gen, tmp_path):
    """A loaded RWKV divides its packed layers' weights on its first forward in eval mode: their float16
    scales were divided, small ones into float16's subnormals, so the layers no longer held the
    checkpoint's weights divided, and a save multiplied back other scales than the file's. The
    division is the layers' weight_multiplier: each computes what the dense layer divided alike does,
    and a save writes the scales it loaded, bit for bit."""
    safetensors = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    model, item = _rwkv(0), wider_input("ids", gen)  # (quantized whole, as a tool that does not rescale does)
    rescaled = [f"rwkv.blocks.{i}.{rel}" for i in range(4) for rel in ("attention.output", "feed_forward.value")]
    with torch.no_grad():
        for name in rescaled:  # (scales ~1e-4: divided by 2 ** 3, subnormal)
            model.get_submodule(name).weight.mul_(2 ** -8)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    epmq.save_quantized(model, tmp_path / "first")
    config = json.loads((tmp_path / "first" / "config.json").read_text())
    (tmp_path / "first" / "config.json").write_text(json.dumps(dict(config, rescale_every=1)))
    loaded = epmq.load_quantized(tmp_path / "first").eval()
    state = loaded.state_dict()  # (the checkpoint as transformers would build it dense)
    for name, layer in loaded.named_modules():
        if isinstance(layer, epmq.QuantLinear):
            state = {k: v for k, v in state.items() if not k.startswith(f"{name}.")}
            state[f"{name}.weight"] = layer.dequantize()
    dense = _rwkv(1).eval()
    dense.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*below float16's normal range")  # (nothing lost to warn of)
        torch.testing.assert_close(output(loaded, item), output(dense, item))
        for name in rescaled:
            assert torch.equal(loaded.get_submodule(name).dequantize(), dense.get_submodule(name).weight), name
        epmq.save_quantized(loaded, tmp_path / "second")
    first, second = (safetensors.load_file(tmp_path / d / "model.safetensors") for d in ("first", "second"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("targets", ["merged_path", "expert_path"])
def test_an_rwkv_expert_read_after_it_ran_in_eval_mode_is_not_divided_again(targets, gen):
    """An RWKV expert's state dict (or a checkpoint save_pretrained wrote) taken after the expert ran
    in eval mode holds the weights divided for inference, and nothing says so but their size: E-PMQ
    divided them again and aimed the merged model's layers at half (a quarter, ...) of the expert's
    weights. Such an expert is the expert module itself, as the walk takes it (not divided again)."""
    torch.manual_seed(0)
    base = _rwkv(2)
    experts = {t: perturb(base, gen).eval() for t in ("a", "b")}
    item = wider_input("ids", gen)
    for expert in experts.values():
        output(expert, item)  # (its weights now divided)
    calibration = {t: [wider_input("ids", gen)] for t in experts}
    got = []
    for given in (experts, {t: {k: v.clone() for k, v in e.state_dict().items()} for t, e in experts.items()}):
        model = copy.deepcopy(base).eval()
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", calibration=calibration,
                            experts=given, targets=targets, backend="torch", progress=False)
        got.append(output(model, item))
    torch.testing.assert_close(got[1], got[0], rtol=0, atol=0)


def test_an_rwkv_expert_need_not_hold_a_rescaled_layer_the_walk_leaves_out(gen):
    """Whether an RWKV expert's weights are divided already is read of one it holds of those the
    walk reads; one layers= leaves out, which an expert need not hold, is not asked for."""
    torch.manual_seed(0)
    base = _rwkv(2)
    left_out = "rwkv.blocks.2.attention.output"  # (the first of the most divided)
    experts = {t: {k: v for k, v in perturb(base, gen).state_dict().items() if not k.startswith(left_out)}
               for t in ("a", "b")}
    calibration = {t: [wider_input("ids", gen)] for t in experts}
    model = copy.deepcopy(base).eval()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", calibration=calibration,
                        experts=experts, layers=lambda name: not name.startswith(left_out), backend="torch",
                        progress=False)
    assert isinstance(model.get_submodule(left_out), torch.nn.Linear)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_quantized_rwkv_run_in_train_mode_computes_what_it_does_in_eval_mode(method, gen):
    """RWKV multiplies its rescaled layers' weights back in place on its first forward in train
    mode, and stops halving its hidden states: the packed layers dropped the writes, and a
    quantized RWKV in train mode (a fine-tuning step on it) was ~40% off. The packed weights are
    multiplied back (their scales), and divided again in eval mode exactly as they were."""
    torch.manual_seed(0)
    model, item = _rwkv(2).eval(), wider_input("ids", gen)
    kwargs = {} if method == "rtn" else dict(calibration={"a": [wider_input("ids", gen)]}, backend="torch")
    epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method=method, progress=False, **kwargs)
    evaluated = output(model, item)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        trained = output(model.train(), item)
        assert not model.rwkv.layers_are_rescaled
        again = output(model.eval(), item)
    # (the scale changes what LayerNorm's eps adds: 1e-4 of the logits)
    assert rel_err(trained, evaluated) < 1e-3
    assert not [w for w in said if "is dropped" in str(w.message)]
    torch.testing.assert_close(again, evaluated, rtol=0, atol=0)


def _torchvision_vit():
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=4).eval()


def _numbered(names: dict) -> dict:
    """A torchvision ViT's state dict (or any mapping by its names) as its blocks numbered name it."""
    return {k.replace("encoder.layers.encoder_layer_", "encoder.layers."): v for k, v in names.items()}


@pytest.mark.parametrize("method,experts_as,targets", [
    ("rtn", None, None), ("gptq", None, "merged_path"), ("epmq", "modules", "merged_path"),
    ("epmq", "state dicts", "merged_path"), ("epmq", "state dicts", "expert_path")])
def test_blocks_named_by_an_ordered_dict_are_walked_as_the_same_blocks_numbered(method, experts_as, targets, gen,
                                                                                tmp_path):
    """torchvision's ViT holds its blocks in an nn.Sequential built from an OrderedDict (encoder.layers.
    encoder_layer_0, ...), which the walk refused, telling the user to renumber them: the state dict's
    keys then changed, so that the experts' state dicts and the checkpoints no longer matched the model.
    The blocks are walked by their own names: the packed model is the one the walk of its copy with the
    blocks numbered gives (bit for bit; the experts read by either's names), its report names the layers
    by the model's names, and its checkpoint loads into a fresh torchvision ViT."""
    model = _torchvision_vit()
    numbered = copy.deepcopy(model)
    numbered.encoder.layers = torch.nn.Sequential(*numbered.encoder.layers)
    states = {t: {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
              for t in ("a", "b", "c")}
    calibration = {t: [torch.randn(2, 3, 32, 32, generator=gen)] for t in states}
    options = dict(method=method, progress=False, calibration=None if method == "rtn" else calibration)
    if targets is not None:
        options["targets"] = targets
    walked = []
    for net, names in ((model, dict), (numbered, _numbered)):
        experts = None
        if experts_as == "state dicts":
            experts = {t: names(state) for t, state in states.items()}
        elif experts_as == "modules":
            experts = {t: copy.deepcopy(net) for t in states}
            for t, expert in experts.items():
                expert.load_state_dict(names(states[t]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the fp32 models' serving warnings)
            epmq.quantize_model(net, SPEC_4, experts=experts, **options)
        walked.append(net)
    quantized = {name for name, m in model.named_modules() if type(m) is epmq.QuantLinear}
    assert len(quantized) == 12 and all(".encoder_layer_" in name for name in quantized)  # q, k, v, out, 2 MLP
    assert {layer["name"] for layer in model.epmq_report.layers} == quantized
    state, numbered_state = _numbered(model.state_dict()), numbered.state_dict()
    assert state.keys() == numbered_state.keys()
    assert all(torch.equal(t, numbered_state[k]) for k, t in state.items())

    images = torch.randn(2, 3, 32, 32, generator=gen)
    assert torch.equal(model(images), numbered(images))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        epmq.save_quantized(model, tmp_path / "ckpt")
        fresh = epmq.load_quantized(tmp_path / "ckpt", _torchvision_vit())
    assert torch.equal(fresh(images), model(images))


def test_an_expert_of_more_blocks_named_by_an_ordered_dict_than_the_model_is_refused(gen):
    """An expert of more blocks than the model is refused; where the blocks are named by an
    OrderedDict (torchvision's ViT's encoder_layer_0, ...), the block after the last is found by
    its number too (encoder_layer_2)."""
    model = _torchvision_vit()
    deeper = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}
    deeper.update({k.replace("encoder_layer_1.", "encoder_layer_2."): v.clone() for k, v in deeper.items()
                   if ".encoder_layer_1." in k})
    experts = {"a": deeper, "b": dict(model.state_dict())}
    calibration = {t: [torch.randn(2, 3, 32, 32, generator=gen)] for t in experts}
    with pytest.raises(ValueError, match=r"task 'a' .* has more blocks at 'encoder\.layers' than the merged "
                                         r"model's 2"):
        epmq.quantize_model(model, SPEC_4, method="epmq", experts=experts, calibration=calibration, progress=False)
    assert not any(type(m) is epmq.QuantLinear for m in model.modules())


def test_a_checkpoint_of_more_blocks_named_by_an_ordered_dict_than_the_model_is_refused(tmp_path):
    """open_state (the benches' experts and base) refuses a checkpoint of more blocks than the model,
    found by the tensor of the block after the last; that block was named by the stack's length
    (encoder.layers.2), so where an OrderedDict named the blocks (torchvision's ViT's encoder_layer_0,
    ...) the deeper checkpoint was read in silence. Its name follows the last block's (encoder_layer_2)."""
    import collections

    from safetensors.torch import save_file

    from epmq.checkpoint_io import CheckpointError, open_state

    model = _torchvision_vit()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.update({k.replace("encoder_layer_1.", "encoder_layer_2."): v.clone() for k, v in state.items()
                  if ".encoder_layer_1." in k})
    save_file(state, str(tmp_path / "deeper.safetensors"))
    with pytest.raises(CheckpointError, match=r"more blocks at 'encoder\.layers' than the model's 2 "
                                              r"\('encoder\.layers\.encoder_layer_2\.ln_1\.weight'\)"):
        open_state(tmp_path / "deeper.safetensors", model, what="expert")
    # (names out of order: the one after the last, fc3, is the model's own)
    for model in (model, torch.nn.Sequential(collections.OrderedDict(
            (name, torch.nn.Linear(4, 4)) for name in ("fc1", "fc3", "fc2")))):
        save_file(model.state_dict(), str(tmp_path / "same.safetensors"))
        assert set(open_state(tmp_path / "same.safetensors", model, what="expert")) == set(model.state_dict())


def test_a_checkpoint_of_blocks_named_by_an_ordered_dict_names_them_in_its_rules(gen, tmp_path):
    """A model quantized in part holds rules in its quantize config (``dynamic``: the linears left in
    full precision, those of other bits; ``modules_in_block_to_quantize``) that name the blocks by their
    index: of torchvision's ViT, whose blocks an OrderedDict named (encoder.layers.encoder_layer_0, ...),
    they named encoder.layers.0.*, modules the model has not. Each rule names the modules it is of by
    the model's names, as the numbered copy's names its own (a rule of every block by any name)."""
    model = _torchvision_vit()
    numbered = copy.deepcopy(model)
    numbered.encoder.layers = torch.nn.Sequential(*numbered.encoder.layers)
    configs = {}
    for net, where in ((model, "named"), (numbered, "numbered")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the checkpoint's serving warnings)
            epmq.quantize_model(net, SPEC_4, method="rtn", layers=r"(encoder_layer_)?0\.self_attention|mlp\.0",
                                progress=False)
            epmq.quantize_model(net, epmq.QuantSpec(bits=8, group_size=16), method="rtn",
                                layers=r"layers\.(encoder_layer_)?1\.self_attention\.out_proj", progress=False)
            epmq.save_quantized(net, tmp_path / where)
        configs[where] = json.loads((tmp_path / where / "quantize_config.json").read_text())
    modules = dict(model.named_modules())
    rules = configs["named"]["dynamic"]
    assert {r"-:encoder\.layers\.[^.]+\.mlp\.3$", r"-:encoder\.layers\.encoder_layer_1\.self_attention\.q_proj$",
            r"+:encoder\.layers\.encoder_layer_1\.self_attention\.out_proj$"} <= rules.keys()
    for rule, override in rules.items():
        named = [name for name, m in modules.items() if re.match(rule[2:], name)]
        assert named, rule
        if rule.startswith("-:"):
            assert all(type(modules[name]) is torch.nn.Linear for name in named), rule
        else:
            assert all(modules[name].bits == override["bits"] == 8 for name in named), rule
    listed = [name for group in configs["named"]["modules_in_block_to_quantize"] for name in group]
    assert listed and all(type(modules[name]) is epmq.QuantLinear for name in listed)
    numbered_rules = {re.sub(r"layers\\\.(\d+)\\\.", r"layers\\.encoder_layer_\1\\.", rule)
                      .replace(r"\d+", "[^.]+"): override for rule, override in configs["numbered"]["dynamic"].items()}
    assert rules == numbered_rules
    assert listed == [re.sub(r"layers\.(\d+)\.", r"layers.encoder_layer_\1.", name)
                      for group in configs["numbered"]["modules_in_block_to_quantize"] for name in group]


@pytest.mark.parametrize("layers,stack", [(r"layers\.(encoder_layer_)?1\.", "encoder.layers"),
                                          (r"layers\.(encoder_layer_)?1\.mlp", "encoder.layers"), ("and head", "")])
def test_a_checkpoint_of_blocks_named_by_an_ordered_dict_names_their_stack_for_transformers(layers, stack, tmp_path):
    """``block_name_to_quantize`` is the stack transformers' GPTQ loader (optimum) builds the GPTQ layers
    under. One block of torchvision's ViT quantized, it was cut at the first number of the packed layers'
    names, which an OrderedDict's block names hold none of: the block itself (encoder.layers.encoder_layer_1,
    whose prefix encoder_layer_10 would share) or a module in it (...encoder_layer_1.mlp). It is the stack,
    as of the same blocks numbered; and with a packed head beside them (no stack: the list of packed
    layers' names past their block, which the numbered ones' list was), their names past the block's."""
    from epmq.walker import _quant_linear

    model = _torchvision_vit()
    numbered = copy.deepcopy(model)
    numbered.encoder.layers = torch.nn.Sequential(*numbered.encoder.layers)
    for net, where in ((model, "named"), (numbered, "numbered")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the checkpoint's serving warnings)
            epmq.quantize_model(net, SPEC_4, method="rtn", layers=None if layers == "and head" else layers,
                                progress=False)
            if layers == "and head":
                net.heads.head = _quant_linear(epmq.quant.rtn(net.heads.head.weight.detach(), SPEC_4), net.heads.head)
            epmq.save_quantized(net, tmp_path / where)
    q, numbered_q = (json.loads((tmp_path / where / "quantize_config.json").read_text())
                     for where in ("named", "numbered"))
    assert q["block_name_to_quantize"] == numbered_q["block_name_to_quantize"] == stack
    assert q["modules_in_block_to_quantize"] == [[re.sub(r"layers\.(\d+)\.", r"layers.encoder_layer_\1.", name)
                                                  for name in group]
                                                 for group in numbered_q["modules_in_block_to_quantize"]]
