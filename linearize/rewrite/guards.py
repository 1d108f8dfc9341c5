"""Run-time checks that make a causal rewrite of a site with an explicit mask safe.

A mask is only known when the model runs. Window and linear rewrites are causal by construction, so they are right
for a causal mask, and for a causal sliding-window mask (the layer's own window then narrows to the rewrite's). A
padding mask is neither: the check fails with a clear error instead of a silently wrong result.
"""
from __future__ import annotations

import torch


def allowed_keys(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(where the mask lets a query attend, whether it only hides: no bias values) for bool or additive masks."""
    if mask.dtype == torch.bool:
        return mask, torch.ones((), dtype=torch.bool, device=mask.device)
    allowed = mask == 0
    return allowed, (allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all()


def mask_is_causal(mask: torch.Tensor) -> torch.Tensor:
    """True iff `mask` [.., L, S] (bool: True attends; float: 0 attends, very negative hides) hides exactly the
    future, or the future and every key `width` or more tokens back (a causal sliding window; the width is read
    from the last row)."""
    L, S = mask.shape[-2:]
    allowed, well_formed = allowed_keys(mask)
    rows = torch.arange(L, device=mask.device)[:, None]
    cols = torch.arange(S, device=mask.device)[None, :]
    width = allowed[..., -1:, :].sum(-1, keepdim=True)
    expected = (cols <= rows) & (rows - cols < width)
    return well_formed & (allowed == expected).all()


def cache_mask_is_causal(mask: torch.Tensor, pos0: torch.Tensor) -> torch.Tensor:
    """True iff a decoding mask [.., T, capacity] (queries at slots pos0 .. pos0+T-1, as transformers builds it for a
    static-size cache) lets each query see exactly the slots up to its own that the last query sees: causal
    attention over the cache with padding, nothing else (no sliding window, no bias)."""
    T, S = mask.shape[-2:]
    allowed, well_formed = allowed_keys(mask)
    rows = pos0 + torch.arange(T, device=mask.device)[:, None]
    cols = torch.arange(S, device=mask.device)[None, :]
    expected = (cols <= rows) & allowed[..., -1:, :]
    return well_formed & (allowed == expected).all()
