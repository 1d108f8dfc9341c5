"""Compile the generated kernels for a GPU without one: Triton ahead of time, for sm_90 (H100/H200), on the CPU.

    python bench/gpu/preflight.py                     # the specs the GPU check uses, with the installed triton
    PYTHONPATH=/tmp/triton36 python bench/gpu/preflight.py --specs liger-d64-bf16   # another triton's compiler

The interpreter (how CI runs the kernels) accepts code that compiled Triton rejects: on the first H200 run, a loop
index derived from a `static_range` variable and a scan over an [R, 1] tile (Triton 3.6) failed only there. Triton's
compiler needs no GPU to go from the source to a cubin (it ships LLVM and ptxas), so this script compiles every
kernel of every spec the GPU check uses, with the argument types and 16-byte alignment a real launch specialises on
and float scalars as fp64 (as Inductor passes them), and reports each failure. Minutes for all specs (the chunk-64
backward alone takes 25-50 s); tests/test_triton_kernels.py compiles the SMALL specs the same way (seconds).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from linearize.kernels.triton.spec import KernelSpec  # noqa: E402

# pointer arguments that are always fp32 buffers (chunk states, gate cumsums, softmax statistics)
FP32_POINTERS = {"b_ptr", "h_ptr", "dh_ptr", "dh0_ptr", "lse_ptr", "delta_ptr", "h0_ptr", "dht_ptr"}
INTEGERS = {"T", "N", "HQ", "HKV"}
TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _shapes(**kw):
    return dict(chunk=64, head_k=64, head_v=64, group=4, dtype="bfloat16", **kw)


SPECS = {  # what bench/gpu/run.py launches: the benchmark's contenders, the e2e recipes, the decode step
    "liger-d64-bf16": KernelSpec(window=64, **_shapes()),
    "liger-sinks-d64-bf16": KernelSpec(window=64, sinks=4, **_shapes()),  # fused Liger with sinks (benchmark)
    # the default recipe (liger-sinks, a normalised linear branch): window with sinks, GLA, GLA on the denominator
    "swa-sinks-d64-bf16": KernelSpec(linear=False, window=64, sinks=4, **{**_shapes(), "chunk": 16}),
    "gla-d64-v16-bf16": KernelSpec(**{**_shapes(), "head_v": 16}),
    "gla-d64-bf16": KernelSpec(**_shapes()),
    "given-d64-bf16": KernelSpec(gate_fn="given", feature_map="identity", **_shapes()),
    "simple-d64-bf16": KernelSpec(gate="scalar", gate_fn="neg_softplus", **_shapes()),
    "swa-d64-bf16": KernelSpec(linear=False, window=64, **{**_shapes(), "chunk": 16}),
    "liger-d128-bf16": KernelSpec(window=64, **{**_shapes(), "head_k": 128, "head_v": 128}),
    "decode-fp32": KernelSpec(gate_fn="given", feature_map="identity", **{**_shapes(), "chunk": 16,
                                                                         "dtype": "float32"}),
}
SMALL = {  # seconds each: what the test suite compiles (every template branch that differs, small tiles)
    "small-liger-fp32": KernelSpec(window=8, chunk=32, head_k=16, head_v=32, group=2),
    "small-scalar-bf16": KernelSpec(gate="scalar", gate_fn="neg_softplus", feature_map="relu", chunk=16, head_k=16,
                                    head_v=16, dtype="bfloat16"),
    "small-fixed-given-fp16": KernelSpec(gate="fixed", feature_map="elu+1", chunk=16, head_k=16, head_v=16,
                                         dtype="float16"),
    "small-given-scalar-sinks-fp32": KernelSpec(gate="scalar", gate_fn="given", window=4, sinks=2, chunk=16,
                                                head_k=16, head_v=16),
}


def signature(kernel, spec: KernelSpec, block_v: int):
    """(jit function, argument types, constexpr values, alignment attributes) of one generated kernel."""
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # an autotuner wraps the @jit function
    types, constants = {}, {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            types[name] = "constexpr"
            constants[name] = {"BV": block_v, "ACC_DV": spec.linear}.get(name, True)
        elif name.endswith("_ptr"):
            fp32 = name in FP32_POINTERS or (name in ("g_ptr", "dg_ptr") and spec.gate_given)
            types[name] = "*fp32" if fp32 else f"*{TYPES[spec.dtype]}"
        else:
            types[name] = "i32" if name in INTEGERS else "fp64"
    aligned = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(fn.params) if p.name.endswith("_ptr")}
    return fn, types, constants, aligned


def compile_spec(spec: KernelSpec, arch: int = 90, num_stages: int = 2) -> dict[str, str | None]:
    """{kernel name: None if it compiled, else the error's last lines}."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from linearize.kernels.triton import cache, generator

    module = cache.load(spec)
    results = {}
    for name in generator.KERNELS:
        kernel = getattr(module, name, None)
        if kernel is None:
            continue
        fn, types, constants, aligned = signature(kernel, spec, min(64, spec.head_v))
        try:
            triton.compile(ASTSource(fn, types, constants, aligned), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": 4, "num_stages": num_stages})
            results[name] = None
        except Exception as exc:  # every failure is a result
            results[name] = f"{type(exc).__name__}: {str(exc)[-600:]}"
    return results


def main(argv=None) -> int:
    import triton

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--specs", nargs="+", default=list(SPECS), choices=list(SPECS) + list(SMALL))
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    args = ap.parse_args(argv)
    print(f"triton {triton.__version__} from {Path(triton.__file__).parent}, target sm_{args.arch}")
    failed = 0
    for key in args.specs:
        t0 = time.perf_counter()
        results = compile_spec({**SPECS, **SMALL}[key], args.arch)
        bad = {k: v for k, v in results.items() if v}
        failed += len(bad)
        print(f"{key}: {len(results) - len(bad)}/{len(results)} kernels compiled in {time.perf_counter() - t0:.0f} s")
        for name, err in bad.items():
            print(f"  FAILED {name}: {err}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
