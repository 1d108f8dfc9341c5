"""Constant-memory decoding with a StateCache: decoding equals recomputing the full sequence, for every built-in
recipe, on tiny random configs; padding never leaks into the state; transformers' generate works; bad use fails
clearly. (SmolLM2: tests/test_smollm2_decoding.py.)"""
import pytest
import torch
from transformers import DynamicCache

import linearize
from linearize.generation import StateCache, decode_logits, generate_greedy, prefill
from linearize.models import tiny_model

RECIPES = sorted(linearize.available_rules())
TOL = 1e-4


def _converted(arch="llama", rules="liger", **cfg):
    model = tiny_model(arch, **cfg)
    return linearize.convert(model, rules=rules, inner="eager")


def _full_logits(arch, rules, ids, **cfg):
    """The reference: one forward over the whole sequence through the same rewrite, no cache."""
    model = tiny_model(arch, **cfg)
    compiled = torch.compile(model, backend="linearize", options={"rules": rules, "inner": "eager"})
    with torch.no_grad():
        return compiled(ids, use_cache=False).logits


def _ids(B, T, seed=0, vocab=128):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rules", RECIPES)
def test_decode_equals_full_recompute(rules):
    """Prefill 70 tokens, then 20 single-token steps (the 64-token window ring wraps); liger-hybrid gets 8 layers,
    so that a kept softmax layer (an ordinary KV cache) decodes among its stateful ones."""
    ids = _ids(2, 90)
    layers = 8 if rules == "liger-hybrid" else 2
    ref = _full_logits("llama", rules, ids, num_hidden_layers=layers)
    model = _converted("llama", rules, num_hidden_layers=layers)
    cache = StateCache(model, batch_size=2, max_length=128)
    out = decode_logits(model, ids, cache, prompt_len=70)
    assert (out - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
@pytest.mark.parametrize("rules", ["liger", "lolcats", "gla"])
def test_decode_equals_full_recompute_other_archs(arch, rules):
    ids = _ids(1, 40, seed=1)
    ref = _full_logits(arch, rules, ids)
    model = _converted(arch, rules)
    out = decode_logits(model, ids, StateCache(model, max_length=64), prompt_len=25)
    assert (out - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("rules", ["liger", "lolcats"])
def test_eager_attention_and_float_masks(rules):
    """attn_implementation="eager": matmul/softmax attention with repeat_kv and additive float masks (row 0 padded)."""
    ids = _ids(2, 80, seed=6)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    ref = _full_logits("llama", rules, ids[1:], attn_implementation="eager")
    model = _converted("llama", rules, attn_implementation="eager")
    out = decode_logits(model, ids, StateCache(model, batch_size=2, max_length=96), prompt_len=70,
                        attention_mask=mask)
    assert (out[1:] - ref).abs().max().item() <= TOL


def test_inductor_decoding_with_padding():
    """The default inner compiler: Inductor compiles prefill and decoding graphs (buffers written back in place)."""
    ids = _ids(2, 76, seed=7)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ref = _full_logits("llama", "liger", ids[1:])
    model = linearize.convert(tiny_model("llama"), rules="liger")  # inner="inductor"
    out = decode_logits(model, ids, StateCache(model, batch_size=2, max_length=80), prompt_len=70,
                        attention_mask=mask)
    assert (out[1:] - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("rewrite", ["swa", "liger", "lolcats"])
def test_small_window_chunked_prefill(rewrite, tmp_path):
    """Window 5 and a prefill in chunks of 7: chunks straddle the ring; still the full-sequence result."""
    path = tmp_path / "small.yaml"
    path.write_text(f"name: small-{rewrite}\nrules:\n  - match: attention\n    rewrite: {rewrite}\n"
                    "    with: {window: 5}\n")
    ids = _ids(2, 33, seed=2)
    ref = _full_logits("llama", str(path), ids)
    model = _converted("llama", str(path))
    out = decode_logits(model, ids, StateCache(model, batch_size=2, max_length=40), prompt_len=23, chunk_size=7)
    assert (out - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("rewrite,window,sinks", [("swa", 5, 3), ("liger", 8, 4), ("lolcats", 6, 3)])
def test_sinks_decode_equals_full_recompute_with_constant_cache(rewrite, window, sinks, tmp_path):
    """Attention sinks: decoding (a chunked prefill, then single steps) gives the full forward, the sink keys sit
    beside the ring (constant bytes), and they change the result (so the test would see them ignored)."""
    def rules(n):
        path = tmp_path / f"{rewrite}-{n}.yaml"
        path.write_text(f"name: {rewrite}-sinks-{n}\nrules:\n  - rewrite: {rewrite}\n"
                        f"    with: {{window: {window}, sinks: {n}}}\n")
        return str(path)

    ids = _ids(2, 40, seed=4)
    ref = _full_logits("llama", rules(sinks), ids)
    model = _converted("llama", rules(sinks))
    cache = StateCache(model, batch_size=2, max_length=48)
    before = cache.nbytes()
    out = decode_logits(model, ids, cache, prompt_len=17, chunk_size=6)
    assert (out - ref).abs().max().item() <= TOL
    assert cache.nbytes() == before
    Hkv, D, L = 2, 16, 2  # the sink buffers: keys, values, positions
    plain = StateCache(_converted("llama", rules(0)), batch_size=2, max_length=48).nbytes()
    assert before - plain == L * (2 * 2 * Hkv * sinks * D * 4 + 2 * sinks * 8)
    assert (ref - _full_logits("llama", rules(0), ids)).abs().max().item() > 1e-3


def _row_alone_and_padded(rules, pad=6):
    """Row 0 is a shorter text, left-padded; row 1 is full length."""
    ids = _ids(2, 30, seed=3)
    ids[0, :pad] = 0
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("rules", ["liger", "gla", "swa", "lolcats", "liger-hybrid"])
def test_padding_does_not_leak_into_the_state(rules):
    pad = 6
    ids, mask = _row_alone_and_padded(rules, pad)
    layers = 8 if rules == "liger-hybrid" else 2  # liger-hybrid: a kept softmax layer (KV cache) among the others
    model = _converted("llama", rules, num_hidden_layers=layers)
    cache = StateCache(model, batch_size=2, max_length=48)
    out = decode_logits(model, ids, cache, prompt_len=20, attention_mask=mask)

    alone_model = _converted("llama", rules, num_hidden_layers=layers)
    alone_cache = StateCache(alone_model, batch_size=1, max_length=48)
    alone = decode_logits(alone_model, ids[:1, pad:], alone_cache, prompt_len=20 - pad)
    assert (out[:1, pad:] - alone).abs().max().item() <= TOL
    assert torch.isfinite(out).all()
    for layer, alone_layer in zip(cache.layers, alone_cache.layers):  # the padded row's state is the unpadded one's
        for name, buf in getattr(layer, "buffers", {}).items():
            ref = alone_layer.buffers[name][0]
            got = buf[0]
            if name == "ring_pos":  # the padded row's slots are shifted by the padding
                assert torch.equal(torch.sort(got[got >= 0] - pad).values, torch.sort(ref[ref >= 0]).values)
            elif name == "state" or name == "norm":
                assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), name


def test_generate_greedy_with_left_padding_equals_each_row_alone():
    pad = 5
    ids, mask = _row_alone_and_padded("liger", pad)
    ids, mask = ids[:, :18], mask[:, :18]
    model = _converted("llama", "liger")
    out = model.generate(ids, attention_mask=mask, past_key_values=StateCache(model, batch_size=2, max_length=40),
                         max_new_tokens=10, do_sample=False, pad_token_id=0)
    loop = generate_greedy(model, ids, StateCache(model, batch_size=2, max_length=40), 10, attention_mask=mask)
    assert torch.equal(out, loop)
    full = tiny_model("llama")
    full_c = torch.compile(full, backend="linearize", options={"rules": "liger", "inner": "eager"}, dynamic=True)
    for row, start in ((0, pad), (1, 0)):
        seq = ids[row:row + 1, start:]
        with torch.no_grad():
            for _ in range(10):  # greedy by full recomputation, no cache at all
                nxt = full_c(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
        assert torch.equal(out[row, start:], seq[0])


def test_generate_sampling_batch_matches_full_recompute():
    ids = _ids(3, 12, seed=4)
    model = _converted("llama", "gla")
    torch.manual_seed(7)
    ours = model.generate(ids, past_key_values=StateCache(model, batch_size=3, max_length=32), do_sample=True,
                          top_k=20, max_new_tokens=6, pad_token_id=0)
    torch.manual_seed(7)  # without a cache every step recomputes the sequence (one compile per length)
    ref = model.generate(ids, use_cache=False, do_sample=True, top_k=20, max_new_tokens=6, pad_token_id=0)
    assert torch.equal(ours, ref)


def test_beam_search_reorders_the_state():
    """Beam search reorders the cache along the batch every step (`reorder_cache`): same beams as recomputing."""
    ids = _ids(1, 12, seed=5)
    model = _converted("llama", "liger")
    ours = model.generate(ids, past_key_values=StateCache(model, batch_size=3, max_length=32), num_beams=3,
                          max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch._dynamo.config.patch(recompile_limit=64):  # no cache: one compile per length
        ref = model.generate(ids, use_cache=False, num_beams=3, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, ref)


def test_cache_bytes_do_not_grow_with_context():
    model = _converted("llama", "liger")
    cache = StateCache(model, max_length=200)
    before = cache.nbytes()
    prefill(model, _ids(1, 150), cache)
    assert cache.nbytes() == before
    assert int(cache.get_seq_length()) == 150
    W, D, Hkv, L = 64, 16, 2, 2  # ring k + v + positions, and the fp32 state, per layer
    assert before == L * (2 * Hkv * W * D * 4 + W * 8 + Hkv * D * D * 4)


# ----- bad use -------------------------------------------------------------------------------------------------

def test_cache_for_other_rules_is_refused():
    model = _converted("llama", "liger")
    with pytest.raises(ValueError, match="converted with rules='liger'"):
        StateCache(model, rules="gla")


def test_cache_for_other_rules_fails_when_bound():
    model = tiny_model("llama")
    cache = StateCache(model, rules="gla", max_length=32)  # nothing recorded on the model: checked at compile
    model.compile(backend="linearize", options={"rules": "liger", "inner": "eager"})
    with pytest.raises(Exception, match="built for rules='gla'.*compiled with rules='liger'"):
        prefill(model, _ids(1, 8), cache)


def test_context_past_capacity_is_an_error():
    model = _converted("llama", "gla")
    cache = StateCache(model, max_length=16)
    prefill(model, _ids(1, 12), cache)
    with pytest.raises(RuntimeError, match="capacity of 16 tokens"):
        decode_logits(model, _ids(1, 20), StateCache(model, max_length=16), prompt_len=12)


def test_max_length_past_position_limit_is_refused():
    model = _converted("llama", "gla", max_position_embeddings=64)
    with pytest.raises(ValueError, match="position limit"):
        StateCache(model, max_length=65)
    assert StateCache(model, max_length=65, beyond_position_limit=True).capacity == 65


def test_uncompiled_model_cannot_read_a_state_cache():
    model = tiny_model("llama")
    cache = StateCache(model, rules="liger", max_length=32)
    with pytest.raises(RuntimeError, match="did not rewrite"):
        prefill(model, _ids(1, 8), cache)


def test_decoding_with_a_growing_kv_cache_is_refused():
    """Continuing a linear prefill with softmax over a transformers KV cache would be a different model."""
    model = _converted("llama", "liger")
    with torch.no_grad():
        out = model(_ids(1, 8), past_key_values=DynamicCache(config=model.config), use_cache=True)
        with pytest.raises(Exception, match="StateCache"):
            model(_ids(1, 1), past_key_values=out.past_key_values, use_cache=True)


def test_a_converted_model_past_the_recompile_limit_raises_instead_of_running_softmax():
    """Past Dynamo's recompile limit a frame runs uncompiled, i.e. the original softmax attention: a converted model
    raises with the fix instead; the setting is scoped to its calls, so other compiled code keeps the fallback."""
    model = linearize.convert(tiny_model("llama"), rules="swa", inner="eager")
    other = torch.compile(lambda x: x * 2, backend="eager")
    with torch._dynamo.config.patch(recompile_limit=1, automatic_dynamic_shapes=False), torch.no_grad():
        model(input_ids=torch.ones(1, 8, dtype=torch.long), use_cache=False)
        with pytest.raises(Exception, match="limit") as info:  # a second shape is a second compile
            model(input_ids=torch.ones(1, 12, dtype=torch.long), use_cache=False)
        assert "would run the original softmax attention" in "\n".join(getattr(info.value, "__notes__", []))
        for n in (3, 4, 5):  # no converted model here: Dynamo's own behaviour, eager past the limit
            assert torch.equal(other(torch.ones(n)), torch.full((n,), 2.0))
