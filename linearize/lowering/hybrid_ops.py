"""`linearize::hybrid_attention`: window softmax + linear attention under one shared normaliser (LoLCATs).

Same construction as ops.py: a custom op with a fake kernel, an autograd formula whose backward is its own custom
op (`linearize::hybrid_attention_backward`, recomputing what it needs from the inputs), and implementations looked up
in dispatch.py on every call ("reference" = linearize/kernels/hybrid.py), so a Triton pair can be registered later.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import hybrid
from . import dispatch

OP = "hybrid_attention"
SCHEMAS = {
    "hybrid_attention": "(Tensor q, Tensor k, Tensor v, Tensor fq, Tensor fk, float scale, int window,"
                        " int sinks=0) -> Tensor",
    "hybrid_attention_backward": "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor fq, Tensor fk,"
                                 " float scale, int window, int sinks=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
}

# dispatch.register only accepts the ops it lists; this op lives in its own module, so it adds itself.
if OP not in dispatch.OPS:
    dispatch.OPS = (*dispatch.OPS, OP)
dispatch.register(OP, "reference", forward=hybrid.hybrid_attention_fwd, backward=hybrid.hybrid_attention_bwd)


def _custom_op(name: str):
    return torch.library.custom_op(f"linearize::{name}", mutates_args=(), schema=SCHEMAS[name])


def _like(x: Tensor) -> Tensor:
    return x.new_empty(x.shape)


@_custom_op("hybrid_attention")
def hybrid_attention(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, scale: float,
                     window: int, sinks: int = 0) -> Tensor:
    o = dispatch.kernels(OP, q.device.type).forward(q, k, v, fq, fk, scale, window, sinks)
    return o.contiguous()


@hybrid_attention.register_fake
def _(q, k, v, fq, fk, scale, window, sinks=0):
    return v.new_empty(*q.shape[:-1], v.shape[-1])


@_custom_op("hybrid_attention_backward")
def hybrid_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor,
                              scale: float, window: int, sinks: int = 0
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = dispatch.kernels(OP, q.device.type).backward(grad_out, q, k, v, fq, fk, scale, window, sinks)
    return tuple(g.contiguous() for g in grads)


@hybrid_attention_backward.register_fake
def _(grad_out, q, k, v, fq, fk, scale, window, sinks=0):
    return _like(q), _like(k), _like(v), _like(fq), _like(fk)


def _setup(ctx, inputs, output):
    q, k, v, fq, fk, ctx.scale, ctx.window, *rest = inputs
    ctx.sinks = rest[0] if rest else 0
    ctx.save_for_backward(q, k, v, fq, fk)


def _grad(ctx, grad_out):
    q, k, v, fq, fk = ctx.saved_tensors
    dq, dk, dv, dfq, dfk = torch.ops.linearize.hybrid_attention_backward(
        grad_out, q, k, v, fq, fk, ctx.scale, ctx.window, ctx.sinks)
    return dq, dk, dv, dfq, dfk, None, None, None


hybrid_attention.register_autograd(_grad, setup_context=_setup)
