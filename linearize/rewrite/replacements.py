"""What a rewritten site computes, as plain functions of tensors.

Each rewrite inserts one call to one of these functions into the FX graph (so a rewritten graph reads like the
method: `liger_attention(q, k, v, q_pre_rope, k_pre_rope, window=64, ...)`); AOTAutograd traces through them into
linearize's custom ops (`linearize/lowering/ops.py`) and ordinary aten ops, which Inductor fuses.
"""
from __future__ import annotations

import torch

import linearize.lowering  # noqa: F401  (registers torch.ops.linearize.*)
from linearize.kernels.gla import gla_step
from linearize.lowering import triton_ops as _triton

_DENOMINATOR_EPS = 1e-6


# gate kinds and feature maps are named entries in gates.py (name -> function)
from .gates import FEATURE_MAPS, GATES  # noqa: E402


def softmax_attention(q, k, v, attn_mask, *, scale: float, is_causal: bool, softcap: float = 0.0, sinks=None):
    """The exact rewrite: the same softmax attention, through linearize's op (k, v at KV-head count)."""
    return torch.ops.linearize.attention(q, k, v, attn_mask, scale, is_causal, softcap, sinks)


def window_attention(q, k, v, *, window: int, scale: float, sinks: int = 0, kernels: str = "auto"):
    """Causal sliding-window softmax attention over the last `window` tokens (inclusive) and the first `sinks`
    tokens (attention sinks; the generated Triton kernels take up to 16)."""
    if _triton.use_triton(kernels, q.device):
        out = _triton.swa(q, k, v, window=window, scale=scale, sinks=sinks)
        if out is not None:
            return out
    return torch.ops.linearize.window_attention(q, k, v, scale, window, sinks)


def gla_attention(q_pre, k_pre, v, *, gate: str, gate_normalizer: float, feature_map: str, chunk_size: int,
                  normalize: bool, scale: float = 1.0, gate_lower_bound: float = 0.0, decay: float = 0.99,
                  kernels: str = "auto"):
    """Gated linear attention on pre-RoPE q, k; the state is kept per KV head (GQA-native).

    The gate kind (`gates.GATES`) maps the pre-RoPE keys to a per-channel log decay; scalar and fixed kinds come
    expanded over the channels. Everything runs in fp32 (the gate's cumulative sums need it) and returns v's dtype.
    """
    if _triton.use_triton(kernels, v.device):
        out = _triton.gla(q_pre, k_pre, v, **{k: val for k, val in locals().items()
                                             if k not in ("q_pre", "k_pre", "v", "kernels")})
        if out is not None:
            return _normalized(out, normalize).to(v.dtype)
    return gla_with_state(q_pre, k_pre, v, gate=gate, gate_normalizer=gate_normalizer, feature_map=feature_map,
                          chunk_size=chunk_size, normalize=normalize, scale=scale,
                          gate_lower_bound=gate_lower_bound, decay=decay)[0]


def gla_with_state(q_pre, k_pre, v, *, gate: str, gate_normalizer: float, feature_map: str, chunk_size: int,
                   normalize: bool, scale: float = 1.0, gate_lower_bound: float = 0.0, decay: float = 0.99,
                   valid=None, initial_state=None, kernels: str = "auto"):
    """`gla_attention` on the PyTorch path, continuing from `initial_state` [B, Hkv, F, Dv(+1)] (fp32) and
    returning (o, final state). Keys where `valid` [B, T] is False (padding) are skipped: their features and log
    gates are zeroed, so the state passes them by unchanged. A one-token step runs the generated decode kernel
    where `kernels` selects Triton."""
    phi = FEATURE_MAPS[feature_map]
    qf, kf = phi(q_pre.float()), phi(k_pre.float())
    g = GATES[gate](k_pre.float(), normalizer=gate_normalizer, lower_bound=gate_lower_bound, decay=decay)
    if g.shape[-1] != kf.shape[-1]:  # feature maps that widen the head (hedgehog): the gate repeats per copy
        g = g.repeat(1, 1, 1, kf.shape[-1] // g.shape[-1])
    vf = v.float()
    if valid is not None:
        hide = ~valid[:, None, :, None]
        kf, g, vf = kf.masked_fill(hide, 0), g.masked_fill(hide, 0), vf.masked_fill(hide, 0)
    if normalize:  # one more value column of ones carries the denominator sum of gated feature weights
        vf = torch.cat([vf, torch.ones_like(vf[..., :1])], dim=-1)
    if initial_state is not None and qf.shape[-2] == 1:  # a decoding step: the recurrence itself
        step = _triton.gla_step(qf, kf, vf, g, initial_state, scale) if _triton.use_triton(kernels, v.device) \
            else None
        o, state = step if step is not None else gla_step(qf, kf, vf, g, initial_state, scale)
    else:
        o, state = torch.ops.linearize.gla(qf, kf, vf, g, initial_state, scale, chunk_size)
    return _normalized(o, normalize).to(v.dtype), state


def _normalized(o, normalize: bool):
    """A normalised branch's output carries its denominator as the last value column: divide it out."""
    return o[..., :-1] / o[..., -1:].clamp_min(_DENOMINATOR_EPS) if normalize else o


def liger_attention(q, k, v, q_pre, k_pre, *, window: int, mix, window_scale: float, sinks: int = 0,
                    kernels: str = "auto", **gla_params):
    """Liger attention: mix[0] * window softmax (RoPE'd q, k; with `sinks` first tokens) + mix[1] * gated linear
    (pre-RoPE q, k).

    `mix` is two constants, or a learned [2, query heads] tensor (rewrite/learned.py). With generated kernels and
    constant weights both branches run in one fused Triton kernel (mixed before the store)."""
    if _triton.use_triton(kernels, v.device) and not isinstance(mix, torch.Tensor):
        out = _triton.liger(q, k, v, q_pre, k_pre, window=window, mix=mix, window_scale=window_scale, sinks=sinks,
                            **gla_params)
        if out is not None:
            return out
    swa = window_attention(q, k, v, window=window, scale=window_scale, sinks=sinks, kernels=kernels)
    gla = gla_attention(q_pre, k_pre, v, kernels=kernels, **gla_params)
    return mixed(mix, swa, gla)


def mixed(mix, window_out, linear_out):
    """mix[0] * window + mix[1] * linear; a learned mix [2, H] weighs each head of the [B, H, T, D] outputs."""
    if isinstance(mix, torch.Tensor):
        w = mix.to(window_out.dtype)[:, None, :, None, None]
        return w[0] * window_out + w[1] * linear_out
    return mix[0] * window_out + mix[1] * linear_out


def lolcats_features(q_pre, k_pre, feature_map: str, projection=None):
    """phi(q), phi(k) in fp32; with a learned `projection` [Hq + Hkv, D, D] (rewrite/learned.py), phi(x W) with
    one W per query head, then per key head (LoLCATs' Hedgehog map)."""
    q, k = q_pre.float(), k_pre.float()
    if projection is not None:
        w = projection.float()
        q = torch.einsum("bhtd,hde->bhte", q, w[:q.shape[1]])
        k = torch.einsum("bhtd,hde->bhte", k, w[q.shape[1]:])
    phi = FEATURE_MAPS[feature_map]
    return phi(q), phi(k)


def lolcats_attention(q, k, v, q_pre, k_pre, *, window: int, window_scale: float, feature_map: str, sinks: int = 0,
                      projection=None):
    """LoLCATs: softmax over the last `window` keys (RoPE'd q, k) and the first `sinks` keys, feature-map linear
    attention over every other older key (pre-RoPE q, k, through the learned `projection` where the rules learn
    it), one shared normaliser (`torch.ops.linearize.hybrid_attention`)."""
    fq, fk = lolcats_features(q_pre, k_pre, feature_map, projection)
    o = torch.ops.linearize.hybrid_attention(q.float(), k.float(), v.float(), fq, fk, window_scale, window, sinks)
    return o.to(v.dtype)
