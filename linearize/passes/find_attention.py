"""Pass: find every softmax-attention site (and every softmax left alone) with the pattern library.

Attention inside a higher-order op's body (a gradient-checkpointed layer is `tag_activation_checkpoint(wrap_body_0,
...)`) lives in a subgraph the rewrite does not enter yet: each one is listed as unmatched with the reason and the fix,
and a warning says so, because a model that trains with checkpointing would otherwise silently keep softmax there.
"""
import warnings

import torch.fx as fx

from ..patterns import Unmatched, find_sites
from ..patterns.graph import module_path

NESTED_REASON = ("inside {hop} (a {what}): linearize rewrites the top-level graph only, so this attention keeps "
                 "softmax. Fix: model.gradient_checkpointing_disable() before compiling (or checkpoint outside the "
                 "compiled region)")
NESTED_WARNING = ("linearize: {n} attention site(s) sit inside {hop} bodies and keep softmax (gradient "
                  "checkpointing?); linearize.explain lists them. Disable gradient checkpointing to rewrite them.")
KNOWN_BODIES = {"tag_activation_checkpoint": "gradient-checkpointed region"}


def find_attention(gm, ctx):
    extra = tuple(getattr(ctx.rules, "patterns", {}).values())  # the rule file's own attention shapes
    ctx.sites, ctx.unmatched = find_sites(gm.graph, extra=extra)
    nested = list(_nested_sites(gm, extra))
    if nested:
        ctx.unmatched.extend(nested)
        warnings.warn(NESTED_WARNING.format(n=len(nested), hop=nested[0].pattern), stacklevel=2)
    return gm


def _nested_sites(gm, extra):
    """Attention sites in the bodies of higher-order ops (any depth), reported as unmatched."""
    for node in gm.graph.nodes:
        if node.op != "call_function":  # a subgraph argument marks a higher-order op, however torch spells it
            continue
        hop = getattr(node.target, "__name__", None) or str(node.target)
        for arg in node.args:
            if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
                continue
            body = getattr(gm, arg.target, None)
            if not isinstance(body, fx.GraphModule):
                continue
            sites, _ = find_sites(body.graph, extra=extra)
            for site in sites:
                reason = NESTED_REASON.format(hop=hop, what=KNOWN_BODIES.get(hop, "higher-order op body"))
                yield Unmatched(site.node.name, site.module_path or module_path(site.node), reason, pattern=hop)
            yield from _nested_sites(body, extra)
