"""Pass: decide each site's rewrite from the rule set; a target that cannot take a site keeps it, with the reason.

One refusal is an error instead: a site that reads more keys than this graph projected (a decoding step over a
growing transformers KV cache) while the rules want a window or linear rewrite. Keeping softmax there would
continue a linear prefill with softmax decoding: a silently different model. Decoding needs a `StateCache`.
"""
from ..patterns.graph import arg, is_op, shape
from ..patterns.layout import skip_casts
from ..rewrite.targets import STATEFUL, TARGETS
from .bind_state_cache import StateCacheError

KV_CACHE_DECODING = (
    "linearize: {module} is decoded with a growing transformers KV cache (query length {L}, key length {S}), but "
    "rules {rules!r} rewrite it as {rewrite}: softmax over the cached keys would not continue the {rewrite} prefill. "
    "Decode with past_key_values=linearize.StateCache(model) (docs/decoding.md), or pass use_cache=False.")


def apply_rules(gm, ctx):
    for site in ctx.sites:
        rule = ctx.rules.decide(site)
        if rule is None:
            site.rewrite, site.params, site.rule = "keep", {}, None
            site.reason = f"no rule in {ctx.rules.name} selects this site"
            continue
        site.rule = rule.origin
        if site.identity_problem and rule.rewrite not in ("keep", "exact"):
            why = site.identity_problem  # per-layer state or rules cannot tell this site from another
        else:
            why = TARGETS[rule.rewrite].check(site, rule.params)
        if why:
            _refuse_kv_cache_decoding(site, rule, ctx)
            site.rewrite, site.params, site.reason = "keep", {}, f"{rule.rewrite} not applicable: {why}"
        else:
            site.rewrite, site.params, site.reason = rule.rewrite, dict(rule.params), None
    return gm


def _is_cached_past(node) -> bool:
    src = skip_casts(node)
    return getattr(src, "op", None) == "placeholder" and len(src.users) == 1 and 0 not in (shape(node) or (0,))


def _refuse_kv_cache_decoding(site, rule, ctx) -> None:
    """Keys concatenated onto a non-empty graph input that nothing else reads: a cache filled by an earlier call
    (not cross-attention over a memory, whose lengths also differ)."""
    if rule.rewrite not in STATEFUL or site.state is not None:
        return
    k = skip_casts(site.k)
    parts = arg(k, 0, "tensors") if is_op(k, "cat") else ()
    if any(_is_cached_past(p) for p in parts[:-1]):
        _, _, _, L, S, _, _ = site.shape
        raise StateCacheError(KV_CACHE_DECODING.format(module=site.module_path, L=L, S=S, rules=ctx.rules.name,
                                                       rewrite=rule.rewrite))
