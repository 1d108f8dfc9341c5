"""The GPU check in one command: correctness first, then the kernel benchmark, then end to end; one output folder.

    python bench/gpu/run.py --out OUT            # a CUDA machine: about 8 minutes on an H200
    python bench/gpu/run.py --dry-run --out OUT  # CPU: Triton interpreter, tiny shapes (tests/test_gpu_script.py)
    bash bench/gpu/run.sh OUT                    # the same, after installing carried wheels (.whl/) if present

Stages (each a subprocess with its own time limit, its output appended to OUT/run.log):
  1. correctness: tests/test_triton_kernels.py and tests/test_triton_compile.py with LINEARIZE_TEST_DEVICE=cuda
     (fp32, fp16, bf16; GQA; T not a multiple of the chunk; extreme gates; model-sized tiles; fullgraph
     torch.compile with the Triton path; decoding through the decode kernel). If a test fails with autotuning on,
     the failed ones run again with LINEARIZE_TRITON_AUTOTUNE=0, which says whether tuning is to blame (and later
     stages then run untuned). Failures stop the run here unless --keep-going.
  2. kernels: bench/kernels.py, bf16, B*T = 32k tokens at T = 1k..32k (1k, 4k, 16k first), heads 32/8 x 64 and
     16/4 x 128, a per-kernel profile of our ops at the first T,
     every contender compiled first in parallel processes; ratios, TFLOP/s, crossover, JSON + PNG.
  3. e2e: bench/gpu/e2e.py, a random ~1B Llama, prefill 4k/16k/32k and decode at 1k/32k, original vs liger,
     liger-sinks (the default recipe) and gla.
Writes OUT/summary.json and OUT/summary.md (the goals of issue 15, met or not), kernels.{json,png},
e2e.{json,png}, run.log: 7 files, well under the 16 MiB that may come back from the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

REPO = pathlib.Path(__file__).resolve().parents[2]
TEST_FILES = ["tests/test_triton_kernels.py", "tests/test_triton_compile.py"]


def log_line(out: pathlib.Path, text: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {text}"
    print(line, flush=True)
    with open(out / "run.log", "a") as f:
        f.write(line + "\n")


def run_stage(name: str, cmd: list[str], out: pathlib.Path, timeout: float, env: dict) -> dict:
    """Run one stage, its output streamed into run.log; never raises (a stage that breaks is a result)."""
    log_line(out, f"stage {name}: {' '.join(cmd)} (limit {timeout:.0f} s)")
    t0 = time.perf_counter()
    with open(out / "run.log", "a") as f:
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    log_line(out, f"stage {name}: rc={rc} in {wall:.0f} s")
    return {"rc": rc, "wall_s": round(wall, 1)}


def junit_failures(path: pathlib.Path) -> tuple[int, list[str]]:
    """(tests run, ids of failed or erroring tests) from a pytest junit XML."""
    if not path.is_file():
        return 0, ["<no junit report: pytest did not finish>"]
    root = ET.parse(path).getroot()
    failed, total = [], 0
    for case in root.iter("testcase"):
        total += 1
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '')}::{case.get('name', '')}")
    return total, failed


def correctness(args, out: pathlib.Path, env: dict, workers: list[str]) -> dict:
    report = pathlib.Path(args.scratch) / "tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", f"--junitxml={report}",
           *workers, *TEST_FILES]
    if args.dry_run:  # the wiring only: CI runs these test modules in full anyway
        cmd += ["-k", "decode_steps or single_branch_ops_differentiate and swa"]
    elif args.tests_k:
        cmd += ["-k", args.tests_k]
    stage = run_stage("correctness", cmd, out, args.limit_tests, env)
    stage["tests"], stage["failed"] = junit_failures(report)
    if stage["failed"] and env.get("LINEARIZE_TRITON_AUTOTUNE", "1") != "0":
        untuned = {**env, "LINEARIZE_TRITON_AUTOTUNE": "0"}
        ids = [_node_id(f) for f in stage["failed"] if "::" in f and not f.startswith("<")]
        rerun = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", f"--junitxml={report}",
                 *workers, *(ids or TEST_FILES)]
        again = run_stage("correctness (autotuning off, failed tests only)", rerun, out, args.limit_tests, untuned)
        again["tests"], again["failed"] = junit_failures(report)
        stage["untuned_rerun"] = again
        stage["autotune_to_blame"] = not again["failed"]
    return stage


def _node_id(failed: str) -> str:
    """pytest's node id of a junit entry ("tests.test_x::test_y[p]" -> "tests/test_x.py::test_y[p]")."""
    module, name = failed.split("::", 1)
    return module.replace(".", "/") + ".py::" + name


def goals(summary: dict, kernels: dict | None, e2e: dict | None) -> dict:
    """Issue 15's goals, each met / not met / no data, with the numbers behind it."""
    g = {}
    if kernels:
        t = kernels.get("targets", {})
        g["generated GLA fwd+bwd >= 1.0x fla chunk_gla (bf16)"] = t.get("gla fwd+bwd >= 1.0x fla chunk_gla")
        g["fused Liger >= 1.3x fla GLA + a separate window kernel"] = t.get(
            "fused liger >= 1.3x unfused pair (flex + fla)")
        g["converted layer faster than SDPA (flash) from T = 2k"] = t.get("liger faster than full SDPA from T=2k")
    if e2e:
        dec = e2e.get("decode_goals", {})
        g["decode step at 32k within 1.1x of the step at 1k"] = all(v["large_over_small"] <= 1.1
                                                                    for v in dec.values()) if dec else None
        g["decode step faster than the original's at 32k"] = all(v["original_over_converted_at_large"] > 1.0
                                                                 for v in dec.values()) if dec else None
    tests = summary["stages"].get("correctness", {})
    fullgraph = [f for f in tests.get("failed", []) if "fullgraph" in f or "inductor" in f]
    g["no graph breaks under fullgraph=True with the Triton path"] = (None if not tests.get("tests")
                                                                      else not fullgraph)
    return g


def write_summary(out: pathlib.Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"# GPU check: {summary['device']}", "", f"torch {summary['torch']}, triton {summary['triton']}, "
             f"flash-linear-attention {summary['fla']}; total {summary['wall_s']:.0f} s", "", "## Stages", ""]
    for name, st in summary["stages"].items():
        extra = f", {st['tests']} tests, {len(st['failed'])} failed" if "tests" in st else ""
        lines.append(f"- {name}: rc {st['rc']} in {st['wall_s']} s{extra}")
        for f in st.get("failed", [])[:20]:
            lines.append(f"  - FAILED {f}")
        if "autotune_to_blame" in st:
            lines.append(f"  - rerun untuned: {len(st['untuned_rerun']['failed'])} failed "
                         f"(autotuning to blame: {st['autotune_to_blame']})")
    lines += ["", "## Goals", ""]
    for goal, met in summary["goals"].items():
        lines.append(f"- {goal}: {'met' if met else ('no data' if met is None else 'NOT met')}")
    if summary.get("ratios"):
        lines += ["", "## Kernel ratios (speed-up of ours over the baseline)", ""]
        lines += [f"- {line}" for line in summary["ratios"]]
    if summary.get("e2e_lines"):
        lines += ["", "## End to end", ""] + [f"- {line}" for line in summary["e2e_lines"]]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def e2e_lines(e2e: dict) -> list[str]:
    lines = []
    for n, row in e2e.get("prefill", {}).items():
        lines.append(f"prefill {n}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in row["median_s"].items()))
    for n, row in e2e.get("decode", {}).items():
        lines.append(f"decode at {n}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in
                                                    row["median_step_s"].items()))
    lines.append("compile (first call - steady call): " + ", ".join(f"{k} {v:.1f} s"
                                                                    for k, v in e2e.get("compile_s", {}).items()))
    return lines


def versions() -> dict:
    import torch

    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
            else "cpu (dry run)"}
    for mod, key in (("triton", "triton"), ("fla", "fla"), ("transformers", "transformers")):
        try:
            info[key] = getattr(__import__(mod), "__version__", "?")
        except ImportError:
            info[key] = "not installed"
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=pathlib.Path, required=True)
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    ap.add_argument("--keep-going", action="store_true", help="benchmark even if correctness failed")
    ap.add_argument("--stages", default="correctness,kernels,e2e")
    ap.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1),
                    help="parallel processes for tests and kernel compilation (GPU)")
    ap.add_argument("--limit-tests", type=float, default=180.0, help="seconds for the correctness stage")
    ap.add_argument("--limit-kernels", type=float, default=160.0, help="seconds for the kernel benchmark")
    ap.add_argument("--limit-e2e", type=float, default=200.0, help="seconds for the end-to-end stage")
    ap.add_argument("--tests-k", help="only the correctness tests matching this pytest -k expression")
    ap.add_argument("--kernel-models", nargs="+", default=["Llama-3.2-1B", "H16-D128"])
    ap.add_argument("--kernel-seq", type=int, nargs="+", default=[1024, 4096, 16384, 2048, 8192, 32768],
                    help="kernel benchmark lengths, in the order timed (a stage cut short keeps the spread first)")
    ap.add_argument("--scratch", default="/tmp/linearize_gpu_run", help="intermediate files (not returned)")
    args = ap.parse_args(argv)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.scratch).mkdir(parents=True, exist_ok=True)
    (out / "run.log").write_text("")
    t0 = time.perf_counter()
    info = versions()
    if not args.dry_run and info["device"].startswith("cpu"):
        log_line(out, "no CUDA GPU: nothing to measure (use --dry-run to check the script on CPU)")
        return 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "LINEARIZE_KERNEL_CACHE": str(pathlib.Path(args.scratch) / "kernels")}
    if args.dry_run:
        env.update(TRITON_INTERPRET="1", LINEARIZE_TEST_DEVICE="cpu")
        workers: list[str] = []
    else:
        env.update(LINEARIZE_TEST_DEVICE="cuda", TRITON_CACHE_AUTOTUNING="1")  # tunings shared across processes
        env.pop("TRITON_INTERPRET", None)
        have_xdist = subprocess.run([sys.executable, "-c", "import xdist"], capture_output=True).returncode == 0
        workers = ["-n", str(args.workers)] if have_xdist and args.workers > 1 else []
    log_line(out, f"{info}")
    summary = {**info, "dry_run": args.dry_run, "stages": {}}
    wanted = args.stages.split(",")
    kernels = e2e = None
    if "correctness" in wanted:
        st = summary["stages"]["correctness"] = correctness(args, out, env, workers)
        if st.get("autotune_to_blame"):
            env["LINEARIZE_TRITON_AUTOTUNE"] = "0"
            log_line(out, "failures only with autotuning: the benchmarks run untuned")
        broken = st["failed"] and not st.get("autotune_to_blame")
        if broken and not args.keep_going:
            log_line(out, f"correctness failed ({len(st['failed'])} tests): stopping before the benchmarks")
            wanted = []
    if "kernels" in wanted:
        cmd = [sys.executable, "bench/kernels.py", "--out", str(out), "--reps", "25"]
        cmd += ["--dry-run", "--tokens", "32"] if args.dry_run else [
            "--models", *args.kernel_models, "--seq", *map(str, args.kernel_seq), "--profile",
            "--tokens", "32768", "--precompile", str(args.workers),
            "--precompile-limit-s", str(args.limit_kernels * 0.45), "--budget-s", str(args.limit_kernels * 0.3)]
        summary["stages"]["kernels"] = run_stage("kernels", cmd, out, args.limit_kernels, env)
        path = out / "kernels.json"
        kernels = json.loads(path.read_text()) if path.is_file() else None
        if kernels:
            summary["ratios"] = [f"{r['model']} T={r['T']} {r['direction']} {r['ratio']}: {r['speedup']:.2f}x"
                                 for r in kernels["ratios"]]
            summary["crossover_vs_sdpa"] = kernels.get("crossover_vs_sdpa")
    if "e2e" in wanted:
        cmd = [sys.executable, "bench/gpu/e2e.py", "--out", str(out)]
        cmd += ["--dry-run", "--rules", "liger-sinks", "gla"] if args.dry_run else []
        summary["stages"]["e2e"] = run_stage("e2e", cmd, out, args.limit_e2e, env)
        path = out / "e2e.json"
        e2e = json.loads(path.read_text()) if path.is_file() else None
        if e2e:
            summary["e2e_lines"] = e2e_lines(e2e)
    summary["goals"] = goals(summary, kernels, e2e)
    summary["wall_s"] = time.perf_counter() - t0
    write_summary(out, summary)
    log_line(out, f"wrote {out / 'summary.md'}")
    print((out / "summary.md").read_text())
    bad = summary["stages"].get("correctness", {}).get("failed")
    return 1 if bad and not summary["stages"]["correctness"].get("autotune_to_blame") else 0


if __name__ == "__main__":
    sys.exit(main())
