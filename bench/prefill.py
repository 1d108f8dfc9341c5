"""Prefill time of SmolLM2-135M-Instruct: the original model vs linearized ones, side by side.

    python bench/prefill.py                                   # 1k / 4k / 16k tokens, liger gla swa, 3 repeats
    python bench/prefill.py --lengths 1024 4096 --rules liger keep --repeats 5

For each length, every rule set is compiled (``torch.compile(model, backend="linearize",
options={"rules": r}, dynamic=False)``) and warmed up once; then ``--repeats`` rounds each time one
forward of the original model and of every converted model, in turn, so all of them see the same
machine load. Each is reported by its best time; the ratio is original / converted (> 1: faster).

What is timed: one forward, batch 1, ``torch.no_grad``, ``use_cache=False``, ``logits_to_keep=1``
(prefill needs only the last position's logits, as in ``generate``). The original is transformers'
eager model with SDPA attention (causal flash kernel on the CPU); add ``keep`` to ``--rules`` to also
time it through Inductor with nothing rewritten, which separates the compiler's gain from the
attention's.

Lengths past the trained context (SmolLM2: ``max_position_embeddings`` = 8192): nothing needs to be
passed. transformers' Llama rotary embedding (``rope_type`` "default") computes cos/sin from the
position ids on every call (``inv_freq @ position_ids``), with no table sized by
``max_position_embeddings`` and no check against it, and the SDPA causal mask is built from the
sequence length; ``position_ids`` default to ``arange(seq)``. So 16k tokens run as is (the
positions past 8192 are RoPE extrapolation: the model's outputs there mean little, the timing is
valid). We pass ``position_ids`` explicitly anyway, so the positions are the plain ``0..n-1`` whatever
a future transformers does by default. The text is :func:`linearize.data.english_text` repeated to
the length.

Also recorded: the process CPU time of each forward (all threads), ``cpu_*`` in the JSON. On a shared
machine other processes stretch wall times by whole factors; CPU time moves much less, so compare
the two speed-ups before believing either (with the machine to ourselves, CPU ~= wall x threads).
Under heavy load, ``--threads 1`` makes CPU time the steadier number (no OpenMP threads spinning
while they wait for a descheduled sibling).

Writes ``bench/out/prefill.json`` and, when matplotlib is installed, ``bench/out/prefill.png``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

import torch
from common import log, save_figure, token_axes, two_panels, write_results

OUT_DIR = pathlib.Path(__file__).resolve().parent / "out"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384], help="prefill lengths in tokens")
    ap.add_argument("--rules", nargs="+", default=["liger", "gla", "swa"], help="rule sets to compare with the original")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per length (best time is reported)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--out", type=pathlib.Path, default=OUT_DIR, help="output folder (default bench/out)")
    return ap.parse_args(argv)


@torch.no_grad()
def _forward_s(model, ids, pos) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one prefill forward."""
    c0, t0 = time.process_time(), time.perf_counter()
    model(ids, position_ids=pos, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - t0, time.process_time() - c0


def run(args) -> dict:
    from linearize.data import english_token_ids
    from linearize.demo import compile_linearized, require_backend
    from linearize.models import load_smollm2

    if args.threads:
        torch.set_num_threads(args.threads)
    require_backend()
    # every length x rule set is one Dynamo cache entry of the model's forward; Dynamo is reset between
    # lengths, but keep the limit clear of len(rules) so no rule set silently falls back to eager
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 4 * len(args.rules) + 8))

    t0 = time.perf_counter()
    model, tok = load_smollm2()
    load_s = time.perf_counter() - t0
    log(f"SmolLM2-135M-Instruct loaded in {load_s:.1f} s; {torch.get_num_threads()} threads")
    cfg = model.config

    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32, SDPA)",
        "max_position_embeddings": cfg.max_position_embeddings,
        "load_s": load_s,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": sys.version.split()[0],
        "repeats": args.repeats,
        "rules": list(args.rules),
        "call": "model(ids, position_ids=arange, use_cache=False, logits_to_keep=1) under no_grad",
        "lengths": {},
    }
    for n in args.lengths:
        ids = english_token_ids(tok, n, repeat=True)
        pos = torch.arange(n).unsqueeze(0)
        torch._dynamo.reset()
        log(f"{n} tokens: original warm-up")
        _forward_s(model, ids, pos)
        compiled, compile_s = {}, {}
        for r in args.rules:
            log(f"{n} tokens: compiling rules={r!r} (first call)")
            compiled[r] = compile_linearized(model, r)
            compile_s[r] = _forward_s(compiled[r], ids, pos)[0]
        times = {"original": [], **{r: [] for r in args.rules}}
        cpu = {k: [] for k in times}
        for i in range(args.repeats):
            for k in times:
                wall, c = _forward_s(model if k == "original" else compiled[k], ids, pos)
                times[k].append(wall)
                cpu[k].append(c)
            log(f"{n} tokens, round {i + 1}/{args.repeats}: "
                 + ", ".join(f"{k} {v[-1]:.2f}s (cpu {cpu[k][-1]:.1f}s)" for k, v in times.items()))
        best = {k: min(v) for k, v in times.items()}
        best_cpu = {k: min(v) for k, v in cpu.items()}
        row = {
            "best_s": best,
            "all_s": times,
            "speedup_vs_original": {r: best["original"] / best[r] for r in args.rules},
            "cpu_best_s": best_cpu,
            "cpu_all_s": cpu,
            "cpu_speedup_vs_original": {r: best_cpu["original"] / best_cpu[r] for r in args.rules},
            "first_call_s": compile_s,
            "tokens_per_s": {k: n / v for k, v in best.items()},
        }
        result["lengths"][str(n)] = row
        log(f"{n} tokens: " + ", ".join(f"{r} {row['speedup_vs_original'][r]:.2f}x" for r in args.rules)
             + f" (original {best['original']:.2f}s)")
        del compiled
        torch._dynamo.reset()
    return result


def print_table(result: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(json.dumps(result["lengths"], indent=1))
        return
    rules = result["rules"]
    t = Table(title=f"prefill, {result['model']}, {result['threads']} thread(s), best of {result['repeats']}")
    t.add_column("tokens", justify="right")
    t.add_column("original s", justify="right")
    for r in rules:
        t.add_column(f"{r} s", justify="right")
        t.add_column(f"{r} speed-up", justify="right")
    c = Table(title="the same by process CPU time (steadier on a shared machine)")
    c.add_column("tokens", justify="right")
    c.add_column("original s", justify="right")
    for r in rules:
        c.add_column(f"{r} s", justify="right")
        c.add_column(f"{r} speed-up", justify="right")
    for n, row in result["lengths"].items():
        cells = [n, f"{row['best_s']['original']:.2f}"]
        cpu_cells = [n, f"{row['cpu_best_s']['original']:.2f}"]
        for r in rules:
            cells += [f"{row['best_s'][r]:.2f}", f"{row['speedup_vs_original'][r]:.2f}x"]
            cpu_cells += [f"{row['cpu_best_s'][r]:.2f}", f"{row['cpu_speedup_vs_original'][r]:.2f}x"]
        t.add_row(*cells)
        c.add_row(*cpu_cells)
    console = Console()
    console.print(t)
    console.print(c)


def plot(result: dict, path: pathlib.Path) -> bool:
    panels = two_panels(path)
    if panels is None:
        return False
    plt, fig, ax1, ax2 = panels
    lengths = [int(n) for n in result["lengths"]]
    for k in ["original", *result["rules"]]:
        ax1.plot(lengths, [result["lengths"][str(n)]["best_s"][k] for n in lengths], marker="o", label=k)
    for r in result["rules"]:
        ax2.plot(lengths, [result["lengths"][str(n)]["speedup_vs_original"][r] for n in lengths], marker="o", label=r)
    ax2.axhline(1.0, color="grey", lw=0.8, ls="--")
    token_axes((ax1, ax2), lengths, "prefill tokens")
    ax1.set_yscale("log")
    ax1.set_ylabel("seconds (best)")
    ax1.set_title("prefill time")
    ax2.set_ylabel("original time / converted time")
    ax2.set_title("speed-up vs original (SDPA)")
    return save_figure(plt, fig, path, f"{result['model']}, CPU, {result['threads']} thread(s), torch {result['torch']}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    return write_results(run(args), args.out, "prefill", print_table, plot)


if __name__ == "__main__":
    main()
