"""What a report shows about each site and each unmatched softmax, computed once from the sites and snapshots
and shared by the text table, the JSON, the DOT and the HTML."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from .capture import _forward_extent, _same_file, model_frame, rule_location, site_frames
from .snapshot import Frame


def _fmt_param(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt_param(x) for x in v) + "]"
    return str(v)


@dataclass
class SiteView:
    index: int  # position in report.sites
    graph_id: int
    local_index: int  # position in its graph's ctx.sites
    site: object  # AttentionSite
    capture: object  # Capture or None
    frames: list  # Frame, outermost first
    numerics: object = None  # SiteNumerics or None

    @property
    def anchor(self) -> str:
        return f"site-{self.index}"

    @property
    def source(self) -> Optional[Frame]:
        return self.frames[-1] if self.frames else None

    @property
    def model_source(self) -> Optional[Frame]:
        return model_frame(self.frames)

    @property
    def module_source(self) -> Optional[Frame]:
        """The line in the attention module's own `forward` that led to this site (the call into the attention
        function, or the softmax line itself), when the module's class is known; else the innermost model frame."""
        cap = self.capture
        cls = cap.site_classes[self.local_index] if cap is not None and self.local_index < len(cap.site_classes) \
            else None
        ext = _forward_extent(cls) if cls is not None else None
        if ext:
            file, lo, hi = ext
            for f in reversed(self.frames):
                if _same_file(f.file, file) and lo <= f.line <= hi:
                    return f
        return self.model_source

    @property
    def source_text(self) -> str:
        f = self.module_source
        return f.where() if f else ""

    @property
    def rule_where(self) -> Optional[str]:
        return rule_location(self.site.rule)

    @property
    def params_text(self) -> str:
        return ", ".join(f"{k}={_fmt_param(v)}" for k, v in self.site.params.items())

    @property
    def rewrite_text(self) -> str:
        return self.site.rewrite or ""

    @property
    def kept(self) -> bool:
        return self.site.rewrite in (None, "keep")

    @property
    def original_output(self) -> str:
        cap = self.capture
        if cap is not None and self.local_index < len(cap.site_outputs):
            return cap.site_outputs[self.local_index]
        nodes = self.site.matched_nodes or [self.site.node]
        return nodes[-1].name

    @property
    def provenance_text(self) -> str:
        s = self.site
        if s.provenance is None:
            return f"not found: {s.provenance_missing}"
        p = s.provenance
        return (f"pre-RoPE q = {p.q_pre_rope.name}, pre-RoPE k = {p.k_pre_rope.name}; key projection "
                f"{p.k_proj_path or '-'}" + (f" ({p.k_proj.name})" if p.k_proj is not None else "")
                + f"; RoPE {p.rope or 'none'}")

    @property
    def numerics_text(self) -> str:
        n = self.numerics
        if n is None:
            return ""
        if n.local is None:
            return n.note or "-"
        return f"{n.local:.2e} / {n.in_model:.2e}" if n.in_model is not None else f"{n.local:.2e}"

    def node_names(self) -> dict:
        """Roles of the original graph's nodes for drawings: matched, operand (q/k/v/mask), provenance."""
        s = self.site
        roles = {}
        for n in s.matched_nodes or []:
            roles[n.name] = "matched"
        roles[self.original_output] = "matched"
        for n in (s.q, s.k, s.v, s.attn_mask, getattr(s, "sinks", None)):
            if n is not None and hasattr(n, "name"):
                roles.setdefault(n.name, "operand")
        if s.provenance is not None:
            for n in (s.provenance.q_pre_rope, s.provenance.k_pre_rope, s.provenance.k_proj):
                if n is not None:
                    roles.setdefault(n.name, "provenance")
        return roles

    def to_dict(self) -> dict:
        d = self.site.summary()
        src, inner = self.module_source, self.source
        d.update({
            "index": self.index,
            "graph": self.graph_id,
            "source": src.where() if src else None,
            "source_function": src.function if src else None,
            "source_code": src.code if src else None,
            "source_innermost": inner.where() if inner else None,
            "rule_location": self.rule_where,
            "matched_nodes": [n.name for n in self.site.matched_nodes],
            "original_output": self.original_output,
        })
        if self.numerics is not None:
            d["numerics"] = vars(self.numerics)
        return d


def site_views(report) -> list:
    views, index = [], 0
    num = report.numerics
    for ctx in report.contexts:
        cap = report.captures.get(ctx.graph_id)
        for i, site in enumerate(ctx.sites):
            views.append(SiteView(index=index, graph_id=ctx.graph_id, local_index=i, site=site, capture=cap,
                                  frames=site_frames(site, cap, i),
                                  numerics=num.sites.get((ctx.graph_id, i)) if num is not None else None))
            index += 1
    return views


_PATTERN_PREFIX = re.compile(r"^([A-Za-z_][\w.-]*):\s")


@dataclass
class UnmatchedView:
    index: int
    graph_id: int
    unmatched: object  # patterns.Unmatched
    capture: object
    frames: list

    @property
    def anchor(self) -> str:
        return f"unmatched-{self.index}"

    @property
    def pattern(self) -> Optional[str]:
        """The pattern that matched partly: `Unmatched.pattern` when the library fills it, else the `NAME: ` prefix
        the pattern library puts on its reasons."""
        p = getattr(self.unmatched, "pattern", None)
        if p:
            return str(p)
        m = _PATTERN_PREFIX.match(self.unmatched.reason or "")
        return m.group(1) if m else None

    @property
    def reason_text(self) -> str:
        """The reason without the `pattern: ` prefix (the pattern is shown on its own)."""
        reason = self.unmatched.reason or ""
        p = self.pattern
        return reason[len(p) + 2:] if p and reason.startswith(p + ": ") else reason

    @property
    def near_miss(self) -> bool:
        return self.pattern is not None

    @property
    def partial(self) -> list:
        return [getattr(n, "name", n) for n in (getattr(self.unmatched, "partial", None) or [])]

    @property
    def source(self) -> Optional[Frame]:
        return model_frame(self.frames)

    @property
    def source_text(self) -> str:
        f = self.source
        return f.where() if f else ""

    def to_dict(self) -> dict:
        d = {k: (v if isinstance(v, (str, int, float, bool, type(None))) else str(v))
             for k, v in vars(self.unmatched).items()}
        d.update({"graph": self.graph_id, "near_miss": self.near_miss, "pattern": self.pattern,
                  "partial": self.partial, "source": self.source_text or None})
        return d


def unmatched_views(report) -> list:
    views, index = [], 0
    for ctx in report.contexts:
        cap = report.captures.get(ctx.graph_id)
        for u in ctx.unmatched:
            info = cap.before.get(u.node) if cap is not None and cap.before is not None else None
            views.append(UnmatchedView(index=index, graph_id=ctx.graph_id, unmatched=u, capture=cap,
                                       frames=info.frames if info is not None else []))
            index += 1
    return views


def attention_frames(report) -> list:
    """(label, attention module class or None, frames, anchor) for every site and unmatched attention-like node: what a
    graph break is checked against."""
    out = []
    for v in site_views(report):
        cap = v.capture
        cls = cap.site_classes[v.local_index] if cap is not None and v.local_index < len(cap.site_classes) else None
        out.append((f"site {v.index} ({v.site.module_path or v.original_output})", cls, v.frames, v.anchor))
    for u in unmatched_views(report):
        if u.near_miss:
            out.append((f"near-miss {u.unmatched.node} ({u.unmatched.module_path or '-'})", None, u.frames,
                        u.anchor))
    return out


def describe_inputs(args, kwargs) -> str:
    parts = []

    def one(name, v):
        if isinstance(v, torch.Tensor):
            dims = "×".join(str(d) for d in v.shape)
            parts.append(f"{name}: {dims} {str(v.dtype).replace('torch.', '')}")

    for i, a in enumerate(args):
        one(f"arg{i}", a)
    for k, v in kwargs.items():
        one(k, v)
    return ", ".join(parts)
