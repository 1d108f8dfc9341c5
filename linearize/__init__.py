"""linearize: turn a pretrained softmax-attention transformer into a gated linear-recurrent or hybrid-window model.

    model = torch.compile(model, backend="linearize")                       # Liger attention everywhere
    model = torch.compile(model, backend="linearize", options={"rules": "exact"})
    report = linearize.explain(model, input_ids, rules="liger")
    linearize.convert(model, rules="liger")                                 # in place: generate() uses it too
    model.generate(ids, past_key_values=linearize.StateCache(model))         # constant-memory decoding
    linearize.save_pretrained(model, "out/"); linearize.from_pretrained("out/")   # checkpoints (checkpoint.py)
    student = linearize.recover(model, rules="liger", tokens=2_000_000, out="out/")  # training back to quality
    linearize.plan(model, rules="liger-sinks", budget=0.25, tokenizer=tok).write("plan.yaml")  # measured hybrid

Data flow: Dynamo graph -> `passes` (using `patterns` and `rewrite`) -> rewritten graph -> `lowering` ops -> `kernels`.
"""
from .backend import linearize_backend
from .explain import Report, explain
from .rewrite import RuleError, available as available_rules

__version__ = "0.1.0"


def _register_backend() -> None:
    """backend="linearize" by name also where the package is not installed, e.g. a source checkout on PYTHONPATH
    (the pyproject entry point then does not exist); where it is installed, the entry point already names it."""
    import torch._dynamo

    if "linearize" not in torch._dynamo.list_backends(exclude_tags=()):
        torch._dynamo.register_backend(linearize_backend, name="linearize")


_register_backend()
__all__ = ["linearize_backend", "explain", "Report", "RuleError", "available_rules", "convert", "StateCache",
           "save_pretrained", "from_pretrained", "recover", "plan"]


def __getattr__(name):  # generation and checkpoints import transformers: load them on first use
    if name in ("convert", "StateCache"):
        from . import generation

        return getattr(generation, name)
    if name in ("save_pretrained", "from_pretrained"):
        from . import checkpoint

        return getattr(checkpoint, name)
    if name == "recover":
        from .recovery import recover

        return recover
    if name == "plan":
        from .planning import plan

        return plan
    raise AttributeError(f"module 'linearize' has no attribute {name!r}")
