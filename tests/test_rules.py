"""Rule sets: built-ins load, decisions follow the first matching rule, bad files give located, helpful errors."""
import pytest

import linearize
from linearize.cli import main
from linearize.models import tiny_model
from linearize.rewrite.rules import RuleError, available, load, parse


def test_builtin_rule_sets():
    assert set(available()) >= {"liger", "gla", "swa", "exact", "keep"}
    liger = load("liger")
    (rule,) = liger.rules
    assert rule.rewrite == "liger"
    assert rule.params["window"] == 64 and rule.params["gate_normalizer"] == 16.0
    assert rule.params["mix"] == [0.5, 0.5] and rule.params["normalize"] is False
    assert load(None).name == "liger"  # the default recipe


def test_first_matching_rule_decides_per_layer():
    model = tiny_model("llama", num_hidden_layers=3)
    import torch

    rules = parse("""
rules:
  - where: {layers: "0, 2"}
    rewrite: keep
  - rewrite: gla
    with: {chunk_size: 32}
""")
    report = linearize.explain(model, torch.randint(0, 128, (1, 20)), rules=rules)
    assert [s.rewrite for s in report.sites] == ["keep", "gla", "keep"]
    assert report.sites[1].params["chunk_size"] == 32
    assert report.sites[0].rule.endswith("rule 1") and report.sites[1].rule.endswith("rule 2")


@pytest.mark.parametrize("text, message", [
    ("rules: [{rewrite: liger, with: {windw: 32}}]", "did you mean 'window'"),
    ("rules: [{rewrite: lyger}]", "did you mean 'liger'"),
    ("rules: [{rewrite: swa, with: {window: 0}}]", "window: must be at least 1"),
    ("rules: [{rewrite: swa, with: {window: sixty}}]", "expected an integer"),
    ("rules: [{rewrite: gla, with: {chunk_size: 40}}]", "multiple of 16"),
    ("rules: [{rewrite: gla, with: {feature_map: tanh}}]", "not one of"),
    ("rules: [{rewrite: liger, with: {mix: [1]}}]", "list of 2 numbers"),
    ("rules: [{rewrite: gla, wher: {layers: 1}}]", "did you mean 'where'"),
    ("rules: [{rewrite: gla, where: {layers: 3-1}}]", "bad layer selector"),
    ("rules: []", "non-empty list"),
    ("rules: [{rewrite: gla}\n", "not valid YAML"),
    ("!!python/object/apply:os.system ['echo owned']", "not valid YAML"),
    ("- just a list", "mapping"),
])
def test_bad_rule_files_name_the_file_and_the_fix(text, message):
    with pytest.raises(RuleError, match=message) as info:
        parse(text, "my_rules.yaml")
    assert str(info.value).startswith("my_rules.yaml")


def test_unknown_rule_set_name():
    with pytest.raises(RuleError, match="built-in rule sets: exact, gla, keep, liger, swa"):
        load("nope")


def test_cli_rules(tmp_path, capsys):
    assert main(["rules", "list"]) == 0
    assert "liger" in capsys.readouterr().out
    assert main(["rules", "show", "liger"]) == 0
    assert "logsigmoid" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [{rewrite: swa, with: {windo: 3}}]\n")
    assert main(["rules", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "did you mean 'window'" in err and "Traceback" not in err
    good = tmp_path / "good.yaml"
    good.write_text("rules: [{rewrite: swa, with: {window: 3}}]\n")
    assert main(["rules", "check", str(good)]) == 0
