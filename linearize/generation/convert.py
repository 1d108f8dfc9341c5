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
    install_learned(model, rules)
    for m in _layers(model):
        m.compile(backend="linearize", options={"rules": rules, **options})
        m._compiled_call_impl = _refuse_eager_fallback(m._compiled_call_impl)
        m._linearize_rules = rules
        m.__dict__.pop("_linearize_plans", None)
    return model


def install_learned(model, rules) -> dict:
    """Register the parameters `rules` learn (`learn: [mix]`, rewrite/learned.py) on the attention modules of
    `model` (of the transformers model inside a peft wrapper), starting from the rule's constants, with the pre-hook
    that lifts them into the captured graph (lowering/learned_ops.py). Parameters already there (trained, loaded)
    are kept; one of another shape is an error. Returns {qualified name: parameter}; {} when nothing is learned.

    They are ordinary parameters of the model: in `parameters()`, the optimizer, the `state_dict` and checkpoints,
    and they survive recompiles, which a parameter created by the backend could not."""
    import torch

    from ..passes.bind_learned import PARAMETERS_ATTR, LearnedParameterError
    from ..rewrite import rules as rule_sets
    from ..rewrite.learned import LEARNABLE, learned_names
    from .plan import decide_sites

    if not any(r.params.get("learn") for r in rule_sets.load(rules).rules):
        return {}
    base = peft_base(model) or model
    out = {}
    for site in decide_sites(base, rules).sites:
        names = learned_names(site.params)
        if not names:
            continue
        if not site.module_path:
            raise LearnedParameterError(f"linearize: rules {rules!r} learn {list(names)} at {site.node.name}, which "
                                        "belongs to no attention module: there is nowhere to keep the parameters")
        module = base.get_submodule(site.module_path)
        store = getattr(module, PARAMETERS_ATTR, None)
        if store is None:
            store = torch.nn.ParameterDict()
            module.register_module(PARAMETERS_ATTR, store)
            module._linearize_learned_hook = module.register_forward_pre_hook(_lift_learned, with_kwargs=True)
        device = next(module.parameters()).device
        for name in names:
            init = LEARNABLE[site.rewrite][name].initial(site.params, site).to(device)
            if name not in store:
                store[name] = torch.nn.Parameter(init)
            elif store[name].shape != init.shape:
                raise LearnedParameterError(f"linearize: {site.module_path}.{PARAMETERS_ATTR}.{name} has shape "
                                            f"{list(store[name].shape)}, rules {rules!r} need {list(init.shape)}")
            out[f"{site.module_path}.{PARAMETERS_ATTR}.{name}"] = store[name]
    return out


def learned_parameters(model) -> dict:
    """{name: parameter} of the learned recipe parameters `install_learned` put on `model` (names relative to the
    transformers model, also inside a peft wrapper: `model.layers.0.self_attn.linearize_learned.mix`)."""
    from ..passes.bind_learned import PARAMETERS_ATTR

    base = peft_base(model) or model
    return {n: p for n, p in base.named_parameters() if f".{PARAMETERS_ATTR}." in f".{n}"}


def load_learned(model, rules, tensors: dict, where) -> None:
    """Install the parameters `rules` learn and set them from `tensors` ({name: tensor}, as `learned_parameters`
    names them). Strict: a missing, unexpected or mis-shaped tensor is an error naming `where`, never a silent
    fallback to the rule's constants."""
    import torch

    from ..passes.bind_learned import LearnedParameterError

    params = install_learned(model, rules)
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise LearnedParameterError(f"{where}: learned parameters do not match rules {rules!r}: missing "
                                    f"{missing[:3] or 'none'}, unexpected {extra[:3] or 'none'}; it was saved "
                                    "under other rules or for another model")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(tensors[name].shape) != tuple(p.shape):
                raise LearnedParameterError(f"{where}: {name} has shape {list(tensors[name].shape)}, the model "
                                            f"needs {list(p.shape)}")
            p.copy_(tensors[name])


def remove_learned(model, keep=()) -> None:
    """Take the learned parameters and their pre-hooks off every attention module of `model` whose path is not in
    `keep`: a temporary conversion (`converted`) must not leave values that a later rule set would start from."""
    import torch

    from ..passes.bind_learned import PARAMETERS_ATTR

    base = peft_base(model) or model
    for path, module in list(base.named_modules()):
        if path not in keep and isinstance(getattr(module, PARAMETERS_ATTR, None), torch.nn.Module):
            module._linearize_learned_hook.remove()
            del module._linearize_learned_hook
            delattr(module, PARAMETERS_ATTR)


def _lift_learned(module, args, kwargs):
    """Pass each learned parameter of `module` through `linearize::learned` with the module's first floating
    input, so Dynamo lifts it into the graph inside this module (passes/bind_learned.py binds it to the site)."""
    import torch

    from ..passes.bind_learned import PARAMETERS_ATTR

    store = getattr(module, PARAMETERS_ATTR)
    args, kwargs = list(args), dict(kwargs)
    for seq, key in [*((args, i) for i in range(len(args))), *((kwargs, k) for k in kwargs)]:
        x = seq[key]
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            for name, p in store.items():
                x = torch.ops.linearize.learned(x, p, name)
            seq[key] = x
            return tuple(args), kwargs
    return None


def _refuse_eager_fallback(compiled):
    """Past Dynamo's recompile limit a frame runs uncompiled: for a converted model that is the original softmax
    attention, a silently different model (and a StateCache it does not fill). Calls of a converted model raise
    instead, with the fix; the setting is scoped to these calls, so other compiled code keeps Dynamo's fallback."""
    import functools

    import torch

    if not hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):  # older Dynamo: nothing to scope
        return compiled

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        try:
            with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                return compiled(*args, **kwargs)
        except Exception as exc:
            if "limit" in type(exc).__name__.lower():
                exc.add_note(
                    f"linearize: this converted model was compiled {torch._dynamo.config.recompile_limit} times "
                    "already (torch._dynamo.config.recompile_limit); past the limit Dynamo would run the original "
                    "softmax attention. Raise the limit (torch._dynamo.config.recompile_limit = 32), or call with "
                    "fewer distinct shapes/argument kinds (TORCH_LOGS=recompiles says what changed).")
            raise

    return call


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

    had = {n.rsplit(".", 2)[0] for n in learned_parameters(model)}
    convert(model, rules=rules, **options)
    try:
        yield model
    finally:
        revert(model)
        remove_learned(model, keep=had)
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
