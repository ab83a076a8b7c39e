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
