"""Provenance: which pre-RoPE q/k and which key projection a site's inputs came from.

The linear branch of a Liger-style rewrite needs q and k *before* the rotary embedding (no RoPE on the linear
branch) and a gate computed from the key projection's output. Both are found by walking the data-flow graph
backwards from the site, never by module names, so the rewrite works on models nobody wrote a swap for.

The walk is conservative: between the projection and the pre-RoPE tensor only layout ops and per-head
normalisation (qk-norm) are accepted. Anything else (a positional transform we don't know, a graph break that
cut the projection off) leaves the site without provenance and says why.
"""
from __future__ import annotations

from collections import deque
from typing import Optional, Union

import networkx as nx
import torch.fx as fx

from .graph import is_op, module_path, shape
from .layout import CASTS, skip_casts, skip_empty_cache
from .site import AttentionSite, Provenance

# ops allowed between a projection and the pre-RoPE tensor: reshapes and per-head norms
_LAYOUT = {"view", "reshape", "transpose", "permute", "unflatten", "flatten", "split", "chunk", "getitem",
           "unsqueeze", "squeeze", *CASTS}
_NORM = {"pow", "mean", "rsqrt", "mul", "add", "sub", "div", "layer_norm", "rms_norm", "sqrt", "var",
         "group_norm", "normalize"}
_MAX_PROJECTION_DISTANCE = 32  # nodes walked back from a pre-RoPE tensor to its projection


def strip_rope(node: fx.Node) -> tuple[fx.Node, Optional[str]]:
    """If `node` is `x*cos + rotate_half(x)*sin` (any operand order), return (x, "rotate_half"); for partial
    rotary, `cat([rope(x[..., :r]), x[..., r:]], -1)`, return (x, "partial_rotate_half")."""
    node = skip_casts(node)
    partial = _strip_partial_rope(node)
    if partial is not None:
        return partial, "partial_rotate_half"
    if not is_op(node, "add") or len(node.args) != 2:
        return node, None
    a, b = node.args
    if not (is_op(a, "mul") and is_op(b, "mul")):
        return node, None
    for direct, rotated in ((a, b), (b, a)):
        for x in direct.args:
            if not isinstance(x, fx.Node):
                continue
            x0 = skip_casts(x)
            if any(_is_rotate_half_of(r, x0) for r in rotated.args if isinstance(r, fx.Node)):
                return x0, "rotate_half"
    return node, None


def _strip_partial_rope(node: fx.Node) -> Optional[fx.Node]:
    if not is_op(node, "cat"):
        return None
    parts = node.args[0] if node.args else None
    if not (isinstance(parts, (list, tuple)) and len(parts) == 2 and all(isinstance(p, fx.Node) for p in parts)):
        return None
    rotated, passed = parts
    inner, rope = strip_rope(rotated)
    passed = skip_casts(passed)
    if rope != "rotate_half" or not (is_op(inner, "getitem") and is_op(passed, "getitem")):
        return None
    base = inner.args[0]
    return base if passed.args[0] is base else None


def _is_rotate_half_of(node: fx.Node, x: fx.Node) -> bool:
    """`cat((-x[..., h:], x[..., :h]), -1)` (or an interleaved stack/flatten form) built only from x."""
    node = skip_casts(node)
    if not is_op(node, "cat", "flatten", "reshape", "view", "stack"):
        return False
    seen, frontier = set(), [node]
    reached = False
    while frontier:
        n = frontier.pop()
        if n in seen:
            continue
        seen.add(n)
        if skip_casts(n) is x or n is x:
            reached = True
            continue
        if not is_op(n, "cat", "stack", "flatten", "reshape", "view", "getitem", "neg", *CASTS):
            return False
        frontier.extend(n.all_input_nodes)
    return reached


def is_projection(node: fx.Node) -> bool:
    """`linear`, or the Conv1D form GPT-2 style models use (`addmm(bias, x, weight)`)."""
    return is_op(node, "linear", "addmm")


def nearest_projection(node: fx.Node) -> Optional[fx.Node]:
    """Breadth-first backwards to the closest projection call (the q/k projection)."""
    queue, seen = deque([(node, 0)]), {node}
    while queue:
        n, dist = queue.popleft()
        if is_projection(n):
            return n
        if dist >= _MAX_PROJECTION_DISTANCE:
            continue
        for inp in n.all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                queue.append((inp, dist + 1))
    return None


def _check_between(dg: nx.DiGraph, proj: fx.Node, pre: fx.Node) -> Optional[str]:
    """Reason string if anything other than layout or normalisation sits between projection and tensor."""
    between = nx.descendants(dg, proj) & nx.ancestors(dg, pre)
    between.add(pre)
    for n in between:
        if n.op in ("call_function", "call_method") and not is_op(n, *_LAYOUT, *_NORM):
            return f"unrecognised op `{n.name}` between {proj.name} and the attention input"
    return None


def find_provenance(site: AttentionSite, dg: nx.DiGraph) -> Union[Provenance, str]:
    """Provenance for a site, or a string saying why it could not be found."""
    k_node, reason = skip_empty_cache(skip_casts(site.k))
    if reason:
        return reason
    q_pre, q_rope = strip_rope(site.q)
    k_pre, k_rope = strip_rope(k_node)
    if q_rope != k_rope:
        return f"rotary embedding found on {'q' if q_rope else 'k'} only"
    if shape(q_pre) != shape(site.q) or shape(k_pre) != shape(site.k):
        return "pre-RoPE q/k do not have the attention's [B, H, T, D] layout"
    q_proj, k_proj = nearest_projection(q_pre), nearest_projection(k_pre)
    if k_proj is None or q_proj is None:
        missing = "key" if k_proj is None else "query"
        return f"no {missing} projection (`linear`) in this graph: a graph break may separate it from the attention"
    for proj, pre in ((q_proj, q_pre), (k_proj, k_pre)):
        why = _check_between(dg, proj, pre)
        if why:
            return why
    return Provenance(q_pre_rope=q_pre, k_pre_rope=k_pre, k_proj=k_proj, k_proj_path=module_path(k_proj),
                      rope=q_rope)
