"""What each layer of a converted model keeps while decoding, decided once from the rule set.

A `StateCache` must hold, per layer, exactly what the compiled model's rewrite will read and write: a recurrent state
for gla, a ring of the last W keys for swa, both for liger, ring + feature ring + sums for lolcats, an ordinary
(preallocated) KV cache for sites kept as softmax. That depends on the rule set and on each site (selectors, checks),
so the plan comes from running the passes once on a short dummy input with `linearize.explain`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from ..rewrite.gates import FEATURE_MAPS
from ..rewrite.targets import STATEFUL, TARGETS


@dataclass(frozen=True)
class LayerPlan:
    layer: int
    rewrite: str  # a target name; "keep" / "exact" / anything not in STATEFUL get a KV cache
    params: dict = field(default_factory=dict)
    rules: str = ""
    kv_heads: int = 0
    k_dim: int = 0
    v_dim: int = 0

    @property
    def stateful(self) -> bool:
        return self.rewrite in STATEFUL

    def to_json(self) -> str:
        """The plan as the marker carries it into the graph (the backend checks it against its own decision)."""
        return json.dumps({"layer": self.layer, "rules": self.rules, "rewrite": self.rewrite,
                           "params": self.params, "buffers": list(self.buffer_names())}, sort_keys=True)

    def buffer_names(self) -> tuple:
        """The buffers the marker passes, in this order (the target's `state_buffers`)."""
        target = TARGETS.get(self.rewrite)
        return target.state_buffers if target is not None else ()

    def feature_dim(self) -> int:
        name = self.params.get("feature_map", "softmax")
        probe = FEATURE_MAPS[name](torch.zeros(1, self.k_dim))
        return probe.shape[-1]

    def buffers(self, batch: int, dtype: torch.dtype, device) -> dict:
        """Zeroed buffers for this layer: rings in the model's dtype, states and sums in fp32, positions -1."""
        B, H, D, Dv = batch, self.kv_heads, self.k_dim, self.v_dim
        W, N = self.params.get("window"), self.params.get("sinks", 0)
        f32 = dict(dtype=torch.float32, device=device)
        make = {
            "ring_k": lambda: torch.zeros(B, H, W, D, dtype=dtype, device=device),
            "ring_v": lambda: torch.zeros(B, H, W, Dv, dtype=dtype, device=device),
            "ring_pos": lambda: torch.full((B, W), -1, dtype=torch.long, device=device),
            "sink_k": lambda: torch.zeros(B, H, N, D, dtype=dtype, device=device),
            "sink_v": lambda: torch.zeros(B, H, N, Dv, dtype=dtype, device=device),
            "sink_pos": lambda: torch.full((B, N), -1, dtype=torch.long, device=device),
            "ring_fk": lambda: torch.zeros(B, H, W, self.feature_dim(), **f32),
            "state": lambda: torch.zeros(B, H, self.feature_dim(), Dv + self._extra_v(), **f32),
            "norm": lambda: torch.zeros(B, H, self.feature_dim(), **f32),
        }
        return {name: make[name]() for name in self.buffer_names()}

    def _extra_v(self) -> int:
        """gla/liger with `normalize: true` carry the denominator as one more value column of the state."""
        return 1 if self.rewrite in ("gla", "liger") and self.params.get("normalize") else 0


def decide_sites(model, rules, device=None):
    """The backend's decision for every attention site of `model` under `rules` (an explain report on an 8-token
    dummy input, nothing compiled): what a StateCache holds and what a saved checkpoint records."""
    from ..explain import explain

    vocab = getattr(model.config, "vocab_size", 2)
    ids = (torch.arange(8, device=device) % max(vocab - 1, 1) + 1)[None]
    return explain(model, ids, rules=rules, use_cache=False)  # of the plain forward, even if converted in place


def plan_layers(model, rules, num_layers: int, device=None) -> list:
    """One LayerPlan per decoder layer (index = the attention module's `layer_idx`)."""
    from ..patterns.identity import LayerIdentityError, verify_sites
    from ..rewrite import rules as rule_sets

    rules_name = rule_sets.load(rules).name  # as the backend's pass context names it
    report = decide_sites(model, rules, device)
    for site in report.sites:
        if site.identity_problem:  # even kept as softmax: two calls would write one cache slot
            raise LayerIdentityError(f"linearize: StateCache cannot serve this model: {site.identity_problem}")
    verify_sites(model, report.sites)
    plans, paths = {}, {}
    for site in report.sites:
        if site.layer is None:
            if site.rewrite in ("keep", "exact"):
                continue  # kept as softmax: transformers' own layer_idx picks its StaticLayer
            raise LayerIdentityError(f"linearize: cannot tell which layer {site.module_path or site.node.name} is "
                                     "(no layer index in its module path)")
        if site.layer in plans or not 0 <= site.layer < num_layers:
            raise LayerIdentityError(f"linearize: {site.module_path} claims layer {site.layer}, but "
                                     + (f"{paths[site.layer]} claims it too" if site.layer in plans else
                                        f"the model has {num_layers} layers"))
        _, _, hkv, _, _, d, dv = site.shape
        plans[site.layer] = LayerPlan(site.layer, site.rewrite, dict(site.params), rules_name, hkv, d, dv)
        paths[site.layer] = site.module_path
    return [plans.get(i, LayerPlan(i, "keep", rules=rules_name)) for i in range(num_layers)]
