"""Time linearize's passes on SmolLM2's captured graph (30 attention layers), per pass, median of repeats.

    python bench/passes.py [--repeats 5] [--rules liger] [--tokens 64]
Dynamo captures the model once per repeat (not timed); only the pass pipeline is timed. Writes bench/out/passes.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rules", default="liger")
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    import linearize
    from linearize.data import english_text
    from linearize.models import load_smollm2

    model, tok = load_smollm2()
    ids = tok(english_text(), return_tensors="pt").input_ids[:, : args.tokens]
    runs = []
    for _ in range(args.repeats):
        report = linearize.explain(model, ids, rules=args.rules)
        runs.append(report.contexts[0])
    per_pass = {name: statistics.median(c.timings[name] for c in runs) for name in runs[0].timings}
    total = statistics.median(sum(c.timings.values()) for c in runs)
    result = {"model": "SmolLM2-135M-Instruct", "rules": args.rules, "graph_nodes": runs[0].nodes_before,
              "sites": len(runs[0].sites), "repeats": args.repeats, "median_seconds_total": total,
              "median_seconds_per_pass": per_pass, "torch": torch.__version__}
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "passes.json").write_text(json.dumps(result, indent=1))
    print(f"{result['sites']} sites in a {result['graph_nodes']}-node graph: passes take {total:.3f} s "
          f"(median of {args.repeats})")
    for name, sec in per_pass.items():
        print(f"  {name:18s} {sec * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
