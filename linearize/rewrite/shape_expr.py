"""Shape constraints and parameter formulas in rule files, as sympy expressions over a site's dimensions.

    where: {shape: "head_dim % 16 == 0 and seq_len >= 2 * window"}     # a constraint (boolean)
    with:  {gate_lower_bound: "layer / num_layers"}                    # a formula (number), per site

The text is parsed with Python's `ast` (never evaluated): only numbers, the names in `VARIABLES`, arithmetic
(+ - * / // % **), comparisons, `and`/`or`/`not` and the functions in `FUNCTIONS` are accepted, and each is turned
into the sympy object of the same meaning. Symbols carry their assumptions (dimensions are positive integers, layers
non-negative integers), so sympy decides constraints that can never hold (`head_dim < 0`) at load time.

At a site, the symbols are replaced by the site's values. A dimension that Dynamo traced as dynamic (a `SymInt`) is
replaced by its symbolic expression and the constraint is decided by the ShapeEnv, which records a guard: the compiled
graph is reused only while the constraint keeps the same truth value.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Optional

import sympy

from .diagnostics import Mark, RuleError, suggest

_DIM = dict(integer=True, positive=True)
_INDEX = dict(integer=True, nonnegative=True)
VARIABLES = {
    "batch": ("batch size B", _DIM),
    "heads": ("query heads Hq", _DIM),
    "kv_heads": ("key/value heads Hkv", _DIM),
    "gqa": ("query heads per KV head, Hq / Hkv", _DIM),
    "seq_len": ("query length L", _DIM),
    "kv_len": ("key length S", _DIM),
    "head_dim": ("head dimension D of q and k", _DIM),
    "value_dim": ("head dimension Dv of v", _DIM),
    "layer": ("layer index (0-based)", _INDEX),
    "num_layers": ("number of layers in the captured graph", _DIM),
}
SYMBOLS = {name: sympy.Symbol(name, **assumptions) for name, (_doc, assumptions) in VARIABLES.items()}
FUNCTIONS = {"min": sympy.Min, "max": sympy.Max, "abs": sympy.Abs, "floor": sympy.floor, "ceil": sympy.ceiling,
             "log2": lambda x: sympy.log(x, 2), "sqrt": sympy.sqrt}
_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: sympy.floor(a / b), ast.Mod: sympy.Mod,
           ast.Pow: lambda a, b: a ** b}
_COMPARE = {ast.Eq: sympy.Eq, ast.NotEq: sympy.Ne, ast.Lt: sympy.Lt, ast.LtE: sympy.Le, ast.Gt: sympy.Gt,
            ast.GtE: sympy.Ge}
_SYMBOLS = {"==": "Eq", "!=": "Ne", "<": "Lt", "<=": "Le", ">": "Gt", ">=": "Ge"}
_VAR_HELP = ", ".join(VARIABLES)


def _is_condition(val) -> bool:
    """sympy Symbols are Booleans too, so test for what conditions are built of."""
    from sympy.logic.boolalg import BooleanAtom, BooleanFunction
    return isinstance(val, (BooleanAtom, BooleanFunction, sympy.core.relational.Relational))


@dataclass(frozen=True)
class ShapeExpr:
    """A parsed constraint or formula: its text, where it was written, and its sympy form."""

    text: str
    expr: sympy.Basic
    mark: Mark
    boolean: bool

    @property
    def free(self) -> set:
        return {s.name for s in self.expr.free_symbols}

    def evaluate(self, values: dict):
        """The value at a site: bool for constraints, int/float for formulas. `values`: name -> int or SymInt."""
        subs, shape_env = {}, None
        for sym in self.expr.free_symbols:
            val = values.get(sym.name)
            if val is None:
                raise RuleError(f"`{self.text}` uses {sym.name}, which this site does not have", self.mark,
                                "sites without a layer index (no numbered module path) have no `layer`")
            node = getattr(val, "node", None)
            if node is not None and hasattr(node, "expr"):  # a SymInt traced as dynamic
                subs[sym] = node.expr
                shape_env = node.shape_env
            else:
                subs[sym] = sympy.Integer(int(val))
        result = self.expr.xreplace(subs)
        if self.boolean:
            if result not in (sympy.true, sympy.false) and shape_env is not None:
                result = shape_env.evaluate_expr(result)  # decides with the hint and records a guard
            if result not in (sympy.true, sympy.false):
                result = sympy.simplify(result)
            if result not in (sympy.true, sympy.false):
                raise RuleError(f"`{self.text}` could not be decided at this site (it became {result})", self.mark)
            return bool(result)
        if shape_env is not None and result.free_symbols:
            hints = getattr(shape_env, "backed_var_to_val", None) or shape_env.var_to_val
            hint = result.xreplace(hints)
            shape_env.evaluate_expr(sympy.Eq(result, hint))  # specialise: the formula's value is a constant
            result = hint
        result = sympy.nsimplify(result) if result.free_symbols else result
        if result.is_integer:
            return int(result)
        if result.is_real:
            return float(result)
        raise RuleError(f"`{self.text}` is not a real number at this site ({result})", self.mark)


def parse(text, mark: Mark, boolean: bool) -> ShapeExpr:
    """Parse a constraint (`boolean`) or a numeric formula; RuleError located at the offending token."""
    if not isinstance(text, str):
        raise RuleError(f"expected an expression in quotes, got {text!r}", mark,
                        'e.g. `shape: "head_dim % 16 == 0"`' if boolean else 'e.g. `"layer / num_layers"`')
    src = text.strip()
    if not src:
        raise RuleError("empty expression", mark, 'e.g. `shape: "head_dim % 16 == 0"`')
    src = src.replace("&&", " and ").replace("||", " or ")
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError as exc:
        col = (exc.offset or 1) - 1
        hint = "a single `=` compares nothing: write `==`" if "=" in src and "==" not in src and not any(
            op in src for op in ("<=", ">=", "!=")) else "expressions use Python syntax: `head_dim % 16 == 0`"
        raise RuleError(f"bad expression `{text}`: {exc.msg}", mark.shifted(col), hint) from None
    expr = _Translate(src, mark).visit(tree.body)
    is_bool = _is_condition(expr)
    if boolean and not is_bool:
        raise RuleError(f"`{text}` is a number, not a condition", mark,
                        f"compare it with something, e.g. `{src} == 0`")
    if not boolean and is_bool:
        raise RuleError(f"`{text}` is a condition, not a number", mark, "a parameter formula computes a value")
    return ShapeExpr(text=text, expr=expr, mark=mark, boolean=boolean)


class _Translate(ast.NodeVisitor):
    def __init__(self, src: str, mark: Mark):
        self.src, self.mark = src, mark

    def fail(self, node, message: str, hint: str = ""):
        raise RuleError(message, self.mark.shifted(getattr(node, "col_offset", 0)), hint)

    def generic_visit(self, node):
        piece = ast.get_source_segment(self.src, node) or type(node).__name__
        self.fail(node, f"`{piece}` is not allowed in a shape expression",
                  f"use numbers, the names {_VAR_HELP}, arithmetic, comparisons, and/or/not, "
                  f"and {', '.join(FUNCTIONS)}()")

    def visit_Constant(self, node):
        if isinstance(node.value, bool):
            return sympy.true if node.value else sympy.false
        if isinstance(node.value, int):
            return sympy.Integer(node.value)
        if isinstance(node.value, float):
            return sympy.nsimplify(node.value, rational=True)
        self.fail(node, f"{node.value!r} is not a number", "shape expressions compute with numbers only")

    def visit_Name(self, node):
        if node.id in SYMBOLS:
            return SYMBOLS[node.id]
        if node.id in ("true", "True"):
            return sympy.true
        if node.id in ("false", "False"):
            return sympy.false
        self.fail(node, f"unknown name `{node.id}` in a shape expression",
                  suggest(node.id, list(VARIABLES) + list(FUNCTIONS)) or f"names: {_VAR_HELP}")

    def visit_BinOp(self, node):
        fn = _BINOPS.get(type(node.op))
        if fn is None:
            self.generic_visit(node)
        a, b = self.number(node.left), self.number(node.right)
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
            self.fail(node.right, "division by zero")
        return fn(a, b)

    def visit_UnaryOp(self, node):
        if isinstance(node.op, ast.Not):
            return sympy.Not(self.condition(node.operand))
        if isinstance(node.op, ast.USub):
            return -self.number(node.operand)
        if isinstance(node.op, ast.UAdd):
            return self.number(node.operand)
        self.generic_visit(node)

    def visit_BoolOp(self, node):
        parts = [self.condition(v) for v in node.values]
        return sympy.And(*parts) if isinstance(node.op, ast.And) else sympy.Or(*parts)

    def visit_Compare(self, node):
        left, parts = self.number(node.left), []
        for op, right_node in zip(node.ops, node.comparators):
            fn = _COMPARE.get(type(op))
            if fn is None:
                self.fail(node, "only ==, !=, <, <=, >, >= compare values")
            right = self.number(right_node)
            parts.append(fn(left, right))
            left = right
        return sympy.And(*parts)

    def visit_Call(self, node):
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in FUNCTIONS:
            shown = name or ast.get_source_segment(self.src, node.func)
            self.fail(node, f"unknown function `{shown}`",
                      suggest(shown, FUNCTIONS) or f"functions: {', '.join(FUNCTIONS)}")
        if node.keywords or not node.args:
            self.fail(node, f"`{name}` takes positional arguments only")
        args = [self.number(a) for a in node.args]
        if name in ("abs", "floor", "ceil", "log2", "sqrt") and len(args) != 1:
            self.fail(node, f"`{name}` takes one argument")
        return FUNCTIONS[name](*args)

    def number(self, node):
        val = self.visit(node)
        if _is_condition(val):
            self.fail(node, f"`{ast.get_source_segment(self.src, node)}` is a condition where a number is needed")
        return val

    def condition(self, node):
        val = self.visit(node)
        if not _is_condition(val):
            self.fail(node, f"`{ast.get_source_segment(self.src, node)}` is a number where a condition is needed",
                      "compare it, e.g. `... == 0`")
        return val


def always(expr: ShapeExpr) -> Optional[bool]:
    """True/False when the constraint holds (fails) for every site, None when it depends on the site."""
    if expr.expr in (sympy.true, sympy.false):
        return bool(expr.expr)
    return None
