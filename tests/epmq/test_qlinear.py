"""QuantLinear holds a QuantResult in the packed GPTQ layout and computes with it."""

import copy
import dataclasses
import math
import warnings

import pytest
import torch

import epmq
from epmq import quant
from epmq.packing import packed_length


def solve(spec, gen, d_out=24, d_in=64, method="gptq"):
    W = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    if method == "rtn":
        return quant.rtn(W, spec)
    X = torch.randn(256, d_in, generator=gen) * torch.rand(d_in, generator=gen)
    return quant.gptq(W, X.T @ X, spec, backend="torch")


def weight_with_fp16_scales(result):
    """What the packed layer stores: the result with its scales rounded to fp16."""
    g = result.g_idx.long()
    scales = result.scales.half().float()
    return (result.codes - result.zeros[:, g]) * scales[:, g]


SPECS = [
    epmq.QuantSpec(bits=4, group_size=16),
    epmq.QuantSpec(bits=4, group_size=-1, sym=True),
    epmq.QuantSpec(bits=3, group_size=32),
    epmq.QuantSpec(bits=2, group_size=16),
    epmq.QuantSpec(bits=8, group_size=16),
    epmq.QuantSpec(bits=4, group_size=16, act_order=True),  # dynamic groups: g_idx permuted
    epmq.QuantSpec(bits=4, group_size=16, act_order=True, static_groups=True),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_from_result_stores_the_result(spec, gen):
    result = solve(spec, gen)
    bias = torch.randn(24, generator=gen)
    layer = epmq.QuantLinear.from_result(result, bias)
    assert torch.equal(layer.codes(), result.codes.t())
    assert torch.equal(layer.zeros(), result.zeros.t().int())
    assert torch.equal(layer.g_idx, result.g_idx)
    assert torch.equal(layer.dequantize(), weight_with_fp16_scales(result))
    torch.testing.assert_close(layer.dequantize(), result.weight, rtol=2e-3, atol=1e-6)
    G = result.scales.shape[1]
    assert layer.qweight.shape == (packed_length(64, spec.bits), 24)
    assert layer.qzeros.shape == (G, packed_length(24, spec.bits))
    assert layer.scales.shape == (G, 24) and layer.scales.dtype == torch.float16
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx", "bias"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_the_dequantized_product(dtype, gen):
    result = solve(epmq.QuantSpec(bits=4, group_size=16, act_order=True), gen)
    bias = torch.randn(24, generator=gen)
    layer = epmq.QuantLinear.from_result(result, bias).to(dtype)
    x = torch.randn(3, 5, 64, generator=gen).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (3, 5, 24)
    ref = x.float() @ weight_with_fp16_scales(result).t() + bias
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)


def test_integer_inputs_are_refused(gen):
    """(They made the weights in their own dtype: fp16 scales below 1 rounded to 0, a silent
    result of zeros where nn.Linear raises.)"""
    layer = epmq.QuantLinear.from_result(solve(epmq.QuantSpec(bits=4, group_size=16), gen))
    for dtype in (torch.int64, torch.int32, torch.bool):
        with pytest.raises(TypeError, match=f"floating-point inputs .*got {dtype}"):
            layer(torch.ones(2, 64, dtype=dtype))


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dequantize_is_bitwise_the_integer_formula(spec, dtype, gen):
    """The grid is broadcast per group (static groups) or gathered per row (act-order), in
    the target dtype: bit for bit ``(q - z[g]).to(dtype) * s[g].to(dtype)``."""
    layer = epmq.QuantLinear.from_result(solve(spec, gen))
    g = layer.g_idx.long()
    ref = (layer.codes() - layer.zeros()[g]).to(dtype) * layer.scales[g].to(dtype)
    assert torch.equal(layer.dequantize(dtype), ref.t())


CPU_INT4_SPECS = [
    epmq.QuantSpec(bits=4, group_size=128),  # the kernel's own group
    epmq.QuantSpec(bits=4, group_size=32, sym=True),
    epmq.QuantSpec(bits=4, group_size=-1),  # per channel: groups of 256 repeating one grid
    epmq.QuantSpec(bits=4, group_size=64, act_order=True),  # dynamic groups: K permuted
    epmq.QuantSpec(bits=4, group_size=512),  # a grid coarser than 256 rows, repeated
]


@pytest.mark.parametrize("spec", CPU_INT4_SPECS, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_int4_kernel_path(spec, dtype, gen):
    """bf16/fp16 on the CPU at small batches: torch's int4 kernel, as exact as the product of
    the dequantized weight in the same dtype (both against float64)."""
    from epmq import qlinear

    if qlinear._cpu_int4_mm is None:
        pytest.skip("this torch has no CPU int4 kernel")
    result = solve(spec, gen, d_out=48, d_in=1024)
    bias = torch.randn(48, generator=gen)
    layer = epmq.QuantLinear.from_result(result, bias).to(dtype)
    exact = (weight_with_fp16_scales(result).double(), bias.double())
    for shape in [(1, 1024), (3, 7, 1024)]:
        x = torch.randn(*shape, generator=gen).to(dtype)
        y = layer(x)
        assert layer._derived[f"_cpu_int4_{str(dtype)[6:]}"][2] is not None  # the kernel ran (its plan; None: declined)
        assert y.dtype == dtype and y.shape == (*shape[:-1], 48)
        ref = x.double() @ exact[0].t() + exact[1]
        dense = (x @ layer._weight_kn(dtype) + bias.to(dtype)).double()
        err, err_dense = (float((v - ref).abs().max() / ref.abs().max()) for v in (y.double(), dense))
        # (no less than half an ulp of the largest output: the dense product's error is a draw too,
        # at times a third of what it reaches on other inputs, where the kernel's is not)
        assert err <= 2 * max(err_dense, torch.finfo(dtype).eps / 2) + 1e-3, (err, err_dense)
    # more rows than the kernel pays for, and fp32: the dequantized product, unchanged
    x = torch.randn(qlinear.CPU_INT4_MAX_ROWS + 1, 1024, generator=gen).to(dtype)
    assert torch.equal(layer(x), x @ layer._weight_kn(dtype) + bias.to(dtype))
    layer32 = epmq.QuantLinear.from_result(result, bias)
    x = torch.randn(2, 1024, generator=gen)
    assert torch.equal(layer32(x), x @ layer32._weight_kn(torch.float32) + bias)


def test_moving_a_layer_drops_what_it_derived(gen):
    """Unpacked zeros, grids and the CPU kernel's layout are plain attributes that ``.to()``
    would leave behind (a layer moved off the GPU would keep GPU copies alive): moving drops
    them, and the next call rebuilds them where the layer is, with the same result."""
    from epmq import qlinear

    layer = epmq.QuantLinear.from_result(solve(epmq.QuantSpec(bits=4, group_size=128), gen, d_out=32,
                                               d_in=256), None).bfloat16()
    x = torch.randn(2, 256, generator=gen).bfloat16()
    y = layer(x)
    layer._zeros_u8()
    assert layer._derived
    layer.to("cpu")
    assert not layer._derived
    assert torch.equal(layer(x), y)
    assert ("_cpu_int4_bfloat16" in layer._derived) == (qlinear._cpu_int4_mm is not None)


def test_cpu_int4_inputs_that_need_a_gradient_get_one(gen):
    layer = epmq.QuantLinear.from_result(solve(epmq.QuantSpec(bits=4, group_size=128), gen, d_out=32, d_in=256),
                                         None).bfloat16()
    x = torch.randn(2, 256, generator=gen).bfloat16().requires_grad_()
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer._weight_kn(torch.bfloat16).sum(1).expand(2, -1))


def test_cpu_int4_inputs_with_a_forward_mode_tangent_get_its_product(gen):
    """Forward-mode AD (``torch.func.jvp``, ``forward_ad`` dual tensors) has no derivative of the
    int4 kernel either: such inputs take the dequantized product, whose tangent is ``t @ W``."""
    layer = epmq.QuantLinear.from_result(solve(epmq.QuantSpec(bits=4, group_size=128), gen, d_out=32, d_in=256),
                                         None).bfloat16()
    assert layer._cpu_int4(torch.bfloat16) is not None  # (the kernel would take these inputs)
    x = torch.randn(2, 256, generator=gen).bfloat16()
    t = torch.randn(2, 256, generator=gen).bfloat16()
    W = layer._weight_kn(torch.bfloat16)
    y, tangent = torch.func.jvp(layer, (x,), (t,))
    torch.testing.assert_close(tangent, t @ W)
    torch.testing.assert_close(y, x @ W)


def test_cpu_int4_kernel_declines_layouts_it_cannot_take(gen):
    # out_features not a multiple of 16; groups of 16: the dequantized product
    for d_out, spec in ((24, epmq.QuantSpec(bits=4, group_size=128)), (32, epmq.QuantSpec(bits=4, group_size=16))):
        layer = epmq.QuantLinear.from_result(solve(spec, gen, d_out=d_out, d_in=256), None).bfloat16()
        assert layer._cpu_int4(torch.bfloat16) is None
        x = torch.randn(2, 256, generator=gen).bfloat16()
        assert torch.equal(layer(x), x @ layer._weight_kn(torch.bfloat16))


def test_dequantize_follows_in_place_changes_of_the_grid(gen):
    """The unpacked grid is kept between calls, and dropped when a buffer changes."""
    layer = epmq.QuantLinear.from_result(solve(epmq.QuantSpec(bits=4, group_size=16), gen))
    x = torch.randn(2, 64, generator=gen)
    before = layer(x)
    layer.scales.mul_(2)
    torch.testing.assert_close(layer(x), 2 * before)
    layer.qzeros.zero_()
    g = layer.g_idx.long()
    assert torch.equal(layer.dequantize(), (layer.codes().float() * layer.scales[g].float()).t())
    layer.g_idx.copy_(torch.arange(64).flip(0) // 16)  # no longer runs of rows from 0
    assert torch.equal(layer.dequantize(), (layer.codes().float() * layer.scales[layer.g_idx.long()].float()).t())


def test_no_bias_and_weight_stand_in(gen):
    layer = epmq.QuantLinear.from_result(solve(epmq.QuantSpec(bits=8, group_size=-1), gen, method="rtn"))
    assert layer.bias is None and "bias" not in layer.state_dict()
    # model code reads .weight's dtype (T5, open_clip): the stand-in's, which follows .to()
    assert layer.weight.shape == (24, 64) and layer.weight.device == layer.qweight.device
    assert layer.weight.dtype == torch.float32
    assert layer.half().weight.dtype == torch.float16


class CalledAndRead(torch.nn.Module):
    """Calls ``q`` and reads its weight: the device to put its input on, and its values (a tied
    projection back, ``q.weight`` transposed)."""

    def __init__(self, q):
        super().__init__()
        self.q = q

    def forward(self, x):
        h = self.q(x.to(self.q.weight.device, self.q.weight.dtype))
        return h @ self.q.weight + torch.einsum("oi,ni->no", self.q.weight, x)[..., :1]


@pytest.mark.parametrize("spec", [SPECS[0], SPECS[5]], ids=str)
def test_the_weight_reads_as_the_dequantized_weight_on_the_layers_device(spec, gen):
    """Model code that reads a packed layer's weight (its device, or its values beside a call of the
    layer) got a data-less meta tensor: x.to(q.weight.device) moved the input to the meta device, the
    call then ended in a bare "not on the expected device meta" error, and a product with the weight
    was garbage without a word. Its metadata is the layer's, its values the dequantized weight, eager
    and compiled; writes into it but a scaling are dropped (as before), with a warning naming the layer."""
    layer = epmq.QuantLinear.from_result(solve(spec, gen), torch.randn(24, generator=gen))
    linear = torch.nn.Linear(64, 24)
    linear.weight.data.copy_(layer.dequantize())
    linear.bias.data.copy_(layer.bias)
    x = torch.randn(5, 64, generator=gen)
    want = CalledAndRead(linear)(x)
    torch.testing.assert_close(CalledAndRead(layer)(x), want)
    torch.testing.assert_close(torch.compile(CalledAndRead(layer), fullgraph=True, backend="eager")(x), want)
    weight = layer.weight
    assert isinstance(weight, torch.Tensor) and not weight.is_meta and weight.ndim == 2 and weight.numel() == 24 * 64
    assert torch.equal(weight.T, layer.dequantize().T) and torch.equal(weight.double(), layer.dequantize(torch.float64))
    assert torch.equal(torch.empty(24, 64).copy_(weight), layer.dequantize())  # (read, not written)
    # (what torch does not dispatch for a tensor subclass)
    assert torch.equal(copy.deepcopy(weight), layer.dequantize()) and weight.tolist() == layer.dequantize().tolist()
    assert (weight.numpy() == layer.dequantize().numpy()).all()
    for write in (lambda: weight.add_(2), lambda: weight.mul_(torch.full((24, 64), 2.0)),
                  lambda: weight.copy_(torch.zeros(24, 64)), lambda: weight.zero_()):
        with pytest.warns(UserWarning, match=r"into the weight of QuantLinear\(in_features=64.* is dropped"):
            write()
    assert torch.equal(layer.weight.double(), layer.dequantize(torch.float64))


def test_scaling_the_weight_in_place_scales_the_scales(gen):
    """RWKV divides its layers' weights by 2 ** k in place when first run in eval mode and multiplies
    them back when first run in train mode; on a packed layer the write was dropped (a quantized
    RWKV in train mode ~40% off). W = (q - z) * s: a number times the weight is that number times
    the scales, the codes as they were; a power of two exactly so, and undone exactly."""
    layer = epmq.QuantLinear.from_result(solve(SPECS[0], gen))
    before, x = layer.dequantize(), torch.randn(5, 64, generator=gen)
    y = layer(x)
    with torch.no_grad():
        layer.weight.mul_(4)
    assert torch.equal(layer.dequantize(), before * 4)
    torch.testing.assert_close(layer(x), y * 4)
    layer.weight.div_(torch.tensor(4))
    layer.weight.div_(0.5)
    layer.weight.mul_(torch.tensor(0.5))
    assert torch.equal(layer.dequantize(), before) and torch.equal(layer(x), y)
    with pytest.raises(ValueError, match=r"by 1e\+30 gives scales past float16's range"):
        layer.weight.mul_(1e30)
    with pytest.raises(ValueError, match=r"by inf gives scales past"):
        layer.weight.div_(0)
    assert torch.equal(layer.dequantize(), before)


def test_a_tiny_weight_divided_in_place_computes_what_the_dense_layer_divided_alike_does(gen):
    """RWKV divides its layers' weights by 2 ** (i // rescale_every) in place for inference. The packed
    layer divided its float16 scales: small ones fell into float16's subnormals (below 6.1e-5), keeping
    fewer bits, or to 0, the outputs no longer the divided weight's (~10% off, only warned of). The
    division is held as the layer's weight_multiplier, applied to the outputs, the scales never rounded."""
    layer = epmq.QuantLinear.from_result(solve(SPECS[0], gen))  # (no bias, as RWKV's rescaled layers)
    with torch.no_grad():
        layer.scales.mul_(1e-3 / float(layer.scales.abs().max()))  # (still normal: divided by 2 ** 12, not)
    dense = torch.nn.Linear(64, 24, bias=False).requires_grad_(False)
    dense.load_state_dict({"weight": layer.dequantize()})
    scales, x = layer.scales.clone(), torch.randn(5, 64, generator=gen)
    y = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (nothing lost, nothing to warn of)
        with torch.no_grad():
            for module in (layer, dense):
                module.weight.div_(2 ** 12)
    assert torch.equal(layer.dequantize(), dense.weight) and torch.equal(layer.weight.double(), dense.weight.double())
    assert torch.equal(layer(x), y / 2 ** 12)
    assert float((layer(x) - dense(x)).abs().max()) <= 1e-6 * float(dense(x).abs().max())
    assert torch.equal(layer.scales, scales) and layer.weight_multiplier == 2 ** -12
    layer.weight.mul_(2 ** 12)
    assert torch.equal(layer.dequantize(), dense.weight * 2 ** 12) and layer.weight_multiplier == 1


def test_a_weight_multiplier_stays_with_the_layer_out_of_its_state_dict(gen):
    """A layer's weight_multiplier (RWKV's division of it) was in its state dict where it was not 1: a strict
    loader of the gptq layout's tensors (another tool's layer) reported it as unexpected. The state dict
    holds the layout's tensors alone, the weight before the division, and a load keeps the layer's multiplier,
    as RWKV keeps its layers_are_rescaled, also where a state dict epmq wrote before holds one (taken, it
    divided a fresh RWKV's layers again at its first forward in eval mode)."""
    layer = epmq.QuantLinear.from_result(solve(SPECS[0], gen))
    x = torch.randn(5, 64, generator=gen)
    layer.weight.div_(2 ** 12)
    state = {name: t.clone() for name, t in layer.state_dict().items()}  # (not the layer's own buffers)
    assert set(state) == {"qweight", "qzeros", "scales", "g_idx"}

    class Layout(torch.nn.Module):  # (another tool's packed layer: the layout's buffers, nothing else)
        def __init__(self):
            super().__init__()
            for name, t in state.items():
                self.register_buffer(name, torch.zeros_like(t))

    Layout().load_state_dict(state)  # (strict)
    fresh = epmq.QuantLinear(64, 24, bits=4, group_size=16, bias=False)
    fresh.load_state_dict(state)
    assert fresh.weight_multiplier == 1 and torch.equal(fresh(x), layer(x) * 2 ** 12)
    layer.load_state_dict(dict(state, scales=state["scales"] * 2))  # (the layer's own division kept)
    assert layer.weight_multiplier == 2 ** -12 and torch.equal(layer.dequantize(), fresh.dequantize() / 2 ** 11)
    fresh.load_state_dict(dict(state, weight_multiplier=torch.tensor(2 ** -12, dtype=torch.float64)))  # (strict)
    assert fresh.weight_multiplier == 1 and torch.equal(fresh(x), layer(x) * 2 ** 11)


def test_scaling_the_weight_past_the_layers_dtype_is_refused(gen):
    """Scales still finite in float16 may give weights (codes less zero points, times the scales)
    past a float16 layer's range: the multiplication went through and the outputs were inf without a
    word, refused only by the next refresh(). Refused as a load of those scales is, the layer unchanged."""
    layer = epmq.QuantLinear.from_result(solve(SPECS[0], gen)).half()
    before = layer.dequantize()
    factor = 2.0 ** math.ceil(math.log2(65504 / float(before.abs().max())))
    assert torch.isfinite(layer.scales * factor).all()  # (the scales alone fit)
    with pytest.raises(ValueError, match=rf"by {factor:g}: scales: weights up to .* overflow float16"):
        layer.weight.mul_(factor)
    assert torch.equal(layer.dequantize(), before) and layer.refresh() is layer


def test_constructor_checks():
    for bits in (5, 4.0, True):
        with pytest.raises(ValueError, match="bits must be one of"):
            epmq.QuantLinear(64, 8, bits=bits, group_size=16)
    with pytest.raises(ValueError, match="in_features must be an integer >= 0, got -1"):
        epmq.QuantLinear(-1, 8, bits=4, group_size=16)
    with pytest.raises(ValueError, match="out_features must be an integer >= 0, got 8.0"):
        epmq.QuantLinear(64, 8.0, bits=4, group_size=16)
    for group_size in (0, -2, 16.0, True):
        with pytest.raises(ValueError, match="group_size must be -1 or a positive integer"):
            epmq.QuantLinear(64, 8, bits=4, group_size=group_size)
    # a group size that does not divide K: ceil(K / g) groups, the last one shorter
    assert epmq.QuantLinear(60, 8, bits=4, group_size=16).scales.shape == (4, 8)
    with pytest.raises(ValueError, match="expected inputs"):
        epmq.QuantLinear(64, 8, bits=4, group_size=16)(torch.zeros(2, 32))


def test_numpy_integers_are_taken_as_the_ints(gen):
    """bits, group_size and the widths read from numpy arrays (a sweep's np.int64(4)), which
    QuantSpec takes, build the layer the Python ints build, and are held as them."""
    import numpy as np

    for bits in (2, 3, 4, 8):
        layer = epmq.QuantLinear(np.int64(64), np.int32(24), bits=np.int64(bits), group_size=np.int64(16))
        twin = epmq.QuantLinear(64, 24, bits=bits, group_size=16)
        assert (layer.bits, layer.group_size, layer.in_features, layer.out_features) == (bits, 16, 64, 24)
        assert all(type(v) is int for v in (layer.bits, layer.group_size, layer.in_features, layer.out_features))
        assert layer.state_dict().keys() == twin.state_dict().keys()
        assert all(layer.state_dict()[k].shape == v.shape for k, v in twin.state_dict().items())
        assert repr(layer) == repr(twin)
    assert epmq.QuantLinear(64, 8, bits=np.int64(4), group_size=np.int64(-1)).group_size == -1
    for bits in (np.int64(5), np.float64(4.0), np.True_):
        with pytest.raises(ValueError, match="bits must be one of"):
            epmq.QuantLinear(64, 8, bits=bits, group_size=16)
    with pytest.raises(ValueError, match="group_size must be -1 or a positive integer"):
        epmq.QuantLinear(64, 8, bits=4, group_size=np.float64(16))


@pytest.mark.cuda
@pytest.mark.parametrize("act_order", [False, True])
def test_cuda_w4a16_path_matches_the_torch_path(act_order, gen):
    result = solve(epmq.QuantSpec(bits=4, group_size=16, act_order=act_order), gen, d_out=64, d_in=128)
    layer = epmq.QuantLinear.from_result(result, torch.randn(64, generator=gen)).to(torch.float16)
    x = torch.randn(7, 128, generator=gen).half()
    ref = layer(x)  # CPU: dequantize and matmul
    y = layer.cuda()(x.cuda())
    torch.testing.assert_close(y.cpu().float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("device, dtype", [("cpu", torch.bfloat16), ("cpu", torch.float32),
                                           pytest.param("cuda", torch.float16, marks=pytest.mark.cuda)])
def test_weights_written_through_data_are_seen_after_refresh(device, dtype, gen):
    """An act-order layer keeps its codes sorted by group (the CPU int4 kernel's repacked copy,
    the CUDA kernel's sorted copy) and its grid unpacked, keyed on the buffers' versions, which
    ``.data.copy_`` does not move: the forward went on with the old weights, silently.
    ``refresh()`` retires every such copy; then the layer computes as a fresh one."""
    spec = epmq.QuantSpec(bits=4, group_size=64, act_order=True)
    layer, other = (epmq.QuantLinear.from_result(solve(spec, gen, d_out=64, d_in=256),
                                                 torch.randn(64, generator=gen)).to(device, dtype)
                    for _ in range(2))
    x = torch.randn(3, 256, generator=gen).to(device, dtype)
    layer(x), other(x)  # (every copy built, the kernel's checks made)
    fresh = copy.deepcopy(other).refresh()  # (a layer that never saw the old weights)
    for name in ("qweight", "qzeros", "scales", "g_idx", "bias"):
        getattr(layer, name).data.copy_(getattr(other, name))
    assert layer.refresh() is layer
    assert torch.equal(layer.dequantize(), fresh.dequantize())
    assert torch.equal(layer(x), fresh(x))


def test_buffers_replaced_are_checked_and_written_in_place_are_checked_by_refresh(gen):
    """load_state_dict refuses NaN scales, a float32 scale past float16's range, a g_idx naming no
    group; a buffer replaced (``layer.scales = t``) or written in place (``copy_``, ``.data``,
    accelerate's set_module_tensor_to_device, which casts into the float16 buffer) took them in
    silence: outputs NaN or inf, or with g_idx -1 every input read with the last group's grid.
    A replacement is refused, the layer left as it was; in-place writes, which the layer cannot
    see without a cost on every forward, are refused by refresh()."""
    layer = epmq.QuantLinear.from_result(solve(epmq.QuantSpec(bits=4, group_size=16), gen))
    before = {name: t.clone() for name, t in layer.state_dict().items()}
    scales = layer.scales.float()
    nan, big = scales.clone(), scales.clone()
    nan[0, 0], big[0, 0] = float("nan"), 1e5
    replaced = [("scales", nan, "scales must be finite"), ("scales", big.half(), "scales must be finite"),
                ("g_idx", torch.full((64,), -1, dtype=torch.int32), r"g_idx holds groups in \[-1, -1\]"),
                ("qweight", layer.qweight.float(), "qweight must be int32")]
    for name, value, match in replaced:
        with pytest.raises(ValueError, match=r"QuantLinear\(in_features=64, out_features=24.*: " + match):
            setattr(layer, name, value)
        assert all(torch.equal(t, before[n]) for n, t in layer.state_dict().items())
    layer.scales = scales  # (a layer's float32 scales, as a peer's load with assign=True: taken)
    assert layer.scales.dtype == torch.float32 and layer.refresh() is layer
    layer.scales = before["scales"].clone()

    accelerate = pytest.importorskip("accelerate.utils")
    for write in (lambda: layer.scales.copy_(big), lambda: setattr(layer.scales, "data", nan.half()),
                  lambda: accelerate.set_module_tensor_to_device(layer, "scales", "cpu", value=big)):
        with torch.no_grad():
            write()
        with pytest.raises(ValueError, match="scales must be finite, got NaN or inf"):
            layer.refresh()
        layer.load_state_dict(before)
    assert layer.refresh() is layer


@pytest.mark.cuda
def test_cuda_inputs_that_need_a_gradient_get_one(gen):
    """The W4A16 kernel has no backward: such inputs take the dequantized product."""
    result = solve(epmq.QuantSpec(bits=4, group_size=16), gen, d_out=64, d_in=128)
    layer = epmq.QuantLinear.from_result(result, None).to(torch.float16).cuda()
    x = torch.randn(7, 128, generator=gen).half().cuda().requires_grad_()
    layer(x).float().sum().backward()
    torch.testing.assert_close(x.grad, layer._weight_kn(torch.float16).sum(1).expand(7, -1))


class _LooksCuda(torch.Tensor):
    """A CPU tensor the layer takes for a CUDA one: which product its CUDA branch picks."""

    @property
    def is_cuda(self):
        return True


def test_cuda_branch_gives_the_kernel_only_what_it_takes(monkeypatch, gen):
    """float64 inputs and a layer without inputs take the dequantized product on CUDA, as on
    the CPU (the kernel refuses them); 16- and 32-bit floats take the kernel."""
    import epmq.qlinear as qlinear

    called = []
    monkeypatch.setattr(qlinear, "w4a16_matmul", lambda x, *a, **k: called.append(x.dtype) or
                        torch.zeros(*x.shape[:-1], a[0].shape[1], dtype=x.dtype))
    layer = epmq.QuantLinear.from_result(solve(epmq.QuantSpec(bits=4, group_size=16), gen), None)
    x = torch.randn(3, 64, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(layer.double()(x.as_subclass(_LooksCuda)).as_subclass(torch.Tensor),
                               layer(x))
    empty = epmq.QuantLinear(0, 16, bits=4, group_size=-1, bias=False)
    assert empty(torch.randn(2, 0).as_subclass(_LooksCuda)).shape == (2, 16)
    assert called == []
    layer.float()(x.float().as_subclass(_LooksCuda))
    assert called == [torch.float32]


def test_scales_that_overflow_float16_are_refused(gen):
    result = quant.rtn(torch.randn(8, 32, generator=gen) * 1e7, epmq.QuantSpec(bits=4, group_size=16))
    with pytest.raises(ValueError, match="overflow float16"):
        epmq.QuantLinear.from_result(result)


def test_scales_below_float16s_normal_range_are_warned_of(gen, recwarn):
    """Scales of tiny weights keep fewer bits in float16 (below 6.1e-5), none below 3e-8: the
    packed layer's weights there were off, or zero, silently. Warned of where that matters."""
    spec = epmq.QuantSpec(bits=8, group_size=16)
    W = torch.randn(8, 32, generator=gen)
    W[0] *= 1e-7  # (row 0's scales ~1e-9: 0 in float16, far under 3e-8 whatever the draw)
    W[1] *= 1e-4  # (~2e-6: subnormal, a few bits left)
    # (row 1's two count where float16 moves them past a quarter step, by the draw; row 0's always)
    with pytest.warns(UserWarning, match=r"[34] of 16 scales are below float16's normal range .* 2 round to 0"):
        layer = epmq.QuantLinear.from_result(quant.rtn(W, spec))
    assert bool((layer.dequantize()[0] == 0).all())  # (what the warning says)
    epmq.QuantLinear.from_result(quant.rtn(torch.randn(8, 32, generator=gen), spec))
    assert not [w for w in recwarn if "normal range" in str(w.message)]


def test_non_finite_solver_settings_are_refused(gen):
    W, H = torch.randn(8, 32, generator=gen), torch.eye(32)
    spec = epmq.QuantSpec(bits=4, group_size=16)
    for percdamp in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="percdamp must be a finite number"):
            quant.gptq(W, H, spec, percdamp=percdamp)
    for bad in (dict(anchor=float("nan")), dict(weight_anchor=float("inf"))):
        with pytest.raises(ValueError, match="must be a finite number"):
            quant.epmq(W, [W + 0.1], [H], spec, **bad)



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_compiled_model_has_no_graph_break(gen, dtype):
    """torch.compile(fullgraph=True) traces through quantized layers (4-bit with groups and with
    act-order, 3-bit per channel): no host-side cache or branch on the buffers' values."""
    specs = [epmq.QuantSpec(bits=4, group_size=16), epmq.QuantSpec(bits=4, group_size=16, act_order=True),
             epmq.QuantSpec(bits=3, group_size=-1)]
    layers = [epmq.QuantLinear.from_result(solve(spec, gen, d_out=64), torch.randn(64, generator=gen))
              for spec in specs]
    model = torch.nn.Sequential(layers[0], torch.nn.GELU(), layers[1], torch.nn.GELU(), layers[2]).eval().to(dtype)
    x = torch.randn(3, 5, 64, generator=gen).to(dtype)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        y, y_eager = compiled(x), model(x)
    if dtype == torch.float32:  # the same dequantized product
        assert torch.equal(y, y_eager)
    else:  # eager takes torch's int4 CPU kernel at bf16: its own rounding
        torch.testing.assert_close(y, y_eager, rtol=2e-2, atol=2e-2)


def test_w4a16_custom_op(gen):
    """The kernel as ``torch.ops.epmq.w4a16_matmul`` (what a compiled CUDA model calls): its
    fake (shape) implementation and schema agree with the real one (torch.library.opcheck)."""
    from epmq_kernels.packing import pack_int4

    qweight = pack_int4(torch.randint(0, 16, (64, 24), generator=gen))
    scales = torch.rand(2, 24, generator=gen).half()
    zeros = torch.randint(0, 16, (2, 24), generator=gen).to(torch.uint8)
    for g_idx in (None, (torch.arange(64) // 32).to(torch.int32)):
        torch.library.opcheck(torch.ops.epmq.w4a16_matmul,
                              (torch.randn(3, 64, generator=gen), qweight, scales, zeros, 32, g_idx))


@pytest.mark.cuda
def test_compiled_model_on_cuda_calls_the_kernel_op(gen):
    """On CUDA the compiled graph holds the W4A16 kernel as its custom op, in one piece."""
    targets = []

    def backend(gm, example_inputs):  # records the captured graph, runs it as it is
        targets.extend(node.target for node in gm.graph.nodes)
        return gm.forward

    layer = epmq.QuantLinear.from_result(solve(epmq.QuantSpec(bits=4, group_size=16), gen, d_out=64),
                                         torch.randn(64, generator=gen)).cuda().half()
    x = torch.randn(4, 64, generator=gen).cuda().half()
    with torch.no_grad():
        y = torch.compile(layer, fullgraph=True, backend=backend)(x)
        torch.testing.assert_close(y, layer(x), rtol=2e-3, atol=2e-3)
    assert torch.ops.epmq.w4a16_matmul.default in targets


def _filled_layer(gen, dtype=torch.float32, K=256, N=256):
    layer = epmq.QuantLinear(K, N, bits=4, group_size=32, bias=False, dtype=dtype)
    with torch.no_grad():
        layer.qweight.copy_(torch.randint(-2**31, 2**31 - 1, layer.qweight.shape, generator=gen, dtype=torch.int32))
        layer.qzeros.fill_(0x88888888 - 2**32)
        layer.scales.copy_((torch.rand(layer.scales.shape, generator=gen) * 0.02 + 0.001).half())
    return layer


def test_new_buffers_are_seen_even_at_a_reused_address(gen):
    """What the forward derives is keyed on the buffers themselves, not only their address and
    version (a new tensor may take a freed one's memory, its version 0 again)."""
    layer = _filled_layer(gen, torch.bfloat16)
    x = torch.randn(1, 256, generator=gen).bfloat16()
    layer(x)
    for _ in range(3):  # assigned anew each time, old ones freed: addresses get reused
        layer.qweight = torch.randint(-2**31, 2**31 - 1, layer.qweight.shape, generator=gen, dtype=torch.int32)
        reference = x.float() @ layer.dequantize().t()
        torch.testing.assert_close(layer(x).float(), reference, rtol=0.02, atol=0.05)


@pytest.mark.parametrize("bad", [-1, 8])
def test_load_state_dict_refuses_g_idx_outside_the_grid(gen, bad):
    """(-1 read the last group, silently, in the forward's gather.)"""
    layer = _filled_layer(gen)
    state = layer.state_dict()
    state["g_idx"] = state["g_idx"].clone()
    state["g_idx"][5] = bad
    groups = rf"g_idx holds groups in \[{min(bad, 0)}, {max(bad, 7)}\], outside the 8 groups"
    with pytest.raises(RuntimeError, match=groups):
        epmq.QuantLinear(256, 256, bits=4, group_size=32, bias=False).load_state_dict(state)


def _set(name, index, value):
    def change(state):
        state[name] = state[name].clone()
        state[name][index] = value
    return change


def _cast(name, dtype, times=1):
    def change(state):
        state[name] = (state[name] * times).to(dtype)
    return change


# (3 bits, 48 inputs and 20 outputs: the last words of qweight and qzeros end in 16 and 4 padding bits)
CORRUPT_STATES = {
    "NaN scale": (_set("scales", (0, 0), float("nan")), r"scales must be finite, got NaN or inf"),
    "inf scale": (_set("scales", (2, 19), float("inf")), r"scales must be finite, got NaN or inf"),
    "integer scales": (_cast("scales", torch.int32), r"scales must be floating-point, got torch.int32"),
    "float codes": (_cast("qweight", torch.float32), r"qweight must be int32 \(packed words\), got torch.float32"),
    "int64 zeros": (_cast("qzeros", torch.int64), r"qzeros must be int32 \(packed words\), got torch.int64"),
    "float g_idx": (_cast("g_idx", torch.float32), r"g_idx must be integers, got torch.float32"),
    "g_idx past the groups": (_set("g_idx", 7, 3), r"g_idx holds groups in \[0, 3\], outside the 3 groups"),
    "a 49th input's code": (_set("qweight", (4, 0), 1 << 16), r"qweight has bits set past its 48 codes of 3 bits"),
    "a 21st output's zero": (_set("qzeros", (1, 1), 1 << 30), r"qzeros has bits set past its 20 codes of 3 bits"),
    "groups of 24": (lambda state: state.update(scales=state["scales"][:2]),
                     r"scales is \(2, 20\), but the layer \(48->20, 3 bits, group_size 16\) holds \(3, 20\)"),
}


@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
@pytest.mark.parametrize("corruption", CORRUPT_STATES)
def test_load_state_dict_refuses_corrupt_or_mismatched_tensors(gen, corruption, assign):
    """copy_ casts and does not look at values: float codes were truncated into the words, a float
    g_idx rounded to some group, NaN scales loaded, and codes for more features than the layer has
    read as its own; each is refused, naming the tensor, and the layer is left as it was."""
    change, message = CORRUPT_STATES[corruption]
    state = epmq.QuantLinear.from_result(solve(epmq.QuantSpec(bits=3, group_size=16), gen, d_out=20,
                                               d_in=48)).state_dict()
    change(state)
    model = torch.nn.Sequential(epmq.QuantLinear(48, 20, bits=3, group_size=16, bias=False))
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"\t0\." + message):
        model.load_state_dict({f"0.{name}": t for name, t in state.items()}, assign=assign)
    assert all(torch.equal(t, before[name]) and t.dtype == before[name].dtype
               for name, t in model.state_dict().items())


def test_load_state_dict_refuses_float16_overflow_of_float32_scales(gen):
    """A float32 scale past float16's range became inf in the layer's float16 scales; assigned
    (``assign=True``), the scales keep the file's float32 and are taken."""
    layer = epmq.QuantLinear.from_result(solve(epmq.QuantSpec(bits=4, group_size=16), gen))
    state = dict(layer.state_dict(), scales=layer.scales.float())
    state["scales"][0, 0] = 1e5
    with pytest.raises(RuntimeError, match=r"scales up to 1e\+05 overflow float16, the layer's scale dtype"):
        epmq.QuantLinear(64, 24, bits=4, group_size=16, bias=False).load_state_dict(state)
    fresh = epmq.QuantLinear(64, 24, bits=4, group_size=16, bias=False, device="meta")
    fresh.load_state_dict(state, assign=True)
    assert fresh.scales.dtype == torch.float32 and torch.equal(fresh.scales, state["scales"])


# (a last group of one input at 8 bits: a scale at times below float16's normal range, warned of)
@pytest.mark.filterwarnings("ignore:.*below float16's normal range")
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("features", [(1, 1), (33, 13), (65, 31)], ids=str)
def test_state_dict_pickle_and_deepcopy_round_trips_of_odd_features(gen, bits, features):
    """Features that fill no whole words (their padding bits zero, which load_state_dict checks)
    at every width: a fresh layer loaded by copy or from safetensors by assign, a pickle and a
    deepcopy compute what the layer does."""
    import pickle

    from safetensors.torch import load, save

    K, N = features
    spec = epmq.QuantSpec(bits=bits, group_size=16, act_order=K > 16)
    layer = epmq.QuantLinear.from_result(solve(spec, gen, d_out=N, d_in=K), torch.randn(N, generator=gen))
    x = torch.randn(3, K, generator=gen)
    y = layer(x)
    copied = epmq.QuantLinear(K, N, bits=bits, group_size=16)
    copied.load_state_dict(layer.state_dict())
    assigned = epmq.QuantLinear(K, N, bits=bits, group_size=16, device="meta")
    assigned.load_state_dict(load(save(layer.state_dict())), assign=True)
    for twin in (copied, assigned, pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert torch.equal(twin.codes(), layer.codes()) and torch.equal(twin(x), y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_load_state_dict_into_inference_tensors_is_seen(gen, dtype):
    """Buffers made under torch.inference_mode have no version counter: a load_state_dict into
    them (in that mode) must still retire what the forward derived from the old ones."""
    with torch.inference_mode():
        layer = _filled_layer(gen, dtype)
        x = torch.randn(2, 256, generator=gen).to(dtype)
        layer(x)
        new = _filled_layer(gen, dtype)
        new.scales.mul_(3)
        layer.load_state_dict(new.state_dict())
        assert torch.equal(layer.dequantize(), new.dequantize())
        torch.testing.assert_close(layer(x).float(), new(x).float(), rtol=0, atol=0)


def test_casts_keep_the_packed_scales_and_pickles_drop_the_caches(gen):
    import io

    layer = _filled_layer(gen)
    scales, weight = layer.scales.clone(), layer.dequantize()
    layer.to(torch.bfloat16).to(torch.float32)
    assert layer.scales.dtype == torch.float16 and torch.equal(layer.scales, scales)
    assert torch.equal(layer.dequantize(), weight)

    def pickled_size(module):
        buffer = io.BytesIO()
        torch.save(module, buffer)
        return len(buffer.getvalue())

    before = pickled_size(layer)
    with torch.no_grad():
        layer.to(torch.bfloat16)(torch.randn(1, 256, generator=gen).bfloat16())
    assert pickled_size(layer) <= before + 1024  # (the int4 repack and grids are not saved)
    assert copy.deepcopy(layer)._derived == {}


def test_casts_keep_float32_scales_too(gen):
    """Scales loaded as float32 (load_state_dict(assign=True), which load_quantized uses for a
    model built on meta, keeps a checkpoint's dtype) were rounded to bfloat16 for good by
    .to(torch.bfloat16): only float16 scales were kept."""
    layer = _filled_layer(gen)
    state = dict(layer.state_dict(), scales=layer.scales.float())
    fresh = epmq.QuantLinear(256, 256, bits=4, group_size=layer.group_size, bias=False, device="meta")
    fresh.load_state_dict(state, assign=True)
    weight = fresh.dequantize()
    fresh.to(torch.bfloat16).to(torch.float32)
    assert fresh.scales.dtype == torch.float32
    assert torch.equal(fresh.dequantize(), weight)


def test_meta_fake_and_traced_inputs(gen):
    layer = _filled_layer(gen, K=128, N=64)
    assert layer.to("meta")(torch.empty(2, 128, device="meta")).shape == (2, 64)
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer = _filled_layer(gen, K=128, N=64)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # (the layer's buffers are real)
        fake = mode.from_tensor(torch.randn(2, 128))
        assert layer(fake).shape == (2, 64)
    traced = torch.jit.trace(_filled_layer(gen, K=128, N=64), torch.randn(2, 128))  # a fresh layer
    assert traced(torch.randn(3, 128)).shape == (3, 64)


def test_from_result_takes_the_bias_dtype_and_computes_in_the_inputs(gen):
    """``from_result``'s dtype defaults to the bias's (what ``.weight.dtype`` reports, and the
    bias is stored in it); the forward computes in the activations' dtype, bias included,
    whatever the layer's dtype."""
    result = solve(epmq.QuantSpec(bits=3, group_size=16), gen)
    bias = torch.randn(24, generator=gen).to(torch.bfloat16)
    layer = epmq.QuantLinear.from_result(result, bias)
    assert layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.bias, bias)
    # a float32 layer (bias float32) fed bfloat16 activations answers in bfloat16
    bias32 = torch.randn(24, generator=gen)
    layer = epmq.QuantLinear.from_result(result, bias32)
    x = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = x.float() @ weight_with_fp16_scales(result).t() + bias32
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)


def test_zero_points_outside_the_grid_are_refused(gen):
    result = solve(epmq.QuantSpec(bits=3, group_size=16), gen)
    for bad in (-1.0, 8.0):
        zeros = result.zeros.clone()
        zeros[0, 0] = bad
        with pytest.raises(ValueError, match="zero points outside the 3-bit grid"):
            epmq.QuantLinear.from_result(dataclasses.replace(result, zeros=zeros))


@pytest.mark.parametrize("group_size", [-1, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layer_of_no_inputs_gives_its_bias(group_size, dtype):
    """in_features 0 (accepted by the constructor): the output is the bias, in every dtype and
    grid (16-bit inputs on the CPU and groups divided by zero before)."""
    layer = epmq.QuantLinear(0, 16, bits=4, group_size=group_size, bias=True)
    with torch.no_grad():
        layer.bias.copy_(torch.arange(16.0))
    y = layer(torch.randn(3, 0).to(dtype))
    assert y.shape == (3, 16) and y.dtype == dtype
    torch.testing.assert_close(y.float(), torch.arange(16.0).expand(3, 16))
    assert layer.dequantize().shape == (16, 0)


def test_results_of_the_wrong_shape_or_groups_are_refused(gen):
    """from_result fills the buffers with copy_, which broadcasts: a [1, G] grid, a [1] g_idx or
    bias became every column's or input's, and a g_idx of -1 read the last group, silently."""
    result = solve(epmq.QuantSpec(bits=4, group_size=16), gen)  # 24 outputs, 64 inputs, 4 groups
    g_low, g_high = result.g_idx.clone(), result.g_idx.clone()
    g_low[0], g_high[0] = -1, 4
    bad = {
        "g_idx holds groups in \\[-1": dict(g_idx=g_low),
        "g_idx holds groups in \\[0, 4\\]": dict(g_idx=g_high),
        "g_idx is \\(1,\\)": dict(g_idx=result.g_idx[:1]),
        "g_idx must be integers": dict(g_idx=result.g_idx.float()),
        "scales is \\(1, 4\\)": dict(scales=result.scales[:1]),
        "zeros is \\(1, 4\\)": dict(zeros=result.zeros[:1]),
        "scales must be finite": dict(scales=result.scales * float("nan")),
    }
    for message, change in bad.items():
        with pytest.raises(ValueError, match=message):
            epmq.QuantLinear.from_result(dataclasses.replace(result, **change))
    for bias in (torch.ones(1), torch.ones(23), torch.ones(1, 24)):
        with pytest.raises(ValueError, match="bias is"):
            epmq.QuantLinear.from_result(result, bias)


def test_a_held_layer_keeps_its_dequantized_weight_until_its_buffers_change(gen):
    """The walker holds a block's quantized layers dequantized while it runs the block again:
    the same products, the weight made once; a write into the codes is seen; released, nothing
    is kept."""
    layer = epmq.QuantLinear.from_result(solve(epmq.QuantSpec(bits=3, group_size=16), gen))
    x = torch.randn(5, layer.in_features, generator=gen)
    expected = layer(x)
    layer._hold_dequantized(True)
    assert torch.equal(layer(x), expected) and torch.equal(layer(x), expected)
    held = [n for n in layer._derived if n.startswith("_held_")]
    assert held == ["_held_float32"]
    with torch.no_grad():
        layer.qweight.bitwise_xor_(1)  # (in place: its version counter moves)
    changed = layer._weight_kn(torch.float32)
    assert torch.equal(layer(x), x @ changed) and not torch.equal(layer(x), expected)
    layer._hold_dequantized(False)
    assert not any(n.startswith("_held_") for n in layer._derived)
    assert torch.equal(layer(x), x @ changed)


def _glibc() -> bool:
    import ctypes
    import sys

    return sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "malloc_trim")


@pytest.mark.skipif(not _glibc(), reason="glibc's heap (malloc_trim)")
def test_a_loaded_checkpoints_first_cpu_forward_keeps_what_it_builds_not_its_temporaries(tmp_path):
    """The first CPU forward repacks each layer's codes for torch's int4 kernel, through [K, N]
    int32 temporaries; glibc kept their freed memory in its heap: a 4-layer Llama (hidden 1024)
    grew by ~230 MB where the repacked codes and grids it keeps are ~20 MB (a 170M-parameter
    one: 1.2 GB resident against 1.0 GB once trimmed). Measured in a fresh process, as served."""
    import json
    import os
    import subprocess
    import sys

    import transformers

    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=2816,
                                      num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16,
                                      tie_word_embeddings=False)
    config.dtype = torch.float16
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.float16).eval()
    model = epmq.quantize_model(model, epmq.QuantSpec(bits=4, group_size=128, sym=True), method="rtn",
                                progress=False)
    epmq.save_quantized(model, tmp_path / "w4")
    del model
    code = f"""if True:
        import json, torch, epmq

        def resident():
            return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                        if line.startswith("VmRSS"))

        model = epmq.load_quantized({str(tmp_path / "w4")!r})
        before = resident()
        with torch.no_grad():
            model(torch.randint(0, 1000, (1, 16)))
        grown = resident() - before
        kept = sum(t.untyped_storage().nbytes() for m in model.modules() if isinstance(m, epmq.QuantLinear)
                   for _, _, made in m._derived.values() for t in (made if isinstance(made, tuple) else (made,))
                   if isinstance(t, torch.Tensor))
        print(json.dumps({{"grown": grown, "kept": kept}}))"""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["kept"] > 10 * 2**20  # (the int4 kernel's path was taken)
    # (the rest: what torch's first CPU forward allocates for itself, ~15 MB)
    assert seen["grown"] < seen["kept"] + 64 * 2**20, seen


def test_a_first_cpu_forward_of_many_small_layers_trims_the_heap_once_their_temporaries_add_up(gen, monkeypatch):
    """The heap was trimmed after each layer's repack for torch's int4 kernel, and a trim scans
    the whole heap (tens of ms on a GB heap): the first forward of 2000 layers [512, 512] took
    32 s where it took 6 s untrimmed, slower the more layers (a MoE's experts: thousands per
    model). Trimmed once the freed temporaries add up to ``TRIM_EVERY`` bytes, not per layer."""
    from epmq import _util, qlinear

    if qlinear._cpu_int4_mm is None:
        pytest.skip("no CPU int4 kernel in this torch")
    trims = []
    monkeypatch.setattr(_util, "_malloc_trim", lambda: trims.append)
    result = solve(epmq.QuantSpec(bits=4, group_size=128), gen, d_out=32, d_in=256)
    layers = [epmq.QuantLinear.from_result(result, None).bfloat16() for _ in range(40)]
    x = torch.randn(2, 256, generator=gen).bfloat16()
    for layer in layers:
        assert layer._cpu_int4(torch.bfloat16) is not None
        layer(x)
    # (40 layers' [256, 32] int32 temporaries: far fewer bytes than call for a trim)
    assert len(trims) <= 1, len(trims)
    assert 40 * 2 * 256 * 32 * 4 < _util.TRIM_EVERY


def _tiny_packed_model(gen, dtype=torch.float32):
    """norm -> up (32->48) -> ReLU -> down (48->8), the linears packed (the norm: a parameter outside
    them, as a model's embeddings and norms are)."""
    from torch import nn

    model = nn.Sequential()
    model.add_module("norm", nn.LayerNorm(32))
    model.add_module("up", epmq.QuantLinear.from_result(solve(epmq.QuantSpec(bits=4, group_size=16), gen, 48, 32),
                                                        torch.randn(48, generator=gen)))
    model.add_module("act", nn.ReLU())
    model.add_module("down", epmq.QuantLinear.from_result(solve(epmq.QuantSpec(bits=3, group_size=16), gen, 8, 48),
                                                          torch.randn(8, generator=gen)))
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_peft_lora_trains_on_packed_layers_and_merges(gen, dtype, tmp_path):
    """PEFT has no dispatcher for QuantLinear (get_peft_model failed on it): with_quant_linear
    registers one. The adapters train over the frozen packed layers; a merge is the dequantized
    weight plus the update in an nn.Linear, unmerge gives the packed layer back as it was."""
    peft = pytest.importorskip("peft")
    from epmq.peft_lora import with_quant_linear

    model = _tiny_packed_model(gen, dtype)
    packed = {name: t.clone() for name, t in model.state_dict().items() if not name.startswith("norm")}
    x, target = torch.randn(64, 32, generator=gen).to(dtype), torch.randn(64, 8, generator=gen)
    config = with_quant_linear(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]))
    lora = peft.get_peft_model(model, config)
    assert sorted(n for n, p in lora.named_parameters() if p.requires_grad) == sorted(
        f"base_model.model.{layer}.lora_{ab}.default.weight" for layer in ("up", "down") for ab in "AB")
    _assert_lora_trains(lora, [p for p in lora.parameters() if p.requires_grad], x, target)
    up = lora.base_model.model.up
    assert all(torch.equal(t, packed[name]) for name, t in model.state_dict().items() if name in packed)
    with torch.no_grad():
        trained = lora(x)
        lora.save_pretrained(tmp_path)
        # (bf16: W + B A rounded once more, as PEFT's merge into an nn.Linear of bf16 rounds it)
        tol = 5e-2 if dtype == torch.bfloat16 else 1e-5

        def off(y):
            return float((y.float() - trained.float()).abs().max() / trained.float().abs().max())

        with lora.disable_adapter():  # (what a merge that lost the update would give)
            assert off(lora(x)) > 4 * tol
        up.merge()
        assert type(up.get_base_layer()) is torch.nn.Linear and up.get_base_layer().weight.dtype == dtype
        assert up.merged_adapters == ["default"]
        assert off(lora(x)) < tol
        up.unmerge()
        assert isinstance(up.get_base_layer(), epmq.QuantLinear)
        assert torch.equal(lora(x), trained)
        merged = lora.merge_and_unload()
        assert [type(merged.up), type(merged.down)] == [torch.nn.Linear] * 2
        assert off(merged(x)) < tol
        # the adapter saved: loaded onto the packed model again (the config registered again, as
        # PEFT's custom modules are not saved with it)
        config = with_quant_linear(peft.LoraConfig.from_pretrained(tmp_path))
        fresh = _tiny_packed_model(gen, dtype)
        fresh.load_state_dict({**packed, **{n: t for n, t in model.state_dict().items() if n.startswith("norm")}})
        loaded = peft.PeftModel.from_pretrained(fresh, tmp_path, config=config)
        assert torch.equal(loaded(x), trained)


def test_peft_lora_on_a_model_of_packed_layers_alone(gen):
    """PEFT places new adapters by the model's first parameter: on a model whose weights are all
    packed (buffers, no parameters) get_peft_model ended in a bare StopIteration. They go where
    the packed codes are, and train."""
    peft = pytest.importorskip("peft")
    from epmq.peft_lora import with_quant_linear

    model = _tiny_packed_model(gen)
    del model.norm  # (its one parameter)
    assert not list(model.parameters())
    lora = peft.get_peft_model(model, with_quant_linear(peft.LoraConfig(r=4, target_modules=["up", "down"])))
    adapters = [p for p in lora.parameters() if p.requires_grad]
    assert len(adapters) == 4 and all(p.device == model.up.get_base_layer().qweight.device for p in adapters)
    _assert_lora_trains(lora, adapters, torch.randn(64, 32, generator=gen), torch.randn(64, 8, generator=gen))
    # (a model of no tensors at all: PEFT's own refusal of what it cannot adapt)
    with pytest.raises(ValueError, match=r"Target module ReLU\(\) is not supported"):
        peft.get_peft_model(torch.nn.Sequential(torch.nn.ReLU()),
                            with_quant_linear(peft.LoraConfig(r=2, target_modules=["0"])))


def test_peft_lora_after_a_reload_of_the_module_adapts_ordinary_models(gen):
    """with_quant_linear replaces PEFT's LoRA device map by one that takes models of packed layers
    alone, and took PEFT's own from the name it replaces: reloaded (a notebook's autoreload), the
    module's replacement took itself for PEFT's, and LoRA on any model ended in a RecursionError."""
    import importlib

    peft = pytest.importorskip("peft")
    import epmq.peft_lora

    def adapt(model, target):
        config = epmq.peft_lora.with_quant_linear(peft.LoraConfig(r=2, target_modules=[target]))
        return [p for p in peft.get_peft_model(model, config).parameters() if p.requires_grad]

    for _ in range(2):
        importlib.reload(epmq.peft_lora)
        assert len(adapt(torch.nn.Sequential(torch.nn.Linear(8, 4)), "0")) == 2
        packed = _tiny_packed_model(gen)
        del packed.norm
        assert len(adapt(packed, "up")) == 2


def test_peft_lora_variants_that_read_the_base_weight_are_refused(gen):
    """DoRA and PiSSA-like initialisations read the base weight, which a QuantLinear holds packed
    (its .weight a data-less stand-in)."""
    peft = pytest.importorskip("peft")
    from epmq.peft_lora import with_quant_linear

    refused = [(dict(use_dora=True), "DoraLinearVariant is not supported on a QuantLinear")] + [
        (dict(init_lora_weights=init, **({"loftq_config": peft.LoftQConfig()} if init == "loftq" else {})),
         f"init_lora_weights='{init}' reads or changes the base weight")
        for init in ("pissa", "olora", "mica", "corda", "loftq", "lora_ga")]
    for settings, message in refused:
        config = with_quant_linear(peft.LoraConfig(r=2, target_modules=["up"], **settings))
        with pytest.raises(ValueError, match=message):
            peft.get_peft_model(_tiny_packed_model(gen), config)


@pytest.mark.parametrize("init", ["orthogonal", "gaussian", "eva"])
def test_peft_lora_initialisations_of_shapes_alone_train(gen, init):
    """Orthogonal initialisation reads only the base layer's shapes and dtype (it leaves the base
    weight as it is), as do gaussian and EVA's (its B zero until EVA's own pass over the inputs):
    they were refused with the ones that read the base weight."""
    peft = pytest.importorskip("peft")
    from epmq.peft_lora import with_quant_linear

    model = _tiny_packed_model(gen, torch.bfloat16)
    packed = {name: t.clone() for name, t in model.state_dict().items() if not name.startswith("norm")}
    x, target = torch.randn(64, 32, generator=gen).bfloat16(), torch.randn(64, 8, generator=gen)
    lora = peft.get_peft_model(model, with_quant_linear(peft.LoraConfig(r=4, target_modules=["up", "down"],
                                                                         init_lora_weights=init)))
    adapters = [p for p in lora.parameters() if p.requires_grad]
    assert len(adapters) == 4 and not any(p.is_meta for p in adapters)
    _assert_lora_trains(lora, adapters, x, target)
    assert all(torch.equal(t, packed[name]) for name, t in model.state_dict().items() if name in packed)


def test_peft_lora_a_refused_merge_leaves_the_packed_layer(gen):
    """The merge swaps in a dense copy before PEFT's own merge into it: one that PEFT refuses
    (a safe merge of NaNs) puts the packed layer back."""
    peft = pytest.importorskip("peft")
    from epmq.peft_lora import with_quant_linear

    lora = peft.get_peft_model(_tiny_packed_model(gen), with_quant_linear(peft.LoraConfig(r=2, target_modules=["up"])))
    up = lora.base_model.model.up
    packed = up.get_base_layer()
    with torch.no_grad():
        up.lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        up.merge(safe_merge=True)
    assert up.get_base_layer() is packed and not up.merged
    with torch.no_grad():
        up.lora_B["default"].weight.zero_()
    up.merge()
    assert type(up.get_base_layer()) is torch.nn.Linear
    torch.testing.assert_close(up.get_base_layer().weight, packed.dequantize(), rtol=0, atol=0)
    up.unmerge()
    assert up.get_base_layer() is packed


def test_weights_that_overflow_a_float16_layer_are_refused(gen):
    """Finite float16 scales times codes less zero points may pass float16's largest (65504): a
    float16 layer's weight, and so its outputs, were inf. Refused where the layer computes in
    float16; bfloat16 and float32 take them."""
    result = quant.rtn(torch.randn(8, 32, generator=gen) * 1e5, epmq.QuantSpec(bits=4, group_size=16))
    assert bool(torch.isfinite(result.scales.half()).all()) and float(result.weight.abs().max()) > 65504
    with pytest.raises(ValueError, match=r"weights up to .* overflow float16, the layer's dtype \(largest 65504\)"):
        epmq.QuantLinear.from_result(result, dtype=torch.float16)
    x = torch.randn(2, 32, generator=gen)
    for dtype in (torch.bfloat16, torch.float32):
        layer = epmq.QuantLinear.from_result(result, dtype=dtype)
        assert bool(torch.isfinite(layer(x.to(dtype))).all())
    # loaded (by copy or assigned), the layer's own dtype decides too
    state = epmq.QuantLinear.from_result(result).state_dict()
    for assign in (False, True):
        half = epmq.QuantLinear(32, 8, bits=4, group_size=16, bias=False, dtype=torch.float16)
        with pytest.raises(RuntimeError, match=r"scales: weights up to .* overflow float16, the layer's dtype"):
            half.load_state_dict(state, assign=assign)
        assert not half.scales.any()  # (left as it was)
        bf16 = epmq.QuantLinear(32, 8, bits=4, group_size=16, bias=False, dtype=torch.bfloat16)
        bf16.load_state_dict(state, assign=assign)


def test_casting_a_layer_to_float16_warns_where_its_weights_overflow(gen):
    """from_result and load_state_dict refuse a float16 layer whose weights pass float16's largest,
    but a bfloat16 or float32 one cast after (layer.half(), model.to(torch.float16)) went float16
    without a word, its outputs inf. Warned, naming the layer and its largest weight (a raise
    inside model.half() would leave the model half cast); a layer that fits casts in silence."""
    import warnings

    result = quant.rtn(torch.randn(8, 32, generator=gen) * 1e5, epmq.QuantSpec(bits=4, group_size=16))
    message = r"QuantLinear\(in_features=32, out_features=8.* cast to float16: weights up to .* overflow it"
    x = torch.randn(2, 32, generator=gen).half()
    for cast in (lambda m: m.half(), lambda m: m.to(torch.float16), lambda m: torch.nn.Sequential(m).half()[0]):
        for dtype in (torch.bfloat16, torch.float32):
            with pytest.warns(UserWarning, match=message):
                layer = cast(epmq.QuantLinear.from_result(result, dtype=dtype))
            assert layer.weight.dtype == torch.float16 and not bool(torch.isfinite(layer(x)).all())
    fits = quant.rtn(torch.randn(8, 32, generator=gen), epmq.QuantSpec(bits=4, group_size=16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        epmq.QuantLinear.from_result(fits, dtype=torch.bfloat16).half()
        epmq.QuantLinear.from_result(result, dtype=torch.float32).to(torch.bfloat16).float()


def test_large_scales_whose_codes_stay_near_the_zero_point_are_taken_in_float16():
    """maxq times the largest scale only bounds the weights: where it passes float16's largest,
    the codes decide (a scale of 6e4 on codes one step from the zero point is a finite weight)."""
    from epmq.packing import pack_cols, pack_rows

    def state(code):
        codes = torch.full((32, 16), 9, dtype=torch.int32)
        codes[5, 3] = code
        return dict(qweight=pack_rows(codes, 4), qzeros=pack_cols(torch.full((2, 16), 8, dtype=torch.int32), 4),
                    scales=torch.full((2, 16), 6e4, dtype=torch.float16), g_idx=torch.arange(32) // 16)

    layer = epmq.QuantLinear(32, 16, bits=4, group_size=16, bias=False, dtype=torch.float16)
    layer.load_state_dict(state(7))
    assert float(layer.dequantize(torch.float16).abs().max()) == 6e4  # (a multiple of float16's step there, 32)
    with pytest.raises(RuntimeError, match=r"weights up to 1\.2e\+05"):
        layer.load_state_dict(state(10))


@pytest.mark.parametrize("g_idx_dtype", [torch.int64, torch.int16, torch.uint8], ids=str)
def test_an_assigned_g_idx_is_held_as_int32(gen, g_idx_dtype):
    """load_state_dict(assign=True) kept a file's int64 (or narrower) g_idx, where a copy and
    load_quantized give int32: save_quantized then wrote it so for engines, and the CUDA kernel,
    which takes int32 or int64 only, refused an int16 one. Held as int32 whichever way it loads."""
    from epmq_kernels.w4a16 import w4a16_matmul_reference

    layer = epmq.QuantLinear.from_result(solve(epmq.QuantSpec(bits=4, group_size=16, act_order=True), gen),
                                         torch.randn(24, generator=gen))
    state = dict(layer.state_dict(), g_idx=layer.g_idx.to(g_idx_dtype))
    x = torch.randn(3, 64, generator=gen)
    for assign in (False, True):
        loaded = epmq.QuantLinear(64, 24, bits=4, group_size=16, device="meta" if assign else None)
        loaded.load_state_dict(state, assign=assign)
        assert loaded.g_idx.dtype == torch.int32 and torch.equal(loaded.g_idx, layer.g_idx)
        assert loaded.state_dict()["g_idx"].dtype == torch.int32
        # (what the CUDA forward hands the kernel's launcher, checked by the same argument checks)
        y = w4a16_matmul_reference(x, loaded.qweight, loaded.scales, loaded._zeros_u8(), 16, loaded.g_idx,
                                   dtype=torch.float32)
        torch.testing.assert_close(y + loaded.bias, loaded(x), rtol=1e-5, atol=1e-5)


def _assert_lora_trains(lora, adapters, x, target):
    """40 Adam steps on ``adapters`` bring ``lora``'s squared error to ``target`` below 0.7 of its first."""
    optimizer = torch.optim.Adam(adapters, lr=1e-2)
    losses = []
    for _ in range(40):
        loss = (lora(x).float() - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
