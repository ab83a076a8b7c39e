"""``QuantLinear``: a linear layer stored as packed GPTQ codes.

Buffers (the ``gptq`` checkpoint layout, ``K`` = in_features, ``N`` = out_features, ``G`` groups):

    qweight  int32 [ceil(K*bits/32), N]   codes packed along K (``epmq.packing.pack_rows``)
    qzeros   int32 [G, ceil(N*bits/32)]   zero points packed along N (``pack_cols``)
    scales   fp16  [G, N]
    g_idx    int32 [K]                    group of each input feature
    bias     [N] in the layer's dtype, or absent

so that ``W[k, n] = (q[k, n] - z[g_idx[k], n]) * scales[g_idx[k], n] * weight_multiplier`` and
``y = x @ W + bias``: ``weight_multiplier`` (a number, 1 but where the weight was multiplied or divided
in place, see ``PackedWeight``) multiplies the product's outputs, never the scales.

In memory ``qzeros`` holds the zero points ``z`` themselves (GPTQ "v2"); the original "v1"
convention (``z - 1``) exists only in files and is converted by ``epmq.checkpoint``.

Forward: on CUDA with 4 bits, the fused ``epmq_kernels.w4a16_matmul`` (the weight is
dequantized in registers, never in memory; an act-order layer's codes are sorted by group once,
a second copy of its packed codes on the GPU, and its activations gathered into that order per
call: ``epmq_kernels.w4a16.ACT_ORDER_REPACK``). Under ``torch.compile`` a traceable forward
(``_traced_product``: the kernel as the custom op ``torch.ops.epmq.w4a16_matmul``), so a
compiled model has no graph break at its quantized layers. On the CPU with 4 bits, bf16 or fp16 activations
and at most ``CPU_INT4_MAX_ROWS`` rows, torch's own int4 CPU kernel
(``aten._weight_int4pack_mm_for_cpu``, the one torchao uses), with the codes repacked once into
its layout (a second copy of the 4-bit codes, kept until the buffers change; writes through ``.data``
do not count as a change: call ``QuantLinear.refresh()`` after them): 0.5 ms instead
of 53 ms for a 4096 x 4096 layer at batch 1 on 2 cores, its error that of the bf16 product
(the kernel takes ``w = (q - 8) s + (8 - z) s``; groups of 32-256 input rows, per-channel
grids as groups of the largest of those dividing K, act-order as static groups of a permuted
K; out_features a multiple of 16). Otherwise the weight is dequantized to the activations'
dtype for the one product and dropped (no full-precision copy is kept; only the small ``[G,
N]`` grid is kept unpacked, until its buffers change): the kernel's cost grows with the rows
and the dequantization's does not, so larger batches and fp32 (exact) take this path.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Optional

import torch
from torch import nn
from torch.autograd import forward_ad
from torch.utils import _pytree as pytree

from epmq_kernels._runtime import version
from epmq_kernels.grid import is_bits

from ._util import release_freed_memory
from .checks import all_finite
from .packing import pack_cols, pack_rows, packed_length, unpack_cols, unpack_rows
from .spec import SUPPORTED_BITS

try:  # the fused int4 kernel is optional: the torch path below is always correct
    from epmq_kernels.w4a16 import w4a16_matmul, w4a16_matmul_op
except ImportError:  # pragma: no cover
    w4a16_matmul = w4a16_matmul_op = None

# torch's CPU int4 matmul: rows (tokens) up to which it beats dequantize + matmul. It costs
# ~0.2 ms a row for 4096 x 4096 on 2 cores (26 ms at 128 rows, 105 ms at 512), the dequantized
# bf16 path ~50 ms whatever the rows up to a few hundred.
CPU_INT4_MAX_ROWS = 128
# Activations the CUDA W4A16 kernel takes (others, float64, take the dequantized product)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _is_fake(x: torch.Tensor) -> bool:
    """A FakeTensor (shape propagation, export): no values to cache or branch on."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(x, FakeTensor)
CPU_INT4_GROUPS = (256, 128, 64, 32)  # the group sizes the kernel takes
PACKED_BUFFERS = ("qweight", "qzeros", "scales", "g_idx")  # (the layout's, checked together on a load)
_cpu_int4_mm = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)


# What a quantize_model call says of the layers it makes (``QuantLinear.quantized_with``), and
# what ``model.epmq_quant_config`` and a checkpoint's config say of a model's layers.
CALL_FIELDS = ("bits", "group_size", "sym", "act_order", "static_groups", "method", "targets", "adapter",
               "true_sequential")


def common_quant_config(records) -> dict:
    """Each field of ``CALL_FIELDS`` that all ``records`` (dicts) agree on; None where they
    differ (a model quantized in parts by calls of other specs or methods) or none has it."""
    records = list(records)
    common = {}
    for field in CALL_FIELDS:
        values = {r.get(field) for r in records}
        common[field] = values.pop() if len(values) == 1 else None
    return common


def in_order_g_idx(K: int, group_size: int, device=None) -> torch.Tensor:
    """int32 ``[K]``: the group of each input where the groups run in order (``k // group_size``;
    per channel, ``group_size`` -1, all 0): static groups, and what writers without act-order
    mean by leaving ``g_idx`` out."""
    return (torch.arange(K, device=device) // max(1, K if group_size == -1 else group_size)).to(torch.int32)


def g_idx_problem(g_idx: torch.Tensor, G: int, grid: str) -> Optional[str]:
    """Why ``g_idx`` cannot index ``grid``, of ``G`` groups (None where it can): not integers, or
    groups outside ``[0, G)`` (the forward gathers the ``[G, N]`` grid with it: -1 would read the
    last group silently)."""
    if g_idx.is_floating_point() or g_idx.is_complex() or g_idx.dtype == torch.bool:
        return f"g_idx must be integers, got {g_idx.dtype}"
    if g_idx.numel():
        lo, hi = (int(v) for v in torch.aminmax(g_idx))
        if lo < 0 or hi >= G:
            return f"g_idx holds groups in [{lo}, {hi}], outside the {G} groups of {grid}"
    return None


class PackedWeight(torch.Tensor):
    """``QuantLinear.weight``: a tensor that holds no values of its own, with the original weight's
    shape ``[out, in]``, the dtype the layer stands in for and its codes' device, which model code
    reads without a product (T5 casts activations to ``wo.weight.dtype``; code that places a
    tensor on ``proj.weight.device`` got the meta device, and failed on it). Any op on it takes
    the weight dequantized for that op: a block that calls a layer and multiplies by its weight
    too (a tied projection) gets the packed weight both times, where the data-less stand-in this
    replaces was multiplied into garbage without a word or ended in a bare meta-device error.
    An in-place multiplication or division by a number multiplies the layer's ``weight_multiplier``
    (the codes and scales stay); other writes change nothing, with a warning naming the layer."""

    @staticmethod
    def __new__(cls, layer: "QuantLinear"):
        weight = torch.Tensor._make_wrapper_subclass(
            cls, (layer.out_features, layer.in_features), dtype=layer._dtype_probe.dtype, device=layer.qweight.device
        )
        weight.layer = layer
        return weight

    # (torch's functions reach __torch_dispatch__ as aten ops, each with the tensors it reads)
    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        factor = _scalar_factor(func, args, kwargs)
        if factor is not None:
            return args[0].layer._scale_weight(factor)
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, PackedWeight):
                # (dropped, as the meta stand-in's were, not refused)
                warnings.warn(
                    f"{func.__name__} into the weight of QuantLinear({value.layer.extra_repr()}) is dropped: "
                    f"the layer is packed, its weight the dequantized codes; write its buffers (qweight, "
                    f"qzeros, scales), or replace it with an nn.Linear of its dequantize()")
                return value

        def read(t):
            return t.layer._read_weight(t.dtype) if isinstance(t, PackedWeight) else t

        return func(*pytree.tree_map(read, args), **pytree.tree_map(read, kwargs))

    # (what torch does not dispatch for a tensor subclass: the values, dequantized)
    def numpy(self, *, force=False):
        return self.layer._read_weight(self.dtype).numpy(force=force)

    def tolist(self):
        return self.layer._read_weight(self.dtype).tolist()

    def __deepcopy__(self, memo):
        return self.layer._read_weight(self.dtype)

    def __repr__(self):
        return (f"PackedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}) of "
                f"QuantLinear({self.layer.extra_repr()})")


# (RWKV divides its layers' weights by 2 ** k in place on its first forward in eval mode, and
# multiplies them back on its first in train mode: a write dropped there left the weights
# divided while the model no longer halved its hidden states, logits ~40% off)
_SCALINGS = {torch.ops.aten.mul_.Tensor: False, torch.ops.aten.mul_.Scalar: False,
             torch.ops.aten.div_.Tensor: True, torch.ops.aten.div_.Scalar: True}


def _scalar_factor(func, args, kwargs) -> Optional[float]:
    """What ``func`` (``weight.mul_(c)``, ``weight.div_(c)`` on a ``PackedWeight``) multiplies the
    weight by, where ``c`` is one number; else None."""
    if func not in _SCALINGS or kwargs or len(args) != 2 or not isinstance(args[0], PackedWeight):
        return None
    c = args[1]
    if isinstance(c, torch.Tensor):
        if isinstance(c, PackedWeight) or c.numel() != 1 or c.ndim or c.is_complex():
            return None
        c = c.item()
    if isinstance(c, complex):
        return None
    if not _SCALINGS[func]:
        return c
    return 1 / c if c else math.inf  # (divided by 0: refused as past the scales' range)


def weight_overflow(scales, zeros, codes, g_idx, maxq: int, dtype: torch.dtype) -> Optional[float]:
    """The largest ``|(q - z) s|`` of a layer's weight where it rounds to inf in ``dtype``, the
    dtype the layer computes in (its dequantized weight, and so its outputs, would be inf there:
    fp16 scales up to 6e4 times codes up to 255 overflow float16), else None. ``scales`` ``[G, N]``;
    ``zeros()`` ``[G, N]`` and ``codes()`` ``[K, N]`` are unpacked only where ``maxq * max|s|``
    does not already rule the overflow out, as it does for float16 scales in bfloat16 or float32."""
    if not dtype.is_floating_point or not scales.numel():
        return None

    def overflows(value: float) -> bool:  # (rounded to nearest: just past max still rounds to max)
        return not math.isfinite(float(torch.tensor(value, dtype=torch.float64).to(dtype)))

    s = scales.double().abs()
    if not overflows(float(s.max()) * maxq):
        return None
    g = g_idx.long()
    # (a scale itself inf in dtype makes even its q == z weights NaN: 0 * inf)
    largest = max(float(s.max()), float(((codes().double() - zeros().double()[g]) * s[g]).abs().max()))
    return largest if overflows(largest) else None


def _warn_subnormal(scales, exact, bits, advice):
    """A warning where float16 ``scales`` keep too few bits of ``exact``: below float16's normal
    range (6.1e-5) a scale keeps fewer bits, below 3e-8 none. Warned of where that moves a weight
    by over a quarter of its rounding step (the code's distance from the zero point, up to maxq,
    times the scale's error)."""
    maxq = 2 ** bits - 1
    exact = exact.double()
    off = (scales.double() - exact).abs() * maxq > exact.abs() / 4
    if bool(off.any()):
        lost = int((off & (scales == 0)).sum())
        warnings.warn(f"{int(off.sum())} of {scales.numel()} scales are below float16's normal range "
                      f"(6.1e-05), the gptq format's scale dtype, and lose precision that matters at "
                      f"{bits} bits" + (f"; {lost} round to 0, zeroing their groups' weights" if lost else "")
                      + f" (groups of weights spanning under {float(exact[off].abs().max()) * maxq:.2g}): {advice}")


class QuantLinear(nn.Module):
    """Packed replacement of ``nn.Linear(in_features, out_features)``; see the module docstring.

    ``quantized_with``: what the ``quantize_model`` call that made it used (a dict of
    ``CALL_FIELDS``), or what its checkpoint says; None for a layer built otherwise."""

    quantized_with: Optional[dict] = None  # (a layer pickled before it existed has none of its own)
    # what in-place writes (``weight.mul_(c)``, ``weight.div_(c)``) multiplied the weight by, applied to the
    # product's outputs: RWKV divides its layers by 2 ** k for inference, and scales so divided fell into
    # float16's subnormals (or to 0) and no longer multiplied back exactly. The layer's own, as RWKV's
    # ``layers_are_rescaled`` is its model's: the state dict holds the gptq layout's tensors alone (a strict
    # loader of them found an unexpected key), the weight before the writes, as RWKV's checkpoints hold it,
    # and a load keeps the multiplier, so a model that has divided its layers takes them as it holds its own.
    # (``save_quantized`` writes it into the scales; ``epmq.resume`` keeps it beside them.)
    weight_multiplier: float = 1.0

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        # (numpy's integers are taken, as QuantSpec takes them, and held as Python's: the
        # layer's fields go to the checkpoint's JSON)
        if not is_bits(bits) or bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
        for value, what in ((in_features, "in_features"), (out_features, "out_features")):
            if not is_bits(value) or value < 0:  # (an integer, as bits)
                raise ValueError(f"{what} must be an integer >= 0, got {value!r}")
        if not is_bits(group_size) or (group_size != -1 and group_size <= 0):
            raise ValueError(f"group_size must be -1 or a positive integer, got {group_size!r}")
        bits, group_size, in_features, out_features = map(int, (bits, group_size, in_features, out_features))
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        K, N = in_features, out_features
        # a group size that does not divide K leaves a shorter last group (ceil(K / g) groups),
        # as GPTQModel and AutoGPTQ write such layers
        G = 1 if group_size == -1 else -(-K // group_size)
        kw = dict(device=device)
        self.register_buffer("qweight", torch.zeros(packed_length(K, bits), N, dtype=torch.int32, **kw))
        self.register_buffer("qzeros", torch.zeros(G, packed_length(N, bits), dtype=torch.int32, **kw))
        self.register_buffer("scales", torch.zeros(G, N, dtype=torch.float16, **kw))
        self.register_buffer("g_idx", in_order_g_idx(K, group_size, device))
        self.register_buffer("bias", torch.zeros(N, dtype=dtype, **kw) if bias else None)
        # Follows .to(dtype) like any float buffer; see ``weight``.
        self.register_buffer("_dtype_probe", torch.empty(0, dtype=dtype, **kw), persistent=False)
        # What the forward derives from the buffers once (unpacked zeros, grids, the CPU int4
        # kernel's layout): name -> (buffers' identity, value). Not buffers, so .to() would not
        # move them; it drops them instead (_apply), and they are rebuilt where they are used.
        self._derived = {}

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_result(cls, result, bias: Optional[torch.Tensor] = None, *, dtype=None) -> "QuantLinear":
        """Pack a ``epmq.quant.QuantResult`` (codes ``[out, in]``, scales/zeros ``[out, G]``).

        ``dtype``: the activations' dtype the layer stands in for (default: the bias's, else
        float32); it is what ``.weight.dtype`` reports.
        """
        spec = result.spec
        N, K = result.codes.shape
        if dtype is None:
            dtype = bias.dtype if bias is not None else torch.float32
        layer = cls(
            K, N, bits=spec.bits, group_size=spec.group_size, bias=bias is not None,
            dtype=dtype, device=result.codes.device,
        )
        # the buffers are filled by copy_, which broadcasts: a [1, G] grid, a [1] g_idx or bias
        # would silently become every column's or input's
        G = layer.scales.shape[0]
        for value, want, what in ((result.scales, (N, G), "scales"), (result.zeros, (N, G), "zeros"),
                                  (result.g_idx, (K,), "g_idx"), (bias, (N,), "bias")):
            if value is not None and tuple(value.shape) != want:
                raise ValueError(f"{what} is {tuple(value.shape)}: {N} outputs, {K} inputs and group_size "
                                 f"{spec.group_size} ({G} groups) need {want}")
        problem = g_idx_problem(result.g_idx, G, "the grid")
        if problem is not None:
            raise ValueError(problem)
        zeros = torch.round(result.zeros).to(torch.int32)
        if int(zeros.min()) < 0 or int(zeros.max()) > spec.maxq:
            raise ValueError(f"zero points outside the {spec.bits}-bit grid: {zeros.min()}..{zeros.max()}")
        layer.qweight.copy_(pack_rows(result.codes.t(), spec.bits))
        layer.qzeros.copy_(pack_cols(zeros.t(), spec.bits))
        scales = result.scales.t().to(torch.float16)  # (the gptq format's dtype)
        if not bool(torch.isfinite(scales).all()):
            if not bool(torch.isfinite(result.scales).all()):
                raise ValueError("scales must be finite, got NaN or inf")
            big = float(result.scales.abs().max())
            raise ValueError(f"scales up to {big:.3g} overflow float16, the gptq format's scale dtype "
                             f"(weights of magnitude ~{big * spec.maxq:.3g}): rescale the layer")
        _warn_subnormal(scales, result.scales.t(), spec.bits, "rescale the layer, or use fewer bits or larger groups")
        largest = weight_overflow(scales, lambda: zeros.t(), lambda: result.codes.t(), result.g_idx, spec.maxq, dtype)
        if largest is not None:
            raise ValueError(f"weights up to {largest:.4g} (scales times codes less zero points) overflow "
                             f"{str(dtype)[6:]}, the layer's dtype (largest {torch.finfo(dtype).max:.6g}): its "
                             f"outputs would be inf; compute it in bfloat16 or float32, or rescale the layer")
        layer.scales.copy_(scales)
        layer.g_idx.copy_(result.g_idx.to(torch.int32))
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    # ----------------------------------------------------------------- views of the codes

    def codes(self) -> torch.Tensor:
        """The integer codes ``[K, N]``."""
        return unpack_rows(self.qweight, self.bits, self.in_features)

    def zeros(self) -> torch.Tensor:
        """The integer zero points ``[G, N]`` (v2: the zero points themselves)."""
        return unpack_cols(self.qzeros, self.bits, self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``[out, in]`` (``nn.Linear`` orientation) in ``dtype``."""
        return self._multiplied(self._weight_kn(dtype)).t()

    def _multiplied(self, w: torch.Tensor) -> torch.Tensor:
        """``w``, the codes dequantized, times ``weight_multiplier``."""
        return w if self.weight_multiplier == 1 else w * self.weight_multiplier

    def _weight_kn(self, dtype) -> torch.Tensor:
        q = self.codes()
        z, s, runs = self._grid(dtype)
        if runs:  # groups are runs of rows: broadcast the [G, N] grid, no [K, N] gathers
            K, N = q.shape
            G = s.shape[0]
            # (q - z) is a small integer, exact in any float dtype, so this is bit for bit the
            # integer subtraction followed by one rounding of the product
            return q.view(G, K // G, N).to(dtype).sub_(z[:, None]).mul_(s[:, None]).view(K, N)
        g = self.g_idx.long()
        return q.to(dtype).sub_(z[g]).mul_(s[g])

    def refresh(self) -> "QuantLinear":
        """Forget what the forward derived from the buffers (unpacked grids, the CPU kernel's
        repacked codes, the CUDA kernel's act-order sorted copy and launch checks); returns the
        layer. Call it after writing into the buffers in a way that bypasses their version
        counters: ``layer.qweight.data.copy_(...)``, ``.data[...] = ...``, a NumPy view or DLPack
        export written to. Those caches are keyed on each buffer's identity, address and version
        counter, and such writes change none of them: the forward would go on with the old
        weights, silently. (Nothing cheaper sees them: ``.data`` is a tensor with a version
        counter of its own, and a storage has none; comparing the values would read every code
        on each call, the whole cost of a batch-1 product.) Likewise any in-place write into
        buffers made under ``torch.inference_mode()`` (a model loaded there): inference tensors
        have no version counter. ``load_state_dict``, assigning new buffers, and in-place writes
        under ``torch.no_grad()`` without ``.data`` need no call.

        The buffers are then checked as ``load_state_dict`` checks a checkpoint's (ValueError naming
        the problem): writes into them in place (``copy_``, ``.data``, accelerate's
        ``set_module_tensor_to_device``, which casts a float32 scale past float16's range to inf) are
        not seen by the layer, and a lookup on every forward to see them would add a quarter to a
        batch-1 CPU product (10 of 37 us), so this is the call that checks them."""
        self._derived = {}
        # new tensor objects over the same memory: the kernels' caches, keyed on the tensors
        # themselves (``epmq_kernels.w4a16``), retire their entries for the old ones too
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.detach()
        self._refuse(self._state_problems({name: self._buffers[name] for name in PACKED_BUFFERS}, assign=True))
        return self

    def _refuse(self, problems: list) -> None:
        if problems:
            raise ValueError(f"QuantLinear({self.extra_repr()}): " + "; ".join(problems))

    def _cached(self, name, build, *buffers):
        """``build()``, kept until one of ``buffers`` changes (in place, or by ``.to``). Writes
        that bypass the version counter (``buf.data.copy_(...)``, a NumPy view) are not seen:
        call ``refresh()`` after them."""
        # (the tensors themselves too, by weak reference: a new buffer may reuse a freed one's
        # memory, and a fresh tensor's version is 0 again)
        key = tuple((b.data_ptr(), version(b), b.device) for b in buffers)
        derived = vars(self).setdefault("_derived", {})  # (layers pickled before it existed)
        hit = derived.get(name)
        if hit is None or hit[0] != key or any(ref() is not b for ref, b in zip(hit[1], buffers)):
            hit = derived[name] = (key, tuple(weakref.ref(b) for b in buffers), build())
        return hit[2]

    def _apply(self, fn, *args, **kwargs):
        # a layer moved off the GPU must not keep GPU copies of its zeros and grids alive
        self._derived = {}
        scales, dtype = self.scales, self._dtype_probe.dtype
        out = super()._apply(fn, *args, **kwargs)
        # the scales are part of the packed format (fp16, or fp32 from a checkpoint loaded with
        # assign=True): .to(bfloat16) must not round them for good, as it would a float buffer
        if self.scales.dtype != scales.dtype:  # (not by assignment: a cast that overflows is warned of, below)
            self._buffers["scales"] = scales.to(device=self.scales.device)
        if self._dtype_probe.dtype != dtype:
            self._warn_overflow()
        return out

    def _warn_overflow(self) -> None:
        """Warn where the layer's weight overflows the dtype it was just cast to, as ``from_result``
        and ``load_state_dict`` refuse: its outputs would be inf. Warned, not refused: inside
        ``model.half()`` the modules before this one are cast already, and a raise would leave the
        model half cast."""
        if any(t.is_meta or _is_fake(t) for t in (self.qweight, self.qzeros, self.scales, self.g_idx)):
            return
        dtype = self._dtype_probe.dtype
        largest = weight_overflow(self.scales.double() * self.weight_multiplier, self.zeros, self.codes, self.g_idx,
                                  (1 << self.bits) - 1, dtype)
        if largest is not None:
            warnings.warn(f"QuantLinear({self.extra_repr()}) cast to {str(dtype)[6:]}: weights up to {largest:.4g} "
                          f"(scales times codes less zero points) overflow it (largest {torch.finfo(dtype).max:.6g}): "
                          f"its outputs will be inf; keep the model in bfloat16 or float32, or rescale the layer")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # checked before anything is copied: copy_ casts, so float codes were truncated, a float32
        # scale past float16's range became inf and a float g_idx some group, and the loaded buffers
        # could no longer tell a corrupt or mismatched checkpoint; a layer refused is left as it was
        given = {name: state_dict[prefix + name] for name in self._buffers if prefix + name in state_dict}
        problems = self._state_problems(given, assign=local_metadata.get("assign_to_params_buffers", False))
        if problems:
            error_msgs.extend(prefix + problem for problem in problems)
            return
        # (assign=True sets the buffers one at a time: checked above as a whole, not each against the
        # others not yet replaced)
        vars(self)["_loading"] = True
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        finally:
            del vars(self)["_loading"]
        # (state dicts epmq wrote before it kept the multiplier out hold it beside the undivided weights: the
        # layer keeps its own, as RWKV's layers_are_rescaled is its model's, where taking it divided a fresh
        # RWKV's layers again at its first forward in eval mode)
        if prefix + "weight_multiplier" in unexpected_keys:
            unexpected_keys.remove(prefix + "weight_multiplier")
        self._derived = {}
        # assigned, a g_idx keeps the file's integers (int64 in some writers' files): the layout's
        # int32, as a copy into the buffer and load_quantized give it, and as save_quantized writes it
        # for engines (the CUDA kernel takes int32 or int64 only)
        if self.g_idx.dtype != torch.int32:
            self.g_idx = self.g_idx.to(torch.int32)
        # Inference tensors (buffers made under torch.inference_mode) have no version counter,
        # so the caches keyed on them (here and the kernel's launch plans) cannot see the copy
        # just made into them: new tensor objects over the same memory retire those entries.
        for name, buf in self._buffers.items():
            if buf is not None and buf.is_inference():
                self._buffers[name] = buf.detach()

    def _state_problems(self, given: dict, assign: bool, multiplier: Optional[float] = None) -> list:
        """Why the tensors ``given`` (buffer name -> tensor, those a state dict holds) cannot be this
        layer's, each naming its tensor; empty where they can. ``assign``: they replace the buffers
        (``load_state_dict(assign=True)``) and keep their dtypes, rather than being cast into them.
        ``multiplier``: the ``weight_multiplier`` the layer will hold with them (default: its own)."""
        # (not tensors, or a bias the layer has not: torch's own errors)
        given = {name: t for name, t in given.items()
                 if isinstance(t, torch.Tensor) and self._buffers[name] is not None}
        layout = (f"the layer ({self.in_features}->{self.out_features}, {self.bits} bits, group_size "
                  f"{self.group_size})")
        problems = [f"{name} is {tuple(t.shape)}, but {layout} holds {tuple(self._buffers[name].shape)}: "
                    f"a checkpoint of other bits, group_size or features"
                    for name, t in given.items() if t.shape != self._buffers[name].shape]
        if problems:
            return problems
        for name in ("qweight", "qzeros"):
            if name in given and given[name].dtype != torch.int32:
                problems.append(f"{name} must be int32 (packed words), got {given[name].dtype}")
        scales = given.get("scales")
        if scales is not None and not scales.is_floating_point():
            problems.append(f"scales must be floating-point, got {scales.dtype}")
        g_idx = given.get("g_idx")
        if g_idx is not None and not g_idx.is_meta and not _is_fake(g_idx):
            problem = g_idx_problem(g_idx, self.scales.shape[0], "scales")
            if problem is not None:
                problems.append(problem)
        if problems:
            return problems
        if scales is not None and not scales.is_meta and not _is_fake(scales):
            held = scales if assign else scales.to(self.scales.dtype)
            if not all_finite(held):
                problems.append("scales must be finite, got NaN or inf" if not all_finite(scales) else
                                f"scales up to {float(scales.abs().max()):.3g} overflow {str(held.dtype)[6:]}, "
                                f"the layer's scale dtype")
        # the packed words' bits past the last code (K * bits or N * bits not a multiple of 32) are
        # zero as written: set, the words hold more codes than this layer has features
        for name, length, words in (("qweight", self.in_features, lambda w: w[-1]),
                                    ("qzeros", self.out_features, lambda w: w[:, -1])):
            packed = given.get(name)
            used = length * self.bits % 32
            if packed is not None and used and not packed.is_meta and not _is_fake(packed):
                if bool((words(packed) & -(1 << used)).any()):
                    problems.append(f"{name} has bits set past its {length} codes of {self.bits} bits (the "
                                    f"padding of its last words): a checkpoint of more "
                                    f"{'inputs' if name == 'qweight' else 'outputs'} or other bits")
        if problems:
            return problems
        # finite scales may still give weights past the layer's dtype (a peer's fp32 or large fp16
        # scales in a float16 model): its outputs inf. Of the tensors it will hold, given or its own.
        held = {name: given.get(name, self._buffers[name]) for name in PACKED_BUFFERS}
        if held.keys() & given.keys() and not any(t.is_meta or _is_fake(t) for t in held.values()):
            dtype = self._dtype_probe.dtype
            multiplier = self.weight_multiplier if multiplier is None else multiplier
            largest = weight_overflow(
                (held["scales"] if assign else held["scales"].to(self.scales.dtype)).double() * multiplier,
                lambda: unpack_cols(held["qzeros"], self.bits, self.out_features),
                lambda: unpack_rows(held["qweight"], self.bits, self.in_features), held["g_idx"],
                (1 << self.bits) - 1, dtype)
            if largest is not None:
                problems.append(f"scales: weights up to {largest:.4g} (scales times codes less zero points) "
                                f"overflow {str(dtype)[6:]}, the layer's dtype (largest "
                                f"{torch.finfo(dtype).max:.6g}): its outputs would be inf; load it into a "
                                f"bfloat16 or float32 model, or rescale the layer")
        return problems

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return dict(state, _derived={})  # (what the forward derived is rebuilt, not pickled)

    def __setstate__(self, state):
        super().__setstate__(state)
        from .checkpoint import route_save_pretrained  # (checkpoint imports this module)

        route_save_pretrained()

    def _grid(self, dtype):
        """``(z, s, runs)``: zero points and scales ``[G, N]`` in ``dtype``, and whether
        ``g_idx`` is ``k // (K / G)`` (static groups, per channel): unpacked once, not per call."""

        def build():
            z, s = self.zeros().to(dtype), self.scales.to(dtype)
            K, G = self.in_features, s.shape[0]
            runs = G > 0 and K % G == 0 and torch.equal(
                self.g_idx.long(), torch.arange(K, device=self.g_idx.device) // (K // G)
            )
            return z, s, runs

        return self._cached(f"_grid_{str(dtype)[6:]}", build, self.qzeros, self.scales, self.g_idx)

    def _cpu_int4(self, dtype):
        """``(packed, scales_and_zeros, group, perm)`` for torch's CPU int4 kernel in ``dtype``,
        or None where the layer's layout does not fit it; built once per set of buffers."""

        def repack():
            K, N = self.in_features, self.out_features
            if N % 16 or K % 32 or K == 0:  # (no inputs: no grid for the kernel)
                return None
            z, s, runs = self._grid(torch.float32)
            q, perm, group = self.codes(), None, K // s.shape[0]
            if not runs:  # act-order: a permutation of K makes the groups runs of group_size
                g = self.g_idx.long()
                perm = torch.argsort(g, stable=True)
                group = self.group_size
                if group == -1 or not torch.equal(g[perm], torch.arange(K, device=g.device) // group):
                    return None
                q = q[perm]
            kernel_group = next((c for c in CPU_INT4_GROUPS if group % c == 0), None)
            if kernel_group is None or K % group:  # (the kernel takes whole groups only)
                return None
            reps = group // kernel_group  # a coarser grid repeated over the kernel's groups
            z, s = z.repeat_interleave(reps, 0), s.repeat_interleave(reps, 0)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.T.contiguous().to(torch.int32), 1)
            scales_and_zeros = torch.stack([s, (8 - z) * s], dim=-1).to(dtype).contiguous()
            return packed, scales_and_zeros, kernel_group, perm

        def build():
            plan = repack()
            # its [K, N] int32 temporaries (the codes, and their transpose), freed between the
            # plans the layers keep, stayed in glibc's heap: a loaded model's first CPU forward
            # left it ~2x the model resident
            release_freed_memory(freed=2 * 4 * self.in_features * self.out_features)
            return plan

        return self._cached(f"_cpu_int4_{str(dtype)[6:]}", build, self.qweight, self.qzeros,
                            self.scales, self.g_idx)

    def _zeros_u8(self) -> torch.Tensor:
        """Unpacked zero points for the kernel: unpacking on every call would add launches
        comparable to a batch-1 product itself."""
        return self._cached("_zeros_u8_cache", lambda: self.zeros().to(torch.uint8), self.qzeros)

    @property
    def weight(self) -> torch.Tensor:
        """The weight ``[out, in]`` as model code reads it: its shape, dtype and device at once,
        its values dequantized at each read (``PackedWeight``). ``dequantize()`` makes them once."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            # (the compiler cannot trace the making of a tensor subclass: the weight itself, its
            # dequantization dropped from the graph where only its dtype or shape is read)
            return self._read_weight(self._dtype_probe.dtype)
        return PackedWeight(self)

    def _read_weight(self, dtype) -> torch.Tensor:
        """The weight ``[out, in]`` in ``dtype`` for a read of ``weight``."""
        if (torch.compiler.is_compiling() or torch.jit.is_tracing() or self.qweight.is_meta
                or _is_fake(self.qweight)):
            return self._multiplied(self._traced_weight_kn(dtype)).t()
        return self.dequantize(dtype)

    def _scale_weight(self, factor: float) -> "PackedWeight":
        """``weight *= factor`` as ``weight_multiplier *= factor``: the codes and scales are left as
        they are, so a weight divided by 2 ** k and multiplied back (RWKV in eval, then train mode) is
        the one it was, and a tiny one divided is not rounded into float16's subnormals."""
        multiplier = self.weight_multiplier * factor
        # (refused where the scales times it leave their dtype's range: what a checkpoint holds)
        if not all_finite(self.scales * multiplier):
            raise ValueError(f"multiplying the weight of QuantLinear({self.extra_repr()}) by {factor:g} "
                             f"gives scales past {str(self.scales.dtype)[6:]}'s range (or NaN)")
        # (finite scales may still give weights past the layer's dtype, its outputs inf: refused as a
        # load of those scales is, before the write rather than at the next refresh())
        problems = self._state_problems({"scales": self.scales}, assign=True, multiplier=multiplier)
        if problems:
            raise ValueError(f"multiplying the weight of QuantLinear({self.extra_repr()}) by {factor:g}: "
                             + "; ".join(problems))
        self.weight_multiplier = multiplier
        return self.weight

    def __setattr__(self, name, value):
        # (transformers' tie_weights sets the output embeddings' weight to the input embeddings' where
        # the config ties them: on a packed head nn.Module refused it as a bare "KeyError: attribute
        # 'weight' already exists")
        if name == "weight":
            raise AttributeError(
                f"{type(self).__name__}({self.extra_repr()}) is packed: its weight cannot be set or tied to "
                f"another tensor (transformers' tie_weights and resize_token_embeddings tie an lm_head to the "
                f"input embeddings where the config says tie_word_embeddings); a packed head is its own, not "
                f"the embeddings: set model.config.tie_word_embeddings = False, or replace the layer with an "
                f"nn.Linear of its dequantize()")
        if name in PACKED_BUFFERS and isinstance(value, torch.Tensor) and not vars(self).get("_loading"):
            # a buffer replaced (``layer.scales = t``) is checked as load_state_dict(assign=True) checks it,
            # against the others held: NaN scales, or a g_idx of -1, which read the last group in silence
            self._refuse(self._state_problems({name: value}, assign=True))
        super().__setattr__(name, value)

    # ----------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs [..., {self.in_features}], got {tuple(x.shape)}")
        if not x.is_floating_point():  # (the weights built in its dtype would round to 0)
            raise TypeError(f"expected floating-point inputs (as nn.Linear), got {x.dtype}")
        # the kernels have no derivative: inputs that need a gradient (adapters trained on top of
        # the quantized model) or carry a forward-mode tangent (torch.func.jvp, forward_ad dual
        # tensors: the CPU kernel refuses them, the CUDA one would drop the tangent, which jvp
        # then reports as 0) take the dequantized product, which autograd follows
        kernels = (self.bits == 4 and not (x.requires_grad and torch.is_grad_enabled())
                   and forward_ad.unpack_dual(x).tangent is None)
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or x.is_meta or _is_fake(x):
            y = self._traced_product(x, kernels)
        else:
            y = self._product(x, kernels)
        if self.weight_multiplier != 1:  # (on the outputs: the scales in the kernels as they are held)
            y = y * self.weight_multiplier
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def _product(self, x: torch.Tensor, kernels: bool) -> torch.Tensor:
        """``x @ W`` by the fastest path for these inputs (see the module docstring)."""
        plan = None
        if (kernels and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
                and _cpu_int4_mm is not None and x.numel() <= CPU_INT4_MAX_ROWS * self.in_features):
            plan = self._cpu_int4(x.dtype)
        if kernels and x.is_cuda and w4a16_matmul is not None and self._kernel_takes(x):
            y = w4a16_matmul(x, self.qweight, self.scales, self._zeros_u8(), self.group_size, self.g_idx)
        elif plan is not None:
            packed, scales_and_zeros, group, perm = plan
            rows = x.reshape(-1, self.in_features)
            if perm is not None:
                rows = rows[:, perm]
            y = _cpu_int4_mm(rows.contiguous(), packed, group, scales_and_zeros)
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            y = x @ self._dequantized(x.dtype)
        return y

    def _dequantized(self, dtype) -> torch.Tensor:
        """The weight ``[K, N]`` in ``dtype`` for the dequantized product: made for the call and
        dropped, or, while the layer is held (``_hold_dequantized``), made once and kept until
        its buffers change."""
        if not getattr(self, "_held", False):  # (layers pickled before it existed)
            return self._weight_kn(dtype)
        return self._cached(f"_held_{str(dtype)[6:]}", lambda: self._weight_kn(dtype), self.qweight,
                            self.qzeros, self.scales, self.g_idx)

    def _hold_dequantized(self, hold: bool) -> None:
        """Keep the dequantized weight between calls (``hold``), or drop it and stop keeping it.

        For the model walker: a layer quantized early in a block is run again in each later
        pass over the block (every later group's statistics, the block's output), 23 times per
        layer in a Llama walk on 8 calibration batches, each call unpacking and dequantizing the
        whole weight anew. Held for the block's walk, it costs one full-precision copy of the
        block's quantized layers, the size of the linears they replaced."""
        self._held = hold
        if not hold:
            derived = vars(self).get("_derived", {})
            for name in [n for n in derived if n.startswith("_held_")]:
                del derived[name]

    @property
    def ragged(self) -> bool:
        """Whether the last group is shorter (a group size that does not divide the inputs)."""
        return self.group_size != -1 and self.in_features % self.group_size != 0

    def _kernel_takes(self, x: torch.Tensor) -> bool:
        """Whether the W4A16 kernel takes ``x`` with this layout: K a positive multiple of 8 and
        of the group size, 16- or 32-bit floats. A shorter last group, float64 and a layer
        without inputs take the dequantized product, as on the CPU."""
        return (x.dtype in _KERNEL_DTYPES and self.in_features > 0 and self.in_features % 8 == 0
                and not self.ragged)

    def _traced_product(self, x: torch.Tensor, kernels: bool) -> torch.Tensor:
        """The product ``torch.compile`` traces: no host-side caches (data pointers, versions)
        and no branch on the buffers' values, so no graph break. On CUDA the W4A16 kernel as a
        custom op; elsewhere the weight dequantized by a gather on ``g_idx`` (the compiler fuses
        it with the product)."""
        if kernels and x.is_cuda and w4a16_matmul_op is not None and self._kernel_takes(x):
            zeros = self.zeros().to(torch.uint8)
            y = w4a16_matmul_op(x, self.qweight, self.scales, zeros, self.group_size, self.g_idx)
        else:
            y = x @ self._traced_weight_kn(x.dtype)
        return y

    def _traced_weight_kn(self, dtype) -> torch.Tensor:
        """The weight ``[K, N]`` by a gather on ``g_idx``: no caches, no branch on the buffers' values."""
        g = self.g_idx.long()
        z, s = self.zeros().to(dtype), self.scales.to(dtype)
        return self.codes().to(dtype).sub(z[g]).mul(s[g])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )
