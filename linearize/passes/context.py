"""State shared by the passes over one captured graph."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..rewrite.rules import RuleSet


@dataclass
class PassContext:
    rules: RuleSet
    options: Any = None  # linearize.options.Options
    graph_id: int = 0
    example_inputs: Any = None  # the real inputs Dynamo compiles for (masks are evaluated on them)
    sites: list = field(default_factory=list)  # AttentionSite, in graph order
    unmatched: list = field(default_factory=list)  # patterns.Unmatched
    timings: dict = field(default_factory=dict)  # pass name -> seconds
    orphan_candidates: set = field(default_factory=set)  # nodes cleanup may remove if the rewrites orphaned them
    nodes_before: int = 0
    nodes_after: int = 0
