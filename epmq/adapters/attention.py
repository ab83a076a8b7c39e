"""``nn.MultiheadAttention`` rebuilt on ``nn.Linear`` projections, so they can be quantized.

``nn.MultiheadAttention`` keeps the q, k and v projections in one parameter ``in_proj_weight``
``[3E, E]`` and calls ``F.linear`` on it, so there is no ``nn.Linear`` to hook or replace.
``LinearMultiheadAttention`` holds the same tensors as ``in_proj`` (an ``nn.Linear(E, 3E)``,
sharing the parameters) and the original ``out_proj``, and keeps the call signature and the
math: ``softmax(q k^T / sqrt(d) + mask) v`` per head, then ``out_proj``. One ``in_proj`` of
``3E`` rows quantizes exactly like three ``E``-row projections: GPTQ treats rows independently
and the three share their input, hence their Hessian.

``LinearMultiheadAttention`` is self-attention (query, key and value the same tensor), as in
every open_clip ``ResidualAttentionBlock`` but the cross-attention blocks of CoCa's decoder,
whose ``LinearCrossAttention`` holds the three row blocks of ``in_proj_weight`` as ``q_proj``,
``k_proj`` and ``v_proj``: the query reads the text, the key and value the image tokens, so
each projection has its own input (and Hessian).

WavLM's attention keeps ``nn.Linear`` projections but hands their weights to torch's
``F.multi_head_attention_forward`` (``torch_multi_head_self_attention``) rather than calling
them, so the walk never saw them called: ``call_projections`` has it call them, the same math.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


class _LinearAttention(nn.Module):
    """What both keep of ``nn.MultiheadAttention``: its sizes, dropout and layout (``out_proj``
    is registered by each after its projections, in the order they are called)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim:
            raise NotImplementedError("MultiheadAttention with kdim/vdim != embed_dim is not supported")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise NotImplementedError("MultiheadAttention with add_bias_kv/add_zero_attn is not supported")
        self.embed_dim, self.num_heads = mha.embed_dim, mha.num_heads
        self.head_dim = mha.embed_dim // mha.num_heads
        self.dropout, self.batch_first = mha.dropout, mha.batch_first


class LinearMultiheadAttention(_LinearAttention):
    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__(mha)
        E = mha.embed_dim
        w = mha.in_proj_weight
        self.in_proj = nn.Linear(E, 3 * E, bias=mha.in_proj_bias is not None, device="meta")
        self.in_proj.weight = w
        if mha.in_proj_bias is not None:
            self.in_proj.bias = mha.in_proj_bias
        self.out_proj = mha.out_proj

    def forward(
        self,
        query,
        key=None,
        value=None,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise NotImplementedError("LinearMultiheadAttention supports self-attention only")
        x, unbatched = _batch_first(query, self.batch_first)
        N, L, _ = x.shape
        q, k, v = self.in_proj(x).view(N, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return _attend(self, q, k, v, attn_mask, key_padding_mask, need_weights, average_attn_weights, is_causal,
                       unbatched)


class LinearCrossAttention(_LinearAttention):
    """``nn.MultiheadAttention`` as cross-attention on ``nn.Linear`` projections: ``q_proj``,
    ``k_proj``, ``v_proj`` hold the row blocks of ``in_proj_weight`` (views: the same tensors)."""

    # torch's TransformerEncoderLayer reads it to choose its fused fast path, which takes
    # nn.MultiheadAttention's fused parameters; None sends it to the path that calls this module
    in_proj_bias = None

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__(mha)
        E = mha.embed_dim
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            linear = nn.Linear(E, E, bias=mha.in_proj_bias is not None, device="meta")
            linear.weight = nn.Parameter(mha.in_proj_weight[j * E:(j + 1) * E],
                                         requires_grad=mha.in_proj_weight.requires_grad)
            if mha.in_proj_bias is not None:
                linear.bias = nn.Parameter(mha.in_proj_bias[j * E:(j + 1) * E],
                                           requires_grad=mha.in_proj_bias.requires_grad)
            self.add_module(name, linear)
        self.out_proj = mha.out_proj

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        x, unbatched = _batch_first(query, self.batch_first)
        key, _ = _batch_first(key, self.batch_first)
        value, _ = _batch_first(value, self.batch_first)
        N, L, S, H, D = x.shape[0], x.shape[1], key.shape[1], self.num_heads, self.head_dim
        q = self.q_proj(x).view(N, L, H, D).transpose(1, 2)
        k = self.k_proj(key).view(N, S, H, D).transpose(1, 2)
        v = self.v_proj(value).view(N, S, H, D).transpose(1, 2)
        return _attend(self, q, k, v, attn_mask, key_padding_mask, need_weights, average_attn_weights, is_causal,
                       unbatched)


class LinearInProjAttention(nn.Module):
    """open_clip's own ``Attention`` (the attention of its ``CustomResidualAttentionBlock``: qk_norm,
    scaled cosine attention, per-head scales, an inner norm) on an ``nn.Linear`` ``in_proj``
    holding its ``in_proj_weight`` and ``in_proj_bias``, which it applies by ``F.linear``; its other
    modules and parameters are taken as they are, and its math kept, op for op (bit for bit)."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        w, b = attention.in_proj_weight, attention.in_proj_bias
        self.in_proj = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        self.in_proj.weight = w
        if b is not None:
            self.in_proj.bias = b
        for name, value in vars(attention).items():  # (its sizes and switches)
            if not name.startswith("_") and name not in ("training", "in_proj_bias"):
                setattr(self, name, value)
        for name, p in attention._parameters.items():  # (logit_scale, head_scale: None where off)
            if name not in ("in_proj_weight", "in_proj_bias"):
                self.register_parameter(name, p)
        for name, module in attention._modules.items():
            self.add_module(name, module)
        self.train(attention.training)

    def forward(self, x, attn_mask=None):
        N, L, C = x.shape
        q, k, v = (t.reshape(N, L, self.num_heads, -1).transpose(1, 2) for t in self.in_proj(x).chunk(3, dim=-1))
        if attn_mask is not None:
            attn_mask = attn_mask.reshape(N, self.num_heads, L, L) if attn_mask.ndim == 3 else attn_mask
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill_(attn_mask, float("-inf"))
            else:
                attn_mask = attn_mask.to(dtype=q.dtype)
        if self.logit_scale is not None:  # (scaled cosine attention)
            attn = torch.bmm(F.normalize(q, dim=-1), F.normalize(k, dim=-1).transpose(-1, -2))
            attn = attn * torch.clamp(self.logit_scale, max=self.logit_scale_max).exp()
            if attn_mask is not None:
                attn = attn + attn_mask
            x = torch.bmm(self.attn_drop(attn.softmax(dim=-1)), v)
        else:
            q, k = self.ln_q(q), self.ln_k(k)
            if self.use_fsdpa:
                x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                   dropout_p=self.attn_drop.p if self.training else 0.0)
            else:
                attn = torch.bmm(q * self.scale, k.transpose(-1, -2))
                if attn_mask is not None:
                    attn += attn_mask
                x = torch.bmm(self.attn_drop(attn.softmax(dim=-1)), v)
        if self.head_scale is not None:
            x = x * self.head_scale
        x = self.ln_inner(x.transpose(1, 2).reshape(N, L, C))
        return self.out_drop(self.out_proj(x))


def applies_in_proj_weight(module: nn.Module) -> bool:
    """Whether ``module`` is open_clip's own ``Attention``, whose q, k and v projection is a
    parameter ``in_proj_weight`` applied by ``F.linear`` (no ``nn.MultiheadAttention``)."""
    kind = type(module)
    return (kind.__name__ == "Attention" and kind.__module__.startswith("open_clip")
            and isinstance(getattr(module, "in_proj_weight", None), nn.Parameter))


def _batch_first(x, batch_first):
    """``x`` as ``[N, L, E]``, and whether it came unbatched (``[L, E]``)."""
    x = x.transpose(0, 1) if batch_first is False and x.dim() == 3 else x
    return (x.unsqueeze(0), True) if x.dim() == 2 else (x, False)


def _attend(attention, q, k, v, attn_mask, key_padding_mask, need_weights, average_attn_weights, is_causal,
            unbatched):
    """``softmax(q k^T / sqrt(d) + mask) v`` per head (``[N, H, L|S, D]``), then ``out_proj``, in
    ``nn.MultiheadAttention``'s output convention."""
    N, H, L, D = q.shape
    S = k.shape[2]
    mask = _float_mask(attn_mask, key_padding_mask, N, H, L, S, q.dtype)
    causal = is_causal and mask is None
    dropout = attention.dropout if attention.training else 0.0
    weights = None
    if need_weights:
        scores = (q @ k.transpose(-2, -1)) / D**0.5
        if mask is not None:
            scores = scores + mask
        elif causal:
            scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        p = torch.softmax(scores, dim=-1)
        weights = p.mean(1) if average_attn_weights else p
        out = F.dropout(p, dropout, attention.training) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
    out = attention.out_proj(out.transpose(1, 2).reshape(N, L, H * D))
    if unbatched:
        out, weights = out.squeeze(0), None if weights is None else weights.squeeze(0)
    elif attention.batch_first is False:
        out = out.transpose(0, 1)
    return out, weights


def _float_mask(attn_mask, key_padding_mask, N, H, L, S, dtype):
    """Additive ``[N|1, H|1, L, S]`` mask from MHA's masks (boolean ``True`` = may not attend)."""

    def additive(m):
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.view(N, H, L, S) if mask.dim() == 3 else mask.view(1, 1, L, S)
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).view(N, 1, 1, S)
        mask = pad if mask is None else mask + pad
    return mask


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def hands_weights_to_torch(module: nn.Module) -> bool:
    """Whether ``module`` is an attention that hands its projections' weights to
    ``F.multi_head_attention_forward`` instead of calling them (WavLM's ``WavLMAttention``), not
    yet made to call them."""
    method = getattr(module, "torch_multi_head_self_attention", None)
    return (callable(method) and not isinstance(method, functools.partial)
            and all(isinstance(getattr(module, p, None), nn.Linear) for p in PROJECTIONS)
            and isinstance(getattr(module, "num_heads", None), int))


def call_projections(attention: nn.Module) -> None:
    """Make WavLM's ``attention`` call its q, k, v and out projections (so that they are seen,
    quantized, and read packed) where it handed their weights to ``F.multi_head_attention_forward``:
    the same math (q k^T / sqrt(d) plus the gated position bias and the key padding, softmax,
    dropout in training, the heads' mean as the attention weights), to float rounding. A partial
    of a function here, not a bound method: it deep-copies and pickles with the module."""
    attention.torch_multi_head_self_attention = functools.partial(_self_attention_on_projections, attention)


def _self_attention_on_projections(attention, hidden_states, attention_mask, gated_position_bias):
    N, L, _ = hidden_states.shape
    H = attention.num_heads
    D = attention.embed_dim // H
    q, k, v = (getattr(attention, p)(hidden_states).view(N, L, H, D).transpose(1, 2) for p in PROJECTIONS[:3])
    padding = attention_mask.ne(1) if attention_mask is not None else None
    # (_attend reads these of an nn.MultiheadAttention; [N, L, E] in and out)
    shape = SimpleNamespace(dropout=attention.dropout, training=attention.training, out_proj=attention.out_proj,
                            batch_first=True)
    out, weights = _attend(shape, q, k, v, gated_position_bias, padding, True, True, False, False)
    # (as WavLM's: torch's weights averaged over the heads, broadcast back to each head)
    return out, weights[:, None].broadcast_to(weights.shape[:1] + (H,) + weights.shape[1:])
