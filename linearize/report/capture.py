"""What `linearize.explain` records beside the pass contexts: graph snapshots before and after the rewrite, the
graphs themselves (for numerics), Dynamo's graph breaks, and the facts a report shows about each site."""
from __future__ import annotations

import ast
import functools
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch.fx as fx

from .snapshot import Frame, GraphSnapshot, frames_of, parse_stack, short_path, snapshot


REWRITE_STAGE = "rewrite_sites"  # the pass that replaces site output nodes


@dataclass
class Capture:
    """One captured graph: its snapshots before the first pass and after the last, and how its sites map."""

    graph_id: int
    before: Optional[GraphSnapshot] = None
    after: Optional[GraphSnapshot] = None
    site_outputs: list = field(default_factory=list)  # original output node name of each site, in ctx.sites order
    site_classes: list = field(default_factory=list)  # the attention module's class of each site (or None)
    original: Any = None  # a GraphModule over a copy of the input graph (kept only for numerics)
    rewritten: Any = None  # the rewritten GraphModule (kept only for numerics)
    example_inputs: Any = None
    compile_reason: Optional[str] = None  # why Dynamo ended this graph (a graph break's reason, or return_value)
    ctx: Any = None


class Recorder:
    """An `options.observe` hook for one graph: snapshots the graph before the passes and after the last one."""

    def __init__(self, capture: Capture, last_stage: str, keep_graphs: bool = False):
        self.capture, self.last_stage, self.keep_graphs = capture, last_stage, keep_graphs
        self.rewritten = False

    def __call__(self, stage: str, gm, ctx) -> None:
        cap = self.capture
        cap.ctx = ctx
        if stage == "input":
            cap.before = snapshot(gm.graph, "before", ctx.graph_id)
            if self.keep_graphs:
                graph = fx.Graph()
                out = graph.graph_copy(gm.graph, {})
                graph.output(out)
                cap.original = fx.GraphModule(gm, graph)
        if stage == REWRITE_STAGE:
            self.rewritten = True
        elif not self.rewritten:
            # until the rewrite pass runs, the sites point at their original output nodes
            cap.site_outputs = [s.node.name for s in ctx.sites]
            cap.site_classes = [_module_class(s.node) for s in ctx.sites]
        if stage == self.last_stage:
            if not cap.site_outputs:
                cap.site_outputs = [s.matched_nodes[-1].name if s.matched_nodes else s.node.name for s in ctx.sites]
            fill = {}
            for s, old in zip(ctx.sites, cap.site_outputs):
                info = cap.before.get(old) if cap.before else None
                if info is not None:
                    fill[s.node.name] = (info.shape, info.dtype)
            cap.after = snapshot(gm.graph, "after", ctx.graph_id, fill=fill)
            if self.keep_graphs:
                cap.rewritten = gm


def _module_class(node):
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][1] if stack else None


# ----- graph breaks ---------------------------------------------------------------------------------------------

@dataclass
class GraphBreak:
    reason: str  # Dynamo's message, first paragraph
    detail: str  # the whole message
    frames: list  # Frame, outermost first
    in_attention: Optional[str] = None  # which attention code the break lies in, when it does
    anchor: Optional[str] = None  # the HTML anchor of that site / near-miss

    @property
    def location(self) -> Optional[Frame]:
        return self.frames[-1] if self.frames else None

    def summary(self) -> dict:
        loc = self.location
        return {"reason": self.reason, "location": loc.where() if loc else None,
                "function": loc.function if loc else None, "code": loc.code if loc else None,
                "in_attention": self.in_attention}


def collect_graph_breaks(reasons, sites_with_frames) -> list:
    """Deduplicated graph breaks from Dynamo's GraphCompileReason list; each is checked against the attention
    code of every site / near-miss (`sites_with_frames`: (label, module class or None, [Frame], anchor)) to say
    whether it cuts through attention."""
    out, seen = [], set()
    for r in reasons:
        if not getattr(r, "graph_break", True):
            continue
        frames = frames_of(r.user_stack)
        # Dynamo reports a break in an inlined call twice (first with the caller's frames, then from the callee's
        # own frame): keep the first, which has the longer stack
        key = (r.reason, (frames[-1].file, frames[-1].line) if frames else None)
        if key in seen:
            continue
        seen.add(key)
        detail = str(r.reason).strip()
        first = detail.split("\n\n", 1)[0].strip()
        brk = GraphBreak(reason=first, detail=detail, frames=frames)
        hit = _attention_hit(frames, sites_with_frames)
        if hit is not None:
            brk.in_attention, brk.anchor = hit
        out.append(brk)
    return out


def _attention_hit(break_frames, sites_with_frames) -> Optional[tuple]:
    for label, cls, site_frames, *anchor in sites_with_frames:
        extents = []
        ext = _forward_extent(cls) if cls is not None else None
        if ext:
            extents.append(ext)
        elif site_frames:  # no module (e.g. a graph resumed after a break): the function that made the site
            inner = site_frames[-1]
            fn = enclosing_function(inner.file, inner.line)
            if fn:
                extents.append((inner.file, *fn))
        for file, lo, hi in extents:
            for f in break_frames:
                if _same_file(f.file, file) and lo <= f.line <= hi:
                    return label, (anchor[0] if anchor else None)
    return None


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return a == b


@functools.lru_cache(maxsize=64)
def _forward_extent(cls):
    try:
        fn = inspect.unwrap(cls.forward)
        lines, start = inspect.getsourcelines(fn)
        return inspect.getsourcefile(fn), start, start + len(lines) - 1
    except (TypeError, OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=64)
def _functions(file: str):
    try:
        tree = ast.parse(Path(file).read_text())
    except (OSError, SyntaxError, ValueError):
        return []
    return [(n.lineno, n.end_lineno) for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and n.end_lineno]


def enclosing_function(file: str, line: int):
    """(first, last) line of the innermost function in `file` containing `line`, or None."""
    best = None
    for lo, hi in _functions(file):
        if lo <= line <= hi and (best is None or hi - lo < best[1] - best[0]):
            best = (lo, hi)
    return best


# ----- rules ----------------------------------------------------------------------------------------------------

_RULE = re.compile(r"^(?P<file>.+?\.ya?ml)(?::(?P<line>\d+)(?::\d+)?)?:\s*rule\s+(?P<n>\d+)")


def rule_location(origin: Optional[str]) -> Optional[str]:
    """`/…/liger.yaml: rule 1` -> `linearize/rules/liger.yaml:10 (rule 1)`; other strings pass through."""
    if not origin:
        return None
    m = _RULE.match(origin)
    if not m:
        return origin
    file, n = m.group("file"), int(m.group("n"))
    line = int(m.group("line")) if m.group("line") else _rule_line(file, n)
    where = short_path(file) + (f":{line}" if line else "")
    rest = origin[m.end():].strip(" :")
    return f"{where} (rule {n})" + (f" {rest}" if rest else "")


@functools.lru_cache(maxsize=32)
def _rule_line(file: str, n: int) -> Optional[int]:
    try:
        import yaml

        root = yaml.compose(Path(file).read_text())
        for key, value in root.value:
            if key.value == "rules":
                return value.value[n - 1].start_mark.line + 1
    except Exception:  # noqa: BLE001 - the report must not fail on an odd rule file
        return None
    return None


# ----- per-site facts -------------------------------------------------------------------------------------------

def site_frames(site, capture: Optional[Capture], index: int) -> list:
    if capture is not None and capture.before is not None and index < len(capture.site_outputs):
        info = capture.before.get(capture.site_outputs[index])
        if info is not None:
            return info.frames
    nodes = site.matched_nodes or [site.node]
    return parse_stack(nodes[-1].meta.get("stack_trace"))


def model_frame(frames: list) -> Optional[Frame]:
    """The frame that best names "the model code": the innermost frame outside torch itself."""
    for f in reversed(frames):
        if "/torch/" not in f.file.replace("\\", "/"):
            return f
    return frames[-1] if frames else None
