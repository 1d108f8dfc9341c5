"""`linearize explain`: print what the backend finds and decides for a model; optionally write the HTML report,
DOT, JSON, and the per-pass debug dump.

    linearize explain                                   # SmolLM2-135M under liger, 128 tokens of English text
    linearize explain --rules liger-hybrid --numerics --html report.html
    linearize explain --model tiny-llama --dot graph.dot --debug-dir /tmp/lin
"""
from __future__ import annotations

import sys
import time

from ..options import DEFAULT_RULES

def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="show every attention site, near-miss and graph break; write an HTML report",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2",
                   help="smollm2, tiny-llama|mistral|qwen2, or a model folder (default: smollm2)")
    p.add_argument("--rules", default=DEFAULT_RULES, help=f"built-in rule set name or YAML file (default: {DEFAULT_RULES})")
    p.add_argument("--tokens", type=int, default=128, help="example input length in tokens (default: 128)")
    p.add_argument("--text", default=None, help="example input text (default: English prose shipped with Python)")
    p.add_argument("--numerics", action="store_true",
                   help="measure each rewritten site against the original, and the logits / perplexity change")
    p.add_argument("--html", metavar="PATH", help="write the self-contained HTML report here")
    p.add_argument("--dot", metavar="PATH", help="write the whole captured graph(s) after the rewrite as DOT")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--debug-dir", metavar="DIR", help="write the graph after each pass (code, diff, DOT, SVG)")


def _load(args):
    import torch

    from ..models import load

    model, tok = load(args.model)
    if tok is None:  # tiny random models have no tokenizer: random ids
        g = torch.Generator().manual_seed(0)
        return model, torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=g)
    if args.text is not None:
        return model, tok(args.text, return_tensors="pt").input_ids[:, : args.tokens]
    from ..data import english_token_ids

    return model, english_token_ids(tok, args.tokens, repeat=True)


def run(args) -> int:
    from ..explain import explain
    from ..rewrite import rules as R

    try:
        R.load(args.rules)
    except R.RuleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        model, ids = _load(args)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report = explain(model, ids, rules=args.rules, numerics=args.numerics, debug_dir=args.debug_dir)
    print(report)
    if args.html:
        start = time.perf_counter()
        report.write_html(args.html)
        print(f"wrote {args.html} in {time.perf_counter() - start:.1f} s")
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(report.to_dot())
        print(f"wrote {args.dot}")
    if args.json:
        report.write_json(args.json)
        print(f"wrote {args.json}")
    if args.debug_dir:
        print(f"graphs after each pass: {args.debug_dir}/graph_<id>/")
    return 0
