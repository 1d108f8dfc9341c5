"""Cutting [B, H, T, D] tensors into fixed-size blocks along time, heads grouped under their KV head.

The chunked GLA, the blocked sliding window and the hybrid kernel all work on [B, Hkv, G, N, size, D] views
(T zero-padded to N * size) and put results back the same way.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def head_groups(q: Tensor, k: Tensor) -> tuple[int, int, int, int, int]:
    """(batch, query heads, length, KV heads, query heads per KV head) of [B, H, T, D] q and k (GQA)."""
    batch, hq, seq, _ = q.shape
    hkv = k.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    return batch, hq, seq, hkv, hq // hkv


def split_blocks(x: Tensor, batch: int, hkv: int, groups: int, n: int, size: int, acc) -> Tensor:
    """[B, Hkv*G, T, D] -> [B, Hkv, G, N, size, D] in dtype `acc`, zero-padded at the end of time."""
    x = x.to(acc)
    pad = n * size - x.shape[-2]
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(batch, hkv, groups, n, size, x.shape[-1])


def merge_blocks(x: Tensor, seq: int, like: Tensor) -> Tensor:
    """Inverse of split_blocks: [B, Hkv, G, N, size, ...] -> [B, Hkv*G, T, ...] in like.dtype."""
    b, hkv, groups, n, size = x.shape[:5]
    x = x.reshape(b, hkv * groups, n * size, *x.shape[5:])
    return x[:, :, :seq].to(like.dtype).contiguous()
