"""Which recovery stage does the work? `liger`, `lolcats` and `gla` on SmolLM2, each trained three ways at the same
token budget: transfer only, LoRA only, transfer then LoRA (half each); plus the same LoRA on the unconverted
(`exact`) model, the control for how much of the gain is the training text's domain rather than the conversion.

    python bench/recovery_stages.py [--tokens 40k] [--recipes liger,lolcats,gla,exact] [--out bench/out/stages]

Each run is one `linearize recover` process (the settings of docs/recovery.md's stdlib run: `--data stdlib`, adapters
on every linear layer, KL 1.0; perplexity capped to the first 1536 tokens of each held-out text) in
`<out>/<recipe>_<stages>/`; a folder that already holds recover.json is not run again, so an interrupted sweep resumes.
Writes `<out>/stages.json`, `.md` (final perplexity at 512 and 2k, attention-output error, training minutes, the curve)
and `.png` (perplexity vs tokens trained, one panel per recipe).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

from common import log, write_results

HERE = pathlib.Path(__file__).parent
# the recipes' rule files: learned [window, linear] mix for liger, a learned Hedgehog map for lolcats (their
# `learn:` parameters give the transfer stage something to train besides the q/k adapters)
RECIPES = {"liger": str(HERE / "rules" / "liger-learned-mix.yaml"),
           "lolcats": str(HERE / "rules" / "lolcats-hedgehog.yaml"),
           "gla": "gla", "exact": "exact"}
STAGES = {"transfer": "transfer", "lora": "lora", "both": "transfer,lora"}
HELD_OUT_TOKENS = 1536  # score the first N tokens of each held-out text: quick runs, comparable with each other
COMMON = ["--model", "smollm2", "--data", "stdlib", "--kl", "1.0", "--held-out-tokens", str(HELD_OUT_TOKENS),
          "--lora-targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"]


def runs(recipes: list[str]) -> list[tuple[str, str]]:
    """(recipe, stages) pairs: three per converted recipe, LoRA alone for `exact` (nothing to transfer)."""
    return [(r, s) for r in recipes for s in (("lora",) if r == "exact" else tuple(STAGES))]


def run_one(recipe: str, stages: str, tokens: str, folder: pathlib.Path) -> dict:
    if not (folder / "recover.json").exists():
        cmd = [sys.executable, "-c", "import sys; from linearize.cli import main; sys.exit(main())", "recover",
               *COMMON, "--rules", RECIPES[recipe], "--stages", STAGES[stages], "--tokens", tokens,
               "--out", str(folder)]
        log(f"{recipe} / {stages}: {' '.join(cmd[3:])}")
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder.with_suffix(".log"), "a") as out:
            subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT)
    return json.loads((folder / "recover.json").read_text())


def summarise(recipe: str, stages: str, result: dict) -> dict:
    t = result["table"]
    after, before = t["after"], t["before"]

    def error(row):
        errs = row.get("layer_error")
        return sum(errs) / len(errs) if errs else 0.0

    return {"recipe": recipe, "stages": stages, "rules": result["config"]["rules"],
            "original": t["original"]["ppl"], "before": before["ppl"], "after": after["ppl"],
            "error_before": error(before), "error_after": error(after),
            "train_minutes": round(result["seconds"] / 60, 1),
            "curve": [(c["tokens"], c["ppl"]) for c in result["history"]["curve"]]}


def print_table(result: dict) -> None:
    rows = result["rows"]
    lengths = list(rows[0]["after"]) if rows else []
    head = "| recipe | stages | " + " | ".join(f"ppl @ {L}: before → after" for L in lengths)
    lines = [head + " | attention-output error | training min | curve (ppl @ 512 vs tokens) |",
             "|---" * (len(lengths) + 5) + "|"]
    for r in rows:
        ppl = " | ".join(f"{r['before'][L]:,.4g} → **{r['after'][L]:,.4g}**" for L in lengths)
        curve = ", ".join(f"{n // 1000}k {p:,.4g}" for n, p in r["curve"])
        lines.append(f"| {r['recipe']} | {r['stages']} | {ppl} | {r['error_before']:.3g} → {r['error_after']:.3g} | "
                     f"{r['train_minutes']} | {curve} |")
    if rows:
        lines.append("\noriginal: " + ", ".join(f"{rows[0]['original'][L]:.2f} @ {L}" for L in lengths)
                     + f" (first {result['held_out_tokens']} tokens of each held-out text)")
    table = "\n".join(lines)
    print(table)
    (pathlib.Path(result["out"]) / "stages.md").write_text(table + "\n")


def plot(result: dict, path: pathlib.Path) -> bool:
    from linearize.report.plots import pyplot

    plt = pyplot(path.name)
    recipes = list(dict.fromkeys(r["recipe"] for r in result["rows"]))
    if plt is None or not recipes:
        return False
    fig, axes = plt.subplots(1, len(recipes), figsize=(4 * len(recipes), 3.8), squeeze=False)
    for ax, recipe in zip(axes[0], recipes):
        for r in (r for r in result["rows"] if r["recipe"] == recipe):
            xs, ys = zip(*r["curve"])
            ax.plot(xs, ys, marker="o", ms=3, label=r["stages"])
            ax.axhline(r["original"]["512"], color="grey", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(recipe)
        ax.set_xlabel("tokens trained")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("held-out ppl @ 512 (grey: original)")
    fig.suptitle(f"recovery stages at {result['tokens']} tokens (SmolLM2-135M)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="40k", help="training tokens per run, over all its stages")
    parser.add_argument("--recipes", default="liger,lolcats,gla,exact", help=f"some of {', '.join(RECIPES)}")
    parser.add_argument("--out", default=str(HERE / "out" / "stages"))
    parser.add_argument("--no-run", action="store_true", help="only summarise the runs already in --out")
    args = parser.parse_args()
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        parser.error(f"--recipes: unknown {unknown}; choose from {list(RECIPES)}")
    out = pathlib.Path(args.out)
    todo = [(r, s) for r, s in runs(recipes) if not args.no_run or (out / f"{r}_{s}" / "recover.json").exists()]
    if not todo:
        parser.error(f"--no-run: no finished run in {out}")
    rows = [summarise(r, s, run_one(r, s, args.tokens, out / f"{r}_{s}")) for r, s in todo]
    result = {"tokens": args.tokens, "held_out_tokens": HELD_OUT_TOKENS, "out": str(out), "rows": rows}
    write_results(result, out, "stages", print_table, plot)


if __name__ == "__main__":
    main()
