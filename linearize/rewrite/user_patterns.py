"""Matching a rule file's pattern in a graph and canonicalising the match into an `AttentionSite`.

The expression tree is matched with the library's own matcher (`linearize.patterns.expr.match`, which looks through
casts and disabled dropout and tries both operand orders of add/mul). The captures then say what the site is:
`$q`, `$k` ([.., S, D]), `$v`, `$scale` (a constant, 1 when absent) and `$mask`, whose role is read from the op that
consumes it in the expression: `add(scores, $mask)` is additive, `masked_fill(scores, $mask, -inf)` hides where
True, `where($mask, scores, -inf)` keeps where True. The canonical site is built by the library's builder, so a
user pattern gives the same site (GQA un-expanded, 3-D bmm layouts lifted) a built-in pattern would.
"""
from __future__ import annotations

from typing import Union

import torch.fx as fx

from ..patterns.site import AttentionSite
from . import selectors


def _parent_of_mask(tree, parent=None):
    from ..patterns.expr import Alt, Cap, Op

    if isinstance(tree, Cap):
        return parent if tree.name == "mask" else None
    children = []
    if isinstance(tree, Op):
        children = list(tree.args) + [a for _, a in tree.kwargs]
    elif isinstance(tree, Alt):
        children = list(tree.options)
    for c in children:
        found = _parent_of_mask(c, tree if isinstance(tree, Op) else parent)
        if found is not None:
            return found
    return None


def match_user_pattern(pattern, node: fx.Node) -> Union[AttentionSite, str, None]:
    from ..patterns import matmul_softmax as MS
    from ..patterns.expr import canonical_name
    from ..patterns.expr import match as match_expr

    if node.op not in ("call_function", "call_method") or canonical_name(node) not in pattern.expr.names():
        return None
    m = match_expr(pattern.expr, node)
    if m is None:
        return None
    caps = m.captures
    q, k, v = caps["q"], caps["k"], caps["v"]
    if not all(isinstance(t, fx.Node) for t in (q, k, v)):
        return None
    scores = MS.Scores()
    if "scale" in caps:
        scale = MS.constant(caps["scale"])
        if scale is None:
            return f"{pattern.name}: $scale is not a constant (a learned temperature?)"
        scores.scale = scale
    if "mask" in caps:
        parent = _parent_of_mask(pattern.expr)
        role = parent.names()[0] if parent is not None else None
        mask = caps["mask"]
        if role == "add":
            scores.additive.append((mask, 1.0))
        elif role == "masked_fill":
            scores.keep_masks.append((mask, True))
        elif role == "where":
            scores.keep_masks.append((mask, False))
        else:
            return f"{pattern.name}: $mask is used by `{role}`; use it in add, masked_fill or where"
    qk = MS.QK(q=q, k_t=None, k=k, node=m.nodes[0] if m.nodes else node)
    try:
        site = MS._site(node, node, q, k, qk, v, scores, None)
    except MS.NoMatch as exc:
        return f"{pattern.name}: {exc}"
    site.pattern = pattern.name
    site.matched_nodes = [*m.nodes[:-1], node] if m.nodes and m.nodes[-1] is node else [*m.nodes, node]
    if pattern.constraints:
        values = selectors.site_values(site)
        for c in pattern.constraints:
            if not c.evaluate(values):
                return None
    return site
