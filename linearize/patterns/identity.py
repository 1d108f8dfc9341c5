"""Which module, and which decoder layer, a graph node belongs to, however Dynamo spells the path.

Dynamo records `nn_module_stack` paths rooted at the compiled frame's local variable, and the spelling moves between
releases and call styles: `L['self'].model.layers[3].self_attn`, `L['self'].model.layers.3.self_attn`,
`L['args'][0].model.layers.3.self_attn` (a forward wrapped by a decorator), `L.args.0...`,
`L['self']._modules['model']._modules['layers']._modules['3']`, `getattr(L['self'].model.layers, '3')`,
`L['self'].__dict__['base_model']...` (peft).
Paths are parsed into components and the root (the local variable and any argument index after it) is dropped, so
what users see is the model's own `named_modules()` name (`model.layers.3.self_attn`). A node's layer is the index
that follows the container its decoder layers live in (`model.layers`), read from that cleaned path, never from
the first digit of a raw string (`args.0` made every site layer 0 on transformers 5.24).

Callers that hold the real model check the result against it (`verify_sites`): the module must exist there, be of
the class Dynamo recorded, and agree with its `layer_idx` when it has one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch.fx as fx

# bookkeeping attributes of nn.Module that Dynamo may spell out; the key that follows is the real name
_CONTAINERS = {"_modules", "_parameters", "_buffers", "__dict__"}
# wrappers that are not part of the user's model: torch.compile's OptimizedModule
_TRANSPARENT = {"_orig_mod"}
_TOKEN = re.compile(r"""\[\s*'([^']*)'\s*\]|\[\s*"([^"]*)"\s*\]|\[\s*(-?\d+)\s*\]|\.?([A-Za-z_][A-Za-z_0-9]*|\d+)""")
_GETATTR = re.compile(r"""getattr\(\s*(.+?)\s*,\s*['"]([^'"]+)['"]\s*\)""")


def path_parts(raw: str) -> tuple[str, ...]:
    """The components of a Dynamo module path, root included: "L['args'][0].model.layers[3]" ->
    ("L", "args", "0", "model", "layers", "3")."""
    while True:  # getattr(X, 'name') -> X.name, innermost first
        new = _GETATTR.sub(lambda m: f"{m.group(1)}.{m.group(2)}", raw)
        if new == raw:
            break
        raw = new
    parts = []
    for m in _TOKEN.finditer(raw):
        parts.append(next(g for g in m.groups() if g is not None))
    return tuple(p for p in parts if p not in _CONTAINERS)


def strip_root(parts: tuple[str, ...]) -> tuple[str, ...]:
    """Drop the frame-local root: `L`/`G`, the variable's name, and `args`/`kwargs` with their index or key."""
    if not parts or parts[0] not in ("L", "G"):
        return tuple(p for p in parts if p not in _TRANSPARENT)
    rest = list(parts[1:])
    name = rest.pop(0) if rest else None
    if name in ("args", "kwargs") and rest:
        rest.pop(0)
    elif name != "self" and rest and rest[0].isdigit():  # L['layers'][3]: a local list of layers names them
        rest.insert(0, name)
    return tuple(p for p in rest if p not in _TRANSPARENT)


def clean_path(raw: str) -> str:
    """A Dynamo path as the model's own dotted module name ("model.layers.3.self_attn")."""
    return ".".join(strip_root(path_parts(raw)))


def module_path(node: fx.Node) -> str:
    """Dotted path, relative to the compiled module, of the innermost module that produced `node`."""
    entry = innermost_module(node)
    return clean_path(entry[0]) if entry else ""


def innermost_module(node: fx.Node) -> Optional[tuple]:
    """`(raw path, class)` of the innermost entry of the node's `nn_module_stack`, or None."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    return path, cls


@dataclass(frozen=True)
class LayerId:
    """A decoder layer: the container its layers live in and its index there."""

    container: str  # "model.layers"
    index: int


def layer_id(path: str) -> Optional[LayerId]:
    """The first `<container>.<index>` in a cleaned module path: `model.layers.7.self_attn` -> (model.layers, 7).

    An index with no named container before it (a path that starts with a digit) identifies nothing."""
    parts = path.split(".") if path else []
    for i, part in enumerate(parts):
        if part.isdigit():
            return LayerId(".".join(parts[:i]), int(part)) if i > 0 else None
    return None


def layer_index(path: str) -> Optional[int]:
    lid = layer_id(path)
    return lid.index if lid else None


def duplicate_layers(sites) -> dict:
    """Sites that claim a layer another site also claims: {id(site): reason}. Such a layer cannot be told apart
    (a module called twice, or two layer lists with the same indices), so neither rules nor a cache may use it."""
    by_layer: dict = {}
    for s in sites:
        if s.layer is not None:
            by_layer.setdefault(s.layer, []).append(s)
    out = {}
    for layer, claims in by_layer.items():
        if len(claims) > 1:
            paths = ", ".join(f"{c.module_path or c.node.name} ({c.node.name})" for c in claims)
            for c in claims:
                out[id(c)] = (f"layer identity is ambiguous: {len(claims)} attention calls in this graph claim "
                              f"layer {layer} ({paths}); a per-layer rule or cache slot could not tell them apart")
    return out


class LayerIdentityError(ValueError):
    """A site's layer, as read from the graph, does not match the real model."""


def verify_sites(model, sites) -> None:
    """Check each site's module path and layer against the real model; raise naming the first disagreement."""
    modules = dict(model.named_modules(remove_duplicate=False))
    for s in sites:
        if not s.module_path:
            continue
        mod = modules.get(s.module_path)
        if mod is None:
            raise LayerIdentityError(
                f"linearize: the attention at {s.node.name} was traced inside {s.module_path!r}, which is not a "
                f"module of this {type(model).__name__}; its layer cannot be established")
        want = getattr(s, "module_class", None)
        if isinstance(want, type) and not isinstance(mod, want):
            raise LayerIdentityError(
                f"linearize: {s.module_path!r} is a {type(mod).__name__} in the model but Dynamo recorded a "
                f"{want.__name__} there")
        idx = getattr(mod, "layer_idx", None)
        if isinstance(idx, int) and s.layer is not None and idx != s.layer:
            raise LayerIdentityError(
                f"linearize: {s.module_path!r} reads as layer {s.layer} from its path but the module's layer_idx "
                f"is {idx}")
