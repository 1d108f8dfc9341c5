"""Lowering targets: importing this package registers the `torch.ops.linearize.*` custom ops."""
from . import dispatch, hybrid_ops, learned_ops, ops, state_ops

__all__ = ["dispatch", "hybrid_ops", "learned_ops", "ops", "state_ops"]
