"""The pass pipeline over Dynamo's FX graph: a list of named passes, each `(gm, ctx) -> gm`.

graph in -> find_attention -> bind_state_cache -> trace_provenance -> classify_masks -> apply_rules -> bind_learned -> rewrite_sites -> cleanup -> graph out (lowering)
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from .apply_rules import apply_rules
from .bind_learned import bind_learned
from .bind_state_cache import bind_state_cache
from .classify_masks import classify_masks
from .cleanup import cleanup
from .context import PassContext
from .find_attention import find_attention
from .rewrite_sites import rewrite_sites
from .trace_provenance import trace_provenance


@dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable


DEFAULT_PIPELINE = [Pass(fn.__name__, fn) for fn in
                    (find_attention, bind_state_cache, trace_provenance, classify_masks, apply_rules, bind_learned,
                     rewrite_sites, cleanup)]


def run_pipeline(gm, ctx: PassContext, passes=DEFAULT_PIPELINE):
    """Run each pass in order, timing it; returns the rewritten GraphModule.

    Observers (`options.observe`, and the `options.debug_dir` writer) see the graph before the first pass, as stage
    "input", and after each pass, under the pass's name; their time is not in `ctx.timings`.
    """
    observers = _observers(ctx)
    ctx.nodes_before = len(gm.graph.nodes)
    for observe in observers:
        observe("input", gm, ctx)
    for p in passes:
        start = time.perf_counter()
        gm = p.fn(gm, ctx)
        ctx.timings[p.name] = time.perf_counter() - start
        for observe in observers:
            observe(p.name, gm, ctx)
    ctx.nodes_after = len(gm.graph.nodes)
    return gm


def _observers(ctx) -> list:
    opts = ctx.options
    out = []
    if getattr(opts, "debug_dir", None):
        from ..report.debug import DebugWriter

        out.append(DebugWriter(opts.debug_dir))
    if getattr(opts, "observe", None) is not None:
        out.append(opts.observe)
    return out


__all__ = ["Pass", "PassContext", "DEFAULT_PIPELINE", "run_pipeline"]
