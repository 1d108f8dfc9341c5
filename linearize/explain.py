"""`linearize.explain(model, *args, rules=..., **kwargs)`: what the backend would do to a model, without doing it.

The model is captured by Dynamo exactly as `torch.compile(model, backend="linearize")` would, the pass pipeline
runs on every captured graph, and the rewritten graphs run in eager mode once on the example input (so the report
reflects a run that really happened). Like `torch._dynamo.explain`, it resets Dynamo's caches before and after.

The Report lists every attention site (where it came from in the model's source, the pattern that matched, the
rule that decided it and where that rule is written, the rewrite and its parameters, the provenance found), every
softmax left alone and every near-miss with its reason, Dynamo's graph breaks (and whether one cuts through
attention), and, with `numerics=True`, each site's error against the original and the model's logit/perplexity
change. `report.write_html(path)` draws each site before and after the rewrite; `report.to_dot()` gives DOT.
"""
from __future__ import annotations

import io

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .backend import linearize_backend


@dataclass
class Report:
    rules: str
    contexts: list = field(default_factory=list)  # one PassContext per captured graph
    captures: dict = field(default_factory=dict)  # graph_id -> report.capture.Capture (snapshots before/after)
    graph_breaks: list = field(default_factory=list)  # report.capture.GraphBreak
    numerics: Optional[object] = None  # report.numerics.Numerics, when asked for
    model: str = ""  # the model's class name
    inputs: str = ""  # the example input, described
    seconds: dict = field(default_factory=dict)  # "capture", "numerics": wall time

    @property
    def sites(self) -> list:
        return [s for ctx in self.contexts for s in ctx.sites]

    @property
    def unmatched(self) -> list:
        return [u for ctx in self.contexts for u in ctx.unmatched]

    @property
    def near_misses(self) -> list:
        """Unmatched entries where a pattern matched partly (it names itself), as opposed to plain softmaxes."""
        from .report.views import unmatched_views

        return [v.unmatched for v in unmatched_views(self) if v.near_miss]

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

    def site_views(self) -> list:
        """One `report.views.SiteView` per site: the site with its source location, rule location, numerics."""
        from .report.views import site_views

        return site_views(self)

    def to_dict(self) -> dict:
        from .report.views import site_views, unmatched_views

        out = {
            "rules": self.rules,
            "model": self.model,
            "inputs": self.inputs,
            "graphs": self.graphs,
            "pass_seconds": self.pass_seconds,
            "sites": [v.to_dict() for v in site_views(self)],
            "unmatched": [v.to_dict() for v in unmatched_views(self)],
            "graph_breaks": [b.summary() for b in self.graph_breaks],
        }
        if self.numerics is not None and self.numerics.model is not None:
            out["model_numerics"] = vars(self.numerics.model)
        return out

    def table(self):
        """A rich Table: one row per site."""
        from rich.table import Table

        from .report.views import site_views

        views = site_views(self)
        with_numerics = any(v.numerics is not None for v in views)
        t = Table(title=f"attention sites under rules={self.rules!r} ({self.graphs} graph(s))")
        cols = ["layer", "module", "source", "pattern", "heads q/kv", "causal", "provenance", "rule", "rewrite",
                "note"]
        if with_numerics:
            cols.insert(-1, "err local/model")
        for col in cols:
            t.add_column(col, overflow="fold")
        for v in views:
            s = v.site
            B, Hq, Hkv, L, S, D, Dv = s.shape
            causal = "yes" if s.is_causal else ("mask" if s.attn_mask is not None else "no")
            prov = f"k_proj {s.provenance.k_proj_path}" if s.provenance else f"missing: {s.provenance_missing}"
            src = v.module_source
            row = [str(s.layer), s.module_path, f"{src.where().rsplit('/', 1)[-1]}" if src else "", s.pattern, f"{Hq}/{Hkv}", causal, prov,
                   (v.rule_where or "-").rsplit("/", 1)[-1], v.rewrite_text, s.reason or ""]
            if with_numerics:
                row.insert(-1, v.numerics_text)
            t.add_row(*row)
        return t

    def __str__(self) -> str:
        from rich.console import Console

        from .report.views import unmatched_views

        console = Console(width=200, record=True, file=io.StringIO())  # recorded, not written anywhere
        console.print(self.table())
        for v in unmatched_views(self):
            kind = f"near-miss ({v.pattern})" if v.near_miss else "softmax left alone"
            where = f" at {v.source_text}" if v.source_text else ""
            partial = f"; matched partly: {', '.join(v.partial)}" if v.partial else ""
            console.print(f"{kind}: {v.unmatched.node} ({v.unmatched.module_path or '-'}){where}: "
                          f"{v.unmatched.reason}{partial}", markup=False)
        for b in self.graph_breaks:
            where = f" at {b.location.where()} in {b.location.function}" if b.location else ""
            inside = f" [inside attention: {b.in_attention}]" if b.in_attention else ""
            console.print(f"graph break{where}: {b.reason.splitlines()[0]}{inside}", markup=False)
        if self.numerics is not None and self.numerics.model is not None:
            m = self.numerics.model
            if m.logits_rel is not None:
                line = f"model output: logits rel. error {m.logits_rel:.3g}, max |diff| {m.logits_max_abs:.3g}"
                if m.top1_agreement is not None:
                    line += f", top-1 agreement {m.top1_agreement:.1%}"
                if m.ppl_before is not None:
                    line += f", perplexity on the example {m.ppl_before:.3f} -> {m.ppl_after:.3f}"
                console.print(line, markup=False)
            elif m.note:
                console.print(f"model output: {m.note}", markup=False)
        return console.export_text()

    # ----- drawings -------------------------------------------------------------------------------------------

    def to_dot(self, site=None, stage: str = "after") -> str:
        """Graphviz DOT. With `site` (an index into `report.sites`, or an AttentionSite): that site's subgraph
        `stage`="before" or "after" the rewrite, matched/new nodes highlighted. Without: the whole captured
        graph(s) after the rewrite, clustered by module, every site highlighted (large: meant for files/tools)."""
        from .report.render import report_dot, site_dot

        if site is None:
            return report_dot(self, stage)
        return site_dot(self, site, stage)

    def write_html(self, path) -> str:
        """Write a self-contained HTML report (summary table, near-misses, graph breaks, numerics, and per site
        the subgraph before and after the rewrite as SVG). Returns the path."""
        from .report.html import write_html

        return write_html(self, path)

    def write_json(self, path) -> str:
        import json

        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1, default=str)
        return str(path)


def explain(model, *args, rules=None, numerics: bool = False, debug_dir: Optional[str] = None,
            **kwargs) -> Report:
    """Capture `model(*args, **kwargs)` with Dynamo, run linearize's passes, return what they found and decided.

    `numerics=True` also measures each rewritten site against the original on this input, and the model's output
    (logits, perplexity on the example tokens) against an eager run of the unmodified model. `debug_dir` writes the
    graph after each pass there (as `options={"debug_dir": ...}` does)."""
    from .options import DEFAULT_RULES
    from .passes import DEFAULT_PIPELINE
    from .report.capture import Capture, Recorder, collect_graph_breaks
    from .report.views import attention_frames, describe_inputs

    rules = DEFAULT_RULES if rules is None else rules
    report = Report(rules=str(getattr(rules, "name", rules)), model=type(model).__name__,
                    inputs=describe_inputs(args, kwargs))
    last_stage = DEFAULT_PIPELINE[-1].name

    def backend(gm, example_inputs):
        # graph ids are process-wide; the capture is keyed by the id the pass context gets
        holder = Capture(graph_id=-1)
        reason = getattr(gm, "compile_subgraph_reason", None)
        holder.compile_reason = getattr(reason, "reason", None) if reason is not None else None
        recorder = Recorder(holder, last_stage, keep_graphs=numerics)

        def record(ctx):
            holder.graph_id = ctx.graph_id
            holder.ctx = ctx
            report.contexts.append(ctx)
            report.captures[ctx.graph_id] = holder

        options = {"rules": rules, "inner": "eager", "record": record, "observe": recorder, "learned": "initial"}
        if debug_dir:
            options["debug_dir"] = str(debug_dir)
        compiled = linearize_backend(gm, example_inputs, options=options)
        if numerics:
            holder.example_inputs = list(example_inputs)
        return compiled

    from torch._dynamo.utils import graph_break_reasons

    from .generation.convert import uncompiled

    torch._dynamo.reset()
    start = time.perf_counter()
    try:
        with torch.no_grad(), uncompiled(model):  # a converted model: capture its original forward
            output = torch.compile(model, backend=backend)(*args, **kwargs)
        breaks = list(graph_break_reasons)
    finally:
        torch._dynamo.reset()
    report.seconds["capture"] = time.perf_counter() - start
    report.graph_breaks = collect_graph_breaks(breaks, attention_frames(report))
    if numerics:
        start = time.perf_counter()
        _measure(report, model, args, kwargs, output)
        report.seconds["numerics"] = time.perf_counter() - start
    return report


def _measure(report: Report, model, args, kwargs, output) -> None:
    from .report.numerics import Numerics, model_numerics, site_numerics

    num = Numerics()
    for gid, cap in report.captures.items():
        for i, val in site_numerics(cap).items():
            num.sites[(gid, i)] = val
        cap.original = cap.rewritten = cap.example_inputs = None  # release the graphs and inputs
    with torch.no_grad():
        reference = model(*args, **kwargs)
    num.model = model_numerics(reference, output, args, kwargs)
    report.numerics = num
