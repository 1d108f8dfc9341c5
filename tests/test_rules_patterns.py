"""A pattern written in a rule file matches an attention shape the built-in library does not know, and the `exact`
rewrite of it reproduces the module."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import linearize
from linearize.patterns.expr import Cap, Lit, Op
from linearize.rewrite.diagnostics import Mark
from linearize.rewrite.pattern_text import parse_expression
from linearize.rewrite.rules import RuleError, load, parse

RULES = Path(__file__).parent / "rules_data" / "exp_normalised.yaml"


class ExpNormAttention(nn.Module):
    """Causal attention with softmax written out as exp / sum: there is no softmax op for the library to anchor on."""

    def __init__(self, dim=32, heads=4, max_len=64):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)
        self.register_buffer("hide", torch.ones(max_len, max_len, dtype=torch.bool).triu(1), persistent=False)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-2, -1) * self.d ** -0.5).masked_fill(self.hide[:T, :T], float("-inf"))
        e = torch.exp(s - s.amax(-1, keepdim=True))
        p = e / e.sum(-1, keepdim=True)
        return self.o((p @ v).transpose(1, 2).reshape(B, T, -1))


class Net(nn.Module):
    def __init__(self, layers=2):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.layers = nn.ModuleList([ExpNormAttention() for _ in range(layers)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_expression_text_becomes_the_matchers_tree():
    tree = parse_expression("matmul(softmax(mul(matmul($q, transpose($k, -2, -1)), $scale), dim=-1), $v)",
                            Mark("t.yaml", 1, 1))
    want = Op("matmul", Op("softmax", Op("mul", Op("matmul", Cap("q"), Op("transpose", Cap("k"), -2, -1)),
                                         Cap("scale")), dim=-1), Cap("v"))
    assert tree == want
    sugar = parse_expression("softmax($q @ transpose($k, -2, -1) * $scale, dim=-1) @ $v", Mark("t.yaml", 1, 1))
    assert sugar == want
    assert parse_expression("masked_fill($q, $mask, -inf)", Mark("t")) == Op("masked_fill", Cap("q"), Cap("mask"),
                                                                         Lit(float("-inf")))


def test_builtin_library_does_not_know_the_shape():
    net = Net().eval()
    with pytest.warns(UserWarning, match="no softmax attention found"):
        report = linearize.explain(net, torch.randn(2, 20, 32), rules="keep")
    assert report.sites == []


def test_user_pattern_matches_and_exact_reproduces_the_module():
    rs = load(RULES)
    assert set(rs.patterns) == {"exp_normalised"} and rs.warnings == []
    net = Net().eval()
    x = torch.randn(2, 20, 32, generator=torch.Generator().manual_seed(1))
    report = linearize.explain(net, x, rules=RULES)
    assert [(s.pattern, s.layer, s.rewrite) for s in report.sites] == [("exp_normalised", 0, "exact"),
                                                                        ("exp_normalised", 1, "exact")]
    site = report.sites[0]
    assert site.scale == pytest.approx(8 ** -0.5) and site.attn_mask is not None
    assert site.shape == (2, 4, 4, 20, 20, 8, 8)
    with torch.no_grad():
        ref = net(x)
        for inner in ("eager", "inductor"):
            torch._dynamo.reset()
            out = torch.compile(net, backend="linearize", options={"rules": str(RULES), "inner": inner})(x)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_user_pattern_training_gradients_match():
    net = Net().train()
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(2))
    seen = []
    compiled = torch.compile(net, backend="linearize", options={"rules": str(RULES), "inner": "aot_eager",
                                                                "record": lambda ctx: seen.extend(ctx.sites)})
    got = torch.autograd.grad(compiled(x).square().sum(), list(net.parameters()))
    assert [s.rewrite for s in seen] == ["exact", "exact"]
    want = torch.autograd.grad(net(x).square().sum(), list(net.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_pattern_constraints_select_sites():
    """A pattern's `where:` constraint that fails leaves the shape unmatched."""
    text = RULES.read_text().replace('    expr: "($e', '    where: "head_dim == 64"\n    expr: "($e')
    rs = parse(text, "constrained.yaml")
    net = Net().eval()
    with pytest.warns(UserWarning, match="no softmax attention found"):
        report = linearize.explain(net, torch.randn(1, 8, 32), rules=rs)
    assert report.sites == []


def test_a_wrong_pattern_does_not_match():
    """Without the mask the expression is not what the module computes: nothing matches."""
    text = RULES.read_text().replace('masked_fill($q @ transpose($k, -2, -1) * $scale, $mask, -inf)',
                                     '$q @ transpose($k, -2, -1) * $scale')
    rs = parse(text, "nomask.yaml")
    with pytest.warns(UserWarning, match="no softmax attention found"):
        report = linearize.explain(Net().eval(), torch.randn(1, 8, 32), rules=rs)
    assert report.sites == []


def test_let_names_cannot_shadow_captures():
    with pytest.raises(RuleError, match="shadows the capture `\\$q`"):
        parse('patterns:\n  p:\n    let: {q: "exp($k)"}\n    expr: "matmul($q, $v)"\nrules: [{match: p, rewrite: exact}]\n')
