"""Generated Triton kernels vs flash-linear-attention, SDPA (flash) and flex_attention (sliding window). Needs a GPU.

    python bench/kernels.py                      # bf16, T = 1k..32k, SmolLM2 and Llama-3.2-1B shapes
    python bench/kernels.py --seq 1024 4096 --out bench/results   # a subset
    python bench/kernels.py --dry-run            # CPU, Triton interpreter, tiny shapes: checks the script only

Optional contenders: flash-linear-attention 0.6.0 (`pip install --no-deps flash-linear-attention==0.6.0`;
chunk_gla, chunk_simple_gla; GQA heads are expanded for it) and flex_attention (torch >= 2.5). Missing ones are
listed in the output and skipped; a missing GPU is an error (exit 2), never a silent skip.

Rows, per model shape, T, and direction (fwd, fwd+bwd), in ms (median of triton.testing.do_bench):
    ours_gla          GLA with the Liger gate and feature map fused (q, k pre-feature-map in, one op)
    ours_gla_given    GLA on precomputed features and gates (the inputs chunk_gla takes)
    ours_simple_gla   scalar-gate GLA (mamba2-style gate from k)
    ours_liger        fused Liger layer: window softmax + GLA in one kernel, mixed before the store
    ours_liger_sinks  the same with 4 attention sinks
    ours_default_recipe  liger-sinks as it runs (normalised linear branch: window+sinks, GLA, denominator, mix)
    pair_ours         the unfused pair: our window kernel + our GLA kernel + the mix
    pair_ref          flex_attention sliding window + fla chunk_gla (+ feature map / gate ops) + the mix
    fla_chunk_gla, fla_chunk_simple_gla, sdpa_flash (full causal), flex_swa (sliding-window block mask)
Derived: ratios (ours_gla_given vs fla_chunk_gla, ours_liger vs pair_ours / pair_ref, ours_liger vs sdpa_flash),
the crossover T where ours_liger beats full SDPA, TFLOP/s and the fraction of the GPU's bf16 dense peak.
Writes <out>/kernels.json and <out>/kernels.png.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = {  # name: (query heads, kv heads, head dim)
    "SmolLM2-135M": (9, 3, 64),
    "Llama-3.2-1B": (32, 8, 64),
    "H16-D128": (16, 4, 128),  # Llama-3-8B-like heads (32/8 x 128) at half the head count
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}
WINDOW, CHUNK = 64, 64


def fail(msg: str) -> None:
    print(f"bench/kernels.py: {msg}", file=sys.stderr)
    sys.exit(2)


def peak_tflops(device_name: str) -> float | None:
    env = os.environ.get("PEAK_TFLOPS")
    if env:
        return float(env)
    for key, val in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return val
    return None


def flops(kind: str, B: int, H: int, T: int, D: int, backward: bool) -> float:
    """Useful (causal) matmul FLOPs; backward counted as 2.5x forward, as FlashAttention reports."""
    if kind == "full":
        f = 2 * B * H * T * T * D  # QK^T and PV over the causal half: 2 * (2 T^2 D) / 2
    elif kind == "swa":
        f = 4 * B * H * T * min(WINDOW, T) * D
    elif kind == "gla":  # intra-chunk (causal half of C x C) + inter-chunk (q h) + state update (k^T v)
        f = B * H * T * (2 * CHUNK * D + 4 * D * D)
    else:  # liger = both
        return flops("swa", B, H, T, D, backward) + flops("gla", B, H, T, D, backward)
    return f * (3.5 if backward else 1.0)


def bench_fn(fn, device: str, reps: int) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=reps))
    start = time.perf_counter()  # dry run: one call (interpreted kernels take seconds; the number means nothing)
    fn()
    return (time.perf_counter() - start) * 1e3


def make_contenders(B, HQ, HKV, T, D, dtype, device, available):
    from linearize.kernels.triton.spec import KernelSpec
    from linearize.lowering import triton_ops  # noqa: F401  (registers the ops)

    ops = torch.ops.linearize
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=gen, device=device, dtype=torch.float32)).to(dtype)

    q, k, v = rnd(B, HQ, T, D), rnd(B, HKV, T, D), rnd(B, HKV, T, D)
    qr, kr = rnd(B, HQ, T, D), rnd(B, HKV, T, D)
    G = HQ // HKV
    dt = str(dtype).replace("torch.", "")
    gla_spec = KernelSpec(head_k=D, head_v=D, group=G, chunk=CHUNK, dtype=dt).to_json()
    given_spec = KernelSpec(head_k=D, head_v=D, group=G, chunk=CHUNK, dtype=dt, gate_fn="given",
                            feature_map="identity").to_json()
    simple_spec = KernelSpec(head_k=D, head_v=D, group=G, chunk=CHUNK, dtype=dt, gate="scalar",
                             gate_fn="neg_softplus").to_json()
    liger_spec = KernelSpec(head_k=D, head_v=D, group=G, chunk=CHUNK, dtype=dt, window=WINDOW).to_json()
    sinks_spec = KernelSpec(head_k=D, head_v=D, group=G, chunk=CHUNK, dtype=dt, window=WINDOW, sinks=4).to_json()
    swa_spec = KernelSpec(head_k=D, head_v=D, group=G, chunk=16, dtype=dt, linear=False, window=WINDOW).to_json()
    scale = 1.0 / math.sqrt(D)
    feat_q, feat_k = q.float().softmax(-1).to(dtype), k.float().softmax(-1).to(dtype)
    gate = (F.logsigmoid(k.float()) / 16).contiguous()

    c = {}
    c["ours_gla"] = (lambda q, k, v: ops.triton_attention(q, k, v, None, None, None, None, gla_spec, 1.0, 1.0)[0],
                     (q, k, v), "gla")
    c["ours_gla_given"] = (lambda q, k, v, g: ops.triton_attention(q, k, v, None, None, g, None, given_spec, 1.0,
                                                                   1.0)[0], (feat_q, feat_k, v, gate), "gla")
    c["ours_simple_gla"] = (lambda q, k, v: ops.triton_attention(q, k, v, None, None, None, None, simple_spec, 1.0,
                                                                 1.0)[0], (q, k, v), "gla")
    c["ours_liger"] = (lambda q, k, v, qr, kr: ops.triton_attention(q, k, v, qr, kr, None, None, liger_spec, 1.0,
                                                                    scale)[0], (q, k, v, qr, kr), "liger")
    c["ours_liger_sinks"] = (lambda q, k, v, qr, kr: ops.triton_attention(q, k, v, qr, kr, None, None, sinks_spec,
                                                                          1.0, scale)[0], (q, k, v, qr, kr), "liger")

    def pair_ours(q, k, v, qr, kr):
        swa = ops.triton_attention(qr, kr, v, qr, kr, None, None, swa_spec, 1.0, scale)[0]
        lin = ops.triton_attention(q, k, v, None, None, None, None, gla_spec, 1.0, 1.0)[0]
        return 0.5 * swa + 0.5 * lin

    c["pair_ours"] = (pair_ours, (q, k, v, qr, kr), "liger")

    from linearize.rewrite import replacements, rules

    (default_rule,) = rules.load(None).rules  # the default recipe's own parameters, through the model's code path

    def default_recipe(q, k, v, qr, kr):  # liger-sinks as it runs: window + sinks, GLA, its denominator, the mix
        return replacements.liger_attention(qr, kr, v, q, k, window_scale=scale, kernels="triton",
                                            **default_rule.params)

    c["ours_default_recipe"] = (default_recipe, (q, k, v, qr, kr), "liger")

    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        c["sdpa_flash"] = (sdpa, (qr, kr, v), "full")

    if available.get("flex"):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def swa_mask(b, h, qi, ki):
            return (ki <= qi) & (qi - ki < WINDOW)

        block_mask = create_block_mask(swa_mask, None, None, T, T, device=device)
        flex = torch.compile(flex_attention, dynamic=False)
        c["flex_swa"] = (lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True),
                         (qr, kr, v), "swa")

    if available.get("fla"):
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla

        def rep(x):  # fla wants [B, T, H, D] with as many kv as query heads: KV-side tensors are repeated
            return x.repeat_interleave(G, dim=1).transpose(1, 2).contiguous()

        def qside(x):  # query-side tensors already have the query heads
            return x.transpose(1, 2).contiguous()

        fq, fk, fv, fg = qside(feat_q), rep(feat_k), rep(v), rep(gate)
        gs = (-F.softplus(k.float().mean(-1)) / 16).repeat_interleave(G, dim=1).transpose(1, 2).contiguous()
        c["fla_chunk_gla"] = (lambda q, k, v, g: chunk_gla(q, k, v, g, scale=1.0)[0], (fq, fk, fv, fg), "gla")
        c["fla_chunk_simple_gla"] = (lambda q, k, v, g: chunk_simple_gla(q, k, v, g, scale=1.0)[0],
                                     (qside(q), rep(k), fv, gs), "gla")
        if available.get("flex"):
            def pair_ref(q, k, v, qr, kr):
                swa = flex(qr, kr, v, block_mask=block_mask, scale=scale, enable_gqa=True)
                fq_ = qside(q.float().softmax(-1).to(q.dtype))
                fk_ = rep(k.float().softmax(-1).to(k.dtype))
                g_ = rep(F.logsigmoid(k.float()) / 16)
                lin = chunk_gla(fq_, fk_, rep(v), g_, scale=1.0)[0].transpose(1, 2)
                return 0.5 * swa + 0.5 * lin

            c["pair_ref"] = (pair_ref, (q, k, v, qr, kr), "liger")
    return c


def _warm(model: str, name: str, T: int, batch: int) -> tuple[str, str, float, str | None]:
    """Worker of --precompile: run one contender forward and backward once, so Triton's (and Inductor's) on-disk
    caches hold its compiled kernels before the timing process needs them."""
    HQ, HKV, D = MODELS[model]
    t0 = time.perf_counter()
    try:
        available = {"flex": True}
        try:
            import fla  # noqa: F401
            available["fla"] = True
        except ImportError:
            pass
        contenders = make_contenders(batch, HQ, HKV, T, D, torch.bfloat16, "cuda", available)
        if name in contenders:
            fn, args, _ = contenders[name]
            for backward in (False, True):
                run_one(fn, args, backward, "cuda", reps=1, warm_only=True)
        torch.cuda.synchronize()
        return model, name, time.perf_counter() - t0, None
    except Exception as exc:  # reported by the parent, which times the rest
        return model, name, time.perf_counter() - t0, f"{type(exc).__name__}: {str(exc)[:300]}"


def precompile(models, seqs, tokens, workers: int, limit_s: float) -> list[dict]:
    """Compile every contender's kernels in parallel processes (one per model shape and contender): Triton compiles
    in the launching process, one kernel at a time, and the fused backward alone takes ~25 s at chunk 64. Triton
    kernels are warmed at T = 1024 (the same integer specialisations, T and T / chunk divisible by 16, as every
    timed length); flex_attention, compiled per shape by Inductor, at every timed (batch, T). With
    TRITON_CACHE_AUTOTUNING=1 (bench/gpu/run.py sets it) the autotuners' choices, fla's included (keyed by block
    sizes and head dims, not T), are cached on disk too, so the timing process does not tune again."""
    import multiprocessing as mp

    names = ["ours_gla", "ours_gla_given", "ours_simple_gla", "ours_liger", "ours_liger_sinks", "ours_default_recipe",
             "pair_ours",
             "fla_chunk_gla",
             "fla_chunk_simple_gla", "sdpa_flash"]
    jobs = [(m, n, 1024, 1) for m in models for n in names]
    jobs += [(m, n, T, max(1, tokens // T) if tokens else 1) for m in models for T in seqs
             for n in ("flex_swa", "pair_ref")]
    t0 = time.perf_counter()
    pool = mp.get_context("spawn").Pool(workers)
    finished = pool.imap_unordered(_warm_job, jobs)
    results = []
    try:
        for _ in jobs:
            results.append(finished.next(timeout=max(0.1, t0 + limit_s - time.perf_counter())))
    except mp.TimeoutError:
        print(f"precompile: {len(jobs) - len(results)} of {len(jobs)} not done after {limit_s:.0f} s; the timing "
              "compiles what is missing")
    finally:
        pool.terminate()
    out = [{"model": m, "kernel": n, "seconds": s, "error": e} for m, n, s, e in results]
    for r in out:
        if r["error"]:
            print(f"precompile {r['model']} {r['kernel']}: {r['error']}")
    print(f"precompiled {len(results)} of {len(jobs)} contender(s) in {time.perf_counter() - t0:.0f} s "
          f"with {workers} processes")
    return out


def _warm_job(job: tuple) -> tuple:
    return _warm(*job)


def profile_kernels(contenders: dict, names: list[str], reps: int = 3) -> dict:
    """GPU time per launched kernel (name -> ms per call, summed over launches) for a few contenders, forward and
    forward+backward: where the time of our ops goes, which the row timings alone do not say."""
    from torch.profiler import ProfilerActivity, profile

    result = {}
    for name in names:
        if name not in contenders:
            continue
        fn, fargs, _ = contenders[name]
        for backward in (False, True):
            run_one(fn, fargs, backward, "cuda", 1, warm_only=True)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(reps):
                    run_one(fn, fargs, backward, "cuda", 1, warm_only=True)
                torch.cuda.synchronize()
            times = {}
            for ev in prof.key_averages():
                us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
                if us:
                    times[ev.key[:80]] = round(us / reps / 1e3, 4)
            result[f"{name} {'fwd+bwd' if backward else 'fwd'}"] = dict(sorted(times.items(), key=lambda kv: -kv[1])[:12])
    return result


def run_one(fn, args, backward: bool, device: str, reps: int, warm_only: bool = False) -> float:
    if not backward:
        with torch.no_grad():
            if warm_only:
                fn(*args)
                return 0.0
            return bench_fn(lambda: fn(*args), device, reps)
    leaves = [a.detach().requires_grad_(a.is_floating_point()) for a in args]
    out = fn(*leaves)
    do = torch.randn_like(out)

    def step():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(do)

    if warm_only:
        step()
        return 0.0
    return bench_fn(step, device, reps)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--reps", type=int, default=100, help="do_bench rep time in ms")
    parser.add_argument("--tokens", type=int, default=None,
                        help="fixed tokens per call: batch = tokens // T at each T (overrides --batch)")
    parser.add_argument("--precompile", type=int, default=0, metavar="N",
                        help="first compile every contender in N parallel processes (GPU only)")
    parser.add_argument("--precompile-limit-s", type=float, default=120.0,
                        help="stop waiting for the precompile processes after this many seconds")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting new (model, T) rows after this many seconds; the rest is listed as skipped")
    parser.add_argument("--profile", action="store_true",
                        help="GPU: per-kernel time of our GLA and Liger ops at the first T of each model (JSON)")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU + Triton interpreter, tiny shapes, fp32: checks the script, timings meaningless")
    args = parser.parse_args(argv)

    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        device, dtype = "cpu", torch.float32
        seqs, models = [32], {"tiny": (4, 2, 16)}
        global WINDOW, CHUNK
        WINDOW, CHUNK = 8, 16  # one sub-chunk per chunk: the interpreter's slowest loops run once
        device_name, peak = "cpu (dry run)", None
    else:
        if not torch.cuda.is_available():
            fail("no CUDA GPU: this benchmark times GPU kernels (use --dry-run to check the script on CPU)")
        try:
            import triton  # noqa: F401
        except ImportError:
            fail("triton is not installed (pip install 'linearize[triton]')")
        device, dtype = "cuda", torch.bfloat16
        seqs, models = args.seq, {m: MODELS[m] for m in args.models}
        device_name = torch.cuda.get_device_name()
        peak = peak_tflops(device_name)

    available = {}
    try:
        import fla  # noqa: F401
        available["fla"] = getattr(fla, "__version__", "?")
    except ImportError:
        print("note: flash-linear-attention not installed: fla_* and pair_ref rows skipped "
              "(pip install --no-deps flash-linear-attention==0.6.0)")
    if device == "cuda":
        try:
            from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
            available["flex"] = True
        except ImportError:
            print("note: flex_attention unavailable in this torch: flex_swa and pair_ref skipped")

    warmed = (precompile(list(models), seqs, args.tokens, args.precompile, args.precompile_limit_s)
              if args.precompile and device == "cuda" else [])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, skipped, start, dead = [], [], time.perf_counter(), None
    profiles = {}
    for model, (HQ, HKV, D) in models.items():
        for T in seqs:
            if dead or (args.budget_s is not None and time.perf_counter() - start > args.budget_s):
                skipped.append(f"{model} T={T}" + (" (after a CUDA error)" if dead else ""))
                continue
            batch = max(1, args.tokens // T) if args.tokens else args.batch
            contenders = make_contenders(batch, HQ, HKV, T, D, dtype, device, available)
            for backward in (False, True):
                direction = "fwd+bwd" if backward else "fwd"
                if dead:
                    break
                for name, (fn, fargs, kind) in contenders.items():
                    try:
                        ms = run_one(fn, fargs, backward, device, args.reps)
                    except Exception as exc:  # report, keep going
                        print(f"{model} T={T} {direction} {name}: failed: {type(exc).__name__}: {exc}")
                        if "CUDA error" in str(exc) or "illegal" in str(exc):  # the context is dead from here
                            dead = f"{model} T={T} {direction} {name}: {type(exc).__name__}: {str(exc)[:200]}"
                            break
                        continue
                    tflops = flops(kind, batch, HQ, T, D, backward) / (ms * 1e-3) / 1e12
                    row = {"model": model, "T": T, "batch": batch, "direction": direction, "kernel": name, "ms": ms,
                           "tflops": tflops, "peak_fraction": tflops / peak if peak else None}
                    rows.append(row)
                    print(f"{model:13s} T={T:6d} {direction:8s} {name:21s} {ms:9.3f} ms {tflops:7.1f} TFLOP/s")
                    save(out, rows, skipped, warmed, available, args, device_name, dtype, peak, profiles)  # per row
            if args.profile and device == "cuda" and not dead and model not in profiles:
                try:
                    profiles[model] = {"T": T, "batch": batch, "ms_per_call": profile_kernels(
                        contenders, ["ours_gla_given", "ours_liger", "ours_liger_sinks", "fla_chunk_gla"])}
                except Exception as exc:  # a profile is extra: report, keep going
                    print(f"profile {model}: failed: {type(exc).__name__}: {exc}")
                for key, times in profiles.get(model, {}).get("ms_per_call", {}).items():
                    print(f"profile {model} T={T} {key}: " + ", ".join(f"{k} {v:.3f}" for k, v in times.items()))
                save(out, rows, skipped, warmed, available, args, device_name, dtype, peak, profiles)
            del contenders
            if device == "cuda":
                torch.cuda.empty_cache()

    result = save(out, rows, skipped, warmed, available, args, device_name, dtype, peak, profiles)
    for line in result["summary_lines"]:
        print(line)
    if skipped:
        print(f"skipped (time budget {args.budget_s} s or a CUDA error): " + ", ".join(skipped))
    if dead:
        print(f"stopped after a CUDA error, which leaves the context unusable: {dead}")
    png = out / "kernels.png"
    wrote = [out / "kernels.json"] + ([png] if rows and plot(rows, png, device_name) else [])
    print("wrote " + " and ".join(map(str, wrote)))
    return 1 if dead else 0


def save(out: Path, rows, skipped, warmed, available, args, device_name, dtype, peak, profiles=None) -> dict:
    """Write <out>/kernels.json from the rows so far (after every (model, T), so a stopped run keeps them)."""
    summary = summarize(rows)
    result = {"device": device_name, "dtype": str(dtype), "peak_bf16_tflops": peak, "batch": args.batch,
              "tokens_per_call": args.tokens, "window": WINDOW, "chunk": CHUNK, "available": available,
              "precompile": warmed, "skipped": skipped, "rows": rows, "ratios": summary["ratios"],
              "crossover_vs_sdpa": summary["crossover"], "targets": summary["targets"],
              "summary_lines": summary["lines"], "profile": profiles or {}}
    (out / "kernels.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _ms(rows, model, T, direction, kernel):
    for r in rows:
        if (r["model"], r["T"], r["direction"], r["kernel"]) == (model, T, direction, kernel):
            return r["ms"]
    return None


def summarize(rows) -> dict:
    pairs = {"gla_vs_fla_chunk_gla": ("fla_chunk_gla", "ours_gla_given"),
             "fused_gla_vs_fla_chunk_gla": ("fla_chunk_gla", "ours_gla"),
             "simple_gla_vs_fla_chunk_simple_gla": ("fla_chunk_simple_gla", "ours_simple_gla"),
             "liger_fused_vs_pair_ours": ("pair_ours", "ours_liger"),
             "liger_fused_vs_pair_ref": ("pair_ref", "ours_liger"),
             "liger_vs_sdpa_flash": ("sdpa_flash", "ours_liger"),
             "default_recipe_vs_fused_liger": ("ours_liger", "ours_default_recipe"),
             "default_recipe_vs_sdpa_flash": ("sdpa_flash", "ours_default_recipe")}
    ratios, lines, crossover = [], [], {}
    keys = sorted({(r["model"], r["T"], r["direction"]) for r in rows})
    for model, T, direction in keys:
        for label, (base, ours) in pairs.items():
            a, b = _ms(rows, model, T, direction, base), _ms(rows, model, T, direction, ours)
            if a and b:
                ratios.append({"model": model, "T": T, "direction": direction, "ratio": label, "speedup": a / b})
    for model in sorted({k[0] for k in keys}):
        for direction in ("fwd", "fwd+bwd"):
            faster = [r["T"] for r in ratios if r["model"] == model and r["direction"] == direction
                      and r["ratio"] == "liger_vs_sdpa_flash" and r["speedup"] >= 1.0]
            crossover[f"{model} {direction}"] = min(faster) if faster else None
    targets = {
        "gla fwd+bwd >= 1.0x fla chunk_gla": _all(ratios, "gla_vs_fla_chunk_gla", "fwd+bwd", 1.0),
        "fused liger >= 1.3x unfused pair (ours)": _all(ratios, "liger_fused_vs_pair_ours", None, 1.3),
        "fused liger >= 1.3x unfused pair (flex + fla)": _all(ratios, "liger_fused_vs_pair_ref", None, 1.3),
        "liger faster than full SDPA from T=2k": _all(ratios, "liger_vs_sdpa_flash", None, 1.0, min_t=2048),
    }
    for r in ratios:
        lines.append(f"{r['model']:13s} T={r['T']:6d} {r['direction']:8s} {r['ratio']:36s} {r['speedup']:6.2f}x")
    lines += [f"crossover vs full SDPA, {k}: T = {v}" for k, v in crossover.items()]
    lines += [f"target {k}: {'met' if v else ('no data' if v is None else 'NOT met')}" for k, v in targets.items()]
    return {"ratios": ratios, "crossover": crossover, "targets": targets, "lines": lines}


def _all(ratios, label, direction, threshold, min_t=0):
    sel = [r for r in ratios if r["ratio"] == label and (direction is None or r["direction"] == direction)
           and r["T"] >= min_t]
    return None if not sel else all(r["speedup"] >= threshold for r in sel)


def plot(rows, path: Path, device_name: str) -> bool:
    from linearize.report.plots import pyplot

    plt = pyplot("the kernel plot")
    if plt is None:
        return False
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.5 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, direction in enumerate(("fwd", "fwd+bwd")):
            ax = axes[i][j]
            for kernel in sorted({r["kernel"] for r in rows}):
                pts = sorted((r["T"], r["ms"]) for r in rows
                             if r["model"] == model and r["direction"] == direction and r["kernel"] == kernel)
                if pts:
                    style = "-" if kernel.startswith("ours") else "--"
                    ax.plot(*zip(*pts), style, marker="o", label=kernel)
            ax.set(xscale="log", yscale="log", xlabel="T (tokens)", ylabel="ms",
                   title=f"{model} {direction} ({device_name})")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


if __name__ == "__main__":
    sys.exit(main())
