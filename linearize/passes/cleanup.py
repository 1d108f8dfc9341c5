"""Pass: drop what the rewrites orphaned (e.g. RoPE'd q/k of a purely linear site), check and regenerate code.

Only ancestors of replaced attention nodes may be removed: a Dynamo graph also holds calls whose effect is not
their result (vmap nesting, RNG state, grad mode), which a graph-wide dead-code pass would wrongly delete.
"""


def cleanup(gm, ctx):
    removable = getattr(ctx, "orphan_candidates", set())
    if removable:
        gm.graph.eliminate_dead_code(is_impure_node=lambda n: n not in removable)
    gm.graph.lint()
    gm.recompile()
    return gm
