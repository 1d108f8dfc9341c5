"""Causal sliding-window softmax attention, blocked so cost is linear in T.

Query i sees keys j with i - window < j <= i, plus the first `sink_tokens` keys (attention sinks, as in
StreamingLLM: j < sink_tokens stays visible to every later query). Queries are cut into blocks of `window`
rows; block n only needs key blocks n-1 and n (and the sink keys), so each block scores against
2*window (+ sink_tokens) keys with a fixed mask. Work and memory are O(T * (window + sink_tokens)) instead of O(T^2).

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

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, window: int, sink_tokens: int = 0):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {sink_tokens}")
        if q.shape[-2] != k.shape[-2]:
            raise ValueError("window attention needs equal query and key lengths")
        self.acc = acc_dtype(q)
        self.batch, self.hq, self.seq, self.hkv, self.groups = head_groups(q, k)
        self.window = window
        self.block = max(1, min(window, self.seq))
        self.n_blocks = -(-self.seq // self.block)
        # sinks only matter for queries past the window; none when the whole sequence fits in it
        self.sinks = min(sink_tokens, self.seq) if self.seq > window else 0
        self.q = self.split(q, self.groups)
        self.k = self.with_sinks(k, self.with_previous(self.split(k, 1)))
        self.v = self.with_sinks(v, self.with_previous(self.split(v, 1)))
        self.allowed = self._mask(q.device)

    def split(self, x: Tensor, groups: int) -> Tensor:
        return split_blocks(x, self.batch, self.hkv, groups, self.n_blocks, self.block, self.acc)

    def merge(self, x: Tensor, like: Tensor) -> Tensor:
        return merge_blocks(x, self.seq, like)

    @staticmethod
    def with_previous(x: Tensor) -> Tensor:
        previous = F.pad(x, (0, 0, 0, 0, 1, 0))[..., :-1, :, :]
        return torch.cat([previous, x], dim=-2)

    def with_sinks(self, x: Tensor, pairs: Tensor) -> Tensor:
        """Prepend the first `sink_tokens` keys (or values) [B, Hkv, T, D] to every block's (previous, own) pair."""
        if not self.sinks:
            return pairs
        sink = x[:, :, None, None, : self.sinks].to(self.acc)  # [B, Hkv, 1, 1, S, D]
        return torch.cat([sink.expand(*pairs.shape[:4], -1, -1), pairs], dim=-2)

    def _mask(self, device: torch.device) -> Tensor:
        """[N, W, S + 2W]: query n*W+i may see sink key j (when j is outside its window) and key (n-1)*W+j."""
        w = self.block
        rows = torch.arange(w, device=device)[:, None]
        cols = torch.arange(2 * w, device=device)[None, :]
        distance = w + rows - cols  # query index minus key index
        in_window = (distance >= 0) & (distance < self.window)
        real_key = torch.ones(self.n_blocks, 1, 2 * w, dtype=torch.bool, device=device)
        real_key[:1, :, :w] = False  # block 0 has no previous block
        pairs = in_window & real_key
        if not self.sinks:
            return pairs
        query = (torch.arange(self.n_blocks, device=device)[:, None] * w + rows[:, 0])[..., None]  # [N, W, 1]
        sink = query - torch.arange(self.sinks, device=device) >= self.window  # past the window: not counted twice
        return torch.cat([sink, pairs.expand(self.n_blocks, -1, -1)], dim=-1)

    def scores(self, scale: float) -> Tensor:
        s = scale * (self.q @ self.k.transpose(-1, -2))
        return s.masked_fill(~self.allowed, float("-inf"))

    def fold_keys(self, grad: Tensor, like: Tensor) -> Tensor:
        """Sum a gradient w.r.t. each block's (sinks, previous, own) keys back onto the keys: [B, Hkv, T, D]."""
        w, n_sink = self.block, self.sinks
        pair_grad = grad[..., n_sink:, :]
        as_previous = F.pad(pair_grad[..., 1:, :w, :], (0, 0, 0, 0, 0, 1))
        out = self.merge(pair_grad[..., w:, :] + as_previous, grad)  # still in the accumulation dtype
        if n_sink:
            out[:, :, :n_sink] += grad[..., :n_sink, :].sum(dim=(2, 3))
        return out.to(like.dtype)


def window_attention_fwd(q: Tensor, k: Tensor, v: Tensor, scale: float, window: int, sink_tokens: int = 0
                         ) -> tuple[Tensor, Tensor]:
    """Returns (o [B, Hq, T, Dv] in q.dtype, lse [B, Hq, T] in fp32/fp64)."""
    blk = _Blocked(q, k, v, window, sink_tokens)
    s = blk.scores(scale)
    lse = s.logsumexp(dim=-1, keepdim=True)  # finite: every row sees at least itself
    o = (s - lse).exp() @ blk.v
    return blk.merge(o, q), blk.merge(lse, lse).squeeze(-1)


def window_attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, scale: float, window: int,
                         lse: Tensor | None = None, sink_tokens: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (dq, dk, dv). lse from the forward is optional; without it it is recomputed."""
    blk = _Blocked(q, k, v, window, sink_tokens)
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
    dk = blk.fold_keys(scale * (ds.transpose(-1, -2) @ blk.q).sum(2, keepdim=True), k)
    dv = blk.fold_keys((p.transpose(-1, -2) @ d_out).sum(2, keepdim=True), v)
    return blk.merge(dq, q), dk, dv
