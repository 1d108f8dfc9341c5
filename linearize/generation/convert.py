"""`linearize.convert(model, rules=...)`: compile a model in place with the linearize backend, for generation too.

`torch.compile(model, backend="linearize")` returns a wrapper whose `.generate` still calls the original forward
(transformers' `generate` calls `self(...)` on the wrapped module). `nn.Module.compile` compiles the module in place,
so `model(...)` and `model.generate(...)` both run the rewritten graphs. The rule set is recorded on the model so a
`StateCache(model)` holds the state of the same rewrite.
"""
from __future__ import annotations


def convert(model, rules=None, **options):
    """Compile `model` in place with backend="linearize" and `options` (see linearize/options.py); returns it."""
    from ..options import DEFAULT_RULES, Options

    rules = DEFAULT_RULES if rules is None else rules
    Options.from_dict({"rules": rules, **options})  # unknown options fail here, not at the first call
    model.compile(backend="linearize", options={"rules": rules, **options})
    model._linearize_rules = rules
    model.__dict__.pop("_linearize_plans", None)
    return model


def revert(model):
    """Undo `convert`: the model runs its original forward again (no compiled graphs, no recorded rules)."""
    model._compiled_call_impl = None
    for attr in ("_linearize_rules", "_linearize_plans"):
        model.__dict__.pop(attr, None)
    return model
