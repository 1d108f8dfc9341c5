"""Rewrite targets: for each, its parameters, a `check` that says why a site cannot take it, and an `emit`.

The split follows onnxscript's rewrite rules: `check(site, params)` returns None or a reason (the site then keeps
softmax attention and the explain report shows the reason); `emit(graph, site, params)` inserts the replacement
before the site's output node and returns the new node.
"""
from __future__ import annotations

import contextlib
import contextvars
import difflib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx as fx

from . import replacements as R
from . import stateful as S
from .guards import mask_is_causal
from .gates import NONNEGATIVE_FEATURE_MAPS
from .learned import LEARNABLE

GLA_DEFAULTS = {"gate": "logsigmoid", "gate_normalizer": 16.0, "feature_map": "softmax", "chunk_size": 64,
                "normalize": False, "scale": 1.0, "gate_lower_bound": 0.0, "decay": 0.99}
WINDOW_DEFAULTS = {"window": 64, "sinks": 0}  # sinks: the first N tokens stay visible (StreamingLLM)
_KERNELS = contextvars.ContextVar("linearize_kernels", default="auto")


@contextlib.contextmanager
def kernel_choice(kernels: str):
    """Within this block, emitted window / gla / liger replacements carry `kernels=` (the backend option)."""
    token = _KERNELS.set(kernels)
    try:
        yield
    finally:
        _KERNELS.reset(token)


def _kernel_kwargs() -> dict:
    choice = _KERNELS.get()
    return {} if choice == "auto" else {"kernels": choice}


@dataclass
class Target:
    name: str
    defaults: dict
    check: Callable
    emit: Optional[Callable]  # None: leave the site as it is
    choices: dict = field(default_factory=dict)  # param -> allowed values
    # what a StateCache holds for a site with this rewrite while decoding (generation/plan.py makes them);
    # empty: an ordinary KV cache
    state_buffers: tuple = ()

    def resolve_params(self, given: dict) -> dict:
        """Defaults overlaid with `given`; unknown names, wrong types and bad values raise ValueError."""
        params = dict(self.defaults)
        for key, val in given.items():
            if key == "learn" and key in self.defaults:
                params[key] = self._learn(val)
                continue
            if key not in self.defaults:
                close = difflib.get_close_matches(str(key), list(self.defaults), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                known = ", ".join(self.defaults) or "none"
                raise ValueError(f"unknown parameter {key!r} for rewrite {self.name!r}{hint}; parameters: {known}")
            params[key] = _coerce(key, val, self.defaults[key])
            if key in self.choices and params[key] not in self.choices[key]:
                raise ValueError(f"{key}: {val!r} is not one of {', '.join(map(str, self.choices[key]))}")
        _validate(params)
        return params

    def _learn(self, val) -> list:
        """`learn:` names parameters of this target that have a learnable form (rewrite/learned.py)."""
        names = list(LEARNABLE.get(self.name, {}))
        if not isinstance(val, list) or not all(isinstance(x, str) for x in val):
            raise ValueError(f"learn: expected a list of parameter names ({', '.join(names)}), got {val!r}")
        for x in val:
            if x not in names:
                raise ValueError(f"learn: {x!r} cannot be learned in {self.name}; learnable: {', '.join(names)}")
        return sorted(set(val), key=val.index)


def _coerce(key, val, default):
    if isinstance(default, bool):
        if not isinstance(val, bool):
            raise ValueError(f"{key}: expected true or false, got {val!r}")
        return val
    if isinstance(default, int) and not isinstance(default, bool):
        if not isinstance(val, int) or isinstance(val, bool):
            raise ValueError(f"{key}: expected an integer, got {val!r}")
        return val
    if isinstance(default, float):
        if not isinstance(val, (int, float)) or isinstance(val, bool):
            raise ValueError(f"{key}: expected a number, got {val!r}")
        return float(val)
    if isinstance(default, (list, tuple)):
        if not (isinstance(val, list) and len(val) == len(default)
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in val)):
            raise ValueError(f"{key}: expected a list of {len(default)} numbers, got {val!r}")
        return [float(x) for x in val]
    if not isinstance(val, type(default)):
        raise ValueError(f"{key}: expected {type(default).__name__}, got {val!r}")
    return val


def _validate(params: dict) -> None:
    if params.get("window", 1) < 1:
        raise ValueError(f"window: must be at least 1, got {params['window']}")
    if params.get("sinks", 0) < 0:
        raise ValueError(f"sinks: must be 0 or more (tokens kept visible from the start), got {params['sinks']}")
    chunk = params.get("chunk_size", 16)
    if chunk < 16 or chunk % 16:
        raise ValueError(f"chunk_size: must be a positive multiple of 16, got {chunk}")
    if params.get("gate_normalizer", 1.0) <= 0:
        raise ValueError("gate_normalizer: must be positive (log gates must stay <= 0)")
    if not 0.0 <= params.get("gate_lower_bound", 0.0) < 1.0:
        raise ValueError(f"gate_lower_bound: must be in [0, 1), got {params['gate_lower_bound']}")
    if not 0.0 < params.get("decay", 0.5) < 1.0:
        raise ValueError(f"decay: must be in (0, 1) (a per-token retention factor), got {params['decay']}")
    if any(w < 0 for w in params.get("mix", ())):
        raise ValueError(f"mix: weights must be non-negative, got {params['mix']}")
    if params.get("scale", 1.0) <= 0:
        raise ValueError(f"scale: must be positive, got {params['scale']}")


# ----- checks -------------------------------------------------------------------------------------------------

def _check_exact(site, params) -> Optional[str]:
    if site.dropout_p:
        return f"attention dropout (p={site.dropout_p}) is random: re-emitting it would not reproduce the model"
    return None


def _check_causal_self(site) -> Optional[str]:
    """Window and linear rewrites replace causal self-attention whose scores are plain scaled dot products."""
    if site.dropout_p:
        return _check_exact(site, params=None)
    if site.softcap:
        return f"logit soft-capping (cap {site.softcap:g}) has no equivalent in a window or linear branch"
    if site.sinks is not None:
        return "attention sinks have no equivalent in a window or linear branch"
    if site.mask_kind == "bias":
        return "the scores carry an additive bias (e.g. ALiBi), not only a mask"
    B, Hq, Hkv, L, S, D, Dv = site.shape
    if L != S:
        return f"query length {L} differs from key length {S} (decoding with a KV cache is not rewritten)"
    if site.causality == "none":
        how = ("no causal mask" if site.attn_mask is None else
               "key-padding mask only" if site.mask_rows == 1 else
               "bidirectional mask on the example input")
        return f"non-causal attention ({how}: encoder or cross attention); window and linear rewrites are causal"
    if site.mask_example == "padded":
        return "the example input is padded: window and linear rewrites do not support padding masks yet"
    return None


def _check_linear(site, params) -> Optional[str]:
    why = _check_causal_self(site)
    if why:
        return why
    if site.provenance is None:
        return f"no provenance for the linear branch: {site.provenance_missing}"
    return None


def _check_window(site, params) -> Optional[str]:
    return _check_causal_self(site)


def _check_liger(site, params) -> Optional[str]:
    return _check_linear(site, params)


def _check_keep(site, params) -> Optional[str]:
    return None


# ----- emission -----------------------------------------------------------------------------------------------

def _guard_mask(graph: fx.Graph, site) -> None:
    """A causal rewrite of a site with an explicit mask is only right if that mask is causal: check it at run time.

    `torch._assert_async` is side-effectful, so neither FX nor Inductor removes it.
    """
    if site.attn_mask is None or site.is_causal:
        return
    ok = graph.call_function(mask_is_causal, (site.attn_mask,))
    graph.call_function(torch._assert_async, (ok, f"linearize: the attention mask at {site.module_path} is neither "
                        "causal nor a causal sliding window (padding?); window and linear rewrites support only "
                        "those. Pass no padded attention_mask, or use rules='exact' or 'keep'."))


def _state_args(graph, site) -> tuple:
    """(valid, pos0, *buffers) of a site bound to a StateCache layer. The layers share one mask: it is checked, and
    which of the chunk's keys are real is read from it, once per graph."""
    b, mask = site.state, site.attn_mask
    read = [u for u in mask.users if u.target is S.key_validity] if mask is not None else []
    if read:  # an earlier layer already checked and read this mask
        valid = read[0]
    else:
        if mask is not None:
            ok = graph.call_function(torch.ops.linearize.cache_mask_is_causal, (mask, b.pos0))
            graph.call_function(torch._assert_async, (ok, "linearize: the attention mask given with a StateCache "
                                "is not causal attention over the cache with padding; decoding supports only that"))
        valid = graph.call_function(S.key_validity, (mask, b.pos0, site.q))
    return (valid, b.pos0, *b.buffers.values())


def _emit_exact(graph, site, params):
    return graph.call_function(R.softmax_attention, (site.q, site.k, site.v, site.attn_mask),
                               {"scale": site.scale, "is_causal": site.is_causal,
                                "softcap": site.softcap or 0.0, "sinks": site.sinks})


def _call(graph, site, full, step, args: tuple, kwargs: dict):
    """The full-sequence replacement `full(*args)`; with a StateCache, its `step` variant, which also takes which
    keys are real, the position offset and the layer's buffers, and writes the buffers back."""
    if site.state is not None:
        return graph.call_function(step, (*args, *_state_args(graph, site)), kwargs)
    _guard_mask(graph, site)
    return graph.call_function(full, args, kwargs)


def _emit_window(graph, site, params):
    return _call(graph, site, R.window_attention, S.window_attention_step, (site.q, site.k, site.v),
                 {"window": params["window"], "sinks": params["sinks"], "scale": site.scale, **_kernel_kwargs()})


def _gla_kwargs(params):
    return {**{k: params[k] for k in GLA_DEFAULTS}, **_kernel_kwargs()}


def _emit_gla(graph, site, params):
    p = site.provenance
    return _call(graph, site, R.gla_attention, S.gla_attention_step, (p.q_pre_rope, p.k_pre_rope, site.v),
                 _gla_kwargs(params))


def _emit_liger(graph, site, params):
    p = site.provenance
    mix = site.learned.get("mix", tuple(params["mix"]))  # a learned mix is a graph input (bind_learned)
    kwargs = {"window": params["window"], "sinks": params["sinks"], "mix": mix,
              "window_scale": site.scale, **_gla_kwargs(params)}
    return _call(graph, site, R.liger_attention, S.liger_attention_step,
                 (site.q, site.k, site.v, p.q_pre_rope, p.k_pre_rope), kwargs)


def _emit_lolcats(graph, site, params):
    p = site.provenance
    kwargs = {"window": params["window"], "window_scale": site.scale, "feature_map": params["feature_map"],
              "sinks": params["sinks"], "projection": site.learned.get("feature_map")}
    return _call(graph, site, R.lolcats_attention, S.lolcats_attention_step,
                 (site.q, site.k, site.v, p.q_pre_rope, p.k_pre_rope), kwargs)


# the last W post-RoPE keys and values, and their positions; then the first `sinks` ones (empty without sinks)
_RING = ("ring_k", "ring_v", "ring_pos", "sink_k", "sink_v", "sink_pos")
_GLA_CHOICES = {"gate": tuple(R.GATES), "feature_map": tuple(R.FEATURE_MAPS)}
# one normaliser over both parts: the feature products must be weights (>= 0), like exp(score)
_LOLCATS_CHOICES = {"feature_map": NONNEGATIVE_FEATURE_MAPS}

TARGETS = {
    "exact": Target("exact", {}, _check_exact, _emit_exact),
    "keep": Target("keep", {}, _check_keep, None),
    "swa": Target("swa", dict(WINDOW_DEFAULTS), _check_window, _emit_window, state_buffers=_RING),
    "gla": Target("gla", dict(GLA_DEFAULTS), _check_linear, _emit_gla, _GLA_CHOICES, state_buffers=("state",)),
    "liger": Target("liger", {**WINDOW_DEFAULTS, **GLA_DEFAULTS, "mix": [0.5, 0.5], "learn": []}, _check_liger,
                    _emit_liger, _GLA_CHOICES, state_buffers=(*_RING, "state")),
    "lolcats": Target("lolcats", {**WINDOW_DEFAULTS, "feature_map": "softmax", "learn": []}, _check_linear,
                      _emit_lolcats, _LOLCATS_CHOICES,
                      state_buffers=("ring_k", "ring_v", "ring_pos", "ring_fk", "state", "norm", *_RING[3:])),
}
STATEFUL = tuple(name for name, t in TARGETS.items() if t.state_buffers)
