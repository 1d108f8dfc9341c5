"""`linearize kernels emit --rules NAME --out DIR`: write the generated Triton sources of a recipe, to read them.

One file per distinct spec the rule set's rewrites produce for the given head dims, GQA group and dtype (defaults:
SmolLM2-135M, K = V = 64, group 3, bf16), named `<spec name>-<key>.py`, plus `index.json` (spec, rule, file).
"""
from __future__ import annotations

import json
from pathlib import Path

from . import generator


def emit(rules: str, out: str, *, head_dim: int = 64, head_dim_v: int | None = None, group: int = 3,
         dtype: str = "bfloat16") -> list[dict]:
    from ...lowering.triton_ops import rule_specs
    from ...rewrite import rules as R

    rule_set = R.load(rules)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    index, seen = [], set()
    for i, rule in enumerate(rule_set.rules):
        if rule.rewrite in ("keep", "exact"):
            continue
        origin = getattr(rule, "origin", "") or f"rule {i + 1}"
        specs = rule_specs(rule.rewrite, rule.params, head_k=head_dim, head_v=head_dim_v or head_dim, group=group,
                           dtype=dtype)
        if isinstance(specs, str):
            index.append({"rule": origin, "rewrite": rule.rewrite, "file": None, "not_generated": specs})
            continue
        for spec in specs:
            name = f"{spec.name()}-{spec.key()}.py"
            if spec.key() not in seen:
                seen.add(spec.key())
                (out_dir / name).write_text(generator.render(spec))
            index.append({"rule": origin, "rewrite": rule.rewrite, "file": name, "spec": spec.to_dict()})
    (out_dir / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index
