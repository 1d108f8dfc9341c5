"""Constant-memory generation for converted models: `StateCache` (a transformers Cache) and a prefill/step loop."""
from .cache import StateCache
from .convert import convert, converted, revert
from .loop import decode_logits, generate_greedy, prefill, step

__all__ = ["StateCache", "convert", "converted", "revert", "prefill", "step", "decode_logits", "generate_greedy"]
