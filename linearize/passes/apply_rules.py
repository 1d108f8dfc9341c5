"""Pass: decide each site's rewrite from the rule set; a target that cannot take a site keeps it, with the reason."""
from ..rewrite.targets import TARGETS


def apply_rules(gm, ctx):
    for site in ctx.sites:
        rule = ctx.rules.decide(site)
        if rule is None:
            site.rewrite, site.params, site.rule = "keep", {}, None
            site.reason = f"no rule in {ctx.rules.name} selects this site"
            continue
        site.rule = rule.origin
        why = TARGETS[rule.rewrite].check(site, rule.params)
        if why:
            site.rewrite, site.params, site.reason = "keep", {}, f"{rule.rewrite} not applicable: {why}"
        else:
            site.rewrite, site.params, site.reason = rule.rewrite, dict(rule.params), None
    return gm
