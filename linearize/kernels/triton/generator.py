"""Kernel generator: KernelSpec -> Triton source (one module per spec holding all of its kernels).

The template (templates.py) is specialised in two ways: @NAME@ placeholders take the spec's constants (head dims,
chunk, window, mix weights, gate normaliser), and `#if FLAG ... #elif ... #else ... #endif` blocks keep only the
code for the spec's gate kind and source, feature map, branches and dtype, so the emitted source reads as the one
kernel that rule chose (`linearize kernels emit --rules liger --out DIR`).
"""
from __future__ import annotations

import re

from . import templates
from .spec import GENERATOR_VERSION, KernelSpec

KERNELS = ("states_fwd", "chunk_fwd", "states_bwd", "chunk_bwd", "window_bwd_dq", "window_bwd_dkv", "decode")


def flags(spec: KernelSpec) -> dict[str, bool]:
    return {
        "LINEAR": spec.linear,
        "WINDOW": spec.has_window,
        "VECTOR": spec.gate == "vector",
        "GATE_K": spec.linear and spec.gate_from_k,
        "GATE_GIVEN": spec.linear and spec.gate_given,
        "GATE_FIXED": spec.gate == "fixed",
        "FN_LOGSIGMOID": spec.gate_fn == "logsigmoid",
        "FN_NEG_SOFTPLUS": spec.gate_fn == "neg_softplus",
        "FM_IDENTITY": spec.feature_map == "identity",
        "FM_RELU": spec.feature_map == "relu",
        "FM_ELU1": spec.feature_map == "elu+1",
        "FM_SOFTMAX": spec.feature_map == "softmax",
        "HALF": spec.dtype in ("float16", "bfloat16"),
        "BF16": spec.dtype == "bfloat16",
    }


def values(spec: KernelSpec) -> dict[str, str]:
    window = spec.window if spec.has_window else 1
    w_mix, l_mix = (spec.mix if spec.has_window and spec.linear else ((1.0, 0.0) if spec.has_window else (0.0, 1.0)))
    return {
        "VERSION": str(GENERATOR_VERSION),
        "KEY": spec.key(),
        "NAME": spec.name(),
        "SPEC_JSON": spec.to_json(),
        "GATE": spec.gate if spec.linear else "-",
        "GATE_EXPR": spec.gate_expression() if spec.linear else "-",
        "FEATURE_MAP": spec.feature_map if spec.linear else "-",
        "WINDOW_DESC": (f"{spec.window} tokens" + (f" + {spec.sinks} sinks" if spec.sinks else "")
                        + f", mix {float(w_mix):g}*swa + {float(l_mix):g}*gla" if spec.has_window else "none"),
        "HEAD_K": str(spec.head_k),
        "HEAD_V": str(spec.head_v),
        "GK": str(spec.gate_channels),
        "CHUNK": str(spec.chunk),
        "SUB": str(spec.sub_chunk),
        "NSUB": str(spec.chunk // spec.sub_chunk),
        "GROUP": str(spec.group),
        "WINDOW": str(window),
        "SINKS": str(spec.sinks if spec.has_window else 0),
        "MIX_W": repr(float(w_mix)),
        "MIX_L": repr(float(l_mix)),
        "GATE_NORM": repr(float(spec.gate_normalizer)),
        "DTYPE": spec.dtype,
        "TL_DTYPE": f"tl.{spec.dtype}",
    }


_DIRECTIVE = re.compile(r"^\s*#(if|elif|else|endif)\b\s*(\w*)\s*$")


def preprocess(text: str, flag_values: dict[str, bool]) -> str:
    """Keep the lines whose enclosing #if/#elif/#else branches are taken; drop the directives."""
    out = []
    stack: list[list[bool]] = []  # per level: [this branch taken, some branch already taken, parent active]
    active = True
    for line in text.splitlines():
        m = _DIRECTIVE.match(line)
        if not m:
            if active:
                out.append(line)
            continue
        kind, name = m.groups()
        if kind == "if":
            taken = active and _flag(flag_values, name)
            stack.append([taken, taken, active])
        elif kind == "elif":
            level = stack[-1]
            taken = level[2] and not level[1] and _flag(flag_values, name)
            level[0], level[1] = taken, level[1] or taken
        elif kind == "else":
            level = stack[-1]
            level[0] = level[2] and not level[1]
            level[1] = True
        else:
            stack.pop()
        active = stack[-1][0] if stack else True
        if stack and not all(lv[0] for lv in stack):
            active = False
    if stack:
        raise ValueError("unbalanced #if in template")
    return "\n".join(out) + "\n"


def _flag(flag_values, name):
    if name not in flag_values:
        raise KeyError(f"unknown template flag {name!r}")
    return flag_values[name]


def render(spec: KernelSpec) -> str:
    """The Triton source of every kernel of `spec`, as one importable module."""
    spec.check_shapes()
    text = preprocess(templates.TEMPLATE, flags(spec))
    for name, value in values(spec).items():
        text = text.replace(f"@{name}@", value)
    leftover = re.findall(r"@[A-Z_]+@", text)
    if leftover:
        raise ValueError(f"unfilled template placeholders: {sorted(set(leftover))}")
    return re.sub(r"\n{4,}", "\n\n\n", text)
