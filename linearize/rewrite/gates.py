"""Gate kinds and feature maps of the linear branch, as named entries (name -> function).

A gate function maps the pre-RoPE keys k [B, Hkv, T, D] (fp32) to log g [B, Hkv, T, D] with log g <= 0, the
per-channel log decay that `torch.ops.linearize.gla` applies at each token (state S_t = diag(g_t) S_{t-1} + k_t^T v_t).
Scalar gates (one value per head and token, or per head) are expanded over the D channels, so every kind runs through
the same op. All take the same keyword parameters and ignore those they do not use (`GATE_PARAMS` says which):

    normalizer   divides the log gate (> 0): a larger value means slower forgetting (Liger uses 16)
    lower_bound  HGRN2's forget-gate floor beta in [0, 1): g = beta + (1 - beta) * sigmoid(k)
    decay        the constant of the `fixed` kind, in (0, 1)

`GATE_KINDS` tells kernel generators the shape of each gate (kernels/triton/spec.py): "vector" (per channel and
token), "scalar" (per token, shared over channels), "fixed" (per head, constant), "none".
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def logsigmoid_gate(k, *, normalizer=16.0, **_):
    """Liger / GLA: log g = logsigmoid(k) / normalizer, per channel, from the pretrained key projection."""
    return F.logsigmoid(k) / normalizer


def mamba2_gate(k, *, normalizer=16.0, **_):
    """Mamba2-style scalar gate: g = exp(-softplus(pool(k)) / normalizer), pool = mean over the head dimension."""
    return (-F.softplus(k.mean(dim=-1, keepdim=True)) / normalizer).expand_as(k).contiguous()


def hgrn2_gate(k, *, lower_bound=0.0, normalizer=1.0, **_):
    """HGRN2-style forget gate with a lower bound: g = beta + (1 - beta) * sigmoid(k), log taken stably."""
    if lower_bound <= 0.0:
        return F.logsigmoid(k) / normalizer
    log_g = torch.logaddexp(torch.full_like(k, math.log(lower_bound)), math.log1p(-lower_bound) + F.logsigmoid(k))
    return log_g / normalizer


def retnet_decays(heads: int) -> torch.Tensor:
    """RetNet's per-head decay gamma_h = 1 - 2^(-5 - h) (h = 0 .. heads-1), as log gamma."""
    return torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(heads, dtype=torch.float64))).float()


def retnet_gate(k, **_):
    """RetNet / Lightning-style fixed decay: one constant per KV head, no dependence on the input."""
    decay = retnet_decays(k.shape[1]).to(k.device)
    return decay.view(1, -1, 1, 1).expand_as(k).contiguous()


def fixed_gate(k, *, decay=0.99, **_):
    """One constant decay for every head and token."""
    return torch.full_like(k, math.log(decay))


def no_gate(k, **_):
    """No decay: plain causal linear attention."""
    return torch.zeros_like(k)


GATES = {"logsigmoid": logsigmoid_gate, "mamba2": mamba2_gate, "hgrn2": hgrn2_gate, "retnet": retnet_gate,
         "fixed": fixed_gate, "none": no_gate}
GATE_KINDS = {"logsigmoid": "vector", "mamba2": "scalar", "hgrn2": "vector", "retnet": "fixed", "fixed": "fixed",
              "none": "none"}
GATE_PARAMS = {"logsigmoid": ("gate_normalizer",), "mamba2": ("gate_normalizer",),
               "hgrn2": ("gate_lower_bound", "gate_normalizer"), "retnet": (), "fixed": ("decay",), "none": ()}


def softmax_feature(x: torch.Tensor) -> torch.Tensor:
    """Liger's feature map: softmax over the head dimension (so q.k lies in (0, 1])."""
    return torch.softmax(x, dim=-1)


def identity_feature(x: torch.Tensor) -> torch.Tensor:
    return x


def elu1_feature(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1


def relu_feature(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


def hedgehog_feature(x: torch.Tensor) -> torch.Tensor:
    """Hedgehog / LoLCATs without the learned projection: [softmax(x), softmax(-x)] (twice the head dimension)."""
    return torch.cat([torch.softmax(x, dim=-1), torch.softmax(-x, dim=-1)], dim=-1)


FEATURE_MAPS = {"softmax": softmax_feature, "identity": identity_feature, "elu+1": elu1_feature,
                "relu": relu_feature, "hedgehog": hedgehog_feature}
NONNEGATIVE_FEATURE_MAPS = ("softmax", "elu+1", "relu", "hedgehog")  # usable where weights are normalised
