"""The explain report on tiny models: site facts (source line, rule line, provenance), near-misses with reasons,
graph breaks (inside / outside attention), numerics, DOT, the HTML file, the per-pass debug dump, the CLI."""
from __future__ import annotations

import linecache
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import linearize
from linearize.models import tiny_model
from attention_shapes import BrokenAttention
from linearize.passes import DEFAULT_PIPELINE
from linearize.report.draw import dot_available, render_svg
from linearize.report.views import unmatched_views

needs_dot = pytest.mark.skipif(dot_available() is None, reason="Graphviz `dot` not installed (apt-get install "
                                                               "graphviz; .ci/run installs it)")


def _ids(model, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (1, T), generator=g)


@pytest.fixture(scope="module")
def llama_report():
    torch._dynamo.reset()
    model = tiny_model("llama")
    return linearize.explain(model, _ids(model), rules="liger", numerics=True)


# ----- site facts -----------------------------------------------------------------------------------------------

def test_every_site_names_its_source_line_rule_line_and_provenance(llama_report):
    views = llama_report.site_views()
    assert [v.site.layer for v in views] == [0, 1]
    for v in views:
        src = v.module_source
        # the line in LlamaAttention.forward that calls the attention function, not a line in torch
        assert src is not None and src.file.endswith("models/llama/modeling_llama.py"), src
        assert src.function == "forward"
        assert linecache.getline(src.file, src.line).strip() == src.code and "attention" in src.code
        assert v.source.file.endswith("sdpa_attention.py")  # the innermost frame: the SDPA call itself
        m = re.fullmatch(r"(.*liger\.yaml):(\d+) \(rule 1\)", v.rule_where)
        assert m, v.rule_where
        rule_file = Path(linearize.__file__).parent / "rules" / "liger.yaml"
        line = rule_file.read_text().splitlines()[int(m.group(2)) - 1]
        assert line.lstrip().startswith("- "), f"line {m.group(2)} of liger.yaml is not the rule: {line!r}"
        assert v.site.provenance.k_proj_path in v.provenance_text and "rotate_half" in v.provenance_text
        d = v.to_dict()
        assert d["source"] == src.where() and d["rule_location"] == v.rule_where
        assert d["original_output"] == v.site.matched_nodes[-1].name
    text = str(llama_report)
    assert "modeling_llama.py:" in text and "liger.yaml:" in text


# ----- near-misses ----------------------------------------------------------------------------------------------

class TwoAttentions(nn.Module):
    """A normal multi-head SDPA, then a variant no pattern can take: heads grouped in a 5-D layout."""

    def __init__(self, d=32, h=4):
        super().__init__()
        self.h = h
        self.qkv = nn.Linear(d, 3 * d)
        self.qkv5 = nn.Linear(d, 3 * d)

    def forward(self, x):
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)
        q, k, v = self.qkv5(y).view(B, T, 3, 2, self.h // 2, d // self.h).permute(2, 0, 3, 4, 1, 5)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, 2, h/2, T, D]: grouped heads
        return z.permute(0, 3, 1, 2, 4).reshape(B, T, d)


@pytest.fixture(scope="module")
def near_miss_report():
    torch._dynamo.reset()
    torch.manual_seed(0)
    return linearize.explain(TwoAttentions().eval(), torch.randn(1, 8, 32), rules="liger")


def test_unmatched_attention_variant_is_reported_as_a_near_miss_with_its_reason(near_miss_report, tmp_path):
    report = near_miss_report
    assert len(report.sites) == 1
    (u,) = report.unmatched
    assert report.near_misses == [u]
    (view,) = unmatched_views(report)
    assert view.pattern == "sdpa" and view.near_miss
    assert view.source_text.endswith(f"test_report.py:{TwoAttentions.forward.__code__.co_firstlineno + 5}")
    reason = u.reason
    assert reason and "4-D" in reason
    text = str(report)
    assert f"near-miss (sdpa): {u.node}" in text and reason in text
    d = report.to_dict()
    assert d["unmatched"][0]["near_miss"] is True and d["unmatched"][0]["pattern"] == "sdpa"

    html = Path(report.write_html(tmp_path / "r.html")).read_text()
    row = re.search(r'<tr id="row-unmatched-0"[^>]*data-near-miss="1">(.*?)</tr>', html, re.S)
    assert row and "near-miss" in row.group(1) and "sdpa" in row.group(1)
    import html as htmlmod

    assert htmlmod.escape(view.reason_text) in row.group(1) and reason.endswith(view.reason_text)
    assert 'id="unmatched-0"' in html  # its own section, with a drawing of the partial match
    if dot_available():
        section = html[html.index('id="unmatched-0"'):]
        section = section[: section.index("</section>")]
        assert "<svg" in section and "node partial" in section


def test_near_miss_fields_from_the_pattern_library_are_shown(near_miss_report, tmp_path):
    """The agreed shape: `Unmatched.pattern` (name) and `Unmatched.partial` (node names the pattern covered before it
    failed). The report prefers them to the reason's `NAME: ` prefix and highlights the partial nodes."""
    import copy

    report = copy.copy(near_miss_report)
    ctx = copy.copy(report.contexts[0])
    (u,) = ctx.unmatched
    site_q = near_miss_report.sites[0]
    u2 = copy.copy(u)
    u2.pattern, u2.partial = "grouped_heads", [u.node, "permute_2"]
    u2.reason = "heads are grouped in a 5-D layout"
    ctx.unmatched = [u2]
    report.contexts = [ctx]
    (view,) = unmatched_views(report)
    assert view.near_miss and view.pattern == "grouped_heads" and view.partial == [u.node, "permute_2"]
    assert view.reason_text == "heads are grouped in a 5-D layout"
    text = str(report)
    assert "near-miss (grouped_heads)" in text and "matched partly: z, permute_2" in text
    html = Path(report.write_html(tmp_path / "partial.html")).read_text()
    assert "near-miss: <b>grouped_heads</b>" in html and "<code>z, permute_2</code>" in html
    if dot_available():
        section = html[html.index('id="unmatched-0"'):]
        section = section[: section.index("</section>")]
        assert section.count("node partial") >= 2
    assert site_q.rewrite == "liger"


def test_a_softmax_that_is_not_attention_is_not_a_near_miss(tmp_path):
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 8)

        def forward(self, x):
            return torch.softmax(self.proj(x), dim=-1)

    with pytest.warns(UserWarning):
        report = linearize.explain(Classifier(), torch.randn(2, 16))
    assert len(report.unmatched) == 1 and report.near_misses == []
    assert "softmax left alone" in str(report)


# ----- graph breaks ---------------------------------------------------------------------------------------------

class Block(nn.Module):
    """Attention, then an MLP with a graph break in it: the break is not in attention."""

    def __init__(self, d=32, h=2):
        super().__init__()
        self.h = h
        self.attn_qkv = nn.Linear(d, 3 * d)
        self.mlp = nn.Linear(d, d)

    def attention(self, x):
        B, T, d = x.shape
        q, k, v = self.attn_qkv(x).view(B, T, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, d)

    def feed_forward(self, x):
        h = self.mlp(x)
        torch._dynamo.graph_break()
        return torch.relu(h)

    def forward(self, x):
        return self.feed_forward(x + self.attention(x))


def test_graph_break_inside_attention_is_reported_and_marked():
    torch.manual_seed(0)
    report = linearize.explain(BrokenAttention().eval(), torch.randn(1, 8, 32), rules="liger")
    (brk,) = report.graph_breaks
    assert "graph_break" in brk.reason
    assert brk.location.function == "forward" and brk.location.code == "torch._dynamo.graph_break()"
    assert brk.in_attention is not None and "site 0" in brk.in_attention
    (site,) = report.sites
    assert site.rewrite == "keep" and "graph break" in site.provenance_missing
    text = str(report)
    assert "graph break at" in text and "inside attention" in text


def test_graph_break_outside_attention_is_not_blamed_on_it(tmp_path):
    torch.manual_seed(0)
    report = linearize.explain(Block().eval(), torch.randn(1, 8, 32), rules="liger")
    (brk,) = report.graph_breaks
    assert brk.location.function == "feed_forward"
    assert brk.in_attention is None
    assert [s.rewrite for s in report.sites] == ["liger"]
    html = Path(report.write_html(tmp_path / "b.html")).read_text()
    assert 'id="break-0"' in html and "not in attention code" in html


# ----- numerics -------------------------------------------------------------------------------------------------

def test_numerics_exact_rewrite_is_faithful_and_liger_is_not():
    model = tiny_model("llama")
    ids = _ids(model)
    exact = linearize.explain(model, ids, rules="exact", numerics=True)
    views = exact.site_views()
    assert len(views) == 2
    for v in views:
        assert v.numerics.local < 1e-5 and v.numerics.in_model < 1e-5, v.numerics
    m = exact.numerics.model
    assert m.logits_rel < 1e-5 and m.top1_agreement == 1.0
    assert m.ppl_before == pytest.approx(m.ppl_after, rel=1e-5) and m.tokens == 12

    torch._dynamo.reset()
    liger = linearize.explain(model, ids, rules="liger", numerics=True)
    errs = [v.numerics for v in liger.site_views()]
    assert all(e.local > 1e-3 for e in errs), errs
    # layer 0 sees the original inputs either way; layer 1's in-model error includes layer 0's change
    assert errs[0].in_model == pytest.approx(errs[0].local, rel=1e-6)
    assert errs[1].in_model != pytest.approx(errs[1].local, rel=1e-3)
    assert liger.numerics.model.logits_rel > 1e-3
    assert "perplexity on the example" in str(liger)


def test_numerics_keep_sites_are_unchanged():
    model = tiny_model("qwen2")
    report = linearize.explain(model, _ids(model), rules="keep", numerics=True)
    assert all(v.numerics.local == 0.0 and v.numerics.in_model < 1e-6 for v in report.site_views())
    assert report.numerics.model.logits_rel < 1e-6


# ----- DOT and drawings -----------------------------------------------------------------------------------------

def _dot_nodes(dot: str) -> dict:
    """node name -> class attribute, from the DOT text."""
    return dict(re.findall(r'^\s*"([^"]+)" \[id="[^"]*" class="node ([a-z]+)"', dot, re.M))


def test_site_dot_before_and_after(llama_report):
    site = llama_report.sites[0]
    old = site.matched_nodes[-1].name
    before = _dot_nodes(llama_report.to_dot(0, "before"))
    after = _dot_nodes(llama_report.to_dot(0, "after"))
    assert before[old] == "matched"
    assert old not in after and after[site.node.name] == "new"
    p = site.provenance
    assert before[p.k_proj.name] == "provenance" and before[p.q_pre_rope.name] == "provenance"
    assert after[p.k_pre_rope.name] == "provenance"
    assert before[site.q.name] == "operand"
    # the drawing is the attention module, not the whole model: no MLP node in it
    assert not any("mlp" in n for n in before) and len(before) < len(llama_report.captures[
        llama_report.contexts[0].graph_id].before)
    # edges carry shape and dtype
    assert re.search(r'-> "%s" \[id="[^"]*" label="1×4×12×16 f32"' % old, llama_report.to_dot(0, "before"))
    with pytest.raises(ValueError):
        llama_report.to_dot(0, "sideways")


@needs_dot
def test_whole_graph_dot_lays_out(llama_report):
    dot = llama_report.to_dot()
    nodes = _dot_nodes(dot)
    assert sum(1 for c in nodes.values() if c == "new") >= 2  # both replacements highlighted
    svg = render_svg(dot)
    assert svg is not None and svg.startswith("<svg") and svg.count('class="node') >= len(nodes)
    assert 'class="cluster' in svg  # grouped by module


# ----- HTML -----------------------------------------------------------------------------------------------------

def test_html_report_is_self_contained_and_lists_every_site(llama_report, tmp_path):
    path = llama_report.write_html(tmp_path / "report.html")
    html = Path(path).read_text()
    assert html.startswith("<!DOCTYPE html>")
    for pat in (r'<script[^>]+src=', r'<link[^>]+href="(?!data:)', r"@import", r"url\((?!data:)"):
        assert not re.search(pat, html), pat
    assert not re.search(r'(src|href)="https?:', html)
    rows = re.findall(r'<tr id="row-(\d+)"', html)
    assert rows == ["0", "1"]
    for v in llama_report.site_views():
        assert f'id="{v.anchor}"' in html and v.site.module_path in html and v.source_text in html
        assert v.rule_where in html
    assert "perplexity on the example" in html  # numerics were measured for this report
    if dot_available():
        for i in (0, 1):
            section = html[html.index(f'<section class="site rewritten" id="site-{i}"'):]
            section = section[: section.index("</section>")]
            assert section.count("<svg") == 2 and "node matched" in section and "node new" in section
    else:
        assert "Graphviz `dot` was not found" in html


def test_html_report_without_graphviz_still_works(llama_report, tmp_path, monkeypatch):
    import linearize.report.draw as draw
    import linearize.report.html as H

    monkeypatch.setattr(draw, "dot_available", lambda: None)
    monkeypatch.setattr(H, "dot_available", lambda: None)
    html = Path(llama_report.write_html(tmp_path / "nodot.html")).read_text()
    assert "<svg" not in html and "Graphviz `dot` was not found" in html and "digraph" in html


# ----- debug dump -----------------------------------------------------------------------------------------------

STAGES = ["input"] + [p.name for p in DEFAULT_PIPELINE]


def _check_debug_dir(root: Path):
    (gdir,) = [p for p in root.iterdir() if p.is_dir()]
    for i, stage in enumerate(STAGES):
        for ext in ("py", "diff", "dot"):
            assert (gdir / f"{i:02d}_{stage}.{ext}").is_file(), f"{i:02d}_{stage}.{ext}"
    stem = {s: f"{i:02d}_{s}" for i, s in enumerate(STAGES)}
    assert (gdir / f"{stem['find_attention']}.diff").read_text() == "no change\n"
    rewrite = (gdir / f"{stem['rewrite_sites']}.diff").read_text()
    assert "+    liger_attention" in rewrite and "-    attn_output" in rewrite
    header = (gdir / f"{stem['apply_rules']}.py").read_text().splitlines()[:4]
    assert any("-> liger" in line for line in header), header
    lines = (gdir / "passes.txt").read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == [f"{i:02d}_{s}" for i, s in enumerate(STAGES)]
    if dot_available():
        assert (gdir / f"{stem['rewrite_sites']}.svg").read_text().startswith("<svg")
    return gdir


def test_debug_dir_option_writes_each_pass(tmp_path):
    model = tiny_model("mistral")
    compiled = torch.compile(model, backend="linearize", options={"debug_dir": str(tmp_path), "inner": "eager"})
    with torch.no_grad():
        compiled(_ids(model))
    _check_debug_dir(tmp_path)


def test_debug_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LINEARIZE_DEBUG_DIR", str(tmp_path))
    model = tiny_model("llama")
    with torch.no_grad():
        torch.compile(model, backend="linearize", options={"inner": "eager"})(_ids(model))
    _check_debug_dir(tmp_path)


# ----- CLI ------------------------------------------------------------------------------------------------------

def test_cli_explain_writes_html_dot_json(tmp_path, capsys):
    from linearize.cli import main

    html, dot, js = tmp_path / "r.html", tmp_path / "r.dot", tmp_path / "r.json"
    rc = main(["explain", "--model", "tiny-llama", "--tokens", "12", "--rules", "swa", "--numerics",
               "--html", str(html), "--dot", str(dot), "--json", str(js)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "model.layers.1.self_attn" in out and "swa" in out and f"wrote {html}" in out
    assert html.stat().st_size > 1000 and dot.read_text().startswith("digraph")
    import json

    data = json.loads(js.read_text())
    assert [s["rewrite"] for s in data["sites"]] == ["swa", "swa"] and "model_numerics" in data


def test_cli_explain_bad_rule_set_exits_2(capsys):
    from linearize.cli import main

    assert main(["explain", "--model", "tiny-llama", "--rules", "no-such-rules"]) == 2
    assert "error:" in capsys.readouterr().err


def test_explain_on_a_model_converted_in_place_sees_its_original_attention():
    from linearize.generation import converted
    from linearize.models import tiny_model

    model = tiny_model("llama")
    ids = torch.arange(1, 9)[None]
    plain = linearize.explain(model, ids, rules="swa", use_cache=False)
    with converted(model, "liger"):
        compiled_call = model._compiled_call_impl
        again = linearize.explain(model, ids, rules="swa", use_cache=False)
        assert model._compiled_call_impl is compiled_call  # left converted
    assert len(plain.sites) == 2 and [s.rewrite for s in again.sites] == [s.rewrite for s in plain.sites]
