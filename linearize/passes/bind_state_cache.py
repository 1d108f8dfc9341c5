"""Pass: bind attention sites to the `StateCache` layers that feed them (decoding with a converted model).

A StateCache layer's `update` leaves a `linearize::state_cache_kv` marker where the keys and values would be: its
outputs have the shape of a full-capacity KV cache, so the model's own attention code traces unchanged, but their
values do not exist. For each site whose keys come from a marker, this pass points the site at the chunk's real keys
and values (the marker's inputs), so every later pass sees ordinary causal self-attention over the chunk, and
records the binding (layer buffers, position offset, plan) for the rewrite, which emits the stateful op.

A marker that no site reads (the attention was not recognised, or a graph break separates it from the cache) is an
error here, not a wrong answer later.
"""
from __future__ import annotations

import json

import torch
import torch.fx as fx

from ..patterns.graph import value
from ..patterns.layout import skip_casts
from ..patterns.site import StateBinding

MARKERS = (torch.ops.linearize.state_cache_kv, torch.ops.linearize.state_cache_kv.default)


class StateCacheError(ValueError):
    """A StateCache that does not fit the compiled model (other rules, unrecognised attention, graph break)."""


def bind_state_cache(gm, ctx):
    markers = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in MARKERS]
    if not markers:
        return gm
    bound = set()
    for site in ctx.sites:
        marker = _marker_of(site.k)
        if marker is None:
            continue
        if marker is not _marker_of(site.v):
            raise StateCacheError(f"linearize: the keys and values of {site.module_path} come from different "
                                  "StateCache layers")
        k, v, pos0, buffers, layer, plan, capacity = marker.args
        _check_identity(site, layer, marker in bound)
        plan = json.loads(plan)
        _check_rules(plan, ctx.rules, layer)
        names = plan["buffers"]
        site.state = StateBinding(marker, layer, plan, pos0, dict(zip(names, buffers)), capacity)
        site.k, site.v = k, v
        B, Hq, Hkv, L, _, D, Dv = site.shape
        site.shape = (B, Hq, Hkv, L, value(k).shape[-2], D, Dv)
        site.mask_example = "cache"
        ctx.orphan_candidates.add(marker)
        bound.add(marker)
    for marker in markers:
        if marker not in bound:
            layer = marker.args[4]
            raise StateCacheError(
                f"linearize: StateCache layer {layer} feeds an attention that linearize did not find in this graph "
                "(a graph break between the cache update and the attention, or an attention shape the patterns do "
                "not know; linearize.explain(model, ids) lists near-misses). Use a plain transformers cache for "
                "this model.")
    return gm


def _marker_of(node):
    """The state_cache_kv call whose output `node` is (a site's k and v are already past any GQA expansion), or None."""
    node = skip_casts(node) if isinstance(node, fx.Node) else None
    if node is not None and node.op == "call_function" and getattr(node.target, "__name__", "") == "getitem":
        node = node.args[0]
    return node if node is not None and node.op == "call_function" and node.target in MARKERS else None


def _check_identity(site, layer: int, taken: bool) -> None:
    """One site per cache layer, and the layer the graph says is the layer the cache says: never two layers (or a
    misread layer) bound to one slot."""
    if taken or site.identity_problem:
        raise StateCacheError(f"linearize: StateCache layer {layer} is read by more than one attention in this graph "
                              f"({site.identity_problem or site.module_path}); its state cannot be shared")
    if site.layer is not None and site.layer != layer:
        raise StateCacheError(f"linearize: {site.module_path} reads StateCache layer {layer}, but its module path "
                              f"places it at layer {site.layer}; the layer identity is inconsistent, refusing to "
                              "decode with a state that may belong to another layer")


def _check_rules(plan: dict, rules, layer: int) -> None:
    ours = str(getattr(rules, "name", rules))
    if plan["rules"] != ours:
        raise StateCacheError(
            f"linearize: this StateCache was built for rules={plan['rules']!r}, but the model is compiled with "
            f"rules={ours!r}; its layer {layer} holds the state of a different rewrite. Build the cache for the "
            f"same rules: StateCache(model, rules={ours!r}).")


def check_binding(site) -> None:
    """After the rules decided: the site must get exactly the rewrite whose state the cache layer holds."""
    plan = site.state.plan
    if site.rewrite != plan["rewrite"] or dict(site.params) != plan["params"]:
        why = f" ({site.reason})" if site.reason else ""
        raise StateCacheError(
            f"linearize: StateCache layer {site.state.layer} holds {plan['rewrite']} state {plan['params']}, but "
            f"this compile rewrites {site.module_path} as {site.rewrite}{why}. The cache and the compiled model "
            f"must come from the same rules on the same model: build the cache with StateCache(model, rules=...).")
