"""`where:` selectors: which sites a rule applies to.

    where:
      layers: "0-3, 28-29, -1"     # ranges, single layers, negative = from the last layer; or [0, 1, "-2..-1"]
      layers: {every: 8, offset: 7} # every 8th layer starting at 7 (7, 15, 23, ...)
      module: "model.layers.*.self_attn"   # fnmatch glob on the module path (or a list of globs)
      causal: true                  # causal self-attention only (false: non-causal only)
      head_dim: 64                  # or a list; also heads, kv_heads, gqa (query heads per KV head)
      shape: "head_dim % 16 == 0 and seq_len >= 128"   # sympy-checked constraints (a string or a list)

All conditions must hold. Layer numbers resolve against the number of layers in the captured graph (the highest
layer index seen in it, plus one), so negative indices and `every` work for any depth.
"""
from __future__ import annotations

import fnmatch
import re
import weakref
from dataclasses import dataclass, field
from typing import Optional

from . import shape_expr
from .diagnostics import Mark, RuleError, suggest
from .yamlsource import YList, YMap

WHERE_KEYS = {
    "layers": "layer indices: \"0-3, 28-29\", -1 for the last layer, [0, 5], or {every: 8, offset: 7}",
    "module": "glob(s) on the module path, e.g. \"model.layers.*.self_attn\"",
    "causal": "true: causal self-attention only; false: non-causal only",
    "head_dim": "head dimension(s) of q and k",
    "heads": "number(s) of query heads",
    "kv_heads": "number(s) of key/value heads",
    "gqa": "query heads per KV head (1 = multi-head attention)",
    "shape": "constraint(s) over batch, heads, kv_heads, gqa, seq_len, kv_len, head_dim, value_dim, layer, "
             "num_layers, e.g. \"head_dim % 16 == 0\"",
}
INT_KEYS = ("head_dim", "heads", "kv_heads", "gqa")
_RANGE = re.compile(r"^(-?\d+)\s*(?:-|\.\.)\s*(-?\d+)$")
_EVERY = re.compile(r"^every\s+(\d+)(?:\s+(?:from|offset)\s+(\d+))?$")
LAYER_HINT = 'write e.g. `layers: "0-3, 28-29"`, `layers: -1`, or `layers: {every: 8, offset: 7}`'
PROBE_DEPTHS = range(1, 129)  # model depths over which selectors are compared


# ------------------------------------------------------------------------------------------------ layers
@dataclass(frozen=True)
class LayerItem:
    lo: int
    hi: int  # inclusive; negative = counted from the end
    every: int = 1

    def resolve(self, n: int) -> set:
        lo = self.lo + n if self.lo < 0 else self.lo
        hi = self.hi + n if self.hi < 0 else self.hi
        return {i for i in range(max(lo, 0), min(hi, n - 1) + 1) if (i - lo) % self.every == 0}


@dataclass(frozen=True)
class LayerSelector:
    items: tuple
    text: str

    def resolve(self, num_layers: int) -> set:
        out = set()
        for item in self.items:
            out |= item.resolve(num_layers)
        return out

    def selects(self, layer: Optional[int], num_layers: int) -> bool:
        return layer is not None and layer in self.resolve(num_layers)


def parse_layers(spec, mark: Mark) -> LayerSelector:
    items = []
    _layer_items(spec, mark, items)
    if not items:
        raise RuleError("`layers:` selects no layer", mark, LAYER_HINT)
    sel = LayerSelector(tuple(items), _describe(spec))
    if not any(sel.resolve(n) for n in PROBE_DEPTHS):
        raise RuleError(f"`layers: {sel.text}` selects no layer of any model", mark, LAYER_HINT)
    return sel


def _describe(spec) -> str:
    if isinstance(spec, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in spec.items()) + "}"
    if isinstance(spec, list):
        return "[" + ", ".join(_describe(s) for s in spec) + "]"
    return str(spec)


def _layer_items(spec, mark: Mark, items: list) -> None:
    if isinstance(spec, bool) or spec is None or isinstance(spec, float):
        raise RuleError(f"bad layer selector {spec!r}", mark, LAYER_HINT)
    if isinstance(spec, int):
        items.append(LayerItem(spec, spec))
    elif isinstance(spec, YList) or isinstance(spec, list):
        if not spec:
            raise RuleError("`layers: []` selects no layer", mark, LAYER_HINT)
        for i, sub in enumerate(spec):
            sub_mark = spec.item_mark(i) if isinstance(spec, YList) else mark
            _layer_items(sub, sub_mark, items)
    elif isinstance(spec, dict):
        items.append(_every(spec, mark))
    elif isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",")]
        for part in parts:
            items.append(_layer_text(part, spec, mark))
    else:
        raise RuleError(f"bad layer selector {spec!r}", mark, LAYER_HINT)


def _layer_text(part: str, whole: str, mark: Mark) -> LayerItem:
    at = mark.shifted(max(whole.find(part), 0))
    if not part:
        raise RuleError(f"empty item in layer list {whole!r}", at, "remove the extra comma")
    if re.fullmatch(r"-?\d+", part):
        n = int(part)
        return LayerItem(n, n)
    m = _RANGE.match(part)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        if (lo >= 0) == (hi >= 0) and hi < lo:
            raise RuleError(f"layer range `{part}` is empty: it ends before it starts", at,
                            f"write `{hi}-{lo}`" if lo >= 0 else f"write `{hi}..{lo}`")
        return LayerItem(lo, hi)
    m = _EVERY.match(part)
    if m:
        every, offset = int(m.group(1)), int(m.group(2) or 0)
        if every < 1:
            raise RuleError("`every 0` selects nothing", at, "`every` is a positive step")
        return LayerItem(offset, -1, every)
    if re.fullmatch(r"-?\d+\s*-\s*", part) or re.fullmatch(r"\s*-\s*\d+", part):
        raise RuleError(f"layer range `{part}` is missing an end", at, 'write both ends, e.g. `"4-7"`, or `"4..-1"`')
    raise RuleError(f"bad layer selector `{part}`", at, LAYER_HINT)


def _every(spec: dict, mark: Mark) -> LayerItem:
    known = ("every", "offset", "from", "to")
    for key in spec:
        if key not in known:
            km = spec.key_mark(key) if isinstance(spec, YMap) else mark
            raise RuleError(f"unknown key `{key}` in a layer selector", km,
                            suggest(key, known) or "keys: every, offset (alias from), to")
    if "every" not in spec:
        raise RuleError("a layer mapping needs `every`", mark, "write `{every: 4}` or `{every: 8, offset: 7}`")
    if "offset" in spec and "from" in spec:
        raise RuleError("give `offset` or `from`, not both", mark, "they mean the same: the first layer selected")
    vals = {}
    for key in ("every", "offset", "from", "to"):
        if key not in spec:
            continue
        val = spec[key]
        vm = spec.value_mark(key) if isinstance(spec, YMap) else mark
        if not isinstance(val, int) or isinstance(val, bool):
            raise RuleError(f"`{key}:` must be an integer, got {val!r}", vm)
        if key == "every" and val < 1:
            raise RuleError(f"`every: {val}` must be at least 1", vm, "every: 1 selects every layer")
        vals[key] = val
    start = vals.get("offset", vals.get("from", 0))
    end = vals.get("to", -1)
    if (start >= 0) == (end >= 0) and end < start:
        raise RuleError(f"`to: {end}` is before the first selected layer {start}", mark)
    return LayerItem(start, end, vals["every"])


# ------------------------------------------------------------------------------------------------ where
@dataclass
class Where:
    layers: Optional[LayerSelector] = None
    modules: Optional[tuple] = None  # globs
    causal: Optional[bool] = None
    ints: dict = field(default_factory=dict)  # head_dim/heads/kv_heads/gqa -> frozenset
    shape: tuple = ()  # ShapeExpr constraints

    def why_not(self, site, values: dict) -> Optional[str]:
        """None if every condition holds at the site, else the first that does not."""
        if self.layers is not None and not self.layers.selects(site.layer, values["num_layers"]):
            return f"layer {site.layer} not in `layers: {self.layers.text}`"
        if self.modules is not None and not any(fnmatch.fnmatchcase(site.module_path or "", g)
                                                for g in self.modules):
            return f"module {site.module_path!r} does not match {', '.join(self.modules)}"
        if self.causal is not None and bool(site.is_causal) != self.causal:
            return "attention is not causal" if self.causal else "attention is causal"
        for key, allowed in self.ints.items():
            got = values.get(key)
            if got is None or int(got) not in allowed:
                return f"{key} {got} not in {sorted(allowed)}"
        for c in self.shape:
            if not c.evaluate(values):
                return f"`{c.text}` does not hold"
        return None

    def covers(self, other: "Where") -> bool:
        """True if every site `other` selects is selected by this one (then a rule after it cannot fire)."""
        if self.layers is not None:
            if other.layers is None:
                return False
            if not all(other.layers.resolve(n) <= self.layers.resolve(n) for n in PROBE_DEPTHS):
                return False
        if self.modules is not None:
            if other.modules is None:
                return False
            for glob in other.modules:
                if not any(a == glob or a == "*" or (not _has_wildcard(glob) and fnmatch.fnmatchcase(glob, a))
                           for a in self.modules):
                    return False
        if self.causal is not None and other.causal != self.causal:
            return False
        for key, allowed in self.ints.items():
            if key not in other.ints or not other.ints[key] <= allowed:
                return False
        mine = {str(c.expr) for c in self.shape}
        return mine <= {str(c.expr) for c in other.shape}

    def describe(self) -> str:
        parts = []
        if self.layers is not None:
            parts.append(f"layers {self.layers.text}")
        if self.modules is not None:
            parts.append(f"module {', '.join(self.modules)}")
        if self.causal is not None:
            parts.append("causal" if self.causal else "non-causal")
        parts += [f"{k} in {sorted(v)}" for k, v in self.ints.items()]
        parts += [c.text for c in self.shape]
        return "; ".join(parts) or "every site"


def _has_wildcard(glob: str) -> bool:
    return any(ch in glob for ch in "*?[")


def parse_where(spec, mark: Mark) -> Where:
    if spec is None:
        return Where()
    if not isinstance(spec, YMap):
        raise RuleError(f"`where:` must be a mapping, got {_kind(spec)}", mark,
                        "e.g. `where: {layers: \"0-3\", causal: true}`")
    where = Where()
    for key, val in spec.items():
        km, vm = spec.key_mark(key), spec.value_mark(key)
        if key not in WHERE_KEYS:
            raise RuleError(f"unknown key `{key}` in `where:`", km,
                            suggest(key, WHERE_KEYS) or f"keys: {', '.join(WHERE_KEYS)}")
        if key == "layers":
            where.layers = parse_layers(val, vm)
        elif key == "module":
            globs = val if isinstance(val, list) else [val]
            for i, g in enumerate(globs):
                if not isinstance(g, str) or not g.strip():
                    gm = val.item_mark(i) if isinstance(val, YList) else vm
                    raise RuleError(f"`module:` takes glob strings, got {g!r}", gm,
                                    'e.g. `module: "model.layers.*.self_attn"`')
            if not globs:
                raise RuleError("`module: []` selects nothing", vm, "give at least one glob")
            where.modules = tuple(globs)
        elif key == "causal":
            if not isinstance(val, bool):
                raise RuleError(f"`causal:` must be true or false, got {val!r}", vm)
            where.causal = val
        elif key in INT_KEYS:
            vals = val if isinstance(val, list) else [val]
            for i, v in enumerate(vals):
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    im = val.item_mark(i) if isinstance(val, YList) else vm
                    raise RuleError(f"`{key}:` takes positive integers, got {v!r}", im,
                                    f"e.g. `{key}: 64` or `{key}: [64, 128]`; for conditions use "
                                    f"`shape: \"{key} % 16 == 0\"`")
            if not vals:
                raise RuleError(f"`{key}: []` selects nothing", vm)
            where.ints[key] = frozenset(vals)
        elif key == "shape":
            texts = val if isinstance(val, list) else [val]
            exprs = []
            for i, t in enumerate(texts):
                tm = val.item_mark(i) if isinstance(val, YList) else vm
                c = shape_expr.parse(t, tm, boolean=True)
                if shape_expr.always(c) is False:
                    raise RuleError(f"`{t}` can never hold, so this rule never fires", tm,
                                    "dimensions are positive integers and layers non-negative")
                exprs.append(c)
            where.shape = tuple(exprs)
    return where


def _kind(val) -> str:
    if isinstance(val, list):
        return "a list"
    if isinstance(val, str):
        return f"the string {val!r}"
    return repr(val)


# ------------------------------------------------------------------------------------------- site values
_num_layers_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def num_layers(site) -> int:
    """Layers in the site's graph: highest layer index in any node's module path, plus one."""
    from ..patterns.graph import layer_index, module_path

    graph = getattr(site.node, "graph", None)
    if graph is None:
        return (site.layer or 0) + 1
    if graph not in _num_layers_cache:
        top = -1
        for node in graph.nodes:
            idx = layer_index(module_path(node))
            if idx is not None:
                top = max(top, idx)
        _num_layers_cache[graph] = top + 1
    return max(_num_layers_cache[graph], (site.layer or 0) + 1)


def site_values(site) -> dict:
    """The variables of shape expressions at a site."""
    B, Hq, Hkv, L, S, D, Dv = site.shape
    values = {"batch": B, "heads": Hq, "kv_heads": Hkv, "gqa": site.gqa_groups, "seq_len": L, "kv_len": S,
              "head_dim": D, "value_dim": Dv, "num_layers": num_layers(site)}
    if site.layer is not None:
        values["layer"] = site.layer
    return values
