"""Seeing through ops that move or copy values without changing them.

Attention inputs reach the softmax through casts, `contiguous`, KV-cache concatenation with an empty past, and GQA
expansion (`repeat_kv`'s expand+reshape, `repeat_interleave`). Patterns and provenance look through these so one
canonical site results whatever the model wrote.
"""
from __future__ import annotations

from typing import Optional

import torch.fx as fx

from .graph import arg, is_op, shape

CASTS = ("to", "float", "half", "bfloat16", "type", "type_as", "contiguous", "clone")


def skip_casts(node: fx.Node) -> fx.Node:
    """Follow dtype casts and copies back to the node that computed the values."""
    while is_op(node, *CASTS) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def skip_empty_cache(node: fx.Node) -> tuple[fx.Node, Optional[str]]:
    """`cat([past, new], dim=-2)` with an empty past is `new`: return it.

    Returns (node, reason): reason is set when the past is not empty, since then the keys hold tokens this graph
    did not project (a decoding step with a softmax KV cache).
    """
    if not is_op(node, "cat"):
        return node, None
    tensors, dim = arg(node, 0, "tensors"), arg(node, 1, "dim", 0)
    rank = len(shape(node) or ())
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int) or dim % max(rank, 1) != rank - 2:
        return node, None  # not a concatenation along the sequence dim
    live = [t for t in tensors if not (isinstance(t, fx.Node) and _is_empty(t))]
    if len(live) == 1 and isinstance(live[0], fx.Node):
        return live[0], None
    return node, "keys/values are concatenated with a non-empty KV cache"


def _is_empty(node: fx.Node) -> bool:
    s = shape(node)
    return s is not None and 0 in s


def strip_kv_repeat(node: fx.Node) -> tuple[fx.Node, int]:
    """Undo GQA expansion of k or v: returns (the node at KV-head count, repeats).

    Recognises transformers' `repeat_kv` (x[:, :, None].expand(B, Hkv, n, S, D).reshape(B, Hkv*n, S, D)) and
    `x.repeat_interleave(n, dim=1)`. Anything else is taken as already un-expanded (repeats 1).
    """
    node = skip_casts(node)
    if is_op(node, "reshape", "view") and is_op(node.args[0], "expand"):
        expand = node.args[0]
        src = expand.args[0]
        if is_op(src, "getitem") and isinstance(src.args[0], fx.Node):
            base = src.args[0]
            out_s, base_s = shape(node), shape(base)
            if out_s and base_s and len(out_s) == len(base_s) == 4 and out_s[1] % base_s[1] == 0:
                if (out_s[0], out_s[2:]) == (base_s[0], base_s[2:]):
                    return base, out_s[1] // base_s[1]
    if is_op(node, "repeat_interleave"):
        base = node.args[0]
        repeats = arg(node, 1, "repeats")
        dim = arg(node, 2, "dim")
        if isinstance(repeats, int) and dim == 1 and isinstance(base, fx.Node):
            return base, repeats
    return node, 1
