"""The attention pattern library: each module holds one shape of softmax attention and a `match(node)`.

`match` returns an `AttentionSite` (canonical form), a string (the node is that kind of attention but cannot be a
site, and why), or None (not this pattern). Adding a shape = adding a module here and a test beside it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx

from . import matmul_softmax, sdpa
from .graph import is_op, module_path
from .identity import duplicate_layers, innermost_module
from .site import AttentionSite, NearMiss, Provenance

PATTERNS = [sdpa, matmul_softmax]


@dataclass
class Unmatched:
    """A softmax (or attention call) that no pattern turned into a site, and why."""

    node: str
    module_path: str
    reason: str
    pattern: Optional[str] = None  # the pattern that matched partly (a near-miss), if any
    partial: list = field(default_factory=list)  # node names that pattern had covered before failing


def find_sites(graph: fx.Graph, extra=()) -> tuple[list[AttentionSite], list[Unmatched]]:
    """Every attention site in the graph, in graph order, and every softmax left alone with a reason.

    `extra`: more patterns for this graph only (a rule file's `patterns:`), tried before the library's.
    """
    sites, unmatched, covered = [], [], set()
    for node in graph.nodes:
        if node in covered:  # already part of a site (e.g. the output matmul of a softmax-anchored match)
            continue
        for pattern in (*extra, *PATTERNS):
            found = pattern.match(node)
            if isinstance(found, AttentionSite):
                entry = innermost_module(node)
                found.module_class = entry[1] if entry else None
                sites.append(found)
                covered.update(found.matched_nodes)
                break
            if isinstance(found, (str, NearMiss)):
                miss = found if isinstance(found, NearMiss) else NearMiss(found)
                unmatched.append(Unmatched(node.name, module_path(node), f"{pattern.NAME}: {miss.reason}",
                                           pattern=pattern.NAME, partial=miss.partial))
                covered.add(node)
                break
    for node in graph.nodes:
        if node not in covered and is_op(node, "softmax", "log_softmax", "_softmax"):
            unmatched.append(Unmatched(node.name, module_path(node),
                                       "no attention pattern matches this softmax (not attention, or a shape "
                                       "the library does not know yet)"))
    ambiguous = duplicate_layers(sites)  # a layer two sites claim cannot be selected by rules or bound to a cache
    for site in sites:
        site.identity_problem = ambiguous.get(id(site))
    return sites, unmatched


__all__ = ["AttentionSite", "NearMiss", "Provenance", "Unmatched", "find_sites", "PATTERNS"]
