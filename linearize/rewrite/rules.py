"""Rule sets: which rewrite each attention site gets, loaded from declarative YAML rule files.

    name: my-recipe
    extends: liger                      # rules of this file first, then liger's
    include: [my_patterns.yaml]         # pattern libraries: their `patterns:` become usable here
    patterns:                           # attention shapes the built-in library does not know
      scaled_twice: "matmul(softmax(div(matmul($q, transpose($k, -2, -1)), $scale), dim=-1), $v)"
    rules:                              # ordered: the first rule whose `match` and `where` hold decides a site
      - where: {layers: "0, -1"}        # keep the first and the last layer
        rewrite: keep
      - include: swa                    # splice another file's rules here
      - match: attention
        where: {shape: "head_dim % 16 == 0"}
        rewrite: gla
        with: {gate: mamba2, gate_normalizer: 16, chunk_size: 64}

Built-in sets live in `linearize/rules/NAME.yaml` and are usable by name; a path to a file works the same way.
Files are data: they are read with PyYAML's SafeLoader (node API, for line/column marks), nothing is constructed or
executed, and every problem is a `RuleError` naming file:line:col and the fix. Problems that do not stop the file from
working (a parameter the chosen gate ignores, a pattern nobody uses) are `RuleWarning`s on `RuleSet.warnings`.

A rule that can never fire because an earlier rule selects every site it selects is an error: with first-match
semantics it is dead, and the order is almost always the mistake.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional, Union

from ..options import DEFAULT_RULES
from . import selectors, shape_expr
from .diagnostics import Mark, RuleError, RuleWarning, joined, suggest
from .gates import GATE_PARAMS
from .learned import LEARNABLE
from .targets import TARGETS
from .yamlsource import YList, YMap, load_located

TOP_KEYS = {
    "name": "a short name for reports",
    "description": "one line shown by `linearize rules list`",
    "extends": "a rule set (name or path) whose rules are tried after this file's",
    "include": "rule files (names or paths) whose `patterns:` become usable here",
    "patterns": "user-defined attention shapes: name -> expression",
    "rules": "the ordered list of rules",
}
RULE_KEYS = {
    "name": "a label for the rule in reports",
    "match": "pattern name: `attention` (any), a built-in pattern, or one from `patterns:`",
    "where": "which sites: layers, module, causal, head_dim, heads, kv_heads, gqa, shape",
    "rewrite": "the target: " + ", ".join(TARGETS),
    "with": "the target's parameters",
}
PATTERN_KEYS = {"expr": "the attention as an expression over $q, $k, $v (and $scale, $mask)",
                "where": "constraints the captures must meet",
                "description": "what the pattern is"}
ANY_PATTERN = "attention"
DEFAULT = DEFAULT_RULES
_GATE_SPECIFIC = {p for params in GATE_PARAMS.values() for p in params}


# ------------------------------------------------------------------------------------------------ model
@dataclass
class Rule:
    rewrite: str
    params: dict = field(default_factory=dict)
    match: str = ANY_PATTERN
    where: selectors.Where = field(default_factory=selectors.Where)
    formulas: dict = field(default_factory=dict)  # param -> ShapeExpr, evaluated per site
    origin: str = ""  # "file.yaml:12: rule 3", for reports
    mark: Optional[Mark] = None
    name: str = ""

    @property
    def layers(self) -> Optional[selectors.LayerSelector]:
        return self.where.layers

    def selects(self, site, values: Optional[dict] = None) -> Optional[str]:
        """None if the rule applies to the site, else why not."""
        if self.match not in (ANY_PATTERN, site.pattern):
            return f"pattern {site.pattern} is not {self.match}"
        return self.where.why_not(site, values if values is not None else selectors.site_values(site))

    def for_site(self, site, values: Optional[dict] = None) -> "Rule":
        """This rule with its parameter formulas evaluated at the site (itself when it has none)."""
        if not self.formulas:
            return self
        values = values if values is not None else selectors.site_values(site)
        params = dict(self.params)
        target = TARGETS[self.rewrite]
        for key, formula in self.formulas.items():
            value = formula.evaluate(values)
            try:
                params[key] = target.resolve_params({key: value})[key]
            except ValueError as exc:
                raise RuleError(f"`{key}: \"{formula.text}\"` gives {value} at layer {site.layer}: {exc}",
                                formula.mark) from None
        try:
            params = target.resolve_params({k: v for k, v in params.items() if k in target.defaults})
        except ValueError as exc:
            raise RuleError(f"at layer {site.layer}: {exc}", self.mark) from None
        return dataclasses.replace(self, params=params, formulas={})


@dataclass
class RuleSet:
    name: str
    rules: list
    description: str = ""
    source: str = ""
    patterns: dict = field(default_factory=dict)  # name -> user pattern (see patterns section)
    warnings: list = field(default_factory=list)  # RuleWarning

    def decide(self, site) -> Optional[Rule]:
        """The first rule that selects the site, with its parameters evaluated there; None if no rule does."""
        values = selectors.site_values(site)
        for rule in self.rules:
            if rule.selects(site, values) is None:
                return rule.for_site(site, values)
        return None

    def explain(self, site) -> list:
        """(rule origin, None or why it did not select the site) for every rule, in order."""
        values = selectors.site_values(site)
        return [(r.origin, r.selects(site, values)) for r in self.rules]


# ------------------------------------------------------------------------------------------------ finding files
def available() -> list[str]:
    """Names of the built-in rule sets."""
    return sorted(p.name[: -len(".yaml")] for p in resources.files("linearize.rules").iterdir()
                  if p.name.endswith(".yaml"))


def builtin_path(name: str) -> Path:
    return Path(str(resources.files("linearize.rules") / f"{name}.yaml"))


def _resolve(spec: str, relative_to: Optional[Path], mark: Optional[Mark]) -> Path:
    """A built-in name or a path (relative to the including file) -> an existing file."""
    if spec in available():
        return builtin_path(spec)
    if spec.endswith((".yaml", ".yml")) or "/" in spec or "\\" in spec:
        path = Path(spec).expanduser()
        if not path.is_absolute() and relative_to is not None:
            path = relative_to / path
        if not path.is_file():
            raise RuleError(f"{spec}: no such rule file", mark,
                            f"paths are relative to {relative_to}" if relative_to is not None and mark else "")
        return path
    raise RuleError(f"unknown rule set `{spec}`", mark,
                    joined(suggest(spec, available()),
                           f"built-in rule sets: {', '.join(available())}; or give a path to a .yaml file"))


def load(spec: Union[str, Path, RuleSet, None]) -> RuleSet:
    """A rule set from a built-in name, a YAML path, or a RuleSet (returned as is). None gives `liger`."""
    if isinstance(spec, RuleSet):
        return spec
    path = _resolve(DEFAULT if spec is None else str(spec), None, None)
    return _Compiler().compile_file(path)


def parse(text: str, source: str = "<string>") -> RuleSet:
    """A rule set from YAML text; `source` names it in messages (and anchors relative includes)."""
    base = Path(source).parent if source and not source.startswith("<") else Path.cwd()
    return _Compiler().compile_text(text, source, base)


def check(spec: Union[str, Path]) -> RuleSet:
    """Load a rule file for `linearize rules check`: same as `load`, for paths or names."""
    return load(spec)


# ------------------------------------------------------------------------------------------------ compiler
class _Compiler:
    """Turns located YAML into a RuleSet, following `extends`/`include` (with cycle detection)."""

    def __init__(self):
        self.stack: list = []  # resolved paths being compiled
        self.warnings: list = []
        self.cache: dict = {}

    # ---- files
    def compile_file(self, path: Path, mark: Optional[Mark] = None, label: Optional[str] = None) -> RuleSet:
        key = str(path.resolve())
        if key in self.cache:
            return self.cache[key]
        if key in [str(p.resolve()) for p in self.stack]:
            chain = " -> ".join(p.name for p in [*self.stack, path])
            raise RuleError(f"rule files include each other in a cycle: {chain}", mark,
                            "remove one of the `extends:`/`include:` references")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RuleError(f"cannot read rule file: {exc}", mark or Mark(str(path))) from None
        source = label or self._label(path)
        result = self.compile_text(text, source, path.parent, path)
        self.cache[key] = result
        return result

    @staticmethod
    def _label(path: Path) -> str:
        return str(path)

    def compile_text(self, text: str, source: str, base: Path, path: Optional[Path] = None) -> RuleSet:
        if path is not None:
            self.stack.append(path)
        try:
            data = load_located(text, source)
            return self._file(data, source, base)
        finally:
            if path is not None:
                self.stack.pop()

    def _file(self, data, source: str, base: Path) -> RuleSet:
        if not isinstance(data, YMap):
            raise RuleError("a rule file is a mapping with a `rules:` list, not " + _kind(data),
                            getattr(data, "mark", Mark(source, 1, 1)), "start with `rules:`")
        warnings_before = len(self.warnings)
        for key in data:
            if key not in TOP_KEYS:
                raise RuleError(f"unknown top-level key `{key}`", data.key_mark(key),
                                suggest(key, TOP_KEYS) or f"top-level keys: {', '.join(TOP_KEYS)}")
        for key in ("name", "description"):
            if key in data and not isinstance(data[key], str):
                raise RuleError(f"`{key}:` must be a string, got {data[key]!r}", data.value_mark(key),
                                "quote it")

        # patterns visible in this file: included libraries, the base's, then this file's own
        patterns: dict = {}
        for spec, mark in self._refs(data, "include"):
            lib = self.compile_file(_resolve(spec, base, mark), mark)
            patterns.update(lib.patterns)
        bases = [self.compile_file(_resolve(spec, base, mark), mark) for spec, mark in self._refs(data, "extends")]
        for b in bases:
            patterns.update(b.patterns)
        own_patterns = self._patterns(data, source)
        patterns.update(own_patterns)

        rules: list = []
        if "rules" in data:
            raw = data["rules"]
            if not isinstance(raw, YList):
                raise RuleError(f"`rules:` must be a list of rules, got {_kind(raw)}", data.value_mark("rules"),
                                "write each rule as a `- rewrite: ...` item")
            if not raw:
                raise RuleError("`rules:` is empty", data.value_mark("rules"),
                                "add a rule, e.g. `- rewrite: liger`; an empty list would change nothing")
            for i, item in enumerate(raw):
                mark = raw.item_mark(i)
                if isinstance(item, YMap) and "include" in item:
                    rules.extend(self._include_rules(item, base, patterns))
                else:
                    rules.append(self._rule(item, mark, source, len(rules) + 1, patterns))
        elif not own_patterns and not bases:
            raise RuleError("a rule file needs a `rules:` list", data.mark,
                            "e.g. `rules: [{rewrite: liger}]`" + (f"; {suggest('rules', data)}"
                                                                  if suggest("rules", data) else ""))
        elif not bases:
            self.warnings.append(RuleWarning("no `rules:`: this file is only usable as a pattern library "
                                             "(`include:` it from a rule file)", data.mark))
        for b in bases:
            rules.extend(b.rules)

        self._check_reachable(rules, source)
        used = {r.match for r in rules}
        for name, pat in own_patterns.items():
            if name not in used and "rules" in data:
                self.warnings.append(RuleWarning(f"pattern `{name}` is defined but no rule matches it",
                                                 pat.mark, f"add a rule with `match: {name}`"))
        name = data.get("name") or Path(source).stem
        return RuleSet(name=str(name), rules=rules, description=str(data.get("description", "")), source=source,
                       patterns=patterns, warnings=list(self.warnings[warnings_before:]))

    @staticmethod
    def _refs(data: YMap, key: str) -> list:
        if key not in data:
            return []
        val, mark = data[key], data.value_mark(key)
        items = val if isinstance(val, list) else [val]
        out = []
        for i, spec in enumerate(items):
            m = val.item_mark(i) if isinstance(val, YList) else mark
            if not isinstance(spec, str) or not spec.strip():
                raise RuleError(f"`{key}:` takes rule set names or paths, got {spec!r}", m,
                                f"e.g. `{key}: liger` or `{key}: [base.yaml]`")
            out.append((spec.strip(), m))
        if not out:
            raise RuleError(f"`{key}: []` names nothing", mark, f"remove `{key}:` or name a rule set")
        return out

    def _include_rules(self, item: YMap, base: Path, patterns: dict) -> list:
        for key in item:
            if key != "include":
                raise RuleError(f"a rule item with `include:` takes nothing else, found `{key}`", item.key_mark(key),
                                "write the included rules' changes as rules of their own before the include")
        (spec, mark), = self._refs(item, "include")
        included = self.compile_file(_resolve(spec, base, mark), mark)
        patterns.update(included.patterns)
        return list(included.rules)

    # ---- patterns
    def _patterns(self, data: YMap, source: str) -> dict:
        if "patterns" not in data:
            return {}
        raw = data["patterns"]
        if not isinstance(raw, YMap):
            raise RuleError(f"`patterns:` must be a mapping of name -> expression, got {_kind(raw)}",
                            data.value_mark("patterns"),
                            'e.g. `patterns: {mine: "matmul(softmax(matmul($q, transpose($k, -2, -1)), dim=-1), $v)"}`')
        from .pattern_text import compile_pattern, reserved_pattern_names

        out = {}
        for name, spec in raw.items():
            km = raw.key_mark(name)
            if name == ANY_PATTERN or name in reserved_pattern_names():
                raise RuleError(f"pattern name `{name}` is taken by a built-in pattern", km, "choose another name")
            if not name.replace("_", "").replace("-", "").isalnum():
                raise RuleError(f"pattern name `{name}` must be letters, digits, `_` or `-`", km)
            out[name] = compile_pattern(name, spec, raw.value_mark(name), source)
        return out

    # ---- rules
    def _rule(self, raw, mark: Mark, source: str, index: int, patterns: dict) -> Rule:
        if not isinstance(raw, YMap):
            raise RuleError(f"rule {index} must be a mapping, got {_kind(raw)}", mark,
                            "a rule is `{match: ..., where: {...}, rewrite: ..., with: {...}}`")
        for key in raw:
            if key not in RULE_KEYS:
                raise RuleError(f"unknown key `{key}` in rule {index}", raw.key_mark(key),
                                suggest(key, list(RULE_KEYS) + ["include"]) or f"rule keys: {', '.join(RULE_KEYS)}")
        origin = f"{mark}: rule {index}"
        if "name" in raw and not isinstance(raw["name"], str):
            raise RuleError(f"`name:` must be a string, got {raw['name']!r}", raw.value_mark("name"))
        # rewrite
        if "rewrite" not in raw:
            raise RuleError(f"rule {index} has no `rewrite:`", mark,
                            f"say what the selected sites become: {', '.join(TARGETS)}")
        target_name = raw["rewrite"]
        tm = raw.value_mark("rewrite")
        if isinstance(target_name, YMap):
            raise RuleError("`rewrite:` takes a target name; its parameters go under `with:`", tm,
                            "write `rewrite: liger` and `with: {window: 64}` as two keys of the rule")
        if not isinstance(target_name, str) or target_name not in TARGETS:
            raise RuleError(f"unknown rewrite `{target_name}`", tm,
                            joined(suggest(target_name, TARGETS), f"targets: {', '.join(TARGETS)}"))
        target = TARGETS[target_name]
        # match
        match = raw.get("match", ANY_PATTERN)
        mm = raw.value_mark("match")
        known = [ANY_PATTERN, *builtin_pattern_names(), *patterns]
        if not isinstance(match, str) or match not in known:
            raise RuleError(f"unknown pattern `{match}` in `match:`", mm,
                            joined(suggest(match, known), f"patterns: {', '.join(known)}; define new ones under "
                                                          "`patterns:`"))
        where = selectors.parse_where(raw.get("where"), raw.value_mark("where"))
        params, formulas = self._params(raw, target, index)
        self._param_warnings(raw, target_name, params, formulas)
        self._target_warnings(raw, target_name, where)
        return Rule(rewrite=target_name, params=params, match=match, where=where, formulas=formulas, origin=origin,
                    mark=mark, name=str(raw.get("name", "")))

    def _params(self, raw: YMap, target, index: int):
        given = raw.get("with")
        wm = raw.value_mark("with")
        if given is None:
            given = YMap()
            given.mark, given.key_marks, given.value_marks = wm, {}, {}
        if not isinstance(given, YMap):
            raise RuleError(f"`with:` must be a mapping of parameters, got {_kind(given)}", wm,
                            f"e.g. `with: {{{', '.join(f'{k}: {v}' for k, v in list(target.defaults.items())[:2])}}}`"
                            if target.defaults else f"`{target.name}` takes no parameters: remove `with:`")
        constants, formulas, learn_too = {}, {}, []
        for key, val in given.items():
            km, vm = given.key_mark(key), given.value_mark(key)
            if key not in target.defaults:
                others = [n for n, t in TARGETS.items() if key in t.defaults]
                hint = suggest(key, target.defaults)
                if not hint and others:
                    hint = f"`{key}` is a parameter of {', '.join(others)}, not of {target.name}"
                known = ", ".join(target.defaults) or "none"
                raise RuleError(f"unknown parameter `{key}` for rewrite `{target.name}`", km,
                                joined(hint, f"parameters: {known}"))
            if val == "learnable":
                if key not in LEARNABLE.get(target.name, {}):
                    can = ", ".join(f"{n} ({t})" for t, ps in LEARNABLE.items() for n in ps)
                    raise RuleError(f"`{key}` of `{target.name}` cannot be learned", vm,
                                    f"learnable parameters: {can}; give `{key}` a constant")
                learn_too.append(key)  # starts from the target's default, e.g. mix [0.5, 0.5]
                continue
            default = target.defaults[key]
            numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
            if numeric and isinstance(val, str) and not _is_choice(target, key):
                try:
                    formula = shape_expr.parse(val, vm, boolean=False)
                except RuleError as exc:
                    kind = "an integer" if isinstance(default, int) else "a number"
                    raise RuleError(f"bad `{key}`: expected {kind} or a formula over the site's dimensions; "
                                    f"{exc.problem}", exc.mark, exc.hint) from None
                if formula.free:
                    formulas[key] = formula
                    continue
                val = formula.evaluate({})
            try:
                constants[key] = target.resolve_params({key: val})[key]
            except ValueError as exc:
                raise RuleError(f"bad `{key}`: {_strip_key(str(exc), key)}", vm, _param_hint(key, val, target)) \
                    from None
        if learn_too:
            constants["learn"] = [*constants.get("learn", []), *learn_too]
        try:
            params = target.resolve_params(constants)
        except ValueError as exc:
            bad = str(exc).split(":", 1)[0]
            mark = given.value_mark(bad) if bad in given else wm
            raise RuleError(f"bad parameters: {exc}", mark) from None
        return params, formulas

    def _param_warnings(self, raw: YMap, target_name: str, params: dict, formulas: dict) -> None:
        given = raw.get("with") if isinstance(raw.get("with"), YMap) else {}
        gate = params.get("gate")
        if gate is None:
            return
        for key in given:
            if key in _GATE_SPECIFIC and key not in GATE_PARAMS.get(gate, ()):
                users = [g for g, ps in GATE_PARAMS.items() if key in ps]
                self.warnings.append(RuleWarning(f"`{key}` has no effect with `gate: {gate}`", given.key_mark(key),
                                                 f"it is used by gate {', '.join(users)}; remove it or change "
                                                 "the gate"))

    def _target_warnings(self, raw: YMap, target_name: str, where: selectors.Where) -> None:
        if where.causal is False and target_name not in ("exact", "keep"):
            self.warnings.append(RuleWarning(
                f"this rule selects non-causal sites, but `{target_name}` only rewrites causal self-attention: "
                "every site it selects will keep softmax attention", raw.value_mark("rewrite"),
                "use `rewrite: exact` or `keep` for non-causal sites"))

    def _check_reachable(self, rules: list, source: str) -> None:
        """With first-match semantics a rule is dead if an earlier one selects every site it selects."""
        for j, later in enumerate(rules):
            for earlier in rules[:j]:
                if not (earlier.match in (ANY_PATTERN, later.match) and earlier.where.covers(later.where)):
                    continue
                if later.mark is not None and later.mark.source == source:
                    raise RuleError(
                        f"{_rule_label(later)} can never fire: the earlier {_rule_label(earlier)} at "
                        f"{_short(earlier.mark, source)} ({earlier.where.describe()}) already selects every site it "
                        "selects", later.mark, "move it above that rule, or narrow the earlier rule's `where:`")
                if earlier.mark is not None and earlier.mark.source == source:
                    raise RuleError(
                        f"{_rule_label(earlier)} ({earlier.where.describe()}) selects every site that "
                        f"{_rule_label(later)} of {later.mark.source if later.mark else '?'} selects, so that "
                        "rule can never fire", earlier.mark,
                        "narrow this rule's `where:` (e.g. `layers:`), or drop the `extends:`/`include:`")


# ------------------------------------------------------------------------------------------------ helpers
def builtin_pattern_names() -> list:
    """Names of the built-in patterns (what `match:` may name besides `attention` and file patterns)."""
    from .pattern_text import reserved_pattern_names

    return sorted(reserved_pattern_names())


def _is_choice(target, key) -> bool:
    return key in target.choices


def _strip_key(message: str, key: str) -> str:
    prefix = f"{key}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def _param_hint(key, val, target) -> str:
    if key in target.choices:
        return f"choose one of {', '.join(map(str, target.choices[key]))}" + (
            f"; {suggest(val, target.choices[key])}" if suggest(val, target.choices[key]) else "")
    default = target.defaults.get(key)
    if isinstance(default, list):
        return f"e.g. `{key}: {default}`"
    if isinstance(default, bool):
        return f"`{key}: true` or `{key}: false`"
    if isinstance(default, int):
        return f"e.g. `{key}: {default}`, or a formula in quotes such as `\"min({default}, seq_len)\"`"
    if isinstance(default, float):
        return f"e.g. `{key}: {default}`, or a formula in quotes such as `\"layer / num_layers\"`"
    return ""


def _kind(val) -> str:
    if isinstance(val, list):
        return "a list"
    if isinstance(val, dict):
        return "a mapping"
    if isinstance(val, str):
        return f"the string {val!r}"
    return repr(val)


def _short(mark: Optional[Mark], source: str = "") -> str:
    if mark is None:
        return "?"
    if mark.source != source:
        return f"{mark.source}:{mark.line}"
    return f"line {mark.line}" if mark.line else str(mark)


def _rule_label(rule: Rule) -> str:
    number = rule.origin.rsplit(": ", 1)[-1]
    return f"{number} (`{rule.name}`)" if rule.name else number
