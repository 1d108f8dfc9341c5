"""Zero-shot perplexity of SmolLM2 under each built-in recipe, on the offline English text (CPython's LICENSE).

    python bench/perplexity.py [--tokens 1024] [--window 512] [--rules exact swa liger ...]
No recovery training: the numbers show where each recipe starts from. Writes bench/out/perplexity.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--rules", nargs="+", default=["exact", "swa", "mamba2", "lolcats", "retnet",
                                                        "liger-hybrid", "hgrn2", "liger", "gla"])
    args = parser.parse_args()

    from linearize.data import english_text, perplexity
    from linearize.models import load_smollm2

    model, tok = load_smollm2()
    ids = tok(english_text(), return_tensors="pt").input_ids[:, : args.tokens]
    result = {"original": perplexity(model, ids, window=args.window)}
    print(f"original      {result['original']:.2f}", flush=True)
    for rules in args.rules:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="linearize", options={"rules": rules, "inner": "eager"})
        result[rules] = perplexity(compiled, ids, window=args.window)
        print(f"{rules:13s} {result[rules]:.2f}", flush=True)
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "perplexity.json").write_text(json.dumps({"tokens": ids.shape[1], "window": args.window, **result}, indent=1))


if __name__ == "__main__":
    main()
