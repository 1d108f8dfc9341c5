"""Judging a conversion: long-context perplexity, passkey retrieval, associative recall, and lm-eval, side by side.

    linearize eval --model smollm2 --rules liger,swa,exact --lengths 512,2k,8k --tasks ppl,passkey,mqar --out eval/
    linearize eval --model smollm2-liger/ --lm-eval my_tasks/

Short prompts fit inside a 64-token window, so a hybrid can look fine while its linear branch does nothing; what
tells the truth is perplexity at long context, retrieval from beyond the window, and the standard harness on top.

- `ppl`: perplexity of `data.long_document()` (one ~40k-token document, held out of the training text) at each
  context length L, sliding windows of L tokens with stride L/2 (`data.nll_per_token`): every scored token after the
  first window has at least L/2 tokens of context. The same tokens for every row.
- `passkey`: a 5-digit number hidden at a depth (fraction of the prompt) in filler text; the model is asked to
  repeat it. Greedy decoding, through a `StateCache` for converted models (transformers' own cache for the original).
- `mqar`: multi-query associative recall: `pairs` word -> 4-digit code pairs, then each word asked for in turn.
- `--lm-eval DIR`: lm-evaluation-harness tasks defined by local YAML files (e.g. `dataset_path: json` with local
  `data_files`), run on the converted model object through lm-eval's `HFLM`; offline, nothing downloads.

Every generator is deterministic in its seed; `score_answer` is the one scorer. Rows load through `models.load`,
convert through `generation.convert`, decode through `generation.StateCache`: no second copy of any of them.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import random
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

TASKS = ("ppl", "passkey", "mqar")
DEFAULT_LENGTHS = (512, 2048, 8192, 16384)
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
ANSWER_TOKENS = 8  # greedy tokens generated per retrieval prompt
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
WORDS = ("apple", "river", "candle", "forest", "window", "silver", "garden", "rocket", "pencil", "harbor", "violin",
         "marble", "tiger", "lantern", "meadow", "copper", "falcon", "island", "basket", "thunder", "glacier",
         "saddle", "orchid", "compass", "feather", "anchor", "blanket", "canyon", "dragon", "ember", "fossil",
         "helmet", "jungle", "kettle", "ladder", "magnet", "needle", "oyster", "parrot", "quartz", "ribbon",
         "shovel", "tunnel", "umbrella", "velvet", "walnut", "yogurt", "zipper", "bottle", "cactus", "dolphin",
         "engine", "fabric", "guitar", "hammer", "igloo", "jacket", "kitten", "lemon", "mirror", "nickel", "olive",
         "pepper", "quilt")


def parse_length(text: str) -> int:
    """'512', '2k', '16K' -> tokens (k = 1024)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", str(text))
    if not m:
        raise ValueError(f"length {text!r}: write a token count such as 512, 2k or 16k")
    return int(m.group(1)) * (1024 if m.group(2) else 1)


def length_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


# ------------------------------------------------------------------------------------------------ generators
@dataclass(frozen=True)
class Probe:
    """One retrieval question: the prompt's token ids and the answer the model must produce."""

    ids: torch.Tensor  # [1, T]
    answer: str
    meta: dict = field(default_factory=dict)


def passkey_probe(tokenizer, length: int, depth: float, seed: int) -> Probe:
    """A `length`-token prompt (±1 sentence) with a 5-digit pass key at `depth` of the filler, then the question."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    head = "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = "\n\nWhat is the pass key? The pass key is"
    fixed = len(tokenizer(head + needle + question, add_special_tokens=False).input_ids)
    per = len(tokenizer(FILLER * 8, add_special_tokens=False).input_ids) / 8
    n = max(0, round((length - fixed) / per))
    before = round(n * depth)
    text = head + FILLER * before + needle + FILLER * (n - before) + question
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return Probe(ids, key, {"length": length, "depth": depth})


def mqar_probes(tokenizer, pairs: int, queries: int, seed: int) -> list:
    """`pairs` word -> code pairs, then `queries` prompts that each ask one word's code (same pairs, other query)."""
    if pairs > len(WORDS):
        raise ValueError(f"mqar: at most {len(WORDS)} pairs")
    rng = random.Random(seed)
    words = rng.sample(WORDS, pairs)
    codes = [str(rng.randint(1000, 9999)) for _ in words]
    listing = "Words and their codes:\n" + "".join(f"{w}: {c}\n" for w, c in zip(words, codes))
    asked = rng.sample(range(pairs), min(queries, pairs))
    out = []
    for i in asked:  # the question repeats the listing's form (SmolLM2-135M recalls ~40-60% of 8-16 pairs so)
        ids = tokenizer(listing + f"\n{words[i]}:", return_tensors="pt", add_special_tokens=False).input_ids
        out.append(Probe(ids, codes[i], {"pairs": pairs, "word": words[i], "position": i / max(pairs - 1, 1)}))
    return out


def score_answer(generated: str, answer: str) -> bool:
    """Right when the first number in the generated text is the answer."""
    m = re.search(r"\d+", generated)
    return bool(m) and m.group(0) == answer


def run_probes(probes: list, answer_fn: Callable) -> dict:
    """Accuracy of `answer_fn(ids) -> text` over the probes, with each probe's outcome."""
    results = []
    for p in probes:
        text = answer_fn(p.ids)
        results.append({**p.meta, "answer": p.answer, "generated": text, "correct": score_answer(text, p.answer)})
    acc = sum(r["correct"] for r in results) / max(len(results), 1)
    return {"accuracy": acc, "items": results}


# ------------------------------------------------------------------------------------------------ model side
def greedy_answer_fn(model, tokenizer, capacity: int, max_new_tokens: int = 8) -> Callable:
    """ids -> greedy continuation text: through one StateCache (reset per prompt, so its decoding graph compiles
    once) for a converted model; transformers' own cache for an unconverted one."""
    from .generation import StateCache

    cache = None
    if getattr(model, "_linearize_rules", None) is not None:
        limit = getattr(model.config, "max_position_embeddings", capacity)
        cache = StateCache(model, max_length=capacity, beyond_position_limit=capacity > limit)

    def answer(ids: torch.Tensor) -> str:
        if ids.shape[1] + max_new_tokens > capacity:
            raise ValueError(f"a {ids.shape[1]}-token prompt does not fit a {capacity}-token evaluation cache")
        ids = ids.to(next(model.parameters()).device)
        kwargs = {}
        if cache is not None:
            cache.reset()
            kwargs["past_key_values"] = cache
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id, **kwargs)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    return answer


def perplexity_at(model, ids: torch.Tensor, length: int) -> dict:
    """Perplexity over the first `length + length // 2` tokens: windows of `length`, stride `length // 2`."""
    from .data import nll_per_token

    stride = max(1, length // 2)
    span = ids[:, : length + stride]
    if span.shape[1] < length:
        raise ValueError(f"the long document has {ids.shape[1]} tokens; {length} were asked")
    total, count = nll_per_token(model, span, window=length, stride=stride)
    return {"ppl": math.exp(total / count), "tokens_scored": count, "stride": stride}


# ------------------------------------------------------------------------------------------------ lm-eval
def run_lm_eval(model, tokenizer, tasks_dir, tasks: Optional[list] = None, limit: Optional[int] = None) -> dict:
    """lm-evaluation-harness tasks from local YAML files in `tasks_dir`, on this model object, offline.

    Every task in the folder runs unless `tasks` names some; relative `data_files` are read from the folder. A task
    whose data is not on this machine is reported with what is missing instead of downloading it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise RuntimeError("lm-eval is not installed: pip install lm-eval (the versions in constraints.txt)") from exc
    tasks_dir = pathlib.Path(tasks_dir)
    if not tasks_dir.is_dir():
        raise FileNotFoundError(f"--lm-eval {tasks_dir}: no such folder of task YAML files")
    names = tasks or sorted(_task_names(tasks_dir))
    if not names:
        raise ValueError(f"{tasks_dir}: no lm-eval task YAML (a file with `task: NAME`) in it")
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, device=str(next(model.parameters()).device))
    out = {}
    with _offline(), contextlib.chdir(tasks_dir):  # local data_files are relative to the task folder
        for name in names:
            missing = _missing_data(tasks_dir, name)
            if missing:
                out[name] = {"error": f"data not available offline: {missing}"}
                continue
            try:
                res = lm_eval.simple_evaluate(model=lm, tasks=[name], task_manager=manager, limit=limit,
                                              log_samples=False)
            except Exception as exc:  # noqa: BLE001 - one task's failure is a result, the others still run
                hub = (_task_yaml(tasks_dir, name) or {}).get("dataset_path")
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}" if str(exc) else type(exc).__name__
                if hub and hub not in _LOCAL_BUILDERS:
                    why = (f"data not available offline: dataset {hub!r} is not in the local datasets cache "
                           f"(nothing is downloaded; {why})")
                out[name] = {"error": why}
                continue
            metrics = res["results"].get(name, {})
            out[name] = {k.split(",")[0]: v for k, v in metrics.items()
                         if isinstance(v, (int, float)) and "stderr" not in k}
    return out


def _task_names(tasks_dir: pathlib.Path) -> list:
    import yaml

    docs = (yaml.safe_load(f.read_text()) or {} for f in sorted(tasks_dir.glob("*.yaml")))
    return [d["task"] for d in docs if isinstance(d, dict) and isinstance(d.get("task"), str)]


_LOCAL_BUILDERS = ("json", "csv", "parquet", "text")


def _task_yaml(tasks_dir: pathlib.Path, name: str) -> Optional[dict]:
    import yaml

    for f in sorted(tasks_dir.glob("*.yaml")):
        doc = yaml.safe_load(f.read_text()) or {}
        if isinstance(doc, dict) and doc.get("task") == name:
            return doc
    return None


def _missing_data(tasks_dir: pathlib.Path, name: str) -> Optional[str]:
    """The local `data_files` of a task that do not exist (relative to the task folder), or None."""
    doc = _task_yaml(tasks_dir, name) or {}
    files = (doc.get("dataset_kwargs") or {}).get("data_files")
    if doc.get("dataset_path") not in _LOCAL_BUILDERS or not files:
        return None
    listed = files.values() if isinstance(files, dict) else [files] if isinstance(files, str) else files
    flat = [x for v in listed for x in (v if isinstance(v, list) else [v])]
    absent = [x for x in flat if not (tasks_dir / x).exists()]
    return ", ".join(absent) if absent else None


@contextlib.contextmanager
def _offline():
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------------ the table
@dataclass
class EvalSpec:
    lengths: tuple = (512, 2048)
    passkey_lengths: Optional[tuple] = None  # default: the perplexity lengths
    tasks: tuple = TASKS
    depths: tuple = DEFAULT_DEPTHS
    passkey_trials: int = 1
    mqar_pairs: tuple = (8, 32)
    mqar_queries: int = 8
    seed: int = 0
    lm_eval: Optional[str] = None
    lm_eval_limit: Optional[int] = None


def evaluate_rows(rows: list, tokenizer, spec: EvalSpec, progress=None, after_row=None) -> dict:
    """rows: [(name, enter)] where `enter()` is a context manager yielding the model for that row. Returns the
    whole result: per row, per task, per length. `after_row(result)` sees it after every row (partial files)."""
    from .data import LONG_DOCUMENT_SOURCE, long_document

    doc_ids = tokenizer(long_document(), return_tensors="pt", add_special_tokens=False).input_ids \
        if "ppl" in spec.tasks else None
    passkey_lengths = spec.passkey_lengths or spec.lengths
    passkeys = {(L, d, t): passkey_probe(tokenizer, L, d, seed=spec.seed * 1000 + t)
                for L in passkey_lengths for d in spec.depths for t in range(spec.passkey_trials)} \
        if "passkey" in spec.tasks else {}
    mqar = {P: mqar_probes(tokenizer, P, spec.mqar_queries, seed=spec.seed + P) for P in spec.mqar_pairs} \
        if "mqar" in spec.tasks else {}
    result = {"spec": {**spec.__dict__, "lengths": list(spec.lengths), "passkey_lengths": list(passkey_lengths)},
              "document": LONG_DOCUMENT_SOURCE,
              "document_tokens": int(doc_ids.shape[1]) if doc_ids is not None else None, "rows": {}}
    for name, enter in rows:
        row = result["rows"][name] = {"ppl": {}, "passkey": {}, "mqar": {}, "seconds": {}}
        start = time.perf_counter()
        with enter() as model:
            longest = max([p.ids.shape[1] for p in passkeys.values()] +
                          [p.ids.shape[1] for ps in mqar.values() for p in ps] + [1])
            answer = greedy_answer_fn(model, tokenizer, capacity=longest + ANSWER_TOKENS, max_new_tokens=ANSWER_TOKENS)
            for L in spec.lengths if doc_ids is not None else ():
                _tick(progress, f"{name}: perplexity at {length_label(L)}")
                row["ppl"][str(L)] = perplexity_at(model, doc_ids, L)
            for L in passkey_lengths if passkeys else ():
                for d in spec.depths:
                    _tick(progress, f"{name}: passkey at {length_label(L)}, depth {d:.0%}")
                    probes = [passkeys[(L, d, t)] for t in range(spec.passkey_trials)]
                    row["passkey"][f"{L}@{d}"] = run_probes(probes, answer)
            for P, probes in mqar.items():
                _tick(progress, f"{name}: recall of {P} pairs")
                row["mqar"][str(P)] = run_probes(probes, answer)
            if spec.lm_eval:
                _tick(progress, f"{name}: lm-eval")
                row["lm_eval"] = run_lm_eval(model, tokenizer, spec.lm_eval, limit=spec.lm_eval_limit)
        row["seconds"] = round(time.perf_counter() - start, 1)
        torch._dynamo.reset()
        if after_row is not None:
            after_row(result)
    return result


def _tick(progress, what: str) -> None:
    if progress is not None:
        progress.set_description(what)
        progress.update(1)


def steps(spec: EvalSpec, n_rows: int) -> int:
    per_row = (len(spec.lengths) if "ppl" in spec.tasks else 0) + bool(spec.lm_eval) \
        + (len(spec.passkey_lengths or spec.lengths) * len(spec.depths) if "passkey" in spec.tasks else 0) \
        + (len(spec.mqar_pairs) if "mqar" in spec.tasks else 0)
    return n_rows * per_row


def table_rows(result: dict) -> tuple[list, list]:
    """(header, rows) of the one summary table: perplexity per length, passkey per length (mean over depths),
    recall per pair count, lm-eval metrics."""
    spec = result["spec"]
    header = ["model"]
    any_row = next(iter(result["rows"].values()), {})
    header += [f"ppl {length_label(L)}" for L in spec["lengths"] if any_row.get("ppl")]
    header += [f"passkey {length_label(L)}" for L in spec["passkey_lengths"] if any_row.get("passkey")]
    header += [f"mqar {P}" for P in spec["mqar_pairs"] if any_row.get("mqar")]
    lm_cols = sorted({f"{t}/{m}" for r in result["rows"].values() for t, ms in (r.get("lm_eval") or {}).items()
                      for m in ms})
    header += lm_cols + ["seconds"]
    rows = []
    for name, r in result["rows"].items():
        cells = [name]
        if any_row.get("ppl"):
            cells += [f"{r['ppl'][str(L)]['ppl']:.2f}" for L in spec["lengths"]]
        if any_row.get("passkey"):
            for L in spec["passkey_lengths"]:
                accs = [v["accuracy"] for k, v in r["passkey"].items() if k.startswith(f"{L}@")]
                cells.append(f"{100 * sum(accs) / len(accs):.0f}%")
        if any_row.get("mqar"):
            cells += [f"{100 * r['mqar'][str(P)]['accuracy']:.0f}%" for P in spec["mqar_pairs"]]
        for col in lm_cols:
            task, metric = col.split("/", 1)
            v = (r.get("lm_eval") or {}).get(task, {}).get(metric)
            cells.append("-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v))
        cells.append(str(r["seconds"]))
        rows.append(cells)
    return header, rows


def markdown_table(result: dict) -> str:
    header, rows = table_rows(result)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plot(result: dict, out: pathlib.Path) -> list:
    """perplexity.png (perplexity vs context length) and passkey.png (length x depth accuracy per row)."""
    from .report.plots import pyplot

    plt = pyplot("perplexity.png and passkey.png")
    if plt is None:
        return []
    written = []
    spec, rows = result["spec"], result["rows"]
    lengths = spec["lengths"]
    if any(r["ppl"] for r in rows.values()):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, r in rows.items():
            ax.plot(lengths, [r["ppl"][str(L)]["ppl"] for L in lengths], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [length_label(L) for L in lengths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(f"Long-document perplexity ({result['document_tokens']} tokens available)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "perplexity.png", dpi=120)
        plt.close(fig)
        written.append(out / "perplexity.png")
    if any(r["passkey"] for r in rows.values()):
        depths, lengths = spec["depths"], spec["passkey_lengths"]
        fig, axes = plt.subplots(1, len(rows), figsize=(2.2 * len(rows) + 1, 3.2), squeeze=False)
        for ax, (name, r) in zip(axes[0], rows.items()):
            grid = [[r["passkey"][f"{L}@{d}"]["accuracy"] for L in lengths] for d in depths]
            ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [length_label(L) for L in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
            ax.set_title(name, fontsize=8)
        axes[0][0].set_ylabel("depth")
        fig.suptitle("Passkey accuracy (length x depth)")
        fig.tight_layout()
        fig.savefig(out / "passkey.png", dpi=120)
        plt.close(fig)
        written.append(out / "passkey.png")
    return written


def write(result: dict, out) -> list:
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    (out / "eval.md").write_text(markdown_table(result) + "\n")
    return [out / "eval.json", out / "eval.md", *plot(result, out)]


# ------------------------------------------------------------------------------------------------ entry point
def model_rows(model, rules: list, original: bool = True) -> list:
    """(name, enter) rows for one base model: as it is, then converted under each rule set in turn (in place,
    reverted afterwards, so one copy of the weights serves every row)."""
    from .generation import converted

    def as_is():
        return contextlib.nullcontext(model)

    if getattr(model, "_linearize_rules", None) is not None:  # converted already (a loaded checkpoint)
        return [(str(model._linearize_rules), as_is)]
    return ([("original", as_is)] if original else []) + [(str(r), lambda r=r: converted(model, r)) for r in rules]


def evaluate(models=("smollm2",), rules=(), spec: Optional[EvalSpec] = None, original: bool = True,
             out=None) -> dict:
    """Evaluate each model spec (`models.load`: a name or a saved folder) as it is and under each rule set; write
    eval.json, eval.md and the plots to `out` when given. Returns the result (`table_rows` makes the table)."""
    from tqdm.auto import tqdm

    from .models import load

    spec = spec or EvalSpec()
    rows, tokenizer = [], None
    for m in models:
        model, tok = load(m)
        if tok is None:
            raise ValueError(f"model {m!r} has no tokenizer; evaluation needs text (save one with the checkpoint)")
        tokenizer = tokenizer or tok
        saved = getattr(model, "_linearize_rules", None) is not None  # a checkpoint folder: one row, as saved
        label = pathlib.Path(str(m)).name if saved else str(m)
        for name, enter in model_rows(model, list(rules), original):
            if saved:
                name = label
            elif len(models) > 1:
                name = f"{label}:{name}"
            rows.append((name, enter))
    start = time.perf_counter()
    with tqdm(total=steps(spec, len(rows)), unit="step", dynamic_ncols=True, mininterval=1.0) as bar:
        result = evaluate_rows(rows, tokenizer, spec, progress=bar,
                               after_row=(lambda r: write(r, out)) if out is not None else None)
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    result["models"] = list(models)
    if out is not None:
        result["files"] = [str(p) for p in write(result, out)]
    return result
