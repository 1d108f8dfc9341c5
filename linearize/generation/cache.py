"""`StateCache`: a transformers `Cache` whose size does not grow with the context, for linearized models.

Per layer it holds what the layer's rewrite reads (generation/plan.py): the fp32 recurrent state per KV head (gla),
a ring of the last W post-RoPE keys and values with their positions (swa), both (liger), ring + feature ring + linear
sums (lolcats), or, for a site kept as softmax, an ordinary preallocated KV cache (transformers' StaticLayer).

How the state flows (docs/decoding.md): a stateful layer's `update` does not return keys. It leaves a
`linearize::state_cache_kv` marker in the captured graph, holding the current keys/values, the position offset and
the layer's buffers; the backend's `bind_state_cache` pass finds the attention that reads the marker and emits the
stateful op instead, which reads the buffers and writes them back in place. Like transformers' StaticCache, the
mask covers `capacity` slots and the position offset is a tensor, so decoding never recompiles.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, StaticLayer

from .plan import LayerPlan, plan_layers

TOO_LONG = ("linearize StateCache: the context would pass this cache's capacity of {cap} tokens (the model's "
            "position limit unless max_length was given); generate fewer tokens, or build the cache with a larger "
            "max_length if the model takes longer contexts")


def _check_room(layer, new_tokens: int) -> None:
    # the message is a constant string made at construction: formatting it here would read the capacity, which
    # Dynamo may treat as symbolic (several caches of different sizes) and break the graph on
    torch._assert_async(layer.cumulative_length + new_tokens <= layer.max_cache_len, layer.too_long)


class StateLayer(CacheLayerMixin):
    """A rewritten layer's decoding state: fixed-size buffers, updated in place by the compiled graph."""

    is_compileable = False  # compiled by linearize, never by generate's own auto-compile
    is_sliding = False

    def __init__(self, plan: LayerPlan, capacity: int, batch: int, dtype: torch.dtype, device):
        super().__init__()
        self.plan, self.max_cache_len = plan, capacity
        self.buffers = plan.buffers(batch, dtype, device)
        self.cumulative_length = torch.zeros((), dtype=torch.long, device=device)
        self._plan_json = plan.to_json()
        self.too_long = TOO_LONG.format(cap=capacity)
        self.dtype, self.device, self.is_initialized = dtype, device, True
        for t in (*self.buffers.values(), self.cumulative_length):
            torch._dynamo.mark_static_address(t)

    def lazy_initialization(self, key_states, value_states) -> None:  # buffers are made up front
        return None

    def update(self, key_states, value_states, *args, **kwargs):
        T = key_states.shape[-2]
        _check_room(self, T)
        pos0 = self.cumulative_length.clone()
        self.cumulative_length.add_(T)
        return torch.ops.linearize.state_cache_kv(key_states, value_states, pos0, list(self.buffers.values()),
                                                  self.plan.layer, self._plan_json, self.max_cache_len)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_seq_length(self):
        return self.cumulative_length

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        for name, t in self.buffers.items():
            t.fill_(-1) if name.endswith("_pos") else t.zero_()
        self.cumulative_length.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for t in self.buffers.values():
            t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers.values())


class KVLayer(StaticLayer):
    """A layer kept as softmax attention: transformers' StaticLayer, made up front, with the capacity check."""

    def __init__(self, plan: LayerPlan, capacity: int, batch: int, dtype: torch.dtype, device, heads: int,
                 head_dim: int):
        super().__init__(max_cache_len=capacity)
        self.plan, self.too_long = plan, TOO_LONG.format(cap=capacity)
        k = torch.zeros(batch, plan.kv_heads or heads, 0, plan.k_dim or head_dim, dtype=dtype, device=device)
        v = torch.zeros(batch, plan.kv_heads or heads, 0, plan.v_dim or head_dim, dtype=dtype, device=device)
        self.lazy_initialization(k, v)

    def update(self, key_states, value_states, *args, **kwargs):
        _check_room(self, key_states.shape[-2])
        return super().update(key_states, value_states, *args, **kwargs)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


class StateCache(Cache):
    """Decoding cache for a model converted by linearize: `model.generate(ids, past_key_values=StateCache(model))`.

    rules: the rule set the model was compiled with (default: the one `linearize.convert` recorded, else the
    default rule set);
    a different one raises here, and a cache built for other rules raises when the backend binds it.
    batch_size: rows generated at once (after any expansion for sampling several sequences).
    max_length: token capacity (prompt + generated); defaults to the model's position limit
    (`config.max_position_embeddings`). Asking for more raises unless `beyond_position_limit=True` (benchmarks).
    Bytes do not grow with the context for rewritten layers; kept softmax layers preallocate `max_length` slots.
    """

    def __init__(self, model, *, rules=None, batch_size: int = 1, max_length: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, device=None, beyond_position_limit: bool = False):
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.rules = _resolve_rules(model, rules)
        limit = getattr(config, "max_position_embeddings", None)
        capacity = max_length or limit
        if capacity is None:
            raise ValueError("linearize StateCache: the config has no max_position_embeddings; pass max_length=")
        if limit is not None and capacity > limit and not beyond_position_limit:
            raise ValueError(f"linearize StateCache: max_length={capacity} is longer than the model's position limit "
                             f"(config.max_position_embeddings={limit}); the model was not trained for positions "
                             "past it. Pass beyond_position_limit=True to allow it anyway.")
        param = next(model.parameters())
        dtype, device = dtype or param.dtype, device or param.device
        n_layers = config.num_hidden_layers
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.plans = _cached_plans(model, self.rules, n_layers, device)
        layers = [StateLayer(p, capacity, batch_size, dtype, device) if p.stateful else
                  KVLayer(p, capacity, batch_size, dtype, device, heads, head_dim) for p in self.plans]
        super().__init__(layers=layers)
        self.capacity, self.batch = capacity, batch_size

    def nbytes(self) -> int:
        """Bytes held by the cache's buffers (states, rings, positions, KV slots of kept layers)."""
        return sum(layer.nbytes() for layer in self.layers)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("linearize StateCache: a recurrent state cannot be cropped back (assisted or "
                                  "speculative decoding needs a cache it can roll back)")

    def describe(self) -> str:
        kinds = {}
        for p in self.plans:
            kinds[p.rewrite] = kinds.get(p.rewrite, 0) + 1
        parts = ", ".join(f"{n} {k}" for k, n in kinds.items())
        return f"StateCache(rules={self.rules!s}, capacity={self.capacity}, {parts}; {self.nbytes() / 2**20:.2f} MiB)"


def _resolve_rules(model, rules):
    recorded = getattr(model, "_linearize_rules", None)
    if rules is None:
        from ..options import DEFAULT_RULES

        return recorded if recorded is not None else DEFAULT_RULES
    if recorded is not None and str(rules) != str(recorded):
        raise ValueError(f"linearize StateCache: the model was converted with rules={recorded!r}, but the cache is "
                         f"asked for rules={rules!r}; a cache must hold the state of the rewrite the model runs. "
                         f"Use StateCache(model) or rules={recorded!r}.")
    return rules


def _cached_plans(model, rules, n_layers, device) -> list:
    """Plans are remembered on the model per rule set (planning traces the model once, a few seconds)."""
    memo = model.__dict__.setdefault("_linearize_plans", {})
    key = str(getattr(rules, "name", rules))
    if key not in memo:
        memo[key] = plan_layers(model, rules, n_layers, device)
    return memo[key]
