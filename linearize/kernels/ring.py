"""Attention over a bounded decoding cache: a ring of the last W keys, every older key folded into a linear state.

Decoding a window layer needs only the keys and values of the last W positions (post-RoPE, with their positions);
LoLCATs' hybrid also needs the linear-attention sums of every older key. `ring_attention` runs a chunk of T new
queries (a prefill: T large; a decode step: T = 1) against the ring and the chunk's own keys and returns the updated
ring and sums, so that feeding a sequence chunk after chunk gives the full-sequence `window_attention` /
`hybrid_attention` (tests/test_decoding_kernels.py checks exactly that).

Positions are absolute and shared over the batch; a key lives in ring slot `position % W`; a key whose position is
-1 (an empty slot, a padding token) is invisible. Queries go in blocks of `block` rows: block [s, s+n) sees the
ring plus the chunk's keys [s-W+1, s+n), masked by distance d = query - key position (window: 0 <= d < W; hybrid's
linear part: d >= W); keys at least W older than the block's first query are summed into the running state first.
Cost O(T * (W + block)) and memory O(block * (W + block)): linear in T, like the full-sequence kernels.

Accumulation in fp32 (fp64 for fp64 inputs). The ring keeps the inputs' dtype; the hybrid's fk ring and sums fp32.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .precision import acc_dtype

BLOCK = 64


def ring_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor, pos0: Tensor, ring_k: Tensor, ring_v: Tensor,
                   ring_pos: Tensor, scale: float, window: int, fq: Optional[Tensor] = None,
                   fk: Optional[Tensor] = None, ring_fk: Optional[Tensor] = None, state: Optional[Tensor] = None,
                   norm: Optional[Tensor] = None, block: int = BLOCK, sink_k: Optional[Tensor] = None,
                   sink_v: Optional[Tensor] = None, sink_pos: Optional[Tensor] = None):
    """One chunk of window (or, given fq/fk/ring_fk/state/norm, hybrid) attention against a ring.

    q [B, Hq, T, D] at positions pos0 .. pos0+T-1 (pos0: 0-d long tensor); k [B, Hkv, T, D], v [B, Hkv, T, Dv];
    valid [B, T] bool (False: padding, never attended, never stored); ring_k [B, Hkv, W, D], ring_v [B, Hkv, W, Dv],
    ring_pos [B, W] long. Hybrid only: fq [B, Hq, T, F], fk / ring_fk [B, Hkv, T|W, F], state [B, Hkv, F, Dv] and
    norm [B, Hkv, F] (sums of fk^T v and fk over keys older than the ring). Attention sinks: sink_k [B, Hkv, N, D],
    sink_v [B, Hkv, N, Dv], sink_pos [B, N]: the first N real tokens of each row (padding does not count), visible
    with exact scores to every query they are at least W older than (nearer ones are in the ring); the hybrid keeps
    them out of its linear sums.

    Returns (o [B, Hq, T, Dv] in v's dtype, ring_k, ring_v, ring_pos), for the hybrid then (ring_fk, state, norm),
    then (sink_k, sink_v, sink_pos) when given: new tensors, the inputs are not modified.
    """
    hybrid = fq is not None
    n_sink = sink_k.shape[2] if sink_k is not None else 0
    B, Hq, T, D = q.shape
    Hkv, Dv, W = k.shape[1], v.shape[-1], ring_k.shape[2]
    if W != window:
        raise ValueError(f"ring holds {W} keys but the window is {window}")
    G = Hq // Hkv
    acc = acc_dtype(q)
    dev = q.device
    pos0 = pos0.to(device=dev, dtype=torch.long).reshape(())
    qpos = pos0 + torch.arange(T, device=dev)  # [T]
    kpos = torch.where(valid, qpos, -1)  # [B, T]
    hide = ~valid[:, None, :, None]  # padding is zeroed, so garbage (even NaN) there cannot leak
    k, v = k.masked_fill(hide, 0), v.masked_fill(hide, 0)
    keys = torch.cat([ring_k.to(acc), k.to(acc)], dim=2)
    vals = torch.cat([ring_v.to(acc), v.to(acc)], dim=2)
    kpos_all = torch.cat([ring_pos, kpos], dim=1)  # [B, W + T]
    qg = q.to(acc).reshape(B, Hkv, G, T, D)
    out = torch.empty(B, Hkv, G, T, Dv, dtype=acc, device=dev)
    if n_sink:  # store the chunk's keys that are among each row's first N real tokens, before attending
        new_sk, new_sv, new_sp = sink_k.clone(), sink_v.clone(), sink_pos.clone()
        real_index = (sink_pos >= 0).sum(-1, keepdim=True) + valid.long().cumsum(-1) - 1  # [B, T]
        rows, cols = (valid & (real_index < n_sink)).nonzero(as_tuple=True)
        slots_s = real_index[rows, cols]
        new_sk[rows, :, slots_s] = k[rows, :, cols].to(sink_k.dtype)
        new_sv[rows, :, slots_s] = v[rows, :, cols].to(sink_v.dtype)
        new_sp[rows, slots_s] = qpos[cols]
        sink_keys, sink_vals = new_sk.to(acc).unsqueeze(2), new_sv.to(acc).unsqueeze(2)  # [B, Hkv, 1, N, D]
        sink_p = new_sp[:, None, None, None, :]  # [B, 1, 1, 1, N]
    if hybrid:
        fqg = fq.to(acc).reshape(B, Hkv, G, T, -1)
        fk = fk.masked_fill(hide, 0)
        feats = torch.cat([ring_fk.to(acc), fk.to(acc)], dim=2)
        run_s, run_z = state.to(acc).clone(), norm.to(acc).clone()
        folded = pos0 - W  # run_s / run_z hold every key with position < folded

    def gather(lo: int, hi: int):
        """Ring entries plus chunk keys [lo, hi) (lo, hi clipped to the chunk): their indices into keys/vals."""
        lo, hi = max(lo, 0), min(hi, T)
        ring = torch.arange(W, device=dev)
        return torch.cat([ring, W + torch.arange(lo, hi, device=dev)]) if hi > lo else ring

    def is_sink(p: Tensor) -> Tensor:
        """[B, S] positions -> which are a row's sink tokens (exact scores, never in the linear sums)."""
        if not n_sink:
            return torch.zeros_like(p, dtype=torch.bool)
        return (p[:, :, None] == new_sp[:, None, :]).any(-1) & (p >= 0)

    def fold(upto: Tensor, lo: int, hi: int):
        """Add keys with folded <= position < upto (ring, or chunk keys [lo, hi)) to the running sums."""
        nonlocal run_s, run_z, folded
        idx = gather(lo, hi)
        p = kpos_all[:, idx]  # [B, S]
        take = ((p >= folded) & (p < upto) & (p >= 0) & ~is_sink(p)).to(acc)[:, None, :, None]  # [B, 1, S, 1]
        fk_sel = feats[:, :, idx] * take
        run_s = run_s + fk_sel.transpose(-1, -2) @ vals[:, :, idx]
        run_z = run_z + fk_sel.sum(-2)
        folded = upto

    for s in range(0, T, block):
        n = min(block, T - s)
        if hybrid:  # keys at least W before this block's first query are linear for the whole block
            fold(pos0 + s - W + 1, s - W - block, s - W + 1)
        idx = gather(s - W + 1, s + n)
        kp = kpos_all[:, idx][:, None, None, None, :]  # [B, 1, 1, 1, S]
        d = qpos[s:s + n][:, None] - kp  # [B, 1, 1, n, S]
        seen = kp >= 0
        in_window = seen & (d >= 0) & (d < W)
        scores = scale * (qg[:, :, :, s:s + n] @ keys[:, :, idx].unsqueeze(2).transpose(-1, -2))
        scores = scores.masked_fill(~in_window, float("-inf"))
        v_blk = v_near = vals[:, :, idx].unsqueeze(2)
        if n_sink:  # sinks at least W older than the query (nearer ones are in the window already)
            far = (sink_p >= 0) & (qpos[s:s + n][:, None] - sink_p >= W)
            sink_scores = scale * (qg[:, :, :, s:s + n] @ sink_keys.transpose(-1, -2))
            scores = torch.cat([sink_scores.masked_fill(~far, float("-inf")), scores], dim=-1)
            v_blk = torch.cat([sink_vals, v_blk], dim=-2)
        if not hybrid:  # normalised like window_attention (exp(s - logsumexp)), so prefill agrees to rounding
            lse = scores.logsumexp(-1, keepdim=True)
            lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))  # a padding query sees no key
            out[:, :, :, s:s + n] = (scores - lse).exp() @ v_blk
            continue
        m = scores.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        p = (scores - m).exp()
        older = seen & (d >= W) & (kp >= folded) & ~is_sink(kpos_all[:, idx])[:, None, None, None, :]
        a = (fqg[:, :, :, s:s + n] @ feats[:, :, idx].unsqueeze(2).transpose(-1, -2)) * older
        num = p @ v_blk + a @ v_near + fqg[:, :, :, s:s + n] @ run_s.unsqueeze(2)
        den = p.sum(-1) + a.sum(-1) + (fqg[:, :, :, s:s + n] * run_z[:, :, None, None, :]).sum(-1)
        den = torch.where(den > 0, den, torch.ones_like(den))
        out[:, :, :, s:s + n] = num / den.unsqueeze(-1)

    keep = min(T, W)  # the newest keys overwrite their slots
    slots = torch.remainder(qpos[T - keep:], W)
    new_k, new_v, new_pos = ring_k.clone(), ring_v.clone(), ring_pos.clone()
    new_k[:, :, slots] = k[:, :, T - keep:].to(ring_k.dtype)
    new_v[:, :, slots] = v[:, :, T - keep:].to(ring_v.dtype)
    new_pos[:, slots] = kpos[:, T - keep:]
    o = out.reshape(B, Hq, T, Dv).to(v.dtype)
    if not hybrid:
        return (o, new_k, new_v, new_pos) + ((new_sk, new_sv, new_sp) if n_sink else ())
    fold(pos0 + T - W, T - W - block, T - W)  # what leaves the ring joins the state
    new_fk = ring_fk.clone()
    new_fk[:, :, slots] = fk[:, :, T - keep:].to(ring_fk.dtype)
    sinks = (new_sk, new_sv, new_sp) if n_sink else ()
    return (o, new_k, new_v, new_pos, new_fk, run_s.to(state.dtype), run_z.to(norm.dtype)) + sinks
