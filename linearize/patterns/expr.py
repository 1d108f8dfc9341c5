"""Attention shapes as expression trees over FX nodes, matched like the math reads.

    matmul(softmax(mul(matmul($q, transpose($k, -2, -1)), $scale), dim=-1), $v)

is, in Python, `Op("matmul", Op("softmax", Op("mul", Op("matmul", Cap("q"), Op("transpose", Cap("k"), -2, -1)),
Cap("scale")), dim=-1), Cap("v"))`. Rule files compile their `patterns:` into these same objects.

Matching looks through value-preserving ops between any two levels (dtype casts, `contiguous`, dropout that is off),
so a pattern states the math, not every cast a model happens to write. `Alt` gives alternatives;
commutative ops (add, mul) match either operand order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.fx as fx

from .graph import op_name
from .layout import CASTS

# argument names of the ops patterns use, so `softmax(x, dim=-1)` matches `x.softmax(-1)` and `softmax(x, -1)`
SIGNATURES = {
    "softmax": ("input", "dim", "dtype"),
    "log_softmax": ("input", "dim", "dtype"),
    "transpose": ("input", "dim0", "dim1"),
    "permute": ("input", "dims"),
    "matmul": ("input", "other"),
    "bmm": ("input", "mat2"),
    "baddbmm": ("input", "batch1", "batch2", "beta", "alpha"),
    "mul": ("input", "other"),
    "div": ("input", "other"),
    "truediv": ("input", "other"),
    "add": ("input", "other"),
    "sub": ("input", "other"),
    "masked_fill": ("input", "mask", "value"),
    "where": ("condition", "input", "other"),
    "tanh": ("input",),
    "dropout": ("input", "p", "training", "inplace"),
    "einsum": ("equation", "operands"),
    "cat": ("tensors", "dim"),
    "getitem": ("input", "index"),
    "max": ("input", "dim", "keepdim"),
    "amax": ("input", "dim", "keepdim"),
}
COMMUTATIVE = {"add", "mul"}
ALIASES = {"truediv": "div", "div_": "div", "mul_": "mul", "add_": "add", "masked_fill_": "masked_fill",
           "__matmul__": "matmul"}


class Expr:
    """A node of a pattern."""


@dataclass(frozen=True)
class Cap(Expr):
    """A named capture: binds any value (node or constant); the same name must bind the same value."""

    name: str


@dataclass(frozen=True)
class Lit(Expr):
    """A constant argument that must equal `value` (ints and floats compare numerically)."""

    value: Any


@dataclass(frozen=True)
class Op(Expr):
    """An op node; `name` may be a tuple of alternatives ("matmul", "bmm")."""

    name: Union[str, tuple]
    args: tuple = ()
    kwargs: tuple = ()  # ((name, Expr), ...): a tuple so Op stays hashable

    def __init__(self, name, *args, **kwargs):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "args", tuple(_wrap(a) for a in args))
        object.__setattr__(self, "kwargs", tuple((k, _wrap(v)) for k, v in kwargs.items()))

    def names(self) -> tuple:
        return self.name if isinstance(self.name, tuple) else (self.name,)


@dataclass(frozen=True)
class Alt(Expr):
    """The first alternative that matches."""

    options: tuple

    def __init__(self, *options):
        object.__setattr__(self, "options", tuple(_wrap(o) for o in options))


def _wrap(x) -> Expr:
    return x if isinstance(x, Expr) else Lit(x)


@dataclass
class Match:
    captures: dict = field(default_factory=dict)
    nodes: list = field(default_factory=list)  # op nodes the pattern covered


def transparent(node) -> bool:
    """Ops that pass values through unchanged for matching purposes."""
    if not isinstance(node, fx.Node):
        return False
    name = op_name(node)
    if name in CASTS:
        return True
    if name in ("dropout", "dropout1d", "dropout2d", "native_dropout"):
        p = _normalized(node).get("p", 0.5)
        training = _normalized(node).get("training", True)
        return p == 0 or training is False
    return False


def canonical_name(node) -> Optional[str]:
    name = op_name(node)
    return ALIASES.get(name, name)


def _normalized(node: fx.Node) -> dict:
    """The node's arguments by name (positional ones named from SIGNATURES; `self` of a method is `input`)."""
    names = SIGNATURES.get(canonical_name(node), ())
    out = dict(node.kwargs)
    args = list(node.args)
    if canonical_name(node) == "einsum" and args and isinstance(args[0], str):
        out["equation"] = args[0]
        out["operands"] = tuple(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else tuple(args[1:])
        return out
    for i, a in enumerate(args):
        out[names[i] if i < len(names) else f"arg{i}"] = a
    if "self" in out:
        out["input"] = out.pop("self")
    return out


def match(expr: Expr, value, m: Optional[Match] = None) -> Optional[Match]:
    """Match `expr` against an FX node or constant; returns the bindings or None."""
    m = m if m is not None else Match()
    snapshot = (dict(m.captures), len(m.nodes))
    if _match(expr, value, m):
        return m
    m.captures, m.nodes[:] = snapshot[0], m.nodes[: snapshot[1]]
    return None


def _match(expr: Expr, value, m: Match) -> bool:
    if isinstance(expr, Alt):
        return any(match(o, value, m) is not None for o in expr.options)
    if isinstance(expr, Cap):
        if expr.name in m.captures:
            return _same(m.captures[expr.name], value)
        m.captures[expr.name] = value
        return True
    if isinstance(expr, Lit):
        return _same(expr.value, value)
    assert isinstance(expr, Op)
    while transparent(value) and canonical_name(value) not in expr.names():
        value = value.args[0]
    if not isinstance(value, fx.Node) or canonical_name(value) not in expr.names():
        return False
    args = _normalized(value)
    names = SIGNATURES.get(canonical_name(value), ())
    orders = [list(expr.args)]
    if canonical_name(value) in COMMUTATIVE and len(expr.args) == 2:
        orders.append(list(reversed(expr.args)))
    for order in orders:
        trial = Match(dict(m.captures), list(m.nodes))
        if _match_args(order, expr.kwargs, args, names, trial):
            m.captures, m.nodes[:] = trial.captures, trial.nodes + [value]
            return True
    return False


def _match_args(pos, kw, args: dict, names: tuple, m: Match) -> bool:
    for i, sub in enumerate(pos):
        key = names[i] if i < len(names) else f"arg{i}"
        if key not in args or match(sub, args[key], m) is None:
            return False
    for key, sub in kw:
        if key not in args or match(sub, args[key], m) is None:
            return False
    return True


def _same(a, b) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.dtype) or isinstance(b, torch.dtype):
        return a == b
    return a == b
