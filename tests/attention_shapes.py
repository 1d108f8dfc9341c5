"""A catalogue of the shapes softmax attention takes in real code, as plain functions (after Inductor's
fuse_attention catalogue, plus what it lacks). Each takes q [B, H, T, D], k, v [B, Hkv, T, D] and returns the
attention output; `SHAPES` maps a name to (function, expected site attributes)."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

T = 10
CAUSAL = torch.ones(1, 1, 32, 32).tril()  # a GPT-2 style buffer, sliced to T


def mul_scale(q, k, v):
    return (q @ k.transpose(-2, -1)).mul(0.3).softmax(dim=-1) @ v


def div_sqrt(q, k, v):
    return torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.size(-1)), dim=-1).matmul(v)


def no_scale(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


def prescaled_q(q, k, v):
    return torch.softmax((q * 0.25) @ k.transpose(-2, -1), -1) @ v


def split_scale(q, k, v):
    s = q.size(-1) ** -0.25
    return torch.softmax((q * s) @ (k * s).transpose(-2, -1), -1) @ v


def full_inverse_scale(q, k, v):
    inv = torch.full((), 4.0, dtype=q.dtype)
    return torch.softmax((q @ k.transpose(-2, -1)).div(inv), -1) @ v


def additive_mask(q, k, v, mask):
    return torch.softmax(q @ k.transpose(-2, -1) * 0.25 + mask, -1) @ v


def masked_fill_buffer(q, k, v):
    t = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) * 0.25
    scores = scores.masked_fill(CAUSAL[:, :, :t, :t] == 0, float("-inf"))
    return F.softmax(scores, dim=-1) @ v


def where_in_graph_mask(q, k, v):
    t = q.size(-2)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    scores = torch.where(causal, q @ k.transpose(-2, -1) / 4.0, torch.finfo(q.dtype).min)
    return scores.softmax(-1) @ v


def dropout_eval_upcast(q, k, v):
    scores = q @ k.transpose(-2, -1) * 0.25
    p = F.softmax(scores.float(), dim=-1).to(q.dtype)
    return F.dropout(p, p=0.1, training=False) @ v


def softmax_dtype_then_cast(q, k, v, mask):
    w = torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask[:, :, :, : k.shape[-2]]
    return torch.matmul(F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype), v)


def permute_layout(q, k, v):
    qb, kb, vb = (x.transpose(1, 2) for x in (q, k, v))  # [B, T, H, D] as some models keep them
    scores = qb.permute(0, 2, 1, 3) @ kb.permute(0, 2, 3, 1)
    return (scores * 0.25).softmax(-1) @ vb.permute(0, 2, 1, 3)


def bmm_3d(q, k, v):
    b, h, t, d = q.shape
    q3, k3, v3 = (x.reshape(b * h, t, d) for x in (q, k, v))
    out = torch.bmm(torch.softmax(torch.bmm(q3, k3.transpose(1, 2)) * 0.25, -1), v3)
    return out.view(b, h, t, d)


def einsum_form(q, k, v):
    w = torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.25
    return torch.einsum("bhqk,bhkd->bhqd", w.softmax(-1), v)


def repeat_interleave_gqa(q, k, v):
    n = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n, dim=1), v.repeat_interleave(n, dim=1)
    return torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1) @ v


def repeat_kv_gqa(q, k, v):
    b, hkv, t, d = k.shape
    n = q.shape[1] // hkv
    rep = lambda x: x[:, :, None, :, :].expand(b, hkv, n, t, d).reshape(b, hkv * n, t, d)
    return torch.softmax(q @ rep(k).transpose(2, 3) * 0.25, -1) @ rep(v)


def softcap_gemma2(q, k, v, mask):
    w = q @ k.transpose(2, 3) * 0.25
    w = torch.tanh(w / 5.0) * 5.0
    return torch.softmax(w + mask, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def sinks_gpt_oss(q, k, v, mask, sinks):
    w = q @ k.transpose(2, 3) * 0.25 + mask
    s = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
    combined = torch.cat([w, s], dim=-1)
    combined = combined - combined.max(dim=-1, keepdim=True).values
    probs = F.softmax(combined, dim=-1, dtype=combined.dtype)[..., :-1]
    return probs @ v


def alibi_bias(q, k, v):
    t = q.size(-2)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])[: q.size(1)].view(1, -1, 1, 1)
    dist = (torch.arange(t)[None, :] - torch.arange(t)[:, None]).float()
    bias = slopes * dist.view(1, 1, t, t)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    w = (q @ k.transpose(-2, -1) * 0.25 + bias).masked_fill(~causal, float("-inf"))
    return w.softmax(-1) @ v


def cross_attention(q, k, v):
    """Encoder-decoder attention: queries attend to all of a memory of another length."""
    mem_k, mem_v = torch.cat([k, k[:, :, :3]], dim=2), torch.cat([v, v[:, :, :3]], dim=2)
    return torch.softmax(q @ mem_k.transpose(-2, -1) * 0.25, -1) @ mem_v


def key_padding_only(q, k, v, pad):
    """A bidirectional encoder with a [B, 1, 1, S] key-padding mask: cannot be causal, whatever its values."""
    return torch.softmax(q @ k.transpose(-2, -1) * 0.25 + pad, -1) @ v


def activation_mask_sdpa(q, k, v):
    """Doge-style: a mask computed from the values themselves is a bias, not a causal mask."""
    t = q.size(-2)
    dynamic = torch.sigmoid(v.mean(-1, keepdim=True)).transpose(-1, -2).expand(-1, -1, t, -1)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    mask = dynamic.masked_fill(~causal, torch.finfo(q.dtype).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def fp32_scores_other_dtype_values(q, k, v):
    """Flint: scores forced to float32 whatever the model dtype, probabilities cast back to v's dtype."""
    q, k, v = q.double(), k.double(), v.double()
    w = torch.matmul(q.float(), k.float().transpose(2, 3)) * 0.25
    return (F.softmax(w, dim=-1).to(v.dtype) @ v).float()


def bmm3d_scores_4d_values(q, k, v):
    """GPT-NeoX-Japanese: q, k flattened to [B*H, T, D] for baddbmm, scores viewed back to 4-D, v stays 4-D."""
    b, h, t, d = q.shape
    scores = torch.baddbmm(torch.zeros(b * h, t, t), q.reshape(b * h, t, d), k.reshape(b * h, t, d).transpose(1, 2),
                           beta=1.0, alpha=0.25)
    return torch.matmul(scores.view(b, h, t, t).softmax(-1), v)


def gpt1_multiplicative_mask(q, k, v):
    """GPT-1: scores * b + -1e4 * (1 - b), b a {0, 1} causal buffer."""
    t = q.size(-2)
    b = CAUSAL[:, :, :t, :t]
    w = (q @ k.transpose(-2, -1)) * 0.25
    return (w * b + -1e4 * (1 - b)).softmax(-1) @ v


def xglm_clamped_double_view(q, k, v, mask):
    """XGLM: [B*H] bmm, mask added in 4-D, clamped at finfo.min, probabilities viewed 4-D and back before bmm."""
    b, h, t, d = q.shape
    q3, k3, v3 = (x.reshape(b * h, t, d) for x in (q, k, v))
    w = torch.bmm(q3 * 0.25, k3.transpose(1, 2))
    w = torch.max(w.view(b, h, t, t) + mask, torch.full((), torch.finfo(w.dtype).min)).view(b * h, t, t)
    p = F.softmax(w, dim=-1).view(b, h, t, t).view(b * h, t, t)
    return torch.bmm(F.dropout(p, p=0.1, training=False), v3).view(b, h, t, d)


def dropout_train(q, k, v):
    return F.dropout(torch.softmax(q @ k.transpose(-2, -1) * 0.25, -1), p=0.2, training=True) @ v


def _causal_float_mask(t=T, s=None):
    """[1, 1, t, s] additive causal mask (s > t: a longer buffer the model slices to the key length)."""
    s = s or t
    return torch.zeros(1, 1, t, s).masked_fill(torch.ones(t, s, dtype=torch.bool).triu(1), torch.finfo().min)


# name: (fn, extra-args factory, expected attributes)
SHAPES = {
    "mul_scale": (mul_scale, lambda: (), {"scale": 0.3}),
    "div_sqrt": (div_sqrt, lambda: (), {"scale": 8 ** -0.5}),
    "no_scale": (no_scale, lambda: (), {"scale": 1.0}),
    "prescaled_q": (prescaled_q, lambda: (), {"scale": 0.25}),
    "split_scale": (split_scale, lambda: (), {"scale": 8 ** -0.5}),
    "full_inverse_scale": (full_inverse_scale, lambda: (), {"scale": 0.25}),
    "additive_mask": (additive_mask, lambda: (_causal_float_mask(),), {"scale": 0.25, "mask_kind": "mask"}),
    "masked_fill_buffer": (masked_fill_buffer, lambda: (), {"scale": 0.25, "mask_kind": "mask"}),
    "where_in_graph_mask": (where_in_graph_mask, lambda: (), {"scale": 0.25, "mask_kind": "mask"}),
    "dropout_eval_upcast": (dropout_eval_upcast, lambda: (), {"scale": 0.25}),
    "softmax_dtype_then_cast": (softmax_dtype_then_cast, lambda: (_causal_float_mask(T, 16),), {"mask_kind": "mask"}),
    "permute_layout": (permute_layout, lambda: (), {"scale": 0.25}),
    "bmm_3d": (bmm_3d, lambda: (), {"scale": 0.25, "out_rank": 3}),
    "einsum_form": (einsum_form, lambda: (), {"scale": 0.25}),
    "repeat_interleave_gqa": (repeat_interleave_gqa, lambda: (), {"gqa_groups": 2}),
    "repeat_kv_gqa": (repeat_kv_gqa, lambda: (), {"gqa_groups": 2}),
    "softcap_gemma2": (softcap_gemma2, lambda: (_causal_float_mask(),), {"softcap": 5.0}),
    "sinks_gpt_oss": (sinks_gpt_oss, lambda: (_causal_float_mask(), torch.randn(4)), {"mask_kind": "mask"}),
    "alibi_bias": (alibi_bias, lambda: (), {"mask_kind": "bias"}),
    "cross_attention": (cross_attention, lambda: (), {"is_causal": False, "attn_mask": None}),
    "dropout_train": (dropout_train, lambda: (), {"dropout_p": 0.2}),
    "xglm_clamped_double_view": (xglm_clamped_double_view, lambda: (_causal_float_mask(),),
                                 {"scale": 0.25, "mask_kind": "mask", "out_rank": 3}),
    "gpt1_multiplicative_mask": (gpt1_multiplicative_mask, lambda: (), {"scale": 0.25, "mask_kind": "mask"}),
    "fp32_scores_other_dtype_values": (fp32_scores_other_dtype_values, lambda: (), {"scale": 0.25}),
    "bmm3d_scores_4d_values": (bmm3d_scores_4d_values, lambda: (), {"scale": 0.25, "out_rank": 4}),
    "activation_mask_sdpa": (activation_mask_sdpa, lambda: (), {"mask_kind": "bias"}),
    "key_padding_only": (key_padding_only, lambda: (torch.zeros(2, 1, 1, T),), {"causality": "none"}),
}


class BrokenAttention(nn.Module):
    """Projections and RoPE-free SDPA separated by a graph break: the SDPA graph has no projection in it."""

    def __init__(self, d=32, h=2):
        super().__init__()
        self.h = h
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        B, T, d = x.shape
        split = lambda t: t.view(B, T, self.h, d // self.h).transpose(1, 2)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        torch._dynamo.graph_break()
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
