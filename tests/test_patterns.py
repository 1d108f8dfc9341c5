"""The pattern library on the shape catalogue (tests/attention_shapes.py) and on softmaxes that are not attention."""
import pytest
import torch
import torch.nn as nn

import linearize
from attention_shapes import SHAPES, T

GQA = {"repeat_interleave_gqa", "repeat_kv_gqa"}


def _inputs(name, seed=0):
    g = torch.Generator().manual_seed(seed)
    hkv = 2 if name in GQA else 4
    q = torch.randn(2, 4, T, 8, generator=g)
    k, v = torch.randn(2, hkv, T, 8, generator=g), torch.randn(2, hkv, T, 8, generator=g)
    return q, k, v


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_is_one_canonical_site(name):
    fn, extras, expected = SHAPES[name]
    args = (*_inputs(name), *extras())
    report = linearize.explain(fn, *args, rules="keep")
    assert len(report.sites) == 1, report
    site = report.sites[0]
    for attr, want in expected.items():
        got = getattr(site, attr)
        assert got == pytest.approx(want) if isinstance(want, float) else got == want, (attr, got, want)
    assert report.unmatched == []


@pytest.mark.parametrize("name", sorted(set(SHAPES) - {"dropout_train"}))
def test_exact_rewrite_reproduces_every_shape(name):  # (sdpa sites go through the same exact op)
    fn, extras, _ = SHAPES[name]
    args = (*_inputs(name), *extras())
    compiled = torch.compile(fn, backend="linearize", options={"rules": "exact", "inner": "eager"})
    report = linearize.explain(fn, *args, rules="exact")
    assert [s.rewrite for s in report.sites] == ["exact"]
    torch.testing.assert_close(compiled(*args), fn(*args), rtol=1e-5, atol=1e-5)


def test_exact_gradients_through_sinks_and_softcap():
    for name in ("sinks_gpt_oss", "softcap_gemma2"):
        fn, extras, _ = SHAPES[name]
        args = [*_inputs(name), *extras()]
        trained = [a.requires_grad_() for i, a in enumerate(args) if i != 3]  # q, k, v and sinks; not the mask
        ref = torch.autograd.grad(fn(*args).square().sum(), trained)
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend="linearize", options={"rules": "exact", "inner": "eager"})
        got = torch.autograd.grad(compiled(*args).square().sum(), trained)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, reason", [
    ("softcap_gemma2", "soft-capping"),
    ("sinks_gpt_oss", "sinks"),
    ("alibi_bias", "bias"),
    ("cross_attention", "length"),
    ("key_padding_only", "key-padding mask only"),
    ("activation_mask_sdpa", "bias"),
    ("dropout_train", "dropout"),
])
def test_what_rewrites_cannot_reproduce_keeps_softmax_with_a_reason(name, reason):
    fn, extras, _ = SHAPES[name]
    report = linearize.explain(fn, *_inputs(name), *extras(), rules="swa")
    (site,) = report.sites
    assert site.rewrite == "keep" and reason in site.reason


def test_causal_masked_shapes_take_the_window_rewrite():
    """A mask built in the graph is accepted for causal rewrites (and checked at run time)."""
    fn, extras, _ = SHAPES["masked_fill_buffer"]
    args = _inputs("masked_fill_buffer")
    report = linearize.explain(fn, *args, rules="swa")
    assert [s.rewrite for s in report.sites] == ["swa"]
    compiled = torch.compile(fn, backend="linearize", options={"rules": "swa", "inner": "eager"})
    torch.testing.assert_close(compiled(*args), fn(*args), rtol=1e-5, atol=1e-5)  # window 64 > T: same math


# ----- negatives: softmaxes that are not attention ----------------------------------------------------------

class Router(nn.Module):
    """MoE routing: softmax over expert logits, then top-k."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(8, 4, bias=False)

    def forward(self, x):
        w = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        top, idx = torch.topk(w, 2, dim=-1)
        return top.sum(-1), idx


class RouterDotProduct(nn.Module):
    """Routing by dot product with expert embeddings (looks like q @ k^T), weights mixing expert outputs."""

    def __init__(self):
        super().__init__()
        self.experts = nn.Parameter(torch.randn(4, 8))
        self.values = nn.Parameter(torch.randn(4, 8))

    def forward(self, x):
        return torch.softmax(x @ self.experts.transpose(-2, -1), dim=-1) @ self.values


class TokenMixer(nn.Module):
    """A learned token-mixing matrix (softmax over a parameter), not attention over keys."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Parameter(torch.randn(T, T))

    def forward(self, x):
        return torch.softmax(self.mix, dim=-1) @ x


def non_key_axis(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1), dim=-2) @ v


def classifier(x):
    return torch.softmax(x.mean(1) @ torch.ones(8, 3), dim=-1)


@pytest.mark.parametrize("case", ["router", "router_dot", "token_mixer", "non_key_axis", "classifier"])
def test_softmax_that_is_not_attention_is_never_matched(case):
    q, k, v = _inputs("x")
    model, args = {
        "router": (Router(), (torch.randn(2, T, 8),)),
        "router_dot": (RouterDotProduct(), (torch.randn(2, T, 8),)),
        "token_mixer": (TokenMixer(), (torch.randn(2, T, 8),)),
        "non_key_axis": (non_key_axis, (q, k, v)),
        "classifier": (classifier, (torch.randn(2, T, 8),)),
    }[case]
    with pytest.warns(UserWarning, match="no softmax attention"):
        report = linearize.explain(model, *args, rules="liger")
    assert report.sites == []
    assert len(report.unmatched) == 1  # the softmax is listed as left alone


def test_moe_model_matches_attention_not_routers():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64)
    for impl in ("sdpa", "eager"):
        torch._dynamo.reset()
        cfg._attn_implementation = impl
        model = MixtralForCausalLM(cfg).eval()
        report = linearize.explain(model, torch.randint(0, 64, (1, 12)), rules="keep")
        assert [s.layer for s in report.sites] == [0, 1], impl
        assert all(u.module_path.endswith(("mlp", "gate", "block_sparse_moe", "router")) or "expert" in u.reason
                   or "not attention" in u.reason or "no attention pattern" in u.reason for u in report.unmatched)
