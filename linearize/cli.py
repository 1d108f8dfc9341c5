"""`linearize` command line: `linearize demo`, `linearize rules list|show NAME|check FILE`, `linearize explain`,
`linearize kernels emit --rules NAME --out DIR`."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="linearize", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="convert SmolLM2-135M on the CPU and print what happened")
    demo.add_argument("--rules", nargs="+", default=["liger", "swa", "gla"], help="rule sets to compare")
    demo.add_argument("--prefill-tokens", type=int, default=4096)
    demo.add_argument("--ppl-tokens", type=int, default=512)

    rules = sub.add_parser("rules", help="rule files: list, show and check")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    rules_sub.add_parser("list", help="names and descriptions of the built-in rule sets")
    show = rules_sub.add_parser("show", help="print a built-in rule set")
    show.add_argument("name")
    check = rules_sub.add_parser("check", help="validate a rule file (exit 0 if valid, 2 if not)")
    check.add_argument("file")
    check.add_argument("--strict", action="store_true", help="treat warnings as errors (exit 1)")

    kernels = sub.add_parser("kernels", help="generated Triton kernels")
    kernels_sub = kernels.add_subparsers(dest="kernels_command", required=True)
    emit = kernels_sub.add_parser("emit", help="write the Triton sources a rule set generates, to read them")
    emit.add_argument("--rules", required=True, help="built-in rule set name or YAML file")
    emit.add_argument("--out", required=True, help="folder for the .py sources and index.json")
    emit.add_argument("--head-dim", type=int, default=64, help="K (query/key head dim); default SmolLM2's 64")
    emit.add_argument("--head-dim-v", type=int, default=None, help="V (value head dim); default = K")
    emit.add_argument("--group", type=int, default=3, help="query heads per KV head (GQA); default 3")
    emit.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))

    from .report.cli import add_parser as add_explain_parser

    add_explain_parser(sub)

    args = parser.parse_args(argv)
    if args.command == "explain":
        from .report.cli import run as run_explain

        return run_explain(args)
    if args.command == "kernels":
        return _kernels(args)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(rules=tuple(args.rules), prefill_tokens=args.prefill_tokens, ppl_tokens=args.ppl_tokens)
        return 0
    return _rules(args)


def _kernels(args) -> int:
    from .kernels.triton.emit import emit
    from .rewrite import rules as R

    try:
        index = emit(args.rules, args.out, head_dim=args.head_dim, head_dim_v=args.head_dim_v, group=args.group,
                     dtype=args.dtype)
    except R.RuleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for entry in index:
        what = entry["file"] or f"not generated: {entry['not_generated']}"
        print(f"{entry['rule']}: {entry['rewrite']} -> {what}")
    print(f"wrote {sum(1 for e in index if e['file'])} source(s) and index.json to {args.out}")
    return 0


def _rules(args) -> int:
    """`linearize rules ...`: messages are one paragraph each (`error: file:line:col: what (fix)`), never a
    traceback. Exit 0: fine; 1: warnings under --strict; 2: the file or name is not usable."""
    from .rewrite import rules as R

    try:
        if args.rules_command == "list":
            for name in R.available():
                print(f"{name:14s} {R.load(name).description}")
        elif args.rules_command == "show":
            if args.name not in R.available():
                R.load(args.name)  # raises with the suggestion
                raise R.RuleError(f"`{args.name}` is not a built-in rule set",
                                  hint=f"built-in rule sets: {', '.join(R.available())}")
            print(R.builtin_path(args.name).read_text(), end="")
        else:
            rs = R.check(args.file)
            for w in rs.warnings:
                print(f"warning: {w}", file=sys.stderr)
            print(f"{args.file}: valid, {len(rs.rules)} rule(s)" +
                  (f", {len(rs.patterns)} pattern(s)" if rs.patterns else ""))
            for i, rule in enumerate(rs.rules, 1):
                params = ", ".join(f"{k}={v}" for k, v in rule.params.items() if k not in rule.formulas)
                formulas = ", ".join(f"{k}=\"{f.text}\"" for k, f in rule.formulas.items())
                shown = ", ".join(p for p in (params, formulas) if p)
                print(f"  {i}. {rule.match} where {rule.where.describe()} -> {rule.rewrite}"
                      + (f" ({shown})" if shown else "") + f"    [{rule.origin.rsplit(': ', 1)[0]}]")
            if rs.warnings and args.strict:
                return 1
    except R.RuleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug in linearize, not in the file: still one paragraph, no traceback
        print(f"error: {getattr(args, 'file', getattr(args, 'name', ''))}: internal error while reading rules "
              f"({type(exc).__name__}: {exc}); please report this", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
