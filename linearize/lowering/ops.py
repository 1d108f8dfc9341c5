"""torch.library custom ops `linearize::*`: opaque graph nodes for the rewritten attention.

Each op has a fake (meta) kernel for tracing and an autograd formula whose backward is itself
a custom op (`linearize::*_backward`), so AOTAutograd/Inductor keep forward and backward as
single opaque nodes. Autograd cannot run inside a custom op, so the backward kernels are
explicit formulas. Implementations are looked up in dispatch.py on every call.

Backward ops recompute what they need (softmax statistics, chunk states) from the inputs
rather than receiving forward intermediates, because the public schemas return only o
(and the GLA final state).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..kernels.precision import acc_dtype
from . import dispatch


# The contract other code relies on; spelled out so `int` stays `int` (not inferred as SymInt).
SCHEMAS = {
    "attention": "(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, float scale, bool is_causal,"
                 " float softcap=0.0, Tensor? sinks=None) -> Tensor",
    "attention_backward": "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? attn_mask,"
                          " float scale, bool is_causal, float softcap, Tensor? sinks)"
                          " -> (Tensor, Tensor, Tensor, Tensor)",
    "window_attention": "(Tensor q, Tensor k, Tensor v, float scale, int window, int sink_tokens=0) -> Tensor",
    "window_attention_backward": "(Tensor grad_out, Tensor q, Tensor k, Tensor v, float scale,"
                                 " int window, int sink_tokens=0) -> (Tensor, Tensor, Tensor)",
    "gla": "(Tensor q, Tensor k, Tensor v, Tensor g, Tensor? initial_state, float scale,"
           " int chunk_size) -> (Tensor, Tensor)",
    "gla_backward": "(Tensor grad_out, Tensor? grad_final_state, Tensor q, Tensor k, Tensor v,"
                    " Tensor g, Tensor? initial_state, float scale, int chunk_size)"
                    " -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
}


def _custom_op(name: str):
    return torch.library.custom_op(f"linearize::{name}", mutates_args=(), schema=SCHEMAS[name])


def _contiguous(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Outputs must be contiguous to match the fake kernels (kernels never return an input)."""
    return tuple(t.contiguous() for t in tensors)


def _like(x: Tensor) -> Tensor:
    return x.new_empty(x.shape)


# ----------------------------------------------------------------------------- attention
@_custom_op("attention")
def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], scale: float,
              is_causal: bool, softcap: float = 0.0, sinks: Optional[Tensor] = None) -> Tensor:
    o = dispatch.kernels("attention", q.device.type).forward(q, k, v, attn_mask, scale, is_causal,
                                                             softcap, sinks)
    return _contiguous(o)[0]


@attention.register_fake
def _(q, k, v, attn_mask, scale, is_causal, softcap=0.0, sinks=None):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@_custom_op("attention_backward")
def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor,
                       attn_mask: Optional[Tensor], scale: float, is_causal: bool, softcap: float,
                       sinks: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    pair = dispatch.kernels("attention", q.device.type)
    dq, dk, dv, dsinks = pair.backward(grad_out, q, k, v, attn_mask, scale, is_causal, softcap, sinks)
    if dsinks is None:  # the schema has no optional outputs: an empty tensor stands for "no sinks"
        dsinks = q.new_zeros(0)
    return _contiguous(dq, dk, dv, dsinks)


@attention_backward.register_fake
def _(grad_out, q, k, v, attn_mask, scale, is_causal, softcap, sinks):
    dsinks = q.new_empty(*q.shape[:-1], 1) if sinks is not None else q.new_empty(0)
    return _like(q), _like(k), _like(v), dsinks


def _attention_setup(ctx, inputs, output):
    q, k, v, attn_mask, ctx.scale, ctx.is_causal, ctx.softcap, sinks = inputs
    ctx.has_sinks = sinks is not None
    ctx.sinks_shape = tuple(sinks.shape) if sinks is not None else None
    ctx.save_for_backward(q, k, v, attn_mask, sinks)


def _attention_grad(ctx, grad_out):
    q, k, v, attn_mask, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = torch.ops.linearize.attention_backward(
        grad_out, q, k, v, attn_mask, ctx.scale, ctx.is_causal, ctx.softcap, sinks)
    if ctx.has_sinks:
        dsinks = _sum_to(dsinks, ctx.sinks_shape)
    else:
        dsinks = None
    return dq, dk, dv, None, None, None, None, dsinks


def _sum_to(grad: Tensor, shape: tuple) -> Tensor:
    """Reduce a broadcast gradient to `shape` (sinks arrive broadcastable to [B, Hq, L, 1])."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    dims = [i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1]
    return grad.sum(dims, keepdim=True) if dims else grad


attention.register_autograd(_attention_grad, setup_context=_attention_setup)


# ---------------------------------------------------------------------- window attention
@_custom_op("window_attention")
def window_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, window: int, sink_tokens: int = 0) -> Tensor:
    o = dispatch.kernels("window_attention", q.device.type).forward(q, k, v, scale, window, sink_tokens)
    return _contiguous(o)[0]


@window_attention.register_fake
def _(q, k, v, scale, window, sink_tokens=0):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


@_custom_op("window_attention_backward")
def window_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float,
                              window: int, sink_tokens: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    pair = dispatch.kernels("window_attention", q.device.type)
    return _contiguous(*pair.backward(grad_out, q, k, v, scale, window, sink_tokens))


@window_attention_backward.register_fake
def _(grad_out, q, k, v, scale, window, sink_tokens=0):
    return _like(q), _like(k), _like(v)


def _window_setup(ctx, inputs, output):
    q, k, v, ctx.scale, ctx.window, ctx.sink_tokens = inputs
    ctx.save_for_backward(q, k, v)


def _window_grad(ctx, grad_out):
    q, k, v = ctx.saved_tensors
    dq, dk, dv = torch.ops.linearize.window_attention_backward(
        grad_out, q, k, v, ctx.scale, ctx.window, ctx.sink_tokens)
    return dq, dk, dv, None, None, None


window_attention.register_autograd(_window_grad, setup_context=_window_setup)


# ------------------------------------------------------------------- gated linear attention
@_custom_op("gla")
def gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, initial_state: Optional[Tensor], scale: float,
        chunk_size: int) -> tuple[Tensor, Tensor]:
    pair = dispatch.kernels("gla", q.device.type)
    return _contiguous(*pair.forward(q, k, v, g, initial_state, scale, chunk_size))


@gla.register_fake
def _(q, k, v, g, initial_state, scale, chunk_size):
    o = q.new_empty(*q.shape[:-1], v.shape[-1])
    state = q.new_empty(k.shape[0], k.shape[1], k.shape[-1], v.shape[-1], dtype=acc_dtype(q))
    return o, state


@_custom_op("gla_backward")
def gla_backward(grad_out: Tensor, grad_final_state: Optional[Tensor], q: Tensor, k: Tensor,
                 v: Tensor, g: Tensor, initial_state: Optional[Tensor], scale: float,
                 chunk_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dh0 is always a tensor (schemas cannot return Tensor?): without initial_state it is the
    gradient w.r.t. the implicit zero state, and autograd drops it."""
    pair = dispatch.kernels("gla", q.device.type)
    grads = pair.backward(grad_out, grad_final_state, q, k, v, g, initial_state, scale, chunk_size)
    return _contiguous(*grads)


@gla_backward.register_fake
def _(grad_out, grad_final_state, q, k, v, g, initial_state, scale, chunk_size):
    state_dtype = acc_dtype(q) if initial_state is None else initial_state.dtype
    dh0 = q.new_empty(k.shape[0], k.shape[1], k.shape[-1], v.shape[-1], dtype=state_dtype)
    return _like(q), _like(k), _like(v), _like(g), dh0


def _gla_setup(ctx, inputs, output):
    q, k, v, g, initial_state, ctx.scale, ctx.chunk_size = inputs
    ctx.has_initial_state = initial_state is not None
    ctx.save_for_backward(q, k, v, g, initial_state)


def _gla_grad(ctx, grad_out, grad_final_state):
    q, k, v, g, initial_state = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    dq, dk, dv, dg, dh0 = torch.ops.linearize.gla_backward(
        grad_out, grad_final_state, q, k, v, g, initial_state, ctx.scale, ctx.chunk_size)
    return dq, dk, dv, dg, (dh0 if ctx.has_initial_state else None), None, None


gla.register_autograd(_gla_grad, setup_context=_gla_setup)
