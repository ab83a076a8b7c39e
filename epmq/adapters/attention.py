"""``nn.MultiheadAttention`` rebuilt on ``nn.Linear`` projections, so they can be quantized.

``nn.MultiheadAttention`` keeps the q, k and v projections in one parameter ``in_proj_weight``
``[3E, E]`` and calls ``F.linear`` on it, so there is no ``nn.Linear`` to hook or replace.
``LinearMultiheadAttention`` holds the same tensors as ``in_proj`` (an ``nn.Linear(E, 3E)``,
sharing the parameters) and the original ``out_proj``, and keeps the call signature and the
math: ``softmax(q k^T / sqrt(d) + mask) v`` per head, then ``out_proj``. One ``in_proj`` of
``3E`` rows quantizes exactly like three ``E``-row projections: GPTQ treats rows independently
and the three share their input, hence their Hessian.

Self-attention only (query, key and value the same tensor), as in every open_clip
``ResidualAttentionBlock`` except CoCa's cross-attention decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearMultiheadAttention(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not mha._qkv_same_embed_dim:
            raise NotImplementedError("MultiheadAttention with kdim/vdim != embed_dim is not supported")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise NotImplementedError("MultiheadAttention with add_bias_kv/add_zero_attn is not supported")
        E = mha.embed_dim
        self.embed_dim, self.num_heads = E, mha.num_heads
        self.head_dim = E // mha.num_heads
        self.dropout, self.batch_first = mha.dropout, mha.batch_first
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
        x = query.transpose(0, 1) if self.batch_first is False and query.dim() == 3 else query
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0)
        N, L, E = x.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = self.in_proj(x).view(N, L, 3, H, D).permute(2, 0, 3, 1, 4)  # 3 x [N, H, L, D]
        mask = _float_mask(attn_mask, key_padding_mask, N, H, L, q.dtype)
        causal = is_causal and mask is None
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / D**0.5
            if mask is not None:
                scores = scores + mask
            elif causal:
                scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            p = torch.softmax(scores, dim=-1)
            weights = p.mean(1) if average_attn_weights else p
            out = F.dropout(p, dropout, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, E))
        if unbatched:
            out, weights = out.squeeze(0), None if weights is None else weights.squeeze(0)
        elif self.batch_first is False:
            out = out.transpose(0, 1)
        return out, weights


def _float_mask(attn_mask, key_padding_mask, N, H, L, dtype):
    """Additive ``[N|1, H|1, L, L]`` mask from MHA's masks (boolean ``True`` = may not attend)."""

    def additive(m):
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
        return m.to(dtype)

    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        mask = mask.view(N, H, L, L) if mask.dim() == 3 else mask.view(1, 1, L, L)
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).view(N, 1, 1, L)
        mask = pad if mask is None else mask + pad
    return mask
