"""The one canonical record of a softmax-attention occurrence in a graph.

Every pattern, whatever shape the attention had in the source model (an SDPA call, a hand-written
matmul/softmax chain, GQA expanded or not), is canonicalised into an `AttentionSite`, so rewrites never see the
variety: they read q, k, v (k and v at their own number of KV heads), scale, mask and causality from here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx


@dataclass
class Provenance:
    """Where a site's q and k came from, found by walking the graph backwards.

    `q_pre_rope` / `k_pre_rope` are the per-head projections before any rotary embedding, in the same
    [B, H, T, D] layout as the attention inputs (k at its KV-head count). `k_proj` is the `linear` call that
    produced the keys: the Liger gate is a function of its output, so the gate needs no new parameters.
    """

    q_pre_rope: fx.Node
    k_pre_rope: fx.Node
    k_proj: Optional[fx.Node]
    k_proj_path: Optional[str]
    rope: Optional[str]  # "rotate_half", or None when the model applies no rotary embedding

    def describe(self) -> str:
        rope = self.rope or "none"
        return f"q<-{self.q_pre_rope.name}, k<-{self.k_pre_rope.name} (k_proj {self.k_proj_path}, rope {rope})"


@dataclass
class NearMiss:
    """A pattern matched part of an attention shape, then failed: why, and the nodes it had covered."""

    reason: str
    partial: list = field(default_factory=list)  # node names


@dataclass
class StateBinding:
    """A site whose keys come from a `StateCache` layer (decoding): the marker and what it carries.

    `plan` is the layer's plan as the cache was built (rules, rewrite, params); `buffers` maps buffer names
    (generation/plan.py BUFFERS) to the graph inputs holding them; `pos0` is the chunk's first position."""

    marker: fx.Node
    layer: int
    plan: dict
    pos0: fx.Node
    buffers: dict
    capacity: int


@dataclass
class AttentionSite:
    """One matched attention: `out = softmax(scale * q @ k^T + mask) @ v`, heads grouped for GQA."""

    node: fx.Node  # the node whose value is the attention output, [B, Hq, L, Dv]
    q: fx.Node  # [B, Hq, L, D], after RoPE
    k: fx.Node  # [B, Hkv, S, D], after RoPE, GQA not expanded
    v: fx.Node  # [B, Hkv, S, Dv]
    scale: float
    is_causal: bool
    attn_mask: Optional[fx.Node]
    gqa_groups: int  # query heads per KV head
    pattern: str  # name of the pattern that matched
    module_path: str  # the model's own module name ("model.layers.3.self_attn"), root dropped
    layer: Optional[int]  # index in the decoder-layer list (patterns/identity.py); None when not established
    dropout_p: float = 0.0
    shape: tuple = ()  # (B, Hq, Hkv, L, S, D, Dv) at capture time
    matched_nodes: list = field(default_factory=list)  # every node the pattern covered, output last
    softcap: Optional[float] = None  # scores = softcap * tanh(scores / softcap) (gemma2)
    sinks: Optional[fx.Node] = None  # per-head sink logits joining the softmax denominator (gpt-oss)
    mask_kind: Optional[str] = None  # "mask" (only hides keys) or "bias" (adds values, e.g. ALiBi)
    out_rank: int = 4  # 3 when the model wrote the 3-D [B*H, T, D] bmm form
    mask_rows: Optional[int] = None  # largest query-dim size among the masks: 1 means key padding only
    mask_example: Optional[str] = None  # the mask on the example input: causal, bidirectional, padded or cache
    state: Optional[StateBinding] = None  # set when a StateCache feeds the keys (decoding)
    module_class: Optional[type] = None  # the module's class as Dynamo recorded it (checked against the model)
    identity_problem: Optional[str] = None  # why the layer cannot be told apart; the site then keeps softmax

    @property
    def causality(self) -> str:
        """"causal", "mask" (explicit mask: causal or sliding window checked at run time) or "none"."""
        if self.is_causal or self.state is not None:  # a StateCache's mask is causal (checked at run time)
            return "causal"
        L = self.shape[3] if self.shape else None
        if self.attn_mask is None or (self.mask_rows == 1 and L != 1) or self.mask_example == "bidirectional":
            return "none"
        return "mask"
    provenance: Optional[Provenance] = None
    provenance_missing: Optional[str] = None  # why provenance could not be found
    # filled by the rule pass
    rewrite: Optional[str] = None
    params: dict = field(default_factory=dict)
    rule: Optional[str] = None
    reason: Optional[str] = None  # why the site was kept, when it was
    learned: dict = field(default_factory=dict)  # learned parameter name -> its graph node (passes/bind_learned.py)

    @property
    def provenance_found(self) -> bool:
        return self.provenance is not None

    def summary(self) -> dict:
        """Plain-data view for reports and JSON."""
        return {
            "layer": self.layer,
            "module_path": self.module_path,
            "pattern": self.pattern,
            "shape": dict(zip(("B", "Hq", "Hkv", "L", "S", "D", "Dv"), self.shape)),
            "scale": self.scale,
            "is_causal": self.is_causal,
            "causality": self.causality,
            "mask_example": self.mask_example,
            "mask": self.attn_mask.name if self.attn_mask is not None else None,
            "gqa_groups": self.gqa_groups,
            "softcap": self.softcap,
            "sinks": self.sinks is not None,
            "mask_kind": self.mask_kind,
            "provenance": self.provenance.describe() if self.provenance else None,
            "provenance_missing": self.provenance_missing,
            "rewrite": self.rewrite,
            "params": dict(self.params),
            "rule": self.rule,
            "reason": self.reason,
        }
