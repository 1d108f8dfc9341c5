"""Target parameters a rule set may learn (`learn: [mix]`, or `mix: learnable`): their shape at a site and their
initial value, which is the rule's constant (so a model with freshly created parameters computes what the constant
rule computes, and training starts from the zero-shot recipe)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Learnable:
    name: str
    what: str  # for reports and errors
    shape: Callable  # site -> tuple
    init: Callable  # (params, shape) -> fp32 tensor

    def initial(self, params: dict, site) -> torch.Tensor:
        return self.init(params, self.shape(site)).float().contiguous()


def _per_head_mix(site) -> tuple:
    return (2, site.shape[1])  # [window weight, linear weight] x query heads


MIX = Learnable("mix", "[window, linear] weights per query head", _per_head_mix,
                lambda params, shape: torch.tensor(params["mix"])[:, None].expand(shape))

# target -> {parameter name -> Learnable}
LEARNABLE = {"liger": {"mix": MIX}}


def learned_names(params: dict) -> tuple:
    return tuple(params.get("learn") or ())
