"""Loader for a linearize checkpoint folder (copied into it as modeling_linearize.py by linearize.save_pretrained).

`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` finds this class through config.json's
`auto_map` and hands the folder to `linearize.from_pretrained`, which rebuilds the base model, loads the weights
strictly and re-applies the saved per-layer rewrites. The rewrite itself is linearize's code, which must be
installed; this file carries no model code of its own.
"""


class LinearizedForCausalLM:
    """Not a model class: `from_pretrained` returns the base transformers model, converted by linearize."""

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        return None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        try:
            import linearize
        except ImportError as exc:
            raise ImportError(
                f"{pretrained_model_name_or_path} is a linearize checkpoint (softmax attention rewritten as "
                "gated linear / window attention); loading it needs the linearize package: pip install linearize"
            ) from exc
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if isinstance(dtype, str):
            import torch

            dtype = None if dtype == "auto" else getattr(torch, dtype)
        return linearize.from_pretrained(pretrained_model_name_or_path, dtype=dtype,
                                         device=kwargs.get("device_map") if isinstance(kwargs.get("device_map"), str)
                                         and kwargs.get("device_map") not in ("auto",) else None)
