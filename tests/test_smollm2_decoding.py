"""SmolLM2 (the real pretrained model) decodes with a StateCache exactly as a full forward recomputes: for every
built-in recipe, the logits of each token from prefill-then-step decoding match one forward over the whole text."""
import pytest
import torch

import linearize
from linearize.data import english_text
from linearize.generation import StateCache, decode_logits, revert
from linearize.options import DEFAULT_RULES

RECIPES = sorted(linearize.available_rules())
PROMPT, TOTAL = 70, 76  # the 64-token window ring wraps during the prefill, then six single-token steps


@pytest.mark.parametrize("rules", RECIPES)
def test_smollm2_decoding_equals_full_recompute(smollm2, smollm2_8_layers, rules):
    """The default recipe on all 30 layers; the others on the first 8 (the same weights and shapes, a quarter of the
    compile time)."""
    model, tok = smollm2 if rules == DEFAULT_RULES else smollm2_8_layers
    ids = tok(english_text(), return_tensors="pt").input_ids[:, :TOTAL]
    try:
        linearize.convert(model, rules=rules, inner="eager")
        with torch.no_grad():
            full = model(ids, use_cache=False).logits
        cache = StateCache(model, max_length=TOTAL)
        steps = decode_logits(model, ids, cache, prompt_len=PROMPT)
    finally:
        revert(model)
    diff = (steps - full).abs().max().item()
    scale = full.abs().max().item()  # fp32 rounding of the layers of chunked-vs-stepwise recurrences grows with it
    assert diff <= max(1e-4, 5e-6 * scale), f"{rules}: max |logit diff| {diff:.3g} (max |logit| {scale:.3g})"
