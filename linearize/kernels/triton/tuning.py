"""Autotuning of the generated kernels: warps and pipeline stages, chosen by timing on the GPU, cached.

The generated modules decorate their heavy kernels with `autotuned` (those that only write their outputs: kernels
that update a buffer in place, the decode step and the window dk/dv pass that adds onto dv, keep one config, since
the autotuner would run them several times; so does the intra-chunk backward, whose fully unrolled sub-chunk loops
take ~25 s to compile per config at chunk 64: tuning it would cost minutes per spec). The grid never depends on the
config, so the launchers stay as they are. Key: the KV-head count (one tuning per spec and model shape, not per
sequence length: a long prompt must not pay a tuning per length). Triton caches the choice on disk where it can
(`cache_results`).

On the interpreter (TRITON_INTERPRET=1, no GPU) and with LINEARIZE_TRITON_AUTOTUNE=0 only the first config exists,
so nothing is timed: that is the config the CPU tests run.
"""
from __future__ import annotations

import inspect
import os

# (num_warps, num_stages); the first is the default
CONFIGS = ((4, 2), (8, 2), (4, 1))


def enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("LINEARIZE_TRITON_AUTOTUNE", "1") != "0"


def autotuned(fn):
    """`triton.autotune` over CONFIGS (first only when tuning is off), keyed by HKV."""
    import triton

    pairs = CONFIGS if enabled() else CONFIGS[:1]
    configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in pairs]
    accepted = inspect.signature(triton.autotune).parameters
    extra = {}
    if "cache_results" in accepted:
        extra["cache_results"] = True
    if "do_bench" in accepted and len(configs) > 1:
        from triton.testing import do_bench

        extra["do_bench"] = lambda call, quantiles: do_bench(call, warmup=5, rep=20, quantiles=quantiles)
    return triton.autotune(configs=configs, key=["HKV"], **extra)(fn)
