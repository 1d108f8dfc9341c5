"""Drawing graph snapshots: pick the region around a site, write it as Graphviz DOT, lay it out with `dot`.

Large models are never drawn whole: a drawing is one site's region (its attention module, the module's inputs and
the first consumers), clustered by submodule. Layout is Graphviz's `dot` (the Debian `graphviz` package, installed
by `.ci/run`); many drawings are laid out in a few batched `dot` processes in parallel.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Optional

from .snapshot import GraphSnapshot, NodeInfo

# fill, border, text for each role a node can have in a drawing
ROLE_STYLE = {
    "matched": ("#fdd49e", "#d94801", "matched by the pattern"),
    "partial": ("#fee391", "#cc4c02", "matched partly (near-miss)"),
    "operand": ("#e5dff0", "#6a51a3", "attention operands: q, k, v, mask"),
    "provenance": ("#c6dbef", "#2171b5", "provenance: pre-RoPE q/k, key projection"),
    "removed": ("#fcbba1", "#a50f15", "removed by the rewrite"),
    "new": ("#c7e9c0", "#238b45", "inserted by the rewrite"),
    "plain": ("#ffffff", "#636363", ""),
    "boundary": ("#f0f0f0", "#bdbdbd", "outside the drawn module"),
}
MAX_REGION = 140  # nodes drawn for one site at most (inputs and consumers at the border come on top)
MAX_BORDER = 14


def dot_available() -> Optional[str]:
    return shutil.which("dot")


def region(snap: GraphSnapshot, seeds: Iterable[str], module: str = "", limit: int = MAX_REGION):
    """The nodes to draw around `seeds`: everything in `module` (and its submodules) that the seeds depend on or
    feed, or, without a usable module, a bounded neighbourhood. Returns (core, inputs, outputs) name lists in graph
    order: `inputs`/`outputs` are the border nodes just outside the core."""
    seeds = [s for s in dict.fromkeys(seeds) if s in snap]
    order = snap.order()
    core: set = set()
    if module:
        prefix = module + "."
        core = {n for n, info in snap.nodes.items()
                if (info.module == module or info.module.startswith(prefix)) and info.op != "output"}
        if len(core) > limit:
            core = set()
    if not core:
        core = _neighbourhood(snap, seeds, limit)
    core.update(seeds)
    if len(core) > limit:  # keep the nodes closest to the seeds
        keep = _neighbourhood(snap, seeds, limit)
        core = keep | set(seeds)
    inputs, outputs = [], []
    for name in core:
        info = snap[name]
        inputs += [i for i in info.inputs if i not in core]
        outputs += [u for u in info.users if u not in core and snap[u].op != "output"]
    inputs = sorted(set(inputs), key=order.get)[:MAX_BORDER]
    outputs = sorted(set(outputs), key=order.get)[:MAX_BORDER]
    return sorted(core, key=order.get), inputs, outputs


def _neighbourhood(snap: GraphSnapshot, seeds, limit, back=8, forward=3) -> set:
    """Breadth-first from the seeds: up to `back` steps to producers and `forward` steps to consumers."""
    seen = set(seeds)
    for direction, depth in (("inputs", back), ("users", forward)):
        frontier = deque((s, 0) for s in seeds)
        while frontier and len(seen) < limit:
            name, d = frontier.popleft()
            if d >= depth:
                continue
            for nxt in getattr(snap[name], direction):
                if nxt in snap and nxt not in seen and snap[nxt].op != "output":
                    seen.add(nxt)
                    frontier.append((nxt, d + 1))
    return seen


def _q(text) -> str:
    """A DOT string literal."""
    s = str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{s}"'


def _rel(module: str, base: str) -> str:
    if base and module.startswith(base + "."):
        return module[len(base) + 1:]
    return module


def _tooltip(info: NodeInfo) -> str:
    loc = info.location
    lines = [f"{info.name} = {info.target}({info.args})" if info.op not in ("placeholder",) else
             f"{info.name}: graph input", f"type: {info.type_text() or '?'}", f"module: {info.module or '-'}"
             + (f" ({info.module_class})" if info.module_class else "")]
    if loc:
        lines.append(f"source: {loc.where()} in {loc.function}")
        if loc.code:
            lines.append(f"  {loc.code}")
    return "\n".join(lines)[:600]


def subgraph_dot(snap: GraphSnapshot, core, inputs=(), outputs=(), *, roles: Optional[dict] = None,
                 base_module: str = "", title: str = "", gid: str = "g", prefix: str = "") -> str:
    """DOT for one region: module clusters, highlighted roles, shape/dtype on every edge."""
    roles = roles or {}
    core_set = set(core)
    lines = [f"digraph {_q(gid)} {{",
             f'  graph [id={_q(gid)} rankdir=TB fontname="Helvetica" fontsize=11 nodesep=0.25 ranksep=0.35 '
             f'label={_q(title)} labelloc=t labeljust=l tooltip={_q(title or gid)}];',
             '  node [shape=box style="rounded,filled" fontname="Helvetica" fontsize=10 height=0.3 margin="0.08,0.03"];',
             '  edge [fontname="Helvetica" fontsize=8 fontcolor="#555555" color="#737373" arrowsize=0.6];']

    def node_line(name, border=False, home=None):
        info = snap[name]
        role = "boundary" if border else roles.get(name, "plain")
        fill, line, _ = ROLE_STYLE[role]
        mod = _rel(info.module, base_module)
        if info.op == "placeholder":
            label, shape = info.label, "note"
        else:
            label = info.label if border or info.name == info.label else f"{info.label}\n{info.name}"
            shape = "box"
            if not border and mod and mod != home:
                label += f"\n[{_rel(mod, home) if home else mod}]"
        if border and mod and info.op != "placeholder":
            label += f"\n[{mod}]"
        extra = ' penwidth=2' if role in ("matched", "new", "partial", "removed") else ""
        if role == "removed":
            extra += ' style="rounded,filled,dashed"'
        cls = f"node {role}"
        return (f'{_q(prefix + name)} [id={_q(gid + "-" + name)} class={_q(cls)} label={_q(label)} shape={shape} '
                f'fillcolor={_q(fill)} color={_q(line)} tooltip={_q(_tooltip(info))}{extra}];')

    # clusters: one per module (relative to base_module) holding at least two drawn nodes, nested by path; a node
    # of a smaller submodule (a lone q_proj linear) goes into its nearest clustered ancestor, its module named
    by_module: dict = {}
    for name in core:
        by_module.setdefault(_rel(snap[name].module, base_module), []).append(name)
    clustered = {m for m, names in by_module.items() if m and (len(names) >= 2 or "." not in m)}
    home: dict = {}
    for name in core:
        mod = _rel(snap[name].module, base_module)
        home[name] = next((c for c in sorted(clustered, key=len, reverse=True) if mod == c or mod.startswith(c + ".")),
                          "")
    tree: dict = {}
    for m in sorted(clustered):
        parent = next((p for p in sorted(clustered, key=len, reverse=True) if m.startswith(p + ".")), "")
        tree.setdefault(parent, []).append(m)
    members: dict = {}
    for name in core:
        members.setdefault(home[name], []).append(name)

    def emit_cluster(m, indent):
        pad = "  " * indent
        cid = f"{gid}-cluster-{m}"
        lines.append(f'{pad}subgraph {_q("cluster_" + prefix + m)} {{')
        lines.append(f'{pad}  graph [id={_q(cid)} label={_q(m)} style="rounded,filled" fillcolor="#f7f7f7" '
                     f'color="#bdbdbd" fontsize=10 tooltip={_q(m)}];')
        for name in members.get(m, []):
            lines.append(pad + "  " + node_line(name, home=m))
        for child in tree.get(m, []):
            emit_cluster(child, indent + 1)
        lines.append(pad + "}")

    for m in tree.get("", []):
        emit_cluster(m, 1)
    for name in members.get("", []):
        lines.append("  " + node_line(name, home=""))
    for name in list(inputs) + list(outputs):
        lines.append("  " + node_line(name, border=True))

    drawn = core_set | set(inputs) | set(outputs)
    n_edge = 0
    for name in list(inputs) + list(core):
        for user in snap[name].users:
            if user in drawn and (user in core_set or name in core_set):
                n_edge += 1
                t = snap[name].type_text()
                label = f" label={_q(t)}" if t else ""
                lines.append(f'  {_q(prefix + name)} -> {_q(prefix + user)} [id={_q(f"{gid}-e{n_edge}")}{label} '
                             f'tooltip={_q(name + " -> " + user + ": " + (t or "?"))}];')
    lines.append("}")
    return "\n".join(lines)



def render_svgs(dots: list, timeout: float = 120.0) -> list:
    """Lay out each DOT source with Graphviz `dot`, batched over a few parallel processes; SVG text per input
    (None where Graphviz is missing or failed on that graph)."""
    exe = dot_available()
    if not dots:
        return []
    if exe is None:
        return [None] * len(dots)
    workers = max(1, min(len(dots), os.cpu_count() or 1))
    batches = [list(range(i, len(dots), workers)) for i in range(workers)]

    def run(batch):
        src = "\n".join(dots[i] for i in batch)
        try:
            out = subprocess.run([exe, "-Tsvg"], input=src.encode(), capture_output=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired):
            return [None] * len(batch)
        docs = _split_svgs(out.stdout.decode("utf-8", "replace"))
        if out.returncode != 0 or len(docs) != len(batch):
            return [_render_one(exe, dots[i], timeout) for i in batch]
        return docs

    result: list = [None] * len(dots)
    with ThreadPoolExecutor(workers) as pool:
        for batch, svgs in zip(batches, pool.map(run, batches)):
            for i, svg in zip(batch, svgs):
                result[i] = svg
    return result


def _render_one(exe, dot_text, timeout):
    try:
        out = subprocess.run([exe, "-Tsvg"], input=dot_text.encode(), capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    docs = _split_svgs(out.stdout.decode("utf-8", "replace"))
    return docs[0] if out.returncode == 0 and docs else None


def _split_svgs(text: str) -> list:
    """`dot -Tsvg` on several graphs writes several SVG documents; keep each `<svg …>…</svg>` element."""
    docs, pos = [], 0
    while True:
        start = text.find("<svg", pos)
        if start < 0:
            return docs
        end = text.find("</svg>", start)
        if end < 0:
            return docs
        docs.append(text[start:end + len("</svg>")])
        pos = end + 6


def render_svg(dot_text: str) -> Optional[str]:
    return render_svgs([dot_text])[0]
