"""Constant-memory decoding of SmolLM2-135M-Instruct: cache bytes and per-token latency vs context, original vs converted.

    python bench/decode.py --threads 1                                   # 1k / 4k / 16k / 32k, liger gla swa
    python bench/decode.py --threads 1 --contexts 1024 4096 --rules liger
    python bench/decode.py --threads 1 --real-prefill                    # real prefill at every context (slow)
    python bench/decode.py --threads 1 --out docs/decode_bench           # where the committed numbers come from

What it measures, for each context N (``--contexts``), with N tokens already in the cache:

* cache bytes: the original's transformers ``DynamicCache`` (keys and values of every layer, growing with N:
  30 layers x 2 x 3 KV heads x N x 64 x 4 bytes = 46,080 B per token) and, for each rule set of ``--rules``, the
  converted model's :class:`linearize.generation.StateCache` (``cache.nbytes()``: recurrent states / rings of the
  last W keys, the same at every N);
* per-token decode latency: one decoding step (batch 1, one new token, ``torch.no_grad``), ``--warmup`` untimed
  steps, then ``--steps`` timed ones; the median wall time and the median process CPU time (all threads) of a step
  are reported. The timed steps of the original and of every converted model are interleaved (one step of each, in
  turn, per round), so all of them see the same machine load; the ratios converted / original (< 1: smaller /
  faster) are of numbers taken side by side in the same run.

The original is transformers' eager model with SDPA attention, called as ``generate`` calls it:
``model(input_ids=tok[:, None], past_key_values=DynamicCache, attention_mask=ones(1, past + 1),
position_ids=[[past]], use_cache=True, logits_to_keep=1)``. Its cache grows by one token per step (the step cost
includes ``DynamicCache.update``'s ``torch.cat``, which copies the layer's whole cache: that is what decoding with
a DynamicCache costs). The converted models are separate copies of the module (sharing the weight tensors, so the
original stays an uncompiled eager model) compiled in place by ``linearize.convert(copy, rules=r, inner=...)``
(``--inner``, default ``eager``: the rewritten graph runs op by op, like the original, so the comparison is of the
attention and its cache, not of a compiler; ``--inner inductor`` for the library's default), stepped by
:func:`linearize.generation.step` into a ``StateCache(model, max_length=N + 64, beyond_position_limit=True)``.

How the caches are filled (synthetic, by default): filling one with N real tokens means a prefill of N tokens,
which for the original is quadratic (16k tokens: minutes on a laptop CPU, 32k far more). A decoding step's time
depends only on the shapes of what it reads, not on the values, so by default the caches are filled directly:
the original's ``DynamicCache`` gets, per layer, random keys and values of shape [1, 3, N, 64] through
``DynamicCache.update`` (exactly the tensors, so exactly the memory, of a real cache after N tokens); a
``StateCache`` gets ``cumulative_length`` set to N in every layer, random finite values in its states and rings
(states non-negative, so a normalised state has a positive denominator) and, in each ring of W keys, the last W
positions N-W .. N-1 in slots ``position % W`` (the layout a real prefill leaves there). The logits of every timed
step are checked to be finite.

The check that this is faithful: at the smallest context (at every context with ``--real-prefill``) both caches
are also filled for real, by a chunked prefill (``--prefill-chunk`` tokens per forward, default 1024) of N tokens
of real English text (:func:`linearize.data.english_token_ids`, the text repeated to length); the script asserts
that the real cache's bytes equal the synthetic one's, that every layer has seen N tokens, and that each ring holds
positions N-W .. N-1 in the slots the synthetic fill uses; then it times the same decode steps on the real caches
and reports them next to the synthetic-fill timings (``real_prefill`` in the JSON).

Recompilation: the converted model is a Dynamo-compiled module; the script counts the graphs Dynamo compiles
during the warm-up steps and during the timed steps (``torch._dynamo.utils.counters["stats"]["unique_graphs"]``,
with the guard failures that caused them), per model and context, and warns if a timed step compiled anything:
the timings are only steady-state decoding if none did. Compilations in the warm-up are expected: the first step
of each rule set (``step`` marks the growing 2-D attention mask dynamic up front, so there is no second one) and the
first step at every new context (a StateCache's capacity, ``max_length``, is specialised in the graph). Dynamo's recompile
limit is raised (each rule set x context is a cache entry of the same ``forward``), so no rule set silently falls
back to eager (it could not: a StateCache's marker op raises when run without the rewrite).

Contexts past the trained 8192 positions: RoPE is computed from the position ids with no table, so they run; the
outputs there mean little, the timings and bytes are valid (``beyond_position_limit=True`` lets the StateCache go
there). On a shared machine compare the CPU-time medians too; ``--threads 1`` makes them the steadier number.

Writes ``decode.json`` and, when matplotlib is installed, ``decode.png`` (bytes and latency vs context, log-x) to
``--out`` (default ``bench/out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import platform
import statistics
import sys
import time

import torch
from common import log, save_figure, token_axes, two_panels, write_results

OUT_DIR = pathlib.Path(__file__).resolve().parent / "out"
ORIGINAL = "original"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768],
                    help="tokens in the cache when the decode steps are timed")
    ap.add_argument("--rules", nargs="+", default=["liger", "gla", "swa"], help="rule sets to compare with the original")
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per model and context (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed decode steps first (the first ones may compile)")
    ap.add_argument("--inner", default="eager", help="linearize's inner compiler for the converted models "
                                                     "(eager, or inductor: the library's default)")
    ap.add_argument("--real-prefill", action="store_true",
                    help="check a real prefill against the synthetic fill at every context, not just the smallest")
    ap.add_argument("--prefill-chunk", type=int, default=1024, help="tokens per forward of the real prefill")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic cache contents")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--out", type=pathlib.Path, default=OUT_DIR, help="output folder (default bench/out)")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------------------------------- caches
def dynamic_cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if isinstance(t, torch.Tensor))


def synthetic_dynamic_cache(config, n: int, gen: torch.Generator, device="cpu", dtype=torch.float32):
    """A DynamicCache holding, per layer, random keys and values of n tokens (what a prefill of n tokens leaves)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for i in range(config.num_hidden_layers):
        k = torch.randn(1, heads, n, head_dim, generator=gen).to(device, dtype)
        v = torch.randn(1, heads, n, head_dim, generator=gen).to(device, dtype)
        cache.update(k, v, i)
    return cache


def _ring_positions(n: int, window: int) -> torch.Tensor:
    """ring_pos after n tokens: position p in slot p % W for the last W positions, -1 in slots never written."""
    ring = torch.full((window,), -1, dtype=torch.long)
    p = torch.arange(max(n - window, 0), n)
    ring[p % window] = p
    return ring


def fill_state_cache(cache, n: int, gen: torch.Generator) -> None:
    """Make a fresh StateCache look as if it had seen n tokens: lengths n, random finite states and rings."""
    from linearize.generation.cache import KVLayer, StateLayer

    for layer in cache.layers:
        if isinstance(layer, StateLayer):
            layer.cumulative_length.fill_(n)
            for name, t in layer.buffers.items():
                if name == "ring_pos":
                    t.copy_(_ring_positions(n, t.shape[-1]).expand_as(t))
                elif name in ("state", "norm"):  # sums of non-negative features: keep denominators positive
                    t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype))
                else:
                    t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
        elif isinstance(layer, KVLayer):  # a site kept as softmax: a preallocated KV cache, first n slots used
            for t in (layer.keys, layer.values):
                t[:, :, :n].copy_(torch.randn(t[:, :, :n].shape, generator=gen).to(t.dtype))
            layer.cumulative_length.fill_(n)
        else:
            raise TypeError(f"unknown StateCache layer {type(layer).__name__}")


def check_state_cache_layout(cache, n: int) -> None:
    """What fill_state_cache assumes of a cache that has really seen n tokens (asserted after a real prefill)."""
    from linearize.generation.cache import StateLayer

    for i, layer in enumerate(cache.layers):
        seen = int(layer.cumulative_length)
        assert seen == n, f"layer {i}: cumulative_length {seen} after a prefill of {n} tokens"
        if isinstance(layer, StateLayer) and "ring_pos" in layer.buffers:
            ring = layer.buffers["ring_pos"]
            want = _ring_positions(n, ring.shape[-1]).expand_as(ring)
            assert torch.equal(ring, want), f"layer {i}: ring positions after a real prefill differ from the " \
                                            f"synthetic layout: {ring.tolist()} vs {want.tolist()}"


# ---------------------------------------------------------------------------------------------- models
def converted_copy(model, rules: str, inner: str, **options):
    """A copy of the module sharing the weights, compiled in place by linearize.convert (the original is untouched)."""
    import linearize

    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    clone = copy.deepcopy(model, memo=shared)
    linearize.convert(clone, rules=rules, inner=inner, **options)
    return clone


class Decoder:
    """One model and its cache, stepped one token at a time; times each step and counts Dynamo compilations."""

    def __init__(self, name: str, model, cache, n: int, tokens: torch.Tensor):
        self.name, self.model, self.cache, self.past, self.tokens = name, model, cache, n, tokens
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.first_s: float | None = None
        self.graphs = {"warmup": 0, "timed": 0}
        self.breaks = {"warmup": 0, "timed": 0}
        self.recompile_reasons: list[str] = []
        self.finite = True

    @torch.no_grad()
    def _call(self):
        tok = self.tokens[self.past % self.tokens.numel()].reshape(1)
        mask = torch.ones(1, self.past + 1, dtype=torch.long)
        if self.name == ORIGINAL:
            pos = torch.tensor([[self.past]])
            c0, t0 = time.process_time(), time.perf_counter()
            logits = self.model(input_ids=tok[:, None], past_key_values=self.cache, attention_mask=mask,
                                position_ids=pos, use_cache=True, logits_to_keep=1).logits[:, -1]
        else:
            from linearize.generation import step

            c0, t0 = time.process_time(), time.perf_counter()
            logits = step(self.model, tok, self.cache, mask)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        self.past += 1
        self.finite &= bool(torch.isfinite(logits).all())
        return wall, cpu

    def run(self, phase: str) -> float:
        from torch._dynamo.utils import counters, guard_failures

        before = counters["stats"]["unique_graphs"]
        breaks_before = sum(counters["graph_break"].values())
        reasons_before = {code: len(r) for code, r in guard_failures.items()}
        wall, cpu = self._call()
        self.graphs[phase] += counters["stats"]["unique_graphs"] - before
        self.breaks[phase] += sum(counters["graph_break"].values()) - breaks_before
        for code, reasons in guard_failures.items():  # every cache entry's failed guard on a miss: keep new ones
            for r in list(reasons)[reasons_before.get(code, 0):]:
                line = f"{phase}: {getattr(code, 'co_name', code)}: {str(r).splitlines()[0][:200]}"
                if line not in self.recompile_reasons:
                    self.recompile_reasons.append(line)
        if self.first_s is None:
            self.first_s = wall
        if phase == "timed":
            self.wall.append(wall)
            self.cpu.append(cpu)
        return wall

    def summary(self) -> dict:
        return {
            "median_s": statistics.median(self.wall),
            "cpu_median_s": statistics.median(self.cpu),
            "all_s": self.wall,
            "cpu_all_s": self.cpu,
            "first_step_s": self.first_s,
            "graphs_compiled": dict(self.graphs),
            "graph_breaks": dict(self.breaks),
            "recompile_reasons": self.recompile_reasons[:12],
            "logits_finite": self.finite,
        }


def time_decoders(decoders: list[Decoder], warmup: int, steps: int, label: str) -> None:
    from tqdm import tqdm

    for d in decoders:
        for _ in range(warmup):
            d.run("warmup")
        log(f"{label}: {d.name} warm-up: first step {d.first_s:.2f}s, {d.graphs['warmup']} graph(s) compiled, "
             f"{d.breaks['warmup']} graph break(s)")
    for _ in tqdm(range(steps), desc=f"{label}: timed rounds", leave=False, file=sys.stdout):
        for d in decoders:
            d.run("timed")
    for d in decoders:
        if d.graphs["timed"]:
            log(f"WARNING {label}: {d.name} compiled {d.graphs['timed']} graph(s) during the timed steps: "
                 + "; ".join(d.recompile_reasons[-3:]))
        if not d.finite:
            log(f"WARNING {label}: {d.name} produced non-finite logits")


# ---------------------------------------------------------------------------------------------- real prefill
@torch.no_grad()
def real_prefill_original(model, ids: torch.Tensor, chunk: int):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    n = ids.shape[1]
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        model(input_ids=ids[:, s:e], past_key_values=cache, attention_mask=torch.ones(1, e, dtype=torch.long),
              position_ids=torch.arange(s, e)[None], use_cache=True, logits_to_keep=1)
    return cache


def real_prefill_check(models: dict, ids: torch.Tensor, n: int, synthetic_bytes: dict, args) -> dict:
    """Prefill n real tokens into fresh caches, assert their bytes equal the synthetic ones', time decode steps."""
    from linearize.generation import StateCache, prefill

    decoders, out = [], {"tokens": n, "chunk": args.prefill_chunk, "prefill_s": {}, "bytes": {}}
    for name, model in models.items():
        t0 = time.perf_counter()
        if name == ORIGINAL:
            cache = real_prefill_original(model, ids, args.prefill_chunk)
            nbytes = dynamic_cache_bytes(cache)
            assert cache.get_seq_length() == n, (cache.get_seq_length(), n)
        else:
            cache = StateCache(model, batch_size=1, max_length=n + 64, beyond_position_limit=True)
            prefill(model, ids, cache, chunk_size=args.prefill_chunk)
            nbytes = cache.nbytes()
            check_state_cache_layout(cache, n)
        out["prefill_s"][name] = time.perf_counter() - t0
        out["bytes"][name] = nbytes
        assert nbytes == synthetic_bytes[name], \
            f"{n} tokens, {name}: a real prefill leaves {nbytes} cache bytes, the synthetic fill {synthetic_bytes[name]}"
        log(f"{n} tokens, real prefill: {name} in {out['prefill_s'][name]:.1f}s, {nbytes:,} cache bytes "
             "(= synthetic fill)")
        decoders.append(Decoder(name, model, cache, n, ids[0]))
    time_decoders(decoders, args.warmup, args.steps, f"{n} tokens (real prefill)")
    out["bytes_equal_synthetic"] = True
    out["decode"] = {d.name: d.summary() for d in decoders}
    return out


# ---------------------------------------------------------------------------------------------- run
def run(args) -> dict:
    from linearize.data import english_token_ids
    from linearize.generation import StateCache
    from linearize.models import load_smollm2

    if args.threads:
        torch.set_num_threads(args.threads)
    limit = 8 * len(args.rules) * (len(args.contexts) + 1) + 8
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))

    t0 = time.perf_counter()
    model, tok = load_smollm2()
    load_s = time.perf_counter() - t0
    log(f"SmolLM2-135M-Instruct loaded in {load_s:.1f}s; {torch.get_num_threads()} thread(s)")
    cfg = model.config
    models = {ORIGINAL: model}
    for r in args.rules:
        models[r] = converted_copy(model, r, args.inner)
    assert all(m is not model for k, m in models.items() if k != ORIGINAL)
    assert getattr(model, "_compiled_call_impl", None) is None, "the original model must stay uncompiled"

    contexts = sorted(args.contexts)
    real_at = set(contexts) if args.real_prefill else {contexts[0]}
    text = english_token_ids(tok, max(contexts) + args.warmup + args.steps + 1, repeat=True)
    gen = torch.Generator().manual_seed(args.seed)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, fp32, SDPA)",
        "layers": cfg.num_hidden_layers,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "load_s": load_s,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": sys.version.split()[0],
        "rules": list(args.rules),
        "inner": args.inner,
        "steps": args.steps,
        "warmup": args.warmup,
        "fill": ("synthetic: the original's DynamicCache holds random keys/values of N tokens per layer (via "
                 "DynamicCache.update); each StateCache has cumulative_length = N, random finite states/rings and "
                 "ring positions N-W..N-1 in slots pos % W. A decode step's cost depends only on these shapes; "
                 "'real_prefill' checks bytes (asserted equal) and timings against a real chunked prefill."),
        "original_call": "model(input_ids=[[tok]], past_key_values=DynamicCache, attention_mask=ones(1, past+1), "
                         "position_ids=[[past]], use_cache=True, logits_to_keep=1) under no_grad (eager, SDPA)",
        "converted_call": f"linearize.convert(copy, rules=r, inner={args.inner!r}); linearize.generation.step(copy, "
                          "tok, StateCache(copy, max_length=N + 64, beyond_position_limit=True), ones(1, past+1))",
        "ratios": "converted / original (< 1: smaller or faster)",
        "contexts": {},
    }
    for n in contexts:
        log(f"{n} tokens: filling caches")
        caches, nbytes = {}, {}
        caches[ORIGINAL] = synthetic_dynamic_cache(cfg, n, gen)
        nbytes[ORIGINAL] = dynamic_cache_bytes(caches[ORIGINAL])
        assert caches[ORIGINAL].get_seq_length() == n
        describe = {}
        for r in args.rules:
            caches[r] = StateCache(models[r], batch_size=1, max_length=n + 64, beyond_position_limit=True)
            fill_state_cache(caches[r], n, gen)
            nbytes[r] = caches[r].nbytes()
            describe[r] = caches[r].describe()
        log(f"{n} tokens: cache bytes " + ", ".join(f"{k} {v:,}" for k, v in nbytes.items()))
        decoders = [Decoder(k, models[k], caches[k], n, text[0]) for k in models]
        time_decoders(decoders, args.warmup, args.steps, f"{n} tokens")
        decode = {d.name: d.summary() for d in decoders}
        orig = decode[ORIGINAL]
        row = {
            "bytes": nbytes,
            "bytes_ratio": {r: nbytes[r] / nbytes[ORIGINAL] for r in args.rules},
            "state_cache": describe,
            "median_s": {k: v["median_s"] for k, v in decode.items()},
            "cpu_median_s": {k: v["cpu_median_s"] for k, v in decode.items()},
            "latency_ratio": {r: decode[r]["median_s"] / orig["median_s"] for r in args.rules},
            "cpu_latency_ratio": {r: decode[r]["cpu_median_s"] / orig["cpu_median_s"] for r in args.rules},
            "decode": decode,
        }
        del decoders, caches
        if n in real_at:
            row["real_prefill"] = real_prefill_check(models, text[:, :n], n, nbytes, args)
        result["contexts"][str(n)] = row
        log(f"{n} tokens: step " + ", ".join(f"{k} {v * 1e3:.1f}ms" for k, v in row["median_s"].items())
             + "; latency ratio " + ", ".join(f"{r} {v:.2f}" for r, v in row["latency_ratio"].items()))
    for phase in ("warmup", "timed"):
        result[f"{phase}_graphs_compiled"] = {
            n: {k: v["graphs_compiled"][phase] for k, v in row["decode"].items()}
            for n, row in result["contexts"].items()}
        result[f"{phase}_graph_breaks"] = {
            n: {k: v["graph_breaks"][phase] for k, v in row["decode"].items()}
            for n, row in result["contexts"].items()}
    return result


# ---------------------------------------------------------------------------------------------- output
def _mib(b: int) -> str:
    return f"{b / 2**20:.2f}"


def print_table(result: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(json.dumps({n: {k: row[k] for k in ("bytes", "median_s", "latency_ratio")}
                          for n, row in result["contexts"].items()}, indent=1))
        return
    rules = result["rules"]
    mem = Table(title=f"decode cache, {result['model']} (MiB; ratio converted / original)")
    lat = Table(title=f"decode step, median of {result['steps']} (ms wall; ratio converted / original), "
                      f"{result['threads']} thread(s), inner={result['inner']}")
    cpu = Table(title="the same by process CPU time (steadier on a shared machine)")
    for t in (mem, lat, cpu):
        t.add_column("context", justify="right")
        t.add_column("original", justify="right")
        for r in rules:
            t.add_column(r, justify="right")
            t.add_column("ratio", justify="right")
    for n, row in result["contexts"].items():
        m = [n, _mib(row["bytes"][ORIGINAL])]
        w = [n, f"{row['median_s'][ORIGINAL] * 1e3:.1f}"]
        c = [n, f"{row['cpu_median_s'][ORIGINAL] * 1e3:.1f}"]
        for r in rules:
            m += [_mib(row["bytes"][r]), f"{row['bytes_ratio'][r]:.4f}"]
            w += [f"{row['median_s'][r] * 1e3:.1f}", f"{row['latency_ratio'][r]:.2f}"]
            c += [f"{row['cpu_median_s'][r] * 1e3:.1f}", f"{row['cpu_latency_ratio'][r]:.2f}"]
        mem.add_row(*m)
        lat.add_row(*w)
        cpu.add_row(*c)
    console = Console()
    for t in (mem, lat, cpu):
        console.print(t)
    for n, row in result["contexts"].items():
        if "real_prefill" in row:
            rp = row["real_prefill"]
            console.print(f"real prefill of {n} tokens: cache bytes equal the synthetic fill's for every model; "
                          "decode step median (ms) real vs synthetic: "
                          + ", ".join(f"{k} {v['median_s'] * 1e3:.1f} vs {row['median_s'][k] * 1e3:.1f}"
                                      for k, v in rp["decode"].items()))
    for phase in ("warmup", "timed"):
        console.print(f"graphs compiled / graph breaks during the {phase} steps: "
                      + json.dumps(result[f"{phase}_graphs_compiled"]) + " / "
                      + json.dumps(result[f"{phase}_graph_breaks"]))


def plot(result: dict, path: pathlib.Path) -> bool:
    panels = two_panels(path)
    if panels is None:
        return False
    plt, fig, ax1, ax2 = panels
    contexts = [int(n) for n in result["contexts"]]
    rows = [result["contexts"][str(n)] for n in contexts]
    for k in [ORIGINAL, *result["rules"]]:
        ax1.plot(contexts, [row["bytes"][k] / 2**20 for row in rows], marker="o", label=k)
        ax2.plot(contexts, [row["median_s"][k] * 1e3 for row in rows], marker="o", label=k)
    token_axes((ax1, ax2), contexts, "tokens in the cache")
    ax1.set_yscale("log")
    ax1.set_ylabel("MiB")
    ax1.set_title("cache size")
    ax2.set_ylabel(f"ms per token (median of {result['steps']})")
    ax2.set_title("decode step latency")
    title = (f"{result['model']}, CPU, {result['threads']} thread(s), torch {result['torch']}, "
             f"inner={result['inner']}")
    return save_figure(plt, fig, path, title)


def main(argv=None) -> dict:
    args = parse_args(argv)
    return write_results(run(args), args.out, "decode", print_table, plot)


if __name__ == "__main__":
    main()
