"""Pattern: `torch.nn.functional.scaled_dot_product_attention` calls.

This is what transformers models emit with `attn_implementation="sdpa"` (one call per layer, often with
`enable_gqa=True`, or with k/v expanded by `repeat_kv` when a padding mask is passed).
"""
from __future__ import annotations

import math
from typing import Union

import torch
import torch.fx as fx
import torch.nn.functional as F

from .graph import arg, layer_index, module_path, shape
from .layout import strip_kv_repeat
from .masks import is_hiding_mask
from .site import AttentionSite

NAME = "sdpa"


def match(node: fx.Node) -> Union[AttentionSite, str, None]:
    """An `AttentionSite`, a string saying why this SDPA call cannot be a site, or None if not SDPA at all."""
    if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
        return None
    q, k, v = node.args[:3]
    mask = arg(node, 3, "attn_mask")
    dropout_p = arg(node, 4, "dropout_p", 0.0)
    is_causal = arg(node, 5, "is_causal", False)
    scale = arg(node, 6, "scale")
    enable_gqa = arg(node, 7, "enable_gqa", False)
    for name, val in (("dropout_p", dropout_p), ("is_causal", is_causal)):
        if isinstance(val, fx.Node):
            return f"SDPA argument {name} is a traced value, not a constant"
    if isinstance(scale, fx.Node) and not isinstance(scale.meta.get("example_value"), (float, torch.SymFloat)):
        return "SDPA scale is a traced value that is not a float"
    q_s, k_s, v_s = shape(q), shape(k), shape(v)
    if not (q_s and k_s and v_s) or not (len(q_s) == len(k_s) == len(v_s) == 4):
        return "SDPA inputs are not 4-D [B, H, T, D] tensors with known shapes"

    k_base, k_rep = strip_kv_repeat(k)
    v_base, v_rep = strip_kv_repeat(v)
    if k_rep != v_rep:
        k_base, v_base = k, v  # inconsistent expansion: use them as given
    hkv = shape(k_base)[1]
    hq = q_s[1]
    if hq % hkv:
        return f"query heads ({hq}) not a multiple of key heads ({hkv})"
    if hq != hkv and hkv != 1 and not enable_gqa and k_base is k:  # one KV head broadcasts (multi-query)
        return f"query heads ({hq}) differ from key heads ({hkv}) without enable_gqa"

    path = module_path(node)
    B, _, L, D = q_s
    S, Dv = k_s[2], v_s[3]
    mask_s = shape(mask) if isinstance(mask, fx.Node) else None
    site = AttentionSite(
        mask_rows=mask_s[-2] if mask_s and len(mask_s) >= 2 else None,
        node=node,
        q=q,
        k=k_base,
        v=v_base,
        # a traced scale (dynamic=True makes float attributes symbolic) stays a graph value, read at run time
        scale=scale if isinstance(scale, fx.Node) else float(scale) if scale is not None else 1.0 / math.sqrt(D),
        is_causal=bool(is_causal),
        attn_mask=mask,
        gqa_groups=hq // hkv,
        pattern=NAME,
        module_path=path,
        layer=layer_index(path),
        dropout_p=float(dropout_p),
        shape=(B, hq, hkv, L, S, D, Dv),
        matched_nodes=[node],
    )
    if isinstance(mask, fx.Node):  # a mask computed from activations (not 0/-inf) is a bias, e.g. Doge's
        site.mask_kind = "mask" if is_hiding_mask(mask) else "bias"
    return site
