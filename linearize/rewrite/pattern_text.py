"""User-defined attention patterns in rule files: expression text -> the matcher's `Op`/`Cap`/`Lit` trees.

    patterns:
      plain: "matmul(softmax(mul(matmul($q, transpose($k, -2, -1)), $scale), dim=-1), $v)"
      exp_normalised:                        # softmax written out by hand: the library anchors on softmax ops
        let:
          s: "$q @ transpose($k, -2, -1) * $scale"
          e: "exp($s - amax($s, -1, keepdim=True))"
        expr: "($e / sum($e, -1, keepdim=True)) @ $v"
        where: "head_dim % 16 == 0"          # optional constraints on the matched site (sympy, as in rules)

An expression is a call tree: `op(arg, ..., name=value)` with op names as `linearize.patterns.graph.op_name`
gives them (matmul, softmax, transpose, mul, div, add, sub, exp, sum, amax, masked_fill, ...). `$q`, `$k`, `$v` are
required captures; `$scale` (a constant) and `$mask` are optional. Numbers, strings, True/False/None and tuples are
literals; `@ * / + -` are matmul, mul, div, add, sub; `alt(a, b)` matches either. A `let:` name used as `$name`
stands for its expression (each use must match the same graph values).

The text is parsed with Python's `ast` after each `$name` becomes an identifier; nothing is evaluated. Errors name
the file, line and column of the offending token.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Optional

from . import shape_expr
from .diagnostics import Mark, RuleError, suggest
from .yamlsource import YList, YMap

REQUIRED = ("q", "k", "v")
OPTIONAL = ("scale", "mask")
_CAP_PREFIX = "__cap_"
_DOLLAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_BINOPS = {ast.MatMult: "matmul", ast.Mult: "mul", ast.Div: "div", ast.Add: "add", ast.Sub: "sub"}
# ops the matcher knows argument names for, plus element-wise ops a hand-written attention uses
EXTRA_OPS = ("exp", "sum", "amax", "neg", "sqrt", "rsqrt", "reshape", "view", "expand", "unsqueeze", "squeeze",
             "float", "to", "contiguous", "tril", "triu", "repeat_interleave", "softmax", "log_softmax", "scaled_dot_product_attention",
             "pow", "mean", "sigmoid", "relu", "clamp", "minimum", "maximum", "flatten", "t", "logsumexp")


def known_ops() -> set:
    from ..patterns import expr as E

    return set(E.SIGNATURES) | set(E.ALIASES) | set(EXTRA_OPS)


def reserved_pattern_names() -> set:
    """Names of the built-in patterns (module-level `NAME`s of the pattern library)."""
    from .. import patterns as P

    lib = getattr(P, "PATTERNS", [])
    return {getattr(p, "NAME", getattr(p, "name", None)) for p in lib} - {None}


# ------------------------------------------------------------------------------------------------ parsing
def parse_expression(text, mark: Mark, lets: Optional[dict] = None, what: str = "pattern"):
    """Expression text -> Op/Cap/Lit/Alt tree. `lets`: name -> already parsed tree, substituted for `$name`."""
    from ..patterns.expr import Alt, Cap, Lit, Op

    lets = lets or {}
    if not isinstance(text, str):
        raise RuleError(f"a {what} is an expression in quotes, got {_kind(text)}", mark,
                        'e.g. "matmul(softmax(matmul($q, transpose($k, -2, -1)), dim=-1), $v)"')
    if not text.strip():
        raise RuleError(f"empty {what} expression", mark)
    # `$name` -> `__cap_name`, remembering for every character of the new text where it was in the original
    pieces, index, pos = [], [], 0
    for m in _DOLLAR.finditer(text):
        pieces.append(text[pos:m.start()])
        index.extend(range(pos, m.start()))
        ident = _CAP_PREFIX + m.group(1)
        pieces.append(ident)
        index.extend([m.start()] * len(ident))
        pos = m.end()
    pieces.append(text[pos:])
    index.extend(range(pos, len(text) + 1))
    src = "".join(pieces)

    def orig(col: int) -> int:
        return index[min(max(col, 0), len(index) - 1)]

    stray = src.find("$")
    if stray >= 0:
        raise RuleError("`$` must be followed by a capture name", mark.shifted(orig(stray)),
                        "captures are $q, $k, $v, $scale, $mask")
    if _CAP_PREFIX in text:
        raise RuleError(f"names starting with {_CAP_PREFIX} are reserved", mark)
    lead = len(src) - len(src.lstrip())

    def fail(node, message, hint=""):
        raise RuleError(message, mark.shifted(orig(getattr(node, "col_offset", 0) + lead)), hint)

    try:
        tree = ast.parse(src.strip(), mode="eval")
    except SyntaxError as exc:
        col = orig((exc.offset or 1) - 1 + lead)
        raise RuleError(f"bad {what} expression: {exc.msg}", mark.shifted(col),
                        "an expression is a call tree like `softmax(matmul($q, transpose($k, -2, -1)), dim=-1)`; "
                        "check the brackets and commas") from None
    ops = known_ops()

    def literal(node):
        try:
            return ast.literal_eval(node)
        except (ValueError, SyntaxError, TypeError):
            return _NOT_LITERAL

    def conv(node):
        if isinstance(node, ast.Name):
            if node.id.startswith(_CAP_PREFIX):
                name = node.id[len(_CAP_PREFIX):]
                if name in lets:
                    return lets[name]
                if name not in REQUIRED + OPTIONAL:
                    fail(node, f"unknown capture `${name}`",
                         suggest(name, REQUIRED + OPTIONAL + tuple(lets)) or
                         "captures are $q, $k, $v (required), $scale and $mask (optional), and `let:` names")
                return Cap(name)
            if node.id in ("inf", "nan"):
                return Lit(float(node.id))
            if node.id in ("True", "False", "None", "true", "false", "null"):
                return Lit({"True": True, "true": True, "False": False, "false": False}.get(node.id))
            fail(node, f"bare name `{node.id}` in a {what}",
                 f"captures start with `$` (did you mean `${node.id}`?)" if node.id in REQUIRED + OPTIONAL
                 else "ops are calls, `name(...)`; literals are numbers, strings, True/False/None")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                fail(node, "only plain op names can be called (`transpose($k, -2, -1)`, not methods)",
                     "write `op(x, ...)` instead of `x.op(...)`")
            name = node.func.id
            args = [conv(a) for a in node.args]
            if any(isinstance(a, ast.Starred) for a in node.args):
                fail(node, "`*args` is not allowed in a pattern")
            kwargs = {}
            for kw in node.keywords:
                if kw.arg is None:
                    fail(kw.value, "`**kwargs` is not allowed in a pattern")
                kwargs[kw.arg] = conv(kw.value)
            if name == "alt":
                if len(args) < 2 or kwargs:
                    fail(node, "`alt(a, b, ...)` takes two or more alternatives")
                return Alt(*args)
            if name not in ops:
                hint = suggest(name, ops)
                fail(node.func, f"unknown op `{name}`",
                     hint or f"ops: {', '.join(sorted(ops))}")
            return Op(name, *args, **kwargs)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return Op(_BINOPS[type(node.op)], conv(node.left), conv(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            val = literal(node)
            if val is not _NOT_LITERAL:
                return Lit(val)
            inner = conv(node.operand)
            if isinstance(inner, Lit) and isinstance(inner.value, (int, float)):
                return Lit(-inner.value)  # -inf
            return Op("neg", inner)
        val = literal(node)
        if val is not _NOT_LITERAL and not isinstance(val, (dict, set, bytes, complex)):
            return Lit(val)
        piece = ast.get_source_segment(src.strip(), node) or type(node).__name__
        fail(node, f"`{_restore(piece)}` is not allowed in a {what}",
             "use op calls, $captures, numbers, strings, tuples, and @ * / + -")

    return conv(tree.body)


_NOT_LITERAL = object()


def _restore(piece: str) -> str:
    return piece.replace(_CAP_PREFIX, "$")


def captures(tree) -> set:
    from ..patterns.expr import Alt, Cap, Op

    if isinstance(tree, Cap):
        return {tree.name}
    if isinstance(tree, Op):
        out = set()
        for a in tree.args:
            out |= captures(a)
        for _, a in tree.kwargs:
            out |= captures(a)
        return out
    if isinstance(tree, Alt):
        sets = [captures(o) for o in tree.options]
        return set.intersection(*sets) if sets else set()
    return set()


# ------------------------------------------------------------------------------------------------ patterns
@dataclass
class UserPattern:
    """A pattern from a rule file; `match(node)` works like a pattern-library module's."""

    name: str
    expr: object
    text: str
    mark: Mark
    source: str
    constraints: tuple = ()
    description: str = ""
    warnings: list = field(default_factory=list)

    @property
    def NAME(self) -> str:  # the pattern-library module interface
        return self.name

    def match(self, node):
        from .user_patterns import match_user_pattern

        return match_user_pattern(self, node)


def compile_pattern(name: str, spec, mark: Mark, source: str) -> UserPattern:
    lets, constraints, description = {}, (), ""
    if isinstance(spec, YMap):
        allowed = ("expr", "let", "where", "description")
        for key in spec:
            if key not in allowed:
                raise RuleError(f"unknown key `{key}` in pattern `{name}`", spec.key_mark(key),
                                suggest(key, allowed) or f"pattern keys: {', '.join(allowed)}")
        if "expr" not in spec:
            raise RuleError(f"pattern `{name}` has no `expr:`", mark,
                            'write `expr: "matmul(softmax(...), $v)"`')
        if "let" in spec:
            raw_lets = spec["let"]
            if not isinstance(raw_lets, YMap):
                raise RuleError("`let:` must map names to expressions", spec.value_mark("let"),
                                'e.g. `let: {s: "matmul($q, transpose($k, -2, -1))"}`')
            for let_name, let_text in raw_lets.items():
                if let_name in REQUIRED + OPTIONAL:
                    raise RuleError(f"`let:` name `{let_name}` shadows the capture `${let_name}`",
                                    raw_lets.key_mark(let_name), "choose another name")
                lets[let_name] = parse_expression(let_text, raw_lets.value_mark(let_name), lets)
        if "where" in spec:
            w = spec["where"]
            texts = w if isinstance(w, list) else [w]
            constraints = tuple(
                shape_expr.parse(t, w.item_mark(i) if isinstance(w, YList) else spec.value_mark("where"), True)
                for i, t in enumerate(texts))
        if "description" in spec:
            description = str(spec["description"])
        text, text_mark = spec["expr"], spec.value_mark("expr")
    else:
        text, text_mark = spec, mark
    tree = parse_expression(text, text_mark, lets)
    from ..patterns.expr import Op

    if not isinstance(tree, Op):
        raise RuleError(f"pattern `{name}` must be an op call at the top (the attention output)", text_mark,
                        'e.g. "matmul(softmax(...), $v)"')
    found = captures(tree)
    missing = [c for c in REQUIRED if c not in found]
    if missing:
        raise RuleError(f"pattern `{name}` does not capture {', '.join('$' + m for m in missing)}", text_mark,
                        "an attention pattern names its queries, keys and values: $q, $k, $v")
    return UserPattern(name=name, expr=tree, text=str(text), mark=text_mark, source=source,
                       constraints=constraints, description=description)


def _kind(val) -> str:
    if isinstance(val, list):
        return "a list"
    if isinstance(val, dict):
        return "a mapping"
    return repr(val)

