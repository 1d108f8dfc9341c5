"""The generated kernels inside torch.compile: options={"kernels": "triton"}.

Runs the tiny transformers through the backend with fullgraph=True (no graph break), compares logits and
gradients with the reference kernels, checks the fallback warning and the `triton` dispatch backend. On the CPU
interpreter by default (custom ops); LINEARIZE_TEST_DEVICE=cuda runs them on compiled kernels (triton_op, traced
by Inductor), as bench/gpu/run.py does.
"""
from __future__ import annotations

import os

DEVICE = os.environ.get("LINEARIZE_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (collection time)

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

import linearize  # noqa: E402
from conftest import rel_rmse  # noqa: E402
from linearize.kernels.triton import launch  # noqa: E402
from linearize.lowering import dispatch, triton_ops  # noqa: E402
from linearize.models import tiny_model  # noqa: E402
from linearize.rewrite import replacements as R  # noqa: E402

ops = torch.ops.linearize


@pytest.fixture(autouse=True, scope="module")
def _setup(tmp_path_factory):
    old = os.environ.get("LINEARIZE_KERNEL_CACHE")
    os.environ["LINEARIZE_KERNEL_CACHE"] = str(tmp_path_factory.mktemp("kernels"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if old is None:
        os.environ.pop("LINEARIZE_KERNEL_CACHE", None)
    else:
        os.environ["LINEARIZE_KERNEL_CACHE"] = old


@pytest.fixture
def launches(monkeypatch):
    """Counts forward / backward launches of the generated kernels."""
    count = {"forward": 0, "backward": 0, "decode": 0}
    for name in count:
        real = getattr(launch, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            count[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(launch, name, counted)
    return count


def _ids(model, T=40, B=1):
    return torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0)).to(DEVICE)


def _randn(*shape, gen):
    return torch.randn(*shape, generator=gen).to(DEVICE)


def _assert_launched(count, layers, inner):
    """One launch per layer. On CUDA, AOTAutograd (aot_eager, inductor) traces the triton_op's body into its graph,
    so the Python launcher also runs while compiling: there the count is at least one per layer."""
    if DEVICE == "cuda" and inner != "eager":
        assert count >= layers
    else:
        assert count == layers


def _compiled(model, rules, kernels, inner="inductor"):
    torch._dynamo.reset()
    return torch.compile(model, backend="linearize", fullgraph=True,
                         options={"rules": rules, "inner": inner, "kernels": kernels})


@pytest.mark.parametrize("rules,inner", [("liger", "inductor"), ("gla", "aot_eager"), ("swa", "aot_eager"),
                                         ("liger-sinks", "aot_eager")])
def test_fullgraph_logits_match_reference_kernels(rules, inner, launches):
    model = tiny_model("llama").to(DEVICE)
    ids = _ids(model)
    with torch.no_grad():
        ref = _compiled(model, rules, "reference", inner="eager")(ids, use_cache=False).logits
        assert launches["forward"] == 0
        out = _compiled(model, rules, "triton", inner=inner)(ids, use_cache=False).logits
    # one fused call per layer; the default recipe's normalised linear branch is not fused: window, GLA, denominator
    per_layer = 3 if rules == "liger-sinks" else 1
    _assert_launched(launches["forward"], model.config.num_hidden_layers * per_layer, inner)
    assert rel_rmse(ref, out) <= 1e-5


def test_training_through_inductor_matches_reference_gradients(launches):
    grads = {}
    for kernels in ("reference", "triton"):
        torch.manual_seed(0)
        model = tiny_model("qwen2").to(DEVICE).train()
        ids = _ids(model, T=37)
        inner = "eager" if kernels == "reference" else "inductor"  # the reference math does not depend on it
        loss = _compiled(model, "liger", kernels, inner=inner)(ids, labels=ids, use_cache=False).loss
        loss.backward()
        attn = model.model.layers[0].self_attn
        grads[kernels] = [p.grad.clone() for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)]
    _assert_launched(launches["backward"], model.config.num_hidden_layers, "inductor")
    for ref, out in zip(grads["reference"], grads["triton"]):
        assert rel_rmse(ref, out) <= 1e-4


def test_auto_uses_the_kernels_on_cuda_only(launches):
    model = tiny_model("llama").to(DEVICE)
    with torch.no_grad():
        _compiled(model, "liger", "auto", inner="eager")(_ids(model), use_cache=False)
    assert launches["forward"] == (model.config.num_hidden_layers if DEVICE == "cuda" else 0)


def test_unknown_kernel_choice_is_an_error():
    with pytest.raises(ValueError, match="kernels must be one of"):
        linearize.linearize_backend(None, [], options={"kernels": "cuda"})


def test_unsupported_head_dim_falls_back_with_one_warning(launches):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (_randn(1, 2, 20, 24, gen=gen) for _ in range(3))
    params = dict(gate="logsigmoid", gate_normalizer=16.0, feature_map="softmax", chunk_size=16, normalize=False)
    triton_ops._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = R.gla_attention(q, k, v, kernels="triton", **params)
        R.gla_attention(q, k, v, kernels="triton", **params)
    msgs = [str(w.message) for w in caught if "reference path instead" in str(w.message)]
    assert len(msgs) == 1 and "head dim K = 24" in msgs[0]
    assert launches["forward"] == 0
    torch.testing.assert_close(out, R.gla_attention(q, k, v, kernels="reference", **params))


def test_triton_dispatch_backend_serves_the_base_ops():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (_randn(1, 2, 35, 16, gen=gen).requires_grad_() for _ in range(3))
    g = (F.logsigmoid(_randn(1, 2, 35, 16, gen=gen)) / 8).requires_grad_()
    results = {}
    old = dispatch.set_preference(["triton"])
    try:
        for backend in ("triton", "reference"):
            dispatch.set_preference([backend])
            o, state = ops.gla(q, k, v, g, None, 0.5, 16)
            w = ops.window_attention(q, k, v, 0.25, 6)
            ws = ops.window_attention(q, k, v, 0.25, 6, 3)  # with 3 attention sinks
            loss = o.square().sum() + state.sum() + w.square().sum() + ws.square().sum()
            results[backend] = (o, state, w, ws, *torch.autograd.grad(loss, (q, k, v, g)))
    finally:
        dispatch.set_preference(old)
    for ref, out in zip(results["reference"], results["triton"]):
        assert rel_rmse(ref, out) <= 1e-5


@pytest.mark.parametrize("which", ["gla", "gla-normalized", "swa"])
def test_single_branch_ops_differentiate(which, launches):
    """GLA-only and window-only specs: the backward op returns placeholders for the missing branch, each its own
    tensor (custom-op outputs may not alias), and the gradients are the reference ones. A normalised GLA (the
    default recipe's linear branch) runs two launches: the values and the denominator block."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (_randn(1, 2, 24, 16, gen=gen).requires_grad_() for _ in range(3))
    params = dict(gate="logsigmoid", gate_normalizer=16.0, feature_map="softmax", chunk_size=16,
                  normalize=which == "gla-normalized")
    outs = {}
    for kernels in ("triton", "reference"):
        if which.startswith("gla"):
            o = R.gla_attention(q, k, v, kernels=kernels, **params)
        else:
            o = R.window_attention(q, k, v, window=5, scale=0.3, kernels=kernels)
        outs[kernels] = (o, *torch.autograd.grad(o.square().sum(), (q, k, v)))
        if kernels == "triton":
            assert launches["forward"] == (2 if which == "gla-normalized" else 1)
    for ref, out in zip(outs["reference"], outs["triton"]):
        assert rel_rmse(ref, out) <= 1e-5


@pytest.mark.parametrize("rules", ["liger", "gla"])
def test_state_cache_decoding_runs_the_decode_kernel(rules, launches):
    """Prefill, then one-token steps through a StateCache: with kernels="triton" each step's linear branch is the
    generated decode kernel (one launch per layer and token), and the logits are the PyTorch step's."""
    from linearize.generation import StateCache, decode_logits

    ids = _ids(tiny_model("llama"), T=30)
    logits = {}
    for kernels in ("reference", "triton"):
        torch._dynamo.reset()
        model = linearize.convert(tiny_model("llama").to(DEVICE), rules=rules, inner="eager", kernels=kernels)
        with torch.no_grad():
            logits[kernels] = decode_logits(model, ids, StateCache(model, max_length=48), prompt_len=24)
    layers = model.config.num_hidden_layers
    assert launches["decode"] == layers * (30 - 24)
    assert rel_rmse(logits["reference"], logits["triton"]) <= 1e-5
