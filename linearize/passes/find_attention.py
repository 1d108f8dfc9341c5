"""Pass: find every softmax-attention site (and every softmax left alone) with the pattern library."""
from ..patterns import find_sites


def find_attention(gm, ctx):
    ctx.sites, ctx.unmatched = find_sites(gm.graph)
    return gm
