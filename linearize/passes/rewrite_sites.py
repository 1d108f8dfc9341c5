"""Pass: replace each decided site's output node with the target's replacement."""
from ..patterns.graph import value
from ..rewrite.targets import TARGETS
from .bind_state_cache import check_binding

def _ancestors(node) -> set:
    seen, stack = set(), list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen and n.op in ("call_function", "call_method"):
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


_COPIED_META = ("nn_module_stack", "stack_trace", "source_fn_stack")


def rewrite_sites(gm, ctx):
    graph = gm.graph
    for site in ctx.sites:
        if site.state is not None:
            check_binding(site)
        target = TARGETS[site.rewrite]
        if target.emit is None:
            continue
        old = site.node
        ctx.orphan_candidates |= _ancestors(old)
        first_new = old.prev
        with graph.inserting_before(old):
            new = target.emit(graph, site, site.params)
            if site.out_rank == 3:  # the model wrote [B*H, T, D]; the canonical form split the heads out
                new = graph.call_method("flatten", (new, 0, 1))
            out_dtype, q_dtype = (getattr(value(n), "dtype", None) for n in (old, site.q))
            if out_dtype is not None and out_dtype != q_dtype:  # replacements return q's dtype; the model's differed
                new = graph.call_method("to", (new, out_dtype))
        n = first_new.next
        while n is not old:  # the replacement's nodes keep the attention's module and source location
            n.meta.update({k: old.meta[k] for k in _COPIED_META if k in old.meta})
            n.meta["linearize_site"] = site.layer
            n = n.next
        old.replace_all_uses_with(new)
        graph.erase_node(old)
        site.node = new
    return gm
