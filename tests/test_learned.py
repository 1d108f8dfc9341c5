"""Learned recipe parameters (`learn: [mix]`): parameters of the model, bound into the rewritten graph."""
from __future__ import annotations

import pytest
import torch

import linearize
from linearize.generation import StateCache, converted, decode_logits
from linearize.generation.convert import install_learned, learned_parameters, load_learned
from linearize.models import tiny_model
from linearize.passes.bind_learned import LearnedParameterError
from linearize.rewrite.rules import RuleError, load

CONSTANT = "rules:\n  - rewrite: liger\n    with: {window: 8, sinks: 2, mix: [0.7, 0.3]}\n"
LEARNED = "rules:\n  - rewrite: liger\n    with: {window: 8, sinks: 2, mix: [0.7, 0.3], learn: [mix]}\n"


@pytest.fixture
def rules(tmp_path):
    (tmp_path / "constant.yaml").write_text(CONSTANT)
    (tmp_path / "learned.yaml").write_text(LEARNED)
    return str(tmp_path / "constant.yaml"), str(tmp_path / "learned.yaml")


def _ids(T=24, seed=0):
    return torch.randint(3, 128, (2, T), generator=torch.Generator().manual_seed(seed))


def _randomise(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in learned_parameters(model).values():
            p.copy_(torch.rand(p.shape, generator=g) * 1.5)


def test_fresh_parameters_compute_what_the_constant_rule_computes(rules):
    constant, learned = rules
    ids = _ids()
    with torch.no_grad(), converted(tiny_model("llama"), constant) as m:
        ref = m(input_ids=ids).logits
    model = linearize.convert(tiny_model("llama"), rules=learned)
    params = learned_parameters(model)
    assert sorted(params) == [f"model.layers.{i}.self_attn.linearize_learned.mix" for i in range(2)]
    for p in params.values():  # [window, linear] per query head, from the rule's constant
        torch.testing.assert_close(p.detach(), torch.tensor([[0.7] * 4, [0.3] * 4]))
    with torch.no_grad():
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_gradient_matches_finite_differences_and_new_values_need_no_recompile(rules):
    _, learned = rules
    model = linearize.convert(tiny_model("llama", dtype=torch.float64), rules=learned)
    _randomise(model)
    ids = _ids()
    p = learned_parameters(model)["model.layers.1.self_attn.linearize_learned.mix"]

    def loss():  # in float64 end to end (transformers' own loss upcasts to float32 only)
        logits = model(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    loss().backward()
    grads = {n: q.grad for n, q in learned_parameters(model).items()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads
    with torch.no_grad():  # central differences; the step is measured, as the parameter is float32
        loss()
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # the no-grad graph is compiled now
        for idx in [(0, 1), (1, 3)]:
            start = p[idx].item()
            p[idx] = start + 1e-3
            up, hi = loss().item(), p[idx].item()
            p[idx] = start - 1e-3
            down, lo = loss().item(), p[idx].item()
            p[idx] = start
            assert (up - down) / (hi - lo) == pytest.approx(p.grad[idx].item(), rel=1e-3, abs=1e-8)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # values are inputs, not constants


def test_parameters_are_in_state_dict_and_bound_again_after_a_recompile(rules):
    _, learned = rules
    model = linearize.convert(tiny_model("llama"), rules=learned)
    names = set(learned_parameters(model))
    assert names <= set(dict(model.named_parameters())) and names <= set(model.state_dict())
    for T in (24, 40):  # a second length compiles again: the same parameters must receive the gradient
        model.zero_grad()
        model(input_ids=_ids(T), labels=_ids(T)).loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned_parameters(model).values())
    install_learned(model, learned)  # converting again keeps trained values and objects
    assert set(learned_parameters(model)) == names


def test_compiling_without_convert_is_refused_and_explain_shows_the_start(rules):
    _, learned = rules
    model = tiny_model("llama")
    compiled = torch.compile(model, backend="linearize", options={"rules": learned})
    with pytest.raises(Exception, match="carries no model.layers.0.self_attn.linearize_learned.mix"):
        compiled(input_ids=_ids())
    torch._dynamo.reset()
    report = linearize.explain(tiny_model("llama"), input_ids=_ids(), rules=learned)
    assert [s.rewrite for s in report.sites] == ["liger", "liger"]


def test_a_parameter_of_another_shape_is_refused(rules):
    _, learned = rules
    model = linearize.convert(tiny_model("llama"), rules=learned)
    bigger = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    state = {k: v.detach() for k, v in learned_parameters(model).items()}
    with pytest.raises(LearnedParameterError, match=r"has shape \[2, 4\], the model needs \[2, 8\]"):
        load_learned(bigger, learned, state, "saved.safetensors")
    with pytest.raises(LearnedParameterError, match="missing"):
        load_learned(tiny_model("llama"), learned, {}, "saved.safetensors")


def test_decoding_with_learned_mix_equals_the_full_forward(rules):
    _, learned = rules
    model = linearize.convert(tiny_model("llama"), rules=learned)
    _randomise(model)
    ids = _ids(40)[:1]
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
    out = decode_logits(model, ids, StateCache(model, max_length=48), prompt_len=25)
    assert (out - ref).abs().max().item() <= 1e-4


def test_checkpoint_round_trip_keeps_trained_values(rules, tmp_path):
    _, learned = rules
    model = linearize.convert(tiny_model("llama"), rules=learned)
    _randomise(model)
    with torch.no_grad():
        ref = model(input_ids=_ids()).logits
    linearize.save_pretrained(model, tmp_path / "ckpt")
    torch._dynamo.reset()
    back = linearize.from_pretrained(tmp_path / "ckpt")
    for name, p in learned_parameters(model).items():
        torch.testing.assert_close(learned_parameters(back)[name], p)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=_ids()).logits, ref, rtol=1e-5, atol=1e-5)


def test_temporary_conversion_leaves_no_values_for_the_next_rule_set(rules, tmp_path):
    _, learned = rules
    other = tmp_path / "other.yaml"
    other.write_text(LEARNED.replace("mix: [0.7, 0.3]", "mix: [0.2, 0.9]"))
    model = tiny_model("llama")
    with converted(model, learned):
        _randomise(model)
    assert learned_parameters(model) == {} and "linearize_learned" not in str(model.state_dict().keys())
    with converted(model, str(other)):
        for p in learned_parameters(model).values():
            torch.testing.assert_close(p.detach(), torch.tensor([[0.2] * 4, [0.9] * 4]))


def test_rules_name_what_can_be_learned(tmp_path):
    assert load("liger").rules[0].params["learn"] == []
    f = tmp_path / "mix.yaml"
    f.write_text("rules:\n  - rewrite: liger\n    with: {mix: learnable}\n")
    assert load(f).rules[0].params["learn"] == ["mix"]
    f.write_text("rules:\n  - rewrite: liger\n    with: {learn: [window]}\n")
    with pytest.raises(RuleError, match="'window' cannot be learned in liger; learnable: mix"):
        load(f)
    f.write_text("rules:\n  - rewrite: swa\n    with: {window: learnable}\n")
    with pytest.raises(RuleError, match="`window` of `swa` cannot be learned"):
        load(f)


HEDGEHOG = "rules:\n  - rewrite: lolcats\n    with: {window: 8, sinks: 2, feature_map: hedgehog%s}\n"


def test_lolcats_learns_its_feature_map_from_the_identity(tmp_path):
    """`learn: [feature_map]`: a [D, D] projection per query head, then per key head, before Hedgehog's feature map
    (LoLCATs); fresh ones are the identity and compute the constant rule, trained ones change the linear part, reach
    gradients, and decode as the full forward does."""
    (tmp_path / "constant.yaml").write_text(HEDGEHOG % "")
    (tmp_path / "learned.yaml").write_text(HEDGEHOG % ", learn: [feature_map]")
    ids = _ids(40)
    with torch.no_grad(), converted(tiny_model("llama"), str(tmp_path / "constant.yaml")) as m:
        ref = m(input_ids=ids).logits
    model = linearize.convert(tiny_model("llama"), rules=str(tmp_path / "learned.yaml"))
    params = learned_parameters(model)
    assert sorted(params) == [f"model.layers.{i}.self_attn.linearize_learned.feature_map" for i in range(2)]
    for p in params.values():  # 4 query heads, then 2 key heads, head dimension 16
        torch.testing.assert_close(p.detach(), torch.eye(16).expand(6, 16, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    out = model(input_ids=ids).logits
    assert (out - ref).abs().max().item() > 1e-3  # the projections are used
    out.square().mean().backward()
    for p in params.values():
        assert p.grad is not None and p.grad.abs().sum().item() > 0

    one = ids[:1]
    with torch.no_grad():
        full = model(input_ids=one, use_cache=False).logits
    steps = decode_logits(model, one, StateCache(model, max_length=48), prompt_len=25)
    assert (steps - full).abs().max().item() <= 1e-4
    assert load(tmp_path / "learned.yaml").rules[0].params["learn"] == ["feature_map"]
