"""`linearize.explain(model, *args, rules=..., **kwargs)`: what the backend would do to a model, without doing it.

The model is captured by Dynamo exactly as `torch.compile(model, backend="linearize")` would, the pass pipeline
runs on every captured graph, and the rewritten graphs run in eager mode once on the example input (so the report
reflects a run that really happened). Like `torch._dynamo.explain`, it resets Dynamo's caches before and after.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .backend import linearize_backend


@dataclass
class Report:
    rules: str
    contexts: list = field(default_factory=list)  # one PassContext per captured graph

    @property
    def sites(self) -> list:
        return [s for ctx in self.contexts for s in ctx.sites]

    @property
    def unmatched(self) -> list:
        return [u for ctx in self.contexts for u in ctx.unmatched]

    @property
    def graphs(self) -> int:
        return len(self.contexts)

    @property
    def pass_seconds(self) -> float:
        return sum(sum(ctx.timings.values()) for ctx in self.contexts)

    def counts(self) -> dict:
        """Sites per rewrite target, e.g. {"liger": 30}."""
        out = {}
        for s in self.sites:
            out[s.rewrite] = out.get(s.rewrite, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {
            "rules": self.rules,
            "graphs": self.graphs,
            "pass_seconds": self.pass_seconds,
            "sites": [s.summary() for s in self.sites],
            "unmatched": [vars(u) for u in self.unmatched],
        }

    def table(self):
        """A rich Table: one row per site."""
        from rich.table import Table

        t = Table(title=f"attention sites under rules={self.rules!r} ({self.graphs} graph(s))")
        for col in ("layer", "module", "pattern", "heads q/kv", "causal", "provenance", "rewrite", "note"):
            t.add_column(col)
        for s in self.sites:
            B, Hq, Hkv, L, S, D, Dv = s.shape
            causal = "yes" if s.is_causal else ("mask" if s.attn_mask is not None else "no")
            prov = f"k_proj {s.provenance.k_proj_path}" if s.provenance else f"missing: {s.provenance_missing}"
            t.add_row(str(s.layer), s.module_path, s.pattern, f"{Hq}/{Hkv}", causal, prov, s.rewrite or "",
                      s.reason or "")
        return t

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=160, record=True, file=open("/dev/null", "w"))
        console.print(self.table())
        for u in self.unmatched:
            console.print(f"unmatched {u.node} ({u.module_path or '-'}): {u.reason}")
        return console.export_text()


def explain(model, *args, rules="liger", **kwargs) -> Report:
    """Capture `model(*args, **kwargs)` with Dynamo, run linearize's passes, return what they found and decided."""
    report = Report(rules=str(getattr(rules, "name", rules)))

    def backend(gm, example_inputs):
        return linearize_backend(gm, example_inputs, options={"rules": rules, "inner": "eager",
                                                              "record": report.contexts.append})

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            torch.compile(model, backend=backend)(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return report
