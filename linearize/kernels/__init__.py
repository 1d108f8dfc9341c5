"""Attention math kernels in plain PyTorch (CPU or any device): the reference implementations.

naive.py holds slow token-by-token / quadratic versions used only to test these.
"""
from .gla import chunk_gla_bwd, chunk_gla_fwd
from .softmax import attention_bwd, attention_fwd
from .window import window_attention_bwd, window_attention_fwd

__all__ = [
    "attention_bwd", "attention_fwd",
    "chunk_gla_bwd", "chunk_gla_fwd",
    "window_attention_bwd", "window_attention_fwd",
]
