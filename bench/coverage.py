"""Pattern-library coverage over every causal-LM architecture in the installed transformers.

For each architecture in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, with attn_implementation "sdpa" and "eager": build a
small random config, run it eagerly (counting attention-module calls: the expected sites), capture it with Dynamo
through linearize with the `exact` rule set (sites matched, one graph or not, seconds in linearize's passes, max
logit difference), then with the default recipe (finite outputs or not).

    python bench/coverage.py                       # everything, 2 workers, ~1 h on 2 cores
    python bench/coverage.py --only llama gpt2     # a few
Writes bench/out/coverage.json and bench/out/coverage.md and prints the totals. Architectures that fail for reasons
outside linearize (the config cannot be built small, the model does not run eagerly, Dynamo cannot trace it) are
listed separately with the reason.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

OUT = Path(__file__).parent / "out"
SMALL = {  # applied to whichever of these names a config's __init__ takes
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256, "max_position_embeddings": 256,
    "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256, "d_model": 64, "n_layers": 2, "n_heads": 4,
    "num_layers": 2, "num_heads": 4, "ffn_dim": 128, "d_ff": 128, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32, "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4,
    "num_experts_per_tok": 2, "decoder_layers": 2, "decoder_attention_heads": 4, "decoder_ffn_dim": 128,
    "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 128, "kv_lora_rank": 16,
    "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16, "n_ctx": 256,
    "sliding_window": 8, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
}
T = 16


class Skip(Exception):
    """A failure outside linearize (the reason is reported in the 'outside' table)."""


VARIANTS = (  # tried in order: the smallest first, then gentler shrinking for configs with coupled sizes
    lambda small: small,
    lambda small: {k: v for k, v in small.items() if k not in ("vocab_size", "head_dim", "num_key_value_heads")},
    lambda small: {k: v for k, v in small.items()
                   if k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")},
)


def build(arch: str, impl: str):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    errors = []
    for variant in VARIANTS:
        try:
            cls = CONFIG_MAPPING[arch]
            params = inspect.signature(cls.__init__).parameters
            kwargs = {k: v for k, v in variant(SMALL).items() if k in params}
            cfg = cls(**kwargs)
            cfg._attn_implementation = impl
            with torch.device("meta"):  # size it before allocating anything
                size = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
            if size > 50e6:
                raise ValueError(f"{size / 1e6:.0f}M parameters even when shrunk")
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()
            vocab = getattr(model.config, "vocab_size", 256) or 256
            ids = torch.randint(0, min(vocab, 256), (1, T), generator=torch.Generator().manual_seed(0))
            expected, ref = attention_calls(model, ids)
            return model, ids, expected, ref
        except Exception as exc:  # noqa: BLE001 - any failure here is the config's or the model's
            errors.append(f"{type(exc).__name__}: {str(exc)[:160]}")
    raise Skip(f"config cannot be built small, or the model does not run eagerly: {errors[0]}")


def attention_calls(model, ids):
    """Softmax-attention calls in an eager run, counted independently of linearize's patterns: every
    scaled_dot_product_attention / flex_attention call, and every softmax whose probabilities (through casts,
    dropout, reshapes, slicing) become the first operand of a matmul / bmm / einsum."""
    import torch
    from torch.overrides import TorchFunctionMode

    passthrough = {"to", "type", "float", "half", "bfloat16", "dropout", "view", "reshape", "contiguous",
                   "__getitem__", "clone", "type_as", "flatten", "unflatten", "masked_fill"}

    class Count(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls, self.probs = 0, []

        def _marked(self, t):
            return any(t is p for p in self.probs)

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = getattr(func, "__name__", "")
            if name in ("scaled_dot_product_attention", "flex_attention"):
                self.calls += 1
            elif name in ("softmax", "_softmax") and isinstance(out, torch.Tensor):
                dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
                if isinstance(dim, int) and dim % out.dim() == out.dim() - 1 and out.dim() >= 3:
                    self.probs.append(out)
            elif name in passthrough and args and isinstance(args[0], torch.Tensor) and self._marked(args[0]):
                if isinstance(out, torch.Tensor):
                    self.probs.append(out)
            elif name in ("matmul", "bmm", "__matmul__", "einsum"):
                operand = args[1] if name == "einsum" and len(args) > 1 else (args[0] if args else None)
                if isinstance(operand, (list, tuple)):
                    operand = operand[0] if operand else None
                if isinstance(operand, torch.Tensor) and self._marked(operand):
                    self.calls += 1
                    self.probs = [p for p in self.probs if p is not operand]
            return out

    counter = Count()
    with torch.no_grad(), counter:
        out = model(ids, use_cache=False).logits
    return counter.calls, out


def run_one(arch: str, impl: str) -> dict:
    """One architecture and attention implementation. Logits are compared in float64 so that a model's own
    discontinuities (MoE top-k routing) cannot turn rounding differences into large logit jumps; plain Dynamo
    (`backend="eager"`, no linearize) is the baseline that tells linearize's failures from Dynamo's."""
    import torch

    import linearize  # noqa: F401 - registers the backend in this worker

    row = {"arch": arch, "impl": impl}
    try:
        model, ids, row["expected_sites"], ref = build(arch, impl)
        try:
            with torch.no_grad():
                ref = model.double()(ids, use_cache=False).logits
        except Exception:  # noqa: BLE001 - some kernels (grouped MoE matmuls) take no float64: compare in fp32
            model = model.float()
        row["dtype"] = str(next(model.parameters()).dtype)
        contexts = []
        torch._dynamo.reset()
        try:
            compiled = torch.compile(model, backend="linearize",
                                     options={"rules": "exact", "inner": "eager", "record": contexts.append})
            with torch.no_grad():
                out = compiled(ids, use_cache=False).logits
        except Exception:  # noqa: BLE001
            _raise_if_dynamo_alone_fails(model, ids)
            raise
        sites = [s for c in contexts for s in c.sites]
        row.update(
            graphs=len(contexts),
            sites_matched=len(sites),
            rewritten_exact=sum(s.rewrite == "exact" for s in sites),
            provenance=sum(s.provenance is not None for s in sites),
            unmatched=[f"{u.module_path}: {u.reason}" for c in contexts for u in c.unmatched][:3],
            kept=[f"{s.module_path}: {s.reason}" for s in sites if s.rewrite != "exact"][:3],
            exact_max_diff=float((out - ref).abs().max()),
            pass_seconds=sum(sum(c.timings.values()) for c in contexts),
        )
        if not row["exact_max_diff"] <= 1e-4:  # (NaN too) the rewrite, or Dynamo alone changing the output?
            plain = _plain_dynamo(model, ids)
            row["dynamo_vs_eager"] = float((plain - ref).abs().max())
            if not torch.isfinite(plain).all():
                raise Skip("Dynamo alone (no linearize) gives non-finite outputs")
            row["exact_max_diff"] = float((out - plain).abs().max())
        torch._dynamo.reset()
        liger = []
        with torch.no_grad():
            out = torch.compile(model, backend="linearize",
                                options={"inner": "eager", "record": liger.append})(ids, use_cache=False).logits
        row["liger_finite"] = bool(torch.isfinite(out).all())
        row["liger_rewritten"] = sum(s.rewrite == "liger" for c in liger for s in c.sites)
        row["status"] = "ok"
    except Skip as exc:
        row.update(status="outside", reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - a linearize failure: reported, never hidden
        row.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
    return row


def _plain_dynamo(model, ids):
    import torch

    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend="eager")(ids, use_cache=False).logits


def _raise_if_dynamo_alone_fails(model, ids):
    try:
        _plain_dynamo(model, ids)
    except Exception as exc:  # noqa: BLE001
        raise Skip(f"Dynamo cannot run it (without linearize): {type(exc).__name__}: {str(exc)[:160]}")


def _worker(arch: str, timeout: int) -> list[dict]:
    cmd = [sys.executable, __file__, "--worker", arch]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    except subprocess.TimeoutExpired:
        return [{"arch": arch, "impl": impl, "status": "outside", "reason": f"timed out after {timeout}s"}
                for impl in ("sdpa", "eager")]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        tail = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        return [{"arch": arch, "impl": impl, "status": "outside", "reason": f"worker crashed: {tail[0][:200]}"}
                for impl in ("sdpa", "eager")]
    return [json.loads(ln) for ln in lines]


def good(r: dict) -> bool:
    return (r["status"] == "ok" and r["sites_matched"] == r["expected_sites"] and r["exact_max_diff"] <= 1e-4
            and r["liger_finite"])


def write(rows: list[dict]) -> None:
    OUT.mkdir(exist_ok=True)
    (OUT / "coverage.json").write_text(json.dumps(rows, indent=1))
    ok = [r for r in rows if r["status"] == "ok"]
    lines = ["| arch | impl | one graph | expected | matched | provenance | exact max diff | liger finite | pass s | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in ok:
        note = "; ".join(r["kept"] + r["unmatched"])[:160]
        if "dynamo_vs_eager" in r:
            note = f"Dynamo alone changes the output by {r['dynamo_vs_eager']:.1e} (exact diff is vs Dynamo); " + note
        lines.append(f"| {r['arch']} | {r['impl']} | {'yes' if r['graphs'] == 1 else r['graphs']} | "
                     f"{r['expected_sites']} | {r['sites_matched']} | {r['provenance']} | {r['exact_max_diff']:.1e} | "
                     f"{r['liger_finite']} | {r['pass_seconds']:.3f} | {note} |")
    lines += ["", "## Failures inside linearize", ""]
    lines += [f"- {r['arch']} ({r['impl']}): {r['reason']}" for r in rows if r["status"] == "error"]
    lines += ["", "## Outside linearize (not counted)", ""]
    lines += [f"- {r['arch']} ({r['impl']}): {r['reason']}" for r in rows if r["status"] == "outside"]
    (OUT / "coverage.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="architectures to run (default: all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per architecture (both impls)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        for impl in ("sdpa", "eager"):
            print(json.dumps(run_one(args.worker, impl)), flush=True)
        return

    from tqdm import tqdm
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = args.only or list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    rows, start = [], time.time()
    with ThreadPoolExecutor(args.workers) as pool, tqdm(total=len(archs), desc="architectures") as bar:
        for result in pool.map(lambda a: _worker(a, args.timeout), archs):
            rows.extend(result)
            bar.update(1)
            write(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    print(f"\n{len(archs)} architectures x 2 attention implementations = {len(rows)} runs in {time.time() - start:.0f}s")
    print(f"traced and run: {len(ok)}; fully covered (all sites, exact <= 1e-4, liger finite): "
          f"{sum(good(r) for r in ok)}; in one graph: {sum(r['graphs'] == 1 for r in ok)}")
    print(f"failures inside linearize: {sum(r['status'] == 'error' for r in rows)}; "
          f"outside linearize: {sum(r['status'] == 'outside' for r in rows)}")
    print(f"tables: {OUT / 'coverage.md'}, {OUT / 'coverage.json'}")


if __name__ == "__main__":
    main()
