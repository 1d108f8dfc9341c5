"""End to end on a GPU: a randomly initialised ~1B Llama (Llama-3.2-1B's shapes), original vs linearized.

    python bench/gpu/e2e.py --out OUT                 # CUDA, bf16: prefill 4k/16k/32k, decode at 1k/32k
    python bench/gpu/e2e.py --dry-run --out OUT       # CPU, Triton interpreter, a tiny config: checks the script

Real weights cannot travel to the GPU machine, so the model is random (speed does not depend on the values).
Rows: the original (transformers, SDPA attention: flash on the GPU) and each rule set (`--rules`, default liger,
liger-sinks (the default recipe) and gla) converted by `linearize.convert(copy, rules, inner="eager")`: Dynamo captures the model, the passes rewrite
every attention site, and the rewritten graph runs op by op with the generated Triton kernels (kernels="auto":
Triton on CUDA; the decode step's linear branch runs the generated decode kernel). Inductor is not used, so the
comparison is of the attention, not of a compiler, and the compile time is Dynamo + our passes alone.

Prefill: one forward of batch 1, `use_cache=False, logits_to_keep=1`, under no_grad; the first converted call per
length includes the compile (reported as `first_call_s`), then the median of `--repeats` synchronised calls.
Decode: caches filled synthetically to N tokens (bench/decode.py's fills: the original's DynamicCache gets random
keys/values of N tokens, the StateCache random states and rings in the layout a real prefill leaves), then
`--steps` timed one-token steps after warm-up ones; median step time and cache bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parents[1])]  # bench/ (decode.py, common.py) and the repository

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                rope_theta=500000.0, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=4096)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


@torch.no_grad()
def prefill_rows(models: dict, lengths, repeats: int, device: str, vocab: int, log) -> dict:
    out = {}
    for n in lengths:
        ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n)).to(device)
        pos = torch.arange(n, device=device)[None]
        row = {"median_s": {}, "first_call_s": {}}
        for name, model in models.items():
            def call():
                model(ids, position_ids=pos, use_cache=False, logits_to_keep=1)

            row["first_call_s"][name] = timed(call, device)
            row["median_s"][name] = statistics.median(timed(call, device) for _ in range(repeats))
        row["speedup_vs_original"] = {k: row["median_s"]["original"] / v for k, v in row["median_s"].items()
                                      if k != "original"}
        out[str(n)] = row
        log(f"prefill {n}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in row["median_s"].items()))
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


@torch.no_grad()
def decode_rows(original, converted: dict, contexts, warmup: int, steps: int, device: str, dtype, log) -> dict:
    from decode import dynamic_cache_bytes, fill_state_cache, synthetic_dynamic_cache

    from linearize.generation import StateCache, step

    out = {}
    for n in contexts:
        gen = torch.Generator().manual_seed(n)
        row = {"median_step_s": {}, "cache_bytes": {}, "logits_finite": {}}
        tok = torch.tensor([7], device=device)
        cache = synthetic_dynamic_cache(original.config, n, gen, device=device, dtype=dtype)
        row["cache_bytes"]["original"] = dynamic_cache_bytes(cache)

        def original_step(past=[n]):  # noqa: B006 (the position advances each step)
            mask = torch.ones(1, past[0] + 1, dtype=torch.long, device=device)
            pos = torch.tensor([[past[0]]], device=device)
            logits = original(input_ids=tok[:, None], past_key_values=cache, attention_mask=mask,
                              position_ids=pos, use_cache=True, logits_to_keep=1).logits
            past[0] += 1
            return logits

        runs = {"original": original_step}
        for name, model in converted.items():
            sc = StateCache(model, max_length=n + warmup + steps + 8, beyond_position_limit=True)
            fill_state_cache(sc, n, gen)
            row["cache_bytes"][name] = sc.nbytes()

            def converted_step(model=model, sc=sc, past=[n]):  # noqa: B006
                mask = torch.ones(1, past[0] + 1, dtype=torch.long, device=device)
                past[0] += 1
                return step(model, tok, sc, mask)

            runs[name] = converted_step
        for name, fn in runs.items():
            first = timed(fn, device)
            for _ in range(warmup - 1):
                fn()
            times = []
            for _ in range(steps):
                sync(device)
                t0 = time.perf_counter()
                logits = fn()
                sync(device)
                times.append(time.perf_counter() - t0)
            row["median_step_s"][name] = statistics.median(times)
            row.setdefault("first_step_s", {})[name] = first
            row["logits_finite"][name] = bool(torch.isfinite(logits).all())
        out[str(n)] = row
        log(f"decode at {n}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in row["median_step_s"].items()))
    return out


def run(args) -> dict:
    from common import log

    from linearize.models import tiny_model

    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        device, dtype, shape = "cpu", torch.float32, TINY
        lengths, contexts = [32], [8, 24]
        kernels = "triton"  # the interpreter: the same ops as on the GPU
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/gpu/e2e.py: no CUDA GPU (use --dry-run to check the script on CPU)")
        device, dtype, shape = "cuda", torch.bfloat16, LLAMA_1B
        lengths, contexts = args.lengths, args.contexts
        kernels = "auto"
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    original = tiny_model("llama", device=device, dtype=dtype, **shape)
    params = sum(p.numel() for p in original.parameters())
    log(f"random Llama, {params / 1e9:.2f}B parameters, {dtype}, built in {time.perf_counter() - t0:.1f} s")
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
              "torch": torch.__version__, "dtype": str(dtype), "parameters": params, "config": shape,
              "rules": args.rules, "inner": "eager", "kernels": kernels}
    from decode import converted_copy

    converted = {rules: converted_copy(original, rules, "eager", kernels=kernels) for rules in args.rules}
    compile_s = {}
    result["prefill"] = prefill_rows({"original": original, **converted}, lengths, args.repeats, device,
                                     shape["vocab_size"], log)
    first = min(result["prefill"], key=int)
    for rules in args.rules:  # first call at the first length minus a steady call: Dynamo + the passes
        row = result["prefill"][first]
        compile_s[rules] = row["first_call_s"][rules] - row["median_s"][rules]
    result["compile_s"] = compile_s
    (args.out / "e2e.json").write_text(json.dumps(result, indent=1))  # kept if the decode part is stopped
    result["decode"] = decode_rows(original, converted, contexts, args.warmup, args.steps, device, dtype, log)
    small, large = (str(c) for c in (min(contexts), max(contexts)))
    result["decode_goals"] = {
        rules: {"large_over_small": result["decode"][large]["median_step_s"][rules]
                / result["decode"][small]["median_step_s"][rules],
                "original_over_converted_at_large": result["decode"][large]["median_step_s"]["original"]
                / result["decode"][large]["median_step_s"][rules]}
        for rules in args.rules}
    return result


def plot(result: dict, path: pathlib.Path) -> bool:
    from common import save_figure, token_axes, two_panels

    panels = two_panels(path)
    if panels is None:
        return False
    plt, fig, ax1, ax2 = panels
    lengths = [int(n) for n in result["prefill"]]
    contexts = [int(n) for n in result["decode"]]
    for name in result["prefill"][str(lengths[0])]["median_s"]:
        ax1.plot(lengths, [result["prefill"][str(n)]["median_s"][name] * 1e3 for n in lengths], marker="o",
                 label=name)
        ax2.plot(contexts, [result["decode"][str(n)]["median_step_s"][name] * 1e3 for n in contexts], marker="o",
                 label=name)
    token_axes((ax1,), lengths, "prefill tokens")
    token_axes((ax2,), contexts, "context (tokens in the cache)")
    ax1.set_yscale("log")
    ax1.set_ylabel("ms (median)")
    ax1.set_title("prefill, batch 1")
    ax2.set_ylabel("ms per token (median)")
    ax2.set_title("decode step, batch 1")
    return save_figure(plt, fig, path, f"random Llama {result['parameters'] / 1e9:.2f}B, {result['dtype']}, "
                                       f"{result['device']}")


def main(argv=None) -> dict:
    from common import write_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 32768])
    ap.add_argument("--rules", nargs="+", default=["liger", "liger-sinks", "gla"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out", type=pathlib.Path, default=HERE.parent / "out")
    args = ap.parse_args(argv)
    if args.dry_run:
        args.repeats, args.warmup, args.steps = 1, 1, 1

    def table(result):
        print(json.dumps({k: result[k] for k in ("compile_s", "decode_goals")}, indent=1))

    return write_results(run(args), args.out, "e2e", table, plot)


if __name__ == "__main__":
    main()
