"""What a rewritten site computes while decoding with a `StateCache`: the replacements of replacements.py, one chunk
at a time, reading the layer's buffers and writing them back in place.

The chunk is the current input (the prompt at prefill, one token per decode step), at positions pos0 .. pos0+T-1.
Padding comes from transformers' mask over the cache's slots: the last query's row says which current keys are real
(`key_validity`, read once per graph, since every layer shares the mask). Padded keys never enter a state or a
ring (their keys, values and gates are zeroed, their ring positions are -1). The copies into the buffers are ordinary in-place ops on graph inputs; AOTAutograd functionalises them.
`kernels=` selects the kernels as in the full-sequence replacements: the one-token GLA step runs the generated
decode kernel where Triton is selected (CUDA under "auto"); the window ring and prefill chunks run PyTorch ops.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import replacements as R


def key_validity(mask: Optional[torch.Tensor], pos0: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: which of the chunk's keys (as many as q's queries) are real tokens (not padding)."""
    B, T = q.shape[0], q.shape[-2]
    if mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=q.device)
    return torch.ops.linearize.chunk_key_validity(mask, pos0, T).expand(B, T)


def _write(buffers, values) -> None:
    for buf, val in zip(buffers, values):
        buf.copy_(val)


def window_attention_step(q, k, v, valid, pos0, ring_k, ring_v, ring_pos, sink_k, sink_v, sink_pos, *, window: int,
                          scale: float, sinks: int = 0, kernels: str = "auto"):
    """`sinks` is the size of the sink buffers (empty without sinks); the op reads it from them."""
    buffers = (ring_k, ring_v, ring_pos, sink_k, sink_v, sink_pos)
    o, *new = torch.ops.linearize.ring_window_attention(q, k, v, valid, pos0, *buffers, scale, window)
    _write(buffers, new)
    return o


def gla_attention_step(q_pre, k_pre, v, valid, pos0, state, **gla_params):
    o, final = R.gla_with_state(q_pre, k_pre, v, valid=valid, initial_state=state, **gla_params)
    _write((state,), (final,))
    return o


def liger_attention_step(q, k, v, q_pre, k_pre, valid, pos0, ring_k, ring_v, ring_pos, sink_k, sink_v, sink_pos,
                         state, *, window: int, mix, window_scale: float, sinks: int = 0, kernels: str = "auto",
                         **gla_params):
    swa = window_attention_step(q, k, v, valid, pos0, ring_k, ring_v, ring_pos, sink_k, sink_v, sink_pos,
                                window=window, scale=window_scale, sinks=sinks)
    gla = gla_attention_step(q_pre, k_pre, v, valid, pos0, state, kernels=kernels, **gla_params)
    return R.mixed(mix, swa, gla)


def lolcats_attention_step(q, k, v, q_pre, k_pre, valid, pos0, ring_k, ring_v, ring_pos, ring_fk, state, norm,
                           sink_k, sink_v, sink_pos, *, window: int, window_scale: float, feature_map: str,
                           sinks: int = 0, projection=None):
    """`sinks` is the size of the sink buffers (empty without sinks); the op reads it from them."""
    fq, fk = R.lolcats_features(q_pre, k_pre, feature_map, projection)
    buffers = (ring_k, ring_v, ring_pos, ring_fk, state, norm, sink_k, sink_v, sink_pos)
    o, *new = torch.ops.linearize.ring_hybrid_attention(q.float(), k, v, fq, fk, valid, pos0, *buffers,
                                                         window_scale, window)
    _write(buffers, new)
    return o.to(v.dtype)
