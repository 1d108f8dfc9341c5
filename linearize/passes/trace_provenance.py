"""Pass: record on each site the pre-RoPE q/k and the key projection it came from (or why not found)."""
from ..patterns.graph import data_graph
from ..patterns.provenance import find_provenance


def trace_provenance(gm, ctx):
    if not ctx.sites:
        return gm
    dg = data_graph(gm.graph)
    for site in ctx.sites:
        found = find_provenance(site, dg)
        if isinstance(found, str):
            site.provenance, site.provenance_missing = None, found
        else:
            site.provenance, site.provenance_missing = found, None
    return gm
