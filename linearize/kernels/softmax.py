"""Exact (quadratic) softmax attention with F.scaled_dot_product_attention semantics.

This is the oracle the rewrite starts from: same masking rules as SDPA with enable_gqa=True
(bool mask True = attend, float mask is added, is_causal = top-left aligned tril(ones(L, S)),
a mask together with is_causal means both apply), computed in fp32 (fp64 for fp64 inputs).
Rows with no visible key produce 0 output and 0 gradient, as SDPA's math path does; their
log-sum-exp is -inf.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _grouped_mask(mask: Tensor, hq: int, hkv: int) -> Tensor:
    """Mask broadcastable to [B, Hq, L, S] -> broadcastable to [B, Hkv, G, L, S] without copying."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[1] == 1:
        return mask.unsqueeze(2)
    return mask.unflatten(1, (hkv, hq // hkv))


def _masked_scores(q: Tensor, k: Tensor, attn_mask: Tensor | None, scale: float | None,
                   is_causal: bool) -> tuple[Tensor, Tensor, float]:
    """Scores [B, Hkv, G, L, S] with -inf where a key is hidden; also q grouped and the scale."""
    acc = _acc_dtype(q)
    batch, hq, q_len, head_dim = q.shape
    hkv, kv_len = k.shape[1], k.shape[-2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    grouped_q = q.to(acc).unflatten(1, (hkv, hq // hkv))
    scores = scale * (grouped_q @ k.to(acc).unsqueeze(2).transpose(-1, -2))
    if attn_mask is not None:
        mask = _grouped_mask(attn_mask, hq, hkv)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(acc)
    if is_causal:
        hidden = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores, grouped_q, scale


def _probabilities(scores: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax rows and their log-sum-exp; rows with every key hidden give zeros, lse -inf."""
    lse = scores.logsumexp(dim=-1, keepdim=True)
    safe_lse = lse.masked_fill(torch.isneginf(lse), 0.0)
    return (scores - safe_lse).exp(), lse


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                  scale: float | None = None, is_causal: bool = False) -> tuple[Tensor, Tensor]:
    """Returns (o [B, Hq, L, Dv] in q.dtype, lse [B, Hq, L] in fp32/fp64)."""
    scores, _, _ = _masked_scores(q, k, attn_mask, scale, is_causal)
    # Normalise after the value product, as SDPA's CPU kernel does: same math, and the rounding order that
    # makes `exact` reproduce a model's logits most closely.
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = row_max.masked_fill(torch.isneginf(row_max), 0.0)
    weights = (scores - row_max).exp()
    total = weights.sum(dim=-1, keepdim=True)
    o = (weights @ v.to(weights.dtype).unsqueeze(2)) / total.masked_fill(total == 0, 1.0)
    lse = row_max + total.log()
    return o.flatten(1, 2).to(q.dtype), lse.squeeze(-1).flatten(1, 2)


def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                  scale: float | None = None, is_causal: bool = False
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv) in the dtypes of q, k, v. The mask gets no gradient."""
    scores, grouped_q, scale = _masked_scores(q, k, attn_mask, scale, is_causal)
    p, _ = _probabilities(scores)
    acc = p.dtype
    grouped_do = do.to(acc).unflatten(1, grouped_q.shape[1:3])
    keys, values = k.to(acc).unsqueeze(2), v.to(acc).unsqueeze(2)
    dp = grouped_do @ values.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq = scale * (ds @ keys)
    dk = scale * (ds.transpose(-1, -2) @ grouped_q).sum(2)
    dv = (p.transpose(-1, -2) @ grouped_do).sum(2)
    return dq.flatten(1, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
