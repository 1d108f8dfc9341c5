"""`linearize` command line: `linearize demo`, `linearize rules list|show NAME|check FILE`."""
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

    rules = sub.add_parser("rules", help="built-in rule sets")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    rules_sub.add_parser("list", help="names and descriptions of the built-in rule sets")
    show = rules_sub.add_parser("show", help="print a built-in rule set")
    show.add_argument("name")
    check = rules_sub.add_parser("check", help="validate a rule file (exit 0 if valid, 2 if not)")
    check.add_argument("file")

    from .report.cli import add_parser as add_explain_parser

    add_explain_parser(sub)

    args = parser.parse_args(argv)
    if args.command == "explain":
        from .report.cli import run as run_explain

        return run_explain(args)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(rules=tuple(args.rules), prefill_tokens=args.prefill_tokens, ppl_tokens=args.ppl_tokens)
        return 0
    return _rules(args)


def _rules(args) -> int:
    from .rewrite import rules as R

    try:
        if args.rules_command == "list":
            for name in R.available():
                print(f"{name:12s} {R.load(name).description}")
        elif args.rules_command == "show":
            R.load(args.name)  # validates the name, with suggestions
            print(R.builtin_path(args.name).read_text(), end="")
        else:
            rs = R.load(args.file)
            print(f"{args.file}: valid, {len(rs.rules)} rule(s)")
    except R.RuleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
