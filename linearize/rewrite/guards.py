"""Run-time checks that make a causal rewrite of a site with an explicit mask safe.

A mask is only known when the model runs. Window and linear rewrites are causal by construction, so they are right
for a causal mask, and for a causal sliding-window mask (the layer's own window then narrows to the rewrite's). A
padding mask is neither: the check fails with a clear error instead of a silently wrong result.
"""
from __future__ import annotations

import torch


def mask_is_causal(mask: torch.Tensor) -> torch.Tensor:
    """True iff `mask` [.., L, S] (bool: True attends; float: 0 attends, very negative hides) hides exactly the
    future, or the future and every key `width` or more tokens back (a causal sliding window; the width is read
    from the last row)."""
    L, S = mask.shape[-2:]
    if mask.dtype == torch.bool:
        allowed, well_formed = mask, torch.ones((), dtype=torch.bool, device=mask.device)
    else:
        allowed = mask == 0
        well_formed = (allowed | (mask <= torch.finfo(mask.dtype).min / 2)).all()
    rows = torch.arange(L, device=mask.device)[:, None]
    cols = torch.arange(S, device=mask.device)[None, :]
    width = allowed[..., -1:, :].sum(-1, keepdim=True)
    expected = (cols <= rows) & (rows - cols < width)
    return well_formed & (allowed == expected).all()
