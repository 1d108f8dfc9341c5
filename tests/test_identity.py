"""Layer identity: every spelling of a Dynamo module path names the model's own module and layer, and a layer
that two attention calls claim is never selected by a rule or bound to a cache slot (issue 11)."""
import re

import pytest
import torch

import linearize
from linearize.models import tiny_model
from linearize.patterns import find_sites
from linearize.patterns.identity import LayerIdentityError, LayerId, clean_path, layer_id

SPELLINGS = {
    "self, brackets": "L['self'].model.layers[3].self_attn",
    "self, dots": "L['self'].model.layers.3.self_attn",
    "args-rooted (decorated forward)": "L['args'][0].model.layers.3.self_attn",
    "args-rooted, dotted": "L.args.0.model.layers.3.self_attn",
    "_modules": "L['self']._modules['model']._modules['layers']._modules['3']._modules['self_attn']",
    "getattr": "getattr(L['self'].model.layers, '3').self_attn",
    "__dict__ (peft)": "L['self'].__dict__['model'].layers[3].self_attn",
    "named local": "L['model'].model.layers[3].self_attn",
    "kwargs-rooted": "L['kwargs']['model'].model.layers[3].self_attn",
    "OptimizedModule": "L['self']._orig_mod.model.layers.3.self_attn",
}


@pytest.mark.parametrize("raw", SPELLINGS.values(), ids=SPELLINGS.keys())
def test_every_spelling_names_the_models_own_module(raw):
    assert clean_path(raw) == "model.layers.3.self_attn"
    assert layer_id(clean_path(raw)) == LayerId("model.layers", 3)


def test_wrapped_and_listed_layers():
    peft = clean_path("L['self'].base_model.model.model.layers[12].self_attn")
    assert peft == "base_model.model.model.layers.12.self_attn"
    assert layer_id(peft) == LayerId("base_model.model.model.layers", 12)
    assert layer_id(clean_path("L['layers'][5].attn")) == LayerId("layers", 5)  # a function over a list of blocks
    assert layer_id("0.attn") is None and layer_id("attn") is None and layer_id("") is None


def _captured_graph(model, ids):
    graphs = []

    def grab(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(model, backend=grab)(ids, use_cache=False)
    assert len(graphs) == 1
    return graphs[0]


def _respell(graph, fn):
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {k: (fn(clean_path(p)), cls) for k, (p, cls) in stack.items()}


def _spell(root: str, style: str):
    def fn(path: str) -> str:
        parts = path.split(".") if path else []
        if style == "brackets":
            body = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in parts)
        elif style == "_modules":
            body = "".join(f"._modules['{p}']" for p in parts)
        else:
            body = "".join(f".{p}" for p in parts)
        return root + body

    return fn


@pytest.mark.parametrize("root,style", [("L['self']", "brackets"), ("L['self']", "dots"), ("L['args'][0]", "dots"),
                                        ("L.args.0", "dots"), ("L['self']", "_modules"),
                                        ("L['self'].base_model.model", "brackets")])
def test_sites_get_their_layer_whatever_the_spelling(root, style):
    model = tiny_model("llama", num_hidden_layers=3)
    gm = _captured_graph(model, torch.randint(1, 100, (1, 12)))
    _respell(gm.graph, _spell(root, style))
    sites, _ = find_sites(gm.graph)
    prefix = "base_model.model." if "base_model" in root else ""
    assert [s.layer for s in sites] == [0, 1, 2]
    assert [s.module_path for s in sites] == [f"{prefix}model.layers.{i}.self_attn" for i in range(3)]
    assert all(s.identity_problem is None for s in sites)


def test_peft_wrapped_model_keeps_layers_and_rules():
    peft = pytest.importorskip("peft")
    model = tiny_model("llama", num_hidden_layers=3)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    report = linearize.explain(lora, torch.randint(1, 100, (1, 12)), rules="liger-hybrid")
    assert [s.layer for s in report.sites] == [0, 1, 2]
    assert report.sites[0].module_path == "base_model.model.model.layers.0.self_attn"
    assert all(s.provenance_found for s in report.sites)


def _shared_layer_model():
    model = tiny_model("llama", num_hidden_layers=2)
    model.model.layers[1] = model.model.layers[0]  # one module called twice: both calls claim one layer
    return model


def test_two_sites_claiming_one_layer_keep_softmax_with_the_reason():
    report = linearize.explain(_shared_layer_model(), torch.randint(1, 100, (1, 12)), rules="liger")
    assert len(report.sites) == 2
    for s in report.sites:
        assert s.rewrite == "keep"
        assert "layer identity is ambiguous" in s.reason and re.search(r"claim layer \d", s.reason)


def test_two_sites_claiming_one_layer_never_share_cache_buffers():
    model = _shared_layer_model()
    with pytest.raises(LayerIdentityError, match=r"claim layer \d"):
        linearize.StateCache(model, max_length=32)
    # a cache made for a healthy model of the same shape, handed to the shared one: refused when bound
    healthy = tiny_model("llama", num_hidden_layers=2)
    cache = linearize.StateCache(healthy, max_length=32)
    linearize.convert(model, rules="liger")
    with pytest.raises(Exception, match=re.escape("read by more than one attention")):  # Dynamo wraps the error
        model(torch.randint(1, 100, (1, 6)), past_key_values=cache)


def test_layer_idx_disagreeing_with_the_path_is_refused():
    model = tiny_model("llama", num_hidden_layers=2)
    model.model.layers[0].self_attn.layer_idx = 1
    with pytest.raises(LayerIdentityError, match="layer_idx is 1"):
        linearize.StateCache(model, max_length=32)
