"""End-to-end demo on the CPU: linearize SmolLM2-135M-Instruct and show what changed.

    python -c "from linearize.demo import run_demo; run_demo()"

Prints, with rich:
  (a) the attention sites found per layer and what each rule set rewrites them to (``linearize.explain``),
  (b) the ``exact`` rule set's max |logit difference| against the original model (must be ~0),
  (c) perplexity of the original model and of each rule set on :func:`linearize.data.english_text`,
  (d) prefill time (one forward, no grad, after one warm-up) of the original vs the converted model,
  (e) compile time per rule set,
and returns every number in a dict.

The original model is the transformers model as loaded (eager, SDPA attention). Converted models are
``torch.compile(model, backend="linearize", options={"rules": r}, dynamic=False)``: static shapes, so the
perplexity length and the prefill length each compile once (the second is reported as ``recompile_s``).
The original is timed at the start and again right after each converted model (the machine's load
drifts; we report its best time, all of them under ``prefill_original_all_s``).
Prefill calls pass ``logits_to_keep=1`` as ``generate`` does (only the last position's logits are needed),
so the timing is the transformer stack, not a ``tokens x 49152`` output projection.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Sequence

import torch

from .data import english_text_source, english_token_ids, perplexity
from .options import DEFAULT_RULES

__all__ = ["run_tour", "run_demo", "time_forward", "compile_linearized", "require_backend"]

BACKEND = "linearize"
PREFILL_KWARGS = {"use_cache": False, "logits_to_keep": 1}
SCORE_KWARGS = {"use_cache": False}


# ----------------------------------------------------------------------------------------------
# the default tour: original vs converted zero-shot vs recovered, a few minutes, 80 columns
# ----------------------------------------------------------------------------------------------


def run_tour(new_tokens: int = 24, ppl_tokens: int = 512, width: int = 80, echo=print) -> dict:
    """`linearize demo`: SmolLM2 as loaded, converted with the default rules (no training), and converted with the
    recovered adapter that ships with linearize (`linearize/recovered/`). For each: perplexity on the first
    `ppl_tokens` of CPython's LICENSE (held out of training), the cache after a greedy continuation (a growing
    DynamicCache vs a constant StateCache), whether token-by-token decoding equals one full forward, and the
    continuation itself. One line per step as it goes, so a log shows progress too; nothing wider than `width`."""
    import textwrap

    from transformers import DynamicCache

    from .generation import StateCache, convert, decode_logits
    from .models import load_smollm2
    from .recovery import load_learned_file, shipped_adapter

    start = time.perf_counter()
    say = lambda text: echo(f"[{time.perf_counter() - start:5.0f} s] {text}", flush=True)  # noqa: E731
    say("loading SmolLM2-135M-Instruct (GGUF, offline) ...")
    base, tok = load_smollm2()
    ids = english_token_ids(tok)
    ppl_ids, prompt = ids[:, :ppl_tokens], ids[:, :96]
    from peft import PeftModel

    folder, meta = shipped_adapter(DEFAULT_RULES)
    model = PeftModel.from_pretrained(base, str(folder))  # adapters on the shared weights, no copy
    rows: dict[str, dict] = {}

    def measure(name: str, converted: bool):
        say(f"{name}: perplexity on {ppl_ids.shape[1]} tokens of {english_text_source().name} ...")
        ppl = perplexity(model, ppl_ids, window=ppl_ids.shape[1])
        say(f"{name}: {new_tokens} greedy tokens ...")
        cache = StateCache(model, max_length=prompt.shape[1] + new_tokens) if converted \
            else DynamicCache(config=base.config)
        with torch.no_grad():
            gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                                 max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id or 0)
        nbytes = cache.nbytes() if converted else sum(
            t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        diff = None
        if converted:
            inner = model.get_base_model()  # what generate runs: the compiled transformers model, adapters inside
            with torch.no_grad():
                full = inner(input_ids=gen, use_cache=False).logits
            stepped = decode_logits(inner, gen, StateCache(model, max_length=gen.shape[1]), prompt.shape[1])
            diff = (stepped - full).abs().max().item()
        rows[name] = {"ppl": ppl, "cache_bytes": nbytes, "grows": not converted, "decode_vs_full": diff,
                      "text": tok.decode(gen[0, prompt.shape[1]:], skip_special_tokens=True)}

    # Dynamo compiles each distinct call once (512-token scoring, the prompt, one-token steps, the full re-check),
    # and again with the adapters on: more than its default limit of 8. Past the limit a converted model raises
    # (linearize.convert: Dynamo would otherwise run the frame eagerly, i.e. softmax), so raise the limit.
    with torch._dynamo.config.patch(recompile_limit=32):
        with model.disable_adapter():
            measure("original", converted=False)
            say(f"converting with rules={DEFAULT_RULES!r} (linearize.convert, inner='eager') ...")
            convert(model, rules=DEFAULT_RULES, inner="eager")
            measure("zero-shot", converted=True)  # learned recipe parameters (if the rules have any) at their start
        load_learned_file(model, DEFAULT_RULES, folder)
        measure("recovered", converted=True)
    

    line = "-" * width
    echo(line)
    echo(textwrap.fill(f"SmolLM2-135M, rules {DEFAULT_RULES!r}; recovered = LoRA r={meta['lora_r']} after "
                       f"{meta['tokens'] // 1000}k tokens of `linearize recover` "
                       f"({meta.get('corpus_short', meta['corpus'])})", width))
    echo(f"{'model':<11}{'perplexity':>11}{'x orig':>8}{'cache':>12}  {'decode = full forward':<22}")
    orig = rows["original"]["ppl"]
    for name, r in rows.items():
        cache = f"{r['cache_bytes'] / 2**20:.2f} MiB" + ("+" if r["grows"] else "")
        same = "-" if r["decode_vs_full"] is None else f"yes ({r['decode_vs_full']:.0e})"
        echo(f"{name:<11}{r['ppl']:>11.2f}{r['ppl'] / orig:>8.2f}{cache:>12}  {same:<22}")
    echo("cache: after the prompt and continuation; + = grows with every token (a StateCache does not)")
    echo(line)
    echo(textwrap.fill(f"prompt (last 24 of {prompt.shape[1]} tokens): {tok.decode(prompt[0, -24:])!r}", width))
    for name, r in rows.items():
        echo(textwrap.fill(repr(r["text"]), width=width, initial_indent=f"{name + ':':<11}",
                           subsequent_indent=" " * 11))
    echo(line)
    echo(textwrap.fill(f"{time.perf_counter() - start:.0f} s. More: linearize demo --full (sites, exactness, speed; "
                       "~11 min), linearize eval, linearize recover", width))
    return rows


# ----------------------------------------------------------------------------------------------
# helpers shared with bench/prefill.py
# ----------------------------------------------------------------------------------------------


def require_backend():
    """Import-time guards: the explain API and the registered Dynamo backend. Returns ``linearize.explain``."""
    try:
        from linearize import explain  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"linearize.explain is not importable ({exc}); the demo needs the backend package "
            "(linearize/backend.py, linearize/explain.py)"
        ) from exc
    from torch._dynamo.backends.registry import lookup_backend

    try:
        lookup_backend(BACKEND)
    except Exception as exc:  # InvalidBackend
        raise RuntimeError(
            f"the Dynamo backend {BACKEND!r} is not registered ({type(exc).__name__}); it is registered "
            "through the torch_dynamo_backends entry point: install the package with `pip install -e .`"
        ) from exc
    return explain


def compile_linearized(model, rules: str):
    """``torch.compile(model, backend="linearize", options={"rules": rules}, dynamic=False)``."""
    if rules == DEFAULT_RULES:  # the default rule set: the backend name alone is enough
        return torch.compile(model, backend=BACKEND, dynamic=False)
    return torch.compile(model, backend=BACKEND, options={"rules": rules}, dynamic=False)


@torch.no_grad()
def time_forward(model, ids: torch.Tensor, warmup: int = 1, repeats: int = 1, **kwargs) -> dict:
    """Wall time of ``model(ids, **kwargs)``: ``warmup`` untimed calls (the first may compile), then ``repeats``.

    Returns ``{"first_s": first warm-up call, "times_s": [...], "best_s", "median_s", "cpu_s": [...],
    "best_cpu_s"}``; ``cpu_s`` is the process CPU time (all threads) of each timed call, which other
    processes on a shared machine disturb much less than the wall time.
    """
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        model(ids, **kwargs)
        if i == 0:
            first = time.perf_counter() - t0
    times, cpu = [], []
    for _ in range(max(1, repeats)):
        c0, t0 = time.process_time(), time.perf_counter()
        model(ids, **kwargs)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    s = sorted(times)
    return {"first_s": first, "times_s": times, "best_s": s[0], "median_s": s[len(s) // 2],
            "cpu_s": cpu, "best_cpu_s": min(cpu)}


def _is_rewritten(rewrite: Any) -> bool:
    return rewrite not in (None, "", "keep")


# ----------------------------------------------------------------------------------------------
# the demo
# ----------------------------------------------------------------------------------------------


def _normalise_option_name() -> str | None:
    """The backend option that turns on the normalised linear branch, if the backend has one."""
    try:
        from dataclasses import fields

        from linearize.options import Options
    except ImportError:
        return None
    names = {f.name for f in fields(Options)}
    for cand in ("normalize", "normalise", "normalized", "normalised"):
        if cand in names:
            return cand
    return None


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)


def run_demo(
    rules: Sequence[str] = ("liger", "swa", "gla"),
    prefill_tokens: int = 4096,
    ppl_tokens: int = 512,
    console=None,
) -> dict:
    """Convert SmolLM2 with each rule set in ``rules`` and report sites, exactness, perplexity, speed.

    ``ppl_tokens``: perplexity is measured on the first ``ppl_tokens`` tokens of ``english_text()`` in one
    window (at most the ~3,800 tokens the text has). ``prefill_tokens``: length of the timed prefill
    (the text repeated as needed). Returns a dict with keys ``model``, ``text``, ``sites``, ``exact``,
    ``perplexity``, ``prefill_s``, ``prefill_speedup`` (original time / converted time), ``prefill_cpu_s``,
    ``prefill_cpu_speedup`` (the same by process CPU time), ``compile_s``, ``recompile_s``, ``skipped``.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .models import load_smollm2

    console = console or Console()
    rules = tuple(rules)
    explain = require_backend()
    norm_opt = _normalise_option_name()
    variants: list[tuple[str, str, dict]] = [(r, r, {"rules": r}) for r in rules]
    skipped: dict[str, str] = {}
    if "liger" in rules:
        if norm_opt:
            variants.insert(rules.index("liger") + 1, ("liger, normalised", "liger", {"rules": "liger", norm_opt: True}))
        else:
            skipped["liger, normalised"] = "the backend has no normalise option"

    out: dict[str, Any] = {"rules": list(rules), "skipped": skipped}
    steps = 2 + len(rules) + 1 + 2 * len(variants)
    progress = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console, transient=True,
    )
    say = progress.console.print

    with progress:
        task = progress.add_task("loading SmolLM2-135M-Instruct (GGUF, offline)", total=steps)

        def step(desc: str | None = None):
            progress.advance(task)
            if desc:
                progress.update(task, description=desc)

        # -- model and text ---------------------------------------------------------------------
        t0 = time.perf_counter()
        model, tok = load_smollm2()
        load_s = time.perf_counter() - t0
        cfg = model.config
        out["model"] = {
            "name": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32)", "load_s": load_s,
            "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
            "head_dim": getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
            "attn_implementation": cfg._attn_implementation, "threads": torch.get_num_threads(),
        }
        all_ids = english_token_ids(tok)
        n_ppl = min(ppl_tokens, all_ids.shape[1])
        ppl_ids = all_ids[:, :n_ppl]
        pre_ids = english_token_ids(tok, prefill_tokens, repeat=True)
        out["text"] = {"source": str(english_text_source()), "tokens": all_ids.shape[1], "ppl_tokens": n_ppl,
                       "prefill_tokens": pre_ids.shape[1]}
        say(f"[bold]SmolLM2-135M-Instruct[/] loaded in {load_s:.1f} s: {cfg.num_hidden_layers} layers, "
            f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, attention {cfg._attn_implementation!r}; "
            f"text: {english_text_source().name} ({all_ids.shape[1]} tokens), {torch.get_num_threads()} threads")
        step("original model: perplexity and prefill")

        # -- original model -----------------------------------------------------------------------
        with torch.no_grad():
            ref_logits = model(ppl_ids, **SCORE_KWARGS).logits
        ppl = {"original": perplexity(model, ppl_ids, window=n_ppl)}
        t_orig = time_forward(model, pre_ids, warmup=1, repeats=1, **PREFILL_KWARGS)
        orig_times = [t_orig["best_s"]]  # the original is timed again next to each converted model
        orig_cpu = [t_orig["best_cpu_s"]]
        step()

        # -- (a) sites ------------------------------------------------------------------------------
        sites: dict[str, list] = {}
        for r in rules:
            progress.update(task, description=f"linearize.explain(rules={r!r})")
            rep = explain(model, ppl_ids, rules=r, **SCORE_KWARGS)
            sites[r] = rep.sites
            step()
        out["sites"] = {
            r: [{"layer": s.layer, "module_path": s.module_path, "rewrite": s.rewrite,
                 "provenance_found": bool(getattr(s, "provenance_found", s.provenance is not None))} for s in ss]
            for r, ss in sites.items()
        }
        say(_sites_table(sites, Table))

        # -- (b) exact --------------------------------------------------------------------------------
        progress.update(task, description="rules='exact': compile and compare logits")
        torch._dynamo.reset()
        compiled = compile_linearized(model, "exact")
        t0 = time.perf_counter()
        with torch.no_grad():
            ex_logits = compiled(ppl_ids, **SCORE_KWARGS).logits
        first = time.perf_counter() - t0
        t_run = time_forward(compiled, ppl_ids, warmup=0, repeats=1, **SCORE_KWARGS)["best_s"]
        diff = (ex_logits.float() - ref_logits.float()).abs().max().item()
        out["exact"] = {"max_abs_logit_diff": diff, "compile_s": max(first - t_run, 0.0),
                        "argmax_agreement": (ex_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()}
        del compiled, ex_logits
        torch._dynamo.reset()
        ok = diff < 1e-3
        say(f"(b) rules='exact': max |logit diff| vs original = [{'green' if ok else 'red'}]{diff:.3g}[/] over "
            f"{n_ppl} tokens x {cfg.vocab_size} logits; argmax agreement {out['exact']['argmax_agreement']:.4f}")
        step()

        # -- (c)-(e) per rule set --------------------------------------------------------------------
        prefill: dict[str, float] = {}
        prefill_cpu: dict[str, float] = {}
        compile_s: dict[str, float] = {"exact": out["exact"]["compile_s"]}
        recompile_s: dict[str, float] = {}
        for label, _r, opts in variants:
            progress.update(task, description=f"{label}: compile + perplexity ({n_ppl} tokens)")
            torch._dynamo.reset()
            compiled = torch.compile(model, backend=BACKEND, options=opts, dynamic=False)
            t0 = time.perf_counter()
            with torch.no_grad():
                compiled(ppl_ids, **SCORE_KWARGS)
            first = time.perf_counter() - t0
            t_run = time_forward(compiled, ppl_ids, warmup=0, repeats=1, **SCORE_KWARGS)["best_s"]
            compile_s[label] = max(first - t_run, 0.0)
            ppl[label] = perplexity(compiled, ppl_ids, window=n_ppl)
            step(f"{label}: prefill {pre_ids.shape[1]} tokens")
            t = time_forward(compiled, pre_ids, warmup=1, repeats=1, **PREFILL_KWARGS)
            prefill[label] = t["best_s"]
            prefill_cpu[label] = t["best_cpu_s"]
            # the original once more, right after: on a shared machine, load drifts between minutes
            recompile_s[label] = max(t["first_s"] - t["best_s"], 0.0)
            t_o = time_forward(model, pre_ids, warmup=0, repeats=1, **PREFILL_KWARGS)
            orig_times.append(t_o["best_s"])
            orig_cpu.append(t_o["best_cpu_s"])
            del compiled
            torch._dynamo.reset()
            step()

    out["perplexity"] = ppl
    prefill = {"original": min(orig_times), **prefill}
    out["prefill_s"] = prefill
    out["prefill_original_all_s"] = orig_times
    prefill_cpu = {"original": min(orig_cpu), **prefill_cpu}
    out["prefill_cpu_s"] = prefill_cpu
    out["prefill_cpu_speedup"] = {k: prefill_cpu["original"] / v for k, v in prefill_cpu.items() if k != "original"}
    out["prefill_speedup"] = {k: prefill["original"] / v for k, v in prefill.items() if k != "original"}
    out["compile_s"] = compile_s
    out["recompile_s"] = recompile_s

    # -- tables ----------------------------------------------------------------------------------------
    t = Table(title=f"(c) perplexity on {english_text_source().name}, first {n_ppl} tokens, one window")
    t.add_column("model")
    t.add_column("perplexity", justify="right")
    t.add_column("x original", justify="right")
    for k, v in ppl.items():
        t.add_row(k, f"{v:.2f}", "1" if k == "original" else f"{v / ppl['original']:.2f}")
    for k, why in skipped.items():
        t.add_row(k, "skipped", why)
    console.print(t)

    t = Table(title=f"(d) prefill, {pre_ids.shape[1]} tokens, batch 1, one forward after a warm-up, "
                    f"{torch.get_num_threads()} CPU threads",
              caption=f"original: best of {len(orig_times)} timings taken between the others; CPU time: all threads "
                      "of this process (less disturbed by other processes than wall time)")
    t.add_column("model")
    t.add_column("seconds", justify="right")
    t.add_column("tokens/s", justify="right")
    t.add_column("speed-up vs original", justify="right")
    t.add_column("CPU seconds", justify="right")
    t.add_column("speed-up by CPU time", justify="right")
    for k, v in prefill.items():
        c = prefill_cpu[k]
        t.add_row(k, f"{v:.2f}", f"{pre_ids.shape[1] / v:,.0f}",
                  "1" if k == "original" else f"{prefill['original'] / v:.2f}x",
                  f"{c:.1f}", "1" if k == "original" else f"{prefill_cpu['original'] / c:.2f}x")
    console.print(t)

    t = Table(title="(e) compile time (first call minus one steady call)")
    t.add_column("rules")
    t.add_column(f"compile at {n_ppl} tokens, s", justify="right")
    t.add_column(f"recompile at {pre_ids.shape[1]} tokens, s", justify="right")
    for k, v in compile_s.items():
        t.add_row(k, f"{v:.1f}", _fmt(recompile_s.get(k), ".1f"))
    console.print(t)
    out["generation"] = run_generation(model, tok, rules, console=console)  # (f)
    return out


def run_generation(model, tok, rules: Sequence[str], new_tokens: int = 24, console=None) -> dict:
    """(f) Greedy generation with `model.generate`: the original with transformers' growing DynamicCache, each rule
    set with a constant-size `linearize.StateCache`. Reports cache bytes, the median decoding step, the continuation,
    and the largest logit difference between token-by-token decoding and one full forward over the same tokens."""
    from rich.console import Console
    from rich.table import Table
    from transformers import DynamicCache

    from .generation import StateCache, convert, decode_logits, revert

    console = console or Console()
    prompt = english_token_ids(tok)[:, :96]
    out: dict[str, Any] = {}

    def generate(cache):
        steps = []
        stamp = [time.perf_counter()]

        class _Clock:  # a logits processor is called once per generated token: time between calls is one step
            def __call__(self, ids, scores):
                now = time.perf_counter()
                steps.append(now - stamp[0])
                stamp[0] = now
                return scores

        with torch.no_grad():
            ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                                 max_new_tokens=new_tokens, do_sample=False, logits_processor=[_Clock()],
                                 pad_token_id=tok.eos_token_id or 0)
        return ids, sorted(steps[1:])[len(steps[1:]) // 2] if len(steps) > 1 else float("nan")

    cache = DynamicCache(config=model.config)
    ids, step_s = generate(cache)
    kv = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    out["original"] = {"bytes": kv, "step_s": step_s, "text": tok.decode(ids[0, prompt.shape[1]:]), "diff": None}
    for r in rules:
        try:
            convert(model, rules=r, inner="eager")
            cache = StateCache(model, max_length=prompt.shape[1] + new_tokens)
            ids, step_s = generate(cache)
            nbytes = cache.nbytes()
            with torch.no_grad():  # decoding vs recomputing: the same tokens, token by token and in one forward
                full = model(ids, use_cache=False).logits
            stepped = decode_logits(model, ids, StateCache(model, max_length=ids.shape[1]), prompt.shape[1])
        finally:
            revert(model)
            torch._dynamo.reset()
        out[r] = {"bytes": nbytes, "step_s": step_s, "text": tok.decode(ids[0, prompt.shape[1]:]),
                  "diff": (stepped - full).abs().max().item()}
    n = prompt.shape[1] + new_tokens
    t = Table(title=f"(f) model.generate: {prompt.shape[1]}-token prompt + {new_tokens} greedy tokens, batch 1",
              caption="cache: bytes after the last token (the original's grows by 45 KiB per token, a StateCache "
                      "not at all); decode vs full: max |logit diff| between token-by-token decoding and one forward")
    for col in ("model", "cache", "cache at 32k tokens", "step, ms", "decode vs full"):
        t.add_column(col, no_wrap=True)
    t.add_column("continuation", no_wrap=True, overflow="ellipsis", max_width=48)
    for k, v in out.items():
        at_32k = v["bytes"] / n * 32768 if k == "original" else v["bytes"]
        t.add_row(k, f"{v['bytes'] / 2**20:.2f} MiB", f"{at_32k / 2**20:,.1f} MiB", f"{v['step_s'] * 1e3:.0f}",
                  "-" if v["diff"] is None else f"{v['diff']:.1e}", repr(v["text"]))
    console.print(t)
    return out


def _sites_table(sites: dict, Table) -> Any:
    """(a): one row per layer, a column per rule set with that rule set's rewrite of the layer's site(s)."""
    rules = list(sites)
    by_layer: dict[Any, dict] = {}
    for r, ss in sites.items():
        for s in ss:
            row = by_layer.setdefault(s.layer, {"paths": [], "prov": [], "rw": {}})
            if s.module_path not in row["paths"]:
                row["paths"].append(s.module_path)
            found = bool(getattr(s, "provenance_found", s.provenance is not None))
            row["prov"].append(found)
            row["rw"].setdefault(r, []).append(s.rewrite or "-")
    t = Table(title="(a) attention sites per layer and their rewrite under each rule set (linearize.explain)",
              caption="total: sites found / rewritten (not kept as softmax)")
    t.add_column("layer", justify="right", no_wrap=True)
    t.add_column("module", no_wrap=True)
    t.add_column("provenance", no_wrap=True)
    for r in rules:
        t.add_column(r)
    for layer in sorted(by_layer, key=lambda x: (x is None, x if x is not None else 0)):
        row = by_layer[layer]
        prov = "found" if all(row["prov"]) else ("missing" if not any(row["prov"]) else "partial")
        t.add_row("-" if layer is None else str(layer), ", ".join(row["paths"]), prov,
                  *(", ".join(row["rw"].get(r, ["(none)"])) for r in rules))
    t.add_section()
    t.add_row("total", f"{len(by_layer)} layers", "",
              *(f"{len(sites[r])} / {sum(_is_rewritten(s.rewrite) for s in sites[r])}" for r in rules))
    return t


if __name__ == "__main__":  # pragma: no cover
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", nargs="+", default=["liger", "swa", "gla"])
    ap.add_argument("--prefill-tokens", type=int, default=4096)
    ap.add_argument("--ppl-tokens", type=int, default=512)
    a = ap.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        run_demo(tuple(a.rules), a.prefill_tokens, a.ppl_tokens)
