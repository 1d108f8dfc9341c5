"""Seeing the rewrite: what `linearize.explain` records and how a Report is shown.

snapshot  plain-data copies of the FX graph before / after the passes (op, module, source line, shape, dtype, edges)
capture   the observer that takes them, Dynamo's graph breaks, rule and source locations
views     per-site / per-unmatched facts shared by the text table, JSON, DOT and HTML
numerics  each site's error against the original on the example input; logits / perplexity change
draw      the region around a site, Graphviz DOT, batched `dot -Tsvg` layout
render    DOT for sites (before / after), near-misses, whole graphs
html      Report.write_html: one self-contained page
debug     options={"debug_dir": ...} / LINEARIZE_DEBUG_DIR: the graph after each pass on disk
cli       `linearize explain`
"""
