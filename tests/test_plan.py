"""`linearize plan` on tiny models: a layer's sensitivity is the KL a direct computation gives, a rewrite that changes
nothing costs nothing, the kept layers are the most sensitive ones, the written rule file loads and decides exactly
those layers, measurements are reused under another budget, and the placements it is compared with are right."""
import json
import math

import pytest
import torch

import linearize
from linearize.cli import main
from linearize.explain import explain
from linearize.generation import converted
from linearize.models import tiny_model
from linearize.planning import (Plan, PlanError, compare, first_last_layers, keep_layers, plan, uniform_layers)
from linearize.rewrite import rules as R

LAYERS = 4
CAL = dict(tokens=128, seq_len=64, progress=False)


def _model():
    return tiny_model("llama", num_hidden_layers=LAYERS)


def _rules(tmp_path, window: int, name="w"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nrules:\n  - rewrite: swa\n    with: {{window: {window}}}\n")
    return str(path)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    model = _model()
    rules = _rules(tmp_path_factory.mktemp("rules"), window=2)
    return model, plan(model, rules=rules, budget=0.5, **CAL)


def test_sensitivity_is_the_kl_of_a_model_with_only_that_layer_rewritten(measured, tmp_path):
    model, p = measured
    assert [c.layer for c in p.layers] == list(range(LAYERS))
    assert all(c.kl > 1e-4 for c in p.layers), [c.kl for c in p.layers]
    layer = max(p.layers, key=lambda c: c.kl).layer
    # the same model written by hand: one rule for that layer, the rest untouched
    hand = tmp_path / "one.yaml"
    hand.write_text(f"name: one\nrules:\n  - where: {{layers: {layer}}}\n    rewrite: swa\n    with: {{window: 2}}\n"
                    "  - rewrite: keep\n")
    from linearize.data import pack, read_corpus

    texts, _ = read_corpus(None)
    rows = pack(texts, None, 64, vocab_size=model.config.vocab_size)[:2]
    with torch.no_grad():
        ref = torch.cat([model(r[None], use_cache=False).logits.log_softmax(-1) for r in rows])
        with converted(model, str(hand)):
            out = torch.cat([model(r[None], use_cache=False).logits.log_softmax(-1) for r in rows])
    kl = torch.nn.functional.kl_div(out, ref, log_target=True, reduction="sum").item() / rows.numel()
    assert math.isclose(p.layers[layer].kl, kl, rel_tol=1e-4), (p.layers[layer].kl, kl)
    assert getattr(model, "_linearize_rules", None) is None and model._compiled_call_impl is None  # left as it was


def test_a_rewrite_that_changes_nothing_costs_nothing(tmp_path):
    p = plan(_model(), rules=_rules(tmp_path, window=4096), budget=0.5, **CAL)  # the window covers every row
    assert all(abs(c.kl) < 1e-6 and abs(c.dnll) < 1e-5 for c in p.layers), [(c.kl, c.dnll) for c in p.layers]


def test_the_most_sensitive_layers_keep_softmax_and_the_file_says_so(measured, tmp_path):
    model, p = measured
    top = sorted(sorted(p.layers, key=lambda c: -c.kl)[:2], key=lambda c: c.layer)
    assert p.keep == [c.layer for c in top] and p.kept_count == 2
    files = p.write(tmp_path / "plan.yaml")
    assert [f.name for f in files] == ["plan.yaml", "plan.json", "plan.png"]
    text = files[0].read_text()
    for c in p.layers:  # every layer's measurement is a comment a person can read
        assert f"{c.kl:11.5f}" in text
    decided = explain(model, torch.arange(1, 9)[None], rules=str(files[0]), use_cache=False)
    assert {s.layer: s.rewrite for s in decided.sites} == {i: "keep" if i in p.keep else "swa" for i in range(LAYERS)}
    assert R.load(str(files[0])).name == p.name


def test_measurements_are_reused_under_another_budget(measured, tmp_path):
    _, p = measured
    p.write(tmp_path / "plan.yaml")
    again = Plan.from_json(tmp_path / "plan.json")
    assert [c.kl for c in again.layers] == [c.kl for c in p.layers]
    ranked = [c.layer for c in sorted(p.layers, key=lambda c: -c.kl)]
    assert again.with_budget(1).keep == ranked[:1]
    assert again.with_budget(0).keep == [] and "\nrules:" not in again.with_budget(0).yaml()
    R.parse(again.with_budget(0).yaml())  # an empty plan is still a rule file: the base everywhere
    with pytest.raises(PlanError, match="share of layers"):
        again.with_budget(1.5)


def test_placements_at_the_same_budget():
    assert uniform_layers(30, 7) == [3, 7, 11, 15, 19, 23, 27]  # every 4th, as Liger-H places every 8th
    assert uniform_layers(32, 4) == [7, 15, 23, 31]
    assert first_last_layers(30, 7) == [0, 1, 2, 3, 27, 28, 29]
    assert first_last_layers(30, 0) == [] and uniform_layers(30, 0) == []
    p = Plan(base="swa", layers=[], budget=0.25)
    p.layers = [linearize.planning.LayerCost(i, "", "swa", {}, kl=float(i % 5), dnll=0.0) for i in range(30)]
    assert p.kept_count == 7  # a budget is never exceeded: 0.25 of 30 layers is 7


def test_compare_measures_the_plan_and_its_rivals(measured, char_tokenizer):
    model, p = measured
    c = compare(model, p, char_tokenizer, lengths=(64,), progress=False)
    names = list(c["rows"])
    assert names[0] == "original" and names[2].startswith("planned") and len(names) == 5
    from linearize.evaluate import perplexity_at

    ids = char_tokenizer(linearize.data.long_document(), return_tensors="pt", add_special_tokens=False).input_ids
    with converted(model, keep_layers(p.base, p.keep)):
        direct = perplexity_at(model, ids, 64)["ppl"]
    assert math.isclose(c["rows"][names[2]]["64"], direct, rel_tol=1e-3)
    assert "placement" in p.yaml()  # the comparison goes into the file's comments


def test_bad_input_is_refused(tmp_path):
    model = _model()
    with pytest.raises(R.RuleError, match="unknown rule set"):
        plan(model, rules="ligr", **CAL)
    with converted(model, "swa"):
        with pytest.raises(PlanError, match="converted already"):
            plan(model, rules="swa", **CAL)
    with pytest.raises(PlanError, match="training mode"):
        plan(model.train(), rules="swa", **CAL)
    model.eval()
    p = Plan(base="swa", layers=[], budget=0.5)
    with pytest.raises(PlanError, match=".yaml"):
        p.write(tmp_path / "plan.txt")
    with pytest.raises(PlanError, match="not a plan"):
        Plan.from_json(tmp_path / "missing.json")


def test_cli_writes_the_plan_and_reuses_it(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert main(["plan", "--model", "tiny-llama", "--rules", "swa", "--budget", "1", "--out", str(out),
                 "--tokens", "128", "--seq-len", "64"]) == 0
    assert "softmax kept in layers" in capsys.readouterr().out
    keep = json.loads(out.with_suffix(".json").read_text())["keep"]
    assert len(keep) == 1 and R.load(str(out)).rules[0].layers.resolve(2) == set(keep)
    assert main(["plan", "--from", str(out.with_suffix(".json")), "--budget", "0", "--out",
                 str(tmp_path / "q.yaml")]) == 0
    assert main(["plan", "--model", "tiny-llama", "--rules", "swa", "--budget", "2.5", "--out", str(out)]) == 2
    assert "share of layers" in capsys.readouterr().err
