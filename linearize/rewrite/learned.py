"""Target parameters a rule set may learn (`learn: [mix]`, or `mix: learnable`): their shape at a site and their
initial value, which is the rule's constant (so a model with freshly created parameters computes what the constant
rule computes, and training starts from the zero-shot recipe).

- liger `mix`: the [window, linear] weights per query head (the Liger paper fixes them at 0.5 / 0.5).
- lolcats `feature_map`: a [D, D] projection per query head and per key head applied to the pre-RoPE q and k before
  the feature map, from the identity: LoLCATs' learned Hedgehog map, phi(x W), trained by attention transfer."""
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

def _feature_projections(site) -> tuple:
    _, hq, hkv, _, _, d, _ = site.shape
    return (hq + hkv, d, d)  # query heads first, then key heads


FEATURE_MAP = Learnable("feature_map", "[D, D] feature-map projections per query head, then per key head",
                        _feature_projections, lambda params, shape: torch.eye(shape[-1]).expand(shape))

# target -> {parameter name -> Learnable}
LEARNABLE = {"liger": {"mix": MIX}, "lolcats": {"feature_map": FEATURE_MAP}}


def learned_names(params: dict) -> tuple:
    return tuple(params.get("learn") or ())
