"""Where the numbers changed: each rewritten site against the original on the example input, and the model's
output (logits, perplexity on the example tokens) before and after.

Per site, two errors (relative RMS, as the tests and flash-linear-attention measure kernels):
- `local`: the replacement evaluated on the *original* graph's q, k, v (and pre-RoPE q/k) against the original
  attention output: the error this site alone introduces;
- `in_model`: the site's output in the fully rewritten graph against the original: `local` plus everything the
  sites before it changed upstream.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx


def rel_rmse(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().double(), out.detach().double()
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


@dataclass
class SiteNumerics:
    local: Optional[float] = None
    in_model: Optional[float] = None
    max_abs: Optional[float] = None  # of the local difference
    note: str = ""


@dataclass
class ModelNumerics:
    logits_rel: Optional[float] = None
    logits_max_abs: Optional[float] = None
    top1_agreement: Optional[float] = None  # fraction of positions whose argmax token is unchanged
    ppl_before: Optional[float] = None
    ppl_after: Optional[float] = None
    tokens: int = 0
    note: str = ""


@dataclass
class Numerics:
    sites: dict = field(default_factory=dict)  # (graph_id, site index) -> SiteNumerics
    model: Optional[ModelNumerics] = None
    seconds: float = 0.0


class _Recording(fx.Interpreter):
    def __init__(self, gm, wanted):
        super().__init__(gm, garbage_collect_values=True)
        self.wanted, self.values = wanted, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.wanted:
            self.values[n.name] = out
        return out


def _new_nodes_of(site_node: fx.Node, before_names) -> list:
    """The replacement's nodes (not in the original graph) that the site's new output depends on, in graph order."""
    seen, stack = set(), [site_node]
    while stack:
        n = stack.pop()
        if n in seen or n.name in before_names:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(site_node.graph.nodes)}
    return sorted(seen, key=order.get)


def site_numerics(capture) -> dict:
    """SiteNumerics per site index of one captured graph (needs the graphs and inputs kept by the Recorder)."""
    ctx = capture.ctx
    out = {}
    if capture.original is None or capture.rewritten is None or capture.example_inputs is None or not ctx.sites:
        return {i: SiteNumerics(note="graphs not kept") for i in range(len(ctx.sites) if ctx else 0)}
    before_names = set(capture.before.nodes)
    new_by_site = [_new_nodes_of(s.node, before_names) if s.node.name not in before_names else []
                   for s in ctx.sites]
    wanted = set(capture.site_outputs)
    for nodes in new_by_site:
        for n in nodes:
            wanted.update(i.name for i in n.all_input_nodes if i.name in before_names)
    with torch.no_grad():
        orig = _Recording(capture.original, wanted)
        orig.run(*capture.example_inputs)
        rewritten = _Recording(capture.rewritten, {s.node.name for s in ctx.sites})
        rewritten.run(*capture.example_inputs)
        by_name = {n.name: n for n in capture.rewritten.graph.nodes}
        for i, (site, old, nodes) in enumerate(zip(ctx.sites, capture.site_outputs, new_by_site)):
            ref = orig.values.get(old)
            if not isinstance(ref, torch.Tensor):
                out[i] = SiteNumerics(note="original output not recorded")
                continue
            if not nodes:
                out[i] = SiteNumerics(local=0.0, in_model=_maybe_rel(ref, rewritten.values.get(site.node.name)),
                                      max_abs=0.0, note="unchanged (kept)")
                continue
            interp = fx.Interpreter(capture.rewritten, garbage_collect_values=False)
            for name, val in orig.values.items():
                if name in by_name:
                    interp.env[by_name[name]] = val
            for n in nodes:
                interp.env[n] = interp.run_node(n)
            new = interp.env[site.node]
            new = new.reshape(ref.shape) if new.numel() == ref.numel() else new
            out[i] = SiteNumerics(local=rel_rmse(ref, new), max_abs=(ref.double() - new.double()).abs().max().item(),
                                  in_model=_maybe_rel(ref, rewritten.values.get(site.node.name)))
    return out


def _maybe_rel(ref, val) -> Optional[float]:
    if isinstance(val, torch.Tensor) and val.numel() == ref.numel():
        return rel_rmse(ref, val.reshape(ref.shape))
    return None


def _logits(output) -> Optional[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _token_ids(args, kwargs) -> Optional[torch.Tensor]:
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point():
        return ids
    return None


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) of `ids` under `logits` [B, T, V]."""
    lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return math.exp(nll.mean().item())


def model_numerics(reference_output, rewritten_output, args, kwargs) -> ModelNumerics:
    ref, new = _logits(reference_output), _logits(rewritten_output)
    if ref is None or new is None or ref.shape != new.shape:
        return ModelNumerics(note="the model's output has no logits tensor to compare")
    ref, new = ref.detach(), new.detach()
    m = ModelNumerics(logits_rel=rel_rmse(ref, new), logits_max_abs=(ref.double() - new.double()).abs().max().item())
    if ref.dim() >= 2:
        m.top1_agreement = (ref.argmax(-1) == new.argmax(-1)).double().mean().item()
    ids = _token_ids(args, kwargs)
    if ids is not None and ref.dim() == 3 and ref.shape[:2] == ids.shape and ids.shape[1] > 1:
        m.ppl_before, m.ppl_after, m.tokens = perplexity(ref, ids), perplexity(new, ids), int(ids.numel())
    return m
