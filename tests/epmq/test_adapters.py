"""Adapters: the attention rewrite for open_clip, and adding a family through the registry."""

import warnings

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import epmq
import epmq.adapters
from epmq.adapters.attention import LinearCrossAttention, LinearMultiheadAttention


def assert_attends_as(got, want):
    """``(output, weights)`` of an attention agree with ``nn.MultiheadAttention``'s: the
    weights too where it returns them, None where it does not."""
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    if want[1] is None:
        assert got[1] is None
    else:
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", [None, "float", "bool", "padding", "per-head"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_linear_attention_computes_what_multihead_attention_computes(batch_first, mask, need_weights, gen):
    E, H, N, L = 32, 4, 3, 6
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_(generator=gen)
        mha.out_proj.bias.normal_(generator=gen)
    x = torch.randn((N, L, E) if batch_first else (L, N, E), generator=gen)
    kwargs = {}
    if mask == "float":  # open_clip's causal text mask
        kwargs["attn_mask"] = torch.full((L, L), float("-inf")).triu(1)
    elif mask == "bool":
        kwargs["attn_mask"] = torch.ones(L, L, dtype=torch.bool).triu(1)
    elif mask == "padding":
        kwargs["key_padding_mask"] = torch.arange(L)[None, :].expand(N, L) >= torch.tensor([[L], [L - 2], [3]])
    elif mask == "per-head":
        kwargs["attn_mask"] = torch.randn(N * H, L, L, generator=gen)
    linear = LinearMultiheadAttention(mha)
    with torch.no_grad():
        want = mha(x, x, x, need_weights=need_weights, **kwargs)
        got = linear(x, x, x, need_weights=need_weights, **kwargs)
    assert_attends_as(got, want)
    # the projections are shared, not copied, and in_proj is an nn.Linear the walker can quantize
    assert linear.in_proj.weight is mha.in_proj_weight and isinstance(linear.in_proj, nn.Linear)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", [None, "padding", "float"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_linear_cross_attention_computes_what_multihead_attention_computes(batch_first, mask, need_weights, gen):
    """Queries of one length against keys and values of another (CoCa's text against its image
    tokens), key and value distinct tensors; q, k and v are views of in_proj_weight's row blocks."""
    E, H, N, L, S = 32, 4, 3, 5, 7
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_(generator=gen)
    shape = (lambda n: (N, n, E)) if batch_first else (lambda n: (n, N, E))
    x, key, value = (torch.randn(shape(n), generator=gen) for n in (L, S, S))
    kwargs = {}
    if mask == "padding":
        kwargs["key_padding_mask"] = torch.arange(S)[None, :].expand(N, S) >= torch.tensor([[S], [S - 2], [3]])
    elif mask == "float":
        kwargs["attn_mask"] = torch.randn(L, S, generator=gen)
    linear = LinearCrossAttention(mha)
    with torch.no_grad():
        want = mha(x, key, value, need_weights=need_weights, **kwargs)
        got = linear(x, key, value, need_weights=need_weights, **kwargs)
    assert_attends_as(got, want)
    for j, projection in enumerate((linear.q_proj, linear.k_proj, linear.v_proj)):
        assert projection.weight.data_ptr() == mha.in_proj_weight[j * E].data_ptr()  # (a view)
        assert torch.equal(projection.bias, mha.in_proj_bias[j * E:(j + 1) * E])


def test_linear_attention_is_self_attention_only():
    linear = LinearMultiheadAttention(nn.MultiheadAttention(16, 2, batch_first=True))
    x, y = torch.randn(1, 3, 16), torch.randn(1, 3, 16)
    with pytest.raises(NotImplementedError, match="self-attention"):
        linear(x, y, y)


def test_open_clip_rewrite_names_the_original_tensors():
    from open_clip.transformer import VisionTransformer

    model = VisionTransformer(image_size=16, patch_size=8, width=32, layers=2, heads=4, mlp_ratio=2.0, output_dim=16)
    swaps = []
    renames = epmq.adapters.OPEN_CLIP.prepare(model, lambda name, new: swaps.append(name))
    assert swaps == ["transformer.resblocks.0.attn", "transformer.resblocks.1.attn"]
    assert renames["transformer.resblocks.1.attn.in_proj.weight"] == "transformer.resblocks.1.attn.in_proj_weight"


@pytest.mark.parametrize("kind", ["plain", "qk_norm", "scale_heads and inner norm", "no bias"])
@pytest.mark.parametrize("mask", [None, "float", "bool", "per-head"])
def test_open_clip_custom_attention_on_a_linear_computes_what_open_clips_computes(kind, mask, gen):
    """open_clip's ``Attention`` (its ``CustomResidualAttentionBlock``'s: qk_norm, per-head scales,
    ...) applies ``in_proj_weight`` by ``F.linear``; rebuilt, an ``nn.Linear`` holding
    the same tensors, it gives open_clip's output bit for bit."""
    from open_clip.transformer import Attention

    from epmq.adapters.attention import LinearInProjAttention

    E, H, N, L = 32, 4, 3, 6
    # (not scaled_cosine: open_clip 3.3's own forward of it fails, torch.bmm on [N, H, L, D])
    options = {"plain": {}, "qk_norm": {"qk_norm": True},
               "scale_heads and inner norm": {"scale_heads": True, "inner_norm": True},
               "no bias": {"qkv_bias": False}}[kind]
    attention = Attention(E, H, **options).eval()
    with torch.no_grad():
        for p in attention.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    x = torch.randn(N, L, E, generator=gen)
    attn_mask = {None: None, "float": torch.full((L, L), float("-inf")).triu(1),
                 "bool": torch.ones(L, L, dtype=torch.bool).triu(1),
                 "per-head": torch.randn(N * H, L, L, generator=gen)}[mask]
    with torch.no_grad():
        want = attention(x, attn_mask=attn_mask)
        linear = LinearInProjAttention(attention)
        got = linear(x, attn_mask=attn_mask)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert isinstance(linear.in_proj, nn.Linear) and linear.in_proj.weight is attention.in_proj_weight
    assert not any(p.dim() == 2 for name, p in linear.named_parameters(recurse=False))


def _custom_open_clip(model_class, vision_custom, text_custom):
    """A tiny open_clip model whose towers' blocks are ``CustomResidualAttentionBlock``s where
    asked (qk_norm in the vision tower; per-head scales, an inner norm and a norm in the MLP in the
    text tower)."""
    import open_clip.model

    cfg = {"embed_dim": 16,
           "vision_cfg": {"layers": 2, "width": 32, "head_width": 8, "image_size": 16, "patch_size": 8,
                          "qk_norm": vision_custom},
           "text_cfg": {"context_length": 8, "vocab_size": 50, "width": 32, "heads": 4, "layers": 2,
                        "scale_heads": text_custom, "scale_attn_inner": text_custom, "scale_fc": text_custom}}

    def make():
        torch.manual_seed(0)
        return getattr(open_clip.model, model_class)(**cfg).eval()
    return make


def close_and_loaded_back(clip, reference, make, inputs, tmp_path):
    """The quantized open_clip model's image and text features close to the float one's, and
    its checkpoint loaded into ``make()`` giving them exactly."""
    with torch.no_grad():
        got, want = clip(*inputs), reference(*inputs)
    for g, w in zip(got[:2], want[:2]):
        torch.testing.assert_close(g, w, rtol=0.05, atol=0.05)
    epmq.save_quantized(clip, tmp_path / "q")
    loaded = epmq.load_quantized(tmp_path / "q", make())
    with torch.no_grad():
        for g, w in zip(loaded(*inputs), got):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("model_class, vision_custom, text_custom", [
    ("CLIP", False, True), ("CLIP", True, False), ("CLIP", True, True), ("CustomTextCLIP", False, True)])
def test_open_clip_custom_blocks_are_quantized_whole_and_load_back(model_class, vision_custom, text_custom, method,
                                                                   gen, tmp_path):
    """A tower of open_clip ``CustomResidualAttentionBlock``s (qk_norm, per-head scales) was left
    in full precision beside a plain one (no adapter knew its blocks), and walked alone kept its
    attention's ``in_proj_weight`` in full precision; every projection is quantized, the model
    close to the float one, and its checkpoint loads back the same."""
    make = _custom_open_clip(model_class, vision_custom, text_custom)
    clip, reference = make(), make()
    image = torch.randn(2, 3, 16, 16, generator=gen)
    text = torch.randint(1, 48, (2, 8), generator=gen)
    text[:, -1] = 49
    calibration = {"task": [{"image": image, "text": text}]} if method == "gptq" else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        epmq.quantize_model(clip, epmq.QuantSpec(bits=8, group_size=16), method=method, calibration=calibration,
                            progress=False)
    fp = [name for name, p in clip.named_parameters() if p.dim() == 2 and ".resblocks." in name]
    assert fp == []
    close_and_loaded_back(clip, reference, make, (image, text), tmp_path)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_nllb_clip_text_tower_is_quantized_beside_the_image_tower(method, gen, tmp_path):
    """NLLB-CLIP (open_clip's nllb-clip-*: an HF text tower, NLLB's M2M-100 encoder, beside the
    image tower) had its whole text encoder (text.transformer.layers, M2M100EncoderLayer) left in
    full precision with a warning while the image tower was quantized; both towers are walked in
    one call, the features close to the float model's, and the checkpoint loads back the same."""
    import transformers
    from open_clip.model import CustomTextCLIP

    transformers.M2M100Model(transformers.M2M100Config(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=20,
        pad_token_id=1)).save_pretrained(tmp_path / "nllb")

    def make():
        torch.manual_seed(0)
        return CustomTextCLIP(embed_dim=16, vision_cfg=dict(layers=2, width=32, head_width=8, image_size=16,
                                                            patch_size=8, mlp_ratio=2.0),
                              text_cfg=dict(hf_model_name=str(tmp_path / "nllb"),
                                            hf_tokenizer_name=str(tmp_path / "nllb"), hf_proj_type="linear",
                                            hf_pooler_type="cls_pooler", hf_model_pretrained=False,
                                            context_length=8)).eval()

    clip, reference = make(), make()
    image = torch.randn(2, 3, 16, 16, generator=gen)
    text = torch.ones(2, 8, dtype=torch.long)  # (1: the pad id)
    text[0, :5], text[1] = torch.randint(2, 64, (5,), generator=gen), torch.randint(2, 64, (8,), generator=gen)
    calibration = {"task": [{"image": image, "text": text}]} if method == "gptq" else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        epmq.quantize_model(clip, epmq.QuantSpec(bits=8, group_size=16), method=method, calibration=calibration,
                            progress=False)
    assert [n for n, m in clip.named_modules() if isinstance(m, nn.Linear) and ".layers." in n] == []
    assert clip.epmq_report.adapter == "open_clip+hf-encoder"
    if method == "gptq":  # (the pad-id positions no tokens, as in the other HF text towers)
        tokens = {e["name"]: e["n_tokens"] for e in clip.epmq_report.layers}
        assert tokens["text.transformer.layers.1.fc1"] == 5 + 8
    close_and_loaded_back(clip, reference, make, (image, text), tmp_path)


def test_open_clip_resnet_attention_pool_left_in_full_precision_is_warned_of(gen, tmp_path):
    """An open_clip ModifiedResNet's (RN50's) attention pool hands its q, k, v and c projections'
    weights to ``F.multi_head_attention_forward``, outside any list of blocks: they stayed in full
    precision (a third of RN50's image tower) without a word. The warning names them; the text
    tower is quantized, and the checkpoint loads back the same."""
    from open_clip.model import CLIP

    def make():
        torch.manual_seed(0)
        return CLIP(embed_dim=16, vision_cfg={"layers": [1, 1, 1, 1], "width": 8, "head_width": 8, "image_size": 64},
                    text_cfg={"context_length": 8, "vocab_size": 50, "width": 32, "heads": 4, "layers": 2}).eval()

    clip, reference = make(), make()
    image, text = torch.randn(2, 3, 64, 64, generator=gen), torch.randint(1, 48, (2, 8), generator=gen)
    text[:, -1] = 49
    with pytest.warns(UserWarning, match=r"visual\.attnpool \(k_proj, q_proj, v_proj, c_proj\) stay in full precision"):
        epmq.quantize_model(clip, epmq.QuantSpec(bits=8, group_size=16), method="gptq",
                            calibration={"task": [{"image": image, "text": text}]}, progress=False)
    assert isinstance(clip.visual.attnpool.q_proj, nn.Linear)
    assert not any(isinstance(m, nn.Linear) for m in clip.transformer.modules())
    close_and_loaded_back(clip, reference, make, (image, text), tmp_path)


def _tiny_levit():
    """LeViT of three stages, a subsampling attention closing each of the first two."""
    import transformers

    config = transformers.LevitConfig(image_size=32, patch_size=16, hidden_sizes=[16, 24, 32],
                                      num_attention_heads=[1, 2, 2], depths=[1, 1, 1], key_dim=[8, 8, 8],
                                      down_ops=[["Subsample", 8, 2, 4, 2, 2], ["Subsample", 8, 3, 4, 2, 2]])

    def make():
        torch.manual_seed(0)
        return transformers.LevitForImageClassification(config).eval()
    return make


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_levit_stages_are_all_walked_and_load_back(method, gen, tmp_path):
    """LeViT's first stages hold a subsampling attention (LevitAttentionSubsample) after their
    residual layers: AUTO took only the last stage, and the others stayed in full precision
    (warned). Every stage's linears are quantized, the logits close to the float model's, and the
    checkpoint loads back the same."""
    make = _tiny_levit()
    model, reference = make(), make()
    images = [torch.randn(2, 3, 32, 32, generator=gen) for _ in range(2)]
    calibration = {"task": [{"pixel_values": x} for x in images]} if method == "gptq" else None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=8), method=method, calibration=calibration,
                            progress=False)
    assert [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".stages." in n] == []
    with torch.no_grad():
        got, want = model(images[0]).logits, reference(images[0]).logits
    assert (got - want).norm() < 0.05 * want.norm()
    epmq.save_quantized(model, tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(epmq.load_quantized(tmp_path / "q")(images[0]).logits, got, rtol=0, atol=0)


# --------------------------------------------------------------------------- a new family


class ScaledUnit(nn.Module):
    """A block with a keyword argument that changes with depth and a tuple output (named as no
    family's blocks are: ``AUTO`` takes modules named ``*Layer`` or ``*Block`` only)."""

    def __init__(self, width):
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x, *, gain):
        return x + gain * self.down(torch.relu(self.up(x))), gain * 0.5


class ToyNet(nn.Module):
    def __init__(self, width=32, depth=3, block=ScaledUnit):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.body = nn.ModuleList([block(width) for _ in range(depth)])
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        h, gain = self.embed(x), 1.0
        for block in self.body:
            h, gain = block(h, gain=gain)
        return self.head(h)


class ToyAdapter(epmq.Adapter):
    def next_kwargs(self, kwargs, output):
        return dict(kwargs, gain=output[1])  # the gain each block hands to the next

    def passthrough(self, hidden):
        return hidden, None


def test_register_an_adapter_for_a_new_family(gen, tmp_path, monkeypatch):
    monkeypatch.setattr(epmq.adapters, "_REGISTRY", list(epmq.adapters._REGISTRY))
    # (unregistered, its repeated ScaledUnits are found by structure, AUTO's fallback)
    assert [a.name for a, _ in epmq.adapters.find_towers(ToyNet())] == ["auto"]
    epmq.register_adapter(ToyAdapter("toy", block_types=("ScaledUnit",)))
    assert [a.name for a, _ in epmq.adapters.find_towers(ToyNet())] == ["toy"]

    torch.manual_seed(0)
    model = ToyNet().eval()
    x = torch.randn(16, 8, generator=gen)
    reference = model(x).detach()
    calibration = {"only": [torch.randn(16, 8, generator=gen) for _ in range(2)]}
    epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method="gptq", calibration=calibration,
                        backend="torch", progress=False)
    names = [layer["name"] for layer in model.epmq_report.layers]
    assert names == [f"body.{i}.{n}" for i in range(3) for n in ("up", "down")]  # embed/head untouched
    assert float((model(x).detach() - reference).norm() / reference.norm()) < 0.02

    epmq.save_quantized(model, tmp_path / "toy")
    fresh = epmq.load_quantized(tmp_path / "toy", ToyNet())
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=1e-6)
    assert "config.json" not in {p.name for p in (tmp_path / "toy").iterdir()}  # not a HF model


def test_block_types_are_class_names_or_classes():
    """``block_types=(MyBlock,)`` (the class, as the README writes it) finds the same blocks as
    its name; subclasses too. Anything else is refused."""
    net = ToyNet()
    for types in (("ScaledUnit",), (ScaledUnit,), ScaledUnit, (nn.Module,)):
        assert [name for name, _ in epmq.Adapter("toy", block_types=types).stacks(net)] == ["body"]
    assert not epmq.Adapter("toy", block_types=(nn.Linear,)).stacks(net)
    with pytest.raises(TypeError, match="class names or classes"):
        epmq.Adapter("toy", block_types=(3,))


# --------------------------------------------------------------------------- fused experts


def test_a_part_is_a_slice_of_a_fused_tensor_or_the_transpose_of_a_column_slice(gen):
    """``Part.take``: rows of ``fused[e]`` (transformers' usual experts, ``[E, 2I, H]``) or, with
    ``transposed``, rows of ``fused[e].T``, the transpose of a column slice (Llama 4's,
    ``[E, H, 2I]``); a view either way, so the rebuilt linears' weights stay the fused tensor."""
    from epmq.adapters import Part

    E, H, inner = 3, 7, 5
    fused = torch.randn(E, 2 * inner, H, generator=gen)
    part = Part("experts.1.up_proj.weight", "experts.gate_up_proj", 1, (inner, 2 * inner), fused.shape)
    assert part == "experts.1.up_proj.weight" and not part.transposed
    assert torch.equal(part.take(fused), fused[1, inner:])
    fused_t = torch.randn(E, H, 2 * inner, generator=gen)
    for e, rows, want in [(2, (0, inner), fused_t[2, :, :inner].T), (0, (inner, 2 * inner), fused_t[0, :, inner:].T),
                          (1, None, fused_t[1].T)]:
        got = Part("w", "fused", e, rows, fused_t.shape, transposed=True).take(fused_t)
        assert got.shape == want.shape and torch.equal(got, want)
        assert got.untyped_storage().data_ptr() == fused_t.untyped_storage().data_ptr()


def _llama4_moe(gen, hidden, inner, n_experts, top_k):
    from transformers import Llama4TextConfig
    from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

    config = Llama4TextConfig(hidden_size=hidden, intermediate_size=inner, num_local_experts=n_experts,
                              num_experts_per_tok=top_k, num_attention_heads=1, num_key_value_heads=1,
                              num_hidden_layers=1, head_dim=2)  # (attention: unused)
    moe = Llama4TextMoe(config).eval()
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-2 if p.dim() == 3 else -1] ** 0.5)
    return moe


@pytest.mark.parametrize("top_k", [1, 2])
def test_llama4_experts_as_linears_compute_what_the_fused_experts_compute(top_k, gen):
    """``Llama4LinearExperts``: one nn.Linear per expert and projection, weights viewing the fused
    parameters (transposed), in Llama 4's hub naming; in the MoE block it gives the fused
    module's output, and each expert's projections see exactly its routed tokens (the hidden
    states scaled by its router score), nothing of the tokens routed elsewhere."""
    from epmq.adapters.moe import Llama4LinearExperts

    hidden, inner, n_experts, tokens = 13, 7, 5, 11  # odd sizes: no slice or view lines up by chance
    moe = _llama4_moe(gen, hidden, inner, n_experts, top_k)
    fused = moe.experts
    x = torch.randn(2, tokens, hidden, generator=gen)
    with torch.no_grad():
        want = moe(x)[0]
        moe.experts = Llama4LinearExperts(fused)
        seen = {}
        hooks = [moe.experts[e].gate_proj.register_forward_pre_hook(
            lambda m, args, e=e: seen.__setitem__(e, args[0])) for e in range(n_experts)]
        got = moe(x)[0]
        for hook in hooks:
            hook.remove()
        # the experts alone, on routed input that one expert gets nothing of
        routed_in = torch.randn(n_experts, tokens, hidden, generator=gen)
        routed_in *= torch.rand(n_experts, tokens, 1, generator=gen) < 0.5
        routed_in[3] = 0
        experts_out = moe.experts(routed_in.view(-1, hidden))
        torch.testing.assert_close(experts_out, fused(routed_in.view(-1, hidden)))
    torch.testing.assert_close(got, want)
    assert not torch.equal(got, moe.shared_expert(x.reshape(-1, hidden)))  # (the experts add something)
    assert not experts_out.view(n_experts, tokens, hidden)[3].any()

    scores = moe.router(x.reshape(-1, hidden))[0]  # [tokens, E], zero where not routed
    storage = fused.gate_up_proj.untyped_storage().data_ptr()
    for e in range(n_experts):
        expert = moe.experts[e]
        assert [n for n, _ in expert.named_children()] == ["gate_proj", "up_proj", "down_proj"]
        assert torch.equal(expert.gate_proj.weight, fused.gate_up_proj[e, :, :inner].T)
        assert torch.equal(expert.up_proj.weight, fused.gate_up_proj[e, :, inner:].T)
        assert torch.equal(expert.down_proj.weight, fused.down_proj[e].T)
        assert expert.up_proj.weight.untyped_storage().data_ptr() == storage  # a view, not a copy
        routed = scores[:, e].nonzero()[:, 0]
        if len(routed):
            torch.testing.assert_close(seen[e], x.reshape(-1, hidden)[routed] * scores[routed, e, None],
                                       rtol=0, atol=0)
        else:
            assert e not in seen


def test_gpt_oss_experts_as_linears(gen, tmp_path):
    """gpt-oss's experts (transposed, gate and up interleaved column by column, with biases): one
    nn.Linear per expert and projection, viewing the fused parameters, computing what the fused
    module computes; an expert checkpoint on disk (fused, as save_pretrained writes it) is read
    one expert's columns at a time, as its state dict would be, and the checkpoint loads back."""
    from epmq.adapters.moe import GptOssLinearExperts
    from test_walker_models import WIDER

    torch.manual_seed(0)
    build = WIDER["gptoss"][0]
    model = build().eval()
    fused = model.model.layers[1].mlp.experts
    with torch.no_grad():
        for p in fused.parameters():  # (odd values: no slice lines up by chance)
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    inner = fused.gate_up_proj.shape[2] // 2
    x = torch.randn(9, fused.gate_up_proj.shape[1], generator=gen)
    index = torch.randint(0, 4, (9, 2), generator=gen)
    weights = torch.rand(9, 2, generator=gen)
    linears = GptOssLinearExperts(fused)
    with torch.no_grad():  # (summation orders differ: x W^T per expert, x W fused; a wrong column is O(1) off)
        torch.testing.assert_close(linears(x, index, weights), fused(x, index, weights), rtol=1e-4, atol=1e-4)
    for e in range(4):
        gate, up, down = linears[e].projections()
        assert torch.equal(gate.weight, fused.gate_up_proj[e, :, ::2].T) and gate.weight.shape[0] == inner
        assert torch.equal(up.weight, fused.gate_up_proj[e, :, 1::2].T)
        assert torch.equal(up.bias, fused.gate_up_proj_bias[e, 1::2])
        assert torch.equal(down.weight, fused.down_proj[e].T) and torch.equal(down.bias, fused.down_proj_bias[e])

    expert = build().eval()
    expert.save_pretrained(tmp_path / "expert")
    ids = [torch.randint(0, 64, (2, 8), generator=gen) for _ in range(2)]
    results = []
    for source in (tmp_path / "expert", expert.state_dict()):
        quantized = build().eval()
        quantized.load_state_dict(model.state_dict())
        epmq.quantize_model(quantized, epmq.QuantSpec(bits=4, group_size=16), method="epmq",
                            calibration={"t": [dict(input_ids=i) for i in ids]}, experts={"t": source},
                            progress=False)
        results.append(quantized)
    a, b = (r.state_dict() for r in results)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "model.layers.1.mlp.experts.3.up_proj.qweight" in a and "model.layers.1.mlp.experts.3.up_proj.bias" in a
    epmq.save_quantized(results[0], tmp_path / "q")
    loaded = epmq.load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(ids[0]).logits, results[0](ids[0]).logits)


# --------------------------------------------------------------------------- MoE, from a review


def test_one_output_gates_stay_in_full_precision(gen):
    """Qwen2-MoE's shared_expert_gate ([1, H], a sigmoid on the shared expert) is no layer to
    quantize: serving engines load it as a plain weight."""
    from test_walker_models import WIDER

    model = WIDER["qwen2_moe"][0]()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)
    layer = model.model.layers[0].mlp
    assert type(layer.shared_expert_gate) is torch.nn.Linear
    assert isinstance(layer.shared_expert.down_proj, epmq.QuantLinear)


class _ToyRouter(nn.Module):  # (a router by its class name)
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(8, 4)


class _ToyGatingMLP(nn.Module):  # (a gated MLP, as Moshi's: no router)
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 4)


def test_routers_are_found_by_name_and_beside_experts():
    """The linears that route tokens: inside a router; beside a block's experts, one of a single
    output or one of as many outputs as experts alone in its module. Not a shared expert whose
    width equals the experts' count (Qwen3-Next: 512 and 512), nor an expert, nor such a linear
    in a module without experts."""
    mlp = nn.Module()
    mlp.experts = nn.ModuleList(nn.Linear(8, 4) for _ in range(4))
    mlp.router = _ToyRouter()
    mlp.gate = nn.Module()
    mlp.gate.wg = nn.Linear(8, 4)  # (Hunyuan's)
    mlp.shared_expert_gate = nn.Linear(8, 1)  # (Qwen2-MoE's)
    mlp.shared_expert = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 8))
    block = nn.Module()
    block.mlp, block.mixer, block.gating = mlp, nn.Linear(8, 4), _ToyGatingMLP()
    block.attn = nn.Module()
    block.attn.gate = nn.Linear(8, 1)  # (one output, but no experts beside it)
    linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    found = epmq.adapters.routers(block, linears)
    assert sorted(found) == ["mlp.gate.wg", "mlp.router.layer", "mlp.shared_expert_gate"]


@pytest.mark.parametrize("arch, router", [("hunyuanmoev1", "mlp.gate.wg"), ("jetmoe", "router.layer"),
                                          ("afmoe", "mlp.router.gate"), ("longcatflash", "router.classifier")])
def test_routers_stay_in_full_precision(arch, router, gen, tmp_path):
    """Routers as plain linears (Hunyuan's fp32 ``gate.wg``, JetMoE's, AfMoE's, LongCat's) are
    left as they are: the report names them, the checkpoint tells loaders to build them
    unquantized (vLLM does anyway), and the loaded model gives the same logits."""
    import re

    from test_walker_models import WIDER, wider_input

    build, kind = WIDER[arch]
    model = build().eval()
    want = {name: m.weight.detach().clone() for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.endswith(router)}
    assert want
    batch = wider_input(kind, gen)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="gptq", calibration={"t": [batch]},
                        backend="torch", progress=False)
    assert sorted(model.epmq_report.routers) == sorted(want)
    for name, weight in want.items():
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and torch.equal(layer.weight, weight)
    assert any(isinstance(m, epmq.QuantLinear) for m in model.modules())
    epmq.save_quantized(model, tmp_path / "q")
    import json

    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    rules = [key[2:] for key in config.get("dynamic", {}) if key.startswith("-:")]
    assert all(any(re.match(rule, name) for rule in rules) for name in want)
    listed = [rel for group in config["modules_in_block_to_quantize"] for rel in group]
    assert not any(name.endswith(rel) for name in want for rel in listed)
    loaded = epmq.load_quantized(tmp_path / "q")
    with torch.no_grad():
        # (within float32's rounding, not bit for bit: LongCat's mixture summed 3e-8 apart in the
        # loaded model on some draws of the whole file, EPMQ_TEST_SEED=1823339465; a router loaded
        # quantized routes tokens elsewhere, orders of magnitude off)
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-6)


# Families whose checkpoints name an expert's projections w1, w3, w2 (transformers' conversion
# mapping reads ``.experts.*.w1.weight`` into the fused gate_up_proj), beyond Mixtral
W1_W3_W2_FAMILIES = ["phimoe", "minimax", "kimilinear", "lfm2moe", "minimax_m2", "deepseek_v4", "mistral_large4"]


@pytest.mark.parametrize("family", W1_W3_W2_FAMILIES)
def test_w1_w3_w2_experts_in_their_checkpoint_naming(family, gen, tmp_path):
    """PhiMoE's checkpoints (and save_pretrained) name an expert's projections w1, w3, w2, as
    Mixtral's: an expert directory is read, and the quantized checkpoint keeps those names. So do
    MiniMax (M2), Kimi-Linear, LFM2-MoE and DeepSeek-V4: their expert directories were refused
    ("has no tensor ...experts.0.gate_proj.weight"), and their checkpoints named the experts
    gate_proj, up_proj, down_proj under the hub's module path, a layout no loader reads."""
    from test_walker_models import _DEEPSEEK, _MOE, WIDER, _decoder

    torch.manual_seed(0)
    build = {"minimax_m2": _decoder("MiniMaxM2ForCausalLM", "MiniMaxM2Config", num_local_experts=4, head_dim=8, **_MOE),
             "deepseek_v4": _decoder("DeepseekV4ForCausalLM", "DeepseekV4Config", n_routed_experts=4,
                                     moe_intermediate_size=16, head_dim=8, **_MOE),
             # (Mistral Large 4's text model: its mapping reads .experts.*.w1.weight too)
             "mistral_large4": _decoder("MistralLarge4TextModel", "MistralLarge4TextConfig", **_DEEPSEEK,
                                        head_dim=4, index_topk=4, index_head_dim=8, index_n_heads=2)}.get(family) \
        or WIDER[family][0]
    expert = build()
    expert.save_pretrained(tmp_path / "expert")
    model = build().eval()  # (in training mode PhiMoE's router draws random numbers)
    ids = torch.randint(0, 64, (2, 8), generator=gen)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq",
                        calibration={"t": [dict(input_ids=ids)]}, experts={"t": tmp_path / "expert"}, progress=False)
    epmq.save_quantized(model, tmp_path / "q")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert any(k.endswith(".experts.0.w1.qweight") for k in keys)
    assert not any(".experts.0.gate_proj." in k for k in keys)
    loaded = epmq.load_quantized(tmp_path / "q")
    with torch.no_grad():
        out = "logits" if family != "mistral_large4" else "last_hidden_state"  # (a base model: no head)
        assert torch.equal(getattr(loaded(ids), out), getattr(model(ids), out))


# MiniMax-M3's VL model and text model: one experts class, saved per expert (w1, w3, w2) by the
# first and fused by the second
_M3_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, rotary_dim=4, num_local_experts=4, num_experts_per_tok=2,
                dense_intermediate_size=64, shared_intermediate_size=16, index_n_heads=2, index_head_dim=8,
                index_block_size=4, index_topk_blocks=2, max_position_embeddings=64,
                mlp_layer_types=["dense", "sparse"], bos_token_id=0, eos_token_id=1)


def _minimax_m3(vl: bool):
    from test_walker_models import _classes

    if not vl:
        model, config = _classes("MiniMaxM3VLForCausalLM", "MiniMaxM3VLTextConfig")
        return model(config(**_M3_TEXT))
    model, config = _classes("MiniMaxM3SparseForConditionalGeneration", "MiniMaxM3VLConfig")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                  patch_size=14)
    return model(config(text_config=_M3_TEXT, vision_config=vision))


@pytest.mark.parametrize("family", ["minimax_m3_vl", "minimax_m3_text", "mixtral", "phimoe", "qwen3_moe", "llama4",
                                    "nemotronh", "dbrx"])
def test_experts_are_named_as_save_pretrained_writes_them(family, tmp_path):
    """Each rebuilt expert's projection is read from an expert directory (save_pretrained's) under
    its own name, or as a slice of the fused tensor the directory holds. The names come from the
    model's conversion mapping, not the experts class: MiniMax-M3's VL model writes
    ``block_sparse_moe.experts.{e}.w1.weight`` where its text model, of the same experts class,
    writes the fused tensors; the VL model's expert directories were refused ("has no tensor
    ...experts.0.gate_proj.weight, nor ...experts.gate_up_proj holding it")."""
    from safetensors import safe_open
    from test_walker_models import MOE, WIDER, build as build_arch

    from epmq.adapters.moe import Part, rebuild_experts
    from epmq.checkpoint_io import key_renaming

    torch.manual_seed(0)
    model = {"minimax_m3_vl": lambda: _minimax_m3(True), "minimax_m3_text": lambda: _minimax_m3(False),
             **{arch: lambda arch=arch: build_arch(arch) for arch in MOE}}.get(family, WIDER.get(family, [None])[0])()
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        rename = key_renaming(model) or (lambda key: key)
        saved = {rename(key) for key in f.keys()}

    class Everything(epmq.Adapter):
        def block_modules(self, model):
            return list(model.named_modules())

    parts = [p for p in rebuild_experts(Everything("all"), model, model.set_submodule).values()
             if isinstance(p, Part)]
    assert parts
    missing = [str(p) for p in parts if str(p) not in saved and p.fused not in saved]
    assert not missing, missing[:3]
    if family == "minimax_m3_vl":
        assert all(str(p) in saved and str(p).rsplit(".", 2)[1] in ("w1", "w3", "w2") for p in parts)


def test_the_conversion_mapping_is_found_once_not_per_layer(monkeypatch):
    """transformers finds a model's conversion mapping (walking every module) at each
    ``revert_weight_conversion`` of a model ``from_pretrained`` did not load; asked per MoE layer
    (rebuilding its experts) and per group of fused tensors (merging them as saved), the work
    grew with the square of the layers (Qwen3-235B-A22B's 94 layers: 45 s to rebuild its
    experts, 21 s now). Found once for each, whatever the number of layers."""
    import transformers
    import transformers.conversion_mapping as mapping

    from epmq.adapters import find_adapter

    found = mapping.get_model_conversion_mapping
    calls = []
    monkeypatch.setattr(mapping, "get_model_conversion_mapping", lambda *a, **k: calls.append(1) or found(*a, **k))

    def counted(layers):
        config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_local_experts=2,
                                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
        base, expert = transformers.MixtralForCausalLM(config), transformers.MixtralForCausalLM(config)
        calls.clear()
        epmq.merge.average([base, expert])
        merging = len(calls)
        calls.clear()
        find_adapter(base).prepare(base, base.set_submodule)
        return merging, len(calls)

    assert counted(1) == counted(4)


@pytest.mark.parametrize("given_as", ["directory", "module"])
def test_linears_saved_split_are_read_and_saved_as_the_checkpoint_splits_them(given_as, gen, tmp_path):
    """MiniMax-M3 VL's dense MLPs and shared experts hold gate and up as one nn.Linear,
    ``gate_up_proj``, which its checkpoints (and save_pretrained) split into ``gate_proj`` and
    ``up_proj``: its expert directories were refused ("has no tensor ...mlp.gate_up_proj.weight").
    Each is now a linear of its own, read from the expert by its saved name (or by rows of the
    fused tensor, an expert in memory), quantized, and saved under that name, as engines read it;
    the quantized checkpoint loads to the same outputs."""
    from safetensors import safe_open

    torch.manual_seed(0)
    expert = _minimax_m3(True)
    expert.save_pretrained(tmp_path / "expert")
    model = _minimax_m3(True).eval()
    ids = torch.randint(0, 64, (2, 8), generator=gen)
    source = tmp_path / "expert" if given_as == "directory" else expert
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq",
                        calibration={"t": [dict(input_ids=ids)]}, experts={"t": source}, progress=False,
                        layers=r"^(?!model\.vision_tower\.)")
    mlp = model.model.language_model.layers[0].mlp
    assert isinstance(mlp.gate_proj, epmq.QuantLinear) and isinstance(mlp.up_proj, epmq.QuantLinear)
    epmq.save_quantized(model, tmp_path / "q")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    for owner in ("layers.0.mlp", "layers.1.block_sparse_moe.shared_experts"):
        assert {f"language_model.model.{owner}.{p}.qweight" for p in ("gate_proj", "up_proj")} <= keys
    assert not any("gate_up_proj" in k for k in keys)
    loaded = epmq.load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def _step3p7():
    from test_walker_models import _classes

    model, config = _classes("Step3p7ForConditionalGeneration", "Step3p7Config")
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, num_experts_per_tok=2, num_local_experts=4, n_routed_experts=4,
                moe_intermediate_size=16, share_expert_dim=16, max_position_embeddings=64, pad_token_id=0,
                sliding_window=4, mlp_layer_types=["dense", "sparse"], layer_types=["full_attention"] * 2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28,
                  patch_size=14, max_position_embeddings=4)
    return model(config(text_config=text, vision_config=vision))


def _directory_walk_is_the_module_walk(build, ids, tmp_path, quantized=None, output="logits", **kwargs):
    """The E-PMQ walk of ``build()`` (seed 1) given the expert ``build()`` (seed 0) as its
    save_pretrained directory gives what it gives with the expert in memory, and its checkpoint
    loads to the same outputs. ``quantized``: a layer the walk must have quantized; ``ids``: the
    input ids, or the calibration item; ``output``: the output compared."""
    batch = ids if isinstance(ids, dict) else dict(input_ids=ids)
    torch.manual_seed(0)
    expert = build()
    expert.save_pretrained(tmp_path / "expert")
    out = {}
    for given_as, source in (("directory", tmp_path / "expert"), ("module", expert)):
        torch.manual_seed(1)
        model = build().eval()
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq",
                            calibration={"t": [batch]}, experts={"t": source}, progress=False, **kwargs)
        assert quantized is None or isinstance(model.get_submodule(quantized), epmq.QuantLinear)
        with torch.no_grad():
            out[given_as] = getattr(model(**batch), output)
    assert torch.equal(out["directory"], out["module"])
    epmq.save_quantized(model, tmp_path / "q")
    loaded = epmq.load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(getattr(loaded(**batch), output), out["module"])


def test_experts_saved_stacked_by_projection_are_read(gen, tmp_path):
    """Step 3.7's checkpoints (and save_pretrained) hold a block's experts as one tensor per
    projection, ``moe.gate_proj.weight [E, I, H]`` and ``moe.up_proj.weight``, which its conversion
    mapping concatenates into ``mlp.experts.gate_up_proj``: neither one tensor per expert nor the
    fused one, so its expert directories were refused ("has no tensor ...experts.0.gate_proj.weight,
    nor ...experts.gate_up_proj holding it"). Each expert's projection is now read from its stack:
    the walk from the directory gives what the same expert in memory gives, and its checkpoint
    loads to the same outputs."""
    ids = torch.randint(2, 64, (2, 8), generator=gen)
    _directory_walk_is_the_module_walk(_step3p7, ids, tmp_path, layers=r"^model\.language_model\.")



def test_experts_saved_per_expert_from_a_stacked_family_are_warned_of(tmp_path):
    """A quantized Step 3.7 (its own checkpoints stack a block's experts by projection,
    ``moe.gate_proj.weight [E, I, H]``) is saved per expert under the module's names
    (``mlp.experts.{e}.gate_proj``), which load_quantized reads but vLLM's Step 3 loader (stacked
    ``moe.*_proj.weight`` only) does not: it was saved in silence; a ServingWarning names both."""
    from epmq.checkpoint import ServingWarning

    torch.manual_seed(0)
    model = _step3p7().eval()
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False,
                        layers=r"^model\.language_model\.")
    with pytest.warns(ServingWarning, match=r"stacked by projection \(first: model\.layers\.1\.moe\.gate_proj\.weight"
                                            r"[^)]*\).*per expert.*model\.layers\.1\.mlp\.experts\.0\.gate_proj.*vLLM"):
        epmq.save_quantized(model, tmp_path / "q")

def test_linears_saved_as_rows_of_one_tensor_are_read_by_rows(gen, tmp_path):
    """LaraMini's checkpoints (and save_pretrained) hold a linear-attention layer's four input
    projections (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a) as rows of one ``linear_attn.in_proj``,
    which its conversion mapping splits on loading: its expert directories were refused ("has no
    tensor ...linear_attn.in_proj_qkv.weight"). Each is now read by its rows: the walk from the
    directory gives what the same expert in memory gives, and its checkpoint loads to the same
    outputs."""
    from test_walker_models import _LINEAR_ATTENTION, _MOE, _decoder

    build = _decoder("LaraMiniForCausalLM", "LaraMiniConfig", **_LINEAR_ATTENTION, head_dim=8, num_experts=4,
                     moe_intermediate_size=16, shared_expert_intermediate_size=16, sliding_window=4, **_MOE)
    ids = torch.randint(0, 64, (2, 8), generator=gen)
    _directory_walk_is_the_module_walk(build, ids, tmp_path, quantized="model.layers.0.linear_attn.in_proj_z")


def test_a_swiglu_mlps_biases_saved_as_rows_of_one_tensor_are_read_by_rows(gen, tmp_path):
    """DINOv2's SwiGLU MLP (its giant model's) holds gate_proj and up_proj, weights and biases,
    that its checkpoints (and save_pretrained) hold as rows of one ``mlp.weights_in``: the weights
    were read by their rows, the biases not, so the expert path (which runs each expert's blocks
    with every tensor of theirs) refused its expert directories ("holds
    'encoder.layer.0.mlp.gate_proj.bias' inside its mlp.weights_in.bias tensors"). The biases are
    read by their rows too: the walk from the directory gives what the same expert in memory gives."""
    from test_walker_models import _hf

    torch.manual_seed(0)
    expert = _hf("Dinov2Model", "Dinov2Config", image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=64, use_swiglu_ffn=True)().eval()
    expert.save_pretrained(tmp_path / "expert")
    items = [{"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}]
    out = {}
    for given_as, source in (("directory", tmp_path / "expert"), ("module", expert)):
        torch.manual_seed(1)
        model = type(expert)(expert.config).eval()
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq", calibration={"t": items},
                            experts={"t": source}, targets="expert_path", backend="torch", progress=False)
        assert isinstance(model.encoder.layer[0].mlp.gate_proj, epmq.QuantLinear)
        with torch.no_grad():
            out[given_as] = model(**items[0]).last_hidden_state
    assert torch.equal(out["directory"], out["module"])


def test_linears_saved_transposed_under_other_names_are_read(gen, tmp_path):
    """Ergo's checkpoints (and save_pretrained) hold its shared experts' projections and its
    router transposed, under names of their own (``feed_forward.shared_up_proj [in, out]``,
    ``feed_forward.gate_kernel``), which its conversion mapping transposes on loading: its expert
    directories were refused ("has no tensor ...mlp.shared_experts.up_proj.weight"). They are now
    read transposed back: the walk from the directory gives what the same expert in memory gives,
    and its checkpoint loads to the same outputs."""
    from test_walker_models import WIDER

    build = WIDER["ergo"][0]
    ids = torch.randint(0, 64, (2, 8), generator=gen)
    _directory_walk_is_the_module_walk(build, ids, tmp_path, quantized="model.layers.1.mlp.shared_experts.up_proj")


_ENCODER = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64)


def _tipsv2():
    from test_walker_models import _classes

    model, config = _classes("Tipsv2Model", "Tipsv2Config")
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=14,
                  use_swiglu_ffn=True)
    return model(config(text_config=_ENCODER, vision_config=vision))


@pytest.mark.parametrize("family", ["GteForMaskedLM", "JinaEmbeddingsV3ForMaskedLM", "Tipsv2Model"])
def test_biases_saved_as_rows_of_one_tensor_are_read_by_rows(family, gen, tmp_path):
    """GTE's, Jina Embeddings v3's and TIPSv2's checkpoints (and save_pretrained) hold q, k and v
    with their biases as rows of one tensor, weight and bias (``attention.qkv_proj``,
    ``mixer.Wqkv``, ``attn.in_proj_weight`` and ``in_proj_bias``; TIPSv2's vision MLP's gate and
    up as ``mlp.w12``), which their conversion mappings split on loading. The weights were read by
    rows but not the biases, so an expert_path walk, which runs the expert's blocks whole, refused
    their expert directories ("holds '...q_proj.bias' inside its attention.qkv_proj tensors"). The
    biases are read by their rows too: the walk from the directory gives what the same expert in
    memory gives."""
    from test_walker_models import _decoder

    if family == "Tipsv2Model":
        build, output = _tipsv2, "logits_per_image"
        ids = dict(input_ids=torch.randint(2, 64, (2, 8), generator=gen),
                   pixel_values=torch.randn(2, 3, 28, 28, generator=gen))
    else:
        build, output = _decoder(family, family.replace("ForMaskedLM", "Config"), **_ENCODER), "logits"
        ids = torch.randint(2, 64, (2, 8), generator=gen)
    _directory_walk_is_the_module_walk(build, ids, tmp_path, output=output, targets="expert_path")


def _mistral_large4():
    from test_walker_models import _DEEPSEEK, _classes

    model, config = _classes("MistralLarge4ForConditionalGeneration", "MistralLarge4Config")
    # (dense layers only: the loaded model's fused experts, left unwalked here once, were 1e-9 off on some draws)
    text = dict(_ENCODER, vocab_size=300, head_dim=4, index_topk=4, index_head_dim=8, index_n_heads=2,
                model_type="mistral_large4_text", **dict(_DEEPSEEK, first_k_dense_replace=2))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, head_dim=8, model_type="pixtral")
    return model(config(text_config=text, vision_config=vision, image_token_index=299, spatial_merge_size=2))


def _step3p7_vision():
    from test_walker_models import _classes

    model, config = _classes("Step3p7VisionModel", "Step3p7VisionConfig")
    return model(config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        image_size=28, patch_size=14, max_position_embeddings=4))


@pytest.mark.parametrize("family", ["step3p7_vision", "mistral_large4"])
def test_linears_saved_with_their_rows_permuted_are_read_in_the_models_order(family, gen, tmp_path):
    """Step 3.7's and Mistral Large 4's vision towers' checkpoints (and save_pretrained) hold q and
    k (Step 3.7's as rows of one ``attn.in_proj_weight`` and ``in_proj_bias``, Mistral Large 4's
    as ``attention.wq``) with each head's rows in the interleaved order of rotary pairs, which
    their conversion mappings permute (``PermuteForRope``) to the halves the model rotates: their
    expert directories were refused ("holds '...k_proj.weight' inside its attn.in_proj_weight
    tensors"). Their rows are now read in the model's order, the permutation found by
    transformers' own reverse conversion: the walk from the directory gives what the same expert
    in memory gives (Step 3.7's on the expert's path: its biases too), and its checkpoint loads to
    the same outputs."""
    if family == "step3p7_vision":
        batch = dict(pixel_values=torch.randn(2, 3, 28, 28, generator=gen))
        _directory_walk_is_the_module_walk(_step3p7_vision, batch, tmp_path, quantized="layers.1.self_attn.q_proj",
                                           output="last_hidden_state", targets="expert_path")
    else:
        ids = torch.randint(0, 290, (1, 12), generator=gen)
        ids[0, 1:5] = 299  # (a 32 x 32 image: 4 tokens, Pixtral's patches merged 2 x 2)
        batch = dict(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32, generator=gen),
                     image_sizes=torch.tensor([[32, 32]]))
        _directory_walk_is_the_module_walk(_mistral_large4, batch, tmp_path,
                                           quantized="model.vision_tower.transformer.layers.1.attention.k_proj")


def _inkling(mlp="dense"):
    from test_walker_models import _classes

    model, config = _classes("InklingForConditionalGeneration", "InklingConfig")
    text = dict(_ENCODER, num_key_value_heads=2, head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2,
                swa_head_dim=8, sliding_window_size=4, d_rel=4, rel_extent=8, mlp_layer_types=["dense", mlp],
                moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                pad_token_id=0, bos_token_id=0, eos_token_id=1)
    return model(config(text_config=text, audio_config=dict(text_hidden_size=32),
                        vision_config=dict(text_hidden_size=32, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=4, patch_size=8)))


def test_linears_saved_with_their_rows_interleaved_are_read_by_their_rows(gen, tmp_path):
    """Inkling's checkpoints (and save_pretrained) hold a dense MLP's gate and up as one
    ``mlp.w13_dn``, their rows interleaved (gate's first row, up's, gate's second, ...), which its
    conversion mapping splits on loading (``Interleave``, ``Chunk``): its expert directories were
    refused ("holds '...mlp.gate_proj.weight' inside its mlp.w13_dn.weight tensors"). Each is now
    read by its rows of that one: the walk from the directory gives what the same expert in memory
    gives, and its checkpoint loads to the same outputs."""
    ids = torch.randint(2, 64, (2, 8), generator=gen)
    _directory_walk_is_the_module_walk(_inkling, ids, tmp_path, quantized="model.language_model.layers.1.mlp.up_proj",
                                       targets="expert_path", layers=r"^model\.language_model\.")


def test_experts_saved_with_their_rows_interleaved_are_read_by_their_rows(gen, tmp_path):
    """Inkling's checkpoints (and save_pretrained) hold a block's experts' gate and up as one
    ``mlp.experts.w13_weight [E, 2I, H]``, each expert's rows interleaved (gate's first row, up's,
    ...), which its conversion mapping interleaves back into ``gate_up_proj`` on loading: its
    expert directories were refused as of another architecture ("has no tensor
    ...experts.0.gate_proj.weight, nor ...experts.gate_up_proj holding it: it must be a
    checkpoint of the merged model's architecture"). Each expert's gate and up are now read by
    their rows of that one: the walk from the directory gives what the same expert in memory
    gives, and its checkpoint loads to the same outputs."""
    ids = torch.randint(2, 64, (2, 8), generator=gen)
    _directory_walk_is_the_module_walk(lambda: _inkling("sparse"), ids, tmp_path,
                                       quantized="model.language_model.layers.1.mlp.experts.1.up_proj",
                                       layers=r"^model\.language_model\.")


def _qwen3_vl_moe():
    from test_walker_models import _classes

    model, config = _classes("Qwen3VLMoeForConditionalGeneration", "Qwen3VLMoeConfig")
    text = dict(_ENCODER, vocab_size=300, num_key_value_heads=2, head_dim=8, pad_token_id=0, num_experts=4,
                num_experts_per_tok=2, moe_intermediate_size=8, decoder_sparse_step=1,
                rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2], "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=32, num_heads=4, intermediate_size=64, patch_size=2, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, out_hidden_size=32, deepstack_visual_indexes=[0],
                  num_position_embeddings=16)
    return model(config(vision_config=vision, text_config=text, image_token_id=299, video_token_id=296,
                        vision_start_token_id=297, vision_end_token_id=298))


def test_fused_experts_a_checkpoint_holds_transposed_are_read_as_transformers_loads_them(gen, tmp_path):
    """Qwen3-VL-MoE's hub checkpoints (and every expert fine-tuned with transformers 4) hold the
    fused experts transposed, ``experts.gate_up_proj [E, H, 2I]`` and ``down_proj [E, I, H]``,
    which its conversion mapping transposes on loading (``Transpose(1, 2, check_dims=True)``):
    such an expert directory, which transformers loads, was refused as of another architecture
    ("tensor ...experts.gate_up_proj has shape (4, 32, 16), the merged model's has (4, 16, 32);
    experts must share the merged model's architecture"). It is read transposed back: the walk
    gives what the same expert in memory gives."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    expert = _qwen3_vl_moe()
    expert.save_pretrained(tmp_path / "expert")
    weights = tmp_path / "expert" / "model.safetensors"
    held = {k: t.transpose(1, 2).contiguous() if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else t
            for k, t in load_file(weights).items()}
    save_file(held, weights, metadata={"format": "pt"})
    ids = torch.randint(2, 290, (2, 8), generator=gen)
    out = {}
    for given_as, source in (("directory", tmp_path / "expert"), ("module", expert)):
        torch.manual_seed(1)
        model = _qwen3_vl_moe().eval()
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="epmq",
                            calibration={"t": [dict(input_ids=ids)]}, experts={"t": source}, progress=False,
                            layers=r"^model\.language_model\.")
        assert isinstance(model.get_submodule("model.language_model.layers.1.mlp.experts.2.down_proj"),
                          epmq.QuantLinear)
        with torch.no_grad():
            out[given_as] = model(input_ids=ids).logits
    assert torch.equal(out["directory"], out["module"])


def test_an_experts_rows_of_a_fused_tensor_are_read_once(gen, monkeypatch):
    """Gate and up are rows of one fused gate_up_proj: each reads its own rows, so an E-PMQ walk
    reads every element of the experts' fused tensors once per task, not twice."""
    import epmq.checkpoint_io as io
    from test_walker_models import Family

    fam = Family("qwen3_moe", gen, tasks=["a"])
    read = {}
    original = io._read_tensor

    def counted(store, key, index=None):
        t = original(store, key, index)
        read[key.rpartition(".")[2]] = read.get(key.rpartition(".")[2], 0) + t.numel()
        return t

    monkeypatch.setattr(io, "_read_tensor", counted)
    epmq.quantize_model(fam.merged(), epmq.QuantSpec(bits=4, group_size=16), method="epmq",
                        calibration=fam.calibration, experts=fam.experts, progress=False)
    fused = {n.rpartition(".")[2]: t.numel() for n, t in fam.base.state_dict().items() if "experts." in n}
    per_layer = sum(1 for n in fam.base.state_dict() if n.endswith("experts.gate_up_proj"))
    assert read["gate_up_proj"] == fused["gate_up_proj"] * per_layer
    assert read["down_proj"] >= fused["down_proj"] * per_layer


def test_a_vlm_tower_no_adapter_knows_is_named(gen):
    """Llama 4's VLM, its vision encoder's layers of a class no adapter knows (UnlistedVisionLayer:
    HF_ENCODERS lists Llama 4's own): the text decoder is walked; the vision layers are named in a
    warning rather than left in full precision silently."""
    import transformers
    from test_walker_towers import UnlistedVisionLayer

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=16, intermediate_size_mlp=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                num_local_experts=4, num_experts_per_tok=1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32,
                  pixel_shuffle_ratio=0.5)
    torch.manual_seed(0)
    model = transformers.Llama4ForConditionalGeneration(
        transformers.Llama4Config(text_config=text, vision_config=vision, image_token_index=63)).eval()
    for layer in model.vision_model.model.layers:
        layer.__class__ = UnlistedVisionLayer
    with pytest.warns(UserWarning, match=r"no adapter knows the blocks at vision_model\.model\.layers "
                                         r"\(UnlistedVisionLayer\)"):
        epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="rtn", progress=False)


# ---------------------------------------------------------------- rebuilt modules against the originals


@pytest.mark.parametrize("batch_first", [True, False])
def test_linear_attention_per_head_weights_and_both_masks_as_multihead_attention(batch_first, gen):
    """``average_attn_weights=False`` returns every head's weights; an ``attn_mask`` and a
    ``key_padding_mask`` given together both apply, as in ``nn.MultiheadAttention``."""
    E, H, N, L = 16, 4, 3, 5
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_(generator=gen)
    x = torch.randn((N, L, E) if batch_first else (L, N, E), generator=gen)
    kwargs = dict(attn_mask=torch.ones(L, L, dtype=torch.bool).triu(1),  # (position 0 always unmasked)
                  key_padding_mask=torch.arange(L)[None, :].expand(N, L) >= torch.tensor([[L], [L - 2], [2]]))
    linear = LinearMultiheadAttention(mha)
    with torch.no_grad():
        for need_weights in (True, False):
            want = mha(x, x, x, need_weights=need_weights, average_attn_weights=False, **kwargs)
            got = linear(x, x, x, need_weights=need_weights, average_attn_weights=False, **kwargs)
            assert_attends_as(got, want)
            if need_weights:
                assert got[1].shape == (N, H, L, L)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [False, True])
def test_linear_attention_unbatched_input_as_multihead_attention(batch_first, need_weights, gen):
    E, H, L = 16, 2, 5
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first).eval()
    x = torch.randn(L, E, generator=gen)
    linear = LinearMultiheadAttention(mha)
    with torch.no_grad():
        want = mha(x, x, x, need_weights=need_weights)
        got = linear(x, x, x, need_weights=need_weights)
    assert got[0].shape == want[0].shape == (L, E)
    assert_attends_as(got, want)


@pytest.mark.parametrize("need_weights", [False, True])
def test_linear_attention_is_causal_without_a_mask_is_the_causal_mask(need_weights, gen):
    """``is_causal=True`` and no mask: each position attends to itself and those before it."""
    E, H, N, L = 16, 4, 2, 6
    mha = nn.MultiheadAttention(E, H, batch_first=True).eval()
    x = torch.randn(N, L, E, generator=gen)
    linear = LinearMultiheadAttention(mha)
    causal = torch.full((L, L), float("-inf")).triu(1)
    with torch.no_grad():
        want = mha(x, x, x, need_weights=need_weights, attn_mask=causal)
        got = linear(x, x, x, need_weights=need_weights, is_causal=True)
    assert_attends_as(got, want)


def test_linear_attention_refuses_bias_kv():
    with pytest.raises(NotImplementedError, match="add_bias_kv"):
        LinearMultiheadAttention(nn.MultiheadAttention(16, 2, add_bias_kv=True))
    with pytest.raises(NotImplementedError, match="add_zero_attn"):
        LinearMultiheadAttention(nn.MultiheadAttention(16, 2, add_zero_attn=True))


def test_moe_experts_stages_gate_and_up_in_then_down_out(gen):
    """``MoEAdapter.stage``: every expert's gate and up projections in ``"<experts>.in"``, every
    down projection in ``"<experts>.out"`` (Mixtral's w1, w3 and w2 too); other linears None."""
    from epmq.adapters import MOE_DECODERS
    from epmq.adapters.moe import LinearExperts

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(3, 8, 4, generator=gen))
            self.down_proj = nn.Parameter(torch.randn(3, 4, 4, generator=gen))
            self.act_fn = nn.SiLU()

    class MixtralExperts(Fused):
        pass

    for fused, (g, u, d) in ((Fused(), ("gate_proj", "up_proj", "down_proj")), (MixtralExperts(), ("w1", "w3", "w2"))):
        block = nn.Module()
        block.mlp = nn.Module()
        block.mlp.experts = LinearExperts(fused)
        block.mlp.router = nn.Linear(4, 3)
        for e in range(3):
            assert MOE_DECODERS.stage(block, f"mlp.experts.{e}.{g}") == "mlp.experts.in"
            assert MOE_DECODERS.stage(block, f"mlp.experts.{e}.{u}") == "mlp.experts.in"
            assert MOE_DECODERS.stage(block, f"mlp.experts.{e}.{d}") == "mlp.experts.out"
        assert MOE_DECODERS.stage(block, "mlp.router") is None


def test_llama4_experts_take_a_routed_token_with_a_zero_feature(gen):
    """A token is routed to an expert where its row is nonzero
    anywhere, so a routed token one of whose features is exactly zero is still computed."""
    from epmq.adapters.moe import Llama4LinearExperts

    hidden, inner, n_experts, tokens = 8, 12, 3, 5
    fused = _llama4_moe(gen, hidden, inner, n_experts, 1).experts
    x = torch.randn(n_experts, tokens, hidden, generator=gen)
    x[:, 1] = 0  # (not routed)
    x[:, 2, 3] = 0  # (routed, one feature zero)
    x = x.view(-1, hidden)
    with torch.no_grad():
        want = fused(x)
        got = Llama4LinearExperts(fused)(x)
    assert want.view(n_experts, tokens, hidden)[:, 2].abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_experts_tagged_transposed_are_rebuilt_from_their_transpose(gen):
    """Fused experts of transformers' usual call tagged ``is_transposed`` (Aria's:
    ``gate_up_proj [E, H, 2I]``, ``down_proj [E, I, H]``) become linears viewing the transposed
    slices, computing what the fused module computes; untagged ones of another layout or gate
    (gpt-oss-style interleaving, biases, a custom gate) are left to the family's own adapter by
    ``AUTO``."""
    import transformers
    from epmq.adapters.moe import TransposedLinearExperts, _known_call

    config = transformers.AriaTextConfig(vocab_size=64, hidden_size=8, intermediate_size=6, moe_num_experts=3,
                                         moe_topk=2, num_attention_heads=2, num_hidden_layers=1)
    fused = transformers.models.aria.modeling_aria.AriaExperts(config)
    with torch.no_grad():
        for p in fused.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    assert fused.is_transposed and _known_call(fused)
    linears = TransposedLinearExperts(fused)
    for e in range(3):
        gate, up, down = linears[e].projections()
        assert torch.equal(gate.weight, fused.gate_up_proj[e, :, :6].T)
        assert torch.equal(up.weight, fused.gate_up_proj[e, :, 6:].T)
        assert torch.equal(down.weight, fused.down_proj[e].T)
        assert gate.weight.data_ptr() == fused.gate_up_proj[e].data_ptr()  # (a view, not a copy)
    x = torch.randn(7, 8, generator=gen)
    index, weights = torch.randint(0, 3, (7, 2), generator=gen), torch.rand(7, 2, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(linears(x, index, weights), fused(x, index, weights), rtol=1e-4, atol=1e-4)
    for flag, value in (("is_concatenated", False), ("has_bias", True)):
        setattr(fused, flag, value)
        assert not _known_call(fused)
        setattr(fused, flag, not value)


def _rebuilt(fused):
    """``fused`` as AUTO's prepare rebuilds it (the module in its place, the checkpoint parts)."""
    from epmq.adapters.moe import rebuild_experts

    holder = nn.Module()
    holder.experts = fused
    holder.block_modules = lambda model: model.named_modules()
    renames = rebuild_experts(holder, holder, lambda name, new: setattr(holder, name, new), known_call_only=True)
    return holder.experts, renames


@pytest.mark.parametrize("family", ["bailing_hybrid", "hy_v4", "beam"])
def test_fused_experts_with_a_gate_of_their_own_keep_it(family, gen):
    """Fused experts of the usual layout whose ``_apply_gate`` is their own (Ling's per-layer
    SwiGLU limit, Hunyuan V4's clamped SwiGLU, Beam's product in fp32) are rebuilt as linears
    that apply that very gate: the same outputs (they were left fused, in full precision)."""
    import importlib

    from epmq.adapters.moe import LinearExperts, _known_call

    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    fused_class = next(c for n, c in vars(module).items() if n.endswith("Experts") and c.__module__ == module.__name__)
    config = SimpleNamespace(num_local_experts=3, num_experts=3, hidden_size=8, moe_intermediate_size=6,
                                   hidden_act="silu", swiglu_limits=[0.5], limit_after_act=False,
                                   swiglu_limit=0.5, _experts_implementation="eager")
    fused = fused_class(config, 0) if family == "bailing_hybrid" else fused_class(config)
    with torch.no_grad():
        for p in fused.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    assert _known_call(fused)
    linears, renames = _rebuilt(fused)
    assert isinstance(linears, LinearExperts) and renames
    assert not any(p.dim() == 3 for p in linears.parameters())
    x = torch.randn(9, 8, generator=gen) * 3  # (past the limits)
    index, weights = torch.randint(0, 3, (9, 2), generator=gen), torch.rand(9, 2, generator=gen)
    with torch.no_grad():
        want = fused(x, index, weights)
        atol = 1e-5 * float(want.abs().max())  # (outputs in the hundreds: fp32's sums differ in order)
        torch.testing.assert_close(linears(x, index, weights), want, rtol=1e-5, atol=atol)
        assert linears.activation is not None
        if family == "beam":  # (its gate differs from act(gate) * up in bf16 only)
            return
        # (the clamp matters here: act(gate) * up is another function)
        linears.activation = None
        linears.act_fn = nn.SiLU()
        assert not torch.allclose(linears(x, index, weights), want, rtol=1e-5, atol=atol)


def assert_routes_as(linears, fused, x, gen):
    """``linears`` and ``fused`` (3 experts) give the same outputs for tokens ``x`` each routed to
    2 distinct random experts with random weights."""
    tokens = x.reshape(-1, x.shape[-1]).shape[0]
    index = torch.stack([torch.randperm(3, generator=gen)[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(linears(x, index, weights), fused(x, index, weights), rtol=1e-5, atol=1e-5)


def _experts_of(kind, gen):
    """Fused experts of three layouts, with random weights: Nemotron-H's (no gate: ``up_proj
    [E, I, H]``); without a gate and stored transposed (``up_proj [E, H, I]``, as Ergo's
    projections); and of the usual layout, normed after each (``has_post_expert_norm``, as
    MuseSpark's)."""
    import transformers
    from transformers.integrations.moe import use_experts_implementation

    if kind == "nemotron_h":
        config = SimpleNamespace(n_routed_experts=3, hidden_size=8, moe_intermediate_size=6, moe_latent_size=None,
                                 mlp_hidden_act="relu2", _experts_implementation="eager")
        fused = transformers.models.nemotron_h.modeling_nemotron_h.NemotronHExperts(config)
    else:
        transposed, normed = kind == "transposed", kind == "normed"

        @use_experts_implementation(has_gate=normed, is_transposed=transposed, has_post_expert_norm=normed)
        class Experts(nn.Module):
            def __init__(self, config):
                super().__init__()
                self.num_experts = 3
                up = (3, 8, 6) if transposed else (3, 12 if normed else 6, 8)
                setattr(self, "gate_up_proj" if normed else "up_proj", nn.Parameter(torch.empty(up)))
                self.down_proj = nn.Parameter(torch.empty((3, 6, 8) if transposed else (3, 8, 6)))
                self.post_expert_norm = nn.LayerNorm(8) if normed else None
                self.act_fn = nn.SiLU()

            def forward(self, hidden_states, top_k_index, top_k_weights):
                out = torch.zeros_like(hidden_states)
                for e in range(3):
                    token, position = torch.where(top_k_index == e)
                    x = hidden_states[token]
                    if normed:
                        gate, up = (x @ self.gate_up_proj[e].T).chunk(2, dim=-1)
                        y = self.post_expert_norm((self.act_fn(gate) * up) @ self.down_proj[e].T)
                    else:
                        y = self.act_fn(x @ self.up_proj[e]) @ self.down_proj[e]
                    out.index_add_(0, token, y * top_k_weights[token, position, None])
                return out

        fused = Experts(SimpleNamespace(_experts_implementation="eager"))
    with torch.no_grad():
        for p in fused.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return fused


@pytest.mark.parametrize("kind", ["nemotron_h", "transposed", "normed"])
def test_experts_without_a_gate_or_normed_after_each_as_linears(kind, gen):
    """Fused experts without a gate (Nemotron-H's relu^2 experts; they were left fused, in full
    precision, under a warning too small to fire: most of a real Nemotron-H's weights), stored
    transposed or not, and experts normed after each: one linear per projection viewing the
    fused weight, named as the hub's per-expert checkpoints name them, and the same outputs."""
    from epmq.adapters.moe import LinearExperts, _known_call

    fused = _experts_of(kind, gen)
    assert _known_call(fused)
    linears, renames = _rebuilt(fused)
    assert isinstance(linears, LinearExperts)
    assert not any(p.dim() == 3 for p in linears.parameters())
    names = ("gate_proj", "up_proj", "down_proj") if kind == "normed" else ("up_proj", "down_proj")
    assert linears[2].names == names
    up = renames["experts.2.up_proj.weight"]
    assert torch.equal(up.take(fused.gate_up_proj if kind == "normed" else fused.up_proj), linears[2].up_proj.weight)
    assert_routes_as(linears, fused, torch.randn(9, 8, generator=gen), gen)


def test_ergo_experts_normed_each_with_its_own_weight(gen):
    """Ergo's experts take the usual layout and call but norm each expert's output with a weight
    of its own, in a forward of their own that no flag announces: rebuilt with that norm, the
    same outputs."""
    import transformers

    from epmq.adapters.moe import ErgoLinearExperts

    config = SimpleNamespace(num_experts=3, hidden_size=8, moe_intermediate_size=6, rms_norm_eps=1e-6,
                             _experts_implementation="eager")
    fused = transformers.models.ergo.modeling_ergo.ErgoExperts(config)
    with torch.no_grad():
        for p in fused.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    linears, renames = _rebuilt(fused)
    assert isinstance(linears, ErgoLinearExperts) and renames
    assert_routes_as(linears, fused, torch.randn(9, 8, generator=gen), gen)


def test_fused_experts_that_compute_something_else_stay_fused(gen):
    """Fused experts of the usual layout and call whose forward adds a step of its own (here a
    doubling): rebuilt as plain linears they would give other outputs, silently. They stay fused,
    in full precision, with a warning naming them."""
    from epmq.adapters.moe import _known_call

    fused = _experts_of("transposed", gen)
    plain = type(fused).forward

    def doubled(self, hidden_states, top_k_index, top_k_weights):
        return 2 * plain(self, hidden_states, top_k_index, top_k_weights)

    type(fused).forward = doubled
    assert _known_call(fused)
    with pytest.warns(UserWarning, match="Experts: one linear per expert does not compute"):
        linears, renames = _rebuilt(fused)
    assert linears is fused and not renames


def test_dbrx_experts_as_linears(gen):
    """DBRX's experts (``w1``, ``v1``, ``w2``, each ``[E * I, H]``; the down projection the
    transpose of ``w2``'s rows; 88% of its blocks stayed in full precision): linears viewing those
    rows, the same outputs on the block's ``[B, T, H]``, and each part read from a fused
    checkpoint tensor alone as the linear holds it."""
    import transformers
    from epmq.adapters.moe import DbrxLinearExperts

    config = SimpleNamespace(hidden_size=8, ffn_hidden_size=6, moe_num_experts=3, ffn_act_fn={"name": "silu"})
    fused = transformers.models.dbrx.modeling_dbrx.DbrxExperts(config)
    with torch.no_grad():
        for p in fused.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    linears, renames = _rebuilt(fused)
    assert isinstance(linears, DbrxLinearExperts)
    w1, v1, w2 = linears[1].projections()
    assert torch.equal(w1.weight, fused.mlp.w1[6:12]) and torch.equal(v1.weight, fused.mlp.v1[6:12])
    assert torch.equal(w2.weight, fused.mlp.w2[6:12].T) and w2.weight.data_ptr() == fused.mlp.w2[6].data_ptr()
    for name, linear in (("w1", w1), ("v1", v1), ("w2", w2)):
        part = renames[f"experts.mlp.1.{name}.weight"]
        on_disk = getattr(fused.mlp, name).detach().clone()
        assert torch.equal(part.take(on_disk[part.where], read=True), linear.weight)
    assert_routes_as(linears, fused, torch.randn(2, 5, 8, generator=gen), gen)


def test_jetmoe_parallel_experts_as_linears(gen):
    """JetMoE's ``ParallelExperts`` (``weight [E, out, in]``, called on tokens sorted by expert
    with each one's count) as ``nn.Linear`` per expert viewing the weight: the same output, an
    expert without tokens included; its rows read from a checkpoint's fused tensor."""
    import transformers
    from epmq.adapters.moe import SplitLinears, is_split_experts

    fused = transformers.models.jetmoe.modeling_jetmoe.JetMoeParallelExperts(4, 8, 6)
    with torch.no_grad():
        fused.weight.copy_(torch.randn(fused.weight.shape, generator=gen))
    assert is_split_experts(fused) and not is_split_experts(nn.Linear(8, 6))
    linears, renames = _rebuilt(fused)
    assert isinstance(linears, SplitLinears) and linears[2].weight.data_ptr() == fused.weight[2].data_ptr()
    part = renames["experts.2.weight"]
    assert torch.equal(part.take(fused.weight), linears[2].weight)
    x, counts = torch.randn(7, 8, generator=gen), [3, 0, 4, 0]
    called = []
    linears[1].register_forward_hook(lambda *a: called.append(1))
    with torch.no_grad():
        torch.testing.assert_close(linears(x, counts), fused(x, counts), rtol=0, atol=0)
    assert not called


@pytest.mark.parametrize("method", ["gptq", "epmq"])
def test_jetmoe_experts_no_token_reaches_are_rounded_to_nearest(method, gen):
    """JetMoE's experts (one ``[E, out, in]`` weight, as ``SplitLinears``) are a stage as fused
    experts are: one no calibration token reaches is rounded to nearest and reported, in the MLP
    (``mlp.input_linear.3``, whose name says nothing of experts: it stayed in full precision, as a
    linear never called) as in the attention's experts."""
    from epmq import quant
    from test_walker_models import WIDER, perturb

    torch.manual_seed(0)
    model = WIDER["jetmoe"][0]().eval()
    for layer in model.model.layers:  # (expert 3 never chosen, in the MLP and in the attention)
        for router in (layer.mlp.router.layer, layer.self_attention.experts.router.layer):
            router.bias = nn.Parameter(torch.tensor([0.0, 0.0, 0.0, -1e4]))
    W = model.model.layers[0].mlp.input_linear.weight[3].detach().clone()
    experts = {"a": perturb(model, gen)} if method == "epmq" else None
    calibration = {"a": [torch.randint(1, 64, (2, 8), generator=gen) for _ in range(2)]}
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method=method, calibration=calibration,
                        experts=experts, backend="torch", progress=False)
    report = model.epmq_report
    assert not report.skipped
    assert set(report.unreached) == {f"model.layers.{i}.{m}.{p}.3" for i in (0, 1)
                                     for m in ("mlp", "self_attention.experts") for p in ("input_linear", "output_linear")}
    layer = model.get_submodule("model.layers.0.mlp.input_linear.3")
    rtn = epmq.QuantLinear.from_result(quant.rtn(W, epmq.QuantSpec(bits=4, group_size=16)), None)
    torch.testing.assert_close(layer.dequantize(), rtn.dequantize(), rtol=0, atol=0)


def test_a_slot_of_weight_zero_is_not_a_token_of_the_expert(gen):
    """LongCat-Flash sends the tokens its router gives to zero-computation experts to real experts,
    with weight zero (they add nothing): those are not the expert's tokens, so its statistics
    count only the tokens routed to it with a weight, each once (they were counted, once per such
    slot, several times over). The model's outputs are the fused experts' still."""
    from test_walker_models import WIDER

    torch.manual_seed(0)
    model = WIDER["longcatflash"][0]().eval()
    fused = model.model.layers[0].mlp.experts
    routed = {}  # expert -> tokens the router gives it with a weight, in plain forwards

    def count(module, args):
        _, index, weights = args
        for e in range(module.num_experts):
            routed[e] = routed.get(e, 0) + int(((index == e) & (weights != 0)).any(-1).sum())

    handle = fused.register_forward_pre_hook(count)
    calibration = {"a": [torch.randint(1, 64, (2, 16), generator=gen) for _ in range(2)]}
    with torch.no_grad():
        [model(x) for x in calibration["a"]]
    handle.remove()
    assert 0 < sum(routed.values()) < 2 * 16 * 2  # (zero-weight slots are there to leave out)
    epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method="gptq", calibration=calibration,
                        true_sequential=False, backend="torch", progress=False)
    tokens = {layer["name"]: layer["n_tokens"] for layer in model.epmq_report.layers}
    assert [tokens.get(f"model.layers.0.mlp.experts.{e}.gate_proj", 0) for e in range(4)] == \
        [routed[e] for e in range(4)]
    # the rebuilt experts' call: the fused module's output (to float32 rounding: products of other
    # shapes), with slots of weight zero
    rebuilt = epmq.adapters.moe.LinearExperts(fused)
    x, index = torch.randn(5, 32, generator=gen), torch.tensor([[0, 1], [1, 2], [2, 3], [3, 1], [0, 2]])
    weights = torch.rand(5, 2, generator=gen)
    weights[1, 0] = weights[3, 1] = 0.0  # (expert 1's slots of tokens 1 and 3)
    seen = []
    rebuilt[1].gate_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, index, weights), fused(x, index, weights), rtol=1e-5, atol=1e-6)
    assert torch.equal(seen[0], x[[0]])


class SameLinear(nn.Linear):
    """Its own forward, a linear layer's math (as Falcon's ``FalconLinear``)."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class GroupedLinear(nn.Linear):
    """Its own forward, block-diagonal over 2 groups (as DeepSeek-V4's grouped output projection):
    ``in_features`` is one group's width."""

    def forward(self, x):
        W = self.weight.view(2, -1, self.in_features)
        return torch.einsum("...gi,goi->...go", x.unflatten(-1, (2, -1)), W).flatten(-2)


class SubclassBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.same, self.grouped = SameLinear(32, 32), GroupedLinear(16, 32)

    def forward(self, x):
        return x + self.grouped(self.same(x))


class SameBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.same = SameLinear(32, 32)

    def forward(self, x):
        return x + self.same(x)


def test_linear_subclasses_that_compute_something_else_are_left_whole(gen, monkeypatch):
    """An ``nn.Linear`` subclass with its own forward is quantized where that forward is a linear
    layer's (a packed layer in its place computes the same), and left in full precision, said
    in a warning, where it computes something else from its weight (a packed layer in its place
    would be silently wrong)."""
    # (each class is tried and warned of once a process: a run before this one would leave no warning)
    monkeypatch.setattr(epmq.adapters, "_COMPUTES_LINEAR", {})
    model = nn.Sequential(nn.Linear(8, 32), nn.Sequential(SubclassBlock(), SubclassBlock())).eval()
    x = torch.randn(16, 8, generator=gen)
    reference = model(x).detach()
    with pytest.warns(UserWarning, match="GroupedLinear subclasses nn.Linear but its forward computes something else"):
        epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method="gptq", backend="torch",
                            calibration={"a": [torch.randn(16, 8, generator=gen)]}, progress=False,
                            adapter=epmq.Adapter("toy", block_types=("SubclassBlock",)))
    assert [layer["name"] for layer in model.epmq_report.layers] == ["1.0.same", "1.1.same"]
    assert all(type(block.grouped) is GroupedLinear for block in model[1])
    assert float((model(x).detach() - reference).norm() / reference.norm()) < 0.02


def test_linear_subclasses_that_compute_a_linear_layer_are_packed_under_warnings_as_errors(gen, monkeypatch):
    """The check of a subclass's forward compared it with a product that asked for a derivative, and
    torch's warning on reading that as a number, an error under ``-W error``, had it judged to
    compute something else: Falcon's linears were left in full precision (and every later one of
    their class in the process). Warnings as errors, they are packed."""
    monkeypatch.setattr(epmq.adapters, "_COMPUTES_LINEAR", {})
    model = nn.Sequential(nn.Linear(8, 32), nn.Sequential(SameBlock(), SameBlock())).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method="gptq", backend="torch",
                            calibration={"a": [torch.randn(16, 8, generator=gen)]}, progress=False,
                            adapter=epmq.Adapter("toy", block_types=("SameBlock",)))
    assert [layer["name"] for layer in model.epmq_report.layers] == ["1.0.same", "1.1.same"]


def test_siglip2_padded_patches_are_no_calibration_tokens(gen, monkeypatch):
    """SigLIP 2's processor pads each image's patches to the batch's count (``pixel_attention_mask``
    marks the real ones); no patch attends to the padded ones and the pooling head leaves them out.
    The statistics are those of the real patches (every position was counted), as of each image
    alone; a two-tower model's text stack, of as many positions, is not masked by them."""
    import transformers
    from test_walker_models import assert_same_statistics, walked_inputs

    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                  num_patches=16)
    model = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**vision)).eval()
    pixels = torch.randn(2, 16, 192, generator=gen)
    pixels[1, 10:] = 0
    item = {"pixel_values": pixels, "pixel_attention_mask": torch.tensor([[1] * 16, [1] * 10 + [0] * 6]),
            "spatial_shapes": torch.tensor([[4, 4], [2, 5]])}
    target = "encoder.layers.1.self_attn.q_proj"
    hand = []
    handle = model.get_submodule(target).register_forward_pre_hook(
        lambda m, args: hand.append(args[0].detach().reshape(-1, 32).double()))
    with torch.no_grad():  # each image alone: its real patches only
        for b, n in ((0, 16), (1, 10)):
            model(pixel_values=pixels[b:b + 1, :n], pixel_attention_mask=item["pixel_attention_mask"][b:b + 1, :n],
                  spatial_shapes=item["spatial_shapes"][b:b + 1])
    handle.remove()
    seen = walked_inputs(monkeypatch)
    epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=16), method="gptq", calibration={"a": [item]},
                        layers=lambda name: name == target, backend="torch", progress=False)
    assert sum(x.shape[0] for x in seen) == 26
    assert_same_statistics(seen, hand)
    two_towers = transformers.Siglip2Model(transformers.Siglip2Config(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4), vision_config=vision))
    text_item = {"input_ids": torch.zeros(2, 16, dtype=torch.long), **item}
    mask = epmq.adapters.HF_ENCODERS.token_mask
    assert mask(two_towers, "text_model.encoder.layers", text_item) is None
    assert torch.equal(mask(two_towers, "vision_model.encoder.layers", text_item), item["pixel_attention_mask"] != 0)


def test_a_linear_saved_whole_under_another_name_is_read_there(monkeypatch):
    """A linear a converter saves whole under another name, its entries in order (one tensor
    covering it all: ``SavedLayout.pieces`` gives ``slice(None)``), is read there as rows 0 to
    out; its piece's bounds were taken as numbers, and the walk's preparation ended in
    "unsupported operand type(s) for %: 'NoneType' and 'int'"."""
    import epmq.checkpoint_io as io
    from epmq.adapters.moe import fused_saved_linears

    class Layout:
        def group(self, name):
            return [name] if name == "a.lin.weight" else None

        def pieces(self, names):
            return [("a.saved.weight", (4, 3), [("a.lin.weight", slice(None), slice(None))])]

    class Blocks(epmq.Adapter):
        def block_modules(self, model):
            return [("a.lin", nn.Linear(3, 4, bias=False))]

    monkeypatch.setattr(io, "key_renaming", lambda model: None)
    part = fused_saved_linears(Blocks("b"), None, Layout())["a.lin.weight"]
    assert (part.fused, part.index, part.rows, part.fused_shape) == ("a.saved.weight", None, (0, 4), (4, 3))


def _attention_pooled(kind):
    """A tiny open_clip model whose attention pool sits after its image tower's blocks, the pool's name
    and its linears: CoCa (its image tower's AttentionalPooler, an nn.MultiheadAttention reading keys
    64 wide into queries 32 wide, as coca_ViT-L-14's 1024 into 768), and a CLIP on a timm ViT pooled by
    its MAP head (timm_pool 'map', timm_proj 'none', as ViT-*-SigLIP* are: AttentionPoolLatent, as
    PE-Core-*'s)."""
    torch.manual_seed(0)
    if kind == "coca":
        from open_clip.coca_model import CoCa

        from test_walker_models import COCA_CFG

        model = CoCa(**dict(COCA_CFG, vision_cfg=dict(COCA_CFG["vision_cfg"], width=64)))
        with torch.no_grad():  # (open_clip leaves the decoder's projection uninitialised: torch.empty)
            model.text_decoder.text_projection.normal_(std=32**-0.5)
        return (model.eval(), "visual.attn_pool",
                ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.out_proj"])
    if kind == "siglip-map":
        from open_clip.model import CLIP

        from test_walker_models import TIMM_CLIP_CFG, _register_timm_model

        _register_timm_model()
        vision = dict(TIMM_CLIP_CFG["vision_cfg"], timm_pool="map", timm_proj="none")
        model = CLIP(**dict(TIMM_CLIP_CFG, embed_dim=32, vision_cfg=vision))
        return model.eval(), "visual.trunk.attn_pool", ["q", "kv", "proj", "mlp.fc1", "mlp.fc2"]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["coca", "siglip-map"])
def test_attention_pools_after_the_blocks_left_in_full_precision_are_warned_of(kind, gen):
    """The attention pool after an image tower's blocks (CoCa's attn_pool, the MAP head of open_clip's
    SigLIP and PE-Core image towers: q/k/v, output and MLP projections, a block's worth of weights)
    stayed in full precision without a word, where RN50's attention pool is named in a warning; it is
    named with its linears, which are all that is left in full precision."""
    model, pool, names = _attention_pooled(kind)
    text = torch.randint(1, 60, (2, 8), generator=gen)
    text[:, -1] = 63
    item = {"image": torch.randn(2, 3, 16, 16, generator=gen), "text": text}
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method="gptq",
                            calibration={"task": [item]}, progress=False)
    said = [str(w.message) for w in said if "stay in full precision" in str(w.message)]
    assert len(said) == 1 and f" {pool} ({', '.join(names)}) stay in full precision" in said[0], said
    left = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.MultiheadAttention))]
    assert left and all(f"{n}.".startswith(f"{pool}.") for n in left), left


_HF_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                  patch_size=8)
_HF_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_SIGLIP_HEAD = ["attention.in_proj_weight", "attention.out_proj", "mlp.fc1", "mlp.fc2"]


def _hf_pooled(kind):
    """A tiny transformers model holding a SigLIP-like attention-pooling head after its image tower's
    blocks, the head's name and its linears (None where the head's output is not what the model returns)."""
    import transformers

    torch.manual_seed(0)
    siglip2 = dict(_HF_VISION, num_patches=4)
    del siglip2["image_size"]
    made = {
        "siglip_vision": lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**_HF_VISION)),
        "siglip": lambda: transformers.SiglipModel(transformers.SiglipConfig(vision_config=_HF_VISION,
                                                                             text_config=_HF_TEXT)),
        "siglip2_vision": lambda: transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**siglip2)),
        "siglip2": lambda: transformers.Siglip2Model(transformers.Siglip2Config(vision_config=siglip2,
                                                                                text_config=_HF_TEXT)),
        "aimv2_vision": lambda: transformers.Aimv2VisionModel(transformers.Aimv2VisionConfig(**_HF_VISION)),
        # the head computed, its output unread: the classifier averages the tokens, a VLM reads the hidden states
        "siglip_classifier": lambda: transformers.SiglipForImageClassification(transformers.SiglipConfig(
            vision_config=_HF_VISION, text_config=_HF_TEXT, num_labels=3)),
        "llava_siglip": lambda: transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
            vision_config=dict(_HF_VISION, model_type="siglip_vision_model"),
            text_config=dict(_HF_TEXT, model_type="llama", vocab_size=300), image_token_id=299)),
    }
    heads = {"siglip_vision": ("head", _SIGLIP_HEAD), "siglip": ("vision_model.head", _SIGLIP_HEAD),
             "siglip2_vision": ("head", _SIGLIP_HEAD), "siglip2": ("vision_model.head", _SIGLIP_HEAD),
             "aimv2_vision": ("head", ["k_proj", "v_proj", "output_proj"])}
    return made[kind]().eval(), heads.get(kind)


@pytest.mark.parametrize("kind", ["siglip_vision", "siglip", "siglip2_vision", "siglip2", "aimv2_vision",
                                  "siglip_classifier", "llava_siglip"])
def test_hf_attention_pooling_head_is_warned_of_where_the_model_returns_its_output(kind):
    """HF SigLIP's attention-pooling head (SigLIP 2's, AIMv2's) after a standalone SiglipVisionModel's or
    SiglipModel's blocks, whose output is the image features the model returns, stayed in full precision
    without a word, where open_clip's and timm's attention pools are named; it is named with its linears
    there, and not where the model never reads it (SiglipForImageClassification averages the tokens, a
    VLM's language model reads the hidden states)."""
    model, head = _hf_pooled(kind)
    assert any(n.rpartition(".")[2] == "head" and "Pooling" in type(m).__name__ for n, m in model.named_modules())
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        epmq.adapters.warn_other_towers(model, epmq.adapters.find_towers(model))
    said = [str(w.message) for w in said if "attention pool" in str(w.message)]
    if head is None:
        assert not said, said
    else:
        name, linears = head
        assert len(said) == 1 and f" {name} ({', '.join(linears)}) stay in full precision" in said[0], said


def test_siglip_vision_model_head_is_all_left_in_full_precision_and_warned_of(gen):
    """Quantizing a standalone SiglipVisionModel names its attention-pooling head once, and the head's
    linears are all that is left in full precision."""
    model, (name, linears) = _hf_pooled("siglip_vision")
    calibration = {"task": [{"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}]}
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method="gptq", calibration=calibration,
                            progress=False)
    said = [str(w.message) for w in said if "stay in full precision" in str(w.message)]
    assert len(said) == 1 and f" {name} ({', '.join(linears)}) stay in full precision" in said[0], said
    left = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.MultiheadAttention))]
    assert left and all(f"{n}.".startswith(f"{name}.") for n in left), left


def epmq_tiny_resnet(pretrained=False, **options):
    """timm's ResNet of four BasicBlocks (64 to 512 channels; a 32 x 32 image to 1 x 1 features)."""
    from timm.models.resnet import BasicBlock, ResNet

    options = {k: v for k, v in options.items() if not k.startswith("pretrained_") and k != "cache_dir"}
    model = ResNet(block=BasicBlock, layers=[1, 1, 1, 1], **options)
    model.pretrained_cfg = model.default_cfg = {"pool_size": (1, 1)}  # (timm's builder sets them; open_clip reads)
    return model


@pytest.mark.parametrize("pool", ["abs_attn", "rot_attn"])
def test_open_clip_timm_resnet_attention_pool_is_warned_of_as_one(pool, gen):
    """An open_clip CLIP on a timm ResNet pooled by timm_pool 'abs_attn' or 'rot_attn' (timm's
    AttentionPool2d, RotAttentionPool2d in visual.head, a Sequential of it alone) was warned of as
    blocks no adapter knows, told to be walked by adapter=[OPEN_CLIP, AUTO], which refused them ('not
    blocks the walker can quantize one by one'), or by an adapter to register, which cannot help; it is
    named as an attention pool after the blocks, with its linears, and no walk is offered (AUTO takes none)."""
    clip = _clip_on_timm(epmq_tiny_resnet, timm_pool=pool, timm_proj="", image_size=32)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        epmq.quantize_model(clip, epmq.QuantSpec(bits=8, group_size=16), method="rtn", progress=False)
    said = [str(w.message) for w in said if "full precision" in str(w.message)]
    assert len(said) == 1 and "visual.head.pool (qkv, proj) stay in full precision: an attention pool" in said[0], said
    assert "AUTO" not in said[0] and "register_adapter" not in said[0]
    text = torch.randint(1, 60, (2, 8), generator=gen)
    text[:, -1] = 63
    with pytest.raises(ValueError, match="AUTO finds no blocks in CLIP that the other adapters given do not walk"):
        epmq.quantize_model(clip, epmq.QuantSpec(bits=8, group_size=16), method="gptq", progress=False,
                            calibration={"a": [{"image": torch.randn(2, 3, 32, 32, generator=gen), "text": text}]},
                            adapter=[epmq.adapters.OPEN_CLIP, epmq.adapters.AUTO])


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_open_clip_timm_resnet_image_tower_alone_is_refused_naming_its_attention_pool(method, gen):
    """An open_clip timm ResNet image tower pooled by timm_pool 'abs_attn' quantized alone (convolutions,
    and linears only in its attention pool, visual.head.pool) was taken by AUTO as a list of one block:
    RTN ended in the bare "Sequential has no attribute `0`", GPTQ in 'not blocks the walker can quantize
    one by one' and how to register an adapter. The refusal names the pool and its linears, as RN50's."""
    clip = _clip_on_timm(epmq_tiny_resnet, timm_pool="abs_attn", timm_proj="", image_size=32)
    calibration = {"a": [torch.randn(2, 3, 32, 32, generator=gen)]} if method == "gptq" else None
    with pytest.raises(ValueError, match=r"TimmModel: its linear layers are those of head\.pool \(qkv, proj\), an "
                                         r"attention pool") as refused:
        epmq.quantize_model(clip.visual, epmq.QuantSpec(bits=8, group_size=16), method=method,
                            calibration=calibration, progress=False)
    assert "register_adapter" not in str(refused.value) and "multi_head_attention_forward" not in str(refused.value)


def test_open_clip_resnet_attention_pool_is_warned_of_when_adapter_is_given():
    """The attention pool's projections (RN50's visual.attnpool) were warned of by the default
    walk alone: adapter=OPEN_CLIP quantized the text tower and left a third of the image tower in
    full precision without a word."""
    from open_clip.model import CLIP

    torch.manual_seed(0)
    clip = CLIP(embed_dim=16, vision_cfg={"layers": [1, 1, 1, 1], "width": 8, "head_width": 8, "image_size": 64},
                text_cfg={"context_length": 8, "vocab_size": 50, "width": 32, "heads": 4, "layers": 2}).eval()
    with pytest.warns(UserWarning, match=r"visual\.attnpool \(k_proj, q_proj, v_proj, c_proj\) stay in full precision"):
        epmq.quantize_model(clip, epmq.QuantSpec(bits=8, group_size=16), method="rtn", progress=False,
                            adapter=epmq.adapters.OPEN_CLIP)
    assert isinstance(clip.visual.attnpool.q_proj, nn.Linear)


def test_open_clip_resnet_image_tower_alone_is_refused_naming_its_attention_pool():
    """An open_clip ResNet image tower quantized alone (RN50's ModifiedResNet: convolutions, and
    linears only in its attention pool) was refused with the list of every block type epmq knows
    and 'Register one: epmq.register_adapter(...)', which cannot help: the pool is outside any list
    of blocks. The refusal names the pool and its linears."""
    from open_clip.model import CLIP

    torch.manual_seed(0)
    clip = CLIP(embed_dim=16, vision_cfg={"layers": [1, 1, 1, 1], "width": 8, "head_width": 8, "image_size": 64},
                text_cfg={"context_length": 8, "vocab_size": 50, "width": 32, "heads": 4, "layers": 2}).eval()
    with pytest.raises(ValueError, match=r"ModifiedResNet: its linear layers are those of attnpool \(k_proj, "
                                         r"q_proj, v_proj, c_proj\).*F\.multi_head_attention_forward") as refused:
        epmq.quantize_model(clip.visual, epmq.QuantSpec(bits=8, group_size=16), method="rtn", progress=False)
    assert "register_adapter" not in str(refused.value)


@pytest.mark.parametrize("block", ["RelPosBlock", "ResPostRelPosBlock"])
def test_timm_relative_position_vit_keeps_its_bias_mlp_in_full_precision(block, gen, tmp_path):
    """timm's ViTs of relative-position MLPs (vit_relpos_*, vit_srelpos_*: RelPosBlock, ResPostRelPosBlock)
    were walked by AUTO, which packed each attention's rel_pos.mlp, a map of the fixed table of 2-D offsets
    to the attention bias (2 inputs wide): the checkpoint was refused by GPTQModel, transformers and vLLM
    (a width filling no whole 32-bit words, warned of at the save) for layers that are no projection of
    the hidden states. TIMM walks them, the bias MLP in full precision as Swin V2's is, every other block
    linear packed, the output near the float one, and the checkpoint loads back the same."""
    from timm.models import vision_transformer_relpos as relpos

    def make():
        torch.manual_seed(0)
        return relpos.VisionTransformerRelPos(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                                              mlp_ratio=2.0, num_classes=0, rel_pos_type="mlp", init_values=1.0,
                                              block_fn=getattr(relpos, block)).eval()

    model, pixels = make(), [torch.randn(2, 3, 16, 16, generator=gen) for _ in range(3)]
    assert type(model.blocks[0]).__name__ == block
    with torch.no_grad():
        reference = model(pixels[0])
    epmq.quantize_model(model, epmq.QuantSpec(bits=8, group_size=16), method="gptq",
                        calibration={"task": pixels[1:]}, progress=False)
    assert model.epmq_report.adapter == "timm"
    left = sorted(n for n, m in model.named_modules() if type(m) is nn.Linear)
    assert left == [f"blocks.{i}.attn.rel_pos.mlp.{fc}" for i in range(2) for fc in ("fc1", "fc2")]
    assert sum(isinstance(m, epmq.QuantLinear) for m in model.modules()) == 8  # qkv, proj, fc1, fc2 of 2 blocks
    with torch.no_grad():
        got = model(pixels[0])
    assert (got - reference).norm() / reference.norm() < 0.02
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        epmq.save_quantized(model, tmp_path / "q")
    assert not [w for w in said if "32-bit words" in str(w.message)]
    loaded = epmq.load_quantized(tmp_path / "q", make())
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels[0]), got, rtol=0, atol=0)


def epmq_tiny_relpos(pretrained=False, **options):
    """timm's ViT of relative-position MLPs with a class token (vit_relpos_medium_patch16_cls_224's layout):
    hidden 32, 2 blocks, 16 x 16 images."""
    from timm.models.vision_transformer_relpos import VisionTransformerRelPos

    options = {k: v for k, v in options.items() if not k.startswith("pretrained_") and k != "cache_dir"}
    model = VisionTransformerRelPos(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=2.0,
                                    class_token=True, global_pool="token", fc_norm=False, init_values=1.0, **options)
    model.pretrained_cfg = model.default_cfg = {}  # (timm's builder sets them; open_clip reads them)
    return model


def test_open_clip_relative_position_image_tower_is_walked_by_default(gen):
    """open_clip's vit_relpos_medium_patch16_cls_224 CLIP (timm's RelPosBlocks as the image tower) had its
    image blocks left in full precision with a warning while the text tower was quantized; both towers
    are walked in one call, the bias MLPs alone in full precision in the image blocks, unwarned."""
    clip = _clip_on_timm(epmq_tiny_relpos, timm_pool="", timm_proj="linear", image_size=16)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        epmq.quantize_model(clip, epmq.QuantSpec(bits=8, group_size=16), method="rtn", progress=False)
    assert not [w for w in said if "full precision" in str(w.message)], [str(w.message) for w in said]
    assert clip.epmq_report.adapter == "open_clip+timm"
    left = sorted(n for n, m in clip.visual.trunk.blocks.named_modules() if type(m) is nn.Linear)
    assert left == [f"{i}.attn.rel_pos.mlp.{fc}" for i in range(2) for fc in ("fc1", "fc2")]


def _clip_on_timm(trunk, **vision_cfg):
    """A tiny open_clip CLIP (seeded) whose image tower is the timm model ``trunk`` registers (under its
    own name), built with ``vision_cfg``."""
    from open_clip.model import CLIP
    from timm.models import is_model, register_model

    if not is_model(trunk.__name__):
        register_model(trunk)
    torch.manual_seed(0)
    return CLIP(embed_dim=16,
                vision_cfg=dict(timm_model_name=trunk.__name__, timm_model_pretrained=False, **vision_cfg),
                text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=4, layers=2, mlp_ratio=2.0)).eval()
