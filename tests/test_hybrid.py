"""`linearize::hybrid_attention` (LoLCATs window + linear, one shared normaliser): kernel vs the quadratic reference,
explicit backward vs autograd through the reference, opcheck, gradcheck, tracing."""
from __future__ import annotations

import pytest
import torch

import linearize.lowering  # noqa: F401  (registers the ops)
from linearize.kernels.hybrid import hybrid_attention_bwd, hybrid_attention_fwd
from linearize.kernels.naive import naive_hybrid_attention, naive_softmax_attention

from conftest import rel_rmse

ops = torch.ops.linearize


pytestmark = pytest.mark.usefixtures("single_thread")


def _inputs(hq, hkv, seq, d, dv, f, dtype=torch.float32, seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, feature=False):
        x = torch.randn(*shape, generator=gen, dtype=dtype)
        x = torch.softmax(x, dim=-1) if feature else x
        return x.requires_grad_(requires_grad)

    return (rnd(2, hq, seq, d), rnd(2, hkv, seq, d), rnd(2, hkv, seq, dv), rnd(2, hq, seq, f, feature=True),
            rnd(2, hkv, seq, f, feature=True))


def test_schema():
    assert str(ops.hybrid_attention.default._schema) == (
        "linearize::hybrid_attention(Tensor q, Tensor k, Tensor v, Tensor fq, Tensor fk, float scale, "
        "int window, int sinks=0) -> Tensor")


@pytest.mark.parametrize("hq,hkv,seq,window", [
    pytest.param(4, 2, 37, 8, id="GQA2-T37-W8-ragged"),
    pytest.param(6, 2, 70, 16, id="GQA3-T70-W16-ragged"),
    pytest.param(2, 2, 64, 16, id="MHA-T64-W16-whole-blocks"),
    pytest.param(3, 1, 50, 7, id="GQA3-W7-odd-window"),
    pytest.param(2, 1, 9, 64, id="window-longer-than-sequence"),
    pytest.param(2, 2, 20, 1, id="window-1"),
])
@pytest.mark.parametrize("sinks", [0, 3])
def test_kernel_matches_reference_fp32_including_gradients(hq, hkv, seq, window, sinks):
    q, k, v, fq, fk = inputs = _inputs(hq, hkv, seq, 16, 12, 24)
    ref = naive_hybrid_attention(q, k, v, fq, fk, 0.3, window, sinks)
    out = hybrid_attention_fwd(q, k, v, fq, fk, 0.3, window, sinks)
    assert out.dtype == torch.float32
    assert rel_rmse(ref, out) <= 1e-5
    do = torch.randn_like(ref)
    want = torch.autograd.grad(ref, inputs, do)
    got = hybrid_attention_bwd(do, *inputs, 0.3, window, sinks)
    for name, a, b in zip(("dq", "dk", "dv", "dfq", "dfk"), got, want):
        assert a.shape == b.shape, name
        if b.abs().max() == 0:  # e.g. no older keys when the window covers the sequence
            assert a.abs().max() <= 1e-6, name
        else:
            assert rel_rmse(b, a) <= 1e-5, name


def test_op_is_window_softmax_while_nothing_is_older():
    """With the window covering the whole sequence there are no older keys: plain causal softmax attention."""
    q, k, v, fq, fk = _inputs(4, 2, 12, 8, 8, 8, requires_grad=False)
    out = ops.hybrid_attention(q, k, v, fq, fk, 0.35, 12)
    ref = naive_softmax_attention(q, k, v, scale=0.35, is_causal=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_older_keys_use_the_feature_product():
    """Window 1: each query sees itself by softmax (weight exp(0) = 1) and every earlier key by fq . fk."""
    q, k, v, fq, fk = _inputs(1, 1, 6, 4, 3, 5, requires_grad=False)
    out = ops.hybrid_attention(q, k, v, fq, fk, 0.5, 1)
    i = 4
    weights = torch.cat([(fq[:, 0, i, None] * fk[:, 0, :i]).sum(-1), torch.ones(2, 1)], dim=-1)  # [B, i+1]
    want = (weights[..., None] * v[:, 0, : i + 1]).sum(1) / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(out[:, 0, i], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sinks", [0, 2])
def test_gradcheck_fp64(sinks):
    inputs = _inputs(4, 2, 11, 3, 2, 3, dtype=torch.float64, seed=3)
    assert torch.autograd.gradcheck(lambda *x: ops.hybrid_attention(*x, 0.7, 4, sinks), inputs)


def test_sinks_without_linear_weight_are_window_attention_with_sinks():
    """Zero feature products leave only exact scores: the window plus the sink keys, i.e. window attention with
    sinks (an independent reference), and the sinks change the result."""
    from linearize.kernels.window import window_attention_fwd

    q, k, v, fq, fk = _inputs(4, 2, 40, 8, 8, 8, requires_grad=False)
    out = ops.hybrid_attention(q, k, v, torch.zeros_like(fq), fk, 0.35, 8, 3)
    ref, _ = window_attention_fwd(q, k, v, 0.35, 8, 3)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert rel_rmse(out, ops.hybrid_attention(q, k, v, torch.zeros_like(fq), fk, 0.35, 8)) > 1e-2


@pytest.mark.parametrize("case", ["forward", "backward"])
def test_opcheck(case):
    q, k, v, fq, fk = _inputs(4, 2, 19, 8, 4, 6)
    if case == "forward":
        torch.library.opcheck(ops.hybrid_attention.default, (q, k, v, fq, fk, 0.5, 8))
    else:
        detached = [x.detach() for x in (q, k, v, fq, fk)]
        torch.library.opcheck(ops.hybrid_attention_backward.default,
                              (torch.randn(2, 4, 19, 4), *detached, 0.5, 8))


def test_compiles_and_differentiates_through_aot_autograd():
    from torch._dynamo.backends.common import aot_autograd
    from functorch.compile import make_boxed_func

    q, k, v, fq, fk = _inputs(4, 2, 21, 8, 4, 6)

    def f(q, k, v, fq, fk):
        return ops.hybrid_attention(q, k, v, fq, fk, 0.5, 8).square().sum()

    backend = aot_autograd(fw_compiler=lambda gm, _: make_boxed_func(gm.forward))
    got = torch.autograd.grad(torch.compile(f, backend=backend, fullgraph=True)(q, k, v, fq, fk), (q, k, v, fq, fk))
    want = torch.autograd.grad(f(q, k, v, fq, fk), (q, k, v, fq, fk))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
