"""Lowering targets: importing this package registers the `torch.ops.linearize.*` custom ops."""
from . import dispatch, ops

__all__ = ["dispatch", "ops"]
