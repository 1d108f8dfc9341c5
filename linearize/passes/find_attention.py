"""Pass: find every softmax-attention site (and every softmax left alone) with the pattern library."""
from ..patterns import find_sites


def find_attention(gm, ctx):
    extra = tuple(getattr(ctx.rules, "patterns", {}).values())  # the rule file's own attention shapes
    ctx.sites, ctx.unmatched = find_sites(gm.graph, extra=extra)
    return gm
