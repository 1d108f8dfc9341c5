"""Small, shared queries over Dynamo FX graphs (torch-level: call_function *and* call_method nodes)."""
from __future__ import annotations

import operator
from typing import Optional

import networkx as nx
import torch
import torch.fx as fx

from .identity import layer_index, module_path  # noqa: F401  (re-exported: the shared graph queries)

# An op is named the same whether Dynamo recorded `torch.transpose(x, ...)` or `x.transpose(...)`.
_FUNCTION_NAMES = {
    operator.add: "add",
    operator.mul: "mul",
    operator.truediv: "div",
    operator.itruediv: "div",
    operator.imul: "mul",
    operator.iadd: "add",
    operator.sub: "sub",
    operator.isub: "sub",
    operator.neg: "neg",
    operator.getitem: "getitem",
    operator.matmul: "matmul",
}


def op_name(node: fx.Node) -> Optional[str]:
    """A short op name for call_function / call_method nodes ("transpose", "linear", "softmax", ...)."""
    if node.op == "call_method":
        return str(node.target)
    if node.op != "call_function":
        return None
    if node.target in _FUNCTION_NAMES:
        return _FUNCTION_NAMES[node.target]
    name = getattr(node.target, "__name__", str(node.target))
    return name.split(".")[-1]


def is_op(node, *names: str) -> bool:
    return isinstance(node, fx.Node) and op_name(node) in names


def value(node) -> Optional[torch.Tensor]:
    """The fake example value Dynamo recorded for a node (None for non-tensors)."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("example_value", node.meta.get("val"))
    return val if isinstance(val, torch.Tensor) else None


def shape(node) -> Optional[tuple]:
    val = value(node)
    return tuple(val.shape) if val is not None else None


def arg(node: fx.Node, index: int, name: str, default=None):
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def data_graph(graph: fx.Graph) -> nx.DiGraph:
    """The graph's data-flow edges as a networkx DiGraph (edge: producer -> consumer)."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node)
        for inp in node.all_input_nodes:
            g.add_edge(inp, node)
    return g

