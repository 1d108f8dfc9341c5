"""Text for linearize: evaluation text, perplexity, and the training corpora `linearize recover` packs.

The text is CPython's own ``LICENSE.txt``: about 14 KB (roughly 3,000 SmolLM2 tokens) of real
English prose -- the history of Python (CWI, CNRI, BeOpen, Zope, the PSF) followed by the licence
agreements -- that every CPython installation carries next to its standard library
(``<stdlib>/LICENSE.txt``: python.org builds, pyenv, Debian/Ubuntu's python3.X, conda, the official
Docker images; ``<prefix>/LICENSE.txt`` on Windows). So it is there, offline, on every machine that
can run linearize, it is not a file of our own repository (we cannot tune the model or the rules to
it), and it is not synthetic: its perplexity means something.

Fallback, for stripped-down Pythons that delete the file: the top-level ``LICENSE`` of the installed
``torch`` distribution (a hard dependency of linearize, so it is there too), which is also English
prose (BSD licence plus contributor history). :func:`english_text_source` says which file was used.
"""

from __future__ import annotations

import importlib.metadata
import math
import pathlib
import sys
import sysconfig
from typing import Any, Callable, Iterable

import torch

__all__ = ["english_text", "english_text_source", "english_token_ids", "perplexity", "nll_per_token",
           "long_document", "LONG_DOCUMENT_SOURCE", "training_texts", "read_corpus", "pack", "encode", "CorpusError",
           "DEFAULT_CORPUS"]


def _python_license_candidates() -> Iterable[pathlib.Path]:
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    seen: set[pathlib.Path] = set()
    roots = []
    for key in ("stdlib", "platstdlib"):
        try:
            roots.append(pathlib.Path(sysconfig.get_paths()[key]))
        except (KeyError, TypeError):
            pass
    for prefix in (sys.base_prefix, sys.prefix, sys.exec_prefix):
        roots += [
            pathlib.Path(prefix) / "lib" / ver,
            pathlib.Path(prefix) / "lib64" / ver,
            pathlib.Path(prefix) / "Lib",
            pathlib.Path(prefix),
        ]
    roots.append(pathlib.Path("/usr/lib") / ver)
    for root in roots:
        p = root / "LICENSE.txt"
        if p not in seen:
            seen.add(p)
            yield p


def _torch_license_candidates() -> Iterable[pathlib.Path]:
    try:
        files = importlib.metadata.files("torch") or ()
    except importlib.metadata.PackageNotFoundError:
        return
    for f in files:
        # the top-level licence only, not third_party/*/LICENSE
        parts = f.parts
        if len(parts) >= 2 and parts[0].endswith(".dist-info") and f.name in ("LICENSE", "LICENSE.txt"):
            if "third_party" not in parts:
                yield pathlib.Path(f.locate())


def english_text_source() -> pathlib.Path:
    """The file :func:`english_text` reads: CPython's ``LICENSE.txt``, else torch's ``LICENSE``."""
    for candidates in (_python_license_candidates(), _torch_license_candidates()):
        for p in candidates:
            try:
                if p.is_file() and p.stat().st_size > 1000:
                    return p
            except OSError:
                continue
    raise FileNotFoundError(
        "No English text found: neither CPython's LICENSE.txt (next to the standard library) "
        "nor torch's dist-info LICENSE is installed."
    )


def english_text() -> str:
    """A real English text that ships offline with every Python: CPython's ``LICENSE.txt``.

    ~14 KB of prose on the history of Python and its licences, read from next to the standard
    library (see the module docstring for why this file and for the fallback). Not part of this
    repository, so nothing in linearize is fitted to it.
    """
    return english_text_source().read_text(encoding="utf-8", errors="replace")


def english_token_ids(tokenizer, n: int | None = None, repeat: bool = False) -> torch.Tensor:
    """:func:`english_text` tokenized, shape ``(1, n)``.

    ``n=None``: all of it (about 3,800 SmolLM2 tokens). With ``n`` larger than the text, ``repeat=True``
    repeats the text (separated by a blank line) until there are ``n`` tokens -- fine for timing, not
    for perplexity; ``repeat=False`` raises instead.
    """
    ids = tokenizer(english_text(), return_tensors="pt", add_special_tokens=False).input_ids
    if n is None:
        return ids
    if ids.shape[1] < n:
        if not repeat:
            raise ValueError(f"english_text() has only {ids.shape[1]} tokens, {n} asked (pass repeat=True)")
        sep = tokenizer("\n\n", return_tensors="pt", add_special_tokens=False).input_ids
        unit = torch.cat([ids, sep], dim=1)
        ids = unit.repeat(1, -(-n // unit.shape[1]))
    return ids[:, :n].contiguous()


# ----------------------------------------------------------------------------------------------
# Perplexity
# ----------------------------------------------------------------------------------------------


def _logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"perplexity: the model returned {type(out).__name__} without .logits")
    return logits


def _default_call_kwargs(model: Any) -> dict:
    # transformers models: no KV cache for a plain scoring forward (also keeps compiled graphs
    # free of cache updates). `config` is reached through torch.compile's OptimizedModule too.
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        return {"use_cache": False}
    return {}


def _as_2d(input_ids: Any) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise ValueError(f"perplexity: input_ids must be 1-D or (batch, seq), got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        ids = ids.long()
    return ids


# ----------------------------------------------------------------------------------------------
# Long-context evaluation text, and the training text held apart from it
# ----------------------------------------------------------------------------------------------

# Chapters 3 (Data model: objects, the standard type hierarchy, special method names), 4 (Execution model) and 8
# (Compound statements) of The Python Language Reference, as CPython ships them in `pydoc_data.topics`, in the
# book's order: one document of ~40k SmolLM2 tokens of technical English prose, offline wherever Python is.
LONG_DOCUMENT_TOPICS = ("objects", "types", "specialnames", "execmodel", "compound")
LONG_DOCUMENT_SOURCE = ("The Python Language Reference, chapters 3, 4 and 8 (pydoc_data.topics: "
                        + ", ".join(LONG_DOCUMENT_TOPICS) + ")")


def _topics() -> dict:
    from pydoc_data.topics import topics

    return topics


def long_document() -> str:
    """A single long English document for long-context perplexity (~40k SmolLM2 tokens), offline.

    Why this one: perplexity at 8k-16k needs one document that long (a concatenation of short texts would test
    nothing past each text's end), and nothing else this long ships with Python. CPython's LICENSE (the short-context
    text) has ~3.8k tokens. These chapters are held out of :func:`training_texts`."""
    topics = _topics()
    return "\n\n".join(topics[k] for k in LONG_DOCUMENT_TOPICS)


def training_texts() -> list:
    """Python's own documentation (`pydoc_data.topics`, ~54k SmolLM2 tokens) minus every topic that shares a
    paragraph with :func:`long_document` (pydoc's topics overlap: `if` is a section of `compound`), so training and
    long-context evaluation text are disjoint; neither contains CPython's LICENSE."""
    topics = _topics()
    held_out = "\n\n".join(topics[k] for k in LONG_DOCUMENT_TOPICS)
    out = []
    for key, text in topics.items():
        if key in LONG_DOCUMENT_TOPICS:
            continue
        if not any(p in held_out for p in paragraphs(text)) and not _contains_any(text, LONG_DOCUMENT_TOPICS, topics):
            out.append(text)
    return out


def _contains_any(text: str, keys, topics) -> bool:
    return any(p in text for k in keys for p in paragraphs(topics[k]))


def paragraphs(text: str, min_chars: int = 200) -> list:
    """The paragraphs of `text` long enough that one found verbatim in another text means shared content (short
    ones, headings and one-line examples, recur by chance): how training and evaluation text are kept disjoint."""
    return [p.strip() for p in text.split("\n\n") if len(p.strip()) > min_chars]


@torch.no_grad()
def nll_per_token(
    model: Callable,
    input_ids: Any,
    window: int = 512,
    stride: int | None = None,
    **call_kwargs,
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) and the number of tokens it covers.

    See :func:`perplexity` for the windowing; ``perplexity = exp(nll_sum / count)``.
    """
    ids = _as_2d(input_ids)
    batch, seq = ids.shape
    if window < 2:
        raise ValueError("perplexity: window must be at least 2 tokens")
    stride = window if stride is None else int(stride)
    if not 1 <= stride <= window:
        raise ValueError(f"perplexity: stride must be in [1, window={window}], got {stride}")
    if seq < 2:
        raise ValueError("perplexity: need at least 2 tokens")
    kwargs = {**_default_call_kwargs(model), **call_kwargs}
    try:
        device = next(model.parameters()).device  # type: ignore[attr-defined]
    except (AttributeError, StopIteration, TypeError):
        device = ids.device
    ids = ids.to(device)

    total = torch.zeros((), dtype=torch.float64)
    count = 0
    scored_until = 1  # positions [1, scored_until) already have their NLL counted (0 never can)
    begin = 0
    while scored_until < seq:
        end = min(begin + window, seq)
        chunk = ids[:, begin:end]
        logits = _logits_of(model(chunk, **kwargs)).float()
        # logits[:, j] predicts token begin+j+1; score the targets not scored yet
        first_target = max(scored_until, begin + 1)
        pred = logits[:, first_target - begin - 1 : end - begin - 1]
        target = chunk[:, first_target - begin :]
        if target.numel():
            logp = torch.log_softmax(pred, dim=-1)
            nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            total += nll.double().sum().cpu()
            count += target.numel()
        scored_until = end
        if end == seq:
            break
        begin = begin + stride if stride < window else end
    return float(total), count


def perplexity(
    model: Callable,
    input_ids: Any,
    window: int = 512,
    stride: int | None = None,
    **call_kwargs,
) -> float:
    """Next-token perplexity of ``model`` on ``input_ids``, in fp32 under ``torch.no_grad``.

    ``model`` is any callable taking a ``(batch, tokens)`` LongTensor and returning an object with
    ``.logits`` (a transformers model, a ``torch.compile``'d one, a plain ``nn.Module``; a bare
    logits tensor is accepted too). transformers models are called with ``use_cache=False``; extra
    ``call_kwargs`` are passed on.

    ``input_ids``: 1-D or ``(batch, seq)``.

    Windowing: with ``stride=None`` the sequence is cut into non-overlapping windows of ``window``
    tokens (the last may be shorter), each scored independently; the first token of every window
    has no context and is not scored, so ``seq - ceil(seq / window)`` tokens per row are scored.
    With ``stride`` (``1 <= stride <= window``) windows of ``window`` tokens start every ``stride``
    tokens and each scores only the tokens not scored by an earlier window (the sliding-window
    evaluation from the transformers docs), so every token after the first is scored once, with at
    least ``window - stride`` tokens of context.

    Returns ``exp(mean NLL)`` over all scored tokens (a model with uniform logits scores exactly the
    vocabulary size).
    """
    total, count = nll_per_token(model, input_ids, window=window, stride=stride, **call_kwargs)
    if count == 0:
        raise ValueError("perplexity: no token was scored")
    return math.exp(total / count)


# ----------------------------------------------------------------------------------------------
# Training corpora for `linearize recover`: read, tokenize, pack
# ----------------------------------------------------------------------------------------------

def stdlib_docstrings(min_chars: int = 200) -> list:
    """Every docstring of at least `min_chars` characters in the Python standard library's own modules (not its
    tests, IDLE, demos or site-packages), read with `ast` (nothing is imported): ~1.2M characters, ~300k SmolLM2
    tokens of English prose about code, offline wherever Python is. A docstring that shares a paragraph with an
    evaluation text (CPython's LICENSE, :func:`long_document`) or mentions the license is left out."""
    import ast
    import sysconfig

    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "__pycache__"}
    held_out = paragraphs(english_text() + "\n\n" + long_document())
    out = []
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a module this Python cannot parse (a template, another encoding): not text we need
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if (doc and len(doc) >= min_chars and "LICENSE" not in doc.upper()
                        and not any(p in doc for p in held_out)):
                    out.append(doc)
    return out


# built-in corpora `read_corpus` knows by name (a path of the same name, if there is one, wins)
STDLIB_CORPUS = ("Python's own documentation (the default corpus) plus the standard library's docstrings "
                 "(`stdlib_docstrings`): ~350k SmolLM2 tokens, disjoint from both evaluation texts")

DEFAULT_CORPUS = ("Python's own documentation (pydoc_data.topics) without the Language Reference chapters that "
                  "`long_document` evaluates on; CPython's LICENSE (the short-context evaluation text) is not in it")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


class CorpusError(ValueError):
    """A training corpus that cannot be used; the message names the source and what to change."""


def read_corpus(source: Any = None) -> tuple[list, str]:
    """``(texts, description)`` for a training corpus.

    ``source``: ``None`` (the offline default, :data:`DEFAULT_CORPUS`: it ships with every Python, so recovery
    needs no download, and it is disjoint from both evaluation texts); ``"stdlib"`` (:data:`STDLIB_CORPUS`: the
    default plus the standard library's docstrings, ~6x the tokens, for runs long enough to repeat the default
    many times); a folder (every ``.txt``/``.md``/``.rst``
    and ``.jsonl`` file under it, in name order); one such file; a ``.jsonl`` file (each line an object with a
    ``"text"`` field); a list of strings; or a Hugging Face ``datasets`` object with a ``"text"`` column."""
    if source is None:
        return training_texts(), DEFAULT_CORPUS
    if source == "stdlib" and not pathlib.Path(source).exists():
        return training_texts() + stdlib_docstrings(), STDLIB_CORPUS
    if isinstance(source, (list, tuple)):
        if not all(isinstance(t, str) for t in source):
            raise CorpusError("corpus: a list must hold strings (documents)")
        return [t for t in source if t.strip()], f"{len(source)} texts given in memory"
    if hasattr(source, "column_names") or type(source).__module__.startswith("datasets"):
        cols = getattr(source, "column_names", None) or []
        if "text" not in cols:
            raise CorpusError(f"corpus: the dataset has columns {cols}; a 'text' column is needed "
                              "(dataset.rename_column(old, 'text'))")
        return [row["text"] for row in source if row["text"] and row["text"].strip()], \
            f"datasets object ({type(source).__name__}, {len(cols)} columns)"
    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (*TEXT_SUFFIXES, ".jsonl"))
        if not files:
            raise CorpusError(f"corpus {path}: no {', '.join(TEXT_SUFFIXES)} or .jsonl file under this folder")
    elif path.is_file():
        files = [path]
    else:
        raise CorpusError(f"corpus {source!r}: no such file or folder")
    texts: list = []
    for f in files:
        texts += _read_jsonl(f) if f.suffix.lower() == ".jsonl" else [f.read_text(encoding="utf-8", errors="replace")]
    return [t for t in texts if t.strip()], f"{path} ({len(files)} file{'s' if len(files) != 1 else ''})"


def _read_jsonl(path: pathlib.Path) -> list:
    import json

    texts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path}:{lineno}: not JSON ({exc.msg}); each line must be an object like "
                              '{"text": "..."}') from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise CorpusError(f'{path}:{lineno}: each line must be an object with a string "text" field')
        texts.append(row["text"])
    return texts


def encode(text: str, tokenizer, vocab_size: int | None = None) -> list:
    """Token ids of ``text``. Models without a tokenizer (the tiny test models) read UTF-8 bytes modulo their
    vocabulary, so the whole pipeline runs on them too."""
    if tokenizer is not None:
        return tokenizer(text, add_special_tokens=False).input_ids
    if not vocab_size:
        raise CorpusError("corpus: a model without a tokenizer needs vocab_size to read text as bytes")
    return [b % vocab_size for b in text.encode("utf-8")]


def pack(texts: list, tokenizer, seq_len: int, vocab_size: int | None = None, min_sequences: int = 1,
         source: str = "corpus") -> torch.Tensor:
    """Tokenize ``texts`` and pack them into rows of ``seq_len`` tokens, shape ``(N, seq_len)``.

    Documents are joined by the tokenizer's EOS token (or a blank line's ids), and the tail that does not fill a row
    is dropped, so every row is full and no padding is trained on."""
    if seq_len < 2:
        raise CorpusError(f"{source}: seq_len must be at least 2, got {seq_len}")
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    sep = [eos] if eos is not None else encode("\n\n", tokenizer, vocab_size)
    ids: list = []
    for text in texts:
        ids += encode(text, tokenizer, vocab_size) + sep
    n = len(ids) // seq_len
    if n < min_sequences:
        raise CorpusError(f"{source}: {len(ids)} tokens make {n} sequence(s) of {seq_len}; at least {min_sequences} "
                          "needed. Give more text, or a shorter seq_len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
