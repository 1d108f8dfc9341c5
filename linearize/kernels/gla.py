"""Chunked gated linear attention (GLA): forward and hand-derived backward, plain PyTorch.

Recurrence per kv head (query heads grouped GQA-style):
    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t.

The sequence is cut into chunks of C tokens. Inside a chunk, with b the inclusive cumsum of the
log gates (chunk-local, so it stays bounded) and S0 the state entering the chunk:
    o_i   = scale * [(q_i * e^{b_i}) S0 + sum_{j<=i} A_ij v_j]
    A_ij  = sum_c q_ic k_jc e^{b_ic - b_jc}
    S_end = e^{b_C} * S0 + sum_j (k_j * e^{b_C - b_j})^T v_j
Every exponent is <= 0, so no factor can overflow. A is built from 16-row sub-chunks: blocks
below the diagonal are matmuls of exp(b_i - r) and exp(r - b_j) (r = cumsum at the end of the
earlier sub-chunk, both factors <= 1); diagonal blocks are element-wise with the causal mask
applied before the exp. Only chunk-boundary states are kept, so memory and time are linear in T.

Backward (derived by hand; autograd is unavailable inside custom ops): a reverse pass over
chunks carries dH, the gradient w.r.t. the state leaving each chunk. The gate gradient uses
that q~ = q e^{b} and k~ = k e^{-b} carry all dependence on b inside a chunk, except the
explicit e^{b_C} factor of S_end, so
    dL/db_i = sum_heads q_i * dq_i - k_i * dk_i  (+ sum_v dH * S_end at i = C)
and dg is the reverse cumsum of dL/db over the chunk.

Gates must be finite (<= 0); -1e4 is fine, -inf is not.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .blocks import head_groups, merge_blocks, split_blocks
from .precision import acc_dtype

SUB_CHUNK = 16


def _gate_dtype(x: Tensor) -> torch.dtype:
    """Gate cumsums are kept in fp64 where the device has it: after a -1e4 gate the fp32 cumsum
    sits near -1e4..-1e5 and differences of it would lose ~1e-3..1e-2 absolute precision."""
    return torch.float32 if x.device.type == "mps" else torch.float64


def _decay(log_decay: Tensor, acc: torch.dtype) -> Tensor:
    """exp of a (precise, <= 0) log decay, evaluated in the accumulation dtype."""
    return log_decay.to(acc).exp()


class _Chunked:
    """Inputs padded to whole chunks and viewed as [B, Hkv, G, N, C, D] in the accumulation dtype.

    kv-side tensors (k, v, g, b) have G == 1 so they broadcast over the query heads of a group.
    Padding uses zeros for q/k/v and g = 0 (no decay), so padded tokens change nothing.
    b is the chunk-local inclusive gate cumsum; decay_in = e^{b}, decay_to_end = e^{b_C - b},
    chunk_decay = e^{b_C} as [.., N, K, 1].
    """

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, chunk_size: int):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.acc = acc_dtype(q)
        self.batch, self.hq, self.seq, self.hkv, self.groups = head_groups(q, k)
        self.chunk = chunk_size
        self.sub = SUB_CHUNK if chunk_size % SUB_CHUNK == 0 else chunk_size
        self.n_chunks = -(-self.seq // chunk_size)
        self.q = self.split(q, self.groups)
        self.k = self.split(k, 1)
        self.v = self.split(v, 1)
        self.b = self.split(g, 1).to(_gate_dtype(g)).cumsum(dim=-2)
        b_last = self.b[..., -1:, :]
        self.decay_in = _decay(self.b, self.acc)
        self.decay_to_end = _decay(b_last - self.b, self.acc)
        self.chunk_decay = _decay(b_last, self.acc).transpose(-1, -2)

    def split(self, x: Tensor, groups: int) -> Tensor:
        return split_blocks(x, self.batch, self.hkv, groups, self.n_chunks, self.chunk, self.acc)

    def merge(self, x: Tensor, like: Tensor) -> Tensor:
        """Inverse of split: [B, Hkv, G, N, C, D] -> [B, Hkv*G, T, D] in like.dtype."""
        return merge_blocks(x, self.seq, like)


class _GateFactors:
    """Decay factors of one chunk's intra-chunk attention, split into sub-chunks of size s.

    below[I, J] = exp(b_I - r_J) for sub-chunk I after J, else 0  ([.., n, n, s, K], <= 1)
    key_side[J] = exp(r_J - b_J)                                  ([.., n, s, K],    <= 1)
    diag[I]     = exp(b_i - b_j) for j <= i inside sub-chunk I    ([.., n, s, s, K], <= 1)
    """

    def __init__(self, b: Tensor, sub: int, acc: torch.dtype):
        n_sub = b.shape[-2] // sub
        self.n_sub, self.sub = n_sub, sub
        bs = b.unflatten(-2, (n_sub, sub))
        r = bs[..., -1, :]
        later = torch.ones(n_sub, n_sub, dtype=torch.bool, device=b.device).tril(-1)
        gap = bs[..., :, None, :, :] - r[..., None, :, None, :]
        self.below = _decay(gap.masked_fill(~later[:, :, None, None], float("-inf")), acc)
        self.key_side = _decay(r[..., None, :] - bs, acc)
        causal = torch.ones(sub, sub, dtype=torch.bool, device=b.device).tril()
        within = bs[..., :, None, :] - bs[..., None, :, :]
        self.diag = _decay(within.masked_fill(~causal[:, :, None], float("-inf")), acc)

    def blocks(self, x: Tensor) -> Tensor:
        return x.unflatten(-2, (self.n_sub, self.sub))

    def scores(self, x: Tensor, y: Tensor) -> Tensor:
        """A[i, j] = sum_c x_ic y_jc exp(b_ic - b_jc) for j <= i, else 0.  [.., C, C]."""
        xs, ys = self.blocks(x), self.blocks(y)
        keys = (ys * self.key_side)[..., None, :, :, :]
        off = (xs[..., :, None, :, :] * self.below) @ keys.transpose(-1, -2)
        on = (xs[..., :, None, :] * self.diag * ys[..., None, :, :]).sum(-1)
        eye = torch.eye(self.n_sub, dtype=x.dtype, device=x.device)
        blocks = off + eye[:, :, None, None] * on[..., :, None, :, :]
        chunk = self.n_sub * self.sub
        return blocks.transpose(-3, -2).reshape(*blocks.shape[:-4], chunk, chunk)

    def scores_vjp(self, d_scores: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Gradients of sum(d_scores * scores(x, y)) w.r.t. x and y; dy keeps x's group dim."""
        xs, ys = self.blocks(x), self.blocks(y)
        d = d_scores.unflatten(-1, (self.n_sub, self.sub)).unflatten(-3, (self.n_sub, self.sub))
        d = d.transpose(-3, -2)  # [.., n(I), n(J), s(i), s(j)]
        d_on = torch.diagonal(d, dim1=-4, dim2=-3).movedim(-1, -3)  # [.., n, s(i), s(j)]
        dx = ((d @ (ys * self.key_side)[..., None, :, :, :]) * self.below).sum(-3)
        dx = dx + (d_on[..., None] * self.diag * ys[..., None, :, :]).sum(-2)
        dy = (d.transpose(-1, -2) @ (xs[..., :, None, :, :] * self.below)).sum(-4) * self.key_side
        dy = dy + (d_on[..., None] * self.diag * xs[..., :, None, :]).sum(-3)
        return dx.flatten(-3, -2), dy.flatten(-3, -2)


def _chunk_states(ch: _Chunked, initial_state: Tensor | None) -> tuple[Tensor, Tensor]:
    """States entering each chunk [B, Hkv, 1, N, K, V] and the final state [B, Hkv, 1, K, V]."""
    increments = (ch.k * ch.decay_to_end).transpose(-1, -2) @ ch.v
    if initial_state is None:
        state = ch.k.new_zeros(ch.batch, ch.hkv, 1, ch.k.shape[-1], ch.v.shape[-1])
    else:
        state = initial_state.to(ch.acc).unsqueeze(2)
    entering = []
    for n in range(ch.n_chunks):
        entering.append(state)
        state = ch.chunk_decay[..., n, :, :] * state + increments[..., n, :, :]
    if not entering:
        return state.new_zeros(*state.shape[:3], 0, *state.shape[3:]), state
    return torch.stack(entering, dim=3), state


def chunk_gla_fwd(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float,
                  initial_state: Tensor | None = None, chunk_size: int = 64
                  ) -> tuple[Tensor, Tensor]:
    """Returns (o [B, Hq, T, V] in q.dtype, final_state [B, Hkv, K, V] in fp32/fp64)."""
    ch = _Chunked(q, k, v, g, chunk_size)
    entering, final = _chunk_states(ch, initial_state)
    inter = (ch.q * ch.decay_in) @ entering
    intra = _GateFactors(ch.b, ch.sub, ch.acc).scores(ch.q, ch.k) @ ch.v
    o = scale * (inter + intra)
    return ch.merge(o, q), final.squeeze(2)


def chunk_gla_bwd(do: Tensor, dht: Tensor | None, q: Tensor, k: Tensor, v: Tensor, g: Tensor,
                  scale: float, initial_state: Tensor | None = None, chunk_size: int = 64
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dg, dh0) given do (grad of o) and dht (grad of final state or None).

    dh0 is always returned (initial_state's dtype, or the accumulation dtype when it is None).
    """
    ch = _Chunked(q, k, v, g, chunk_size)
    d_out = ch.split(do, ch.groups)
    entering, final = _chunk_states(ch, initial_state)
    leaving = torch.cat([entering[..., 1:, :, :], final.unsqueeze(3)], dim=3)

    # Reverse pass: d_leaving[n] = dL/d(state leaving chunk n).
    from_outputs = scale * ((ch.q * ch.decay_in).transpose(-1, -2) @ d_out).sum(2, keepdim=True)
    d_state = ch.k.new_zeros(final.shape) if dht is None else dht.to(ch.acc).unsqueeze(2)
    d_leaving = []
    for n in reversed(range(ch.n_chunks)):
        d_leaving.append(d_state)
        d_state = ch.chunk_decay[..., n, :, :] * d_state + from_outputs[..., n, :, :]
    d_leaving = torch.stack(d_leaving[::-1], dim=3) if d_leaving else leaving

    factors = _GateFactors(ch.b, ch.sub, ch.acc)
    scores = factors.scores(ch.q, ch.k)
    d_scores = scale * (d_out @ ch.v.transpose(-1, -2))
    dq_intra, dk_intra = factors.scores_vjp(d_scores, ch.q, ch.k)

    dq = scale * (d_out @ entering.transpose(-1, -2)) * ch.decay_in + dq_intra
    dk = dk_intra.sum(2, keepdim=True) + (ch.v @ d_leaving.transpose(-1, -2)) * ch.decay_to_end
    dv = (scale * (scores.transpose(-1, -2) @ d_out).sum(2, keepdim=True)
          + (ch.k * ch.decay_to_end) @ d_leaving)

    d_cumsum = (ch.q * dq).sum(2, keepdim=True) - ch.k * dk
    dg = d_cumsum.flip(-2).cumsum(-2).flip(-2) + (d_leaving * leaving).sum(-1).unsqueeze(-2)

    dh0 = d_state.squeeze(2).to(ch.acc if initial_state is None else initial_state.dtype)
    return ch.merge(dq, q), ch.merge(dk, k), ch.merge(dv, v), ch.merge(dg, g), dh0.contiguous()


def gla_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """One token of the recurrence (a decoding step): S = diag(exp(g)) S + k^T v, o = scale * q S.

    q [B, Hq, 1, K], k / g [B, Hkv, 1, K], v [B, Hkv, 1, V], state [B, Hkv, K, V]. Plain tensor ops, so a compiled
    graph fuses them; the chunked kernel would pad the token to a whole chunk. Returns (o in q's dtype, new state in
    the state's dtype)."""
    B, Hq, _, K = q.shape
    Hkv, V = k.shape[1], v.shape[-1]
    acc = state.dtype
    new = g[:, :, 0, :, None].to(acc).exp() * state + k[:, :, 0, :, None].to(acc) * v[:, :, 0, None, :].to(acc)
    o = scale * (q[:, :, 0].to(acc).reshape(B, Hkv, Hq // Hkv, K) @ new)
    return o.reshape(B, Hq, 1, V).to(q.dtype), new
