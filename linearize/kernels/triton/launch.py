"""Python launchers of the generated kernels: allocate outputs, pick grids, launch through `wrap_triton`.

These functions are the bodies of the `linearize::triton_*` ops (lowering/triton_ops.py). They only use
torch.empty/zeros and kernel launches, so torch.library.triton_op can trace them (Inductor then sees the kernels).

Shapes: q, q_win [B, Hq, T, K]; k, k_win [B, Hkv, T, K]; v [B, Hkv, T, V]; Hq = G * Hkv.
Gate tensor g: vector/given [B, Hkv, T, K], scalar/given [B, Hkv, T], fixed [Hkv] (log decay); else None.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .spec import KernelSpec, UnsupportedSpec, dtype_name

SUB = 16


def _wrap(kernel):
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def interpreting(device: torch.device) -> bool:
    return device.type == "cpu"


def _module(spec: KernelSpec, device: torch.device):
    from . import cache

    return cache.load(spec, interpret=interpreting(device))


def _block_v(spec: KernelSpec, device: torch.device) -> int:
    if interpreting(device):
        return spec.head_v  # fewer, larger programs: the interpreter pays per program
    return min(spec.head_v, 64)


def validate(spec: KernelSpec, q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raise UnsupportedSpec when these tensors do not fit the spec (the caller falls back)."""
    spec.check_shapes()
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise UnsupportedSpec("expected [B, H, T, D] tensors")
    if q.shape[-1] != spec.head_k or k.shape[-1] != spec.head_k or v.shape[-1] != spec.head_v:
        raise UnsupportedSpec("head dims differ from the spec")
    if q.shape[1] != k.shape[1] * spec.group or v.shape[1] != k.shape[1]:
        raise UnsupportedSpec("head counts do not match the spec's GQA group")
    if dtype_name(q.dtype) != spec.dtype:
        raise UnsupportedSpec(f"dtype {q.dtype} differs from the spec's {spec.dtype}")


def _c(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.contiguous()


def _launch_dims(spec: KernelSpec, q: Tensor, k: Tensor):
    """(B, Hq, T, Hkv, K, V, chunk, number of chunks, generated module, value block) shared by forward and backward."""
    B, HQ, T, _ = q.shape
    HK, HV, C = spec.head_k, spec.head_v, spec.chunk
    return B, HQ, T, k.shape[1], HK, HV, C, (T + C - 1) // C, _module(spec, q.device), _block_v(spec, q.device)


def forward(spec: KernelSpec, q: Tensor, k: Tensor, v: Tensor, q_win: Tensor | None, k_win: Tensor | None,
            g: Tensor | None, initial_state: Tensor | None, scale: float, window_scale: float
            ) -> tuple[Tensor, Tensor, Tensor]:
    """(o [B, Hq, T, V] in q.dtype, final state [B, Hkv, K, V] fp32, window lse [B, Hq, T] fp32, log2 units)."""
    q, k, v, q_win, k_win, g, initial_state = map(_c, (q, k, v, q_win, k_win, g, initial_state))
    B, HQ, T, HKV, HK, HV, C, N, mod, BV = _launch_dims(spec, q, k)
    o = torch.empty(B, HQ, T, HV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, HQ, T if spec.has_window else 0, dtype=torch.float32, device=q.device)
    if spec.linear:
        bbuf = torch.empty(B, HKV, N * C, spec.gate_channels, dtype=torch.float32, device=q.device)
        hbuf = torch.empty(B, HKV, N + 1, HK, HV, dtype=torch.float32, device=q.device)
        _wrap(mod.states_fwd)[(HV // BV, B * HKV)](
            k, v, g if g is not None else k, initial_state if initial_state is not None else k, bbuf, hbuf,
            T, N, HKV, HAS_H0=initial_state is not None, BV=BV)
        final = hbuf[:, :, N]
    else:
        bbuf = hbuf = q
        final = torch.empty(B, HKV, 0, 0, dtype=torch.float32, device=q.device)
    _wrap(mod.chunk_fwd)[(N, B * HQ, HV // BV)](
        q, k, v, q_win if q_win is not None else q, k_win if k_win is not None else k, bbuf, hbuf, o,
        lse if spec.has_window else o, T, N, HQ, HKV, float(scale), float(window_scale), BV=BV)
    return o, final.contiguous() if spec.linear else final, lse


def backward(spec: KernelSpec, do: Tensor, dht: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
             q_win: Tensor | None, k_win: Tensor | None, g: Tensor | None, initial_state: Tensor | None,
             lse: Tensor, scale: float, window_scale: float):
    """(dq, dk, dv, dq_win, dk_win, dg, dh0); dq_win/dk_win empty without a window, dg empty unless the gate is
    a given tensor, dh0 [B, Hkv, K, V] fp32 (empty without a linear branch)."""
    do, dht, q, k, v, q_win, k_win, g, initial_state, lse = map(
        _c, (do, dht, q, k, v, q_win, k_win, g, initial_state, lse))
    B, HQ, T, HKV, HK, HV, C, N, mod, BV = _launch_dims(spec, q, k)
    dev = q.device
    def empty():  # a fresh placeholder each time: op outputs may not alias each other
        return torch.empty(0, dtype=q.dtype, device=dev)

    dq = torch.empty_like(q) if spec.linear else empty()
    dk = torch.empty_like(k) if spec.linear else empty()
    dv = torch.empty_like(v)
    dg = torch.empty_like(g) if spec.linear and spec.gate_given else empty()
    dh0 = torch.empty(B, HKV, HK if spec.linear else 0, HV if spec.linear else 0, dtype=torch.float32,
                      device=dev)
    mix_l = spec.mix[1] if spec.has_window and spec.linear else 1.0  # the window's weight is in the template
    if spec.linear:
        bbuf = torch.empty(B, HKV, N * C, spec.gate_channels, dtype=torch.float32, device=dev)
        hbuf = torch.empty(B, HKV, N + 1, HK, HV, dtype=torch.float32, device=dev)
        dhbuf = torch.empty(B, HKV, N, HK, HV, dtype=torch.float32, device=dev)
        _wrap(mod.states_fwd)[(HV // BV, B * HKV)](
            k, v, g if g is not None else k, initial_state if initial_state is not None else k, bbuf, hbuf,
            T, N, HKV, HAS_H0=initial_state is not None, BV=BV)
        dscale = float(mix_l) * float(scale)
        _wrap(mod.states_bwd)[(HV // BV, B * HKV)](
            q, do, bbuf, dht if dht is not None else do, dhbuf, dh0, T, N, HQ, HKV, dscale,
            HAS_DHT=dht is not None, BV=BV)
        _wrap(mod.chunk_bwd)[(N, B * HKV)](
            q, k, v, g if g is not None else k, do, bbuf, hbuf, dhbuf, dq, dk, dv, dg if dg.numel() else dv,
            T, N, HQ, HKV, dscale)
    if spec.has_window:
        dq_win = torch.empty_like(q_win)
        dk_win = torch.empty_like(k_win)
        delta = torch.empty(B, HQ, T, dtype=torch.float32, device=dev)
        nb = (T + SUB - 1) // SUB
        _wrap(mod.window_bwd_dq)[(nb, B * HQ)](
            q_win, k_win, v, do, lse, dq_win, delta, T, HQ, HKV, float(window_scale))
        _wrap(mod.window_bwd_dkv)[(nb, B * HKV)](
            q_win, k_win, v, do, lse, delta, dk_win, dv, T, HQ, HKV, float(window_scale), ACC_DV=spec.linear)
    else:
        dq_win, dk_win = empty(), empty()
    return dq, dk, dv, dq_win, dk_win, dg, dh0


def decode(spec: KernelSpec, q: Tensor, k: Tensor, v: Tensor, g: Tensor | None, state: Tensor, scale: float
           ) -> Tensor:
    """One token (T == 1) of the linear branch; `state` [B, Hkv, K, V] fp32 is updated in place."""
    if not spec.linear:
        raise UnsupportedSpec("decode needs a linear branch")
    if not state.is_contiguous() or state.dtype != torch.float32:
        raise UnsupportedSpec("decode needs a contiguous fp32 state")
    q, k, v, g = map(_c, (q, k, v, g))
    B, HQ, T, _ = q.shape
    if T != 1:
        raise UnsupportedSpec("decode takes one token")
    HKV = k.shape[1]
    mod = _module(spec, q.device)
    o = torch.empty(B, HQ, 1, spec.head_v, dtype=q.dtype, device=q.device)
    _wrap(mod.decode)[(B * HKV,)](q, k, v, g if g is not None else k, state, o, HQ, HKV, float(scale))
    return o
