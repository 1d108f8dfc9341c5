"""The torch.ops.linearize.* custom ops: schemas, gradcheck, opcheck, tracing, kernel dispatch."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import linearize.lowering  # noqa: F401  (registers the ops)
from linearize.kernels.naive import naive_gla
from linearize.lowering import dispatch

ops = torch.ops.linearize


pytestmark = pytest.mark.usefixtures("single_thread")

EXPECTED_SCHEMAS = {
    "attention": "linearize::attention(Tensor q, Tensor k, Tensor v, Tensor? attn_mask, "
                 "float scale, bool is_causal, float softcap=0., Tensor? sinks=None) -> Tensor",
    "window_attention": "linearize::window_attention(Tensor q, Tensor k, Tensor v, float scale, "
                        "int window, int sink_tokens=0) -> Tensor",
    "gla": "linearize::gla(Tensor q, Tensor k, Tensor v, Tensor g, Tensor? initial_state, "
           "float scale, int chunk_size) -> (Tensor, Tensor)",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_SCHEMAS))
def test_public_schemas_are_the_contract(name):
    assert str(getattr(ops, name).default._schema) == EXPECTED_SCHEMAS[name]
    assert hasattr(ops, f"{name}_backward")


def _randn(*shape, dtype=torch.float64, seed=0, requires_grad=True):
    x = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    return x.requires_grad_(requires_grad)


def _gla_args(seq, groups, dk, dv, with_state, dtype=torch.float64, requires_grad=True, hkv=2):
    q = _randn(1, hkv * groups, seq, dk, dtype=dtype, seed=1, requires_grad=requires_grad)
    k = _randn(1, hkv, seq, dk, dtype=dtype, seed=2, requires_grad=requires_grad)
    v = _randn(1, hkv, seq, dv, dtype=dtype, seed=3, requires_grad=requires_grad)
    gate = F.logsigmoid(_randn(1, hkv, seq, dk, dtype=dtype, seed=4, requires_grad=False)) - 0.05
    g = gate.detach().requires_grad_(requires_grad)
    h0 = _randn(1, hkv, dk, dv, dtype=dtype, seed=5, requires_grad=requires_grad)
    h0 = h0 if with_state else None
    return q, k, v, g, h0


# ------------------------------------------------------------------------------ gradcheck
@pytest.mark.parametrize("seq,chunk,groups,with_state", [
    pytest.param(11, 4, 2, True, id="T11-C4-G2-h0"),
    pytest.param(18, 32, 1, True, id="T18-C32-two-subchunks"),
])
def test_gla_gradcheck(seq, chunk, groups, with_state):
    q, k, v, g, h0 = _gla_args(seq, groups, 2, 3, with_state, hkv=1)
    inputs = (q, k, v, g) + ((h0,) if with_state else ())

    def run(q, k, v, g, h0=None):
        return ops.gla(q, k, v, g, h0, 0.7, chunk)

    assert torch.autograd.gradcheck(run, inputs)


@pytest.mark.parametrize("sink_tokens", [0, 2])
def test_window_attention_gradcheck(sink_tokens):
    q = _randn(1, 4, 9, 3, seed=1)
    k, v = _randn(1, 2, 9, 3, seed=2), _randn(1, 2, 9, 2, seed=3)
    assert torch.autograd.gradcheck(
        lambda q, k, v: ops.window_attention(q, k, v, 0.6, 3, sink_tokens), (q, k, v))


@pytest.mark.parametrize("mask_kind,is_causal", [("none", True), ("bool", True), ("float", False)])
def test_attention_gradcheck(mask_kind, is_causal):
    q = _randn(1, 4, 3, 3, seed=1)
    k, v = _randn(1, 2, 5, 3, seed=2), _randn(1, 2, 5, 2, seed=3)
    mask = {
        "none": None,
        "bool": torch.tensor([[True, False, True, True, False]] * 3),
        "float": _randn(1, 1, 3, 5, seed=4, requires_grad=False),
    }[mask_kind]
    assert torch.autograd.gradcheck(
        lambda q, k, v: ops.attention(q, k, v, mask, 0.6, is_causal), (q, k, v))


# -------------------------------------------------------------------------------- opcheck
def _opcheck_cases():
    fp32 = dict(dtype=torch.float32)
    q, k, v, g, h0 = _gla_args(19, 2, 4, 3, True, **fp32)
    q2, k2, v2, g2, _ = _gla_args(7, 1, 4, 3, False, **fp32)
    wq, wk = _randn(1, 4, 10, 4, **fp32), _randn(1, 2, 10, 4, **fp32)
    wv = _randn(1, 2, 10, 3, **fp32)
    mask = torch.rand(10, 10, generator=torch.Generator().manual_seed(0)) > 0.3
    no_grad = [t.detach() for t in (q, k, v, g, h0)]
    return {
        "gla-h0": (ops.gla.default, (q, k, v, g, h0, 0.5, 8)),
        "gla-no-h0": (ops.gla.default, (q2, k2, v2, g2, None, 0.5, 16)),
        "window_attention": (ops.window_attention.default, (wq, wk, wv, 0.5, 4)),
        "window_attention-sinks": (ops.window_attention.default, (wq, wk, wv, 0.5, 4, 2)),
        "attention-causal": (ops.attention.default, (wq, wk, wv, None, 0.5, True)),
        "attention-bool-mask": (ops.attention.default, (wq, wk, wv, mask, 0.5, False)),
        "attention-softcap-sinks": (ops.attention.default,
                                    (wq, wk, wv, None, 0.5, True, 3.0,
                                     torch.randn(4, 1, 1, requires_grad=True))),
        # Backward ops have no autograd formula of their own (no double backward), so their
        # inputs do not require grad; the autograd-registration sub-test then has nothing to check.
        "gla_backward": (ops.gla_backward.default,
                         (torch.randn(1, 4, 19, 3), None, *no_grad, 0.5, 8)),
        "window_attention_backward": (ops.window_attention_backward.default,
                                      (torch.randn(1, 4, 10, 3), wq.detach(), wk.detach(),
                                       wv.detach(), 0.5, 4)),
        "attention_backward": (ops.attention_backward.default,
                               (torch.randn(1, 4, 10, 3), wq.detach(), wk.detach(), wv.detach(),
                                mask, 0.5, True, 0.0, None)),
    }


OPCHECK_CASES = _opcheck_cases()


@pytest.mark.parametrize("case", sorted(OPCHECK_CASES))
def test_opcheck(case):
    op, args = OPCHECK_CASES[case]
    torch.library.opcheck(op, args)


# ------------------------------------------------------------------------- op semantics
def test_gla_op_gradients_match_naive_including_final_state_only_loss():
    q, k, v, g, h0 = _gla_args(23, 3, 4, 5, True, dtype=torch.float32)
    o, final = ops.gla(q, k, v, g, h0, 0.5, 16)
    ref_o, ref_final = naive_gla(q, k, v, g, 0.5, h0)
    torch.testing.assert_close(o, ref_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, ref_final, rtol=1e-5, atol=1e-5)
    inputs = (q, k, v, g, h0)
    for loss_of in (lambda o, s: (o * o).sum() + s.sum(), lambda o, s: (s * s).sum()):
        got = torch.autograd.grad(loss_of(*ops.gla(q, k, v, g, h0, 0.5, 16)), inputs)
        want = torch.autograd.grad(loss_of(*naive_gla(q, k, v, g, 0.5, h0)), inputs,
                                   allow_unused=True, materialize_grads=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_gla_without_initial_state_and_low_precision():
    q, k, v, g, _ = _gla_args(9, 1, 4, 4, False, dtype=torch.bfloat16)
    o, final = ops.gla(q, k, v, g, None, 0.5, 64)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    grads = torch.autograd.grad(o.float().sum(), (q, k, v, g))
    assert all(gr.dtype == torch.bfloat16 and torch.isfinite(gr).all() for gr in grads)


def test_attention_op_matches_sdpa_exactly_enough():
    q, k, v = _randn(2, 6, 7, 8, dtype=torch.float32), _randn(2, 2, 9, 8, dtype=torch.float32), \
        _randn(2, 2, 9, 4, dtype=torch.float32)
    mask = torch.randn(2, 1, 7, 9)
    got = ops.attention(q, k, v, mask, 0.3, False)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    assert (got - want).abs().max() <= 1e-6


# ------------------------------------------------------------------------------- tracing
def test_compiled_graphs_keep_forward_and_backward_as_single_ops():
    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)
        return compiler

    def model(q, k, v, g):
        o, _ = ops.gla(q, k, v, g, None, 0.5, 16)
        w = ops.window_attention(q, k, v, 0.5, 4)
        a = ops.attention(q, k, v, None, 0.5, True)
        return (o + w + a).sum()

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True,
                             backend=aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw")))
    args = _gla_args(20, 2, 4, 4, False, dtype=torch.float32)[:4]
    got = torch.autograd.grad(compiled(*args), args)
    want = torch.autograd.grad(model(*args), args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)

    def targets(gm):
        return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}

    assert {"linearize.gla.default", "linearize.window_attention.default",
            "linearize.attention.default"} <= targets(graphs["fw"])
    assert {"linearize.gla_backward.default", "linearize.window_attention_backward.default",
            "linearize.attention_backward.default"} <= targets(graphs["bw"])
    torch._dynamo.reset()


# ------------------------------------------------------------------------------ dispatch
def test_dispatch_routes_to_preferred_backend_and_respects_devices():
    calls = []
    reference = dispatch.kernels("window_attention", "cpu")

    def spy_forward(*args):
        calls.append("fwd")
        return reference.forward(*args)

    def spy_backward(*args):
        calls.append("bwd")
        return reference.backward(*args)

    dispatch.register("window_attention", "spy", spy_forward, spy_backward, devices=["cpu"])
    dispatch.register("window_attention", "gpu-only", None, None, devices=["cuda"])
    old = dispatch.set_preference(["gpu-only", "spy"])
    try:
        q = torch.randn(1, 2, 6, 4, requires_grad=True)
        ops.window_attention(q, q, q, 0.5, 2).sum().backward()
        assert calls == ["fwd", "bwd"]
        assert dispatch.preference() == ["gpu-only", "spy", "reference"]
        assert set(dispatch.backends("window_attention")) >= {"reference", "spy", "gpu-only"}
    finally:
        dispatch.set_preference(old)
        for backend in ("spy", "gpu-only"):
            dispatch._registry.pop(("window_attention", backend))
    assert dispatch.kernels("window_attention", "cpu") is reference
    with pytest.raises(KeyError):
        dispatch.register("not_an_op", "x", None, None)


@pytest.mark.parametrize("softcap", [0.0, 2.5])
@pytest.mark.parametrize("with_sinks", [False, True])
def test_attention_softcap_and_sinks_match_reference(softcap, with_sinks):
    """gemma2 soft-capping and gpt-oss sinks through the exact op: forward and gradients vs the quadratic form."""
    from linearize.kernels.naive import naive_softmax_attention

    torch.manual_seed(3)
    q = torch.randn(2, 6, 11, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 11, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 11, 5, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(6, 1, 1, dtype=torch.float64, requires_grad=True) if with_sinks else None
    mask = torch.rand(2, 1, 11, 11) > 0.3
    args = (q, k, v) + ((sinks,) if with_sinks else ())

    def ours(q, k, v, *s):
        return ops.attention(q, k, v, mask, 0.7, True, softcap, s[0] if s else None)

    def ref(q, k, v, *s):
        return naive_softmax_attention(q, k, v, mask, 0.7, True, softcap=softcap, sinks=s[0] if s else None)

    torch.testing.assert_close(ours(*args), ref(*args))
    do = torch.randn_like(ours(*args))
    g_ours = torch.autograd.grad(ours(*args), args, do)
    g_ref = torch.autograd.grad(ref(*args), args, do)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(ours, args)
