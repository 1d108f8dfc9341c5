"""`linearize::learned`: how a parameter the rule set learns reaches the captured graph.

A backend cannot add parameters to a model (docs/rule-files.md, "Learned parameters"), so `linearize.convert`
registers them on the attention modules and a forward pre-hook passes each one through this op with the module's
input: `x = learned(x, parameter, "mix")`. Dynamo then lifts the parameter into the graph like any weight, with the
module's `nn_module_stack`; the `bind_learned` pass hands it to the site's replacement and removes the op. Where
the op runs (eager, or a graph no linearize pass saw) it is a copy of `x`, and the parameter gets no gradient.
"""
from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("linearize::learned", mutates_args=(), schema="(Tensor x, Tensor p, str name) -> Tensor")
def learned(x: Tensor, p: Tensor, name: str) -> Tensor:
    return x.clone()  # a custom op may not return its input


@learned.register_fake
def _(x, p, name):
    return torch.empty_like(x)


def _backward(ctx, grad):
    return grad, None, None


learned.register_autograd(_backward)
