"""The backend end to end on tiny random transformers configs (CPU)."""
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import linearize
from linearize.models import tiny_model
from conftest import ARCHS


def _ids(model, T=80, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (B, T), generator=g)


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, use_cache=False, **kwargs).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_rewrite_reproduces_logits(arch):
    model = tiny_model(arch)
    ids = _ids(model)
    ref = _logits(model, ids)
    compiled = torch.compile(model, backend="linearize", options={"rules": "exact", "inner": "eager"})
    out = _logits(compiled, ids)
    assert (out - ref).abs().max().item() <= 1e-5


def test_exact_rewrite_through_inductor():
    model = tiny_model("llama")
    ids = _ids(model)
    out = _logits(torch.compile(model, backend="linearize", options={"rules": "exact"}), ids)
    assert (out - _logits(model, ids)).abs().max().item() <= 1e-5


def test_exact_rewrite_with_explicit_mask_and_padding():
    """With padding, transformers passes an explicit mask; `exact` must carry it through unchanged."""
    model = tiny_model("llama")
    ids = _ids(model, T=16)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second sequence
    ref = _logits(model, ids, attention_mask=mask)
    out = _logits(torch.compile(model, backend="linearize", options={"rules": "exact", "inner": "eager"}), ids,
                  attention_mask=mask)
    assert (out - ref)[mask.bool()].abs().max().item() <= 1e-5


@pytest.mark.parametrize("rules", ["liger", "gla", "swa"])
def test_linear_rewrites_run_and_change_the_model(rules):
    model = tiny_model("llama")
    ids = _ids(model)
    report = linearize.explain(model, ids, rules=rules)
    assert report.counts() == {rules: model.config.num_hidden_layers}
    out = _logits(torch.compile(model, backend="linearize", options={"rules": rules, "inner": "eager"}), ids)
    ref = _logits(model, ids)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max().item() > 1e-4  # the attention really was replaced


def test_window_covering_the_whole_sequence_is_exact():
    """SWA with a window >= T is full causal attention: a semantic check of the window rewrite."""
    from linearize.rewrite.rules import parse

    model = tiny_model("mistral")
    ids = _ids(model, T=40)
    rules = parse("rules:\n  - match: attention\n    rewrite: swa\n    with: {window: 64}\n")
    out = _logits(torch.compile(model, backend="linearize", options={"rules": rules, "inner": "eager"}), ids)
    assert (out - _logits(model, ids)).abs().max().item() <= 1e-5


def test_training_step_through_inductor():
    torch.manual_seed(0)
    model = tiny_model("llama").train()
    ids = _ids(model, T=70)
    compiled = torch.compile(model, backend="linearize")
    loss = compiled(ids, labels=ids, use_cache=False).loss
    loss.backward()
    assert torch.isfinite(loss)
    attn = model.model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
        assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()
        assert proj.weight.grad.abs().sum() > 0


def test_training_gradients_match_eager_rewrite():
    """Gradients through Inductor equal gradients through the rewritten graph run eagerly."""
    grads = []
    for inner in ("eager", "inductor"):
        torch._dynamo.reset()
        model = tiny_model("qwen2").train()
        ids = _ids(model, T=70)
        loss = torch.compile(model, backend="linearize", options={"inner": inner})(ids, labels=ids,
                                                                                   use_cache=False).loss
        loss.backward()
        grads.append(model.model.layers[1].self_attn.k_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_backend_is_found_by_name_without_importing_linearize():
    code = ("import sys, torch; from torch._dynamo import lookup_backend; fn = lookup_backend('linearize'); "
            "print(fn.__module__); assert 'linearize' in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "linearize.backend"


def test_unknown_rule_set_lists_the_available_ones():
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="linearize", options={"rules": "ligre"})
    with pytest.raises(Exception, match=r"did you mean .liger.*built-in rule sets: exact, gla, .*liger.*swa"):
        compiled(_ids(model))


def test_unknown_option_is_an_error():
    with pytest.raises(ValueError, match="did you mean 'rules'"):
        linearize.linearize_backend(None, [], options={"rule": "liger"})


def test_model_without_attention_runs_unchanged_with_a_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    x = torch.randn(3, 8)
    compiled = torch.compile(model, backend="linearize")
    with pytest.warns(UserWarning, match="no softmax attention"):
        out = compiled(x)
    torch.testing.assert_close(out, model(x))


def test_causal_mask_is_checked_at_run_time():
    model = tiny_model("llama")
    ids = _ids(model, T=16)
    compiled = torch.compile(model, backend="linearize", options={"rules": "liger", "inner": "eager"})
    ones = torch.ones_like(ids)
    assert torch.isfinite(_logits(compiled, ids, attention_mask=ones)).all()  # all-ones mask == causal
    padded = ones.clone()
    padded[0, :3] = 0
    with pytest.raises(RuntimeError, match="neither causal nor a causal sliding window"):
        _logits(compiled, ids, attention_mask=padded)


def test_mask_guard_accepts_causal_and_sliding_window_masks_only():
    from linearize.rewrite.guards import mask_is_causal

    i, j = torch.arange(8)[:, None], torch.arange(8)[None, :]
    causal = j <= i
    window = causal & (i - j < 3)
    padded = causal & (j >= 2)
    assert mask_is_causal(causal) and mask_is_causal(window[None, None])
    assert not mask_is_causal(padded) and not mask_is_causal(torch.ones(8, 8, dtype=torch.bool))
    as_float = lambda m: torch.zeros(m.shape).masked_fill(~m, torch.finfo().min)
    assert mask_is_causal(as_float(causal)) and mask_is_causal(as_float(window))
    assert not mask_is_causal(as_float(padded))
    biased = as_float(causal) + 0.5 * causal  # ALiBi-like values where keys are visible
    assert not mask_is_causal(biased)
    per_batch = torch.stack([causal, padded])[:, None]  # one padded row in the batch is enough to fail
    assert not mask_is_causal(per_batch)


def test_dynamic_shapes_keep_the_traced_scale():
    """With dynamic=True Dynamo traces the scale as a symbolic float: sites still match and `exact` reproduces
    the model at lengths it was not compiled for."""
    model = tiny_model("llama")
    contexts = []
    compiled = torch.compile(model, backend="linearize", dynamic=True,
                             options={"rules": "exact", "inner": "eager", "record": contexts.append})
    for T in (12, 20):
        ids = _ids(model, T=T, B=1)
        assert (_logits(compiled, ids) - _logits(model, ids)).abs().max().item() <= 1e-5
    assert [s.rewrite for c in contexts for s in c.sites][:2] == ["exact", "exact"]


def test_cleanup_keeps_side_effects_of_graphs_without_attention():
    """vmap inside a model puts calls whose effect is not their result into the graph (nesting level changes):
    cleanup removes only what rewrites orphaned, never those."""

    class VmapModel(nn.Module):
        def forward(self, x):
            return torch.vmap(lambda row: row.sin() * 2)(x) + 1

    x = torch.randn(3, 4)
    compiled = torch.compile(VmapModel(), backend="linearize", options={"inner": "eager"})
    with pytest.warns(UserWarning, match="no softmax attention"):
        torch.testing.assert_close(compiled(x), VmapModel()(x))
