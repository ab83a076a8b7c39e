"""Adapters: the attention rewrite for open_clip, and adding a family through the registry."""

import pytest
import torch
from torch import nn

import epmq
import epmq.adapters
from epmq.adapters.attention import LinearMultiheadAttention


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
        want, want_w = mha(x, x, x, need_weights=need_weights, **kwargs)
        got, got_w = linear(x, x, x, need_weights=need_weights, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if need_weights:
        torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    # the projections are shared, not copied, and in_proj is an nn.Linear the walker can quantize
    assert linear.in_proj.weight is mha.in_proj_weight and isinstance(linear.in_proj, nn.Linear)


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


# --------------------------------------------------------------------------- a new family


class ScaledBlock(nn.Module):
    """A block with a keyword argument that changes with depth and a tuple output."""

    def __init__(self, width):
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x, *, gain):
        return x + gain * self.down(torch.relu(self.up(x))), gain * 0.5


class ToyNet(nn.Module):
    def __init__(self, width=32, depth=3):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.body = nn.ModuleList([ScaledBlock(width) for _ in range(depth)])
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
    with pytest.raises(ValueError, match=r"no epmq adapter knows ToyNet.*body \(ScaledBlock\)"):
        epmq.quantize_model(ToyNet(), epmq.QuantSpec(bits=8, group_size=16), method="rtn", progress=False)
    epmq.register_adapter(ToyAdapter("toy", block_types=("ScaledBlock",)))

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
    for types in (("ScaledBlock",), (ScaledBlock,), ScaledBlock, (nn.Module,)):
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
