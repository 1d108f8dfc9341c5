"""Options of the `linearize` backend: `torch.compile(model, backend="linearize", options={...})`."""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

INNER_COMPILERS = ("inductor", "aot_eager", "eager")
# The rule set used when none is given, chosen by zero-shot measurement (docs/rule-files.md, "Choosing the default")
DEFAULT_RULES = "liger-sinks-256"
KERNEL_CHOICES = ("auto", "triton", "reference")
LEARNED_CHOICES = ("require", "initial")


@dataclass
class Options:
    rules: Any = DEFAULT_RULES  # built-in rule-set name, path to a YAML file, or a RuleSet
    inner: str = "inductor"  # what compiles the rewritten graph; "eager" runs it as is (for debugging)
    # attention kernels of the rewritten sites: "auto" (generated Triton on CUDA, PyTorch reference elsewhere),
    # "triton" (generated kernels everywhere; on CPU through TRITON_INTERPRET=1), "reference"
    kernels: str = "auto"
    record: Optional[Callable] = None  # called with each graph's PassContext (used by linearize.explain)
    # Write the graph after each pass (code, diff, DOT, SVG) under this folder, one subfolder per captured graph;
    # defaults to the LINEARIZE_DEBUG_DIR environment variable.
    debug_dir: Optional[str] = field(default_factory=lambda: os.environ.get("LINEARIZE_DEBUG_DIR") or None)
    # a rule that learns a parameter (`learn: [mix]`) the model does not carry (linearize.convert registers them):
    # "require" is an error; "initial" runs the rule's constant (explain and the planners describe, not train)
    learned: str = "require"
    observe: Optional[Callable] = None  # observe(stage, gm, ctx): before the first pass ("input") and after each

    @classmethod
    def from_dict(cls, options: Optional[dict]) -> "Options":
        options = dict(options or {})
        known = [f.name for f in fields(cls)]
        for key in options:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"linearize: unknown option {key!r}{hint}; options: {', '.join(known)}")
        opts = cls(**options)
        if opts.inner not in INNER_COMPILERS:
            raise ValueError(f"linearize: inner must be one of {', '.join(INNER_COMPILERS)}, got {opts.inner!r}")
        if opts.kernels not in KERNEL_CHOICES:
            raise ValueError(f"linearize: kernels must be one of {', '.join(KERNEL_CHOICES)}, got {opts.kernels!r}")
        if opts.learned not in LEARNED_CHOICES:
            raise ValueError(f"linearize: learned must be one of {', '.join(LEARNED_CHOICES)}, got {opts.learned!r}")
        return opts
