"""YAML rule files as plain data that remembers where every key and value was written.

The text is composed with PyYAML's `SafeLoader` (the node API, which keeps line/column marks) and the node tree is
turned into `YMap` / `YList` containers holding ordinary Python scalars, built by `SafeConstructor` one scalar at a
time. Only the plain-data tags are accepted (mappings, lists, strings, numbers, booleans, null): a tag that would
construct an object (`!!python/object/apply:...`), binary data, dates, sets or any application tag is an error at
its position, and so are duplicate keys, non-string keys and alias bombs. Nothing is ever executed.
"""
from __future__ import annotations

from typing import Any, Optional

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .diagnostics import Mark, RuleError

_TAG = "tag:yaml.org,2002:"
SCALAR_TAGS = {_TAG + t for t in ("str", "int", "float", "bool", "null")}
MAX_NODES = 20_000  # expanded nodes per file: aliases may not blow a few lines up into millions of values


class YMap(dict):
    """A mapping from a rule file; `.mark` is where it starts, `.key_mark(k)` / `.value_mark(k)` where k and its
    value were written."""

    mark: Mark
    key_marks: dict
    value_marks: dict

    def key_mark(self, key) -> Mark:
        return self.key_marks.get(key, self.mark)

    def value_mark(self, key) -> Mark:
        return self.value_marks.get(key, self.mark)


class YList(list):
    """A list from a rule file; `.mark` is where it starts, `.item_mark(i)` where item i was written."""

    mark: Mark
    item_marks: list

    def item_mark(self, i: int) -> Mark:
        return self.item_marks[i] if 0 <= i < len(self.item_marks) else self.mark


def mark_of(node: Node, source: str) -> Mark:
    m = node.start_mark
    quoted = isinstance(node, ScalarNode) and node.style in ("'", '"')
    return Mark(source, m.line + 1, m.column + 1, quoted)


def _yaml_mark(exc: yaml.MarkedYAMLError, source: str) -> Optional[Mark]:
    m = exc.problem_mark or exc.context_mark
    return Mark(source, m.line + 1, m.column + 1) if m is not None else Mark(source)


def _yaml_hint(problem: str) -> str:
    if "'\\t'" in problem or "tab" in problem:
        return "YAML indents with spaces, not tabs"
    if "mapping values are not allowed" in problem:
        return "a value contains `: `: quote it, or check the indentation of this line"
    if "expected ',' or ']'" in problem or "expected ',' or '}'" in problem:
        return "a flow list `[...]` or mapping `{...}` is not closed, or an item in it needs quotes"
    if "could not find expected ':'" in problem:
        return "a key is missing its `:`, or a string spans lines without quotes"
    if "expected a single document" in problem:
        return "a rule file holds one document: remove the `---` separators"
    if "found undefined alias" in problem:
        return "`*name` refers to an anchor `&name` that is not defined above it"
    if "block sequence entries are not allowed" in problem:
        return "a `- item` list is indented under a key that already has a value"
    return "check the indentation and quoting on this line"


def load_located(text: str, source: str) -> Any:
    """The document as YMap/YList/scalars with marks; raises RuleError (never yaml.YAMLError)."""
    try:
        loader = yaml.SafeLoader(text)
        try:
            root = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        started = exc.context_mark
        if started is not None and exc.problem_mark is not None and started.line != exc.problem_mark.line:
            problem += f" (the construct started at line {started.line + 1}, column {started.column + 1})"
        raise RuleError(f"not valid YAML: {problem}", _yaml_mark(exc, source), _yaml_hint(problem)) from None
    except yaml.YAMLError as exc:
        raise RuleError(f"not valid YAML: {exc}", Mark(source, 1, 1)) from None
    if root is None:
        raise RuleError("empty rule file", Mark(source, 1, 1),
                        "a rule file is a mapping with a `rules:` list, e.g. `rules: [{rewrite: liger}]`")
    return _Builder(source).build(root)


class _Builder:
    def __init__(self, source: str):
        self.source = source
        self.constructor = yaml.SafeLoader("")  # only its scalar constructors are used
        self.count = 0
        self.active: set = set()  # nodes on the current path: an alias to an ancestor is a cycle

    def build(self, node: Node) -> Any:
        self.count += 1
        mark = mark_of(node, self.source)
        if self.count > MAX_NODES:
            raise RuleError(f"the file expands to more than {MAX_NODES} values (aliases of aliases?)", mark,
                            "write the values out instead of nesting `*alias` references")
        if id(node) in self.active:
            raise RuleError("a YAML alias refers to a value that contains it (a cycle)", mark,
                            "rule files are trees: remove the recursive `*alias`")
        if isinstance(node, ScalarNode):
            return self._scalar(node, mark)
        self.active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                self._check_tag(node, _TAG + "seq", mark)
                out = YList(self.build(item) for item in node.value)
                out.mark, out.item_marks = mark, [mark_of(item, self.source) for item in node.value]
                return out
            assert isinstance(node, MappingNode)
            self._check_tag(node, _TAG + "map", mark)
            try:
                self.constructor.flatten_mapping(node)  # `<<: *defaults` merge keys
            except yaml.MarkedYAMLError as exc:
                raise RuleError(f"bad merge key `<<`: {exc.problem}", _yaml_mark(exc, self.source),
                                "`<<:` takes an alias to a mapping, e.g. `<<: *defaults`") from None
            out = YMap()
            out.mark, out.key_marks, out.value_marks = mark, {}, {}
            for key_node, value_node in node.value:
                key_mark = mark_of(key_node, self.source)
                if not isinstance(key_node, ScalarNode):
                    raise RuleError("a key must be a plain name, not a list or mapping", key_mark,
                                    "write `name: value`")
                key = self._scalar(key_node, key_mark)
                if not isinstance(key, str):
                    raise RuleError(f"key {key!r} is not a name", key_mark,
                                    f"keys are names; quote it if it must be `{key}`" if key is not None
                                    else "a `:` with nothing before it")
                if key in out:
                    raise RuleError(f"duplicate key `{key}` (first written at line {out.key_marks[key].line})",
                                    key_mark, "each key may appear once per mapping; merge the two entries")
                out[key] = self.build(value_node)
                out.key_marks[key] = key_mark
                out.value_marks[key] = mark_of(value_node, self.source)
            return out
        finally:
            self.active.discard(id(node))

    def _check_tag(self, node: Node, expected: str, mark: Mark) -> None:
        if node.tag != expected:
            self._bad_tag(node.tag, mark)

    def _scalar(self, node: ScalarNode, mark: Mark) -> Any:
        if node.tag not in SCALAR_TAGS:
            self._bad_tag(node.tag, mark)
        try:
            return self.constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError) as exc:
            raise RuleError(f"cannot read {node.value!r} as {node.tag.replace(_TAG, '')}: {exc}", mark) from None

    @staticmethod
    def _bad_tag(tag: str, mark: Mark):
        shown = "!!" + tag[len(_TAG):] if tag.startswith(_TAG) else tag
        raise RuleError(f"YAML tag `{shown}` is not allowed: rule files are plain data and never construct "
                        "objects or run code", mark,
                        "remove the tag; values are mappings, lists, strings, numbers, booleans or null")
