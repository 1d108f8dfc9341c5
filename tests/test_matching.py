"""Pattern matching and provenance on Dynamo graphs of real transformers architectures and on negatives."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import linearize
from linearize.models import tiny_model
from attention_shapes import BrokenAttention
from conftest import ARCHS


def _ids(model, T=12, B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, T), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("with_mask", [False, True], ids=["causal", "explicit-mask"])
def test_every_layer_is_one_site_with_provenance(arch, with_mask):
    model = tiny_model(arch)
    ids = _ids(model)
    kwargs = {"attention_mask": torch.ones_like(ids)} if with_mask else {}
    report = linearize.explain(model, ids, rules="keep", **kwargs)
    cfg = model.config
    assert [s.layer for s in report.sites] == list(range(cfg.num_hidden_layers))
    for site in report.sites:
        B, Hq, Hkv, L, S, D, Dv = site.shape
        assert (Hq, Hkv, L, S) == (cfg.num_attention_heads, cfg.num_key_value_heads, 12, 12)
        assert site.gqa_groups == cfg.num_attention_heads // cfg.num_key_value_heads
        assert site.is_causal != with_mask and (site.attn_mask is not None) == with_mask
        assert site.provenance_found, site.provenance_missing
        assert site.provenance.k_proj_path == f"{site.module_path}.k_proj"
        assert site.provenance.rope == "rotate_half"
        assert site.scale == pytest.approx(cfg.head_dim ** -0.5)
    assert report.unmatched == []


class ClassifierWithSoftmax(nn.Module):
    """A softmax over class logits: not attention, must never be matched."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 8)

    def forward(self, x):
        return torch.softmax(self.proj(x), dim=-1)


def test_softmax_that_is_not_attention_is_left_alone_with_a_reason():
    model = ClassifierWithSoftmax()
    x = torch.randn(2, 16)
    with pytest.warns(UserWarning, match="no softmax attention"):
        report = linearize.explain(model, x)
    assert report.sites == []
    assert len(report.unmatched) == 1 and "no attention pattern" in report.unmatched[0].reason


def test_graph_break_inside_attention_keeps_softmax_and_says_why():
    torch.manual_seed(0)
    model = BrokenAttention().eval()
    x = torch.randn(1, 8, 32)
    report = linearize.explain(model, x, rules="liger")
    (site,) = report.sites
    assert not site.provenance_found and "graph break" in site.provenance_missing
    assert site.rewrite == "keep" and "provenance" in site.reason
    compiled = torch.compile(model, backend="linearize", options={"inner": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)


def test_window_rewrite_still_applies_across_a_graph_break():
    """SWA needs no provenance (it uses the RoPE'd q, k the site already has)."""
    torch.manual_seed(0)
    model = BrokenAttention().eval()
    report = linearize.explain(model, torch.randn(1, 8, 32), rules="swa")
    assert [s.rewrite for s in report.sites] == ["swa"]


def test_passes_report_their_time():
    model = tiny_model("llama")
    report = linearize.explain(model, _ids(model), rules="liger")
    ctx = report.contexts[0]
    from linearize.passes import DEFAULT_PIPELINE

    # every pass of the pipeline reports, in pipeline order (the order is the data flow the README draws)
    assert list(ctx.timings) == [p.name for p in DEFAULT_PIPELINE]
    assert list(ctx.timings)[:5] == ["find_attention", "bind_state_cache", "trace_provenance", "classify_masks",
                                     "apply_rules"]
    assert report.pass_seconds > 0  # (how long they take is measured in bench/, not asserted here)


def _small(config_cls, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config_cls(**kw)).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_fused_qkv_and_partial_rotary_provenance(impl):
    """GPT-2 projects q, k, v with one Conv1D (addmm) and splits; Phi rotates only part of each head."""
    from transformers import GPT2Config, PhiConfig

    gpt2 = _small(GPT2Config, n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64,
                  attn_implementation=impl)
    phi = _small(PhiConfig, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=64, partial_rotary_factor=0.5, attn_implementation=impl)
    for model, rope in ((gpt2, None), (phi, "partial_rotate_half")):
        report = linearize.explain(model, torch.randint(0, 64, (1, 12)), rules="keep", use_cache=False)
        assert len(report.sites) == 2
        for s in report.sites:
            assert s.provenance_found, s.provenance_missing
            assert s.provenance.rope == rope


def test_bloom_alibi_baddbmm_is_matched_and_kept_for_linear_rewrites():
    from transformers import BloomConfig

    model = _small(BloomConfig, hidden_size=32, n_layer=2, n_head=4, vocab_size=64, attn_implementation="eager")
    ids = torch.randint(0, 64, (1, 12))
    report = linearize.explain(model, ids, rules="liger")
    assert len(report.sites) == 2
    assert all(s.mask_kind == "bias" and s.rewrite == "keep" and "ALiBi" in s.reason for s in report.sites)
    exact = torch.compile(model, backend="linearize", options={"rules": "exact", "inner": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(exact(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_masks_are_classified_on_the_example_input():
    model = tiny_model("llama")
    ids = _ids(model, B=2)
    padded = torch.ones_like(ids)
    padded[1, :3] = 0
    report = linearize.explain(model, ids, rules="liger", attention_mask=padded)
    assert all(s.mask_example == "padded" and s.rewrite == "keep" and "padded" in s.reason for s in report.sites)
    report = linearize.explain(model, ids, rules="liger", attention_mask=torch.ones_like(ids))
    assert all(s.mask_example == "causal" and s.rewrite == "liger" for s in report.sites)


def test_bidirectional_mask_is_non_causal():
    def encoder_attention(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    (site,) = linearize.explain(encoder_attention, q, k, v, mask, rules="swa").sites
    assert site.mask_example == "bidirectional" and site.causality == "none" and site.rewrite == "keep"
    assert "bidirectional" in site.reason
