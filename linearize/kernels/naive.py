"""Slow, obviously-correct references. Used only by tests to check the fast kernels.

Both functions are written with differentiable torch ops so that autograd through them
gives the reference gradients the explicit backward passes are checked against.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .precision import acc_dtype


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    """[B, Hkv, ...] -> [B, Hkv*groups, ...]: query head h reads kv head h // groups."""
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


def naive_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float,
              initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Token-by-token gated linear attention.

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,  o_t = scale * q_t S_t  (per kv head; query heads
    grouped GQA-style). Accumulates in fp32 (fp64 for fp64 inputs). Returns (o in q.dtype, final
    state [B, Hkv, K, V] in the accumulation dtype).
    """
    acc = acc_dtype(q)
    batch, hq, seq, _ = q.shape
    hkv, dk, dv = k.shape[1], k.shape[-1], v.shape[-1]
    groups = hq // hkv
    qf, kf, vf, gf = (x.to(acc) for x in (q, k, v, g))
    if initial_state is None:
        state = qf.new_zeros(batch, hkv, dk, dv)
    else:
        state = initial_state.to(acc)
    outputs = []
    for t in range(seq):
        state = gf[:, :, t, :, None].exp() * state + kf[:, :, t, :, None] * vf[:, :, t, None, :]
        state_per_q_head = _repeat_kv(state, groups)
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", qf[:, :, t], state_per_q_head))
    o = torch.stack(outputs, dim=2) if outputs else qf.new_zeros(batch, hq, 0, dv)
    return o.to(q.dtype), state


def naive_softmax_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                            scale: float | None = None, is_causal: bool = False,
                            window: int | None = None, softcap: float = 0.0,
                            sinks: Tensor | None = None, sink_tokens: int = 0) -> Tensor:
    """Quadratic masked softmax attention with SDPA semantics (enable_gqa=True).

    `window` adds a causal sliding window: query i sees keys j with i - window < j <= i, and with
    `sink_tokens` also the first keys j < sink_tokens (StreamingLLM's attention sinks).
    `softcap` caps scores as cap * tanh(scores / cap) before masking; `sinks` (broadcastable to
    [B, Hq, L, 1]) are extra softmax columns whose value vectors are zero.
    Fully masked rows return 0, like SDPA's math path.
    """
    acc = acc_dtype(q)
    q_len, kv_len = q.shape[-2], k.shape[-2]
    groups = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    qf = q.to(acc)
    kf, vf = _repeat_kv(k.to(acc), groups), _repeat_kv(v.to(acc), groups)
    scores = scale * qf @ kf.transpose(-1, -2)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device)
    rows = torch.arange(q_len, device=q.device)[:, None]
    cols = torch.arange(kv_len, device=q.device)[None, :]
    if is_causal or window is not None:
        allowed = allowed & (cols <= rows)
    if window is not None:
        allowed = allowed & ((cols > rows - window) | (cols < sink_tokens))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            scores = scores + attn_mask.to(acc)
    scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        sink_col = sinks.to(acc).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink_col], dim=-1), dim=-1)[..., :-1]
        return (probs @ vf).to(q.dtype)
    row_dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(row_dead, 0.0), dim=-1).masked_fill(row_dead, 0.0)
    return (probs @ vf).to(q.dtype)


def naive_hybrid_attention(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, scale: float,
                           window: int, sinks: int = 0) -> Tensor:
    """Quadratic window + linear attention with one shared normaliser (LoLCATs).

    Query i attends keys i - window < j <= i with exp(scale q.k - m_i) (m_i: the max of those scores) and keys
    j <= i - window with fq_i . fk_j; o_i = (sum of weights * v) / (sum of weights). With `sinks`, the first
    `sinks` keys keep exact exp scores for every query (they join the softmax part and m_i, and leave the linear
    part). Returns v's dtype.
    """
    acc = acc_dtype(q)
    seq = q.shape[-2]
    groups = q.shape[1] // k.shape[1]
    qf, fqf = q.to(acc), fq.to(acc)
    kf, vf, fkf = (_repeat_kv(x.to(acc), groups) for x in (k, v, fk))
    rows = torch.arange(seq, device=q.device)[:, None]
    cols = torch.arange(seq, device=q.device)[None, :]
    exact = ((cols <= rows) & (cols > rows - window)) | ((cols < sinks) & (cols <= rows))
    older = (cols <= rows - window) & ~exact
    scores = (scale * qf @ kf.transpose(-1, -2)).masked_fill(~exact, float("-inf"))
    soft = (scores - scores.amax(dim=-1, keepdim=True)).exp()
    lin = (fqf @ fkf.transpose(-1, -2)).masked_fill(~older, 0.0)
    weights = soft + lin
    return ((weights @ vf) / weights.sum(-1, keepdim=True)).to(v.dtype)
