"""Rule sets: which rewrite each attention site gets, loaded from YAML data files.

A rule set is an ordered list of rules; the first rule whose `match` and `where` hold decides a site. Built-in sets
live in `linearize/rules/NAME.yaml` and are usable by name; a path to a user file works the same way.
Files are data: `yaml.safe_load` only.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Optional, Union

import yaml

from .targets import TARGETS

RULE_KEYS = ("match", "where", "rewrite", "with")
WHERE_KEYS = ("layers",)
SET_KEYS = ("name", "description", "rules")


class RuleError(ValueError):
    """A rule set that cannot be used; the message names the file and the fix."""


@dataclass
class Rule:
    rewrite: str
    params: dict = field(default_factory=dict)
    match: str = "attention"
    layers: Optional[set] = None  # None: every layer
    origin: str = ""  # "file.yaml: rule 2", for reports

    def selects(self, site) -> Optional[str]:
        """None if the rule applies to the site, else why not."""
        if self.match not in ("attention", site.pattern):
            return f"pattern {site.pattern} is not {self.match}"
        if self.layers is not None and site.layer not in self.layers:
            return f"layer {site.layer} not selected"
        return None


@dataclass
class RuleSet:
    name: str
    rules: list
    description: str = ""
    source: str = ""

    def decide(self, site) -> Optional[Rule]:
        return next((r for r in self.rules if r.selects(site) is None), None)


def available() -> list[str]:
    """Names of the built-in rule sets."""
    return sorted(p.name[: -len(".yaml")] for p in resources.files("linearize.rules").iterdir()
                  if p.name.endswith(".yaml"))


def builtin_path(name: str) -> Path:
    return Path(str(resources.files("linearize.rules") / f"{name}.yaml"))


def load(spec: Union[str, Path, RuleSet, None]) -> RuleSet:
    """A rule set from a built-in name, a YAML path, or a RuleSet (returned as is). None gives `liger`."""
    if isinstance(spec, RuleSet):
        return spec
    spec = "liger" if spec is None else str(spec)
    if spec in available():
        path = builtin_path(spec)
    elif spec.endswith((".yaml", ".yml")) or "/" in spec:
        path = Path(spec)
        if not path.is_file():
            raise RuleError(f"{spec}: no such rule file")
    else:
        raise RuleError(f"unknown rule set {spec!r}{_suggest(spec, available())}; "
                        f"built-in rule sets: {', '.join(available())}; or give a path to a .yaml file")
    return parse(path.read_text(), str(path))


def parse(text: str, source: str = "<string>") -> RuleSet:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RuleError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RuleError(f"{source}: a rule file is a mapping with a `rules:` list")
    _check_keys(data, SET_KEYS, source, "top level")
    rules = data.get("rules")
    if not isinstance(rules, list) or not rules:
        raise RuleError(f"{source}: `rules:` must be a non-empty list of rules")
    parsed = [_parse_rule(r, f"{source}: rule {i + 1}") for i, r in enumerate(rules)]
    name = data.get("name") or Path(source).stem
    return RuleSet(name=str(name), rules=parsed, description=str(data.get("description", "")), source=source)


def _parse_rule(raw, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise RuleError(f"{where}: a rule is a mapping with `match`, optional `where`, `rewrite` and `with`")
    _check_keys(raw, RULE_KEYS, where, "rule")
    target = raw.get("rewrite")
    if target not in TARGETS:
        raise RuleError(f"{where}: unknown rewrite {target!r}{_suggest(str(target), TARGETS)}; "
                        f"targets: {', '.join(TARGETS)}")
    params = raw.get("with") or {}
    if not isinstance(params, dict):
        raise RuleError(f"{where}: `with:` must be a mapping of parameters")
    try:
        params = TARGETS[target].resolve_params(params)
    except ValueError as exc:
        raise RuleError(f"{where}: {exc}") from None
    sel = raw.get("where") or {}
    if not isinstance(sel, dict):
        raise RuleError(f"{where}: `where:` must be a mapping")
    _check_keys(sel, WHERE_KEYS, where, "where")
    return Rule(rewrite=target, params=params, match=str(raw.get("match", "attention")),
                layers=_parse_layers(sel.get("layers"), where), origin=where)


def _parse_layers(spec, where: str) -> Optional[set]:
    """`layers: [0, 1, 5]` or `layers: "0-3, 28-29"`."""
    if spec is None:
        return None
    items = spec if isinstance(spec, list) else str(spec).split(",")
    layers = set()
    for item in items:
        text = str(item).strip()
        try:
            if "-" in text:
                lo, hi = (int(x) for x in text.split("-", 1))
                if hi < lo:
                    raise ValueError
                layers.update(range(lo, hi + 1))
            else:
                layers.add(int(text))
        except ValueError:
            raise RuleError(f"{where}: bad layer selector {text!r}; write e.g. `layers: \"0-3, 28\"`") from None
    return layers


def _check_keys(mapping: dict, allowed, where: str, what: str) -> None:
    for key in mapping:
        if key not in allowed:
            raise RuleError(f"{where}: unknown key {key!r} in {what}{_suggest(str(key), allowed)}; "
                            f"allowed: {', '.join(allowed)}")


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
