"""Causal sliding-window softmax attention, blocked so cost is linear in T.

Query i sees keys j with i - window < j <= i. Queries are cut into blocks of `window` rows;
block n only needs key blocks n-1 and n, so each block scores against 2*window keys with a
fixed mask. Work and memory are O(T * window) instead of O(T^2).

The forward also returns the log-sum-exp of each row; the backward can reuse it or recompute
it from the scores it has to rebuild anyway.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .blocks import head_groups, merge_blocks, split_blocks
from .precision import acc_dtype


class _Blocked:
    """q as [B, Hkv, G, N, W, D]; k and v as (previous, own) block pairs [B, Hkv, 1, N, 2W, D]."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, window: int):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if q.shape[-2] != k.shape[-2]:
            raise ValueError("window attention needs equal query and key lengths")
        self.acc = acc_dtype(q)
        self.batch, self.hq, self.seq, self.hkv, self.groups = head_groups(q, k)
        self.window = window
        self.block = max(1, min(window, self.seq))
        self.n_blocks = -(-self.seq // self.block)
        self.q = self.split(q, self.groups)
        self.k = self.with_previous(self.split(k, 1))
        self.v = self.with_previous(self.split(v, 1))
        self.allowed = self._mask(q.device)

    def split(self, x: Tensor, groups: int) -> Tensor:
        return split_blocks(x, self.batch, self.hkv, groups, self.n_blocks, self.block, self.acc)

    def merge(self, x: Tensor, like: Tensor) -> Tensor:
        return merge_blocks(x, self.seq, like)

    @staticmethod
    def with_previous(x: Tensor) -> Tensor:
        previous = F.pad(x, (0, 0, 0, 0, 1, 0))[..., :-1, :, :]
        return torch.cat([previous, x], dim=-2)

    def _mask(self, device: torch.device) -> Tensor:
        """[N, W, 2W]: query n*W+i may see key (n-1)*W+j."""
        w = self.block
        rows = torch.arange(w, device=device)[:, None]
        cols = torch.arange(2 * w, device=device)[None, :]
        distance = w + rows - cols  # query index minus key index
        in_window = (distance >= 0) & (distance < self.window)
        real_key = torch.ones(self.n_blocks, 1, 2 * w, dtype=torch.bool, device=device)
        real_key[:1, :, :w] = False  # block 0 has no previous block
        return in_window & real_key

    def scores(self, scale: float) -> Tensor:
        s = scale * (self.q @ self.k.transpose(-1, -2))
        return s.masked_fill(~self.allowed, float("-inf"))

    def fold_keys(self, pair_grad: Tensor) -> Tensor:
        """Sum a gradient w.r.t. (previous, own) key pairs back onto key blocks."""
        w = self.block
        as_previous = F.pad(pair_grad[..., 1:, :w, :], (0, 0, 0, 0, 0, 1))
        return pair_grad[..., w:, :] + as_previous


def window_attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, window: int
                         ) -> tuple[Tensor, Tensor]:
    """Returns (o [B, Hq, T, Dv] in q.dtype, lse [B, Hq, T] in fp32/fp64)."""
    blk = _Blocked(q, k, v, window)
    s = blk.scores(scale)
    lse = s.logsumexp(dim=-1, keepdim=True)  # finite: every row sees at least itself
    o = (s - lse).exp() @ blk.v
    return blk.merge(o, q), blk.merge(lse, lse).squeeze(-1)


def window_attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float, window: int,
                         lse: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv). lse from the forward is optional; without it it is recomputed."""
    blk = _Blocked(q, k, v, window)
    d_out = blk.split(do, blk.groups)
    s = blk.scores(scale)
    if lse is None:
        row_lse = s.logsumexp(dim=-1, keepdim=True)
    else:
        row_lse = blk.split(lse.unsqueeze(-1), blk.groups)
    p = (s - row_lse).exp()
    dp = d_out @ blk.v.transpose(-1, -2)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq = scale * (ds @ blk.k)
    dk = blk.fold_keys(scale * (ds.transpose(-1, -2) @ blk.q).sum(2, keepdim=True))
    dv = blk.fold_keys((p.transpose(-1, -2) @ d_out).sum(2, keepdim=True))
    return blk.merge(dq, q), blk.merge(dk, k), blk.merge(dv, v)
