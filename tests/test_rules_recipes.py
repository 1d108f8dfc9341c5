"""Every built-in recipe converts a tiny Llama and SmolLM2-135M, and the converted model runs forward and backward."""
from __future__ import annotations

import pytest
import torch

from linearize.models import tiny_model
from linearize.rewrite.rules import available, load

RECIPES = sorted(available())


def _compile(model, name, seen):
    return torch.compile(model, backend="linearize",
                         options={"rules": name, "inner": "eager", "record": lambda ctx: seen.extend(ctx.sites)})


def _expected_rewrites(name, layers):
    rs = load(name)
    targets = {r.rewrite for r in rs.rules}
    if name == "liger-hybrid":
        return ["keep" if i % 8 == 7 else "liger" for i in range(layers)]
    (target,) = targets
    return [target] * layers


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_converts_tiny_llama_forward_and_backward(name):
    layers = 8 if name == "liger-hybrid" else 2  # Liger-H keeps layer 7; two layers show the rest
    model = tiny_model("llama", num_hidden_layers=layers).train()
    ids = torch.randint(0, 128, (2, 80), generator=torch.Generator().manual_seed(0))  # longer than window 64
    seen = []
    out = _compile(model, name, seen)(ids, use_cache=False).logits
    assert [s.rewrite for s in seen] == _expected_rewrites(name, layers)
    assert all(s.reason is None for s in seen), [s.reason for s in seen]
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    if name in ("keep", "exact"):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    else:  # a real rewrite changes the function (and the window alone cannot see 80 tokens back)
        assert (out - ref).abs().max() > 1e-3
    out.float().logsumexp(-1).mean().backward()
    for layer in (0, layers - 1):
        attn = model.model.layers[layer].self_attn
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()
            assert proj.weight.grad.abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_recipe_converts_smollm2_forward_and_backward(name, smollm2, smollm2_8_layers):
    """SmolLM2-135M (GQA 9/3; all 30 layers for the default recipe, the first 8 for the others): every site converted
    as the recipe says, finite logits, and gradients reach the input embeddings through every rewritten layer (the
    model's own weights stay frozen and unchanged)."""
    from linearize.options import DEFAULT_RULES

    model, tok = smollm2 if name == DEFAULT_RULES else smollm2_8_layers
    from linearize.data import english_token_ids

    ids = english_token_ids(tok, 96).view(1, -1)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    seen = []
    out = _compile(model, name, seen)(inputs_embeds=embeds, use_cache=False).logits
    assert [s.rewrite for s in seen] == _expected_rewrites(name, model.config.num_hidden_layers)
    assert torch.isfinite(out).all()
    loss = torch.nn.functional.cross_entropy(out[0, :-1], ids[0, 1:])
    loss.backward()
    assert embeds.grad is not None and torch.isfinite(embeds.grad).all()
    assert embeds.grad[0, 0].abs().sum() > 0  # the first token influences later ones through attention
