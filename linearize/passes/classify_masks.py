"""Pass: evaluate each site's explicit mask on the example inputs, at compile time.

Dynamo hands the backend real example inputs, and a mask is usually a small computation of them (the attention_mask
argument, positions, aranges). Running just that subgraph tells whether the model attends causally, causally within
a sliding window, bidirectionally (an encoder), or causally with padding, before any rewrite is chosen. A mask
whose subgraph is expensive or depends on activations is left to the run-time guard.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..patterns.graph import is_op
from ..rewrite.guards import mask_is_causal

_MAX_MASK_NODES = 400


def classify_masks(gm, ctx):
    inputs = getattr(ctx, "example_inputs", None)
    if inputs is None:
        return gm
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    env = {p: _concrete(x) for p, x in zip(placeholders, inputs)}
    position = {n: i for i, n in enumerate(gm.graph.nodes)}.__getitem__
    described = {}  # models usually build one mask that every layer shares
    for site in ctx.sites:
        if site.attn_mask is None or site.is_causal or site.state is not None:
            continue
        if site.attn_mask not in described:
            mask = _evaluate(site.attn_mask, env, position)
            described[site.attn_mask] = _describe(mask) if mask is not None else None
        site.mask_example = described[site.attn_mask]
    return gm


def _concrete(x):
    """A symbolic size's example value, read without installing a guard (reading it as an int would specialise the
    graph to this length, and every new length would recompile)."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        hint = x.node.hint
        return hint if hint is not None else x
    return x


def _evaluate(node: fx.Node, env: dict, position):
    """The value of `node` computed from the example inputs, or None when that is not cheap and safe."""
    order, seen, stack = [], set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if len(seen) > _MAX_MASK_NODES or is_op(n, "linear", "matmul", "bmm", "addmm", "softmax"):
            return None  # the mask depends on activations: leave it to the run-time check
        order.append(n)
        stack.extend(n.all_input_nodes)
    values = {}
    try:
        with torch.no_grad():
            for n in sorted(order, key=position):
                if n.op == "placeholder":
                    if n not in env:
                        return None
                    values[n] = env[n]
                elif n.op in ("call_function", "call_method"):
                    args = fx.node.map_arg(n.args, values.__getitem__)
                    kwargs = fx.node.map_arg(n.kwargs, values.__getitem__)
                    fn = getattr(args[0], n.target) if n.op == "call_method" else n.target
                    values[n] = fn(*args[1:], **kwargs) if n.op == "call_method" else fn(*args, **kwargs)
                else:
                    return None
    except Exception:  # noqa: BLE001 - anything unusual: the run-time check decides instead
        return None
    val = values.get(node)
    return val if isinstance(val, torch.Tensor) else None



def _describe(mask: torch.Tensor) -> str:
    """"causal" (incl. a causal sliding window), "bidirectional" (a key after the query is visible), or "padded"."""
    if bool(mask_is_causal(mask)):
        return "causal"
    L, S = mask.shape[-2:]
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    future = torch.ones(L, S, dtype=torch.bool, device=mask.device).triu(1)
    return "bidirectional" if bool((allowed & future).any()) else "padded"
