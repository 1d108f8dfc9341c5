"""The Dynamo backend: Dynamo's FX graph in -> pass pipeline -> rewritten graph -> inner compiler (Inductor).

Registered under the name "linearize" through the `torch_dynamo_backends` entry point, so
`torch.compile(model, backend="linearize")` works without importing linearize first.
"""
from __future__ import annotations

import itertools
import warnings

from .options import Options
from .passes import PassContext, run_pipeline
from .rewrite import rules as rule_sets
from .rewrite.targets import kernel_choice

_graph_ids = itertools.count()
NO_ATTENTION_WARNING = ("linearize: no softmax attention found in a captured graph; it runs unchanged "
                        "(linearize.explain(model, ...) lists what was seen)")


def linearize_backend(gm, example_inputs, options=None, mode=None):
    """Rewrite the attention sites of one captured graph, then hand it to the inner compiler."""
    opts = Options.from_dict(options)
    ctx = PassContext(rules=rule_sets.load(opts.rules), options=opts, graph_id=next(_graph_ids),
                      example_inputs=example_inputs)
    with kernel_choice(opts.kernels):  # the emitted replacements carry the kernel choice
        gm = run_pipeline(gm, ctx)
    if not ctx.sites:
        warnings.warn(NO_ATTENTION_WARNING, stacklevel=2)
    if opts.record is not None:
        opts.record(ctx)
    return _inner_compile(gm, example_inputs, opts.inner, mode)


def _inner_compile(gm, example_inputs, inner: str, mode):
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches=list_mode_options(mode) if mode else None)
