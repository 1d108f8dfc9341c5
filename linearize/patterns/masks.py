"""What a mask is made of: constants, and whether a tensor only hides keys (0 / -inf / bool) or adds values."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx

from .expr import canonical_name
from .graph import value
from .layout import skip_casts

LARGE_NEGATIVE = -1e4  # fill values at or below this hide a key


def constant(x) -> Optional[float]:
    """A Python number, or a node Dynamo built from constants only (`torch.full([], c)`, `torch.tensor(c)`)."""
    x = skip_casts(x) if isinstance(x, fx.Node) else x
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if isinstance(x, fx.Node) and x.op == "call_function":
        name = canonical_name(x)
        if name == "full" and len(x.args) >= 2:
            return constant(x.args[1])
        if name in ("tensor", "scalar_tensor", "as_tensor") and x.args:
            return constant(x.args[0])
        if name == "sqrt" and x.args:
            inner = constant(x.args[0])
            return math.sqrt(inner) if inner is not None else None
    return None


_LAYOUT = ("to", "float", "half", "bfloat16", "contiguous", "clone", "expand", "getitem", "view", "reshape",
           "slice", "unsqueeze", "expand_as", "type_as", "squeeze", "permute", "transpose", "repeat")


def is_hiding_mask(node, depth: int = 0) -> bool:
    """True when every value of `node` is 0 (attend) or very negative (hide), or it is boolean: a mask built from
    booleans, constants and inputs only. False for anything that carries real values (ALiBi slopes times
    distances, masks computed from activations as in Doge), which rewrites must not drop."""
    c = constant(node)
    if c is not None:
        return c == 0.0 or c <= LARGE_NEGATIVE
    if not isinstance(node, fx.Node) or depth > 32:
        return False
    val = value(node)
    if node.op == "placeholder" or (val is not None and val.dtype == torch.bool):
        return True  # a caller's mask (checked at run time by causal rewrites), or booleans
    name, args = canonical_name(node), node.args
    if name == "where" and len(args) == 3:
        return is_hiding_mask(args[1], depth + 1) and is_hiding_mask(args[2], depth + 1)
    if name == "masked_fill" and len(args) == 3:
        return is_hiding_mask(args[0], depth + 1) and is_hiding_mask(args[2], depth + 1)
    if name == "mul" and len(args) == 2:  # (1 - mask) * min: a {0, 1} tensor times a very negative constant
        for a, b in (args, args[::-1]):
            if constant(b) is not None and constant(b) <= LARGE_NEGATIVE and is_binary(a, depth + 1):
                return True
        return all(is_hiding_mask(a, depth + 1) for a in args)
    if name == "add":
        return all(is_hiding_mask(a, depth + 1) for a in args)
    if name in ("full", "full_like") and len(args) >= 2:
        return is_hiding_mask(args[1], depth + 1)
    if name in ("zeros", "zeros_like", "new_zeros"):
        return True
    if name in _LAYOUT:
        return is_hiding_mask(args[0], depth + 1) if args else False
    return False


def is_binary(node, depth: int = 0) -> bool:
    """Values in {0, 1}: booleans, an input mask, or `1 - x` / casts / reshapes of such."""
    c = constant(node)
    if c is not None:
        return c in (0.0, 1.0)
    if not isinstance(node, fx.Node) or depth > 32:
        return False
    val = value(node)
    if node.op == "placeholder" or (val is not None and val.dtype == torch.bool):
        return True
    name, args = canonical_name(node), node.args
    if name in ("sub", "rsub") and len(args) == 2:
        return constant(args[0]) == 1.0 and is_binary(args[1], depth + 1)
    if name in _LAYOUT:
        return is_binary(args[0], depth + 1) if args else False
    return False
