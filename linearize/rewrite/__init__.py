"""The rule engine (`rules`) and what rewritten sites become (`targets`, `replacements`)."""
from .rules import RuleError, RuleSet, available, load

__all__ = ["RuleError", "RuleSet", "available", "load"]
