"""Generated Triton kernels (linearize/kernels/triton/) against the naive references.

Forward and backward of every gate kind and feature map, window on and off, T not a multiple of the chunk, GQA
groups 1/3/4, K != V, fp32 and fp16 (and bf16 on a GPU); extreme gates; the decode step; the generator, cache and
fallbacks. By default on the CPU interpreter with tiny shapes (it runs each program in numpy);
LINEARIZE_TEST_DEVICE=cuda runs the same tests on compiled kernels (bench/gpu/run.py does).
"""
from __future__ import annotations

import os

DEVICE = os.environ.get("LINEARIZE_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (collection time)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from conftest import rel_rmse  # noqa: E402
from linearize.kernels.naive import naive_gla, naive_softmax_attention  # noqa: E402
from linearize.kernels.triton import cache, generator, launch  # noqa: E402
from linearize.kernels.triton.spec import KernelSpec, UnsupportedSpec  # noqa: E402

FEATURES = {"softmax": lambda x: x.softmax(-1), "identity": lambda x: x, "relu": F.relu,
            "elu+1": lambda x: F.elu(x) + 1}
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
HALF = [torch.float16] + ([torch.bfloat16] if DEVICE != "cpu" else [])  # the interpreter has no bf16


@pytest.fixture(autouse=True, scope="module")
def _kernel_cache(tmp_path_factory):
    old = os.environ.get("LINEARIZE_KERNEL_CACHE")
    os.environ["LINEARIZE_KERNEL_CACHE"] = str(tmp_path_factory.mktemp("kernels"))
    torch.set_num_threads(1)
    yield
    if old is None:
        os.environ.pop("LINEARIZE_KERNEL_CACHE", None)
    else:
        os.environ["LINEARIZE_KERNEL_CACHE"] = old


def _reference_gate(gate, gate_fn, k, g, norm):
    """log g [B, Hkv, T, K] as the naive reference wants it."""
    kf = k.float()
    if gate == "none":
        return torch.zeros_like(kf)
    if gate == "fixed":
        return g[None, :, None, None].expand_as(kf)
    if gate_fn == "given":
        return g if gate == "vector" else g[..., None].expand_as(kf)
    x = kf if gate == "vector" else kf.mean(-1, keepdim=True)
    lg = F.logsigmoid(x) / norm if gate_fn == "logsigmoid" else -F.softplus(x) / norm
    return lg.expand_as(kf)


def _case(*, B=1, hkv=2, G=1, T=40, K=16, V=32, C=32, fm="softmax", gate="vector", gate_fn="logsigmoid",
          window=None, mix=(0.5, 0.5), dtype=torch.float32, h0=False, dht=False, norm=16.0, seed=0,
          k_scale=1.0, given=None, sinks=0):
    """Run the generated kernels and the naive reference; returns {name: rel_rmse} over outputs and grads."""
    gen = torch.Generator().manual_seed(seed)

    def mk(*shape, s=1.0):
        return (s * torch.randn(*shape, generator=gen)).to(DEVICE, dtype).requires_grad_()

    q, k, v = mk(B, hkv * G, T, K), mk(B, hkv, T, K, s=k_scale), mk(B, hkv, T, V)
    qw, kw = (mk(B, hkv * G, T, K), mk(B, hkv, T, K)) if window else (None, None)
    g = None
    if gate_fn == "given" and gate in ("vector", "scalar"):
        shape = (B, hkv, T) + ((K,) if gate == "vector" else ())
        g = given(shape) if given is not None else F.logsigmoid(torch.randn(*shape, generator=gen)) / 4
        g = g.float().to(DEVICE).requires_grad_()
    elif gate == "fixed":
        g = -torch.rand(hkv, generator=gen).to(DEVICE)
    h_init = torch.randn(B, hkv, K, V, generator=gen).to(DEVICE).requires_grad_() if h0 else None
    spec = KernelSpec(head_k=K, head_v=V, chunk=C, group=G, feature_map=fm, gate=gate, gate_fn=gate_fn,
                      window=window, mix=mix, gate_normalizer=norm, dtype=str(dtype).replace("torch.", ""),
                      sinks=sinks)
    scale, wscale = 0.7, 0.3
    o, ht, lse = launch.forward(spec, q, k, v, qw, kw, g, h_init, scale, wscale)

    phi = FEATURES[fm]
    lin, h_ref = naive_gla(phi(q.double()), phi(k.double()), v.double(),
                           _reference_gate(gate, gate_fn, k.double(), g.double() if g is not None else None, norm),
                           scale, None if h_init is None else h_init.double())
    ref = lin
    if window:
        swa = naive_softmax_attention(qw.double(), kw.double(), v.double(), scale=wscale, window=window,
                                      sink_tokens=sinks)
        ref = mix[0] * swa + mix[1] * lin
    err = {"o": rel_rmse(ref, o), "ht": rel_rmse(h_ref, ht)}
    for name, t in (("o", o), ("ht", ht)):
        assert torch.isfinite(t).all(), f"{name} not finite"

    do = torch.randn(ref.shape, generator=gen).double().to(DEVICE)
    dh = torch.randn(h_ref.shape, generator=gen).double().to(DEVICE) if dht else None
    loss = (ref * do).sum() + ((h_ref * dh).sum() if dht else 0.0)
    named = [("dq", q), ("dk", k), ("dv", v)] + ([("dq_win", qw), ("dk_win", kw)] if window else [])
    named += [("dg", g)] if gate_fn == "given" and g is not None and gate != "fixed" else []
    named += [("dh0", h_init)] if h0 else []
    ref_grads = torch.autograd.grad(loss, [t for _, t in named])
    dq, dk, dv, dq_win, dk_win, dg, dh0 = launch.backward(
        spec, do.to(dtype), None if dh is None else dh.float(), q, k, v, qw, kw, g, h_init, lse, scale, wscale)
    mine = {"dq": dq, "dk": dk, "dv": dv, "dq_win": dq_win, "dk_win": dk_win, "dg": dg, "dh0": dh0}
    for (name, _), ref_grad in zip(named, ref_grads):
        assert torch.isfinite(mine[name]).all(), f"{name} not finite"
        err[name] = rel_rmse(ref_grad, mine[name])
    return err


CASES = [
    # id, kwargs: every gate kind and source, every feature map, window on/off, GQA 1/3/4, K != V, ragged T
    ("liger-vector-softmax-W24-G1", dict(window=24)),
    ("gla-vector-softmax-G4-h0-dht", dict(G=4, hkv=1, h0=True, dht=True)),
    ("gla-vector-neg_softplus-C16-T37", dict(gate_fn="neg_softplus", C=16, T=37)),
    ("gla-scalar-mamba2-identity-G3", dict(gate="scalar", gate_fn="neg_softplus", fm="identity", G=3, hkv=1)),
    ("gla-fixed-relu-KeqV32", dict(gate="fixed", fm="relu", K=32, V=32, T=33)),
    ("swa+linear-none-elu1-W8-G3", dict(gate="none", fm="elu+1", window=8, G=3, hkv=1)),
    ("gla-given-vector-identity-h0", dict(gate="vector", gate_fn="given", fm="identity", h0=True, dht=True)),
    ("liger-given-scalar-softmax-W40", dict(gate="scalar", gate_fn="given", window=40, mix=(0.3, 0.7))),
    ("liger-vector-K32-V16-C16-T50", dict(K=32, V=16, C=16, T=50, window=5, G=3, hkv=1)),
    # attention sinks: the first keys stay visible past the window (sink block outside the window's blocks)
    ("liger-sinks4-W8-C16-T70-G2", dict(window=8, sinks=4, C=16, T=70, G=2, hkv=1)),
    ("liger-sinks16-W20-T60", dict(window=20, sinks=16, T=60)),
]


@pytest.mark.parametrize("kwargs", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_fp32_matches_naive(kwargs):
    err = _case(**kwargs)
    print(kwargs, {k: f"{v:.1e}" for k, v in err.items()})
    assert max(err.values()) <= TOL[torch.float32], err


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kwargs", [
    dict(window=16),
    dict(gate="scalar", gate_fn="neg_softplus", fm="relu", G=3, hkv=1, T=37),
], ids=["liger-vector-softmax-W16", "gla-scalar-relu-G3-T37"])
def test_half_precision_matches_naive(kwargs, dtype):
    err = _case(dtype=dtype, **kwargs)
    print(kwargs, {k: f"{v:.1e}" for k, v in err.items()})
    assert max(err.values()) <= TOL[dtype], err


@pytest.mark.parametrize("dtype", [torch.float32] + HALF, ids=str)
@pytest.mark.parametrize("kwargs", [
    dict(window=64, mix=(0.5, 0.5)),  # the Liger recipe's layer: window 64, chunk 64, GQA 4, D 64
    dict(gate="scalar", gate_fn="neg_softplus", fm="identity", K=128, V=128),  # mamba2-style gate, D 128
], ids=["liger-D64-G4", "simple-gla-D128-G4"])
def test_model_sized_heads(kwargs, dtype):
    """The tiles real models use (D 64/128, chunk 64, GQA 4), T = 200 not a multiple of the chunk, several heads,
    every dtype. GPU only: the interpreter needs minutes per case at these tiles (the small-tile cases above run the
    same code paths on the CPU)."""
    if DEVICE == "cpu":
        pytest.skip("model-sized tiles run on a GPU only (LINEARIZE_TEST_DEVICE=cuda, bench/gpu/run.py)")
    if kwargs.get("K") == 128 and dtype != torch.bfloat16:
        pytest.skip("D 128: bf16 only (its backward kernel takes ~50 s to compile per dtype)")
    err = _case(dtype=dtype, B=2, hkv=2, G=4, T=200, C=64, **{"K": 64, "V": 64, **kwargs})
    print(kwargs, {k: f"{v:.1e}" for k, v in err.items()})
    assert max(err.values()) <= TOL[dtype], err


@pytest.mark.parametrize("extreme", ["near_zero", "near_minus_inf", "mixed"])
def test_extreme_gates_stay_finite(extreme):
    """log g ~ -1e-7 (no forgetting) and ~ -1e4 (total forgetting): no NaN/Inf, still the reference."""
    def given(shape):
        gen = torch.Generator().manual_seed(3)
        if extreme == "near_zero":
            return torch.full(shape, -1e-7)
        if extreme == "near_minus_inf":
            return torch.full(shape, -1e4)
        return torch.where(torch.rand(shape, generator=gen) < 0.3, torch.tensor(-1e4), torch.tensor(-1e-7))

    err = _case(gate="vector", gate_fn="given", fm="softmax", given=given, T=40, window=16)
    assert max(err.values()) <= 1e-4, err


def test_extreme_keys_through_the_fused_gate():
    """logsigmoid(k)/16 with |k| ~ 1e3: gates from -60 to 0 computed inside the kernel, finite and right."""
    err = _case(k_scale=1e3, fm="identity", T=40)
    assert max(v for k, v in err.items() if k != "dk") <= 1e-4, err


def test_decode_steps_match_the_recurrence():
    """The one-token decode kernel, run T times with its state updated in place, is naive_gla."""
    B, hkv, G, T, K, V = 1, 2, 2, 6, 16, 32
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, hkv * G, T, K, generator=gen).to(DEVICE),
               torch.randn(B, hkv, T, K, generator=gen).to(DEVICE), torch.randn(B, hkv, T, V, generator=gen).to(DEVICE))
    spec = KernelSpec(head_k=K, head_v=V, group=G, chunk=16, gate="vector", gate_fn="logsigmoid",
                      feature_map="softmax")
    state = torch.zeros(B, hkv, K, V, device=DEVICE)
    outs = [launch.decode(spec, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], None, state, 0.5)
            for t in range(T)]
    ref, ref_state = naive_gla(q.softmax(-1), k.softmax(-1), v, F.logsigmoid(k) / 16, 0.5)
    assert rel_rmse(ref, torch.cat(outs, dim=2)) <= 1e-5
    assert rel_rmse(ref_state, state) <= 1e-5
    # and the chunked forward's final state continues the same recurrence
    _, ht, _ = launch.forward(spec, q, k, v, None, None, None, None, 0.5, 1.0)
    assert rel_rmse(ht, state) <= 1e-5


# ------------------------------------------------------------------------------ generator, cache, fallback
def test_generated_source_is_specialised():
    liger = KernelSpec(window=64, head_k=64, head_v=64, group=3)
    gla = KernelSpec(head_k=64, head_v=64, gate="scalar", gate_fn="neg_softplus", feature_map="relu")
    src_liger, src_gla = generator.render(liger), generator.render(gla)
    assert "def window_bwd_dq" in src_liger and "def window_bwd_dq" not in src_gla
    assert "MIX_W = tl.constexpr(0.5)" in src_liger and "W = tl.constexpr(64)" in src_liger
    assert "tl.maximum(x, 0.0)" in src_gla and "tl.maximum(x, 0.0)" not in src_liger  # relu feature map only
    assert "logsigmoid(k)/16" in src_liger and "neg_softplus(mean_c(k))/16" in src_gla
    assert "#if" not in src_liger and "@" not in src_liger.replace("@triton.jit", "").replace("@autotuned", "")
    compile(src_liger, "liger.py", "exec")
    compile(src_gla, "gla.py", "exec")


def test_cache_is_keyed_by_spec_and_loaded_lazily(tmp_path, monkeypatch):
    monkeypatch.setenv("LINEARIZE_KERNEL_CACHE", str(tmp_path))
    spec = KernelSpec(head_k=16, head_v=16, chunk=16, gate_normalizer=7.0)
    assert spec.key() == KernelSpec.from_json(spec.to_json()).key()
    assert spec.key() != spec.with_(gate_normalizer=8.0).key()
    assert not list(tmp_path.glob("*.py"))  # nothing generated before first use
    before = dict(cache.stats)
    mod = cache.load(spec, interpret=DEVICE == "cpu")
    assert (tmp_path / f"{spec.key()}.py").is_file()
    assert cache.load(spec, interpret=DEVICE == "cpu") is mod  # memoised
    cache.clear_memory()
    cache.load(spec, interpret=DEVICE == "cpu")  # re-imported from the file, not regenerated
    assert cache.stats["generated"] == before["generated"] + 1
    assert cache.stats["loaded"] == before["loaded"] + 2


@pytest.mark.parametrize("bad", [dict(head_k=24), dict(head_v=8), dict(chunk=24), dict(mix_mode="shared"),
                                 dict(window=8, sinks=17), dict(sinks=4)])
def test_unsupported_shapes_are_refused(bad):
    spec = KernelSpec(**{"head_k": 16, "head_v": 16, "chunk": 16, **bad})
    with pytest.raises(UnsupportedSpec):
        spec.check_shapes()


def test_cli_emits_the_recipe_sources(tmp_path, capsys):
    from linearize.cli import main

    assert main(["kernels", "emit", "--rules", "liger", "--out", str(tmp_path)]) == 0
    sources = list(tmp_path.glob("*.py"))
    assert len(sources) == 1 and "swa64" in sources[0].name and "k64-v64-g3-bfloat16" in sources[0].name
    text = sources[0].read_text()
    assert "def chunk_fwd" in text and "def window_bwd_dkv" in text and "def decode" in text
    compile(text, sources[0].name, "exec")
    assert (tmp_path / "index.json").is_file()
    assert "wrote 1 source(s)" in capsys.readouterr().out


def test_cli_emits_the_default_recipes_three_kernels(tmp_path):
    """liger-sinks normalises its linear branch, which the fused kernel cannot: the window kernel (with sinks),
    the GLA kernel and the GLA kernel on the 16-column denominator block."""
    from linearize.kernels.triton.emit import emit

    index = emit("liger-sinks", str(tmp_path))
    names = sorted(entry["file"] for entry in index)
    assert len(names) == 3 and all(names), index
    assert any("swa64s4" in n for n in names) and any("-v16-" in n for n in names)


def test_generated_kernels_compile_for_a_gpu(tmp_path):
    """Compiled Triton rejects code the interpreter runs (a static_range-derived index, scans over [R, 1] tiles in
    Triton 3.6): compile every kernel of small specs for sm_90 ahead of time, which needs no GPU
    (bench/gpu/preflight.py; a fresh process, since this one runs Triton in interpreter mode)."""
    import subprocess
    import sys
    from pathlib import Path

    from linearize.kernels.triton.spec import KernelSpec  # noqa: F401  (the script imports it too)

    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["LINEARIZE_KERNEL_CACHE"] = str(tmp_path)
    specs = ["small-liger-fp32", "small-scalar-bf16", "small-fixed-given-fp16", "small-given-scalar-sinks-fp32"]
    proc = subprocess.run([sys.executable, "bench/gpu/preflight.py", "--specs", *specs], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=600)
    if "No module named 'triton.backends.nvidia'" in proc.stderr:
        pytest.skip("this triton build has no NVIDIA backend to compile with")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.stdout.count("kernels compiled") == len(specs)
