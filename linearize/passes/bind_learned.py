"""Pass: hand each site the parameters its rule learns, and remove the `linearize::learned` ops that lifted them.

`linearize.convert` registers learned parameters on the attention modules and passes each through
`linearize::learned(x, p, name)` in a pre-hook (lowering/learned_ops.py), so the op carries the module's
`nn_module_stack`: a site takes the parameter whose op sits in its own module. A site that learns a parameter the
model does not carry is an error (`options.learned="require"`, the backend's default: running the constant would
silently train nothing and ignore trained values); `explain` and the planners ask for "initial" and see the
constant the parameter would start from.
"""
from __future__ import annotations

import torch

from ..patterns.graph import value
from ..patterns.identity import module_path
from ..rewrite.learned import LEARNABLE, learned_names

PARAMETERS_ATTR = "linearize_learned"  # the nn.ParameterDict convert registers on each attention module


class LearnedParameterError(ValueError):
    """A rule learns a parameter the compiled model does not carry, or carries with another shape."""


def is_learned_op(node) -> bool:
    op = torch.ops.linearize.learned  # Dynamo records the packet, later stages the overload
    return node.op == "call_function" and node.target in (op, op.default)


def bind_learned(gm, ctx):
    ops = [n for n in gm.graph.nodes if is_learned_op(n)]
    lifted: dict = {}
    for n in ops:
        lifted.setdefault((module_path(n), n.args[2]), []).append(n.args[1])
    mode = getattr(ctx.options, "learned", "require")
    for site in ctx.sites:
        site.learned = {}
        for name in learned_names(site.params):
            found = lifted.get((site.module_path, name), [])
            where = f"{site.module_path or site.node.name}.{PARAMETERS_ATTR}.{name}"
            if len(found) > 1:
                raise LearnedParameterError(f"linearize: {len(found)} learned `{name}` parameters reach the attention "
                                            f"at {site.module_path}; one module, one parameter")
            if not found:
                if mode == "initial":
                    continue
                raise LearnedParameterError(
                    f"linearize: rules {ctx.rules.name!r} learn `{name}` at {site.module_path or site.node.name}, but "
                    f"the model carries no {where}: a backend cannot add parameters to a model. Convert with "
                    "linearize.convert(model, rules=...) (it registers them; docs/rule-files.md, \"Learned "
                    "parameters\"), or give the parameter a constant")
            want = tuple(LEARNABLE[site.rewrite][name].shape(site))
            have = tuple(getattr(value(found[0]), "shape", want))
            if have != want:
                raise LearnedParameterError(
                    f"linearize: {where} has shape {list(have)} but this site needs {list(want)} "
                    f"({LEARNABLE[site.rewrite][name].what}): it was made for another model or rule set")
            site.learned[name] = found[0]
    for n in ops:
        n.replace_all_uses_with(n.args[0])
        gm.graph.erase_node(n)
    return gm
