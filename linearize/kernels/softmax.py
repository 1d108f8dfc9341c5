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

from .precision import acc_dtype


def _grouped_mask(mask: Tensor, hq: int, hkv: int) -> Tensor:
    """Mask broadcastable to [B, Hq, L, S] -> broadcastable to [B, Hkv, G, L, S] without copying."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[1] == 1:
        return mask.unsqueeze(2)
    return mask.unflatten(1, (hkv, hq // hkv))


def _masked_scores(q: Tensor, k: Tensor, attn_mask: Tensor | None, scale: float | None,
                   is_causal: bool, softcap: float = 0.0, row0: int = 0) -> tuple[Tensor, Tensor, float, Tensor | None]:
    """Scores [B, Hkv, G, L, S] with -inf where a key is hidden; also q grouped, the scale, and (with soft-capping)
    tanh of the capped scores, which the backward needs. `row0`: q holds the query rows from row0 on (the mask
    is given for all rows)."""
    acc = acc_dtype(q)
    batch, hq, q_len, head_dim = q.shape
    hkv, kv_len = k.shape[1], k.shape[-2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    grouped_q = q.to(acc).unflatten(1, (hkv, hq // hkv))
    scores = scale * (grouped_q @ k.to(acc).unsqueeze(2).transpose(-1, -2))
    tanh = None
    if softcap:  # gemma2: scores = cap * tanh(scores / cap), before the mask
        tanh = torch.tanh(scores / softcap)
        scores = softcap * tanh
    if attn_mask is not None:
        mask = _grouped_mask(_rows(attn_mask, row0, q_len), hq, hkv)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(acc)
    if is_causal:
        hidden = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).triu(1 + row0)
        scores = scores.masked_fill(hidden, float("-inf"))
    return scores, grouped_q, scale, tanh


def _rows(t: Tensor, row0: int, n: int) -> Tensor:
    """Rows row0..row0+n of a tensor broadcastable to [..., L, X] (unchanged where L broadcasts)."""
    return t if t.dim() < 2 or t.shape[-2] == 1 else t[..., row0:row0 + n, :]


def _grouped_sinks(sinks: Tensor | None, q: Tensor, hkv: int, acc: torch.dtype) -> Tensor | None:
    """Sink logits broadcast to [B, Hkv, G, L, 1]."""
    if sinks is None:
        return None
    b, hq, length = q.shape[:3]
    return sinks.to(acc).expand(b, hq, length, 1).unflatten(1, (hkv, hq // hkv))


def _row_stats(scores: Tensor, sinks: Tensor | None) -> tuple[Tensor, Tensor]:
    """Row max (0 for rows with nothing visible) and log-sum-exp, sinks joining the denominator."""
    row_max = scores.amax(dim=-1, keepdim=True)
    if sinks is not None:
        row_max = torch.maximum(row_max, sinks)
    row_max = row_max.masked_fill(torch.isneginf(row_max), 0.0)
    total = (scores - row_max).exp().sum(dim=-1, keepdim=True)
    if sinks is not None:
        total = total + (sinks - row_max).exp()
    return row_max, total


# Query rows per block of the forward: the score matrix of one block stays under this many elements (at 16k
# tokens the whole matrix of one SmolLM2 layer is ~10 GB in fp32, and masking and exp copy it).
SCORE_BLOCK_ELEMENTS = 1 << 26


def attention_fwd(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                  scale: float | None = None, is_causal: bool = False, softcap: float = 0.0,
                  sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Returns (o [B, Hq, L, Dv] in q.dtype, lse [B, Hq, L] in fp32/fp64).

    `sinks` ([Hq] logits broadcastable to [B, Hq, L, 1]) join each row's softmax denominator with a zero value
    vector (gpt-oss attention sinks). Long inputs are computed in blocks of query rows (rows are independent:
    the same numbers, bounded memory).
    """
    batch, hq, q_len = q.shape[:3]
    rows = max(1, SCORE_BLOCK_ELEMENTS // max(1, batch * hq * k.shape[-2]))
    if q_len <= rows:
        return _attention_rows(q, k, v, attn_mask, scale, is_causal, softcap, sinks, 0)
    parts = [_attention_rows(q[:, :, r:r + rows], k, v, attn_mask, scale, is_causal, softcap, sinks, r)
             for r in range(0, q_len, rows)]
    return torch.cat([o for o, _ in parts], 2), torch.cat([lse for _, lse in parts], 2)


def _attention_rows(q, k, v, attn_mask, scale, is_causal, softcap, sinks, row0):
    """attention_fwd for the query rows row0.. held in q."""
    scores, _, _, _ = _masked_scores(q, k, attn_mask, scale, is_causal, softcap, row0)
    if sinks is not None and sinks.dim() == 4:  # per-row sinks [B, Hq, L, 1]
        sinks = _rows(sinks, row0, q.shape[2])
    sink = _grouped_sinks(sinks, q, k.shape[1], scores.dtype)
    # Normalise after the value product, as SDPA's CPU kernel does: same math, and the rounding order that
    # makes `exact` reproduce a model's logits most closely.
    row_max, total = _row_stats(scores, sink)
    weights = (scores - row_max).exp()
    o = (weights @ v.to(weights.dtype).unsqueeze(2)) / total.masked_fill(total == 0, 1.0)
    lse = row_max + total.log()
    return o.flatten(1, 2).to(q.dtype), lse.squeeze(-1).flatten(1, 2)


def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                  scale: float | None = None, is_causal: bool = False, softcap: float = 0.0,
                  sinks: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Returns (dq, dk, dv, dsinks) in the dtypes of q, k, v, sinks (dsinks None without sinks; shaped
    [B, Hq, L, 1]: autograd reduces it to the sinks' own shape). The mask gets no gradient."""
    scores, grouped_q, scale, tanh = _masked_scores(q, k, attn_mask, scale, is_causal, softcap)
    sink = _grouped_sinks(sinks, q, k.shape[1], scores.dtype)
    row_max, total = _row_stats(scores, sink)
    lse = row_max + total.log()
    safe_lse = lse.masked_fill(torch.isneginf(lse), 0.0)
    p = (scores - safe_lse).exp()
    acc = p.dtype
    grouped_do = do.to(acc).unflatten(1, grouped_q.shape[1:3])
    keys, values = k.to(acc).unsqueeze(2), v.to(acc).unsqueeze(2)
    dp = grouped_do @ values.transpose(-1, -2)
    delta = (p * dp).sum(-1, keepdim=True)  # = rowsum(do * o); a sink's value vector is zero
    ds = p * (dp - delta)
    if tanh is not None:
        ds = ds * (1 - tanh * tanh)
    dq = scale * (ds @ keys)
    dk = scale * (ds.transpose(-1, -2) @ grouped_q).sum(2)
    dv = (p.transpose(-1, -2) @ grouped_do).sum(2)
    dsinks = None
    if sink is not None:
        dsinks = (-(sink - safe_lse).exp() * delta).flatten(1, 2).to(sinks.dtype)
    return dq.flatten(1, 2).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks
