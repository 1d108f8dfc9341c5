"""Checkpoints (issue 13): save -> load in a fresh process gives the same logits and generations for every built-in
recipe and for LoRA (merged and unmerged); every refusal says what differs; native window/full exports load in
unmodified transformers with linearize's logits."""
import json
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import linearize
from linearize.checkpoint import CheckpointError, export_native, from_pretrained, save_pretrained, show
from linearize.models import tiny_model

RECIPES = sorted(linearize.available_rules())
GEN_TOKENS = 8


def _ids(T=40, seed=0):
    return torch.randint(3, 128, (1, T), generator=torch.Generator().manual_seed(seed))


def _logits_and_greedy(model):
    ids = _ids()
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    cache = linearize.StateCache(model, max_length=64)
    out = model.generate(ids[:, :12], past_key_values=cache, max_new_tokens=GEN_TOKENS, do_sample=False)
    return logits, out[0, 12:].tolist()


_FRESH = """
import json, sys, torch
import linearize
from linearize.generation import StateCache
ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
out = {}
for folder in sys.argv[1:]:
    model = linearize.from_pretrained(folder, inner="eager")
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
    gen = model.generate(ids[:, :12], past_key_values=StateCache(model, max_length=64), max_new_tokens=%d,
                         do_sample=False)
    torch.save(logits, folder + "/logits.pt")
    out[folder] = gen[0, 12:].tolist()
    torch._dynamo.reset()
print(json.dumps(out))
""" % GEN_TOKENS


def _load_in_fresh_process(folders) -> dict:
    proc = subprocess.run([sys.executable, "-c", _FRESH, *map(str, folders)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_recipe_reloads_in_a_fresh_process_with_identical_logits_and_generation(tmp_path):
    expected, folders = {}, []
    for rules in RECIPES:
        layers = 8 if rules == "liger-hybrid" else 2
        model = linearize.convert(tiny_model("llama", num_hidden_layers=layers), rules=rules, inner="eager")
        expected[rules] = _logits_and_greedy(model)
        folder = tmp_path / rules
        save_pretrained(model, folder)
        folders.append(folder)
        torch._dynamo.reset()
    generations = _load_in_fresh_process(folders)
    for rules, folder in zip(RECIPES, folders):
        logits = torch.load(folder / "logits.pt")
        assert (logits - expected[rules][0]).abs().max().item() <= 1e-6, rules
        assert generations[str(folder)] == expected[rules][1], rules


def _lora_model():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama", num_hidden_layers=2)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          init_lora_weights=False)  # random B: the adapters change the outputs
    return peft.get_peft_model(model, cfg).eval()


@pytest.mark.parametrize("lora", ["merge", "adapter"])
def test_lora_model_reloads_merged_or_unmerged(tmp_path, lora):
    model = _lora_model()
    plain = tiny_model("llama", num_hidden_layers=2)
    linearize.convert(model, rules="liger", inner="eager")
    ids = _ids()
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        base = torch.compile(plain, backend="linearize", options={"rules": "liger", "inner": "eager"})(
            ids, use_cache=False).logits
    assert (ref - base).abs().max().item() > 1e-3  # the adapters matter, so losing them would show
    section = save_pretrained(model, tmp_path / "ck", lora=lora)
    assert section["lora"] == {"merged": lora == "merge", "folder": None if lora == "merge" else "adapter"}
    assert (tmp_path / "ck" / "adapter" / "adapter_config.json").is_file() == (lora == "adapter")
    loaded = from_pretrained(tmp_path / "ck", inner="eager")
    with torch.no_grad():
        out = loaded(input_ids=ids, use_cache=False).logits
    assert (out - ref).abs().max().item() <= 1e-5  # merging reorders float sums; unmerged is the same graph
    # generation reaches the compiled model through peft's wrapper too, and decodes like the original
    want = model.generate(input_ids=ids[:, :12], past_key_values=linearize.StateCache(model, max_length=32),
                          max_new_tokens=6, do_sample=False)
    got = loaded.generate(input_ids=ids[:, :12], past_key_values=linearize.StateCache(loaded, max_length=32),
                          max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_tied_embeddings_are_stored_once_and_reloaded_tied(tmp_path):
    model = linearize.convert(tiny_model("llama", tie_word_embeddings=True), rules="swa", inner="eager")
    ids = _ids()
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    save_pretrained(model, tmp_path / "ck")
    assert not {"lm_head.weight", "model.embed_tokens.weight"} <= set(load_file(str(tmp_path / "ck" /
                                                                                  "linearize.safetensors")))
    loaded = from_pretrained(tmp_path / "ck", inner="eager")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, ref)


def test_show_lists_base_rules_adapters_and_versions(tmp_path):
    model = linearize.convert(tiny_model("llama", num_hidden_layers=8), rules="liger-hybrid", inner="eager")
    save_pretrained(model, tmp_path / "ck")
    text = show(tmp_path / "ck")
    assert "LlamaForCausalLM" in text and "liger-hybrid" in text and "LoRA: none" in text
    assert "0-6  liger" in text and "7  keep" in text and "transformers" in text


# ------------------------------------------------------------------------------------------------ refusals
@pytest.fixture
def saved(tmp_path):
    model = linearize.convert(tiny_model("llama"), rules="liger", inner="eager")
    folder = tmp_path / "ck"
    save_pretrained(model, folder)
    return folder


def _edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_missing_weight_is_refused(saved):
    tensors = load_file(str(saved / "linearize.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(saved / "linearize.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing model\.layers\.1\.self_attn\.k_proj\.weight; unexpected none"):
        from_pretrained(saved)


def test_unexpected_weight_is_refused(saved):
    tensors = load_file(str(saved / "linearize.safetensors"))
    tensors["model.layers.0.self_attn.mix_logit"] = torch.zeros(4)
    save_file(tensors, str(saved / "linearize.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing none; unexpected model\.layers\.0\.self_attn\.mix_logit"):
        from_pretrained(saved)


def test_other_format_version_is_refused(saved):
    _edit_config(saved, lambda c: c["linearize"].update(format_version=99))
    with pytest.raises(CheckpointError, match="format version 99, but this linearize .* cannot read it"):
        from_pretrained(saved)


def test_base_that_no_longer_yields_the_saved_sites_is_refused(saved):
    _edit_config(saved, lambda c: c["linearize"]["sites"].append(dict(c["linearize"]["sites"][-1], layer=2)))
    with pytest.raises(CheckpointError, match="records 3 attention sites, but this LlamaForCausalLM .* yields 2"):
        from_pretrained(saved)


def test_changed_decision_is_refused_not_reapplied_silently(saved):
    _edit_config(saved, lambda c: c["linearize"]["sites"][1]["params"].update(window=32))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn was saved as params=.*'window': 32"):
        from_pretrained(saved)


def test_not_a_checkpoint_and_existing_folder(tmp_path, saved):
    plain = tmp_path / "plain"
    tiny_model("llama").save_pretrained(plain)
    with pytest.raises(CheckpointError, match="no `linearize` section; this is not a linearize checkpoint"):
        from_pretrained(plain)
    with pytest.raises(CheckpointError, match="exists and is not empty; pass overwrite=True"):
        save_pretrained(linearize.convert(tiny_model("llama"), rules="swa"), saved)
    with pytest.raises(CheckpointError, match="rules are unknown; pass rules="):
        save_pretrained(tiny_model("llama"), tmp_path / "new")
    with pytest.raises(CheckpointError, match="converted with rules='swa' but save_pretrained was given rules='gla'"):
        save_pretrained(linearize.convert(tiny_model("llama"), rules="swa"), tmp_path / "new", rules="gla")
    assert not (tmp_path / "new").exists()


def test_auto_class_loads_with_remote_code_and_never_silently_as_softmax(saved):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True)
    assert getattr(model, "_linearize_rules", "").endswith("linearize_rules.yaml")
    with pytest.raises(OSError, match="model.safetensors"):  # no softmax model from the same weights
        AutoModelForCausalLM.from_pretrained(saved)


def test_remote_code_without_linearize_says_to_install_it(saved):
    script = ("import sys; sys.modules['linearize'] = None\n"
              "from transformers import AutoModelForCausalLM\n"
              f"AutoModelForCausalLM.from_pretrained({str(saved)!r}, trust_remote_code=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "linearize checkpoint" in proc.stderr and "pip install linearize" in proc.stderr


# ------------------------------------------------------------------------------------------------ native export
def _rules_file(tmp_path, text):
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("arch,family", [("llama", "ministral"), ("qwen2", "qwen2"), ("mistral", "ministral")])
def test_native_export_loads_in_plain_transformers_with_linearizes_logits(tmp_path, arch, family):
    from transformers import AutoModelForCausalLM

    rules = _rules_file(tmp_path, "rules:\n  - where: {layers: '1'}\n    rewrite: keep\n"
                                  "  - rewrite: swa\n    with: {window: 8}\n")
    model = tiny_model(arch, num_hidden_layers=3, **({"sliding_window": None} if arch == "mistral" else {}))
    result = export_native(model, tmp_path / "native", rules=rules)
    assert result["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert result["max_diff"] <= 1e-5
    native = AutoModelForCausalLM.from_pretrained(tmp_path / "native")
    assert native.config.model_type == family and native.config.sliding_window == 8
    ids = _ids(T=48)
    with torch.no_grad():
        theirs = native(ids, use_cache=False).logits
        ours = torch.compile(model, backend="linearize", options={"rules": rules, "inner": "eager"})(
            ids, use_cache=False).logits
        softmax = model(ids, use_cache=False).logits
    assert (theirs - ours).abs().max().item() <= 1e-5
    assert (theirs - softmax).abs().max().item() > 1e-3  # the window is really in force


def test_native_export_refuses_what_configs_cannot_say(tmp_path):
    with pytest.raises(CheckpointError, match="layer 0 is rewritten as liger .* express only sliding-window"):
        export_native(tiny_model("llama"), tmp_path / "a", rules="liger")
    sinks = _rules_file(tmp_path, "rules:\n  - rewrite: swa\n    with: {window: 8, sinks: 4}\n")
    with pytest.raises(CheckpointError, match=r"layer 0 is rewritten as swa \{'window': 8, 'sinks': 4\}"):
        export_native(tiny_model("qwen2"), tmp_path / "s", rules=sinks)
    with pytest.raises(CheckpointError, match="attention or MLP biases"):
        export_native(tiny_model("llama", attention_bias=True), tmp_path / "b", rules="swa")
    two = _rules_file(tmp_path, "rules:\n  - where: {layers: '0'}\n    rewrite: swa\n    with: {window: 8}\n"
                                "  - rewrite: swa\n    with: {window: 16}\n")
    with pytest.raises(CheckpointError, match=r"windows \[8, 16\] differ"):
        export_native(tiny_model("qwen2"), tmp_path / "c", rules=two)
    # a kept layer keeps the original's own window: Mistral's 4096 next to a 16-token swa layer cannot be said
    mixed = _rules_file(tmp_path, "rules:\n  - where: {layers: '0'}\n    rewrite: keep\n"
                                  "  - rewrite: swa\n    with: {window: 16}\n")
    with pytest.raises(CheckpointError, match=r"windows \[16, 4096\] differ .* own sliding layers"):
        export_native(tiny_model("mistral"), tmp_path / "d", rules=mixed)
    assert not any(pathlib.Path(tmp_path, d).exists() for d in "abcds")
