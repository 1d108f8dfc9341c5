"""`linearize plan`: measure what rewriting each layer costs, then keep softmax attention where it costs most.

    plan = linearize.plan(model, rules="liger-sinks", budget=0.25, tokenizer=tok)
    plan.write("plan.yaml")            # an ordinary rule file: torch.compile(..., options={"rules": "plan.yaml"})

A layer's *sensitivity* is the mean per-token KL(original || converted) of the final logits on calibration text when
only that layer is rewritten (every other layer keeps softmax): one compile with the eager inner compiler and one
forward per layer, so minutes on a CPU. The calibration text is the training corpus (`data.read_corpus`), never the
evaluation text. A budget is the share (or number) of attention layers that keep softmax; the most sensitive ones get
it. Single-layer costs need not add up, so `compare` measures the whole plan against the placements people use
without measuring (uniform every-k-th layer, as Liger-H; the first and last layers) at the same number of kept layers.

(Not to be confused with `generation/plan.py`: what a StateCache holds per layer of an already-chosen rewrite.)
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import pathlib
import textwrap
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .options import DEFAULT_RULES

KEPT = ("keep", "exact")  # targets that leave softmax attention in place


class PlanError(ValueError):
    """A plan that cannot be made or written; the message says what to change."""


@dataclass
class LayerCost:
    layer: int
    module: str
    rewrite: str  # what the base rule set does to this layer
    params: dict
    kl: Optional[float] = None  # nats per token; None: the base keeps softmax here (nothing to measure)
    dnll: Optional[float] = None  # NLL(converted) - NLL(original) on the calibration tokens, nats per token


@dataclass
class Plan:
    base: str  # the rule set the plan starts from: a built-in name or a path (what `extends:` names)
    layers: list  # LayerCost, by layer index
    budget: float  # as asked: a share of layers (< 1) or a number of layers (>= 1)
    calibration: dict = field(default_factory=dict)  # corpus, tokens, seq_len
    model: str = ""
    seconds: float = 0.0
    comparison: Optional[dict] = None  # `compare` fills it

    # -- the decision -------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def kept_count(self) -> int:
        """Layers that keep softmax: the budget, never more (0.25 of 30 layers = 7)."""
        n = self.budget if self.budget >= 1 else math.floor(self.budget * self.num_layers + 1e-9)
        return min(int(n), self.num_layers)

    @property
    def keep(self) -> list:
        """The layers that keep softmax: the base's own kept layers, then the most sensitive rewritten ones."""
        already = [c.layer for c in self.layers if c.rewrite in KEPT]
        ranked = _ranked(self.layers)
        extra = max(0, self.kept_count - len(already))
        return sorted(already + [c.layer for c in ranked[:extra]])

    def with_budget(self, budget: float) -> "Plan":
        """The same measurements under another budget (nothing is measured again)."""
        return dataclasses.replace(self, budget=check_budget(budget), comparison=None)

    def rule_set(self):
        """The plan as a RuleSet object (what the written file loads as)."""
        return keep_layers(self.base, self.keep, name=self.name)

    @property
    def name(self) -> str:
        return f"plan-{pathlib.Path(self.base).stem}-{self.kept_count}of{self.num_layers}"

    # -- the file -----------------------------------------------------------------------------------------------
    def yaml(self, path: Optional[pathlib.Path] = None) -> str:
        """The rule file, with each layer's measurement as a comment. `path`: where it will be written (a base given
        as a path is named relative to it, as `extends:` reads it)."""
        keep = self.keep
        base = _extends_spec(self.base, path)
        cal = self.calibration
        lines = [
            f"# Written by `linearize plan` on {datetime.date.today().isoformat()}: {self.model or 'model'}, base rule "
            f"set `{self.base}`,",
            *textwrap.wrap(f"calibration: {cal.get('tokens', '?')} tokens in rows of {cal.get('seq_len', '?')} of "
                           f"{cal.get('corpus', '?')}.", 116, initial_indent="# ", subsequent_indent="#   "),
            "# Sensitivity = mean KL(original || converted) of the final logits, nats per token, when only that layer",
            f"# is rewritten; dNLL = the change in next-token loss. Budget {self.budget:g}: {len(keep)} of "
            f"{self.num_layers} layers keep softmax attention (the most sensitive); the rest follow `{self.base}`.",
            "#",
            "# layer  rewrite   sensitivity      dNLL  rank  decision",
        ]
        ranks = {c.layer: i + 1 for i, c in enumerate(_ranked(self.layers))}
        for c in self.layers:
            if c.rewrite in KEPT:
                lines.append(f"# {c.layer:5d}  {c.rewrite:8s}  {'-':>11s}  {'-':>8s}  {'-':>4s}  softmax (the base keeps it)")
                continue
            decision = "softmax" if c.layer in keep else f"{c.rewrite} {_short_params(c.params)}"
            lines.append(f"# {c.layer:5d}  {c.rewrite:8s}  {c.kl:11.5f}  {c.dnll:+8.4f}  {ranks[c.layer]:4d}  {decision}")
        if self.comparison:
            lines += ["#", "# Measured at the same budget (perplexity on the evaluation document, `linearize plan "
                      "--compare`):"]
            lines += [f"#   {line}" for line in comparison_lines(self.comparison)]
        lines += [
            f"name: {self.name}",
            f"description: {self.base} with softmax kept in the {len(keep)} most sensitive of {self.num_layers} "
            "layers (measured)",
            f"extends: {base}",
        ]
        if keep:
            lines += ["rules:",
                      "  - name: the most sensitive layers keep softmax attention",
                      f"    where: {{layers: \"{', '.join(str(i) for i in keep)}\"}}",
                      "    rewrite: keep"]
        else:
            lines.append("# (no layer keeps softmax at this budget: the base rule set everywhere)")
        return "\n".join(lines) + "\n"

    def write(self, path) -> list:
        """The rule file at `path`, and beside it `<stem>.json` (every measurement) and `<stem>.png` (a bar chart).
        Returns the paths written."""
        path = pathlib.Path(path)
        if path.suffix not in (".yaml", ".yml"):
            raise PlanError(f"{path}: a plan is a rule file; give a path ending in .yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.yaml(path))
        from .rewrite import rules as rule_sets

        rule_sets.load(str(path))  # what we wrote must load as a rule file: fail here, not at the user's compile
        js = path.with_suffix(".json")
        js.write_text(json.dumps(self.to_dict(), indent=1))
        return [path, js, *plot(self, path.with_suffix(".png"))]

    def to_dict(self) -> dict:
        return {"base": self.base, "budget": self.budget, "keep": self.keep, "model": self.model,
                "calibration": self.calibration, "seconds": self.seconds, "comparison": self.comparison,
                "layers": [dataclasses.asdict(c) for c in self.layers]}

    @classmethod
    def from_json(cls, path) -> "Plan":
        """A plan measured before (its `.json`), to write it again under another budget without measuring."""
        path = pathlib.Path(path)
        try:
            data = json.loads(path.read_text())
            layers = [LayerCost(**c) for c in data["layers"]]
            return cls(base=data["base"], layers=layers, budget=data["budget"], calibration=data["calibration"],
                       model=data.get("model", ""), seconds=data.get("seconds", 0.0))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PlanError(f"{path}: not a plan's .json written by `linearize plan` ({exc})") from None


# ---------------------------------------------------------------------------------------------------- measuring
def plan(model, rules=None, budget: float = 0.25, data=None, tokens: int = 4096, seq_len: int = 1024, *,
         tokenizer=None, progress: bool = True, model_name: str = "") -> Plan:
    """Measure each layer's sensitivity to `rules` on calibration text (`data`: see `data.read_corpus`; default the
    training corpus) and return the plan for `budget`. `model` must be unconverted; it is left as it was."""
    from tqdm.auto import tqdm

    from .data import pack, read_corpus
    from .generation.plan import decide_sites

    base = _base_spec(rules)
    budget = check_budget(budget)
    if getattr(model, "_linearize_rules", None) is not None:
        raise PlanError("plan: the model is converted already; give the original model (linearize.revert(model))")
    if model.training:  # dropout would make every measurement noise
        raise PlanError("plan: the model is in training mode; call model.eval() first (dropout changes every forward)")
    report = decide_sites(model, base)
    costs = _layer_costs(report)
    texts, corpus = read_corpus(data)
    rows = pack(texts, tokenizer, seq_len, vocab_size=model.config.vocab_size, source=corpus)
    rows = rows[: max(1, tokens // seq_len)]
    start = time.perf_counter()
    with torch.no_grad():
        teacher = [_log_probs(model, row) for row in rows]
        todo = [c for c in costs if c.rewrite not in KEPT]
        bar = tqdm(todo, desc="plan: layer sensitivity", unit="layer", disable=not progress, dynamic_ncols=True)
        for c in bar:
            others = [o.layer for o in costs if o.layer != c.layer]
            with rewritten(model, keep_layers(base, others, name=f"probe-layer-{c.layer}")):
                c.kl, c.dnll = _divergence(model, rows, teacher)
            bar.set_postfix_str(f"layer {c.layer}: KL {c.kl:.4f}")
    return Plan(base=base, layers=costs, budget=budget, model=model_name or type(model).__name__,
                calibration={"corpus": corpus, "tokens": int(rows.numel()), "seq_len": seq_len},
                seconds=round(time.perf_counter() - start, 1))


def check_budget(budget) -> float:
    budget = float(budget)
    if not (0 <= budget < 1 or (budget >= 1 and budget == int(budget))):
        raise PlanError(f"budget {budget:g}: give a share of layers in [0, 1) or a whole number of layers")
    return budget


def _base_spec(rules) -> str:
    from .rewrite import rules as rule_sets

    if rules is None:
        return DEFAULT_RULES
    if not isinstance(rules, (str, os.PathLike)):
        raise PlanError("plan: give the base rule set as a built-in name or a YAML path (the plan file extends it)")
    spec = str(rules)
    rule_sets.load(spec)  # unknown names and bad files fail here, with the rule-file message
    return spec if spec in rule_sets.available() else str(pathlib.Path(spec).resolve())


def _layer_costs(report) -> list:
    by_layer = {}
    for site in report.sites:
        if site.layer is None:
            raise PlanError(f"plan: the attention at {site.module_path or 'a site'} has no layer index "
                            f"({site.identity_problem or 'not established'}); a per-layer plan needs one")
        if site.layer in by_layer:
            raise PlanError(f"plan: two attention sites claim layer {site.layer}; a per-layer plan needs one each")
        by_layer[site.layer] = LayerCost(layer=site.layer, module=site.module_path, rewrite=site.rewrite or "keep",
                                         params=dict(site.params or {}))
    if not by_layer:
        raise PlanError("plan: no attention site was found in this model (linearize explain lists what was seen)")
    return [by_layer[i] for i in sorted(by_layer)]


def _log_probs(model, row) -> torch.Tensor:
    return model(row[None], use_cache=False).logits.float().log_softmax(-1)[0]


def _divergence(model, rows, teacher) -> tuple:
    """Mean per-token KL(teacher || model) and the change in next-token NLL, over the calibration rows."""
    kl = dnll = 0.0
    count = 0
    for row, t in zip(rows, teacher):
        s = _log_probs(model, row)
        kl += float((t.exp() * (t - s)).sum(-1).sum())
        target = row[1:, None]
        dnll += float((t[:-1].gather(-1, target) - s[:-1].gather(-1, target)).sum())
        count += row.numel()
    return kl / count, dnll / (count - len(rows))


def rewritten(model, rules):
    """`model` converted under `rules` for a block, then reverted. Measuring runs the rewritten graph without
    Inductor (`inner="eager"`): the same numbers without a kernel compile per layer."""
    from .generation import converted

    return converted(model, rules, inner="eager")


def keep_layers(base: Union[str, object], layers, name: str = ""):
    """`base` with softmax kept in `layers` (a first rule that keeps them; first-match semantics does the rest)."""
    from .rewrite import rules as rule_sets
    from .rewrite.rules import Rule
    from .rewrite.selectors import LayerItem, LayerSelector, Where

    rs = rule_sets.load(base)
    layers = sorted(set(int(i) for i in layers))
    if not layers:
        return dataclasses.replace(rs, name=name or rs.name)
    text = ", ".join(str(i) for i in layers)
    keep = Rule(rewrite="keep", where=Where(layers=LayerSelector(tuple(LayerItem(i, i) for i in layers), text)),
                origin=f"{name or 'plan'}: keep layers {text}", name="kept layers")
    return dataclasses.replace(rs, name=name or rs.name, rules=[keep, *rs.rules])


# ---------------------------------------------------------------------------------------------------- placements
def uniform_layers(num_layers: int, count: int) -> list:
    """Every k-th layer, the last of each group of k (Liger-H's layout: 7, 15, 23 for k = 8), `count` of them."""
    if count <= 0:
        return []
    step = max(1, num_layers // count)
    return [step - 1 + step * j for j in range(count)]


def first_last_layers(num_layers: int, count: int) -> list:
    """The first ceil(count/2) and the last floor(count/2) layers (the usual hand-made hybrid)."""
    first = math.ceil(count / 2)
    return sorted(set(range(first)) | set(range(num_layers - (count - first), num_layers)))


def placements(p: Plan) -> dict:
    """Name -> kept layers, all at the plan's count: the plan, and the placements it must beat."""
    n, k = p.num_layers, len(p.keep)
    return {"planned": p.keep, "uniform": uniform_layers(n, k), "first-last": first_last_layers(n, k)}


def compare(model, p: Plan, tokenizer, lengths=(512, 2048), progress: bool = True) -> dict:
    """Perplexity (the evaluation document, `linearize eval`'s sliding window) of: the original model, the base rule
    set everywhere, and each placement at the plan's budget. Stored on the plan and returned."""
    from tqdm.auto import tqdm

    from .evaluate import EvalSpec, evaluate_rows

    rows = [("original", lambda: contextlib.nullcontext(model)),
            (f"{pathlib.Path(p.base).stem} everywhere", lambda: rewritten(model, p.base))]
    for label, layers in placements(p).items():
        rules = keep_layers(p.base, layers, name=label)
        rows.append((f"{label} ({_ranges(layers)})", lambda r=rules: rewritten(model, r)))
    spec = EvalSpec(lengths=tuple(lengths), tasks=("ppl",))
    with tqdm(total=len(rows) * len(lengths), desc="plan: compare", unit="step", disable=not progress,
              dynamic_ncols=True) as bar:
        result = evaluate_rows(rows, tokenizer, spec, progress=bar)
    p.comparison = {"lengths": list(lengths), "kept": len(p.keep), "document": result["document"],
                    "rows": {name: {str(L): round(r["ppl"][str(L)]["ppl"], 3) for L in lengths}
                             for name, r in result["rows"].items()},
                    "seconds": {name: r["seconds"] for name, r in result["rows"].items()}}
    return p.comparison


def comparison_lines(c: dict) -> list:
    """The comparison as an aligned text table (for the YAML comments and the terminal)."""
    from .evaluate import length_label

    width = max(len(n) for n in c["rows"])
    head = f"{'placement':{width}s}  " + "  ".join(f"{'ppl@' + length_label(L):>10s}" for L in c["lengths"])
    return [head] + [f"{name:{width}s}  " + "  ".join(f"{row[str(L)]:10.2f}" for L in c["lengths"])
                     for name, row in c["rows"].items()]


def plot(p: Plan, path: pathlib.Path) -> list:
    """Sensitivity per layer (kept layers highlighted) and, when compared, perplexity per placement."""
    from .report.plots import pyplot

    plt = pyplot("the plan's PNG")
    if plt is None:
        return []
    panels = 2 if p.comparison else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels + 2, 3.6), squeeze=False)
    ax = axes[0][0]
    keep = set(p.keep)
    xs = [c.layer for c in p.layers]
    ys = [c.kl if c.kl is not None else 0.0 for c in p.layers]
    ax.bar(xs, ys, color=["tab:red" if x in keep else "tab:blue" for x in xs])
    ax.set_xlabel("layer")
    ax.set_ylabel("KL when only this layer is rewritten")
    ax.set_title(f"{p.model}: {pathlib.Path(p.base).stem}, red = keeps softmax ({len(keep)})", fontsize=9)
    if p.comparison:
        ax = axes[0][1]
        c = p.comparison
        names = list(c["rows"])
        width = 0.8 / len(c["lengths"])
        for j, L in enumerate(c["lengths"]):
            ax.bar([i + j * width for i in range(len(names))], [c["rows"][n][str(L)] for n in names], width,
                   label=f"{L} tokens")
        ax.set_xticks([i + width * (len(c["lengths"]) - 1) / 2 for i in range(len(names))])
        ax.set_xticklabels([n.split(" (")[0] for n in names], rotation=20, fontsize=8)
        values = [v for row in c["rows"].values() for v in row.values()]
        if max(values) > 20 * min(values):  # a zero-shot recipe far off: log, else bars from 0 read honestly
            ax.set_yscale("log")
        ax.set_ylabel("perplexity")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


# ---------------------------------------------------------------------------------------------------- helpers
def _ranked(costs) -> list:
    """Rewritten layers, most sensitive first (ties: the lower layer)."""
    return sorted((c for c in costs if c.rewrite not in KEPT), key=lambda c: (-c.kl, c.layer))


def _extends_spec(base: str, path: Optional[pathlib.Path]) -> str:
    from .rewrite import rules as rule_sets

    if base in rule_sets.available() or path is None:
        return base
    return os.path.relpath(base, pathlib.Path(path).resolve().parent)


def _short_params(params: dict) -> str:
    keys = ("window", "sinks", "mix", "feature_map", "gate")
    return ", ".join(f"{k}={params[k]}" for k in keys if k in params)


def _ranges(layers) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, layers = [], sorted(layers)
    i = 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        out.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ", ".join(out) or "none"
