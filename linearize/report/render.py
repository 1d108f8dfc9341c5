"""DOT for a report's pictures: each site before/after the rewrite, each near-miss, or a whole captured graph."""
from __future__ import annotations

from .draw import region, subgraph_dot
from .views import SiteView, UnmatchedView, site_views, unmatched_views


def _parent(module: str) -> str:
    return module.rsplit(".", 1)[0] if "." in module else ""


def site_region(view: SiteView, stage: str):
    """(snapshot, core, inputs, outputs, roles) of one site's drawing, or None without a snapshot."""
    cap = view.capture
    if cap is None or cap.before is None:
        return None
    before, after = cap.before, cap.after
    roles = view.node_names()
    if stage == "before":
        snap = before
        seeds = list(roles)
    else:
        if after is None:
            return None
        snap = after
        roles = {n: r for n, r in roles.items() if n in after and r != "matched"}
        seeds = [view.site.node.name] + list(roles)
    core, inputs, outputs = region(snap, [s for s in seeds if s in snap], view.site.module_path)
    other = after if stage == "before" else before
    if other is not None:
        for name in core:
            if name not in other and name not in roles:
                roles[name] = "removed" if stage == "before" else "new"
        if stage == "after" and view.site.node.name not in before:
            roles[view.site.node.name] = "new"
    core_set = set(core)
    roles = {n: r for n, r in roles.items() if n in core_set}
    return snap, core, inputs, outputs, roles


def site_dot(report, site, stage: str = "after", gid: str = None) -> str:
    views = site_views(report)
    if isinstance(site, SiteView):
        view = site
    elif isinstance(site, int):
        view = views[site]
    else:
        view = next(v for v in views if v.site is site)
    if stage not in ("before", "after"):
        raise ValueError(f"stage must be 'before' or 'after', got {stage!r}")
    found = site_region(view, stage)
    if found is None:
        raise ValueError("this report has no graph snapshots (was it made by linearize.explain?)")
    snap, core, inputs, outputs, roles = found
    s = view.site
    title = (f"{s.module_path or view.original_output} {stage} the rewrite"
             + (f": {s.rewrite}" if stage == "after" else f" ({s.pattern})"))
    return subgraph_dot(snap, core, inputs, outputs, roles=roles, base_module=_parent(s.module_path),
                        title=title, gid=gid or f"{view.anchor}-{stage}")


def unmatched_dot(view: UnmatchedView, gid: str = None):
    cap = view.capture
    if cap is None or cap.before is None or view.unmatched.node not in cap.before:
        return None
    roles = {n: "partial" for n in view.partial if n in cap.before}
    roles[view.unmatched.node] = "partial" if view.near_miss else "matched"
    core, inputs, outputs = region(cap.before, list(roles), view.unmatched.module_path)
    kind = f"near-miss of {view.pattern}" if view.near_miss else "softmax left alone"
    return subgraph_dot(cap.before, core, inputs, outputs, roles=roles,
                        base_module=_parent(view.unmatched.module_path),
                        title=f"{view.unmatched.node} ({kind})", gid=gid or view.anchor)


def report_dot(report, stage: str = "after") -> str:
    """Every captured graph, whole, clustered by module, with every site's nodes highlighted."""
    views = site_views(report)
    parts = []
    for ctx in report.contexts:
        cap = report.captures.get(ctx.graph_id)
        if cap is None:
            continue
        snap = cap.after if stage == "after" and cap.after is not None else cap.before
        roles = {}
        for v in views:
            if v.graph_id != ctx.graph_id:
                continue
            if snap is cap.before:
                roles.update({n: r for n, r in v.node_names().items() if n in snap})
            else:
                roles.update({n: r for n, r in v.node_names().items() if n in snap and r != "matched"})
        if snap is cap.after:
            roles.update({n: "new" for n in snap.nodes if n not in cap.before})
        for u in unmatched_views(report):
            if u.graph_id == ctx.graph_id and u.unmatched.node in snap:
                roles.setdefault(u.unmatched.node, "partial")
        core = [n for n, info in snap.nodes.items() if info.op != "output"]
        parts.append(subgraph_dot(snap, core, roles=roles, title=f"graph {ctx.graph_id} {snap.stage} the rewrite",
                                  gid=f"graph{ctx.graph_id}", prefix=f"g{ctx.graph_id}."))
    if len(parts) == 1:
        return parts[0]
    # several graphs: one digraph, each graph a cluster
    body = []
    for i, p in enumerate(parts):
        inner = p.split("\n", 1)[1].rsplit("}", 1)[0]
        body.append(f'  subgraph "cluster_graph{i}" {{\n{inner}\n  }}')
    return "digraph report {\n  compound=true;\n" + "\n".join(body) + "\n}"
