"""Where kernel implementations are chosen for the linearize ops.

The custom ops in ops.py call `kernels(op, device_type)` at run time, so a faster backend
(e.g. Triton on CUDA) only has to `register(...)` its pair and be put first with
`set_preference`; graphs that already contain the ops need no change.

Kernel signatures follow the op schemas, with the backward taking the output grads first:
    attention:        fwd(q, k, v, attn_mask, scale, is_causal, softcap, sinks) -> o
                      bwd(do, q, k, v, attn_mask, scale, is_causal, softcap, sinks)
                          -> (dq, dk, dv, dsinks)   (dsinks None without sinks)
    window_attention: fwd(q, k, v, scale, window, sink_tokens) -> o
                      bwd(do, q, k, v, scale, window, sink_tokens) -> (dq, dk, dv)
    gla:              fwd(q, k, v, g, initial_state, scale, chunk_size) -> (o, final_state)
                      bwd(do, dht, q, k, v, g, initial_state, scale, chunk_size)
                          -> (dq, dk, dv, dg, dh0)      (dht may be None; dh0 always a tensor)
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..kernels import gla, softmax, window

OPS = ("attention", "window_attention", "gla")


@dataclass(frozen=True)
class KernelPair:
    forward: Callable
    backward: Callable
    devices: tuple[str, ...] | None  # device types served; None = any


_registry: dict[tuple[str, str], KernelPair] = {}
_preference: list[str] = ["reference"]


def register(op: str, backend: str, forward: Callable, backward: Callable,
             devices: Iterable[str] | None = None) -> None:
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}; expected one of {OPS}")
    served = None if devices is None else tuple(devices)
    _registry[(op, backend)] = KernelPair(forward, backward, served)


def set_preference(backends: Iterable[str]) -> list[str]:
    """Order in which backends are tried ("reference" always comes last). Returns the old order."""
    global _preference
    old = list(_preference)
    _preference = [b for b in backends if b != "reference"] + ["reference"]
    return old


def preference() -> list[str]:
    return list(_preference)


def backends(op: str) -> list[str]:
    return [backend for (name, backend) in _registry if name == op]


def kernels(op: str, device_type: str) -> KernelPair:
    """First preferred backend registered for `op` that serves `device_type`."""
    for backend in _preference:
        pair = _registry.get((op, backend))
        if pair is not None and (pair.devices is None or device_type in pair.devices):
            return pair
    raise LookupError(f"no kernel registered for {op!r} on {device_type!r}")


def kernels_after(op: str, backend: str, device_type: str) -> KernelPair:
    """The backend that `kernels` would pick if `backend` were not there (a backend's fallback for shapes it
    cannot take)."""
    order = _preference[_preference.index(backend) + 1:] if backend in _preference else _preference
    for name in order:
        pair = _registry.get((op, name))
        if pair is not None and (pair.devices is None or device_type in pair.devices):
            return pair
    raise LookupError(f"no kernel after {backend!r} for {op!r} on {device_type!r}")


register(
    "attention", "reference",
    forward=lambda q, k, v, attn_mask, scale, is_causal, softcap, sinks:
        softmax.attention_fwd(q, k, v, attn_mask, scale, is_causal, softcap, sinks)[0],
    backward=softmax.attention_bwd,
)
register(
    "window_attention", "reference",
    forward=lambda q, k, v, scale, window_size, sink_tokens=0:
        window.window_attention_fwd(q, k, v, scale, window_size, sink_tokens)[0],
    backward=lambda do, q, k, v, scale, window_size, sink_tokens=0:
        window.window_attention_bwd(do, q, k, v, scale, window_size, sink_tokens=sink_tokens),
)
register(
    "gla", "reference",
    forward=lambda q, k, v, g, initial_state, scale, chunk_size:
        gla.chunk_gla_fwd(q, k, v, g, scale, initial_state, chunk_size),
    backward=lambda do, dht, q, k, v, g, initial_state, scale, chunk_size:
        gla.chunk_gla_bwd(do, dht, q, k, v, g, scale, initial_state, chunk_size),
)

# Generated Triton kernels (linearize/kernels/triton/, ops in triton_ops.py): registered as the "triton" backend,
# used where `set_preference(["triton"])` puts it first.
from . import triton_ops  # noqa: E402

triton_ops.register_dispatch_backend()
