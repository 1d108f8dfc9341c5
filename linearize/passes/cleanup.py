"""Pass: drop what the rewrites orphaned (e.g. RoPE'd q/k of a purely linear site), check and regenerate code."""


def cleanup(gm, ctx):
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
