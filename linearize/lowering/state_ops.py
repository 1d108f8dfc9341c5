"""Custom ops for decoding with a bounded cache (linearize/generation/cache.py holds the buffers).

- `linearize::ring_window_attention` / `linearize::ring_hybrid_attention`: one chunk of window (or LoLCATs hybrid)
  attention against a ring of the last W keys (kernels/ring.py). Functional: they return the new ring and sums and
  the rewritten graph copies them into the cache's buffers, so AOTAutograd sees plain input mutations.
- `linearize::state_cache_kv`: the marker a `StateCache` layer leaves in the captured graph. It stands for "the keys
  and values this layer's state represents" and has the shape HF's attention expects ([B, Hkv, capacity, D]); the
  backend's `bind_state_cache` pass replaces the attention that reads it by the stateful op and the marker dies.
  Running it means no rewrite happened, so it raises instead of returning keys it does not have.
- `linearize::chunk_key_validity` / `linearize::cache_mask_is_causal`: read and check transformers' mask over the
  cache's slots (which of the chunk's keys are real; is it causal-with-padding), kept opaque to Inductor.

The decoding ops are inference-only (no autograd formula): the generation path runs under `torch.no_grad()`.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from ..kernels.ring import ring_attention

SCHEMAS = {
    "ring_window_attention": "(Tensor q, Tensor k, Tensor v, Tensor valid, Tensor pos0, Tensor ring_k,"
                             " Tensor ring_v, Tensor ring_pos, Tensor sink_k, Tensor sink_v, Tensor sink_pos,"
                             " float scale, int window) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "ring_hybrid_attention": "(Tensor q, Tensor k, Tensor v, Tensor fq, Tensor fk, Tensor valid, Tensor pos0,"
                             " Tensor ring_k, Tensor ring_v, Tensor ring_pos, Tensor ring_fk, Tensor state,"
                             " Tensor norm, Tensor sink_k, Tensor sink_v, Tensor sink_pos, float scale, int window)"
                             " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "chunk_key_validity": "(Tensor mask, Tensor pos0, int length) -> Tensor",
    "cache_mask_is_causal": "(Tensor mask, Tensor pos0) -> Tensor",
    "state_cache_kv": "(Tensor k, Tensor v, Tensor pos0, Tensor[] buffers, int layer, str plan, int capacity)"
                      " -> (Tensor, Tensor)",
}

NOT_REWRITTEN = ("linearize: StateCache layer {layer} was used by an attention that linearize did not rewrite. "
                 "The cache holds a recurrent state / window ring, not the full keys, so plain softmax attention "
                 "cannot read it. Compile the model with linearize first (linearize.convert(model, rules=...) or "
                 "model.compile(backend='linearize')) and build the cache for the same rules.")


def _custom_op(name: str):
    return torch.library.custom_op(f"linearize::{name}", mutates_args=(), schema=SCHEMAS[name])


def _out_like(q: Tensor, v: Tensor) -> Tensor:
    return q.new_empty(*q.shape[:-1], v.shape[-1], dtype=v.dtype)


@_custom_op("ring_window_attention")
def ring_window_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, pos0: Tensor, ring_k: Tensor,
                          ring_v: Tensor, ring_pos: Tensor, sink_k: Tensor, sink_v: Tensor, sink_pos: Tensor,
                          scale: float, window: int):
    """Window attention of a chunk against the ring and the attention sinks (empty [B, Hkv, 0, D] buffers: none)."""
    return _ring(q, k, v, valid, pos0, ring_k, ring_v, ring_pos, sink_k, sink_v, sink_pos, scale, window)


@ring_window_attention.register_fake
def _(q, k, v, valid, pos0, ring_k, ring_v, ring_pos, sink_k, sink_v, sink_pos, scale, window):
    return (_out_like(q, v), *(torch.empty_like(t) for t in (ring_k, ring_v, ring_pos, sink_k, sink_v, sink_pos)))


@_custom_op("ring_hybrid_attention")
def ring_hybrid_attention(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, valid: Tensor, pos0: Tensor,
                          ring_k: Tensor, ring_v: Tensor, ring_pos: Tensor, ring_fk: Tensor, state: Tensor,
                          norm: Tensor, sink_k: Tensor, sink_v: Tensor, sink_pos: Tensor, scale: float, window: int):
    """LoLCATs' hybrid of a chunk against the ring, the linear sums and the attention sinks (empty: none)."""
    return _ring(q, k, v, valid, pos0, ring_k, ring_v, ring_pos, sink_k, sink_v, sink_pos, scale, window,
                 fq=fq, fk=fk, ring_fk=ring_fk, state=state, norm=norm)


def _ring(q, k, v, valid, pos0, ring_k, ring_v, ring_pos, sink_k, sink_v, sink_pos, scale, window, **hybrid):
    """ring_attention with the sink buffers passed only when they hold sinks; empty ones are returned as copies
    (custom-op outputs may not alias inputs), so both ops always return their sink buffers last."""
    sinks = dict(sink_k=sink_k, sink_v=sink_v, sink_pos=sink_pos) if sink_k.shape[2] else {}
    out = ring_attention(q, k, v, valid, pos0, ring_k, ring_v, ring_pos, scale, window, **hybrid, **sinks)
    if not sinks:
        out = (*out, sink_k.clone(), sink_v.clone(), sink_pos.clone())
    return tuple(t.contiguous() for t in out)


@ring_hybrid_attention.register_fake
def _(q, k, v, fq, fk, valid, pos0, ring_k, ring_v, ring_pos, ring_fk, state, norm, sink_k, sink_v, sink_pos, scale,
      window):
    return (_out_like(q, v), *(torch.empty_like(t) for t in (ring_k, ring_v, ring_pos, ring_fk, state, norm,
                                                              sink_k, sink_v, sink_pos)))


@_custom_op("chunk_key_validity")
def chunk_key_validity(mask: Tensor, pos0: Tensor, length: int) -> Tensor:
    """[B, length] bool: which of a chunk's keys are real, read from the last query row of transformers' mask over
    the cache's slots (bool, or additive float with 0 = attend). An op of its own so that Inductor does not fuse
    this gather into transformers' mask kernel (Inductor's fused C++ for it fails to compile when the mask length
    is dynamic: VecMask<long> vs VecMask<float> in a masked load, torch 2.13)."""
    row = mask[:, 0, -1, :]
    allowed = row if row.dtype == torch.bool else row == 0
    return allowed.index_select(1, pos0.reshape(()).to(allowed.device) + torch.arange(length, device=allowed.device))


@chunk_key_validity.register_fake
def _(mask, pos0, length):
    return mask.new_empty(mask.shape[0], length, dtype=torch.bool)


@_custom_op("cache_mask_is_causal")
def cache_mask_is_causal(mask: Tensor, pos0: Tensor) -> Tensor:
    """rewrite/guards.py's check, as an op of its own for the same reason as chunk_key_validity."""
    from ..rewrite.guards import cache_mask_is_causal as check

    return check(mask, pos0.to(mask.device))


@cache_mask_is_causal.register_fake
def _(mask, pos0):
    return mask.new_empty((), dtype=torch.bool)


@_custom_op("state_cache_kv")
def state_cache_kv(k: Tensor, v: Tensor, pos0: Tensor, buffers: List[Tensor], layer: int, plan: str,
                   capacity: int):
    raise RuntimeError(NOT_REWRITTEN.format(layer=layer))


@state_cache_kv.register_fake
def _(k, v, pos0, buffers, layer, plan, capacity):
    return (k.new_empty(*k.shape[:2], capacity, k.shape[-1]), v.new_empty(*v.shape[:2], capacity, v.shape[-1]))
