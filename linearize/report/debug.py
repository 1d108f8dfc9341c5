"""Debug mode: the graph after each pass, written to disk so that a user can bisect which pass did what.

Turned on by `torch.compile(model, backend="linearize", options={"debug_dir": DIR})`, by the environment variable
`LINEARIZE_DEBUG_DIR=DIR`, or by `linearize explain --debug-dir DIR`. For each captured graph, `DIR/graph_<id>/`
holds, per stage (`00_input`, `01_find_attention`, ..., `05_cleanup`):

- `NN_stage.py`   the graph as Python (shapes and dtypes in comments), headed by what the pass context knows then
                  (sites found, provenance, decisions);
- `NN_stage.diff` a unified diff against the previous stage's code ("no change" when the pass left the graph alone);
- `NN_stage.dot`  the whole graph in Graphviz DOT, clustered by module, sites highlighted;
- `NN_stage.svg`  a drawing: the whole graph when small, else only what changed since the previous stage;

and `passes.txt`, one line per stage (nodes, sites, nodes added/removed).
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

from .draw import region, render_svg, subgraph_dot
from .snapshot import snapshot

FULL_DRAWING_MAX_NODES = 400


def _code(gm) -> str:
    try:
        return gm.graph.python_code("self", verbose=True).src
    except Exception:  # noqa: BLE001 - a half-rewritten graph may not print; fall back to the node list
        return str(gm.graph)


def _ctx_header(stage: str, ctx) -> str:
    lines = [f"# stage: {stage} (graph {ctx.graph_id})", f"# sites: {len(ctx.sites)}, unmatched: {len(ctx.unmatched)}"]
    for s in ctx.sites:
        prov = s.provenance.describe() if s.provenance is not None else f"missing ({s.provenance_missing})"
        decision = f" -> {s.rewrite} [{s.rule}]" if s.rewrite else ""
        reason = f" kept: {s.reason}" if s.reason else ""
        lines.append(f"#   layer {s.layer} {s.module_path} {s.pattern} at {s.node.name}; provenance {prov}"
                     f"{decision}{reason}")
    for u in ctx.unmatched:
        lines.append(f"#   unmatched {u.node} ({u.module_path or '-'}): {u.reason}")
    return "\n".join(lines) + "\n"


class DebugWriter:
    """An observer for `run_pipeline`: one instance per captured graph."""

    def __init__(self, directory):
        self.root = Path(os.fspath(directory))
        self.index = 0
        self.prev_code = None
        self.prev_snap = None
        self.dir = None

    def __call__(self, stage: str, gm, ctx) -> None:
        if self.dir is None:
            self.dir = self.root / f"graph_{ctx.graph_id}"
            self.dir.mkdir(parents=True, exist_ok=True)
        stem = f"{self.index:02d}_{stage}"
        self.index += 1
        code = _code(gm)
        (self.dir / f"{stem}.py").write_text(_ctx_header(stage, ctx) + code)
        if self.prev_code is None:
            diff = "(first stage)\n"
        else:
            diff = "".join(difflib.unified_diff(self.prev_code.splitlines(True), code.splitlines(True),
                                                fromfile="previous stage", tofile=stem)) or "no change\n"
        (self.dir / f"{stem}.diff").write_text(diff)
        self.prev_code = code

        snap = snapshot(gm.graph, stage, ctx.graph_id)
        roles = {}
        for s in ctx.sites:
            for n in s.matched_nodes:
                if n.name in snap:
                    roles[n.name] = "matched"
            if s.provenance is not None:
                for n in (s.provenance.q_pre_rope, s.provenance.k_pre_rope, s.provenance.k_proj):
                    if n is not None and n.name in snap:
                        roles.setdefault(n.name, "provenance")
        added = removed = []
        if self.prev_snap is not None:
            added = [n for n in snap.nodes if n not in self.prev_snap]
            removed = [n for n in self.prev_snap.nodes if n not in snap]
            roles.update({n: "new" for n in added})
        core = [n for n, info in snap.nodes.items() if info.op != "output"]
        (self.dir / f"{stem}.dot").write_text(subgraph_dot(snap, core, roles=roles, title=f"{stem} ({len(snap)} nodes)",
                                                           gid=stem))
        if len(core) <= FULL_DRAWING_MAX_NODES:
            svg = render_svg(subgraph_dot(snap, core, roles=roles, title=f"{stem} ({len(snap)} nodes)", gid=stem))
        elif added:
            part, ins, outs = region(snap, added, "", limit=FULL_DRAWING_MAX_NODES)
            svg = render_svg(subgraph_dot(snap, part, ins, outs, roles=roles, gid=stem,
                                          title=f"{stem}: the {len(added)} node(s) this pass added, and their "
                                                "neighbours"))
        else:
            svg = None
        if svg is not None:
            (self.dir / f"{stem}.svg").write_text(svg)
        with open(self.dir / "passes.txt", "a") as f:
            f.write(f"{stem:22s} nodes {len(snap):5d}  sites {len(ctx.sites):3d}  unmatched {len(ctx.unmatched):3d}  "
                    f"+{len(added)} -{len(removed)} nodes  {ctx.timings.get(stage, 0.0) * 1000:8.1f} ms\n")
        self.prev_snap = snap
