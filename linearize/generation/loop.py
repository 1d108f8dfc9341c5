"""A plain prefill-then-step loop over a converted model and its StateCache (what `generate` does, in the open).

Positions follow transformers' convention for left padding (position = number of real tokens before, so a padded
row sees the same positions as the same text alone); the 2-D attention mask grows with the sequence as in `generate`.
Everything runs under `torch.no_grad()`: the decoding ops are inference-only.
"""
from __future__ import annotations

from typing import Optional

import torch


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """transformers' left-padding positions: cumulative count of real tokens minus one, 0 on padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _forward(model, ids, cache, mask, pos, keep_all: bool):
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=0 if keep_all else 1)
    return out.logits


@torch.no_grad()
def prefill(model, input_ids, cache, attention_mask: Optional[torch.Tensor] = None,
            chunk_size: Optional[int] = None, keep_all: bool = False) -> torch.Tensor:
    """Run the prompt through the model into `cache`, `chunk_size` tokens at a time (all at once by default).

    Returns the logits of the last position [B, V], or of every position [B, T, V] with keep_all=True."""
    B, T = input_ids.shape
    mask = attention_mask if attention_mask is not None else torch.ones(B, T, dtype=torch.long,
                                                                        device=input_ids.device)
    pos = positions(mask)
    start = int(cache.get_seq_length())
    if start:
        raise ValueError("linearize prefill: the cache already holds tokens; use step() to continue")
    chunk = chunk_size or T
    outs = []
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        logits = _forward(model, input_ids[:, s:e], cache, mask[:, :e], pos[:, s:e], keep_all)
        outs.append(logits)
    return torch.cat(outs, dim=1) if keep_all else outs[-1][:, -1]


@torch.no_grad()
def step(model, tokens, cache, attention_mask: torch.Tensor) -> torch.Tensor:
    """One decoding step: tokens [B] at the end of `attention_mask` [B, past + 1]; returns logits [B, V]."""
    pos = positions(attention_mask)[:, -1:]
    torch._dynamo.maybe_mark_dynamic(attention_mask, 1)  # it grows every step: one decoding graph, not two
    return _forward(model, tokens[:, None], cache, attention_mask, pos, keep_all=False)[:, -1]


@torch.no_grad()
def decode_logits(model, input_ids, cache, prompt_len: int, attention_mask: Optional[torch.Tensor] = None,
                  chunk_size: Optional[int] = None) -> torch.Tensor:
    """Teacher-forced decoding: prefill input_ids[:, :prompt_len], then step through the rest one token at a time.

    Returns the logits of every position [B, T, V], for comparison with one full forward over input_ids."""
    B, T = input_ids.shape
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    logits = [prefill(model, input_ids[:, :prompt_len], cache, mask[:, :prompt_len], chunk_size, keep_all=True)]
    for t in range(prompt_len, T):
        logits.append(step(model, input_ids[:, t], cache, mask[:, :t + 1])[:, None])
    return torch.cat(logits, dim=1)


@torch.no_grad()
def generate_greedy(model, input_ids, cache, max_new_tokens: int,
                    attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Greedy generation through prefill/step; returns [B, prompt + max_new_tokens] token ids."""
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    logits = prefill(model, input_ids, cache, mask)
    out = [input_ids]
    for i in range(max_new_tokens):
        nxt = logits.argmax(-1)
        out.append(nxt[:, None])
        if i == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        logits = step(model, nxt, cache, mask)
    return torch.cat(out, dim=1)
