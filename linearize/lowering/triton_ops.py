"""The generated Triton kernels as `linearize::triton_*` ops, the `triton` dispatch backend, and the rewrite hooks.

Ops (spec: a KernelSpec as JSON; one generated module per spec, cached on disk, imported on first launch):
    triton_attention(q, k, v, q_win?, k_win?, g?, initial_state?, spec, scale, window_scale) -> (o, final_state, lse)
    triton_attention_backward(grad_out, grad_final_state?, ..., lse, spec, scale, window_scale)
        -> (dq, dk, dv, dq_win, dk_win, dg, dh0)
    triton_decode(q, k, v, g?, state!, spec, scale) -> o          (state updated in place)

With a CUDA device they are `torch.library.triton_op`s whose bodies launch through `wrap_triton`, so AOTAutograd
and Inductor trace into the kernels (no graph break, fullgraph-safe, CUDA-graph-safe: no host syncs, outputs
allocated with torch.empty). Without CUDA the kernels run in Triton's CPU interpreter, which `wrap_triton` cannot
trace, so the same bodies are registered as opaque `torch.library.custom_op`s with fake kernels instead; that is
what CI exercises under torch.compile(fullgraph=True).

`gla(...)` / `liger(...)` / `gla_step(...)` are what linearize/rewrite/replacements.py calls when
`options={"kernels": ...}` selects Triton: they build the spec from the rule's parameters and the tensors, and
return None (after one warning per reason) when the generated kernels cannot take the site, so the caller keeps the
reference path.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch

KERNEL_CHOICES = ("auto", "triton", "reference")
DENOMINATOR_BLOCK = 16  # value columns of the launch that computes a normalised GLA's denominator (the smallest tile)
_warned: set = set()


def warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"linearize: generated Triton kernels not used, reference path instead: {reason}",
                      stacklevel=3)


def triton_available() -> bool:
    from ..kernels import triton as kt

    return kt.available()


def compiled_mode() -> bool:
    """True: real Triton on CUDA (triton_op). False: the CPU interpreter (custom_op)."""
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1" and triton_available()


def use_triton(kernels: str, device: torch.device) -> bool:
    """Whether a site with these tensors runs the generated kernels."""
    if kernels == "reference":
        return False
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"linearize: kernels must be one of {', '.join(KERNEL_CHOICES)}, got {kernels!r}")
    if not triton_available():
        if kernels == "triton":
            warn_once("triton is not installed (pip install 'linearize[triton]')")
        return False
    if kernels == "auto":
        return device.type == "cuda" and compiled_mode()
    if device.type == "cuda":
        return compiled_mode()
    if device.type == "cpu":
        return not compiled_mode()  # one process runs either compiled kernels or the interpreter
    warn_once(f"device {device.type} has no Triton backend")
    return False


# ----------------------------------------------------------------------------------------------- op bodies
def _spec(text: str):
    from ..kernels.triton.spec import KernelSpec

    return KernelSpec.from_json(text)


def _attention_body(q: Tensor, k: Tensor, v: Tensor, q_win: Optional[Tensor], k_win: Optional[Tensor],
                    g: Optional[Tensor], initial_state: Optional[Tensor], spec: str, scale: float,
                    window_scale: float) -> tuple[Tensor, Tensor, Tensor]:
    from ..kernels.triton import launch

    o, final, lse = launch.forward(_spec(spec), q, k, v, q_win, k_win, g, initial_state, scale, window_scale)
    return o, final.clone(), lse


def _attention_backward_body(grad_out: Tensor, grad_final_state: Optional[Tensor], q: Tensor, k: Tensor,
                             v: Tensor, q_win: Optional[Tensor], k_win: Optional[Tensor], g: Optional[Tensor],
                             initial_state: Optional[Tensor], lse: Tensor, spec: str, scale: float,
                             window_scale: float
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from ..kernels.triton import launch

    return tuple(launch.backward(_spec(spec), grad_out, grad_final_state, q, k, v, q_win, k_win, g,
                                 initial_state, lse, scale, window_scale))


def _decode_body(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], state: Tensor, spec: str,
                 scale: float) -> Tensor:
    from ..kernels.triton import launch

    return launch.decode(_spec(spec), q, k, v, g, state, scale)


# ------------------------------------------------------------------------------------------- fake kernels
def _attention_fake(q, k, v, q_win, k_win, g, initial_state, spec, scale, window_scale):
    s = _spec(spec)
    B, HQ, T, _ = q.shape
    o = q.new_empty(B, HQ, T, v.shape[-1])
    final = q.new_empty(B, k.shape[1], *((s.head_k, s.head_v) if s.linear else (0, 0)), dtype=torch.float32)
    lse = q.new_empty(B, HQ, T if s.has_window else 0, dtype=torch.float32)
    return o, final, lse


def _attention_backward_fake(grad_out, grad_final_state, q, k, v, q_win, k_win, g, initial_state, lse, spec,
                             scale, window_scale):
    s = _spec(spec)

    def empty():
        return q.new_empty(0)

    def like(x):  # the kernels write contiguous outputs whatever the inputs' strides
        return x.new_empty(x.shape)

    dq = like(q) if s.linear else empty()
    dk = like(k) if s.linear else empty()
    dq_win = like(q_win) if s.has_window else empty()
    dk_win = like(k_win) if s.has_window else empty()
    dg = like(g) if s.linear and s.gate_given else empty()
    dims = (s.head_k, s.head_v) if s.linear else (0, 0)
    dh0 = q.new_empty(q.shape[0], k.shape[1], *dims, dtype=torch.float32)
    return dq, dk, like(v), dq_win, dk_win, dg, dh0


def _decode_fake(q, k, v, g, state, spec, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


# ------------------------------------------------------------------------------------------- registration
def _register():
    lib_ns = "linearize"
    if compiled_mode():
        from torch.library import triton_op

        attention = triton_op(f"{lib_ns}::triton_attention", _attention_body, mutates_args=())
        attention_backward = triton_op(f"{lib_ns}::triton_attention_backward", _attention_backward_body,
                                       mutates_args=())
        decode = triton_op(f"{lib_ns}::triton_decode", _decode_body, mutates_args={"state"})
    else:
        from torch.library import custom_op

        attention = custom_op(f"{lib_ns}::triton_attention", _attention_body, mutates_args=())
        attention.register_fake(_attention_fake)
        attention_backward = custom_op(f"{lib_ns}::triton_attention_backward", _attention_backward_body,
                                       mutates_args=())
        attention_backward.register_fake(_attention_backward_fake)
        decode = custom_op(f"{lib_ns}::triton_decode", _decode_body, mutates_args={"state"})
        decode.register_fake(_decode_fake)
    attention.register_autograd(_attention_grad, setup_context=_attention_setup)
    return attention, attention_backward, decode


def _attention_setup(ctx, inputs, output):
    q, k, v, q_win, k_win, g, initial_state, ctx.spec, ctx.scale, ctx.window_scale = inputs
    ctx.has = (q_win is not None, k_win is not None, g is not None, initial_state is not None)
    ctx.save_for_backward(q, k, v, q_win, k_win, g, initial_state, output[2])


def _attention_grad(ctx, grad_out, grad_final_state, _grad_lse):
    q, k, v, q_win, k_win, g, initial_state, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    s = _spec(ctx.spec)
    if grad_final_state is not None and not s.linear:
        grad_final_state = None
    dq, dk, dv, dq_win, dk_win, dg, dh0 = torch.ops.linearize.triton_attention_backward(
        grad_out, grad_final_state, q, k, v, q_win, k_win, g, initial_state, lse, ctx.spec, ctx.scale,
        ctx.window_scale)
    has_qw, has_kw, has_g, has_h0 = ctx.has
    if not s.linear:  # window only: q, k are unused placeholders
        dq, dk = torch.zeros_like(q), torch.zeros_like(k)
    return (dq, dk, dv, dq_win if has_qw else None, dk_win if has_kw else None,
            dg if has_g and s.gate_given else None, dh0 if has_h0 else None, None, None, None)


attention, attention_backward, decode_op = _register()


# --------------------------------------------------------------------------------- the rewrite entry points
# rule gate name -> (spec gate kind, gate_fn) for gates the kernels compute from k themselves
_FUSED_GATES = {"logsigmoid": ("vector", "logsigmoid"), "mamba2": ("scalar", "neg_softplus"),
                "none": ("none", "logsigmoid")}
_FUSED_FEATURES = ("identity", "softmax", "elu+1", "relu")


def _fixed_decays(gate: str, hkv: int, decay: float, device) -> Optional[Tensor]:
    if gate == "retnet":
        from ..rewrite.gates import retnet_decays

        return retnet_decays(hkv).to(device)
    if gate == "fixed":
        return torch.full((hkv,), math.log(decay), dtype=torch.float32, device=device)
    return None


def linear_spec_fields(gate: str, gate_normalizer: float, feature_map: str, gate_lower_bound: float = 0.0
                       ) -> tuple[dict, bool]:
    """Spec fields of a linear branch from the rule's parameters, and whether the feature map and gate are fused
    into the kernels (False: they run as PyTorch ops before it, the kernels see identity features and a `given`
    gate; fixed decays stay `fixed`)."""
    fields = {"gate_normalizer": float(gate_normalizer)}
    fixed = gate in ("retnet", "fixed")
    pair = _FUSED_GATES.get(gate)
    if gate == "hgrn2" and gate_lower_bound <= 0:  # hgrn2 without a floor is the logsigmoid gate
        pair = ("vector", "logsigmoid")
    if feature_map in _FUSED_FEATURES and (pair is not None or fixed):
        fields.update(gate="fixed" if fixed else pair[0], gate_fn="logsigmoid" if fixed else pair[1],
                      feature_map=feature_map)
        return fields, True
    fields.update(gate="fixed" if fixed else "vector", gate_fn="logsigmoid" if fixed else "given",
                  feature_map="identity")
    return fields, False


def _linear_inputs(q_pre: Tensor, k_pre: Tensor, *, gate: str, gate_normalizer: float, feature_map: str,
                   gate_lower_bound: float = 0.0, decay: float = 0.99):
    """(spec fields, q, k, g) for the linear branch: fused feature map and gate where the kernels have them,
    else computed here in PyTorch and handed over (identity feature map, `given` gate)."""
    fields, fused = linear_spec_fields(gate, gate_normalizer, feature_map, gate_lower_bound)
    fixed = _fixed_decays(gate, k_pre.shape[1], decay, k_pre.device)
    if fused:
        return fields, q_pre, k_pre, fixed
    # Unfused: feature map and gate as PyTorch ops around the kernel (autograd handles their backward).
    from ..rewrite.gates import FEATURE_MAPS, GATES

    phi = FEATURE_MAPS[feature_map]
    qf, kf = phi(q_pre.float()).to(q_pre.dtype), phi(k_pre.float()).to(k_pre.dtype)
    if fixed is not None:
        return fields, qf, kf, fixed
    g = GATES[gate](k_pre.float(), normalizer=gate_normalizer, lower_bound=gate_lower_bound, decay=decay)
    if g.shape[-1] != kf.shape[-1]:
        g = g.repeat(1, 1, 1, kf.shape[-1] // g.shape[-1])
    return fields, qf, kf, g.contiguous()


def rule_specs(rewrite: str, params: dict, *, head_k: int, head_v: int, group: int, dtype: str = "bfloat16"):
    """The KernelSpecs a rule's rewrite would launch for these head dims (no tensors needed), or a reason string."""
    from ..kernels.triton.spec import KernelSpec, UnsupportedSpec

    shapes = dict(head_v=head_v, group=group, dtype=dtype)
    try:
        def window_spec():
            return KernelSpec(linear=False, window=int(params["window"]), sinks=int(params.get("sinks", 0)),
                              chunk=16, head_k=head_k, **shapes)

        if rewrite == "swa":
            specs = [window_spec()]
        elif rewrite in ("gla", "liger"):
            fields, fused = linear_spec_fields(params["gate"], params["gate_normalizer"], params["feature_map"],
                                               params.get("gate_lower_bound", 0.0))
            width = head_k * (2 if params["feature_map"] == "hedgehog" else 1)
            linear = dict(chunk=int(params["chunk_size"]), scale=float(params.get("scale", 1.0)), head_k=width,
                          **fields)
            if params.get("normalize"):  # separate kernels: window, GLA, GLA on the denominator block
                specs = [window_spec()] if rewrite == "liger" else []
                specs += [KernelSpec(**linear, **shapes),
                          KernelSpec(**linear, **{**shapes, "head_v": DENOMINATOR_BLOCK})]
            else:
                extra = {"window": int(params["window"]), "mix": tuple(float(x) for x in params["mix"]),
                         "sinks": int(params.get("sinks", 0))} if rewrite == "liger" else {}
                specs = [KernelSpec(**linear, **extra, **shapes)]
        elif rewrite == "lolcats":
            specs = [KernelSpec(window=int(params["window"]), mix_mode="shared", head_k=head_k, **shapes)]
        else:
            return f"rewrite {rewrite!r} has no generated kernel"
        for spec in specs:
            spec.check_shapes()
    except UnsupportedSpec as exc:
        return str(exc)
    return specs


def _build(q: Tensor, k: Tensor, v: Tensor, **fields):
    from ..kernels.triton import launch
    from ..kernels.triton.spec import KernelSpec, UnsupportedSpec, dtype_name

    try:
        if q.dtype != k.dtype or q.dtype != v.dtype:
            raise UnsupportedSpec(f"mixed dtypes {q.dtype}, {k.dtype}, {v.dtype}")
        spec = KernelSpec(head_k=q.shape[-1], head_v=v.shape[-1], group=q.shape[1] // max(k.shape[1], 1),
                          dtype=dtype_name(q.dtype), **fields)
        launch.validate(spec, q, k, v)
    except UnsupportedSpec as exc:
        warn_once(str(exc))
        return None
    return spec


def gla(q_pre: Tensor, k_pre: Tensor, v: Tensor, *, gate: str, gate_normalizer: float, feature_map: str,
        chunk_size: int, normalize: bool, scale: float = 1.0, gate_lower_bound: float = 0.0,
        decay: float = 0.99) -> Optional[Tensor]:
    """GLA site through the generated kernels, or None if they cannot take it. With `normalize` the output has one
    more value column, the denominator (the gated feature weights' sum), as the PyTorch path's has: a second launch
    on a value block of [1, 0, ..., 0] columns computes it."""
    fields, q, k, g = _linear_inputs(q_pre, k_pre, gate=gate, gate_normalizer=gate_normalizer,
                                     feature_map=feature_map, gate_lower_bound=gate_lower_bound, decay=decay)
    spec = _build(q, k, v, chunk=chunk_size, scale=float(scale), **fields)
    if spec is None:
        return None
    o, _, _ = attention(q, k, v, None, None, g, None, spec.to_json(), float(scale), 1.0)
    if normalize:
        ones = F.pad(torch.ones_like(v[..., :1]), (0, DENOMINATOR_BLOCK - 1))
        den_spec = _build(q, k, ones, chunk=chunk_size, scale=float(scale), **fields)
        if den_spec is None:
            return None
        den, _, _ = attention(q, k, ones, None, None, g, None, den_spec.to_json(), float(scale), 1.0)
        o = torch.cat([o, den[..., :1]], dim=-1)
    return o


def liger(q: Tensor, k: Tensor, v: Tensor, q_pre: Tensor, k_pre: Tensor, *, window: int, mix, window_scale: float,
          gate: str, gate_normalizer: float, feature_map: str, chunk_size: int, normalize: bool,
          scale: float = 1.0, gate_lower_bound: float = 0.0, decay: float = 0.99, sinks: int = 0
          ) -> Optional[Tensor]:
    """Liger site (mix[0] * window softmax + mix[1] * GLA) as one fused kernel, or None (with `normalize` too:
    the caller then runs the two branches as separate generated kernels)."""
    if normalize:
        warn_once("liger with normalize: true runs the window and GLA kernels separately (the fused kernel has no "
                  "denominator column)")
        return None
    fields, ql, kl, g = _linear_inputs(q_pre, k_pre, gate=gate, gate_normalizer=gate_normalizer,
                                       feature_map=feature_map, gate_lower_bound=gate_lower_bound, decay=decay)
    if q.shape != ql.shape or k.shape != kl.shape or q.dtype != ql.dtype:
        warn_once("window and linear branches have different shapes or dtypes")
        return None
    spec = _build(ql, kl, v, chunk=chunk_size, scale=float(scale), window=int(window), sinks=int(sinks),
                  mix=tuple(float(x) for x in mix), **fields)
    if spec is None:
        return None
    o, _, _ = attention(ql, kl, v, q, k, g, None, spec.to_json(), float(scale), float(window_scale))
    return o


def gla_step(qf: Tensor, kf: Tensor, vf: Tensor, g: Tensor, state: Tensor, scale: float
             ) -> Optional[tuple[Tensor, Tensor]]:
    """One decoding token of the linear branch through the generated decode kernel: features and log gate already
    applied (fp32), `state` [B, Hkv, K, V] fp32. Returns (o, new state) like kernels.gla.gla_step, or None."""
    if state.dtype != torch.float32:
        warn_once(f"the decode kernel keeps an fp32 state, this one is {state.dtype}")
        return None
    spec = _build(qf, kf, vf, gate="vector", gate_fn="given", feature_map="identity", chunk=16, scale=float(scale))
    if spec is None:
        return None
    new = state.clone(memory_format=torch.contiguous_format)  # the kernel updates it in place
    o = decode_op(qf, kf, vf, g.contiguous(), new, spec.to_json(), float(scale))
    return o, new


def swa(q: Tensor, k: Tensor, v: Tensor, *, window: int, scale: float, sinks: int = 0) -> Optional[Tensor]:
    """Sliding-window softmax attention (with `sinks` first keys) through the generated window kernel, or None."""
    spec = _build(q, k, v, linear=False, window=int(window), sinks=int(sinks), chunk=16)
    if spec is None:
        return None
    o, _, _ = attention(q, k, v, q, k, None, None, spec.to_json(), 1.0, float(scale))
    return o


# ------------------------------------------------------------------------ `triton` backend of the base ops
def _gla_spec(q, k, v, chunk_size, scale):
    return _build(q, k, v, gate="vector", gate_fn="given", feature_map="identity", chunk=int(chunk_size),
                  scale=float(scale))


def _dispatch_gla_fwd(q, k, v, g, initial_state, scale, chunk_size):
    spec = _gla_spec(q, k, v, chunk_size, scale)
    if spec is None:
        return dispatch.kernels_after("gla", "triton", q.device.type).forward(
            q, k, v, g, initial_state, scale, chunk_size)
    from ..kernels.triton import launch

    o, final, _ = launch.forward(spec, q, k, v, None, None, g.to(torch.float32), initial_state, scale, 1.0)
    return o, final.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def _dispatch_gla_bwd(do, dht, q, k, v, g, initial_state, scale, chunk_size):
    spec = _gla_spec(q, k, v, chunk_size, scale)
    if spec is None:
        return dispatch.kernels_after("gla", "triton", q.device.type).backward(
            do, dht, q, k, v, g, initial_state, scale, chunk_size)
    from ..kernels.triton import launch

    empty = q.new_empty(0)
    dq, dk, dv, _, _, dg, dh0 = launch.backward(spec, do, dht, q, k, v, None, None, g.to(torch.float32),
                                                initial_state, empty, scale, 1.0)
    if initial_state is not None:
        dh0 = dh0.to(initial_state.dtype)
    return dq, dk, dv, dg.to(g.dtype), dh0


def _window_spec(q, k, v, window_size, sink_tokens):
    return _build(q, k, v, linear=False, window=int(window_size), sinks=int(sink_tokens), chunk=16)


def _dispatch_window_fwd(q, k, v, scale, window_size, sink_tokens=0):
    spec = _window_spec(q, k, v, window_size, sink_tokens)
    if spec is None:
        return dispatch.kernels_after("window_attention", "triton", q.device.type).forward(q, k, v, scale,
                                                                                          window_size, sink_tokens)
    from ..kernels.triton import launch

    return launch.forward(spec, q, k, v, q, k, None, None, 1.0, scale)[0]


def _dispatch_window_bwd(do, q, k, v, scale, window_size, sink_tokens=0):
    spec = _window_spec(q, k, v, window_size, sink_tokens)
    if spec is None:
        return dispatch.kernels_after("window_attention", "triton", q.device.type).backward(
            do, q, k, v, scale, window_size, sink_tokens)
    from ..kernels.triton import launch

    _, _, lse = launch.forward(spec, q, k, v, q, k, None, None, 1.0, scale)
    _, _, dv, dq, dk, _, _ = launch.backward(spec, do, None, q, k, v, q, k, None, None, lse, 1.0, scale)
    return dq, dk, dv


def register_dispatch_backend() -> None:
    """`dispatch.set_preference(["triton"])` then runs linearize::gla / window_attention on the generated kernels
    (devices: cuda, and cpu through the interpreter)."""
    if not triton_available():
        return
    devices = ("cuda",) if compiled_mode() else ("cpu",)
    dispatch.register("gla", "triton", _dispatch_gla_fwd, _dispatch_gla_bwd, devices=devices)
    dispatch.register("window_attention", "triton", _dispatch_window_fwd, _dispatch_window_bwd, devices=devices)
