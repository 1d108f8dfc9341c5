"""Plain-data copies of an FX graph at one moment (before / after the rewrite), for reports and drawings.

The passes mutate the graph in place, so what a report draws "before" has to be copied out before `rewrite_sites`
runs. A snapshot keeps, per node, what a reader needs: the op, the module it came from, the source line, the
output shape and dtype, and the data-flow edges. No tensors, no FX objects: snapshots are cheap (a 2,000-node graph
takes a few milliseconds) and safe to keep after Dynamo's caches are reset.
"""
from __future__ import annotations

import os
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from ..patterns.graph import module_path, op_name

_FRAME = re.compile(r'File "([^"]+)", line (\d+), in ([^\n]+)\n([^\n]*)')


@dataclass(frozen=True)
class Frame:
    file: str
    line: int
    function: str
    code: str = ""

    @property
    def short_file(self) -> str:
        return short_path(self.file)

    def where(self) -> str:
        return f"{self.short_file}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where()} in {self.function}"


def parse_stack(stack_trace: Optional[str]) -> list[Frame]:
    """Frames of an FX node's `meta["stack_trace"]`, outermost first."""
    if not stack_trace:
        return []
    return [Frame(f, int(n), fn.strip(), code.strip()) for f, n, fn, code in _FRAME.findall(stack_trace)]


def frames_of(frame_summaries) -> list[Frame]:
    """Frames from a list of `traceback.FrameSummary` (Dynamo's graph-break user stacks)."""
    out = []
    for fs in frame_summaries or ():
        out.append(Frame(fs.filename, int(fs.lineno or 0), fs.name, (fs.line or "").strip()))
    return out


def _roots() -> list[str]:
    roots = []
    for key in ("purelib", "platlib", "stdlib"):
        try:
            roots.append(sysconfig.get_paths()[key])
        except KeyError:
            pass
    roots += [p for p in sys.path if p and os.path.isdir(p)]
    roots.append(os.getcwd())
    return sorted({os.path.abspath(r) for r in roots}, key=len, reverse=True)


_ROOTS = None


def short_path(path: str) -> str:
    """`/…/site-packages/transformers/models/llama/modeling_llama.py` -> `transformers/models/llama/modeling_llama.py`."""
    global _ROOTS
    if _ROOTS is None:
        _ROOTS = _roots()
    ap = os.path.abspath(path)
    for root in _ROOTS:
        if ap.startswith(root + os.sep):
            return ap[len(root) + 1:]
    return path


def _dtype_name(dtype) -> str:
    return {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
            torch.int64: "i64", torch.int32: "i32", torch.bool: "bool", torch.int8: "i8",
            torch.uint8: "u8"}.get(dtype, str(dtype).replace("torch.", ""))


def _value_of(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def _shape_dtype(node: fx.Node):
    val = _value_of(node)
    if isinstance(val, torch.Tensor):
        try:
            shape = tuple(int(d) if not isinstance(d, torch.SymInt) else str(d) for d in val.shape)
        except Exception:  # noqa: BLE001 - unbacked symbols etc.
            shape = None
        return shape, _dtype_name(val.dtype)
    if isinstance(val, (tuple, list)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return None, f"tuple[{len(val)}]"
    return None, None


def _short(obj, limit=40) -> str:
    if isinstance(obj, fx.Node):
        return obj.name
    if isinstance(obj, (list, tuple)):
        inner = ", ".join(_short(o, limit) for o in obj)
        text = f"[{inner}]" if isinstance(obj, list) else f"({inner}{',' if len(obj) == 1 else ''})"
    elif isinstance(obj, float):
        text = f"{obj:.6g}"
    elif isinstance(obj, torch.dtype):
        text = _dtype_name(obj)
    else:
        text = repr(obj) if not callable(obj) else getattr(obj, "__name__", repr(obj))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _target_label(node: fx.Node) -> str:
    if node.op in ("call_function", "call_method"):
        return op_name(node) or str(node.target)
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "get_attr":
        return f"attr {node.target}"
    return node.op


def _placeholder_label(node: fx.Node, mod: str) -> str:
    """Parameters and buffers lifted by Dynamo read as `q_proj.weight` instead of their long flat names."""
    name = str(node.target)
    m = re.search(r"_(parameters|buffers)_([A-Za-z0-9_]+?)_?$", name)
    if m:
        leaf = mod.rsplit(".", 1)[-1] if mod else ""
        return f"{leaf}.{m.group(2)}" if leaf else m.group(2)
    return name


@dataclass
class NodeInfo:
    name: str
    op: str  # placeholder / call_function / call_method / call_module / get_attr / output
    target: str  # short op name ("linear", "scaled_dot_product_attention", "liger_attention")
    module: str  # innermost module path ("model.layers.3.self_attn")
    module_class: str
    stack: str  # the raw stack trace (parsed on demand)
    shape: Optional[tuple]
    dtype: Optional[str]
    inputs: list  # producer names, in argument order, without repeats
    users: list
    args: str  # short rendering of the call's arguments
    label: str  # what a drawing shows first
    site: Optional[int] = None  # meta["linearize_site"]: the layer of the site this node replaced, if any

    @property
    def frames(self) -> list[Frame]:
        return parse_stack(self.stack)

    @property
    def location(self) -> Optional[Frame]:
        """The innermost source frame (the line that made this node)."""
        frames = self.frames
        return frames[-1] if frames else None

    def type_text(self) -> str:
        if self.shape is None:
            return self.dtype or ""
        dims = "×".join(str(d) for d in self.shape) if self.shape else "scalar"
        return f"{dims} {self.dtype}" if self.dtype else dims


@dataclass
class GraphSnapshot:
    stage: str  # "input", "cleanup", ...
    graph_id: int
    nodes: dict = field(default_factory=dict)  # name -> NodeInfo, in graph order

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, name) -> bool:
        return name in self.nodes

    def __getitem__(self, name) -> NodeInfo:
        return self.nodes[name]

    def get(self, name) -> Optional[NodeInfo]:
        return self.nodes.get(name)

    def order(self) -> dict:
        return {name: i for i, name in enumerate(self.nodes)}


def snapshot(graph: fx.Graph, stage: str, graph_id: int = 0, fill: Optional[dict] = None) -> GraphSnapshot:
    """Copy what reports need out of `graph`. `fill`: name -> (shape, dtype) for nodes without recorded values."""
    snap = GraphSnapshot(stage, graph_id)
    fill = fill or {}
    for node in graph.nodes:
        shape, dtype = _shape_dtype(node)
        if shape is None and dtype is None and node.name in fill:
            shape, dtype = fill[node.name]
        inputs = list(dict.fromkeys(n.name for n in node.all_input_nodes))
        mod = module_path(node)
        stack = node.meta.get("nn_module_stack") or {}
        cls = list(stack.values())[-1][1] if stack else None
        cls_name = getattr(cls, "__name__", str(cls) if cls else "")
        if node.op == "placeholder":
            label, args = _placeholder_label(node, mod), ""
        else:
            label = _target_label(node)
            parts = [_short(a) for a in node.args] + [f"{k}={_short(v)}" for k, v in node.kwargs.items()]
            args = ", ".join(parts)
        snap.nodes[node.name] = NodeInfo(
            name=node.name, op=node.op, target=_target_label(node), module=mod, module_class=cls_name,
            stack=node.meta.get("stack_trace") or "", shape=shape, dtype=dtype, inputs=inputs,
            users=[u.name for u in node.users], args=args, label=label, site=node.meta.get("linearize_site"))
    return snap
