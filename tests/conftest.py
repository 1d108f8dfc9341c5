import pytest
import torch

ARCHS = ("llama", "mistral", "qwen2")


def rel_rmse(ref: torch.Tensor, out: torch.Tensor) -> float:
    """rms(ref - out) / rms(ref), as flash-linear-attention measures kernel error."""
    ref, out = ref.double(), out.double()
    return ((ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache entry or recompile limit carries over between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def single_thread():
    """Kernel tests use tiny shapes: intra-op threads only add sync stalls (seconds when the cores are busy)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def smollm2():
    from linearize.models import load_smollm2

    try:
        return load_smollm2()
    except (FileNotFoundError, ImportError) as exc:  # the model package is an explicit install step
        pytest.skip(f"SmolLM2 not installed: {exc}")


@pytest.fixture(scope="session")
def smollm2_8_layers(smollm2):
    """SmolLM2's real weights and shapes (GQA 9/3, RoPE theta 1e5, 64-dim heads, real activation scales) with its
    first 8 of 30 layers: the per-recipe checks on the real model at about a quarter of the compile time (8 keeps
    liger-hybrid's softmax layer 7). The full 30-layer depth is tested with the default recipe."""
    import copy

    model, tok = smollm2
    short = copy.deepcopy(model)
    short.model.layers = short.model.layers[:8]
    short.config.num_hidden_layers = 8
    if getattr(short.config, "layer_types", None):
        short.config.layer_types = short.config.layer_types[:8]
    return short, tok


@pytest.fixture(scope="session")
def char_tokenizer():
    """A character-level fast tokenizer (ids 3..), built in code: evaluation needs text, tiny models have none."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;?!'\"-()\n*_=+/<>[]{}`#@%&|~^$\\"))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    assert len(fast) <= 128
    return fast
