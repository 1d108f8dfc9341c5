"""Rule files: the language (selectors, formulas, extends/include, patterns), located errors and warnings, the CLI,
and a corpus of malformed files that must each give one located paragraph, exit code 2 and no traceback."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import linearize
from linearize.cli import main
from linearize.models import tiny_model
from linearize.rewrite.diagnostics import Mark
from linearize.rewrite.rules import RuleError, RuleSet, available, load, parse
from linearize.rewrite.selectors import parse_layers
from linearize.rewrite.shape_expr import parse as parse_expr

CORPUS = Path(__file__).parent / "rules_corpus"
CORPUS_FILES = sorted(CORPUS.glob("*.yaml"))
RECIPES = {"liger", "liger-sinks", "liger-sinks-256", "liger-hybrid", "gla", "swa", "exact", "keep", "retnet", "mamba2", "hgrn2", "lolcats"}


def _site(layer=0, path=None, causal=True, shape=(1, 4, 2, 32, 32, 16, 16), gqa=2, pattern="sdpa"):
    return SimpleNamespace(layer=layer, module_path=path or f"model.layers.{layer}.self_attn", is_causal=causal,
                           shape=shape, gqa_groups=gqa, pattern=pattern, node=None)


# ------------------------------------------------------------------------------------------------ recipes
def test_builtin_recipes_load_without_warnings_and_cite_their_paper():
    assert set(available()) >= RECIPES
    for name in RECIPES:
        rs = load(name)
        assert rs.rules and rs.description and rs.warnings == [], name
        header = [line for line in (Path(linearize.__file__).parent / "rules" / f"{name}.yaml").read_text()
                  .splitlines() if line.startswith("#")]
        assert header, f"{name}.yaml has no comment saying which result it follows"
    liger = load("liger")
    (rule,) = liger.rules
    assert rule.rewrite == "liger" and rule.params["window"] == 64 and rule.params["gate_normalizer"] == 16.0
    assert rule.params["mix"] == [0.5, 0.5] and rule.params["normalize"] is False
    default = load(None)  # the default recipe, chosen by zero-shot measurement (docs/rule-files.md)
    (rule,) = default.rules
    assert default.name == "liger-sinks-256" and rule.rewrite == "liger" and rule.params["sinks"] == 4
    assert rule.params["window"] == 256
    assert rule.params["mix"] == [0.9, 0.1] and rule.params["normalize"] is True


def test_recipe_parameters():
    hybrid = load("liger-hybrid")
    assert [r.rewrite for r in hybrid.rules] == ["keep", "liger"]
    assert hybrid.rules[0].where.layers.resolve(30) == {7, 15, 23}
    assert load("retnet").rules[0].params["gate"] == "retnet"
    assert load("mamba2").rules[0].params["gate"] == "mamba2"
    hgrn2 = load("hgrn2").rules[0]
    assert hgrn2.params["gate"] == "hgrn2" and "gate_lower_bound" in hgrn2.formulas
    lolcats = load("lolcats").rules[0]
    assert lolcats.rewrite == "lolcats" and lolcats.params == {"window": 64, "sinks": 0, "feature_map": "hedgehog",
                                                                "learn": []}


# ------------------------------------------------------------------------------------------------ selectors
@pytest.mark.parametrize("spec, n, want", [
    ("0-3, 28-29", 30, {0, 1, 2, 3, 28, 29}),
    (-1, 30, {29}),
    ("-3..-1", 30, {27, 28, 29}),
    ("-3--1", 30, {27, 28, 29}),
    ("3..-1", 5, {3, 4}),
    ([0, "-1"], 4, {0, 3}),
    ({"every": 4}, 10, {0, 4, 8}),
    ({"every": 8, "offset": 7}, 30, {7, 15, 23}),
    ({"every": 2, "from": 1, "to": 6}, 30, {1, 3, 5}),
    ("every 4 from 1", 10, {1, 5, 9}),
    ("40", 30, set()),  # a layer past the end selects nothing in a shallower model
])
def test_layer_selectors(spec, n, want):
    assert parse_layers(spec, Mark("t.yaml", 1, 1)).resolve(n) == want


def test_where_conditions_all_hold():
    rs = parse("""
rules:
  - where: {module: "model.layers.*.self_attn", causal: true, head_dim: [16, 64], gqa: 2,
            shape: ["head_dim % 16 == 0", "seq_len >= 2 * 16"]}
    rewrite: gla
  - rewrite: keep
""")
    gla, keep = rs.rules
    assert gla.selects(_site()) is None
    assert "causal" in gla.selects(_site(causal=False))
    assert "module" in gla.selects(_site(path="encoder.block.0.attn"))
    assert "gqa" in gla.selects(_site(gqa=1))
    assert "head_dim" in gla.selects(_site(shape=(1, 4, 2, 32, 32, 24, 24)))
    assert "seq_len >= 2 * 16" in gla.selects(_site(shape=(1, 4, 2, 31, 31, 16, 16)))
    assert rs.decide(_site(shape=(1, 4, 2, 8, 8, 16, 16))) is keep


def test_shape_expressions_are_sympy_and_decide_symbolic_dims_with_a_guard():
    c = parse_expr("head_dim % 16 == 0 and 3 < gqa <= 8", Mark("t.yaml", 2, 3), boolean=True)
    assert c.evaluate({"head_dim": 64, "gqa": 4}) is True
    assert c.evaluate({"head_dim": 40, "gqa": 4}) is False
    f = parse_expr("min(64, seq_len // 2) + layer / num_layers", Mark("t.yaml", 2, 3), boolean=False)
    assert f.evaluate({"seq_len": 100, "layer": 3, "num_layers": 4}) == pytest.approx(50.75)
    # a dynamic (SymInt) dimension: decided by the ShapeEnv, which records the guard
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    env = ShapeEnv()
    seq = env.create_symintnode(env.create_symbol(40, source=ConstantSource("seq"),
                                                  dynamic_dim=DimDynamic.DYNAMIC), hint=40)
    assert parse_expr("seq_len >= 32", Mark("t"), True).evaluate({"seq_len": seq}) is True
    assert any(">= 32" in str(g.expr) for g in env.guards)


def test_first_matching_rule_decides_per_layer_and_formulas_per_site():
    model = tiny_model("llama", num_hidden_layers=4)
    rules = parse("""
rules:
  - where: {layers: "0, -1"}
    rewrite: keep
  - name: gated
    rewrite: gla
    with:
      chunk_size: 32
      gate: hgrn2
      gate_lower_bound: "layer / num_layers"
""", "per_layer.yaml")
    report = linearize.explain(model, torch.randint(0, 128, (1, 20)), rules=rules)
    assert [s.rewrite for s in report.sites] == ["keep", "gla", "gla", "keep"]
    assert [s.params.get("gate_lower_bound") for s in report.sites[1:3]] == [0.25, 0.5]
    assert report.sites[1].params["chunk_size"] == 32
    assert report.sites[0].rule.endswith("rule 1") and report.sites[1].rule.endswith("rule 2")
    assert report.sites[1].rule.startswith("per_layer.yaml:5:5")


def test_formula_out_of_range_at_a_site_is_a_located_error():
    rules = parse("rules:\n  - rewrite: gla\n    with:\n      gate: hgrn2\n      gate_lower_bound: \"layer / 2\"\n",
                  "f.yaml")
    assert rules.decide(_site(layer=1)).params["gate_lower_bound"] == 0.5
    with pytest.raises(RuleError, match=r"^f\.yaml:5:25: .*gives 1 at layer 2"):
        rules.decide(_site(layer=2))


# ------------------------------------------------------------------------------------------------ composition
def test_extends_puts_own_rules_first(tmp_path):
    (tmp_path / "base.yaml").write_text("rules:\n  - rewrite: swa\n    with: {window: 8}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nrules:\n  - where: {layers: 0}\n    rewrite: keep\n")
    rs = load(tmp_path / "child.yaml")
    assert [(r.rewrite, r.mark.source.endswith(name)) for r, name in zip(rs.rules, ("child.yaml", "base.yaml"))] \
        == [("keep", True), ("swa", True)]
    assert rs.decide(_site(layer=0)).rewrite == "keep" and rs.decide(_site(layer=3)).params["window"] == 8


def test_include_splices_rules_and_imports_patterns(tmp_path):
    (tmp_path / "lib.yaml").write_text(
        'patterns:\n  plain: "matmul(softmax(matmul($q, transpose($k, -2, -1)), dim=-1), $v)"\n')
    (tmp_path / "edges.yaml").write_text('rules:\n  - where: {layers: "0, -1"}\n    rewrite: keep\n')
    main_file = tmp_path / "main.yaml"
    main_file.write_text("include: [lib.yaml]\nrules:\n  - include: edges.yaml\n  - match: plain\n    rewrite: exact\n"
                         "  - rewrite: gla\n")
    rs = load(main_file)
    assert [r.rewrite for r in rs.rules] == ["keep", "exact", "gla"] and set(rs.patterns) == {"plain"}
    assert load(tmp_path / "lib.yaml").warnings  # a pattern library alone: usable, with a note


def test_include_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\nrules: [{where: {layers: 0}, rewrite: keep}]\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nrules: [{where: {layers: 1}, rewrite: keep}]\n")
    with pytest.raises(RuleError, match="cycle: a.yaml -> b.yaml -> a.yaml"):
        load(tmp_path / "a.yaml")


# ------------------------------------------------------------------------------------------------ diagnostics
@pytest.mark.parametrize("text, message, line, column", [
    ("rules: [{rewrite: liger, with: {windw: 32}}]", "did you mean `window`?", 1, 33),
    ("rules:\n  - rewrite: lyger\n", "did you mean `liger`?", 2, 14),
    ("rules:\n  - rewrite: swa\n    with: {window: 0}\n", "bad `window`: must be at least 1", 3, 20),
    ("rules:\n  - where: {shape: \"hed_dim == 64\"}\n    rewrite: gla\n", "did you mean `head_dim`?", 2, 21),
    ("rules:\n- where:\n    layers: \"2, 9-4\"\n  rewrite: keep\n- rewrite: gla\n", "ends before it starts", 3, 17),
])
def test_errors_name_file_line_column_and_fix(text, message, line, column):
    with pytest.raises(RuleError) as info:
        parse(text, "my_rules.yaml")
    err = info.value
    assert message in str(err) and (err.source, err.line, err.column) == ("my_rules.yaml", line, column)
    assert str(err).startswith(f"my_rules.yaml:{line}:{column}: ")


def test_warnings_are_located_and_do_not_stop_the_file(tmp_path, capsys):
    text = ("rules:\n  - where: {causal: false}\n    rewrite: gla\n  - rewrite: gla\n"
            "    with: {gate: logsigmoid, decay: 0.9}\n")
    rs = parse(text, "w.yaml")
    messages = [str(w) for w in rs.warnings]
    assert any(m.startswith("w.yaml:3:14:") and "non-causal" in m for m in messages)
    assert any(m.startswith("w.yaml:5:30:") and "`decay` has no effect with `gate: logsigmoid`" in m
               for m in messages)
    path = tmp_path / "w.yaml"
    path.write_text(text)
    assert main(["rules", "check", str(path)]) == 0
    assert main(["rules", "check", "--strict", str(path)]) == 1
    assert "warning:" in capsys.readouterr().err


def test_unknown_rule_set_name():
    with pytest.raises(RuleError, match="did you mean `liger`?"):
        load("lgier")
    with pytest.raises(RuleError, match="built-in rule sets: exact, gla, hgrn2, keep, liger, liger-hybrid"):
        load("nope")


def test_backend_reports_a_bad_rule_set_name():
    with pytest.raises(Exception, match="did you mean `swa`"):
        torch.compile(tiny_model("llama", num_hidden_layers=1), backend="linearize",
                      options={"rules": "sw", "inner": "eager"})(torch.randint(0, 128, (1, 4)))


# ------------------------------------------------------------------------------------------------ CLI
def test_cli_list_show_check(tmp_path, capsys):
    assert main(["rules", "list"]) == 0
    out = capsys.readouterr().out
    assert all(re.search(rf"^{re.escape(name)}\s", out, re.M) for name in RECIPES)
    assert main(["rules", "show", "liger"]) == 0
    assert "logsigmoid" in capsys.readouterr().out
    assert main(["rules", "show", "lgier"]) == 2
    assert "did you mean `liger`?" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text("rules:\n  - where: {layers: \"0-1\"}\n    rewrite: keep\n  - rewrite: swa\n    with: {window: 3}\n")
    assert main(["rules", "check", str(good)]) == 0
    out = capsys.readouterr().out
    assert "valid, 2 rule(s)" in out and "-> swa (window=3, sinks=0)" in out
    for name in RECIPES:
        assert main(["rules", "check", name]) == 0, name


# ------------------------------------------------------------------------------------------------ corpus
def test_corpus_is_large_enough():
    assert len(CORPUS_FILES) >= 40


def _expected(path: Path):
    first = path.read_text().splitlines()[0]
    m = re.fullmatch(r"# expect: (.*) @ line (\d+)", first)
    assert m, f"{path.name}: first line must be `# expect: <text> @ line <n>`"
    return m.group(1), int(m.group(2))


@pytest.mark.parametrize("path", CORPUS_FILES, ids=[p.stem for p in CORPUS_FILES])
def test_malformed_file_gives_one_located_paragraph_and_exit_2(path, capsys):
    message, line = _expected(path)
    assert main(["rules", "check", str(path)]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert captured.out == ""
    assert "Traceback" not in err and err.count("\n") == 1, err  # one paragraph, one line
    assert err.startswith(f"error: {path}:{line}:"), err
    assert message in err, err
    # the same error through the API, with its position as data
    with pytest.raises(RuleError) as info:
        load(path)
    assert info.value.line == line and info.value.source == str(path)


def test_real_cli_process_prints_no_traceback():
    """The installed entry point, as a user runs it (one process for several files keeps it quick)."""
    files = [CORPUS / "tag_python_object_apply.yaml", CORPUS / "syntax_tab_indent.yaml",
             CORPUS / "expr_code_injection.yaml"]
    script = ("import sys\nfrom linearize.cli import main\n"
              "sys.exit(max(main(['rules', 'check', f]) for f in sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", script, *map(str, files)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("error: ") == 3
    assert "owned" not in proc.stdout
