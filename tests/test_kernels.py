"""Kernel-level checks: the fast PyTorch kernels against the slow references in kernels/naive.py.

References run in fp64 through autograd; the kernels run in fp32 with their explicit backward.
Accuracy is measured as relative RMSE, rms(ref - out) / rms(ref).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from linearize.kernels import (attention_bwd, attention_fwd, chunk_gla_bwd, chunk_gla_fwd,
                               window_attention_bwd, window_attention_fwd)
from linearize.kernels.naive import naive_gla, naive_softmax_attention

TOL_FP32 = 1e-5


pytestmark = pytest.mark.usefixtures("single_thread")


def rel_rmse(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """rms(ref - out) / max(rms(ref), floor); floor keeps an all-zero reference meaningful."""
    err = (out.double() - ref.double()).pow(2).mean().sqrt()
    size = ref.double().pow(2).mean().sqrt().clamp_min(floor)
    return 0.0 if err == 0 else (err / size).item()


def assert_all_finite(named: dict[str, torch.Tensor]) -> None:
    for name, t in named.items():
        assert torch.isfinite(t).all(), f"{name} has NaN/Inf"


def reference_grads(fn, inputs, grad_outputs):
    """Run fn on fp64 copies of inputs and return (outputs, grads) via autograd."""
    leaves = [None if x is None else x.detach().double().requires_grad_() for x in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((o * go.double()).sum() for o, go in zip(outs, grad_outputs) if go is not None)
    grads = torch.autograd.grad(loss, [x for x in leaves if x is not None], allow_unused=True)
    return outs, grads


def random_gla_inputs(batch, hkv, groups, seq, dk, dv, with_state, gate_scale=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, hkv * groups, seq, dk, generator=gen)
    k = torch.randn(batch, hkv, seq, dk, generator=gen)
    v = torch.randn(batch, hkv, seq, dv, generator=gen)
    g = F.logsigmoid(gate_scale * torch.randn(batch, hkv, seq, dk, generator=gen))
    h0 = torch.randn(batch, hkv, dk, dv, generator=gen) if with_state else None
    return q, k, v, g, h0


# --------------------------------------------------------------------------------------- GLA
GLA_CASES = [
    # seq, chunk, groups, K, V, initial_state, grad through final state
    pytest.param(50, 16, 1, 8, 8, False, True, id="T50-C16-G1"),
    pytest.param(50, 32, 3, 8, 12, True, True, id="T50-C32-G3-KneV-h0"),
    pytest.param(10, 64, 3, 12, 8, True, False, id="T<C-G3-h0"),
    pytest.param(130, 64, 1, 16, 8, True, True, id="T130-C64-h0"),
    pytest.param(64, 32, 3, 8, 8, False, False, id="T=2C-G3-no-dht"),
    pytest.param(45, 16, 3, 6, 10, True, True, id="T45-C16-G3-h0"),
]


@pytest.mark.parametrize("seq,chunk,groups,dk,dv,with_state,with_dht", GLA_CASES)
def test_chunk_gla_matches_naive(seq, chunk, groups, dk, dv, with_state, with_dht):
    q, k, v, g, h0 = random_gla_inputs(2, 2, groups, seq, dk, dv, with_state)
    scale = dk ** -0.5
    o, final = chunk_gla_fwd(q, k, v, g, scale, h0, chunk)
    do = torch.randn_like(o)
    dht = torch.randn_like(final) if with_dht else None
    (ref_o, ref_final), ref_grads = reference_grads(
        lambda *xs: naive_gla(*xs[:4], scale, xs[4]), (q, k, v, g, h0), (do, dht))
    grads = chunk_gla_bwd(do, dht, q, k, v, g, scale, h0, chunk)

    assert o.dtype == q.dtype and final.dtype == torch.float32
    assert o.shape == (2, 2 * groups, seq, dv) and final.shape == (2, 2, dk, dv)
    errors = {"o": rel_rmse(o, ref_o), "final_state": rel_rmse(final, ref_final)}
    names = ["dq", "dk", "dv", "dg", "dh0"][: len(ref_grads)]
    errors |= {name: rel_rmse(gr, ref) for name, gr, ref in zip(names, grads, ref_grads)}
    assert max(errors.values()) <= TOL_FP32, errors


def test_chunk_gla_gate_gradient_is_not_trivially_small():
    """Guard for the dg check above: the gate gradient must carry real signal."""
    q, k, v, g, h0 = random_gla_inputs(1, 1, 1, 40, 8, 8, True)
    _, final = chunk_gla_fwd(q, k, v, g, 0.3, h0, 16)
    do = torch.randn(1, 1, 40, 8)
    dg = chunk_gla_bwd(do, torch.randn_like(final), q, k, v, g, 0.3, h0, 16)[3]
    dq = chunk_gla_bwd(do, None, q, k, v, g, 0.3, h0, 16)[0]
    assert dg.abs().mean() > 0.1 * dq.abs().mean()


@pytest.mark.parametrize("gates", ["zero", "huge_decay", "mixed"])
def test_chunk_gla_extreme_gates_stay_finite(gates):
    q, k, v, g, h0 = random_gla_inputs(1, 2, 2, 70, 8, 8, True, seed=1)
    if gates == "zero":
        g = torch.zeros_like(g)
    elif gates == "huge_decay":
        g = torch.full_like(g, -1e4)
    else:
        pick = torch.randint(0, 3, g.shape, generator=torch.Generator().manual_seed(2))
        g = torch.where(pick == 0, torch.zeros_like(g), torch.where(pick == 1, -1e4, g))
    o, final = chunk_gla_fwd(q, k, v, g, 0.3, h0, 32)
    do, dht = torch.randn_like(o), torch.randn_like(final)
    grads = chunk_gla_bwd(do, dht, q, k, v, g, 0.3, h0, 32)
    assert_all_finite(dict(zip(["o", "final", "dq", "dk", "dv", "dg", "dh0"], (o, final, *grads))))

    (ref_o, ref_final), ref_grads = reference_grads(
        lambda *xs: naive_gla(*xs[:4], 0.3, xs[4]), (q, k, v, g, h0), (do, dht))
    # With every gate at -1e4 the true dg is exactly 0 while q*dq - k*dk cancels only to fp32
    # rounding, so errors are measured against unit scale (inputs are unit-variance).
    # "mixed" needs the fp64 gate cumsum: in fp32 it lands near 1e-3 here.
    for out, ref in zip((o, final, *grads), (ref_o, ref_final, *ref_grads)):
        assert rel_rmse(out, ref, floor=1.0) <= TOL_FP32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunk_gla_low_precision_noncontiguous(dtype):
    """Half inputs in a [B, T, H, D] memory layout: compute in fp32, return the input dtype."""
    def layout(x):
        return x.transpose(1, 2).contiguous().transpose(1, 2).to(dtype)

    q, k, v, g = (layout(x) for x in random_gla_inputs(1, 2, 2, 40, 8, 8, False)[:4])
    assert not q.is_contiguous()
    o, final = chunk_gla_fwd(q, k, v, g, 0.3, None, 16)
    do = torch.randn_like(o)
    grads = chunk_gla_bwd(do, None, q, k, v, g, 0.3, None, 16)
    assert o.dtype == dtype and final.dtype == torch.float32
    assert [gr.dtype for gr in grads[:4]] == [dtype] * 4
    (ref_o, _), ref_grads = reference_grads(
        lambda *xs: naive_gla(*xs, 0.3), (q, k, v, g), (do, None))
    tol = 2e-2 if dtype == torch.bfloat16 else 3e-3  # rounding of the half-precision results
    for out, ref in zip((o, *grads[:4]), (ref_o, *ref_grads)):
        assert rel_rmse(out, ref) <= tol


# --------------------------------------------------------------------------- sliding window
WINDOW_CASES = [
    # seq, window, groups, value dim
    pytest.param(37, 8, 1, 8, id="T37-W8"),
    pytest.param(37, 1, 3, 6, id="W1-G3"),
    pytest.param(20, 20, 2, 8, id="W=T-G2"),
    pytest.param(10, 64, 1, 8, id="W>T"),
    pytest.param(64, 16, 3, 5, id="T=4W-G3"),
    pytest.param(33, 5, 2, 12, id="T33-W5-G2"),
]


@pytest.mark.parametrize("seq,window,groups,dv", WINDOW_CASES)
def test_window_attention_matches_naive(seq, window, groups, dv):
    gen = torch.Generator().manual_seed(seq + window)
    q = torch.randn(2, 2 * groups, seq, 8, generator=gen)
    k = torch.randn(2, 2, seq, 8, generator=gen)
    v = torch.randn(2, 2, seq, dv, generator=gen)
    o, lse = window_attention_fwd(q, k, v, 0.4, window)
    do = torch.randn_like(o)
    (ref_o,), ref_grads = reference_grads(
        lambda *xs: naive_softmax_attention(*xs, scale=0.4, window=window), (q, k, v), (do,))
    assert o.dtype == q.dtype and lse.shape == (2, 2 * groups, seq)
    assert rel_rmse(o, ref_o) <= TOL_FP32
    grads = window_attention_bwd(do, q, k, v, 0.4, window)
    for gr, ref in zip(grads, ref_grads):
        assert rel_rmse(gr, ref) <= TOL_FP32

    # lse from the forward is the row log-sum-exp; reusing it gives the same backward.
    rows, cols = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    hidden = (cols > rows) | (cols <= rows - window)
    scores = 0.4 * q.double() @ k.double().repeat_interleave(groups, 1).transpose(-1, -2)
    assert rel_rmse(lse, scores.masked_fill(hidden, float("-inf")).logsumexp(-1)) <= TOL_FP32
    for with_lse, without in zip(window_attention_bwd(do, q, k, v, 0.4, window, lse), grads):
        assert rel_rmse(with_lse, without) <= TOL_FP32


@pytest.mark.parametrize("seq,window,groups,dv,sinks", [(37, 8, 1, 8, 4), (37, 1, 3, 6, 1), (64, 16, 3, 5, 2),
                                                        (33, 5, 2, 12, 40), (10, 64, 1, 8, 4)])
def test_window_attention_with_sinks_matches_naive(seq, window, groups, dv, sinks):
    """Attention sinks: the first `sinks` keys stay visible to every query, forward and gradients."""
    gen = torch.Generator().manual_seed(seq + window + sinks)
    q = torch.randn(2, 2 * groups, seq, 8, generator=gen)
    k = torch.randn(2, 2, seq, 8, generator=gen)
    v = torch.randn(2, 2, seq, dv, generator=gen)
    o, lse = window_attention_fwd(q, k, v, 0.4, window, sinks)
    do = torch.randn_like(o)
    (ref_o,), ref_grads = reference_grads(
        lambda *xs: naive_softmax_attention(*xs, scale=0.4, window=window, sink_tokens=sinks), (q, k, v), (do,))
    assert rel_rmse(o, ref_o) <= TOL_FP32
    for gr, ref in zip(window_attention_bwd(do, q, k, v, 0.4, window, sink_tokens=sinks), ref_grads):
        assert rel_rmse(gr, ref) <= TOL_FP32
    for with_lse, without in zip(window_attention_bwd(do, q, k, v, 0.4, window, lse, sinks),
                                 window_attention_bwd(do, q, k, v, 0.4, window, None, sinks)):
        assert rel_rmse(with_lse, without) <= TOL_FP32
    if seq > window:  # the sinks change the result
        assert rel_rmse(o, window_attention_fwd(q, k, v, 0.4, window)[0]) > 1e-3


def test_window_attention_is_not_full_causal():
    """The window must actually cut keys off (guards against a kernel that ignores it)."""
    q, k, v = (torch.randn(1, 1, 24, 8) for _ in range(3))
    o, _ = window_attention_fwd(q, k, v, 0.4, 4)
    full = naive_softmax_attention(q, k, v, scale=0.4, is_causal=True)
    assert rel_rmse(o, full) > 1e-2
    assert rel_rmse(o[..., :4, :], full[..., :4, :]) <= TOL_FP32


# ------------------------------------------------------------------------ exact attention
def _attention_case(name):
    gen = torch.Generator().manual_seed(len(name))
    groups, q_len, kv_len, mask, causal = {
        "plain": (1, 7, 7, None, False),
        "causal": (1, 7, 7, None, True),
        "causal-L<S": (2, 4, 9, None, True),
        "causal-L>S": (2, 9, 4, None, True),
        "bool-2d-gqa3": (3, 5, 9, "bool", False),
        "bool-per-head": (2, 6, 6, "bool-head", False),
        "float-b1ls": (2, 9, 5, "float", False),
        "bool+causal": (1, 6, 6, "bool", True),
        "dead-rows-bool": (1, 6, 6, "dead-bool", False),
        "dead-rows-float": (2, 6, 8, "dead-float", False),
    }[name]
    q = torch.randn(2, 2 * groups, q_len, 8, generator=gen)
    k = torch.randn(2, 2, kv_len, 8, generator=gen)
    v = torch.randn(2, 2, kv_len, 6, generator=gen)
    m = None
    if mask == "bool":
        m = torch.rand(q_len, kv_len, generator=gen) > 0.3
        m[:, 0] = True
    elif mask == "bool-head":
        m = torch.rand(2 * groups, q_len, kv_len, generator=gen) > 0.5
    elif mask == "float":
        m = torch.randn(2, 1, q_len, kv_len, generator=gen)
    elif mask == "dead-bool":
        m = torch.rand(q_len, kv_len, generator=gen) > 0.3
        m[2] = False
    elif mask == "dead-float":
        m = torch.randn(1, 2 * groups, q_len, kv_len, generator=gen)
        m[0, 1, 3] = float("-inf")
    return q, k, v, m, causal


def _sdpa_reference(q, k, v, mask, causal):
    """SDPA in fp64; SDPA refuses mask + is_causal on some paths, so fold causal into the mask."""
    if mask is not None and causal:
        mask = mask & torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        causal = False
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=0.35,
                                          enable_gqa=True)


ATTENTION_CASES = ["plain", "causal", "causal-L<S", "causal-L>S", "bool-2d-gqa3", "bool-per-head",
                   "float-b1ls", "bool+causal", "dead-rows-bool", "dead-rows-float"]


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_matches_sdpa(case):
    q, k, v, mask, causal = _attention_case(case)
    o, lse = attention_fwd(q, k, v, mask, 0.35, causal)
    do = torch.randn_like(o)
    (ref_o,), ref_grads = reference_grads(
        lambda *xs: _sdpa_reference(*xs, mask, causal), (q, k, v), (do,))
    assert (o.double() - ref_o).abs().max() <= 1e-5
    assert rel_rmse(o, ref_o) <= 1e-6
    *grads, _ = attention_bwd(do, q, k, v, mask, 0.35, causal)
    for gr, ref in zip(grads, ref_grads):
        assert torch.isfinite(gr).all()
        assert rel_rmse(gr, ref) <= TOL_FP32
    if case.startswith("dead-rows"):
        dead = torch.isneginf(lse)
        assert dead.any() and (o.masked_select(dead[..., None]) == 0).all()


@pytest.mark.parametrize("case", ATTENTION_CASES)
@pytest.mark.parametrize("sinks", [False, True])
def test_attention_in_query_blocks_equals_one_block(case, sinks, monkeypatch):
    """Long inputs run in blocks of query rows (bounded memory at 16k tokens): each block must see its own rows of
    the mask, the causal diagonal and per-row sinks."""
    from linearize.kernels import softmax
    q, k, v, mask, causal = _attention_case(case)
    sink = torch.randn(1, q.shape[1], q.shape[2], 1) if sinks else None
    whole = attention_fwd(q, k, v, mask, 0.35, causal, sinks=sink)
    monkeypatch.setattr(softmax, "SCORE_BLOCK_ELEMENTS", q.shape[0] * q.shape[1] * k.shape[2] * 2)  # 2 rows a block
    blocks = attention_fwd(q, k, v, mask, 0.35, causal, sinks=sink)
    assert q.shape[2] > 2
    for got, want in zip(blocks, whole):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_and_window_keep_input_dtype(dtype):
    q, k, v = (torch.randn(1, 5, 2, 8).transpose(1, 2).to(dtype) for _ in range(3))
    o, lse = attention_fwd(q, k, v, None, 0.35, True)
    assert o.dtype == dtype and lse.dtype == torch.float32
    ref = naive_softmax_attention(q.float(), k.float(), v.float(), scale=0.35, is_causal=True)
    assert rel_rmse(o, ref) <= 1e-2
    ow, _ = window_attention_fwd(q, k, v, 0.35, 5)
    assert ow.dtype == dtype and rel_rmse(ow, ref) <= 1e-2
    *grads, dsinks = attention_bwd(torch.ones_like(o), q, k, v, None, 0.35, True)
    assert [gr.dtype for gr in grads] == [dtype] * 3 and dsinks is None


# ------------------------------------------------------------------------- linear memory
class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def _largest_intermediate(run, seq: int) -> int:
    with _LargestTensor() as probe:
        run(seq)
    return probe.numel


def _gla_fwd_bwd(seq):
    q, k, v, g, _ = random_gla_inputs(1, 1, 1, seq, 16, 16, False)
    o, final = chunk_gla_fwd(q, k, v, g, 0.25, None, 64)
    chunk_gla_bwd(o, final, q, k, v, g, 0.25, None, 64)


def _window_fwd_bwd(seq):
    q, k, v = (torch.randn(1, 1, seq, 16) for _ in range(3))
    o, lse = window_attention_fwd(q, k, v, 0.25, 64)
    window_attention_bwd(o, q, k, v, 0.25, 64, lse)


def _exact_fwd_bwd(seq):
    q, k, v = (torch.randn(1, 1, seq, 16) for _ in range(3))
    o, _ = attention_fwd(q, k, v, None, 0.25, True)
    attention_bwd(o, q, k, v, None, 0.25, True)


@pytest.mark.parametrize("run,linear", [(_gla_fwd_bwd, True), (_window_fwd_bwd, True),
                                        (_exact_fwd_bwd, False)],
                         ids=["gla", "window", "exact-attention-control"])
def test_largest_intermediate_grows_linearly(run, linear):
    """Doubling T at most doubles the biggest tensor (the exact kernel is the positive control)."""
    small, large = _largest_intermediate(run, 1024), _largest_intermediate(run, 2048)
    growth = large / small
    if linear:
        assert growth <= 2.05 and large < 2048 * 2048 // 4, (small, large)
    else:
        assert growth >= 3.9, (small, large)
