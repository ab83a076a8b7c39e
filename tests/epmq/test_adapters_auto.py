"""``epmq.adapters.AUTO``: blocks found by structure, their calls taken from the model's own.

The claim is that it needs no knowledge of a family: on the families the built-in adapters were
written for, it quantizes bit for bit as they do; on models no adapter lists, it walks them as
any family (tests/epmq/test_walker_archs.py, ``WIDER``); what it cannot walk it refuses."""

import copy
import warnings

import pytest
import torch
import transformers
from torch import nn

import epmq
from epmq.adapters import AUTO, find_towers
from test_adapters import ToyAdapter, ToyNet, ScaledUnit
from test_walker_calibration import tiny_wav2vec2_large
from test_walker_models import WIDER, build, inputs, wider_input

SPEC = epmq.QuantSpec(bits=4, group_size=16)


def _packed(model) -> dict:
    return {name: (m.qweight, m.scales, m.qzeros) for name, m in model.named_modules()
            if isinstance(m, epmq.QuantLinear)}


def _assert_same_packing(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for x, y in zip(a[name], b[name]):
            assert torch.equal(x, y), name


# Built-in adapters and what each relies on that AUTO must find for itself: a decoder's rotary
# tables and mask per layer (Llama), T5's position bias handed on by the first block, GPT-2's
# Conv1D, BART's encoder states, Qwen3-MoE's fused experts, Falcon's tuple outputs, CLIP's two
# towers, EVA's q/v bias, DeBERTa-v2-xlarge's convolution between layers (the replayed walk).
FAMILIES = ["llama", "t5", "gpt2", "bart", "qwen3_moe", "falcon", "hf_clip", "timm_eva", "deberta_v2_conv"]


def _family(arch, gen):
    if arch in WIDER:
        build_model, kind = WIDER[arch]
        torch.manual_seed(0)
        return build_model().eval(), {t: [wider_input(kind, gen) for _ in range(2)] for t in ("a", "b")}
    return build(arch), {t: inputs(arch, 2, gen) for t in ("a", "b")}


@pytest.mark.parametrize("arch", FAMILIES)
def test_auto_quantizes_each_family_as_its_own_adapter_does(arch, gen):
    """E-PMQ through ``AUTO`` packs every layer bit for bit as through the family's adapter, and
    replays the model's computation between blocks where the family's adapter does."""
    base, calibration = _family(arch, gen)
    experts = {t: {k: v + 0.01 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                   for k, v in base.state_dict().items()} for t in calibration}
    walked = {}
    for which in (None, AUTO):
        model = copy.deepcopy(base)
        epmq.quantize_model(model, SPEC, method="epmq", calibration=calibration, experts=experts, backend="torch",
                            adapter=which, progress=False)
        walked[which] = model
    assert walked[AUTO].epmq_report.adapter == "auto" != walked[None].epmq_report.adapter
    assert walked[AUTO].epmq_report.replayed == walked[None].epmq_report.replayed
    _assert_same_packing(_packed(walked[AUTO]), _packed(walked[None]))


def test_auto_quantizes_open_clip_attention_as_three_projections_of_the_fused_one(gen):
    """``nn.MultiheadAttention`` becomes q, k and v linears (whether a block calls it on one
    tensor is not known beforehand); they read one input, so they pack as the row blocks of the
    fused ``in_proj`` that the open_clip adapter quantizes."""
    base, calibration = build("open_clip_vit"), {"a": inputs("open_clip_vit", 2, gen)}
    known, auto = copy.deepcopy(base), copy.deepcopy(base)
    epmq.quantize_model(known, SPEC, method="gptq", calibration=calibration, backend="torch", progress=False)
    epmq.quantize_model(auto, SPEC, method="gptq", calibration=calibration, backend="torch", progress=False,
                        adapter=AUTO)
    for i, block in enumerate(auto.transformer.resblocks):
        fused = known.transformer.resblocks[i].attn.in_proj
        for field in ("qweight", "scales", "qzeros"):
            parts = [getattr(getattr(block.attn, p), field) for p in ("q_proj", "k_proj", "v_proj")]
            assert torch.equal(torch.cat(parts, dim=1), getattr(fused, field))
    x = inputs("open_clip_vit", 1, gen)[0]
    torch.testing.assert_close(auto(x), known(x), rtol=0, atol=0)


class ScaledBlock(ScaledUnit):
    """``ScaledUnit`` under a name ``AUTO`` takes for a block."""


def _auto_packs_as(base, adapter, gen):
    """``base`` (taking ``[16, 8]`` inputs) quantized by GPTQ through ``AUTO``, asserted to pack
    as through ``adapter``."""
    calibration = {"only": [torch.randn(16, 8, generator=gen) for _ in range(2)]}
    by_hand, auto = copy.deepcopy(base), copy.deepcopy(base)
    epmq.quantize_model(by_hand, SPEC, method="gptq", calibration=calibration, backend="torch", progress=False,
                        adapter=adapter)
    epmq.quantize_model(auto, SPEC, method="gptq", calibration=calibration, backend="torch", progress=False)
    assert auto.epmq_report.adapter == "auto"
    _assert_same_packing(_packed(auto), _packed(by_hand))
    return auto


def test_auto_records_what_each_block_is_handed_by_the_one_before(gen, tmp_path):
    """The toy family hands each block a gain the one before returned: the registered
    ``ToyAdapter`` says so (``next_kwargs``); ``AUTO`` runs the blocks while it records their
    calls, so each is recorded with the gain the model gives it. Both pack alike; the
    checkpoint loads into a fresh model to the same outputs."""
    torch.manual_seed(0)
    auto = _auto_packs_as(ToyNet(block=ScaledBlock).eval(), ToyAdapter("toy", block_types=("ScaledBlock",)), gen)
    epmq.save_quantized(auto, tmp_path / "toy")
    fresh = epmq.load_quantized(tmp_path / "toy", ToyNet(block=ScaledBlock))
    x = torch.randn(16, 8, generator=gen)
    torch.testing.assert_close(fresh(x), auto(x), rtol=0, atol=0)


class ValueBlock(nn.Module):
    """A value residual (ResFormer, RWKV-7): the first block's value projection is handed on to
    every later block, each returning it beside its hidden states."""

    def __init__(self, width=32):
        super().__init__()
        self.value = nn.Linear(width, width)
        self.mix = nn.Linear(width, width)

    def forward(self, x, v_first=None):
        v = self.value(x)
        v_first = v if v_first is None else v_first
        return x + self.mix(torch.tanh(v + v_first)), v_first


class ValueNet(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.layers = nn.ModuleList([ValueBlock(width) for _ in range(3)])

    def forward(self, x):
        h, v_first = self.embed(x), None
        for layer in self.layers:
            h, v_first = layer(h, v_first=v_first)
        return h


class ValueAdapter(epmq.Adapter):
    def next_kwargs(self, kwargs, output):
        return dict(kwargs, v_first=output[1])

    def passthrough(self, hidden):
        return hidden, None


def test_auto_hands_on_what_a_quantized_block_returns(gen):
    """What a block hands the next one among its outputs (the first block's values, computed by
    a linear being quantized) is taken from the quantized block's output, as an adapter's
    ``next_kwargs`` would take it, not from the float model's: bit for bit the same packing."""
    torch.manual_seed(0)
    _auto_packs_as(ValueNet().eval(), ValueAdapter("values", block_types=("ValueBlock",)), gen)


@pytest.mark.parametrize("batch_first,norm_first", [(True, False), (False, True)])
def test_a_plain_torch_transformer_encoder_is_walked(batch_first, norm_first, gen, tmp_path):
    """A model of torch's own ``nn.TransformerEncoder``: its attention's fused projection is
    rebuilt as linears (out of the fused fast path, which would read ``in_proj_weight``), every
    linear of every layer packed, 8 bits within 1% of float, and the checkpoint loads into a
    fresh model to the same outputs."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first,
                                               norm_first=norm_first)
            self.embed = nn.Embedding(64, 32)
            self.encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
            self.head = nn.Linear(32, 5)

        def forward(self, ids):
            x = self.embed(ids)
            x = x if batch_first else x.transpose(0, 1)
            return self.head(self.encoder(x))

    torch.manual_seed(0)
    model = Net().eval()
    ids = torch.randint(0, 64, (2, 8), generator=gen)
    reference = model(ids).detach()
    calibration = {"a": [torch.randint(0, 64, (4, 8), generator=gen) for _ in range(2)]}
    epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method="gptq", calibration=calibration,
                        backend="torch", progress=False)
    names = [layer["name"] for layer in model.epmq_report.layers]
    assert sorted(names) == sorted(f"encoder.layers.{i}.{rel}" for i in range(3) for rel in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "linear1", "linear2"))
    assert float((model(ids) - reference).norm() / reference.norm()) < 0.01
    epmq.save_quantized(model, tmp_path / "net")
    torch.manual_seed(1)
    fresh = epmq.load_quantized(tmp_path / "net", Net().eval())
    torch.testing.assert_close(fresh(ids), model(ids), rtol=0, atol=0)


def test_a_torch_encoder_on_its_nested_tensor_path_takes_a_padding_mask(gen, tmp_path):
    """torch's ``nn.TransformerEncoder`` as built by default (nested tensors on), in eval with a
    padding mask: its fast path reads the fused ``in_proj_weight`` the rebuilt attention lacks,
    so the walk turns it off; the quantized model, and the checkpoint loaded into a fresh one,
    run padded batches, their unpadded positions within 1% of float at 8 bits."""

    def net():
        return nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2).eval()

    torch.manual_seed(0)
    model = net()
    x = torch.randn(2, 8, 32, generator=gen)
    pad = torch.tensor([[False] * 8, [False] * 5 + [True] * 3])
    with torch.no_grad():
        reference = model(x, src_key_padding_mask=pad)
        epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method="gptq",
                            calibration={"a": [torch.randn(4, 8, 32, generator=gen)]}, backend="torch", progress=False)
        got = model(x, src_key_padding_mask=pad)
        keep = ~pad
        assert float((got[keep] - reference[keep]).norm() / reference[keep].norm()) < 0.01
        epmq.save_quantized(model, tmp_path / "net")
        torch.manual_seed(1)
        fresh = epmq.load_quantized(tmp_path / "net", net())
        torch.testing.assert_close(fresh(x, src_key_padding_mask=pad), got, rtol=0, atol=0)


def test_a_plain_torch_encoder_decoder_is_walked(gen):
    """torch's ``nn.Transformer``: the encoder, then the decoder, whose layers read the encoder's
    output (``memory``, recorded per layer) through their cross-attention: every linear packed
    (q, k, v of both attentions), 8 bits within 2% of float."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(64, 32)
            self.transformer = nn.Transformer(32, 4, 2, 2, 64, dropout=0.0, batch_first=True)
            self.head = nn.Linear(32, 64)

        def forward(self, src, tgt):
            causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
            return self.head(self.transformer(self.embed(src), self.embed(tgt), tgt_mask=causal, tgt_is_causal=True))

    torch.manual_seed(0)
    model = Net().eval()

    def item():
        return torch.randint(0, 64, (2, 7), generator=gen), torch.randint(0, 64, (2, 5), generator=gen)

    test = item()
    reference = model(*test).detach()
    epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method="gptq",
                        calibration={"a": [item() for _ in range(3)]}, backend="torch", progress=False)
    assert model.epmq_report.adapter == "auto" and not model.epmq_report.skipped
    assert len(model.epmq_report.layers) == 2 * 6 + 2 * 10
    assert float((model(*test).detach() - reference).norm() / reference.norm()) < 0.02  # (measured 0.006)


class DictBlock(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, x):
        return {"hidden": x + self.linear(x)}


class ShrinkBlock(DictBlock):
    def forward(self, x):
        return x[..., :16] if x.shape[-1] > 16 else x + self.linear(x)[..., :16]


class CachingBlock(DictBlock):
    def forward(self, x, past_key_values):
        past_key_values.append(x)  # (the walk calls blocks without the model's cache)
        return x + self.linear(x)


class MemoryBlock(DictBlock):
    def forward(self, x, memory):
        memory.add_(x.mean(dim=0))  # (a recurrent state under a name no adapter gives it)
        return x + self.linear(x + memory)


class _Blocks(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.layers = nn.ModuleList([block() for _ in range(2)])
        self.kind = block

    def forward(self, x):
        cache, memory = [], torch.zeros(x.shape[-1])
        for layer in self.layers:
            x = (layer(x, past_key_values=cache) if self.kind is CachingBlock
                 else layer(x, memory=memory) if self.kind is MemoryBlock else layer(x))
            x = x["hidden"] if isinstance(x, dict) else x
        return x


@pytest.mark.parametrize("block,wrong", [(DictBlock, "return a dict"), (ShrinkBlock, r"return shape \(4, 16\)"),
                                         # (a cache it needs, handed as the model hands it, and written)
                                         (CachingBlock, "block 0 writes in place into its argument 'past_key_values'"),
                                         (MemoryBlock, "block 0 writes in place into its argument 'memory'")])
def test_auto_refuses_blocks_that_do_not_return_their_input_s_shape(block, wrong, gen):
    """Blocks whose output is no hidden states of their input's shape (alone, or first of a
    tuple), that fail when called as the walk will call them, or that write into what they are
    given (so that no two calls agree) cannot be walked one by one: refused, naming them and
    what is wrong."""
    model = _Blocks(block).eval()
    with pytest.raises(ValueError, match=rf"blocks at 'layers' \(auto\) are not blocks .*{wrong}.*register an"):
        epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": [torch.randn(4, 32, generator=gen)]},
                            backend="torch", progress=False)
    assert not _packed(model)  # (nothing left half done)


def test_auto_is_a_fallback_and_finds_outermost_stacks():
    """A model in which a registered adapter finds blocks is walked by it alone (other stacks
    are warned about, as before); ``AUTO`` takes the outermost stacks of ``*Layer`` / ``*Block``
    modules holding linears, not lists of other modules or lists nested in blocks."""
    llama = build("llama")
    llama.extra = nn.ModuleList([ScaledBlock(32) for _ in range(2)])
    assert [(a.name, [n for n, _ in s]) for a, s in find_towers(llama)] == [("hf-decoder", ["model.layers"])]
    assert [n for n, _ in AUTO.stacks(llama)] == ["model.layers", "extra"]
    swin = WIDER["swin"][0]()
    assert [n for n, _ in AUTO.stacks(swin)] == ["encoder.layers.0.blocks", "encoder.layers.1.blocks"]
    heads = nn.Module()
    heads.heads = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
    heads.norms = nn.ModuleList([nn.LayerNorm(4) for _ in range(2)])
    assert AUTO.stacks(heads) == []


@pytest.mark.parametrize("arch,routes", [("llama", False), ("phi3", False), ("qwen3_moe", True), ("mixtral", True)])
def test_auto_knows_a_model_that_routes_tokens(arch, routes, gen):
    """Routed experts (fused 3-D parameters or a list named ``experts``) make ``AUTO`` route
    tokens, so only the merged path is a defined target (Phi-3's fused ``gate_up_proj`` is a
    linear, not experts)."""
    model = build(arch)
    assert AUTO.routes(AUTO.stacks(model)) is routes
    if routes:
        with pytest.raises(ValueError, match="auto routes tokens to experts"):
            epmq.quantize_model(model, SPEC, method="gptq", targets="fp_path", calibration={"a": inputs(arch, 1, gen)},
                                backend="torch", adapter=AUTO, progress=False)


class PatchBlock(nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, 64), nn.Linear(64, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class ToyVLM(nn.Module):
    """An image tower of blocks no adapter lists, its features prepended to a Llama's tokens."""

    def __init__(self):
        super().__init__()
        self.patches = nn.Linear(12, 32)
        self.vision = nn.ModuleList([PatchBlock() for _ in range(2)])
        self.lm = build("llama")

    def forward(self, pixels, input_ids):
        v = self.patches(pixels)
        for block in self.vision:
            v = block(v)
        text = self.lm.get_input_embeddings()(input_ids)
        return self.lm(inputs_embeds=torch.cat([v, text], dim=1)).logits


def test_an_unknown_tower_beside_a_known_one_is_walked_when_auto_is_asked_for(gen):
    """By default only the language model is walked (a registered adapter knows it) and the
    image tower is named in a warning that says how to walk it; ``adapter=[HF_DECODERS, AUTO]``
    walks both, the image tower first, and the language model is calibrated on the quantized
    tower's features."""
    torch.manual_seed(0)
    base = ToyVLM().eval()
    calibration = {"a": [(torch.randn(2, 4, 12, generator=gen), torch.randint(3, 64, (2, 6), generator=gen))
                         for _ in range(2)]}
    spec = epmq.QuantSpec(bits=8, group_size=16)
    model = copy.deepcopy(base)
    with pytest.warns(UserWarning, match=r"blocks at vision \(PatchBlock\).*adapter=\[epmq\.adapters\.HF_DECODERS, "
                                         r"epmq\.adapters\.AUTO\]"):
        epmq.quantize_model(model, spec, method="gptq", calibration=calibration, backend="torch", progress=False)
    assert not any(name.startswith("vision.") for name in _packed(model))
    both = copy.deepcopy(base)
    epmq.quantize_model(both, spec, method="gptq", calibration=calibration, backend="torch", progress=False,
                        adapter=[AUTO, epmq.adapters.HF_DECODERS])
    assert both.epmq_report.adapter == "hf-decoder+auto"
    assert {name.partition(".")[0] for name in _packed(both)} == {"vision", "lm"}
    # (the language model's statistics: those of the quantized tower's features, unlike the first
    # walk's; its losses, not its codes, tell: at 8 bits the tower's features move so little that
    # every code may stay, as with EPMQ_TEST_SEED=899576516)
    lm_alone, lm = _packed(model), {k: v for k, v in _packed(both).items() if k.startswith("lm.")}
    assert lm.keys() == lm_alone.keys()
    losses = [{e["name"]: e["loss"] for e in m.epmq_report.layers if e["name"].startswith("lm.")}
              for m in (model, both)]
    assert losses[0].keys() == losses[1].keys() and losses[0] != losses[1]
    x = calibration["a"][0]
    assert float((both(*x) - base(*x)).norm() / base(*x).norm()) < 0.01
    with pytest.raises(ValueError, match="AUTO finds no blocks in LlamaForCausalLM that the other adapters"):
        epmq.quantize_model(build("llama"), spec, method="rtn", progress=False,
                            adapter=[epmq.adapters.HF_DECODERS, AUTO])


class KVCacheBlock(DictBlock):
    def forward(self, x, kv_cache=None):
        if kv_cache is not None:
            kv_cache.append(x)
        return x + self.linear(x)


def test_a_cache_under_a_known_name_is_withheld_from_the_blocks(gen):
    """A block given a generation cache (ChatGLM's ``kv_cache``, Mamba's ``cache_params``, RWKV's
    ``state``, ...) gets None in the walk, so it writes nothing the next call would read."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([KVCacheBlock() for _ in range(2)])

        def forward(self, x):
            cache = []
            for layer in self.layers:
                x = layer(x, kv_cache=cache)
            return x

    model = Net().eval()
    epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": [torch.randn(4, 32, generator=gen)]},
                        backend="torch", progress=False)
    assert len(_packed(model)) == 2


class _Looped(nn.Module):
    """Its blocks run ``rounds`` times over: weights shared across depth (``gains``: one block
    called with another argument each time)."""

    def __init__(self, rounds, blocks=2, gains=False):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.layers = nn.ModuleList([ScaledBlock(32) for _ in range(blocks)])
        self.rounds, self.gains = rounds, gains

    def forward(self, x):
        x = self.embed(x)
        for r in range(self.rounds):
            for layer in self.layers:
                x = layer(x, gain=0.5 ** r if self.gains else 1.0)[0]
        return x


@pytest.mark.parametrize("model,repeated,warned", [
    (lambda: _Looped(1), {}, None),
    (lambda: _Looped(3), {"layers.0": 3, "layers.1": 3}, "as a group 3 times in a row"),
    (lambda: _Looped(3, blocks=1, gains=True), {"layers.0": 3}, "again after the last one (layers.0: 3 calls"),
    # one block called in a row on its own output: solved on every call (test_walker_archs, ALBERT)
    (lambda: _Looped(3, blocks=1), {"layers.0": 3}, None),
])
def test_blocks_called_again_after_the_last_one_are_said(model, repeated, warned, gen, recwarn, monkeypatch):
    """A block the model calls again after its stack's last block (weights shared across depth)
    is reported with its calls. The one block of a stack called in a row, each call on the last
    one's output with the same arguments, is solved on the inputs of every call; other blocks on
    their first call's (a group of blocks run in rounds: its first round's), which is warned
    about: never silent."""
    from test_walker_models import assert_same_statistics, hooked_inputs, walked_inputs

    model = model().eval()
    items = [torch.randn(4, 8, generator=gen) for _ in range(2)]
    hand = hooked_inputs(model, "layers.0.up", [{"x": x} for x in items])
    seen = walked_inputs(monkeypatch)
    epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": items}, backend="torch", progress=False,
                        layers=lambda name: name == "layers.0.up")
    assert model.epmq_report.repeated == repeated
    said = [str(w.message) for w in recwarn if "again after the last one" in str(w.message)
            or "times in a row" in str(w.message)]
    assert len(said) == (warned is not None) and all(warned in s for s in said)
    if warned:  # (the first call's inputs: the first of each item's calls)
        hand = hand[::3]
    assert_same_statistics(seen, hand)


class _Rounds(nn.Module):
    """A group of two blocks run ``rounds`` times, then a block of its own: the second stack's
    input has been through every round of the first."""

    def __init__(self, rounds=2):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.first = nn.ModuleList([ScaledBlock(32) for _ in range(2)])
        self.second = nn.ModuleList([ScaledBlock(32)])
        self.rounds = rounds

    def forward(self, x):
        x = self.embed(x)
        for _ in range(self.rounds):
            for layer in self.first:
                x = layer(x, gain=1.0)[0]
        return self.second[0](x, gain=1.0)[0]


def test_a_group_run_in_rounds_hands_on_what_every_round_makes(gen, monkeypatch):
    """The stack after a group run in rounds is calibrated on what the quantized group makes in
    all its rounds, as the model runs it (it got one round's output); the target streams, which
    cannot replay the rounds, are refused."""
    from test_walker_models import assert_same_statistics, hooked_inputs, walked_inputs

    model = _Rounds().eval()
    items = [torch.randn(4, 8, generator=gen) for _ in range(2)]
    with pytest.raises(ValueError, match=r"runs the blocks at 'first' as a group 2 times in a row \(weights shared "
                                         r"across depth\), which the target stream cannot replay"):
        epmq.quantize_model(copy.deepcopy(model), SPEC, method="gptq", calibration={"a": items}, backend="torch",
                            progress=False, targets="fp_path")
    seen = walked_inputs(monkeypatch)
    with pytest.warns(UserWarning, match="as a group 2 times in a row"):
        epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": items}, backend="torch", progress=False,
                            layers=lambda name: name.startswith("first.") or name == "second.0.up")
    assert model.epmq_report.repeated == {"first.0": 2, "first.1": 2}
    # the quantized model's own forward: what second.0.up reads
    hand = hooked_inputs(model, "second.0.up", [{"x": x} for x in items])
    n_rows = sum(x.shape[0] for x in hand)
    assert_same_statistics(seen[-len(hand):], hand)
    assert sum(x.shape[0] for x in seen[-len(hand):]) == n_rows


class _OneBlock(nn.Module):
    """An embedding and one block, which the subclasses' forwards call in loops."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.layers = nn.ModuleList([ScaledBlock(32)])


class _Halting(_OneBlock):
    """One block called until its output has moved far enough (at most 6 calls): how often
    depends on what the block returns."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.layers[0].down.bias.fill_(1.0)

    def forward(self, x):
        x = self.embed(x)
        start = x.mean()
        for _ in range(6):
            x = self.layers[0](x, gain=1.0)[0]
            if x.mean() > start + 1.5:
                break
        return x


class _VarLoop(_OneBlock):
    """One block called ``rounds`` times, a number each sample gives."""

    def forward(self, x, rounds):
        x = self.embed(x)
        for _ in range(rounds):
            x = self.layers[0](x, gain=1.0)[0]
        return x


class _Counter(_OneBlock):
    """One block called three times with a step counter the model advances in place."""

    def forward(self, x):
        x = self.embed(x)
        step = torch.ones(())
        for _ in range(3):
            x = self.layers[0](x, gain=step)[0]
            step += 1
        return x


def test_calls_counted_as_the_model_makes_them(gen, monkeypatch):
    """How often a block is called again is counted with the block itself running (a count its
    outputs decide was taken from identity stand-ins: 6 for 2), on each task's first sample and
    every sample once a repeat was seen; a count that depends on the sample, and arguments the
    model advances in place between calls, are refused by name (both were solved wrong)."""
    from test_walker_models import assert_same_statistics, hooked_inputs, walked_inputs

    model = _Halting().eval()
    items = [torch.randn(4, 8, generator=gen) for _ in range(2)]
    calls = []
    handle = model.layers[0].register_forward_pre_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model(items[0])
    handle.remove()
    hand = hooked_inputs(model, "layers.0.up", [{"x": x} for x in items])
    seen = walked_inputs(monkeypatch)
    epmq.quantize_model(model, SPEC, method="gptq", calibration={"a": items}, backend="torch", progress=False,
                        layers=lambda name: name == "layers.0.up")
    assert model.epmq_report.repeated == {"layers.0": len(calls)} and 1 < len(calls) < 6
    assert_same_statistics(seen, hand)
    # (seen from a task's first sample, and from a later one followed past the last block to the model's next
    # module call: one repeating where its task's first did not was walked on its first round alone, unsaid)
    items = [{"x": torch.randn(4, 8, generator=gen), "rounds": r} for r in (3, 1)]
    with pytest.raises(ValueError, match=r"calls the blocks at 'layers' a number of times that depends on its "
                                         r"input \(calibration\['a'\] item 0: block 0: 3 calls; calibration\['a'\] "
                                         r"item 1: each block once\)"):
        epmq.quantize_model(_VarLoop().eval(), SPEC, method="gptq", calibration={"a": items}, backend="torch",
                            progress=False)
    with pytest.raises(ValueError, match=r"\(calibration\['a'\] item 0: each block once; calibration\['a'\] "
                                         r"item 1: block 0: 3 calls\)"):
        epmq.quantize_model(_VarLoop().eval(), SPEC, method="gptq", calibration={"a": items[::-1]}, backend="torch",
                            progress=False)
    with pytest.raises(ValueError, match=r"\(calibration\['a'\] item 0: each block once; calibration\['b'\] "
                                         r"item 0: block 0: 3 calls\)"):
        epmq.quantize_model(_VarLoop().eval(), SPEC, method="gptq", calibration={"a": items[1:], "b": items[:1]},
                            backend="torch", progress=False)
    with pytest.raises(ValueError, match=r"calibration\['a'\] item 0: the model writes in place into 'gain', an "
                                         r"argument of block 0 at 'layers', after that block's call"):
        epmq.quantize_model(_Counter().eval(), SPEC, method="gptq", calibration={"a": [torch.randn(4, 8)]},
                            backend="torch", progress=False)


class UnlistedStableLayerNorm(transformers.models.wav2vec2.modeling_wav2vec2.Wav2Vec2EncoderLayerStableLayerNorm):
    """Wav2Vec2's large encoder layer under a name no adapter lists (HF_ENCODERS lists Wav2Vec2's own),
    ending in neither Layer nor Block."""


def unlisted(model):
    """``model`` with its Wav2Vec2 large encoder's layers of the class no adapter lists."""
    for module in model.modules():
        if type(module).__name__ == "Wav2Vec2EncoderLayerStableLayerNorm":
            module.__class__ = UnlistedStableLayerNorm
    return model


def _walked_by_auto(config, gen, n_linears):
    """A Wav2Vec2 large encoder of ``config``, found by AUTO as one stack (encoder.layers) and
    quantized by GPTQ: each of its ``n_linears`` linears in the report."""
    import transformers

    torch.manual_seed(0)
    model = unlisted(transformers.Wav2Vec2Model(config).eval())
    assert [(a.name, [n for n, _ in s]) for a, s in find_towers(model)] == [("auto", ["encoder.layers"])]
    linears = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.layers"))
    calibration = {"a": [{"input_values": torch.randn(2, 640, generator=gen)}]}
    epmq.quantize_model(model, SPEC, method="gptq", calibration=calibration, backend="torch", progress=False)
    assert sorted(e["name"] for e in model.epmq_report.layers) == linears and len(linears) == n_linears
    return model


def test_repeated_blocks_named_otherwise_are_found_by_structure(gen):
    """Wav2Vec2's, HuBERT's and WavLM's large encoders (do_stable_layer_norm) repeat a
    Wav2Vec2EncoderLayerStableLayerNorm, whose name ends in neither Layer nor Block: no adapter
    found any block ('no epmq adapter knows Wav2Vec2Model'). Where no block is named so, a list
    of two or more modules of one class holding linears is a stack; lists of one-off or
    linear-free modules (its convolutional feature encoder) are not."""
    config = tiny_wav2vec2_large()
    model = _walked_by_auto(config, gen, 12)
    assert model.epmq_report.adapter == "auto"
    heads = nn.Module()
    heads.mixed = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)), nn.Sequential(nn.LayerNorm(4))])
    assert AUTO.stacks(heads) == []
    heads.one = nn.ModuleList([ScaledUnit(4)])  # (one module: a model of one layer, where nothing repeats)
    assert [n for n, _ in AUTO.stacks(heads)] == ["one"]
    heads.units = nn.ModuleList([ScaledUnit(4) for _ in range(2)])
    assert [n for n, _ in AUTO.stacks(heads)] == ["units"]


def test_a_one_layer_encoder_of_blocks_named_otherwise_is_walked(gen):
    """A one-layer Wav2Vec2 large encoder (a tiny or distilled model of do_stable_layer_norm) was
    refused as 'no epmq adapter knows Wav2Vec2Model', where the same model of two layers is walked:
    its list holds one Wav2Vec2EncoderLayerStableLayerNorm, which repeats nothing. Where no list
    repeats a module, a list of one module holding linears is a stack, alone or beside GPT-2."""
    import transformers

    config = tiny_wav2vec2_large()
    config.num_hidden_layers = 1
    _walked_by_auto(config, gen, 6)
    decoder = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, bos_token_id=0,
                                      eos_token_id=0, add_cross_attention=True, is_decoder=True)
    both = transformers.SpeechEncoderDecoderConfig.from_encoder_decoder_configs(config, decoder)
    towers = find_towers(unlisted(transformers.SpeechEncoderDecoderModel(both)), adapter=[epmq.adapters.GPT2, AUTO])
    assert [(a.name, [n for n, _ in s]) for a, s in towers] == [
        ("hf-gpt2", ["decoder.transformer.h"]), ("auto", ["encoder.encoder.layers"])]


def test_a_one_layer_tower_no_adapter_walks_is_warned_of(gen):
    """Beside GPT-2, a Wav2Vec2 large encoder's layers stay in full precision unless AUTO is asked
    for, as the walk's warning says; of one layer, that warning said nothing (it named lists of two
    or more), and the encoder stayed in full precision in silence. A list of one module holding
    linears is named too."""
    import warnings

    import transformers

    encoder = tiny_wav2vec2_large()
    encoder.num_hidden_layers = 1
    decoder = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, bos_token_id=0,
                                      eos_token_id=0, add_cross_attention=True, is_decoder=True)
    config = transformers.SpeechEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    model = unlisted(transformers.SpeechEncoderDecoderModel(config).eval())
    with pytest.warns(UserWarning, match=r"no adapter knows the blocks at encoder\.encoder\.layers "
                                         r"\(UnlistedStableLayerNorm\), which stay in full precision"):
        epmq.adapters.warn_other_towers(model, find_towers(model))
    with warnings.catch_warnings():  # (walked beside GPT-2: nothing left)
        warnings.simplefilter("error")
        epmq.adapters.warn_other_towers(model, find_towers(model, adapter=[epmq.adapters.GPT2, AUTO]))


@pytest.mark.parametrize("stable", [False, True])
def test_wavlms_attention_projections_handed_to_torch_as_weights_are_quantized(gen, tmp_path, stable):
    """WavLM's attention hands its q, k, v and out projections' weights to torch's
    F.multi_head_attention_forward instead of calling them: the walk saw them never called and
    left 8 of its 14 linears in full precision (warned), the attention's weights all. Its attention
    calls them, the same math (outputs and attention weights within float32's rounding): all are
    quantized, and the checkpoint loads back so."""
    import warnings

    import transformers

    from epmq.adapters.attention import call_projections, hands_weights_to_torch

    config = transformers.WavLMConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
        vocab_size=12, num_buckets=16, max_bucket_distance=32, feat_extract_norm="layer" if stable else "group",
        do_stable_layer_norm=stable)
    torch.manual_seed(0)
    model = transformers.WavLMModel(config).eval()
    values = torch.randn(2, 640, generator=gen)
    mask = torch.ones(2, 640, dtype=torch.long)
    mask[1, 500:] = 0
    with torch.no_grad():
        before = model(values, attention_mask=mask, output_attentions=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=-1), method="gptq", backend="torch",
                            calibration={"a": [{"input_values": values}]}, progress=False)
    linears = sorted(n for n, m in transformers.WavLMModel(config).named_modules()
                     if isinstance(m, nn.Linear) and n.startswith("encoder.layers"))
    assert sorted(e["name"] for e in model.epmq_report.layers) == linears and len(linears) == 14
    with torch.no_grad():
        after = model(values, attention_mask=mask, output_attentions=True)
    # (8 bits of every attention weight: near the float model's outputs and attention weights)
    error = (after.last_hidden_state - before.last_hidden_state).abs().max()
    assert error < 0.05 * before.last_hidden_state.abs().max()
    for a, b in zip(after.attentions, before.attentions):
        assert a.shape == b.shape and (a - b).abs().max() < 0.05
    # (the attention as it calls its projections: torch's, to float32's rounding)
    torch.manual_seed(0)
    fp = transformers.WavLMModel(config).eval()
    rebuilt = copy.deepcopy(fp)
    attentions = [m for m in rebuilt.modules() if hands_weights_to_torch(m)]
    assert len(attentions) == 2
    for attention in attentions:
        call_projections(attention)
    with torch.no_grad():
        expected, got = (m(values, attention_mask=mask, output_attentions=True) for m in (fp, rebuilt))
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-5)
    for a, b in zip(got.attentions, expected.attentions):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    epmq.save_quantized(model, tmp_path / "wavlm")
    fresh = epmq.load_quantized(tmp_path / "wavlm", transformers.WavLMModel(config).eval())
    with torch.no_grad():
        torch.testing.assert_close(fresh(values, attention_mask=mask).last_hidden_state, after.last_hidden_state)


def test_a_tower_of_blocks_named_otherwise_beside_a_known_one_is_walked_when_auto_is_asked_for(gen):
    """A speech encoder-decoder of Wav2Vec2's large encoder and GPT-2: the walk warns that the
    encoder's layers stay in full precision and says to give adapter=[..., AUTO]; that was refused
    as 'AUTO finds no blocks ... that the other adapters given do not walk', AUTO's only named
    blocks (GPT2Block) being GPT-2's. Where the others walk all its named ones, AUTO takes the
    lists repeating one module that holds linears that they leave."""
    import warnings

    import transformers

    encoder = tiny_wav2vec2_large()
    decoder = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, bos_token_id=0,
                                      eos_token_id=0, add_cross_attention=True, is_decoder=True)
    config = transformers.SpeechEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id = 0, 0
    torch.manual_seed(0)
    model = unlisted(transformers.SpeechEncoderDecoderModel(config).eval())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        epmq.adapters.warn_other_towers(model, find_towers(model))
    assert any("encoder.encoder.layers" in str(w.message) and "epmq.adapters.AUTO" in str(w.message) for w in caught)
    towers = find_towers(model, adapter=[epmq.adapters.GPT2, AUTO])
    assert [(a.name, [n for n, _ in s]) for a, s in towers] == [
        ("hf-gpt2", ["decoder.transformer.h"]), ("auto", ["encoder.encoder.layers"])]
    linears = sorted(n for n, m in model.named_modules()
                     if isinstance(m, nn.Linear) and n.startswith("encoder.encoder.layers"))
    calibration = {"a": [{"input_values": torch.randn(2, 640, generator=gen),
                          "decoder_input_ids": torch.randint(1, 64, (2, 5), generator=gen)}]}
    epmq.quantize_model(model, SPEC, method="gptq", calibration=calibration, backend="torch", progress=False,
                        adapter=[epmq.adapters.GPT2, AUTO])
    walked = {e["name"] for e in model.epmq_report.layers}
    assert set(linears) <= walked and len(linears) == 12
    assert any(n.startswith("decoder.transformer.h.") for n in walked)
    # (alone, AUTO still walks the named blocks only: the others are not blocks beside them)
    assert [n for n, _ in AUTO.stacks(model)] == ["decoder.transformer.h"]


@pytest.mark.parametrize("family", ["XLM", "Flaubert"])
def test_xlm_keeps_its_layers_in_lists_of_attentions_and_of_feed_forwards_which_are_walked(gen, family):
    """XLM (and FlauBERT, its French model) keeps no list of blocks: layer i is attentions[i],
    layer_norm1[i], ffns[i], layer_norm2[i], each list its own. It was refused ('no epmq adapter
    knows XLMWithLMHeadModel'); its lists of attentions and of feed-forward layers repeat one
    module holding linears, which AUTO walks, each module's inputs taken from the model."""
    import transformers

    config = getattr(transformers, f"{family}Config")(vocab_size=50, emb_dim=32, n_layers=2, n_heads=4)
    torch.manual_seed(0)
    model = getattr(transformers, f"{family}WithLMHeadModel")(config).eval()
    assert [(a.name, [n for n, _ in s]) for a, s in find_towers(model)] == [
        ("auto", ["transformer.attentions", "transformer.ffns"])]
    ids = torch.randint(0, 50, (2, 8), generator=gen)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method="gptq",
                        calibration={"a": [{"input_ids": ids}]}, backend="torch", progress=False)
    assert len(model.epmq_report.layers) == 12  # (q, k, v, out and lin1, lin2 of each of 2 layers)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert (got - want).norm() < 0.01 * want.norm()


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_wavlm_large_attention_beside_a_known_tower_calls_its_projections(gen, tmp_path, method):
    """60e764c made WavLM's attention call its projections in the blocks of AUTO's own stacks,
    but a WavLM large encoder (WavLMEncoderLayerStableLayerNorm) beside GPT-2 is walked by
    adapter=[GPT2, AUTO] from the lists AUTO takes beside others, which it did not prepare: GPTQ
    left 8 of its 14 linears in full precision (warned), and RTN packed them while the attention
    still read their weights, the meta stand-ins, so the model's logits were NaN. Every tower's
    blocks are prepared so: all quantized, the outputs near the float model's, and loaded back."""
    import warnings

    import transformers

    config = transformers.WavLMConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
        vocab_size=12, num_buckets=16, max_bucket_distance=32, feat_extract_norm="layer", do_stable_layer_norm=True)
    decoder = transformers.GPT2Config(vocab_size=12, n_embd=32, n_layer=1, n_head=4, add_cross_attention=True,
                                      is_decoder=True, bos_token_id=0, eos_token_id=0)

    def build():
        torch.manual_seed(0)
        return transformers.SpeechEncoderDecoderModel(
            encoder=transformers.WavLMModel(config), decoder=transformers.GPT2LMHeadModel(decoder)).eval()

    model = build()
    item = {"input_values": torch.randn(1, 640, generator=gen), "decoder_input_ids": torch.ones(1, 4, dtype=torch.long)}
    with torch.no_grad():
        before = model(**item).logits
    adapter = [epmq.adapters.GPT2, AUTO]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*never called")
        epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=-1), method=method, backend="torch",
                            calibration={"a": [item]}, adapter=adapter, progress=False)
    linears = sorted(n for n, m in build().named_modules()
                     if isinstance(m, nn.Linear) and n.startswith("encoder.encoder.layers"))
    assert len(linears) == 14
    assert sorted(e["name"] for e in model.epmq_report.layers if e["name"].startswith("encoder.")) == linears
    with torch.no_grad():
        after = model(**item).logits
    assert torch.isfinite(after).all() and (after - before).abs().max() < 0.05 * before.abs().max()
    epmq.save_quantized(model, tmp_path / "q")
    # (with the adapters it was walked with, and by default: no registered adapter knows WavLM's
    # large layers, and the attention still handed its packed projections' weights to torch, NaN)
    for fresh in (epmq.load_quantized(tmp_path / "q", build(), adapter=adapter),
                  epmq.load_quantized(tmp_path / "q", build()), epmq.load_quantized(tmp_path / "q")):
        with torch.no_grad():
            torch.testing.assert_close(fresh(**item).logits, after)


def _tiny_blt():
    """BLT: a local encoder and decoder of byte layers, each with a list of cross-attentions
    (between bytes and patches: the encoder's one after its layers, the decoder's before each
    layer), a global transformer over the patches, and the entropy model that cuts them."""
    import transformers

    sub = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, max_position_embeddings=64)
    config = transformers.BltConfig(
        vocab_size=64, max_position_embeddings=64, patch_size=4, cross_attn_k=2, encoder_hash_byte_group_vocab=64,
        patcher_config=sub, encoder_config=dict(sub, hidden_size_global=32, cross_attn_all_layers=False),
        decoder_config=dict(sub, hidden_size_global=32, cross_attn_all_layers=True), global_config=sub)

    def make():
        torch.manual_seed(0)
        return transformers.BltForCausalLM(config).eval()
    return make


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_blt_cross_attention_layers_are_walked(gen, tmp_path, method):
    """BLT's local encoder and decoder keep their cross-attentions (BltCrossAttention, no *Layer
    or *Block) in lists beside their layers: AUTO walked the layers and left the cross-attentions
    in full precision (warned). Each list of them is walked as a stack, the logits close to the
    float model's, and the checkpoint loads back the same."""
    import warnings

    make = _tiny_blt()
    model, reference = make(), make()
    items = [{"input_ids": torch.randint(0, 64, (2, 16), generator=gen), "use_cache": False} for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method=method, progress=False,
                            calibration={"task": items[:2]} if method == "gptq" else None)
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and "cross_attn_layers" in n] == []
    with torch.no_grad():
        got, want = model(**items[2]).logits, reference(**items[2]).logits
    assert (got - want).norm() < 0.05 * want.norm()
    epmq.save_quantized(model, tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(epmq.load_quantized(tmp_path / "q")(**items[2]).logits, got, rtol=0, atol=0)


@pytest.mark.parametrize("inner", ["eva_attention", "conv1d", "multihead_attention"])
def test_auto_beside_gpt2_prepares_every_stack_it_walks(inner, gen, tmp_path):
    """AUTO beside GPT-2 (adapter=[GPT2, AUTO]) walks the lists repeating one module the others
    leave, but its prepare rewrote the modules of its own stacks alone (GPT-2's): an EVA attention
    with a q/v bias in those lists kept applying qkv.weight in F.linear, which the packed layer no
    longer has, and a GPT-2 Conv1D stayed in full precision. Every stack AUTO walks is prepared as
    its own: quantized, the logits close to the float model's, and loaded back the same (an
    nn.MultiheadAttention's in_proj_weight stayed in full precision so until 53f7b7a)."""
    from timm.models.eva import EvaAttention
    from transformers.pytorch_utils import Conv1D

    class SelfAttention(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.attn = nn.MultiheadAttention(d, 4, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    mixes = {"eva_attention": lambda d: EvaAttention(d, 4, num_prefix_tokens=0, scale_norm=False),
             "conv1d": lambda d: Conv1D(d, d), "multihead_attention": SelfAttention}

    class Unit(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.mix = mixes[inner](d)
            self.fc = nn.Linear(d, d)

        def forward(self, x):
            return x + self.fc(self.mix(x))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(64, 32)
            self.units = nn.ModuleList([Unit(32) for _ in range(2)])
            self.decoder = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0))

        def forward(self, input_ids):
            h = self.embed(input_ids)
            for unit in self.units:
                h = unit(h)
            return self.decoder(inputs_embeds=h).logits

    def build():
        torch.manual_seed(0)
        return Model().eval()

    model, reference, adapter = build(), build(), [epmq.adapters.GPT2, epmq.adapters.AUTO]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no matrix left outside a linear)
        epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method="rtn",
                            adapter=adapter, progress=False)
    for i in range(2):
        assert not any(p.ndim == 2 for p in model.units[i].parameters())  # (every matrix packed)
    ids = torch.randint(0, 64, (2, 8), generator=gen)
    with torch.no_grad():
        got, want = model(ids), reference(ids)
    assert (got - want).norm() < 0.05 * want.norm()
    epmq.save_quantized(model, tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(epmq.load_quantized(tmp_path / "q", build(), adapter=adapter)(ids), got)


@pytest.mark.parametrize("twice", ["auto", "hf-decoder"])
def test_an_adapter_listed_twice_is_refused_by_name(twice):
    """adapter=[AUTO, AUTO] was refused as AUTO finding 'no blocks ... that the other adapters
    given do not walk' (there is no other), [HF_DECODERS, HF_DECODERS, AUTO] as two adapters of one
    name walking one stack; a repeat walks nothing more, so it is refused naming the adapter."""
    adapter = AUTO if twice == "auto" else epmq.adapters.HF_DECODERS
    with pytest.raises(ValueError, match=rf"adapter= lists {twice!r} twice"):
        find_towers(ToyVLM(), [adapter, AUTO, adapter] if twice != "auto" else [AUTO, AUTO])


class _Head(nn.Module):
    def __init__(self, width, out):
        super().__init__()
        self.up, self.down = nn.Linear(width, 2 * width), nn.Linear(2 * width, out)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class _Heads(nn.Module):
    """Heads each reading its own input (``[:, i]``) or all one input (a comprehension)."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.heads = nn.ModuleList(_Head(8, 3) for _ in range(3))

    def forward(self, x):
        if self.how == "indexed":
            outputs = []
            for i in range(len(self.heads)):
                head = self.heads[i]
                outputs += [head(x[:, i, :])]
            return torch.stack(outputs, dim=1)
        return torch.stack([head(x) for head in self.heads], dim=1)


class _Stack(_Heads):
    def forward(self, x):
        for block in self.heads:  # (a stack: one block's outputs the next one's inputs)
            x = block(x)
        return x


def tiny_sam():
    return transformers.SamModel(transformers.SamConfig(
        vision_config=dict(hidden_size=32, output_channels=8, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, window_size=2, global_attn_indexes=[1], mlp_dim=64,
                           num_pos_feats=4),
        prompt_encoder_config=dict(hidden_size=8, image_size=32, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, mlp_dim=16,
                                 iou_head_hidden_dim=16))).eval()


def tiny_minicpm_ocr(merger_times):
    text = dict(model_type="qwen3_5_text", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=2,
                linear_key_head_dim=8, linear_value_head_dim=8)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
                  image_size=56)
    config = transformers.MiniCPMOcrConfig(text_config=text, vision_config=vision, insert_layer_id=0,
                                           merger_times=merger_times)
    return transformers.MiniCPMOcrForConditionalGeneration(config).eval()


@pytest.mark.parametrize("model", ["sam", "minicpm-ocr", "minicpm-ocr merged twice", "indexed", "comprehension"])
def test_parallel_heads_and_projectors_are_not_told_to_be_walked_as_blocks(model):
    """SAM's mask decoder's hypernetwork MLPs (output_hypernetworks_mlps: one SamFeedForward per mask
    token, each on its own token) and MiniCPM-OCR's projector into the language model (merger.mlp,
    its DownsampleMLPs) were warned of as blocks no adapter knows, 'walk them with
    epmq.adapters.AUTO', the walk's own adapter: neither is a stack of blocks that hand their outputs
    on (a walk of the heads would feed head 0's outputs to head 1), and projectors are kept in full
    precision as every other model's. Nothing is said of them; a stack of the same blocks called
    one after another still is warned of."""
    torch.manual_seed(0)
    built = {"sam": tiny_sam, "minicpm-ocr": lambda: tiny_minicpm_ocr(1),
             "minicpm-ocr merged twice": lambda: tiny_minicpm_ocr(2)}.get(model, lambda: _Heads(model))()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        epmq.adapters.warn_other_towers(built, [] if isinstance(built, _Heads) else find_towers(built))
    said = " ".join(str(w.message) for w in caught if "no adapter knows" in str(w.message))
    assert not any(name in said for name in ("output_hypernetworks_mlps", "merger", "heads")), said
    stack = _Stack("stack")
    with pytest.warns(UserWarning, match=r"no adapter knows the blocks at heads \(_Head\)"):
        epmq.adapters.warn_other_towers(stack, [])


def test_a_projectors_stack_of_attention_blocks_is_still_warned_of():
    """Fun-ASR-Nano's projector into the language model holds a stack of encoder layers (attention
    and MLP, called one after another): unlike a projector's MLPs it is warned of where a walk leaves
    it in full precision (here every tower but the encoders', which the default walk takes too)."""
    torch.manual_seed(0)
    config = transformers.FunAsrNanoConfig(
        audio_config=dict(model_type="fun_asr_nano_encoder", num_mel_bins=8, hidden_size=32, num_attention_heads=2,
                          intermediate_size=48, num_hidden_layers=4, num_stacked_frames=2,
                          num_timestamp_prediction_layers=1, fsmn_kernel_size=3),
        adaptor_config=dict(hidden_size=32, num_attention_heads=2, intermediate_size=8, num_hidden_layers=2,
                            projector_hidden_size=48),
        text_config=dict(model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    model = transformers.FunAsrNanoForConditionalGeneration(config).eval()
    with pytest.warns(UserWarning, match=r"no adapter knows the blocks at .*model\.multi_modal_projector\.layers "
                                         r"\(FunAsrNanoEncoderLayer\)"):
        epmq.adapters.warn_other_towers(model, [t for t in find_towers(model) if t[0] is not epmq.adapters.HF_ENCODERS])


class UnlistedAudioLayer(transformers.models.qwen2_audio.modeling_qwen2_audio.Qwen2AudioEncoderLayer):
    """Qwen2-Audio's encoder layer under a name no adapter lists (the BART adapter lists Qwen2-Audio's
    own), standing for the next audio LM's tower."""


def tiny_qwen2_audio(seed=0):
    """Qwen2-Audio with an audio tower no adapter lists (UnlistedAudioLayer) and a Qwen2 language model."""
    torch.manual_seed(seed)
    audio = dict(num_mel_bins=8, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=48,
                 max_source_positions=16)
    text = dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    config = transformers.Qwen2AudioConfig(audio_config=audio, text_config=text, audio_token_index=63)
    model = transformers.Qwen2AudioForConditionalGeneration(config).eval()
    for layer in model.model.audio_tower.layers:
        layer.__class__ = UnlistedAudioLayer
    return model


def _left_warnings(model, towers, chosen=False) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        epmq.adapters.warn_other_towers(model, towers, chosen=chosen)
    return [str(w.message) for w in caught if "no adapter knows" in str(w.message)]


@pytest.mark.parametrize("chosen", [False, True])
def test_the_warning_of_a_tower_left_in_full_precision_counts_it_and_gives_the_adapters_that_walk_it(chosen):
    """Qwen2-Audio's audio tower beside its known language model: the warning named the stack and its
    class, not how much of the model it is, and told to give 'adapter=[the adapters above,
    epmq.adapters.AUTO]', the adapters above named as 'hf-decoder' (epmq.adapters.HF_DECODERS), no
    argument to pass. It counts the tower's blocks and linears and their share of the linears'
    weights, and gives the adapter= that walks it; that argument takes the tower, and nothing is
    left to warn of."""
    model = tiny_qwen2_audio()
    towers = find_towers(model, epmq.adapters.HF_DECODERS if chosen else None)
    said = _left_warnings(model, towers, chosen)
    assert len(said) == 1, said
    linears = [m for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    tower = [m for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.startswith("model.audio_tower.layers.")]
    share = sum(m.weight.numel() for m in tower) / sum(m.weight.numel() for m in linears)
    assert "blocks at model.audio_tower.layers (UnlistedAudioLayer), which stay in full precision" in said[0]
    assert f"(model.audio_tower.layers: 2 blocks, {len(tower)} linears, {share:.0%} of the linear weights" in said[0]
    assert "the adapters above" not in said[0]
    remedy = "adapter=[epmq.adapters.HF_DECODERS, epmq.adapters.AUTO]"
    assert remedy in said[0] and "block_types=('UnlistedAudioLayer',)" in said[0], said[0]
    both = find_towers(model, eval(remedy.partition("=")[2]))
    assert [(a.name, [n for n, _ in s]) for a, s in both] == [
        ("hf-decoder", ["model.language_model.layers"]), ("auto", ["model.audio_tower.layers"])]
    assert _left_warnings(model, both, chosen=True) == []


class DownsampleLayer(nn.Module):
    """A hierarchical tower's stage: a projection to a narrower width, then blocks of that width."""

    def __init__(self, width):
        super().__init__()
        self.down = nn.Linear(2 * width, width)
        self.blocks = nn.ModuleList([PatchBlock(width) for _ in range(2)])

    def forward(self, x):
        x = self.down(x)
        for block in self.blocks:
            x = block(x)
        return x


class ToyHierarchicalVLM(ToyVLM):
    """ToyVLM whose image tower narrows stage by stage (VibeVoice's tokenizers' downsampling stages)."""

    def __init__(self):
        super().__init__()
        self.patches = nn.Linear(12, 64)
        self.vision = nn.ModuleList([DownsampleLayer(32), DownsampleLayer(16)])
        self.project = nn.Linear(16, 32)

    def forward(self, pixels, input_ids):
        v = self.patches(pixels)
        for stage in self.vision:
            v = stage(v)
        text = self.lm.get_input_embeddings()(input_ids)
        return self.lm(inputs_embeds=torch.cat([self.project(v), text], dim=1)).logits


def test_the_warning_of_a_tower_of_nested_stacks_names_it_once_and_the_blocks_that_walk_it(gen):
    """A tower whose stages narrow their input, each then running blocks of its own (VibeVoice's
    tokenizers): the warning named the stages' list and each stage's list of blocks beside it, three
    stacks where the walk would take one, and told to walk them with AUTO, which takes the stages
    and refuses them (their outputs are not of their inputs' shape). It names the tower once, with
    every linear in it, and the adapter to register names the blocks inside the stages; given, that
    adapter walks them, beside the language model, and AUTO's refusal is as the warning says."""
    model = ToyHierarchicalVLM().eval()
    said = _left_warnings(model, find_towers(model))
    assert len(said) == 1, said
    assert "blocks at vision (DownsampleLayer), which stay" in said[0] and "vision.0.blocks" not in said[0], said[0]
    assert "(vision: 2 blocks, 10 linears, " in said[0], said[0]
    assert "adapter=[epmq.adapters.HF_DECODERS, epmq.adapters.AUTO]; or register an adapter for them" in said[0]
    assert ("block_types=('PatchBlock',))) (at vision, the blocks of the lists inside the blocks; AUTO takes those at "
            "vision whole, and refuses them where they change the shape of their input)") in said[0], said[0]
    calibration = {"a": [(torch.randn(2, 4, 12, generator=gen), torch.randint(3, 64, (2, 6), generator=gen))]}
    with pytest.raises(ValueError, match=r"its blocks \(DownsampleLayer\) return shape \(2, 4, 32\) for hidden states "
                                         r"of shape \(2, 4, 64\)"):
        epmq.quantize_model(copy.deepcopy(model), SPEC, method="gptq", calibration=calibration, backend="torch",
                            progress=False, adapter=[epmq.adapters.HF_DECODERS, AUTO])
    registered = epmq.Adapter("patch", block_types=("PatchBlock",))
    epmq.quantize_model(model, SPEC, method="gptq", calibration=calibration, backend="torch", progress=False,
                        adapter=[epmq.adapters.HF_DECODERS, registered])
    assert {n.rpartition(".")[0] for n in _packed(model) if n.startswith("vision.")} == {
        f"vision.{s}.blocks.{b}" for s in range(2) for b in range(2)}



def test_a_tower_no_adapter_knows_is_left_to_the_warning_by_default_as_text_calibration_never_reaches_it(gen):
    """Why the default walk does not hand AUTO the stacks the registered adapters leave (Qwen2-Audio's
    audio tower under a name no adapter lists, as Audio Flamingo 3's was): calibrated on
    text alone, as a language model is, the default walk quantizes the language model and warns of
    the tower; AUTO beside it is refused, the tower never reached. Asked for, AUTO walks it on
    calibration that reaches it (test_an_unknown_tower_beside_a_known_one_is_walked_when_auto_is_asked_for)."""
    model = tiny_qwen2_audio()
    calibration = {"a": [{"input_ids": torch.randint(3, 60, (2, 8), generator=gen)}]}
    with pytest.warns(UserWarning, match=r"no adapter knows the blocks at model\.audio_tower\.layers"):
        epmq.quantize_model(model, SPEC, method="gptq", calibration=calibration, backend="torch", progress=False)
    assert {n.partition(".layers.")[0] for n in _packed(model)} == {"model.language_model"}
    with pytest.raises(ValueError, match=r"never reaches the blocks at 'model\.audio_tower\.layers' \(auto\)"):
        epmq.quantize_model(tiny_qwen2_audio(), SPEC, method="gptq", calibration=calibration, backend="torch",
                            progress=False, adapter=[epmq.adapters.HF_DECODERS, AUTO])
