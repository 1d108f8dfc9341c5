"""Window + linear attention under one shared normaliser (LoLCATs' hybrid), linear in T, with explicit backward.

For query i with window W, the last W keys (i - W < j <= i) are attended with softmax scores and every older key
(j <= i - W) with a linear-attention feature product; both share one denominator:

    y_i = [ sum_win exp(s_ij - m_i) v_j + sum_old (fq_i . fk_j) v_j ] / [ sum_win exp(s_ij - m_i) + sum_old fq_i . fk_j ]

with s_ij = scale * q_i . k_j and m_i = max over the window of s_ij (the shift is part of the definition, as in
LoLCATs: it sets the balance between the two terms, so its gradient is propagated too). Feature maps must be
non-negative; the denominator is then >= 1 (the window's maximum contributes exp(0)).

Blocking: the sequence is cut into blocks of W tokens (W = min(window, T)). Query block n sees, against the pair
(block n-1, block n) of 2W keys, the window part with a fixed mask; the older keys are block n-1 up to the query's own
offset (a W x W lower triangle) plus the running sums H_n = sum_{blocks <= n-2} fk^T v and z_n = sum fk over the same
blocks. Cost O(T * W * D + T * F * Dv); only per-block sums are kept. The backward recomputes the scores, carries
dH/dz back to earlier blocks with a reverse cumulative sum, and routes the gradient of the max to its argmax
(split evenly over ties, as autograd does for amax).

Attention sinks (`sinks` = N): the first N keys keep exact exp(s_ij - m_i) weights for every query they are older
than the window (they join the max m_i and leave the linear part): an [N]-key softmax term beside the window's.

Shapes: q [B, Hq, T, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv], fq [B, Hq, T, F], fk [B, Hkv, T, F] (GQA: query head h
reads KV head h // (Hq / Hkv)). Accumulation in fp32 (fp64 for fp64 inputs); outputs in the inputs' dtypes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .blocks import head_groups, merge_blocks, split_blocks
from .precision import acc_dtype


class _Blocks:
    """Inputs padded to whole blocks of W and viewed as [B, Hkv, G, N, W, *] (kv side with G = 1)."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, window: int, sinks: int = 0):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {sinks}")
        if q.shape[-2] != k.shape[-2]:
            raise ValueError("hybrid attention needs equal query and key lengths")
        if fq.shape[-1] != fk.shape[-1]:
            raise ValueError(f"feature sizes differ: fq {fq.shape[-1]}, fk {fk.shape[-1]}")
        self.acc = acc_dtype(q)
        self.batch, self.hq, self.seq, self.hkv, self.groups = head_groups(q, k)
        self.w = max(1, min(window, self.seq))
        self.n = -(-self.seq // self.w) if self.seq else 0
        self.sinks = min(sinks, self.seq)
        if self.sinks:  # sink keys leave the linear part
            self.linear_key = (torch.arange(self.seq, device=q.device) >= self.sinks)[:, None]
            fk = fk * self.linear_key.to(fk.dtype)
        self.q, self.fq = self.split(q, self.groups), self.split(fq, self.groups)
        self.k, self.v, self.fk = self.split(k, 1), self.split(v, 1), self.split(fk, 1)
        self.sink_k = k[:, :, None, None, :self.sinks].to(self.acc)  # [B, Hkv, 1, 1, N, D]
        self.sink_v = v[:, :, None, None, :self.sinks].to(self.acc)
        self.k2, self.v2 = self.pair(self.k), self.pair(self.v)
        self.fk_prev, self.v_prev = self.previous(self.fk), self.previous(self.v)
        self.window_mask, self.linear_mask, self.sink_mask = self._masks(q.device)

    def split(self, x: Tensor, groups: int) -> Tensor:
        return split_blocks(x, self.batch, self.hkv, groups, self.n, self.w, self.acc)

    def merge(self, x: Tensor, like: Tensor) -> Tensor:
        return merge_blocks(x, self.seq, like)

    @staticmethod
    def previous(x: Tensor) -> Tensor:
        """Block n holds block n-1 (zeros for n = 0)."""
        return F.pad(x, (0, 0, 0, 0, 1, 0))[..., :-1, :, :]

    def pair(self, x: Tensor) -> Tensor:
        return torch.cat([self.previous(x), x], dim=-2)

    @staticmethod
    def unprevious(grad: Tensor) -> Tensor:
        """Adjoint of `previous`: the gradient w.r.t. block n-1's copy goes back to block n-1."""
        return F.pad(grad[..., 1:, :, :], (0, 0, 0, 0, 0, 1))

    def unpair(self, grad: Tensor) -> Tensor:
        return grad[..., self.w:, :] + self.unprevious(grad[..., : self.w, :])

    def _masks(self, device):
        w = self.w
        rows = torch.arange(w, device=device)[:, None]
        cols = torch.arange(2 * w, device=device)[None, :]
        distance = w + rows - cols  # query index minus key index
        has_prev = torch.ones(self.n, 1, 1, dtype=torch.bool, device=device)
        has_prev[:1] = False
        real = torch.where(cols < w, has_prev, True)  # block 0 has no previous block
        window_mask = (distance >= 0) & (distance < w) & real  # [N, W, 2W]
        older = cols[:, :w] <= rows  # key in block n-1 at offset c is at least W back iff c <= r
        linear_mask = older & has_prev  # [N, W, W]
        qpos = torch.arange(self.n, device=device)[:, None, None] * w + rows  # [N, W, 1]
        sink_mask = qpos - torch.arange(self.sinks, device=device) >= w  # [N, W, sinks]: older than the window
        return window_mask, linear_mask, sink_mask

    def running_sums(self) -> tuple[Tensor, Tensor]:
        """H_n = sum_{j <= n-2} fk_j^T v_j ([.., N, F, Dv]) and z_n = sum_{j <= n-2} sum fk_j ([.., N, F])."""
        c = self.fk.transpose(-1, -2) @ self.v
        zc = self.fk.sum(-2)
        h = F.pad(c.cumsum(3), (0, 0, 0, 0, 2, 0))[..., : self.n, :, :]
        z = F.pad(zc.cumsum(3), (0, 0, 2, 0))[..., : self.n, :]
        return h, z

    def parts(self, scale: float):
        s = scale * (self.q @ self.k2.transpose(-1, -2))
        s = s.masked_fill(~self.window_mask, float("-inf"))
        ss = (scale * (self.q @ self.sink_k.transpose(-1, -2))).masked_fill(~self.sink_mask, float("-inf"))
        m = s.amax(-1, keepdim=True)  # finite: each row sees at least its own key
        if self.sinks:
            m = torch.maximum(m, ss.amax(-1, keepdim=True))
        p, ps = (s - m).exp(), (ss - m).exp()
        a = (self.fq @ self.fk_prev.transpose(-1, -2)) * self.linear_mask
        h, z = self.running_sums()
        num = p @ self.v2 + a @ self.v_prev + self.fq @ h + ps @ self.sink_v
        den = p.sum(-1) + a.sum(-1) + (self.fq * z.unsqueeze(-2)).sum(-1) + ps.sum(-1)
        return s, ss, m, p, ps, a, h, z, num, den


def hybrid_attention_fwd(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, scale: float, window: int,
                         sinks: int = 0) -> Tensor:
    """o [B, Hq, T, Dv] in v's dtype."""
    if q.shape[-2] == 0:
        return q.new_zeros(*q.shape[:-1], v.shape[-1], dtype=v.dtype)
    blk = _Blocks(q, k, v, fq, fk, window, sinks)
    *_, num, den = blk.parts(scale)
    return blk.merge(num / den.unsqueeze(-1), v)


def hybrid_attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, scale: float,
                         window: int, sinks: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dfq, dfk), recomputing the forward's blocks."""
    if q.shape[-2] == 0:
        return tuple(torch.zeros_like(x) for x in (q, k, v, fq, fk))
    blk = _Blocks(q, k, v, fq, fk, window, sinks)
    s, ss, m, p, ps, a, h, z, num, den = blk.parts(scale)
    d_out = blk.split(do, blk.groups)
    o = num / den.unsqueeze(-1)
    dnum = d_out / den.unsqueeze(-1)
    dden = -(d_out * o).sum(-1) / den  # [.., N, W]

    # window (softmax) part: p = exp(s - m)
    dp = dnum @ blk.v2.transpose(-1, -2) + dden.unsqueeze(-1)
    ds = p * dp
    dss = ps * (dnum @ blk.sink_v.transpose(-1, -2) + dden.unsqueeze(-1))  # sink keys: the same softmax form
    dm = -ds.sum(-1, keepdim=True) - dss.sum(-1, keepdim=True)
    at_max, at_sink_max = (s == m).to(ds.dtype), (ss == m).to(ds.dtype)
    ties = at_max.sum(-1, keepdim=True) + at_sink_max.sum(-1, keepdim=True)
    ds = ds + at_max * (dm / ties)
    dss = dss + at_sink_max * (dm / ties)
    dq = scale * (ds @ blk.k2) + scale * (dss @ blk.sink_k)
    dk2 = scale * (ds.transpose(-1, -2) @ blk.q).sum(2, keepdim=True)
    dv2 = (p.transpose(-1, -2) @ dnum).sum(2, keepdim=True)

    # older keys of the previous block: a = (fq fk_prev^T) * mask
    da = (dnum @ blk.v_prev.transpose(-1, -2) + dden.unsqueeze(-1)) * blk.linear_mask
    dfq = da @ blk.fk_prev
    dfk_prev = (da.transpose(-1, -2) @ blk.fq).sum(2, keepdim=True)
    dv_prev = (a.transpose(-1, -2) @ dnum).sum(2, keepdim=True)

    # everything older: fq @ H_n and fq . z_n
    dfq = dfq + dnum @ h.transpose(-1, -2) + dden.unsqueeze(-1) * z.unsqueeze(-2)
    dh = (blk.fq.transpose(-1, -2) @ dnum).sum(2, keepdim=True)  # [.., N, F, Dv]
    dz = (blk.fq * dden.unsqueeze(-1)).sum(-2).sum(2, keepdim=True)  # [.., N, F]
    # H_n sums blocks j <= n-2, so block j receives the sum of dH_n over n >= j + 2
    dc = F.pad(dh.flip(3).cumsum(3).flip(3), (0, 0, 0, 0, 0, 2))[..., 2:, :, :]
    dzc = F.pad(dz.flip(3).cumsum(3).flip(3), (0, 0, 0, 2))[..., 2:, :]
    dfk = blk.v @ dc.transpose(-1, -2) + dzc.unsqueeze(-2) + blk.unprevious(dfk_prev)
    dv = blk.fk @ dc + blk.unpair(dv2) + blk.unprevious(dv_prev)
    dk = blk.unpair(dk2)
    dq, dk, dv, dfq, dfk = (blk.merge(dq, q), blk.merge(dk, k), blk.merge(dv, v), blk.merge(dfq, fq),
                            blk.merge(dfk, fk))
    if blk.sinks:
        n = blk.sinks
        dk_sink = scale * (dss.transpose(-1, -2) @ blk.q).sum((2, 3))  # [B, Hkv, N, D]
        dv_sink = (ps.transpose(-1, -2) @ dnum).sum((2, 3))
        dk = torch.cat([dk[:, :, :n] + dk_sink.to(dk.dtype), dk[:, :, n:]], dim=2)
        dv = torch.cat([dv[:, :, :n] + dv_sink.to(dv.dtype), dv[:, :, n:]], dim=2)
        dfk = dfk * blk.linear_key.to(dfk.dtype)
    return dq, dk, dv, dfq, dfk
