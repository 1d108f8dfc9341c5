"""`Report.write_html(path)`: one self-contained HTML file (inline CSS, SVG and a little JS; nothing fetched at
view time).

Layout of the page: a header with the run's facts; the summary table (one row per site, each linking to its
drawing); near-misses and softmaxes left alone; Dynamo graph breaks; model-level numerics; then, grouped and
collapsible by module (`model.layers.3`, ...), each site's facts and its subgraph before and after the rewrite,
laid out by Graphviz, matched / new / removed nodes highlighted, shape and dtype on every edge.
"""
from __future__ import annotations

import html
import os
import time
from collections import OrderedDict

from .draw import ROLE_STYLE, dot_available, render_svgs
from .render import site_dot, unmatched_dot
from .views import _fmt_param, site_views, unmatched_views

CSS = """
:root { --fg:#1d1d1f; --muted:#6e6e73; --line:#d2d2d7; --bg:#fbfbfd; --accent:#d94801; }
* { box-sizing: border-box; }
body { font: 14px/1.45 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: var(--fg); margin: 0;
       background: var(--bg); }
header { padding: 18px 28px 10px; background: #fff; border-bottom: 1px solid var(--line); }
header h1 { font-size: 21px; margin: 0 0 6px; }
header .facts { color: var(--muted); font-size: 13px; }
nav { position: sticky; top: 0; z-index: 5; background: #fff; border-bottom: 1px solid var(--line);
      padding: 6px 28px; font-size: 13px; }
nav a { margin-right: 16px; color: #0b57d0; text-decoration: none; }
main { padding: 8px 28px 40px; }
h2 { font-size: 17px; margin: 26px 0 8px; }
.badges span { display: inline-block; margin: 0 8px 6px 0; padding: 3px 10px; border-radius: 12px;
               background: #eef; font-size: 13px; }
.badges span.warn { background: #fde0c5; } .badges span.ok { background: #dff3df; }
table { border-collapse: collapse; width: 100%; background: #fff; font-size: 12.5px; }
th, td { border: 1px solid var(--line); padding: 4px 7px; text-align: left; vertical-align: top; }
th { background: #f2f2f5; }
tr.kept td { background: #fff7ec; }
tr:target td, section.site:target { outline: 2px solid var(--accent); }
.wide { overflow-x: auto; }
code.params { font-size: 11px; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
code, .mono { font: 12px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.muted { color: var(--muted); }
.none { color: var(--muted); font-style: italic; }
details.module { margin: 8px 0; background: #fff; border: 1px solid var(--line); border-radius: 6px; }
details.module > summary { cursor: pointer; padding: 8px 12px; font-weight: 600; }
details.module > summary .muted { font-weight: normal; }
section.site, section.miss { padding: 4px 14px 14px; border-top: 1px solid var(--line); }
section.site h3, section.miss h3 { font-size: 15px; margin: 10px 0 6px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 0 0 10px; font-size: 13px; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; }
.pair { display: flex; gap: 12px; align-items: flex-start; }
figure { flex: 1 1 0; min-width: 0; margin: 0; border: 1px solid var(--line); border-radius: 6px; background: #fff; }
figure figcaption { display: flex; justify-content: space-between; padding: 4px 8px; font-size: 12px;
                    border-bottom: 1px solid var(--line); background: #fafafa; }
figure .canvas { overflow: auto; max-height: 85vh; padding: 4px; }
figure.fit .canvas svg { max-width: 100%; height: auto; }
button { font: inherit; font-size: 12px; padding: 1px 8px; cursor: pointer; }
.legend span { display: inline-block; margin: 0 14px 4px 0; font-size: 12px; }
.legend i { display: inline-block; width: 14px; height: 12px; border: 2px solid; border-radius: 3px;
            vertical-align: -2px; margin-right: 5px; }
pre.code { background: #f6f8fa; border: 1px solid var(--line); border-radius: 4px; padding: 6px 8px; margin: 4px 0;
           white-space: pre-wrap; word-break: break-all; }
.toolbar { margin: 6px 0; } .toolbar input { font: inherit; padding: 2px 6px; width: 260px; }
"""

JS = """
(function () {
  function openTarget() {
    var id = location.hash.slice(1); if (!id) return;
    var el = document.getElementById(id); if (!el) return;
    for (var p = el; p; p = p.parentElement) { if (p.tagName === 'DETAILS') p.open = true; }
    el.scrollIntoView();
  }
  window.addEventListener('hashchange', openTarget);
  document.addEventListener('DOMContentLoaded', function () {
    openTarget();
    document.querySelectorAll('button[data-fit]').forEach(function (b) {
      b.addEventListener('click', function () {
        var fig = b.closest('figure'); fig.classList.toggle('fit');
        b.textContent = fig.classList.contains('fit') ? 'actual size' : 'fit width';
      });
    });
    var all = function (open) { document.querySelectorAll('details.module').forEach(function (d) { d.open = open; }); };
    var e = document.getElementById('expand-all'); if (e) e.addEventListener('click', function () { all(true); });
    var c = document.getElementById('collapse-all'); if (c) c.addEventListener('click', function () { all(false); });
    var f = document.getElementById('filter');
    if (f) f.addEventListener('input', function () {
      var q = f.value.toLowerCase();
      document.querySelectorAll('#sites tbody tr').forEach(function (tr) {
        tr.style.display = tr.textContent.toLowerCase().indexOf(q) >= 0 ? '' : 'none';
      });
    });
  });
})();
"""


def _e(text) -> str:
    return html.escape("" if text is None else str(text), quote=True)


def _fmt(x, spec=".3g") -> str:
    return "-" if x is None else format(x, spec)


def _group(module_path: str) -> str:
    """The module a site is grouped under in the page: the attention module's parent (the decoder layer)."""
    if not module_path:
        return "(top level)"
    return module_path.rsplit(".", 1)[0] if "." in module_path else module_path


def _figure(svg, caption: str, dot_text: str, fig_id: str) -> str:
    if svg is None:
        why = ("Graphviz `dot` was not found (install the graphviz package, e.g. `apt-get install graphviz`)"
               if dot_available() is None else "Graphviz could not lay out this graph")
        body = (f'<p class="none">{_e(why)}; the DOT source:</p>'
                f'<details><summary>DOT</summary><pre class="code">{_e(dot_text)}</pre></details>')
    else:
        body = svg
    return (f'<figure class="fit" id="{_e(fig_id)}"><figcaption><span>{_e(caption)}</span>'
            f'<button type="button" data-fit="1">actual size</button></figcaption>'
            f'<div class="canvas">{body}</div></figure>')


def _stack_html(frames) -> str:
    if not frames:
        return '<span class="none">no source recorded</span>'
    rows = "".join(f"<div><code title=\"{_e(f.file)}\">{_e(f.where())}</code> in <code>{_e(f.function)}</code>"
                   f"{': <code>' + _e(f.code) + '</code>' if f.code else ''}</div>" for f in reversed(frames))
    return f"<details><summary>call stack ({len(frames)} frames, innermost first)</summary>{rows}</details>"


def _code_lines(snap, names) -> str:
    lines = []
    for n in names:
        info = snap.get(n) if snap is not None else None
        if info is not None and info.op not in ("placeholder", "output"):
            lines.append(f"{info.name} = {info.target}({info.args})")
    return "\n".join(lines)


def _site_section(v, svgs: dict, dots: dict, numerics_on: bool) -> str:
    s = v.site
    src, inner = v.module_source, v.source
    B, Hq, Hkv, L, S, D, Dv = s.shape if len(s.shape) == 7 else (None,) * 7
    facts = [
        ("layer", (s.layer if s.layer is not None else "-")),
        ("graph", f"captured graph {v.graph_id}"),
        ("module", f"<code>{_e(s.module_path or '-')}</code>"),
        ("source", (f"<code title=\"{_e(src.file)}\">{_e(src.where())}</code> in <code>{_e(src.function)}</code>: "
                    f"<code>{_e(src.code)}</code>" if src else '<span class="none">unknown</span>')
         + (f"<br><span class=\"muted\">innermost:</span> <code>{_e(inner.where())}</code> <code>{_e(inner.code)}</code>"
            if inner is not None and src is not None and inner != src else "")
         + _stack_html(v.frames)),
        ("pattern", f"<b>{_e(s.pattern)}</b> &middot; matched {len(s.matched_nodes)} node(s): "
                    f"<code>{_e(', '.join(n.name for n in s.matched_nodes))}</code>"),
        ("attention", f"heads {Hq} q / {Hkv} kv (GQA groups {s.gqa_groups}), L={L}, S={S}, D={D}, Dv={Dv}, "
                      f"scale {s.scale:.4g}, "
                      + ("causal" if s.is_causal else ("explicit mask" if s.attn_mask is not None else "non-causal"))
                      + (f", dropout {s.dropout_p}" if s.dropout_p else "")),
        ("provenance", _e(v.provenance_text)),
        ("rule", f"<code>{_e(v.rule_where or '-')}</code>"),
        ("rewrite", f"<b>{_e(s.rewrite)}</b>" + (f" <code>{_e(v.params_text)}</code>" if v.params_text else "")),
    ]
    if s.reason:
        facts.append(("kept because", _e(s.reason)))
    if numerics_on and v.numerics is not None:
        n = v.numerics
        facts.append(("error (rel. RMS)",
                      f"local {_fmt(n.local)} (this site alone, original inputs), in model {_fmt(n.in_model)} "
                      f"(with every earlier rewrite), max |diff| {_fmt(n.max_abs)}"
                      + (f" <span class=\"muted\">{_e(n.note)}</span>" if n.note else "")))
    cap = v.capture
    before_code = _code_lines(cap.before if cap else None, [v.original_output])
    after_names = [n for n in (cap.after.nodes if cap and cap.after else []) if cap.before and n not in cap.before
                   and cap.after[n].module == (s.module_path or cap.after[n].module)]
    after_code = _code_lines(cap.after if cap else None, after_names)
    facts.append(("code", f"<pre class=\"code\">{_e(before_code)}</pre>"
                          + (f"<div class=\"muted\">becomes</div><pre class=\"code\">{_e(after_code)}</pre>"
                             if after_code else "")))
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{val}</dd>" for k, val in facts)
    figs = []
    for stage in ("before", "after"):
        key = (v.index, stage)
        if key in dots:
            caption = (f"before: matched {s.pattern}" if stage == "before" else f"after: {s.rewrite}")
            figs.append(_figure(svgs.get(key), caption, dots[key], f"{v.anchor}-{stage}"))
    status = "kept" if v.kept else "rewritten"
    title = f"site {v.index}: {s.module_path or v.original_output} &rarr; {_e(s.rewrite)}"
    return (f'<section class="site {status}" id="{v.anchor}" data-site="{v.index}"><h3>{title}</h3>'
            f'<dl class="facts">{dl}</dl><div class="pair">{"".join(figs)}</div></section>')


def _params_cell(v, shown: int = 3) -> str:
    items = [f"{k}={_fmt_param(val)}" for k, val in v.site.params.items()]
    if not items:
        return '<span class="muted">-</span>'
    text = ", ".join(items[:shown]) + (f", … (+{len(items) - shown})" if len(items) > shown else "")
    return f'<code class="params" title="{_e(v.params_text)}">{_e(text)}</code>'


def _summary_table(views, numerics_on: bool) -> str:
    head = ["#", "layer", "module", "source", "pattern", "rule", "rewrite", "parameters", "provenance"]
    if numerics_on:
        head += ["err local", "err in model"]
    head.append("status")
    rows = []
    for v in views:
        s = v.site
        if s.provenance:
            kp = s.provenance.k_proj_path or "-"
            rel = kp[len(s.module_path) + 1:] if s.module_path and kp.startswith(s.module_path + ".") else kp
            prov = (f'<span title="{_e(v.provenance_text)}">found: key projection <code>{_e(rel)}</code>, RoPE '
                    f"{_e(s.provenance.rope or 'none')}</span>")
        else:
            prov = f'<span class="muted">missing: {_e(s.provenance_missing)}</span>'
        rule = v.rule_where or "-"
        cells = [f'<a href="#{v.anchor}">{v.index}</a>', _e(s.layer if s.layer is not None else "-"),
                 f"<code>{_e(s.module_path or '-')}</code>", f"<code>{_e(v.source_text)}</code>", _e(s.pattern),
                 f"<code title=\"{_e(s.rule)}\">{_e(rule.rsplit('/', 1)[-1])}</code>", f"<b>{_e(s.rewrite)}</b>",
                 _params_cell(v), prov]
        if numerics_on:
            n = v.numerics
            cells += [f'<span class="num">{_fmt(n.local if n else None, ".2e")}</span>',
                      f'<span class="num">{_fmt(n.in_model if n else None, ".2e")}</span>']
        cells.append(_e(s.reason) if s.reason else "rewritten" if not v.kept else "kept")
        cls = "kept" if v.kept else ""
        rows.append(f'<tr id="row-{v.index}" class="{cls}" data-site="{v.index}">'
                    + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    if not rows:
        return '<p class="none">No attention site was found.</p>'
    return ('<div class="toolbar"><input id="filter" placeholder="filter rows (layer, module, rewrite…)"></div>'
            '<div class="wide"><table id="sites"><thead><tr>' + "".join(f"<th>{h}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>")


def _unmatched_table(uviews) -> str:
    if not uviews:
        return '<p class="none">None: every softmax in the captured graphs is part of a site.</p>'
    rows = []
    for u in uviews:
        kind = f"near-miss: <b>{_e(u.pattern)}</b>" if u.near_miss else "softmax left alone"
        partial = f"<code>{_e(', '.join(u.partial))}</code>" if u.partial else "-"
        rows.append(f'<tr id="row-{u.anchor}" class="unmatched" data-near-miss="{int(u.near_miss)}">'
                    f'<td><a href="#{u.anchor}">{u.index}</a></td><td>{kind}</td><td><code>{_e(u.unmatched.node)}</code></td>'
                    f"<td><code>{_e(u.unmatched.module_path or '-')}</code></td><td><code>{_e(u.source_text)}</code></td>"
                    f"<td>{partial}</td><td class=\"reason\">{_e(u.reason_text)}</td></tr>")
    return ('<table id="unmatched"><thead><tr><th>#</th><th>kind</th><th>node</th><th>module</th><th>source</th>'
            '<th>matched partly</th><th>reason</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>")


def _breaks_table(breaks) -> str:
    if not breaks:
        return '<p class="none">None: Dynamo captured the model without a graph break.</p>'
    rows = []
    for i, b in enumerate(breaks):
        loc = b.location
        what = (f'<a href="#{_e(b.anchor)}">{_e(b.in_attention)}</a>' if b.anchor else _e(b.in_attention))
        inside = (f'<b style="color:#a50f15">inside attention</b>: {what} (a break here cuts the attention off its '
                  "projections, so its site cannot be matched or traced)" if b.in_attention
                  else '<span class="muted">not in attention code</span>')
        rows.append(f'<tr id="break-{i}"><td>{i}</td>'
                    f"<td><code>{_e(loc.where() if loc else '-')}</code> in <code>{_e(loc.function if loc else '-')}</code>"
                    f"{'<br><code>' + _e(loc.code) + '</code>' if loc and loc.code else ''}</td>"
                    f"<td>{_e(b.reason)}<details><summary>Dynamo's message</summary><pre class=\"code\">{_e(b.detail)}"
                    f"</pre></details>{_stack_html(b.frames)}</td><td>{inside}</td></tr>")
    return ('<table id="breaks"><thead><tr><th>#</th><th>where</th><th>reason</th><th>attention?</th></tr></thead>'
            "<tbody>" + "".join(rows) + "</tbody></table>")


def _numerics_block(report) -> str:
    num = report.numerics
    if num is None:
        return ('<p class="none">Not measured (run <code>linearize explain --numerics</code> or '
                '<code>linearize.explain(..., numerics=True)</code>).</p>')
    m = num.model
    if m is None or m.logits_rel is None:
        return f'<p class="none">{_e(m.note if m else "no model-level comparison")}</p>'
    items = [("logits, relative RMS error", _fmt(m.logits_rel)), ("logits, max |diff|", _fmt(m.logits_max_abs)),
             ("top-1 token agreement", f"{m.top1_agreement:.1%}" if m.top1_agreement is not None else "-")]
    if m.ppl_before is not None:
        items.append((f"perplexity on the example ({m.tokens} tokens)",
                      f"{m.ppl_before:.4g} original &rarr; {m.ppl_after:.4g} rewritten"))
    return '<dl class="facts" id="model-numerics">' + "".join(
        f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def _legend() -> str:
    spans = "".join(f'<span><i style="background:{f};border-color:{c}"></i>{_e(t)}</span>'
                    for role, (f, c, t) in ROLE_STYLE.items() if t)
    return (f'<div class="legend">{spans}<span class="muted">edges: shape and dtype of the value; hover a node for '
            "its call, module and source line</span></div>")


def build_html(report) -> str:
    views = site_views(report)
    uviews = unmatched_views(report)
    numerics_on = report.numerics is not None
    # every drawing is laid out in one batch of Graphviz runs
    dots, keys = {}, []
    for v in views:
        stages = ("before",) if v.kept else ("before", "after")
        for stage in stages:
            try:
                dots[(v.index, stage)] = site_dot(report, v, stage)
                keys.append((v.index, stage))
            except ValueError:
                pass
    for u in uviews:
        d = unmatched_dot(u)
        if d is not None:
            dots[(u.anchor, "unmatched")] = d
            keys.append((u.anchor, "unmatched"))
    svgs = dict(zip(keys, render_svgs([dots[k] for k in keys])))

    counts = report.counts()
    kept = sum(1 for v in views if v.kept)
    n_near = sum(1 for u in uviews if u.near_miss)
    badges = [f'<span class="ok">{len(views)} attention site(s)</span>']
    badges += [f"<span>{_e(k)}: {c}</span>" for k, c in sorted(counts.items())]
    badges.append(f'<span class="{"warn" if kept else "ok"}">{kept} kept as softmax</span>')
    badges.append(f'<span class="{"warn" if n_near else "ok"}">{n_near} near-miss(es)</span>')
    badges.append(f'<span class="{"warn" if len(uviews) - n_near else "ok"}">{len(uviews) - n_near} other '
                  "softmax(es) left alone</span>")
    badges.append(f'<span class="{"warn" if report.graph_breaks else "ok"}">{len(report.graph_breaks)} graph '
                  "break(s)</span>")

    nodes = ", ".join(f"graph {c.graph_id}: {c.nodes_before} &rarr; {c.nodes_after} nodes" for c in report.contexts)
    timings = {}
    for c in report.contexts:
        for k, t in c.timings.items():
            timings[k] = timings.get(k, 0.0) + t
    timing = ", ".join(f"{k} {t * 1000:.1f} ms" for k, t in timings.items())

    groups: "OrderedDict[str, list]" = OrderedDict()
    for v in views:
        groups.setdefault(_group(v.site.module_path), []).append(v)
    details = []
    for i, (mod, vs) in enumerate(groups.items()):
        what = ", ".join(sorted({v.site.rewrite or "-" for v in vs}))
        inner = "".join(_site_section(v, svgs, dots, numerics_on) for v in vs)
        details.append(f'<details class="module" data-module="{_e(mod)}"{" open" if i == 0 else ""}><summary>'
                       f'<code>{_e(mod)}</code> <span class="muted">{len(vs)} site(s): {_e(what)}</span></summary>'
                       f"{inner}</details>")
    misses = []
    for u in uviews:
        key = (u.anchor, "unmatched")
        fig = (_figure(svgs.get(key), "partial match" if u.near_miss else "softmax and its neighbourhood",
                       dots[key], f"{u.anchor}-fig") if key in dots else "")
        partial = f"; matched partly: <code>{_e(', '.join(u.partial))}</code>" if u.partial else ""
        opened = " open" if len(uviews) <= 3 else ""
        misses.append(f'<details class="module" data-module="{_e(u.unmatched.module_path)}"{opened}><summary>'
                      f"<code>{_e(u.unmatched.node)}</code> <span class=\"muted\">"
                      f"{'near-miss of ' + _e(u.pattern) if u.near_miss else 'softmax left alone'} in "
                      f"{_e(u.unmatched.module_path or '(top level)')}</span></summary>"
                      f'<section class="miss" id="{u.anchor}"><p><b>reason:</b> {_e(u.reason_text)}{partial}</p>'
                      f"{_stack_html(u.frames)}{fig}</section></details>")

    title = f"linearize explain: {report.model or 'model'} under rules {report.rules!r}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,"><title>{_e(title)}</title><style>{CSS}</style></head>
<body>
<header><h1>{_e(title)}</h1>
<div class="facts">input {_e(report.inputs or '-')} &middot; {report.graphs} captured graph(s) ({nodes}) &middot;
passes: {_e(timing)} &middot; capture {report.seconds.get('capture', 0):.1f} s
{'&middot; numerics ' + format(report.seconds.get('numerics', 0), '.1f') + ' s' if numerics_on else ''}
&middot; written {_e(time.strftime('%Y-%m-%d %H:%M'))}</div></header>
<nav><a href="#summary">summary</a><a href="#unmatched-section">near-misses &amp; softmaxes left alone</a>
<a href="#breaks-section">graph breaks</a><a href="#numerics-section">numerics</a><a href="#details">sites drawn</a>
<a href="#legend">legend</a></nav>
<main>
<section id="summary"><h2>Summary</h2><div class="badges">{''.join(badges)}</div>
{_summary_table(views, numerics_on)}</section>
<section id="unmatched-section"><h2>Near-misses and softmaxes left alone</h2>{_unmatched_table(uviews)}</section>
<section id="breaks-section"><h2>Dynamo graph breaks</h2>{_breaks_table(report.graph_breaks)}</section>
<section id="numerics-section"><h2>Numerics (model output, original vs rewritten)</h2>{_numerics_block(report)}</section>
<section id="details"><h2>Sites before and after the rewrite</h2>
<div id="legend">{_legend()}</div>
<div class="toolbar"><button type="button" id="expand-all">expand all</button>
<button type="button" id="collapse-all">collapse all</button></div>
{''.join(details) or '<p class="none">No site to draw.</p>'}
{'<h2>Near-misses and softmaxes left alone, drawn</h2>' + ''.join(misses) if misses else ''}
</section>
</main>
<script>{JS}</script>
</body></html>
"""


def write_html(report, path) -> str:
    path = os.fspath(path)
    text = build_html(report)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path
