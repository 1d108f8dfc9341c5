"""Does the linear branch carry information? SmolLM2 under a liger recipe (`--rules`, default: the default
recipe), zero-shot and after recovery (the shipped adapter), with the gated linear branch as trained and with its
contribution zeroed (mix [0.9, 0], and [1, 0] so the window keeps full weight). If zeroing it makes long-context
perplexity worse, the linear branch is doing work the window cannot; if not, the window does everything and the "linear"
model is a window model.

    python bench/linear_branch.py [--rules liger-sinks] [--lengths 512,2k,4k]

Perplexity: `linearize eval`'s sliding window on the evaluation document (held out of recovery's training corpus).
Writes bench/out/linear_branch-<rules>.json and .md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import yaml


def zeroed(base: str, window_weight: float):
    """`base` (one unconditional liger rule) with the linear branch's weight set to 0."""
    from linearize.rewrite import rules as R

    rs = R.load(base)
    (rule,) = rs.rules
    if "mix" in rule.params.get("learn", ()):
        # the learned per-head weights would replace the fixed [w, 0] below: the "zeroed" row would not be zeroed
        raise SystemExit(f"{base}: its mix is learned (learn: [mix]), so it cannot be zeroed by the rule file; "
                         "run this bench with a fixed-mix recipe")
    params = {**rule.params, "mix": [window_weight, 0.0]}
    text = yaml.safe_dump({"name": f"{base}-no-linear-{window_weight:g}", "rules": [
        {"rewrite": rule.rewrite, "with": {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}}]})
    return R.parse(text, source=f"<{base} without its linear branch>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from linearize.options import DEFAULT_RULES

    parser.add_argument("--rules", default=DEFAULT_RULES, help="a rule set with a shipped recovered adapter")
    parser.add_argument("--lengths", default="512,2k,4k")
    args = parser.parse_args()

    from peft import PeftModel

    from linearize.evaluate import EvalSpec, evaluate_rows, length_label, parse_length
    from linearize.generation import converted
    from linearize.models import load_smollm2
    from linearize.recovery import shipped_adapter

    lengths = tuple(parse_length(x) for x in args.lengths.split(","))
    spec = EvalSpec(lengths=lengths, tasks=("ppl",))
    model, tok = load_smollm2()
    variants = {"as built": args.rules, "linear zeroed (0.9/0)": zeroed(args.rules, 0.9),
                "linear zeroed (1/0)": zeroed(args.rules, 1.0)}

    def rows(stage):
        return [(f"{stage}, {name}", lambda r=r: converted(model, r, inner="eager")) for name, r in variants.items()]

    start = time.perf_counter()
    result = evaluate_rows([("original", lambda: contextlib.nullcontext(model))] + rows("zero-shot"), tok, spec)
    folder, meta = shipped_adapter(args.rules)
    model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()  # the recovered weights, plain
    result["rows"].update(evaluate_rows(rows("recovered"), tok, spec)["rows"])
    table = {name: {length_label(L): round(r["ppl"][str(L)]["ppl"], 3) for L in lengths}
             for name, r in result["rows"].items()}
    out = {"rules": args.rules, "adapter": meta.get("command"), "document": result["document"],
           "wall_seconds": round(time.perf_counter() - start, 1), "ppl": table}
    lines = ["| model | " + " | ".join(f"ppl @ {length_label(L)}" for L in lengths) + " |",
             "| --- |" + " --- |" * len(lengths)]
    lines += [f"| {name} | " + " | ".join(f"{v:.2f}" for v in row.values()) + " |" for name, row in table.items()]
    print("\n".join(lines))
    dest = Path(__file__).parent / "out"
    dest.mkdir(exist_ok=True)
    stem = f"linear_branch-{Path(args.rules).stem}"  # one file per recipe: a second run must not replace the first
    (dest / f"{stem}.json").write_text(json.dumps(out, indent=1))
    (dest / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
