"""Save and load converted models as Hugging Face checkpoint folders (docs/checkpoints.md).

    linearize.save_pretrained(model, "smollm2-liger/", tokenizer=tok)      # after convert (or recovery)
    model = linearize.from_pretrained("smollm2-liger/")                     # converted, ready to generate
    AutoModelForCausalLM.from_pretrained("smollm2-liger/", trust_remote_code=True)   # the same, via auto_map

The folder holds the base model's `config.json` (its own `model_type`, so transformers knows the architecture) with
a versioned `linearize` section: the *resolved* decision for every attention site (layer, module, rewrite and its
parameters), so a later change to a built-in recipe cannot change a saved model; `linearize_rules.yaml`, the same
decisions as an ordinary rule file; the weights in `linearize.safetensors`; the tokenizer; `modeling_linearize.py`
for `auto_map`; and, when LoRA adapters are kept unmerged, a peft adapter folder `adapter/`.

The weights file is deliberately not `model.safetensors`: plain `AutoModelForCausalLM.from_pretrained(dir)` without
`trust_remote_code` would otherwise load the base architecture with *softmax* attention from it, silently. It fails
instead, and `linearize show dir` says what the folder is. `export_native` writes the other kind of folder: for
window/full mixes on families whose configs carry per-layer `layer_types` (Qwen2, Qwen3, Mistral, Gemma 2/3), an
unmodified-transformers checkpoint.

Loading is strict: a missing or unexpected weight, another format version, or a base model that no longer yields
the saved sites and decisions is a `CheckpointError` naming what differs; never a fallback to softmax.
"""
from __future__ import annotations

import copy
import json
import pathlib
import shutil
import time
import warnings
from typing import Optional

import torch

from .generation.convert import peft_base

FORMAT = "linearize-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "linearize.safetensors"
RULES_FILE = "linearize_rules.yaml"
REMOTE_CODE = "modeling_linearize.py"
ADAPTER_DIR = "adapter"
AUTO_MAP = {"AutoModelForCausalLM": "modeling_linearize.LinearizedForCausalLM"}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be saved or loaded faithfully; the message says what differs."""


# ------------------------------------------------------------------------------------------------ saving
def save_pretrained(model, out, *, rules=None, tokenizer=None, lora: str = "merge", overwrite: bool = False) -> dict:
    """Write `model` (converted by `linearize.convert`, or plain with `rules=`) as a checkpoint folder.

    lora: for a peft model, "merge" folds the adapters into the weights, "adapter" keeps them as a peft adapter
    folder beside the base weights. Returns the `linearize` section written into config.json."""
    from . import __version__
    from .generation.plan import decide_sites
    from .rewrite import rules as rule_sets

    if lora not in ("merge", "adapter"):
        raise CheckpointError(f"lora={lora!r}: choose 'merge' (fold into the weights) or 'adapter' (peft folder)")
    out = _empty_folder(out, overwrite)
    recorded = _recorded_rules(model, required=rules is None)
    if rules is not None and recorded is not None and str(rules) != str(recorded):
        raise CheckpointError(f"the model was converted with rules={recorded!r} but save_pretrained was given "
                              f"rules={rules!r}: the checkpoint would record a model other than the one that runs")
    ruleset = rule_sets.load(rules if rules is not None else recorded)
    if ruleset.patterns:
        raise CheckpointError(f"rules {ruleset.name!r} define their own attention patterns (`patterns:`); a "
                              "checkpoint cannot record them yet. Save with rules built on the pattern library.")
    base, adapter = _split_lora(model, lora)
    start = time.perf_counter()
    report = decide_sites(base, ruleset)
    decisions = [_decision(s) for s in report.sites]
    if not decisions:
        raise CheckpointError(f"no attention site found in this {type(base).__name__}: nothing to save as a "
                              "linearize checkpoint (linearize.explain(model, ids) shows what was seen)")
    for d in decisions:
        if d["layer"] is None and not d["module"]:
            raise CheckpointError(f"site {d['node']} has neither a layer index nor a module path; its decision "
                                  "could not be re-applied on load")
    out.mkdir(parents=True, exist_ok=True)
    if (out / ADAPTER_DIR).is_dir():  # overwriting: an adapter folder left from an earlier save must not survive
        shutil.rmtree(out / ADAPTER_DIR)
    from safetensors.torch import save_model

    save_model(base, str(out / WEIGHTS), metadata={"format": "pt", "producer": FORMAT})
    if adapter is not None:
        adapter.save_pretrained(str(out / ADAPTER_DIR))
    (out / RULES_FILE).write_text(rules_text(decisions, source=ruleset.name))
    shutil.copyfile(pathlib.Path(__file__).with_name("_remote_code.py"), out / REMOTE_CODE)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    section = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "linearize_version": __version__,
        "source_rules": ruleset.name, "rules_file": RULES_FILE, "weights": WEIGHTS,
        "dtype": str(next(base.parameters()).dtype).replace("torch.", ""),
        "base": {"model_class": type(base).__name__, "model_type": base.config.model_type,
                 "num_sites": len(decisions)},
        "lora": {"merged": adapter is None, "folder": ADAPTER_DIR if adapter is not None else None}
                if _is_peft(model) else None,
        "sites": decisions,
        "versions": _versions(),
    }
    config = copy.deepcopy(base.config)
    config.linearize = section
    config.auto_map = dict(AUTO_MAP)
    config.save_pretrained(str(out))
    section["seconds"] = round(time.perf_counter() - start, 2)
    return section


def _empty_folder(out, overwrite: bool) -> pathlib.Path:
    out = pathlib.Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: the folder exists and is not empty; pass overwrite=True (--overwrite) or "
                              "choose another folder")
    return out


def _recorded_rules(model, required: bool = True):
    """The rules `linearize.convert` recorded on the model (or its peft base); None, or an error if `required`."""
    for m in (model, getattr(model, "base_model", None), peft_base(model)):
        rules = getattr(m, "_linearize_rules", None) if m is not None else None
        if rules is not None:
            return rules
    if not required:
        return None
    raise CheckpointError("this model was not converted with linearize.convert(model, rules=...), so the rules "
                          "are unknown; pass rules= to save_pretrained")


def _is_peft(model) -> bool:
    return peft_base(model) is not None


def _split_lora(model, lora: str):
    """(plain transformers model to save, peft model whose adapter to save or None). Never mutates `model`."""
    if not _is_peft(model):
        return model, None
    twin = copy.deepcopy(model)
    twin._compiled_call_impl = None
    if lora == "merge":
        return twin.merge_and_unload(), None
    return twin.unload(), model  # saving the adapter reads the model, it does not change it


def _decision(site) -> dict:
    return {"layer": site.layer, "module": site.module_path, "node": site.node.name, "pattern": site.pattern,
            "rewrite": site.rewrite, "params": _plain(site.params), "reason": site.reason}


def _plain(params: dict) -> dict:
    """JSON/YAML-safe parameter values (tuples as lists, numbers as numbers)."""
    return json.loads(json.dumps(params, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def rules_text(decisions: list, source: str) -> str:
    """The saved decisions as an ordinary rule file: one rule per site, then `keep` for anything else."""
    import yaml

    rules = []
    for d in decisions:
        # by layer index (the module path gains a prefix under wrappers such as peft's); load checks the paths
        where = {"layers": str(d["layer"])} if d["layer"] is not None else {"module": d["module"]}
        rule = {"where": where, "rewrite": d["rewrite"]}
        if d["params"]:
            rule["with"] = d["params"]
        rules.append(rule)
    rules.append({"rewrite": "keep"})
    body = yaml.safe_dump({"description": f"per-site decisions saved from rules {source!r}", "rules": rules},
                          sort_keys=False, default_flow_style=None, width=120)
    return (f"# Written by linearize.save_pretrained: the resolved decision for every attention site under rules "
            f"{source!r}.\n# Loading re-applies exactly these and checks that the model still yields them.\n" + body)


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


# ------------------------------------------------------------------------------------------------ loading
def read_section(path) -> dict:
    """The `linearize` section of a checkpoint's config.json, checked for format and version."""
    path = pathlib.Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json; not a checkpoint folder")
    section = json.loads(cfg_file.read_text()).get("linearize")
    if not isinstance(section, dict) or section.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file}: no `linearize` section; this is not a linearize checkpoint (an ordinary "
                              "transformers folder loads with AutoModelForCausalLM.from_pretrained)")
    if section.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_file}: linearize checkpoint format version {section.get('format_version')}, "
                              f"but this linearize (reads version {FORMAT_VERSION}) cannot read it; install the "
                              f"linearize version that wrote it ({section.get('linearize_version')})")
    return section


def from_pretrained(path, *, dtype: Optional[torch.dtype] = None, device=None, **options):
    """Load a checkpoint folder written by `save_pretrained`: the base model, its weights (strictly), the LoRA
    adapters if kept unmerged, converted in place with exactly the saved per-site decisions (checked)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .generation import convert
    from .generation.convert import install_learned
    from .models import no_init_weights

    path = pathlib.Path(path)
    section = read_section(path)
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    for attr in ("linearize", "auto_map"):
        if hasattr(config, attr):
            delattr(config, attr)
    dtype = dtype or getattr(torch, section.get("dtype", "float32"))
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # before loading: a tied pair is stored once, under either name
    rules_file = path / section["rules_file"]
    if not rules_file.is_file():
        raise CheckpointError(f"{path}: {section['rules_file']} is missing; the saved decisions cannot be applied")
    install_learned(model, str(rules_file))  # learned recipe parameters are weights of the checkpoint too
    _load_weights(model, path / section["weights"])
    model.to(dtype=dtype, device=device).eval()
    lora = section.get("lora") or {}
    if lora.get("folder"):
        model = _load_adapter(model, path / lora["folder"])
    convert(model, rules=str(rules_file), **options)
    check_decisions(model, str(rules_file), section["sites"], path)
    return model


def _load_weights(model, file: pathlib.Path) -> None:
    from safetensors.torch import load_file

    if not file.is_file():
        raise CheckpointError(f"{file}: the weights file is missing")
    saved = load_file(str(file))
    want = model.state_dict()
    shared = _tied_aliases(model)
    missing = sorted(k for k in want if k not in saved and shared.get(k) not in saved)
    unexpected = sorted(k for k in saved if k not in want)
    if missing or unexpected:
        raise CheckpointError(f"{file}: the weights do not match {type(model).__name__} built from config.json: "
                              f"missing {_few(missing)}; unexpected {_few(unexpected)}")
    bad = [k for k, t in saved.items() if tuple(t.shape) != tuple(want[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(f"{file}: {len(bad)} weight(s) have other shapes than the model's, e.g. {k}: saved "
                              f"{tuple(saved[k].shape)}, model {tuple(want[k].shape)}")
    model.load_state_dict(saved, strict=False)  # tied aliases are the only keys not in `saved`, checked above


def _tied_aliases(model) -> dict:
    """name -> another name of the same tensor (tied embeddings), so either may be the one saved."""
    by_ptr, alias = {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), tuple(t.shape))
        if key in by_ptr:
            alias[name] = by_ptr[key]
            alias.setdefault(by_ptr[key], name)
        else:
            by_ptr[key] = name
    return alias


def _few(keys: list) -> str:
    return "none" if not keys else ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _load_adapter(model, folder: pathlib.Path):
    try:
        import peft
    except ImportError:
        raise CheckpointError(f"{folder}: this checkpoint keeps LoRA adapters unmerged; install peft to load it "
                              "(pip install peft), or save it again with lora='merge'") from None
    if not (folder / "adapter_config.json").is_file():
        raise CheckpointError(f"{folder}: adapter_config.json is missing; the LoRA adapters cannot be loaded")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = peft.PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    for w in caught:
        if "missing adapter keys" in str(w.message).lower() or "unexpected" in str(w.message).lower():
            raise CheckpointError(f"{folder}: the adapter does not match the model: {w.message}")
    return wrapped.eval()


def check_decisions(model, rules, saved: list, where) -> None:
    """The model must yield the saved sites, with the saved rewrite and parameters, in the same order."""
    from .generation.plan import decide_sites

    target = model  # the module that runs (a peft wrapper included), as the compiled forward sees it
    got = [_decision(s) for s in decide_sites(target, rules).sites]
    if len(got) != len(saved):
        raise CheckpointError(f"{where}: the checkpoint records {len(saved)} attention sites, but this "
                              f"{type(target).__name__} under this transformers yields {len(got)}; the saved "
                              "decisions cannot be re-applied")
    keys = ("layer", "module", "rewrite", "params")
    for g, s in zip(got, saved):
        if _strip_peft(g["module"]) == _strip_peft(s["module"]):
            g = {**g, "module": s["module"]}  # only peft's wrapper prefix differs
        diff = [k for k in keys if g[k] != s[k]]
        if diff:
            raise CheckpointError(
                f"{where}: the site at {s['module'] or s['node']} was saved as "
                f"{', '.join(f'{k}={s[k]!r}' for k in diff)} but now gives "
                f"{', '.join(f'{k}={g[k]!r}' for k in diff)}" + (f" ({g['reason']})" if g.get("reason") else ""))


def _strip_peft(path: str) -> str:
    return path.removeprefix("base_model.model.")  # PeftModel -> LoraModel -> the transformers model


# ------------------------------------------------------------------------------------------------ inspecting
def show(path) -> str:
    """A human summary of a checkpoint folder: base, rules per layer, adapters, versions, files and sizes."""
    path = pathlib.Path(path)
    section = read_section(path)
    lines = [f"{path}: linearize checkpoint v{section['format_version']} (linearize {section['linearize_version']})",
             f"  base: {section['base']['model_class']} (model_type {section['base']['model_type']}), "
             f"{section['dtype']}, {section['base']['num_sites']} attention sites",
             f"  saved from rules: {section['source_rules']}"]
    lora = section.get("lora")
    lines.append("  LoRA: " + ("none" if not lora else "merged into the weights" if lora["merged"] else
                               f"unmerged, peft adapter in {lora['folder']}/"))
    runs = _runs(section["sites"])
    lines.append("  per layer:")
    for layers, rewrite, params, reason in runs:
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        lines.append(f"    {layers:>9s}  {rewrite}" + (f" ({shown})" if shown else "") +
                     (f"  [kept: {reason}]" if reason else ""))
    lines.append("  versions: " + ", ".join(f"{k} {v}" for k, v in section.get("versions", {}).items()))
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    lines.append(f"  files: {', '.join(sorted(p.name for p in path.iterdir()))} ({size / 2**20:.1f} MiB)")
    return "\n".join(lines)


def _runs(sites: list) -> list:
    """Consecutive sites with the same decision, as ("0-6", rewrite, params, reason)."""
    out = []
    for s in sites:
        label = str(s["layer"]) if s["layer"] is not None else s["module"]
        if out and out[-1][1:4] == (s["rewrite"], s["params"], s["reason"]) and s["layer"] is not None \
                and out[-1][4] == s["layer"] - 1:
            out[-1] = (f"{out[-1][0].split('-')[0]}-{s['layer']}", *out[-1][1:4], s["layer"])
        else:
            out.append((label, s["rewrite"], s["params"], s["reason"], s["layer"]))
    return [r[:4] for r in out]


# ------------------------------------------------------------------------------------------------ native export
# families whose transformers config carries per-layer `layer_types` with one `sliding_window`
NATIVE_FAMILIES = ("qwen2", "qwen3", "ministral", "gemma2", "gemma3_text", "cohere2")
# Llama-shaped families without biases: the same weights load as Ministral, which has `layer_types`
AS_MINISTRAL = ("llama", "mistral")
FULL = ("keep", "exact")


def original_layer_types(config) -> list:
    """What each layer of the unconverted model does: its config's `layer_types`, else every layer sliding when the
    config sets a `sliding_window` the family uses (Mistral), else full."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True):
        return ["sliding_attention"] * n
    return ["full_attention"] * n


def native_layer_types(decisions: list, config) -> tuple[list, Optional[int]]:
    """(`layer_types`, `sliding_window`) for window/full decisions, or CheckpointError saying why not. A layer kept
    as softmax keeps what the original model does there (which may be its own sliding window)."""
    n = config.num_hidden_layers
    windows, types = set(), []
    by_layer = {d["layer"]: d for d in decisions}
    if None in by_layer or sorted(by_layer) != list(range(n)):
        raise CheckpointError("a native export needs exactly one attention site per decoder layer "
                              f"(layers found: {sorted(k for k in by_layer if k is not None)})")
    original = original_layer_types(config)
    for i in range(n):
        d = by_layer[i]
        if d["rewrite"] in FULL:
            types.append(original[i])
            if original[i] == "sliding_attention":
                windows.add(int(config.sliding_window))
        elif d["rewrite"] == "swa" and not d["params"].get("sinks"):  # configs have no attention-sink tokens
            windows.add(int(d["params"]["window"]))
            types.append("sliding_attention")
        else:
            raise CheckpointError(f"layer {i} is rewritten as {d['rewrite']} {d['params']}: transformers configs "
                                  "express only sliding-window and full softmax attention; save it with "
                                  "linearize.save_pretrained instead")
    if len(windows) > 1:
        raise CheckpointError(f"windows {sorted(windows)} differ between layers (the model's own sliding layers "
                              "count too); a transformers config has one `sliding_window`")
    return types, (windows.pop() if windows else None)


def export_native(model, out, *, rules=None, tokenizer=None, overwrite: bool = False, check_tokens: int = 48) -> dict:
    """Write a window/full conversion as a checkpoint that unmodified transformers loads (per-layer
    `layer_types`), and check that its logits equal linearize's own. Returns {model_type, layer_types, max_diff}."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .generation.plan import decide_sites
    from .rewrite import rules as rule_sets

    out = _empty_folder(out, overwrite)
    if _is_peft(model):
        raise CheckpointError("merge the LoRA adapters first (model.merge_and_unload()) for a native export")
    rules = rules if rules is not None else _recorded_rules(model)
    rules_set = rule_sets.load(rules)
    decisions = [_decision(s) for s in decide_sites(model, rules_set).sites]
    cfg = model.config
    types, window = native_layer_types(decisions, cfg)
    family = cfg.model_type
    data = cfg.to_dict()
    if family in AS_MINISTRAL:
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
            raise CheckpointError(f"this {family} model has attention or MLP biases, which Ministral (the "
                                  "Llama-shaped family with `layer_types`) does not; no native export")
        family = "ministral"
        data["model_type"] = family
        data["architectures"] = ["MinistralForCausalLM"]
    elif family not in NATIVE_FAMILIES:
        raise CheckpointError(f"model_type {family!r}: transformers has no per-layer `layer_types` for it (native "
                              f"families: {', '.join(NATIVE_FAMILIES + AS_MINISTRAL)}); use save_pretrained")
    data.update(layer_types=types, sliding_window=window or getattr(cfg, "sliding_window", None) or 4096)
    if family == "qwen2":
        data["use_sliding_window"] = window is not None
    for key in ("linearize", "auto_map", "_name_or_path"):
        data.pop(key, None)
    config = AutoConfig.for_model(**data)
    native = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    missing, unexpected = native.load_state_dict(model.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k or not config.tie_word_embeddings] or unexpected:
        raise CheckpointError(f"{family} does not take this model's weights: missing {_few(list(missing))}, "
                              f"unexpected {_few(list(unexpected))}")
    native.tie_weights()
    native.eval()
    max_diff = _compare_logits(model, native, rules_set, max(check_tokens, 2 * (window or 0)))
    if max_diff > 1e-4:
        raise CheckpointError(f"the native {family} model's logits differ from linearize's by {max_diff:.2e}; "
                              "not exported")
    out.mkdir(parents=True, exist_ok=True)
    native.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return {"model_type": family, "layer_types": types, "sliding_window": window, "max_diff": max_diff}


def _compare_logits(model, native, rules, tokens: int) -> float:
    """Max |logit difference| between linearize's rewrite of `model` and the native model, on random ids."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (1, tokens), generator=gen).to(next(model.parameters()).device)
    compiled = torch.compile(model, backend="linearize", options={"rules": rules, "inner": "eager"})
    with torch.no_grad():
        ours = compiled(ids, use_cache=False).logits
        theirs = native(ids, use_cache=False).logits
    torch._dynamo.reset()
    return (ours.float() - theirs.float()).abs().max().item()
