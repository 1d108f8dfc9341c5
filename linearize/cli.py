"""`linearize` command line: `linearize demo`, `linearize rules list|show NAME|check FILE`, `linearize explain`,
`linearize save --model M --rules R --out DIR`, `linearize show DIR`, `linearize eval`, `linearize recover`,
`linearize plan --budget 0.25 --out plan.yaml`,
`linearize kernels emit --rules NAME --out DIR`."""
from __future__ import annotations

import argparse
import sys

from .options import DEFAULT_RULES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="linearize", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="SmolLM2-135M: original vs converted vs recovered, a few minutes on a CPU")
    demo.add_argument("--full", action="store_true", help="the long tour instead: sites, exactness, perplexity and "
                      "prefill speed per rule set, generation (about 11 minutes)")
    demo.add_argument("--rules", nargs="+", default=["liger", "swa", "gla"], help="--full: rule sets to compare")
    demo.add_argument("--prefill-tokens", type=int, default=4096, help="--full: timed prefill length")
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

    save = sub.add_parser("save", help="convert a model and write it as a checkpoint folder (no training)")
    save.add_argument("--model", default="smollm2", help="smollm2, tiny-llama|mistral|qwen2, or a model folder")
    save.add_argument("--rules", default=DEFAULT_RULES, help=f"rule set name or YAML file (default: {DEFAULT_RULES})")
    save.add_argument("--out", required=True, help="the folder to write")
    save.add_argument("--lora", default="merge", choices=("merge", "adapter"),
                      help="for a peft model: fold the adapters in, or keep a peft adapter folder")
    save.add_argument("--native", action="store_true",
                      help="window/full mixes only: a checkpoint unmodified transformers loads (layer_types)")
    save.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty")
    show_ck = sub.add_parser("show", help="what a checkpoint folder holds: base, rules per layer, adapters, versions")
    show_ck.add_argument("folder")

    ev = sub.add_parser("eval", help="long-context perplexity, passkey, associative recall and lm-eval, one table")
    ev.add_argument("--model", nargs="+", default=["smollm2"],
                    help="smollm2, tiny-*, or saved checkpoint folders (each is evaluated as it is)")
    ev.add_argument("--rules", default="", help="comma-separated rule sets, one row each (e.g. liger,swa,exact)")
    ev.add_argument("--lengths", default="512,2k", help="context lengths, e.g. 512,2k,8k,16k")
    ev.add_argument("--passkey-lengths", default=None, help="passkey prompt lengths (default: --lengths)")
    ev.add_argument("--tasks", default="ppl,passkey,mqar", help="any of ppl, passkey, mqar")
    ev.add_argument("--depths", default="0.1,0.5,0.9", help="passkey depths (fractions of the prompt)")
    ev.add_argument("--passkey-trials", type=int, default=1, help="passkeys per length and depth")
    ev.add_argument("--mqar-pairs", default="8,32", help="key-value pairs per recall prompt")
    ev.add_argument("--lm-eval", metavar="DIR", help="folder of lm-eval task YAML files (local data only)")
    ev.add_argument("--lm-eval-limit", type=int, default=None, help="examples per lm-eval task")
    ev.add_argument("--no-original", action="store_true", help="skip the unconverted model's row")
    ev.add_argument("--out", default="eval", help="folder for eval.json, eval.md and the plots")

    pl = sub.add_parser("plan", help="measure each layer's sensitivity to a rewrite and write a rule file that keeps "
                        "softmax where it matters most, for a budget")
    pl.add_argument("--model", default="smollm2", help="smollm2, tiny-llama|mistral|qwen2, or a model folder")
    pl.add_argument("--rules", default=DEFAULT_RULES, help=f"the rewrite to place: rule set name or YAML file "
                    f"(default: {DEFAULT_RULES})")
    pl.add_argument("--budget", type=float, default=0.25,
                    help="share of layers that keep softmax (0.25 = at most a quarter), or a whole number of layers")
    pl.add_argument("--out", required=True, help="the rule file to write (.yaml); .json and .png go beside it")
    pl.add_argument("--data", default=None, help="calibration text: folder, .txt or .jsonl (default: the training "
                    "corpus, Python's documentation without the evaluation chapters)")
    pl.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    pl.add_argument("--seq-len", type=int, default=1024, help="calibration context (rows of this many tokens)")
    pl.add_argument("--from", dest="from_json", metavar="PLAN.json",
                    help="reuse the measurements of an earlier plan (its .json): only the budget changes")
    pl.add_argument("--compare", action="store_true", help="also measure perplexity of the plan against uniform "
                    "and first/last placements at the same budget (the evaluation document)")
    pl.add_argument("--lengths", default="512,2k", help="--compare: context lengths")

    rec = sub.add_parser("recover", help="train a converted model back to quality: attention transfer, then LoRA")
    rec.add_argument("--model", default="smollm2", help="smollm2, tiny-llama|mistral|qwen2, or a model folder")
    rec.add_argument("--rules", default=DEFAULT_RULES, help=f"rule set name or YAML file (default: {DEFAULT_RULES})")
    rec.add_argument("--data", default=None, help="folder, .txt or .jsonl file, or 'stdlib' (the default plus the "
                     "standard library's docstrings, ~6x the text) (default: the offline corpus, Python's "
                     "documentation without the evaluation chapters)")
    rec.add_argument("--tokens", default="2M", help="training tokens over all stages, e.g. 300k, 2M")
    rec.add_argument("--stages", default="transfer,lora", help="transfer, lora, or both in order")
    rec.add_argument("--transfer-share", type=float, default=None,
                     help="with both stages: the transfer stage's fraction of --tokens (default 0.5)")
    rec.add_argument("--seq-len", type=int, default=512)
    rec.add_argument("--batch-size", type=int, default=1, help="sequences per step, over all processes")
    rec.add_argument("--lr", type=float, default=1e-3)
    rec.add_argument("--learned-lr", type=float, default=None,
                     help="learning rate of the rules' learned parameters (`learn: [mix]`); default 10x --lr")
    rec.add_argument("--lora-r", type=int, default=8)
    rec.add_argument("--lora-alpha", type=int, default=16)
    rec.add_argument("--lora-targets", default="q_proj,k_proj,v_proj", help="modules the lora stage adapts")
    rec.add_argument("--transfer-targets", default="q_proj,k_proj", help="modules the transfer stage adapts")
    rec.add_argument("--kl", type=float, default=0.0, help="weight of KL(teacher || student) in the lora stage")
    rec.add_argument("--held-out-tokens", default=None,
                     help="score only the first N tokens of each held-out text, e.g. 4k (default: all; quick runs)")
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--checkpoint-every", type=int, default=50, help="optimizer steps between saved states")
    rec.add_argument("--out", required=True, help="folder: checkpoint, recover.json/.md/.png, resumable state")
    rec.add_argument("--no-resume", action="store_true", help="refuse to continue a run found in --out")

    from .report.cli import add_parser as add_explain_parser

    add_explain_parser(sub)

    args = parser.parse_args(argv)
    if args.command == "explain":
        from .report.cli import run as run_explain

        return run_explain(args)
    if args.command == "kernels":
        return _kernels(args)
    if args.command in ("save", "show"):
        return _checkpoint(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "recover":
        return _recover(args)
    if args.command == "plan":
        return _plan(args)
    if args.command == "demo":
        from .demo import run_demo, run_tour

        if args.full:
            run_demo(rules=tuple(args.rules), prefill_tokens=args.prefill_tokens, ppl_tokens=args.ppl_tokens)
        else:
            run_tour(ppl_tokens=args.ppl_tokens)
        return 0
    return _rules(args)


def _eval(args) -> int:
    from .evaluate import TASKS, EvalSpec, evaluate, parse_length, table_rows

    try:
        tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"--tasks: unknown {', '.join(unknown)}; choose from {', '.join(TASKS)}")
        passkey_lengths = tuple(parse_length(x) for x in args.passkey_lengths.split(",")) \
            if args.passkey_lengths else None
        spec = EvalSpec(lengths=tuple(parse_length(x) for x in args.lengths.split(",")), tasks=tasks,
                        passkey_lengths=passkey_lengths,
                        depths=tuple(float(x) for x in args.depths.split(",")), passkey_trials=args.passkey_trials,
                        mqar_pairs=tuple(int(x) for x in args.mqar_pairs.split(",")), lm_eval=args.lm_eval,
                        lm_eval_limit=args.lm_eval_limit)
        rules = [r.strip() for r in args.rules.split(",") if r.strip()]
        result = evaluate(args.model, rules=rules, spec=spec, original=not args.no_original, out=args.out)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.table import Table

    header, rows = table_rows(result)
    table = Table(title=f"linearize eval ({result['wall_seconds']:.0f} s)", show_lines=False)
    for h in header:
        table.add_column(h, overflow="fold")
    for r in rows:
        table.add_row(*r)
    Console().print(table)
    print(f"long document: {result['document']}; wrote {', '.join(result['files'])}")
    return 0


def _recover(args) -> int:
    from .data import CorpusError
    from .models import load
    from .recovery import RecoverError, markdown, recover
    from .rewrite import rules as R

    split = lambda text: tuple(t.strip() for t in text.split(",") if t.strip())  # noqa: E731
    try:
        model, tok = load(args.model)
        recover(model, rules=args.rules, data=args.data, tokens=parse_count(args.tokens), stages=split(args.stages),
                transfer_share=args.transfer_share,
                out=args.out, tokenizer=tok, resume=not args.no_resume, seq_len=args.seq_len,
                batch_size=args.batch_size, lr=args.lr, learned_lr=args.learned_lr, lora_r=args.lora_r,
                lora_alpha=args.lora_alpha,
                lora_targets=split(args.lora_targets), transfer_targets=split(args.transfer_targets), kl=args.kl,
                seed=args.seed, checkpoint_every=args.checkpoint_every, model_spec=args.model,
                held_out_tokens=parse_count(args.held_out_tokens) if args.held_out_tokens else None)
    except (RecoverError, CorpusError, R.RuleError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import json
    import pathlib

    result = json.loads((pathlib.Path(args.out) / "recover.json").read_text())
    print(markdown(result))
    print(f"trained {result['seconds'] / 60:.1f} min; wrote {args.out} (a checkpoint: linearize eval --model "
          f"{args.out}; its adapter/ folder alone works too), recover.md, recover.png")
    return 0


def _plan(args) -> int:
    from .data import CorpusError
    from .evaluate import parse_length
    from .planning import Plan, PlanError, comparison_lines, compare, plan
    from .rewrite import RuleError

    try:
        if args.from_json:
            p = Plan.from_json(args.from_json).with_budget(args.budget)
            model = tok = None
        else:
            from .models import load

            model, tok = load(args.model)
            p = plan(model, rules=args.rules, budget=args.budget, data=args.data, tokens=args.tokens,
                     seq_len=args.seq_len, tokenizer=tok, model_name=args.model)
        if args.compare:
            if model is None:
                from .models import load

                model, tok = load(args.model)
            if tok is None:
                raise PlanError(f"--compare: model {args.model!r} has no tokenizer; perplexity needs text")
            compare(model, p, tok, lengths=[parse_length(x) for x in args.lengths.split(",")])
        files = p.write(args.out)
    except (PlanError, RuleError, CorpusError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ranked = sorted((c for c in p.layers if c.kl is not None), key=lambda c: -c.kl)
    print(f"measured {len(ranked)} layer(s) in {p.seconds:.0f} s; most sensitive: "
          + ", ".join(f"{c.layer} ({c.kl:.4f})" for c in ranked[:5]))
    print(f"softmax kept in layers {', '.join(map(str, p.keep)) or 'none'} ({len(p.keep)} of {p.num_layers})")
    if p.comparison:
        print("\n".join(comparison_lines(p.comparison)))
    print("wrote " + ", ".join(str(f) for f in files) + f"; use it with rules: {files[0]}")
    return 0


def parse_count(text: str) -> int:
    """'300k', '2M', '1500' -> a token count (k = 1000, M = 1,000,000)."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", str(text))
    if not m:
        raise SystemExit(f"error: --tokens {text!r}: write a count such as 300k or 2M")
    return int(float(m.group(1)) * {"": 1, "k": 1000, "m": 1_000_000}[m.group(2).lower()])


def _checkpoint(args) -> int:
    """`linearize save` / `linearize show`: a refused input is one line on stderr and exit 2."""
    import time

    from .checkpoint import CheckpointError, export_native, save_pretrained, show
    from .rewrite import rules as R

    try:
        if args.command == "show":
            print(show(args.folder))
            return 0
        from .generation import convert
        from .models import load

        start = time.perf_counter()
        model, tok = load(args.model)
        if args.native:
            result = export_native(model, args.out, rules=args.rules, tokenizer=tok, overwrite=args.overwrite)
            print(f"wrote {args.out}: native {result['model_type']} checkpoint, layer_types "
                  f"{result['layer_types']}, sliding_window {result['sliding_window']}; logits equal linearize's "
                  f"within {result['max_diff']:.1e} ({time.perf_counter() - start:.1f} s)")
            return 0
        if getattr(model, "_linearize_rules", None) is None:
            convert(model, rules=args.rules)
        save_pretrained(model, args.out, tokenizer=tok, lora=args.lora, overwrite=args.overwrite)  # rules as run
        print(show(args.out))
        print(f"saved in {time.perf_counter() - start:.1f} s (model loading included)")
        return 0
    except (CheckpointError, R.RuleError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


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
