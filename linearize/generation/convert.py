"""`linearize.convert(model, rules=...)`: compile a model in place with the linearize backend, for generation too.

`torch.compile(model, backend="linearize")` returns a wrapper whose `.generate` still calls the original forward
(transformers' `generate` calls `self(...)` on the wrapped module). `nn.Module.compile` compiles the module in place,
so `model(...)` and `model.generate(...)` both run the rewritten graphs. The rule set is recorded on the model so a
`StateCache(model)` holds the state of the same rewrite.
"""
from __future__ import annotations

import contextlib


def convert(model, rules=None, **options):
    """Compile `model` in place with backend="linearize" and `options` (see linearize/options.py); returns it."""
    from ..options import DEFAULT_RULES, Options

    rules = DEFAULT_RULES if rules is None else rules
    Options.from_dict({"rules": rules, **options})  # unknown options fail here, not at the first call
    for m in _layers(model):
        m.compile(backend="linearize", options={"rules": rules, **options})
        m._linearize_rules = rules
        m.__dict__.pop("_linearize_plans", None)
    return model


def revert(model):
    """Undo `convert`: the model runs its original forward again (no compiled graphs, no recorded rules)."""
    for m in _layers(model):
        m._compiled_call_impl = None
        for attr in ("_linearize_rules", "_linearize_plans"):
            m.__dict__.pop(attr, None)
    return model


@contextlib.contextmanager
def converted(model, rules, **options):
    """`model` converted in place for the block, then reverted, Dynamo's caches cleared: one copy of the weights
    serves one rule set after another (evaluation rows, planning probes)."""
    import torch

    convert(model, rules=rules, **options)
    try:
        yield model
    finally:
        revert(model)
        torch._dynamo.reset()


@contextlib.contextmanager
def uncompiled(model):
    """`model` (and the model inside a peft wrapper) running its plain forward for the block, even if `convert`
    compiled it in place: `explain` must capture the original graph, not call into the converted one."""
    mods = [m for m in _layers(model) if hasattr(m, "__dict__")]
    saved = [m.__dict__.get("_compiled_call_impl") for m in mods]
    for m in mods:
        if "_compiled_call_impl" in m.__dict__:
            m._compiled_call_impl = None
    try:
        yield model
    finally:
        for m, impl in zip(mods, saved):
            if impl is not None:
                m._compiled_call_impl = impl


def peft_base(model):
    """The transformers model inside a peft wrapper (its LoRA layers included), or None for any other model."""
    return model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else None


def _layers(model) -> list:
    """What to compile: the model, and for a peft wrapper also the model inside it, whose own call `generate`
    reaches without going through the wrapper's."""
    inner = peft_base(model)
    return [model] if inner is None or inner is model else [inner, model]
