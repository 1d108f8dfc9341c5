"""Save -> load in a fresh process, on SmolLM2-135M: identical logits and greedy generations for every built-in
recipe and for a LoRA model (merged and unmerged); folder size, save and load times.

    python bench/checkpoints.py                       # all recipes + LoRA, writes bench/out/checkpoints.{json,md}
    python bench/checkpoints.py --rules liger swa --gen 10

Per recipe: convert, record logits (fp32, 64 tokens of the evaluation text) and a greedy continuation through a
StateCache, `save_pretrained`, then a *new Python process* runs `linearize.from_pretrained` and the same two things;
the folder is deleted afterwards (SmolLM2 in fp32 is ~540 MB). The LoRA rows wrap SmolLM2 with random r=8 adapters
on q/k/v/o (peft, `init_lora_weights=False`, so they change the outputs) under `liger`.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from common import log

OUT = pathlib.Path(__file__).resolve().parent / "out"

_FRESH = r"""
import json, sys, time, torch
t0 = time.perf_counter()
import linearize
from linearize.generation import StateCache
folder, gen_tokens = sys.argv[1], int(sys.argv[2])
ids = torch.load(folder + "/../ids.pt")
t1 = time.perf_counter()
model = linearize.from_pretrained(folder)
t2 = time.perf_counter()
with torch.no_grad():
    logits = model(input_ids=ids, use_cache=False).logits
gen = model.generate(input_ids=ids[:, :32], past_key_values=StateCache(model, max_length=128),
                     max_new_tokens=gen_tokens, do_sample=False)
torch.save(logits, folder + "/../logits_loaded.pt")
print(json.dumps({"gen": gen[0, 32:].tolist(), "load_s": t2 - t1, "import_s": t1 - t0}))
"""


def _reference(model, ids, gen_tokens):
    from linearize.generation import StateCache

    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    gen = model.generate(input_ids=ids[:, :32], past_key_values=StateCache(model, max_length=128),
                         max_new_tokens=gen_tokens, do_sample=False)
    return logits, gen[0, 32:].tolist()


def _lora(model, seed=0):
    import peft

    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          init_lora_weights=False)
    return peft.get_peft_model(model, cfg).eval()


def measure(name, make, rules, lora, ids, tok, gen_tokens, work: pathlib.Path) -> dict:
    import linearize

    model = make()
    linearize.convert(model, rules=rules)
    ref_logits, ref_gen = _reference(model, ids, gen_tokens)
    folder = work / name
    start = time.perf_counter()
    linearize.save_pretrained(model, folder, tokenizer=tok, lora=lora)
    save_s = time.perf_counter() - start
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    torch.save(ids, work / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", _FRESH, str(folder), str(gen_tokens)], capture_output=True,
                          text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: loading in a fresh process failed:\n{proc.stderr[-3000:]}")
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    loaded = torch.load(work / "logits_loaded.pt")
    shutil.rmtree(folder)
    torch._dynamo.reset()
    row = {"name": name, "rules": rules, "lora": lora if name.startswith("lora") else None,
           "max_logit_diff": (loaded - ref_logits).abs().max().item(), "same_generation": fresh["gen"] == ref_gen,
           "generation": tok.decode(ref_gen), "size_mib": size / 2**20, "save_s": save_s,
           "load_s": fresh["load_s"]}
    log(f"{name}: |logit diff| {row['max_logit_diff']:.1e}, same generation {row['same_generation']}, "
        f"{row['size_mib']:.0f} MiB, save {save_s:.1f} s, load {fresh['load_s']:.1f} s")
    return row


def main(argv=None):
    import linearize
    from linearize.data import english_token_ids
    from linearize.models import load_smollm2

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rules", nargs="+", default=sorted(linearize.available_rules()))
    ap.add_argument("--gen", type=int, default=20, help="greedy tokens generated")
    ap.add_argument("--no-lora", action="store_true")
    args = ap.parse_args(argv)
    base, tok = load_smollm2()
    ids = english_token_ids(tok, 64)

    def fresh_copy():
        import copy

        return copy.deepcopy(base)

    rows = []
    with tempfile.TemporaryDirectory(prefix="linearize-ck-") as tmp:
        work = pathlib.Path(tmp)
        for rules in args.rules:
            rows.append(measure(rules, fresh_copy, rules, "merge", ids, tok, args.gen, work))
        if not args.no_lora:
            for lora in ("merge", "adapter"):
                rows.append(measure(f"lora-{lora}", lambda: _lora(fresh_copy()), "liger", lora, ids, tok,
                                    args.gen, work))
    result = {"model": "SmolLM2-135M-Instruct", "dtype": "float32", "tokens": int(ids.shape[1]),
              "gen_tokens": args.gen, "torch": torch.__version__, "rows": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "checkpoints.json").write_text(json.dumps(result, indent=1))
    lines = ["| model | max abs logit diff | same greedy generation | folder | save | load (fresh process) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['max_logit_diff']:.1e} | {'yes' if r['same_generation'] else 'NO'} | "
                     f"{r['size_mib']:.0f} MiB | {r['save_s']:.1f} s | {r['load_s']:.1f} s |")
    table = "\n".join(lines)
    (OUT / "checkpoints.md").write_text(table + "\n")
    print(table)
    print(f"wrote {OUT / 'checkpoints.json'} and checkpoints.md")
    bad = [r["name"] for r in rows if r["max_logit_diff"] > 1e-6 or not r["same_generation"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
